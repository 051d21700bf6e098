//! A cluster of real `roamdisk-node` processes on loopback for integration tests, with
//! kill -9 and restart of individual nodes.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use roamdisk_admin_client::AdminClient;
use serde_json::Value;

pub struct NodeProc {
    pub id: u64,
    pub child: Option<Child>,
    pub admin: String,
    pub nbd: String,
    pub config: PathBuf,
    pub data_dir: PathBuf,
}

impl NodeProc {
    /// Writes the config of node `id` under `dir` (ports: peer, admin, NBD; `how`: the
    /// `initial_cluster` or `join` line).
    fn configure(dir: &std::path::Path, id: u64, site: &str, ports: &[u16], how: &str) -> NodeProc {
        let data_dir = dir.join(format!("node-{id}"));
        std::fs::create_dir_all(&data_dir).unwrap();
        let config = data_dir.join("node.toml");
        std::fs::write(
            &config,
            format!(
                "id = {id}\nsite = {site:?}\ndata_dir = {:?}\npeer_addr = \"127.0.0.1:{}\"\nadmin_addr = \"127.0.0.1:{}\"\nnbd_addr = \"127.0.0.1:{}\"\n{how}\n",
                data_dir.display().to_string(),
                ports[0],
                ports[1],
                ports[2],
            ),
        )
        .unwrap();
        NodeProc {
            id,
            child: None,
            admin: format!("127.0.0.1:{}", ports[1]),
            nbd: format!("127.0.0.1:{}", ports[2]),
            config,
            data_dir,
        }
    }
}

pub struct Cluster {
    pub nodes: Vec<NodeProc>,
    /// Environment of every node process (test faults, a negative control).
    pub env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

fn free_ports(n: usize) -> Vec<u16> {
    // Below the kernel's ephemeral range (32768..): a port the OS hands out for `:0` is
    // also the local port of any outgoing connection, so between choosing it and the node
    // binding it a peer dial from another test could take it. Below 20000 too, where the
    // playground tests and drills take theirs. Start at a random point so that concurrent
    // test processes spread out, and hold every listener until all are chosen so that
    // none repeats.
    use std::hash::{BuildHasher, RandomState};
    const LOW: u64 = 10_000;
    const SPAN: u64 = 10_000;
    let start = RandomState::new().hash_one(std::process::id()) % SPAN;
    let ls: Vec<std::net::TcpListener> = (0..SPAN)
        .map(|i| (LOW + (start + i) % SPAN) as u16)
        .filter_map(|p| std::net::TcpListener::bind(("127.0.0.1", p)).ok())
        .take(n)
        .collect();
    assert_eq!(ls.len(), n, "no {n} free ports in 10000..20000");
    ls.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

impl Cluster {
    /// Starts `n` nodes in one site and waits until they serve.
    pub fn start(n: usize) -> Cluster {
        Cluster::start_sites(&[("osaka", n)])
    }

    /// Starts nodes in several sites (`(site, nodes)`, ids numbered in order) and waits
    /// until they serve.
    pub fn start_sites(sites: &[(&str, usize)]) -> Cluster {
        Cluster::start_with_env(sites, &[])
    }

    /// As [`Cluster::start_sites`], every node with `env` added to its environment.
    pub fn start_with_env(sites: &[(&str, usize)], env: &[(&str, &str)]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let site_of: Vec<&str> = sites
            .iter()
            .flat_map(|(s, k)| std::iter::repeat_n(*s, *k))
            .collect();
        let n = site_of.len();
        let ports = free_ports(3 * n);
        let initial: Vec<String> = (0..n)
            .map(|i| format!("{}={}@127.0.0.1:{}", i + 1, site_of[i], ports[3 * i]))
            .collect();
        let mut nodes = Vec::new();
        for i in 0..n {
            let id = i as u64 + 1;
            let site = site_of[i];
            nodes.push(NodeProc::configure(
                dir.path(),
                id,
                site,
                &ports[3 * i..3 * i + 3],
                &format!("initial_cluster = {initial:?}"),
            ));
        }
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut c = Cluster {
            nodes,
            env,
            _dir: dir,
        };
        for id in 1..=n as u64 {
            c.spawn(id);
        }
        c.wait_until("every node registered and a metadata leader elected", |c| {
            let st = c.admin(1).status().ok()?;
            (st["meta_leader"].is_u64() && st["nodes"].as_u64() == Some(n as u64)).then_some(())
        });
        c
    }

    fn spawn(&mut self, id: u64) {
        if let Err(e) = self.try_spawn(id, &[]) {
            panic!("{e}");
        }
    }

    /// Starts node `id` with `extra` in its environment; the error names what it said if
    /// it did not start.
    pub fn try_spawn(&mut self, id: u64, extra: &[(&str, &str)]) -> Result<(), String> {
        let node = &mut self.nodes[id as usize - 1];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.data_dir.join("node.log"))
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_roamdisk-node"))
            .arg("--config")
            .arg(&node.config)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(extra.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn roamdisk-node");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if !line.contains("ready") {
            let status = child.wait().unwrap();
            let log = std::fs::read_to_string(node.data_dir.join("node.log")).unwrap_or_default();
            let said: Vec<&str> = log
                .lines()
                .filter(|l| {
                    l.starts_with("Error:") || l.contains("panicked at") || l.contains("ERROR")
                })
                .collect();
            return Err(format!(
                "node {id} did not start ({status}): {said:?} (see {}/node.log)",
                node.data_dir.display()
            ));
        }
        node.child = Some(child);
        Ok(())
    }

    /// Starts one more node, at `site`, that joins the running cluster through node 1's
    /// admin API (no `initial_cluster`); returns its id once it serves.
    pub fn join(&mut self, site: &str) -> u64 {
        let id = self.nodes.len() as u64 + 1;
        let join = format!("join = {:?}", self.nodes[0].admin);
        let node = NodeProc::configure(self._dir.path(), id, site, &free_ports(3), &join);
        self.nodes.push(node);
        self.spawn(id);
        id
    }

    pub fn admin(&self, id: u64) -> AdminClient {
        AdminClient::new(&self.nodes[id as usize - 1].admin)
    }

    pub fn uri(&self, id: u64, volume: &str) -> String {
        format!("nbd://{}/{volume}", self.nodes[id as usize - 1].nbd)
    }

    /// The first live node, for admin calls.
    pub fn any_live(&self) -> u64 {
        self.nodes
            .iter()
            .find(|n| n.child.is_some())
            .expect("a live node")
            .id
    }

    pub fn kill9(&mut self, id: u64) {
        let mut child = self.nodes[id as usize - 1]
            .child
            .take()
            .expect("node is running");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }

    /// Stops node `id` cleanly (SIGTERM: it syncs, checkpoints and exits 0).
    pub fn stop(&mut self, id: u64) {
        let mut child = self.nodes[id as usize - 1]
            .child
            .take()
            .expect("node is running");
        let pid = child.id().to_string();
        let ok = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM {pid}");
        let status = child.wait().unwrap();
        assert!(status.success(), "node {id} stopped with {status}");
    }

    pub fn restart(&mut self, id: u64) {
        assert!(self.nodes[id as usize - 1].child.is_none());
        self.spawn(id);
    }

    pub fn wait_until<T>(&self, what: &str, mut f: impl FnMut(&Cluster) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Creates a volume and waits until it has a leader; returns the leader's id.
    pub fn create_volume(&self, name: &str, size: u64, replicas: u32) -> u64 {
        self.admin(self.any_live())
            .create_volume(name, size, Some(replicas), None, None)
            .unwrap();
        self.leader(name)
    }

    pub fn leader(&self, name: &str) -> u64 {
        self.wait_until(&format!("volume {name} to have a live leader"), |c| {
            let v: Value = c.admin(c.any_live()).volume(name).ok()?;
            let l = v["leader"].as_u64()?;
            c.nodes[l as usize - 1].child.is_some().then_some(l)
        })
    }

    /// Group status of `volume` on node `id` (applied index etc.).
    pub fn group_status(&self, id: u64, volume_id: u64) -> Option<Value> {
        let st = self.admin(id).status().ok()?;
        st["groups"]
            .as_array()?
            .iter()
            .find(|g| g["group"].as_u64() == Some(volume_id))
            .cloned()
    }

    pub fn volume_path(&self, id: u64, volume_id: u64) -> PathBuf {
        self.nodes[id as usize - 1]
            .data_dir
            .join("volumes")
            .join(format!("{volume_id}.img"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The temp dir goes away with us: show what the nodes said.
            for n in &self.nodes {
                let log = std::fs::read_to_string(n.data_dir.join("node.log")).unwrap_or_default();
                // A failed start ends with a long backtrace: name the error first.
                for l in log
                    .lines()
                    .filter(|l| l.starts_with("Error:") || l.contains("panicked at"))
                {
                    eprintln!("node {}: {l}", n.id);
                }
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("--- node {} log (last 40 lines) ---", n.id);
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

pub fn tool(name: &str) -> Command {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "{name} is not installed: run .ci/run (it installs the test clients)"
    );
    Command::new(name)
}

pub fn run(cmd: &mut Command) -> String {
    let out: Output = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = tool("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    let out = run(&mut c);
    for bad in ["Pattern verification failed", "failed:", "error"] {
        assert!(!out.contains(bad), "qemu-io reported {bad:?}:\n{out}");
    }
    out
}

pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}
