//! `cluster-bench`: a 3-replica volume on a local playground (three real node processes,
//! Raft with synced logs on every replica) against qemu-nbd on a raw file, same clients.
//!
//! ```text
//! cargo build --release --bins && target/release/cluster-bench [--size-mib 256] [--runtime-secs 5]
//! ```
//! Rows: 4k random write QD32 with a FLUSH every 32 writes, 4k random read QD32, 1M
//! sequential write and read (fio nbd and qemu-img bench). Also records the peak RSS of
//! each node. Writes `benches/results/cluster.{json,md}`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use roamdisk_benches::{fill_image, measure, row, start_qemu_nbd, table, Client};
use roamdisk_playground::Manifest;

#[derive(Parser, Debug)]
#[command(about = "Benchmark a replicated roamdisk volume against qemu-nbd")]
struct Args {
    /// Bytes of the volume the workloads touch, in MiB (written first so reads hit data).
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    #[arg(long, default_value_t = 5)]
    runtime_secs: u64,
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
}

/// Peak resident set of a process, from /proc (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let roamdisk = std::env::current_exe()?.with_file_name("roamdisk");
    if !roamdisk.exists() {
        bail!(
            "{} not found: build it first with `cargo build --release --bins`",
            roamdisk.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let size = args.size_mib << 20;
    let base = 40000 + (std::process::id() % 1000) as u16 * 3;
    let mut playground = Command::new(&roamdisk)
        .args(["playground", "--dir"])
        .arg(dir.path().join("pg"))
        .args([
            "--base-port",
            &base.to_string(),
            // One site: this compares the local 3-replica write path with qemu-nbd.
            "--sites",
            "osaka",
            "--volume",
            &format!("vm1:{}M", args.size_mib),
        ])
        .stdout(Stdio::null())
        .spawn()
        .context("start roamdisk playground")?;
    let manifest_path = dir.path().join("pg").join("playground.json");
    let deadline = Instant::now() + Duration::from_secs(90);
    while !manifest_path.exists() {
        if Instant::now() > deadline || playground.try_wait()?.is_some() {
            bail!("playground did not start");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let manifest = Manifest::load(&dir.path().join("pg"))?;
    // Run against the volume leader's node (where a hypervisor at home would attach).
    let admin = roamdisk_admin_client::AdminClient::new(&manifest.sites[0].nodes[0].admin);
    let leader = admin.volume("vm1")?["leader"]
        .as_u64()
        .context("volume leader")?;
    let node = manifest
        .nodes()
        .find(|n| n.id == leader)
        .context("leader in manifest")?;
    let ours = format!("nbd://{}/vm1", node.nbd);

    let image = dir.path().join("qemu.img");
    fill_image(&image, size)?;
    let qemu = start_qemu_nbd(&image)?;
    eprintln!("prefilling the roamdisk volume with {} MiB", args.size_mib);
    let st = Command::new("nbdcopy")
        .arg(&image)
        .arg(&ours)
        .status()
        .context("run nbdcopy (package libnbd-bin)")?;
    if !st.success() {
        bail!("nbdcopy prefill failed");
    }

    use Client::*;
    let rows = vec![
        row(Fio, "4k randwrite QD32 flush/32", true, true, 4096, 32, 32),
        row(Fio, "4k randread QD32", false, true, 4096, 32, 0),
        row(Fio, "1M seq write QD8", true, false, 1 << 20, 8, 0),
        row(Fio, "1M seq read QD8", false, false, 1 << 20, 8, 0),
        row(
            QemuImgBench,
            "4k write QD32 flush/32",
            true,
            false,
            4096,
            32,
            32,
        ),
        row(QemuImgBench, "4k read QD32", false, false, 4096, 32, 0),
        row(QemuImgBench, "1M seq write QD8", true, false, 1 << 20, 8, 0),
        row(QemuImgBench, "1M seq read QD8", false, false, 1 << 20, 8, 0),
    ];
    let results = measure(rows, &qemu.uri, &ours, size, args.runtime_secs, args.repeat)?;
    let rss: Vec<(u64, Option<f64>)> = manifest
        .nodes()
        .map(|n| (n.id, peak_rss_mib(n.pid)))
        .collect();
    drop(qemu);
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(playground.id() as i32, libc::SIGINT) };
    let _ = playground.wait();

    let mut md = table(&results, "qemu-nbd");
    md.push_str("\nPeak RSS per node (VmHWM): ");
    md.push_str(
        &rss.iter()
            .map(|(id, r)| {
                format!(
                    "node {id}: {}",
                    r.map_or("?".into(), |r| format!("{r:.0} MiB"))
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
    );
    md.push('\n');
    println!("{md}");
    std::fs::create_dir_all(&args.out)?;
    let meta = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "size_mib": args.size_mib,
        "runtime_secs": args.runtime_secs,
        "repeat": args.repeat,
        "replicas": 3,
        "leader_node": leader,
        "peak_rss_mib": rss,
        "rows": results,
    });
    std::fs::write(
        args.out.join("cluster.json"),
        serde_json::to_string_pretty(&meta)?,
    )?;
    std::fs::write(args.out.join("cluster.md"), md)?;
    eprintln!("wrote {}/cluster.json and cluster.md", args.out.display());
    Ok(())
}
