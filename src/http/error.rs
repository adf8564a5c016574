//! The one JSON error shape, `{"error":{"code","message"}}`, and [`ApiError`], through which
//! every refusal of the gateway leaves: its status, its stable code, the headers its
//! status calls for (`WWW-Authenticate`, `Allow`, `Retry-After`), and how the errors of
//! the modules below (credentials, query, selection, admission, database) map to it.
//! Messages are safe to show: never a token, a secret or a row value.

use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use super::response::{Body, json_value};
use crate::admission::Refused;
use crate::auth::AuthError;
use crate::filter::{QueryError, SelectionError};
use crate::journal::JournalError;

/// An error response without further headers: the shape every error has, also the demo
/// page's.
pub(crate) fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_value(
        status,
        &serde_json::json!({ "error": { "code": code, "message": message } }),
    )
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
        let mut response = error_response(self.status, self.code, &self.message);
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
pub(crate) const SCHEMA_MISSING: &str =
    "the pgfeed schema is missing from the database (was it uninstalled?); run `pgfeed install`";

/// A failed read of the journal's head: 503, naming a missing schema as such.
pub(crate) fn unavailable(err: JournalError) -> ApiError {
    tracing::warn!(cause = %err, "reading the head position failed");
    let message = if err.schema_missing() {
        SCHEMA_MISSING
    } else {
        "the database is not reachable"
    };
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
}
