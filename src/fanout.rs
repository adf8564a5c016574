//! Fan-out of live changes to subscribers, routed by tenant.
//!
//! Each tenant with subscribers has its own `tokio::sync::broadcast` channel, so a change
//! wakes only the subscribers of its tenant (public changes go to every tenant's channel).
//! The listener publishes in commit order; a subscriber registers here before its response
//! starts and learns the position the live feed continues from, so that the journal can
//! fill anything before it. A channel's buffer bounds memory whatever a subscriber does: a
//! receiver that falls behind gets `Lagged` and is caught up from the journal by its
//! stream (see `sse`). This module never reads the database and never blocks on a client.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::broadcast;

use crate::change::{Change, Position};

/// The live feed's routing table.
pub struct Hub {
    /// Channels by tenant, and the last published position, under one lock so that a new
    /// subscriber's receiver and starting position agree.
    inner: Mutex<Inner>,
    /// Buffer of each tenant's channel (`server.live_buffer`).
    capacity: usize,
}

struct Inner {
    /// Live channels, one per tenant that has (or recently had) subscribers.
    channels: HashMap<Arc<str>, broadcast::Sender<Arc<Change>>>,
    /// Position of the last change published: a receiver created now sees exactly the
    /// changes after it.
    head: Position,
}

/// A subscriber's live registration.
pub struct Subscription {
    /// Live changes of the tenant (and public ones), after `from`.
    pub receiver: broadcast::Receiver<Arc<Change>>,
    /// Everything up to this position was published before the receiver existed.
    pub from: Position,
}

impl Hub {
    /// A hub whose feed continues after `head`, buffering `capacity` changes per tenant.
    pub fn new(head: Position, capacity: usize) -> Hub {
        Hub {
            inner: Mutex::new(Inner {
                channels: HashMap::new(),
                head,
            }),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The lock guards plain data updated in one step; a panic elsewhere cannot leave
        // it half-written, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a live receiver for `tenant`.
    pub fn subscribe(&self, tenant: &str) -> Subscription {
        let mut inner = self.lock();
        let from = inner.head;
        let receiver = match inner.channels.get(tenant) {
            Some(sender) => sender.subscribe(),
            None => {
                let (sender, receiver) = broadcast::channel(self.capacity);
                inner.channels.insert(Arc::from(tenant), sender);
                receiver
            }
        };
        Subscription { receiver, from }
    }

    /// The position of the last published change.
    pub fn head(&self) -> Position {
        self.lock().head
    }

    /// Publishes changes, which must be in commit order and after the current head.
    /// Channels whose subscribers have all gone are dropped on the way.
    pub fn publish(&self, changes: &[Arc<Change>]) {
        let Some(last) = changes.last() else { return };
        let mut inner = self.lock();
        let mut orphaned = false;
        for change in changes {
            if change.public {
                for sender in inner.channels.values() {
                    orphaned |= sender.send(Arc::clone(change)).is_err();
                }
            } else if let Some(tenant) = change.tenant.as_deref()
                && let Some(sender) = inner.channels.get(tenant)
            {
                orphaned |= sender.send(Arc::clone(change)).is_err();
            }
        }
        if orphaned {
            inner
                .channels
                .retain(|_, sender| sender.receiver_count() > 0);
        }
        inner.head = last.position;
    }

    /// Number of tenant channels, for tests and metrics.
    pub fn channel_count(&self) -> usize {
        self.lock().channels.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Op;

    fn change(commit: i64, tenant: Option<&str>) -> Arc<Change> {
        Arc::new(Change::new(
            Position { commit, ord: 1 },
            "public.t".into(),
            Op::Insert,
            tenant.map(str::to_string),
            tenant.is_none(),
            None,
            None,
            None,
            None,
            "2026-01-01T00:00:00.000000Z".into(),
        ))
    }

    #[test]
    fn routes_by_tenant_and_public_to_all() {
        let hub = Hub::new(Position::ZERO, 16);
        let mut a = hub.subscribe("a");
        let mut b = hub.subscribe("b");
        hub.publish(&[
            change(1, Some("a")),
            change(2, Some("b")),
            change(3, None),
            change(4, Some("c")),
        ]);
        let got = |rx: &mut broadcast::Receiver<Arc<Change>>| {
            std::iter::from_fn(|| rx.try_recv().ok())
                .map(|c| c.position.commit)
                .collect::<Vec<_>>()
        };
        assert_eq!(got(&mut a.receiver), vec![1, 3]);
        assert_eq!(got(&mut b.receiver), vec![2, 3]);
        assert_eq!(hub.head(), Position { commit: 4, ord: 1 });
        let late = hub.subscribe("a");
        assert_eq!(late.from, Position { commit: 4, ord: 1 });
    }

    #[test]
    fn drops_channels_without_subscribers() {
        let hub = Hub::new(Position::ZERO, 16);
        drop(hub.subscribe("a"));
        let _b = hub.subscribe("b");
        assert_eq!(hub.channel_count(), 2);
        hub.publish(&[change(1, None)]);
        assert_eq!(hub.channel_count(), 1);
    }
}
