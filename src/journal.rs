//! Reads from the journal by position: the listener's reads after a doorbell, replay for a
//! resuming subscriber, catch-up after lag, and the head position.
//!
//! Reads are keyset-paginated on (commit, ordinal) and bounded by `journal.batch_size`, so
//! a 100 000-row transaction is never loaded at once. A commit is visible only once its
//! seal has drawn its number under the commit-order lock, so reading "everything after P"
//! never skips a commit that a later read could still find. This module never writes.
//!
//! Rows are decoded column by column and never panic: a row this binary cannot represent
//! (an op from a newer schema, text that is not UTF-8 in a `SQL_ASCII` database) is left
//! out of its batch and reported in [`Batch::skipped`] with its position, and the batch's
//! [`Batch::end`] still moves past it, so one bad row never stops a reader or is read
//! again. Only a row whose position itself cannot be decoded fails the read.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use deadpool_postgres::Pool;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::change::{Change, Op, Position};

/// A journal read failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// No pooled connection could be had.
    #[error("no database connection for a journal read")]
    Pool(#[source] deadpool_postgres::PoolError),
    /// The query failed.
    #[error("journal query failed")]
    Query(#[source] tokio_postgres::Error),
    /// The query did not finish within `database.query_timeout`.
    #[error("journal query timed out")]
    Timeout,
    /// A value every read needs (a position, the pruning watermark) could not be
    /// decoded: the journal is not what this binary expects at all.
    #[error("cannot decode the journal's {column}")]
    Decode {
        /// The column that failed.
        column: &'static str,
        /// Why.
        #[source]
        source: tokio_postgres::Error,
    },
}

impl JournalError {
    /// Whether the read failed because the pgfeed schema, or one of its tables, does not
    /// exist (SQLSTATE 3F000 or 42P01): it was uninstalled under a running gateway.
    pub fn schema_missing(&self) -> bool {
        use tokio_postgres::error::SqlState;
        match self {
            JournalError::Query(err) => matches!(
                err.code(),
                Some(code) if *code == SqlState::INVALID_SCHEMA_NAME
                    || *code == SqlState::UNDEFINED_TABLE
            ),
            _ => false,
        }
    }
}

/// Why a journal row was left out of a batch.
#[derive(Debug, thiserror::Error)]
pub enum Malformed {
    /// A column's value is not of the type this binary expects.
    #[error("column {column} cannot be decoded")]
    Column {
        /// The journal column.
        column: &'static str,
        /// Why.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A text column holds bytes that are not UTF-8 (possible in a SQL_ASCII database).
    #[error("column {column} is not UTF-8")]
    Utf8 {
        /// The journal column.
        column: &'static str,
        /// Where.
        #[source]
        source: std::str::Utf8Error,
    },
    /// A column that is never NULL was.
    #[error("column {0} is NULL")]
    Null(&'static str),
    /// A row image is not JSON.
    #[error("column {column} is not JSON")]
    Json {
        /// The journal column.
        column: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The op is not one this binary knows (a newer schema's, during a rolling upgrade).
    #[error("unknown op {0:?}")]
    Op(String),
}

/// A journal row a read left out, and why.
#[derive(Debug)]
pub struct Skipped {
    /// The row's position.
    pub position: Position,
    /// Why it could not be decoded.
    pub reason: Malformed,
}

/// Which changes a read returns.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// Every change (the listener).
    All,
    /// Changes of one tenant, plus public ones (a subscriber's replay).
    Tenant(&'a str),
}

/// Reads the journal through the pool.
#[derive(Clone)]
pub struct Journal {
    /// Connections for reads; the LISTEN connection is separate.
    pool: Pool,
    /// Most changes returned by one read.
    batch_size: i64,
    /// Row-image bytes (as stored) after which a read stops early.
    batch_bytes: i64,
    /// Longest a query may take before its connection is discarded: a connection that
    /// went silent must not hang a reader forever.
    query_timeout: Duration,
    /// Whether the database is SQL_ASCII, once the first read has asked: reads then
    /// fetch text as bytes ([`READ_ALL_BYTES`]). Shared by the clones.
    sql_ascii: Arc<OnceLock<bool>>,
    /// Permits for subscribers' reads (replays and catch-ups), shared by the clones: a
    /// storm of resumes waits here, in turn, and leaves the rest of the pool to everything
    /// else (`/v1/position`, resumes' head checks, `/metrics`, catalog reloads).
    replays: Arc<tokio::sync::Semaphore>,
}

/// One read: changes in commit order, whether more may follow, and the pruning watermark
/// seen in the same snapshot.
#[derive(Debug, Default)]
pub struct Batch {
    /// The changes, in commit order.
    pub changes: Vec<Arc<Change>>,
    /// False when the read reached the end of what is committed.
    pub more: bool,
    /// Newest position removed by pruning: a reader whose position is older missed
    /// changes.
    pub pruned: Position,
    /// The position read after names a commit that does not exist and was not pruned: its
    /// number was handed out by a seal that a database crash took back, and the same
    /// commits carry other numbers now (`pgfeed.seal`, sql/functions.sql). The reader must
    /// start over from the head (`reset`); `changes` are not for it.
    pub void: bool,
    /// Rows of this read that could not be decoded, in commit order; they are not in
    /// `changes`.
    pub skipped: Vec<Skipped>,
    /// Position of the last row this read returned, decoded or skipped (`None` when it
    /// returned none): the next read continues after it, so a skipped row that ends a
    /// batch is not read again.
    pub end: Option<Position>,
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
    )
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
    )
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

// Text as text: the server has checked it is valid in the database's encoding and converts
// it to the client's (UTF-8).
macro_rules! as_text {
    () => {
        "p.table_name, p.op, p.tenant, p.public, p.pk::text, p.new::text, p.old::text, p.changed"
    };
}
const READ_ALL: &str = read_after!(every_change!(), as_text!());
const READ_TENANT: &str = read_tenant!(as_text!());

// For a SQL_ASCII database, whose text may hold any byte: sent as text, one byte that is
// not UTF-8 fails the server's check on the way to the client encoding, and with it the
// whole read. So text leaves the server as its bytes (`bytea`, unchecked), and each column
// is checked here ([`text`]); `changed` comes as a JSON array.
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
const READ_ALL_BYTES: &str = read_after!(every_change!(), as_bytes!());
const READ_TENANT_BYTES: &str = read_tenant!(as_bytes!());

// Whether the database is SQL_ASCII.
const SQL_ASCII: &str =
    "SELECT pg_catalog.getdatabaseencoding() OPERATOR(pg_catalog.=) 'SQL_ASCII'";

// The newest change, or the pruning watermark when everything was pruned.
const HEAD: &str = "
    SELECT c.seq, (SELECT max(ch.ord) FROM pgfeed.changes AS ch WHERE ch.xid = c.xid),
           w.seq, w.ord
    FROM pgfeed.pruned AS w
    LEFT JOIN LATERAL (
        SELECT seq, xid FROM pgfeed.commits ORDER BY seq DESC LIMIT 1
    ) AS c ON true";

// Numbers the commits that are pending (sql/functions.sql, pgfeed.seal): run before every
// read of the listener and before the head, so that what they find is every commit that
// finished before they were sent.
const SEAL: &str = "SELECT pgfeed.seal()";

// Which journal this is; fails with undefined_table when the schema is gone.
const IDENTITY: &str = "SELECT 'pgfeed.commits'::pg_catalog.regclass::pg_catalog.oid";

/// Real bytes (row images as text) after which a subscriber's journal read stops, at
/// least one change read: what a replay or a catch-up holds for a stream that does not
/// take it, besides the chunk being written (see `sse`).
pub const STREAM_READ_BYTES: usize = 1 << 20;

/// Settings for journal reads.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most changes per read.
    pub batch_size: usize,
    /// Stored row-image bytes after which a read stops (at least one change is returned).
    pub batch_bytes: usize,
    /// Longest a query may take.
    pub query_timeout: Duration,
    /// Subscribers' reads (replays, catch-ups) running at once at most
    /// (`journal.replay_concurrency`).
    pub replay_concurrency: usize,
}

impl Journal {
    /// A journal reader over `pool`.
    pub fn new(pool: Pool, limits: Limits) -> Journal {
        Journal {
            pool,
            batch_size: limits.batch_size as i64,
            batch_bytes: limits.batch_bytes as i64,
            query_timeout: limits.query_timeout,
            sql_ascii: Arc::default(),
            replays: Arc::new(tokio::sync::Semaphore::new(
                limits
                    .replay_concurrency
                    .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
            )),
        }
    }

    /// Runs `f` on a pooled connection within the query timeout. On timeout the connection
    /// is discarded rather than returned to the pool.
    async fn with_client<T, F>(&self, f: F) -> Result<T, JournalError>
    where
        F: for<'c> FnOnce(
            &'c deadpool_postgres::Client,
        )
            -> futures_util::future::BoxFuture<'c, Result<T, tokio_postgres::Error>>,
    {
        let client = tokio::time::timeout(self.query_timeout, self.pool.get())
            .await
            .map_err(|_| JournalError::Timeout)?
            .map_err(JournalError::Pool)?;
        match tokio::time::timeout(self.query_timeout, f(&client)).await {
            Ok(result) => result.map_err(JournalError::Query),
            Err(_) => {
                drop(deadpool_postgres::Object::take(client));
                Err(JournalError::Timeout)
            }
        }
    }

    /// Runs a parameterless read (the catalog) within the query timeout.
    pub async fn query(&self, sql: &'static str) -> Result<Vec<tokio_postgres::Row>, JournalError> {
        self.with_client(move |client| Box::pin(async move { client.query(sql, &[]).await }))
            .await
    }

    /// The position of the newest committed change (`0.0` when there never was one).
    /// Commits that finished before are sealed first, so that a client that read its data
    /// before asking misses nothing after this position, and sees nothing twice.
    pub async fn head(&self) -> Result<Position, JournalError> {
        let row = self
            .with_client(|client| {
                Box::pin(async move {
                    // Pipelined: one round trip, the seal runs first on the server.
                    let (_, head) = futures_util::future::try_join(
                        client.query_one(SEAL, &[]),
                        client.query_one(HEAD, &[]),
                    )
                    .await?;
                    Ok(head)
                })
            })
            .await?;
        let newest = Position {
            commit: decode::<Option<i64>>(&row, 0, "commit number")?.unwrap_or(0),
            ord: decode::<Option<i32>>(&row, 1, "ordinal")?.unwrap_or(0),
        };
        let pruned = Position {
            commit: decode(&row, 2, "pruning watermark")?,
            ord: decode(&row, 3, "pruning watermark")?,
        };
        Ok(newest.max(pruned))
    }

    /// Identifies the journal: the oid of `pgfeed.commits`, which changes when the schema
    /// is uninstalled and installed again (and positions start over).
    pub async fn identity(&self) -> Result<u32, JournalError> {
        let row = self
            .with_client(|client| Box::pin(async move { client.query_one(IDENTITY, &[]).await }))
            .await?;
        decode(&row, 0, "identity")
    }

    /// Numbers the commits that finished and are not numbered yet (`pgfeed.seal`), then
    /// reads as [`Journal::read_after`] does, in one round trip: the listener's read.
    pub async fn seal_and_read(&self, after: Position) -> Result<Batch, JournalError> {
        self.read(after, Scope::All, true).await
    }

    /// Changes after `after`, in commit order, at most `batch_size` of them and stopping
    /// early past `batch_bytes`.
    pub async fn read_after(
        &self,
        after: Position,
        scope: Scope<'_>,
    ) -> Result<Batch, JournalError> {
        self.read(after, scope, false).await
    }

    async fn read(
        &self,
        after: Position,
        scope: Scope<'_>,
        seal: bool,
    ) -> Result<Batch, JournalError> {
        let tenant = match scope {
            Scope::All => None,
            Scope::Tenant(t) => Some(t.to_string()),
        };
        // A subscriber's read waits for its turn (never closed, so this cannot fail);
        // the listener's never does.
        let _turn = match tenant {
            Some(_) => self.replays.acquire().await.ok(),
            None => None,
        };
        let limit = self.batch_size;
        // What one read may bring into memory, in real bytes: a subscriber's read is
        // held by its stream until the client has taken it (see `sse`), so it is smaller.
        let budget = match tenant {
            Some(_) => self.batch_bytes.min(STREAM_READ_BYTES as i64),
            None => self.batch_bytes,
        };
        let known = self.sql_ascii.get().copied();
        let client = tokio::time::timeout(self.query_timeout, self.pool.get())
            .await
            .map_err(|_| JournalError::Timeout)?
            .map_err(JournalError::Pool)?;
        let reading = async {
            let sql_ascii = match known {
                Some(known) => known,
                None => client
                    .query_one(SQL_ASCII, &[])
                    .await
                    .and_then(|row| row.try_get(0))
                    .map_err(JournalError::Query)?,
            };
            let _ = self.sql_ascii.set(sql_ascii);
            let sql = match (tenant.is_some(), sql_ascii) {
                (false, false) => READ_ALL,
                (false, true) => READ_ALL_BYTES,
                (true, false) => READ_TENANT,
                (true, true) => READ_TENANT_BYTES,
            };
            let stmt = client
                .prepare_cached(sql)
                .await
                .map_err(JournalError::Query)?;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
                [&after.commit, &after.ord, &tenant, &limit, &budget];
            let read = client.query_raw(&stmt, params);
            let rows = if seal {
                // Pipelined: one round trip; the read's snapshot is taken after the seal
                // committed.
                let sealing = client
                    .prepare_cached(SEAL)
                    .await
                    .map_err(JournalError::Query)?;
                futures_util::future::try_join(client.query_one(&sealing, &[]), read)
                    .await
                    .map_err(JournalError::Query)?
                    .1
            } else {
                read.await.map_err(JournalError::Query)?
            };
            collect(rows, limit, budget as usize).await
        };
        let (batch, cut) = match tokio::time::timeout(self.query_timeout, reading).await {
            Ok(result) => result?,
            Err(_) => {
                drop(deadpool_postgres::Object::take(client));
                return Err(JournalError::Timeout);
            }
        };
        if cut {
            // The rows after the cut were not read: the statement is cancelled rather
            // than left to render and send them, and its connection, whose end of the
            // reply is still coming, is not reused (the cancel cannot reach a later one).
            let cancel = client.cancel_token();
            drop(deadpool_postgres::Object::take(client));
            tokio::spawn(async move {
                let _ = cancel.cancel_query(tokio_postgres::NoTls).await;
            });
        }
        Ok(batch)
    }

    /// Removes up to `max_commits` commits older than `retention`. Returns how many were
    /// removed, or `None` when another session holds the pruning lock.
    pub async fn prune(
        &self,
        retention: Duration,
        max_commits: i32,
    ) -> Result<Option<u32>, JournalError> {
        let seconds = retention.as_secs_f64();
        let row = self
            .with_client(move |client| {
                Box::pin(async move {
                    client
                        .query_one(
                            "SELECT pgfeed.prune(make_interval(secs => $1), $2)",
                            &[&seconds, &max_commits],
                        )
                        .await
                })
            })
            .await?;
        let removed: i32 = row.get(0);
        Ok(u32::try_from(removed).ok())
    }
}

/// Pruning rounds skipped in a row (the lock held elsewhere) after which a warning is
/// logged, and again every as many rounds.
pub const PRUNE_SKIPS_WARNED: u32 = 10;

/// Commits removed per pruning transaction: small enough that each one is short.
const PRUNE_BATCH: i32 = 200;

impl Journal {
    /// Prunes changes older than `retention` every `interval` until `shutdown`. Replicas
    /// take turns through a lock on `pgfeed.pruned` (taken with NOWAIT: a replica that
    /// finds it held skips the round and counts it); each batch is its own short
    /// transaction so writers are never blocked for long. When the lock has been held by
    /// others for [`PRUNE_SKIPS_WARNED`] rounds in a row, it says so.
    pub async fn prune_periodically(
        self,
        retention: Duration,
        interval: Duration,
        metrics: Arc<crate::metrics::Metrics>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut skipped_in_a_row = 0u32;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let mut total = 0u64;
            loop {
                match self.prune(retention, PRUNE_BATCH).await {
                    Ok(Some(removed)) => {
                        skipped_in_a_row = 0;
                        metrics.prune_runs.inc();
                        metrics.pruned_commits.inc_by(u64::from(removed));
                        total += u64::from(removed);
                        if removed < PRUNE_BATCH as u32 || shutdown.is_cancelled() {
                            break;
                        }
                    }
                    Ok(None) => {
                        metrics.prune_skipped.inc();
                        skipped_in_a_row += 1;
                        if skipped_in_a_row.is_multiple_of(PRUNE_SKIPS_WARNED) {
                            tracing::warn!(
                                rounds = skipped_in_a_row,
                                "the journal has not been pruned for {skipped_in_a_row} rounds: another session holds the lock on pgfeed.pruned (see pg_locks)"
                            );
                        }
                        break;
                    }
                    // The listener reports that one, once.
                    Err(err) if err.schema_missing() => {
                        tracing::debug!(cause = %err, "cannot prune: the pgfeed schema is missing");
                        break;
                    }
                    Err(err) => {
                        tracing::warn!(cause = %err, "pruning the journal failed");
                        break;
                    }
                }
            }
            if total > 0 {
                tracing::info!(commits = total, "pruned the journal");
            }
        }
    }
}

/// Reads a page's rows as they arrive, decoding each into a change, until the page ends
/// or the real size of what was read (the row images as text, not as stored: compressed,
/// a 1 MB row may take a few KB) reaches `budget`, after at least one change. Returns the
/// batch and whether the page was cut (its remaining rows were not read).
async fn collect(
    rows: tokio_postgres::RowStream,
    limit: i64,
    budget: usize,
) -> Result<(Batch, bool), JournalError> {
    use futures_util::TryStreamExt as _;
    futures_util::pin_mut!(rows);
    let mut batch = Batch::default();
    let (mut fetched, mut returned, mut bytes) = (0i64, 0i64, 0usize);
    let mut cut = false;
    while let Some(row) = rows.try_next().await.map_err(JournalError::Query)? {
        batch.pruned = Position {
            commit: decode(&row, 12, "pruning watermark")?,
            ord: decode(&row, 13, "pruning watermark")?,
        };
        fetched = decode(&row, 11, "page size")?;
        batch.void = decode(&row, 15, "void position")?;
        batch.more = fetched == limit;
        // Without a position a row could only be skipped by reading it again forever.
        let Some(commit) = decode::<Option<i64>>(&row, 0, "commit number")? else {
            continue;
        };
        let position = Position {
            commit,
            ord: decode(&row, 1, "ordinal")?,
        };
        returned += 1;
        batch.end = Some(position);
        bytes += (2..=10).map(|i| real_len(&row, i)).sum::<usize>();
        match to_change(&row, position) {
            Ok(change) => batch.changes.push(change),
            Err(reason) => batch.skipped.push(Skipped { position, reason }),
        }
        if bytes >= budget && returned < decode::<i64>(&row, 16, "rows sent")? {
            cut = true;
            break;
        }
    }
    // A page cut short by size has more behind it.
    if returned < fetched {
        batch.more = true;
    }
    Ok((batch, cut))
}

/// The length of a column's value as sent (0 for NULL), whatever its type.
fn real_len(row: &tokio_postgres::Row, index: usize) -> usize {
    struct Len(usize);
    impl<'a> tokio_postgres::types::FromSql<'a> for Len {
        fn from_sql(
            _: &tokio_postgres::types::Type,
            raw: &'a [u8],
        ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
            Ok(Len(raw.len()))
        }
        fn accepts(_: &tokio_postgres::types::Type) -> bool {
            true
        }
    }
    row.try_get::<_, Option<Len>>(index)
        .ok()
        .flatten()
        .map_or(0, |Len(n)| n)
}

/// Decodes a column that the read cannot do without (positions, page bookkeeping).
fn decode<'r, T: tokio_postgres::types::FromSql<'r>>(
    row: &'r tokio_postgres::Row,
    index: usize,
    column: &'static str,
) -> Result<T, JournalError> {
    row.try_get(index)
        .map_err(|source| JournalError::Decode { column, source })
}

/// Decodes a column of a change; a failure skips the change.
fn column<'r, T: tokio_postgres::types::FromSql<'r>>(
    row: &'r tokio_postgres::Row,
    index: usize,
    column: &'static str,
) -> Result<T, Malformed> {
    row.try_get(index)
        .map_err(|source| Malformed::Column { column, source })
}

/// A text column: text, or its bytes from a SQL_ASCII database ([`READ_ALL_BYTES`]),
/// which must be UTF-8.
fn text<'r>(
    row: &'r tokio_postgres::Row,
    index: usize,
    name: &'static str,
) -> Result<Option<&'r str>, Malformed> {
    if !is_bytes(row, index) {
        return column(row, index, name);
    }
    column::<Option<&[u8]>>(row, index, name)?
        .map(|bytes| {
            std::str::from_utf8(bytes).map_err(|source| Malformed::Utf8 {
                column: name,
                source,
            })
        })
        .transpose()
}

/// Whether a column comes as `bytea` ([`READ_ALL_BYTES`]).
fn is_bytes(row: &tokio_postgres::Row, index: usize) -> bool {
    row.columns()
        .get(index)
        .is_some_and(|c| c.type_() == &tokio_postgres::types::Type::BYTEA)
}

/// A text column that is never NULL.
fn required<'r>(
    row: &'r tokio_postgres::Row,
    index: usize,
    name: &'static str,
) -> Result<&'r str, Malformed> {
    text(row, index, name)?.ok_or(Malformed::Null(name))
}

/// A row image, kept as the JSON text PostgreSQL rendered.
fn raw(
    row: &tokio_postgres::Row,
    index: usize,
    name: &'static str,
) -> Result<Option<Box<RawValue>>, Malformed> {
    text(row, index, name)?
        .map(|text| {
            RawValue::from_string(text.to_owned()).map_err(|source| Malformed::Json {
                column: name,
                source,
            })
        })
        .transpose()
}

/// The change in a row of [`READ_ALL`], or why it cannot be one.
fn to_change(row: &tokio_postgres::Row, position: Position) -> Result<Arc<Change>, Malformed> {
    let op = required(row, 3, "op")?;
    let op: Op = op
        .parse()
        // Bounded: the op is shown in a log line.
        .map_err(|()| Malformed::Op(op.chars().take(32).collect()))?;
    let changed = if is_bytes(row, 9) {
        // A JSON array ([`READ_ALL_BYTES`]).
        text(row, 9, "changed")?
            .map(|json| {
                serde_json::from_str::<Vec<String>>(json).map_err(|source| Malformed::Json {
                    column: "changed",
                    source,
                })
            })
            .transpose()?
    } else {
        column(row, 9, "changed")?
    };
    Ok(Arc::new(Change::new(
        position,
        required(row, 2, "table_name")?.to_owned(),
        op,
        text(row, 4, "tenant")?.map(str::to_owned),
        column(row, 5, "public")?,
        raw(row, 6, "pk")?,
        raw(row, 7, "new")?,
        raw(row, 8, "old")?,
        changed,
        column(row, 10, "committed_at")?,
        column(row, 14, "committed_at")?,
    )))
}
