//! Issues of the core (and raft-rs 0.7 under it) that the simulator found and that the
//! default configuration steers around. Ignored: they pass while the issue exists, and
//! document how to replay it. When the core refuses a membership change that removes
//! its own leader (and makes a leader removed by leaving a joint configuration step
//! down), turn `allow_removing_leader` on by default and delete these.

use roamdisk_sim::{run_seed, Invariant, SimConfig};

fn removals() -> SimConfig {
    SimConfig {
        allow_removing_leader: true,
        ..SimConfig::default()
    }
}

/// The leader proposes its own removal (joint, explicit), then leaves the joint
/// configuration: raft-rs 0.7 keeps it leading although it is in no configuration,
/// and the next `maybe_commit` unwraps its missing progress.
#[test]
#[ignore = "documents a core/raft-rs issue"]
fn a_leader_that_removes_itself_panics_raft_rs() {
    let f = run_seed(269, &removals()).expect_err("seed 269 panics in raft-rs");
    assert_eq!(f.violation.invariant, Invariant::CoreError, "{f}");
    assert!(f.violation.detail.contains("panic"), "{f}");
}

/// Same change, another outcome: the removed leader keeps sending heartbeats (its
/// followers stay in its lease and never elect anyone) but drops every proposal, so
/// the group never accepts a write again.
#[test]
#[ignore = "documents a core/raft-rs issue"]
fn a_leader_that_removes_itself_blocks_the_group_forever() {
    let f = run_seed(85, &removals()).expect_err("seed 85 loses liveness");
    assert_eq!(f.violation.invariant, Invariant::Liveness, "{f}");
}
