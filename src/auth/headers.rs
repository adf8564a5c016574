//! Credentials carried by headers: the token in a cookie, the tenant in a header
//! (`trusted_header` and `none` modes).

use hyper::HeaderMap;
use hyper::header::{self, HeaderName};

use super::{AuthError, Principal};

/// The value of cookie `name`, if the request carries it.
pub(super) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
        .filter(|v| !v.is_empty())
}

pub(super) fn tenant_from_header(
    headers: Option<&HeaderMap>,
    name: &HeaderName,
) -> Result<Principal, AuthError> {
    let tenant = headers
        .and_then(|h| h.get(name))
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| AuthError::NoTenantHeader(name.to_string()))?;
    Ok(Principal {
        tenant: tenant.to_string(),
        tables: None,
        expires_at: None,
    })
}
