//! `roamdisk volume verify`: every replica compared block by block at one log index, by
//! digest. The negative control the scrub cannot see: a replica whose block *and* whose
//! hash record were both changed (its data agrees with its own records, not with the
//! other replicas: what a stale block copy used to leave behind).

mod common;

use common::*;
use roamdisk_core::ids::{BlockIndex, VolumeId};
use roamdisk_core::logstore::{LogBatch, LogOp, LogStore};
use roamdisk_storage_node::rocks::RocksLogStore;
use roamdisk_storage_node::volume::{hash_key, image_block_hashes};

const MIB: u64 = 1 << 20;

fn verify(c: &Cluster, on: u64, repair: bool) -> serde_json::Value {
    c.admin(on).verify_volume("vm1", repair).expect("verify")
}

#[test]
fn verify_finds_a_replica_that_agrees_with_its_own_hashes_but_not_the_others_and_repairs_it() {
    let mut c = Cluster::start(3);
    let leader = c.create_volume("vm1", 8 * MIB, 3);
    let vid = c.admin(leader).volume("vm1").unwrap()["id"]
        .as_u64()
        .unwrap();
    qemu_io(&c.uri(leader, "vm1"), &["write -P 0x3a 0 4M", "flush"]);
    // Clean replicas: nothing differs, every replica compared every block.
    let r = verify(&c, leader, false);
    assert_eq!(r["differing_blocks"], 0, "{r}");
    assert_eq!(r["blocks"], 2048, "{r}");
    for rep in r["replicas"].as_array().unwrap() {
        assert_eq!(rep["checked_blocks"], 2048, "{r}");
        assert_eq!(rep["unavailable_chunks"], 0, "{r}");
    }
    // Change one block of a follower, and its hash record to match: stopped cleanly
    // first, so that its last checkpoint covers every write and nothing replays over it.
    let victim = (1..=3).find(|n| *n != leader).unwrap();
    c.stop(victim);
    let block = 300u64;
    let bad = vec![0x77u8; 4096];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(c.volume_path(victim, vid))
            .unwrap();
        f.write_all_at(&bad, block * 4096).unwrap();
        f.sync_all().unwrap();
        let db = RocksLogStore::open(&c.nodes[victim as usize - 1].data_dir.join("raft")).unwrap();
        let mut b = LogBatch::default();
        b.push(LogOp::Put {
            key: hash_key(VolumeId(vid), BlockIndex(block)),
            value: blake3::hash(&bad).as_bytes().to_vec(),
        });
        db.write(b).unwrap();
        db.sync().unwrap();
    }
    c.restart(victim);
    c.wait_until("the victim to serve again", |c| {
        c.group_status(victim, vid)?["applied"]
            .as_u64()
            .filter(|a| *a > 0)
    });
    let r = verify(&c, leader, false);
    assert_eq!(r["differing_blocks"], 1, "{r}");
    let rep = r["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["node"] == victim)
        .unwrap()
        .clone();
    assert_eq!(rep["differing_blocks"], 1, "{r}");
    assert_eq!(rep["blocks"][0], block, "{r}");
    // The scrub cannot see it: the block matches the victim's own record.
    let log =
        std::fs::read_to_string(c.nodes[victim as usize - 1].data_dir.join("node.log")).unwrap();
    assert!(
        !log.contains("scrub: blocks differ"),
        "the scrub saw it after all"
    );
    // Repair: the victim copies the differing block from the leader.
    let r = verify(&c, leader, true);
    assert_eq!(r["differing_blocks"], 1, "{r}");
    let want = image_block_hashes(&c.volume_path(leader, vid)).unwrap();
    let path = c.volume_path(victim, vid);
    c.wait_until("the victim to copy the block back", |_| {
        (image_block_hashes(&path).ok()? == want).then_some(())
    });
    c.wait_until("a verify to find every replica equal", |c| {
        let r = c.admin(leader).verify_volume("vm1", false).ok()?;
        (r["differing_blocks"] == 0
            && r["replicas"]
                .as_array()?
                .iter()
                .all(|x| x["unavailable_chunks"] == 0))
        .then_some(())
    });
    let metrics = c.admin(leader).metrics().unwrap();
    assert!(
        metrics.contains("roamdisk_verify_differing_blocks_total{node=\"")
            && !metrics.contains(&format!(
                "roamdisk_verify_differing_blocks_total{{node=\"{leader}\"}} 0"
            )),
        "the counter counts what was found"
    );
}
