//! Reads from the journal by position: the listener's reads after a doorbell, replay for a
//! resuming subscriber, catch-up after lag, and the head position.
//!
//! Reads are keyset-paginated on (commit, ordinal) and bounded by `journal.batch_size`, so
//! a 100 000-row transaction is never loaded at once. A commit is visible only once its
//! seal has drawn its number under the commit-order lock, so reading "everything after P"
//! never skips a commit that a later read could still find. This module never writes.

use std::sync::Arc;

use deadpool_postgres::Pool;
use serde_json::value::RawValue;

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
}

const READ_AFTER: &str = "
    SELECT c.seq, ch.ord, ch.table_name, ch.op, ch.tenant, ch.public,
           ch.pk::text, ch.new::text, ch.old::text, ch.changed,
           to_char(c.committed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
    FROM pgfeed.commits AS c
    JOIN pgfeed.changes AS ch ON ch.xid = c.xid
    WHERE c.seq >= $1 AND (c.seq > $1 OR ch.ord > $2)
      AND ($3::text IS NULL OR ch.tenant = $3 OR ch.public)
    ORDER BY c.seq, ch.ord
    LIMIT $4";

const HEAD: &str = "
    SELECT c.seq, (SELECT max(ch.ord) FROM pgfeed.changes AS ch WHERE ch.xid = c.xid)
    FROM pgfeed.commits AS c
    ORDER BY c.seq DESC
    LIMIT 1";

impl Journal {
    /// A journal reader over `pool`, reading at most `batch_size` changes at a time.
    pub fn new(pool: Pool, batch_size: usize) -> Journal {
        Journal {
            pool,
            batch_size: batch_size as i64,
        }
    }

    /// The most changes one [`Journal::read_after`] returns.
    pub fn batch_size(&self) -> usize {
        self.batch_size as usize
    }

    /// The position of the newest committed change (`0.0` when there is none).
    pub async fn head(&self) -> Result<Position, JournalError> {
        let client = self.pool.get().await.map_err(JournalError::Pool)?;
        let row = client
            .query_opt(HEAD, &[])
            .await
            .map_err(JournalError::Query)?;
        Ok(row.map_or(Position::ZERO, |r| Position {
            commit: r.get(0),
            ord: r.get::<_, Option<i32>>(1).unwrap_or(0),
        }))
    }

    /// Up to `batch_size` changes after `after`, in commit order. Fewer than a full batch
    /// means the read reached the end of what is committed.
    pub async fn read_after(
        &self,
        after: Position,
        scope: Scope<'_>,
    ) -> Result<Vec<Arc<Change>>, JournalError> {
        let client = self.pool.get().await.map_err(JournalError::Pool)?;
        let tenant = match scope {
            Scope::All => None,
            Scope::Tenant(t) => Some(t),
        };
        let stmt = client
            .prepare_cached(READ_AFTER)
            .await
            .map_err(JournalError::Query)?;
        let rows = client
            .query(
                &stmt,
                &[&after.commit, &after.ord, &tenant, &self.batch_size],
            )
            .await
            .map_err(JournalError::Query)?;
        rows.iter().map(to_change).collect()
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
    )))
}
