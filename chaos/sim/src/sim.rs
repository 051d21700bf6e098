//! The simulation: a seeded event loop over simulated time.
//!
//! Events are kept in a queue ordered by `(time, sequence number)`, so two events at
//! the same microsecond run in the order they were scheduled and a seed replays
//! exactly. Each event is handled, then the invariants are checked (see `checker`);
//! the first violation stops the run with the seed and the step that found it.
//!
//! A run has three phases:
//! 1. *faults* (`fault_phase_ms`): clients write (answered early or at commit), flush
//!    and read registers; a fault is drawn every few hundred ms: crash (power loss or
//!    process kill) and later restart, partition and later heal, leader transfer,
//!    membership change (joint consensus when two voters change), an aggressive
//!    compaction that forces snapshots (and block copies), or a replica cut off twice so
//!    that a second snapshot lands while it copies its blocks (`faults`);
//! 2. *quiet* (`quiet_phase_ms`): partitions heal, crashed nodes restart, drops stop,
//!    joint configurations are left; one liveness write per group is issued;
//! 3. *end*: a leader must exist for each group, every member must have applied the
//!    same index with the same state, the liveness writes must be acknowledged, a
//!    replay of the committed log must reproduce every state hash seen, every
//!    acknowledged write that must survive is committed, and every read saw what it
//!    must have seen.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};
use std::fmt;

use raft::eraftpb::{ConfState, MessageType};
use raft::StateRole;
use roamdisk_core::ids::{GroupId, NodeId, META_GROUP};
use roamdisk_core::meta::Durability;

use crate::checker::{violation, Check, Checker, Invariant, Key, Violation};
use crate::client::{Client, Op};
use crate::config::{Micros, SimConfig, MS};
use crate::corelog::CoreErrors;
use crate::machine::{Machine, MachineKind};
use crate::net::Network;
use crate::node::{ClientRequest, Ctx, Effect, Input, Node, ReplicaSeed, Reply, Wire};
use crate::rng::SimRng;
use crate::topology::{Topology, HOME_SITE, VOLUME_GROUP};
use crate::trace::Trace;

/// Steps between two comparisons of every node's whole log with the committed record.
pub const FULL_LOG_CHECK_EVERY: u64 = 2048;
/// Steps between two checks that committed entries are durable on a quorum (they also
/// run after every crash and sync).
pub const QUORUM_CHECK_EVERY: u64 = 16;
/// A sender's transport notices a lost snapshot stream after this long.
pub const SNAPSHOT_FAILURE_NOTICE: Micros = 50 * MS;
/// Partitions active at once, at most.
pub(crate) const PARTITIONS_MAX: usize = 2;
/// Events in one run, at most: a run that exceeds it is reported (a livelock in the
/// simulator itself, or a configuration that asks too much).
pub const STEPS_MAX: u64 = 2_000_000;

pub(crate) enum Event {
    Tick(NodeId),
    Checkpoint(NodeId),
    Deliver {
        from: NodeId,
        to: NodeId,
        group: GroupId,
        epoch: u64,
        wire: Box<Wire>,
    },
    SyncDone {
        node: NodeId,
        incarnation: u64,
    },
    CheckpointDone {
        node: NodeId,
        incarnation: u64,
    },
    Wake {
        node: NodeId,
        incarnation: u64,
    },
    /// The next chunk of a block copy.
    CopyChunk {
        node: NodeId,
        incarnation: u64,
        group: GroupId,
        point: u64,
        chunk: usize,
    },
    SnapshotStatus {
        node: NodeId,
        group: GroupId,
        to: NodeId,
        ok: bool,
    },
    Unreachable {
        node: NodeId,
        to: NodeId,
    },
    /// Send the client's request (a new one if none is in flight), unless the attempt
    /// in flight is no longer `after_attempt`.
    ClientSend {
        client: usize,
        after_attempt: u32,
    },
    RequestArrives {
        node: NodeId,
        request: ClientRequest,
    },
    ReplyArrives {
        from: NodeId,
        client: usize,
        request: u64,
        attempt: u32,
        reply: Reply,
        /// The answering group's epoch, and when it answered.
        epoch: u64,
        answered_at: Micros,
    },
    ClientTimeout {
        client: usize,
        request: u64,
        attempt: u32,
    },
    Fault,
    Restart(NodeId),
    Heal(u64),
    /// The next step of a catch-up race (see `faults`).
    Race {
        node: NodeId,
        step: u8,
    },
    /// The next step of the site loss (see `failover`).
    SiteLoss(u8),
    Quiet,
    Settle,
    FinalWrites,
    End,
}

impl Event {
    /// A tag for the trace hash.
    fn tag(&self) -> u8 {
        match self {
            Event::Tick(_) => 1,
            Event::Checkpoint(_) => 2,
            Event::Deliver { .. } => 3,
            Event::SyncDone { .. } => 4,
            Event::SnapshotStatus { .. } => 5,
            Event::Unreachable { .. } => 6,
            Event::ClientSend { .. } => 7,
            Event::RequestArrives { .. } => 8,
            Event::ReplyArrives { .. } => 9,
            Event::ClientTimeout { .. } => 10,
            Event::Fault => 11,
            Event::Restart(_) => 12,
            Event::Heal(_) => 13,
            Event::Quiet => 14,
            Event::Settle => 15,
            Event::FinalWrites => 16,
            Event::End => 17,
            Event::CheckpointDone { .. } => 18,
            Event::Wake { .. } => 19,
            Event::CopyChunk { .. } => 20,
            Event::Race { .. } => 21,
            Event::SiteLoss(_) => 22,
        }
    }
}

struct Scheduled {
    at: Micros,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    /// Reversed, so that `BinaryHeap` (a max-heap) pops the earliest event first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Faults,
    Quiet,
    Done,
}

/// Counters of one run.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub messages_sent: u64,
    pub messages_delivered: u64,
    pub messages_lost: u64,
    pub crashes: u64,
    pub power_losses: u64,
    pub partitions: u64,
    pub leader_transfers: u64,
    pub conf_changes: u64,
    pub compactions: u64,
    /// Log syncs that failed (the node stopped and restarted on the same boot).
    pub sync_failures: u64,
    /// Catch-up races that landed a second snapshot during a block copy.
    pub catch_up_races: u64,
    /// Block copies accepted by the core, and refused (made for an older point).
    pub copies_accepted: u64,
    pub copies_refused: u64,
    pub acknowledged: u64,
    /// Writes answered early (before their commit), flushes and reads answered.
    pub acknowledged_early: u64,
    pub flushes: u64,
    pub reads: u64,
    pub terms: u64,
    pub committed_entries: u64,
    pub nodes: u64,
    /// Highest volume generation in the final metadata state (moves finished + 1).
    pub max_generation: u64,
    /// Home sites lost, failovers applied, old-home replicas resynced into the new epoch.
    pub site_losses: u64,
    pub failovers: u64,
    pub rejoined: u64,
}

/// A run that passed.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub seed: u64,
    pub steps: u64,
    pub sim_ms: u64,
    /// blake3 over every event: equal for equal seeds.
    pub trace_hash: String,
    pub stats: Stats,
}

/// A run that found a violation.
#[derive(Clone, Debug)]
pub struct SimFailure {
    pub seed: u64,
    pub step: u64,
    pub time: Micros,
    pub violation: Violation,
    /// How to replay this run (see `SimConfig::replay_command`).
    pub replay: String,
}

impl fmt::Display for SimFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {} failed at step {} (t={}.{:03}ms): {}",
            self.seed,
            self.step,
            self.time / 1000,
            self.time % 1000,
            self.violation
        )?;
        write!(f, "; replay with {}", self.replay)
    }
}

pub struct Simulation {
    pub(crate) seed: u64,
    pub(crate) cfg: SimConfig,
    pub(crate) rng: SimRng,
    pub(crate) now: Micros,
    step: u64,
    queue: BinaryHeap<Scheduled>,
    next_seq: u64,
    pub(crate) topology: Topology,
    pub(crate) nodes: BTreeMap<NodeId, Node>,
    pub(crate) net: Network,
    pub(crate) clients: Vec<Client>,
    pub(crate) checker: Checker,
    pub(crate) trace: Trace,
    pub(crate) phase: Phase,
    pub(crate) stats: Stats,
    effects: Vec<Effect>,
    /// Whether the durable-quorum check must run after this step.
    pub(crate) durability_changed: bool,
    /// Nodes that crash when their next sync would complete (power loss or not).
    pub(crate) crash_at_sync: BTreeMap<NodeId, bool>,
    /// When nodes lost power, and which (an early-answered, unflushed write may be lost
    /// once a majority of the voters that could have it did).
    pub(crate) power_losses: Vec<(Micros, NodeId)>,
    /// Register stamps handed out so far.
    stamps: u64,
    /// The catch-up race in progress.
    pub(crate) race: Option<crate::faults::Race>,
    /// The site-loss scenario's progress, and the metadata a run starts with.
    pub(crate) site_loss: crate::failover::SiteLoss,
    initial_meta: roamdisk_core::meta::ClusterState,
    /// A site-loss run's durability, drawn before the metadata is made: site-durable,
    /// and after how long without another site it degrades.
    preset_durability: Option<(bool, Option<std::time::Duration>)>,
    core_errors: CoreErrors,
}

impl Simulation {
    pub fn new(seed: u64, cfg: SimConfig) -> Simulation {
        let mut rng = SimRng::new(seed);
        let topology = Topology::draw(&mut rng, &cfg);
        let net = Network::new(&mut rng, &cfg, topology.nodes.clone());
        let mut nodes = BTreeMap::new();
        let meta_voters = topology.groups[&META_GROUP].voters.clone();
        for (id, site) in &topology.nodes {
            let retained = rng.range(cfg.retained_entries.0, cfg.retained_entries.1);
            nodes.insert(
                *id,
                Node::new(*id, *site, &cfg, retained, meta_voters.clone()),
            );
        }
        let (initial_meta, preset_durability) = if cfg.site_loss {
            let site = rng.chance(cfg.site_durable_per_million);
            let degrade = (site && rng.chance(500_000))
                .then(|| std::time::Duration::from_millis(rng.range(100, 2000)));
            let durability = if site {
                Durability::Site
            } else {
                Durability::Node
            };
            (
                crate::failover::initial_cluster(&topology, durability, degrade),
                Some((site, degrade)),
            )
        } else {
            (roamdisk_core::meta::ClusterState::default(), None)
        };
        let mut checker = Checker::default();
        for (group, spec) in &topology.groups {
            let initial = match spec.kind {
                MachineKind::Meta => Machine::meta(initial_meta.clone(), cfg.bootstrap_index),
                MachineKind::Volume => Machine::new(spec.kind, cfg.bootstrap_index),
            };
            checker.add_group((*group).into(), initial, cfg.bootstrap_index);
        }
        let trace = Trace::new(cfg.trace);
        Simulation {
            seed,
            rng,
            now: 0,
            step: 0,
            queue: BinaryHeap::new(),
            next_seq: 0,
            topology,
            nodes,
            net,
            clients: Vec::new(),
            checker,
            trace,
            phase: Phase::Faults,
            stats: Stats::default(),
            effects: Vec::new(),
            durability_changed: false,
            crash_at_sync: BTreeMap::new(),
            power_losses: Vec::new(),
            stamps: 0,
            race: None,
            site_loss: Default::default(),
            initial_meta,
            preset_durability,
            core_errors: CoreErrors::default(),
            cfg,
        }
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn now(&self) -> Micros {
        self.now
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// A one-line description of the cluster drawn for this seed.
    pub fn describe(&self) -> String {
        let groups: Vec<String> = self
            .topology
            .groups
            .iter()
            .map(|(g, s)| {
                let list = |v: &[NodeId]| {
                    let names: Vec<String> = v.iter().map(|n| n.to_string()).collect();
                    names.join(",")
                };
                format!(
                    "g{g}({:?}) voters [{}] learners [{}]",
                    s.kind,
                    list(&s.voters),
                    list(&s.learners)
                )
            })
            .collect();
        let nodes: Vec<String> = self
            .topology
            .nodes
            .iter()
            .map(|(n, s)| format!("n{n}@site{s}"))
            .collect();
        format!(
            "seed {}: nodes [{}]; {}; drop {}ppm dup {}ppm",
            self.seed,
            nodes.join(" "),
            groups.join("; "),
            self.net.drop_per_million,
            self.net.duplicate_per_million
        )
    }

    pub(crate) fn schedule(&mut self, after: Micros, event: Event) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.push(Scheduled {
            at: self.now + after,
            seq,
            event,
        });
    }

    fn fail(&self, violation: Violation) -> SimFailure {
        SimFailure {
            seed: self.seed,
            step: self.step,
            time: self.now,
            violation,
            replay: self.cfg.replay_command(self.seed),
        }
    }

    /// Runs the whole simulation.
    pub fn run(&mut self) -> Result<Outcome, SimFailure> {
        let errors = self.core_errors.clone();
        errors.capture(|| self.run_events())
    }

    fn run_events(&mut self) -> Result<Outcome, SimFailure> {
        self.trace.note(0, || self.describe());
        self.setup().map_err(|v| self.fail(v))?;
        while let Some(s) = self.queue.pop() {
            assert!(s.at >= self.now, "time goes forward");
            self.now = s.at;
            self.step += 1;
            if self.step > STEPS_MAX {
                return Err(self.fail(violation(
                    Invariant::Liveness,
                    format!("more than {STEPS_MAX} events"),
                )));
            }
            let end = matches!(s.event, Event::End);
            self.handle(s.event).map_err(|v| self.fail(v))?;
            self.check_after_event().map_err(|v| self.fail(v))?;
            if end {
                break;
            }
        }
        self.stats.terms = self
            .topology
            .groups
            .keys()
            .flat_map(|g| self.checker.epochs(*g).map(|(_, r)| r.terms() as u64))
            .sum();
        self.stats.committed_entries = self
            .topology
            .groups
            .keys()
            .map(|g| self.checker.group(self.checker.current(*g)).committed_len() as u64)
            .sum();
        self.stats.nodes = self.nodes.len() as u64;
        self.stats.max_generation = self
            .nodes
            .values()
            .filter_map(|n| n.core.as_ref())
            .flat_map(|c| c.cluster().volumes.values().map(|v| v.generation.0))
            .max()
            .unwrap_or(0);
        let (_, reads, flushes) = self
            .checker
            .epochs(VOLUME_GROUP)
            .fold((0, 0, 0), |t, (k, _)| {
                let c = self.checker.counts(*k);
                (t.0 + c.0, t.1 + c.1, t.2 + c.2)
            });
        self.stats.reads = reads as u64;
        self.stats.flushes = flushes as u64;
        Ok(Outcome {
            seed: self.seed,
            steps: self.step,
            sim_ms: self.now / MS,
            trace_hash: self.trace.finish(),
            stats: self.stats.clone(),
        })
    }

    fn setup(&mut self) -> Check {
        let groups: Vec<(GroupId, MachineKind, Vec<NodeId>, Vec<NodeId>)> = self
            .topology
            .groups
            .iter()
            .map(|(g, s)| (*g, s.kind, s.voters.clone(), s.learners.clone()))
            .collect();
        // The metadata group is created on every node's disk before the core opens it
        // (with the bootstrap membership where the node is a member, empty elsewhere).
        for (group, kind, voters, learners) in &groups {
            if *kind != MachineKind::Meta {
                continue;
            }
            let mut cs = ConfState::default();
            cs.voters = voters.iter().map(|n| n.0).collect();
            cs.learners = learners.iter().map(|n| n.0).collect();
            for node in self.nodes.values() {
                let member = voters.contains(&node.id) || learners.contains(&node.id);
                node.seed_meta(*group, member.then(|| cs.clone()), &self.initial_meta)
                    .map_err(|e| violation(Invariant::CoreError, e))?;
            }
        }
        let nodes: Vec<NodeId> = self.nodes.keys().copied().collect();
        for node in &nodes {
            self.with_node(*node, |n, ctx| n.start(ctx))?;
        }
        let site_durable = match self.preset_durability {
            Some((site, _)) => site,
            None => {
                self.topology.sites.len() > 1 && self.rng.chance(self.cfg.site_durable_per_million)
            }
        };
        for (group, kind, voters, learners) in groups {
            let clients = if kind == MachineKind::Volume {
                let mut cs = ConfState::default();
                cs.voters = voters.iter().map(|n| n.0).collect();
                cs.learners = learners.iter().map(|n| n.0).collect();
                for node in voters.iter().chain(&learners) {
                    let seed = ReplicaSeed {
                        kind,
                        conf: Some(cs.clone()),
                    };
                    self.with_node(*node, |n, ctx| n.create_replica(group, seed, ctx))?;
                }
                if site_durable {
                    // Half of them degrade after a while without another site.
                    let degrade_after = match self.preset_durability {
                        Some((_, d)) => d,
                        None => self
                            .rng
                            .chance(500_000)
                            .then(|| std::time::Duration::from_millis(self.rng.range(100, 2000))),
                    };
                    self.trace.note(0, || {
                        format!("g{group}: durability=site, degrade after {degrade_after:?}")
                    });
                    for n in self.nodes.values_mut() {
                        n.set_site_durable(group, learners.clone(), degrade_after);
                    }
                }
                self.cfg.volume_clients
            } else {
                1
            };
            for _ in 0..clients {
                let mut c = Client::new(group, kind, false);
                c.foreign_node_ids = self.cfg.site_loss;
                self.clients.push(c);
            }
        }
        let tick = self.cfg.tick_ms * MS;
        let nodes: Vec<NodeId> = self.nodes.keys().copied().collect();
        for node in nodes {
            let phase = self.rng.below(tick);
            self.schedule(phase, Event::Tick(node));
            let cp = self
                .rng
                .range(self.cfg.checkpoint_ms.0, self.cfg.checkpoint_ms.1)
                * MS;
            self.schedule(cp, Event::Checkpoint(node));
        }
        for client in 0..self.clients.len() {
            let at = self.rng.range(0, 50 * MS);
            self.schedule(
                at,
                Event::ClientSend {
                    client,
                    after_attempt: 0,
                },
            );
        }
        let first_fault = self
            .rng
            .range(self.cfg.fault_interval_ms.0, self.cfg.fault_interval_ms.1)
            * MS;
        self.schedule(first_fault, Event::Fault);
        if self.cfg.site_loss {
            let (lo, hi) = self.cfg.site_loss_at_ms;
            let at = self.rng.range(lo, hi) * MS;
            self.schedule(at, Event::SiteLoss(0));
        }
        let fault_end = self.cfg.fault_phase_ms * MS;
        let quiet = self.cfg.quiet_phase_ms * MS;
        self.schedule(fault_end, Event::Quiet);
        self.schedule(fault_end + quiet / 3, Event::FinalWrites);
        self.schedule(fault_end + quiet, Event::End);
        Ok(())
    }

    /// Runs `f` on a node with a context, then routes the effects it produced.
    /// Runs `f` on a node with a context, then routes the effects it produced.
    pub(crate) fn with_node<T>(
        &mut self,
        id: NodeId,
        f: impl FnOnce(&mut Node, &mut Ctx<'_>) -> Result<T, Violation>,
    ) -> Result<T, Violation> {
        let node = self.nodes.get_mut(&id).expect("known node");
        let mut ctx = Ctx {
            now: self.now,
            cfg: &self.cfg,
            rng: &mut self.rng,
            checker: &mut self.checker,
            effects: &mut self.effects,
            trace: &mut self.trace,
        };
        let result = f(node, &mut ctx);
        self.route_effects();
        result
    }

    pub(crate) fn input(&mut self, node: NodeId, input: Input) -> Check {
        if !self.nodes[&node].up {
            return Ok(());
        }
        self.with_node(node, |n, ctx| n.handle(input, ctx))
    }

    fn route_effects(&mut self) {
        let effects = std::mem::take(&mut self.effects);
        for effect in effects {
            match effect {
                Effect::Send {
                    from,
                    to,
                    group,
                    epoch,
                    wire,
                } => {
                    self.stats.messages_sent += 1;
                    if !self.nodes.contains_key(&to) {
                        continue;
                    }
                    let delays = self.net.plan(&mut self.rng, from, to);
                    let snapshot = wire
                        .raft()
                        .is_some_and(|m| m.get_msg_type() == MessageType::MsgSnapshot);
                    if delays.is_empty() {
                        self.stats.messages_lost += 1;
                        if snapshot {
                            self.schedule(
                                SNAPSHOT_FAILURE_NOTICE,
                                Event::SnapshotStatus {
                                    node: from,
                                    group,
                                    to,
                                    ok: false,
                                },
                            );
                        }
                    }
                    for delay in delays {
                        self.schedule(
                            delay,
                            Event::Deliver {
                                from,
                                to,
                                group,
                                epoch,
                                wire: Box::new(wire.clone()),
                            },
                        );
                    }
                }
                Effect::Reply {
                    node,
                    client,
                    request,
                    attempt,
                    reply,
                    epoch,
                    answered_at,
                } => {
                    if self.rng.chance(self.net.drop_per_million) {
                        continue;
                    }
                    let site = self.net.site_of(node);
                    let delay = self.net.delay_between_sites(&mut self.rng, site, HOME_SITE);
                    self.schedule(
                        delay,
                        Event::ReplyArrives {
                            from: node,
                            client,
                            request,
                            attempt,
                            reply,
                            epoch,
                            answered_at,
                        },
                    );
                }
                Effect::SyncAfter {
                    node,
                    incarnation,
                    after,
                } => self.schedule(after, Event::SyncDone { node, incarnation }),
                Effect::CheckpointAfter {
                    node,
                    incarnation,
                    after,
                } => self.schedule(after, Event::CheckpointDone { node, incarnation }),
                Effect::WakeAt {
                    node,
                    incarnation,
                    at,
                } => self.schedule(
                    at.saturating_sub(self.now),
                    Event::Wake { node, incarnation },
                ),
                Effect::CopyBlocks {
                    node,
                    incarnation,
                    group,
                    point,
                } => self.schedule(
                    MS,
                    Event::CopyChunk {
                        node,
                        incarnation,
                        group,
                        point,
                        chunk: 0,
                    },
                ),
            }
        }
    }

    fn trace_event(&mut self, event: &Event) {
        let (values, line): (Vec<u64>, Option<String>) = match event {
            Event::Deliver {
                from,
                to,
                group,
                wire,
                ..
            } => match wire.as_ref() {
                Wire::Raft(msg) => (
                    vec![
                        from.0,
                        to.0,
                        group.0,
                        msg.get_msg_type() as u64,
                        msg.term,
                        msg.index,
                        msg.log_term,
                        msg.commit,
                        msg.entries.len() as u64,
                        msg.reject as u64,
                    ],
                    self.trace.verbose().then(|| {
                        format!(
                            "n{from} -> n{to} g{group} {:?} term={} index={} log_term={} commit={} entries={}{}",
                            msg.get_msg_type(),
                            msg.term,
                            msg.index,
                            msg.log_term,
                            msg.commit,
                            msg.entries.len(),
                            if msg.reject { " reject" } else { "" }
                        )
                    }),
                ),
                Wire::Written(w) => (
                    vec![from.0, to.0, group.0, 100, w.term, w.index, w.log_term],
                    self.trace.verbose().then(|| {
                        format!("n{from} -> n{to} g{group} Written term={} index={}", w.term, w.index)
                    }),
                ),
                Wire::Tail(t) => (
                    vec![from.0, to.0, group.0, 103, t.term, t.last],
                    self.trace.verbose().then(|| {
                        format!("n{from} -> n{to} g{group} Tail term={} last={}", t.term, t.last)
                    }),
                ),
                Wire::SyncWanted(w) => (
                    vec![from.0, to.0, group.0, 101, w.term, w.index],
                    self.trace.verbose().then(|| {
                        format!("n{from} -> n{to} g{group} SyncWanted term={} index={}", w.term, w.index)
                    }),
                ),
                Wire::Quarantine(r) => (
                    vec![from.0, to.0, group.0, 102, u64::from(r.quarantined), r.conf_index],
                    self.trace.verbose().then(|| {
                        format!(
                            "n{from} -> n{to} g{group} Quarantine quarantined={} conf {} {:?}/{:?}",
                            r.quarantined, r.conf_index, r.voters, r.outgoing
                        )
                    }),
                ),
            },
            Event::Tick(n) | Event::Checkpoint(n) => (vec![n.0], None),
            Event::SyncDone { node, incarnation } => (
                vec![node.0, *incarnation],
                self.trace.verbose().then(|| format!("n{node} sync done")),
            ),
            Event::CheckpointDone { node, incarnation } | Event::Wake { node, incarnation } => {
                (vec![node.0, *incarnation], None)
            }
            Event::CopyChunk {
                node,
                group,
                point,
                chunk,
                ..
            } => (
                vec![node.0, group.0, *point, *chunk as u64],
                self.trace
                    .verbose()
                    .then(|| format!("n{node} g{group}: copy chunk {chunk} for {point}")),
            ),
            Event::SnapshotStatus {
                node,
                group,
                to,
                ok,
            } => (
                vec![node.0, group.0, to.0, *ok as u64],
                self.trace
                    .verbose()
                    .then(|| format!("n{node} g{group}: snapshot to n{to} ok={ok}")),
            ),
            Event::Unreachable { node, to } => (vec![node.0, to.0], None),
            Event::ClientSend {
                client,
                after_attempt,
            } => (vec![*client as u64, u64::from(*after_attempt)], None),
            Event::RequestArrives { node, request } => (
                vec![node.0, request.client as u64, request.request, u64::from(request.attempt)],
                self.trace.verbose().then(|| {
                    format!(
                        "client {} request {} attempt {} -> n{node} g{}: {:?}",
                        request.client,
                        request.request,
                        request.attempt,
                        request.group,
                        match &request.op {
                            Op::Write { ack, register, .. } => format!("write {ack:?} {register:?}"),
                            Op::Flush => "flush".into(),
                            Op::Read { slot } => format!("read {slot}"),
                        }
                    )
                }),
            ),
            Event::ReplyArrives {
                from,
                client,
                request,
                attempt,
                reply,
                ..
            } => (
                vec![from.0, *client as u64, *request, u64::from(*attempt)],
                self.trace.verbose().then(|| {
                    format!("client {client} request {request} attempt {attempt} <- n{from}: {reply:?}")
                }),
            ),
            Event::ClientTimeout {
                client,
                request,
                attempt,
            } => (vec![*client as u64, *request, u64::from(*attempt)], None),
            Event::Fault => (vec![], None),
            Event::Restart(n) => (vec![n.0], self.trace.verbose().then(|| format!("n{n} restarts"))),
            Event::Heal(p) => (vec![*p], self.trace.verbose().then(|| format!("partition {p} heals"))),
            Event::Race { node, step } => (
                vec![node.0, u64::from(*step)],
                Some(format!("catch-up race on n{node}, step {step}")),
            ),
            Event::SiteLoss(step) => (vec![u64::from(*step)], None),
            Event::Quiet => (vec![], Some("quiet phase: heal everything".into())),
            Event::Settle => (vec![], None),
            Event::FinalWrites => (vec![], Some("liveness writes".into())),
            Event::End => (vec![], Some("end".into())),
        };
        // Periodic events (ticks, checkpoints, client timers) are hashed, not printed.
        self.trace
            .event(self.step, self.now, event.tag(), &values, line);
    }

    fn handle(&mut self, event: Event) -> Check {
        self.trace_event(&event);
        match event {
            Event::Tick(node) => {
                self.schedule(self.cfg.tick_ms * MS, Event::Tick(node));
                self.input(node, Input::Tick)
            }
            Event::Checkpoint(node) => {
                let next = self
                    .rng
                    .range(self.cfg.checkpoint_ms.0, self.cfg.checkpoint_ms.1)
                    * MS;
                self.schedule(next, Event::Checkpoint(node));
                if !self.nodes[&node].up {
                    return Ok(());
                }
                self.with_node(node, |n, ctx| n.checkpoint(false, ctx))
                    .map(|_| ())
            }
            Event::Deliver {
                from,
                to,
                group,
                epoch,
                wire,
            } => self.deliver(from, to, group, epoch, *wire),
            Event::SyncDone { node, incarnation } => {
                self.durability_changed = true;
                let current = self.nodes[&node].up && self.nodes[&node].incarnation == incarnation;
                if current {
                    if let Some(power_loss) = self.crash_at_sync.remove(&node) {
                        self.crash(node, power_loss);
                        return Ok(());
                    }
                }
                if self.with_node(node, |n, ctx| n.sync_done(incarnation, ctx))? {
                    self.stats.sync_failures += 1;
                    self.trace.note(self.now, || {
                        format!("n{node}: log sync failed; the node stops")
                    });
                    self.crash(node, false);
                }
                Ok(())
            }
            Event::CheckpointDone { node, incarnation } => {
                self.with_node(node, |n, ctx| n.checkpoint_done(incarnation, ctx))
            }
            Event::Wake { node, incarnation } => {
                self.with_node(node, |n, ctx| n.wake(incarnation, ctx))
            }
            Event::CopyChunk {
                node,
                incarnation,
                group,
                point,
                chunk,
            } => self.copy_chunk(node, incarnation, group, point, chunk),
            Event::SnapshotStatus {
                node,
                group,
                to,
                ok,
            } => self.input(node, Input::SnapshotStatus { group, to, ok }),
            Event::Unreachable { node, to } => self.input(node, Input::Unreachable { to }),
            Event::ClientSend {
                client,
                after_attempt,
            } => {
                self.client_send(client, after_attempt);
                Ok(())
            }
            Event::RequestArrives { node, request } => self.input(node, Input::Request(request)),
            Event::ReplyArrives {
                from,
                client,
                request,
                attempt,
                reply,
                epoch,
                answered_at,
            } => self.client_reply(from, client, request, attempt, reply, (epoch, answered_at)),
            Event::ClientTimeout {
                client,
                request,
                attempt,
            } => {
                let c = &mut self.clients[client];
                if let Some(f) = &c.in_flight {
                    if f.request == request && f.attempt == attempt {
                        c.hint = None;
                        self.schedule(
                            0,
                            Event::ClientSend {
                                client,
                                after_attempt: attempt,
                            },
                        );
                    }
                }
                Ok(())
            }
            Event::Fault => self.fault(),
            Event::Restart(node) => self.restart(node),
            Event::Heal(id) => {
                if let Some(p) = self.net.heal(id) {
                    self.trace.note(self.now, || {
                        format!("healed partition {id}: {}", p.description)
                    });
                }
                Ok(())
            }
            Event::Race { node, step } => self.race_step(node, step),
            Event::SiteLoss(step) => self.site_loss_step(step),
            Event::Quiet => self.quiet(),
            Event::Settle => {
                if self.phase == Phase::Quiet {
                    self.schedule(200 * MS, Event::Settle);
                    for group in self.group_ids() {
                        self.leave_joint(group)?;
                    }
                }
                Ok(())
            }
            Event::FinalWrites => {
                for group in self.group_ids() {
                    let kind = self.topology.groups[&group].kind;
                    self.clients.push(Client::new(group, kind, true));
                    let client = self.clients.len() - 1;
                    self.schedule(
                        0,
                        Event::ClientSend {
                            client,
                            after_attempt: 0,
                        },
                    );
                }
                Ok(())
            }
            Event::End => {
                self.phase = Phase::Done;
                self.final_checks()
            }
        }
    }

    pub(crate) fn group_ids(&self) -> Vec<GroupId> {
        self.topology.groups.keys().copied().collect()
    }

    fn deliver(
        &mut self,
        from: NodeId,
        to: NodeId,
        group: GroupId,
        epoch: u64,
        wire: Wire,
    ) -> Check {
        let ty = wire.raft().map(|m| m.get_msg_type());
        let reachable =
            !self.net.is_cut(from, to) && self.nodes[&to].up && self.nodes[&to].hosts(group);
        if !reachable {
            self.stats.messages_lost += 1;
            match ty {
                Some(MessageType::MsgSnapshot) => self.schedule(
                    SNAPSHOT_FAILURE_NOTICE,
                    Event::SnapshotStatus {
                        node: from,
                        group,
                        to,
                        ok: false,
                    },
                ),
                Some(MessageType::MsgAppend) => {
                    self.schedule(MS, Event::Unreachable { node: from, to })
                }
                _ => {}
            }
            return Ok(());
        }
        self.stats.messages_delivered += 1;
        self.input(
            to,
            Input::Wire {
                from,
                group,
                epoch,
                wire,
            },
        )?;
        if ty == Some(MessageType::MsgSnapshot) {
            let delay = self.net.delay_between_sites(
                &mut self.rng,
                self.net.site_of(to),
                self.net.site_of(from),
            );
            self.schedule(
                delay,
                Event::SnapshotStatus {
                    node: from,
                    group,
                    to,
                    ok: true,
                },
            );
        }
        Ok(())
    }

    fn client_send(&mut self, client: usize, after_attempt: u32) {
        let faults = self.phase == Phase::Faults;
        let now = self.now;
        let c = &mut self.clients[client];
        if c.retired {
            return;
        }
        match &c.in_flight {
            Some(f) if f.attempt != after_attempt => return,
            Some(_) => {}
            None if after_attempt != 0 => return,
            None => {
                let once = c.liveness || c.admin.is_some();
                if !(faults || once) || (once && c.acked > 0) {
                    return;
                }
                c.start(&mut self.rng, now, &mut self.stamps);
            }
        }
        let nodes: Vec<NodeId> = self.nodes.keys().copied().collect();
        let target = match c.hint {
            Some(n) => n,
            None => *self.rng.pick(&nodes).expect("nodes"),
        };
        let f = c.in_flight.as_mut().expect("in flight");
        f.attempt += 1;
        let request = ClientRequest {
            client,
            request: f.request,
            attempt: f.attempt,
            group: c.group,
            op: f.op.clone(),
        };
        let (req_id, attempt) = (f.request, f.attempt);
        if !self.rng.chance(self.net.drop_per_million) {
            let delay =
                self.net
                    .delay_between_sites(&mut self.rng, HOME_SITE, self.net.site_of(target));
            self.schedule(
                delay,
                Event::RequestArrives {
                    node: target,
                    request,
                },
            );
        }
        self.schedule(
            self.cfg.client_timeout_ms * MS,
            Event::ClientTimeout {
                client,
                request: req_id,
                attempt,
            },
        );
    }

    fn client_reply(
        &mut self,
        from: NodeId,
        client: usize,
        request: u64,
        attempt: u32,
        reply: Reply,
        (epoch, answered_at): (u64, Micros),
    ) -> Check {
        let c = &mut self.clients[client];
        let Some(f) = &c.in_flight else {
            return Ok(());
        };
        if f.request != request {
            return Ok(());
        }
        let current = f.attempt;
        let group = Key::new(c.group, epoch);
        let done = match (&reply, &f.op) {
            // Any attempt of this request may be the one that committed.
            (
                Reply::Written {
                    index,
                    term,
                    early,
                    voters,
                },
                Op::Write {
                    digest, register, ..
                },
            ) => {
                self.stats.acknowledged += 1;
                self.stats.acknowledged_early += u64::from(*early);
                self.checker.observe_write_ack(
                    group,
                    *index,
                    *term,
                    *digest,
                    *early,
                    (self.now, answered_at),
                    *register,
                    voters.clone(),
                )?;
                true
            }
            (Reply::Flushed, Op::Flush) => {
                let nodes = &self.nodes;
                self.checker.observe_flush(
                    group,
                    f.issued_at,
                    self.now,
                    &self.power_losses,
                    |n| {
                        nodes
                            .get(&n)
                            .and_then(|node| node.store.model_synced(group.group))
                    },
                )?;
                true
            }
            (Reply::Read { bytes }, Op::Read { slot }) => {
                self.checker
                    .observe_read(group, *slot, bytes, f.issued_at, from)?;
                true
            }
            (Reply::Written { .. } | Reply::Flushed | Reply::Read { .. }, _) => {
                return Err(violation(
                    Invariant::CoreError,
                    format!(
                        "client {client} request {request}: a reply of another kind: {reply:?}"
                    ),
                ))
            }
            _ => false,
        };
        if done {
            let c = &mut self.clients[client];
            c.in_flight = None;
            c.acked += 1;
            c.hint = Some(from);
            let think = self.rng.range(self.cfg.think_ms.0, self.cfg.think_ms.1) * MS;
            self.schedule(
                think,
                Event::ClientSend {
                    client,
                    after_attempt: 0,
                },
            );
            return Ok(());
        }
        if attempt != current {
            return Ok(());
        }
        match reply {
            Reply::NotLeader { leader } => {
                self.clients[client].hint = leader;
                let backoff = if leader.is_some() { MS } else { 20 * MS };
                self.schedule(
                    backoff,
                    Event::ClientSend {
                        client,
                        after_attempt: current,
                    },
                );
            }
            _ => {
                // Refused for now (a leader change, a replica copying blocks): try
                // another node.
                self.clients[client].hint = None;
                self.schedule(
                    10 * MS,
                    Event::ClientSend {
                        client,
                        after_attempt: current,
                    },
                );
            }
        }
        Ok(())
    }

    /// The node that leads `group` in the highest term, among running nodes of its
    /// newest epoch (a fenced replica leads nothing).
    pub(crate) fn leader(&self, group: GroupId) -> Option<NodeId> {
        let epoch = self.checker.current(group).epoch;
        self.nodes
            .values()
            .filter(|n| n.up && n.epoch(group) == epoch && !n.fenced(group))
            .filter_map(|n| {
                let r = n.raft(group)?;
                (r.role() == StateRole::Leader).then(|| (r.term().0, n.id))
            })
            .max()
            .map(|(_, id)| id)
    }

    fn check_after_event(&mut self) -> Check {
        if let Some(line) = self.core_errors.take_first() {
            return Err(violation(
                Invariant::CoreError,
                format!("the core logged an ERROR: {line}"),
            ));
        }
        for node in self.nodes.values().filter(|n| n.up) {
            node.check_log_window(&self.checker)?;
        }
        if self.step % FULL_LOG_CHECK_EVERY == 0 {
            for node in self.nodes.values().filter(|n| n.up) {
                for group in node.core().group_ids() {
                    node.check_log_full(group, &self.checker, "periodic full check")?;
                }
            }
        }
        if self.cfg.check_durable_quorum
            && (self.durability_changed || self.step % QUORUM_CHECK_EVERY == 0)
        {
            self.durability_changed = false;
            self.check_quorums()?;
        }
        Ok(())
    }

    /// Invariant 2's quorum part, for each group's newest epoch (a failover gave up
    /// the older epochs' entries past its cut).
    fn check_quorums(&self) -> Check {
        for group in self.topology.groups.keys() {
            let key = self.checker.current(*group);
            let mut watermarks = BTreeMap::new();
            for node in self.nodes.values().filter(|n| n.epoch(*group) == key.epoch) {
                if let Some(log) = node.store.model_synced(*group) {
                    watermarks.insert(node.id, self.checker.durable_watermark(key, &log));
                }
            }
            self.checker.check_quorums(key, &watermarks)?;
        }
        Ok(())
    }

    /// The state hash of `group` on `node`, as the checker records it.
    fn state_hash(&self, node: &Node, group: GroupId) -> Option<[u8; 32]> {
        if group == META_GROUP {
            let cluster = node.core.as_ref()?.cluster();
            Some(*blake3::hash(&cluster.encode()).as_bytes())
        } else {
            node.volume(group).map(|v| v.hash())
        }
    }

    fn final_checks(&mut self) -> Check {
        for group in self.group_ids() {
            let Some(leader) = self.leader(group) else {
                return Err(violation(
                    Invariant::Liveness,
                    format!("group {group} has no leader after the quiet phase"),
                ));
            };
            let lr = self.nodes[&leader].raft(group).expect("leads");
            let cs = lr.conf_state();
            if !cs.voters_outgoing.is_empty() {
                return Err(violation(
                    Invariant::Liveness,
                    format!("group {group} is still in a joint configuration: {cs:?}"),
                ));
            }
            let commit = lr.commit_index().0;
            let mut states = Vec::new();
            for m in cs.voters.iter().chain(&cs.learners).map(|n| NodeId(*n)) {
                let node = &self.nodes[&m];
                let (Some(applied), Some(hash)) =
                    (node.applied(group), self.state_hash(node, group))
                else {
                    return Err(violation(
                        Invariant::Liveness,
                        format!("group {group}: member n{m} has no open replica"),
                    ));
                };
                if node.recovery_point(group).is_some() {
                    return Err(violation(
                        Invariant::Liveness,
                        format!("group {group}: member n{m} is still copying blocks"),
                    ));
                }
                states.push((m, applied, hash));
            }
            let (_, applied, hash) = states[0];
            if states.iter().any(|(_, a, h)| *a != applied || *h != hash) || applied != commit {
                let list: Vec<String> = states
                    .iter()
                    .map(|(n, a, h)| format!("n{n} applied {a} state {:02x}{:02x}", h[0], h[1]))
                    .collect();
                return Err(violation(
                    Invariant::Liveness,
                    format!(
                        "group {group}: members did not converge (leader n{leader} commit {commit}): {}",
                        list.join(", ")
                    ),
                ));
            }
            let key = self.checker.current(group);
            let replayed = self.checker.replay(key, applied)?;
            if replayed != hash {
                return Err(violation(
                    Invariant::ReplicaStateAgrees,
                    format!(
                        "group {group}: the final state differs from a replay of the committed log"
                    ),
                ));
            }
            self.check_failovers(group)?;
            let keys: Vec<Key> = self.checker.epochs(group).map(|(k, _)| *k).collect();
            for k in &keys {
                let superseded = k.epoch != key.epoch;
                self.checker
                    .check_acks_and_reads(*k, &self.power_losses, superseded)?;
            }
        }
        for c in self.clients.iter().filter(|c| c.liveness) {
            if c.acked == 0 {
                return Err(violation(
                    Invariant::Liveness,
                    format!(
                        "group {}: the write issued after healing was not acknowledged",
                        c.group
                    ),
                ));
            }
        }
        for node in self.nodes.values().filter(|n| n.up) {
            for group in node.core().group_ids() {
                node.check_log_full(group, &self.checker, "end")?;
            }
        }
        Ok(())
    }
}
