//! Large log entries kept out of RocksDB: each is appended once to a segment file, and
//! RocksDB holds a small pointer to it (the WiscKey separation, for a Raft log). A 1 MiB
//! write then costs one sequential write of its bytes, where RocksDB cost its WAL, a
//! memtable copy and, for entries still live when their memtable filled, an SST file and
//! its compactions (3.2–3.8 device bytes per client byte per node with the extent file,
//! `cluster-bench` 2026-12-07; decision 034).
//!
//! Crash rules:
//! - **kill -9**: `append` is a `pwrite` into the page cache before the RocksDB write
//!   that points at it, so a pointer never outlives its bytes in a process crash (bytes
//!   without a pointer are garbage, dropped with their segment).
//! - **power loss**: `sync` fdatasyncs every segment appended to since its last sync
//!   *before* RocksDB's WAL is synced, so the entries a completed sync covers have
//!   durable bytes. An entry appended while a sync runs may have its pointer on disk
//!   (the WAL sync takes whatever was written) and its bytes not; no sync covered it, so
//!   it may be lost: at open, every pointer's bytes are checked (length and crc32) and
//!   the log is cut at the first that fails, as RocksDB's point-in-time WAL recovery
//!   cuts at a torn record.
//! - **deletion**: a segment no pointer refers to is unlinked only after a sync that
//!   began after its last pointer was deleted, so a power loss cannot bring back a
//!   pointer to a deleted file; the active segment is never unlinked.
//!
//! Bounds: segments roll over at [`SEGMENT_BYTES`]; a segment lives while any entry in
//! it is in a log, so the disk they take is the retained and unapplied logs plus at most
//! one partly dead segment per writing stretch.

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use roamdisk_core::logstore::StoreError;

/// Entries whose encoding is longer than this go to a segment (shorter ones stay in
/// RocksDB, where a 4 KiB write costs no second fsync).
pub const INLINE_MAX_BYTES: usize = 32 << 10;
/// A segment file rolls over once it holds this many bytes.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// First byte of a pointer value: never the first byte of an encoded `Entry` (field 31,
/// wire type 7, which protobuf does not have).
pub const POINTER_TAG: u8 = 0xff;
const POINTER_LEN: usize = 1 + 8 + 8 + 4 + 4;

/// Where an entry's encoding lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pointer {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
}

impl Pointer {
    pub fn encode(&self) -> [u8; POINTER_LEN] {
        let mut b = [0u8; POINTER_LEN];
        b[0] = POINTER_TAG;
        b[1..9].copy_from_slice(&self.segment.to_be_bytes());
        b[9..17].copy_from_slice(&self.offset.to_be_bytes());
        b[17..21].copy_from_slice(&self.len.to_be_bytes());
        b[21..25].copy_from_slice(&self.crc.to_be_bytes());
        b
    }

    /// `None` unless `v` is a pointer value (an inline entry otherwise); an ill-formed
    /// pointer is corrupt.
    pub fn decode(v: &[u8]) -> Result<Option<Pointer>, StoreError> {
        if v.first() != Some(&POINTER_TAG) {
            return Ok(None);
        }
        if v.len() != POINTER_LEN {
            return Err(StoreError::Corrupt {
                what: "entry pointer",
                detail: format!("{} bytes, not {POINTER_LEN}", v.len()),
            });
        }
        let u64_at = |i: usize| u64::from_be_bytes(v[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_be_bytes(v[i..i + 4].try_into().expect("4 bytes"));
        Ok(Some(Pointer {
            segment: u64_at(1),
            offset: u64_at(9),
            len: u32_at(17),
            crc: u32_at(21),
        }))
    }
}

fn io(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Backend(format!("{what} {}: {e}", path.display()))
}

/// The segment files of one store.
pub struct Segments {
    dir: PathBuf,
    /// Open segments (the active one and every one still referenced).
    files: HashMap<u64, File>,
    active: u64,
    active_len: u64,
    /// Pointers in the logs per segment.
    refs: HashMap<u64, u64>,
    /// Appended to since their last fdatasync.
    dirty: BTreeSet<u64>,
    /// Unreferenced: unlinked by the next sync that begins after this.
    dead: BTreeSet<u64>,
    /// A segment was created since the last sync.
    dir_dirty: bool,
    /// Bytes appended since open.
    pub bytes_appended: u64,
}

/// What one sync makes durable before RocksDB's WAL is synced.
pub struct PendingSync {
    files: Vec<(u64, File)>,
    dir: Option<PathBuf>,
    pub dead: Vec<u64>,
}

impl PendingSync {
    /// Outside the store's lock: the fdatasyncs, then the directory.
    pub fn run(&self) -> Result<(), StoreError> {
        for (_, f) in &self.files {
            f.sync_data()
                .map_err(|e| StoreError::Backend(format!("fdatasync a log segment: {e}")))?;
        }
        if let Some(d) = &self.dir {
            File::open(d)
                .and_then(|f| f.sync_all())
                .map_err(|e| io("fsync", d, e))?;
        }
        Ok(())
    }
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.seg"))
}

impl Segments {
    /// Opens (creating) `dir`; appends go to a new segment after every existing one.
    pub fn open(dir: &Path) -> Result<Segments, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io("create", dir, e))?;
        let mut files = HashMap::new();
        let mut last = 0;
        for e in std::fs::read_dir(dir).map_err(|e| io("list", dir, e))? {
            let e = e.map_err(|e| io("list", dir, e))?;
            let name = e.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| u64::from_str_radix(n, 16).ok())
            else {
                continue;
            };
            let f = File::open(e.path()).map_err(|err| io("open", &e.path(), err))?;
            files.insert(id, f);
            last = last.max(id);
        }
        let mut s = Segments {
            dir: dir.to_owned(),
            files,
            active: last,
            active_len: 0,
            refs: HashMap::new(),
            dirty: BTreeSet::new(),
            dead: BTreeSet::new(),
            dir_dirty: false,
            bytes_appended: 0,
        };
        s.roll()?;
        Ok(s)
    }

    fn roll(&mut self) -> Result<(), StoreError> {
        let id = self.active + 1;
        let path = segment_path(&self.dir, id);
        let f = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io("create", &path, e))?;
        if self.refs.get(&self.active).copied().unwrap_or(0) == 0 && self.active != 0 {
            self.dead.insert(self.active);
        }
        self.files.insert(id, f);
        self.active = id;
        self.active_len = 0;
        // A new file's directory entry is durable once the directory is synced.
        self.dir_dirty = true;
        Ok(())
    }

    /// Appends `bytes` (one encoded entry); the caller counts the pointer with `add_ref`
    /// once the write that stores it succeeded.
    pub fn append(&mut self, bytes: &[u8]) -> Result<Pointer, StoreError> {
        if self.active_len >= SEGMENT_BYTES {
            self.roll()?;
        }
        let f = &self.files[&self.active];
        let path = segment_path(&self.dir, self.active);
        f.write_all_at(bytes, self.active_len)
            .map_err(|e| io("append to", &path, e))?;
        let p = Pointer {
            segment: self.active,
            offset: self.active_len,
            len: u32::try_from(bytes.len()).map_err(|_| StoreError::Corrupt {
                what: "entry",
                detail: format!("{} bytes is too long for a segment", bytes.len()),
            })?,
            crc: crc32fast::hash(bytes),
        };
        self.active_len += bytes.len() as u64;
        self.bytes_appended += bytes.len() as u64;
        self.dirty.insert(self.active);
        Ok(p)
    }

    /// The bytes `p` points at, checked; `None` if they are missing or do not match.
    pub fn read(&self, p: &Pointer) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(f) = self.files.get(&p.segment) else {
            return Ok(None);
        };
        let mut buf = vec![0u8; p.len as usize];
        match f.read_exact_at(&mut buf, p.offset) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(io("read", &segment_path(&self.dir, p.segment), e)),
        }
        Ok((crc32fast::hash(&buf) == p.crc).then_some(buf))
    }

    pub fn add_ref(&mut self, segment: u64) {
        *self.refs.entry(segment).or_default() += 1;
        self.dead.remove(&segment);
    }

    /// A pointer into `segment` was deleted (in a batch written, maybe not yet synced).
    pub fn drop_ref(&mut self, segment: u64) {
        let n = self.refs.entry(segment).or_default();
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.refs.remove(&segment);
            if segment != self.active {
                self.dead.insert(segment);
            }
        }
    }

    /// Before RocksDB's WAL sync, under the store's lock: what [`PendingSync::run`]
    /// must make durable (every segment appended to since its last sync, and the
    /// directory if a segment was created), and the segments dead now, to unlink once
    /// the WAL sync succeeded ([`Segments::unlink`]).
    pub fn sync_begin(&mut self) -> PendingSync {
        let files = std::mem::take(&mut self.dirty)
            .into_iter()
            .filter_map(|id| {
                self.files
                    .get(&id)
                    .and_then(|f| f.try_clone().ok())
                    .map(|f| (id, f))
            })
            .collect();
        PendingSync {
            files,
            dir: std::mem::take(&mut self.dir_dirty).then(|| self.dir.clone()),
            dead: self.dead.iter().copied().collect(),
        }
    }

    /// A failed sync: what it was to sync stays dirty (the next sync tries again).
    pub fn sync_failed(&mut self, p: PendingSync) {
        self.dirty.extend(p.files.into_iter().map(|(id, _)| id));
        self.dir_dirty |= p.dir.is_some();
    }

    /// After a WAL sync that began after `dead` were dead: unlinks those still dead.
    pub fn unlink(&mut self, dead: &[u64]) -> Result<(), StoreError> {
        for id in dead {
            if !self.dead.remove(id) {
                continue;
            }
            self.files.remove(id);
            let path = segment_path(&self.dir, *id);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("unlink", &path, e)),
            }
        }
        Ok(())
    }

    /// At open, after every pointer was counted: segments nothing points at (but the
    /// active one) are dead.
    pub fn opened(&mut self) {
        for id in self.files.keys() {
            if *id != self.active && !self.refs.contains_key(id) {
                self.dead.insert(*id);
            }
        }
    }
}
