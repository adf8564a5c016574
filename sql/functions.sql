-- pgfeed functions and triggers. Re-applied by every `pgfeed install` (CREATE OR REPLACE),
-- so it must stay idempotent.
--
-- Capture functions are SECURITY DEFINER with a fixed search_path: application roles need
-- no privilege on schema pgfeed and cannot write journal rows themselves.

-- The ordinal counter: the transaction-local setting pgfeed.ord holds how many changes the
-- transaction has captured so far (NULL before the first, or '' in a session where an
-- earlier transaction set it: custom settings keep an empty value afterwards). Each capture
-- numbers its rows from there and advances it with set_config(..., true), which a rolled
-- back savepoint undoes together with the journal rows. The expression is written out in
-- every function below rather than called: a helper function cost a call setup, and a
-- fresh plan, in every transaction.
--
-- The seal: a transaction's first journal row (ord = 1) queues the deferred constraint
-- trigger `seal` on pgfeed.changes, which numbers the commit at commit time (_seal below).
--
-- Capture runs once per watched statement, so its cost is counted in instructions
-- (BENCHMARKS.md, "Where the time goes"). Two habits below come from that:
--   * `ignored := f(...) IS NULL` instead of `PERFORM f(...)` for functions called for
--     their effect: PL/pgSQL evaluates an assignment as a simple expression, while PERFORM
--     runs a whole query through the executor;
--   * a statement that changed one row, the common case, is journaled by an INSERT ...
--     VALUES of PL/pgSQL variables; several rows by one INSERT ... SELECT over unnest().

-- Casts to json or jsonb with a function, created after initdb (oid 16384 and up). When
-- there are none, as in most databases, capture skips _check_casts: this is one probe of
-- pg_cast's oid index. INOUT and binary casts run no user code.
CREATE OR REPLACE VIEW pgfeed.json_casts_since_initdb AS
    SELECT c.oid FROM pg_catalog.pg_cast AS c
    WHERE c.oid >= 16384 AND c.casttarget IN (114, 3802) AND c.castfunc <> 0;

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

-- Trigger arguments, fixed by pgfeed.watch():
--   TG_ARGV[0] tenant column ('' for a public table)
--   TG_ARGV[1] public ('true' / 'false')
--   TG_ARGV[2] primary key columns (text[] literal)
--   TG_ARGV[3] excluded columns (text[] literal)

CREATE OR REPLACE FUNCTION pgfeed._capture_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tenant_col text    := TG_ARGV[0];
    is_public  boolean := TG_ARGV[1]::boolean;
    pk_cols    text[]  := TG_ARGV[2]::text[];
    excl       text[]  := TG_ARGV[3]::text[];
    base       integer := coalesce(nullif(current_setting('pgfeed.ord', true), ''), '0')::integer;
    rendered   boolean := false;
    ignored    boolean;
    rows       jsonb[];
    j          jsonb;
    pk         jsonb;
    not_pk     text[];
    n          integer;
BEGIN
    IF EXISTS (SELECT FROM pgfeed.json_casts_since_initdb) THEN
        PERFORM pgfeed._check_casts(TG_RELID);
    END IF;
    BEGIN
        ignored := set_config('transaction_read_only', 'on', true) IS NULL;
        rows := ARRAY(SELECT to_jsonb(r) FROM pgfeed_new AS r);
        rendered := true;
        RAISE SQLSTATE 'PGFR0';
    EXCEPTION WHEN SQLSTATE 'PGFR0' THEN
        NULL;
    END;
    IF NOT rendered THEN
        PERFORM pgfeed._rendering_failed(TG_RELID);
    END IF;
    n := cardinality(rows);
    IF n = 1 THEN
        j := rows[1];
        IF cardinality(pk_cols) = 1 THEN
            pk := jsonb_build_object(pk_cols[1], j -> pk_cols[1]);
        ELSE
            pk := (SELECT jsonb_object_agg(c, j -> c) FROM unnest(pk_cols) AS c);
        END IF;
        INSERT INTO pgfeed.changes (xid, ord, table_name, op, tenant, public, pk, new)
        VALUES (pg_current_xact_id(), base + 1, TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'insert',
                CASE WHEN is_public THEN NULL ELSE j ->> tenant_col END, is_public, pk, j - excl);
    ELSIF n > 1 THEN
        -- Each row's key: the row less its other columns when those are few (one
        -- operator per row; it compares every column with every name, so not for wide
        -- tables), else built from the one key column; the aggregate is left for
        -- composite keys of wide tables and for key columns gone from the row (renamed
        -- since watch()).
        IF rows[1] ?& pk_cols THEN
            not_pk := ARRAY(SELECT k FROM jsonb_object_keys(rows[1]) AS k WHERE k <> ALL (pk_cols));
            IF cardinality(not_pk) > 8 THEN
                not_pk := NULL;
            END IF;
        END IF;
        INSERT INTO pgfeed.changes (xid, ord, table_name, op, tenant, public, pk, new)
        SELECT pg_current_xact_id(), base + s.i::integer,
               TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'insert',
               CASE WHEN is_public THEN NULL ELSE s.j ->> tenant_col END, is_public,
               CASE WHEN not_pk IS NOT NULL THEN s.j - not_pk
                    WHEN cardinality(pk_cols) = 1
                    THEN jsonb_build_object(pk_cols[1], s.j -> pk_cols[1])
                    ELSE (SELECT jsonb_object_agg(c, s.j -> c) FROM unnest(pk_cols) AS c)
               END, s.j - excl
        FROM unnest(rows) WITH ORDINALITY AS s(j, i);
    END IF;
    IF n > 0 THEN
        ignored := set_config('pgfeed.ord', (base + n)::text, true) IS NULL;
    END IF;
    RETURN NULL;
END
$$;

-- Old and new rows are paired by their position in the transition tables: PostgreSQL
-- appends both images of each updated row together, so the n-th old row is the n-th new
-- row's predecessor (pairing by key would break when the key itself changes).
-- An update that moves a row to another tenant is captured as a delete for the old tenant
-- and an insert for the new one, so neither tenant sees the other's row.
CREATE OR REPLACE FUNCTION pgfeed._capture_update() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tenant_col text    := TG_ARGV[0];
    is_public  boolean := TG_ARGV[1]::boolean;
    pk_cols    text[]  := TG_ARGV[2]::text[];
    excl       text[]  := TG_ARGV[3]::text[];
    base       integer := coalesce(nullif(current_setting('pgfeed.ord', true), ''), '0')::integer;
    tbl        text    := TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME;
    rendered   boolean := false;
    ignored    boolean;
    olds       jsonb[];
    news       jsonb[];
    not_pk     text[];
    n          integer;
BEGIN
    IF EXISTS (SELECT FROM pgfeed.json_casts_since_initdb) THEN
        PERFORM pgfeed._check_casts(TG_RELID);
    END IF;
    BEGIN
        ignored := set_config('transaction_read_only', 'on', true) IS NULL;
        olds := ARRAY(SELECT to_jsonb(r) - excl FROM pgfeed_old AS r);
        news := ARRAY(SELECT to_jsonb(r) - excl FROM pgfeed_new AS r);
        rendered := true;
        RAISE SQLSTATE 'PGFR0';
    EXCEPTION WHEN SQLSTATE 'PGFR0' THEN
        NULL;
    END;
    IF NOT rendered THEN
        PERFORM pgfeed._rendering_failed(TG_RELID);
    END IF;
    -- Keys of multi-row statements as in _capture_insert.
    IF cardinality(news) > 1 AND news[1] ?& pk_cols THEN
        not_pk := ARRAY(SELECT k FROM jsonb_object_keys(news[1]) AS k WHERE k <> ALL (pk_cols));
        IF cardinality(not_pk) > 8 THEN
            not_pk := NULL;
        END IF;
    END IF;
    WITH pairs AS (
        SELECT o.i, o.j AS oj, nw.j AS nj,
               CASE WHEN is_public THEN NULL ELSE o.j ->> tenant_col END AS old_tenant,
               CASE WHEN is_public THEN NULL ELSE nw.j ->> tenant_col END AS new_tenant
        FROM unnest(olds) WITH ORDINALITY AS o(j, i)
        JOIN unnest(news) WITH ORDINALITY AS nw(j, i) USING (i)
    ),
    events AS (
        -- same tenant: an update, unless no (captured) column changed
        SELECT p.i, 0 AS k, 'update' AS op, p.new_tenant AS tenant,
               CASE WHEN not_pk IS NOT NULL THEN p.nj - not_pk
                    WHEN cardinality(pk_cols) = 1
                    THEN jsonb_build_object(pk_cols[1], p.nj -> pk_cols[1])
                    ELSE (SELECT jsonb_object_agg(c, p.nj -> c) FROM unnest(pk_cols) AS c)
               END AS pk,
               p.nj AS new, p.oj AS old,
               ARRAY(SELECT e.key FROM jsonb_each(p.nj) AS e
                     WHERE e.value IS DISTINCT FROM p.oj -> e.key ORDER BY e.key) AS changed
        FROM pairs AS p
        WHERE p.old_tenant IS NOT DISTINCT FROM p.new_tenant
        UNION ALL
        -- tenant moved: the old tenant sees the row leave ...
        SELECT p.i, 0, 'delete', p.old_tenant,
               CASE WHEN not_pk IS NOT NULL THEN p.oj - not_pk
                    WHEN cardinality(pk_cols) = 1
                    THEN jsonb_build_object(pk_cols[1], p.oj -> pk_cols[1])
                    ELSE (SELECT jsonb_object_agg(c, p.oj -> c) FROM unnest(pk_cols) AS c)
               END,
               NULL, p.oj, NULL
        FROM pairs AS p
        WHERE p.old_tenant IS DISTINCT FROM p.new_tenant
        UNION ALL
        -- ... and the new tenant sees it arrive
        SELECT p.i, 1, 'insert', p.new_tenant,
               CASE WHEN not_pk IS NOT NULL THEN p.nj - not_pk
                    WHEN cardinality(pk_cols) = 1
                    THEN jsonb_build_object(pk_cols[1], p.nj -> pk_cols[1])
                    ELSE (SELECT jsonb_object_agg(c, p.nj -> c) FROM unnest(pk_cols) AS c)
               END,
               p.nj, NULL, NULL
        FROM pairs AS p
        WHERE p.old_tenant IS DISTINCT FROM p.new_tenant
    )
    INSERT INTO pgfeed.changes (xid, ord, table_name, op, tenant, public, pk, new, old, changed)
    SELECT pg_current_xact_id(), base + (row_number() OVER (ORDER BY ev.i, ev.k))::integer,
           tbl, ev.op, ev.tenant, is_public, ev.pk, ev.new, ev.old, ev.changed
    FROM events AS ev
    WHERE ev.op <> 'update' OR cardinality(ev.changed) > 0;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        ignored := set_config('pgfeed.ord', (base + n)::text, true) IS NULL;
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION pgfeed._capture_delete() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tenant_col text    := TG_ARGV[0];
    is_public  boolean := TG_ARGV[1]::boolean;
    pk_cols    text[]  := TG_ARGV[2]::text[];
    excl       text[]  := TG_ARGV[3]::text[];
    base       integer := coalesce(nullif(current_setting('pgfeed.ord', true), ''), '0')::integer;
    rendered   boolean := false;
    ignored    boolean;
    rows       jsonb[];
    j          jsonb;
    pk         jsonb;
    not_pk     text[];
    n          integer;
BEGIN
    IF EXISTS (SELECT FROM pgfeed.json_casts_since_initdb) THEN
        PERFORM pgfeed._check_casts(TG_RELID);
    END IF;
    BEGIN
        ignored := set_config('transaction_read_only', 'on', true) IS NULL;
        rows := ARRAY(SELECT to_jsonb(r) FROM pgfeed_old AS r);
        rendered := true;
        RAISE SQLSTATE 'PGFR0';
    EXCEPTION WHEN SQLSTATE 'PGFR0' THEN
        NULL;
    END;
    IF NOT rendered THEN
        PERFORM pgfeed._rendering_failed(TG_RELID);
    END IF;
    n := cardinality(rows);
    IF n = 1 THEN
        j := rows[1];
        IF cardinality(pk_cols) = 1 THEN
            pk := jsonb_build_object(pk_cols[1], j -> pk_cols[1]);
        ELSE
            pk := (SELECT jsonb_object_agg(c, j -> c) FROM unnest(pk_cols) AS c);
        END IF;
        INSERT INTO pgfeed.changes (xid, ord, table_name, op, tenant, public, pk, old)
        VALUES (pg_current_xact_id(), base + 1, TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'delete',
                CASE WHEN is_public THEN NULL ELSE j ->> tenant_col END, is_public, pk, j - excl);
    ELSIF n > 1 THEN
        -- Each row's key: the row less its other columns when those are few (one
        -- operator per row; it compares every column with every name, so not for wide
        -- tables), else built from the one key column; the aggregate is left for
        -- composite keys of wide tables and for key columns gone from the row (renamed
        -- since watch()).
        IF rows[1] ?& pk_cols THEN
            not_pk := ARRAY(SELECT k FROM jsonb_object_keys(rows[1]) AS k WHERE k <> ALL (pk_cols));
            IF cardinality(not_pk) > 8 THEN
                not_pk := NULL;
            END IF;
        END IF;
        INSERT INTO pgfeed.changes (xid, ord, table_name, op, tenant, public, pk, old)
        SELECT pg_current_xact_id(), base + s.i::integer,
               TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'delete',
               CASE WHEN is_public THEN NULL ELSE s.j ->> tenant_col END, is_public,
               CASE WHEN not_pk IS NOT NULL THEN s.j - not_pk
                    WHEN cardinality(pk_cols) = 1
                    THEN jsonb_build_object(pk_cols[1], s.j -> pk_cols[1])
                    ELSE (SELECT jsonb_object_agg(c, s.j -> c) FROM unnest(pk_cols) AS c)
               END, s.j - excl
        FROM unnest(rows) WITH ORDINALITY AS s(j, i);
    END IF;
    IF n > 0 THEN
        ignored := set_config('pgfeed.ord', (base + n)::text, true) IS NULL;
    END IF;
    RETURN NULL;
END
$$;

-- A truncate carries no row, so every subscriber allowed the table receives it.
CREATE OR REPLACE FUNCTION pgfeed._capture_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    base integer := coalesce(nullif(current_setting('pgfeed.ord', true), ''), '0')::integer;
BEGIN
    INSERT INTO pgfeed.changes (xid, ord, table_name, op, tenant, public)
    VALUES (pg_current_xact_id(), base + 1, TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME,
            'truncate', NULL, true);
    PERFORM set_config('pgfeed.ord', (base + 1)::text, true);
    RETURN NULL;
END
$$;

-- Runs once per transaction, at commit: queued by the transaction's first journal row.
-- The advisory lock is held until the commit completes, so commit numbers are drawn in
-- commit order. The NOTIFY is only a doorbell: "<seq>:<count>", never row data.
CREATE OR REPLACE FUNCTION pgfeed._seal() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    seq     bigint;
    n       integer := coalesce(nullif(current_setting('pgfeed.ord', true), ''), '0')::integer;
    ignored boolean;
BEGIN
    ignored := pg_advisory_xact_lock(1885824612, 1) IS NULL;
    seq := nextval('pgfeed.commit_seq');
    INSERT INTO pgfeed.commits (seq, xid, n, committed_at)
    VALUES (seq, NEW.xid, n, clock_timestamp());
    ignored := pg_notify('pgfeed', seq::text || ':' || n::text) IS NULL;
    RETURN NULL;
END
$$;

SET LOCAL client_min_messages = warning;
DROP TRIGGER IF EXISTS seal ON pgfeed.changes;
RESET client_min_messages;
CREATE CONSTRAINT TRIGGER seal AFTER INSERT ON pgfeed.changes
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NEW.ord = 1) EXECUTE FUNCTION pgfeed._seal();

-- pgfeed.watch: attach capture triggers to a table. Re-running it replaces the settings.
CREATE OR REPLACE FUNCTION pgfeed.watch(
    tbl regclass,
    tenant_column name DEFAULT NULL,
    exclude_columns name[] DEFAULT '{}',
    public boolean DEFAULT false
) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    kind  "char";
    pk    text[];
    cols  text[];
    excl  text[] := coalesce(exclude_columns::text[], '{}');
    args  text;
    c     text;
BEGIN
    SELECT relkind INTO kind FROM pg_class WHERE oid = tbl;
    IF kind IS DISTINCT FROM 'r' THEN
        RAISE EXCEPTION 'pgfeed.watch: % is not an ordinary table', tbl
            USING ERRCODE = 'wrong_object_type';
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

    PERFORM pgfeed._check_casts(tbl);
    PERFORM pgfeed._drop_triggers(tbl);
    args := format('%L, %L, %L, %L', coalesce(tenant_column::text, ''),
                   coalesce(public, false)::text, pk::text, excl::text);
    EXECUTE format('CREATE TRIGGER pgfeed_capture_insert AFTER INSERT ON %s '
                   'REFERENCING NEW TABLE AS pgfeed_new FOR EACH STATEMENT '
                   'EXECUTE FUNCTION pgfeed._capture_insert(%s)', tbl, args);
    EXECUTE format('CREATE TRIGGER pgfeed_capture_update AFTER UPDATE ON %s '
                   'REFERENCING OLD TABLE AS pgfeed_old NEW TABLE AS pgfeed_new FOR EACH STATEMENT '
                   'EXECUTE FUNCTION pgfeed._capture_update(%s)', tbl, args);
    EXECUTE format('CREATE TRIGGER pgfeed_capture_delete AFTER DELETE ON %s '
                   'REFERENCING OLD TABLE AS pgfeed_old FOR EACH STATEMENT '
                   'EXECUTE FUNCTION pgfeed._capture_delete(%s)', tbl, args);
    EXECUTE format('CREATE TRIGGER pgfeed_capture_truncate AFTER TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION pgfeed._capture_truncate()', tbl);

    INSERT INTO pgfeed.watched AS w (tbl, tenant_column, exclude_columns, public, pk_columns)
    VALUES (tbl, tenant_column, excl::name[], coalesce(public, false), pk::name[])
    ON CONFLICT ON CONSTRAINT watched_pkey DO UPDATE
        SET tenant_column = excluded.tenant_column,
            exclude_columns = excluded.exclude_columns,
            public = excluded.public,
            pk_columns = excluded.pk_columns,
            watched_at = now();
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

-- pgfeed.unwatch: remove the capture triggers. Changes already journaled stay until they
-- age out.
CREATE OR REPLACE FUNCTION pgfeed.unwatch(tbl regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgfeed.watched AS w WHERE w.tbl = unwatch.tbl) THEN
        RAISE EXCEPTION 'pgfeed.unwatch: table % is not watched', tbl
            USING ERRCODE = 'undefined_object';
    END IF;
    PERFORM pgfeed._drop_triggers(tbl);
    DELETE FROM pgfeed.watched AS w WHERE w.tbl = unwatch.tbl;
    PERFORM pg_notify('pgfeed', 'watch');
END
$$;

-- pgfeed.prune: removes up to max_commits of the oldest commits older than retention, with
-- their changes, and advances the pruned watermark in the same transaction. Returns the
-- number of commits removed, or -1 when another session is pruning (one replica at a
-- time). Called repeatedly by the gateway so that each call is a short transaction.
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
    IF NOT pg_try_advisory_xact_lock(1885824612, 2) THEN
        RETURN -1;
    END IF;
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
        SET commit_seq = last_seq, ord = coalesce(last_ord, 2147483647)
        WHERE (p.commit_seq, p.ord) < (last_seq, coalesce(last_ord, 2147483647));
    END IF;
    RETURN removed;
END
$$;

-- Nothing in schema pgfeed is for application roles: capture runs as the owner.
REVOKE ALL ON SCHEMA pgfeed FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgfeed FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA pgfeed FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgfeed FROM PUBLIC;

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
    GRANT USAGE ON SCHEMA pgfeed TO pgfeed_capture;
    GRANT INSERT ON pgfeed.changes, pgfeed.commits TO pgfeed_capture;
    GRANT SELECT ON pgfeed.json_casts_since_initdb TO pgfeed_capture;
    GRANT USAGE ON SEQUENCE pgfeed.commit_seq TO pgfeed_capture;
    GRANT EXECUTE ON FUNCTION pgfeed._check_casts(oid), pgfeed._rendering_failed(oid)
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

-- The one-row watermark table is read by every journal query; without statistics the
-- planner guesses ~2 000 rows and picks costlier plans.
ANALYZE pgfeed.pruned;
