//! `roamdisk-node`: the storage node daemon.
//!
//! ```text
//! roamdisk-node --config node.toml
//! roamdisk-node --id 1 --site osaka --data-dir /var/lib/roamdisk \
//!     --peer 127.0.0.1:7001 --admin 127.0.0.1:8001 --nbd 127.0.0.1:10809 \
//!     --initial-cluster 1=osaka@127.0.0.1:7001,2=osaka@127.0.0.1:7002,3=osaka@127.0.0.1:7003
//! roamdisk-node --id 4 --site hokkaido --data-dir /var/lib/roamdisk \
//!     --peer 127.0.0.1:7004 --admin 127.0.0.1:8004 --nbd 127.0.0.1:10812 \
//!     --join 127.0.0.1:8001
//! ```
//! Prints one line `roamdisk-node <id> ready ...` on stdout once every listener is bound.
//! SIGTERM or Ctrl-C: stop accepting, finish in-flight NBD requests, checkpoint, exit 0.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use roamdisk_core::group::GroupConfig;
use roamdisk_core::ids::NodeId;
use roamdisk_core::logstore::LogStore;
use roamdisk_core::meta::{MetaCommand, NodeInfo};
use roamdisk_storage_node::config::NodeConfig;
use roamdisk_storage_node::nbd::NodeCatalog;
use roamdisk_storage_node::node::{Node, PeerHandler};
use roamdisk_storage_node::rocks::faults::{TEST_FAULTS_ENV, TEST_POWER_LOSS_ENV};
use roamdisk_storage_node::rocks::{RocksLogStore, TestFaults};
use roamdisk_storage_node::store::{Event, Store, StoreConfig, EVENT_QUEUE_MAX};
use roamdisk_storage_node::transport::{ArcOutbox, Transport};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(name = "roamdisk-node", version, about = "roamdisk storage node")]
struct Args {
    /// TOML configuration file; flags override its values.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    id: Option<u64>,
    #[arg(long)]
    site: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Address for Raft and forwarding between nodes.
    #[arg(long)]
    peer: Option<String>,
    /// Address of the HTTP admin API.
    #[arg(long)]
    admin: Option<String>,
    /// Address of the NBD exports.
    #[arg(long)]
    nbd: Option<String>,
    /// Comma-separated id=site@peer_addr of the members that bootstrap the cluster.
    #[arg(long, value_delimiter = ',')]
    initial_cluster: Option<Vec<String>>,
    /// Admin address of a member of a running cluster to join (a new data dir only).
    #[arg(long)]
    join: Option<String>,
}

fn config(args: Args) -> Result<NodeConfig> {
    let mut cfg = match &args.config {
        Some(p) => NodeConfig::load(p)?,
        None => NodeConfig {
            id: 0,
            site: String::new(),
            data_dir: PathBuf::new(),
            peer_addr: String::new(),
            admin_addr: String::new(),
            nbd_addr: String::new(),
            initial_cluster: vec![],
            join: None,
            peer_routes: Default::default(),
            link_caps: Default::default(),
            verify_interval_secs: 86_400,
            lease_ms: roamdisk_core::node::LEASE.as_millis() as u64,
        },
    };
    if let Some(v) = args.id {
        cfg.id = v;
    }
    if let Some(v) = args.site {
        cfg.site = v;
    }
    if let Some(v) = args.data_dir {
        cfg.data_dir = v;
    }
    if let Some(v) = args.peer {
        cfg.peer_addr = v;
    }
    if let Some(v) = args.admin {
        cfg.admin_addr = v;
    }
    if let Some(v) = args.nbd {
        cfg.nbd_addr = v;
    }
    if let Some(v) = args.initial_cluster {
        cfg.initial_cluster = v;
    }
    if let Some(v) = args.join {
        cfg.join = Some(v);
    }
    if cfg.data_dir.as_os_str().is_empty() {
        anyhow::bail!("--data-dir (or data_dir in the config file) is required");
    }
    cfg.validate()?;
    Ok(cfg)
}

/// How long a stopping node lets NBD connections finish their in-flight requests.
const NBD_DRAIN_SECS: u64 = 30;
/// The same after the store failed: nothing can finish, so clients are not kept waiting.
const NBD_DRAIN_AFTER_FAILURE_SECS: u64 = 2;
/// How long a stopping node waits for admin connections to close.
const ADMIN_DRAIN_SECS: u64 = 5;

fn main() -> Result<()> {
    let cfg = config(Args::parse())?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("create data dir {}", cfg.data_dir.display()))?;
    let me = NodeId(cfg.id);
    let members = cfg.members()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start tokio runtime")?;

    let (test_faults, core_bug) = test_faults(&cfg.data_dir)?;
    let log = Arc::new(
        RocksLogStore::open_with(&cfg.data_dir.join("raft"), test_faults)
            .context("open raft store")?,
    );
    let (events_tx, events_rx) = flume::bounded(EVENT_QUEUE_MAX);
    let shutdown = CancellationToken::new();
    let transport = Transport::new(
        me,
        cfg.site.clone(),
        cfg.link_caps()?,
        events_tx.clone(),
        rt.handle().clone(),
        shutdown.clone(),
    );
    for m in &members {
        transport.set_peer(m.id, &m.site, cfg.dial_addr(m.id, &m.peer_addr));
    }
    // A new node joining a running cluster learns the members from the node it joins
    // through; once the metadata leader adds it, it follows the metadata like the others.
    let joining = match &cfg.join {
        Some(addr) if log.state(roamdisk_core::ids::META_GROUP)?.is_none() => {
            let nodes = join_members(addr)?;
            for n in &nodes {
                transport.set_peer(n.id, &n.site, cfg.dial_addr(n.id, &n.peer_addr));
            }
            info!(via = %addr, members = nodes.len(), "joining a running cluster");
            Some(addr.clone())
        }
        _ => None,
    };
    let digests = roamdisk_storage_node::verify::Digests::default();
    let store_cfg = StoreConfig {
        me,
        data_dir: cfg.data_dir.clone(),
        group: GroupConfig::default(),
        initial_meta_voters: members.iter().map(|m| m.id).collect(),
        content: transport.content_index(),
        joining: joining.is_some(),
        rebooted: roamdisk_storage_node::store::restart_kind(&cfg.data_dir)
            .context("read and record the boot id")?,
        digests: Arc::clone(&digests),
        core_bug,
        lease: (cfg.lease_ms > 0).then(|| std::time::Duration::from_millis(cfg.lease_ms)),
    };
    if store_cfg.rebooted {
        warn!(
            "the machine rebooted since this node last ran, without a clean shutdown: \
               its Raft groups start quarantined (no votes until a leader is heard)"
        );
    }
    let (store, cluster_view, leaders) =
        Store::open(store_cfg, log, Arc::new(ArcOutbox(Arc::clone(&transport))))?;
    let recovering = store.recovering_view();
    let store_stats = store.stats();
    // Set when the store stops on its own (a failed disk): the node then stops too.
    let store_failed = CancellationToken::new();
    let store_thread = {
        let store_failed = store_failed.clone();
        std::thread::Builder::new()
            .name("raft-store".into())
            .spawn(move || {
                let r = store.run(events_rx);
                if r.is_err() {
                    store_failed.cancel();
                }
                r
            })?
    };

    let result = rt.block_on(async {
        let node = Node::new(
            me,
            cfg.site.clone(),
            events_tx.clone(),
            Arc::clone(&transport),
            cluster_view.clone(),
            leaders,
            cfg.data_dir.join("volumes"),
            store_stats,
            digests,
        );
        transport.set_handler(Arc::new(PeerHandler(Arc::clone(&node))));
        let peer_listener = tokio::net::TcpListener::bind(&cfg.peer_addr)
            .await
            .with_context(|| format!("listen for peers on {}", cfg.peer_addr))?;
        let admin_listener = tokio::net::TcpListener::bind(&cfg.admin_addr)
            .await
            .with_context(|| format!("listen for admin on {}", cfg.admin_addr))?;
        let nbd_listener = tokio::net::TcpListener::bind(&cfg.nbd_addr)
            .await
            .with_context(|| format!("listen for NBD on {}", cfg.nbd_addr))?;

        tokio::spawn(Arc::clone(&transport).serve(peer_listener));
        if let Some(addr) = joining.clone() {
            let info = NodeInfo {
                id: me,
                site: cfg.site.clone(),
                peer_addr: cfg.peer_addr.clone(),
                admin_addr: cfg.admin_addr.clone(),
                nbd_addr: cfg.nbd_addr.clone(),
            };
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    let (a, i) = (addr.clone(), info.clone());
                    match tokio::task::spawn_blocking(move || join_register(&a, &i)).await {
                        Ok(Ok(())) => {
                            info!(via = %addr, "registered with the cluster");
                            return;
                        }
                        Ok(Err(e)) => warn!(via = %addr, error = %e, "join: register; retrying"),
                        Err(e) => warn!(error = %e, "join task failed; retrying"),
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            });
        }
        tokio::spawn(keep_registered(
            Arc::clone(&node),
            NodeInfo {
                id: me,
                site: cfg.site.clone(),
                peer_addr: cfg.peer_addr.clone(),
                admin_addr: cfg.admin_addr.clone(),
                nbd_addr: cfg.nbd_addr.clone(),
            },
            cfg.clone(),
            shutdown.clone(),
        ));
        let admin = {
            let shutdown = shutdown.clone();
            let router = roamdisk_storage_node::admin::router(Arc::clone(&node));
            tokio::spawn(async move {
                axum::serve(admin_listener, router)
                    .with_graceful_shutdown(async move { shutdown.cancelled().await })
                    .await
            })
        };
        tokio::spawn(catch_up_loop(
            Arc::clone(&node),
            recovering,
            shutdown.clone(),
        ));
        tokio::spawn(roamdisk_storage_node::mover::run(
            Arc::clone(&node),
            shutdown.clone(),
        ));
        if cfg.verify_interval_secs > 0 {
            tokio::spawn(verify_loop(
                Arc::clone(&node),
                Duration::from_secs(cfg.verify_interval_secs),
                shutdown.clone(),
            ));
        }
        {
            // Every change of the metadata: dial the nodes it lists (a registration that
            // is still retrying must not hold this up), and close deleted volumes' files.
            let node = Arc::clone(&node);
            let transport = Arc::clone(&transport);
            let cfg = cfg.clone();
            let mut view = node.cluster_view();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    for n in node.cluster().nodes.values() {
                        transport.set_peer(n.id, &n.site, cfg.dial_addr(n.id, &n.peer_addr));
                    }
                    node.prune_read_handles();
                    tokio::select! {
                        r = view.changed() => if r.is_err() { return },
                        _ = shutdown.cancelled() => return,
                    }
                }
            });
        }
        let nbd_server = roamdisk_nbd::Server::new(
            Arc::new(NodeCatalog {
                node: Arc::clone(&node),
            }),
            shutdown.clone(),
        );
        let nbd = tokio::spawn(async move { nbd_server.serve_tcp(nbd_listener).await });

        println!(
            "roamdisk-node {} ready: site={} peer={} admin={} nbd={}",
            cfg.id, cfg.site, cfg.peer_addr, cfg.admin_addr, cfg.nbd_addr
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            _ = store_failed.cancelled() => {
                error!("the raft store failed: stopping this node (restart it once the cause is fixed)");
            }
        }
        info!("shutting down");
        shutdown.cancel();
        // NBD connections finish their in-flight requests before the store stops; with
        // the store gone there is nothing to finish, so do not keep clients waiting.
        let nbd_wait = if store_failed.is_cancelled() {
            NBD_DRAIN_AFTER_FAILURE_SECS
        } else {
            NBD_DRAIN_SECS
        };
        if tokio::time::timeout(Duration::from_secs(nbd_wait), nbd)
            .await
            .is_err()
        {
            warn!("NBD connections did not finish within {nbd_wait} s");
        }
        // Idle keep-alive admin connections would hold a graceful shutdown forever (a
        // node that failed then never exited and was never restarted: chaos soak,
        // mixed seed 7).
        if tokio::time::timeout(Duration::from_secs(ADMIN_DRAIN_SECS), admin)
            .await
            .is_err()
        {
            warn!("admin connections did not close within {ADMIN_DRAIN_SECS} s");
        }
        anyhow::Ok(())
    });
    let _ = events_tx.send(Event::Shutdown);
    drop(events_tx);
    let stored = store_thread
        .join()
        .map_err(|_| anyhow::anyhow!("raft store thread panicked"))?;
    rt.shutdown_timeout(Duration::from_secs(1));
    result?;
    // A non-zero exit, so that a supervisor restarts the node once the disk is fixed.
    stored.map_err(|e| anyhow::anyhow!("raft store failed: {e}"))
}

/// Keeps this node's entry in the cluster metadata current and the transport's address
/// book in step with the metadata.
/// How long one join request to the member's admin API may take.
const JOIN_HTTP_TIMEOUT_SECS: u64 = 10;

/// The cluster's nodes, as the member at `admin_addr` lists them.
fn join_members(admin_addr: &str) -> Result<Vec<NodeInfo>> {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(JOIN_HTTP_TIMEOUT_SECS))
        .build();
    let nodes: Vec<NodeInfo> = agent
        .get(&format!("http://{admin_addr}/v1/nodes"))
        .call()
        .with_context(|| format!("join: list the nodes of the cluster at {admin_addr}"))?
        .into_json()
        .context("join: the member's node list does not parse")?;
    anyhow::ensure!(!nodes.is_empty(), "join: {admin_addr} lists no nodes");
    Ok(nodes)
}

/// Asks the member at `admin_addr` to add this node to the cluster's metadata.
fn join_register(admin_addr: &str, me: &NodeInfo) -> Result<()> {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(JOIN_HTTP_TIMEOUT_SECS))
        .build();
    match agent
        .post(&format!("http://{admin_addr}/v1/nodes"))
        .send_json(me)
    {
        Ok(_) => Ok(()),
        Err(ureq::Error::Status(code, resp)) => {
            let body = resp.into_string().unwrap_or_default();
            anyhow::bail!("{admin_addr} answered {code}: {body}")
        }
        Err(e) => Err(e).with_context(|| format!("join: reach {admin_addr}")),
    }
}

/// Registers this node in the cluster metadata, again whenever the metadata lacks it or
/// holds other addresses for it. (Peers are dialled by the task that follows the
/// metadata.)
async fn keep_registered(
    node: Arc<Node>,
    me: NodeInfo,
    cfg: NodeConfig,
    shutdown: CancellationToken,
) {
    let mut view = node.cluster_view();
    loop {
        let cluster = node.cluster();
        // A node without `initial_cluster` (one that joined) knows no one to ask until
        // the metadata reaches it; it registered through the member it joined.
        let waiting_for_metadata = cfg.initial_cluster.is_empty() && cluster.nodes.is_empty();
        if cluster.nodes.get(&me.id) != Some(&me) && !waiting_for_metadata {
            match node.meta(MetaCommand::AddNode(me.clone())).await {
                Ok(_) => info!(node = %me.id, site = %me.site, "registered in cluster metadata"),
                Err(e) => warn!(error = %e, "register in cluster metadata; retrying"),
            }
            // The entry may have applied on the leader before it applies here.
            tokio::select! {
                _ = view.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.cancelled() => return,
            }
            continue;
        }
        tokio::select! {
            r = view.changed() => if r.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Verifies the volumes whose group this node leads every `every` (without repair: a
/// difference is an ERROR for a person to look at, and the `verify_differing_blocks`
/// counter on `/metrics` is what to alert on).
async fn verify_loop(node: Arc<Node>, every: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
        let cluster = node.cluster();
        for v in cluster.volumes.values() {
            if node.leader_of(v.id.group()) != Some(node.me) {
                continue;
            }
            let Ok(_running) = node.verify_running.try_lock() else {
                continue;
            };
            match roamdisk_storage_node::verify::run(&node, v, false, &node.verify_progress).await {
                Ok(r) if r.differing_blocks > 0 => error!(volume = %v.name,
                    blocks = r.differing_blocks, "scheduled verify: replicas of the volume differ"),
                Ok(r) => {
                    info!(volume = %v.name, blocks = r.blocks, "scheduled verify: replicas agree")
                }
                Err(e) => warn!(volume = %v.name, error = %e, "scheduled verify did not finish"),
            }
        }
    }
}

/// Runs one block catch-up per replica the store reports as recovering, for its current
/// recovery point. A copy whose point changes stops by itself (see `Node::catch_up`);
/// the copy for the new point starts only once it has ended.
async fn catch_up_loop(
    node: Arc<Node>,
    mut recovering: roamdisk_storage_node::store::RecoveringView,
    shutdown: CancellationToken,
) {
    use roamdisk_core::ids::{GroupId, LogIndex};
    let running: Arc<std::sync::Mutex<std::collections::BTreeSet<GroupId>>> = Arc::default();
    loop {
        let points: Vec<(GroupId, LogIndex)> = recovering.borrow_and_update().clone();
        for (g, from) in points {
            if !running.lock().expect("catch-up set").insert(g) {
                continue;
            }
            let node = Arc::clone(&node);
            let running = Arc::clone(&running);
            let view = recovering.clone();
            tokio::spawn(async move {
                let volume = roamdisk_core::ids::VolumeId(g.0);
                info!(%volume, from = from.0, "catching up replica by block copy");
                let current = || view.borrow().iter().any(|&(h, p)| h == g && p == from);
                match node.catch_up(volume, from, current).await {
                    Ok(()) => {
                        // Stay listed as running until the store took the copy (its point
                        // leaves the view, or changes: the core refuses a copy made for
                        // another point): a second copy for the same point could write a
                        // block after the replay had applied a newer entry to it. So no
                        // timeout here; the store drops the view when it stops.
                        let mut view = view.clone();
                        while current() {
                            tokio::select! {
                                r = view.changed() => if r.is_err() { break },
                                _ = tokio::time::sleep(Duration::from_secs(30)) => {
                                    warn!(%volume, from = from.0,
                                        "block copy done 30 s ago; still waiting for the \
                                         store to take it")
                                }
                            }
                        }
                    }
                    Err(e @ roamdisk_storage_node::node::NodeError::Superseded { .. }) => {
                        info!(%volume, "{e}; copying again")
                    }
                    Err(e) => {
                        warn!(%volume, error = %e, "catch-up failed; will retry");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                running.lock().expect("catch-up set").remove(&g);
            });
        }
        tokio::select! {
            r = recovering.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Test faults from the environment: the emulated page cache of the log store
/// (`ROAMDISK_TEST_FAULTS=1`, `ROAMDISK_TEST_POWER_LOSS=1`; see `rocks::faults`) and a
/// deliberately broken core rule for a negative control (`ROAMDISK_CORE_BUG=NAME`),
/// which is refused unless test faults are on.
fn test_faults(
    data_dir: &std::path::Path,
) -> anyhow::Result<(Option<TestFaults>, Option<roamdisk_core::node::CoreBug>)> {
    let on = |name: &str| std::env::var(name).is_ok_and(|v| v == "1");
    let faults = on(TEST_FAULTS_ENV).then(|| TestFaults {
        dir: data_dir.to_owned(),
        power_loss: on(TEST_POWER_LOSS_ENV),
    });
    let bug = match std::env::var("ROAMDISK_CORE_BUG") {
        Ok(name) => {
            anyhow::ensure!(
                faults.is_some(),
                "ROAMDISK_CORE_BUG is a test's negative control: it needs {TEST_FAULTS_ENV}=1"
            );
            let bug = roamdisk_core::node::CoreBug::named(&name)
                .with_context(|| format!("ROAMDISK_CORE_BUG: no core bug named {name:?}"))?;
            warn!(
                bug = name,
                "running with a deliberately broken core rule (negative control)"
            );
            Some(bug)
        }
        Err(_) => None,
    };
    if faults.is_some() {
        warn!("test faults on: the log store emulates failed fsyncs and power losses");
    }
    Ok((faults, bug))
}
