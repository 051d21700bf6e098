//! The narrow storage interface of the replication core: Raft logs, Raft state and
//! small node records, for all groups on a node.
//!
//! API boundary: the core only ever talks to a [`LogStore`]. `storage-node` implements it
//! on RocksDB; [`MemLogStore`] implements it in memory with a power-loss model (what was
//! written but not synced is lost by [`MemLogStore::crash`]), for tests and simulation.
//! [`conformance`] is one test suite both implementations must pass.
//!
//! Semantics:
//! - `write` applies a batch atomically. It survives a process crash (kill -9) but not a
//!   power loss. `sync` makes every batch written so far durable.
//! - A group's log is the entries `(truncated_index, last_index]`; `Append` replaces any
//!   entries at or after its first index (Raft's conflicting-suffix rule).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use raft::eraftpb::{ConfState, Entry, HardState};

use crate::ids::GroupId;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage backend: {0}")]
    Backend(String),
    #[error("corrupt record {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
    #[error("group {0} does not exist")]
    NoGroup(GroupId),
    #[error("entries {low}..{high} of group {group} are not in the log")]
    Unavailable { group: GroupId, low: u64, high: u64 },
}

/// Persistent Raft state of one group.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupState {
    pub hard_state: HardState,
    pub conf_state: ConfState,
    /// Entries at or below this index are gone (compacted or covered by a snapshot).
    pub truncated_index: u64,
    /// Term of the entry at `truncated_index`.
    pub truncated_term: u64,
    /// Highest index whose effects are durable in the state machine. The log may only be
    /// compacted up to here.
    pub applied_index: u64,
    /// Index of the membership change `conf_state` reflects (the snapshot point or 0 if
    /// none since). It can be ahead of `applied_index`: a restart must not apply a change
    /// at or below it again, and a snapshot at `applied_index` cannot use this
    /// `conf_state` until `applied_index` reaches it.
    pub conf_index: u64,
}

/// One change in a [`LogBatch`].
#[derive(Clone, Debug, PartialEq)]
pub enum LogOp {
    /// Create the group with this state if it does not exist.
    Create {
        group: GroupId,
        state: GroupState,
    },
    /// Append, replacing entries at or after `entries[0].index`.
    Append {
        group: GroupId,
        entries: Vec<Entry>,
    },
    HardState {
        group: GroupId,
        hard_state: HardState,
    },
    /// The membership after applying the change at `index`.
    ConfState {
        group: GroupId,
        conf_state: ConfState,
        index: u64,
    },
    /// Replace the whole log by a snapshot point.
    Snapshot {
        group: GroupId,
        index: u64,
        term: u64,
        conf_state: ConfState,
    },
    /// Drop entries at or below `index` (which must be `<= applied_index`).
    Compact {
        group: GroupId,
        index: u64,
    },
    Applied {
        group: GroupId,
        index: u64,
    },
    /// Forget the group entirely.
    Remove {
        group: GroupId,
    },
    /// A node-level record.
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        key: Vec<u8>,
    },
}

/// Changes applied atomically by [`LogStore::write`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogBatch {
    pub ops: Vec<LogOp>,
}

impl LogBatch {
    pub fn push(&mut self, op: LogOp) {
        self.ops.push(op);
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// A node-level record: key and value.
pub type Record = (Vec<u8>, Vec<u8>);

pub trait LogStore: Send + Sync + 'static {
    /// Groups that exist in the store.
    fn groups(&self) -> Result<Vec<GroupId>, StoreError>;
    fn state(&self, group: GroupId) -> Result<Option<GroupState>, StoreError>;
    /// Entries `[low, high)`, all of which must be present; stops early once the entries
    /// returned exceed `max_bytes` (at least one entry is always returned).
    fn entries(
        &self,
        group: GroupId,
        low: u64,
        high: u64,
        max_bytes: u64,
    ) -> Result<Vec<Entry>, StoreError>;
    /// Index of the last entry, or `truncated_index` if the log is empty.
    fn last_index(&self, group: GroupId) -> Result<u64, StoreError>;
    /// Term of entry `index`; `None` if it is compacted or beyond the end. The term of
    /// `truncated_index` is known.
    fn term(&self, group: GroupId, index: u64) -> Result<Option<u64>, StoreError>;
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// All records whose key starts with `prefix`, in key order.
    fn scan(&self, prefix: &[u8]) -> Result<Vec<Record>, StoreError>;
    /// All records with `from <= key < to`, in key order.
    fn scan_range(&self, from: &[u8], to: &[u8]) -> Result<Vec<Record>, StoreError>;
    fn write(&self, batch: LogBatch) -> Result<(), StoreError>;
    fn sync(&self) -> Result<(), StoreError>;
}

/// Size of an entry for byte budgets (its payload plus a fixed overhead).
pub fn entry_bytes(e: &Entry) -> u64 {
    e.data.len() as u64 + e.context.len() as u64 + 24
}

#[derive(Clone, Debug, Default)]
struct GroupLog {
    state: GroupState,
    entries: VecDeque<Entry>,
}

impl GroupLog {
    fn last_index(&self) -> u64 {
        self.entries
            .back()
            .map_or(self.state.truncated_index, |e| e.index)
    }
}

#[derive(Clone, Debug, Default)]
struct Image {
    groups: BTreeMap<GroupId, GroupLog>,
    records: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The disk's image, which a failed sync can leave with holes: an append past a hole
    /// or a compaction over one is dropped (recovery would stop at the hole), where on
    /// the image reads see it is a caller's bug.
    durable: bool,
}

impl Image {
    fn log_mut(&mut self, group: GroupId) -> Result<&mut GroupLog, StoreError> {
        self.groups
            .get_mut(&group)
            .ok_or(StoreError::NoGroup(group))
    }

    fn apply(&mut self, op: &LogOp) -> Result<(), StoreError> {
        match op {
            LogOp::Create { group, state } => {
                self.groups.entry(*group).or_insert_with(|| GroupLog {
                    state: state.clone(),
                    entries: VecDeque::new(),
                });
            }
            LogOp::Append { group, entries } => {
                let Some(first) = entries.first() else {
                    return Ok(());
                };
                let durable = self.durable;
                let log = self.log_mut(*group)?;
                if durable
                    && (first.index > log.last_index() + 1
                        || first.index <= log.state.truncated_index)
                {
                    return Ok(());
                }
                assert!(
                    first.index > log.state.truncated_index,
                    "append below the truncation point"
                );
                assert!(first.index <= log.last_index() + 1, "append leaves a gap");
                while log.entries.back().is_some_and(|e| e.index >= first.index) {
                    log.entries.pop_back();
                }
                log.entries.extend(entries.iter().cloned());
            }
            LogOp::HardState { group, hard_state } => {
                self.log_mut(*group)?.state.hard_state = hard_state.clone()
            }
            LogOp::ConfState {
                group,
                conf_state,
                index,
            } => {
                let st = &mut self.log_mut(*group)?.state;
                st.conf_state = conf_state.clone();
                st.conf_index = *index;
            }
            LogOp::Snapshot {
                group,
                index,
                term,
                conf_state,
            } => {
                let log = self.log_mut(*group)?;
                log.entries.clear();
                log.state.truncated_index = *index;
                log.state.truncated_term = *term;
                log.state.conf_state = conf_state.clone();
                log.state.conf_index = *index;
                log.state.applied_index = *index;
                log.state.hard_state.commit = log.state.hard_state.commit.max(*index);
            }
            LogOp::Compact { group, index } => {
                let durable = self.durable;
                let log = self.log_mut(*group)?;
                if *index <= log.state.truncated_index {
                    return Ok(());
                }
                let term = log
                    .entries
                    .iter()
                    .find(|e| e.index == *index)
                    .map(|e| e.term);
                if durable && term.is_none() {
                    // Over a hole a failed sync left: nothing of it is recoverable.
                    log.entries.clear();
                    log.state.truncated_index = *index;
                    log.state.truncated_term = 0;
                    return Ok(());
                }
                assert!(
                    *index <= log.state.applied_index,
                    "compaction beyond the applied index"
                );
                let term = term.expect("compact to a present entry");
                while log.entries.front().is_some_and(|e| e.index <= *index) {
                    log.entries.pop_front();
                }
                log.state.truncated_index = *index;
                log.state.truncated_term = term;
            }
            LogOp::Applied { group, index } => self.log_mut(*group)?.state.applied_index = *index,
            LogOp::Remove { group } => {
                self.groups.remove(group);
            }
            LogOp::Put { key, value } => {
                self.records.insert(key.clone(), value.clone());
            }
            LogOp::Delete { key } => {
                self.records.remove(key);
            }
        }
        Ok(())
    }
}

struct MemInner {
    /// What reads see: everything written.
    current: Image,
    /// What survives a power loss: everything synced.
    durable: Image,
    /// Batches written since the last sync, in order.
    unsynced: Vec<LogBatch>,
    /// Batches made durable since the store was created (or lost to a failed sync).
    synced_batches: u64,
    /// The next sync fails (see [`MemLogStore::fail_next_sync`]).
    fail_next: bool,
}

impl Default for MemInner {
    fn default() -> Self {
        MemInner {
            current: Image::default(),
            durable: Image {
                durable: true,
                ..Image::default()
            },
            unsynced: Vec::new(),
            synced_batches: 0,
            fail_next: false,
        }
    }
}

/// In-memory [`LogStore`] with a power-loss model, for tests and simulation.
#[derive(Default)]
pub struct MemLogStore {
    inner: Mutex<MemInner>,
}

impl MemLogStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Simulates a power loss: batches written since the last sync are gone.
    pub fn crash(&self) {
        let mut inner = self.inner.lock().unwrap();
        inner.current = inner.durable.clone();
        inner.current.durable = false;
        inner.unsynced.clear();
    }

    /// Number of batches written but not yet synced.
    pub fn unsynced_batches(&self) -> usize {
        self.inner.lock().unwrap().unsynced.len()
    }

    /// Batches written since the store was created: a sync started now covers this many.
    pub fn written_batches(&self) -> u64 {
        let inner = self.inner.lock().unwrap();
        inner.synced_batches + inner.unsynced.len() as u64
    }

    /// Makes the next sync fail as Linux fails an `fsync` on a disk error: the batches it
    /// covers stay readable (the page cache) but are never made durable, not by a later
    /// sync either (their pages were marked clean); a power loss takes them.
    pub fn fail_next_sync(&self) {
        self.inner.lock().unwrap().fail_next = true;
    }

    /// Makes the first `n` batches ever written durable, not the ones written after
    /// them: what a sync that started when `n` had been written covers.
    pub fn sync_through(&self, n: u64) -> Result<(), StoreError> {
        let mut inner = self.inner.lock().unwrap();
        let take = n.saturating_sub(inner.synced_batches) as usize;
        let take = take.min(inner.unsynced.len());
        let batches: Vec<LogBatch> = inner.unsynced.drain(..take).collect();
        inner.synced_batches += take as u64;
        if std::mem::take(&mut inner.fail_next) {
            return Err(StoreError::Backend(
                "fsync failed (injected; the batches it covered are not durable)".into(),
            ));
        }
        for batch in &batches {
            for op in &batch.ops {
                inner.durable.apply(op)?;
            }
        }
        Ok(())
    }

    fn with_group<T>(
        &self,
        group: GroupId,
        f: impl FnOnce(&GroupLog) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let inner = self.inner.lock().unwrap();
        let log = inner
            .current
            .groups
            .get(&group)
            .ok_or(StoreError::NoGroup(group))?;
        f(log)
    }
}

impl LogStore for MemLogStore {
    fn groups(&self) -> Result<Vec<GroupId>, StoreError> {
        Ok(self
            .inner
            .lock()
            .unwrap()
            .current
            .groups
            .keys()
            .copied()
            .collect())
    }

    fn state(&self, group: GroupId) -> Result<Option<GroupState>, StoreError> {
        Ok(self
            .inner
            .lock()
            .unwrap()
            .current
            .groups
            .get(&group)
            .map(|g| g.state.clone()))
    }

    fn entries(
        &self,
        group: GroupId,
        low: u64,
        high: u64,
        max_bytes: u64,
    ) -> Result<Vec<Entry>, StoreError> {
        self.with_group(group, |log| {
            if low <= log.state.truncated_index || high > log.last_index() + 1 || low > high {
                return Err(StoreError::Unavailable { group, low, high });
            }
            let start = (low - log.state.truncated_index - 1) as usize;
            let mut out = Vec::new();
            let mut bytes = 0u64;
            for e in log.entries.range(start..start + (high - low) as usize) {
                bytes += entry_bytes(e);
                if !out.is_empty() && bytes > max_bytes {
                    break;
                }
                out.push(e.clone());
            }
            Ok(out)
        })
    }

    fn last_index(&self, group: GroupId) -> Result<u64, StoreError> {
        self.with_group(group, |log| Ok(log.last_index()))
    }

    fn term(&self, group: GroupId, index: u64) -> Result<Option<u64>, StoreError> {
        self.with_group(group, |log| {
            if index == log.state.truncated_index {
                return Ok(Some(log.state.truncated_term));
            }
            if index < log.state.truncated_index || index > log.last_index() {
                return Ok(None);
            }
            Ok(Some(
                log.entries[(index - log.state.truncated_index - 1) as usize].term,
            ))
        })
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.inner.lock().unwrap().current.records.get(key).cloned())
    }

    fn scan_range(&self, from: &[u8], to: &[u8]) -> Result<Vec<Record>, StoreError> {
        if from >= to {
            return Ok(Vec::new());
        }
        let inner = self.inner.lock().unwrap();
        Ok(inner
            .current
            .records
            .range(from.to_vec()..to.to_vec())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn scan(&self, prefix: &[u8]) -> Result<Vec<Record>, StoreError> {
        let inner = self.inner.lock().unwrap();
        Ok(inner
            .current
            .records
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn write(&self, batch: LogBatch) -> Result<(), StoreError> {
        let mut inner = self.inner.lock().unwrap();
        // Atomic: apply to a copy of the touched state first would be costly; ops are
        // validated by asserts that indicate caller bugs, and NoGroup is checked up front.
        for op in &batch.ops {
            if let LogOp::Append { group, .. }
            | LogOp::HardState { group, .. }
            | LogOp::ConfState { group, .. }
            | LogOp::Snapshot { group, .. }
            | LogOp::Compact { group, .. }
            | LogOp::Applied { group, .. } = op
            {
                let created = batch
                    .ops
                    .iter()
                    .any(|o| matches!(o, LogOp::Create { group: g, .. } if g == group));
                if !created && !inner.current.groups.contains_key(group) {
                    return Err(StoreError::NoGroup(*group));
                }
            }
        }
        for op in &batch.ops {
            inner.current.apply(op)?;
        }
        inner.unsynced.push(batch);
        Ok(())
    }

    fn sync(&self) -> Result<(), StoreError> {
        let n = self.written_batches();
        self.sync_through(n)
    }
}

/// The conformance suite every [`LogStore`] must pass. `open` returns a store over the
/// same persistent location each time it is called (after the previous one is dropped):
/// a reopen sees exactly what was synced before (and, for real disks, possibly more).
pub fn conformance<S: LogStore>(mut open: impl FnMut() -> S) {
    let g = GroupId(7);
    let e = |index: u64, term: u64| {
        let mut x = Entry::default();
        x.index = index;
        x.term = term;
        x.data = format!("e{index}t{term}").into_bytes().into();
        x
    };
    let store = open();
    assert!(store.groups().unwrap().is_empty(), "a new store is empty");
    assert!(matches!(store.last_index(g), Err(StoreError::NoGroup(_))));
    let mut b = LogBatch::default();
    b.push(LogOp::Create {
        group: g,
        state: GroupState {
            truncated_index: 5,
            truncated_term: 1,
            ..Default::default()
        },
    });
    b.push(LogOp::Append {
        group: g,
        entries: (6..=10).map(|i| e(i, 1)).collect(),
    });
    b.push(LogOp::Put {
        key: b"node/a".to_vec(),
        value: b"1".to_vec(),
    });
    b.push(LogOp::Put {
        key: b"node/b".to_vec(),
        value: b"2".to_vec(),
    });
    b.push(LogOp::Put {
        key: b"other".to_vec(),
        value: b"3".to_vec(),
    });
    store.write(b).unwrap();
    assert_eq!(store.groups().unwrap(), vec![g]);
    assert_eq!(store.last_index(g).unwrap(), 10);
    assert_eq!(
        store.term(g, 5).unwrap(),
        Some(1),
        "term of the truncation point is known"
    );
    assert_eq!(store.term(g, 4).unwrap(), None);
    assert_eq!(store.term(g, 11).unwrap(), None);
    assert_eq!(
        store.entries(g, 6, 11, u64::MAX).unwrap(),
        (6..=10).map(|i| e(i, 1)).collect::<Vec<_>>()
    );
    assert!(
        store.entries(g, 5, 7, u64::MAX).is_err(),
        "compacted entries are unavailable"
    );
    assert!(
        store.entries(g, 9, 12, u64::MAX).is_err(),
        "entries past the end are unavailable"
    );
    assert_eq!(store.scan(b"node/").unwrap().len(), 2);
    let keys = |r: Vec<Record>| r.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    assert_eq!(
        keys(store.scan_range(b"node/", b"node/b").unwrap()),
        vec![b"node/a".to_vec()]
    );
    assert_eq!(
        keys(store.scan_range(b"node/b", b"node0").unwrap()),
        vec![b"node/b".to_vec()]
    );
    assert!(store.scan_range(b"node/b", b"node/a").unwrap().is_empty());
    assert!(store.scan_range(b"node/c", b"node0").unwrap().is_empty());
    // A byte budget stops early but always returns at least one entry.
    assert_eq!(store.entries(g, 6, 11, 1).unwrap().len(), 1);
    let two = entry_bytes(&e(6, 1)) + entry_bytes(&e(7, 1));
    assert_eq!(store.entries(g, 6, 11, two).unwrap().len(), 2);

    // Conflicting suffix is replaced.
    let mut b = LogBatch::default();
    b.push(LogOp::Append {
        group: g,
        entries: vec![e(8, 2), e(9, 2)],
    });
    let mut hs = HardState::default();
    hs.term = 2;
    hs.vote = 3;
    hs.commit = 8;
    b.push(LogOp::HardState {
        group: g,
        hard_state: hs.clone(),
    });
    store.write(b).unwrap();
    assert_eq!(store.last_index(g).unwrap(), 9);
    assert_eq!(store.term(g, 8).unwrap(), Some(2));
    assert_eq!(store.term(g, 7).unwrap(), Some(1));
    store.sync().unwrap();

    // Applied, then compaction behind it.
    let mut b = LogBatch::default();
    b.push(LogOp::Applied { group: g, index: 8 });
    b.push(LogOp::Compact { group: g, index: 7 });
    b.push(LogOp::Delete {
        key: b"node/a".to_vec(),
    });
    store.write(b).unwrap();
    store.sync().unwrap();
    let st = store.state(g).unwrap().unwrap();
    assert_eq!(
        (st.truncated_index, st.truncated_term, st.applied_index),
        (7, 1, 8)
    );
    assert_eq!(st.hard_state, hs);
    assert_eq!(
        store.entries(g, 8, 10, u64::MAX).unwrap(),
        vec![e(8, 2), e(9, 2)]
    );
    drop(store);

    // Reopen: everything synced is there.
    let store = open();
    let st = store.state(g).unwrap().expect("group survives reopen");
    assert_eq!(
        (st.truncated_index, st.applied_index, st.hard_state.commit),
        (7, 8, 8)
    );
    assert_eq!(store.last_index(g).unwrap(), 9);
    assert_eq!(store.get(b"node/a").unwrap(), None);
    assert_eq!(store.get(b"node/b").unwrap(), Some(b"2".to_vec()));

    // A snapshot replaces the log; removal forgets the group.
    let mut cs = ConfState::default();
    cs.voters = vec![1, 2, 3];
    let mut b = LogBatch::default();
    b.push(LogOp::Snapshot {
        group: g,
        index: 20,
        term: 3,
        conf_state: cs.clone(),
    });
    store.write(b).unwrap();
    assert_eq!(store.last_index(g).unwrap(), 20);
    assert_eq!(store.term(g, 20).unwrap(), Some(3));
    let st = store.state(g).unwrap().unwrap();
    assert_eq!(st.conf_state, cs);
    assert_eq!(st.applied_index, 20);
    let mut b = LogBatch::default();
    b.push(LogOp::Append {
        group: g,
        entries: vec![e(21, 3)],
    });
    store.write(b).unwrap();
    assert_eq!(store.entries(g, 21, 22, u64::MAX).unwrap(), vec![e(21, 3)]);
    let mut b = LogBatch::default();
    b.push(LogOp::Remove { group: g });
    store.write(b).unwrap();
    store.sync().unwrap();
    assert!(store.state(g).unwrap().is_none());
    assert!(store.groups().unwrap().is_empty());
    drop(store);
    let store = open();
    assert!(
        store.groups().unwrap().is_empty(),
        "removal survives reopen"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Wraps a shared MemLogStore so `conformance` can "reopen" it: reopening simulates
    /// a power loss, which keeps exactly what was synced.
    struct Shared(Arc<MemLogStore>);

    impl LogStore for Shared {
        fn groups(&self) -> Result<Vec<GroupId>, StoreError> {
            self.0.groups()
        }
        fn state(&self, g: GroupId) -> Result<Option<GroupState>, StoreError> {
            self.0.state(g)
        }
        fn entries(&self, g: GroupId, l: u64, h: u64, m: u64) -> Result<Vec<Entry>, StoreError> {
            self.0.entries(g, l, h, m)
        }
        fn last_index(&self, g: GroupId) -> Result<u64, StoreError> {
            self.0.last_index(g)
        }
        fn term(&self, g: GroupId, i: u64) -> Result<Option<u64>, StoreError> {
            self.0.term(g, i)
        }
        fn get(&self, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.0.get(k)
        }
        fn scan(&self, p: &[u8]) -> Result<Vec<Record>, StoreError> {
            self.0.scan(p)
        }
        fn scan_range(&self, f: &[u8], t: &[u8]) -> Result<Vec<Record>, StoreError> {
            self.0.scan_range(f, t)
        }
        fn write(&self, b: LogBatch) -> Result<(), StoreError> {
            self.0.write(b)
        }
        fn sync(&self) -> Result<(), StoreError> {
            self.0.sync()
        }
    }

    #[test]
    fn mem_store_passes_conformance() {
        let mem = Arc::new(MemLogStore::new());
        conformance(|| {
            mem.crash();
            Shared(Arc::clone(&mem))
        });
    }

    #[test]
    fn crash_loses_only_unsynced_batches() {
        let s = MemLogStore::new();
        let g = GroupId(1);
        let mut b = LogBatch::default();
        b.push(LogOp::Create {
            group: g,
            state: GroupState::default(),
        });
        s.write(b).unwrap();
        s.sync().unwrap();
        let mut b = LogBatch::default();
        b.push(LogOp::Applied { group: g, index: 3 });
        s.write(b).unwrap();
        assert_eq!(s.unsynced_batches(), 1);
        s.crash();
        assert_eq!(s.state(g).unwrap().unwrap().applied_index, 0);
    }
}
