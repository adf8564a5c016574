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

-- _apply pairs each stored name with the stored number at the same place. Settings written
-- before version 4 kept the names in the order `watch` was given them, and stay so until
-- DDL touches the table: put them in attribute order, as _apply writes them. (Where the two
-- lists differ in length, _apply does not pair them.)
UPDATE pgfeed.watched AS w
SET exclude_columns = ARRAY(
        SELECT a.attname FROM pg_catalog.pg_attribute AS a
        WHERE a.attrelid OPERATOR(pg_catalog.=) w.tbl::pg_catalog.oid
          AND a.attnum OPERATOR(pg_catalog.=) ANY (w.exclude_attnums)
          AND NOT a.attisdropped
        ORDER BY a.attnum)
WHERE pg_catalog.cardinality(w.exclude_attnums)
      OPERATOR(pg_catalog.=) pg_catalog.cardinality(w.exclude_columns);
