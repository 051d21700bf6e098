//! The faults a run draws: crashes (process kills and power losses, some aimed at the
//! window between a write and its sync), restarts, partitions, leader transfers,
//! membership changes, compactions that force snapshots, and the catch-up race: a
//! replica cut off until it needs a snapshot, then cut off again while it copies its
//! blocks, so that a second snapshot lands during the copy (what the chaos drills found
//! as stale reads after moves: the copy made for the first snapshot was taken as the
//! copy for the second).

use raft::eraftpb::{ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2};
use roamdisk_core::ids::{GroupId, NodeId, META_GROUP};

use crate::checker::Check;
use crate::config::MS;
use crate::node::{Input, ReplicaSeed};
use crate::sim::{Event, Phase, Simulation, PARTITIONS_MAX};
use crate::topology::{VOLUME_GROUP, VOTERS_MAX, VOTERS_MIN};

/// The catch-up race in progress (one at a time).
#[derive(Clone, Copy, Debug)]
pub struct Race {
    pub node: NodeId,
    pub partition: u64,
    /// The copy was running when the second cut began.
    pub during_copy: bool,
}

fn conf_change(
    changes: &[(ConfChangeType, NodeId)],
    transition: ConfChangeTransition,
) -> ConfChangeV2 {
    let mut cc = ConfChangeV2::default();
    cc.set_transition(transition);
    for (ty, node) in changes {
        let mut c = ConfChangeSingle::default();
        c.set_change_type(*ty);
        c.node_id = node.0;
        cc.mut_changes().push(c);
    }
    cc
}

fn ids(v: &[u64]) -> Vec<NodeId> {
    v.iter().map(|n| NodeId(*n)).collect()
}

impl Simulation {
    pub(crate) fn fault(&mut self) -> Check {
        if self.phase != Phase::Faults {
            return Ok(());
        }
        let next = self
            .rng
            .range(self.cfg.fault_interval_ms.0, self.cfg.fault_interval_ms.1)
            * MS;
        self.schedule(next, Event::Fault);
        let w = &self.cfg.fault_weights;
        let weights = [
            w.crash,
            w.partition,
            w.transfer_leader,
            w.membership,
            w.compact,
            w.catch_up_race,
            w.sync_failure,
        ];
        match self.rng.weighted(&weights) {
            0 => self.crash_random(),
            1 => {
                if self.net.partitions() < PARTITIONS_MAX {
                    let nodes: Vec<NodeId> = self.nodes.keys().copied().collect();
                    let (id, description) = self.net.start_random_partition(&mut self.rng, &nodes);
                    self.stats.partitions += 1;
                    self.trace
                        .note(self.now, || format!("partition {id}: {description}"));
                    let d = self
                        .rng
                        .range(self.cfg.partition_ms.0, self.cfg.partition_ms.1)
                        * MS;
                    self.schedule(d, Event::Heal(id));
                }
                Ok(())
            }
            2 => {
                let groups = self.group_ids();
                let group = *self.rng.pick(&groups).expect("groups");
                let Some(leader) = self.leader(group) else {
                    return Ok(());
                };
                let cs = self.nodes[&leader].raft(group).expect("leads").conf_state();
                let targets: Vec<NodeId> = ids(&cs.voters)
                    .into_iter()
                    .filter(|n| *n != leader)
                    .collect();
                let Some(to) = self.rng.pick(&targets).copied() else {
                    return Ok(());
                };
                self.stats.leader_transfers += 1;
                self.trace.note(self.now, || {
                    format!("g{group}: transfer leadership n{leader} -> n{to}")
                });
                self.input(leader, Input::TransferLeader { group, to })
            }
            3 => {
                let groups = self.group_ids();
                let group = *self.rng.pick(&groups).expect("groups");
                self.membership_change(group)
            }
            4 => {
                let up: Vec<NodeId> = self.nodes.values().filter(|n| n.up).map(|n| n.id).collect();
                let Some(node) = self.rng.pick(&up).copied() else {
                    return Ok(());
                };
                if self.with_node(node, |n, ctx| n.checkpoint(true, ctx))? {
                    self.stats.compactions += 1;
                    self.trace.note(self.now, || {
                        format!("n{node}: compacts its logs to the applied index")
                    });
                }
                Ok(())
            }
            5 => self.race_step(NodeId(0), 0),
            _ => {
                // A disk error fails a node's next log sync.
                let up: Vec<NodeId> = self.nodes.values().filter(|n| n.up).map(|n| n.id).collect();
                if let Some(node) = self.rng.pick(&up).copied() {
                    self.trace
                        .note(self.now, || format!("n{node}: its next log sync will fail"));
                    self.nodes.get_mut(&node).expect("node").fail_sync = true;
                }
                Ok(())
            }
        }
    }

    pub(crate) fn crash_random(&mut self) -> Check {
        let down = self.nodes.values().filter(|n| !n.up).count() + self.crash_at_sync.len();
        // Up to half of the nodes may be down at once: enough to lose a group's quorum.
        if down >= self.nodes.len() / 2 {
            return Ok(());
        }
        let up: Vec<NodeId> = self
            .nodes
            .values()
            .filter(|n| n.up && !self.crash_at_sync.contains_key(&n.id))
            .map(|n| n.id)
            .collect();
        let Some(node) = self.rng.pick(&up).copied() else {
            return Ok(());
        };
        let power_loss = self.rng.chance(self.cfg.power_loss_per_million);
        if self.rng.chance(self.cfg.crash_in_sync_per_million) {
            self.trace.note(self.now, || {
                format!("n{node} will crash at its next sync (power loss: {power_loss})")
            });
            self.trace.mix(&[node.0, power_loss as u64, 1]);
            self.crash_at_sync.insert(node, power_loss);
        } else {
            self.crash(node, power_loss);
        }
        Ok(())
    }

    pub(crate) fn crash(&mut self, node: NodeId, power_loss: bool) {
        let busy = self.nodes[&node].is_busy();
        self.stats.crashes += 1;
        if power_loss {
            self.stats.power_losses += 1;
        }
        self.trace.note(self.now, || {
            format!(
                "n{node} crashes ({}{})",
                if power_loss {
                    "power loss"
                } else {
                    "process kill"
                },
                if busy { ", between write and sync" } else { "" }
            )
        });
        self.trace.mix(&[node.0, power_loss as u64]);
        if power_loss {
            self.power_losses.push((self.now, node));
        }
        let wipe = self.cfg.lose_synced_data;
        self.nodes
            .get_mut(&node)
            .expect("node")
            .crash(power_loss, wipe, &mut self.rng);
        self.durability_changed = true;
        let down = self
            .rng
            .range(self.cfg.downtime_ms.0, self.cfg.downtime_ms.1)
            * MS;
        self.schedule(down, Event::Restart(node));
    }

    pub(crate) fn restart(&mut self, node: NodeId) -> Check {
        if self.nodes[&node].up || self.held_down(node) {
            return Ok(());
        }
        self.durability_changed = true;
        self.with_node(node, |n, ctx| n.restart(ctx))
    }

    /// Proposes one membership change of `group` through its leader.
    pub(crate) fn membership_change(&mut self, group: GroupId) -> Check {
        let Some(leader) = self.leader(group) else {
            return Ok(());
        };
        let cs = self.nodes[&leader].raft(group).expect("leads").conf_state();
        if !cs.voters_outgoing.is_empty() {
            return self.leave_joint(group);
        }
        let voters = ids(&cs.voters);
        let learners = ids(&cs.learners);
        let outsiders: Vec<NodeId> = self
            .nodes
            .values()
            .filter(|n| n.up && !voters.contains(&n.id) && !learners.contains(&n.id))
            .map(|n| n.id)
            .collect();
        use ConfChangeType::{AddLearnerNode, AddNode, RemoveNode};
        let removals = self.cfg.allow_removing_leader;
        let mut options: Vec<(String, Vec<(ConfChangeType, NodeId)>)> = Vec::new();
        for n in &outsiders {
            options.push((format!("add learner n{n}"), vec![(AddLearnerNode, *n)]));
        }
        // A site-durable group keeps its replicas at other sites (its writes are answered
        // once one of them has the entry; a storage node refuses site durability without).
        let keep = self.nodes[&leader].site_durable_remote(group);
        for l in &learners {
            if (removals || *l != leader) && !keep.contains(l) {
                options.push((format!("remove learner n{l}"), vec![(RemoveNode, *l)]));
            }
            if voters.len() < VOTERS_MAX {
                options.push((format!("promote learner n{l}"), vec![(AddNode, *l)]));
            }
            for v in &voters {
                // Joint consensus: two voters change at once.
                options.push((
                    format!("replace voter n{v} by learner n{l} (n{v} becomes a learner)"),
                    vec![(AddNode, *l), (AddLearnerNode, *v)],
                ));
                if removals && !keep.contains(v) {
                    options.push((
                        format!("replace voter n{v} by learner n{l} (n{v} leaves)"),
                        vec![(AddNode, *l), (RemoveNode, *v)],
                    ));
                }
            }
        }
        if voters.len() > VOTERS_MIN {
            for v in &voters {
                options.push((format!("demote voter n{v}"), vec![(AddLearnerNode, *v)]));
                if removals && !keep.contains(v) {
                    options.push((format!("remove voter n{v}"), vec![(RemoveNode, *v)]));
                }
            }
        }
        if group == META_GROUP {
            // Every node stays a metadata member (it needs its lease from the group).
            options.retain(|(_, changes)| changes.iter().all(|(ty, _)| *ty != RemoveNode));
        }
        let Some((what, changes)) = self.rng.pick(&options).cloned() else {
            return Ok(());
        };
        let transition = if changes.len() > 1 && self.rng.below(2) == 0 {
            ConfChangeTransition::Explicit
        } else {
            ConfChangeTransition::Auto
        };
        // A node joining the group gets an empty replica that awaits a snapshot (as the
        // storage node's reconcile would create it).
        for (ty, n) in &changes {
            if *ty == AddLearnerNode && !self.nodes[n].hosts(group) {
                let kind = self.topology.groups[&group].kind;
                let seed = ReplicaSeed { kind, conf: None };
                self.with_node(*n, |node, ctx| node.create_replica(group, seed, ctx))?;
            }
        }
        self.stats.conf_changes += 1;
        self.trace.note(self.now, || {
            format!("g{group}: membership change via n{leader}: {what} ({transition:?})")
        });
        let cc = conf_change(&changes, transition);
        self.input(leader, Input::ConfChange { group, cc })
    }

    pub(crate) fn leave_joint(&mut self, group: GroupId) -> Check {
        let Some(leader) = self.leader(group) else {
            return Ok(());
        };
        let cs = self.nodes[&leader].raft(group).expect("leads").conf_state();
        if cs.voters_outgoing.is_empty() {
            return Ok(());
        }
        self.trace.note(self.now, || {
            format!("g{group}: leave the joint configuration via n{leader}")
        });
        self.input(
            leader,
            Input::ConfChange {
                group,
                cc: ConfChangeV2::default(),
            },
        )
    }

    pub(crate) fn quiet(&mut self) -> Check {
        self.phase = Phase::Quiet;
        // A lost home not back yet returns with everything else.
        self.site_loss.held = false;
        self.crash_at_sync.clear();
        self.race = None;
        self.net.heal_all();
        self.net.drop_per_million = 0;
        self.net.duplicate_per_million = 0;
        let down: Vec<NodeId> = self
            .nodes
            .values()
            .filter(|n| !n.up)
            .map(|n| n.id)
            .collect();
        for node in down {
            self.restart(node)?;
        }
        self.schedule(0, Event::Settle);
        Ok(())
    }

    /// One step of the catch-up race on `node` (step 0 picks the node).
    pub(crate) fn race_step(&mut self, node: NodeId, step: u8) -> Check {
        let group = VOLUME_GROUP;
        let all: Vec<NodeId> = self.nodes.keys().copied().collect();
        match step {
            0 => {
                if self.race.is_some() || self.phase != Phase::Faults {
                    return Ok(());
                }
                let Some(leader) = self.leader(group) else {
                    return Ok(());
                };
                let members: Vec<NodeId> = all
                    .iter()
                    .copied()
                    .filter(|n| *n != leader && self.nodes[n].up && self.nodes[n].hosts(group))
                    .collect();
                let Some(node) = self.rng.pick(&members).copied() else {
                    return Ok(());
                };
                let partition = self.net.isolate(node, &all);
                self.race = Some(Race {
                    node,
                    partition,
                    during_copy: false,
                });
                self.trace
                    .note(self.now, || format!("catch-up race: n{node} cut off"));
                let d = self.rng.range(300, 900) * MS;
                self.schedule(d, Event::Race { node, step: 1 });
            }
            1 | 3 => {
                let Some(mut race) = self.race else {
                    return Ok(());
                };
                // Compact the leader's log past the cut-off replica, then let it back:
                // it needs a snapshot.
                let compacted = match self.leader(group) {
                    Some(l) if l != node => self.with_node(l, |n, ctx| n.checkpoint(true, ctx))?,
                    _ => false,
                };
                self.net.heal(race.partition);
                if step == 3 {
                    self.race = None;
                    if compacted && race.during_copy {
                        self.stats.catch_up_races += 1;
                        self.trace.note(self.now, || {
                            format!("catch-up race: second snapshot for n{node} during its copy")
                        });
                    }
                    return Ok(());
                }
                if !compacted {
                    self.race = None;
                    return Ok(());
                }
                race.partition = u64::MAX;
                self.race = Some(race);
                let d = self.rng.range(20, 120) * MS;
                self.schedule(d, Event::Race { node, step: 2 });
            }
            _ => {
                let Some(mut race) = self.race else {
                    return Ok(());
                };
                if self.nodes[&node].copies.get(&group).is_none() {
                    // No copy running (not started yet, or already done): no race.
                    self.race = None;
                    return Ok(());
                }
                race.during_copy = true;
                race.partition = self.net.isolate(node, &all);
                self.race = Some(race);
                self.trace.note(self.now, || {
                    format!("catch-up race: n{node} cut off during its copy")
                });
                let d = self.rng.range(100, 400) * MS;
                self.schedule(d, Event::Race { node, step: 3 });
            }
        }
        Ok(())
    }
}
