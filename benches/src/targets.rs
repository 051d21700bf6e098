//! Several servers measured side by side in one run (`cluster-bench`): the same rows on
//! each target, interleaved per repeat, with the device bytes each target's processes
//! wrote per client byte (`/proc/PID/io`), an import row (`qemu-img convert`), and the
//! device's own limits measured in the same run.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::{median, run_fio, run_qemu_img_bench, Client, Row, Sample};

/// A server under test: its NBD URI and the processes whose writes to the device count
/// as its own (replicas, OSDs).
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub name: String,
    pub uri: String,
    pub pids: Vec<u32>,
}

/// Bytes a process sent to the storage layer (`write_bytes` less `cancelled_write_bytes`
/// of `/proc/PID/io`: page-cache writes count when dirtied, and dirty pages truncated
/// before writeback are cancelled).
pub fn device_write_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let field = |name: &str| -> Option<u64> {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    Some(field("write_bytes:")?.saturating_sub(field("cancelled_write_bytes:").unwrap_or(0)))
}

fn snapshot(pids: &[u32]) -> Vec<Option<u64>> {
    pids.iter().map(|&p| device_write_bytes(p)).collect()
}

/// Device bytes written per client byte, per process, between two snapshots.
fn amplification(before: &[Option<u64>], after: &[Option<u64>], client_bytes: u64) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .filter_map(|(b, a)| Some((a.as_ref()? - b.as_ref()?) as f64 / client_bytes as f64))
        .collect()
}

/// One target's figures for one row: the median sample, and for a write row of
/// `qemu-img bench` (a known number of bytes) the device bytes per client byte of each
/// of its processes, from the median run.
#[derive(Clone, Debug, Serialize)]
pub struct TargetResult {
    pub target: String,
    pub sample: Sample,
    /// Every run's sample, in order (all of them are reported).
    pub runs: Vec<Sample>,
    pub device_bytes_per_client_byte: Vec<f64>,
}

#[derive(Debug, Serialize)]
pub struct RowResult {
    pub row: Row,
    pub targets: Vec<TargetResult>,
}

/// Runs every row on every target, `repeat` times, the targets interleaved within each
/// repeat (so that drift over the run hits all of them alike).
pub fn measure_targets(
    rows: Vec<Row>,
    targets: &[Target],
    size: u64,
    runtime_secs: u64,
    repeat: usize,
) -> Result<Vec<RowResult>> {
    let mut results = Vec::new();
    for row in rows {
        let mut runs: Vec<Vec<(Sample, Vec<f64>)>> = vec![Vec::new(); targets.len()];
        for _ in 0..repeat {
            for (i, t) in targets.iter().enumerate() {
                let before = snapshot(&t.pids);
                let (s, client_bytes) = match row.client {
                    Client::Fio => (run_fio(&row, &t.uri, size, runtime_secs)?, None),
                    Client::QemuImgBench => {
                        let guess = if row.write { 8_000 } else { 20_000 };
                        let (s, count) =
                            run_qemu_img_bench_counted(&row, &t.uri, size, runtime_secs, guess)?;
                        (s, Some(count * row.block_bytes))
                    }
                };
                let amp = match (row.write, client_bytes) {
                    (true, Some(b)) => amplification(&before, &snapshot(&t.pids), b),
                    _ => Vec::new(),
                };
                runs[i].push((s, amp));
            }
        }
        let mut per = Vec::new();
        for (t, r) in targets.iter().zip(runs) {
            let samples: Vec<Sample> = r.iter().map(|(s, _)| *s).collect();
            let m = median(samples.clone());
            let amp = r
                .iter()
                .find(|(s, _)| s.iops == m.iops)
                .map(|(_, a)| a.clone())
                .unwrap_or_default();
            eprintln!(
                "{:?} {:<28} {:<10} {:>9.0} IOPS {:>8.1} MiB/s",
                row.client, row.name, t.name, m.iops, m.mib_per_s
            );
            per.push(TargetResult {
                target: t.name.clone(),
                sample: m,
                runs: samples,
                device_bytes_per_client_byte: amp,
            });
        }
        results.push(RowResult { row, targets: per });
    }
    Ok(results)
}

/// `run_qemu_img_bench`, also returning the number of requests it made.
fn run_qemu_img_bench_counted(
    row: &Row,
    uri: &str,
    size: u64,
    runtime_secs: u64,
    guess: u64,
) -> Result<(Sample, u64)> {
    let count = crate::qemu_img_bench_count(row, size, runtime_secs, guess);
    Ok((
        run_qemu_img_bench(row, uri, size, runtime_secs, guess)?,
        count,
    ))
}

/// One import: `qemu-img convert` of `source` (raw) into a target.
#[derive(Clone, Debug, Serialize)]
pub struct Import {
    pub target: String,
    pub secs: f64,
    pub mib_per_s: f64,
    pub device_bytes_per_client_byte: Vec<f64>,
}

/// `qemu-img convert -n` of `source` into each target, `repeat` times interleaved; every
/// run is returned.
pub fn import_into(source: &Path, targets: &[Target], repeat: usize) -> Result<Vec<Import>> {
    let bytes = std::fs::metadata(source)?.len();
    let mut out = Vec::new();
    for _ in 0..repeat {
        for t in targets {
            let before = snapshot(&t.pids);
            let t0 = Instant::now();
            let st = Command::new("qemu-img")
                .args([
                    "convert", "-n", "-f", "raw", "-O", "raw", "-t", "none", "-W",
                ])
                .arg(source)
                .arg(&t.uri)
                .status()
                .context("run qemu-img convert")?;
            let secs = t0.elapsed().as_secs_f64();
            if !st.success() {
                bail!("qemu-img convert into {} failed", t.name);
            }
            let amp = amplification(&before, &snapshot(&t.pids), bytes);
            eprintln!(
                "import {:<10} {:.2} s ({:.1} MiB/s)",
                t.name,
                secs,
                bytes as f64 / secs / (1 << 20) as f64
            );
            out.push(Import {
                target: t.name.clone(),
                secs,
                mib_per_s: bytes as f64 / secs / (1 << 20) as f64,
                device_bytes_per_client_byte: amp,
            });
        }
    }
    Ok(out)
}

/// What the device under the benchmark's directory can do, measured with fio in the
/// same run: direct 1 MiB writes at QD8, and 4 KiB writes each followed by fdatasync.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Device {
    pub direct_1m_qd8_mib_per_s: f64,
    pub fdatasync_4k_lat_us: f64,
    pub fdatasync_4k_iops: f64,
}

pub fn measure_device(dir: &Path, runtime_secs: u64) -> Result<Device> {
    let file = dir.join("fio-device-test");
    let fio = |args: &[&str]| -> Result<serde_json::Value> {
        fio_json(
            Command::new("fio")
                .args(["--name=device", "--output-format=json", "--time_based"])
                .arg(format!("--filename={}", file.display()))
                .arg(format!("--runtime={runtime_secs}"))
                .args(args)
                .output()
                .context("run fio (package fio)")?,
        )
    };
    let bw = fio(&[
        "--rw=write",
        "--bs=1M",
        "--iodepth=8",
        "--direct=1",
        "--ioengine=libaio",
        "--size=1G",
    ])?;
    let sync = fio(&["--rw=write", "--bs=4k", "--fdatasync=1", "--size=64M"])?;
    let _ = std::fs::remove_file(&file);
    let w = &bw["jobs"][0]["write"];
    let s = &sync["jobs"][0];
    Ok(Device {
        direct_1m_qd8_mib_per_s: w["bw_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
        fdatasync_4k_lat_us: s["sync"]["lat_ns"]["mean"].as_f64().unwrap_or(0.0) / 1000.0,
        fdatasync_4k_iops: s["write"]["iops"].as_f64().unwrap_or(0.0),
    })
}

/// Markdown: one column of MiB/s (IOPS for 4 KiB rows) per target, roamdisk against the
/// others, each write row as a fraction of the physical limit (the device's bandwidth
/// shared by `replicas`), and device bytes per client byte per process.
pub fn targets_table(results: &[RowResult], ours: &str, device: &Device, replicas: u32) -> String {
    let names: Vec<&str> = results
        .first()
        .map(|r| r.targets.iter().map(|t| t.target.as_str()).collect())
        .unwrap_or_default();
    let others: Vec<&str> = names.iter().copied().filter(|n| *n != ours).collect();
    let limit = device.direct_1m_qd8_mib_per_s / replicas as f64;
    let mut md = String::from("| client | workload |");
    for n in &names {
        md.push_str(&format!(" {n} |"));
    }
    for o in &others {
        md.push_str(&format!(" {ours} / {o} |"));
    }
    md.push_str(" of physical limit | device bytes per client byte |\n|---|---|");
    for _ in 0..names.len() + others.len() + 2 {
        md.push_str("---:|");
    }
    md.push('\n');
    for r in results {
        let small = r.row.block_bytes < 1 << 20;
        let fig = |s: &Sample| {
            if small {
                format!("{:.0} IOPS", s.iops)
            } else {
                format!("{:.1} MiB/s", s.mib_per_s)
            }
        };
        md.push_str(&format!(
            "| {} | {} |",
            match r.row.client {
                Client::Fio => "fio nbd",
                Client::QemuImgBench => "qemu-img bench",
            },
            r.row.name
        ));
        for t in &r.targets {
            md.push_str(&format!(" {} |", fig(&t.sample)));
        }
        let mine = r.targets.iter().find(|t| t.target == ours);
        for o in &others {
            let theirs = r.targets.iter().find(|t| t.target == *o);
            match (mine, theirs) {
                (Some(m), Some(t)) if t.sample.iops > 0.0 => {
                    md.push_str(&format!(" **{:.2}** |", m.sample.iops / t.sample.iops))
                }
                _ => md.push_str(" - |"),
            }
        }
        match mine.filter(|_| r.row.write && limit > 0.0) {
            Some(m) => md.push_str(&format!(" {:.2} |", m.sample.mib_per_s / limit)),
            None => md.push_str(" - |"),
        }
        let amps: Vec<String> = r
            .targets
            .iter()
            .filter(|t| !t.device_bytes_per_client_byte.is_empty())
            .map(|t| {
                format!(
                    "{}: {}",
                    t.target,
                    t.device_bytes_per_client_byte
                        .iter()
                        .map(|a| format!("{a:.2}"))
                        .collect::<Vec<_>>()
                        .join("/")
                )
            })
            .collect();
        md.push_str(&format!(
            " {} |\n",
            if amps.is_empty() {
                "-".into()
            } else {
                amps.join("; ")
            }
        ));
    }
    md
}

/// A small writer's tail latency alone and beside a large-write stream on another
/// volume: fio 4 KiB random writes at QD1 on `small`, then the same while fio writes
/// 1 MiB sequentially at QD8 on `large`.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Fairness {
    pub alone_p99_us: f64,
    pub beside_large_p99_us: f64,
    pub alone_iops: f64,
    pub beside_large_iops: f64,
    pub large_mib_per_s: f64,
}

fn fio_job(uri: &str, rw: &str, bs: &str, depth: u32, size: u64, runtime_secs: u64) -> Command {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=job",
        "--ioengine=nbd",
        "--output-format=json",
        "--time_based",
    ])
    .arg(format!("--uri={uri}"))
    .arg(format!("--rw={rw}"))
    .arg(format!("--bs={bs}"))
    .arg(format!("--iodepth={depth}"))
    .arg(format!("--size={size}"))
    .arg(format!("--runtime={runtime_secs}"))
    .arg("--ramp_time=1");
    cmd
}

fn fio_json(out: std::process::Output) -> Result<serde_json::Value> {
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find('{').context("fio printed no JSON")?;
    Ok(serde_json::from_str(&text[start..])?)
}

fn p99_us(v: &serde_json::Value) -> f64 {
    v["jobs"][0]["write"]["clat_ns"]["percentile"]["99.000000"]
        .as_f64()
        .unwrap_or(0.0)
        / 1000.0
}

pub fn measure_fairness(
    small: &str,
    large: &str,
    size: u64,
    runtime_secs: u64,
) -> Result<Fairness> {
    let alone = fio_json(
        fio_job(small, "randwrite", "4k", 1, size, runtime_secs)
            .output()
            .context("run fio")?,
    )?;
    let big = fio_job(large, "write", "1M", 8, size, runtime_secs + 2)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("run fio")?;
    // The large stream's ramp (1 s) passes before the small writer's starts measuring.
    let beside = fio_json(
        fio_job(small, "randwrite", "4k", 1, size, runtime_secs)
            .output()
            .context("run fio")?,
    )?;
    let big = fio_json(big.wait_with_output()?)?;
    Ok(Fairness {
        alone_p99_us: p99_us(&alone),
        beside_large_p99_us: p99_us(&beside),
        alone_iops: alone["jobs"][0]["write"]["iops"].as_f64().unwrap_or(0.0),
        beside_large_iops: beside["jobs"][0]["write"]["iops"].as_f64().unwrap_or(0.0),
        large_mib_per_s: big["jobs"][0]["write"]["bw_bytes"].as_f64().unwrap_or(0.0)
            / (1 << 20) as f64,
    })
}
