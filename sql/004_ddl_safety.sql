-- pgfeed schema migration 4: settings that follow the column, locks only pgfeed can take,
-- and a journal that capture can only append its own transaction's rows to.
--
-- * pgfeed.watched keeps the tenant, excluded and included columns by attribute number as
--   well as by name. The names are what the capture triggers carry (capture never looks
--   anything up); the numbers are the truth that the `pgfeed_ddl` event trigger
--   (functions.sql) re-derives the names from after every ALTER TABLE, in the same
--   transaction, so renaming a column never publishes or misroutes anything.
-- * pgfeed.commit_order replaces the advisory lock that ordered commits: any role could take
--   an advisory lock with pgfeed's well-known keys and stall every watched commit, while
--   only roles with privileges on this table can lock it.
-- * Row-level security on the journal: a role that is not its owner (pgfeed_capture, whose
--   functions run code from rendering rows) may insert only rows of its own transaction
--   with an ordinal of at least 1. Reading and pruning stay governed by privileges alone.
--
-- Capture reads this view before it writes the journal, so it is replaced first: taking
-- the journal's locks first would deadlock with a capture that already read it. (It lived
-- in functions.sql before; an install re-created it there after the journal was locked.)
-- Casts to json or jsonb with a function, created after initdb (oid 16384 and up). When
-- there are none, as in most databases, capture skips _check_casts: this is one probe of
-- pg_cast's oid index. INOUT and binary casts run no user code.
-- Its operators are written qualified, with typed literals, so that what it binds to does
-- not depend on the search_path it was created under (install also pins that): a view is
-- bound once, and this one runs as pgfeed_capture inside every capture, before the
-- rendering sandbox.
CREATE OR REPLACE VIEW pgfeed.json_casts_since_initdb AS
    SELECT c.oid FROM pg_catalog.pg_cast AS c
    WHERE c.oid OPERATOR(pg_catalog.>=) 16384::pg_catalog.oid
      AND c.casttarget OPERATOR(pg_catalog.=) ANY ('{114,3802}'::pg_catalog.oid[])
      AND c.castfunc OPERATOR(pg_catalog.<>) 0::pg_catalog.oid;

-- The journal tables are locked next, in the order capture takes them, as in migration 2.
SET LOCAL lock_timeout = '30s';
LOCK TABLE pgfeed.changes, pgfeed.commits, pgfeed.watched IN ACCESS EXCLUSIVE MODE;

ALTER TABLE pgfeed.watched
    ADD COLUMN tenant_attnum   int2,
    ADD COLUMN exclude_attnums int2[] NOT NULL DEFAULT '{}',
    ADD COLUMN include_attnums int2[];
UPDATE pgfeed.watched AS w
SET tenant_attnum = (SELECT a.attnum FROM pg_catalog.pg_attribute AS a
                     WHERE a.attrelid OPERATOR(pg_catalog.=) w.tbl::pg_catalog.oid
                       AND a.attname OPERATOR(pg_catalog.=) w.tenant_column
                       AND NOT a.attisdropped),
    exclude_attnums = ARRAY(
        SELECT a.attnum FROM pg_catalog.pg_attribute AS a
        WHERE a.attrelid OPERATOR(pg_catalog.=) w.tbl::pg_catalog.oid
          AND a.attname OPERATOR(pg_catalog.=) ANY (w.exclude_columns)
          AND NOT a.attisdropped
        ORDER BY a.attnum);

CREATE TABLE pgfeed.commit_order ();

ALTER TABLE pgfeed.changes ADD CONSTRAINT changes_ord_positive CHECK (ord > 0) NOT VALID;
ALTER TABLE pgfeed.changes ENABLE ROW LEVEL SECURITY;
CREATE POLICY readable ON pgfeed.changes FOR SELECT USING (true);
CREATE POLICY prunable ON pgfeed.changes FOR DELETE USING (true);
CREATE POLICY own_transaction ON pgfeed.changes FOR INSERT
    WITH CHECK (xid OPERATOR(pg_catalog.=) pg_catalog.pg_current_xact_id()
                AND ord OPERATOR(pg_catalog.>) 0);
ALTER TABLE pgfeed.commits ENABLE ROW LEVEL SECURITY;
CREATE POLICY readable ON pgfeed.commits FOR SELECT USING (true);
CREATE POLICY prunable ON pgfeed.commits FOR DELETE USING (true);
CREATE POLICY own_transaction ON pgfeed.commits FOR INSERT
    WITH CHECK (xid OPERATOR(pg_catalog.=) pg_catalog.pg_current_xact_id());

-- watch() gained include_columns: the old signature would stay beside it as an overload.
DROP FUNCTION IF EXISTS pgfeed.watch(regclass, name, name[], boolean);
