//! The captured change as the gateway sees it: its position in commit order, its row
//! images, and its wire frames.
//!
//! A change is read from the journal once, wrapped in an `Arc`, and shared by every
//! subscriber that receives it. Its frames are serialized at most once per encoding and
//! shared as `Bytes`. Row images stay as the JSON text PostgreSQL produced (`RawValue`), so
//! a 30-digit numeric keeps every digit. This module never touches the database.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use bytes::Bytes;
use serde::Serialize;
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

/// The wire format of a stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// `text/event-stream`.
    #[default]
    Sse,
    /// `application/x-ndjson`: one JSON object per line.
    Ndjson,
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
    /// Encoded frames, built on first use: [sse full, sse keys, ndjson full, ndjson keys].
    frames: [OnceLock<Bytes>; 4],
    /// `new` and `old` parsed, on first use by a row filter.
    rows: [OnceLock<Option<Row>>; 2],
}

/// The `data:` object of a change event.
#[derive(Serialize)]
struct EventData<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'static str>,
    position: String,
    table: &'a str,
    op: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pk: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    new: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    old: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    changed: Option<&'a [String]>,
    committed_at: &'a str,
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

    /// The encoded frame for this change, built once per (format, payload) and shared.
    pub fn frame(&self, format: Format, payload: Payload) -> &Bytes {
        let slot = match (format, payload) {
            (Format::Sse, Payload::Full) => 0,
            (Format::Sse, Payload::Keys) => 1,
            (Format::Ndjson, Payload::Full) => 2,
            (Format::Ndjson, Payload::Keys) => 3,
        };
        self.cache.frames[slot].get_or_init(|| self.encode(format, payload))
    }

    fn encode(&self, format: Format, payload: Payload) -> Bytes {
        let full = payload == Payload::Full;
        let data = EventData {
            event: (format == Format::Ndjson).then_some("change"),
            position: self.position.to_string(),
            table: &self.table,
            op: self.op.as_str(),
            tenant: self.tenant.as_deref(),
            pk: self.pk.as_deref(),
            new: self.new.as_deref().filter(|_| full),
            old: self.old.as_deref().filter(|_| full),
            changed: self.changed.as_deref(),
            committed_at: &self.committed_at,
        };
        // Serializing plain strings and RawValues cannot fail.
        let json = serde_json::to_vec(&data).expect("event data serializes");
        let mut out = Vec::with_capacity(json.len() + 48);
        match format {
            Format::Sse => {
                out.extend_from_slice(b"id: ");
                out.extend_from_slice(data.position.as_bytes());
                out.extend_from_slice(b"\nevent: change\ndata: ");
                out.extend_from_slice(&json);
                out.extend_from_slice(b"\n\n");
            }
            Format::Ndjson => {
                out.extend_from_slice(&json);
                out.push(b'\n');
            }
        }
        Bytes::from(out)
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

/// Encodes a control event (`live`, `reset`, `expired`, ...) whose data is `data`.
///
/// In SSE the frame carries `id:` when `id` is given, so that a client that reconnects
/// after it resumes from there.
pub fn control_frame(
    format: Format,
    event: &str,
    id: Option<Position>,
    data: &serde_json::Value,
) -> Bytes {
    match format {
        Format::Sse => {
            let mut s = String::with_capacity(96);
            if let Some(id) = id {
                s.push_str("id: ");
                s.push_str(&id.to_string());
                s.push('\n');
            }
            s.push_str("event: ");
            s.push_str(event);
            s.push_str("\ndata: ");
            s.push_str(&data.to_string());
            s.push_str("\n\n");
            Bytes::from(s)
        }
        Format::Ndjson => {
            let mut obj = serde_json::Map::new();
            obj.insert("event".into(), event.into());
            if let serde_json::Value::Object(fields) = data {
                obj.extend(fields.clone());
            }
            let mut line = serde_json::Value::Object(obj).to_string();
            line.push('\n');
            Bytes::from(line)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Option<Box<RawValue>> {
        Some(RawValue::from_string(s.to_string()).unwrap())
    }

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

    #[test]
    fn sse_frame_keeps_raw_numbers_and_omits_missing_parts() {
        let c = Change {
            position: Position { commit: 3, ord: 1 },
            table: "public.orders".into(),
            op: Op::Update,
            tenant: Some("acme".into()),
            public: false,
            pk: raw(r#"{"id": 1}"#),
            new: raw(r#"{"id": 1, "n": 123456789012345678901234567890.5}"#),
            old: raw(r#"{"id": 1, "n": 1}"#),
            changed: Some(vec!["n".into()]),
            committed_at: "2026-11-23T14:03:01.123456Z".into(),
            committed_epoch: 0.0,
            cache: Cache::default(),
        };
        let frame = std::str::from_utf8(c.frame(Format::Sse, Payload::Full))
            .unwrap()
            .to_string();
        assert!(
            frame.starts_with("id: 3.1\nevent: change\ndata: {"),
            "{frame}"
        );
        assert!(frame.ends_with("}\n\n"));
        assert!(frame.contains("123456789012345678901234567890.5"));
        let keys = std::str::from_utf8(c.frame(Format::Sse, Payload::Keys))
            .unwrap()
            .to_string();
        assert!(
            !keys.contains("\"new\"") && !keys.contains("\"old\""),
            "{keys}"
        );
        assert!(keys.contains(r#""changed":["n"]"#));
        let nd = std::str::from_utf8(c.frame(Format::Ndjson, Payload::Full))
            .unwrap()
            .to_string();
        assert!(
            nd.starts_with(r#"{"event":"change","position":"3.1""#),
            "{nd}"
        );
        assert!(nd.ends_with("}\n") && nd.matches('\n').count() == 1);
    }
}
