//! Compression for what the WAN link carries: batches of 4 KiB blocks (64 KiB, 256 KiB,
//! 1 MiB — the shipping batches; catch-up ships 256-block = 1 MiB chunks), each batch
//! compressed on its own (the receiver must decode a batch without the ones before it),
//! with `lz4_flex` (pure Rust, block format) and `zstd` (libzstd through the `zstd` crate,
//! negative "fast" levels and levels 1, 3), against a zero-block-elision baseline and raw.
//!
//! For each codec/level/batch: ratio, compress and decompress MiB/s on ONE core (the
//! bench is single-threaded; speeds are input (resp. output) bytes per second of the
//! thread's CPU time, so another job on the machine inflates them less than wall time
//! would — wall figures are in the JSON too), and the effective shipping rate over a
//! 50 MiB/s link (`sinet5`) and a 12.5 MB/s link (`wide-2010`) when the sender has one
//! core for compression and the receiver one for decompression:
//! `effective = min(link × ratio, compress speed, decompress speed)`.
//!
//! The corpus is VM-like: real files of this machine laid out as a disk would hold them
//! (each file starts on a 4 KiB boundary, its tail block zero-padded as ext4 writes it),
//! drawn with a fixed seed, in a fresh-Debian-image mix: ~55 % ELF binaries/libraries/
//! kernel modules, ~20 % text (docs, headers), ~15 % already-compressed data (.gz, .xz,
//! images, the guest kernel image, .deb packages), ~10 % zero blocks in runs (holes);
//! extents of all kinds are shuffled together. Also measured: each kind alone, pure
//! random data (incompressible), and optionally a raw disk image (`--image`).
//!
//! ```text
//! CARGO_TARGET_DIR=/tmp/tgt-c cargo build --release -j1 -p roamdisk-benches --bin compress-bench
//! /tmp/tgt-c/release/compress-bench --corpus-mib 200 --out benches/results/compression.json
//! ```
//! Results: `benches/results/compression.{json,md}`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use serde_json::{json, Value};

const BLOCK: usize = 4096;
const MIB: f64 = (1 << 20) as f64;

#[derive(Parser)]
struct Args {
    /// Size of the mixed VM-like corpus, MiB.
    #[arg(long, default_value_t = 200)]
    corpus_mib: usize,
    /// Size of the random (incompressible) corpus, MiB.
    #[arg(long, default_value_t = 32)]
    random_mib: usize,
    /// Batch sizes, KiB (multiples of 4).
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024")]
    batch_kib: Vec<usize>,
    /// zstd levels (negative levels are zstd's "fast" levels).
    #[arg(
        long,
        value_delimiter = ',',
        allow_negative_numbers = true,
        default_value = "-5,-1,1,3"
    )]
    zstd_levels: Vec<i32>,
    /// Batch size (KiB) for the per-kind breakdown and the random corpus.
    #[arg(long, default_value_t = 256)]
    breakdown_batch_kib: usize,
    /// A batch whose ratio is below this is sent raw (the decision rule).
    #[arg(long, default_value_t = 1.05)]
    raw_below: f64,
    /// Repeat a measurement until it has used this much CPU time (at most 5 runs; best run kept).
    #[arg(long, default_value_t = 0.4)]
    min_cpu_secs: f64,
    /// Seed for sampling files and laying out the corpus.
    #[arg(long, default_value_t = 0x00c0_ffee_5eed)]
    seed: u64,
    /// Optional raw disk image: its first --corpus-mib MiB are measured as one more corpus.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Where the JSON goes.
    #[arg(long, default_value = "benches/results/compression.json")]
    out: PathBuf,
}

// ---------------------------------------------------------------- deterministic sampling

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let x = self.next().to_le_bytes();
            chunk.copy_from_slice(&x[..chunk.len()]);
        }
    }
}

// ---------------------------------------------------------------- corpus

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Binary,
    Text,
    Compressed,
    Zero,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Binary, Kind::Text, Kind::Compressed, Kind::Zero];
    fn name(self) -> &'static str {
        match self {
            Kind::Binary => "binaries",
            Kind::Text => "text",
            Kind::Compressed => "compressed",
            Kind::Zero => "zero",
        }
    }
    /// Share of the mixed corpus, like a freshly installed Debian image.
    fn share(self) -> f64 {
        match self {
            Kind::Binary => 0.55,
            Kind::Text => 0.20,
            Kind::Compressed => 0.15,
            Kind::Zero => 0.10,
        }
    }
    /// Largest piece taken from one file (a 4 KiB-aligned window at a seeded offset), so a
    /// few huge files do not make up a whole kind.
    fn max_per_file(self) -> usize {
        match self {
            Kind::Binary => 4 << 20,
            Kind::Text => 1 << 20,
            Kind::Compressed => 4 << 20,
            Kind::Zero => 1 << 20,
        }
    }
}

fn home_vm() -> PathBuf {
    std::env::var_os("HOME")
        .map_or_else(|| PathBuf::from("/root"), PathBuf::from)
        .join(".cache/roamdisk-vm")
}

/// Where each kind comes from (directories walked recursively, regular files only).
fn sources(kind: Kind) -> Vec<PathBuf> {
    let vm = home_vm();
    let v: Vec<PathBuf> = match kind {
        Kind::Binary => vec![
            "/usr/bin".into(),
            "/usr/sbin".into(),
            "/usr/lib/x86_64-linux-gnu".into(),
            "/usr/libexec".into(),
            vm.join("root/lib/modules"),
        ],
        Kind::Text => vec!["/usr/share/doc".into(), "/usr/include".into()],
        Kind::Compressed => vec!["/usr/share".into(), vm.join("debs"), vm.join("vmlinuz")],
        Kind::Zero => vec![],
    };
    v.into_iter().filter(|p| p.exists()).collect()
}

const COMPRESSED_EXT: [&str; 9] = [
    "gz", "xz", "bz2", "zst", "png", "jpg", "jpeg", "deb", "lzma",
];

fn ext(p: &Path) -> String {
    p.extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// Cheap name filter; the content check happens when a file is drawn.
fn candidate(kind: Kind, p: &Path) -> bool {
    let e = ext(p);
    match kind {
        Kind::Binary => true,
        Kind::Text => !COMPRESSED_EXT.contains(&e.as_str()),
        Kind::Compressed => {
            COMPRESSED_EXT.contains(&e.as_str())
                || p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz"))
        }
        Kind::Zero => false,
    }
}

fn content_ok(kind: Kind, head: &[u8]) -> bool {
    match kind {
        Kind::Binary => head.starts_with(b"\x7fELF"),
        Kind::Text => !head.is_empty() && !head.contains(&0),
        _ => !head.is_empty(),
    }
}

fn walk(p: &Path, out: &mut Vec<(PathBuf, u64)>) {
    let Ok(md) = std::fs::metadata(p) else { return };
    if md.is_file() {
        out.push((p.to_path_buf(), md.len()));
        return;
    }
    let Ok(rd) = std::fs::read_dir(p) else { return };
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for e in entries {
        let Ok(md) = std::fs::symlink_metadata(&e) else {
            continue;
        };
        if md.file_type().is_symlink() {
            continue; // the target is reached through its own path (no duplicates)
        }
        if md.is_dir() {
            walk(&e, out);
        } else if md.is_file() && md.len() > 0 {
            out.push((e, md.len()));
        }
    }
}

struct Extent {
    kind: Kind,
    data: Vec<u8>, // a multiple of BLOCK
}

struct KindStats {
    kind: Kind,
    bytes: usize,
    extents: usize,
    candidates: usize,
    examples: Vec<String>,
    by_ext: std::collections::BTreeMap<String, usize>,
}

fn round_up(n: usize) -> usize {
    n.div_ceil(BLOCK) * BLOCK
}

/// Reads a 4 KiB-aligned window of at most `max` bytes of `path` at a seeded offset,
/// zero-padded to whole blocks.
fn read_window(path: &Path, len: u64, max: usize, rng: &mut Rng) -> Result<Vec<u8>> {
    let mut f = File::open(path)?;
    let len = len as usize;
    let take = len.min(max);
    let blocks_spare = (len - take) / BLOCK;
    let off = if blocks_spare > 0 {
        rng.below(blocks_spare as u64 + 1) as usize * BLOCK
    } else {
        0
    };
    f.seek(SeekFrom::Start(off as u64))?;
    let mut buf = vec![0u8; round_up(take)];
    let mut got = 0;
    while got < take {
        let n = f.read(&mut buf[got..take])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    ensure!(got > 0, "empty read");
    buf.truncate(round_up(got));
    Ok(buf)
}

fn gather(kind: Kind, quota: usize, rng: &mut Rng) -> Result<(Vec<Extent>, KindStats)> {
    let mut stats = KindStats {
        kind,
        bytes: 0,
        extents: 0,
        candidates: 0,
        examples: vec![],
        by_ext: Default::default(),
    };
    let mut extents = vec![];
    if kind == Kind::Zero {
        // Holes: runs of 1..=256 zero blocks.
        while stats.bytes < quota {
            let blocks = (1 + rng.below(256) as usize)
                .min((quota - stats.bytes) / BLOCK)
                .max(1);
            extents.push(Extent {
                kind,
                data: vec![0u8; blocks * BLOCK],
            });
            stats.bytes += blocks * BLOCK;
            stats.extents += 1;
        }
        return Ok((extents, stats));
    }
    let mut files = vec![];
    for s in sources(kind) {
        walk(&s, &mut files);
    }
    files.retain(|(p, _)| candidate(kind, p));
    files.sort();
    files.dedup();
    stats.candidates = files.len();
    rng.shuffle(&mut files);
    // The guest kernel image goes in first when the machine has it.
    if kind == Kind::Compressed {
        if let Some(i) = files.iter().position(|(p, _)| {
            p.starts_with(home_vm())
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz"))
        }) {
            let f = files.remove(i);
            files.insert(0, f);
        }
    }
    for (path, len) in files {
        if stats.bytes >= quota {
            break;
        }
        let max = kind.max_per_file().min(quota - stats.bytes);
        let Ok(mut data) = read_window(&path, len, max, rng) else {
            continue;
        };
        if !content_ok(kind, &data[..data.len().min(BLOCK)]) {
            continue;
        }
        data.truncate(round_up(max.min(data.len())));
        stats.bytes += data.len();
        stats.extents += 1;
        let e = ext(&path);
        let e = if kind == Kind::Compressed && e.is_empty() {
            "vmlinuz".to_string()
        } else if e.is_empty() {
            "(none)".into()
        } else {
            e
        };
        *stats.by_ext.entry(e).or_default() += data.len();
        if stats.examples.len() < 8 {
            stats.examples.push(path.display().to_string());
        }
        extents.push(Extent { kind, data });
    }
    if stats.bytes < quota {
        eprintln!(
            "note: only {:.1} MiB of {} found (wanted {:.1})",
            stats.bytes as f64 / MIB,
            kind.name(),
            quota as f64 / MIB
        );
    }
    Ok((extents, stats))
}

struct Corpus {
    name: String,
    data: Vec<u8>,
}

// ---------------------------------------------------------------- codecs

#[derive(Clone, Copy)]
enum Codec {
    /// All-zero 4 KiB blocks sent as a bit in a bitmap, the rest as is.
    ZeroElide,
    Lz4,
    Zstd(i32),
}

impl Codec {
    fn name(self) -> String {
        match self {
            Codec::ZeroElide => "zero-elide".into(),
            Codec::Lz4 => "lz4_flex".into(),
            Codec::Zstd(l) => format!("zstd {l}"),
        }
    }
    fn bound(self, n: usize) -> usize {
        match self {
            Codec::ZeroElide => n + n.div_ceil(BLOCK).div_ceil(8),
            Codec::Lz4 => lz4_flex::block::get_maximum_output_size(n),
            Codec::Zstd(_) => zstd::zstd_safe::compress_bound(n),
        }
    }
}

struct Engine {
    codec: Codec,
    lz4: lz4_flex::block::CompressTable,
    zc: Option<zstd::bulk::Compressor<'static>>,
    zd: Option<zstd::bulk::Decompressor<'static>>,
}

impl Engine {
    fn new(codec: Codec) -> Result<Self> {
        let (zc, zd) = match codec {
            Codec::Zstd(l) => (
                Some(zstd::bulk::Compressor::new(l)?),
                Some(zstd::bulk::Decompressor::new()?),
            ),
            _ => (None, None),
        };
        Ok(Engine {
            codec,
            lz4: lz4_flex::block::CompressTable::large(),
            zc,
            zd,
        })
    }

    fn compress(&mut self, src: &[u8], dst: &mut [u8]) -> Result<usize> {
        Ok(match self.codec {
            Codec::ZeroElide => {
                let nb = src.len().div_ceil(BLOCK);
                let (map, rest) = dst.split_at_mut(nb.div_ceil(8));
                map.fill(0);
                let mut w = 0;
                for (i, b) in src.chunks(BLOCK).enumerate() {
                    if is_zero(b) {
                        map[i / 8] |= 1 << (i % 8);
                    } else {
                        rest[w..w + b.len()].copy_from_slice(b);
                        w += b.len();
                    }
                }
                map.len() + w
            }
            Codec::Lz4 => lz4_flex::block::compress_into_with_table(src, dst, &mut self.lz4)?,
            Codec::Zstd(_) => self.zc.as_mut().unwrap().compress_to_buffer(src, dst)?,
        })
    }

    fn decompress(&mut self, src: &[u8], dst: &mut [u8]) -> Result<usize> {
        Ok(match self.codec {
            Codec::ZeroElide => {
                let nb = dst.len().div_ceil(BLOCK);
                let (map, rest) = src.split_at(nb.div_ceil(8));
                let mut r = 0;
                for (i, b) in dst.chunks_mut(BLOCK).enumerate() {
                    if map[i / 8] & (1 << (i % 8)) != 0 {
                        b.fill(0);
                    } else {
                        b.copy_from_slice(&rest[r..r + b.len()]);
                        r += b.len();
                    }
                }
                dst.len()
            }
            Codec::Lz4 => lz4_flex::block::decompress_into(src, dst)?,
            Codec::Zstd(_) => self.zd.as_mut().unwrap().decompress_to_buffer(src, dst)?,
        })
    }
}

fn is_zero(b: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u64.
    let (pre, mid, post) = unsafe { b.align_to::<u64>() };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}

// ---------------------------------------------------------------- timing

fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: plain syscall filling a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn busy(load: &str) -> bool {
    let one: f64 = load
        .split_whitespace()
        .next()
        .and_then(|x| x.parse().ok())
        .unwrap_or(0.0);
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    one > 0.5 * n
}

#[derive(Clone)]
struct Meas {
    corpus: String,
    codec: String,
    batch_kib: usize,
    input: usize,
    wire: usize,
    ratio: f64,
    wire_rule: usize,
    ratio_rule: f64,
    raw_batch_share: f64,
    c_cpu_mib_s: f64,
    c_wall_mib_s: f64,
    d_cpu_mib_s: f64,
    d_wall_mib_s: f64,
    c_runs: usize,
    d_runs: usize,
}

/// Times `f` (one full pass) after one untimed warm-up pass, until `min_cpu` CPU seconds
/// are spent (at most 5 timed runs); returns the best run's (cpu, wall) seconds and the
/// timed run count.
fn timed(min_cpu: f64, mut f: impl FnMut(usize) -> Result<()>) -> Result<(f64, f64, usize)> {
    f(usize::MAX)?; // warm-up: caches, codec state, any page not yet faulted in
    let (mut best_cpu, mut best_wall, mut spent, mut runs) = (f64::INFINITY, f64::INFINITY, 0.0, 0);
    while runs < 5 && (runs == 0 || spent < min_cpu) {
        let (c0, w0) = (thread_cpu(), Instant::now());
        f(runs)?;
        let (c, w) = (thread_cpu() - c0, w0.elapsed().as_secs_f64());
        best_cpu = best_cpu.min(c);
        best_wall = best_wall.min(w);
        spent += c;
        runs += 1;
    }
    Ok((best_cpu, best_wall, runs))
}

fn measure(
    corpus: &Corpus,
    codec: Codec,
    batch: usize,
    raw_below: f64,
    min_cpu: f64,
) -> Result<Meas> {
    let data = &corpus.data;
    let batches: Vec<&[u8]> = data.chunks(batch).collect();
    let bound = codec.bound(batch);
    // Non-zero fill so the pages are really faulted in before timing (a zeroed Vec is
    // lazily mapped), as a sender's or receiver's reused buffers would be.
    let mut arena = vec![0x5au8; bound * batches.len()];
    let mut lens = vec![0usize; batches.len()];
    let mut eng = Engine::new(codec)?;
    let (c_cpu, c_wall, c_runs) = timed(min_cpu, |_| {
        for (i, b) in batches.iter().enumerate() {
            lens[i] = eng.compress(b, &mut arena[i * bound..(i + 1) * bound])?;
        }
        Ok(())
    })?;
    let mut out = vec![0x5au8; data.len()];
    let (d_cpu, d_wall, d_runs) = timed(min_cpu, |_| {
        let mut off = 0;
        for (i, b) in batches.iter().enumerate() {
            let n = eng.decompress(
                &arena[i * bound..i * bound + lens[i]],
                &mut out[off..off + b.len()],
            )?;
            ensure!(n == b.len(), "short decompress");
            off += b.len();
        }
        Ok(())
    })?;
    if out != *data {
        bail!("{} round trip mismatch on {}", codec.name(), corpus.name);
    }
    let wire: usize = lens.iter().sum();
    let mut wire_rule = 0;
    let mut raw = 0;
    for (b, &n) in batches.iter().zip(&lens) {
        if (b.len() as f64) < raw_below * n as f64 {
            wire_rule += b.len();
            raw += 1;
        } else {
            wire_rule += n;
        }
    }
    let mib = data.len() as f64 / MIB;
    Ok(Meas {
        corpus: corpus.name.clone(),
        codec: codec.name(),
        batch_kib: batch / 1024,
        input: data.len(),
        wire,
        ratio: data.len() as f64 / wire as f64,
        wire_rule,
        ratio_rule: data.len() as f64 / wire_rule as f64,
        raw_batch_share: raw as f64 / batches.len() as f64,
        c_cpu_mib_s: mib / c_cpu,
        c_wall_mib_s: mib / c_wall,
        d_cpu_mib_s: mib / d_cpu,
        d_wall_mib_s: mib / d_wall,
        c_runs,
        d_runs,
    })
}

const LINKS: [(&str, f64); 2] = [
    ("sinet5 50 MiB/s", 50.0),
    ("wide-2010 12.5 MB/s", 12.5e6 / MIB),
];

/// Input MiB/s that one sender core + one receiver core + the link sustain, and the bottleneck.
fn effective(m: &Meas, link: f64) -> (f64, &'static str) {
    let by_link = link * m.ratio_rule;
    let mut best = (by_link, "link");
    if m.c_cpu_mib_s < best.0 {
        best = (m.c_cpu_mib_s, "compress");
    }
    if m.d_cpu_mib_s < best.0 {
        best = (m.d_cpu_mib_s, "decompress");
    }
    best
}

fn meas_json(m: &Meas) -> Value {
    let links: Vec<Value> = LINKS
        .iter()
        .map(|&(name, l)| {
            let (eff, bottleneck) = effective(m, l);
            json!({"link": name, "link_mib_s": l, "effective_mib_s": eff, "gain_over_raw": eff / l, "bottleneck": bottleneck})
        })
        .collect();
    json!({
        "corpus": m.corpus, "codec": m.codec, "batch_kib": m.batch_kib,
        "input_bytes": m.input, "wire_bytes": m.wire, "ratio": m.ratio,
        "wire_bytes_with_rule": m.wire_rule, "ratio_with_rule": m.ratio_rule, "raw_batch_share": m.raw_batch_share,
        "compress_mib_s_cpu": m.c_cpu_mib_s, "compress_mib_s_wall": m.c_wall_mib_s, "compress_runs": m.c_runs,
        "decompress_mib_s_cpu": m.d_cpu_mib_s, "decompress_mib_s_wall": m.d_wall_mib_s, "decompress_runs": m.d_runs,
        "effective": links,
    })
}

fn table_header(out: &mut String) {
    out.push_str("| corpus | codec | batch | ratio | ratio w/ rule | raw batches | compress MiB/s | decompress MiB/s | eff. @50 MiB/s | eff. @12.5 MB/s |\n");
    out.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
}

fn table_row(out: &mut String, m: &Meas) {
    let eff: Vec<String> = LINKS
        .iter()
        .map(|&(_, l)| {
            let (e, b) = effective(m, l);
            let tag = if b == "link" {
                String::new()
            } else {
                format!(" ({b}-bound)")
            };
            format!("{e:.1} (×{:.2}){tag}", e / l)
        })
        .collect();
    out.push_str(&format!(
        "| {} | {} | {} KiB | {:.3} | {:.3} | {:.0}% | {:.0} | {:.0} | {} | {} |\n",
        m.corpus,
        m.codec,
        m.batch_kib,
        m.ratio,
        m.ratio_rule,
        m.raw_batch_share * 100.0,
        m.c_cpu_mib_s,
        m.d_cpu_mib_s,
        eff[0],
        eff[1]
    ));
}

fn main() -> Result<()> {
    let args = Args::parse();
    let cmdline = std::env::args().collect::<Vec<_>>().join(" ");
    println!("$ {cmdline}");
    for &b in &args.batch_kib {
        ensure!(
            b > 0 && b % 4 == 0,
            "batch sizes must be multiples of 4 KiB"
        );
    }
    let load_start = loadavg();
    let t0 = Instant::now();

    // The mixed VM-like corpus and its parts.
    let total = args.corpus_mib << 20;
    let mut rng = Rng(args.seed);
    let mut extents = vec![];
    let mut kinds = vec![];
    for kind in Kind::ALL {
        let quota = (total as f64 * kind.share()) as usize / BLOCK * BLOCK;
        let (e, s) = gather(kind, quota, &mut rng)?;
        extents.extend(e);
        kinds.push(s);
    }
    rng.shuffle(&mut extents);
    let mut mixed = Vec::with_capacity(extents.iter().map(|e| e.data.len()).sum());
    let mut per_kind: Vec<Corpus> = Kind::ALL
        .iter()
        .map(|k| Corpus {
            name: k.name().into(),
            data: vec![],
        })
        .collect();
    for e in &extents {
        mixed.extend_from_slice(&e.data);
        let i = Kind::ALL.iter().position(|&k| k == e.kind).unwrap();
        per_kind[i].data.extend_from_slice(&e.data);
    }
    drop(extents);
    let zero_blocks = mixed.chunks(BLOCK).filter(|b| is_zero(b)).count();
    let mixed = Corpus {
        name: "vm-mix".into(),
        data: mixed,
    };

    let mut desc = format!(
        "corpus vm-mix: {:.1} MiB in 4 KiB blocks, seed {:#x}, {} all-zero blocks ({:.1}% incl. file tail padding)\n",
        mixed.data.len() as f64 / MIB, args.seed, zero_blocks, 100.0 * zero_blocks as f64 * BLOCK as f64 / mixed.data.len() as f64
    );
    for s in &kinds {
        let exts: Vec<String> = s
            .by_ext
            .iter()
            .map(|(e, b)| format!("{e} {:.1}", *b as f64 / MIB))
            .collect();
        desc.push_str(&format!(
            "  {:<10} {:6.1} MiB ({:4.1}%), {} extents from {} candidate files under {:?}; MiB by extension: {}\n",
            s.kind.name(), s.bytes as f64 / MIB, 100.0 * s.bytes as f64 / mixed.data.len() as f64, s.extents, s.candidates,
            sources(s.kind), exts.join(", ")
        ));
    }
    print!("{desc}");

    let mut random = vec![0u8; args.random_mib << 20];
    Rng(args.seed ^ 0xdead_beef).fill(&mut random);
    let random = Corpus {
        name: "random".into(),
        data: random,
    };

    let image = match &args.image {
        Some(p) => {
            let mut f = File::open(p).with_context(|| format!("open {}", p.display()))?;
            let mut data = vec![];
            (&mut f).take(total as u64).read_to_end(&mut data)?;
            data.truncate(data.len() / BLOCK * BLOCK);
            Some(Corpus {
                name: format!("image {}", p.display()),
                data,
            })
        }
        None => None,
    };
    println!(
        "corpus built in {:.1} s; load average {load_start}",
        t0.elapsed().as_secs_f64()
    );

    let mut codecs = vec![Codec::ZeroElide, Codec::Lz4];
    let range = zstd::compression_level_range();
    for &l in &args.zstd_levels {
        ensure!(range.contains(&l), "zstd level {l} outside {range:?}");
        codecs.push(Codec::Zstd(l));
    }

    let mut md = String::new();
    table_header(&mut md);
    let mut results = vec![];
    let mut run = |c: &Corpus, codec: Codec, batch: usize, md: &mut String| -> Result<()> {
        let m = measure(c, codec, batch, args.raw_below, args.min_cpu_secs)?;
        table_row(md, &m);
        eprintln!(
            "{:>6.1} s  {} {} {} KiB: ratio {:.3}, c {:.0} MiB/s, d {:.0} MiB/s",
            t0.elapsed().as_secs_f64(),
            m.corpus,
            m.codec,
            m.batch_kib,
            m.ratio,
            m.c_cpu_mib_s,
            m.d_cpu_mib_s
        );
        results.push(m);
        Ok(())
    };
    for &codec in &codecs {
        for &b in &args.batch_kib {
            run(&mixed, codec, b << 10, &mut md)?;
        }
    }
    let bb = args.breakdown_batch_kib << 10;
    for c in per_kind
        .iter()
        .chain(std::iter::once(&random))
        .chain(image.iter())
    {
        if c.data.is_empty() {
            continue;
        }
        for &codec in &codecs {
            run(c, codec, bb, &mut md)?;
        }
    }
    let load_end = loadavg();
    println!("\n{md}");
    println!("raw link: effective = link (×1.00). Speeds: MiB/s of input (compress) / output (decompress) per second of one thread's CPU time.");
    println!("rule: a batch whose ratio < {} is sent raw (its compression CPU is still spent). load average start {load_start}, end {load_end}; {:.0} s total", args.raw_below, t0.elapsed().as_secs_f64());

    let machine_note = if busy(&load_start) {
        "other work was running (1-min load average above half the cores): CPU-time speeds are the figures to read, wall-clock ones are depressed"
    } else {
        "machine mostly idle at the start"
    };
    let v = zstd::zstd_safe::version_number();
    let zstd_version = format!(
        "zstd crate 0.14, libzstd {}.{}.{}",
        v / 10000,
        v / 100 % 100,
        v % 100
    );
    let doc = json!({
        "bench": "compress-bench",
        "command": cmdline,
        "seed": args.seed,
        "block_bytes": BLOCK,
        "raw_below": args.raw_below,
        "links": LINKS.iter().map(|&(n, l)| json!({"name": n, "mib_s": l})).collect::<Vec<_>>(),
        "effective_formula": "min(link_mib_s * ratio_with_rule, compress_mib_s_cpu, decompress_mib_s_cpu) — one sender core compressing, one receiver core decompressing",
        "speeds": "MiB/s (2^20) of uncompressed bytes per second of the single bench thread's CPU time (CLOCK_THREAD_CPUTIME_ID), best of up to 5 runs; *_wall is wall-clock",
        "machine": {
            "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "loadavg_start": load_start, "loadavg_end": load_end,
            "note": machine_note,
        },
        "versions": {"lz4_flex": "0.14 (safe-encode, safe-decode, block format)", "zstd": zstd_version},
        "corpus": {
            "description": desc,
            "mixed_bytes": mixed.data.len(),
            "zero_blocks": zero_blocks,
            "random_bytes": random.data.len(),
            "image": args.image.as_ref().map(|p| p.display().to_string()),
            "kinds": kinds.iter().map(|s| json!({
                "kind": s.kind.name(), "target_share": s.kind.share(), "bytes": s.bytes, "extents": s.extents,
                "candidate_files": s.candidates, "max_bytes_per_file": s.kind.max_per_file(),
                "sources": sources(s.kind), "bytes_by_extension": s.by_ext, "examples": s.examples,
            })).collect::<Vec<_>>(),
        },
        "results": results.iter().map(meas_json).collect::<Vec<_>>(),
        "elapsed_s": t0.elapsed().as_secs_f64(),
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("write {}", args.out.display()))?;
    println!("wrote {}", args.out.display());
    Ok(())
}
