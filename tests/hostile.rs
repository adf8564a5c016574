//! The gateway under hostile clients and on an operator's bad day (issue 17): a broken
//! stderr, a panicking listener, slowloris connections under a low open-file limit,
//! clients that stop reading, tokens with odd `exp` values, and environments that carry
//! variables of their own.

use pgfeed_testkit as support;

use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use support::{
    ChildGateway, Gateway, Run, SECRET, SOON, SseClient, TestDb, assert_error, eventually,
    free_addr, get, get_soon, pgfeed_command, pgfeed_shell_command, sources_with,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Inserts `rows` rows of `size` bytes each for tenant `acme` into `table`.
async fn insert_big_rows(db: &TestDb, table: &str, rows: usize, size: usize) {
    db.client()
        .await
        .run(&format!(
            "INSERT INTO {table} (tenant, body) SELECT 'acme', repeat(md5(g::text), {}) FROM generate_series(1, {rows}) g",
            size / 32
        ))
        .await;
}

/// A connection that sent `head` (a stream's request) and reads nothing, once its stream
/// is open and `db` has filled it with 10 MiB for tenant `acme` in `orders`.
async fn stall(db: &TestDb, addr: std::net::SocketAddr, head: &str) -> TcpStream {
    let stalled = support::stalled_reader(addr, head).await;
    eventually("the stalled stream is open", || async {
        support::subscribers(addr).await == Some(1.0)
    })
    .await;
    insert_big_rows(db, "orders", 40, 256 * 1024).await;
    stalled
}

/// Waits until `gw` has written over a megabyte and its byte count stops growing: the
/// stalled stream's socket is full and its write blocked.
async fn until_writes_block(gw: &Gateway) {
    let mut last = 0.0;
    let deadline = std::time::Instant::now() + SOON;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = support::sample(&support::scrape(gw).await, "pgfeed_bytes_written_total")
            .unwrap_or(0.0);
        if now > 1e6 && now == last {
            return;
        }
        last = now;
        assert!(
            std::time::Instant::now() < deadline,
            "the stalled stream kept taking bytes"
        );
    }
}

/// A test database with [`support::tenant_table`] `orders` and a gateway on it with the
/// environment variables `env`.
async fn orders_gateway(env: &[(&str, &str)]) -> (TestDb, Gateway) {
    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    let gw = Gateway::start_with(sources_with(&db, env)).await;
    (db, gw)
}

fn stream_head(addr: std::net::SocketAddr, token: &str) -> String {
    format!("GET /v1/stream HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n")
}

// ---- 13: a broken stderr ------------------------------------------------------------

/// `pgfeed serve 2>&1 | head -1`: the reader of stderr is gone, every log write fails
/// with EPIPE. Streams still deliver, /readyz tells the truth and SIGTERM still stops the
/// process, cleanly.
#[tokio::test]
async fn a_broken_stderr_never_stops_delivery_or_shutdown() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    let addr = free_addr();
    let mut cmd = pgfeed_command(&db, &["serve", "--listen", &addr.to_string()]);
    // Debug logging: every stream and every read writes to the broken pipe.
    cmd.env("PGFEED_LOG", "debug");
    let (reader, writer) = std::io::pipe().expect("a pipe for stderr");
    drop(reader);
    let mut gw = ChildGateway::start_command(cmd, addr, Some(Stdio::from(writer))).await;

    let mut s = gw.live("acme").await;
    db.client()
        .await
        .run("INSERT INTO orders (tenant, body) VALUES ('acme', 'through a broken log')")
        .await;
    assert_eq!(s.next_change().await["new"]["body"], "through a broken log");
    // Again, after many more failed log writes.
    for _ in 0..20 {
        drop(gw.live("acme").await);
    }
    db.client()
        .await
        .run("INSERT INTO orders (tenant, body) VALUES ('acme', 'still delivered')")
        .await;
    assert_eq!(s.next_change().await["new"]["body"], "still delivered");
    assert_eq!(get_soon(gw.addr, "/readyz", &[]).await.status, 200);

    gw.signal("TERM");
    let status = gw.exited().await;
    assert!(status.success(), "SIGTERM with a broken stderr: {status}");
}

// ---- 14: supervision ----------------------------------------------------------------

/// The listener task panics (injected through the test hook): /readyz stops saying ready
/// and never says it again, open streams end, and the process exits non-zero so that its
/// supervisor restarts it.
#[tokio::test]
async fn a_panicking_listener_takes_readiness_down_and_exits_non_zero() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    let mut gw = ChildGateway::start(&db, &[("PGFEED_TEST_LISTENER_PANIC_AFTER", "3s")]).await;
    let addr = gw.addr;
    let mut s = gw.live("acme").await;

    // Readiness drops (503 or nobody listening) and never comes back while it exits.
    let mut dropped = false;
    let deadline = std::time::Instant::now() + SOON;
    while gw.child.try_wait().unwrap().is_none() {
        let ready = get(addr, "/readyz", &[])
            .await
            .is_ok_and(|r| r.status == 200);
        assert!(
            !(dropped && ready),
            "/readyz said ready again after dropping"
        );
        dropped |= !ready;
        assert!(
            std::time::Instant::now() < deadline,
            "still running {SOON:?} after the listener panicked: {}",
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = gw.exited().await;
    assert!(
        !status.success(),
        "exit status after a listener panic: {status}"
    );
    let log = gw.log_text();
    assert!(
        log.contains("an essential task ended unexpectedly") && log.contains("listener"),
        "{log}"
    );
    // The open stream was ended, not left hanging.
    loop {
        match s.next().await {
            None => break,
            Some(e) if e.event == "shutdown" => break,
            Some(_) => {}
        }
    }
}

// ---- 1: slowloris, the connection cap and the open-file limit -------------------------

/// One trickling client per connection: the request line, then one header byte at a
/// time, forever.
async fn slowloris(addr: std::net::SocketAddr, connections: usize) -> Vec<TcpStream> {
    let mut conns = Vec::new();
    for _ in 0..connections {
        if let Ok(mut c) = TcpStream::connect(addr).await {
            let _ = c.write_all(b"GET /v1/stream HTTP/1.1\r\nX-Slow: ").await;
            conns.push(c);
        }
    }
    conns
}

async fn trickle(conns: &mut [TcpStream]) {
    for c in conns.iter_mut() {
        let _ = c.write_all(b"a").await;
    }
}

/// 200 trickling connections against a gateway whose open-file limit is 128: it stays
/// reachable (/healthz 200), refuses what is over `server.max_connections` with a JSON 503,
/// and serves streams again once the slowloris is gone.
#[tokio::test]
async fn slowloris_under_a_low_open_file_limit_leaves_the_gateway_reachable() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    let addr = free_addr();
    let mut cmd = pgfeed_shell_command(
        &db,
        "ulimit -n 128",
        &["serve", "--listen", &addr.to_string()],
    );
    cmd.env("PGFEED_SERVER_MAX_CONNECTIONS", "40")
        .env("PGFEED_SERVER_HEADER_TIMEOUT", "60s");
    let gw = ChildGateway::start_command(cmd, addr, None).await;
    let log = gw.log_text();
    assert!(log.contains("open-file limit"), "{log}");

    let mut conns = slowloris(addr, 200).await;
    trickle(&mut conns).await;
    // Health checks are answered throughout.
    for _ in 0..5 {
        let mut healthy = false;
        for _ in 0..50 {
            trickle(&mut conns).await;
            if let Ok(Ok(r)) =
                tokio::time::timeout(Duration::from_secs(5), get(addr, "/healthz", &[])).await
                && r.status == 200
            {
                healthy = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            healthy,
            "/healthz unreachable under slowloris: {}",
            gw.log_text()
        );
    }
    // A stream is refused with the JSON error, not left waiting.
    let token = support::hs256_token("acme");
    let auth = format!("Bearer {token}");
    let r = get_soon(addr, "/v1/stream", &[("Authorization", &auth)]).await;
    let (code, message) = assert_error(&r, 503, "a stream over the connection cap");
    assert_eq!(code, "too_many_connections", "{message}");

    drop(conns);
    eventually("streams are served again", || async {
        get(
            addr,
            "/v1/stream?tables=nothing",
            &[("Authorization", &auth)],
        )
        .await
        .is_ok_and(|r| r.status == 400)
    })
    .await;
    assert!(gw.metric("pgfeed_connections_refused_total").await > Some(0.0));
    let mut s = gw.live("acme").await;
    db.client()
        .await
        .run("INSERT INTO orders (tenant, body) VALUES ('acme', 'after the storm')")
        .await;
    assert_eq!(s.next_change().await["new"]["body"], "after the storm");
}

/// The soft open-file limit is raised to the hard one at start-up, and both are logged.
#[tokio::test]
async fn the_open_file_soft_limit_is_raised_to_the_hard_limit() {
    let hard = std::process::Command::new("sh")
        .args(["-c", "ulimit -H -n"])
        .output()
        .unwrap();
    let hard = String::from_utf8_lossy(&hard.stdout).trim().to_string();
    let db = TestDb::new().await;
    let addr = free_addr();
    let cmd = pgfeed_shell_command(
        &db,
        "ulimit -S -n 100",
        &["serve", "--listen", &addr.to_string()],
    );
    let gw = ChildGateway::start_command(cmd, addr, None).await;
    let log = gw.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("open-file soft limit"))
        .unwrap_or_else(|| panic!("no open-file limit line: {log}"));
    if hard != "100" {
        let soft = if hard == "unlimited" {
            String::new()
        } else {
            format!("soft={hard}")
        };
        assert!(
            line.contains("soft_was=100") && line.contains(&soft) && line.contains("hard="),
            "{line}"
        );
    }
}

/// A client that sends its head one byte at a time, each well within the header timeout,
/// is cut off when the whole head has taken longer than `server.header_timeout`.
#[tokio::test]
async fn a_trickled_request_head_has_one_deadline() {
    let db = TestDb::new().await;
    let gw =
        Gateway::start_with(sources_with(&db, &[("PGFEED_SERVER_HEADER_TIMEOUT", "2s")])).await;
    for first in ["GET /v1/stream HTTP/1.1\r\n", "GET /healthz HTTP/1.1\r\n"] {
        let mut c = TcpStream::connect(gw.addr).await.unwrap();
        c.write_all(first.as_bytes()).await.unwrap();
        let started = std::time::Instant::now();
        let mut answer = Vec::new();
        loop {
            assert!(
                started.elapsed() < SOON,
                "{first:?}: a trickling head kept the connection for {SOON:?}"
            );
            // One header byte every 300 ms: each read comes far inside the timeout.
            if c.write_all(b"x").await.is_err() {
                break;
            }
            let mut buf = [0u8; 4096];
            match tokio::time::timeout(Duration::from_millis(300), c.read(&mut buf)).await {
                Err(_) => continue,
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            }
        }
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{first:?}: {text}"
        );
    }
    gw.stop().await;
}

// ---- 3: clients that stop reading -----------------------------------------------------

/// A stream whose client stops reading is closed after `server.write_timeout` and
/// counted; its subscriber slot is free again.
#[tokio::test]
async fn a_stalled_reader_is_closed_after_the_write_timeout() {
    let (db, gw) = orders_gateway(&[("PGFEED_SERVER_WRITE_TIMEOUT", "1s")]).await;
    let stalled = stall(&db, gw.addr, &stream_head(gw.addr, &gw.token("acme"))).await;
    eventually("the stalled stream is closed", || async {
        support::subscribers(gw.addr).await == Some(0.0)
    })
    .await;
    let metrics = support::scrape(&gw).await;
    assert_eq!(
        support::sample(&metrics, "pgfeed_write_timeouts_total"),
        Some(1.0),
        "{metrics}"
    );
    drop(stalled);
    gw.stop().await;
}

/// Shutdown does not wait out the grace for a client that stopped reading.
#[tokio::test]
async fn shutdown_interrupts_a_blocked_write() {
    let (db, gw) = orders_gateway(&[
        ("PGFEED_SERVER_WRITE_TIMEOUT", "300s"),
        ("PGFEED_SERVER_SHUTDOWN_GRACE", "300s"),
    ])
    .await;
    let _stalled = stall(&db, gw.addr, &stream_head(gw.addr, &gw.token("acme"))).await;
    // Let the writes fill the socket and block.
    until_writes_block(&gw).await;
    // stop() fails the test unless serve returns within SOON, far below the grace.
    gw.stop().await;
}

/// A token's expiry ends a stream whose client stopped reading.
#[tokio::test]
async fn token_expiry_interrupts_a_blocked_write() {
    let (db, gw) = orders_gateway(&[
        ("PGFEED_SERVER_WRITE_TIMEOUT", "300s"),
        ("PGFEED_AUTH_LEEWAY", "0s"),
    ])
    .await;
    let token = sign_raw(&format!(
        r#"{{"tenant_id":"acme","exp":{}}}"#,
        now_secs() + 4
    ));
    let _stalled = stall(&db, gw.addr, &stream_head(gw.addr, &token)).await;
    eventually("the expired stream is closed", || async {
        support::subscribers(gw.addr).await == Some(0.0)
    })
    .await;
    gw.stop().await;
}

// ---- 7 and 8: exp and nbf, and the leeway ---------------------------------------------

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token over exactly `claims` (raw JSON, so numbers keep the form written).
fn sign_raw(claims: &str) -> String {
    let raw = serde_json::value::RawValue::from_string(claims.to_string()).unwrap();
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &raw,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn open_with(gw: &Gateway, token: &str) -> SseClient {
    SseClient::open(
        gw.addr,
        "/v1/stream",
        &[("Authorization", &format!("Bearer {token}"))],
    )
    .await
}

/// `exp` minted as `Date.now()/1000 + 3` (a fraction) ends the stream like any other.
#[tokio::test]
async fn a_fractional_exp_expires_the_stream() {
    let db = TestDb::new().await;
    let gw = Gateway::start_with(sources_with(&db, &[("PGFEED_AUTH_LEEWAY", "0s")])).await;
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        + 3.0;
    let mut s = open_with(
        &gw,
        &sign_raw(&format!(r#"{{"tenant_id":"acme","exp":{exp}}}"#)),
    )
    .await;
    assert_eq!(s.status, 200, "{}", s.raw);
    s.until_live().await;
    let e = s.next().await.expect("an event before the stream ends");
    assert_eq!(e.event, "expired", "{e:?}");
    assert!(s.next().await.is_none());
    gw.stop().await;
}

/// `exp` in every JSON number form: exponent, integer beyond any real date, 1e19 as a
/// float. None panics; far-off ones simply do not expire.
#[tokio::test]
async fn exp_in_any_number_form_never_panics() {
    let db = TestDb::new().await;
    let gw = Gateway::start(&db).await;
    let soon = format!("{:e}", (now_secs() + 600) as f64);
    for exp in [
        soon.as_str(),
        "10000000000000000000",
        "1e19",
        "1e300",
        "18446744073709551615",
    ] {
        let token = sign_raw(&format!(r#"{{"tenant_id":"acme","exp":{exp}}}"#));
        let mut s = open_with(&gw, &token).await;
        assert_eq!(s.status, 200, "exp {exp}: {}", s.raw);
        s.until_live().await;
    }
    for (exp, what) in [(r#""9999999999""#, "a string"), ("null", "null")] {
        let token = sign_raw(&format!(r#"{{"tenant_id":"acme","exp":{exp}}}"#));
        let r = get_soon(
            gw.addr,
            "/v1/stream",
            &[("Authorization", &format!("Bearer {token}"))],
        )
        .await;
        let (code, _) = assert_error(&r, 401, what);
        assert_eq!(code, "invalid_token", "exp {exp}");
    }
    // The gateway is still whole.
    assert_eq!(get_soon(gw.addr, "/readyz", &[]).await.status, 200);
    gw.stop().await;
}

/// A token 2 s past `exp`, inside the 5 s leeway, is accepted and its stream lives until
/// the leeway runs out: not `expired` at once, which sends an EventSource into a loop.
#[tokio::test]
async fn the_leeway_is_the_same_at_connect_and_mid_stream() {
    let db = TestDb::new().await;
    let gw = Gateway::start(&db).await;
    let token = sign_raw(&format!(
        r#"{{"tenant_id":"acme","exp":{}}}"#,
        now_secs() - 2
    ));
    let mut s = open_with(&gw, &token).await;
    assert_eq!(s.status, 200, "{}", s.raw);
    s.until_live().await;
    s.assert_quiet(Duration::from_millis(1500)).await;
    let e = s.next().await.expect("expired before the end");
    assert_eq!(e.event, "expired", "{e:?}");
    // And the same token is refused once the leeway is over.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = get_soon(
        gw.addr,
        "/v1/stream",
        &[("Authorization", &format!("Bearer {token}"))],
    )
    .await;
    let (code, _) = assert_error(&r, 401, "past the leeway");
    assert_eq!(code, "token_expired");
    gw.stop().await;
}

// ---- 15: the environment --------------------------------------------------------------

async fn check_config(db: &TestDb, env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = pgfeed_command(db, &["serve", "--check-config"]);
    cmd.envs(env.iter().copied());
    tokio::time::timeout(SOON, cmd.output())
        .await
        .expect("check-config finishes")
        .expect("running pgfeed")
}

/// Kubernetes injects `PGFEED_SERVICE_HOST`, `PGFEED_PORT`, ... for a Service named
/// `pgfeed`: warned about and ignored, not fatal. `PGFEED_CONFIG` names the config file,
/// whose unknown keys stay errors.
#[tokio::test]
async fn unknown_pgfeed_variables_warn_and_pgfeed_config_names_the_file() {
    let db = TestDb::new().await;
    let out = check_config(
        &db,
        &[
            ("PGFEED_SERVICE_HOST", "10.0.0.7"),
            ("PGFEED_PORT", "tcp://10.0.0.7:8080"),
            ("PGFEED_PORT_8080_TCP_ADDR", "10.0.0.7"),
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for name in [
        "PGFEED_SERVICE_HOST",
        "PGFEED_PORT",
        "PGFEED_PORT_8080_TCP_ADDR",
    ] {
        assert!(
            stderr
                .lines()
                .any(|l| l.contains("WARN") && l.contains(&format!("{name}:"))),
            "no warning for {name}: {stderr}"
        );
    }
    assert!(
        !stderr.contains("10.0.0.7"),
        "values are not logged: {stderr}"
    );

    let dir = std::env::temp_dir().join(format!("pgfeed-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[server]\nlisten_addr = \"127.0.0.1:1\"\n").unwrap();
    let out = check_config(&db, &[("PGFEED_CONFIG", bad.to_str().unwrap())]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an unknown file key is fatal: {stderr}"
    );
    assert!(stderr.contains("listen_addr"), "{stderr}");
    let good = dir.join("good.toml");
    std::fs::write(&good, "[server]\nheartbeat = \"3s\"\n").unwrap();
    let out = check_config(&db, &[("PGFEED_CONFIG", good.to_str().unwrap())]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- 10: what clients and probes send -------------------------------------------------

/// `event-source-polyfill` resumes with `?lastEventId=` (it cannot send the header); load
/// balancers probe with `HEAD`; oversized heads get the same JSON errors as everything
/// else.
#[tokio::test]
async fn polyfill_resumes_head_probes_and_oversized_heads_get_answers() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    let gw = Gateway::start(&db).await;
    let c = db.client().await;
    let auth = format!("Bearer {}", gw.token("acme"));
    let start = get_soon(gw.addr, "/v1/position", &[("Authorization", &auth)])
        .await
        .json()["position"]
        .as_str()
        .unwrap()
        .to_string();
    c.run("INSERT INTO orders (tenant, body) VALUES ('acme', 'one')")
        .await;
    c.run("INSERT INTO orders (tenant, body) VALUES ('acme', 'two')")
        .await;
    let mut s = gw.stream("acme", &format!("last_event_id={start}")).await;
    assert_eq!(s.status, 200, "{}", s.raw);
    let first = s.until_live().await;
    assert_eq!(first.len(), 2, "{first:?}");
    let position = first[0]["position"].as_str().unwrap().to_string();
    // The polyfill keeps the original URL and appends lastEventId: the newer one wins,
    // in either order.
    for query in [
        format!("last_event_id={start}&lastEventId={position}"),
        format!("lastEventId={position}&last_event_id={start}"),
    ] {
        let mut s = gw.stream("acme", &query).await;
        assert_eq!(s.status, 200, "{}", s.raw);
        let replayed = s.until_live().await;
        assert_eq!(replayed.len(), 1, "{query}: {replayed:?}");
        assert_eq!(replayed[0]["new"]["body"], "two");
    }

    for path in ["/healthz", "/readyz"] {
        let r = support::request(gw.addr, "HEAD", path, &[], SOON).await;
        assert_eq!(r.status, 200, "HEAD {path}: {r:?}");
        assert!(r.body.is_empty(), "HEAD {path} has no body: {r:?}");
    }

    // A head over 64 KiB, and one with 101 headers.
    let big = "a".repeat(70 * 1024);
    let r = get_soon(gw.addr, "/v1/position", &[("X-Big", &big)]).await;
    let (code, _) = assert_error(&r, 431, "a 70 KiB head");
    assert_eq!(code, "headers_too_large");
    let names: Vec<String> = (0..101).map(|i| format!("X-H{i}")).collect();
    let headers: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    for path in ["/v1/stream", "/healthz"] {
        let r = get_soon(gw.addr, path, &headers).await;
        let (code, _) = assert_error(&r, 431, "101 headers");
        assert_eq!(code, "headers_too_large");
    }
    let r = get_soon(
        gw.addr,
        &format!("/v1/stream?x={}", "a".repeat(70 * 1024)),
        &[],
    )
    .await;
    let (code, _) = assert_error(&r, 414, "a 70 KiB request line");
    assert_eq!(code, "uri_too_long");
    gw.stop().await;
}

// ---- 9: CORS "*" ----------------------------------------------------------------------

/// `cors.allowed_origins = ["*"]` with cookie authentication: any page may read with its
/// own token, but no page (`null` included) gets the browser's cookies through, so no
/// site can read a cookie-authenticated stream. Named origins still get credentials.
#[tokio::test]
async fn cors_star_never_allows_credentials() {
    let (_db, gw) = orders_gateway(&[
        ("PGFEED_CORS_ALLOWED_ORIGINS", "*, https://app.example"),
        ("PGFEED_AUTH_COOKIE", "pgfeed_token"),
    ])
    .await;
    let cookie = format!("pgfeed_token={}", gw.token("acme"));
    for origin in ["null", "https://evil.example"] {
        let r = support::request(
            gw.addr,
            "OPTIONS",
            "/v1/stream",
            &[("Origin", origin), ("Access-Control-Request-Method", "GET")],
            SOON,
        )
        .await;
        assert_eq!(r.header("access-control-allow-origin"), Some("*"), "{r:?}");
        assert_eq!(r.header("access-control-allow-credentials"), None, "{r:?}");
        let mut s = SseClient::open(
            gw.addr,
            "/v1/stream",
            &[("Origin", origin), ("Cookie", &cookie)],
        )
        .await;
        assert_eq!(s.status, 200, "{}", s.raw);
        assert_eq!(
            s.headers
                .iter()
                .find(|(k, _)| k == "access-control-allow-origin")
                .map(|(_, v)| v.as_str()),
            Some("*")
        );
        assert!(
            !s.headers
                .iter()
                .any(|(k, _)| k == "access-control-allow-credentials"),
            "{:?}",
            s.headers
        );
        s.until_live().await;
    }
    let r = get_soon(
        gw.addr,
        "/v1/position",
        &[("Origin", "https://app.example"), ("Cookie", &cookie)],
    )
    .await;
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    gw.stop().await;
}

// ---- 11: log injection ----------------------------------------------------------------

/// A tenant claim carrying a newline, a forged log line and terminal escapes is written
/// escaped: the log keeps one line per event and no raw control character.
#[tokio::test]
async fn client_values_cannot_forge_log_lines() {
    let db = TestDb::new().await;
    let gw = ChildGateway::start(&db, &[]).await;
    let addr = gw.addr;
    let forged = r#"evil\n2026-12-02T00:00:00.000000Z ERROR pgfeed: forged line\r\u001b[2J\u001b]0;owned\u0007"#;
    let token = sign_raw(&format!(
        r#"{{"tenant_id":"{forged}","exp":{}}}"#,
        now_secs() + 600
    ));
    let mut s = SseClient::open(
        addr,
        "/v1/stream",
        &[("Authorization", &format!("Bearer {token}"))],
    )
    .await;
    assert_eq!(s.status, 200, "{}", s.raw);
    s.until_live().await;
    drop(s);
    eventually("the stream's lines are logged", || async {
        gw.log_text().contains("stream closed")
    })
    .await;
    let log = gw.log_text();
    assert!(
        !log.lines()
            .any(|l| l.contains("ERROR") && l.contains("forged line") && !l.contains("evil")),
        "a forged line: {log}"
    );
    assert!(
        !log.chars().any(|c| c.is_control() && c != '\n'),
        "raw control characters: {log:?}"
    );
    assert!(log.contains(r"evil\n2026"), "{log}");
}

// ---- 16: config errors ----------------------------------------------------------------

/// An operator's file with several mistakes: every one is reported at once, each naming
/// `section.key`, the file and the line.
#[tokio::test]
async fn config_errors_name_the_key_file_and_line_all_at_once() {
    let db = TestDb::new().await;
    let dir = std::env::temp_dir().join(format!("pgfeed-hostile-16-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("pgfeed.toml");
    std::fs::write(
        &path,
        "[server]\nheartbeat = 15\nlisten_addr = \"127.0.0.1:1\"\n\n[database]\npool_size = \"8\"\n",
    )
    .unwrap();
    let out = check_config(&db, &[("PGFEED_CONFIG", path.to_str().unwrap())]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let file = path.display().to_string();
    for (key, line) in [
        ("server.heartbeat", 2),
        ("server.listen_addr", 3),
        ("database.pool_size", 6),
    ] {
        assert!(
            stderr
                .lines()
                .any(|l| l.contains(key) && l.contains(&format!("{file} line {line}"))),
            "{key} at line {line}: {stderr}"
        );
    }
    // Values of the right type that break a rule: all of them too, with their place.
    std::fs::write(
        &path,
        "[server]\nheartbeat = \"soon\"\nretry = \"later\"\n[auth]\nmode = \"open\"\n",
    )
    .unwrap();
    let mut cmd = pgfeed_command(&db, &["serve", "--check-config"]);
    cmd.env("PGFEED_CONFIG", &path)
        .env("PGFEED_SERVER_MAX_CONNECTIONS", "0");
    let out = tokio::time::timeout(SOON, cmd.output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    for (key, place) in [
        ("server.heartbeat", format!("{file} line 2")),
        ("server.retry", format!("{file} line 3")),
        ("auth.mode", format!("{file} line 5")),
        (
            "server.max_connections",
            "environment variable PGFEED_SERVER_MAX_CONNECTIONS".to_string(),
        ),
    ] {
        assert!(
            stderr
                .lines()
                .any(|l| l.contains(key) && l.contains(&place)),
            "{key} by {place}: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- 17: log hygiene ------------------------------------------------------------------

/// Logs read like logs: the start-up line says version, auth mode and database (never
/// its credentials); streams and a lost listener are logged without Rust debug output;
/// a database that cannot be reached is named once, with its host and port.
#[tokio::test]
async fn logs_carry_no_debug_output_and_name_the_database_once() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    let gw = ChildGateway::start(&db, &[("PGFEED_LOG_FORMAT", "json")]).await;
    let addr = gw.addr;
    let mut s = gw.live("acme").await;
    db.client()
        .await
        .run("INSERT INTO orders (tenant, body) VALUES ('acme', 'x')")
        .await;
    let position = s.next_change().await["position"]
        .as_str()
        .unwrap()
        .to_string();
    drop(s);
    let auth = format!("Bearer {}", support::hs256_token("acme"));
    let mut resumed = SseClient::open(
        addr,
        "/v1/stream",
        &[("Authorization", &auth), ("Last-Event-ID", &position)],
    )
    .await;
    resumed.until_live().await;
    drop(resumed);
    assert_eq!(support::terminate_listener(&db).await, 1);
    eventually("the lost listener is logged", || async {
        gw.log_text().contains("listener lost")
    })
    .await;
    eventually("the streams' ends are logged", || async {
        gw.log_text().matches("stream closed").count() >= 2
    })
    .await;
    let log = gw.log_text();
    for line in log.lines() {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let text = event.to_string();
        assert!(
            !text.contains("Some(") && !text.contains("\"None\"") && !text.contains("Error {"),
            "debug output in the log: {line}"
        );
    }
    let start = log
        .lines()
        .find(|l| l.contains("pgfeed serving"))
        .expect("a start-up line");
    let start: serde_json::Value = serde_json::from_str(start).unwrap();
    assert_eq!(start["version"], env!("CARGO_PKG_VERSION"), "{start}");
    assert_eq!(start["auth_mode"], "jwt", "{start}");
    let port = db
        .url
        .rsplit(':')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    assert!(
        start["database"]
            .as_str()
            .is_some_and(|d| d.contains(&format!(":{port}/{}", db.name))),
        "{start}"
    );
    assert!(log.contains(&format!("\"resume\":\"{position}\"")), "{log}");

    // A database nobody answers at: named once, with host and port, never the password.
    let mut cmd = pgfeed_command(&db, &["serve", "--listen", &free_addr().to_string()]);
    cmd.env(
        "DATABASE_URL",
        "postgres://app:hunter2secret@127.0.0.1:1/appdb",
    );
    let out = tokio::time::timeout(SOON, cmd.output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("127.0.0.1:1/appdb"), "{stderr}");
    assert_eq!(
        stderr.matches("error connecting to server").count(),
        1,
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2secret"), "{stderr}");
    assert!(
        !stderr.contains("Error occurred while creating"),
        "{stderr}"
    );
}

/// A stream served by hyper (one that is not its connection's first request) whose
/// client stopped reading: shutdown does not wait out the grace for it either.
#[tokio::test]
async fn a_stalled_reader_on_a_kept_alive_connection_is_cut_off_too() {
    let (db, gw) = orders_gateway(&[
        ("PGFEED_SERVER_WRITE_TIMEOUT", "300s"),
        ("PGFEED_SERVER_SHUTDOWN_GRACE", "300s"),
    ])
    .await;
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n{}",
        gw.addr,
        stream_head(gw.addr, &gw.token("acme"))
    );
    let _stalled = stall(&db, gw.addr, &head).await;
    until_writes_block(&gw).await;
    gw.stop().await;
}
