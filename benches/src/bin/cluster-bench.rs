//! `cluster-bench`: a 3-replica volume on a local playground (three real node processes,
//! Raft with synced logs on every replica) against qemu-nbd on a raw file and, when
//! `../shared/ceph-peer` and Ceph's packages are installed, a 3-way Ceph RBD image
//! exported by qemu-nbd: the same clients on each, side by side in one run.
//!
//! ```text
//! cargo build --release --bins && target/release/cluster-bench [--size-mib 256] [--runtime-secs 5] [--no-ceph]
//! ```
//! Rows: 4k random write QD32 with a FLUSH every 32 writes, 4k random write QD1, 4k random
//! read QD32, 1M sequential write and read (fio nbd and qemu-img bench, writes with
//! non-zero data), and the import of `--import-mib` of random data with `qemu-img
//! convert`. Also: the device's direct-write bandwidth and fdatasync latency (fio, same
//! run), each write row as a fraction of the physical limit (device bandwidth / 3),
//! device bytes written per client byte per node (`/proc/PID/io`), and the peak RSS of
//! each node. Writes `benches/results/cluster.{json,md}` and appends to `cluster-runs.md`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use roamdisk_benches::targets::{
    import_into, measure_device, measure_targets, targets_table, Target,
};
use roamdisk_benches::{
    fill_image, free_port, row, start_qemu_nbd, wait_listening, Client, Server,
};
use roamdisk_playground::Manifest;

#[derive(Parser, Debug)]
#[command(about = "Benchmark a replicated roamdisk volume against qemu-nbd and Ceph RBD")]
struct Args {
    /// Bytes of the volume the workloads touch, in MiB (written first so reads hit data).
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    #[arg(long, default_value_t = 5)]
    runtime_secs: u64,
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Bytes of random data the import row copies in with `qemu-img convert`, in MiB.
    #[arg(long, default_value_t = 1024)]
    import_mib: u64,
    /// Where Ceph's peer scripts are (`start.sh`, `get-qemu-rbd.sh`).
    #[arg(long, default_value = "../shared/ceph-peer")]
    ceph_peer: PathBuf,
    /// Leave Ceph out even when it is installed.
    #[arg(long)]
    no_ceph: bool,
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

fn installed(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The Ceph peer: `start.sh` (idempotent) brings up 1 mon, 1 mgr and 3 BlueStore OSDs
/// with a 3-way pool and an image, and qemu-nbd exports the image (librbd inside,
/// `--cache=none`, as `../shared/ceph-peer/bench.sh` does).
struct Ceph {
    nbd: Server,
    osds: Vec<u32>,
}

fn start_ceph(peer: &Path, image_mib: u64) -> Result<Ceph> {
    let state = PathBuf::from("/tmp/cephpeer/cluster");
    let modules = PathBuf::from("/tmp/cephpeer/qemu-modules");
    if !modules.join("block-rbd.so").exists() {
        let st = Command::new("bash")
            .arg(peer.join("get-qemu-rbd.sh"))
            .stdout(Stdio::null())
            .status()
            .context("run get-qemu-rbd.sh")?;
        if !st.success() {
            bail!("get-qemu-rbd.sh failed");
        }
    }
    eprintln!("starting the Ceph peer ({})", peer.display());
    let out = Command::new("bash")
        .arg(peer.join("start.sh"))
        .env("CEPH_PEER_DIR", &state)
        .env("CEPH_PEER_IMAGE_SIZE", format!("{image_mib}M"))
        .env("CEPH_PEER_OSD_SIZE", "6G")
        .stderr(Stdio::inherit())
        .output()
        .context("run ceph-peer start.sh")?;
    if !out.status.success() {
        bail!("ceph-peer start.sh failed");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let spec = text
        .lines()
        .find_map(|l| l.strip_prefix("QEMU_SPEC="))
        .context("start.sh printed no QEMU_SPEC")?
        .to_owned();
    let mut osds = Vec::new();
    for e in std::fs::read_dir(state.join("pids"))? {
        let e = e?;
        if e.file_name().to_string_lossy().starts_with("osd") {
            if let Ok(p) = std::fs::read_to_string(e.path())?.trim().parse() {
                osds.push(p);
            }
        }
    }
    let port = free_port()?;
    let child = Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "-b",
            "127.0.0.1",
            "-x",
            "img1",
            "--cache=none",
            "--persistent",
        ])
        .args(["--shared=16", "-p", &port.to_string()])
        .arg(&spec)
        .env("QEMU_MODULE_DIR", &modules)
        .env("CEPH_CONF", state.join("ceph.conf"))
        .stdout(Stdio::null())
        .spawn()
        .context("start qemu-nbd on the Ceph image")?;
    wait_listening(port)?;
    Ok(Ceph {
        nbd: Server {
            child,
            uri: format!("nbd://127.0.0.1:{port}/img1"),
        },
        osds,
    })
}

fn nbdcopy(from: &Path, to: &str) -> Result<()> {
    let st = Command::new("nbdcopy")
        .arg(from)
        .arg(to)
        .status()
        .context("run nbdcopy (package libnbd-bin)")?;
    if !st.success() {
        bail!("nbdcopy prefill of {to} failed");
    }
    Ok(())
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
    let volume_mib = args.size_mib.max(args.import_mib);
    let base = 40000 + (std::process::id() % 1000) as u16 * 3;

    // The device first, while nothing else runs.
    let device = measure_device(dir.path(), args.runtime_secs)?;
    eprintln!(
        "device: direct 1M QD8 {:.0} MiB/s; 4k write + fdatasync {:.0} µs",
        device.direct_1m_qd8_mib_per_s, device.fdatasync_4k_lat_us
    );

    let mut playground = Command::new(&roamdisk)
        .args(["playground", "--dir"])
        .arg(dir.path().join("pg"))
        .args([
            "--base-port",
            &base.to_string(),
            // One site: this compares the local 3-replica write path with the others.
            "--sites",
            "osaka",
            "--volume",
            &format!("vm1:{volume_mib}M"),
            // A second volume for the fairness row (a small writer beside vm1's stream).
            "--volume",
            &format!("vm2:{}M", args.size_mib),
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
    let ours = Target {
        name: "roamdisk".into(),
        uri: format!("nbd://{}/vm1", node.nbd),
        pids: manifest.nodes().map(|n| n.pid).collect(),
    };

    let image = dir.path().join("qemu.img");
    fill_image(&image, volume_mib << 20)?;
    let prefill = dir.path().join("prefill.img");
    fill_image(&prefill, size)?;
    let qemu = start_qemu_nbd(&image)?;
    let qemu_target = Target {
        name: "qemu-nbd".into(),
        uri: qemu.uri.clone(),
        pids: vec![qemu.child.id()],
    };
    let ceph = if args.no_ceph {
        None
    } else if !args.ceph_peer.join("start.sh").exists() || !installed("ceph-osd") {
        eprintln!(
            "no Ceph rows: {} or Ceph's packages are not installed (see its README)",
            args.ceph_peer.display()
        );
        None
    } else {
        Some(start_ceph(&args.ceph_peer, volume_mib)?)
    };
    let mut targets = vec![qemu_target];
    if let Some(c) = &ceph {
        targets.push(Target {
            name: "ceph-rbd".into(),
            uri: c.nbd.uri.clone(),
            pids: c.osds.clone(),
        });
    }
    targets.push(ours.clone());
    for t in targets.iter().filter(|t| t.name != "qemu-nbd") {
        eprintln!("prefilling {} with {} MiB", t.name, args.size_mib);
        nbdcopy(&prefill, &t.uri)?;
    }

    use Client::*;
    let rows = vec![
        row(Fio, "4k randwrite QD32 flush/32", true, true, 4096, 32, 32),
        row(Fio, "4k randwrite QD1", true, true, 4096, 1, 0),
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
    let results = measure_targets(rows, &targets, size, args.runtime_secs, args.repeat)?;
    let source = dir.path().join("import.img");
    fill_image(&source, args.import_mib << 20)?;
    let imports = import_into(&source, &targets, args.repeat)?;
    // Fairness: vm2's small writer, alone and beside vm1's 1 MiB stream (both led by
    // the same node when the playground put them there; said in the table).
    let vm2 = admin.volume("vm2")?;
    let vm2_leader = vm2["leader"].as_u64().context("vm2 leader")?;
    let vm2_node = manifest
        .nodes()
        .find(|n| n.id == vm2_leader)
        .context("vm2 leader in manifest")?;
    let small = format!("nbd://{}/vm2", vm2_node.nbd);
    let mut fairness = Vec::new();
    for _ in 0..args.repeat {
        let f = roamdisk_benches::targets::measure_fairness(
            &small,
            &ours.uri,
            size,
            args.runtime_secs,
        )?;
        eprintln!(
            "fairness: 4k QD1 p99 alone {:.0} µs, beside 1M stream {:.0} µs ({:.2}x)",
            f.alone_p99_us,
            f.beside_large_p99_us,
            f.beside_large_p99_us / f.alone_p99_us
        );
        fairness.push(f);
    }
    let rss: Vec<(u64, Option<f64>)> = manifest
        .nodes()
        .map(|n| (n.id, peak_rss_mib(n.pid)))
        .collect();
    drop(qemu);
    drop(ceph);
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(playground.id() as i32, libc::SIGINT) };
    let _ = playground.wait();

    let mut md = format!(
        "Device (fio on the same filesystem, this run): direct 1 MiB writes QD8 **{:.0} MiB/s** \
         (physical limit for 3 replicas sharing it: {:.0} MiB/s); 4 KiB write + fdatasync \
         {:.0} µs ({:.0} IOPS).\n\n",
        device.direct_1m_qd8_mib_per_s,
        device.direct_1m_qd8_mib_per_s / 3.0,
        device.fdatasync_4k_lat_us,
        device.fdatasync_4k_iops
    );
    md.push_str(&targets_table(&results, "roamdisk", &device, 3));
    md.push_str(&format!(
        "\nImport: `qemu-img convert -n -t none -W` of {} MiB of random data (every run, in order)\n\n\
         | target | seconds | MiB/s | of physical limit | device bytes per client byte |\n|---|---:|---:|---:|---:|\n",
        args.import_mib
    ));
    for i in &imports {
        md.push_str(&format!(
            "| {} | {:.2} | {:.1} | {} | {} |\n",
            i.target,
            i.secs,
            i.mib_per_s,
            if i.target == "roamdisk" {
                format!(
                    "{:.2}",
                    i.mib_per_s / (device.direct_1m_qd8_mib_per_s / 3.0)
                )
            } else {
                "-".into()
            },
            i.device_bytes_per_client_byte
                .iter()
                .map(|a| format!("{a:.2}"))
                .collect::<Vec<_>>()
                .join("/")
        ));
    }
    md.push_str(&format!(
        "\nFairness: fio 4 KiB random writes QD1 on vm2 (led by node {vm2_leader}), alone and \
         beside fio 1 MiB sequential writes QD8 on vm1 (led by node {leader}); every run, \
         goal ≤ 2×\n\n| p99 alone µs | p99 beside µs | ratio | IOPS alone | IOPS beside | 1M stream MiB/s |\n\
         |---:|---:|---:|---:|---:|---:|\n"
    ));
    for f in &fairness {
        md.push_str(&format!(
            "| {:.0} | {:.0} | **{:.2}** | {:.0} | {:.0} | {:.1} |\n",
            f.alone_p99_us,
            f.beside_large_p99_us,
            f.beside_large_p99_us / f.alone_p99_us,
            f.alone_iops,
            f.beside_large_iops,
            f.large_mib_per_s
        ));
    }
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
        "import_mib": args.import_mib,
        "runtime_secs": args.runtime_secs,
        "repeat": args.repeat,
        "replicas": 3,
        "leader_node": leader,
        "device": device,
        "targets": targets,
        "peak_rss_mib": rss,
        "rows": results,
        "imports": imports,
        "fairness": fairness,
    });
    std::fs::write(
        args.out.join("cluster.json"),
        serde_json::to_string_pretty(&meta)?,
    )?;
    std::fs::write(args.out.join("cluster.md"), &md)?;
    eprintln!("wrote {}/cluster.json and cluster.md", args.out.display());
    Ok(())
}
