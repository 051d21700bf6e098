//! The peer wire types, each in one place: [`PeerFrame`] and the requests and answers it
//! carries ([`PeerRequest`], [`PeerResponse`], [`BlocksReply`], [`ByteBuf`]), the wire
//! forms of the store's outcomes and refusals ([`WireOutcome`], [`WireRefused`]), the
//! [`Lane`] a frame travels on, and the protocol's version and limits. Frames are encoded
//! with `roamdisk_core::codec`; [`crate::link`] puts them in records (batched, maybe
//! compressed) and [`crate::transport`] carries those over TCP.

use roamdisk_core::codec;
use roamdisk_core::ids::{GroupId, NodeId, VolumeId};
use serde::{Deserialize, Serialize};

use crate::dedup::{EntryRefs, Hash};
use roamdisk_core::node::{
    Ack, Divergence, GroupStatus, Outcome, QuarantineReport, Refused, ReplicaReport, SyncWanted,
    TailReport, Written,
};

/// The peer protocol's version, sent in `Hello`.
///
/// Changelog: 1 — Hello, Raft, Request/Response with Propose and Read; 2 — records that
/// may carry a zstd batch of frames, one connection per lane named in Hello; 3 —
/// `RaftRefs` and `DedupMiss`, Raft appends with blocks sent by reference, see
/// [`crate::dedup`]; 4 — `Written`, the acknowledgement mode of a forwarded `Propose`, and
/// `Flush`; 5 — `SyncWanted`; 6 — `Quarantine`, a rebooted node's quarantine after an
/// unclean shutdown, and the `VerifyDigests` and `Repair` requests of `volume verify`;
/// 7 — a leader's `Quarantine` answer carries its log's end (`LeaderLog`); 8 — every
/// frame about a group carries the sender's epoch of it (a receiver drops another
/// epoch's: fencing after a failover), requests carry the epoch they belong to, `Tail`
/// (a leader's log end and lag, for failover plans), `ReplicaReport`, the `Fenced`
/// refusal, and `DivergentBlocks` (what a fenced replica holds); 9 — `ReplicaReport`
/// says from which index a replica's copied blocks are whole (`whole_at`); 10 — a
/// `ReplicaReport` request for `execute` asks the replica to hold still (`hold`).
/// See [`crate::link`] for records. A frame above [`FRAME_MAX_BYTES`] ends the
/// connection. A connection starts with `Hello` from the dialer.
pub const PEER_PROTOCOL_VERSION: u16 = 10;
/// Largest frame: a 32 MiB write plus headers.
pub const FRAME_MAX_BYTES: usize = codec::DECODE_LIMIT_BYTES;
/// Requests and reads carrying more than this many bytes go on the bulk lane.
pub const CONTROL_LANE_BYTES_MAX: usize = 64 << 10;
/// Voters (both sides of a joint configuration) a quarantine report may name; more is a
/// malformed report (raft-rs groups have at most a handful).
pub const QUARANTINE_VOTERS_MAX: usize = 32;

/// The connection a frame travels on (one per lane and peer); see [`crate::link`] for
/// what goes on each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lane {
    Control,
    Log,
    Bulk,
}

impl Lane {
    pub const ALL: [Lane; 3] = [Lane::Control, Lane::Log, Lane::Bulk];

    pub fn name(self) -> &'static str {
        match self {
            Lane::Control => "control",
            Lane::Log => "log",
            Lane::Bulk => "bulk",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerFrame {
    Hello {
        version: u16,
        from: NodeId,
        lane: Lane,
    },
    Raft {
        group: GroupId,
        epoch: u64,
        #[serde(with = "serde_bytes")]
        msg: Vec<u8>,
    },
    /// A Raft append to another site with blocks cut out and named by hash: the
    /// receiver restores the exact entries before Raft sees them.
    RaftRefs {
        group: GroupId,
        epoch: u64,
        #[serde(with = "serde_bytes")]
        msg: Vec<u8>,
        refs: Vec<EntryRefs>,
    },
    /// The receiver's site does not store these blocks: send them as data.
    DedupMiss {
        hashes: Vec<Hash>,
    },
    /// The sender wrote (not yet synced) its log of `group` this far: to its leader.
    Written {
        group: GroupId,
        epoch: u64,
        w: Written,
    },
    /// Something waits on `group`'s commit: sync the log this far now (leader to replica).
    SyncWanted {
        group: GroupId,
        epoch: u64,
        want: SyncWanted,
    },
    /// Whether the sender is quarantined in `group` (it rebooted without a clean
    /// shutdown and may not vote yet), with the membership it knows.
    Quarantine {
        group: GroupId,
        epoch: u64,
        report: QuarantineReport,
    },
    /// A leader's log end and the receiver's lag (leader to a replica at another site).
    Tail {
        group: GroupId,
        epoch: u64,
        tail: TailReport,
    },
    Request {
        id: u64,
        req: PeerRequest,
    },
    Response {
        id: u64,
        resp: PeerResponse,
    },
}

impl PeerFrame {
    /// Roughly the encoded size, to bound batches before encoding them.
    pub fn approx_len(&self) -> usize {
        16 + match self {
            PeerFrame::Hello { .. }
            | PeerFrame::Written { .. }
            | PeerFrame::SyncWanted { .. }
            | PeerFrame::Tail { .. } => 0,
            PeerFrame::Quarantine { report, .. } => {
                8 * (report.voters.len() + report.outgoing.len())
            }
            PeerFrame::Raft { msg, .. } => msg.len(),
            PeerFrame::RaftRefs { msg, refs, .. } => {
                msg.len() + refs.iter().map(|r| 8 + 36 * r.refs.len()).sum::<usize>()
            }
            PeerFrame::DedupMiss { hashes } => 32 * hashes.len(),
            PeerFrame::Request { req, .. } => req.approx_len(),
            PeerFrame::Response { resp, .. } => match resp {
                PeerResponse::Read(Ok(b)) => b.0.len(),
                PeerResponse::Blocks(Ok(r)) => r
                    .blocks
                    .iter()
                    .map(|(_, b)| 8 + b.as_ref().map_or(0, |b| b.0.len()))
                    .sum(),
                PeerResponse::BlocksByHash(bs) => bs
                    .iter()
                    .map(|b| 8 + b.as_ref().map_or(0, |b| b.0.len()))
                    .sum(),
                PeerResponse::VerifyDigests(Some(b)) => b.0.len(),
                _ => 64,
            },
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerRequest {
    /// Propose an entry in `group` on the receiving node (which should be its leader).
    /// The receiver refuses it once the wall clock passes `expires_unix_ms`: by then the
    /// sender has given up on it (and may have answered its client with an error), so a
    /// copy delayed in the network must not land after a newer write.
    Propose {
        group: GroupId,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        /// When the receiver answers (see [`Ack`]).
        ack: Ack,
        expires_unix_ms: u64,
        /// The epoch of the group the request belongs to (`None`: the receiver's).
        epoch: Option<u64>,
    },
    /// Answered once every write of `group` the receiver (its leader) acknowledged
    /// before is committed.
    Flush { group: GroupId, epoch: Option<u64> },
    /// A linearizable read served by the receiver from its replica.
    Read {
        volume: VolumeId,
        offset: u64,
        len: u32,
        epoch: Option<u64>,
    },
    /// Catch-up copy: the blocks from `start_block` whose blake3 differs from `hashes`
    /// (32 bytes per block, all zero for a block that reads as zeros).
    FetchBlocks {
        volume: VolumeId,
        start_block: u64,
        #[serde(with = "serde_bytes")]
        hashes: Vec<u8>,
    },
    /// Status of one group on the receiver (its leader knows every replica's lag).
    GroupStatus { group: GroupId },
    /// Blocks the receiver stores with these blake3 hashes (another node of its site
    /// resolving references).
    BlocksByHash { hashes: Vec<Hash> },
    /// The digests the receiver took at verify marker (`id`, `first_block`) of `volume`
    /// (waits a little for the marker to apply).
    VerifyDigests {
        volume: VolumeId,
        id: u64,
        first_block: u64,
    },
    /// The receiver's replica of `volume` differs from the others: copy the differing
    /// blocks from the leader (verify's repair).
    Repair { volume: VolumeId },
    /// What the receiver's replica of `group` knows that a failover plan needs; `hold`:
    /// for a failover being executed, it installs no snapshot for a while
    /// (`roamdisk_core::node::failover::FAILOVER_HOLD`).
    ReplicaReport { group: GroupId, hold: bool },
    /// What the receiver's fenced replica of `volume` holds beyond the failover's
    /// divergence point (its log's divergent tail, summarized).
    Divergent { volume: VolumeId },
}

impl PeerRequest {
    fn approx_len(&self) -> usize {
        match self {
            PeerRequest::Propose { data, .. } => data.len(),
            PeerRequest::FetchBlocks { hashes, .. } => hashes.len(),
            PeerRequest::BlocksByHash { hashes } => 32 * hashes.len(),
            _ => 32,
        }
    }

    /// The lane a request (and so its response) travels on.
    pub fn lane(&self) -> Lane {
        match self {
            PeerRequest::FetchBlocks { .. } | PeerRequest::BlocksByHash { .. } => Lane::Bulk,
            PeerRequest::Read { len, .. } if *len as usize > CONTROL_LANE_BYTES_MAX => Lane::Bulk,
            PeerRequest::Propose { data, .. } if data.len() > CONTROL_LANE_BYTES_MAX => Lane::Bulk,
            _ => Lane::Control,
        }
    }
}

/// Answer to `FetchBlocks`.
#[derive(Debug, Serialize, Deserialize)]
pub struct BlocksReply {
    /// The sender's applied index after it read the blocks: the copy reflects a state at
    /// or before it.
    pub applied: u64,
    /// (block offset within the request, contents; `None` = reads as zeros).
    pub blocks: Vec<(u32, Option<ByteBuf>)>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerResponse {
    Proposed(Result<WireOutcome, WireRefused>),
    Read(Result<ByteBuf, WireRefused>),
    Blocks(Result<BlocksReply, WireRefused>),
    GroupStatus(Option<GroupStatus>),
    /// One answer per hash asked, in order; `None` where the receiver has no such block.
    BlocksByHash(Vec<Option<ByteBuf>>),
    /// 32 bytes per block; `None` if the receiver has no digests for that marker (not
    /// applied yet, or applied while its replica was copying blocks).
    VerifyDigests(Option<ByteBuf>),
    Repaired(Result<(), WireRefused>),
    ReplicaReport(Option<ReplicaReport>),
    Divergent(Result<Divergence, WireRefused>),
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ByteBuf(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// `Outcome` on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub enum WireOutcome {
    Volume,
    Meta(roamdisk_core::meta::MetaResult),
}

/// `Refused` on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub enum WireRefused {
    NotLeader {
        group: GroupId,
        leader: Option<NodeId>,
    },
    NoGroup(GroupId),
    Superseded,
    Busy,
    Shutdown,
    Failed(String),
    Recovering(GroupId),
    Fenced {
        group: GroupId,
        epoch: u64,
        asked: u64,
    },
}

impl From<Refused> for WireRefused {
    fn from(r: Refused) -> Self {
        match r {
            Refused::NotLeader { group, leader } => WireRefused::NotLeader { group, leader },
            Refused::NoGroup(g) => WireRefused::NoGroup(g),
            Refused::Superseded => WireRefused::Superseded,
            Refused::Busy => WireRefused::Busy,
            Refused::Shutdown => WireRefused::Shutdown,
            Refused::Failed(s) => WireRefused::Failed(s),
            Refused::Recovering(g) => WireRefused::Recovering(g),
            Refused::Fenced {
                group,
                epoch,
                asked,
            } => WireRefused::Fenced {
                group,
                epoch,
                asked,
            },
        }
    }
}

impl From<WireRefused> for Refused {
    fn from(r: WireRefused) -> Self {
        match r {
            WireRefused::NotLeader { group, leader } => Refused::NotLeader { group, leader },
            WireRefused::NoGroup(g) => Refused::NoGroup(g),
            WireRefused::Superseded => Refused::Superseded,
            WireRefused::Busy => Refused::Busy,
            WireRefused::Shutdown => Refused::Shutdown,
            WireRefused::Failed(s) => Refused::Failed(s),
            WireRefused::Recovering(g) => Refused::Recovering(g),
            WireRefused::Fenced {
                group,
                epoch,
                asked,
            } => Refused::Fenced {
                group,
                epoch,
                asked,
            },
        }
    }
}

impl From<Outcome> for WireOutcome {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Volume => WireOutcome::Volume,
            Outcome::Meta(r) => WireOutcome::Meta(r),
        }
    }
}

impl From<WireOutcome> for Outcome {
    fn from(o: WireOutcome) -> Self {
        match o {
            WireOutcome::Volume => Outcome::Volume,
            WireOutcome::Meta(r) => Outcome::Meta(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let f = PeerFrame::Request {
            id: 9,
            req: PeerRequest::Propose {
                group: GroupId(3),
                data: vec![1, 2, 3],
                ack: Ack::Written,
                expires_unix_ms: 5,
                epoch: Some(2),
            },
        };
        let bytes = codec::encode(&f).unwrap();
        match codec::decode::<PeerFrame>(&bytes).unwrap() {
            PeerFrame::Request {
                id: 9,
                req: PeerRequest::Propose { group, data, .. },
            } => {
                assert_eq!(group, GroupId(3));
                assert_eq!(data, vec![1, 2, 3]);
            }
            other => panic!("{other:?}"),
        }
        let r = PeerFrame::Response {
            id: 1,
            resp: PeerResponse::Read(Ok(ByteBuf(vec![9; 10]))),
        };
        assert!(matches!(
            codec::decode::<PeerFrame>(&codec::encode(&r).unwrap()).unwrap(),
            PeerFrame::Response { id: 1, .. }
        ));
    }
}
