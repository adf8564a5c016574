//! Whether the listener is connected and caught up, and if not why: what `/readyz` and
//! the `listener_ready` metric report. Set by the listener, and marked failed for good by
//! the gateway when an essential task ends; read by anyone.

use std::sync::atomic::{AtomicU8, Ordering};

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
    pub(super) fn set(&self, state: Option<NotReady>) -> Option<NotReady> {
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
