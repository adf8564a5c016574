//! Commit order under concurrency (issue 16, SPEC section 1 and 4): many writers with
//! conflicting updates of one row, savepoints and whole transactions rolled back,
//! SERIALIZABLE transactions failing at commit and pauses inside transactions. Every change
//! whose COMMIT returned Ok arrives exactly once, in the order SPEC section 1 defines, the
//! same on two gateways, and a resumed stream replays exactly the suffix. `/v1/position`,
//! asked all along, covers what committed before it was asked and nothing begun after it
//! answered; and capture adds no serialization failure of its own to SERIALIZABLE commits.

use pgfeed_testkit as support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgfeed::change::Position;
use serde_json::Value;
use support::{Gateway, SseClient, TestDb, position};
use tokio::sync::{Barrier, watch};
use tokio_postgres::{IsolationLevel, Transaction};

/// How long the writers write.
const WRITING: Duration = Duration::from_secs(3);
/// Writers running random transaction scripts (besides the two SERIALIZABLE ones).
const WRITERS: usize = 8;
/// Window in which "nothing more arrives" is checked.
const QUIET: Duration = Duration::from_millis(300);

/// One statement of a transaction script.
#[derive(Debug, Clone)]
enum Step {
    /// `INSERT INTO events`: a new row.
    Insert,
    /// `UPDATE counter SET n = n + 1 WHERE id = 1`: the hot row every writer fights over.
    Hot,
    /// `SELECT pg_sleep`: a pause inside the transaction (holding its row locks).
    Sleep(u32),
    /// Steps inside a savepoint that is rolled back: none of them may ever appear.
    RolledBack(Vec<Step>),
}

/// A transaction whose COMMIT returned Ok.
#[derive(Debug)]
struct Committed {
    tag: String,
    /// Just before COMMIT was sent.
    before: Instant,
    /// Just after it returned.
    after: Instant,
    /// Its changes, in statement order, as [`describe`] renders them.
    changes: Vec<String>,
}

/// What the writers did.
#[derive(Debug, Default)]
struct Record {
    committed: Vec<Committed>,
    rolled_back: usize,
    savepoints_rolled_back: usize,
    paused: usize,
    /// SERIALIZABLE transactions whose COMMIT failed with 40001.
    serialization_failures_at_commit: usize,
    /// Of those, the ones that committed first in their pair, which PostgreSQL never
    /// fails for the skew (it dooms the pivot, the other one): tag and message.
    first_failures: Vec<String>,
    /// Tags of transactions whose changes must never appear (rolled back or failed).
    doomed: HashSet<String>,
}

/// A change as the test compares it: op, table, transaction tag, statement number, and
/// what identifies the row version (the hot row's `n`, an insert's `id`, `skew`'s id and
/// value).
fn describe(change: &Value) -> (String, String) {
    let new = &change["new"];
    let tag = new["tx"]
        .as_str()
        .unwrap_or_else(|| panic!("no tx tag: {change}"))
        .to_string();
    let stmt = &new["stmt"];
    let table = change["table"].as_str().unwrap();
    let op = change["op"].as_str().unwrap();
    let what = match table {
        "public.counter" => format!("n={}", new["n"]),
        "public.events" => format!("id={}", new["id"]),
        "public.skew" => format!("id={} v={}", new["id"], new["v"]),
        other => panic!("unexpected table {other}: {change}"),
    };
    let text = format!("{op} {table} {tag} {stmt} {what}");
    (tag, text)
}

/// Runs one step of `tag`'s script in `t`; returns the change it made (if it is to be
/// seen).
async fn step(
    t: &mut Transaction<'_>,
    s: &Step,
    tag: &str,
    stmt: &mut i32,
    out: &mut Vec<String>,
) -> Result<(), tokio_postgres::Error> {
    match s {
        Step::Insert => {
            *stmt += 1;
            let id: i32 = t
                .query_one(
                    "INSERT INTO events (tx, stmt) VALUES ($1, $2) RETURNING id",
                    &[&tag, &*stmt],
                )
                .await?
                .get(0);
            out.push(format!("insert public.events {tag} {stmt} id={id}"));
        }
        Step::Hot => {
            *stmt += 1;
            let n: i32 = t
                .query_one(
                    "UPDATE counter SET n = n + 1, tx = $1, stmt = $2 WHERE id = 1 RETURNING n",
                    &[&tag, &*stmt],
                )
                .await?
                .get(0);
            out.push(format!("update public.counter {tag} {stmt} n={n}"));
        }
        Step::Sleep(ms) => {
            t.execute("SELECT pg_sleep($1::float8 / 1000)", &[&f64::from(*ms)])
                .await?;
        }
        Step::RolledBack(steps) => {
            let mut sp = t.savepoint("doomed").await?;
            let mut never = Vec::new();
            for s in steps {
                Box::pin(step(&mut sp, s, tag, stmt, &mut never)).await?;
            }
            sp.rollback().await?;
        }
    }
    Ok(())
}

/// A random script: conflicting updates of the hot row, inserts, pauses, savepoints
/// rolled back; and whether it commits.
fn script() -> (Vec<Step>, bool) {
    let pause = || Step::Sleep(rand::random_range(1..15));
    let mut steps = Vec::new();
    let kind = rand::random_range(0..100);
    match kind {
        // The hot row, alone or among inserts, sometimes holding its lock for a while.
        0..40 => {
            if rand::random_bool(0.5) {
                steps.push(Step::Insert);
            }
            steps.push(Step::Hot);
            if rand::random_bool(0.3) {
                steps.push(pause());
            }
            if rand::random_bool(0.5) {
                steps.push(Step::Insert);
            }
        }
        // Inserts around a savepoint rolled back (sometimes with the hot row in it).
        40..65 => {
            steps.push(Step::Insert);
            let mut doomed = vec![Step::Insert];
            if rand::random_bool(0.3) {
                doomed.push(Step::Hot);
            }
            doomed.push(Step::Insert);
            steps.push(Step::RolledBack(doomed));
            steps.push(Step::Insert);
            if rand::random_bool(0.5) {
                steps.push(Step::Hot);
            }
        }
        // A pause between statements: this transaction started long before it commits.
        65..85 => {
            steps.push(Step::Insert);
            steps.push(Step::Sleep(rand::random_range(5..40)));
            steps.push(Step::Insert);
        }
        // Several inserts back to back.
        _ => {
            for _ in 0..rand::random_range(1..5) {
                steps.push(Step::Insert);
            }
        }
    }
    // Whole transactions rolled back, after touching the hot row.
    let commits = rand::random_range(0..100) >= 12;
    if !commits {
        steps.push(Step::Hot);
        steps.push(pause());
    }
    (steps, commits)
}

/// Writer `w`: random scripts until `until`.
async fn writer(url: String, w: usize, until: Instant) -> Record {
    let mut c = support::connect(&url).await;
    let mut record = Record::default();
    let mut k = 0;
    while Instant::now() < until {
        k += 1;
        let tag = format!("w{w}-{k}");
        let (steps, commits) = script();
        let mut t = c.transaction().await.unwrap();
        let mut stmt = 0;
        let mut changes = Vec::new();
        for s in &steps {
            match s {
                Step::Sleep(_) => record.paused += 1,
                Step::RolledBack(_) => record.savepoints_rolled_back += 1,
                _ => {}
            }
            step(&mut t, s, &tag, &mut stmt, &mut changes)
                .await
                .unwrap_or_else(|e| panic!("{tag} {s:?}: {}", support::server_message(&e)));
        }
        if commits {
            let before = Instant::now();
            t.commit()
                .await
                .unwrap_or_else(|e| panic!("COMMIT of {tag}: {}", support::server_message(&e)));
            let after = Instant::now();
            record.committed.push(Committed {
                tag,
                before,
                after,
                changes,
            });
        } else {
            t.rollback().await.unwrap();
            record.rolled_back += 1;
            record.doomed.insert(tag);
        }
    }
    record
}

/// Two SERIALIZABLE writers in lockstep, provoking write skew: both read `skew`, each
/// updates its own row of it and inserts a row, then one commits and the other's COMMIT
/// fails with 40001 (its changes must never appear). They take turns being first.
async fn serializable_pair(url: String, until: Instant) -> Record {
    let barrier = Arc::new(Barrier::new(2));
    let stop = Arc::new(AtomicBool::new(false));
    let run = |me: i32| {
        let (url, barrier, stop) = (url.clone(), barrier.clone(), stop.clone());
        tokio::spawn(async move {
            let mut c = support::connect(&url).await;
            let mut record = Record::default();
            let mut round = 0;
            loop {
                // Both sides stop at the same round: writer 1 decides before the barrier.
                if me == 1 {
                    stop.store(Instant::now() >= until, Ordering::SeqCst);
                }
                barrier.wait().await;
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                round += 1;
                let tag = format!("s{me}-{round}");
                let first = (round % 2 == 0) == (me == 1);
                let t = c
                    .build_transaction()
                    .isolation_level(IsolationLevel::Serializable)
                    .start()
                    .await
                    .unwrap();
                let mut changes = Vec::new();
                let read = t
                    .query_one("SELECT sum(v)::int FROM skew WHERE id IN (1, 2)", &[])
                    .await;
                barrier.wait().await;
                let wrote = async {
                    read?;
                    let v: i32 = t
                        .query_one(
                            "UPDATE skew SET v = v + 1, tx = $1, stmt = 1 WHERE id = $2 RETURNING v",
                            &[&tag, &me],
                        )
                        .await?
                        .get(0);
                    changes.push(format!("update public.skew {tag} 1 id={me} v={v}"));
                    let id: i32 = t
                        .query_one(
                            "INSERT INTO events (tx, stmt) VALUES ($1, 2) RETURNING id",
                            &[&tag],
                        )
                        .await?
                        .get(0);
                    changes.push(format!("insert public.events {tag} 2 id={id}"));
                    Ok::<_, tokio_postgres::Error>(())
                }
                .await;
                barrier.wait().await;
                if !first {
                    // The other side commits first.
                    barrier.wait().await;
                }
                let outcome = match wrote {
                    Err(e) => {
                        let _ = t.rollback().await;
                        Err(e)
                    }
                    Ok(()) => {
                        let before = Instant::now();
                        let committed = t.commit().await;
                        let after = Instant::now();
                        match committed {
                            Ok(()) => Ok((before, after)),
                            Err(e) => {
                                assert_eq!(
                                    e.code(),
                                    Some(
                                        &tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE
                                    ),
                                    "COMMIT of {tag}: {}",
                                    support::server_message(&e)
                                );
                                record.serialization_failures_at_commit += 1;
                                if first {
                                    record
                                        .first_failures
                                        .push(format!("{tag}: {}", support::server_message(&e)));
                                }
                                Err(e)
                            }
                        }
                    }
                };
                if first {
                    barrier.wait().await;
                }
                match outcome {
                    Ok((before, after)) => record.committed.push(Committed {
                        tag,
                        before,
                        after,
                        changes,
                    }),
                    Err(_) => {
                        record.rolled_back += 1;
                        record.doomed.insert(tag);
                    }
                }
            }
            record
        })
    };
    let (a, b) = (run(1), run(2));
    let mut record = a.await.unwrap();
    let other = b.await.unwrap();
    record.merge(other);
    record
}

impl Record {
    fn merge(&mut self, other: Record) {
        self.committed.extend(other.committed);
        self.rolled_back += other.rolled_back;
        self.savepoints_rolled_back += other.savepoints_rolled_back;
        self.paused += other.paused;
        self.serialization_failures_at_commit += other.serialization_failures_at_commit;
        self.first_failures.extend(other.first_failures);
        self.doomed.extend(other.doomed);
    }
}

/// Reads `s` until `target` says how many changes to expect and that many arrived.
async fn collect(
    mut s: SseClient,
    mut target: watch::Receiver<Option<usize>>,
) -> (SseClient, Vec<Value>) {
    let mut got = Vec::new();
    loop {
        if let Some(n) = *target.borrow_and_update()
            && got.len() >= n
        {
            return (s, got);
        }
        tokio::select! {
            _ = target.changed() => {}
            e = s.next() => {
                let e = e.expect("the stream ended");
                match e.event.as_str() {
                    "change" => {
                        let data = e.json();
                        assert_eq!(e.id.as_deref(), data["position"].as_str());
                        got.push(data);
                    }
                    other => panic!("unexpected event {other}: {e:?}"),
                }
            }
        }
    }
}

/// `GET /v1/position` answered by the gateway at `addr`.
#[derive(Debug)]
struct Head {
    /// Just before the request was sent.
    sent: Instant,
    /// Just after the answer came.
    answered: Instant,
    position: Position,
}

/// Asks the gateway at `addr` for the head position, back to back, until `until` (each head seals
/// first, so this also makes the gateways seal concurrently with each other's listener).
async fn poll_heads(addr: std::net::SocketAddr, token: String, until: Instant) -> Vec<Head> {
    let auth = format!("Bearer {token}");
    let mut heads: Vec<Head> = Vec::new();
    while Instant::now() < until {
        let sent = Instant::now();
        let r = support::get(addr, "/v1/position", &[("Authorization", &auth)])
            .await
            .unwrap();
        let answered = Instant::now();
        assert_eq!(r.status, 200, "/v1/position: {}", r.body);
        let position: Position = r.json()["position"].as_str().unwrap().parse().unwrap();
        if let Some(previous) = heads.last() {
            assert!(
                previous.position <= position,
                "the head went back from {} to {position}",
                previous.position
            );
        }
        heads.push(Head {
            sent,
            answered,
            position,
        });
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    heads
}

/// Writes the first place where `a` and `b` differ.
fn first_difference(a: &[Value], b: &[Value]) -> String {
    let i = a
        .iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    format!(
        "lengths {} and {}; first difference at {i}: {:?} vs {:?}",
        a.len(),
        b.len(),
        a.get(i),
        b.get(i)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_get_every_commit_once_in_commit_order_on_two_gateways() {
    let started = Instant::now();
    let db = TestDb::new().await;
    let c = db.client().await;
    support::Run::run(
        &c,
        "CREATE TABLE counter (id int PRIMARY KEY, n int NOT NULL, tx text, stmt int);
         INSERT INTO counter VALUES (1, 0, 'setup', 0);
         CREATE TABLE events (id serial PRIMARY KEY, tx text NOT NULL, stmt int NOT NULL);
         CREATE TABLE skew (id int PRIMARY KEY, v int NOT NULL, tx text, stmt int);
         INSERT INTO skew VALUES (1, 0, 'setup', 0), (2, 0, 'setup', 0);
         SELECT pgfeed.watch('counter', public => true);
         SELECT pgfeed.watch('events', public => true);
         SELECT pgfeed.watch('skew', public => true);",
    )
    .await;
    // A lost doorbell would be made up for by the next health check: put it out of reach.
    let slow_health = &[("PGFEED_DATABASE_HEALTH_INTERVAL", "60s")];
    let gateways = [
        Gateway::start_with(support::sources_with(&db, slow_health)).await,
        Gateway::start_with(support::sources_with(&db, slow_health)).await,
    ];
    let (target_tx, target) = watch::channel(None);
    let mut readers = Vec::new();
    for gw in &gateways {
        let s = gw.live("acme").await;
        readers.push(tokio::spawn(collect(s, target.clone())));
    }

    let until = Instant::now() + WRITING;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        writers.push(tokio::spawn(writer(db.url.clone(), w, until)));
    }
    let pair = tokio::spawn(serializable_pair(db.url.clone(), until));
    let pollers: Vec<_> = gateways
        .iter()
        .chain(&gateways)
        .map(|gw| tokio::spawn(poll_heads(gw.addr, gw.token("acme"), until)))
        .collect();
    let mut record = pair.await.unwrap();
    for w in writers {
        record.merge(w.await.unwrap());
    }

    let mut heads = Vec::new();
    for p in pollers {
        heads.extend(p.await.unwrap());
    }

    // What was done, so that the test proves what it claims.
    let committed_changes: usize = record.committed.iter().map(|t| t.changes.len()).sum();
    let hot_commits = record
        .committed
        .iter()
        .flat_map(|t| &t.changes)
        .filter(|c| c.contains("public.counter"))
        .count();
    eprintln!(
        "{} transactions committed ({committed_changes} changes, {hot_commits} of the hot row), \
         {} rolled back, {} savepoints rolled back, {} pauses, {} SERIALIZABLE commits failed ({} of them first in their pair)",
        record.committed.len(),
        record.rolled_back,
        record.savepoints_rolled_back,
        record.paused,
        record.serialization_failures_at_commit,
        record.first_failures.len()
    );
    assert!(hot_commits >= 20, "too few hot-row updates: {hot_commits}");
    assert!(record.rolled_back >= 5);
    assert!(record.savepoints_rolled_back >= 5);
    assert!(record.paused >= 5);
    assert!(
        record.serialization_failures_at_commit >= 1,
        "no SERIALIZABLE transaction failed at commit"
    );

    target_tx.send_replace(Some(committed_changes));
    let mut streams = Vec::new();
    for r in readers {
        let (mut s, got) = tokio::time::timeout(support::SOON, r)
            .await
            .expect("every change arrives in time")
            .unwrap();
        s.assert_quiet(QUIET).await;
        streams.push(got);
    }
    let delivered = &streams[0];
    assert!(
        streams[0] == streams[1],
        "both gateways deliver the same changes with the same positions, in the same order: {}",
        first_difference(&streams[0], &streams[1])
    );

    // Positions strictly increase.
    for w in delivered.windows(2) {
        assert!(
            position(&w[0]) < position(&w[1]),
            "positions must strictly increase: {} then {}",
            w[0],
            w[1]
        );
    }

    // Exactly what committed, nothing of what rolled back or failed.
    let mut by_tx: HashMap<String, Vec<(usize, String, Position)>> = HashMap::new();
    for (i, change) in delivered.iter().enumerate() {
        let (tag, text) = describe(change);
        assert!(
            !record.doomed.contains(&tag),
            "a change of a transaction that did not commit was delivered: {change}"
        );
        by_tx
            .entry(tag)
            .or_default()
            .push((i, text, position(change)));
    }
    let expected: HashSet<&str> = record
        .committed
        .iter()
        .flat_map(|t| t.changes.iter().map(String::as_str))
        .collect();
    let got: HashSet<&str> = by_tx
        .values()
        .flatten()
        .map(|(_, text, _)| text.as_str())
        .collect();
    assert_eq!(got.len(), delivered.len(), "a change was delivered twice");
    let missing: Vec<_> = expected.difference(&got).take(5).collect();
    let extra: Vec<_> = got.difference(&expected).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "delivered changes differ from committed ones: missing {missing:?}, extra {extra:?}"
    );

    // Each transaction's changes are contiguous, in statement order, under one commit
    // number of their own.
    let mut commit_of: HashMap<i64, &str> = HashMap::new();
    let mut first_index: HashMap<&str, usize> = HashMap::new();
    for t in &record.committed {
        let Some(seen) = by_tx.get(&t.tag) else {
            assert!(t.changes.is_empty(), "{} was never delivered", t.tag);
            continue;
        };
        let texts: Vec<&str> = seen.iter().map(|(_, text, _)| text.as_str()).collect();
        assert_eq!(
            texts,
            t.changes.iter().map(String::as_str).collect::<Vec<_>>(),
            "{}: its changes in statement order",
            t.tag
        );
        let first = seen[0].0;
        for (k, (i, _, p)) in seen.iter().enumerate() {
            assert_eq!(*i, first + k, "{}: its changes are contiguous", t.tag);
            assert_eq!(p.commit, seen[0].2.commit, "{}: one commit number", t.tag);
        }
        if let Some(other) = commit_of.insert(seen[0].2.commit, &t.tag) {
            panic!(
                "{} and {other} share commit number {}",
                t.tag, seen[0].2.commit
            );
        }
        first_index.insert(&t.tag, first);
    }

    // Writes to the hot row in the order they happened: n goes 1, 2, 3, ... with no gap.
    let ns: Vec<i64> = delivered
        .iter()
        .filter(|c| c["table"] == "public.counter")
        .map(|c| c["new"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(ns.len(), hot_commits);
    for (k, n) in ns.iter().enumerate() {
        assert_eq!(
            *n,
            k as i64 + 1,
            "hot row versions out of order or missing: {:?}",
            &ns[k.saturating_sub(5)..(k + 5).min(ns.len())]
        );
    }

    // Commits that did not overlap come in commit order: if T1's COMMIT returned before
    // T2's was sent, T1 comes first.
    let mut order: Vec<&Committed> = record
        .committed
        .iter()
        .filter(|t| first_index.contains_key(t.tag.as_str()))
        .collect();
    order.sort_by_key(|t| first_index[t.tag.as_str()]);
    let mut earliest_after_later: Option<&Committed> = None;
    let mut checked_pairs = 0usize;
    for t2 in order.iter().rev() {
        if let Some(t1) = earliest_after_later
            && t1.after < t2.before
        {
            panic!(
                "{} finished committing {:?} before {} began to commit, yet comes after it",
                t1.tag,
                t2.before - t1.after,
                t2.tag
            );
        }
        if earliest_after_later.is_none_or(|t1| t2.after < t1.after) {
            earliest_after_later = Some(t2);
        }
        checked_pairs += 1;
    }
    assert!(checked_pairs >= 50, "too few transactions: {checked_pairs}");

    // A head position covers every commit that returned before it was asked for, and
    // nothing that had not begun to commit when it was answered.
    assert!(heads.len() >= 20, "too few heads: {}", heads.len());
    for t in &order {
        let p = position(&delivered[first_index[t.tag.as_str()]]);
        for h in &heads {
            assert!(
                !(t.after < h.sent && p > h.position),
                "{} ({p}) committed before /v1/position was asked, which answered {}",
                t.tag,
                h.position
            );
            assert!(
                !(h.answered < t.before && p <= h.position),
                "{} ({p}) began to commit after /v1/position answered {}",
                t.tag,
                h.position
            );
        }
    }

    // Resuming on either gateway from a random delivered position replays exactly the rest.
    for (g, gw) in gateways.iter().enumerate() {
        let i = rand::random_range(0..delivered.len() - 1);
        let from = delivered[i]["position"].as_str().unwrap();
        let mut r = gw.resume("globex", "", from).await;
        assert_eq!(r.status, 200, "{}", r.raw);
        let replayed = r.until_live().await;
        assert!(
            replayed == delivered[i + 1..],
            "gateway {g}: resuming after {from} replays exactly the suffix: {}",
            first_difference(&replayed, &delivered[i + 1..])
        );
    }
    // Neither listener ever failed (sealing, say, raced with the other gateway's).
    for (g, gw) in gateways.iter().enumerate() {
        let metrics = support::scrape(gw).await;
        assert_eq!(
            support::sample(&metrics, "pgfeed_listener_reconnects_total"),
            Some(0.0),
            "gateway {g}'s listener reconnected"
        );
    }
    for gw in gateways {
        gw.stop().await;
    }
    eprintln!("took {:?}", started.elapsed());

    // Only real conflicts fail a SERIALIZABLE commit: capture must not add its own.
    assert!(
        record.first_failures.is_empty(),
        "{} SERIALIZABLE transactions that committed first in their pair failed at COMMIT, \
         where PostgreSQL fails only the other one; first: {:?}",
        record.first_failures.len(),
        record.first_failures.first()
    );
}
