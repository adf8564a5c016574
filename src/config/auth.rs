//! `[auth]`: how subscribers are authenticated (read by [`crate::auth`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::value::duration;
use super::{ConfigError, Secret, invalid};

/// The `[auth]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `auth.mode`.
    pub mode: AuthMode,
    /// `auth.secret`: the HS256 key; see [`AuthConfig::secret`].
    pub secret: Option<Secret>,
    /// `auth.public_key_file`: a PEM public key (RSA for RS256, P-256 for ES256, Ed25519
    /// for EdDSA).
    pub public_key_file: Option<PathBuf>,
    /// `auth.jwks_file`: a JWKS file of public keys, chosen by `kid`, reloaded when the
    /// file changes.
    pub jwks_file: Option<PathBuf>,
    /// `auth.jwks_url`: an `http://` or `https://` URL serving a JWKS document, fetched
    /// at start-up, cached per `Cache-Control: max-age` and refreshed in the background.
    pub jwks_url: Option<String>,
    /// `auth.issuer` (default none): the required `iss`.
    pub issuer: Option<String>,
    /// `auth.audience` (default none): the required `aud`.
    pub audience: Option<String>,
    /// `auth.tenant_claim`: the claim naming the tenant.
    pub tenant_claim: String,
    /// `auth.tables_claim` (default none): a claim listing the tables a token may see.
    /// When set, a token without it is refused unless `tables_claim_optional`.
    pub tables_claim: Option<String>,
    /// `auth.tables_claim_optional`: a token without the tables claim sees every table
    /// instead of being refused.
    pub tables_claim_optional: bool,
    /// `auth.leeway`: clock skew tolerated on `exp` and `nbf`.
    #[serde(deserialize_with = "duration")]
    pub leeway: Duration,
    /// `auth.cookie` (default none): a cookie that may carry the token.
    pub cookie: Option<String>,
    /// `auth.tenant_header`: the header naming the tenant in `trusted_header` (and
    /// `none`) mode.
    pub tenant_header: String,
    /// `auth.allow_remote`: allow `trusted_header` or `none` on a non-loopback
    /// `server.listen`.
    pub allow_remote: bool,
}

impl Default for AuthConfig {
    fn default() -> AuthConfig {
        AuthConfig {
            mode: AuthMode::Jwt,
            secret: None,
            public_key_file: None,
            jwks_file: None,
            jwks_url: None,
            issuer: None,
            audience: None,
            tenant_claim: "tenant_id".into(),
            tables_claim: None,
            tables_claim_optional: false,
            leeway: Duration::from_secs(5),
            cookie: None,
            tenant_header: "X-Tenant-Id".into(),
            allow_remote: false,
        }
    }
}

/// `auth.mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Verified JWTs.
    #[default]
    Jwt,
    /// The tenant from a header set by the application's own proxy.
    TrustedHeader,
    /// No authentication (development only): the tenant from the `tenant` query
    /// parameter or the tenant header.
    None,
}

impl AuthMode {
    /// The mode as `auth.mode` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Jwt => "jwt",
            AuthMode::TrustedHeader => "trusted_header",
            AuthMode::None => "none",
        }
    }
}

/// Where `jwt` mode's key comes from: the one of `auth.secret`, `auth.public_key_file`,
/// `auth.jwks_file` and `auth.jwks_url` that is set.
#[derive(Clone, Copy, Debug)]
pub enum KeySource<'a> {
    /// `auth.secret` (HS256).
    Secret(&'a Secret),
    /// `auth.public_key_file`.
    PublicKeyFile(&'a Path),
    /// `auth.jwks_file`.
    JwksFile(&'a Path),
    /// `auth.jwks_url`.
    JwksUrl(&'a str),
}

impl AuthConfig {
    /// HS256 settings with `secret` and every other setting at its default.
    pub fn hs256(secret: &str) -> AuthConfig {
        AuthConfig {
            secret: Some(Secret::new(secret)),
            ..AuthConfig::default()
        }
    }

    /// The HS256 secret, or the error that says how to set it.
    pub fn secret(&self) -> Result<&Secret, ConfigError> {
        self.secret.as_ref().ok_or_else(|| {
            invalid(
                "auth.secret",
                "is required to sign tokens (the HS256 secret): set it in the config file or PGFEED_AUTH_SECRET",
            )
        })
    }

    /// The key source that is set (`None` if none is), or the error if more than one is.
    pub fn key_source(&self) -> Result<Option<KeySource<'_>>, ConfigError> {
        let set = [
            self.secret.as_ref().map(KeySource::Secret),
            self.public_key_file
                .as_deref()
                .map(KeySource::PublicKeyFile),
            self.jwks_file.as_deref().map(KeySource::JwksFile),
            self.jwks_url.as_deref().map(KeySource::JwksUrl),
        ];
        let mut set = set.into_iter().flatten();
        match (set.next(), set.next()) {
            (None, _) => Ok(None),
            (Some(source), None) => Ok(Some(source)),
            (Some(_), Some(_)) => Err(invalid(
                "auth.secret",
                "only one of auth.secret, auth.public_key_file, auth.jwks_file and auth.jwks_url may be set",
            )),
        }
    }

    /// The section's rules (`listen` is `server.listen`); each problem is collected in
    /// `errs`.
    pub fn validate(&self, listen: SocketAddr, errs: &mut Vec<ConfigError>) {
        if self.mode != AuthMode::Jwt && !listen.ip().is_loopback() && !self.allow_remote {
            errs.push(invalid(
                "auth.mode",
                format!(
                    "{:?} trusts whoever can reach the port, so it is refused on the non-loopback \
                     address {listen}; listen on 127.0.0.1 behind your proxy, or set \
                     auth.allow_remote = true if only that proxy can reach this address",
                    self.mode.as_str()
                ),
            ));
        }
        if self.secret.as_ref().is_some_and(|s| s.expose().len() < 16) {
            errs.push(invalid("auth.secret", "must be at least 16 bytes long"));
        }
        if let Err(err) = self.key_source() {
            errs.push(err);
        }
        if let Some(url) = &self.jwks_url
            && let Err(message) = check_jwks_url(url)
        {
            errs.push(invalid("auth.jwks_url", message));
        }
        if self.tenant_claim.is_empty() {
            errs.push(invalid("auth.tenant_claim", "must not be empty"));
        }
        if self.tables_claim.as_deref() == Some("") {
            errs.push(invalid("auth.tables_claim", "must not be empty when set"));
        }
        if self.tables_claim_optional && self.tables_claim.is_none() {
            errs.push(invalid(
                "auth.tables_claim_optional",
                "only means something with auth.tables_claim set",
            ));
        }
        if !is_token(&self.tenant_header) {
            errs.push(invalid(
                "auth.tenant_header",
                format!("{:?} is not a header name", self.tenant_header),
            ));
        }
        if let Some(cookie) = &self.cookie
            && (cookie.is_empty() || cookie.contains([';', '=', ' ', ',']))
        {
            errs.push(invalid(
                "auth.cookie",
                format!("{cookie:?} is not a cookie name"),
            ));
        }
    }
}

/// Whether `name` is an HTTP token (RFC 9110), the form of a header name.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// `auth.jwks_url`'s rule: an absolute `http://` or `https://` URL with a host and no
/// credentials (JWKS endpoints are public; a message never has to hide a password).
fn check_jwks_url(url: &str) -> Result<(), String> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|_| "is not a URL (expected https://host/path/jwks.json)".to_string())?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("must start with http:// or https://".into()),
    }
    let Some(authority) = uri.authority() else {
        return Err("has no host".into());
    };
    if authority.as_str().contains('@') {
        return Err(
            "must not carry credentials (user:password@); JWKS endpoints are public".into(),
        );
    }
    if authority.host().is_empty() {
        return Err("has no host".into());
    }
    Ok(())
}
