//! Cross-site scenarios on the playground over the emulated WAN (three sites, `sinet5`):
//!
//! 1. durability=site write latency at QD1 against the RTT floor to the nearest other
//!    site (goal: p50 ≤ RTT + 2 ms);
//! 2. catch-up after a partition: a remote site is cut off (held) while a writer writes,
//!    then healed; time to drain and the shipping rate against the link's bandwidth
//!    (goal ≥ 90 %), and the wire bytes against the bytes written;
//! 3. a second volume cloned from the same image as a first: wire bytes to the other
//!    sites against the bytes written (goal ≥ 3× fewer), with the dedup counters;
//! 4. move handoff: a QD1 writer at the destination site keeps writing while the volume
//!    moves there; the pause is the longest write from the joint-consensus change to the
//!    move's end (goal ≤ 2 RTT + 50 ms); the longest write of the whole move (which
//!    includes copying the volume to the new replicas) is reported too;
//! 5. forced failover: a volume's home (osaka) is cut off from the other sites after a
//!    writer wrote there; `failover plan|execute` to hokkaido; the time from `execute` to
//!    the first write acknowledged at hokkaido (goal ≤ lease + 2 s); writes at hokkaido;
//!    heal, `discard-divergent`: the bytes the resync sent to osaka against the bytes
//!    that differ (goal ≤ 1.2×, per replica); the move back to osaka (goal: no bulk copy,
//!    under 10 % of the volume's data).
//!
//! ```text
//! cargo build --release --bins && target/release/wan-bench [--partition-secs 60]
//! ```
//! Results: `benches/results/wan.{json,md}` and `wan-*.png`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use plotters::style::RGBColor;
use roamdisk_admin_client::AdminClient;
use roamdisk_benches::plot::{Chart, HLine, Series, VLine};
use roamdisk_playground::Manifest;
use roamdisk_wan::{ControlClient, Partition, WanProfile};
use serde_json::{json, Value};

const BLUE: RGBColor = RGBColor(30, 90, 200);
const RED: RGBColor = RGBColor(200, 30, 30);
const GREEN: RGBColor = RGBColor(0, 140, 0);
const GREY: RGBColor = RGBColor(120, 120, 120);

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
/// Runs fio; with `lat_log`, also returns every write's (seconds since start, latency ms).
fn fio_logged(args: &[String], lat_log: Option<&Path>) -> Result<(Value, Vec<(f64, f64)>)> {
    let mut cmd = Command::new("fio");
    cmd.args(args);
    if let Some(p) = lat_log {
        cmd.arg(format!("--write_lat_log={}", p.display()))
            .arg("--log_avg_msec=0");
    }
    let v = fio_cmd(cmd)?;
    let mut points = Vec::new();
    if let Some(p) = lat_log {
        let file = PathBuf::from(format!("{}_lat.1.log", p.display()));
        let text =
            std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
        for line in text.lines() {
            let mut f = line.split(',').map(str::trim);
            if let (Some(t), Some(ns)) = (f.next(), f.next()) {
                if let (Ok(t), Ok(ns)) = (t.parse::<f64>(), ns.parse::<f64>()) {
                    points.push((t / 1e3, ns / 1e6));
                }
            }
        }
    }
    Ok((v, points))
}

fn fio(args: &[String]) -> Result<Value> {
    let mut cmd = Command::new("fio");
    cmd.args(args);
    fio_cmd(cmd)
}

fn fio_cmd(mut cmd: Command) -> Result<Value> {
    let out = cmd
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

/// Round trip of the emulated link between `a` and `b` under `profile`, measured: a
/// separate `roamdisk-wan` with one route, a 4 KiB request (a Raft append of one 4 KiB
/// write) echoed by a 32-byte reply (its acknowledgement), 400 times in turn; the median.
fn link_rtt_ms(profile: WanProfile, a: &str, b: &str) -> Result<f64> {
    use std::io::{BufRead, BufReader, Read, Write};
    let echo = std::net::TcpListener::bind("127.0.0.1:0")?;
    let target = echo.local_addr()?;
    std::thread::spawn(move || {
        for s in echo.incoming() {
            let Ok(mut s) = s else { break };
            let _ = s.set_nodelay(true);
            let mut req = vec![0u8; 4096];
            while s.read_exact(&mut req).is_ok() {
                if s.write_all(&[0u8; 32]).is_err() {
                    break;
                }
            }
        }
    });
    let wan_bin = std::env::current_exe()?.with_file_name("roamdisk-wan");
    let mut child = Command::new(&wan_bin)
        .args(["--profile", &profile.to_string()])
        .arg("--route")
        .arg(format!("{a}:{b}:127.0.0.1:0={target}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("start {}", wan_bin.display()))?;
    let result = (|| -> Result<f64> {
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("no stdout")?).read_line(&mut line)?;
        let listen = line
            .split(": ")
            .nth(1)
            .and_then(|r| r.split(" -> ").next())
            .with_context(|| format!("no route in {line:?}"))?
            .to_owned();
        let mut s = std::net::TcpStream::connect(listen.trim())?;
        s.set_nodelay(true)?;
        let req = vec![7u8; 4096];
        let mut reply = [0u8; 32];
        let mut rtts = Vec::new();
        for _ in 0..400 {
            let t = Instant::now();
            s.write_all(&req)?;
            s.read_exact(&mut reply)?;
            rtts.push(t.elapsed().as_secs_f64() * 1e3);
        }
        rtts.sort_by(f64::total_cmp);
        Ok(rtts[rtts.len() / 2])
    })();
    let _ = child.kill();
    let _ = child.wait();
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
    std::fs::create_dir_all(&args.out)?;
    let logs = tempfile::tempdir()?;
    let png = |name: &str| args.out.join(name);

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
    // Every replica, the learners at the other sites included, has the volume's first
    // entries: the writes measure steady state, not the new volume's setup.
    wait_until(60, "safe's replicas to match", || {
        let v = admin.volume("safe").ok()?;
        let progress = v["progress"].as_array()?;
        let matched: Vec<u64> = progress
            .iter()
            .filter_map(|p| p["matched"].as_u64())
            .collect();
        let top = *matched.iter().max()?;
        (progress.len() == 5 && top > 0 && matched.iter().all(|&m| m == top)).then_some(())
    })?;
    let rtt_ms = profile.rtt("osaka", "fukuoka").as_secs_f64() * 1e3;
    let link_rtt = link_rtt_ms(profile, "osaka", "fukuoka")?;
    eprintln!(
        "[1/5] emulated osaka<->fukuoka link, 4 KiB request and 32-byte reply: RTT p50 {:.2} ms",
        link_rtt
    );
    eprintln!(
        "[1/5] durability=site QD1 writes for {} s",
        args.latency_secs
    );
    let (w, lat) = fio_logged(
        &[
            "--name=site".into(),
            "--ioengine=nbd".into(),
            format!("--uri=nbd://{}/safe", node(leader).nbd),
            "--rw=randwrite".into(),
            "--bs=4k".into(),
            "--iodepth=1".into(),
            "--size=256M".into(),
            format!("--runtime={}", args.latency_secs),
            "--time_based".into(),
        ],
        Some(&logs.path().join("site")),
    )?;
    let (p50, p99) = (pct(&w, "50.000000"), pct(&w, "99.000000"));
    // The floor is the link's own round trip, measured: the profile's 15 ms plus the
    // jitter (0.5 ms per direction, never reordering) and the emulator's forwarding.
    rows.push(json!({
        "scenario": "durability=site write latency, 4k QD1, home osaka",
        "rtt_profile_ms": rtt_ms, "rtt_floor_ms": link_rtt, "p50_ms": p50, "p99_ms": p99,
        "p50_over_floor_ms": p50 - link_rtt,
        "goal": format!("p50 <= {:.1} ms (measured link RTT + 2 ms)", link_rtt + 2.0),
        "met": p50 <= link_rtt + 2.0,
    }));
    Chart {
        title: "durability=site: 4k QD1 write latency (home osaka, nearest site fukuoka)",
        x_label: "time (s)",
        y_label: "write latency (ms)",
        series: vec![Series {
            name: format!("write (p50 {p50:.1} ms, p99 {p99:.1} ms)"),
            points: lat,
            color: BLUE,
            dots: true,
        }],
        hlines: vec![
            HLine {
                name: format!("link RTT p50 {link_rtt:.1} ms (profile {rtt_ms:.0} ms)"),
                y: link_rtt,
                color: GREY,
            },
            HLine {
                name: format!("goal p50 <= {:.1} ms", link_rtt + 2.0),
                y: link_rtt + 2.0,
                color: GREEN,
            },
        ],
        vlines: vec![],
        y_max: Some((p99 * 1.5).max(rtt_ms * 3.0)),
    }
    .draw(&png("wan-site-latency.png"))?;

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
        "[2/5] partition osaka<->hokkaido for {} s while writing {} MiB/s",
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
    // Sample the link every 100 ms until hokkaido has caught up.
    let mut samples: Vec<(f64, u64)> = vec![(0.0, shipped0)];
    let mut last_check = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let t = healed.elapsed().as_secs_f64();
        samples.push((t, wan.link("osaka", "hokkaido")?.stats.bytes_forwarded));
        if t > 600.0 {
            bail!("timed out waiting for hokkaido to catch up");
        }
        if last_check.elapsed() < Duration::from_millis(600) {
            continue;
        }
        last_check = Instant::now();
        let caught_up = site_lag(&admin, "vm1", "hokkaido").is_some_and(|l| l["entries"] == 0)
            && learner_admin.status().ok().is_some_and(|s| {
                s["groups"].as_array().is_some_and(|gs| {
                    gs.iter()
                        .any(|g| g["group"].as_u64() == Some(vid) && g["recovering"] == false)
                })
            });
        if caught_up {
            break;
        }
    }
    let drain = healed.elapsed().as_secs_f64();
    let shipped = (samples.last().expect("samples").1 - shipped0) as f64;
    let rates: Vec<(f64, f64)> = samples
        .windows(2)
        .map(|w| (w[1].0, (w[1].1 - w[0].1) as f64 / (w[1].0 - w[0].0) / MIB))
        .collect();
    // Steady-state shipping rate: the mean over the 100 ms samples in which the link
    // carried more than half its bandwidth (the phases before and after the copy, and
    // samples that straddle their edges, are not shipping at full rate by design).
    let busy: Vec<(f64, f64)> = samples
        .windows(2)
        .map(|w| (w[1].0 - w[0].0, (w[1].1 - w[0].1) as f64))
        .filter(|(dt, b)| *b / dt > 0.5 * bandwidth)
        .collect();
    let busy_s: f64 = busy.iter().map(|(dt, _)| dt).sum();
    let busy_mib: f64 = busy.iter().map(|(_, b)| b / MIB).sum();
    let sustained = if busy_s > 0.0 { busy_mib / busy_s } else { 0.0 };
    rows.push(json!({
        "scenario": format!("catch-up after a {} s partition (hokkaido)", args.partition_secs),
        "written_mib": written / MIB, "lag_at_heal": lag,
        "drain_s": drain, "shipped_mib": shipped / MIB,
        "wire_over_written": shipped / written.max(1.0),
        "average_mib_s": shipped / drain / MIB,
        "shipping_mib_s": sustained, "busy_s": busy_s, "link_mib_s": bandwidth / MIB,
        "goal": "steady-state shipping >= 90% of link bandwidth",
        "met": sustained * MIB >= 0.9 * bandwidth,
    }));
    Chart {
        title: &format!(
            "catch-up after a {} s partition: osaka -> hokkaido link throughput",
            args.partition_secs
        ),
        x_label: "seconds after heal",
        y_label: "MiB/s on the link",
        series: vec![Series {
            name: format!("shipped ({sustained:.1} MiB/s while busy)"),
            points: rates,
            color: BLUE,
            dots: false,
        }],
        hlines: vec![
            HLine {
                name: format!("link bandwidth {:.0} MiB/s", bandwidth / MIB),
                y: bandwidth / MIB,
                color: GREY,
            },
            HLine {
                name: "goal: 90%".into(),
                y: 0.9 * bandwidth / MIB,
                color: GREEN,
            },
        ],
        vlines: vec![],
        y_max: Some(bandwidth / MIB * 1.2),
    }
    .draw(&png("wan-catchup.png"))?;

    eprintln!("[3/5] two volumes cloned from one image");
    let image = logs.path().join("image.raw");
    let data_bytes = vm_like_image(&image, 64 << 20)?;
    let remote = ["hokkaido", "fukuoka"];
    let wire_now = || -> Result<u64> {
        let mut b = 0;
        for to in remote {
            b += wan.link("osaka", to)?.stats.bytes_forwarded;
        }
        Ok(b)
    };
    // Dedup counters summed over every node.
    let dedup_now = || -> Result<Value> {
        let mut sum = serde_json::Map::new();
        for n in m.nodes() {
            let s = AdminClient::new(&n.admin).status()?;
            for (k, v) in s["dedup"].as_object().into_iter().flatten() {
                let prev = sum.get(k).and_then(Value::as_u64).unwrap_or(0);
                sum.insert(k.clone(), json!(prev + v.as_u64().unwrap_or(0)));
            }
        }
        Ok(Value::Object(sum))
    };
    let dedup_start = dedup_now()?;
    let mut clone_rows = Vec::new();
    for name in ["clone-a", "clone-b"] {
        admin.create_volume(name, 64 << 20, Some(3), Some("osaka"), None)?;
        let leader = wait_until(60, "the clone's leader", || {
            admin.volume(name).ok()?["leader"].as_u64()
        })?;
        // Every replica exists before the copy starts, so the copy ships through the log.
        wait_until(60, "the clone's replicas", || {
            let v = admin.volume(name).ok()?;
            (v["learners"].as_array()?.len() >= remote.len()).then_some(())
        })?;
        // Nodes index what they store when they checkpoint (every second): a clone made
        // the moment the previous one finished would find part of it not indexed yet.
        std::thread::sleep(Duration::from_secs(2));
        let before = wire_now()?;
        let status = Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&image)
            .arg(format!("nbd://{}/{name}", node(leader).nbd))
            .status()
            .context("run qemu-img convert")?;
        if !status.success() {
            bail!("qemu-img convert into {name} failed");
        }
        wait_until(300, "the clone to reach the other sites", || {
            remote
                .iter()
                .all(|s| site_lag(&admin, name, s).is_some_and(|l| l["entries"] == 0))
                .then_some(())
        })?;
        let wire = (wire_now()? - before) as f64;
        let logical = data_bytes as f64 * remote.len() as f64;
        clone_rows.push((name, logical, wire, dedup_now()?));
    }
    let (_, logical_a, wire_a, ref dedup_a) = clone_rows[0];
    let (_, logical_b, wire_b, ref dedup_b) = clone_rows[1];
    let delta = |after: &Value, before: &Value, k: &str| {
        after[k].as_u64().unwrap_or(0) - before[k].as_u64().unwrap_or(0)
    };
    let dedup_delta = |k: &str| delta(dedup_b, dedup_a, k);
    let first_delta = |k: &str| delta(dedup_a, &dedup_start, k);
    rows.push(json!({
        "scenario": "a second volume cloned from the same 64 MiB VM-like image, to 2 sites",
        "image_data_mib": data_bytes as f64 / MIB,
        "first_logical_over_wire": logical_a / wire_a.max(1.0),
        "second_logical_over_wire": logical_b / wire_b.max(1.0),
        "first_wire_mib": wire_a / MIB, "second_wire_mib": wire_b / MIB,
        "first_refs_sent": first_delta("refs_sent"),
        "first_refs_missed": first_delta("missed"),
        "second_refs_sent": dedup_delta("refs_sent"),
        "second_refs_resolved": dedup_delta("resolved_local") + dedup_delta("resolved_site"),
        "second_refs_missed": dedup_delta("missed"),
        "goal": "second clone: >= 3x fewer wire bytes than logical",
        "met": logical_b / wire_b.max(1.0) >= 3.0,
    }));

    let fukuoka = site_nodes("fukuoka");
    let writer_node = node(fukuoka[0]);
    eprintln!(
        "[4/5] move vm1 to fukuoka under a QD1 writer at node {}",
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
    let move_log = logs.path().join("move");
    let fio_start = Instant::now();
    let writer = std::thread::spawn(move || fio_logged(&fio_args, Some(&move_log)));
    std::thread::sleep(Duration::from_secs(5));
    let t = Instant::now();
    admin.move_volume("vm1", "fukuoka")?;
    // The handoff starts when the first fukuoka replica becomes a voter (joint
    // consensus); before that the move only copies data to the new replicas.
    let mut handoff: Option<Instant> = None;
    wait_until(300, "the move", || {
        let v = admin.volume("vm1").ok()?;
        let progress = v["progress"].as_array().cloned().unwrap_or_default();
        if handoff.is_none()
            && progress
                .iter()
                .any(|p| p["site"] == "fukuoka" && p["learner"] == false)
        {
            handoff = Some(Instant::now());
        }
        (v["home_site"] == "fukuoka" && v["moving"].is_null()).then_some(())
    })?;
    let done = Instant::now();
    let move_s = t.elapsed().as_secs_f64();
    let move_at = (t - fio_start).as_secs_f64();
    let handoff_at = (handoff.unwrap_or(done) - fio_start).as_secs_f64();
    let done_at = (done - fio_start).as_secs_f64();
    let (w, lat) = writer.join().expect("writer thread")?;
    let max_ms = w["clat_ns"]["max"].as_f64().unwrap_or(f64::NAN) / 1e6;
    // The pause: the longest write that completed between the start of the handoff
    // (less one polling interval) and a second after the move was recorded done.
    let pause_ms = lat
        .iter()
        .filter(|(at, _)| *at >= handoff_at - 0.1 && *at <= done_at + 1.0)
        .map(|(_, ms)| *ms)
        .fold(0.0, f64::max);
    let rtt_of = profile.rtt("osaka", "fukuoka").as_secs_f64() * 1e3;
    let goal = 2.0 * rtt_of + 50.0;
    rows.push(json!({
        "scenario": "move osaka -> fukuoka under a QD1 writer at fukuoka",
        "move_s": move_s, "handoff_s": done_at - handoff_at, "p50_ms": pct(&w, "50.000000"),
        "handoff_max_write_ms": pause_ms, "max_write_ms": max_ms,
        "goal": format!(
            "handoff pause (longest write from joint consensus to done) <= {goal:.0} ms (2 RTT + 50 ms)"
        ),
        "met": pause_ms <= goal,
    }));
    Chart {
        title: "move osaka -> fukuoka: 4k QD1 writes from a fukuoka node",
        x_label: "time (s)",
        y_label: "write latency (ms)",
        series: vec![Series {
            name: format!("write (longest {max_ms:.0} ms)"),
            points: lat,
            color: BLUE,
            dots: true,
        }],
        hlines: vec![HLine {
            name: format!("goal: pause <= {goal:.0} ms"),
            y: goal,
            color: GREEN,
        }],
        vlines: vec![
            VLine {
                name: "move asked".into(),
                x: move_at,
                color: GREY,
            },
            VLine {
                name: "handoff began (joint consensus)".into(),
                x: handoff_at,
                color: GREEN,
            },
            VLine {
                name: format!("move finished (handoff longest {pause_ms:.0} ms)"),
                x: done_at,
                color: RED,
            },
        ],
        y_max: Some(max_ms.max(goal) * 1.15),
    }
    .draw(&png("wan-move.png"))?;

    rows.push(failover_row(&m, &wan, &admin, &logs)?);

    let mut md = format!(
        "# WAN scenarios (`wan-bench`, sinet5 profile, 3 sites × 3 nodes on one machine)\n\n\
         Command: `cargo build --release --bins --workspace && {}`\n\
         (plots: `wan-site-latency.png`, `wan-catchup.png`, `wan-move.png`). The latency\n\
         floor `rtt_floor_ms` is the emulated osaka↔fukuoka link's round trip, measured just\n\
         before (a 4 KiB request and a 32-byte reply through a separate `roamdisk-wan` with\n\
         the same profile; median of 400): the profile's 15 ms plus its jitter and the\n\
         emulator's forwarding. Shipping rate is\n\
         the steady state: the mean over 100 ms samples of the osaka→hokkaido link in which it\n\
         carried more than half its bandwidth; `average_mib_s` is over the whole drain. The\n\
         handoff pause is the longest write from the joint-consensus change to the move's end;\n\
         `max_write_ms` includes the copy to the new replicas before it.\n\n\
         | scenario | figures | goal | met |\n|---|---|---|---|\n",
        std::env::args().collect::<Vec<_>>().join(" ")
    );
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

/// Scenario 5: a forced failover of volume `fo` from osaka to hokkaido and back.
fn failover_row(
    m: &Manifest,
    wan: &ControlClient,
    admin: &AdminClient,
    logs: &tempfile::TempDir,
) -> Result<Value> {
    const DATA_MIB: u64 = 32;
    let node_at = |site: &str| {
        m.sites
            .iter()
            .find(|s| s.name == site)
            .and_then(|s| s.nodes.first())
            .expect("a node of the site")
            .clone()
    };
    let (osaka, hokkaido) = (node_at("osaka"), node_at("hokkaido"));
    admin.create_volume("fo", 256 << 20, Some(3), Some("osaka"), None)?;
    wait_until(60, "fo's leader", || {
        admin.volume("fo").ok()?["leader"].as_u64()
    })?;
    eprintln!("[5/5] failover: {DATA_MIB} MiB written at osaka, then osaka cut off");
    fio(&[
        "--name=fill".into(),
        // Fresh random data per write: no block repeats, so none crosses by reference.
        "--refill_buffers".into(),
        "--ioengine=nbd".into(),
        format!("--uri=nbd://{}/fo", osaka.nbd),
        "--rw=write".into(),
        "--bs=1M".into(),
        "--iodepth=8".into(),
        format!("--size={DATA_MIB}M"),
    ])?;
    wait_until(120, "fo's remote sites to catch up", || {
        let v = admin.volume("fo").ok()?;
        v["site_lag"]
            .as_array()?
            .iter()
            .all(|l| l["entries"] == 0)
            .then_some(())
    })?;
    for other in ["hokkaido", "fukuoka"] {
        wan.partition("osaka", other, Partition::Drop)?;
        wan.partition(other, "osaka", Partition::Drop)?;
    }
    // Writes osaka acknowledges within its lease: they become its divergent tail.
    fio(&[
        "--name=divergent".into(),
        // Fresh random data per write: no block repeats, so none crosses by reference.
        "--refill_buffers".into(),
        "--ioengine=nbd".into(),
        format!("--uri=nbd://{}/fo", osaka.nbd),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        "--iodepth=1".into(),
        "--size=4M".into(),
        "--runtime=2".into(),
        "--time_based".into(),
    ])?;
    let at_hokkaido = AdminClient::with_timeout(&hokkaido.admin, Duration::from_secs(60));
    let plan = at_hokkaido.failover_plan("hokkaido", &["fo".to_string()])?;
    let id = plan["plan"].as_str().context("plan id")?.to_owned();
    let executed = Instant::now();
    at_hokkaido.failover_execute(&id, true)?;
    // The first write at the new home: it waits out the old lease, then is answered.
    let ok = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 8M 4k"])
        .arg(format!("nbd://{}/fo", hokkaido.nbd))
        .stdout(Stdio::null())
        .status()?;
    if !ok.success() {
        bail!("the first write at the new home failed");
    }
    let first_write_s = executed.elapsed().as_secs_f64();
    eprintln!("[5/5] first write at hokkaido {first_write_s:.2} s after execute");
    // The new home writes 4 MiB the old one did not.
    fio(&[
        "--name=newhome".into(),
        // Fresh random data per write: no block repeats, so none crosses by reference.
        "--refill_buffers".into(),
        "--ioengine=nbd".into(),
        format!("--uri=nbd://{}/fo", hokkaido.nbd),
        "--rw=write".into(),
        "--bs=64k".into(),
        "--iodepth=4".into(),
        "--offset=16M".into(),
        "--size=4M".into(),
    ])?;
    let new_blocks = (4 << 20) / 4096 + 1;
    wan.heal()?;
    let d = wait_until(120, "osaka's divergent report", || {
        let d = at_hokkaido.divergent("fo").ok()?;
        let reps = d["replicas"].as_array()?;
        (!reps.is_empty() && reps.iter().all(|r| r.get("error").is_none())).then_some(d)
    })?;
    let reps = d["replicas"].as_array().cloned().unwrap_or_default();
    let divergent_blocks = reps
        .iter()
        .filter_map(|r| r["blocks"].as_u64())
        .max()
        .unwrap_or(0);
    let complete = reps.iter().all(|r| r["complete"] == true);
    let differ = (divergent_blocks + new_blocks) * 4096;
    let replicas = reps.len() as u64;
    let before = m.wire_bytes_to("osaka");
    at_hokkaido.discard_divergent("fo", None)?;
    wait_until(300, "osaka's replicas to resync", || {
        let v = at_hokkaido.volume("fo").ok()?;
        let learners: Vec<u64> = v["learners"]
            .as_array()?
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        let osaka_ids: Vec<u64> = m
            .sites
            .iter()
            .find(|s| s.name == "osaka")?
            .nodes
            .iter()
            .map(|n| n.id)
            .collect();
        let whole = osaka_ids.iter().all(|id| {
            learners.contains(id)
                && m.nodes().find(|n| n.id == *id).is_some_and(|n| {
                    AdminClient::with_timeout(&n.admin, Duration::from_secs(5))
                        .status()
                        .ok()
                        .and_then(|st| {
                            st["groups"]
                                .as_array()?
                                .iter()
                                .find(|g| g["group"] == v["id"])
                                .map(|g| g["recovering"] == false && g["fenced"] == false)
                        })
                        .unwrap_or(false)
                })
        });
        (whole && v["moving"].is_null()).then_some(())
    })?;
    let resync = m.wire_bytes_to("osaka") - before;
    let per_replica = resync as f64 / replicas.max(1) as f64;
    let ratio = per_replica / differ.max(1) as f64;
    eprintln!("[5/5] resync: {resync} bytes to osaka for {replicas} replicas; {differ} bytes differ ({ratio:.2}x per replica)");
    let before = m.wire_bytes_to("osaka");
    admin.move_volume("fo", "osaka")?;
    wait_until(300, "fo's move back to osaka", || {
        let v = admin.volume("fo").ok()?;
        (v["home_site"] == "osaka" && v["moving"].is_null()).then_some(())
    })?;
    let moved = m.wire_bytes_to("osaka") - before;
    let data = DATA_MIB << 20;
    let _ = logs;
    let lease_s = 4.0;
    Ok(json!({
        "scenario": "forced failover osaka -> hokkaido, failback and move back",
        "first_write_after_execute_s": first_write_s,
        "resync_wire_bytes": resync, "replicas_resynced": replicas,
        "divergent_blocks": divergent_blocks, "divergent_report_complete": complete,
        "new_home_blocks": new_blocks, "differing_bytes": differ,
        "resync_per_replica_over_differing": ratio,
        "move_back_wire_bytes": moved, "move_back_over_data": moved as f64 / data as f64,
        "goal": format!("first write <= lease + 2 s ({:.0} s); resync <= 1.2x the differing bytes per replica; move back < 10 % of the data", lease_s + 2.0),
        "met": first_write_s <= lease_s + 2.0 && ratio <= 1.2 && (moved as f64) < 0.1 * data as f64,
    }))
}

/// Writes a raw image of `size` bytes laid out like a fresh VM disk: this machine's
/// shared libraries and binaries at 4 KiB-aligned places, with runs of zeros (free
/// space) between them. Returns the bytes of non-zero 4 KiB blocks (what a copy writes).
fn vm_like_image(path: &Path, size: u64) -> Result<u64> {
    let mut img = vec![0u8; size as usize];
    let mut at = 1usize << 20;
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in ["/usr/lib/x86_64-linux-gnu", "/usr/bin"] {
        if let Ok(rd) = std::fs::read_dir(dir) {
            files.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()));
        }
    }
    files.sort();
    for (i, f) in files.iter().enumerate() {
        let Ok(bytes) = std::fs::read(f) else {
            continue;
        };
        if bytes.len() > img.len() / 8 || bytes.len() > img.len() - at {
            continue;
        }
        img[at..at + bytes.len()].copy_from_slice(&bytes);
        at = (at + bytes.len()).next_multiple_of(4096);
        // Free space between files, every few files.
        if i % 5 == 4 {
            at += 64 << 10;
        }
        if at >= img.len() * 7 / 8 {
            break;
        }
    }
    std::fs::write(path, &img)?;
    Ok(img
        .chunks(4096)
        .filter(|b| b.iter().any(|x| *x != 0))
        .count() as u64
        * 4096)
}
