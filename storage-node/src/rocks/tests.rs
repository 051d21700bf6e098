//! Tests of the entry cache and of the RocksDB store.

use super::*;

fn entry(index: u64, term: u64, len: usize) -> Entry {
    let mut e = Entry::default();
    e.index = index;
    e.term = term;
    e.data = vec![index as u8; len].into();
    e
}

fn append(g: u64, entries: Vec<Entry>) -> LogBatch {
    LogBatch {
        ops: vec![LogOp::Append {
            group: GroupId(g),
            entries,
        }],
    }
}

#[test]
fn entry_cache_follows_appends_truncation_and_compaction() {
    let mut c = EntryCache::new(1 << 20);
    let g = GroupId(1);
    c.apply(append(1, (1..=10).map(|i| entry(i, 1, 100)).collect()));
    assert_eq!(c.get(g, 3, 6, u64::MAX).unwrap().len(), 3);
    // max_bytes stops early but returns at least one entry.
    assert_eq!(c.get(g, 3, 6, 1).unwrap().len(), 1);
    // A new leader's entries replace 8.. and the cache ends at the new last index.
    c.apply(append(1, vec![entry(8, 2, 100)]));
    assert!(c.get(g, 8, 10, u64::MAX).is_none(), "9 is gone");
    let got = c.get(g, 7, 9, u64::MAX).unwrap();
    assert_eq!((got[1].index, got[1].term), (8, 2));
    c.apply(LogBatch {
        ops: vec![LogOp::Compact { group: g, index: 5 }],
    });
    assert!(c.get(g, 5, 6, u64::MAX).is_none());
    assert_eq!(c.get(g, 6, 9, u64::MAX).unwrap().len(), 3);
    assert_eq!(
        c.bytes,
        3 * roamdisk_core::logstore::entry_bytes(&entry(1, 1, 100))
    );
    c.apply(LogBatch {
        ops: vec![LogOp::Remove { group: g }],
    });
    assert_eq!(c.bytes, 0);
    assert!(c.get(g, 6, 7, u64::MAX).is_none());
}

#[test]
fn entry_cache_stays_within_its_budget() {
    let per = roamdisk_core::logstore::entry_bytes(&entry(1, 1, 1000));
    let mut c = EntryCache::new(per * 50);
    for i in 1..=200 {
        c.apply(append(1 + i % 3, vec![entry(i / 3 + 1, 1, 1000)]));
        assert!(c.bytes <= per * 50, "{} bytes after {i}", c.bytes);
        assert_eq!(c.groups.values().map(|t| t.bytes).sum::<u64>(), c.bytes);
    }
    // The newest entries of every group are still there.
    for g in 1..=3 {
        let q = &c.groups[&GroupId(g)].entries;
        assert!(q.len() >= 10, "group {g} kept {}", q.len());
    }
}

#[test]
fn entry_cache_evicts_from_the_group_with_the_most_bytes() {
    let small = roamdisk_core::logstore::entry_bytes(&entry(1, 1, 100));
    let big = roamdisk_core::logstore::entry_bytes(&entry(1, 1, 10_000));
    let mut c = EntryCache::new(40 * small + 4 * big);
    c.apply(append(1, (1..=40).map(|i| entry(i, 1, 100)).collect()));
    c.apply(append(2, (1..=5).map(|i| entry(i, 1, 10_000)).collect()));
    // Over budget by one big entry: the group of big entries pays, not the one with
    // more (but smaller) entries.
    assert_eq!(c.groups[&GroupId(1)].entries.len(), 40);
    assert_eq!(c.groups[&GroupId(2)].entries.front().unwrap().index, 2);
    assert_eq!(c.bytes, 40 * small + 4 * big);
}

#[test]
fn entries_read_from_the_cache_equal_entries_read_from_rocksdb() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let g = GroupId(3);
    let written: Vec<Entry> = (1..=20).map(|i| entry(i, 1, 3000)).collect();
    let from_cache = {
        let s = RocksLogStore::open(&path).unwrap();
        let mut b = LogBatch::default();
        b.push(LogOp::Create {
            group: g,
            state: GroupState::default(),
        });
        s.write(b).unwrap();
        s.write(append(3, written.clone())).unwrap();
        s.sync().unwrap();
        assert!(s.entries.lock().unwrap().get(g, 1, 21, u64::MAX).is_some());
        s.entries(g, 2, 21, 10_000).unwrap()
    };
    // Reopened: the cache is empty, so the same call reads RocksDB.
    let s = RocksLogStore::open(&path).unwrap();
    assert!(s.entries.lock().unwrap().get(g, 2, 21, u64::MAX).is_none());
    let from_db = s.entries(g, 2, 21, 10_000).unwrap();
    assert_eq!(from_cache, from_db);
    assert_eq!(from_cache.len(), 3, "max_bytes applies the same way");
    assert_eq!(s.entries(g, 1, 21, u64::MAX).unwrap(), written);
}

#[test]
fn rocks_store_passes_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    roamdisk_core::logstore::conformance(|| RocksLogStore::open(&path).unwrap());
}
