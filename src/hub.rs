//! Fan-out of live changes to subscribers, routed by tenant.
//!
//! Each tenant with subscribers has its own `tokio::sync::broadcast` channel, so a change
//! wakes only the subscribers of its tenant (public changes go to every tenant's channel).
//! The listener publishes in commit order; a subscriber registers here before its response
//! starts, admitted by [`crate::admission`], and learns the position the live feed
//! continues from, so that the journal can fill anything before it. A channel's buffer
//! bounds memory whatever a subscriber does: a receiver that falls behind gets `Lagged`
//! and is caught up by its stream (see `sse`), from the hub's memory of recent changes
//! ([`crate::recent`]) when that still reaches back far enough, else from the journal.
//! This module never reads the database and never blocks on a client.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::broadcast;

use crate::admission::{Admission, Limits, Refused, shrink};
use crate::change::{Change, Position};
use crate::recent::Recent;

/// The live feed's routing table.
pub struct Hub {
    /// Channels by tenant, the last published position and the subscriber counts, under
    /// one lock so that a new subscriber's receiver, starting position and admission agree.
    inner: Mutex<Inner>,
    /// Buffer of each tenant's channel (`server.live_buffer`).
    capacity: usize,
    /// The most recently published changes, all tenants, for catch-ups and resumes.
    recent: Mutex<Recent>,
}

struct Inner {
    /// Live channels, one per tenant that has subscribers (removed with its last one).
    channels: HashMap<Arc<str>, broadcast::Sender<Arc<Change>>>,
    /// Position of the last change published: a receiver created now sees exactly the
    /// changes after it.
    head: Position,
    /// Open subscriptions, counted against the admission limits.
    admission: Admission,
    /// How many times the journal was recreated under this hub ([`Hub::restart`]): a
    /// subscription of an earlier epoch holds a position of a journal that is gone.
    epoch: u64,
}

impl Inner {
    /// A receiver of `tenant`'s channel, created if needed.
    fn receiver(&mut self, tenant: &Arc<str>, capacity: usize) -> broadcast::Receiver<Arc<Change>> {
        match self.channels.get(tenant) {
            Some(sender) => sender.subscribe(),
            None => {
                let (sender, receiver) = broadcast::channel(capacity);
                self.channels.insert(Arc::clone(tenant), sender);
                receiver
            }
        }
    }
}

/// A subscriber's live registration; dropping it releases its place.
pub struct Subscription {
    /// Live changes of the tenant (and public ones), after `from`.
    pub receiver: broadcast::Receiver<Arc<Change>>,
    /// Everything up to this position was published before the receiver existed.
    pub from: Position,
    /// The hub's epoch when the receiver was made.
    epoch: u64,
    /// Releases the admission counts on drop.
    place: Place,
}

impl Subscription {
    /// Replaces a receiver whose channel was closed by [`Hub::gap`] with one of the
    /// tenant's current channel (created if needed), keeping this subscription's place.
    /// Changes published from now on reach the new receiver; the caller catches up on
    /// the rest. Returns true when the journal was recreated ([`Hub::restart`]) since the
    /// old receiver was made: the caller's position means nothing any more.
    pub fn resubscribe(&mut self) -> bool {
        let hub = &self.place.hub;
        let mut inner = hub.lock();
        let restarted = self.epoch != inner.epoch;
        self.epoch = inner.epoch;
        self.receiver = inner.receiver(&self.place.tenant, hub.capacity);
        restarted
    }

    /// [`Hub::recent_after`] for this subscription's tenant.
    pub fn recent_after(
        &self,
        after: Position,
        max: usize,
        max_bytes: usize,
    ) -> Option<(Vec<Arc<Change>>, bool)> {
        self.place
            .hub
            .recent_after(after, &self.place.tenant, max, max_bytes)
    }
}

/// A counted place in the hub.
struct Place {
    hub: Arc<Hub>,
    tenant: Arc<str>,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut inner = self.hub.lock();
        if inner.admission.release(&self.tenant) {
            // The tenant's last stream left: its channel (whose buffer is allocated
            // whole, `server.live_buffer` slots) goes with it. A stream of the tenant
            // that opens later gets a new channel from the head, and its resume reads
            // the journal, so nothing is lost.
            inner.channels.remove(&self.tenant);
            shrink(&mut inner.channels);
        }
    }
}

impl Hub {
    /// A hub whose feed continues after `head`, buffering `capacity` changes per tenant.
    pub fn new(head: Position, capacity: usize, limits: Limits) -> Hub {
        Hub {
            inner: Mutex::new(Inner {
                channels: HashMap::new(),
                head,
                admission: Admission::new(limits),
                epoch: 0,
            }),
            capacity,
            // `server.replay_memory`, its default until `with_recent_bytes`.
            recent: Mutex::new(Recent::new(
                head,
                crate::config::ServerConfig::default().replay_memory,
            )),
        }
    }

    /// Keeps at most about `bytes` of recent changes in memory (0: none).
    pub fn with_recent_bytes(self, bytes: usize) -> Hub {
        self.lock_recent().set_budget(bytes);
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The lock guards plain data updated in one step; a panic elsewhere cannot leave
        // it half-written, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_recent(&self) -> MutexGuard<'_, Recent> {
        // As for `lock`: plain data, updated in steps that cannot panic halfway.
        self.recent.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The changes of `tenant` (and public ones) published after `after`, from memory, at
    /// most `max` of them and about `max_bytes` (at least one), and whether more follow.
    /// `None` when memory no longer reaches back to `after`: the caller reads the journal.
    pub fn recent_after(
        &self,
        after: Position,
        tenant: &str,
        max: usize,
        max_bytes: usize,
    ) -> Option<(Vec<Arc<Change>>, bool)> {
        self.lock_recent().after(after, tenant, max, max_bytes)
    }

    /// A gap in the feed: the listener found changes up to `pruned` removed from the
    /// journal before it could publish them, so what follows is not continuous with what
    /// it published. Forgets the recent feed (a catch-up from before `pruned` must ask the
    /// journal, which tells the gap) and closes every channel: each live subscriber
    /// receives what was already sent, then `Closed`, takes a fresh receiver
    /// ([`Subscription::resubscribe`]) and catches up from the journal, which answers
    /// `reset`.
    ///
    /// The head moves up to `pruned`: a stream that subscribes now starts there, not at a
    /// position the journal no longer holds.
    pub fn gap(&self, pruned: Position) {
        let mut inner = self.lock();
        inner.head = inner.head.max(pruned);
        self.lock_recent().forget(inner.head);
        inner.channels.clear();
    }

    /// The journal was recreated (the schema uninstalled and installed again): positions
    /// started over and the feed continues after `head` of the new journal. Forgets the
    /// recent feed and closes every channel, as [`Hub::gap`] does; a subscriber that
    /// then resubscribes learns that its position is from the old journal.
    pub fn restart(&self, head: Position) {
        let mut inner = self.lock();
        inner.head = head;
        inner.epoch += 1;
        self.lock_recent().forget(head);
        inner.channels.clear();
    }

    /// Admits and registers a live receiver for `tenant`.
    pub fn subscribe(self: &Arc<Self>, tenant: &str) -> Result<Subscription, Refused> {
        let mut inner = self.lock();
        let key: Arc<str> = match inner.channels.get_key_value(tenant) {
            Some((k, _)) => Arc::clone(k),
            None => Arc::from(tenant),
        };
        inner.admission.admit(&key)?;
        let from = inner.head;
        let receiver = inner.receiver(&key, self.capacity);
        Ok(Subscription {
            receiver,
            from,
            epoch: inner.epoch,
            place: Place {
                hub: Arc::clone(self),
                tenant: key,
            },
        })
    }

    /// Open subscriptions, in all.
    pub fn subscribers(&self) -> usize {
        self.lock().admission.total()
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
        // Into memory first, then to the channels: a receiver that lagged and reads memory
        // must find there every change its channel already dropped. (What it then also
        // receives live is a duplicate, dropped by position.)
        self.lock_recent().push(changes);
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
    use tokio::sync::broadcast::error::TryRecvError;

    fn change(commit: i64, tenant: Option<&str>) -> Arc<Change> {
        Change::for_test(commit, tenant)
    }

    #[test]
    fn routes_by_tenant_and_public_to_all() {
        let hub = Arc::new(Hub::new(Position::ZERO, 16, Limits::default()));
        let mut a = hub.subscribe("a").unwrap();
        let mut b = hub.subscribe("b").unwrap();
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
        let late = hub.subscribe("a").unwrap();
        assert_eq!(late.from, Position { commit: 4, ord: 1 });
    }

    /// A receiver that lags while another thread publishes, and catches up from memory the
    /// way a stream does, sees every change exactly once: memory already holds whatever its
    /// channel dropped.
    #[test]
    fn catch_ups_from_memory_miss_nothing_under_concurrent_publishing() {
        const N: i64 = 200_000;
        let hub =
            Arc::new(Hub::new(Position::ZERO, 2, Limits::default()).with_recent_bytes(usize::MAX));
        let mut sub = hub.subscribe("a").unwrap();
        let publisher = {
            let hub = Arc::clone(&hub);
            std::thread::spawn(move || {
                let mut next = 1;
                while next <= N {
                    let batch: Vec<_> = (next..=(next + next % 61).min(N))
                        .map(|c| change(c, Some("a")))
                        .collect();
                    next += batch.len() as i64;
                    hub.publish(&batch);
                }
            })
        };
        let mut last = 0;
        let mut lags = 0;
        let take = |c: &Change, last: &mut i64| {
            if c.position.commit > *last {
                assert_eq!(c.position.commit, *last + 1, "a change was skipped");
                *last = c.position.commit;
            }
        };
        while last < N {
            match sub.receiver.blocking_recv() {
                Ok(c) => take(&c, &mut last),
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    lags += 1;
                    loop {
                        let (found, more) = sub
                            .recent_after(
                                Position {
                                    commit: last,
                                    ord: 1,
                                },
                                64,
                                usize::MAX,
                            )
                            .expect("memory reaches back");
                        for c in &found {
                            take(c, &mut last);
                        }
                        if !more {
                            break;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => panic!("closed"),
            }
        }
        publisher.join().unwrap();
        assert!(
            lags > 0,
            "the receiver never lagged; the test proved nothing"
        );
    }

    #[test]
    fn a_gap_closes_every_channel_and_resubscribing_follows_the_feed_again() {
        let hub = Arc::new(Hub::new(Position::ZERO, 16, Limits::default()));
        let mut a = hub.subscribe("a").unwrap();
        let mut b = hub.subscribe("b").unwrap();
        hub.publish(&[change(1, Some("a"))]);
        hub.gap(Position { commit: 5, ord: 1 });
        assert_eq!(
            hub.head(),
            Position { commit: 5, ord: 1 },
            "new streams start there"
        );
        assert!(
            hub.recent_after(Position::ZERO, "a", 10, usize::MAX)
                .is_none(),
            "memory no longer answers for anything before the gap"
        );
        // What was sent before the gap is still delivered, then the channel is closed.
        assert_eq!(a.receiver.try_recv().unwrap().position.commit, 1);
        assert!(matches!(a.receiver.try_recv(), Err(TryRecvError::Closed)));
        assert!(matches!(b.receiver.try_recv(), Err(TryRecvError::Closed)));
        assert_eq!(hub.subscribers(), 2, "the subscriptions keep their places");
        assert!(!a.resubscribe(), "a gap is not a new journal");
        hub.publish(&[change(6, Some("a")), change(7, None)]);
        assert_eq!(a.receiver.try_recv().unwrap().position.commit, 6);
        assert_eq!(a.receiver.try_recv().unwrap().position.commit, 7);
        // b has not resubscribed yet: its old receiver stays closed, and the public change
        // reaches it once it does only through the journal, not this channel.
        assert!(matches!(b.receiver.try_recv(), Err(TryRecvError::Closed)));
        assert!(!b.resubscribe());
        hub.publish(&[change(8, None)]);
        assert_eq!(b.receiver.try_recv().unwrap().position.commit, 8);
    }

    #[test]
    fn a_restart_moves_the_head_back_and_tells_each_subscriber_once() {
        let hub = Arc::new(Hub::new(Position::ZERO, 16, Limits::default()));
        let mut a = hub.subscribe("a").unwrap();
        hub.publish(&[change(40, Some("a"))]);
        let head = Position { commit: 2, ord: 1 };
        hub.restart(head);
        assert_eq!(hub.head(), head, "new streams start there");
        assert_eq!(a.receiver.try_recv().unwrap().position.commit, 40);
        assert!(matches!(a.receiver.try_recv(), Err(TryRecvError::Closed)));
        let recent = a
            .recent_after(head, 10, 1 << 20)
            .map(|(found, _)| found.len());
        assert_eq!(recent, Some(0), "the old journal's changes are forgotten");
        assert!(
            a.resubscribe(),
            "the subscriber learns its position is from the old journal"
        );
        assert!(!a.resubscribe(), "once");
        let fresh = hub.subscribe("a").unwrap();
        assert_eq!(fresh.from, head);
        hub.publish(&[change(3, Some("a"))]);
        assert_eq!(a.receiver.try_recv().unwrap().position.commit, 3);
    }

    #[test]
    fn frees_a_tenants_channel_with_its_last_subscriber() {
        let hub = Arc::new(Hub::new(Position::ZERO, 16, Limits::default()));
        let a1 = hub.subscribe("a").unwrap();
        let a2 = hub.subscribe("a").unwrap();
        let _b = hub.subscribe("b").unwrap();
        assert_eq!(hub.channel_count(), 2);
        drop(a1);
        assert_eq!(hub.channel_count(), 2, "a still has a subscriber");
        drop(a2);
        assert_eq!(
            hub.channel_count(),
            1,
            "a's channel went with its last subscriber"
        );
        // A tenant that comes back gets a channel again, starting at the head.
        hub.publish(&[change(1, Some("a"))]);
        let mut again = hub.subscribe("a").unwrap();
        assert_eq!(again.from, Position { commit: 1, ord: 1 });
        hub.publish(&[change(2, Some("a"))]);
        assert_eq!(again.receiver.try_recv().unwrap().position.commit, 2);
        drop(again);
        let many: Vec<_> = (0..10_000)
            .map(|i| hub.subscribe(&format!("t{i}")).unwrap())
            .collect();
        assert_eq!(hub.channel_count(), 10_001);
        drop(many);
        assert_eq!(hub.channel_count(), 1);
        assert!(hub.lock().channels.capacity() < 1024, "the table shrank");
    }

    #[test]
    fn admission_limits() {
        let limits = Limits {
            max_total: 3,
            max_per_tenant: 2,
            rate_per_tenant: 1000,
        };
        let hub = Arc::new(Hub::new(Position::ZERO, 16, limits));
        let a1 = hub.subscribe("a").unwrap();
        let _a2 = hub.subscribe("a").unwrap();
        assert_eq!(hub.subscribe("a").err(), Some(Refused::TenantFull));
        let _b = hub.subscribe("b").unwrap();
        assert_eq!(hub.subscribe("c").err(), Some(Refused::Full));
        drop(a1);
        assert_eq!(hub.subscribers(), 2);
        assert!(hub.subscribe("a").is_ok());

        let hub = Arc::new(Hub::new(
            Position::ZERO,
            16,
            Limits {
                rate_per_tenant: 2,
                ..Limits::default()
            },
        ));
        let kept: Vec<_> = (0..4).map(|_| hub.subscribe("a").unwrap()).collect();
        assert_eq!(
            hub.subscribe("a").err(),
            Some(Refused::TooFast),
            "a burst of twice the rate, then refused"
        );
        assert!(hub.subscribe("b").is_ok(), "other tenants are not affected");
        drop(kept);
    }
}
