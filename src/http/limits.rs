//! How large a request may be, and the JSON error for one that is larger: the head as
//! read (64 KiB, 100 headers), the query string (414 beyond 8 KiB) and the headers (431
//! beyond 16 KiB). Checked before any other work on a request.

use hyper::{Request, StatusCode};

use super::error::ApiError;

/// Most bytes of request head read. A connection's first head is read by
/// [`super::first_request`], which answers a larger one with a JSON 431 (or 414); on a
/// kept-alive connection's later requests, hyper cuts it off itself with a bare 431.
pub(crate) const MAX_BUFFER: usize = 64 * 1024;

/// Most headers a request may have (hyper's own limit): more is a JSON 431.
pub(crate) const MAX_HEADERS: usize = 100;

/// Most bytes of request headers accepted; more is a JSON 431.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Most bytes of query string accepted; more is a JSON 414.
pub const MAX_QUERY_BYTES: usize = 8 * 1024;

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

/// The error for a head still incomplete after [`MAX_BUFFER`] bytes: 414 when even the
/// request line has not ended, else 431.
pub(crate) fn head_too_large(head: &[u8]) -> ApiError {
    if !head.contains(&b'\n') {
        ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("the request line is longer than {MAX_BUFFER} bytes"),
        )
    } else {
        ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("the request head is larger than {MAX_BUFFER} bytes"),
        )
    }
}

/// The error for a head with more than [`MAX_HEADERS`] headers.
pub(crate) fn too_many_headers() -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "headers_too_large",
        format!("the request has more than {MAX_HEADERS} headers"),
    )
}
