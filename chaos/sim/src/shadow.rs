//! An independent model of what each node's disk holds, kept by the simulator beside
//! the node's `MemLogStore`: for every group, which term each log index has, both as
//! written and as synced.
//!
//! It is the storage contract, not the storage: the checker asks it "is committed entry
//! `i` still durable on a majority of the configuration that committed it?" without
//! trusting the store under test, and a reopened store must hold what it says survived
//! (so a store or driver that loses synced data is caught at the restart). It tracks only terms (by
//! runs of equal terms, so it stays small) and the truncation point.

use std::collections::BTreeMap;

use roamdisk_core::ids::GroupId;
use roamdisk_core::logstore::{LogBatch, LogOp};

/// Terms of one group's log: `(truncated_index, last_index]` by runs, plus the
/// truncation point (everything at or below it is covered by the recorded state).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShadowLog {
    pub truncated_index: u64,
    pub truncated_term: u64,
    pub last_index: u64,
    /// Commit index of the hard state.
    pub commit: u64,
    /// `(first index, term)` of each run of equal terms, in index order.
    runs: Vec<(u64, u64)>,
}

impl ShadowLog {
    /// Term at `index`; `None` when below the truncation point or past the end.
    pub fn term(&self, index: u64) -> Option<u64> {
        if index == self.truncated_index {
            return Some(self.truncated_term);
        }
        if index < self.truncated_index || index > self.last_index {
            return None;
        }
        let pos = self.runs.partition_point(|(first, _)| *first <= index);
        assert!(pos > 0, "index inside the log has a run");
        self.runs.get(pos.wrapping_sub(1)).map(|(_, term)| *term)
    }

    fn append(&mut self, first: u64, terms: impl Iterator<Item = u64>) {
        // Raft's conflicting-suffix rule: everything at or after `first` is replaced.
        self.runs.retain(|(start, _)| *start < first);
        self.last_index = first - 1;
        for term in terms {
            self.last_index += 1;
            if self.runs.last().map(|(_, t)| *t) != Some(term) {
                self.runs.push((self.last_index, term));
            }
        }
    }

    fn compact(&mut self, index: u64) {
        if index <= self.truncated_index {
            return;
        }
        let term = self.term(index).unwrap_or(0);
        let pos = self.runs.partition_point(|(first, _)| *first <= index + 1);
        // The run that holds `index + 1` (if any) now starts there.
        if pos > 0 {
            let (_, t) = self.runs[pos - 1];
            self.runs.drain(..pos);
            if index < self.last_index {
                self.runs.insert(0, (index + 1, t));
            }
        }
        self.truncated_index = index;
        self.truncated_term = term;
    }

    fn snapshot(&mut self, index: u64, term: u64) {
        self.commit = self.commit.max(index);
        self.runs.clear();
        self.truncated_index = index;
        self.truncated_term = term;
        self.last_index = index;
    }
}

/// What one node's disk holds for every group: as written (survives a process crash)
/// and as synced (survives a power loss).
#[derive(Clone, Debug, Default)]
pub struct ShadowDisk {
    written: BTreeMap<GroupId, ShadowLog>,
    synced: BTreeMap<GroupId, ShadowLog>,
    /// Batches written and not yet synced, oldest first, and how many were synced.
    unsynced: std::collections::VecDeque<LogBatch>,
    synced_batches: u64,
    /// The next sync fails: the batches it covers never reach the synced image.
    fail_next: bool,
}

impl ShadowDisk {
    /// Mirrors `LogStore::write`.
    pub fn write(&mut self, batch: &LogBatch) {
        apply(&mut self.written, batch, false);
        self.unsynced.push_back(batch.clone());
    }

    /// Mirrors `LogStore::sync`.
    pub fn sync(&mut self) {
        let n = self.synced_batches + self.unsynced.len() as u64;
        self.sync_through(n);
    }

    /// Mirrors `MemLogStore::sync_through`: the first `n` batches ever written are
    /// synced, not the ones after them.
    pub fn sync_through(&mut self, n: u64) {
        let failed = std::mem::take(&mut self.fail_next);
        while self.synced_batches < n {
            let Some(batch) = self.unsynced.pop_front() else {
                return;
            };
            if !failed {
                apply(&mut self.synced, &batch, true);
            }
            self.synced_batches += 1;
        }
    }

    /// Mirrors `MemLogStore::fail_next_sync`.
    pub fn fail_next_sync(&mut self) {
        self.fail_next = true;
    }

    /// Mirrors `MemLogStore::crash`: what was not synced is gone.
    pub fn power_loss(&mut self) {
        self.written.clone_from(&self.synced);
        self.unsynced.clear();
    }

    pub fn written(&self, group: GroupId) -> Option<&ShadowLog> {
        self.written.get(&group)
    }

    pub fn synced(&self, group: GroupId) -> Option<&ShadowLog> {
        self.synced.get(&group)
    }
}

/// Applies a batch's log operations to one image of the disk; on the synced image
/// (`synced`), an append past a hole that a failed sync left is lost.
fn apply(image: &mut BTreeMap<GroupId, ShadowLog>, batch: &LogBatch, synced: bool) {
    {
        for op in &batch.ops {
            match op {
                LogOp::Create { group, state } => {
                    image.entry(*group).or_insert_with(|| ShadowLog {
                        truncated_index: state.truncated_index,
                        truncated_term: state.truncated_term,
                        last_index: state.truncated_index,
                        commit: state.hard_state.commit,
                        runs: Vec::new(),
                    });
                }
                LogOp::Append { group, entries } => {
                    if let (Some(log), Some(first)) = (image.get_mut(group), entries.first()) {
                        if synced && first.index > log.last_index + 1 {
                            continue;
                        }
                        log.append(first.index, entries.iter().map(|e| e.term));
                    }
                }
                LogOp::Snapshot {
                    group, index, term, ..
                } => {
                    if let Some(log) = image.get_mut(group) {
                        log.snapshot(*index, *term);
                    }
                }
                LogOp::Compact { group, index } => {
                    if let Some(log) = image.get_mut(group) {
                        log.compact(*index);
                    }
                }
                LogOp::Remove { group } => {
                    image.remove(group);
                }
                LogOp::HardState { group, hard_state } => {
                    if let Some(log) = image.get_mut(group) {
                        log.commit = hard_state.commit;
                    }
                }
                LogOp::ConfState { .. }
                | LogOp::Applied { .. }
                | LogOp::Put { .. }
                | LogOp::Delete { .. } => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::Entry;
    use roamdisk_core::logstore::GroupState;

    fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
        range
            .map(|i| {
                let mut e = Entry::default();
                e.index = i;
                e.term = term;
                e
            })
            .collect()
    }

    #[test]
    fn mirrors_append_conflicts_compaction_and_power_loss() {
        let g = GroupId(1);
        let mut d = ShadowDisk::default();
        let mut b = LogBatch::default();
        b.push(LogOp::Create {
            group: g,
            state: GroupState {
                truncated_index: 5,
                truncated_term: 5,
                ..Default::default()
            },
        });
        b.push(LogOp::Append {
            group: g,
            entries: entries(6..=10, 6),
        });
        d.write(&b);
        d.sync();
        let mut b = LogBatch::default();
        b.push(LogOp::Append {
            group: g,
            entries: entries(9..=12, 7),
        });
        d.write(&b);
        let log = d.written(g).unwrap();
        assert_eq!(
            (
                log.term(5),
                log.term(8),
                log.term(9),
                log.term(12),
                log.term(13)
            ),
            (Some(5), Some(6), Some(7), Some(7), None)
        );
        let mut b = LogBatch::default();
        b.push(LogOp::Compact { group: g, index: 9 });
        d.write(&b);
        let log = d.written(g).unwrap();
        assert_eq!(
            (log.term(8), log.term(9), log.term(10)),
            (None, Some(7), Some(7))
        );
        d.power_loss();
        let log = d.written(g).unwrap();
        assert_eq!((log.last_index, log.term(10)), (10, Some(6)));
    }
}
