//! The gateway under hostile load (issue 17): what many tenants, many resumes, unknown
//! names and slow readers may cost it, measured on a real gateway against a real
//! PostgreSQL.

mod support;

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
