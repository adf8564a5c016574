//! pgfeed's test kit, shared by the product's tests and the benchmark: a throwaway
//! PostgreSQL cluster per test binary, a fresh database per test, the gateway in-process on
//! port 0 or as a child process, and a small HTTP/SSE client over a raw socket (so tests
//! control exactly when they read).
//!
//! The cluster is [`pgfeed::cluster`]'s throwaway cluster (the local `initdb`/`pg_ctl`, as
//! the `postgres` user when run as root) unless `PGFEED_TEST_DATABASE_URL` points at an
//! existing server. Its watchdog stops and removes it when the test binary exits. If
//! neither works the tests fail with a message saying what to install: they never skip.
//! Only the tests that need a tool beyond Rust and PostgreSQL (Chromium, valgrind) skip
//! when it is missing, and not when CI asks for them all ([`require_tool`]).
//!
//! Where things are, one concern a file (re-exported here, so tests write `support::X`):
//! [`db`] the server and a database per test, [`roles`] login roles, [`gateway`] the
//! in-process gateway and what tests do with one, [`child`] the `pgfeed` binary (CLI and
//! `pgfeed serve`), [`proxy`] proxies in front of PostgreSQL, [`wait`] bounded waits,
//! [`tools`] external tools, [`docs`] the README, [`demo_process`] `pgfeed demo` and
//! [`workload`] randomized workloads against a model (these two used by their module
//! path); the HTTP/SSE client is below.

pub mod child;
pub mod db;
pub mod demo_process;
pub mod docs;
pub mod gateway;
pub mod proxy;
pub mod roles;
pub mod tools;
pub mod wait;
pub mod workload;

pub use child::*;
pub use db::*;
pub use docs::*;
pub use gateway::*;
pub use proxy::*;
pub use roles::*;
pub use tools::*;
pub use wait::*;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The HS256 secret every test gateway uses.
pub const SECRET: &str = "test-secret-0123456789abcdef";

/// Generous bound for anything that should happen "soon": catches hangs, not slowness.
pub const SOON: Duration = Duration::from_secs(20);

/// A complete HTTP response.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body text.
    pub body: String,
}

impl Response {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends a GET and reads the whole (non-streaming) response.
pub async fn get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Response> {
    let mut conn = RawConn::open(addr, "GET", path, headers).await?;
    let (status, headers) = conn.read_head().await?;
    let mut body = Vec::new();
    while let Some(chunk) = conn.read_body_chunk().await? {
        body.extend_from_slice(&chunk);
    }
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Asserts `r` is pgfeed's JSON error with `status`: `{"error": {"code", "message"}}`,
/// both non-empty strings and nothing else, and no stream frames. Returns (code, message).
#[track_caller]
pub fn assert_error(r: &Response, status: u16, what: &str) -> (String, String) {
    assert_eq!(r.status, status, "{what}: {r:?}");
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "{what}: {r:?}"
    );
    let body = r.json();
    let error = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("{what}: no error object: {body}"));
    assert_eq!(
        error.len(),
        2,
        "{what}: error has exactly code and message: {body}"
    );
    let field = |name: &str| {
        let value = error[name]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: {name} is a string: {body}"));
        assert!(!value.is_empty(), "{what}: empty {name}: {body}");
        value.to_string()
    };
    assert!(
        !r.body.contains("event:") && !r.body.contains("retry:"),
        "{what}: no stream frames: {body}"
    );
    (field("code"), field("message"))
}

/// The status code (0 when unreadable) and the headers (names lower-cased) of a response
/// head, without its final blank line.
pub fn parse_head(head: &str) -> (u16, Vec<(String, String)>) {
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers)
}

/// A plain GET, bounded by [`SOON`]: a request that wrongly started a stream would hang.
pub async fn get_soon(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Response {
    tokio::time::timeout(SOON, get(addr, path, headers))
        .await
        .unwrap_or_else(|_| {
            panic!("GET {path}: no complete response within {SOON:?} (a stream started?)")
        })
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// Any request with an empty body and `headers`, read until the server closes
/// (`Connection: close`) within `wait`. Not for streams: it asserts the response is not
/// chunked.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    wait: Duration,
) -> Response {
    let exchange = async {
        let mut conn = TcpStream::connect(addr).await?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n"
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        conn.write_all(head.as_bytes()).await?;
        let mut bytes = Vec::new();
        conn.read_to_end(&mut bytes).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&bytes).into_owned())
    };
    let text = tokio::time::timeout(wait, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no complete response within {wait:?}"))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{method} {path}: no response head: {text:?}"));
    let (status, headers) = parse_head(head);
    assert!(
        !headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")),
        "{method} {path}: not a stream"
    );
    Response {
        status,
        headers,
        body: body.to_string(),
    }
}

/// An HTTP/1.1 connection read by hand.
struct RawConn {
    stream: TcpStream,
    buf: Vec<u8>,
    chunked: bool,
    remaining: Option<usize>,
    done: bool,
}

impl RawConn {
    async fn open(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<RawConn> {
        let mut stream = TcpStream::connect(addr).await?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await?;
        Ok(RawConn {
            stream,
            buf: Vec::new(),
            chunked: false,
            remaining: None,
            done: false,
        })
    }

    async fn fill(&mut self) -> std::io::Result<bool> {
        self.buf.reserve(64 * 1024);
        let n = self.stream.read_buf(&mut self.buf).await?;
        Ok(n > 0)
    }

    async fn read_head(&mut self) -> std::io::Result<(u16, Vec<(String, String)>)> {
        let end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            if !self.fill().await? {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "no response head",
                ));
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end + 4);
        let (status, headers) = parse_head(&head);
        for (k, v) in &headers {
            if k == "transfer-encoding" && v.contains("chunked") {
                self.chunked = true;
            }
            if k == "content-length" {
                self.remaining = v.parse().ok();
            }
        }
        Ok((status, headers))
    }

    /// The next piece of body, or `None` at its end.
    async fn read_body_chunk(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        if self.done {
            return Ok(None);
        }
        if self.chunked {
            let line_end = loop {
                if let Some(i) = find(&self.buf, b"\r\n") {
                    break i;
                }
                if !self.fill().await? {
                    self.done = true;
                    return Ok(None);
                }
            };
            let size =
                usize::from_str_radix(String::from_utf8_lossy(&self.buf[..line_end]).trim(), 16)
                    .map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::InvalidData, "bad chunk size")
                    })?;
            while self.buf.len() < line_end + 2 + size + 2 {
                if !self.fill().await? {
                    self.done = true;
                    return Ok(None);
                }
            }
            let data = self.buf[line_end + 2..line_end + 2 + size].to_vec();
            self.buf.drain(..line_end + 2 + size + 2);
            if size == 0 {
                self.done = true;
                return Ok(None);
            }
            Ok(Some(data))
        } else if let Some(remaining) = self.remaining {
            while self.buf.len() < remaining {
                if !self.fill().await? {
                    break;
                }
            }
            self.done = true;
            Ok(Some(std::mem::take(&mut self.buf)))
        } else {
            if self.buf.is_empty() && !self.fill().await? {
                self.done = true;
                return Ok(None);
            }
            Ok(Some(std::mem::take(&mut self.buf)))
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

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
    /// Body bytes not yet parsed into events.
    text: String,
    /// Raw body received so far (for tests on framing).
    pub raw: String,
    /// Comment lines seen (`: keepalive`).
    pub comments: usize,
    /// `retry:` values seen.
    pub retries: Vec<String>,
}

impl SseClient {
    /// Opens `path` and reads the response head.
    pub async fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> SseClient {
        let mut conn = RawConn::open(addr, "GET", path, headers)
            .await
            .expect("connect");
        let (status, headers) = tokio::time::timeout(SOON, conn.read_head())
            .await
            .expect("response head in time")
            .expect("response head");
        SseClient {
            conn,
            status,
            headers,
            text: String::new(),
            raw: String::new(),
            comments: 0,
            retries: Vec::new(),
        }
    }

    /// The next event, or `None` if the stream ended. Panics after `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(event) = self.parse_one() {
                return Some(event);
            }
            let chunk = tokio::time::timeout_at(deadline, self.conn.read_body_chunk())
                .await
                .unwrap_or_else(|_| {
                    panic!("no event within {wait:?}; received so far: {:?}", self.raw)
                })
                .expect("reading the stream");
            match chunk {
                Some(bytes) => {
                    let s = String::from_utf8(bytes).expect("utf-8 stream");
                    self.raw.push_str(&s);
                    self.text.push_str(&s);
                }
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
            match tokio::time::timeout_at(deadline, self.conn.read_body_chunk()).await {
                Err(_) => return,
                Ok(Ok(Some(bytes))) => {
                    let s = String::from_utf8(bytes).unwrap();
                    self.raw.push_str(&s);
                    self.text.push_str(&s);
                }
                Ok(Ok(None)) => return,
                Ok(Err(e)) => panic!("reading the stream: {e}"),
            }
        }
    }

    fn parse_one(&mut self) -> Option<Event> {
        loop {
            let end = self.text.find("\n\n")?;
            let block: String = self.text[..end].to_string();
            self.text.drain(..end + 2);
            let mut event = Event {
                id: None,
                event: "message".into(),
                data: String::new(),
            };
            let mut has_data = false;
            for line in block.lines() {
                if line.starts_with(':') {
                    self.comments += 1;
                } else if let Some(v) = line.strip_prefix("retry: ") {
                    self.retries.push(v.to_string());
                } else if let Some(v) = line.strip_prefix("id: ") {
                    event.id = Some(v.to_string());
                } else if let Some(v) = line.strip_prefix("event: ") {
                    event.event = v.to_string();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    if has_data {
                        event.data.push('\n');
                    }
                    event.data.push_str(v);
                    has_data = true;
                }
            }
            if has_data {
                return Some(event);
            }
        }
    }
}

impl SseClient {
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
        let mut stream = socket.connect(addr).await.expect("connect");
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.expect("sending");
        let mut conn = RawConn {
            stream,
            buf: Vec::new(),
            chunked: false,
            remaining: None,
            done: false,
        };
        let (status, headers) = tokio::time::timeout(SOON, conn.read_head())
            .await
            .expect("response head in time")
            .expect("response head");
        SseClient {
            conn,
            status,
            headers,
            text: String::new(),
            raw: String::new(),
            comments: 0,
            retries: Vec::new(),
        }
    }
}
