//! `roamdisk volume ...`: create, list, show, resize, delete, move, policy, verify,
//! transfer-leader and a failover's divergent replicas.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::{Subcommand, ValueEnum};
use roamdisk_client::{format_size, parse_size, AdminClient};
use roamdisk_core::meta::{Durability, OnNoSite};
use serde_json::Value;

use crate::{failover, print_json};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DurabilityArg {
    Node,
    Site,
}

// Where a new volume or group lives and how durable it is (`volume create`, `group create`).
#[derive(clap::Args, Debug)]
pub struct Placement {
    #[arg(long)]
    pub replicas: Option<u32>,
    #[arg(long)]
    pub home: Option<String>,
    #[arg(long, value_enum)]
    pub durability: Option<DurabilityArg>,
    /// What a durability=site volume does while no other site answers: `suspend`
    /// (writes wait, never fail: the default) or `degrade-after=DURATION` (`5s`,
    /// `500ms`: then commit on the home site alone, reported as degraded).
    #[arg(long, value_parser = parse_on_no_site)]
    pub on_no_site: Option<OnNoSite>,
}

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    Create {
        name: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[command(flatten)]
        placement: Placement,
        /// Make the volume part of consistency group GROUP (`roamdisk group create`): it
        /// takes the group's placement, durability and policy.
        #[arg(long, conflicts_with_all = ["replicas", "home", "durability", "on_no_site"])]
        group: Option<String>,
    },
    /// Set what a durability=site volume does while no other site answers.
    SetPolicy {
        name: String,
        #[arg(long, value_parser = parse_on_no_site)]
        on_no_site: OnNoSite,
    },
    List,
    Show {
        name: String,
    },
    /// Grow a volume.
    Resize {
        name: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    Delete {
        name: String,
    },
    /// Move a volume's home (its Raft voters and leader) to another site. The old home
    /// keeps learner replicas, so moving back copies nothing.
    Move {
        name: String,
        #[arg(long)]
        to: String,
        /// Wait until the move is done, showing progress.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds (the move itself goes on).
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    /// Hand a volume's Raft leadership to another voter of its home site.
    TransferLeader {
        name: String,
        /// Node id of the new leader.
        #[arg(long)]
        to: u64,
    },
    /// What the replicas a failover fenced hold beyond the divergence point (kept until
    /// discard-divergent); `--out FILE` saves one's content as a raw image.
    Divergent {
        name: String,
        #[arg(long)]
        out: Option<PathBuf>,
        /// Which fenced replica (default: the first).
        #[arg(long)]
        node: Option<u64>,
    },
    /// Give up the divergent writes of the fenced replicas (all, or one `--node`): they
    /// resync the blocks that differ from the volume's home and become learners.
    DiscardDivergent {
        name: String,
        #[arg(long)]
        node: Option<u64>,
    },
    /// Compare every replica of a volume, at every site, block by block at one log index
    /// (digests only cross the network), and list the blocks that differ. Exit status 1
    /// if any does.
    Verify {
        name: String,
        /// Make the replicas that differ copy the differing blocks from the leader.
        #[arg(long)]
        repair: bool,
    },
}
impl DurabilityArg {
    pub fn durability(self) -> Durability {
        match self {
            DurabilityArg::Node => Durability::Node,
            DurabilityArg::Site => Durability::Site,
        }
    }
}

pub fn run(client: &AdminClient, cmd: VolumeCmd, json: bool) -> Result<()> {
    match cmd {
        VolumeCmd::Create {
            name,
            size,
            group: Some(group),
            ..
        } => {
            let g = client.add_to_group(&group, &name, size)?;
            if json {
                return print_json(&g);
            }
            println!("created {name} in group {}", volume_line(&g));
            crate::group::print_members(&g, "  ");
        }
        VolumeCmd::Create {
            name,
            size,
            placement: p,
            group: None,
        } => {
            let d = p.durability.map(DurabilityArg::durability);
            let mut v = client.create_volume(&name, size, p.replicas, p.home.as_deref(), d)?;
            if let Some(p) = p.on_no_site {
                v = client.set_policy(&name, p)?;
            }
            if json {
                return print_json(&v);
            }
            println!("created {}", volume_line(&v));
        }
        VolumeCmd::SetPolicy { name, on_no_site } => {
            let v = client.set_policy(&name, on_no_site)?;
            if json {
                return print_json(&v);
            }
            println!("{}: on no other site, {}", name, v["on_no_site"]);
        }
        VolumeCmd::List => {
            let vs = client.volumes()?;
            if json {
                return print_json(&vs);
            }
            for v in &vs {
                println!("{}", volume_line(v));
            }
        }
        VolumeCmd::Show { name } => {
            let v = client.volume(&name)?;
            if json {
                return print_json(&v);
            }
            println!("{}", volume_line(&v));
            crate::group::print_members(&v, "  ");
            println!(
                "  voters {}  learners {}  durability {}",
                v["voters"], v["learners"], v["durability"]
            );
            if let Some(p) = v["progress"].as_array() {
                for r in p {
                    println!(
                        "  replica {} ({}) matched {} lag {} entries, {}, {:.1} s{}",
                        r["node"],
                        r["site"].as_str().unwrap_or("?"),
                        r["matched"],
                        r["lag_entries"],
                        format_size(r["lag_bytes"].as_u64().unwrap_or(0)),
                        r["lag_seconds"].as_f64().unwrap_or(0.0),
                        if r["learner"] == true {
                            " (learner)"
                        } else {
                            ""
                        }
                    );
                }
            }
            print_site_lag(&v, "  ");
            if let Some(p) = v.get("move_progress") {
                let eta = p["eta_seconds"]
                    .as_f64()
                    .map_or("unknown".to_owned(), |s| format!("{s:.1} s"));
                println!(
                    "  moving to {}: {}, {} left, ETA {eta}",
                    p["to"].as_str().unwrap_or("?"),
                    p["phase"].as_str().unwrap_or("?"),
                    format_size(p["bytes_left"].as_u64().unwrap_or(0)),
                );
            } else if let Some(to) = v["moving"]["to"].as_str() {
                println!("  moving to {to}");
            }
            for e in v["exports"].as_array().into_iter().flatten() {
                println!("  {}", e.as_str().unwrap_or("?"));
            }
        }
        VolumeCmd::Resize { name, size } => {
            let v = client.resize_volume(&name, size)?;
            if json {
                return print_json(&v);
            }
            println!("resized {}", volume_line(&v));
        }
        VolumeCmd::Move {
            name,
            to,
            wait,
            timeout_secs,
        } => {
            let started = Instant::now();
            let mut v = client.move_volume(&name, &to)?;
            if wait {
                v = wait_for_move(&client, &name, &to, Duration::from_secs(timeout_secs), json)?;
            }
            if json {
                return print_json(&v);
            }
            if wait {
                println!(
                    "moved {} in {:.1} s",
                    volume_line(&v),
                    started.elapsed().as_secs_f64()
                );
            } else {
                println!(
                    "moving {} to {to} (see `roamdisk volume show {name}`)",
                    volume_line(&v)
                );
            }
        }
        VolumeCmd::Verify { name, repair } => {
            let long = AdminClient::with_timeout(client.addr(), Duration::from_secs(3600));
            let r = verify_with_progress(&long, &name, repair, json)?;
            let differing = r["differing_blocks"].as_u64().unwrap_or(0);
            if json {
                print_json(&r)?;
            } else {
                println!(
                    "volume {name}: {} blocks compared on {} replicas in {:.1} s; {differing} differ",
                    r["blocks"],
                    r["replicas"].as_array().map_or(0, |a| a.len()),
                    r["seconds"].as_f64().unwrap_or(0.0)
                );
                for rep in r["replicas"].as_array().into_iter().flatten() {
                    println!(
                        "  node {:<3} {:<10} {:<7} {} blocks checked, {} differ{}{}{}",
                        rep["node"],
                        rep["site"].as_str().unwrap_or("?"),
                        if rep["voter"] == true {
                            "voter"
                        } else {
                            "learner"
                        },
                        rep["checked_blocks"],
                        rep["differing_blocks"],
                        match rep["unavailable_chunks"].as_u64() {
                            Some(0) | None => String::new(),
                            Some(n) => format!(", {n} MiB unavailable"),
                        },
                        if rep["differing_blocks"].as_u64().unwrap_or(0) > 0 {
                            format!(" (first: {})", rep["blocks"])
                        } else {
                            String::new()
                        },
                        if rep["repaired"] == true {
                            "; repairing"
                        } else {
                            ""
                        },
                    );
                }
            }
            if differing > 0 {
                std::process::exit(1);
            }
        }
        VolumeCmd::TransferLeader { name, to } => {
            let v = client.transfer_leader(&name, to)?;
            if json {
                return print_json(&v);
            }
            println!(
                "asked node {} to hand volume {name} to node {to}",
                v["leader"]
                    .as_u64()
                    .map_or("?".to_owned(), |l| l.to_string())
            );
        }
        VolumeCmd::Divergent { name, out, node } => {
            failover::divergent(&client, &name, out.as_deref(), node, json)?
        }
        VolumeCmd::DiscardDivergent { name, node } => {
            failover::discard(&client, &name, node, json)?
        }
        VolumeCmd::Delete { name } => {
            let v = client.delete_volume(&name)?;
            if json {
                return print_json(&v);
            }
            println!("deleted {}", v["name"].as_str().unwrap_or(&name));
        }
    }
    Ok(())
}

/// Runs a verify on the node `client` talks to, with a progress bar on a terminal.
fn verify_with_progress(
    client: &AdminClient,
    name: &str,
    repair: bool,
    json: bool,
) -> Result<Value> {
    let addr = client.addr().to_owned();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = (!json).then(|| {
        let done = std::sync::Arc::clone(&done);
        let name = name.to_owned();
        std::thread::spawn(move || {
            let poll = AdminClient::with_timeout(&addr, Duration::from_secs(5));
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} verifying {prefix}: [{bar:30}] {pos}/{len} MiB, ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(name.clone());
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(p) = poll.verify_progress(&name) {
                    if p["volume"] == name.as_str() {
                        bar.set_length(p["chunks"].as_u64().unwrap_or(0));
                        bar.set_position(p["chunks_done"].as_u64().unwrap_or(0));
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            bar.finish_and_clear();
        })
    });
    let r = client.verify_volume(name, repair);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(w) = watcher {
        let _ = w.join();
    }
    r
}

/// Polls the volume until its home is `to` and no move is in flight, with a progress
/// bar on a terminal (bytes the new voters still lack, rate, ETA) unless `json`.
fn wait_for_move(
    client: &AdminClient,
    name: &str,
    to: &str,
    timeout: Duration,
    json: bool,
) -> Result<Value> {
    let bar = (!json).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} moving to {prefix}: {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b.set_prefix(to.to_owned());
        b
    });
    let deadline = Instant::now() + timeout;
    let mut first_left: Option<u64> = None;
    loop {
        let v = client.volume(name)?;
        if v["home_site"] == to && v["moving"].is_null() {
            if let Some(b) = &bar {
                b.finish_with_message("done");
            }
            return Ok(v);
        }
        if let (Some(b), Some(p)) = (&bar, v.get("move_progress")) {
            let left = p["bytes_left"].as_u64().unwrap_or(0);
            let total = first_left.map_or(left, |t| t.max(left));
            first_left = Some(total);
            b.set_length(total);
            b.set_position(total - left);
            b.set_message(p["phase"].as_str().unwrap_or("?").to_owned());
        }
        if Instant::now() > deadline {
            anyhow::bail!("volume {name} has not finished moving to {to} after {timeout:?}; the move continues (see `roamdisk volume show {name}`)");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn volume_line(v: &Value) -> String {
    format!(
        "{:<16} {:>10}  home {:<10} replicas {}  leader {}  gen {}",
        v["name"].as_str().unwrap_or("?"),
        format_size(v["size"].as_u64().unwrap_or(0)),
        v["home_site"].as_str().unwrap_or("?"),
        v["replicas"],
        v["leader"]
            .as_u64()
            .map_or("none".to_string(), |l| l.to_string()),
        v["generation"],
    )
}

/// `suspend` or `degrade-after=5s` (also `500ms`, `2m`).
pub fn parse_on_no_site(s: &str) -> Result<OnNoSite, String> {
    if s == "suspend" {
        return Ok(OnNoSite::Suspend);
    }
    let d = s
        .strip_prefix("degrade-after=")
        .ok_or_else(|| format!("{s:?}: use suspend or degrade-after=DURATION"))?;
    let (num, unit) = d.split_at(d.find(|c: char| !c.is_ascii_digit()).unwrap_or(d.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{d:?}: a duration such as 5s or 500ms"))?;
    let ms = match unit {
        "ms" => n,
        "s" | "" => n * 1000,
        "m" => n * 60_000,
        _ => return Err(format!("{d:?}: the unit is ms, s or m")),
    };
    Ok(OnNoSite::DegradeAfter { ms })
}

/// One line per remote site: how far behind it is and when it will have caught up.
pub fn print_site_lag(v: &Value, indent: &str) {
    for l in v["site_lag"].as_array().into_iter().flatten() {
        let eta = match l["eta_seconds"].as_f64() {
            Some(s) => format!("{s:.1} s"),
            None => "not draining".to_owned(),
        };
        println!(
            "{indent}site {:<10} lag {} entries, {}, {:.1} s; drains at {}/s, ETA {eta}{}",
            l["site"].as_str().unwrap_or("?"),
            l["entries"],
            format_size(l["bytes"].as_u64().unwrap_or(0)),
            l["seconds"].as_f64().unwrap_or(0.0),
            format_size(l["drain_bytes_per_sec"].as_f64().unwrap_or(0.0) as u64),
            if l["copying_blocks"] == true {
                "; still copying blocks"
            } else {
                ""
            },
        );
    }
}
