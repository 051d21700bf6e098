//! A sparse in-memory backend: the reference implementation of [`Backend`] used by unit
//! and property tests, and by anyone embedding the server without storage.
//!
//! Blocks of 4 KiB are allocated on first write; unallocated blocks read as zeros and
//! are reported as holes. Memory is bounded by twice the export size.
//!
//! It models a volatile cache in front of stable storage: writes land in `volatile`;
//! FLUSH copies it to `durable`; FUA applies the same change to both; [`MemBackend::crash`]
//! throws away what was not made durable. Tests use that to check that the server
//! keeps the NBD durability contract (for instance, multi-connection FLUSH).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};

use crate::backend::{
    Backend, BackendError, BackendResult, Catalog, Export, ExportInfo, Extent, ReadChunk, ZeroFlags,
};
use crate::wire;

const BLOCK: u64 = 4096;

type Blocks = BTreeMap<u64, Box<[u8]>>;

#[derive(Default)]
struct State {
    volatile: Blocks,
    durable: Blocks,
}

pub struct MemBackend {
    size: u64,
    state: Mutex<State>,
}

impl MemBackend {
    pub fn new(size: u64) -> MemBackend {
        MemBackend {
            size,
            state: Mutex::new(State::default()),
        }
    }

    /// Number of allocated 4 KiB blocks (for tests of TRIM and zeroing).
    pub fn allocated_blocks(&self) -> usize {
        self.state.lock().unwrap().volatile.len()
    }

    /// Simulates a power loss: everything not flushed (or written with FUA) is lost.
    pub fn crash(&self) {
        let mut st = self.state.lock().unwrap();
        st.volatile = st.durable.clone();
    }

    fn block_len(&self, index: u64) -> usize {
        (self.size - index * BLOCK).min(BLOCK) as usize
    }

    fn apply(&self, fua: bool, change: impl Fn(&mut Blocks)) {
        let mut st = self.state.lock().unwrap();
        change(&mut st.volatile);
        if fua {
            change(&mut st.durable);
        }
    }

    fn zero_range(&self, blocks: &mut Blocks, offset: u64, len: u32, punch: bool) {
        let end = offset + u64::from(len);
        let mut pos = offset;
        while pos < end {
            let index = pos / BLOCK;
            let in_block = (pos % BLOCK) as usize;
            let n = ((BLOCK - pos % BLOCK).min(end - pos)) as usize;
            let whole = in_block == 0 && n == self.block_len(index);
            if whole && punch {
                blocks.remove(&index);
            } else if let Some(b) = blocks.get_mut(&index) {
                b[in_block..in_block + n].fill(0);
            } else if !punch {
                // NO_HOLE: the block must end up allocated.
                blocks.insert(index, vec![0u8; self.block_len(index)].into_boxed_slice());
            }
            pos += n as u64;
        }
    }
}

impl Backend for MemBackend {
    async fn read(&self, offset: u64, len: u32) -> BackendResult<Vec<ReadChunk>> {
        assert!(offset + u64::from(len) <= self.size);
        let mut out = BytesMut::zeroed(len as usize);
        {
            let st = self.state.lock().unwrap();
            let blocks = &st.volatile;
            let end = offset + u64::from(len);
            for (&index, data) in blocks.range(offset / BLOCK..end.div_ceil(BLOCK)) {
                let b_start = index * BLOCK;
                let from = offset.max(b_start);
                let to = end.min(b_start + data.len() as u64);
                out[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&data[(from - b_start) as usize..(to - b_start) as usize]);
            }
        }
        Ok(crate::backend::split_zero_runs(offset, out.freeze()))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BackendResult<()> {
        assert!(offset + data.len() as u64 <= self.size);
        self.apply(fua, |blocks| self.write_into(blocks, offset, &data));
        Ok(())
    }

    async fn flush(&self) -> BackendResult<()> {
        let mut st = self.state.lock().unwrap();
        st.durable = st.volatile.clone();
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> BackendResult<()> {
        self.apply(fua, |blocks| self.zero_range(blocks, offset, len, true));
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> BackendResult<()> {
        if flags.fast && flags.no_hole {
            // Zeroing while keeping allocation costs as much as writing here.
            return Err(BackendError::NotSupported("fast zero with NO_HOLE"));
        }
        self.apply(flags.fua, |blocks| {
            self.zero_range(blocks, offset, len, !flags.no_hole)
        });
        Ok(())
    }

    async fn block_status(
        &self,
        offset: u64,
        len: u32,
        extents_max: usize,
    ) -> BackendResult<Vec<Extent>> {
        let st = self.state.lock().unwrap();
        let blocks = &st.volatile;
        let end = (offset + u64::from(len)).min(self.size);
        let mut extents: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end && extents.len() < extents_max {
            let index = pos / BLOCK;
            let block_end = ((index + 1) * BLOCK).min(self.size);
            let n = (block_end.min(end) - pos) as u32;
            let flags = if blocks.contains_key(&index) {
                0
            } else {
                wire::STATE_HOLE | wire::STATE_ZERO
            };
            match extents.last_mut() {
                Some(last) if last.flags == flags => last.length += n,
                _ => extents.push(Extent { length: n, flags }),
            }
            pos += u64::from(n);
        }
        Ok(extents)
    }

    async fn cache(&self, _offset: u64, _len: u32) -> BackendResult<()> {
        Ok(())
    }
}

impl MemBackend {
    fn write_into(&self, blocks: &mut Blocks, offset: u64, data: &[u8]) {
        let mut pos = 0usize;
        while pos < data.len() {
            let at = offset + pos as u64;
            let index = at / BLOCK;
            let in_block = (at % BLOCK) as usize;
            let n = ((BLOCK as usize) - in_block).min(data.len() - pos);
            let block_len = self.block_len(index);
            let b = blocks
                .entry(index)
                .or_insert_with(|| vec![0u8; block_len].into_boxed_slice());
            b[in_block..in_block + n].copy_from_slice(&data[pos..pos + n]);
            pos += n;
        }
    }
}

/// A catalog of in-memory exports.
pub struct MemCatalog {
    exports: Vec<Export<MemBackend>>,
}

impl MemCatalog {
    pub fn single(name: &str, size: u64) -> MemCatalog {
        MemCatalog {
            exports: vec![Export {
                info: mem_info(name, size),
                backend: Arc::new(MemBackend::new(size)),
            }],
        }
    }

    /// The first export's info (test helper).
    pub fn lookup_info(&self) -> ExportInfo {
        self.exports[0].info.clone()
    }

    pub fn backend(&self, name: &str) -> Option<Arc<MemBackend>> {
        self.lookup(name).map(|e| e.backend)
    }
}

fn mem_info(name: &str, size: u64) -> ExportInfo {
    ExportInfo::full_featured(name, format!("in-memory export {name}"), size)
}

impl Catalog for MemCatalog {
    type Backend = MemBackend;

    fn list(&self) -> Vec<(String, String)> {
        self.exports
            .iter()
            .map(|e| (e.info.name.clone(), e.info.description.clone()))
            .collect()
    }

    fn lookup(&self, name: &str) -> Option<Export<MemBackend>> {
        if name.is_empty() {
            return self.exports.first().cloned();
        }
        self.exports.iter().find(|e| e.info.name == name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flatten(chunks: Vec<ReadChunk>) -> Vec<u8> {
        let mut v = Vec::new();
        for c in chunks {
            match c {
                ReadChunk::Data(b) => v.extend_from_slice(&b),
                ReadChunk::Zero(n) => v.resize(v.len() + n as usize, 0),
            }
        }
        v
    }

    #[tokio::test]
    async fn unaligned_write_read_trim() {
        let m = MemBackend::new(10 * 4096);
        m.write(4000, Bytes::from(vec![7u8; 200]), false)
            .await
            .unwrap();
        let got = flatten(m.read(3990, 220).await.unwrap());
        assert_eq!(&got[..10], &[0u8; 10]);
        assert_eq!(&got[10..210], &[7u8; 200][..]);
        assert_eq!(m.allocated_blocks(), 2);
        let bs = m.block_status(0, 10 * 4096, 100).await.unwrap();
        assert_eq!(
            bs[0],
            Extent {
                length: 8192,
                flags: 0
            }
        );
        m.trim(0, 8192, false).await.unwrap();
        assert_eq!(m.allocated_blocks(), 0);
        m.write_zeroes(
            0,
            4096,
            ZeroFlags {
                no_hole: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(m.allocated_blocks(), 1);
    }
}
