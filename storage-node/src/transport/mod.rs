//! Node-to-node transport: Raft messages and forwarded requests over TCP.
//!
//! Wire format: the frames of [`crate::wire`] (versioned by [`PEER_PROTOCOL_VERSION`],
//! with its changelog), in the records of [`crate::link`]. A frame above
//! [`FRAME_MAX_BYTES`] ends the connection. A connection starts with `Hello` from the
//! dialer.
//!
//! Each peer gets one outbound connection per [`Lane`] (control, log, bulk), so Raft's
//! heartbeats, votes and acknowledgements never wait behind appends or block copies.
//! Every connection has a reader task and a writer task; the writer drains a bounded
//! queue ([`PEER_QUEUE_FRAMES_MAX`]) in batches and flushes when it is empty, so many
//! small Raft messages share one syscall; to another site, batches are compressed and
//! paced by the link's cap. Raft messages that find the queue full are dropped (Raft
//! retransmits) and the peer is reported unreachable; requests wait for room.
//!
//! Here: the [`Transport`] and its requests to peers; in `conn`, accepting and dialing
//! connections and their reader and writer tasks; in `receive`, the frames that arrive;
//! in `outbox`, [`ArcOutbox`], the store's view of the transport.
//!
//! [`PEER_PROTOCOL_VERSION`]: crate::wire::PEER_PROTOCOL_VERSION
//! [`FRAME_MAX_BYTES`]: crate::wire::FRAME_MAX_BYTES

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use raft::eraftpb::Message;
use roamdisk_core::ids::NodeId;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::dedup::{self, ContentIndex, DedupStats, Hash, MissSet};
use crate::link::{LinkStatus, SiteLink, WriterMode};
use crate::store::Event;
use crate::wire::{Lane, PeerFrame, PeerRequest, PeerResponse};

mod conn;
mod outbox;
mod receive;
#[cfg(test)]
mod tests;

pub use outbox::ArcOutbox;

/// Read buffer per peer connection: many small frames (heartbeats, acknowledgements,
/// `Written`) arrive in one read instead of two reads each.
const READ_BUFFER_BYTES: usize = 64 << 10;
/// Frames queued per connection before Raft messages are dropped.
pub const PEER_QUEUE_FRAMES_MAX: usize = 4096;
/// Delay between reconnection attempts to a peer.
pub const RECONNECT_DELAY_MS: u64 = 200;
/// How long a forwarded request may take before the caller gives up on that attempt.
pub const REQUEST_TIMEOUT_MS: u64 = 10_000;
/// How long a receiver waits for another node of its site to resolve block references.
pub const SITE_LOOKUP_TIMEOUT_MS: u64 = 2_000;

/// The lane of a Raft message: appends and snapshots in order on the log lane, the rest
/// (small, and what elections and acknowledgements wait for) on the control lane.
pub fn raft_lane(msg: &Message) -> Lane {
    use raft::eraftpb::MessageType;
    match msg.get_msg_type() {
        MessageType::MsgAppend | MessageType::MsgSnapshot => Lane::Log,
        _ => Lane::Control,
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
