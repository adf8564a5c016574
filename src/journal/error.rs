//! Why a journal read (or pruning) failed: no connection, the query, the timeout, or a
//! value every read needs that cannot be decoded.

use crate::db::{DecodeError, QueryError};

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
    /// A value every read needs (a position, the pruning watermark) could not be
    /// decoded: the journal is not what this binary expects at all.
    #[error("cannot decode the journal's {column}")]
    Decode {
        /// The column that failed.
        column: &'static str,
        /// Why.
        #[source]
        source: tokio_postgres::Error,
    },
}

impl JournalError {
    /// Whether the read failed because the pgfeed schema, or one of its tables, does not
    /// exist (SQLSTATE 3F000 or 42P01): it was uninstalled under a running gateway.
    pub fn schema_missing(&self) -> bool {
        match self {
            JournalError::Query(err) => crate::db::schema_missing(err),
            _ => false,
        }
    }
}

impl From<QueryError> for JournalError {
    fn from(err: QueryError) -> Self {
        match err {
            QueryError::Pool(err) => JournalError::Pool(err),
            QueryError::Query(err) => JournalError::Query(err),
            QueryError::Timeout => JournalError::Timeout,
            QueryError::Decode(err) => err.into(),
        }
    }
}

impl From<DecodeError> for JournalError {
    fn from(DecodeError { column, source }: DecodeError) -> Self {
        JournalError::Decode { column, source }
    }
}
