//! The node's API for everything above the store: proposing anywhere in the cluster
//! (locally if this node leads the group, else forwarded to the leader), linearizable
//! reads, and status. The NBD backend and the admin API are built on it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use roamdisk_core::ids::{GroupId, NodeId, VolumeId, META_GROUP};
use roamdisk_core::meta::{ClusterState, MetaCommand, MetaResult, VolumeInfo};
use roamdisk_nbd::backend::ReadChunk;
use roamdisk_nbd::file::RawFile;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::dedup::{self, Hash};
use crate::store::{Ack, ClusterView, Event, GroupStatus, LeaderMap, Outcome, Refused};
use crate::transport::{
    BlocksReply, ByteBuf, PeerRequest, PeerResponse, RequestHandler, Transport, WireRefused,
    REQUEST_TIMEOUT_MS,
};
use roamdisk_core::stats::StoreStats;

/// Blocks per catch-up request (1 MiB of data at most per reply). 64 (256 KiB, smaller
/// bursts into a WAN's queue) cut the catch-up rate from 44.7 to 36 MiB/s: each request
/// costs a read barrier and a status round trip through the store thread.
pub const CATCH_UP_CHUNK_BLOCKS: u64 = 256;
/// Catch-up requests in flight at the least (a copy starts at twice this): 4 × 1 MiB
/// covers a 50 MiB/s × 40 ms link even when no reply compresses.
pub const CATCH_UP_WINDOW_MIN: usize = 4;
/// At the most: bounds the memory a copy takes on both sides (a reply is 1 MiB at most).
pub const CATCH_UP_WINDOW_MAX: usize = 32;
/// Queueing a copy may add to a request's round trip before its window shrinks. The
/// window follows the link's delay, not a fixed count: chunks that differ in nothing (most
/// of a volume) come back in one round trip, and 8 at a time left the link idle between
/// them (a 240 MiB catch-up copy of a 1 GiB volume: 6.6 s with 8, 5.0 s with the window,
/// which reached 32); with replies that do not compress, 8 MiB queued is 170 ms ahead of
/// the other bulk traffic to that site.
pub const CATCH_UP_QUEUE_TARGET_MS: u64 = 25;
/// Catch-up chunks a node reads and hashes at once (each a millisecond or more of a core
/// for 1 MiB of data; 0.7 ms on average measured on a serving leader). Unbounded, two
/// copies of 32 chunks each could put 64 hashing tasks on a 2-core node's blocking pool;
/// two keep serving well above a WAN link's rate.
pub const CATCH_UP_IO_MAX: usize = 2;

/// How long a proposal or read keeps retrying (leader elections, forwarding) before it
/// fails. Longer than an election plus a reconnect.
pub const REQUEST_DEADLINE_MS: u64 = 30_000;
/// Longest pause between retries.
pub const RETRY_BACKOFF_MAX_MS: u64 = 200;

pub struct Node {
    pub me: NodeId,
    pub site: String,
    store: flume::Sender<Event>,
    transport: Arc<Transport>,
    cluster: ClusterView,
    leaders: LeaderMap,
    /// Leaders of groups without a replica here, as learned from forwarded requests
    /// (answers and NotLeader hints), so a write at a site without a replica goes
    /// straight to the leader: one WAN round trip, not a search.
    remote_leaders: Mutex<HashMap<GroupId, NodeId>>,
    volumes_dir: PathBuf,
    read_handles: Mutex<HashMap<VolumeId, Arc<RawFile>>>,
    stats: Arc<StoreStats>,
    /// Catch-up chunks being read and hashed on this node at once, for copies it serves
    /// and copies it makes ([`CATCH_UP_IO_MAX`]).
    catch_up_io: tokio::sync::Semaphore,
    /// Digests of the verify markers this node's replicas applied (filled by the store).
    digests: crate::verify::Digests,
    /// Verify runs on this node and what they found, for `/metrics`.
    pub verify_counts: crate::verify::VerifyCounts,
    /// The verify running on this node (one at a time), and its progress.
    pub verify_running: tokio::sync::Mutex<()>,
    pub verify_progress: std::sync::Mutex<crate::verify::VerifyProgress>,
}

/// What [`Node::submit`] takes to a group's leader.
enum Submission {
    Propose(Vec<u8>, Ack),
    Flush,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("volume {0:?} does not exist")]
    NoVolume(String),
    #[error("{0}")]
    Refused(#[from] Refused),
    #[error("gave up after {ms} ms: {last}")]
    Deadline { ms: u64, last: String },
    #[error("read extent file: {0}")]
    Io(#[from] std::io::Error),
    #[error("the block copy for recovery point {from} was superseded by a newer point")]
    Superseded { from: u64 },
}

impl Node {
    pub fn new(
        me: NodeId,
        site: String,
        store: flume::Sender<Event>,
        transport: Arc<Transport>,
        cluster: ClusterView,
        leaders: LeaderMap,
        volumes_dir: PathBuf,
        stats: Arc<StoreStats>,
        digests: crate::verify::Digests,
    ) -> Arc<Node> {
        Arc::new(Node {
            me,
            site,
            store,
            transport,
            cluster,
            leaders,
            remote_leaders: Mutex::default(),
            volumes_dir,
            read_handles: Mutex::default(),
            stats,
            catch_up_io: tokio::sync::Semaphore::new(CATCH_UP_IO_MAX),
            digests,
            verify_counts: Default::default(),
            verify_running: tokio::sync::Mutex::new(()),
            verify_progress: Default::default(),
        })
    }

    /// The digests replica `on` took at verify marker (`id`, `first_block`) of
    /// `volume`, waiting up to `VERIFY_REPLICA_WAIT` for it to apply the marker; `None`
    /// if it does not answer with them in time.
    pub async fn verify_digests(
        &self,
        on: NodeId,
        volume: VolumeId,
        id: u64,
        first_block: u64,
    ) -> Option<Vec<[u8; 32]>> {
        let deadline = Instant::now() + crate::verify::VERIFY_REPLICA_WAIT;
        loop {
            let got = if on == self.me {
                self.local_digests(volume, id, first_block, Duration::from_secs(1))
                    .await
            } else {
                let req = PeerRequest::VerifyDigests {
                    volume,
                    id,
                    first_block,
                };
                match self.transport.request(on, req).await {
                    Ok(PeerResponse::VerifyDigests(Some(ByteBuf(b)))) if b.len() % 32 == 0 => Some(
                        b.chunks_exact(32)
                            .map(|c| c.try_into().expect("32 bytes"))
                            .collect(),
                    ),
                    _ => None,
                }
            };
            if got.is_some() || Instant::now() >= deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// This node's digests for a verify marker, waiting up to `wait` for them.
    async fn local_digests(
        &self,
        volume: VolumeId,
        id: u64,
        first_block: u64,
        wait: Duration,
    ) -> Option<Vec<[u8; 32]>> {
        let deadline = Instant::now() + wait;
        loop {
            let got = self
                .digests
                .lock()
                .expect("verify digests")
                .get(volume, id, first_block);
            if got.is_some() || Instant::now() >= deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Makes replica `on` of `volume` copy the blocks that differ from the leader's
    /// (verify's repair; the scrub's path for a corrupted replica).
    pub async fn repair_replica(&self, on: NodeId, volume: VolumeId) -> Result<(), Refused> {
        if on == self.me {
            return self
                .to_store(|reply| Event::Repair { volume, reply })
                .await
                .unwrap_or(Err(Refused::Shutdown));
        }
        match self
            .transport
            .request(on, PeerRequest::Repair { volume })
            .await
        {
            Ok(PeerResponse::Repaired(r)) => r.map_err(Refused::from),
            Ok(_) => Err(Refused::Failed("mismatched response".into())),
            Err(e) => Err(Refused::Failed(e.to_string())),
        }
    }

    /// Counters and histograms of the store thread's work.
    pub fn store_stats(&self) -> &StoreStats {
        &self.stats
    }

    /// This node's links to other sites: caps and bytes per lane.
    pub fn links(&self) -> Vec<crate::link::LinkStatus> {
        self.transport.links()
    }

    /// Blocks sent to other sites by reference, and how references sent here resolved.
    pub fn dedup_counts(&self) -> dedup::DedupCounts {
        self.transport.dedup_counts()
    }

    pub fn cluster(&self) -> Arc<ClusterState> {
        self.cluster.borrow().clone()
    }

    pub fn cluster_view(&self) -> ClusterView {
        self.cluster.clone()
    }

    pub fn store_sender(&self) -> flume::Sender<Event> {
        self.store.clone()
    }

    pub fn leader_of(&self, group: GroupId) -> Option<NodeId> {
        let local = self
            .leaders
            .read()
            .expect("leader map poisoned")
            .get(&group)
            .copied();
        local.or_else(|| {
            self.remote_leaders
                .lock()
                .expect("leader hints poisoned")
                .get(&group)
                .copied()
        })
    }

    /// Remembers (or forgets, with `None`) where a group's leader is, for groups this
    /// node has no replica of. Bounded by the number of groups in the cluster.
    fn hint_leader(&self, group: GroupId, leader: Option<NodeId>) {
        let mut hints = self.remote_leaders.lock().expect("leader hints poisoned");
        match leader {
            Some(l) => {
                hints.insert(group, l);
            }
            None => {
                hints.remove(&group);
            }
        }
    }

    async fn to_store<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Event) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.store.send_async(make(tx)).await.ok()?;
        rx.await.ok()
    }

    async fn propose_local(
        &self,
        group: GroupId,
        data: Vec<u8>,
        ack: Ack,
    ) -> Result<Outcome, Refused> {
        self.to_store(|reply| Event::Propose {
            group,
            data,
            ack,
            reply,
        })
        .await
        .unwrap_or(Err(Refused::Superseded))
    }

    async fn flush_local(&self, group: GroupId) -> Result<Outcome, Refused> {
        self.to_store(|reply| Event::Flush { group, reply })
            .await
            .unwrap_or(Err(Refused::Superseded))
    }

    /// A voter of the volume other than this node, a different one per `attempt`: who to
    /// ask when the leader is unknown.
    fn other_voter(&self, info: &VolumeInfo, attempt: u32) -> Option<NodeId> {
        let others: Vec<NodeId> = info
            .voters
            .iter()
            .copied()
            .filter(|n| *n != self.me)
            .collect();
        others.get(attempt as usize % others.len().max(1)).copied()
    }

    /// Nodes worth asking for `group` when no leader is known: its voters, then us.
    fn candidates(&self, group: GroupId) -> Vec<NodeId> {
        let cluster = self.cluster();
        let mut v: Vec<NodeId> = if group == META_GROUP {
            cluster.nodes.keys().copied().collect()
        } else {
            cluster
                .volume_by_id(VolumeId(group.0))
                .map(|v| v.voters.clone())
                .unwrap_or_default()
        };
        let here = group == META_GROUP
            || cluster
                .volume_by_id(VolumeId(group.0))
                .is_some_and(|v| v.replicas_on(self.me));
        if here && !v.contains(&self.me) {
            v.push(self.me);
        }
        if v.is_empty() {
            v.push(self.me);
        }
        v
    }

    /// Proposes `data` in `group` wherever its leader is, answered once committed
    /// (durable), retrying through elections until [`REQUEST_DEADLINE_MS`]. A retry after
    /// an unanswered attempt is safe: an earlier attempt either committed before the
    /// retry's entry or never commits (log matching), so nothing lands after the caller
    /// is answered.
    pub async fn propose(&self, group: GroupId, data: Vec<u8>) -> Result<Outcome, NodeError> {
        self.submit(group, Submission::Propose(data, Ack::Committed))
            .await
    }

    /// [`Node::propose`] answered as `ack` says (see [`Ack`]).
    pub async fn propose_acked(
        &self,
        group: GroupId,
        data: Vec<u8>,
        ack: Ack,
    ) -> Result<Outcome, NodeError> {
        self.submit(group, Submission::Propose(data, ack)).await
    }

    /// Returns once every write of `group` acknowledged before the call is committed
    /// (NBD FLUSH), asking the group's leader wherever it is.
    pub async fn flush(&self, group: GroupId) -> Result<(), NodeError> {
        self.submit(group, Submission::Flush).await.map(|_| ())
    }

    async fn submit(&self, group: GroupId, what: Submission) -> Result<Outcome, NodeError> {
        let start = Instant::now();
        let candidates = self.candidates(group);
        let mut target = self
            .leader_of(group)
            .unwrap_or(if candidates.contains(&self.me) {
                self.me
            } else {
                candidates[0]
            });
        let mut attempt = 0u32;
        loop {
            let result = if target == self.me {
                match &what {
                    Submission::Propose(data, ack) => {
                        self.propose_local(group, data.clone(), *ack).await
                    }
                    Submission::Flush => self.flush_local(group).await,
                }
            } else {
                let req = match &what {
                    Submission::Propose(data, ack) => PeerRequest::Propose {
                        group,
                        data: data.clone(),
                        ack: *ack,
                        // The transport gives up on the request after its timeout.
                        expires_unix_ms: unix_ms() + REQUEST_TIMEOUT_MS,
                    },
                    Submission::Flush => PeerRequest::Flush { group },
                };
                match self.transport.request(target, req).await {
                    Ok(PeerResponse::Proposed(r)) => r.map(Outcome::from).map_err(Refused::from),
                    Ok(_) => Err(Refused::Failed("mismatched response".into())),
                    Err(e) => {
                        debug!(%group, peer = %target, error = %e, "forwarded proposal failed");
                        Err(Refused::Superseded)
                    }
                }
            };
            let last = match result {
                Ok(o) => {
                    if target != self.me {
                        self.hint_leader(group, Some(target));
                    }
                    return Ok(o);
                }
                Err(Refused::NotLeader {
                    leader: Some(l), ..
                }) if l != target => {
                    self.hint_leader(group, Some(l));
                    target = l;
                    continue;
                }
                Err(Refused::NoGroup(_)) if target == self.me => {
                    // No replica here (yet): ask the voters, without waiting.
                    target = candidates
                        .iter()
                        .copied()
                        .find(|c| *c != self.me)
                        .unwrap_or(self.me);
                    if target != self.me {
                        continue;
                    }
                    Refused::NoGroup(group)
                }
                Err(e @ (Refused::Failed(_) | Refused::Shutdown)) => return Err(e.into()),
                Err(e) => {
                    if target != self.me {
                        self.hint_leader(group, None);
                    }
                    e
                }
            };
            if start.elapsed() > Duration::from_millis(REQUEST_DEADLINE_MS) {
                return Err(NodeError::Deadline {
                    ms: REQUEST_DEADLINE_MS,
                    last: last.to_string(),
                });
            }
            attempt += 1;
            let backoff = (5u64 << attempt.min(6)).min(RETRY_BACKOFF_MAX_MS);
            tokio::time::sleep(Duration::from_millis(backoff)).await;
            target = self
                .leader_of(group)
                .unwrap_or(candidates[attempt as usize % candidates.len()]);
        }
    }

    /// Applies a metadata command through the metadata group's leader.
    pub async fn meta(&self, cmd: MetaCommand) -> Result<MetaResult, NodeError> {
        match self.propose(META_GROUP, cmd.encode()).await? {
            Outcome::Meta(r) => Ok(r),
            Outcome::Volume => {
                Err(Refused::Failed("metadata proposal applied as a volume command".into()).into())
            }
        }
    }

    /// Path of this node's extent file for `volume`.
    pub fn volume_path(&self, volume: VolumeId) -> PathBuf {
        self.volumes_dir.join(format!("{}.img", volume.0))
    }

    /// Closes the read handles of volumes that left the cluster (their extent files are
    /// deleted: an open handle would hold the space and serve a dead file).
    pub fn prune_read_handles(&self) {
        let cluster = self.cluster();
        self.read_handles
            .lock()
            .expect("read handles poisoned")
            .retain(|v, _| cluster.volume_by_id(*v).is_some());
    }

    /// A shared read-only handle on this node's extent file for `volume`.
    pub fn read_handle(&self, volume: VolumeId) -> std::io::Result<Arc<RawFile>> {
        let mut handles = self.read_handles.lock().expect("read handles poisoned");
        if let Some(h) = handles.get(&volume) {
            return Ok(Arc::clone(h));
        }
        let h = Arc::new(RawFile::open(&self.volume_path(volume), true)?);
        handles.insert(volume, Arc::clone(&h));
        Ok(h)
    }

    /// Waits until this node's replica of `volume` may serve a linearizable read.
    pub async fn read_barrier(&self, volume: VolumeId) -> Result<(), Refused> {
        self.to_store(|reply| Event::Read {
            group: volume.group(),
            reply,
        })
        .await
        .unwrap_or(Err(Refused::Superseded))
    }

    /// A linearizable read of `volume`, served locally when this node has a replica and
    /// forwarded otherwise.
    pub async fn read(
        &self,
        volume: VolumeId,
        offset: u64,
        len: u32,
    ) -> Result<Vec<ReadChunk>, NodeError> {
        let start = Instant::now();
        let mut attempt = 0u32;
        // Set once the local replica said it is catching up: read through others.
        let mut local_recovering = false;
        loop {
            let cluster = self.cluster();
            let info = cluster
                .volume_by_id(volume)
                .ok_or_else(|| NodeError::NoVolume(volume.to_string()))?;
            let result = if info.replicas_on(self.me) && !local_recovering {
                match self.read_barrier(volume).await {
                    Ok(()) => return Ok(self.read_handle(volume)?.read_chunks(offset, len)?),
                    Err(e) => e,
                }
            } else {
                let fallback = self.other_voter(info, attempt);
                let target = self
                    .leader_of(volume.group())
                    .filter(|l| *l != self.me)
                    .or(fallback)
                    .unwrap_or(self.me);
                match self
                    .transport
                    .request(
                        target,
                        PeerRequest::Read {
                            volume,
                            offset,
                            len,
                        },
                    )
                    .await
                {
                    Ok(PeerResponse::Read(Ok(ByteBuf(data)))) => {
                        return Ok(roamdisk_nbd::backend::split_zero_runs(offset, data.into()));
                    }
                    Ok(PeerResponse::Read(Err(e))) => Refused::from(e),
                    Ok(_) => Refused::Failed("mismatched response".into()),
                    Err(_) => Refused::Superseded,
                }
            };
            if matches!(result, Refused::Shutdown | Refused::Failed(_)) {
                return Err(result.into());
            }
            if matches!(result, Refused::Recovering(_)) && !local_recovering {
                local_recovering = true;
                continue;
            }
            if start.elapsed() > Duration::from_millis(REQUEST_DEADLINE_MS) {
                return Err(NodeError::Deadline {
                    ms: REQUEST_DEADLINE_MS,
                    last: result.to_string(),
                });
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(
                (5u64 << attempt.min(6)).min(RETRY_BACKOFF_MAX_MS),
            ))
            .await;
        }
    }

    /// Copies the blocks of `volume` that differ from the leader's (by blake3) for
    /// recovery point `from`, then tells the store to replay its deferred log.
    /// Resumable: after a restart the same copy sends only the blocks that still differ.
    ///
    /// Every block must be read from the source after the replica took its recovery
    /// point (the replay starts there). A copy whose point is replaced while it runs (a
    /// second snapshot) stops (`still_current` turns false), before writing another
    /// chunk; the caller waits for it to end before starting the copy for the new point,
    /// so two copies never write one replica. (A copy that went on and reported done for
    /// the old point left a block older than a flushed write it no longer replayed: the
    /// chaos smoke drill found it as a stale read after a move.)
    pub async fn catch_up(
        &self,
        volume: VolumeId,
        from: roamdisk_core::ids::LogIndex,
        still_current: impl Fn() -> bool,
    ) -> Result<(), NodeError> {
        use futures_util::stream::{FuturesUnordered, StreamExt};
        use roamdisk_core::ids::BLOCK_BYTES;
        let start = Instant::now();
        let group = volume.group();
        let file = Arc::new(RawFile::open(&self.volume_path(volume), false)?);
        let mut copy_end = 0u64;
        let mut copied_blocks: Vec<u64> = Vec::new();
        let mut next_block = 0u64;
        let mut attempt = 0u32;
        // Chunks to (re)send, oldest first; up to `window` chunks in flight so that a WAN
        // link's bandwidth-delay product is covered: the window grows by one for every
        // reply whose round trip is within CATCH_UP_QUEUE_TARGET_MS of the fastest seen
        // and shrinks by one for every slower one (a delay-based controller, as LEDBAT).
        // Each in-flight chunk hashes its blocks (on the blocking pool: a millisecond or more for 1 MiB of data, holes
        // are not read) and then asks for them, so hashing overlaps the transfers: hashed
        // one at a time ahead of the requests, the window held fewer chunks than it
        // allowed while a chunk was being hashed.
        let mut retry: std::collections::VecDeque<u64> = Default::default();
        let mut inflight = FuturesUnordered::new();
        let mut window = CATCH_UP_WINDOW_MIN * 2;
        let mut fastest = Duration::MAX;
        loop {
            let cluster = self.cluster();
            let info = cluster
                .volume_by_id(volume)
                .ok_or_else(|| NodeError::NoVolume(volume.to_string()))?;
            let blocks = info.size.div_ceil(BLOCK_BYTES);
            while inflight.len() < window {
                let (block, backoff) = match retry.pop_front() {
                    Some(b) => (b, true),
                    None if next_block < blocks => {
                        next_block += CATCH_UP_CHUNK_BLOCKS;
                        (next_block - CATCH_UP_CHUNK_BLOCKS, false)
                    }
                    None => break,
                };
                let count = CATCH_UP_CHUNK_BLOCKS.min(blocks - block);
                // Copy from the leader, or from any voter (in turn) when it is unknown.
                let Some(fallback) = self.other_voter(info, attempt) else {
                    return Err(Refused::Failed("no other replica to copy from".into()).into());
                };
                let target = self
                    .leader_of(group)
                    .filter(|l| *l != self.me)
                    .unwrap_or(fallback);
                let reader = Arc::clone(&file);
                let transport = Arc::clone(&self.transport);
                let io = &self.catch_up_io;
                inflight.push(async move {
                    if backoff {
                        tokio::time::sleep(Duration::from_millis(RETRY_BACKOFF_MAX_MS)).await;
                    }
                    let permit = io.acquire().await.map_err(std::io::Error::other)?;
                    let hashes = tokio::task::spawn_blocking(move || {
                        let mut hashes = Vec::with_capacity(count as usize * 32);
                        crate::volume::for_each_block(&reader, block, count, |_, data| {
                            hashes.extend_from_slice(&chunk_block_hash(data))
                        })?;
                        Ok::<_, std::io::Error>(hashes)
                    })
                    .await
                    .map_err(|e| std::io::Error::other(format!("catch-up hash task: {e}")))??;
                    drop(permit);
                    let req = PeerRequest::FetchBlocks {
                        volume,
                        start_block: block,
                        hashes,
                    };
                    let sent = Instant::now();
                    let reply = transport.request(target, req).await;
                    Ok::<_, std::io::Error>((block, target, sent.elapsed(), reply))
                });
            }
            let Some(done) = inflight.next().await else {
                break;
            };
            let (block, target, took, reply) = done?;
            if !still_current() {
                return Err(NodeError::Superseded { from: from.0 });
            }
            match reply {
                Ok(PeerResponse::Blocks(Ok(BlocksReply {
                    applied,
                    blocks: changed,
                }))) => {
                    // Written on the blocking pool: page-cache writes of a whole chunk
                    // can sleep in the kernel's dirty-page throttling, which would hold a
                    // runtime worker (and the tasks queued on it) meanwhile.
                    let count = CATCH_UP_CHUNK_BLOCKS.min(blocks.saturating_sub(block));
                    let mut chunk_blocks = Vec::with_capacity(changed.len());
                    for (off, data) in &changed {
                        chunk_blocks.push(block + u64::from(*off));
                        if u64::from(*off) >= count {
                            return Err(Refused::Failed(format!(
                                "catch-up block {off} outside a chunk of {count}"
                            ))
                            .into());
                        }
                        if data
                            .as_ref()
                            .is_some_and(|d| d.0.len() as u64 != BLOCK_BYTES)
                        {
                            return Err(
                                Refused::Failed("catch-up block of the wrong size".into()).into()
                            );
                        }
                    }
                    let writer = Arc::clone(&file);
                    tokio::task::spawn_blocking(move || {
                        for (off, data) in changed {
                            let at = (block + u64::from(off)) * BLOCK_BYTES;
                            match data {
                                Some(ByteBuf(d)) => writer.write_at(&d, at, false)?,
                                None => {
                                    writer.zero(at, BLOCK_BYTES, false, false)?;
                                }
                            }
                        }
                        // Write-behind: a copy that left all its data dirty until the
                        // final fsync (two new replicas, 480 MiB) made every node's log
                        // sync on this disk wait behind it, and writes stalled for
                        // 0.6-1 s (`wan-bench`'s move).
                        writer.start_writeback(block * BLOCK_BYTES, count * BLOCK_BYTES)?;
                        Ok::<_, std::io::Error>(())
                    })
                    .await
                    .map_err(|e| std::io::Error::other(format!("catch-up write task: {e}")))??;
                    copied_blocks.extend(chunk_blocks);
                    copy_end = copy_end.max(applied);
                    attempt = 0;
                    fastest = fastest.min(took);
                    window = if took <= fastest + Duration::from_millis(CATCH_UP_QUEUE_TARGET_MS) {
                        (window + 1).min(CATCH_UP_WINDOW_MAX)
                    } else {
                        (window - 1).max(CATCH_UP_WINDOW_MIN)
                    };
                }
                other => {
                    debug!(%volume, peer = %target, "catch-up request failed: {other:?}");
                    attempt += 1;
                    if start.elapsed() > Duration::from_millis(10 * REQUEST_DEADLINE_MS) {
                        return Err(NodeError::Deadline {
                            ms: 10 * REQUEST_DEADLINE_MS,
                            last: format!("{other:?}"),
                        });
                    }
                    retry.push_back(block);
                }
            }
        }
        let syncer = Arc::clone(&file);
        tokio::task::spawn_blocking(move || syncer.sync_data())
            .await
            .map_err(|e| std::io::Error::other(format!("catch-up sync task: {e}")))??;
        tracing::info!(%volume, blocks_copied = copied_blocks.len(), ms = start.elapsed().as_millis() as u64, window, "catch-up copy done");
        if !still_current() {
            return Err(NodeError::Superseded { from: from.0 });
        }
        let done = Event::CatchUpDone {
            group,
            from,
            copy_end: roamdisk_core::ids::LogIndex(copy_end),
            blocks: copied_blocks,
        };
        let _ = self.store.send_async(done).await;
        Ok(())
    }

    /// The blocks this node stores with these blake3 hashes, each read from its replica
    /// and verified (an index entry may be stale); `None` where it has none. At most one
    /// frame's worth is answered.
    pub fn local_blocks(&self, hashes: &[Hash]) -> Vec<Option<Vec<u8>>> {
        use roamdisk_core::ids::BLOCK_BYTES;
        let limit = crate::transport::FRAME_MAX_BYTES / BLOCK_BYTES as usize / 2;
        let content = self.transport.content_index();
        hashes
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let (volume, block) = content.get(h).filter(|_| i < limit)?;
                let file = self.read_handle(volume).ok()?;
                let mut buf = vec![0u8; BLOCK_BYTES as usize];
                file.read_at(&mut buf, block * BLOCK_BYTES).ok()?;
                dedup::verify(h, &buf).then_some(buf)
            })
            .collect()
    }

    /// Serves a `FetchBlocks` from this node's replica.
    async fn fetch_blocks(
        &self,
        volume: VolumeId,
        start_block: u64,
        hashes: &[u8],
    ) -> Result<BlocksReply, Refused> {
        if hashes.len() % 32 != 0 || hashes.len() / 32 > CATCH_UP_CHUNK_BLOCKS as usize {
            return Err(Refused::Failed("malformed block hashes".into()));
        }
        // Only a replica that may serve reads may be copied from.
        self.read_barrier(volume).await?;
        let file = self
            .read_handle(volume)
            .map_err(|e| Refused::Failed(e.to_string()))?;
        // Reading and hashing a chunk (1 MiB) takes a millisecond or more: on the blocking
        // pool, so that the runtime's workers keep the link writers going meanwhile.
        let hashes = hashes.to_vec();
        let _permit = self
            .catch_up_io
            .acquire()
            .await
            .map_err(|e| Refused::Failed(e.to_string()))?;
        let out = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let count = (hashes.len() / 32) as u64;
            crate::volume::for_each_block(&file, start_block, count, |b, data| {
                let i = (b - start_block) as usize;
                let ours = chunk_block_hash(data);
                if ours != hashes[i * 32..(i + 1) * 32] {
                    // Zeros (a hole, or zeros written) go as "zero it", not as data.
                    let data = data.filter(|_| ours != [0u8; 32]);
                    out.push((i as u32, data.map(|d| ByteBuf(d.to_vec()))));
                }
            })
            .map_err(|e| Refused::Failed(e.to_string()))?;
            Ok::<_, Refused>(out)
        })
        .await
        .map_err(|e| Refused::Failed(format!("catch-up read task: {e}")))??;
        // Read after the blocks: the copy reflects a state no newer than this.
        let applied = self
            .to_store(|reply| Event::Applied {
                group: volume.group(),
                reply,
            })
            .await
            .flatten()
            .unwrap_or(0);
        Ok(BlocksReply {
            applied,
            blocks: out,
        })
    }

    pub async fn status(&self) -> Vec<GroupStatus> {
        self.to_store(|reply| Event::Status { reply })
            .await
            .unwrap_or_default()
    }

    /// Proposes a membership change of `group` on this node (its leader).
    pub async fn conf_change(
        &self,
        group: GroupId,
        cc: raft::eraftpb::ConfChangeV2,
    ) -> Result<(), Refused> {
        self.to_store(|reply| Event::ConfChange { group, cc, reply })
            .await
            .unwrap_or(Err(Refused::Shutdown))
    }

    /// Asks this node's replica of `group` (if it leads) to hand leadership to `to`.
    pub async fn transfer_leader(&self, group: GroupId, to: NodeId) {
        let _ = self
            .store
            .send_async(Event::TransferLeader { group, to })
            .await;
    }

    /// Status of `group` on node `on` (this node or a peer).
    pub async fn peer_group_status(&self, on: NodeId, group: GroupId) -> Option<GroupStatus> {
        if on == self.me {
            return self.status().await.into_iter().find(|g| g.group == group.0);
        }
        match self
            .transport
            .request(on, PeerRequest::GroupStatus { group })
            .await
        {
            Ok(PeerResponse::GroupStatus(s)) => s,
            _ => None,
        }
    }

    /// Status of `group` as its leader sees it (with every replica's lag), asking the
    /// leader if it is another node; `None` if no leader answers.
    pub async fn leader_status(&self, group: GroupId) -> Option<GroupStatus> {
        let local = self.status().await.into_iter().find(|g| g.group == group.0);
        if local.as_ref().is_some_and(|g| g.is_leader()) {
            return local;
        }
        let leader = self.leader_of(group).filter(|l| *l != self.me)?;
        self.peer_group_status(leader, group).await
    }
}

/// Milliseconds since the Unix epoch (forwarded proposals carry an expiry in it; nodes'
/// clocks are assumed synchronised well within the request timeout, e.g. by NTP).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Serves peers' forwarded requests from this node.
pub struct PeerHandler(pub Arc<Node>);

impl RequestHandler for PeerHandler {
    fn local_blocks(&self, hashes: &[Hash]) -> Vec<Option<Vec<u8>>> {
        self.0.local_blocks(hashes)
    }

    fn handle(
        &self,
        req: PeerRequest,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = PeerResponse> + Send + '_>> {
        Box::pin(async move {
            match req {
                PeerRequest::Flush { group } => {
                    let r = self.0.flush_local(group).await;
                    PeerResponse::Proposed(r.map(Into::into).map_err(WireRefused::from))
                }
                PeerRequest::Propose {
                    group,
                    data,
                    ack,
                    expires_unix_ms,
                } => {
                    if unix_ms() > expires_unix_ms {
                        // The sender gave up on this copy: landing now could overwrite a
                        // newer write its client made since.
                        warn!(%group, late_ms = unix_ms() - expires_unix_ms, "expired forwarded proposal refused");
                        return PeerResponse::Proposed(Err(WireRefused::Failed(
                            "forwarded proposal arrived after its sender gave up".into(),
                        )));
                    }
                    let r = self.0.propose_local(group, data, ack).await;
                    PeerResponse::Proposed(r.map(Into::into).map_err(WireRefused::from))
                }
                PeerRequest::Read {
                    volume,
                    offset,
                    len,
                } => {
                    let r = async {
                        self.0.read_barrier(volume).await?;
                        let h = self
                            .0
                            .read_handle(volume)
                            .map_err(|e| Refused::Failed(e.to_string()))?;
                        let mut buf = vec![0u8; len as usize];
                        h.read_at(&mut buf, offset)
                            .map_err(|e| Refused::Failed(e.to_string()))?;
                        Ok::<_, Refused>(ByteBuf(buf))
                    }
                    .await;
                    PeerResponse::Read(r.map_err(WireRefused::from))
                }
                PeerRequest::FetchBlocks {
                    volume,
                    start_block,
                    hashes,
                } => PeerResponse::Blocks(
                    self.0
                        .fetch_blocks(volume, start_block, &hashes)
                        .await
                        .map_err(WireRefused::from),
                ),
                PeerRequest::BlocksByHash { hashes } => PeerResponse::BlocksByHash(
                    self.0
                        .local_blocks(&hashes)
                        .into_iter()
                        .map(|b| b.map(ByteBuf))
                        .collect(),
                ),
                PeerRequest::VerifyDigests {
                    volume,
                    id,
                    first_block,
                } => PeerResponse::VerifyDigests(
                    self.0
                        .local_digests(volume, id, first_block, Duration::from_secs(5))
                        .await
                        .map(|d| ByteBuf(d.concat())),
                ),
                PeerRequest::Repair { volume } => PeerResponse::Repaired(
                    self.0
                        .repair_replica(self.0.me, volume)
                        .await
                        .map_err(WireRefused::from),
                ),
                PeerRequest::GroupStatus { group } => PeerResponse::GroupStatus(
                    self.0
                        .status()
                        .await
                        .into_iter()
                        .find(|g| g.group == group.0),
                ),
            }
        })
    }
}

/// A block's entry in a `FetchBlocks` request: its blake3, or all zeros for a block that
/// reads as zeros (`None`: a hole).
pub(crate) fn chunk_block_hash(data: Option<&[u8]>) -> [u8; 32] {
    match data {
        Some(d) if !roamdisk_nbd::backend::is_zero(d) => *blake3::hash(d).as_bytes(),
        _ => [0u8; 32],
    }
}
