//! A connection beyond `server.max_connections`: `/healthz` and `/readyz` (GET or HEAD)
//! are still answered, so that an orchestrator does not restart a gateway for being full;
//! anything else gets a JSON 503 `too_many_connections`. Its head must arrive within
//! [`OVERFLOW_HEAD_TIMEOUT`]; when even the places for reading one are taken, the 503 is
//! written without reading. Over TLS, the handshake and the request must both come within
//! twice that, and the answer is hyper's (HTTP/2 or HTTP/1.1, as ALPN chose); without a
//! place, the connection is closed, since no answer can be written before a handshake.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::error::ApiError;
use super::limits::MAX_HEADERS;
use super::probes::{healthz, readyz};
use super::response::Body;
use super::state::AppState;
use crate::rawconn::{FIRST_READ, answer_and_close, answer_now, read_more};

/// How long a connection over the cap may take to send its request head.
pub(crate) const OVERFLOW_HEAD_TIMEOUT: Duration = Duration::from_secs(1);

/// Most bytes of head read from a connection over the cap.
const OVERFLOW_HEAD_BYTES: usize = 16 * 1024;

/// Answers a connection over the cap, reading its request head.
pub(crate) async fn overflow(mut socket: TcpStream, state: &AppState) {
    let deadline = tokio::time::Instant::now() + OVERFLOW_HEAD_TIMEOUT;
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
                    (Some("GET" | "HEAD"), "/healthz") => healthz(),
                    (Some("GET" | "HEAD"), "/readyz") => readyz(state),
                    _ => too_many_connections(state),
                };
                break (response, head_only);
            }
            Ok(httparse::Status::Partial) if buf.len() < OVERFLOW_HEAD_BYTES => continue,
            _ => break (too_many_connections(state), false),
        }
    };
    let write_timeout = state.connections.write_timeout;
    answer_and_close(&mut socket, response, head_only, write_timeout).await;
}

/// Answers a TLS connection over the cap: its handshake, then its requests as
/// [`overflow`] answers one, the connection closed after the first answer (HTTP/1.1) or
/// within twice [`OVERFLOW_HEAD_TIMEOUT`] in all.
pub(crate) async fn overflow_tls(
    socket: TcpStream,
    acceptor: TlsAcceptor,
    state: Arc<AppState>,
    shutdown: &CancellationToken,
) {
    let served = async {
        let handshaken =
            super::tls::handshake(socket, acceptor, &state, OVERFLOW_HEAD_TIMEOUT, shutdown).await;
        let Some((io, h2)) = handshaken else { return };
        let handler = {
            let state = Arc::clone(&state);
            move |req: Request<hyper::body::Incoming>| {
                let state = Arc::clone(&state);
                async move { overflow_answer(&state, &req) }
            }
        };
        let _ = if h2 {
            super::serve_connection_h2(io, handler, OVERFLOW_HEAD_TIMEOUT, None, shutdown).await
        } else {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .keep_alive(false)
                .max_buf_size(OVERFLOW_HEAD_BYTES.max(8192))
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(OVERFLOW_HEAD_TIMEOUT);
            super::serve_connection(&builder, io, handler, shutdown).await
        };
    };
    let _ = tokio::time::timeout(OVERFLOW_HEAD_TIMEOUT * 2, served).await;
}

/// What a request on a connection over the cap is answered.
fn overflow_answer<B>(state: &AppState, req: &Request<B>) -> Response<Body> {
    let path = req.uri().path();
    let method = req.method();
    let probe = *method == hyper::Method::GET || *method == hyper::Method::HEAD;
    match path {
        "/healthz" if probe => healthz(),
        "/readyz" if probe => readyz(state),
        _ => too_many_connections(state),
    }
}

/// Answers a connection over the cap when even the places for reading one are taken: the
/// 503 at once, without reading the request, and the socket closed.
pub(crate) fn refuse_now(socket: TcpStream) {
    let err = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "too_many_connections",
        "the gateway has as many connections open as server.max_connections allows; retry later",
    );
    answer_now(socket, err.into_response());
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
