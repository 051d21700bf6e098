//! What goes into and comes out of the node core: request ids, answers, effects, and the
//! status it reports.

use raft::eraftpb::Message;
use serde::{Deserialize, Serialize};

use crate::ids::{GroupId, LogIndex, NodeId, VolumeId};
use crate::lag::Lag;
use crate::logstore::LogBatch;
use crate::meta::MetaResult;

/// A caller's request (proposal, flush, read) as the core knows it. The driver chooses
/// the ids and maps each answer back to its caller; the core answers every id it was
/// given exactly once ([`Effect::Answer`]), also when it refuses it at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReqId(pub u64);

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
    /// The request belongs to an epoch of the group that a forced failover ended (or one
    /// this node does not know yet): it must not be served here.
    #[error(
        "group {group} was failed over: epoch {epoch} is current, the request was of epoch {asked}"
    )]
    Fenced {
        group: GroupId,
        epoch: u64,
        asked: u64,
    },
}

/// What an answered request produced.
// Metadata answers are rare; boxing them would cost every volume answer an indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A volume write or flush is done, or a read may be served.
    Volume,
    /// A metadata command applied, with its result.
    Meta(MetaResult),
}

pub type Answer = Result<Outcome, Refused>;

/// When a proposal is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ack {
    /// Committed (a quorum synced it) and applied here: durable.
    Committed,
    /// A volume write: once a quorum of voters has written its entry, synced or not
    /// (falls back to `Committed` for site-durable volumes and the metadata group).
    Written,
}

/// A follower's report that it wrote its log up to `index` (whose entry has `log_term`)
/// while in `term`; see [`crate::written`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Written {
    pub term: u64,
    pub index: u64,
    pub log_term: u64,
}

/// A leader's request that a replica sync its log of the group up to `index` at once
/// (something waits for the commit), sent in the leader's `term`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncWanted {
    pub term: u64,
    pub index: u64,
}

/// What the driver must do. Effects are executed in the order they were emitted: an
/// answer that follows an [`Effect::Apply`] may rely on the data being applied.
#[derive(Debug)]
pub enum Effect {
    /// Send a Raft message of `group` (of its `epoch`) to `to`. Every frame about a
    /// group carries the sender's epoch of it; the receiver drops any other epoch's.
    Send {
        to: NodeId,
        group: GroupId,
        epoch: u64,
        msg: Message,
    },
    /// Tell the leader `to` how far this node wrote `group`'s log (best effort).
    Written {
        to: NodeId,
        group: GroupId,
        epoch: u64,
        w: Written,
    },
    /// Ask replica `to` to sync `group`'s log now (best effort).
    SyncWanted {
        to: NodeId,
        group: GroupId,
        epoch: u64,
        want: SyncWanted,
    },
    /// Tell `to` whether this node is quarantined in `group`, with the membership it
    /// knows (see `recovery`).
    Quarantine {
        to: NodeId,
        group: GroupId,
        epoch: u64,
        report: QuarantineReport,
    },
    /// Tell replica `to` at another site how far the leader's log reaches and how far
    /// behind `to` is (best effort, every `TAIL_REPORT_INTERVAL`): what a failover to
    /// that site states as its loss once the home is gone.
    Tail {
        to: NodeId,
        group: GroupId,
        epoch: u64,
        tail: TailReport,
    },
    /// Start a sync of the log store covering everything written so far; report its end
    /// with [`super::NodeCore::log_synced`]. Never emitted while one is in flight.
    StartSync,
    /// Apply the volume command of entry `index` to the volume's data (its extent file).
    /// Applying an entry twice leaves the same bytes (commands are idempotent).
    Apply {
        volume: VolumeId,
        index: LogIndex,
        data: Vec<u8>,
    },
    /// Hash blocks `first_block..first_block + count` of the volume's data as they are
    /// now, at entry `index` (a `VolumeCommand::Verify` applied here, in log order: every
    /// replica hashes the same state), and keep the digests for verify run `id`.
    Verify {
        volume: VolumeId,
        index: LogIndex,
        id: u64,
        first_block: u64,
        count: u32,
    },
    /// The answer to a request.
    Answer { id: ReqId, answer: Answer },
    /// This node now sees `leader` as the leader of `group` (`None`: unknown).
    Leader {
        group: GroupId,
        leader: Option<NodeId>,
    },
    /// The cluster metadata changed ([`super::NodeCore::cluster`]): publish it. Emitted
    /// before the answers to the metadata proposals that changed it.
    ClusterChanged,
    /// A replica of this volume now lives on this node: create its (empty, sparse) data
    /// of `size` bytes, or open what is there.
    VolumeCreated { volume: VolumeId, size: u64 },
    /// The volume grew.
    VolumeGrown { volume: VolumeId, size: u64 },
    /// The volume left this node: delete its data. Its log is already gone.
    VolumeRemoved { volume: VolumeId },
    /// The replicas that must copy their blocks from a healthy replica, each with the
    /// index its copy is for (its recovery point). A running copy whose recovery point
    /// is no longer listed must start again: the blocks it copied may predate the new
    /// point.
    Recovering(Vec<(GroupId, LogIndex)>),
    /// Observations for a checker (only with `NodeConfig::observe`).
    Note(Note),
}

/// Facts the simulation checks its invariants against; never emitted on a storage node.
#[derive(Debug, Clone)]
pub enum Note {
    /// The commit index of `group` moved from `from` to `to` on its leader, under this
    /// membership (its voters, and the outgoing ones while joint).
    LeaderCommit {
        group: GroupId,
        from: u64,
        to: u64,
        voters: Vec<u64>,
        outgoing: Vec<u64>,
    },
    /// An entry was delivered as committed to this replica.
    Committed {
        group: GroupId,
        entry: raft::eraftpb::Entry,
    },
    /// A metadata entry was applied; `hash` is the blake3 of the encoded state after it.
    MetaApplied { index: u64, hash: [u8; 32] },
    /// Proposal `id` was answered before its commit (`Ack::Written`): its entry is at
    /// `index` in `term`.
    AnsweredEarly {
        id: ReqId,
        group: GroupId,
        index: u64,
        term: u64,
    },
    /// Proposal `id`'s entry committed and applied at `index` in `term` (it is answered
    /// now, or once another site has it for a site-durable volume).
    CommittedAt {
        id: ReqId,
        group: GroupId,
        index: u64,
        term: u64,
    },
    /// A flush was answered: everything answered before it was committed up to `commit`.
    Flushed { group: GroupId, commit: u64 },
    /// The quarantine of `group` ended before catching up with a leader: at least half of its
    /// voters were quarantined, or it lasted `NodeConfig::quarantine_max`. Writes
    /// answered early that only quarantined voters had written may be lost from then on.
    QuarantineEnded { group: GroupId, why: QuarantineEnd },
    /// This replica of `group` changed epoch (a failover): notes and answers after it are
    /// of `epoch`; `fenced`: it was fenced instead, and stays in its old epoch.
    Epoch {
        group: GroupId,
        epoch: u64,
        fenced: bool,
    },
}

/// Why a quarantine ended before catching up with a leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuarantineEnd {
    /// At least half of the voters were quarantined: the others could never elect a
    /// leader without them.
    HalfQuarantined,
    /// It lasted `NodeConfig::quarantine_max` without catching up with a leader: a voter that holds what
    /// this one forgot may be gone for good, and waiting longer would stop the group.
    TimedOut,
}

/// What a node tells a voter of a group about its quarantine (see `recovery`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineReport {
    /// The sender is quarantined; `false`: an answer from a node that is not, so that a
    /// quarantined one learns a newer membership.
    pub quarantined: bool,
    /// The membership the sender applied last, at `conf_index`.
    pub conf_index: u64,
    pub voters: Vec<u64>,
    pub outgoing: Vec<u64>,
    /// Sent by the group's leader: its log's end (see [`LeaderLog`]).
    pub leader_log: Option<LeaderLog>,
}

/// A leader's log end, as it tells a quarantined voter: that voter ends its quarantine
/// once its own synced log holds this entry (see `recovery`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderLog {
    /// The leader's term.
    pub term: u64,
    /// Its last entry's index and term.
    pub last: u64,
    pub last_term: u64,
}

/// A leader's report to a replica at another site (see [`Effect::Tail`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TailReport {
    /// The leader's term and last log index.
    pub term: u64,
    pub last: u64,
    /// The leader's wall clock (Unix ms) when it sent the report.
    pub unix_ms: u64,
    /// How far behind the receiver is, as the leader sees it (what `status` reports).
    pub lag: Lag,
}

/// What a replica knows that a failover plan needs (see `roamdisk_core::failover`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplicaReport {
    pub node: u64,
    pub epoch: u64,
    pub term: u64,
    pub last_index: u64,
    pub last_term: u64,
    /// Highest index it knows committed, and the entries' home-site times (Unix ms, from
    /// the leader's stamp; `None` if the entry is compacted or unstamped).
    pub commit: u64,
    pub applied: u64,
    pub last_unix_ms: Option<u64>,
    pub commit_unix_ms: Option<u64>,
    /// It copies blocks after a snapshot: its data is not whole.
    pub recovering: bool,
    /// Its block copy read the source up to this index: blocks copied then may hold
    /// writes of entries up to it, so its data is one state of the volume only once it
    /// has applied this far (0: no copy). A replica whose log ends before it holds a
    /// mix of states no replica ever had, and is never a failover's source.
    pub whole_at: u64,
    /// A failover fenced it.
    pub fenced: bool,
    /// Milliseconds since it last heard from its group's leader, and that leader.
    pub heard_leader_ms_ago: Option<u64>,
    pub leader: Option<u64>,
    /// The leader's last tail report to it, with its age here in ms.
    pub tail: Option<TailReport>,
    pub tail_ms_ago: Option<u64>,
}

/// A fenced replica's divergent writes: the entries of its log past the divergence
/// point, summarized (see `failover`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Divergence {
    pub node: u64,
    /// Its log's last index, and the index from which it diverges.
    pub last_index: u64,
    pub from_index: u64,
    /// Entries past the divergence point, the writes among them, the 4 KiB blocks they
    /// touch and the bytes they carry.
    pub entries: u64,
    pub writes: u64,
    pub blocks: u64,
    pub bytes: u64,
    /// Home-site times of the first and last of them (Unix ms).
    pub first_unix_ms: Option<u64>,
    pub last_unix_ms: Option<u64>,
    /// The log still holds every divergent entry (compaction may have dropped the first
    /// ones: the replica's data still holds their effect, unreported).
    pub complete: bool,
}

/// A replica's role in its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Follower,
    Candidate,
    PreCandidate,
    Leader,
}

impl From<raft::StateRole> for Role {
    fn from(r: raft::StateRole) -> Role {
        match r {
            raft::StateRole::Follower => Role::Follower,
            raft::StateRole::Candidate => Role::Candidate,
            raft::StateRole::PreCandidate => Role::PreCandidate,
            raft::StateRole::Leader => Role::Leader,
        }
    }
}

/// Status of one group on this node, for `status` and metrics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupStatus {
    pub group: u64,
    pub role: Role,
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
    /// This node rebooted without a clean shutdown and may not vote in the group yet.
    #[serde(default)]
    pub quarantined: bool,
    /// The group's epoch on this node; fenced by a failover (keeps its divergent writes).
    #[serde(default)]
    pub epoch: u64,
    #[serde(default)]
    pub fenced: bool,
    /// Answers are held here: this node has no lease from the metadata quorum, or a
    /// failover's fencing wait has not passed.
    #[serde(default)]
    pub suspended: bool,
    /// A site-durable volume's leader commits on the home quorum alone (`degrade-after`:
    /// no other site took its writes in time).
    #[serde(default)]
    pub degraded: bool,
    /// Raft membership as this replica has applied it.
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// In joint consensus (leaving it is automatic).
    pub joint: bool,
}

impl GroupStatus {
    pub fn is_leader(&self) -> bool {
        self.role == Role::Leader
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerStatus {
    pub node: u64,
    pub matched: u64,
    pub learner: bool,
    pub lag: Lag,
}

/// A checkpoint the core asked for ([`super::NodeCore::checkpoint_begin`]): make every
/// listed volume's data durable as applied up to its index (fsync its extents), then
/// hand it back with [`super::NodeCore::checkpoint_end`].
#[derive(Debug)]
pub struct CheckpointPlan {
    /// Volumes and the applied index their data must be durable at.
    pub volumes: Vec<(VolumeId, LogIndex)>,
    /// What the core itself records with it (applied indexes, the metadata state).
    pub(super) batch: LogBatch,
    pub(super) groups: Vec<(GroupId, LogIndex)>,
    /// The checkpoint's sequence number.
    pub(super) seq: u64,
    /// `NodeCore::recoveries` when it began.
    pub(super) recoveries: u64,
}
