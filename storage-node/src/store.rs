//! The Raft store: one thread that owns every Raft group on this node (the metadata
//! group and one group per volume replica) and their state machines.
//!
//! One owner, a closed event enum, no locks around the core: other tasks talk to the
//! store only through [`Event`]s, and it answers through oneshot channels. Each loop:
//!
//! 1. wait for an event or the next tick, then drain up to `EVENTS_PER_ROUND` events;
//! 2. tick every group if a tick is due;
//! 3. for every group with a Ready, in raft-rs's order (see `roamdisk_core::group`):
//!    send messages, install snapshots, apply committed entries, then write *one* batch
//!    for all groups; tell the leaders what was written; advance raft-rs as written
//!    (the `log-sync` thread syncs the log, one fsync for everything written before it
//!    started: group commit; the persisted messages go out when it ends);
//! 4. answer proposals, flushes and reads that became complete;
//! 5. checkpoint volume replicas (the `extent-sync` thread hashes touched blocks and
//!    fsyncs extents, then this thread records the hashes and applied indexes) and
//!    compact logs behind the durable applied index; then confirm the
//!    suspects of the background scrub (`scrub`) and hand it its next slices.
//!
//! Acknowledgement semantics ([`Ack`]): a proposal is answered after its entry is
//! committed (on a quorum, each of which synced its log) and applied on this node —
//! durable. A volume write proposed with [`Ack::Written`] (an NBD write without FUA) is
//! answered as soon as a quorum of voters has *written* its entry to the OS
//! (`roamdisk_core::written`), before the fsyncs: it survives any number of process
//! crashes (not every power loss: see ARCHITECTURE.md), and a FLUSH ([`Event::Flush`]) waits until
//! everything answered before it is committed. Reads wait for every write answered
//! before them (the read index is raised to the highest early answer), so a read never
//! misses an acknowledged write.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use raft::eraftpb::{ConfState, Message};
use raft::StateRole;
use roamdisk_core::group::{Applied, GroupConfig, ProposeError, RaftGroup};
use roamdisk_core::ids::{GroupId, LogIndex, NodeId, Term, VolumeId, META_GROUP};
use roamdisk_core::logstore::{GroupState, LogBatch, LogOp, LogStore};
use roamdisk_core::meta::{ClusterState, Durability, MetaCommand, MetaResult, VolumeInfo};
use roamdisk_core::written::WrittenTracker;
use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::dedup::{ContentIndex, CONTENT_INDEX_MAX};
use crate::lag::{Lag, LagTracker};
use crate::scrub::Scrubber;
use crate::stats::StoreStats;
use crate::syncer::Syncer;
use crate::volume::{parse_hash_key, VolumeReplica};

/// Interval between Raft ticks. Election timeout is `election_tick` ticks (1 s).
pub const TICK_MS: u64 = 100;
/// Events handled per loop before Readies are processed; bounds the latency added to
/// events that arrived first.
pub const EVENTS_PER_ROUND: usize = 4096;
/// Capacity of the store's event queue; senders wait (async) when it is full.
pub const EVENT_QUEUE_MAX: usize = 16384;
/// Milliseconds between volume checkpoints (fsync extents, record applied index).
pub const CHECKPOINT_INTERVAL_MS: u64 = 1000;
/// Blocks the background scan reads per round on the whole node, shared by its replicas in
/// turn (16 MiB, on the `scrub` thread: one 64 MiB volume is verified every 4 s, 1 GiB
/// every ~1 min, and more volumes take proportionally longer). Also the bound on the
/// suspects waiting per group.
pub const SCRUB_BLOCKS_PER_ROUND: u64 = 4096;
/// Suspect blocks the store thread re-reads per round to confirm corruption (see
/// `scrub`): 1 MiB, about a millisecond.
pub const SCRUB_CONFIRM_PER_ROUND: usize = 256;
/// Entries kept in a group's log behind the durable applied index, so that a briefly
/// lagging follower catches up from the log instead of a snapshot...
pub const RETAINED_LOG_ENTRIES: u64 = 1024;
/// ...unless they hold more than this many bytes of commands. Keeping the retained log
/// small lets RocksDB drop compacted entries while they are still in its memtable,
/// instead of writing them to SST files (measured: 1 MiB writes went from 50 MiB/s).
pub const RETAINED_LOG_BYTES: u64 = 32 << 20;
/// Command bytes applied since the last checkpoint that force the next one.
pub const CHECKPOINT_BYTES: u64 = 32 << 20;
/// Proposals waiting for their entry to apply, per group; more are refused (`Busy`).
pub const PENDING_PROPOSALS_MAX: usize = 8192;
/// Reads waiting for a read index or for apply, per group.
pub const PENDING_READS_MAX: usize = 8192;
/// A read whose read index has not arrived by then (no leader, partition) is refused
/// with `Superseded` so that the caller retries or forwards.
pub const READ_INDEX_TIMEOUT_MS: u64 = 2000;
/// Bytes of writes a leader may have answered before their commit (`Ack::Written`);
/// beyond it, writes are answered at commit. Bounds what a power loss of a quorum could
/// take of acknowledged, unflushed writes, and the entries held for it.
pub const EARLY_ACK_BYTES_MAX: u64 = 16 << 20;
/// How long a written Ready waits for others to share its fsync while syncs run back to
/// back (no sync in flight, one ended within `SYNC_GATHER_BUSY`).
const SYNC_GATHER: Duration = Duration::from_micros(300);
/// Gathering applies only while syncs run back to back: one ended this recently.
const SYNC_GATHER_BUSY: Duration = Duration::from_millis(2);
/// Longest a written log waits for its sync when nothing but writes already answered
/// (`Ack::Written`) waits on it. A FLUSH, a FUA write, a read, a vote, a site-durable or
/// metadata write, or the leader's `SyncWanted` makes the sync urgent; so do
/// `LAZY_SYNC_HELD_MAX` held messages or `LAZY_SYNC_BYTES_MAX` bytes waiting.
pub const SYNC_LAZY_MAX: Duration = Duration::from_millis(10);
/// Messages held for a put-off sync (append and heartbeat responses) that make it
/// urgent: raft-rs keeps at most 64 appends in flight per follower, and stops sending to
/// one whose responses do not come back.
const LAZY_SYNC_HELD_MAX: usize = 32;
/// Written bytes of entries that make a put-off sync urgent. Putting off pays where
/// syncs cost latency (bursts of small writes, then FLUSH), not where they cost
/// bandwidth: large writes sync as they come (measured: 1 MiB writes lost 10 % at 8 MiB).
const LAZY_SYNC_BYTES_MAX: u64 = 1 << 20;
/// Longest a proposal is held while its leader transfers leadership.
const HELD_PROPOSAL_MAX: Duration = Duration::from_millis(1000);

/// Where outgoing Raft messages go. The transport implements it; it must not block.
pub trait Outbox: Send + Sync + 'static {
    fn send(&self, to: NodeId, group: GroupId, msg: Message);
    /// Tells the leader `to` how far this node wrote `group`'s log (best effort).
    fn written(&self, to: NodeId, group: GroupId, w: Written);
    /// Asks replica `to` (voter or learner) to sync `group`'s log up to `want.index` now
    /// (best effort; see `SYNC_LAZY_MAX`).
    fn sync_wanted(&self, to: NodeId, group: GroupId, want: SyncWanted);
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error("not the leader of group {group} (leader: {leader:?})")]
    NotLeader {
        group: GroupId,
        leader: Option<NodeId>,
    },
    #[error("group {0} is not on this node")]
    NoGroup(GroupId),
    #[error("proposal was superseded by a leader change; retry")]
    Superseded,
    #[error("too many requests in flight")]
    Busy,
    #[error("node is shutting down")]
    Shutdown,
    #[error("state machine failure: {0}")]
    Failed(String),
    #[error("replica of group {0} is catching up and cannot serve reads yet")]
    Recovering(GroupId),
}

/// What an applied proposal produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Volume,
    Meta(MetaResult),
}

pub type ProposeReply = oneshot::Sender<Result<Outcome, Refused>>;

/// When a proposal is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Ack {
    /// Committed (a quorum synced it) and applied here: durable.
    Committed,
    /// A volume write: once a quorum of voters has written its entry, synced or not
    /// (falls back to `Committed` for site-durable volumes and the metadata group).
    Written,
}

/// A follower's report that it wrote its log up to `index` (whose entry has `log_term`)
/// while in `term`; see `roamdisk_core::written`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Written {
    pub term: u64,
    pub index: u64,
    pub log_term: u64,
}
/// A leader's request that a replica sync its log of the group up to `index` at once
/// (something waits for the commit), sent in the leader's `term`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SyncWanted {
    pub term: u64,
    pub index: u64,
}
pub type ReadReply = oneshot::Sender<Result<(), Refused>>;

/// Status of one group, for `status` and metrics.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GroupStatus {
    pub group: u64,
    pub role: String,
    pub leader: Option<u64>,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub durable_applied: u64,
    pub last_index: u64,
    /// Every peer's match index and lag (leader only).
    pub progress: Vec<PeerStatus>,
    /// This replica is copying blocks after a snapshot and serves no reads.
    pub recovering: bool,
    /// Raft membership as this replica has applied it.
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// In joint consensus (leaving it is automatic).
    pub joint: bool,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PeerStatus {
    pub node: u64,
    pub matched: u64,
    pub learner: bool,
    pub lag: Lag,
}

pub enum Event {
    /// The block copy of a recovering replica finished; the leader had applied
    /// `copy_end` when the last block was read.
    CatchUpDone {
        group: GroupId,
        copy_end: LogIndex,
        /// Blocks the copy wrote (their hashes in the index must be recomputed); at most
        /// the volume's block count.
        blocks: Vec<u64>,
    },
    Raft {
        group: GroupId,
        msg: Message,
    },
    Propose {
        group: GroupId,
        data: Vec<u8>,
        ack: Ack,
        reply: ProposeReply,
    },
    /// Completes once every write of `group` answered before it is committed (this node
    /// must lead the group). Answers `Outcome::Volume`.
    Flush {
        group: GroupId,
        reply: ProposeReply,
    },
    /// A follower wrote its log (see [`Written`]).
    Written {
        group: GroupId,
        from: NodeId,
        w: Written,
    },
    /// The leader wants this replica's log synced (see [`SyncWanted`]).
    SyncWanted {
        group: GroupId,
        want: SyncWanted,
    },
    /// Completes once this node may serve a linearizable read of `group`.
    Read {
        group: GroupId,
        reply: ReadReply,
    },
    /// Propose a membership change in `group` (this node must lead it).
    ConfChange {
        group: GroupId,
        cc: raft::eraftpb::ConfChangeV2,
        reply: oneshot::Sender<Result<(), Refused>>,
    },
    TransferLeader {
        group: GroupId,
        to: NodeId,
    },
    Unreachable {
        node: NodeId,
    },
    Status {
        reply: oneshot::Sender<Vec<GroupStatus>>,
    },
    /// The applied index of one group on this node (cheaper than `Status`: asked once per
    /// catch-up chunk).
    Applied {
        group: GroupId,
        reply: oneshot::Sender<Option<u64>>,
    },
    Shutdown,
}

enum Machine {
    /// The metadata group; the state itself is `Store::cluster`. The index is the last
    /// applied entry.
    Meta(LogIndex),
    Volume(VolumeReplica),
}

impl Machine {
    fn applied(&self) -> LogIndex {
        match self {
            Machine::Meta(i) => *i,
            Machine::Volume(v) => v.applied(),
        }
    }
}

struct Group<S: LogStore> {
    raft: RaftGroup<S>,
    machine: Machine,
    /// Proposals by log index: (term proposed in, reply).
    proposals: BTreeMap<u64, (Term, ProposeReply)>,
    /// Proposals (index → command bytes) that may be answered once a quorum has
    /// written them.
    early: BTreeMap<u64, (u64, Instant)>,
    /// Answered early and not yet committed, oldest first: (index, bytes), and their
    /// sum, bounded by `EARLY_ACK_BYTES_MAX`.
    early_uncommitted: VecDeque<(u64, u64)>,
    early_uncommitted_bytes: u64,
    /// How far each voter wrote the log in this leader's term.
    written: WrittenTracker,
    /// Highest index of a proposal answered before it committed. Reads wait for it and
    /// flushes for its commit.
    early_acked: u64,
    /// Flushes waiting for the commit index to reach an index (and this leader's term),
    /// with when they arrived.
    flushes: Vec<(u64, Instant, ProposeReply)>,
    /// Reads waiting for their ReadState, by request context, with when they started.
    reads_waiting_index: HashMap<u64, (Instant, ReadReply)>,
    /// Reads waiting for apply to reach an index.
    reads_waiting_apply: Vec<(u64, ReadReply)>,
    /// Applied command entries still in the log: (index, bytes), oldest first.
    retained: std::collections::VecDeque<(u64, u64)>,
    retained_bytes: u64,
    /// Set while this replica installed a Raft snapshot at this index and has not yet
    /// copied the blocks: committed entries are not applied (they stay in the log) and
    /// reads are refused.
    recovering: Option<LogIndex>,
    /// Highest committed index delivered while recovering.
    deferred_to: u64,
    /// Reads are refused until applied reaches this index (the end of a catch-up copy).
    serve_after: u64,
    bytes_since_checkpoint: u64,
    /// Lag of every peer (meaningful while this node leads).
    lag: LagTracker,
    /// Replication policy of the volume, refreshed from the cluster metadata.
    policy: Policy,
    /// durability=site: applied writes whose acknowledgement waits until a replica at
    /// another site has their entry, oldest first. Bounded by `PENDING_PROPOSALS_MAX`
    /// (they come from `proposals`).
    site_waiting: VecDeque<(u64, ProposeReply)>,
    /// Answers to metadata proposals, sent once the new cluster state is published, so
    /// that a caller reading this node's view right after sees its own change.
    meta_replies: Vec<(ProposeReply, Outcome)>,
    /// Proposals that arrived while this leader hands leadership over (raft-rs refuses
    /// them then). Refusing at once sends the caller into a backoff that outlasts the
    /// transfer; held, they are answered the moment it ends: with the new leader's name
    /// (the caller goes straight there) or, if the transfer failed, proposed here.
    /// Bounded with `proposals` by `PENDING_PROPOSALS_MAX`.
    held: Vec<(Instant, Vec<u8>, Ack, ProposeReply)>,
    /// Highest entry index a finished sync covered.
    synced_to: u64,
    /// Follower: what the leader asked to be synced now. Leader: what it asked for.
    sync_wanted: SyncWanted,
    /// Leader: a follower asked for a read index since the last round (its read waits
    /// for the commit of every write answered early).
    read_asked: bool,
}

/// What the metadata says about how a group's writes are acknowledged.
#[derive(Clone, Debug, Default, PartialEq)]
struct Policy {
    /// Acknowledge a write only once a replica outside the home site has its entry.
    site_durable: bool,
    /// Replicas outside the volume's home site.
    remote: Vec<NodeId>,
}

impl Policy {
    fn of(cluster: &ClusterState, v: &VolumeInfo) -> Policy {
        let remote = v
            .voters
            .iter()
            .chain(&v.learners)
            .copied()
            .filter(|n| cluster.nodes.get(n).is_some_and(|i| i.site != v.home_site))
            .collect();
        Policy {
            site_durable: v.durability == Durability::Site,
            remote,
        }
    }
}

impl<S: LogStore> Group<S> {
    /// Ends the wait of proposals held during a leader transfer once it is over: a new
    /// leader known → refused with its name; still leading → proposed again. Proposals
    /// held longer than `HELD_PROPOSAL_MAX` are refused plainly (the caller retries).
    fn release_held(&mut self, group: GroupId) {
        if self.held.is_empty() {
            return;
        }
        let leading = self.raft.is_leader();
        let transferring = leading && self.raft.transferring_to().is_some();
        let leader = self.raft.leader().filter(|_| !leading);
        let now = Instant::now();
        let expired = self
            .held
            .iter()
            .any(|(t, _, _, _)| now.duration_since(*t) > HELD_PROPOSAL_MAX);
        if (transferring || (!leading && leader.is_none())) && !expired {
            return;
        }
        for (_, data, ack, reply) in std::mem::take(&mut self.held) {
            if leading && !transferring {
                self.propose(group, data, ack, reply);
                continue;
            }
            let _ = reply.send(Err(match leader {
                Some(l) => Refused::NotLeader {
                    group,
                    leader: Some(l),
                },
                None => Refused::Superseded,
            }));
        }
    }

    /// Proposes `data`; the reply waits in `proposals` (and in `early` if it may be
    /// answered once a quorum has written the entry).
    fn propose(&mut self, group: GroupId, data: Vec<u8>, ack: Ack, reply: ProposeReply) {
        let bytes = data.len() as u64;
        match self.raft.propose(data) {
            Ok((index, term)) => {
                self.lag.proposed(index.0, bytes, Instant::now());
                self.proposals.insert(index.0, (term, reply));
                if ack == Ack::Written && self.early_allowed() {
                    self.early.insert(index.0, (bytes, Instant::now()));
                } else {
                    self.early.remove(&index.0);
                }
            }
            Err(ProposeError::NotLeader { leader }) => {
                let _ = reply.send(Err(Refused::NotLeader { group, leader }));
            }
            Err(ProposeError::Dropped) => {
                let _ = reply.send(Err(Refused::Superseded));
            }
            Err(ProposeError::Raft(e)) => {
                let _ = reply.send(Err(Refused::Failed(e)));
            }
        }
    }

    /// Writes may be answered before they commit: volume groups that are not
    /// site-durable (a site-durable write waits for another site's synced log).
    fn early_allowed(&self) -> bool {
        matches!(self.machine, Machine::Volume(_)) && !self.policy.site_durable
    }

    /// Leader: whether anything but writes already answered waits for the commit (a
    /// flush, a read, a proposal answered at commit or held, a leader transfer, or the
    /// early-answer budget half spent), so that the logs must sync now.
    fn commit_awaited(&self) -> bool {
        !self.early_allowed()
            || self.read_asked
            || !self.flushes.is_empty()
            || !self.reads_waiting_index.is_empty()
            || !self.reads_waiting_apply.is_empty()
            || !self.held.is_empty()
            || self.raft.transferring_to().is_some()
            || self.early_uncommitted_bytes >= EARLY_ACK_BYTES_MAX / 2
            || self.proposals.keys().any(|i| !self.early.contains_key(i))
    }

    /// Whether this replica's written, unsynced log must sync now rather than within
    /// `SYNC_LAZY_MAX`.
    fn sync_urgent(&self) -> bool {
        if !self.early_allowed()
            || !self.reads_waiting_index.is_empty()
            || !self.reads_waiting_apply.is_empty()
        {
            return true;
        }
        let want = self.sync_wanted;
        want.term == self.raft.term().0 && want.index > self.synced_to
    }

    /// Answers the early proposals that a quorum of voters has written (leader only).
    /// Off the leader they stay in `proposals` and are answered at apply, or refused.
    fn release_written(&mut self, me: NodeId, stats: &StoreStats) {
        self.trim_early_uncommitted();
        if self.early.is_empty() {
            return;
        }
        if !self.raft.is_leader() || !self.early_allowed() {
            self.early.clear();
            return;
        }
        let term = self.raft.term();
        let (voters, outgoing) = self.raft.voter_sets();
        let progress = self.raft.progress();
        let matched = |n: NodeId| {
            progress
                .iter()
                .find(|p| p.node == n)
                .map_or(0, |p| p.matched)
        };
        let quorum = self.written.quorum(term, me, &voters, &outgoing, matched).0;
        while let Some((&i, &(bytes, proposed))) = self.early.first_key_value() {
            if i > quorum {
                break;
            }
            if self.early_uncommitted_bytes + bytes > EARLY_ACK_BYTES_MAX
                && !self.early_uncommitted.is_empty()
            {
                // Enough answered ahead of the fsyncs: the rest wait for their commit.
                break;
            }
            self.early.pop_first();
            // Proposed in an earlier term of ours: the entry may have been replaced,
            // so it waits for apply, which knows.
            if self.proposals.get(&i).is_none_or(|(t, _)| *t != term) {
                continue;
            }
            let (_, reply) = self.proposals.remove(&i).expect("present");
            self.early_acked = self.early_acked.max(i);
            self.early_uncommitted.push_back((i, bytes));
            self.early_uncommitted_bytes += bytes;
            stats.write_written.observe(proposed.elapsed());
            stats
                .acked_written
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _ = reply.send(Ok(Outcome::Volume));
        }
    }

    /// Forgets the early answers that have committed since.
    fn trim_early_uncommitted(&mut self) {
        let commit = self.raft.commit_index().0;
        while let Some(&(i, bytes)) = self.early_uncommitted.front() {
            if i > commit && self.raft.is_leader() {
                break;
            }
            self.early_uncommitted.pop_front();
            self.early_uncommitted_bytes -= bytes;
        }
    }

    /// Answers the flushes whose writes are committed: the commit index has reached
    /// their index and an entry of this leader's term (so whatever an earlier leader
    /// answered early is committed too). Off the leader they are sent to the new one.
    fn release_flushes(&mut self, stats: &StoreStats) {
        if self.flushes.is_empty() {
            return;
        }
        if !self.raft.is_leader() {
            let leader = self.raft.leader();
            for (_, _, reply) in self.flushes.drain(..) {
                let _ = reply.send(Err(Refused::NotLeader {
                    group: self.raft.id,
                    leader,
                }));
            }
            return;
        }
        if !self.raft.committed_in_term() {
            return;
        }
        let commit = self.raft.commit_index().0;
        let (done, waiting): (Vec<_>, Vec<_>) =
            self.flushes.drain(..).partition(|(i, _, _)| *i <= commit);
        self.flushes = waiting;
        for (_, arrived, reply) in done {
            stats.flush.observe(arrived.elapsed());
            let _ = reply.send(Ok(Outcome::Volume));
        }
    }

    /// A leader's answer to a follower's ReadIndex carries at least the highest write
    /// it answered early, so that the follower's read waits for it to apply.
    fn stamp_read_index(&self, m: &mut Message) {
        if m.get_msg_type() == raft::eraftpb::MessageType::MsgReadIndexResp {
            m.index = m.index.max(self.early_acked);
        }
    }

    /// Highest index a replica outside the home site has persisted (leader only).
    fn remote_matched(&self) -> u64 {
        self.raft
            .progress()
            .iter()
            .filter(|p| self.policy.remote.contains(&p.node))
            .map(|p| p.matched)
            .max()
            .unwrap_or(0)
    }

    /// Answers the site-durable writes that a remote replica now has; refuses them all
    /// if this node no longer leads (the caller retries; writes are idempotent).
    fn release_site_waiting(&mut self) {
        if self.site_waiting.is_empty() {
            return;
        }
        if !self.raft.is_leader() {
            for (_, reply) in self.site_waiting.drain(..) {
                let _ = reply.send(Err(Refused::Superseded));
            }
            return;
        }
        let shipped = self.remote_matched();
        while self
            .site_waiting
            .front()
            .is_some_and(|(i, _)| *i <= shipped)
        {
            let (_, reply) = self.site_waiting.pop_front().expect("present");
            let _ = reply.send(Ok(Outcome::Volume));
        }
    }
}

/// Shared, read-mostly view of the cluster state, published by the store after every
/// metadata apply.
pub type ClusterView = watch::Receiver<Arc<ClusterState>>;

/// Leader of each group as this node last saw it, for forwarding.
pub type LeaderMap = Arc<RwLock<HashMap<GroupId, NodeId>>>;

pub struct StoreConfig {
    pub me: NodeId,
    pub data_dir: PathBuf,
    pub group: GroupConfig,
    /// Voters of the metadata group when it is bootstrapped on an empty store.
    pub initial_meta_voters: Vec<NodeId>,
    /// Dedup's index of the blocks this node stores, by content: filled from the hash
    /// index at start and by every checkpoint.
    pub content: Arc<ContentIndex>,
    /// A new node joining a running cluster: its metadata group starts with no members
    /// and waits for the metadata leader to add it (as a learner) and send a snapshot.
    pub joining: bool,
}

pub struct Store<S: LogStore> {
    cfg: StoreConfig,
    log: Arc<S>,
    outbox: Arc<dyn Outbox>,
    groups: BTreeMap<GroupId, Group<S>>,
    cluster: ClusterState,
    cluster_tx: watch::Sender<Arc<ClusterState>>,
    leaders: LeaderMap,
    logger: slog::Logger,
    next_read_ctx: u64,
    last_checkpoint: Instant,
    /// The group the next scrub job starts with (jobs take the replicas in turn).
    scrub_next: GroupId,
    /// The background scan (reads extent files off this thread).
    scrubber: Scrubber,
    /// Runs the extent fsyncs of checkpoints off this thread.
    syncer: Syncer,
    /// Runs the log's fsyncs, one at a time, while this thread goes on.
    log_syncer: LogSyncer<S>,
    /// Readies written but not yet covered by a sync.
    unsynced: Vec<Unsynced>,
    /// Readies the sync in flight covers (empty: no sync in flight).
    syncing: Vec<Unsynced>,
    /// Something waits on the unsynced Readies beyond writes already answered: they
    /// sync now, not within `SYNC_LAZY_MAX` (see `Store::want_syncs`).
    sync_urgent: bool,
    sync_started: Instant,
    /// When the oldest Ready in `unsynced` was written.
    unsynced_since: Option<Instant>,
    /// When the last sync ended.
    sync_ended: Instant,
    /// The checkpoint whose fsyncs are in flight: its batch and the indexes it records.
    checkpoint_pending: Option<(LogBatch, Vec<(GroupId, LogIndex)>)>,
    /// Blocks the scan found different from the index, per group, waiting to be
    /// confirmed when the index is exact; at most `SCRUB_BLOCKS_PER_ROUND` per group.
    scrub_suspects: BTreeMap<GroupId, BTreeSet<u64>>,
    /// Groups whose replica must copy blocks (published for the node's catch-up task).
    recovering_tx: watch::Sender<std::collections::BTreeSet<GroupId>>,
    /// Where this thread's time goes (`/metrics`).
    stats: Arc<StoreStats>,
    /// Set by an event whose handling failed on disk: the loop stops the node.
    failed: Option<String>,
}

/// A Ready written to the log, waiting for a sync to cover it.
struct Unsynced {
    group: GroupId,
    /// Its number, for `RaftGroup::on_persisted`.
    number: u64,
    /// Messages that promise its state durable (votes, append responses).
    persisted: Vec<Message>,
    /// Its last entry's index (0: it wrote no entries).
    last: u64,
    /// Bytes of entries it wrote.
    bytes: u64,
    /// It changed the term or the vote, or installed a snapshot: an election or a
    /// catch-up waits on it, so its sync is never put off.
    urgent: bool,
}

impl<S: LogStore> Store<S> {
    /// Opens every group found in `log` (and bootstraps the metadata group if the store
    /// is new).
    pub fn open(
        cfg: StoreConfig,
        log: Arc<S>,
        outbox: Arc<dyn Outbox>,
    ) -> anyhow::Result<(Store<S>, ClusterView, LeaderMap)> {
        std::fs::create_dir_all(cfg.data_dir.join("volumes"))?;
        let (cluster_tx, cluster_rx) = watch::channel(Arc::new(ClusterState::default()));
        let leaders: LeaderMap = Arc::default();
        let scrubber = Scrubber::spawn(Arc::clone(&log))?;
        let log_syncer = LogSyncer::spawn(Arc::clone(&log))?;
        let stats = Arc::new(StoreStats::default());
        let cfg_content = Arc::clone(&cfg.content);
        let mut store = Store {
            cfg,
            log,
            outbox,
            groups: BTreeMap::new(),
            cluster: ClusterState::default(),
            cluster_tx,
            leaders: Arc::clone(&leaders),
            logger: roamdisk_core::group::raft_logger(),
            next_read_ctx: 1,
            last_checkpoint: Instant::now(),
            scrub_next: GroupId(0),
            scrubber,
            syncer: Syncer::spawn(Arc::clone(&stats), Arc::clone(&cfg_content))?,
            log_syncer,
            unsynced: Vec::new(),
            syncing: Vec::new(),
            sync_urgent: false,
            sync_started: Instant::now(),
            unsynced_since: None,
            sync_ended: Instant::now(),
            checkpoint_pending: None,
            scrub_suspects: BTreeMap::new(),
            recovering_tx: watch::channel(Default::default()).0,
            stats,
            failed: None,
        };
        if store.log.state(META_GROUP)?.is_none() {
            let mut cs = ConfState::default();
            cs.voters = store.cfg.initial_meta_voters.iter().map(|n| n.0).collect();
            anyhow::ensure!(
                !cs.voters.is_empty() || store.cfg.joining,
                "a new node needs the initial metadata voters (--initial-cluster) or a member to join (--join)"
            );
            let mut b = LogBatch::default();
            b.push(LogOp::Create {
                group: META_GROUP,
                state: GroupState {
                    conf_state: cs,
                    ..Default::default()
                },
            });
            store.log.write(b)?;
            store.log.sync()?;
        }
        // A process crash keeps what was written but not synced (RocksDB's WAL is in the
        // page cache); raft-rs takes the store as persisted and would acknowledge those
        // entries again without a new write. Make them durable before anything is
        // acknowledged. (Found by the simulation: `roamdisk-sim --stress
        // --no-restart-sync --seed 288`.)
        store.log.sync()?;
        // The metadata state is rebuilt from the snapshot record plus log replay.
        if let Some(bytes) = store.log.get(META_SNAPSHOT_KEY)? {
            store.cluster = ClusterState::decode(&bytes)?;
        }
        for g in store.log.groups()? {
            store.open_group(g)?;
        }
        store.publish_cluster();
        // Apply what was committed before the restart now, so the node's view of the
        // metadata (its volumes, its peers) is whole before it says it is ready; a node
        // that had not checkpointed its metadata yet would otherwise refuse exports for
        // a moment after starting.
        store.process_readies()?;
        store.sync_log_now()?;
        Ok((store, cluster_rx, leaders))
    }

    fn snapshot_fn(&self, group: GroupId) -> Arc<dyn Fn(GroupId) -> Vec<u8> + Send + Sync> {
        let log = Arc::clone(&self.log);
        if group == META_GROUP {
            // The metadata snapshot is the state as of the recorded applied index,
            // kept in a record written with that index (see `checkpoint_meta`).
            Arc::new(move |_| {
                log.get(META_SNAPSHOT_KEY)
                    .ok()
                    .flatten()
                    .unwrap_or_default()
            })
        } else {
            // A volume snapshot carries no data: the receiver copies blocks by hash
            // diff out of band (catch-up), then replays the log.
            Arc::new(|_| Vec::new())
        }
    }

    fn open_group(&mut self, g: GroupId) -> anyhow::Result<()> {
        let st = self
            .log
            .state(g)?
            .ok_or_else(|| anyhow::anyhow!("group {g} vanished"))?;
        let recovering = match self.log.get(&recovering_key(g))? {
            Some(v) => Some(LogIndex(u64::from_be_bytes(
                v.as_slice()
                    .try_into()
                    .map_err(|_| anyhow::anyhow!("corrupt recovery record of group {g}"))?,
            ))),
            None => None,
        };
        let machine = if g == META_GROUP {
            Machine::Meta(LogIndex(st.applied_index))
        } else {
            let vol = VolumeId(g.0);
            let size = self.cluster.volume_by_id(vol).map_or(0, |v| v.size);
            if recovering.is_none() && self.cfg.content.len() < CONTENT_INDEX_MAX {
                for (k, h) in self.log.scan(&crate::volume::hash_prefix(vol))? {
                    if let (Some((_, b)), Ok(h)) =
                        (parse_hash_key(&k), <[u8; 32]>::try_from(h.as_slice()))
                    {
                        self.cfg.content.insert(&h, vol, b);
                    }
                }
            }
            Machine::Volume(VolumeReplica::open(
                &self.cfg.data_dir.join("volumes"),
                vol,
                size,
                LogIndex(st.applied_index),
            )?)
        };
        let raft = RaftGroup::open(
            g,
            self.cfg.me,
            Arc::clone(&self.log),
            &self.cfg.group,
            self.snapshot_fn(g),
            &self.logger,
        )?;
        self.groups.insert(
            g,
            Group {
                raft,
                machine,
                proposals: BTreeMap::new(),
                early: BTreeMap::new(),
                early_uncommitted: VecDeque::new(),
                early_uncommitted_bytes: 0,
                written: WrittenTracker::default(),
                early_acked: 0,
                flushes: Vec::new(),
                reads_waiting_index: HashMap::new(),
                reads_waiting_apply: Vec::new(),
                retained: Default::default(),
                retained_bytes: 0,
                bytes_since_checkpoint: 0,
                recovering,
                lag: LagTracker::new(Instant::now()),
                policy: Policy::default(),
                site_waiting: VecDeque::new(),
                meta_replies: Vec::new(),
                held: Vec::new(),
                synced_to: 0,
                sync_wanted: SyncWanted::default(),
                read_asked: false,
                deferred_to: st.applied_index,
                serve_after: 0,
            },
        );
        Ok(())
    }

    /// On the metadata leader: a registered node that is not a member of the metadata
    /// group (it joined after bootstrap) is added as a learner, one change at a time, so
    /// that it receives the cluster's metadata. Retried every tick until it holds.
    fn add_meta_learners(&mut self) {
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
        let mut single = raft::eraftpb::ConfChangeSingle::default();
        single.set_change_type(raft::eraftpb::ConfChangeType::AddLearnerNode);
        single.node_id = n.0;
        let mut cc = raft::eraftpb::ConfChangeV2::default();
        cc.changes.push(single);
        match g.raft.propose_conf_change(cc) {
            Ok(index) => {
                info!(node = %n, index = index.0, "adding a joined node to the metadata group")
            }
            Err(e) => debug!(node = %n, error = ?e, "metadata learner not added yet"),
        }
    }

    fn publish_cluster(&self) {
        self.cluster_tx.send_replace(Arc::new(self.cluster.clone()));
    }

    /// Runs the loop until `Event::Shutdown` or until every sender is gone; returns an
    /// error when it stopped because the log store or an extent file failed (a full
    /// disk, an I/O error): the node must then stop as a whole (fail-stop) and recover
    /// from its durable state on restart, never go on without its replicas.
    pub fn run(mut self, events: flume::Receiver<Event>) -> Result<(), String> {
        let mut failure = None;
        let tick = Duration::from_millis(TICK_MS);
        let mut next_tick = Instant::now() + tick;
        enum Woken {
            Event(Result<Event, flume::RecvError>),
            Synced(Result<Result<(), String>, flume::RecvError>),
        }
        loop {
            let now = Instant::now();
            let mut synced = self.log_syncer.done.try_recv().ok();
            // Wake for the tick, or for a sync waiting to gather more writes.
            let wake_at = match self.sync_due().filter(|_| self.syncing.is_empty()) {
                Some(due) => next_tick.min(due.max(now)),
                None => next_tick,
            };
            let first = if now >= wake_at || synced.is_some() {
                events.try_recv().ok()
            } else if self.syncing.is_empty() {
                match events.recv_timeout(wake_at - now) {
                    Ok(ev) => Some(ev),
                    Err(flume::RecvTimeoutError::Timeout) => None,
                    Err(flume::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                // A sync is in flight: wake for it as for an event.
                match flume::Selector::new()
                    .recv(&events, Woken::Event)
                    .recv(&self.log_syncer.done, Woken::Synced)
                    .wait_timeout(wake_at - now)
                {
                    Ok(Woken::Event(Ok(ev))) => Some(ev),
                    Ok(Woken::Event(Err(_))) => break,
                    Ok(Woken::Synced(r)) => {
                        synced =
                            Some(r.unwrap_or_else(|_| Err("the log-sync thread stopped".into())));
                        None
                    }
                    Err(_) => None,
                }
            };
            if let Some(r) = synced {
                if let Err(e) = self.finish_log_sync(r) {
                    error!(error = %e, "raft log sync failed; stopping the node");
                    failure = Some(e.to_string());
                    break;
                }
            }
            let mut shutdown = false;
            if let Some(ev) = first {
                shutdown |= self.handle(ev);
                for ev in events.try_iter().take(EVENTS_PER_ROUND) {
                    shutdown |= self.handle(ev);
                }
            }
            if Instant::now() >= next_tick {
                next_tick += tick;
                if next_tick < Instant::now() {
                    next_tick = Instant::now() + tick;
                }
                let expiry = Duration::from_millis(READ_INDEX_TIMEOUT_MS);
                let now = Instant::now();
                self.add_meta_learners();
                for g in self.groups.values_mut() {
                    g.raft.tick();
                    if g.raft.is_leader() {
                        let progress = g.raft.progress();
                        for p in &progress {
                            g.lag.observe(p.node.0, p.matched, now);
                        }
                        if let Some(min) = progress.iter().map(|p| p.matched).min() {
                            g.lag.shipped_to_all(min);
                        }
                    }
                    g.release_site_waiting();
                    g.reads_waiting_index
                        .retain(|_, (started, _)| started.elapsed() < expiry);
                }
            }
            if let Some(e) = self.failed.take() {
                failure = Some(e);
                break;
            }
            // Proposals held through a leader transfer are proposed (or refused) between
            // rounds: raft-rs must not take proposals between a Ready and its advance.
            for (id, g) in self.groups.iter_mut() {
                g.release_held(*id);
            }
            if let Err(e) = self.process_readies().and_then(|()| {
                self.want_syncs();
                self.start_log_sync()
            }) {
                // The log store failed: continuing could acknowledge what is not durable.
                error!(error = %e, "raft store failed; stopping the node");
                failure = Some(e.to_string());
                break;
            }
            // Checkpoints: the batch is built on this thread, the hashing of touched
            // blocks and the extent fsyncs run on the extent-sync thread, and the batch
            // is written once they are done.
            let started = Instant::now();
            let mut r = self.poll_checkpoint(false);
            if r.is_ok()
                && (self.last_checkpoint.elapsed() >= Duration::from_millis(CHECKPOINT_INTERVAL_MS)
                    || self.any_must_checkpoint())
            {
                if self.any_must_checkpoint() {
                    // The touched-block bound: wait for the one in flight, start the next.
                    r = self.poll_checkpoint(true);
                }
                r = r.and_then(|()| self.start_checkpoint());
                if self.checkpoint_pending.is_none() {
                    // Nothing to sync (or done at once): the index is written, scrub now.
                    // Otherwise the scrub runs when the fsyncs are done.
                    r = r.and_then(|()| self.scrub());
                }
            }
            if let Err(e) = r {
                error!(error = %e, "checkpoint failed; stopping the node");
                failure = Some(e.to_string());
                break;
            }
            // Every write waits while this thread checkpoints: keep it visible.
            let took = started.elapsed();
            if took > Duration::from_millis(50) {
                warn!(
                    took_ms = took.as_secs_f64() * 1e3,
                    "slow checkpoint (writes waited)"
                );
            }
            if shutdown {
                if let Err(e) = self.sync_log_now().and_then(|()| self.checkpoint()) {
                    error!(error = %e, "final checkpoint failed");
                }
                break;
            }
        }
        for g in self.groups.values_mut() {
            fail_all(g, Refused::Shutdown);
        }
        info!("raft store stopped");
        failure.map_or(Ok(()), Err)
    }

    /// Handles one event; returns true for shutdown.
    fn handle(&mut self, ev: Event) -> bool {
        match ev {
            Event::Raft { group, msg } => match self.groups.get_mut(&group) {
                Some(g) => {
                    if msg.get_msg_type() == raft::eraftpb::MessageType::MsgReadIndex {
                        g.read_asked = true;
                    }
                    if let Err(e) = g.raft.step(msg) {
                        debug!(%group, error = %e, "raft step refused a message");
                    }
                }
                None => debug!(%group, from = msg.from, "message for a group not on this node"),
            },
            Event::Propose {
                group,
                data,
                ack,
                reply,
            } => {
                let Some(g) = self.groups.get_mut(&group) else {
                    let _ = reply.send(Err(Refused::NoGroup(group)));
                    return false;
                };
                if g.proposals.len() >= PENDING_PROPOSALS_MAX {
                    let _ = reply.send(Err(Refused::Busy));
                    return false;
                }
                if g.raft.is_leader()
                    && g.raft.transferring_to().is_some()
                    && g.proposals.len() + g.held.len() < PENDING_PROPOSALS_MAX
                {
                    g.held.push((Instant::now(), data, ack, reply));
                    return false;
                }
                g.propose(group, data, ack, reply);
            }
            Event::Flush { group, reply } => {
                let Some(g) = self.groups.get_mut(&group) else {
                    let _ = reply.send(Err(Refused::NoGroup(group)));
                    return false;
                };
                if !g.raft.is_leader() {
                    let leader = g.raft.leader();
                    let _ = reply.send(Err(Refused::NotLeader { group, leader }));
                    return false;
                }
                if g.flushes.len() >= PENDING_PROPOSALS_MAX {
                    let _ = reply.send(Err(Refused::Busy));
                    return false;
                }
                g.flushes.push((g.early_acked, Instant::now(), reply));
                g.release_flushes(&self.stats);
            }
            Event::SyncWanted { group, want } => {
                if let Some(g) = self.groups.get_mut(&group) {
                    if (want.term, want.index) > (g.sync_wanted.term, g.sync_wanted.index) {
                        g.sync_wanted = want;
                    }
                }
            }
            Event::Written { group, from, w } => {
                if let Some(g) = self.groups.get_mut(&group) {
                    // Only this leader's term, and only where the follower's log matches
                    // ours (see `roamdisk_core::written`).
                    use std::sync::atomic::Ordering::Relaxed;
                    if g.raft.is_leader()
                        && g.raft.term() == Term(w.term)
                        && g.raft.log_term(LogIndex(w.index)) == Some(Term(w.log_term))
                    {
                        g.written
                            .peer_written(Term(w.term), from, LogIndex(w.index));
                        self.stats.written_reports.fetch_add(1, Relaxed);
                    } else {
                        self.stats.written_reports_refused.fetch_add(1, Relaxed);
                    }
                }
            }
            Event::Read { group, reply } => {
                let Some(g) = self.groups.get_mut(&group) else {
                    let _ = reply.send(Err(Refused::NoGroup(group)));
                    return false;
                };
                if g.recovering.is_some() || g.raft.applied_index().0 < g.serve_after {
                    let _ = reply.send(Err(Refused::Recovering(group)));
                    return false;
                }
                if g.reads_waiting_index.len() + g.reads_waiting_apply.len() >= PENDING_READS_MAX {
                    let _ = reply.send(Err(Refused::Busy));
                    return false;
                }
                let ctx = self.next_read_ctx;
                self.next_read_ctx += 1;
                g.reads_waiting_index.insert(ctx, (Instant::now(), reply));
                g.raft.read_index(ctx.to_be_bytes().to_vec());
            }
            Event::ConfChange { group, cc, reply } => {
                let r = match self.groups.get_mut(&group) {
                    None => Err(Refused::NoGroup(group)),
                    Some(g) => match g.raft.propose_conf_change(cc) {
                        Ok(index) => {
                            info!(%group, index = index.0, "membership change proposed");
                            Ok(())
                        }
                        Err(ProposeError::NotLeader { leader }) => {
                            Err(Refused::NotLeader { group, leader })
                        }
                        Err(ProposeError::Dropped) => Err(Refused::Busy),
                        Err(ProposeError::Raft(e)) => Err(Refused::Failed(e)),
                    },
                };
                let _ = reply.send(r);
            }
            Event::TransferLeader { group, to } => {
                if let Some(g) = self.groups.get_mut(&group) {
                    g.raft.transfer_leader(to);
                }
            }
            Event::Unreachable { node } => {
                for g in self.groups.values_mut() {
                    g.raft.report_unreachable(node);
                }
            }
            Event::Applied { group, reply } => {
                let _ = reply.send(self.groups.get(&group).map(|g| g.machine.applied().0));
            }
            Event::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Event::CatchUpDone {
                group,
                copy_end,
                blocks,
            } => {
                if let Err(e) = self.finish_catch_up(group, copy_end, &blocks) {
                    // Its checkpoint or log write failed: fail-stop like any other disk
                    // error (carrying on would leave checkpoints stuck or the replica's
                    // copied blocks unsynced under a recorded applied index).
                    error!(%group, error = %e, "finishing catch-up failed; stopping the node");
                    self.failed = Some(format!("finish catch-up of group {group}: {e}"));
                    return true;
                }
            }
            Event::Shutdown => return true,
        }
        false
    }

    fn status(&self) -> Vec<GroupStatus> {
        self.groups
            .iter()
            .map(|(id, g)| GroupStatus {
                group: id.0,
                role: format!("{:?}", g.raft.role()),
                leader: g.raft.leader().map(|n| n.0),
                term: g.raft.term().0,
                commit: g.raft.commit_index().0,
                applied: g.raft.applied_index().0,
                durable_applied: match &g.machine {
                    Machine::Volume(v) => v.durable_applied().0,
                    Machine::Meta(i) => i.0,
                },
                last_index: g.raft.last_index().0,
                progress: if g.raft.is_leader() {
                    let now = Instant::now();
                    let last = g.raft.last_index().0;
                    g.raft
                        .progress()
                        .into_iter()
                        .map(|p| PeerStatus {
                            node: p.node.0,
                            matched: p.matched,
                            learner: p.is_learner,
                            lag: g.lag.lag(p.node.0, p.matched, last, now),
                        })
                        .collect()
                } else {
                    vec![]
                },
                recovering: g.recovering.is_some(),
                voters: {
                    let mut v = g.raft.conf_state().voters;
                    v.sort();
                    v
                },
                learners: {
                    let mut l = g.raft.conf_state().learners;
                    l.sort();
                    l
                },
                joint: !g.raft.conf_state().voters_outgoing.is_empty(),
            })
            .collect()
    }

    fn any_must_checkpoint(&self) -> bool {
        self.groups
            .values()
            .any(|g| matches!(&g.machine, Machine::Volume(v) if v.must_checkpoint()))
    }

    /// One round of Raft work for every group: the log is written here and synced on the
    /// `log-sync` thread ([`Store::finish_log_sync`] completes what the sync covers).
    fn process_readies(&mut self) -> anyhow::Result<()> {
        let round_started = Instant::now();
        let mut apply_took = Duration::ZERO;
        let mut batch = LogBatch::default();
        #[allow(clippy::type_complexity)]
        let mut readied: Vec<(
            GroupId,
            Vec<Message>,
            Vec<raft::ReadState>,
            bool,
            bool,
            Option<LogIndex>,
        )> = Vec::new();
        // Groups whose entries this round writes: (group, last index, its term, bytes).
        let mut wrote: Vec<(GroupId, u64, u64, u64)> = Vec::new();
        let mut meta_changed = false;
        let ids: Vec<GroupId> = self.groups.keys().copied().collect();
        for id in &ids {
            let g = self.groups.get_mut(id).expect("listed");
            let Some(mut work) = g.raft.ready() else {
                continue;
            };
            // 1. Messages that need not wait for persistence.
            for mut m in work.messages.drain(..) {
                g.stamp_read_index(&mut m);
                self.outbox.send(NodeId(m.to), *id, m);
            }
            // 2. Snapshot.
            if let Some(snap) = &work.snapshot {
                let index = LogIndex(snap.get_metadata().index);
                install_snapshot(
                    g,
                    index,
                    &snap.data,
                    &mut self.cluster,
                    &mut batch,
                    &mut meta_changed,
                )?;
            }
            // 3. Committed entries.
            let delivered = work.committed.last().map(|e| LogIndex(e.index));
            let started = Instant::now();
            meta_changed |= apply(
                g,
                std::mem::take(&mut work.committed),
                &mut batch,
                &mut self.cluster,
                &self.stats,
            )?;
            apply_took += started.elapsed();
            // 4. Persistence (collected for all groups).
            count_appends(&work.persist.ops, &self.stats);
            // A Ready appends at most once (`RaftGroup::ready`).
            if let Some(entries) = work.persist.ops.iter().find_map(|op| match op {
                LogOp::Append { entries, .. } if !entries.is_empty() => Some(entries),
                _ => None,
            }) {
                let (first, last) = (&entries[0], &entries[entries.len() - 1]);
                // Entries from `first` on replace what this log had: not synced yet.
                g.synced_to = g.synced_to.min(first.index.saturating_sub(1));
                let bytes = entries.iter().map(|e| e.data.len() as u64).sum();
                wrote.push((*id, last.index, last.term, bytes));
            }
            batch.ops.append(&mut work.persist.ops);
            if let Some((role, leader)) = work.role_changed {
                g.lag.reset(Instant::now());
                let mut leaders = self.leaders.write().expect("leader map poisoned");
                match leader {
                    Some(l) => leaders.insert(*id, l),
                    None => leaders.remove(id),
                };
                if role == StateRole::Leader {
                    info!(group = %id, term = g.raft.term().0, "became leader");
                }
            }
            readied.push((
                *id,
                work.persisted_messages,
                work.read_states,
                work.must_sync,
                work.votes || work.snapshot.is_some(),
                delivered,
            ));
        }
        // A remote replica's append response changes no commit index, so it may bring no
        // Ready: answer the site-durable writes it completes here, every round.
        let me = self.cfg.me;
        for g in self.groups.values_mut() {
            g.release_site_waiting();
            g.release_written(me, &self.stats);
            g.release_flushes(&self.stats);
        }
        if readied.is_empty() {
            return Ok(());
        }
        if !batch.is_empty() {
            let started = Instant::now();
            self.log.write(std::mem::take(&mut batch))?;
            self.stats.log_write.observe(started.elapsed());
        }
        // Written, not yet synced: a leader counts itself, a voter tells its leader.
        for &(id, index, log_term, _) in &wrote {
            let g = self.groups.get_mut(&id).expect("listed");
            if !matches!(g.machine, Machine::Volume(_)) {
                continue;
            }
            let term = g.raft.term();
            if g.raft.is_leader() {
                g.written.own_written(term, LogIndex(index));
                g.release_written(me, &self.stats);
            } else if let Some(leader) = g.raft.leader().filter(|l| *l != me) {
                let (voters, outgoing) = g.raft.voter_sets();
                if voters.contains(&me) || outgoing.contains(&me) {
                    let w = Written {
                        term: term.0,
                        index,
                        log_term,
                    };
                    self.outbox.written(leader, id, w);
                }
            }
        }
        for (id, persisted, read_states, must_sync, urgent, delivered) in readied {
            let g = self.groups.get_mut(&id).expect("listed");
            for rs in read_states {
                let ctx =
                    u64::from_be_bytes(rs.request_ctx.as_slice().try_into().unwrap_or([0; 8]));
                if let Some((_, reply)) = g.reads_waiting_index.remove(&ctx) {
                    // Writes answered before they committed are read too.
                    g.reads_waiting_apply
                        .push((rs.index.max(g.early_acked), reply));
                }
            }
            // 5 and 6. Advance: written now, persisted once a sync covers the write; the
            // messages that promise persisted state (votes, append responses) wait for
            // it. Readies persist in order, so one that needed no sync waits too if an
            // earlier one of its group does: it rides the sync its group waits on, and
            // starts none.
            let number = g.raft.advance_written(delivered);
            let in_unsynced = self.unsynced.iter().any(|u| u.group == id);
            let in_syncing = self.syncing.iter().any(|u| u.group == id);
            let (last, bytes) = wrote
                .iter()
                .find(|w| w.0 == id)
                .map_or((0, 0), |w| (w.1, w.3));
            let u = Unsynced {
                group: id,
                number,
                persisted,
                last,
                bytes,
                urgent,
            };
            if must_sync || in_unsynced {
                self.unsynced.push(u);
                self.unsynced_since.get_or_insert_with(Instant::now);
            } else if in_syncing {
                self.syncing.push(u);
            } else {
                g.raft.on_persisted(number);
                for mut m in u.persisted {
                    g.stamp_read_index(&mut m);
                    self.outbox.send(NodeId(m.to), id, m);
                }
            }
            // 7. Applied index to raft, then answer what completed.
            let applied = g.machine.applied();
            if applied > g.raft.applied_index() {
                g.raft.advance_apply_to(applied);
            }
            complete_reads(g);
            g.release_site_waiting();
            g.release_flushes(&self.stats);
        }
        if !batch.is_empty() {
            self.log.write(batch)?;
        }
        // The sync itself is decided by the caller (`want_syncs`, `start_log_sync`).
        if meta_changed {
            self.publish_cluster();
            self.reconcile()?;
        }
        for g in self.groups.values_mut() {
            for (reply, outcome) in g.meta_replies.drain(..) {
                let _ = reply.send(Ok(outcome));
            }
        }
        self.publish_recovering();
        self.stats.apply.observe(apply_took);
        self.stats.round.observe(round_started.elapsed());
        self.stats
            .rounds
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Starts a sync of everything written so far, unless one is running (the next starts
    /// when it ends, covering what was written meanwhile: syncs pipeline with writes).
    fn start_log_sync(&mut self) -> anyhow::Result<()> {
        if self.syncing.is_empty() && self.sync_due().is_some_and(|due| due <= Instant::now()) {
            self.log_syncer.start()?;
            self.sync_started = Instant::now();
            std::mem::swap(&mut self.syncing, &mut self.unsynced);
            self.unsynced_since = None;
        }
        Ok(())
    }

    /// When the next sync should start. Under load (a sync ended within
    /// `SYNC_GATHER_BUSY`), `SYNC_GATHER` after the oldest write it would cover, so that a
    /// burst of writes arriving over a few rounds shares one fsync; otherwise at once
    /// (a lone write, such as a site-durable QD1 write, must not wait for company).
    ///
    /// When nothing waits on the written log but writes already answered, the sync is
    /// put off by up to `SYNC_LAZY_MAX` (see `want_syncs`): the next FLUSH then costs
    /// one fsync per replica instead of the several a burst of writes would start.
    fn sync_due(&self) -> Option<Instant> {
        let since = self.unsynced_since?;
        if !self.sync_urgent {
            return Some(since + SYNC_LAZY_MAX);
        }
        let busy = self.sync_ended.elapsed() < SYNC_GATHER_BUSY;
        Some(if busy { since + SYNC_GATHER } else { since })
    }

    /// Decides whether the written log syncs now or may wait (`sync_urgent`), and, on
    /// leaders whose commit is awaited, asks the other replicas to sync too.
    fn want_syncs(&mut self) {
        let me = self.cfg.me;
        for (id, g) in self.groups.iter_mut() {
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
                    self.outbox.sync_wanted(p.node, *id, want);
                }
            }
        }
        let bytes: u64 = self.unsynced.iter().map(|u| u.bytes).sum();
        let held: usize = self.unsynced.iter().map(|u| u.persisted.len()).sum();
        self.sync_urgent = held >= LAZY_SYNC_HELD_MAX
            || bytes >= LAZY_SYNC_BYTES_MAX
            || self
                .unsynced
                .iter()
                .any(|u| u.urgent || self.groups.get(&u.group).is_none_or(|g| g.sync_urgent()));
    }

    /// The sync in flight ended with `r`: its Readies are persisted; send the messages
    /// that promised it, then start the next sync.
    fn finish_log_sync(&mut self, r: Result<(), String>) -> anyhow::Result<()> {
        r.map_err(anyhow::Error::msg)?;
        self.stats.log_sync.observe(self.sync_started.elapsed());
        self.sync_ended = Instant::now();
        for Unsynced {
            group: id,
            number,
            persisted,
            last,
            ..
        } in std::mem::take(&mut self.syncing)
        {
            let Some(g) = self.groups.get_mut(&id) else {
                continue;
            };
            g.synced_to = g.synced_to.max(last);
            g.raft.on_persisted(number);
            let applied = g.machine.applied();
            if applied > g.raft.applied_index() {
                g.raft.advance_apply_to(applied);
                complete_reads(g);
            }
            for mut m in persisted {
                g.stamp_read_index(&mut m);
                self.outbox.send(NodeId(m.to), id, m);
            }
        }
        // What was urgent may have been this sync: decide again for what is left.
        self.want_syncs();
        self.start_log_sync()
    }

    /// Waits until every written Ready is persisted (opening, shutting down).
    fn sync_log_now(&mut self) -> anyhow::Result<()> {
        loop {
            if self.syncing.is_empty() && !self.unsynced.is_empty() {
                // No gathering, no putting off: start it now.
                self.sync_urgent = true;
                self.unsynced_since = Some(Instant::now() - SYNC_GATHER);
            }
            self.start_log_sync()?;
            if self.syncing.is_empty() {
                return Ok(());
            }
            let r = self
                .log_syncer
                .done
                .recv()
                .map_err(|_| anyhow::anyhow!("the log-sync thread stopped"))?;
            self.finish_log_sync(r)?;
        }
    }

    /// Counters of this thread's work, for `/metrics`.
    pub fn stats(&self) -> Arc<StoreStats> {
        Arc::clone(&self.stats)
    }

    /// Receiver of the set of groups whose replica must copy blocks.
    pub fn recovering_view(&self) -> watch::Receiver<std::collections::BTreeSet<GroupId>> {
        self.recovering_tx.subscribe()
    }

    fn publish_recovering(&mut self) {
        let set: std::collections::BTreeSet<GroupId> = self
            .groups
            .iter()
            .filter(|(_, g)| g.recovering.is_some())
            .map(|(id, _)| *id)
            .collect();
        for (id, g) in self.groups.iter_mut() {
            // A recovering replica must not lead: it copies its blocks from the leader.
            if g.recovering.is_some() && g.raft.is_leader() {
                if let Some(p) = g
                    .raft
                    .progress()
                    .into_iter()
                    .find(|p| p.node != self.cfg.me && !p.is_learner)
                {
                    info!(group = %id, to = %p.node, "recovering replica hands over leadership");
                    g.raft.transfer_leader(p.node);
                }
            }
        }
        self.recovering_tx.send_if_modified(|cur| {
            if *cur != set {
                *cur = set;
                true
            } else {
                false
            }
        });
    }

    /// Verifies a slice of every volume replica against its hash index (see
    /// [`VolumeReplica::scrub`]; runs right after a checkpoint, when the index is exact).
    /// A replica with a block that differs from its recorded hash was corrupted on disk:
    /// it stops serving reads and copies the differing blocks from a healthy replica,
    /// exactly as after a snapshot install (`recovering`).
    fn scrub(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.scrubber.is_dead(), "the scrub thread stopped");
        for f in self.scrubber.take_findings() {
            let Some(g) = self.groups.get(&f.group) else {
                continue; // deleted since
            };
            let suspects = f
                .suspects
                .map_err(|e| anyhow::anyhow!("scrub group {}: {e}", f.group))?;
            if g.recovering.is_some() || suspects.is_empty() {
                continue;
            }
            let set = self.scrub_suspects.entry(f.group).or_default();
            let room = (SCRUB_BLOCKS_PER_ROUND as usize).saturating_sub(set.len());
            set.extend(suspects.into_iter().take(room));
        }
        // Confirm where the index is exact: no checkpoint batch waiting to be written,
        // every committed entry applied, and (checked per block) not written since the
        // last checkpoint. Other suspects wait for a later round. Most suspects are
        // blocks written since the last checkpoint, so a round confirms at most
        // `SCRUB_CONFIRM_PER_ROUND` of them (a few ms of this thread at most).
        let log = &self.log;
        let mut corrupted = Vec::new();
        let mut budget = if self.checkpoint_pending.is_some() {
            0
        } else {
            SCRUB_CONFIRM_PER_ROUND
        };
        for (id, set) in self.scrub_suspects.iter_mut() {
            let Some(g) = self.groups.get(id) else {
                set.clear(); // deleted since
                continue;
            };
            let Machine::Volume(v) = &g.machine else {
                set.clear();
                continue;
            };
            if g.recovering.is_some() {
                set.clear(); // the copy rewrites every block anyway
                continue;
            }
            if budget == 0 || v.applied().0 < g.raft.commit_index().0 {
                continue;
            }
            let blocks: Vec<u64> = set.iter().copied().take(budget).collect();
            let found = v
                .confirm_corrupted(&blocks, |k| log.get(k))
                .map_err(|e| anyhow::anyhow!("scrub volume {}: {e}", v.id))?;
            budget -= blocks.len();
            for b in &blocks {
                set.remove(b);
            }
            set.extend(found.deferred);
            let bad = found.corrupted;
            if !bad.is_empty() {
                error!(volume = %v.id, blocks = ?&bad[..bad.len().min(16)], count = bad.len(),
                    "scrub: blocks differ from their recorded hashes (corrupted on disk); \
                     copying them from a healthy replica");
                corrupted.push((*id, v.applied()));
            }
        }
        self.scrub_suspects.retain(|_, set| !set.is_empty());
        self.offer_scrub_job();
        if corrupted.is_empty() {
            return Ok(());
        }
        let mut batch = LogBatch::default();
        for (id, applied) in &corrupted {
            batch.push(LogOp::Put {
                key: recovering_key(*id),
                value: applied.0.to_be_bytes().to_vec(),
            });
        }
        self.log.write(batch)?;
        self.log.sync()?;
        for (id, applied) in corrupted {
            let g = self.groups.get_mut(&id).expect("listed");
            g.recovering = Some(applied);
            g.deferred_to = applied.0;
        }
        self.publish_recovering();
        Ok(())
    }

    /// Gives the scan thread its next slices, `SCRUB_BLOCKS_PER_ROUND` blocks shared by
    /// the replicas in turn, unless it is still busy with the last ones.
    fn offer_scrub_job(&mut self) {
        if !self.scrubber.idle() {
            return;
        }
        let mut budget = SCRUB_BLOCKS_PER_ROUND;
        let next = self.scrub_next;
        let order: Vec<GroupId> = (self.groups.range(next..))
            .chain(self.groups.range(..next))
            .map(|(id, _)| *id)
            .collect();
        let mut job = Vec::new();
        for id in order {
            if budget == 0 {
                self.scrub_next = id;
                break;
            }
            let g = self.groups.get_mut(&id).expect("listed");
            let Machine::Volume(v) = &mut g.machine else {
                continue;
            };
            if g.recovering.is_some() {
                continue;
            }
            if let Some(slice) = v.next_scrub_slice(budget) {
                budget -= slice.n;
                job.push((id, slice));
            }
        }
        self.scrubber.offer(job);
    }

    /// The block copy is done: replay the deferred entries from our own log, then serve
    /// reads once applied reaches `copy_end`.
    fn finish_catch_up(
        &mut self,
        group: GroupId,
        copy_end: LogIndex,
        copied: &[u64],
    ) -> anyhow::Result<()> {
        let Some(g) = self.groups.get_mut(&group) else {
            return Ok(());
        };
        let Some(from) = g.recovering else {
            return Ok(());
        };
        // Its own checkpoint below must be the last word on this group's applied index.
        self.poll_checkpoint(true)?;
        let g = self.groups.get_mut(&group).expect("present");
        let mut batch = LogBatch::default();
        if let Machine::Volume(v) = &mut g.machine {
            v.mark_dirty();
            // The copied blocks changed behind the index: hash them at this checkpoint.
            v.touch_blocks(copied);
            let mut next = from.0 + 1;
            while next <= g.deferred_to {
                let entries = self.log.entries(group, next, g.deferred_to + 1, 64 << 20)?;
                next += entries.len() as u64;
                for a in g.raft.apply_committed_replay(entries)? {
                    match a {
                        Applied::Command { index, data, .. } => v.apply(index, &data)?,
                        Applied::Internal { index } => v.skip(index),
                    }
                }
            }
            let idx = v.checkpoint(&mut batch, &self.cfg.content)?;
            batch.push(LogOp::Delete {
                key: recovering_key(group),
            });
            self.log.write(batch)?;
            self.log.sync()?;
            v.checkpoint_written(idx);
            g.raft.advance_apply_to(v.applied());
            info!(%group, from = from.0, applied = v.applied().0, copy_end = copy_end.0, "replica caught up");
        }
        g.recovering = None;
        g.serve_after = copy_end.0;
        self.publish_recovering();
        Ok(())
    }

    /// Creates groups for volumes placed on this node and removes groups of volumes
    /// that were deleted.
    fn reconcile(&mut self) -> anyhow::Result<()> {
        // Groups may be removed or created here: a checkpoint in flight that still names
        // a removed one must not land on a new group with the same id.
        self.poll_checkpoint(true)?;
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
                if let Machine::Volume(r) = &mut group.machine {
                    r.grow(v.size)?;
                }
                group.policy = policy;
                continue;
            }
            // Every replica starts from the bootstrap membership (the group's state at
            // index 0); a replica added by a move then replays or snapshots from there.
            let mut cs = ConfState::default();
            cs.voters = v.initial_voters.iter().map(|n| n.0).collect();
            cs.learners = v.initial_learners.iter().map(|n| n.0).collect();
            let mut b = LogBatch::default();
            b.push(LogOp::Create {
                group: g,
                state: GroupState {
                    conf_state: cs,
                    ..Default::default()
                },
            });
            self.log.write(b)?;
            self.log.sync()?;
            self.open_group(g)?;
            let group = self.groups.get_mut(&g).expect("opened");
            group.policy = policy;
            if let Machine::Volume(r) = &mut group.machine {
                r.grow(v.size)?;
            }
            // The first voter campaigns at once so a new volume serves without waiting for
            // an election timeout.
            if v.initial_voters.first() == Some(&me) && v.generation.0 == 1 && v.moving.is_none() {
                self.groups.get_mut(&g).expect("opened").raft.campaign()?;
            }
            info!(volume = %v.name, group = %g, "replica created");
        }
        let present: Vec<GroupId> = self
            .groups
            .keys()
            .copied()
            .filter(|g| *g != META_GROUP)
            .collect();
        for g in present {
            if self.cluster.volume_by_id(VolumeId(g.0)).is_none() {
                let mut group = self.groups.remove(&g).expect("listed");
                fail_all(&mut group, Refused::NoGroup(g));
                let mut b = LogBatch::default();
                if let Machine::Volume(r) = group.machine {
                    r.destroy(&mut b, g)?;
                }
                for (k, _) in self.log.scan(&crate::volume::hash_prefix(VolumeId(g.0)))? {
                    b.push(LogOp::Delete { key: k });
                }
                self.log.write(b)?;
                self.leaders
                    .write()
                    .expect("leader map poisoned")
                    .remove(&g);
                info!(group = %g, "replica removed (volume deleted)");
            }
        }
        Ok(())
    }

    /// Makes applied state durable for every group, then compacts logs behind it; waits
    /// for the checkpoint in flight first, and for this one's fsyncs.
    fn checkpoint(&mut self) -> anyhow::Result<()> {
        self.poll_checkpoint(true)?;
        self.start_checkpoint()?;
        self.poll_checkpoint(true)
    }

    /// Starts a checkpoint unless one is in flight: builds the batch here (applied
    /// indexes, the metadata state), and hands the hashing of touched blocks and the
    /// extent fsyncs to the `extent-sync` thread; [`Store::poll_checkpoint`] adds the
    /// hashes and writes the batch once they are done.
    fn start_checkpoint(&mut self) -> anyhow::Result<()> {
        if self.checkpoint_pending.is_some() {
            return Ok(());
        }
        self.last_checkpoint = Instant::now();
        let mut batch = LogBatch::default();
        let mut written: Vec<(GroupId, LogIndex)> = Vec::new();
        let mut extents = Vec::new();
        for (id, g) in self.groups.iter_mut() {
            match &mut g.machine {
                Machine::Volume(v) => {
                    if v.needs_checkpoint() {
                        let (idx, work) = v.checkpoint_prepare(&mut batch)?;
                        extents.extend(work);
                        written.push((*id, idx));
                    }
                }
                Machine::Meta(applied) => {
                    let applied = *applied;
                    let st = self.log.state(*id)?.expect("meta group exists");
                    if applied.0 > st.applied_index {
                        batch.push(LogOp::Put {
                            key: META_SNAPSHOT_KEY.to_vec(),
                            value: self.cluster.encode(),
                        });
                        batch.push(LogOp::Applied {
                            group: *id,
                            index: applied.0,
                        });
                        written.push((*id, applied));
                    }
                }
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.stats
            .checkpoint
            .observe(self.last_checkpoint.elapsed());
        if extents.is_empty() {
            return self.finish_checkpoint(batch, written);
        }
        self.syncer.start(extents).map_err(anyhow::Error::msg)?;
        self.checkpoint_pending = Some((batch, written));
        Ok(())
    }

    /// Finishes the checkpoint in flight if its fsyncs are done (with `wait`, waits for
    /// them), then runs a scrub round: right after the batch is written the index is
    /// exact for every block not written since the checkpoint started.
    fn poll_checkpoint(&mut self, wait: bool) -> anyhow::Result<()> {
        let Some(done) = self.syncer.poll(wait) else {
            return Ok(());
        };
        let (mut batch, written) = self
            .checkpoint_pending
            .take()
            .expect("a sync in flight belongs to a pending checkpoint");
        batch.ops.extend(done.map_err(anyhow::Error::msg)?);
        self.finish_checkpoint(batch, written)?;
        self.scrub()
    }

    /// Writes a checkpoint's batch (its extents are synced), then compacts logs behind
    /// it. Groups removed since the checkpoint started, or whose recorded applied index
    /// moved past it meanwhile (a snapshot, a finished catch-up), keep what they have.
    fn finish_checkpoint(
        &mut self,
        mut batch: LogBatch,
        written: Vec<(GroupId, LogIndex)>,
    ) -> anyhow::Result<()> {
        let mut stale = BTreeSet::new();
        for (id, idx) in &written {
            let current = self
                .groups
                .contains_key(id)
                .then(|| self.log.state(*id))
                .transpose()?;
            match current.flatten() {
                Some(st) if st.applied_index <= idx.0 => {}
                _ => {
                    stale.insert(*id);
                }
            }
        }
        if !stale.is_empty() {
            let stale_volume =
                |key: &[u8]| parse_hash_key(key).is_some_and(|(v, _)| stale.contains(&v.group()));
            batch.ops.retain(|op| match op {
                LogOp::Applied { group, .. } => !stale.contains(group),
                LogOp::Put { key, .. } | LogOp::Delete { key } => !stale_volume(key),
                _ => true,
            });
        }
        self.log.write(batch)?;
        let mut compact = LogBatch::default();
        for (id, idx) in written {
            if stale.contains(&id) {
                continue;
            }
            let g = self.groups.get_mut(&id).expect("listed");
            if let Machine::Volume(v) = &mut g.machine {
                v.checkpoint_written(idx);
            }
            g.bytes_since_checkpoint = 0;
            // Keep a tail for followers that lag a little, bounded in entries and bytes;
            // never compact past what is durable here.
            let st = self.log.state(id)?.expect("group exists");
            let mut floor = idx.0.saturating_sub(RETAINED_LOG_ENTRIES);
            let mut bytes = g.retained_bytes;
            for &(i, n) in &g.retained {
                if bytes <= RETAINED_LOG_BYTES || i > idx.0 {
                    break;
                }
                bytes -= n;
                floor = floor.max(i);
            }
            if g.raft.is_leader() {
                // Followers within reach of the log keep it from being compacted.
                if let Some(min_match) = g
                    .raft
                    .progress()
                    .iter()
                    .filter(|p| p.node != self.cfg.me)
                    .map(|p| p.matched)
                    .min()
                {
                    floor = floor.max(min_match.min(idx.0));
                }
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
}

/// Record holding the metadata state as of the metadata group's recorded applied index.
pub const META_SNAPSHOT_KEY: &[u8] = b"meta/state";

/// The thread that syncs the log for the store ([`Store::start_log_sync`]): one sync at a
/// time, each covering everything written before it started.
struct LogSyncer<S: LogStore> {
    start: Option<flume::Sender<()>>,
    done: flume::Receiver<Result<(), String>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _log: std::marker::PhantomData<S>,
}

impl<S: LogStore> LogSyncer<S> {
    fn spawn(log: Arc<S>) -> std::io::Result<Self> {
        let (start, start_rx) = flume::bounded::<()>(1);
        let (done_tx, done) = flume::bounded(1);
        let thread = std::thread::Builder::new()
            .name("log-sync".into())
            .spawn(move || {
                for () in start_rx.iter() {
                    let r = log.sync().map_err(|e| format!("sync raft log: {e}"));
                    if done_tx.send(r).is_err() {
                        return;
                    }
                }
            })?;
        Ok(LogSyncer {
            start: Some(start),
            done,
            thread: Some(thread),
            _log: std::marker::PhantomData,
        })
    }

    fn start(&self) -> anyhow::Result<()> {
        self.start
            .as_ref()
            .expect("running until dropped")
            .send(())
            .map_err(|_| anyhow::anyhow!("the log-sync thread stopped"))
    }
}

impl<S: LogStore> Drop for LogSyncer<S> {
    /// Joined before the store (and RocksDB) closes, like the scrub's thread.
    fn drop(&mut self) {
        self.start.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Record marking a volume replica whose data must be caught up (it installed a Raft
/// snapshot at the given index but has not copied the blocks yet). Written in the same
/// batch as the snapshot, so a restart knows the extent file is not trustworthy.
pub fn recovering_key(group: GroupId) -> Vec<u8> {
    let mut k = b"recover/".to_vec();
    k.extend_from_slice(&group.0.to_be_bytes());
    k
}

fn fail_all<S: LogStore>(g: &mut Group<S>, why: Refused) {
    g.early.clear();
    g.early_uncommitted.clear();
    g.early_uncommitted_bytes = 0;
    for (_, _, reply) in std::mem::take(&mut g.flushes) {
        let _ = reply.send(Err(why.clone()));
    }
    for (_, _, _, reply) in std::mem::take(&mut g.held) {
        let _ = reply.send(Err(why.clone()));
    }
    for (_, reply) in std::mem::take(&mut g.site_waiting) {
        let _ = reply.send(Err(why.clone()));
    }
    for (_, (_, reply)) in std::mem::take(&mut g.proposals) {
        let _ = reply.send(Err(why.clone()));
    }
    for (_, (_, reply)) in std::mem::take(&mut g.reads_waiting_index) {
        let _ = reply.send(Err(why.clone()));
    }
    for (_, reply) in std::mem::take(&mut g.reads_waiting_apply) {
        let _ = reply.send(Err(why.clone()));
    }
}

fn complete_reads<S: LogStore>(g: &mut Group<S>) {
    if g.recovering.is_some() || g.raft.applied_index().0 < g.serve_after {
        // The replica's blocks are being replaced (a snapshot arrived while these reads
        // waited): its applied index says nothing about its data, so they read
        // elsewhere. (Answering them when applied passed their index served zeros that
        // a flushed write had replaced: the chaos smoke drill found it.)
        for (_, reply) in std::mem::take(&mut g.reads_waiting_apply) {
            let _ = reply.send(Err(Refused::Recovering(g.raft.id)));
        }
        return;
    }
    let applied = g.raft.applied_index().0;
    let waiting = std::mem::take(&mut g.reads_waiting_apply);
    for (index, reply) in waiting {
        if index <= applied {
            let _ = reply.send(Ok(()));
        } else {
            g.reads_waiting_apply.push((index, reply));
        }
    }
}

fn install_snapshot<S: LogStore>(
    g: &mut Group<S>,
    index: LogIndex,
    data: &[u8],
    cluster: &mut ClusterState,
    batch: &mut LogBatch,
    meta_changed: &mut bool,
) -> anyhow::Result<()> {
    match &mut g.machine {
        Machine::Meta(applied) => {
            *cluster = ClusterState::decode(data)?;
            // The state and its index become durable together with the snapshot point.
            batch.push(LogOp::Put {
                key: META_SNAPSHOT_KEY.to_vec(),
                value: data.to_vec(),
            });
            *applied = index;
            *meta_changed = true;
        }
        Machine::Volume(v) => {
            // Block data arrives by a hash-diff catch-up copy followed by log replay
            // from `index`; until then this replica must not serve reads.
            batch.push(LogOp::Put {
                key: recovering_key(g.raft.id),
                value: index.0.to_be_bytes().to_vec(),
            });
            v.skip(index);
            g.recovering = Some(index);
            g.deferred_to = index.0;
            warn!(volume = %v.id, index = index.0, "volume snapshot received; block catch-up required");
        }
    }
    Ok(())
}

/// Counts the entries a Ready appends to the log.
fn count_appends(ops: &[LogOp], stats: &StoreStats) {
    use std::sync::atomic::Ordering::Relaxed;
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

/// Applies committed entries to the group's state machine and answers proposals whose
/// entries applied. Returns true if the cluster state changed.
fn apply<S: LogStore>(
    g: &mut Group<S>,
    entries: Vec<raft::eraftpb::Entry>,
    batch: &mut LogBatch,
    cluster: &mut ClusterState,
    stats: &StoreStats,
) -> anyhow::Result<bool> {
    if entries.is_empty() {
        return Ok(false);
    }
    stats
        .entries_applied
        .fetch_add(entries.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let mut changed = false;
    for a in g.raft.apply_committed(entries, batch)? {
        if g.recovering.is_some() {
            // The extent file is not trustworthy until the block copy finishes: leave
            // the entries in the log; `finish_catch_up` replays them.
            let index = match a {
                Applied::Internal { index } | Applied::Command { index, .. } => index,
            };
            g.deferred_to = g.deferred_to.max(index.0);
            if let Some((_, reply)) = g.proposals.remove(&index.0) {
                let _ = reply.send(Err(Refused::Superseded));
            }
            continue;
        }
        let (index, term, outcome) = match a {
            Applied::Internal { index } => {
                match &mut g.machine {
                    Machine::Volume(v) => v.skip(index),
                    Machine::Meta(applied) => *applied = index,
                }
                (index, None, None)
            }
            Applied::Command { index, term, data } => {
                let n = data.len() as u64;
                g.retained.push_back((index.0, n));
                g.retained_bytes += n;
                g.bytes_since_checkpoint += n;
                let outcome = match &mut g.machine {
                    Machine::Volume(v) => {
                        v.apply(index, &data)?;
                        Outcome::Volume
                    }
                    Machine::Meta(applied) => {
                        let cmd = MetaCommand::decode(&data)?;
                        let result = cluster.apply(cmd);
                        *applied = index;
                        changed = true;
                        Outcome::Meta(result)
                    }
                };
                (index, Some(term), Some(outcome))
            }
        };
        // Answer the proposal at this index, if this node made it. A different term at
        // the same index means our entry was replaced: the caller retries.
        g.early.remove(&index.0);
        if let Some((t, reply)) = g.proposals.remove(&index.0) {
            match (term, outcome) {
                (Some(term), Some(Outcome::Volume)) if term == t && g.policy.site_durable => {
                    // Answered by `release_site_waiting` once another site has it.
                    g.site_waiting.push_back((index.0, reply));
                }
                (Some(term), Some(outcome @ Outcome::Meta(_))) if term == t => {
                    // Answered after `publish_cluster` (end of `process_readies`).
                    g.meta_replies.push((reply, outcome));
                }
                (Some(term), Some(outcome)) if term == t => {
                    let _ = reply.send(Ok(outcome));
                }
                _ => {
                    let _ = reply.send(Err(Refused::Superseded));
                }
            }
        }
        // Anything proposed below an applied index and still waiting was replaced.
        while let Some((&i, _)) = g.proposals.first_key_value() {
            if i > index.0 {
                break;
            }
            let (_, (_, reply)) = g.proposals.pop_first().expect("present");
            let _ = reply.send(Err(Refused::Superseded));
        }
    }
    if let Machine::Meta(_) = g.machine {
        if changed {
            debug_assert!(cluster.check().is_ok(), "{:?}", cluster.check());
        }
    }
    Ok(changed)
}
