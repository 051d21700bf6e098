//! A blocking client of the storage node's admin API (**API boundary**: the HTTP/JSON
//! routes of `storage-node/src/admin`), and size parsing and formatting. Used by the
//! `roamdisk` CLI, the playground, the chaos runner, the benchmarks and the node's own
//! integration tests.
//!
//! This crate must not link RocksDB: it talks to nodes over HTTP only.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use roamdisk_core::meta::{Durability, NodeInfo, OnNoSite};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// A blocking client of one node's admin API (any node answers for the cluster).
#[derive(Clone)]
pub struct AdminClient {
    base: String,
    agent: ureq::Agent,
    timeout: Duration,
}

impl AdminClient {
    /// `addr` is `host:port` of a node's admin API.
    pub fn new(addr: &str) -> AdminClient {
        AdminClient::with_timeout(addr, Duration::from_secs(60))
    }

    /// The admin address this client talks to.
    pub fn addr(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    /// A client whose every call gives up after `timeout` (the chaos runner uses short
    /// ones: a partitioned node must not stall it).
    pub fn with_timeout(addr: &str, timeout: Duration) -> AdminClient {
        let agent = ureq::AgentBuilder::new().timeout(timeout).build();
        AdminClient {
            base: format!("http://{addr}"),
            agent,
            timeout,
        }
    }

    fn call<T: DeserializeOwned>(&self, req: ureq::Request, body: Option<Value>) -> Result<T> {
        let url = req.url().to_owned();
        let resp = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match resp {
            Ok(r) => r
                .into_json::<T>()
                .with_context(|| format!("decode answer of {url}")),
            Err(ureq::Error::Status(code, r)) => {
                let v: Value = r.into_json().unwrap_or(Value::Null);
                let msg = v
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("no details");
                bail!("{msg} (HTTP {code})")
            }
            Err(e) => bail!("cannot reach {url}: {e}"),
        }
    }

    pub fn status(&self) -> Result<Value> {
        self.call(self.agent.get(&format!("{}/v1/status", self.base)), None)
    }

    pub fn nodes(&self) -> Result<Vec<NodeInfo>> {
        self.call(self.agent.get(&format!("{}/v1/nodes", self.base)), None)
    }

    /// Registers a node that joins the cluster after bootstrap (what `roamdisk-node
    /// --join` does); returns the nodes after it.
    pub fn add_node(&self, info: &NodeInfo) -> Result<Vec<NodeInfo>> {
        self.call(
            self.agent.post(&format!("{}/v1/nodes", self.base)),
            Some(serde_json::to_value(info)?),
        )
    }

    pub fn volumes(&self) -> Result<Vec<Value>> {
        self.call(self.agent.get(&format!("{}/v1/volumes", self.base)), None)
    }

    pub fn volume(&self, name: &str) -> Result<Value> {
        self.call(
            self.agent.get(&format!("{}/v1/volumes/{name}", self.base)),
            None,
        )
    }

    pub fn create_volume(
        &self,
        name: &str,
        size: u64,
        replicas: Option<u32>,
        home: Option<&str>,
        durability: Option<Durability>,
    ) -> Result<Value> {
        let body = serde_json::json!({ "name": name, "size": size, "replicas": replicas, "home": home, "durability": durability });
        self.call(
            self.agent.post(&format!("{}/v1/volumes", self.base)),
            Some(body),
        )
    }

    /// Creates consistency group `name` holding new volumes `volumes` (name, size) in one
    /// Raft group.
    pub fn create_group(
        &self,
        name: &str,
        volumes: &[(String, u64)],
        replicas: Option<u32>,
        home: Option<&str>,
        durability: Option<Durability>,
        on_no_site: Option<OnNoSite>,
    ) -> Result<Value> {
        let vols: Vec<Value> = volumes
            .iter()
            .map(|(n, s)| serde_json::json!({"name": n, "size": s}))
            .collect();
        let body = serde_json::json!({ "name": name, "volumes": vols, "replicas": replicas,
            "home": home, "durability": durability, "on_no_site": on_no_site });
        self.call(
            self.agent.post(&format!("{}/v1/groups", self.base)),
            Some(body),
        )
    }

    /// Adds a new volume of `size` bytes to consistency group `group`; returns the group.
    pub fn add_to_group(&self, group: &str, name: &str, size: u64) -> Result<Value> {
        self.call(
            self.agent.post(&format!("{}/v1/volumes", self.base)),
            Some(serde_json::json!({ "name": name, "size": size, "group": group })),
        )
    }

    /// A consistency group (a member's name answers for its group).
    pub fn group(&self, name: &str) -> Result<Value> {
        self.call(
            self.agent.get(&format!("{}/v1/groups/{name}", self.base)),
            None,
        )
    }

    /// Sets what a site-durable volume does while no other site answers.
    pub fn set_policy(&self, name: &str, on_no_site: OnNoSite) -> Result<Value> {
        self.call(
            self.agent
                .post(&format!("{}/v1/volumes/{name}/policy", self.base)),
            Some(serde_json::json!({ "on_no_site": on_no_site })),
        )
    }

    pub fn resize_volume(&self, name: &str, size: u64) -> Result<Value> {
        self.call(
            self.agent
                .post(&format!("{}/v1/volumes/{name}/resize", self.base)),
            Some(serde_json::json!({ "size": size })),
        )
    }

    /// Starts moving a volume's home to `site` (returns at once; the volume's `moving`
    /// and `move_progress` fields show the move until it is done).
    pub fn move_volume(&self, name: &str, site: &str) -> Result<Value> {
        self.call(
            self.agent
                .post(&format!("{}/v1/volumes/{name}/move", self.base)),
            Some(serde_json::json!({ "to": site })),
        )
    }

    /// Compares every replica of the volume by digest at one index (long: the call waits
    /// for the whole run; `verify_progress` from another client shows how far it is);
    /// with `repair`, the replicas that differ copy the differing blocks from the leader.
    pub fn verify_volume(&self, name: &str, repair: bool) -> Result<Value> {
        self.call(
            self.agent
                .post(&format!("{}/v1/volumes/{name}/verify", self.base)),
            Some(serde_json::json!({ "repair": repair })),
        )
    }

    /// The progress of the verify running on this node.
    pub fn verify_progress(&self, name: &str) -> Result<Value> {
        self.call(
            self.agent
                .get(&format!("{}/v1/volumes/{name}/verify", self.base)),
            None,
        )
    }

    /// Asks the volume's leader (found through this node) to hand leadership to voter
    /// `to`. The answer comes once Raft has the request; `leader` in a later `volume`
    /// call shows whether it happened.
    pub fn transfer_leader(&self, name: &str, to: u64) -> Result<Value> {
        let v = self.volume(name)?;
        let leader = v["leader"]
            .as_u64()
            .with_context(|| format!("volume {name} has no leader right now"))?;
        let node = self
            .nodes()?
            .into_iter()
            .find(|n| n.id.0 == leader)
            .with_context(|| format!("leader node {leader} is not in the node list"))?;
        let at = AdminClient::with_timeout(&node.admin_addr, self.timeout);
        at.call(
            at.agent
                .post(&format!("{}/v1/volumes/{name}/transfer-leader", at.base)),
            Some(serde_json::json!({ "to": to })),
        )
    }

    /// A read-only failover plan to `to` for `volumes` (none: every volume whose home
    /// site does not answer).
    pub fn failover_plan(&self, to: &str, volumes: &[String]) -> Result<Value> {
        self.call(
            self.agent.post(&format!("{}/v1/failover/plan", self.base)),
            Some(serde_json::json!({ "to": to, "volumes": volumes })),
        )
    }

    /// Executes a plan made on this same node.
    pub fn failover_execute(&self, plan: &str, accept_data_loss: bool) -> Result<Value> {
        self.call(
            self.agent
                .post(&format!("{}/v1/failover/execute", self.base)),
            Some(serde_json::json!({ "plan": plan, "accept_data_loss": accept_data_loss })),
        )
    }

    /// What the replicas a failover fenced hold beyond the divergence point.
    pub fn divergent(&self, name: &str) -> Result<Value> {
        self.call(
            self.agent
                .get(&format!("{}/v1/volumes/{name}/divergent", self.base)),
            None,
        )
    }

    /// Writes the fenced replica of `name` held by the node at this address (as a raw
    /// image, holes kept sparse) to `out`; returns the bytes of data written.
    pub fn divergent_image(&self, name: &str, out: &std::path::Path) -> Result<u64> {
        use std::io::{Read, Seek, SeekFrom, Write};
        let r = self
            .agent
            .get(&format!("{}/v1/volumes/{name}/divergent/image", self.base))
            .timeout(Duration::from_secs(3600))
            .call();
        let r = match r {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                let v: Value = r.into_json().unwrap_or(Value::Null);
                bail!(
                    "{code}: {}",
                    v.get("error")
                        .and_then(Value::as_str)
                        .unwrap_or("no details")
                );
            }
            Err(e) => return Err(e).context("fetch the divergent image"),
        };
        let size: u64 = r
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .context("the image's length")?;
        let mut f =
            std::fs::File::create(out).with_context(|| format!("create {}", out.display()))?;
        let mut rd = r.into_reader();
        let mut buf = vec![0u8; 1 << 20];
        let mut data = 0u64;
        loop {
            let n = rd.read(&mut buf)?;
            if n == 0 {
                break;
            }
            // 4 KiB blocks of zeros become holes.
            for chunk in buf[..n].chunks(4096) {
                if chunk.iter().all(|b| *b == 0) {
                    f.seek(SeekFrom::Current(chunk.len() as i64))?;
                } else {
                    f.write_all(chunk)?;
                    data += chunk.len() as u64;
                }
            }
        }
        f.set_len(size)?;
        f.sync_all()?;
        Ok(data)
    }

    /// Gives up the writes the fenced replicas of `name` (the one on `node` only, if
    /// given) hold: they resync from the volume's current home and become learners.
    pub fn discard_divergent(&self, name: &str, node: Option<u64>) -> Result<Value> {
        self.call(
            self.agent.post(&format!(
                "{}/v1/volumes/{name}/discard-divergent",
                self.base
            )),
            Some(serde_json::json!({ "node": node })),
        )
    }

    pub fn delete_volume(&self, name: &str) -> Result<Value> {
        self.call(
            self.agent
                .delete(&format!("{}/v1/volumes/{name}", self.base)),
            None,
        )
    }

    pub fn metrics(&self) -> Result<String> {
        let r = self
            .agent
            .get(&format!("{}/metrics", self.base))
            .call()
            .context("fetch /metrics")?;
        Ok(r.into_string()?)
    }
}

/// Parses `4096`, `64K`, `512M`, `10G`, `1T` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected a number with optional K/M/G/T"))?;
    let shift = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("invalid size unit in {s:?}: use K, M, G or T")),
    };
    n.checked_mul(1u64 << shift)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("size {s:?} is zero or too large"))
}

/// `1073741824` → `1 GiB`.
pub fn format_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("1X").is_err());
        assert_eq!(format_size(1 << 30), "1 GiB");
        assert_eq!(format_size(1536), "1.5 KiB");
    }
}
