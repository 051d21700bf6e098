//! `roamdisk-nbd`: serve one raw (sparse) file over NBD.
//!
//! ```text
//! roamdisk-nbd --file disk.img --name vm1 --listen 127.0.0.1:10809 [--read-only]
//! roamdisk-nbd --file disk.img --size 1G --unix /tmp/vm1.sock
//! ```

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use roamdisk_nbd::file::FileCatalog;
use roamdisk_nbd::Server;
use tokio_util::sync::CancellationToken;
use tracing::info;

#[derive(Parser, Debug)]
#[command(
    name = "roamdisk-nbd",
    version,
    about = "Serve a raw file over NBD (the roamdisk NBD front end)"
)]
struct Args {
    /// Raw image file to export.
    #[arg(long)]
    file: PathBuf,
    /// Export name (clients connecting with an empty name get this export too).
    #[arg(long, default_value = "disk")]
    name: String,
    /// Human-readable description sent with NBD_INFO_DESCRIPTION.
    #[arg(long, default_value = "")]
    description: String,
    /// TCP address to listen on.
    #[arg(long, default_value = "127.0.0.1:10809")]
    listen: String,
    /// Unix socket to listen on instead of TCP.
    #[arg(long, conflicts_with = "listen")]
    unix: Option<PathBuf>,
    /// Refuse writes.
    #[arg(long)]
    read_only: bool,
    /// Create the file as a sparse image of this size if it does not exist
    /// (e.g. 512M, 4G); if it exists, its size must match.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

/// Parses sizes like `4096`, `64K`, `512M`, `4G`, `1T` (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected a number with optional K/M/G/T"))?;
    let shift = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("invalid size unit in {s:?}: use K, M, G or T")),
    };
    n.checked_mul(1u64 << shift)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("size {s:?} is zero or too large"))
}

fn prepare_file(args: &Args) -> Result<()> {
    match (args.size, args.file.exists()) {
        (Some(size), false) => {
            let f = std::fs::File::create_new(&args.file)
                .with_context(|| format!("create image file {}", args.file.display()))?;
            f.set_len(size)
                .with_context(|| format!("size image file {}", args.file.display()))?;
            info!(path = %args.file.display(), size, "created sparse image");
        }
        (Some(size), true) => {
            let actual = std::fs::metadata(&args.file)?.len();
            if actual != size {
                bail!("{} exists with size {actual}, not the requested {size}; remove it or drop --size", args.file.display());
            }
        }
        (None, false) => bail!(
            "{} does not exist (pass --size to create a sparse image)",
            args.file.display()
        ),
        (None, true) => {}
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    prepare_file(&args)?;
    let catalog = FileCatalog::new(&args.file, &args.name, &args.description, args.read_only)
        .with_context(|| format!("open image file {}", args.file.display()))?;
    let size = catalog.info().size;

    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = args.threads {
        rt.worker_threads(n);
    }
    let rt = rt.build().context("start tokio runtime")?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let server = Server::new(Arc::new(catalog), shutdown.clone());
        let signals = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                info!("signal received, shutting down");
                shutdown.cancel();
                Ok::<_, std::io::Error>(())
            }
        });
        if let Some(path) = &args.unix {
            // A stale socket from an earlier run would make bind fail.
            if path.exists() {
                std::fs::remove_file(path)
                    .with_context(|| format!("remove stale socket {}", path.display()))?;
            }
            let listener = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("bind {}", path.display()))?;
            println!(
                "serving {} ({} bytes) as nbd+unix:///{}?socket={}",
                args.file.display(),
                size,
                args.name,
                path.display()
            );
            server.serve_unix(listener).await?;
        } else {
            let listener = tokio::net::TcpListener::bind(&args.listen)
                .await
                .with_context(|| format!("listen on {}", args.listen))?;
            let addr = listener.local_addr()?;
            println!(
                "serving {} ({} bytes) as nbd://{}/{}",
                args.file.display(),
                size,
                addr,
                args.name
            );
            server.serve_tcp(listener).await?;
        }
        signals.abort();
        anyhow::Ok(())
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
