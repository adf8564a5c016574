//! `jwt` mode: verifying a token with the one algorithm its key implies (a secret, a PEM
//! key or a JWKS entry), its times and claims; and minting HS256 tokens.

use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::Value;

use super::jwks::{JwksCache, find, load_jwks, modified};
use super::jwks_url::JwksUrl;
use super::{AuthError, Principal, config_err};
use crate::config::{AuthConfig, ConfigError, KeySource as ConfiguredKey};

/// JWT verification state.
pub(super) struct JwtVerifier {
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
    /// A JWKS URL, refreshed in the background.
    Url(JwksUrl),
}

impl JwtVerifier {
    /// The verifier for `auth` settings in `jwt` mode, fetching `auth.jwks_url` if that is
    /// the key source (and starting its background refresh).
    pub(super) async fn start(auth: &AuthConfig) -> Result<JwtVerifier, ConfigError> {
        if let Some(ConfiguredKey::JwksUrl(url)) = auth.key_source()? {
            let source = JwksUrl::start(url)
                .await
                .map_err(|e| config_err("auth.jwks_url", e))?;
            return JwtVerifier::with_keys(auth, KeySource::Url(source));
        }
        JwtVerifier::new(auth)
    }

    /// The verifier for `auth` settings in `jwt` mode: the one key source configured
    /// (`auth.jwks_url` needs [`JwtVerifier::start`]).
    pub(super) fn new(auth: &AuthConfig) -> Result<JwtVerifier, ConfigError> {
        // Which source is set (at most one) is the config's rule, checked there.
        let keys = match auth.key_source()? {
            Some(ConfiguredKey::Secret(secret)) => KeySource::Fixed(
                DecodingKey::from_secret(secret.expose().as_bytes()),
                Algorithm::HS256,
            ),
            Some(ConfiguredKey::PublicKeyFile(path)) => {
                let (key, alg) = pem_key(path)?;
                KeySource::Fixed(key, alg)
            }
            Some(ConfiguredKey::JwksFile(path)) => {
                let keys = load_jwks(path).map_err(|e| config_err("auth.jwks_file", e))?;
                KeySource::Jwks(Mutex::new(JwksCache {
                    path: path.to_path_buf(),
                    keys,
                    modified: modified(path),
                    checked: Instant::now(),
                }))
            }
            Some(ConfiguredKey::JwksUrl(_)) => {
                return Err(config_err(
                    "auth.jwks_url",
                    "is fetched when the gateway starts (Authenticator::start)",
                ));
            }
            None => {
                return Err(config_err(
                    "auth.secret",
                    "jwt mode needs a key: set auth.secret (HS256), auth.public_key_file, auth.jwks_file or auth.jwks_url",
                ));
            }
        };
        JwtVerifier::with_keys(auth, keys)
    }

    /// The verifier with its keys.
    fn with_keys(auth: &AuthConfig, keys: KeySource) -> Result<JwtVerifier, ConfigError> {
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
        Ok(JwtVerifier {
            keys,
            validation,
            tenant_claim: auth.tenant_claim.clone(),
            tables_claim: auth.tables_claim.clone(),
            leeway: auth.leeway,
            tables_claim_optional: auth.tables_claim_optional,
        })
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

impl JwtVerifier {
    pub(super) fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Invalid("malformed token"))?;
        let (key, alg) = match &self.keys {
            KeySource::Fixed(key, alg) => (key.clone(), *alg),
            KeySource::Jwks(cache) => {
                let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
                cache.refresh();
                let (_, key, alg) = find(&cache.keys, header.kid.as_deref())
                    .ok_or(AuthError::Invalid("no key with that kid"))?;
                (key.clone(), *alg)
            }
            KeySource::Url(source) => {
                let keys = source.keys();
                let Some((_, key, alg)) = find(&keys, header.kid.as_deref()) else {
                    // Perhaps the issuer rotated its keys: refetch soon, off this request.
                    if header.kid.is_some() {
                        source.unknown_kid();
                    }
                    return Err(AuthError::Invalid("no key with that kid"));
                };
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
