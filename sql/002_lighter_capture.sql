-- pgfeed schema migration 2: capture does less work per transaction.
--
-- The commit seal used to hang off a marker row in pgfeed.seal (inserted by a transaction's
-- first capture, deleted again by the seal). It now hangs off the transaction's first journal
-- row: functions.sql puts the deferred constraint trigger on pgfeed.changes with
-- `WHEN (NEW.ord = 1)`, so it is queued once per transaction and the marker's insert and
-- delete are gone. The CHECK on changes.op goes too: only pgfeed's capture functions write
-- the journal, and evaluating the constraint was about 5 % of a watched single-row insert.
-- The small helpers _ord, _advance and _pick are now written out inside the capture
-- functions: as separate functions, each call paid a function-call setup and, for the SQL
-- ones, a fresh plan in every transaction.
--
-- The journal tables are locked first, in the order capture takes them (changes, then
-- seal), so that a transaction that is capturing while this runs finishes before the
-- migration goes on instead of deadlocking with it. Writes to watched tables wait
-- meanwhile; after 30 s of waiting, install gives up (run it again when it is quieter).
SET LOCAL lock_timeout = '30s';
LOCK TABLE pgfeed.changes, pgfeed.seal IN ACCESS EXCLUSIVE MODE;
DROP TABLE pgfeed.seal;
ALTER TABLE pgfeed.changes DROP CONSTRAINT changes_op_check;
-- (IF EXISTS: a fresh install runs this before functions.sql has ever created them.)
DROP FUNCTION IF EXISTS pgfeed._ord();
DROP FUNCTION IF EXISTS pgfeed._advance(integer, integer);
DROP FUNCTION IF EXISTS pgfeed._pick(jsonb, text[]);
