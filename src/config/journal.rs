//! `[journal]`: how long changes stay replayable, and how the journal is read.

use std::time::Duration;

use serde::Deserialize;

use super::value::{duration, nonzero, within};
use super::{ConfigError, invalid};

/// The `[journal]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JournalConfig {
    /// `journal.retention`: how long changes can be replayed.
    #[serde(deserialize_with = "duration")]
    pub retention: Duration,
    /// `journal.batch_size`: changes per journal read (memory is bounded by
    /// `journal.batch_bytes` too).
    pub batch_size: usize,
    /// `journal.batch_bytes`: row-image bytes after which a journal read stops early, so
    /// huge rows are read a few at a time: as stored (compressed) in the query, and as
    /// text as the rows arrive. Subscribers' reads stop at
    /// [`crate::journal::STREAM_READ_BYTES`] at most.
    pub batch_bytes: usize,
    /// `journal.replay_concurrency` (default half of `database.pool_size`, at least 1, at
    /// most `database.pool_size`): subscribers' journal reads (resumes, catch-ups) running
    /// at once; more wait their turn, so that a storm of resumes leaves pooled connections
    /// to everything else. The listener reads on a connection of its own. See
    /// [`JournalConfig::replay_concurrency`].
    pub replay_concurrency: Option<usize>,
    /// `journal.prune_interval`: how often a replica tries to prune changes older than
    /// `journal.retention`.
    #[serde(deserialize_with = "duration")]
    pub prune_interval: Duration,
}

impl Default for JournalConfig {
    fn default() -> JournalConfig {
        JournalConfig {
            retention: Duration::from_secs(24 * 3600),
            batch_size: 5000,
            batch_bytes: 8 << 20,
            replay_concurrency: None,
            prune_interval: Duration::from_secs(60),
        }
    }
}

impl JournalConfig {
    /// `journal.replay_concurrency`, or its default for a pool of `pool_size`.
    pub fn replay_concurrency(&self, pool_size: usize) -> usize {
        self.replay_concurrency.unwrap_or((pool_size / 2).max(1))
    }

    /// The section's rules (`pool_size` is `database.pool_size`); each problem is
    /// collected in `errs`.
    pub fn validate(&self, pool_size: usize, errs: &mut Vec<ConfigError>) {
        nonzero(errs, "journal.retention", self.retention);
        nonzero(errs, "journal.prune_interval", self.prune_interval);
        within(errs, "journal.batch_size", self.batch_size, 1, 100_000);
        within(errs, "journal.batch_bytes", self.batch_bytes, 1, 1 << 30);
        match self.replay_concurrency {
            Some(v) if v > pool_size => errs.push(invalid(
                "journal.replay_concurrency",
                format!(
                    "must be at most database.pool_size ({pool_size}), got {v}: replays beyond it would only wait for connections"
                ),
            )),
            Some(v) => within(errs, "journal.replay_concurrency", v, 1, pool_size.max(1)),
            None => {}
        }
    }
}
