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
//!
//! When it sleeps or lingers after reading follows `listener/pace.rs`; what it reports is
//! [`Readiness`]; how long it waits before reconnecting is `listener/backoff.rs`. Its
//! connections' settings are [`crate::db`]'s.

mod backoff;
mod pace;
mod readiness;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::poll_fn;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::change::Position;
use crate::db::QueryError;
use crate::hub::Hub;
use crate::journal::{Journal, JournalError};

use backoff::Backoff;
pub use pace::BARRIER_TIMEOUT_MS;
use pace::{
    ARM, BARRIER, BARRIER_PAUSE_MAX, BARRIER_PAUSE_MIN, CONTENDED_BARRIER, LINGER_POLL, Pace,
    SETTLE_SLICE,
};
pub use readiness::{NotReady, Readiness};

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
    /// Reloading the catalog of watched tables failed.
    #[error("cannot reload the watched tables")]
    Catalog(#[source] QueryError),
}

impl ListenerError {
    /// Whether the session ended because the pgfeed schema is gone.
    fn schema_missing(&self) -> bool {
        match self {
            ListenerError::Journal(err) => err.schema_missing(),
            ListenerError::Catalog(err) => err.schema_missing(),
            _ => false,
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
            .reload(self.journal.db())
            .await
            .map_err(ListenerError::Catalog)?;
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
