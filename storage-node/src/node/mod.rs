//! The node's API for everything above the store: proposing anywhere in the cluster
//! (locally if this node leads the group, else forwarded to the leader), linearizable
//! reads, and status. The NBD backend and the admin API are built on it.
//!
//! Here: the [`Node`], proposals, reads and status; in `catch_up`, the block copy that
//! brings a replica back after a snapshot (both sides); in `peer`, serving peers'
//! requests ([`PeerHandler`]) and the per-replica queries of `volume verify`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use roamdisk_core::ids::{GroupId, NodeId, VolumeId, META_GROUP};
use roamdisk_core::meta::{ClusterState, MetaCommand, MetaResult, VolumeInfo};
use roamdisk_nbd::backend::ReadChunk;
use roamdisk_nbd::file::RawFile;
use tokio::sync::oneshot;
use tracing::debug;

use crate::dedup;
use crate::store::{Ack, ClusterView, Event, GroupStatus, LeaderMap, Outcome, Refused};
use crate::transport::{Transport, REQUEST_TIMEOUT_MS};
use crate::wire::{ByteBuf, PeerRequest, PeerResponse};
use roamdisk_core::stats::StoreStats;

mod catch_up;
mod failover;
mod peer;

pub use catch_up::{
    CATCH_UP_CHUNK_BLOCKS, CATCH_UP_IO_MAX, CATCH_UP_QUEUE_TARGET_MS, CATCH_UP_WINDOW_MAX,
    CATCH_UP_WINDOW_MIN,
};
pub use failover::{ExecuteError, Executed, FailoverPlan, PLANS_KEPT, PLAN_TTL};
pub use peer::PeerHandler;

/// How long a proposal or read made by the node itself (metadata, verify markers) keeps
/// retrying (leader elections, forwarding) before it fails. Longer than an election plus
/// a reconnect. A client's request (an NBD connection's: it names its epoch) has no
/// deadline: it waits as long as the volume cannot serve it (no leader, no lease, no
/// other site for a site-durable write), as DRBD's `suspend-io` does, and fails only if
/// a failover fenced its epoch. A guest then stalls instead of turning its filesystem
/// read-only.
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
    digests: crate::volume::verify::Digests,
    /// Verify runs on this node and what they found, for `/metrics`.
    pub verify_counts: crate::volume::verify::VerifyCounts,
    /// The verify running on this node (one at a time), and its progress.
    pub verify_running: tokio::sync::Mutex<()>,
    pub verify_progress: std::sync::Mutex<crate::volume::verify::VerifyProgress>,
    /// Failover plans made on this node, newest last (at most `PLANS_KEPT`).
    plans: Mutex<std::collections::VecDeque<(Instant, FailoverPlan)>>,
}

/// What [`Node::submit`] takes to a group's leader.
enum Submission {
    Propose(Vec<u8>, Ack),
    Flush,
}

/// What a refusal means for a request of a known epoch: a request of an epoch a failover
/// ended never succeeds (its connection belongs to the old group); one that met a node
/// behind on the metadata is tried again.
fn fenced_for_good(e: &Refused) -> bool {
    matches!(e, Refused::Fenced { epoch, asked, .. } if asked < epoch)
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
        digests: crate::volume::verify::Digests,
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
            plans: Mutex::default(),
        })
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
        epoch: Option<u64>,
        data: Vec<u8>,
        ack: Ack,
    ) -> Result<Outcome, Refused> {
        self.to_store(|reply| Event::Propose {
            group,
            epoch,
            data,
            ack,
            reply,
        })
        .await
        .unwrap_or(Err(Refused::Superseded))
    }

    async fn flush_local(&self, group: GroupId, epoch: Option<u64>) -> Result<Outcome, Refused> {
        self.to_store(|reply| Event::Flush {
            group,
            epoch,
            reply,
        })
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
        self.submit(group, None, Submission::Propose(data, Ack::Committed))
            .await
    }

    /// [`Node::propose`] answered as `ack` says (see [`Ack`]), for a request of `epoch`
    /// of the group (`None`: whichever is current; an NBD connection passes the one it
    /// started in, so that a failover fences it).
    pub async fn propose_acked(
        &self,
        group: GroupId,
        epoch: Option<u64>,
        data: Vec<u8>,
        ack: Ack,
    ) -> Result<Outcome, NodeError> {
        self.submit(group, epoch, Submission::Propose(data, ack))
            .await
    }

    /// Returns once every write of `group` acknowledged before the call is committed
    /// (NBD FLUSH), asking the group's leader wherever it is.
    pub async fn flush(&self, group: GroupId, epoch: Option<u64>) -> Result<(), NodeError> {
        self.submit(group, epoch, Submission::Flush)
            .await
            .map(|_| ())
    }

    async fn submit(
        &self,
        group: GroupId,
        epoch: Option<u64>,
        what: Submission,
    ) -> Result<Outcome, NodeError> {
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
                        self.propose_local(group, epoch, data.clone(), *ack).await
                    }
                    Submission::Flush => self.flush_local(group, epoch).await,
                }
            } else {
                let req = match &what {
                    Submission::Propose(data, ack) => PeerRequest::Propose {
                        group,
                        data: data.clone(),
                        ack: *ack,
                        // The transport gives up on the request after its timeout.
                        expires_unix_ms: unix_ms() + REQUEST_TIMEOUT_MS,
                        epoch,
                    },
                    Submission::Flush => PeerRequest::Flush { group, epoch },
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
                Err(e) if fenced_for_good(&e) => return Err(e.into()),
                Err(e) => {
                    if target != self.me {
                        self.hint_leader(group, None);
                    }
                    e
                }
            };
            if epoch.is_none() && start.elapsed() > Duration::from_millis(REQUEST_DEADLINE_MS) {
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

    /// Waits until this node's replica of `volume` may serve a linearizable read (of
    /// `epoch` of its group; `None`: the current one).
    pub async fn read_barrier(&self, volume: VolumeId, epoch: Option<u64>) -> Result<(), Refused> {
        self.to_store(|reply| Event::Read {
            group: volume.group(),
            epoch,
            reply,
        })
        .await
        .unwrap_or(Err(Refused::Superseded))
    }

    /// A linearizable read of `volume` (for a request of `epoch`, see
    /// [`Node::propose_acked`]), served locally when this node has a replica and
    /// forwarded otherwise.
    pub async fn read(
        &self,
        volume: VolumeId,
        epoch: Option<u64>,
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
                match self.read_barrier(volume, epoch).await {
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
                            epoch,
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
            if matches!(result, Refused::Shutdown | Refused::Failed(_)) || fenced_for_good(&result)
            {
                return Err(result.into());
            }
            if matches!(result, Refused::Recovering(_)) && !local_recovering {
                local_recovering = true;
                continue;
            }
            if epoch.is_none() && start.elapsed() > Duration::from_millis(REQUEST_DEADLINE_MS) {
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
