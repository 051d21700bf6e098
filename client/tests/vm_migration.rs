//! A real VM live-migrates between sites and keeps its disk.
//!
//! QEMU (TCG) boots a tiny Linux guest (Debian kernel, busybox initramfs; built by
//! `.ci/fetch-vm`) whose virtio-blk disk is the volume's NBD export at an osaka node. A
//! second QEMU waits with `-incoming` on the export of a hokkaido node. The guest
//! (`.ci/vm/guest.c`) writes numbered 4 KiB blocks with O_DIRECT and a flush every 16
//! writes. Over QMP the VM migrates to the hokkaido QEMU; right after the switchover the
//! guest re-reads every block written so far (through the hokkaido node, not yet the
//! home: `CHECK ok=<n> bad=<m>`); then `roamdisk volume move` moves the volume's home to
//! hokkaido while the guest keeps writing; then the guest re-reads every block it wrote
//! and reports `VERIFY ok=<n> bad=<m>`. Both: 0 bad.
//!
//! The negative control runs the same flow with the hokkaido QEMU on a deliberately stale
//! export (qemu-nbd serving a copy of the volume taken before the guest wrote): the guest
//! must report bad blocks, which shows the check can fail.
//!
//! Reported: QEMU's migration downtime (`query-migrate`), the longest pause between two
//! completed guest writes while the volume moves (the storage handoff pause as the guest
//! sees it), per-phase write rates. With `ROAMDISK_RECORD=1` a row per run is appended
//! to `benches/results/vm-migration.md`.
//!
//! Needs the VM files from `.ci/fetch-vm` (in `$ROAMDISK_VM_DIR`, default
//! `~/.cache/roamdisk-vm`); without them the tests print why and pass, unless
//! `ROAMDISK_REQUIRE_VM=1`. Synchronisation is by condition (console lines, QMP events)
//! with deadlines, never by sleeping.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use roamdisk_client::playground::free_base_port;
use roamdisk_client::playground::Manifest;
use serde_json::{json, Value};

#[path = "common/vm.rs"]
mod vm;
use vm::*;

/// Writes the guest completes before the migration, and in each phase after it.
const WRITES_BEFORE_MIGRATION: u64 = 300;
const WRITES_PER_PHASE: u64 = 50;

#[derive(Debug)]
struct Check {
    ok: u64,
    bad: u64,
    ms: f64,
}

#[derive(Debug)]
struct Report {
    stale: bool,
    wan: String,
    downtime_ms: u64,
    /// Host time from the STOP event at A to the RESUME event at B.
    stop_to_resume_ms: f64,
    migration_ms: u64,
    migrated_mib: f64,
    move_s: f64,
    phases: Vec<Phase>,
    /// The check right after the switchover, before the move.
    check: Check,
    ok: u64,
    bad: u64,
    ioerr: u64,
    writes: u64,
    max_pause_ms: f64,
    total_s: f64,
}

impl Report {
    fn phase(&self, name: &str) -> &Phase {
        self.phases.iter().find(|p| p.name == name).unwrap()
    }
}

fn run(stale: bool, first_port: u16) -> Option<Report> {
    let files = vm_files()?;
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port(6, first_port);
    let wan = "sinet5";
    let pg_dir = dir.path().join("playground");
    let child = Command::new(env!("CARGO_BIN_EXE_roamdisk"))
        .args(["playground", "--dir"])
        .arg(&pg_dir)
        .args(["--sites", "osaka,hokkaido", "--nodes-per-site", "3"])
        .args(["--volume", "vm:64M", "--wan", wan])
        .args(["--base-port", &base.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut pg = Playground(child);
    let deadline = Instant::now() + STEP;
    while !pg_dir.join("playground.json").exists() {
        if let Ok(Some(st)) = pg.0.try_wait() {
            panic!("the playground exited ({st})");
        }
        assert!(Instant::now() < deadline, "the playground did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = Manifest::load(&pg_dir).unwrap();
    let osaka = &m.sites[0].nodes[0];
    let hokkaido = &m.sites[1].nodes[0];
    assert_eq!(
        (m.sites[0].name.as_str(), m.sites[1].name.as_str()),
        ("osaka", "hokkaido")
    );

    // Site B's export: the hokkaido node's, or a stale copy of the volume taken now,
    // before the guest writes anything.
    let mut _stale_server = None;
    let b_nbd = if stale {
        let copy = dir.path().join("stale.raw");
        let st = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(format!("nbd://{}/vm", osaka.nbd))
            .arg(&copy)
            .status()
            .unwrap();
        assert!(st.success(), "qemu-img convert: {st}");
        let port = free_port(base + 700);
        _stale_server = Some(start_qemu_nbd(
            &copy,
            port,
            &dir.path().join("qemu-nbd.pid"),
        ));
        format!("127.0.0.1:{port}")
    } else {
        hokkaido.nbd.clone()
    };
    let mig_port = free_port(base + 710);

    let mut a = start_vm("A", &files, dir.path(), &osaka.nbd, None);
    let mut b = start_vm("B", &files, dir.path(), &b_nbd, Some(mig_port));
    let b_what = if stale {
        "a STALE qemu-nbd copy".to_owned()
    } else {
        format!("node {} (hokkaido)", hokkaido.id)
    };
    eprintln!(
        "A: node {} (osaka) nbd://{}/vm; B: {b_what} nbd://{b_nbd}/vm, incoming tcp:127.0.0.1:{mig_port}",
        osaka.id, osaka.nbd,
    );

    // The guest boots on A and writes at home.
    a.console.wait("the guest to start writing", BOOT, |l| {
        l.starts_with("GUEST start").then_some(())
    });
    a.console.wait_writes(WRITES_BEFORE_MIGRATION);
    let mut phases = vec![a.console.phase("migration", "start")];

    // Live migration A -> B.
    a.qmp.execute(
        "migrate-set-capabilities",
        json!({ "capabilities": [{ "capability": "events", "state": true }] }),
    );
    a.qmp.execute(
        "migrate",
        json!({ "uri": format!("tcp:127.0.0.1:{mig_port}") }),
    );
    let mut stopped_at = None;
    let status = a.qmp.wait_event("the migration to end", STEP, |ev| {
        if ev["event"] == "STOP" {
            stopped_at = Some(event_time(ev));
        }
        let s = ev["data"]["status"].as_str()?;
        (ev["event"] == "MIGRATION" && matches!(s, "completed" | "failed" | "cancelled"))
            .then(|| s.to_owned())
    });
    assert_eq!(
        status,
        "completed",
        "migration: {}",
        a.qmp.execute("query-migrate", json!({}))
    );
    // QEMU announces `completed` just before it fills in the times: poll for them.
    let deadline = Instant::now() + STEP;
    let info = loop {
        let info = a.qmp.execute("query-migrate", json!({}));
        if info["total-time"].as_u64().unwrap_or(0) > 0 {
            break info;
        }
        assert!(
            Instant::now() < deadline,
            "query-migrate has no times: {info:#}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let downtime_ms = info["downtime"].as_u64().unwrap();
    let migration_ms = info["total-time"].as_u64().unwrap();
    let migrated_mib = info["ram"]["transferred"].as_f64().unwrap_or(0.0) / (1 << 20) as f64;
    let resumed_at = b.qmp.wait_event("B to resume", STEP, |ev| {
        (ev["event"] == "RESUME").then(|| event_time(ev))
    });
    let stop_to_resume_ms = (resumed_at - stopped_at.expect("a STOP event on A")) * 1000.0;
    let running = b.qmp.execute("query-status", json!({}));
    assert_eq!(running["status"], "running", "{running}");
    let writes_on_a = a.console.writes;
    // The source stays paused for good now: stop it.
    drop(a);

    // The guest runs on B; its writes go to a hokkaido node, which forwards them home.
    b.console.wait_writes(writes_on_a + 1);
    phases.push(b.console.phase("forwarded", "migration"));
    // Right after the switchover, B reads back everything through the hokkaido node,
    // which is not the home yet: reads there must see every write made at osaka.
    b.console.send("CHECK");
    let check_line = b
        .console
        .wait("the guest's check after the switchover", STEP, |l| {
            l.starts_with("CHECK ").then(|| l.to_owned())
        });
    let n = b.console.writes;
    b.console.wait_writes(n + WRITES_PER_PHASE);
    phases.push(b.console.phase("move", "forwarded"));

    // The home moves to hokkaido under the guest's writes.
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_roamdisk"))
        .args([
            "--cluster",
            &hokkaido.admin,
            "--json",
            "volume",
            "move",
            "vm",
        ])
        .args(["--to", "hokkaido", "--wait", "--timeout-secs", "300"])
        .output()
        .unwrap();
    let move_s = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "volume move: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let moved: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(moved["home_site"], "hokkaido", "{moved:#}");
    phases.push(b.console.phase("moved", "move"));
    let n = b.console.writes;
    b.console.wait_writes(n + WRITES_PER_PHASE);

    // Stop writing, re-read everything.
    b.console.send("VERIFY");
    let line = b.console.wait("the guest's verification", STEP, |l| {
        if l.starts_with("PHASE_END ") {
            phases.push(Phase::parse(l));
        }
        l.starts_with("VERIFY ").then(|| l.to_owned())
    });
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(st) = b.proc.0.try_wait().unwrap() {
            assert!(st.success(), "QEMU B exited with {st}");
            break;
        }
        assert!(Instant::now() < deadline, "the guest did not power off");
        // Waiting for the process to exit after the guest said it powers off.
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = Report {
        stale,
        wan: wan.to_owned(),
        downtime_ms,
        stop_to_resume_ms,
        migration_ms,
        migrated_mib,
        move_s,
        phases,
        check: Check {
            ok: num(&check_line, "ok") as u64,
            bad: num(&check_line, "bad") as u64,
            ms: num(&check_line, "ms"),
        },
        ok: num(&line, "ok") as u64,
        bad: num(&line, "bad") as u64,
        ioerr: num(&line, "ioerr") as u64,
        writes: num(&line, "writes") as u64,
        max_pause_ms: num(&line, "max_pause_ms"),
        total_s: started.elapsed().as_secs_f64(),
    };
    print_report(&report, &b.console.ioerr);
    drop(b);
    drop(pg);
    Some(report)
}

fn print_report(r: &Report, ioerr: &[String]) {
    let kind = if r.stale {
        "negative control (stale site-B export)"
    } else {
        "live migration"
    };
    println!("vm-migration, {kind}, WAN {}:", r.wan);
    println!(
        "  QEMU migration: downtime {} ms (query-migrate), {:.1} ms from STOP at A to RESUME at B, total {} ms, {:.1} MiB sent",
        r.downtime_ms, r.stop_to_resume_ms, r.migration_ms, r.migrated_mib
    );
    println!(
        "  volume move osaka -> hokkaido: {:.2} s; storage handoff pause (longest gap between guest writes during the move): {:.1} ms",
        r.move_s,
        r.phase("move").max_pause_ms
    );
    println!(
        "  check at B right after the switchover (before the move): ok={} bad={} in {:.0} ms",
        r.check.ok, r.check.bad, r.check.ms
    );
    for p in &r.phases {
        println!(
            "  phase {:<10} writes {:>6}  {:>7.1} writes/s  longest gap {:>7.1} ms",
            p.name,
            p.writes,
            p.rate(),
            p.max_pause_ms
        );
    }
    println!(
        "  guest: VERIFY ok={} bad={} ioerr={} writes={} longest gap overall {:.1} ms; test took {:.0} s",
        r.ok, r.bad, r.ioerr, r.writes, r.max_pause_ms, r.total_s
    );
    for l in ioerr {
        println!("  {l}");
    }
}

/// With ROAMDISK_RECORD=1, appends a row to benches/results/vm-migration.md.
fn record(r: &Report) {
    if std::env::var("ROAMDISK_RECORD").as_deref() != Ok("1") {
        return;
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/results/vm-migration.md");
    let new = !path.exists();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    if new {
        writeln!(
            f,
            "# VM live migration across sites (client/tests/vm_migration.rs)\n\n\
             QEMU TCG guest (Debian kernel, busybox initramfs) writing 4 KiB O_DIRECT blocks with a flush every 16; \
             migrated osaka -> hokkaido over QMP; the guest re-reads every block at once (check after switchover, \
             through a hokkaido node that is not the home yet), then `volume move` to hokkaido; then the guest re-reads \
             every block (verify). \
             Downtime: QEMU's `query-migrate` (source side); STOP→RESUME: host time from the source's STOP event to \
             the destination's RESUME event. Handoff pause: the guest's longest gap between two completed writes \
             while the volume moves. Rates are the guest's writes/s (TCG, 2 cores shared with 6 nodes).\n\n\
             | date (UTC) | run | WAN | downtime ms | STOP→RESUME ms | migration ms | move s | handoff pause ms | writes/s home | writes/s forwarded | writes/s moved | check after switchover ok/bad | verify ok | bad |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        )
        .unwrap();
    }
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    writeln!(
        f,
        "| {date} | {} | {} | {} | {:.0} | {} | {:.2} | {:.1} | {:.0} | {:.0} | {:.0} | {}/{} | {} | {} |",
        if r.stale { "stale B (negative control)" } else { "migration + move" },
        r.wan,
        r.downtime_ms,
        r.stop_to_resume_ms,
        r.migration_ms,
        r.move_s,
        r.phase("move").max_pause_ms,
        r.phase("start").rate(),
        r.phase("forwarded").rate(),
        r.phase("moved").rate(),
        r.check.ok,
        r.check.bad,
        r.ok,
        r.bad
    )
    .unwrap();
}

#[test]
fn a_vm_live_migrates_to_another_site_and_reads_back_every_block_it_wrote() {
    let Some(r) = run(false, 23000) else { return };
    record(&r);
    assert_eq!(r.ioerr, 0, "the guest saw I/O errors: {r:#?}");
    assert_eq!(
        r.check.bad, 0,
        "bad blocks right after the switchover: {r:#?}"
    );
    assert!(r.check.ok > WRITES_BEFORE_MIGRATION, "{r:#?}");
    assert_eq!(r.bad, 0, "the guest read back bad blocks: {r:#?}");
    assert!(r.ok > WRITES_BEFORE_MIGRATION, "{r:#?}");
    // Every block written was checked: the disk is 16384 blocks of 4 KiB.
    assert_eq!(r.ok, r.writes.min(16384), "{r:#?}");
}

#[test]
fn the_check_fails_when_site_b_serves_a_stale_copy() {
    let Some(r) = run(true, 29500) else { return };
    record(&r);
    // The blocks written on A before the migration are missing on B's stale export
    // (all of them unless the guest went round the disk and wrote them again on B).
    let on_a = r.phase("start").writes;
    assert!(
        r.check.bad > 0,
        "the stale export should fail the check: {r:#?}"
    );
    assert!(
        r.bad > 0,
        "the stale export should fail the verification: {r:#?}"
    );
    if r.writes < 16384 {
        assert!(
            r.bad >= on_a,
            "every block written on A should be bad: {r:#?}"
        );
    }
    assert!(r.ok > 0, "the writes made on B read back: {r:#?}");
}
