//! What every answer is made of: the response body type, and JSON documents (never
//! cached), which the gateway and the demo page both answer with.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

/// Response body type: a full JSON document or an endless stream.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A complete body.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

/// A JSON document with `status`, marked `no-store`.
pub(crate) fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(full(body));
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

/// `value` as a JSON response with `status`, marked `no-store`.
pub(crate) fn json_value(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    json(status, value.to_string())
}
