//! Emulated page-cache faults of the log store, for real-process tests of recovery.
//!
//! This kernel gives a test no way to fail an fsync or to drop a page cache on demand
//! (no dm-flakey, no fault-injecting filesystem), so the store emulates Linux's
//! behaviour at the level of log entries, which is what recovery must get right:
//! - a **failed fsync** marks the dirty pages clean: the entries written since the last
//!   sync that succeeded stay readable, are never written by a later sync, and a power
//!   loss drops them, unless they are written again (new dirty pages) and synced;
//! - a **power loss** drops them: at the next open, each group's log is cut at its first
//!   such entry (later entries behind a hole would be unreadable anyway). Only entries
//!   are modelled: every other record (hard state, synced marks, quarantine records)
//!   survives as written, which a real disk need not do; the core's tests over
//!   `MemLogStore` and the simulation cover those.
//!
//! Off unless the node runs with `ROAMDISK_TEST_FAULTS=1`. Then the data directory
//! holds `fail-next-log-sync` (written by a test: the next sync that covers an unsynced
//! entry of the group it names fails with EIO) and `log-faults.json` ([`FaultState`],
//! written at every sync, read by the test); `ROAMDISK_TEST_POWER_LOSS=1` at start
//! applies a power loss before the store opens.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use roamdisk_core::ids::GroupId;
use roamdisk_core::logstore::{LogBatch, LogOp, StoreError};
use serde::{Deserialize, Serialize};

/// Turns the emulation on (and lets a test node take `ROAMDISK_CORE_BUG`).
pub const TEST_FAULTS_ENV: &str = "ROAMDISK_TEST_FAULTS";
/// Apply a power loss at start: drop the entries the emulation says were not durable.
pub const TEST_POWER_LOSS_ENV: &str = "ROAMDISK_TEST_POWER_LOSS";
/// In the data directory: holds a group id; the next sync covering an unsynced entry of
/// that group fails.
pub const FAIL_NEXT_SYNC_FILE: &str = "fail-next-log-sync";
/// In the data directory: the [`FaultState`] as JSON, rewritten at every sync.
pub const FAULT_STATE_FILE: &str = "log-faults.json";

/// What the emulated page cache holds that the disk does not, per group (by id).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FaultState {
    /// Entries written since the last sync that succeeded.
    pub unsynced: BTreeMap<u64, BTreeSet<u64>>,
    /// Entries a failed sync left in the page cache only: readable, not on disk.
    pub lost: BTreeMap<u64, BTreeSet<u64>>,
    /// Syncs failed on purpose.
    pub sync_failures: u64,
    /// Entries the failed syncs left in the page cache only, when they failed.
    pub entries_lost_by_failures: u64,
    /// Power losses applied at start, and the entries they dropped, per group.
    pub power_losses: u64,
    pub dropped: BTreeMap<u64, u64>,
}

impl FaultState {
    /// Records a batch just written: its entries are dirty pages, and replace any lost
    /// or unsynced ones at or after the batch's first index.
    fn written(&mut self, batch: &LogBatch) {
        for op in &batch.ops {
            match op {
                LogOp::Append { group, entries } => {
                    let Some(first) = entries.first() else {
                        continue;
                    };
                    for set in [&mut self.unsynced, &mut self.lost] {
                        if let Some(s) = set.get_mut(&group.0) {
                            s.retain(|i| *i < first.index);
                        }
                    }
                    self.unsynced
                        .entry(group.0)
                        .or_default()
                        .extend(entries.iter().map(|e| e.index));
                }
                LogOp::Snapshot { group, .. } | LogOp::Remove { group } => {
                    self.unsynced.remove(&group.0);
                    self.lost.remove(&group.0);
                }
                LogOp::Compact { group, index } => {
                    for set in [&mut self.unsynced, &mut self.lost] {
                        if let Some(s) = set.get_mut(&group.0) {
                            s.retain(|i| i > index);
                        }
                    }
                }
                _ => {}
            }
        }
        self.unsynced.retain(|_, s| !s.is_empty());
        self.lost.retain(|_, s| !s.is_empty());
    }

    /// A sync that failed: Linux marks the dirty pages clean.
    fn sync_failed(&mut self) {
        for (g, s) in std::mem::take(&mut self.unsynced) {
            self.entries_lost_by_failures += s.len() as u64;
            self.lost.entry(g).or_default().extend(s);
        }
        self.sync_failures += 1;
    }

    /// Where a power loss cuts each group's log: its first entry not on disk.
    pub fn cut_points(&self) -> BTreeMap<u64, u64> {
        let mut cut = BTreeMap::new();
        for set in [&self.unsynced, &self.lost] {
            for (g, s) in set {
                if let Some(first) = s.first() {
                    let c = cut.entry(*g).or_insert(*first);
                    *c = (*c).min(*first);
                }
            }
        }
        cut
    }
}

/// The emulation, owned by a [`super::RocksLogStore`] opened with faults on.
pub(super) struct Faults {
    dir: PathBuf,
    state: FaultState,
}

impl Faults {
    /// Loads the state left by the previous run in `dir` (the node's data directory).
    pub(super) fn load(dir: &Path) -> Result<Faults, StoreError> {
        let state = match std::fs::read(dir.join(FAULT_STATE_FILE)) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| StoreError::Backend(format!("read {FAULT_STATE_FILE}: {e}")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => FaultState::default(),
            Err(e) => return Err(StoreError::Backend(format!("read {FAULT_STATE_FILE}: {e}"))),
        };
        Ok(Faults {
            dir: dir.to_owned(),
            state,
        })
    }

    pub(super) fn state(&self) -> &FaultState {
        &self.state
    }

    pub(super) fn written(&mut self, batch: &LogBatch) {
        self.state.written(batch);
    }

    /// Called before a real sync: fails it if the test asked for it and the sync covers
    /// an unsynced entry of the named group.
    pub(super) fn before_sync(&mut self) -> Result<(), StoreError> {
        let trigger = self.dir.join(FAIL_NEXT_SYNC_FILE);
        let Ok(text) = std::fs::read_to_string(&trigger) else {
            return Ok(());
        };
        let group: u64 = text.trim().parse().map_err(|e| {
            StoreError::Backend(format!("{FAIL_NEXT_SYNC_FILE}: not a group id: {e}"))
        })?;
        if !self.state.unsynced.contains_key(&group) {
            return Ok(());
        }
        let _ = std::fs::remove_file(&trigger);
        self.state.sync_failed();
        self.save()?;
        Err(StoreError::Backend(
            "fsync of the log failed: Input/output error (os error 5; injected by the test)".into(),
        ))
    }

    /// Called after a sync that succeeded: what was written before it is on disk.
    pub(super) fn synced(
        &mut self,
        covered: &BTreeMap<u64, BTreeSet<u64>>,
    ) -> Result<(), StoreError> {
        for (g, s) in covered {
            if let Some(u) = self.state.unsynced.get_mut(g) {
                u.retain(|i| !s.contains(i));
            }
        }
        self.state.unsynced.retain(|_, s| !s.is_empty());
        self.save()
    }

    /// Records that a power loss cut the logs at `cut` (group → first index dropped).
    pub(super) fn power_lost(
        &mut self,
        cut: &BTreeMap<u64, u64>,
        last: &BTreeMap<u64, u64>,
    ) -> Result<(), StoreError> {
        self.state.power_losses += 1;
        for (g, from) in cut {
            let n = last.get(g).map_or(0, |l| (l + 1).saturating_sub(*from));
            *self.state.dropped.entry(*g).or_default() += n;
        }
        self.state.unsynced.clear();
        self.state.lost.clear();
        self.save()
    }

    fn save(&self) -> Result<(), StoreError> {
        let path = self.dir.join(FAULT_STATE_FILE);
        let tmp = path.with_extension("tmp");
        let io = |e: std::io::Error| StoreError::Backend(format!("write {FAULT_STATE_FILE}: {e}"));
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(&self.state).expect("serialize"),
        )
        .map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)
    }
}

/// Group ids of a cut, typed.
pub(super) fn cut_groups(cut: &BTreeMap<u64, u64>) -> impl Iterator<Item = (GroupId, u64)> + '_ {
    cut.iter().map(|(g, i)| (GroupId(*g), *i))
}

#[cfg(test)]
mod tests {
    use raft::eraftpb::Entry;

    use super::*;

    fn append(group: u64, from: u64, to: u64) -> LogBatch {
        let entries = (from..=to)
            .map(|index| Entry {
                index,
                term: 1,
                ..Default::default()
            })
            .collect();
        LogBatch {
            ops: vec![LogOp::Append {
                group: GroupId(group),
                entries,
            }],
        }
    }

    #[test]
    fn a_failed_sync_leaves_entries_lost_until_they_are_written_again() {
        let mut s = FaultState::default();
        s.written(&append(7, 1, 5));
        s.sync_failed();
        assert_eq!(s.lost[&7], (1..=5).collect());
        assert!(s.unsynced.is_empty());
        assert_eq!(s.cut_points()[&7], 1);
        // Written again from 3: those are dirty pages now, 1..=2 stay lost.
        s.written(&append(7, 3, 5));
        assert_eq!(s.lost[&7], (1..=2).collect());
        assert_eq!(s.unsynced[&7], (3..=5).collect());
        s.written(&append(7, 1, 2));
        assert!(s.lost.is_empty());
        assert_eq!(s.entries_lost_by_failures, 5);
    }

    #[test]
    fn a_sync_covers_only_what_was_written_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = Faults::load(dir.path()).unwrap();
        f.written(&append(1, 1, 3));
        let covered = f.state().unsynced.clone();
        f.written(&append(1, 4, 4));
        f.synced(&covered).unwrap();
        assert_eq!(f.state().unsynced[&1], BTreeSet::from([4]));
        // The state survives the process.
        assert_eq!(Faults::load(dir.path()).unwrap().state(), f.state());
    }

    #[test]
    fn the_trigger_fails_only_a_sync_covering_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = Faults::load(dir.path()).unwrap();
        std::fs::write(dir.path().join(FAIL_NEXT_SYNC_FILE), "9").unwrap();
        f.written(&append(1, 1, 1));
        assert!(f.before_sync().is_ok(), "group 9 has nothing unsynced");
        f.written(&append(9, 1, 2));
        assert!(f.before_sync().is_err());
        assert_eq!(f.state().lost[&9], BTreeSet::from([1, 2]));
        assert_eq!(f.state().lost[&1], BTreeSet::from([1]));
        assert!(f.before_sync().is_ok(), "the trigger is used once");
    }
}
