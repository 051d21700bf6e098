//! Running a seed. A panic inside the core or raft-rs is reported like a violation,
//! with the seed and step.
//!
//! Environment variables read by the tests and the binary:
//! - `ROAMDISK_SIM_SEED=N`: run exactly seed N, with a verbose trace on stderr;
//! - `ROAMDISK_SIM_SEEDS=K` (default [`DEFAULT_SEEDS`]): how many seeds a sweep runs;
//! - `ROAMDISK_SIM_START=S` (default 0): the first seed of a sweep.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::checker::{violation, Invariant};
use crate::config::SimConfig;
use crate::sim::{Outcome, SimFailure, Simulation};

/// Seeds a sweep runs when `ROAMDISK_SIM_SEEDS` is not set (what CI runs).
pub const DEFAULT_SEEDS: u64 = 500;

/// Runs one seed. Panics (an assertion in the core, a raft-rs `fatal!`) are caught and
/// reported as a failure of that seed.
pub fn run_seed(seed: u64, cfg: &SimConfig) -> Result<Outcome, SimFailure> {
    let mut sim = Simulation::new(seed, cfg.clone());
    match catch_unwind(AssertUnwindSafe(|| sim.run())) {
        Ok(result) => result,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic".into());
            Err(SimFailure {
                seed,
                step: sim.step(),
                time: sim.now(),
                violation: violation(Invariant::CoreError, format!("panic: {msg}")),
                replay: cfg.replay_command(seed),
            })
        }
    }
}

/// Reads a numeric environment variable; `None` if unset, a panic if malformed (a
/// test configuration error).
pub fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}
