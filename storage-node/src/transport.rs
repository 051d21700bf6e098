//! Node-to-node transport: Raft messages and forwarded requests over TCP.
//!
//! Wire format (versioned by [`PEER_PROTOCOL_VERSION`]; changelog: 1 — Hello, Raft,
//! Request/Response with Propose and Read; 2 — records that may carry a zstd batch of
//! frames, one connection per lane named in Hello; 3 — `RaftRefs` and `DedupMiss`, Raft
//! appends with blocks sent by reference, see [`crate::dedup`]; 4 — `Written`, the
//! acknowledgement mode of a forwarded `Propose`, and `Flush`; 5 — `SyncWanted`; 6 —
//! `Quarantine`, a rebooted node's quarantine after an unclean shutdown, and the
//! `VerifyDigests` and `Repair` requests of `volume verify`): see
//! [`crate::link`] for records. A
//! frame above [`FRAME_MAX_BYTES`] ends the connection. A connection starts with `Hello`
//! from the dialer.
//!
//! Each peer gets one outbound connection per [`Lane`] (control, log, bulk), so Raft's
//! heartbeats, votes and acknowledgements never wait behind appends or block copies.
//! Every connection has a reader task and a writer task; the writer drains a bounded
//! queue ([`PEER_QUEUE_FRAMES_MAX`]) in batches and flushes when it is empty, so many
//! small Raft messages share one syscall; to another site, batches are compressed and
//! paced by the link's cap. Raft messages that find the queue full are dropped (Raft
//! retransmits) and the peer is reported unreachable; requests wait for room.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::Message;
use roamdisk_core::codec;
use roamdisk_core::ids::{GroupId, NodeId, VolumeId};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::dedup::{self, ContentIndex, DedupStats, EntryRefs, Hash, MissSet};
use crate::link::{read_record, Lane, LinkStatus, SiteLink, WriterMode, BATCH_BYTES_MAX};
use crate::store::{Ack, Event, Outbox, Outcome, QuarantineReport, Refused, SyncWanted, Written};

pub const PEER_PROTOCOL_VERSION: u16 = 6;
/// Read buffer per peer connection: many small frames (heartbeats, acknowledgements,
/// `Written`) arrive in one read instead of two reads each.
const READ_BUFFER_BYTES: usize = 64 << 10;
/// Largest frame: a 32 MiB write plus headers.
pub const FRAME_MAX_BYTES: usize = codec::DECODE_LIMIT_BYTES;
/// Frames queued per connection before Raft messages are dropped.
pub const PEER_QUEUE_FRAMES_MAX: usize = 4096;
/// Delay between reconnection attempts to a peer.
pub const RECONNECT_DELAY_MS: u64 = 200;
/// How long a forwarded request may take before the caller gives up on that attempt.
pub const REQUEST_TIMEOUT_MS: u64 = 10_000;
/// Requests and reads carrying more than this many bytes go on the bulk lane.
pub const CONTROL_LANE_BYTES_MAX: usize = 64 << 10;
/// Voters (both sides of a joint configuration) a quarantine report may name; more is a
/// malformed report (raft-rs groups have at most a handful).
pub const QUARANTINE_VOTERS_MAX: usize = 32;
/// How long a receiver waits for another node of its site to resolve block references.
pub const SITE_LOOKUP_TIMEOUT_MS: u64 = 2_000;

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerFrame {
    Hello {
        version: u16,
        from: NodeId,
        lane: Lane,
    },
    Raft {
        group: GroupId,
        #[serde(with = "serde_bytes")]
        msg: Vec<u8>,
    },
    /// A Raft append to another site with blocks cut out and named by hash: the
    /// receiver restores the exact entries before Raft sees them.
    RaftRefs {
        group: GroupId,
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
        w: Written,
    },
    /// Something waits on `group`'s commit: sync the log this far now (leader to replica).
    SyncWanted {
        group: GroupId,
        want: SyncWanted,
    },
    /// Whether the sender is quarantined in `group` (it rebooted without a clean
    /// shutdown and may not vote yet), with the membership it knows.
    Quarantine {
        group: GroupId,
        report: QuarantineReport,
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
            PeerFrame::Hello { .. } | PeerFrame::Written { .. } | PeerFrame::SyncWanted { .. } => 0,
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
    },
    /// Answered once every write of `group` the receiver (its leader) acknowledged
    /// before is committed.
    Flush { group: GroupId },
    /// A linearizable read served by the receiver from its replica.
    Read {
        volume: VolumeId,
        offset: u64,
        len: u32,
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

/// The lane of a Raft message: appends and snapshots in order on the log lane, the rest
/// (small, and what elections and acknowledgements wait for) on the control lane.
pub fn raft_lane(msg: &Message) -> Lane {
    use raft::eraftpb::MessageType;
    match msg.get_msg_type() {
        MessageType::MsgAppend | MessageType::MsgSnapshot => Lane::Log,
        _ => Lane::Control,
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
    GroupStatus(Option<crate::store::GroupStatus>),
    /// One answer per hash asked, in order; `None` where the receiver has no such block.
    BlocksByHash(Vec<Option<ByteBuf>>),
    /// 32 bytes per block; `None` if the receiver has no digests for that marker (not
    /// applied yet, or applied while its replica was copying blocks).
    VerifyDigests(Option<ByteBuf>),
    Repaired(Result<(), WireRefused>),
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

/// Serves requests that arrive from peers.
pub trait RequestHandler: Send + Sync + 'static {
    fn handle(
        &self,
        req: PeerRequest,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = PeerResponse> + Send + '_>>;

    /// This node's blocks with these hashes, verified (one answer per hash, in order).
    fn local_blocks(&self, hashes: &[Hash]) -> Vec<Option<Vec<u8>>> {
        vec![None; hashes.len()]
    }
}

/// Why a request to a peer failed before it got an answer.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("no address known for node {0}")]
    NoAddress(NodeId),
    #[error("peer {0} did not answer in time")]
    Timeout(NodeId),
    #[error("connection to peer {0} closed")]
    Closed(NodeId),
}

struct Conn {
    tx: mpsc::Sender<PeerFrame>,
}

/// Where a peer is: its site and the address to dial.
#[derive(Clone, PartialEq, Eq)]
struct PeerAddr {
    site: String,
    addr: String,
}

pub struct Transport {
    me: NodeId,
    site: String,
    addrs: RwLock<HashMap<NodeId, PeerAddr>>,
    conns: Mutex<HashMap<(NodeId, Lane), Conn>>,
    /// Links to other sites, made on first use; caps from the node config.
    links: Mutex<HashMap<String, Arc<SiteLink>>>,
    caps: HashMap<String, u64>,
    store: flume::Sender<Event>,
    /// Requests waiting for their response, with the node they went to: a response
    /// comes back on the connection the request left on, so when that connection ends
    /// the requests fail at once instead of waiting for their timeout.
    pending: Mutex<HashMap<u64, (NodeId, oneshot::Sender<PeerResponse>)>>,
    next_id: AtomicU64,
    handler: RwLock<Option<Arc<dyn RequestHandler>>>,
    rt: tokio::runtime::Handle,
    shutdown: CancellationToken,
    /// Blocks this node stores, by content (filled by the store's checkpoints).
    content: Arc<ContentIndex>,
    /// Hashes other sites reported missing.
    misses: MissSet,
    dedup: DedupStats,
}

impl Transport {
    /// `caps`: bytes per second allowed on the log and bulk lanes to each remote site.
    pub fn new(
        me: NodeId,
        site: String,
        caps: HashMap<String, u64>,
        store: flume::Sender<Event>,
        rt: tokio::runtime::Handle,
        shutdown: CancellationToken,
    ) -> Arc<Transport> {
        Arc::new(Transport {
            me,
            site,
            addrs: RwLock::default(),
            conns: Mutex::default(),
            links: Mutex::default(),
            caps,
            store,
            pending: Mutex::default(),
            next_id: AtomicU64::new(1),
            handler: RwLock::new(None),
            rt,
            shutdown,
            content: Arc::default(),
            misses: MissSet::default(),
            dedup: DedupStats::default(),
        })
    }

    /// Where this node stores blocks by content (the store fills it, dedup reads it).
    pub fn content_index(&self) -> Arc<ContentIndex> {
        Arc::clone(&self.content)
    }

    pub fn dedup_counts(&self) -> dedup::DedupCounts {
        self.dedup.counts(&self.content)
    }

    /// The site of `node`, if known.
    fn site_of(&self, node: NodeId) -> Option<String> {
        self.addrs
            .read()
            .expect("addr lock")
            .get(&node)
            .map(|p| p.site.clone())
    }

    /// The other nodes of this node's site.
    fn site_peers(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self
            .addrs
            .read()
            .expect("addr lock")
            .iter()
            .filter(|(n, p)| p.site == self.site && **n != self.me)
            .map(|(n, _)| *n)
            .collect();
        v.sort();
        v
    }

    pub fn set_handler(&self, h: Arc<dyn RequestHandler>) {
        *self.handler.write().expect("handler lock") = Some(h);
    }

    /// Records (or changes) where `node` is: its site and the address to dial.
    pub fn set_peer(&self, node: NodeId, site: &str, addr: String) {
        if node == self.me {
            return;
        }
        let peer = PeerAddr {
            site: site.to_owned(),
            addr,
        };
        let mut addrs = self.addrs.write().expect("addr lock");
        if addrs.get(&node) != Some(&peer) {
            addrs.insert(node, peer);
            // A changed address: the next send dials anew.
            self.conns
                .lock()
                .expect("conn lock")
                .retain(|(n, _), _| *n != node);
        }
    }

    /// The links to other sites this node has used, with their counters.
    pub fn links(&self) -> Vec<LinkStatus> {
        let mut v: Vec<LinkStatus> = self
            .links
            .lock()
            .expect("link lock")
            .values()
            .map(|l| l.status())
            .collect();
        v.sort_by(|a, b| a.site.cmp(&b.site));
        v
    }

    /// How a writer to `node` on `lane` treats its frames.
    fn mode_for(&self, node: NodeId, lane: Lane) -> WriterMode {
        match self.site_of(node) {
            Some(site) if site != self.site => {
                let link = self
                    .links
                    .lock()
                    .expect("link lock")
                    .entry(site.clone())
                    .or_insert_with(|| {
                        Arc::new(SiteLink::new(site.clone(), self.caps.get(&site).copied()))
                    })
                    .clone();
                WriterMode {
                    lane,
                    link: Some(link),
                }
            }
            _ => WriterMode::local(lane),
        }
    }

    /// Accepts peer connections until shutdown.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "peer accept failed");
                        continue;
                    }
                },
                _ = self.shutdown.cancelled() => return,
            };
            let _ = stream.set_nodelay(true);
            let me = Arc::clone(&self);
            tokio::spawn(async move {
                if let Err(e) = me.run_conn(stream).await {
                    debug!(%peer, error = %e, "inbound peer connection ended");
                }
            });
        }
    }

    fn conn(self: &Arc<Self>, to: NodeId, lane: Lane) -> Option<mpsc::Sender<PeerFrame>> {
        let mut conns = self.conns.lock().expect("conn lock");
        if let Some(c) = conns.get(&(to, lane)) {
            if !c.tx.is_closed() {
                return Some(c.tx.clone());
            }
        }
        let addr = self.addrs.read().expect("addr lock").get(&to)?.addr.clone();
        let (tx, rx) = mpsc::channel(PEER_QUEUE_FRAMES_MAX);
        conns.insert((to, lane), Conn { tx: tx.clone() });
        let me = Arc::clone(self);
        self.rt
            .spawn(async move { me.dial_loop(to, lane, addr, rx).await });
        Some(tx)
    }

    /// Keeps one outbound connection to `to` alive, feeding it frames from `rx`.
    async fn dial_loop(
        self: Arc<Self>,
        to: NodeId,
        lane: Lane,
        addr: String,
        mut rx: mpsc::Receiver<PeerFrame>,
    ) {
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            match TcpStream::connect(&addr).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    info!(peer = %to, %addr, lane = lane.name(), "connected to peer");
                    match self.run_dialed(stream, to, lane, &mut rx).await {
                        Ok(()) => return,
                        Err(e) => debug!(peer = %to, error = %e, "peer connection lost"),
                    }
                }
                Err(e) => debug!(peer = %to, %addr, error = %e, "connect to peer failed"),
            }
            let _ = self.store.try_send(Event::Unreachable { node: to });
            // Frames queued while disconnected are stale: Raft retransmits its messages,
            // and requests fail now (the caller retries elsewhere) rather than reach the
            // peer after it restarts.
            while rx.try_recv().is_ok() {}
            self.fail_pending(to);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(RECONNECT_DELAY_MS)) => {}
                _ = self.shutdown.cancelled() => return,
            }
        }
    }

    async fn run_dialed(
        self: &Arc<Self>,
        stream: TcpStream,
        to: NodeId,
        lane: Lane,
        rx: &mut mpsc::Receiver<PeerFrame>,
    ) -> anyhow::Result<()> {
        let (rd, wr) = stream.into_split();
        let mut wr = BufWriter::with_capacity(256 << 10, wr);
        let hello = PeerFrame::Hello {
            version: PEER_PROTOCOL_VERSION,
            from: self.me,
            lane,
        };
        WriterMode::local(Lane::Control)
            .write_batch(&mut wr, &[hello])
            .await?;
        wr.flush().await?;
        let mode = self.mode_for(to, lane);
        let me = Arc::clone(self);
        let (reply_tx, mut reply_rx) = mpsc::channel::<PeerFrame>(PEER_QUEUE_FRAMES_MAX);
        let rd = BufReader::with_capacity(READ_BUFFER_BYTES, rd);
        let reader = tokio::spawn(async move { me.read_frames(rd, to, reply_tx).await });
        let result = async {
            loop {
                let frame = tokio::select! {
                    f = rx.recv() => match f { Some(f) => f, None => return Ok(()) },
                    f = reply_rx.recv() => match f {
                        Some(f) => {
                            mode.write_batch(&mut wr, &[f]).await?;
                            wr.flush().await?;
                            continue;
                        }
                        None => anyhow::bail!("reader ended"),
                    },
                    _ = self.shutdown.cancelled() => return Ok(()),
                };
                write_queued(&mut wr, &mode, frame, rx).await?;
            }
        }
        .await;
        reader.abort();
        result
    }

    /// An accepted connection: reads frames, answers requests on the same connection.
    async fn run_conn(self: Arc<Self>, stream: TcpStream) -> anyhow::Result<()> {
        let (rd, wr) = stream.into_split();
        let mut rd = BufReader::with_capacity(READ_BUFFER_BYTES, rd);
        let hello = read_record(&mut rd).await?.unwrap_or_default();
        let (from, lane) = match hello.as_slice() {
            [PeerFrame::Hello {
                version,
                from,
                lane,
            }] => {
                anyhow::ensure!(
                    *version == PEER_PROTOCOL_VERSION,
                    "peer {from} speaks protocol {version}, not {PEER_PROTOCOL_VERSION}"
                );
                debug!(peer = %from, lane = lane.name(), "peer connected");
                (*from, *lane)
            }
            _ => anyhow::bail!("peer did not start with Hello"),
        };
        let mode = self.mode_for(from, lane);
        let (tx, mut rx) = mpsc::channel::<PeerFrame>(PEER_QUEUE_FRAMES_MAX);
        let writer = tokio::spawn(async move {
            let mut wr = BufWriter::with_capacity(256 << 10, wr);
            while let Some(f) = rx.recv().await {
                write_queued(&mut wr, &mode, f, &mut rx).await?;
            }
            anyhow::Ok(())
        });
        let r = self.read_frames(rd, from, tx).await;
        writer.abort();
        r
    }

    /// Reads frames from `from` until the connection ends; requests are answered through
    /// `reply`. Frames are handled in order (an append with references waits for them to
    /// resolve before the next frame is read).
    async fn read_frames(
        self: Arc<Self>,
        mut rd: BufReader<tokio::net::tcp::OwnedReadHalf>,
        from: NodeId,
        reply: mpsc::Sender<PeerFrame>,
    ) -> anyhow::Result<()> {
        while let Some(frames) = read_record(&mut rd).await? {
            for frame in frames {
                match frame {
                    PeerFrame::RaftRefs { group, msg, refs } => {
                        self.receive_refs(from, group, msg, refs).await?
                    }
                    frame => self.receive(from, frame, &reply)?,
                }
            }
        }
        Ok(())
    }

    /// Restores an append sent with references and hands it to Raft, or drops it and
    /// tells the sender which blocks this site lacks (Raft then resends the entries).
    async fn receive_refs(
        self: &Arc<Self>,
        from: NodeId,
        group: GroupId,
        msg: Vec<u8>,
        refs: Vec<EntryRefs>,
    ) -> anyhow::Result<()> {
        let mut m = Message::default();
        m.merge_from_bytes(&msg)?;
        drop(msg);
        let want: Vec<Hash> = dedup::wanted(&refs)
            .into_iter()
            .filter(|h| h != dedup::zero_hash())
            .collect();
        anyhow::ensure!(
            want.len() <= FRAME_MAX_BYTES / crate::dedup::BLOCK,
            "append from {from} names {} blocks",
            want.len()
        );
        let mut found: HashMap<Hash, Vec<u8>> = HashMap::with_capacity(want.len());
        if !want.is_empty() {
            let handler = self.handler.read().expect("handler lock").clone();
            let mut missing = want.clone();
            for attempt in 0..=dedup::RESOLVE_RETRIES {
                if let Some(h) = &handler {
                    for (hash, b) in missing.iter().zip(h.local_blocks(&missing)) {
                        if let Some(b) = b {
                            found.insert(*hash, b);
                        }
                    }
                }
                missing.retain(|h| !found.contains_key(h));
                // Named by the index but not there yet: its entry is waiting to apply.
                let pending = missing.iter().any(|h| self.content.get(h).is_some());
                if missing.is_empty() || !pending || attempt == dedup::RESOLVE_RETRIES {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(dedup::RESOLVE_RETRY_MS)).await;
            }
            self.dedup
                .resolved_local
                .fetch_add(found.len() as u64, Ordering::Relaxed);
            for peer in self.site_peers() {
                if missing.is_empty() {
                    break;
                }
                let req = PeerRequest::BlocksByHash {
                    hashes: missing.clone(),
                };
                let timeout = Duration::from_millis(SITE_LOOKUP_TIMEOUT_MS);
                let Ok(PeerResponse::BlocksByHash(blocks)) =
                    self.request_within(peer, req, timeout).await
                else {
                    continue;
                };
                if blocks.len() != missing.len() {
                    continue;
                }
                for (hash, b) in missing.iter().zip(blocks) {
                    if let Some(b) = b.filter(|b| dedup::verify(hash, &b.0)) {
                        found.insert(*hash, b.0);
                        self.dedup.resolved_site.fetch_add(1, Ordering::Relaxed);
                    }
                }
                missing.retain(|h| !found.contains_key(h));
            }
            if !missing.is_empty() {
                self.dedup
                    .missed
                    .fetch_add(missing.len() as u64, Ordering::Relaxed);
                debug!(peer = %from, %group, missing = missing.len(), "append refers to blocks this site lacks; dropped");
                // On the control lane, ahead of this node's next Raft answer to `from`:
                // by the time the leader resends, it knows to send these as data.
                if let Some(tx) = self.conn(from, Lane::Control) {
                    let _ = tx.try_send(PeerFrame::DedupMiss { hashes: missing });
                }
                return Ok(());
            }
        }
        dedup::restore(&mut m, &refs, FRAME_MAX_BYTES, |h| {
            found.get(h).map(|b| b.as_slice())
        })?;
        self.index_remote_append(from, group, &m);
        let _ = self.store.try_send(Event::Raft { group, msg: m });
        Ok(())
    }

    /// An append from another site: its blocks are indexed as they arrive.
    fn index_remote_append(&self, from: NodeId, group: GroupId, m: &Message) {
        if m.get_msg_type() == raft::eraftpb::MessageType::MsgAppend
            && group != roamdisk_core::ids::META_GROUP
            && self.site_of(from).is_some_and(|s| s != self.site)
        {
            dedup::index_writes(m, VolumeId(group.0), &self.content);
        }
    }

    fn receive(
        &self,
        from: NodeId,
        frame: PeerFrame,
        reply: &mpsc::Sender<PeerFrame>,
    ) -> anyhow::Result<()> {
        match frame {
            PeerFrame::Hello { .. } => anyhow::bail!("unexpected Hello"),
            PeerFrame::RaftRefs { .. } => anyhow::bail!("RaftRefs handled by the reader"),
            PeerFrame::DedupMiss { hashes } => {
                anyhow::ensure!(
                    hashes.len() <= FRAME_MAX_BYTES / crate::dedup::BLOCK,
                    "DedupMiss from {from} names {} blocks",
                    hashes.len()
                );
                if let Some(site) = self.site_of(from) {
                    self.misses.insert(&site, &hashes);
                }
            }
            PeerFrame::Written { group, w } => {
                let _ = self.store.try_send(Event::Written { group, from, w });
            }
            PeerFrame::Quarantine { group, report } => {
                if report.voters.len() + report.outgoing.len() > QUARANTINE_VOTERS_MAX {
                    warn!(peer = %from, "quarantine report with too many voters; ignored");
                } else {
                    let _ = self.store.try_send(Event::Quarantine {
                        group,
                        from,
                        report,
                    });
                }
            }
            PeerFrame::SyncWanted { group, want } => {
                let _ = self.store.try_send(Event::SyncWanted { group, want });
            }
            PeerFrame::Raft { group, msg } => {
                let mut m = Message::default();
                m.merge_from_bytes(&msg)?;
                self.index_remote_append(from, group, &m);
                // Dropping under overload is safe: Raft retransmits.
                let _ = self.store.try_send(Event::Raft { group, msg: m });
            }
            PeerFrame::Request { id, req } => {
                let handler = self.handler.read().expect("handler lock").clone();
                let reply = reply.clone();
                tokio::spawn(async move {
                    let resp = match handler {
                        Some(h) => h.handle(req).await,
                        None => PeerResponse::Proposed(Err(WireRefused::Shutdown)),
                    };
                    let _ = reply.send(PeerFrame::Response { id, resp }).await;
                });
            }
            PeerFrame::Response { id, resp } => {
                if let Some((_, tx)) = self.pending.lock().expect("pending lock").remove(&id) {
                    let _ = tx.send(resp);
                }
            }
        }
        Ok(())
    }

    /// Fails every request waiting for an answer from `to` (its connection ended).
    fn fail_pending(&self, to: NodeId) {
        self.pending
            .lock()
            .expect("pending lock")
            .retain(|_, (node, _)| *node != to);
    }

    /// Sends a request to `to` and waits for its response.
    pub async fn request(
        self: &Arc<Self>,
        to: NodeId,
        req: PeerRequest,
    ) -> Result<PeerResponse, RequestError> {
        self.request_within(to, req, Duration::from_millis(REQUEST_TIMEOUT_MS))
            .await
    }

    /// Sends a request to `to` and waits up to `timeout` for its response.
    pub async fn request_within(
        self: &Arc<Self>,
        to: NodeId,
        req: PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, RequestError> {
        let tx = self
            .conn(to, req.lane())
            .ok_or(RequestError::NoAddress(to))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (done_tx, done_rx) = oneshot::channel();
        self.pending
            .lock()
            .expect("pending lock")
            .insert(id, (to, done_tx));
        let cleanup = |me: &Self| {
            me.pending.lock().expect("pending lock").remove(&id);
        };
        if tx.send(PeerFrame::Request { id, req }).await.is_err() {
            cleanup(self);
            return Err(RequestError::Closed(to));
        }
        match tokio::time::timeout(timeout, done_rx).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(_)) => {
                cleanup(self);
                Err(RequestError::Closed(to))
            }
            Err(_) => {
                cleanup(self);
                Err(RequestError::Timeout(to))
            }
        }
    }
}

/// Writes `first` and whatever else is queued, in batches of up to [`BATCH_BYTES_MAX`],
/// then flushes.
async fn write_queued<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut BufWriter<W>,
    mode: &WriterMode,
    first: PeerFrame,
    rx: &mut mpsc::Receiver<PeerFrame>,
) -> anyhow::Result<()> {
    let mut next = Some(first);
    crate::link::write_pipelined(wr, mode, || {
        let f = next.take().or_else(|| rx.try_recv().ok())?;
        let mut bytes = f.approx_len();
        let mut batch = vec![f];
        while bytes < BATCH_BYTES_MAX {
            match rx.try_recv() {
                Ok(f) => {
                    bytes += f.approx_len();
                    batch.push(f);
                }
                Err(_) => break,
            }
        }
        Some(batch)
    })
    .await?;
    wr.flush().await?;
    Ok(())
}

/// The store's view of the transport.
pub struct ArcOutbox(pub Arc<Transport>);

impl Outbox for ArcOutbox {
    fn send(&self, to: NodeId, group: GroupId, mut msg: Message) {
        let t = &self.0;
        let Some(tx) = t.conn(to, raft_lane(&msg)) else {
            let _ = t.store.try_send(Event::Unreachable { node: to });
            return;
        };
        // Appends of volume writes to another site: blocks that site stores go by hash.
        let mut refs = Vec::new();
        if msg.get_msg_type() == raft::eraftpb::MessageType::MsgAppend
            && group != roamdisk_core::ids::META_GROUP
            && !msg.entries.is_empty()
        {
            if let Some(site) = t.site_of(to).filter(|s| *s != t.site) {
                refs = dedup::cut_known_blocks(&mut msg, |h| {
                    // A block the site reported missing goes as data (once).
                    t.content.get(h).is_some() && !t.misses.take(&site, h)
                });
                let n: usize = refs.iter().map(|r| r.refs.len()).sum();
                t.dedup.refs_sent.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        let bytes = match msg.write_to_bytes() {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "encode raft message");
                return;
            }
        };
        let frame = if refs.is_empty() {
            PeerFrame::Raft { group, msg: bytes }
        } else {
            PeerFrame::RaftRefs {
                group,
                msg: bytes,
                refs,
            }
        };
        if tx.try_send(frame).is_err() {
            let _ = self.0.store.try_send(Event::Unreachable { node: to });
        }
    }

    fn written(&self, to: NodeId, group: GroupId, w: Written) {
        // Best effort: a lost report only means the write waits for its commit.
        if let Some(tx) = self.0.conn(to, Lane::Control) {
            let _ = tx.try_send(PeerFrame::Written { group, w });
        }
    }

    fn sync_wanted(&self, to: NodeId, group: GroupId, want: SyncWanted) {
        // Best effort: without it the voter syncs within `SYNC_LAZY_MAX` anyway.
        if let Some(tx) = self.0.conn(to, Lane::Control) {
            let _ = tx.try_send(PeerFrame::SyncWanted { group, want });
        }
    }

    fn quarantine(&self, to: NodeId, group: GroupId, report: QuarantineReport) {
        // Best effort: repeated every tick while the sender is quarantined.
        if let Some(tx) = self.0.conn(to, Lane::Control) {
            let _ = tx.try_send(PeerFrame::Quarantine { group, report });
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

    /// Appends to a capped remote link queue behind each other; a heartbeat sent after
    /// them travels on the control lane and arrives first, and the cap holds the rate.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn control_overtakes_bulk_on_a_capped_link() {
        use raft::eraftpb::{Entry, MessageType};
        const CAP: u64 = 2 << 20;
        let shutdown = CancellationToken::new();
        let rt = tokio::runtime::Handle::current();
        let (a_tx, _a_rx) = flume::bounded(1024);
        let (b_tx, b_rx) = flume::bounded(1024);
        let caps = HashMap::from([("far".to_string(), CAP)]);
        let a = Transport::new(
            NodeId(1),
            "near".into(),
            caps,
            a_tx,
            rt.clone(),
            shutdown.clone(),
        );
        let b = Transport::new(
            NodeId(2),
            "far".into(),
            HashMap::new(),
            b_tx,
            rt,
            shutdown.clone(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(Arc::clone(&b).serve(listener));
        a.set_peer(NodeId(2), "far", addr);
        let outbox = ArcOutbox(Arc::clone(&a));
        // Incompressible entries, so the cap sees every byte.
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let appends = 8;
        for i in 0..appends {
            let mut m = Message::default();
            m.set_msg_type(MessageType::MsgAppend);
            m.to = 2;
            m.index = i;
            let mut e = Entry::default();
            e.data = (0..(512 << 10))
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect::<Vec<u8>>()
                .into();
            m.entries = vec![e].into();
            outbox.send(NodeId(2), GroupId(5), m);
        }
        let start = std::time::Instant::now();
        let mut hb = Message::default();
        hb.set_msg_type(MessageType::MsgHeartbeat);
        hb.to = 2;
        outbox.send(NodeId(2), GroupId(5), hb);
        let mut order = Vec::new();
        while order.len() < appends as usize + 1 {
            match b_rx.recv_async().await.unwrap() {
                Event::Raft { msg, .. } => order.push(msg.get_msg_type()),
                _ => {}
            }
        }
        let hb_at = order
            .iter()
            .position(|t| *t == MessageType::MsgHeartbeat)
            .unwrap();
        assert!(
            hb_at < appends as usize,
            "heartbeat waited behind appends: {order:?}"
        );
        // 4 MiB at 2 MiB/s with a burst of one batch (256 KiB): at least 1.8 s.
        let took = start.elapsed().as_secs_f64();
        assert!(took >= 1.4, "the cap let 4 MiB through in {took:.2} s");
        let links = a.links();
        assert_eq!(links.len(), 1);
        let log = links[0].lanes.iter().find(|l| l.lane == Lane::Log).unwrap();
        assert!(log.wire_bytes >= appends * (512 << 10), "{links:?}");
        assert!(links[0].paced_secs > 1.0, "{links:?}");
        shutdown.cancel();
    }
}
