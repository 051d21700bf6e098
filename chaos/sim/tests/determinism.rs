//! A seed replays exactly: the same seed gives the same trace hash (also with the
//! verbose trace on), different seeds give different traces.

use roamdisk_sim::{run_seed, SimConfig};

fn short() -> SimConfig {
    SimConfig {
        fault_phase_ms: 4_000,
        quiet_phase_ms: 6_000,
        ..SimConfig::default()
    }
}

#[test]
fn same_seed_same_trace() {
    for seed in [3, 17] {
        let a = run_seed(seed, &short()).expect("seed passes");
        let b = run_seed(seed, &short()).expect("seed passes");
        assert_eq!(
            a.trace_hash, b.trace_hash,
            "seed {seed} did not replay exactly"
        );
        assert_eq!(a.steps, b.steps);
        assert!(
            a.steps > 1000,
            "a run has thousands of events ({})",
            a.steps
        );
    }
}

#[test]
fn verbose_trace_does_not_change_the_run() {
    let quiet = run_seed(5, &short()).expect("seed passes");
    let verbose = run_seed(
        5,
        &SimConfig {
            trace: true,
            ..short()
        },
    )
    .expect("seed passes");
    assert_eq!(quiet.trace_hash, verbose.trace_hash);
}

#[test]
fn different_seeds_differ() {
    let hashes: Vec<String> = (0..4)
        .map(|seed| run_seed(seed, &short()).expect("seed passes").trace_hash)
        .collect();
    for i in 0..hashes.len() {
        for j in i + 1..hashes.len() {
            assert_ne!(
                hashes[i], hashes[j],
                "seeds {i} and {j} produced the same trace"
            );
        }
    }
}
