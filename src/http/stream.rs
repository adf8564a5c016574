//! The `/v1` API: opening a stream (credentials, query, tables, admission, where it
//! resumes, SSE or NDJSON) and `/v1/position`. A stream is opened here whichever way it is
//! then written: as a hyper body on a kept-alive connection, or straight to the socket
//! ([`super::first_request`]); a client never receives a 200 that turns into an error.
//!
//! Requests are checked before any database work, but for two: a position to resume from
//! is compared with the journal's head, and a request naming a table or column the catalog
//! does not know waits for a catalog reload (one at a time, shared by the requests that
//! wait), for at most [`CATALOG_RELOAD_WAIT`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::header::{self, HeaderValue};
use hyper::{HeaderMap, Request, Response, StatusCode};

use super::error::{ApiError, unavailable};
use super::response::{Body, json_value};
use super::state::AppState;
use crate::auth::{Credentials, Principal};
use crate::change::Position;
use crate::filter::{Selection, SelectionError, StreamQuery};
use crate::frame::Format;
use crate::session::{EventStream, StreamParts};

/// Longest a request naming a table or column the catalog does not know waits for the
/// catalog's reload before it is refused.
pub(crate) const CATALOG_RELOAD_WAIT: Duration = Duration::from_secs(1);

/// Parses the query and authenticates the request.
fn authenticate<B>(
    state: &AppState,
    req: &Request<B>,
) -> Result<(StreamQuery, Principal), ApiError> {
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

/// `/v1/position`: the journal's head, for a client to subscribe from after it read its
/// state.
pub(crate) async fn position<B>(
    state: &AppState,
    req: &Request<B>,
) -> Result<Response<Body>, ApiError> {
    authenticate(state, req)?;
    let head = state.journal.head().await.map_err(unavailable)?;
    Ok(json_value(
        StatusCode::OK,
        &serde_json::json!({ "position": head.to_string() }),
    ))
}

/// `/v1/stream` on a connection hyper serves: the stream as a hyper body.
pub(crate) async fn stream<B>(
    state: &AppState,
    req: &Request<B>,
) -> Result<Response<Body>, ApiError> {
    let (events, format) = open_stream(state, req).await?;
    let body = futures_util::stream::unfold(events, |mut events| async move {
        let chunk = events.next_chunk().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), events))
    });
    let mut response = Response::new(StreamBody::new(body).boxed_unsync());
    stream_headers(format, response.headers_mut());
    Ok(response)
}

/// The response headers of a stream.
pub(crate) fn stream_headers(format: Format, headers: &mut HeaderMap) {
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
            let reload = state.catalog.reload_since(state.journal.db(), ticket);
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
        Some(value) => Some(last_event_id(value)?),
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
    let stream = EventStream::new(StreamParts {
        journal: state.journal.clone(),
        subscription,
        selection,
        format,
        resume_from,
        expires_at: principal.expires_at,
        settings: &state.stream,
        // A token of its own: every poll of a cancellation future locks its token's
        // node, and one node shared by all streams was a lock all runtime threads took
        // on every delivery.
        shutdown: state.shutdown.child_token(),
        metrics: Arc::clone(&state.metrics),
    });
    Ok((stream, format))
}

/// The `Last-Event-ID` header as a position.
fn last_event_id(value: &HeaderValue) -> Result<Position, ApiError> {
    let text = value.to_str().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "invalid `Last-Event-ID` header",
        )
    })?;
    text.trim().parse::<Position>().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("invalid `Last-Event-ID` header: {e}"),
        )
    })
}
