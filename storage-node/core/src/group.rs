//! One Raft group (a volume, or the metadata group) as a sans-I/O state machine over
//! raft-rs's `RawNode`.
//!
//! The driver owns the I/O. For every group it calls [`RaftGroup::ready`] and then, in
//! exactly this order (raft-rs's documented Ready order, `examples/five_mem_node`):
//!
//! 1. send `ReadyWork::messages` (a leader's appends go out in parallel with its own
//!    persistence);
//! 2. if `ReadyWork::snapshot` is set, install it in the state machine (the log side is
//!    in `persist`);
//! 3. apply `ReadyWork::committed` (through [`RaftGroup::apply_committed`], which handles
//!    membership changes itself and hands normal entries back);
//! 4. write `ReadyWork::persist` to the [`LogStore`] and, if `ReadyWork::must_sync`,
//!    sync it (many groups share one write and one sync: group commit); between the
//!    write and the sync a follower may tell the leader what it wrote
//!    ([`crate::written`]), never through a Raft message;
//! 5. send `ReadyWork::persisted_messages` (votes and append responses: only after the
//!    state they promise is durable);
//! 6. call [`RaftGroup::advance`]; send its messages, apply its committed entries, write
//!    its `persist` (the new commit index: losing it is harmless);
//! 7. after the state machine applied entries up to `i`, call
//!    [`RaftGroup::advance_apply_to`].
//!
//! Nothing here reads a clock or touches a socket: time enters through
//! [`RaftGroup::tick`], the network through [`RaftGroup::step`].

use std::sync::Arc;

use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message, Snapshot,
};
use raft::{GetEntriesContext, RaftState, RawNode, ReadState, StateRole, Storage};
use raft_proto::ConfChangeI;

use crate::ids::{GroupId, LogIndex, NodeId, Term};
use crate::logstore::{GroupState, LogBatch, LogOp, LogStore, StoreError};

/// Tuning of every group on a node. Ticks are driven by the node (`TICK_MS`).
#[derive(Clone, Debug)]
pub struct GroupConfig {
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    /// Bytes of entries per append message; bounds one message.
    pub max_size_per_msg: u64,
    /// Append messages in flight per follower; with `max_size_per_msg` this is the
    /// replication window (it must cover the bandwidth-delay product of the link).
    pub max_inflight_msgs: usize,
    /// Proposals a leader accepts beyond what is committed; more are refused.
    pub max_uncommitted_size: u64,
    /// Serve ReadIndex on the leader from its lease (no heartbeat round per read).
    /// Safe with `check_quorum` (always on here) as long as clocks advance at roughly
    /// the same rate on every node: a leader steps down before a new one can be elected.
    pub lease_reads: bool,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            election_tick: 10,
            heartbeat_tick: 2,
            max_size_per_msg: 4 << 20,
            max_inflight_msgs: 64,
            max_uncommitted_size: 256 << 20,
            lease_reads: true,
        }
    }
}

/// The home-site time an entry was proposed at (the leader's wall clock, Unix ms), from
/// its context; `None` for entries without one (raft-rs's own, older ones). A failover
/// plan states its loss in it.
pub fn entry_stamp(e: &Entry) -> Option<u64> {
    // A membership change's context is its epoch, not a time.
    if e.get_entry_type() != EntryType::EntryNormal {
        return None;
    }
    <[u8; 8]>::try_from(e.context.as_ref())
        .ok()
        .map(u64::from_be_bytes)
}

/// Produces the state-machine part of a group's snapshot at its recorded applied index.
/// An error is reported to raft-rs as "temporarily unavailable" (raft-rs would panic on
/// any other); the driver learns of it on its own channel and stops.
pub type SnapshotData = Arc<dyn Fn(GroupId) -> Result<Vec<u8>, StoreError> + Send + Sync>;

/// raft-rs `Storage` over one group of a [`LogStore`].
pub struct GroupStorage<S: LogStore> {
    group: GroupId,
    store: Arc<S>,
    /// Produces the state-machine part of a snapshot at the applied index.
    snapshot_data: SnapshotData,
    /// The first index of the group's epoch (0: the first epoch). Entries before it are
    /// never sent to a follower: one that lacks them takes a snapshot, which carries the
    /// membership the failover re-formed the group with (`node::failover`).
    epoch_start: u64,
}

fn store_err(e: StoreError) -> raft::Error {
    raft::Error::Store(raft::StorageError::Other(Box::new(e)))
}

impl<S: LogStore> GroupStorage<S> {
    fn state(&self) -> raft::Result<GroupState> {
        self.store
            .state(self.group)
            .map_err(store_err)?
            .ok_or_else(|| store_err(StoreError::NoGroup(self.group)))
    }
}

impl<S: LogStore> Storage for GroupStorage<S> {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let st = self.state()?;
        Ok(RaftState::new(st.hard_state, st.conf_state))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let st = self.state()?;
        if low <= st.truncated_index {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        // `can_async` is true exactly for entries to send to a follower.
        if context.can_async() && low < self.epoch_start {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        // The budget is applied while reading: raft-rs asks for everything up to the end
        // of the log and keeps only `max_size` bytes of it.
        let max_bytes = max_size.into().unwrap_or(u64::MAX);
        let mut entries = self
            .store
            .entries(self.group, low, high, max_bytes)
            .map_err(store_err)?;
        raft::util::limit_size(&mut entries, Some(max_bytes));
        Ok(entries)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let st = self.state()?;
        if idx < st.truncated_index {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        match self.store.term(self.group, idx).map_err(store_err)? {
            Some(t) => Ok(t),
            None => Err(raft::Error::Store(raft::StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.state()?.truncated_index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.store.last_index(self.group).map_err(store_err)
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let st = self.state()?;
        let index = st.applied_index;
        // The stored membership must be the one at the snapshot's index: if a change
        // was applied after the durable applied index, wait for the next checkpoint. A
        // new epoch's snapshot covers the old epoch's entries (it replaces them).
        if index < request_index || st.conf_index > index || index + 1 < self.epoch_start {
            return Err(raft::Error::Store(
                raft::StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let term = self
            .store
            .term(self.group, index)
            .map_err(store_err)?
            .ok_or(raft::Error::Store(
                raft::StorageError::SnapshotTemporarilyUnavailable,
            ))?;
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = index;
        snap.mut_metadata().term = term;
        snap.mut_metadata().set_conf_state(st.conf_state);
        snap.data = (self.snapshot_data)(self.group)
            .map_err(|_| raft::Error::Store(raft::StorageError::SnapshotTemporarilyUnavailable))?
            .into();
        Ok(snap)
    }
}

/// What the driver must do after [`RaftGroup::ready`] (see the module doc for the order).
#[derive(Default)]
pub struct ReadyWork {
    pub messages: Vec<Message>,
    pub snapshot: Option<Snapshot>,
    pub committed: Vec<Entry>,
    pub persist: LogBatch,
    pub must_sync: bool,
    /// The hard state's term or vote changed (not only its commit index): a sync
    /// covering it must not wait (see `must_sync`; an election waits on it).
    pub votes: bool,
    pub persisted_messages: Vec<Message>,
    pub read_states: Vec<ReadState>,
    /// Set when the leader or this node's role changed.
    pub role_changed: Option<(StateRole, Option<NodeId>)>,
}

/// What the driver must do after [`RaftGroup::advance`].
#[derive(Default)]
pub struct AdvanceWork {
    pub messages: Vec<Message>,
    pub committed: Vec<Entry>,
    pub persist: LogBatch,
}

/// A committed entry after membership changes have been taken care of.
#[derive(Debug)]
pub enum Applied {
    /// A state-machine command.
    Command {
        index: LogIndex,
        term: Term,
        data: Vec<u8>,
    },
    /// Nothing for the state machine (a new leader's empty entry, or a membership change
    /// that has already been applied to Raft and persisted in the batch).
    Internal { index: LogIndex },
}

#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    #[error("not the leader (leader is {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    #[error("proposal dropped by raft (leader transfer or overload)")]
    Dropped,
    #[error("raft: {0}")]
    Raft(String),
}

/// Replication progress of one peer as the leader sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerProgress {
    pub node: NodeId,
    pub matched: u64,
    pub is_learner: bool,
}

pub struct RaftGroup<S: LogStore> {
    pub id: GroupId,
    node: RawNode<GroupStorage<S>>,
    pending: Option<raft::Ready>,
    last_role: (StateRole, u64),
    /// Index of the last membership change applied (see `GroupState::conf_index`).
    conf_index: u64,
    /// Term and vote of the last hard state handed out, to tell a vote from a commit.
    term_vote: (u64, u64),
    /// The group's epoch: membership changes carry it, and one of another epoch is
    /// skipped at apply (the old home's changes never act on a re-formed group).
    epoch: u64,
}

impl<S: LogStore> RaftGroup<S> {
    /// Opens group `id` as peer `me`. The group must exist in `store` (created with
    /// [`LogOp::Create`] with its initial membership, or empty to await a snapshot).
    pub fn open(
        id: GroupId,
        me: NodeId,
        store: Arc<S>,
        config: &GroupConfig,
        snapshot_data: SnapshotData,
        epoch: u64,
        epoch_start: u64,
        logger: &slog::Logger,
    ) -> Result<RaftGroup<S>, raft::Error> {
        let st = store
            .state(id)
            .map_err(store_err)?
            .ok_or_else(|| store_err(StoreError::NoGroup(id)))?;
        let cfg = raft::Config {
            id: me.0,
            election_tick: config.election_tick,
            heartbeat_tick: config.heartbeat_tick,
            applied: st.applied_index,
            max_size_per_msg: config.max_size_per_msg,
            max_inflight_msgs: config.max_inflight_msgs,
            max_uncommitted_size: config.max_uncommitted_size,
            check_quorum: true,
            pre_vote: true,
            read_only_option: if config.lease_reads {
                raft::ReadOnlyOption::LeaseBased
            } else {
                raft::ReadOnlyOption::Safe
            },
            ..Default::default()
        };
        cfg.validate()?;
        let storage = GroupStorage {
            group: id,
            store,
            snapshot_data,
            epoch_start,
        };
        let logger = logger.new(slog::o!("group" => id.0));
        let node = RawNode::new(&cfg, storage, &logger)?;
        Ok(RaftGroup {
            id,
            node,
            pending: None,
            last_role: (StateRole::Follower, 0),
            conf_index: st.conf_index,
            term_vote: (st.hard_state.term, st.hard_state.vote),
            epoch,
        })
    }

    pub fn tick(&mut self) -> bool {
        self.node.tick()
    }

    pub fn step(&mut self, msg: Message) -> Result<(), raft::Error> {
        self.node.step(msg)
    }

    pub fn campaign(&mut self) -> Result<(), raft::Error> {
        self.node.campaign()
    }

    pub fn role(&self) -> StateRole {
        self.node.raft.state
    }

    pub fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    pub fn leader(&self) -> Option<NodeId> {
        let id = self.node.raft.leader_id;
        (id != raft::INVALID_ID).then_some(NodeId(id))
    }

    pub fn term(&self) -> Term {
        Term(self.node.raft.term)
    }

    pub fn commit_index(&self) -> LogIndex {
        LogIndex(self.node.raft.raft_log.committed)
    }

    pub fn applied_index(&self) -> LogIndex {
        LogIndex(self.node.raft.raft_log.applied)
    }

    /// Index of the first entry still in the log (one past the snapshot or compaction).
    pub fn first_index(&self) -> LogIndex {
        LogIndex(self.node.raft.raft_log.first_index())
    }

    pub fn last_index(&self) -> LogIndex {
        LogIndex(self.node.raft.raft_log.last_index())
    }

    pub fn conf_state(&self) -> ConfState {
        self.node.raft.prs().conf().to_conf_state()
    }

    /// Term of the entry at `index` in this replica's log, if it still holds it.
    pub fn log_term(&self, index: LogIndex) -> Option<Term> {
        self.node.raft.raft_log.term(index.0).ok().map(Term)
    }

    /// The commit index is at or past an entry of the current term: every entry a
    /// previous leader placed on a quorum is committed (Raft's leader completeness).
    pub fn committed_in_term(&self) -> bool {
        self.log_term(self.commit_index()) == Some(self.term())
    }

    /// Index of the last membership change this replica applied (or of its snapshot).
    pub fn conf_index(&self) -> LogIndex {
        LogIndex(self.conf_index)
    }

    /// Voters of the configuration in force, and of the outgoing one while joint.
    pub fn voter_sets(&self) -> (Vec<NodeId>, Vec<NodeId>) {
        let cs = self.conf_state();
        (
            cs.voters.iter().copied().map(NodeId).collect(),
            cs.voters_outgoing.iter().copied().map(NodeId).collect(),
        )
    }

    /// Match index of every peer (meaningful on the leader only).
    pub fn progress(&self) -> Vec<PeerProgress> {
        let learners = self.node.raft.prs().conf().learners();
        let mut v: Vec<PeerProgress> = self
            .node
            .raft
            .prs()
            .iter()
            .map(|(id, pr)| PeerProgress {
                node: NodeId(*id),
                matched: pr.matched,
                is_learner: learners.contains(id),
            })
            .collect();
        v.sort_by_key(|p| p.node);
        v
    }

    /// Appends `data` as a new entry stamped with the leader's wall clock (`unix_ms`,
    /// see [`entry_stamp`]; 0 leaves it unstamped). Only on the leader: followers return
    /// `NotLeader` so that the caller forwards to the leader and tracks the result there.
    pub fn propose(
        &mut self,
        data: Vec<u8>,
        unix_ms: u64,
    ) -> Result<(LogIndex, Term), ProposeError> {
        if !self.is_leader() {
            return Err(ProposeError::NotLeader {
                leader: self.leader(),
            });
        }
        let before = self.node.raft.raft_log.last_index();
        let context = if unix_ms == 0 {
            Vec::new()
        } else {
            unix_ms.to_be_bytes().to_vec()
        };
        match self.node.propose(context, data) {
            Ok(()) => {}
            Err(raft::Error::ProposalDropped) => return Err(ProposeError::Dropped),
            Err(e) => return Err(ProposeError::Raft(e.to_string())),
        }
        let index = self.node.raft.raft_log.last_index();
        if index != before + 1 {
            return Err(ProposeError::Dropped);
        }
        Ok((LogIndex(index), self.term()))
    }

    /// Proposes a joint-consensus membership change. Refused (not silently dropped) when
    /// raft-rs would ignore it (a change is pending, or the configuration is joint and
    /// this is not the leave), and when it would remove this leader: raft-rs 0.7 panics
    /// or stalls then (found by the simulation); transfer leadership first.
    pub fn propose_conf_change(&mut self, cc: ConfChangeV2) -> Result<LogIndex, ProposeError> {
        if !self.is_leader() {
            return Err(ProposeError::NotLeader {
                leader: self.leader(),
            });
        }
        let me = self.node.raft.id;
        if cc
            .changes
            .iter()
            .any(|c| c.node_id == me && c.get_change_type() == ConfChangeType::RemoveNode)
        {
            return Err(ProposeError::Raft(
                "a membership change may not remove its leader; transfer leadership first".into(),
            ));
        }
        let before = self.node.raft.raft_log.last_index();
        self.node
            .propose_conf_change(self.epoch.to_be_bytes().to_vec(), cc)
            .map_err(|e| match e {
                raft::Error::ProposalDropped => ProposeError::Dropped,
                e => ProposeError::Raft(e.to_string()),
            })?;
        let index = self.node.raft.raft_log.last_index();
        if index != before + 1 {
            return Err(ProposeError::Dropped);
        }
        // raft-rs turns a change it will not make into an empty normal entry.
        let kept = self
            .node
            .raft
            .raft_log
            .unstable_entries()
            .last()
            .is_some_and(|e| e.get_entry_type() == EntryType::EntryConfChangeV2);
        if !kept {
            return Err(ProposeError::Raft(
                "membership change not accepted: another change is pending or the configuration is joint".into(),
            ));
        }
        Ok(LogIndex(index))
    }

    /// Role, term and leader id: raft-rs draws a new randomized election timeout (from
    /// its own thread-local generator) whenever one of them changes.
    pub fn election_key(&self) -> (StateRole, u64, u64) {
        let r = &self.node.raft;
        (r.state, r.term, r.leader_id)
    }

    /// The election timeout in ticks (the randomized one is drawn from `[this, 2 × this)`).
    pub fn election_tick(&self) -> usize {
        self.node.raft.election_timeout()
    }

    /// Replaces raft-rs's randomized election timeout by `ticks` (within
    /// `[election_tick, 2 × election_tick)`), so that the driver's seed, not a thread-local
    /// generator, decides elections.
    pub fn set_election_timeout(&mut self, ticks: usize) {
        let base = self.election_tick();
        self.node
            .raft
            .set_randomized_election_timeout(ticks.clamp(base, 2 * base - 1));
    }

    pub fn transfer_leader(&mut self, to: NodeId) {
        self.node.transfer_leader(to.0);
    }

    /// The node this leader is handing leadership to, while a transfer runs (raft-rs
    /// drops proposals meanwhile).
    pub fn transferring_to(&self) -> Option<NodeId> {
        let id = self.node.raft.lead_transferee?;
        (id != raft::INVALID_ID).then_some(NodeId(id))
    }

    /// Starts a linearizable read; its `ReadState` (with `ctx`) appears in a later Ready.
    pub fn read_index(&mut self, ctx: Vec<u8>) {
        self.node.read_index(ctx);
    }

    pub fn report_unreachable(&mut self, to: NodeId) {
        self.node.report_unreachable(to.0);
    }

    pub fn report_snapshot(&mut self, to: NodeId, ok: bool) {
        let status = if ok {
            raft::SnapshotStatus::Finish
        } else {
            raft::SnapshotStatus::Failure
        };
        self.node.report_snapshot(to.0, status);
    }

    pub fn has_ready(&self) -> bool {
        self.pending.is_none() && self.node.has_ready()
    }

    /// Takes the next batch of work, if any. Must be followed by [`RaftGroup::advance`]
    /// before the next call.
    pub fn ready(&mut self) -> Option<ReadyWork> {
        assert!(
            self.pending.is_none(),
            "ready() called twice without advance()"
        );
        if !self.node.has_ready() {
            return None;
        }
        let mut rd = self.node.ready();
        let mut work = ReadyWork {
            messages: rd.take_messages(),
            ..Default::default()
        };
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            let md = snap.get_metadata();
            self.conf_index = self.conf_index.max(md.index);
            work.persist.push(LogOp::Snapshot {
                group: self.id,
                index: md.index,
                term: md.term,
                conf_state: md.get_conf_state().clone(),
            });
            work.snapshot = Some(snap);
        }
        work.committed = rd.take_committed_entries();
        let entries = rd.take_entries();
        if !entries.is_empty() {
            work.persist.push(LogOp::Append {
                group: self.id,
                entries,
            });
        }
        if let Some(hs) = rd.hs() {
            let term_vote = (hs.term, hs.vote);
            work.votes = term_vote != self.term_vote;
            self.term_vote = term_vote;
            work.persist.push(LogOp::HardState {
                group: self.id,
                hard_state: hs.clone(),
            });
        }
        work.must_sync = rd.must_sync() || work.snapshot.is_some();
        work.persisted_messages = rd.take_persisted_messages();
        work.read_states = rd.take_read_states();
        let role = (self.node.raft.state, self.node.raft.leader_id);
        if role != self.last_role {
            self.last_role = role;
            work.role_changed = Some((
                role.0,
                (role.1 != raft::INVALID_ID).then_some(NodeId(role.1)),
            ));
        }
        self.pending = Some(rd);
        Some(work)
    }

    /// Tells raft-rs that the last Ready was persisted; returns follow-up work.
    pub fn advance(&mut self) -> AdvanceWork {
        let rd = self.pending.take().expect("advance() without ready()");
        let mut light = self.node.advance(rd);
        let mut work = AdvanceWork {
            messages: light.take_messages(),
            committed: light.take_committed_entries(),
            ..Default::default()
        };
        if light.commit_index().is_some() {
            let hs = self.node.raft.hard_state();
            work.persist.push(LogOp::HardState {
                group: self.id,
                hard_state: hs,
            });
        }
        work
    }

    /// Tells raft-rs that the last Ready was *written* but not yet synced, and returns
    /// its number: the driver calls [`RaftGroup::on_persisted`] with it once a sync
    /// covers the write, and only then sends `ReadyWork::persisted_messages`. Until
    /// then this node's own entries count toward no commit. Follow-up work (commit
    /// index, committed entries, messages) comes with later Readies. The entries
    /// delivered as committed count as applied, as with [`RaftGroup::advance`].
    pub fn advance_written(&mut self, delivered: Option<LogIndex>) -> u64 {
        let rd = self
            .pending
            .take()
            .expect("advance_written() without ready()");
        let number = rd.number();
        self.node.advance_append_async(rd);
        if let Some(i) = delivered {
            self.advance_apply_to(i);
        }
        number
    }

    /// Every Ready up to `number` is durable (see [`RaftGroup::advance_written`]).
    pub fn on_persisted(&mut self, number: u64) {
        self.node.on_persist_ready(number);
    }

    /// Handles committed entries: membership changes are applied to Raft here and their
    /// new `ConfState` is added to `batch`; everything else is returned for the state
    /// machine, in log order.
    pub fn apply_committed(
        &mut self,
        entries: Vec<Entry>,
        batch: &mut LogBatch,
    ) -> Result<Vec<Applied>, raft::Error> {
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            let index = LogIndex(entry.index);
            match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => {
                    out.push(Applied::Internal { index })
                }
                EntryType::EntryNormal => out.push(Applied::Command {
                    index,
                    term: Term(entry.term),
                    data: entry.data.to_vec(),
                }),
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    // A V1 change is applied as its V2 equivalent: one path for both.
                    let cc = if entry.get_entry_type() == EntryType::EntryConfChange {
                        let mut v1 = ConfChange::default();
                        v1.merge_from_bytes(&entry.data)
                            .map_err(raft::Error::CodecError)?;
                        v1.into_v2()
                    } else {
                        let mut v2 = ConfChangeV2::default();
                        v2.merge_from_bytes(&entry.data)
                            .map_err(raft::Error::CodecError)?;
                        v2
                    };
                    if index.0 <= self.conf_index {
                        // Already reflected in the membership this replica restarted
                        // with (changes are recorded as they apply, ahead of the
                        // durable applied index).
                        out.push(Applied::Internal { index });
                        continue;
                    }
                    // A change of another epoch (the old home's, in a re-formed group's
                    // log) never acts here. raft-rs's own leave of a joint configuration
                    // carries no epoch: it belongs to whichever epoch proposed the
                    // joint change before it, and an old one is refused below (the
                    // re-formed membership is not joint).
                    let auto_leave = entry.context.is_empty() && cc.changes.is_empty();
                    let epoch =
                        <[u8; 8]>::try_from(entry.context.as_ref()).map_or(0, u64::from_be_bytes);
                    if !auto_leave && epoch != self.epoch {
                        tracing::info!(group = %self.id, index = index.0, epoch,
                            ours = self.epoch, "membership change of another epoch skipped");
                        out.push(Applied::Internal { index });
                        continue;
                    }
                    self.conf_index = index.0;
                    match self.node.apply_conf_change(&cc) {
                        Ok(cs) => batch.push(LogOp::ConfState {
                            group: self.id,
                            conf_state: cs,
                            index: index.0,
                        }),
                        // Every replica refuses the same change from the same
                        // membership: it is a no-op everywhere. (The leader refuses
                        // invalid proposals; this guards the node, not the protocol.)
                        Err(e) => tracing::error!(
                            group = %self.id, index = index.0, error = %e,
                            "membership change refused at apply; ignored"
                        ),
                    }
                    out.push(Applied::Internal { index });
                }
            }
        }
        Ok(out)
    }

    /// Decodes entries for a replay of the log (a replica that copied its blocks replays
    /// the entries it deferred). Membership changes in them were applied to Raft when
    /// they were first delivered, so here they are only skipped.
    pub fn apply_committed_replay(&self, entries: Vec<Entry>) -> Result<Vec<Applied>, raft::Error> {
        Ok(entries
            .into_iter()
            .map(|entry| {
                let index = LogIndex(entry.index);
                if entry.get_entry_type() == EntryType::EntryNormal && !entry.data.is_empty() {
                    Applied::Command {
                        index,
                        term: Term(entry.term),
                        data: entry.data.to_vec(),
                    }
                } else {
                    Applied::Internal { index }
                }
            })
            .collect())
    }

    /// Records that the state machine has applied everything up to `index`, as far as
    /// raft-rs allows: not past what this replica has persisted (a snapshot's index is
    /// applied at once but persisted with the next sync). Call again after
    /// [`RaftGroup::on_persisted`].
    pub fn advance_apply_to(&mut self, index: LogIndex) {
        let log = &self.node.raft.raft_log;
        let index = index.0.min(log.committed).min(log.persisted);
        if index > log.applied {
            self.node.advance_apply_to(index);
        }
    }
}

/// A slog logger that forwards raft-rs's logs to `tracing` (target `raft`). raft-rs logs
/// routine role changes at INFO; they become DEBUG here, and raft-rs ERRORs become WARN:
/// they describe protocol situations Raft handles, not something a person must fix.
pub fn raft_logger() -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!())
}

struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(
        &self,
        record: &slog::Record<'_>,
        values: &slog::OwnedKVList,
    ) -> Result<(), slog::Never> {
        struct Collect(String);
        impl slog::Serializer for Collect {
            fn emit_arguments(
                &mut self,
                key: slog::Key,
                val: &std::fmt::Arguments<'_>,
            ) -> slog::Result {
                use std::fmt::Write;
                let _ = write!(self.0, " {key}={val}");
                Ok(())
            }
        }
        let mut kv = Collect(String::new());
        let _ = slog::KV::serialize(values, record, &mut kv);
        let _ = slog::KV::serialize(&record.kv(), record, &mut kv);
        let msg = record.msg();
        match record.level() {
            slog::Level::Critical => tracing::error!(target: "raft", "{msg}{}", kv.0),
            slog::Level::Error | slog::Level::Warning => {
                tracing::warn!(target: "raft", "{msg}{}", kv.0)
            }
            slog::Level::Info | slog::Level::Debug => {
                tracing::debug!(target: "raft", "{msg}{}", kv.0)
            }
            slog::Level::Trace => tracing::trace!(target: "raft", "{msg}{}", kv.0),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
