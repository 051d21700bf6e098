//! The store thread: the I/O shell around the node core (`roamdisk_core::node`).
//!
//! One owner, a closed event enum, no locks around the core: other tasks talk to the
//! store only through [`Event`]s, and it answers through oneshot channels. The core makes
//! every decision (what to answer when, what to send, when to sync, what to apply); this
//! shell owns what does I/O and executes the core's effects in order:
//!
//! - the log store (RocksDB), which the core writes through `LogStore`; its syncs run on
//!   the `log-sync` thread ([`logsync`]), one at a time, pipelined with writes;
//! - volume data, one extent file per replica ([`crate::volume`]): applied entries are
//!   written to it here, checkpoints hash touched blocks and fsync it on the
//!   `extent-sync` thread ([`syncer`]) before the core records the applied index;
//! - the background scrub ([`scrub`]) and its confirmation ([`checkpoint`]);
//! - the network, through an [`Outbox`] (the transport), and the callers' replies
//!   ([`replies`]).
//!
//! Each loop: wait for an event, a finished sync or the next tick; hand up to
//! `EVENTS_PER_ROUND` events to the core; tick it when due; run its round
//! (`NodeCore::process`) and execute the effects; then checkpoint and scrub.

mod checkpoint;
mod effects;
mod logsync;
mod replies;
pub mod scrub;
pub mod syncer;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use raft::eraftpb::Message;
use roamdisk_core::group::GroupConfig;
use roamdisk_core::ids::{GroupId, LogIndex, NodeId, VolumeId};
use roamdisk_core::logstore::LogStore;
use roamdisk_core::meta::ClusterState;
use roamdisk_core::node::{CheckpointPlan, NodeConfig, NodeCore};
use roamdisk_core::stats::StoreStats;
use roamdisk_core::time::Time;
use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};

pub use roamdisk_core::node::{
    recovering_key, Ack, GroupStatus, Outcome, PeerStatus, QuarantineReport, Refused,
    ReplicaReport, Role, SyncWanted, TailReport, Written, META_SNAPSHOT_KEY,
};

use crate::dedup::ContentIndex;
use crate::volume::VolumeReplica;
use logsync::LogSyncer;
use replies::{Replies, Reply};
use scrub::Scrubber;
use syncer::Syncer;

/// Interval between Raft ticks. Election timeout is `election_tick` ticks (1 s).
pub const TICK_MS: u64 = 100;
/// Events handled per loop before Readies are processed; bounds the latency added to
/// events that arrived first.
pub const EVENTS_PER_ROUND: usize = 4096;
/// Capacity of the store's event queue; senders wait (async) when it is full.
pub const EVENT_QUEUE_MAX: usize = 16384;
/// Milliseconds between volume checkpoints (fsync extents, record applied index).
pub const CHECKPOINT_INTERVAL_MS: u64 = 1000;
/// Blocks the background scan reads per round on the whole node, shared by its replicas
/// in turn (16 MiB, on the `scrub` thread: one 64 MiB volume is verified every 4 s, 1 GiB
/// every ~1 min, and more volumes take proportionally longer). Also the bound on the
/// suspects waiting per group.
pub const SCRUB_BLOCKS_PER_ROUND: u64 = 4096;
/// Suspect blocks the store thread re-reads per round to confirm corruption (see
/// `scrub`): 1 MiB, about a millisecond.
pub const SCRUB_CONFIRM_PER_ROUND: usize = 256;

/// Where outgoing Raft messages go. The transport implements it; it must not block.
/// Every frame about a group carries the sender's `epoch` of it (see
/// `roamdisk_core::node::failover`).
pub trait Outbox: Send + Sync + 'static {
    fn send(&self, to: NodeId, group: GroupId, epoch: u64, msg: Message);
    /// Tells the leader `to` how far this node wrote `group`'s log (best effort).
    fn written(&self, to: NodeId, group: GroupId, epoch: u64, w: Written);
    /// Asks replica `to` (voter or learner) to sync `group`'s log up to `want.index` now
    /// (best effort; see `roamdisk_core::node`'s sync rules).
    fn sync_wanted(&self, to: NodeId, group: GroupId, epoch: u64, want: SyncWanted);
    /// Tells `to` about this node's quarantine in `group` (best effort; repeated).
    fn quarantine(&self, to: NodeId, group: GroupId, epoch: u64, report: QuarantineReport);
    /// Tells replica `to` at another site how far the leader's log reaches (best effort).
    fn tail(&self, to: NodeId, group: GroupId, epoch: u64, tail: TailReport);
}

pub type ProposeReply = oneshot::Sender<Result<Outcome, Refused>>;
pub type ReadReply = oneshot::Sender<Result<(), Refused>>;

pub enum Event {
    /// The block copy of a recovering replica finished: it was made for recovery point
    /// `from`; the source had applied `copy_end` when the last block was read.
    CatchUpDone {
        group: GroupId,
        from: LogIndex,
        copy_end: LogIndex,
        /// Blocks the copy wrote (their hashes in the index must be recomputed); at most
        /// the volume's block count.
        blocks: Vec<u64>,
    },
    /// A Raft message of the sender's `epoch` of `group`.
    Raft {
        group: GroupId,
        epoch: u64,
        msg: Message,
    },
    /// `epoch`: the epoch the request belongs to (`None`: the current one); a request of
    /// another is refused (`Refused::Fenced`).
    Propose {
        group: GroupId,
        epoch: Option<u64>,
        data: Vec<u8>,
        ack: Ack,
        reply: ProposeReply,
    },
    /// Completes once every write of `group` answered before it is committed (this node
    /// must lead the group). Answers `Outcome::Volume`.
    Flush {
        group: GroupId,
        epoch: Option<u64>,
        reply: ProposeReply,
    },
    /// A follower wrote its log (see [`Written`]).
    Written {
        group: GroupId,
        epoch: u64,
        from: NodeId,
        w: Written,
    },
    /// The leader wants this replica's log synced (see [`SyncWanted`]).
    SyncWanted {
        group: GroupId,
        epoch: u64,
        want: SyncWanted,
    },
    /// A peer's quarantine report (see `roamdisk_core::node`'s recovery).
    Quarantine {
        group: GroupId,
        epoch: u64,
        from: NodeId,
        report: QuarantineReport,
    },
    /// The leader's tail report (see [`TailReport`]).
    Tail {
        group: GroupId,
        epoch: u64,
        from: NodeId,
        tail: TailReport,
    },
    /// Completes once this node may serve a linearizable read of `group`.
    Read {
        group: GroupId,
        epoch: Option<u64>,
        reply: ReadReply,
    },
    /// What this node's replica of `group` knows that a failover plan needs (`hold`: for
    /// one being executed, see `NodeCore::replica_report_holding`).
    ReplicaReport {
        group: GroupId,
        hold: bool,
        reply: oneshot::Sender<Option<ReplicaReport>>,
    },
    /// What this node's fenced replica of `group` holds past failover `record`'s
    /// divergence point.
    Divergent {
        group: GroupId,
        record: roamdisk_core::meta::FailoverRecord,
        reply: oneshot::Sender<Result<roamdisk_core::node::Divergence, Refused>>,
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
    /// The replica of `volume` differs from the others (verify): copy the differing blocks
    /// from the leader.
    Repair {
        volume: VolumeId,
        reply: oneshot::Sender<Result<(), Refused>>,
    },
    Shutdown,
}

/// Shared, read-mostly view of the cluster state, published by the store after every
/// metadata apply.
pub type ClusterView = watch::Receiver<Arc<ClusterState>>;

/// Leader of each group as this node last saw it, for forwarding.
pub type LeaderMap = Arc<RwLock<HashMap<GroupId, NodeId>>>;

/// The replicas that must copy their blocks, each with its recovery point.
pub type RecoveringView = watch::Receiver<Vec<(GroupId, LogIndex)>>;

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
    /// The machine rebooted since the store last ran, without a clean shutdown (see
    /// [`restart_kind`]).
    pub rebooted: bool,
    /// Where the digests of verify markers go (`crate::verify`).
    pub digests: crate::volume::verify::Digests,
    /// A deliberately broken core rule: a test's negative control only.
    pub core_bug: Option<roamdisk_core::node::CoreBug>,
    /// The node's lease (see `roamdisk_core::node`'s lease; `None`: off).
    pub lease: Option<Duration>,
}

/// Marker of a clean shutdown: written and synced as the store stops, removed as it
/// starts. Without it, a start follows a crash.
const CLEAN_SHUTDOWN_FILE: &str = "clean-shutdown";
/// The boot this store last ran in (Linux's `boot_id`).
const BOOT_ID_FILE: &str = "boot-id";

/// Whether this start follows a reboot without a clean shutdown (a power loss: entries
/// written and not synced may be forgotten; see `roamdisk_core::node`'s recovery), and
/// records this boot. A process crash on the same boot is not one: the page cache kept
/// everything. `ROAMDISK_BOOT_ID` overrides the boot id (tests).
pub fn restart_kind(data_dir: &std::path::Path) -> std::io::Result<bool> {
    std::fs::create_dir_all(data_dir)?;
    let boot = std::env::var("ROAMDISK_BOOT_ID").or_else(|_| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_owned())
    })?;
    restart_kind_in_boot(data_dir, &boot)
}

/// [`restart_kind`] in boot `boot`, with `data_dir` created.
fn restart_kind_in_boot(data_dir: &std::path::Path, boot: &str) -> std::io::Result<bool> {
    let clean = data_dir.join(CLEAN_SHUTDOWN_FILE);
    let was_clean = clean.exists();
    let last_boot = std::fs::read_to_string(data_dir.join(BOOT_ID_FILE)).ok();
    // A new store (no boot recorded) has nothing to forget.
    let rebooted = !was_clean && last_boot.is_some_and(|b| b.trim() != boot);
    write_synced(&data_dir.join(BOOT_ID_FILE), boot.as_bytes())?;
    if was_clean {
        std::fs::remove_file(&clean)?;
        sync_dir(data_dir)?;
    }
    Ok(rebooted)
}

fn write_synced(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or(std::path::Path::new(".")))
}

fn sync_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

pub struct Store<S: LogStore> {
    cfg: StoreConfig,
    log: Arc<S>,
    core: NodeCore<S>,
    /// The core's time zero.
    epoch: Instant,
    outbox: Arc<dyn Outbox>,
    volumes: BTreeMap<VolumeId, VolumeReplica>,
    replies: Replies,
    cluster_tx: watch::Sender<Arc<ClusterState>>,
    leaders: LeaderMap,
    recovering_tx: watch::Sender<Vec<(GroupId, LogIndex)>>,
    /// Runs the log's fsyncs, one at a time, while this thread goes on.
    log_syncer: LogSyncer<S>,
    sync_started: Instant,
    /// Runs the extent hashing and fsyncs of checkpoints off this thread.
    syncer: Syncer,
    /// The checkpoint whose extent work is in flight.
    checkpoint_pending: Option<CheckpointPlan>,
    last_checkpoint: Instant,
    /// The background scan (reads extent files off this thread).
    scrubber: Scrubber,
    /// The volume the next scrub job starts with (jobs take the replicas in turn).
    scrub_next: VolumeId,
    /// Blocks the scan found different from the index, per volume, waiting to be
    /// confirmed when the index is exact; at most `SCRUB_BLOCKS_PER_ROUND` per volume.
    scrub_suspects: BTreeMap<VolumeId, BTreeSet<u64>>,
    /// Where this thread's time goes (`/metrics`).
    stats: Arc<StoreStats>,
    /// Set by an event whose handling failed on disk: the loop stops the node.
    failed: Option<String>,
}

impl<S: LogStore> Store<S> {
    /// Opens every group found in `log` (and bootstraps the metadata group if the store
    /// is new), applies what was committed before a restart and syncs.
    pub fn open(
        cfg: StoreConfig,
        log: Arc<S>,
        outbox: Arc<dyn Outbox>,
    ) -> anyhow::Result<(Store<S>, ClusterView, LeaderMap)> {
        std::fs::create_dir_all(cfg.data_dir.join("volumes"))?;
        let (cluster_tx, cluster_rx) = watch::channel(Arc::new(ClusterState::default()));
        let leaders: LeaderMap = Arc::default();
        let stats = Arc::new(StoreStats::default());
        let epoch = Instant::now();
        let mut ncfg = NodeConfig::new(
            cfg.me,
            cfg.group.clone(),
            roamdisk_core::group::raft_logger(),
        );
        ncfg.initial_meta_voters
            .clone_from(&cfg.initial_meta_voters);
        ncfg.joining = cfg.joining;
        ncfg.rebooted = cfg.rebooted;
        ncfg.lease = cfg.lease;
        // Proposals carry the wall clock: the core's time plus when its zero was.
        ncfg.wall_epoch_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        ncfg.bug = cfg.core_bug;
        // Elections stay randomized across nodes and restarts.
        ncfg.election_seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ cfg.me.0.rotate_left(32);
        let core = NodeCore::open(ncfg, Arc::clone(&log), Arc::clone(&stats), Time::ZERO)?;
        let mut store = Store {
            scrubber: Scrubber::spawn(Arc::clone(&log))?,
            log_syncer: LogSyncer::spawn(Arc::clone(&log))?,
            syncer: Syncer::spawn(Arc::clone(&stats), Arc::clone(&cfg.content))?,
            cfg,
            log,
            core,
            epoch,
            outbox,
            volumes: BTreeMap::new(),
            replies: Replies::default(),
            cluster_tx,
            leaders: Arc::clone(&leaders),
            recovering_tx: watch::channel(Vec::new()).0,
            sync_started: epoch,
            checkpoint_pending: None,
            last_checkpoint: epoch,
            scrub_next: VolumeId(0),
            scrub_suspects: BTreeMap::new(),
            stats,
            failed: None,
        };
        store.run_effects()?;
        // Apply what was committed before the restart now, so the node's view of the
        // metadata (its volumes, its peers) is whole before it says it is ready; a node
        // that had not checkpointed its metadata yet would otherwise refuse exports for
        // a moment after starting.
        let now = store.now();
        store.core.process(now)?;
        store.run_effects()?;
        store.sync_log_now()?;
        Ok((store, cluster_rx, leaders))
    }

    /// The core's clock.
    fn now(&self) -> Time {
        Time::from_micros(u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX))
    }

    fn instant_of(&self, t: Time) -> Instant {
        self.epoch + Duration::from_micros(t.as_micros())
    }

    /// Counters of this thread's work, for `/metrics`.
    pub fn stats(&self) -> Arc<StoreStats> {
        Arc::clone(&self.stats)
    }

    /// Receiver of the replicas that must copy blocks, with their recovery points.
    pub fn recovering_view(&self) -> RecoveringView {
        self.recovering_tx.subscribe()
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
            let wake_at = match self.core.next_wakeup(self.now()) {
                Some(due) => next_tick.min(self.instant_of(due).max(now)),
                None => next_tick,
            };
            let first = if now >= wake_at || synced.is_some() {
                events.try_recv().ok()
            } else if !self.core.sync_in_flight() {
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
                let now = self.now();
                self.core.tick(now);
            }
            if let Some(e) = self.failed.take() {
                failure = Some(e);
                break;
            }
            let round = Instant::now();
            let now = self.now();
            if let Err(e) = self
                .core
                .process(now)
                .map_err(anyhow::Error::from)
                .and_then(|()| self.run_effects())
            {
                // The log store failed: continuing could acknowledge what is not durable.
                error!(error = %e, "raft store failed; stopping the node");
                failure = Some(e.to_string());
                break;
            }
            self.stats.round.observe(round.elapsed());
            if let Err(e) = self.checkpoint_round() {
                error!(error = %e, "checkpoint failed; stopping the node");
                failure = Some(e.to_string());
                break;
            }
            if shutdown {
                match self.sync_log_now().and_then(|()| self.checkpoint()) {
                    // Everything written is synced: the next start needs no quarantine.
                    Ok(()) => {
                        let marker = self.cfg.data_dir.join(CLEAN_SHUTDOWN_FILE);
                        if let Err(e) = write_synced(&marker, b"") {
                            warn!(error = %e, "record the clean shutdown");
                        }
                    }
                    Err(e) => error!(error = %e, "final checkpoint failed"),
                }
                break;
            }
        }
        self.core.shutdown();
        self.answer_only();
        info!("raft store stopped");
        failure.map_or(Ok(()), Err)
    }

    /// Handles one event; returns true for shutdown.
    fn handle(&mut self, ev: Event) -> bool {
        let now = self.now();
        match ev {
            Event::Raft { group, epoch, msg } => self.core.step(now, group, epoch, msg),
            Event::Propose {
                group,
                epoch,
                data,
                ack,
                reply,
            } => {
                let id = self.replies.register(Reply::Propose(reply));
                self.core.propose(now, group, epoch, data, ack, id);
            }
            Event::Flush {
                group,
                epoch,
                reply,
            } => {
                let id = self.replies.register(Reply::Propose(reply));
                self.core.flush(now, group, epoch, id);
            }
            Event::SyncWanted { group, epoch, want } => self.core.sync_wanted(group, epoch, want),
            Event::Written {
                group,
                epoch,
                from,
                w,
            } => self.core.written(group, epoch, from, w),
            Event::Quarantine {
                group,
                epoch,
                from,
                report,
            } => self.core.quarantine_report(now, group, epoch, from, report),
            Event::Tail {
                group,
                epoch,
                from,
                tail,
            } => self.core.tail(now, group, epoch, from, tail),
            Event::Read {
                group,
                epoch,
                reply,
            } => {
                let id = self.replies.register(Reply::Read(reply));
                self.core.read(now, group, epoch, id);
            }
            Event::ReplicaReport { group, hold, reply } => {
                let report = if hold {
                    self.core.replica_report_holding(now, group)
                } else {
                    self.core.replica_report(now, group)
                };
                let _ = reply.send(report);
            }
            Event::Divergent {
                group,
                record,
                reply,
            } => {
                let r = match self.core.divergence(group, &record) {
                    Ok(Some(d)) => Ok(d),
                    Ok(None) => Err(Refused::Failed(format!(
                        "no fenced replica of group {group} on this node"
                    ))),
                    Err(e) => Err(Refused::Failed(format!("read the divergent log: {e}"))),
                };
                let _ = reply.send(r);
            }
            Event::ConfChange { group, cc, reply } => {
                let _ = reply.send(self.core.conf_change(group, cc).map(|_| ()));
            }
            Event::TransferLeader { group, to } => self.core.transfer_leader(group, to),
            Event::Unreachable { node } => self.core.unreachable(node),
            Event::Applied { group, reply } => {
                let _ = reply.send(self.core.applied(group).map(|i| i.0));
            }
            Event::Repair { volume, reply } => {
                if self.core.applied(volume.group()).is_none() {
                    let _ = reply.send(Err(Refused::NoGroup(volume.group())));
                    return false;
                }
                if let Err(e) = self.core.corrupted(volume) {
                    error!(%volume, error = %e, "start the repair; stopping the node");
                    self.failed = Some(format!("repair volume {volume}: {e}"));
                    return true;
                }
                tracing::warn!(%volume, "replica differs from the others (verify): copying the differing blocks");
                let _ = reply.send(Ok(()));
            }
            Event::Status { reply } => {
                let _ = reply.send(self.core.status(now));
            }
            Event::CatchUpDone {
                group,
                from,
                copy_end,
                blocks,
            } => {
                // The copied blocks changed behind the index: hash and fsync them at the
                // next checkpoint, which also drops the replica's recovery record.
                if let Some(v) = self.volumes.get_mut(&VolumeId(group.0)) {
                    v.touch_blocks(&blocks);
                }
                if let Err(e) = self.core.catch_up_done(group, from, copy_end) {
                    // Reading its log back failed: fail-stop like any other disk error.
                    error!(%group, error = %e, "finishing catch-up failed; stopping the node");
                    self.failed = Some(format!("finish catch-up of group {group}: {e}"));
                    return true;
                }
            }
            Event::Shutdown => return true,
        }
        false
    }

    /// The sync in flight ended with `r`: the core completes what it covered.
    fn finish_log_sync(&mut self, r: Result<(), String>) -> anyhow::Result<()> {
        self.stats.log_sync.observe(self.sync_started.elapsed());
        let now = self.now();
        self.core.log_synced(now, r)?;
        self.run_effects()
    }

    /// Waits until every written Ready is persisted (opening, shutting down).
    fn sync_log_now(&mut self) -> anyhow::Result<()> {
        loop {
            let now = self.now();
            self.core.sync_now(now);
            self.run_effects()?;
            if !self.core.sync_in_flight() {
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
}
