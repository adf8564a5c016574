//! The tests' streaming client: [`SseClient`] opens `/v1/stream` (or any path) on a raw
//! socket and reads [`Event`]s only when the test asks, so a test controls exactly when
//! it reads; [`SseClient::open_stalled`] is a client that stops reading. Frames are split
//! by [`crate::wire`], as in the benchmark.

use std::net::SocketAddr;
use std::time::Duration;

use crate::SOON;
use crate::http_client::RawConn;
use crate::wire::Field;

/// One SSE event (comments and `retry:` are kept apart).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// `id:` if present.
    pub id: Option<String>,
    /// `event:` (defaults to `message`).
    pub event: String,
    /// `data:` lines joined.
    pub data: String,
}

impl Event {
    /// `data` as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {}", self.data))
    }
}

/// A streaming client.
pub struct SseClient {
    conn: RawConn,
    /// Status of the response.
    pub status: u16,
    /// Response headers.
    pub headers: Vec<(String, String)>,
    /// Raw body received so far (for tests on framing).
    pub raw: String,
    /// The end of the body received, when it stops inside a UTF-8 character.
    partial_char: Vec<u8>,
    /// Comment lines seen (`: keepalive`).
    pub comments: usize,
    /// `retry:` values seen.
    pub retries: Vec<String>,
}

/// A frame's field as text.
fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).expect("utf-8 stream")
}

impl SseClient {
    /// Opens `path` and reads the response head.
    pub async fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> SseClient {
        let conn = RawConn::open(addr, "GET", path, headers)
            .await
            .expect("connect");
        SseClient::with_head(conn).await
    }

    /// Opens `path` on a socket whose receive buffer is about `recv_buffer` bytes and reads
    /// the response head, then nothing more until the test reads: a client that stalls,
    /// leaving the server's writes blocked once the socket's buffers are full.
    pub async fn open_stalled(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
        recv_buffer: u32,
    ) -> SseClient {
        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
        socket
            .set_recv_buffer_size(recv_buffer)
            .expect("setting the receive buffer");
        let stream = socket.connect(addr).await.expect("connect");
        let conn = RawConn::send(stream, addr, "GET", path, headers)
            .await
            .expect("sending");
        SseClient::with_head(conn).await
    }

    /// Reads the response head on `conn`.
    async fn with_head(mut conn: RawConn) -> SseClient {
        let (status, headers) = tokio::time::timeout(SOON, conn.read_head())
            .await
            .expect("response head in time")
            .expect("response head");
        let mut client = SseClient {
            conn,
            status,
            headers,
            raw: String::new(),
            partial_char: Vec::new(),
            comments: 0,
            retries: Vec::new(),
        };
        // Body bytes that came with the head.
        client.received(client.conn.parser.unread().len());
        client
    }

    /// Appends the last `n` bytes of body decoded to [`SseClient::raw`].
    fn received(&mut self, n: usize) {
        let unread = self.conn.parser.unread();
        self.partial_char
            .extend_from_slice(&unread[unread.len() - n..]);
        let valid = match std::str::from_utf8(&self.partial_char) {
            Ok(s) => s.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(e) => panic!("utf-8 stream: {e}"),
        };
        self.raw.push_str(text(&self.partial_char[..valid]));
        self.partial_char.drain(..valid);
    }

    /// The next event, or `None` if the stream ended. Panics after `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(event) = self.parse_one() {
                return Some(event);
            }
            let read = tokio::time::timeout_at(deadline, self.conn.read_more())
                .await
                .unwrap_or_else(|_| {
                    panic!("no event within {wait:?}; received so far: {:?}", self.raw)
                })
                .expect("reading the stream");
            match read {
                Some(n) => self.received(n),
                None => return None,
            }
        }
    }

    /// The next event, within [`SOON`].
    pub async fn next(&mut self) -> Option<Event> {
        self.next_within(SOON).await
    }

    /// The next event of kind `change`, skipping other control events; panics on `None`.
    pub async fn next_change(&mut self) -> serde_json::Value {
        loop {
            let e = self
                .next()
                .await
                .expect("stream ended while waiting for a change");
            if e.event == "change" {
                let data = e.json();
                assert_eq!(
                    e.id.as_deref(),
                    data["position"].as_str(),
                    "id: equals the position"
                );
                return data;
            }
        }
    }

    /// Reads until the `live` event and returns the changes before it.
    pub async fn until_live(&mut self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        loop {
            let e = self.next().await.expect("stream ended before `live`");
            match e.event.as_str() {
                "live" => return out,
                "change" => out.push(e.json()),
                other => panic!("unexpected event {other} before live"),
            }
        }
    }

    /// Asserts that no event arrives within `wait` (heartbeats aside).
    pub async fn assert_quiet(&mut self, wait: Duration) {
        self.assert_quiet_but(wait, &[]).await
    }

    /// Asserts that no event other than those of the kinds in `allowed` (such as `live`,
    /// which may come after the last replayed change) arrives within `wait`.
    pub async fn assert_quiet_but(&mut self, wait: Duration, allowed: &[&str]) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            while let Some(e) = self.parse_one() {
                assert!(
                    allowed.contains(&e.event.as_str()),
                    "unexpected event: {e:?}"
                );
            }
            match tokio::time::timeout_at(deadline, self.conn.read_more()).await {
                Err(_) => return,
                Ok(Ok(Some(n))) => self.received(n),
                Ok(Ok(None)) => return,
                Ok(Err(e)) => panic!("reading the stream: {e}"),
            }
        }
    }

    /// The next complete event received, counting the comments and `retry:` lines before
    /// it; frames without `data:` are not events.
    fn parse_one(&mut self) -> Option<Event> {
        while let Some(frame) = self.conn.parser.next_frame() {
            let mut event = Event {
                id: None,
                event: "message".into(),
                data: String::new(),
            };
            let mut has_data = false;
            for field in frame.fields() {
                match field {
                    Field::Comment(_) => self.comments += 1,
                    Field::Retry(v) => self.retries.push(text(v).to_string()),
                    Field::Id(v) => event.id = Some(text(v).to_string()),
                    Field::Event(v) => event.event = text(v).to_string(),
                    Field::Data(v) => {
                        if has_data {
                            event.data.push('\n');
                        }
                        event.data.push_str(text(v));
                        has_data = true;
                    }
                    Field::Other(_) => {}
                }
            }
            if has_data {
                return Some(event);
            }
        }
        None
    }
}
