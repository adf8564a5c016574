//! Unit tests of authentication: modes, tokens, keys.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::Value;

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
    let future = serde_json::json!({"tenant_id": "acme", "exp": now() + 600, "nbf": now() + 300});
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

#[test]
fn jwks_url_max_age_is_bounded() {
    use super::jwks_url::{DEFAULT_MAX_AGE, MAX_MAX_AGE, MIN_MAX_AGE, max_age};
    use hyper::header::HeaderValue;
    let age = |v: &'static str| max_age(Some(&HeaderValue::from_static(v)));
    assert_eq!(max_age(None), DEFAULT_MAX_AGE);
    assert_eq!(age("public"), DEFAULT_MAX_AGE);
    assert_eq!(age("public, max-age=600"), Duration::from_secs(600));
    assert_eq!(
        age("Max-Age=3600, must-revalidate"),
        Duration::from_secs(3600)
    );
    assert_eq!(age("max-age=5"), MIN_MAX_AGE);
    assert_eq!(age("max-age=0"), MIN_MAX_AGE);
    assert_eq!(age("max-age=99999999"), MAX_MAX_AGE);
    assert_eq!(age("max-age=nonsense"), DEFAULT_MAX_AGE);
    assert_eq!(age("no-store"), MIN_MAX_AGE);
    assert_eq!(age("max-age=600, no-cache"), MIN_MAX_AGE);
}

#[test]
fn jwks_url_is_one_key_source_and_a_plain_http_url() {
    let listen = "127.0.0.1:8080".parse().unwrap();
    let errors = |a: &AuthConfig| {
        let mut errs = vec![];
        a.validate(listen, &mut errs);
        errs.iter().map(ToString::to_string).collect::<Vec<_>>()
    };
    let mut a = AuthConfig {
        jwks_url: Some("https://auth.example.com/.well-known/jwks.json".into()),
        ..AuthConfig::default()
    };
    assert!(errors(&a).is_empty(), "{:?}", errors(&a));
    assert!(matches!(
        a.key_source(),
        Ok(Some(crate::config::KeySource::JwksUrl(_)))
    ));
    // Synchronous construction cannot fetch: it says so rather than starting keyless.
    assert!(Authenticator::new(&a).is_err());
    a.jwks_url = Some("http://127.0.0.1:9/jwks".into());
    assert!(errors(&a).is_empty());

    let mut both = AuthConfig::hs256("0123456789abcdef0123");
    both.jwks_url = a.jwks_url.clone();
    assert!(errors(&both).iter().any(|e| e.contains("only one of")));
    for bad in [
        "ftp://example.com/jwks",
        "/jwks.json",
        "not a url",
        "https://user:secret@example.com/jwks",
    ] {
        a.jwks_url = Some(bad.into());
        let errs = errors(&a);
        assert!(
            errs.iter().any(|e| e.contains("auth.jwks_url")),
            "{bad}: {errs:?}"
        );
        assert!(!errs.iter().any(|e| e.contains("secret@")), "{errs:?}");
    }
}
