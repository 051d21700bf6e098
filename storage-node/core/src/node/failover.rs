//! A forced failover as each node carries it out, from the metadata alone.
//!
//! `MetaCommand::Failover` starts a new *epoch* of a volume's group: the group re-forms
//! from one surviving replica (the plan's, the most advanced one outside the lost home),
//! which alone votes at first; the mover then places the voters at the failover's site
//! as in a move. Every node applies the command and, for its replica of the volume, in
//! [`NodeCore::reconcile_epochs`]:
//!
//! - **the source** keeps its whole log, writes the new membership and a term above every
//!   survivor's (`term_floor`), and campaigns: alone, it wins at once, and the entry of
//!   its term commits every entry of its log, so whatever it held (answered early or
//!   not) is applied;
//! - **another survivor** keeps its log if everything it knew committed is below the
//!   plan's commit (its log then agrees with the source's up to there; Raft replaces any
//!   other tail) and its data holds nothing newer (no copy running, none made from a
//!   later state), and otherwise starts empty and copies the blocks that differ, as
//!   after a snapshot;
//! - **a replica of the lost home** is *fenced*: its group stops (no Raft, no answers),
//!   and its data and log stay as they were: the divergent writes it may hold are kept
//!   and reported until `DiscardDivergent`, which makes it start empty as a learner and
//!   copy the blocks that differ (an incremental resync, never a full copy).
//!
//! Fencing: every frame about a group carries the sender's epoch and a receiver drops any
//! other epoch's, so the old home (cut off, not knowing yet) can never reach the new
//! group, and requests carry the epoch their connection started in. A membership change
//! carries its epoch too, and one of an older epoch is skipped at apply: the old home's
//! changes in the source's log never act on the new group. The old home stops answering
//! once its lease runs out (`lease`); every replica of the new epoch holds its answers
//! for `lease + drift` after it applied the failover, so the two never overlap.
//!
//! Entries before the epoch's first index are never sent to a replica that lacks them
//! (`GroupStorage` reports them compacted to raft-rs): a replica that joins the new epoch
//! takes a snapshot, whose membership is the re-formed one, and copies blocks.

use raft::eraftpb::{ConfState, HardState};

use std::collections::BTreeSet;

use crate::command::VolumeCommand;
use crate::group::entry_stamp;
use crate::ids::{GroupId, LogIndex, BLOCK_BYTES};
use crate::logstore::{GroupState, LogBatch, LogOp, LogStore};
use crate::meta::{FailoverRecord, VolumeInfo};
use crate::time::Time;

use super::api::{Divergence, Refused, ReplicaReport};

/// How long a replica that reported for a failover being executed installs no snapshot
/// (`NodeCore::replica_report_holding`). A snapshot from the old home, back between the
/// plan and its commit, would leave the replica copying blocks; re-formed from it, a
/// group whose only voter copies from nobody stops for good (the site-loss simulation
/// found it: a plan whose `execute` timed out committed late, after the home returned).
/// Longer than a metadata commit takes while it has a quorum; a failover that commits
/// later than this from a replica that took a snapshot meanwhile is the one case left
/// (README: plan again from a whole replica).
pub const FAILOVER_HOLD: std::time::Duration = std::time::Duration::from_secs(30);

/// Divergent entries a report reads at most; past it the report says it is incomplete.
pub const DIVERGENT_SCAN_ENTRIES_MAX: u64 = 1 << 20;
/// Distinct blocks a report counts exactly; past it the count is a lower bound.
pub const DIVERGENT_BLOCKS_MAX: usize = 1 << 22;
use super::group::Out;
use super::{recovering_key, recovery, CoreError, NodeCore};

/// Record of a group's epoch on this node (value: the epoch and its first log index).
pub fn epoch_key(group: GroupId) -> Vec<u8> {
    let mut k = b"epoch/".to_vec();
    k.extend_from_slice(&group.0.to_be_bytes());
    k
}

/// Record that a group of a new epoch has not finished its fencing wait (see the module
/// doc): a restart waits again.
pub fn hold_key(group: GroupId) -> Vec<u8> {
    let mut k = b"hold/".to_vec();
    k.extend_from_slice(&group.0.to_be_bytes());
    k
}

/// Record that this replica holds still for a failover being executed (see
/// `FAILOVER_HOLD`): a restart holds again for as long.
pub fn failover_hold_key(group: GroupId) -> Vec<u8> {
    let mut k = b"fhold/".to_vec();
    k.extend_from_slice(&group.0.to_be_bytes());
    k
}

/// Record that a failover fenced this replica (value: the epoch that fenced it).
pub fn fenced_key(group: GroupId) -> Vec<u8> {
    let mut k = b"fenced/".to_vec();
    k.extend_from_slice(&group.0.to_be_bytes());
    k
}

/// An epoch record: the epoch and its first log index.
pub(super) fn encode_epoch(epoch: u64, start: u64) -> Vec<u8> {
    let mut v = epoch.to_be_bytes().to_vec();
    v.extend_from_slice(&start.to_be_bytes());
    v
}

pub(super) fn decode_epoch(v: &[u8]) -> Option<(u64, u64)> {
    let epoch = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let start = u64::from_be_bytes(v.get(8..16)?.try_into().ok()?);
    (v.len() == 16).then_some((epoch, start))
}

/// What this node does with its replica of a volume whose epoch moved on.
#[derive(Debug, PartialEq, Eq)]
enum Action {
    /// Fence it: it was at the lost home.
    Fence,
    /// Re-form the group from it.
    Source,
    /// Keep its log and join the new epoch.
    Keep,
    /// Start empty (blocks copied by hash diff) and join the new epoch.
    Wipe,
}

impl<S: LogStore> NodeCore<S> {
    /// Carries out failovers and discards of divergent writes for this node's replicas
    /// (see the module doc); runs before the groups the metadata places are created.
    pub(super) fn reconcile_epochs(&mut self, now: Time) -> Result<(), CoreError> {
        let me = self.cfg.me;
        let mut todo: Vec<(GroupId, Action, VolumeInfo)> = Vec::new();
        for v in self.cluster.volumes.values() {
            let g = v.id.group();
            let Some(group) = self.groups.get(&g) else {
                continue;
            };
            let divergent = v.divergent.iter().any(|d| d.node == me);
            let action = if divergent {
                if group.fenced.is_some() {
                    continue;
                }
                Action::Fence
            } else if !v.replicas_on(me) {
                continue;
            } else if group.fenced.is_some() {
                // Its divergent writes were discarded: back as a learner.
                Action::Wipe
            } else if group.epoch == v.epoch {
                continue;
            } else if v.failover.as_ref().is_some_and(|f| f.node == me) {
                Action::Source
            } else {
                let committed = v.failover.as_ref().map_or(0, |f| f.committed);
                // Its log agrees with the source's up to its commit, and its data holds
                // no block newer than that: neither copied from a later state of the old
                // group (`serve_after`, the simulation's seed 39: a learner re-copied from
                // the old home after the plan kept blocks the new epoch never wrote) nor
                // half copied.
                if group.raft.commit_index().0 <= committed
                    && group.serve_after <= committed
                    && group.recovering.is_none()
                {
                    Action::Keep
                } else {
                    Action::Wipe
                }
            };
            todo.push((g, action, v.clone()));
        }
        for (g, action, v) in todo {
            tracing::warn!(volume = %v.name, group = %g, epoch = v.epoch, ?action,
                "the volume failed over: this replica changes epoch");
            let fenced = action == Action::Fence;
            match action {
                Action::Fence => self.fence(g, v.epoch)?,
                Action::Source => self.reform(now, g, &v, true)?,
                Action::Keep => self.reform(now, g, &v, false)?,
                Action::Wipe => self.restart_empty(now, g, &v)?,
            }
            if self.cfg.observe {
                let epoch = self.groups.get(&g).map_or(v.epoch, |x| x.epoch);
                self.effects
                    .push(super::api::Effect::Note(super::api::Note::Epoch {
                        group: g,
                        epoch,
                        fenced,
                    }));
            }
        }
        Ok(())
    }

    /// The first log index of `v`'s current epoch (entries before it belong to the old
    /// group; see `GroupStorage`).
    fn epoch_start(v: &VolumeInfo) -> u64 {
        v.failover.as_ref().map_or(0, |f| f.index + 1)
    }

    /// Refuses everything waiting on the old incarnation of `g` (its callers retry in
    /// the new epoch, or give up).
    fn refuse_old(&mut self, g: GroupId, epoch: u64) {
        let Some(group) = self.groups.get_mut(&g) else {
            return;
        };
        let why = Refused::Fenced {
            group: g,
            epoch,
            asked: group.epoch,
        };
        let mut out = Out::refusing(&mut self.effects, &self.stats, self.cfg.observe);
        group.fail_all(why, &mut out);
    }

    /// Stops the group of a replica at the lost home: no Raft, no answers; data and log
    /// stay as they are (recorded, so a restart keeps it fenced).
    fn fence(&mut self, g: GroupId, epoch: u64) -> Result<(), CoreError> {
        self.refuse_old(g, epoch);
        let mut b = LogBatch::default();
        b.push(LogOp::Put {
            key: fenced_key(g),
            value: epoch.to_be_bytes().to_vec(),
        });
        self.log.write(b)?;
        self.log.sync()?;
        let group = self.groups.get_mut(&g).expect("listed");
        group.fenced = Some(epoch);
        self.effects.push(super::api::Effect::Leader {
            group: g,
            leader: None,
        });
        // A block copy it ran stops: its data stays as the failover found it.
        self.publish_recovering();
        Ok(())
    }

    /// Joins the new epoch with this replica's log: the new membership, a term above
    /// every survivor's, and (`source`) a campaign, which this replica, voting alone,
    /// wins at once.
    fn reform(
        &mut self,
        now: Time,
        g: GroupId,
        v: &VolumeInfo,
        source: bool,
    ) -> Result<(), CoreError> {
        self.refuse_old(g, v.epoch);
        let st = self
            .log
            .state(g)?
            .ok_or_else(|| CoreError::Invalid(format!("group {g} vanished")))?;
        let floor = v.failover.as_ref().map_or(0, |f| f.term_floor);
        let mut hs = HardState::default();
        hs.term = st.hard_state.term.max(floor);
        hs.vote = 0;
        hs.commit = st.hard_state.commit;
        let mut cs = ConfState::default();
        cs.voters = v.voters.iter().map(|n| n.0).collect();
        cs.learners = v.learners.iter().map(|n| n.0).collect();
        let mut b = LogBatch::default();
        b.push(LogOp::HardState {
            group: g,
            hard_state: hs,
        });
        b.push(LogOp::ConfState {
            group: g,
            conf_state: cs,
            index: st.conf_index,
        });
        self.epoch_records(&mut b, g, v);
        // A rebooted voter's quarantine belongs to the old group.
        b.push(LogOp::Delete {
            key: recovery::quarantine_key(g),
        });
        self.log.write(b)?;
        self.log.sync()?;
        self.reopen(now, g, false)?;
        if source {
            let group = self.groups.get_mut(&g).expect("reopened");
            group.raft.campaign()?;
            self.election.fix(group);
            tracing::warn!(volume = %v.name, group = %g, "re-formed the group from this replica");
        }
        Ok(())
    }

    /// Joins the new epoch empty: the leader sends a snapshot (entries before the epoch
    /// are never sent, see the module doc) and this replica copies the blocks that
    /// differ from the leader's, keeping its extent file (a resync, not a full copy).
    fn restart_empty(&mut self, now: Time, g: GroupId, v: &VolumeInfo) -> Result<(), CoreError> {
        self.refuse_old(g, v.epoch);
        let mut b = LogBatch::default();
        b.push(LogOp::Remove { group: g });
        b.push(LogOp::Create {
            group: g,
            state: GroupState::default(),
        });
        b.push(LogOp::Put {
            key: recovering_key(g),
            value: 0u64.to_be_bytes().to_vec(),
        });
        for key in [
            recovery::synced_key(g),
            recovery::quarantine_key(g),
            fenced_key(g),
            super::whole_key(g),
        ] {
            b.push(LogOp::Delete { key });
        }
        self.epoch_records(&mut b, g, v);
        self.log.write(b)?;
        self.log.sync()?;
        self.reopen(now, g, true)?;
        self.publish_recovering();
        Ok(())
    }

    /// The records of `v`'s epoch for `g`: the epoch and its start, and the fencing wait
    /// (a hold for the failover is over).
    fn epoch_records(&self, b: &mut LogBatch, g: GroupId, v: &VolumeInfo) {
        b.push(LogOp::Delete {
            key: failover_hold_key(g),
        });
        b.push(LogOp::Put {
            key: epoch_key(g),
            value: encode_epoch(v.epoch, Self::epoch_start(v)),
        });
        if self.cfg.lease.is_some() {
            b.push(LogOp::Put {
                key: hold_key(g),
                value: Vec::new(),
            });
        }
    }

    /// Opens `g` again from the log store (its state changed underneath; the callers
    /// synced it). The Readies of the old incarnation waiting for a sync are dropped: their
    /// numbers are the old `RawNode`'s, and a sync credited to the new one with them
    /// marked its first entries persisted before any sync covered them (the site-loss
    /// simulation, seed 110: a re-formed source committed its first entry alone, unsynced).
    /// `wiped`: it starts empty (and copies), so nothing of the old one carries over.
    fn reopen(&mut self, now: Time, g: GroupId, wiped: bool) -> Result<(), CoreError> {
        self.sync.unsynced.retain(|u| u.group != g);
        self.sync.syncing.retain(|u| u.group != g);
        if self.sync.unsynced.is_empty() {
            self.sync.unsynced_since = None;
        }
        let old = self.groups.remove(&g).expect("listed");
        self.open_group(g, now)?;
        let group = self.groups.get_mut(&g).expect("opened");
        group.policy = old.policy;
        group.term_synced = group.raft.term().0;
        if !wiped && old.recovering.is_none() && group.recovering.is_some() {
            // A copy this process accepted whose record the next checkpoint drops (its
            // data is not synced yet): the replica is whole, as it was a moment ago.
            // Reopened as recovering, a source that votes alone would wait for a copy
            // from nobody (the site-loss simulation found it, seed 60).
            group.recovering = None;
            group.recovery_record_stale = true;
            group.serve_after = group.serve_after.max(old.serve_after);
        }
        Ok(())
    }

    /// Records and in-memory state of a new replica of `v`, created in epoch `v.epoch`:
    /// it awaits a snapshot (its membership comes with it).
    pub(super) fn new_replica_state(&self, v: &VolumeInfo, b: &mut LogBatch) -> GroupState {
        let g = v.id.group();
        if v.epoch == 0 {
            let mut cs = ConfState::default();
            cs.voters = v.initial_voters.iter().map(|n| n.0).collect();
            cs.learners = v.initial_learners.iter().map(|n| n.0).collect();
            return GroupState {
                conf_state: cs,
                ..Default::default()
            };
        }
        self.epoch_records(b, g, v);
        b.push(LogOp::Put {
            key: recovering_key(g),
            value: 0u64.to_be_bytes().to_vec(),
        });
        GroupState::default()
    }

    /// Ends the fencing waits that have passed, dropping their records.
    pub(super) fn end_holds(&mut self, now: Time) -> Result<(), CoreError> {
        let mut b = LogBatch::default();
        for (&g, group) in self.groups.iter_mut() {
            if group.failover_hold.is_some_and(|h| now >= h) {
                group.failover_hold = None;
                b.push(LogOp::Delete {
                    key: failover_hold_key(g),
                });
            }
            if group.hold_until.is_some_and(|h| now >= h) {
                group.hold_until = None;
                tracing::info!(group = %g, epoch = group.epoch,
                    "fencing wait over: the new epoch answers");
                b.push(LogOp::Delete { key: hold_key(g) });
            }
        }
        if !b.is_empty() {
            self.log.write(b)?;
        }
        Ok(())
    }

    /// What this node's fenced replica of `g` holds past the divergence point of failover
    /// `rec`: its log's entries after the last index it shares with the re-formed group
    /// (`rec.index` if its entry there has `rec.term`, else `rec.committed`, up to which
    /// every replica agreed). `None` unless the replica is fenced.
    pub fn divergence(
        &self,
        g: GroupId,
        rec: &FailoverRecord,
    ) -> Result<Option<Divergence>, CoreError> {
        let Some(group) = self.groups.get(&g).filter(|x| x.fenced.is_some()) else {
            return Ok(None);
        };
        let _ = group;
        let st = self
            .log
            .state(g)?
            .ok_or_else(|| CoreError::Invalid(format!("group {g} vanished")))?;
        let last = self.log.last_index(g)?;
        let from = if self.log.term(g, rec.index)? == Some(rec.term) {
            rec.index
        } else {
            rec.committed
        }
        .min(last);
        let mut d = Divergence {
            node: self.cfg.me.0,
            last_index: last,
            from_index: from,
            complete: st.truncated_index <= from,
            ..Default::default()
        };
        let mut blocks = BTreeSet::new();
        let mut next = (from + 1).max(st.truncated_index + 1);
        let end = last.min(from.saturating_add(DIVERGENT_SCAN_ENTRIES_MAX));
        if end < last {
            d.complete = false;
        }
        while next <= end {
            let entries = self.log.entries(g, next, end + 1, 16 << 20)?;
            if entries.is_empty() {
                break;
            }
            next += entries.len() as u64;
            for e in &entries {
                d.entries += 1;
                if let Some(t) = entry_stamp(e) {
                    d.first_unix_ms.get_or_insert(t);
                    d.last_unix_ms = Some(t);
                }
                let range = match VolumeCommand::decode(&e.data) {
                    Ok(VolumeCommand::Write { offset, data }) => {
                        d.writes += 1;
                        d.bytes += data.len() as u64;
                        Some((offset, data.len() as u64))
                    }
                    Ok(VolumeCommand::Zero { offset, len, .. }) => {
                        d.writes += 1;
                        Some((offset, len))
                    }
                    _ => None,
                };
                if let Some((offset, len)) = range.filter(|(_, l)| *l > 0) {
                    for b in offset / BLOCK_BYTES..=(offset + len - 1) / BLOCK_BYTES {
                        if blocks.len() >= DIVERGENT_BLOCKS_MAX {
                            d.complete = false;
                            break;
                        }
                        blocks.insert(b);
                    }
                }
            }
        }
        d.blocks = blocks.len() as u64;
        Ok(Some(d))
    }

    /// The replica's report for a failover about to be executed (`execute`'s second
    /// plan): it also holds still, installing no snapshot for `FAILOVER_HOLD` (or until
    /// the failover re-forms it), so that the plan made from it stays true.
    pub fn replica_report_holding(&mut self, now: Time, g: GroupId) -> Option<ReplicaReport> {
        let group = self.groups.get_mut(&g)?;
        group.failover_hold = Some(now + FAILOVER_HOLD);
        // Recorded, so that a restart holds too (the simulation's seed 293: a source
        // that rebooted between the plan and its commit took a snapshot).
        let mut b = LogBatch::default();
        b.push(LogOp::Put {
            key: failover_hold_key(g),
            value: Vec::new(),
        });
        let written = self.log.write(b).and_then(|()| self.log.sync());
        if let Err(e) = written {
            tracing::warn!(group = %g, error = %e, "cannot record the failover hold");
            return None;
        }
        self.replica_report(now, g)
    }

    /// The epoch that fenced this node's replica of `g`, if one did.
    pub fn fenced(&self, g: GroupId) -> Option<u64> {
        self.groups.get(&g).and_then(|x| x.fenced)
    }

    /// The index of `g`'s epoch start, as recorded here.
    pub fn epoch_of(&self, g: GroupId) -> Option<(u64, LogIndex)> {
        self.groups
            .get(&g)
            .map(|x| (x.epoch, LogIndex(x.epoch_start)))
    }
}
