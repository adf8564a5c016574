//! What goes on the wire of a stream: Server-Sent Events and NDJSON frames for changes
//! (encoded at most once per format and payload, then shared by every subscriber), for
//! control events (`live`, `reset`, `shutdown`, `expired`), heartbeats and `retry:`, and
//! the [`Chunk`] that gathers ready frames into one write.
//!
//! This module only encodes: it never decides who receives a frame (that is
//! [`crate::filter`] and [`crate::session`]) nor writes it (that is [`crate::http`] and
//! [`crate::rawconn`]).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::change::{Change, Payload, Position};

/// The wire format of a stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// `text/event-stream`.
    #[default]
    Sse,
    /// `application/x-ndjson`: one JSON object per line.
    Ndjson,
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
    /// The encoded frame for this change, built once per (format, payload) and shared.
    pub fn frame(&self, format: Format, payload: Payload) -> &Bytes {
        let slot = match (format, payload) {
            (Format::Sse, Payload::Full) => 0,
            (Format::Sse, Payload::Keys) => 1,
            (Format::Ndjson, Payload::Full) => 2,
            (Format::Ndjson, Payload::Keys) => 3,
        };
        self.cache.frames[slot].get_or_init(|| encode(self, format, payload))
    }
}

fn encode(change: &Change, format: Format, payload: Payload) -> Bytes {
    let full = payload == Payload::Full;
    let data = EventData {
        event: (format == Format::Ndjson).then_some("change"),
        position: change.position.to_string(),
        table: &change.table,
        op: change.op.as_str(),
        tenant: change.tenant.as_deref(),
        pk: change.pk.as_deref(),
        new: change.new.as_deref().filter(|_| full),
        old: change.old.as_deref().filter(|_| full),
        changed: change.changed.as_deref(),
        committed_at: &change.committed_at,
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

/// A control event of a stream, as `control.schema.json` describes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// The replay is done (or there was none): what follows is live.
    Live,
    /// The subscriber's position is not in the journal (the reason says why): refetch,
    /// then continue from the position given.
    Reset(&'static str),
    /// The server is shutting down; reconnect.
    Shutdown,
    /// The token expired; reconnect with a fresh one.
    Expired,
}

/// Encodes a control event at `position`. It carries `id:` (the position) so that an
/// EventSource that has seen no change yet still resumes from there when it reconnects:
/// browsers send Last-Event-ID only after some event had an id.
pub fn control(format: Format, event: Control, position: Position) -> Bytes {
    let at = position.to_string();
    let (name, data) = match event {
        Control::Live => ("live", serde_json::json!({ "position": at })),
        Control::Reset(reason) => (
            "reset",
            serde_json::json!({ "reason": reason, "position": at }),
        ),
        Control::Shutdown => (
            "shutdown",
            serde_json::json!({ "reason": "server shutting down; reconnect", "position": at }),
        ),
        Control::Expired => (
            "expired",
            serde_json::json!({ "reason": "token expired; reconnect with a fresh token", "position": at }),
        ),
    };
    control_frame(format, name, Some(position), &data)
}

/// Encodes a control event (`live`, `reset`, `expired`, ...) whose data is `data`.
///
/// In SSE the frame carries `id:` when `id` is given, so that a client that reconnects
/// after it resumes from there.
fn control_frame(
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

/// An idle-stream heartbeat: an SSE comment, or an NDJSON line clients can skip.
pub fn keepalive(format: Format) -> Bytes {
    match format {
        Format::Sse => Bytes::from_static(b": keepalive\n\n"),
        Format::Ndjson => Bytes::from_static(b"{\"event\":\"keepalive\"}\n"),
    }
}

/// The reconnect delay a stream announces first: SSE's `retry:` field; NDJSON has none.
pub fn retry(format: Format, retry: Duration) -> Option<Bytes> {
    (format == Format::Sse).then(|| Bytes::from(format!("retry: {}\n\n", retry.as_millis())))
}

/// Frames gathered for one write. A lone frame is the change's own shared `Bytes` (no copy,
/// no allocation: with many tenants most writes carry one change); a second frame starts
/// a buffer holding both.
#[derive(Default)]
pub(crate) enum Chunk {
    /// Nothing gathered yet.
    #[default]
    Empty,
    /// One frame, shared.
    One(Bytes),
    /// Several frames, copied together.
    Many(BytesMut),
}

impl Chunk {
    /// Appends `frame`.
    pub(crate) fn push(&mut self, frame: &Bytes) {
        match self {
            Chunk::Empty => *self = Chunk::One(frame.clone()),
            Chunk::One(first) => {
                let mut buf = BytesMut::with_capacity((first.len() + frame.len()) * 2);
                buf.extend_from_slice(first);
                buf.extend_from_slice(frame);
                *self = Chunk::Many(buf);
            }
            Chunk::Many(buf) => buf.extend_from_slice(frame),
        }
    }

    /// Bytes gathered so far.
    pub(crate) fn len(&self) -> usize {
        match self {
            Chunk::Empty => 0,
            Chunk::One(frame) => frame.len(),
            Chunk::Many(buf) => buf.len(),
        }
    }

    /// The bytes to write, `None` when nothing was gathered.
    pub(crate) fn finish(self) -> Option<Bytes> {
        match self {
            Chunk::Empty => None,
            Chunk::One(frame) => Some(frame),
            Chunk::Many(buf) => Some(buf.freeze()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Op;

    fn raw(s: &str) -> Option<Box<RawValue>> {
        Some(RawValue::from_string(s.to_string()).unwrap())
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
            cache: crate::change::Cache::default(),
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

    #[test]
    fn control_frames_carry_the_position_in_sse_and_the_event_in_ndjson() {
        let at = Position { commit: 7, ord: 2 };
        assert_eq!(
            &control(Format::Sse, Control::Live, at)[..],
            b"id: 7.2\nevent: live\ndata: {\"position\":\"7.2\"}\n\n"
        );
        assert_eq!(
            &control(Format::Ndjson, Control::Live, at)[..],
            b"{\"event\":\"live\",\"position\":\"7.2\"}\n"
        );
        let reset = control(Format::Ndjson, Control::Reset("gone"), at);
        assert_eq!(
            &reset[..],
            b"{\"event\":\"reset\",\"position\":\"7.2\",\"reason\":\"gone\"}\n"
        );
        assert_eq!(
            retry(Format::Sse, Duration::from_millis(1500)).as_deref(),
            Some(&b"retry: 1500\n\n"[..])
        );
        assert_eq!(retry(Format::Ndjson, Duration::from_secs(1)), None);
    }

    #[test]
    fn a_lone_frame_is_shared_and_several_are_joined() {
        let a = Bytes::from_static(b"a\n\n");
        let mut chunk = Chunk::default();
        assert!(Chunk::default().finish().is_none());
        chunk.push(&a);
        let one = match &chunk {
            Chunk::One(b) => b.as_ptr(),
            _ => panic!("one frame is kept as it is"),
        };
        assert_eq!(one, a.as_ptr());
        chunk.push(&Bytes::from_static(b"b\n\n"));
        assert_eq!(chunk.len(), 6);
        assert_eq!(&chunk.finish().unwrap()[..], b"a\n\nb\n\n");
    }
}
