//! Authentication modes, CORS, admission limits and row filters, end to end: real HTTP
//! against an in-process gateway on a real PostgreSQL (SPEC section 3, issue 4).
//!
//! Public keys are generated at test time with the `openssl` command, so no key material
//! lives in the repository; tokens are signed here with `jsonwebtoken`.

use pgfeed_testkit as support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pgfeed::config::{Config, Sources};
use serde_json::{Value, json};
use support::{
    Gateway, Response, SOON, SseClient, TempDir, TestDb, assert_streams, get_soon, request,
};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Claims of a valid token for `tenant`, good for an hour.
fn claims(tenant: &str) -> Value {
    json!({"tenant_id": tenant, "exp": now() + 3600})
}

/// An HS256 token signed with `secret`.
fn hs256(claims: &Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// An unsigned token: `alg: none` and an empty signature.
fn alg_none(claims: &Value) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(claims.to_string())
    )
}

// ---------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------

/// Runs `openssl` with `args`; the tests cannot make keys without it.
fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running `openssl` failed ({e}): these tests generate their keys with the openssl \
                 command; install it (Debian/Ubuntu: `apt-get install openssl`)"
            )
        });
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Rsa,
    Ec,
    Ed,
}

impl Kind {
    fn alg(self) -> Algorithm {
        match self {
            Kind::Rsa => Algorithm::RS256,
            Kind::Ec => Algorithm::ES256,
            Kind::Ed => Algorithm::EdDSA,
        }
    }
}

/// A key pair made by openssl.
struct Key {
    kind: Kind,
    /// PKCS#8 private key, PEM.
    private_pem: Vec<u8>,
    /// SubjectPublicKeyInfo, PEM.
    public_pem: Vec<u8>,
    /// Where the public key is.
    public_path: PathBuf,
}

impl Key {
    fn generate(dir: &TempDir, kind: Kind, name: &str) -> Key {
        let raw = dir.path(&format!("{name}.raw.pem"));
        let private = dir.path(&format!("{name}.key.pem"));
        let public = dir.path(&format!("{name}.pub.pem"));
        let raw_s = raw.display().to_string();
        let mut args = vec!["genpkey", "-out", &raw_s];
        match kind {
            Kind::Rsa => args.extend(["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]),
            Kind::Ec => args.extend(["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]),
            Kind::Ed => args.extend(["-algorithm", "ED25519"]),
        }
        openssl(&args);
        // jsonwebtoken reads EC private keys as PKCS#8 only.
        openssl(&[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            &raw_s,
            "-out",
            &private.display().to_string(),
        ]);
        openssl(&[
            "pkey",
            "-in",
            &raw_s,
            "-pubout",
            "-out",
            &public.display().to_string(),
        ]);
        Key {
            kind,
            private_pem: std::fs::read(&private).unwrap(),
            public_pem: std::fs::read(&public).unwrap(),
            public_path: public,
        }
    }

    fn encoding(&self) -> EncodingKey {
        match self.kind {
            Kind::Rsa => EncodingKey::from_rsa_pem(&self.private_pem),
            Kind::Ec => EncodingKey::from_ec_pem(&self.private_pem),
            Kind::Ed => EncodingKey::from_ed_pem(&self.private_pem),
        }
        .unwrap_or_else(|e| panic!("{:?} private key: {e}", self.kind))
    }

    /// A token with `claims` signed by this key, its header naming `kid`.
    fn sign(&self, claims: &Value, kid: Option<&str>) -> String {
        self.sign_as(self.kind.alg(), claims, kid)
    }

    /// Like `sign`, with the header (and signature) of `alg`.
    fn sign_as(&self, alg: Algorithm, claims: &Value, kid: Option<&str>) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&header, claims, &self.encoding()).unwrap()
    }

    /// The public key as a JWK with `kid`.
    fn jwk(&self, kid: &str) -> Jwk {
        let mut jwk = Jwk::from_encoding_key(&self.encoding(), self.kind.alg())
            .unwrap_or_else(|e| panic!("JWK of the {:?} key: {e}", self.kind));
        jwk.common.key_id = Some(kid.to_string());
        jwk
    }
}

// ---------------------------------------------------------------------------------------
// HTTP helpers
// ---------------------------------------------------------------------------------------

/// Settings for a gateway on `db` with `extra` set; with `no_secret`, `auth.secret` is
/// removed (only one key source may be configured).
fn sources_with(db: &TestDb, no_secret: bool, extra: &[(&str, &str)]) -> Sources {
    let mut sources = support::sources(db);
    if no_secret {
        sources.env.retain(|(k, _)| k != "PGFEED_AUTH_SECRET");
    }
    for (k, v) in extra {
        sources.env.retain(|(name, _)| name != k);
        sources.env.push((k.to_string(), v.to_string()));
    }
    sources
}

/// Asserts `r` is a JSON error with `status`; returns its code.
#[track_caller]
fn assert_error(r: &Response, status: u16, what: &str) -> String {
    support::assert_error(r, status, what).0
}

/// The error's message.
fn message(r: &Response) -> String {
    r.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Status of `/v1/position` with `token`: a quick authentication probe that never streams.
async fn probe(addr: SocketAddr, token: &str) -> u16 {
    get_soon(addr, "/v1/position", &[("Authorization", &bearer(token))])
        .await
        .status
}

fn header<'a>(s: &'a SseClient, name: &str) -> Option<&'a str> {
    s.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

// ---------------------------------------------------------------------------------------
// PEM public keys
// ---------------------------------------------------------------------------------------

/// With `auth.public_key_file` holding a key of `kind`: a token signed by its private key
/// streams; another key of the same type, HS256 keyed with the public key's bytes, `alg:
/// none`, a key of another type and another algorithm of the same family are all 401.
async fn pem_key_verifies_only_its_own_signatures(kind: Kind) {
    let dir = TempDir::new("pem");
    let key = Key::generate(&dir, kind, "signer");
    let same_type = Key::generate(&dir, kind, "other");
    let other_type = Key::generate(
        &dir,
        if kind == Kind::Ed { Kind::Ec } else { Kind::Ed },
        "x",
    );
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let path = key.public_path.display().to_string();
    let gw = Gateway::start_with(sources_with(
        &db,
        true,
        &[("PGFEED_AUTH_PUBLIC_KEY_FILE", &path)],
    ))
    .await;

    let good = key.sign(&claims("acme"), None);
    let mut s = assert_streams(gw.addr, "/v1/stream", &[("Authorization", &bearer(&good))]).await;
    // The query parameter carries the same token.
    let mut q = assert_streams(gw.addr, &format!("/v1/stream?access_token={good}"), &[]).await;
    support::insert_note(&db, "globex", "not for acme").await;
    support::insert_note(&db, "acme", "signed").await;
    for stream in [&mut s, &mut q] {
        let change = stream.next_change().await;
        assert_eq!(change["tenant"], "acme", "{change}");
        assert_eq!(change["new"]["body"], "signed", "{change}");
    }

    let c = claims("acme");
    let public_text = String::from_utf8(key.public_pem.clone()).unwrap();
    let mut bad: Vec<(String, String)> = vec![
        (
            "another key of the same type".into(),
            same_type.sign(&c, None),
        ),
        (
            "HS256 keyed with the public key's PEM".into(),
            hs256(&c, &key.public_pem),
        ),
        (
            "HS256 keyed with the trimmed PEM".into(),
            hs256(&c, public_text.trim().as_bytes()),
        ),
        ("alg: none".into(), alg_none(&c)),
        ("a key of another type".into(), other_type.sign(&c, None)),
        (
            "the right key, an expired token".into(),
            key.sign(&json!({"tenant_id": "acme", "exp": now() - 600}), None),
        ),
        (
            "the right key, no tenant".into(),
            key.sign(&json!({"exp": now() + 600}), None),
        ),
    ];
    if kind == Kind::Rsa {
        // Same key, another RSA algorithm: the key decides the algorithm, not the token.
        for alg in [Algorithm::RS384, Algorithm::RS512, Algorithm::PS256] {
            bad.push((
                format!("{alg:?} with the RSA key"),
                key.sign_as(alg, &c, None),
            ));
        }
    }
    // Sanity: the tokens are well-formed and differ from the good one.
    for (what, token) in &bad {
        assert_ne!(token, &good, "{what}");
        let r = get_soon(gw.addr, "/v1/stream", &[("Authorization", &bearer(token))]).await;
        let code = assert_error(&r, 401, what);
        assert!(
            code == "invalid_token" || code == "token_expired",
            "{what}: {code}"
        );
        assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{what}");
        let r = get_soon(gw.addr, &format!("/v1/stream?access_token={token}"), &[]).await;
        assert_error(&r, 401, what);
    }
    // Nothing those requests did reached the open streams, which still work.
    support::insert_note(&db, "acme", "after").await;
    assert_eq!(s.next_change().await["new"]["body"], "after");
    drop((s, q));
    gw.stop().await;
}

#[tokio::test]
async fn rs256_public_key_file() {
    pem_key_verifies_only_its_own_signatures(Kind::Rsa).await;
}

#[tokio::test]
async fn es256_public_key_file() {
    pem_key_verifies_only_its_own_signatures(Kind::Ec).await;
}

#[tokio::test]
async fn eddsa_public_key_file() {
    pem_key_verifies_only_its_own_signatures(Kind::Ed).await;
}

// ---------------------------------------------------------------------------------------
// JWKS
// ---------------------------------------------------------------------------------------

/// Replaces `path` atomically with `text` and an mtime of its own, so that the gateway's
/// check sees a change whatever the filesystem's timestamp granularity.
fn replace_file(path: &Path, text: &str, generation: u64) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    let file = std::fs::File::options().write(true).open(&tmp).unwrap();
    file.set_modified(UNIX_EPOCH + Duration::from_secs(1_700_000_000 + generation * 10))
        .unwrap();
    drop(file);
    std::fs::rename(&tmp, path).unwrap();
}

fn jwks(keys: &[Jwk]) -> String {
    serde_json::to_string(&JwkSet {
        keys: keys.to_vec(),
    })
    .unwrap()
}

/// Polls `/v1/position` with `token` until it answers `status`.
async fn until_probe(addr: SocketAddr, token: &str, status: u16, what: &str) {
    let deadline = Instant::now() + SOON;
    loop {
        let got = probe(addr, token).await;
        if got == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {got} after {SOON:?}, expected {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn jwks_chooses_by_kid_and_follows_rotation() {
    let dir = TempDir::new("jwks");
    let rsa = Key::generate(&dir, Kind::Rsa, "rsa");
    let ec = Key::generate(&dir, Kind::Ec, "ec");
    let ec_stranger = Key::generate(&dir, Kind::Ec, "ec-stranger");
    let ed = Key::generate(&dir, Kind::Ed, "ed");
    let ed_next = Key::generate(&dir, Kind::Ed, "ed-next");
    let path = dir.path("jwks.json");
    replace_file(&path, &jwks(&[rsa.jwk("rsa-1"), ec.jwk("ec-1")]), 0);

    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let path_s = path.display().to_string();
    let gw = Gateway::start_with(sources_with(
        &db,
        true,
        &[("PGFEED_AUTH_JWKS_FILE", &path_s)],
    ))
    .await;

    let c = claims("acme");
    // Each key, chosen by kid, opens a stream that delivers.
    let mut by_rsa = assert_streams(
        gw.addr,
        "/v1/stream",
        &[("Authorization", &bearer(&rsa.sign(&c, Some("rsa-1"))))],
    )
    .await;
    let mut by_ec = assert_streams(
        gw.addr,
        "/v1/stream",
        &[("Authorization", &bearer(&ec.sign(&c, Some("ec-1"))))],
    )
    .await;
    support::insert_note(&db, "acme", "jwks").await;
    assert_eq!(by_rsa.next_change().await["new"]["body"], "jwks");
    assert_eq!(by_ec.next_change().await["new"]["body"], "jwks");
    drop((by_rsa, by_ec));

    for (what, token) in [
        ("an unknown kid", rsa.sign(&c, Some("rsa-2"))),
        ("no kid while the set has two keys", rsa.sign(&c, None)),
        (
            "the RSA key under the EC key's kid",
            rsa.sign(&c, Some("ec-1")),
        ),
        (
            "the EC key under the RSA key's kid",
            ec.sign(&c, Some("rsa-1")),
        ),
        (
            "another EC key under ec-1",
            ec_stranger.sign(&c, Some("ec-1")),
        ),
        (
            "HS256 keyed with the RSA public key",
            hs256_with_kid(&c, &rsa.public_pem, "rsa-1"),
        ),
        ("alg: none", alg_none(&c)),
    ] {
        let r = get_soon(gw.addr, "/v1/stream", &[("Authorization", &bearer(&token))]).await;
        assert_eq!(assert_error(&r, 401, what), "invalid_token", "{what}");
    }

    // Rotation: the RSA key leaves, an Ed25519 key arrives.
    replace_file(&path, &jwks(&[ed.jwk("ed-1"), ec.jwk("ec-1")]), 1);
    let ed_token = ed.sign(&c, Some("ed-1"));
    let rsa_token = rsa.sign(&c, Some("rsa-1"));
    let ec_token = ec.sign(&c, Some("ec-1"));
    until_probe(gw.addr, &ed_token, 200, "the new key is accepted").await;
    assert_eq!(probe(gw.addr, &rsa_token).await, 401, "the removed key");
    assert_eq!(probe(gw.addr, &ec_token).await, 200, "the kept key");
    let mut by_ed = assert_streams(
        gw.addr,
        "/v1/stream",
        &[("Authorization", &bearer(&ed_token))],
    )
    .await;
    support::insert_note(&db, "acme", "rotated").await;
    assert_eq!(by_ed.next_change().await["new"]["body"], "rotated");
    drop(by_ed);

    // A broken update keeps the previous keys: for more than two check periods every
    // request with them is still accepted.
    replace_file(&path, "{\"keys\": [garbage", 2);
    let watch_until = Instant::now() + Duration::from_millis(2500);
    let mut probes = 0;
    while Instant::now() < watch_until {
        assert_eq!(
            probe(gw.addr, &ed_token).await,
            200,
            "a garbage JWKS file must not drop the keys (after {probes} probes)"
        );
        assert_eq!(probe(gw.addr, &rsa_token).await, 401, "nor revive old ones");
        probes += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A set with no usable key is as broken as garbage.
    replace_file(&path, r#"{"keys": []}"#, 3);
    let watch_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < watch_until {
        assert_eq!(probe(gw.addr, &ed_token).await, 200, "an empty key set");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // And the file is still watched: a good update after the broken ones takes effect.
    // With a single key, a token without a kid uses it.
    replace_file(&path, &jwks(&[ed_next.jwk("ed-2")]), 4);
    until_probe(
        gw.addr,
        &ed_next.sign(&c, Some("ed-2")),
        200,
        "the key after a broken update",
    )
    .await;
    assert_eq!(probe(gw.addr, &ed_next.sign(&c, None)).await, 200, "no kid");
    assert_eq!(probe(gw.addr, &ed_token).await, 401, "ed-1 was removed");
    assert_eq!(probe(gw.addr, &ec_token).await, 401, "ec-1 was removed");
    gw.stop().await;
}

fn hs256_with_kid(claims: &Value, secret: &[u8], kid: &str) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret)).unwrap()
}

// ---------------------------------------------------------------------------------------
// Issuer, audience, cookie, tables claim
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn issuer_and_audience_are_required_when_configured() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let gw = Gateway::start_with(sources_with(
        &db,
        false,
        &[
            ("PGFEED_AUTH_ISSUER", "https://auth.example"),
            ("PGFEED_AUTH_AUDIENCE", "pgfeed"),
        ],
    ))
    .await;
    let secret = support::SECRET.as_bytes();
    let exp = now() + 3600;
    let token = |extra: Value| {
        let mut c = json!({"tenant_id": "acme", "exp": exp});
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        hs256(&c, secret)
    };
    for (what, t) in [
        (
            "wrong iss",
            token(json!({"iss": "https://evil.example", "aud": "pgfeed"})),
        ),
        ("missing iss", token(json!({"aud": "pgfeed"}))),
        (
            "wrong aud",
            token(json!({"iss": "https://auth.example", "aud": "other"})),
        ),
        ("missing aud", token(json!({"iss": "https://auth.example"}))),
        (
            "aud list without ours",
            token(json!({"iss": "https://auth.example", "aud": ["a", "b"]})),
        ),
        ("neither", token(json!({}))),
        (
            "iss with a trailing slash",
            token(json!({"iss": "https://auth.example/", "aud": "pgfeed"})),
        ),
    ] {
        let r = get_soon(gw.addr, "/v1/stream", &[("Authorization", &bearer(&t))]).await;
        assert_eq!(assert_error(&r, 401, what), "invalid_token", "{what}");
        assert_eq!(probe(gw.addr, &t).await, 401, "{what} on /v1/position");
    }
    let good = token(json!({"iss": "https://auth.example", "aud": "pgfeed"}));
    let listed = token(json!({"iss": "https://auth.example", "aud": ["x", "pgfeed"]}));
    assert_eq!(
        probe(gw.addr, &listed).await,
        200,
        "aud as a list with ours"
    );
    let mut s = assert_streams(gw.addr, "/v1/stream", &[("Authorization", &bearer(&good))]).await;
    // Minted tokens carry the configured issuer and audience.
    let mut minted = gw.stream("acme", "").await;
    assert_eq!(minted.status, 200);
    minted.until_live().await;
    support::insert_note(&db, "acme", "iss-aud").await;
    assert_eq!(s.next_change().await["new"]["body"], "iss-aud");
    assert_eq!(minted.next_change().await["new"]["body"], "iss-aud");
    drop((s, minted));
    gw.stop().await;
}

#[tokio::test]
async fn token_from_the_configured_cookie() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let gw = Gateway::start_with(sources_with(
        &db,
        false,
        &[("PGFEED_AUTH_COOKIE", "pgfeed_token")],
    ))
    .await;
    let good = gw.token("acme");
    let cookie = format!("other=1; pgfeed_token={good}");
    let mut s = assert_streams(gw.addr, "/v1/stream", &[("Cookie", &cookie)]).await;
    // The cookie first in the header, and quoted, work too.
    let first = format!("pgfeed_token=\"{good}\"; theme=dark");
    let mut f = assert_streams(gw.addr, "/v1/stream", &[("Cookie", &first)]).await;
    support::insert_note(&db, "globex", "other tenant").await;
    support::insert_note(&db, "acme", "by cookie").await;
    assert_eq!(s.next_change().await["new"]["body"], "by cookie");
    assert_eq!(f.next_change().await["new"]["body"], "by cookie");

    let forged = hs256(&claims("acme"), b"not-the-secret-0123456789");
    for (what, value) in [
        (
            "a bad token in the cookie",
            format!("other=1; pgfeed_token={forged}"),
        ),
        ("garbage in the cookie", "pgfeed_token=garbage".to_string()),
        (
            "alg none in the cookie",
            format!("pgfeed_token={}", alg_none(&claims("acme"))),
        ),
    ] {
        let r = get_soon(gw.addr, "/v1/stream", &[("Cookie", &value)]).await;
        assert_eq!(assert_error(&r, 401, what), "invalid_token", "{what}");
    }
    // Another cookie's name, or the token under a name that merely ends like ours, is no
    // token at all.
    for value in [
        format!("session={good}"),
        format!("xpgfeed_token={good}"),
        "pgfeed_token=".to_string(),
    ] {
        let r = get_soon(gw.addr, "/v1/stream", &[("Cookie", &value)]).await;
        assert_eq!(assert_error(&r, 401, &value), "unauthorized", "{value}");
    }
    // The Authorization header takes precedence over the cookie.
    let r = get_soon(
        gw.addr,
        "/v1/stream",
        &[("Authorization", &bearer(&forged)), ("Cookie", &cookie)],
    )
    .await;
    assert_error(&r, 401, "a bad bearer token with a good cookie");
    drop((s, f));
    gw.stop().await;
}

/// Watches tenant tables `orders` and `invoices` on `db`.
async fn orders_and_invoices(db: &TestDb) {
    support::tenant_table(db, "orders").await;
    support::tenant_table(db, "invoices").await;
}

/// A gateway on `db` that limits a token to the tables in its `tables` claim; a token
/// without the claim sees every table if `optional`, else is refused.
async fn tables_claim_gateway(db: &TestDb, optional: bool) -> Gateway {
    let optional = if optional { "true" } else { "false" };
    Gateway::start_with(sources_with(
        db,
        false,
        &[
            ("PGFEED_AUTH_TABLES_CLAIM", "tables"),
            ("PGFEED_AUTH_TABLES_CLAIM_OPTIONAL", optional),
        ],
    ))
    .await
}

#[tokio::test]
async fn tables_claim_limits_what_a_token_sees() {
    let db = TestDb::new().await;
    orders_and_invoices(&db).await;
    let gw = tables_claim_gateway(&db, false).await;
    let token = pgfeed::auth::mint(
        &gw.config.auth,
        "acme",
        Some(&["orders".to_string()]),
        Duration::from_secs(3600),
    )
    .unwrap();
    let auth = bearer(&token);
    for query in [
        "tables=invoices",
        "tables=public.invoices",
        "tables=orders,invoices",
        "tables=nope",
    ] {
        let r = get_soon(
            gw.addr,
            &format!("/v1/stream?{query}"),
            &[("Authorization", &auth)],
        )
        .await;
        assert_eq!(assert_error(&r, 403, query), "forbidden", "{query}");
    }
    // A filter on a table outside the claim is refused too (400: not among its tables).
    let r = get_soon(
        gw.addr,
        "/v1/stream?filter=invoices:body=eq.x",
        &[("Authorization", &auth)],
    )
    .await;
    assert_error(&r, 400, "a filter outside the claim");

    let mut implied = assert_streams(gw.addr, "/v1/stream", &[("Authorization", &auth)]).await;
    let mut asked = assert_streams(
        gw.addr,
        "/v1/stream?tables=public.orders",
        &[("Authorization", &auth)],
    )
    .await;
    // An unclaimed table's change comes first: if it leaked it would be read first.
    let c = db.client().await;
    c.batch_execute(
        "INSERT INTO invoices (tenant, body) VALUES ('acme', 'unclaimed');
         INSERT INTO orders (tenant, body) VALUES ('acme', 'claimed');",
    )
    .await
    .unwrap();
    for s in [&mut implied, &mut asked] {
        let change = s.next_change().await;
        assert_eq!(change["table"], "public.orders", "{change}");
        assert_eq!(change["new"]["body"], "claimed");
        s.assert_quiet(Duration::from_millis(300)).await;
        assert!(!s.raw.contains("unclaimed"), "{}", s.raw);
    }
    // A claim of the wrong shape is a 401.
    let bad = hs256(
        &json!({"tenant_id": "acme", "exp": now() + 600, "tables": "orders"}),
        support::SECRET.as_bytes(),
    );
    let r = get_soon(gw.addr, "/v1/stream", &[("Authorization", &bearer(&bad))]).await;
    assert_error(&r, 401, "tables claim not an array");
    drop((implied, asked));
    gw.stop().await;
}

/// With `auth.tables_claim` configured, a token its issuer forgot to limit (no claim at
/// all) is refused with its own code, on the stream and on `/v1/position`, rather than
/// seeing every table; `auth.tables_claim_optional = true` lets it see every table.
#[tokio::test]
async fn a_token_without_the_tables_claim_is_refused_unless_optional() {
    let db = TestDb::new().await;
    orders_and_invoices(&db).await;
    let gw = tables_claim_gateway(&db, false).await;
    let claimless = bearer(&gw.token("acme"));
    for path in ["/v1/stream", "/v1/stream?tables=invoices", "/v1/position"] {
        let r = get_soon(gw.addr, path, &[("Authorization", &claimless)]).await;
        assert_eq!(
            assert_error(&r, 403, path),
            "tables_claim_missing",
            "{path}"
        );
        assert!(r.body.contains("`tables`"), "{path}: {}", r.body);
    }
    // An empty list is a claim: it allows nothing, and asking for a table is forbidden.
    let empty =
        pgfeed::auth::mint(&gw.config.auth, "acme", Some(&[]), Duration::from_secs(600)).unwrap();
    let r = get_soon(
        gw.addr,
        "/v1/stream?tables=orders",
        &[("Authorization", &bearer(&empty))],
    )
    .await;
    assert_eq!(assert_error(&r, 403, "empty claim"), "forbidden");
    gw.stop().await;

    let gw = tables_claim_gateway(&db, true).await;
    let mut all = gw.stream("acme", "").await;
    assert_eq!(all.status, 200, "{}", all.raw);
    all.until_live().await;
    db.client()
        .await
        .batch_execute("INSERT INTO invoices (tenant, body) VALUES ('acme', 'everyone')")
        .await
        .unwrap();
    assert_eq!(all.next_change().await["table"], "public.invoices");
    drop(all);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// trusted_header and none modes
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn trusted_header_mode_takes_the_tenant_from_the_header() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let gw = Gateway::start_with(sources_with(
        &db,
        true,
        &[("PGFEED_AUTH_MODE", "trusted_header")],
    ))
    .await;
    let mut acme = assert_streams(gw.addr, "/v1/stream", &[("X-Tenant-Id", "acme")]).await;
    // Header names are case-insensitive.
    let mut lower = assert_streams(gw.addr, "/v1/stream", &[("x-tenant-id", "acme")]).await;
    support::insert_note(&db, "globex", "for globex").await;
    support::insert_note(&db, "acme", "for acme").await;
    assert_eq!(acme.next_change().await["new"]["body"], "for acme");
    assert_eq!(lower.next_change().await["new"]["body"], "for acme");

    let r = get_soon(gw.addr, "/v1/stream", &[]).await;
    assert_error(&r, 401, "no tenant header");
    assert!(message(&r).contains("x-tenant-id"), "{}", message(&r));
    let r = get_soon(gw.addr, "/v1/stream", &[("X-Tenant-Id", "  ")]).await;
    assert_error(&r, 401, "a blank tenant header");
    // A token is no substitute for the header, and `tenant=` is for `none` mode only.
    let token = pgfeed::auth::mint(
        &pgfeed::config::AuthConfig::hs256(support::SECRET),
        "acme",
        None,
        Duration::from_secs(60),
    )
    .unwrap();
    let r = get_soon(gw.addr, "/v1/stream", &[("Authorization", &bearer(&token))]).await;
    assert_error(&r, 401, "a token in trusted_header mode");
    let r = get_soon(
        gw.addr,
        "/v1/stream?tenant=acme",
        &[("X-Tenant-Id", "globex")],
    )
    .await;
    assert_error(&r, 400, "tenant= in trusted_header mode");
    drop((acme, lower));
    gw.stop().await;
}

#[tokio::test]
async fn trusted_header_mode_with_a_custom_header() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let gw = Gateway::start_with(sources_with(
        &db,
        true,
        &[
            ("PGFEED_AUTH_MODE", "trusted_header"),
            ("PGFEED_AUTH_TENANT_HEADER", "X-Org"),
        ],
    ))
    .await;
    let mut s = assert_streams(gw.addr, "/v1/stream", &[("X-Org", "acme")]).await;
    support::insert_note(&db, "globex", "no").await;
    support::insert_note(&db, "acme", "yes").await;
    assert_eq!(s.next_change().await["new"]["body"], "yes");
    let r = get_soon(gw.addr, "/v1/stream", &[("X-Tenant-Id", "acme")]).await;
    assert!(
        assert_error(&r, 401, "the default header when another is configured").len() > 1
            && message(&r).contains("x-org"),
        "{r:?}"
    );
    drop(s);
    gw.stop().await;
}

#[tokio::test]
async fn header_modes_are_refused_on_a_non_loopback_address() {
    let base = |mode: &str, listen: &str| -> Vec<(String, String)> {
        vec![
            ("DATABASE_URL".into(), "postgres://x@127.0.0.1/y".into()),
            ("PGFEED_AUTH_MODE".into(), mode.into()),
            ("PGFEED_SERVER_LISTEN".into(), listen.into()),
        ]
    };
    let load = |env: Vec<(String, String)>| {
        Config::load(&Sources {
            env,
            ..Default::default()
        })
    };
    for mode in ["trusted_header", "none"] {
        for listen in ["0.0.0.0:8080", "[::]:8080", "192.0.2.10:8080"] {
            let err = load(base(mode, listen))
                .map(|_| ())
                .expect_err(&format!("{mode} on {listen} must be refused"))
                .to_string();
            assert!(
                err.contains("auth.mode") && err.contains("allow_remote"),
                "{mode} on {listen}: the error names the key and the way out: {err}"
            );
            let mut allowed = base(mode, listen);
            allowed.push(("PGFEED_AUTH_ALLOW_REMOTE".into(), "true".into()));
            let config = load(allowed).unwrap_or_else(|e| panic!("{mode} on {listen}: {e}"));
            assert_eq!(config.server.listen, listen.parse().unwrap());
            let mut denied = base(mode, listen);
            denied.push(("PGFEED_AUTH_ALLOW_REMOTE".into(), "false".into()));
            assert!(
                load(denied).is_err(),
                "{mode} on {listen}, allow_remote=false"
            );
        }
        for listen in ["127.0.0.1:8080", "[::1]:8080"] {
            load(base(mode, listen)).unwrap_or_else(|e| panic!("{mode} on {listen}: {e}"));
        }
    }
    // jwt mode is fine anywhere.
    let mut jwt = base("jwt", "0.0.0.0:8080");
    jwt.push(("PGFEED_AUTH_SECRET".into(), support::SECRET.into()));
    load(jwt).expect("jwt on 0.0.0.0");
}

#[tokio::test]
async fn none_mode_takes_the_tenant_from_the_query() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let gw = Gateway::start_with(sources_with(&db, true, &[("PGFEED_AUTH_MODE", "none")])).await;
    let mut acme = assert_streams(gw.addr, "/v1/stream?tenant=acme", &[]).await;
    let mut by_header = assert_streams(gw.addr, "/v1/stream", &[("X-Tenant-Id", "globex")]).await;
    support::insert_note(&db, "globex", "globex row").await;
    support::insert_note(&db, "acme", "acme row").await;
    assert_eq!(acme.next_change().await["new"]["body"], "acme row");
    assert_eq!(by_header.next_change().await["new"]["body"], "globex row");
    acme.assert_quiet(Duration::from_millis(200)).await;
    assert!(!acme.raw.contains("globex row"));
    let r = get_soon(gw.addr, "/v1/stream", &[]).await;
    assert_error(&r, 401, "none mode without any tenant");
    drop((acme, by_header));
    gw.stop().await;

    // In jwt mode, `tenant=` is refused even with a valid token.
    let gw = Gateway::start(&db).await;
    let auth = bearer(&gw.token("acme"));
    let r = get_soon(
        gw.addr,
        "/v1/stream?tenant=acme",
        &[("Authorization", &auth)],
    )
    .await;
    assert_eq!(assert_error(&r, 400, "tenant= in jwt mode"), "bad_request");
    assert!(message(&r).contains("tenant"), "{}", message(&r));
    let r = get_soon(
        gw.addr,
        "/v1/position?tenant=globex",
        &[("Authorization", &auth)],
    )
    .await;
    assert_error(&r, 400, "tenant= on /v1/position in jwt mode");
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// CORS
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn cors_answers_allowed_origins_only() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let gw = Gateway::start_with(sources_with(
        &db,
        false,
        &[(
            "PGFEED_CORS_ALLOWED_ORIGINS",
            "https://app.example, https://admin.example",
        )],
    ))
    .await;
    let wait = SOON;
    for origin in ["https://app.example", "https://admin.example"] {
        let r = request(
            gw.addr,
            "OPTIONS",
            "/v1/stream",
            &[
                ("Origin", origin),
                ("Access-Control-Request-Method", "GET"),
                (
                    "Access-Control-Request-Headers",
                    "authorization, last-event-id",
                ),
            ],
            wait,
        )
        .await;
        assert_eq!(r.status, 204, "preflight from {origin}: {r:?}");
        assert_eq!(
            r.header("access-control-allow-origin"),
            Some(origin),
            "{r:?}"
        );
        assert_eq!(
            r.header("access-control-allow-credentials"),
            Some("true"),
            "{r:?}"
        );
        let allowed: Vec<String> = r
            .header("access-control-allow-headers")
            .unwrap_or_default()
            .split(',')
            .map(|h| h.trim().to_ascii_lowercase())
            .collect();
        for needed in ["authorization", "last-event-id"] {
            assert!(
                allowed.iter().any(|h| h == needed),
                "{needed} in {allowed:?}"
            );
        }
        assert!(
            r.header("access-control-allow-methods")
                .unwrap_or_default()
                .contains("GET"),
            "{r:?}"
        );
        assert!(r.body.is_empty(), "{r:?}");
        // Caches must keep answers for different origins apart.
        assert!(
            r.headers
                .iter()
                .any(|(k, v)| k == "vary" && v.to_ascii_lowercase().contains("origin")),
            "{r:?}"
        );
    }

    // A stream read from an allowed origin carries the CORS headers.
    let auth = bearer(&gw.token("acme"));
    let mut s = assert_streams(
        gw.addr,
        "/v1/stream",
        &[("Authorization", &auth), ("Origin", "https://app.example")],
    )
    .await;
    assert_eq!(
        header(&s, "access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(header(&s, "access-control-allow-credentials"), Some("true"));
    support::insert_note(&db, "acme", "cors").await;
    assert_eq!(s.next_change().await["new"]["body"], "cors");
    // Errors too, so that the page can read why.
    let r = get_soon(gw.addr, "/v1/stream", &[("Origin", "https://app.example")]).await;
    assert_error(&r, 401, "no token from an allowed origin");
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example")
    );

    // Another origin: no CORS headers, and its preflight is refused.
    let mut other = assert_streams(
        gw.addr,
        "/v1/stream",
        &[("Authorization", &auth), ("Origin", "https://evil.example")],
    )
    .await;
    assert_eq!(header(&other, "access-control-allow-origin"), None);
    assert_eq!(header(&other, "access-control-allow-credentials"), None);
    other.assert_quiet(Duration::from_millis(50)).await;
    for (what, origin) in [
        ("another origin", Some("https://evil.example")),
        ("a prefix of an allowed origin", Some("https://app.exampl")),
        (
            "an allowed origin with a path",
            Some("https://app.example/x"),
        ),
        ("http instead of https", Some("http://app.example")),
        ("no origin", None),
    ] {
        let mut headers = vec![("Access-Control-Request-Method", "GET")];
        if let Some(o) = origin {
            headers.push(("Origin", o));
        }
        let r = request(gw.addr, "OPTIONS", "/v1/stream", &headers, wait).await;
        assert_eq!(assert_error(&r, 403, what), "origin_not_allowed", "{what}");
        assert_eq!(r.header("access-control-allow-origin"), None, "{what}");
        assert_eq!(r.header("access-control-allow-credentials"), None, "{what}");
    }
    drop((s, other));
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------

/// Checks that a limit rejection tells the client when to come back.
#[track_caller]
fn assert_retry_after(r: &Response, what: &str) {
    let value = r.header("retry-after").unwrap_or_else(|| {
        panic!(
            "{what}: the README promises `Retry-After` on this rejection, the response has none: {r:?}"
        )
    });
    let secs: u64 = value
        .parse()
        .unwrap_or_else(|_| panic!("{what}: Retry-After is delay-seconds: {value:?}"));
    assert!((1..=3600).contains(&secs), "{what}: Retry-After {secs}");
}

/// Opens streams as `tenant` until one is accepted, each refused with `status`.
async fn until_accepted(gw: &Gateway, tenant: &str, status: u16, what: &str) -> SseClient {
    let deadline = Instant::now() + SOON;
    loop {
        let s = gw.stream(tenant, "").await;
        if s.status == 200 {
            return s;
        }
        assert_eq!(s.status, status, "{what}: {}", s.raw);
        assert!(
            Instant::now() < deadline,
            "{what}: still refused after {SOON:?}"
        );
        drop(s);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn per_tenant_stream_limit() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let gw = Gateway::start_with(sources_with(
        &db,
        false,
        &[
            ("PGFEED_SERVER_MAX_SUBSCRIBERS_PER_TENANT", "2"),
            // A closed stream is noticed on its next write.
            ("PGFEED_SERVER_HEARTBEAT", "200ms"),
        ],
    ))
    .await;
    let auth = bearer(&gw.token("acme"));
    let a1 = assert_streams(gw.addr, "/v1/stream", &[("Authorization", &auth)]).await;
    let mut a2 = assert_streams(gw.addr, "/v1/stream", &[("Authorization", &auth)]).await;
    let third = get_soon(gw.addr, "/v1/stream", &[("Authorization", &auth)]).await;
    assert_eq!(
        assert_error(&third, 429, "a third stream of one tenant"),
        "too_many_streams"
    );
    let mut g = assert_streams(
        gw.addr,
        "/v1/stream",
        &[("Authorization", &bearer(&gw.token("globex")))],
    )
    .await;
    // The refused request registered nothing: the open streams still deliver.
    support::insert_note(&db, "acme", "a").await;
    support::insert_note(&db, "globex", "g").await;
    assert_eq!(a2.next_change().await["new"]["body"], "a");
    assert_eq!(g.next_change().await["new"]["body"], "g");

    // Closing one stream frees its place.
    drop(a1);
    let mut a3 = until_accepted(&gw, "acme", 429, "after closing a stream").await;
    a3.until_live().await;
    let again = get_soon(gw.addr, "/v1/stream", &[("Authorization", &auth)]).await;
    assert_error(&again, 429, "full again");
    drop((a2, a3, g));
    assert_retry_after(&third, "429 for a tenant at its limit");
    gw.stop().await;
}

#[tokio::test]
async fn total_stream_limit() {
    let db = TestDb::new().await;
    let gw = Gateway::start_with(sources_with(
        &db,
        false,
        &[
            ("PGFEED_SERVER_MAX_SUBSCRIBERS", "3"),
            ("PGFEED_SERVER_HEARTBEAT", "200ms"),
        ],
    ))
    .await;
    let mut open = Vec::new();
    for tenant in ["t1", "t2", "t3"] {
        let auth = bearer(&gw.token(tenant));
        open.push(assert_streams(gw.addr, "/v1/stream", &[("Authorization", &auth)]).await);
    }
    let mut refused = Vec::new();
    for tenant in ["t4", "t1"] {
        let auth = bearer(&gw.token(tenant));
        let r = get_soon(gw.addr, "/v1/stream", &[("Authorization", &auth)]).await;
        assert_eq!(
            assert_error(&r, 503, &format!("a fourth stream ({tenant})")),
            "too_many_streams"
        );
        refused.push(r);
    }
    // Other routes still answer.
    let r = get_soon(
        gw.addr,
        "/v1/position",
        &[("Authorization", &bearer(&gw.token("t4")))],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    open.remove(0);
    let s = until_accepted(&gw, "t4", 503, "after closing a stream").await;
    assert_eq!(s.status, 200);
    drop((open, s));
    assert_retry_after(&refused[0], "503 at the total limit");
    gw.stop().await;
}

#[tokio::test]
async fn stream_rate_limit_per_tenant() {
    let db = TestDb::new().await;
    let gw = Gateway::start_with(sources_with(
        &db,
        false,
        &[("PGFEED_SERVER_MAX_STREAM_RATE", "1")],
    ))
    .await;
    let auth = bearer(&gw.token("acme"));
    let mut open = Vec::new();
    let mut limited = None;
    // One a second, bursts of two: well within ten quick attempts one is refused.
    for _ in 0..10 {
        let s = SseClient::open(gw.addr, "/v1/stream", &[("Authorization", &auth)]).await;
        if s.status == 200 {
            open.push(s);
            continue;
        }
        drop(s);
        limited = Some(get_soon(gw.addr, "/v1/stream", &[("Authorization", &auth)]).await);
        break;
    }
    let limited = limited.expect("rapid new streams of one tenant are rate limited");
    assert!(
        !open.is_empty() && open.len() <= 3,
        "the burst is about two: {} accepted",
        open.len()
    );
    assert_eq!(
        assert_error(&limited, 429, "rapid new streams"),
        "rate_limited"
    );
    // Another tenant has its own budget.
    let g = assert_streams(
        gw.addr,
        "/v1/stream",
        &[("Authorization", &bearer(&gw.token("globex")))],
    )
    .await;
    // And the budget refills.
    let again = until_accepted(&gw, "acme", 429, "after the budget refills").await;
    drop((open, g, again));
    assert_retry_after(&limited, "429 rate_limited");
    gw.stop().await;
}

#[tokio::test]
async fn query_and_header_size_limits() {
    let db = TestDb::new().await;
    let gw = Gateway::start(&db).await;
    // Without a token: under the limits a request gets its ordinary error, over them it
    // is refused for its size first.
    let query_at = |len: usize| format!("/v1/stream?x={}", "a".repeat(len - 2));
    let r = get_soon(gw.addr, &query_at(8 * 1024 + 1), &[]).await;
    assert_eq!(assert_error(&r, 414, "query over 8 KiB"), "uri_too_long");
    // Up to the HTTP layer's own bound (a head of 64 KiB), the refusal is still JSON.
    let r = get_soon(gw.addr, &query_at(60 * 1024), &[]).await;
    assert_error(&r, 414, "query of 60 KiB");
    let r = get_soon(gw.addr, &query_at(8 * 1024), &[]).await;
    assert_error(&r, 400, "query of exactly 8 KiB is parsed");

    // Header bytes counted as name + value + 4 per header: Host and Connection are sent
    // too, so a pad of 16 KiB is over and 15 KiB under.
    let pad = |len: usize| "p".repeat(len);
    let under = pad(15 * 1024);
    let r = get_soon(gw.addr, "/v1/stream", &[("X-Pad", &under)]).await;
    assert_eq!(
        assert_error(&r, 401, "headers under 16 KiB"),
        "unauthorized"
    );
    let over = pad(16 * 1024);
    let r = get_soon(gw.addr, "/v1/stream", &[("X-Pad", &over)]).await;
    assert_eq!(
        assert_error(&r, 431, "headers over 16 KiB"),
        "headers_too_large"
    );
    // Many small headers add up.
    let small = pad(1000);
    let many: Vec<(String, &str)> = (0..20)
        .map(|i| (format!("X-Pad-{i}"), small.as_str()))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    let r = get_soon(gw.addr, "/v1/stream", &many).await;
    assert_error(&r, 431, "twenty 1 KB headers");
    let big = pad(40 * 1024);
    let r = get_soon(gw.addr, "/v1/position", &[("X-Pad", &big)]).await;
    assert_error(&r, 431, "40 KiB of headers on /v1/position");
    // Even with a valid token: size is checked before anything else.
    let auth = bearer(&gw.token("acme"));
    let r = get_soon(
        gw.addr,
        "/v1/stream",
        &[("Authorization", &auth), ("X-Pad", &over)],
    )
    .await;
    assert_error(&r, 431, "a valid token with oversized headers");
    let mut long_query = query_at(9 * 1024);
    long_query = long_query.replacen("x=", "tables=", 1);
    let r = get_soon(gw.addr, &long_query, &[("Authorization", &auth)]).await;
    assert_error(&r, 414, "a valid token with an oversized query");
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// Rejections cost no database work
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn rejections_answer_while_the_database_hangs() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    // A proxy to PostgreSQL that will be cut: from then on no byte moves on any
    // connection, old or new, but no socket is closed, so database work hangs instead of
    // failing fast.
    let proxy = support::Proxy::start(&db.url).await;
    let gw = Gateway::start_with(sources_with(
        &db,
        false,
        &[
            ("DATABASE_URL", &proxy.url(&db.url)),
            ("PGFEED_SERVER_MAX_SUBSCRIBERS_PER_TENANT", "2"),
            ("PGFEED_AUTH_TABLES_CLAIM", "tables"),
            ("PGFEED_AUTH_TABLES_CLAIM_OPTIONAL", "true"),
            // Database work hangs for a minute rather than failing within the test's bound.
            ("PGFEED_DATABASE_QUERY_TIMEOUT", "60s"),
            ("PGFEED_SERVER_SHUTDOWN_GRACE", "1s"),
        ],
    ))
    .await;
    let auth = bearer(&gw.token("acme"));
    let a1 = assert_streams(gw.addr, "/v1/stream", &[("Authorization", &auth)]).await;
    let a2 = assert_streams(gw.addr, "/v1/stream", &[("Authorization", &auth)]).await;
    proxy.hold();
    proxy.freeze_existing();

    // The control: anything that needs the database now hangs.
    let position = tokio::time::timeout(
        Duration::from_millis(1500),
        support::get(gw.addr, "/v1/position", &[("Authorization", &auth)]),
    )
    .await;
    assert!(
        position.is_err(),
        "the database should be unreachable now, yet /v1/position answered: {position:?}"
    );

    let limited = pgfeed::auth::mint(
        &gw.config.auth,
        "acme",
        Some(&["notes".to_string()]),
        Duration::from_secs(600),
    )
    .unwrap();
    let globex = bearer(&gw.token("globex"));
    let long_query = format!("/v1/stream?x={}", "a".repeat(9000));
    let big = "p".repeat(17 * 1024);
    let quick = Duration::from_secs(3);
    type Case<'a> = (&'a str, &'a str, &'a str, Vec<(&'a str, &'a str)>, u16);
    let limited_auth = bearer(&limited);
    let cases: Vec<Case> = vec![
        ("no token", "GET", "/v1/stream", vec![], 401),
        (
            "bad token",
            "GET",
            "/v1/position",
            vec![("Authorization", "Bearer x.y.z")],
            401,
        ),
        (
            "unknown parameter",
            "GET",
            "/v1/stream?nope=1",
            vec![("Authorization", &auth)],
            400,
        ),
        (
            "filter on an unknown column",
            "GET",
            "/v1/stream?filter=notes:nope=eq.1",
            vec![("Authorization", &auth)],
            400,
        ),
        (
            "unwatched table",
            "GET",
            "/v1/stream?tables=nope",
            vec![("Authorization", &auth)],
            400,
        ),
        (
            "table outside the claim",
            "GET",
            "/v1/stream?tables=orders",
            vec![("Authorization", &limited_auth)],
            403,
        ),
        (
            "bad Last-Event-ID",
            "GET",
            "/v1/stream",
            vec![("Authorization", &globex), ("Last-Event-ID", "abc")],
            400,
        ),
        (
            "tenant at its limit",
            "GET",
            "/v1/stream",
            vec![("Authorization", &auth)],
            429,
        ),
        ("query too long", "GET", &long_query, vec![], 414),
        (
            "headers too large",
            "GET",
            "/v1/stream",
            vec![("X-Pad", &big)],
            431,
        ),
        ("unknown route", "GET", "/v2/stream", vec![], 404),
        ("other method", "POST", "/v1/stream", vec![], 405),
        (
            "preflight without CORS",
            "OPTIONS",
            "/v1/stream",
            vec![("Origin", "https://x.example")],
            403,
        ),
    ];
    for (what, method, path, headers, status) in cases {
        let r = request(gw.addr, method, path, &headers, quick).await;
        assert_error(&r, status, what);
    }
    drop((a1, a2));
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// Row filters
// ---------------------------------------------------------------------------------------

/// The changes of `s` as `table op id` until the insert of order `last`.
async fn changes_until(s: &mut SseClient, last: i32) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let c = s.next_change().await;
        let table = c["table"].as_str().unwrap().trim_start_matches("public.");
        let row = if c["op"] == "delete" {
            &c["old"]
        } else {
            &c["new"]
        };
        let id = row["id"].as_i64().unwrap();
        out.push(format!("{table} {} {id}", c["op"].as_str().unwrap()));
        if table == "orders" && c["op"] == "insert" && id == i64::from(last) {
            return out;
        }
    }
}

#[tokio::test]
async fn row_filters_end_to_end() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE orders (id int PRIMARY KEY, tenant text NOT NULL, status text,
                              amount numeric, shipped_at timestamptz, secret text);
         SELECT pgfeed.watch('orders', 'tenant', '{secret}');",
    )
    .await
    .unwrap();
    let gw = Gateway::start(&db).await;
    let open = |query: &'static str| {
        let gw = &gw;
        async move {
            let mut s = gw.stream("acme", query).await;
            assert_eq!(s.status, 200, "?{query}: {}", s.raw);
            s.until_live().await;
            s
        }
    };
    let mut in_list = open("filter=orders:status=in.(shipped,paid)").await;
    let mut big = open("filter=orders:amount=gte.100").await;
    let mut unshipped = open("filter=orders:shipped_at=is.null").await;
    let mut both = open("filter=orders:status=eq.paid&filter=public.orders:amount=gte.100").await;
    let mut all = open("").await;
    let mut keys = open("filter=orders:status=in.(shipped,paid)&payload=keys").await;

    c.batch_execute(
        "INSERT INTO orders VALUES (1, 'acme', 'new', 50, NULL, 's1');
         INSERT INTO orders VALUES (2, 'acme', 'paid', 150, NULL, 's2');
         INSERT INTO orders VALUES (3, 'acme', 'shipped', 99.5, now(), 's3');
         INSERT INTO orders VALUES (4, 'acme', 'paid', 20, NULL, 's4');
         UPDATE orders SET status = 'cancelled' WHERE id = 2;
         UPDATE orders SET amount = 40 WHERE id = 1;
         DELETE FROM orders WHERE id = 3;
         DELETE FROM orders WHERE id = 1;
         INSERT INTO orders VALUES (100, 'globex', 'paid', 500, NULL, 'g');
         INSERT INTO notes (id, tenant, body) VALUES (7, 'acme', 'unfiltered table');
         INSERT INTO orders VALUES (5, 'acme', 'paid', 1000, NULL, 's5');",
    )
    .await
    .unwrap();

    let expect = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        changes_until(&mut in_list, 5).await,
        expect(&[
            "orders insert 2",
            "orders insert 3",
            "orders insert 4",
            "orders update 2", // moved out of the filter: delivered so the client can drop it
            "orders delete 3", // matched on old
            "notes insert 7",
            "orders insert 5",
        ]),
        "status=in.(shipped,paid)"
    );
    assert_eq!(
        changes_until(&mut big, 5).await,
        expect(&[
            "orders insert 2", // 20 and 99.5 are below 100 as numbers ("20" >= "100" as text)
            "orders update 2",
            "notes insert 7",
            "orders insert 5",
        ]),
        "amount=gte.100"
    );
    assert_eq!(
        changes_until(&mut unshipped, 5).await,
        expect(&[
            "orders insert 1",
            "orders insert 2",
            "orders insert 4",
            "orders update 2",
            "orders update 1",
            "orders delete 1",
            "notes insert 7",
            "orders insert 5",
        ]),
        "shipped_at=is.null"
    );
    assert_eq!(
        changes_until(&mut both, 5).await,
        expect(&[
            "orders insert 2",
            "orders update 2",
            "notes insert 7",
            "orders insert 5"
        ]),
        "status=eq.paid AND amount=gte.100"
    );
    assert_eq!(
        changes_until(&mut all, 5).await,
        expect(&[
            "orders insert 1",
            "orders insert 2",
            "orders insert 3",
            "orders insert 4",
            "orders update 2",
            "orders update 1",
            "orders delete 3",
            "orders delete 1",
            "notes insert 7",
            "orders insert 5",
        ]),
        "no filter"
    );
    // payload=keys still filters on the rows it does not send.
    let mut key_ids = Vec::new();
    loop {
        let c = keys.next_change().await;
        assert!(c.get("new").is_none() && c.get("old").is_none(), "{c}");
        key_ids.push(format!("{} {}", c["op"].as_str().unwrap(), c["pk"]["id"]));
        if c["op"] == "insert" && c["pk"]["id"] == 5 {
            break;
        }
    }
    assert_eq!(
        key_ids,
        expect(&[
            "insert 2", "insert 3", "insert 4", "update 2", "delete 3", "insert 7", "insert 5"
        ])
    );
    for s in [&in_list, &big, &unshipped, &both, &all, &keys] {
        assert!(!s.raw.contains("globex"), "{}", s.raw);
        // The excluded column's values (s1..s5) never leave the database.
        for value in ["\"s1\"", "\"s2\"", "\"s3\"", "\"s4\"", "\"s5\""] {
            assert!(!s.raw.contains(value), "excluded column sent: {}", s.raw);
        }
    }

    // Refusals.
    let auth = bearer(&gw.token("acme"));
    let many = vec!["filter=orders:id=gt.0"; 17].join("&");
    for (query, status, names) in [
        ("filter=orders:nope=eq.1", 400, "nope"),
        ("filter=orders:secret=eq.s1", 400, "secret"),
        ("filter=nope:id=eq.1", 400, "nope"),
        ("filter=crm.orders:id=eq.1", 400, "crm.orders"),
        ("tables=notes&filter=orders:id=eq.1", 400, "orders"),
        ("filter=orders:status=like.x", 400, "like"),
        ("filter=orders:status=in.shipped", 400, "in"),
        ("filter=orders:status", 400, "filter"),
        (many.as_str(), 400, "16"),
    ] {
        let r = get_soon(
            gw.addr,
            &format!("/v1/stream?{query}"),
            &[("Authorization", &auth)],
        )
        .await;
        assert_eq!(assert_error(&r, status, query), "bad_request", "{query}");
        assert!(message(&r).contains(names), "{query}: {}", message(&r));
    }
    drop((in_list, big, unshipped, both, all, keys));
    gw.stop().await;
}
