//! Negative controls: the node core with one of its rules broken on purpose
//! (`roamdisk_core::node::CoreBug`), or a disk that loses what it synced, must be caught
//! by an invariant within a bounded number of seeds. If one of these fails, the checker
//! has gone blind to that rule.
//!
//! The quarantine after a reboot has its negative control in the core's own
//! deterministic test (`a_rebooted_voter_does_not_help_elect_a_leader_without_writes_it_forgot`):
//! the schedule it needs (a power loss of the one follower that wrote an answered write,
//! while the leader is cut off) is too rare for random seeds to meet in a test's time;
//! so has the rule that a follower reports writes only in a synced term
//! (`a_follower_reports_writes_only_in_a_term_it_has_synced`).

use roamdisk_sim::{run_seed, CoreBug, Invariant, SimConfig};

/// Seeds tried per broken rule before the control is declared blind.
const SEEDS_MAX: u64 = 40;

/// Runs seeds with `cfg` until one fails; returns the failure.
fn first_failure_with(cfg: &SimConfig) -> roamdisk_sim::SimFailure {
    for seed in 0..SEEDS_MAX {
        if let Err(f) = run_seed(seed, cfg) {
            eprintln!("caught: {f}");
            return f;
        }
    }
    panic!(
        "{:?} (lose synced data: {}) was not caught in {SEEDS_MAX} seeds: the checker is \
         blind to it",
        cfg.core_bug, cfg.lose_synced_data
    );
}

fn first_failure(bug: CoreBug) -> roamdisk_sim::SimFailure {
    first_failure_with(&SimConfig {
        core_bug: Some(bug),
        ..SimConfig::default()
    })
}

fn assert_caught_by(f: &roamdisk_sim::SimFailure, allowed: &[Invariant]) {
    assert!(
        allowed.contains(&f.violation.invariant),
        "caught, but by an unexpected check: {f}"
    );
    assert!(
        f.replay.contains("--bug"),
        "the replay command names the bug: {}",
        f.replay
    );
}

#[test]
fn acknowledging_before_the_sync_is_caught() {
    let f = first_failure(CoreBug::AckBeforeSync);
    assert_caught_by(
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

/// Without the durable-quorum check, acknowledgements sent before the sync must still
/// be caught by what they lead to: a replica that lost entries it acknowledged, two
/// leaders in a term, or a committed entry replaced.
#[test]
fn acknowledging_before_the_sync_is_caught_by_its_consequences() {
    let f = first_failure_with(&SimConfig {
        core_bug: Some(CoreBug::AckBeforeSync),
        check_durable_quorum: false,
        ..SimConfig::default()
    });
    assert_caught_by(
        &f,
        &[
            Invariant::CommittedEntryStable,
            Invariant::SingleLeaderPerTerm,
            Invariant::ReplicaStateAgrees,
            Invariant::AcknowledgedWriteKept,
            Invariant::ReadSeesAcknowledgedWrites,
        ],
    );
}

/// A write answered early once the leader alone has written it (no quorum): a new leader
/// elected without it drops it.
#[test]
fn answering_a_write_only_the_leader_wrote_is_caught() {
    let f = first_failure(CoreBug::EarlyAckOnLeaderWrite);
    assert_caught_by(
        &f,
        &[
            Invariant::AcknowledgedWriteKept,
            Invariant::ReadSeesAcknowledgedWrites,
        ],
    );
}

/// A flush answered before the writes it covers are committed: they are not durable on
/// a quorum when the client is told they are.
#[test]
fn a_flush_returning_before_the_commit_is_caught() {
    let f = first_failure(CoreBug::FlushBeforeCommit);
    assert_caught_by(&f, &[Invariant::AcknowledgedWriteKept]);
}

/// A block copy made for an earlier recovery point taken as the copy for the current one
/// (a second snapshot arrived while it ran): blocks it copied before the new point miss
/// writes the replay no longer covers. What the chaos drills found as stale reads after
/// moves, on the storage node as it was before the core refused such copies.
#[test]
fn accepting_a_block_copy_for_an_earlier_point_is_caught() {
    let f = first_failure(CoreBug::AcceptStaleCatchUp);
    assert_caught_by(
        &f,
        &[
            Invariant::ReplicaStateAgrees,
            Invariant::ReadSeesAcknowledgedWrites,
            Invariant::Liveness,
        ],
    );
}

/// The old recovery after a failed fsync (only a sync at open, which writes nothing the
/// failed one left clean): the node acknowledges entries its disk does not have, and a
/// power loss takes them.
#[test]
fn trusting_the_log_after_a_failed_sync_is_caught() {
    let f = first_failure(CoreBug::TrustLogAfterFailedSync);
    assert_caught_by(
        &f,
        &[
            Invariant::CommittedEntryOnQuorum,
            Invariant::CommittedEntryStable,
            Invariant::AcknowledgedWriteKept,
            Invariant::CoreError,
        ],
    );
}

#[test]
fn losing_synced_data_on_power_loss_is_caught() {
    let f = first_failure_with(&SimConfig {
        lose_synced_data: true,
        ..SimConfig::default()
    });
    assert_caught_by(
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

/// A quarantine that ended on the leader's first heartbeat, before the rebooted voter's
/// log held the write it had forgotten: the leader died, and the rebooted voter helped
/// elect one without the write. The seed sweep found it (seed 1624, 1 of 2,000, before
/// the lease changed every seed's schedule; the same search over 0..1,200 on the code
/// with leases found seed 1185); the shipped rule waits until the voter's synced log
/// holds the leader's log end.
#[test]
fn ending_a_quarantine_on_the_leaders_first_message_is_caught_by_seed_886() {
    // Seed 1185 of the default sweep found it; once copies waited for their recovery
    // record to sync (the site-loss work), that schedule no longer arose, and a search
    // of the power-loss preset found seed 886 (3,000 default seeds did not).
    let broken = SimConfig {
        core_bug: Some(CoreBug::QuarantineEndsOnLeaderHeard),
        ..SimConfig::power_loss_stress()
    };
    let f = run_seed(886, &broken).expect_err("the old rule loses a write at seed 886");
    assert_caught_by(
        &f,
        &[
            Invariant::AcknowledgedWriteKept,
            Invariant::ReadSeesAcknowledgedWrites,
        ],
    );
    run_seed(886, &SimConfig::power_loss_stress()).expect("the shipped rule keeps it");
}

#[test]
fn answering_without_the_lease_is_caught_by_the_site_loss_runs() {
    // The old home answers after the failover while it is cut off (or back, not yet
    // fenced): the new epoch has answered by then.
    let f = first_failure_with(&SimConfig {
        core_bug: Some(CoreBug::IgnoreLease),
        ..SimConfig::site_loss()
    });
    assert_caught_by(
        &f,
        &[
            Invariant::Fenced,
            Invariant::ReadSeesAcknowledgedWrites,
            Invariant::AcknowledgedWriteKept,
        ],
    );
}
