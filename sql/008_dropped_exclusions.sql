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
-- DDL touches the table; and a column dropped while the event triggers did not fire
-- (session_replication_role = replica) left its number and name behind. So, where the two
-- lists are as long as each other: the live numbers stay, with their names in column
-- order, and the names no live excluded column has are remembered as dropped. (Where they
-- differ in length, names renamed before version 4, _apply does not pair them.)
WITH live AS (
    SELECT x.tbl,
           coalesce(array_agg(a.attnum ORDER BY a.attnum) FILTER (WHERE a.attnum IS NOT NULL),
                    '{}') AS nums,
           coalesce(array_agg(a.attname ORDER BY a.attnum) FILTER (WHERE a.attnum IS NOT NULL),
                    '{}') AS names
    FROM pgfeed.watched AS x
    LEFT JOIN pg_catalog.pg_attribute AS a
        ON a.attrelid OPERATOR(pg_catalog.=) x.tbl::pg_catalog.oid
       AND a.attnum OPERATOR(pg_catalog.=) ANY (x.exclude_attnums)
       AND NOT a.attisdropped
    GROUP BY x.tbl
)
UPDATE pgfeed.watched AS w
SET exclude_attnums = l.nums,
    exclude_columns = l.names,
    exclude_dropped = ARRAY(
        SELECT DISTINCT e.name FROM pg_catalog.unnest(w.exclude_columns) AS e(name)
        WHERE NOT e.name OPERATOR(pg_catalog.=) ANY (l.names)
        ORDER BY e.name)
FROM live AS l
WHERE l.tbl OPERATOR(pg_catalog.=) w.tbl
  AND pg_catalog.cardinality(w.exclude_attnums)
      OPERATOR(pg_catalog.=) pg_catalog.cardinality(w.exclude_columns);
