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

#[test]
fn rocks_store_with_every_entry_in_segments_passes_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    roamdisk_core::logstore::conformance(|| RocksLogStore::open_inline(&path, None, 0).unwrap());
}

fn create(s: &RocksLogStore, g: u64) {
    let mut b = LogBatch::default();
    b.push(LogOp::Create {
        group: GroupId(g),
        state: GroupState::default(),
    });
    s.write(b).unwrap();
}

fn segment_files(path: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(payload_dir(path))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn large_entries_go_to_segments_and_read_back_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let g = GroupId(1);
    let big: Vec<Entry> = (1..=8).map(|i| entry(i, 1, 100 << 10)).collect();
    let small = entry(9, 1, 100);
    {
        let s = RocksLogStore::open(&path).unwrap();
        create(&s, 1);
        s.write(append(1, big.clone())).unwrap();
        s.write(append(1, vec![small.clone()])).unwrap();
        s.sync().unwrap();
        let p = s.payload.lock().unwrap();
        assert!(
            p.bytes_appended >= 8 * (100 << 10),
            "the large entries went to a segment"
        );
        assert!(p.bytes_appended < 9 * (100 << 10), "the small one did not");
    }
    let s = RocksLogStore::open(&path).unwrap();
    let mut all = big;
    all.push(small);
    assert_eq!(s.entries(g, 1, 10, u64::MAX).unwrap(), all);
    assert_eq!(s.last_index(g).unwrap(), 9);
    assert_eq!(s.term(g, 5).unwrap(), Some(1));
}

#[test]
fn a_torn_segment_ends_the_log_before_the_first_entry_it_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let g = GroupId(1);
    {
        let s = RocksLogStore::open_inline(&path, None, 0).unwrap();
        create(&s, 1);
        s.write(append(1, (1..=10).map(|i| entry(i, 1, 1000)).collect()))
            .unwrap();
        s.sync().unwrap();
    }
    // A power loss that kept the pointers (the WAL) and lost the end of the bytes.
    let seg = segment_files(&path)
        .into_iter()
        .find(|p| std::fs::metadata(p).unwrap().len() > 0)
        .unwrap();
    let len = std::fs::metadata(&seg).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(len * 6 / 10).unwrap();
    drop(f);
    let s = RocksLogStore::open(&path).unwrap();
    let last = s.last_index(g).unwrap();
    assert!((1..10).contains(&last), "the log was cut: ends at {last}");
    assert_eq!(
        s.entries(g, 1, last + 1, u64::MAX).unwrap().len() as u64,
        last
    );
    // The cut is durable, and the log goes on from there.
    s.write(append(1, vec![entry(last + 1, 2, 10)])).unwrap();
    s.sync().unwrap();
    drop(s);
    let s = RocksLogStore::open(&path).unwrap();
    assert_eq!(s.last_index(g).unwrap(), last + 1);
    assert_eq!(s.term(g, last + 1).unwrap(), Some(2));
}

#[test]
fn a_segment_is_unlinked_once_nothing_points_at_it_and_a_sync_made_that_durable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let g = GroupId(1);
    let s = RocksLogStore::open_inline(&path, None, 0).unwrap();
    create(&s, 1);
    // Enough to fill more than one segment.
    let per = 4 << 20;
    let n = (payload::SEGMENT_BYTES / per as u64) + 4;
    for i in 1..=n {
        s.write(append(1, vec![entry(i, 1, per)])).unwrap();
    }
    s.sync().unwrap();
    let before = segment_files(&path).len();
    assert!(before >= 2, "{before} segments");
    let mut b = LogBatch::default();
    b.push(LogOp::Applied { group: g, index: n });
    b.push(LogOp::Compact { group: g, index: n });
    s.write(b).unwrap();
    assert_eq!(
        segment_files(&path).len(),
        before,
        "nothing is unlinked before a sync covers the compaction"
    );
    s.sync().unwrap();
    let after = segment_files(&path).len();
    assert_eq!(after, 1, "only the active segment stays: {after}");
    drop(s);
    let s = RocksLogStore::open(&path).unwrap();
    assert_eq!(s.last_index(g).unwrap(), n);
}
