//! Links to other sites: lanes, batching, compression and a bandwidth cap.
//!
//! Every peer gets one TCP connection per [`Lane`], so a frame waits only behind frames
//! of its own lane:
//! - `Control`: Raft's small messages (heartbeats, votes, append responses, ReadIndex,
//!   leader transfer) and small requests. Never compressed, never capped: an election or
//!   a site-durable acknowledgement must not wait behind a catch-up copy.
//! - `Log`: Raft appends and snapshots, in order (reordering appends would make the
//!   follower reject them and the leader probe).
//! - `Bulk`: catch-up block copies and large forwarded writes and reads.
//!
//! To a node at another site, the `Log` and `Bulk` writers batch what is queued (up to
//! [`BATCH_BYTES_MAX`]), compress each batch with zstd level 1 (`benches/results/
//! compression.md`: 2.86× on VM-like data at 312 MiB/s per core; lz4 2.27×) and pace
//! the wire bytes through the link's token bucket, the *cap*: set below the WAN's
//! bandwidth, it keeps the WAN's bottleneck queue short, which is what lets the control
//! lane's frames through without queueing behind bulk in the network as well. The cap is
//! per node and remote site (`link_caps` in the node config). Capped bytes leave in paced
//! pieces of [`PACED_PIECE_BYTES`], so a 1 MiB catch-up reply is not one burst into that
//! queue (`wan-bench` catch-up shipping: 41.3–43.6 MiB/s over three runs, 39.0–42.9
//! before; within the run-to-run spread).
//!
//! The lanes and the frames are [`crate::wire`]'s ([`Lane`], [`PeerFrame`]).
//!
//! Wire records (peer protocol 2): `u32` BE length of what follows, one kind byte, then
//! - kind 0: one frame, `codec::encode(&PeerFrame)`;
//! - kind 1: a zstd batch: `u32` BE raw length, then the zstd frame of the raw batch,
//!   which is a sequence of (`u32` BE length, encoded frame).
//!
//! Everything read is validated: record and raw lengths against [`RECORD_MAX_BYTES`],
//! the decompressed size against the announced raw length, every inner frame length.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use roamdisk_core::codec;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::wire::{Lane, PeerFrame, FRAME_MAX_BYTES};

#[cfg(test)]
mod tests;

/// A batch stops growing once its raw frames reach this many bytes. A batch goes to the
/// socket at once, so it is also the burst the WAN's queue sees: 256 KiB is 5 ms at
/// 50 MiB/s, which a control frame behind it waits at most (1 MiB would be 20 ms).
pub const BATCH_BYTES_MAX: usize = 256 << 10;
/// Batches smaller than this are sent uncompressed (a heartbeat-sized batch gains nothing).
pub const COMPRESS_MIN_BYTES: usize = 4 << 10;
/// zstd level for WAN batches (see the module docs for the measurement).
pub const ZSTD_LEVEL: i32 = 1;
/// Largest record or raw batch accepted: one maximal frame plus a full batch.
pub const RECORD_MAX_BYTES: usize = FRAME_MAX_BYTES + BATCH_BYTES_MAX + 64;
/// The token bucket's burst: this many milliseconds of the cap (at least one batch).
pub const CAP_BURST_MS: u64 = 5;
/// Capped writers pace and send their bytes in pieces of this size.
pub const PACED_PIECE_BYTES: usize = 64 << 10;

const KIND_FRAME: u8 = 0;
const KIND_ZSTD_BATCH: u8 = 1;

/// Wire and logical bytes sent on one link (one remote site), per lane.
#[derive(Default)]
pub struct LinkCounters {
    logical: [AtomicU64; 3],
    wire: [AtomicU64; 3],
    batches: [AtomicU64; 3],
    paced_ns: AtomicU64,
}

/// A snapshot of [`LinkCounters`] for status and metrics.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct LinkStatus {
    pub site: String,
    pub cap_bytes_per_sec: Option<u64>,
    pub lanes: Vec<LaneStatus>,
    /// Time writers spent waiting for the cap, in seconds.
    pub paced_secs: f64,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct LaneStatus {
    pub lane: Lane,
    pub logical_bytes: u64,
    pub wire_bytes: u64,
    pub batches: u64,
}

/// A token bucket that lets `rate` bytes per second through, with a small burst.
/// Writers take what they send and sleep off any debt, so concurrent writers share the
/// rate.
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn new(bytes_per_sec: u64) -> TokenBucket {
        let rate = bytes_per_sec.max(1) as f64;
        let burst = (rate * CAP_BURST_MS as f64 / 1e3).max(BATCH_BYTES_MAX as f64);
        TokenBucket {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes `n` tokens at `now`; returns how long the caller must wait before sending.
    pub fn take_at(&self, n: usize, now: Instant) -> Duration {
        let mut s = self.state.lock().expect("bucket lock");
        let elapsed = now.saturating_duration_since(s.1).as_secs_f64();
        s.0 = (s.0 + elapsed * self.rate).min(self.burst) - n as f64;
        s.1 = now;
        if s.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.0 / self.rate)
        }
    }
}

/// One remote site as this node's writers see it.
pub struct SiteLink {
    pub site: String,
    pub cap: Option<TokenBucket>,
    cap_bytes_per_sec: Option<u64>,
    pub counters: LinkCounters,
}

impl SiteLink {
    pub fn new(site: String, cap_bytes_per_sec: Option<u64>) -> SiteLink {
        SiteLink {
            site,
            cap: cap_bytes_per_sec.map(TokenBucket::new),
            cap_bytes_per_sec,
            counters: LinkCounters::default(),
        }
    }

    pub fn status(&self) -> LinkStatus {
        let c = &self.counters;
        LinkStatus {
            site: self.site.clone(),
            cap_bytes_per_sec: self.cap_bytes_per_sec,
            lanes: Lane::ALL
                .iter()
                .map(|l| LaneStatus {
                    lane: *l,
                    logical_bytes: c.logical[l.index()].load(Ordering::Relaxed),
                    wire_bytes: c.wire[l.index()].load(Ordering::Relaxed),
                    batches: c.batches[l.index()].load(Ordering::Relaxed),
                })
                .collect(),
            paced_secs: c.paced_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// How one connection's writer treats what it sends.
#[derive(Clone)]
pub struct WriterMode {
    pub lane: Lane,
    /// The link to another site, or `None` for a peer at this node's site.
    pub link: Option<std::sync::Arc<SiteLink>>,
}

impl WriterMode {
    pub fn local(lane: Lane) -> WriterMode {
        WriterMode { lane, link: None }
    }

    fn compress(&self) -> bool {
        self.link.is_some() && self.lane != Lane::Control
    }

    fn capped(&self) -> Option<(&SiteLink, &TokenBucket)> {
        self.link
            .as_deref()
            .filter(|_| self.lane != Lane::Control)
            .and_then(|l| l.cap.as_ref().map(|c| (l, c)))
    }

    /// Encodes and, to another site, compresses `frames` (one batch): everything but the
    /// socket writes. Counts the batch's logical and wire bytes.
    pub fn prepare(&self, frames: &[PeerFrame]) -> anyhow::Result<Prepared> {
        let mut encoded = Vec::with_capacity(frames.len());
        let mut raw_len = 0usize;
        for f in frames {
            let bytes = codec::encode(f)?;
            anyhow::ensure!(
                bytes.len() <= FRAME_MAX_BYTES,
                "frame of {} bytes exceeds the maximum",
                bytes.len()
            );
            raw_len += bytes.len();
            encoded.push(bytes);
        }
        let mut records: Vec<(u8, Vec<Vec<u8>>)> = Vec::new();
        if self.compress() && raw_len >= COMPRESS_MIN_BYTES {
            let mut raw = Vec::with_capacity(raw_len + 4 * encoded.len());
            for e in &encoded {
                raw.extend_from_slice(&(e.len() as u32).to_be_bytes());
                raw.extend_from_slice(e);
            }
            let z = zstd::bulk::compress(&raw, ZSTD_LEVEL)?;
            if z.len() + 4 < raw.len() * 15 / 16 {
                records.push((
                    KIND_ZSTD_BATCH,
                    vec![(raw.len() as u32).to_be_bytes().to_vec(), z],
                ));
            }
        }
        if records.is_empty() {
            records = encoded.into_iter().map(|e| (KIND_FRAME, vec![e])).collect();
        }
        let wire: usize = records
            .iter()
            .map(|(_, parts)| 5 + parts.iter().map(Vec::len).sum::<usize>())
            .sum();
        if let Some(link) = &self.link {
            let i = self.lane.index();
            link.counters.logical[i].fetch_add(raw_len as u64, Ordering::Relaxed);
            link.counters.wire[i].fetch_add(wire as u64, Ordering::Relaxed);
            link.counters.batches[i].fetch_add(1, Ordering::Relaxed);
        }
        // A capped writer sends paced pieces of one buffer: lay it out here, off the
        // sending path.
        let flat = self.capped().map(|_| {
            let mut out = Vec::with_capacity(wire);
            for (kind, parts) in records.drain(..) {
                let len: usize = 1 + parts.iter().map(Vec::len).sum::<usize>();
                out.extend_from_slice(&(len as u32).to_be_bytes());
                out.push(kind);
                for p in parts {
                    out.extend_from_slice(&p);
                }
            }
            out
        });
        Ok(Prepared {
            records,
            flat,
            wire,
        })
    }

    /// Writes a prepared batch (paced on a capped link); returns its wire bytes.
    pub async fn send<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        batch: Prepared,
    ) -> anyhow::Result<usize> {
        let Prepared {
            records,
            flat,
            wire,
        } = batch;
        let (Some((link, cap)), Some(out)) = (self.capped(), flat) else {
            for (kind, parts) in records {
                let len: usize = 1 + parts.iter().map(Vec::len).sum::<usize>();
                wr.write_u32(len as u32).await?;
                wr.write_u8(kind).await?;
                for p in parts {
                    wr.write_all(&p).await?;
                }
            }
            return Ok(wire);
        };
        // Capped: the bytes leave in paced pieces, each flushed, so a 1 MiB frame is not
        // one burst into the bottleneck queue. (Paced whole, a writer slept off a frame's
        // debt and then blocked while the queue drained the burst: the two waits added
        // up instead of overlapping.)
        for piece in out.chunks(PACED_PIECE_BYTES) {
            let wait = cap.take_at(piece.len(), Instant::now());
            if !wait.is_zero() {
                wr.flush().await?;
                tokio::time::sleep(wait).await;
                link.counters
                    .paced_ns
                    .fetch_add(wait.as_nanos() as u64, Ordering::Relaxed);
            }
            wr.write_all(piece).await?;
        }
        Ok(wire)
    }

    /// Writes `frames` (one batch) and returns the wire bytes written.
    pub async fn write_batch<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        frames: &[PeerFrame],
    ) -> anyhow::Result<usize> {
        let batch = self.prepare(frames)?;
        self.send(wr, batch).await
    }
}

/// One batch, encoded (and compressed) and ready for the socket.
pub struct Prepared {
    records: Vec<(u8, Vec<Vec<u8>>)>,
    /// On a capped link: the records laid out in one buffer.
    flat: Option<Vec<u8>>,
    wire: usize,
}

/// Batches whose frames add up to less than this are prepared inline: a hop to the
/// blocking pool would cost a small site-durable append more than its compression.
pub const PIPELINE_MIN_BYTES: usize = 64 << 10;

/// Writes `batches` in order, preparing each (encoding, compression: on the blocking
/// pool when large) while the one before it is sent. Sequential, a writer compressing
/// 1 MiB catch-up replies (5-10 ms each) sent 43 of the 47.5 MiB/s its cap allowed: the
/// compression time outran what the bucket's burst could make up for, so it was lost.
pub async fn write_pipelined<W: AsyncWrite + Unpin>(
    wr: &mut W,
    mode: &WriterMode,
    mut batches: impl FnMut() -> Option<Vec<PeerFrame>>,
) -> anyhow::Result<()> {
    let mut ready: Option<Prepared> = None;
    while let Some(batch) = batches() {
        let bytes: usize = batch.iter().map(PeerFrame::approx_len).sum();
        // Compressing (zstd on a 1 MiB catch-up reply: 5-10 ms here) is what makes a batch
        // worth preparing on the pool.
        let prepared = if mode.compress() && bytes >= PIPELINE_MIN_BYTES {
            let m = mode.clone();
            let job = tokio::task::spawn_blocking(move || m.prepare(&batch));
            if let Some(p) = ready.take() {
                mode.send(wr, p).await?;
            }
            job.await
                .map_err(|e| anyhow::anyhow!("prepare batch task: {e}"))??
        } else {
            if let Some(p) = ready.take() {
                mode.send(wr, p).await?;
            }
            mode.prepare(&batch)?
        };
        ready = Some(prepared);
    }
    if let Some(p) = ready {
        mode.send(wr, p).await?;
    }
    Ok(())
}

/// Reads one record: its frames, or `None` at a clean end of stream.
pub async fn read_record<R: AsyncRead + Unpin>(
    rd: &mut R,
) -> anyhow::Result<Option<Vec<PeerFrame>>> {
    let len = match rd.read_u32().await {
        Ok(n) => n as usize,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    anyhow::ensure!(
        (1..=RECORD_MAX_BYTES).contains(&len),
        "peer record of {len} bytes is outside 1..={RECORD_MAX_BYTES}"
    );
    let mut buf = vec![0u8; len];
    rd.read_exact(&mut buf).await?;
    decode_record(&buf).map(Some)
}

/// Decodes a record's body (kind byte and payload).
pub fn decode_record(buf: &[u8]) -> anyhow::Result<Vec<PeerFrame>> {
    let (&kind, body) = buf
        .split_first()
        .ok_or_else(|| anyhow::anyhow!("empty record"))?;
    match kind {
        KIND_FRAME => {
            anyhow::ensure!(body.len() <= FRAME_MAX_BYTES, "frame too large");
            Ok(vec![codec::decode(body)?])
        }
        KIND_ZSTD_BATCH => {
            anyhow::ensure!(body.len() >= 4, "truncated batch header");
            let raw_len = u32::from_be_bytes(body[..4].try_into().expect("4 bytes")) as usize;
            anyhow::ensure!(
                raw_len <= RECORD_MAX_BYTES,
                "batch of {raw_len} raw bytes exceeds {RECORD_MAX_BYTES}"
            );
            // The capacity bounds what a hostile stream can make us allocate.
            let raw = zstd::bulk::decompress(&body[4..], raw_len)?;
            anyhow::ensure!(
                raw.len() == raw_len,
                "batch decompressed to {} bytes, announced {raw_len}",
                raw.len()
            );
            let mut frames = Vec::new();
            let mut rest = &raw[..];
            while !rest.is_empty() {
                anyhow::ensure!(rest.len() >= 4, "truncated frame length in batch");
                let n = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
                rest = &rest[4..];
                anyhow::ensure!(
                    n <= FRAME_MAX_BYTES && n <= rest.len(),
                    "frame length {n} in batch is out of bounds"
                );
                frames.push(codec::decode(&rest[..n])?);
                rest = &rest[n..];
            }
            Ok(frames)
        }
        k => anyhow::bail!("unknown peer record kind {k}"),
    }
}

/// Parses a cap like `45MiB`, `400Mbit`, `1000000` (bytes) per second.
pub fn parse_rate(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("rate {s:?}: expected a number and a unit like 45MiB"))?;
    let mult = match unit.trim().trim_end_matches("/s") {
        "" | "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "kbit" | "Kbit" => 1e3 / 8.0,
        "Mbit" => 1e6 / 8.0,
        "Gbit" => 1e9 / 8.0,
        u => anyhow::bail!("rate {s:?}: unknown unit {u:?} (B, KiB, MiB, GiB, kbit, Mbit, Gbit)"),
    };
    let v = n * mult;
    anyhow::ensure!(
        v.is_finite() && v >= 1024.0,
        "rate {s:?}: must be at least 1 KiB/s"
    );
    Ok(v as u64)
}
