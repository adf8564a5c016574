//! The HTTP server: accepting connections, routing, and graceful shutdown. Every error
//! leaves as one JSON shape, and URLs are never logged, since they may carry
//! `access_token`.
//!
//! Cleartext connections speak HTTP/1.1 (and HTTP/2 with prior knowledge when
//! `server.h2c` is set); TLS connections speak HTTP/2 or HTTP/1.1 as ALPN chose, both
//! served by hyper (a stream is then a hyper body, not written on the socket by hand).
//!
//! Where each part lives (imports go one way: down this list, then to [`crate::rawconn`],
//! which writes bytes and never calls back):
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | the accept loop, serving a connection with hyper, the route table |
//! | `first_request.rs` | a connection's first head, read by hand: `GET /v1/stream` is written on the socket itself |
//! | `h2.rs` | serving HTTP/2: the prior-knowledge preface, the stream cap, closing idle connections |
//! | `tls.rs` | TLS on the listener: the certificate and key, their reload, the handshake |
//! | `overflow.rs` | connections over `server.max_connections`: health probes answered, others 503 |
//! | `stream.rs` | `/v1/stream` (checks, resume position, format) and `/v1/position` |
//! | `probes.rs` | `/healthz`, `/readyz`, `/metrics` |
//! | `cors.rs` | allowed origins, CORS headers, preflight |
//! | `limits.rs` | request size limits and their 414/431 |
//! | `state.rs` | [`AppState`], what every handler shares |
//! | `connections.rs` | the connection cap, the open count, the deadlines |
//! | `error.rs` | [`ApiError`] and the one JSON error shape |
//! | `response.rs` | the body type and JSON responses |

mod connections;
mod cors;
mod error;
mod first_request;
mod h2;
mod limits;
mod overflow;
mod probes;
mod response;
mod state;
mod stream;
mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use connections::Connections;
pub use error::ApiError;
// The demo's page answers with the gateway's JSON error shape and responses.
#[cfg(feature = "demo")]
pub(crate) use error::error_response;
pub use limits::{MAX_HEADER_BYTES, MAX_QUERY_BYTES};
pub use response::Body;
pub(crate) use response::full;
#[cfg(feature = "demo")]
pub(crate) use response::json;
pub use state::AppState;
pub use tls::Tls;

use cors::{allowed_origin, cors_headers, preflight};
use h2::{is_h2_preface, serve_connection_h2};
use limits::{MAX_BUFFER, check_sizes};

/// Accepts connections until `shutdown`, serving each on `tracker`. Open connections are
/// asked to close gracefully; streams end themselves on the same token.
pub async fn run(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) {
    if let Some(tls) = &state.tls {
        tracker.spawn(Arc::clone(tls).watch(shutdown.clone()));
    }
    while let Some(socket) = accept(&listener, &shutdown, "gateway").await {
        let _ = socket.set_nodelay(true);
        let Some(slot) = state.connections.admit() else {
            state.metrics.connections_refused.inc();
            let acceptor = state.tls.as_ref().map(|tls| tls.acceptor());
            match (state.connections.overflow_slot(), acceptor) {
                (Some(permit), None) => {
                    let state = Arc::clone(&state);
                    tracker.spawn(async move {
                        overflow::overflow(socket, &state).await;
                        drop(permit);
                    });
                }
                (Some(permit), Some(acceptor)) => {
                    let state = Arc::clone(&state);
                    let shutdown = shutdown.clone();
                    tracker.spawn(async move {
                        overflow::overflow_tls(socket, acceptor, state, &shutdown).await;
                        drop(permit);
                    });
                }
                // Over TLS, no answer can be written without a handshake: closed.
                (None, Some(_)) => drop(socket),
                (None, None) => overflow::refuse_now(socket),
            }
            continue;
        };
        let state = Arc::clone(&state);
        let shutdown = shutdown.clone();
        // A task per connection, for as long as it is open: TLS and cleartext ones are
        // different tasks, so that neither is as large as the other's future.
        if let Some(tls) = &state.tls {
            let acceptor = tls.acceptor();
            tracker.spawn(async move {
                let _slot = slot;
                serve_tls(socket, acceptor, state, shutdown).await;
            });
            continue;
        }
        tracker.spawn(async move {
            let _slot = slot;
            // A connection that opens with GET /v1/stream is served on the socket itself;
            // any other goes to hyper with the bytes already read.
            if let Some(io) = first_request::serve(socket, &state, &shutdown).await {
                if state.h2c && is_h2_preface(io.prefix()) {
                    // Boxed: the HTTP/2 future would make every cleartext task larger.
                    Box::pin(serve_h2(io, state, shutdown)).await;
                } else {
                    serve_hyper(io, state, shutdown).await;
                }
            }
        });
    }
}

/// The next connection on `listener` (`server` names it in logs), or `None` on
/// `shutdown`. A failed accept (usually EMFILE) is logged and retried after a short pause
/// rather than in a spin.
pub(crate) async fn accept(
    listener: &TcpListener,
    shutdown: &CancellationToken,
    server: &'static str,
) -> Option<TcpStream> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok((socket, _peer)) => return Some(socket),
                Err(err) => {
                    tracing::warn!(cause = %err, server, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Serves one connection with `builder`'s settings, `handler` answering each request,
/// until it closes; on `shutdown`, the request in flight is finished and the connection
/// closed. The gateway and the demo page both serve through it.
pub(crate) async fn serve_connection<T, F, Fut>(
    builder: &http1::Builder,
    io: T,
    handler: F,
    shutdown: &CancellationToken,
) -> Result<(), hyper::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let service = service_fn(move |req| {
        // Not an async block awaiting the captured future, which would hold it twice
        // (rust-lang/rust#62958) for as long as hyper keeps the request's future.
        futures_util::FutureExt::map(handler(req), Ok::<_, Infallible>)
    });
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => result,
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    }
}

/// Serves a TLS connection: its handshake, then HTTP/2 or HTTP/1.1 as ALPN chose.
async fn serve_tls(
    socket: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<AppState>,
    shutdown: CancellationToken,
) {
    let timeout = state.connections.header_timeout;
    match tls::handshake(socket, acceptor, &state, timeout, &shutdown).await {
        Some((io, true)) => serve_h2(io, state, shutdown).await,
        Some((io, false)) => serve_hyper(io, state, shutdown).await,
        None => {}
    }
}

/// Serves a gateway connection with hyper's HTTP/2 until it closes or `shutdown`. Every
/// request (a stream too) is answered by [`route`], as over HTTP/1.1; on `shutdown` the
/// client is told to open no more streams (GOAWAY) and open streams end themselves.
async fn serve_h2<T>(io: T, state: Arc<AppState>, shutdown: CancellationToken)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let idle_timeout = state.connections.header_timeout;
    let stalls = h2::Stalls {
        write_timeout: state.connections.write_timeout,
        metrics: Arc::clone(&state.metrics),
    };
    let handler = move |req| {
        let state = Arc::clone(&state);
        async move { route(&state, req).await }
    };
    if let Err(err) = serve_connection_h2(io, handler, idle_timeout, Some(&stalls), &shutdown).await
    {
        tracing::debug!(cause = %err, "HTTP/2 connection ended with an error");
    }
}

/// Serves a gateway connection with hyper until it closes or `shutdown`.
async fn serve_hyper<T>(io: T, state: Arc<AppState>, shutdown: CancellationToken)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = http1::Builder::new();
    builder.max_buf_size(MAX_BUFFER).timer(TokioTimer::new());
    // hyper's timer runs once for the whole head, however slowly it trickles.
    builder.header_read_timeout(state.connections.header_timeout);
    let handler = move |req| {
        let state = Arc::clone(&state);
        async move { route(&state, req).await }
    };
    if let Err(err) = serve_connection(&builder, io, handler, &shutdown).await {
        tracing::debug!(cause = %err, "connection ended with an error");
    }
}

async fn route(state: &AppState, req: Request<Incoming>) -> Response<Body> {
    let origin = allowed_origin(&state.cors_origins, &req);
    let mut response = answer(state, &req, origin.is_some()).await;
    cors_headers(&state.cors_origins, origin, response.headers_mut());
    response
}

async fn answer(state: &AppState, req: &Request<Incoming>, cors_allowed: bool) -> Response<Body> {
    let path = req.uri().path();
    let known = matches!(
        path,
        "/v1/stream" | "/v1/position" | "/healthz" | "/readyz" | "/metrics"
    ) || api_document(path).is_some();
    if !known {
        return ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route").into_response();
    }
    if req.method() == Method::OPTIONS {
        return preflight(req, cors_allowed);
    }
    let head_allowed = req.method() == Method::HEAD && matches!(path, "/healthz" | "/readyz");
    if req.method() != Method::GET && !head_allowed {
        return ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "only GET (and HEAD on /healthz and /readyz) is allowed here",
        )
        .into_response();
    }
    if let Err(err) = check_sizes(req) {
        return err.into_response();
    }
    // The handlers' futures are boxed: hyper keeps the request future's allocation for
    // the whole life of the connection, and a stream's connection lives for hours, so
    // only a small future should stay behind.
    let result = match path {
        "/healthz" => Ok(probes::healthz()),
        "/readyz" => Ok(probes::readyz(state)),
        "/v1/position" => Box::pin(stream::position(state, req)).await,
        "/metrics" => Ok(Box::pin(probes::metrics(state)).await),
        _ => match api_document(path) {
            Some(text) => Ok(static_json(text)),
            None => Box::pin(stream::stream(state, req))
                .await
                .inspect_err(|err| state.metrics.rejected(err.code)),
        },
    };
    result.unwrap_or_else(ApiError::into_response)
}

/// The API description (`api/` in the repository) served at `path`, if any. The OpenAPI
/// document refers to the schemas by relative URLs, which resolve the same way beside it in
/// the repository and on the server.
fn api_document(path: &str) -> Option<&'static str> {
    match path {
        "/openapi.json" => Some(include_str!("../../api/openapi.json")),
        "/change.schema.json" => Some(include_str!("../../api/change.schema.json")),
        "/control.schema.json" => Some(include_str!("../../api/control.schema.json")),
        _ => None,
    }
}

/// A fixed JSON document.
fn static_json(text: &'static str) -> Response<Body> {
    let mut response = Response::new(full(Bytes::from_static(text.as_bytes())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
