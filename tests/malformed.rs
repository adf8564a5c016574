//! Journal rows this binary cannot decode (an op from a newer schema, text that is not
//! UTF-8 in a `SQL_ASCII` database) are skipped and counted, one by one: every other
//! change keeps flowing, live and in replays, and the gateway stays ready.

use pgfeed_testkit as support;

use support::{Gateway, Run, SseClient, TestDb};

/// The `body` of each change, in order.
fn bodies(changes: &[serde_json::Value]) -> Vec<String> {
    changes
        .iter()
        .map(|c| c["new"]["body"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// The next `n` changes of `s`, skipping control events.
async fn changes(s: &mut SseClient, n: usize) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    while out.len() < n {
        out.push(s.next_change().await);
    }
    out
}

/// Asserts the gateway is ready, never lost its listener, and skipped `skipped` rows.
async fn assert_healthy(gw: &Gateway, skipped: f64) {
    assert_eq!(
        support::get_soon(gw.addr, "/readyz", &[]).await.status,
        200,
        "/readyz"
    );
    let metrics = support::scrape(gw).await;
    assert_eq!(
        support::sample(&metrics, "pgfeed_malformed_changes_total"),
        Some(skipped),
        "{metrics}"
    );
    assert_eq!(
        support::sample(&metrics, "pgfeed_listener_reconnects_total"),
        Some(0.0),
        "the listener never failed: {metrics}"
    );
}

#[tokio::test]
async fn rows_with_an_unknown_op_are_skipped_and_everything_else_flows() {
    let db = TestDb::new().await;
    // Pages of two changes: one of them is made of skipped rows only, and another ends
    // with one, so the readers must move past rows they could not decode.
    let batches_of_two = [("PGFEED_JOURNAL_BATCH_SIZE", "2")];
    let (gw, mut s) = support::start_with_acme_stream(&db, "orders", &batches_of_two).await;

    let c = db.client().await;
    c.run("INSERT INTO orders (tenant, body) VALUES ('acme', 'first')")
        .await;
    let first = s.next_change().await;
    assert_eq!(first["new"]["body"], "first");
    // A committed transaction of four changes, three of which carry an op this binary
    // does not know, as a newer schema's capture could write during a rolling upgrade.
    c.run(
        "BEGIN;
         INSERT INTO orders (tenant, body)
             VALUES ('acme', 'b1'), ('acme', 'b2'), ('acme', 'b3'), ('acme', 'b4');
         UPDATE pgfeed.changes SET op = 'upsert'
             WHERE xid = pg_current_xact_id() AND new->>'body' <> 'b3';
         COMMIT;",
    )
    .await;
    c.run("INSERT INTO orders (tenant, body) VALUES ('acme', 'second')")
        .await;
    assert_eq!(bodies(&changes(&mut s, 2).await), ["b3", "second"]);
    assert_healthy(&gw, 3.0).await;

    // Resumes skip the same rows: from before everything, and from a position right
    // before a page of skipped rows only.
    let mut from_start = gw.resume("acme", "", "0.0").await;
    assert_eq!(
        bodies(&from_start.until_live().await),
        ["first", "b3", "second"]
    );
    let position = first["position"].as_str().unwrap();
    let mut from_first = gw.resume("acme", "", position).await;
    assert_eq!(bodies(&from_first.until_live().await), ["b3", "second"]);

    // Live delivery goes on, and the skipped rows were counted once each.
    c.run("INSERT INTO orders (tenant, body) VALUES ('acme', 'third')")
        .await;
    for stream in [&mut s, &mut from_start, &mut from_first] {
        assert_eq!(bodies(&changes(stream, 1).await), ["third"]);
    }
    assert_healthy(&gw, 3.0).await;
    gw.stop().await;
}

#[tokio::test]
async fn text_that_is_not_utf8_is_skipped_in_a_sql_ascii_database() {
    let db = TestDb::sql_ascii().await;
    let (gw, mut s) = support::start_with_acme_stream(&db, "notes", &[]).await;

    // SQL_ASCII stores byte 0xff as it is; the journal's row image then holds it too.
    let c = db.client().await;
    c.run(
        "INSERT INTO notes (tenant, body) VALUES ('acme', 'before');
         INSERT INTO notes (tenant, body) VALUES ('acme', E'caf\\377');
         INSERT INTO notes (tenant, body) VALUES (E'acm\\377', 'a tenant that is not UTF-8');
         INSERT INTO notes (tenant, body) VALUES ('acme', 'after');",
    )
    .await;
    assert_eq!(bodies(&changes(&mut s, 2).await), ["before", "after"]);
    assert_healthy(&gw, 2.0).await;

    let mut replay = gw.resume("acme", "", "0.0").await;
    assert_eq!(bodies(&replay.until_live().await), ["before", "after"]);

    c.run("INSERT INTO notes (tenant, body) VALUES ('acme', 'later')")
        .await;
    assert_eq!(bodies(&changes(&mut s, 1).await), ["later"]);
    assert_eq!(bodies(&changes(&mut replay, 1).await), ["later"]);
    assert_healthy(&gw, 2.0).await;
    gw.stop().await;
}
