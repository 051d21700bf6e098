//! Tests of the `extent-sync` thread: a job's hash records come back for every replica in
//! it, a replica whose extent file fails fails the job with an error naming its volume,
//! and one job is in flight at a time.

use roamdisk_core::command::VolumeCommand;
use roamdisk_core::ids::{BlockIndex, LogIndex, BLOCK_BYTES};

use super::*;
use crate::volume::{hash_key, VolumeReplica};

const BLOCK: usize = BLOCK_BYTES as usize;

/// A replica of `blocks` blocks in `dir`.
fn replica(dir: &std::path::Path, volume: u64, blocks: u64) -> VolumeReplica {
    VolumeReplica::open(dir, VolumeId(volume), blocks * BLOCK_BYTES).unwrap()
}

fn write_block(r: &mut VolumeReplica, index: u64, block: u64, fill: u8) {
    let data = vec![fill; BLOCK];
    let cmd = VolumeCommand::Write {
        offset: block * BLOCK_BYTES,
        data: &data,
    };
    r.apply(LogIndex(index), &cmd.encode()).unwrap();
}

fn zero_block(r: &mut VolumeReplica, index: u64, block: u64) {
    let cmd = VolumeCommand::Zero {
        offset: block * BLOCK_BYTES,
        len: BLOCK_BYTES,
        punch: true,
    };
    r.apply(LogIndex(index), &cmd.encode()).unwrap();
}

fn put(volume: u64, block: u64, fill: u8) -> LogOp {
    LogOp::Put {
        key: hash_key(VolumeId(volume), BlockIndex(block)),
        value: blake3::hash(&[fill; BLOCK]).as_bytes().to_vec(),
    }
}

fn spawn() -> (Syncer, Arc<StoreStats>, Arc<ContentIndex>) {
    let stats = Arc::new(StoreStats::default());
    let content = Arc::new(ContentIndex::default());
    let syncer = Syncer::spawn(Arc::clone(&stats), Arc::clone(&content)).unwrap();
    (syncer, stats, content)
}

#[test]
fn a_job_returns_the_hash_records_of_every_replica_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = replica(dir.path(), 3, 16);
    let mut b = replica(dir.path(), 5, 16);
    write_block(&mut a, 1, 0, 0xa0);
    write_block(&mut a, 2, 7, 0xa7);
    write_block(&mut b, 1, 2, 0xb2);
    write_block(&mut b, 2, 3, 0xb3);
    // Written, then zeroed: its record goes.
    zero_block(&mut b, 3, 3);
    let work = vec![
        a.checkpoint_work().unwrap().expect("a is dirty"),
        b.checkpoint_work().unwrap().expect("b is dirty"),
    ];
    let (mut syncer, stats, content) = spawn();
    syncer.start(work).unwrap();
    let records = syncer
        .poll(true)
        .expect("a job was in flight")
        .expect("the job succeeded");
    let delete_b3 = LogOp::Delete {
        key: hash_key(VolumeId(5), BlockIndex(3)),
    };
    assert_eq!(
        records,
        vec![
            (VolumeId(3), vec![put(3, 0, 0xa0), put(3, 7, 0xa7)]),
            (VolumeId(5), vec![put(5, 2, 0xb2), delete_b3]),
        ]
    );
    // The hashed blocks joined dedup's index; the zeroed one did not.
    let hash = |fill: u8| *blake3::hash(&[fill; BLOCK]).as_bytes();
    assert_eq!(content.get(&hash(0xa7)), Some((VolumeId(3), 7)));
    assert_eq!(content.get(&hash(0xb2)), Some((VolumeId(5), 2)));
    assert_eq!(content.get(&hash(0xb3)), None);
    assert_eq!(
        stats.checkpoint_extents.count(),
        1,
        "the job's time observed"
    );
    assert!(
        syncer.poll(true).is_none(),
        "the job is done: nothing in flight"
    );
}

#[test]
fn poll_without_a_job_returns_at_once() {
    let (mut syncer, _, _) = spawn();
    assert!(syncer.poll(false).is_none());
    assert!(
        syncer.poll(true).is_none(),
        "waits only for a job in flight"
    );
}

#[test]
fn a_replica_whose_extent_file_fails_fails_the_job_naming_its_volume() {
    let dir = tempfile::tempdir().unwrap();
    let mut good = replica(dir.path(), 3, 16);
    let mut bad = replica(dir.path(), 9, 16);
    write_block(&mut good, 1, 0, 1);
    write_block(&mut bad, 1, 0, 2);
    // A block whose byte offset (2^63) the kernel refuses to read (EINVAL), standing in
    // for the EIO of a failing disk.
    bad.touch_blocks(&[1 << 51]);
    let work = vec![
        good.checkpoint_work().unwrap().unwrap(),
        bad.checkpoint_work().unwrap().unwrap(),
    ];
    let (mut syncer, _, _) = spawn();
    syncer.start(work).unwrap();
    let e = syncer
        .poll(true)
        .expect("a job was in flight")
        .expect_err("the extent file of volume 9 failed");
    assert!(
        e.starts_with("hash and fsync extent file of volume 9: "),
        "{e}"
    );
    // The thread goes on: the next job runs.
    write_block(&mut good, 2, 1, 3);
    syncer
        .start(vec![good.checkpoint_work().unwrap().unwrap()])
        .unwrap();
    assert_eq!(
        syncer.poll(true),
        Some(Ok(vec![(VolumeId(3), vec![put(3, 1, 3)])]))
    );
}

#[test]
#[should_panic(expected = "one extent job at a time")]
fn a_second_job_while_one_is_in_flight_is_refused() {
    let (mut syncer, _, _) = spawn();
    syncer.start(Vec::new()).unwrap();
    let _ = syncer.start(Vec::new());
}

#[test]
fn a_job_can_start_once_the_previous_one_is_collected() {
    let (mut syncer, stats, _) = spawn();
    for _ in 0..3 {
        syncer.start(Vec::new()).unwrap();
        assert_eq!(syncer.poll(true), Some(Ok(Vec::new())));
    }
    assert_eq!(stats.checkpoint_extents.count(), 3);
}
