//! Shared benchmark machinery: the servers under test, the two client drivers (fio's nbd
//! engine and `qemu-img bench`), medians and the result table. Binaries: `nbd-bench`
//! (the NBD front end against qemu-nbd on one raw file) and `cluster-bench` (a
//! replicated volume on the playground against qemu-nbd). `plot`: PNG charts of results.

pub mod plot;
pub mod targets;

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// A server process under test, killed on drop.
pub struct Server {
    pub child: Child,
    pub uri: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until a TCP connect succeeds (qemu-nbd prints nothing when ready).
pub fn wait_listening(port: u16) -> Result<()> {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!("server on port {port} did not start listening within 5 s")
}

/// qemu-nbd as the ceiling: `-t -e 0 --discard=unmap`, writeback page cache.
pub fn start_qemu_nbd(image: &Path) -> Result<Server> {
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

pub fn start_roamdisk_nbd(bin: &Path, image: &Path) -> Result<Server> {
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
pub enum Client {
    QemuImgBench,
    Fio,
}

/// One workload.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub client: Client,
    pub name: &'static str,
    pub write: bool,
    pub random: bool,
    pub block_bytes: u64,
    pub depth: u32,
    /// Send a FLUSH after this many writes (0: never).
    pub flush_every: u32,
}

pub fn row(
    client: Client,
    name: &'static str,
    write: bool,
    random: bool,
    block_bytes: u64,
    depth: u32,
    flush_every: u32,
) -> Row {
    Row {
        client,
        name,
        write,
        random,
        block_bytes,
        depth,
        flush_every,
    }
}

#[derive(Clone, Copy, Debug, Serialize, Default)]
pub struct Sample {
    pub iops: f64,
    pub mib_per_s: f64,
    /// Mean completion latency (fio only).
    pub lat_mean_us: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Measured {
    pub row: Row,
    pub baseline: Sample,
    pub roamdisk: Sample,
    pub ratio: f64,
}

/// Runs `row` with fio's nbd engine against `uri` over the first `size` bytes.
pub fn run_fio(row: &Row, uri: &str, size: u64, runtime_secs: u64) -> Result<Sample> {
    let rw = match (row.write, row.random) {
        (false, true) => "randread",
        (true, true) => "randwrite",
        (false, false) => "read",
        (true, false) => "write",
    };
    let mut cmd = Command::new("fio");
    cmd.args([
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
        &format!("--runtime={runtime_secs}"),
        "--ramp_time=1",
        "--output-format=json",
    ]);
    if row.flush_every > 0 {
        cmd.arg(format!("--fsync={}", row.flush_every));
    }
    let out = cmd.output().context("run fio (package fio)")?;
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

/// The requests `run_qemu_img_bench` makes for `row`: twice the region for large
/// blocks, else the guessed rate for the runtime.
pub fn qemu_img_bench_count(row: &Row, size: u64, runtime_secs: u64, rate_guess: u64) -> u64 {
    if row.block_bytes >= 1 << 20 {
        (size / row.block_bytes).max(64) * 2
    } else {
        rate_guess * runtime_secs.max(1)
    }
}

/// Runs `row` with `qemu-img bench` (sequential by construction) against `uri`. Writes
/// carry a non-zero pattern (zeros would let a server skip work a guest makes it do).
pub fn run_qemu_img_bench(
    row: &Row,
    uri: &str,
    size: u64,
    runtime_secs: u64,
    rate_guess: u64,
) -> Result<Sample> {
    let count = qemu_img_bench_count(row, size, runtime_secs, rate_guess);
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
        cmd.args(["-w", "--pattern=165"]);
        if row.flush_every > 0 {
            cmd.arg(format!("--flush-interval={}", row.flush_every));
        }
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

pub fn median(mut v: Vec<Sample>) -> Sample {
    v.sort_by(|a, b| a.iops.total_cmp(&b.iops));
    v[v.len() / 2]
}

/// Writes `size` bytes of non-zero pseudo-random data to `path`.
pub fn fill_image(path: &Path, size: u64) -> Result<()> {
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

/// Measures every row on the baseline and on roamdisk, alternating, `repeat` times each,
/// and keeps the medians.
pub fn measure(
    rows: Vec<Row>,
    baseline: &str,
    ours: &str,
    size: u64,
    runtime_secs: u64,
    repeat: usize,
) -> Result<Vec<Measured>> {
    let mut results = Vec::new();
    for row in rows {
        let mut b = Vec::new();
        let mut r = Vec::new();
        for _ in 0..repeat {
            let run = |uri: &str| match row.client {
                Client::Fio => run_fio(&row, uri, size, runtime_secs),
                Client::QemuImgBench => run_qemu_img_bench(
                    &row,
                    uri,
                    size,
                    runtime_secs,
                    if row.write { 8_000 } else { 20_000 },
                ),
            };
            b.push(run(baseline)?);
            r.push(run(ours)?);
        }
        let (b, r) = (median(b), median(r));
        let ratio = r.iops / b.iops;
        eprintln!(
            "{:?} {:<28} baseline {:>9.0} IOPS  roamdisk {:>9.0} IOPS  ratio {:.2}",
            row.client, row.name, b.iops, r.iops, ratio
        );
        results.push(Measured {
            row,
            baseline: b,
            roamdisk: r,
            ratio,
        });
    }
    Ok(results)
}

/// Markdown table of results; `baseline` names the baseline column.
pub fn table(results: &[Measured], baseline: &str) -> String {
    let mut md = format!(
        "| client | workload | {baseline} IOPS | roamdisk IOPS | {baseline} MiB/s | roamdisk MiB/s | {baseline} lat µs | roamdisk lat µs | ratio |\n"
    );
    md.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for m in results {
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
            m.baseline.iops,
            m.roamdisk.iops,
            m.baseline.mib_per_s,
            m.roamdisk.mib_per_s,
            lat(&m.baseline),
            lat(&m.roamdisk),
            m.ratio
        ));
    }
    md
}
