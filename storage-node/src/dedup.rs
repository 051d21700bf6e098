//! Dedup by reference on the links between sites.
//!
//! Two VM disks cloned from one image share most of their blocks. A node shipping a Raft
//! append to another site cuts out every aligned 4 KiB block of a write whose content the
//! receiving site probably stores already, and sends its blake3 hash instead
//! ([`cut_known_blocks`]). The receiver puts the exact bytes back ([`restore`]) before
//! Raft sees the message, so the log, the entry checksums and everything after them are
//! unchanged: dedup lives entirely on the wire.
//!
//! - *Guess (sender).* A block is sent by reference when it is all zeros, or when its
//!   hash is in this node's [`ContentIndex`] (content this node stores: every volume is
//!   replicated to every site, so the other site most likely stores it too) and the
//!   receiving site has not reported it missing ([`MissSet`]; a hash leaves that set when
//!   the block is next sent as data, since the site then stores it).
//! - *Resolve (receiver).* From its own content index (reading the block and checking its
//!   blake3: an index entry may be stale), else from the other nodes of its site (a LAN
//!   round trip), else, if its index names a block that is not yet what the reference
//!   says (an entry received but not yet applied), it waits for apply a few times
//!   ([`RESOLVE_RETRIES`]); else it drops the whole message and reports the hashes missing. The
//!   sender then sends those blocks as data, and Raft resends the dropped entries (the
//!   next append finds a gap and is rejected, or a heartbeat response shows the follower
//!   behind). A wrong guess costs a resend; it never changes a byte.
//!
//! Bounds: the content index keeps at most [`CONTENT_INDEX_MAX`] hashes (oldest
//! forgotten first), each miss set [`MISSES_MAX`]; references per entry are bounded by
//! the entry's size, which the frame limit bounds.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use raft::eraftpb::{EntryType, Message};
use roamdisk_core::command::VolumeCommand;
use roamdisk_core::ids::{VolumeId, BLOCK_BYTES};
use serde::{Deserialize, Serialize};

pub type Hash = [u8; 32];

/// Hashes the content index remembers: 256 Ki blocks = 1 GiB of distinct data, about
/// 16 MiB of memory.
pub const CONTENT_INDEX_MAX: usize = 256 << 10;
/// Hashes a sender remembers as missing at one site.
pub const MISSES_MAX: usize = 64 << 10;
/// Extra attempts a receiver makes, [`RESOLVE_RETRY_MS`] apart, at references its own
/// index names but its replica does not hold yet (the entry with the data arrived, on the
/// same ordered lane, and is waiting to apply).
pub const RESOLVE_RETRIES: u32 = 4;
pub const RESOLVE_RETRY_MS: u64 = 10;

pub const BLOCK: usize = BLOCK_BYTES as usize;

/// blake3 of a block of zeros: always resolvable, never looked up.
pub fn zero_hash() -> &'static Hash {
    static ZERO: OnceLock<Hash> = OnceLock::new();
    ZERO.get_or_init(|| *blake3::hash(&[0u8; BLOCK]).as_bytes())
}

fn key(h: &Hash) -> u128 {
    u128::from_le_bytes(h[..16].try_into().expect("16 bytes"))
}

/// Where this node stores blocks by content: hash → (volume, block). Filled when a
/// checkpoint hashes the blocks it made durable, and at start from the hash index. An
/// entry goes stale when its block is overwritten; readers verify the content.
pub struct ContentIndex {
    inner: Mutex<Fifo<(VolumeId, u64)>>,
}

impl Default for ContentIndex {
    fn default() -> Self {
        ContentIndex::with_capacity(CONTENT_INDEX_MAX)
    }
}

impl ContentIndex {
    pub fn with_capacity(cap: usize) -> ContentIndex {
        ContentIndex {
            inner: Mutex::new(Fifo::new(cap)),
        }
    }

    pub fn insert(&self, hash: &Hash, volume: VolumeId, block: u64) {
        self.inner
            .lock()
            .expect("content index")
            .insert(key(hash), (volume, block));
    }

    pub fn get(&self, hash: &Hash) -> Option<(VolumeId, u64)> {
        self.inner
            .lock()
            .expect("content index")
            .map
            .get(&key(hash))
            .copied()
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("content index").map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Hashes a site reported missing, per site.
#[derive(Default)]
pub struct MissSet {
    sites: Mutex<HashMap<String, Fifo<()>>>,
}

impl MissSet {
    pub fn insert(&self, site: &str, hashes: &[Hash]) {
        let mut sites = self.sites.lock().expect("miss set");
        let set = sites
            .entry(site.to_owned())
            .or_insert_with(|| Fifo::new(MISSES_MAX));
        for h in hashes {
            set.insert(key(h), ());
        }
    }

    /// True if `site` reported `hash` missing, and forgets it: the caller is about to send
    /// the block as data, after which the site stores it.
    pub fn take(&self, site: &str, hash: &Hash) -> bool {
        self.sites
            .lock()
            .expect("miss set")
            .get_mut(site)
            .is_some_and(|s| s.map.remove(&key(hash)).is_some())
    }
}

/// A map that forgets its oldest keys beyond `cap`.
struct Fifo<V> {
    map: HashMap<u128, V>,
    order: VecDeque<u128>,
    cap: usize,
}

impl<V> Fifo<V> {
    fn new(cap: usize) -> Self {
        Fifo {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    fn insert(&mut self, k: u128, v: V) {
        if self.map.insert(k, v).is_none() {
            self.order.push_back(k);
        }
        while self.map.len() > self.cap {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.map.remove(&old);
        }
    }
}

/// Blocks cut out of one entry's data: (byte position in the original data, hash), in
/// ascending position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryRefs {
    pub entry: u32,
    pub refs: Vec<(u32, Hash)>,
}

/// Counters, for status and metrics.
#[derive(Default)]
pub struct DedupStats {
    /// Blocks sent as references.
    pub refs_sent: AtomicU64,
    /// References this node resolved from its own replicas.
    pub resolved_local: AtomicU64,
    /// References this node resolved from another node of its site.
    pub resolved_site: AtomicU64,
    /// References it could not resolve (the message was dropped and resent with data).
    pub missed: AtomicU64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupCounts {
    /// Blocks in this node's content index now.
    pub indexed_blocks: u64,
    pub refs_sent: u64,
    pub resolved_local: u64,
    pub resolved_site: u64,
    pub missed: u64,
}

impl DedupStats {
    pub fn counts(&self, index: &ContentIndex) -> DedupCounts {
        DedupCounts {
            indexed_blocks: index.len() as u64,
            refs_sent: self.refs_sent.load(Ordering::Relaxed),
            resolved_local: self.resolved_local.load(Ordering::Relaxed),
            resolved_site: self.resolved_site.load(Ordering::Relaxed),
            missed: self.missed.load(Ordering::Relaxed),
        }
    }
}

/// Cuts out of `msg`'s entries every whole, aligned 4 KiB block written by a volume
/// `Write` for which `known(hash)` holds (all-zero blocks always), and returns where they
/// were. Entries that are not writes are left alone. `known` is asked once per distinct
/// hash: a block repeated within the message goes the same way every time (otherwise a
/// hash just taken out of the miss set would go once as data and then by reference in
/// the same message, which the receiver cannot resolve: a resend loop).
pub fn cut_known_blocks(msg: &mut Message, mut known: impl FnMut(&Hash) -> bool) -> Vec<EntryRefs> {
    let mut out = Vec::new();
    let mut decided: HashMap<Hash, bool> = HashMap::new();
    for (i, e) in msg.entries.iter_mut().enumerate() {
        if e.get_entry_type() != EntryType::EntryNormal || e.data.len() < BLOCK {
            continue;
        }
        let data: &[u8] = &e.data;
        let Ok(VolumeCommand::Write {
            offset,
            data: payload,
        }) = VolumeCommand::decode(data)
        else {
            continue;
        };
        // The payload is borrowed from the entry: its position there.
        let base = payload.as_ptr() as usize - data.as_ptr() as usize;
        let skip = ((BLOCK_BYTES - offset % BLOCK_BYTES) % BLOCK_BYTES) as usize;
        let mut refs = Vec::new();
        let mut at = skip;
        while at + BLOCK <= payload.len() {
            let block = &payload[at..at + BLOCK];
            let hash = if roamdisk_nbd::backend::is_zero(block) {
                *zero_hash()
            } else {
                *blake3::hash(block).as_bytes()
            };
            let is_known =
                hash == *zero_hash() || *decided.entry(hash).or_insert_with(|| known(&hash));
            if is_known {
                refs.push(((base + at) as u32, hash));
            }
            at += BLOCK;
        }
        if refs.is_empty() {
            continue;
        }
        let mut cut = Vec::with_capacity(data.len() - refs.len() * BLOCK);
        let mut from = 0;
        for (pos, _) in &refs {
            cut.extend_from_slice(&data[from..*pos as usize]);
            from = *pos as usize + BLOCK;
        }
        cut.extend_from_slice(&data[from..]);
        e.data = cut.into();
        out.push(EntryRefs {
            entry: i as u32,
            refs,
        });
    }
    out
}

/// Records in `index` the whole aligned blocks that `msg`'s volume writes will put in
/// `volume` (a replica receiving appends from another site indexes them on arrival, not
/// a checkpoint later, so a clone written right after resolves; a reference that comes
/// before the entry is applied fails verification and is resent as data).
pub fn index_writes(msg: &Message, volume: VolumeId, index: &ContentIndex) {
    for e in &msg.entries {
        if e.get_entry_type() != EntryType::EntryNormal || e.data.len() < BLOCK {
            continue;
        }
        let Ok(VolumeCommand::Write { offset, data }) = VolumeCommand::decode(&e.data) else {
            continue;
        };
        let skip = (BLOCK_BYTES - offset % BLOCK_BYTES) % BLOCK_BYTES;
        let mut at = skip as usize;
        while at + BLOCK <= data.len() {
            let block = &data[at..at + BLOCK];
            if !roamdisk_nbd::backend::is_zero(block) {
                let b = (offset + at as u64) / BLOCK_BYTES;
                index.insert(blake3::hash(block).as_bytes(), volume, b);
            }
            at += BLOCK;
        }
    }
}

/// Every distinct hash `refs` names, in first-seen order.
pub fn wanted(refs: &[EntryRefs]) -> Vec<Hash> {
    let mut seen = HashSet::new();
    refs.iter()
        .flat_map(|e| e.refs.iter().map(|(_, h)| *h))
        .filter(|h| seen.insert(*h))
        .collect()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RestoreError {
    #[error("reference to entry {0}, which the message does not have")]
    NoEntry(u32),
    #[error("references of entry {0} out of order or past its data")]
    BadPosition(u32),
    #[error("restored entry {entry} would be {bytes} bytes, over the limit")]
    TooLarge { entry: u32, bytes: usize },
    #[error("no block for a reference")]
    Unresolved,
}

/// Puts the blocks back into `msg`'s entries; `block(hash)` gives a block's verified
/// content. Nothing in `msg` changes unless every reference resolves and is well placed.
pub fn restore<'a>(
    msg: &mut Message,
    refs: &[EntryRefs],
    max_entry_bytes: usize,
    mut block: impl FnMut(&Hash) -> Option<&'a [u8]>,
) -> Result<(), RestoreError> {
    let mut restored = Vec::with_capacity(refs.len());
    for r in refs {
        let e = msg
            .entries
            .get(r.entry as usize)
            .ok_or(RestoreError::NoEntry(r.entry))?;
        let cut: &[u8] = &e.data;
        let total = cut.len() + r.refs.len() * BLOCK;
        if total > max_entry_bytes {
            return Err(RestoreError::TooLarge {
                entry: r.entry,
                bytes: total,
            });
        }
        let mut out = Vec::with_capacity(total);
        let mut from = 0usize;
        for (pos, hash) in &r.refs {
            let pos = *pos as usize;
            let literal = pos
                .checked_sub(out.len())
                .filter(|n| from + n <= cut.len())
                .ok_or(RestoreError::BadPosition(r.entry))?;
            out.extend_from_slice(&cut[from..from + literal]);
            from += literal;
            let b = if hash == zero_hash() {
                &[0u8; BLOCK][..]
            } else {
                block(hash).ok_or(RestoreError::Unresolved)?
            };
            if b.len() != BLOCK {
                return Err(RestoreError::Unresolved);
            }
            out.extend_from_slice(b);
        }
        out.extend_from_slice(&cut[from..]);
        restored.push((r.entry as usize, out));
    }
    for (i, data) in restored {
        msg.entries[i].data = data.into();
    }
    Ok(())
}

/// True when `data` is a block whose blake3 is `hash`.
pub fn verify(hash: &Hash, data: &[u8]) -> bool {
    data.len() == BLOCK && blake3::hash(data).as_bytes() == hash
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::Entry;

    fn entry(data: Vec<u8>) -> Entry {
        let mut e = Entry::default();
        e.set_entry_type(EntryType::EntryNormal);
        e.data = data.into();
        e
    }

    fn block(seed: u8) -> Vec<u8> {
        (0..BLOCK)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    fn msg_with(writes: &[(u64, Vec<u8>)]) -> Message {
        let mut m = Message::default();
        for (offset, data) in writes {
            m.entries.push(entry(
                VolumeCommand::Write {
                    offset: *offset,
                    data,
                }
                .encode(),
            ));
        }
        m.entries.push(entry(
            VolumeCommand::Zero {
                offset: 0,
                len: 1 << 20,
                punch: true,
            }
            .encode(),
        ));
        m
    }

    #[test]
    fn known_blocks_are_cut_and_restored_byte_for_byte() {
        let (a, b, c) = (block(1), block(2), block(3));
        // An unaligned write: only whole aligned blocks inside it can be cut.
        let mut unaligned = vec![7u8; 100];
        unaligned.extend_from_slice(&a);
        unaligned.extend_from_slice(&[9u8; 50]);
        let writes = vec![
            (
                0,
                [a.clone(), b.clone(), vec![0; BLOCK], c.clone()].concat(),
            ),
            (BLOCK_BYTES - 100, unaligned),
        ];
        let original = msg_with(&writes);
        let mut m = original.clone();
        let (ha, hc) = (*blake3::hash(&a).as_bytes(), *blake3::hash(&c).as_bytes());
        let refs = cut_known_blocks(&mut m, |h| *h == ha || *h == hc);
        // Entry 0: a, zeros, c cut (b unknown). Entry 1: `a` sits at volume offset 4096.
        assert_eq!(refs.len(), 2);
        assert_eq!(refs[0].refs.len(), 3);
        assert_eq!(refs[1].refs.len(), 1);
        assert_eq!(
            m.entries[0].data.len(),
            original.entries[0].data.len() - 3 * BLOCK
        );
        assert_eq!(
            m.entries[2], original.entries[2],
            "a Zero entry is untouched"
        );
        assert_eq!(wanted(&refs).len(), 3, "a, zeros and c, once each");

        let idx = ContentIndex::default();
        index_writes(&original, VolumeId(5), &idx);
        assert_eq!(
            idx.get(&ha),
            Some((VolumeId(5), 1)),
            "`a` last written at block 1"
        );
        assert_eq!(idx.get(&hc), Some((VolumeId(5), 3)));
        assert_eq!(idx.len(), 3, "a, b, c; zeros are not indexed");

        let store: HashMap<Hash, Vec<u8>> = [(ha, a.clone()), (hc, c.clone())].into();
        restore(&mut m, &refs, 1 << 20, |h| {
            store.get(h).map(|v| v.as_slice())
        })
        .unwrap();
        assert_eq!(m, original);
    }

    #[test]
    fn a_repeated_block_is_decided_once_per_message() {
        let a = block(6);
        let mut m = msg_with(&[(0, [a.clone(), a.clone(), a.clone()].concat())]);
        let mut asked = 0;
        // Known only the first time it is asked (a miss-set entry taken): all data.
        let refs = cut_known_blocks(&mut m, |_| {
            asked += 1;
            asked > 1
        });
        assert_eq!(asked, 1);
        assert!(refs.is_empty(), "{refs:?}");
    }

    #[test]
    fn a_missing_or_misplaced_reference_changes_nothing() {
        let a = block(4);
        let ha = *blake3::hash(&a).as_bytes();
        let mut m = msg_with(&[(0, [a.clone(), block(5)].concat())]);
        let refs = cut_known_blocks(&mut m, |h| *h == ha);
        let cut = m.clone();
        assert_eq!(
            restore(&mut m, &refs, 1 << 20, |_| None),
            Err(RestoreError::Unresolved)
        );
        assert_eq!(m, cut);

        let some = |_: &Hash| Some(a.as_slice());
        let mut bad = refs.clone();
        bad[0].refs[0].0 = u32::MAX;
        assert_eq!(
            restore(&mut m, &bad, 1 << 20, some),
            Err(RestoreError::BadPosition(0))
        );
        let mut bad = refs.clone();
        bad[0].entry = 9;
        assert_eq!(
            restore(&mut m, &bad, 1 << 20, some),
            Err(RestoreError::NoEntry(9))
        );
        assert!(matches!(
            restore(&mut m, &refs, 100, some),
            Err(RestoreError::TooLarge { .. })
        ));
        let wrong_len = |_: &Hash| Some(&a[..10]);
        assert_eq!(
            restore(&mut m, &refs, 1 << 20, wrong_len),
            Err(RestoreError::Unresolved)
        );
        assert_eq!(m, cut);
    }

    #[test]
    fn indexes_forget_their_oldest_entries() {
        let idx = ContentIndex::with_capacity(2);
        let h = |n: u8| *blake3::hash(&[n]).as_bytes();
        idx.insert(&h(1), VolumeId(1), 1);
        idx.insert(&h(2), VolumeId(1), 2);
        idx.insert(&h(1), VolumeId(1), 7); // a new place for a known hash
        idx.insert(&h(3), VolumeId(1), 3);
        assert_eq!(idx.len(), 2);
        assert_eq!(idx.get(&h(1)), None, "oldest forgotten");
        assert_eq!(idx.get(&h(3)), Some((VolumeId(1), 3)));

        let misses = MissSet::default();
        misses.insert("b", &[h(1)]);
        assert!(!misses.take("c", &h(1)), "reported by b only");
        assert!(misses.take("b", &h(1)));
        assert!(
            !misses.take("b", &h(1)),
            "sent as data once, then known again"
        );
    }
}
