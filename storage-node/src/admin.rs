//! Admin HTTP/JSON API, served by every node. Reads answer from this node's replica of
//! the cluster metadata; changes go through the metadata group's leader wherever it is.
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | /v1/status | | this node, the metadata leader, every group on this node |
//! | GET | /v1/nodes | | nodes |
//! | GET | /v1/volumes | | volumes with their leaders |
//! | GET | /v1/volumes/{name} | | one volume, with replication progress when this node leads it |
//! | POST | /v1/volumes | `{name,size,replicas?,home?,durability?}` | the created volume (201) |
//! | POST | /v1/volumes/{name}/resize | `{size}` | the volume |
//! | DELETE | /v1/volumes/{name} | | the deleted volume |
//! | GET | /metrics | | Prometheus text |
//!
//! Errors are `{"error": "..."}` with 400 (bad input), 404, 409 (exists) or 503
//! (cluster unavailable); a refused request changes nothing.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use roamdisk_core::ids::{NodeId, META_GROUP};
use roamdisk_core::meta::{Durability, MetaCommand, MetaError, NodeInfo, VolumeInfo};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::node::Node;

pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/nodes", get(nodes))
        .route("/v1/volumes", get(volumes).post(create_volume))
        .route("/v1/volumes/{name}", get(show_volume).delete(delete_volume))
        .route("/v1/volumes/{name}/resize", post(resize_volume))
        .route("/metrics", get(metrics))
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
    /// Per replica: (node, applied log index as the leader sees it, is learner).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Vec<ReplicaProgress>>,
    /// Exports of this volume on every node.
    pub exports: Vec<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ReplicaProgress {
    pub node: NodeId,
    pub matched: u64,
    pub learner: bool,
    pub lag_entries: u64,
}

fn view(node: &Node, v: &VolumeInfo, progress: Option<Vec<ReplicaProgress>>) -> VolumeView {
    let cluster = node.cluster();
    VolumeView {
        info: v.clone(),
        leader: node.leader_of(v.id.group()),
        progress,
        exports: cluster
            .nodes
            .values()
            .map(|n| format!("nbd://{}/{}", n.nbd_addr, v.name))
            .collect(),
    }
}

async fn status(State(node): State<Arc<Node>>) -> Json<serde_json::Value> {
    let cluster = node.cluster();
    let groups = node.status().await;
    Json(json!({
        "node": node.me,
        "site": node.site,
        "meta_leader": node.leader_of(META_GROUP),
        "nodes": cluster.nodes.len(),
        "sites": cluster.sites(),
        "volumes": cluster.volumes.values().map(|v| json!({
            "name": v.name, "size": v.size, "leader": node.leader_of(v.id.group()),
            "home_site": v.home_site, "replicas": v.replicas,
        })).collect::<Vec<_>>(),
        "groups": groups,
    }))
}

async fn nodes(State(node): State<Arc<Node>>) -> Json<Vec<NodeInfo>> {
    Json(node.cluster().nodes.values().cloned().collect())
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
        .volumes
        .get(&name)
        .ok_or_else(|| ApiError::from(MetaError::VolumeNotFound(name.clone())))?;
    let groups = node.status().await;
    let progress = groups
        .iter()
        .find(|g| g.group == v.id.0 && !g.progress.is_empty())
        .map(|g| {
            g.progress
                .iter()
                .map(|(n, matched, learner)| ReplicaProgress {
                    node: NodeId(*n),
                    matched: *matched,
                    learner: *learner,
                    lag_entries: g.last_index.saturating_sub(*matched),
                })
                .collect()
        });
    Ok(Json(view(&node, v, progress)))
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
}

async fn create_volume(
    State(node): State<Arc<Node>>,
    Json(b): Json<CreateBody>,
) -> Result<(StatusCode, Json<VolumeView>), ApiError> {
    let cmd = MetaCommand::CreateVolume {
        name: b.name,
        size: b.size,
        replicas: b.replicas.unwrap_or(3),
        home_site: b.home,
        durability: b.durability.unwrap_or_default(),
    };
    let v = node.meta(cmd).await??.expect("create returns the volume");
    Ok((StatusCode::CREATED, Json(view(&node, &v, None))))
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

async fn metrics(State(node): State<Arc<Node>>) -> impl IntoResponse {
    use std::fmt::Write;
    let groups = node.status().await;
    let cluster = node.cluster();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP roamdisk_raft_commit_index Commit index of each Raft group on this node."
    );
    let _ = writeln!(out, "# TYPE roamdisk_raft_commit_index gauge");
    for g in &groups {
        let _ = writeln!(
            out,
            "roamdisk_raft_commit_index{{node=\"{}\",group=\"{}\"}} {}",
            node.me, g.group, g.commit
        );
    }
    let _ = writeln!(
        out,
        "# HELP roamdisk_raft_applied_index Applied index of each Raft group on this node."
    );
    let _ = writeln!(out, "# TYPE roamdisk_raft_applied_index gauge");
    for g in &groups {
        let _ = writeln!(
            out,
            "roamdisk_raft_applied_index{{node=\"{}\",group=\"{}\"}} {}",
            node.me, g.group, g.applied
        );
    }
    let _ = writeln!(
        out,
        "# HELP roamdisk_raft_is_leader 1 if this node leads the group."
    );
    let _ = writeln!(out, "# TYPE roamdisk_raft_is_leader gauge");
    for g in &groups {
        let _ = writeln!(
            out,
            "roamdisk_raft_is_leader{{node=\"{}\",group=\"{}\"}} {}",
            node.me,
            g.group,
            u8::from(g.role == "Leader")
        );
    }
    let _ = writeln!(
        out,
        "# HELP roamdisk_replica_lag_entries Entries a replica is behind the leader (leader only)."
    );
    let _ = writeln!(out, "# TYPE roamdisk_replica_lag_entries gauge");
    for g in &groups {
        for (peer, matched, _) in &g.progress {
            let _ = writeln!(
                out,
                "roamdisk_replica_lag_entries{{group=\"{}\",replica=\"{}\"}} {}",
                g.group,
                peer,
                g.last_index.saturating_sub(*matched)
            );
        }
    }
    let _ = writeln!(out, "# HELP roamdisk_volumes Volumes in the cluster.");
    let _ = writeln!(out, "# TYPE roamdisk_volumes gauge");
    let _ = writeln!(out, "roamdisk_volumes {}", cluster.volumes.len());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
}
