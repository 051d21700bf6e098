//! The seed sweep CI runs: `ROAMDISK_SIM_SEEDS` seeds (default 500) from
//! `ROAMDISK_SIM_START` (default 0), split in two tests so they use two cores. A failing
//! seed panics with its replay command. With `ROAMDISK_SIM_SEED=N`, exactly seed N runs
//! with a verbose trace on stderr.

use std::time::Instant;

use roamdisk_sim::runner::{env_u64, DEFAULT_SEEDS};
use roamdisk_sim::{run_seed, SimConfig};

const PARTS: u64 = 2;

fn sweep(part: u64) {
    if let Some(seed) = env_u64("ROAMDISK_SIM_SEED") {
        if part != 0 {
            return;
        }
        let cfg = SimConfig {
            trace: true,
            ..SimConfig::default()
        };
        match run_seed(seed, &cfg) {
            Ok(o) => eprintln!(
                "seed {seed} passed: {} events, {} ms simulated, trace {}\n{:?}",
                o.steps, o.sim_ms, o.trace_hash, o.stats
            ),
            Err(f) => panic!("{f}"),
        }
        return;
    }
    let count = env_u64("ROAMDISK_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    assert!(
        count >= PARTS,
        "ROAMDISK_SIM_SEEDS={count}: a sweep runs at least {PARTS} seeds (a sweep of none \
         would pass having checked nothing)"
    );
    let start = env_u64("ROAMDISK_SIM_START").unwrap_or(0);
    let cfg = SimConfig::default();
    let started = Instant::now();
    let (mut seeds, mut steps, mut steps_max, mut acked) = (0u64, 0u64, 0u64, 0u64);
    for seed in (start..start + count).filter(|s| s % PARTS == part) {
        match run_seed(seed, &cfg) {
            Ok(o) => {
                seeds += 1;
                steps += o.steps;
                steps_max = steps_max.max(o.steps);
                acked += o.stats.acknowledged;
            }
            Err(f) => panic!("{f}"),
        }
    }
    assert!(seeds > 0, "part {part} ran no seed");
    eprintln!(
        "part {part}/{PARTS}: {seeds} seeds passed, {steps} events (max {steps_max} per seed), \
         {acked} writes acknowledged, in {:.1?}",
        started.elapsed()
    );
}

#[test]
fn seeds_part_0() {
    sweep(0);
}

#[test]
fn seeds_part_1() {
    sweep(1);
}

/// `roamdisk-sim --seed 206 --stress` found a checkpoint that began before a metadata
/// snapshot was installed and ended after it: its batch wrote the older metadata state
/// over the snapshot's, and the restarted node skipped the entries between them (its
/// state differed at equal applied index). A stale checkpoint now keeps the metadata
/// state as it is.
#[test]
fn a_checkpoint_never_writes_an_older_metadata_state_over_a_snapshot_stress_seed_206() {
    if let Err(f) = run_seed(206, &SimConfig::membership_stress()) {
        panic!("{f}");
    }
}
