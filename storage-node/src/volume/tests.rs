//! Tests of replicas: apply, checkpoint and replay, block reads, and the scrub.

use super::*;
use roamdisk_core::logstore::{GroupState, LogBatch, LogStore, MemLogStore};
use std::collections::BTreeMap;

fn write(offset: u64, data: &[u8]) -> Vec<u8> {
    VolumeCommand::Write { offset, data }.encode()
}

#[test]
fn for_each_block_reads_data_runs_and_reports_holes_without_reading_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.raw");
    let blocks = 1024u64; // 4 MiB
    let file = RawFile::open_sparse(&path, blocks * BLOCK_BYTES).unwrap();
    // Data at 3, 100..=170 (a run longer than one 64-block read) and 1023 (the last
    // block); block 500 is written with zeros, so it is data that reads as zeros.
    let mut expect: BTreeMap<u64, u8> = BTreeMap::new();
    for b in [3u64, 1023].into_iter().chain(100..=170) {
        let fill = (b % 251) as u8 + 1;
        file.write_at(&vec![fill; BLOCK_BYTES as usize], b * BLOCK_BYTES, false)
            .unwrap();
        expect.insert(b, fill);
    }
    file.write_at(&vec![0u8; BLOCK_BYTES as usize], 500 * BLOCK_BYTES, false)
        .unwrap();
    expect.insert(500, 0);
    // Whole file, and a window that starts and ends inside data runs.
    for (first, count) in [(0u64, blocks), (120, 400), (1023, 1)] {
        let mut seen = Vec::new();
        for_each_block(&file, first, count, |b, data| {
            let want = expect.get(&b).copied();
            match (data, want) {
                (Some(d), Some(fill)) => assert!(d.iter().all(|x| *x == fill), "block {b}"),
                (None, None) => {}
                // ext4 may report a small hole's neighbours as data: allowed if zeros.
                (Some(d), None) => assert!(roamdisk_nbd::backend::is_zero(d), "block {b}"),
                (None, Some(fill)) => {
                    assert_eq!(fill, 0, "block {b} holds data but was reported as a hole")
                }
            }
            seen.push(b);
        })
        .unwrap();
        assert_eq!(
            seen,
            (first..first + count).collect::<Vec<_>>(),
            "every block once, in order"
        );
    }
    // Most of the file is a hole and is not read: far fewer data blocks than blocks.
    let mut read = 0;
    for_each_block(&file, 0, blocks, |_, d| read += usize::from(d.is_some())).unwrap();
    assert!(read < 200, "{read} blocks read of {blocks}");
}

#[test]
fn apply_checkpoint_and_replay_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemLogStore::new();
    let v = VolumeId(3);
    let mut r = VolumeReplica::open(dir.path(), v, 1 << 20).unwrap();
    let zero = VolumeCommand::Zero {
        offset: 4096,
        len: 4096,
        punch: true,
    }
    .encode();
    let log = [
        write(100, b"hello"),
        write(4096, &[7u8; 4096]),
        zero,
        write(200, b"world"),
    ];
    for (i, cmd) in log[..3].iter().enumerate() {
        r.apply(LogIndex(i as u64 + 1), cmd).unwrap();
    }
    assert!(r.is_dirty());
    let mut batch = LogBatch::default();
    r.checkpoint_work()
        .unwrap()
        .expect("written")
        .run(&mut batch.ops, &ContentIndex::default())
        .unwrap();
    assert!(!r.is_dirty());
    store.write(batch).unwrap();
    assert!(store.get(&hash_key(v, BlockIndex(0))).unwrap().is_some());
    assert!(
        store.get(&hash_key(v, BlockIndex(1))).unwrap().is_none(),
        "zeroed block has no hash"
    );
    let at_3 = image_block_hashes(r.path()).unwrap();
    // Applied more without a checkpoint, then a crash: the node replays from the
    // recorded index (3) over what the file holds, which ends equal to applying once.
    r.apply(LogIndex(4), &log[3]).unwrap();
    let once = image_block_hashes(r.path()).unwrap();
    drop(r);
    let mut r = VolumeReplica::open(dir.path(), v, 1 << 20).unwrap();
    for (i, cmd) in log.iter().enumerate() {
        r.apply(LogIndex(i as u64 + 1), cmd).unwrap();
    }
    assert_eq!(image_block_hashes(r.path()).unwrap(), once);
    assert_ne!(at_3, once);
    let mut buf = [0u8; 5];
    r.extent().read_at(&mut buf, 100).unwrap();
    assert_eq!(&buf, b"hello");
    r.extent().read_at(&mut buf, 200).unwrap();
    assert_eq!(&buf, b"world");
    assert_eq!(once.len(), 1, "only block 0 holds data");
}

#[test]
fn checkpoint_work_hashes_runs_of_blocks_off_the_replica_and_covers_only_its_index() {
    let dir = tempfile::tempdir().unwrap();
    let v = VolumeId(5);
    let mut r = VolumeReplica::open(dir.path(), v, 4 << 20).unwrap();
    // 300 adjacent blocks (more than one read), a lone block, and a zeroed one.
    let data: Vec<u8> = (0..300 * 4096)
        .map(|i| match i % 4096 {
            0 => (i / 4096) as u8, // every block differs
            1 => (i / 4096 / 256) as u8,
            _ => 0xa5,
        })
        .collect();
    r.apply(LogIndex(1), &write(0, &data)).unwrap();
    r.apply(LogIndex(2), &write(900 * 4096, &[7u8; 4096]))
        .unwrap();
    r.apply(LogIndex(3), &write(950 * 4096, &[0u8; 4096]))
        .unwrap();
    let mut batch = LogBatch::default();
    let work = r.checkpoint_work().unwrap();
    // Applied while the work is in flight: the next checkpoint's.
    r.apply(LogIndex(4), &write(901 * 4096, &[8u8; 4096]))
        .unwrap();
    let content = ContentIndex::default();
    work.unwrap().run(&mut batch.ops, &content).unwrap();
    let mut puts = BTreeMap::new();
    let mut deletes = Vec::new();
    for op in &batch.ops {
        match op {
            LogOp::Put { key, value } => {
                puts.insert(parse_hash_key(key).unwrap().1, value.clone());
            }
            LogOp::Delete { key } => deletes.push(parse_hash_key(key).unwrap().1),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(puts.len(), 301);
    assert_eq!(deletes, vec![950]);
    for b in [0u64, 255, 256, 299] {
        let block = &data[b as usize * 4096..][..4096];
        assert_eq!(
            puts[&b],
            blake3::hash(block).as_bytes().to_vec(),
            "block {b}"
        );
        assert_eq!(content.get(blake3::hash(block).as_bytes()), Some((v, b)));
    }
    assert_eq!(puts[&900], blake3::hash(&[7u8; 4096]).as_bytes().to_vec());
    assert!(
        !puts.contains_key(&901),
        "applied after the checkpoint began"
    );
    let mut next = LogBatch::default();
    let work = r.checkpoint_work().unwrap();
    work.unwrap().run(&mut next.ops, &content).unwrap();
    assert_eq!(next.ops.len(), 1, "block 901");
}

#[test]
fn scrub_scans_for_suspects_and_confirms_only_blocks_not_written_since_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemLogStore::new();
    let v = VolumeId(4);
    let mut b = LogBatch::default();
    b.push(LogOp::Create {
        group: v.group(),
        state: GroupState::default(),
    });
    store.write(b).unwrap();
    let mut r = VolumeReplica::open(dir.path(), v, 1 << 20).unwrap();
    r.apply(LogIndex(1), &write(0, &[1u8; 8192])).unwrap();
    r.apply(LogIndex(2), &write(40 * 4096, &[2u8; 4096]))
        .unwrap();
    let get = |k: &[u8]| store.get(k);
    let range = |f: &[u8], t: &[u8]| store.scan_range(f, t);
    let confirmed = |corrupted: Vec<u64>, deferred: Vec<u64>| Confirmed {
        corrupted,
        deferred,
    };
    // Not checkpointed yet: the scan sees the new blocks as suspects, and they cannot
    // be confirmed (written since the last checkpoint).
    let all = r.next_scrub_slice(u64::MAX).unwrap();
    assert_eq!((all.first, all.n), (0, 256));
    assert_eq!(scan_slice(&all, range).unwrap(), vec![0, 1, 40]);
    assert_eq!(
        r.confirm_corrupted(&[0, 1, 40], get).unwrap(),
        confirmed(vec![], vec![0, 1, 40])
    );
    // The checkpoint in two halves, as the store does it: prepare, sync, write.
    let mut batch = LogBatch::default();
    r.checkpoint_work()
        .unwrap()
        .expect("written since the last checkpoint")
        .run(&mut batch.ops, &ContentIndex::default())
        .unwrap();
    store.write(batch).unwrap();
    assert_eq!(scan_slice(&all, range).unwrap(), Vec::<u64>::new());
    assert_eq!(
        r.confirm_corrupted(&[0, 1, 40], get).unwrap(),
        Confirmed::default()
    );

    // Flip bytes behind the replica's back: in a written block and in a hole.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(r.path())
        .unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[9u8; 16], 4096 + 100).unwrap();
    f.write_all_at(&[9u8; 1], 77 * 4096).unwrap();
    // In slices of 10 blocks, one full pass (256 blocks) finds both, once each.
    let mut suspects = Vec::new();
    for _ in 0..26 {
        let slice = r.next_scrub_slice(10).unwrap();
        assert_eq!(slice.n, if slice.first == 250 { 6 } else { 10 });
        suspects.extend(scan_slice(&slice, range).unwrap());
    }
    assert_eq!(r.next_scrub_slice(10).unwrap().first, 0, "wrapped around");
    assert_eq!(suspects, vec![1, 77]);
    assert_eq!(
        r.confirm_corrupted(&suspects, get).unwrap(),
        confirmed(vec![1, 77], vec![])
    );
    // A block whose data is lost to a hole (it reads as zeros, the index has its
    // hash) is found too, though the scan does not read holes.
    assert!(r.extent().punch_hole(40 * 4096, 4096).unwrap());
    assert_eq!(scan_slice(&all, range).unwrap(), vec![1, 40, 77]);
    assert_eq!(
        r.confirm_corrupted(&[1, 40, 77], get).unwrap(),
        confirmed(vec![1, 40, 77], vec![])
    );
    // Out-of-range suspects (a shrunk or replaced volume) are ignored.
    assert_eq!(
        r.confirm_corrupted(&[999], get).unwrap(),
        Confirmed::default()
    );
    // A block written since the checkpoint waits for the next one; the others do not.
    r.apply(LogIndex(3), &write(4096, &[3u8; 4096])).unwrap();
    assert_eq!(
        r.confirm_corrupted(&suspects, get).unwrap(),
        confirmed(vec![77], vec![1])
    );
}
