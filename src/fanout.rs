//! Fan-out of live changes to subscribers, routed by tenant.
//!
//! Each tenant with subscribers has its own `tokio::sync::broadcast` channel, so a change
//! wakes only the subscribers of its tenant (public changes go to every tenant's channel).
//! The listener publishes in commit order; a subscriber registers here before its response
//! starts and learns the position the live feed continues from, so that the journal can
//! fill anything before it. A channel's buffer bounds memory whatever a subscriber does: a
//! receiver that falls behind gets `Lagged` and is caught up by its stream (see `sse`),
//! from the hub's memory of recent changes when that still reaches back far enough, else
//! from the journal. This module never reads the database and never blocks on a client.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::sync::broadcast;

use crate::change::{Change, Position};

/// The live feed's routing table.
pub struct Hub {
    /// Channels by tenant, the last published position and the subscriber counts, under
    /// one lock so that a new subscriber's receiver, starting position and admission agree.
    inner: Mutex<Inner>,
    /// Buffer of each tenant's channel (`server.live_buffer`).
    capacity: usize,
    /// The most recently published changes, all tenants, for catch-ups and resumes.
    recent: Mutex<Recent>,
    /// Bytes `recent` may hold (estimated).
    recent_budget: usize,
    /// Admission limits.
    limits: Limits,
}

/// Admission limits for new subscribers.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open streams at most (`server.max_subscribers`).
    pub max_total: usize,
    /// Open streams per tenant at most (`server.max_subscribers_per_tenant`).
    pub max_per_tenant: usize,
    /// New streams per tenant per second (`server.max_stream_rate`); bursts of twice that.
    pub rate_per_tenant: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_total: usize::MAX,
            max_per_tenant: usize::MAX,
            rate_per_tenant: u32::MAX,
        }
    }
}

/// Why a subscriber was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The gateway holds `server.max_subscribers` streams.
    #[error("the gateway is at its limit of open streams; try again later")]
    Full,
    /// The tenant holds `server.max_subscribers_per_tenant` streams.
    #[error("this tenant is at its limit of open streams")]
    TenantFull,
    /// The tenant opens streams faster than `server.max_stream_rate`.
    #[error("this tenant opens streams too fast; retry after a second")]
    TooFast,
}

struct Inner {
    /// Live channels, one per tenant that has subscribers (removed with its last one).
    channels: HashMap<Arc<str>, broadcast::Sender<Arc<Change>>>,
    /// Position of the last change published: a receiver created now sees exactly the
    /// changes after it.
    head: Position,
    /// Open subscriptions in all.
    total: usize,
    /// Open subscriptions per tenant.
    per_tenant: HashMap<Arc<str>, usize>,
    /// Token buckets for new streams per tenant: (tokens, last refill).
    buckets: HashMap<Arc<str>, (f64, Instant)>,
    /// How many times the journal was recreated under this hub ([`Hub::restart`]): a
    /// subscription of an earlier epoch holds a position of a journal that is gone.
    epoch: u64,
}

/// How much of the recent feed the hub keeps in memory by default (`server.replay_memory`):
/// a stream that lagged (a burst larger than its channel's buffer, typically a bulk
/// statement of its tenant's) catches up from here instead of each such stream querying
/// the journal for the same rows at once. Client resumes read the journal.
pub const RECENT_BYTES: usize = 16 << 20;

/// The recent feed: every change published after `floor`, in order, within a byte budget.
struct Recent {
    changes: VecDeque<Arc<Change>>,
    /// Estimated bytes held.
    bytes: usize,
    /// Every change published after this position is in `changes`.
    floor: Position,
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
        self.receiver = match inner.channels.get(&self.place.tenant) {
            Some(sender) => sender.subscribe(),
            None => {
                let (sender, receiver) = broadcast::channel(hub.capacity);
                inner
                    .channels
                    .insert(Arc::clone(&self.place.tenant), sender);
                receiver
            }
        };
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
        inner.total -= 1;
        if let Some(n) = inner.per_tenant.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                // The tenant's last stream left: its channel (whose buffer is allocated
                // whole, `server.live_buffer` slots) goes with it. A stream of the tenant
                // that opens later gets a new channel from the head, and its resume reads
                // the journal, so nothing is lost.
                inner.per_tenant.remove(&self.tenant);
                inner.channels.remove(&self.tenant);
                shrink(&mut inner.per_tenant);
                shrink(&mut inner.channels);
            }
        }
    }
}

/// Gives back a map's memory once it is mostly empty: a burst of many tenants must not
/// keep its table allocated after they left.
fn shrink<V>(map: &mut HashMap<Arc<str>, V>) {
    if map.capacity() > 64 && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

impl Hub {
    /// A hub whose feed continues after `head`, buffering `capacity` changes per tenant.
    pub fn new(head: Position, capacity: usize, limits: Limits) -> Hub {
        Hub {
            inner: Mutex::new(Inner {
                channels: HashMap::new(),
                head,
                total: 0,
                per_tenant: HashMap::new(),
                buckets: HashMap::new(),
                epoch: 0,
            }),
            capacity,
            recent: Mutex::new(Recent {
                changes: VecDeque::new(),
                bytes: 0,
                floor: head,
            }),
            recent_budget: RECENT_BYTES,
            limits,
        }
    }

    /// Keeps at most about `bytes` of recent changes in memory (0: none).
    pub fn with_recent_bytes(mut self, bytes: usize) -> Hub {
        self.recent_budget = bytes;
        self
    }

    fn lock_recent(&self) -> std::sync::MutexGuard<'_, Recent> {
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
        let recent = self.lock_recent();
        if after < recent.floor {
            return None;
        }
        let start = recent.changes.partition_point(|c| c.position <= after);
        let mut found = Vec::new();
        let mut bytes = 0;
        for change in recent.changes.range(start..) {
            if change.public || change.tenant.as_deref() == Some(tenant) {
                if found.len() == max || (bytes >= max_bytes && !found.is_empty()) {
                    return Some((found, true));
                }
                bytes += change.approx_bytes();
                found.push(Arc::clone(change));
            }
        }
        Some((found, false))
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
        {
            let mut recent = self.lock_recent();
            recent.changes.clear();
            recent.bytes = 0;
            recent.floor = inner.head;
        }
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
        {
            let mut recent = self.lock_recent();
            recent.changes.clear();
            recent.bytes = 0;
            recent.floor = head;
        }
        inner.channels.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The lock guards plain data updated in one step; a panic elsewhere cannot leave
        // it half-written, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits and registers a live receiver for `tenant`.
    pub fn subscribe(self: &Arc<Self>, tenant: &str) -> Result<Subscription, Refused> {
        let mut inner = self.lock();
        if inner.total >= self.limits.max_total {
            return Err(Refused::Full);
        }
        let key: Arc<str> = match inner.channels.get_key_value(tenant) {
            Some((k, _)) => Arc::clone(k),
            None => Arc::from(tenant),
        };
        if inner.per_tenant.get(&key).copied().unwrap_or(0) >= self.limits.max_per_tenant {
            return Err(Refused::TenantFull);
        }
        if !self.take_token(&mut inner, &key) {
            return Err(Refused::TooFast);
        }
        inner.total += 1;
        *inner.per_tenant.entry(Arc::clone(&key)).or_insert(0) += 1;
        let from = inner.head;
        let receiver = match inner.channels.get(&key) {
            Some(sender) => sender.subscribe(),
            None => {
                let (sender, receiver) = broadcast::channel(self.capacity);
                inner.channels.insert(Arc::clone(&key), sender);
                receiver
            }
        };
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

    /// Takes one token from the tenant's bucket, refilled at `rate_per_tenant` per second
    /// up to twice that.
    fn take_token(&self, inner: &mut Inner, tenant: &Arc<str>) -> bool {
        if self.limits.rate_per_tenant == u32::MAX {
            return true;
        }
        let rate = f64::from(self.limits.rate_per_tenant);
        let burst = rate * 2.0;
        let now = Instant::now();
        if inner.buckets.len() > 100_000 {
            // Forget tenants whose buckets are full again: they are as good as new.
            inner.buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = inner
            .buckets
            .entry(Arc::clone(tenant))
            .or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Open subscriptions, in all.
    pub fn subscribers(&self) -> usize {
        self.lock().total
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
        {
            let mut recent = self.lock_recent();
            for change in changes {
                recent.bytes += change.approx_bytes();
                recent.changes.push_back(Arc::clone(change));
            }
            while recent.bytes > self.recent_budget
                && let Some(old) = recent.changes.pop_front()
            {
                recent.bytes -= old.approx_bytes();
                recent.floor = old.position;
            }
        }
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
    use tokio::sync::broadcast::error::TryRecvError;

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
            0.0,
        ))
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

    fn commits(found: Option<(Vec<Arc<Change>>, bool)>) -> Option<(Vec<i64>, bool)> {
        found.map(|(changes, more)| (changes.iter().map(|c| c.position.commit).collect(), more))
    }

    #[test]
    fn recent_changes_serve_catch_ups_while_memory_reaches_back() {
        let at = |commit| Position { commit, ord: 1 };
        let one = change(1, Some("a")).approx_bytes();
        // Room for three changes: the fourth evicts the first.
        let hub = Hub::new(at(10), 16, Limits::default()).with_recent_bytes(3 * one);
        // Nothing published yet: memory reaches back to the starting head, not before.
        assert_eq!(
            commits(hub.recent_after(at(10), "a", 10, usize::MAX)),
            Some((vec![], false))
        );
        assert_eq!(commits(hub.recent_after(at(9), "a", 10, usize::MAX)), None);
        hub.publish(&[
            change(11, Some("a")),
            change(12, Some("b")),
            change(13, None),
        ]);
        // By tenant, public changes to everyone, strictly after the position.
        assert_eq!(
            commits(hub.recent_after(at(10), "a", 10, usize::MAX)),
            Some((vec![11, 13], false))
        );
        assert_eq!(
            commits(hub.recent_after(at(11), "b", 10, usize::MAX)),
            Some((vec![12, 13], false))
        );
        assert_eq!(
            commits(hub.recent_after(at(13), "a", 10, usize::MAX)),
            Some((vec![], false))
        );
        // At most `max`, and says so.
        assert_eq!(
            commits(hub.recent_after(at(10), "a", 1, usize::MAX)),
            Some((vec![11], true))
        );
        // Commit 11 leaves memory: positions before it must go to the journal.
        hub.publish(&[change(14, Some("a"))]);
        assert_eq!(commits(hub.recent_after(at(10), "a", 10, usize::MAX)), None);
        assert_eq!(
            commits(hub.recent_after(at(11), "a", 10, usize::MAX)),
            Some((vec![13, 14], false))
        );
        // About `max_bytes`, but at least one.
        assert_eq!(
            commits(hub.recent_after(at(11), "a", 10, 1)),
            Some((vec![13], true))
        );
        assert_eq!(
            commits(hub.recent_after(at(11), "a", 10, one + 1)),
            Some((vec![13, 14], false))
        );
        // A gap in the feed: the listener found everything up to commit 20 pruned. Memory
        // no longer answers for anything before it, not even for the old head.
        hub.gap(at(20));
        assert_eq!(commits(hub.recent_after(at(14), "a", 10, usize::MAX)), None);
        assert_eq!(
            commits(hub.recent_after(at(20), "a", 10, usize::MAX)),
            Some((vec![], false))
        );
        // Turned off: always the journal, except at the head itself.
        let off = Hub::new(at(0), 16, Limits::default()).with_recent_bytes(0);
        off.publish(&[change(1, Some("a"))]);
        assert_eq!(commits(off.recent_after(at(0), "a", 10, usize::MAX)), None);
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
