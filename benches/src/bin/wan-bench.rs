//! Cross-site scenarios on the playground over the emulated WAN (three sites, `sinet5`):
//!
//! 1. durability=site write latency at QD1 against the RTT floor to the nearest other
//!    site (goal: p50 ≤ RTT + 2 ms);
//! 2. catch-up after a partition: a remote site is cut off (held) while a writer writes,
//!    then healed; time to drain and the shipping rate against the link's bandwidth
//!    (goal ≥ 90 %), and the wire bytes against the bytes written;
//! 3. move handoff: a QD1 writer at the destination site keeps writing while the volume
//!    moves there; the longest write (the pause) against 2 RTT + 50 ms.
//!
//! ```text
//! cargo build --release --bins && target/release/wan-bench [--partition-secs 60]
//! ```
//! Results: `benches/results/wan.{json,md}`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use roamdisk_client::playground::Manifest;
use roamdisk_client::AdminClient;
use roamdisk_wan::{ControlClient, Partition, WanProfile};
use serde_json::{json, Value};

#[derive(Parser)]
struct Args {
    /// How long the remote site stays partitioned while the writer writes.
    #[arg(long, default_value_t = 60)]
    partition_secs: u64,
    /// Write rate during the partition, MiB/s.
    #[arg(long, default_value_t = 4)]
    partition_write_mib_s: u64,
    /// Seconds of QD1 writes for the latency row.
    #[arg(long, default_value_t = 10)]
    latency_secs: u64,
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
}

const MIB: f64 = (1 << 20) as f64;

fn wait_until<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// fio's JSON for one job.
fn fio(args: &[String]) -> Result<Value> {
    let out = Command::new("fio")
        .args(args)
        .arg("--output-format=json")
        .current_dir(std::env::temp_dir())
        .stderr(Stdio::inherit())
        .output()
        .context("run fio")?;
    if !out.status.success() {
        bail!("fio failed");
    }
    // fio's nbd engine may print notes before the JSON document.
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find("\n{").map_or(0, |i| i + 1);
    let v: Value =
        serde_json::from_str(&text[start..]).with_context(|| format!("parse fio json: {text}"))?;
    Ok(v["jobs"][0]["write"].clone())
}

fn pct(w: &Value, p: &str) -> f64 {
    w["clat_ns"]["percentile"][p].as_f64().unwrap_or(f64::NAN) / 1e6
}

fn site_lag(admin: &AdminClient, volume: &str, site: &str) -> Option<Value> {
    let v = admin.volume(volume).ok()?;
    v["site_lag"]
        .as_array()?
        .iter()
        .find(|l| l["site"] == site)
        .cloned()
}

fn main() -> Result<()> {
    let args = Args::parse();
    let roamdisk = std::env::current_exe()?.with_file_name("roamdisk");
    let dir = tempfile::tempdir()?;
    // Below the ephemeral port range (32768..), where outgoing connections take ports.
    let base = 21000 + (std::process::id() % 20) as u16 * 500;
    let mut playground = Command::new(&roamdisk)
        .args(["playground", "--dir"])
        .arg(dir.path())
        .args(["--base-port", &base.to_string(), "--wan", "sinet5"])
        .args(["--volume", "vm1:1G"])
        .stdout(Stdio::null())
        .spawn()
        .context("start roamdisk playground")?;
    let result = run(&args, dir.path());
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(playground.id() as i32, libc::SIGINT) };
    let _ = playground.wait();
    result
}

fn run(args: &Args, dir: &std::path::Path) -> Result<()> {
    wait_until(120, "the playground", || {
        dir.join("playground.json").exists().then_some(())
    })?;
    let m = Manifest::load(dir)?;
    let node = |id: u64| m.nodes().find(|n| n.id == id).expect("node in manifest");
    let site_nodes = |site: &str| -> Vec<u64> {
        m.sites
            .iter()
            .find(|s| s.name == site)
            .map(|s| s.nodes.iter().map(|n| n.id).collect())
            .unwrap_or_default()
    };
    let admin = AdminClient::new(&m.sites[0].nodes[0].admin);
    let wan = ControlClient::new(m.wan.as_ref().context("playground WAN")?.control.parse()?);
    let profile = WanProfile::Sinet5;
    let mut rows = Vec::new();

    // 1. durability=site latency at QD1, home osaka; nearest other site: fukuoka.
    admin.create_volume(
        "safe",
        256 << 20,
        Some(3),
        Some("osaka"),
        Some(roamdisk_core::meta::Durability::Site),
    )?;
    let leader = wait_until(60, "safe's leader", || {
        admin.volume("safe").ok()?["leader"].as_u64()
    })?;
    let rtt_ms = profile.rtt("osaka", "fukuoka").as_secs_f64() * 1e3;
    eprintln!(
        "[1/3] durability=site QD1 writes for {} s",
        args.latency_secs
    );
    let w = fio(&[
        "--name=site".into(),
        "--ioengine=nbd".into(),
        format!("--uri=nbd://{}/safe", node(leader).nbd),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        "--iodepth=1".into(),
        "--size=256M".into(),
        format!("--runtime={}", args.latency_secs),
        "--time_based".into(),
    ])?;
    let (p50, p99) = (pct(&w, "50.000000"), pct(&w, "99.000000"));
    rows.push(json!({
        "scenario": "durability=site write latency, 4k QD1, home osaka",
        "rtt_floor_ms": rtt_ms, "p50_ms": p50, "p99_ms": p99,
        "goal": format!("p50 <= {:.1} ms (RTT + 2 ms)", rtt_ms + 2.0),
        "met": p50 <= rtt_ms + 2.0,
    }));

    // 2. Catch-up after a partition of hokkaido (both directions held) under writes.
    let vm1_leader = wait_until(60, "vm1's leader", || {
        admin.volume("vm1").ok()?["leader"].as_u64()
    })?;
    let uri = format!("nbd://{}/vm1", node(vm1_leader).nbd);
    let bandwidth = profile
        .params("osaka", "hokkaido")
        .bandwidth_bytes_per_sec
        .context("sinet5 has a bandwidth")? as f64;
    let shipped0 = wan.link("osaka", "hokkaido")?.stats.bytes_forwarded;
    eprintln!(
        "[2/3] partition osaka<->hokkaido for {} s while writing {} MiB/s",
        args.partition_secs, args.partition_write_mib_s
    );
    wan.partition("osaka", "hokkaido", Partition::Hold)?;
    wan.partition("hokkaido", "osaka", Partition::Hold)?;
    let w = fio(&[
        "--name=partitioned".into(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        "--rw=write".into(),
        "--bs=1M".into(),
        "--iodepth=4".into(),
        "--size=1G".into(),
        format!("--rate={}m", args.partition_write_mib_s),
        format!("--runtime={}", args.partition_secs),
        "--time_based".into(),
    ])?;
    let written = w["io_bytes"].as_f64().unwrap_or(0.0);
    let lag = site_lag(&admin, "vm1", "hokkaido").unwrap_or(Value::Null);
    let healed = Instant::now();
    wan.heal()?;
    // Caught up = no entry missing and, if the log no longer reached back far enough,
    // the snapshot's block copy finished (the learner's own status says so).
    let vid = admin.volume("vm1")?["id"].as_u64().context("volume id")?;
    let learner = site_nodes("hokkaido")
        .into_iter()
        .find(|n| {
            admin.volume("vm1").ok().is_some_and(|v| {
                v["learners"]
                    .as_array()
                    .is_some_and(|l| l.contains(&json!(n)))
            })
        })
        .context("hokkaido learner")?;
    let learner_admin = AdminClient::new(&node(learner).admin);
    wait_until(600, "hokkaido to catch up", || {
        site_lag(&admin, "vm1", "hokkaido").filter(|l| l["entries"] == 0)?;
        let g = learner_admin.status().ok()?["groups"]
            .as_array()?
            .iter()
            .find(|g| g["group"].as_u64() == Some(vid))
            .cloned()?;
        (g["recovering"] == false).then_some(())
    })?;
    let drain = healed.elapsed().as_secs_f64();
    let shipped = (wan.link("osaka", "hokkaido")?.stats.bytes_forwarded - shipped0) as f64;
    // Bytes that crossed after the heal, over the drain time: the shipping rate.
    let rate = (shipped - 0.0) / drain;
    rows.push(json!({
        "scenario": format!("catch-up after a {} s partition (hokkaido)", args.partition_secs),
        "written_mib": written / MIB, "lag_at_heal": lag,
        "drain_s": drain, "shipped_mib": shipped / MIB,
        "wire_over_written": shipped / written.max(1.0),
        "shipping_mib_s": rate / MIB, "link_mib_s": bandwidth / MIB,
        "goal": "shipping >= 90% of link bandwidth",
        "met": rate >= 0.9 * bandwidth,
    }));

    // 3. Move vm1 to fukuoka while a QD1 writer at fukuoka writes (forwarded until the
    // move completes, local after).
    let fukuoka = site_nodes("fukuoka");
    let writer_node = node(fukuoka[0]);
    eprintln!(
        "[3/3] move vm1 to fukuoka under a QD1 writer at node {}",
        writer_node.id
    );
    let fio_args = vec![
        "--name=move".to_string(),
        "--ioengine=nbd".into(),
        format!("--uri=nbd://{}/vm1", writer_node.nbd),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        "--iodepth=1".into(),
        "--size=1G".into(),
        "--runtime=25".into(),
        "--time_based".into(),
    ];
    let writer = std::thread::spawn(move || fio(&fio_args));
    std::thread::sleep(Duration::from_secs(5));
    let t = Instant::now();
    admin.move_volume("vm1", "fukuoka")?;
    wait_until(300, "the move", || {
        let v = admin.volume("vm1").ok()?;
        (v["home_site"] == "fukuoka" && v["moving"].is_null()).then_some(())
    })?;
    let move_s = t.elapsed().as_secs_f64();
    let w = writer.join().expect("writer thread")?;
    let max_ms = w["clat_ns"]["max"].as_f64().unwrap_or(f64::NAN) / 1e6;
    let rtt_of = profile.rtt("osaka", "fukuoka").as_secs_f64() * 1e3;
    rows.push(json!({
        "scenario": "move osaka -> fukuoka under a QD1 writer at fukuoka",
        "move_s": move_s, "p50_ms": pct(&w, "50.000000"), "max_write_ms": max_ms,
        "goal": format!("handoff pause (longest write) <= {:.0} ms (2 RTT + 50 ms)", 2.0 * rtt_of + 50.0),
        "met": max_ms <= 2.0 * rtt_of + 50.0,
    }));

    let mut md = String::from("| scenario | figures | goal | met |\n|---|---|---|---|\n");
    for r in &rows {
        let mut figs: Vec<String> = Vec::new();
        for (k, v) in r.as_object().expect("object") {
            if ["scenario", "goal", "met", "lag_at_heal"].contains(&k.as_str()) {
                continue;
            }
            figs.push(match v.as_f64() {
                Some(f) => format!("{k} {f:.2}"),
                None => format!("{k} {v}"),
            });
        }
        md.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            r["scenario"].as_str().unwrap_or(""),
            figs.join(", "),
            r["goal"].as_str().unwrap_or(""),
            if r["met"] == true { "yes" } else { "**no**" }
        ));
    }
    println!("{md}");
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("wan.json"),
        serde_json::to_vec_pretty(&json!({
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "profile": "sinet5",
            "rows": rows,
        }))?,
    )?;
    std::fs::write(args.out.join("wan.md"), md)?;
    eprintln!("wrote {}/wan.json and wan.md", args.out.display());
    Ok(())
}
