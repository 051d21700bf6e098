//! `roamdisk-sim`: runs the deterministic simulation from the command line.
//!
//! ```text
//! roamdisk-sim --seeds COUNT [--start FIRST] [--keep-going]   # a sweep
//! roamdisk-sim --seed N [--trace]                             # one seed
//! ```
//!
//! Knobs (for reproducing known issues and negative controls):
//! `--bug ack-before-sync|early-ack-alone|flush-early|stale-copy|trust-log|no-quarantine|lose-synced`
//! (the core's negative controls, `roamdisk_core::node::CoreBug`, or a disk that loses
//! synced data), `--no-quorum-check`, `--allow-removing-leader`, and
//! `--stress` (the `membership_stress` preset; give it first), `--power-stress`, and
//! `--site-loss` (a home site lost and failed over once per run, `SimConfig::site_loss`).
//! A sweep stops at the first failing seed unless `--keep-going` is given, in which
//! case it lists every failing seed.

use std::process::ExitCode;
use std::time::Instant;

use roamdisk_sim::config::bug_named;
use roamdisk_sim::{run_seed, SimConfig};

fn usage(why: &str) -> ExitCode {
    eprintln!("{why}");
    eprintln!(
        "usage: roamdisk-sim (--seeds COUNT [--start FIRST] [--keep-going] | --seed N [--trace])\n\
         \x20      [--bug NAME] [--no-quorum-check] [--stress|--power-stress|--site-loss]\n\
         \x20      [--allow-removing-leader]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut cfg = SimConfig::default();
    let (mut seeds, mut start, mut seed, mut keep_going) = (None, 0u64, None, false);
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> Result<u64, ExitCode> {
            args.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| usage(&format!("{name} needs a number")))
        };
        match arg.as_str() {
            "--seeds" => match number("--seeds") {
                Ok(v) => seeds = Some(v),
                Err(e) => return e,
            },
            "--start" => match number("--start") {
                Ok(v) => start = v,
                Err(e) => return e,
            },
            "--seed" => match number("--seed") {
                Ok(v) => seed = Some(v),
                Err(e) => return e,
            },
            "--trace" => cfg.trace = true,
            "--keep-going" => keep_going = true,
            "--no-quorum-check" => cfg.check_durable_quorum = false,
            "--allow-removing-leader" => cfg.allow_removing_leader = true,
            "--power-stress" => {
                cfg = SimConfig {
                    trace: cfg.trace,
                    ..SimConfig::power_loss_stress()
                }
            }
            "--stress" => {
                cfg = SimConfig {
                    trace: cfg.trace,
                    ..SimConfig::membership_stress()
                }
            }
            "--site-loss" => {
                cfg = SimConfig {
                    trace: cfg.trace,
                    ..SimConfig::site_loss()
                }
            }
            "--bug" => {
                match args.next().as_deref() {
                    Some("lose-synced") => cfg.lose_synced_data = true,
                    Some(name) if bug_named(name).is_some() => cfg.core_bug = bug_named(name),
                    _ => return usage(
                        "--bug needs ack-before-sync, early-ack-alone, flush-early, stale-copy, \
                         trust-log, no-quarantine or lose-synced",
                    ),
                }
            }
            other => return usage(&format!("unknown argument {other:?}")),
        }
    }
    let started = Instant::now();
    match (seed, seeds) {
        (Some(seed), None) => match run_seed(seed, &cfg) {
            Ok(o) => {
                println!(
                    "seed {seed} passed: {} events, {} ms simulated, trace {} ({:.2?})\n{:?}",
                    o.steps,
                    o.sim_ms,
                    o.trace_hash,
                    started.elapsed(),
                    o.stats
                );
                ExitCode::SUCCESS
            }
            Err(f) => {
                eprintln!("{f}");
                ExitCode::FAILURE
            }
        },
        (None, Some(count)) => {
            // Panics inside a run are reported as failures; their messages would only
            // repeat what the failure line says.
            std::panic::set_hook(Box::new(|_| {}));
            let (mut passed, mut failed, mut steps, mut acked) = (0u64, 0u64, 0u64, 0u64);
            for seed in start..start + count {
                match run_seed(seed, &cfg) {
                    Ok(o) => {
                        passed += 1;
                        steps += o.steps;
                        acked += o.stats.acknowledged;
                    }
                    Err(f) => {
                        failed += 1;
                        eprintln!("{f}");
                        if !keep_going {
                            break;
                        }
                    }
                }
            }
            println!(
                "seeds {start}..{}: {passed} passed, {failed} failed; {steps} events in passing \
                 seeds, {acked} client writes acknowledged ({:.2?})",
                start + count,
                started.elapsed()
            );
            if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        _ => usage("give --seeds or --seed"),
    }
}
