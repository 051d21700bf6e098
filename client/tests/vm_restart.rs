//! A VM restarted at another site after its home site is destroyed.
//!
//! The guest of the live-migration test (`.ci/vm/guest.c`) writes numbered blocks at
//! osaka through an osaka node's export, flushing every 16 writes. Then osaka dies:
//! QEMU and every osaka node are killed (-9). `failover plan --to hokkaido` states the
//! time after which acknowledged writes may be lost; `execute` re-forms the volume
//! there. A fresh QEMU boots at hokkaido on the promoted volume with
//! `roamdisk.restart=NONCE:SEQ`, SEQ the last write the first guest had flushed before
//! the stated time (from the console lines it printed, stamped as they arrived), and
//! checks every block: each must hold the write it had at SEQ or a later one of the same
//! run, whole. The negative control boots once more claiming a whole extra lap of the
//! device was flushed: the guest must report bad blocks.
//!
//! Needs the VM files of `.ci/fetch-vm` (see `vm_migration.rs`).

use std::time::Duration;

use roamdisk_client::playground::{self, free_base_port, Options};
use roamdisk_client::AdminClient;
use roamdisk_core::meta::Durability;

mod common;
#[path = "common/vm.rs"]
mod vm;
use common::wait_until;
use vm::*;

const WRITES_BEFORE_LOSS: u64 = 400;
/// The volume: 16 MiB, 4096 blocks (the guest's whole device).
const VOLUME_BYTES: u64 = 16 << 20;

fn admin(addr: &str) -> AdminClient {
    AdminClient::with_timeout(addr, Duration::from_secs(30))
}

/// Boots a guest at `nbd` that checks the disk against `nonce` up to `upto`; returns
/// its `RESTART` line's (ok, bad, ioerr, newer).
fn restart_check(
    files: &VmFiles,
    dir: &std::path::Path,
    nbd: &str,
    nonce: &str,
    upto: u64,
) -> [u64; 4] {
    static BOOTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let name = ["R1", "R2", "R3"][BOOTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 3];
    let mut r = start_vm_with(
        name,
        files,
        dir,
        nbd,
        None,
        &format!("roamdisk.restart={nonce}:{upto}"),
    );
    let line = r
        .console
        .wait("the restarted guest's check", BOOT + STEP, |l| {
            l.starts_with("RESTART ").then(|| l.to_owned())
        });
    ["ok", "bad", "ioerr", "newer"].map(|k| num(&line, k) as u64)
}

#[test]
fn a_vm_restarts_at_another_site_after_its_home_is_lost_with_every_flushed_block() {
    let Some(files) = vm_files() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut c = playground::start(&Options {
        dir: dir.path().join("pg"),
        sites: vec!["osaka".into(), "hokkaido".into(), "fukuoka".into()],
        nodes_per_site: 2,
        volumes: vec![],
        base_port: free_base_port(6, 27000),
        node_bin: std::path::Path::new(env!("CARGO_BIN_EXE_roamdisk"))
            .with_file_name("roamdisk-node"),
        wan: "sinet5".parse().unwrap(),
        node_env: vec![],
    })
    .expect("start the playground");
    let m = c.manifest().clone();
    let (osaka, hokkaido) = (&m.sites[0].nodes, &m.sites[1].nodes);
    admin(&osaka[0].admin)
        .create_volume(
            "vm",
            VOLUME_BYTES,
            Some(2),
            Some("osaka"),
            Some(Durability::Node),
        )
        .unwrap();
    wait_until("the volume to elect a leader", STEP.as_secs(), || {
        admin(&osaka[0].admin).volume("vm").ok()?["leader"].as_u64()
    });

    // The guest writes at home.
    let mut a = start_vm("A", &files, dir.path(), &osaka[0].nbd, None);
    let nonce = a.console.wait("the guest to start writing", BOOT, |l| {
        l.starts_with("GUEST start")
            .then(|| field(l, "nonce").unwrap().to_owned())
    });
    a.console.wait_writes(WRITES_BEFORE_LOSS);
    let wrote = std::sync::Arc::clone(&a.console.wrote);
    assert!(
        a.console.ioerr.is_empty(),
        "the guest saw I/O errors at home: {:?}",
        a.console.ioerr
    );

    // Osaka is destroyed: the VM with it, then its nodes.
    drop(a);
    let killed_at = unix_ms();
    for n in osaka.iter() {
        c.kill(n.id).unwrap();
    }
    let h = admin(&hokkaido[0].admin);
    let plan = h.failover_plan("hokkaido", &[]).unwrap();
    let v = &plan["volumes"][0];
    assert_eq!(v["name"], "vm", "{plan}");
    // Lossless: every acknowledged write is kept; otherwise writes after `after` may be
    // lost (no stated time: any may be).
    let after = if v["rpo"]["lossless"] == true {
        killed_at
    } else {
        v["rpo"]["after_unix_ms"].as_u64().unwrap_or(0)
    };
    eprintln!("plan: {}", v["rpo"]["text"]);
    h.failover_execute(plan["plan"].as_str().unwrap(), true)
        .unwrap();
    wait_until("the volume to answer at hokkaido", STEP.as_secs(), || {
        let v = h.volume("vm").ok()?;
        (v["leader"].is_u64() && v["suspended"] == false && v["epoch"].as_u64() > Some(0))
            .then_some(())
    });

    // What the guest had flushed before the stated time: a WROTE line is printed after
    // its write, and after the flush when its seq is a multiple of 16.
    let wrote = wrote.lock().unwrap().clone();
    let flushed = wrote
        .iter()
        .filter(|(at, _)| *at < after)
        .map(|(_, seq)| seq / 16 * 16)
        .max()
        .unwrap_or(0);
    let written = wrote.iter().map(|(_, s)| *s).max().unwrap_or(0);
    eprintln!(
        "the guest had written {written} blocks (last WROTE line) and flushed {flushed} before the stated time"
    );
    assert!(
        flushed >= 16,
        "nothing flushed before the stated time: the test checks nothing"
    );

    // A fresh VM at hokkaido on the promoted volume.
    let [ok, bad, ioerr, newer] =
        restart_check(&files, dir.path(), &hokkaido[1].nbd, &nonce, flushed);
    eprintln!("restarted at hokkaido: {ok} blocks ok ({newer} hold a write past the mark), {bad} bad, {ioerr} I/O errors");
    assert_eq!((bad, ioerr), (0, 0));
    assert_eq!(ok, VOLUME_BYTES / 4096);
    // The negative control: claiming a whole extra lap of the device was flushed, every
    // block must hold a write it never got.
    let lap = flushed + VOLUME_BYTES / 4096;
    let [_, bad, _, _] = restart_check(&files, dir.path(), &hokkaido[0].nbd, &nonce, lap);
    assert!(
        bad > 0,
        "the check cannot fail: it found no block missing writes that were never made"
    );
}
