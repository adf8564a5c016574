//! Big changes: a 1 MB row and a 10 000-row statement are delivered complete (NOTIFY is
//! only a doorbell, so its 8000-byte limit never matters), and a statement rings the
//! doorbell once whatever the number of rows it changed.

use pgfeed_testkit as support;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};
use support::{Gateway, SOON, TestDb, position};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Notification};

/// Window in which "nothing else arrives" is checked.
const QUIET: Duration = Duration::from_millis(500);

fn body<'a>(change: &'a Value, image: &str) -> &'a str {
    change[image]["body"]
        .as_str()
        .unwrap_or_else(|| panic!("no {image}.body in {}", short(&change.to_string())))
}

/// The start of a long text, for failure messages.
fn short(text: &str) -> String {
    text.chars().take(200).collect()
}

/// A text of exactly `chars` characters that varies along its length (so a missing,
/// repeated or misplaced piece shows) and needs JSON escaping (quotes, backslashes,
/// newlines, non-ASCII).
fn big_text(chars: usize) -> String {
    let mut s = String::with_capacity(chars + chars / 4);
    let (mut count, mut i) = (0, 0usize);
    while count < chars {
        let piece = format!("<{i:07}\"\\\n\té>");
        count += piece.chars().count();
        s.push_str(&piece);
        i += 1;
    }
    s.chars().take(chars).collect()
}

/// A connection LISTENing on `pgfeed`; its notifications arrive on the receiver.
async fn doorbell_listener(
    db: &TestDb,
) -> (
    tokio_postgres::Client,
    mpsc::UnboundedReceiver<Notification>,
) {
    let (client, mut connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("LISTEN connection failed: {e}"),
            }
        }
    });
    client.batch_execute("LISTEN pgfeed").await.unwrap();
    (client, rx)
}

/// Waits for the doorbell of the statement just run, then checks it carries no row data.
async fn one_doorbell(rx: &mut mpsc::UnboundedReceiver<Notification>, row_marker: &str) {
    let n = tokio::time::timeout(SOON, rx.recv())
        .await
        .expect("a NOTIFY on pgfeed in time")
        .expect("the LISTEN connection is alive");
    assert_eq!(n.channel(), "pgfeed");
    assert!(
        n.payload().len() < 100 && !n.payload().contains(row_marker),
        "the doorbell names the commit, never row data: {:?}",
        short(n.payload())
    );
}

/// Checks that no further doorbell rings within [`QUIET`].
async fn no_more_doorbells(rx: &mut mpsc::UnboundedReceiver<Notification>) {
    match tokio::time::timeout(QUIET, rx.recv()).await {
        Err(_) => {}
        Ok(Some(n)) => panic!("a second NOTIFY for one statement: {:?}", n.payload()),
        Ok(None) => panic!("the LISTEN connection ended"),
    }
}

#[tokio::test]
async fn a_1_mb_row_is_delivered_complete() {
    const CHARS: usize = 1_048_576;
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let gw = Gateway::start(&db).await;
    let mut s = gw.stream("acme", "").await;
    let live = s.next().await.unwrap();
    assert_eq!(live.event, "live");
    let before = live.json()["position"].as_str().unwrap().to_string();
    let c = db.client().await;

    let text = big_text(CHARS);
    assert_eq!(text.chars().count(), CHARS);
    assert!(text.len() > CHARS, "the text has multi-byte characters");
    c.execute(
        "INSERT INTO notes (tenant, body) VALUES ('acme', $1)",
        &[&text],
    )
    .await
    .unwrap();
    let ins = s.next_change().await;
    assert_eq!(ins["op"], "insert");
    let got = body(&ins, "new");
    assert_eq!(got.chars().count(), CHARS);
    assert!(
        got == text,
        "the 1 MB body differs: starts {:?}",
        short(got)
    );

    // Updated: old and new images, 2 MB together, in one event.
    let edited = format!("edited {}", &text[..text.len() - 200]);
    c.execute("UPDATE notes SET body = $1", &[&edited])
        .await
        .unwrap();
    let upd = s.next_change().await;
    assert_eq!(upd["op"], "update");
    assert_eq!(upd["changed"], json!(["body"]));
    assert!(body(&upd, "old") == text, "old image differs");
    assert!(body(&upd, "new") == edited, "new image differs");
    assert!(position(&ins) < position(&upd));
    s.assert_quiet(QUIET).await;

    // Replayed from the journal, just as complete.
    let mut r = gw.resume("acme", "", &before).await;
    let replayed = r.until_live().await;
    assert_eq!(replayed.len(), 2);
    assert!(body(&replayed[0], "new") == text, "replayed insert differs");
    assert!(
        body(&replayed[1], "old") == text,
        "replayed old image differs"
    );
    assert!(
        body(&replayed[1], "new") == edited,
        "replayed new image differs"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_10000_row_statement_is_delivered_complete_after_one_doorbell() {
    const ROWS: usize = 10_000;
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let gw = Gateway::start(&db).await;
    let mut s = gw.stream("acme", "").await;
    s.until_live().await;
    let mut other = gw.stream("globex", "").await;
    other.until_live().await;
    let (_listening, mut doorbells) = doorbell_listener(&db).await;
    let c = db.client().await;

    let inserted = c
        .execute(
            "INSERT INTO notes (tenant, body)
             SELECT 'acme', 'row ' || g FROM generate_series(1, 10000) AS g",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(inserted, ROWS as u64);
    one_doorbell(&mut doorbells, "row ").await;

    let mut last = None;
    for i in 1..=ROWS {
        let change = s.next_change().await;
        assert_eq!(change["op"], "insert", "{change}");
        assert_eq!(change["tenant"], "acme");
        // In the order the statement inserted them: ids 1, 2, ... 10 000, once each.
        assert_eq!(
            change["pk"],
            json!({"id": i}),
            "change {i} of the statement"
        );
        assert_eq!(body(&change, "new"), format!("row {i}"));
        let p = position(&change);
        if let Some(prev) = last {
            assert!(prev < p, "positions strictly increase: {prev} then {p}");
        }
        last = Some(p);
    }
    s.assert_quiet(QUIET).await;
    other.assert_quiet(Duration::from_millis(50)).await;
    assert!(
        !other.raw.contains("row "),
        "another tenant got acme's rows"
    );
    // All 10 000 events are in: a second doorbell would have rung by now.
    no_more_doorbells(&mut doorbells).await;

    // One bulk UPDATE: 10 000 update events, each pairing a row's old and new image.
    let updated = c
        .execute(
            "UPDATE notes SET body = body || ' edited' WHERE tenant = 'acme'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(updated, ROWS as u64);
    one_doorbell(&mut doorbells, "row ").await;
    let mut ids = HashSet::new();
    let mut prev = last.unwrap();
    for _ in 0..ROWS {
        let change = s.next_change().await;
        assert_eq!(change["op"], "update", "{change}");
        assert_eq!(change["changed"], json!(["body"]), "{change}");
        let id = change["pk"]["id"].as_i64().unwrap();
        assert_eq!(change["new"]["id"], id, "{change}");
        assert_eq!(change["old"]["id"], id, "{change}");
        assert_eq!(body(&change, "old"), format!("row {id}"));
        assert_eq!(body(&change, "new"), format!("row {id} edited"));
        assert!(ids.insert(id), "row {id} updated twice");
        let p = position(&change);
        assert!(prev < p, "positions strictly increase: {prev} then {p}");
        prev = p;
    }
    assert_eq!(ids.len(), ROWS);
    assert!(ids.iter().all(|id| (1..=ROWS as i64).contains(id)));
    s.assert_quiet(QUIET).await;
    no_more_doorbells(&mut doorbells).await;
    gw.stop().await;
}
