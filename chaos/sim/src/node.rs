//! One simulated storage node and its driver: what the storage node's store thread
//! does, over the core's I/O-free `RaftGroup`s and a `MemLogStore`.
//!
//! The driver follows the Ready order documented in `roamdisk_core::group`:
//!
//! 1. send `messages`;
//! 2. install a snapshot into the state machine (and write its image in the batch);
//! 3. apply `committed` entries (`apply_committed`);
//! 4. write one batch for all groups; if any Ready `must_sync`, sync it (group commit).
//!    The sync takes simulated time: the node is busy and queues what arrives, and a
//!    power loss can land between the write and the sync;
//! 5. send `persisted_messages`;
//! 6. `advance`: send, apply, and write (without sync) what it returns;
//! 7. `advance_apply_to` the machine's applied index.
//!
//! Crash rule: the machine's image and its applied index are written in one batch by a
//! periodic checkpoint (and by a snapshot install), never in between; the log is only
//! compacted behind the recorded applied index. (Membership changes are recorded as
//! they apply, ahead of that index; the core's `conf_index` keeps a restart from
//! applying them twice and a snapshot from carrying a newer membership than its index.) After a crash the node syncs its store
//! (what a process crash left was written, not synced), reopens every group from it,
//! and the machine restarts from the recorded image.
//!
//! Election timeouts: raft-rs draws its randomized election timeout from `thread_rng`,
//! which would make runs irreproducible, and the core's `GroupConfig` cannot pin it
//! (it has no `min_election_tick`/`max_election_tick`). So the driver owns the election
//! timer of followers and candidates: it does not tick them, it counts ticks since they
//! last heard from their leader (or granted a vote, or changed role or term, which are
//! the points where raft-rs resets its own timer) and calls `campaign` after a timeout
//! drawn from the seed in `[election_tick, 2 * election_tick)`. Leaders are ticked
//! normally (heartbeats, check-quorum). Because an unticked follower's raft-rs lease
//! never expires, a follower only grants votes to others once it has campaigned itself
//! (its leader is then cleared): the lease is the driver's timeout, not raft-rs's.
//! Replicas that are not voters in their own view are ticked through raft-rs (it never
//! makes them campaign, so its randomness plays no part), and their lease expires
//! after `election_tick` ticks as raft-rs intends.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use raft::eraftpb::{ConfChangeV2, ConfState, Entry, EntryType, Message, MessageType, Snapshot};
use raft::StateRole;
use roamdisk_core::group::{Applied, GroupConfig, ProposeError, RaftGroup};
use roamdisk_core::ids::{GroupId, LogIndex, NodeId, SiteId};
use roamdisk_core::logstore::{GroupState, LogBatch, LogOp, LogStore, MemLogStore};

use crate::checker::{violation, Check, Checker, Invariant};
use crate::config::{DriverBug, Micros, SimConfig};
use crate::machine::{Machine, MachineKind, MetaMonotone};
use crate::rng::SimRng;
use crate::shadow::ShadowDisk;
use crate::trace::Trace;

/// Key prefix of the node-level record holding a group's machine image.
pub const IMAGE_PREFIX: &[u8] = b"sim/image/";

/// Committed log entries below a node's commit index compared with the committed record
/// after every event, on every running node (a full comparison runs after restarts,
/// periodically and at the end).
pub const LOG_CHECK_WINDOW: u64 = 16;

/// Inputs a busy (syncing) node queues; more are dropped like a full event queue.
pub const INBOX_MAX: usize = 16_384;

pub fn image_key(group: GroupId) -> Vec<u8> {
    let mut k = IMAGE_PREFIX.to_vec();
    k.extend_from_slice(&group.0.to_be_bytes());
    k
}

/// A client's request as it reaches a node.
#[derive(Clone, Debug)]
pub struct ClientRequest {
    pub client: usize,
    pub request: u64,
    pub attempt: u32,
    pub group: GroupId,
    pub payload: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Committed at `index` in `term` and applied on the node that answers.
    Acked {
        index: u64,
        term: u64,
    },
    NotLeader {
        leader: Option<NodeId>,
    },
    /// Dropped, superseded by another leader's entry, or covered by a snapshot.
    Retry(&'static str),
}

pub enum Input {
    Raft {
        group: GroupId,
        msg: Message,
    },
    Propose(ClientRequest),
    Tick,
    /// Record machine images and compact; `aggressive` keeps no entries behind.
    Checkpoint {
        aggressive: bool,
    },
    SnapshotStatus {
        group: GroupId,
        to: NodeId,
        ok: bool,
    },
    Unreachable {
        group: GroupId,
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
        msg: Message,
    },
    Reply {
        node: NodeId,
        client: usize,
        request: u64,
        attempt: u32,
        reply: Reply,
    },
    /// The node's sync completes after this long (unless it crashes first).
    SyncAfter {
        node: NodeId,
        incarnation: u64,
        after: Micros,
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

struct Waiting {
    term: u64,
    client: usize,
    request: u64,
    attempt: u32,
}

/// The driver-owned election timer (see the module doc).
struct ElectionTimer {
    elapsed: u32,
    timeout: u32,
}

impl ElectionTimer {
    fn draw(rng: &mut SimRng, election_tick: u32) -> ElectionTimer {
        ElectionTimer {
            elapsed: 0,
            timeout: election_tick + rng.below(u64::from(election_tick)) as u32,
        }
    }
}

/// What the driver last saw of a replica, to notice changes.
#[derive(Clone, PartialEq)]
struct Seen {
    role: StateRole,
    term: u64,
    commit: u64,
}

pub struct Replica {
    pub raft: RaftGroup<MemLogStore>,
    pub machine: Machine,
    timer: ElectionTimer,
    waiting: BTreeMap<u64, Waiting>,
    seen: Seen,
    /// Last metadata monotone fields this replica had (this incarnation).
    monotone: Option<MetaMonotone>,
}

impl Replica {
    pub fn is_voter(&self, me: NodeId) -> bool {
        let cs = self.raft.conf_state();
        cs.voters.contains(&me.0) || cs.voters_outgoing.contains(&me.0)
    }
}

/// A replica's state before a call into raft-rs.
struct Before {
    role: StateRole,
    commit: u64,
    conf: ConfState,
}

fn before(r: &Replica) -> Before {
    Before {
        role: r.raft.role(),
        commit: r.raft.commit_index().0,
        conf: r.raft.conf_state(),
    }
}

/// Which configuration committed entries when a call advanced the commit index: the
/// one before the call, except for `apply_committed`, whose membership changes take
/// effect before raft-rs re-evaluates the commit index.
#[derive(Clone, Copy, PartialEq)]
enum CommitConf {
    Before,
    After,
}

/// How a replica is created.
#[derive(Clone, Debug)]
pub struct ReplicaSeed {
    pub kind: MachineKind,
    /// Bootstrap membership, or `None` for a new replica that awaits a snapshot.
    pub conf: Option<ConfState>,
}

struct Cycle {
    persisted: Vec<(GroupId, Vec<Message>)>,
}

pub struct Node {
    pub id: NodeId,
    pub site: SiteId,
    pub store: Arc<MemLogStore>,
    /// Independent model of this node's disk (see `shadow`).
    pub disk: ShadowDisk,
    pub up: bool,
    /// Bumped by every crash, so that a sync scheduled before it is ignored.
    pub incarnation: u64,
    pub replicas: BTreeMap<GroupId, Replica>,
    /// How each replica on this node was created (to rebuild a wiped disk).
    seeds: BTreeMap<GroupId, ReplicaSeed>,
    inbox: VecDeque<Input>,
    syncing: Option<Cycle>,
    /// Metadata monotone fields of the images written / synced, per group.
    monotone_written: BTreeMap<GroupId, MetaMonotone>,
    monotone_synced: BTreeMap<GroupId, MetaMonotone>,
    /// The disk was replaced by an empty one (a deliberately broken driver).
    wiped: bool,
    retained_entries: u64,
    gcfg: GroupConfig,
    logger: slog::Logger,
    bootstrap_index: u64,
}

fn core_err(what: &str, e: impl std::fmt::Display) -> crate::checker::Violation {
    violation(Invariant::CoreError, format!("{what}: {e}"))
}

impl Node {
    pub fn new(id: NodeId, site: SiteId, cfg: &SimConfig, retained_entries: u64) -> Node {
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
            store: Arc::new(MemLogStore::new()),
            disk: ShadowDisk::default(),
            up: true,
            incarnation: 0,
            replicas: BTreeMap::new(),
            seeds: BTreeMap::new(),
            inbox: VecDeque::new(),
            syncing: None,
            monotone_written: BTreeMap::new(),
            monotone_synced: BTreeMap::new(),
            wiped: false,
            retained_entries,
            gcfg,
            logger: slog::Logger::root(slog::Discard, slog::o!()),
            bootstrap_index: cfg.bootstrap_index,
        }
    }

    pub fn is_busy(&self) -> bool {
        self.syncing.is_some()
    }

    pub fn hosts(&self, group: GroupId) -> bool {
        self.seeds.contains_key(&group)
    }

    fn write(&mut self, batch: LogBatch) -> Check {
        for op in &batch.ops {
            if let LogOp::Put { key, value } = op {
                if let Some(group) = key.strip_prefix(IMAGE_PREFIX) {
                    let group = GroupId(u64::from_be_bytes(group.try_into().expect("8 bytes")));
                    if let Some(m) = Machine::decode(value).ok().and_then(|m| m.monotone()) {
                        self.monotone_written.insert(group, m);
                    }
                }
            }
        }
        self.disk.write(&batch);
        self.store
            .write(batch)
            .map_err(|e| core_err("store write", e))
    }

    fn sync(&mut self) -> Check {
        self.store.sync().map_err(|e| core_err("store sync", e))?;
        self.disk.sync();
        self.monotone_synced.clone_from(&self.monotone_written);
        Ok(())
    }

    /// Creates a replica on this node's disk and opens it.
    pub fn create_replica(
        &mut self,
        group: GroupId,
        seed: ReplicaSeed,
        ctx: &mut Ctx<'_>,
    ) -> Check {
        let mut state = GroupState::default();
        let mut applied = 0;
        if let Some(cs) = &seed.conf {
            let base = self.bootstrap_index;
            state.conf_state = cs.clone();
            state.truncated_index = base;
            state.truncated_term = base;
            state.hard_state.term = base;
            state.hard_state.commit = base;
            state.applied_index = base;
            applied = base;
        }
        let machine = Machine::new(seed.kind, applied);
        let mut b = LogBatch::default();
        b.push(LogOp::Create { group, state });
        b.push(LogOp::Put {
            key: image_key(group),
            value: machine.encode(),
        });
        self.write(b)?;
        self.sync()?;
        self.seeds.insert(group, seed);
        self.open_replica(group, ctx, "create")
    }

    fn open_replica(&mut self, group: GroupId, ctx: &mut Ctx<'_>, how: &str) -> Check {
        let st = self
            .store
            .state(group)
            .map_err(|e| core_err("store state", e))?
            .ok_or_else(|| core_err("open", format!("group {group} missing")))?;
        let image = self
            .store
            .get(&image_key(group))
            .map_err(|e| core_err("store get", e))?
            .ok_or_else(|| {
                violation(
                    Invariant::CrashRule,
                    format!("node {}: group {group} has no machine image", self.id),
                )
            })?;
        let machine = Machine::decode(&image).map_err(|e| violation(Invariant::CrashRule, e.0))?;
        if machine.applied != st.applied_index {
            return Err(violation(
                Invariant::CrashRule,
                format!(
                    "node {}: group {group}: recorded applied index {} but the recorded image is \
                     at {}",
                    self.id, st.applied_index, machine.applied
                ),
            ));
        }
        ctx.checker
            .observe_state(group, self.id, machine.applied, machine.hash(), how)?;
        let store = Arc::clone(&self.store);
        let snapshot_data: roamdisk_core::group::SnapshotData =
            Arc::new(move |g| Ok(store.get(&image_key(g))?.unwrap_or_default()));
        let raft = RaftGroup::open(
            group,
            self.id,
            Arc::clone(&self.store),
            &self.gcfg,
            snapshot_data,
            &self.logger,
        )
        .map_err(|e| core_err("RaftGroup::open", e))?;
        let seen = Seen {
            role: raft.role(),
            term: raft.term().0,
            commit: raft.commit_index().0,
        };
        let monotone = machine.monotone();
        if let (Some(now), Some(floor)) = (&monotone, self.monotone_synced.get(&group)) {
            if let Some(why) = now.went_back_from(floor) {
                return Err(violation(
                    Invariant::GenerationMonotone,
                    format!(
                        "node {} reopened group {group} ({how}) with metadata behind what it had \
                         synced: {why}",
                        self.id
                    ),
                ));
            }
        }
        let replica = Replica {
            raft,
            machine,
            timer: ElectionTimer::draw(ctx.rng, ctx.cfg.election_tick),
            waiting: BTreeMap::new(),
            seen,
            monotone,
        };
        self.replicas.insert(group, replica);
        self.check_reopened_against_model(group)?;
        self.check_log_full(group, ctx.checker, how)
    }

    /// A reopened group must hold what the disk model says survived the crash: the same
    /// log span with the same last term, and at least the commit index it had.
    fn check_reopened_against_model(&self, group: GroupId) -> Check {
        let Some(model) = self.disk.written(group) else {
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
        let commit = self.replicas[&group].raft.commit_index().0;
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

    /// Crash: the process dies; with `power_loss`, what was written but not synced is
    /// gone too.
    pub fn crash(&mut self, power_loss: bool, bug: Option<DriverBug>) {
        self.up = false;
        self.incarnation += 1;
        self.replicas.clear();
        self.inbox.clear();
        self.syncing = None;
        if power_loss {
            self.store.crash();
            self.disk.power_loss();
            self.monotone_written.clone_from(&self.monotone_synced);
            if bug == Some(DriverBug::LoseSyncedDataOnPowerLoss) {
                // The disk model keeps what the contract promises survives.
                self.store = Arc::new(MemLogStore::new());
                self.wiped = true;
            }
        }
    }

    pub fn restart(&mut self, ctx: &mut Ctx<'_>) -> Check {
        self.up = true;
        if ctx.cfg.sync_on_restart {
            // What survived a process crash was written, not synced: make it durable
            // before raft-rs, which takes the store as persisted, acknowledges it.
            self.sync()?;
        }
        if self.wiped {
            self.wiped = false;
            let seeds = std::mem::take(&mut self.seeds);
            for (group, seed) in seeds {
                self.create_replica(group, seed, ctx)?;
            }
        } else {
            let groups = self
                .store
                .groups()
                .map_err(|e| core_err("store groups", e))?;
            for group in groups {
                self.open_replica(group, ctx, "restart")?;
            }
        }
        self.pump(ctx)
    }

    /// Hands an input to the node: processed now, or queued while it syncs.
    pub fn handle(&mut self, input: Input, ctx: &mut Ctx<'_>) -> Check {
        if !self.up {
            return Ok(());
        }
        if self.syncing.is_some() {
            if self.inbox.len() < INBOX_MAX {
                self.inbox.push_back(input);
            }
            return Ok(());
        }
        self.apply_input(input, ctx)?;
        self.pump(ctx)
    }

    /// The sync started by the last cycle has completed.
    pub fn sync_done(&mut self, incarnation: u64, ctx: &mut Ctx<'_>) -> Check {
        if !self.up || incarnation != self.incarnation {
            return Ok(());
        }
        let Some(cycle) = self.syncing.take() else {
            return Ok(());
        };
        self.sync()?;
        self.finish_cycle(cycle, ctx)?;
        while let Some(input) = self.inbox.pop_front() {
            self.apply_input(input, ctx)?;
        }
        self.pump(ctx)
    }

    fn reply(&self, ctx: &mut Ctx<'_>, w: (usize, u64, u32), reply: Reply) {
        ctx.effects.push(Effect::Reply {
            node: self.id,
            client: w.0,
            request: w.1,
            attempt: w.2,
            reply,
        });
    }

    fn apply_input(&mut self, input: Input, ctx: &mut Ctx<'_>) -> Check {
        let me = self.id;
        match input {
            Input::Raft { group, msg } => {
                let Some(r) = self.replicas.get_mut(&group) else {
                    return Ok(());
                };
                let b = before(r);
                let (from, term, ty) = (msg.from, msg.term, msg.get_msg_type());
                if ty == MessageType::MsgHeartbeat && msg.commit > r.raft.last_index().0 {
                    // A heartbeat commits no further than what this replica acknowledged
                    // (raft-rs would panic here): it lost entries it had acknowledged.
                    return Err(violation(
                        Invariant::CommittedEntryStable,
                        format!(
                            "node {me} group {group}: leader {from} commits to {} on it, but its log \
                             ends at {}: it lost entries it acknowledged",
                            msg.commit,
                            r.raft.last_index()
                        ),
                    ));
                }
                let _ = r.raft.step(msg);
                if matches!(
                    ty,
                    MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot
                ) && r.raft.role() == StateRole::Follower
                    && r.raft.leader() == Some(NodeId(from))
                    && r.raft.term().0 == term
                {
                    r.timer.elapsed = 0;
                }
                self.observe(group, b, CommitConf::Before, ctx)?;
            }
            Input::Propose(req) => {
                let w = (req.client, req.request, req.attempt);
                let Some(r) = self.replicas.get_mut(&req.group) else {
                    self.reply(ctx, w, Reply::NotLeader { leader: None });
                    return Ok(());
                };
                let b = before(r);
                let reply = match r.raft.propose(req.payload) {
                    Ok((index, term)) => {
                        let old = r.waiting.insert(
                            index.0,
                            Waiting {
                                term: term.0,
                                client: req.client,
                                request: req.request,
                                attempt: req.attempt,
                            },
                        );
                        old.map(|o| ((o.client, o.request, o.attempt), Reply::Retry("replaced")))
                    }
                    Err(ProposeError::NotLeader { leader }) => {
                        Some((w, Reply::NotLeader { leader }))
                    }
                    Err(ProposeError::Dropped) => Some((w, Reply::Retry("dropped"))),
                    Err(ProposeError::Raft(_)) => Some((w, Reply::Retry("raft error"))),
                };
                if let Some((w, reply)) = reply {
                    self.reply(ctx, w, reply);
                }
                self.observe(req.group, b, CommitConf::Before, ctx)?;
            }
            Input::Tick => {
                let groups: Vec<GroupId> = self.replicas.keys().copied().collect();
                for group in groups {
                    let r = self.replicas.get_mut(&group).expect("listed");
                    let b = before(r);
                    if r.raft.is_leader() || !r.is_voter(me) {
                        // Leaders heartbeat and check their quorum; a replica that is not
                        // a voter (in its own view) never campaigns, so raft-rs's random
                        // timeout plays no part, and its lease must expire as usual or
                        // it would ignore votes forever.
                        r.raft.tick();
                    } else {
                        r.timer.elapsed += 1;
                        if r.timer.elapsed >= r.timer.timeout && r.is_voter(me) {
                            r.timer.elapsed = 0;
                            let _ = r.raft.campaign();
                            ctx.trace.note(ctx.now, || {
                                format!("n{me} g{group}: election timeout, campaigns")
                            });
                        }
                    }
                    self.observe(group, b, CommitConf::Before, ctx)?;
                }
            }
            Input::Checkpoint { aggressive } => self.checkpoint(aggressive)?,
            Input::SnapshotStatus { group, to, ok } => {
                if let Some(r) = self.replicas.get_mut(&group) {
                    r.raft.report_snapshot(to, ok);
                }
            }
            Input::Unreachable { group, to } => {
                if let Some(r) = self.replicas.get_mut(&group) {
                    r.raft.report_unreachable(to);
                }
            }
            Input::TransferLeader { group, to } => {
                if let Some(r) = self.replicas.get_mut(&group) {
                    let b = before(r);
                    r.raft.transfer_leader(to);
                    self.observe(group, b, CommitConf::Before, ctx)?;
                }
            }
            Input::ConfChange { group, cc } => {
                if let Some(r) = self.replicas.get_mut(&group) {
                    let b = before(r);
                    let result = r.raft.propose_conf_change(cc.clone());
                    ctx.trace.note(ctx.now, || {
                        format!("n{me} g{group}: propose {cc:?} -> {result:?}")
                    });
                    self.observe(group, b, CommitConf::Before, ctx)?;
                }
            }
        }
        Ok(())
    }

    /// Notices role, term and commit changes after a call into raft-rs.
    fn observe(
        &mut self,
        group: GroupId,
        b: Before,
        which: CommitConf,
        ctx: &mut Ctx<'_>,
    ) -> Check {
        let me = self.id;
        let r = self.replicas.get_mut(&group).expect("replica");
        let now = Seen {
            role: r.raft.role(),
            term: r.raft.term().0,
            commit: r.raft.commit_index().0,
        };
        if now.role == StateRole::Leader {
            ctx.checker.observe_leader(group, me, now.term)?;
        }
        if now.commit < r.seen.commit {
            return Err(violation(
                Invariant::CommittedEntryStable,
                format!(
                    "node {me} group {group}: commit index went back from {} to {}",
                    r.seen.commit, now.commit
                ),
            ));
        }
        if now.commit > b.commit && (b.role == StateRole::Leader || now.role == StateRole::Leader) {
            let conf = match which {
                CommitConf::Before => b.conf,
                CommitConf::After => r.raft.conf_state(),
            };
            ctx.checker
                .observe_leader_commit(group, b.commit, now.commit, &conf);
        }
        if (now.role, now.term) != (r.seen.role, r.seen.term) {
            // Where raft-rs resets its own election timer.
            r.timer = ElectionTimer::draw(ctx.rng, ctx.cfg.election_tick);
            let (role, term) = (now.role, now.term);
            ctx.trace.mix(&[me.0, group.0, role as u64, term]);
            ctx.trace.note(ctx.now, || {
                format!("n{me} g{group}: {role:?} in term {term}")
            });
        }
        r.seen = now;
        Ok(())
    }

    fn send(r: &mut Replica, me: NodeId, group: GroupId, msgs: Vec<Message>, ctx: &mut Ctx<'_>) {
        for msg in msgs {
            if msg.get_msg_type() == MessageType::MsgRequestVoteResponse && !msg.reject {
                // raft-rs resets its election timer when it grants a vote.
                r.timer.elapsed = 0;
            }
            ctx.effects.push(Effect::Send {
                from: me,
                to: NodeId(msg.to),
                group,
                msg,
            });
        }
    }

    /// Runs Ready cycles until there is no more work or the node waits for a sync.
    pub fn pump(&mut self, ctx: &mut Ctx<'_>) -> Check {
        let me = self.id;
        while self.up && self.syncing.is_none() {
            let mut batch = LogBatch::default();
            let mut must_sync = false;
            let mut persisted = Vec::new();
            let groups: Vec<GroupId> = self.replicas.keys().copied().collect();
            for group in groups {
                let r = self.replicas.get_mut(&group).expect("listed");
                let b = before(r);
                let Some(mut work) = r.raft.ready() else {
                    continue;
                };
                // 1. Messages that need not wait for persistence.
                Self::send(r, me, group, std::mem::take(&mut work.messages), ctx);
                // 2. Snapshot.
                if let Some(snap) = work.snapshot.take() {
                    self.install_snapshot(group, &snap, &mut batch, ctx)?;
                }
                // 3. Committed entries.
                self.apply_entries(group, std::mem::take(&mut work.committed), &mut batch, ctx)?;
                if ctx.cfg.driver_bug == Some(DriverBug::ApplyBeforeCommit) {
                    self.apply_unstable(group, &work.persist, ctx)?;
                }
                // 4. Persistence, collected for all groups.
                batch.ops.append(&mut work.persist.ops);
                must_sync |= work.must_sync;
                persisted.push((group, std::mem::take(&mut work.persisted_messages)));
                self.observe(group, b, CommitConf::Before, ctx)?;
            }
            if persisted.is_empty() {
                return Ok(());
            }
            if !batch.is_empty() {
                self.write(batch)?;
            }
            let mut cycle = Cycle { persisted };
            if must_sync && ctx.cfg.driver_bug == Some(DriverBug::AckBeforeSync) {
                for (group, msgs) in &mut cycle.persisted {
                    let r = self.replicas.get_mut(group).expect("replica");
                    Self::send(r, me, *group, std::mem::take(msgs), ctx);
                }
            }
            if must_sync {
                let after = ctx.rng.range(ctx.cfg.sync_us.0, ctx.cfg.sync_us.1);
                self.syncing = Some(cycle);
                ctx.effects.push(Effect::SyncAfter {
                    node: me,
                    incarnation: self.incarnation,
                    after,
                });
                return Ok(());
            }
            self.finish_cycle(cycle, ctx)?;
        }
        Ok(())
    }

    /// Steps 5 to 7 of the Ready order, once what the cycle wrote is synced.
    fn finish_cycle(&mut self, cycle: Cycle, ctx: &mut Ctx<'_>) -> Check {
        let me = self.id;
        let mut batch = LogBatch::default();
        for (group, persisted) in cycle.persisted {
            let r = self.replicas.get_mut(&group).expect("replica");
            let b = before(r);
            // 5. Messages promising persisted state.
            Self::send(r, me, group, persisted, ctx);
            // 6. Advance.
            let mut adv = r.raft.advance();
            Self::send(r, me, group, std::mem::take(&mut adv.messages), ctx);
            self.observe(group, b, CommitConf::Before, ctx)?;
            self.apply_entries(group, std::mem::take(&mut adv.committed), &mut batch, ctx)?;
            batch.ops.append(&mut adv.persist.ops);
            // 7. Applied index back to raft-rs.
            let r = self.replicas.get_mut(&group).expect("replica");
            // (Capped at the commit index: only the `ApplyBeforeCommit` bug applies
            // beyond it, and raft-rs would reject that before the checker could.)
            let applied = r.machine.applied.min(r.raft.commit_index().0);
            if applied > r.raft.applied_index().0 {
                let b = before(r);
                r.raft.advance_apply_to(LogIndex(applied));
                self.observe(group, b, CommitConf::Before, ctx)?;
            }
        }
        if !batch.is_empty() {
            self.write(batch)?;
        }
        Ok(())
    }

    fn install_snapshot(
        &mut self,
        group: GroupId,
        snap: &Snapshot,
        batch: &mut LogBatch,
        ctx: &mut Ctx<'_>,
    ) -> Check {
        let me = self.id;
        let index = snap.get_metadata().index;
        let machine = Machine::decode(&snap.data).map_err(|e| {
            violation(
                Invariant::CrashRule,
                format!("node {me} group {group}: snapshot at {index}: {}", e.0),
            )
        })?;
        if machine.applied != index {
            return Err(violation(
                Invariant::CrashRule,
                format!(
                    "node {me} group {group}: snapshot at index {index} carries a state image at \
                     index {}",
                    machine.applied
                ),
            ));
        }
        ctx.checker
            .observe_state(group, me, index, machine.hash(), "snapshot")?;
        let r = self.replicas.get_mut(&group).expect("replica");
        let monotone = machine.monotone();
        if let (Some(now), Some(prev)) = (&monotone, &r.monotone) {
            if let Some(why) = now.went_back_from(prev) {
                return Err(violation(
                    Invariant::GenerationMonotone,
                    format!("node {me} group {group}: snapshot at {index}: {why}"),
                ));
            }
        }
        r.monotone = monotone;
        r.machine = machine;
        let covered: Vec<u64> = r.waiting.range(..=index).map(|(i, _)| *i).collect();
        let mut replies = Vec::new();
        for i in covered {
            let w = r.waiting.remove(&i).expect("listed");
            replies.push((w.client, w.request, w.attempt));
        }
        batch.push(LogOp::Put {
            key: image_key(group),
            value: snap.data.to_vec(),
        });
        ctx.trace.note(ctx.now, || {
            format!("n{me} g{group}: installs snapshot at {index}")
        });
        for w in replies {
            self.reply(ctx, w, Reply::Retry("snapshot"));
        }
        Ok(())
    }

    /// Step 3: hands committed entries to `apply_committed`, then to the machine.
    fn apply_entries(
        &mut self,
        group: GroupId,
        entries: Vec<Entry>,
        batch: &mut LogBatch,
        ctx: &mut Ctx<'_>,
    ) -> Check {
        if entries.is_empty() {
            return Ok(());
        }
        let me = self.id;
        let mut terms = BTreeMap::new();
        for e in &entries {
            ctx.checker.observe_committed(group, me, e)?;
            terms.insert(e.index, e.term);
        }
        let r = self.replicas.get_mut(&group).expect("replica");
        let b = before(r);
        let applied = r
            .raft
            .apply_committed(entries, batch)
            .map_err(|e| core_err("apply_committed", e))?;
        self.observe(group, b, CommitConf::After, ctx)?;
        let r = self.replicas.get_mut(&group).expect("replica");
        let mut replies = Vec::new();
        for a in applied {
            let index = match a {
                Applied::Command { index, data, .. } => {
                    if index.0 > r.machine.applied {
                        r.machine
                            .apply(index.0, &data)
                            .map_err(|e| core_err("apply", e.0))?;
                    }
                    index.0
                }
                Applied::Internal { index } => {
                    r.machine.skip(index.0);
                    index.0
                }
            };
            ctx.checker
                .observe_state(group, me, index, r.machine.hash(), "apply")?;
            if let Some(now) = r.machine.monotone() {
                if let Some(why) = r
                    .monotone
                    .as_ref()
                    .and_then(|prev| now.went_back_from(prev))
                {
                    return Err(violation(
                        Invariant::GenerationMonotone,
                        format!("node {me} group {group} at applied index {index}: {why}"),
                    ));
                }
                r.monotone = Some(now);
            }
            if let Some(w) = r.waiting.remove(&index) {
                let term = terms.get(&index).copied().unwrap_or(0);
                let reply = if term == w.term {
                    Reply::Acked { index, term }
                } else {
                    Reply::Retry("superseded")
                };
                replies.push(((w.client, w.request, w.attempt), reply));
            }
        }
        for (w, reply) in replies {
            self.reply(ctx, w, reply);
        }
        Ok(())
    }

    /// The `ApplyBeforeCommit` bug: applies appended entries right away.
    fn apply_unstable(&mut self, group: GroupId, persist: &LogBatch, ctx: &mut Ctx<'_>) -> Check {
        let me = self.id;
        for op in &persist.ops {
            let LogOp::Append { entries, .. } = op else {
                continue;
            };
            for e in entries {
                let r = self.replicas.get_mut(&group).expect("replica");
                if e.index != r.machine.applied + 1 {
                    continue;
                }
                ctx.checker.observe_committed(group, me, e)?;
                if e.get_entry_type() == EntryType::EntryNormal && !e.data.is_empty() {
                    r.machine
                        .apply(e.index, &e.data)
                        .map_err(|err| core_err("apply", err.0))?;
                } else {
                    r.machine.skip(e.index);
                }
                ctx.checker
                    .observe_state(group, me, e.index, r.machine.hash(), "early apply")?;
            }
        }
        Ok(())
    }

    /// Records machine images with their applied index (the crash rule) and compacts
    /// logs behind them, like the storage node's checkpoint.
    fn checkpoint(&mut self, aggressive: bool) -> Check {
        let mut batch = LogBatch::default();
        let mut written = Vec::new();
        for (group, r) in &self.replicas {
            let st = self
                .store
                .state(*group)
                .map_err(|e| core_err("store state", e))?
                .expect("replica has a group");
            if r.machine.applied > st.applied_index {
                batch.push(LogOp::Put {
                    key: image_key(*group),
                    value: r.machine.encode(),
                });
                batch.push(LogOp::Applied {
                    group: *group,
                    index: r.machine.applied,
                });
            }
            written.push(*group);
        }
        if !batch.is_empty() {
            self.write(batch)?;
        }
        let mut compact = LogBatch::default();
        for group in written {
            let r = &self.replicas[&group];
            let st = self
                .store
                .state(group)
                .map_err(|e| core_err("store state", e))?
                .expect("replica has a group");
            let recorded = st.applied_index;
            let retained = if aggressive { 0 } else { self.retained_entries };
            let mut floor = recorded.saturating_sub(retained);
            if r.raft.is_leader() && !aggressive {
                // As the storage node does: followers within reach of the log keep it.
                if let Some(min_match) = r
                    .raft
                    .progress()
                    .iter()
                    .filter(|p| p.node != self.id)
                    .map(|p| p.matched)
                    .min()
                {
                    floor = floor.max(min_match.min(recorded));
                }
            }
            if floor > st.truncated_index {
                compact.push(LogOp::Compact {
                    group,
                    index: floor,
                });
            }
        }
        if !compact.is_empty() {
            self.write(compact)?;
        }
        Ok(())
    }

    /// Invariant 2 on the node's log near its commit index.
    pub fn check_log_window(&self, checker: &Checker) -> Check {
        for (group, r) in &self.replicas {
            let st = self
                .store
                .state(*group)
                .map_err(|e| core_err("store state", e))?
                .expect("replica has a group");
            let last = self
                .store
                .last_index(*group)
                .map_err(|e| core_err("store last index", e))?;
            let hi = r.raft.commit_index().0.min(last);
            let lo = st.truncated_index.max(hi.saturating_sub(LOG_CHECK_WINDOW));
            checker.check_log(*group, self.id, &self.store, lo, hi, "after an event")?;
        }
        Ok(())
    }

    /// Invariant 2 on the node's whole log below its commit index.
    pub fn check_log_full(&self, group: GroupId, checker: &Checker, when: &str) -> Check {
        let Some(r) = self.replicas.get(&group) else {
            return Ok(());
        };
        let st = self
            .store
            .state(group)
            .map_err(|e| core_err("store state", e))?
            .expect("replica has a group");
        let last = self
            .store
            .last_index(group)
            .map_err(|e| core_err("store last index", e))?;
        let hi = r.raft.commit_index().0.min(last);
        checker.check_log(group, self.id, &self.store, st.truncated_index, hi, when)
    }
}
