//! Pruning the journal: changes older than `journal.retention` are removed in short
//! batches, one replica at a time, on a timer.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Journal;
use super::error::JournalError;
use super::sql::PRUNE;
use crate::db::decode;

/// Pruning rounds skipped in a row (the lock held elsewhere) after which a warning is
/// logged, and again every as many rounds.
const PRUNE_SKIPS_WARNED: u32 = 10;

/// Commits removed per pruning transaction: small enough that each one is short.
const PRUNE_BATCH: i32 = 200;

impl Journal {
    /// Removes up to `max_commits` commits older than `retention`. Returns how many were
    /// removed, or `None` when another session holds the pruning lock.
    pub async fn prune(
        &self,
        retention: Duration,
        max_commits: i32,
    ) -> Result<Option<u32>, JournalError> {
        let seconds = retention.as_secs_f64();
        let row = self
            .db
            .run(move |client| {
                Box::pin(async move { client.query_one(PRUNE, &[&seconds, &max_commits]).await })
            })
            .await?;
        let removed: i32 = decode(&row, 0, "removed commits")?;
        Ok(u32::try_from(removed).ok())
    }

    /// Prunes changes older than `retention` every `interval` until `shutdown`. Replicas
    /// take turns through a lock on `pgfeed.pruned` (taken with NOWAIT: a replica that
    /// finds it held skips the round and counts it); each batch is its own short
    /// transaction so writers are never blocked for long. When the lock has been held by
    /// others for `PRUNE_SKIPS_WARNED` rounds in a row, it says so.
    pub async fn prune_periodically(
        self,
        retention: Duration,
        interval: Duration,
        metrics: Arc<crate::metrics::Metrics>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut skipped_in_a_row = 0u32;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let mut total = 0u64;
            loop {
                match self.prune(retention, PRUNE_BATCH).await {
                    Ok(Some(removed)) => {
                        skipped_in_a_row = 0;
                        metrics.prune_runs.inc();
                        metrics.pruned_commits.inc_by(u64::from(removed));
                        total += u64::from(removed);
                        if removed < PRUNE_BATCH as u32 || shutdown.is_cancelled() {
                            break;
                        }
                    }
                    Ok(None) => {
                        metrics.prune_skipped.inc();
                        skipped_in_a_row += 1;
                        if skipped_in_a_row.is_multiple_of(PRUNE_SKIPS_WARNED) {
                            tracing::warn!(
                                rounds = skipped_in_a_row,
                                "the journal has not been pruned for {skipped_in_a_row} rounds: another session holds the lock on pgfeed.pruned (see pg_locks)"
                            );
                        }
                        break;
                    }
                    // The listener reports that one, once.
                    Err(err) if err.schema_missing() => {
                        tracing::debug!(cause = %err, "cannot prune: the pgfeed schema is missing");
                        break;
                    }
                    Err(err) => {
                        tracing::warn!(cause = %err, "pruning the journal failed");
                        break;
                    }
                }
            }
            if total > 0 {
                tracing::info!(commits = total, "pruned the journal");
            }
        }
    }
}
