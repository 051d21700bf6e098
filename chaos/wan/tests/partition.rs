//! Partitions (hold, drop), resets, half-close, connection limits and shutdown, over real
//! sockets.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use common::*;
use roamdisk_wan::{ms, Partition, Wan, WanConfig, WanProfile};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long a negative check ("nothing arrives") watches.
const QUIET: Duration = Duration::from_millis(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_keeps_bytes_until_heal_then_delivers_them_in_order() -> Result<()> {
    let wan = wan_ab(WanProfile::Lan)?;
    let (echo, echoed) = echo_server().await?;
    let route = wan.route("a", "b", echo).await?;
    let mut conn = TcpStream::connect(route).await?;
    ping(&mut conn, 3).await?;
    let before = echoed.load(Ordering::SeqCst);

    wan.partition("a", "b", Partition::Hold)?;
    let data = random_bytes(512 * 1024, 9);
    conn.write_all(&data).await?;
    // The bytes are inside the link ...
    wait_until("bytes held in the link", DEADLINE, || {
        wan.stats("a", "b").map(|s| s.bytes_queued).unwrap_or(0) >= data.len() as u64
    })
    .await?;
    // ... and stay there: the server receives nothing while the link is held.
    let mut buf = [0u8; 1];
    let early = tokio::time::timeout(QUIET, conn.read(&mut buf)).await;
    assert!(early.is_err(), "a reply arrived during the partition");
    assert_eq!(
        echoed.load(Ordering::SeqCst),
        before,
        "server got bytes during hold"
    );

    wan.heal_all();
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(DEADLINE, conn.read_exact(&mut back))
        .await
        .context("echo after heal timed out")??;
    assert!(back == data, "bytes after heal differ");
    assert_eq!(wan.stats("a", "b")?.bytes_queued, 0);
    wan.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_hold_stalls_only_that_direction() -> Result<()> {
    let wan = wan_ab(WanProfile::Lan)?;
    let (echo, echoed) = echo_server().await?;
    let route = wan.route("a", "b", echo).await?;
    let mut conn = TcpStream::connect(route).await?;
    ping(&mut conn, 1).await?;
    wan.partition("b", "a", Partition::Hold)?;
    conn.write_all(b"hello").await?;
    // The request crosses a -> b ...
    wait_until("request at the server", DEADLINE, || {
        echoed.load(Ordering::SeqCst) >= 64 + 5
    })
    .await?;
    // ... the reply is held in b -> a.
    let mut buf = [0u8; 5];
    assert!(tokio::time::timeout(QUIET, conn.read_exact(&mut buf))
        .await
        .is_err());
    wan.partition("b", "a", Partition::None)?;
    tokio::time::timeout(DEADLINE, conn.read_exact(&mut buf)).await??;
    assert_eq!(&buf, b"hello");
    wan.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_backpressure_stops_the_sender() -> Result<()> {
    let wan = wan_ab(WanProfile::Lan)?;
    let limit = 64 * 1024;
    wan.update("a", "b", |p| p.queue_limit_bytes = Some(limit))?;
    let (sink, mut received) = sink_server().await?;
    let route = wan.route("a", "b", sink).await?;
    wan.partition("a", "b", Partition::Hold)?;
    let data = Arc::new(random_bytes(32 * 1024 * 1024, 10));
    let sender = tokio::spawn(send_all(route, Arc::clone(&data)));
    // The held link holds data. (Not "nearly full": without a bandwidth the emulator
    // reads chunks of up to 64 KiB, as much as the socket has, and a chunk that does not
    // fit waits, so under load the queue may stop at any size; waiting for 48 KiB then
    // timed out.)
    wait_until("link holding data", DEADLINE, || {
        wan.stats("a", "b").map(|s| s.bytes_queued).unwrap_or(0) > 0
    })
    .await?;
    // 32 MiB cannot fit in the link plus the kernel's socket buffers: the sender blocks.
    let blocked = tokio::time::timeout(QUIET, async {
        while !sender.is_finished() {
            tokio::time::sleep(ms(1)).await;
        }
    })
    .await;
    assert!(
        blocked.is_err(),
        "sender finished although the link is held"
    );
    assert!(wan.stats("a", "b")?.bytes_queued <= limit);
    wan.heal_all();
    sender.await??;
    let got = tokio::time::timeout(DEADLINE, received.recv())
        .await?
        .context("sink closed")?;
    assert!(got.data == *data, "data differs after heal");
    wan.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_resets_connections_and_refuses_new_ones_until_healed() -> Result<()> {
    let wan = wan_ab(WanProfile::Lan)?;
    let (echo, _) = echo_server().await?;
    let route = wan.route("a", "b", echo).await?;
    let mut conn = TcpStream::connect(route).await?;
    ping(&mut conn, 2).await?;
    assert_eq!(wan.stats("a", "b")?.connections_open, 1);

    // A one-way drop breaks the connection: TCP needs both directions.
    wan.partition("b", "a", Partition::Drop)?;
    assert!(
        sees_connection_end(&mut conn, DEADLINE).await,
        "existing connection survived the partition"
    );
    wait_until("connection unregistered", DEADLINE, || {
        wan.stats("a", "b").map(|s| s.connections_open).unwrap_or(1) == 0
    })
    .await?;
    assert_eq!(wan.stats("a", "b")?.connections_reset, 1);

    // New connections fail.
    match ping_addr(route, 1).await {
        Ok(_) => bail!("a new connection worked across a dropped link"),
        Err(e) => println!("new connection during drop: {e:#}"),
    }
    assert!(wan.stats("a", "b")?.connections_refused >= 1);

    wan.heal_all();
    let rtts = ping_addr(route, 3).await?;
    assert_eq!(rtts.len(), 3);
    wan.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_breaks_current_connections_only() -> Result<()> {
    let wan = wan_ab(WanProfile::Lan)?;
    let (echo, _) = echo_server().await?;
    let route = wan.route("a", "b", echo).await?;
    let reverse = wan.route("b", "a", echo).await?;
    let mut c1 = TcpStream::connect(route).await?;
    let mut c2 = TcpStream::connect(reverse).await?;
    ping(&mut c1, 1).await?;
    ping(&mut c2, 1).await?;
    let n = wan.reset("b", "a")?;
    assert_eq!(n, 2, "both connections between a and b are reset");
    for c in [&mut c1, &mut c2] {
        let mut buf = [0u8; 1];
        match tokio::time::timeout(DEADLINE, c.read(&mut buf)).await? {
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
            Ok(n) => bail!("expected a reset, read returned {n}"),
        }
    }
    // No partition: a new connection works at once.
    ping_addr(route, 2).await?;
    wan.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_is_propagated_after_the_data() -> Result<()> {
    let wan = wan_ab(WanProfile::Lan)?;
    wan.update("a", "b", |p| p.delay = ms(10))?;
    wan.update("b", "a", |p| p.delay = ms(10))?;
    // A server that reads to EOF, then answers with the byte count and closes.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let server = listener.local_addr()?;
    tokio::spawn(async move {
        if let Ok((mut s, _)) = listener.accept().await {
            let mut all = Vec::new();
            if s.read_to_end(&mut all).await.is_ok() {
                let _ = s.write_all(all.len().to_string().as_bytes()).await;
            }
        }
    });
    let route = wan.route("a", "b", server).await?;
    let mut conn = TcpStream::connect(route).await?;
    conn.write_all(&random_bytes(100_000, 3)).await?;
    conn.shutdown().await?;
    let mut answer = String::new();
    tokio::time::timeout(DEADLINE, conn.read_to_string(&mut answer)).await??;
    assert_eq!(answer, "100000");
    wait_until("connection closed", DEADLINE, || {
        wan.stats("a", "b").map(|s| s.connections_open).unwrap_or(1) == 0
    })
    .await?;
    let stats = wan.stats("a", "b")?;
    assert_eq!((stats.connections_reset, stats.bytes_dropped), (0, 0));
    wan.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_route_limit_are_reset() -> Result<()> {
    init_tracing();
    let wan = Wan::new(WanConfig {
        sites: vec!["a".into(), "b".into()],
        connections_per_route_max: 2,
        ..WanConfig::default()
    })?;
    let (echo, _) = echo_server().await?;
    let route = wan.route("a", "b", echo).await?;
    let mut c1 = TcpStream::connect(route).await?;
    let mut c2 = TcpStream::connect(route).await?;
    ping(&mut c1, 1).await?;
    ping(&mut c2, 1).await?;
    assert!(
        ping_addr(route, 1).await.is_err(),
        "third connection worked"
    );
    drop(c1);
    wait_until("first connection closed", DEADLINE, || {
        wan.stats("a", "b").map(|s| s.connections_open).unwrap_or(2) < 2
    })
    .await?;
    ping_addr(route, 1).await?;
    wan.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_listeners_and_connections() -> Result<()> {
    let wan = wan_ab(WanProfile::Lan)?;
    let (echo, _) = echo_server().await?;
    let route = wan.route("a", "b", echo).await?;
    let mut conn = TcpStream::connect(route).await?;
    ping(&mut conn, 1).await?;
    tokio::time::timeout(DEADLINE, wan.shutdown()).await?;
    assert!(sees_connection_end(&mut conn, DEADLINE).await);
    assert!(
        TcpStream::connect(route).await.is_err(),
        "listener still open"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_wan_stops_it() -> Result<()> {
    let wan = wan_ab(WanProfile::Lan)?;
    let (echo, _) = echo_server().await?;
    let route = wan.route("a", "b", echo).await?;
    let mut conn = TcpStream::connect(route).await?;
    ping(&mut conn, 1).await?;
    drop(wan);
    assert!(sees_connection_end(&mut conn, DEADLINE).await);
    Ok(())
}
