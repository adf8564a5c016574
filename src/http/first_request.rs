//! A connection's first request, read by hand: one that opens with `GET /v1/stream` is
//! served on the socket itself, any other (or anything unusual: a body, a head that does
//! not parse) goes to hyper with the bytes already read, so hyper stays the one HTTP
//! implementation for everything else.
//!
//! Why: a stream lives for hours and mostly idles, and hyper keeps 16 KiB of buffers for
//! the whole life of every connection. Here the head is read into a small buffer, parsed
//! with `httparse`, checked by the same code as every other request ([`super::limits`],
//! [`super::stream`], [`super::cors`]), and the stream is handed to the raw writer
//! ([`crate::rawconn`]), which writes its frames straight to the socket. The whole head
//! must arrive within `server.header_timeout`, however slowly it trickles (else 408); a
//! head over [`MAX_BUFFER`] bytes or with more than [`MAX_HEADERS`] headers gets a JSON 431
//! (or 414 for a request line that long).

use bytes::BytesMut;
use hyper::{HeaderMap, Request, StatusCode, Version};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::cors::{allowed_origin, cors_headers};
use super::error::ApiError;
use super::limits::{MAX_BUFFER, MAX_HEADERS, check_sizes, head_too_large, too_many_headers};
use super::state::AppState;
use super::stream::{open_stream, stream_headers};
use crate::rawconn::{FIRST_READ, Prefixed, StreamWriter, answer_and_close, read_more};

/// Serves `socket` if its first request is a stream request. Otherwise returns the
/// connection, with whatever was read, for hyper to serve.
pub(crate) async fn serve(
    mut socket: TcpStream,
    state: &AppState,
    shutdown: &CancellationToken,
) -> Option<Prefixed> {
    let header_timeout = state.connections.header_timeout;
    let write_timeout = state.connections.write_timeout;
    let deadline = tokio::time::Instant::now() + header_timeout;
    let mut buf = BytesMut::with_capacity(FIRST_READ);
    let to_hyper = |buf: BytesMut, socket| {
        Some(Prefixed::new(
            buf.freeze(),
            socket,
            write_timeout,
            state.shutdown.clone(),
            std::sync::Arc::clone(&state.metrics),
        ))
    };
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
                            humantime::format_duration(header_timeout)
                        ),
                    );
                    answer_and_close(&mut socket, err.into_response(), false, write_timeout).await;
                }
                return None;
            }
            Ok(Ok(0)) | Ok(Err(_)) if buf.is_empty() => return None,
            Ok(Err(_)) => return None,
            Ok(Ok(0)) => return to_hyper(buf, socket),
            Ok(Ok(_)) => {}
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        let refused = match parsed.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                if !is_stream_request(&parsed) {
                    return to_hyper(buf, socket);
                }
                break len;
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_BUFFER => continue,
            Ok(httparse::Status::Partial) => head_too_large(&buf),
            Err(httparse::Error::TooManyHeaders) => too_many_headers(),
            // Malformed: hyper answers those.
            Err(_) => return to_hyper(buf, socket),
        };
        answer_and_close(&mut socket, refused.into_response(), false, write_timeout).await;
        return None;
    };
    let Some(request) = to_request(&buf[..head_len]) else {
        return to_hyper(buf, socket);
    };
    // The head is parsed; nothing else on this connection is read, so free it now.
    drop(buf);
    stream(socket, state, request).await;
    None
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

/// Runs the checks, then has the raw writer write the stream, or writes the error.
async fn stream(mut socket: TcpStream, state: &AppState, request: Request<()>) {
    let write_timeout = state.connections.write_timeout;
    let origin = allowed_origin(&state.cors_origins, &request);
    let opened = match check_sizes(&request) {
        Ok(()) => Box::pin(open_stream(state, &request)).await,
        Err(err) => Err(err),
    };
    let (events, format) = match opened {
        Ok(opened) => opened,
        Err(err) => {
            state.metrics.rejected(err.code);
            let mut response = err.into_response();
            cors_headers(&state.cors_origins, origin, response.headers_mut());
            answer_and_close(&mut socket, response, false, write_timeout).await;
            return;
        }
    };
    let chunked = request.version() == Version::HTTP_11;
    drop(request);
    let mut headers = HeaderMap::new();
    stream_headers(format, &mut headers);
    cors_headers(&state.cors_origins, origin, &mut headers);
    let writer = StreamWriter {
        headers: &headers,
        chunked,
        write_timeout,
        metrics: &state.metrics,
    };
    writer.write(socket, events).await;
}
