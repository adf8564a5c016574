//! What other database roles can do to pgfeed from outside (issue 15, items 5, 6 and 7):
//! watch pgfeed's own or the system's tables, take locks with pgfeed's well-known keys,
//! and set `pgfeed.ord` in their own transactions. None of it may block capture, install or
//! pruning, corrupt a position, or lose a change.

use pgfeed_testkit as support;
use pgfeed_testkit::demo_process;

use serde_json::Value;
use support::{
    FAST_PRUNING, Gateway, Run, SseClient, TestDb, query_i64, sample, scrape,
    server_message as message,
};
use tokio_postgres::{Client, Transaction};

/// The key pgfeed's advisory locks used to share (`pg_advisory_lock(KEY, k)`).
const KEY: i32 = 1_885_824_612;

/// The commit and ordinal of a position exactly as sent (any integers, so that a broken
/// one such as `379.-1` is reported rather than failing to parse).
fn parts(position: &str) -> (i64, i64) {
    let (commit, ord) = position
        .split_once('.')
        .unwrap_or_else(|| panic!("position {position:?} is not <commit>.<ord>"));
    (
        commit
            .parse()
            .unwrap_or_else(|_| panic!("commit of {position:?}")),
        ord.parse()
            .unwrap_or_else(|_| panic!("ord of {position:?}")),
    )
}

/// The position of change `e`.
fn position(e: &Value) -> String {
    e["position"].as_str().expect("a position").to_string()
}

// ---------------------------------------------------------------------------------------
// Item 5: pgfeed's own tables and system tables cannot be watched.

/// `announcements`, watched per tenant, written by an application role.
async fn announcements(db: &TestDb) -> tokio_postgres::Client {
    let (_role, app) = support::app_owner(db, "app").await;
    app.run("CREATE TABLE announcements (id serial PRIMARY KEY, tenant text NOT NULL, body text)")
        .await;
    db.client()
        .await
        .run("SELECT pgfeed.watch('announcements', tenant_column => 'tenant')")
        .await;
    app
}

/// A watched write as the application makes it, delivered to `acme`.
async fn assert_capture_works(app: &tokio_postgres::Client, acme: &mut SseClient, body: &str) {
    app.execute(
        "INSERT INTO announcements (tenant, body) VALUES ('acme', $1)",
        &[&body],
    )
    .await
    .unwrap_or_else(|e| panic!("a watched write failed: {}", message(&e)));
    let e = acme.next_change().await;
    assert_eq!(e["new"]["body"], body, "{e}");
}

#[tokio::test]
async fn pgfeed_and_system_tables_cannot_be_watched() {
    let db = TestDb::new().await;
    let app = announcements(&db).await;
    let admin = db.client().await;
    let toast: String = admin
        .query_one(
            "SELECT reltoastrelid::regclass::text FROM pg_class WHERE oid = 'pgfeed.changes'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // A table an operator put in schema pgfeed by mistake is pgfeed's too.
    admin
        .run("CREATE TABLE pgfeed.mine (id int PRIMARY KEY, tenant text)")
        .await;
    let attempts = [
        "SELECT pgfeed.watch('pgfeed.changes', public => true)".to_string(),
        "SELECT pgfeed.watch('pgfeed.commits', public => true)".to_string(),
        "SELECT pgfeed.watch('pgfeed.watched', public => true)".to_string(),
        "SELECT pgfeed.watch('pgfeed.pruned', public => true)".to_string(),
        "SELECT pgfeed.watch('pgfeed.mine', tenant_column => 'tenant')".to_string(),
        "SELECT pgfeed.watch('pg_catalog.pg_class', public => true)".to_string(),
        "SELECT pgfeed.watch('pg_catalog.pg_database', public => true)".to_string(),
        "SELECT pgfeed.watch('information_schema.sql_features', public => true)".to_string(),
        format!("SELECT pgfeed.watch('{toast}', public => true)"),
    ];
    for sql in &attempts {
        match admin.batch_execute(sql).await {
            Ok(()) => panic!("`{sql}` succeeded; it must be refused"),
            Err(e) => {
                let msg = message(&e);
                assert!(msg.contains("cannot watch"), "`{sql}`: {msg}");
            }
        }
    }
    let watched: Vec<String> = admin
        .query("SELECT tbl::text FROM pgfeed.watched", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(watched, ["announcements"]);
    let triggers = query_i64(
        &admin,
        "SELECT count(*) FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid
             WHERE c.relnamespace = 'pgfeed'::regnamespace AND t.tgname LIKE 'pgfeed_capture%'",
        &[],
    )
    .await;
    assert_eq!(triggers, 0, "capture triggers on pgfeed's own tables");

    let gw = Gateway::start(&db).await;
    let mut acme = gw.live("acme").await;
    assert_capture_works(&app, &mut acme, "after the attempts").await;
    gw.stop().await;
}

#[tokio::test]
async fn the_cli_refuses_to_watch_pgfeed_tables() {
    let db = TestDb::new().await;
    let app = announcements(&db).await;
    for table in ["pgfeed.changes", "pgfeed.commits"] {
        let out = support::pgfeed_cli(&db, &["watch", table, "--public"]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "pgfeed watch {table} --public succeeded"
        );
        assert!(stderr.contains("cannot watch"), "{table}: {stderr}");
    }
    let gw = Gateway::start(&db).await;
    let mut acme = gw.live("acme").await;
    assert_capture_works(&app, &mut acme, "after the CLI attempts").await;
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// Item 6: locks nobody else can take.

/// A role without grants whose session holds every advisory lock `(KEY, 0..=8)`; returns
/// its name and that session.
async fn attacker_holding_every_key(db: &TestDb) -> (String, Client) {
    let attacker_role = support::create_login_role(db, "attacker").await;
    let attacker = support::connect_as_role(db, &attacker_role).await;
    for k in 0..=8 {
        attacker
            .execute("SELECT pg_advisory_lock($1, $2)", &[&KEY, &k])
            .await
            .unwrap();
    }
    (attacker_role, attacker)
}

/// Advisory locks granted to sessions of `role`.
async fn advisory_locks_held_by(admin: &Client, role: &str) -> i64 {
    query_i64(
        admin,
        "SELECT count(*) FROM pg_locks AS l JOIN pg_stat_activity AS a USING (pid)
             WHERE l.locktype = 'advisory' AND l.granted AND a.usename = $1",
        &[&role],
    )
    .await
}

/// Takes the pruning lock in a transaction of `holder`, as another pruner would.
async fn hold_pruning_lock(holder: &mut Client) -> Transaction<'_> {
    let tx = holder.transaction().await.unwrap();
    tx.run("LOCK TABLE pgfeed.pruned IN SHARE ROW EXCLUSIVE MODE")
        .await;
    tx
}

/// Waits until the journal has no commits left: pruning has removed them all.
async fn until_pruned(admin: &Client, what: &str) {
    support::eventually(what, || async {
        query_i64(admin, "SELECT count(*) FROM pgfeed.commits", &[]).await == 0
    })
    .await;
}

#[tokio::test]
async fn advisory_locks_held_by_a_role_without_grants_block_nothing() {
    let db = TestDb::new().await;
    let mut app = announcements(&db).await;
    app.run("SET statement_timeout = '5s'").await;
    let admin = db.client().await;
    let (attacker_role, attacker) = attacker_holding_every_key(&db).await;
    let held = advisory_locks_held_by(&admin, &attacker_role).await;
    assert_eq!(held, 9, "the attacker holds every key");
    // Nor can it take the locks that replaced them.
    for table in ["pgfeed.commit_order", "pgfeed.pruned", "pgfeed.meta"] {
        let sql = format!("BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE NOWAIT");
        let err = attacker
            .batch_execute(&sql)
            .await
            .expect_err("an unprivileged role locked a pgfeed table");
        attacker.run("ROLLBACK").await;
        assert!(
            message(&err).contains("permission denied"),
            "{table}: {}",
            message(&err)
        );
    }

    let gw = Gateway::start_with(support::sources_with(&db, FAST_PRUNING)).await;
    let mut acme = gw.live("acme").await;

    // Watched commits neither wait nor fail (statement_timeout is 5 s).
    for i in 0..3 {
        let body = format!("while locked {i}");
        tokio::time::timeout(support::SOON, assert_capture_works(&app, &mut acme, &body))
            .await
            .expect(
                "a watched write and its delivery within SOON (blocked by the attacker's locks?)",
            );
    }
    let tx = app.transaction().await.unwrap();
    tx.run(
        "INSERT INTO announcements (tenant, body) VALUES ('acme', 'multi 1'), ('acme', 'multi 2')",
    )
    .await;
    tx.commit()
        .await
        .unwrap_or_else(|e| panic!("commit of a watched transaction: {}", message(&e)));
    assert_eq!(acme.next_change().await["new"]["body"], "multi 1");
    assert_eq!(acme.next_change().await["new"]["body"], "multi 2");

    // Install runs (it is up to date).
    let out = support::pgfeed_cli(&db, &["install"]).await;
    assert!(
        out.status.success(),
        "pgfeed install: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // And pruning removes everything older than the retention.
    until_pruned(&admin, "the journal is pruned despite the attacker's locks").await;
    // The attacker still holds them all: nothing above waited for them to go.
    let held = advisory_locks_held_by(&admin, &attacker_role).await;
    assert_eq!(held, 9);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_on_an_existing_database_is_not_blocked_by_advisory_locks() {
    let db = TestDb::empty().await;
    let (_attacker_role, _attacker) = attacker_holding_every_key(&db).await;
    let url = db.url.clone();
    // Panics if the banner does not come within demo_process::START.
    let demo = tokio::task::spawn_blocking(move || {
        demo_process::DemoProcess::start(
            &["--listen", "127.0.0.1:0"],
            &[("DATABASE_URL", url.as_str())],
        )
    })
    .await
    .expect("the demo must start despite the attacker's advisory locks");
    assert!(
        demo.banner.database.contains("demo_orders"),
        "{}",
        demo.banner.database
    );
    let (status, _, log) = tokio::task::spawn_blocking(move || demo.stop())
        .await
        .unwrap();
    assert!(status.success(), "{log}");
}

#[tokio::test]
async fn a_pruner_that_cannot_get_its_lock_is_counted_and_writes_go_on() {
    let db = TestDb::new().await;
    let app = announcements(&db).await;
    app.run("INSERT INTO announcements (tenant, body) VALUES ('acme', 'old')")
        .await;
    let sources = support::sources_with(&db, FAST_PRUNING);

    // Another pruner (a superuser session here) holds the pruning lock.
    let mut holder = db.client().await;
    let tx = hold_pruning_lock(&mut holder).await;

    let gw = Gateway::start_with(sources).await;
    let skipped = |text: &str| sample(text, "pgfeed_prune_skipped_total").unwrap_or(0.0);
    let before = skipped(&scrape(&gw).await);
    support::eventually("pgfeed_prune_skipped_total rises", || async {
        skipped(&scrape(&gw).await) > before
    })
    .await;
    let text = scrape(&gw).await;
    assert!(
        sample(&text, "pgfeed_prune_skipped_total").is_some(),
        "the metric is exported"
    );
    // Capture and delivery go on meanwhile.
    let mut acme = gw.live("acme").await;
    assert_capture_works(&app, &mut acme, "while pruning is blocked").await;

    // Once the lock is gone, pruning catches up.
    tx.rollback().await.unwrap();
    let admin = db.client().await;
    until_pruned(&admin, "the journal is pruned once the lock is released").await;
    gw.stop().await;
}

#[tokio::test]
async fn a_pruner_skipped_interval_after_interval_says_so_at_warn() {
    use tokio::io::AsyncBufReadExt;

    let db = TestDb::new().await;
    let _app = announcements(&db).await;
    let mut holder = db.client().await;
    let tx = hold_pruning_lock(&mut holder).await;

    let listen = support::free_addr().to_string();
    let mut cmd = support::pgfeed_command(&db, &["serve", "--listen", &listen]);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .env("PGFEED_LOG_FORMAT", "json")
        .env("PGFEED_JOURNAL_PRUNE_INTERVAL", "100ms");
    let mut child = cmd.spawn().expect("starting pgfeed serve");
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let warned = tokio::time::timeout(support::SOON, async {
        while let Some(line) = lines.next_line().await.expect("reading the log") {
            let warn = serde_json::from_str::<Value>(&line).is_ok_and(|l| {
                l["level"] == "WARN" && l.to_string().to_lowercase().contains("prun")
            });
            seen.push(line);
            if warn {
                return true;
            }
        }
        false
    })
    .await;
    let _ = child.kill().await;
    assert!(
        matches!(warned, Ok(true)),
        "no WARN about pruning while it was skipped interval after interval; the log:\n{}",
        seen.join("\n")
    );
    tx.rollback().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Item 7: pgfeed.ord set by the application.

/// Reads `acme`'s changes until one whose body is `last`.
async fn changes_until(acme: &mut SseClient, last: &str) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let e = acme.next_change().await;
        let done = e["new"]["body"] == last;
        out.push(e);
        if done {
            return out;
        }
    }
}

/// Every position has ord >= 1 and they strictly increase.
fn assert_positions_sound(changes: &[Value]) {
    let positions: Vec<(i64, i64)> = changes.iter().map(|e| parts(&position(e))).collect();
    for (e, (_, ord)) in changes.iter().zip(&positions) {
        assert!(*ord >= 1, "an ordinal below 1: {e}");
        position(e)
            .parse::<pgfeed::change::Position>()
            .unwrap_or_else(|err| panic!("{err}: {e}"));
    }
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "positions increase: {positions:?}"
    );
}

#[tokio::test]
async fn a_negative_pgfeed_ord_cannot_corrupt_positions() {
    let db = TestDb::new().await;
    let app = announcements(&db).await;
    let gw = Gateway::start(&db).await;
    let mut acme = gw.live("acme").await;
    let mut globex = gw.live("globex").await;

    app.run(
        "BEGIN;
         SET LOCAL pgfeed.ord = '-2';
         TRUNCATE announcements;
         INSERT INTO announcements (tenant, body) VALUES ('acme', 'a'), ('acme', 'b');
         INSERT INTO announcements (tenant, body) VALUES ('globex', 'g');
         INSERT INTO announcements (tenant, body) VALUES ('acme', 'c');
         COMMIT;
         INSERT INTO announcements (tenant, body) VALUES ('acme', 'after');",
    )
    .await;
    let changes = changes_until(&mut acme, "after").await;
    let ops: Vec<String> = changes
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["op"].as_str().unwrap(),
                e["new"]["body"].as_str().unwrap_or("-")
            )
        })
        .collect();
    assert_eq!(
        ops,
        [
            "truncate -",
            "insert a",
            "insert b",
            "insert c",
            "insert after"
        ]
    );
    assert_positions_sound(&changes);
    // One transaction: one commit, ordinals 1.. in statement order (globex's insert is
    // number 4, which acme does not see).
    let ords: Vec<(i64, i64)> = changes.iter().map(|e| parts(&position(e))).collect();
    assert!(ords[..4].iter().all(|(c, _)| *c == ords[0].0), "{ords:?}");
    assert_eq!(
        ords[..4].iter().map(|(_, o)| *o).collect::<Vec<_>>(),
        [1, 2, 3, 5]
    );
    let g = changes_until_globex(&mut globex).await;
    assert_positions_sound(&g);

    // Every id sent is accepted back, and resuming from it gives exactly what followed.
    for (i, e) in changes.iter().enumerate() {
        let id = position(e);
        let mut r = gw.resume("acme", "", &id).await;
        assert_eq!(r.status, 200, "Last-Event-ID {id} refused: {}", r.raw);
        let replay: Vec<String> = r.until_live().await.iter().map(position).collect();
        let expected: Vec<String> = changes[i + 1..].iter().map(position).collect();
        assert_eq!(replay, expected, "resuming from {id}");
    }
    gw.stop().await;
}

/// globex's changes from [`a_negative_pgfeed_ord_cannot_corrupt_positions`]: the
/// truncate and its own insert.
async fn changes_until_globex(globex: &mut SseClient) -> Vec<Value> {
    let t = globex.next_change().await;
    assert_eq!(t["op"], "truncate", "{t}");
    let g = globex.next_change().await;
    assert_eq!(g["new"]["body"], "g", "{g}");
    vec![t, g]
}

/// Writes `body` in a transaction that sets `pgfeed.ord` to `ord` before it, and checks
/// that `acme` receives the change with ordinal 1; returns it.
async fn assert_ord_set_first_is_ignored(
    app: &Client,
    acme: &mut SseClient,
    ord: &str,
    body: &str,
) -> Value {
    app.run(&format!(
        "BEGIN;
         SET LOCAL pgfeed.ord = '{ord}';
         INSERT INTO announcements (tenant, body) VALUES ('acme', '{body}');
         COMMIT;"
    ))
    .await;
    let e = acme.next_change().await;
    assert_eq!(e["new"]["body"], body);
    assert!(position(&e).ends_with(".1"), "{e}");
    e
}

#[tokio::test]
async fn a_high_pgfeed_ord_loses_nothing() {
    let db = TestDb::new().await;
    let app = announcements(&db).await;
    let gw = Gateway::start(&db).await;
    let mut acme = gw.live("acme").await;

    // Before the transaction's first write.
    let five = assert_ord_set_first_is_ignored(&app, &mut acme, "5", "five").await;
    // The largest integer: nothing overflows.
    let max = assert_ord_set_first_is_ignored(&app, &mut acme, "2147483647", "max").await;

    // Between two writes of one transaction.
    app.run(
        "BEGIN;
         INSERT INTO announcements (tenant, body) VALUES ('acme', 'first');
         SET LOCAL pgfeed.ord = '100';
         INSERT INTO announcements (tenant, body) VALUES ('acme', 'second');
         COMMIT;",
    )
    .await;
    let first = acme.next_change().await;
    let second = acme.next_change().await;
    assert_eq!(
        (&first["new"]["body"], &second["new"]["body"]),
        (&Value::from("first"), &Value::from("second"))
    );
    let (c1, o1) = parts(&position(&first));
    let (c2, o2) = parts(&position(&second));
    assert_eq!((c1, o1, o2), (c2, 1, 2), "{first} {second}");

    // After the last write, just before the commit: the commit is numbered with whatever
    // it says, and must still deliver exactly what was written.
    let mut after_last = Vec::new();
    for (i, forged) in ["1", "-5", "100000"].into_iter().enumerate() {
        app.run(&format!(
            "BEGIN;
             INSERT INTO announcements (tenant, body) VALUES ('acme', 'forged {i} a');
             INSERT INTO announcements (tenant, body) VALUES ('acme', 'forged {i} b'), ('acme', 'forged {i} c');
             SET LOCAL pgfeed.ord = '{forged}';
             COMMIT;"
        )).await;
        for (ord, row) in [(1, "a"), (2, "b"), (3, "c")] {
            let e = acme.next_change().await;
            assert_eq!(e["new"]["body"], format!("forged {i} {row}"), "{e}");
            assert_eq!(parts(&position(&e)).1, ord, "{e}");
            after_last.push(e);
        }
    }

    // For the whole session: every single-statement transaction after it.
    app.run("SET pgfeed.ord = '7'").await;
    for i in 0..3 {
        app.execute(
            "INSERT INTO announcements (tenant, body) VALUES ('acme', $1)",
            &[&format!("session {i}")],
        )
        .await
        .unwrap();
    }
    let mut all = vec![five, max, first, second];
    all.extend(after_last);
    for i in 0..3 {
        let e = acme.next_change().await;
        assert_eq!(e["new"]["body"], format!("session {i}"), "{e}");
        assert!(position(&e).ends_with(".1"), "{e}");
        all.push(e);
    }
    assert_positions_sound(&all);
    for e in &all {
        let id = position(e);
        let r = gw.resume("acme", "", &id).await;
        assert_eq!(r.status, 200, "Last-Event-ID {id} refused: {}", r.raw);
    }
    gw.stop().await;
}
