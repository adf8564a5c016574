//! Writers never wait on the gateway, and watching a table does not serialize commits
//! (issue 16; ARCHITECTURE.md, "Positions, and commits that never wait on each other").
//!
//! Both tests measure throughput, so they compare rates inside one run (never against a
//! fixed speed of this machine), with bounds generous enough for a noisy 2-core machine,
//! and they take turns.

use pgfeed_testkit as support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::poll_fn;
use pgfeed::change::Position;
use support::{ChildGateway, Run, SOON, TestDb};
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

/// Throughput is measured: one test at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What a stream delivered: a change's position and body, or any other event but `live`.
type Delivered = Result<(Position, String), String>;

/// Opens `acme`'s whole stream on the gateway at `addr` and reads it up to `live`; then
/// reads it on a thread of its own (so that parsing a fast stream does not delay the
/// writers measured here) and sends what it delivers. Also counts the changes.
async fn read_stream(addr: SocketAddr) -> (mpsc::UnboundedReceiver<Delivered>, Arc<AtomicUsize>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (live_tx, live_rx) = tokio::sync::oneshot::channel();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&count);
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let auth = format!("Bearer {}", support::hs256_token("acme"));
            let mut s =
                support::assert_streams(addr, "/v1/stream", &[("Authorization", &auth)]).await;
            let _ = live_tx.send(());
            // Ends when the stream does (or after a minute of silence); the receiver then
            // sees the channel close.
            while let Some(e) = s.next_within(Duration::from_secs(60)).await {
                let item = match e.event.as_str() {
                    "change" => {
                        let data = e.json();
                        let position = data["position"].as_str().unwrap().parse().unwrap();
                        counted.fetch_add(1, Ordering::SeqCst);
                        Ok((position, data["new"]["body"].as_str().unwrap().to_string()))
                    }
                    _ => Err(format!("{e:?}")),
                };
                if tx.send(item).is_err() {
                    return;
                }
            }
        });
    });
    live_rx.await.expect("the stream opens and goes live");
    (rx, count)
}

/// Receives from `rx` until `expected` changes came, then for `quiet` more: everything it
/// got, in order. Fails on any event but a change, and when they do not come within [`SOON`].
async fn delivered(
    rx: &mut mpsc::UnboundedReceiver<Delivered>,
    got: &mut Vec<(Position, String)>,
    expected: usize,
    quiet: Duration,
) {
    let deadline = tokio::time::Instant::now() + SOON;
    while got.len() < expected {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Ok(change))) => got.push(change),
            Ok(Some(Err(event))) => panic!("the stream sent {event}"),
            Ok(None) => panic!("the stream ended after {} of {expected} changes", got.len()),
            Err(_) => panic!(
                "{} of {expected} changes delivered within {SOON:?}",
                got.len()
            ),
        }
    }
    // Anything more is a duplicate (or a change nobody committed).
    while let Ok(Some(item)) = tokio::time::timeout(quiet, rx.recv()).await {
        match item {
            Ok(change) => got.push(change),
            Err(event) => panic!("the stream sent {event}"),
        }
    }
}

/// Counts doorbells (NOTIFY on channel `pgfeed`, `watch` doorbells aside) as one more
/// listener on `url` would hear them.
async fn count_doorbells(url: &str) -> (tokio_postgres::Client, Arc<AtomicU64>) {
    let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connecting the doorbell counter");
    let count = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&count);
    tokio::spawn(async move {
        while let Some(Ok(message)) = poll_fn(|cx| connection.poll_message(cx)).await {
            if let AsyncMessage::Notification(n) = message
                && n.channel() == "pgfeed"
                && n.payload() != "watch"
            {
                counted.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    client.run("LISTEN pgfeed").await;
    (client, count)
}

/// One committed insert: when it was sent, how long it took to commit, its body.
struct Commit {
    sent: Instant,
    took: Duration,
    body: String,
}

/// Writers inserting one row per transaction into `orders` as fast as they can, each on
/// its own connection, with bodies `w<writer>-<n>` (n counting from 1).
struct Writers {
    paused: Arc<AtomicBool>,
    /// Writers inside an insert (or about to start one).
    active: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    /// Commits so far.
    committed: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Commit>>>,
}

impl Writers {
    async fn start(db: &TestDb, count: usize) -> Writers {
        let paused = Arc::new(AtomicBool::new(false));
        let active = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for w in 0..count {
            let client = db.client().await;
            let (paused, active, stop, committed) = (
                paused.clone(),
                active.clone(),
                stop.clone(),
                committed.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let insert = client
                    .prepare("INSERT INTO orders (tenant, body) VALUES ('acme', $1)")
                    .await
                    .unwrap();
                let mut done = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    // Counted in before looking at `paused`, so that once `pause` saw no
                    // writer active, none starts an insert.
                    active.fetch_add(1, Ordering::SeqCst);
                    if paused.load(Ordering::SeqCst) {
                        active.fetch_sub(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        continue;
                    }
                    let body = format!("w{w}-{}", done.len() + 1);
                    let sent = Instant::now();
                    client
                        .execute(&insert, &[&body])
                        .await
                        .unwrap_or_else(|e| panic!("insert {body}: {e}"));
                    let took = sent.elapsed();
                    committed.fetch_add(1, Ordering::SeqCst);
                    active.fetch_sub(1, Ordering::SeqCst);
                    done.push(Commit { sent, took, body });
                }
                done
            }));
        }
        Writers {
            paused,
            active,
            stop,
            committed,
            tasks,
        }
    }

    /// Pauses them and waits until no insert is under way.
    async fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        support::eventually("the writers pause", || async {
            self.active.load(Ordering::SeqCst) == 0
        })
        .await;
    }

    fn committed(&self) -> usize {
        self.committed.load(Ordering::SeqCst)
    }

    fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }

    /// Stops them: every writer's commits, in its order.
    async fn finish(self) -> Vec<Vec<Commit>> {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Vec::new();
        for task in self.tasks {
            all.push(
                tokio::time::timeout(SOON, task)
                    .await
                    .expect("a writer ends")
                    .expect("a writer"),
            );
        }
        all
    }
}

/// A stretch of time the writers' commits are measured in, by when they were sent.
struct Window {
    name: &'static str,
    start: Instant,
    end: Instant,
    /// Doorbells heard during it.
    doorbells: u64,
}

/// Commits per second and the slowest commit among those sent during `w`.
fn measure(commits: &[Vec<Commit>], w: &Window) -> (f64, Duration) {
    let inside = commits
        .iter()
        .flatten()
        .filter(|c| c.sent >= w.start && c.sent < w.end);
    let (n, worst) = inside.fold((0usize, Duration::ZERO), |(n, worst), c| {
        (n + 1, worst.max(c.took))
    });
    (n as f64 / (w.end - w.start).as_secs_f64(), worst)
}

/// `pgfeed.armed` is set: the gateway armed the doorbell and goes to sleep.
async fn armed(c: &tokio_postgres::Client) -> bool {
    let row = c
        .query_one("SELECT last_value FROM pgfeed.armed", &[])
        .await
        .unwrap_or_else(|e| panic!("reading pgfeed.armed: {}", support::server_message(&e)));
    row.get::<_, i64>(0) == 1
}

async fn notification_queue_usage(c: &tokio_postgres::Client) -> f64 {
    c.query_one("SELECT pg_notification_queue_usage()", &[])
        .await
        .unwrap()
        .get(0)
}

/// A gateway frozen with SIGSTOP, once just after it armed its doorbell and went to
/// sleep, once in the middle of reading a backlog, does not slow the application: writers
/// commit at the pace they had with the gateway running and none waits long, the doorbell
/// rings at most a few times while it is stopped (not once per commit), and once resumed
/// the stream delivers every committed change exactly once, in commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_gateway_neither_slows_nor_stalls_writers_and_misses_nothing() {
    let _turn = ONE_AT_A_TIME.lock().await;
    const WRITERS: usize = 4;
    const RUNNING: Duration = Duration::from_secs(4);
    // Two stops make the stopped window, as long as the running one.
    const STOPPED: Duration = Duration::from_secs(2);
    const RESUMED: Duration = Duration::from_secs(4);
    // The slowest commit allowed: the arming barrier may hold a writer for its timeout
    // (100 ms) and one commit; a writer waiting on the stopped gateway waits for seconds.
    const WORST: Duration = Duration::from_secs(1);

    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    // Small reads, so that the gateway is often inside one when it is stopped.
    let gw = ChildGateway::start(&db, &[("PGFEED_JOURNAL_BATCH_SIZE", "500")]).await;
    let (mut stream, received) = read_stream(gw.addr).await;
    let (_counter, doorbells) = count_doorbells(&db.url).await;
    let admin = db.client().await;

    let writers = Writers::start(&db, WRITERS).await;
    let mut windows = Vec::new();
    let mut window = |name, start: Instant, rung_before: u64| {
        windows.push(Window {
            name,
            start,
            end: Instant::now(),
            doorbells: doorbells.load(Ordering::SeqCst) - rung_before,
        })
    };

    // Running: the gateway reads back to back, or arms and sleeps when a read finds nothing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (start, rung) = (Instant::now(), doorbells.load(Ordering::SeqCst));
    tokio::time::sleep(RUNNING).await;
    window("running", start, rung);

    // Idle until the gateway arms its doorbell, then stopped at once: writers that find
    // it asleep ring it; the first one only.
    writers.pause().await;
    let before_stop = writers.committed();
    support::eventually("the gateway arms its doorbell", || armed(&admin)).await;
    gw.signal("STOP");
    let (start, rung) = (Instant::now(), doorbells.load(Ordering::SeqCst));
    writers.resume();
    tokio::time::sleep(STOPPED).await;
    window("stopped asleep", start, rung);
    let usage_asleep = notification_queue_usage(&admin).await;

    // Resumed, it reads the backlog; stopped again as soon as it delivers from it (it had
    // delivered everything before, or it would not have armed).
    let backlog = writers.committed();
    gw.signal("CONT");
    let deadline = Instant::now() + SOON;
    while received.load(Ordering::SeqCst) <= before_stop {
        assert!(Instant::now() < deadline, "nothing delivered after SIGCONT");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    gw.signal("STOP");
    let read_so_far = received.load(Ordering::SeqCst);
    assert!(
        read_so_far < backlog,
        "stopped while reading the backlog: {read_so_far} of {backlog} delivered"
    );
    let (start, rung) = (Instant::now(), doorbells.load(Ordering::SeqCst));
    tokio::time::sleep(STOPPED).await;
    window("stopped reading", start, rung);
    let usage_reading = notification_queue_usage(&admin).await;

    gw.signal("CONT");
    let (start, rung) = (Instant::now(), doorbells.load(Ordering::SeqCst));
    tokio::time::sleep(RESUMED).await;
    window("resumed", start, rung);
    let commits = writers.finish().await;

    // Every committed change exactly once, in commit order: positions strictly increase,
    // and each writer's commits (which never overlapped) come in the order they were made.
    let committed: usize = commits.iter().map(Vec::len).sum();
    let mut got = Vec::new();
    delivered(&mut stream, &mut got, committed, Duration::from_millis(500)).await;
    assert_eq!(got.len(), committed, "changes delivered, committed");
    for pair in got.windows(2) {
        assert!(
            pair[0].0 < pair[1].0,
            "positions increase: {:?} then {:?}",
            pair[0],
            pair[1]
        );
    }
    let bodies: HashSet<&str> = got.iter().map(|(_, b)| b.as_str()).collect();
    assert_eq!(bodies.len(), committed, "no change twice");
    for (w, mine) in commits.iter().enumerate() {
        let prefix = format!("w{w}-");
        let order: Vec<&str> = got
            .iter()
            .filter(|(_, b)| b.starts_with(&prefix))
            .map(|(_, b)| b.as_str())
            .collect();
        let made: Vec<&str> = mine.iter().map(|c| c.body.as_str()).collect();
        assert!(
            order == made,
            "writer {w}: delivered in the order committed ({} delivered, {} committed)",
            order.len(),
            made.len()
        );
    }

    let reconnects = gw.metric("pgfeed_listener_reconnects_total").await;
    let measured: Vec<(&Window, f64, Duration)> = windows
        .iter()
        .map(|w| {
            let (rate, worst) = measure(&commits, w);
            (w, rate, worst)
        })
        .collect();
    let report = measured
        .iter()
        .map(|(w, rate, worst)| {
            format!(
                "{}: {rate:.0} commits/s, worst {worst:?}, {} doorbells",
                w.name, w.doorbells
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    println!(
        "{report}; {committed} changes; notification queue usage {usage_asleep} (asleep), \
         {usage_reading} (reading); stopped reading after {read_so_far} of {backlog} \
         changes; listener reconnects {reconnects:?}"
    );
    let running = measured[0].1;
    for (w, rate, worst) in &measured {
        assert!(
            *worst < WORST,
            "{}: a commit took {worst:?} (limit {WORST:?}): {report}",
            w.name
        );
        if w.name.starts_with("stopped") {
            // Half the stopped window: a stall of a second would show here too.
            assert!(
                *rate >= 0.5 * running,
                "{}: {rate:.0} commits/s, below half the {running:.0} with the gateway running: {report}",
                w.name
            );
            // The doorbell rings once per sleep, not per commit.
            assert!(
                w.doorbells <= 3,
                "{}: {} doorbells while the gateway was stopped: {report}",
                w.name,
                w.doorbells
            );
        }
    }
    // The stopped window (both stops), as long as the running one.
    let stopped = (measured[1].1 + measured[2].1) / 2.0;
    assert!(
        stopped >= 0.7 * running,
        "{stopped:.0} commits/s with the gateway stopped, below 70 % of {running:.0} with it running: {report}"
    );
    assert!(
        usage_asleep < 0.001 && usage_reading < 0.001,
        "the notification queue fills: {usage_asleep}, {usage_reading}"
    );
}

/// Watching a table does not serialize commits: with every flush made ~4 ms long
/// (`commit_delay`, a disk-independent stand-in for a slow disk), 8 writers inserting a
/// row per transaction into a watched table, with a gateway running and delivering, commit
/// at least half as fast as into a table nobody watches, which group commit lets go about
/// 8 commits per flush. A lock held through commit, or a NOTIFY from every commit (whose
/// lock PostgreSQL holds through the flush), would let one commit through per flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_commits_group_commit_like_unwatched_ones() {
    let _turn = ONE_AT_A_TIME.lock().await;
    const WRITERS: usize = 8;
    const WINDOW: Duration = Duration::from_millis(1500);
    const PLAIN: u8 = 1;
    const WATCHED: u8 = 2;
    const STOP: u8 = 3;

    // commit_delay does nothing without fsync, which the throwaway cluster turns off.
    let admin = support::connect(&support::server().url("postgres")).await;
    let fsync = || async {
        let c = support::connect(&support::server().url("postgres")).await;
        c.query_one("SHOW fsync", &[])
            .await
            .unwrap()
            .get::<_, String>(0)
            == "on"
    };
    if support::server().cluster.is_some() {
        admin.run("ALTER SYSTEM SET fsync = on").await;
        admin.run("SELECT pg_reload_conf()").await;
        support::eventually("fsync is on", fsync).await;
    } else {
        assert!(
            fsync().await,
            "this test needs fsync = on (commit_delay does nothing without it) on the server \
             of PGFEED_TEST_DATABASE_URL"
        );
    }

    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    db.client()
        .await
        .run("CREATE TABLE plain (id serial PRIMARY KEY, tenant text NOT NULL, body text, secret text)")
        .await;
    let gw = ChildGateway::start(&db, &[]).await;
    let (mut stream, _) = read_stream(gw.addr).await;

    let target = Arc::new(AtomicU8::new(0));
    let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let client = db.client().await;
        // commit_delay is a superuser's setting (the tests connect as one); commit_siblings
        // 0 makes every commit wait for it, even with fewer than 5 others in a transaction.
        client
            .run("SET synchronous_commit = on; SET commit_delay = 4000; SET commit_siblings = 0")
            .await;
        let (target, counts) = (target.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            let plain = client
                .prepare("INSERT INTO plain (tenant, body) VALUES ('acme', $1)")
                .await
                .unwrap();
            let watched = client
                .prepare("INSERT INTO orders (tenant, body) VALUES ('acme', $1)")
                .await
                .unwrap();
            let mut n = 0;
            loop {
                let table = target.load(Ordering::SeqCst);
                let insert = match table {
                    PLAIN => &plain,
                    WATCHED => &watched,
                    STOP => return,
                    _ => {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                };
                n += 1;
                client
                    .execute(insert, &[&format!("w{w}-{n}")])
                    .await
                    .unwrap_or_else(|e| panic!("insert: {e}"));
                counts[usize::from(table)].fetch_add(1, Ordering::SeqCst);
            }
        }));
    }

    // Warm both up, then alternate (plain, watched, watched, plain, plain, watched), so that
    // a drift of the machine's speed weighs on both alike.
    for table in [PLAIN, WATCHED] {
        target.store(table, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut totals = [(0u64, Duration::ZERO); 3];
    let mut report = Vec::new();
    for table in [PLAIN, WATCHED, WATCHED, PLAIN, PLAIN, WATCHED] {
        target.store(table, Ordering::SeqCst);
        let (start, before) = (
            Instant::now(),
            counts[usize::from(table)].load(Ordering::SeqCst),
        );
        tokio::time::sleep(WINDOW).await;
        let (took, n) = (
            start.elapsed(),
            counts[usize::from(table)].load(Ordering::SeqCst) - before,
        );
        let total = &mut totals[usize::from(table)];
        *total = (total.0 + n, total.1 + took);
        let name = if table == PLAIN { "plain" } else { "watched" };
        report.push(format!("{name} {:.0}/s", n as f64 / took.as_secs_f64()));
    }
    target.store(STOP, Ordering::SeqCst);
    for task in tasks {
        tokio::time::timeout(SOON, task)
            .await
            .expect("a writer ends")
            .expect("a writer");
    }
    if support::server().cluster.is_some() {
        admin.run("ALTER SYSTEM RESET fsync").await;
        admin.run("SELECT pg_reload_conf()").await;
    }

    // The gateway delivered every watched commit, once.
    let committed = counts[usize::from(WATCHED)].load(Ordering::SeqCst) as usize;
    let mut got = Vec::new();
    delivered(&mut stream, &mut got, committed, Duration::from_millis(300)).await;
    assert_eq!(got.len(), committed, "changes delivered, committed");

    let rate = |(n, took): (u64, Duration)| n as f64 / took.as_secs_f64();
    let (plain, watched) = (
        rate(totals[usize::from(PLAIN)]),
        rate(totals[usize::from(WATCHED)]),
    );
    let ratio = watched / plain;
    println!(
        "commit_delay 4 ms, {WRITERS} writers: plain {plain:.0} commits/s, watched {watched:.0} \
         ({:.0} %); windows: {}",
        ratio * 100.0,
        report.join(", ")
    );
    assert!(
        ratio >= 0.5,
        "watched commits at {:.0} % of unwatched ({watched:.0}/s against {plain:.0}/s; \
         windows: {}): watched commits wait on each other",
        ratio * 100.0,
        report.join(", ")
    );
}
