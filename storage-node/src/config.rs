//! Node configuration: a TOML file, overridden by command-line flags.
//!
//! ```toml
//! id = 1
//! site = "osaka"
//! data_dir = "/var/lib/roamdisk"
//! peer_addr = "10.0.0.1:7001"     # Raft and forwarding between nodes
//! admin_addr = "10.0.0.1:8001"    # HTTP admin API and /metrics
//! nbd_addr = "10.0.0.1:10809"     # NBD exports of every volume
//! # Members that bootstrap the metadata group together (id=site@peer_addr).
//! initial_cluster = ["1=osaka@10.0.0.1:7001", "2=osaka@10.0.0.2:7001", "3=osaka@10.0.0.3:7001"]
//! # Or, for a node added to a running cluster: the admin address of any member. Used
//! # once, when the data dir is new; the node then follows the cluster's metadata.
//! # join = "10.0.0.1:8001"
//! # Optional: dial these addresses instead of a node's registered peer address (a WAN
//! # link, an emulator's proxy, a site gateway), by node id.
//! [peer_routes]
//! "4" = "127.0.0.1:17004"
//! # Optional: bytes per second this node may send to each remote site on the log and
//! # bulk lanes (see `link`); set it a little below the WAN's bandwidth (this node's share).
//! [link_caps]
//! hokkaido = "45MiB"
//! ```
//!
//! Optional: `verify_interval_secs = 86400` (the default): how often the node verifies
//! the volumes whose group it leads (`volume verify` without repair; 0 turns it off).
//!
//! Optional: `lease_ms = 4000` (the default): the node's lease from the metadata quorum.
//! A node answers volume requests only while it holds it, so a site cut off from the
//! metadata majority suspends its writes this long after it lost touch, and a forced
//! failover waits this long (plus 500 ms for clock drift) before the new home answers.
//! It must be the same on every node. 0 turns fencing off (writes never wait for the
//! metadata quorum; a failover is then only safe once the old home is known dead).
//! An unknown key is an error that names it.

use std::path::PathBuf;

use anyhow::{bail, Context};
use roamdisk_core::ids::NodeId;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub id: u64,
    pub site: String,
    pub data_dir: PathBuf,
    pub peer_addr: String,
    pub admin_addr: String,
    pub nbd_addr: String,
    #[serde(default)]
    pub initial_cluster: Vec<String>,
    /// Admin address of a running member, for a node joining after bootstrap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join: Option<String>,
    /// Node id → address to dial instead of that node's registered `peer_addr`.
    #[serde(default)]
    pub peer_routes: std::collections::BTreeMap<String, String>,
    /// Remote site → rate (`45MiB`, `400Mbit`) allowed on the log and bulk lanes to it.
    #[serde(default)]
    pub link_caps: std::collections::BTreeMap<String, String>,
    /// Seconds between verifies of the volumes this node leads (0: never).
    #[serde(default = "default_verify_interval_secs")]
    pub verify_interval_secs: u64,
    /// The node's lease from the metadata quorum, in ms (0: off).
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
}

fn default_verify_interval_secs() -> u64 {
    86_400
}

fn default_lease_ms() -> u64 {
    roamdisk_core::node::LEASE.as_millis() as u64
}

/// Shortest lease: renewals go every quarter of it, and a metadata election takes about
/// a second.
pub const LEASE_MS_MIN: u64 = 2_000;

impl NodeConfig {
    /// The address to dial for node `id` whose registered peer address is `registered`.
    pub fn dial_addr(&self, id: NodeId, registered: &str) -> String {
        self.peer_routes
            .get(&id.0.to_string())
            .cloned()
            .unwrap_or_else(|| registered.to_owned())
    }
}

/// One `id=site@peer_addr` entry of `initial_cluster`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: NodeId,
    pub site: String,
    pub peer_addr: String,
}

impl Member {
    pub fn parse(s: &str) -> anyhow::Result<Member> {
        let (id, rest) = s
            .split_once('=')
            .with_context(|| format!("initial cluster member {s:?}: expected id=site@host:port"))?;
        let (site, addr) = rest
            .split_once('@')
            .with_context(|| format!("initial cluster member {s:?}: expected id=site@host:port"))?;
        let id: u64 = id
            .trim()
            .parse()
            .with_context(|| format!("initial cluster member {s:?}: id is not a number"))?;
        if id == 0 {
            bail!("initial cluster member {s:?}: node ids start at 1");
        }
        if site.is_empty() || !addr.contains(':') {
            bail!("initial cluster member {s:?}: expected id=site@host:port");
        }
        Ok(Member {
            id: NodeId(id),
            site: site.to_owned(),
            peer_addr: addr.to_owned(),
        })
    }
}

impl NodeConfig {
    /// `link_caps` in bytes per second.
    pub fn link_caps(&self) -> anyhow::Result<std::collections::HashMap<String, u64>> {
        self.link_caps
            .iter()
            .map(|(site, rate)| {
                if *site == self.site {
                    bail!("link_caps: {site:?} is this node's own site; caps are for links to other sites");
                }
                let r = crate::link::parse_rate(rate).with_context(|| format!("link_caps.{site}"))?;
                Ok((site.clone(), r))
            })
            .collect()
    }

    pub fn members(&self) -> anyhow::Result<Vec<Member>> {
        self.initial_cluster
            .iter()
            .map(|s| Member::parse(s))
            .collect()
    }

    /// Checks the configuration; the error says what is wrong.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.id == 0 {
            bail!("node id must be at least 1");
        }
        if self.site.is_empty() {
            bail!("site must not be empty");
        }
        for (what, a) in [
            ("peer_addr", &self.peer_addr),
            ("admin_addr", &self.admin_addr),
            ("nbd_addr", &self.nbd_addr),
        ] {
            if !a.contains(':') {
                bail!("{what} {a:?} must be host:port");
            }
        }
        self.link_caps()?;
        if self.lease_ms != 0 && self.lease_ms < LEASE_MS_MIN {
            bail!(
                "lease_ms = {}: must be 0 (off) or at least {LEASE_MS_MIN}",
                self.lease_ms
            );
        }
        if let Some(j) = &self.join {
            if !j.contains(':') {
                bail!("join {j:?} must be the host:port of a member's admin API");
            }
            if !self.initial_cluster.is_empty() {
                bail!("give either initial_cluster (bootstrap) or join (add to a running cluster), not both");
            }
        }
        let members = self.members()?;
        if let Some(m) = members.iter().find(|m| m.id.0 == self.id) {
            if m.site != self.site || m.peer_addr != self.peer_addr {
                bail!(
                    "initial_cluster says node {} is {}@{}, but this node is {}@{}",
                    self.id,
                    m.site,
                    m.peer_addr,
                    self.site,
                    self.peer_addr
                );
            }
        }
        Ok(())
    }

    pub fn load(path: &std::path::Path) -> anyhow::Result<NodeConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parse config {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_parse_and_config_validates() {
        let m = Member::parse("2=osaka@127.0.0.1:7002").unwrap();
        assert_eq!(
            m,
            Member {
                id: NodeId(2),
                site: "osaka".into(),
                peer_addr: "127.0.0.1:7002".into()
            }
        );
        assert!(Member::parse("x=osaka@1:2").is_err());
        assert!(Member::parse("0=osaka@1:2").is_err());
        assert!(Member::parse("1=osaka").is_err());
        let text = r#"
            id = 1
            site = "osaka"
            data_dir = "/tmp/x"
            peer_addr = "127.0.0.1:7001"
            admin_addr = "127.0.0.1:8001"
            nbd_addr = "127.0.0.1:10809"
            initial_cluster = ["1=osaka@127.0.0.1:7001"]
        "#;
        let cfg: NodeConfig = toml::from_str(text).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.verify_interval_secs, 86_400);
        // An unknown key is an error that names it.
        let typo = format!("{text}\nverify_intervall_secs = 5\n");
        let e = toml::from_str::<NodeConfig>(&typo).unwrap_err().to_string();
        assert!(e.contains("verify_intervall_secs"), "{e}");
        let mut bad = cfg.clone();
        bad.peer_addr = "127.0.0.1:9999".into();
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("initial_cluster says"));
        let mut capped = cfg.clone();
        capped.link_caps.insert("hokkaido".into(), "45MiB".into());
        assert_eq!(capped.link_caps().unwrap()["hokkaido"], 45 << 20);
        capped.link_caps.insert("osaka".into(), "45MiB".into());
        assert!(capped.validate().is_err());
        capped.link_caps.remove("osaka");
        capped.link_caps.insert("fukuoka".into(), "lots".into());
        let e = format!("{:#}", capped.validate().unwrap_err());
        assert!(e.contains("link_caps.fukuoka"), "{e}");

        let mut joiner = cfg.clone();
        joiner.join = Some("127.0.0.1:8001".into());
        assert!(joiner
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not both"));
        joiner.initial_cluster.clear();
        joiner.validate().unwrap();
        joiner.join = Some("nowhere".into());
        assert!(joiner
            .validate()
            .unwrap_err()
            .to_string()
            .contains("host:port"));
    }
}
