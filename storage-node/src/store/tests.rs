//! Tests of the store's own start-up decisions: what kind of restart this is (the boot id
//! and the clean-shutdown marker) and the synced write of the files that record it.
//! `restart_kind` reads the boot id from the process environment or `/proc`; the tests
//! pass it to `restart_kind_in_boot` instead, so they may run in parallel.

use raft::eraftpb::Entry;
use roamdisk_core::logstore::{GroupState, LogBatch, MemLogStore, Record, StoreError};

use super::*;

/// Bound on every wait in the store's tests: far above what any step takes, so reaching
/// it means a hang.
pub(super) const WAIT: Duration = Duration::from_secs(10);

type SyncHook = Box<dyn Fn(&MemLogStore) -> Result<(), StoreError> + Send + Sync>;
type ScanRangeHook =
    Box<dyn Fn(&MemLogStore, &[u8], &[u8]) -> Result<Vec<Record>, StoreError> + Send + Sync>;

/// A [`MemLogStore`] whose `sync` and `scan_range` a test replaces (to hold, fail or
/// panic); everything else is the `MemLogStore`'s.
pub(super) struct HookedLog {
    pub mem: MemLogStore,
    sync: SyncHook,
    scan_range: ScanRangeHook,
}

impl HookedLog {
    pub fn new() -> HookedLog {
        HookedLog {
            mem: MemLogStore::new(),
            sync: Box::new(|mem| mem.sync()),
            scan_range: Box::new(|mem, from, to| mem.scan_range(from, to)),
        }
    }

    pub fn on_sync(
        mut self,
        f: impl Fn(&MemLogStore) -> Result<(), StoreError> + Send + Sync + 'static,
    ) -> HookedLog {
        self.sync = Box::new(f);
        self
    }

    pub fn on_scan_range(
        mut self,
        f: impl Fn(&MemLogStore, &[u8], &[u8]) -> Result<Vec<Record>, StoreError>
            + Send
            + Sync
            + 'static,
    ) -> HookedLog {
        self.scan_range = Box::new(f);
        self
    }
}

impl LogStore for HookedLog {
    fn groups(&self) -> Result<Vec<GroupId>, StoreError> {
        self.mem.groups()
    }
    fn state(&self, g: GroupId) -> Result<Option<GroupState>, StoreError> {
        self.mem.state(g)
    }
    fn entries(&self, g: GroupId, l: u64, h: u64, m: u64) -> Result<Vec<Entry>, StoreError> {
        self.mem.entries(g, l, h, m)
    }
    fn last_index(&self, g: GroupId) -> Result<u64, StoreError> {
        self.mem.last_index(g)
    }
    fn term(&self, g: GroupId, i: u64) -> Result<Option<u64>, StoreError> {
        self.mem.term(g, i)
    }
    fn get(&self, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.mem.get(k)
    }
    fn scan(&self, p: &[u8]) -> Result<Vec<Record>, StoreError> {
        self.mem.scan(p)
    }
    fn scan_range(&self, from: &[u8], to: &[u8]) -> Result<Vec<Record>, StoreError> {
        (self.scan_range)(&self.mem, from, to)
    }
    fn write(&self, b: LogBatch) -> Result<(), StoreError> {
        self.mem.write(b)
    }
    fn sync(&self) -> Result<(), StoreError> {
        (self.sync)(&self.mem)
    }
}

/// Joins `thread`, failing the test if it has not ended within `wait` (a hang); returns
/// what it returned, or its panic.
pub(super) fn join_within<T: Send + 'static>(
    thread: std::thread::JoinHandle<T>,
    wait: Duration,
) -> std::thread::Result<T> {
    let (tx, rx) = flume::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(thread.join());
    });
    rx.recv_timeout(wait)
        .expect("the thread ended within the bound")
}

fn boot_recorded(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join(BOOT_ID_FILE)).expect("boot id recorded")
}

fn shut_down_cleanly(dir: &std::path::Path) {
    write_synced(&dir.join(CLEAN_SHUTDOWN_FILE), b"").unwrap();
}

#[test]
fn a_new_store_is_not_a_reboot_and_records_its_boot() {
    let dir = tempfile::tempdir().unwrap();
    assert!(!restart_kind_in_boot(dir.path(), "boot-a").unwrap());
    assert_eq!(boot_recorded(dir.path()), "boot-a");
}

#[test]
fn a_process_crash_on_the_same_boot_is_not_a_reboot() {
    let dir = tempfile::tempdir().unwrap();
    restart_kind_in_boot(dir.path(), "boot-a").unwrap();
    // No clean-shutdown marker: the process died, the page cache kept its writes.
    assert!(!restart_kind_in_boot(dir.path(), "boot-a").unwrap());
    assert_eq!(boot_recorded(dir.path()), "boot-a");
}

#[test]
fn a_reboot_without_a_clean_shutdown_is_one_and_the_new_boot_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    restart_kind_in_boot(dir.path(), "boot-a").unwrap();
    assert!(restart_kind_in_boot(dir.path(), "boot-b").unwrap());
    assert_eq!(boot_recorded(dir.path()), "boot-b");
    // Recorded: a process crash later in this boot is not a reboot again.
    assert!(!restart_kind_in_boot(dir.path(), "boot-b").unwrap());
}

#[test]
fn a_reboot_after_a_clean_shutdown_is_not_one_and_consumes_the_marker() {
    let dir = tempfile::tempdir().unwrap();
    restart_kind_in_boot(dir.path(), "boot-a").unwrap();
    shut_down_cleanly(dir.path());
    assert!(!restart_kind_in_boot(dir.path(), "boot-b").unwrap());
    assert!(
        !dir.path().join(CLEAN_SHUTDOWN_FILE).exists(),
        "the marker is removed as the store starts"
    );
    assert_eq!(boot_recorded(dir.path()), "boot-b");
    // The marker was for one start only: a crash, then a reboot, is one.
    assert!(restart_kind_in_boot(dir.path(), "boot-c").unwrap());
}

#[test]
fn a_clean_restart_on_the_same_boot_consumes_the_marker() {
    let dir = tempfile::tempdir().unwrap();
    restart_kind_in_boot(dir.path(), "boot-a").unwrap();
    shut_down_cleanly(dir.path());
    assert!(!restart_kind_in_boot(dir.path(), "boot-a").unwrap());
    assert!(!dir.path().join(CLEAN_SHUTDOWN_FILE).exists());
}

#[test]
fn a_recorded_boot_id_is_compared_without_surrounding_whitespace() {
    let dir = tempfile::tempdir().unwrap();
    // As `/proc/sys/kernel/random/boot_id` reads, with its newline.
    std::fs::write(dir.path().join(BOOT_ID_FILE), "boot-a\n").unwrap();
    assert!(!restart_kind_in_boot(dir.path(), "boot-a").unwrap());
    std::fs::write(dir.path().join(BOOT_ID_FILE), "boot-a\n").unwrap();
    assert!(restart_kind_in_boot(dir.path(), "boot-b").unwrap());
}

#[test]
fn restart_kind_creates_the_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("a").join("b");
    // Whatever the boot id source, a new store is never a reboot.
    assert!(!restart_kind(&data).unwrap());
    assert!(data.join(BOOT_ID_FILE).is_file());
}

#[test]
fn write_synced_replaces_the_file_whole_and_leaves_no_temporary() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(BOOT_ID_FILE);
    write_synced(&path, b"a much longer first content").unwrap();
    write_synced(&path, b"short").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"short");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, [std::ffi::OsString::from(BOOT_ID_FILE)]);
}
