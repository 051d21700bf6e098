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

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use roamdisk_core::command::VolumeCommand;
use roamdisk_core::ids::{BlockIndex, LogIndex, VolumeId, BLOCK_BYTES};
use roamdisk_core::logstore::LogOp;
use roamdisk_nbd::file::RawFile;

use crate::dedup::ContentIndex;

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

/// Why a scrub could not verify.
#[derive(Debug, thiserror::Error)]
pub enum ScrubError<E> {
    #[error(transparent)]
    Io(VolumeError),
    #[error("read the hash index")]
    Index(E),
}

/// What [`VolumeReplica::confirm_corrupted`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Confirmed {
    /// Blocks that differ from the index although nothing wrote them: corrupted on disk.
    pub corrupted: Vec<u64>,
    /// Blocks written since the last checkpoint: not verifiable until the next one.
    pub deferred: Vec<u64>,
}

/// Blocks of one replica that the background scan reads: `n` blocks from `first` of the
/// extent file at `path`.
#[derive(Clone, Debug)]
pub struct ScrubSlice {
    pub volume: VolumeId,
    pub path: PathBuf,
    pub first: u64,
    pub n: u64,
}

/// Whether block `b` of `volume` (its `content`) matches the hash index (`hash_of(key)`:
/// the recorded blake3; `None` for a block that must read as zeros).
fn block_matches<E>(
    volume: VolumeId,
    b: u64,
    content: &[u8],
    hash_of: &mut impl FnMut(&[u8]) -> Result<Option<Vec<u8>>, E>,
) -> Result<bool, ScrubError<E>> {
    let recorded = hash_of(&hash_key(volume, BlockIndex(b))).map_err(ScrubError::Index)?;
    Ok(match recorded {
        Some(h) => h.as_slice() == blake3::hash(content).as_bytes(),
        None => roamdisk_nbd::backend::is_zero(content),
    })
}

/// Block ranges `[a, b)` of `first..end` that hold data in `file` (everything else is a
/// hole and reads as zeros), from `SEEK_DATA`/`SEEK_HOLE`.
pub fn data_runs(file: &RawFile, first: u64, end: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let (start, end_byte) = (first * BLOCK_BYTES, end * BLOCK_BYTES);
    let file_len = file.len()?;
    let mut runs = Vec::new();
    let mut pos = start;
    for e in file.extents(start, end_byte - start, file_len, usize::MAX)? {
        let next = pos + u64::from(e.length);
        if e.flags == 0 {
            runs.push((pos / BLOCK_BYTES, next.div_ceil(BLOCK_BYTES).min(end)));
        }
        pos = next;
    }
    Ok(runs)
}

/// Calls `f(block, Some(bytes))` for every block of `first..first+count` that lies in an
/// allocated range of `file` (read in runs of up to 256 KiB) and `f(block, None)` for every
/// block in a hole, in block order, without reading holes: a read of a hole costs the kernel
/// fresh zeroed page-cache pages (0.9 ms per 256 KiB here), which made a catch-up of a
/// mostly empty 1 GiB volume spend 7 s hashing zeros after the data had crossed.
pub fn for_each_block(
    file: &RawFile,
    first: u64,
    count: u64,
    mut f: impl FnMut(u64, Option<&[u8]>),
) -> std::io::Result<()> {
    const RUN: u64 = 64;
    let end = first + count;
    let mut buf = vec![0u8; (RUN * BLOCK_BYTES) as usize];
    let mut b = first;
    for (a, z) in data_runs(file, first, end)? {
        for hole in b..a.max(b) {
            f(hole, None);
        }
        b = b.max(a);
        while b < z {
            let n = RUN.min(z - b);
            let bytes = &mut buf[..(n * BLOCK_BYTES) as usize];
            file.read_at(bytes, b * BLOCK_BYTES)?;
            for (i, block) in bytes.chunks(BLOCK_BYTES as usize).enumerate() {
                f(b + i as u64, Some(block));
            }
            b += n;
        }
    }
    for hole in b..end {
        f(hole, None);
    }
    Ok(())
}

/// The background half of the scrub: reads `slice` from its extent file and returns the
/// blocks that differ from the index (`index_range(from, to)`: the index records with
/// keys in `from..to`, read in one scan rather than one lookup per block). It runs while
/// the replica applies writes, so a block written since the last checkpoint differs too:
/// these are suspects, which the store confirms with
/// [`VolumeReplica::confirm_corrupted`].
pub fn scan_slice<E>(
    slice: &ScrubSlice,
    index_range: impl FnOnce(&[u8], &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, E>,
) -> Result<Vec<u64>, ScrubError<E>> {
    let io = |source| {
        ScrubError::Io(VolumeError::Io {
            volume: slice.volume,
            context: "read extent file to scrub",
            source,
        })
    };
    let file = match RawFile::open(&slice.path, true) {
        // The replica was removed since the slice was cut: nothing to verify.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        r => r.map_err(io)?,
    };
    let end = slice.first + slice.n;
    let records = index_range(
        &hash_key(slice.volume, BlockIndex(slice.first)),
        &hash_key(slice.volume, BlockIndex(end)),
    )
    .map_err(ScrubError::Index)?;
    let recorded: std::collections::HashMap<u64, Vec<u8>> = records
        .into_iter()
        .filter_map(|(k, v)| Some((parse_hash_key(&k)?.1, v)))
        .collect();
    // Only allocated ranges are read (measured: reading holes cost 5.7 % of a core per
    // node for the scan of a mostly empty 1 GiB volume). A block in a hole reads as
    // zeros, so it is a suspect only if the index records a hash for it.
    let mut suspects: Vec<u64> = Vec::new();
    for_each_block(&file, slice.first, slice.n, |x, block| {
        let ok = match (block, recorded.get(&x)) {
            (None, h) => h.is_none(),
            (Some(block), Some(h)) => h.as_slice() == blake3::hash(block).as_bytes(),
            (Some(block), None) => roamdisk_nbd::backend::is_zero(block),
        };
        if !ok {
            suspects.push(x);
        }
    })
    .map_err(io)?;
    Ok(suspects)
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

/// blake3 of every non-zero block of a raw image, computed from the file itself (to check
/// that two replicas converged, independently of the index).
pub fn image_block_hashes(path: &Path) -> std::io::Result<Vec<(u64, [u8; 32])>> {
    let f = RawFile::open(path, true)?;
    let len = f.len()?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; BLOCK_BYTES as usize];
    let mut b = 0;
    while b * BLOCK_BYTES < len {
        f.read_at(&mut buf, b * BLOCK_BYTES)?;
        if !roamdisk_nbd::backend::is_zero(&buf) {
            out.push((b, *blake3::hash(&buf).as_bytes()));
        }
        b += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use roamdisk_core::logstore::{GroupState, LogBatch, LogStore, MemLogStore};
    use std::collections::BTreeMap;

    fn write(offset: u64, data: &[u8]) -> Vec<u8> {
        VolumeCommand::Write { offset, data }.encode()
    }

    #[test]
    fn for_each_block_reads_data_runs_and_reports_holes_without_reading_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.raw");
        let blocks = 1024u64; // 4 MiB
        let file = RawFile::open_sparse(&path, blocks * BLOCK_BYTES).unwrap();
        // Data at 3, 100..=170 (a run longer than one 64-block read) and 1023 (the last
        // block); block 500 is written with zeros, so it is data that reads as zeros.
        let mut expect: BTreeMap<u64, u8> = BTreeMap::new();
        for b in [3u64, 1023].into_iter().chain(100..=170) {
            let fill = (b % 251) as u8 + 1;
            file.write_at(&vec![fill; BLOCK_BYTES as usize], b * BLOCK_BYTES, false)
                .unwrap();
            expect.insert(b, fill);
        }
        file.write_at(&vec![0u8; BLOCK_BYTES as usize], 500 * BLOCK_BYTES, false)
            .unwrap();
        expect.insert(500, 0);
        // Whole file, and a window that starts and ends inside data runs.
        for (first, count) in [(0u64, blocks), (120, 400), (1023, 1)] {
            let mut seen = Vec::new();
            for_each_block(&file, first, count, |b, data| {
                let want = expect.get(&b).copied();
                match (data, want) {
                    (Some(d), Some(fill)) => assert!(d.iter().all(|x| *x == fill), "block {b}"),
                    (None, None) => {}
                    // ext4 may report a small hole's neighbours as data: allowed if zeros.
                    (Some(d), None) => assert!(roamdisk_nbd::backend::is_zero(d), "block {b}"),
                    (None, Some(fill)) => {
                        assert_eq!(fill, 0, "block {b} holds data but was reported as a hole")
                    }
                }
                seen.push(b);
            })
            .unwrap();
            assert_eq!(
                seen,
                (first..first + count).collect::<Vec<_>>(),
                "every block once, in order"
            );
        }
        // Most of the file is a hole and is not read: far fewer data blocks than blocks.
        let mut read = 0;
        for_each_block(&file, 0, blocks, |_, d| read += usize::from(d.is_some())).unwrap();
        assert!(read < 200, "{read} blocks read of {blocks}");
    }

    #[test]
    fn apply_checkpoint_and_replay_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = MemLogStore::new();
        let v = VolumeId(3);
        let mut r = VolumeReplica::open(dir.path(), v, 1 << 20).unwrap();
        let zero = VolumeCommand::Zero {
            offset: 4096,
            len: 4096,
            punch: true,
        }
        .encode();
        let log = [
            write(100, b"hello"),
            write(4096, &[7u8; 4096]),
            zero,
            write(200, b"world"),
        ];
        for (i, cmd) in log[..3].iter().enumerate() {
            r.apply(LogIndex(i as u64 + 1), cmd).unwrap();
        }
        assert!(r.is_dirty());
        let mut batch = LogBatch::default();
        r.checkpoint_work()
            .unwrap()
            .expect("written")
            .run(&mut batch.ops, &ContentIndex::default())
            .unwrap();
        assert!(!r.is_dirty());
        store.write(batch).unwrap();
        assert!(store.get(&hash_key(v, BlockIndex(0))).unwrap().is_some());
        assert!(
            store.get(&hash_key(v, BlockIndex(1))).unwrap().is_none(),
            "zeroed block has no hash"
        );
        let at_3 = image_block_hashes(r.path()).unwrap();
        // Applied more without a checkpoint, then a crash: the node replays from the
        // recorded index (3) over what the file holds, which ends equal to applying once.
        r.apply(LogIndex(4), &log[3]).unwrap();
        let once = image_block_hashes(r.path()).unwrap();
        drop(r);
        let mut r = VolumeReplica::open(dir.path(), v, 1 << 20).unwrap();
        for (i, cmd) in log.iter().enumerate() {
            r.apply(LogIndex(i as u64 + 1), cmd).unwrap();
        }
        assert_eq!(image_block_hashes(r.path()).unwrap(), once);
        assert_ne!(at_3, once);
        let mut buf = [0u8; 5];
        r.extent().read_at(&mut buf, 100).unwrap();
        assert_eq!(&buf, b"hello");
        r.extent().read_at(&mut buf, 200).unwrap();
        assert_eq!(&buf, b"world");
        assert_eq!(once.len(), 1, "only block 0 holds data");
    }

    #[test]
    fn checkpoint_work_hashes_runs_of_blocks_off_the_replica_and_covers_only_its_index() {
        let dir = tempfile::tempdir().unwrap();
        let v = VolumeId(5);
        let mut r = VolumeReplica::open(dir.path(), v, 4 << 20).unwrap();
        // 300 adjacent blocks (more than one read), a lone block, and a zeroed one.
        let data: Vec<u8> = (0..300 * 4096)
            .map(|i| match i % 4096 {
                0 => (i / 4096) as u8, // every block differs
                1 => (i / 4096 / 256) as u8,
                _ => 0xa5,
            })
            .collect();
        r.apply(LogIndex(1), &write(0, &data)).unwrap();
        r.apply(LogIndex(2), &write(900 * 4096, &[7u8; 4096]))
            .unwrap();
        r.apply(LogIndex(3), &write(950 * 4096, &[0u8; 4096]))
            .unwrap();
        let mut batch = LogBatch::default();
        let work = r.checkpoint_work().unwrap();
        // Applied while the work is in flight: the next checkpoint's.
        r.apply(LogIndex(4), &write(901 * 4096, &[8u8; 4096]))
            .unwrap();
        let content = ContentIndex::default();
        work.unwrap().run(&mut batch.ops, &content).unwrap();
        let mut puts = BTreeMap::new();
        let mut deletes = Vec::new();
        for op in &batch.ops {
            match op {
                LogOp::Put { key, value } => {
                    puts.insert(parse_hash_key(key).unwrap().1, value.clone());
                }
                LogOp::Delete { key } => deletes.push(parse_hash_key(key).unwrap().1),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(puts.len(), 301);
        assert_eq!(deletes, vec![950]);
        for b in [0u64, 255, 256, 299] {
            let block = &data[b as usize * 4096..][..4096];
            assert_eq!(
                puts[&b],
                blake3::hash(block).as_bytes().to_vec(),
                "block {b}"
            );
            assert_eq!(content.get(blake3::hash(block).as_bytes()), Some((v, b)));
        }
        assert_eq!(puts[&900], blake3::hash(&[7u8; 4096]).as_bytes().to_vec());
        assert!(
            !puts.contains_key(&901),
            "applied after the checkpoint began"
        );
        let mut next = LogBatch::default();
        let work = r.checkpoint_work().unwrap();
        work.unwrap().run(&mut next.ops, &content).unwrap();
        assert_eq!(next.ops.len(), 1, "block 901");
    }

    #[test]
    fn scrub_scans_for_suspects_and_confirms_only_blocks_not_written_since_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let store = MemLogStore::new();
        let v = VolumeId(4);
        let mut b = LogBatch::default();
        b.push(LogOp::Create {
            group: v.group(),
            state: GroupState::default(),
        });
        store.write(b).unwrap();
        let mut r = VolumeReplica::open(dir.path(), v, 1 << 20).unwrap();
        r.apply(LogIndex(1), &write(0, &[1u8; 8192])).unwrap();
        r.apply(LogIndex(2), &write(40 * 4096, &[2u8; 4096]))
            .unwrap();
        let get = |k: &[u8]| store.get(k);
        let range = |f: &[u8], t: &[u8]| store.scan_range(f, t);
        let confirmed = |corrupted: Vec<u64>, deferred: Vec<u64>| Confirmed {
            corrupted,
            deferred,
        };
        // Not checkpointed yet: the scan sees the new blocks as suspects, and they cannot
        // be confirmed (written since the last checkpoint).
        let all = r.next_scrub_slice(u64::MAX).unwrap();
        assert_eq!((all.first, all.n), (0, 256));
        assert_eq!(scan_slice(&all, range).unwrap(), vec![0, 1, 40]);
        assert_eq!(
            r.confirm_corrupted(&[0, 1, 40], get).unwrap(),
            confirmed(vec![], vec![0, 1, 40])
        );
        // The checkpoint in two halves, as the store does it: prepare, sync, write.
        let mut batch = LogBatch::default();
        r.checkpoint_work()
            .unwrap()
            .expect("written since the last checkpoint")
            .run(&mut batch.ops, &ContentIndex::default())
            .unwrap();
        store.write(batch).unwrap();
        assert_eq!(scan_slice(&all, range).unwrap(), Vec::<u64>::new());
        assert_eq!(
            r.confirm_corrupted(&[0, 1, 40], get).unwrap(),
            Confirmed::default()
        );

        // Flip bytes behind the replica's back: in a written block and in a hole.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(r.path())
            .unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[9u8; 16], 4096 + 100).unwrap();
        f.write_all_at(&[9u8; 1], 77 * 4096).unwrap();
        // In slices of 10 blocks, one full pass (256 blocks) finds both, once each.
        let mut suspects = Vec::new();
        for _ in 0..26 {
            let slice = r.next_scrub_slice(10).unwrap();
            assert_eq!(slice.n, if slice.first == 250 { 6 } else { 10 });
            suspects.extend(scan_slice(&slice, range).unwrap());
        }
        assert_eq!(r.next_scrub_slice(10).unwrap().first, 0, "wrapped around");
        assert_eq!(suspects, vec![1, 77]);
        assert_eq!(
            r.confirm_corrupted(&suspects, get).unwrap(),
            confirmed(vec![1, 77], vec![])
        );
        // A block whose data is lost to a hole (it reads as zeros, the index has its
        // hash) is found too, though the scan does not read holes.
        assert!(r.extent().punch_hole(40 * 4096, 4096).unwrap());
        assert_eq!(scan_slice(&all, range).unwrap(), vec![1, 40, 77]);
        assert_eq!(
            r.confirm_corrupted(&[1, 40, 77], get).unwrap(),
            confirmed(vec![1, 40, 77], vec![])
        );
        // Out-of-range suspects (a shrunk or replaced volume) are ignored.
        assert_eq!(
            r.confirm_corrupted(&[999], get).unwrap(),
            Confirmed::default()
        );
        // A block written since the checkpoint waits for the next one; the others do not.
        r.apply(LogIndex(3), &write(4096, &[3u8; 4096])).unwrap();
        assert_eq!(
            r.confirm_corrupted(&suspects, get).unwrap(),
            confirmed(vec![77], vec![1])
        );
    }
}
