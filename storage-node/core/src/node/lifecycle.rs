//! Groups created and removed as the metadata places volumes, checkpoints (the crash
//! rule and log compaction), the end of a catch-up copy, and corruption the scrub found.
//!
//! Crash rule: the applied index recorded in the log store never covers data that is not
//! durable. A checkpoint takes each replica's applied index ([`NodeCore::checkpoint_begin`]),
//! the driver makes the data durable up to it (hashes and fsyncs the extents, off the
//! store thread), and only then are the indexes recorded
//! ([`NodeCore::checkpoint_end`]). Logs are compacted only behind the recorded index,
//! keeping a bounded tail for followers that lag a little. After a crash the node replays
//! its log from the recorded index; commands are idempotent.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering::Relaxed;

use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2};

use crate::ids::{GroupId, LogIndex, VolumeId, META_GROUP};
use crate::logstore::{GroupState, LogBatch, LogOp, LogStore};
use crate::meta::VolumeInfo;
use crate::time::Time;

use super::api::{CheckpointPlan, Effect, Refused};
use super::group::{Kind, Out, Policy};
use super::ready::apply_replayed;
use super::{recovering_key, whole_key, CoreBug, CoreError, NodeCore, META_SNAPSHOT_KEY};

impl<S: LogStore> NodeCore<S> {
    /// Creates groups for volumes placed on this node and removes groups of volumes
    /// that were deleted; refreshes the policies and sizes of the others.
    pub(super) fn reconcile(&mut self, now: Time) -> Result<(), CoreError> {
        self.reconcile_epochs(now)?;
        let me = self.cfg.me;
        let wanted: Vec<VolumeInfo> = self
            .cluster
            .volumes
            .values()
            .filter(|v| v.replicas_on(me))
            .cloned()
            .collect();
        for v in &wanted {
            let g = v.id.group();
            let policy = Policy::of(&self.cluster, v);
            if let Some(group) = self.groups.get_mut(&g) {
                group.policy = policy;
                continue;
            }
            // Every replica starts from the bootstrap membership (the group's state at
            // index 0); a replica added by a move then replays or snapshots from there.
            // In a later epoch (after a failover) it starts empty and takes a snapshot.
            let mut b = LogBatch::default();
            let state = self.new_replica_state(v, &mut b);
            b.ops.insert(0, LogOp::Create { group: g, state });
            self.log.write(b)?;
            self.log.sync()?;
            self.open_group(g, now)?;
            let group = self.groups.get_mut(&g).expect("opened");
            group.policy = policy;
            // The first voter campaigns at once so a new volume serves without waiting
            // for an election timeout.
            if v.initial_voters.first() == Some(&me) && v.generation.0 == 1 && v.moving.is_none() {
                group.raft.campaign()?;
                self.election.fix(group);
            }
            tracing::info!(volume = %v.name, group = %g, "replica created");
        }
        for v in &wanted {
            self.effects.push(Effect::VolumeGrown {
                volume: v.id,
                size: v.size,
            });
        }
        let gone: Vec<GroupId> = self
            .groups
            .keys()
            .copied()
            .filter(|g| *g != META_GROUP && self.cluster.volume_by_id(VolumeId(g.0)).is_none())
            .collect();
        for g in gone {
            let mut group = self.groups.remove(&g).expect("listed");
            let mut out = Out::refusing(&mut self.effects, &self.stats, self.cfg.observe);
            group.fail_all(Refused::NoGroup(g), &mut out);
            let mut b = LogBatch::default();
            b.push(LogOp::Remove { group: g });
            b.push(LogOp::Delete {
                key: recovering_key(g),
            });
            b.push(LogOp::Delete { key: whole_key(g) });
            b.push(LogOp::Delete {
                key: super::synced_key(g),
            });
            self.log.write(b)?;
            self.effects.push(Effect::Leader {
                group: g,
                leader: None,
            });
            self.effects.push(Effect::VolumeRemoved {
                volume: VolumeId(g.0),
            });
            tracing::info!(group = %g, "replica removed (volume deleted)");
        }
        Ok(())
    }

    /// Creates group `g` on this node from `state` (its bootstrap membership, or none for
    /// a replica that awaits a snapshot), for drivers that place groups themselves
    /// (`NodeConfig::reconcile` off); durable when it returns.
    pub fn create_group(
        &mut self,
        now: Time,
        g: GroupId,
        state: GroupState,
    ) -> Result<(), CoreError> {
        if self.groups.contains_key(&g) {
            return Err(CoreError::Invalid(format!("group {g} exists")));
        }
        let mut b = LogBatch::default();
        b.push(LogOp::Create { group: g, state });
        self.log.write(b)?;
        self.log.sync()?;
        self.open_group(g, now)
    }

    /// Makes `group`'s writes site-durable (answered once one of `remote` has synced
    /// them) or not, for drivers without `reconcile`.
    pub fn set_site_durable(
        &mut self,
        group: GroupId,
        site_durable: bool,
        remote: Vec<crate::ids::NodeId>,
    ) {
        if let Some(g) = self.groups.get_mut(&group) {
            g.policy = Policy {
                site_durable,
                remote,
                degrade_after: g.policy.degrade_after,
            };
        }
    }

    /// How long a site-durable group's writes wait for a remote replica before it
    /// degrades (`None`: for good), for drivers without `reconcile`.
    pub fn set_degrade_after(&mut self, group: GroupId, after: Option<std::time::Duration>) {
        if let Some(g) = self.groups.get_mut(&group) {
            g.policy.degrade_after = after;
        }
    }

    /// On the metadata leader: a registered node that is not a member of the metadata
    /// group (it joined after bootstrap) is added as a learner, one change at a time, so
    /// that it receives the cluster's metadata. Retried every tick until it holds.
    pub(super) fn add_meta_learners(&mut self) {
        let Some(g) = self.groups.get_mut(&META_GROUP) else {
            return;
        };
        if !g.raft.is_leader() {
            return;
        }
        let cs = g.raft.conf_state();
        let Some(n) = self.cluster.nodes.keys().find(|n| {
            !cs.voters.contains(&n.0)
                && !cs.learners.contains(&n.0)
                && !cs.voters_outgoing.contains(&n.0)
        }) else {
            return;
        };
        let mut single = ConfChangeSingle::default();
        single.set_change_type(ConfChangeType::AddLearnerNode);
        single.node_id = n.0;
        let mut cc = ConfChangeV2::default();
        cc.changes.push(single);
        match g.raft.propose_conf_change(cc) {
            Ok(index) => {
                tracing::info!(node = %n, index = index.0, "adding a joined node to the metadata group")
            }
            Err(e) => tracing::debug!(node = %n, error = ?e, "metadata learner not added yet"),
        }
    }

    /// Starts a checkpoint unless one is in flight or nothing needs one: takes every
    /// replica's applied index (and the metadata state). `dirty` names the volumes
    /// whose data changed outside the log (a block copy) and must be made durable even
    /// if their applied index did not move. The driver makes each listed volume's data
    /// durable up to its index, then calls [`NodeCore::checkpoint_end`].
    pub fn checkpoint_begin(
        &mut self,
        dirty: impl Fn(VolumeId) -> bool,
    ) -> Result<Option<CheckpointPlan>, CoreError> {
        if self.checkpoint_in_flight {
            return Ok(None);
        }
        let mut batch = LogBatch::default();
        let mut groups = Vec::new();
        let mut volumes = Vec::new();
        for (&id, g) in &self.groups {
            match g.kind {
                Kind::Volume => {
                    let v = VolumeId(id.0);
                    // A replica copying blocks has nothing trustworthy to record.
                    if g.recovering.is_some() {
                        continue;
                    }
                    if g.applied > g.durable_applied || g.recovery_record_stale || dirty(v) {
                        batch.push(LogOp::Applied {
                            group: id,
                            index: g.applied.0,
                        });
                        if g.recovery_record_stale {
                            batch.push(LogOp::Delete {
                                key: recovering_key(id),
                            });
                        }
                        // Until the applied index passes the copy's end, the copied blocks
                        // are not one state: recorded with the end of the recovery, dropped
                        // with the first checkpoint past it.
                        if g.serve_after > g.applied.0 {
                            if g.recovery_record_stale {
                                batch.push(LogOp::Put {
                                    key: whole_key(id),
                                    value: g.serve_after.to_be_bytes().to_vec(),
                                });
                            }
                        } else if g.whole_recorded || g.recovery_record_stale {
                            batch.push(LogOp::Delete { key: whole_key(id) });
                        }
                        groups.push((id, g.applied));
                        volumes.push((v, g.applied));
                    }
                }
                Kind::Meta => {
                    if g.applied > g.durable_applied {
                        batch.push(LogOp::Put {
                            key: META_SNAPSHOT_KEY.to_vec(),
                            value: self.cluster.encode(),
                        });
                        batch.push(LogOp::Applied {
                            group: id,
                            index: g.applied.0,
                        });
                        groups.push((id, g.applied));
                    }
                }
            }
        }
        if groups.is_empty() {
            return Ok(None);
        }
        self.checkpoint_in_flight = true;
        self.checkpoint_seq += 1;
        Ok(Some(CheckpointPlan {
            volumes,
            batch,
            groups,
            seq: self.checkpoint_seq,
            recoveries: self.recoveries,
        }))
    }

    /// The data of `plan`'s volumes is durable up to their indexes: records the indexes
    /// with `extra` (each volume's records, e.g. its block hashes), then compacts logs
    /// behind them. Groups removed since the checkpoint began, or whose recorded applied
    /// index moved past it meanwhile (a snapshot), keep what they have.
    pub fn checkpoint_end(
        &mut self,
        plan: CheckpointPlan,
        extra: Vec<(VolumeId, Vec<LogOp>)>,
    ) -> Result<(), CoreError> {
        if !self.checkpoint_in_flight || plan.seq != self.checkpoint_seq {
            return Err(CoreError::Invalid(
                "a checkpoint ended that was not begun".into(),
            ));
        }
        self.checkpoint_in_flight = false;
        let mut stale = BTreeSet::new();
        for &(id, idx) in &plan.groups {
            let fresh = self.groups.get(&id).is_some_and(|g| {
                g.durable_applied <= idx
                    && g.recovery_gen <= plan.recoveries
                    && (g.kind == Kind::Meta || g.recovering.is_none())
            });
            if !fresh {
                stale.insert(id);
            }
        }
        let mut batch = plan.batch;
        // A stale group keeps its records as they are: its recovery point, its copy's
        // end, and for the metadata group the state (a snapshot installed meanwhile wrote
        // a newer one, which the state at the checkpoint's index must not replace).
        let stale_record = |key: &[u8]| {
            plan.groups.iter().any(|(g, _)| {
                stale.contains(g)
                    && (key == recovering_key(*g)
                        || key == whole_key(*g)
                        || (*g == crate::ids::META_GROUP && key == META_SNAPSHOT_KEY))
            })
        };
        batch.ops.retain(|op| match op {
            LogOp::Applied { group, .. } => !stale.contains(group),
            LogOp::Delete { key } | LogOp::Put { key, .. } => !stale_record(key),
            _ => true,
        });
        for (v, ops) in extra {
            if !stale.contains(&v.group()) {
                batch.ops.extend(ops);
            }
        }
        self.log.write(batch)?;
        let mut compact = LogBatch::default();
        for (id, idx) in plan.groups {
            if stale.contains(&id) {
                continue;
            }
            let me = self.cfg.me;
            let g = self.groups.get_mut(&id).expect("fresh");
            g.durable_applied = g.durable_applied.max(idx);
            g.recovery_record_stale = false;
            // As the batch decided (see `checkpoint_begin`).
            g.whole_recorded = g.serve_after > idx.0;
            // Keep a tail for followers that lag a little, bounded in entries and bytes;
            // never compact past what is durable here.
            let st = self
                .log
                .state(id)?
                .ok_or_else(|| CoreError::Invalid(format!("group {id} vanished")))?;
            let mut floor = idx.0.saturating_sub(self.cfg.retained_log_entries);
            let mut bytes = g.retained_bytes;
            for &(i, n) in &g.retained {
                if bytes <= self.cfg.retained_log_bytes || i > idx.0 {
                    break;
                }
                bytes -= n;
                floor = floor.max(i);
            }
            if g.raft.is_leader() {
                // Entries every follower has are not needed to catch one up.
                if let Some(min_match) = g
                    .raft
                    .progress()
                    .iter()
                    .filter(|p| p.node != me)
                    .map(|p| p.matched)
                    .min()
                {
                    floor = floor.max(min_match.min(idx.0));
                }
            }
            // `retained` lists the applied commands still in the log: forget those
            // compacted (it grew without bound before).
            let kept_from = floor.max(st.truncated_index);
            while g.retained.front().is_some_and(|&(i, _)| i <= kept_from) {
                let (_, n) = g.retained.pop_front().expect("present");
                g.retained_bytes -= n;
            }
            if floor > st.truncated_index {
                compact.push(LogOp::Compact {
                    group: id,
                    index: floor,
                });
            }
        }
        if !compact.is_empty() {
            self.log.write(compact)?;
        }
        Ok(())
    }

    /// The block copy of a recovering replica finished: it was made for recovery point
    /// `from`, and the copied source had applied `copy_end` when its last block was read.
    /// Replays the deferred entries; reads are served once applied reaches `copy_end`.
    /// A copy made for an earlier recovery point (a second snapshot arrived while it
    /// ran) is refused: blocks it copied before the new point may predate entries the
    /// replay no longer covers. The driver then copies again for the new point.
    /// Returns whether the copy was accepted.
    pub fn catch_up_done(
        &mut self,
        group: GroupId,
        from: LogIndex,
        copy_end: LogIndex,
    ) -> Result<bool, CoreError> {
        let accept_stale = self.cfg.bug == Some(CoreBug::AcceptStaleCatchUp);
        let Some(g) = self.groups.get_mut(&group) else {
            return Ok(false);
        };
        let Some(point) = g.recovering else {
            return Ok(false);
        };
        if g.fenced.is_some() {
            // A fenced replica keeps its data as the failover found it: nothing copies
            // over what it may hold that the new epoch does not.
            return Ok(false);
        }
        if point != from && !accept_stale {
            tracing::info!(%group, copied_for = from.0, recovery_point = point.0,
                "block copy made for an earlier recovery point; copying again");
            return Ok(false);
        }
        let mut next = point.0 + 1;
        while next <= g.deferred_to {
            let entries = self.log.entries(group, next, g.deferred_to + 1, 64 << 20)?;
            next += entries.len() as u64;
            let applied = g.raft.apply_committed_replay(entries)?;
            apply_replayed(g, applied, &mut self.effects);
        }
        g.raft.advance_apply_to(g.applied);
        tracing::info!(%group, from = point.0, applied = g.applied.0, copy_end = copy_end.0,
            "replica caught up");
        g.recovering = None;
        g.serve_after = copy_end.0;
        g.recovery_record_stale = true;
        self.publish_recovering();
        Ok(true)
    }

    /// The scrub found blocks of `volume` that differ from their recorded hashes
    /// (corrupted on disk): the replica stops serving reads and copies the differing
    /// blocks from a healthy replica, exactly as after a snapshot install. The record is
    /// synced at once.
    pub fn corrupted(&mut self, volume: VolumeId) -> Result<(), CoreError> {
        let group = volume.group();
        let Some(g) = self.groups.get_mut(&group) else {
            return Ok(());
        };
        if g.recovering.is_some() {
            return Ok(());
        }
        let point = g.applied;
        let mut batch = LogBatch::default();
        batch.push(LogOp::Put {
            key: recovering_key(group),
            value: point.0.to_be_bytes().to_vec(),
        });
        self.log.write(batch)?;
        self.log.sync()?;
        self.recoveries += 1;
        g.recovery_gen = self.recoveries;
        g.recovering = Some(point);
        g.deferred_to = point.0;
        g.recovery_record_stale = false;
        self.stats.scrub_corrupted.fetch_add(1, Relaxed);
        self.publish_recovering();
        Ok(())
    }
}
