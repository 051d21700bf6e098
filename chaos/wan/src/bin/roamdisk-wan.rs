//! `roamdisk-wan`: runs the WAN emulator as its own process.
//!
//! ```text
//! roamdisk-wan --profile sinet5 --control 127.0.0.1:7000 \
//!     --route osaka:hokkaido:127.0.0.1:9000=127.0.0.1:9100 \
//!     --route hokkaido:osaka:127.0.0.1:9001=127.0.0.1:9200
//! ```
//! Each `--route FROM:TO:LISTEN=TARGET` listens on LISTEN and forwards to TARGET over the
//! link FROM → TO (replies TO → FROM). Runs until SIGINT or SIGTERM.

use std::net::SocketAddr;

use anyhow::{bail, Context, Result};
use clap::Parser;
use roamdisk_wan::{Wan, WanConfig, WanProfile};
use tracing::info;

#[derive(Debug, Parser)]
#[command(
    name = "roamdisk-wan",
    about = "Userspace WAN emulator between roamdisk sites"
)]
struct Args {
    /// Link profile: lan, sinet5 or wide-2010.
    #[arg(long, default_value = "lan")]
    profile: WanProfile,
    /// Seed of the jitter generators.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Serve the HTTP control API on this address.
    #[arg(long)]
    control: Option<SocketAddr>,
    /// Declare a site (links between declared sites exist before any route).
    #[arg(long = "site")]
    sites: Vec<String>,
    /// A route FROM:TO:LISTEN=TARGET, e.g. osaka:hokkaido:127.0.0.1:9000=127.0.0.1:9100.
    #[arg(long = "route")]
    routes: Vec<String>,
}

/// One `--route` argument.
#[derive(Debug, PartialEq)]
struct RouteSpec {
    from: String,
    to: String,
    listen: SocketAddr,
    target: SocketAddr,
}

fn parse_route(spec: &str) -> Result<RouteSpec> {
    let expected =
        "expected FROM:TO:LISTEN=TARGET, e.g. osaka:hokkaido:127.0.0.1:9000=127.0.0.1:9100";
    let Some((left, target)) = spec.split_once('=') else {
        bail!("route {spec:?}: {expected}");
    };
    let mut parts = left.splitn(3, ':');
    let (Some(from), Some(to), Some(listen)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("route {spec:?}: {expected}");
    };
    Ok(RouteSpec {
        from: from.to_owned(),
        to: to.to_owned(),
        listen: listen
            .parse()
            .with_context(|| format!("route {spec:?}: parse listen address {listen:?}"))?,
        target: target
            .parse()
            .with_context(|| format!("route {spec:?}: parse target address {target:?}"))?,
    })
}

/// One thread: the emulator needs a fraction of a core, and a single-threaded runtime
/// avoids waking a second worker for every chunk. Measured with `tests/throughput.rs`,
/// three alternating runs each against a 2-worker runtime: 0.66–0.86 instead of
/// 0.86–1.42 CPU-seconds per GiB unlimited, 2.5–2.6 instead of 2.9–3.1 at 50 MiB/s.
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    // Logs go to stderr: stdout carries the bound addresses, for scripts to read.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let routes = args
        .routes
        .iter()
        .map(|r| parse_route(r))
        .collect::<Result<Vec<_>>>()?;
    let wan = Wan::new(WanConfig {
        profile: args.profile,
        seed: args.seed,
        sites: args.sites.clone(),
        ..WanConfig::default()
    })
    .context("start WAN emulator")?;
    for r in &routes {
        let listen = wan
            .route_on(r.listen, &r.from, &r.to, r.target)
            .await
            .with_context(|| format!("start route {} -> {} on {}", r.from, r.to, r.listen))?;
        println!("route {} -> {}: {listen} -> {}", r.from, r.to, r.target);
    }
    if let Some(addr) = args.control {
        let bound = wan.serve_control(addr).await.context("start control API")?;
        println!("control API: http://{bound}/v1/links");
    }
    info!(profile = %args.profile, routes = routes.len(), "running");
    wait_for_signal().await?;
    info!("stopping");
    wan.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("wait for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_specs() {
        let r = parse_route("osaka:hokkaido:127.0.0.1:9000=127.0.0.1:9100").ok();
        assert_eq!(
            r,
            Some(RouteSpec {
                from: "osaka".into(),
                to: "hokkaido".into(),
                listen: SocketAddr::from(([127, 0, 0, 1], 9000)),
                target: SocketAddr::from(([127, 0, 0, 1], 9100)),
            })
        );
        let r = parse_route("a:b:[::1]:9000=[::1]:9100").ok();
        assert!(r.is_some_and(|r| r.listen.is_ipv6()));
        assert!(parse_route("osaka:127.0.0.1:9000=127.0.0.1:9100").is_err());
        assert!(parse_route("osaka:hokkaido:127.0.0.1:9000").is_err());
        assert!(parse_route("osaka:hokkaido:localhost:9000=127.0.0.1:9100").is_err());
    }
}
