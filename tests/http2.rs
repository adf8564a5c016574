//! TLS and HTTP/2 on the listener (`server.tls_cert_file`, `server.tls_key_file`,
//! `server.h2c`): streams multiplexed on one HTTP/2 connection, HTTP/1.1 over TLS, the
//! certificate's reload, clear errors for unusable files, h2c only when enabled, and the
//! memory of idle streams on HTTP/2. The certificates are made by the test (rcgen); the
//! client is hyper's, over tokio-rustls, trusting the test's CA.

use pgfeed_testkit as support;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use pgfeed::config::{Config, TlsFiles};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use support::{CertPair, Gateway, SOON, TestDb};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A CA (PEM) and a server certificate it signed for `localhost` (PEM, and its key).
fn make_pair(ca_name: &str) -> CertPair {
    support::cert_pair(ca_name, &["localhost", "127.0.0.1"])
}

/// A directory of the test's own, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(what: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("pgfeed-http2-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `pair`'s certificate and key as `cert.pem` and `key.pem` (each replaced
    /// whole, by a rename), returning the environment that names them.
    fn write_pair(&self, pair: &CertPair) -> Vec<(String, String)> {
        replace(&self.path("cert.pem"), &pair.cert);
        replace(&self.path("key.pem"), &pair.key);
        vec![
            (
                "PGFEED_SERVER_TLS_CERT_FILE".into(),
                self.path("cert.pem").display().to_string(),
            ),
            (
                "PGFEED_SERVER_TLS_KEY_FILE".into(),
                self.path("key.pem").display().to_string(),
            ),
        ]
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Replaces `path` with `text` at once, as a certificate renewal tool does.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A client TLS configuration trusting `ca` and offering `alpn`.
fn client_tls(ca: &str, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A TLS connection to `addr` as `localhost`.
async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(SOON, TlsConnector::from(config).connect(name, tcp))
        .await
        .expect("TLS handshake within SOON")
}

type H2 = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

/// An HTTP/2 connection over `io` (TLS, or cleartext with prior knowledge).
async fn h2_over<T>(io: T) -> hyper::Result<H2>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
    tokio::spawn(conn);
    Ok(send)
}

/// An HTTP/2 connection over TLS to `addr`, which must have chosen `h2` by ALPN.
async fn h2_connect(addr: SocketAddr, ca: &str) -> H2 {
    let tls = tls_connect(addr, client_tls(ca, &[b"h2", b"http/1.1"]))
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    h2_over(tls).await.unwrap()
}

/// `GET path` on `send`, with `token` if any.
fn get(path: &str, token: Option<&str>) -> Request<Empty<Bytes>> {
    let mut req = Request::get(format!("https://localhost{path}"));
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    req.body(Empty::new()).unwrap()
}

async fn send_h2(send: &mut H2, req: Request<Empty<Bytes>>) -> Response<Incoming> {
    tokio::time::timeout(SOON, async {
        send.ready().await.unwrap();
        send.send_request(req).await.unwrap()
    })
    .await
    .expect("an answer within SOON")
}

/// Reads `body` until its text so far contains `needle`; returns the text.
async fn read_until(body: &mut Incoming, text: &mut String, needle: &str) {
    let deadline = Instant::now() + SOON;
    while !text.contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = tokio::time::timeout(left, body.frame())
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} within {SOON:?}; got {text:?}"))
            .unwrap_or_else(|| panic!("the stream ended before {needle:?}; got {text:?}"))
            .unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
}

async fn body_text(response: Response<Incoming>) -> String {
    let body = tokio::time::timeout(SOON, response.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// A gateway in-process, listening with the settings `env` adds (not waited for: the test
/// kit's client speaks no TLS; see [`ready_tls`]).
async fn start(db: &TestDb, env: Vec<(String, String)>) -> Gateway {
    let mut sources = support::sources(db);
    sources.env.extend(env);
    Gateway::spawn(sources).await
}

/// Whether the gateway at `addr` answers `/readyz` with 200 over TLS (HTTP/2).
async fn ready_over_tls(addr: SocketAddr, ca: &str) -> bool {
    if let Ok(tls) = tls_connect(addr, client_tls(ca, &[b"h2"])).await
        && let Ok(mut send) = h2_over(tls).await
    {
        return send_h2(&mut send, get("/readyz", None)).await.status() == 200;
    }
    false
}

/// Waits until `gw` answers `/readyz` with 200 over TLS (HTTP/2).
async fn ready_tls(gw: &Gateway, ca: &str) {
    support::eventually("the gateway ready over TLS", || async {
        assert!(!gw.task.is_finished(), "the gateway ended before ready");
        ready_over_tls(gw.addr, ca).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_streams_on_one_http2_connection_all_receive_a_change() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let dir = Dir::new("ten");
    let pair = make_pair("ten CA");
    let mut env = dir.write_pair(&pair);
    env.push((
        "PGFEED_SERVER_MAX_SUBSCRIBERS_PER_TENANT".into(),
        "10".into(),
    ));
    env.push(("PGFEED_SERVER_HEARTBEAT".into(), "300ms".into()));
    let gw = start(&db, env).await;
    ready_tls(&gw, &pair.ca).await;

    let mut send = h2_connect(gw.addr, &pair.ca).await;
    let token = gw.token("acme");
    let mut streams = Vec::new();
    for _ in 0..10 {
        let response = send_h2(&mut send, get("/v1/stream", Some(&token))).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), hyper::Version::HTTP_2);
        assert_eq!(
            response.headers()["content-type"],
            "text/event-stream",
            "{response:?}"
        );
        let mut body = response.into_body();
        let mut text = String::new();
        read_until(&mut body, &mut text, "event: live").await;
        assert!(text.starts_with("retry: "), "{text:?}");
        streams.push((body, text));
    }
    // The limits hold per stream, not per connection: the eleventh is refused, the ten
    // stay.
    let refused = send_h2(&mut send, get("/v1/stream", Some(&token))).await;
    assert_eq!(refused.status(), 429);
    let refused = body_text(refused).await;
    assert!(refused.contains("\"code\""), "{refused}");
    // The same connection answers other requests meanwhile, errors as JSON.
    let refused = send_h2(&mut send, get("/v1/stream", Some("not-a-token"))).await;
    assert_eq!(refused.status(), 401);
    let refused = body_text(refused).await;
    assert!(refused.contains("\"code\""), "{refused}");
    assert!(send_h2(&mut send, get("/healthz", None)).await.status() == 200);

    support::insert_note(&db, "other", "not for acme").await;
    support::insert_note(&db, "acme", "over h2").await;
    let mut changes = Vec::new();
    for (body, text) in &mut streams {
        read_until(body, text, "over h2").await;
        assert!(!text.contains("not for acme"), "{text}");
        let change = text
            .split("\n\n")
            .find(|f| f.contains("over h2"))
            .unwrap()
            .to_string();
        assert!(change.contains("event: change"), "{change}");
        changes.push(change);
    }
    // Every stream got the very same frame (same id, same data).
    assert!(changes.iter().all(|c| *c == changes[0]), "{changes:?}");

    // Idle streams get heartbeats.
    let (body, text) = &mut streams[9];
    let seen = text.len();
    read_until(body, text, ": keepalive\n\n").await;
    assert!(text[seen..].contains(": keepalive"), "{text}");

    // A stream closed by the client (RST_STREAM) frees its subscriber at once.
    streams.truncate(6);
    let mut subscribers = None;
    let deadline = Instant::now() + SOON;
    while subscribers != Some(6.0) {
        assert!(Instant::now() < deadline, "subscribers: {subscribers:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let page = body_text(send_h2(&mut send, get("/metrics", None)).await).await;
        subscribers = support::sample(&page, "pgfeed_subscribers");
    }

    // A resume on this connection replays from the position it names.
    let live_id = streams[0]
        .1
        .split("\n\n")
        .find(|f| f.contains("event: live"))
        .and_then(|f| f.lines().find_map(|l| l.strip_prefix("id: ")))
        .unwrap()
        .to_string();
    let mut resume = get("/v1/stream", Some(&token));
    resume
        .headers_mut()
        .insert("last-event-id", live_id.parse().unwrap());
    let response = send_h2(&mut send, resume).await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut text = String::new();
    read_until(&mut body, &mut text, "event: live").await;
    let replayed = text.split("\n\n").find(|f| f.contains("over h2"));
    assert_eq!(replayed, Some(changes[0].as_str()), "{text}");
    streams.push((body, text));

    // A token that expires ends its stream with `expired`, the connection's other
    // streams going on.
    let short = pgfeed::auth::mint(&gw.config.auth, "acme", None, Duration::from_secs(1)).unwrap();
    let response = send_h2(&mut send, get("/v1/stream", Some(&short))).await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut text = String::new();
    read_until(&mut body, &mut text, "event: expired").await;
    let end = tokio::time::timeout(SOON, body.collect()).await;
    assert!(end.is_ok_and(|b| b.is_ok()), "the expired stream ends");

    // Shutdown ends every stream with its `shutdown` event, as over HTTP/1.1.
    gw.shutdown.cancel();
    for (body, text) in &mut streams {
        read_until(body, text, "event: shutdown").await;
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_over_tls_still_streams_and_cleartext_is_not_spoken() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let dir = Dir::new("h1");
    let pair = make_pair("h1 CA");
    let gw = start(&db, dir.write_pair(&pair)).await;
    ready_tls(&gw, &pair.ca).await;

    let tls = tls_connect(gw.addr, client_tls(&pair.ca, &[b"http/1.1"]))
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let response = send
        .send_request(get("/v1/stream", Some(&gw.token("acme"))))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), hyper::Version::HTTP_11);
    let mut body = response.into_body();
    let mut text = String::new();
    read_until(&mut body, &mut text, "event: live").await;
    support::insert_note(&db, "acme", "over http/1.1 and tls").await;
    read_until(&mut body, &mut text, "over http/1.1 and tls").await;

    // A client without ALPN gets HTTP/1.1 too.
    let tls = tls_connect(gw.addr, client_tls(&pair.ca, &[]))
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let ready = send.send_request(get("/readyz", None)).await.unwrap();
    assert_eq!(ready.status(), 200);

    // Plain HTTP on the TLS port gets no answer in HTTP.
    let plain = support::get(gw.addr, "/healthz", &[]).await;
    assert!(
        !plain.as_ref().is_ok_and(|r| r.status == 200),
        "plain HTTP was answered on a TLS listener"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_certificate_is_served_to_new_connections_and_a_bad_one_is_not() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let dir = Dir::new("reload");
    let first = make_pair("first CA");
    let gw = start(&db, dir.write_pair(&first)).await;
    ready_tls(&gw, &first.ca).await;
    let served = |pair: &CertPair| CertificateDer::from_pem_slice(pair.cert.as_bytes()).unwrap();
    let addr = gw.addr;
    let peer = |ca: String| async move {
        let tls = tls_connect(addr, client_tls(&ca, &[b"h2"])).await.ok()?;
        let cert = tls.get_ref().1.peer_certificates()?.first()?.clone();
        Some(cert)
    };
    assert_eq!(peer(first.ca.clone()).await, Some(served(&first)));
    // A stream open on the first certificate lives through the reloads.
    let mut send = h2_connect(gw.addr, &first.ca).await;
    let response = send_h2(&mut send, get("/v1/stream", Some(&gw.token("acme")))).await;
    let mut body = response.into_body();
    let mut text = String::new();
    read_until(&mut body, &mut text, "event: live").await;

    // A key that is not a key: logged, and the first pair kept.
    replace(&dir.path("key.pem"), "not a key\n");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(peer(first.ca.clone()).await, Some(served(&first)));

    // A new pair (another CA): new connections get it.
    let second = make_pair("second CA");
    dir.write_pair(&second);
    let deadline = Instant::now() + SOON;
    while peer(second.ca.clone()).await != Some(served(&second)) {
        assert!(
            Instant::now() < deadline,
            "the new certificate was not served within {SOON:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        peer(first.ca.clone()).await,
        None,
        "the old CA still verifies"
    );

    support::insert_note(&db, "acme", "after the reload").await;
    read_until(&mut body, &mut text, "after the reload").await;
    gw.stop().await;
}

#[tokio::test]
async fn unusable_tls_settings_are_config_errors_naming_the_key() {
    let dir = Dir::new("errors");
    let pair = make_pair("errors CA");
    let other = make_pair("other CA");
    std::fs::write(dir.path("cert.pem"), &pair.cert).unwrap();
    std::fs::write(dir.path("key.pem"), &pair.key).unwrap();
    std::fs::write(dir.path("other-key.pem"), &other.key).unwrap();
    std::fs::write(dir.path("garbage.pem"), "hello\n").unwrap();
    let load_env = |env: &[(&str, &str)]| {
        let mut all = vec![("PGFEED_AUTH_SECRET", support::SECRET)];
        all.extend_from_slice(env);
        Config::load(&pgfeed::config::Sources {
            env: all
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        })
    };
    let cert = dir.path("cert.pem").display().to_string();
    let key = dir.path("key.pem").display().to_string();

    // Both or neither.
    let err = load_env(&[("PGFEED_SERVER_TLS_CERT_FILE", &cert)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("`server.tls_key_file`"), "{err}");
    let err = load_env(&[("PGFEED_SERVER_TLS_KEY_FILE", &key)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("`server.tls_cert_file`"), "{err}");
    let err = load_env(&[
        ("PGFEED_SERVER_TLS_CERT_FILE", ""),
        ("PGFEED_SERVER_TLS_KEY_FILE", &key),
    ])
    .unwrap_err()
    .to_string();
    assert!(err.contains("`server.tls_cert_file`"), "{err}");
    let config = load_env(&[
        ("PGFEED_SERVER_TLS_CERT_FILE", &cert),
        ("PGFEED_SERVER_TLS_KEY_FILE", &key),
        ("PGFEED_SERVER_H2C", "true"),
    ])
    .unwrap();
    assert!(config.server.h2c);
    let files = config.server.tls().unwrap();
    pgfeed::http::Tls::load(&files).expect("the pair loads");

    // The files themselves, read when the gateway starts.
    let cases: [(&str, &str, &str, &str); 5] = [
        (
            "missing.pem",
            "key.pem",
            "`server.tls_cert_file`",
            "cannot read",
        ),
        (
            "cert.pem",
            "missing.pem",
            "`server.tls_key_file`",
            "cannot read",
        ),
        (
            "garbage.pem",
            "key.pem",
            "`server.tls_cert_file`",
            "no certificate",
        ),
        (
            "cert.pem",
            "garbage.pem",
            "`server.tls_key_file`",
            "no usable PEM private key",
        ),
        (
            "cert.pem",
            "other-key.pem",
            "`server.tls_key_file`",
            "cannot be used with the certificate",
        ),
    ];
    for (cert_file, key_file, key, what) in cases {
        let files = TlsFiles {
            cert_file: dir.path(cert_file),
            key_file: dir.path(key_file),
        };
        let err = pgfeed::http::Tls::load(&files).unwrap_err().to_string();
        assert!(
            err.contains(key) && err.contains(what),
            "{cert_file} + {key_file}: {err}"
        );
    }

    // And from the command line: `pgfeed serve` stops with that message, and
    // `--check-config` reads the files too.
    let db = TestDb::new().await;
    let missing = dir.path("missing.pem").display().to_string();
    for args in [
        &["serve", "--listen", "127.0.0.1:0"][..],
        &["serve", "--check-config"][..],
    ] {
        let mut cmd = support::pgfeed_command(&db, args);
        cmd.env("PGFEED_SERVER_TLS_CERT_FILE", &missing)
            .env("PGFEED_SERVER_TLS_KEY_FILE", &key);
        let out = tokio::time::timeout(SOON, cmd.output())
            .await
            .unwrap()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            stderr.contains("server.tls_cert_file") && stderr.contains("missing.pem"),
            "{args:?}: {stderr}"
        );
    }
    let mut cmd = support::pgfeed_command(&db, &["serve", "--check-config"]);
    cmd.env("PGFEED_SERVER_TLS_CERT_FILE", &cert)
        .env("PGFEED_SERVER_TLS_KEY_FILE", &key);
    let out = tokio::time::timeout(SOON, cmd.output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_with_prior_knowledge_only_when_enabled() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;

    let gw = start(&db, vec![("PGFEED_SERVER_H2C".into(), "true".into())]).await;
    support::wait_until_ready(gw.addr).await;
    let mut send = h2_over(TcpStream::connect(gw.addr).await.unwrap())
        .await
        .unwrap();
    let token = gw.token("acme");
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let response = send_h2(&mut send, get("/v1/stream", Some(&token))).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), hyper::Version::HTTP_2);
        let mut body = response.into_body();
        let mut text = String::new();
        read_until(&mut body, &mut text, "event: live").await;
        bodies.push((body, text));
    }
    support::insert_note(&db, "acme", "over h2c").await;
    for (body, text) in &mut bodies {
        read_until(body, text, "over h2c").await;
    }
    // HTTP/1.1 is still spoken, streams on the socket too.
    let mut s = support::SseClient::open(
        gw.addr,
        "/v1/stream",
        &[("Authorization", &format!("Bearer {token}"))],
    )
    .await;
    assert_eq!(s.status, 200);
    s.until_live().await;
    gw.stop().await;

    // Off (the default): the preface is not HTTP/2's, no request gets through.
    let gw = start(&db, Vec::new()).await;
    support::wait_until_ready(gw.addr).await;
    let attempt = tokio::time::timeout(SOON, async {
        let mut send = h2_over(TcpStream::connect(gw.addr).await.unwrap()).await?;
        send.ready().await?;
        send.send_request(get("/healthz", None)).await
    })
    .await
    .expect("an outcome within SOON");
    assert!(attempt.is_err(), "h2c was spoken: {attempt:?}");
    gw.stop().await;
}

/// A client that stops taking one stream's data (HTTP/2 flow control is per stream) while
/// it keeps the connection, and another stream on it, alive: the stalled stream's
/// subscriber is dropped once the piece of data it was handed has not been taken within
/// `server.write_timeout` (and a quarter of it), counted as a write timeout; the other
/// stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_whose_client_takes_no_data_is_closed_and_its_neighbour_goes_on() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let gw = start(
        &db,
        vec![
            ("PGFEED_SERVER_H2C".into(), "true".into()),
            ("PGFEED_SERVER_WRITE_TIMEOUT".into(), "1s".into()),
            ("PGFEED_SERVER_HEARTBEAT".into(), "1s".into()),
        ],
    )
    .await;
    support::wait_until_ready(gw.addr).await;
    // A small window per stream: what the client does not take stops the server at 4 KiB.
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(4096)
        .handshake(TokioIo::new(TcpStream::connect(gw.addr).await.unwrap()))
        .await
        .unwrap();
    tokio::spawn(conn);
    let token = gw.token("acme");
    let stalled = send_h2(&mut send, get("/v1/stream", Some(&token))).await;
    assert_eq!(stalled.status(), 200);
    let mut reader = send_h2(&mut send, get("/v1/stream", Some(&token)))
        .await
        .into_body();
    let mut text = String::new();
    read_until(&mut reader, &mut text, "event: live").await;
    let page = support::scrape(&gw).await;
    assert_eq!(support::sample(&page, "pgfeed_subscribers"), Some(2.0));

    // 20 rows of 1 KiB: five times the stalled stream's window.
    let filler = "x".repeat(1000);
    for i in 0..20 {
        support::insert_note(&db, "acme", &format!("row-{i:02}-{filler}")).await;
    }
    read_until(&mut reader, &mut text, "row-19-").await;
    support::eventually("the stalled stream's subscriber is dropped", || async {
        let page = support::scrape(&gw).await;
        support::sample(&page, "pgfeed_write_timeouts_total") == Some(1.0)
            && support::sample(&page, "pgfeed_subscribers") == Some(1.0)
    })
    .await;

    support::insert_note(&db, "acme", "after the close").await;
    read_until(&mut reader, &mut text, "after the close").await;
    // Read now, the stalled stream ends after what was in flight.
    let mut body = stalled.into_body();
    let mut got = String::new();
    let ended = tokio::time::timeout(SOON, async {
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                got.push_str(&String::from_utf8_lossy(&data));
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the closed stream did not end; got {got:?}");
    assert!(
        !got.contains("after the close"),
        "the closed stream went on: {got:?}"
    );
    gw.stop().await;
}

/// Waits until the gateway at `addr` answers `/readyz` with 200 over TLS (HTTP/2).
async fn ready_tls_at(addr: SocketAddr, ca: &str, child: &mut tokio::process::Child) {
    let deadline = Instant::now() + SOON;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("pgfeed serve exited ({status}) before it was ready");
        }
        if ready_over_tls(addr, ca).await {
            return;
        }
        assert!(Instant::now() < deadline, "not ready within {SOON:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `pgfeed serve` process with TLS on `db` (notes table watched), ready, with no limit
/// on how fast streams open.
struct TlsChild {
    child: tokio::process::Child,
    addr: SocketAddr,
    pair: CertPair,
    _dir: Dir,
}

impl TlsChild {
    async fn start(db: &TestDb, what: &str) -> TlsChild {
        let dir = Dir::new(what);
        let pair = make_pair("memory CA");
        let addr = support::free_addr();
        let mut cmd = support::pgfeed_command(db, &["serve", "--listen", &addr.to_string()]);
        cmd.envs(dir.write_pair(&pair))
            .env("PGFEED_SERVER_MAX_STREAM_RATE", "1000000")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().unwrap();
        ready_tls_at(addr, &pair.ca, &mut child).await;
        TlsChild {
            child,
            addr,
            pair,
            _dir: dir,
        }
    }

    /// Its resident memory now, in KiB.
    fn rss_kib(&self) -> u64 {
        support::rss_kib_of(self.child.id().unwrap())
    }

    /// A stream of `tenant` on `send`, read up to `live`.
    async fn open<B>(send: &mut B, tenant: &str) -> Incoming
    where
        B: Sender,
    {
        let response = send
            .send(get("/v1/stream", Some(&support::hs256_token(tenant))))
            .await;
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        read_until(&mut body, &mut String::new(), "event: live").await;
        body
    }
}

impl Drop for TlsChild {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Either client connection kind.
trait Sender {
    fn send(&mut self, req: Request<Empty<Bytes>>) -> impl Future<Output = Response<Incoming>>;
}

impl Sender for H2 {
    async fn send(&mut self, req: Request<Empty<Bytes>>) -> Response<Incoming> {
        send_h2(self, req).await
    }
}

impl Sender for hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    async fn send(&mut self, req: Request<Empty<Bytes>>) -> Response<Incoming> {
        tokio::time::timeout(SOON, self.send_request(req))
            .await
            .expect("an answer within SOON")
            .unwrap()
    }
}

/// Streams are spread over this many tenants, as in the benchmark (each tenant with
/// streams has its channel).
const TENANTS: usize = 100;

/// BENCHMARKS (d) on HTTP/2: idle streams multiplexed on TLS connections cost at most
/// 8 KiB of the gateway's resident memory each (about 3.5 KiB measured). The gateway is a
/// process of its own, so only its memory is counted, measured after all streams are
/// live and idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_on_http2_stay_within_8_kib_each() {
    const CONNECTIONS: usize = 10;
    const PER_CONNECTION: usize = 200;
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let gw = TlsChild::start(&db, "memory-h2").await;

    // One stream first, so that what the first use allocates once is not counted.
    let mut warm = h2_connect(gw.addr, &gw.pair.ca).await;
    let _warm = TlsChild::open(&mut warm, "warm").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = gw.rss_kib();

    let mut streams = Vec::new();
    let mut connections = Vec::new();
    for c in 0..CONNECTIONS {
        let send = h2_connect(gw.addr, &gw.pair.ca).await;
        let mut opening = Vec::new();
        for i in 0..PER_CONNECTION {
            let tenant = format!("t{}", (c * PER_CONNECTION + i) % TENANTS);
            let mut send = send.clone();
            opening.push(tokio::spawn(async move {
                let body = TlsChild::open(&mut send, &tenant).await;
                (tenant, body)
            }));
        }
        for task in opening {
            streams.push(task.await.unwrap());
        }
        connections.push(send);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = gw.rss_kib();
    let n = streams.len();
    let per_stream = after.saturating_sub(before) as f64 / n as f64;
    eprintln!(
        "{n} idle streams on {CONNECTIONS} HTTP/2 connections over TLS: RSS {before} -> {after} KiB, {per_stream:.2} KiB per stream"
    );
    assert!(
        per_stream <= 8.0,
        "{per_stream:.2} KiB per idle HTTP/2 stream (RSS {before} -> {after} KiB for {n})"
    );

    // They are all alive: tenant t0's streams get its change.
    support::insert_note(&db, "t0", "still live").await;
    for (_, body) in streams.iter_mut().filter(|(t, _)| t == "t0") {
        read_until(body, &mut String::new(), "still live").await;
    }
}

/// An idle HTTP/1.1 stream over TLS is a connection of its own, with rustls' and hyper's
/// buffers: about 29 KiB measured (BENCHMARKS.md (d)), against 3.5 KiB on HTTP/2 and
/// 10 KiB on cleartext HTTP/1.1 measured the same way. Bounded here at 48 KiB, so that a leak per connection
/// is caught.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http1_streams_over_tls_stay_bounded() {
    const STREAMS: usize = 500;
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let gw = TlsChild::start(&db, "memory-h1").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = gw.rss_kib();
    let mut streams = Vec::new();
    for i in 0..STREAMS {
        let tls = tls_connect(gw.addr, client_tls(&gw.pair.ca, &[b"http/1.1"]))
            .await
            .unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let tenant = format!("t{}", i % TENANTS);
        let body = TlsChild::open(&mut send, &tenant).await;
        streams.push((tenant, send, body));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = gw.rss_kib();
    let per_stream = after.saturating_sub(before) as f64 / STREAMS as f64;
    eprintln!(
        "{STREAMS} idle HTTP/1.1 streams over TLS: RSS {before} -> {after} KiB, {per_stream:.2} KiB per stream"
    );
    assert!(
        per_stream <= 48.0,
        "{per_stream:.2} KiB per idle HTTP/1.1 stream over TLS (RSS {before} -> {after} KiB)"
    );
    support::insert_note(&db, "t0", "still live").await;
    for (_, _, body) in streams.iter_mut().filter(|(t, _, _)| t == "t0") {
        read_until(body, &mut String::new(), "still live").await;
    }
}

/// Over `server.max_connections`, a TLS connection still gets its handshake and has
/// `/healthz` and `/readyz` answered (an orchestrator's HTTPS probes), anything else a JSON
/// 503, over HTTP/2 and HTTP/1.1 alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_connection_cap_tls_probes_are_answered_and_streams_refused() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let dir = Dir::new("overflow");
    let pair = make_pair("overflow CA");
    let mut env = dir.write_pair(&pair);
    env.push(("PGFEED_SERVER_MAX_CONNECTIONS".into(), "1".into()));
    let gw = start(&db, env).await;
    ready_tls(&gw, &pair.ca).await;
    let token = gw.token("acme");

    // The one connection allowed, holding a stream (once the probes' connections closed).
    let (_held, _stream) = {
        let deadline = Instant::now() + SOON;
        loop {
            let mut send = h2_connect(gw.addr, &pair.ca).await;
            let response = send_h2(&mut send, get("/v1/stream", Some(&token))).await;
            if response.status() == 200 {
                break (send, response.into_body());
            }
            assert!(Instant::now() < deadline, "{response:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };

    let mut over = h2_connect(gw.addr, &pair.ca).await;
    assert_eq!(send_h2(&mut over, get("/readyz", None)).await.status(), 200);
    let refused = send_h2(&mut over, get("/v1/stream", Some(&token))).await;
    assert_eq!(refused.status(), 503);
    let refused = body_text(refused).await;
    assert!(refused.contains("too_many_connections"), "{refused}");

    let tls = tls_connect(gw.addr, client_tls(&pair.ca, &[b"http/1.1"]))
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    assert_eq!(send.send(get("/healthz", None)).await.status(), 200);
    gw.stop().await;
}

/// An HTTP/2 connection with no request open is closed after `server.header_timeout` (to
/// twice that), as an HTTP/1.1 connection that sends no request is; one holding a stream
/// stays. A TLS handshake that does not complete within it is dropped too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_and_stalled_handshakes_are_closed() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let dir = Dir::new("idle");
    let pair = make_pair("idle CA");
    let mut env = dir.write_pair(&pair);
    env.push(("PGFEED_SERVER_HEADER_TIMEOUT".into(), "1s".into()));
    env.push(("PGFEED_SERVER_HEARTBEAT".into(), "300ms".into()));
    // Stalled streams are looked for every 250 ms, more often than idleness: that must not
    // keep restarting the idle timer.
    env.push(("PGFEED_SERVER_WRITE_TIMEOUT".into(), "1s".into()));
    let gw = start(&db, env).await;
    ready_tls(&gw, &pair.ca).await;

    let mut idle = h2_connect(gw.addr, &pair.ca).await;
    assert_eq!(
        send_h2(&mut idle, get("/healthz", None)).await.status(),
        200
    );
    let mut busy = h2_connect(gw.addr, &pair.ca).await;
    let response = send_h2(&mut busy, get("/v1/stream", Some(&gw.token("acme")))).await;
    let mut body = response.into_body();
    let mut text = String::new();
    read_until(&mut body, &mut text, "event: live").await;

    let stalled = TcpStream::connect(gw.addr).await.unwrap();
    let started = Instant::now();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(SOON, stalled.peek(&mut byte)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "a silent connection is closed: {read:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    let deadline = Instant::now() + SOON;
    while !idle.is_closed() {
        assert!(
            Instant::now() < deadline,
            "the idle HTTP/2 connection stays open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The stream's connection is still serving it.
    assert!(!busy.is_closed());
    support::insert_note(&db, "acme", "still here").await;
    read_until(&mut body, &mut text, "still here").await;
    gw.stop().await;
}
