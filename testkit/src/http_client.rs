//! The tests' HTTP client over a raw socket: whole responses ([`get`], [`get_soon`],
//! [`request`], [`exchange`] for a request written by hand), the assertion on pgfeed's
//! JSON error ([`assert_error`]), and the connection [`crate::SseClient`] reads streams
//! on. Parsing is [`crate::wire`]'s, shared with the benchmark.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::SOON;
use crate::wire::{ResponseParser, parse_head, request_head};

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
    while conn.read_more().await?.is_some() {}
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(conn.parser.unread()).into_owned(),
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
    let mut all = vec![("Content-Length", "0")];
    all.extend_from_slice(headers);
    let what = format!("{method} {path}");
    let r = exchange(addr, &request_head(method, path, addr, &all), wait, &what).await;
    assert!(
        !r.headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")),
        "{what}: not a stream"
    );
    r
}

/// Sends `head` exactly as given (any request line and headers, such as a missing or
/// foreign `Host`, ending with the blank line) and reads the response until the server
/// closes, within `wait`; panics naming `what` otherwise. The body is as received.
pub async fn exchange(addr: SocketAddr, head: &str, wait: Duration, what: &str) -> Response {
    let exchange = async {
        let mut conn = TcpStream::connect(addr).await?;
        conn.write_all(head.as_bytes()).await?;
        let mut bytes = Vec::new();
        conn.read_to_end(&mut bytes).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&bytes).into_owned())
    };
    let text = tokio::time::timeout(wait, exchange)
        .await
        .unwrap_or_else(|_| panic!("{what}: no complete response within {wait:?}"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{what}: no response head: {text:?}"));
    let (status, headers) = parse_head(head);
    Response {
        status,
        headers,
        body: body.to_string(),
    }
}

/// An HTTP/1.1 connection read by hand: a socket and the [`ResponseParser`] it feeds.
pub(crate) struct RawConn {
    stream: TcpStream,
    /// The response so far.
    pub(crate) parser: ResponseParser,
    /// Read buffer, reused.
    scratch: Vec<u8>,
    /// The server closed the connection.
    eof: bool,
}

impl RawConn {
    /// Connects and sends the request.
    pub(crate) async fn open(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<RawConn> {
        let stream = TcpStream::connect(addr).await?;
        RawConn::send(stream, addr, method, path, headers).await
    }

    /// Sends the request on a connected `stream`.
    pub(crate) async fn send(
        mut stream: TcpStream,
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<RawConn> {
        stream
            .write_all(request_head(method, path, addr, headers).as_bytes())
            .await?;
        Ok(RawConn {
            stream,
            parser: ResponseParser::new(),
            scratch: Vec::new(),
            eof: false,
        })
    }

    /// Reads once and feeds the parser: the bytes of body decoded, or `None` at the end of
    /// the connection.
    async fn fill(&mut self) -> std::io::Result<Option<usize>> {
        self.scratch.clear();
        self.scratch.reserve(64 * 1024);
        if self.stream.read_buf(&mut self.scratch).await? == 0 {
            self.eof = true;
            return Ok(None);
        }
        self.parser.feed(&self.scratch).map(Some)
    }

    /// Reads until the response head has arrived.
    pub(crate) async fn read_head(&mut self) -> std::io::Result<(u16, Vec<(String, String)>)> {
        loop {
            if let Some(head) = self.parser.head() {
                return Ok((head.status, head.headers.clone()));
            }
            if self.fill().await?.is_none() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "no response head",
                ));
            }
        }
    }

    /// Reads more of the body: the bytes decoded (the last ones of the parser's unread
    /// body; possibly none, when only chunk framing arrived), or `None` once the body is
    /// complete or the connection ended.
    pub(crate) async fn read_more(&mut self) -> std::io::Result<Option<usize>> {
        if self.eof || self.parser.is_complete() {
            return Ok(None);
        }
        self.fill().await
    }
}
