//! Connections that open with `GET /v1/stream`, served on the socket itself.
//!
//! A stream lives for hours and mostly idles, so what it costs per connection decides how
//! many one box holds. hyper keeps an 8 KiB read buffer and an 8 KiB write buffer for the
//! whole life of every connection; here a stream request is read into a small buffer,
//! parsed with `httparse`, checked by the same code as every other request
//! ([`crate::http::open_stream`]), and its frames are written straight to the socket
//! (chunked for HTTP/1.1). The connection closes when the stream ends. Any other first
//! request, or anything unusual (a body, a head that does not parse), goes to hyper with
//! the bytes already read, so hyper stays the one HTTP implementation for everything else.

use std::future::Future as _;
use std::io::{self, Write as _};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::{Request, Response, Version};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use hyper::StatusCode;

use crate::http::{ApiError, AppState, Body};

/// Most headers a request may have (hyper's own limit): more is a JSON 431.
const MAX_HEADERS: usize = 100;

/// First read size; the buffer grows only for larger heads.
const FIRST_READ: usize = 2048;

/// After an error response, how long (and how many bytes) the rest of the client's
/// request is read and discarded before the socket closes, so that closing with unread
/// data (a reset) does not destroy the response before the client reads it.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);
const LINGER_BYTES: usize = 256 * 1024;

/// Serves `socket` if its first request is a stream request. Otherwise returns the
/// connection, with whatever was read, for hyper to serve. The whole head must arrive
/// within `server.header_timeout`, however slowly it trickles (else 408); a head over
/// 64 KiB or with more than [`MAX_HEADERS`] headers gets a JSON 431 (or 414 for a request
/// line that long).
pub(crate) async fn serve(
    mut socket: TcpStream,
    state: &Arc<AppState>,
    shutdown: &CancellationToken,
) -> Option<Prefixed> {
    let deadline = tokio::time::Instant::now() + state.connections.header_timeout;
    let mut buf = BytesMut::with_capacity(FIRST_READ);
    let head_len = loop {
        let read = tokio::select! {
            _ = shutdown.cancelled() => return None,
            read = tokio::time::timeout_at(deadline, read_more(&mut socket, &mut buf)) => read,
        };
        match read {
            Err(_) => {
                state.metrics.header_timeouts.inc();
                if !buf.is_empty() {
                    let err = ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "request_timeout",
                        format!(
                            "the request head did not arrive within {} (server.header_timeout)",
                            humantime::format_duration(state.connections.header_timeout)
                        ),
                    );
                    answer_and_close(&mut socket, state, err.into_response(), false).await;
                }
                return None;
            }
            Ok(Ok(0)) | Ok(Err(_)) if buf.is_empty() => return None,
            Ok(Err(_)) => return None,
            Ok(Ok(0)) => return Some(Prefixed::new(buf.freeze(), socket, state)),
            Ok(Ok(_)) => {}
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                if !is_stream_request(&parsed) {
                    return Some(Prefixed::new(buf.freeze(), socket, state));
                }
                break len;
            }
            Ok(httparse::Status::Partial) if buf.len() < crate::http::MAX_BUFFER => continue,
            Ok(httparse::Status::Partial) => {
                let err = if memchr::memchr(b'\n', &buf).is_none() {
                    ApiError::new(
                        StatusCode::URI_TOO_LONG,
                        "uri_too_long",
                        format!(
                            "the request line is longer than {} bytes",
                            crate::http::MAX_BUFFER
                        ),
                    )
                } else {
                    ApiError::new(
                        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        "headers_too_large",
                        format!(
                            "the request head is larger than {} bytes",
                            crate::http::MAX_BUFFER
                        ),
                    )
                };
                answer_and_close(&mut socket, state, err.into_response(), false).await;
                return None;
            }
            Err(httparse::Error::TooManyHeaders) => {
                let err = ApiError::new(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "headers_too_large",
                    format!("the request has more than {MAX_HEADERS} headers"),
                );
                answer_and_close(&mut socket, state, err.into_response(), false).await;
                return None;
            }
            // Malformed: hyper answers those.
            Err(_) => return Some(Prefixed::new(buf.freeze(), socket, state)),
        }
    };
    let Some(request) = to_request(&buf[..head_len]) else {
        return Some(Prefixed::new(buf.freeze(), socket, state));
    };
    // The head is parsed; nothing else on this connection is read, so free it now.
    drop(buf);
    stream(socket, state, request).await;
    None
}

/// A connection beyond `server.max_connections`: `/healthz` and `/readyz` (GET or HEAD)
/// are still answered, anything else gets a JSON 503 `too_many_connections`. Its head
/// must arrive within a second.
pub(crate) async fn overflow(mut socket: TcpStream, state: &AppState) {
    let deadline = tokio::time::Instant::now() + crate::http::OVERFLOW_HEAD_TIMEOUT;
    let mut buf = BytesMut::with_capacity(FIRST_READ);
    let (response, head_only) = loop {
        match tokio::time::timeout_at(deadline, read_more(&mut socket, &mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(Ok(_)) | Ok(Err(_)) if buf.is_empty() => return,
            _ => break (too_many_connections(state), false),
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let path = parsed.path.unwrap_or("");
                let path = path.split_once('?').map_or(path, |(p, _)| p);
                let head_only = parsed.method == Some("HEAD");
                let response = match (parsed.method, path) {
                    (Some("GET" | "HEAD"), "/healthz") => crate::http::healthz(),
                    (Some("GET" | "HEAD"), "/readyz") => crate::http::readyz(state),
                    _ => too_many_connections(state),
                };
                break (response, head_only);
            }
            Ok(httparse::Status::Partial) if buf.len() < 16 * 1024 => continue,
            _ => break (too_many_connections(state), false),
        }
    };
    answer_and_close(&mut socket, state, response, head_only).await;
}

/// A connection beyond `server.max_connections` when even the overflow is busy: the 503
/// is written at once, without reading the request, and the socket closed.
pub(crate) fn refuse_now(socket: TcpStream) {
    let state_free = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "too_many_connections",
        "the gateway has as many connections open as server.max_connections allows; retry later",
    );
    let bytes = response_bytes(state_free.into_response(), false);
    let _ = socket.try_write(&bytes);
}

fn too_many_connections(state: &AppState) -> Response<Body> {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "too_many_connections",
        format!(
            "the gateway has {} connections open (server.max_connections); retry later",
            state.connections.max
        ),
    )
    .into_response()
}

/// Writes a complete response (within `server.write_timeout`), then closes the
/// connection after reading what the client still sends for a moment.
async fn answer_and_close(
    socket: &mut TcpStream,
    state: &AppState,
    response: Response<Body>,
    head_only: bool,
) {
    let bytes = response_bytes(response, head_only);
    let write = async {
        socket.write_all(&bytes).await?;
        socket.shutdown().await
    };
    if !matches!(
        tokio::time::timeout(state.connections.write_timeout, write).await,
        Ok(Ok(()))
    ) {
        return;
    }
    let mut sink = [0u8; 4096];
    let mut discarded = 0;
    let deadline = tokio::time::Instant::now() + LINGER;
    while discarded < LINGER_BYTES {
        use tokio::io::AsyncReadExt;
        match tokio::time::timeout_at(deadline, socket.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => discarded += n,
            _ => return,
        }
    }
}

/// A complete response (a JSON document) as bytes, with `connection: close`.
fn response_bytes(response: Response<Body>, head_only: bool) -> Vec<u8> {
    use futures_util::FutureExt as _;
    let (parts, body) = response.into_parts();
    // The bodies here are complete JSON documents: collecting them never waits.
    let body = body
        .collect()
        .now_or_never()
        .and_then(Result::ok)
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let reason = parts.status.canonical_reason().unwrap_or("");
    let mut text = format!("HTTP/1.1 {} {reason}\r\n", parts.status.as_u16());
    for (name, value) in &parts.headers {
        push_header(&mut text, name.as_str(), value.as_bytes());
    }
    text.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    ));
    let mut bytes = text.into_bytes();
    if !head_only {
        bytes.extend_from_slice(&body);
    }
    bytes
}

async fn read_more(socket: &mut TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    use tokio::io::AsyncReadExt;
    if buf.capacity() - buf.len() < 512 {
        buf.reserve(buf.capacity().max(FIRST_READ));
    }
    socket.read_buf(buf).await
}

/// `GET /v1/stream` without a body: the only requests served here.
fn is_stream_request(req: &httparse::Request<'_, '_>) -> bool {
    let path = req.path.unwrap_or("");
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let has_body = req.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            || (h.name.eq_ignore_ascii_case("content-length") && h.value.iter().any(|b| *b != b'0'))
    });
    req.method == Some("GET") && path == "/v1/stream" && !has_body
}

/// Rebuilds the head as an `http::Request` for the shared checks.
fn to_request(head: &[u8]) -> Option<Request<()>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    parsed.parse(head).ok()?;
    let mut builder =
        Request::builder()
            .method("GET")
            .uri(parsed.path?)
            .version(if parsed.version == Some(0) {
                Version::HTTP_10
            } else {
                Version::HTTP_11
            });
    for h in parsed.headers.iter() {
        builder = builder.header(h.name, h.value);
    }
    builder.body(()).ok()
}

/// Runs the checks, then writes the stream or the error.
async fn stream(mut socket: TcpStream, state: &AppState, request: Request<()>) {
    let origin = crate::http::allowed_origin(state, &request);
    let opened = match crate::http::check_sizes(&request) {
        Ok(()) => Box::pin(crate::http::open_stream(state, &request)).await,
        Err(err) => Err(err),
    };
    let (mut events, format) = match opened {
        Ok(opened) => opened,
        Err(err) => {
            state.metrics.rejected(err.code);
            let mut response = err.into_response();
            crate::http::cors_headers(state, origin, response.headers_mut());
            answer_and_close(&mut socket, state, response, false).await;
            return;
        }
    };
    let chunked = request.version() == Version::HTTP_11;
    let mut head = Response::new(());
    crate::http::stream_headers(format, head.headers_mut());
    crate::http::cors_headers(state, origin, head.headers_mut());
    drop(request);
    let mut text = String::from("HTTP/1.1 200 OK\r\n");
    for (name, value) in head.headers() {
        push_header(&mut text, name.as_str(), value.as_bytes());
    }
    text.push_str(if chunked {
        "transfer-encoding: chunked\r\n\r\n"
    } else {
        "connection: close\r\n\r\n"
    });
    let timeout = state.connections.write_timeout;
    {
        let head_bytes = text.into_bytes();
        let mut head_buf = &head_bytes[..];
        if !wrote(
            state,
            write_all(&socket, &mut head_buf, timeout, &mut events).await,
        ) {
            return;
        }
    }
    let mut probe = [0u8; 64];
    loop {
        let chunk = tokio::select! {
            chunk = events.next_chunk() => chunk,
            // The client's half: its close ends the stream; anything it sends is ignored.
            readable = socket.readable() => {
                if readable.is_err() {
                    return;
                }
                match socket.try_read(&mut probe) {
                    Ok(0) => return,
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(_) => return,
                }
            }
        };
        let Some(chunk) = chunk else {
            if chunked {
                let mut last = &b"0\r\n\r\n"[..];
                let _ = write_all(&socket, &mut last, timeout, &mut events).await;
            }
            let _ = socket.shutdown().await;
            return;
        };
        let written = if chunked {
            // Size line, data and trailer go out in one vectored write.
            let mut size = [0u8; 20];
            let len = {
                let mut cursor = io::Cursor::new(&mut size[..]);
                let _ = write!(cursor, "{:x}\r\n", chunk.len());
                cursor.position() as usize
            };
            let mut framed = (&size[..len]).chain(chunk).chain(&b"\r\n"[..]);
            write_all(&socket, &mut framed, timeout, &mut events).await
        } else {
            let mut chunk = chunk;
            write_all(&socket, &mut chunk, timeout, &mut events).await
        };
        if !wrote(state, written) {
            return;
        }
    }
}

/// Why a write to a stream did not complete.
enum WriteEnd {
    /// The connection failed or closed.
    Closed,
    /// The client accepted no bytes for `server.write_timeout`.
    TimedOut,
    /// Shutdown or the token's expiry came while the client was not reading.
    Interrupted,
}

/// Whether a write completed; counts and logs a stream closed for a stalled client.
fn wrote(state: &AppState, result: Result<(), WriteEnd>) -> bool {
    match result {
        Ok(()) => true,
        Err(WriteEnd::TimedOut) => {
            state.metrics.write_timeouts.inc();
            tracing::info!(
                write_timeout = %humantime::format_duration(state.connections.write_timeout),
                "stream closed: its client accepted no bytes within server.write_timeout"
            );
            false
        }
        Err(WriteEnd::Interrupted | WriteEnd::Closed) => false,
    }
}

/// Writes all of `buf`. Writes go straight to the socket while it takes them; only when it
/// is full does the wait begin, bounded by `timeout` without progress, and cut short by
/// shutdown or the token's expiry (the client is not reading, so the stream's own
/// `shutdown` or `expired` frame could not reach it anyway).
async fn write_all(
    socket: &TcpStream,
    buf: &mut impl Buf,
    timeout: std::time::Duration,
    events: &mut crate::sse::EventStream,
) -> Result<(), WriteEnd> {
    while buf.has_remaining() {
        let mut slices = [io::IoSlice::new(&[]); 4];
        let n = buf.chunks_vectored(&mut slices);
        match socket.try_write_vectored(&slices[..n]) {
            Ok(0) => return Err(WriteEnd::Closed),
            Ok(written) => buf.advance(written),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tokio::select! {
                    writable = tokio::time::timeout(timeout, socket.writable()) => match writable {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return Err(WriteEnd::Closed),
                        Err(_) => return Err(WriteEnd::TimedOut),
                    },
                    () = events.interrupted() => return Err(WriteEnd::Interrupted),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(WriteEnd::Closed),
        }
    }
    Ok(())
}

fn push_header(text: &mut String, name: &str, value: &[u8]) {
    text.push_str(name);
    text.push_str(": ");
    text.push_str(&String::from_utf8_lossy(value));
    text.push_str("\r\n");
}

/// A socket whose first bytes were already read: they are replayed before the socket's.
/// Served by hyper, so writes carry `server.write_timeout` here: a write that makes no
/// progress for that long fails, which ends the connection (and any stream on it).
pub(crate) struct Prefixed {
    prefix: Bytes,
    socket: TcpStream,
    write_timeout: std::time::Duration,
    /// Armed while a write waits for the socket: the write timeout, and shutdown, which
    /// must not wait out the grace for a client that stopped reading.
    stalled: Option<Stalled>,
    shutdown: CancellationToken,
    metrics: Arc<crate::metrics::Metrics>,
}

struct Stalled {
    timeout: Pin<Box<tokio::time::Sleep>>,
    shutdown: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl Prefixed {
    fn new(prefix: Bytes, socket: TcpStream, state: &AppState) -> Prefixed {
        Prefixed {
            prefix,
            socket,
            write_timeout: state.connections.write_timeout,
            stalled: None,
            shutdown: state.shutdown.clone(),
            metrics: Arc::clone(&state.metrics),
        }
    }

    /// Passes a write's outcome through, failing it when the socket stayed full for the
    /// whole write timeout.
    fn deadline<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let timeout = self.write_timeout;
        let shutdown = &self.shutdown;
        let stalled = self.stalled.get_or_insert_with(|| Stalled {
            timeout: Box::pin(tokio::time::sleep(timeout)),
            shutdown: Box::pin(shutdown.clone().cancelled_owned()),
        });
        if stalled.shutdown.as_mut().poll(cx).is_ready() {
            self.stalled = None;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "shutting down; the client is not reading",
            )));
        }
        if stalled.timeout.as_mut().poll(cx).is_ready() {
            self.stalled = None;
            self.metrics.write_timeouts.inc();
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client accepted no bytes within server.write_timeout",
            )));
        }
        Poll::Pending
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.socket).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.socket).poll_write(cx, buf);
        self.deadline(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.socket).poll_write_vectored(cx, bufs);
        self.deadline(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.socket.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_shutdown(cx)
    }
}
