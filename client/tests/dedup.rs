//! Dedup by reference across sites, with real node processes on the playground:
//!
//! 1. a second volume filled with the same data as a first ships as references: the
//!    bytes sent to the other site are a small fraction of the data, the receiving site
//!    resolves every reference, and its replica is byte-for-byte the home replica;
//! 2. when the receiving site no longer stores the data (both volumes deleted there), the
//!    references miss, the sender is told, Raft resends the entries with the data, and
//!    the replica is again byte-for-byte the home replica.

mod common;

use std::path::Path;
use std::process::Command;

use common::{group, logical_to, wait_until, Playground};
use roamdisk_client::playground::{free_base_port, Manifest, PlaygroundNode};
use roamdisk_client::AdminClient;

const MIB: u64 = 1 << 20;
const DATA_MIB: u64 = 8;

/// Sum of one dedup counter over `nodes`.
fn dedup(nodes: &[&PlaygroundNode], counter: &str) -> u64 {
    nodes
        .iter()
        .map(|n| {
            AdminClient::new(&n.admin).status().unwrap()["dedup"][counter]
                .as_u64()
                .unwrap()
        })
        .sum()
}

/// Creates `name`, copies `image` into it with qemu-img through its leader, waits until
/// its hokkaido replica applied everything, and checks that replica equals the home one.
/// Returns the volume's id.
fn clone_and_check(m: &Manifest, admin: &AdminClient, name: &str, image: &Path) -> u64 {
    admin
        .create_volume(name, 64 * MIB, Some(3), Some("osaka"), None)
        .unwrap();
    let leader = wait_until("a leader", 120, || {
        admin.volume(name).ok()?["leader"].as_u64()
    });
    let v = wait_until("the learner", 120, || {
        let v = admin.volume(name).ok()?;
        (!v["learners"].as_array()?.is_empty()).then_some(v)
    });
    let vid = v["id"].as_u64().unwrap();
    let learner = v["learners"][0].as_u64().unwrap();
    let leader_node = m.nodes().find(|n| n.id == leader).unwrap();
    let learner_node = m.nodes().find(|n| n.id == learner).unwrap();
    let out = Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(image)
        .arg(format!("nbd://{}/{name}", leader_node.nbd))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = group(admin, vid)
        .and_then(|g| g["last_index"].as_u64())
        .unwrap();
    let learner_admin = AdminClient::new(&learner_node.admin);
    wait_until("the learner to apply everything", 120, || {
        let g = group(&learner_admin, vid)?;
        (g["applied"].as_u64()? >= last && g["recovering"] == false).then_some(())
    });
    let home = std::fs::read(leader_node.data_dir.join(format!("volumes/{vid}.img"))).unwrap();
    let remote = std::fs::read(learner_node.data_dir.join(format!("volumes/{vid}.img"))).unwrap();
    let img = std::fs::read(image).unwrap();
    assert_eq!(
        &home[..img.len()],
        &img[..],
        "{name}: the home replica lacks the image"
    );
    assert!(
        home == remote,
        "{name}: the hokkaido replica differs from the home replica"
    );
    vid
}

#[test]
fn a_second_clone_ships_as_references_and_a_missing_block_is_resent_as_data() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port(6, 27000).to_string();
    let (_pg, m) = Playground::start(
        dir.path(),
        &[
            "--sites",
            "osaka,hokkaido",
            "--volume",
            "seed:16M",
            "--base-port",
            &base,
        ],
    );
    let osaka: Vec<&PlaygroundNode> = m.sites[0].nodes.iter().collect();
    let hokkaido: Vec<&PlaygroundNode> = m.sites[1].nodes.iter().collect();
    let admin = AdminClient::new(&osaka[0].admin);

    // Distinct, incompressible blocks: only dedup can make them cheap to ship.
    let image = dir.path().join("image.raw");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..DATA_MIB * MIB / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    std::fs::write(&image, &data).unwrap();
    let blocks = DATA_MIB * MIB / 4096;

    let a = clone_and_check(&m, &admin, "a", &image);
    // Both sites index the data once their replicas checkpoint it.
    wait_until("osaka to index the first clone", 120, || {
        osaka
            .iter()
            .all(|n| dedup(&[n], "indexed_blocks") >= blocks)
            .then_some(())
    });
    wait_until("hokkaido to index the first clone", 120, || {
        (dedup(&hokkaido, "indexed_blocks") >= blocks).then_some(())
    });

    let sent_before = logical_to(osaka.iter().copied(), "hokkaido");
    let refs_before = dedup(&osaka, "refs_sent");
    let resolved_before = dedup(&hokkaido, "resolved_local") + dedup(&hokkaido, "resolved_site");
    let b = clone_and_check(&m, &admin, "b", &image);
    let sent = logical_to(osaka.iter().copied(), "hokkaido") - sent_before;
    let refs = dedup(&osaka, "refs_sent") - refs_before;
    let resolved =
        dedup(&hokkaido, "resolved_local") + dedup(&hokkaido, "resolved_site") - resolved_before;
    eprintln!("second clone: {sent} bytes shipped for {DATA_MIB} MiB, {refs} references, {resolved} resolved");
    assert!(
        refs >= blocks,
        "only {refs} of {blocks} blocks went as references"
    );
    assert!(
        resolved >= blocks,
        "hokkaido resolved {resolved} of {blocks} references"
    );
    assert!(
        sent < DATA_MIB * MIB / 8,
        "{sent} bytes shipped for {DATA_MIB} MiB of known data"
    );

    // The data leaves hokkaido (and osaka): osaka's index still names it, so its next
    // copy goes by reference, misses at hokkaido, and must arrive as data.
    admin.delete_volume("a").unwrap();
    admin.delete_volume("b").unwrap();
    wait_until("the replicas to go", 120, || {
        m.nodes()
            .all(|n| {
                [a, b]
                    .iter()
                    .all(|v| !n.data_dir.join(format!("volumes/{v}.img")).exists())
            })
            .then_some(())
    });
    let missed_before = dedup(&hokkaido, "missed");
    clone_and_check(&m, &admin, "c", &image);
    let missed = dedup(&hokkaido, "missed") - missed_before;
    eprintln!("third clone: {missed} references missed and were resent as data");
    assert!(
        missed > 0,
        "no reference missed: the fallback was not exercised"
    );
}
