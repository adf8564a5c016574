//! What operators rely on: metrics that move as events flow, `pgfeed status`, pruning by
//! one replica at a time, two replicas on one database, `--check-config`, and logs that
//! never carry a token.

use pgfeed_testkit as support;

use std::process::{Command, Stdio};

use support::{Gateway, SECRET, SseClient, TestDb, eventually, sample, scrape};

#[tokio::test]
async fn metrics_move_as_events_flow() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    let gw = Gateway::start(&db).await;
    let before = scrape(&gw).await;
    assert_eq!(sample(&before, "pgfeed_subscribers"), Some(0.0));
    assert_eq!(sample(&before, "pgfeed_listener_ready"), Some(1.0));
    assert!(
        sample(&before, "pgfeed_notification_queue_usage").is_some(),
        "{before}"
    );

    let mut s = gw.stream("acme", "").await;
    s.until_live().await;
    let refused = support::get(gw.addr, "/v1/stream", &[]).await.unwrap();
    assert_eq!(refused.status, 401);
    let c = db.client().await;
    c.batch_execute(
        "INSERT INTO orders (tenant, body) VALUES ('acme', 'a'), ('acme', 'b'), ('globex', 'c');
         UPDATE orders SET body = 'bb' WHERE body = 'b';",
    )
    .await
    .unwrap();
    s.next_change().await;
    s.next_change().await;
    s.next_change().await;

    let after = scrape(&gw).await;
    assert_eq!(sample(&after, "pgfeed_subscribers"), Some(1.0), "{after}");
    assert_eq!(sample(&after, "pgfeed_streams_opened_total"), Some(1.0));
    assert_eq!(
        sample(
            &after,
            r#"pgfeed_streams_rejected_total{reason="unauthorized"}"#
        ),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            r#"pgfeed_events_total{table="public.orders",op="insert"}"#
        ),
        Some(3.0),
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            r#"pgfeed_events_total{table="public.orders",op="update"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&after, "pgfeed_deliveries_total"),
        Some(3.0),
        "globex's row is not delivered to acme"
    );
    assert!(sample(&after, "pgfeed_bytes_written_total").unwrap() > 100.0);
    assert_eq!(
        sample(&after, "pgfeed_dispatch_latency_seconds_count"),
        Some(4.0),
        "{after}"
    );
    assert!(sample(&after, r#"pgfeed_journal_reads_total{kind="listener"}"#).unwrap() >= 1.0);
    // No tenant ever appears in a label.
    assert!(!after.contains("acme") && !after.contains("globex"));

    drop(s);
    eventually("the subscriber gauge drops", || async {
        sample(&scrape(&gw).await, "pgfeed_subscribers") == Some(0.0)
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn status_shows_journal_tables_and_gateways() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    let gw = Gateway::start(&db).await;
    db.client()
        .await
        .batch_execute("INSERT INTO orders (tenant, body) VALUES ('acme', 'x'), ('acme', 'y')")
        .await
        .unwrap();
    let run = |json: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgfeed"));
        cmd.arg("status")
            .env("DATABASE_URL", &db.url)
            .env("PGFEED_AUTH_SECRET", SECRET);
        if json {
            cmd.arg("--json");
        }
        cmd.output().unwrap()
    };
    let out = run(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["journal"]["changes"], 2);
    assert_eq!(status["journal"]["commits"], 1);
    assert_eq!(status["gateways"].as_array().unwrap().len(), 1, "{status}");
    assert_eq!(status["watched"][0]["table"], "public.orders");
    assert!(status["notification_queue_usage"].is_number());
    let text = String::from_utf8(run(false).stdout).unwrap();
    assert!(text.contains("2 changes in 1 commits"), "{text}");
    assert!(text.contains("gateways listening  1"), "{text}");
    assert!(
        text.contains("public.orders  (tenant column tenant)"),
        "{text}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn pruning_is_counted_and_takes_turns() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    let c = db.client().await;
    c.batch_execute("INSERT INTO orders (tenant, body) VALUES ('acme', 'old')")
        .await
        .unwrap();

    // While another session holds the pruning lock, a replica's pruning steps aside.
    let mut holder = db.client().await;
    let tx = holder.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE pgfeed.pruned IN SHARE ROW EXCLUSIVE MODE")
        .await
        .unwrap();
    let skipped: i32 = c
        .query_one("SELECT pgfeed.prune('0 seconds', 10)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(skipped, -1);
    tx.rollback().await.unwrap();

    let gw = Gateway::start_with(support::sources_with(&db, support::FAST_PRUNING)).await;
    eventually("the old commit is pruned and counted", || async {
        sample(&scrape(&gw).await, "pgfeed_pruned_commits_total") == Some(1.0)
    })
    .await;
    assert_eq!(support::journal_len(&c).await, 0);
    gw.stop().await;
}

#[tokio::test]
async fn two_replicas_both_deliver_and_clients_resume_across_them() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    let one = Gateway::start(&db).await;
    let two = Gateway::start(&db).await;
    let mut a = one.stream("acme", "").await;
    let mut b = two.stream("acme", "").await;
    a.until_live().await;
    b.until_live().await;
    let c = db.client().await;
    for i in 0..5 {
        c.execute(
            "INSERT INTO orders (tenant, body) VALUES ('acme', $1)",
            &[&format!("r{i}")],
        )
        .await
        .unwrap();
    }
    let mut via_one = Vec::new();
    for _ in 0..5 {
        via_one.push(a.next_change().await);
    }
    for expected in &via_one {
        assert_eq!(
            &b.next_change().await,
            expected,
            "both replicas deliver the same events"
        );
    }
    // The first replica goes away; its client resumes on the second.
    let last = via_one[2]["position"].as_str().unwrap().to_string();
    one.stop().await;
    c.execute(
        "INSERT INTO orders (tenant, body) VALUES ('acme', 'after')",
        &[],
    )
    .await
    .unwrap();
    let mut resumed = two.resume("acme", "", &last).await;
    let replayed: Vec<String> = resumed
        .until_live()
        .await
        .iter()
        .map(|e| e["new"]["body"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(replayed, ["r3", "r4", "after"]);
    two.stop().await;
}

#[test]
fn check_config_validates_without_starting() {
    let dir = std::env::temp_dir().join(format!("pgfeed-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |config: &str| {
        let path = dir.join("c.toml");
        std::fs::write(&path, config).unwrap();
        Command::new(env!("CARGO_BIN_EXE_pgfeed"))
            .args([
                "serve",
                "--check-config",
                "--config",
                path.to_str().unwrap(),
            ])
            .env_remove("DATABASE_URL")
            .env_remove("PGFEED_AUTH_SECRET")
            .output()
            .unwrap()
    };
    // A database that does not exist is fine: nothing connects.
    let ok = run(
        "[database]\nurl = \"postgres://nobody@127.0.0.1:1/none\"\n[auth]\nsecret = \"0123456789abcdef\"\n",
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stderr).contains("configuration is valid"));
    let missing_key = run(
        "[database]\nurl = \"postgres://x@127.0.0.1/db\"\n[auth]\njwks_file = \"/nonexistent/jwks.json\"\n",
    );
    assert!(!missing_key.status.success());
    assert!(String::from_utf8_lossy(&missing_key.stderr).contains("auth.jwks_file"));
    let remote_none = run(
        "[database]\nurl = \"postgres://x@127.0.0.1/db\"\n[server]\nlisten = \"0.0.0.0:8080\"\n[auth]\nmode = \"none\"\n",
    );
    assert!(!remote_none.status.success());
    assert!(String::from_utf8_lossy(&remote_none.stderr).contains("auth.mode"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn json_logs_record_streams_and_never_the_token() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    let addr = support::free_addr();
    let port = addr.port();
    let log = std::env::temp_dir().join(format!("pgfeed-log-{}-{port}.json", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgfeed"))
        .args(["serve", "--listen", &addr.to_string()])
        .env("DATABASE_URL", &db.url)
        .env("PGFEED_AUTH_SECRET", SECRET)
        .env("PGFEED_LOG_FORMAT", "json")
        .env("PGFEED_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    support::wait_until_ready(addr).await;
    let token = support::hs256_token("acme");
    let mut s = SseClient::open(addr, &format!("/v1/stream?access_token={token}"), &[]).await;
    s.until_live().await;
    db.client()
        .await
        .batch_execute("INSERT INTO orders (tenant, body) VALUES ('acme', 'row-value-secret')")
        .await
        .unwrap();
    s.next_change().await;
    drop(s);
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually("the stream's close is logged", || async {
        text().contains("stream closed")
    })
    .await;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let text = text();
    let _ = std::fs::remove_file(&log);
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{line}"
        );
    }
    assert!(text.contains("stream opened"));
    assert!(!text.contains(&token), "a token reached the log");
    assert!(
        !text.contains("row-value-secret"),
        "a row value reached the log"
    );
}
