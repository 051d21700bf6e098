//! Admin HTTP/JSON API, served by every node. Reads answer from this node's replica of
//! the cluster metadata; changes go through the metadata group's leader wherever it is.
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | /v1/status | | this node, the metadata leader, every group on this node |
//! | GET | /v1/nodes | | nodes |
//! | GET | /v1/volumes | | volumes with their leaders |
//! | GET | /v1/volumes/{name} | | one volume, with each replica's progress and each remote site's lag (from its leader) |
//! | POST | /v1/volumes | `{name,size,replicas?,home?,durability?,on_no_site?}` or `{name,size,group}` (a new volume of that consistency group) | the created volume, or its group (201) |
//! | POST | /v1/groups | `{name,volumes:[{name,size}],replicas?,home?,durability?,on_no_site?}` | the created consistency group (201) |
//! | GET | /v1/groups/{name} | | the group, as `GET /v1/volumes/{name}` shows a volume (one lag for all its volumes) |
//! | POST | /v1/volumes/{name}/resize | `{size}` | the volume |
//! | POST | /v1/volumes/{name}/policy | `{on_no_site: "suspend" \| {"degrade-after": {"ms"}}}` | the volume |
//! | DELETE | /v1/volumes/{name} | | the deleted volume |
//! | POST | /v1/volumes/{name}/move | `{to}` | the volume, with its move target (the group's leader drives it) |
//! | POST | /v1/volumes/{name}/transfer-leader | `{to}` | the volume; asked of the group's leader (409 names it otherwise) |
//! | POST | /v1/volumes/{name}/verify | `{repair?}` | the verify report: every replica's blocks compared by digest at one index (409 while another verify runs on this node) |
//! | GET | /v1/volumes/{name}/verify | | the progress of the verify running on this node |
//! | POST | /v1/failover/plan, /v1/failover/execute | | see `failover` |
//! | GET | /v1/volumes/{name}/divergent[/image] | | see `failover` |
//! | POST | /v1/volumes/{name}/discard-divergent | `{node?}` | see `failover` |
//! | GET | /metrics | | Prometheus text |
//!
//! A consistency group is a volume whose `members` are the volumes it holds: they share
//! its one Raft group, so reads that name a member (show, verify, divergent,
//! transfer-leader) answer for its group, and changes (move, resize, delete, policy,
//! failover) take the group's name.
//!
//! Errors are `{"error": "..."}` with 400 (bad input), 404, 409 (exists) or 503
//! (cluster unavailable); a refused request changes nothing.
//!
//! Here: the router and the JSON endpoints; in `metrics`, `/metrics`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use roamdisk_core::ids::{NodeId, META_GROUP};
use roamdisk_core::meta::{
    ClusterState, Durability, MetaCommand, MetaError, NodeInfo, OnNoSite, VolumeInfo,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::node::Node;
use crate::store::GroupStatus;

mod failover;
mod metrics;

pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/nodes", get(nodes).post(add_node))
        .route("/v1/volumes", get(volumes).post(create_volume))
        .route("/v1/volumes/{name}", get(show_volume).delete(delete_volume))
        .route("/v1/groups", post(create_group))
        .route("/v1/groups/{name}", get(show_group))
        .route("/v1/volumes/{name}/resize", post(resize_volume))
        .route("/v1/volumes/{name}/policy", post(set_policy))
        .route("/v1/volumes/{name}/move", post(move_volume))
        .route("/v1/volumes/{name}/transfer-leader", post(transfer_leader))
        .route(
            "/v1/volumes/{name}/verify",
            post(verify_volume).get(verify_progress),
        )
        .route("/v1/failover/plan", post(failover::plan))
        .route("/v1/failover/execute", post(failover::execute))
        .route("/v1/volumes/{name}/divergent", get(failover::divergent))
        .route(
            "/v1/volumes/{name}/divergent/image",
            get(failover::divergent_image),
        )
        .route(
            "/v1/volumes/{name}/discard-divergent",
            post(failover::discard_divergent),
        )
        .route("/metrics", get(metrics::metrics))
        .with_state(node)
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<MetaError> for ApiError {
    fn from(e: MetaError) -> Self {
        let code = match e {
            MetaError::VolumeExists(_) => StatusCode::CONFLICT,
            MetaError::VolumeNotFound(_) => StatusCode::NOT_FOUND,
            MetaError::MoveInProgress { .. }
            | MetaError::AlreadyHome { .. }
            | MetaError::StaleFailover { .. } => StatusCode::CONFLICT,
            MetaError::NotDivergent { .. } | MetaError::NotAGroup(_) => StatusCode::NOT_FOUND,
            MetaError::InGroup { .. } => StatusCode::CONFLICT,
            MetaError::WouldBreakInvariant(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError(code, e.to_string())
    }
}

impl From<crate::node::NodeError> for ApiError {
    fn from(e: crate::node::NodeError) -> Self {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cluster unavailable: {e}"),
        )
    }
}

/// A volume as the API shows it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct VolumeView {
    #[serde(flatten)]
    pub info: VolumeInfo,
    pub leader: Option<NodeId>,
    /// Per replica, as the leader sees it (absent when no leader answered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Vec<ReplicaProgress>>,
    /// Lag of every other site (absent when no leader answered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_lag: Option<Vec<SiteLag>>,
    /// Progress of a move in flight (absent when not moving or no leader answered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub move_progress: Option<MoveProgress>,
    /// The leader holds its answers (no lease from the metadata quorum, or a failover's
    /// fencing wait): writes wait. Absent when no leader answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspended: Option<bool>,
    /// A site-durable volume commits on its home quorum alone (degrade-after): its RPO
    /// is the remote sites' lag. Absent when no leader answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<bool>,
    /// Exports of this volume on every node.
    pub exports: Vec<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ReplicaProgress {
    pub node: NodeId,
    pub site: String,
    pub matched: u64,
    pub learner: bool,
    pub lag_entries: u64,
    pub lag_bytes: u64,
    pub lag_seconds: f64,
}

/// How far a remote site is behind: its most advanced replica of the volume.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SiteLag {
    pub site: String,
    pub node: NodeId,
    pub entries: u64,
    pub bytes: u64,
    /// Age of the oldest write the site lacks: the RPO of losing the home site now.
    pub seconds: f64,
    pub drain_bytes_per_sec: f64,
    /// Time to drain at the recent rate (`None` if it is not draining).
    pub eta_seconds: Option<f64>,
    /// The replica is still copying blocks after a snapshot: it lacks data even when
    /// no log entry is missing (its lag is not drained yet).
    #[serde(default)]
    pub copying_blocks: bool,
}

/// Fills in `copying_blocks` by asking each remote site's replica.
async fn with_copy_state(node: &Node, v: &VolumeInfo, mut lags: Vec<SiteLag>) -> Vec<SiteLag> {
    for l in &mut lags {
        l.copying_blocks = node
            .peer_group_status(l.node, v.id.group())
            .await
            .is_some_and(|g| g.recovering);
    }
    lags
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct MoveProgress {
    pub to: String,
    /// What the leader does now: "adding replicas", "catching up", "joint consensus",
    /// "transferring leadership", "finishing".
    pub phase: String,
    /// Bytes of log the furthest-behind future voter still lacks.
    pub bytes_left: u64,
    pub bytes_per_sec: f64,
    pub eta_seconds: Option<f64>,
}

fn move_progress(node: &Node, v: &VolumeInfo, g: &GroupStatus) -> Option<MoveProgress> {
    let t = v.moving.as_ref()?;
    let leader = g.leader.unwrap_or(node.me.0);
    let phase = match crate::mover::next_step(leader, &t.voters, &t.learners, g, |_| true) {
        crate::mover::Step::Wait(_) => "joint consensus",
        crate::mover::Step::AddLearners(_) => "adding replicas",
        crate::mover::Step::CatchUp(_) => "catching up",
        crate::mover::Step::Promote { .. } => "catching up",
        crate::mover::Step::TransferTo(_) => "transferring leadership",
        crate::mover::Step::Finish => "finishing",
    };
    let behind = t
        .voters
        .iter()
        .filter_map(|n| g.progress.iter().find(|p| p.node == n.0))
        .max_by_key(|p| p.lag.bytes);
    let (bytes_left, rate) = behind.map_or((0, 0.0), |p| (p.lag.bytes, p.lag.drain_bytes_per_sec));
    Some(MoveProgress {
        to: t.to.clone(),
        phase: phase.into(),
        bytes_left,
        bytes_per_sec: rate,
        eta_seconds: behind.and_then(|p| p.lag.eta_seconds()),
    })
}

/// Per-replica progress and per-remote-site lag from the leader's status of a group.
fn replication(
    cluster: &ClusterState,
    v: &VolumeInfo,
    g: &GroupStatus,
) -> (Vec<ReplicaProgress>, Vec<SiteLag>) {
    let site_of = |n: u64| {
        cluster
            .nodes
            .get(&NodeId(n))
            .map_or_else(String::new, |i| i.site.clone())
    };
    let progress = g
        .progress
        .iter()
        .map(|p| ReplicaProgress {
            node: NodeId(p.node),
            site: site_of(p.node),
            matched: p.matched,
            learner: p.learner,
            lag_entries: p.lag.entries,
            lag_bytes: p.lag.bytes,
            lag_seconds: p.lag.seconds,
        })
        .collect();
    let mut sites: Vec<SiteLag> = Vec::new();
    for p in &g.progress {
        let site = site_of(p.node);
        if site == v.home_site {
            continue;
        }
        let candidate = SiteLag {
            site: site.clone(),
            node: NodeId(p.node),
            entries: p.lag.entries,
            bytes: p.lag.bytes,
            seconds: p.lag.seconds,
            drain_bytes_per_sec: p.lag.drain_bytes_per_sec,
            eta_seconds: p.lag.eta_seconds(),
            copying_blocks: false,
        };
        match sites.iter_mut().find(|s| s.site == site) {
            Some(s) if s.entries > candidate.entries => *s = candidate,
            Some(_) => {}
            None => sites.push(candidate),
        }
    }
    sites.sort_by(|a, b| a.site.cmp(&b.site));
    (progress, sites)
}

fn view(node: &Node, v: &VolumeInfo, status: Option<&GroupStatus>) -> VolumeView {
    let cluster = node.cluster();
    let (progress, site_lag) = match status {
        Some(g) => {
            let (p, s) = replication(&cluster, v, g);
            (Some(p), Some(s))
        }
        None => (None, None),
    };
    let move_progress = status.and_then(|g| move_progress(node, v, g));
    VolumeView {
        info: v.clone(),
        leader: node.leader_of(v.id.group()),
        progress,
        site_lag,
        move_progress,
        suspended: status.map(|g| g.suspended),
        degraded: status.map(|g| g.degraded),
        exports: {
            let names: Vec<&str> = if v.members.is_empty() {
                vec![v.name.as_str()]
            } else {
                v.members.iter().map(|m| m.name.as_str()).collect()
            };
            cluster
                .nodes
                .values()
                .flat_map(|n| {
                    names
                        .iter()
                        .map(move |e| format!("nbd://{}/{e}", n.nbd_addr))
                })
                .collect()
        },
    }
}

async fn status(State(node): State<Arc<Node>>) -> Json<serde_json::Value> {
    let cluster = node.cluster();
    let groups = node.status().await;
    let mut volumes = Vec::new();
    for v in cluster.volumes.values() {
        let leader = node.leader_status(v.id.group()).await;
        let site_lag = match &leader {
            Some(g) => Some(with_copy_state(&node, v, replication(&cluster, v, g).1).await),
            None => None,
        };
        volumes.push(json!({
            "name": v.name, "size": v.size, "leader": node.leader_of(v.id.group()),
            "home_site": v.home_site, "replicas": v.replicas, "durability": v.durability,
            "generation": v.generation, "epoch": v.epoch, "site_lag": site_lag,
            "suspended": leader.as_ref().map(|g| g.suspended),
            "degraded": leader.as_ref().map(|g| g.degraded),
            "on_no_site": v.on_no_site,
            "divergent": v.divergent.iter().map(|d| d.node).collect::<Vec<_>>(),
            "moving": v.moving.as_ref().map(|m| m.to.clone()),
            "members": v.members.iter().map(|m| m.name.clone()).collect::<Vec<_>>(),
        }));
    }
    Json(json!({
        "node": node.me,
        "site": node.site,
        "meta_leader": node.leader_of(META_GROUP),
        "nodes": cluster.nodes.len(),
        "sites": cluster.sites(),
        "volumes": volumes,
        "groups": groups,
        "links": node.links(),
        "dedup": node.dedup_counts(),
    }))
}

async fn nodes(State(node): State<Arc<Node>>) -> Json<Vec<NodeInfo>> {
    Json(node.cluster().nodes.values().cloned().collect())
}

/// A node joining a running cluster registers through any member.
async fn add_node(
    State(node): State<Arc<Node>>,
    Json(info): Json<NodeInfo>,
) -> Result<(StatusCode, Json<Vec<NodeInfo>>), ApiError> {
    if info.id.0 == 0 || info.site.is_empty() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "a node needs an id of at least 1 and a site".into(),
        ));
    }
    if let Some(known) = node.cluster().nodes.get(&info.id) {
        if known.peer_addr != info.peer_addr {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!(
                    "node id {} is already {}@{}; pick another id",
                    info.id, known.site, known.peer_addr
                ),
            ));
        }
    }
    node.meta(MetaCommand::AddNode(info)).await??;
    Ok((
        StatusCode::CREATED,
        Json(node.cluster().nodes.values().cloned().collect()),
    ))
}

async fn volumes(State(node): State<Arc<Node>>) -> Json<Vec<VolumeView>> {
    let cluster = node.cluster();
    Json(
        cluster
            .volumes
            .values()
            .map(|v| view(&node, v, None))
            .collect(),
    )
}

async fn show_volume(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> Result<Json<VolumeView>, ApiError> {
    let cluster = node.cluster();
    let v = cluster
        .resolve(&name)
        .ok_or_else(|| ApiError::from(MetaError::VolumeNotFound(name.clone())))?;
    let status = node.leader_status(v.id.group()).await;
    let mut view = view(&node, v, status.as_ref());
    if let Some(lags) = view.site_lag.take() {
        view.site_lag = Some(with_copy_state(&node, v, lags).await);
    }
    Ok(Json(view))
}

/// A created volume or group, with its site-durable policy set when one was asked.
async fn created(
    node: &Node,
    mut v: VolumeInfo,
    on_no_site: Option<OnNoSite>,
) -> Result<(StatusCode, Json<VolumeView>), ApiError> {
    if let Some(on_no_site) = on_no_site.filter(|p| *p != OnNoSite::default()) {
        v = node
            .meta(MetaCommand::SetPolicy {
                name: v.name.clone(),
                on_no_site,
            })
            .await??
            .expect("the policy command returns the volume");
    }
    Ok((StatusCode::CREATED, Json(view(node, &v, None))))
}

/// `GET /v1/groups/{name}`: a consistency group (a member's name answers for its group).
async fn show_group(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> Result<Json<VolumeView>, ApiError> {
    let is_group = node.cluster().resolve(&name).map(|v| !v.members.is_empty());
    match is_group {
        None => Err(MetaError::VolumeNotFound(name).into()),
        Some(false) => Err(MetaError::NotAGroup(name).into()),
        Some(true) => show_volume(State(node), Path(name)).await,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupVolume {
    name: String,
    size: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupBody {
    name: String,
    volumes: Vec<GroupVolume>,
    #[serde(default)]
    replicas: Option<u32>,
    #[serde(default)]
    home: Option<String>,
    #[serde(default)]
    durability: Option<Durability>,
    #[serde(default)]
    on_no_site: Option<OnNoSite>,
}

async fn create_group(
    State(node): State<Arc<Node>>,
    Json(b): Json<GroupBody>,
) -> Result<(StatusCode, Json<VolumeView>), ApiError> {
    let cmd = MetaCommand::CreateGroup {
        name: b.name.clone(),
        members: b.volumes.into_iter().map(|m| (m.name, m.size)).collect(),
        replicas: b.replicas.unwrap_or(3),
        home_site: b.home,
        durability: b.durability.unwrap_or_default(),
    };
    let v = node.meta(cmd).await??.expect("create returns the group");
    created(&node, v, b.on_no_site).await
}

#[derive(Deserialize)]
struct CreateBody {
    name: String,
    size: u64,
    #[serde(default)]
    replicas: Option<u32>,
    #[serde(default)]
    home: Option<String>,
    #[serde(default)]
    durability: Option<Durability>,
    /// What a site-durable volume does while no other site answers (default: suspend).
    #[serde(default)]
    on_no_site: Option<OnNoSite>,
    /// A new volume of this consistency group (placed, replicated and durable as the
    /// group is: none of the above may be given).
    #[serde(default)]
    group: Option<String>,
}

async fn create_volume(
    State(node): State<Arc<Node>>,
    Json(b): Json<CreateBody>,
) -> Result<(StatusCode, Json<VolumeView>), ApiError> {
    if let Some(group) = b.group {
        if b.replicas.is_some()
            || b.home.is_some()
            || b.durability.is_some()
            || b.on_no_site.is_some()
        {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("a volume of group {group:?} takes the group's replicas, home, durability and policy: give only its name and size"),
            ));
        }
        let v = node
            .meta(MetaCommand::AddToGroup {
                group,
                name: b.name,
                size: b.size,
            })
            .await??
            .expect("adding returns the group");
        return Ok((StatusCode::CREATED, Json(view(&node, &v, None))));
    }
    let cmd = MetaCommand::CreateVolume {
        name: b.name.clone(),
        size: b.size,
        replicas: b.replicas.unwrap_or(3),
        home_site: b.home,
        durability: b.durability.unwrap_or_default(),
    };
    let v = node.meta(cmd).await??.expect("create returns the volume");
    created(&node, v, b.on_no_site).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyBody {
    on_no_site: OnNoSite,
}

async fn set_policy(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    Json(b): Json<PolicyBody>,
) -> Result<Json<VolumeView>, ApiError> {
    let v = node
        .meta(MetaCommand::SetPolicy {
            name,
            on_no_site: b.on_no_site,
        })
        .await??
        .expect("the policy command returns the volume");
    Ok(Json(view(&node, &v, None)))
}

#[derive(Deserialize)]
struct ResizeBody {
    size: u64,
}

async fn resize_volume(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    Json(b): Json<ResizeBody>,
) -> Result<Json<VolumeView>, ApiError> {
    let v = node
        .meta(MetaCommand::ResizeVolume { name, size: b.size })
        .await??
        .expect("resize returns the volume");
    Ok(Json(view(&node, &v, None)))
}

#[derive(Deserialize)]
struct MoveBody {
    to: String,
}

async fn move_volume(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    Json(b): Json<MoveBody>,
) -> Result<Json<VolumeView>, ApiError> {
    let v = node
        .meta(MetaCommand::MoveVolume { name, to: b.to })
        .await??
        .expect("move returns the volume");
    let status = node.leader_status(v.id.group()).await;
    Ok(Json(view(&node, &v, status.as_ref())))
}

#[derive(Deserialize)]
struct TransferBody {
    to: u64,
}

/// Asks this node, which must lead the volume's group, to hand leadership to voter `to`.
/// Answers once the request is handed to Raft: the transfer itself may still fail (the
/// target too far behind, or an election in between), which the caller sees in `leader`.
async fn transfer_leader(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    Json(b): Json<TransferBody>,
) -> Result<Json<VolumeView>, ApiError> {
    let cluster = node.cluster();
    let v = cluster
        .resolve(&name)
        .cloned()
        .ok_or_else(|| ApiError::from(MetaError::VolumeNotFound(name.clone())))?;
    let to = NodeId(b.to);
    if !v.replicas_on(to) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("node {to} holds no replica of volume {name}"),
        ));
    }
    let group = v.id.group();
    let local = node.status().await.into_iter().find(|g| g.group == group.0);
    let Some(status) = local.filter(|s| s.is_leader()) else {
        return Err(ApiError(
            StatusCode::CONFLICT,
            match node.leader_of(group) {
                Some(l) => format!(
                    "node {} does not lead volume {name}; node {l} does",
                    node.me
                ),
                None => format!("volume {name} has no leader right now"),
            },
        ));
    };
    if !status.voters.contains(&to.0) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("node {to} is not a voter of volume {name} (a learner cannot lead)"),
        ));
    }
    node.transfer_leader(group, to).await;
    let status = Some(status);
    Ok(Json(view(&node, &v, status.as_ref())))
}

async fn delete_volume(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> Result<Json<VolumeView>, ApiError> {
    let v = node
        .meta(MetaCommand::DeleteVolume { name })
        .await??
        .expect("delete returns the volume");
    Ok(Json(view(&node, &v, None)))
}

#[derive(Deserialize, Default)]
struct VerifyBody {
    #[serde(default)]
    repair: bool,
}

/// Compares every replica of the volume by digest at one index (`crate::verify`);
/// with `repair`, the replicas that differ copy the differing blocks from the leader.
async fn verify_volume(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    body: Option<Json<VerifyBody>>,
) -> Result<Json<crate::verify::VerifyReport>, ApiError> {
    let repair = body.is_some_and(|Json(b)| b.repair);
    let v = node
        .cluster()
        .resolve(&name)
        .cloned()
        .ok_or_else(|| ApiError::from(MetaError::VolumeNotFound(name.clone())))?;
    let Ok(_running) = node.verify_running.try_lock() else {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "a verify is already running on this node".into(),
        ));
    };
    let report = crate::verify::run(&node, &v, repair, &node.verify_progress).await?;
    if report.differing_blocks > 0 {
        tracing::error!(volume = %name, blocks = report.differing_blocks,
            "verify: replicas of the volume differ");
    }
    Ok(Json(report))
}

async fn verify_progress(
    State(node): State<Arc<Node>>,
) -> Json<crate::volume::verify::VerifyProgress> {
    Json(
        node.verify_progress
            .lock()
            .expect("verify progress")
            .clone(),
    )
}
