//! The listener's pace: after reading, whether it goes to sleep (arms the doorbell and
//! waits at the barrier for writers that saw it awake) or, under load, lingers and keeps
//! reading so that writers send no NOTIFY ([`Pace`]); the thresholds, the arming SQL and
//! the pauses that `Listener::settle` follows. Pure bookkeeping: it never touches the
//! connection.

use std::time::Duration;

use tokio::time::Instant;

/// Says a gateway sleeps (`pgfeed.armed`, a sequence: set at once, outside any
/// transaction): from now on the first writer to commit rings the doorbell. Committed
/// asynchronously: `setval` gives its transaction an id, whose commit would otherwise
/// wait for a disk flush every time the gateway goes to sleep (a flag lost in a crash is
/// set again when the listener reconnects).
pub(super) const ARM: &str = "SELECT pg_catalog.set_config('synchronous_commit', 'off', true),
                          pg_catalog.setval('pgfeed.armed', 1)";

/// Waits for the commits of writers that saw this gateway awake (sql/functions.sql).
pub(super) const BARRIER: &str = "SELECT pgfeed.barrier($1)";

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
pub(super) const LINGER_POLL: Duration = Duration::from_millis(1);
const BUSY_COMMITS: usize = 60;
pub(super) const CONTENDED_BARRIER: Duration = Duration::from_millis(5);

/// Longest `settle` reads before it lets the listener handle other things.
pub(super) const SETTLE_SLICE: Duration = Duration::from_millis(250);

/// Pauses between barriers that timed out: doubling from the first to the second while
/// they keep timing out (the gateway reads between them meanwhile).
pub(super) const BARRIER_PAUSE_MIN: Duration = Duration::from_millis(10);
pub(super) const BARRIER_PAUSE_MAX: Duration = Duration::from_secs(1);

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
    /// A read at `now` published `commits` commits.
    pub(super) fn read(&mut self, now: Instant, commits: usize) {
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
    pub(super) fn contended(&mut self, now: Instant) {
        self.until = Some(now + LINGER);
    }

    /// Whether to linger (keep reading) rather than arm and sleep at `now`.
    pub(super) fn busy(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| now < until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lingers_at_the_busy_rate_or_after_contention_and_for_linger_after() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut pace = Pace::default();
        assert!(!pace.busy(t0), "idle at first");
        pace.read(t0, BUSY_COMMITS - 1);
        assert!(!pace.busy(t0), "below the rate");
        // Commits older than LINGER no longer count.
        pace.read(ms(25), 1);
        assert!(!pace.busy(ms(25)));
        pace.read(ms(30), BUSY_COMMITS - 1);
        assert!(pace.busy(ms(30)), "the busy rate within LINGER");
        assert!(pace.busy(ms(49)));
        assert!(!pace.busy(ms(50)), "LINGER after the last sign");
        let mut pace = Pace::default();
        pace.contended(t0);
        assert!(
            pace.busy(ms(19)) && !pace.busy(ms(20)),
            "a contended barrier"
        );
    }
}
