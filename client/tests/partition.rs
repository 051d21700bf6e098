//! A WAN partition between the home site and a remote site during writes, then a heal:
//! the remote replica converges (its extent file equals the home replicas') and the bytes
//! that crossed the link are close to the data written, not the volume size. Real node
//! processes on the playground, real partitions in the WAN emulator.

mod common;

use std::process::Command;

use common::{group, logical_to, wait_until, Playground};
use roamdisk_client::playground::free_base_port;
use roamdisk_client::AdminClient;
use roamdisk_wan::{ControlClient, Partition};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn qemu_io(uri: &str, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(uri).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("Pattern verification"),
        "qemu-io {cmds:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn hokkaido_lag(admin: &AdminClient) -> Option<Value> {
    let v = admin.volume("vm1").ok()?;
    v["site_lag"]
        .as_array()?
        .iter()
        .find(|l| l["site"] == "hokkaido")
        .cloned()
}

#[test]
fn a_partitioned_site_converges_after_heal_shipping_only_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port(6, 26000).to_string();
    let (_pg, m) = Playground::start(
        dir.path(),
        &[
            "--sites",
            "osaka,hokkaido",
            "--volume",
            "vm1:256M",
            "--base-port",
            &base,
        ],
    );
    let osaka = &m.sites[0].nodes;
    let admin = AdminClient::new(&osaka[0].admin);
    let wan = ControlClient::new(m.wan.as_ref().unwrap().control.parse().unwrap());
    let v = admin.volume("vm1").unwrap();
    let vid = v["id"].as_u64().unwrap();
    let learner = v["learners"][0].as_u64().unwrap();
    let learner_node = m.nodes().find(|n| n.id == learner).unwrap();
    assert!(learner > 3, "the learner is in hokkaido: {v:#}");
    let leader = wait_until("a leader", 90, || {
        admin.volume("vm1").ok()?["leader"].as_u64()
    });
    let uri = format!("nbd://{}/vm1", osaka[leader as usize - 1].nbd);

    // 16 MiB everywhere first.
    qemu_io(&uri, &["write -P 0x11 0 16M".to_owned()]);
    wait_until("hokkaido to have everything", 90, || {
        hokkaido_lag(&admin)
            .filter(|l| l["entries"] == 0)
            .map(|_| ())
    });
    let shipped_before = wan.link("osaka", "hokkaido").unwrap().stats.bytes_forwarded;
    let logical_before = logical_to(osaka, "hokkaido");

    // Partition hokkaido from osaka (both directions held) and write 8 MiB at home.
    wan.partition("osaka", "hokkaido", Partition::Hold).unwrap();
    wan.partition("hokkaido", "osaka", Partition::Hold).unwrap();
    let writes: Vec<String> = (0..8u64)
        .map(|i| format!("write -P {:#x} {} 1M", 0x20 + i, (32 + 4 * i) * MIB))
        .collect();
    qemu_io(&uri, &writes);
    let lag = wait_until("the lag to show the partition", 90, || {
        hokkaido_lag(&admin).filter(|l| l["entries"].as_u64() > Some(0))
    });
    assert!(lag["bytes"].as_u64().unwrap() >= MIB, "{lag:#}");

    // Heal: hokkaido catches up and its replica equals the home replicas.
    wan.heal().unwrap();
    wait_until("hokkaido to catch up after the heal", 90, || {
        hokkaido_lag(&admin)
            .filter(|l| l["entries"] == 0)
            .map(|_| ())
    });
    let last = group(&admin, vid)
        .and_then(|g| g["last_index"].as_u64())
        .unwrap();
    let learner_admin = AdminClient::new(&learner_node.admin);
    wait_until("the learner to apply everything", 90, || {
        let g = group(&learner_admin, vid)?;
        (g["applied"].as_u64()? >= last && g["recovering"] == false).then_some(())
    });
    let home = std::fs::read(
        osaka[leader as usize - 1]
            .data_dir
            .join(format!("volumes/{vid}.img")),
    )
    .unwrap();
    let remote = std::fs::read(learner_node.data_dir.join(format!("volumes/{vid}.img"))).unwrap();
    assert_eq!(home.len(), remote.len());
    assert!(
        home == remote,
        "the hokkaido replica differs from the home replica"
    );
    assert!(home[(32 * MIB) as usize..(33 * MIB) as usize]
        .iter()
        .all(|b| *b == 0x20));

    // What was shipped is about the data written (8 MiB), not the volume (256 MiB); the
    // patterns compress, so the wire carried far less than that.
    let logical = logical_to(osaka, "hokkaido") - logical_before;
    let wire = wan.link("osaka", "hokkaido").unwrap().stats.bytes_forwarded - shipped_before;
    eprintln!("shipped {logical} bytes ({wire} on the wire) for 8 MiB written");
    assert!(logical >= 8 * MIB, "shipped {logical}");
    assert!(
        logical <= 8 * MIB + 8 * MIB / 4,
        "shipped {logical} for 8 MiB written"
    );
    assert!(
        wire < logical / 4,
        "{wire} wire bytes for {logical}: not compressed"
    );
}
