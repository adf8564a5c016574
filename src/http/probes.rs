//! What operators and orchestrators poll: `/healthz` (the process serves), `/readyz` (the
//! listener is connected and caught up) and `/metrics` (Prometheus text). `/healthz` and
//! `/readyz` are answered even to a connection over the cap ([`super::overflow`]).

use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use super::error::{ApiError, SCHEMA_MISSING};
use super::response::{Body, full, json_value};
use super::state::AppState;
use crate::listener::NotReady;

/// `/healthz`: the process serves.
pub(crate) fn healthz() -> Response<Body> {
    json_value(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
}

/// `/readyz`: the listener is connected and caught up.
pub(crate) fn readyz(state: &AppState) -> Response<Body> {
    let (code, message) = match state.readiness.not_ready() {
        None => return json_value(StatusCode::OK, &serde_json::json!({ "status": "ready" })),
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

/// Prometheus text. Gauges are read at scrape time; the notification queue usage costs one
/// short query (skipped, keeping the last value, if the database does not answer).
pub(crate) async fn metrics(state: &AppState) -> Response<Body> {
    let m = &state.metrics;
    m.subscribers.set(state.hub.subscribers() as i64);
    m.connections.set(state.connections.open() as i64);
    m.tenant_channels.set(state.hub.channel_count() as i64);
    m.listener_ready.set(i64::from(state.readiness.is_ready()));
    // Skipped, keeping the last value, if the database does not answer.
    let _ = m.sample_notification_queue(state.journal.db()).await;
    let mut response = Response::new(full(m.render()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}
