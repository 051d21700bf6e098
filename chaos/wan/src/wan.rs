//! [`Wan`], the handle everything else goes through: sites, links, routes, run-time
//! changes, counters, shutdown.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, Instrument};

use crate::limits::CONNECTIONS_PER_ROUTE_MAX;
use crate::link::{Link, LinkStats};
use crate::params::{LinkParams, ParamsError, Partition, Site, SiteError};
use crate::profile::{UnknownProfile, WanProfile};
use crate::proxy::{accept_loop, RouteCtx};
use crate::shaper::SplitMix64;

/// How to start a [`Wan`].
#[derive(Clone, Debug)]
pub struct WanConfig {
    /// Parameters of every link created, until [`Wan::apply_profile`] changes them.
    pub profile: WanProfile,
    /// Seed of the jitter generators (one per directed link, derived from this seed and
    /// the two site names, so a link's jitter does not depend on creation order).
    pub seed: u64,
    /// Sites known from the start; links between all of them exist at once, so they can
    /// be configured before any route. Routes add their sites as needed.
    pub sites: Vec<String>,
    /// Simultaneous connections per route; connections beyond it are reset at once. See
    /// [`CONNECTIONS_PER_ROUTE_MAX`] for the default.
    pub connections_per_route_max: usize,
}

impl Default for WanConfig {
    fn default() -> Self {
        WanConfig {
            profile: WanProfile::Lan,
            seed: 0,
            sites: Vec::new(),
            connections_per_route_max: CONNECTIONS_PER_ROUTE_MAX,
        }
    }
}

/// Errors of the [`Wan`] API.
#[derive(Debug, thiserror::Error)]
pub enum WanError {
    #[error(transparent)]
    Site(#[from] SiteError),
    #[error("invalid link parameters: {0}")]
    Params(#[from] ParamsError),
    #[error("{0}")]
    InvalidUpdate(#[from] crate::update::UpdateError),
    #[error(transparent)]
    Profile(#[from] UnknownProfile),
    #[error("a link needs two different sites, got {site:?} twice")]
    SameSite { site: String },
    #[error("unknown link {from} -> {to}")]
    UnknownLink { from: String, to: String },
    #[error("{listen} already routes {from} -> {to} to {target}")]
    RouteConflict {
        listen: SocketAddr,
        from: String,
        to: String,
        target: SocketAddr,
    },
    #[error("bind route listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("bind control API on {addr}: {source}")]
    BindControl {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the WAN emulator needs a tokio runtime (Wan::new was called outside one)")]
    NoRuntime,
    #[error("the WAN emulator is shut down")]
    Shutdown,
}

/// One route: a listener whose connections go from `from` to `to` and end at `target`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteInfo {
    pub from: String,
    pub to: String,
    pub listen: SocketAddr,
    pub target: SocketAddr,
}

/// A directed link's parameters and counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkStatus {
    pub from: String,
    pub to: String,
    pub params: LinkParams,
    pub stats: LinkStats,
}

/// The WAN emulator. Runs on the tokio runtime it was created in.
///
/// Dropping it (or [`Wan::shutdown`]) stops every listener and resets every connection.
/// Share it between tasks with an `Arc`.
pub struct Wan {
    inner: Arc<Inner>,
    /// Only the handle returned by [`Wan::new`] shuts the emulator down on drop; the
    /// control API works on a non-owning handle, so a running control server does not
    /// keep the emulator alive.
    owner: bool,
}

struct Inner {
    seed: u64,
    connections_per_route_max: usize,
    state: Mutex<State>,
    /// Held across every read-modify-write of link parameters, so that concurrent
    /// changes (API calls, heal, profiles) do not lose each other.
    changes: Mutex<()>,
    next_conn_id: Arc<AtomicU64>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

struct State {
    profile: WanProfile,
    sites: BTreeSet<Site>,
    links: BTreeMap<(Site, Site), Arc<Link>>,
    routes: Vec<RouteInfo>,
}

impl Drop for Wan {
    fn drop(&mut self) {
        if self.owner {
            self.inner.shutdown.cancel();
        }
    }
}

impl Wan {
    /// Starts an emulator with links between all of `config.sites`. Must be called
    /// inside a tokio runtime.
    pub fn new(config: WanConfig) -> Result<Wan, WanError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(WanError::NoRuntime);
        }
        let wan = Wan {
            inner: Arc::new(Inner {
                seed: config.seed,
                connections_per_route_max: config.connections_per_route_max,
                state: Mutex::new(State {
                    profile: config.profile,
                    sites: BTreeSet::new(),
                    links: BTreeMap::new(),
                    routes: Vec::new(),
                }),
                changes: Mutex::new(()),
                next_conn_id: Arc::new(AtomicU64::new(1)),
                shutdown: CancellationToken::new(),
                tracker: TaskTracker::new(),
            }),
            owner: true,
        };
        for site in &config.sites {
            wan.add_site(site)?;
        }
        Ok(wan)
    }

    /// A handle that does not shut the emulator down when dropped (for the control API).
    pub(crate) fn handle(&self) -> Wan {
        Wan {
            inner: Arc::clone(&self.inner),
            owner: false,
        }
    }

    pub(crate) fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    pub(crate) fn tracker(&self) -> &TaskTracker {
        &self.inner.tracker
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No critical section here can panic half-way.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_changes(&self) -> MutexGuard<'_, ()> {
        self.inner.changes.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn seed(&self) -> u64 {
        self.inner.seed
    }

    /// The profile new links start with (the last one applied).
    pub fn profile(&self) -> WanProfile {
        self.lock().profile
    }

    /// Adds a site and the links between it and every known site (with the current
    /// profile's parameters). Adding a known site does nothing.
    pub fn add_site(&self, name: &str) -> Result<(), WanError> {
        let site = Site::new(name)?;
        if self.inner.shutdown.is_cancelled() {
            return Err(WanError::Shutdown);
        }
        let mut state = self.lock();
        if state.sites.contains(&site) {
            return Ok(());
        }
        let others: Vec<Site> = state.sites.iter().cloned().collect();
        for other in others {
            for (from, to) in [(&site, &other), (&other, &site)] {
                let params = state.profile.params(from.as_str(), to.as_str());
                let link = Link::spawn(
                    from.clone(),
                    to.clone(),
                    params,
                    link_seed(self.inner.seed, from, to),
                    &self.inner.tracker,
                    self.inner.shutdown.clone(),
                );
                state.links.insert((from.clone(), to.clone()), link);
            }
        }
        state.sites.insert(site);
        Ok(())
    }

    pub fn sites(&self) -> Vec<String> {
        self.lock().sites.iter().map(|s| s.to_string()).collect()
    }

    /// Starts (or returns the existing) route from site `from` to site `to` ending at
    /// `target`, listening on an ephemeral port of 127.0.0.1. A node at `from` is given
    /// the returned address instead of `target`, the address of a node at `to`. Bytes
    /// sent by the connecting side cross link `from → to`, replies `to → from`.
    ///
    /// The TCP handshake is not delayed (the emulator accepts locally), so a new
    /// connection's first request costs one round trip less than on a real WAN.
    pub async fn route(
        &self,
        from: &str,
        to: &str,
        target: SocketAddr,
    ) -> Result<SocketAddr, WanError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(WanError::Shutdown);
        }
        let existing = self
            .lock()
            .routes
            .iter()
            .find(|r| r.from == from && r.to == to && r.target == target)
            .map(|r| r.listen);
        match existing {
            Some(listen) => Ok(listen),
            None => {
                self.start_route(SocketAddr::from(([127, 0, 0, 1], 0)), from, to, target)
                    .await
            }
        }
    }

    /// Like [`Wan::route`] on a chosen listen address. Asking again for the same route on
    /// the same address returns it; a different route on that address is an error.
    pub async fn route_on(
        &self,
        listen: SocketAddr,
        from: &str,
        to: &str,
        target: SocketAddr,
    ) -> Result<SocketAddr, WanError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(WanError::Shutdown);
        }
        let existing = self
            .lock()
            .routes
            .iter()
            .find(|r| r.listen == listen)
            .cloned();
        match existing {
            Some(r) if r.from == from && r.to == to && r.target == target => Ok(r.listen),
            Some(r) => Err(WanError::RouteConflict {
                listen,
                from: r.from,
                to: r.to,
                target: r.target,
            }),
            None => self.start_route(listen, from, to, target).await,
        }
    }

    async fn start_route(
        &self,
        listen: SocketAddr,
        from: &str,
        to: &str,
        target: SocketAddr,
    ) -> Result<SocketAddr, WanError> {
        let (from_site, to_site) = sites_of_pair(from, to)?;
        self.add_site(from)?;
        self.add_site(to)?;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| WanError::Bind {
                addr: listen,
                source,
            })?;
        let listen = listener.local_addr().map_err(|source| WanError::Bind {
            addr: listen,
            source,
        })?;
        let (forward, backward) = {
            let mut state = self.lock();
            if self.inner.shutdown.is_cancelled() {
                return Err(WanError::Shutdown);
            }
            let forward = link_of(&state, &from_site, &to_site)?;
            let backward = link_of(&state, &to_site, &from_site)?;
            state.routes.push(RouteInfo {
                from: from.to_owned(),
                to: to.to_owned(),
                listen,
                target,
            });
            (forward, backward)
        };
        let ctx = Arc::new(RouteCtx {
            forward,
            backward,
            target,
            connections_max: self.inner.connections_per_route_max,
            connections_open: AtomicUsize::new(0),
            next_conn_id: Arc::clone(&self.inner.next_conn_id),
            tracker: self.inner.tracker.clone(),
            shutdown: self.inner.shutdown.clone(),
        });
        let span = tracing::info_span!("route", %from, %to, %listen, %target);
        info!(parent: &span, "route listening");
        self.inner
            .tracker
            .spawn(accept_loop(listener, ctx).instrument(span));
        Ok(listen)
    }

    pub fn routes(&self) -> Vec<RouteInfo> {
        self.lock().routes.clone()
    }

    fn link(&self, from: &str, to: &str) -> Result<Arc<Link>, WanError> {
        let (from, to) = sites_of_pair(from, to)?;
        link_of(&self.lock(), &from, &to)
    }

    /// Parameters of link `from → to`.
    pub fn params(&self, from: &str, to: &str) -> Result<LinkParams, WanError> {
        Ok(self.link(from, to)?.params())
    }

    /// Replaces the parameters of link `from → to`; existing connections see the change
    /// at once. Setting [`Partition::Drop`] resets every connection between the sites.
    pub fn set_params(&self, from: &str, to: &str, params: LinkParams) -> Result<(), WanError> {
        self.update(from, to, |p| *p = params).map(|_| ())
    }

    /// Changes some parameters of link `from → to` (e.g. `|p| p.delay = ms(10)`) and
    /// returns the result. Nothing changes if the result is invalid.
    pub fn update(
        &self,
        from: &str,
        to: &str,
        change: impl FnOnce(&mut LinkParams),
    ) -> Result<LinkParams, WanError> {
        self.try_update(from, to, |p| {
            change(p);
            Ok::<(), WanError>(())
        })
    }

    /// Like [`Wan::update`] with a change that can fail (the control API's partial JSON).
    pub(crate) fn try_update<E>(
        &self,
        from: &str,
        to: &str,
        change: impl FnOnce(&mut LinkParams) -> Result<(), E>,
    ) -> Result<LinkParams, WanError>
    where
        WanError: From<E>,
    {
        let link = self.link(from, to)?;
        let _changes = self.lock_changes();
        let mut params = link.params();
        change(&mut params)?;
        params.validate()?;
        self.apply(&link, params);
        Ok(params)
    }

    fn apply(&self, link: &Link, params: LinkParams) {
        let before = link.params();
        link.set_params(params);
        if params != before {
            info!(from = %link.from, to = %link.to, ?params, "link changed");
        }
        if params.partition == Partition::Drop {
            // Reset after the parameters are in place: a connection accepted from now on
            // sees the partition and is refused; one accepted before is in the registry.
            let _ = self.reset(link.from.as_str(), link.to.as_str());
        }
    }

    /// Sets the partition state of link `from → to` only (a one-way partition).
    pub fn partition(&self, from: &str, to: &str, partition: Partition) -> Result<(), WanError> {
        self.update(from, to, |p| p.partition = partition)
            .map(|_| ())
    }

    /// Sets the partition state of both directions between `a` and `b`.
    pub fn partition_pair(&self, a: &str, b: &str, partition: Partition) -> Result<(), WanError> {
        self.partition(a, b, partition)?;
        self.partition(b, a, partition)
    }

    /// Clears every partition; held bytes are then delivered.
    pub fn heal_all(&self) {
        let links: Vec<Arc<Link>> = self.lock().links.values().cloned().collect();
        let _changes = self.lock_changes();
        for link in links {
            let mut params = link.params();
            if params.partition != Partition::None {
                params.partition = Partition::None;
                self.apply(&link, params);
            }
        }
    }

    /// Resets every connection between sites `a` and `b` (both directions): both ends of
    /// each see a connection reset. Returns how many connections were reset.
    pub fn reset(&self, a: &str, b: &str) -> Result<usize, WanError> {
        let forward = self.link(a, b)?;
        let backward = self.link(b, a)?;
        let mut tokens: BTreeMap<u64, CancellationToken> = BTreeMap::new();
        tokens.extend(forward.connection_tokens());
        tokens.extend(backward.connection_tokens());
        for token in tokens.values() {
            token.cancel();
        }
        if !tokens.is_empty() {
            info!(%a, %b, connections = tokens.len(), "connections reset");
        }
        Ok(tokens.len())
    }

    /// Gives every link the profile's delay, jitter and bandwidth (and an automatic
    /// queue), and makes it the profile of links created later. Partitions are kept:
    /// a profile describes the network, partitions are faults injected into it.
    pub fn apply_profile(&self, profile: WanProfile) {
        let links: Vec<Arc<Link>> = {
            let mut state = self.lock();
            state.profile = profile;
            state.links.values().cloned().collect()
        };
        let _changes = self.lock_changes();
        for link in links {
            let mut params = profile.params(link.from.as_str(), link.to.as_str());
            params.partition = link.params().partition;
            self.apply(&link, params);
        }
        info!(%profile, "profile applied");
    }

    /// Parameters and counters of link `from → to`.
    pub fn link_status(&self, from: &str, to: &str) -> Result<LinkStatus, WanError> {
        Ok(status(&*self.link(from, to)?))
    }

    /// Parameters and counters of every link, ordered by (from, to).
    pub fn links(&self) -> Vec<LinkStatus> {
        let links: Vec<Arc<Link>> = self.lock().links.values().cloned().collect();
        links.iter().map(|l| status(l)).collect()
    }

    /// Counters of link `from → to`.
    pub fn stats(&self, from: &str, to: &str) -> Result<LinkStats, WanError> {
        Ok(self.link(from, to)?.stats())
    }

    /// Stops every listener and resets every connection, and waits until all of the
    /// emulator's tasks have ended.
    pub async fn shutdown(self) {
        let inner = Arc::clone(&self.inner);
        inner.shutdown.cancel();
        drop(self);
        inner.tracker.close();
        inner.tracker.wait().await;
    }
}

fn status(link: &Link) -> LinkStatus {
    LinkStatus {
        from: link.from.to_string(),
        to: link.to.to_string(),
        params: link.params(),
        stats: link.stats(),
    }
}

fn sites_of_pair(from: &str, to: &str) -> Result<(Site, Site), WanError> {
    let from_site = Site::new(from)?;
    let to_site = Site::new(to)?;
    if from_site == to_site {
        return Err(WanError::SameSite {
            site: from.to_owned(),
        });
    }
    Ok((from_site, to_site))
}

fn link_of(state: &State, from: &Site, to: &Site) -> Result<Arc<Link>, WanError> {
    state
        .links
        .get(&(from.clone(), to.clone()))
        .cloned()
        .ok_or_else(|| WanError::UnknownLink {
            from: from.to_string(),
            to: to.to_string(),
        })
}

/// The jitter seed of link `from → to`: the Wan's seed mixed with both names (FNV-1a),
/// so it depends neither on creation order nor on the other links.
fn link_seed(seed: u64, from: &Site, to: &Site) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in from
        .as_str()
        .bytes()
        .chain([0xff])
        .chain(to.as_str().bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    SplitMix64::new(seed ^ h).next_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_seeds_differ_by_direction_and_seed() {
        let a = Site::new("osaka").ok();
        let b = Site::new("hokkaido").ok();
        let (Some(a), Some(b)) = (a, b) else {
            panic!("valid site names rejected");
        };
        assert_ne!(link_seed(1, &a, &b), link_seed(1, &b, &a));
        assert_ne!(link_seed(1, &a, &b), link_seed(2, &a, &b));
        assert_eq!(link_seed(1, &a, &b), link_seed(1, &a, &b));
    }

    #[test]
    fn new_outside_runtime_fails() {
        assert!(matches!(
            Wan::new(WanConfig::default()),
            Err(WanError::NoRuntime)
        ));
    }

    #[tokio::test]
    async fn links_for_declared_sites() {
        let wan = Wan::new(WanConfig {
            profile: WanProfile::Sinet5,
            sites: vec!["osaka".into(), "hokkaido".into(), "fukuoka".into()],
            ..WanConfig::default()
        });
        let Ok(wan) = wan else {
            panic!("Wan::new failed");
        };
        assert_eq!(wan.links().len(), 6);
        let p = wan.params("osaka", "hokkaido");
        assert!(matches!(p, Ok(p) if p == WanProfile::Sinet5.params("osaka", "hokkaido")));
        assert!(matches!(
            wan.params("osaka", "tokyo"),
            Err(WanError::UnknownLink { .. })
        ));
        assert!(matches!(
            wan.params("osaka", "osaka"),
            Err(WanError::SameSite { .. })
        ));
        assert!(matches!(
            wan.params("Osaka", "hokkaido"),
            Err(WanError::Site(_))
        ));
        let bad = wan.update("osaka", "fukuoka", |p| p.bandwidth_bytes_per_sec = Some(0));
        assert!(matches!(bad, Err(WanError::Params(_))));
        wan.apply_profile(WanProfile::Lan);
        assert!(wan
            .links()
            .iter()
            .all(|l| l.params == LinkParams::default()));
        wan.shutdown().await;
    }

    #[tokio::test]
    async fn routes_are_idempotent_and_conflicts_are_errors() {
        let Ok(wan) = Wan::new(WanConfig::default()) else {
            panic!("Wan::new failed");
        };
        let target = SocketAddr::from(([127, 0, 0, 1], 9));
        let other = SocketAddr::from(([127, 0, 0, 1], 10));
        let first = wan.route("osaka", "fukuoka", target).await;
        let again = wan.route("osaka", "fukuoka", target).await;
        assert!(matches!((&first, &again), (Ok(a), Ok(b)) if a == b));
        // Routes create their sites and the links both ways.
        assert_eq!(wan.sites(), vec!["fukuoka", "osaka"]);
        assert_eq!(wan.links().len(), 2);
        let Ok(listen) = first else {
            panic!("route failed");
        };
        let same = wan.route_on(listen, "osaka", "fukuoka", target).await;
        assert!(matches!(same, Ok(a) if a == listen));
        let conflict = wan.route_on(listen, "osaka", "fukuoka", other).await;
        assert!(matches!(conflict, Err(WanError::RouteConflict { .. })));
        let busy = wan
            .route_on(listen, "fukuoka", "osaka", target)
            .await
            .map_err(|e| e.to_string());
        assert!(matches!(busy, Err(e) if e.contains("already routes")));
        assert!(matches!(
            wan.route("osaka", "osaka", target).await,
            Err(WanError::SameSite { .. })
        ));
        assert_eq!(wan.routes().len(), 1);
        let handle = wan.handle();
        wan.shutdown().await;
        assert!(matches!(
            handle.route("osaka", "fukuoka", target).await,
            Err(WanError::Shutdown)
        ));
    }
}
