//! The site-loss scenario (`SimConfig::site_loss`): the volume's home site is lost once
//! per run, and the run's admin fails the volume over to site 1 as an operator would,
//! through the code that ships.
//!
//! 1. *Loss*: every home node is killed (power losses as the run draws them) and stays
//!    down, or the home is cut off from both other sites (clients still reach it, as a
//!    hypervisor next to it would).
//! 2. *Plan and execute*: on the metadata leader (outside the home), the surviving
//!    replicas' `ReplicaReport`s go to the core's planner
//!    (`roamdisk_core::failover::plan_volume`), and its plan becomes the
//!    `MetaCommand::Failover` that `failover execute` proposes. Every node carries it out
//!    in the core (`NodeCore::reconcile_epochs`: the source re-forms the group, the
//!    other survivors keep their log or start empty, the old home is fenced). A plan
//!    that says the home may still write (`degrade-after`) is executed only once the
//!    home is down, as the plan tells an operator.
//! 3. *Return*: some time after the failover applied, the old home comes back (healed or
//!    restarted) and is fenced by the metadata it catches up on; in half of the runs the
//!    admin then discards its divergent writes (`MetaCommand::DiscardDivergent`) and adds
//!    its replicas to the new epoch as learners, which resync by snapshot and block copy.
//!
//! The checker records each epoch apart and adds (`Checker::check_failover`): no node of
//! the old epoch answered once the new one had, and every write acknowledged before the
//! plan's stated time (every one, for a lossless plan) that had to survive is committed
//! in the new epoch. The usual end checks then run on the new epoch.

use std::time::Duration;

use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2};
use roamdisk_core::failover::{plan_volume, VolumePlan};
use roamdisk_core::ids::{NodeId, VolumeId, META_GROUP};
use roamdisk_core::meta::{ClusterState, Durability, MetaCommand, NodeInfo, OnNoSite, VolumeInfo};
use roamdisk_core::node::ReplicaReport;
use roamdisk_core::time::Time;

use crate::checker::{violation, Check, Invariant, Key, Stated};
use crate::client::Client;
use crate::config::{Micros, MS};
use crate::machine::VOLUME_BYTES;
use crate::node::{Input, WALL_EPOCH_UNIX_MS};
use crate::sim::{Event, Phase, Simulation};
use crate::topology::{site_name, Topology, FAILOVER_SITE, HOME_SITE, VOLUME_GROUP};

/// The volume's name in the metadata of a site-loss run.
pub const VOLUME_NAME: &str = "simvol";

/// How long the admin waits for `failover execute` to answer before it plans again, as
/// an operator whose command timed out would (the proposal may still commit: the
/// checker then holds the run to the plan that did).
pub const EXECUTE_TIMEOUT: Micros = 1_500 * MS;

/// The scenario's progress.
#[derive(Default)]
pub struct SiteLoss {
    /// The home is lost (once per run).
    pub lost: bool,
    /// Its nodes were killed (they stay down until the return), and the partition that
    /// cuts it off from both other sites.
    pub down: bool,
    pub cut: Option<u64>,
    /// The home is held lost: its nodes stay down, its cut stays.
    pub held: bool,
    pub plan: Option<VolumePlan>,
    /// The admin client that carries the current command, and when it was sent.
    admin: Option<usize>,
    admin_since: Micros,
    /// The failover applied: the epochs it went from and to, and what its plan stated.
    pub applied: Option<(u64, u64, Stated)>,
    discarding: bool,
    pub discarded: bool,
    /// Former home replicas added to the new epoch as learners.
    pub rejoined: Vec<NodeId>,
}

/// The metadata a site-loss run starts with: every node registered at its site, and the
/// volume created at the home with the run's durability, placed exactly as the topology
/// says (the metadata's placement picks the same nodes: least loaded, lowest id).
pub fn initial_cluster(
    top: &Topology,
    durability: Durability,
    degrade_after: Option<Duration>,
) -> ClusterState {
    let mut c = ClusterState::default();
    for (n, site) in &top.nodes {
        c.apply(MetaCommand::AddNode(NodeInfo {
            id: *n,
            site: site_name(*site),
            peer_addr: format!("127.0.1.{}:7000", n.0),
            admin_addr: format!("127.0.1.{}:8000", n.0),
            nbd_addr: format!("127.0.1.{}:9000", n.0),
        }))
        .expect("register a node");
    }
    let spec = &top.groups[&VOLUME_GROUP];
    c.apply(MetaCommand::CreateVolume {
        name: VOLUME_NAME.into(),
        size: VOLUME_BYTES as u64,
        replicas: spec.voters.len() as u32,
        home_site: Some(site_name(HOME_SITE)),
        durability,
    })
    .expect("create the volume");
    if let Some(d) = degrade_after {
        c.apply(MetaCommand::SetPolicy {
            name: VOLUME_NAME.into(),
            on_no_site: OnNoSite::DegradeAfter {
                ms: d.as_millis() as u64,
            },
        })
        .expect("set the policy");
    }
    let v = &c.volumes[VOLUME_NAME];
    let mut voters = v.voters.clone();
    voters.sort();
    let mut learners = v.learners.clone();
    learners.sort();
    assert!(
        v.id == VolumeId(VOLUME_GROUP.0) && voters == spec.voters && learners == spec.learners,
        "the metadata placed {VOLUME_NAME} on {voters:?} + {learners:?}, not as the topology"
    );
    c
}

impl Simulation {
    fn volume_info(&self, node: NodeId) -> Option<VolumeInfo> {
        let n = &self.nodes[&node];
        n.core.as_ref()?.cluster().volumes.get(VOLUME_NAME).cloned()
    }

    /// The volume as a node's metadata has it once the failover applied there (any node:
    /// the leader that answered the admin may be at the old home).
    fn failed_over(&self) -> Option<VolumeInfo> {
        self.nodes
            .keys()
            .find_map(|n| self.volume_info(*n).filter(|v| v.failover.is_some()))
    }

    fn home_nodes(&self) -> Vec<NodeId> {
        self.topology.at(HOME_SITE)
    }

    /// Whether `node` is held down by the site loss (its restarts wait for the return).
    pub(crate) fn held_down(&self, node: NodeId) -> bool {
        self.site_loss.held && self.site_loss.down && self.topology.site_of(node) == HOME_SITE
    }

    /// Sends one metadata command as the admin.
    fn admin_send(&mut self, cmd: MetaCommand) {
        self.clients.push(Client::admin(cmd.encode()));
        let client = self.clients.len() - 1;
        self.site_loss.admin = Some(client);
        self.site_loss.admin_since = self.now;
        self.schedule(
            0,
            Event::ClientSend {
                client,
                after_attempt: 0,
            },
        );
    }

    fn admin_done(&self) -> bool {
        self.site_loss
            .admin
            .is_some_and(|c| self.clients[c].acked > 0)
    }

    fn kill_home(&mut self, power_loss: bool) {
        for n in self.home_nodes() {
            if self.nodes[&n].up {
                let p = power_loss && self.rng.chance(self.cfg.power_loss_per_million);
                self.crash(n, p);
            }
        }
    }

    /// The reports of the replicas in `placed` outside the home that `admin` reaches
    /// (`hold`: for `execute`), and those it does not. Nodes the metadata knows and the
    /// run does not (the random metadata client registers some) never answer.
    fn reports(
        &mut self,
        admin: NodeId,
        placed: &[NodeId],
        hold: bool,
    ) -> (Vec<ReplicaReport>, Vec<NodeId>) {
        let now = self.now;
        let (mut reports, mut unreachable) = (Vec::new(), Vec::new());
        for &n in placed
            .iter()
            .filter(|n| self.topology.nodes.get(n) != Some(&HOME_SITE))
        {
            let reachable = self.nodes.get(&n).is_some_and(|node| {
                node.up && !self.net.is_cut(admin, n) && !self.net.is_cut(n, admin)
            });
            let report = reachable
                .then(|| {
                    let node = self.nodes.get_mut(&n).expect("known");
                    if hold {
                        node.report_holding(now, VOLUME_GROUP)
                    } else {
                        node.core()
                            .replica_report(Time::from_micros(now), VOLUME_GROUP)
                    }
                })
                .flatten();
            match report {
                Some(r) => reports.push(r),
                None => unreachable.push(n),
            }
        }
        (reports, unreachable)
    }

    pub(crate) fn site_loss_step(&mut self, step: u8) -> Check {
        match step {
            0 => self.lose_home(),
            1 => self.plan_and_execute(),
            2 => self.await_failover(),
            3 => self.home_returns(),
            4 => self.await_discard(),
            _ => Ok(()),
        }
    }

    fn lose_home(&mut self) -> Check {
        if self.phase != Phase::Faults || self.site_loss.lost {
            return Ok(());
        }
        self.site_loss.lost = true;
        self.site_loss.held = true;
        let home = self.home_nodes();
        if self.rng.below(2) == 0 {
            self.site_loss.down = true;
            self.trace.note(self.now, || {
                "site loss: every home node is killed".to_string()
            });
            self.kill_home(true);
        } else {
            let all: Vec<NodeId> = self.nodes.keys().copied().collect();
            let id = self.net.isolate_set(&home, &all, "the home site".into());
            self.trace.note(self.now, || {
                format!("site loss: the home is cut off from both other sites (partition {id})")
            });
            self.site_loss.cut = Some(id);
        }
        self.stats.site_losses += 1;
        let d = self.rng.range(100, 2_000) * MS;
        self.schedule(d, Event::SiteLoss(1));
        Ok(())
    }

    /// Plans on the metadata leader, with the survivors it can reach, and executes.
    fn plan_and_execute(&mut self) -> Check {
        if self.phase == Phase::Done || self.site_loss.applied.is_some() {
            return Ok(());
        }
        if self.failed_over().is_some() {
            // A proposal given up on committed after all.
            return self.await_failover();
        }
        let retry = 200 * MS;
        let admin = self
            .leader(META_GROUP)
            .filter(|n| self.topology.site_of(*n) != HOME_SITE);
        let Some((admin, v)) = admin.and_then(|a| Some((a, self.volume_info(a)?))) else {
            self.schedule(retry, Event::SiteLoss(1));
            return Ok(());
        };
        let cluster = self.nodes[&admin].core().cluster().clone();
        let mut placed: Vec<NodeId> = v.voters.iter().chain(&v.learners).copied().collect();
        if let Some(m) = &v.moving {
            placed.extend(m.voters.iter().chain(&m.learners));
        }
        placed.sort();
        placed.dedup();
        // `failover plan` first (read-only); then `execute`'s plan, whose replicas hold
        // still until it applies.
        let to = site_name(FAILOVER_SITE);
        let mut plan = None;
        for hold in [false, true] {
            let (reports, unreachable) = self.reports(admin, &placed, hold);
            match plan_volume(&to, &v, &cluster, &reports, &unreachable, false) {
                Ok(p) => plan = Some(p),
                Err(e) => {
                    self.trace.note(self.now, || {
                        format!("failover plan on n{admin}: refused: {e}")
                    });
                    self.schedule(retry, Event::SiteLoss(1));
                    return Ok(());
                }
            }
        }
        let plan = plan.expect("planned");
        self.trace.note(self.now, || {
            format!(
                "failover plan on n{admin}: from n{} (last {} term {}, commit {}): {}",
                plan.node, plan.last_index, plan.last_term, plan.commit, plan.rpo_text
            )
        });
        if plan.home_may_write && !self.site_loss.down {
            // What the plan tells an operator: make sure the home is down.
            self.trace.note(self.now, || {
                "the plan says the home may still write: its nodes are killed first".to_string()
            });
            self.site_loss.down = true;
            self.kill_home(false);
        }
        self.admin_send(MetaCommand::Failover {
            name: VOLUME_NAME.into(),
            to,
            node: plan.node,
            index: plan.last_index,
            term: plan.last_term,
            committed: plan.commit,
            term_floor: plan.term_floor,
            generation: plan.generation,
            plan: format!("sim-{}", self.now),
            at_unix_ms: WALL_EPOCH_UNIX_MS + self.now / MS,
            rpo: plan.rpo.clone(),
        });
        self.site_loss.plan = Some(plan);
        self.schedule(100 * MS, Event::SiteLoss(2));
        Ok(())
    }

    /// Waits for the failover to apply (or to be refused, or to time out: then plans
    /// again).
    fn await_failover(&mut self) -> Check {
        if self.phase == Phase::Done {
            return Ok(());
        }
        let Some(v) = self.failed_over() else {
            let timed_out = self.now >= self.site_loss.admin_since + EXECUTE_TIMEOUT;
            let next = if self.admin_done() || timed_out {
                self.trace.note(self.now, || {
                    format!(
                        "the failover was {}: plan again",
                        if timed_out {
                            "not answered in time"
                        } else {
                            "refused"
                        }
                    )
                });
                if let Some(c) = self.site_loss.admin.take() {
                    // The operator gave up on it (a retry may still be in a log).
                    self.clients[c].retired = true;
                }
                1
            } else {
                2
            };
            self.schedule(100 * MS, Event::SiteLoss(next));
            return Ok(());
        };
        // The plan that committed states the loss (an older one may have).
        let f = v.failover.clone().expect("failed over");
        let after = f
            .rpo
            .after_unix_ms
            .map(|ms| ms.saturating_sub(WALL_EPOCH_UNIX_MS) * MS);
        let stated = Stated {
            lossless: f.rpo.lossless,
            after,
        };
        // The epoch it ended: the newest one before it (0 in these runs, which fail over
        // once).
        let from = self
            .checker
            .epochs(VOLUME_GROUP)
            .map(|(k, _)| k.epoch)
            .filter(|e| *e < v.epoch)
            .max()
            .unwrap_or(0);
        self.trace.note(self.now, || {
            format!(
                "failover {} applied: epoch {from} -> {}, from n{}, stated {stated:?}",
                f.plan, v.epoch, f.node
            )
        });
        self.site_loss.applied = Some((from, v.epoch, stated));
        self.stats.failovers += 1;
        // The driver sets the policy (the storage node takes it from the metadata): a
        // site-durable volume's other sites are the new home's (the source's, until the
        // move to the failover's site).
        let remote: Vec<NodeId> = v
            .learners
            .iter()
            .copied()
            .filter(|n| site_name(self.topology.site_of(*n)) != v.home_site)
            .collect();
        for n in self.nodes.values_mut() {
            if let Some((_, degrade)) = n.site_durable_policy(VOLUME_GROUP) {
                n.set_site_durable(VOLUME_GROUP, remote.clone(), degrade);
            }
        }
        let d = self.rng.range(500, 5_000) * MS;
        self.schedule(d, Event::SiteLoss(3));
        Ok(())
    }

    fn home_returns(&mut self) -> Check {
        if !self.site_loss.held {
            return Ok(());
        }
        self.site_loss.held = false;
        self.trace
            .note(self.now, || "the old home returns".to_string());
        if let Some(id) = self.site_loss.cut.take() {
            self.net.heal(id);
        }
        if std::mem::take(&mut self.site_loss.down) {
            for n in self.home_nodes() {
                self.restart(n)?;
            }
        }
        if self.rng.below(2) == 0 {
            let d = self.rng.range(200, 3_000) * MS;
            self.schedule(d, Event::SiteLoss(4));
        }
        Ok(())
    }

    /// Discards the old home's divergent writes, then adds each of its replicas that
    /// restarted empty in the new epoch to the group as a learner (the mover's part).
    fn await_discard(&mut self) -> Check {
        if self.phase == Phase::Done {
            return Ok(());
        }
        let Some((_, new, _)) = self.site_loss.applied else {
            return Ok(());
        };
        if !self.site_loss.discarding {
            self.site_loss.discarding = true;
            self.trace.note(self.now, || {
                "discard the old home's divergent writes".to_string()
            });
            self.admin_send(MetaCommand::DiscardDivergent {
                name: VOLUME_NAME.into(),
                node: None,
            });
        }
        self.schedule(100 * MS, Event::SiteLoss(4));
        if !self.admin_done() {
            return Ok(());
        }
        self.site_loss.discarded = true;
        let Some(leader) = self.leader(VOLUME_GROUP) else {
            return Ok(());
        };
        let cs = self.nodes[&leader]
            .raft(VOLUME_GROUP)
            .expect("leads")
            .conf_state();
        if !cs.voters_outgoing.is_empty() {
            return Ok(());
        }
        let ready = self.home_nodes().into_iter().find(|n| {
            let node = &self.nodes[n];
            node.up
                && node.hosts(VOLUME_GROUP)
                && node.epoch(VOLUME_GROUP) == new
                && !node.fenced(VOLUME_GROUP)
                && !cs.learners.contains(&n.0)
                && !cs.voters.contains(&n.0)
        });
        let Some(n) = ready else {
            return Ok(());
        };
        self.site_loss.rejoined.push(n);
        self.stats.rejoined += 1;
        self.trace.note(self.now, || {
            format!("n{n} rejoins the new epoch as a learner (via n{leader})")
        });
        let mut cc = ConfChangeV2::default();
        let mut c = ConfChangeSingle::default();
        c.set_change_type(ConfChangeType::AddLearnerNode);
        c.node_id = n.0;
        cc.mut_changes().push(c);
        self.input(
            leader,
            Input::ConfChange {
                group: VOLUME_GROUP,
                cc,
            },
        )
    }

    /// End of run: the failover's checks (see the module doc), between each pair of
    /// consecutive epochs of `group`.
    pub(crate) fn check_failovers(&mut self, group: roamdisk_core::ids::GroupId) -> Check {
        let keys: Vec<Key> = self.checker.epochs(group).map(|(k, _)| *k).collect();
        for pair in keys.windows(2) {
            let (old, new) = (pair[0], pair[1]);
            let Some((from, to, stated)) = self.site_loss.applied else {
                return Err(violation(
                    Invariant::CoreError,
                    format!("group {group}: epoch {} without a failover", new.epoch),
                ));
            };
            if (from, to) != (old.epoch, new.epoch) {
                return Err(violation(
                    Invariant::CoreError,
                    format!(
                        "group {group}: epochs {} -> {}, but the failover went {from} -> {to}",
                        old.epoch, new.epoch
                    ),
                ));
            }
            self.checker
                .check_failover(old, new, stated, &self.power_losses)?;
        }
        Ok(())
    }
}
