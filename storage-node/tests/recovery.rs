//! Protocol-aware recovery on real processes: a node never vouches for log entries it
//! cannot prove durable (`roamdisk_core::node`'s recovery; decision 018).
//!
//! The nodes run with the log store's emulated page cache (`rocks::faults`): a test can
//! fail a node's next log fsync the way Linux does (the dirty pages are marked clean:
//! readable, never written) and apply a power loss at a restart (what was not on disk is
//! dropped). The same schedule runs with the shipped recovery and with the old one
//! (`ROAMDISK_CORE_BUG=trust-log`: open the store and only sync it) as the negative
//! control.

mod common;

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use common::{qemu_io, Cluster};
use roamdisk_storage_node::rocks::faults::{
    FaultState, FAIL_NEXT_SYNC_FILE, FAULT_STATE_FILE, TEST_FAULTS_ENV, TEST_POWER_LOSS_ENV,
};

const MIB: u64 = 1 << 20;

fn volume_id(c: &Cluster, name: &str) -> u64 {
    c.admin(c.any_live()).volume(name).unwrap()["id"]
        .as_u64()
        .unwrap()
}

fn fault_state(c: &Cluster, id: u64) -> FaultState {
    let path = c.nodes[id as usize - 1].data_dir.join(FAULT_STATE_FILE);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// Waits for node `id` to exit on its own (a bounded wait: the node is expected to stop).
fn wait_exit(c: &mut Cluster, id: u64) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    let node = &mut c.nodes[id as usize - 1];
    loop {
        let child = node.child.as_mut().expect("node is running");
        if let Some(status) = child.try_wait().unwrap() {
            node.child = None;
            return status;
        }
        assert!(Instant::now() < deadline, "node {id} did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the schedule below saw.
struct Outcome {
    /// Entries of the volume's group that node B's disk lacked (the page cache only)
    /// when the flush covering them returned.
    lost_when_flushed: usize,
    /// Node B's restart after the power loss: `Err` with what it said if it failed.
    after_power_loss: Result<(), String>,
    cluster: Cluster,
    leader: u64,
    b: u64,
    c: u64,
}

/// Three voters, C down. A write and a FLUSH through the leader; B's log fsync covering
/// the write fails, so B stops (fail-stop) with the entries readable but not on disk; a
/// supervisor restarts B on the same boot; the flush returns once B counts toward the
/// commit. Then B loses power.
fn failed_fsync_then_power_loss(core_bug: Option<&str>) -> Outcome {
    let mut env = vec![(TEST_FAULTS_ENV, "1")];
    if let Some(bug) = core_bug {
        env.push(("ROAMDISK_CORE_BUG", bug));
    }
    let mut c = Cluster::start_with_env(&[("osaka", 3)], &env);
    let leader = c.create_volume("vm1", 16 * MIB, 3);
    let vid = volume_id(&c, "vm1");
    let mut others = (1..=3).filter(|n| *n != leader);
    let (b, cc) = (others.next().unwrap(), others.next().unwrap());
    let uri = c.uri(leader, "vm1");
    qemu_io(&uri, &["write -P 0x11 0 1M", "flush"]);

    c.kill9(cc);
    std::fs::write(
        c.nodes[b as usize - 1].data_dir.join(FAIL_NEXT_SYNC_FILE),
        vid.to_string(),
    )
    .unwrap();
    let writer = std::thread::spawn(move || qemu_io(&uri, &["write -P 0x5a 0 64k", "flush"]));
    let status = wait_exit(&mut c, b);
    assert!(
        !status.success(),
        "node {b} stopped with {status} after a failed fsync"
    );
    let failed = fault_state(&c, b);
    assert_eq!(
        failed.sync_failures, 1,
        "the fsync failure was not injected"
    );
    assert!(
        failed.lost.contains_key(&vid),
        "the failed fsync did not cover the volume's write: {failed:?}"
    );
    // A supervisor restarts it at once, on the same boot.
    c.restart(b);
    // qemu_io fails the thread on any error the client reports.
    let out = writer.join().expect("the write and the flush succeed");
    assert!(
        out.contains("wrote 65536/65536 bytes"),
        "write and flush: {out}"
    );
    let lost_when_flushed = fault_state(&c, b).lost.get(&vid).map_or(0, |s| s.len());

    // B loses power (a new boot, no clean shutdown): what was not on disk is gone.
    c.kill9(b);
    let after_power_loss = c.try_spawn(
        b,
        &[
            (TEST_POWER_LOSS_ENV, "1"),
            ("ROAMDISK_BOOT_ID", "after-the-power-loss"),
        ],
    );
    Outcome {
        lost_when_flushed,
        after_power_loss,
        cluster: c,
        leader,
        b,
        c: cc,
    }
}

#[test]
fn a_flushed_write_survives_a_failed_fsync_a_restart_and_a_power_loss() {
    let o = failed_fsync_then_power_loss(None);
    eprintln!(
        "shipped recovery: {} entries off B's disk when the flush returned",
        o.lost_when_flushed
    );
    assert_eq!(
        o.lost_when_flushed, 0,
        "entries the failed fsync left off disk were counted toward the commit"
    );
    o.after_power_loss
        .expect("node B starts after the power loss");
    let mut c = o.cluster;
    // B has the write on its own disk: with the leader gone, B and C hold it.
    c.kill9(o.leader);
    c.restart(o.c);
    let leader = c.leader("vm1");
    assert_ne!(leader, o.leader);
    qemu_io(&c.uri(o.b, "vm1"), &["read -P 0x5a 0 64k"]);
    let st = fault_state(&c, o.b);
    assert_eq!(st.power_losses, 1, "the power loss was not applied: {st:?}");
}

/// The negative control: the old recovery trusted every entry it read back, so the same
/// schedule acknowledges a flush whose write is on the leader's disk alone, and B, after
/// the power loss, no longer holds entries it had acknowledged as persisted.
#[test]
fn the_old_recovery_lets_a_flush_return_with_the_write_on_one_disk() {
    let o = failed_fsync_then_power_loss(Some("trust-log"));
    assert!(
        o.lost_when_flushed > 0,
        "the negative control did not lose the write from B's disk"
    );
    let st = fault_state(&o.cluster, o.b);
    let dropped: u64 = st.dropped.values().sum();
    eprintln!(
        "old recovery: {} entries of the flushed write off B's disk when the flush \
         returned; after the power loss: {:?}, {dropped} entries dropped",
        o.lost_when_flushed, o.after_power_loss
    );
    assert!(
        o.after_power_loss.is_err() || dropped > 0,
        "the power loss dropped nothing: {st:?}"
    );
}

/// A node restarted after a reboot without a clean shutdown may have forgotten entries
/// it reported as written; it must not help elect a leader until it hears one.
#[test]
fn a_rebooted_node_is_quarantined_until_it_hears_a_leader() {
    let mut c = Cluster::start(3);
    let leader = c.create_volume("vm1", 16 * MIB, 3);
    let vid = volume_id(&c, "vm1");
    let b = (1..=3).find(|n| *n != leader).unwrap();
    qemu_io(&c.uri(leader, "vm1"), &["write -P 0x21 0 1M", "flush"]);
    c.kill9(leader);
    c.kill9(b);
    c.try_spawn(b, &[("ROAMDISK_BOOT_ID", "another-boot")])
        .expect("node B starts");
    // The third voter alone cannot win an election without B's vote, so B stays
    // quarantined while the leader is down.
    c.wait_until("node B to report the volume's group quarantined", |c| {
        c.group_status(b, vid)?["quarantined"]
            .as_bool()?
            .then_some(())
    });
    c.restart(leader);
    c.wait_until("the quarantine to end once a leader is heard", |c| {
        let g = c.group_status(b, vid)?;
        (g["quarantined"] == false && g["leader"].is_u64()).then_some(())
    });
    qemu_io(
        &c.uri(b, "vm1"),
        &["read -P 0x21 0 1M", "write -P 0x22 0 4k", "flush"],
    );
}
