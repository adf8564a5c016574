//! Order and resumption: positions follow commit order across concurrent transactions and
//! statement order inside one, a client that reconnects with `Last-Event-ID` (header or
//! query) gets exactly what it missed, fetch-then-subscribe has no gap, and a subscriber
//! that falls behind the live buffer is caught up from the journal.

use pgfeed_testkit as support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use pgfeed::change::Position;
use serde_json::Value;
use support::{Gateway, SseClient, TestDb, position};

/// Window in which "nothing else arrives" is checked.
const QUIET: Duration = Duration::from_millis(300);

fn assert_increasing(changes: &[Value]) {
    let positions: Vec<Position> = changes.iter().map(position).collect();
    for w in positions.windows(2) {
        assert!(
            w[0] < w[1],
            "positions must strictly increase: {positions:?}"
        );
    }
}

/// (op, body) of a change: `new.body`, or `old.body` for a delete.
fn summary(change: &Value) -> (String, String) {
    let op = change["op"].as_str().unwrap().to_string();
    let row = if op == "delete" {
        &change["old"]
    } else {
        &change["new"]
    };
    let body = row["body"]
        .as_str()
        .unwrap_or_else(|| panic!("no body: {change}"))
        .to_string();
    (op, body)
}

fn summaries(changes: &[Value]) -> Vec<(String, String)> {
    changes.iter().map(summary).collect()
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected
        .iter()
        .map(|(op, body)| (op.to_string(), body.to_string()))
        .collect()
}

async fn insert(c: &tokio_postgres::Client, tenant: &str, body: &str) {
    c.execute(
        "INSERT INTO notes (tenant, body) VALUES ($1, $2)",
        &[&tenant, &body],
    )
    .await
    .unwrap();
}

/// Reads the first event, which must be `live`, and returns its position.
async fn live_position(s: &mut SseClient) -> Position {
    let e = s.next().await.expect("stream ended before `live`");
    assert_eq!(e.event, "live", "first event: {e:?}");
    e.json()["position"]
        .as_str()
        .expect("live carries its position")
        .parse()
        .unwrap()
}

/// Opens the stream of `tenant` with `Last-Event-ID: last_event_id` and an optional query.
async fn resume(gw: &Gateway, tenant: &str, query: &str, last_event_id: &str) -> SseClient {
    let s = gw.resume(tenant, query, last_event_id).await;
    assert_eq!(s.status, 200, "resume with Last-Event-ID {last_event_id}");
    s
}

/// GET /v1/position as `tenant`.
async fn head(gw: &Gateway, tenant: &str) -> String {
    let auth = format!("Bearer {}", gw.token(tenant));
    let r = support::get(gw.addr, "/v1/position", &[("Authorization", &auth)])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let p = r.json()["position"]
        .as_str()
        .unwrap_or_else(|| panic!("no position: {}", r.body))
        .to_string();
    p.parse::<Position>()
        .unwrap_or_else(|e| panic!("head {p:?}: {e}"));
    p
}

#[tokio::test]
async fn interleaved_transactions_arrive_in_commit_order() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let gw = Gateway::start(&db).await;
    let mut s = gw.stream("acme", "").await;
    let before = live_position(&mut s).await;

    let mut ca = db.client().await;
    let mut cb = db.client().await;
    // A starts first and writes first, but commits last.
    let ta = ca.transaction().await.unwrap();
    ta.execute("INSERT INTO notes (tenant, body) VALUES ('acme', 'A')", &[])
        .await
        .unwrap();
    let tb = cb.transaction().await.unwrap();
    tb.execute("INSERT INTO notes (tenant, body) VALUES ('acme', 'B')", &[])
        .await
        .unwrap();
    tb.commit().await.unwrap();

    let b = s.next_change().await;
    assert_eq!(summary(&b), ("insert".into(), "B".into()));
    // A is still open: nothing of it may be visible.
    s.assert_quiet(QUIET).await;
    ta.commit().await.unwrap();
    let a = s.next_change().await;
    assert_eq!(summary(&a), ("insert".into(), "A".into()));
    // Start order really was A then B (A drew the smaller serial).
    assert!(
        a["new"]["id"].as_i64().unwrap() < b["new"]["id"].as_i64().unwrap(),
        "A: {a}, B: {b}"
    );
    assert!(before < position(&b), "before {before}, B {b}");
    assert!(
        position(&b) < position(&a),
        "B committed first: B {b}, A {a}"
    );
    s.assert_quiet(QUIET).await;

    // A client that saw B and reconnects must still get A (a position drawn in start
    // order would put A before B and lose it).
    let b_pos = b["position"].as_str().unwrap();
    let mut r = resume(&gw, "acme", "", b_pos).await;
    let replayed = r.until_live().await;
    assert_eq!(summaries(&replayed), pairs(&[("insert", "A")]));
    assert_eq!(replayed[0]["position"], a["position"]);

    // From before both: B then A, with the positions the live stream had.
    let mut r = resume(&gw, "acme", "", &before.to_string()).await;
    let replayed = r.until_live().await;
    assert_eq!(
        summaries(&replayed),
        pairs(&[("insert", "B"), ("insert", "A")])
    );
    assert_eq!(replayed[0]["position"], b["position"]);
    assert_eq!(replayed[1]["position"], a["position"]);
    gw.stop().await;
}

#[tokio::test]
async fn concurrent_writers_live_order_is_commit_order_and_matches_replay() {
    const WRITERS: usize = 6;
    const TXS: usize = 20;
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let gw = Gateway::start(&db).await;
    let mut s = gw.stream("acme", "").await;
    let before = live_position(&mut s).await;

    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let url = db.url.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = support::connect(&url).await;
            for t in 0..TXS {
                let tx = c.transaction().await.unwrap();
                for step in 0..2 {
                    let body = format!("w{w}-t{t}-s{step}");
                    tx.execute(
                        "INSERT INTO notes (tenant, body) VALUES ('acme', $1)",
                        &[&body],
                    )
                    .await
                    .unwrap();
                }
                tx.commit().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    let mut live = Vec::new();
    for _ in 0..WRITERS * TXS * 2 {
        live.push(s.next_change().await);
    }
    s.assert_quiet(QUIET).await;
    assert_increasing(&live);
    assert!(before < position(&live[0]));

    // Each transaction's two statements are adjacent (one commit), in statement order;
    // each writer's transactions arrive in the order it committed them.
    let mut next_t = HashMap::new();
    for pair in live.chunks(2) {
        let (_, first) = summary(&pair[0]);
        let (_, second) = summary(&pair[1]);
        let (w, rest) = first.split_once("-t").unwrap();
        let (t, step) = rest.split_once("-s").unwrap();
        assert_eq!(
            step, "0",
            "a transaction starts with its first statement: {first}"
        );
        assert_eq!(second, format!("{w}-t{t}-s1"), "then its second: {pair:?}");
        assert_eq!(
            position(&pair[0]).commit,
            position(&pair[1]).commit,
            "one transaction, one commit: {pair:?}"
        );
        let expected = next_t.entry(w.to_string()).or_insert(0usize);
        assert_eq!(
            t.parse::<usize>().unwrap(),
            *expected,
            "writer {w} out of order"
        );
        *expected += 1;
    }
    assert_eq!(next_t.len(), WRITERS);

    // The journal replays the same changes in the same order with the same positions.
    let mut r = resume(&gw, "acme", "", &before.to_string()).await;
    let replayed = r.until_live().await;
    let key = |c: &Value| (c["position"].clone(), summary(c));
    assert_eq!(
        replayed.iter().map(key).collect::<Vec<_>>(),
        live.iter().map(key).collect::<Vec<_>>()
    );
    gw.stop().await;
}

#[tokio::test]
async fn statements_of_one_transaction_arrive_in_statement_order() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    support::tenant_table(&db, "tasks").await;
    let gw = Gateway::start(&db).await;
    let mut s = gw.stream("acme", "").await;
    let before = live_position(&mut s).await;

    let mut c = db.client().await;
    let tx = c.transaction().await.unwrap();
    tx.batch_execute(
        "INSERT INTO notes (tenant, body) VALUES ('acme', 'one');
         INSERT INTO tasks (tenant, body) VALUES ('acme', 'task');
         INSERT INTO notes (tenant, body) VALUES ('acme', 'two'), ('acme', 'three');
         INSERT INTO notes (tenant, body) VALUES ('globex', 'not yours');
         UPDATE notes SET body = 'one edited' WHERE body = 'one';
         UPDATE tasks SET body = 'task edited';
         DELETE FROM notes WHERE body = 'two';
         INSERT INTO notes (tenant, body) VALUES ('acme', 'last');",
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let expected = pairs(&[
        ("insert", "one"),
        ("insert", "task"),
        ("insert", "two"),
        ("insert", "three"),
        ("update", "one edited"),
        ("update", "task edited"),
        ("delete", "two"),
        ("insert", "last"),
    ]);
    let mut live = Vec::new();
    for _ in 0..expected.len() {
        live.push(s.next_change().await);
    }
    s.assert_quiet(QUIET).await;
    assert_eq!(summaries(&live), expected);
    let tables: Vec<&str> = live.iter().map(|c| c["table"].as_str().unwrap()).collect();
    assert_eq!(
        tables,
        [
            "public.notes",
            "public.tasks",
            "public.notes",
            "public.notes",
            "public.notes",
            "public.tasks",
            "public.notes",
            "public.notes"
        ]
    );
    assert_increasing(&live);
    assert!(before < position(&live[0]));
    assert!(!s.raw.contains("not yours"));

    // Replay gives the same order.
    let mut r = resume(&gw, "acme", "", &before.to_string()).await;
    let replayed = r.until_live().await;
    assert_eq!(summaries(&replayed), expected);
    assert_eq!(
        replayed
            .iter()
            .map(|c| c["position"].clone())
            .collect::<Vec<_>>(),
        live.iter()
            .map(|c| c["position"].clone())
            .collect::<Vec<_>>()
    );

    // A client that got only part of the transaction resumes inside it.
    let mid = live[2]["position"].as_str().unwrap();
    let mut r = resume(&gw, "acme", "", mid).await;
    let replayed = r.until_live().await;
    assert_eq!(summaries(&replayed), expected[3..]);
    assert_eq!(position(&replayed[0]), position(&live[3]));
    gw.stop().await;
}

/// A gateway and a subscriber that read some changes, went away, and missed more.
struct Missed {
    db: TestDb,
    gw: Gateway,
    /// Position of the first change the subscriber read.
    first: String,
    /// The last id it saw.
    last: String,
}

/// What acme committed while the subscriber of [`Missed`] was away, in commit order.
const MISSED: &[(&str, &str)] = &[
    ("insert", "a4"),
    ("insert", "a5"),
    ("update", "a1 edited"),
    ("delete", "a2"),
];

async fn subscriber_that_missed_changes() -> Missed {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let gw = Gateway::start(&db).await;
    let c = db.client().await;

    let mut s = gw.stream("acme", "").await;
    s.until_live().await;
    insert(&c, "acme", "a1").await;
    insert(&c, "globex", "g1").await;
    insert(&c, "acme", "a2").await;
    insert(&c, "acme", "a3").await;
    let seen: Vec<Value> = [
        s.next_change().await,
        s.next_change().await,
        s.next_change().await,
    ]
    .into();
    assert_eq!(
        summaries(&seen),
        pairs(&[("insert", "a1"), ("insert", "a2"), ("insert", "a3")])
    );
    let first = seen[0]["position"].as_str().unwrap().to_string();
    let last = s
        .raw
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("id: "))
        .expect("an id was seen")
        .to_string();
    assert_eq!(last, seen[2]["position"].as_str().unwrap());
    drop(s);

    // While it is away: its tenant's changes, other tenants' changes, and a transaction
    // that mixes both.
    insert(&c, "acme", "a4").await;
    insert(&c, "globex", "g2").await;
    c.batch_execute(
        "BEGIN;
         INSERT INTO notes (tenant, body) VALUES ('acme', 'a5');
         INSERT INTO notes (tenant, body) VALUES ('globex', 'g3');
         UPDATE notes SET body = 'a1 edited' WHERE body = 'a1';
         COMMIT;",
    )
    .await
    .unwrap();
    c.batch_execute("DELETE FROM notes WHERE body = 'a2'")
        .await
        .unwrap();
    Missed {
        db,
        gw,
        first,
        last,
    }
}

/// The resumed stream `r` gets exactly [`MISSED`], then `live`, then live changes.
async fn assert_resumed(m: Missed, mut r: SseClient) {
    let replayed = r.until_live().await;
    assert_eq!(
        summaries(&replayed),
        pairs(MISSED),
        "replayed: {replayed:?}"
    );
    assert_increasing(&replayed);
    let last: Position = m.last.parse().unwrap();
    assert!(last < position(&replayed[0]));
    for c in &replayed {
        assert_eq!(c["tenant"], "acme", "{c}");
    }
    assert!(
        !r.raw.contains("globex"),
        "another tenant's change: {}",
        r.raw
    );

    let c = m.db.client().await;
    insert(&c, "globex", "g4").await;
    insert(&c, "acme", "after live").await;
    let after = r.next_change().await;
    assert_eq!(summary(&after), ("insert".into(), "after live".into()));
    assert!(position(&replayed[replayed.len() - 1]) < position(&after));
    r.assert_quiet(QUIET).await;
    m.gw.stop().await;
}

#[tokio::test]
async fn resume_with_last_event_id_header_gets_exactly_what_was_missed() {
    let m = subscriber_that_missed_changes().await;
    let r = resume(&m.gw, "acme", "", &m.last).await;
    assert_resumed(m, r).await;
}

#[tokio::test]
async fn resume_with_last_event_id_query_parameter() {
    let m = subscriber_that_missed_changes().await;
    let r =
        m.gw.stream("acme", &format!("last_event_id={}", m.last))
            .await;
    assert_eq!(r.status, 200);
    assert_resumed(m, r).await;
}

#[tokio::test]
async fn last_event_id_header_wins_over_the_query_parameter() {
    // EventSource reconnects with its original URL (where it started) and the header
    // (where it got to): the header is the newer and must win.
    let m = subscriber_that_missed_changes().await;
    let r = resume(
        &m.gw,
        "acme",
        &format!("last_event_id={}", m.first),
        &m.last,
    )
    .await;
    assert_resumed(m, r).await;
}

#[tokio::test]
async fn fetch_then_subscribe_from_the_head_has_no_gap_and_no_duplicate() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let gw = Gateway::start(&db).await;
    let c = db.client().await;

    // Nothing committed yet: the head is still a valid place to start.
    let empty = head(&gw, "acme").await;
    let mut s = gw.stream("acme", &format!("last_event_id={empty}")).await;
    assert_eq!(s.status, 200);
    assert!(s.until_live().await.is_empty());

    insert(&c, "acme", "old 1").await;
    insert(&c, "acme", "old 2").await;
    assert_eq!(summary(&s.next_change().await).1, "old 1");
    let newest = s.next_change().await;
    assert_eq!(summary(&newest).1, "old 2");
    assert_eq!(
        head(&gw, "acme").await,
        newest["position"].as_str().unwrap()
    );

    // The head covers every commit, other tenants' too.
    insert(&c, "globex", "other").await;
    let h = head(&gw, "acme").await;
    assert!(
        position(&newest) < h.parse().unwrap(),
        "head {h} after {newest}"
    );

    // Subscribing from the head replays nothing and is live at once.
    let mut fresh = gw.stream("acme", &format!("last_event_id={h}")).await;
    assert_eq!(fresh.status, 200);
    let first = fresh.next().await.unwrap();
    assert_eq!(first.event, "live", "nothing to replay: {first:?}");
    assert_eq!(first.json()["position"].as_str(), Some(h.as_str()));
    insert(&c, "acme", "new 1").await;
    assert_eq!(summary(&fresh.next_change().await).1, "new 1");
    fresh.assert_quiet(QUIET).await;

    // A change committed between fetching the head and subscribing is not lost.
    let h = head(&gw, "acme").await;
    insert(&c, "acme", "in the gap").await;
    let mut late = resume(&gw, "acme", "", &h).await;
    let replayed = late.until_live().await;
    assert_eq!(summaries(&replayed), pairs(&[("insert", "in the gap")]));
    insert(&c, "acme", "new 2").await;
    assert_eq!(summary(&late.next_change().await).1, "new 2");
    late.assert_quiet(QUIET).await;
    gw.stop().await;
}

/// Counts the gateway's log events whose message mentions lagging. Installed as the
/// thread's default subscriber: with `#[tokio::test]`'s current-thread runtime the
/// gateway's tasks run on the test's thread, so only this test's gateway is counted.
struct LagCounter(Arc<AtomicUsize>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LagCounter {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let mut m = Message(String::new());
        event.record(&mut m);
        if m.0.contains("lagged") {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[tokio::test]
async fn lagged_subscriber_is_caught_up_from_the_journal() {
    // No recent changes kept in memory: every catch-up reads the journal.
    lagged_subscriber_is_caught_up(0, "catchup").await;
}

#[tokio::test]
async fn lagged_subscriber_is_caught_up_from_memory() {
    // Room for all of them in memory: no catch-up needs a query.
    lagged_subscriber_is_caught_up(1 << 30, "memory").await;
}

/// A subscriber that stops reading while 500 large changes commit lags behind its live
/// buffer, is caught up from where `replay_memory` says (`expect` "catchup": the journal,
/// "memory": the hub), and receives everything exactly once, in order.
async fn lagged_subscriber_is_caught_up(replay_memory: usize, expect: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    const N: usize = 500;
    // Big enough that the 500 changes cannot all wait in the socket buffers, so the
    // subscriber's live receiver (4 changes) must overflow while it does not read.
    const FILLER: usize = 64 * 1024;

    let lags = Arc::new(AtomicUsize::new(0));
    let _log = tracing::subscriber::set_default(
        tracing_subscriber::registry().with(LagCounter(Arc::clone(&lags))),
    );

    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let mut sources = support::sources(&db);
    sources
        .env
        .push(("PGFEED_SERVER_LIVE_BUFFER".into(), "4".into()));
    sources
        .env
        .push(("PGFEED_JOURNAL_BATCH_SIZE".into(), "7".into()));
    sources.env.push((
        "PGFEED_SERVER_REPLAY_MEMORY".into(),
        replay_memory.to_string(),
    ));
    let gw = Gateway::start_with(sources).await;
    assert_eq!(gw.config.server.live_buffer, 4);
    assert_eq!(gw.config.server.replay_memory, replay_memory);
    assert_eq!(gw.config.journal.batch_size, 7);

    let mut s = gw.stream("acme", "").await;
    s.until_live().await;

    // Not read while these commit, one transaction each, other tenants' among them.
    let c = db.client().await;
    let filler = "x".repeat(FILLER);
    for i in 0..N {
        let body = format!("n{i:04} {filler}");
        insert(&c, "acme", &body).await;
        if i % 3 == 0 {
            insert(&c, "globex", &format!("globex {i}")).await;
        }
    }

    let mut seen = Vec::with_capacity(N);
    for i in 0..N {
        let change = s.next_change().await;
        let (op, body) = summary(&change);
        assert_eq!(op, "insert");
        assert_eq!(change["tenant"], "acme", "{}", &body[..body.len().min(40)]);
        assert_eq!(
            &body[..5],
            format!("n{i:04}"),
            "change {i} out of order or missing"
        );
        assert_eq!(body.len(), 6 + FILLER, "change {i} is complete");
        seen.push(position(&change));
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "positions strictly increase"
    );
    // Nothing twice, nothing of globex.
    s.assert_quiet(QUIET).await;
    assert!(!s.raw.contains("globex"));
    assert!(
        lags.load(Ordering::Relaxed) > 0,
        "the scenario must make the subscriber lag (no `lagged` log event was seen); \
         with a larger socket buffer, raise FILLER"
    );

    // The catch-ups came from where they should: journal reads of kind "catchup" only
    // when memory is off.
    let metrics = support::scrape(&gw).await;
    let catchups = support::sample(&metrics, "pgfeed_catchups_total").unwrap_or(0.0);
    let journal =
        support::sample(&metrics, "pgfeed_journal_reads_total{kind=\"catchup\"}").unwrap_or(0.0);
    assert!(catchups > 0.0, "no catch-up was counted:\n{metrics}");
    match expect {
        "catchup" => assert!(
            journal >= catchups,
            "{journal} journal reads for {catchups} catch-ups"
        ),
        _ => assert_eq!(
            journal, 0.0,
            "catch-ups read the journal although memory held the changes"
        ),
    }

    // And it is live again afterwards.
    insert(&c, "acme", "after catch-up").await;
    assert_eq!(summary(&s.next_change().await).1, "after catch-up");
    gw.stop().await;
}

/// What an `EventSource` sends as `Last-Event-ID` when it reconnects: the value of the last
/// `id:` field it received, or nothing if it never received one.
fn event_source_last_id(s: &SseClient) -> Option<String> {
    s.raw
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("id: "))
        .map(str::to_string)
}

#[tokio::test]
async fn an_event_source_that_saw_only_live_misses_nothing_when_it_reconnects() {
    // A dashboard on a quiet tenant: connected, got `live`, no change yet; the network
    // drops, a change commits, EventSource reconnects by itself. It can only send the id
    // the stream gave it; if `live` carried none, the change is lost without a trace.
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let gw = Gateway::start(&db).await;
    let c = db.client().await;
    // Committed, and published live (seen by another client), before it connects.
    let mut other = gw.stream("acme", "").await;
    other.until_live().await;
    insert(&c, "acme", "before it connected").await;
    assert_eq!(summary(&other.next_change().await).1, "before it connected");

    let mut s = gw.stream("acme", "").await;
    assert!(s.until_live().await.is_empty());
    let last_id = event_source_last_id(&s);
    drop(s);
    insert(&c, "acme", "while it was away").await;

    let auth = format!("Bearer {}", gw.token("acme"));
    let mut headers = vec![("Authorization", auth.as_str())];
    if let Some(id) = &last_id {
        headers.push(("Last-Event-ID", id.as_str()));
    }
    let mut r = SseClient::open(gw.addr, "/v1/stream", &headers).await;
    assert_eq!(r.status, 200);
    let replayed = r.until_live().await;
    assert_eq!(
        summaries(&replayed),
        pairs(&[("insert", "while it was away")]),
        "EventSource reconnected with Last-Event-ID {last_id:?} (the last `id:` it was sent) \
         and lost the change committed while it was away"
    );
    gw.stop().await;
}
