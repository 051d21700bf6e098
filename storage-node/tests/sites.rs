//! Multi-site behaviour with real processes: durability=site acknowledges a write only
//! once a replica at another site has it, and every volume reports how far each remote
//! site lags (entries, bytes, seconds, drain rate) through the admin API and /metrics.

mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{qemu_io, tool, Cluster};
use roamdisk_core::meta::Durability;
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn spawn_write(uri: &str, pattern: u8, offset: &str) -> Child {
    tool("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            &format!("write -P {pattern:#x} {offset} 64k"),
            uri,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_exit(child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            assert!(s.success(), "{what} failed");
            return;
        }
        assert!(Instant::now() < deadline, "{what} did not complete");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn site_lag(v: &Value, site: &str) -> Option<Value> {
    v["site_lag"]
        .as_array()?
        .iter()
        .find(|l| l["site"] == site)
        .cloned()
}

#[test]
fn durability_site_waits_for_another_site_and_lag_is_reported() {
    // Nodes 1-3 in osaka (home), node 4 in hokkaido (one learner per volume).
    let mut c = Cluster::start_sites(&[("osaka", 3), ("hokkaido", 1)]);
    let admin = c.admin(1);
    let refused = admin.create_volume("solo", 16 * MIB, Some(3), Some("hokkaido"), None);
    assert!(
        refused.is_err(),
        "hokkaido has one node; three replicas must be refused"
    );
    admin
        .create_volume(
            "safe",
            16 * MIB,
            Some(3),
            Some("osaka"),
            Some(Durability::Site),
        )
        .unwrap();
    admin
        .create_volume(
            "fast",
            16 * MIB,
            Some(3),
            Some("osaka"),
            Some(Durability::Node),
        )
        .unwrap();
    let leader_safe = c.leader("safe");
    let leader_fast = c.leader("fast");
    qemu_io(&c.uri(leader_safe, "safe"), &["write -P 0x11 0 64k"]);
    qemu_io(&c.uri(leader_fast, "fast"), &["write -P 0x11 0 64k"]);

    // The remote site goes away: durability=node keeps writing (and reports the lag
    // growing), durability=site does not acknowledge.
    c.kill9(4);
    qemu_io(&c.uri(leader_fast, "fast"), &["write -P 0x22 1M 1M"]);
    let mut blocked = spawn_write(&c.uri(leader_safe, "safe"), 0x33, "2M");
    let observe_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < observe_until {
        assert!(
            blocked.try_wait().unwrap().is_none(),
            "a durability=site write was acknowledged with no other site reachable"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let v = c.admin(2).volume("fast").unwrap();
    let lag = site_lag(&v, "hokkaido").unwrap_or_else(|| panic!("no hokkaido lag in {v:#}"));
    assert!(lag["entries"].as_u64().unwrap() >= 1, "{lag:#}");
    assert!(lag["bytes"].as_u64().unwrap() >= MIB, "{lag:#}");
    assert!(lag["seconds"].as_f64().unwrap() > 0.0, "{lag:#}");
    assert!(
        site_lag(&v, "osaka").is_none(),
        "home site is not remote: {v:#}"
    );
    // The same figures on the leader's /metrics.
    let metrics = c.admin(leader_fast).metrics().unwrap();
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("roamdisk_replica_lag_bytes{")
                && l.contains("volume=\"fast\"")
                && l.contains("site=\"hokkaido\"")
        })
        .unwrap_or_else(|| panic!("no lag metric for fast/hokkaido:\n{metrics}"));
    let bytes: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(bytes >= MIB as f64, "{line}");

    // The remote site returns: the blocked write completes and the lag drains to zero.
    c.restart(4);
    wait_exit(
        &mut blocked,
        "the durability=site write after the remote site returned",
    );
    c.wait_until("hokkaido to catch up on both volumes", |c| {
        ["safe", "fast"]
            .iter()
            .all(|name| {
                let v = c.admin(1).volume(name).ok();
                v.and_then(|v| site_lag(&v, "hokkaido"))
                    .is_some_and(|l| l["entries"] == 0 && l["bytes"] == 0)
            })
            .then_some(())
    });
    qemu_io(
        &c.uri(3, "safe"),
        &["read -P 0x11 0 64k", "read -P 0x33 2M 64k"],
    );
    qemu_io(&c.uri(4, "fast"), &["read -P 0x22 1M 1M"]);
    // Status shows the same per-site lag for every volume.
    let st = c.admin(3).status().unwrap();
    let vols = st["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 2);
    for v in vols {
        assert!(site_lag(v, "hokkaido").is_some(), "{st:#}");
    }
}
