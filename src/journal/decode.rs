//! A journal read's result ([`Batch`]) and the decoding of its rows into changes, as they
//! arrive: a row this binary cannot represent is skipped with its reason, never a panic;
//! the page's bookkeeping (positions, the pruning watermark, sizes) must decode or the
//! read fails.
//!
//! Column indexes are those of the reads' final projection (`sql::projection!`).

use std::sync::Arc;

use serde_json::value::RawValue;

use super::error::JournalError;
use crate::change::{Cache, Change, Op, Position};
use crate::db::{DecodeError, decode};

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
    /// The position read after names a commit that does not exist and was not pruned: its
    /// number was handed out by a seal that a database crash took back, and the same
    /// commits carry other numbers now (`pgfeed.seal`, sql/functions.sql). The reader must
    /// start over from the head (`reset`); `changes` are not for it.
    pub void: bool,
    /// Rows of this read that could not be decoded, in commit order; they are not in
    /// `changes`.
    pub skipped: Vec<Skipped>,
    /// Position of the last row this read returned, decoded or skipped (`None` when it
    /// returned none): the next read continues after it, so a skipped row that ends a
    /// batch is not read again.
    pub end: Option<Position>,
}

/// Why a journal row was left out of a batch.
#[derive(Debug, thiserror::Error)]
pub enum Malformed {
    /// A column's value is not of the type this binary expects.
    #[error("column {column} cannot be decoded")]
    Column {
        /// The journal column.
        column: &'static str,
        /// Why.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A text column holds bytes that are not UTF-8 (possible in a SQL_ASCII database).
    #[error("column {column} is not UTF-8")]
    Utf8 {
        /// The journal column.
        column: &'static str,
        /// Where.
        #[source]
        source: std::str::Utf8Error,
    },
    /// A column that is never NULL was.
    #[error("column {0} is NULL")]
    Null(&'static str),
    /// A row image is not JSON.
    #[error("column {column} is not JSON")]
    Json {
        /// The journal column.
        column: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The op is not one this binary knows (a newer schema's, during a rolling upgrade).
    #[error("unknown op {0:?}")]
    Op(String),
}

impl From<DecodeError> for Malformed {
    fn from(DecodeError { column, source }: DecodeError) -> Self {
        Malformed::Column { column, source }
    }
}

/// A journal row a read left out, and why.
#[derive(Debug)]
pub struct Skipped {
    /// The row's position.
    pub position: Position,
    /// Why it could not be decoded.
    pub reason: Malformed,
}

/// Reads a page's rows as they arrive, decoding each into a change, until the page ends
/// or the real size of what was read (the row images as text, not as stored: compressed,
/// a 1 MB row may take a few KB) reaches `budget`, after at least one change. Returns the
/// batch and whether the page was cut (its remaining rows were not read).
pub(super) async fn collect(
    rows: tokio_postgres::RowStream,
    limit: i64,
    budget: usize,
) -> Result<(Batch, bool), JournalError> {
    use futures_util::TryStreamExt as _;
    futures_util::pin_mut!(rows);
    let mut batch = Batch::default();
    let (mut fetched, mut returned, mut bytes) = (0i64, 0i64, 0usize);
    let mut cut = false;
    while let Some(row) = rows.try_next().await.map_err(JournalError::Query)? {
        batch.pruned = Position {
            commit: decode(&row, 12, "pruning watermark")?,
            ord: decode(&row, 13, "pruning watermark")?,
        };
        fetched = decode(&row, 11, "page size")?;
        batch.void = decode(&row, 15, "void position")?;
        batch.more = fetched == limit;
        // Without a position a row could only be skipped by reading it again forever.
        let Some(commit) = decode::<Option<i64>>(&row, 0, "commit number")? else {
            continue;
        };
        let position = Position {
            commit,
            ord: decode(&row, 1, "ordinal")?,
        };
        returned += 1;
        batch.end = Some(position);
        bytes += (2..=10).map(|i| real_len(&row, i)).sum::<usize>();
        match to_change(&row, position) {
            Ok(change) => batch.changes.push(change),
            Err(reason) => batch.skipped.push(Skipped { position, reason }),
        }
        if bytes >= budget && returned < decode::<i64>(&row, 16, "rows sent")? {
            cut = true;
            break;
        }
    }
    // A page cut short by size has more behind it.
    if returned < fetched {
        batch.more = true;
    }
    Ok((batch, cut))
}

/// The length of a column's value as sent (0 for NULL), whatever its type.
fn real_len(row: &tokio_postgres::Row, index: usize) -> usize {
    struct Len(usize);
    impl<'a> tokio_postgres::types::FromSql<'a> for Len {
        fn from_sql(
            _: &tokio_postgres::types::Type,
            raw: &'a [u8],
        ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
            Ok(Len(raw.len()))
        }
        fn accepts(_: &tokio_postgres::types::Type) -> bool {
            true
        }
    }
    row.try_get::<_, Option<Len>>(index)
        .ok()
        .flatten()
        .map_or(0, |Len(n)| n)
}

/// A text column: text, or its bytes from a SQL_ASCII database (`sql::READ_ALL_BYTES`),
/// which must be UTF-8.
fn text<'r>(
    row: &'r tokio_postgres::Row,
    index: usize,
    name: &'static str,
) -> Result<Option<&'r str>, Malformed> {
    if !is_bytes(row, index) {
        return Ok(decode(row, index, name)?);
    }
    decode::<Option<&[u8]>>(row, index, name)?
        .map(|bytes| {
            std::str::from_utf8(bytes).map_err(|source| Malformed::Utf8 {
                column: name,
                source,
            })
        })
        .transpose()
}

/// Whether a column comes as `bytea` (`sql::READ_ALL_BYTES`).
fn is_bytes(row: &tokio_postgres::Row, index: usize) -> bool {
    row.columns()
        .get(index)
        .is_some_and(|c| c.type_() == &tokio_postgres::types::Type::BYTEA)
}

/// A text column that is never NULL.
fn required<'r>(
    row: &'r tokio_postgres::Row,
    index: usize,
    name: &'static str,
) -> Result<&'r str, Malformed> {
    text(row, index, name)?.ok_or(Malformed::Null(name))
}

/// A row image, kept as the JSON text PostgreSQL rendered.
fn raw(
    row: &tokio_postgres::Row,
    index: usize,
    name: &'static str,
) -> Result<Option<Box<RawValue>>, Malformed> {
    text(row, index, name)?
        .map(|text| {
            RawValue::from_string(text.to_owned()).map_err(|source| Malformed::Json {
                column: name,
                source,
            })
        })
        .transpose()
}

/// The change in a row of a read, or why it cannot be one.
fn to_change(row: &tokio_postgres::Row, position: Position) -> Result<Arc<Change>, Malformed> {
    let op = required(row, 3, "op")?;
    let op: Op = op
        .parse()
        // Bounded: the op is shown in a log line.
        .map_err(|()| Malformed::Op(op.chars().take(32).collect()))?;
    let changed = if is_bytes(row, 9) {
        // A JSON array (`sql::READ_ALL_BYTES`).
        text(row, 9, "changed")?
            .map(|json| {
                serde_json::from_str::<Vec<String>>(json).map_err(|source| Malformed::Json {
                    column: "changed",
                    source,
                })
            })
            .transpose()?
    } else {
        decode(row, 9, "changed")?
    };
    Ok(Arc::new(Change {
        position,
        table: required(row, 2, "table_name")?.to_owned(),
        op,
        tenant: text(row, 4, "tenant")?.map(str::to_owned),
        public: decode(row, 5, "public")?,
        pk: raw(row, 6, "pk")?,
        new: raw(row, 7, "new")?,
        old: raw(row, 8, "old")?,
        changed,
        committed_at: decode(row, 10, "committed_at")?,
        committed_epoch: decode(row, 14, "committed_at")?,
        cache: Cache::default(),
    }))
}
