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
-- The journal tables are locked first, in the order capture takes them, as in migration 2.
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
