//! HTTP/1 on a bare socket, for what is cheaper without hyper: writing a stream's head and
//! body (chunked for HTTP/1.1) straight to the socket, writing one complete response and
//! closing, and [`Prefixed`], the socket whose first bytes were already read (handed to
//! hyper with `server.write_timeout` on its writes).
//!
//! A stream lives for hours and mostly idles, so what it costs per connection decides how
//! many one box holds: hyper keeps an 8 KiB read buffer and an 8 KiB write buffer for the
//! whole life of every connection, this module nothing beyond the chunk being written.
//! It sits below [`crate::http`]: it receives what to write (an already-opened
//! [`EventStream`], its headers, a finished response) and never decides what to answer.

use std::future::Future as _;
use std::io::{self, Write as _};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::{HeaderMap, Response};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::session::EventStream;

/// First read size; the buffer grows only for larger heads.
pub(crate) const FIRST_READ: usize = 2048;

/// After an error response, how long (and how many bytes) the rest of the client's
/// request is read and discarded before the socket closes, so that closing with unread
/// data (a reset) does not destroy the response before the client reads it.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 256 * 1024;

/// Reads more of a request head into `buf`, growing it only when it is nearly full.
pub(crate) async fn read_more(socket: &mut TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    use tokio::io::AsyncReadExt as _;
    if buf.capacity() - buf.len() < 512 {
        buf.reserve(buf.capacity().max(FIRST_READ));
    }
    socket.read_buf(buf).await
}

/// Writes a complete response (within `write_timeout`), then closes the connection after
/// reading what the client still sends for a moment.
pub(crate) async fn answer_and_close<B>(
    socket: &mut TcpStream,
    response: Response<B>,
    head_only: bool,
    write_timeout: Duration,
) where
    B: hyper::body::Body<Data = Bytes>,
{
    let bytes = response_bytes(response, head_only);
    let write = async {
        socket.write_all(&bytes).await?;
        socket.shutdown().await
    };
    if !matches!(tokio::time::timeout(write_timeout, write).await, Ok(Ok(()))) {
        return;
    }
    let mut sink = [0u8; 4096];
    let mut discarded = 0;
    let deadline = tokio::time::Instant::now() + LINGER;
    while discarded < LINGER_BYTES {
        use tokio::io::AsyncReadExt as _;
        match tokio::time::timeout_at(deadline, socket.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => discarded += n,
            _ => return,
        }
    }
}

/// Writes a complete response at once, as far as the socket takes it without waiting,
/// and drops the connection: for when even reading the request costs too much.
pub(crate) fn answer_now<B>(socket: TcpStream, response: Response<B>)
where
    B: hyper::body::Body<Data = Bytes>,
{
    let _ = socket.try_write(&response_bytes(response, false));
}

/// A complete response (a JSON document) as bytes, with `connection: close`.
fn response_bytes<B>(response: Response<B>, head_only: bool) -> Vec<u8>
where
    B: hyper::body::Body<Data = Bytes>,
{
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

/// How a stream is written.
pub(crate) struct StreamWriter<'a> {
    /// The response headers but framing (`transfer-encoding` or `connection` is added).
    pub(crate) headers: &'a HeaderMap,
    /// Chunked (HTTP/1.1), or until the connection closes (HTTP/1.0).
    pub(crate) chunked: bool,
    /// `server.write_timeout`: a stream that accepts no bytes for it is closed.
    pub(crate) write_timeout: Duration,
    /// Where closes for a stalled client are counted.
    pub(crate) metrics: &'a Metrics,
}

impl StreamWriter<'_> {
    /// Writes the 200 head, then `events` until they end or the client closes or stalls.
    /// What the client sends meanwhile is ignored; its close ends the stream.
    pub(crate) async fn write(&self, mut socket: TcpStream, mut events: EventStream) {
        let mut text = String::from("HTTP/1.1 200 OK\r\n");
        for (name, value) in self.headers {
            push_header(&mut text, name.as_str(), value.as_bytes());
        }
        text.push_str(if self.chunked {
            "transfer-encoding: chunked\r\n\r\n"
        } else {
            "connection: close\r\n\r\n"
        });
        let timeout = self.write_timeout;
        {
            let head_bytes = text.into_bytes();
            let mut head_buf = &head_bytes[..];
            if !self.wrote(write_all(&socket, &mut head_buf, timeout, &mut events).await) {
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
                if self.chunked {
                    let mut last = &b"0\r\n\r\n"[..];
                    let _ = write_all(&socket, &mut last, timeout, &mut events).await;
                }
                let _ = socket.shutdown().await;
                return;
            };
            let written = if self.chunked {
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
            if !self.wrote(written) {
                return;
            }
        }
    }

    /// Whether a write completed; counts and logs a stream closed for a stalled client.
    fn wrote(&self, result: Result<(), WriteEnd>) -> bool {
        match result {
            Ok(()) => true,
            Err(WriteEnd::TimedOut) => {
                self.metrics.write_timeouts.inc();
                tracing::info!(
                    write_timeout = %humantime::format_duration(self.write_timeout),
                    "stream closed: its client accepted no bytes within server.write_timeout"
                );
                false
            }
            Err(WriteEnd::Interrupted | WriteEnd::Closed) => false,
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

/// Writes all of `buf`. Writes go straight to the socket while it takes them; only when it
/// is full does the wait begin, bounded by `timeout` without progress, and cut short by
/// shutdown or the token's expiry (the client is not reading, so the stream's own
/// `shutdown` or `expired` frame could not reach it anyway).
async fn write_all(
    socket: &TcpStream,
    buf: &mut impl Buf,
    timeout: Duration,
    events: &mut EventStream,
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
    write_timeout: Duration,
    /// Armed while a write waits for the socket: the write timeout, and shutdown, which
    /// must not wait out the grace for a client that stopped reading.
    stalled: Option<Stalled>,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
}

struct Stalled {
    timeout: Pin<Box<tokio::time::Sleep>>,
    shutdown: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl Prefixed {
    /// `socket`, with `prefix` read from it already; writes that stall for `write_timeout`
    /// fail (counted in `metrics`), and so do stalled writes on `shutdown`.
    pub(crate) fn new(
        prefix: Bytes,
        socket: TcpStream,
        write_timeout: Duration,
        shutdown: CancellationToken,
        metrics: Arc<Metrics>,
    ) -> Prefixed {
        Prefixed {
            prefix,
            socket,
            write_timeout,
            stalled: None,
            shutdown,
            metrics,
        }
    }

    /// The bytes read before hyper took the connection (those not yet replayed).
    pub(crate) fn prefix(&self) -> &[u8] {
        &self.prefix
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
