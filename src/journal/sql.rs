//! The SQL of journal reads, written once: the listener's read of every change, a
//! subscriber's read of its tenant's (two plans, one chosen by the data), each in two
//! encodings (text, or bytes for a `SQL_ASCII` database), sharing one final projection;
//! the head, the seal, the journal's identity and pruning.
//!
//! Parameters of the reads: $1 and $2 the position read after (commit, ordinal), $3 the
//! tenant (NULL for every change), $4 the most rows, $5 the stored bytes after which the
//! page is cut.

// What every read returns, row by row, from its `page` (rows with their stored `size` and
// the `running` total of sizes, in commit order): the change's position and `$columns`
// (see READ_ALL_BYTES for why there are two sets), its commit time as text and in
// seconds, the page's size (`fetched`), the pruning watermark, whether the position read
// after is void (see `Batch::void`) and how many rows the server sends (`sent`). The
// pruning watermark's row is joined to the page so that an empty page still brings it.
// Columns by index: seq 0, ord 1, $columns 2..=9, committed_at 10, fetched 11, watermark
// 12 and 13, epoch 14, void 15, sent 16 (`collect`, `to_change`).
macro_rules! projection {
    ($columns:expr) => {
        concat!(
            "
    SELECT p.seq, p.ord, ",
            $columns,
            ",
           to_char(p.committed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
           (SELECT count(*) FROM page) AS fetched,
           w.seq, w.ord,
           extract(epoch FROM p.committed_at)::float8,
           $1 > w.seq AND NOT EXISTS (SELECT FROM pgfeed.commits AS v WHERE v.seq = $1),
           (SELECT count(*) FROM page WHERE running - size < $5) AS sent
    FROM pgfeed.pruned AS w
    LEFT JOIN page AS p ON p.running - p.size < $5
    ORDER BY p.seq, p.ord"
        )
    };
}

// The page is cut by count ($4) and by stored size ($5, always at least one row). The
// page CTE keeps row images as stored (toasted) until the final projection, so rows past
// the byte limit are never detoasted. Stored sizes are compressed sizes, so the reader
// also cuts by real size as the rows arrive (`collect`); `sent` is how many rows the
// server sends. `$columns` are the columns of each change (see READ_ALL_BYTES for why
// there are two sets).
macro_rules! read_after {
    ($source:expr, $columns:expr) => {
        concat!(
            "
    WITH page AS (
        SELECT c.seq, ch.ord, ch.table_name, ch.op, ch.tenant, ch.public, ch.pk, ch.new, ch.old,
               ch.changed, c.committed_at,
               coalesce(pg_column_size(ch.new), 0) + coalesce(pg_column_size(ch.old), 0) AS size,
               sum(coalesce(pg_column_size(ch.new), 0) + coalesce(pg_column_size(ch.old), 0))
                   OVER (ORDER BY c.seq, ch.ord) AS running
        ",
            $source,
            "
        ORDER BY c.seq, ch.ord
        LIMIT $4
    )",
            projection!($columns)
        )
    };
}

// Every change (the listener): at most $4 commits from $1 on, and from each, in ordinal order,
// at most $4 changes after $2 (for the commit $1 itself) by an ordered scan of the journal's
// key. So a page of a large transaction costs a page, wherever it starts in it: filtering
// `ord > $2` after the join, and sorting what remained of the commit again for every page,
// made publishing a transaction quadratic in its size. Every sealed commit has changes, so
// $4 commits after the one at $1 (which may have none left after $2) always fill a page.
macro_rules! every_change {
    () => {
        "FROM (SELECT seq, xid, committed_at FROM pgfeed.commits
              WHERE seq >= $1 ORDER BY seq LIMIT $4::bigint + 1) AS c
        CROSS JOIN LATERAL (
            SELECT x.ord, x.table_name, x.op, x.tenant, x.public, x.pk, x.new, x.old, x.changed
            FROM pgfeed.changes AS x
            WHERE x.xid = c.xid AND x.ord > CASE WHEN c.seq = $1 THEN $2 ELSE 0 END
              AND $3::text IS NULL
            ORDER BY x.ord
            LIMIT $4
        ) AS ch"
    };
}

// A tenant's changes and public ones (a replay or a catch-up), paged and cut as
// `read_after!` does. Two ways to find them, one of which runs (the other is gated off by a
// one-time filter):
//
// * A quiet tenant (together with public changes, fewer than QUIET rows in the whole
//   journal, counted on the indexes of migration 7 and stopping at QUIET) reads its own
//   rows through those indexes, each looked up in pgfeed.commits by xid: other tenants'
//   changes are never visited, however many there are.
// * A busy tenant reads commits in order from the position, as the listener does, keeping
//   its rows: its rows are then a good part of what is scanned, and going through its
//   index would mean visiting all of them, from long before the position.
//
// The comment names the query in pg_stat_activity.
macro_rules! read_tenant {
    ($columns:expr) => {
        concat!(
            "/* pgfeed tenant read */
    WITH quiet AS MATERIALIZED (
        SELECT (SELECT count(*) FROM (SELECT FROM pgfeed.changes AS x
                                      WHERE x.tenant = $3 LIMIT 5000) AS t)
             + (SELECT count(*) FROM (SELECT FROM pgfeed.changes AS x
                                      WHERE x.public LIMIT 5000) AS u) < 5000 AS yes
    ), found AS (
        (SELECT c.seq, ch.ord, ch.table_name, ch.op, ch.tenant, ch.public, ch.pk, ch.new,
                ch.old, ch.changed, c.committed_at
         FROM ((SELECT x.xid, x.ord, x.table_name, x.op, x.tenant, x.public, x.pk, x.new,
                       x.old, x.changed
                FROM pgfeed.changes AS x WHERE x.tenant = $3
                ORDER BY x.tenant, x.xid LIMIT 5000)
               UNION ALL
               (SELECT x.xid, x.ord, x.table_name, x.op, x.tenant, x.public, x.pk, x.new,
                       x.old, x.changed
                FROM pgfeed.changes AS x WHERE x.public AND x.tenant IS DISTINCT FROM $3
                ORDER BY x.xid LIMIT 5000)) AS ch
         CROSS JOIN LATERAL (
             SELECT k.seq, k.committed_at FROM pgfeed.commits AS k
             WHERE k.xid = ch.xid LIMIT 1
         ) AS c
         WHERE (SELECT yes FROM quiet)
           AND c.seq >= $1 AND (c.seq > $1 OR ch.ord > $2)
         ORDER BY c.seq, ch.ord
         LIMIT $4)
        UNION ALL
        (SELECT c.seq, ch.ord, ch.table_name, ch.op, ch.tenant, ch.public, ch.pk, ch.new,
                ch.old, ch.changed, c.committed_at
         FROM pgfeed.commits AS c
         JOIN pgfeed.changes AS ch ON ch.xid = c.xid
         WHERE NOT (SELECT yes FROM quiet)
           AND c.seq >= $1 AND (c.seq > $1 OR ch.ord > $2)
           AND (ch.tenant = $3 OR ch.public)
         ORDER BY c.seq, ch.ord
         LIMIT $4)
    ), page AS (
        SELECT f.seq, f.ord, f.table_name, f.op, f.tenant, f.public, f.pk, f.new, f.old,
               f.changed, f.committed_at,
               coalesce(pg_column_size(f.new), 0) + coalesce(pg_column_size(f.old), 0) AS size,
               sum(coalesce(pg_column_size(f.new), 0) + coalesce(pg_column_size(f.old), 0))
                   OVER (ORDER BY f.seq, f.ord) AS running
        FROM found AS f
        ORDER BY f.seq, f.ord
        LIMIT $4
    )",
            projection!($columns)
        )
    };
}

// Text as text: the server has checked it is valid in the database's encoding and converts
// it to the client's (UTF-8).
macro_rules! as_text {
    () => {
        "p.table_name, p.op, p.tenant, p.public, p.pk::text, p.new::text, p.old::text, p.changed"
    };
}
pub(super) const READ_ALL: &str = read_after!(every_change!(), as_text!());
pub(super) const READ_TENANT: &str = read_tenant!(as_text!());

// For a SQL_ASCII database, whose text may hold any byte: sent as text, one byte that is
// not UTF-8 fails the server's check on the way to the client encoding, and with it the
// whole read. So text leaves the server as its bytes (`bytea`, unchecked), and each column
// is checked on arrival (`decode::text`); `changed` comes as a JSON array.
macro_rules! as_bytes {
    () => {
        "pg_catalog.convert_to(p.table_name, 'SQL_ASCII'), pg_catalog.convert_to(p.op, 'SQL_ASCII'),
           pg_catalog.convert_to(p.tenant, 'SQL_ASCII'), p.public,
           pg_catalog.convert_to(p.pk::text, 'SQL_ASCII'),
           pg_catalog.convert_to(p.new::text, 'SQL_ASCII'),
           pg_catalog.convert_to(p.old::text, 'SQL_ASCII'),
           pg_catalog.convert_to(pg_catalog.array_to_json(p.changed)::text, 'SQL_ASCII')"
    };
}
pub(super) const READ_ALL_BYTES: &str = read_after!(every_change!(), as_bytes!());
pub(super) const READ_TENANT_BYTES: &str = read_tenant!(as_bytes!());

// Whether the database is SQL_ASCII.
pub(super) const SQL_ASCII: &str =
    "SELECT pg_catalog.getdatabaseencoding() OPERATOR(pg_catalog.=) 'SQL_ASCII'";

// The newest change, or the pruning watermark when everything was pruned.
pub(super) const HEAD: &str = "
    SELECT c.seq, (SELECT max(ch.ord) FROM pgfeed.changes AS ch WHERE ch.xid = c.xid),
           w.seq, w.ord
    FROM pgfeed.pruned AS w
    LEFT JOIN LATERAL (
        SELECT seq, xid FROM pgfeed.commits ORDER BY seq DESC LIMIT 1
    ) AS c ON true";

// Numbers the commits that are pending (sql/functions.sql, pgfeed.seal): run before every
// read of the listener and before the head, so that what they find is every commit that
// finished before they were sent.
pub(super) const SEAL: &str = "SELECT pgfeed.seal()";

// Which journal this is; fails with undefined_table when the schema is gone.
pub(super) const IDENTITY: &str = "SELECT 'pgfeed.commits'::pg_catalog.regclass::pg_catalog.oid";

// Removes up to $2 commits older than $1 seconds and says how many, or -1 when another
// session holds the pruning lock.
pub(super) const PRUNE: &str = "SELECT pgfeed.prune(make_interval(secs => $1), $2)";
