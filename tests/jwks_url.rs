//! `auth.jwks_url` end to end (issue 19, item 3): a real gateway on a real PostgreSQL
//! fetching its keys from an HTTP server this test runs, which counts the fetches and can
//! change its keys (rotation) and answer slowly.
//!
//! Keys are generated at test time with the `openssl` command, as in `tests/auth_modes.rs`.

use pgfeed_testkit as support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pgfeed::config::{Config, Sources};
use serde_json::{Value, json};
use support::{Gateway, SOON, TempDir, TestDb, assert_streams, get_soon};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn claims(tenant: &str) -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    json!({"tenant_id": tenant, "exp": now + 3600})
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

// ---------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("running `openssl` failed ({e}): these tests generate their keys with it")
        });
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A key pair made by openssl: Ed25519 (EdDSA) or P-256 (ES256).
struct Key {
    alg: Algorithm,
    encoding: EncodingKey,
}

impl Key {
    fn generate(dir: &TempDir, alg: Algorithm, name: &str) -> Key {
        let raw = dir.0.join(format!("{name}.raw.pem")).display().to_string();
        let private = dir.0.join(format!("{name}.key.pem"));
        let mut args = vec!["genpkey", "-out", &raw];
        match alg {
            Algorithm::EdDSA => args.extend(["-algorithm", "ED25519"]),
            Algorithm::ES256 => {
                args.extend(["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"])
            }
            other => panic!("no {other:?} keys here"),
        }
        openssl(&args);
        let private_s = private.display().to_string();
        openssl(&[
            "pkcs8", "-topk8", "-nocrypt", "-in", &raw, "-out", &private_s,
        ]);
        let pem = std::fs::read(&private).unwrap();
        let encoding = match alg {
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
            _ => EncodingKey::from_ec_pem(&pem),
        }
        .unwrap();
        Key { alg, encoding }
    }

    fn sign(&self, claims: &Value, kid: &str) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(kid.to_string());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }

    /// The public key as a JWK with `kid` and, when given, `use`.
    fn jwk(&self, kid: &str, usage: Option<PublicKeyUse>) -> Jwk {
        let mut jwk = Jwk::from_encoding_key(&self.encoding, self.alg).unwrap();
        jwk.common.key_id = Some(kid.to_string());
        jwk.common.public_key_use = usage;
        jwk
    }
}

fn jwks(keys: &[Jwk]) -> String {
    serde_json::to_string(&JwkSet {
        keys: keys.to_vec(),
    })
    .unwrap()
}

// ---------------------------------------------------------------------------------------
// The JWKS server
// ---------------------------------------------------------------------------------------

/// What the server answers, changed by the test as it goes.
struct Served {
    body: String,
    cache_control: String,
    delay: Duration,
}

/// An HTTP/1.1 server answering every request with the current JWKS, counting requests.
struct JwksServer {
    url: String,
    served: Arc<Mutex<Served>>,
    fetches: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl JwksServer {
    async fn start(body: String, cache_control: &str) -> JwksServer {
        JwksServer::start_on(body, cache_control, None).await
    }

    /// [`JwksServer::start`] over TLS with `tls`, at an `https://localhost` URL.
    async fn start_tls(
        body: String,
        cache_control: &str,
        tls: tokio_rustls::TlsAcceptor,
    ) -> JwksServer {
        JwksServer::start_on(body, cache_control, Some(tls)).await
    }

    async fn start_on(
        body: String,
        cache_control: &str,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let url = match tls {
            Some(_) => format!("https://localhost:{port}/.well-known/jwks.json"),
            None => format!("http://127.0.0.1:{port}/.well-known/jwks.json"),
        };
        let served = Arc::new(Mutex::new(Served {
            body,
            cache_control: cache_control.to_string(),
            delay: Duration::ZERO,
        }));
        let fetches = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (s, f, st) = (served.clone(), fetches.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (conn, _) = tokio::select! {
                    () = st.cancelled() => return,
                    accepted = listener.accept() => accepted.unwrap(),
                };
                let (s, f, tls) = (s.clone(), f.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        Some(tls) => {
                            if let Ok(conn) = tls.accept(conn).await {
                                answer(conn, &s, &f).await;
                            }
                        }
                        None => answer(conn, &s, &f).await,
                    }
                });
            }
        });
        JwksServer {
            url,
            served,
            fetches,
            stop,
        }
    }

    fn serve(&self, body: String) {
        self.served.lock().unwrap().body = body;
    }

    fn delay(&self, delay: Duration) {
        self.served.lock().unwrap().delay = delay;
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

/// Answers one request on `conn` with what is `served`, counting it in `fetches`.
async fn answer<S>(mut conn: S, served: &Mutex<Served>, fetches: &AtomicUsize)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
        // A TLS ClientHello where plain HTTP was expected: not answered.
        if request.first() == Some(&0x16) {
            return;
        }
    }
    fetches.fetch_add(1, Ordering::SeqCst);
    let (body, cache_control, delay) = {
        let s = served.lock().unwrap();
        (s.body.clone(), s.cache_control.clone(), s.delay)
    };
    tokio::time::sleep(delay).await;
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
         cache-control: {cache_control}\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(response.as_bytes()).await;
    let _ = conn.shutdown().await;
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Settings for a gateway on `db` in jwt mode with `auth.jwks_url` = `url` (and no secret:
/// only one key source may be set).
fn sources(db: &TestDb, url: &str) -> Sources {
    let mut sources = support::sources_with(
        db,
        &[("PGFEED_AUTH_MODE", "jwt"), ("PGFEED_AUTH_JWKS_URL", url)],
    );
    sources.env.retain(|(k, _)| k != "PGFEED_AUTH_SECRET");
    sources
}

/// Status of `/v1/position` with `token`: an authentication probe that never streams.
async fn probe(addr: SocketAddr, token: &str) -> u16 {
    get_soon(addr, "/v1/position", &[("Authorization", &bearer(token))])
        .await
        .status
}

/// The error `serve` ends with for `sources` (it must not start).
async fn start_up_error(sources: Sources) -> String {
    let config = Config::load(&sources).expect("the settings are valid");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let served = tokio::time::timeout(
        Duration::from_secs(30),
        pgfeed::serve(config, listener, CancellationToken::new()),
    )
    .await
    .expect("start-up ends within 30 s (the fetch is bounded)");
    served
        .expect_err("the gateway must refuse to start")
        .to_string()
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// A token signed by the served key streams; a key served with `"use": "enc"` is ignored,
/// so its token is refused.
#[tokio::test]
async fn the_served_key_verifies_and_encryption_keys_are_ignored() {
    let dir = TempDir::new("jwks-url");
    let signer = Key::generate(&dir, Algorithm::EdDSA, "signer");
    let enc = Key::generate(&dir, Algorithm::ES256, "enc");
    let server = JwksServer::start(
        jwks(&[
            signer.jwk("sig-1", Some(PublicKeyUse::Signature)),
            enc.jwk("enc-1", Some(PublicKeyUse::Encryption)),
        ]),
        "public, max-age=3600",
    )
    .await;
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let gw = Gateway::start_with(sources(&db, &server.url)).await;
    assert_eq!(server.fetches(), 1, "fetched once at start-up");

    let c = claims("acme");
    let mut s = assert_streams(
        gw.addr,
        "/v1/stream",
        &[("Authorization", &bearer(&signer.sign(&c, "sig-1")))],
    )
    .await;
    support::insert_note(&db, "acme", "by url").await;
    assert_eq!(s.next_change().await["new"]["body"], "by url");

    let r = get_soon(
        gw.addr,
        "/v1/stream",
        &[("Authorization", &bearer(&enc.sign(&c, "enc-1")))],
    )
    .await;
    let (code, _) = support::assert_error(&r, 401, "a key whose use is enc");
    assert_eq!(code, "invalid_token");
    drop(s);
    gw.stop().await;
}

/// The server rotates to a new key: a token with the new kid is refused at once (no
/// request waits for a fetch, even a slow one) and accepted once the refetch it caused
/// has landed; the retired key is then refused.
#[tokio::test]
async fn rotation_is_followed_without_requests_waiting() {
    let dir = TempDir::new("jwks-url");
    let old = Key::generate(&dir, Algorithm::EdDSA, "old");
    let new = Key::generate(&dir, Algorithm::EdDSA, "new");
    let server = JwksServer::start(jwks(&[old.jwk("k-1", None)]), "max-age=86400").await;
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let gw = Gateway::start_with(sources(&db, &server.url)).await;
    let c = claims("acme");
    assert_eq!(probe(gw.addr, &old.sign(&c, "k-1")).await, 200);

    server.serve(jwks(&[new.jwk("k-2", None)]));
    server.delay(Duration::from_secs(3));
    let token = new.sign(&c, "k-2");
    let started = Instant::now();
    assert_eq!(probe(gw.addr, &token).await, 401, "before the refetch");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the request waited for the fetch: {:?}",
        started.elapsed()
    );
    // While that (slow) refetch is in flight, requests still answer at once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    assert_eq!(probe(gw.addr, &old.sign(&c, "k-1")).await, 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "waited for the fetch"
    );

    let deadline = Instant::now() + SOON;
    while probe(gw.addr, &token).await != 200 {
        assert!(Instant::now() < deadline, "the new key never became usable");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        probe(gw.addr, &old.sign(&c, "k-1")).await,
        401,
        "the retired key"
    );
    gw.stop().await;
}

/// A burst of tokens with unknown kids causes one refetch, not one per request.
#[tokio::test]
async fn unknown_kids_refetch_at_most_once_per_interval() {
    let dir = TempDir::new("jwks-url");
    let key = Key::generate(&dir, Algorithm::EdDSA, "key");
    let server = JwksServer::start(jwks(&[key.jwk("k-1", None)]), "max-age=86400").await;
    let db = TestDb::new().await;
    let gw = Gateway::start_with(sources(&db, &server.url)).await;
    assert_eq!(server.fetches(), 1);

    let c = claims("acme");
    for i in 0..40 {
        let token = key.sign(&c, &format!("unknown-{i}"));
        assert_eq!(probe(gw.addr, &token).await, 401);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + SOON;
    while server.fetches() < 2 {
        assert!(Instant::now() < deadline, "no refetch for an unknown kid");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // 40 unknown kids over 2 s: the start-up fetch and one refetch (the next may come
    // only 10 s after it).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(server.fetches(), 2, "refetches were not bounded");
    gw.stop().await;
}

/// The gateway refuses to start, naming the key and the URL, when the URL does not
/// answer, serves no usable key, or fails its TLS handshake.
#[tokio::test]
async fn start_up_fails_clearly_without_usable_keys() {
    let db = TestDb::new().await;

    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", closed.local_addr().unwrap());
    drop(closed);
    let err = start_up_error(sources(&db, &url)).await;
    assert!(
        err.contains("auth.jwks_url") && err.contains(&format!("cannot fetch {url}")),
        "{err}"
    );

    let dir = TempDir::new("jwks-url");
    let enc = Key::generate(&dir, Algorithm::ES256, "enc");
    let server = JwksServer::start(
        jwks(&[enc.jwk("enc-1", Some(PublicKeyUse::Encryption))]),
        "max-age=60",
    )
    .await;
    let err = start_up_error(sources(&db, &server.url)).await;
    assert!(
        err.contains("auth.jwks_url")
            && err.contains(&server.url)
            && err.contains("has no usable key"),
        "{err}"
    );

    // https to a server that speaks plain HTTP: the TLS handshake fails, and says so.
    let https = server.url.replacen("http://", "https://", 1);
    let err = start_up_error(sources(&db, &https)).await;

    assert!(
        err.contains("auth.jwks_url") && err.contains(&https),
        "{err}"
    );
}

/// A TLS acceptor serving `pair`'s certificate.
fn acceptor(pair: &support::CertPair) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(pair.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(pair.key.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// `pgfeed serve` on `db` (a process of its own, for its own environment) in jwt mode with
/// `auth.jwks_url` = `url`, and `ca` as the system's root certificates: `SSL_CERT_FILE`,
/// which the gateway's loader of system roots (rustls-native-certs) honours.
fn serve_with_roots(
    db: &TestDb,
    url: &str,
    ca: &std::path::Path,
    addr: SocketAddr,
) -> tokio::process::Command {
    let mut cmd = support::pgfeed_command(db, &["serve", "--listen", &addr.to_string()]);
    cmd.env_remove("PGFEED_AUTH_SECRET")
        .env_remove("SSL_CERT_DIR")
        .env("SSL_CERT_FILE", ca)
        .env("PGFEED_AUTH_MODE", "jwt")
        .env("PGFEED_AUTH_JWKS_URL", url);
    cmd
}

/// Over https, as deployments serve their JWKS: the keys are fetched through TLS and the
/// server is verified against the system's roots, so a token the served key signed
/// streams. A server whose certificate no trusted CA signed is refused at start-up, naming
/// the URL.
#[tokio::test]
async fn an_https_jwks_url_is_verified_against_the_system_roots() {
    let dir = TempDir::new("jwks-https");
    let pair = support::cert_pair("jwks test CA", &["localhost"]);
    let ca = dir.path("ca.pem");
    std::fs::write(&ca, &pair.ca).unwrap();
    let signer = Key::generate(&dir, Algorithm::EdDSA, "signer");
    let server = JwksServer::start_tls(
        jwks(&[signer.jwk("sig-1", Some(PublicKeyUse::Signature))]),
        "max-age=3600",
        acceptor(&pair),
    )
    .await;
    assert!(
        server.url.starts_with("https://localhost:"),
        "{}",
        server.url
    );
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;

    let addr = support::free_addr();
    let gw = support::ChildGateway::start_command(
        serve_with_roots(&db, &server.url, &ca, addr),
        addr,
        None,
    )
    .await;
    assert_eq!(server.fetches(), 1, "fetched once at start-up, over TLS");
    let mut s = assert_streams(
        gw.addr,
        "/v1/stream",
        &[(
            "Authorization",
            &bearer(&signer.sign(&claims("acme"), "sig-1")),
        )],
    )
    .await;
    support::insert_note(&db, "acme", "keys over https").await;
    assert_eq!(s.next_change().await["new"]["body"], "keys over https");
    drop(s);
    drop(gw);

    // Roots that do not include the server's CA: the handshake is refused.
    let other = dir.path("other-ca.pem");
    std::fs::write(
        &other,
        support::cert_pair("some other CA", &["localhost"]).ca,
    )
    .unwrap();
    let mut cmd = serve_with_roots(&db, &server.url, &other, support::free_addr());
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("start-up ends within 30 s")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started with an untrusted JWKS server: {stderr}"
    );
    assert!(
        stderr.contains("auth.jwks_url")
            && stderr.contains(&server.url)
            && stderr.contains("TLS: invalid peer certificate"),
        "{stderr}"
    );
    assert_eq!(
        server.fetches(),
        1,
        "nothing was fetched from the untrusted server"
    );
}
