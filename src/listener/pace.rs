//! The listener's pace: after reading, whether it goes to sleep (arms the doorbell and
//! waits at the barrier for writers that saw it awake) or, under load, lingers and keeps
//! reading so that writers send no NOTIFY ([`Pace`]).

use std::time::Duration;

use tokio::time::Instant;

use super::{Listener, ListenerError};
use crate::change::Position;

/// Says a gateway sleeps (`pgfeed.armed`, a sequence: set at once, outside any
/// transaction): from now on the first writer to commit rings the doorbell. Committed
/// asynchronously: `setval` gives its transaction an id, whose commit would otherwise
/// wait for a disk flush every time the gateway goes to sleep (a flag lost in a crash is
/// set again when the listener reconnects).
const ARM: &str = "SELECT pg_catalog.set_config('synchronous_commit', 'off', true),
                          pg_catalog.setval('pgfeed.armed', 1)";

/// Waits for the commits of writers that saw this gateway awake (sql/functions.sql).
const BARRIER: &str = "SELECT pgfeed.barrier($1)";

/// Longest a writer may wait at the barrier, in milliseconds: one commit's time is enough,
/// and a barrier that times out only means the gateway stays awake and reads again.
pub const BARRIER_TIMEOUT_MS: i32 = 20;

/// Under load the listener does not go to sleep between commits: arming costs writers a
/// wait at the barrier and a doorbell each, which at a high rate of commits from many
/// writers is the serialization capture must avoid. It lingers, reading every
/// [`LINGER_POLL`], while it has seen at least [`BUSY_COMMITS`] commits within the last
/// [`LINGER`] (3 000 a second), or after a barrier that waited on writers for longer than
/// [`CONTENDED_BARRIER`] or timed out; and for [`LINGER`] after the last such sign. Below
/// that rate it arms as soon as a read comes back empty, so that each commit is read the
/// moment its doorbell rings (latency near the raw NOTIFY floor).
const LINGER: Duration = Duration::from_millis(20);
const LINGER_POLL: Duration = Duration::from_millis(1);
const BUSY_COMMITS: usize = 60;
const CONTENDED_BARRIER: Duration = Duration::from_millis(5);

/// Longest `settle` reads before it lets the listener handle other things.
const SETTLE_SLICE: Duration = Duration::from_millis(250);

/// Pauses between barriers that timed out: doubling from the first to the second while
/// they keep timing out (the gateway reads between them meanwhile).
const BARRIER_PAUSE_MIN: Duration = Duration::from_millis(10);
const BARRIER_PAUSE_MAX: Duration = Duration::from_secs(1);

impl Listener {
    /// Reads until a read comes back empty, then goes to sleep without missing a commit:
    /// sets `pgfeed.armed` (writers from then on ring the doorbell),
    /// waits at the barrier for the commits of writers that saw it awake
    /// (`pgfeed.barrier`, sql/functions.sql), and reads once more. Changes in that read
    /// mean writers are coming: it stays awake and goes round again. Under load ([`Pace`])
    /// it lingers instead of arming, reading every [`LINGER_POLL`], and writers send no
    /// NOTIFY; idle, it sleeps until one rings. A writer waits on this only at the
    /// barrier, for at most [`BARRIER_TIMEOUT_MS`].
    ///
    /// Returns false once asleep, or true after [`SETTLE_SLICE`] of reading with writes
    /// still coming, so that the caller can handle what else is due and call it again.
    pub(super) async fn settle(
        &self,
        client: &tokio_postgres::Client,
        last: &mut Position,
        pace: &mut Pace,
    ) -> Result<bool, ListenerError> {
        let started = Instant::now();
        // After a barrier that timed out, writers are not kept waiting behind the next one
        // at once: a transaction that lingers in its commit (its own deferred triggers, a
        // prepared transaction) would otherwise hold every writer up at each attempt.
        let mut pause = BARRIER_PAUSE_MIN;
        loop {
            if started.elapsed() >= SETTLE_SLICE {
                return Ok(true);
            }
            let read = self.catch_up(last).await?;
            pace.read(Instant::now(), read.commits);
            if pace.busy(Instant::now()) {
                // Back to back while reads find changes; a pause after an empty one.
                if read.changes == 0 {
                    tokio::time::sleep(LINGER_POLL).await;
                }
                continue;
            }
            // Everything committed before that read is published; the barrier's read
            // finds what came meanwhile.
            // Pipelined: one round trip; the flag is set before the barrier starts.
            let arming = Instant::now();
            // Bounded like the health check: a connection that went silent must not hold
            // the listener here, where no health tick can reach it.
            let arm = futures_util::future::try_join(
                client.query_one(ARM, &[]),
                client.query_one(BARRIER, &[&BARRIER_TIMEOUT_MS]),
            );
            let (_, passed) = tokio::time::timeout(self.health_interval * 2, arm)
                .await
                .map_err(|_| ListenerError::Unresponsive)?
                .map_err(ListenerError::Connection)?;
            let passed: bool = passed.try_get(0).map_err(ListenerError::Connection)?;
            if passed {
                if arming.elapsed() > CONTENDED_BARRIER {
                    pace.contended(Instant::now());
                }
                let read = self.catch_up(last).await?;
                pace.read(Instant::now(), read.commits);
                if read.changes == 0 {
                    return Ok(false);
                }
            } else {
                self.metrics.barrier_timeouts.inc();
                pace.contended(Instant::now());
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(BARRIER_PAUSE_MAX);
            }
        }
    }
}

/// Whether the listener is under load, so lingers rather than sleeps (see [`LINGER`]).
#[derive(Debug, Default)]
pub(super) struct Pace {
    /// When reads within the last [`LINGER`] published commits, and how many.
    recent: std::collections::VecDeque<(Instant, usize)>,
    /// Commits in `recent`.
    commits: usize,
    /// Lingers until then.
    until: Option<Instant>,
}

impl Pace {
    fn read(&mut self, now: Instant, commits: usize) {
        while let Some(&(at, n)) = self.recent.front() {
            if now.duration_since(at) < LINGER {
                break;
            }
            self.recent.pop_front();
            self.commits -= n;
        }
        if commits > 0 {
            self.recent.push_back((now, commits));
            self.commits += commits;
        }
        if self.commits >= BUSY_COMMITS {
            self.until = Some(now + LINGER);
        }
    }

    /// Writers were in the way of the barrier.
    fn contended(&mut self, now: Instant) {
        self.until = Some(now + LINGER);
    }

    fn busy(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| now < until)
    }
}
