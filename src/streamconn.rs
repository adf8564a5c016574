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

use crate::http::{AppState, Body};

/// Most headers a stream request may have on this path (more goes to hyper).
const MAX_HEADERS: usize = 64;

/// First read size; the buffer grows only for larger heads.
const FIRST_READ: usize = 2048;

/// Serves `socket` if its first request is a stream request. Otherwise returns the
/// connection, with whatever was read, for hyper to serve.
pub(crate) async fn serve(
    mut socket: TcpStream,
    state: &Arc<AppState>,
    shutdown: &CancellationToken,
) -> Option<Prefixed> {
    let mut buf = BytesMut::with_capacity(FIRST_READ);
    let head_len = loop {
        let read = tokio::select! {
            _ = shutdown.cancelled() => return None,
            read = tokio::time::timeout(crate::http::HEADER_READ_TIMEOUT, read_more(&mut socket, &mut buf)) => read,
        };
        match read {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) if buf.is_empty() => return None,
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Some(Prefixed::new(buf.freeze(), socket)),
            Ok(Ok(_)) => {}
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                if !is_stream_request(&parsed) {
                    return Some(Prefixed::new(buf.freeze(), socket));
                }
                break len;
            }
            Ok(httparse::Status::Partial) if buf.len() < crate::http::MAX_BUFFER => continue,
            // Malformed, too many headers, too large: hyper answers those.
            _ => return Some(Prefixed::new(buf.freeze(), socket)),
        }
    };
    let Some(request) = to_request(&buf[..head_len]) else {
        return Some(Prefixed::new(buf.freeze(), socket));
    };
    // The head is parsed; nothing else on this connection is read, so free it now.
    drop(buf);
    stream(socket, state, request).await;
    None
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
            let _ = write_response(&mut socket, response).await;
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
    if socket.write_all(text.as_bytes()).await.is_err() {
        return;
    }
    drop(text);
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
                let _ = socket.write_all(b"0\r\n\r\n").await;
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
            socket.write_all_buf(&mut framed).await
        } else {
            let mut chunk = chunk;
            socket.write_all_buf(&mut chunk).await
        };
        if written.is_err() {
            return;
        }
    }
}

fn push_header(text: &mut String, name: &str, value: &[u8]) {
    text.push_str(name);
    text.push_str(": ");
    text.push_str(&String::from_utf8_lossy(value));
    text.push_str("\r\n");
}

/// Writes a complete (error) response and closes the connection.
async fn write_response(socket: &mut TcpStream, response: Response<Body>) -> io::Result<()> {
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
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
    socket.write_all(text.as_bytes()).await?;
    socket.write_all(&body).await?;
    socket.shutdown().await
}

/// A socket whose first bytes were already read: they are replayed before the socket's.
pub(crate) struct Prefixed {
    prefix: Bytes,
    socket: TcpStream,
}

impl Prefixed {
    fn new(prefix: Bytes, socket: TcpStream) -> Prefixed {
        Prefixed { prefix, socket }
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
        Pin::new(&mut self.socket).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.socket).poll_write_vectored(cx, bufs)
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
