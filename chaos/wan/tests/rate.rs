//! Bandwidth, sharing, the queue bound and data integrity, measured over real sockets.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::*;
use roamdisk_wan::WanProfile;

const MIB: u64 = 1024 * 1024;

fn assert_rate_near(what: &str, measured: f64, expected: f64) {
    let ratio = measured / expected;
    println!(
        "{what}: {:.2} MiB/s (limit {:.2} MiB/s, ratio {ratio:.3})",
        measured / MIB as f64,
        expected / MIB as f64
    );
    assert!(
        (0.85..=1.15).contains(&ratio),
        "{what}: {measured:.0} B/s is not within 15% of {expected:.0} B/s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_gets_the_bandwidth_and_data_is_intact() -> Result<()> {
    let wan = wan_ab(WanProfile::Lan)?;
    let rate = 8 * MIB;
    wan.update("a", "b", |p| p.bandwidth_bytes_per_sec = Some(rate))?;
    let (sink, mut received) = sink_server().await?;
    let route = wan.route("a", "b", sink).await?;
    let data = Arc::new(random_bytes(16 * MIB as usize, 1));
    let start = Instant::now();
    send_all(route, Arc::clone(&data)).await?;
    let got = tokio::time::timeout(DEADLINE, received.recv())
        .await?
        .context("sink closed")?;
    let elapsed = got.last_at.unwrap_or(start) - start;
    if got.data != *data {
        bail!(
            "data differs: {} bytes received of {}",
            got.data.len(),
            data.len()
        );
    }
    assert_rate_near(
        "1 connection",
        data.len() as f64 / elapsed.as_secs_f64(),
        rate as f64,
    );
    let stats = wan.stats("a", "b")?;
    assert_eq!(stats.bytes_forwarded, data.len() as u64);
    assert_eq!(stats.bytes_dropped, 0);
    wan.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connections_share_the_bandwidth() -> Result<()> {
    let wan = wan_ab(WanProfile::Lan)?;
    let rate = 8 * MIB;
    wan.update("a", "b", |p| p.bandwidth_bytes_per_sec = Some(rate))?;
    let (sink, mut received) = sink_server().await?;
    // Two routes (two node pairs) over the same site pair.
    let route1 = wan.route("a", "b", sink).await?;
    let (sink2, mut received2) = sink_server().await?;
    let route2 = wan.route("a", "b", sink2).await?;
    let each = 8 * MIB as usize;
    let (d1, d2) = (
        Arc::new(random_bytes(each, 2)),
        Arc::new(random_bytes(each, 3)),
    );
    let start = Instant::now();
    let (s1, s2) = tokio::join!(
        send_all(route1, Arc::clone(&d1)),
        send_all(route2, Arc::clone(&d2))
    );
    s1?;
    s2?;
    let (g1, g2) = tokio::join!(
        tokio::time::timeout(DEADLINE, received.recv()),
        tokio::time::timeout(DEADLINE, received2.recv())
    );
    let (g1, g2) = (g1?.context("sink 1")?, g2?.context("sink 2")?);
    assert!(g1.data == *d1 && g2.data == *d2, "data differs");
    let done1 = g1.last_at.unwrap_or(start) - start;
    let done2 = g2.last_at.unwrap_or(start) - start;
    let total = done1.max(done2);
    assert_rate_near(
        "2 connections, sum",
        (2 * each) as f64 / total.as_secs_f64(),
        rate as f64,
    );
    // Fair sharing: both finish close together (a connection served alone first would
    // finish at half the total time).
    let (first, last) = (done1.min(done2), done1.max(done2));
    println!("connections done after {first:?} and {last:?}");
    assert!(
        first.as_secs_f64() >= 0.8 * last.as_secs_f64(),
        "unfair sharing: {first:?} vs {last:?}"
    );
    wan.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_never_exceeds_its_limit() -> Result<()> {
    let wan = wan_ab(WanProfile::Lan)?;
    let limit = 256 * 1024;
    wan.update("a", "b", |p| {
        p.bandwidth_bytes_per_sec = Some(2 * MIB);
        p.delay = Duration::from_millis(20);
        p.queue_limit_bytes = Some(limit);
    })?;
    let (sink, mut received) = sink_server().await?;
    let route = wan.route("a", "b", sink).await?;
    let data = Arc::new(random_bytes(4 * MIB as usize, 4));
    let sender = tokio::spawn(send_all(route, Arc::clone(&data)));
    // Sample the counter through the whole transfer.
    let mut max_queued = 0;
    let mut samples = 0u64;
    let got = loop {
        let stats = wan.stats("a", "b")?;
        max_queued = max_queued.max(stats.bytes_queued);
        samples += 1;
        if let Ok(got) = received.try_recv() {
            break got;
        }
        if samples > DEADLINE.as_millis() as u64 {
            bail!("transfer did not finish");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    sender.await??;
    println!("queue limit {limit} B: max queued {max_queued} B over {samples} samples");
    assert!(got.data == *data, "data differs");
    assert!(max_queued <= limit, "queued {max_queued} > limit {limit}");
    // The queue did fill up (so the bound was what held the sender back).
    let chunk = 2 * MIB * 2 / 1000; // 2 ms at 2 MiB/s
    assert!(
        max_queued >= limit - 2 * chunk,
        "queue never filled: max {max_queued}"
    );
    wan.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_receiver_does_not_block_the_link() -> Result<()> {
    let wan = wan_ab(WanProfile::Lan)?;
    let rate = 16 * MIB;
    wan.update("a", "b", |p| p.bandwidth_bytes_per_sec = Some(rate))?;
    let window = wan.params("a", "b")?.queue_limit_effective_bytes();
    // A server that accepts and never reads.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let stalled = listener.local_addr()?;
    let holder = tokio::spawn(async move {
        let conn = listener.accept().await;
        std::future::pending::<()>().await;
        drop(conn);
    });
    let stalled_route = wan.route("a", "b", stalled).await?;
    let big = Arc::new(random_bytes(64 * MIB as usize, 6));
    let stuck_sender = tokio::spawn(send_all(stalled_route, big));
    // Wait until the stalled connection has taken what it can: forwarding stops growing
    // (its receiver's kernel buffers are full) while the sender is still blocked.
    // "Stops growing" = unchanged over 100 samples, 1 ms apart (a 16 MiB/s link moves a
    // chunk every 2 ms).
    let (mut last, mut unchanged) = (u64::MAX, 0);
    wait_until("stalled connection saturated", DEADLINE, || {
        let now = wan.stats("a", "b").map(|s| s.bytes_forwarded).unwrap_or(0);
        unchanged = if now == last && now > 0 {
            unchanged + 1
        } else {
            0
        };
        last = now;
        unchanged >= 100
    })
    .await?;
    let queued = wan.stats("a", "b")?.bytes_queued;
    println!(
        "stalled connection: {last} B forwarded, {queued} B left in the link (window {window} B)"
    );
    // Its unwritten bytes (at most a window) wait at its writer, outside the link.
    assert_eq!(queued, 0, "a stalled connection holds link queue space");

    // Another connection over the same link still gets the bandwidth.
    let (sink, mut received) = sink_server().await?;
    let route = wan.route("a", "b", sink).await?;
    let data = Arc::new(random_bytes(16 * MIB as usize, 7));
    let start = Instant::now();
    send_all(route, Arc::clone(&data)).await?;
    let got = tokio::time::timeout(DEADLINE, received.recv())
        .await?
        .context("sink closed")?;
    assert!(got.data == *data, "data differs");
    let elapsed = got.last_at.unwrap_or(start) - start;
    assert_rate_near(
        "beside a stalled connection",
        data.len() as f64 / elapsed.as_secs_f64(),
        rate as f64,
    );
    assert!(!stuck_sender.is_finished(), "the stalled sender finished");
    holder.abort();
    wan.shutdown().await;
    Ok(())
}
