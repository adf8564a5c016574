-- pgfeed functions and triggers. Re-applied by every `pgfeed install` (CREATE OR REPLACE),
-- so it must stay idempotent.
--
-- Capture functions are SECURITY DEFINER with a fixed search_path: application roles need
-- no privilege on schema pgfeed and cannot write journal rows themselves.

-- The ordinal counter: the transaction-local setting pgfeed.ord says whether the
-- transaction has captured anything yet (NULL or '' before the first capture: custom
-- settings keep an empty value after a transaction that set them). Any session can set it,
-- so it is only a hint: when it says "not the first", capture takes the transaction's
-- highest ordinal from the journal itself (one probe of the primary key), so a value set by
-- the application (negative, too high, set before the first write) changes no position.
-- Only a forged "first" ('' or '0') after a capture has an effect: that session's next
-- watched statement fails on the journal's primary key, and nothing is written. A rolled
-- back savepoint undoes the setting and the journal rows together. The expression is
-- written once, as a piece of the capture functions' generator below, rather than called:
-- a helper function cost a call setup, and a fresh plan, in every transaction.
--
-- The seal: a transaction's first journal row (ord = 1) queues the deferred constraint
-- trigger `seal` on pgfeed.changes, which records the commit at commit time (_seal below);
-- gateways number recorded commits (pgfeed.seal).
--
-- Capture runs once per watched statement, so its cost is counted in instructions
-- (BENCHMARKS.md, "Where the time goes"). Two habits below come from that:
--   * `ignored := f(...) IS NULL` instead of `PERFORM f(...)` for functions called for
--     their effect: PL/pgSQL evaluates an assignment as a simple expression, while PERFORM
--     runs a whole query through the executor;
--   * a statement that changed one row, the common case, is journaled by an INSERT ...
--     VALUES of PL/pgSQL variables; several rows by one INSERT ... SELECT over unnest().

-- pgfeed.json_casts_since_initdb (migration 4): casts to json or jsonb with a function,
-- created after initdb. When there are none, as in most databases, capture skips
-- _check_casts.

-- Refuses to capture a table whose rows to_jsonb() would render through a cast to json or
-- jsonb that a non-superuser defined: to_jsonb() calls such casts, and inside a SECURITY
-- DEFINER capture function that code would run as the capture role. Casts from
-- superusers (extensions such as PostGIS) are trusted. Capture calls it only when
-- pgfeed.json_casts_since_initdb is not empty. It reads the transaction's snapshot, so it
-- is not the only line of defence: see "Rendering" below.
CREATE OR REPLACE FUNCTION pgfeed._check_casts(tbl oid) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    bad text;
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_cast AS c
        JOIN pg_proc AS p ON p.oid = c.castfunc
        JOIN pg_roles AS r ON r.oid = p.proowner
        WHERE c.casttarget IN ('json'::regtype, 'jsonb'::regtype) AND NOT r.rolsuper
    ) THEN
        RETURN;
    END IF;
    WITH RECURSIVE reached(typ) AS (
        SELECT a.atttypid FROM pg_attribute AS a
        WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped
        UNION
        SELECT x.typ
        FROM reached
        JOIN pg_type AS t ON t.oid = reached.typ
        CROSS JOIN LATERAL (
            SELECT t.typbasetype WHERE t.typtype = 'd'
            UNION ALL SELECT t.typelem WHERE t.typelem <> 0 AND t.typcategory = 'A'
            UNION ALL SELECT a.atttypid FROM pg_attribute AS a
                WHERE t.typrelid <> 0 AND a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped
            UNION ALL SELECT r.rngsubtype FROM pg_range AS r
                WHERE r.rngtypid = t.oid OR r.rngmultitypid = t.oid
        ) AS x(typ)
    )
    SELECT format_type(c.castsource, NULL) INTO bad
    FROM reached
    JOIN pg_cast AS c ON c.castsource = reached.typ
    JOIN pg_proc AS p ON p.oid = c.castfunc
    JOIN pg_roles AS r ON r.oid = p.proowner
    WHERE c.casttarget IN ('json'::regtype, 'jsonb'::regtype) AND NOT r.rolsuper
    LIMIT 1;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'pgfeed: refusing to capture changes of %: its type % has a cast to json defined by a non-superuser', tbl::regclass, bad
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Capture renders rows with to_jsonb(), which would run that cast with pgfeed''s privileges. '
                      || 'Drop the cast, or unwatch the table.';
    END IF;
END
$$;

-- Rendering. to_jsonb() runs a type's cast to json if it has one, and inside these
-- SECURITY DEFINER functions such a cast would run as pgfeed_capture. _check_casts refuses
-- tables whose rows reach a cast defined by a non-superuser, but it reads pg_cast through
-- the transaction's snapshot while to_jsonb() finds casts through the catalog cache: in a
-- REPEATABLE READ or SERIALIZABLE transaction whose snapshot predates a cast, the check
-- passes and to_jsonb() still runs the cast. So capture renders rows in a sandbox that
-- does not depend on the check:
--   * in a subtransaction (a BEGIN ... EXCEPTION block) that is always rolled back: the
--     rendered rows are kept in a PL/pgSQL variable, which a rollback does not touch,
--     while everything that code run by to_jsonb() did as pgfeed_capture is undone with
--     the subtransaction: rows written, functions created or altered, privileges granted,
--     settings changed, after-trigger events queued. This is the guarantee.
--   * with the transaction read-only for the duration (transaction_read_only, set local
--     to the subtransaction, so its rollback restores it): a first barrier only, since
--     such code can RESET the setting (PostgreSQL checks SET, not RESET). Past it, what
--     it writes is still undone; what no rollback undoes is nextval() of the commit
--     sequence, which leaves unused commit numbers. Those are harmless: commits that fail
--     after their seal (a serialization failure at commit) leave them too, and positions
--     are only ever compared, never counted.
-- The block ends by raising SQLSTATE PGFR0, which it catches. `rendered` is set only
-- after rendering finished, so code that raises PGFR0 itself from within to_jsonb() does
-- not pass for a finished rendering: the statement fails instead (_rendering_failed).
CREATE OR REPLACE FUNCTION pgfeed._rendering_failed(tbl oid) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'pgfeed: refusing to capture changes of %: rendering its rows was interrupted', tbl::regclass
        USING ERRCODE = 'insufficient_privilege',
              DETAIL = 'Code that to_jsonb() ran for one of its column types, most likely a cast to json or jsonb, raised SQLSTATE PGFR0, which pgfeed reserves.',
              HINT = 'Drop that cast, or unwatch the table.';
END
$$;

-- A watched write after this transaction recorded its commit (_seal below): an application's
-- deferred trigger that runs after the seal, or SET CONSTRAINTS ALL IMMEDIATE. Its number is
-- drawn again, now, so that a write it makes after waiting for another transaction's row
-- lock is ordered after that transaction. Called by the capture functions (as their owner).
CREATE OR REPLACE FUNCTION pgfeed._redraw() RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    UPDATE pgfeed.pending SET draw = nextval('pgfeed.commit_seq')
    WHERE xid = pg_current_xact_id()
$$;

-- Trigger arguments, fixed by pgfeed.watch():
--   TG_ARGV[0] tenant column ('' for a public table)
--   TG_ARGV[1] public ('true' / 'false')
--   TG_ARGV[2] primary key columns (text[] literal)
--   TG_ARGV[3] excluded columns (text[] literal): with an include list, every column that
--              is neither included nor a key nor the tenant column
--   TG_ARGV[4] the table's name in events ("schema.table"; a partition's names its root)
-- pgfeed._apply keeps them current through DDL (renames, added columns, new partitions).

-- The capture functions are generated here, at install, from pieces each written once: the
-- declarations, the ordinal counter, the check for casts, the rendering sandbox, a row's
-- key and tenant, and what follows journaling. Each generated function is plain PL/pgSQL
-- (see it with \sf pgfeed._capture_insert), so generation costs nothing per statement.
DO $generate$
DECLARE
    -- Every capture function's variables.
    declarations CONSTANT text := $piece$
    tenant_col text    := TG_ARGV[0];
    is_public  boolean := TG_ARGV[1]::boolean;
    pk_cols    text[]  := TG_ARGV[2]::text[];
    excl       text[]  := TG_ARGV[3]::text[];
    base       integer := 0;
    tbl_name   text    := coalesce(TG_ARGV[4], TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME);
    rendered   boolean := false;
    ignored    boolean;
    not_pk     text[];
    n          integer;
$piece$;
    -- The transaction's highest ordinal so far ("The ordinal counter" above).
    ordinal CONSTANT text := $piece$
    IF coalesce(current_setting('pgfeed.ord', true), '') NOT IN ('', '0') THEN
        base := coalesce((SELECT max(c.ord) FROM pgfeed.changes AS c
                          WHERE c.xid = pg_current_xact_id()), 0);
    END IF;
$piece$;
    casts CONSTANT text := $piece$
    IF EXISTS (SELECT FROM pgfeed.json_casts_since_initdb) THEN
        PERFORM pgfeed._check_casts(TG_RELID);
    END IF;
$piece$;
    -- Rendering in the sandbox ("Rendering" above); %s: the assignments that render.
    sandbox CONSTANT text := $piece$
    BEGIN
        ignored := set_config('transaction_read_only', 'on', true) IS NULL;
        %s
        rendered := true;
        RAISE SQLSTATE 'PGFR0';
    EXCEPTION WHEN SQLSTATE 'PGFR0' THEN
        NULL;
    END;
    IF NOT rendered THEN
        PERFORM pgfeed._rendering_failed(TG_RELID);
    END IF;
$piece$;
    -- For statements of several rows, whose images are in the array %s: each row's key is
    -- the row less its other columns when those are few (one operator per row; it
    -- compares every column with every name, so not for wide tables), else built from the
    -- one key column; the aggregate is left for composite keys of wide tables and for key
    -- columns gone from the row (renamed since watch()).
    keys_of_many CONSTANT text := $piece$
    IF cardinality(%1$s) > 1 AND %1$s[1] ?& pk_cols THEN
        not_pk := ARRAY(SELECT k FROM jsonb_object_keys(%1$s[1]) AS k WHERE k <> ALL (pk_cols));
        IF cardinality(not_pk) > 8 THEN
            not_pk := NULL;
        END IF;
    END IF;
$piece$;
    -- The key of the row image %s in a statement of several rows (keys_of_many).
    key_of CONSTANT text := $piece$CASE WHEN not_pk IS NOT NULL THEN %1$s - not_pk
                    WHEN cardinality(pk_cols) = 1
                    THEN jsonb_build_object(pk_cols[1], %1$s -> pk_cols[1])
                    ELSE (SELECT jsonb_object_agg(c, %1$s -> c) FROM unnest(pk_cols) AS c)
               END$piece$;
    -- The tenant of the row image %s.
    tenant_of CONSTANT text := $piece$CASE WHEN is_public THEN NULL ELSE %1$s ->> tenant_col END$piece$;
    -- After n changes were journaled: the counter, and a new draw for a write after the
    -- seal (_redraw above).
    journaled CONSTANT text := $piece$
    IF n > 0 THEN
        ignored := set_config('pgfeed.ord', (base + n)::text, true) IS NULL;
        IF current_setting('pgfeed.sealed', true) = 'on' THEN
            PERFORM pgfeed._redraw();
        END IF;
    END IF;
$piece$;
    header CONSTANT text := $piece$CREATE OR REPLACE FUNCTION pgfeed.%I() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS %L$piece$;
    -- Inserts and deletes: one image per row (%1$s the transition table, %2$s the op,
    -- %3$s the journal's column for the image). A statement that changed one row, the
    -- common case, is journaled by an INSERT ... VALUES of PL/pgSQL variables; several
    -- rows by one INSERT ... SELECT over unnest().
    one_image CONSTANT text := $piece$
    IF n = 1 THEN
        -- The key by an assignment: in the INSERT, the aggregate's subquery would be set
        -- up at every execution.
        j := rows[1];
        IF cardinality(pk_cols) = 1 THEN
            pk := jsonb_build_object(pk_cols[1], j -> pk_cols[1]);
        ELSE
            pk := (SELECT jsonb_object_agg(c, j -> c) FROM unnest(pk_cols) AS c);
        END IF;
        INSERT INTO pgfeed.changes (xid, ord, table_name, op, tenant, public, pk, %3$s)
        VALUES (pg_current_xact_id(), base + 1, tbl_name, '%2$s', $piece$
        || format(tenant_of, 'j') || $piece$, is_public, pk, j - excl);
    ELSIF n > 1 THEN$piece$ || format(keys_of_many, 'rows') || $piece$
        INSERT INTO pgfeed.changes (xid, ord, table_name, op, tenant, public, pk, %3$s)
        SELECT pg_current_xact_id(), base + s.i::integer, tbl_name, '%2$s', $piece$
        || format(tenant_of, 's.j') || ', is_public, ' || format(key_of, 's.j') || $piece$, s.j - excl
        FROM unnest(rows) WITH ORDINALITY AS s(j, i);
    END IF;
$piece$;
    body text;
    fn   text;
    tt   text;
    op   text;
    col  text;
BEGIN
    -- Inserts and deletes.
    FOR fn, tt, op, col IN VALUES ('_capture_insert', 'pgfeed_new', 'insert', 'new'),
                                  ('_capture_delete', 'pgfeed_old', 'delete', 'old') LOOP
        body := 'DECLARE' || declarations || $piece$
    rows       jsonb[];
    j          jsonb;
    pk         jsonb;
BEGIN$piece$ || ordinal || casts
            || format(sandbox, format('rows := ARRAY(SELECT to_jsonb(r) FROM %s AS r);', tt))
            || $piece$
    n := cardinality(rows);$piece$
            || format(one_image, tt, op, col)
            || journaled || $piece$
    RETURN NULL;
END$piece$;
        EXECUTE format(header, fn, body);
    END LOOP;

    -- Updates. Old and new rows are paired by their position in the transition tables:
    -- PostgreSQL appends both images of each updated row together, so the n-th old row is
    -- the n-th new row's predecessor (pairing by key would break when the key itself
    -- changes). PostgreSQL does not document this order; tests/update_pairing.rs proves
    -- it over HOT and non-HOT updates, rows moved to other pages or partitions, changed
    -- keys, a random visiting order and rows skipped by an application's trigger. An
    -- update that moves a row to another tenant is captured as a delete for the old tenant
    -- and an insert for the new one, so neither tenant sees the other's row.
    body := 'DECLARE' || declarations || $piece$
    olds       jsonb[];
    news       jsonb[];
BEGIN$piece$ || ordinal || casts
        || format(sandbox, $piece$olds := ARRAY(SELECT to_jsonb(r) - excl FROM pgfeed_old AS r);
        news := ARRAY(SELECT to_jsonb(r) - excl FROM pgfeed_new AS r);$piece$)
        || format(keys_of_many, 'news')
        || $piece$
    WITH pairs AS (
        SELECT o.i, o.j AS oj, nw.j AS nj, $piece$ || format(tenant_of, 'o.j') || $piece$ AS old_tenant,
               $piece$ || format(tenant_of, 'nw.j') || $piece$ AS new_tenant
        FROM unnest(olds) WITH ORDINALITY AS o(j, i)
        JOIN unnest(news) WITH ORDINALITY AS nw(j, i) USING (i)
    ),
    events AS (
        -- same tenant: an update, unless no (captured) column changed
        SELECT p.i, 0 AS k, 'update' AS op, p.new_tenant AS tenant, $piece$ || format(key_of, 'p.nj') || $piece$ AS pk,
               p.nj AS new, p.oj AS old,
               ARRAY(SELECT e.key FROM jsonb_each(p.nj) AS e
                     WHERE e.value IS DISTINCT FROM p.oj -> e.key ORDER BY e.key) AS changed
        FROM pairs AS p
        WHERE p.old_tenant IS NOT DISTINCT FROM p.new_tenant
        UNION ALL
        -- tenant moved: the old tenant sees the row leave ...
        SELECT p.i, 0, 'delete', p.old_tenant, $piece$ || format(key_of, 'p.oj') || $piece$,
               NULL, p.oj, NULL
        FROM pairs AS p
        WHERE p.old_tenant IS DISTINCT FROM p.new_tenant
        UNION ALL
        -- ... and the new tenant sees it arrive
        SELECT p.i, 1, 'insert', p.new_tenant, $piece$ || format(key_of, 'p.nj') || $piece$,
               p.nj, NULL, NULL
        FROM pairs AS p
        WHERE p.old_tenant IS DISTINCT FROM p.new_tenant
    )
    INSERT INTO pgfeed.changes (xid, ord, table_name, op, tenant, public, pk, new, old, changed)
    SELECT pg_current_xact_id(), base + (row_number() OVER (ORDER BY ev.i, ev.k))::integer,
           tbl_name, ev.op, ev.tenant, is_public, ev.pk, ev.new, ev.old, ev.changed
    FROM events AS ev
    WHERE ev.op <> 'update' OR cardinality(ev.changed) > 0;
    GET DIAGNOSTICS n = ROW_COUNT;$piece$
        || journaled || $piece$
    RETURN NULL;
END$piece$;
    EXECUTE format(header, '_capture_update', body);

    -- Truncates carry no row, so every subscriber allowed the table receives them. A
    -- TRUNCATE of a partitioned table fires this for it and for each partition: one event
    -- is enough when the transaction's last change already truncated it.
    body := 'DECLARE' || declarations || 'BEGIN' || ordinal || $piece$
    IF base > 0 AND current_setting('pgfeed.truncated', true) = base::text || ' ' || tbl_name THEN
        RETURN NULL;
    END IF;
    INSERT INTO pgfeed.changes (xid, ord, table_name, op, tenant, public)
    VALUES (pg_current_xact_id(), base + 1, tbl_name, 'truncate', NULL, true);
    n := 1;$piece$ || journaled || $piece$
    ignored := set_config('pgfeed.truncated', (base + 1)::text || ' ' || tbl_name, true) IS NULL;
    RETURN NULL;
END$piece$;
    EXECUTE format(header, '_capture_truncate', body);
END
$generate$;

-- Runs once per transaction, at commit: queued by the transaction's first journal row. It
-- takes no lock that another transaction waits on: it appends the commit to
-- pgfeed.pending with a number drawn from a sequence (lock-free), which orders it among
-- the commits sealed in the same batch (pgfeed.seal). A commit that finished before this
-- one began drew a lower number. (A transaction that runs SET CONSTRAINTS ALL IMMEDIATE
-- draws it early; README, "Guarantees".)
--
-- The doorbell rings only for sleeping gateways: pgfeed.armed is set to 1 by a gateway
-- going to sleep; the first writer to find it set clears it and sends one NOTIFY (which
-- every gateway hears), and under load, with every gateway awake and reading, nobody sends
-- any. The flag is a sequence, read and set outside the transaction's snapshot, so a
-- REPEATABLE READ or SERIALIZABLE transaction reads it as it is at commit and can never
-- fail to serialize because of it. The lock on pgfeed.doorbell, taken before the flag is
-- read and held until this commit ends, is what the gateway's barrier waits for: a writer
-- that saw no sleeper commits before the gateway's last read (see src/listener.rs). The
-- count is informational (commits.n): it is read from the setting, and a session that set
-- a value that is not a number fails its own commit.
CREATE OR REPLACE FUNCTION pgfeed._seal() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
-- The barrier may hold the doorbell's lock for up to 20 ms: an application's shorter
-- lock_timeout must not fail its commit there.
SET lock_timeout = 0
AS $$
DECLARE
    ignored boolean;
BEGIN
    INSERT INTO pgfeed.pending (xid, draw, n, committed_at, durable)
    VALUES (NEW.xid, nextval('pgfeed.commit_seq'),
            coalesce(nullif(current_setting('pgfeed.ord', true), ''), '0')::integer,
            clock_timestamp(), current_setting('synchronous_commit') <> 'off');
    ignored := set_config('pgfeed.sealed', 'on', true) IS NULL;
    PERFORM FROM pgfeed.doorbell LIMIT 0;
    IF (SELECT a.last_value FROM pgfeed.armed AS a) = 1 THEN
        ignored := setval('pgfeed.armed', 0) IS NULL;
        ignored := pg_notify('pgfeed', '') IS NULL;
    END IF;
    RETURN NULL;
END
$$;

-- pgfeed.barrier: the last step of a gateway going to sleep (src/listener.rs). The gateway
-- has just set pgfeed.armed; writers that read it before saw no sleeper and will not ring,
-- and each holds its lock on pgfeed.doorbell until its commit ends. Taking that table's
-- ACCESS EXCLUSIVE lock waits for exactly those commits (and makes writers that come
-- meanwhile wait behind it), so that the gateway's next read finds them. Bounded by `timeout_ms`: returns false when the lock was not had
-- in time (writers kept coming: the gateway stays awake and reads instead). The lock is
-- released when the statement ends.
CREATE OR REPLACE FUNCTION pgfeed.barrier(timeout_ms integer) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ignored boolean;
BEGIN
    ignored := set_config('lock_timeout', timeout_ms::text || 'ms', true) IS NULL;
    LOCK TABLE pgfeed.doorbell IN ACCESS EXCLUSIVE MODE;
    RETURN true;
EXCEPTION WHEN lock_not_available THEN
    RETURN false;
END
$$;

-- pgfeed.seal: numbers the commits that are pending, called by gateways before they read.
-- One sealer at a time (the lock on pgfeed.seal_lock, which writers never take); the
-- snapshot of the DELETE, taken once the lock is held, sees every commit that finished
-- before, and moves them into pgfeed.commits numbered after the newest sealed commit (or
-- the pruning watermark, or the epoch's floor) in the order of their drawn numbers.
-- Returns how many it sealed. A gateway sends it as one statement, so nothing it holds
-- waits on the gateway.
--
-- It commits asynchronously: gateways deliver what it numbered without waiting for a disk
-- flush. A crash can lose that numbering (never the commits it numbers: those of durable
-- writers are on disk before anyone sees them), and the same commits would then be
-- numbered again, differently. So a crash is detected: pgfeed.alive is unlogged, emptied
-- by crash recovery; the first seal that finds it empty moves the floor 2^32 past the
-- newest commit that survived (pgfeed.epoch, logged), so that every number handed out
-- before the crash and lost is never handed out again, and gateways answer such a
-- position with `reset`. A commit whose writer committed asynchronously (pending.durable
-- is false) is visible before it is on disk: a seal that numbers one commits durably, and
-- its flush covers those commits, which came earlier in the WAL, so nothing delivered is
-- ever taken back.
--
-- With nothing pending (most reads of a gateway that is caught up, and the read before it
-- sleeps) it returns at once: no lock, no setting, no write, no crash check. A crash is then
-- found by the next seal that has something to number, before it numbers anything, which
-- is all the check is for.
CREATE OR REPLACE FUNCTION pgfeed.seal() RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    last    bigint;
    sealed  integer;
    fragile boolean;
    ignored boolean;
BEGIN
    IF NOT EXISTS (SELECT FROM pgfeed.pending) THEN
        RETURN 0;
    END IF;
    ignored := set_config('synchronous_commit', 'off', true) IS NULL;
    LOCK TABLE pgfeed.seal_lock IN EXCLUSIVE MODE;
    SELECT greatest((SELECT max(c.seq) FROM pgfeed.commits AS c), p.seq, e.floor) INTO last
    FROM pgfeed.pruned AS p, pgfeed.epoch AS e;
    IF NOT EXISTS (SELECT FROM pgfeed.alive) THEN
        last := last + 4294967296;
        UPDATE pgfeed.epoch SET floor = last, voided_at = now();
        INSERT INTO pgfeed.alive DEFAULT VALUES;
        RAISE LOG 'pgfeed: the database restarted after a crash (or was promoted): positions go on from %', last + 1;
    END IF;
    WITH moved AS (
        DELETE FROM pgfeed.pending RETURNING xid, draw, n, committed_at, durable
    ),
    numbered AS (
        INSERT INTO pgfeed.commits (seq, xid, n, committed_at)
        SELECT last + row_number() OVER (ORDER BY m.draw), m.xid, m.n, m.committed_at
        FROM moved AS m
    )
    SELECT count(*), coalesce(bool_or(NOT m.durable), false) INTO sealed, fragile
    FROM moved AS m;
    IF fragile THEN
        ignored := set_config('synchronous_commit', 'on', true) IS NULL;
    END IF;
    RETURN sealed;
END
$$;

-- Created once: replacing it would lock the journal against every watched write, and an
-- application transaction left open after a watched write would hold up the install.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_trigger
                   WHERE tgrelid = 'pgfeed.changes'::regclass AND tgname = 'seal') THEN
        CREATE CONSTRAINT TRIGGER seal AFTER INSERT ON pgfeed.changes
            DEFERRABLE INITIALLY DEFERRED
            FOR EACH ROW WHEN (NEW.ord = 1) EXECUTE FUNCTION pgfeed._seal();
    END IF;
END
$$;

-- The tables whose statements capture must see for a watched table: the table itself and,
-- when it is partitioned, its partitions at every level (a statement fires the statement
-- triggers of the table it names only, so each of them carries the capture triggers).
-- Read from pg_inherits rather than with pg_partition_tree(), which locks every partition:
-- the DDL event triggers run this for DDL on any table.
CREATE OR REPLACE FUNCTION pgfeed._members(root regclass) RETURNS SETOF regclass
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH RECURSIVE tree(rel) AS (
        SELECT root::oid
        UNION ALL
        SELECT i.inhrelid FROM tree
        JOIN pg_inherits AS i ON i.inhparent = tree.rel
        JOIN pg_class AS c ON c.oid = i.inhrelid AND c.relispartition
    )
    SELECT tree.rel::regclass FROM tree
$$;

-- Why `tbl` cannot be captured as a whole (NULL when it can): a partition (its parent's
-- statements would bypass its triggers), a member of a table inheritance tree (likewise),
-- or a partitioned table with a foreign partition (no transition tables there).
CREATE OR REPLACE FUNCTION pgfeed._unsupported(tbl regclass) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    parent regclass;
    other  regclass;
BEGIN
    SELECT i.inhparent INTO parent FROM pg_inherits AS i
    JOIN pg_class AS c ON c.oid = i.inhrelid
    WHERE i.inhrelid = tbl AND c.relispartition;
    IF parent IS NOT NULL THEN
        RETURN format('it is a partition of %s (watch %s instead)', parent, parent);
    END IF;
    SELECT coalesce(i.inhparent, j.inhrelid)::regclass INTO other
    FROM pg_class AS c
    LEFT JOIN pg_inherits AS i ON i.inhrelid = c.oid
    LEFT JOIN pg_inherits AS j ON j.inhparent = c.oid
    WHERE c.oid = tbl AND c.relkind = 'r' AND (i.inhrelid IS NOT NULL OR j.inhparent IS NOT NULL)
    LIMIT 1;
    IF other IS NOT NULL THEN
        RETURN format('it takes part in table inheritance with %s, whose rows its triggers would not see', other);
    END IF;
    SELECT m INTO other FROM pgfeed._members(tbl) AS m
    JOIN pg_class AS c ON c.oid = m
    WHERE c.relkind NOT IN ('r', 'p')
    LIMIT 1;
    IF other IS NOT NULL THEN
        RETURN format('its partition %s is not an ordinary table, and its changes cannot be captured', other);
    END IF;
    RETURN NULL;
END
$$;

-- Applies a watched table's settings (pgfeed.watched) to its capture triggers: derives the
-- current column names from the stored attribute numbers, (re)creates the triggers on every
-- member whose triggers are missing or carry other arguments, and drops settings of columns
-- that are gone. Raises an error (failing the DDL that caused it, when called by the
-- pgfeed_ddl event trigger) for states that would lose or misroute changes: the tenant
-- column or the primary key gone, the table become a partition or part of inheritance.
-- Returns whether anything changed.
CREATE OR REPLACE FUNCTION pgfeed._apply(root regclass) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET client_min_messages = warning
AS $$
DECLARE
    w        pgfeed.watched;
    why      text;
    evname   text;
    pk       text[];
    tenant   text;
    excl     text[];
    exclnums int2[];
    gone     name[] := '{}';
    incl     int2[];
    args     text[];
    wanted   bytea := ''::bytea;
    arg      text;
    m        regclass;
    changed  boolean := false;
BEGIN
    SELECT * INTO w FROM pgfeed.watched AS x WHERE x.tbl = root;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    why := pgfeed._unsupported(root);
    IF why IS NOT NULL THEN
        RAISE EXCEPTION 'pgfeed: % is watched and cannot be captured like this: %', root, why
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Undo the change, or unwatch the table first (pgfeed unwatch).';
    END IF;
    SELECT n.nspname || '.' || c.relname INTO evname
    FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace WHERE c.oid = root;
    SELECT array_agg(a.attname::text ORDER BY array_position(i.indkey::int2[], a.attnum)) INTO pk
    FROM pg_index AS i
    JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[])
    WHERE i.indrelid = root AND i.indisprimary;
    IF pk IS NULL THEN
        RAISE EXCEPTION 'pgfeed: % is watched and needs a primary key', root
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'pgfeed identifies rows by their primary key: keep one, or unwatch the table first.';
    END IF;
    IF NOT w.public THEN
        SELECT a.attname::text INTO tenant FROM pg_attribute AS a
        WHERE a.attrelid = root AND a.attnum = w.tenant_attnum AND NOT a.attisdropped;
        IF tenant IS NULL THEN
            RAISE EXCEPTION 'pgfeed: column % is the tenant column of watched table %', w.tenant_column, root
                USING ERRCODE = 'dependent_objects_still_exist',
                      HINT = 'Every change is routed by it: unwatch the table first (pgfeed unwatch).';
        END IF;
    END IF;
    -- Excluded and included columns that were dropped leave the lists.
    SELECT coalesce(array_agg(a.attnum ORDER BY a.attnum), '{}') INTO exclnums
    FROM pg_attribute AS a
    WHERE a.attrelid = root AND a.attnum = ANY (w.exclude_attnums) AND NOT a.attisdropped;
    -- ... but an excluded column's name is remembered (migration 8): a column added or
    -- renamed under it later is excluded too, so dropping and re-adding a column never
    -- publishes it. The stored names are those of the stored numbers, pair by pair (both
    -- in attribute order, as this function writes them); settings whose lists differ in
    -- length (written before version 4) remember every name no live excluded column has.
    IF w.include_attnums IS NULL THEN
        IF cardinality(w.exclude_attnums) = cardinality(w.exclude_columns) THEN
            SELECT coalesce(array_agg(DISTINCT d.name ORDER BY d.name), '{}') INTO gone
            FROM (SELECT unnest(w.exclude_dropped) AS name
                  UNION ALL
                  SELECT e.name FROM unnest(w.exclude_attnums, w.exclude_columns) AS e(num, name)
                  WHERE NOT e.num = ANY (exclnums)) AS d;
        ELSE
            SELECT coalesce(array_agg(DISTINCT d.name ORDER BY d.name), '{}') INTO gone
            FROM (SELECT unnest(w.exclude_dropped) AS name
                  UNION ALL
                  SELECT e.name FROM unnest(w.exclude_columns) AS e(name)
                  WHERE NOT EXISTS (SELECT FROM pg_attribute AS a
                                    WHERE a.attrelid = root AND a.attnum = ANY (exclnums)
                                      AND a.attname = e.name)) AS d;
        END IF;
        SELECT coalesce(array_agg(DISTINCT n ORDER BY n), '{}') INTO exclnums
        FROM (SELECT unnest(exclnums) AS n
              UNION ALL
              SELECT a.attnum FROM pg_attribute AS a
              WHERE a.attrelid = root AND a.attnum > 0 AND NOT a.attisdropped
                AND a.attname = ANY (gone)
                -- the key and the tenant column are published whatever their name
                AND NOT a.attname::text = ANY (pk)
                AND a.attnum IS DISTINCT FROM w.tenant_attnum) AS x;
        -- Names now held by an excluded column are followed by number from here on; a
        -- name the key or the tenant column holds stays remembered, for the day it is
        -- renamed away.
        SELECT coalesce(array_agg(g ORDER BY g), '{}') INTO gone
        FROM unnest(gone) AS g
        WHERE NOT EXISTS (SELECT FROM pg_attribute AS a
                          WHERE a.attrelid = root AND a.attnum = ANY (exclnums)
                            AND NOT a.attisdropped AND a.attname = g);
    END IF;
    IF w.include_attnums IS NOT NULL THEN
        SELECT coalesce(array_agg(a.attnum ORDER BY a.attnum), '{}') INTO incl
        FROM pg_attribute AS a
        WHERE a.attrelid = root AND a.attnum = ANY (w.include_attnums) AND NOT a.attisdropped;
        -- An include list excludes every other column, present or added later.
        SELECT coalesce(array_agg(a.attname::text ORDER BY a.attnum), '{}') INTO excl
        FROM pg_attribute AS a
        WHERE a.attrelid = root AND a.attnum > 0 AND NOT a.attisdropped
          AND NOT a.attnum = ANY (incl) AND NOT a.attname::text = ANY (pk)
          AND a.attnum IS DISTINCT FROM w.tenant_attnum;
    ELSE
        SELECT coalesce(array_agg(a.attname::text ORDER BY a.attnum), '{}') INTO excl
        FROM pg_attribute AS a
        WHERE a.attrelid = root AND a.attnum = ANY (exclnums);
    END IF;
    IF EXISTS (SELECT FROM unnest(excl) AS e WHERE e = ANY (pk) OR e = tenant) THEN
        RAISE EXCEPTION 'pgfeed: an excluded column of watched table % became a key or the tenant column', root
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Unwatch the table, or watch it again with other settings.';
    END IF;
    args := ARRAY[coalesce(tenant, ''), w.public::text, pk::text, excl::text, evname];
    FOREACH arg IN ARRAY args LOOP
        wanted := wanted || convert_to(arg, getdatabaseencoding()) || '\x00'::bytea;
    END LOOP;
    FOR m IN SELECT pgfeed._members(root) LOOP
        IF (SELECT count(*) FROM pg_trigger AS t
            WHERE t.tgrelid = m AND t.tgargs = wanted
              AND (t.tgname, t.tgfoid) IN (('pgfeed_capture_insert', 'pgfeed._capture_insert'::regproc),
                                           ('pgfeed_capture_update', 'pgfeed._capture_update'::regproc),
                                           ('pgfeed_capture_delete', 'pgfeed._capture_delete'::regproc),
                                           ('pgfeed_capture_truncate', 'pgfeed._capture_truncate'::regproc))) = 4 THEN
            CONTINUE;
        END IF;
        PERFORM pgfeed._drop_triggers(m);
        arg := format('%L, %L, %L, %L, %L', VARIADIC args);
        EXECUTE format('CREATE TRIGGER pgfeed_capture_insert AFTER INSERT ON %s '
                       'REFERENCING NEW TABLE AS pgfeed_new FOR EACH STATEMENT '
                       'EXECUTE FUNCTION pgfeed._capture_insert(%s)', m, arg);
        EXECUTE format('CREATE TRIGGER pgfeed_capture_update AFTER UPDATE ON %s '
                       'REFERENCING OLD TABLE AS pgfeed_old NEW TABLE AS pgfeed_new FOR EACH STATEMENT '
                       'EXECUTE FUNCTION pgfeed._capture_update(%s)', m, arg);
        EXECUTE format('CREATE TRIGGER pgfeed_capture_delete AFTER DELETE ON %s '
                       'REFERENCING OLD TABLE AS pgfeed_old FOR EACH STATEMENT '
                       'EXECUTE FUNCTION pgfeed._capture_delete(%s)', m, arg);
        EXECUTE format('CREATE TRIGGER pgfeed_capture_truncate AFTER TRUNCATE ON %s '
                       'FOR EACH STATEMENT EXECUTE FUNCTION pgfeed._capture_truncate(%s)', m, arg);
        changed := true;
    END LOOP;
    IF (w.tenant_column IS DISTINCT FROM tenant::name)
       OR w.pk_columns <> pk::name[]
       OR w.exclude_attnums <> exclnums
       OR w.include_attnums IS DISTINCT FROM incl
       OR w.exclude_dropped <> gone
       OR w.exclude_columns <> (SELECT coalesce(array_agg(a.attname ORDER BY a.attnum), '{}')
                                FROM pg_attribute AS a
                                WHERE a.attrelid = root AND a.attnum = ANY (exclnums)) THEN
        UPDATE pgfeed.watched AS x
        SET tenant_column = tenant,
            pk_columns = pk::name[],
            exclude_attnums = exclnums,
            include_attnums = incl,
            exclude_dropped = gone,
            exclude_columns = (SELECT coalesce(array_agg(a.attname ORDER BY a.attnum), '{}')
                               FROM pg_attribute AS a
                               WHERE a.attrelid = root AND a.attnum = ANY (exclnums))
        WHERE x.tbl = root;
        changed := true;
    END IF;
    RETURN changed;
END
$$;

-- Re-applies the watched tables among `roots` (all when NULL) with pgfeed._apply, forgets
-- tables that are gone, and removes capture triggers from tables that no longer belong to a
-- watched table (a detached partition). Returns whether anything changed.
CREATE OR REPLACE FUNCTION pgfeed._reconcile(roots regclass[] DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t       regclass;
    changed boolean := false;
BEGIN
    DELETE FROM pgfeed.watched AS w
    WHERE NOT EXISTS (SELECT FROM pg_class AS c WHERE c.oid = w.tbl);
    IF FOUND THEN
        changed := true;
    END IF;
    FOR t IN SELECT w.tbl FROM pgfeed.watched AS w
             WHERE roots IS NULL OR w.tbl = ANY (roots) ORDER BY w.tbl LOOP
        IF pgfeed._apply(t) THEN
            changed := true;
        END IF;
    END LOOP;
    FOR t IN
        SELECT DISTINCT tg.tgrelid::regclass FROM pg_trigger AS tg
        WHERE tg.tgfoid IN ('pgfeed._capture_insert'::regproc, 'pgfeed._capture_update'::regproc,
                            'pgfeed._capture_delete'::regproc, 'pgfeed._capture_truncate'::regproc)
          AND NOT EXISTS (SELECT FROM pgfeed.watched AS w, pgfeed._members(w.tbl) AS m
                          WHERE m = tg.tgrelid)
    LOOP
        PERFORM pgfeed._drop_triggers(t);
        changed := true;
    END LOOP;
    RETURN changed;
END
$$;

-- The pgfeed_ddl event trigger: after every command that can create, rename, move or
-- reshape a table (CREATE TABLE, CREATE SCHEMA with tables in it, ALTER TABLE, and the
-- ALTER VIEW / MATERIALIZED VIEW / FOREIGN TABLE / INDEX / SEQUENCE spellings PostgreSQL
-- also accepts on tables, ALTER SCHEMA), in the same transaction, re-applies the settings
-- of the watched tables the command touched (the table itself, one of its partitions, a
-- parent it was attached to, an inheritance relative, the tables of a renamed schema), so
-- that a renamed column keeps its role, a renamed table or schema renames the events, a
-- new partition is captured, an added column is covered by an include list, and a change
-- that would lose or misroute changes fails instead. Gateways are told to reload their
-- catalog when a watched table was touched. It runs as its owner (the installer): the
-- role running the DDL needs no privilege on pgfeed. (CREATE/DROP TRIGGER, which
-- pgfeed._apply itself runs, are not among its tags.)
CREATE OR REPLACE FUNCTION pgfeed._on_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    touched regclass[];
BEGIN
    IF NOT EXISTS (SELECT FROM pgfeed.watched)
       AND NOT EXISTS (SELECT FROM pg_trigger AS tg
                       WHERE tg.tgfoid = 'pgfeed._capture_insert'::regproc) THEN
        RETURN;
    END IF;
    SELECT array_agg(DISTINCT w.tbl) INTO touched
    FROM pg_event_trigger_ddl_commands() AS d, pgfeed.watched AS w
    WHERE (d.classid = 'pg_class'::regclass
           AND (d.objid IN (SELECT pgfeed._members(w.tbl))
                OR w.tbl IN (SELECT pgfeed._members(d.objid::regclass))
                OR EXISTS (SELECT FROM pg_inherits AS i
                           WHERE (i.inhrelid = d.objid AND i.inhparent = w.tbl)
                              OR (i.inhparent = d.objid AND i.inhrelid = w.tbl))))
       -- a schema renamed: the names of its watched tables
       OR (d.classid = 'pg_namespace'::regclass
           AND d.objid = (SELECT c.relnamespace FROM pg_class AS c WHERE c.oid = w.tbl));
    -- Detached partitions are found by their triggers whatever was touched.
    IF pgfeed._reconcile(coalesce(touched, '{}')) OR touched IS NOT NULL THEN
        PERFORM pg_notify('pgfeed', 'watch');
    END IF;
END
$$;

-- The pgfeed_drop event trigger, after every command that drops something: a dropped
-- watched table leaves pgfeed.watched, and when a table, column or index went (a column
-- can also go with a type, domain or function it depends on, `DROP ... CASCADE`), the
-- watched tables are re-applied, so that dropping a tenant column or a primary key fails
-- whatever command did it, and dropped excluded or included columns leave the lists.
CREATE OR REPLACE FUNCTION pgfeed._on_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    changed boolean;
    touched regclass[];
BEGIN
    DELETE FROM pgfeed.watched AS w
    USING pg_event_trigger_dropped_objects() AS d
    WHERE d.classid = 'pg_class'::regclass AND d.objid = w.tbl AND d.objsubid = 0;
    changed := FOUND;
    -- Only the watched tables that lost a column: DDL elsewhere is left alone.
    SELECT array_agg(DISTINCT w.tbl) INTO touched
    FROM pg_event_trigger_dropped_objects() AS d, pgfeed.watched AS w
    WHERE d.classid = 'pg_class'::regclass AND d.objsubid > 0
      AND d.objid IN (SELECT pgfeed._members(w.tbl));
    IF touched IS NOT NULL AND pgfeed._reconcile(touched) THEN
        changed := true;
    END IF;
    IF changed THEN
        PERFORM pg_notify('pgfeed', 'watch');
    END IF;
END
$$;

-- pgfeed.watch: attach capture triggers to a table. Re-running it replaces the settings.
CREATE OR REPLACE FUNCTION pgfeed.watch(
    tbl regclass,
    tenant_column name DEFAULT NULL,
    exclude_columns name[] DEFAULT '{}',
    public boolean DEFAULT false,
    include_columns name[] DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    rel   pg_class;
    nsp   name;
    why   text;
    pk    text[];
    cols  text[];
    excl  text[] := coalesce(exclude_columns::text[], '{}');
    incl  text[] := include_columns::text[];
    c     text;
BEGIN
    IF (SELECT count(*) FROM pg_event_trigger AS e
        WHERE e.evtname IN ('pgfeed_ddl', 'pgfeed_drop') AND e.evtenabled <> 'D') <> 2 THEN
        RAISE EXCEPTION 'pgfeed.watch: the event triggers pgfeed_ddl and pgfeed_drop are missing or disabled'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'They keep watched tables right through renames, new partitions and drops; '
                      || 'creating them needs a superuser: run pgfeed install as one.';
    END IF;
    SELECT * INTO rel FROM pg_class AS x WHERE x.oid = tbl;
    SELECT n.nspname INTO nsp FROM pg_namespace AS n WHERE n.oid = rel.relnamespace;
    IF nsp IN ('pgfeed', 'pg_catalog', 'information_schema') OR nsp LIKE 'pg\_toast%'
       OR nsp LIKE 'pg\_temp%' OR rel.relpersistence = 't' THEN
        RAISE EXCEPTION 'pgfeed.watch: cannot watch %: schema % belongs to %', tbl, nsp,
            CASE WHEN nsp = 'pgfeed' THEN 'pgfeed itself'
                 WHEN rel.relpersistence = 't' THEN 'one session (a temporary table)'
                 ELSE 'the system' END
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF rel.relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'pgfeed.watch: % is not an ordinary or partitioned table', tbl
            USING ERRCODE = 'wrong_object_type';
    END IF;
    why := pgfeed._unsupported(tbl);
    IF why IS NOT NULL THEN
        RAISE EXCEPTION 'pgfeed.watch: cannot watch %: %', tbl, why
            USING ERRCODE = 'feature_not_supported';
    END IF;
    SELECT array_agg(a.attname::text ORDER BY a.attnum) INTO cols
    FROM pg_attribute AS a
    WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped;
    SELECT array_agg(a.attname::text ORDER BY array_position(i.indkey::int2[], a.attnum)) INTO pk
    FROM pg_index AS i
    JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[])
    WHERE i.indrelid = tbl AND i.indisprimary;
    IF pk IS NULL THEN
        RAISE EXCEPTION 'pgfeed.watch: table % has no primary key', tbl
            USING ERRCODE = 'invalid_table_definition',
                  HINT = 'pgfeed identifies rows by their primary key; add one first.';
    END IF;
    IF tenant_column IS NULL AND NOT coalesce(public, false) THEN
        RAISE EXCEPTION 'pgfeed.watch: table % needs a tenant_column, or public => true', tbl
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass tenant_column => ''<column>'' so each tenant sees only its rows, '
                      || 'or public => true if every subscriber may see every row.';
    END IF;
    IF tenant_column IS NOT NULL AND public THEN
        RAISE EXCEPTION 'pgfeed.watch: table % cannot have both a tenant_column and public => true', tbl
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF tenant_column IS NOT NULL AND NOT tenant_column::text = ANY (cols) THEN
        RAISE EXCEPTION 'pgfeed.watch: table % has no column "%" (tenant_column)', tbl, tenant_column
            USING ERRCODE = 'undefined_column';
    END IF;
    IF incl IS NOT NULL AND cardinality(excl) > 0 THEN
        RAISE EXCEPTION 'pgfeed.watch: give include_columns or exclude_columns for %, not both', tbl
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'include_columns publishes only the listed columns (with the key and the tenant column).';
    END IF;
    FOREACH c IN ARRAY excl LOOP
        IF NOT c = ANY (cols) THEN
            RAISE EXCEPTION 'pgfeed.watch: table % has no column "%" (exclude_columns)', tbl, c
                USING ERRCODE = 'undefined_column';
        END IF;
        IF c = ANY (pk) OR c = tenant_column::text THEN
            RAISE EXCEPTION 'pgfeed.watch: column "%" of % is a key or the tenant column and cannot be excluded', c, tbl
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;
    FOREACH c IN ARRAY coalesce(incl, '{}') LOOP
        IF NOT c = ANY (cols) THEN
            RAISE EXCEPTION 'pgfeed.watch: table % has no column "%" (include_columns)', tbl, c
                USING ERRCODE = 'undefined_column';
        END IF;
    END LOOP;

    PERFORM pgfeed._check_casts(tbl);
    INSERT INTO pgfeed.watched AS w
        (tbl, tenant_column, exclude_columns, public, pk_columns,
         tenant_attnum, exclude_attnums, include_attnums)
    VALUES (tbl, tenant_column, excl::name[], coalesce(public, false), pk::name[],
            (SELECT a.attnum FROM pg_attribute AS a
             WHERE a.attrelid = tbl AND a.attname = tenant_column AND NOT a.attisdropped),
            ARRAY(SELECT a.attnum FROM pg_attribute AS a
                  WHERE a.attrelid = tbl AND a.attname::text = ANY (excl) AND NOT a.attisdropped
                  ORDER BY a.attnum),
            CASE WHEN incl IS NOT NULL THEN
                ARRAY(SELECT a.attnum FROM pg_attribute AS a
                      WHERE a.attrelid = tbl AND a.attname::text = ANY (incl) AND NOT a.attisdropped
                      ORDER BY a.attnum)
            END)
    ON CONFLICT ON CONSTRAINT watched_pkey DO UPDATE
        SET tenant_column = excluded.tenant_column,
            exclude_columns = excluded.exclude_columns,
            public = excluded.public,
            pk_columns = excluded.pk_columns,
            tenant_attnum = excluded.tenant_attnum,
            exclude_attnums = excluded.exclude_attnums,
            include_attnums = excluded.include_attnums,
            exclude_dropped = '{}',
            watched_at = now();
    PERFORM pgfeed._apply(tbl);
    -- Gateways reload their catalog of tables and columns on this payload.
    PERFORM pg_notify('pgfeed', 'watch');
END
$$;

CREATE OR REPLACE FUNCTION pgfeed._drop_triggers(tbl regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET client_min_messages = warning
AS $$
BEGIN
    EXECUTE format('DROP TRIGGER IF EXISTS pgfeed_capture_insert ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS pgfeed_capture_update ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS pgfeed_capture_delete ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS pgfeed_capture_truncate ON %s', tbl);
END
$$;

-- pgfeed.unwatch: remove the capture triggers (from every partition too). Changes already
-- journaled stay until they age out. Like watch, it may be run again: a table that is not
-- watched (or no longer) is left as it is, with a notice. A table that does not exist
-- fails before the call, in the cast to regclass.
CREATE OR REPLACE FUNCTION pgfeed.unwatch(tbl regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgfeed.watched AS w WHERE w.tbl = unwatch.tbl) THEN
        RAISE NOTICE 'pgfeed.unwatch: table % is not watched; nothing to do', tbl;
        RETURN;
    END IF;
    PERFORM pgfeed._drop_triggers(m) FROM pgfeed._members(tbl) AS m;
    DELETE FROM pgfeed.watched AS w WHERE w.tbl = unwatch.tbl;
    PERFORM pg_notify('pgfeed', 'watch');
END
$$;

-- pgfeed.prune: removes up to max_commits of the oldest commits older than retention, with
-- their changes, and advances the pruned watermark in the same transaction. Returns the
-- number of commits removed, or -1 when another session is pruning (one replica at a
-- time) or holds a lock on pgfeed.pruned. Called repeatedly by the gateway so that each call is a short transaction.
CREATE OR REPLACE FUNCTION pgfeed.prune(retention interval, max_commits integer)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    last_seq bigint;
    last_ord integer;
    removed  integer;
BEGIN
    -- One pruner at a time, through a lock only roles with privileges on pgfeed.pruned can
    -- take (an advisory lock's keys are anyone's). It does not conflict with readers.
    BEGIN
        LOCK TABLE pgfeed.pruned IN SHARE ROW EXCLUSIVE MODE NOWAIT;
    EXCEPTION WHEN lock_not_available THEN
        RETURN -1;
    END;
    WITH doomed AS (
        SELECT c.seq, c.xid
        FROM pgfeed.commits AS c
        WHERE c.committed_at < now() - retention
        ORDER BY c.seq
        LIMIT max_commits
    ),
    gone_changes AS (
        DELETE FROM pgfeed.changes AS ch USING doomed AS d
        WHERE ch.xid = d.xid
        RETURNING d.seq, ch.ord
    ),
    gone_commits AS (
        DELETE FROM pgfeed.commits AS c USING doomed AS d
        WHERE c.seq = d.seq
        RETURNING c.seq
    )
    SELECT (SELECT count(*) FROM gone_commits),
           (SELECT max(seq) FROM gone_commits),
           (SELECT max(g.ord) FROM gone_changes AS g
             WHERE g.seq = (SELECT max(seq) FROM gone_commits))
    INTO removed, last_seq, last_ord;
    IF removed > 0 THEN
        UPDATE pgfeed.pruned AS p
        SET seq = last_seq, ord = coalesce(last_ord, 2147483647)
        WHERE (p.seq, p.ord) < (last_seq, coalesce(last_ord, 2147483647));
    END IF;
    RETURN removed;
END
$$;

-- Nothing in schema pgfeed is for application roles: capture runs as the owner.
REVOKE ALL ON SCHEMA pgfeed FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgfeed FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA pgfeed FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgfeed FROM PUBLIC;

-- pgfeed_capture and pgfeed_gateway are cluster-wide and may exist before install, created
-- by anyone with CREATEROLE: install uses them only if they are what it would have created.
-- A role that can log in, or has an attribute beyond NOLOGIN, could use what install grants
-- it (write journal rows, i.e. forge events; read every tenant's changes). A member of
-- pgfeed_capture other than the installing role (who needs it when not a superuser) could
-- write journal rows in its own transactions, in every database of the cluster where pgfeed
-- is installed. A role holding ADMIN on either could grant it to anyone (and on PostgreSQL
-- 16, where a CREATEROLE role that creates a role gets ADMIN on it, alter it). Either
-- role being a member of another would run capture, and the code rendering rows, or a
-- gateway, with that role's privileges. The members of pgfeed_gateway are the gateways'
-- login roles: that is what it is for. Superusers are never counted: they can do all this
-- anyway. On PostgreSQL 15 and older, a role with CREATEROLE can still take these roles
-- over after install (README, "Security model").
DO $$
DECLARE
    r    record;
    bad  text;
BEGIN
    FOR r IN SELECT * FROM pg_roles WHERE rolname IN ('pgfeed_capture', 'pgfeed_gateway')
             ORDER BY rolname LOOP
        bad := concat_ws(', ', CASE WHEN r.rolsuper THEN 'SUPERUSER' END,
                               CASE WHEN r.rolcanlogin THEN 'LOGIN' END,
                               CASE WHEN r.rolbypassrls THEN 'BYPASSRLS' END,
                               CASE WHEN r.rolcreaterole THEN 'CREATEROLE' END,
                               CASE WHEN r.rolcreatedb THEN 'CREATEDB' END,
                               CASE WHEN r.rolreplication THEN 'REPLICATION' END);
        IF bad <> '' THEN
            RAISE EXCEPTION 'pgfeed: role % exists with %: install will not grant it pgfeed''s privileges', r.rolname, bad
                USING ERRCODE = 'insufficient_privilege',
                      HINT = format('Check who created it; ALTER ROLE %I NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEROLE NOCREATEDB NOREPLICATION, then run pgfeed install again.', r.rolname);
        END IF;
    END LOOP;
    SELECT string_agg(quote_ident(m.rolname), ', ' ORDER BY m.rolname) INTO bad
    FROM pg_auth_members AS am
    JOIN pg_roles AS c ON c.oid = am.roleid AND c.rolname = 'pgfeed_capture'
    JOIN pg_roles AS m ON m.oid = am.member
    WHERE m.rolname <> current_user AND NOT m.rolsuper;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'pgfeed: role pgfeed_capture has members other than the installing role (%): each could write journal rows, i.e. forge events', bad
            USING ERRCODE = 'insufficient_privilege',
                  HINT = format('REVOKE pgfeed_capture FROM %s; then run pgfeed install again. (A role that was granted it to install pgfeed in another database counts too: it could write journal rows here.)', bad);
    END IF;
    SELECT string_agg(quote_ident(m.rolname), ', ' ORDER BY m.rolname) INTO bad
    FROM pg_auth_members AS am
    JOIN pg_roles AS c ON c.oid = am.roleid AND c.rolname = 'pgfeed_gateway'
    JOIN pg_roles AS m ON m.oid = am.member
    WHERE am.admin_option AND m.rolname <> current_user AND NOT m.rolsuper;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'pgfeed: role pgfeed_gateway can be granted by % (ADMIN OPTION): each could give any role every tenant''s changes', bad
            USING ERRCODE = 'insufficient_privilege',
                  HINT = format('REVOKE ADMIN OPTION FOR pgfeed_gateway FROM %s; then run pgfeed install again.', bad);
    END IF;
    -- Objects they own: a SECURITY DEFINER function owned by pgfeed_capture, made while its
    -- maker was a member, would run with what install grants (forging journal rows) for
    -- whoever may call it. pgfeed_capture owns pgfeed's capture functions, nothing else.
    SELECT string_agg(format('%s owns %s', w.rolname,
                             pg_describe_object(d.classid, d.objid, d.objsubid)), '; '
                      ORDER BY w.rolname, d.classid, d.objid) INTO bad
    FROM pg_shdepend AS d
    JOIN pg_roles AS w ON w.oid = d.refobjid
    WHERE d.refclassid = 'pg_authid'::regclass AND d.deptype = 'o'
      AND w.rolname IN ('pgfeed_capture', 'pgfeed_gateway')
      AND (d.dbid = 0 OR d.dbid = (SELECT db.oid FROM pg_database AS db
                                   WHERE db.datname = current_database()))
      AND NOT (w.rolname = 'pgfeed_capture' AND d.classid = 'pg_proc'::regclass
               AND EXISTS (SELECT FROM pg_proc AS p
                           JOIN pg_namespace AS n ON n.oid = p.pronamespace
                           WHERE p.oid = d.objid AND n.nspname = 'pgfeed' AND p.pronargs = 0
                             AND p.proname IN ('_capture_insert', '_capture_update',
                                               '_capture_delete', '_capture_truncate', '_seal')));
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'pgfeed: %: code they own would run with the privileges install grants them', bad
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Check who made it; drop it, or REASSIGN OWNED BY the role TO a trusted role (in every database), then run pgfeed install again.';
    END IF;
    SELECT string_agg(format('%I is a member of %I', c.rolname, g.rolname), ', '
                      ORDER BY c.rolname, g.rolname) INTO bad
    FROM pg_auth_members AS am
    JOIN pg_roles AS c ON c.oid = am.member AND c.rolname IN ('pgfeed_capture', 'pgfeed_gateway')
    JOIN pg_roles AS g ON g.oid = am.roleid;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'pgfeed: role %: capture (and the code that renders rows) or a gateway would run with those privileges', bad
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'REVOKE those roles from pgfeed_capture and pgfeed_gateway; then run pgfeed install again.';
    END IF;
END
$$;

-- The capture and seal functions run as pgfeed_capture, a role that can do nothing but
-- append to the journal: whatever runs inside them runs with that little, not with the
-- installer's privileges. Creating the role needs CREATEROLE (or a superuser); without
-- it, the functions stay owned by the installer and install says so.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgfeed_capture') THEN
        BEGIN
            CREATE ROLE pgfeed_capture NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN NULL;
            WHEN insufficient_privilege THEN NULL;
        END;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgfeed_capture') THEN
        RAISE WARNING 'pgfeed: cannot create role pgfeed_capture (needs CREATEROLE); the capture functions run as %, the installing role', current_user
            USING HINT = 'Install as a role with CREATEROLE, or create pgfeed_capture (NOLOGIN) first, so that capture runs with the least privilege.';
        RETURN;
    END IF;
    -- Granted afresh by every install: what earlier versions granted goes first.
    REVOKE ALL ON ALL TABLES IN SCHEMA pgfeed FROM pgfeed_capture;
    REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgfeed FROM pgfeed_capture;
    GRANT USAGE ON SCHEMA pgfeed TO pgfeed_capture;
    -- Row-level security (migrations 4 and 5) limits these inserts to the capturing
    -- transaction's own rows. Reading the journal is limited to the ordinals, which
    -- capture counts from.
    GRANT INSERT ON pgfeed.changes, pgfeed.pending TO pgfeed_capture;
    -- _redraw: its own pending commit's number (row-level security: its own transaction).
    GRANT SELECT (xid), UPDATE (draw) ON pgfeed.pending TO pgfeed_capture;
    GRANT SELECT (xid, ord) ON pgfeed.changes TO pgfeed_capture;
    -- The doorbell: lock pgfeed.doorbell, read and clear pgfeed.armed (setval needs UPDATE).
    GRANT SELECT ON pgfeed.doorbell TO pgfeed_capture;
    GRANT SELECT, UPDATE ON SEQUENCE pgfeed.armed TO pgfeed_capture;
    GRANT SELECT ON pgfeed.json_casts_since_initdb TO pgfeed_capture;
    GRANT USAGE ON SEQUENCE pgfeed.commit_seq TO pgfeed_capture;
    GRANT EXECUTE ON FUNCTION pgfeed._check_casts(oid), pgfeed._rendering_failed(oid),
        pgfeed._redraw()
        TO pgfeed_capture;
    BEGIN
        ALTER FUNCTION pgfeed._capture_insert() OWNER TO pgfeed_capture;
        ALTER FUNCTION pgfeed._capture_update() OWNER TO pgfeed_capture;
        ALTER FUNCTION pgfeed._capture_delete() OWNER TO pgfeed_capture;
        ALTER FUNCTION pgfeed._capture_truncate() OWNER TO pgfeed_capture;
        ALTER FUNCTION pgfeed._seal() OWNER TO pgfeed_capture;
    EXCEPTION WHEN insufficient_privilege THEN
        RAISE WARNING 'pgfeed: cannot hand the capture functions to pgfeed_capture (not a member); they run as %', current_user
            USING HINT = 'GRANT pgfeed_capture TO the installing role, then run pgfeed install again.';
    END;
END
$$;

-- pgfeed_gateway: what a gateway needs and nothing more, so that it can run as a login role
-- that is only a member of it (README, "Security model"): read the watch registry and the
-- journal, prune it. It cannot write journal rows, change what is watched, or run DDL.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgfeed_gateway') THEN
        BEGIN
            CREATE ROLE pgfeed_gateway NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN NULL;
            WHEN insufficient_privilege THEN NULL;
        END;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgfeed_gateway') THEN
        RAISE WARNING 'pgfeed: cannot create role pgfeed_gateway (needs CREATEROLE); run gateways as the installing role or grant them the privileges by hand'
            USING HINT = 'Install as a role with CREATEROLE to get a least-privilege gateway role.';
        RETURN;
    END IF;
    REVOKE ALL ON ALL TABLES IN SCHEMA pgfeed FROM pgfeed_gateway;
    REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgfeed FROM pgfeed_gateway;
    GRANT USAGE ON SCHEMA pgfeed TO pgfeed_gateway;
    GRANT SELECT ON pgfeed.meta, pgfeed.watched, pgfeed.changes, pgfeed.commits, pgfeed.pruned,
                    pgfeed.pending
        TO pgfeed_gateway;
    GRANT DELETE ON pgfeed.changes, pgfeed.commits, pgfeed.pending TO pgfeed_gateway;
    -- Sealing: pending commits become numbered commits, one sealer at a time.
    GRANT INSERT ON pgfeed.commits TO pgfeed_gateway;
    GRANT UPDATE ON pgfeed.seal_lock TO pgfeed_gateway;
    -- Crash detection by the seal: an unlogged marker, and the floor numbers go on from.
    GRANT SELECT, INSERT ON pgfeed.alive TO pgfeed_gateway;
    GRANT SELECT, UPDATE ON pgfeed.epoch TO pgfeed_gateway;
    -- Sleeping: set pgfeed.armed, and the barrier (LOCK pgfeed.doorbell ... ACCESS EXCLUSIVE).
    GRANT UPDATE ON SEQUENCE pgfeed.armed TO pgfeed_gateway;
    GRANT UPDATE ON pgfeed.doorbell TO pgfeed_gateway;
    -- UPDATE also lets prune() lock pgfeed.pruned.
    GRANT UPDATE ON pgfeed.pruned TO pgfeed_gateway;
    GRANT EXECUTE ON FUNCTION pgfeed.prune(interval, integer), pgfeed.seal(),
        pgfeed.barrier(integer)
        TO pgfeed_gateway;
END
$$;

-- Event triggers that keep watched tables right through DDL (pgfeed._on_ddl, _on_drop).
-- Creating them needs a superuser; without them pgfeed.watch refuses to watch anything.
-- Re-created by every install, so that their tags are this version's.
DO $$
BEGIN
    DROP EVENT TRIGGER IF EXISTS pgfeed_ddl;
    DROP EVENT TRIGGER IF EXISTS pgfeed_drop;
    CREATE EVENT TRIGGER pgfeed_ddl ON ddl_command_end
        WHEN TAG IN ('CREATE TABLE', 'CREATE SCHEMA', 'ALTER TABLE', 'ALTER VIEW',
                     'ALTER MATERIALIZED VIEW', 'ALTER FOREIGN TABLE', 'ALTER INDEX',
                     'ALTER SEQUENCE', 'ALTER SCHEMA')
        EXECUTE FUNCTION pgfeed._on_ddl();
    CREATE EVENT TRIGGER pgfeed_drop ON sql_drop
        EXECUTE FUNCTION pgfeed._on_drop();
EXCEPTION WHEN insufficient_privilege THEN
    RAISE WARNING 'pgfeed: cannot create the event triggers pgfeed_ddl and pgfeed_drop (needs a superuser); tables cannot be watched until they exist'
        USING HINT = 'Run pgfeed install as a superuser.';
END
$$;

-- Triggers of earlier versions keep working (capture reads a missing argument as before);
-- the next DDL on a table, or watching it again, gives it this version's arguments. Install
-- does not do it here: recreating triggers would lock the application's tables, in an
-- order that could deadlock with its writers.

-- Watched tables in a state this version refuses, or whose settings name columns that are
-- gone (renamed before version 4, which follows renames): said at every install, since DDL
-- on such a table fails until it is watched again or unwatched.
DO $$
DECLARE
    r   record;
    why text;
BEGIN
    FOR r IN SELECT w.* FROM pgfeed.watched AS w JOIN pg_class AS c ON c.oid = w.tbl LOOP
        why := pgfeed._unsupported(r.tbl);
        IF why IS NULL AND NOT r.public AND NOT EXISTS (
            SELECT FROM pg_attribute AS a
            WHERE a.attrelid = r.tbl AND a.attnum = r.tenant_attnum AND NOT a.attisdropped
        ) THEN
            why := format('its tenant column %s is gone (renamed before this version?)', r.tenant_column);
        END IF;
        IF why IS NULL AND cardinality(r.exclude_attnums) < cardinality(r.exclude_columns) THEN
            why := format('some of its excluded columns %s are gone (renamed before this version?) and may be published',
                          r.exclude_columns);
        END IF;
        IF why IS NOT NULL THEN
            RAISE WARNING 'pgfeed: watched table %: %', r.tbl, why
                USING HINT = 'Watch it again with its current columns (pgfeed watch), or unwatch it.';
        END IF;
    END LOOP;
END
$$;

-- The one-row watermark table is read by every journal query; without statistics the
-- planner guesses ~2 000 rows and picks costlier plans.
ANALYZE pgfeed.pruned;
