//! One round of Raft work for every group, in raft-rs's Ready order (written down in
//! [`crate::group`]): send, install snapshots, apply committed entries, write one batch
//! for all groups, tell leaders what was written, advance raft-rs as *written* (the sync
//! runs outside and completes the Readies it covers, [`super::NodeCore::log_synced`]),
//! then answer what completed.

use std::sync::atomic::Ordering::Relaxed;

use raft::eraftpb::{Entry, Message};

use crate::command::VolumeCommand;
use crate::group::Applied;
use crate::ids::{GroupId, LogIndex, NodeId, VolumeId};
use crate::logstore::{LogBatch, LogOp, LogStore, StoreError};
use crate::meta::{ClusterState, MetaCommand, MetaError};
use crate::stats::StoreStats;
use crate::time::Time;

use super::api::{Effect, Note, Outcome, Refused, Written};
use super::group::{GroupCore, Kind, Out};
use super::out;
use super::sync::Unsynced;
use super::{recovering_key, recovery, CoreBug, CoreError, NodeCore, META_SNAPSHOT_KEY};

/// A group's commit index and membership before a call into raft-rs, to notice (for a
/// checker) entries its leader committed and under which membership.
pub(super) struct CommitView {
    commit: u64,
    leader: bool,
    voters: Vec<u64>,
    outgoing: Vec<u64>,
}

pub(super) fn commit_view<S: LogStore>(g: &GroupCore<S>) -> CommitView {
    let cs = g.raft.conf_state();
    CommitView {
        commit: g.raft.commit_index().0,
        leader: g.raft.is_leader(),
        voters: cs.voters,
        outgoing: cs.voters_outgoing,
    }
}

/// Emits `Note::LeaderCommit` if the leader's commit index moved since `before`.
pub(super) fn note_commit<S: LogStore>(
    g: &GroupCore<S>,
    before: CommitView,
    effects: &mut Vec<Effect>,
) {
    let now = g.raft.commit_index().0;
    if now > before.commit && (before.leader || g.raft.is_leader()) {
        effects.push(Effect::Note(Note::LeaderCommit {
            group: g.id(),
            from: before.commit,
            to: now,
            voters: before.voters,
            outgoing: before.outgoing,
        }));
    }
}

/// A Ready of one group, written this round, finished after the batch is written.
struct Readied {
    group: GroupId,
    persisted: Vec<Message>,
    read_states: Vec<raft::ReadState>,
    must_sync: bool,
    urgent: bool,
    /// It installed a snapshot (whose recovery record it writes).
    snapshot: bool,
    delivered: Option<LogIndex>,
    /// Its last entry's index and term (see `Unsynced::last`) and the bytes it wrote.
    last: u64,
    last_term: u64,
    bytes: u64,
}

impl<S: LogStore> NodeCore<S> {
    /// One round of Raft work: proposals held through a leader transfer, every group's
    /// Ready, and the sync decision. Call it after a batch of inputs, and when
    /// [`NodeCore::next_wakeup`] has come. An error means the log store failed (or a
    /// committed entry could not be applied): the node must stop, since going on could
    /// acknowledge what is not durable.
    pub fn process(&mut self, now: Time) -> Result<(), CoreError> {
        self.last_now = self.last_now.max(now);
        // Held proposals are proposed (or refused) between rounds: raft-rs must not take
        // proposals between a Ready and its advance.
        let mut out = out!(self, now);
        for g in self.groups.values_mut() {
            g.release_held(now, &mut out);
        }
        self.process_readies(now)?;
        self.want_syncs();
        self.start_sync_if_due(now);
        if let Some(e) = self
            .snapshot_error
            .lock()
            .expect("snapshot error cell")
            .take()
        {
            return Err(CoreError::Store(StoreError::Backend(format!(
                "read a snapshot: {e}"
            ))));
        }
        Ok(())
    }

    fn process_readies(&mut self, now: Time) -> Result<(), CoreError> {
        let me = self.cfg.me;
        let observe = self.cfg.observe;
        let mut batch = LogBatch::default();
        let mut readied: Vec<Readied> = Vec::new();
        // Groups whose entries this round writes: (group, last index, its term).
        let mut wrote: Vec<(GroupId, u64, u64)> = Vec::new();
        let mut meta_changed = false;
        let mut out = out!(self, now);
        for (&id, g) in self.groups.iter_mut() {
            if g.fenced.is_some() {
                // Stopped by a failover: its state stays as it was (see `failover`).
                continue;
            }
            let before = observe.then(|| commit_view(g));
            let Some(mut work) = g.raft.ready() else {
                continue;
            };
            // 1. Messages that need not wait for persistence.
            for mut m in work.messages.drain(..) {
                g.stamp_read_index(&mut m);
                out.effects.push(Effect::Send {
                    to: NodeId(m.to),
                    group: id,
                    epoch: g.epoch,
                    msg: m,
                });
            }
            // 2. Snapshot.
            if let Some(snap) = &work.snapshot {
                let index = LogIndex(snap.get_metadata().index);
                meta_changed |= install_snapshot(
                    g,
                    index,
                    &snap.data,
                    &mut self.cluster,
                    &mut batch,
                    &mut out,
                )?;
            }
            // 3. Committed entries.
            let delivered = work.committed.last().map(|e| LogIndex(e.index));
            meta_changed |= apply(
                g,
                std::mem::take(&mut work.committed),
                &mut batch,
                &mut self.cluster,
                &mut out,
            )?;
            // 4. Persistence (collected for all groups). A Ready appends at most once
            // (`RaftGroup::ready`).
            count_appends(&work.persist.ops, out.stats);
            let (mut last, mut last_term, mut bytes) = (0, 0, 0);
            if let Some(snap) = &work.snapshot {
                // The snapshot replaced the log: nothing past the point before it is
                // proven synced. The mark stays below the snapshot until entries after it
                // sync, so that a start in between writes the whole state again with the
                // records the snapshot and the catch-up after it wrote (applied index,
                // recovery point, metadata state): raising it to the snapshot point at
                // its own sync skipped that, and the seed sweep found replicas whose
                // records a failed sync had lost (seeds 848, 1636, 1916).
                g.synced_to = g.synced_to.min(snap.get_metadata().index.saturating_sub(1));
            }
            if let Some(entries) = work.persist.ops.iter().find_map(|op| match op {
                LogOp::Append { entries, .. } if !entries.is_empty() => Some(entries),
                _ => None,
            }) {
                let (first, tail) = (&entries[0], &entries[entries.len() - 1]);
                // Entries from `first` on replace what this log had: not synced yet.
                g.synced_to = g.synced_to.min(first.index.saturating_sub(1));
                (last, last_term) = (tail.index, tail.term);
                bytes = entries.iter().map(|e| e.data.len() as u64).sum();
                wrote.push((id, tail.index, tail.term));
            }
            batch.ops.append(&mut work.persist.ops);
            g.drop_replaced_proposals(&mut out);
            if let Some((role, leader)) = work.role_changed {
                g.lag.reset(now);
                // Early answers of an earlier term are committed before this leader
                // answers a flush or a read (it waits for an entry of its term): an old
                // mark past its log would only hold an idle group's flushes.
                g.early_acked = 0;
                out.effects.push(Effect::Leader { group: id, leader });
                if role == raft::StateRole::Leader {
                    tracing::info!(group = %id, term = g.raft.term().0, "became leader");
                }
            }
            self.election.fix(g);
            if let Some(b) = before {
                note_commit(g, b, out.effects);
            }
            readied.push(Readied {
                group: id,
                persisted: work.persisted_messages,
                read_states: work.read_states,
                must_sync: work.must_sync,
                urgent: work.votes || work.snapshot.is_some(),
                snapshot: work.snapshot.is_some(),
                delivered,
                last,
                last_term,
                bytes,
            });
        }
        // A remote replica's append response changes no commit index, so it may bring no
        // Ready: answer the site-durable writes it completes here, every round.
        for g in self.groups.values_mut() {
            g.release_site_waiting(&mut out);
            g.release_written(me, now, &mut out);
            g.release_flushes(now, &mut out);
        }
        if readied.is_empty() {
            return Ok(());
        }
        // Synced marks that moved ride this batch (a replaced suffix lowers its mark in
        // the very write that replaces it).
        recovery::write_marks(&mut self.groups, &mut batch);
        if !batch.is_empty() {
            self.log.write(batch)?;
        }
        // Written, not yet synced: a leader counts itself, a voter tells its leader.
        for &(id, index, log_term) in &wrote {
            let g = self.groups.get_mut(&id).expect("listed");
            if g.kind != Kind::Volume {
                continue;
            }
            let term = g.raft.term();
            if g.raft.is_leader() {
                g.written.own_written(term, LogIndex(index));
                g.release_written(me, now, &mut out);
            } else if let Some(leader) = g.raft.leader().filter(|l| *l != me) {
                let (voters, outgoing) = g.raft.voter_sets();
                // Only in a synced term (`GroupCore::term_synced`): the first append of a
                // new term goes unreported; the next report covers it.
                let term_synced =
                    g.term_synced >= term.0 || out.bug == Some(CoreBug::WrittenBeforeTermSynced);
                if term_synced && (voters.contains(&me) || outgoing.contains(&me)) {
                    let w = Written {
                        term: term.0,
                        index,
                        log_term,
                    };
                    out.effects.push(Effect::Written {
                        to: leader,
                        group: id,
                        epoch: g.epoch,
                        w,
                    });
                }
            }
        }
        let mut lease_states = Vec::new();
        for r in readied {
            let id = r.group;
            let g = self.groups.get_mut(&id).expect("listed");
            let before = observe.then(|| commit_view(g));
            for rs in r.read_states {
                if let Some(seq) = super::lease::lease_seq(&rs.request_ctx) {
                    lease_states.push((seq, rs.index));
                    continue;
                }
                let ctx =
                    u64::from_be_bytes(rs.request_ctx.as_slice().try_into().unwrap_or([0; 8]));
                if let Some((started, req)) = g.reads_waiting_index.remove(&ctx) {
                    // Writes answered before they committed are read too.
                    g.reads_waiting_apply
                        .push((rs.index.max(g.early_acked), started, req));
                }
            }
            // 5 and 6. Advance: written now, persisted once a sync covers the write; the
            // messages that promise persisted state (votes, append responses) wait for
            // it. Readies persist in order, so one that needed no sync waits too if an
            // earlier one of its group does: it rides the sync its group waits on, and
            // starts none.
            let number = g.raft.advance_written(r.delivered);
            let mut u = Unsynced {
                group: id,
                number,
                persisted: r.persisted,
                last: r.last,
                last_term: r.last_term,
                term: g.raft.term().0,
                bytes: r.bytes,
                urgent: r.urgent,
            };
            if out.bug == Some(CoreBug::AckBeforeSync) {
                // Negative control: the promise goes out before it is kept.
                send_persisted(g, std::mem::take(&mut u.persisted), out.effects);
            }
            if r.snapshot {
                // Its recovery record is not durable yet: no copy starts until it is.
                g.recovery_unsynced = Some(number);
            }
            let in_unsynced = self.sync.unsynced.iter().any(|u| u.group == id);
            let in_syncing = self.sync.syncing.iter().any(|u| u.group == id);
            if r.must_sync || in_unsynced {
                self.sync.unsynced.push(u);
                self.sync.unsynced_since.get_or_insert(now);
            } else if in_syncing {
                self.sync.syncing.push(u);
            } else {
                g.raft.on_persisted(number);
                g.recovery_unsynced = None;
                send_persisted(g, u.persisted, out.effects);
            }
            // 7. Applied index to raft, then answer what completed.
            if g.applied > g.raft.applied_index() {
                g.raft.advance_apply_to(g.applied);
            }
            g.complete_reads(&mut out);
            g.release_site_waiting(&mut out);
            g.release_flushes(now, &mut out);
            if let Some(b) = before {
                note_commit(g, b, out.effects);
            }
        }
        if meta_changed {
            // Published before the answers to the proposals that changed it.
            out.effects.push(Effect::ClusterChanged);
        }
        for g in self.groups.values_mut() {
            for (id, outcome) in g.meta_replies.drain(..) {
                out.answer(id, Ok(outcome));
            }
        }
        if meta_changed && self.cfg.reconcile {
            self.reconcile(now)?;
        } else if meta_changed {
            // A driver that places groups itself (the simulation) still follows the
            // metadata's epochs: failovers and discards run the same code.
            self.reconcile_epochs(now)?;
        }
        for (ctx, index) in lease_states {
            self.lease_read_state(ctx, index, now);
        }
        self.lease_grant(now);
        let mut out = out!(self, now);
        for g in self.groups.values_mut() {
            g.release_suspended(&mut out);
        }
        self.publish_recovering();
        self.stats.rounds.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Publishes the replicas that must copy blocks, with their recovery points, when
    /// that changed; a recovering replica that leads hands leadership over (it copies
    /// its blocks from the leader and serves no reads).
    pub(super) fn publish_recovering(&mut self) {
        let me = self.cfg.me;
        let now = self.last_now;
        let mut list = Vec::new();
        for (&id, g) in self.groups.iter_mut() {
            // A fenced replica copies nothing (its data is kept as it is); nor does one
            // whose recovery record is not synced yet: copied blocks that outlive a power
            // loss which took the record (and the snapshot) would be newer than the log,
            // and the replica would not know it. Found by the site-loss simulation (seed
            // 620): a survivor that lost power during its copy came back whole to its
            // own eyes, with blocks 127 entries past its log, and the failover re-formed
            // the group from it.
            let Some(point) = g
                .recovering
                .filter(|_| g.fenced.is_none() && g.recovery_unsynced.is_none())
            else {
                continue;
            };
            list.push((id, point));
            let recent = g
                .handed_over_at
                .is_some_and(|t| now.saturating_duration_since(t) < super::RECOVERING_HANDOVER_MIN);
            if g.raft.is_leader() && g.raft.transferring_to().is_none() && !recent {
                g.handed_over_at = Some(now);
                // To the next voter by id, wrapping: two recovering voters handing it to
                // the first voter listed passed it back and forth for good (the seed sweep
                // found a term a few milliseconds, `roamdisk-sim --seed 1916`); going
                // round, it reaches a voter that is not recovering.
                let mut voters: Vec<NodeId> = g
                    .raft
                    .progress()
                    .into_iter()
                    .filter(|p| p.node != me && !p.is_learner)
                    .map(|p| p.node)
                    .collect();
                voters.sort_unstable();
                let next = voters.iter().find(|n| **n > me).or(voters.first()).copied();
                if let Some(to) = next {
                    tracing::info!(group = %id, %to, "recovering replica hands over leadership");
                    g.raft.transfer_leader(to);
                    self.election.fix(g);
                }
            }
        }
        if list != self.recovering_published {
            self.recovering_published.clone_from(&list);
            self.effects.push(Effect::Recovering(list));
        }
    }
}

/// Sends the messages that promise a Ready's state durable (votes, append responses).
pub(super) fn send_persisted<S: LogStore>(
    g: &GroupCore<S>,
    msgs: Vec<Message>,
    effects: &mut Vec<Effect>,
) {
    for mut m in msgs {
        g.stamp_read_index(&mut m);
        effects.push(Effect::Send {
            to: NodeId(m.to),
            group: g.id(),
            epoch: g.epoch,
            msg: m,
        });
    }
}

/// Installs a snapshot into the state machine; returns true if the cluster state changed.
fn install_snapshot<S: LogStore>(
    g: &mut GroupCore<S>,
    index: LogIndex,
    data: &[u8],
    cluster: &mut ClusterState,
    batch: &mut LogBatch,
    out: &mut Out<'_>,
) -> Result<bool, CoreError> {
    let group = g.id();
    // Proposals the snapshot covers will not be applied here: their callers retry.
    while let Some((&i, _)) = g.proposals.first_key_value() {
        if i > index.0 {
            break;
        }
        let (_, (_, id)) = g.proposals.pop_first().expect("present");
        g.early.remove(&i);
        out.answer(id, Err(Refused::Superseded));
    }
    g.applied = g.applied.max(index);
    g.durable_applied = g.durable_applied.max(index);
    // The log now starts after the snapshot.
    while g.retained.front().is_some_and(|&(i, _)| i <= index.0) {
        let (_, n) = g.retained.pop_front().expect("present");
        g.retained_bytes -= n;
    }
    match g.kind {
        Kind::Meta => {
            *cluster = ClusterState::decode(data)?;
            out.note(|| Note::MetaApplied {
                index: index.0,
                hash: *blake3::hash(data).as_bytes(),
            });
            // The state and its index become durable together with the snapshot point.
            batch.push(LogOp::Put {
                key: META_SNAPSHOT_KEY.to_vec(),
                value: data.to_vec(),
            });
            Ok(true)
        }
        Kind::Volume => {
            // Block data arrives by a hash-diff catch-up copy followed by log replay
            // from `index`; until then this replica must not serve reads.
            batch.push(LogOp::Put {
                key: recovering_key(group),
                value: index.0.to_be_bytes().to_vec(),
            });
            g.recovering = Some(index);
            g.deferred_to = index.0;
            g.recovery_record_stale = false;
            tracing::warn!(%group, index = index.0, "volume snapshot received; block catch-up required");
            Ok(false)
        }
    }
}

/// Counts the entries a Ready appends to the log.
fn count_appends(ops: &[LogOp], stats: &StoreStats) {
    for op in ops {
        if let LogOp::Append { entries, .. } = op {
            let bytes: usize = entries.iter().map(|e| e.data.len()).sum();
            stats
                .entries_persisted
                .fetch_add(entries.len() as u64, Relaxed);
            stats.bytes_persisted.fetch_add(bytes as u64, Relaxed);
        }
    }
}

/// Applies committed entries to the group's state machine (a volume's through
/// `Effect::Apply`) and answers proposals whose entries applied. Returns true if the
/// cluster state changed.
pub(super) fn apply<S: LogStore>(
    g: &mut GroupCore<S>,
    entries: Vec<Entry>,
    batch: &mut LogBatch,
    cluster: &mut ClusterState,
    out: &mut Out<'_>,
) -> Result<bool, CoreError> {
    if entries.is_empty() {
        return Ok(false);
    }
    let group = g.id();
    out.stats
        .entries_applied
        .fetch_add(entries.len() as u64, Relaxed);
    if out.observe {
        for e in &entries {
            out.effects.push(Effect::Note(Note::Committed {
                group,
                entry: e.clone(),
            }));
        }
    }
    let before = out.observe.then(|| commit_view(g));
    let applied = g.raft.apply_committed(entries, batch)?;
    if let Some(mut b) = before {
        // Membership changes take effect before raft-rs counts the commit again.
        let cs = g.raft.conf_state();
        b.voters = cs.voters;
        b.outgoing = cs.voters_outgoing;
        note_commit(g, b, out.effects);
    }
    let mut changed = false;
    for a in applied {
        let index = match &a {
            Applied::Internal { index } | Applied::Command { index, .. } => *index,
        };
        if g.recovering.is_some() {
            // The replica's data is not trustworthy until the block copy finishes: leave
            // the entries in the log; the end of the catch-up replays them.
            g.deferred_to = g.deferred_to.max(index.0);
            if let Some((_, id)) = g.proposals.remove(&index.0) {
                g.early.remove(&index.0);
                out.answer(id, Err(Refused::Superseded));
            }
            continue;
        }
        let (term, outcome) = match a {
            Applied::Internal { index } => {
                g.applied = g.applied.max(index);
                (None, None)
            }
            Applied::Command { index, term, data } => {
                let n = data.len() as u64;
                g.retained.push_back((index.0, n));
                g.retained_bytes += n;
                let outcome = match g.kind {
                    Kind::Volume => {
                        // Entries at or below the applied index were applied before a
                        // restart (the data is whole up to it).
                        if index > g.applied {
                            out.effects
                                .push(volume_effect(VolumeId(group.0), index, data));
                            g.applied = index;
                        }
                        Outcome::Volume
                    }
                    Kind::Meta => {
                        let cmd = MetaCommand::decode(&data)?;
                        // Applied to a copy and checked (cheap: one pass over the
                        // volumes; rare: metadata changes): a command that would break an
                        // invariant is refused by every replica alike, not applied.
                        let mut next = cluster.clone();
                        let result = next.apply(cmd);
                        let result = match next.check() {
                            Ok(()) => {
                                *cluster = next;
                                result
                            }
                            Err(why) => {
                                tracing::error!(index = index.0, error = %why,
                                    "metadata command refused: it would break an invariant");
                                Err(MetaError::WouldBreakInvariant(why))
                            }
                        };
                        g.applied = index;
                        changed = true;
                        if out.observe {
                            let hash = *blake3::hash(&cluster.encode()).as_bytes();
                            out.effects.push(Effect::Note(Note::MetaApplied {
                                index: index.0,
                                hash,
                            }));
                        }
                        Outcome::Meta(result)
                    }
                };
                (Some(term), Some(outcome))
            }
        };
        // Answer the proposal at this index, if this node made it. A different term at
        // the same index means our entry was replaced: the caller retries.
        g.early.remove(&index.0);
        if let Some((t, id)) = g.proposals.remove(&index.0) {
            match (term, outcome) {
                (Some(term), Some(outcome)) if term == t => {
                    out.note(|| Note::CommittedAt {
                        id,
                        group,
                        index: index.0,
                        term: term.0,
                    });
                    match outcome {
                        // Answered by `release_site_waiting` once another site has it.
                        Outcome::Volume if g.site_gated() => {
                            g.site_waiting.push_back((index.0, out.now, id))
                        }
                        // Answered after the new cluster state is published.
                        outcome @ Outcome::Meta(_) => g.meta_replies.push((id, outcome)),
                        Outcome::Volume => g.answer_ok(id, out),
                    }
                }
                _ => out.answer(id, Err(Refused::Superseded)),
            }
        }
        // Anything proposed below an applied index and still waiting was replaced.
        while let Some((&i, _)) = g.proposals.first_key_value() {
            if i > index.0 {
                break;
            }
            let (_, (_, id)) = g.proposals.pop_first().expect("present");
            g.early.remove(&i);
            out.answer(id, Err(Refused::Superseded));
        }
    }
    Ok(changed)
}

/// Applies entries replayed from the log at the end of a catch-up (their membership
/// changes were applied to Raft when they were first delivered).
pub(super) fn apply_replayed<S: LogStore>(
    g: &mut GroupCore<S>,
    applied: Vec<Applied>,
    effects: &mut Vec<Effect>,
) {
    let volume = VolumeId(g.id().0);
    for a in applied {
        match a {
            Applied::Command { index, data, .. } => {
                if index > g.applied {
                    // A verify marker replayed over copied blocks would hash a state that
                    // is not this index's: this replica has no digests for that run.
                    if !matches!(
                        VolumeCommand::decode(&data),
                        Ok(VolumeCommand::Verify { .. })
                    ) {
                        effects.push(Effect::Apply {
                            volume,
                            index,
                            data,
                        });
                    }
                    g.applied = index;
                }
            }
            Applied::Internal { index } => g.applied = g.applied.max(index),
        }
    }
}

/// What applying a volume command asks of the driver: write it, or (a verify marker) hash
/// blocks as they are at this index.
fn volume_effect(volume: VolumeId, index: LogIndex, data: Vec<u8>) -> Effect {
    match VolumeCommand::decode(&data) {
        Ok(VolumeCommand::Verify {
            id,
            first_block,
            count,
        }) => Effect::Verify {
            volume,
            index,
            id,
            first_block,
            count,
        },
        // Anything else, malformed or not, is the driver's to apply (and to fail on).
        _ => Effect::Apply {
            volume,
            index,
            data,
        },
    }
}
