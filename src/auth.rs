//! Turns a request's credentials into a [`Principal`]: the tenant it may see and,
//! optionally, the tables it is limited to.
//!
//! In `jwt` mode the token comes from `Authorization: Bearer`, the configured cookie or the
//! `access_token` query parameter, and is verified with the one algorithm that the
//! configured key implies (HS256 for a secret; RS256, ES256 or EdDSA for a PEM key or a
//! JWKS entry), never with the algorithm the token's header asks for: `alg: none` and
//! algorithm confusion are rejected. `exp` is required; `nbf`, `iss` and `aud` are
//! enforced. This module never logs a token or a claim value.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyper::HeaderMap;
use hyper::header::{self, HeaderName};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::Value;

use crate::config::{AuthConfig, AuthMode, ConfigError};

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

/// JWT verification state.
struct JwtVerifier {
    /// Where keys come from.
    keys: KeySource,
    /// Leeway, issuer, audience; the algorithm is set per key.
    validation: Validation,
    /// Claim naming the tenant.
    tenant_claim: String,
    /// Claim listing allowed tables, if configured.
    tables_claim: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`, at connect and mid-stream alike.
    leeway: Duration,
    /// Whether a token without the tables claim sees every table (else it is refused).
    tables_claim_optional: bool,
}

enum KeySource {
    /// One key with its algorithm (a secret or a PEM file).
    Fixed(DecodingKey, Algorithm),
    /// A JWKS file, reloaded when it changes.
    Jwks(Mutex<JwksCache>),
}

/// A loaded JWKS file.
struct JwksCache {
    path: PathBuf,
    keys: Vec<(Option<String>, DecodingKey, Algorithm)>,
    modified: Option<SystemTime>,
    checked: Instant,
}

/// How often a JWKS file's modification time is checked.
const JWKS_CHECK: Duration = Duration::from_secs(1);

fn config_err(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// The algorithm a PEM public key implies, with the key.
fn pem_key(path: &Path) -> Result<(DecodingKey, Algorithm), ConfigError> {
    let pem = std::fs::read(path).map_err(|e| {
        config_err(
            "auth.public_key_file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((key, Algorithm::RS256));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        return Ok((key, Algorithm::ES256));
    }
    if let Ok(key) = DecodingKey::from_ed_pem(&pem) {
        return Ok((key, Algorithm::EdDSA));
    }
    Err(config_err(
        "auth.public_key_file",
        format!(
            "{} is not a PEM public key of a supported kind (RSA, EC P-256, Ed25519)",
            path.display()
        ),
    ))
}

/// Loads a JWKS file: every RSA, P-256 and Ed25519 key, with the algorithm it implies.
fn load_jwks(path: &Path) -> Result<Vec<(Option<String>, DecodingKey, Algorithm)>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let set: JwkSet = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a JWKS document: {e}", path.display()))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let implied = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                Algorithm::EdDSA
            }
            // Symmetric and other keys have no place in a public key set.
            _ => continue,
        };
        let declared = match jwk.common.key_algorithm {
            None => Some(implied),
            Some(KeyAlgorithm::RS256) => Some(Algorithm::RS256),
            Some(KeyAlgorithm::ES256) => Some(Algorithm::ES256),
            Some(KeyAlgorithm::EdDSA) => Some(Algorithm::EdDSA),
            Some(_) => None,
        };
        if declared != Some(implied) {
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        keys.push((jwk.common.key_id.clone(), key, implied));
    }
    if keys.is_empty() {
        return Err(format!(
            "{} has no usable key (RSA for RS256, EC P-256 for ES256, OKP Ed25519 for EdDSA)",
            path.display()
        ));
    }
    Ok(keys)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl JwksCache {
    /// Reloads the file if it changed since the last check (at most once a second). A
    /// file that became unreadable or invalid keeps the previous keys.
    fn refresh(&mut self) {
        if self.checked.elapsed() < JWKS_CHECK {
            return;
        }
        self.checked = Instant::now();
        let now = modified(&self.path);
        if now == self.modified {
            return;
        }
        match load_jwks(&self.path) {
            Ok(keys) => {
                self.keys = keys;
                self.modified = now;
                tracing::info!(path = %self.path.display(), keys = self.keys.len(), "reloaded the JWKS file");
            }
            Err(err) => {
                tracing::warn!(cause = %err, "the JWKS file changed but cannot be loaded; keeping the previous keys")
            }
        }
    }
}

impl Authenticator {
    /// An authenticator for `auth` settings; in `jwt` mode exactly one key source must be
    /// configured.
    pub fn new(auth: &AuthConfig) -> Result<Authenticator, ConfigError> {
        let header = |name: &str| {
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| config_err("auth.tenant_header", "is not a header name"))
        };
        let mode = match auth.mode {
            AuthMode::TrustedHeader => Mode::TrustedHeader(header(&auth.tenant_header)?),
            AuthMode::None => Mode::None(header(&auth.tenant_header)?),
            AuthMode::Jwt => {
                let keys = match (&auth.secret, &auth.public_key_file, &auth.jwks_file) {
                    (Some(secret), None, None) => KeySource::Fixed(
                        DecodingKey::from_secret(secret.expose().as_bytes()),
                        Algorithm::HS256,
                    ),
                    (None, Some(path), None) => {
                        let (key, alg) = pem_key(path)?;
                        KeySource::Fixed(key, alg)
                    }
                    (None, None, Some(path)) => {
                        let keys = load_jwks(path).map_err(|e| config_err("auth.jwks_file", e))?;
                        KeySource::Jwks(Mutex::new(JwksCache {
                            path: path.clone(),
                            keys,
                            modified: modified(path),
                            checked: Instant::now(),
                        }))
                    }
                    (None, None, None) => {
                        return Err(config_err(
                            "auth.secret",
                            "jwt mode needs a key: set auth.secret (HS256), auth.public_key_file or auth.jwks_file",
                        ));
                    }
                    _ => {
                        return Err(config_err(
                            "auth.secret",
                            "only one of auth.secret, auth.public_key_file and auth.jwks_file may be set",
                        ));
                    }
                };
                // `exp` and `nbf` are checked here ([`JwtVerifier::check_times`]), as numbers
                // of any JSON form (`1.7e9`, `1700000000.5`), with the leeway that also
                // decides when a stream ends.
                let mut validation = Validation::new(Algorithm::HS256);
                validation.leeway = 0;
                validation.validate_exp = false;
                validation.validate_nbf = false;
                let mut required = vec![];
                if let Some(iss) = &auth.issuer {
                    validation.set_issuer(&[iss]);
                    required.push("iss");
                }
                match &auth.audience {
                    Some(aud) => {
                        validation.set_audience(&[aud]);
                        required.push("aud");
                    }
                    None => validation.validate_aud = false,
                }
                validation.set_required_spec_claims(&required);
                Mode::Jwt(Box::new(JwtVerifier {
                    keys,
                    validation,
                    tenant_claim: auth.tenant_claim.clone(),
                    tables_claim: auth.tables_claim.clone(),
                    leeway: auth.leeway,
                    tables_claim_optional: auth.tables_claim_optional,
                }))
            }
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

/// The value of cookie `name`, if the request carries it.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
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

fn tenant_from_header(
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

impl JwtVerifier {
    fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Invalid("malformed token"))?;
        let (key, alg) = match &self.keys {
            KeySource::Fixed(key, alg) => (key.clone(), *alg),
            KeySource::Jwks(cache) => {
                let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
                cache.refresh();
                let found = match &header.kid {
                    Some(kid) => cache
                        .keys
                        .iter()
                        .find(|(id, _, _)| id.as_deref() == Some(kid.as_str())),
                    None if cache.keys.len() == 1 => cache.keys.first(),
                    None => None,
                };
                let (_, key, alg) = found.ok_or(AuthError::Invalid("no key with that kid"))?;
                (key.clone(), *alg)
            }
        };
        // The header's algorithm must be the key's: this rejects `none`, HS256 signed with
        // a public key's bytes, and any other substitution.
        if header.alg != alg {
            return Err(AuthError::Invalid("algorithm not allowed"));
        }
        let mut validation = self.validation.clone();
        validation.algorithms = vec![alg];
        let data = jsonwebtoken::decode::<Value>(token, &key, &validation).map_err(|e| match e
            .kind()
        {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::Invalid("not valid yet (nbf)"),
            ErrorKind::InvalidSignature => AuthError::Invalid("bad signature"),
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                AuthError::Invalid("algorithm not allowed")
            }
            ErrorKind::MissingRequiredClaim(_) => {
                AuthError::Invalid("missing a required claim (iss or aud)")
            }
            ErrorKind::InvalidIssuer => AuthError::Invalid("wrong issuer"),
            ErrorKind::InvalidAudience => AuthError::Invalid("wrong audience"),
            _ => AuthError::Invalid("malformed token"),
        })?;
        let claims = data.claims;
        let expires_at = self.check_times(&claims)?;
        let tenant = match claims.get(&self.tenant_claim) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err(AuthError::NoTenant(self.tenant_claim.clone())),
        };
        let tables = match &self.tables_claim {
            None => None,
            Some(name) => match claims.get(name) {
                // Fails closed: a token its issuer forgot to limit sees nothing.
                None if self.tables_claim_optional => None,
                None => return Err(AuthError::NoTables(name.clone())),
                Some(Value::Array(items)) => Some(
                    items
                        .iter()
                        .map(|v| {
                            v.as_str()
                                .and_then(|t| crate::names::table_key(t).ok())
                                .ok_or_else(|| AuthError::BadTables(name.clone()))
                        })
                        .collect::<Result<_, _>>()?,
                ),
                Some(_) => return Err(AuthError::BadTables(name.clone())),
            },
        };
        Ok(Principal {
            tenant,
            tables,
            expires_at,
        })
    }
}

impl JwtVerifier {
    /// Checks `exp` (required) and `nbf` with the leeway, whatever their JSON number form
    /// (integer, fraction, exponent); returns when the credentials stop being accepted.
    fn check_times(&self, claims: &Value) -> Result<Option<SystemTime>, AuthError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let leeway = self.leeway.as_secs_f64();
        let exp = match claims.get("exp") {
            None => {
                return Err(AuthError::Invalid(
                    "missing a required claim (exp, iss or aud)",
                ));
            }
            Some(value) => value
                .as_f64()
                .filter(|v| v.is_finite())
                .ok_or(AuthError::Invalid("`exp` must be a number of seconds"))?,
        };
        if let Some(nbf) = claims.get("nbf") {
            let nbf = nbf
                .as_f64()
                .filter(|v| v.is_finite())
                .ok_or(AuthError::Invalid("`nbf` must be a number of seconds"))?;
            if nbf > now + leeway {
                return Err(AuthError::Invalid("not valid yet (nbf)"));
            }
        }
        let until = exp + leeway;
        if until <= now {
            return Err(AuthError::Expired);
        }
        // Far-future values (1e19, 1e300) mean no expiry rather than an overflow.
        Ok(Duration::try_from_secs_f64(until)
            .ok()
            .and_then(|d| UNIX_EPOCH.checked_add(d)))
    }
}

/// Mints an HS256 token for `tenant`, valid for `ttl` (the `token` subcommand and tests).
pub fn mint(
    auth: &AuthConfig,
    tenant: &str,
    tables: Option<&[String]>,
    ttl: Duration,
) -> Result<String, ConfigError> {
    let secret = auth.secret()?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut claims = serde_json::Map::new();
    claims.insert(auth.tenant_claim.clone(), Value::from(tenant));
    claims.insert("iat".into(), Value::from(now));
    claims.insert("exp".into(), Value::from(now + ttl.as_secs().max(1)));
    if let Some(iss) = &auth.issuer {
        claims.insert("iss".into(), Value::from(iss.as_str()));
    }
    if let Some(aud) = &auth.audience {
        claims.insert("aud".into(), Value::from(aud.as_str()));
    }
    if let Some(tables) = tables {
        let claim = auth.tables_claim.clone().ok_or_else(|| {
            config_err(
                "auth.tables_claim",
                "must be set to mint a token limited to tables",
            )
        })?;
        claims.insert(claim, Value::from(tables.to_vec()));
    }
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &Value::Object(claims),
        &EncodingKey::from_secret(secret.expose().as_bytes()),
    )
    .expect("HS256 signing of a JSON object cannot fail");
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn auth() -> AuthConfig {
        let mut a = AuthConfig::hs256("0123456789abcdef0123");
        a.tables_claim = Some("tables".into());
        a.tables_claim_optional = true;
        a.leeway = Duration::from_secs(0);
        a
    }

    fn sign(claims: Value, secret: &str) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn minted_token_round_trips() {
        let a = Authenticator::new(&auth()).unwrap();
        let t = mint(
            &auth(),
            "acme",
            Some(&["orders".into(), "crm.leads".into()]),
            Duration::from_secs(60),
        )
        .unwrap();
        let p = a.authenticate(&t).unwrap();
        assert_eq!(p.tenant, "acme");
        assert_eq!(
            p.tables.unwrap().into_iter().collect::<Vec<_>>(),
            vec!["crm.leads".to_string(), "public.orders".to_string()]
        );
    }

    #[test]
    fn a_missing_tables_claim_is_refused_unless_optional() {
        let claimless = mint(&auth(), "acme", None, Duration::from_secs(60)).unwrap();
        let mut strict = auth();
        strict.tables_claim_optional = false;
        let a = Authenticator::new(&strict).unwrap();
        assert_eq!(
            a.authenticate(&claimless),
            Err(AuthError::NoTables("tables".into()))
        );
        let a = Authenticator::new(&auth()).unwrap();
        assert_eq!(a.authenticate(&claimless).unwrap().tables, None);
    }

    #[test]
    fn numeric_tenant_is_accepted() {
        let a = Authenticator::new(&auth()).unwrap();
        let t = sign(
            serde_json::json!({"tenant_id": 42, "exp": now() + 60}),
            "0123456789abcdef0123",
        );
        assert_eq!(a.authenticate(&t).unwrap().tenant, "42");
    }

    #[test]
    fn rejects_bad_tokens() {
        let a = Authenticator::new(&auth()).unwrap();
        let good = serde_json::json!({"tenant_id": "acme", "exp": now() + 60});
        assert_eq!(
            a.authenticate(&sign(good.clone(), "another-secret-0000")),
            Err(AuthError::Invalid("bad signature"))
        );
        let expired = serde_json::json!({"tenant_id": "acme", "exp": now() - 600});
        assert_eq!(
            a.authenticate(&sign(expired, "0123456789abcdef0123")),
            Err(AuthError::Expired)
        );
        let no_exp = serde_json::json!({"tenant_id": "acme"});
        assert!(
            a.authenticate(&sign(no_exp, "0123456789abcdef0123"))
                .is_err()
        );
        let future =
            serde_json::json!({"tenant_id": "acme", "exp": now() + 600, "nbf": now() + 300});
        assert!(
            a.authenticate(&sign(future, "0123456789abcdef0123"))
                .is_err()
        );
        let no_tenant = serde_json::json!({"sub": "x", "exp": now() + 60});
        assert!(matches!(
            a.authenticate(&sign(no_tenant, "0123456789abcdef0123")),
            Err(AuthError::NoTenant(_))
        ));
        assert!(a.authenticate("not.a.token").is_err());
        assert!(a.authenticate("").is_err());
        // alg: none, with the payload of a valid token and no signature.
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let none = format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(good.to_string())
        );
        assert!(a.authenticate(&none).is_err());
        // Another HMAC algorithm with the right secret.
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &good,
            &EncodingKey::from_secret(b"0123456789abcdef0123"),
        )
        .unwrap();
        assert_eq!(
            a.authenticate(&hs512),
            Err(AuthError::Invalid("algorithm not allowed"))
        );
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let mut cfg = auth();
        cfg.issuer = Some("https://auth.example".into());
        cfg.audience = Some("pgfeed".into());
        let a = Authenticator::new(&cfg).unwrap();
        let secret = "0123456789abcdef0123";
        let ok = serde_json::json!({"tenant_id": "t", "exp": now() + 60, "iss": "https://auth.example", "aud": "pgfeed"});
        assert!(a.authenticate(&sign(ok, secret)).is_ok());
        let wrong_iss = serde_json::json!({"tenant_id": "t", "exp": now() + 60, "iss": "https://evil", "aud": "pgfeed"});
        assert_eq!(
            a.authenticate(&sign(wrong_iss, secret)),
            Err(AuthError::Invalid("wrong issuer"))
        );
        let wrong_aud = serde_json::json!({"tenant_id": "t", "exp": now() + 60, "iss": "https://auth.example", "aud": "x"});
        assert_eq!(
            a.authenticate(&sign(wrong_aud, secret)),
            Err(AuthError::Invalid("wrong audience"))
        );
        let missing = serde_json::json!({"tenant_id": "t", "exp": now() + 60});
        assert!(a.authenticate(&sign(missing, secret)).is_err());
        // Minted tokens carry the configured issuer and audience.
        assert!(
            a.authenticate(&mint(&cfg, "t", None, Duration::from_secs(60)).unwrap())
                .is_ok()
        );
    }

    #[test]
    fn token_sources_in_order_of_preference() {
        let mut cfg = auth();
        cfg.cookie = Some("pgfeed_token".into());
        let a = Authenticator::new(&cfg).unwrap();
        let good = mint(&cfg, "from-cookie", None, Duration::from_secs(60)).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            format!("theme=dark; pgfeed_token={good}").parse().unwrap(),
        );
        let creds = Credentials {
            headers: Some(&headers),
            access_token: Some("ignored-when-a-cookie-is-present"),
            tenant: None,
        };
        assert_eq!(
            a.authenticate_request(&creds).unwrap().tenant,
            "from-cookie"
        );
        headers.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        let creds = Credentials {
            headers: Some(&headers),
            ..Default::default()
        };
        assert!(matches!(
            a.authenticate_request(&creds),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn header_modes_take_the_tenant_from_the_header() {
        let mut cfg = auth();
        cfg.mode = AuthMode::TrustedHeader;
        let a = Authenticator::new(&cfg).unwrap();
        let mut headers = HeaderMap::new();
        let creds = Credentials {
            headers: Some(&headers),
            tenant: Some("query-is-ignored"),
            ..Default::default()
        };
        assert_eq!(
            a.authenticate_request(&creds),
            Err(AuthError::NoTenantHeader("x-tenant-id".into()))
        );
        headers.insert("x-tenant-id", "acme".parse().unwrap());
        let creds = Credentials {
            headers: Some(&headers),
            tenant: Some("query-is-ignored"),
            ..Default::default()
        };
        assert_eq!(a.authenticate_request(&creds).unwrap().tenant, "acme");

        cfg.mode = AuthMode::None;
        let a = Authenticator::new(&cfg).unwrap();
        let creds = Credentials {
            tenant: Some("dev"),
            ..Default::default()
        };
        assert_eq!(a.authenticate_request(&creds).unwrap().tenant, "dev");
    }
}
