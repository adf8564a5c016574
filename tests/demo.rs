//! `pgfeed demo` as a user runs it: the binary, its banner, the `psql` and `curl -N` lines
//! it prints (run as printed), its pages, and Ctrl-C (SIGTERM here) removing the
//! throwaway cluster. The live page in a real browser is `tests/browser.rs`.

use pgfeed_testkit as support;
use pgfeed_testkit::demo_process;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use demo_process::{DemoProcess, free_port};
use support::{SOON, TestDb};

fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

fn sh(line: &str, env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new("sh");
    c.args(["-c", line]);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("sh")
}

/// Waits until `file` contains every one of `needles`.
fn wait_for_file(file: &std::path::Path, needles: &[&str]) -> String {
    let deadline = Instant::now() + SOON;
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if needles.iter().all(|n| text.contains(n)) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {needles:?} in the stream; got:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the banner's `curl -N` line in the background, then its three `psql` lines, and
/// checks that the stream shows the insert, the update and the delete.
fn printed_lines_work(demo: &DemoProcess, env: &[(&str, &str)]) {
    let out = std::env::temp_dir().join(format!("pgfeed-demo-curl-{}.out", free_port()));
    let curl = format!("exec {} -s > {}", demo.banner.curl, out.display());
    let mut c = Command::new("sh");
    c.args(["-c", &curl]).stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut curl = c.spawn().expect("curl");
    wait_for_file(&out, &["event: live"]);
    for line in &demo.banner.psql {
        let done = sh(line, env);
        assert!(
            done.status.success(),
            "{line}\n{}",
            String::from_utf8_lossy(&done.stderr)
        );
    }
    let text = wait_for_file(
        &out,
        &[r#""op":"insert""#, r#""op":"update""#, r#""op":"delete""#],
    );
    assert!(text.contains("Walnut monitor stand"), "{text}");
    assert!(
        !text.contains(r#""tenant":"globex""#),
        "the acme token sees only acme: {text}"
    );
    let _ = curl.kill();
    let _ = curl.wait();
    let _ = std::fs::remove_file(&out);
}

/// Asserts that the demo's banner says `demo_orders` was `how` (`created` or `found`),
/// then stops the demo, which must exit cleanly.
fn assert_table_then_stop(demo: DemoProcess, how: &str) {
    assert!(
        demo.banner.database.contains(&format!("demo_orders {how}")),
        "{}",
        demo.banner.database
    );
    let (status, _, log) = demo.stop();
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_runs_a_throwaway_cluster_and_removes_it() {
    let demo = DemoProcess::start(&["--listen", "127.0.0.1:0"], &[]);
    let b = demo.banner.clone();
    assert!(
        b.database.contains("throwaway cluster in "),
        "{}",
        b.database
    );
    let dir = b
        .database
        .split("throwaway cluster in ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .map(std::path::PathBuf::from)
        .expect("the cluster directory");
    assert!(dir.exists(), "{}", dir.display());
    let db_url = b.database.split_whitespace().next().unwrap().to_string();

    printed_lines_work(&demo, &[]);

    // The page, the example assets and the demo application's API.
    let page = addr_of(&b.page);
    let html = support::get(page, "/", &[]).await.unwrap();
    assert_eq!(html.status, 200);
    assert!(html.body.contains("<title>pgfeed"), "{}", html.body);
    let js = support::get(page, "/pgfeed-client.js", &[]).await.unwrap();
    assert_eq!(js.status, 200);
    assert!(
        js.header("content-type")
            .unwrap()
            .starts_with("text/javascript")
    );
    assert!(js.body.contains("export function subscribe"));
    let dash = support::get(page, "/dashboard", &[]).await.unwrap();
    assert!(dash.body.contains("payload: \"keys\""), "{}", dash.body);
    let rows = support::get(page, "/rows?tenant=globex", &[])
        .await
        .unwrap()
        .json();
    assert_eq!(rows.as_array().unwrap().len(), 3, "{rows}");
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .all(|r| r["tenant"] == "globex")
    );
    let missing = support::get(page, "/rows", &[]).await.unwrap();
    assert_eq!(missing.status, 400);
    let config = support::get(page, "/config", &[]).await.unwrap().json();
    assert_eq!(config["gateway"], b.gateway.as_str());
    assert_eq!(config["tenants"], serde_json::json!(["acme", "globex"]));

    // A token from the page works at the gateway, and CORS lets the page's origin in.
    let gateway = addr_of(&b.gateway);
    let token = support::get(page, "/token?tenant=acme", &[])
        .await
        .unwrap()
        .json();
    let token = token["token"].as_str().unwrap();
    let origin = b.page.trim_end_matches('/');
    let pos = support::get(
        gateway,
        "/v1/position",
        &[
            ("Authorization", &format!("Bearer {token}")),
            ("Origin", origin),
        ],
    )
    .await
    .unwrap();
    assert_eq!(pos.status, 200, "{}", pos.body);
    assert_eq!(pos.header("access-control-allow-origin"), Some(origin));

    let (status, stdout, log) = demo.stop();
    assert!(status.success(), "{status}\n{log}");
    assert!(stdout.contains("pgfeed demo is running"));
    assert!(
        log.contains("Stopped and removed the throwaway PostgreSQL"),
        "{log}"
    );
    assert!(!dir.exists(), "{} is removed", dir.display());
    let gone = tokio_postgres::connect(&db_url, tokio_postgres::NoTls).await;
    assert!(gone.is_err(), "the throwaway server is stopped");
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_uses_the_configured_database_and_keeps_its_rows() {
    let db = TestDb::empty().await;
    let env = [("DATABASE_URL", db.url.as_str())];
    let demo = DemoProcess::start(&["--listen", "127.0.0.1:0"], &env);
    assert!(
        demo.banner.database.contains("demo_orders created"),
        "{}",
        demo.banner.database
    );
    // The URL came from DATABASE_URL, so the lines say so rather than echo it.
    assert!(
        demo.banner.psql[0].starts_with("psql \"$DATABASE_URL\""),
        "{:?}",
        demo.banner.psql
    );
    printed_lines_work(&demo, &env);
    let (status, _, log) = demo.stop();
    assert!(status.success(), "{log}");

    let client = db.client().await;
    let rows: i64 = client
        .query_one("SELECT count(*) FROM demo_orders", &[])
        .await
        .unwrap()
        .get(0);
    // Seven seeds; the printed lines inserted one row and deleted one.
    assert_eq!(rows, 7);
    client
        .batch_execute("INSERT INTO demo_orders (tenant, item) VALUES ('acme', 'kept')")
        .await
        .unwrap();

    // A second run finds the table, adds no seeds and still watches it.
    let demo = DemoProcess::start(&["--listen", "127.0.0.1:0"], &env);
    assert_table_then_stop(demo, "found");
    let rows: i64 = client
        .query_one("SELECT count(*) FROM demo_orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 8);
    let watched = pgfeed::schema::watched(&client).await.unwrap();
    assert!(
        watched.iter().any(
            |w| w.table == "public.demo_orders" && w.tenant_column.as_deref() == Some("tenant")
        ),
        "{watched:?}"
    );
}

#[test]
fn demo_names_the_port_it_cannot_take() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = Command::new(env!("CARGO_BIN_EXE_pgfeed"))
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--page-listen",
            &format!("127.0.0.1:{port}"),
        ])
        .env_remove("DATABASE_URL")
        .env_remove("PGFEED_DATABASE_URL")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "cannot listen on 127.0.0.1:{port} for the live page"
        )),
        "{err}"
    );
    // It failed before starting PostgreSQL.
    assert!(!err.contains("throwaway"), "{err}");
}

/// The README promises a fresh machine two commands: one runs the demo (what the tests
/// above run, on free ports), one runs the tests.
#[test]
fn readme_tries_and_tests_with_one_command_each() {
    let readme = support::readme();
    let block = |heading: &str| -> Vec<String> {
        let at = readme
            .find(&format!("\n{heading}\n"))
            .unwrap_or_else(|| panic!("README has {heading}"));
        support::first_sh_block(&readme[at..])
    };
    assert_eq!(block("## Try it"), ["cargo run --release -- demo"]);
    assert_eq!(block("## Test it"), ["cargo test --locked"]);
    // `cargo run` at the workspace's root sees the benchmark's binary too: the product must
    // say which one it means.
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    assert!(
        manifest.contains("default-run = \"pgfeed\""),
        "Cargo.toml needs `default-run = \"pgfeed\"` for `cargo run -- demo`"
    );
}

// Issue 15, item 10, as an attacker acts: the demo pointed at a real database with the
// real secret (`DATABASE_URL`, `PGFEED_AUTH_SECRET`), next to the production gateway that
// uses the same secret, and a web page elsewhere that reaches the demo through a browser.

/// The demo, as someone tries it against their real database with the real secret.
fn demo_with_the_real_secret(db: &TestDb, args: &[&str]) -> DemoProcess {
    DemoProcess::start(
        args,
        &[
            ("DATABASE_URL", db.url.as_str()),
            ("PGFEED_AUTH_SECRET", support::SECRET),
        ],
    )
}

/// A GET with `Host: host` (or none), as a page on another origin gets a browser to send
/// it after rebinding its name to 127.0.0.1.
async fn get_with_host(addr: SocketAddr, host: Option<&str>, path: &str) -> support::Response {
    let head = match host {
        Some(host) => format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        None => format!("GET {path} HTTP/1.0\r\n\r\n"),
    };
    support::exchange(addr, &head, SOON, &format!("GET {path} with Host {host:?}")).await
}

/// Asks the demo page for a token; returns the response.
async fn ask_token(page: SocketAddr, query: &str) -> support::Response {
    support::get_soon(page, &format!("/token?{query}"), &[]).await
}

fn token_of(r: &support::Response) -> String {
    assert_eq!(r.status, 200, "{r:?}");
    r.json()["token"].as_str().expect("a token").to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_mints_tokens_only_for_the_tenants_its_page_offers() {
    let db = TestDb::empty().await;
    let demo = demo_with_the_real_secret(&db, &["--listen", "127.0.0.1:0"]);
    let page = addr_of(&demo.banner.page);

    // A production tenant the demo knows nothing of.
    let r = ask_token(page, "tenant=initech").await;
    support::assert_error(&r, 403, "a token for another tenant");
    for near in ["tenant=ACME", "tenant=acme%20", "tenant=acme%00"] {
        let r = ask_token(page, near).await;
        support::assert_error(&r, 403, near);
    }

    // The tenants the page offers: the seed tenants, and any with rows in the demo table.
    token_of(&ask_token(page, "tenant=acme").await);
    token_of(&ask_token(page, "tenant=globex").await);
    db.client()
        .await
        .batch_execute("INSERT INTO demo_orders (tenant, item) VALUES ('umbrella', 'Umbrella')")
        .await
        .unwrap();
    let config = support::get_soon(page, "/config", &[]).await.json();
    assert_eq!(
        config["tenants"],
        serde_json::json!(["acme", "globex", "umbrella"])
    );
    token_of(&ask_token(page, "tenant=umbrella").await);

    let (status, _, log) = demo.stop();
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_demo_token_sees_the_demo_table_and_nothing_else_anywhere() {
    let db = TestDb::new().await;
    // A production table with acme's rows, watched, and the production gateway, which
    // uses the same secret with its default settings.
    support::tenant_table(&db, "payroll").await;
    let production = support::Gateway::start(&db).await;
    let demo = demo_with_the_real_secret(&db, &["--listen", "127.0.0.1:0"]);
    let page = addr_of(&demo.banner.page);
    let gateway = addr_of(&demo.banner.gateway);

    // The token endpoint mints for the demo table alone.
    for query in [
        "tenant=acme&tables=payroll",
        "tenant=acme&tables=public.payroll",
        "tenant=acme&tables=public.demo_orders,public.payroll",
    ] {
        let r = ask_token(page, query).await;
        support::assert_error(&r, 403, query);
    }
    token_of(&ask_token(page, "tenant=acme&tables=public.demo_orders").await);
    let token = token_of(&ask_token(page, "tenant=acme").await);
    let bearer = format!("Bearer {token}");

    // The production gateway refuses it, although it is signed with its secret.
    let mut stream =
        support::SseClient::open(production.addr, "/v1/stream", &[("Authorization", &bearer)])
            .await;
    assert_eq!(
        stream.status, 401,
        "the production gateway accepted a demo token: {:?}",
        stream.headers
    );
    drop(stream);
    let curl_token = demo
        .banner
        .curl
        .split("Bearer ")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("the banner's token");
    stream = support::SseClient::open(
        production.addr,
        "/v1/stream",
        &[("Authorization", &format!("Bearer {curl_token}"))],
    )
    .await;
    assert_eq!(stream.status, 401, "the banner's token, at production");
    drop(stream);

    // The demo's own gateway, on the same database, refuses it the production table...
    let asked = support::get_soon(
        gateway,
        "/v1/stream?tables=payroll",
        &[("Authorization", &bearer)],
    )
    .await;
    support::assert_error(&asked, 403, "the demo gateway, tables=payroll");
    // ...and a stream that names no table carries the demo table's changes alone.
    let mut stream =
        support::SseClient::open(gateway, "/v1/stream", &[("Authorization", &bearer)]).await;
    assert_eq!(stream.status, 200);
    stream.until_live().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO payroll (tenant, body, secret) VALUES ('acme', 'salary', '120000');
             INSERT INTO demo_orders (tenant, item) VALUES ('acme', 'after payroll');",
        )
        .await
        .unwrap();
    let change = stream.next_change().await;
    assert_eq!(change["table"], "public.demo_orders", "{change}");
    assert!(!stream.raw.contains("120000"), "{}", stream.raw);
    drop(stream);

    let (status, _, log) = demo.stop();
    assert!(status.success(), "{log}");
    production.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_page_answers_only_its_loopback_names() {
    let db = TestDb::empty().await;
    let demo = demo_with_the_real_secret(&db, &["--listen", "127.0.0.1:0"]);
    let page = addr_of(&demo.banner.page);
    let port = page.port();

    // A rebinding page's requests carry its own name; a request without Host names none.
    for host in [
        format!("evil.example:{port}"),
        "evil.example".to_string(),
        format!("localhost.evil.example:{port}"),
        format!("127.0.0.1.nip.io:{port}"),
        format!("localhost:{}", port.wrapping_add(1)),
    ] {
        for path in ["/token?tenant=acme", "/rows?tenant=acme", "/config", "/"] {
            let r = get_with_host(page, Some(&host), path).await;
            support::assert_error(&r, 403, &format!("Host: {host}, {path}"));
        }
    }
    let r = get_with_host(page, None, "/token?tenant=acme").await;
    support::assert_error(&r, 403, "no Host");

    // The names the page is reached by on this machine.
    for host in [
        format!("localhost:{port}"),
        format!("LocalHost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
    ] {
        let r = get_with_host(page, Some(&host), "/token?tenant=acme").await;
        token_of(&r);
    }

    let (status, _, log) = demo.stop();
    assert!(status.success(), "{log}");
}

/// Runs `pgfeed demo ARGS` with `env`, expecting it to fail at once; returns its stderr.
fn demo_fails(args: &[&str], env: &[(&str, &str)]) -> String {
    let log = std::env::temp_dir().join(format!("pgfeed-demo-refused-{}.log", free_port()));
    let mut command = demo_process::demo_command(args);
    command
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + SOON;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            // Our own child, by its id: it stops what it started.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    match status {
        Some(status) => assert!(!status.success(), "pgfeed demo {args:?} succeeded:\n{err}"),
        None => panic!("pgfeed demo {args:?} was still running after {SOON:?}:\n{err}"),
    }
    err
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_refuses_a_remote_address_unless_told_to_allow_it() {
    let db = TestDb::empty().await;
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("PGFEED_AUTH_SECRET", support::SECRET),
    ];
    for (args, extra, setting) in [
        (&["--listen", "0.0.0.0:0"][..], None, "--listen"),
        (&["--listen", "[::]:0"][..], None, "--listen"),
        (
            &["--listen", "127.0.0.1:0", "--page-listen", "0.0.0.0:0"][..],
            None,
            "--page-listen",
        ),
        (
            &[][..],
            Some(("PGFEED_SERVER_LISTEN", "0.0.0.0:0")),
            "server.listen",
        ),
    ] {
        let mut env = env.to_vec();
        env.extend(extra);
        let err = demo_fails(args, &env);
        assert!(
            err.contains(setting) && err.contains("--allow-remote"),
            "{args:?} {extra:?}: names {setting} and --allow-remote:\n{err}"
        );
        assert!(
            err.contains("not a loopback address"),
            "{args:?}: says why:\n{err}"
        );
    }
    // Refused before touching the database.
    let schema: Option<String> = db
        .client()
        .await
        .query_one("SELECT to_regnamespace('pgfeed')::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(schema, None, "the demo installed nothing");

    // Told to, it listens everywhere, and warns.
    let demo = demo_with_the_real_secret(&db, &["--listen", "0.0.0.0:0", "--allow-remote"]);
    let page = addr_of(&demo.banner.page);
    token_of(&ask_token(page, "tenant=acme").await);
    let (status, _, log) = demo.stop();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("--allow-remote: other machines can reach the demo page"),
        "a warning: {log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_role_holding_an_advisory_lock_does_not_stall_the_demo() {
    let db = TestDb::empty().await;
    // Any role may take any advisory lock: this one held the demo's old key.
    let holder = db.client().await;
    holder
        .batch_execute("SELECT pg_advisory_lock(1885824612, 7)")
        .await
        .unwrap();
    let started = Instant::now();
    let demo = demo_with_the_real_secret(&db, &["--listen", "127.0.0.1:0"]);
    assert!(
        started.elapsed() < SOON,
        "the demo waited {:?} for the lock",
        started.elapsed()
    );
    assert_table_then_stop(demo, "created");
    drop(holder);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_demo_finds_the_table_another_session_was_creating() {
    let db = TestDb::new().await;
    // Another demo, say, has created the table and not yet committed.
    let mut other = db.client().await;
    let tx = other.transaction().await.unwrap();
    tx.batch_execute(
        "CREATE TABLE public.demo_orders (id serial PRIMARY KEY, tenant text NOT NULL,
             item text, status text NOT NULL DEFAULT 'new',
             amount numeric(10, 2) NOT NULL DEFAULT 0,
             updated_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .unwrap();
    let url = db.url.clone();
    let demo = std::thread::spawn(move || {
        DemoProcess::start(
            &["--listen", "127.0.0.1:0"],
            &[
                ("DATABASE_URL", url.as_str()),
                ("PGFEED_AUTH_SECRET", support::SECRET),
            ],
        )
    });
    // The demo's CREATE TABLE waits on the other transaction...
    let watcher = db.client().await;
    support::eventually("the demo waiting to create demo_orders", || async {
        watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'
                   AND query LIKE '%CREATE TABLE public.demo_orders%'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    })
    .await;
    // ...which commits: the demo finds the table rather than failing as a duplicate.
    tx.commit().await.unwrap();
    let demo = demo.join().expect("the demo starts");
    assert_table_then_stop(demo, "found");
}
