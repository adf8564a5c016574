//! The cap on open connections (`server.max_connections`, lowered to fit the open-file
//! limit), the count of those open, and the deadlines every connection gets. What a
//! connection over the cap is answered is [`super::overflow`]'s.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections over `server.max_connections` whose request is still read (to answer
/// `/healthz` and `/readyz`, and give the others a JSON 503) at most at once; beyond,
/// the 503 is written without reading.
const OVERFLOW_SLOTS: usize = 16;

/// File descriptors kept aside from `server.max_connections`: the pool, the LISTEN
/// connection, stdio, the runtime's own, key files, and the overflow connections.
fn reserved_fds(pool_size: usize) -> u64 {
    pool_size as u64 + 32 + OVERFLOW_SLOTS as u64
}

/// Open connections, their cap and their deadlines.
pub struct Connections {
    /// `server.max_connections`, lowered to fit the open-file limit.
    pub max: usize,
    /// `server.header_timeout`: the whole request head must arrive within it.
    pub header_timeout: Duration,
    /// `server.write_timeout`: a stream that accepts no bytes for it is closed.
    pub write_timeout: Duration,
    open: AtomicUsize,
    /// Places for connections over the cap whose request is still read.
    overflow: Arc<Semaphore>,
}

impl Connections {
    /// Limits from the `[server]` section, with the cap lowered (and a warning logged) if
    /// the process's open-file soft limit cannot hold it beside a pool of `pool_size`.
    pub fn new(server: &crate::config::ServerConfig, pool_size: usize) -> Connections {
        let mut max = server.max_connections;
        if let Ok((soft, _hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
            let room = soft.saturating_sub(reserved_fds(pool_size)).max(1);
            if (max as u64) > room {
                tracing::warn!(
                    configured = max,
                    lowered_to = room,
                    open_file_limit = soft,
                    "server.max_connections lowered to fit the open-file limit (raise `ulimit -n` / LimitNOFILE)"
                );
                max = room as usize;
            }
        }
        Connections {
            max,
            header_timeout: server.header_timeout,
            write_timeout: server.write_timeout,
            open: AtomicUsize::new(0),
            overflow: Arc::new(Semaphore::new(OVERFLOW_SLOTS)),
        }
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// A place for one more connection, unless `max` are open.
    pub(crate) fn admit(self: &Arc<Self>) -> Option<ConnectionSlot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectionSlot(Arc::clone(self)))
    }

    /// A place for a connection over the cap whose request is read, unless
    /// [`OVERFLOW_SLOTS`] are taken.
    pub(crate) fn overflow_slot(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.overflow).try_acquire_owned().ok()
    }
}

/// A counted open connection; dropping it frees its place.
pub(crate) struct ConnectionSlot(Arc<Connections>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}
