-- pgfeed schema migration 8: an excluded column's name outlives the column.
--
-- Settings follow columns by attribute number (migration 4), so a column dropped and added
-- again under the same name (a migration that changes a column's type that way, say) is
-- another column: until now it was published, although the operator had excluded a column
-- of that name. pgfeed.watched now remembers the names of excluded columns that were
-- dropped; a column that is later added or renamed under one of them is excluded too
-- (pgfeed._apply, run by the pgfeed_ddl event trigger in the DDL's own transaction).
-- Watching the table again with its current settings clears the list.
SET LOCAL lock_timeout = '30s';
ALTER TABLE pgfeed.watched ADD COLUMN exclude_dropped name[] NOT NULL DEFAULT '{}';
