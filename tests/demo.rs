//! `pgfeed demo` as a user runs it: the binary, its banner, the `psql` and `curl -N` lines
//! it prints (run as printed), its pages, and Ctrl-C (SIGTERM here) removing the
//! throwaway cluster. The live page in a real browser is `tests/browser.rs`.

mod demo_process;
mod support;

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
    assert!(
        demo.banner.database.contains("demo_orders found"),
        "{}",
        demo.banner.database
    );
    let (status, _, log) = demo.stop();
    assert!(status.success(), "{log}");
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
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let block = |heading: &str| -> Vec<String> {
        let at = readme
            .find(&format!("\n{heading}\n"))
            .unwrap_or_else(|| panic!("README has {heading}"));
        readme[at..]
            .lines()
            .skip_while(|l| !l.starts_with("```sh"))
            .skip(1)
            .take_while(|l| !l.starts_with("```"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(block("## Try it"), ["cargo run --release -- demo"]);
    assert_eq!(block("## Test it"), ["cargo test --locked"]);
    // `cargo run` needs to know which binary is meant once there are several.
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    let several = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/src/bin"))
        .is_ok_and(|mut d| d.next().is_some());
    assert!(
        !several || manifest.contains("default-run = \"pgfeed\""),
        "Cargo.toml needs `default-run = \"pgfeed\"` for `cargo run -- demo`"
    );
}
