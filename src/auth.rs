//! Turns a request's credentials into a [`Principal`]: the tenant it may see and,
//! optionally, the tables it is limited to.
//!
//! Tokens are JWTs verified with a fixed algorithm taken from configuration, never from
//! the token's header, so `alg: none` and algorithm confusion are rejected. `exp` is
//! required and `nbf` enforced. This module never logs a token or a claim value.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::Value;

use crate::config::{AuthConfig, ConfigError};

/// Who a subscriber is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The tenant whose rows it may see.
    pub tenant: String,
    /// Tables it is limited to (qualified names); `None` means every watched table.
    pub tables: Option<BTreeSet<String>>,
    /// When its credentials expire (seconds since the epoch): its stream ends then.
    pub expires_at: Option<u64>,
}

/// Why a request was not authenticated. Messages are safe to return to the client.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No token in the header or the query.
    #[error("a token is required: send `Authorization: Bearer <token>` or `access_token=<token>`")]
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
    /// The tables claim is not a list of table names.
    #[error("the token's `{0}` claim must be an array of table names")]
    BadTables(String),
}

/// Verifies tokens.
pub struct Authenticator {
    /// The HS256 key.
    key: DecodingKey,
    /// Algorithm, leeway and required claims.
    validation: Validation,
    /// Claim naming the tenant.
    tenant_claim: String,
    /// Claim listing allowed tables, if configured.
    tables_claim: Option<String>,
}

impl Authenticator {
    /// An authenticator for `auth` settings.
    pub fn new(auth: &AuthConfig) -> Result<Authenticator, ConfigError> {
        let secret = auth.secret()?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = auth.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        Ok(Authenticator {
            key: DecodingKey::from_secret(secret.expose().as_bytes()),
            validation,
            tenant_claim: auth.tenant_claim.clone(),
            tables_claim: auth.tables_claim.clone(),
        })
    }

    /// Verifies `token` and extracts the principal.
    pub fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let data = jsonwebtoken::decode::<Value>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::Invalid("not valid yet (nbf)"),
                ErrorKind::InvalidSignature => AuthError::Invalid("bad signature"),
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    AuthError::Invalid("algorithm not allowed")
                }
                ErrorKind::MissingRequiredClaim(_) => AuthError::Invalid("missing exp claim"),
                _ => AuthError::Invalid("malformed token"),
            },
        )?;
        let claims = data.claims;
        let tenant = match claims.get(&self.tenant_claim) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err(AuthError::NoTenant(self.tenant_claim.clone())),
        };
        let tables = match &self.tables_claim {
            None => None,
            Some(name) => match claims.get(name) {
                None => None,
                Some(Value::Array(items)) => Some(
                    items
                        .iter()
                        .map(|v| {
                            v.as_str()
                                .map(qualify)
                                .ok_or_else(|| AuthError::BadTables(name.clone()))
                        })
                        .collect::<Result<_, _>>()?,
                ),
                Some(_) => return Err(AuthError::BadTables(name.clone())),
            },
        };
        let expires_at = claims.get("exp").and_then(Value::as_u64);
        Ok(Principal {
            tenant,
            tables,
            expires_at,
        })
    }
}

/// A table name as events carry it: `orders` means `public.orders`.
pub fn qualify(name: &str) -> String {
    if name.contains('.') {
        name.to_string()
    } else {
        format!("public.{name}")
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
    if let Some(tables) = tables {
        let claim = auth
            .tables_claim
            .clone()
            .ok_or_else(|| ConfigError::Invalid {
                key: "auth.tables_claim",
                message: "must be set to mint a token limited to tables".into(),
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
    use crate::config::Secret;
    use base64::Engine;

    fn auth() -> AuthConfig {
        AuthConfig {
            secret: Some(Secret::new("0123456789abcdef0123")),
            tenant_claim: "tenant_id".into(),
            tables_claim: Some("tables".into()),
            leeway: Duration::from_secs(0),
        }
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
    }
}
