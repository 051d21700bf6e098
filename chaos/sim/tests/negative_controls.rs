//! Negative controls: a driver that breaks one rule of the core's Ready order or crash
//! rule must be caught by an invariant within a bounded number of seeds. If one of
//! these fails, the checker has gone blind.

use roamdisk_sim::{run_seed, DriverBug, Invariant, SimConfig};

/// Seeds tried per broken driver before the control is declared blind.
const SEEDS_MAX: u64 = 40;

/// Runs seeds with `bug` until one fails; returns the failure.
fn first_failure(bug: DriverBug) -> roamdisk_sim::SimFailure {
    first_failure_with(&SimConfig {
        driver_bug: Some(bug),
        ..SimConfig::default()
    })
}

fn first_failure_with(cfg: &SimConfig) -> roamdisk_sim::SimFailure {
    for seed in 0..SEEDS_MAX {
        if let Err(f) = run_seed(seed, cfg) {
            eprintln!("caught: {f}");
            return f;
        }
    }
    panic!(
        "{:?} was not caught in {SEEDS_MAX} seeds: the checker is blind to it",
        cfg.driver_bug
    );
}

fn assert_safety(f: &roamdisk_sim::SimFailure, allowed: &[Invariant]) {
    assert!(
        allowed.contains(&f.violation.invariant),
        "caught, but by an unexpected check: {f}"
    );
}

#[test]
fn acknowledging_before_the_sync_is_caught() {
    let f = first_failure(DriverBug::AckBeforeSync);
    assert_safety(
        &f,
        &[
            Invariant::CommittedEntryStable,
            Invariant::CommittedEntryOnQuorum,
            Invariant::SingleLeaderPerTerm,
            Invariant::ReplicaStateAgrees,
            Invariant::AcknowledgedWriteKept,
        ],
    );
}

#[test]
fn applying_before_commit_is_caught() {
    let f = first_failure(DriverBug::ApplyBeforeCommit);
    assert_safety(
        &f,
        &[
            Invariant::CommittedEntryStable,
            Invariant::ReplicaStateAgrees,
        ],
    );
}

#[test]
fn losing_synced_data_on_power_loss_is_caught() {
    let f = first_failure(DriverBug::LoseSyncedDataOnPowerLoss);
    assert_safety(
        &f,
        &[
            Invariant::CommittedEntryStable,
            Invariant::CommittedEntryOnQuorum,
            Invariant::SingleLeaderPerTerm,
            Invariant::ReplicaStateAgrees,
            Invariant::AcknowledgedWriteKept,
            Invariant::GenerationMonotone,
        ],
    );
}

/// Without the durable-quorum check, acknowledgements sent before the sync must still
/// be caught by what they lead to: a replica that lost entries it acknowledged, two
/// leaders in a term, or a committed entry replaced.
#[test]
fn acknowledging_before_the_sync_is_caught_by_its_consequences() {
    let cfg = SimConfig {
        driver_bug: Some(DriverBug::AckBeforeSync),
        check_durable_quorum: false,
        ..SimConfig::default()
    };
    let f = first_failure_with(&cfg);
    assert_safety(
        &f,
        &[
            Invariant::CommittedEntryStable,
            Invariant::SingleLeaderPerTerm,
            Invariant::ReplicaStateAgrees,
            Invariant::AcknowledgedWriteKept,
        ],
    );
}

/// A driver that reopens its store after a process crash without syncing it: what the
/// crash left was written, not synced, but raft-rs takes it as persisted and
/// acknowledges it again without a new write. The storage node's `Store::open` does
/// this today; the simulator's driver syncs (`SimConfig::sync_on_restart`).
#[test]
fn restarting_without_a_sync_is_caught() {
    let cfg = SimConfig {
        sync_on_restart: false,
        crash_in_sync_per_million: 1_000_000,
        ..SimConfig::membership_stress()
    };
    const RESTART_SEEDS_MAX: u64 = 150;
    for seed in 0..RESTART_SEEDS_MAX {
        if let Err(f) = run_seed(seed, &cfg) {
            eprintln!("caught: {f}");
            assert_eq!(
                f.violation.invariant,
                Invariant::CommittedEntryOnQuorum,
                "{f}"
            );
            return;
        }
    }
    panic!("a restart without a sync was not caught in {RESTART_SEEDS_MAX} seeds");
}
