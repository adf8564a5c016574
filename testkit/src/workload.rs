//! What the randomized isolation tests share (`tests/isolation.rs`,
//! `tests/isolation_filters.rs`): a seeded RNG ([`Rng`], rand's xoshiro256++, so that a seed
//! replays a run), readers that drain every stream while the workload runs ([`Reader`]),
//! and the check that each stream received exactly the events the test's model computed,
//! in order and nothing after, each change at one position for every stream and positions
//! in the workload's order ([`check_stream`], [`Positions`]).

use std::collections::HashMap;
use std::time::Duration;

use futures_util::future::join_all;
use pgfeed::change::Position;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::{Event, SOON, SseClient};

/// A deterministic RNG for workloads: the same seed gives the same run.
pub struct Rng(Xoshiro256PlusPlus);

impl Rng {
    /// The RNG of `seed`.
    pub fn seeded(seed: u64) -> Rng {
        Rng(Xoshiro256PlusPlus::seed_from_u64(seed))
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        self.0.random_range(0..n)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: i32, hi: i32) -> i32 {
        self.0.random_range(lo..=hi)
    }

    /// True with probability `pct` percent.
    pub fn chance(&mut self, pct: u32) -> bool {
        self.0.random_ratio(pct, 100)
    }

    /// One of `items`, uniformly.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    /// A random non-empty subset of `0..n`, in increasing order.
    pub fn subset(&mut self, n: usize) -> Vec<usize> {
        loop {
            let s: Vec<usize> = (0..n).filter(|_| self.chance(50)).collect();
            if !s.is_empty() {
                return s;
            }
        }
    }
}

/// The seed of a randomized test: `PGFEED_TEST_SEED` to replay a run, else a new one from
/// the clock. Printed (with how to replay it) as `test: seed N`.
pub fn seed(test: &str) -> u64 {
    let seed = match std::env::var("PGFEED_TEST_SEED") {
        Ok(s) if !s.is_empty() => s.parse().expect("PGFEED_TEST_SEED is a u64"),
        _ => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    };
    eprintln!("{test}: seed {seed} (replay with PGFEED_TEST_SEED={seed})");
    seed
}

/// Strips what a test cannot predict (position, commit time) from a received event.
pub fn comparable(event: &Value) -> Value {
    let mut v = event.clone();
    let obj = v.as_object_mut().unwrap();
    obj.remove("position");
    obj.remove("committed_at");
    v
}

/// One line per event, for failure messages.
fn summary(v: &Value) -> String {
    format!(
        "{} {} {} pk={} new={} old={}",
        v["op"].as_str().unwrap_or("?"),
        v["table"].as_str().unwrap_or("?"),
        v["tenant"],
        v["pk"],
        v["new"],
        v["old"]
    )
}

/// Asserts that the journal of the database behind `c` holds exactly `changes` changes,
/// the number the test's model counted (`what` prefixes the message, e.g. the seed).
pub async fn assert_journal_holds(c: &tokio_postgres::Client, changes: usize, what: &str) {
    let journaled = crate::journal_len(c).await;
    assert_eq!(
        journaled as usize, changes,
        "{what}the model and the journal agree on the number of changes"
    );
}

/// For each of `subs`, the indexes into `all` of the changes it must receive (those
/// `wants` says it does), in the workload's order.
pub fn wanted<S, C>(subs: &[S], all: &[C], wants: impl Fn(&S, &C) -> bool) -> Vec<Vec<usize>> {
    subs.iter()
        .map(|s| (0..all.len()).filter(|&i| wants(s, &all[i])).collect())
        .collect()
}

/// A stream read into a channel by a task of its own, from when it is live until
/// [`Reader::finish`], so that every stream is read while the workload runs.
pub struct Reader {
    events: mpsc::UnboundedReceiver<Event>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<SseClient>,
}

impl Reader {
    /// Starts reading `stream`.
    pub fn spawn(mut stream: SseClient) -> Reader {
        let (tx, events) = mpsc::unbounded_channel();
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    event = stream.next_within(Duration::from_secs(3600)) => {
                        let Some(event) = event else { break };
                        if tx.send(event).is_err() {
                            break;
                        }
                    }
                    _ = &mut stopped => break,
                }
            }
            stream
        });
        Reader { events, stop, task }
    }

    /// Stops reading and gives the stream back (with all it received in `raw`).
    pub async fn finish(self) -> SseClient {
        let _ = self.stop.send(());
        self.task.await.expect("the reader task")
    }
}

/// What one stream received: the first `count` events (fewer if it ended or [`SOON`]
/// passed first), and the first event after them, if one came within `quiet`.
pub struct Received {
    /// The events expected to come.
    pub events: Vec<Event>,
    /// An event after them (there must be none).
    pub extra: Option<Event>,
}

/// Collects `counts[k]` events from `readers[k]`, all within [`SOON`], then waits `quiet`
/// for any event more on every stream at once.
pub async fn collect(readers: &mut [Reader], counts: &[usize], quiet: Duration) -> Vec<Received> {
    let deadline = tokio::time::Instant::now() + SOON;
    let mut received = Vec::new();
    for (reader, &count) in readers.iter_mut().zip(counts) {
        let mut events = Vec::with_capacity(count);
        while events.len() < count {
            match tokio::time::timeout_at(deadline, reader.events.recv()).await {
                Ok(Some(e)) => events.push(e),
                Ok(None) | Err(_) => break,
            }
        }
        received.push(events);
    }
    let extras = join_all(readers.iter_mut().map(|r| async move {
        tokio::time::timeout(quiet, r.events.recv())
            .await
            .ok()
            .flatten()
    }))
    .await;
    received
        .into_iter()
        .zip(extras)
        .map(|(events, extra)| Received { events, extra })
        .collect()
}

/// Asserts that stream `who` received exactly `expect` (event data without position and
/// time), in order and nothing after: every event a `change` whose `id:` is its position.
/// On a difference, shows the events around the first one. Returns the events' data.
#[track_caller]
pub fn check_stream(who: &str, received: &Received, expect: &[Value]) -> Vec<Value> {
    let got: Vec<Value> = received
        .events
        .iter()
        .map(|e| {
            assert_eq!(e.event, "change", "{who}: {e:?}");
            let data = e.json();
            assert_eq!(
                e.id.as_deref(),
                data["position"].as_str(),
                "{who}: id: equals the position"
            );
            data
        })
        .collect();
    let mismatch =
        got.len() != expect.len() || got.iter().zip(expect).any(|(g, e)| comparable(g) != *e);
    if mismatch {
        let first = got
            .iter()
            .zip(expect)
            .position(|(g, e)| comparable(g) != *e)
            .unwrap_or(got.len().min(expect.len()));
        // The events around the first difference, and what the test expected there.
        let window = |v: &[Value]| {
            v.iter()
                .enumerate()
                .skip(first.saturating_sub(3))
                .take(8)
                .map(|(n, e)| format!("#{n} {}", summary(e)))
                .collect::<Vec<_>>()
                .join("\n  ")
        };
        panic!(
            "{who}: received {} events, expected {}; first difference at #{first}\n\
             expected:\n  {}\nreceived:\n  {}",
            got.len(),
            expect.len(),
            window(expect),
            window(&got),
        );
    }
    if let Some(e) = &received.extra {
        panic!("{who}: an event after the expected ones: {e:?}");
    }
    got
}

/// The position at which the streams received each change of a workload (by its index).
#[derive(Default)]
pub struct Positions(HashMap<usize, String>);

impl Positions {
    /// Records that stream `who` received change #`i` as `event`: every stream receives a
    /// change at the same position.
    #[track_caller]
    pub fn record(&mut self, who: &str, i: usize, event: &Value) {
        let position = event["position"].as_str().unwrap().to_string();
        let first = self.0.entry(i).or_insert_with(|| position.clone());
        assert_eq!(
            *first, position,
            "{who}: change #{i} has one position for every subscriber"
        );
    }

    /// Asserts that positions increase in the workload's order; returns how many changes
    /// some stream received.
    #[track_caller]
    pub fn assert_in_order(&self, what: &str) -> usize {
        let mut seen: Vec<(usize, Position)> = self
            .0
            .iter()
            .map(|(&i, p)| (i, p.parse().unwrap()))
            .collect();
        seen.sort();
        assert!(
            seen.windows(2).all(|w| w[0].1 < w[1].1),
            "{what}positions increase in commit and statement order"
        );
        seen.len()
    }
}
