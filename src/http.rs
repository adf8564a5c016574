//! The HTTP server: accepting connections, routing, JSON errors, and graceful shutdown.
//!
//! Every error leaves through [`ApiError`] as `{"error":{"code","message"}}`, and a stream
//! only starts once every check has passed, so a client never receives a 200 that turns
//! into an error. Requests are checked (sizes, query, credentials, tables, limits) before
//! any database work, but for one: a request naming a table or column the catalog does not
//! know waits for a catalog reload (one at a time, shared by the requests that wait), for
//! at most [`CATALOG_RELOAD_WAIT`].
//! CORS is answered here for the configured origins. URLs are never logged, since they may
//! carry `access_token`.

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

use crate::auth::{AuthError, Authenticator, Credentials};
use crate::catalog::Catalog;
use crate::change::{Format, Position};
use crate::fanout::{Hub, Refused};
use crate::filter::{QueryError, Selection, SelectionError, StreamQuery};
use crate::journal::Journal;
use crate::listener::{NotReady, Readiness};
use crate::sse::{EventStream, StreamSettings};

/// Response body type: a full JSON document or an endless stream.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Most bytes of request head read. A connection's first head is read by
/// [`crate::streamconn`], which answers a larger one with a JSON 431 (or 414); on a
/// kept-alive connection's later requests, hyper cuts it off itself with a bare 431.
pub(crate) const MAX_BUFFER: usize = 64 * 1024;

/// Connections over `server.max_connections` whose request is still read (to answer
/// `/healthz` and `/readyz`, and give the others a JSON 503) at most at once; beyond,
/// the 503 is written without reading.
const OVERFLOW_SLOTS: usize = 16;

/// How long a connection over the cap may take to send its request head.
pub(crate) const OVERFLOW_HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// File descriptors kept aside from `server.max_connections`: the pool, the LISTEN
/// connection, stdio, the runtime's own, key files, and the overflow connections.
fn reserved_fds(pool_size: usize) -> u64 {
    pool_size as u64 + 32 + OVERFLOW_SLOTS as u64
}

/// Open connections, their cap and their deadlines.
pub struct Connections {
    /// `server.max_connections`, lowered to fit the open-file limit.
    pub max: usize,
    /// `server.header_timeout`: the whole request head must arrive within it.
    pub header_timeout: std::time::Duration,
    /// `server.write_timeout`: a stream that accepts no bytes for it is closed.
    pub write_timeout: std::time::Duration,
    open: std::sync::atomic::AtomicUsize,
    overflow: Arc<tokio::sync::Semaphore>,
}

impl Connections {
    /// Limits from `config`, with the cap lowered (and a warning logged) if the process's
    /// open-file soft limit cannot hold it.
    pub fn new(config: &crate::config::Config) -> Connections {
        let mut max = config.server.max_connections;
        if let Ok((soft, _hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
            let room = soft
                .saturating_sub(reserved_fds(config.database.pool_size))
                .max(1);
            if (max as u64) > room {
                tracing::warn!(
                    configured = max,
                    lowered_to = room,
                    open_file_limit = soft,
                    "server.max_connections lowered to fit the open-file limit (raise `ulimit -n` / LimitNOFILE)"
                );
                max = room as usize;
            }
        }
        Connections {
            max,
            header_timeout: config.server.header_timeout,
            write_timeout: config.server.write_timeout,
            open: std::sync::atomic::AtomicUsize::new(0),
            overflow: Arc::new(tokio::sync::Semaphore::new(OVERFLOW_SLOTS)),
        }
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A place for one more connection, unless `max` are open.
    fn admit(self: &Arc<Self>) -> Option<ConnectionSlot> {
        use std::sync::atomic::Ordering;
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectionSlot(Arc::clone(self)))
    }
}

/// A counted open connection.
struct ConnectionSlot(Arc<Connections>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Most bytes of request headers accepted; more is a JSON 431.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Longest a request naming a table or column the catalog does not know waits for the
/// catalog's reload before it is refused.
pub(crate) const CATALOG_RELOAD_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Most bytes of query string accepted; more is a JSON 414.
pub const MAX_QUERY_BYTES: usize = 8 * 1024;

/// What every request handler shares.
pub struct AppState {
    /// Live changes by tenant.
    pub hub: Arc<Hub>,
    /// Replay and head position.
    pub journal: Journal,
    /// Token verification.
    pub auth: Authenticator,
    /// Whether `tenant=` is accepted (`auth.mode = "none"`).
    pub tenant_param: bool,
    /// Watched tables and their columns.
    pub catalog: Arc<Catalog>,
    /// Origins allowed by CORS (`"*"` for any).
    pub cors_origins: Vec<String>,
    /// What `/metrics` reports.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Listener state for `/readyz`.
    pub readiness: Arc<Readiness>,
    /// Heartbeat and retry.
    pub stream: StreamSettings,
    /// Ends streams on shutdown.
    pub shutdown: CancellationToken,
    /// Open connections, their cap and deadlines.
    pub connections: Arc<Connections>,
}

/// An error as the client sees it.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    status: StatusCode,
    /// Stable machine-readable code.
    pub(crate) code: &'static str,
    /// Human-readable explanation, safe to show (no secrets).
    message: String,
}

impl ApiError {
    pub(crate) fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// The error as a complete response.
    pub(crate) fn into_response(self) -> Response<Body> {
        let body = serde_json::json!({ "error": { "code": self.code, "message": self.message } });
        let mut response = json(self.status, &body);
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            response.headers_mut().insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, OPTIONS"),
            );
        }
        if self.status == StatusCode::TOO_MANY_REQUESTS
            || self.status == StatusCode::SERVICE_UNAVAILABLE
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        if let AuthError::NoTables(_) = err {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "tables_claim_missing",
                err.to_string(),
            );
        }
        let code = match err {
            AuthError::Missing | AuthError::NoTenantHeader(_) => "unauthorized",
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

impl From<SelectionError> for ApiError {
    fn from(err: SelectionError) -> Self {
        match err {
            SelectionError::Forbidden(_) => {
                ApiError::new(StatusCode::FORBIDDEN, "forbidden", err.to_string())
            }
            _ => ApiError::new(StatusCode::BAD_REQUEST, "bad_request", err.to_string()),
        }
    }
}

impl From<Refused> for ApiError {
    fn from(err: Refused) -> Self {
        let (status, code) = match err {
            Refused::Full => (StatusCode::SERVICE_UNAVAILABLE, "too_many_streams"),
            Refused::TenantFull => (StatusCode::TOO_MANY_REQUESTS, "too_many_streams"),
            Refused::TooFast => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
        };
        ApiError::new(status, code, err.to_string())
    }
}

/// What `/readyz` and failed reads say when the pgfeed schema is gone.
const SCHEMA_MISSING: &str =
    "the pgfeed schema is missing from the database (was it uninstalled?); run `pgfeed install`";

fn unavailable(err: crate::journal::JournalError) -> ApiError {
    tracing::warn!(cause = %err, "reading the head position failed");
    let message = if err.schema_missing() {
        SCHEMA_MISSING
    } else {
        "the database is not reachable"
    };
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
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
        let Some(slot) = state.connections.admit() else {
            state.metrics.connections_refused.inc();
            match Arc::clone(&state.connections.overflow).try_acquire_owned() {
                Ok(permit) => {
                    let state = Arc::clone(&state);
                    tracker.spawn(async move {
                        crate::streamconn::overflow(socket, &state).await;
                        drop(permit);
                    });
                }
                Err(_) => crate::streamconn::refuse_now(socket),
            }
            continue;
        };
        let state = Arc::clone(&state);
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _slot = slot;
            // A connection that opens with GET /v1/stream is served on the socket itself;
            // any other goes to hyper with the bytes already read.
            if let Some(io) = crate::streamconn::serve(socket, &state, &shutdown).await {
                serve_hyper(io, state, shutdown).await;
            }
        });
    }
}

/// Serves a connection with hyper until it closes or `shutdown`.
pub(crate) async fn serve_hyper<T>(io: T, state: Arc<AppState>, shutdown: CancellationToken)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let header_timeout = state.connections.header_timeout;
    let service = service_fn(move |req| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(route(&state, req).await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .max_buf_size(MAX_BUFFER)
        .timer(hyper_util::rt::TokioTimer::new());
    // hyper's timer runs once for the whole head, however slowly it trickles.
    builder.header_read_timeout(header_timeout);
    let connection = builder.serve_connection(TokioIo::new(io), service);
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
}

/// Adds the CORS response headers for an allowed origin.
pub(crate) fn cors_headers(
    state: &AppState,
    origin: Option<HeaderValue>,
    headers: &mut hyper::HeaderMap,
) {
    if let Some(origin) = origin {
        // `*` allows any page to read, but never with the browser's credentials
        // (cookies): only origins listed by name get `Allow-Credentials`.
        let any = origin.as_bytes() == b"*";
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if !any {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }
    if !state.cors_origins.is_empty() {
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }
}

async fn route(state: &AppState, req: Request<Incoming>) -> Response<Body> {
    let origin = allowed_origin(state, &req);
    let mut response = answer(state, &req, origin.is_some()).await;
    cors_headers(state, origin, response.headers_mut());
    response
}

/// The `Access-Control-Allow-Origin` value for the request's `Origin`, if CORS allows it:
/// the origin itself when it is listed by name, a literal `*` (without credentials) when
/// only `"*"` allows it.
pub(crate) fn allowed_origin<B>(state: &AppState, req: &Request<B>) -> Option<HeaderValue> {
    let origin = req.headers().get(header::ORIGIN)?;
    let text = origin.to_str().ok()?;
    if state.cors_origins.iter().any(|o| o == text) {
        return Some(origin.clone());
    }
    state
        .cors_origins
        .iter()
        .any(|o| o == "*")
        .then(|| HeaderValue::from_static("*"))
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
        "/healthz" => Ok(healthz()),
        "/readyz" => Ok(readyz(state)),
        "/v1/position" => Box::pin(position(state, req)).await,
        "/metrics" => Ok(Box::pin(metrics(state)).await),
        _ => match api_document(path) {
            Some(text) => Ok(static_json(text)),
            None => Box::pin(stream(state, req))
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
        "/openapi.json" => Some(include_str!("../api/openapi.json")),
        "/change.schema.json" => Some(include_str!("../api/change.schema.json")),
        "/control.schema.json" => Some(include_str!("../api/control.schema.json")),
        _ => None,
    }
}

/// A fixed JSON document.
fn static_json(text: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())).boxed_unsync());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Answers a CORS preflight.
fn preflight(req: &Request<Incoming>, cors_allowed: bool) -> Response<Body> {
    if !cors_allowed {
        let message = if req.headers().contains_key(header::ORIGIN) {
            "this origin is not in cors.allowed_origins"
        } else {
            "OPTIONS is only answered for CORS preflight requests from allowed origins"
        };
        return ApiError::new(StatusCode::FORBIDDEN, "origin_not_allowed", message).into_response();
    }
    let mut response = Response::new(Full::new(Bytes::new()).boxed_unsync());
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, OPTIONS"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(
            "Authorization, Last-Event-ID, Accept, Cache-Control, Content-Type",
        ),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    response
}

/// Refuses oversized requests with a JSON error before any other work.
pub(crate) fn check_sizes<B>(req: &Request<B>) -> Result<(), ApiError> {
    let query = req.uri().query().map_or(0, str::len);
    if query > MAX_QUERY_BYTES {
        return Err(ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("the query string is longer than {MAX_QUERY_BYTES} bytes"),
        ));
    }
    let headers: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if headers > MAX_HEADER_BYTES {
        return Err(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("the request headers are larger than {MAX_HEADER_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// Prometheus text. Gauges are read at scrape time; the notification queue usage costs one
/// short query (skipped, keeping the last value, if the database does not answer).
async fn metrics(state: &AppState) -> Response<Body> {
    let m = &state.metrics;
    m.subscribers.set(state.hub.subscribers() as i64);
    m.connections.set(state.connections.open() as i64);
    m.tenant_channels.set(state.hub.channel_count() as i64);
    m.listener_ready.set(i64::from(state.readiness.is_ready()));
    if let Ok(rows) = state
        .journal
        .query("SELECT pg_notification_queue_usage()")
        .await
        && let Some(row) = rows.first()
    {
        m.notification_queue_usage.set(row.get::<_, f64>(0));
    }
    let mut response = Response::new(Full::new(Bytes::from(m.render())).boxed_unsync());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

/// `/healthz`: the process serves.
pub(crate) fn healthz() -> Response<Body> {
    json(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
}

/// `/readyz`: the listener is connected and caught up.
pub(crate) fn readyz(state: &AppState) -> Response<Body> {
    let (code, message) = match state.readiness.not_ready() {
        None => return json(StatusCode::OK, &serde_json::json!({ "status": "ready" })),
        Some(NotReady::Disconnected) => (
            "not_ready",
            "the listener is not connected to PostgreSQL or not caught up",
        ),
        Some(NotReady::SchemaMissing) => ("schema_missing", SCHEMA_MISSING),
        Some(NotReady::Failed) => (
            "not_ready",
            "an essential task of the gateway stopped; the process is exiting",
        ),
    };
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message).into_response()
}

/// Parses the query and authenticates the request.
fn authenticate<B>(
    state: &AppState,
    req: &Request<B>,
) -> Result<(StreamQuery, crate::auth::Principal), ApiError> {
    let query = StreamQuery::parse(req.uri().query().unwrap_or(""))?;
    if query.tenant.is_some() && !state.tenant_param {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "query parameter `tenant` is only accepted with auth.mode = \"none\"",
        ));
    }
    let principal = state.auth.authenticate_request(&Credentials {
        headers: Some(req.headers()),
        access_token: query.access_token.as_deref(),
        tenant: query.tenant.as_deref(),
    })?;
    Ok((query, principal))
}

async fn position(state: &AppState, req: &Request<Incoming>) -> Result<Response<Body>, ApiError> {
    authenticate(state, req)?;
    let head = state.journal.head().await.map_err(unavailable)?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "position": head.to_string() }),
    ))
}

async fn stream(state: &AppState, req: &Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let (body, format) = open_stream(state, req).await?;
    let mut response = Response::new(body.into_body());
    stream_headers(format, response.headers_mut());
    Ok(response)
}

/// The response headers of a stream.
pub(crate) fn stream_headers(format: Format, headers: &mut hyper::HeaderMap) {
    let content_type = match format {
        Format::Sse => "text/event-stream",
        Format::Ndjson => "application/x-ndjson",
    };
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tells nginx-style proxies not to buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
}

/// Checks a stream request and registers its subscriber: everything but writing.
pub(crate) async fn open_stream<B>(
    state: &AppState,
    req: &Request<B>,
) -> Result<(EventStream, Format), ApiError> {
    let (query, principal) = authenticate(state, req)?;
    let ticket = state.catalog.ticket();
    let selection = match Selection::new(&principal, &query, &state.catalog.tables()) {
        // The table may have been watched, or the column added, a moment ago: the
        // catalog learns of it from the doorbell or its periodic reload, which may not
        // have landed yet. Ask the database once before refusing.
        // Bounded: while the database does not answer, the request is refused as the
        // catalog stands rather than left waiting.
        Err(SelectionError::UnknownTable(_) | SelectionError::UnknownColumn { .. }) => {
            let reload = state.catalog.reload_since(&state.journal, ticket);
            match tokio::time::timeout(CATALOG_RELOAD_WAIT, reload).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::warn!(cause = %err, "reloading the catalog for a request failed")
                }
                Err(_) => tracing::debug!("the catalog reload for a request took too long"),
            }
            Selection::new(&principal, &query, &state.catalog.tables())?
        }
        other => other?,
    };
    // Registered before the response starts: a change committed after the client has the
    // headers is in this receiver or, if older, in the replay. Admission limits are
    // checked here, before any database work.
    let subscription = state.hub.subscribe(&selection.tenant)?;
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
    let stream = EventStream::new(
        state.journal.clone(),
        subscription,
        selection,
        format,
        resume_from,
        principal.expires_at,
        &state.stream,
        // A token of its own: every poll of a cancellation future locks its token's
        // node, and one node shared by all streams was a lock all runtime threads took
        // on every delivery.
        state.shutdown.child_token(),
        Arc::clone(&state.metrics),
    );
    Ok((stream, format))
}
