//! The `pgfeed` binary as an operator uses it: install, watch, unwatch, status, token,
//! uninstall, configuration errors, and `serve` start-up and shutdown.

use pgfeed_testkit as support;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{SECRET, TestDb};

fn pgfeed(db: Option<&TestDb>, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgfeed"));
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .env("PGFEED_AUTH_SECRET", SECRET);
    for (k, _) in std::env::vars() {
        if k.starts_with("PGFEED_") && !k.starts_with("PGFEED_TEST_") && k != "PGFEED_AUTH_SECRET" {
            cmd.env_remove(k);
        }
    }
    if let Some(db) = db {
        cmd.env("DATABASE_URL", &db.url);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running pgfeed")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test]
async fn serve_refuses_a_database_without_the_schema() {
    let db = TestDb::empty().await;
    let out = pgfeed(Some(&db), &["serve", "--listen", "127.0.0.1:0"], &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("run `pgfeed install`"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn install_is_idempotent_and_watch_validates() {
    let db = TestDb::empty().await;
    let first = pgfeed(Some(&db), &["install"], &[]);
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(stderr(&first).contains("installed"), "{}", stderr(&first));
    let again = pgfeed(Some(&db), &["install"], &[]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(stderr(&again).contains("up to date"), "{}", stderr(&again));

    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE nokey (a int, tenant text);
         CREATE TABLE items (id int PRIMARY KEY, tenant text, secret text);",
    )
    .await
    .unwrap();

    let out = pgfeed(
        Some(&db),
        &["watch", "nokey", "--tenant-column", "tenant"],
        &[],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("has no primary key"),
        "{}",
        stderr(&out)
    );

    let out = pgfeed(Some(&db), &["watch", "items"], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("public => true"), "{}", stderr(&out));

    let out = pgfeed(
        Some(&db),
        &["watch", "items", "--tenant-column", "nope"],
        &[],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("\"nope\""), "{}", stderr(&out));

    let out = pgfeed(Some(&db), &["watch", "missing_table", "--public"], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("missing_table"), "{}", stderr(&out));

    let out = pgfeed(
        Some(&db),
        &[
            "watch",
            "items",
            "--tenant-column",
            "tenant",
            "--exclude-column",
            "secret",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));

    let status = pgfeed(Some(&db), &["status", "--json"], &[]);
    assert!(status.status.success(), "{}", stderr(&status));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["schema_version"], pgfeed::schema::VERSION);
    assert_eq!(
        status["watched"],
        serde_json::json!([{
            "table": "public.items", "tenant_column": "tenant", "exclude_columns": ["secret"],
            "exclude_dropped": [], "include_columns": null, "public": false, "partitions": [], "not_capturing": [],
        }])
    );

    // Watching again replaces the settings rather than failing or doubling triggers.
    let out = pgfeed(
        Some(&db),
        &["watch", "items", "--tenant-column", "tenant"],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let triggers: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'items'::regclass AND NOT tgisinternal",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(triggers, 4);

    let out = pgfeed(Some(&db), &["unwatch", "items"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Again: like watch, unwatch may be repeated (tests/cli_small.rs tries more).
    let out = pgfeed(Some(&db), &["unwatch", "items"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("not watched"), "{}", stderr(&out));

    // Uninstall removes the schema and the triggers; writes keep working.
    pgfeed(
        Some(&db),
        &["watch", "items", "--tenant-column", "tenant"],
        &[],
    );
    let out = pgfeed(Some(&db), &["uninstall"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    c.batch_execute("INSERT INTO items VALUES (1, 'acme', 'x')")
        .await
        .unwrap();
    let schema: Option<String> = c
        .query_one(
            "SELECT nspname::text FROM pg_namespace WHERE nspname = 'pgfeed'",
            &[],
        )
        .await
        .map(|r| r.get(0))
        .ok();
    assert!(schema.is_none());
}

#[test]
fn token_prints_only_the_token() {
    let out = pgfeed(None, &["token", "--tenant", "acme", "--ttl", "10m"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.ends_with('\n') && stdout.lines().count() == 1,
        "{stdout:?}"
    );
    let token = stdout.trim();
    let config = pgfeed::config::Config::load(&pgfeed::config::Sources {
        env: vec![("PGFEED_AUTH_SECRET".into(), SECRET.into())],
        ..Default::default()
    })
    .unwrap();
    let principal = pgfeed::auth::Authenticator::new(&config.auth)
        .unwrap()
        .authenticate(token)
        .unwrap();
    assert_eq!(principal.tenant, "acme");

    let out = pgfeed(
        None,
        &["token", "--tenant", "acme", "--ttl", "forever"],
        &[],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--ttl"), "{}", stderr(&out));
}

#[test]
fn configuration_errors_name_the_key() {
    let dir = std::env::temp_dir().join(format!("pgfeed-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "[server]\nheartbeat = \"often\"\n").unwrap();
    let out = pgfeed(
        None,
        &["--config", file.to_str().unwrap(), "token", "--tenant", "a"],
        &[],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("server.heartbeat"),
        "{}",
        stderr(&out)
    );

    // --config is global: after the subcommand too.
    let out = pgfeed(
        None,
        &["token", "--tenant", "a", "--config", file.to_str().unwrap()],
        &[],
    );
    assert!(
        stderr(&out).contains("server.heartbeat"),
        "{}",
        stderr(&out)
    );

    std::fs::write(&file, "[server]\nlisten_address = \"x\"\n").unwrap();
    let out = pgfeed(
        None,
        &["--config", file.to_str().unwrap(), "token", "--tenant", "a"],
        &[],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("listen_address"), "{}", stderr(&out));

    let out = pgfeed(None, &["serve"], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("database.url"), "{}", stderr(&out));

    let out = pgfeed(
        None,
        &["token", "--tenant", "a"],
        &[("PGFEED_AUTH_SECRET", "short")],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("auth.secret"), "{}", stderr(&out));

    // tables_claim_optional without a tables claim is a mistake, named.
    let out = pgfeed(
        None,
        &["token", "--tenant", "a"],
        &[("PGFEED_AUTH_TABLES_CLAIM_OPTIONAL", "true")],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("auth.tables_claim_optional"),
        "{}",
        stderr(&out)
    );
    // With a tables claim that is required, `token` without --tables would mint a token the
    // gateway refuses: it says so; names in --tables follow the name rules.
    let claim = [("PGFEED_AUTH_TABLES_CLAIM", "tables")];
    let out = pgfeed(None, &["token", "--tenant", "a"], &claim);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--tables"), "{}", stderr(&out));
    let out = pgfeed(
        None,
        &["token", "--tenant", "a", "--tables", "orders;x"],
        &claim,
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--tables"), "{}", stderr(&out));
    let out = pgfeed(
        None,
        &["token", "--tenant", "a", "--tables", "ORDERS"],
        &claim,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn serve_streams_and_stops_on_sigterm_within_the_grace() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    let addr = support::free_addr();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgfeed"))
        .args(["serve", "--listen", &addr.to_string()])
        .env("DATABASE_URL", &db.url)
        .env("PGFEED_AUTH_SECRET", SECRET)
        .env("PGFEED_SERVER_SHUTDOWN_GRACE", "3s")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    support::wait_until_ready(addr).await;
    let token = support::hs256_token("acme");
    let mut stream = support::SseClient::open(
        addr,
        "/v1/stream",
        &[("Authorization", &format!("Bearer {token}"))],
    )
    .await;
    stream.until_live().await;
    db.client()
        .await
        .batch_execute("INSERT INTO orders (tenant, body) VALUES ('acme', 'from psql')")
        .await
        .unwrap();
    assert_eq!(stream.next_change().await["new"]["body"], "from psql");

    let sent = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let shutdown = stream
        .next()
        .await
        .expect("a shutdown event before the stream ends");
    assert_eq!(shutdown.event, "shutdown");
    assert!(
        stream.next().await.is_none(),
        "the stream ends after shutdown"
    );
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(10),
            "serve did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
}

/// Tuples read from `pgfeed.changes` by scans so far, once the counters settle (a
/// backend's reads are flushed to the statistics when it ends or goes idle).
async fn changes_tuples_read(c: &tokio_postgres::Client) -> i64 {
    let read = || async {
        c.batch_execute("SELECT pg_catalog.pg_stat_clear_snapshot()")
            .await
            .unwrap();
        c.query_one(
            "SELECT (coalesce(t.seq_tup_read, 0)
                     + coalesce((SELECT sum(i.idx_tup_read) FROM pg_catalog.pg_stat_all_indexes AS i
                                 WHERE i.relid = t.relid), 0))::bigint
             FROM pg_catalog.pg_stat_all_tables AS t WHERE t.relid = 'pgfeed.changes'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
    };
    let mut last = read().await;
    let deadline = Instant::now() + support::SOON;
    loop {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let now = read().await;
        if now == last {
            return now;
        }
        assert!(Instant::now() < deadline, "statistics never settled");
        last = now;
    }
}

/// `pgfeed status` on a big journal reads a bounded number of journal rows (an operator
/// runs it exactly when the journal is big) and says its numbers are estimates.
#[tokio::test]
async fn status_does_not_count_the_whole_journal() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    {
        let writer = db.client().await;
        writer
            .batch_execute(
                "INSERT INTO notes (tenant, body) SELECT 'acme', 'x' FROM generate_series(1, 40000);
                 ANALYZE pgfeed.changes;",
            )
            .await
            .unwrap();
    }
    let c = db.client().await;
    let before = changes_tuples_read(&c).await;
    let status = support::status_json(&db).await;
    let journal = &status["journal"];
    assert_eq!(journal["changes_exact"], false, "{journal}");
    let changes = journal["changes"].as_i64().unwrap();
    assert!((30_000..=50_000).contains(&changes), "{journal}");
    assert_eq!(journal["commits"], 1, "{journal}");
    assert_eq!(journal["commits_exact"], true, "{journal}");
    // The status process has ended: its reads are in the statistics once they settle.
    let read = loop {
        let after = changes_tuples_read(&c).await;
        if after > before {
            break after - before;
        }
    };
    let bound = pgfeed::cli::STATUS_EXACT_COUNT + 1;
    assert!(
        read <= bound + 100,
        "status read {read} journal rows; at most {bound} expected, not the whole 40 000"
    );
    let text = support::pgfeed_cli(&db, &["status"]).await;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("changes in") && text.contains('~') && text.contains("estimate"),
        "{text}"
    );
}

/// An installer without the privileges install would like (not a member of
/// pgfeed_capture, not a superuser) gets the server's warnings as the CLI's own lines,
/// with their hints, not as the database driver's log noise.
#[tokio::test]
async fn install_warnings_are_the_clis_own() {
    // pgfeed_capture exists (it is cluster-wide; a first install creates it).
    let _first = TestDb::new().await;
    let db = TestDb::empty().await;
    let (role, _client) = support::app_owner(&db, "installer").await;
    let url = db
        .url
        .replacen("://postgres@", &format!("://{role}:pw@"), 1);
    assert_ne!(url, db.url, "the test URL names the postgres user");
    let out = pgfeed(None, &["install"], &[("DATABASE_URL", &url)]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.lines().any(|l| l
            .starts_with("warning: pgfeed: cannot hand the capture functions to pgfeed_capture")),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.trim_start().starts_with("hint: GRANT pgfeed_capture")),
        "{err}"
    );
    assert!(
        !err.contains("tokio_postgres") && !err.contains("INFO"),
        "driver noise: {err}"
    );
}

/// A mistyped `PGFEED_LOG` is refused with a message naming it, rather than silently
/// logging nothing (a bare word is a module filter to the logging library).
#[test]
fn an_invalid_log_filter_is_refused() {
    for bad in ["loud", "debgu", "pgfeed=loud", "info,pgfeed=verbose"] {
        let out = pgfeed(None, &["token", "--tenant", "a"], &[("PGFEED_LOG", bad)]);
        assert!(!out.status.success(), "PGFEED_LOG={bad} was accepted");
        assert!(
            stderr(&out).contains("PGFEED_LOG"),
            "{bad}: {}",
            stderr(&out)
        );
        assert!(out.stdout.is_empty(), "{bad}: no token on an error");
    }
    for good in [
        "debug",
        "WARN",
        "pgfeed=debug,tokio_postgres=warn",
        "pgfeed::listener=trace",
        "",
    ] {
        let out = pgfeed(None, &["token", "--tenant", "a"], &[("PGFEED_LOG", good)]);
        assert!(
            out.status.success(),
            "PGFEED_LOG={good:?}: {}",
            stderr(&out)
        );
    }
}
