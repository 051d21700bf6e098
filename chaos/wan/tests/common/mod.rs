//! Test servers and measurements shared by the integration tests: an echo server, a
//! sink that records what it receives, ping RTTs, a bulk sender, and `wait_until`
//! (waiting for a measured condition with a deadline; the tests never sleep to
//! synchronise).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use roamdisk_wan::{Wan, WanConfig, WanProfile};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Deadline for anything a test waits for.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A Wan with sites `a` and `b` (LAN profile unless given).
pub fn wan_ab(profile: WanProfile) -> Result<Wan> {
    init_tracing();
    Ok(Wan::new(WanConfig {
        profile,
        seed: 1,
        sites: vec!["a".into(), "b".into()],
        ..WanConfig::default()
    })?)
}

/// An echo server; returns its address and a counter of bytes it has received.
pub async fn echo_server() -> Result<(SocketAddr, Arc<AtomicU64>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let received = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&received);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    counter.fetch_add(n as u64, Ordering::SeqCst);
                    if s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok((addr, received))
}

/// What a sink connection received, reported when the sender closes.
pub struct Received {
    pub data: Vec<u8>,
    /// When the first and the last byte were read.
    pub first_at: Option<Instant>,
    pub last_at: Option<Instant>,
}

/// A server that reads each connection to its end and reports what it got.
pub async fn sink_server() -> Result<(SocketAddr, mpsc::UnboundedReceiver<Received>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut r = Received {
                    data: Vec::new(),
                    first_at: None,
                    last_at: None,
                };
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let now = Instant::now();
                            r.first_at.get_or_insert(now);
                            r.last_at = Some(now);
                            r.data.extend_from_slice(&buf[..n]);
                        }
                    }
                }
                let _ = tx.send(r);
            });
        }
    });
    Ok((addr, rx))
}

/// Round-trip times of `n` sequential 64-byte pings on one connection.
pub async fn ping(stream: &mut TcpStream, n: usize) -> Result<Vec<Duration>> {
    stream.set_nodelay(true)?;
    let msg = [0x5au8; 64];
    let mut back = [0u8; 64];
    let mut rtts = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        stream.write_all(&msg).await.context("send ping")?;
        tokio::time::timeout(DEADLINE, stream.read_exact(&mut back))
            .await
            .context("ping timed out")?
            .context("read pong")?;
        rtts.push(t.elapsed());
        if back != msg {
            bail!("pong differs from ping");
        }
    }
    Ok(rtts)
}

pub async fn ping_addr(addr: SocketAddr, n: usize) -> Result<Vec<Duration>> {
    let mut s = TcpStream::connect(addr).await?;
    ping(&mut s, n).await
}

pub fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

pub fn ms_f(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Connects to `addr`, sends `data`, closes the write side.
pub async fn send_all(addr: SocketAddr, data: Arc<Vec<u8>>) -> Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&data).await?;
    s.shutdown().await?;
    Ok(())
}

/// Polls `cond` every millisecond until it holds; fails after `deadline`.
pub async fn wait_until(
    what: &str,
    deadline: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if cond() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Whether a read on `s` reports the end of the connection (EOF or an error) within
/// `deadline`. Data that still arrives is skipped.
pub async fn sees_connection_end(s: &mut TcpStream, deadline: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let end = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(deadline, end).await.is_ok()
}

/// A child process that is killed (and reaped) when the guard is dropped, so that a
/// failing test does not leave it running.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
