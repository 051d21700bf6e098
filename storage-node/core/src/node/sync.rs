//! When the log syncs.
//!
//! The driver syncs the log store on its own thread, one sync at a time, each covering
//! everything written before it started ([`Effect::StartSync`] →
//! [`NodeCore::log_synced`]); the core goes on proposing, writing and answering early
//! acknowledgements meanwhile. A Ready written to the log waits in `unsynced` until a
//! sync covers it; then raft-rs is told it is persisted and its votes and append
//! responses go out.
//!
//! Once writes are answered when a quorum has *written* them, only a flush, a FUA write,
//! a read, a vote or a commit-acknowledged write (metadata, site-durable volumes) waits
//! for a sync; a burst of early-answered writes does not. So the written log syncs at
//! once only when it is *urgent*: a Ready changed the term or vote or installed a
//! snapshot, a group is the metadata group or site-durable, a read waits on this
//! replica, `LAZY_SYNC_BYTES_MAX` of entries or `lazy_sync_held_max` held messages wait,
//! or the leader asked ([`SyncWanted`]). A leader asks when its commit is awaited
//! (`GroupCore::commit_awaited`). Otherwise the sync starts `SYNC_LAZY_MAX` after the
//! oldest unsynced write. While syncs run back to back, a written Ready waits up to
//! `SYNC_GATHER` for others to share its fsync.

use std::time::Duration;

use raft::eraftpb::Message;

use crate::ids::{GroupId, LogIndex, Term};
use crate::logstore::LogStore;
use crate::time::Time;

use super::api::{Effect, SyncWanted};
use super::group::Out;
use super::out;
use super::ready::{commit_view, note_commit, send_persisted};
use super::{CoreError, NodeCore};

/// How long a written Ready waits for others to share its fsync while syncs run back to
/// back (no sync in flight, one ended within `SYNC_GATHER_BUSY`).
pub const SYNC_GATHER: Duration = Duration::from_micros(300);
/// Gathering applies only while syncs run back to back: one ended this recently.
pub const SYNC_GATHER_BUSY: Duration = Duration::from_millis(2);
/// Longest a written log waits for its sync when nothing but writes already answered
/// (`Ack::Written`) waits on it.
pub const SYNC_LAZY_MAX: Duration = Duration::from_millis(10);
/// Messages held for a put-off sync (append and heartbeat responses) that make it
/// urgent: raft-rs keeps at most 64 appends in flight per follower, and stops sending to
/// one whose responses do not come back.
pub const LAZY_SYNC_HELD_MAX: usize = 32;

/// Held messages that make a put-off sync urgent with `max_inflight_msgs` appends in
/// flight per follower: `LAZY_SYNC_HELD_MAX`, or half the window if that is smaller. A
/// follower holding a whole window of append responses pauses its leader until the lazy
/// sync (measured with a window of 8, ABAB: with the threshold at 32 a QD1 4 KiB writer
/// stalled 8 ms every 10 ms, p99 8.3-9.0 ms; at half the window, p99 0.82-1.34 ms).
pub fn lazy_sync_held_max(max_inflight_msgs: usize) -> usize {
    LAZY_SYNC_HELD_MAX.min(max_inflight_msgs / 2).max(1)
}

/// Written bytes of entries that make a put-off sync urgent. Putting off pays where
/// syncs cost latency (bursts of small writes, then FLUSH), not where they cost
/// bandwidth: large writes sync as they come (measured: 1 MiB writes lost 10 % at 8 MiB).
pub const LAZY_SYNC_BYTES_MAX: u64 = 1 << 20;

/// A Ready written to the log, waiting for a sync to cover it.
pub(super) struct Unsynced {
    pub group: GroupId,
    /// Its number, for `RaftGroup::on_persisted`.
    pub number: u64,
    /// Messages that promise its state durable (votes, append responses).
    pub persisted: Vec<Message>,
    /// Its last entry's index (0: it wrote no entries), and that entry's term: the synced mark rises to `last`
    /// only if the log still holds that entry when the sync ends (a Ready written while
    /// the sync ran may have replaced it, and the sync need not cover the replacement).
    pub last: u64,
    pub last_term: u64,
    /// The group's term when it was written (its hard state's, if it wrote one).
    pub term: u64,
    /// Bytes of entries it wrote.
    pub bytes: u64,
    /// It changed the term or the vote, or installed a snapshot: an election or a
    /// catch-up waits on it, so its sync is never put off.
    pub urgent: bool,
}

pub(super) struct SyncState {
    /// Readies written but not yet covered by a sync.
    pub unsynced: Vec<Unsynced>,
    /// Readies the sync in flight covers.
    pub syncing: Vec<Unsynced>,
    /// A sync is in flight.
    pub in_flight: bool,
    /// Something waits on the unsynced Readies beyond writes already answered: they
    /// sync now, not within `SYNC_LAZY_MAX`.
    pub urgent: bool,
    /// When the oldest Ready in `unsynced` was written.
    pub unsynced_since: Option<Time>,
    /// When the last sync ended.
    pub ended: Time,
    /// The next sync starts at once, whatever waits on it (opening, shutting down).
    pub forced: bool,
}

impl SyncState {
    pub fn new(now: Time) -> SyncState {
        SyncState {
            unsynced: Vec::new(),
            syncing: Vec::new(),
            in_flight: false,
            urgent: false,
            unsynced_since: None,
            ended: now,
            forced: false,
        }
    }

    /// When the next sync should start, if anything waits for one. Under load (a sync
    /// ended within `SYNC_GATHER_BUSY`), `SYNC_GATHER` after the oldest write it would
    /// cover, so that a burst of writes arriving over a few rounds shares one fsync;
    /// otherwise at once (a lone write, such as a site-durable QD1 write, must not wait
    /// for company). When nothing waits on the written log but writes already answered,
    /// `SYNC_LAZY_MAX` after the oldest write: the next FLUSH then costs one fsync per
    /// replica instead of the several a burst of writes would start.
    fn due(&self, now: Time) -> Option<Time> {
        let since = self.unsynced_since?;
        if self.forced {
            return Some(since);
        }
        if !self.urgent {
            return Some(since + SYNC_LAZY_MAX);
        }
        let busy = now.saturating_duration_since(self.ended) < SYNC_GATHER_BUSY;
        Some(if busy { since + SYNC_GATHER } else { since })
    }
}

impl<S: LogStore> NodeCore<S> {
    /// When the driver should call [`NodeCore::process`] next even if no input arrives
    /// (a sync to start), if ever. Ticks are the driver's own schedule.
    pub fn next_wakeup(&self, now: Time) -> Option<Time> {
        if self.sync.in_flight {
            return None;
        }
        self.sync.due(now)
    }

    /// A sync is in flight.
    pub fn sync_in_flight(&self) -> bool {
        self.sync.in_flight
    }

    /// Something written waits for a sync.
    pub fn sync_pending(&self) -> bool {
        self.sync.in_flight || !self.sync.unsynced.is_empty()
    }

    /// Starts a sync of everything written as soon as none is in flight, without
    /// gathering or putting off (opening, shutting down). The driver then waits for
    /// [`NodeCore::sync_pending`] to turn false, reporting each sync's end.
    pub fn sync_now(&mut self, now: Time) {
        if !self.sync.unsynced.is_empty() {
            self.sync.forced = true;
        }
        self.start_sync_if_due(now);
    }

    /// Decides whether the written log syncs now or may wait (`urgent`), and, on leaders
    /// whose commit is awaited, asks the other replicas to sync too.
    pub(super) fn want_syncs(&mut self) {
        let me = self.cfg.me;
        for (&id, g) in self.groups.iter_mut() {
            if !g.raft.is_leader() {
                continue;
            }
            let awaited = g.commit_awaited();
            g.read_asked = false;
            let last = g.raft.last_index().0;
            let term = g.raft.term().0;
            if !awaited || (g.sync_wanted.term == term && g.sync_wanted.index >= last) {
                continue;
            }
            let want = SyncWanted { term, index: last };
            g.sync_wanted = want;
            if !g.early_allowed() {
                // Nothing is answered early there: voters sync at once anyway.
                continue;
            }
            // Learners too: a move promotes one only once it has caught up.
            for p in g.raft.progress() {
                if p.node != me {
                    self.effects.push(Effect::SyncWanted {
                        to: p.node,
                        group: id,
                        epoch: g.epoch,
                        want,
                    });
                }
            }
        }
        let s = &self.sync;
        let bytes: u64 = s.unsynced.iter().map(|u| u.bytes).sum();
        let held: usize = s.unsynced.iter().map(|u| u.persisted.len()).sum();
        let urgent = held >= lazy_sync_held_max(self.cfg.group.max_inflight_msgs)
            || bytes >= LAZY_SYNC_BYTES_MAX
            || s.unsynced
                .iter()
                .any(|u| u.urgent || self.groups.get(&u.group).is_none_or(|g| g.sync_urgent()));
        self.sync.urgent = urgent;
    }

    /// Starts a sync of everything written so far, unless one is running (the next
    /// starts when it ends, covering what was written meanwhile: syncs pipeline with
    /// writes).
    pub(super) fn start_sync_if_due(&mut self, now: Time) {
        if self.sync.in_flight || self.sync.due(now).is_none_or(|due| due > now) {
            return;
        }
        self.sync.in_flight = true;
        self.sync.forced = false;
        let s = &mut self.sync;
        std::mem::swap(&mut s.syncing, &mut s.unsynced);
        s.unsynced_since = None;
        self.effects.push(Effect::StartSync);
    }

    /// The sync in flight ended: its Readies are persisted; send the messages that
    /// promised it, then decide the next sync. An error is the log store's: the node
    /// must stop (what the sync covered may not be durable).
    pub fn log_synced(&mut self, now: Time, result: Result<(), String>) -> Result<(), CoreError> {
        if !self.sync.in_flight {
            return Err(CoreError::Invalid(
                "a sync ended that was not started".into(),
            ));
        }
        result.map_err(|e| CoreError::Store(crate::logstore::StoreError::Backend(e)))?;
        self.sync.in_flight = false;
        self.sync.ended = now;
        let observe = self.cfg.observe;
        let mut out = out!(self, now);
        for u in std::mem::take(&mut self.sync.syncing) {
            let Some(g) = self.groups.get_mut(&u.group) else {
                continue;
            };
            let before = observe.then(|| commit_view(g));
            if u.last > g.synced_to && g.raft.log_term(LogIndex(u.last)) == Some(Term(u.last_term))
            {
                // Log matching: the entry still there means every entry before it is too.
                g.synced_to = u.last;
            }
            g.term_synced = g.term_synced.max(u.term);
            g.raft.on_persisted(u.number);
            if g.recovery_unsynced.is_some_and(|n| n <= u.number) {
                g.recovery_unsynced = None;
            }
            if g.applied > g.raft.applied_index() {
                g.raft.advance_apply_to(g.applied);
                g.complete_reads(&mut out);
            }
            send_persisted(g, u.persisted, out.effects);
            if let Some(b) = before {
                note_commit(g, b, out.effects);
            }
        }
        // A recovery record it made durable lets its copy start.
        self.publish_recovering();
        // What was urgent may have been this sync: decide again for what is left.
        self.want_syncs();
        self.start_sync_if_due(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{lazy_sync_held_max, LAZY_SYNC_HELD_MAX};

    #[test]
    fn held_messages_make_a_sync_urgent_before_a_window_fills() {
        // The default window (64) keeps the fixed threshold.
        assert_eq!(lazy_sync_held_max(64), LAZY_SYNC_HELD_MAX);
        assert_eq!(lazy_sync_held_max(1024), LAZY_SYNC_HELD_MAX);
        // A smaller window syncs at half of it, so a leader never waits out a lazy sync
        // with its window full.
        for w in [1, 2, 3, 8, 16, 63] {
            let t = lazy_sync_held_max(w);
            assert!(t >= 1 && t < w.max(2), "window {w}: threshold {t}");
        }
        assert_eq!(lazy_sync_held_max(8), 4);
    }
}
