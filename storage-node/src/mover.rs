//! Volume moves, driven by whichever node leads the volume's group.
//!
//! `MetaCommand::MoveVolume` records a target placement (voters at the new home, every
//! other replica a learner). Every node runs [`run`]; for each moving volume whose group
//! it leads, it takes the next step towards the target, one Raft membership change at a
//! time, re-deciding from the current state on every pass (so a leader change or a
//! restart in the middle simply continues):
//!
//! 1. add the target's new replicas as learners (they catch up from the log, or by
//!    snapshot + blake3 block copy);
//! 2. once every future voter is within [`PROMOTE_LAG_ENTRIES_MAX`] entries of the
//!    committed log and is not copying blocks,
//!    one joint-consensus change promotes them and demotes the old voters to learners
//!    (raft-rs leaves the joint configuration automatically);
//! 3. transfer leadership to the most advanced new voter;
//! 4. the new leader records the move as done (`FinishMove`, which bumps the volume's
//!    generation).
//!
//! The old home keeps its replicas as learners: moving back copies nothing.

use std::sync::Arc;
use std::time::Duration;

use raft::eraftpb::{ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2};
use roamdisk_core::ids::NodeId;
use roamdisk_core::meta::{MetaCommand, VolumeInfo};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::node::Node;
use crate::store::GroupStatus;

/// Interval between move steps.
pub const MOVE_STEP_MS: u64 = 200;
/// How far behind the commit index a future voter may be when it is promoted. Under
/// steady writes over a WAN a learner always trails by the entries in flight (a round
/// trip's worth), so requiring the whole log made a move wait for a quiet moment: the
/// chaos `moves` scenario saw moves of 18–36 s. Promoting a slightly lagging voter is
/// safe (joint consensus needs both majorities anyway) and it catches up within a round
/// trip.
pub const PROMOTE_LAG_ENTRIES_MAX: u64 = 32;

/// What the leader should do next for a moving volume.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Membership change in flight; wait.
    Wait(&'static str),
    AddLearners(Vec<u64>),
    /// Wait for these future voters to catch up.
    CatchUp(Vec<u64>),
    Promote {
        voters: Vec<u64>,
        demote: Vec<u64>,
    },
    TransferTo(u64),
    Finish,
}

/// Decides the next step from the leader's status of the group. `ready(n)` says whether
/// future voter `n` is usable (not copying blocks).
pub fn next_step(
    me: u64,
    target_voters: &[NodeId],
    target_learners: &[NodeId],
    g: &GroupStatus,
    ready: impl Fn(u64) -> bool,
) -> Step {
    if g.joint {
        return Step::Wait("joint configuration");
    }
    let member = |n: u64| g.voters.contains(&n) || g.learners.contains(&n);
    let missing: Vec<u64> = target_voters
        .iter()
        .chain(target_learners)
        .map(|n| n.0)
        .filter(|n| !member(*n))
        .collect();
    if !missing.is_empty() {
        return Step::AddLearners(missing);
    }
    let promote: Vec<u64> = target_voters
        .iter()
        .map(|n| n.0)
        .filter(|n| !g.voters.contains(n))
        .collect();
    if !promote.is_empty() {
        let behind: Vec<u64> = promote
            .iter()
            .copied()
            .filter(|n| {
                let matched = g.progress.iter().find(|p| p.node == *n).map(|p| p.matched);
                matched.is_none_or(|m| m + PROMOTE_LAG_ENTRIES_MAX < g.commit) || !ready(*n)
            })
            .collect();
        if !behind.is_empty() {
            return Step::CatchUp(behind);
        }
        let demote = g
            .voters
            .iter()
            .copied()
            .filter(|n| !target_voters.contains(&NodeId(*n)))
            .collect();
        return Step::Promote {
            voters: promote,
            demote,
        };
    }
    if !target_voters.contains(&NodeId(me)) {
        // Only to a voter whose data is whole: a replica copying blocks hands leadership
        // on at once (and serves nothing), and a move that made every new voter copy
        // left the volume without a whole leader (the soak's `mixed` seed 14).
        let best = g
            .progress
            .iter()
            .filter(|p| target_voters.contains(&NodeId(p.node)) && ready(p.node))
            .max_by_key(|p| (p.matched, std::cmp::Reverse(p.node)))
            .map(|p| p.node);
        return match best {
            Some(to) => Step::TransferTo(to),
            None => Step::CatchUp(target_voters.iter().map(|n| n.0).collect()),
        };
    }
    Step::Finish
}

fn conf_change(changes: &[(u64, ConfChangeType)]) -> ConfChangeV2 {
    let mut cc = ConfChangeV2::default();
    cc.set_transition(ConfChangeTransition::Auto);
    for (node, t) in changes {
        let mut c = ConfChangeSingle::default();
        c.node_id = *node;
        c.set_change_type(*t);
        cc.mut_changes().push(c);
    }
    cc
}

/// Takes one step for `v` if this node leads its group.
async fn step(node: &Arc<Node>, v: &VolumeInfo, status: &[GroupStatus]) -> anyhow::Result<()> {
    let group = v.id.group();
    let leading = || async {
        status
            .iter()
            .find(|g| g.group == group.0 && g.is_leader())
            .cloned()
    };
    let Some(target) = &v.moving else {
        // Not moving: learners the placement names and the group lacks (the replicas a
        // failover fenced, back after `discard-divergent`) are added, one change at a
        // time.
        let Some(g) = leading().await else {
            return Ok(());
        };
        if g.joint {
            return Ok(());
        }
        let missing: Vec<u64> = v
            .learners
            .iter()
            .map(|n| n.0)
            .filter(|n| !g.voters.contains(n) && !g.learners.contains(n))
            .collect();
        if !missing.is_empty() {
            info!(volume = %v.name, nodes = ?missing, "adding the placement's learners");
            let changes: Vec<_> = missing
                .iter()
                .map(|n| (*n, ConfChangeType::AddLearnerNode))
                .collect();
            if let Err(e) = node.conf_change(group, conf_change(&changes)).await {
                debug!(volume = %v.name, error = %e, "membership change not taken");
            }
        }
        return Ok(());
    };
    let Some(g) = leading().await else {
        return Ok(());
    };
    // Readiness of future voters: ask each (its status says whether it copies blocks).
    let mut not_ready = Vec::new();
    for n in &target.voters {
        if n.0 == node.me.0 {
            continue;
        }
        match node.peer_group_status(*n, group).await {
            Some(s) if !s.recovering => {}
            _ => not_ready.push(n.0),
        }
    }
    let next = next_step(node.me.0, &target.voters, &target.learners, &g, |n| {
        !not_ready.contains(&n)
    });
    debug!(volume = %v.name, step = ?next, "move step");
    match next {
        Step::Wait(_) | Step::CatchUp(_) => {}
        Step::AddLearners(nodes) => {
            info!(volume = %v.name, to = %target.to, ?nodes, "move: adding replicas as learners");
            let changes: Vec<_> = nodes
                .iter()
                .map(|n| (*n, ConfChangeType::AddLearnerNode))
                .collect();
            if let Err(e) = node.conf_change(group, conf_change(&changes)).await {
                // Usually a change still pending: the next pass decides again.
                debug!(volume = %v.name, error = %e, "membership change not taken");
            }
        }
        Step::Promote { voters, demote } => {
            info!(volume = %v.name, to = %target.to, ?voters, ?demote, "move: joint consensus");
            let changes: Vec<_> = voters
                .iter()
                .map(|n| (*n, ConfChangeType::AddNode))
                .chain(demote.iter().map(|n| (*n, ConfChangeType::AddLearnerNode)))
                .collect();
            if let Err(e) = node.conf_change(group, conf_change(&changes)).await {
                // Usually a change still pending: the next pass decides again.
                debug!(volume = %v.name, error = %e, "membership change not taken");
            }
        }
        Step::TransferTo(to) => {
            info!(volume = %v.name, to, "move: transferring leadership");
            node.transfer_leader(group, NodeId(to)).await;
        }
        Step::Finish => {
            let r = node
                .meta(MetaCommand::FinishMove {
                    name: v.name.clone(),
                    to: target.to.clone(),
                    generation: v.generation,
                })
                .await?;
            match r {
                Ok(Some(done)) => info!(
                    volume = %v.name, home = %done.home_site, generation = done.generation.0,
                    "move finished"
                ),
                Ok(None) => {}
                Err(e) => debug!(volume = %v.name, error = %e, "finish refused"),
            }
        }
    }
    Ok(())
}

/// Runs until `shutdown`: steps every moving volume this node leads.
pub async fn run(node: Arc<Node>, shutdown: CancellationToken) {
    loop {
        let cluster = node.cluster();
        let status = node.status().await;
        // Moving volumes, and failed-over ones (whose fenced replicas come back as
        // learners once their divergent writes are discarded).
        for v in cluster
            .volumes
            .values()
            .filter(|v| v.moving.is_some() || v.failover.is_some())
        {
            if let Err(e) = step(&node, v, &status).await {
                warn!(volume = %v.name, error = %e, "move step failed; retrying");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(MOVE_STEP_MS)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lag::Lag;
    use crate::store::PeerStatus;

    fn status(
        voters: &[u64],
        learners: &[u64],
        matched: &[(u64, u64)],
        commit: u64,
    ) -> GroupStatus {
        GroupStatus {
            group: 1,
            role: crate::store::Role::Leader,
            leader: Some(1),
            term: 2,
            commit,
            applied: commit,
            durable_applied: commit,
            last_index: commit,
            progress: matched
                .iter()
                .map(|(n, m)| PeerStatus {
                    node: *n,
                    matched: *m,
                    learner: learners.contains(n),
                    lag: Lag::default(),
                })
                .collect(),
            recovering: false,
            quarantined: false,
            epoch: 0,
            fenced: false,
            suspended: false,
            degraded: false,
            voters: voters.to_vec(),
            learners: learners.to_vec(),
            joint: false,
        }
    }

    fn ids(v: &[u64]) -> Vec<NodeId> {
        v.iter().map(|n| NodeId(*n)).collect()
    }

    #[test]
    fn a_move_goes_learners_then_joint_then_transfer_then_finish() {
        let tv = ids(&[4, 5, 6]);
        let tl = ids(&[1, 2, 3, 7]);
        // Start: voters 1-3 at home, learners 4 (target site) and 7.
        let g = status(
            &[1, 2, 3],
            &[4, 7],
            &[(1, 10), (2, 10), (3, 10), (4, 10), (7, 9)],
            10,
        );
        assert_eq!(
            next_step(1, &tv, &tl, &g, |_| true),
            Step::AddLearners(vec![5, 6])
        );
        // New learners behind: wait.
        let g = status(
            &[1, 2, 3],
            &[4, 5, 6, 7],
            &[
                (1, 120),
                (2, 120),
                (3, 120),
                (4, 120),
                (5, 3),
                (6, 120),
                (7, 120),
            ],
            120,
        );
        assert_eq!(next_step(1, &tv, &tl, &g, |_| true), Step::CatchUp(vec![5]));
        // Within the entries in flight of the commit index: promote.
        let behind = 120 - PROMOTE_LAG_ENTRIES_MAX;
        let g = status(
            &[1, 2, 3],
            &[4, 5, 6, 7],
            &[
                (1, 120),
                (2, 120),
                (3, 120),
                (4, 120),
                (5, behind),
                (6, 119),
                (7, 3),
            ],
            120,
        );
        assert!(matches!(
            next_step(1, &tv, &tl, &g, |_| true),
            Step::Promote { .. }
        ));
        // Caught up but node 6 still copying blocks: wait.
        let g = status(
            &[1, 2, 3],
            &[4, 5, 6, 7],
            &[
                (1, 12),
                (2, 12),
                (3, 12),
                (4, 12),
                (5, 12),
                (6, 12),
                (7, 12),
            ],
            12,
        );
        assert_eq!(
            next_step(1, &tv, &tl, &g, |n| n != 6),
            Step::CatchUp(vec![6])
        );
        assert_eq!(
            next_step(1, &tv, &tl, &g, |_| true),
            Step::Promote {
                voters: vec![4, 5, 6],
                demote: vec![1, 2, 3]
            }
        );
        let mut joint = g.clone();
        joint.joint = true;
        assert!(matches!(
            next_step(1, &tv, &tl, &joint, |_| true),
            Step::Wait(_)
        ));
        // Promoted: the old leader hands over to the most advanced new voter.
        let g = status(
            &[4, 5, 6],
            &[1, 2, 3, 7],
            &[
                (1, 14),
                (2, 14),
                (3, 14),
                (4, 13),
                (5, 14),
                (6, 14),
                (7, 14),
            ],
            14,
        );
        assert_eq!(next_step(1, &tv, &tl, &g, |_| true), Step::TransferTo(5));
        // The new leader finishes.
        assert_eq!(next_step(5, &tv, &tl, &g, |_| true), Step::Finish);
    }
}
