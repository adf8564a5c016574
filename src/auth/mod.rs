//! Turns a request's credentials into a [`Principal`]: the tenant it may see and,
//! optionally, the tables it is limited to.
//!
//! In `jwt` mode the token comes from `Authorization: Bearer`, the configured cookie or the
//! `access_token` query parameter, and is verified with the one algorithm that the
//! configured key implies (HS256 for a secret; RS256, ES256 or EdDSA for a PEM key or a
//! JWKS entry), never with the algorithm the token's header asks for: `alg: none` and
//! algorithm confusion are rejected. `exp` is required; `nbf`, `iss` and `aud` are
//! enforced. This module never logs a token or a claim value.

mod headers;
mod jwks;
mod jwks_url;
mod jwt;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::time::SystemTime;

use hyper::HeaderMap;
use hyper::header::{self, HeaderName};

use crate::config::{AuthConfig, AuthMode, ConfigError};
use headers::{cookie, tenant_from_header};
use jwt::JwtVerifier;
pub use jwt::mint;

/// Who a subscriber is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The tenant whose rows it may see.
    pub tenant: String,
    /// Tables it is limited to (qualified names); `None` means every watched table.
    pub tables: Option<BTreeSet<String>>,
    /// When its credentials stop being accepted (`exp` plus `auth.leeway`, the same rule
    /// as at connect): its stream ends then. `None` for no expiry, or one too far in the
    /// future to represent.
    pub expires_at: Option<SystemTime>,
}

/// Why a request was not authenticated. Messages are safe to return to the client.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No credentials at all.
    #[error(
        "a token is required: send `Authorization: Bearer <token>`, the auth cookie, or `access_token=<token>`"
    )]
    Missing,
    /// The token has expired.
    #[error("the token has expired")]
    Expired,
    /// The token is malformed, badly signed, not yet valid or uses another algorithm.
    #[error("the token is invalid: {0}")]
    Invalid(&'static str),
    /// The token lacks the tenant claim, or it is not a string or number.
    #[error("the token has no usable `{0}` claim (a string or number naming the tenant)")]
    NoTenant(String),
    /// `auth.tables_claim` is set and the token does not carry it (403).
    #[error(
        "the token has no `{0}` claim: it must list the tables it may see (this gateway refuses tokens without it)"
    )]
    NoTables(String),
    /// The tables claim is not a list of table names.
    #[error(
        "the token's `{0}` claim must be an array of table names (`orders`, `shop.orders`, `\"Mixed Case\"`)"
    )]
    BadTables(String),
    /// `trusted_header` / `none` mode without the tenant header.
    #[error("the `{0}` header naming the tenant is required")]
    NoTenantHeader(String),
}

/// Credentials found in a request.
#[derive(Debug, Default)]
pub struct Credentials<'a> {
    /// Request headers (Authorization, Cookie, the tenant header).
    pub headers: Option<&'a HeaderMap>,
    /// The `access_token` query parameter.
    pub access_token: Option<&'a str>,
    /// The `tenant` query parameter (`none` mode only).
    pub tenant: Option<&'a str>,
}

/// Verifies requests according to `auth.mode`.
pub struct Authenticator {
    /// The mode and its state.
    mode: Mode,
    /// Cookie that may carry the token.
    cookie: Option<String>,
}

enum Mode {
    Jwt(Box<JwtVerifier>),
    TrustedHeader(HeaderName),
    None(HeaderName),
}

fn config_err(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

impl Authenticator {
    /// An authenticator for `auth` settings, as [`Authenticator::new`], that also serves
    /// `auth.jwks_url`: the URL is fetched now (an error if it does not answer with a
    /// usable key) and refreshed in the background while the authenticator lives.
    pub async fn start(auth: &AuthConfig) -> Result<Authenticator, ConfigError> {
        match auth.mode {
            AuthMode::Jwt => Ok(Authenticator {
                mode: Mode::Jwt(Box::new(JwtVerifier::start(auth).await?)),
                cookie: auth.cookie.clone(),
            }),
            _ => Authenticator::new(auth),
        }
    }

    /// An authenticator for `auth` settings; in `jwt` mode exactly one key source must be
    /// configured (`auth.jwks_url` needs [`Authenticator::start`]).
    pub fn new(auth: &AuthConfig) -> Result<Authenticator, ConfigError> {
        let header = |name: &str| {
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| config_err("auth.tenant_header", "is not a header name"))
        };
        let mode = match auth.mode {
            AuthMode::TrustedHeader => Mode::TrustedHeader(header(&auth.tenant_header)?),
            AuthMode::None => Mode::None(header(&auth.tenant_header)?),
            AuthMode::Jwt => Mode::Jwt(Box::new(JwtVerifier::new(auth)?)),
        };
        Ok(Authenticator {
            mode,
            cookie: auth.cookie.clone(),
        })
    }

    /// Authenticates a request's credentials.
    pub fn authenticate_request(&self, creds: &Credentials<'_>) -> Result<Principal, AuthError> {
        match &self.mode {
            Mode::Jwt(verifier) => verifier.verify(self.token(creds)?),
            Mode::TrustedHeader(name) => tenant_from_header(creds.headers, name),
            Mode::None(name) => match creds.tenant {
                Some(t) if !t.is_empty() => Ok(Principal {
                    tenant: t.to_string(),
                    tables: None,
                    expires_at: None,
                }),
                _ => tenant_from_header(creds.headers, name),
            },
        }
    }

    /// Verifies a bare token (jwt mode).
    pub fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        self.authenticate_request(&Credentials {
            access_token: Some(token),
            ..Default::default()
        })
    }

    /// The token: `Authorization: Bearer`, else the cookie, else `access_token`.
    fn token<'a>(&self, creds: &Credentials<'a>) -> Result<&'a str, AuthError> {
        if let Some(headers) = creds.headers {
            if let Some(value) = headers.get(header::AUTHORIZATION) {
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
            if let Some(name) = &self.cookie
                && let Some(token) = cookie(headers, name)
            {
                return Ok(token);
            }
        }
        creds.access_token.ok_or(AuthError::Missing)
    }
}
