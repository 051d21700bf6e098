//! `roamdisk playground`: a local cluster of real `roamdisk-node` processes on loopback.
//! One crate that the CLI, the chaos runner and the benchmarks all start clusters with.
//!
//! Layout: node ids 1..=N, site by site; node `i` listens for NBD on `base + i - 1`, for
//! admin on `base + 100 + i - 1` and for peers on `base + 200 + i - 1`. Each node keeps
//! its data in `DIR/node-<id>`; running again on the same DIR restarts the same cluster
//! with its volumes. When the cluster serves, `DIR/playground.json` describes it.
//!
//! Between sites, node-to-node traffic goes through the userspace WAN emulator
//! (`roamdisk-wan`, in this process): every node dials a node of another site through a
//! route of the emulator's link for that site pair (`peer_routes` in its config). The
//! links start with the `--wan` profile and are changed at run time through the
//! emulator's control API on `base + 300`; the routes listen on `base + 400..`. NBD and admin traffic is local to a site.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use roamdisk_admin_client::{format_size, AdminClient};

/// How long nodes may take to elect the metadata leader and register.
pub const CLUSTER_READY_TIMEOUT_SECS: u64 = 60;

#[derive(Clone, Debug)]
pub struct Options {
    pub dir: PathBuf,
    pub sites: Vec<String>,
    pub nodes_per_site: usize,
    pub volumes: Vec<(String, u64)>,
    pub base_port: u16,
    pub node_bin: PathBuf,
    /// WAN profile between sites.
    pub wan: roamdisk_wan::WanProfile,
    /// Extra environment for every node process (e.g. the chaos runner's negative
    /// control, `RUST_LOG`).
    pub node_env: Vec<(String, String)>,
}

/// The share of a WAN link's bandwidth a playground node may send on it (`link_caps`).
pub const LINK_CAP_SHARE: f64 = 0.95;

/// The WAN emulator of a playground.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PlaygroundWan {
    pub profile: String,
    /// HTTP control API (`GET /v1/links`, `PUT /v1/links/{from}/{to}`, ...).
    pub control: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PlaygroundNode {
    pub id: u64,
    pub pid: u32,
    pub admin: String,
    pub nbd: String,
    pub peer: String,
    pub data_dir: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PlaygroundSite {
    pub name: String,
    pub nodes: Vec<PlaygroundNode>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PlaygroundVolume {
    pub name: String,
    pub size: u64,
    pub uris: Vec<String>,
}

/// The contents of `DIR/playground.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub sites: Vec<PlaygroundSite>,
    pub volumes: Vec<PlaygroundVolume>,
    #[serde(default)]
    pub wan: Option<PlaygroundWan>,
}

impl Manifest {
    /// Bytes every node has sent on the wire to `site` (all lanes), from their
    /// `/metrics` (`roamdisk_link_wire_bytes_total`); a node that does not answer counts 0.
    pub fn wire_bytes_to(&self, site: &str) -> u64 {
        let label = format!("site=\"{site}\"");
        let mut total = 0.0;
        for n in self.nodes() {
            let Ok(text) = AdminClient::with_timeout(&n.admin, Duration::from_secs(5)).metrics()
            else {
                continue;
            };
            total += text
                .lines()
                .filter(|l| l.starts_with("roamdisk_link_wire_bytes_total") && l.contains(&label))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
        }
        total as u64
    }

    pub fn load(dir: &Path) -> Result<Manifest> {
        let p = dir.join("playground.json");
        serde_json::from_slice(&std::fs::read(&p).with_context(|| format!("read {}", p.display()))?)
            .context("parse playground.json")
    }

    pub fn nodes(&self) -> impl Iterator<Item = &PlaygroundNode> {
        self.sites.iter().flat_map(|s| s.nodes.iter())
    }
}

/// A running playground: its node processes, the WAN emulator, and what is needed to
/// kill and restart single nodes (the chaos runner does). Dropping it stops everything.
pub struct Cluster {
    manifest: Manifest,
    children: std::collections::BTreeMap<u64, Child>,
    /// Per node: its config file (a restart reuses it).
    configs: std::collections::BTreeMap<u64, PathBuf>,
    node_bin: PathBuf,
    node_env: Vec<(String, String)>,
    /// The WAN emulator and the runtime it runs on; dropped after the nodes stop.
    wan: Option<(tokio::runtime::Runtime, roamdisk_wan::Wan)>,
}

impl Cluster {
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The WAN emulator's control API address (`host:port`).
    pub fn wan_control(&self) -> Option<&str> {
        self.manifest.wan.as_ref().map(|w| w.control.as_str())
    }

    /// True while node `id`'s process runs.
    pub fn is_running(&mut self, id: u64) -> bool {
        self.children
            .get_mut(&id)
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Ids of nodes whose process exited although nobody stopped them.
    pub fn exited(&mut self) -> Vec<u64> {
        let ids: Vec<u64> = self.configs.keys().copied().collect();
        ids.into_iter().filter(|id| !self.is_running(*id)).collect()
    }

    /// kill -9 node `id` and reap it.
    pub fn kill(&mut self, id: u64) -> Result<()> {
        let mut c = self
            .children
            .remove(&id)
            .with_context(|| format!("node {id} is not running"))?;
        let _ = c.kill();
        let _ = c.wait();
        Ok(())
    }

    /// Starts node `id` again (after [`Cluster::kill`] or a crash) with its config and
    /// data, and waits until it listens.
    pub fn restart(&mut self, id: u64) -> Result<u32> {
        if self.is_running(id) {
            bail!("node {id} is running");
        }
        self.children.remove(&id);
        let config = self
            .configs
            .get(&id)
            .with_context(|| format!("no node {id}"))?
            .clone();
        let child = spawn_node(&self.node_bin, &config, &self.node_env, id)?;
        let pid = child.id();
        self.children.insert(id, child);
        for n in self
            .manifest
            .sites
            .iter_mut()
            .flat_map(|s| s.nodes.iter_mut())
        {
            if n.id == id {
                n.pid = pid;
            }
        }
        Ok(pid)
    }

    /// Stops every node (SIGTERM, then SIGKILL after 30 s) and the WAN emulator.
    pub fn stop(&mut self) {
        for c in self.children.values() {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for (id, c) in &mut self.children {
            loop {
                match c.try_wait() {
                    Ok(Some(status)) => {
                        eprintln!("node {id} stopped ({status})");
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        eprintln!("node {id} did not stop in time; killing it");
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
        self.children.clear();
        if let Some((rt, wan)) = self.wan.take() {
            rt.block_on(wan.shutdown());
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts one node process and waits for its "ready" line.
fn spawn_node(bin: &Path, config: &Path, env: &[(String, String)], id: u64) -> Result<Child> {
    let data_dir = config.parent().context("config has a directory")?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data_dir.join("node.log"))?;
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(config)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .with_context(|| format!("start {}", bin.display()))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    if !line.contains("ready") {
        let _ = child.kill();
        let _ = child.wait();
        bail!(
            "node {id} failed to start; see {}",
            data_dir.join("node.log").display()
        );
    }
    Ok(child)
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Starts the cluster, creates the volumes, writes the manifest, and runs until SIGINT
/// or SIGTERM; then stops every node cleanly.
pub fn run(opts: &Options) -> Result<()> {
    let mut running = start(opts)?;
    print_banner(running.manifest(), &opts.dir);
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    while !STOP.load(Ordering::SeqCst) {
        for (id, c) in &mut running.children {
            if let Ok(Some(status)) = c.try_wait() {
                eprintln!(
                    "warning: node {id} exited ({status}); see {}/node-{id}/node.log",
                    opts.dir.display()
                );
            }
        }
        running
            .children
            .retain(|_, c| matches!(c.try_wait(), Ok(None)));
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("stopping the playground...");
    running.stop();
    Ok(())
}

/// Starts the nodes and volumes and writes the manifest; the returned cluster stops the
/// nodes when dropped.
pub fn start(opts: &Options) -> Result<Cluster> {
    if opts.sites.is_empty() || opts.nodes_per_site == 0 {
        bail!("a playground needs at least one site and one node per site");
    }
    if !opts.node_bin.exists() {
        bail!(
            "{} not found: build it with `cargo build --release --bins`",
            opts.node_bin.display()
        );
    }
    std::fs::create_dir_all(&opts.dir).with_context(|| format!("create {}", opts.dir.display()))?;
    let dir = opts.dir.canonicalize()?;
    let port = |offset: u16, i: u64| -> Result<u16> {
        opts.base_port
            .checked_add(offset)
            .and_then(|p| p.checked_add(i as u16 - 1))
            .context("--base-port too high for this many nodes")
    };
    let mut layout = Vec::new();
    let mut id = 0u64;
    for site in &opts.sites {
        for _ in 0..opts.nodes_per_site {
            id += 1;
            layout.push((
                id,
                site.clone(),
                port(200, id)?,
                port(100, id)?,
                port(0, id)?,
            ));
        }
    }
    let initial: Vec<String> = layout
        .iter()
        .map(|(id, site, peer, _, _)| format!("{id}={site}@127.0.0.1:{peer}"))
        .collect();
    // The WAN: for every node and every other site, a route over that site pair's link.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("wan")
        .build()
        .context("start the WAN emulator's runtime")?;
    let wan = {
        let _in_runtime = rt.enter();
        roamdisk_wan::Wan::new(roamdisk_wan::WanConfig {
            profile: opts.wan,
            sites: opts.sites.clone(),
            ..Default::default()
        })
        .context("start the WAN emulator")?
    };
    // (from site, to node) -> route address
    let mut routes: std::collections::BTreeMap<(String, u64), String> = Default::default();
    let mut next_route = 0u64;
    for (id, site, peer, _, _) in &layout {
        for from in opts.sites.iter().filter(|s| *s != site) {
            let target: std::net::SocketAddr = format!("127.0.0.1:{peer}").parse()?;
            // Fixed ports (base + 400..), so that a route never takes a node's port.
            next_route += 1;
            let listen: std::net::SocketAddr =
                format!("127.0.0.1:{}", port(400, next_route)?).parse()?;
            let via = rt
                .block_on(wan.route_on(listen, from, site, target))
                .with_context(|| format!("WAN route {from} -> node {id} ({site})"))?;
            routes.insert((from.clone(), *id), via.to_string());
        }
    }
    let control_port = port(300, 1)?;
    let control_listener = rt
        .block_on(tokio::net::TcpListener::bind(("127.0.0.1", control_port)))
        .with_context(|| format!("listen for the WAN control API on port {control_port}"))?;
    let router = roamdisk_wan::control_router(&wan);
    rt.spawn(async move {
        let _ = axum::serve(control_listener, router).await;
    });
    let wan_info = PlaygroundWan {
        profile: opts.wan.name().to_owned(),
        control: format!("127.0.0.1:{control_port}"),
    };
    let mut running = Cluster {
        manifest: Manifest {
            sites: vec![],
            volumes: vec![],
            wan: None,
        },
        children: Default::default(),
        configs: Default::default(),
        node_bin: opts.node_bin.clone(),
        node_env: opts.node_env.clone(),
        wan: Some((rt, wan)),
    };
    let mut sites: Vec<PlaygroundSite> = opts
        .sites
        .iter()
        .map(|s| PlaygroundSite {
            name: s.clone(),
            nodes: vec![],
        })
        .collect();
    for (id, site, peer, admin, nbd) in &layout {
        let data_dir = dir.join(format!("node-{id}"));
        std::fs::create_dir_all(&data_dir)?;
        let mut config = format!(
            "id = {id}\nsite = {site:?}\ndata_dir = {:?}\npeer_addr = \"127.0.0.1:{peer}\"\nadmin_addr = \"127.0.0.1:{admin}\"\nnbd_addr = \"127.0.0.1:{nbd}\"\ninitial_cluster = {:?}\n\n[peer_routes]\n",
            data_dir.display().to_string(),
            initial
        );
        for ((from, to), via) in &routes {
            if from == site {
                config.push_str(&format!("\"{to}\" = {via:?}\n"));
            }
        }
        // Each node may use LINK_CAP_SHARE of a WAN link: the WAN's queue stays short,
        // so Raft's control lane never waits behind bulk inside the emulator either.
        config.push_str("\n[link_caps]\n");
        for other in opts.sites.iter().filter(|s| *s != site) {
            if let Some(bw) = opts.wan.params(site, other).bandwidth_bytes_per_sec {
                let cap = (bw as f64 * LINK_CAP_SHARE) as u64;
                config.push_str(&format!("{other:?} = \"{cap}\"\n"));
            }
        }
        let config_path = data_dir.join("node.toml");
        std::fs::write(&config_path, config)?;
        let child = spawn_node(&opts.node_bin, &config_path, &opts.node_env, *id)?;
        let pid = child.id();
        running.children.insert(*id, child);
        running.configs.insert(*id, config_path);
        let node = PlaygroundNode {
            id: *id,
            pid,
            admin: format!("127.0.0.1:{admin}"),
            nbd: format!("127.0.0.1:{nbd}"),
            peer: format!("127.0.0.1:{peer}"),
            data_dir,
        };
        sites
            .iter_mut()
            .find(|s| s.name == *site)
            .expect("site listed")
            .nodes
            .push(node);
    }
    let admin = AdminClient::new(&sites[0].nodes[0].admin);
    wait_for(
        CLUSTER_READY_TIMEOUT_SECS,
        "the cluster to elect a metadata leader and register every node",
        || {
            let st = admin.status().ok()?;
            (st["meta_leader"].is_u64() && st["nodes"].as_u64() == Some(layout.len() as u64))
                .then_some(())
        },
    )?;
    let replicas = opts.nodes_per_site.min(3) as u32;
    let mut volumes = Vec::new();
    for (name, size) in &opts.volumes {
        match admin.create_volume(name, *size, Some(replicas), Some(&opts.sites[0]), None) {
            Ok(_) => {}
            Err(e) if e.to_string().contains("already exists") => {}
            Err(e) => return Err(e.context(format!("create volume {name}"))),
        }
        let v = wait_for(
            CLUSTER_READY_TIMEOUT_SECS,
            &format!("volume {name} to elect a leader"),
            || {
                let v = admin.volume(name).ok()?;
                v["leader"].is_u64().then_some(v)
            },
        )?;
        let size = v["size"].as_u64().unwrap_or(*size);
        let uris = sites
            .iter()
            .flat_map(|s| s.nodes.iter())
            .map(|n| format!("nbd://{}/{name}", n.nbd))
            .collect();
        volumes.push(PlaygroundVolume {
            name: name.clone(),
            size,
            uris,
        });
    }
    let manifest = Manifest {
        sites,
        volumes,
        wan: Some(wan_info),
    };
    // Readers wait for the file to exist: it must appear whole (write, then rename).
    let tmp = dir.join("playground.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&manifest)?)?;
    std::fs::rename(&tmp, dir.join("playground.json"))?;
    running.manifest = manifest;
    Ok(running)
}

/// A `--base-port` for a playground of `nodes` nodes (in at most three sites) whose every
/// port binds now: NBD (base..), admin (base+100..), peers (base+200..), the WAN control
/// API (base+300) and WAN routes (base+400.., one per node and other site). `first`
/// separates callers that run at the same time (tests, drills). Ports stay below the
/// ephemeral range (32768..), where outgoing connections take theirs.
pub fn free_base_port(nodes: u16, first: u16) -> u16 {
    for base in (first..32000).step_by(997) {
        let ok = (0..nodes)
            .flat_map(|i| [i, 100 + i, 200 + i])
            .chain(300..301)
            .chain(400..400 + 2 * nodes)
            .all(|o| std::net::TcpListener::bind(("127.0.0.1", base + o)).is_ok());
        if ok {
            return base;
        }
    }
    panic!("no free port range below 32000");
}

fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {secs} s waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn print_banner(m: &Manifest, dir: &Path) {
    println!(
        "roamdisk playground is up ({} sites, {} nodes); manifest: {}/playground.json",
        m.sites.len(),
        m.nodes().count(),
        dir.display()
    );
    for s in &m.sites {
        for n in &s.nodes {
            println!(
                "  node {} (site {}): nbd://{}  admin http://{}  pid {}",
                n.id, s.name, n.nbd, n.admin, n.pid
            );
        }
    }
    for v in &m.volumes {
        println!("volume {} ({}):", v.name, format_size(v.size));
        for u in &v.uris {
            println!("  {u}");
        }
    }
    if let Some(v) = m.volumes.first() {
        let uri = &v.uris[0];
        println!("try:");
        println!("  qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' {uri}");
        println!("  qemu-img convert -n -f qcow2 -O raw disk.qcow2 {uri}");
        println!("  roamdisk --cluster {} status", m.sites[0].nodes[0].admin);
        if m.sites.len() > 1 {
            println!(
                "  roamdisk --cluster {} volume move {} --to {} --wait",
                m.sites[0].nodes[0].admin, v.name, m.sites[1].name
            );
        }
    }
    if let Some(w) = &m.wan {
        if m.sites.len() > 1 {
            println!(
                "WAN between sites: profile {}; links: curl http://{}/v1/links",
                w.profile, w.control
            );
            println!(
                "  partition: curl -X PUT -d '{{\"partition\":\"hold\"}}' -H 'content-type: application/json' http://{}/v1/links/{}/{}",
                w.control, m.sites[0].name, m.sites[1].name
            );
        }
    }
    println!("Ctrl-C stops every node.");
}
