//! The HTTP server: accepting connections, routing, JSON errors, and graceful shutdown.
//!
//! Every error leaves through [`ApiError`] as `{"error":{"code","message"}}`, and a stream
//! only starts once every check has passed, so a client never receives a 200 that turns
//! into an error. Requests are checked (query, token, tables) before any database work.
//! URLs are never logged, since they may carry `access_token`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthError, Authenticator};
use crate::change::{Format, Position};
use crate::fanout::Hub;
use crate::filter::{Forbidden, QueryError, Selection, StreamQuery};
use crate::journal::Journal;
use crate::listener::Readiness;
use crate::sse::{EventStream, StreamSettings};

/// Response body type: a full JSON document or an endless stream.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Most bytes of request head hyper buffers; larger heads are refused (431).
const MAX_HEAD: usize = 16 * 1024;

/// What every request handler shares.
pub struct AppState {
    /// Live changes by tenant.
    pub hub: Arc<Hub>,
    /// Replay and head position.
    pub journal: Journal,
    /// Token verification.
    pub auth: Authenticator,
    /// Listener state for `/readyz`.
    pub readiness: Arc<Readiness>,
    /// Heartbeat and retry.
    pub stream: StreamSettings,
    /// Ends streams on shutdown.
    pub shutdown: CancellationToken,
}

/// An error as the client sees it.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    status: StatusCode,
    /// Stable machine-readable code.
    code: &'static str,
    /// Human-readable explanation, safe to show (no secrets).
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn into_response(self) -> Response<Body> {
        let body = serde_json::json!({ "error": { "code": self.code, "message": self.message } });
        let mut response = json(self.status, &body);
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET"));
        }
        response
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        let code = match err {
            AuthError::Missing => "unauthorized",
            AuthError::Expired => "token_expired",
            _ => "invalid_token",
        };
        ApiError::new(StatusCode::UNAUTHORIZED, code, err.to_string())
    }
}

impl From<QueryError> for ApiError {
    fn from(err: QueryError) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", err.to_string())
    }
}

impl From<Forbidden> for ApiError {
    fn from(err: Forbidden) -> Self {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", err.to_string())
    }
}

fn unavailable(err: crate::journal::JournalError) -> ApiError {
    tracing::warn!(cause = %err, "reading the head position failed");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the database is not reachable",
    )
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Accepts connections until `shutdown`, serving each on `tracker`. Open connections are
/// asked to close gracefully; streams end themselves on the same token.
pub async fn run(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) {
    loop {
        let (socket, _peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // Usually EMFILE: back off briefly rather than spin.
                    tracing::warn!(cause = %err, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = socket.set_nodelay(true);
        let state = Arc::clone(&state);
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let service = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(route(&state, req).await) }
            });
            let mut builder = http1::Builder::new();
            builder
                .max_buf_size(MAX_HEAD.max(8192))
                .timer(hyper_util::rt::TokioTimer::new());
            builder.header_read_timeout(std::time::Duration::from_secs(30));
            let connection = builder.serve_connection(TokioIo::new(socket), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = result {
                tracing::debug!(cause = %err, "connection ended with an error");
            }
        });
    }
}

async fn route(state: &AppState, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    let known = matches!(path, "/v1/stream" | "/v1/position" | "/healthz" | "/readyz");
    if !known {
        return ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route").into_response();
    }
    if req.method() != Method::GET {
        return ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "only GET is allowed here",
        )
        .into_response();
    }
    let result = match path {
        "/healthz" => Ok(json(StatusCode::OK, &serde_json::json!({ "status": "ok" }))),
        "/readyz" => Ok(readyz(state)),
        "/v1/position" => position(state, &req).await,
        _ => stream(state, &req).await,
    };
    result.unwrap_or_else(ApiError::into_response)
}

fn readyz(state: &AppState) -> Response<Body> {
    if state.readiness.is_ready() {
        json(StatusCode::OK, &serde_json::json!({ "status": "ready" }))
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the listener is not connected to PostgreSQL or not caught up",
        )
        .into_response()
    }
}

/// The token from `Authorization: Bearer`, else the `access_token` query parameter.
fn token<'a>(req: &'a Request<Incoming>, query: &'a StreamQuery) -> Result<&'a str, AuthError> {
    if let Some(value) = req.headers().get(header::AUTHORIZATION) {
        let value = value
            .to_str()
            .map_err(|_| AuthError::Invalid("malformed Authorization header"))?;
        let (scheme, token) = value
            .split_once(' ')
            .ok_or(AuthError::Invalid("Authorization must be `Bearer <token>`"))?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Invalid("Authorization must be `Bearer <token>`"));
        }
        return Ok(token.trim());
    }
    query.access_token.as_deref().ok_or(AuthError::Missing)
}

async fn position(state: &AppState, req: &Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let query = StreamQuery::parse(req.uri().query().unwrap_or(""))?;
    state.auth.authenticate(token(req, &query)?)?;
    let head = state.journal.head().await.map_err(unavailable)?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "position": head.to_string() }),
    ))
}

async fn stream(state: &AppState, req: &Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let query = StreamQuery::parse(req.uri().query().unwrap_or(""))?;
    let principal = state.auth.authenticate(token(req, &query)?)?;
    let selection = Selection::new(&principal, &query)?;
    // EventSource sends Last-Event-ID on reconnect with the original URL, so the header
    // (newer) wins over the query parameter (where the client started).
    let resume_from = match req.headers().get("last-event-id") {
        Some(value) => {
            let text = value.to_str().map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "invalid `Last-Event-ID` header",
                )
            })?;
            Some(text.trim().parse::<Position>().map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("invalid `Last-Event-ID` header: {e}"),
                )
            })?)
        }
        None => query.last_event_id,
    };
    if let Some(from) = resume_from {
        // Positions come from this database, so one beyond its head is from elsewhere
        // (another database, or a schema that was reinstalled): refuse it rather than
        // wait silently for the numbers to catch up.
        let head = state.journal.head().await.map_err(unavailable)?;
        if from > head {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "unknown_position",
                format!("position {from} is not from this database (its newest is {head})"),
            ));
        }
    }
    let format = match req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
    {
        Some(accept) if accept.contains("application/x-ndjson") => Format::Ndjson,
        _ => Format::Sse,
    };
    // Registered before the response starts: a change committed after the client has the
    // headers is in this receiver or, if older, in the replay.
    let subscription = state.hub.subscribe(&selection.tenant);
    tracing::debug!(resume = ?resume_from.map(|p| p.to_string()), "stream opened");
    let body = EventStream::new(
        state.journal.clone(),
        subscription,
        selection,
        format,
        resume_from,
        principal.expires_at,
        &state.stream,
        state.shutdown.clone(),
    )
    .into_body();
    let content_type = match format {
        Format::Sse => "text/event-stream",
        Format::Ndjson => "application/x-ndjson",
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tells nginx-style proxies not to buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}
