//! One replica of one volume on this node: its extent file (a sparse raw image: hole =
//! zeros, TRIM = punch hole) and its blake3 block index, and the crash rule that ties
//! them to the Raft log.
//!
//! Crash rule. Applying a committed entry writes the extent file through the page cache
//! and marks the touched blocks. A *checkpoint* then takes the applied index A and the
//! touched set, hashes those blocks and fsyncs the extent file ([`ExtentWork`], on the
//! `extent-sync` thread while later entries keep applying), and only then writes the
//! block hashes with A in one batch. So the applied index recorded in the store never
//! covers data that is not durable, and the Raft log is only compacted up to that
//! recorded index (`durable_applied`). After a crash the node replays the log from the
//! recorded index; every command is idempotent, so entries applied twice leave the same
//! bytes. A block written again after A was taken may be hashed with its newer bytes:
//! that write is after A, so a replay rewrites exactly those bytes, and the block is in
//! the next checkpoint's touched set anyway.
//!
//! Hash index records: key `h` volume(8) block(8) → blake3 of the 4 KiB block; blocks that
//! read as zeros have no record.
//!
//! Here: the [`VolumeReplica`], its checkpoint work and the hash-index keys; in `scan`,
//! reading extent files block by block (holes unread), the scrub's background scan, and
//! image hashes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use roamdisk_core::command::VolumeCommand;
use roamdisk_core::ids::{BlockIndex, LogIndex, VolumeId, BLOCK_BYTES};
use roamdisk_core::logstore::LogOp;
use roamdisk_nbd::file::RawFile;

use crate::dedup::ContentIndex;

mod scan;
#[cfg(test)]
mod tests;
pub mod verify;

use scan::block_matches;
pub use scan::{
    data_runs, for_each_block, image_block_hashes, scan_slice, Confirmed, ScrubError, ScrubSlice,
};

/// Blocks hashed per read by [`ExtentWork::run`] (1 MiB).
const HASH_RUN_BLOCKS: usize = 256;

/// The I/O half of one replica's checkpoint: hash the blocks touched since the last one
/// and fsync the extent file if it was written. Runs on the `extent-sync` thread.
pub struct ExtentWork {
    pub volume: VolumeId,
    file: RawFile,
    /// Sorted.
    blocks: Vec<u64>,
    sync: bool,
}

impl ExtentWork {
    /// Appends a hash record for every touched block to `ops` (a delete for a block that
    /// reads as zeros) and records the hashes in `content`, reading runs of adjacent
    /// blocks at once; then fsyncs the file if it was written.
    pub fn run(&self, ops: &mut Vec<LogOp>, content: &ContentIndex) -> std::io::Result<()> {
        let mut buf = vec![0u8; HASH_RUN_BLOCKS * BLOCK_BYTES as usize];
        let mut rest = &self.blocks[..];
        while let Some(&first) = rest.first() {
            let run = rest
                .iter()
                .take(HASH_RUN_BLOCKS)
                .enumerate()
                .take_while(|&(i, &b)| b == first + i as u64)
                .count();
            let bytes = &mut buf[..run * BLOCK_BYTES as usize];
            self.file.read_at(bytes, first * BLOCK_BYTES)?;
            for (i, block) in bytes.chunks_exact(BLOCK_BYTES as usize).enumerate() {
                let b = first + i as u64;
                let key = hash_key(self.volume, BlockIndex(b));
                if roamdisk_nbd::backend::is_zero(block) {
                    ops.push(LogOp::Delete { key });
                } else {
                    let hash = *blake3::hash(block).as_bytes();
                    content.insert(&hash, self.volume, b);
                    ops.push(LogOp::Put {
                        key,
                        value: hash.to_vec(),
                    });
                }
            }
            rest = &rest[run..];
        }
        if self.sync {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

/// Touched blocks kept before a checkpoint is forced (bounds the memory of the set and
/// the work of one checkpoint: 64 Ki blocks = 256 MiB of data).
pub const TOUCHED_BLOCKS_MAX: usize = 64 << 10;

pub fn hash_key(volume: VolumeId, block: BlockIndex) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(b'h');
    k.extend_from_slice(&volume.0.to_be_bytes());
    k.extend_from_slice(&block.0.to_be_bytes());
    k
}

/// The volume and block a hash-index key names; `None` for any other key.
pub fn parse_hash_key(key: &[u8]) -> Option<(VolumeId, u64)> {
    if key.len() != 17 || key[0] != b'h' {
        return None;
    }
    let be = |b: &[u8]| u64::from_be_bytes(b.try_into().expect("8 bytes"));
    Some((VolumeId(be(&key[1..9])), be(&key[9..17])))
}

/// Prefix of every hash record of `volume`.
pub fn hash_prefix(volume: VolumeId) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(b'h');
    k.extend_from_slice(&volume.0.to_be_bytes());
    k
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{context} for volume {volume}: {source}")]
    Io {
        volume: VolumeId,
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {volume}: entry {index} does not decode: {detail}")]
    BadEntry {
        volume: VolumeId,
        index: LogIndex,
        detail: String,
    },
}

pub struct VolumeReplica {
    pub id: VolumeId,
    path: PathBuf,
    extent: RawFile,
    size: u64,
    /// Written since the last checkpoint took its work: the next one must fsync.
    dirty: bool,
    touched: BTreeSet<u64>,
    /// Next block the scrub verifies.
    scrub_cursor: u64,
}

impl VolumeReplica {
    /// Opens (creating if needed) the extent file `dir/<id>.img` of `size` bytes. Which
    /// entries it holds is the node core's to know (its recorded applied index).
    pub fn open(dir: &Path, id: VolumeId, size: u64) -> Result<VolumeReplica, VolumeError> {
        let path = dir.join(format!("{}.img", id.0));
        let extent = RawFile::open_sparse(&path, size).map_err(|source| VolumeError::Io {
            volume: id,
            context: "open extent file",
            source,
        })?;
        Ok(VolumeReplica {
            id,
            path,
            extent,
            size,
            dirty: false,
            touched: BTreeSet::new(),
            scrub_cursor: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn extent(&self) -> &RawFile {
        &self.extent
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Written since the last checkpoint took its work (it must be hashed and synced).
    pub fn is_dirty(&self) -> bool {
        self.dirty || !self.touched.is_empty()
    }

    /// True when the touched set is at its bound and a checkpoint must run now.
    pub fn must_checkpoint(&self) -> bool {
        self.touched.len() >= TOUCHED_BLOCKS_MAX
    }

    fn io(&self, context: &'static str) -> impl FnOnce(std::io::Error) -> VolumeError + '_ {
        move |source| VolumeError::Io {
            volume: self.id,
            context,
            source,
        }
    }

    /// Marks blocks written outside `apply` (a catch-up copy) for rehashing at the next
    /// checkpoint.
    pub fn touch_blocks(&mut self, blocks: &[u64]) {
        self.touched.extend(blocks.iter().copied());
        self.dirty |= !blocks.is_empty();
    }

    fn touch(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / BLOCK_BYTES;
        let last = (offset + len - 1) / BLOCK_BYTES;
        self.touched.extend(first..=last);
        self.dirty = true;
    }

    /// Applies the command of entry `index` (the index only names it in errors).
    /// Commands are idempotent: applying one again leaves the same bytes, which is what
    /// makes a replay after a crash correct.
    pub fn apply(&mut self, index: LogIndex, data: &[u8]) -> Result<(), VolumeError> {
        let cmd = VolumeCommand::decode(data).map_err(|e| VolumeError::BadEntry {
            volume: self.id,
            index,
            detail: e.to_string(),
        })?;
        match cmd {
            VolumeCommand::Write { offset, data } => {
                // A write past the end (the volume was grown and this replica has not
                // seen it yet) extends the sparse file; it is still correct.
                self.extent
                    .write_at(data, offset, false)
                    .map_err(self.io("write extent file"))?;
                self.touch(offset, data.len() as u64);
            }
            VolumeCommand::Zero { offset, len, punch } => {
                self.extent
                    .zero(offset, len, !punch, false)
                    .map_err(self.io("zero extent file"))?;
                self.touch(offset, len);
            }
            VolumeCommand::Resize { size } => self.grow(size)?,
            // The core hands verify markers over as `Effect::Verify`, not to apply.
            VolumeCommand::Verify { .. } => {}
        }
        Ok(())
    }

    pub fn grow(&mut self, size: u64) -> Result<(), VolumeError> {
        if size > self.size {
            self.extent
                .grow(size)
                .map_err(self.io("grow extent file"))?;
            self.size = size;
            self.dirty = true;
        }
        Ok(())
    }

    /// The I/O half of a checkpoint: hash the blocks touched since the last one and
    /// fsync the file, to run off the store thread ([`ExtentWork`]); its records join
    /// the checkpoint's batch, written only once the work is done (the crash rule: the
    /// recorded applied index never covers data that is not durable). Writes applied
    /// after this call are not covered: they are marked for the next checkpoint.
    pub fn checkpoint_work(&mut self) -> Result<Option<ExtentWork>, VolumeError> {
        if !self.is_dirty() {
            return Ok(None);
        }
        Ok(Some(ExtentWork {
            volume: self.id,
            file: self
                .extent
                .try_clone()
                .map_err(self.io("open extent file to hash and fsync"))?,
            blocks: std::mem::take(&mut self.touched).into_iter().collect(),
            sync: std::mem::take(&mut self.dirty),
        }))
    }

    /// The next at most `max_blocks` blocks for the background scan (up to the end of the
    /// volume; the next call starts where this one stopped, wrapping around), or `None`
    /// for an empty volume.
    pub fn next_scrub_slice(&mut self, max_blocks: u64) -> Option<ScrubSlice> {
        let blocks = self.size / BLOCK_BYTES;
        if blocks == 0 || max_blocks == 0 {
            return None;
        }
        let first = self.scrub_cursor % blocks;
        let n = max_blocks.min(blocks - first);
        self.scrub_cursor = (first + n) % blocks;
        Some(ScrubSlice {
            volume: self.id,
            path: self.path.clone(),
            first,
            n,
        })
    }

    /// Re-reads `blocks` (suspects of the background scan) and returns those that differ
    /// from the index: data corrupted on disk. Only blocks not written since the last
    /// checkpoint are verified (for them the index is exact, once that checkpoint's batch
    /// is written: the caller makes sure it is); the others are returned as deferred.
    pub fn confirm_corrupted<E>(
        &self,
        blocks: &[u64],
        mut hash_of: impl FnMut(&[u8]) -> Result<Option<Vec<u8>>, E>,
    ) -> Result<Confirmed, ScrubError<E>> {
        let mut block = vec![0u8; BLOCK_BYTES as usize];
        let mut out = Confirmed::default();
        for &b in blocks.iter().filter(|&&b| b < self.size / BLOCK_BYTES) {
            if self.touched.contains(&b) {
                out.deferred.push(b);
                continue;
            }
            self.extent
                .read_at(&mut block, b * BLOCK_BYTES)
                .map_err(|e| ScrubError::Io(self.io("read extent file to scrub")(e)))?;
            if !block_matches(self.id, b, &block, &mut hash_of)? {
                out.corrupted.push(b);
            }
        }
        Ok(out)
    }

    /// Deletes the extent file (the volume left this node).
    pub fn destroy(self) -> Result<(), VolumeError> {
        std::fs::remove_file(&self.path).map_err(|source| VolumeError::Io {
            volume: self.id,
            context: "remove extent file",
            source,
        })
    }
}
