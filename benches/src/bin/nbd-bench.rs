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

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Parser;
use roamdisk_benches::{
    fill_image, measure, row, start_qemu_nbd, start_roamdisk_nbd, table, Client,
};

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
    /// roamdisk-nbd binary (default: next to this one).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Only rows whose name contains this (results are then not written).
    #[arg(long)]
    only: Option<String>,
    /// Where to write nbd.json and nbd.md.
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
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
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("bench.img");
    let size = args.size_mib << 20;
    eprintln!("filling {} MiB image at {}", args.size_mib, image.display());
    fill_image(&image, size)?;
    let qemu = start_qemu_nbd(&image)?;
    let ours = start_roamdisk_nbd(&server_bin, &image)?;
    use Client::*;
    let rows = vec![
        row(Fio, "4k randread QD1", false, true, 4096, 1, 0),
        row(Fio, "4k randread QD32", false, true, 4096, 32, 0),
        row(Fio, "4k randwrite QD1", true, true, 4096, 1, 0),
        row(Fio, "4k randwrite QD32", true, true, 4096, 32, 0),
        row(Fio, "1M seq read QD8", false, false, 1 << 20, 8, 0),
        row(Fio, "1M seq write QD8", true, false, 1 << 20, 8, 0),
        row(QemuImgBench, "4k read QD1", false, false, 4096, 1, 0),
        row(QemuImgBench, "4k read QD32", false, false, 4096, 32, 0),
        row(QemuImgBench, "4k write QD1", true, false, 4096, 1, 0),
        row(QemuImgBench, "4k write QD32", true, false, 4096, 32, 0),
        row(QemuImgBench, "1M seq read QD8", false, false, 1 << 20, 8, 0),
        row(QemuImgBench, "1M seq write QD8", true, false, 1 << 20, 8, 0),
    ];
    let filtered = args.only.is_some();
    let rows: Vec<_> = rows
        .into_iter()
        .filter(|r| {
            args.only
                .as_ref()
                .is_none_or(|o| r.name.contains(o.as_str()))
        })
        .collect();
    let results = measure(
        rows,
        &qemu.uri,
        &ours.uri,
        size,
        args.runtime_secs,
        args.repeat,
    )?;
    drop(qemu);
    drop(ours);
    let md = table(&results, "qemu-nbd");
    println!("{md}");
    if filtered {
        return Ok(());
    }
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
