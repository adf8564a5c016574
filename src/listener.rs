//! The one LISTEN connection: receives doorbells, reads the changes they announce from
//! the journal, publishes them to the hub, and reports readiness.
//!
//! The connection is driven here with `poll_message` (a pooled client would drop
//! notifications). A doorbell's payload is never trusted: any ring just means "read the
//! journal after the last position published", so a forged NOTIFY at worst costs one
//! empty read. Rings that arrive while a read runs coalesce into one more read. On any
//! error the listener marks itself not ready, reconnects with capped exponential backoff
//! and jitter, LISTENs again and reads everything it missed before going live, so
//! subscribers see no gap. It never waits on a subscriber.
//!
//! Journal rows it cannot decode are skipped one by one, logged with their position and
//! counted (`pgfeed_malformed_changes_total`), so that one bad row never stops delivery.
//! When the pgfeed schema is gone (uninstalled under a running gateway), `/readyz` says
//! so and the listener retries until it is installed again; a journal that was recreated
//! meanwhile starts its positions over, so live streams are then sent `reset`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use futures_util::future::poll_fn;
use tokio::sync::{Notify, oneshot};
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::change::Position;
use crate::fanout::Hub;
use crate::journal::{Journal, JournalError};

/// The NOTIFY channel the seal trigger rings.
pub const CHANNEL: &str = "pgfeed";

/// Why a listener session ended.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// Connecting failed (with what the cause means for the settings, such as a
    /// certificate from a CA `sslrootcert` does not hold).
    #[error("cannot open the LISTEN connection")]
    Open(#[source] crate::db::DbError),
    /// Issuing LISTEN failed.
    #[error("cannot open the LISTEN connection")]
    Connect(#[source] tokio_postgres::Error),
    /// The connection failed while listening.
    #[error("the LISTEN connection failed")]
    Connection(#[source] tokio_postgres::Error),
    /// The server closed the connection.
    #[error("the LISTEN connection was closed by the server")]
    Closed,
    /// The health check's NOTIFY did not come back in time: the connection is silently
    /// dead (a network partition, a frozen peer).
    #[error("the LISTEN connection stopped answering (health check timed out)")]
    Unresponsive,
    /// Reading the announced changes failed.
    #[error("cannot read the journal")]
    Journal(#[source] JournalError),
}

impl ListenerError {
    /// Whether the session ended because the pgfeed schema is gone.
    fn schema_missing(&self) -> bool {
        matches!(self, ListenerError::Journal(err) if err.schema_missing())
    }
}

/// `application_name` of the LISTEN connection, so operators (and `pgfeed status`) can
/// tell it from pooled connections in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "pgfeed-listener";

/// The LISTEN connection's settings: the pool's, named [`APPLICATION_NAME`] unless the
/// operator chose a name.
pub fn connection_config(pool_config: &crate::db::DbConfig) -> crate::db::DbConfig {
    let mut config = pool_config.clone();
    if config.pg.get_application_name() == Some("pgfeed") {
        config.pg.application_name(APPLICATION_NAME);
    }
    config
}

/// `application_name` of the connection the listener reads the journal on (its own, not
/// one of the pool's, so that subscribers' reads never hold up the listener's).
pub const READER_APPLICATION_NAME: &str = "pgfeed-reader";

/// The settings of the listener's reading connection: the pool's (`pool_config`), named
/// [`READER_APPLICATION_NAME`] unless the operator chose a name.
pub fn reader_config(pool_config: &crate::db::DbConfig) -> crate::db::DbConfig {
    let mut config = pool_config.clone();
    if config.pg.get_application_name() == Some("pgfeed") {
        config.pg.application_name(READER_APPLICATION_NAME);
    }
    config
}

/// Why the listener is not ready, as `/readyz` explains it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotReady {
    /// Not connected to PostgreSQL (starting, reconnecting) or not caught up yet.
    Disconnected,
    /// Connected, but the pgfeed schema is gone: it was uninstalled.
    SchemaMissing,
    /// An essential task (the listener itself, pruning) ended unexpectedly: the process is
    /// exiting so that its supervisor restarts it. Final.
    Failed,
}

/// Whether the listener is connected and caught up, and if not why (`/readyz`).
#[derive(Debug, Default)]
pub struct Readiness(AtomicU8);

/// [`Readiness`] values (the default, 0, is disconnected).
const DISCONNECTED: u8 = 0;
const READY: u8 = 1;
const SCHEMA_MISSING: u8 = 2;
const FAILED: u8 = 3;

impl Readiness {
    /// True while connected and caught up.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire) == READY
    }

    /// Why the listener is not ready; `None` while it is.
    pub fn not_ready(&self) -> Option<NotReady> {
        match self.0.load(Ordering::Acquire) {
            READY => None,
            SCHEMA_MISSING => Some(NotReady::SchemaMissing),
            FAILED => Some(NotReady::Failed),
            _ => Some(NotReady::Disconnected),
        }
    }

    /// Marks the gateway failed for good (see [`NotReady::Failed`]).
    pub fn fail(&self) {
        self.0.store(FAILED, Ordering::Release);
    }

    /// Sets the state (`None`: ready) and returns the previous one.
    fn set(&self, state: Option<NotReady>) -> Option<NotReady> {
        let value = match state {
            None => READY,
            Some(NotReady::Disconnected) => DISCONNECTED,
            Some(NotReady::SchemaMissing) => SCHEMA_MISSING,
            Some(NotReady::Failed) => FAILED,
        };
        // A failed gateway stays failed.
        let before = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
                (old != FAILED).then_some(value)
            })
            .unwrap_or(FAILED);
        match before {
            READY => None,
            SCHEMA_MISSING => Some(NotReady::SchemaMissing),
            FAILED => Some(NotReady::Failed),
            _ => Some(NotReady::Disconnected),
        }
    }
}

/// The listener task's handles.
pub struct Listener {
    /// How to open the LISTEN connection.
    pub config: crate::db::DbConfig,
    /// Where announced changes are read.
    pub journal: Journal,
    /// Where they are published.
    pub hub: Arc<Hub>,
    /// Set while connected and caught up.
    pub readiness: Arc<Readiness>,
    /// How often the connection is checked with a NOTIFY to itself.
    pub health_interval: Duration,
    /// Reloaded on connect, on a `watch` doorbell and every [`CATALOG_REFRESH`].
    pub catalog: Arc<Catalog>,
    /// Reconnects, reads, events and dispatch latency are counted here.
    pub metrics: Arc<crate::metrics::Metrics>,
}

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

/// How often the catalog is reloaded even without a `watch` doorbell (for `ALTER TABLE`).
pub const CATALOG_REFRESH: Duration = Duration::from_secs(30);

impl Listener {
    /// Runs until `shutdown`, reconnecting after every failure.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut last = self.hub.head();
        let mut journal_id = None;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            let result = self
                .session(&mut last, &mut journal_id, &mut backoff, &shutdown)
                .await;
            match result {
                Ok(()) => {
                    self.readiness.set(Some(NotReady::Disconnected));
                    return;
                }
                Err(err) if err.schema_missing() => {
                    self.metrics.listener_reconnects.inc();
                    // Said once, not at every retry while it stays missing.
                    let before = self.readiness.set(Some(NotReady::SchemaMissing));
                    if before == Some(NotReady::SchemaMissing) {
                        tracing::debug!(cause = %crate::logging::Chain(&err), "the pgfeed schema is still missing");
                    } else {
                        tracing::error!(cause = %crate::logging::Chain(&err), "the pgfeed schema is gone (was it uninstalled?); run `pgfeed install`");
                    }
                }
                Err(err) => {
                    self.readiness.set(Some(NotReady::Disconnected));
                    self.metrics.listener_reconnects.inc();
                    tracing::warn!(cause = %crate::logging::Chain(&err), database = %crate::db::endpoint(&self.config), "listener lost; reconnecting");
                }
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One connection's life. Returns `Ok` only on shutdown. `journal_id` identifies the
    /// journal `last` belongs to ([`Journal::identity`]).
    async fn session(
        &self,
        last: &mut Position,
        journal_id: &mut Option<u32>,
        backoff: &mut Backoff,
        shutdown: &CancellationToken,
    ) -> Result<(), ListenerError> {
        let connect = tokio::time::timeout(self.health_interval * 2, self.config.connect());
        let (client, mut connection) = connect
            .await
            .map_err(|_| ListenerError::Unresponsive)?
            .map_err(|err| ListenerError::Open(crate::db::DbError::connect(&self.config, err)))?;
        // A channel of our own for the health check, so other replicas never hear it.
        let health_channel = format!("pgfeed_health_{:016x}", rand::random::<u64>());
        let bell = Arc::new(Notify::new());
        let echo = Arc::new(Notify::new());
        let watch_bell = Arc::new(Notify::new());
        let rewatch = Arc::clone(&watch_bell);
        let (lost_tx, mut lost_rx) = oneshot::channel();
        let (ring, answer, own) = (Arc::clone(&bell), Arc::clone(&echo), health_channel.clone());
        // The session's tasks; dropping the set when the session ends aborts them, so a
        // connection that went silent is not kept alive by a task waiting on it.
        let mut tasks = tokio::task::JoinSet::new();
        // Drives the connection and drains notifications as fast as they come, whatever
        // the rest of the gateway is doing, so PostgreSQL's notification queue never
        // fills because of us.
        tasks.spawn(async move {
            let outcome = loop {
                match poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) if n.channel() == own => {
                        answer.notify_one()
                    }
                    Some(Ok(AsyncMessage::Notification(n))) if n.payload() == "watch" => {
                        rewatch.notify_one()
                    }
                    Some(Ok(AsyncMessage::Notification(_))) => ring.notify_one(),
                    Some(Ok(_)) => {}
                    Some(Err(err)) => break ListenerError::Connection(err),
                    None => break ListenerError::Closed,
                }
            };
            let _ = lost_tx.send(outcome);
        });

        let client = Arc::new(client);
        let listen_sql = format!("LISTEN {CHANNEL}; LISTEN {health_channel}");
        tokio::time::timeout(self.health_interval * 2, client.batch_execute(&listen_sql))
            .await
            .map_err(|_| ListenerError::Unresponsive)?
            .map_err(ListenerError::Connect)?;
        // Everything committed before LISTEN took effect is in the journal: read it now.
        self.reload(last, journal_id).await?;
        let caught_up = self.catch_up(last).await?.changes;
        if self.readiness.set(None) == Some(NotReady::SchemaMissing) {
            tracing::info!("the pgfeed schema is installed again");
        }
        backoff.reset();
        tracing::info!(position = %last, changes = caught_up, "listener connected and caught up");
        // True while `settle` came back with writes still coming: the loop below then goes
        // on reading, after handling what else is due (shutdown, the health check, a
        // `watch` doorbell), rather than waiting for a doorbell nobody will ring.
        let mut pace = Pace::default();
        let mut busy = self.settle(&client, last, &mut pace).await?;

        let mut health = tokio::time::interval(self.health_interval);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut awaiting_echo = false;
        let mut refresh = tokio::time::interval_at(
            tokio::time::Instant::now() + CATALOG_REFRESH,
            CATALOG_REFRESH,
        );
        loop {
            // Biased: an echo that arrived while a long catch-up ran is seen before the
            // health tick that would otherwise call the connection dead.
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                lost = &mut lost_rx => {
                    return Err(lost.unwrap_or(ListenerError::Closed));
                }
                _ = echo.notified() => awaiting_echo = false,
                _ = bell.notified() => {
                    busy = self.settle(&client, last, &mut pace).await?;
                }
                _ = watch_bell.notified() => {
                    if self.reload(last, journal_id).await? {
                        busy = self.settle(&client, last, &mut pace).await?;
                    }
                }
                _ = refresh.tick() => {
                    if self.reload(last, journal_id).await? {
                        busy = self.settle(&client, last, &mut pace).await?;
                    }
                }
                _ = health.tick() => {
                    if awaiting_echo {
                        return Err(ListenerError::Unresponsive);
                    }
                    // A doorbell can be lost: the writer that rang may roll back after
                    // marking the gateway rung, while others skipped ringing. One seal and
                    // read per health check bounds how late such changes come.
                    if self.catch_up(last).await?.changes > 0 {
                        busy = self.settle(&client, last, &mut pace).await?;
                    }
                    while tasks.try_join_next().is_some() {}
                    // Not awaited here: its reply and the echo both come back through the
                    // connection driver, or neither does.
                    let (client, sql) = (Arc::clone(&client), format!("NOTIFY {health_channel}"));
                    tasks.spawn(async move {
                        let _ = client.batch_execute(&sql).await;
                    });
                    awaiting_echo = true;
                }
                _ = std::future::ready(()), if busy => {
                    busy = self.settle(&client, last, &mut pace).await?;
                }
            }
        }
    }

    /// Reloads the catalog and checks that the journal is still the one `last` belongs to
    /// (`journal_id`, [`Journal::identity`]). Returns true when it was recreated.
    async fn reload(
        &self,
        last: &mut Position,
        journal_id: &mut Option<u32>,
    ) -> Result<bool, ListenerError> {
        self.catalog
            .reload(&self.journal)
            .await
            .map_err(ListenerError::Journal)?;
        let id = self
            .journal
            .identity()
            .await
            .map_err(ListenerError::Journal)?;
        let recreated = journal_id.is_some_and(|known| known != id);
        if recreated {
            // Uninstalled and installed again: positions started over, so `last` and
            // every stream's position belong to a journal that is gone. Go on from the
            // new journal's head; streams are sent `reset` (refetch, then continue from
            // there).
            let head = self.journal.head().await.map_err(ListenerError::Journal)?;
            tracing::warn!(previous = %last, position = %head, "the pgfeed journal was recreated (the schema was reinstalled); live streams are sent reset");
            *last = head;
            self.hub.restart(head);
        }
        *journal_id = Some(id);
        Ok(recreated)
    }

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
    async fn settle(
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

    /// Seals, then reads and publishes everything after `last`, batch by batch. Returns
    /// how many changes and commits it published.
    async fn catch_up(&self, last: &mut Position) -> Result<CaughtUp, ListenerError> {
        let mut total = CaughtUp::default();
        loop {
            self.metrics.journal_read("listener");
            let batch = self
                .journal
                .seal_and_read(*last)
                .await
                .map_err(ListenerError::Journal)?;
            if batch.void {
                // A database crash took back the numbering that gave out `last` (sql/
                // functions.sql, pgfeed.seal): the commits after the newest one that
                // survived carry other numbers now. Start over from the head; streams
                // are sent reset, as after a reinstall.
                let head = self.journal.head().await.map_err(ListenerError::Journal)?;
                tracing::warn!(previous = %last, position = %head, "the database crashed and lost the numbering of changes this gateway published; live streams are sent reset");
                *last = head;
                self.hub.restart(head);
                continue;
            }
            if batch.pruned > *last {
                // Only possible when the listener was away for longer than the retention:
                // subscribers connected throughout missed changes. The hub closes their
                // channels, so each catches up from the journal and is sent `reset`.
                tracing::error!(position = %last, pruned = %batch.pruned, "changes were pruned before the listener published them; live streams are sent reset");
                self.hub.gap(batch.pruned);
                // Read on from the watermark, so that the gap is reported once, even when
                // this batch is empty.
                *last = (*last).max(batch.pruned);
            }
            for skipped in &batch.skipped {
                // The position and the reason only: never the row.
                tracing::warn!(position = %skipped.position, reason = %skipped.reason, cause = std::error::Error::source(&skipped.reason).map(tracing::field::display), "skipping a journal row this gateway cannot decode");
            }
            self.metrics
                .malformed_changes
                .inc_by(batch.skipped.len() as u64);
            // Past skipped rows too, so that none is read (and counted) again.
            let Some(end) = batch.end else {
                return Ok(total);
            };
            *last = end;
            total.changes += batch.changes.len();
            total.commits += count_commits(&batch.changes);
            self.hub.publish(&batch.changes);
            self.metrics.published(&batch.changes);
            if !batch.more {
                return Ok(total);
            }
        }
    }
}

/// What [`Listener::catch_up`] published.
#[derive(Debug, Default, Clone, Copy)]
struct CaughtUp {
    changes: usize,
    commits: usize,
}

/// Commits among `changes` (in commit order).
fn count_commits(changes: &[Arc<crate::change::Change>]) -> usize {
    let mut commits = 0;
    let mut previous = None;
    for change in changes {
        if previous != Some(change.position.commit) {
            commits += 1;
            previous = Some(change.position.commit);
        }
    }
    commits
}

/// Whether the listener is under load, so lingers rather than sleeps (see [`LINGER`]).
#[derive(Debug, Default)]
struct Pace {
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

/// Capped exponential backoff with full jitter.
struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }

    fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1 << self.attempt.min(16))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        // Full jitter keeps replicas that lost the same database from reconnecting in step.
        ceiling.mul_f64(0.5 + rand::random::<f64>() / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..20 {
            assert!(b.next_delay() <= Duration::from_secs(2));
        }
        assert!(b.next_delay() >= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
