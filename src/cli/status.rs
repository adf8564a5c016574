//! `pgfeed status`: the schema, the journal's size (counted up to a bound, estimated
//! beyond), the gateways listening and the watched tables, for people or as JSON.

use super::{CliError, client};
use crate::config::Config;
use crate::schema::{self, SchemaError};

/// Rows `pgfeed status` counts exactly; beyond this it reads the planner's estimate
/// (`pg_class.reltuples`), so that status stays fast on a big journal, when it is needed.
pub const STATUS_EXACT_COUNT: i64 = 10_000;

/// A row count: exact up to [`STATUS_EXACT_COUNT`], else an estimate.
#[derive(Debug, Clone, Copy)]
struct Count {
    rows: i64,
    exact: bool,
}

impl Count {
    /// From a count bounded at `STATUS_EXACT_COUNT + 1` and the table's `reltuples`
    /// (-1 or stale when it was never analyzed: then at least the bound).
    fn new(bounded: i64, estimate: f64) -> Count {
        if bounded <= STATUS_EXACT_COUNT {
            Count {
                rows: bounded,
                exact: true,
            }
        } else {
            Count {
                rows: (estimate.round() as i64).max(bounded),
                exact: false,
            }
        }
    }

    fn text(self) -> String {
        if self.exact {
            self.rows.to_string()
        } else {
            format!("~{}", self.rows)
        }
    }
}

/// Prints the status, as JSON with `json`.
pub(super) async fn status(config: &Config, json: bool) -> Result<(), CliError> {
    let client = client(config).await?;
    let watched = schema::watched(&client).await?;
    // No count(*) over the journal: counts stop at the bound, estimates take over.
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM (SELECT FROM pgfeed.changes LIMIT $1) AS c),
                    (SELECT reltuples::float8 FROM pg_catalog.pg_class
                     WHERE oid = 'pgfeed.changes'::pg_catalog.regclass),
                    (SELECT count(*) FROM (SELECT FROM pgfeed.commits LIMIT $1) AS c),
                    (SELECT reltuples::float8 FROM pg_catalog.pg_class
                     WHERE oid = 'pgfeed.commits'::pg_catalog.regclass),
                    (SELECT min(seq) FROM pgfeed.commits), (SELECT max(seq) FROM pgfeed.commits),
                    (SELECT min(committed_at)::text FROM pgfeed.commits),
                    pg_catalog.pg_total_relation_size('pgfeed.changes')
                        + pg_catalog.pg_total_relation_size('pgfeed.commits'),
                    pg_catalog.pg_notification_queue_usage(),
                    (SELECT count(*) FROM (SELECT FROM pgfeed.pending LIMIT $1) AS c),
                    (SELECT reltuples::float8 FROM pg_catalog.pg_class
                     WHERE oid = 'pgfeed.pending'::pg_catalog.regclass)",
            &[&(STATUS_EXACT_COUNT + 1)],
        )
        .await
        .map_err(SchemaError::from)?;
    let changes = Count::new(column(&row, 0)?, column(&row, 1)?);
    // Commits recorded but not numbered yet (no gateway has read since) count too.
    let pending = Count::new(column(&row, 9)?, column(&row, 10)?);
    let numbered = Count::new(column(&row, 2)?, column(&row, 3)?);
    let commits = Count {
        rows: numbered.rows + pending.rows,
        exact: numbered.exact && pending.exact,
    };
    let (oldest, newest): (Option<i64>, Option<i64>) = (column(&row, 4)?, column(&row, 5)?);
    let oldest_at: Option<String> = column(&row, 6)?;
    let bytes: i64 = column(&row, 7)?;
    let queue: f64 = column(&row, 8)?;
    let gateways = client
        .query(
            "SELECT client_addr::text, backend_start::text FROM pg_catalog.pg_stat_activity
             WHERE datname = pg_catalog.current_database() AND application_name = $1
             ORDER BY backend_start",
            &[&crate::db::LISTENER_APPLICATION_NAME],
        )
        .await
        .map_err(SchemaError::from)?;
    let gateways: Vec<(Option<String>, Option<String>)> = gateways
        .iter()
        .map(|r| Ok((column(r, 0)?, column(r, 1)?)))
        .collect::<Result<_, SchemaError>>()?;
    if json {
        let tables: Vec<_> = watched
            .iter()
            .map(|w| {
                serde_json::json!({
                    "table": w.table, "tenant_column": w.tenant_column,
                    "exclude_columns": w.exclude_columns,
                    "exclude_dropped": w.exclude_dropped,
                    "include_columns": w.include_columns, "public": w.public,
                    "partitions": w.partitions, "not_capturing": w.not_capturing,
                })
            })
            .collect();
        let gateways: Vec<_> = gateways
            .iter()
            .map(|(addr, since)| serde_json::json!({ "client_addr": addr, "connected_since": since }))
            .collect();
        let out = serde_json::json!({
            "schema_version": schema::VERSION,
            "watched": tables,
            "journal": {
                "changes": changes.rows, "commits": commits.rows,
                "unnumbered_commits": pending.rows,
                // false: more than STATUS_EXACT_COUNT rows, the number is an estimate.
                "changes_exact": changes.exact, "commits_exact": commits.exact,
                "unnumbered_commits_exact": pending.exact,
                "oldest_commit": oldest, "newest_commit": newest,
                "oldest_committed_at": oldest_at, "bytes": bytes,
            },
            "gateways": gateways,
            "notification_queue_usage": queue,
        });
        println!("{out}");
        return Ok(());
    }
    println!("schema version      {}", schema::VERSION);
    println!(
        "journal             {} changes in {} commits ({}, {} not numbered yet), commits {} to {}, oldest {}",
        changes.text(),
        commits.text(),
        human_bytes(bytes),
        pending.text(),
        opt(oldest),
        opt(newest),
        oldest_at.as_deref().unwrap_or("-")
    );
    if !(changes.exact && commits.exact) {
        println!(
            "                    (~: an estimate from the planner's statistics; counted exactly up to {STATUS_EXACT_COUNT})"
        );
    }
    println!("notification queue  {:.4}% used", queue * 100.0);
    println!("gateways listening  {}", gateways.len());
    for (addr, since) in &gateways {
        println!(
            "  {} since {}",
            addr.as_deref().unwrap_or("local socket"),
            since.as_deref().unwrap_or("?")
        );
    }
    println!("watched tables      {}", watched.len());
    for w in &watched {
        let who = match &w.tenant_column {
            Some(col) => format!("tenant column {col}"),
            None => "public".to_string(),
        };
        let mut notes = String::new();
        if !w.exclude_columns.is_empty() {
            notes.push_str(&format!(", excluding {}", w.exclude_columns.join(", ")));
        }
        if !w.exclude_dropped.is_empty() {
            notes.push_str(&format!(
                ", excluding any column named {} (dropped)",
                w.exclude_dropped.join(", ")
            ));
        }
        if let Some(include) = &w.include_columns {
            notes.push_str(&format!(", only {}", include.join(", ")));
        }
        if !w.partitions.is_empty() {
            notes.push_str(&format!(", {} partitions", w.partitions.len()));
        }
        println!("  {}  ({who}{notes})", w.table);
        if !w.not_capturing.is_empty() {
            println!(
                "    NOT CAPTURING {}: capture triggers missing or disabled (run `pgfeed watch` again)",
                w.not_capturing.join(", ")
            );
        }
    }
    Ok(())
}

/// Column `i` of `row`, or the error naming it (a type or NULL the query did not promise).
fn column<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    i: usize,
) -> Result<T, SchemaError> {
    Ok(row.try_get(i)?)
}

fn human_bytes(n: i64) -> String {
    let n = n as f64;
    if n >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} GiB", n / (1024.0 * 1024.0 * 1024.0))
    } else if n >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", n / (1024.0 * 1024.0))
    } else {
        format!("{:.0} KiB", n / 1024.0)
    }
}

fn opt(v: Option<i64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}
