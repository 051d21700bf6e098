//! The tail of every group's log kept in memory, as written, within a byte budget:
//! raft-rs reads every entry back after persisting it, and those reads come from here
//! rather than from RocksDB.

use std::collections::{HashMap, VecDeque};

use raft::eraftpb::Entry;
use roamdisk_core::ids::GroupId;
use roamdisk_core::logstore::{LogBatch, LogOp};

/// Bytes of log entries kept in memory for all groups of a node (the tails of their
/// logs; older entries are read from RocksDB). Four times the retained log of one busy
/// group, so a few writing volumes are served from memory.
pub const ENTRY_CACHE_BYTES: u64 = 128 << 20;

/// The last entries of every group's log, as written: a group's cached entries, when
/// there are any, always end at its last index. Bounded by [`ENTRY_CACHE_BYTES`]; the
/// oldest entries of the group with the most cached bytes go first.
pub(super) struct EntryCache {
    pub(super) groups: HashMap<GroupId, Tail>,
    pub(super) bytes: u64,
    budget: u64,
}

/// One group's cached entries and their bytes (`entry_bytes`).
#[derive(Default)]
pub(super) struct Tail {
    pub(super) entries: VecDeque<Entry>,
    pub(super) bytes: u64,
}

impl Tail {
    fn push(&mut self, e: Entry) -> u64 {
        let n = roamdisk_core::logstore::entry_bytes(&e);
        self.entries.push_back(e);
        self.bytes += n;
        n
    }

    /// Drops entries from the back while `drop` says so; returns the bytes freed.
    fn pop_back_while(&mut self, drop: impl Fn(&Entry) -> bool) -> u64 {
        let mut freed = 0;
        while self.entries.back().is_some_and(&drop) {
            let e = self.entries.pop_back().expect("non-empty");
            freed += roamdisk_core::logstore::entry_bytes(&e);
        }
        self.bytes -= freed;
        freed
    }

    /// Drops entries from the front while `drop` says so; returns the bytes freed.
    fn pop_front_while(&mut self, mut drop: impl FnMut(&Entry) -> bool) -> u64 {
        let mut freed = 0;
        while self.entries.front().is_some_and(&mut drop) {
            let e = self.entries.pop_front().expect("non-empty");
            freed += roamdisk_core::logstore::entry_bytes(&e);
        }
        self.bytes -= freed;
        freed
    }
}

impl EntryCache {
    pub(super) fn new(budget: u64) -> EntryCache {
        EntryCache {
            groups: HashMap::new(),
            bytes: 0,
            budget,
        }
    }

    /// Entries `[low, high)` if all are cached, at most `max_bytes` of them (at least one).
    pub(super) fn get(
        &self,
        g: GroupId,
        low: u64,
        high: u64,
        max_bytes: u64,
    ) -> Option<Vec<Entry>> {
        let q = &self.groups.get(&g)?.entries;
        let first = q.front()?.index;
        let last = q.back()?.index;
        if low < first || high > last + 1 || low >= high {
            return None;
        }
        let mut out = Vec::new();
        let mut bytes = 0u64;
        for e in q.range((low - first) as usize..(high - first) as usize) {
            bytes += roamdisk_core::logstore::entry_bytes(e);
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(e.clone());
        }
        Some(out)
    }

    /// Applies a batch that was written, taking its appended entries.
    pub(super) fn apply(&mut self, batch: LogBatch) {
        for op in batch.ops {
            match op {
                LogOp::Append { group, entries } => {
                    let Some(first) = entries.first().map(|e| e.index) else {
                        continue;
                    };
                    let t = self.groups.entry(group).or_default();
                    // Replaced entries go; a cache that does not reach the new entries
                    // (evicted down to nothing meanwhile) restarts with them.
                    self.bytes -= t.pop_back_while(|e| e.index >= first);
                    if t.entries.back().is_some_and(|e| e.index + 1 != first) {
                        self.bytes -= t.pop_back_while(|_| true);
                    }
                    for e in entries {
                        self.bytes += t.push(e);
                    }
                }
                LogOp::Compact { group, index } => {
                    if let Some(t) = self.groups.get_mut(&group) {
                        self.bytes -= t.pop_front_while(|e| e.index <= index);
                    }
                }
                LogOp::Snapshot { group, .. } | LogOp::Remove { group } => {
                    if let Some(t) = self.groups.remove(&group) {
                        self.bytes -= t.bytes;
                    }
                }
                _ => {}
            }
        }
        while self.bytes > self.budget {
            let Some(t) = self.groups.values_mut().max_by_key(|t| t.bytes) else {
                break;
            };
            if t.entries.is_empty() {
                break;
            }
            // Evict in chunks so that one busy group does not cost a scan per entry.
            let mut left = (t.entries.len() / 8).max(1);
            self.bytes -= t.pop_front_while(|_| {
                let more = left > 0;
                left = left.saturating_sub(1);
                more
            });
        }
        self.groups.retain(|_, t| !t.entries.is_empty());
    }
}
