//! Delay and jitter measured over real sockets: an echo server behind a route.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::*;
use roamdisk_wan::{ms, Wan, WanConfig, WanProfile};

/// Extra round-trip time allowed over the emulated one: timer granularity (1 ms per
/// direction) plus scheduling on a busy 2-core machine.
const SLACK: Duration = Duration::from_millis(5);

fn set_delay(wan: &Wan, one_way: Duration, jitter: Duration) -> Result<()> {
    for (from, to) in [("a", "b"), ("b", "a")] {
        wan.update(from, to, |p| {
            p.delay = one_way;
            p.jitter = jitter;
        })?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtt_is_twice_the_one_way_delay() -> Result<()> {
    let wan = wan_ab(WanProfile::Lan)?;
    let (echo, _) = echo_server().await?;
    let route = wan.route("a", "b", echo).await?;
    let d = ms(15);
    set_delay(&wan, d, Duration::ZERO)?;
    let rtts = ping_addr(route, 21).await?;
    let (min, med) = (
        rtts.iter().min().copied().unwrap_or_default(),
        median(&rtts),
    );
    println!(
        "one-way {d:?}: RTT min {:.2} ms, median {:.2} ms",
        ms_f(min),
        ms_f(med)
    );
    assert!(min >= 2 * d, "an RTT of {min:?} is below 2 x {d:?}");
    assert!(
        med <= 2 * d + SLACK,
        "median RTT {med:?} above 2 x {d:?} + {SLACK:?}"
    );
    wan.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_is_per_direction() -> Result<()> {
    let wan = wan_ab(WanProfile::Lan)?;
    let (echo, _) = echo_server().await?;
    let route = wan.route("a", "b", echo).await?;
    wan.update("a", "b", |p| p.delay = ms(20))?;
    let rtts = ping_addr(route, 11).await?;
    let med = median(&rtts);
    println!("a->b 20 ms, b->a 0: median RTT {:.2} ms", ms_f(med));
    assert!(med >= ms(20) && med <= ms(20) + SLACK, "median RTT {med:?}");

    // The same delay on the reverse direction only: a route b -> a sees it on requests.
    wan.update("a", "b", |p| p.delay = Duration::ZERO)?;
    wan.update("b", "a", |p| p.delay = ms(20))?;
    let reverse = wan.route("b", "a", echo).await?;
    let med = median(&ping_addr(reverse, 11).await?);
    assert!(med >= ms(20) && med <= ms(20) + SLACK, "median RTT {med:?}");
    wan.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jitter_spreads_rtt_within_bounds() -> Result<()> {
    let wan = wan_ab(WanProfile::Lan)?;
    let (echo, _) = echo_server().await?;
    let route = wan.route("a", "b", echo).await?;
    let (d, j) = (ms(10), ms(10));
    set_delay(&wan, d, j)?;
    let rtts = ping_addr(route, 40).await?;
    let min = rtts.iter().min().copied().unwrap_or_default();
    let max = rtts.iter().max().copied().unwrap_or_default();
    println!(
        "one-way {d:?} + jitter {j:?}: RTT min {:.2} median {:.2} max {:.2} ms",
        ms_f(min),
        ms_f(median(&rtts)),
        ms_f(max)
    );
    assert!(min >= 2 * d, "RTT {min:?} below 2D");
    // Two uniform [0, J] samples per round trip: 40 of them spanning less than J/2 is
    // practically impossible; without jitter the spread is below a millisecond.
    assert!(max - min >= j / 2, "jitter not visible: {min:?}..{max:?}");
    // Every RTT, not just the median, stays inside the bound (allowing one outlier
    // for a descheduled thread).
    let over: Vec<_> = rtts
        .iter()
        .filter(|r| **r > 2 * d + 2 * j + SLACK)
        .collect();
    assert!(over.len() <= 1, "RTTs above 2D + 2J + slack: {over:?}");
    wan.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_change_applies_to_live_connection() -> Result<()> {
    let wan = wan_ab(WanProfile::Lan)?;
    let (echo, _) = echo_server().await?;
    let route = wan.route("a", "b", echo).await?;
    set_delay(&wan, ms(5), Duration::ZERO)?;
    let mut conn = tokio::net::TcpStream::connect(route).await?;
    let before = median(&ping(&mut conn, 11).await?);
    set_delay(&wan, ms(25), Duration::ZERO)?;
    let after = median(&ping(&mut conn, 11).await?);
    set_delay(&wan, Duration::ZERO, Duration::ZERO)?;
    let lan = median(&ping(&mut conn, 11).await?);
    println!(
        "same connection: 5 ms -> median {:.2} ms; 25 ms -> {:.2} ms; 0 -> {:.2} ms",
        ms_f(before),
        ms_f(after),
        ms_f(lan)
    );
    assert!(before >= ms(10) && before <= ms(10) + SLACK, "{before:?}");
    assert!(after >= ms(50) && after <= ms(50) + SLACK, "{after:?}");
    assert!(lan <= SLACK, "{lan:?}");
    wan.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sinet5_profile_round_trip_times() -> Result<()> {
    init_tracing();
    let wan = Wan::new(WanConfig {
        profile: WanProfile::Sinet5,
        seed: 7,
        ..WanConfig::default()
    })?;
    let (echo, _) = echo_server().await?;
    for (a, b, rtt) in [
        ("osaka", "hokkaido", ms(20)),
        ("osaka", "fukuoka", ms(15)),
        ("hokkaido", "fukuoka", ms(30)),
    ] {
        let route = wan.route(a, b, echo).await?;
        let med = median(&ping_addr(route, 21).await?);
        println!(
            "sinet5 {a}-{b}: median RTT {:.2} ms (profile {rtt:?})",
            ms_f(med)
        );
        // Jitter is 0.5 ms per direction.
        assert!(med >= rtt && med <= rtt + ms(1) + SLACK, "{a}-{b}: {med:?}");
    }
    wan.shutdown().await;
    Ok(())
}
