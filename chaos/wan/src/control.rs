//! The control API (**API boundary**): HTTP/JSON over a [`Wan`], and its wire types.
//!
//! | request | body | answer |
//! |---|---|---|
//! | `GET /v1/links` | | every link: `[LinkJson]` |
//! | `GET /v1/links/{from}/{to}` | | `LinkJson` |
//! | `PUT /v1/links/{from}/{to}` | `LinkUpdate` (partial) | the updated `LinkJson` |
//! | `POST /v1/links/{from}/{to}/reset` | | `{"connections_reset": n}` |
//! | `POST /v1/profile/{name}` | | every link after applying the profile |
//! | `POST /v1/heal` | | every link after clearing all partitions |
//! | `GET /v1/routes` | | `[RouteInfo]` |
//!
//! Errors are `{"error": "..."}` with 400 for bad input (malformed JSON, unknown fields,
//! negative or out-of-range values, unknown partition mode, invalid site name) and 404
//! for an unknown link, profile or path. Times are milliseconds as JSON numbers
//! (fractions allowed), sizes bytes, bandwidth bytes per second.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tracing::{debug, info, warn, Instrument};

use crate::link::LinkStats;
use crate::params::{LinkParams, Partition};
use crate::profile::WanProfile;
pub use crate::update::{LinkUpdate, UpdateError};
use crate::wan::{LinkStatus, Wan, WanError};

/// A link's parameters on the wire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkParamsJson {
    pub delay_ms: f64,
    pub jitter_ms: f64,
    /// `null`: unlimited.
    pub bandwidth_bytes_per_sec: Option<u64>,
    /// `null`: automatic (see `queue_limit_effective_bytes`).
    pub queue_limit_bytes: Option<u64>,
    /// The queue limit in force.
    pub queue_limit_effective_bytes: u64,
    pub partition: Partition,
}

impl From<&LinkParams> for LinkParamsJson {
    fn from(p: &LinkParams) -> Self {
        LinkParamsJson {
            delay_ms: p.delay.as_secs_f64() * 1e3,
            jitter_ms: p.jitter.as_secs_f64() * 1e3,
            bandwidth_bytes_per_sec: p.bandwidth_bytes_per_sec,
            queue_limit_bytes: p.queue_limit_bytes,
            queue_limit_effective_bytes: p.queue_limit_effective_bytes(),
            partition: p.partition,
        }
    }
}

/// A directed link on the wire: parameters and counters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkJson {
    pub from: String,
    pub to: String,
    pub params: LinkParamsJson,
    pub stats: LinkStats,
}

impl From<&LinkStatus> for LinkJson {
    fn from(s: &LinkStatus) -> Self {
        LinkJson {
            from: s.from.clone(),
            to: s.to.clone(),
            params: LinkParamsJson::from(&s.params),
            stats: s.stats,
        }
    }
}

/// An error answer: `{"error": message}`.
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad_request(message: String) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message,
        }
    }
}

impl From<WanError> for ApiError {
    fn from(e: WanError) -> Self {
        let status = match &e {
            WanError::UnknownLink { .. } | WanError::Profile(_) => StatusCode::NOT_FOUND,
            WanError::Site(_)
            | WanError::Params(_)
            | WanError::InvalidUpdate(_)
            | WanError::SameSite { .. }
            | WanError::RouteConflict { .. } => StatusCode::BAD_REQUEST,
            WanError::Shutdown => StatusCode::SERVICE_UNAVAILABLE,
            WanError::Bind { .. } | WanError::BindControl { .. } | WanError::NoRuntime => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError {
            status,
            message: e.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Client mistakes are DEBUG (see ARCHITECTURE.md, cross-cutting: logging).
        debug!(status = %self.status, message = %self.message, "control API error");
        let body = serde_json::json!({ "error": self.message });
        (self.status, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// The control API as an axum router, to serve or to nest in another.
pub fn router(wan: &Wan) -> Router {
    Router::new()
        .route("/v1/links", get(list_links))
        .route("/v1/links/{from}/{to}", get(get_link).put(put_link))
        .route("/v1/links/{from}/{to}/reset", post(reset_link))
        .route("/v1/profile/{name}", post(apply_profile))
        .route("/v1/heal", post(heal))
        .route("/v1/routes", get(list_routes))
        .fallback(not_found)
        .with_state(std::sync::Arc::new(wan.handle()))
}

type Shared = State<std::sync::Arc<Wan>>;

fn all_links(wan: &Wan) -> Vec<LinkJson> {
    wan.links().iter().map(LinkJson::from).collect()
}

async fn list_links(State(wan): Shared) -> Json<Vec<LinkJson>> {
    Json(all_links(&wan))
}

async fn get_link(
    State(wan): Shared,
    Path((from, to)): Path<(String, String)>,
) -> ApiResult<LinkJson> {
    Ok(Json(LinkJson::from(&wan.link_status(&from, &to)?)))
}

async fn put_link(
    State(wan): Shared,
    Path((from, to)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<LinkJson> {
    // Parsed here rather than with the `Json` extractor, which answers 415/422: every
    // bad body is a 400 with serde's message (it names the field and the problem).
    let update: LinkUpdate = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid link update: {e}")))?;
    wan.try_update(&from, &to, |p| update.apply_to(p))?;
    Ok(Json(LinkJson::from(&wan.link_status(&from, &to)?)))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ResetJson {
    pub connections_reset: usize,
}

async fn reset_link(
    State(wan): Shared,
    Path((from, to)): Path<(String, String)>,
) -> ApiResult<ResetJson> {
    let connections_reset = wan.reset(&from, &to)?;
    Ok(Json(ResetJson { connections_reset }))
}

async fn apply_profile(State(wan): Shared, Path(name): Path<String>) -> ApiResult<Vec<LinkJson>> {
    let profile: WanProfile = name.parse().map_err(WanError::from)?;
    wan.apply_profile(profile);
    Ok(Json(all_links(&wan)))
}

async fn heal(State(wan): Shared) -> Json<Vec<LinkJson>> {
    wan.heal_all();
    Json(all_links(&wan))
}

async fn list_routes(State(wan): Shared) -> Json<Vec<crate::wan::RouteInfo>> {
    Json(wan.routes())
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such endpoint (see GET /v1/links)".to_owned(),
    }
}

impl Wan {
    /// Serves the control API on `addr` until the emulator shuts down; returns the bound
    /// address (useful with port 0).
    pub async fn serve_control(&self, addr: SocketAddr) -> Result<SocketAddr, WanError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| WanError::BindControl { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| WanError::BindControl { addr, source })?;
        let app = router(self);
        let shutdown = self.shutdown_token();
        let span = tracing::info_span!("control", addr = %bound);
        info!(parent: &span, "control API listening");
        self.tracker().spawn(
            async move {
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(async move { shutdown.cancelled().await })
                    .await;
                if let Err(e) = served {
                    warn!(error = %e, "control API stopped");
                }
            }
            .instrument(span),
        );
        Ok(bound)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn parse(json: &str) -> Result<LinkUpdate, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn absent_null_and_value_differ() {
        let u = parse(r#"{"delay_ms": 10}"#).ok();
        assert_eq!(
            u.map(|u| (u.delay_ms, u.bandwidth_bytes_per_sec)),
            Some((Some(10.0), None))
        );
        let u = parse(r#"{"bandwidth_bytes_per_sec": null}"#).ok();
        assert_eq!(u.map(|u| u.bandwidth_bytes_per_sec), Some(Some(None)));
        let u = parse(r#"{"bandwidth_bytes_per_sec": 1000000, "partition": "hold"}"#).ok();
        assert_eq!(
            u.map(|u| (u.bandwidth_bytes_per_sec, u.partition)),
            Some((Some(Some(1_000_000)), Some(Partition::Hold)))
        );
    }

    #[test]
    fn bad_updates_are_rejected_with_a_reason() {
        let e = parse(r#"{"partition": "sideways"}"#)
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("unknown variant `sideways`")));
        let e = parse(r#"{"bandwidth_bytes_per_sec": -5}"#)
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("-5")));
        let e = parse(r#"{"delay": 5}"#).err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("unknown field `delay`")));

        let mut p = LinkParams::default();
        for bad in [-1.0, f64::NAN, f64::INFINITY, 1e12] {
            let u = LinkUpdate {
                delay_ms: Some(bad),
                ..LinkUpdate::default()
            };
            assert!(u.apply_to(&mut p).is_err(), "{bad} accepted");
        }
        let u = LinkUpdate {
            delay_ms: Some(2.5),
            ..LinkUpdate::default()
        };
        assert_eq!(u.apply_to(&mut p), Ok(()));
        assert_eq!(p.delay, Duration::from_micros(2500));
    }

    #[test]
    fn update_serializes_null_only_when_asked() {
        let u = LinkUpdate {
            bandwidth_bytes_per_sec: Some(None),
            ..LinkUpdate::default()
        };
        assert_eq!(
            serde_json::to_string(&u).ok().as_deref(),
            Some(r#"{"bandwidth_bytes_per_sec":null}"#)
        );
        assert_eq!(
            serde_json::to_string(&LinkUpdate::default())
                .ok()
                .as_deref(),
            Some("{}")
        );
    }
}
