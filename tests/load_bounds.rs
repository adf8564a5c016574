//! The gateway under hostile load (issue 17): what many tenants, many resumes, unknown
//! names and slow readers may cost it, measured on a real gateway against a real
//! PostgreSQL.

use pgfeed_testkit as support;

use std::time::Duration;

use support::{Gateway, Run, SseClient, TestDb, eventually, sample, scrape, tenant_table};

/// The value of `name` on the gateway's `/metrics` page.
async fn metric(gw: &Gateway, name: &str) -> Option<f64> {
    sample(&scrape(gw).await, name)
}

/// Reads `s` up to its `live` event and returns that event's position.
async fn live_position(s: &mut SseClient) -> String {
    assert_eq!(s.status, 200, "{}", s.raw);
    loop {
        let e = s.next().await.expect("stream ended before `live`");
        if e.event == "live" {
            return e.json()["position"].as_str().unwrap().to_string();
        }
        assert_eq!(e.event, "change", "unexpected {e:?}");
    }
}

/// Item 4: tenants come and go by the thousand (each stream of a new tenant made a channel
/// that stayed for good); their channels must go with their last stream, and a tenant that
/// comes back must miss nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_channel_is_freed_with_its_last_stream() {
    let db = TestDb::new().await;
    tenant_table(&db, "items").await;
    let gw = Gateway::start(&db).await;
    let writer = db.client().await;

    // Tenant "back" reads up to live and leaves, noting where it was.
    let mut back = gw.stream("back", "").await;
    let left_at = live_position(&mut back).await;
    drop(back);

    // 600 tenants in waves of 100 open two streams each, then all close.
    for wave in 0..6 {
        let mut open = Vec::new();
        for t in 0..100 {
            let tenant = format!("t{wave}_{t}");
            for _ in 0..2 {
                let mut s = gw.stream(&tenant, "").await;
                live_position(&mut s).await;
                open.push(s);
            }
        }
        assert_eq!(
            metric(&gw, "pgfeed_tenant_channels").await,
            Some(100.0),
            "one channel per tenant with open streams"
        );
        drop(open);
    }
    eventually(
        "every channel is freed once every stream closed",
        || async {
            let page = scrape(&gw).await;
            sample(&page, "pgfeed_subscribers") == Some(0.0)
                && sample(&page, "pgfeed_tenant_channels") == Some(0.0)
        },
    )
    .await;

    // While nobody of "back" listens, a change of its is committed; it resumes and gets it.
    writer
        .run("INSERT INTO items (tenant, body) VALUES ('back', 'while away')")
        .await;
    let mut resumed = gw.resume("back", "", &left_at).await;
    let missed = resumed.until_live().await;
    assert_eq!(missed.len(), 1, "{missed:?}");
    assert_eq!(missed[0]["new"]["body"], "while away");
    // And live changes reach it through its new channel.
    writer
        .run("INSERT INTO items (tenant, body) VALUES ('back', 'live again'), ('t0_0', 'other')")
        .await;
    let change = resumed.next_change().await;
    assert_eq!(change["new"]["body"], "live again");
    assert_eq!(metric(&gw, "pgfeed_tenant_channels").await, Some(1.0));
    resumed.assert_quiet(Duration::from_millis(300)).await;
    gw.stop().await;
}

/// Keeps committing changes to `busy` (tenant "writer") until the returned sender is
/// dropped: the listener then reads back to back and handles doorbells only between its
/// slices of reading, as on a busy database.
fn keep_writing(db: &TestDb) -> tokio::sync::oneshot::Sender<()> {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let url = db.url.clone();
    tokio::spawn(async move {
        let c = support::connect(&url).await;
        while stopped.try_recv().is_err() {
            c.run("INSERT INTO busy (tenant, body) VALUES ('writer', 'x')")
                .await;
        }
    });
    stop
}

/// Item 12: a table watched a moment ago, or a column added a moment ago, is known to the
/// very next request (the catalog reloads once before refusing); names that do not exist
/// are still refused, with the error naming them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_watched_or_a_column_added_a_moment_ago_is_known_at_once() {
    let db = TestDb::new().await;
    tenant_table(&db, "busy").await;
    let gw = Gateway::start(&db).await;
    let admin = db.client().await;
    let writing = keep_writing(&db);

    for i in 0..10 {
        admin
            .run(&format!(
                "CREATE TABLE fresh{i} (id serial PRIMARY KEY, tenant text NOT NULL, body text);
                 SELECT pgfeed.watch('fresh{i}', 'tenant')"
            ))
            .await;
        let mut s = gw.stream("acme", &format!("tables=fresh{i}")).await;
        assert_eq!(
            s.status, 200,
            "fresh{i} was watched before the request: {}",
            s.raw
        );
        assert!(s.until_live().await.is_empty());
        admin
            .run(&format!(
                "INSERT INTO fresh{i} (tenant, body) VALUES ('acme', 'first')"
            ))
            .await;
        assert_eq!(s.next_change().await["new"]["body"], "first");

        admin
            .run(&format!("ALTER TABLE fresh{i} ADD COLUMN colour{i} text"))
            .await;
        let mut s = gw
            .stream("acme", &format!("filter=fresh{i}:colour{i}=eq.red"))
            .await;
        assert_eq!(
            s.status, 200,
            "colour{i} was added before the request: {}",
            s.raw
        );
        assert!(s.until_live().await.is_empty());
        admin
            .run(&format!(
                "INSERT INTO fresh{i} (tenant, body, colour{i}) VALUES ('acme', 'blue', 'blue'), ('acme', 'red', 'red')"
            ))
            .await;
        assert_eq!(s.next_change().await["new"]["body"], "red");
    }
    drop(writing);

    // What does not exist is still refused after the reload, naming it.
    let r = support::get_soon(
        gw.addr,
        "/v1/stream?tables=never_watched",
        &[("Authorization", &format!("Bearer {}", gw.token("acme")))],
    )
    .await;
    let (code, message) = support::assert_error(&r, 400, "unknown table");
    assert_eq!(code, "bad_request");
    assert!(message.contains("public.never_watched"), "{message}");
    let r = support::get_soon(
        gw.addr,
        "/v1/stream?filter=fresh0:nope=eq.1",
        &[("Authorization", &format!("Bearer {}", gw.token("acme")))],
    )
    .await;
    let (_, message) = support::assert_error(&r, 400, "unknown column");
    assert!(message.contains("nope"), "{message}");
    gw.stop().await;
}

/// The `Authorization` header of `tenant` on `gw`.
fn bearer(gw: &Gateway, tenant: &str) -> String {
    format!("Bearer {}", gw.token(tenant))
}

/// What [`storm`] leaves running.
struct Storm {
    gw: Gateway,
    proxy: support::FreezingProxy,
    writer: tokio_postgres::Client,
    /// Tenant "calm", live.
    calm: SseClient,
    /// Tenant "storm"'s resumes, whose reads hang.
    _resumes: Vec<SseClient>,
    _db: TestDb,
}

/// A gateway with `pool` pooled connections and `journal.replay_concurrency` =
/// `concurrency`, tenant "calm" live, then `resumes` resumes of tenant "storm" whose
/// journal reads hang (their connections frozen in mid-query, as reads that would scan for
/// ever), once as many as may run at once hang.
async fn storm(pool: &str, concurrency: &str, resumes: usize) -> Storm {
    let db = TestDb::new().await;
    tenant_table(&db, "items").await;
    let writer = db.client().await;
    writer
        .run("INSERT INTO items (tenant, body) VALUES ('storm', 'old')")
        .await;
    let proxy = support::FreezingProxy::start(&db.url, b"pgfeed tenant read").await;
    let url = proxy.url(&db.url);
    let gw = Gateway::start_with(support::sources_with(
        &db,
        &[
            ("PGFEED_DATABASE_URL", &url),
            ("PGFEED_DATABASE_POOL_SIZE", pool),
            ("PGFEED_JOURNAL_REPLAY_CONCURRENCY", concurrency),
            ("PGFEED_DATABASE_QUERY_TIMEOUT", "5m"),
        ],
    ))
    .await;
    let calm = gw.live("calm").await;
    proxy.arm();
    let resumes: Vec<SseClient> = {
        let mut open = Vec::new();
        for _ in 0..resumes {
            let s = gw.resume("storm", "", "0.0").await;
            assert_eq!(s.status, 200, "{}", s.raw);
            open.push(s);
        }
        open
    };
    let running: usize = concurrency.parse().unwrap();
    eventually("the storm's reads hang", || async {
        proxy.frozen() >= running
    })
    .await;
    Storm {
        gw,
        proxy,
        writer,
        calm,
        _resumes: resumes,
        _db: db,
    }
}

/// Item 6: resumes whose reads hang hold every pooled connection; another
/// tenant's live change still arrives, read by the listener on its own connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_resumes_that_takes_the_whole_pool_does_not_stop_the_listener() {
    let mut s = storm("2", "2", 2).await;
    s.writer
        .run("INSERT INTO items (tenant, body) VALUES ('calm', 'live')")
        .await;
    assert_eq!(s.calm.next_change().await["new"]["body"], "live");
    assert_eq!(s.proxy.frozen(), 2, "the storm holds the whole pool");
    s.gw.stop().await;
}

/// Item 6: subscribers' reads run at most `journal.replay_concurrency` at once, so a storm
/// of resumes whose reads hang leaves the rest of the pool to `/v1/position` and others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_resumes_leaves_pooled_connections_to_the_rest() {
    let mut s = storm("4", "2", 12).await;
    for _ in 0..5 {
        let r = support::get_soon(
            s.gw.addr,
            "/v1/position",
            &[("Authorization", &bearer(&s.gw, "calm"))],
        )
        .await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    s.writer
        .run("INSERT INTO items (tenant, body) VALUES ('calm', 'live')")
        .await;
    assert_eq!(s.calm.next_change().await["new"]["body"], "live");
    assert_eq!(
        s.proxy.frozen(),
        2,
        "no more subscriber reads at once than journal.replay_concurrency"
    );
    s.gw.stop().await;
}

/// Item 6: pooled connections carry the query timeout as a server-side
/// `statement_timeout`: a read the gateway gave up on does not go on waiting (for a lock,
/// here) on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_given_up_on_stops_on_the_server_too() {
    let db = TestDb::new().await;
    let gw = Gateway::start_with(support::sources_with(
        &db,
        &[("PGFEED_DATABASE_QUERY_TIMEOUT", "1s")],
    ))
    .await;
    let locker = db.client().await;
    locker
        .run("BEGIN; LOCK TABLE pgfeed.pruned IN ACCESS EXCLUSIVE MODE")
        .await;
    let r = support::get_soon(
        gw.addr,
        "/v1/position",
        &[("Authorization", &bearer(&gw, "acme"))],
    )
    .await;
    let (code, _) = support::assert_error(&r, 503, "position behind a lock");
    assert_eq!(code, "unavailable");
    let admin = db.client().await;
    eventually(
        "no pooled session of the gateway still waits for the lock",
        || async {
            let waiting: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = 'pgfeed'
                   AND wait_event_type = 'Lock'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            waiting == 0
        },
    )
    .await;
    locker.run("ROLLBACK").await;
    gw.stop().await;
}

/// The heap tuples read from `pgfeed.changes` so far (sequential and through indexes), as
/// the statistics have them.
async fn changes_tuples_read(c: &tokio_postgres::Client) -> i64 {
    c.query_one(
        "SELECT (coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0))::bigint
         FROM pg_stat_user_tables WHERE relid = 'pgfeed.changes'::regclass",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Item 6: a quiet tenant resuming from the start reads its own change, not the 20 000
/// of 200 other tenants committed after its position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_tenants_resume_does_not_scan_other_tenants_changes() {
    let db = TestDb::new().await;
    tenant_table(&db, "items").await;
    let writer = db.client().await;
    for _ in 0..4 {
        writer
            .run(
                "INSERT INTO items (tenant, body)
                 SELECT 'loud' || (i % 200), 'x' FROM generate_series(1, 5000) AS i",
            )
            .await;
    }
    writer
        .run("INSERT INTO items (tenant, body) VALUES ('quiet', 'mine')")
        .await;
    let gw = Gateway::start(&db).await;
    let admin = support::connect(&support::server().url("postgres")).await;
    let stats = db.client().await;
    let gone = || async {
        admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = $1 AND application_name LIKE 'pgfeed%'",
                &[&db.name],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 0
    };
    let before = changes_tuples_read(&stats).await;
    for _ in 0..10 {
        let mut s = gw.resume("quiet", "", "0.0").await;
        let replayed = s.until_live().await;
        assert_eq!(replayed.len(), 1, "{replayed:?}");
        assert_eq!(replayed[0]["new"]["body"], "mine");
    }
    // The gateway's sessions report their statistics when they end.
    gw.stop().await;
    eventually("the gateway's sessions ended", gone).await;
    stats.run("SELECT pg_stat_clear_snapshot()").await;
    let read = changes_tuples_read(&stats).await - before;
    assert!(
        read < 2_000,
        "ten resumes of a tenant with one change read {read} journal rows"
    );
}

/// Item 2: streams that resume from the start over large rows and then never read (a
/// small receive buffer, nothing read after the response head) hold what one journal read
/// and one chunk take, not the whole journal: the gateway's resident memory stays under
/// a budget far below what they asked for; and a stalled stream that reads again gets
/// everything, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_over_large_rows_hold_bounded_memory() {
    const ROWS: usize = 60;
    const STALLED: usize = 10;
    /// The gateway's whole resident set may not pass this: each stalled stream may hold
    /// one read (`journal::STREAM_READ_BYTES`, 1 MiB, plus the row that passed it) and one
    /// chunk (here one 1 MB frame), about 4 MiB; the rest is the process itself. Their
    /// requests ask for 10 x 60 MB.
    const BUDGET_KIB: u64 = 96 * 1024;
    let db = TestDb::new().await;
    tenant_table(&db, "items").await;
    db.client()
        .await
        .run(&format!(
            "INSERT INTO items (tenant, body)
             SELECT 'big', i || repeat('x', 1000000) FROM generate_series(1, {ROWS}) AS i"
        ))
        .await;
    let gw = support::ChildGateway::start(&db, &[]).await;
    let auth = format!("Bearer {}", support::hs256_token("big"));
    let headers = [("Authorization", auth.as_str()), ("Last-Event-ID", "0.0")];
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        let s = SseClient::open_stalled(gw.addr, "/v1/stream", &headers, 4096).await;
        assert_eq!(s.status, 200);
        stalled.push(s);
    }
    // Their replays run until their sockets are full, then wait: watch the gateway's
    // memory meanwhile, until the bytes it has written stop growing.
    let mut peak = 0;
    let mut written = -1.0;
    for _ in 0..100 {
        for _ in 0..10 {
            peak = peak.max(support::rss_kib_of(gw.pid()));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let now = gw.metric("pgfeed_bytes_written_total").await.unwrap_or(0.0);
        if now == written {
            break;
        }
        written = now;
    }
    eprintln!("peak RSS {peak} KiB, {written} bytes written");
    assert!(
        peak < BUDGET_KIB,
        "{STALLED} stalled streams over {ROWS} rows of 1 MB: the gateway's RSS peaked at {peak} KiB (budget {BUDGET_KIB} KiB)"
    );
    assert!(
        written < (STALLED * ROWS * 1_000_000 / 2) as f64,
        "the readers stalled: {written} bytes written"
    );
    // One of them reads again: every change, in order, then live.
    let mut back = stalled.pop().unwrap();
    drop(stalled);
    let replayed = back.until_live().await;
    let bodies: Vec<String> = replayed
        .iter()
        .map(|c| {
            c["new"]["body"].as_str().unwrap()[..3]
                .trim_end_matches('x')
                .to_string()
        })
        .collect();
    let expected: Vec<String> = (1..=ROWS).map(|i| i.to_string()).collect();
    assert_eq!(bodies, expected);
}
