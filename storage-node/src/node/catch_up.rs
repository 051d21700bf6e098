//! Catch-up copies: a replica that took a snapshot copies the blocks that differ from
//! the leader's (by blake3) in chunks, with a window of requests in flight sized by the
//! link's delay; the other side serves them from its replica (`FetchBlocks`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use roamdisk_core::ids::VolumeId;
use roamdisk_nbd::file::RawFile;
use tracing::debug;

use super::{Node, NodeError, REQUEST_DEADLINE_MS, RETRY_BACKOFF_MAX_MS};
use crate::store::{Event, Refused};
use crate::volume::verify::block_digest;
use crate::wire::{BlocksReply, ByteBuf, PeerRequest, PeerResponse};

/// Blocks per catch-up request (1 MiB of data at most per reply). 64 (256 KiB, smaller
/// bursts into a WAN's queue) cut the catch-up rate from 44.7 to 36 MiB/s: each request
/// costs a read barrier and a status round trip through the store thread.
pub const CATCH_UP_CHUNK_BLOCKS: u64 = 256;
/// Catch-up requests in flight at the least (a copy starts at twice this): 4 × 1 MiB
/// covers a 50 MiB/s × 40 ms link even when no reply compresses.
pub const CATCH_UP_WINDOW_MIN: usize = 4;
/// At the most: bounds the memory a copy takes on both sides (a reply is 1 MiB at most).
pub const CATCH_UP_WINDOW_MAX: usize = 32;
/// Queueing a copy may add to a request's round trip before its window shrinks. The
/// window follows the link's delay, not a fixed count: chunks that differ in nothing (most
/// of a volume) come back in one round trip, and 8 at a time left the link idle between
/// them (a 240 MiB catch-up copy of a 1 GiB volume: 6.6 s with 8, 5.0 s with the window,
/// which reached 32); with replies that do not compress, 8 MiB queued is 170 ms ahead of
/// the other bulk traffic to that site.
pub const CATCH_UP_QUEUE_TARGET_MS: u64 = 25;
/// Catch-up chunks a node reads and hashes at once (each a millisecond or more of a core
/// for 1 MiB of data; 0.7 ms on average measured on a serving leader). Unbounded, two
/// copies of 32 chunks each could put 64 hashing tasks on a 2-core node's blocking pool;
/// two keep serving well above a WAN link's rate.
pub const CATCH_UP_IO_MAX: usize = 2;

impl Node {
    /// Replicas a catch-up copy may read from, in the order to try them: the leader,
    /// then this site's other replicas, then every other one. Any replica whose data is
    /// whole serves (a copy source passes a linearizable read barrier first); trying the
    /// next one after a refusal matters when the leader is itself copying: the soak found
    /// all three voters of a moved volume recovering at once, each copying from the
    /// leader, which refused them (it was copying too), for good.
    fn copy_sources(
        &self,
        info: &roamdisk_core::meta::VolumeInfo,
    ) -> Vec<roamdisk_core::ids::NodeId> {
        let cluster = self.cluster();
        let site_of = |n: &roamdisk_core::ids::NodeId| cluster.nodes.get(n).map(|i| i.site.clone());
        let mut placed: Vec<_> = info.voters.iter().chain(&info.learners).copied().collect();
        if let Some(m) = &info.moving {
            placed.extend(m.voters.iter().chain(&m.learners));
        }
        let mut out = Vec::new();
        if let Some(l) = self.leader_of(info.id.group()).filter(|l| *l != self.me) {
            out.push(l);
        }
        let here = Some(self.site.clone());
        out.extend(placed.iter().filter(|n| site_of(n) == here));
        out.extend(placed.iter());
        let mut seen = std::collections::BTreeSet::new();
        out.retain(|n| *n != self.me && seen.insert(*n));
        out
    }

    /// Copies the blocks of `volume` that differ from the leader's (by blake3) for
    /// recovery point `from`, then tells the store to replay its deferred log.
    /// Resumable: after a restart the same copy sends only the blocks that still differ.
    ///
    /// Every block must be read from the source after the replica took its recovery
    /// point (the replay starts there). A copy whose point is replaced while it runs (a
    /// second snapshot) stops (`still_current` turns false), before writing another
    /// chunk; the caller waits for it to end before starting the copy for the new point,
    /// so two copies never write one replica. (A copy that went on and reported done for
    /// the old point left a block older than a flushed write it no longer replayed: the
    /// chaos smoke drill found it as a stale read after a move.)
    pub async fn catch_up(
        &self,
        volume: VolumeId,
        from: roamdisk_core::ids::LogIndex,
        still_current: impl Fn() -> bool,
    ) -> Result<(), NodeError> {
        use futures_util::stream::{FuturesUnordered, StreamExt};
        use roamdisk_core::ids::BLOCK_BYTES;
        let start = Instant::now();
        let group = volume.group();
        let file = Arc::new(RawFile::open(&self.volume_path(volume), false)?);
        let mut copy_end = 0u64;
        let mut copied_blocks: Vec<u64> = Vec::new();
        let mut next_block = 0u64;
        let mut source = 0usize;
        // Chunks to (re)send, oldest first; up to `window` chunks in flight so that a WAN
        // link's bandwidth-delay product is covered: the window grows by one for every
        // reply whose round trip is within CATCH_UP_QUEUE_TARGET_MS of the fastest seen
        // and shrinks by one for every slower one (a delay-based controller, as LEDBAT).
        // Each in-flight chunk hashes its blocks (on the blocking pool: a millisecond or more for 1 MiB of data, holes
        // are not read) and then asks for them, so hashing overlaps the transfers: hashed
        // one at a time ahead of the requests, the window held fewer chunks than it
        // allowed while a chunk was being hashed.
        let mut retry: std::collections::VecDeque<u64> = Default::default();
        let mut inflight = FuturesUnordered::new();
        let mut window = CATCH_UP_WINDOW_MIN * 2;
        let mut fastest = Duration::MAX;
        loop {
            let cluster = self.cluster();
            let info = cluster
                .volume_by_id(volume)
                .ok_or_else(|| NodeError::NoVolume(volume.to_string()))?;
            let blocks = info.size.div_ceil(BLOCK_BYTES);
            while inflight.len() < window {
                let (block, backoff) = match retry.pop_front() {
                    Some(b) => (b, true),
                    None if next_block < blocks => {
                        next_block += CATCH_UP_CHUNK_BLOCKS;
                        (next_block - CATCH_UP_CHUNK_BLOCKS, false)
                    }
                    None => break,
                };
                let count = CATCH_UP_CHUNK_BLOCKS.min(blocks - block);
                let sources = self.copy_sources(info);
                if sources.is_empty() {
                    return Err(Refused::Failed("no other replica to copy from".into()).into());
                }
                // Sticky: a source that served goes on serving; one that refused is left.
                let target = sources[source % sources.len()];
                let reader = Arc::clone(&file);
                let transport = Arc::clone(&self.transport);
                let io = &self.catch_up_io;
                inflight.push(async move {
                    if backoff {
                        tokio::time::sleep(Duration::from_millis(RETRY_BACKOFF_MAX_MS)).await;
                    }
                    let permit = io.acquire().await.map_err(std::io::Error::other)?;
                    let hashes = tokio::task::spawn_blocking(move || {
                        let mut hashes = Vec::with_capacity(count as usize * 32);
                        crate::volume::for_each_block(&reader, block, count, |_, data| {
                            hashes.extend_from_slice(&block_digest(data))
                        })?;
                        Ok::<_, std::io::Error>(hashes)
                    })
                    .await
                    .map_err(|e| std::io::Error::other(format!("catch-up hash task: {e}")))??;
                    drop(permit);
                    let req = PeerRequest::FetchBlocks {
                        volume,
                        start_block: block,
                        hashes,
                    };
                    let sent = Instant::now();
                    let reply = transport.request(target, req).await;
                    Ok::<_, std::io::Error>((block, target, sent.elapsed(), reply))
                });
            }
            let Some(done) = inflight.next().await else {
                break;
            };
            let (block, target, took, reply) = done?;
            if !still_current() {
                return Err(NodeError::Superseded { from: from.0 });
            }
            match reply {
                Ok(PeerResponse::Blocks(Ok(BlocksReply {
                    applied,
                    blocks: changed,
                }))) => {
                    // Written on the blocking pool: page-cache writes of a whole chunk
                    // can sleep in the kernel's dirty-page throttling, which would hold a
                    // runtime worker (and the tasks queued on it) meanwhile.
                    let count = CATCH_UP_CHUNK_BLOCKS.min(blocks.saturating_sub(block));
                    let mut chunk_blocks = Vec::with_capacity(changed.len());
                    for (off, data) in &changed {
                        chunk_blocks.push(block + u64::from(*off));
                        if u64::from(*off) >= count {
                            return Err(Refused::Failed(format!(
                                "catch-up block {off} outside a chunk of {count}"
                            ))
                            .into());
                        }
                        if data
                            .as_ref()
                            .is_some_and(|d| d.0.len() as u64 != BLOCK_BYTES)
                        {
                            return Err(
                                Refused::Failed("catch-up block of the wrong size".into()).into()
                            );
                        }
                    }
                    let writer = Arc::clone(&file);
                    tokio::task::spawn_blocking(move || {
                        for (off, data) in changed {
                            let at = (block + u64::from(off)) * BLOCK_BYTES;
                            match data {
                                Some(ByteBuf(d)) => writer.write_at(&d, at, false)?,
                                None => {
                                    writer.zero(at, BLOCK_BYTES, false, false)?;
                                }
                            }
                        }
                        // Write-behind: a copy that left all its data dirty until the
                        // final fsync (two new replicas, 480 MiB) made every node's log
                        // sync on this disk wait behind it, and writes stalled for
                        // 0.6-1 s (`wan-bench`'s move).
                        writer.start_writeback(block * BLOCK_BYTES, count * BLOCK_BYTES)?;
                        Ok::<_, std::io::Error>(())
                    })
                    .await
                    .map_err(|e| std::io::Error::other(format!("catch-up write task: {e}")))??;
                    copied_blocks.extend(chunk_blocks);
                    copy_end = copy_end.max(applied);
                    fastest = fastest.min(took);
                    window = if took <= fastest + Duration::from_millis(CATCH_UP_QUEUE_TARGET_MS) {
                        (window + 1).min(CATCH_UP_WINDOW_MAX)
                    } else {
                        (window - 1).max(CATCH_UP_WINDOW_MIN)
                    };
                }
                other => {
                    debug!(%volume, peer = %target, "catch-up request failed: {other:?}");
                    // Several chunks in flight fail together: move on once per source.
                    let sources = self.copy_sources(info);
                    if sources.get(source % sources.len().max(1)) == Some(&target) {
                        source += 1;
                    }
                    if start.elapsed() > Duration::from_millis(10 * REQUEST_DEADLINE_MS) {
                        return Err(NodeError::Deadline {
                            ms: 10 * REQUEST_DEADLINE_MS,
                            last: format!("{other:?}"),
                        });
                    }
                    retry.push_back(block);
                }
            }
        }
        let syncer = Arc::clone(&file);
        tokio::task::spawn_blocking(move || syncer.sync_data())
            .await
            .map_err(|e| std::io::Error::other(format!("catch-up sync task: {e}")))??;
        tracing::info!(%volume, blocks_copied = copied_blocks.len(), ms = start.elapsed().as_millis() as u64, window, "catch-up copy done");
        if !still_current() {
            return Err(NodeError::Superseded { from: from.0 });
        }
        let done = Event::CatchUpDone {
            group,
            from,
            copy_end: roamdisk_core::ids::LogIndex(copy_end),
            blocks: copied_blocks,
        };
        let _ = self.store.send_async(done).await;
        Ok(())
    }

    /// Serves a `FetchBlocks` from this node's replica.
    pub(super) async fn fetch_blocks(
        &self,
        volume: VolumeId,
        start_block: u64,
        hashes: &[u8],
    ) -> Result<BlocksReply, Refused> {
        if hashes.len() % 32 != 0 || hashes.len() / 32 > CATCH_UP_CHUNK_BLOCKS as usize {
            return Err(Refused::Failed("malformed block hashes".into()));
        }
        // Only a replica that may serve reads may be copied from.
        self.read_barrier(volume, None).await?;
        let file = self
            .read_handle(volume)
            .map_err(|e| Refused::Failed(e.to_string()))?;
        // Reading and hashing a chunk (1 MiB) takes a millisecond or more: on the blocking
        // pool, so that the runtime's workers keep the link writers going meanwhile.
        let hashes = hashes.to_vec();
        let _permit = self
            .catch_up_io
            .acquire()
            .await
            .map_err(|e| Refused::Failed(e.to_string()))?;
        let out = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let count = (hashes.len() / 32) as u64;
            crate::volume::for_each_block(&file, start_block, count, |b, data| {
                let i = (b - start_block) as usize;
                let ours = block_digest(data);
                if ours != hashes[i * 32..(i + 1) * 32] {
                    // Zeros (a hole, or zeros written) go as "zero it", not as data.
                    let data = data.filter(|_| ours != [0u8; 32]);
                    out.push((i as u32, data.map(|d| ByteBuf(d.to_vec()))));
                }
            })
            .map_err(|e| Refused::Failed(e.to_string()))?;
            Ok::<_, Refused>(out)
        })
        .await
        .map_err(|e| Refused::Failed(format!("catch-up read task: {e}")))??;
        // Read after the blocks: the copy reflects a state no newer than this.
        let applied = self
            .to_store(|reply| Event::Applied {
                group: volume.group(),
                reply,
            })
            .await
            .flatten()
            .unwrap_or(0);
        Ok(BlocksReply {
            applied,
            blocks: out,
        })
    }
}
