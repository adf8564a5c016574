-- pgfeed schema migration 5: capture never serializes the application's commits.
--
-- Until now a watched transaction drew its commit number at commit under a lock held until
-- its commit ended, and sent a NOTIFY, whose own lock PostgreSQL also holds through the
-- commit: watched commits in the whole cluster went one at a time. Now:
--
-- * A watched transaction's deferred seal only appends a row to pgfeed.pending (no index,
--   no lock others wait on) with a number drawn from a sequence, which orders commits that
--   did not overlap.
-- * Gateways seal (pgfeed.seal, functions.sql): one at a time, under a lock on
--   pgfeed.seal_lock that writers never take, they move every pending commit their snapshot
--   sees into pgfeed.commits, numbered after the newest sealed commit in the order of the
--   drawn numbers. A commit that finished before another began is visible to any snapshot
--   that sees the other, so it is sealed in the same batch or an earlier one, and within a
--   batch it drew the lower number. Positions stay (commit number, ordinal), assigned once,
--   durably, the same for every replica.
-- * The doorbell rings only for a gateway that sleeps: pgfeed.armed says one does; the first
--   writer to see it set clears it and rings (one NOTIFY per sleep).
--
-- Gateways of earlier versions need a NOTIFY from every commit, which no longer comes: the
-- watermark's column is renamed so that their journal reads fail at once (/readyz 503, an
-- error in their log) instead of delivering late. Their clients resume on new gateways
-- with Last-Event-ID and miss nothing.
--
-- Locks in the order capture takes them (the casts view, the journal, the old commit-order
-- lock, the commit table), so that a transaction capturing while this runs finishes first.
SET LOCAL lock_timeout = '30s';
ALTER VIEW pgfeed.json_casts_since_initdb SET (security_barrier = false);
LOCK TABLE pgfeed.changes, pgfeed.commit_order, pgfeed.commits, pgfeed.pruned
    IN ACCESS EXCLUSIVE MODE;

CREATE TABLE pgfeed.pending (
    xid          xid8        NOT NULL,
    draw         bigint      NOT NULL,
    n            integer     NOT NULL,
    committed_at timestamptz NOT NULL
);
ALTER TABLE pgfeed.pending ENABLE ROW LEVEL SECURITY;
CREATE POLICY readable ON pgfeed.pending FOR SELECT USING (true);
CREATE POLICY sealable ON pgfeed.pending FOR DELETE USING (true);
CREATE POLICY own_transaction ON pgfeed.pending FOR INSERT
    WITH CHECK (xid OPERATOR(pg_catalog.=) pg_catalog.pg_current_xact_id());
CREATE POLICY redraw ON pgfeed.pending FOR UPDATE
    USING (xid OPERATOR(pg_catalog.=) pg_catalog.pg_current_xact_id());

-- pgfeed.commits now holds sealed commits, written by gateways.
DROP POLICY own_transaction ON pgfeed.commits;
CREATE POLICY sealer ON pgfeed.commits FOR INSERT WITH CHECK (true);

-- The doorbell: pgfeed.armed is 1 while some gateway sleeps and nobody has rung yet. A
-- sequence, because its value is read and set outside transactions' snapshots: a
-- REPEATABLE READ or SERIALIZABLE writer reads the current value at its commit, and
-- neither reading nor setting it can make a transaction fail to serialize. pgfeed.doorbell
-- has no rows: writers lock it (ACCESS SHARE) from before they read the flag until their
-- commit ends, and the gateway's barrier waits on that lock.
CREATE SEQUENCE pgfeed.armed AS integer MINVALUE 0 MAXVALUE 1 START 0 NO CYCLE;
CREATE TABLE pgfeed.doorbell ();

CREATE TABLE pgfeed.seal_lock ();

ALTER TABLE pgfeed.pruned RENAME COLUMN commit_seq TO seq;

-- Commits sealed by the version-4 seal are already in pgfeed.commits; the commit-order
-- lock is no longer taken.
DROP TABLE pgfeed.commit_order;
