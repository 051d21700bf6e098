//! A raw (possibly sparse) file as an export, with the semantics of qemu-nbd's default
//! `cache=writeback`: writes go to the page cache, FLUSH is `fdatasync`, FUA writes use
//! `pwritev2(RWF_DSYNC)`, TRIM punches holes, block status is `SEEK_DATA`/`SEEK_HOLE`.
//!
//! Reads and cached writes are done inline on the calling task: for page-cache I/O a
//! `pread` costs about as much as the wake-up that handing it to another thread would
//! (a thread pool per request is what qemu-nbd does; `nbd-bench` compares the two
//! servers, not the two designs within ours). Calls that
//! can wait on the device (sync, FUA, fallocate, readahead) run on tokio's blocking pool
//! so they never stall the connection's event loop.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::backend::{
    Backend, BackendError, BackendResult, Catalog, Export, ExportInfo, Extent, ReadChunk, ZeroFlags,
};
use crate::wire;

/// A raw file with the block-device operations roamdisk needs, as plain blocking calls.
/// [`FileBackend`] serves one over NBD; the storage node keeps each volume replica's data
/// in one (its extent file).
pub struct RawFile {
    file: File,
}

impl RawFile {
    pub fn open(path: &Path, read_only: bool) -> std::io::Result<RawFile> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        Ok(RawFile { file })
    }

    /// Opens `path`, creating it as a sparse file of `size` bytes if it does not exist,
    /// and growing it to `size` if it is smaller.
    pub fn open_sparse(path: &Path, size: u64) -> std::io::Result<RawFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if file.metadata()?.len() < size {
            file.set_len(size)?;
        }
        Ok(RawFile { file })
    }

    pub fn len(&self) -> std::io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    pub fn is_empty(&self) -> std::io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Grows the file (never shrinks it).
    pub fn grow(&self, size: u64) -> std::io::Result<()> {
        if self.len()? < size {
            self.file.set_len(size)?;
        }
        Ok(())
    }

    fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Fills `buf` from `offset`; bytes past the end of the file read as zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes.
            let n = unsafe {
                libc::pread(
                    self.fd(),
                    rest.as_mut_ptr().cast(),
                    rest.len(),
                    (offset + done as u64) as libc::off_t,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                rest.fill(0);
                return Ok(());
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` as data and zero chunks (see `split_zero_runs`).
    pub fn read_chunks(&self, offset: u64, len: u32) -> std::io::Result<Vec<ReadChunk>> {
        let mut buf = BytesMut::with_capacity(len as usize);
        // SAFETY: read_at fills every byte of the buffer (or zero-fills at EOF) before
        // it is read; on error the buffer is dropped unread.
        unsafe { buf.set_len(len as usize) };
        self.read_at(&mut buf, offset)?;
        Ok(crate::backend::split_zero_runs(offset, buf.freeze()))
    }

    /// Writes all of `data` at `offset`; with `dsync` the data is durable on return.
    pub fn write_at(&self, data: &[u8], offset: u64, dsync: bool) -> std::io::Result<()> {
        pwrite_all(self.fd(), data, offset, dsync)
    }

    /// Deallocates the range (it reads as zeros). Returns false when the filesystem
    /// cannot punch holes (then nothing changed).
    pub fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<bool> {
        match fallocate(
            &self.file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(true),
            Err(e) if is_unsupported(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Makes the range read as zeros: by punching a hole unless `no_hole`, else by
    /// zeroing in place. If the filesystem can do neither quickly, writes zeros unless
    /// `fast_only`, in which case it returns false and changes nothing.
    pub fn zero(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fast_only: bool,
    ) -> std::io::Result<bool> {
        let mode = if no_hole {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        };
        match fallocate(&self.file, mode, offset, len) {
            Ok(()) => Ok(true),
            Err(e) if is_unsupported(&e) => {
                if fast_only {
                    return Ok(false);
                }
                write_zero_buffers(&self.file, offset, len)?;
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }

    /// Allocation extents of `offset..min(offset+len, size)`, at most `extents_max`.
    pub fn extents(
        &self,
        offset: u64,
        len: u64,
        size: u64,
        extents_max: usize,
    ) -> std::io::Result<Vec<Extent>> {
        let end = (offset + len).min(size);
        let mut extents = Vec::new();
        let mut pos = offset;
        while pos < end && extents.len() < extents_max {
            let data = lseek(self.fd(), pos, libc::SEEK_DATA)?
                .unwrap_or(size)
                .min(size);
            if data > pos {
                let hole_end = data.min(end);
                extents.push(Extent {
                    length: (hole_end - pos) as u32,
                    flags: wire::STATE_HOLE | wire::STATE_ZERO,
                });
                pos = hole_end;
                continue;
            }
            let hole = lseek(self.fd(), pos, libc::SEEK_HOLE)?
                .unwrap_or(size)
                .min(size);
            let data_end = hole.min(end).max(pos + 1);
            extents.push(Extent {
                length: (data_end - pos) as u32,
                flags: 0,
            });
            pos = data_end;
        }
        Ok(extents)
    }

    pub fn sync_data(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Starts writing back the dirty pages of `offset..offset + len` without waiting for
    /// them (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): write-behind, so that a bulk
    /// writer's data reaches the disk as it goes instead of in one burst at its fsync,
    /// which every other writer of the disk would wait behind. Durability still needs
    /// [`RawFile::sync_data`].
    pub fn start_writeback(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        };
        // SAFETY: a plain system call on a descriptor this value owns.
        let r =
            unsafe { libc::sync_file_range(self.fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Another handle to the same file (`dup`): syncing it syncs this file.
    pub fn try_clone(&self) -> std::io::Result<RawFile> {
        Ok(RawFile {
            file: self.file.try_clone()?,
        })
    }

    /// Readahead hint.
    pub fn will_need(&self, offset: u64, len: u64) -> std::io::Result<()> {
        // SAFETY: plain syscall; advisory only.
        let r = unsafe {
            libc::posix_fadvise(
                self.fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            )
        };
        if r != 0 {
            return Err(std::io::Error::from_raw_os_error(r));
        }
        Ok(())
    }
}

/// A raw file served as one export.
pub struct FileBackend {
    raw: Arc<RawFile>,
    size: u64,
}

impl FileBackend {
    /// Opens `path`; the export size is the file size.
    pub fn open(path: &Path, read_only: bool) -> std::io::Result<FileBackend> {
        let raw = RawFile::open(path, read_only)?;
        let size = raw.len()?;
        Ok(FileBackend {
            raw: Arc::new(raw),
            size,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    async fn blocking<T: Send + 'static>(
        &self,
        context: &'static str,
        f: impl FnOnce(&RawFile) -> std::io::Result<T> + Send + 'static,
    ) -> BackendResult<T> {
        let raw = Arc::clone(&self.raw);
        match tokio::task::spawn_blocking(move || f(&raw)).await {
            Ok(r) => r.map_err(|e| BackendError::io(context, e)),
            Err(_) => Err(BackendError::Shutdown),
        }
    }
}

fn pwrite_all(fd: i32, data: &[u8], offset: u64, dsync: bool) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < data.len() {
        let rest = &data[done..];
        let iov = libc::iovec {
            iov_base: rest.as_ptr() as *mut _,
            iov_len: rest.len(),
        };
        let flags = if dsync { libc::RWF_DSYNC } else { 0 };
        // SAFETY: one iovec over a live, readable buffer.
        let n =
            unsafe { libc::pwritev2(fd, &iov, 1, (offset + done as u64) as libc::off_t, flags) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: plain syscall on an owned descriptor.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn is_unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
    )
}

/// Writes zeros with ordinary writes, for filesystems without fallocate modes.
fn write_zero_buffers(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut pos = 0u64;
    while pos < len {
        let n = (len - pos).min(zeros.len() as u64) as usize;
        pwrite_all(file.as_raw_fd(), &zeros[..n], offset + pos, false)?;
        pos += n as u64;
    }
    Ok(())
}

fn lseek(fd: i32, offset: u64, whence: i32) -> std::io::Result<Option<u64>> {
    // SAFETY: plain syscall.
    let r = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

impl Backend for FileBackend {
    async fn read(&self, offset: u64, len: u32) -> BackendResult<Vec<ReadChunk>> {
        self.raw
            .read_chunks(offset, len)
            .map_err(|e| BackendError::io("read export file", e))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BackendResult<()> {
        if fua {
            return self
                .blocking("write export file (FUA)", move |f| {
                    f.write_at(&data, offset, true)
                })
                .await;
        }
        self.raw
            .write_at(&data, offset, false)
            .map_err(|e| BackendError::io("write export file", e))
    }

    async fn flush(&self) -> BackendResult<()> {
        self.blocking("fdatasync export file", |f| f.sync_data())
            .await
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> BackendResult<()> {
        self.blocking("punch hole in export file", move |f| {
            // TRIM is advisory: a filesystem that cannot punch simply keeps the data.
            f.punch_hole(offset, u64::from(len))?;
            if fua {
                f.sync_data()?;
            }
            Ok(())
        })
        .await
    }

    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> BackendResult<()> {
        let done = self
            .blocking("zero range of export file", move |f| {
                let done = f.zero(offset, u64::from(len), flags.no_hole, flags.fast)?;
                if done && flags.fua {
                    f.sync_data()?;
                }
                Ok(done)
            })
            .await?;
        if !done {
            return Err(BackendError::NotSupported("filesystem cannot zero quickly"));
        }
        Ok(())
    }

    async fn block_status(
        &self,
        offset: u64,
        len: u32,
        extents_max: usize,
    ) -> BackendResult<Vec<Extent>> {
        self.raw
            .extents(offset, u64::from(len), self.size, extents_max)
            .map_err(|e| BackendError::io("seek data/hole in export file", e))
    }

    async fn cache(&self, offset: u64, len: u32) -> BackendResult<()> {
        self.raw
            .will_need(offset, u64::from(len))
            .map_err(|e| BackendError::io("fadvise export file", e))
    }
}

/// One raw file served under one name; the empty name also selects it.
pub struct FileCatalog {
    export: Export<FileBackend>,
}

impl FileCatalog {
    pub fn new(
        path: &Path,
        name: &str,
        description: &str,
        read_only: bool,
    ) -> std::io::Result<FileCatalog> {
        let backend = FileBackend::open(path, read_only)?;
        let size = backend.size();
        let info = ExportInfo {
            read_only,
            ..ExportInfo::full_featured(name, description.to_owned(), size)
        };
        Ok(FileCatalog {
            export: Export {
                info,
                backend: Arc::new(backend),
            },
        })
    }

    pub fn info(&self) -> &ExportInfo {
        &self.export.info
    }
}

impl Catalog for FileCatalog {
    type Backend = FileBackend;

    fn list(&self) -> Vec<(String, String)> {
        vec![(
            self.export.info.name.clone(),
            self.export.info.description.clone(),
        )]
    }

    fn lookup(&self, name: &str) -> Option<Export<FileBackend>> {
        (name.is_empty() || name == self.export.info.name).then(|| self.export.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holes_are_reported_and_punched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let f = File::create(&path).unwrap();
        f.set_len(1 << 20).unwrap();
        drop(f);
        let b = FileBackend::open(&path, false).unwrap();
        let all_hole = b.block_status(0, 1 << 20, 100).await.unwrap();
        assert_eq!(
            all_hole,
            vec![Extent {
                length: 1 << 20,
                flags: 3
            }]
        );
        b.write(65536, Bytes::from(vec![1u8; 4096]), false)
            .await
            .unwrap();
        let st = b.block_status(0, 1 << 20, 100).await.unwrap();
        assert!(
            st.iter().any(|e| e.flags == 0),
            "written block must show as data: {st:?}"
        );
        let total: u64 = st.iter().map(|e| u64::from(e.length)).sum();
        assert_eq!(total, 1 << 20);
        b.trim(65536, 4096, true).await.unwrap();
        let st = b.block_status(0, 1 << 20, 100).await.unwrap();
        assert_eq!(
            st,
            vec![Extent {
                length: 1 << 20,
                flags: 3
            }]
        );
        let r = b.read(65536, 4096).await.unwrap();
        assert_eq!(r, vec![ReadChunk::Zero(4096)]);
    }
}
