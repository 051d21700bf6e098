//! How far a quorum of voters has *written* the log: entries handed to the operating
//! system (they survive the process, not yet a power loss), before the fsync that Raft's
//! own acknowledgements wait for.
//!
//! A volume write without FUA may be acknowledged at that point (NBD lets a server
//! acknowledge a write before it is durable; FLUSH and FUA make it so). It is safe
//! against any number of process crashes by Raft's own argument: an entry of the current
//! term stored on a majority of voters is in the log of every later leader (a voter
//! grants its vote only to a log at least as up to date as its own), so it commits. Raft
//! itself is untouched: its append responses still follow the fsync, so what it counts
//! as committed stays durable across power loss.
//!
//! Followers report `(term, index, log_term)` after each write of entries; the leader
//! takes a report only from its own term and only if its log has `log_term` at `index`
//! (log matching: the follower's log then equals the leader's up to `index`, and within
//! one term the leader never sends anything that would replace it).

use std::collections::HashMap;

use crate::ids::{LogIndex, NodeId, Term};

#[derive(Debug, Default)]
pub struct WrittenTracker {
    term: Term,
    own: u64,
    peers: HashMap<NodeId, u64>,
}

impl WrittenTracker {
    fn enter(&mut self, term: Term) {
        if term != self.term {
            self.term = term;
            self.own = 0;
            self.peers.clear();
        }
    }

    /// This node (the leader) wrote its log up to `index` in `term`.
    pub fn own_written(&mut self, term: Term, index: LogIndex) {
        self.enter(term);
        self.own = self.own.max(index.0);
    }

    /// A follower reported its log written up to `index`, matching ours there, in `term`
    /// (the caller has checked both).
    pub fn peer_written(&mut self, term: Term, from: NodeId, index: LogIndex) {
        self.enter(term);
        let w = self.peers.entry(from).or_default();
        *w = (*w).max(index.0);
    }

    /// Forgets what `from` reported: it lost its log since (it rejected an append of
    /// this term, or rebooted and is quarantined). Its next reports count again.
    pub fn forget(&mut self, from: NodeId) {
        self.peers.remove(&from);
    }

    /// The highest index written on a majority of `voters` and, while a membership change
    /// is joint, of `outgoing` too. `matched` is Raft's match index (synced, so written).
    pub fn quorum(
        &self,
        term: Term,
        me: NodeId,
        voters: &[NodeId],
        outgoing: &[NodeId],
        matched: impl Fn(NodeId) -> u64,
    ) -> LogIndex {
        let of = |n: NodeId| {
            let written = if term != self.term {
                0
            } else if n == me {
                self.own
            } else {
                self.peers.get(&n).copied().unwrap_or(0)
            };
            written.max(matched(n))
        };
        let majority = |set: &[NodeId]| {
            let mut v: Vec<u64> = set.iter().map(|&n| of(n)).collect();
            v.sort_unstable_by(|a, b| b.cmp(a));
            v.get(v.len() / 2).copied()
        };
        let q = match (majority(voters), majority(outgoing)) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) => a,
            (None, _) => 0,
        };
        LogIndex(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[u64]) -> Vec<NodeId> {
        v.iter().copied().map(NodeId).collect()
    }

    #[test]
    fn a_majority_of_writers_decides_and_synced_matches_count() {
        let mut t = WrittenTracker::default();
        let term = Term(3);
        t.own_written(term, LogIndex(10));
        // Alone of three: nothing is on a majority beyond what Raft has matched.
        assert_eq!(
            t.quorum(term, NodeId(1), &ids(&[1, 2, 3]), &[], |_| 4),
            LogIndex(4)
        );
        t.peer_written(term, NodeId(3), LogIndex(7));
        assert_eq!(
            t.quorum(term, NodeId(1), &ids(&[1, 2, 3]), &[], |_| 4),
            LogIndex(7)
        );
        // A synced match index ahead of the written report counts.
        let matched = |n: NodeId| if n == NodeId(2) { 9 } else { 0 };
        assert_eq!(
            t.quorum(term, NodeId(1), &ids(&[1, 2, 3]), &[], matched),
            LogIndex(9)
        );
        // Reports never go backwards.
        t.peer_written(term, NodeId(3), LogIndex(5));
        assert_eq!(
            t.quorum(term, NodeId(1), &ids(&[1, 2, 3]), &[], |_| 0),
            LogIndex(7)
        );
    }

    #[test]
    fn a_forgotten_report_no_longer_counts() {
        let mut t = WrittenTracker::default();
        let term = Term(4);
        t.own_written(term, LogIndex(30));
        t.peer_written(term, NodeId(2), LogIndex(30));
        assert_eq!(
            t.quorum(term, NodeId(1), &ids(&[1, 2, 3]), &[], |_| 10),
            LogIndex(30)
        );
        t.forget(NodeId(2));
        assert_eq!(
            t.quorum(term, NodeId(1), &ids(&[1, 2, 3]), &[], |_| 10),
            LogIndex(10)
        );
        t.peer_written(term, NodeId(2), LogIndex(12));
        assert_eq!(
            t.quorum(term, NodeId(1), &ids(&[1, 2, 3]), &[], |_| 10),
            LogIndex(12)
        );
    }

    #[test]
    fn a_joint_configuration_needs_both_majorities() {
        let mut t = WrittenTracker::default();
        let term = Term(1);
        t.own_written(term, LogIndex(20));
        t.peer_written(term, NodeId(2), LogIndex(20));
        t.peer_written(term, NodeId(5), LogIndex(12));
        // Incoming {1,4,5}: 1 and 5 → 12; outgoing {1,2,3}: 1 and 2 → 20.
        let q = t.quorum(term, NodeId(1), &ids(&[1, 4, 5]), &ids(&[1, 2, 3]), |_| 0);
        assert_eq!(q, LogIndex(12));
    }

    #[test]
    fn reports_of_another_term_do_not_count() {
        let mut t = WrittenTracker::default();
        t.own_written(Term(2), LogIndex(8));
        t.peer_written(Term(2), NodeId(2), LogIndex(8));
        assert_eq!(
            t.quorum(Term(3), NodeId(1), &ids(&[1, 2, 3]), &[], |_| 1),
            LogIndex(1)
        );
        // A new term forgets the old reports.
        t.own_written(Term(3), LogIndex(9));
        assert_eq!(
            t.quorum(Term(3), NodeId(1), &ids(&[1, 2, 3]), &[], |_| 1),
            LogIndex(1)
        );
        // One voter of one: its own write is a majority.
        assert_eq!(
            t.quorum(Term(3), NodeId(1), &ids(&[1]), &[], |_| 0),
            LogIndex(9)
        );
    }
}
