//! The hub's memory of the recent feed: every change published after a floor position, in
//! order, within a byte budget (`server.replay_memory`), for catch-ups.
//!
//! A stream that lagged (a burst larger than its channel's buffer, typically a bulk
//! statement of its tenant's) catches up from here instead of each such stream querying
//! the journal for the same rows at once. When memory no longer reaches back far enough,
//! the caller reads the journal. This module never reads the database and never routes a
//! change: the hub ([`crate::hub`]) owns it and decides when it is filled and forgotten.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::change::{Change, Position};

/// The recent feed: every change published after `floor`, in order, within a byte budget.
#[derive(Debug)]
pub(crate) struct Recent {
    /// The changes, oldest first.
    changes: VecDeque<Arc<Change>>,
    /// Estimated bytes held.
    bytes: usize,
    /// Bytes `changes` may hold (estimated).
    budget: usize,
    /// Every change published after this position is in `changes`.
    floor: Position,
}

impl Recent {
    /// Empty, reaching back to `floor`, holding about `budget` bytes at most (0: nothing).
    pub(crate) fn new(floor: Position, budget: usize) -> Recent {
        Recent {
            changes: VecDeque::new(),
            bytes: 0,
            budget,
            floor,
        }
    }

    /// Changes the byte budget (before anything was published).
    pub(crate) fn set_budget(&mut self, budget: usize) {
        self.budget = budget;
    }

    /// Remembers published changes (in commit order), forgetting the oldest beyond the
    /// budget.
    pub(crate) fn push(&mut self, changes: &[Arc<Change>]) {
        for change in changes {
            self.bytes += change.approx_bytes();
            self.changes.push_back(Arc::clone(change));
        }
        while self.bytes > self.budget
            && let Some(old) = self.changes.pop_front()
        {
            self.bytes -= old.approx_bytes();
            self.floor = old.position;
        }
    }

    /// Forgets everything: memory now reaches back to `floor` only.
    pub(crate) fn forget(&mut self, floor: Position) {
        self.changes.clear();
        self.bytes = 0;
        self.floor = floor;
    }

    /// The changes of `tenant` (and public ones) after `after`, at most `max` of them and
    /// about `max_bytes` (at least one), and whether more follow. `None` when memory no
    /// longer reaches back to `after`: the caller reads the journal.
    pub(crate) fn after(
        &self,
        after: Position,
        tenant: &str,
        max: usize,
        max_bytes: usize,
    ) -> Option<(Vec<Arc<Change>>, bool)> {
        if after < self.floor {
            return None;
        }
        let start = self.changes.partition_point(|c| c.position <= after);
        let mut found = Vec::new();
        let mut bytes = 0;
        for change in self.changes.range(start..) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(commit: i64, tenant: Option<&str>) -> Arc<Change> {
        Change::for_test(commit, tenant)
    }

    fn commits(found: Option<(Vec<Arc<Change>>, bool)>) -> Option<(Vec<i64>, bool)> {
        found.map(|(changes, more)| (changes.iter().map(|c| c.position.commit).collect(), more))
    }

    #[test]
    fn recent_changes_serve_catch_ups_while_memory_reaches_back() {
        let at = |commit| Position { commit, ord: 1 };
        let one = change(1, Some("a")).approx_bytes();
        // Room for three changes: the fourth evicts the first.
        let mut recent = Recent::new(at(10), 3 * one);
        // Nothing published yet: memory reaches back to the starting head, not before.
        assert_eq!(
            commits(recent.after(at(10), "a", 10, usize::MAX)),
            Some((vec![], false))
        );
        assert_eq!(commits(recent.after(at(9), "a", 10, usize::MAX)), None);
        recent.push(&[
            change(11, Some("a")),
            change(12, Some("b")),
            change(13, None),
        ]);
        // By tenant, public changes to everyone, strictly after the position.
        assert_eq!(
            commits(recent.after(at(10), "a", 10, usize::MAX)),
            Some((vec![11, 13], false))
        );
        assert_eq!(
            commits(recent.after(at(11), "b", 10, usize::MAX)),
            Some((vec![12, 13], false))
        );
        assert_eq!(
            commits(recent.after(at(13), "a", 10, usize::MAX)),
            Some((vec![], false))
        );
        // At most `max`, and says so.
        assert_eq!(
            commits(recent.after(at(10), "a", 1, usize::MAX)),
            Some((vec![11], true))
        );
        // Commit 11 leaves memory: positions before it must go to the journal.
        recent.push(&[change(14, Some("a"))]);
        assert_eq!(commits(recent.after(at(10), "a", 10, usize::MAX)), None);
        assert_eq!(
            commits(recent.after(at(11), "a", 10, usize::MAX)),
            Some((vec![13, 14], false))
        );
        // About `max_bytes`, but at least one.
        assert_eq!(
            commits(recent.after(at(11), "a", 10, 1)),
            Some((vec![13], true))
        );
        assert_eq!(
            commits(recent.after(at(11), "a", 10, one + 1)),
            Some((vec![13, 14], false))
        );
        // Forgotten (a gap in the feed: the listener found everything up to commit 20
        // pruned): memory no longer answers for anything before it, not even for the old
        // head.
        recent.forget(at(20));
        assert_eq!(commits(recent.after(at(14), "a", 10, usize::MAX)), None);
        assert_eq!(
            commits(recent.after(at(20), "a", 10, usize::MAX)),
            Some((vec![], false))
        );
        // Turned off: always the journal, except at the head itself.
        let mut off = Recent::new(at(0), 0);
        off.push(&[change(1, Some("a"))]);
        assert_eq!(commits(off.after(at(0), "a", 10, usize::MAX)), None);
    }
}
