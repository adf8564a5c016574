//! The captured change as the gateway sees it: its position in commit order and its row
//! images.
//!
//! A change is read from the journal once, wrapped in an `Arc`, and shared by every
//! subscriber that receives it. Its frames ([`crate::frame`] encodes them) are serialized
//! at most once per encoding and kept here, shared as `Bytes`. Row images stay as the JSON
//! text PostgreSQL produced (`RawValue`), so a 30-digit numeric keeps every digit. This
//! module never touches the database.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use bytes::Bytes;
use serde_json::value::RawValue;

use crate::rowfilter::Row;

/// Where a change sits in the global order: the commit number (drawn in commit order by
/// the seal trigger) and the change's ordinal inside its transaction (statement order).
///
/// Rendered as `"<commit>.<ordinal>"`; clients treat it as opaque.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// The commit's number from `pgfeed.commit_seq`.
    pub commit: i64,
    /// 1-based ordinal of the change within its commit.
    pub ord: i32,
}

impl Position {
    /// The position before every change.
    pub const ZERO: Position = Position { commit: 0, ord: 0 };
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.commit, self.ord)
    }
}

/// A position string that is not of the form `<commit>.<ordinal>`.
#[derive(Debug, thiserror::Error)]
#[error("invalid position {input:?}: expected <commit>.<ordinal>, as sent in an event's id")]
pub struct PositionParseError {
    /// The rejected text, shortened so that error messages stay small.
    input: String,
}

impl FromStr for Position {
    type Err = PositionParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PositionParseError {
            input: s.chars().take(64).collect(),
        };
        let (commit, ord) = s.split_once('.').ok_or_else(err)?;
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        if !digits(commit) || !digits(ord) {
            return Err(err());
        }
        Ok(Position {
            commit: commit.parse().map_err(|_| err())?,
            ord: ord.parse().map_err(|_| err())?,
        })
    }
}

/// The kind of change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// A row was inserted (`new`).
    Insert,
    /// A row was updated (`new`, `old`, `changed`).
    Update,
    /// A row was deleted (`old`).
    Delete,
    /// The table was truncated (no row).
    Truncate,
}

impl Op {
    /// The name used on the wire and in the journal.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
        }
    }

    /// Every op, for validation messages and defaults.
    pub const ALL: [Op; 4] = [Op::Insert, Op::Update, Op::Delete, Op::Truncate];
}

impl FromStr for Op {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        Op::ALL.into_iter().find(|op| op.as_str() == s).ok_or(())
    }
}

/// How much of a change a subscriber asked for (`payload=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Payload {
    /// Row images (`new`, `old`) included.
    #[default]
    Full,
    /// Only `pk` and `changed`, for clients that refetch through their own API.
    Keys,
}

/// One captured change, as read from the journal.
#[derive(Debug)]
pub struct Change {
    /// Position in commit order; the SSE `id:`.
    pub position: Position,
    /// Qualified table name, `schema.table`.
    pub table: String,
    /// What happened.
    pub op: Op,
    /// The row's tenant; `None` for public tables and truncates.
    pub tenant: Option<String>,
    /// Delivered to every tenant allowed the table (public tables, truncates).
    pub public: bool,
    /// Primary key columns of the row.
    pub pk: Option<Box<RawValue>>,
    /// Row after the change (insert, update), excluded columns removed by the trigger.
    pub new: Option<Box<RawValue>>,
    /// Row before the change (update, delete).
    pub old: Option<Box<RawValue>>,
    /// Columns an update changed.
    pub changed: Option<Vec<String>>,
    /// Commit time, RFC 3339 in UTC with microseconds.
    pub committed_at: String,
    /// Commit time in seconds since the epoch, for latency metrics.
    pub committed_epoch: f64,
    /// What is derived from the change on first use; `Cache::default()` when building one.
    pub cache: Cache,
}

/// What a [`Change`] derives on first use and then shares with every subscriber: its
/// encoded frames and its parsed row images. Empty when the change is built.
#[derive(Debug, Default)]
pub struct Cache {
    /// Encoded frames, built on first use by [`crate::frame`]: [sse full, sse keys, ndjson
    /// full, ndjson keys].
    pub(crate) frames: [OnceLock<Bytes>; 4],
    /// `new` and `old` parsed, on first use by a row filter.
    rows: [OnceLock<Option<Row>>; 2],
}

impl Change {
    /// Roughly what the change occupies in memory once delivered: the row text and about
    /// as much again for each of the frames typically encoded (full and keys payloads),
    /// plus fixed overhead. Rows parsed for row filters come on top.
    pub fn approx_bytes(&self) -> usize {
        let raw = |v: &Option<Box<RawValue>>| v.as_ref().map_or(0, |v| v.get().len());
        let rows = raw(&self.pk) + raw(&self.new) + raw(&self.old);
        let names = self.table.len()
            + self.tenant.as_ref().map_or(0, String::len)
            + self
                .changed
                .as_ref()
                .map_or(0, |c| c.iter().map(|n| n.len() + 8).sum());
        1024 + 3 * (rows + names)
    }

    /// `new` parsed once, numbers exact (for row filters).
    pub fn new_row(&self) -> Option<&Row> {
        self.cache.rows[0]
            .get_or_init(|| self.new.as_deref().and_then(|r| Row::parse(r.get())))
            .as_ref()
    }

    /// `old` parsed once, numbers exact (for row filters).
    pub fn old_row(&self) -> Option<&Row> {
        self.cache.rows[1]
            .get_or_init(|| self.old.as_deref().and_then(|r| Row::parse(r.get())))
            .as_ref()
    }
}

#[cfg(test)]
impl Change {
    /// An insert into `public.t` at `(commit, 1)` for the unit tests: of `tenant`, or
    /// public without one.
    pub(crate) fn for_test(commit: i64, tenant: Option<&str>) -> std::sync::Arc<Change> {
        std::sync::Arc::new(Change {
            position: Position { commit, ord: 1 },
            table: "public.t".into(),
            op: Op::Insert,
            tenant: tenant.map(str::to_string),
            public: tenant.is_none(),
            pk: None,
            new: None,
            old: None,
            changed: None,
            committed_at: "2026-01-01T00:00:00.000000Z".into(),
            committed_epoch: 0.0,
            cache: Cache::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_round_trips_and_orders() {
        let p: Position = "42.7".parse().unwrap();
        assert_eq!(p, Position { commit: 42, ord: 7 });
        assert_eq!(p.to_string(), "42.7");
        assert!(
            Position { commit: 2, ord: 1 }
                > Position {
                    commit: 1,
                    ord: 900
                }
        );
        assert!(Position { commit: 2, ord: 2 } > Position { commit: 2, ord: 1 });
    }

    #[test]
    fn position_rejects_malformed_text() {
        for bad in [
            "",
            "1",
            "1.",
            ".1",
            "-1.2",
            "1.-2",
            "+1.2",
            "1.2.3",
            "a.b",
            " 1.2",
            "99999999999999999999.1",
            "1.99999999999",
        ] {
            assert!(
                bad.parse::<Position>().is_err(),
                "{bad:?} should be rejected"
            );
        }
    }
}
