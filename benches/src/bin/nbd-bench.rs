//! `nbd-bench`: roamdisk-nbd against qemu-nbd on the same raw file, same clients.
//!
//! Both servers run at once on one image (different ports) with the same cache mode
//! (page cache, writeback: qemu-nbd's default, `-t -e 0 --discard=unmap`). Each row is
//! measured on qemu-nbd and then on roamdisk-nbd, `--repeat` times, alternating, and
//! the median is kept, so drift on a busy machine hits both alike.
//!
//! ```text
//! cargo build --release --bins && target/release/nbd-bench [--size-mib 512] [--runtime-secs 5]
//! ```
//! Writes `benches/results/nbd.json` and `benches/results/nbd.md`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(
    about = "Benchmark roamdisk-nbd against qemu-nbd with qemu-img bench and fio's nbd engine"
)]
struct Args {
    /// Image size in MiB (filled with non-zero data so reads hit data, not holes).
    #[arg(long, default_value_t = 512)]
    size_mib: u64,
    /// Seconds per fio run.
    #[arg(long, default_value_t = 5)]
    runtime_secs: u64,
    /// Runs per row and server; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Directory for the image (default: a temp dir on the same filesystem as /tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// roamdisk-nbd binary (default: next to this one).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Where to write nbd.json and nbd.md.
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
}

struct Server {
    child: Child,
    uri: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until a TCP connect succeeds (qemu-nbd prints nothing when ready).
fn wait_listening(port: u16) -> Result<()> {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!("server on port {port} did not start listening within 5 s")
}

fn start_qemu_nbd(image: &Path) -> Result<Server> {
    let port = free_port()?;
    let child = Command::new("qemu-nbd")
        .args([
            "-t",
            "-e",
            "0",
            "--discard=unmap",
            "--cache=writeback",
            "-f",
            "raw",
            "-x",
            "vm1",
            "-b",
            "127.0.0.1",
        ])
        .args(["-p", &port.to_string()])
        .arg(image)
        .stdout(Stdio::null())
        .spawn()
        .context("start qemu-nbd (package qemu-utils)")?;
    wait_listening(port)?;
    Ok(Server {
        child,
        uri: format!("nbd://127.0.0.1:{port}/vm1"),
    })
}

fn start_roamdisk(bin: &Path, image: &Path) -> Result<Server> {
    let port = free_port()?;
    let child = Command::new(bin)
        .args(["--file"])
        .arg(image)
        .args(["--name", "vm1", "--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("start {}", bin.display()))?;
    wait_listening(port)?;
    Ok(Server {
        child,
        uri: format!("nbd://127.0.0.1:{port}/vm1"),
    })
}

#[derive(Clone, Copy, Debug, Serialize)]
enum Client {
    QemuImgBench,
    Fio,
}

#[derive(Clone, Debug, Serialize)]
struct Row {
    client: Client,
    name: &'static str,
    write: bool,
    random: bool,
    block_bytes: u64,
    depth: u32,
}

#[derive(Debug, Serialize)]
struct Measured {
    row: Row,
    qemu_nbd: Sample,
    roamdisk: Sample,
    ratio: f64,
}

#[derive(Clone, Copy, Debug, Serialize, Default)]
struct Sample {
    iops: f64,
    mib_per_s: f64,
    /// Mean completion latency (fio only).
    lat_mean_us: Option<f64>,
}

fn rows() -> Vec<Row> {
    let r = |client, name, write, random, block_bytes, depth| Row {
        client,
        name,
        write,
        random,
        block_bytes,
        depth,
    };
    use Client::*;
    vec![
        r(Fio, "4k randread QD1", false, true, 4096, 1),
        r(Fio, "4k randread QD32", false, true, 4096, 32),
        r(Fio, "4k randwrite QD1", true, true, 4096, 1),
        r(Fio, "4k randwrite QD32", true, true, 4096, 32),
        r(Fio, "1M seq read QD8", false, false, 1 << 20, 8),
        r(Fio, "1M seq write QD8", true, false, 1 << 20, 8),
        r(QemuImgBench, "4k read QD1", false, false, 4096, 1),
        r(QemuImgBench, "4k read QD32", false, false, 4096, 32),
        r(QemuImgBench, "4k write QD1", true, false, 4096, 1),
        r(QemuImgBench, "4k write QD32", true, false, 4096, 32),
        r(QemuImgBench, "1M seq read QD8", false, false, 1 << 20, 8),
        r(QemuImgBench, "1M seq write QD8", true, false, 1 << 20, 8),
    ]
}

fn run_fio(row: &Row, uri: &str, size: u64, runtime: u64) -> Result<Sample> {
    let rw = match (row.write, row.random) {
        (false, true) => "randread",
        (true, true) => "randwrite",
        (false, false) => "read",
        (true, false) => "write",
    };
    let out = Command::new("fio")
        .args([
            "--name=bench",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            &format!("--rw={rw}"),
        ])
        .arg(format!("--bs={}", row.block_bytes))
        .arg(format!("--iodepth={}", row.depth))
        .arg(format!("--size={size}"))
        .args([
            "--time_based",
            &format!("--runtime={runtime}"),
            "--ramp_time=1",
            "--output-format=json",
        ])
        .output()
        .context("run fio (package fio)")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find('{').context("fio printed no JSON")?;
    let v: serde_json::Value = serde_json::from_str(&text[start..]).context("parse fio JSON")?;
    let side = &v["jobs"][0][if row.write { "write" } else { "read" }];
    let iops = side["iops"].as_f64().context("fio iops")?;
    Ok(Sample {
        iops,
        mib_per_s: side["bw_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
        lat_mean_us: side["clat_ns"]["mean"].as_f64().map(|ns| ns / 1000.0),
    })
}

fn run_qemu_img_bench(row: &Row, uri: &str, size: u64, runtime: u64) -> Result<Sample> {
    // Aim for about `runtime` seconds at a rough guess of the rate, then measure.
    let count = if row.block_bytes >= 1 << 20 {
        (size / row.block_bytes).max(64) * 2
    } else {
        20_000 * runtime.max(1)
    };
    let mut cmd = Command::new("qemu-img");
    cmd.args(["bench", "-f", "raw", "-t", "none", "-n"]).args([
        "-c",
        &count.to_string(),
        "-d",
        &row.depth.to_string(),
        "-s",
        &row.block_bytes.to_string(),
    ]);
    if row.write {
        cmd.arg("-w");
    }
    cmd.arg(uri);
    let t0 = std::time::Instant::now();
    let out = cmd.output().context("run qemu-img bench")?;
    let wall = t0.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "qemu-img bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // "Run completed in 1.234 seconds."
    let text = String::from_utf8_lossy(&out.stdout);
    let secs = text
        .split("Run completed in ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(wall);
    let iops = count as f64 / secs;
    Ok(Sample {
        iops,
        mib_per_s: iops * row.block_bytes as f64 / (1 << 20) as f64,
        lat_mean_us: None,
    })
}

fn median(mut v: Vec<Sample>) -> Sample {
    v.sort_by(|a, b| a.iops.total_cmp(&b.iops));
    v[v.len() / 2]
}

fn fill_image(path: &Path, size: u64) -> Result<()> {
    let mut f =
        std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..size / (1 << 20) {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf)?;
    }
    f.sync_all()?;
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let server_bin = match args.server_bin.clone() {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("roamdisk-nbd"),
    };
    if !server_bin.exists() {
        bail!(
            "{} not found: build it first with `cargo build --release --bins`",
            server_bin.display()
        );
    }
    let tmp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile_dir()?;
            tmp.clone()
        }
    };
    let image = dir.join("bench.img");
    let size = args.size_mib << 20;
    eprintln!("filling {} MiB image at {}", args.size_mib, image.display());
    fill_image(&image, size)?;

    let qemu = start_qemu_nbd(&image)?;
    let ours = start_roamdisk(&server_bin, &image)?;
    let mut results = Vec::new();
    for row in rows() {
        let mut q = Vec::new();
        let mut r = Vec::new();
        for _ in 0..args.repeat {
            let run = |uri: &str| match row.client {
                Client::Fio => run_fio(&row, uri, size, args.runtime_secs),
                Client::QemuImgBench => run_qemu_img_bench(&row, uri, size, args.runtime_secs),
            };
            q.push(run(&qemu.uri)?);
            r.push(run(&ours.uri)?);
        }
        let (q, r) = (median(q), median(r));
        let ratio = r.iops / q.iops;
        eprintln!(
            "{:?} {:<18} qemu-nbd {:>10.0} IOPS  roamdisk {:>10.0} IOPS  ratio {:.2}",
            row.client, row.name, q.iops, r.iops, ratio
        );
        results.push(Measured {
            row,
            qemu_nbd: q,
            roamdisk: r,
            ratio,
        });
    }
    drop(qemu);
    drop(ours);
    std::fs::remove_file(&image).ok();

    let mut md = String::new();
    md.push_str("| client | workload | qemu-nbd IOPS | roamdisk-nbd IOPS | qemu-nbd MiB/s | roamdisk MiB/s | qemu-nbd lat µs | roamdisk lat µs | ratio |\n");
    md.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for m in &results {
        let lat = |s: &Sample| {
            s.lat_mean_us
                .map(|l| format!("{l:.1}"))
                .unwrap_or_else(|| "-".into())
        };
        md.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {} | {} | **{:.2}** |\n",
            match m.row.client {
                Client::Fio => "fio nbd",
                Client::QemuImgBench => "qemu-img bench",
            },
            m.row.name,
            m.qemu_nbd.iops,
            m.roamdisk.iops,
            m.qemu_nbd.mib_per_s,
            m.roamdisk.mib_per_s,
            lat(&m.qemu_nbd),
            lat(&m.roamdisk),
            m.ratio
        ));
    }
    println!("{md}");
    std::fs::create_dir_all(&args.out)?;
    let meta = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "size_mib": args.size_mib,
        "runtime_secs": args.runtime_secs,
        "repeat": args.repeat,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "rows": results,
    });
    std::fs::write(
        args.out.join("nbd.json"),
        serde_json::to_string_pretty(&meta)?,
    )?;
    std::fs::write(args.out.join("nbd.md"), md)?;
    eprintln!("wrote {}/nbd.json and nbd.md", args.out.display());
    Ok(())
}

fn tempfile_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("roamdisk-nbd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
