//! `roamdisk-chaos` (also `roamdisk chaos ...`): chaos drills on a real local cluster.
//!
//! - `list`: the scenarios and their faults;
//! - `run --scenario NAME --seed N --duration D --out DIR [--negative-control]`: one run,
//!   exit status 0 only when the checker found no violation;
//! - `soak --hours H --out DIR`: runs scenarios one after another with successive seeds
//!   until the time is up, and sums them up in `DIR/soak.json`;
//! - `check DIR`: checks a run's `history.jsonl` again, offline.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use roamdisk_chaos::history::History;
use roamdisk_chaos::runner::{self, RunOptions};
use roamdisk_chaos::scenario::{self, SCENARIOS};

#[derive(Parser, Debug)]
#[command(name = "roamdisk chaos", version, about = "roamdisk chaos drills")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Debug, Clone)]
struct Common {
    /// First port of the cluster (see `roamdisk playground --help`); stays below 32768.
    #[arg(long, default_value_t = 21000)]
    base_port: u16,
    /// roamdisk-node binary (default: next to this one).
    #[arg(long)]
    node_bin: Option<PathBuf>,
    /// NBD connections of the workload.
    #[arg(long, default_value_t = 4)]
    connections: u32,
    /// Size of the volume, MiB.
    #[arg(long, default_value_t = 64)]
    volume_mib: u64,
    /// 4 KiB blocks the workload writes and reads (the first ones of the volume).
    #[arg(long, default_value_t = 2048)]
    blocks: u64,
    /// Caps every link between two sites at this many MiB/s (each direction), as soon as
    /// the cluster is up and again after every fault that changes links: with slow links
    /// the workload writes faster than the WAN ships, and learners lag far behind (what a
    /// fast machine shows with the default profile).
    #[arg(long)]
    link_mib_per_sec: Option<u64>,
    /// Run the nodes with a deliberately broken core rule (a negative control, e.g.
    /// `no-lease`: answer without the lease): the run must fail.
    #[arg(long)]
    core_bug: Option<String>,
    /// Less output.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List the scenarios.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Run one scenario; exit status 0 only when nothing acknowledged was lost.
    Run {
        #[arg(long)]
        scenario: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Seconds of faults and workload (default: the scenario's).
        #[arg(long, value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Directory for the report, the history and the cluster's data.
        #[arg(long)]
        out: PathBuf,
        /// Make the nodes drop 1 acknowledged write in 16 on purpose: the run must fail.
        #[arg(long)]
        negative_control: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Run scenarios back to back with successive seeds until the time is up.
    Soak {
        #[arg(long, default_value_t = 1.0)]
        hours: f64,
        /// Scenarios to cycle through (default: every one but `smoke`).
        #[arg(long, value_delimiter = ',')]
        scenarios: Vec<String>,
        #[arg(long, default_value_t = 1)]
        first_seed: u64,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Check a run directory's history again.
    Check { dir: PathBuf },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = n
        .parse()
        .map_err(|_| format!("bad duration {s:?} (e.g. 90s, 5m)"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("bad duration unit in {s:?}: use s, m or h")),
    };
    if secs == 0 {
        return Err("duration must be positive".into());
    }
    Ok(Duration::from_secs(secs))
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn node_bin(common: &Common) -> Result<PathBuf> {
    let p = match &common.node_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("roamdisk-node"),
    };
    if !p.exists() {
        bail!(
            "{} not found: build it with `cargo build --release --bins`",
            p.display()
        );
    }
    Ok(p)
}

fn options(
    name: &str,
    seed: u64,
    duration: Option<Duration>,
    out: PathBuf,
    negative_control: bool,
    common: &Common,
) -> Result<RunOptions> {
    let scenario = scenario::find(name).with_context(|| {
        format!(
            "unknown scenario {name:?}; known: {}",
            SCENARIOS
                .iter()
                .map(|s| s.name)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let cold = runner::COLD_BLOCKS;
    if common.blocks == 0 || (common.blocks + cold) * 4096 > common.volume_mib << 20 {
        bail!("--blocks must be between 1 and the volume's size in 4 KiB blocks minus {cold}");
    }
    if common.connections == 0 || common.connections > 64 {
        bail!("--connections must be in 1..=64");
    }
    let duration = duration.unwrap_or(Duration::from_secs(scenario.default_duration_s));
    if common.link_mib_per_sec == Some(0) {
        bail!("--link-mib-per-sec must be at least 1");
    }
    let command = format!(
        "roamdisk chaos run --scenario {name} --seed {seed} --duration {}s --out {}{}{}",
        duration.as_secs(),
        out.display(),
        if negative_control {
            " --negative-control"
        } else {
            ""
        },
        common
            .link_mib_per_sec
            .map(|m| format!(" --link-mib-per-sec {m}"))
            .unwrap_or_default()
    ) + &common
        .core_bug
        .as_ref()
        .map(|b| format!(" --core-bug {b}"))
        .unwrap_or_default();
    if let Some(b) = &common.core_bug {
        if roamdisk_core::node::CoreBug::named(b).is_none() {
            bail!("--core-bug {b:?}: no such core bug");
        }
    }
    Ok(RunOptions {
        scenario,
        seed,
        duration,
        out,
        base_port: common.base_port,
        node_bin: node_bin(common)?,
        negative_control,
        connections: common.connections,
        volume_size: common.volume_mib << 20,
        blocks: common.blocks,
        link_bandwidth: common.link_mib_per_sec.map(|m| m << 20),
        core_bug: common.core_bug.clone(),
        command,
        verbose: !common.quiet,
    })
}

fn real_main() -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::List { json } => {
            if json {
                println!("{}", serde_json::to_string_pretty(SCENARIOS)?);
                return Ok(ExitCode::SUCCESS);
            }
            for s in SCENARIOS {
                println!(
                    "{:<12} {} sites x {} nodes, {}, {} s: {}",
                    s.name,
                    s.sites.len(),
                    s.nodes_per_site,
                    s.wan,
                    s.default_duration_s,
                    s.about
                );
                let faults: Vec<&str> = s.faults.iter().map(|(k, _)| k.name()).collect();
                println!("{:<12} faults: {}", "", faults.join(", "));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            scenario,
            seed,
            duration,
            out,
            negative_control,
            common,
        } => {
            let opts = options(&scenario, seed, duration, out, negative_control, &common)?;
            let report = runner::run(&opts)?;
            println!(
                "{} scenario {} seed {}: {} faults injected, {} writes verified, {} violations \
                 (report: {})",
                if report.passed { "PASS" } else { "FAIL" },
                report.scenario,
                report.seed,
                report.faults_injected,
                report.writes_verified,
                report.violations.len(),
                opts.out.join("summary.md").display()
            );
            for v in report.violations.iter().take(10) {
                println!("  {}: {}", v.kind, v.detail);
            }
            Ok(if report.passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Soak {
            hours,
            scenarios,
            first_seed,
            out,
            common,
        } => {
            let names: Vec<String> = if scenarios.is_empty() {
                SCENARIOS
                    .iter()
                    .filter(|s| s.name != "smoke")
                    .map(|s| s.name.to_owned())
                    .collect()
            } else {
                scenarios
            };
            for n in &names {
                if scenario::find(n).is_none() {
                    bail!("unknown scenario {n:?}");
                }
            }
            if !(hours > 0.0) {
                bail!("--hours must be positive");
            }
            let deadline = Instant::now() + Duration::from_secs_f64(hours * 3600.0);
            let mut runs = Vec::new();
            let mut seed = first_seed;
            let mut totals = (0u64, 0u64, 0u64, 0u64);
            while Instant::now() < deadline {
                let name = &names[runs.len() % names.len()];
                let dir = out.join(format!("{:04}-{name}-{seed}", runs.len()));
                let opts = options(name, seed, None, dir.clone(), false, &common)?;
                let r = runner::run(&opts);
                let entry = match r {
                    Ok(rep) => {
                        totals.0 += 1;
                        totals.1 += rep.faults_injected;
                        totals.2 += rep.writes_verified;
                        totals.3 += rep.violations.len() as u64;
                        serde_json::json!({
                            "scenario": name, "seed": seed, "dir": dir,
                            "passed": rep.passed, "faults_injected": rep.faults_injected,
                            "writes_verified": rep.writes_verified,
                            "violations": rep.violations.len(),
                        })
                    }
                    Err(e) => serde_json::json!({
                        "scenario": name, "seed": seed, "dir": dir, "error": format!("{e:#}"),
                    }),
                };
                println!("{entry}");
                runs.push(entry);
                seed += 1;
                let summary = serde_json::json!({
                    "schedules_run": totals.0,
                    "faults_injected": totals.1,
                    "writes_verified": totals.2,
                    "violations": totals.3,
                    "runs": runs,
                });
                std::fs::create_dir_all(&out)?;
                std::fs::write(out.join("soak.json"), serde_json::to_vec_pretty(&summary)?)?;
            }
            println!(
                "soak: {} schedules, {} faults injected, {} writes verified, {} violations",
                totals.0, totals.1, totals.2, totals.3
            );
            let errors = runs.iter().filter(|r| r.get("error").is_some()).count();
            Ok(if totals.3 == 0 && errors == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Check { dir } => {
            let text = std::fs::read_to_string(dir.join("history.jsonl"))
                .with_context(|| format!("read {}/history.jsonl", dir.display()))?;
            let h = History::from_jsonl(&text)?;
            let r = roamdisk_chaos::checker::check(&h);
            println!(
                "{} ops, {} writes acked, {} verified, {} violations",
                h.ops.len(),
                r.writes_acked,
                r.writes_verified,
                r.violations.len()
            );
            for v in r.violations.iter().take(20) {
                println!("  {}: {}", v.kind, v.detail);
            }
            Ok(if r.violations.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
