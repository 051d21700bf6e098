//! The failover endpoints: a read-only plan, its execution, and the divergent writes a
//! failover fenced (their report, the fenced replica's content, their discard).
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | POST | /v1/failover/plan | `{to, volumes?}` | the plan: per volume the replica the group re-forms from and the stated loss |
//! | POST | /v1/failover/execute | `{plan, accept_data_loss?}` | what each volume became (409: the state moved, or the plan loses data and it was not accepted; 404: unknown plan) |
//! | GET | /v1/volumes/{name}/divergent | | every fenced replica's divergent writes (entries, blocks, bytes, time range) |
//! | GET | /v1/volumes/{name}/divergent/image | | the fenced replica on this node, as a raw image (its content at fencing time) |
//! | POST | /v1/volumes/{name}/discard-divergent | `{node?}` | the volume; its fenced replicas resync as learners |

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use roamdisk_core::failover::{rfc3339_ms, VolumePlan};
use roamdisk_core::ids::NodeId;
use roamdisk_core::meta::MetaCommand;
use serde::Deserialize;
use serde_json::{json, Value};

use super::ApiError;
use crate::node::Node;
use crate::node::{ExecuteError, FailoverPlan};

/// A plan as the API shows it: the core's fields, and the loss with its times in RFC 3339.
pub fn plan_json(p: &FailoverPlan) -> Value {
    let volume = |v: &VolumePlan| {
        let mut j = serde_json::to_value(v).unwrap_or(Value::Null);
        j["rpo"] = json!({
            "lossless": v.rpo.lossless,
            "entries": v.rpo.entries,
            "bytes": v.rpo.bytes,
            "after": v.rpo.after_unix_ms.map(rfc3339_ms),
            "after_unix_ms": v.rpo.after_unix_ms,
            "as_of": v.rpo.as_of_unix_ms.map(rfc3339_ms),
            "text": v.rpo_text,
        });
        j["last_entry_at"] = json!(v.last_entry_unix_ms.map(rfc3339_ms));
        j
    };
    json!({
        "plan": p.plan,
        "to": p.to,
        "made_at": rfc3339_ms(p.made_unix_ms),
        "loses_data": p.loses_data(),
        "volumes": p.volumes.iter().map(volume).collect::<Vec<_>>(),
        "refused": p.refused.iter().map(|(n, why)| json!({"name": n, "why": why})).collect::<Vec<_>>(),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanBody {
    to: String,
    #[serde(default)]
    volumes: Vec<String>,
}

pub async fn plan(
    State(node): State<Arc<Node>>,
    Json(b): Json<PlanBody>,
) -> Result<Json<Value>, ApiError> {
    if !node.cluster().sites().contains(&b.to) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("unknown site {:?}", b.to),
        ));
    }
    let p = node.plan_failover(&b.to, &b.volumes, false).await?;
    let mut j = plan_json(&p);
    // A consistency group's volumes share its log: their common cut is the group's
    // last entry in the chosen replica, the same index for all of them.
    let cluster = node.cluster();
    if let Some(vols) = j["volumes"].as_array_mut() {
        for v in vols {
            let Some(g) = v["name"].as_str().and_then(|n| cluster.volumes.get(n)) else {
                continue;
            };
            if !g.members.is_empty() {
                v["group"] = json!({
                    "volumes": g.members.iter().map(|m| m.name.clone()).collect::<Vec<_>>(),
                    "cut": {"index": v["last_index"], "term": v["last_term"]},
                });
            }
        }
    }
    Ok(Json(j))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecuteBody {
    plan: String,
    #[serde(default)]
    accept_data_loss: bool,
}

pub async fn execute(
    State(node): State<Arc<Node>>,
    Json(b): Json<ExecuteBody>,
) -> Result<Json<Value>, Response> {
    match node.execute_failover(&b.plan, b.accept_data_loss).await {
        Ok(done) => Ok(Json(json!({
            "plan": b.plan,
            "volumes": done.iter().map(|d| match &d.result {
                Ok(v) => json!({
                    "name": d.name,
                    "generation": v.generation,
                    "epoch": v.epoch,
                    "node": v.voters.first(),
                    "home": v.home_site,
                    "to": v.moving.as_ref().map_or(v.home_site.clone(), |m| m.to.clone()),
                    "divergence": v.failover.as_ref().map(|f| json!({"generation": v.generation, "index": f.index})),
                    "fenced": v.divergent.iter().map(|d| d.node).collect::<Vec<_>>(),
                }),
                Err(e) => json!({"name": d.name, "error": e}),
            }).collect::<Vec<_>>(),
        }))),
        Err(e) => {
            let (code, extra) = match &e {
                ExecuteError::UnknownPlan(_) => (StatusCode::NOT_FOUND, Value::Null),
                ExecuteError::Stale { new, .. } => (StatusCode::CONFLICT, plan_json(new)),
                ExecuteError::LossNotAccepted { .. } => (StatusCode::CONFLICT, Value::Null),
                ExecuteError::Node(_) => (StatusCode::SERVICE_UNAVAILABLE, Value::Null),
            };
            Err((
                code,
                Json(json!({"error": e.to_string(), "new_plan": extra})),
            )
                .into_response())
        }
    }
}

pub async fn divergent(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let cluster = node.cluster();
    let v = cluster
        .resolve(&name)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("volume {name:?} not found")))?;
    let mut out = Vec::new();
    for d in &v.divergent {
        let site = cluster.nodes.get(&d.node).map(|n| n.site.clone());
        let admin = cluster.nodes.get(&d.node).map(|n| n.admin_addr.clone());
        match node.divergence(d.node, v.id).await {
            Ok(r) => out.push(json!({
                "node": d.node, "site": site, "epoch": d.epoch, "admin": admin,
                "entries": r.entries, "writes": r.writes, "blocks": r.blocks, "bytes": r.bytes,
                "from_index": r.from_index, "last_index": r.last_index,
                "first_at": r.first_unix_ms.map(rfc3339_ms), "last_at": r.last_unix_ms.map(rfc3339_ms),
                "first_unix_ms": r.first_unix_ms, "last_unix_ms": r.last_unix_ms,
                "complete": r.complete,
            })),
            Err(e) => out.push(json!({
                "node": d.node, "site": site, "epoch": d.epoch, "admin": admin,
                "error": format!("the fenced replica did not answer: {e}"),
            })),
        }
    }
    Ok(Json(json!({
        "name": name,
        "failover": v.failover,
        "replicas": out,
    })))
}

/// The fenced replica of `name` on this node, as a raw image: what it held when the
/// failover fenced it (its data does not change until `discard-divergent`).
pub async fn divergent_image(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let cluster = node.cluster();
    let v = cluster
        .resolve(&name)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("volume {name:?} not found")))?;
    if !v.divergent.iter().any(|d| d.node == node.me) {
        let here: Vec<String> = v
            .divergent
            .iter()
            .filter_map(|d| {
                cluster
                    .nodes
                    .get(&d.node)
                    .map(|n| format!("node {} at {}", d.node, n.admin_addr))
            })
            .collect();
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("no fenced replica of {name:?} on this node; ask {here:?}"),
        ));
    }
    // A group's volume: its own range of the group's replica; the group's name: all.
    let (base, size) = cluster
        .export(&name)
        .map_or((0, v.size), |(_, b, s)| (b, s));
    let mut file = tokio::fs::File::open(node.volume_path(v.id))
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("open the fenced replica: {e}"),
            )
        })?;
    {
        use tokio::io::AsyncSeekExt;
        file.seek(std::io::SeekFrom::Start(base))
            .await
            .map_err(|e| {
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("seek the fenced replica: {e}"),
                )
            })?;
    }
    let file = tokio::io::AsyncReadExt::take(file, size);
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 20));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        body,
    )
        .into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DiscardBody {
    #[serde(default)]
    node: Option<NodeId>,
}

pub async fn discard_divergent(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    body: Option<Json<DiscardBody>>,
) -> Result<Json<super::VolumeView>, ApiError> {
    let b = body.map(|Json(b)| b).unwrap_or_default();
    let v = node
        .meta(MetaCommand::DiscardDivergent { name, node: b.node })
        .await??
        .ok_or_else(|| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "no volume in the answer".into(),
            )
        })?;
    Ok(Json(super::view(&node, &v, None)))
}
