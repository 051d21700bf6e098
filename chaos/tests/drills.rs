//! Chaos drills in CI: a short smoke run must pass, and the negative control (nodes that
//! acknowledge writes they drop) must be caught. Real node processes, the WAN emulator,
//! NBD over loopback.

use std::path::Path;
use std::process::Command;

use roamdisk_playground::free_base_port;
use serde_json::Value;

fn drill(args: &[&str], out: &Path) -> (i32, Value) {
    drill_from(args, out, 23000)
}

/// As [`drill`], taking ports from `first_port` up (tests running at once must not probe
/// the same range: a range is only checked free until the nodes bind it).
fn drill_from(args: &[&str], out: &Path, first_port: u16) -> (i32, Value) {
    let base = free_base_port(9, first_port).to_string();
    let status = Command::new(env!("CARGO_BIN_EXE_roamdisk-chaos"))
        .arg("run")
        .args(args)
        .args(["--base-port", &base, "--out"])
        .arg(out)
        .status()
        .expect("run roamdisk-chaos");
    let report: Value = serde_json::from_slice(
        &std::fs::read(out.join("report.json")).expect("report.json written"),
    )
    .expect("report.json parses");
    (status.code().expect("exit code"), report)
}

#[test]
fn smoke_drill_passes_with_faults_injected_and_writes_verified() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smoke");
    let (code, r) = drill(
        &["--scenario", "smoke", "--seed", "1", "--duration", "45s"],
        &out,
    );
    let violations = r["violations"].as_array().expect("violations listed");
    assert!(
        violations.is_empty(),
        "violations: {}",
        serde_json::to_string_pretty(violations).unwrap()
    );
    assert_eq!(code, 0, "a clean run exits 0");
    assert_eq!(r["scenario"], "smoke");
    assert_eq!(r["seed"], 1);
    assert!(r["faults_injected"].as_u64().unwrap() >= 3, "{r}");
    assert!(r["writes_verified"].as_u64().unwrap() > 100, "{r}");
    assert_eq!(r["converged"], true);
    assert!(out.join("summary.md").exists());
    let png = std::fs::read(out.join("timeline.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // The history checks again offline with the same verdict.
    let check = Command::new(env!("CARGO_BIN_EXE_roamdisk-chaos"))
        .arg("check")
        .arg(&out)
        .status()
        .unwrap();
    assert!(check.success());
}

#[test]
fn negative_control_dropping_acknowledged_writes_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("negative");
    let (code, r) = drill(
        &[
            "--scenario",
            "node-crash",
            "--seed",
            "2",
            "--duration",
            "20s",
            "--negative-control",
        ],
        &out,
    );
    assert_eq!(r["negative_control"], "drop-acked-writes");
    let violations = r["violations"].as_array().unwrap();
    assert!(
        !violations.is_empty(),
        "the checker missed dropped writes: {r}"
    );
    assert!(
        violations
            .iter()
            .any(|v| v["kind"] == "stale_read" || v["kind"] == "lost_write"),
        "{violations:?}"
    );
    assert_eq!(code, 1, "a run with violations exits 1");
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(summary.contains("FAIL"));
}

/// The site-loss drill (seed 3: one site loss, the only fault of a 12 s schedule): the
/// home killed, forced failover, writes at the new home, the old
/// home back and fenced, its divergent writes discarded, a move back. Every failover the
/// runner executed is checked against what its plan stated.
#[test]
fn site_loss_drill_fails_over_and_back_within_the_stated_loss() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("site-loss");
    let (code, r) = drill_from(
        &[
            "--scenario",
            "site-loss",
            "--seed",
            "3",
            "--duration",
            "12s",
        ],
        &out,
        24500,
    );
    let violations = r["violations"].as_array().expect("violations listed");
    assert!(
        violations.is_empty(),
        "{}",
        serde_json::to_string_pretty(violations).unwrap()
    );
    assert_eq!(code, 0);
    let failovers = r["faults"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == "site_loss" && f["applied"] == true)
        .count();
    assert!(failovers >= 1, "{r}");
    let history = std::fs::read_to_string(out.join("history.jsonl")).unwrap();
    assert!(
        history.contains("\"type\":\"failover\""),
        "the failover is on record"
    );
}

/// The split-brain drill passes; with the nodes answering without their lease (the
/// negative control `no-lease`) the fenced home acknowledges after the new home
/// answered, and the checker must say so.
#[test]
fn split_brain_drill_passes_and_its_negative_control_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("split-brain");
    let (code, r) = drill_from(
        &[
            "--scenario",
            "split-brain",
            "--seed",
            "3",
            "--duration",
            "12s",
        ],
        &out,
        26500,
    );
    let violations = r["violations"].as_array().expect("violations listed");
    assert!(
        violations.is_empty(),
        "{}",
        serde_json::to_string_pretty(violations).unwrap()
    );
    assert_eq!(code, 0);
    let out = dir.path().join("split-brain-no-lease");
    let (code, r) = drill_from(
        &[
            "--scenario",
            "split-brain",
            "--seed",
            "3",
            "--duration",
            "12s",
            "--core-bug",
            "no-lease",
        ],
        &out,
        26500,
    );
    let violations = r["violations"].as_array().unwrap();
    assert!(
        violations
            .iter()
            .any(|v| v["kind"] == "acked_by_fenced_generation"),
        "the checker missed a home acknowledging after its failover: {r}"
    );
    assert_eq!(code, 1);
}
