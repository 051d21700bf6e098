//! Forced failover from the admin's side: a read-only plan made from what the surviving
//! replicas report, and its execution, which refuses a plan the state moved away from
//! (see `roamdisk_core::failover` for the decisions and `roamdisk_core::node::failover`
//! for what each node then does). Also the reports of a fenced replica's divergent
//! writes.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use roamdisk_core::failover::{plan_id, plan_volume, PlanError, VolumePlan};
use roamdisk_core::ids::{GroupId, NodeId, VolumeId, META_GROUP};
use roamdisk_core::meta::{MetaCommand, MetaResult, VolumeInfo};
use roamdisk_core::node::{Divergence, ReplicaReport};
use serde::{Deserialize, Serialize};

use super::{unix_ms, Node, NodeError};
use crate::store::{Event, Refused};
use crate::wire::{PeerRequest, PeerResponse};

/// Plans a node keeps for `execute` (older ones are forgotten).
pub const PLANS_KEPT: usize = 16;
/// How long a plan may be executed after it was made.
pub const PLAN_TTL: Duration = Duration::from_secs(600);
/// How long a replica or a home node has to answer a plan's question.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// A failover plan: per volume, the replica its group re-forms from and the stated loss.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FailoverPlan {
    pub plan: String,
    pub to: String,
    pub made_unix_ms: u64,
    pub volumes: Vec<VolumePlan>,
    /// Volumes asked for that cannot fail over now, and why.
    pub refused: Vec<(String, String)>,
}

impl FailoverPlan {
    pub fn loses_data(&self) -> bool {
        self.volumes.iter().any(|v| !v.lossless)
    }
}

/// Why `execute` did not act.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError {
    #[error(
        "unknown plan {0:?} (plans live {PLAN_TTL:?} on the node that made them): make a new plan"
    )]
    UnknownPlan(String),
    #[error("the state moved since plan {old} was made (now it would be plan {})", new.plan)]
    Stale { old: String, new: Box<FailoverPlan> },
    #[error("plan {plan} may lose acknowledged writes of {volumes:?}: execute it with --accept-data-loss to accept that")]
    LossNotAccepted { plan: String, volumes: Vec<String> },
    #[error("{0}")]
    Node(#[from] NodeError),
}

/// What `execute` did to one volume.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Executed {
    pub name: String,
    pub result: Result<VolumeInfo, String>,
}

impl Node {
    /// What the replica of `group` on node `on` reports for a plan (`None`: no answer);
    /// `hold`: the plan is `execute`'s, and the replica holds still until it applies.
    pub async fn replica_report(
        &self,
        on: NodeId,
        group: GroupId,
        hold: bool,
    ) -> Option<ReplicaReport> {
        if on == self.me {
            return self.local_replica_report(group, hold).await;
        }
        let req = PeerRequest::ReplicaReport { group, hold };
        match self.transport.request_within(on, req, PROBE_TIMEOUT).await {
            Ok(PeerResponse::ReplicaReport(r)) => r,
            _ => None,
        }
    }

    pub(super) async fn local_replica_report(
        &self,
        group: GroupId,
        hold: bool,
    ) -> Option<ReplicaReport> {
        self.to_store(|reply| Event::ReplicaReport { group, hold, reply })
            .await
            .flatten()
    }

    /// Whether any node of `site` answers now.
    async fn site_reachable(&self, site: &str) -> bool {
        let cluster = self.cluster();
        let nodes: Vec<NodeId> = cluster
            .nodes
            .values()
            .filter(|n| n.site == site)
            .map(|n| n.id)
            .collect();
        let probes = nodes.into_iter().map(|n| async move {
            if n == self.me {
                return true;
            }
            let req = PeerRequest::GroupStatus { group: META_GROUP };
            self.transport
                .request_within(n, req, PROBE_TIMEOUT)
                .await
                .is_ok()
        });
        futures_util::future::join_all(probes)
            .await
            .into_iter()
            .any(|ok| ok)
    }

    /// A read-only plan to fail `names` over to `to` (none named: every volume whose
    /// home site does not answer). Kept on this node for `execute`. `hold`: `execute`'s
    /// plan, whose replicas hold still until the failover applies (see
    /// `roamdisk_core::node::failover::FAILOVER_HOLD`).
    pub async fn plan_failover(
        &self,
        to: &str,
        names: &[String],
        hold: bool,
    ) -> Result<FailoverPlan, NodeError> {
        let cluster = self.cluster();
        if !cluster.sites().iter().any(|s| s == to) {
            return Err(NodeError::Refused(Refused::Failed(format!(
                "unknown site {to:?}"
            ))));
        }
        let mut reachable = std::collections::BTreeMap::new();
        for s in cluster.sites() {
            let r = self.site_reachable(&s).await;
            reachable.insert(s, r);
        }
        let mut chosen: Vec<VolumeInfo> = Vec::new();
        let mut refused = Vec::new();
        if names.is_empty() {
            chosen.extend(
                cluster
                    .volumes
                    .values()
                    .filter(|v| v.home_site != to && !reachable[&v.home_site])
                    .cloned(),
            );
        } else {
            // A group's volume names its group: the group fails over as one, once.
            for n in names {
                match cluster.resolve(n) {
                    Some(v) if chosen.iter().any(|c| c.id == v.id) => {}
                    Some(v) => chosen.push(v.clone()),
                    None => refused.push((n.clone(), format!("volume {n:?} not found"))),
                }
            }
        }
        let mut volumes = Vec::new();
        for v in chosen {
            let mut placed: BTreeSet<NodeId> =
                v.voters.iter().chain(&v.learners).copied().collect();
            if let Some(m) = &v.moving {
                placed.extend(m.voters.iter().chain(&m.learners));
            }
            let survivors: Vec<NodeId> = placed
                .into_iter()
                .filter(|n| cluster.nodes.get(n).is_some_and(|i| i.site != v.home_site))
                .collect();
            let group = v.id.group();
            let answers = futures_util::future::join_all(
                survivors
                    .iter()
                    .map(|n| self.replica_report(*n, group, hold)),
            )
            .await;
            let mut reports = Vec::new();
            let mut unreachable = Vec::new();
            for (n, r) in survivors.iter().zip(answers) {
                match r {
                    Some(r) => reports.push(r),
                    None => unreachable.push(*n),
                }
            }
            let home_reachable = reachable.get(&v.home_site).copied().unwrap_or(false);
            match plan_volume(to, &v, &cluster, &reports, &unreachable, home_reachable) {
                Ok(p) => volumes.push(p),
                Err(e @ (PlanError::NoWholeReplica(_) | PlanError::AlreadyThere { .. })) => {
                    refused.push((v.name.clone(), e.to_string()))
                }
            }
        }
        let plan = FailoverPlan {
            plan: plan_id(to, &volumes),
            to: to.into(),
            made_unix_ms: unix_ms(),
            volumes,
            refused,
        };
        let mut plans = self.plans.lock().expect("plans lock");
        plans.retain(|(at, p)| at.elapsed() < PLAN_TTL && p.plan != plan.plan);
        while plans.len() >= PLANS_KEPT {
            plans.pop_front();
        }
        plans.push_back((Instant::now(), plan.clone()));
        Ok(plan)
    }

    /// Executes plan `id` (made on this node): plans again and refuses if anything moved,
    /// refuses a plan that may lose acknowledged writes unless `accept_data_loss`, then
    /// records each volume's failover in the metadata (every node carries it out).
    pub async fn execute_failover(
        &self,
        id: &str,
        accept_data_loss: bool,
    ) -> Result<Vec<Executed>, ExecuteError> {
        let old = self
            .plans
            .lock()
            .expect("plans lock")
            .iter()
            .find(|(at, p)| p.plan == id && at.elapsed() < PLAN_TTL)
            .map(|(_, p)| p.clone())
            .ok_or_else(|| ExecuteError::UnknownPlan(id.into()))?;
        let names: Vec<String> = old.volumes.iter().map(|v| v.name.clone()).collect();
        let new = self.plan_failover(&old.to, &names, true).await?;
        if new.plan != old.plan {
            return Err(ExecuteError::Stale {
                old: old.plan,
                new: Box::new(new),
            });
        }
        if new.loses_data() && !accept_data_loss {
            return Err(ExecuteError::LossNotAccepted {
                plan: new.plan,
                volumes: new
                    .volumes
                    .iter()
                    .filter(|v| !v.lossless)
                    .map(|v| v.name.clone())
                    .collect(),
            });
        }
        let mut done = Vec::new();
        for p in &new.volumes {
            tracing::warn!(volume = %p.name, to = %new.to, node = %p.node, rpo = %p.rpo_text,
                "failover executed");
            let r: MetaResult = self
                .meta(MetaCommand::Failover {
                    name: p.name.clone(),
                    to: new.to.clone(),
                    node: p.node,
                    index: p.last_index,
                    term: p.last_term,
                    committed: p.commit,
                    term_floor: p.term_floor,
                    generation: p.generation,
                    plan: new.plan.clone(),
                    at_unix_ms: unix_ms(),
                    rpo: p.rpo.clone(),
                })
                .await?;
            done.push(Executed {
                name: p.name.clone(),
                result: r
                    .map_err(|e| e.to_string())
                    .and_then(|v| v.ok_or_else(|| "no volume in the answer".to_string())),
            });
        }
        Ok(done)
    }

    /// What the fenced replica of `volume` on node `on` holds past the divergence point.
    pub async fn divergence(&self, on: NodeId, volume: VolumeId) -> Result<Divergence, Refused> {
        if on == self.me {
            return self.local_divergent(volume).await;
        }
        match self
            .transport
            .request(on, PeerRequest::Divergent { volume })
            .await
        {
            Ok(PeerResponse::Divergent(r)) => r.map_err(Refused::from),
            Ok(_) => Err(Refused::Failed("mismatched response".into())),
            Err(e) => Err(Refused::Failed(e.to_string())),
        }
    }

    pub(super) async fn local_divergent(&self, volume: VolumeId) -> Result<Divergence, Refused> {
        let cluster = self.cluster();
        let record = cluster
            .volume_by_id(volume)
            .and_then(|v| v.failover.clone())
            .ok_or_else(|| Refused::Failed(format!("volume {volume} never failed over")))?;
        self.to_store(|reply| Event::Divergent {
            group: volume.group(),
            record,
            reply,
        })
        .await
        .unwrap_or(Err(Refused::Shutdown))
    }
}
