//! A node's disk: the core's `MemLogStore` with its power-loss model, and beside it the
//! independent model of what that disk holds (`shadow`), fed by the same writes. The
//! core writes and syncs through [`LogStore`]; the simulation completes the core's
//! pipelined syncs with [`SimStore::sync_through`], so a sync covers exactly the batches
//! written before it started.

use std::sync::Mutex;

use raft::eraftpb::Entry;
use roamdisk_core::ids::GroupId;
use roamdisk_core::logstore::{GroupState, LogBatch, LogStore, MemLogStore, Record, StoreError};

use crate::shadow::{ShadowDisk, ShadowLog};

#[derive(Default)]
pub struct SimStore {
    mem: MemLogStore,
    shadow: Mutex<ShadowDisk>,
}

impl SimStore {
    /// Batches written so far: a sync started now covers this many.
    pub fn written_batches(&self) -> u64 {
        self.mem.written_batches()
    }

    /// Completes a sync that started when `n` batches had been written.
    pub fn sync_through(&self, n: u64) -> Result<(), StoreError> {
        self.shadow.lock().expect("shadow").sync_through(n);
        self.mem.sync_through(n)
    }

    /// The next sync fails: what it covers stays readable and never becomes durable.
    pub fn fail_next_sync(&self) {
        self.mem.fail_next_sync();
        self.shadow.lock().expect("shadow").fail_next_sync();
    }

    /// A power loss: what was written but not synced is gone.
    pub fn power_loss(&self) {
        self.mem.crash();
        self.shadow.lock().expect("shadow").power_loss();
    }

    /// The disk model's log of `group` as written (survives a process crash).
    pub fn model_written(&self, group: GroupId) -> Option<ShadowLog> {
        self.shadow.lock().expect("shadow").written(group).cloned()
    }

    /// The disk model's log of `group` as synced (survives a power loss).
    pub fn model_synced(&self, group: GroupId) -> Option<ShadowLog> {
        self.shadow.lock().expect("shadow").synced(group).cloned()
    }
}

impl LogStore for SimStore {
    fn groups(&self) -> Result<Vec<GroupId>, StoreError> {
        self.mem.groups()
    }
    fn state(&self, group: GroupId) -> Result<Option<GroupState>, StoreError> {
        self.mem.state(group)
    }
    fn entries(
        &self,
        group: GroupId,
        low: u64,
        high: u64,
        max_bytes: u64,
    ) -> Result<Vec<Entry>, StoreError> {
        self.mem.entries(group, low, high, max_bytes)
    }
    fn last_index(&self, group: GroupId) -> Result<u64, StoreError> {
        self.mem.last_index(group)
    }
    fn term(&self, group: GroupId, index: u64) -> Result<Option<u64>, StoreError> {
        self.mem.term(group, index)
    }
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.mem.get(key)
    }
    fn scan(&self, prefix: &[u8]) -> Result<Vec<Record>, StoreError> {
        self.mem.scan(prefix)
    }
    fn scan_range(&self, from: &[u8], to: &[u8]) -> Result<Vec<Record>, StoreError> {
        self.mem.scan_range(from, to)
    }
    fn write(&self, batch: LogBatch) -> Result<(), StoreError> {
        self.mem.write(batch.clone())?;
        self.shadow.lock().expect("shadow").write(&batch);
        Ok(())
    }
    fn sync(&self) -> Result<(), StoreError> {
        self.shadow.lock().expect("shadow").sync();
        self.mem.sync()
    }
}
