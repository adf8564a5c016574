//! PostgreSQL crashes (`pg_ctl stop -m immediate`: recovery runs at the next start, and
//! unlogged tables come back empty) while writers commit and a
//! stream is open (issue 16, SPEC section 1 and 4). The stream keeps going once the gateway
//! has reconnected by itself and gets every change that survived the crash (with durable
//! commits: every one whose COMMIT returned Ok) exactly once, in order; positions issued
//! after the crash are all greater than those issued before, and none is reused for another
//! change: resuming from a position taken before the crash gives exactly the suffix, on
//! that gateway and on a fresh one.
//!
//! Its own test binary and clusters of its own: a crash cuts every connection of every
//! test sharing a cluster, and the suite's cluster commits asynchronously.

use pgfeed_testkit as support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgfeed::change::Position;
use pgfeed::cluster::{Cluster, Search};
use pgfeed::config::Sources;
use serde_json::Value;
use support::{Gateway, SseClient, position};
use tokio::sync::RwLock;
use tokio_util::sync::CancellationToken;

/// Writers committing through the crash.
const WRITERS: usize = 4;
/// Changes the stream receives before the crash, and after it.
const BEFORE: usize = 60;
const AFTER: usize = 60;
/// Window in which "nothing more arrives" is checked.
const QUIET: Duration = Duration::from_millis(300);

/// How the crashed cluster commits.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Commits {
    /// `synchronous_commit = on`: a COMMIT that returned Ok survives the crash.
    Durable,
    /// `synchronous_commit = off`: a crash loses the last commits, those whose WAL was not
    /// written out yet (PostgreSQL's documented trade-off), but must never take back a
    /// change that was delivered nor make its position name another change.
    Asynchronous,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_crash_under_writes_loses_duplicates_and_reuses_nothing() {
    let _one_at_a_time = ONE_CLUSTER_AT_A_TIME.lock().await;
    crash_under_writes(Commits::Durable).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_asynchronous_commits_a_crash_never_takes_back_a_delivered_change() {
    let _one_at_a_time = ONE_CLUSTER_AT_A_TIME.lock().await;
    crash_under_writes(Commits::Asynchronous).await;
}

/// The seal commits asynchronously (sql/functions.sql, pgfeed.seal): a crash can lose the
/// numbering of commits a gateway has already delivered, while the commits themselves,
/// durable, survive and are numbered again. No position may then name another change: the
/// stream that had it is sent `reset`, a client resuming from it too, and the recovered
/// numbers are all above it. The WAL writer is slowed so that the seal's commit stays in
/// memory until the crash; whether it did is read from the recovered journal, and the
/// round is tried again when the seal reached the disk after all (rare). The gateway
/// reaches the database through a proxy that holds its connections after the crash until
/// the test has looked at what recovery left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_that_loses_a_numbering_resets_its_streams_and_reuses_no_position() {
    let _one_at_a_time = ONE_CLUSTER_AT_A_TIME.lock().await;
    let (cluster, admin, url, mut c) =
        watched_cluster("synchronous_commit = on\nwal_writer_delay = 10s\ncheckpoint_timeout = 1h")
            .await;
    let proxy = support::Proxy::start(&url).await;
    let mut through_proxy = sources(&proxy.url(&url));
    // Connection attempts held by the proxy give up soon.
    through_proxy
        .env
        .push(("PGFEED_DATABASE_HEALTH_INTERVAL".into(), "500ms".into()));
    let gw = Gateway::start_with(through_proxy).await;
    let mut s = gw.live("acme").await;

    let mut delivered = Vec::new();
    for round in 0..5 {
        // A durable commit, delivered: numbered by a seal whose commit is not flushed.
        let row = format!("lost-numbering-{round}");
        c.execute(
            "INSERT INTO orders (tenant, body) VALUES ('acme', $1)",
            &[&row],
        )
        .await
        .unwrap();
        let change = next_within(&mut s, support::SOON)
            .await
            .expect("the commit is delivered");
        assert_eq!(body(&change), row);
        let given = position(&change);
        delivered.push(row.clone());
        drop(c);

        let crashed = {
            let cluster = cluster.clone();
            tokio::task::spawn_blocking(move || {
                let data = cluster.dir().join("data").display().to_string();
                pg_ctl(&cluster, &["stop", "-m", "immediate", "-w", "-D", &data]);
            })
        };
        proxy.hold();
        support::until_readyz(gw.addr, 503).await;
        crashed.await.unwrap();
        {
            let cluster = cluster.clone();
            tokio::task::spawn_blocking(move || cluster.restart().expect("restart"))
                .await
                .unwrap();
        }
        // Before any seal: the commit is pending again exactly when its numbering was
        // lost.
        c = support::connect(&url).await;
        let survived =
            support::query_i64(&c, "SELECT count(*) FROM pgfeed.pending", &[]).await == 0;
        proxy.release();
        support::until_readyz(gw.addr, 200).await;
        let in_table: Vec<String> = c
            .query("SELECT body FROM orders ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(in_table, delivered, "durable commits survive the crash");

        // Whatever happened, a write after the crash comes with a new, higher position.
        let after = format!("after-crash-{round}");
        if survived {
            // The seal reached the disk before the crash: nothing to take back, and
            // the stream goes on without a reset.
            c.execute(
                "INSERT INTO orders (tenant, body) VALUES ('acme', $1)",
                &[&after],
            )
            .await
            .unwrap();
            delivered.push(after.clone());
            let next = next_within(&mut s, support::SOON).await.expect("delivered");
            assert_eq!(body(&next), after);
            assert!(position(&next) > given);
            eprintln!("round {round}: the seal reached the disk before the crash; again");
            continue;
        }
        // The numbering was lost. The open stream is told to refetch, at a position above
        // the lost one (the commit numbered again); then it follows the new numbers.
        let reset = tokio::time::timeout(support::SOON, s.next())
            .await
            .expect("an event in time")
            .expect("the stream goes on");
        assert_eq!(reset.event, "reset", "{reset:?}");
        let head: Position = reset.json()["position"].as_str().unwrap().parse().unwrap();
        assert!(
            head > given,
            "the reset's position {head} is above the lost {given}"
        );
        c.execute(
            "INSERT INTO orders (tenant, body) VALUES ('acme', $1)",
            &[&after],
        )
        .await
        .unwrap();
        let positions: Vec<i64> = c
            .query("SELECT c.seq FROM pgfeed.commits AS c ORDER BY c.seq", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(
            positions.iter().all(|&p| p != given.commit),
            "the lost number {given} is not reused: {positions:?}"
        );
        assert!(
            positions.last().is_some_and(|&p| p > given.commit),
            "numbers go on above the lost one: {positions:?}"
        );
        let mut rest = Vec::new();
        while !rest.iter().any(|c: &Value| body(c) == after) {
            let e = tokio::time::timeout(support::SOON, s.next())
                .await
                .expect("an event in time")
                .expect("the stream goes on");
            match e.event.as_str() {
                "live" => {}
                "change" => rest.push(e.json()),
                other => panic!("unexpected {other}: {e:?}"),
            }
        }
        assert!(rest.iter().all(|c| position(c) > given));
        // A client resuming from the lost position, on this gateway and a fresh one,
        // is sent reset too, never the changes that now carry other numbers.
        let fresh = Gateway::start_with(sources(&url)).await;
        for g in [&gw, &fresh] {
            let mut r = g.resume("acme", "", &given.to_string()).await;
            assert_eq!(r.status, 200, "{}", r.raw);
            let first = tokio::time::timeout(support::SOON, r.next())
                .await
                .expect("an event in time")
                .expect("an event");
            assert_eq!(first.event, "reset", "resuming from {given}: {first:?}");
            assert!(
                first.json()["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("crashed")),
                "{first:?}"
            );
        }
        fresh.stop().await;
        gw.stop().await;
        drop((s, admin, c));
        let cluster = Arc::try_unwrap(cluster).expect("the only handle on the cluster");
        tokio::task::spawn_blocking(move || cluster.stop())
            .await
            .unwrap()
            .expect("stopping the cluster");
        return;
    }
    panic!("in five rounds, the seal always reached the disk before the crash");
}

/// Each test starts a cluster of its own; one at a time is enough for this machine.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What the writers know of their transactions.
#[derive(Default)]
struct Outcomes {
    /// Rows of transactions whose COMMIT returned Ok.
    committed: HashSet<String>,
    /// Rows of transactions whose COMMIT was sent but never answered (the crash): they
    /// may or may not have committed.
    uncertain: HashSet<String>,
    /// Transactions that failed (connection lost, server starting or recovering).
    failures: usize,
}

/// Runs `pg_ctl` of `cluster` with `args`, as the `postgres` user when we are root (as
/// [`Cluster`] does). Blocking.
fn pg_ctl(cluster: &Cluster, args: &[&str]) {
    let pg_ctl = cluster.bindir().join("pg_ctl");
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let mut cmd = if root {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&pg_ctl);
        c
    } else {
        std::process::Command::new(&pg_ctl)
    };
    let out = cmd
        .args(args)
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running pg_ctl");
    assert!(
        out.status.success(),
        "pg_ctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Gateway settings for the database at `url`.
fn sources(url: &str) -> Sources {
    Sources {
        file: None,
        env: vec![
            ("DATABASE_URL".into(), url.into()),
            ("PGFEED_AUTH_SECRET".into(), support::SECRET.into()),
            ("PGFEED_SERVER_LISTEN".into(), "127.0.0.1:0".into()),
        ],
        flags: Vec::new(),
    }
}

fn body(change: &Value) -> String {
    change["new"]["body"]
        .as_str()
        .unwrap_or_else(|| panic!("no body: {change}"))
        .to_string()
}

/// Writer `w`: transactions of one to three inserts, one after another, until `stop`,
/// each while holding `gate` for reading (so that the test can pause writers); reconnects
/// (as an application would) whenever its connection is lost.
async fn writer(
    url: String,
    w: usize,
    stop: CancellationToken,
    gate: Arc<RwLock<()>>,
    outcomes: Arc<Mutex<Outcomes>>,
) {
    let mut k = 0;
    while !stop.is_cancelled() {
        let Ok((mut c, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await else {
            outcomes.lock().unwrap().failures += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        tokio::spawn(conn);
        while !stop.is_cancelled() {
            let _open = gate.read().await;
            k += 1;
            let rows: Vec<String> = (0..k % 3 + 1).map(|r| format!("w{w}-{k}-{r}")).collect();
            let attempt = async {
                let t = c.transaction().await?;
                for row in &rows {
                    t.execute(
                        "INSERT INTO orders (tenant, body) VALUES ('acme', $1)",
                        &[row],
                    )
                    .await?;
                }
                Ok::<_, tokio_postgres::Error>(t)
            }
            .await;
            let Ok(t) = attempt else {
                // Lost before COMMIT was sent: rolled back.
                outcomes.lock().unwrap().failures += 1;
                break;
            };
            let committed = t.commit().await;
            let mut o = outcomes.lock().unwrap();
            if committed.is_ok() {
                o.committed.extend(rows);
            } else {
                o.failures += 1;
                o.uncertain.extend(rows);
                break;
            }
        }
    }
}

/// Checks that positions strictly increase and that each writer's transactions, which
/// did not overlap, come in the order it committed them.
fn assert_order(changes: &[Value]) {
    for pair in changes.windows(2) {
        assert!(
            position(&pair[0]) < position(&pair[1]),
            "positions strictly increase: {} then {}",
            pair[0],
            pair[1]
        );
    }
    let mut last: HashMap<String, (u64, u64)> = HashMap::new();
    for c in changes {
        let b = body(c);
        if b == "probe" {
            continue;
        }
        let mut parts = b.split('-');
        let (w, k, r) = (
            parts.next().unwrap().to_string(),
            parts.next().unwrap().parse::<u64>().unwrap(),
            parts.next().unwrap().parse::<u64>().unwrap(),
        );
        if let Some(previous) = last.get(&w) {
            assert!(
                *previous < (k, r),
                "{w}'s changes out of order: {previous:?} then {b}"
            );
        }
        last.insert(w, (k, r));
    }
}

/// Reads `s` until `done` says the changes so far are enough.
async fn read_until(s: &mut SseClient, got: &mut Vec<Value>, done: impl Fn(&[Value]) -> bool) {
    while !done(got) {
        got.push(s.next_change().await);
    }
}

/// Reads `s` until it holds every row of `expected` or nothing came for `wait`, then
/// until nothing comes for [`QUIET`]: what is missing or extra is for the caller to say.
async fn read_rest(
    s: &mut SseClient,
    got: &mut Vec<Value>,
    expected: &HashSet<String>,
    wait: Duration,
) {
    let mut seen: HashSet<String> = got.iter().map(body).collect();
    while !expected.is_subset(&seen) {
        let Some(change) = next_within(s, wait).await else {
            break;
        };
        seen.insert(body(&change));
        got.push(change);
    }
    while let Some(change) = next_within(s, QUIET).await {
        got.push(change);
    }
}

/// The next change on `s`, or `None` if none comes within `wait`.
async fn next_within(s: &mut SseClient, wait: Duration) -> Option<Value> {
    match tokio::time::timeout(wait, s.next()).await {
        Ok(Some(e)) if e.event == "change" => Some(e.json()),
        Ok(Some(e)) => panic!("unexpected event: {e:?}"),
        Ok(None) => panic!("the stream ended"),
        Err(_) => None,
    }
}

/// A cluster of the test's own with `conf`, a database `crash` with the schema and a
/// watched `orders` table: the cluster, a connection to its `postgres` database, the
/// database's URL and a connection to it.
async fn watched_cluster(
    conf: &'static str,
) -> (
    Arc<Cluster>,
    tokio_postgres::Client,
    String,
    tokio_postgres::Client,
) {
    let cluster = tokio::task::spawn_blocking(move || {
        Cluster::start_with(&Search::local(), conf)
            .unwrap_or_else(|e| panic!("cannot start a cluster of this test's own: {e}"))
    })
    .await
    .unwrap();
    let cluster = Arc::new(cluster);
    let admin = support::connect(&cluster.url()).await;
    support::Run::run(&admin, "CREATE DATABASE crash").await;
    let url = format!("postgres://postgres@127.0.0.1:{}/crash", cluster.port());
    let mut c = support::connect(&url).await;
    pgfeed::schema::install(&mut c).await.expect("install");
    support::Run::run(
        &c,
        "CREATE TABLE orders (id serial PRIMARY KEY, tenant text NOT NULL, body text);
         SELECT pgfeed.watch('orders', 'tenant');",
    )
    .await;
    (cluster, admin, url, c)
}

async fn crash_under_writes(commits: Commits) {
    let started = std::time::Instant::now();
    let conf = match commits {
        Commits::Durable => "synchronous_commit = on",
        Commits::Asynchronous => "synchronous_commit = off\nwal_writer_delay = 10s",
    };
    let (cluster, admin, url, c) = watched_cluster(conf).await;

    let gw = Gateway::start_with(sources(&url)).await;
    let mut s = gw.live("acme").await;

    let stop = CancellationToken::new();
    let gate = Arc::new(RwLock::new(()));
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (stop, gate, outcomes) = (stop.clone(), gate.clone(), outcomes.clone());
            tokio::spawn(writer(url.clone(), w, stop, gate, outcomes))
        })
        .collect();

    // Before the crash.
    let mut got = Vec::new();
    read_until(&mut s, &mut got, |g| g.len() >= BEFORE).await;
    assert_eq!(
        outcomes.lock().unwrap().failures,
        0,
        "no write fails before the crash"
    );
    let resume_from = got[BEFORE / 2]["position"].as_str().unwrap().to_string();

    // The last commit before the crash, once it was delivered (writers paused): with
    // asynchronous commits its WAL is still in memory, unless numbering it wrote it out.
    let paused = gate.write().await;
    c.execute(
        "INSERT INTO orders (tenant, body) VALUES ('acme', 'probe')",
        &[],
    )
    .await
    .unwrap();
    outcomes.lock().unwrap().committed.insert("probe".into());
    read_until(&mut s, &mut got, |g| {
        g.last().is_some_and(|c| body(c) == "probe")
    })
    .await;
    drop(c);

    // With durable commits, also commits that finished but are not numbered yet: hold
    // the sealers' lock (writers never take it) while writers go on committing.
    let holder = support::connect(&url).await;
    let mut pending = 0;
    let mut paused = Some(paused);
    if commits == Commits::Durable {
        support::Run::run(
            &holder,
            "BEGIN; LOCK TABLE pgfeed.seal_lock IN EXCLUSIVE MODE",
        )
        .await;
        paused = None;
        let held_at = outcomes.lock().unwrap().committed.len();
        support::eventually("writers commit while sealing is held", || async {
            outcomes.lock().unwrap().committed.len() >= held_at + 20
        })
        .await;
        pending = support::query_i64(&holder, "SELECT count(*) FROM pgfeed.pending", &[]).await;
        assert!(pending > 0, "commits are pending at the crash");
    }

    // The crash, and recovery.
    let crashed = {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || {
            let data = cluster.dir().join("data").display().to_string();
            pg_ctl(&cluster, &["stop", "-m", "immediate", "-w", "-D", &data]);
        })
    };
    support::until_readyz(gw.addr, 503).await;
    crashed.await.unwrap();
    // Writers go on, failing until PostgreSQL is back.
    drop(paused);
    let at_crash = got.len();
    {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || {
            cluster.restart().expect("pg_ctl start after the crash")
        })
        .await
        .unwrap();
    }
    support::until_readyz(gw.addr, 200).await;

    // After: the stream opened before the crash goes on by itself.
    read_until(&mut s, &mut got, |g| g.len() >= at_crash + AFTER).await;
    stop.cancel();
    for w in writers {
        w.await.unwrap();
    }
    let outcomes = Arc::try_unwrap(outcomes)
        .ok()
        .unwrap()
        .into_inner()
        .unwrap();
    assert!(
        outcomes.failures > 0,
        "the crash happened under writes: some of them failed"
    );

    // What the recovered database holds: with durable commits, every row whose COMMIT
    // returned Ok; never a row of a transaction that failed before COMMIT.
    let c = support::connect(&url).await;
    let in_table: HashSet<String> = c
        .query("SELECT body FROM orders", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lost_by_crash = outcomes.committed.difference(&in_table).count();
    if commits == Commits::Durable {
        let missing: Vec<_> = outcomes.committed.difference(&in_table).take(5).collect();
        assert!(
            missing.is_empty(),
            "committed rows lost by the crash (the cluster commits durably): {missing:?}"
        );
    }
    let stray: Vec<_> = in_table
        .difference(&outcomes.committed)
        .filter(|b| !outcomes.uncertain.contains(*b))
        .take(5)
        .collect();
    assert!(stray.is_empty(), "rows of rolled-back writes: {stray:?}");

    // The stream delivers exactly that, each once, in order.
    read_rest(&mut s, &mut got, &in_table, Duration::from_secs(10)).await;
    eprintln!(
        "{commits:?}: {} changes ({} received before the crash, {pending} commits pending at \
         it), {} rows committed with COMMIT Ok ({lost_by_crash} lost by the crash), {} \
         uncertain, {} failed attempts",
        got.len(),
        at_crash,
        outcomes.committed.len(),
        outcomes.uncertain.len(),
        outcomes.failures
    );
    let delivered: Vec<String> = got.iter().map(body).collect();
    let unique: HashSet<&String> = delivered.iter().collect();
    let in_table: HashSet<&String> = in_table.iter().collect();
    let lost: Vec<_> = in_table.difference(&unique).take(5).collect();
    let taken_back: Vec<_> = unique.difference(&in_table).take(5).collect();
    assert!(
        lost.is_empty() && taken_back.is_empty(),
        "the stream delivers exactly what the database holds: {} rows never delivered \
         (e.g. {lost:?}), {} delivered and then lost by the crash (e.g. {taken_back:?})",
        in_table.difference(&unique).count(),
        unique.difference(&in_table).count()
    );
    assert_eq!(
        unique.len(),
        delivered.len(),
        "a change was delivered twice"
    );
    assert_order(&got);

    // Positions issued after the crash are above those before, and none was reused:
    // resuming from before the crash replays exactly the suffix with the same positions,
    // on this gateway and on a fresh one that never saw the old positions.
    let max_before = position(&got[at_crash - 1]);
    assert!(got[at_crash..].iter().all(|c| position(c) > max_before));
    let from = got
        .iter()
        .position(|c| c["position"] == resume_from.as_str())
        .unwrap();
    let fresh = Gateway::start_with(sources(&url)).await;
    for g in [&gw, &fresh] {
        let mut r = g.resume("acme", "", &resume_from).await;
        assert_eq!(r.status, 200, "{}", r.raw);
        let replayed = r.until_live().await;
        assert!(
            replayed == got[from + 1..],
            "resuming after {resume_from} replays exactly the suffix ({} changes, got {})",
            got.len() - from - 1,
            replayed.len()
        );
        let mut all = g.resume("acme", "", "0.0").await;
        assert!(
            all.until_live().await == got,
            "the journal from the start is exactly what the stream delivered"
        );
    }
    fresh.stop().await;
    gw.stop().await;
    drop((s, admin, holder, c));
    let cluster = Arc::try_unwrap(cluster).expect("the only handle on the cluster");
    tokio::task::spawn_blocking(move || cluster.stop())
        .await
        .unwrap()
        .expect("stopping the cluster");
    eprintln!("took {:?}", started.elapsed());
}
