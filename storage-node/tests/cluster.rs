//! Multi-process tests: real `roamdisk-node` processes, real sockets, real NBD clients
//! (qemu-io, nbdcopy, libnbd), kill -9.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{pseudo_random, qemu_io, run, tool, Cluster};
use roamdisk_storage_node::volume::image_block_hashes;

const MIB: u64 = 1 << 20;

fn volume_id(c: &Cluster, name: &str) -> u64 {
    c.admin(c.any_live()).volume(name).unwrap()["id"]
        .as_u64()
        .unwrap()
}

fn followers(c: &Cluster, leader: u64) -> Vec<u64> {
    c.nodes
        .iter()
        .map(|n| n.id)
        .filter(|&id| id != leader)
        .collect()
}

/// The value of the counter (or histogram `_count`) `name` on node `id`.
fn metric(c: &Cluster, id: u64, name: &str) -> u64 {
    let text = c.admin(id).metrics().unwrap();
    text.lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Under bursts of writes answered early, each followed by a FLUSH, a replica's log
/// syncs once per burst: the sync waits until the flush asks for it (the leader, and
/// each voter through `SyncWanted`) instead of starting with the first write of the
/// burst and again for the rest (3.4 syncs per burst on the leader before, measured
/// with the same client). Every flush still needs a sync on a quorum.
#[test]
fn a_burst_of_writes_and_a_flush_cost_each_replica_one_log_sync() {
    let c = Cluster::start(3);
    let leader = c.create_volume("vm1", 64 * MIB, 3);
    let syncs = |id| metric(&c, id, "roamdisk_store_log_sync_seconds_count");
    let before: Vec<u64> = (1..=3).map(syncs).collect();
    let acked_before = metric(&c, leader, "roamdisk_store_acked_written_total");
    let bursts = 64u64;
    let out = run(tool("qemu-img").args([
        "bench",
        "-f",
        "raw",
        "-t",
        "none",
        "-n",
        "-w",
        "-c",
        &(bursts * 32).to_string(),
        "-d",
        "32",
        "-s",
        "4096",
        "--flush-interval=32",
        &c.uri(leader, "vm1"),
    ]));
    assert!(out.contains("Run completed"), "{out}");
    let acked = metric(&c, leader, "roamdisk_store_acked_written_total") - acked_before;
    assert!(
        acked >= bursts * 32 * 9 / 10,
        "{acked} writes answered early"
    );
    let flushes = metric(&c, leader, "roamdisk_store_flush_seconds_count");
    assert!(flushes >= bursts, "{flushes} flushes");
    for id in 1..=3 {
        let n = syncs(id) - before[id as usize - 1];
        // Every flush waits for a quorum's syncs; the leader is asked to sync for each
        // (one sync may cover the end of a burst and the next one).
        if id == leader {
            assert!(
                n >= bursts / 2,
                "leader {id}: {n} syncs for {bursts} flushes"
            );
        }
        assert!(
            n <= 2 * bursts,
            "node {id}: {n} log syncs for {bursts} bursts of 32 writes and a flush"
        );
    }
}

#[test]
fn writes_through_any_node_are_read_back_through_every_node() {
    let c = Cluster::start(3);
    let leader = c.create_volume("vm1", 64 * MIB, 3);
    let f = followers(&c, leader);
    // Through the leader, then through a follower (forwarded to the leader).
    qemu_io(
        &c.uri(leader, "vm1"),
        &["write -P 0xa1 0 1M", "write -P 0xb2 3000 5000", "flush"],
    );
    qemu_io(
        &c.uri(f[0], "vm1"),
        &["write -P 0xc3 8M 256k", "write -z 8M 4k"],
    );
    for id in 1..=3 {
        qemu_io(
            &c.uri(id, "vm1"),
            &[
                "read -P 0xa1 0 3000",
                "read -P 0xb2 3000 5000",
                "read -P 0xa1 8000 1040576",
                "read -P 0 8M 4k",
                "read -P 0xc3 8392704 258048",
            ],
        );
    }
    // nbdcopy of random data in through one follower, out through the other.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let data = pseudo_random(16 << 20, 3);
    std::fs::write(&src, &data).unwrap();
    let target = c.uri(f[1], "vm1");
    run(tool("nbdcopy").arg(&src).arg(&target));
    let out = dir.path().join("out.img");
    std::fs::File::create(&out)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    run(tool("nbdcopy").arg(c.uri(f[0], "vm1")).arg(&out));
    let got = std::fs::read(&out).unwrap();
    assert!(
        got[..16 << 20] == data[..],
        "nbdcopy round trip through two different nodes differs"
    );
}

/// Runs a libnbd writer script from `tests/` with `args`, calls `kill` once it prints
/// `kill_at`, and returns its output once it has verified (or found a mismatch). Fails
/// unless the kill happened and the writer exited successfully.
fn run_writer_killing(
    script: &str,
    args: &[String],
    kill_at: &str,
    kill: impl FnOnce(),
) -> Vec<String> {
    let path = format!("{}/tests/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut writer = Command::new("/usr/bin/python3")
        .arg(path)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the libnbd writer");
    let lines = BufReader::new(writer.stdout.take().unwrap()).lines();
    let mut kill = Some(kill);
    let mut log = Vec::new();
    for line in lines {
        let line = line.unwrap();
        log.push(line.clone());
        if line == kill_at {
            if let Some(k) = kill.take() {
                k();
            }
        }
        if line.starts_with("verified") || line.starts_with("MISMATCH") {
            break;
        }
    }
    let status = writer.wait().unwrap();
    assert!(kill.is_none(), "the writer never got far enough: {log:?}");
    assert!(status.success(), "writer failed: {log:?}");
    log
}

#[test]
fn kill9_of_the_leader_loses_no_flushed_write_and_io_resumes_elsewhere() {
    let mut c = Cluster::start(3);
    let leader = c.create_volume("vm1", 64 * MIB, 3);
    let mut uris = vec![c.uri(leader, "vm1")];
    uris.extend(followers(&c, leader).into_iter().map(|id| c.uri(id, "vm1")));
    let mut args = vec!["1500".to_string()];
    args.extend(uris);
    let log = run_writer_killing("flushed_writes.py", &args, "flushed 400", || {
        c.kill9(leader)
    });
    assert_eq!(
        log.last().map(String::as_str),
        Some("verified 1500"),
        "{log:?}"
    );
    assert!(
        log.iter().any(|l| l.starts_with("connection lost")),
        "the kill should have cut the writer's connection: {log:?}"
    );
    // The old leader comes back and converges.
    c.restart(leader);
    let new_leader = c.leader("vm1");
    assert_ne!(new_leader, 0);
    qemu_io(&c.uri(leader, "vm1"), &["read -P 0 6000k 4k"]); // past the writer's range: still zero
}

/// Writes acknowledged without FUA or FLUSH are answered once a quorum has written
/// them, before their fsync (`store::Ack::Written`): a kill -9 of the leader must still
/// lose none of them. The writer's connection is to a follower, which stays up, so it
/// reads back through the same connection what it was told was written.
#[test]
fn kill9_of_the_leader_loses_no_acknowledged_unflushed_write() {
    let mut c = Cluster::start(3);
    let leader = c.create_volume("vm1", 64 * MIB, 3);
    let via = followers(&c, leader)[0];
    let args = ["3000".to_string(), c.uri(via, "vm1")];
    let log = run_writer_killing("acked_writes.py", &args, "acked 1000", || c.kill9(leader));
    assert_eq!(
        log.last().map(String::as_str),
        Some("verified 3000"),
        "{log:?}"
    );
    // The writes after the kill went to the new leader, one of the survivors.
    let early: u64 = followers(&c, leader)
        .into_iter()
        .map(|id| metric(&c, id, "roamdisk_store_acked_written_total"))
        .sum();
    assert!(
        early > 0,
        "no write was answered before its commit: the test shows nothing"
    );
}

#[test]
fn one_node_down_still_serves_two_down_blocks_writes_until_one_returns() {
    let mut c = Cluster::start(3);
    let leader = c.create_volume("vm1", 16 * MIB, 3);
    let f = followers(&c, leader);
    c.kill9(f[0]);
    qemu_io(&c.uri(leader, "vm1"), &["write -P 0x11 0 64k"]);
    qemu_io(
        &c.uri(f[1], "vm1"),
        &["read -P 0x11 0 64k", "write -P 0x22 1M 64k"],
    );
    c.kill9(f[1]);
    // Only one of three left: a write must not complete (no split brain)...
    let mut blocked = tool("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x33 2M 64k",
            &c.uri(leader, "vm1"),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let observe_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < observe_until {
        assert!(
            blocked.try_wait().unwrap().is_none(),
            "a write completed without a quorum"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // ...and completes once a second node returns.
    c.restart(f[0]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = blocked.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "write did not resume after the quorum returned"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success());
    qemu_io(
        &c.uri(f[0], "vm1"),
        &[
            "read -P 0x11 0 64k",
            "read -P 0x22 1M 64k",
            "read -P 0x33 2M 64k",
        ],
    );
}

#[test]
fn restarted_node_catches_up_and_replicas_hash_identically() {
    let mut c = Cluster::start(3);
    let leader = c.create_volume("vm1", 32 * MIB, 3);
    let vid = volume_id(&c, "vm1");
    let lagger = followers(&c, leader)[0];
    c.kill9(lagger);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    std::fs::write(&src, pseudo_random(12 << 20, 9)).unwrap();
    run(tool("nbdcopy").arg(&src).arg(c.uri(leader, "vm1")));
    qemu_io(&c.uri(leader, "vm1"), &["write -z 4M 1M", "discard 6M 1M"]);
    c.restart(lagger);
    // Quiesce: every replica has applied the leader's last index.
    let last = c.group_status(leader, vid).unwrap()["last_index"]
        .as_u64()
        .unwrap();
    c.wait_until("every replica to apply the whole log", |c| {
        (1..=3)
            .all(|id| {
                c.group_status(id, vid).is_some_and(|g| {
                    g["applied"].as_u64().is_some_and(|a| a >= last) && g["recovering"] == false
                })
            })
            .then_some(())
    });
    let hashes: Vec<_> = (1..=3)
        .map(|id| image_block_hashes(&c.volume_path(id, vid)).unwrap())
        .collect();
    assert!(!hashes[0].is_empty());
    assert_eq!(hashes[0], hashes[1], "replicas 1 and 2 differ");
    assert_eq!(hashes[0], hashes[2], "replicas 1 and 3 differ");
    // The zeroed and discarded ranges hold no data on any replica.
    assert!(hashes[0]
        .iter()
        .all(|(b, _)| !(1024..1280).contains(b) && !(1536..1792).contains(b)));
}

#[test]
fn admin_errors_are_clear_and_change_nothing() {
    let c = Cluster::start(1);
    let a = c.admin(1);
    let e = a
        .create_volume("vm1", 4 * MIB, Some(3), None, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 nodes, 3 replicas requested"), "{e}");
    a.create_volume("vm1", 4 * MIB, Some(1), None, None)
        .unwrap();
    let e = a
        .create_volume("vm1", 4 * MIB, Some(1), None, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already exists") && e.contains("409"), "{e}");
    let e = a.resize_volume("vm1", MIB).unwrap_err().to_string();
    assert!(e.contains("can only grow"), "{e}");
    let e = a
        .create_volume("bad name!", 4 * MIB, Some(1), None, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("invalid volume name"), "{e}");
    assert_eq!(a.volumes().unwrap().len(), 1);
    let v = a.resize_volume("vm1", 8 * MIB).unwrap();
    assert_eq!(v["size"], 8 * MIB);
    c.leader("vm1");
    qemu_io(
        &c.uri(1, "vm1"),
        &["write -P 0x44 7M 4k", "read -P 0x44 7M 4k"],
    );
    a.delete_volume("vm1").unwrap();
    assert!(a.volume("vm1").unwrap_err().to_string().contains("404"));
    let metrics = a.metrics().unwrap();
    assert!(metrics.contains("roamdisk_volumes 0"), "{metrics}");
}

#[test]
fn replica_behind_the_retained_log_catches_up_by_block_copy() {
    let mut c = Cluster::start(3);
    let leader = c.create_volume("vm1", 128 * MIB, 3);
    let vid = volume_id(&c, "vm1");
    let lagger = followers(&c, leader)[0];
    qemu_io(&c.uri(leader, "vm1"), &["write -P 0x01 0 4M"]);
    c.kill9(lagger);
    // More than the retained log (32 MiB) while it is down: the leader compacts past
    // it, so it must receive a snapshot and copy blocks.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    std::fs::write(&src, pseudo_random(64 << 20, 11)).unwrap();
    run(tool("nbdcopy").arg(&src).arg(c.uri(leader, "vm1")));
    qemu_io(&c.uri(leader, "vm1"), &["write -z 8M 1M"]);
    c.wait_until(
        "the leader to compact its log past the lagging replica",
        |c| {
            let g = c.group_status(leader, vid)?;
            let last = g["last_index"].as_u64()?;
            (g["durable_applied"].as_u64()? >= last).then_some(())
        },
    );
    c.restart(lagger);
    let last = c.group_status(leader, vid).unwrap()["last_index"]
        .as_u64()
        .unwrap();
    c.wait_until("the lagging replica to catch up", |c| {
        let g = c.group_status(lagger, vid)?;
        (g["applied"].as_u64()? >= last && g["recovering"] == false).then_some(())
    });
    // Reads through the caught-up node see the data.
    qemu_io(&c.uri(lagger, "vm1"), &["read -P 0 8M 1M"]);
    let want = image_block_hashes(&c.volume_path(leader, vid)).unwrap();
    let got = image_block_hashes(&c.volume_path(lagger, vid)).unwrap();
    assert_eq!(
        want.len(),
        got.len(),
        "replicas hold different numbers of data blocks"
    );
    assert!(want == got, "replica contents differ after catch-up");
    let log =
        std::fs::read_to_string(c.nodes[lagger as usize - 1].data_dir.join("node.log")).unwrap();
    assert!(
        log.contains("catch-up copy done"),
        "the replica should have caught up by block copy"
    );
}

/// Silent corruption on an idle node: the background scrub finds the block, the replica
/// copies it back from a healthy one, and the replicas hash identically again.
#[test]
fn scrub_on_an_idle_node_finds_a_corrupted_block_and_repairs_it() {
    let c = Cluster::start(3);
    // 8 MiB: one scrub round (4096 blocks) covers the whole volume.
    let leader = c.create_volume("vm1", 8 * MIB, 3);
    let vid = volume_id(&c, "vm1");
    qemu_io(&c.uri(leader, "vm1"), &["write -P 0x5c 1M 2M", "flush"]);
    let victim = followers(&c, leader)[0];
    c.wait_until("every replica to checkpoint the writes", |c| {
        let last = c.group_status(leader, vid)?["last_index"].as_u64()?;
        (1..=3)
            .all(|id| {
                c.group_status(id, vid)
                    .and_then(|g| g["durable_applied"].as_u64())
                    .is_some_and(|d| d >= last)
            })
            .then_some(())
    });
    let want = image_block_hashes(&c.volume_path(leader, vid)).unwrap();
    // Flip bytes in a written block, behind the node's back; nothing writes afterwards.
    let path = c.volume_path(victim, vid);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xffu8; 64], MIB + 5 * 4096 + 100).unwrap();
        f.sync_all().unwrap();
    }
    assert_ne!(image_block_hashes(&path).unwrap(), want);
    let log = c.nodes[victim as usize - 1].data_dir.join("node.log");
    c.wait_until("the scrub to find the corrupted block", |_| {
        let text = std::fs::read_to_string(&log).ok()?;
        text.contains("scrub: blocks differ").then_some(())
    });
    c.wait_until("the replica to copy the block back", |_| {
        (image_block_hashes(&path).ok()? == want).then_some(())
    });
    qemu_io(&c.uri(victim, "vm1"), &["read -P 0x5c 1M 2M"]);
}
