//! The boundary between the NBD front end and whatever stores the bytes.
//!
//! API boundary: the storage node implements [`Backend`] and [`Catalog`]; nothing in
//! this crate knows about Raft or RocksDB. Offsets and lengths passed to a backend have
//! already been validated against the export size, so a backend may assert that
//! `offset + len <= size`. They are *not* necessarily aligned to the advertised minimum
//! block size: a client that never asked for block sizes may send byte-granular
//! requests, and the spec asks us to serve them correctly, so a backend does its own
//! read-modify-write where it needs one.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

use crate::wire;

/// Block size constraints advertised in `NBD_INFO_BLOCK_SIZE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

impl BlockSizes {
    /// The sizes the roamdisk engine prefers: 4 KiB blocks inside, 64 KiB transfers,
    /// 32 MiB requests. `minimum` is lowered (to a power of two dividing `size`) when the
    /// export size is not a multiple of 4 KiB, so the last bytes stay addressable.
    pub fn for_export_size(size: u64) -> BlockSizes {
        let mut minimum: u32 = 4096;
        while minimum > 1 && size % u64::from(minimum) != 0 {
            minimum /= 2;
        }
        BlockSizes {
            minimum,
            preferred: 65536,
            maximum: crate::limits::REQUEST_PAYLOAD_MAX_BYTES,
        }
    }

    /// Checks the spec's rules on advertised sizes.
    pub fn validate(&self) -> Result<(), String> {
        if !self.minimum.is_power_of_two() || self.minimum > 65536 {
            return Err(format!(
                "minimum block size {} must be a power of two <= 65536",
                self.minimum
            ));
        }
        if !self.preferred.is_power_of_two() || self.preferred < self.minimum.max(512) {
            return Err(format!(
                "preferred block size {} must be a power of two >= max(minimum, 512)",
                self.preferred
            ));
        }
        if self.maximum < self.preferred {
            return Err(format!(
                "maximum payload {} must be >= preferred {}",
                self.maximum, self.preferred
            ));
        }
        Ok(())
    }
}

/// What a client learns about an export during the handshake.
#[derive(Clone, Debug)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub read_only: bool,
    pub block_sizes: BlockSizes,
    pub can_flush: bool,
    pub can_fua: bool,
    pub can_trim: bool,
    pub can_write_zeroes: bool,
    pub can_fast_zero: bool,
    pub can_cache: bool,
    /// True when a FLUSH or FUA on one connection covers writes completed on every
    /// connection to the same export (one shared cache, as with one file or one Raft
    /// group).
    pub can_multi_conn: bool,
}

impl ExportInfo {
    /// A writable export with every optional feature on (flush, FUA, trim, zeroes, fast
    /// zero, cache, multi-conn) and the engine's block sizes for `size`.
    pub fn full_featured(name: &str, description: String, size: u64) -> ExportInfo {
        ExportInfo {
            name: name.to_owned(),
            description,
            size,
            read_only: false,
            block_sizes: BlockSizes::for_export_size(size),
            can_flush: true,
            can_fua: true,
            can_trim: true,
            can_write_zeroes: true,
            can_fast_zero: true,
            can_cache: true,
            can_multi_conn: true,
        }
    }

    /// Transmission flags for this export; `structured` says whether the client
    /// negotiated structured replies (NBD_FLAG_SEND_DF depends on it).
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut flags = wire::FLAG_HAS_FLAGS;
        let mut set = |cond: bool, flag: u16| {
            if cond {
                flags |= flag;
            }
        };
        set(self.read_only, wire::FLAG_READ_ONLY);
        set(self.can_flush, wire::FLAG_SEND_FLUSH);
        set(self.can_fua, wire::FLAG_SEND_FUA);
        set(self.can_trim && !self.read_only, wire::FLAG_SEND_TRIM);
        set(
            self.can_write_zeroes && !self.read_only,
            wire::FLAG_SEND_WRITE_ZEROES,
        );
        set(
            self.can_write_zeroes && self.can_fast_zero && !self.read_only,
            wire::FLAG_SEND_FAST_ZERO,
        );
        set(structured, wire::FLAG_SEND_DF);
        set(self.can_multi_conn, wire::FLAG_CAN_MULTI_CONN);
        set(self.can_cache, wire::FLAG_SEND_CACHE);
        flags
    }
}

/// One piece of a read result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadChunk {
    /// Bytes as stored.
    Data(Bytes),
    /// This many bytes read as zeros (a hole, or a block known to be zero).
    Zero(u32),
}

impl ReadChunk {
    pub fn len(&self) -> u32 {
        match self {
            ReadChunk::Data(b) => u32::try_from(b.len()).expect("read chunk exceeds u32"),
            ReadChunk::Zero(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Splits `data` (read at export offset `offset`) into data and zero chunks, turning
/// every run of all-zero 4 KiB-aligned blocks into a [`ReadChunk::Zero`]. Reads of
/// unallocated or zeroed areas then travel as OFFSET_HOLE chunks instead of bytes; for
/// data that is not zero the scan stops at the first non-zero word of each block, so the
/// cost is negligible.
pub fn split_zero_runs(offset: u64, data: Bytes) -> Vec<ReadChunk> {
    const GRAIN: usize = 4096;
    let mut chunks = Vec::new();
    let len = data.len();
    // Boundaries at export offsets that are multiples of GRAIN.
    let first_boundary = ((GRAIN as u64 - offset % GRAIN as u64) % GRAIN as u64) as usize;
    let mut start = 0usize; // start of the pending chunk
    let mut pending_zero = false;
    let mut pos = 0usize;
    while pos < len {
        let end = if pos < first_boundary {
            first_boundary.min(len)
        } else {
            (pos + GRAIN).min(len)
        };
        // Only whole grains count as zero: partial edges stay data, so chunks stay aligned.
        let zero = end - pos == GRAIN && is_zero(&data[pos..end]);
        if pos == start {
            pending_zero = zero;
        } else if zero != pending_zero {
            chunks.push(make_chunk(&data, start, pos, pending_zero));
            start = pos;
            pending_zero = zero;
        }
        pos = end;
    }
    if start < len {
        chunks.push(make_chunk(&data, start, len, pending_zero));
    }
    chunks
}

fn make_chunk(data: &Bytes, start: usize, end: usize, zero: bool) -> ReadChunk {
    if zero {
        ReadChunk::Zero(u32::try_from(end - start).expect("chunk exceeds u32"))
    } else {
        ReadChunk::Data(data.slice(start..end))
    }
}

/// True when every byte is zero. Word-at-a-time so that the compiler vectorises it.
pub fn is_zero(bytes: &[u8]) -> bool {
    let (head, words, tail) = unsafe { bytes.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// One extent of `base:allocation` status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub length: u32,
    /// `wire::STATE_HOLE` / `wire::STATE_ZERO` bits.
    pub flags: u32,
}

/// Flags of a WRITE_ZEROES request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    pub fua: bool,
    /// Keep the range allocated (no hole may be created).
    pub no_hole: bool,
    /// Fail with `NotSupported` instead of doing it slowly.
    pub fast: bool,
}

/// Errors a backend reports. [`BackendError::nbd_errno`] is the one place they become
/// NBD error values.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("no space left on device")]
    NoSpace,
    #[error("export is read-only")]
    ReadOnly,
    #[error("not supported: {0}")]
    NotSupported(&'static str),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("server is shutting down")]
    Shutdown,
    #[error("volume unavailable: {0}")]
    Unavailable(String),
}

impl BackendError {
    pub fn io(context: &'static str, source: std::io::Error) -> BackendError {
        BackendError::Io { context, source }
    }

    /// The single mapping from internal errors to the errno values NBD allows on the
    /// wire. `EDQUOT` and `EFBIG` become `ENOSPC` as the spec asks; `ENOTSUP` is only
    /// produced for a FAST_ZERO that cannot be fast.
    pub fn nbd_errno(&self) -> u32 {
        match self {
            BackendError::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => wire::ENOSPC,
                Some(libc::EPERM | libc::EACCES | libc::EROFS) => wire::EPERM,
                Some(libc::EINVAL) => wire::EINVAL,
                Some(libc::ENOMEM) => wire::ENOMEM,
                Some(libc::EOVERFLOW) => wire::EOVERFLOW,
                Some(libc::ESHUTDOWN) => wire::ESHUTDOWN,
                _ => wire::EIO,
            },
            BackendError::NoSpace => wire::ENOSPC,
            BackendError::ReadOnly => wire::EPERM,
            BackendError::NotSupported(_) => wire::ENOTSUP,
            BackendError::Invalid(_) => wire::EINVAL,
            BackendError::Shutdown => wire::ESHUTDOWN,
            BackendError::Unavailable(_) => wire::EIO,
        }
    }
}

pub type BackendResult<T> = Result<T, BackendError>;

/// Storage behind one export. All methods may run concurrently; the server never
/// issues two overlapping writes expecting an order (NBD gives none).
///
/// Durability contract: when `write` with `fua`, `trim` with `fua`, `write_zeroes` with
/// `flags.fua` or `flush` returns `Ok`, the data they cover (for `flush`: every write
/// that returned `Ok` before `flush` was called, on any connection) survives a crash.
pub trait Backend: Send + Sync + 'static {
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = BackendResult<Vec<ReadChunk>>> + Send;
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = BackendResult<()>> + Send;
    fn flush(&self) -> impl Future<Output = BackendResult<()>> + Send;
    fn trim(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = BackendResult<()>> + Send;
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        flags: ZeroFlags,
    ) -> impl Future<Output = BackendResult<()>> + Send;
    /// Allocation status from `offset`, covering at least one byte and at most
    /// `extents_max` extents; the extents may stop short of `len` and the last may run
    /// past it (but never past the export's end).
    fn block_status(
        &self,
        offset: u64,
        len: u32,
        extents_max: usize,
    ) -> impl Future<Output = BackendResult<Vec<Extent>>> + Send;
    /// A hint that `offset..offset+len` will be read soon.
    fn cache(&self, offset: u64, len: u32) -> impl Future<Output = BackendResult<()>> + Send;
}

/// An export as the handshake finds it: what to advertise and where the bytes live.
pub struct Export<B> {
    pub info: ExportInfo,
    pub backend: Arc<B>,
}

impl<B> Clone for Export<B> {
    fn clone(&self) -> Self {
        Export {
            info: self.info.clone(),
            backend: Arc::clone(&self.backend),
        }
    }
}

/// The set of exports a listener serves. Lookups are synchronous and cheap: they run
/// inside the handshake.
pub trait Catalog: Send + Sync + 'static {
    type Backend: Backend;
    /// `(name, description)` of every export, for NBD_OPT_LIST.
    fn list(&self) -> Vec<(String, String)>;
    /// The export called `name`; the empty name is the default export.
    fn lookup(&self, name: &str) -> Option<Export<Self::Backend>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lens(chunks: &[ReadChunk]) -> Vec<(bool, u32)> {
        chunks
            .iter()
            .map(|c| (matches!(c, ReadChunk::Zero(_)), c.len()))
            .collect()
    }

    #[test]
    fn zero_runs_are_aligned_and_cover_everything() {
        let mut v = vec![0u8; 5 * 4096];
        v[4096 + 7] = 1; // block 1 has data
        let chunks = split_zero_runs(0, Bytes::from(v.clone()));
        assert_eq!(
            lens(&chunks),
            vec![(true, 4096), (false, 4096), (true, 3 * 4096)]
        );

        // Unaligned start: the partial first grain stays data even if zero.
        let chunks = split_zero_runs(100, Bytes::from(v[..8192].to_vec()));
        let total: u32 = chunks.iter().map(ReadChunk::len).sum();
        assert_eq!(total, 8192);
        assert!(matches!(chunks[0], ReadChunk::Data(_)));
    }

    #[test]
    fn block_sizes_follow_export_size() {
        assert_eq!(BlockSizes::for_export_size(1 << 30).minimum, 4096);
        assert_eq!(BlockSizes::for_export_size(1 << 30).validate(), Ok(()));
        assert_eq!(BlockSizes::for_export_size(1536).minimum, 512);
        assert_eq!(BlockSizes::for_export_size(1001).minimum, 1);
        // preferred stays valid when minimum shrinks
        assert_eq!(BlockSizes::for_export_size(1001).validate(), Ok(()));
    }
}
