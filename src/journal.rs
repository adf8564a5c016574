//! Reads from the journal by position: the listener's reads after a doorbell, replay for a
//! resuming subscriber, catch-up after lag, and the head position.
//!
//! Reads are keyset-paginated on (commit, ordinal) and bounded by `journal.batch_size`, so
//! a 100 000-row transaction is never loaded at once. A commit is visible only once its
//! seal has drawn its number under the commit-order lock, so reading "everything after P"
//! never skips a commit that a later read could still find. This module never writes.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::change::{Change, Op, Position};

/// A journal read failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// No pooled connection could be had.
    #[error("no database connection for a journal read")]
    Pool(#[source] deadpool_postgres::PoolError),
    /// The query failed.
    #[error("journal query failed")]
    Query(#[source] tokio_postgres::Error),
    /// The query did not finish within `database.query_timeout`.
    #[error("journal query timed out")]
    Timeout,
    /// A row held something this binary cannot represent.
    #[error("malformed journal row: {0}")]
    Row(String),
}

/// Which changes a read returns.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// Every change (the listener).
    All,
    /// Changes of one tenant, plus public ones (a subscriber's replay).
    Tenant(&'a str),
}

/// Reads the journal through the pool.
#[derive(Clone)]
pub struct Journal {
    /// Connections for reads; the LISTEN connection is separate.
    pool: Pool,
    /// Most changes returned by one read.
    batch_size: i64,
    /// Row-image bytes (as stored) after which a read stops early.
    batch_bytes: i64,
    /// Longest a query may take before its connection is discarded: a connection that
    /// went silent must not hang a reader forever.
    query_timeout: Duration,
}

/// One read: changes in commit order, whether more may follow, and the pruning watermark
/// seen in the same snapshot.
#[derive(Debug, Default)]
pub struct Batch {
    /// The changes, in commit order.
    pub changes: Vec<Arc<Change>>,
    /// False when the read reached the end of what is committed.
    pub more: bool,
    /// Newest position removed by pruning: a reader whose position is older missed
    /// changes.
    pub pruned: Position,
}

// The page is cut by count ($4) and by stored size ($5, always at least one row). The
// page CTE keeps row images as stored (toasted) until the final projection, so rows past
// the byte limit are never detoasted.
const READ_AFTER: &str = "
    WITH page AS (
        SELECT c.seq, ch.ord, ch.table_name, ch.op, ch.tenant, ch.public, ch.pk, ch.new, ch.old,
               ch.changed, c.committed_at,
               coalesce(pg_column_size(ch.new), 0) + coalesce(pg_column_size(ch.old), 0) AS size,
               sum(coalesce(pg_column_size(ch.new), 0) + coalesce(pg_column_size(ch.old), 0))
                   OVER (ORDER BY c.seq, ch.ord) AS running
        FROM pgfeed.commits AS c
        JOIN pgfeed.changes AS ch ON ch.xid = c.xid
        WHERE c.seq >= $1 AND (c.seq > $1 OR ch.ord > $2)
          AND ($3::text IS NULL OR ch.tenant = $3 OR ch.public)
        ORDER BY c.seq, ch.ord
        LIMIT $4
    )
    SELECT p.seq, p.ord, p.table_name, p.op, p.tenant, p.public,
           p.pk::text, p.new::text, p.old::text, p.changed,
           to_char(p.committed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
           (SELECT count(*) FROM page) AS fetched,
           w.commit_seq, w.ord,
           extract(epoch FROM p.committed_at)::float8
    FROM pgfeed.pruned AS w
    LEFT JOIN page AS p ON p.running - p.size < $5
    ORDER BY p.seq, p.ord";

// The newest change, or the pruning watermark when everything was pruned.
const HEAD: &str = "
    SELECT c.seq, (SELECT max(ch.ord) FROM pgfeed.changes AS ch WHERE ch.xid = c.xid),
           w.commit_seq, w.ord
    FROM pgfeed.pruned AS w
    LEFT JOIN LATERAL (
        SELECT seq, xid FROM pgfeed.commits ORDER BY seq DESC LIMIT 1
    ) AS c ON true";

/// Settings for journal reads.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most changes per read.
    pub batch_size: usize,
    /// Stored row-image bytes after which a read stops (at least one change is returned).
    pub batch_bytes: usize,
    /// Longest a query may take.
    pub query_timeout: Duration,
}

impl Journal {
    /// A journal reader over `pool`.
    pub fn new(pool: Pool, limits: Limits) -> Journal {
        Journal {
            pool,
            batch_size: limits.batch_size as i64,
            batch_bytes: limits.batch_bytes as i64,
            query_timeout: limits.query_timeout,
        }
    }

    /// Runs `f` on a pooled connection within the query timeout. On timeout the connection
    /// is discarded rather than returned to the pool.
    async fn with_client<T, F>(&self, f: F) -> Result<T, JournalError>
    where
        F: for<'c> FnOnce(
            &'c deadpool_postgres::Client,
        )
            -> futures_util::future::BoxFuture<'c, Result<T, tokio_postgres::Error>>,
    {
        let client = tokio::time::timeout(self.query_timeout, self.pool.get())
            .await
            .map_err(|_| JournalError::Timeout)?
            .map_err(JournalError::Pool)?;
        match tokio::time::timeout(self.query_timeout, f(&client)).await {
            Ok(result) => result.map_err(JournalError::Query),
            Err(_) => {
                drop(deadpool_postgres::Object::take(client));
                Err(JournalError::Timeout)
            }
        }
    }

    /// Runs a parameterless read (the catalog) within the query timeout.
    pub async fn query(&self, sql: &'static str) -> Result<Vec<tokio_postgres::Row>, JournalError> {
        self.with_client(move |client| Box::pin(async move { client.query(sql, &[]).await }))
            .await
    }

    /// The position of the newest committed change (`0.0` when there never was one).
    pub async fn head(&self) -> Result<Position, JournalError> {
        let row = self
            .with_client(|client| Box::pin(async move { client.query_one(HEAD, &[]).await }))
            .await?;
        let newest = Position {
            commit: row.get::<_, Option<i64>>(0).unwrap_or(0),
            ord: row.get::<_, Option<i32>>(1).unwrap_or(0),
        };
        let pruned = Position {
            commit: row.get(2),
            ord: row.get(3),
        };
        Ok(newest.max(pruned))
    }

    /// Changes after `after`, in commit order, at most `batch_size` of them and stopping
    /// early past `batch_bytes`.
    pub async fn read_after(
        &self,
        after: Position,
        scope: Scope<'_>,
    ) -> Result<Batch, JournalError> {
        let tenant = match scope {
            Scope::All => None,
            Scope::Tenant(t) => Some(t.to_string()),
        };
        let (limit, bytes) = (self.batch_size, self.batch_bytes);
        let rows = self
            .with_client(move |client| {
                Box::pin(async move {
                    let stmt = client.prepare_cached(READ_AFTER).await?;
                    client
                        .query(&stmt, &[&after.commit, &after.ord, &tenant, &limit, &bytes])
                        .await
                })
            })
            .await?;
        let mut batch = Batch::default();
        for row in &rows {
            batch.pruned = Position {
                commit: row.get(12),
                ord: row.get(13),
            };
            let fetched: i64 = row.get(11);
            batch.more = fetched == limit;
            if row.get::<_, Option<i64>>(0).is_some() {
                batch.changes.push(to_change(row)?);
            }
        }
        // A page cut short by size has more behind it.
        if let Some(fetched) = rows.first().map(|r| r.get::<_, i64>(11))
            && (batch.changes.len() as i64) < fetched
        {
            batch.more = true;
        }
        Ok(batch)
    }

    /// Removes up to `max_commits` commits older than `retention`. Returns how many were
    /// removed, or `None` when another session holds the pruning lock.
    pub async fn prune(
        &self,
        retention: Duration,
        max_commits: i32,
    ) -> Result<Option<u32>, JournalError> {
        let seconds = retention.as_secs_f64();
        let row = self
            .with_client(move |client| {
                Box::pin(async move {
                    client
                        .query_one(
                            "SELECT pgfeed.prune(make_interval(secs => $1), $2)",
                            &[&seconds, &max_commits],
                        )
                        .await
                })
            })
            .await?;
        let removed: i32 = row.get(0);
        Ok(u32::try_from(removed).ok())
    }
}

/// Commits removed per pruning transaction: small enough that each one is short.
const PRUNE_BATCH: i32 = 200;

impl Journal {
    /// Prunes changes older than `retention` every `interval` until `shutdown`. Replicas
    /// take turns through an advisory lock; each batch is its own short transaction so
    /// writers are never blocked for long.
    pub async fn prune_periodically(
        self,
        retention: Duration,
        interval: Duration,
        metrics: Arc<crate::metrics::Metrics>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let mut total = 0u64;
            loop {
                match self.prune(retention, PRUNE_BATCH).await {
                    Ok(Some(removed)) => {
                        metrics.prune_runs.inc();
                        metrics.pruned_commits.inc_by(u64::from(removed));
                        total += u64::from(removed);
                        if removed < PRUNE_BATCH as u32 || shutdown.is_cancelled() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(err) => {
                        tracing::warn!(cause = %err, "pruning the journal failed");
                        break;
                    }
                }
            }
            if total > 0 {
                tracing::info!(commits = total, "pruned the journal");
            }
        }
    }
}

fn raw(text: Option<String>) -> Result<Option<Box<RawValue>>, JournalError> {
    text.map(|t| RawValue::from_string(t).map_err(|e| JournalError::Row(e.to_string())))
        .transpose()
}

fn to_change(row: &tokio_postgres::Row) -> Result<Arc<Change>, JournalError> {
    let op: &str = row.get(3);
    let op: Op = op
        .parse()
        .map_err(|()| JournalError::Row(format!("unknown op {op:?}")))?;
    Ok(Arc::new(Change::new(
        Position {
            commit: row.get(0),
            ord: row.get(1),
        },
        row.get(2),
        op,
        row.get(4),
        row.get(5),
        raw(row.get(6))?,
        raw(row.get(7))?,
        raw(row.get(8))?,
        row.get(9),
        row.get(10),
        row.get(14),
    )))
}
