//! The gateway's handle for short queries on its pool ([`Db`]), bounded by
//! `database.query_timeout`, and the decoding of their rows ([`decode`]).
//!
//! A connection that does not answer in time is dropped, never returned to the pool: it
//! may be stuck, and its next user would wait on it too. Columns are decoded with
//! `try_get`, so a value of an unexpected type or an unexpected NULL is an error naming
//! the column, never a panic. This module knows no pgfeed table: what is queried belongs
//! to the caller (the journal, the catalog, the metrics).

use std::time::Duration;

use deadpool_postgres::{Object, Pool, PoolError};
use futures_util::future::BoxFuture;
use tokio_postgres::Row;
use tokio_postgres::types::FromSql;

/// Connections for the gateway's queries, each bounded by the query timeout. Cheap to
/// clone: clones share the pool.
#[derive(Clone)]
pub struct Db {
    /// The pool (`database.pool_size`); the LISTEN connection is separate.
    pool: Pool,
    /// Longest a query may take (`database.query_timeout`), the wait for a connection
    /// included.
    timeout: Duration,
}

/// A query through [`Db`] failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// No pooled connection could be had.
    #[error("no database connection")]
    Pool(#[source] PoolError),
    /// The query failed.
    #[error("query failed")]
    Query(#[source] tokio_postgres::Error),
    /// The query did not finish within `database.query_timeout`.
    #[error("query timed out")]
    Timeout,
    /// A column of its result could not be decoded.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

impl QueryError {
    /// Whether the query failed because the pgfeed schema, or one of its tables, does not
    /// exist (SQLSTATE 3F000 or 42P01): it was uninstalled under a running gateway.
    pub fn schema_missing(&self) -> bool {
        match self {
            QueryError::Query(err) => schema_missing(err),
            _ => false,
        }
    }
}

/// Whether `err` says that a schema or a table does not exist (SQLSTATE 3F000 or 42P01).
pub fn schema_missing(err: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    matches!(
        err.code(),
        Some(code) if *code == SqlState::INVALID_SCHEMA_NAME || *code == SqlState::UNDEFINED_TABLE
    )
}

/// A column of a result row holds a value of another type than expected, or NULL where
/// none was expected.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode {column}")]
pub struct DecodeError {
    /// What the column holds, for the message.
    pub column: &'static str,
    /// The driver's reason.
    #[source]
    pub source: tokio_postgres::Error,
}

/// Decodes column `index` of `row` (`column` names it in the error).
pub fn decode<'r, T: FromSql<'r>>(
    row: &'r Row,
    index: usize,
    column: &'static str,
) -> Result<T, DecodeError> {
    row.try_get(index)
        .map_err(|source| DecodeError { column, source })
}

impl Db {
    /// A handle on `pool` whose queries may take `timeout` at most.
    pub fn new(pool: Pool, timeout: Duration) -> Db {
        Db { pool, timeout }
    }

    /// The query timeout, for callers that drive a client themselves ([`Db::client`]).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A pooled connection, waited for at most the query timeout. A caller that gives up
    /// on a query running on it hands it to [`Db::discard`].
    pub async fn client(&self) -> Result<Object, QueryError> {
        tokio::time::timeout(self.timeout, self.pool.get())
            .await
            .map_err(|_| QueryError::Timeout)?
            .map_err(QueryError::Pool)
    }

    /// Drops a connection instead of returning it to the pool: a query on it was given
    /// up, and its reply may still be coming.
    pub fn discard(client: Object) {
        drop(Object::take(client));
    }

    /// Cancels the statement running on `client` on the server, and discards it: its
    /// reply was not read to the end, so it cannot be reused (the cancel cannot reach a
    /// later statement).
    pub fn cancel_and_discard(client: Object) {
        let cancel = client.cancel_token();
        Db::discard(client);
        tokio::spawn(async move {
            let _ = cancel.cancel_query(tokio_postgres::NoTls).await;
        });
    }

    /// Runs `f` on a pooled connection within the query timeout. On timeout the connection
    /// is discarded rather than returned to the pool.
    pub async fn run<T, F>(&self, f: F) -> Result<T, QueryError>
    where
        F: for<'c> FnOnce(
            &'c deadpool_postgres::Client,
        ) -> BoxFuture<'c, Result<T, tokio_postgres::Error>>,
    {
        let client = self.client().await?;
        match tokio::time::timeout(self.timeout, f(&client)).await {
            Ok(result) => result.map_err(QueryError::Query),
            Err(_) => {
                Db::discard(client);
                Err(QueryError::Timeout)
            }
        }
    }

    /// Runs a parameterless query within the query timeout.
    pub async fn query(&self, sql: &'static str) -> Result<Vec<Row>, QueryError> {
        self.run(move |client| Box::pin(async move { client.query(sql, &[]).await }))
            .await
    }
}
