//! Node-to-node transport: Raft messages and forwarded requests over TCP.
//!
//! Wire format (versioned by [`PEER_PROTOCOL_VERSION`]; changelog: 1 — Hello, Raft,
//! Request/Response with Propose and Read): each frame is a 4-byte big-endian length
//! followed by `codec::encode(&PeerFrame)`; a frame above [`FRAME_MAX_BYTES`] ends the
//! connection. A connection starts with `Hello` from the dialer.
//!
//! Every connection has a reader task and a writer task; the writer drains a bounded
//! queue ([`PEER_QUEUE_FRAMES_MAX`]) and flushes when it is empty, so many small Raft
//! messages share one syscall. Raft messages that find the queue full are dropped (Raft
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
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::store::{Event, Outbox, Outcome, Refused};

pub const PEER_PROTOCOL_VERSION: u16 = 1;
/// Largest frame: a 32 MiB write plus headers.
pub const FRAME_MAX_BYTES: usize = codec::DECODE_LIMIT_BYTES;
/// Frames queued per connection before Raft messages are dropped.
pub const PEER_QUEUE_FRAMES_MAX: usize = 4096;
/// Delay between reconnection attempts to a peer.
pub const RECONNECT_DELAY_MS: u64 = 200;
/// How long a forwarded request may take before the caller gives up on that attempt.
pub const REQUEST_TIMEOUT_MS: u64 = 10_000;

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerFrame {
    Hello {
        version: u16,
        from: NodeId,
    },
    Raft {
        group: GroupId,
        #[serde(with = "serde_bytes")]
        msg: Vec<u8>,
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
        expires_unix_ms: u64,
    },
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

pub struct Transport {
    me: NodeId,
    addrs: RwLock<HashMap<NodeId, String>>,
    conns: Mutex<HashMap<NodeId, Conn>>,
    store: flume::Sender<Event>,
    /// Requests waiting for their response, with the node they went to: a response
    /// comes back on the connection the request left on, so when that connection ends
    /// the requests fail at once instead of waiting for their timeout.
    pending: Mutex<HashMap<u64, (NodeId, oneshot::Sender<PeerResponse>)>>,
    next_id: AtomicU64,
    handler: RwLock<Option<Arc<dyn RequestHandler>>>,
    rt: tokio::runtime::Handle,
    shutdown: CancellationToken,
}

impl Transport {
    pub fn new(
        me: NodeId,
        store: flume::Sender<Event>,
        rt: tokio::runtime::Handle,
        shutdown: CancellationToken,
    ) -> Arc<Transport> {
        Arc::new(Transport {
            me,
            addrs: RwLock::default(),
            conns: Mutex::default(),
            store,
            pending: Mutex::default(),
            next_id: AtomicU64::new(1),
            handler: RwLock::new(None),
            rt,
            shutdown,
        })
    }

    pub fn set_handler(&self, h: Arc<dyn RequestHandler>) {
        *self.handler.write().expect("handler lock") = Some(h);
    }

    /// Records (or changes) where `node` listens.
    pub fn set_address(&self, node: NodeId, addr: String) {
        if node == self.me {
            return;
        }
        let mut addrs = self.addrs.write().expect("addr lock");
        if addrs.get(&node) != Some(&addr) {
            addrs.insert(node, addr);
            // A changed address: the next send dials anew.
            self.conns.lock().expect("conn lock").remove(&node);
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
                if let Err(e) = me.run_conn(stream, None).await {
                    debug!(%peer, error = %e, "inbound peer connection ended");
                }
            });
        }
    }

    fn conn(self: &Arc<Self>, to: NodeId) -> Option<mpsc::Sender<PeerFrame>> {
        let mut conns = self.conns.lock().expect("conn lock");
        if let Some(c) = conns.get(&to) {
            if !c.tx.is_closed() {
                return Some(c.tx.clone());
            }
        }
        let addr = self.addrs.read().expect("addr lock").get(&to).cloned()?;
        let (tx, rx) = mpsc::channel(PEER_QUEUE_FRAMES_MAX);
        conns.insert(to, Conn { tx: tx.clone() });
        let me = Arc::clone(self);
        self.rt
            .spawn(async move { me.dial_loop(to, addr, rx).await });
        Some(tx)
    }

    /// Keeps one outbound connection to `to` alive, feeding it frames from `rx`.
    async fn dial_loop(
        self: Arc<Self>,
        to: NodeId,
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
                    info!(peer = %to, %addr, "connected to peer");
                    match self.run_dialed(stream, &mut rx).await {
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
        rx: &mut mpsc::Receiver<PeerFrame>,
    ) -> anyhow::Result<()> {
        let (rd, wr) = stream.into_split();
        let mut wr = BufWriter::with_capacity(256 << 10, wr);
        write_frame(
            &mut wr,
            &PeerFrame::Hello {
                version: PEER_PROTOCOL_VERSION,
                from: self.me,
            },
        )
        .await?;
        wr.flush().await?;
        let me = Arc::clone(self);
        let (reply_tx, mut reply_rx) = mpsc::channel::<PeerFrame>(PEER_QUEUE_FRAMES_MAX);
        let reader = tokio::spawn(async move { me.read_frames(rd, reply_tx).await });
        let result = async {
            loop {
                let frame = tokio::select! {
                    f = rx.recv() => match f { Some(f) => f, None => return Ok(()) },
                    f = reply_rx.recv() => match f { Some(f) => f, None => anyhow::bail!("reader ended") },
                    _ = self.shutdown.cancelled() => return Ok(()),
                };
                write_frame(&mut wr, &frame).await?;
                while let Ok(f) = rx.try_recv() {
                    write_frame(&mut wr, &f).await?;
                }
                wr.flush().await?;
            }
        }
        .await;
        reader.abort();
        result
    }

    /// An accepted connection: reads frames, answers requests on the same connection.
    async fn run_conn(
        self: Arc<Self>,
        stream: TcpStream,
        _from: Option<NodeId>,
    ) -> anyhow::Result<()> {
        let (mut rd, wr) = stream.into_split();
        match read_frame(&mut rd).await? {
            Some(PeerFrame::Hello { version, from }) => {
                anyhow::ensure!(
                    version == PEER_PROTOCOL_VERSION,
                    "peer {from} speaks protocol {version}, not {PEER_PROTOCOL_VERSION}"
                );
                debug!(peer = %from, "peer connected");
            }
            _ => anyhow::bail!("peer did not start with Hello"),
        }
        let (tx, mut rx) = mpsc::channel::<PeerFrame>(PEER_QUEUE_FRAMES_MAX);
        let writer = tokio::spawn(async move {
            let mut wr = BufWriter::with_capacity(256 << 10, wr);
            while let Some(f) = rx.recv().await {
                write_frame(&mut wr, &f).await?;
                while let Ok(f) = rx.try_recv() {
                    write_frame(&mut wr, &f).await?;
                }
                wr.flush().await?;
            }
            anyhow::Ok(())
        });
        let r = self.read_frames(rd, tx).await;
        writer.abort();
        r
    }

    /// Reads frames until the connection ends; requests are answered through `reply`.
    async fn read_frames(
        self: Arc<Self>,
        mut rd: tokio::net::tcp::OwnedReadHalf,
        reply: mpsc::Sender<PeerFrame>,
    ) -> anyhow::Result<()> {
        while let Some(frame) = read_frame(&mut rd).await? {
            match frame {
                PeerFrame::Hello { .. } => anyhow::bail!("unexpected Hello"),
                PeerFrame::Raft { group, msg } => {
                    let mut m = Message::default();
                    m.merge_from_bytes(&msg)?;
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
        let tx = self.conn(to).ok_or(RequestError::NoAddress(to))?;
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
        match tokio::time::timeout(Duration::from_millis(REQUEST_TIMEOUT_MS), done_rx).await {
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

/// The store's view of the transport.
pub struct ArcOutbox(pub Arc<Transport>);

impl Outbox for ArcOutbox {
    fn send(&self, to: NodeId, group: GroupId, msg: Message) {
        let Some(tx) = self.0.conn(to) else {
            let _ = self.0.store.try_send(Event::Unreachable { node: to });
            return;
        };
        let bytes = match msg.write_to_bytes() {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "encode raft message");
                return;
            }
        };
        if tx.try_send(PeerFrame::Raft { group, msg: bytes }).is_err() {
            let _ = self.0.store.try_send(Event::Unreachable { node: to });
        }
    }
}

async fn write_frame<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    frame: &PeerFrame,
) -> anyhow::Result<()> {
    let bytes = codec::encode(frame)?;
    anyhow::ensure!(
        bytes.len() <= FRAME_MAX_BYTES,
        "frame of {} bytes exceeds the maximum",
        bytes.len()
    );
    wr.write_u32(bytes.len() as u32).await?;
    wr.write_all(&bytes).await?;
    Ok(())
}

/// Reads one frame; `None` at a clean end of stream.
async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
) -> anyhow::Result<Option<PeerFrame>> {
    let len = match rd.read_u32().await {
        Ok(n) => n as usize,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    anyhow::ensure!(
        len <= FRAME_MAX_BYTES,
        "peer frame of {len} bytes exceeds the maximum {FRAME_MAX_BYTES}"
    );
    let mut buf = vec![0u8; len];
    rd.read_exact(&mut buf).await?;
    Ok(Some(codec::decode(&buf)?))
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

    #[tokio::test]
    async fn oversized_frame_is_refused_before_allocation() {
        let mut bytes = (u32::MAX).to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0; 16]);
        let mut rd = &bytes[..];
        assert!(read_frame(&mut rd).await.is_err());
    }
}
