//! The emulator's own cost on this machine, which the profiles' bandwidths are chosen
//! against (see the `profile` module). The emulator runs as the `roamdisk-wan` binary so
//! that its CPU time is measured apart from the sender's and the receiver's.
//!
//! Ignored by default: the unlimited run keeps both cores busy for a second or two, which
//! would disturb the timing tests that nextest runs beside it. Run it alone:
//! `cargo test -p roamdisk-wan --release --test throughput -- --ignored --nocapture`.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MIB: usize = 1024 * 1024;

/// Starts the binary with one route osaka -> hokkaido to `target`; returns it and the
/// route's address.
async fn start_emulator(profile: &str, target: SocketAddr) -> Result<(ChildGuard, SocketAddr)> {
    let child = Command::new(env!("CARGO_BIN_EXE_roamdisk-wan"))
        .args(["--profile", profile, "--route"])
        .arg(format!("osaka:hokkaido:127.0.0.1:0={target}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("start roamdisk-wan")?;
    let mut child = ChildGuard(child);
    let stdout = child.0.stdout.take().context("no stdout")?;
    let line = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout).lines().next().and_then(|l| l.ok())
    });
    let line = tokio::time::timeout(DEADLINE, line)
        .await??
        .context("no route line")?;
    // "route osaka -> hokkaido: LISTEN -> TARGET"
    let addr = line
        .split(": ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .context("bad route line")?;
    Ok((child, addr.parse()?))
}

/// User + system CPU time of a process so far.
fn cpu_of(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit(") ").next().context("bad stat")?;
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// Sends `total` bytes through the emulator; returns (MiB/s, emulator CPU-seconds/GiB).
async fn measure(profile: &str, total: usize) -> Result<(f64, f64)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let sink = listener.local_addr()?;
    let counter = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut n_total = 0usize;
        loop {
            match s.read(&mut buf).await? {
                0 => return Ok::<usize, std::io::Error>(n_total),
                n => n_total += n,
            }
        }
    });
    let (child, route) = start_emulator(profile, sink).await?;
    let block = Arc::new(random_bytes(MIB, 5));
    let cpu_before = cpu_of(child.0.id())?;
    let start = Instant::now();
    let mut s = TcpStream::connect(route).await?;
    for _ in 0..total / MIB {
        s.write_all(&block).await?;
    }
    s.shutdown().await?;
    let got = tokio::time::timeout(DEADLINE, counter).await???;
    let elapsed = start.elapsed();
    let cpu = cpu_of(child.0.id())? - cpu_before;
    drop(child);
    if got != total {
        bail!("received {got} of {total} bytes");
    }
    let rate = total as f64 / elapsed.as_secs_f64() / MIB as f64;
    let cpu_per_gib = cpu.as_secs_f64() * (1024 * MIB) as f64 / total as f64;
    Ok((rate, cpu_per_gib))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement that saturates the CPU; run alone with --ignored"]
async fn emulator_throughput_and_cpu_cost() -> Result<()> {
    let (rate, cpu) = measure("lan", 512 * MIB).await?;
    println!("lan (unlimited): {rate:.0} MiB/s, emulator {cpu:.2} CPU-s per GiB");
    assert!(rate > 50.0, "emulator throughput only {rate:.0} MiB/s");
    let (rate, cpu_sinet5) = measure("sinet5", 150 * MIB).await?;
    println!(
        "sinet5 (50 MiB/s): {rate:.1} MiB/s, emulator {cpu_sinet5:.2} CPU-s per GiB = {:.0}% \
         of one core at 50 MiB/s",
        cpu_sinet5 * 50.0 / 1024.0 * 100.0
    );
    assert!(rate > 40.0, "sinet5 link ran at {rate:.1} MiB/s");
    Ok(())
}
