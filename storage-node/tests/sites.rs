//! Multi-site behaviour with real processes: durability=site acknowledges a write only
//! once a replica at another site has it, and every volume reports how far each remote
//! site lags (entries, bytes, seconds, drain rate) through the admin API and /metrics.

mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{qemu_io, tool, Cluster};
use roamdisk_core::meta::Durability;
use roamdisk_storage_node::volume::image_block_hashes;
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

fn wait_moved(c: &Cluster, name: &str, to: &str, generation: u64) -> Value {
    c.wait_until(&format!("{name} to finish moving to {to}"), |c| {
        let v = c.admin(c.any_live()).volume(name).ok()?;
        (v["home_site"] == to && v["moving"].is_null() && v["generation"] == generation)
            .then_some(v)
    })
}

#[test]
fn a_volume_moves_to_another_site_while_written_and_back_without_a_copy() {
    // osaka: nodes 1-3, hokkaido: nodes 4-6.
    let c = Cluster::start_sites(&[("osaka", 3), ("hokkaido", 3)]);
    let admin = c.admin(1);
    admin
        .create_volume("vm1", 32 * MIB, Some(3), Some("osaka"), None)
        .unwrap();
    let leader = c.leader("vm1");
    assert!((1..=3).contains(&leader));
    let vid = admin.volume("vm1").unwrap()["id"].as_u64().unwrap();
    qemu_io(&c.uri(leader, "vm1"), &["write -P 0x41 0 4M"]);

    // Refusals change nothing.
    assert!(admin.move_volume("vm1", "osaka").is_err(), "already home");
    assert!(admin.move_volume("vm1", "nowhere").is_err(), "unknown site");
    assert!(
        admin.move_volume("nope", "hokkaido").is_err(),
        "unknown volume"
    );

    // A writer at the destination site keeps writing through the move (its writes are
    // forwarded to wherever the leader is).
    let mut writer = tool("qemu-io");
    writer.args(["-f", "raw"]);
    for i in 0..64u64 {
        writer.args([
            "-c",
            &format!(
                "write -P {:#x} {} 64k",
                0x50 + (i % 16),
                (8 << 20) + i * 65536
            ),
        ]);
    }
    let mut writer = writer
        .arg(c.uri(5, "vm1"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let v = admin.move_volume("vm1", "hokkaido").unwrap();
    assert_eq!(v["moving"]["to"], "hokkaido", "{v:#}");
    let v = wait_moved(&c, "vm1", "hokkaido", 2);
    wait_exit(&mut writer, "the writer during the move");
    let voters: Vec<u64> = v["voters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect();
    let mut sorted = voters.clone();
    sorted.sort();
    assert_eq!(sorted, vec![4, 5, 6], "{v:#}");
    for old in 1..=3u64 {
        assert!(
            v["learners"]
                .as_array()
                .unwrap()
                .contains(&Value::from(old)),
            "old voter {old} kept as a learner: {v:#}"
        );
    }
    let new_leader = c.leader("vm1");
    assert!(
        (4..=6).contains(&new_leader),
        "leader {new_leader} is not in hokkaido"
    );
    // Raft membership matches the metadata on the new leader.
    let g = c.group_status(new_leader, vid).unwrap();
    assert_eq!(g["voters"], serde_json::json!([4, 5, 6]), "{g:#}");
    assert_eq!(g["joint"], false);

    // Every write is readable everywhere.
    let mut checks = vec!["read -P 0x41 0 4M".to_owned()];
    for i in 0..64u64 {
        checks.push(format!(
            "read -P {:#x} {} 64k",
            0x50 + (i % 16),
            (8 << 20) + i * 65536
        ));
    }
    let checks: Vec<&str> = checks.iter().map(String::as_str).collect();
    for id in [1, 4, 6] {
        qemu_io(&c.uri(id, "vm1"), &checks);
    }

    // Moving back finds every replica already in the group: no replica is added.
    qemu_io(&c.uri(new_leader, "vm1"), &["write -P 0x77 16M 1M"]);
    admin.move_volume("vm1", "osaka").unwrap();
    wait_moved(&c, "vm1", "osaka", 3);
    let back = c.leader("vm1");
    assert!((1..=3).contains(&back));
    let g = c.group_status(back, vid).unwrap();
    assert_eq!(g["voters"], serde_json::json!([1, 2, 3]), "{g:#}");
    assert_eq!(g["learners"], serde_json::json!([4, 5, 6]), "{g:#}");
    qemu_io(
        &c.uri(2, "vm1"),
        &["read -P 0x77 16M 1M", "read -P 0x41 0 4M"],
    );

    // Quiesced, all six replicas hold the same blocks.
    let last = g["last_index"].as_u64().unwrap();
    c.wait_until("every replica to apply the whole log", |c| {
        (1..=6)
            .all(|id| {
                c.group_status(id, vid).is_some_and(|g| {
                    g["applied"].as_u64().is_some_and(|a| a >= last) && g["recovering"] == false
                })
            })
            .then_some(())
    });
    let first = image_block_hashes(&c.volume_path(1, vid)).unwrap();
    assert!(!first.is_empty());
    for id in 2..=6 {
        assert_eq!(
            first,
            image_block_hashes(&c.volume_path(id, vid)).unwrap(),
            "replica {id} differs"
        );
    }
}

/// A node added after bootstrap (`join`, no `initial_cluster`) gets the cluster's
/// metadata, receives replicas, serves them, and keeps doing so after kill -9 and a
/// restart; a join that reuses a taken id is refused with a clear error.
#[test]
fn a_node_joins_after_bootstrap_and_serves_volumes() {
    let mut c = Cluster::start_sites(&[("osaka", 3)]);
    let new = c.join("hokkaido");
    c.wait_until("every node, the new one too, to list four nodes", |c| {
        (1..=new)
            .all(|i| c.admin(i).nodes().is_ok_and(|n| n.len() == 4))
            .then_some(())
    });

    // The new node is the only one at hokkaido: a volume at osaka puts its learner there.
    let admin = c.admin(1);
    admin
        .create_volume("v", 16 * MIB, Some(3), Some("osaka"), None)
        .unwrap();
    let v = c.wait_until("the learner at hokkaido", |c| {
        let v = c.admin(1).volume("v").ok()?;
        (v["learners"].as_array()?.len() == 1).then_some(v)
    });
    assert_eq!(v["learners"][0].as_u64(), Some(new), "{v:#}");
    let leader = c.leader("v");
    qemu_io(&c.uri(leader, "v"), &["write -P 0x5a 0 1M"]);
    // Reads at the new node are linearizable: they see the write at once.
    qemu_io(&c.uri(new, "v"), &["read -P 0x5a 0 1M"]);

    c.kill9(new);
    qemu_io(&c.uri(leader, "v"), &["write -P 0x6b 1M 1M"]);
    c.restart(new);
    qemu_io(
        &c.uri(new, "v"),
        &["read -P 0x5a 0 1M", "read -P 0x6b 1M 1M"],
    );

    // A second node claiming a taken id is refused, and nothing changes.
    let mut imposter = admin.nodes().unwrap()[1].clone();
    imposter.peer_addr = "127.0.0.1:1".into();
    let err = admin.add_node(&imposter).unwrap_err().to_string();
    assert!(err.contains("already"), "{err}");
    assert_eq!(admin.nodes().unwrap().len(), 4);
}
