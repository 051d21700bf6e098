//! [`LogStore`] on RocksDB: every group's Raft log, Raft state and the node's records in
//! one database, so one write batch and one WAL sync cover all groups (group commit).
//!
//! Key layout (all integers big-endian so that keys sort numerically):
//! - `g` group(8) `s`            → group state (`codec`-encoded [`StoredState`])
//! - `g` group(8) `e` index(8)   → entry (raft-rs protobuf), or for an entry longer than
//!   [`payload::INLINE_MAX_BYTES`] a [`payload::Pointer`] to its encoding in a segment
//!   file beside the database (`DIR.payload/`): large writes are written once, not to the
//!   WAL, a memtable and SST files (decision 034)
//! - `r` key                     → node record
//!
//! `write` uses an unsynced RocksDB write (in the WAL, so it survives kill -9); `sync`
//! flushes and fsyncs the WAL. Group states and last indexes are cached in memory: raft-rs
//! asks for them on every step. So is the tail of every log ([`EntryCache`]): raft-rs
//! reads every entry back at least once after persisting it (to apply it, and to send it
//! to a follower that was not sent it from memory), and that read through a RocksDB
//! iterator was 29 % of the store thread under 4 KiB writes (`perf`: an uncached SST
//! block read and its checksum per seek).
//!
//! Here: keys, group states and the [`RocksLogStore`]; in `cache`, the [`EntryCache`]; in
//! `payload`, the segment files.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, RwLock};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState};
use roamdisk_core::codec;
use roamdisk_core::ids::GroupId;
use roamdisk_core::logstore::{GroupState, LogBatch, LogOp, LogStore, Record, StoreError};
use rocksdb::{Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};

mod cache;
pub mod faults;
pub mod payload;
#[cfg(test)]
mod tests;

use cache::EntryCache;
pub use cache::ENTRY_CACHE_BYTES;
use payload::{Pointer, Segments};

/// Where the segment files of the store in `dir` live.
pub fn payload_dir(dir: &Path) -> std::path::PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_owned();
    name.push(".payload");
    dir.with_file_name(name)
}

/// On-disk form of a [`GroupState`], versioned by field order (append only).
#[derive(Serialize, Deserialize)]
struct StoredState {
    #[serde(with = "serde_bytes")]
    hard_state: Vec<u8>,
    #[serde(with = "serde_bytes")]
    conf_state: Vec<u8>,
    truncated_index: u64,
    truncated_term: u64,
    applied_index: u64,
    conf_index: u64,
}

fn state_key(g: GroupId) -> Vec<u8> {
    let mut k = Vec::with_capacity(10);
    k.push(b'g');
    k.extend_from_slice(&g.0.to_be_bytes());
    k.push(b's');
    k
}

fn entry_prefix(g: GroupId) -> Vec<u8> {
    let mut k = Vec::with_capacity(18);
    k.push(b'g');
    k.extend_from_slice(&g.0.to_be_bytes());
    k.push(b'e');
    k
}

fn entry_key(g: GroupId, index: u64) -> Vec<u8> {
    let mut k = entry_prefix(g);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

fn record_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(b'r');
    k.extend_from_slice(key);
    k
}

fn backend(e: rocksdb::Error) -> StoreError {
    StoreError::Backend(e.into_string())
}

fn corrupt(what: &'static str, detail: impl ToString) -> StoreError {
    StoreError::Corrupt {
        what,
        detail: detail.to_string(),
    }
}

fn encode_state(st: &GroupState) -> Vec<u8> {
    codec::encode(&StoredState {
        hard_state: st.hard_state.write_to_bytes().expect("encode hard state"),
        conf_state: st.conf_state.write_to_bytes().expect("encode conf state"),
        truncated_index: st.truncated_index,
        truncated_term: st.truncated_term,
        applied_index: st.applied_index,
        conf_index: st.conf_index,
    })
    .expect("encode group state")
}

fn decode_state(bytes: &[u8]) -> Result<GroupState, StoreError> {
    let s: StoredState = codec::decode(bytes).map_err(|e| corrupt("group state", e))?;
    let mut hard_state = HardState::default();
    hard_state
        .merge_from_bytes(&s.hard_state)
        .map_err(|e| corrupt("hard state", e))?;
    let mut conf_state = ConfState::default();
    conf_state
        .merge_from_bytes(&s.conf_state)
        .map_err(|e| corrupt("conf state", e))?;
    Ok(GroupState {
        hard_state,
        conf_state,
        truncated_index: s.truncated_index,
        truncated_term: s.truncated_term,
        applied_index: s.applied_index,
        conf_index: s.conf_index,
    })
}

#[derive(Clone)]
struct Cached {
    state: GroupState,
    last_index: u64,
    /// Term of every entry in the log, `terms[i]` for index `truncated_index + 1 + i`:
    /// raft-rs asks for terms constantly, and reading one from RocksDB would decode a
    /// whole (up to 32 MiB) entry. Bounded like the log itself.
    terms: std::collections::VecDeque<u64>,
    /// The entries stored in segments: index → segment.
    pointers: std::collections::BTreeMap<u64, u64>,
}

impl Cached {
    fn new(state: GroupState) -> Cached {
        Cached {
            last_index: state.truncated_index,
            state,
            terms: Default::default(),
            pointers: Default::default(),
        }
    }

    /// Forgets the pointers at `range`, listing their segments in `dropped`.
    fn drop_pointers(&mut self, range: impl std::ops::RangeBounds<u64>, dropped: &mut Vec<u64>) {
        let gone: Vec<u64> = self.pointers.range(range).map(|(i, _)| *i).collect();
        for i in gone {
            dropped.push(self.pointers.remove(&i).expect("listed"));
        }
    }

    fn term(&self, index: u64) -> Option<u64> {
        if index == self.state.truncated_index {
            return Some(self.state.truncated_term);
        }
        if index < self.state.truncated_index || index > self.last_index {
            return None;
        }
        self.terms
            .get((index - self.state.truncated_index - 1) as usize)
            .copied()
    }
}

pub struct RocksLogStore {
    db: DB,
    cache: RwLock<HashMap<GroupId, Cached>>,
    /// Locked after `cache` (in `write`, and in `entries`), never before it.
    entries: Mutex<EntryCache>,
    /// The emulated page-cache faults of a test node (`faults`); locked last.
    faults: Option<Mutex<faults::Faults>>,
    /// The segment files of large entries; locked after `cache`, before `entries`.
    payload: Mutex<Segments>,
    /// Entries longer than this (encoded) go to a segment.
    inline_max: usize,
}

/// Page-cache faults to emulate (tests only; see [`faults`]).
pub struct TestFaults {
    /// Where the fault files live (the node's data directory).
    pub dir: std::path::PathBuf,
    /// Drop, before opening, what the previous run had not made durable.
    pub power_loss: bool,
}

impl RocksLogStore {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: &Path) -> Result<RocksLogStore, StoreError> {
        Self::open_with(dir, None)
    }

    /// Opens the store, emulating page-cache faults with `test` (see [`faults`]).
    pub fn open_with(dir: &Path, test: Option<TestFaults>) -> Result<RocksLogStore, StoreError> {
        Self::open_inline(dir, test, payload::INLINE_MAX_BYTES)
    }

    /// Opens the store with entries longer than `inline_max` bytes in segments (tests
    /// put every entry there with 0).
    pub fn open_inline(
        dir: &Path,
        test: Option<TestFaults>,
        inline_max: usize,
    ) -> Result<RocksLogStore, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        // Raft logs are written once and deleted soon: keep compaction cheap.
        opts.set_max_background_jobs(2);
        // Big enough that log entries are compacted (deleted) before their memtable is
        // flushed, so their data is written once, to the WAL (see RETAINED_LOG_BYTES).
        opts.set_write_buffer_size(128 << 20);
        opts.set_max_write_buffer_number(4);
        opts.set_recycle_log_file_num(4);
        let db = DB::open(&opts, dir).map_err(backend)?;
        let faults = match test {
            Some(t) => {
                let mut f = faults::Faults::load(&t.dir)?;
                if t.power_loss {
                    Self::lose_power(&db, &mut f)?;
                }
                Some(Mutex::new(f))
            }
            None => None,
        };
        let store = RocksLogStore {
            db,
            cache: RwLock::new(HashMap::new()),
            entries: Mutex::new(EntryCache::new(ENTRY_CACHE_BYTES)),
            faults,
            payload: Mutex::new(Segments::open(&payload_dir(dir))?),
            inline_max,
        };
        store.load_cache()?;
        Ok(store)
    }

    /// The emulated power loss: every group's log is cut at its first entry that was not
    /// on disk (the rest of the store, synced, stays as it was).
    fn lose_power(db: &DB, f: &mut faults::Faults) -> Result<(), StoreError> {
        let cut = f.state().cut_points();
        let mut last = std::collections::BTreeMap::new();
        let mut wb = WriteBatch::default();
        for (g, from) in faults::cut_groups(&cut) {
            for item in db.iterator(IteratorMode::From(&entry_key(g, from), Direction::Forward)) {
                let (k, _) = item.map_err(backend)?;
                if !k.starts_with(&entry_prefix(g)) {
                    break;
                }
                let index = u64::from_be_bytes(k[k.len() - 8..].try_into().expect("8 bytes"));
                last.insert(g.0, index);
            }
            wb.delete_range(entry_key(g, from), entry_key(g, u64::MAX));
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        db.write_opt(wb, &wo).map_err(backend)?;
        f.power_lost(&cut, &last)
    }

    /// The emulated page cache's state (a test node only).
    pub fn fault_state(&self) -> Option<faults::FaultState> {
        self.faults
            .as_ref()
            .map(|f| f.lock().unwrap().state().clone())
    }

    /// The entry stored under `v`: inline, or read from its segment (`None` if its bytes
    /// are missing or fail their check).
    fn decode_entry(&self, v: &[u8]) -> Result<Option<(Entry, Option<u64>)>, StoreError> {
        let (bytes, segment) = match Pointer::decode(v)? {
            None => (std::borrow::Cow::Borrowed(v), None),
            Some(p) => match self.payload.lock().unwrap().read(&p)? {
                Some(b) => (std::borrow::Cow::Owned(b), Some(p.segment)),
                None => return Ok(None),
            },
        };
        let mut e = Entry::default();
        e.merge_from_bytes(&bytes)
            .map_err(|err| corrupt("log entry", err))?;
        Ok(Some((e, segment)))
    }

    fn load_cache(&self) -> Result<(), StoreError> {
        let mut cache = HashMap::new();
        // Logs cut at an entry whose segment bytes did not survive (see `payload`).
        let mut cut = Vec::new();
        for item in self.db.prefix_iterator(b"g") {
            let (k, v) = item.map_err(backend)?;
            if k.first() != Some(&b'g') {
                break;
            }
            if k.len() == 10 && k[9] == b's' {
                let g = GroupId(u64::from_be_bytes(k[1..9].try_into().expect("8 bytes")));
                let state = decode_state(&v)?;
                let mut c = Cached::new(state);
                for item in self.db.iterator(IteratorMode::From(
                    &entry_key(g, c.state.truncated_index + 1),
                    Direction::Forward,
                )) {
                    let (k, v) = item.map_err(backend)?;
                    if !k.starts_with(&entry_prefix(g)) {
                        break;
                    }
                    let Some((e, segment)) = self.decode_entry(&v)? else {
                        tracing::warn!(group = %g, index = c.last_index + 1,
                            "a log entry's segment bytes are missing or torn (written, \
                             never synced, before a power loss): the log ends before it");
                        cut.push((g, c.last_index + 1));
                        break;
                    };
                    if let Some(s) = segment {
                        c.pointers.insert(e.index, s);
                        self.payload.lock().unwrap().add_ref(s);
                    }
                    if e.index != c.last_index + 1 {
                        return Err(corrupt(
                            "log",
                            format!("group {g}: entry {} follows {}", e.index, c.last_index),
                        ));
                    }
                    c.terms.push_back(e.term);
                    c.last_index = e.index;
                }
                cache.insert(g, c);
            }
        }
        if !cut.is_empty() {
            let mut wb = WriteBatch::default();
            for (g, from) in cut {
                wb.delete_range(entry_key(g, from), entry_key(g, u64::MAX));
                wb.delete(entry_key(g, u64::MAX));
            }
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            self.db.write_opt(wb, &wo).map_err(backend)?;
        }
        self.payload.lock().unwrap().opened();
        *self.cache.write().unwrap() = cache;
        Ok(())
    }

    /// (truncated index, last index) of a group.
    fn cached_bounds(&self, g: GroupId) -> Result<(u64, u64), StoreError> {
        let cache = self.cache.read().unwrap();
        let c = cache.get(&g).ok_or(StoreError::NoGroup(g))?;
        Ok((c.state.truncated_index, c.last_index))
    }
}

impl LogStore for RocksLogStore {
    fn groups(&self) -> Result<Vec<GroupId>, StoreError> {
        let mut v: Vec<GroupId> = self.cache.read().unwrap().keys().copied().collect();
        v.sort();
        Ok(v)
    }

    fn state(&self, g: GroupId) -> Result<Option<GroupState>, StoreError> {
        Ok(self.cache.read().unwrap().get(&g).map(|c| c.state.clone()))
    }

    fn entries(
        &self,
        g: GroupId,
        low: u64,
        high: u64,
        max_bytes: u64,
    ) -> Result<Vec<Entry>, StoreError> {
        let (truncated, last) = {
            let c = self.cached_bounds(g)?;
            (c.0, c.1)
        };
        if low <= truncated || high > last + 1 || low > high {
            return Err(StoreError::Unavailable {
                group: g,
                low,
                high,
            });
        }
        if low == high {
            return Ok(Vec::new());
        }
        {
            let _bounds = self.cache.read().unwrap();
            let cached = self.entries.lock().unwrap();
            if let Some(out) = cached.get(g, low, high, max_bytes) {
                return Ok(out);
            }
        }
        let mut out = Vec::new();
        let mut bytes = 0u64;
        let start = entry_key(g, low);
        for item in self
            .db
            .iterator(IteratorMode::From(&start, Direction::Forward))
            .take((high - low) as usize)
        {
            let (k, v) = item.map_err(backend)?;
            let (e, _) = self.decode_entry(&v)?.ok_or_else(|| {
                corrupt(
                    "log entry",
                    format!("group {g}: an entry's segment bytes are missing"),
                )
            })?;
            let expected = low + out.len() as u64;
            if e.index != expected || k.as_ref() != entry_key(g, e.index).as_slice() {
                return Err(corrupt(
                    "log",
                    format!("group {g}: expected entry {expected}, found {}", e.index),
                ));
            }
            bytes += roamdisk_core::logstore::entry_bytes(&e);
            if !out.is_empty() && bytes > max_bytes {
                return Ok(out);
            }
            out.push(e);
        }
        if out.len() as u64 != high - low {
            return Err(corrupt(
                "log",
                format!("group {g}: entries {low}..{high} have a gap"),
            ));
        }
        Ok(out)
    }

    fn last_index(&self, g: GroupId) -> Result<u64, StoreError> {
        Ok(self
            .cache
            .read()
            .unwrap()
            .get(&g)
            .ok_or(StoreError::NoGroup(g))?
            .last_index)
    }

    fn term(&self, g: GroupId, index: u64) -> Result<Option<u64>, StoreError> {
        let cache = self.cache.read().unwrap();
        Ok(cache.get(&g).ok_or(StoreError::NoGroup(g))?.term(index))
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db.get(record_key(key)).map_err(backend)
    }

    fn scan(&self, prefix: &[u8]) -> Result<Vec<Record>, StoreError> {
        let p = record_key(prefix);
        let mut out = Vec::new();
        for item in self.db.iterator(IteratorMode::From(&p, Direction::Forward)) {
            let (k, v) = item.map_err(backend)?;
            if !k.starts_with(&p) {
                break;
            }
            out.push((k[1..].to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn scan_range(&self, from: &[u8], to: &[u8]) -> Result<Vec<Record>, StoreError> {
        let (from, to) = (record_key(from), record_key(to));
        let mut out = Vec::new();
        if from >= to {
            return Ok(out);
        }
        for item in self
            .db
            .iterator(IteratorMode::From(&from, Direction::Forward))
        {
            let (k, v) = item.map_err(backend)?;
            if *k >= *to {
                break;
            }
            out.push((k[1..].to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn write(&self, batch: LogBatch) -> Result<(), StoreError> {
        // Work on copies of the cached states so that a failed write changes nothing.
        let mut cache = self.cache.write().unwrap();
        let mut payload = self.payload.lock().unwrap();
        let mut touched: HashMap<GroupId, Option<Cached>> = HashMap::new();
        let mut wb = WriteBatch::default();
        // Segment pointers this batch adds and deletes, counted once it is written.
        let (mut added, mut dropped) = (Vec::new(), Vec::new());
        for op in &batch.ops {
            let group_of = |g: GroupId,
                            touched: &mut HashMap<GroupId, Option<Cached>>|
             -> Result<Cached, StoreError> {
                let entry = touched.entry(g).or_insert_with(|| cache.get(&g).cloned());
                entry.clone().ok_or(StoreError::NoGroup(g))
            };
            match op {
                LogOp::Create { group, state } => {
                    let existing = touched
                        .entry(*group)
                        .or_insert_with(|| cache.get(group).cloned());
                    if existing.is_none() {
                        *existing = Some(Cached::new(state.clone()));
                        wb.put(state_key(*group), encode_state(state));
                    }
                    continue;
                }
                LogOp::Put { key, value } => {
                    wb.put(record_key(key), value);
                    continue;
                }
                LogOp::Delete { key } => {
                    wb.delete(record_key(key));
                    continue;
                }
                LogOp::Remove { group } => {
                    if let Some(c) = touched
                        .entry(*group)
                        .or_insert_with(|| cache.get(group).cloned())
                        .as_mut()
                    {
                        c.drop_pointers(.., &mut dropped);
                    }
                    wb.delete(state_key(*group));
                    wb.delete_range(entry_key(*group, 0), entry_key(*group, u64::MAX));
                    wb.delete(entry_key(*group, u64::MAX));
                    touched.insert(*group, None);
                    continue;
                }
                _ => {}
            }
            let (g, mut c) = match op {
                LogOp::Append { group, .. }
                | LogOp::HardState { group, .. }
                | LogOp::ConfState { group, .. }
                | LogOp::Snapshot { group, .. }
                | LogOp::Compact { group, .. }
                | LogOp::Applied { group, .. } => (*group, group_of(*group, &mut touched)?),
                _ => unreachable!("handled above"),
            };
            match op {
                LogOp::Append { entries, .. } => {
                    let Some(first) = entries.first() else {
                        continue;
                    };
                    if first.index <= c.state.truncated_index || first.index > c.last_index + 1 {
                        return Err(corrupt(
                            "append",
                            format!("group {g}: entry {} does not follow the log", first.index),
                        ));
                    }
                    if first.index <= c.last_index {
                        wb.delete_range(entry_key(g, first.index), entry_key(g, c.last_index + 1));
                        c.drop_pointers(first.index.., &mut dropped);
                    }
                    c.terms
                        .truncate((first.index - c.state.truncated_index - 1) as usize);
                    for e in entries {
                        let bytes = e.write_to_bytes().expect("encode entry");
                        if bytes.len() > self.inline_max {
                            let p = payload.append(&bytes)?;
                            wb.put(entry_key(g, e.index), p.encode());
                            c.pointers.insert(e.index, p.segment);
                            added.push(p.segment);
                        } else {
                            wb.put(entry_key(g, e.index), bytes);
                        }
                        c.terms.push_back(e.term);
                    }
                    c.last_index = entries.last().expect("non-empty").index;
                }
                LogOp::HardState { hard_state, .. } => c.state.hard_state = hard_state.clone(),
                LogOp::ConfState {
                    conf_state, index, ..
                } => {
                    c.state.conf_state = conf_state.clone();
                    c.state.conf_index = *index;
                }
                LogOp::Snapshot {
                    index,
                    term,
                    conf_state,
                    ..
                } => {
                    wb.delete_range(entry_key(g, 0), entry_key(g, u64::MAX));
                    c.drop_pointers(.., &mut dropped);
                    c.state.truncated_index = *index;
                    c.state.truncated_term = *term;
                    c.state.conf_state = conf_state.clone();
                    c.state.conf_index = *index;
                    c.state.applied_index = *index;
                    c.state.hard_state.commit = c.state.hard_state.commit.max(*index);
                    c.last_index = *index;
                    c.terms.clear();
                }
                LogOp::Compact { index, .. } => {
                    if *index > c.state.truncated_index {
                        if *index > c.state.applied_index {
                            return Err(corrupt(
                                "compact",
                                format!(
                                    "group {g}: {index} is beyond applied {}",
                                    c.state.applied_index
                                ),
                            ));
                        }
                        let term = c.term(*index).ok_or_else(|| {
                            corrupt("compact", format!("group {g}: entry {index} absent"))
                        })?;
                        wb.delete_range(entry_key(g, 0), entry_key(g, index + 1));
                        c.drop_pointers(..=*index, &mut dropped);
                        c.terms.drain(..(*index - c.state.truncated_index) as usize);
                        c.state.truncated_index = *index;
                        c.state.truncated_term = term;
                    }
                }
                LogOp::Applied { index, .. } => c.state.applied_index = *index,
                _ => unreachable!("handled above"),
            }
            wb.put(state_key(g), encode_state(&c.state));
            touched.insert(g, Some(c));
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(false);
        self.db.write_opt(wb, &wo).map_err(backend)?;
        for s in added {
            payload.add_ref(s);
        }
        for s in dropped {
            payload.drop_ref(s);
        }
        drop(payload);
        if let Some(f) = &self.faults {
            f.lock().unwrap().written(&batch);
        }
        self.entries.lock().unwrap().apply(batch);
        for (g, c) in touched {
            match c {
                Some(c) => {
                    cache.insert(g, c);
                }
                None => {
                    cache.remove(&g);
                }
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StoreError> {
        let covered = match &self.faults {
            Some(faults) => {
                let mut f = faults.lock().unwrap();
                f.before_sync()?;
                Some(f.state().unsynced.clone())
            }
            None => None,
        };
        // The segments first: a pointer this sync makes durable has durable bytes.
        let pending = self.payload.lock().unwrap().sync_begin();
        if let Err(e) = pending.run() {
            self.payload.lock().unwrap().sync_failed(pending);
            return Err(e);
        }
        self.db.flush_wal(true).map_err(backend)?;
        // Segments dead before this sync began: no durable pointer into them remains.
        self.payload.lock().unwrap().unlink(&pending.dead)?;
        match (&self.faults, covered) {
            (Some(faults), Some(covered)) => faults.lock().unwrap().synced(&covered),
            _ => Ok(()),
        }
    }
}
