//! CORS for the configured origins (`cors.allowed_origins`): which origin a response
//! allows, its headers, and the answer to a preflight. An origin listed by name may send
//! the browser's credentials; `"*"` allows any page to read, never with credentials.

use hyper::header::{self, HeaderValue};
use hyper::{HeaderMap, Request, Response, StatusCode};

use super::error::ApiError;
use super::response::{Body, full};

/// The `Access-Control-Allow-Origin` value for the request's `Origin`, if `allowed` (the
/// configured origins) allows it: the origin itself when it is listed by name, a literal
/// `*` (without credentials) when only `"*"` allows it.
pub(crate) fn allowed_origin<B>(allowed: &[String], req: &Request<B>) -> Option<HeaderValue> {
    let origin = req.headers().get(header::ORIGIN)?;
    let text = origin.to_str().ok()?;
    if allowed.iter().any(|o| o == text) {
        return Some(origin.clone());
    }
    allowed
        .iter()
        .any(|o| o == "*")
        .then(|| HeaderValue::from_static("*"))
}

/// Adds the CORS response headers for an allowed origin (and `Vary: Origin` whenever CORS
/// is configured, since the answer depends on it).
pub(crate) fn cors_headers(
    allowed: &[String],
    origin: Option<HeaderValue>,
    headers: &mut HeaderMap,
) {
    if let Some(origin) = origin {
        let any = origin.as_bytes() == b"*";
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if !any {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }
    if !allowed.is_empty() {
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }
}

/// Answers a CORS preflight (`OPTIONS`): 204 with the methods and headers a stream request
/// may use when the origin is allowed, else a JSON 403.
pub(crate) fn preflight<B>(req: &Request<B>, cors_allowed: bool) -> Response<Body> {
    if !cors_allowed {
        let message = if req.headers().contains_key(header::ORIGIN) {
            "this origin is not in cors.allowed_origins"
        } else {
            "OPTIONS is only answered for CORS preflight requests from allowed origins"
        };
        return ApiError::new(StatusCode::FORBIDDEN, "origin_not_allowed", message).into_response();
    }
    let mut response = Response::new(full(bytes::Bytes::new()));
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
