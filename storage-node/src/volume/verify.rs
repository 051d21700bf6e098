//! What `volume verify` needs below its runner (`crate::verify`), so that the store and
//! the node use it without depending on the runner: block digests (which the block copy
//! compares replicas by too), the digests of applied verify markers kept for the runner
//! to collect, and the node's verify counters and progress.

use std::collections::BTreeMap;
use std::sync::Arc;

use roamdisk_core::ids::VolumeId;
use serde::{Deserialize, Serialize};

/// Chunks of digests a node keeps for collection, oldest forgotten first (2 MiB).
pub const VERIFY_DIGESTS_MAX: usize = 256;

/// A block's digest: blake3 of its bytes, or all zeros for a block that reads as zeros
/// (a hole, or written zeros: the two are the same block to a reader).
pub fn block_digest(data: Option<&[u8]>) -> [u8; 32] {
    match data {
        Some(d) if !roamdisk_nbd::backend::is_zero(d) => *blake3::hash(d).as_bytes(),
        _ => [0u8; 32],
    }
}

/// Digests of the verify markers this node applied, for the runner to collect: keyed by
/// (volume, run, first block); bounded (`VERIFY_DIGESTS_MAX`).
#[derive(Default)]
pub struct DigestStore {
    map: BTreeMap<(VolumeId, u64, u64), Vec<[u8; 32]>>,
    order: std::collections::VecDeque<(VolumeId, u64, u64)>,
}

impl DigestStore {
    pub fn insert(&mut self, volume: VolumeId, id: u64, first_block: u64, digests: Vec<[u8; 32]>) {
        let key = (volume, id, first_block);
        if self.map.insert(key, digests).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > VERIFY_DIGESTS_MAX {
            let old = self.order.pop_front().expect("non-empty");
            self.map.remove(&old);
        }
    }

    pub fn get(&self, volume: VolumeId, id: u64, first_block: u64) -> Option<Vec<[u8; 32]>> {
        self.map.get(&(volume, id, first_block)).cloned()
    }
}

pub type Digests = Arc<std::sync::Mutex<DigestStore>>;

/// The digests of `count` blocks from `first_block` of an extent file: blake3 of each
/// block, all zeros for a block that reads as zeros (holes are not read).
pub fn digest_blocks(
    file: &roamdisk_nbd::file::RawFile,
    first_block: u64,
    count: u32,
) -> std::io::Result<Vec<[u8; 32]>> {
    let mut out = Vec::with_capacity(count as usize);
    super::for_each_block(file, first_block, u64::from(count), |_, data| {
        out.push(block_digest(data))
    })?;
    Ok(out)
}

/// The progress of the verify running on this node, for `GET .../verify`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VerifyProgress {
    pub volume: String,
    pub chunks_done: u64,
    pub chunks: u64,
    pub running: bool,
}

/// Counters of verify runs on this node, for `/metrics`.
#[derive(Default)]
pub struct VerifyCounts {
    pub runs: std::sync::atomic::AtomicU64,
    /// Blocks found differing between replicas (alert on any increase).
    pub differing_blocks: std::sync::atomic::AtomicU64,
}
