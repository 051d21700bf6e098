//! What the multi-process tests of this directory share: a three-site playground, its
//! admin and NBD addresses, blocks that say which version they hold, waiting on the
//! cluster, the WAN emulator's control API.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use roamdisk_admin_client::AdminClient;
use roamdisk_playground::{free_base_port, Cluster, Options};
use serde_json::Value;

pub const BLOCK: u64 = 4096;
pub const MIB: u64 = 1 << 20;

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A playground of three sites, three nodes each; `first_port` keeps concurrent tests'
/// port ranges apart (a range is only checked free, not reserved, until the nodes bind).
pub fn start(volumes: &[(&str, u64)], first_port: u16) -> (tempfile::TempDir, Cluster) {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port(9, first_port);
    let c = roamdisk_playground::start(&Options {
        dir: dir.path().join("pg"),
        sites: vec!["osaka".into(), "hokkaido".into(), "fukuoka".into()],
        nodes_per_site: 3,
        volumes: volumes.iter().map(|(n, s)| (n.to_string(), *s)).collect(),
        base_port: base,
        // Built next to this package's binary by the workspace's test run.
        node_bin: std::path::Path::new(env!("CARGO_BIN_EXE_roamdisk-chaos"))
            .with_file_name("roamdisk-node"),
        wan: "sinet5".parse().unwrap(),
        node_env: vec![],
    })
    .expect("start the playground");
    (dir, c)
}

pub fn admin(c: &Cluster, id: u64) -> AdminClient {
    let n = c.manifest().nodes().find(|n| n.id == id).unwrap();
    AdminClient::with_timeout(&n.admin, Duration::from_secs(30))
}

pub fn nbd(c: &Cluster, id: u64) -> String {
    c.manifest()
        .nodes()
        .find(|n| n.id == id)
        .unwrap()
        .nbd
        .clone()
}

pub fn wait_until<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The contents of `block` at `version`: its number and version, then noise (never
/// zeros: a server must store every byte of it).
pub fn block_data(block: u64, version: u64) -> Vec<u8> {
    let mut d = Vec::with_capacity(BLOCK as usize);
    d.extend_from_slice(&block.to_be_bytes());
    d.extend_from_slice(&version.to_be_bytes());
    let mut x = block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ version ^ 0xdead_beef;
    while d.len() < BLOCK as usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        d.extend_from_slice(&x.to_le_bytes());
    }
    d
}

/// The version a block read back holds (0: never written); panics on a torn block.
pub fn version_of(block: u64, data: &[u8]) -> u64 {
    if data.iter().all(|b| *b == 0) {
        return 0;
    }
    let b = u64::from_be_bytes(data[..8].try_into().unwrap());
    let v = u64::from_be_bytes(data[8..16].try_into().unwrap());
    assert_eq!(b, block, "block {block} holds block {b}'s data");
    assert_eq!(
        data,
        block_data(b, v).as_slice(),
        "block {block} v{v} is torn"
    );
    v
}

pub fn volume(c: &Cluster, on: u64, name: &str) -> Value {
    wait_until(&format!("node {on} to show volume {name}"), 30, || {
        admin(c, on).volume(name).ok()
    })
}

/// Waits until `name` answers writes at its new home (a leader past the fencing wait).
pub fn until_serving(c: &Cluster, on: u64, name: &str) -> Value {
    let last = std::cell::RefCell::new(Value::Null);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(v) = admin(c, on).volume(name) {
            if v["leader"].is_u64() && v["suspended"] == false && v["epoch"].as_u64() > Some(0) {
                return v;
            }
            *last.borrow_mut() = v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {name} to answer after the failover; last seen: {}",
            last.borrow()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn wan(c: &Cluster, method: &str, path: &str, body: &str) {
    let url = format!("http://{}{path}", c.wan_control().unwrap());
    let r = match method {
        "PUT" => ureq::put(&url)
            .set("content-type", "application/json")
            .send_string(body),
        _ => ureq::post(&url).send_string(body),
    };
    r.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
}
