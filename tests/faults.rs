//! Delivery under real faults: the listener's backend terminated, a connection that goes
//! silent, a gateway restart, a subscriber that stops reading, pruned positions. Each test
//! commits changes throughout and checks exactly-once, in-order delivery per subscriber
//! against what the database holds.

use pgfeed_testkit as support;

use std::time::Duration;

use support::{Gateway, SseClient, TestDb, eventually};

/// Inserts `n` rows for `tenant` in `orders`, one transaction each, with bodies
/// `"{prefix}{i}"`.
async fn write(db: &TestDb, tenant: &str, prefix: &str, n: usize) {
    let c = db.client().await;
    for i in 0..n {
        c.execute(
            "INSERT INTO orders (tenant, body) VALUES ($1, $2)",
            &[&tenant, &format!("{prefix}{i}")],
        )
        .await
        .unwrap();
    }
}

/// One row per statement, for [`write_in_background`].
const ONE_ROW: &str = "INSERT INTO orders (tenant, body) VALUES ($1, $2)";

/// Runs `sql` with `$1, $2` = `row(i)` (tenant, body) for `i` in `0..n`, one transaction
/// each, on a connection of its own in the background.
fn write_in_background(
    url: String,
    n: usize,
    sql: &'static str,
    row: fn(usize) -> (&'static str, String),
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let c = support::connect(&url).await;
        for i in 0..n {
            let (tenant, body) = row(i);
            c.execute(sql, &[&tenant, &body]).await.unwrap();
            if i % 50 == 25 {
                // Lets the test's reader run between writes on a single-threaded runtime.
                tokio::task::yield_now().await;
            }
        }
    })
}

/// The bodies of `tenant`'s rows, in commit (= id, with one writer) order.
async fn bodies(db: &TestDb, tenant: &str) -> Vec<String> {
    db.client()
        .await
        .query(
            "SELECT body FROM orders WHERE tenant = $1 ORDER BY id",
            &[&tenant],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Reads `n` changes and returns their bodies, checking positions strictly increase.
async fn read_bodies(
    s: &mut SseClient,
    n: usize,
    last: &mut Option<pgfeed::change::Position>,
) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let e = s.next_change().await;
        let p = support::position(&e);
        if let Some(prev) = *last {
            assert!(
                p > prev,
                "position {p} after {prev}: out of order or duplicated"
            );
        }
        *last = Some(p);
        out.push(e["new"]["body"].as_str().unwrap().to_string());
    }
    out
}

#[tokio::test]
async fn listener_terminated_repeatedly_loses_nothing() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    let gw = Gateway::start(&db).await;
    let mut s = gw.stream("acme", "").await;
    s.until_live().await;

    let writer = write_in_background(db.url.clone(), 300, ONE_ROW, |i| ("acme", format!("w{i}")));
    let mut last = None;
    let mut received = Vec::new();
    for _ in 0..5 {
        received.extend(read_bodies(&mut s, 20, &mut last).await);
        eventually("the listener backend is terminated", || async {
            support::terminate_listener(&db).await > 0
        })
        .await;
        support::until_readyz(gw.addr, 200).await;
    }
    writer.await.unwrap();
    let expected = bodies(&db, "acme").await;
    received.extend(read_bodies(&mut s, expected.len() - received.len(), &mut last).await);
    assert_eq!(received, expected);
    s.assert_quiet(Duration::from_millis(300)).await;
    gw.stop().await;
}

#[tokio::test]
async fn silently_dead_connection_is_detected_and_replaced() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    let proxy = support::Proxy::start(&db.url).await;
    let mut sources = support::sources(&db);
    sources.env.retain(|(k, _)| k != "DATABASE_URL");
    sources.env.extend([
        ("DATABASE_URL".to_string(), proxy.url(&db.url)),
        (
            "PGFEED_DATABASE_HEALTH_INTERVAL".to_string(),
            "200ms".to_string(),
        ),
        (
            "PGFEED_DATABASE_QUERY_TIMEOUT".to_string(),
            "1s".to_string(),
        ),
    ]);
    let gw = Gateway::start_with(sources).await;
    let mut s = gw.stream("acme", "").await;
    s.until_live().await;
    write(&db, "acme", "before", 3).await;
    let mut last = None;
    let mut received = read_bodies(&mut s, 3, &mut last).await;

    // Every connection through the proxy goes silent; writes go straight to PostgreSQL.
    proxy.freeze_existing();
    write(&db, "acme", "during", 5).await;
    // /readyz reports the dead connection.
    support::until_readyz(gw.addr, 503).await;
    support::until_readyz(gw.addr, 200).await;
    write(&db, "acme", "after", 3).await;
    received.extend(read_bodies(&mut s, 8, &mut last).await);
    assert_eq!(received, bodies(&db, "acme").await);
    s.assert_quiet(Duration::from_millis(300)).await;
    gw.stop().await;
}

#[tokio::test]
async fn gateway_restart_with_clients_resuming() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    let gw = Gateway::start(&db).await;
    let mut a = gw.stream("acme", "").await;
    a.until_live().await;

    let writer = write_in_background(db.url.clone(), 400, ONE_ROW, |i| {
        (if i % 3 == 0 { "globex" } else { "acme" }, format!("r{i}"))
    });
    let mut last = None;
    let mut received = read_bodies(&mut a, 40, &mut last).await;

    // SIGTERM's path: the stream gets `shutdown` and ends while writes go on.
    gw.stop().await;
    loop {
        match a.next().await {
            Some(e) if e.event == "change" => received.extend(std::iter::once(
                e.json()["new"]["body"].as_str().unwrap().to_string(),
            )),
            Some(e) => {
                assert_eq!(e.event, "shutdown");
                last = Some(e.json()["position"].as_str().unwrap().parse().unwrap());
            }
            None => break,
        }
    }
    let resume_from = last.unwrap();

    let gw = Gateway::start(&db).await;
    let mut b = gw.resume("acme", "", &resume_from.to_string()).await;
    writer.await.unwrap();
    let expected = bodies(&db, "acme").await;
    let mut last = Some(resume_from);
    received.extend(read_bodies(&mut b, expected.len() - received.len(), &mut last).await);
    assert_eq!(
        received, expected,
        "exactly once, in order, across the restart"
    );
    // `live` comes once the replay has caught up, which may be after the last change when
    // the writer finished during the replay; nothing else may follow.
    b.assert_quiet_but(Duration::from_millis(300), &["live"])
        .await;
    gw.stop().await;
}

#[tokio::test]
async fn stalled_subscriber_slows_nobody_and_is_caught_up() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    let gw = Gateway::start(&db).await;
    let mut stalled = gw.stream("acme", "").await;
    let mut reader = gw.stream("acme", "").await;
    reader.until_live().await;
    let rss_before = support::rss_kib();

    // 20 000 changes in 200 commits, while `stalled` reads nothing.
    let writer = write_in_background(
        db.url.clone(),
        200,
        "INSERT INTO orders (tenant, body)
         SELECT $1, $2 || '-' || g FROM generate_series(1, 100) AS g",
        |i| ("acme", format!("b{i:03}")),
    );
    let mut last = None;
    let got = read_bodies(&mut reader, 20_000, &mut last).await;
    writer.await.unwrap();
    let rss_after = support::rss_kib();
    // The gateway holds at most `server.live_buffer` changes per tenant, shared; the
    // stalled stream itself holds nothing. The bound is loose on purpose: it catches
    // buffering per event (20 000 frames), not allocator noise.
    let grown_mib = rss_after.saturating_sub(rss_before) / 1024;
    assert!(
        grown_mib < 96,
        "memory grew by {grown_mib} MiB with a stalled subscriber"
    );

    let expected = bodies(&db, "acme").await;
    assert_eq!(got.len(), expected.len());
    // The stalled subscriber now reads: everything, once, in order (from the journal).
    let mut last = None;
    let late = read_bodies(&mut stalled, 20_000, &mut last).await;
    assert_eq!(late, expected);
    stalled.assert_quiet(Duration::from_millis(300)).await;
    gw.stop().await;
}

#[tokio::test]
async fn resuming_from_a_pruned_position_gets_reset() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    let gw = Gateway::start_with(support::sources_with(&db, support::FAST_PRUNING)).await;
    let mut s = gw.stream("acme", "").await;
    s.until_live().await;
    write(&db, "acme", "old", 3).await;
    let first = s.next_change().await["position"]
        .as_str()
        .unwrap()
        .to_string();

    let c = db.client().await;
    eventually("the journal is pruned", || async {
        support::journal_len(&c).await == 0
    })
    .await;
    let mut r = gw.resume("acme", "", &first).await;
    assert_eq!(r.status, 200);
    let reset = r.next().await.unwrap();
    assert_eq!(reset.event, "reset", "{reset:?}");
    let head = reset.json()["position"].as_str().unwrap().to_string();
    assert_eq!(
        reset.id.as_deref(),
        Some(head.as_str()),
        "a reconnect continues from the reset position"
    );
    assert!(head.parse::<pgfeed::change::Position>().unwrap() > first.parse().unwrap());
    assert_eq!(r.next().await.unwrap().event, "live");
    write(&db, "acme", "new", 1).await;
    assert_eq!(r.next_change().await["new"]["body"], "new0");
    gw.stop().await;
}

#[tokio::test]
async fn streams_connected_while_the_listener_missed_pruned_changes_get_reset() {
    // The listener away for longer than the retention: here its seal (which precedes
    // every read) is held back by the sealers' lock while another session seals the
    // changes it has not read yet, and prunes them. Streams that stayed connected
    // throughout missed them, and each must be told so with `reset`, then follow live
    // again.
    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    let gw = Gateway::start(&db).await;
    let mut acme = gw.stream("acme", "").await;
    let mut globex = gw.stream("globex", "").await;
    acme.until_live().await;
    globex.until_live().await;
    write(&db, "acme", "before", 1).await;
    assert_eq!(acme.next_change().await["new"]["body"], "before0");

    let mut c = db.client().await;
    let tx = c.transaction().await.unwrap();
    // The listener seals before every read: its next read waits.
    tx.batch_execute("LOCK TABLE pgfeed.seal_lock IN EXCLUSIVE MODE")
        .await
        .unwrap();
    write(&db, "acme", "lost", 2).await;
    write(&db, "globex", "lost", 1).await;
    let probe = db.client().await;
    eventually("the listener's journal read waits for the lock", || async {
        probe
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            > 0
    })
    .await;
    // Sealed here, as another gateway would have, then pruned with a negative retention:
    // everything committed so far, whatever this transaction's now().
    let sealed: i32 = tx
        .query_one("SELECT pgfeed.seal()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(sealed, 3, "the three commits the listener has not read");
    let removed: i32 = tx
        .query_one("SELECT pgfeed.prune('-1 hour', 1000)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        removed, 4,
        "the one delivered commit and the three not yet read"
    );
    tx.commit().await.unwrap();

    for s in [&mut acme, &mut globex] {
        let reset = s.next().await.expect("stream open");
        assert_eq!(reset.event, "reset", "{reset:?}\n{}", s.raw);
        let head = reset.json()["position"].as_str().unwrap().to_string();
        assert_eq!(reset.id.as_deref(), Some(head.as_str()));
        assert_eq!(s.next().await.unwrap().event, "live");
    }
    // A stream opened after the gap, before anything new is published, starts after it.
    let mut late = gw.stream("acme", "").await;
    late.until_live().await;
    write(&db, "acme", "after", 1).await;
    write(&db, "globex", "after", 1).await;
    assert_eq!(acme.next_change().await["new"]["body"], "after0");
    assert_eq!(globex.next_change().await["new"]["body"], "after0");
    let e = late.next().await.expect("stream open");
    assert_eq!(e.event, "change", "{e:?}\n{}", late.raw);
    assert_eq!(e.json()["new"]["body"], "after0");
    for s in [&acme, &globex, &late] {
        assert!(
            !s.raw.contains("lost"),
            "a pruned change was delivered: {}",
            s.raw
        );
    }
    gw.stop().await;
}

#[tokio::test]
async fn unknown_positions_are_refused() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    let gw = Gateway::start(&db).await;
    let token = gw.token("acme");
    let r = support::get(
        gw.addr,
        &format!("/v1/stream?last_event_id=999999.1&access_token={token}"),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "unknown_position");
    gw.stop().await;
}

#[tokio::test]
async fn writes_commit_while_the_gateway_is_down_and_are_replayed() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    let gw = Gateway::start(&db).await;
    let token = gw.token("acme");
    let position = support::get(
        gw.addr,
        "/v1/position",
        &[("Authorization", &format!("Bearer {token}"))],
    )
    .await
    .unwrap()
    .json()["position"]
        .as_str()
        .unwrap()
        .to_string();
    let sources = support::sources(&db);
    gw.stop().await;

    write(&db, "acme", "offline", 500).await;

    let gw = Gateway::start_with(sources).await;
    let mut s = gw
        .stream("acme", &format!("last_event_id={position}"))
        .await;
    let replayed: Vec<String> = s
        .until_live()
        .await
        .iter()
        .map(|e| e["new"]["body"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(replayed, bodies(&db, "acme").await);
    gw.stop().await;
}

#[tokio::test]
async fn a_100k_row_statement_is_delivered_complete() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    let gw = Gateway::start(&db).await;
    let mut s = gw.stream("acme", "payload=keys").await;
    s.until_live().await;
    db.client()
        .await
        .execute(
            "INSERT INTO orders (tenant, body) SELECT 'acme', 'x' || g FROM generate_series(1, 100000) AS g",
            &[],
        )
        .await
        .unwrap();
    let mut last = None;
    let mut ids = Vec::with_capacity(100_000);
    while ids.len() < 100_000 {
        let e = s.next_change().await;
        let p = support::position(&e);
        assert!(last.is_none_or(|l| p > l));
        last = Some(p);
        ids.push(e["pk"]["id"].as_i64().unwrap());
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 100_000);
    s.assert_quiet(Duration::from_millis(300)).await;
    gw.stop().await;
}
