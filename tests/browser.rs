//! A real browser on the demo's live page: headless Chromium driven through chromedriver
//! (W3C WebDriver, plain HTTP and JSON), against `pgfeed demo` run as its binary on a test
//! database.
//!
//! The page must show a `psql` insert, update and delete as they commit; end with exactly
//! the database's rows after the gateway is stopped and started again while changes
//! commit, resuming through EventSource's own `Last-Event-ID` (no refetch, no new token,
//! no reload); after a restart with a rotated secret and a pruned journal, fetch a fresh
//! token when refused and refetch once on `reset`; and renew its 4-second tokens on
//! `expired` without missing a change. The `payload=keys` dashboard example must follow an
//! insert. A screenshot of the page goes to `target/demo-screenshot.png` (and of the
//! dashboard to `target/dashboard-screenshot.png`).
//!
//! It needs Chromium and chromedriver: without them it says it skipped and why, unless
//! `PGFEED_TEST_REQUIRE_TOOLS=1` (as CI sets) makes it fail, saying what to install.

use pgfeed_testkit as support;
use pgfeed_testkit::demo_process;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use demo_process::{DemoProcess, free_port, reap_with_this_process};
use serde_json::{Value, json};
use support::TestDb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Bound for anything the page should do "soon": catches hangs, not slowness.
const WAIT: Duration = Duration::from_secs(30);

/// The secret of the first two runs of the demo, so that tokens survive the restart.
const SECRET: &str = "browser-test-secret-0123456789";

/// The secret of the last run: the page's token from before is refused.
const ROTATED: &str = "browser-test-rotated-secret-9876543210";

/// Polls `$probe` (an expression yielding `Result<T, String>`, where the error describes
/// what was seen) until it is `Ok`, for at most `$timeout`.
macro_rules! wait_until {
    ($what:expr, $timeout:expr, $probe:expr) => {{
        let deadline = Instant::now() + $timeout;
        loop {
            match $probe {
                Ok(value) => break value,
                Err(seen) => {
                    if Instant::now() > deadline {
                        panic!(
                            "timed out after {:?} waiting for {}; last seen: {}",
                            $timeout, $what, seen
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }};
}

/// Chromium and chromedriver, or `None` when one is missing and the test skips
/// ([`support::require_tool`]: a failure that says how to install them in CI).
fn browser_programs() -> Option<(PathBuf, PathBuf)> {
    let what = "the browser test (tests/browser.rs)";
    // Debian installs `chromium`; some distributions call it `chromium-browser`.
    let chromium = match support::tool_path("chromium") {
        None if support::tool_path("chromium-browser").is_some() => "chromium-browser",
        _ => "chromium",
    };
    // Both checked (`&`, not `&&`), so that a skip names everything missing.
    let found = support::require_tool(chromium, what) & support::require_tool("chromedriver", what);
    found.then(|| {
        (
            support::tool_path(chromium).expect("found above"),
            support::tool_path("chromedriver").expect("found above"),
        )
    })
}

/// A minimal HTTP/1.1 exchange with a JSON body. chromedriver keeps connections open
/// whatever the request says, so the body is read by its length, not to the end.
async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connecting to chromedriver at {addr}: {e}"));
    let body = body.map(Value::to_string).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let (split, length) = loop {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "chromedriver closed the connection mid-response");
        raw.extend_from_slice(&chunk[..n]);
        if let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
            let length = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim() == "content-length")
                .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                .expect("chromedriver sends Content-Length");
            break (split, length);
        }
    };
    while raw.len() < split + 4 + length {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "chromedriver closed the connection mid-body");
        raw.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let value = serde_json::from_slice(&raw[split + 4..split + 4 + length]).unwrap_or(Value::Null);
    (status, value)
}

/// chromedriver and one headless Chromium session; both end when dropped.
struct Browser {
    driver: Child,
    /// Ends chromedriver (and so Chromium) if the test process is killed.
    guard: Option<Child>,
    addr: SocketAddr,
    session: String,
    profile: PathBuf,
}

impl Browser {
    async fn start((binary, chromedriver): (PathBuf, PathBuf)) -> Browser {
        let port = free_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        // In a process group of its own, which the Chromium it starts joins, so that the
        // guard can end both if this process is killed.
        let driver = Command::new(chromedriver)
            .process_group(0)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let guard = reap_with_this_process(driver.id(), true);
        let profile =
            std::env::temp_dir().join(format!("pgfeed-browser-{}-{port}", std::process::id()));
        let mut browser = Browser {
            driver,
            guard,
            addr,
            session: String::new(),
            profile,
        };
        wait_until!("chromedriver to answer /status", WAIT, {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(_) => {
                    let (_, v) = http(addr, "GET", "/status", None).await;
                    if v["value"]["ready"] == true {
                        Ok(())
                    } else {
                        Err(v.to_string())
                    }
                }
                Err(e) => Err(e.to_string()),
            }
        });
        let capabilities = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                // The TLS test's gateway has a certificate the test made.
                "acceptInsecureCerts": true,
                "goog:chromeOptions": {
                    "binary": binary,
                    "args": [
                        "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-background-networking", "--disable-component-update",
                        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                        "--window-size=1280,800", "--hide-scrollbars",
                        format!("--user-data-dir={}", browser.profile.display()),
                    ],
                },
            }},
        });
        let (status, v) = http(addr, "POST", "/session", Some(&capabilities)).await;
        assert_eq!(status, 200, "creating a Chromium session: {v}");
        browser.session = v["value"]["sessionId"]
            .as_str()
            .expect("a session id")
            .to_string();
        browser
    }

    async fn command(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (status, v) = http(
            self.addr,
            method,
            &format!("/session/{}{path}", self.session),
            body,
        )
        .await;
        assert_eq!(status, 200, "WebDriver {method} {path}: {v}");
        v["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.command("POST", "/url", Some(&json!({ "url": url })))
            .await;
    }

    /// Runs `script` (a function body) in the page and returns its result.
    async fn eval(&self, script: &str) -> Value {
        self.command(
            "POST",
            "/execute/sync",
            Some(&json!({ "script": script, "args": [] })),
        )
        .await
    }

    async fn screenshot(&self, path: &Path) {
        let data = self.command("GET", "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(data.as_str().expect("base64"))
            .expect("a PNG");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let addr = self.addr;
            let path = format!("/session/{}", self.session);
            // Drop may run inside the runtime: close the browser from a thread of its own.
            let _ = std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(async {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(10),
                            http(addr, "DELETE", &path, None),
                        )
                        .await;
                    });
            })
            .join();
        }
        // Our own children, by their handles.
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        if let Some(mut guard) = self.guard.take() {
            let _ = guard.kill();
            let _ = guard.wait();
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// One row as the page shows it, or as the database holds it.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    id: i64,
    item: String,
    status: String,
    /// In cents, so that `84` and `84.00` compare equal.
    cents: i64,
}

/// What the page shows.
#[derive(Debug)]
struct Page {
    state: String,
    position: String,
    snapshots: u64,
    tokens: u64,
    expired: u64,
    reloaded: bool,
    rows: Vec<Row>,
    activity: String,
}

const READ_PAGE: &str = r##"
const state = document.getElementById("state");
if (!state) return null;
return {
  state: state.dataset.state,
  position: document.getElementById("position").textContent,
  snapshots: Number(document.body.dataset.snapshots),
  expired: Number(document.body.dataset.expired),
  tokens: Number(document.body.dataset.tokens),
  reloaded: window.__pgfeedTestMark !== "set",
  activity: document.getElementById("activity").innerText.slice(0, 600),
  rows: [...document.querySelectorAll("#rows tr[data-id]:not(.leaving)")].map((tr) => ({
    id: Number(tr.dataset.id),
    item: tr.querySelector('[data-col="item"]').textContent,
    status: tr.dataset.status,
    amount: Number(tr.dataset.amount),
  })),
};
"##;

async fn read_page(browser: &Browser) -> Option<Page> {
    let v = browser.eval(READ_PAGE).await;
    if v.is_null() {
        return None;
    }
    let mut rows: Vec<Row> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Row {
            id: r["id"].as_i64().unwrap(),
            item: r["item"].as_str().unwrap().to_string(),
            status: r["status"].as_str().unwrap().to_string(),
            cents: (r["amount"].as_f64().unwrap() * 100.0).round() as i64,
        })
        .collect();
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let mut sorted = ids.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(ids, sorted, "the page lists rows newest first");
    rows.sort_by_key(|r| r.id);
    Some(Page {
        state: v["state"].as_str().unwrap_or_default().to_string(),
        position: v["position"].as_str().unwrap_or_default().to_string(),
        snapshots: v["snapshots"].as_u64().unwrap_or(0),
        expired: v["expired"].as_u64().unwrap_or(0),
        tokens: v["tokens"].as_u64().unwrap_or(0),
        reloaded: v["reloaded"].as_bool().unwrap_or(true),
        rows,
        activity: v["activity"].as_str().unwrap_or_default().to_string(),
    })
}

async fn db_rows(client: &tokio_postgres::Client, tenant: &str) -> Vec<Row> {
    client
        .query(
            "SELECT id::int8, coalesce(item, '—'), status, (amount * 100)::int8
             FROM demo_orders WHERE tenant = $1 ORDER BY id",
            &[&tenant],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| Row {
            id: r.get(0),
            item: r.get(1),
            status: r.get(2),
            cents: r.get(3),
        })
        .collect()
}

/// Waits until the page shows exactly the database's rows for acme, and is live.
async fn wait_consistent(browser: &Browser, client: &tokio_postgres::Client, what: &str) -> Page {
    wait_until!(what, WAIT, {
        let expected = db_rows(client, "acme").await;
        match read_page(browser).await {
            Some(page) if page.rows == expected && page.state == "live" => Ok(page),
            Some(page) => Err(format!(
                "state {} position {}\n  page: {:?}\n  db:   {:?}\n  activity: {}",
                page.state, page.position, page.rows, expected, page.activity
            )),
            None => Err("page not loaded".into()),
        }
    })
}

async fn psql(url: &str, sql: &str) {
    let out = tokio::process::Command::new("psql")
        .args([url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!("running psql (install it: Debian `apt-get install postgresql-client`): {e}")
        });
    assert!(
        out.status.success(),
        "psql -c {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Commits a mix of inserts, updates and deletes for both tenants until `stop`, some of
/// them several to a transaction; counts commits in `done`.
async fn write_continuously(url: String, stop: CancellationToken, done: Arc<AtomicUsize>) {
    let client = support::connect(&url).await;
    let statuses = ["new", "paid", "shipped", "delivered", "cancelled"];
    let mut i = 0usize;
    while !stop.is_cancelled() {
        let tenant = if i % 3 == 2 { "globex" } else { "acme" };
        let status = statuses[i % statuses.len()];
        let sql = match i % 6 {
            0 | 3 => format!(
                "INSERT INTO demo_orders (tenant, item, status, amount)
                 VALUES ('{tenant}', 'Restock #{i}', '{status}', {}.{:02})",
                10 + i % 90,
                i % 100
            ),
            1 | 4 => format!(
                "UPDATE demo_orders SET status = '{status}', amount = amount + 1
                 WHERE id = (SELECT max(id) FROM demo_orders WHERE tenant = '{tenant}')"
            ),
            2 => format!(
                "BEGIN;
                 INSERT INTO demo_orders (tenant, item) VALUES ('{tenant}', 'Bundle #{i}');
                 UPDATE demo_orders SET item = item || ' (gift)'
                  WHERE id = (SELECT min(id) FROM demo_orders WHERE tenant = '{tenant}');
                 COMMIT"
            ),
            _ => format!(
                "DELETE FROM demo_orders WHERE id = (SELECT min(id) FROM demo_orders
                  WHERE tenant = '{tenant}' AND item LIKE 'Restock%')"
            ),
        };
        client.batch_execute(&sql).await.expect("a demo write");
        done.fetch_add(1, Ordering::SeqCst);
        i += 1;
        // Pacing, so that commits spread over the stop and the start.
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the writer has committed `n` more transactions.
async fn commits(done: &AtomicUsize, n: usize) {
    let target = done.load(Ordering::SeqCst) + n;
    wait_until!(format!("{n} more commits"), WAIT, {
        let now = done.load(Ordering::SeqCst);
        if now >= target {
            Ok(())
        } else {
            Err(format!("{now} of {target}"))
        }
    });
}

/// Starts the demo on fixed ports (so that the page finds it again after a restart).
fn start_demo(db: &TestDb, ports: (u16, u16), secret: &str, token_ttl: &str) -> DemoProcess {
    let (gateway, page) = ports;
    DemoProcess::start(
        &[
            "--listen",
            &format!("127.0.0.1:{gateway}"),
            "--page-listen",
            &format!("127.0.0.1:{page}"),
            "--token-ttl",
            token_ttl,
        ],
        &[
            ("DATABASE_URL", &db.url),
            ("PGFEED_AUTH_SECRET", secret),
            ("PGFEED_AUTH_LEEWAY", "0s"),
            ("PGFEED_SERVER_RETRY", "300ms"),
            ("PGFEED_SERVER_SHUTDOWN_GRACE", "2s"),
        ],
    )
}

fn stop_demo(demo: DemoProcess) {
    let (status, _, log) = demo.stop();
    assert!(
        status.success(),
        "the demo exits cleanly on SIGTERM: {status}\n{log}"
    );
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_live_page_follows_changes_restarts_and_resets_in_a_real_browser() {
    let Some(programs) = browser_programs() else {
        return;
    };
    let db = TestDb::empty().await;
    let ports = (free_port(), free_port());
    let mut demo = start_demo(&db, ports, SECRET, "1h");
    let client = db.client().await;
    let browser = Browser::start(programs).await;

    // The page loads, fetches, then subscribes, and shows acme's seed rows.
    browser
        .open(&format!("{}?tenant=acme", demo.banner.page))
        .await;
    browser.eval(r#"window.__pgfeedTestMark = "set";"#).await;
    let page = wait_consistent(&browser, &client, "the seed rows, live").await;
    assert_eq!(page.rows.len(), 4, "{page:?}");
    assert_eq!((page.snapshots, page.tokens), (1, 1));

    // A psql insert, update and delete, each shown as it commits.
    psql(
        &db.url,
        "INSERT INTO demo_orders (tenant, item, status, amount) VALUES ('acme', 'Walnut monitor stand', 'new', 84.00)",
    )
    .await;
    let page = wait_consistent(&browser, &client, "the insert").await;
    let new_id = page
        .rows
        .iter()
        .find(|r| r.item == "Walnut monitor stand")
        .expect("the inserted row")
        .id;
    psql(
        &db.url,
        &format!("UPDATE demo_orders SET status = 'shipped', amount = 89.00 WHERE id = {new_id}"),
    )
    .await;
    let page = wait_consistent(&browser, &client, "the update").await;
    assert!(
        page.rows
            .iter()
            .any(|r| r.id == new_id && r.status == "shipped" && r.cents == 8900)
    );
    // With the update still highlighted: what a user would see.
    let screenshot = target_dir().join("demo-screenshot.png");
    browser.screenshot(&screenshot).await;
    psql(
        &db.url,
        &format!("DELETE FROM demo_orders WHERE id = {new_id}"),
    )
    .await;
    let page = wait_consistent(&browser, &client, "the delete").await;
    assert!(page.rows.iter().all(|r| r.id != new_id));
    // Another tenant's row never shows.
    psql(
        &db.url,
        "INSERT INTO demo_orders (tenant, item) VALUES ('globex', 'Not for acme')",
    )
    .await;

    // The gateway stops and starts again while changes commit. EventSource reconnects by
    // itself, sending Last-Event-ID, and the page ends with exactly the database's rows:
    // no refetch, no new token (so not the client's own reconnect), no reload.
    let stop = CancellationToken::new();
    let done = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn(write_continuously(
        db.url.clone(),
        stop.clone(),
        Arc::clone(&done),
    ));
    commits(&done, 10).await;
    stop_demo(demo);
    wait_until!("the page to notice the gateway is gone", WAIT, {
        match read_page(&browser).await {
            Some(p) if p.state == "reconnecting" => Ok(()),
            Some(p) => Err(p.state),
            None => Err("page gone".into()),
        }
    });
    commits(&done, 20).await;
    demo = start_demo(&db, ports, SECRET, "1h");
    commits(&done, 20).await;
    stop.cancel();
    writer.await.unwrap();
    let page = wait_consistent(&browser, &client, "rows after the restart").await;
    assert_eq!(
        (page.snapshots, page.tokens),
        (1, 1),
        "resumed by EventSource's own reconnect with Last-Event-ID: no refetch, no new token"
    );
    assert!(!page.reloaded, "the page was not reloaded");
    assert!(page.rows.iter().all(|r| r.item != "Not for acme"));

    // Away while the journal is pruned, and back to a gateway with a rotated secret and
    // 4-second tokens. EventSource's reconnect is refused (401), so the client fetches a
    // fresh token and reconnects from its position; that position is pruned, so the
    // gateway says `reset` and the page refetches its rows once. Then its tokens expire
    // while it is live (`expired`) and it renews them, missing nothing.
    stop_demo(demo);
    psql(
        &db.url,
        "INSERT INTO demo_orders (tenant, item, status, amount) VALUES ('acme', 'Added while away', 'paid', 12.00);
         DELETE FROM demo_orders WHERE id = (SELECT min(id) FROM demo_orders WHERE tenant = 'acme');",
    )
    .await;
    // Numbered and pruned, as another gateway would have done meanwhile.
    psql(
        &db.url,
        "SELECT pgfeed.seal(); SELECT pgfeed.prune('0 seconds', 1000000)",
    )
    .await;
    demo = start_demo(&db, ports, ROTATED, "4s");
    let page = wait_consistent(&browser, &client, "rows after the reset").await;
    assert_eq!(page.snapshots, 2, "refetched once, on reset");
    assert!(page.tokens >= 2, "a fresh token after the refusal");
    assert!(!page.reloaded);
    let stop = CancellationToken::new();
    let writer = tokio::spawn(write_continuously(
        db.url.clone(),
        stop.clone(),
        Arc::clone(&done),
    ));
    let renewed = wait_until!("token renewals after `expired`", WAIT, {
        match read_page(&browser).await {
            Some(p) if p.expired >= 2 => Ok(p),
            Some(p) => Err(format!("{} expiries, state {}", p.expired, p.state)),
            None => Err("page gone".into()),
        }
    });
    stop.cancel();
    writer.await.unwrap();
    let page = wait_consistent(&browser, &client, "rows after token renewals").await;
    assert!(page.tokens >= renewed.tokens);
    assert_eq!(page.snapshots, 2, "no refetch on expiry");

    // The payload=keys dashboard example follows an insert by refetching its totals.
    browser
        .open(&format!("{}dashboard?tenant=acme", demo.banner.page))
        .await;
    let read_tiles = r##"
        const tiles = [...document.querySelectorAll("#tiles .tile")];
        return { state: document.getElementById("state").textContent,
                 tiles: tiles.map((t) => [t.dataset.status, Number(t.dataset.orders)]) };"##;
    let expected_tiles = async || -> Value {
        let rows = client
            .query(
                "SELECT status, count(*)::int8 FROM demo_orders WHERE tenant = 'acme'
                 GROUP BY status ORDER BY status",
                &[],
            )
            .await
            .unwrap();
        Value::from(
            rows.iter()
                .map(|r| json!([r.get::<_, String>(0), r.get::<_, i64>(1)]))
                .collect::<Vec<_>>(),
        )
    };
    for step in [
        "the dashboard's first totals",
        "the dashboard after an insert",
    ] {
        if step.ends_with("insert") {
            psql(
                &db.url,
                "INSERT INTO demo_orders (tenant, item, status) VALUES ('acme', 'Dashboard check', 'cancelled')",
            )
            .await;
        }
        wait_until!(step, WAIT, {
            let want = expected_tiles().await;
            let got = browser.eval(read_tiles).await;
            if got["tiles"] == want && got["state"] == "live" {
                Ok(())
            } else {
                Err(format!("page {got}, db {want}"))
            }
        });
    }
    browser
        .screenshot(&target_dir().join("dashboard-screenshot.png"))
        .await;

    drop(browser);
    stop_demo(demo);
    eprintln!("screenshot: {}", screenshot.display());
}

/// Whether `node` and `npm` are there for the React page test ([`support::require_tool`]).
fn node_tools_present(test: &str) -> bool {
    ["node", "npm"].into_iter().fold(true, |found, tool| {
        support::require_tool(tool, test) & found
    })
}

/// Runs `npm args` in `clients/js`, failing with its output unless it succeeds.
async fn npm_in_client_package(args: &[&str]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js");
    let output = tokio::time::timeout(
        Duration::from_secs(600),
        tokio::process::Command::new("npm")
            .args(args)
            .current_dir(&dir)
            .env("npm_config_update_notifier", "false")
            .env("npm_config_fund", "false")
            .env("npm_config_audit", "false")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("npm {args:?} did not finish in time"))
    .unwrap_or_else(|e| panic!("running npm {args:?}: {e}"));
    assert!(
        output.status.success(),
        "npm {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Serves `html` at every path but `/app.js`, which is `script`, until the test ends.
async fn serve_page(html: String, script: String) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (html, script) = (Arc::new(html), Arc::new(script));
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (html, script) = (html.clone(), script.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let path = String::from_utf8_lossy(&head)
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("/")
                    .to_string();
                let (kind, body) = if path.starts_with("/app.js") {
                    ("text/javascript", script.as_str())
                } else {
                    ("text/html; charset=utf-8", html.as_str())
                };
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(response.as_bytes()).await;
            });
        }
    });
    addr
}

/// A React page built with the client package (`clients/js/test/page/app.jsx`, bundled by
/// esbuild from the package's build) in headless Chromium, on another origin than the
/// gateway: `useFeed` over the fetch transport (the token in `Authorization`, through a
/// CORS preflight) shows a `psql` insert, update and delete as they commit. A screenshot
/// goes to `target/js-client-screenshot.png`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_react_page_built_with_the_client_package_shows_changes_live() {
    let programs = browser_programs();
    let node = node_tools_present("the React page test (tests/browser.rs)");
    let Some(programs) = programs.filter(|_| node) else {
        return;
    };
    npm_in_client_package(&["ci"]).await;
    npm_in_client_package(&["run", "build"]).await;
    let bundle = target_dir().join(format!("js-client-page-{}.js", std::process::id()));
    npm_in_client_package(&[
        "run",
        "build:page",
        "--",
        &format!("--outfile={}", bundle.display()),
    ])
    .await;
    let script = std::fs::read_to_string(&bundle).expect("the bundle esbuild wrote");
    let _ = std::fs::remove_file(&bundle);
    let html = "<!doctype html><html><head><meta charset=\"utf-8\"><title>pgfeed + React</title></head>\
                <body><div id=\"root\"></div><script src=\"/app.js\"></script></body></html>";
    let page = serve_page(html.to_string(), script).await;
    let origin = format!("http://{page}");

    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let gw = support::Gateway::start_with(support::sources_with(
        &db,
        &[("PGFEED_CORS_ALLOWED_ORIGINS", origin.as_str())],
    ))
    .await;
    let client = db.client().await;
    let browser = Browser::start(programs).await;
    browser
        .open(&format!(
            "{origin}/?gateway=http://{}&token={}",
            gw.addr,
            support::hs256_token("acme")
        ))
        .await;
    let status = r#"const p = document.getElementById("status");
        return p ? [p.dataset.status, p.dataset.transport] : null;"#;
    let rows =
        r##"return [...document.querySelectorAll("#rows li")].map((li) => li.textContent);"##;
    wait_until!("the page to go live", WAIT, {
        let seen = browser.eval(status).await;
        if seen == json!(["live", "fetch"]) {
            Ok(())
        } else {
            Err(seen.to_string())
        }
    });

    let id: i32 = client
        .query_one(
            "INSERT INTO notes (tenant, body) VALUES ('acme', 'from psql') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    client
        .batch_execute("INSERT INTO notes (tenant, body) VALUES ('globex', 'not acme''s')")
        .await
        .unwrap();
    wait_until!("the insert on the page", WAIT, {
        let seen = browser.eval(rows).await;
        if seen == json!(["from psql"]) {
            Ok(())
        } else {
            Err(seen.to_string())
        }
    });
    client
        .batch_execute(&format!(
            "UPDATE notes SET body = 'updated' WHERE id = {id};
             INSERT INTO notes (tenant, body) VALUES ('acme', 'second')"
        ))
        .await
        .unwrap();
    wait_until!("the update on the page", WAIT, {
        let seen = browser.eval(rows).await;
        if seen == json!(["updated", "second"]) {
            Ok(())
        } else {
            Err(seen.to_string())
        }
    });
    let screenshot = target_dir().join("js-client-screenshot.png");
    browser.screenshot(&screenshot).await;
    client
        .batch_execute(&format!("DELETE FROM notes WHERE id = {id}"))
        .await
        .unwrap();
    wait_until!("the delete on the page", WAIT, {
        let seen = browser.eval(rows).await;
        if seen == json!(["second"]) {
            Ok(())
        } else {
            Err(seen.to_string())
        }
    });
    assert_eq!(browser.eval(status).await, json!(["live", "fetch"]));
    drop(browser);
    gw.stop().await;
    eprintln!("screenshot: {}", screenshot.display());
}

/// TLS and HTTP/2 on the listener (issue 19): one page opens 10 EventSources on a gateway
/// serving TLS with a certificate the test made, and all 10 are live and receive a change.
/// Over HTTP/1.1 a browser holds at most 6 connections to an origin, so 4 would wait;
/// here they share the page's HTTP/2 connection: the page's timing entries say `h2`, and
/// the gateway counts no more connections with the 10 streams open than before them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_event_sources_on_one_page_share_one_http2_connection() {
    let Some(programs) = browser_programs() else {
        return;
    };
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let dir = std::env::temp_dir().join(format!("pgfeed-browser-h2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pair = support::cert_pair("browser test CA", &["localhost"]);
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, &pair.cert).unwrap();
    std::fs::write(&key, &pair.key).unwrap();
    let mut sources = support::sources(&db);
    sources.env.extend([
        (
            "PGFEED_SERVER_TLS_CERT_FILE".to_string(),
            cert.display().to_string(),
        ),
        (
            "PGFEED_SERVER_TLS_KEY_FILE".to_string(),
            key.display().to_string(),
        ),
    ]);
    let config = pgfeed::config::Config::load(&sources).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!(
        "https://localhost:{}",
        listener.local_addr().unwrap().port()
    );
    let shutdown = CancellationToken::new();
    let gateway = tokio::spawn(pgfeed::serve(config, listener, shutdown.clone()));

    let browser = Browser::start(programs).await;
    // The page is the gateway's own `/readyz`, on the gateway's origin: once it reads
    // "ready", the gateway is.
    wait_until!("the gateway to be ready over TLS", WAIT, {
        browser.open(&format!("{origin}/readyz")).await;
        let text = browser
            .eval("return document.body ? document.body.innerText : '';")
            .await;
        match text.as_str() {
            Some(t) if t.contains("\"ready\"") => Ok(()),
            _ => Err(text.to_string()),
        }
    });
    let before = scrape_from_page(&browser).await;
    let connections_before = support::sample(&before, "pgfeed_connections").unwrap();
    let token = support::hs256_token("acme");
    browser
        .eval(&format!(
            r#"window.feeds = [];
            for (let i = 0; i < 10; i++) {{
                const feed = {{ live: false, changes: [], errors: 0 }};
                const es = new EventSource("/v1/stream?access_token={token}");
                es.addEventListener("live", () => {{ feed.live = true; }});
                es.addEventListener("change", (e) => {{ feed.changes.push(JSON.parse(e.data)); }});
                es.onerror = () => {{ feed.errors += 1; }};
                feed.es = es;
                window.feeds.push(feed);
            }}
            return true;"#
        ))
        .await;
    wait_until!("all 10 EventSources live", WAIT, {
        let live = browser
            .eval("return window.feeds.filter((f) => f.live).length;")
            .await;
        if live == 10 {
            Ok(())
        } else {
            Err(format!("{live} live"))
        }
    });
    support::connect(&db.url)
        .await
        .execute(
            "INSERT INTO notes (tenant, body) VALUES ('acme', 'to ten tabs')",
            &[],
        )
        .await
        .unwrap();
    wait_until!("the change on all 10", WAIT, {
        let got = browser
            .eval("return window.feeds.map((f) => f.changes.map((c) => c.new.body).join(','));")
            .await;
        if got == json!(vec!["to ten tabs"; 10]) {
            Ok(())
        } else {
            Err(got.to_string())
        }
    });
    let errors = browser
        .eval("return window.feeds.reduce((n, f) => n + f.errors, 0);")
        .await;
    assert_eq!(errors, 0, "EventSource errors");

    // The page and its requests went over HTTP/2, and the 10 streams opened no
    // connection: the gateway holds as many as before them (one, or two when Chromium
    // kept a spare it opened while the gateway was starting).
    let page = scrape_from_page(&browser).await;
    assert_eq!(
        support::sample(&page, "pgfeed_subscribers"),
        Some(10.0),
        "{page}"
    );
    let connections = support::sample(&page, "pgfeed_connections").unwrap();
    assert!(
        connections <= connections_before && connections_before <= 2.0,
        "{connections_before} connections before the 10 streams, {connections} with them"
    );
    let protocols = browser
        .eval(
            r#"return [...performance.getEntriesByType("navigation"),
                        ...performance.getEntriesByType("resource")]
                .map((e) => e.nextHopProtocol);"#,
        )
        .await;
    let protocols = protocols.as_array().expect("a list of protocols").clone();
    assert!(
        protocols.len() >= 2 && protocols.iter().all(|p| p == "h2"),
        "{protocols:?}"
    );

    drop(browser);
    shutdown.cancel();
    tokio::time::timeout(WAIT, gateway)
        .await
        .expect("the gateway stops in time")
        .unwrap()
        .expect("serve returns Ok");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The gateway's `/metrics`, fetched by the page (so on the page's own connection).
async fn scrape_from_page(browser: &Browser) -> String {
    browser
        .eval(
            r#"window.scrape = null;
            fetch("/metrics").then((r) => r.text()).then((t) => { window.scrape = t; });
            return true;"#,
        )
        .await;
    wait_until!("/metrics from the page", WAIT, {
        let text = browser.eval("return window.scrape;").await;
        match text.as_str() {
            Some(t) => Ok(t.to_string()),
            None => Err(text.to_string()),
        }
    })
}
