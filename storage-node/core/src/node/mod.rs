//! The node core: every Raft group of one storage node and every decision the node makes
//! about them, free of I/O. The storage node's store thread and the simulation drive the
//! same code.
//!
//! In the spirit of raft-rs's `RawNode` and quinn-proto: inputs go in as method calls,
//! each with the time (the core never reads a clock); effects come out of
//! [`NodeCore::take_effects`], to be executed in order. Inputs:
//! - requests: [`NodeCore::propose`], [`NodeCore::flush`], [`NodeCore::read`],
//!   [`NodeCore::conf_change`], [`NodeCore::transfer_leader`];
//! - the network: [`NodeCore::step`] (Raft messages), [`NodeCore::written`] and
//!   [`NodeCore::sync_wanted`] (the acknowledgement protocol), [`NodeCore::unreachable`];
//! - time: [`NodeCore::tick`] (the Raft clock) and [`NodeCore::process`] (one round of
//!   Raft work; call it after a batch of inputs and whenever [`NodeCore::next_wakeup`]
//!   is due);
//! - the disks: [`NodeCore::log_synced`] (the sync asked by [`Effect::StartSync`]
//!   ended), [`NodeCore::checkpoint_begin`]/[`NodeCore::checkpoint_end`] (volume data
//!   made durable), [`NodeCore::catch_up_done`] (a block copy finished),
//!   [`NodeCore::corrupted`] (the scrub found a block that differs from its hash).
//!
//! The log store is the one piece of storage the core touches itself, through the
//! [`LogStore`] trait: it writes each round's batch (raft-rs reads entries back from it
//! at once), while syncs run outside (`StartSync`/`log_synced`), pipelined with writes.
//!
//! Acknowledgement semantics: a proposal is answered after its entry is committed (on a
//! quorum, each of which synced its log) and applied here: durable. A volume write
//! proposed with [`Ack::Written`] (an NBD write without FUA) is answered as soon as a
//! quorum of voters has *written* its entry ([`crate::written`]), before the fsyncs: it
//! survives any number of process crashes, and a flush waits until everything answered
//! before it is committed. Reads wait for every write answered before them (the read
//! index is raised to the highest early answer), so a read never misses an
//! acknowledged write. A `durability=site` write is answered only once a replica outside
//! the home site has synced its entry.
//!
//! Module map: [`api`] (requests, answers, effects, status), `group` (one group's
//! decisions), `ready` (the Ready round, apply, snapshots), `sync` (when the log
//! syncs), `lifecycle` (groups created and removed, checkpoints, catch-up, scrub
//! findings), `election` (seeded election timeouts).

pub mod api;
mod election;
pub mod failover;
mod group;
mod lease;
mod lifecycle;
mod ready;
mod recovery;
mod sync;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raft::eraftpb::{ConfChangeV2, Message, MessageType};

use crate::codec::CodecError;
use crate::group::{GroupConfig, ProposeError, RaftGroup};
use crate::ids::{GroupId, LogIndex, NodeId, Term, VolumeId, META_GROUP};
use crate::lag::LagTracker;
use crate::logstore::{GroupState, LogBatch, LogOp, LogStore, StoreError};
use crate::meta::ClusterState;
use crate::stats::StoreStats;
use crate::time::Time;
use crate::written::WrittenTracker;

pub use api::{
    Ack, Answer, CheckpointPlan, Divergence, Effect, GroupStatus, LeaderLog, Note, Outcome,
    PeerStatus, QuarantineEnd, QuarantineReport, Refused, ReplicaReport, ReqId, Role, SyncWanted,
    TailReport, Written,
};
use group::{GroupCore, Kind, Out, Policy};
pub use recovery::{synced_key, QUARANTINE_REPORT_FRESH};

/// Proposals waiting for their entry to apply, per group; more are refused (`Busy`).
pub const PENDING_PROPOSALS_MAX: usize = 8192;
/// Reads waiting for a read index or for apply, per group.
pub const PENDING_READS_MAX: usize = 8192;
/// A read whose read index has not arrived by then (no leader, partition) is refused
/// with `Superseded` so that the caller retries or forwards.
pub const READ_INDEX_TIMEOUT: Duration = Duration::from_millis(2000);
/// Bytes of writes a leader may have answered before their commit (`Ack::Written`);
/// beyond it, writes are answered at commit. Bounds what a power loss of a quorum could
/// take of acknowledged, unflushed writes, and the entries held for it.
pub const EARLY_ACK_BYTES_MAX: u64 = 16 << 20;
/// Longest a rebooted voter stays quarantined without hearing a leader (see `recovery`).
/// Long enough for a voter that merely restarts, or a short partition, to come back;
/// short enough that a voter gone for good (a lost disk) stops the group for seconds,
/// not until an operator steps in.
pub const QUARANTINE_MAX: Duration = Duration::from_secs(15);
/// A recovering leader hands leadership on at most this often: when every voter is
/// copying blocks, each hands it to the next, and the soak saw 655,000 terms in minutes.
pub const RECOVERING_HANDOVER_MIN: Duration = Duration::from_secs(1);
/// A degraded site-durable volume (`degrade-after`) is site-durable again once a remote
/// replica lacks at most this many entries (TiKV's sync-recover).
pub const DEGRADED_RECOVER_ENTRIES: u64 = 256;
/// Longest a proposal is held while its leader transfers leadership.
pub const HELD_PROPOSAL_MAX: Duration = Duration::from_millis(1000);
/// Entries kept in a group's log behind the durable applied index, so that a briefly
/// lagging follower catches up from the log instead of a snapshot...
pub const RETAINED_LOG_ENTRIES: u64 = 1024;
/// ...unless they hold more than this many bytes of commands. Keeping the retained log
/// small lets RocksDB drop compacted entries while they are still in its memtable,
/// instead of writing them to SST files (measured: 1 MiB writes went from 50 MiB/s).
pub const RETAINED_LOG_BYTES: u64 = 32 << 20;

/// How long a node may answer volume requests after the metadata quorum last confirmed
/// it is in touch (see `lease`): a site cut off from the metadata majority suspends its
/// answers this long after its last renewal, and a forced failover waits this long (plus
/// [`LEASE_DRIFT`]) before the new home answers. Renewed every quarter of it (one
/// metadata read index a second per node).
pub const LEASE: Duration = Duration::from_secs(4);
/// How much longer than [`LEASE`] a new epoch holds its answers: covers clocks whose
/// rates differ by up to 5.8 % (see `lease`).
pub const LEASE_DRIFT: Duration = Duration::from_millis(500);
/// How often a leader tells the replicas at other sites how far its log reaches and how
/// far behind they are (`Effect::Tail`): what a failover plan states as the loss.
pub const TAIL_REPORT_INTERVAL: Duration = Duration::from_millis(250);

/// Record holding the metadata state as of the metadata group's recorded applied index.
pub const META_SNAPSHOT_KEY: &[u8] = b"meta/state";

/// Record marking a volume replica whose data must be caught up (it installed a Raft
/// snapshot at the given index, or the scrub found it corrupted, and it has not copied
/// the blocks yet). Written in the same batch as the snapshot, so a restart knows the
/// replica's data is not trustworthy.
pub fn recovering_key(group: GroupId) -> Vec<u8> {
    let mut k = b"recover/".to_vec();
    k.extend_from_slice(&group.0.to_be_bytes());
    k
}

/// Record of where a finished block copy's data becomes one state (value: the copy's
/// end, `serve_after`): kept from the checkpoint that ends the recovery until one
/// records an applied index past it, so that a restart in between still refuses reads
/// and still reports the replica as not whole to a failover plan.
pub fn whole_key(group: GroupId) -> Vec<u8> {
    let mut k = b"whole/".to_vec();
    k.extend_from_slice(&group.0.to_be_bytes());
    k
}

/// A deliberately broken rule, for the simulation's negative controls: each must be
/// caught by an invariant. Set on a storage node only by a test's negative control
/// (`ROAMDISK_CORE_BUG`, which the node refuses unless test faults are on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoreBug {
    /// Send votes and append responses when their batch is written, before its sync.
    AckBeforeSync,
    /// Answer a write early once the leader alone has written it (no quorum).
    EarlyAckOnLeaderWrite,
    /// Answer a flush before the writes it covers are committed.
    FlushBeforeCommit,
    /// Accept a finished block copy made for an earlier recovery point.
    AcceptStaleCatchUp,
    /// Open a store trusting every log entry it reads (only syncing it), as if no sync
    /// could have failed before: entries a failed fsync left in the page cache only are
    /// then acknowledged as persisted.
    TrustLogAfterFailedSync,
    /// Vote at once after a reboot without a clean shutdown, having forgotten entries
    /// reported as written to the leader.
    NoQuarantine,
    /// Report entries written (`Written`) in a term this follower has not synced yet: a
    /// power loss would take the term and the entries, and a leader of the older term
    /// would end its quarantine.
    WrittenBeforeTermSynced,
    /// End a quarantine on the first message of a leader of the quarantine's term or
    /// later, before this node's log holds what it forgot (the rule before the seed
    /// sweep found `roamdisk-sim --seed 1624`).
    QuarantineEndsOnLeaderHeard,
    /// Answer volume requests without the lease from the metadata quorum: a cut-off home
    /// goes on acknowledging after another site took its volumes over (the chaos
    /// `split-brain` drill must catch it).
    IgnoreLease,
}

impl CoreBug {
    pub const ALL: [CoreBug; 9] = [
        CoreBug::AckBeforeSync,
        CoreBug::EarlyAckOnLeaderWrite,
        CoreBug::FlushBeforeCommit,
        CoreBug::AcceptStaleCatchUp,
        CoreBug::TrustLogAfterFailedSync,
        CoreBug::NoQuarantine,
        CoreBug::WrittenBeforeTermSynced,
        CoreBug::QuarantineEndsOnLeaderHeard,
        CoreBug::IgnoreLease,
    ];

    /// The bug's name, as `roamdisk-sim --bug NAME` and a test node's
    /// `ROAMDISK_CORE_BUG` take it.
    pub fn name(self) -> &'static str {
        match self {
            CoreBug::AckBeforeSync => "ack-before-sync",
            CoreBug::EarlyAckOnLeaderWrite => "early-ack-alone",
            CoreBug::FlushBeforeCommit => "flush-early",
            CoreBug::AcceptStaleCatchUp => "stale-copy",
            CoreBug::TrustLogAfterFailedSync => "trust-log",
            CoreBug::NoQuarantine => "no-quarantine",
            CoreBug::WrittenBeforeTermSynced => "written-before-term-synced",
            CoreBug::QuarantineEndsOnLeaderHeard => "quarantine-ends-on-leader-heard",
            CoreBug::IgnoreLease => "no-lease",
        }
    }

    pub fn named(name: &str) -> Option<CoreBug> {
        CoreBug::ALL.into_iter().find(|b| b.name() == name)
    }
}

#[derive(Clone)]
pub struct NodeConfig {
    pub me: NodeId,
    pub group: GroupConfig,
    /// Voters of the metadata group when it is bootstrapped on an empty store.
    pub initial_meta_voters: Vec<NodeId>,
    /// A new node joining a running cluster: its metadata group starts with no members
    /// and waits for the metadata leader to add it (as a learner) and send a snapshot.
    pub joining: bool,
    /// Seeds the election timeouts (see `election`): a storage node passes something
    /// random, the simulation its run's seed.
    pub election_seed: u64,
    /// Create and remove volume groups as the metadata places volumes on this node, and
    /// add joined nodes to the metadata group. Off in the simulation, whose groups and
    /// memberships are its own.
    pub reconcile: bool,
    /// Entries kept behind the durable applied index when compacting.
    pub retained_log_entries: u64,
    pub retained_log_bytes: u64,
    /// The machine rebooted since this store was last open, without a clean shutdown
    /// (a power loss): entries written and not synced may be forgotten, so each group
    /// this node votes in starts quarantined (see `recovery`).
    pub rebooted: bool,
    /// Longest a quarantine lasts without a leader heard.
    pub quarantine_max: Duration,
    /// The lease (see `lease`): `None` turns it off (answers never wait for it), for
    /// tests and clusters that never fail over.
    pub lease: Option<Duration>,
    /// The extra fencing wait of a new epoch (see `lease`).
    pub lease_drift: Duration,
    /// Wall-clock time (Unix ms) at `Time::ZERO`: proposals are stamped with it plus
    /// the input's time (the home-site time a failover plan states its loss in).
    pub wall_epoch_unix_ms: u64,
    /// Emit [`Effect::Note`]s for a checker.
    pub observe: bool,
    pub bug: Option<CoreBug>,
    pub logger: slog::Logger,
}

impl NodeConfig {
    pub fn new(me: NodeId, group: GroupConfig, logger: slog::Logger) -> NodeConfig {
        NodeConfig {
            me,
            group,
            initial_meta_voters: Vec::new(),
            joining: false,
            election_seed: me.0,
            reconcile: true,
            retained_log_entries: RETAINED_LOG_ENTRIES,
            retained_log_bytes: RETAINED_LOG_BYTES,
            rebooted: false,
            quarantine_max: QUARANTINE_MAX,
            lease: Some(LEASE),
            lease_drift: LEASE_DRIFT,
            wall_epoch_unix_ms: 0,
            observe: false,
            bug: None,
            logger,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("log store: {0}")]
    Store(#[from] StoreError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("decode: {0}")]
    Codec(#[from] CodecError),
    #[error("{0}")]
    Invalid(String),
}

pub struct NodeCore<S: LogStore> {
    cfg: NodeConfig,
    log: Arc<S>,
    groups: BTreeMap<GroupId, GroupCore<S>>,
    cluster: ClusterState,
    effects: Vec<Effect>,
    stats: Arc<StoreStats>,
    next_read_ctx: u64,
    sync: sync::SyncState,
    election: election::ElectionRng,
    /// The checkpoint in flight (its sequence number), and the last one's number.
    checkpoint_in_flight: bool,
    checkpoint_seq: u64,
    /// Counts replicas opened and recoveries started (see `Group::recovery_gen`).
    recoveries: u64,
    /// Recovery points last published (`Effect::Recovering`).
    recovering_published: Vec<(GroupId, LogIndex)>,
    /// A snapshot could not be read from the log store (raft-rs asked for it from inside
    /// a call that cannot return the error): the next `process` fails.
    snapshot_error: Arc<Mutex<Option<String>>>,
    /// This node's lease from the metadata quorum (see `lease`).
    lease: lease::Lease,
    /// The time of the latest `process` or `tick`.
    last_now: Time,
}

/// An [`group::Out`] for an input at `$now` (answers gated by the lease).
macro_rules! out {
    ($core:ident, $now:expr) => {
        Out {
            effects: &mut $core.effects,
            stats: &$core.stats,
            observe: $core.cfg.observe,
            bug: $core.cfg.bug,
            now: $now,
            unix_ms: if $core.cfg.wall_epoch_unix_ms == 0 {
                0
            } else {
                $core.cfg.wall_epoch_unix_ms + $now.as_micros() / 1000
            },
            open: $core.cfg.bug == Some($crate::node::CoreBug::IgnoreLease)
                || $core.lease.open(&$core.cfg, $now),
            leased_since_start: $core.cfg.lease.is_none() || $core.lease.until.is_some(),
        }
    };
}
pub(crate) use out;

impl<S: LogStore> NodeCore<S> {
    /// Opens every group found in `log`, bootstrapping the metadata group on a new
    /// store. Everything found is synced first: a process crash keeps what was written
    /// but not synced, and raft-rs takes the store as persisted. The effects (volumes to
    /// open, the cluster view) are waiting in [`NodeCore::take_effects`]; call
    /// [`NodeCore::process`] next to apply what was committed before the restart.
    pub fn open(
        cfg: NodeConfig,
        log: Arc<S>,
        stats: Arc<StoreStats>,
        now: Time,
    ) -> Result<NodeCore<S>, CoreError> {
        if log.state(META_GROUP)?.is_none() {
            let mut cs = raft::eraftpb::ConfState::default();
            cs.voters = cfg.initial_meta_voters.iter().map(|n| n.0).collect();
            if cs.voters.is_empty() && !cfg.joining {
                return Err(CoreError::Invalid(
                    "a new node needs the initial metadata voters (--initial-cluster) or a member to join (--join)".into(),
                ));
            }
            let mut b = LogBatch::default();
            b.push(LogOp::Create {
                group: META_GROUP,
                state: GroupState {
                    conf_state: cs,
                    ..Default::default()
                },
            });
            log.write(b)?;
        }
        // A process crash keeps what was written but not synced (RocksDB's WAL is in the
        // page cache); raft-rs takes the store as persisted and would acknowledge those
        // entries again without a new write. Make them durable before anything is
        // acknowledged. (Found by the simulation: `roamdisk-sim --stress
        // --no-restart-sync --seed 288`.)
        log.sync()?;
        // Entries past each group's synced mark may be in the page cache only (a failed
        // fsync): write them again and sync, before anything is acknowledged.
        let synced = recovery::rewrite_unproven(
            log.as_ref(),
            cfg.bug == Some(CoreBug::TrustLogAfterFailedSync),
        )?;
        let mut cluster = ClusterState::default();
        if let Some(bytes) = log.get(META_SNAPSHOT_KEY)? {
            cluster = ClusterState::decode(&bytes)?;
        }
        let election = election::ElectionRng::new(cfg.election_seed);
        let mut core = NodeCore {
            cfg,
            log,
            groups: BTreeMap::new(),
            cluster,
            effects: Vec::new(),
            stats,
            next_read_ctx: 1,
            sync: sync::SyncState::new(now),
            election,
            checkpoint_in_flight: false,
            checkpoint_seq: 0,
            recoveries: 0,
            recovering_published: Vec::new(),
            snapshot_error: Arc::default(),
            lease: lease::Lease::default(),
            last_now: now,
        };
        let mut records = LogBatch::default();
        for g in core.log.groups()? {
            core.open_group(g, now)?;
            let recorded = match core.log.get(&recovery::quarantine_key(g))? {
                Some(v) => Some(u64::from_be_bytes(v.as_slice().try_into().map_err(
                    |_| CoreError::Invalid(format!("corrupt quarantine record of group {g}")),
                )?)),
                None => None,
            };
            let group = core.groups.get_mut(&g).expect("opened");
            group.synced_to = recovery::synced_at_open(&synced, g).0;
            group.term_synced = group.raft.term().0;
            group.quarantine_recorded = recorded.is_some();
            let me = core.cfg.me;
            let (voters, outgoing) = group.raft.voter_sets();
            if (core.cfg.rebooted || recorded.is_some())
                && core.cfg.bug != Some(CoreBug::NoQuarantine)
                && (voters.contains(&me) || outgoing.contains(&me))
            {
                let term = recorded.unwrap_or(group.raft.term().0);
                tracing::warn!(group = %g, term, "rebooted without a clean shutdown: \
                    quarantined (no votes) until this log holds a current leader's log end, half of \
                    the voters are quarantined, or {:?} pass", core.cfg.quarantine_max);
                group.quarantine = Some(recovery::Quarantine {
                    since: now,
                    term,
                    ..Default::default()
                });
                if recorded.is_none() {
                    records.push(LogOp::Put {
                        key: recovery::quarantine_key(g),
                        value: term.to_be_bytes().to_vec(),
                    });
                    group.quarantine_recorded = true;
                }
            }
        }
        if !records.is_empty() {
            // Durable before anything runs: a crash during the quarantine keeps it.
            core.log.write(records)?;
            core.log.sync()?;
        }
        core.effects.push(Effect::ClusterChanged);
        core.publish_recovering();
        Ok(core)
    }

    /// Opens group `g` from the log store.
    fn open_group(&mut self, g: GroupId, now: Time) -> Result<(), CoreError> {
        let st = self
            .log
            .state(g)?
            .ok_or_else(|| CoreError::Invalid(format!("group {g} vanished")))?;
        let recovering = match self.log.get(&recovering_key(g))? {
            Some(v) => Some(LogIndex(u64::from_be_bytes(
                v.as_slice().try_into().map_err(|_| {
                    CoreError::Invalid(format!("corrupt recovery record of group {g}"))
                })?,
            ))),
            None => None,
        };
        // A recovery point below the log's start cannot be replayed from (the entries
        // after it are compacted): a power loss kept the record of a catch-up whose end
        // the compaction had already followed (`roamdisk-sim --seed 1636`). Copying for
        // the log's start instead is as good: the copy's source has applied at least the
        // point, and the replay of what follows is idempotent.
        let recovering = recovering.map(|p| {
            if p.0 < st.truncated_index {
                tracing::warn!(group = %g, recorded = p.0, log_start = st.truncated_index,
                    "recovery point below the log's start: copying for the log's start");
                LogIndex(st.truncated_index)
            } else {
                p
            }
        });
        let serve_after = match self.log.get(&whole_key(g))? {
            Some(v) => u64::from_be_bytes(v.as_slice().try_into().map_err(|_| {
                CoreError::Invalid(format!("corrupt whole-at record of group {g}"))
            })?),
            None => 0,
        };
        let kind = if g == META_GROUP {
            Kind::Meta
        } else {
            Kind::Volume
        };
        let (epoch, epoch_start) = match self.log.get(&failover::epoch_key(g))? {
            Some(v) => failover::decode_epoch(&v)
                .ok_or_else(|| CoreError::Invalid(format!("corrupt epoch record of group {g}")))?,
            None => (0, 0),
        };
        let fenced = match self.log.get(&failover::fenced_key(g))? {
            Some(v) => Some(u64::from_be_bytes(v.as_slice().try_into().map_err(
                |_| CoreError::Invalid(format!("corrupt fence record of group {g}")),
            )?)),
            None => None,
        };
        // A fencing wait that had not ended: wait again, in full.
        let hold_until = match (self.log.get(&failover::hold_key(g))?, self.cfg.lease) {
            (Some(_), Some(lease)) => Some(now + lease + self.cfg.lease_drift),
            _ => None,
        };
        let mut config = self.cfg.group.clone();
        if kind == Kind::Meta {
            // The lease is granted on the strength of a metadata read index: it must be
            // confirmed by a quorum round, not by the metadata leader's own lease.
            config.lease_reads = false;
        }
        let raft = RaftGroup::open(
            g,
            self.cfg.me,
            Arc::clone(&self.log),
            &config,
            self.snapshot_fn(g),
            epoch,
            epoch_start,
            &self.cfg.logger,
        )?;
        // Without reconcile the driver sets the policy (`set_site_durable`).
        let policy = match self.cluster.volume_by_id(VolumeId(g.0)) {
            Some(v) if kind == Kind::Volume && self.cfg.reconcile => Policy::of(&self.cluster, v),
            _ => Policy::default(),
        };
        if kind == Kind::Volume {
            let size = self
                .cluster
                .volume_by_id(VolumeId(g.0))
                .map_or(0, |v| v.size);
            self.effects.push(Effect::VolumeCreated {
                volume: VolumeId(g.0),
                size,
            });
        }
        let mut group = GroupCore {
            raft,
            kind,
            applied: LogIndex(st.applied_index),
            durable_applied: LogIndex(st.applied_index),
            proposals: BTreeMap::new(),
            early: BTreeMap::new(),
            early_uncommitted: Default::default(),
            early_uncommitted_bytes: 0,
            written: WrittenTracker::default(),
            early_acked: 0,
            flushes: Vec::new(),
            reads_waiting_index: BTreeMap::new(),
            reads_waiting_apply: Vec::new(),
            retained: Default::default(),
            retained_bytes: 0,
            recovering,
            deferred_to: st.applied_index,
            serve_after,
            whole_recorded: serve_after > 0,
            recovery_gen: {
                self.recoveries += 1;
                self.recoveries
            },
            recovery_record_stale: false,
            lag: LagTracker::new(now),
            policy,
            site_waiting: Default::default(),
            degraded_since: None,
            degraded_at: 0,
            meta_replies: Vec::new(),
            held: Vec::new(),
            synced_to: 0,
            term_synced: 0,
            // Unknown: the next batch records the mark.
            mark_written: u64::MAX,
            quarantine: None,
            quarantine_recorded: false,
            quarantine_answered: BTreeMap::new(),
            sync_wanted: SyncWanted::default(),
            read_asked: false,
            // Never a real key: the first `fix` draws a timeout.
            election_seen: (raft::StateRole::Leader, u64::MAX, u64::MAX),
            epoch,
            epoch_start,
            hold_until,
            recovery_unsynced: None,
            failover_hold: self
                .log
                .get(&failover::failover_hold_key(g))?
                .map(|_| now + failover::FAILOVER_HOLD),
            fenced,
            suspended: Vec::new(),
            heard_leader: None,
            tail: None,
            tail_sent: Time::ZERO,
            handed_over_at: None,
        };
        self.election.fix(&mut group);
        self.groups.insert(g, group);
        Ok(())
    }

    /// What raft-rs puts in a snapshot of group `g`: the metadata state as of its
    /// recorded applied index (kept in a record written with that index); nothing for a
    /// volume, whose receiver copies blocks by hash diff instead (catch-up). A failed read
    /// must not become an empty snapshot (it would wipe the receiver's metadata): it is
    /// reported as unavailable for now, and the next `process` stops the node.
    fn snapshot_fn(
        &self,
        g: GroupId,
    ) -> Arc<dyn Fn(GroupId) -> Result<Vec<u8>, StoreError> + Send + Sync> {
        if g != META_GROUP {
            return Arc::new(|_| Ok(Vec::new()));
        }
        let log = Arc::clone(&self.log);
        let failed = Arc::clone(&self.snapshot_error);
        Arc::new(move |_| {
            let r = log.get(META_SNAPSHOT_KEY).and_then(|v| {
                v.ok_or_else(|| StoreError::Corrupt {
                    what: "metadata snapshot",
                    detail: "no recorded metadata state".into(),
                })
            });
            if let Err(e) = &r {
                *failed.lock().expect("snapshot error cell") = Some(e.to_string());
            }
            r
        })
    }

    /// The effects emitted since the last call, in order.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// Entries kept behind the durable applied index by later checkpoints (the
    /// simulation's "compact everything" fault sets 0 for one checkpoint).
    pub fn set_retained_log_entries(&mut self, entries: u64) {
        self.cfg.retained_log_entries = entries;
    }

    pub fn retained_log_entries(&self) -> u64 {
        self.cfg.retained_log_entries
    }

    pub fn me(&self) -> NodeId {
        self.cfg.me
    }

    pub fn cluster(&self) -> &ClusterState {
        &self.cluster
    }

    pub fn stats(&self) -> &Arc<StoreStats> {
        &self.stats
    }

    /// Groups on this node.
    pub fn group_ids(&self) -> Vec<GroupId> {
        self.groups.keys().copied().collect()
    }

    /// The Raft group `g` (read-only), for drivers that inspect it (the simulation).
    pub fn raft(&self, g: GroupId) -> Option<&RaftGroup<S>> {
        self.groups.get(&g).map(|g| &g.raft)
    }

    /// The applied index of group `g` on this node.
    pub fn applied(&self, g: GroupId) -> Option<LogIndex> {
        self.groups.get(&g).map(|g| g.applied)
    }

    /// The recovery point of group `g`, if its replica must copy blocks.
    pub fn recovering(&self, g: GroupId) -> Option<LogIndex> {
        self.groups.get(&g).and_then(|g| g.recovering)
    }

    /// Why a request of `epoch` (`None`: whatever is current) cannot be served by this
    /// node's replica of `group`: another epoch, or fenced.
    fn epoch_refusal(g: &GroupCore<S>, group: GroupId, epoch: Option<u64>) -> Option<Refused> {
        if let Some(fenced) = g.fenced {
            return Some(Refused::Fenced {
                group,
                epoch: fenced,
                asked: epoch.unwrap_or(g.epoch),
            });
        }
        match epoch {
            Some(e) if e != g.epoch => Some(Refused::Fenced {
                group,
                epoch: g.epoch,
                asked: e,
            }),
            _ => None,
        }
    }

    /// Proposes `data` in `group`, answered as `ack` says (see [`Ack`]); `epoch` is the
    /// epoch the request belongs to (`None`: the current one).
    pub fn propose(
        &mut self,
        now: Time,
        group: GroupId,
        epoch: Option<u64>,
        data: Vec<u8>,
        ack: Ack,
        id: ReqId,
    ) {
        let Some(g) = self.groups.get_mut(&group) else {
            self.effects.push(Effect::Answer {
                id,
                answer: Err(Refused::NoGroup(group)),
            });
            return;
        };
        if let Some(r) = Self::epoch_refusal(g, group, epoch) {
            self.effects.push(Effect::Answer { id, answer: Err(r) });
            return;
        }
        // Everything a proposal may wait in counts: `site_waiting` takes applied
        // proposals while no other site has them, `suspended` answers the lease holds.
        if g.pending() >= PENDING_PROPOSALS_MAX {
            self.effects.push(Effect::Answer {
                id,
                answer: Err(Refused::Busy),
            });
            return;
        }
        if g.raft.is_leader() && g.raft.transferring_to().is_some() {
            g.held.push((now, data, ack, id));
            return;
        }
        let mut out = out!(self, now);
        g.propose(now, data, ack, id, &mut out);
    }

    /// Completes once every write of `group` answered before it is committed (this node
    /// must lead the group). Answers `Outcome::Volume`.
    pub fn flush(&mut self, now: Time, group: GroupId, epoch: Option<u64>, id: ReqId) {
        let mut out = out!(self, now);
        let Some(g) = self.groups.get_mut(&group) else {
            out.answer(id, Err(Refused::NoGroup(group)));
            return;
        };
        if let Some(r) = Self::epoch_refusal(g, group, epoch) {
            out.answer(id, Err(r));
            return;
        }
        if !g.raft.is_leader() {
            let leader = g.raft.leader();
            out.answer(id, Err(Refused::NotLeader { group, leader }));
            return;
        }
        if g.flushes.len() >= PENDING_PROPOSALS_MAX {
            out.answer(id, Err(Refused::Busy));
            return;
        }
        g.flushes.push((g.early_acked, now, id));
        g.release_flushes(now, &mut out);
    }

    /// Completes once this node may serve a linearizable read of `group`: its data
    /// holds every write committed or acknowledged before the call.
    pub fn read(&mut self, now: Time, group: GroupId, epoch: Option<u64>, id: ReqId) {
        let Some(g) = self.groups.get_mut(&group) else {
            self.effects.push(Effect::Answer {
                id,
                answer: Err(Refused::NoGroup(group)),
            });
            return;
        };
        let refused = if let Some(r) = Self::epoch_refusal(g, group, epoch) {
            Some(r)
        } else if !g.serves_reads() {
            Some(Refused::Recovering(group))
        } else if g.reads_waiting_index.len() + g.reads_waiting_apply.len() >= PENDING_READS_MAX {
            Some(Refused::Busy)
        } else {
            None
        };
        if let Some(r) = refused {
            self.effects.push(Effect::Answer { id, answer: Err(r) });
            return;
        }
        let ctx = self.next_read_ctx;
        self.next_read_ctx += 1;
        g.reads_waiting_index.insert(ctx, (now, id));
        g.raft.read_index(ctx.to_be_bytes().to_vec());
    }

    /// Proposes a membership change in `group` (this node must lead it).
    pub fn conf_change(&mut self, group: GroupId, cc: ConfChangeV2) -> Result<LogIndex, Refused> {
        let g = self.groups.get_mut(&group).ok_or(Refused::NoGroup(group))?;
        if let Some(r) = Self::epoch_refusal(g, group, None) {
            return Err(r);
        }
        match g.raft.propose_conf_change(cc) {
            Ok(index) => {
                tracing::info!(%group, index = index.0, "membership change proposed");
                Ok(index)
            }
            Err(ProposeError::NotLeader { leader }) => Err(Refused::NotLeader { group, leader }),
            Err(ProposeError::Dropped) => Err(Refused::Busy),
            Err(ProposeError::Raft(e)) => Err(Refused::Failed(e)),
        }
    }

    /// Asks this node's replica of `group`, if it leads, to hand leadership to `to`.
    pub fn transfer_leader(&mut self, group: GroupId, to: NodeId) {
        if let Some(g) = self.groups.get_mut(&group) {
            g.raft.transfer_leader(to);
            self.election.fix(g);
        }
    }

    /// A Raft message of `group`, sent in the sender's `epoch` of it, arrived. A message
    /// of another epoch, or for a fenced replica, is dropped (see `failover`).
    pub fn step(&mut self, now: Time, group: GroupId, epoch: u64, msg: Message) {
        let observe = self.cfg.observe;
        let Some(g) = self.groups.get_mut(&group) else {
            tracing::debug!(%group, from = msg.from, "message for a group not on this node");
            return;
        };
        if g.fenced.is_some() || epoch != g.epoch {
            self.stats
                .fenced_messages
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(%group, from = msg.from, epoch, ours = g.epoch,
                "message of another epoch dropped");
            return;
        }
        if msg.get_msg_type() == MessageType::MsgSnapshot
            && g.failover_hold.is_some_and(|h| now < h)
        {
            tracing::info!(%group, from = msg.from,
                "reported for a failover being executed: snapshot not installed");
            return;
        }
        if g.raft.leader() == Some(NodeId(msg.from)) || msg.term > g.raft.term().0 {
            g.heard_leader = Some(now);
        }
        if msg.get_msg_type() == MessageType::MsgReadIndex {
            g.read_asked = true;
        }
        if msg.get_msg_type() == MessageType::MsgAppendResponse
            && msg.reject
            && msg.term == g.raft.term().0
            && g.raft.is_leader()
        {
            // Within one term a follower whose log matched ours up to its report rejects
            // only if it lost entries since (a power loss): its report no longer holds.
            g.written.forget(NodeId(msg.from));
        }
        if !Self::quarantine_filter(g, &msg, self.cfg.bug) {
            tracing::debug!(%group, from = msg.from, "quarantined: vote request dropped");
            return;
        }
        let before = observe.then(|| ready::commit_view(g));
        if let Err(e) = g.raft.step(msg) {
            tracing::debug!(%group, error = %e, "raft step refused a message");
        }
        self.election.fix(g);
        if let Some(b) = before {
            ready::note_commit(g, b, &mut self.effects);
        }
    }

    /// A follower wrote its log (see [`Written`]): counted only in this leader's term
    /// and only where the follower's log matches ours (see [`crate::written`]).
    pub fn written(&mut self, group: GroupId, epoch: u64, from: NodeId, w: Written) {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        if g.epoch == epoch
            && g.fenced.is_none()
            && g.raft.is_leader()
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

    /// The leader wants this replica's log synced (see [`SyncWanted`]).
    pub fn sync_wanted(&mut self, group: GroupId, epoch: u64, want: SyncWanted) {
        if let Some(g) = self.groups.get_mut(&group).filter(|g| g.epoch == epoch) {
            if (want.term, want.index) > (g.sync_wanted.term, g.sync_wanted.index) {
                g.sync_wanted = want;
            }
        }
    }

    /// The connection to `node` failed: raft-rs stops pipelining appends to it.
    pub fn unreachable(&mut self, node: NodeId) {
        for g in self.groups.values_mut() {
            g.raft.report_unreachable(node);
        }
    }

    /// A snapshot sent to `to` arrived (`ok`) or was lost.
    pub fn snapshot_status(&mut self, group: GroupId, to: NodeId, ok: bool) {
        if let Some(g) = self.groups.get_mut(&group) {
            g.raft.report_snapshot(to, ok);
        }
    }

    /// One tick of the Raft clock (heartbeats, elections, check-quorum), plus what is
    /// timed by it: replication lag samples, answers of site-durable writes, expired
    /// read indexes, and adding joined nodes to the metadata group.
    pub fn tick(&mut self, now: Time) {
        if self.cfg.reconcile {
            self.add_meta_learners();
        }
        self.last_now = self.last_now.max(now);
        self.lease_tick(now);
        if let Err(e) = self.end_holds(now) {
            // Only a record: the next tick tries again; a restart waits again.
            tracing::warn!(error = %e, "drop a fencing-wait record");
        }
        let observe = self.cfg.observe;
        let lapsed = self.cfg.lease.is_some() && !self.lease_valid(now);
        let mut out = out!(self, now);
        let me = self.cfg.me;
        let quarantine_max = self.cfg.quarantine_max;
        for g in self.groups.values_mut() {
            if g.fenced.is_some() {
                continue;
            }
            if lapsed && !g.suspended.is_empty() && g.raft.is_leader() {
                tracing::debug!(group = %g.id(), waiting = g.suspended.len(),
                    "no lease from the metadata quorum: answers suspended");
            }
            g.release_suspended(&mut out);
            g.release_site_waiting(&mut out);
            g.expire_reads(now, READ_INDEX_TIMEOUT, &mut out);
            if g.quarantine.is_some() {
                // No campaign while quarantined (raft-rs would start one on its timeout).
                Self::quarantine_tick(me, g, now, quarantine_max, observe, out.effects);
                continue;
            }
            let before = observe.then(|| ready::commit_view(g));
            g.raft.tick();
            self.election.fix(g);
            if let Some(b) = before {
                ready::note_commit(g, b, out.effects);
            }
            if g.raft.is_leader() {
                let progress = g.raft.progress();
                for p in &progress {
                    g.lag.observe(p.node.0, p.matched, now);
                }
                if let Some(min) = progress.iter().map(|p| p.matched).min() {
                    g.lag.shipped_to_all(min);
                }
                if now.saturating_duration_since(g.tail_sent) >= TAIL_REPORT_INTERVAL {
                    g.tail_sent = now;
                    g.report_tail(now, &progress, &mut out);
                }
            }
        }
    }

    /// The leader's tail report (see [`Effect::Tail`]) arrived from `from`.
    pub fn tail(&mut self, now: Time, group: GroupId, epoch: u64, from: NodeId, t: TailReport) {
        if let Some(g) = self.groups.get_mut(&group) {
            if g.epoch == epoch
                && g.fenced.is_none()
                && t.term >= g.raft.term().0
                && g.tail
                    .is_none_or(|(_, old)| (old.term, old.last) <= (t.term, t.last))
            {
                let _ = from;
                g.tail = Some((now, t));
            }
        }
    }

    /// What this replica of `group` knows that a failover plan needs.
    pub fn replica_report(&self, now: Time, group: GroupId) -> Option<ReplicaReport> {
        let g = self.groups.get(&group)?;
        let stamp = |i: u64| -> Option<u64> {
            if i == 0 || i < g.raft.first_index().0 {
                return None;
            }
            let e = self.log.entries(group, i, i + 1, u64::MAX).ok()?;
            e.first().and_then(crate::group::entry_stamp)
        };
        // The newest stamped entry at or below `i` (the leader's empty entries have none).
        let stamp_at_or_below = |i: u64| -> Option<u64> {
            let low = g.raft.first_index().0.max(1);
            (low..=i).rev().take(64).find_map(stamp)
        };
        let last = g.raft.last_index().0;
        let commit = g.raft.commit_index().0;
        let ms_ago = |t: Time| now.saturating_duration_since(t).as_millis() as u64;
        Some(ReplicaReport {
            node: self.cfg.me.0,
            epoch: g.epoch,
            term: g.raft.term().0,
            last_index: last,
            last_term: g.raft.log_term(LogIndex(last)).map_or(0, |t| t.0),
            commit,
            applied: g.applied.0,
            last_unix_ms: stamp_at_or_below(last),
            commit_unix_ms: stamp_at_or_below(commit),
            recovering: g.recovering.is_some(),
            whole_at: g.serve_after,
            fenced: g.fenced.is_some(),
            heard_leader_ms_ago: if g.raft.is_leader() {
                Some(0)
            } else {
                g.heard_leader.map(ms_ago)
            },
            leader: g.raft.leader().map(|n| n.0),
            tail: g.tail.map(|(_, t)| t),
            tail_ms_ago: g.tail.map(|(at, _)| ms_ago(at)),
        })
    }

    /// Status of every group on this node.
    pub fn status(&self, now: Time) -> Vec<GroupStatus> {
        self.groups
            .iter()
            .map(|(id, g)| {
                let cs = g.raft.conf_state();
                let mut voters = cs.voters.clone();
                voters.sort_unstable();
                let mut learners = cs.learners.clone();
                learners.sort_unstable();
                // A fenced replica's Raft state is frozen as it was: it leads nothing.
                let fenced = g.fenced.is_some();
                GroupStatus {
                    group: id.0,
                    role: if fenced {
                        Role::Follower
                    } else {
                        g.raft.role().into()
                    },
                    leader: g.raft.leader().map(|n| n.0).filter(|_| !fenced),
                    term: g.raft.term().0,
                    commit: g.raft.commit_index().0,
                    applied: g.raft.applied_index().0,
                    durable_applied: g.durable_applied.0,
                    last_index: g.raft.last_index().0,
                    progress: if g.raft.is_leader() && !fenced {
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
                    quarantined: g.quarantine.is_some(),
                    epoch: g.epoch,
                    fenced: g.fenced.is_some(),
                    suspended: g.kind == Kind::Volume
                        && (!self.lease_valid(now) || g.hold_until.is_some_and(|h| now < h)),
                    degraded: g.degraded_since.is_some(),
                    voters,
                    learners,
                    joint: !cs.voters_outgoing.is_empty(),
                }
            })
            .collect()
    }

    /// Refuses everything waiting on every group (the node stops).
    pub fn shutdown(&mut self) {
        let mut out = Out::refusing(&mut self.effects, &self.stats, self.cfg.observe);
        for g in self.groups.values_mut() {
            g.fail_all(Refused::Shutdown, &mut out);
        }
    }
}
