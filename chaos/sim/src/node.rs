//! One simulated storage node: the node core the storage node runs
//! (`roamdisk_core::node::NodeCore`) over a simulated disk, and a driver that does what
//! the storage node's store thread does with the core's effects — nothing more. Every
//! decision (what to answer when, when to sync, what to apply, what a checkpoint
//! records, whether a block copy is accepted) is the core's.
//!
//! What the driver models:
//! - the log store (`store::SimStore`: writes, and syncs that complete after a drawn
//!   delay, each covering exactly what was written before it started — a power loss can
//!   land in between);
//! - each volume replica's data as an extent file (`VolumeData`: page cache and what an
//!   fsync made durable; a power loss keeps each unsynced page or not, at random);
//! - checkpoints: the core takes the applied indexes, the data is fsynced after a drawn
//!   delay, then the core records them;
//! - the block copy of a replica that must catch up (driven by the simulation, which
//!   reads the source replica's data chunk by chunk over the network);
//! - clients' requests and their answers.
//!
//! A replica's data is compared with the record (`checker::observe_state`) only where
//! it is exact: after a restart the extent file may hold writes from later entries than
//! the index the core replays from (they were in the page cache, or written back before
//! the crash), so it is exact again only once the replay passes the highest index the
//! replica had applied; after a block copy, once it passes the index the copy's source
//! had reached.

use std::collections::BTreeMap;
use std::sync::Arc;

use raft::eraftpb::{ConfChangeV2, ConfState, Message, MessageType};
use raft::StateRole;
use roamdisk_core::group::GroupConfig;
use roamdisk_core::ids::{GroupId, LogIndex, NodeId, SiteId, META_GROUP};
use roamdisk_core::logstore::{GroupState, LogStore};
use roamdisk_core::node::{
    CheckpointPlan, Effect as CoreEffect, NodeConfig, NodeCore, Note, Outcome, QuarantineReport,
    Refused, ReqId, SyncWanted, Written,
};
use roamdisk_core::time::Time;

use crate::checker::{violation, Check, Checker, Invariant, Key};
use crate::client::Op;
use crate::config::{Micros, SimConfig};
use crate::machine::{MachineKind, MetaMonotone, VolumeData, REGISTERS_AT, REGISTER_BYTES};
use crate::rng::SimRng;
use crate::store::SimStore;
use crate::trace::Trace;

/// Committed log entries below a node's commit index compared with the committed record
/// after every event, on every running node (a full comparison runs after restarts,
/// periodically and at the end).
pub const LOG_CHECK_WINDOW: u64 = 16;

/// A client's request as it reaches a node.
#[derive(Clone, Debug)]
pub struct ClientRequest {
    pub client: usize,
    pub request: u64,
    pub attempt: u32,
    pub group: GroupId,
    pub op: Op,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The write's entry is at `index` in `term`; `early`: answered once a quorum had
    /// written it, before its commit.
    Written {
        index: u64,
        term: u64,
        early: bool,
        /// The group's voters when it answered (incoming, and outgoing while joint).
        voters: (Vec<NodeId>, Vec<NodeId>),
    },
    Flushed,
    /// A register's bytes as read.
    Read {
        bytes: Vec<u8>,
    },
    NotLeader {
        leader: Option<NodeId>,
    },
    /// Dropped, superseded by another leader's entry, or refused for now.
    Retry(&'static str),
}

/// What travels between nodes.
#[derive(Clone, Debug)]
pub enum Wire {
    Raft(Message),
    Written(Written),
    SyncWanted(SyncWanted),
    /// Whether the sender is quarantined in the group (rebooted without a clean
    /// shutdown), and the membership it knows.
    Quarantine(QuarantineReport),
    /// The leader's log end and the receiver's lag (to replicas at other sites).
    Tail(roamdisk_core::node::TailReport),
}

impl Wire {
    pub fn raft(&self) -> Option<&Message> {
        match self {
            Wire::Raft(m) => Some(m),
            _ => None,
        }
    }
}

pub enum Input {
    Wire {
        from: NodeId,
        group: GroupId,
        epoch: u64,
        wire: Wire,
    },
    Request(ClientRequest),
    Tick,
    SnapshotStatus {
        group: GroupId,
        to: NodeId,
        ok: bool,
    },
    Unreachable {
        to: NodeId,
    },
    TransferLeader {
        group: GroupId,
        to: NodeId,
    },
    ConfChange {
        group: GroupId,
        cc: ConfChangeV2,
    },
}

/// What a node asks of the world.
pub enum Effect {
    Send {
        from: NodeId,
        to: NodeId,
        group: GroupId,
        /// The sender's epoch of the group (the receiver drops another epoch's).
        epoch: u64,
        wire: Wire,
    },
    Reply {
        node: NodeId,
        client: usize,
        request: u64,
        attempt: u32,
        reply: Reply,
        /// The epoch of the group that answered, and when.
        epoch: u64,
        answered_at: Micros,
    },
    /// The node's log sync completes after this long (unless it crashes first).
    SyncAfter {
        node: NodeId,
        incarnation: u64,
        after: Micros,
    },
    /// The node's checkpoint's fsyncs complete after this long.
    CheckpointAfter {
        node: NodeId,
        incarnation: u64,
        after: Micros,
    },
    /// The node wants `process` called at this time (a put-off sync).
    WakeAt {
        node: NodeId,
        incarnation: u64,
        at: Micros,
    },
    /// The node's replica of `group` must copy its blocks for recovery point `point`.
    CopyBlocks {
        node: NodeId,
        incarnation: u64,
        group: GroupId,
        point: u64,
    },
}

/// What node code may use besides the node itself.
pub struct Ctx<'a> {
    pub now: Micros,
    pub cfg: &'a SimConfig,
    pub rng: &'a mut SimRng,
    pub checker: &'a mut Checker,
    pub effects: &'a mut Vec<Effect>,
    pub trace: &'a mut Trace,
}

/// How each replica was created (to rebuild a disk that a broken driver wiped).
#[derive(Clone, Debug)]
pub struct ReplicaSeed {
    pub kind: MachineKind,
    /// Bootstrap membership, or `None` for a new replica that awaits a snapshot.
    pub conf: Option<ConfState>,
}

/// A request the core holds, and what is known of its entry.
struct Pending {
    req: ClientRequest,
    /// The group's epoch here when the request arrived (an epoch change refuses every
    /// request waiting, so a success is that epoch's).
    epoch: u64,
    /// (index, term, answered early) once the core said where its entry is.
    placed: Option<(u64, u64, bool)>,
}

/// What the driver last saw of a replica, to notice changes.
#[derive(Clone, Copy, PartialEq)]
struct Seen {
    role: StateRole,
    term: u64,
    commit: u64,
}

pub struct Node {
    pub id: NodeId,
    pub site: SiteId,
    pub store: Arc<SimStore>,
    pub core: Option<NodeCore<SimStore>>,
    pub up: bool,
    /// Bumped by every crash, so that a sync or copy scheduled before it is ignored.
    pub incarnation: u64,
    /// Every volume replica's data (its extent file), which outlives the process.
    pub volumes: BTreeMap<GroupId, VolumeData>,
    /// The newest state each volume replica's data may hold writes of, in any
    /// incarnation (the highest index it applied, or that a copy's source had applied),
    /// and the index from which its data is exact again (see the module doc).
    data_high: BTreeMap<GroupId, u64>,
    exact_from: BTreeMap<GroupId, u64>,
    seeds: BTreeMap<GroupId, ReplicaSeed>,
    requests: BTreeMap<ReqId, Pending>,
    next_req: u64,
    /// Batches the log sync in flight covers.
    syncing: Option<u64>,
    checkpoint: Option<CheckpointPlan>,
    /// Copies running, by group: their recovery point and the highest index of the
    /// source data they copied.
    pub copies: BTreeMap<GroupId, (u64, u64)>,
    seen: BTreeMap<GroupId, Seen>,
    /// Each group's epoch here, as of the effect being executed (`Note::Epoch`).
    epochs: BTreeMap<GroupId, u64>,
    monotone: Option<MetaMonotone>,
    /// The wake-up asked for last (to ask once per time).
    wake: Option<Micros>,
    /// The disk was replaced by an empty one (a deliberately broken disk).
    wiped: bool,
    /// Site-durable groups and their replicas outside the home site.
    /// Site-durable groups: the replicas outside the home site, and how long a write
    /// waits for one before the group degrades (`None`: for good).
    site_durable: BTreeMap<GroupId, (Vec<NodeId>, Option<std::time::Duration>)>,
    /// The machine lost power since the core last opened: the next start is a reboot.
    rebooted: bool,
    /// The next log sync fails (an injected disk error).
    pub fail_sync: bool,
    gcfg: GroupConfig,
    meta_voters: Vec<NodeId>,
    bootstrap_index: u64,
    retained_entries: u64,
}

fn core_err(what: &str, e: impl std::fmt::Display) -> crate::checker::Violation {
    violation(Invariant::CoreError, format!("{what}: {e}"))
}

fn time(us: Micros) -> Time {
    Time::from_micros(us)
}

/// The wall-clock time of a site-loss run's start (entries' stamps count from it).
pub const WALL_EPOCH_UNIX_MS: u64 = 1_800_000_000_000;

/// Registers epoch `epoch` of `group` with the checker, cut where the metadata's
/// failover record says.
/// The source of the failover, as it re-forms the group (`reform`), cuts at its own
/// commit index (its whole log is the new epoch's); otherwise the cut is the plan's.
fn start_epoch(
    core: &NodeCore<SimStore>,
    checker: &mut Checker,
    group: GroupId,
    epoch: u64,
    reform: bool,
) {
    let Some(f) = core
        .cluster()
        .volume_by_id(roamdisk_core::ids::VolumeId(group.0))
        .and_then(|v| v.failover.as_ref())
    else {
        return;
    };
    let mut cut = f.committed;
    if reform && f.node == core.me() {
        if let Some(r) = core.raft(group) {
            cut = cut.max(r.commit_index().0);
        }
    }
    checker.start_epoch(Key::new(group, epoch), cut);
}

impl Node {
    pub fn new(
        id: NodeId,
        site: SiteId,
        cfg: &SimConfig,
        retained_entries: u64,
        meta_voters: Vec<NodeId>,
    ) -> Node {
        let gcfg = GroupConfig {
            election_tick: cfg.election_tick as usize,
            heartbeat_tick: cfg.heartbeat_tick,
            max_size_per_msg: cfg.max_size_per_msg,
            max_inflight_msgs: cfg.max_inflight_msgs,
            max_uncommitted_size: 1 << 20,
            lease_reads: false,
        };
        Node {
            id,
            site,
            store: Arc::new(SimStore::default()),
            core: None,
            up: true,
            incarnation: 0,
            volumes: BTreeMap::new(),
            data_high: BTreeMap::new(),
            exact_from: BTreeMap::new(),
            seeds: BTreeMap::new(),
            requests: BTreeMap::new(),
            next_req: 0,
            syncing: None,
            checkpoint: None,
            copies: BTreeMap::new(),
            seen: BTreeMap::new(),
            epochs: BTreeMap::new(),
            monotone: None,
            wake: None,
            wiped: false,
            site_durable: BTreeMap::new(),
            rebooted: false,
            fail_sync: false,
            gcfg,
            meta_voters,
            bootstrap_index: cfg.bootstrap_index,
            retained_entries,
        }
    }

    fn node_config(&self, cfg: &SimConfig, seed: u64) -> NodeConfig {
        let mut c = NodeConfig::new(
            self.id,
            self.gcfg.clone(),
            slog::Logger::root(slog::Discard, slog::o!()),
        );
        c.initial_meta_voters.clone_from(&self.meta_voters);
        // A node outside the metadata group's bootstrap membership opens it empty.
        c.joining = !self.meta_voters.contains(&self.id);
        c.election_seed = seed;
        c.reconcile = false;
        c.retained_log_entries = self.retained_entries;
        c.observe = true;
        c.bug = cfg.core_bug;
        c.rebooted = self.rebooted;
        if cfg.site_loss {
            // Entries carry the home-site time a failover plan states its loss in.
            c.wall_epoch_unix_ms = WALL_EPOCH_UNIX_MS;
        }
        c
    }

    /// The epoch of this node's replica of `group` (0 before any failover).
    pub fn epoch(&self, group: GroupId) -> u64 {
        self.epochs.get(&group).copied().unwrap_or(0)
    }

    /// The checker's record this replica of `group` reports to.
    pub fn key(&self, group: GroupId) -> Key {
        Key::new(group, self.epoch(group))
    }

    /// The replica's report for a failover being executed (it holds still meanwhile:
    /// `NodeCore::replica_report_holding`).
    pub fn report_holding(
        &mut self,
        now: Micros,
        group: GroupId,
    ) -> Option<roamdisk_core::node::ReplicaReport> {
        self.core.as_mut()?.replica_report_holding(time(now), group)
    }

    /// Whether a failover fenced this node's replica of `group`.
    pub fn fenced(&self, group: GroupId) -> bool {
        self.core
            .as_ref()
            .is_some_and(|c| c.fenced(group).is_some())
    }

    /// Reads each group's epoch from a core just opened, and makes sure the checker has
    /// its record (the failover's cut is in the metadata).
    fn load_epochs(&mut self, ctx: &mut Ctx<'_>) {
        let core = self.core.as_ref().expect("opened");
        self.epochs.clear();
        for g in core.group_ids() {
            if let Some((epoch, _)) = core.epoch_of(g) {
                self.epochs.insert(g, epoch);
                if epoch > 0 {
                    start_epoch(core, ctx.checker, g, epoch, false);
                }
            }
        }
    }

    pub fn is_busy(&self) -> bool {
        self.syncing.is_some()
    }

    pub fn hosts(&self, group: GroupId) -> bool {
        self.seeds.contains_key(&group)
    }

    pub fn core(&self) -> &NodeCore<SimStore> {
        self.core.as_ref().expect("a running node has a core")
    }

    fn core_mut(&mut self) -> &mut NodeCore<SimStore> {
        self.core.as_mut().expect("a running node has a core")
    }

    /// The raft state of `group` on this node, if it runs and has the group.
    pub fn raft(&self, group: GroupId) -> Option<&roamdisk_core::group::RaftGroup<SimStore>> {
        self.core.as_ref()?.raft(group)
    }

    /// Puts the metadata group on this node's disk before its core first opens it, with
    /// the bootstrap membership `conf` (`None`: the node is not a member; the core opens
    /// it empty).
    pub fn seed_meta(
        &self,
        group: GroupId,
        conf: Option<ConfState>,
        initial: &roamdisk_core::meta::ClusterState,
    ) -> Result<(), String> {
        let Some(cs) = conf else {
            return Ok(());
        };
        let base = self.bootstrap_index;
        let mut state = GroupState::default();
        state.conf_state = cs;
        state.truncated_index = base;
        state.truncated_term = base;
        state.hard_state.term = base;
        state.hard_state.commit = base;
        state.applied_index = base;
        let mut b = roamdisk_core::logstore::LogBatch::default();
        b.push(roamdisk_core::logstore::LogOp::Create { group, state });
        // The state at the base index, which a snapshot of it carries.
        b.push(roamdisk_core::logstore::LogOp::Put {
            key: roamdisk_core::node::META_SNAPSHOT_KEY.to_vec(),
            value: initial.encode(),
        });
        self.store.write(b).map_err(|e| e.to_string())?;
        self.store.sync().map_err(|e| e.to_string())
    }

    /// Starts the node for the first time (its metadata group is bootstrapped).
    pub fn start(&mut self, ctx: &mut Ctx<'_>) -> Check {
        let seed = ctx.rng.next_u64();
        let cfg = self.node_config(ctx.cfg, seed);
        let core = NodeCore::open(cfg, Arc::clone(&self.store), Arc::default(), time(ctx.now))
            .map_err(|e| core_err("NodeCore::open", e))?;
        self.core = Some(core);
        self.load_epochs(ctx);
        self.seeds.insert(
            META_GROUP,
            ReplicaSeed {
                kind: MachineKind::Meta,
                conf: None,
            },
        );
        self.after_input(ctx)
    }

    /// Creates a replica of a volume group on this node.
    pub fn create_replica(
        &mut self,
        group: GroupId,
        seed: ReplicaSeed,
        ctx: &mut Ctx<'_>,
    ) -> Check {
        let mut state = GroupState::default();
        if let Some(cs) = &seed.conf {
            let base = self.bootstrap_index;
            state.conf_state = cs.clone();
            state.truncated_index = base;
            state.truncated_term = base;
            state.hard_state.term = base;
            state.hard_state.commit = base;
            state.applied_index = base;
        }
        let now = time(ctx.now);
        self.core_mut()
            .create_group(now, group, state)
            .map_err(|e| core_err("create_group", e))?;
        if seed.kind == MachineKind::Volume {
            self.volumes.entry(group).or_default();
        }
        self.seeds.insert(group, seed);
        self.after_input(ctx)
    }

    /// Makes `group` site-durable with `remote` as the replicas outside the home site
    /// (again after every restart: it is the metadata's on a storage node).
    pub fn set_site_durable(
        &mut self,
        group: GroupId,
        remote: Vec<NodeId>,
        degrade_after: Option<std::time::Duration>,
    ) {
        if let Some(core) = self.core.as_mut() {
            core.set_site_durable(group, true, remote.clone());
            core.set_degrade_after(group, degrade_after);
        }
        self.site_durable.insert(group, (remote, degrade_after));
    }

    /// Crash: the process dies; with `power_loss`, what was written but not synced is
    /// gone too (the log's unsynced batches, and each unsynced page of volume data with
    /// some probability).
    pub fn crash(&mut self, power_loss: bool, wipe: bool, rng: &mut SimRng) {
        self.up = false;
        self.incarnation += 1;
        self.core = None;
        self.requests.clear();
        self.syncing = None;
        self.checkpoint = None;
        self.copies.clear();
        self.seen.clear();
        self.monotone = None;
        self.wake = None;
        self.fail_sync = false;
        if power_loss {
            self.rebooted = true;
            self.store.power_loss();
            for v in self.volumes.values_mut() {
                v.power_loss(|_| rng.below(2) == 0);
            }
            if wipe {
                // The deliberately broken disk: synced data is lost too.
                self.store = Arc::new(SimStore::default());
                for v in self.volumes.values_mut() {
                    *v = VolumeData::default();
                }
                self.wiped = true;
            }
        }
        // After a restart the data is exact only once the replay passes the newest state
        // it may hold.
        for (g, high) in &self.data_high {
            let e = self.exact_from.entry(*g).or_default();
            *e = (*e).max(*high);
        }
    }

    pub fn restart(&mut self, ctx: &mut Ctx<'_>) -> Check {
        self.up = true;
        let seed = ctx.rng.next_u64();
        let cfg = self.node_config(ctx.cfg, seed);
        let core = NodeCore::open(cfg, Arc::clone(&self.store), Arc::default(), time(ctx.now))
            .map_err(|e| core_err("NodeCore::open", e))?;
        self.core = Some(core);
        self.load_epochs(ctx);
        self.rebooted = false;
        for (group, (remote, degrade_after)) in &self.site_durable {
            let core = self.core.as_mut().expect("opened");
            core.set_site_durable(*group, true, remote.clone());
            core.set_degrade_after(*group, *degrade_after);
        }
        if self.wiped {
            self.wiped = false;
            let seeds = std::mem::take(&mut self.seeds);
            for (group, seed) in seeds {
                if group == META_GROUP {
                    self.seeds.insert(group, seed);
                    continue;
                }
                self.create_replica(group, seed, ctx)?;
            }
        }
        for group in self.core().group_ids() {
            self.check_reopened_against_model(group)?;
            self.check_log_full(group, ctx.checker, "restart")?;
        }
        self.after_input(ctx)
    }

    /// A reopened group must hold what the disk model says survived the crash: the same
    /// log span with the same last term, and at least the commit index it had.
    fn check_reopened_against_model(&self, group: GroupId) -> Check {
        let Some(model) = self.store.model_written(group) else {
            return Ok(());
        };
        let me = self.id;
        let st = self
            .store
            .state(group)
            .map_err(|e| core_err("store state", e))?
            .expect("opened");
        let last = self
            .store
            .last_index(group)
            .map_err(|e| core_err("store last index", e))?;
        let term = self
            .store
            .term(group, last)
            .map_err(|e| core_err("store term", e))?;
        let commit = self.raft(group).expect("opened").commit_index().0;
        if last != model.last_index
            || st.truncated_index != model.truncated_index
            || term != model.term(model.last_index)
            || commit < model.commit
        {
            return Err(violation(
                Invariant::CommittedEntryStable,
                format!(
                    "node {me} group {group}: after the crash the store holds log ({}, {last}] \
                     (last term {term:?}, commit {commit}) but what survives a crash is \
                     ({}, {}] (last term {:?}, commit {}): synced data was lost",
                    st.truncated_index,
                    model.truncated_index,
                    model.last_index,
                    model.term(model.last_index),
                    model.commit
                ),
            ));
        }
        Ok(())
    }

    /// Hands an input to the node's core, then runs a round and executes its effects.
    pub fn handle(&mut self, input: Input, ctx: &mut Ctx<'_>) -> Check {
        if !self.up {
            return Ok(());
        }
        let me = self.id;
        let now = time(ctx.now);
        match input {
            Input::Wire {
                from,
                group,
                epoch,
                wire,
            } => {
                if let Wire::Raft(msg) = &wire {
                    // Another epoch's frames are dropped by the core.
                    let same_epoch = epoch == self.epoch(group);
                    if let Some(r) = self.raft(group).filter(|_| same_epoch) {
                        if msg.get_msg_type() == MessageType::MsgHeartbeat
                            && msg.commit > r.last_index().0
                        {
                            // A heartbeat commits no further than what this replica
                            // acknowledged (raft-rs would panic here): it lost entries it
                            // had acknowledged.
                            return Err(violation(
                                Invariant::CommittedEntryStable,
                                format!(
                                    "node {me} group {group}: leader {from} commits to {} on it, \
                                     but its log ends at {}: it lost entries it acknowledged",
                                    msg.commit,
                                    r.last_index()
                                ),
                            ));
                        }
                    }
                }
                let core = self.core_mut();
                match wire {
                    Wire::Raft(msg) => core.step(now, group, epoch, msg),
                    Wire::Written(w) => core.written(group, epoch, from, w),
                    Wire::SyncWanted(want) => core.sync_wanted(group, epoch, want),
                    Wire::Quarantine(report) => {
                        core.quarantine_report(now, group, epoch, from, report)
                    }
                    Wire::Tail(t) => core.tail(now, group, epoch, from, t),
                }
            }
            Input::Request(req) => {
                self.next_req += 1;
                let id = ReqId(self.next_req);
                let group = req.group;
                let op = req.op.clone();
                let epoch = self.epoch(group);
                self.requests.insert(
                    id,
                    Pending {
                        req,
                        epoch,
                        placed: None,
                    },
                );
                let core = self.core_mut();
                match op {
                    Op::Write { payload, ack, .. } => {
                        core.propose(now, group, None, payload, ack, id)
                    }
                    Op::Flush => core.flush(now, group, None, id),
                    Op::Read { .. } => core.read(now, group, None, id),
                }
            }
            Input::Tick => self.core_mut().tick(now),
            Input::SnapshotStatus { group, to, ok } => {
                self.core_mut().snapshot_status(group, to, ok)
            }
            Input::Unreachable { to } => self.core_mut().unreachable(to),
            Input::TransferLeader { group, to } => self.core_mut().transfer_leader(group, to),
            Input::ConfChange { group, cc } => {
                let r = self.core_mut().conf_change(group, cc.clone());
                ctx.trace.note(ctx.now, || {
                    format!("n{me} g{group}: propose {cc:?} -> {r:?}")
                });
            }
        }
        self.after_input(ctx)
    }

    /// A round after an input: the core's Ready work, its effects, and the checks.
    fn after_input(&mut self, ctx: &mut Ctx<'_>) -> Check {
        let now = time(ctx.now);
        self.core_mut()
            .process(now)
            .map_err(|e| core_err("NodeCore::process", e))?;
        self.run_effects(ctx)
    }

    /// The log sync started by the core has completed. Returns true if it failed (an
    /// injected disk error): the node then stops, as the storage node does.
    pub fn sync_done(
        &mut self,
        incarnation: u64,
        ctx: &mut Ctx<'_>,
    ) -> Result<bool, crate::checker::Violation> {
        if !self.up || incarnation != self.incarnation {
            return Ok(false);
        }
        let Some(through) = self.syncing.take() else {
            return Ok(false);
        };
        if std::mem::take(&mut self.fail_sync) {
            self.store.fail_next_sync();
        }
        let result = self.store.sync_through(through).map_err(|e| e.to_string());
        let now = time(ctx.now);
        let failed = result.is_err();
        let r = self.core_mut().log_synced(now, result);
        match (failed, r) {
            (true, Err(_)) => return Ok(true),
            (true, Ok(())) => {
                return Err(core_err("log_synced", "a failed sync was taken as done"))
            }
            (false, Err(e)) => return Err(core_err("log_synced", e)),
            (false, Ok(())) => {}
        }
        self.after_input(ctx)?;
        Ok(false)
    }

    /// Time for a put-off sync, or another timed decision.
    pub fn wake(&mut self, incarnation: u64, ctx: &mut Ctx<'_>) -> Check {
        if !self.up || incarnation != self.incarnation {
            return Ok(());
        }
        self.wake = None;
        self.after_input(ctx)
    }

    /// Starts a checkpoint (`aggressive`: at once, compacting everything applied);
    /// returns whether one started.
    pub fn checkpoint(
        &mut self,
        aggressive: bool,
        ctx: &mut Ctx<'_>,
    ) -> Result<bool, crate::checker::Violation> {
        if !self.up || self.checkpoint.is_some() {
            return Ok(false);
        }
        let plan = self
            .core_mut()
            .checkpoint_begin(|_| true)
            .map_err(|e| core_err("checkpoint_begin", e))?;
        let Some(plan) = plan else {
            return Ok(false);
        };
        if aggressive {
            let retained = self.core().retained_log_entries();
            self.core_mut().set_retained_log_entries(0);
            self.checkpoint = Some(plan);
            let r = self.checkpoint_done(self.incarnation, ctx);
            if let Some(core) = self.core.as_mut() {
                core.set_retained_log_entries(retained);
            }
            return r.map(|()| true);
        }
        self.checkpoint = Some(plan);
        let after = ctx.rng.range(ctx.cfg.sync_us.0, ctx.cfg.sync_us.1);
        ctx.effects.push(Effect::CheckpointAfter {
            node: self.id,
            incarnation: self.incarnation,
            after,
        });
        Ok(true)
    }

    /// The checkpoint's fsyncs are done: the volumes' data is durable at least up to
    /// the indexes the core took, which it now records.
    pub fn checkpoint_done(&mut self, incarnation: u64, ctx: &mut Ctx<'_>) -> Check {
        if !self.up || incarnation != self.incarnation {
            return Ok(());
        }
        let Some(plan) = self.checkpoint.take() else {
            return Ok(());
        };
        for (v, _) in &plan.volumes {
            if let Some(data) = self.volumes.get_mut(&v.group()) {
                data.sync();
            }
        }
        self.core_mut()
            .checkpoint_end(plan, Vec::new())
            .map_err(|e| core_err("checkpoint_end", e))?;
        self.after_input(ctx)
    }

    /// One chunk of a block copy landed: bytes `range` of `source`'s data, which had
    /// applied `source_applied`.
    pub fn copy_chunk(
        &mut self,
        group: GroupId,
        point: u64,
        source: &VolumeData,
        source_applied: u64,
        range: std::ops::Range<usize>,
    ) {
        if let Some(data) = self.volumes.get_mut(&group) {
            data.copy_from(source, range);
        }
        // Copied data outlives the copy: even if a crash loses the snapshot it was made
        // for, the replica's data holds writes up to the source's index.
        let high = self.data_high.entry(group).or_default();
        *high = (*high).max(source_applied);
        if let Some(c) = self.copies.get_mut(&group) {
            if c.0 == point {
                c.1 = c.1.max(source_applied);
            }
        }
    }

    /// The block copy for `point` ended; the core accepts it or not. Returns whether it
    /// did.
    pub fn copy_done(
        &mut self,
        group: GroupId,
        point: u64,
        ctx: &mut Ctx<'_>,
    ) -> Result<bool, crate::checker::Violation> {
        let Some((p, copy_end)) = self.copies.remove(&group) else {
            return Ok(false);
        };
        assert_eq!(p, point);
        let accepted = self
            .core_mut()
            .catch_up_done(group, LogIndex(point), LogIndex(copy_end))
            .map_err(|e| core_err("catch_up_done", e))?;
        if accepted {
            let e = self.exact_from.entry(group).or_default();
            *e = (*e).max(copy_end);
            ctx.trace.note(ctx.now, || {
                format!(
                    "n{} g{group}: block copy for {point} accepted (source at {copy_end})",
                    self.id
                )
            });
        }
        self.after_input(ctx)?;
        Ok(accepted)
    }

    /// Executes the core's effects in order.
    fn run_effects(&mut self, ctx: &mut Ctx<'_>) -> Check {
        let me = self.id;
        let effects = self.core_mut().take_effects();
        for e in effects {
            match e {
                CoreEffect::Send {
                    to,
                    group,
                    epoch,
                    msg,
                } => ctx.effects.push(Effect::Send {
                    from: me,
                    to,
                    group,
                    epoch,
                    wire: Wire::Raft(msg),
                }),
                CoreEffect::Written {
                    to,
                    group,
                    epoch,
                    w,
                } => ctx.effects.push(Effect::Send {
                    from: me,
                    to,
                    group,
                    epoch,
                    wire: Wire::Written(w),
                }),
                CoreEffect::SyncWanted {
                    to,
                    group,
                    epoch,
                    want,
                } => ctx.effects.push(Effect::Send {
                    from: me,
                    to,
                    group,
                    epoch,
                    wire: Wire::SyncWanted(want),
                }),
                CoreEffect::Quarantine {
                    to,
                    group,
                    epoch,
                    report,
                } => ctx.effects.push(Effect::Send {
                    from: me,
                    to,
                    group,
                    epoch,
                    wire: Wire::Quarantine(report),
                }),
                CoreEffect::Tail {
                    to,
                    group,
                    epoch,
                    tail,
                } => ctx.effects.push(Effect::Send {
                    from: me,
                    to,
                    group,
                    epoch,
                    wire: Wire::Tail(tail),
                }),
                CoreEffect::StartSync => {
                    if self.syncing.is_some() {
                        return Err(core_err("StartSync", "a second sync while one runs"));
                    }
                    self.syncing = Some(self.store.written_batches());
                    let after = ctx.rng.range(ctx.cfg.sync_us.0, ctx.cfg.sync_us.1);
                    ctx.effects.push(Effect::SyncAfter {
                        node: me,
                        incarnation: self.incarnation,
                        after,
                    });
                }
                CoreEffect::Apply {
                    volume,
                    index,
                    data,
                } => {
                    let group = volume.group();
                    let v = self.volumes.entry(group).or_default();
                    v.apply(&data)
                        .map_err(|e| core_err(&format!("apply entry {index:?}"), e.0))?;
                    let hash = v.hash();
                    let high = self.data_high.entry(group).or_default();
                    *high = (*high).max(index.0);
                    if index.0 >= self.exact_from.get(&group).copied().unwrap_or(0) {
                        let key = self.key(group);
                        ctx.checker.observe_state(key, me, index.0, hash, "apply")?;
                    }
                }
                CoreEffect::Answer { id, answer } => self.answer(id, answer, ctx)?,
                CoreEffect::ClusterChanged => self.check_monotone()?,
                CoreEffect::Recovering(list) => {
                    for (group, point) in list {
                        if !self.copies.contains_key(&group) {
                            self.copies.insert(group, (point.0, 0));
                            ctx.effects.push(Effect::CopyBlocks {
                                node: me,
                                incarnation: self.incarnation,
                                group,
                                point: point.0,
                            });
                        }
                    }
                }
                CoreEffect::Note(note) => self.note(note, ctx)?,
                // Verify markers change no data (the simulation runs no verify).
                CoreEffect::Verify { .. }
                | CoreEffect::Leader { .. }
                | CoreEffect::VolumeCreated { .. }
                | CoreEffect::VolumeGrown { .. }
                | CoreEffect::VolumeRemoved { .. } => {}
            }
        }
        self.observe(ctx)?;
        if let Some(at) = self.core().next_wakeup(time(ctx.now)) {
            let at = at.as_micros().max(ctx.now);
            if self.wake.is_none_or(|w| w > at) {
                self.wake = Some(at);
                ctx.effects.push(Effect::WakeAt {
                    node: me,
                    incarnation: self.incarnation,
                    at,
                });
            }
        }
        Ok(())
    }

    fn note(&mut self, note: Note, ctx: &mut Ctx<'_>) -> Check {
        let me = self.id;
        match note {
            Note::LeaderCommit {
                group,
                from,
                to,
                voters,
                outgoing,
            } => {
                let mut conf = ConfState::default();
                conf.voters = voters;
                conf.voters_outgoing = outgoing;
                let key = self.key(group);
                ctx.checker.observe_leader_commit(key, from, to, &conf);
            }
            Note::Committed { group, entry } => {
                let key = self.key(group);
                ctx.checker.observe_committed(key, me, &entry)?
            }
            Note::MetaApplied { index, hash } => {
                ctx.checker
                    .observe_state(META_GROUP.into(), me, index, hash, "apply")?
            }
            Note::AnsweredEarly {
                id, index, term, ..
            } => {
                if let Some(p) = self.requests.get_mut(&id) {
                    p.placed = Some((index, term, true));
                }
            }
            Note::CommittedAt {
                id, index, term, ..
            } => {
                if let Some(p) = self.requests.get_mut(&id) {
                    p.placed = Some((index, term, false));
                }
            }
            Note::Flushed { .. } => {}
            Note::QuarantineEnded { group, .. } => {
                let key = self.key(group);
                ctx.checker.observe_quarantine_end(key, ctx.now);
            }
            Note::Epoch {
                group,
                epoch,
                fenced,
            } => {
                ctx.trace.note(ctx.now, || {
                    format!(
                        "n{me} g{group}: {} epoch {epoch}",
                        if fenced { "fenced in" } else { "joins" }
                    )
                });
                if !fenced {
                    start_epoch(self.core(), ctx.checker, group, epoch, true);
                    self.epochs.insert(group, epoch);
                    // A new epoch's replica starts its commit index again (from zero,
                    // when it starts empty).
                    self.seen.remove(&group);
                    // The core reopened the group from its durable applied index (or
                    // empty): as after a restart, its data holds writes up to the newest
                    // it applied, and is exact again only past them.
                    if let Some(high) = self.data_high.get(&group).copied() {
                        let e = self.exact_from.entry(group).or_default();
                        *e = (*e).max(high);
                    }
                }
            }
        }
        Ok(())
    }

    /// Turns the core's answer into the client's reply.
    fn answer(
        &mut self,
        id: ReqId,
        answer: roamdisk_core::node::Answer,
        ctx: &mut Ctx<'_>,
    ) -> Check {
        let Some(p) = self.requests.remove(&id) else {
            return Err(violation(
                Invariant::CoreError,
                format!(
                    "node {}: request {id:?} answered twice or never asked",
                    self.id
                ),
            ));
        };
        let reply = match (answer, &p.req.op) {
            (Ok(Outcome::Volume | Outcome::Meta(_)), Op::Write { .. }) => match p.placed {
                Some((index, term, early)) => Reply::Written {
                    index,
                    term,
                    early,
                    voters: self
                        .raft(p.req.group)
                        .map(|r| r.voter_sets())
                        .unwrap_or_default(),
                },
                None => {
                    return Err(violation(
                        Invariant::CoreError,
                        format!(
                            "node {}: write {id:?} answered with no entry named",
                            self.id
                        ),
                    ))
                }
            },
            (Ok(_), Op::Flush) => Reply::Flushed,
            (Ok(_), Op::Read { slot }) => {
                let data = self.volumes.get(&p.req.group).cloned().unwrap_or_default();
                let at = REGISTERS_AT + slot * REGISTER_BYTES;
                Reply::Read {
                    bytes: data.bytes[at..at + REGISTER_BYTES].to_vec(),
                }
            }
            (Err(Refused::NotLeader { leader, .. }), _) => Reply::NotLeader { leader },
            (Err(Refused::NoGroup(_)), _) => Reply::NotLeader { leader: None },
            (Err(Refused::Recovering(_)), _) => Reply::Retry("recovering"),
            (Err(Refused::Busy), _) => Reply::Retry("busy"),
            (Err(Refused::Superseded), _) => Reply::Retry("superseded"),
            (Err(Refused::Fenced { .. }), _) => Reply::Retry("fenced"),
            (Err(Refused::Shutdown | Refused::Failed(_)), _) => Reply::Retry("failed"),
        };
        if matches!(
            reply,
            Reply::Written { .. } | Reply::Flushed | Reply::Read { .. }
        ) {
            ctx.checker
                .observe_answer(Key::new(p.req.group, p.epoch), ctx.now);
        }
        ctx.effects.push(Effect::Reply {
            node: self.id,
            client: p.req.client,
            request: p.req.request,
            attempt: p.req.attempt,
            reply,
            epoch: p.epoch,
            answered_at: ctx.now,
        });
        Ok(())
    }

    /// The metadata state never goes back within an incarnation.
    fn check_monotone(&mut self) -> Check {
        let now = MetaMonotone::of(self.core().cluster());
        if let Some(prev) = &self.monotone {
            if let Some(why) = now.went_back_from(prev) {
                return Err(violation(
                    Invariant::GenerationMonotone,
                    format!("node {}: metadata went back: {why}", self.id),
                ));
            }
        }
        self.monotone = Some(now);
        Ok(())
    }

    /// Notices role, term and commit changes: one leader per term, commit never back.
    fn observe(&mut self, ctx: &mut Ctx<'_>) -> Check {
        let me = self.id;
        for group in self.core().group_ids() {
            let r = self.core().raft(group).expect("listed");
            let now = Seen {
                role: r.role(),
                term: r.term().0,
                commit: r.commit_index().0,
            };
            if now.role == StateRole::Leader {
                let key = self.key(group);
                ctx.checker.observe_leader(key, me, now.term)?;
            }
            if let Some(before) = self.seen.get(&group) {
                if now.commit < before.commit {
                    return Err(violation(
                        Invariant::CommittedEntryStable,
                        format!(
                            "node {me} group {group}: commit index went back from {} to {}",
                            before.commit, now.commit
                        ),
                    ));
                }
                if (now.role, now.term) != (before.role, before.term) {
                    let (role, term) = (now.role, now.term);
                    ctx.trace.mix(&[me.0, group.0, role as u64, term]);
                    ctx.trace.note(ctx.now, || {
                        format!("n{me} g{group}: {role:?} in term {term}")
                    });
                }
            }
            self.seen.insert(group, now);
        }
        Ok(())
    }

    /// Invariant 2 on the node's log near its commit index.
    pub fn check_log_window(&self, checker: &Checker) -> Check {
        for group in self.core().group_ids() {
            let (lo, hi) = self.log_span(group)?;
            let lo = lo.max(hi.saturating_sub(LOG_CHECK_WINDOW));
            checker.check_log(
                self.key(group),
                self.id,
                self.store.as_ref(),
                lo,
                hi,
                "after an event",
            )?;
        }
        Ok(())
    }

    /// Invariant 2 on the node's whole log below its commit index.
    pub fn check_log_full(&self, group: GroupId, checker: &Checker, when: &str) -> Check {
        if self.raft(group).is_none() {
            return Ok(());
        }
        let (lo, hi) = self.log_span(group)?;
        checker.check_log(self.key(group), self.id, self.store.as_ref(), lo, hi, when)
    }

    /// The truncation point and the committed end of `group`'s log here.
    fn log_span(&self, group: GroupId) -> Result<(u64, u64), crate::checker::Violation> {
        let st = self
            .store
            .state(group)
            .map_err(|e| core_err("store state", e))?
            .expect("replica has a group");
        let last = self
            .store
            .last_index(group)
            .map_err(|e| core_err("store last index", e))?;
        let hi = self.raft(group).expect("open").commit_index().0.min(last);
        Ok((st.truncated_index, hi))
    }

    /// The volume data of `group` and the index it has applied, to copy from, if this
    /// replica may serve as a copy's source (it serves reads: applied all it committed,
    /// and it is not copying itself).
    pub fn copy_source(&self, group: GroupId) -> Option<(&VolumeData, u64)> {
        let core = self.core.as_ref()?;
        let r = core.raft(group)?;
        let applied = core.applied(group)?.0;
        if core.recovering(group).is_some() || applied < r.commit_index().0 {
            return None;
        }
        Some((self.volumes.get(&group)?, applied))
    }

    /// The recovery point of `group` on this node, if its replica must copy blocks.
    pub fn recovery_point(&self, group: GroupId) -> Option<u64> {
        self.core.as_ref()?.recovering(group).map(|p| p.0)
    }

    /// The site-durable policy of `group` as the driver set it, if it did.
    pub fn site_durable_policy(
        &self,
        group: GroupId,
    ) -> Option<(Vec<NodeId>, Option<std::time::Duration>)> {
        self.site_durable.get(&group).cloned()
    }

    /// The replicas outside the home site of a site-durable group (empty otherwise).
    pub fn site_durable_remote(&self, group: GroupId) -> Vec<NodeId> {
        self.site_durable
            .get(&group)
            .map(|(r, _)| r.clone())
            .unwrap_or_default()
    }

    pub fn volume(&self, group: GroupId) -> Option<&VolumeData> {
        self.volumes.get(&group)
    }

    pub fn volume_kind(&self, group: GroupId) -> Option<MachineKind> {
        self.seeds.get(&group).map(|s| s.kind)
    }

    pub fn applied(&self, group: GroupId) -> Option<u64> {
        self.core.as_ref()?.applied(group).map(|i| i.0)
    }
}
