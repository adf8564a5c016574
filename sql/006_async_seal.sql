-- pgfeed schema migration 6: the seal no longer waits for its own flush.
--
-- Schema 5's seal (pgfeed.seal) committed durably before a gateway read what it numbered, so
-- that a crash could never take a delivered position back: a disk flush between every
-- commit and its delivery. Now the seal commits asynchronously, and a crash that loses a
-- numbering that gateways may already have delivered is detected instead:
--
-- * pgfeed.alive is unlogged: PostgreSQL empties it in crash recovery (and on a promoted
--   standby). The first seal that finds it empty knows numbers may have been handed out
--   and lost, and numbers on from 2^32 past the newest surviving commit (pgfeed.epoch),
--   so no position is ever reused; gateways send `reset` to clients whose position is
--   one that no longer exists (src/journal.rs, `void`).
-- * A writer that commits asynchronously (synchronous_commit = off) is visible before its
--   commit is on disk, and a crash can take it back. Its pending row says so (durable =
--   false), and a seal that numbers such a commit flushes before it returns, as every
--   seal did before: nothing delivered is ever taken back.
SET LOCAL lock_timeout = '30s';
ALTER TABLE pgfeed.pending ADD COLUMN durable boolean NOT NULL DEFAULT false;

CREATE UNLOGGED TABLE pgfeed.alive ();
INSERT INTO pgfeed.alive DEFAULT VALUES;

CREATE TABLE pgfeed.epoch (
    floor     bigint      NOT NULL,
    voided_at timestamptz
);
INSERT INTO pgfeed.epoch (floor) VALUES (0);
