//! Reads from the journal by position: the listener's reads after a doorbell, replay for a
//! resuming subscriber, catch-up after lag, and the head position.
//!
//! Reads are keyset-paginated on (commit, ordinal) and bounded by `journal.batch_size`, so
//! a 100 000-row transaction is never loaded at once. A commit is visible only once its
//! seal has drawn its number under the commit-order lock, so reading "everything after P"
//! never skips a commit that a later read could still find. This module never writes.
//!
//! Rows are decoded column by column and never panic: a row this binary cannot represent
//! (an op from a newer schema, text that is not UTF-8 in a `SQL_ASCII` database) is left
//! out of its batch and reported in [`Batch::skipped`] with its position, and the batch's
//! [`Batch::end`] still moves past it, so one bad row never stops a reader or is read
//! again. Only a row whose position itself cannot be decoded fails the read.
//!
//! The SQL is in `journal/sql.rs`, the decoding of rows in `journal/decode.rs`, the errors
//! in `journal/error.rs`, pruning in `journal/prune.rs`; the connections are the pool's,
//! through [`Db`].

mod decode;
mod error;
mod prune;
mod sql;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use deadpool_postgres::Pool;

use crate::change::Position;
use crate::db::{Db, decode};

pub use decode::{Batch, Malformed, Skipped};
pub use error::JournalError;
use sql::{
    HEAD, IDENTITY, READ_ALL, READ_ALL_BYTES, READ_TENANT, READ_TENANT_BYTES, SEAL, SQL_ASCII,
};

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
    /// Connections for reads (the LISTEN connection is separate), each query bounded by
    /// the query timeout: a connection that went silent must not hang a reader forever.
    db: Db,
    /// Most changes returned by one read.
    batch_size: i64,
    /// Row-image bytes (as stored) after which a read stops early.
    batch_bytes: i64,
    /// Whether the database is SQL_ASCII, once the first read has asked: reads then
    /// fetch text as bytes (`sql::READ_ALL_BYTES`). Shared by the clones.
    sql_ascii: Arc<OnceLock<bool>>,
    /// Permits for subscribers' reads (replays and catch-ups), shared by the clones: a
    /// storm of resumes waits here, in turn, and leaves the rest of the pool to everything
    /// else (`/v1/position`, resumes' head checks, `/metrics`, catalog reloads).
    replays: Arc<tokio::sync::Semaphore>,
}

/// Real bytes (row images as text) after which a subscriber's journal read stops, at
/// least one change read: what a replay or a catch-up holds for a stream that does not
/// take it, besides the chunk being written (see `sse`).
pub const STREAM_READ_BYTES: usize = 1 << 20;

/// Settings for journal reads.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most changes per read.
    pub batch_size: usize,
    /// Stored row-image bytes after which a read stops (at least one change is returned).
    pub batch_bytes: usize,
    /// Longest a query may take.
    pub query_timeout: Duration,
    /// Subscribers' reads (replays, catch-ups) running at once at most
    /// (`journal.replay_concurrency`).
    pub replay_concurrency: usize,
}

impl Limits {
    /// From the `[journal]` section and the `[database]` one (the statement timeout, and
    /// the pool that replays share).
    pub fn new(
        journal: &crate::config::JournalConfig,
        database: &crate::config::DatabaseConfig,
    ) -> Limits {
        Limits {
            batch_size: journal.batch_size,
            batch_bytes: journal.batch_bytes,
            query_timeout: database.query_timeout,
            replay_concurrency: journal.replay_concurrency(database.pool_size),
        }
    }
}

impl Journal {
    /// A journal reader over `pool`.
    pub fn new(pool: Pool, limits: Limits) -> Journal {
        Journal {
            db: Db::new(pool, limits.query_timeout),
            batch_size: limits.batch_size as i64,
            batch_bytes: limits.batch_bytes as i64,
            sql_ascii: Arc::default(),
            replays: Arc::new(tokio::sync::Semaphore::new(
                limits
                    .replay_concurrency
                    .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
            )),
        }
    }

    /// The handle on the pool the journal reads through, for the gateway's other short
    /// queries (the catalog, the metrics) on the same connections.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The position of the newest committed change (`0.0` when there never was one).
    /// Commits that finished before are sealed first, so that a client that read its data
    /// before asking misses nothing after this position, and sees nothing twice.
    pub async fn head(&self) -> Result<Position, JournalError> {
        let row = self
            .db
            .run(|client| {
                Box::pin(async move {
                    // Pipelined: one round trip, the seal runs first on the server.
                    let (_, head) = futures_util::future::try_join(
                        client.query_one(SEAL, &[]),
                        client.query_one(HEAD, &[]),
                    )
                    .await?;
                    Ok(head)
                })
            })
            .await?;
        let newest = Position {
            commit: decode::<Option<i64>>(&row, 0, "commit number")?.unwrap_or(0),
            ord: decode::<Option<i32>>(&row, 1, "ordinal")?.unwrap_or(0),
        };
        let pruned = Position {
            commit: decode(&row, 2, "pruning watermark")?,
            ord: decode(&row, 3, "pruning watermark")?,
        };
        Ok(newest.max(pruned))
    }

    /// Identifies the journal: the oid of `pgfeed.commits`, which changes when the schema
    /// is uninstalled and installed again (and positions start over).
    pub async fn identity(&self) -> Result<u32, JournalError> {
        let row = self
            .db
            .run(|client| Box::pin(async move { client.query_one(IDENTITY, &[]).await }))
            .await?;
        Ok(decode(&row, 0, "identity")?)
    }

    /// Numbers the commits that finished and are not numbered yet (`pgfeed.seal`), then
    /// reads as [`Journal::read_after`] does, in one round trip: the listener's read.
    pub async fn seal_and_read(&self, after: Position) -> Result<Batch, JournalError> {
        self.read(after, Scope::All, true).await
    }

    /// Changes after `after`, in commit order, at most `batch_size` of them and stopping
    /// early past `batch_bytes`.
    pub async fn read_after(
        &self,
        after: Position,
        scope: Scope<'_>,
    ) -> Result<Batch, JournalError> {
        self.read(after, scope, false).await
    }

    async fn read(
        &self,
        after: Position,
        scope: Scope<'_>,
        seal: bool,
    ) -> Result<Batch, JournalError> {
        let tenant = match scope {
            Scope::All => None,
            Scope::Tenant(t) => Some(t.to_string()),
        };
        // A subscriber's read waits for its turn (never closed, so this cannot fail);
        // the listener's never does.
        let _turn = match tenant {
            Some(_) => self.replays.acquire().await.ok(),
            None => None,
        };
        let limit = self.batch_size;
        // What one read may bring into memory, in real bytes: a subscriber's read is
        // held by its stream until the client has taken it (see `sse`), so it is smaller.
        let budget = match tenant {
            Some(_) => self.batch_bytes.min(STREAM_READ_BYTES as i64),
            None => self.batch_bytes,
        };
        let known = self.sql_ascii.get().copied();
        let client = self.db.client().await?;
        let reading = async {
            let sql_ascii = match known {
                Some(known) => known,
                None => client
                    .query_one(SQL_ASCII, &[])
                    .await
                    .and_then(|row| row.try_get(0))
                    .map_err(JournalError::Query)?,
            };
            let _ = self.sql_ascii.set(sql_ascii);
            let sql = match (tenant.is_some(), sql_ascii) {
                (false, false) => READ_ALL,
                (false, true) => READ_ALL_BYTES,
                (true, false) => READ_TENANT,
                (true, true) => READ_TENANT_BYTES,
            };
            let stmt = client
                .prepare_cached(sql)
                .await
                .map_err(JournalError::Query)?;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
                [&after.commit, &after.ord, &tenant, &limit, &budget];
            let read = client.query_raw(&stmt, params);
            let rows = if seal {
                // Pipelined: one round trip; the read's snapshot is taken after the seal
                // committed.
                let sealing = client
                    .prepare_cached(SEAL)
                    .await
                    .map_err(JournalError::Query)?;
                futures_util::future::try_join(client.query_one(&sealing, &[]), read)
                    .await
                    .map_err(JournalError::Query)?
                    .1
            } else {
                read.await.map_err(JournalError::Query)?
            };
            decode::collect(rows, limit, budget as usize).await
        };
        let (batch, cut) = match tokio::time::timeout(self.db.timeout(), reading).await {
            Ok(result) => result?,
            Err(_) => {
                Db::discard(client);
                return Err(JournalError::Timeout);
            }
        };
        if cut {
            // The rows after the cut were not read: the statement is cancelled rather
            // than left to render and send them, and its connection, whose end of the
            // reply is still coming, is not reused.
            Db::cancel_and_discard(client);
        }
        Ok(batch)
    }
}
