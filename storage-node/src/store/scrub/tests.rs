//! Tests of the scrub's scan thread and its handle: what the thread finds (a block whose
//! bytes differ from its recorded hash, a hole with a recorded hash, an unreadable
//! index), one job at a time until every finding of it is in, and a clean stop.

use std::os::unix::fs::FileExt;

use roamdisk_core::command::VolumeCommand;
use roamdisk_core::ids::{BlockIndex, LogIndex, VolumeId, BLOCK_BYTES};
use roamdisk_core::logstore::{LogBatch, LogOp, MemLogStore, StoreError};

use super::*;
use crate::dedup::ContentIndex;
use crate::store::tests::{join_within, HookedLog, WAIT};
use crate::volume::{hash_key, VolumeReplica};

const BLOCK: usize = BLOCK_BYTES as usize;

/// A replica of 16 blocks with `blocks` written (block `b` filled with `b + 1`) and
/// checkpointed: its hash records are in `log`, so the index is exact.
fn checkpointed(
    dir: &std::path::Path,
    log: &impl LogStore,
    volume: u64,
    blocks: &[u64],
) -> VolumeReplica {
    let mut r = VolumeReplica::open(dir, VolumeId(volume), 16 * BLOCK_BYTES).unwrap();
    for (i, &b) in blocks.iter().enumerate() {
        let data = vec![b as u8 + 1; BLOCK];
        let cmd = VolumeCommand::Write {
            offset: b * BLOCK_BYTES,
            data: &data,
        };
        r.apply(LogIndex(i as u64 + 1), &cmd.encode()).unwrap();
    }
    let mut batch = LogBatch::default();
    if let Some(work) = r.checkpoint_work().unwrap() {
        work.run(&mut batch.ops, &ContentIndex::default()).unwrap();
    }
    log.write(batch).unwrap();
    r
}

/// The whole replica as one slice of a job.
fn whole(r: &mut VolumeReplica) -> (GroupId, ScrubSlice) {
    (r.id.group(), r.next_scrub_slice(u64::MAX).unwrap())
}

/// Ends the scan thread once it has done the job in flight (its job queue closed) and
/// waits for it, bounded: every finding of the job is then in, and `take_findings`
/// returns them all.
fn finish(s: &mut Scrubber) -> Vec<Finding> {
    s.jobs.take();
    let thread = s.thread.take().expect("running");
    join_within(thread, WAIT).expect("the scan thread did not panic");
    s.take_findings()
}

fn suspects_of(findings: &[Finding], group: u64) -> &Result<Vec<u64>, String> {
    let mut of = findings.iter().filter(|f| f.group == GroupId(group));
    let f = of.next().expect("a finding for the group");
    assert!(of.next().is_none(), "one finding per slice");
    &f.suspects
}

#[test]
fn the_scan_finds_a_changed_block_and_a_hole_with_a_recorded_hash() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(MemLogStore::new());
    let mut clean = checkpointed(dir.path(), &*log, 3, &[0, 1, 2, 9]);
    let mut damaged = checkpointed(dir.path(), &*log, 4, &[0, 1, 2, 9]);
    // Block 1 changed on disk behind the index (bit rot, a stray write).
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(damaged.path())
        .unwrap();
    file.write_all_at(b"rot", BLOCK_BYTES + 100).unwrap();
    // Block 6 was never written (a hole) but the index holds a hash for it.
    let mut batch = LogBatch::default();
    batch.push(LogOp::Put {
        key: hash_key(VolumeId(4), BlockIndex(6)),
        value: blake3::hash(&[7u8; BLOCK]).as_bytes().to_vec(),
    });
    log.write(batch).unwrap();

    let mut s = Scrubber::spawn(Arc::clone(&log)).unwrap();
    assert!(s.idle());
    assert!(s.offer(vec![whole(&mut clean), whole(&mut damaged)]));
    let findings = finish(&mut s);
    assert_eq!(findings.len(), 2, "one finding per slice: {findings:?}");
    assert_eq!(suspects_of(&findings, 3), &Ok(vec![]), "the clean replica");
    assert_eq!(suspects_of(&findings, 4), &Ok(vec![1, 6]));
}

#[test]
fn an_unreadable_hash_index_is_reported_as_the_slice_s_finding() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(
        HookedLog::new()
            .on_scan_range(|_, _, _| Err(StoreError::Backend("injected read error".into()))),
    );
    let mut r = checkpointed(dir.path(), &*log, 3, &[0]);
    let mut s = Scrubber::spawn(Arc::clone(&log)).unwrap();
    assert!(s.offer(vec![whole(&mut r)]));
    let findings = finish(&mut s);
    let e = suspects_of(&findings, 3)
        .as_ref()
        .expect_err("the index could not be read");
    assert!(e.starts_with("read the hash index: "), "{e}");
    assert!(e.contains("injected read error"), "{e}");
}

/// A `Scrubber` whose "thread" is the test: it takes the jobs from the returned receiver
/// and sends the findings itself, so the handle's bookkeeping is checked step by step.
fn handle_without_thread() -> (
    Scrubber,
    Receiver<Vec<(GroupId, ScrubSlice)>>,
    mpsc::Sender<Finding>,
) {
    let (jobs, job_rx) = mpsc::sync_channel(1);
    let (found_tx, findings) = mpsc::channel();
    let s = Scrubber {
        jobs: Some(jobs),
        thread: None,
        findings,
        busy: false,
        dead: false,
        outstanding: 0,
    };
    (s, job_rx, found_tx)
}

fn slice(volume: u64) -> (GroupId, ScrubSlice) {
    let slice = ScrubSlice {
        volume: VolumeId(volume),
        path: format!("/nonexistent/{volume}.img").into(),
        first: 0,
        n: 8,
    };
    (GroupId(volume), slice)
}

fn found(group: u64) -> Finding {
    Finding {
        group: GroupId(group),
        suspects: Ok(vec![]),
    }
}

#[test]
fn one_job_at_a_time_until_every_finding_of_it_is_in() {
    let (mut s, job_rx, found_tx) = handle_without_thread();
    assert!(s.idle());
    assert!(!s.offer(Vec::new()), "an empty job is not sent");
    assert!(s.idle());
    assert!(job_rx.try_recv().is_err(), "nothing was sent");

    assert!(s.offer(vec![slice(3), slice(4)]));
    assert!(!s.idle());
    assert!(!s.offer(vec![slice(5)]), "busy: the next job waits");
    let job = job_rx.recv_timeout(WAIT).expect("the job was sent");
    assert_eq!(job.len(), 2);
    assert!(job_rx.try_recv().is_err(), "the refused job was not sent");
    assert!(s.take_findings().is_empty());
    assert!(!s.idle(), "no finding yet");

    found_tx.send(found(3)).unwrap();
    let first = s.take_findings();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].group, GroupId(3));
    assert!(!s.idle(), "one slice of the job is still being scanned");
    assert!(!s.offer(vec![slice(5)]));

    found_tx.send(found(4)).unwrap();
    assert_eq!(s.take_findings().len(), 1);
    assert!(s.idle(), "every finding of the job is in");
    assert!(s.offer(vec![slice(5)]));
    assert_eq!(job_rx.recv_timeout(WAIT).expect("the next job").len(), 1);
    assert!(!s.is_dead());
}

#[test]
fn a_thread_gone_mid_job_is_dead_and_gets_no_more_work() {
    let (mut s, job_rx, found_tx) = handle_without_thread();
    assert!(s.offer(vec![slice(3), slice(4)]));
    found_tx.send(found(3)).unwrap();
    // The thread panics before the job's second slice: its sender goes.
    drop(found_tx);
    let findings = s.take_findings();
    assert_eq!(findings.len(), 1, "what it found before is still delivered");
    assert!(s.is_dead());
    assert!(!s.idle());
    assert!(!s.offer(vec![slice(5)]));
    drop(job_rx);
}

#[test]
fn dropping_the_handle_stops_the_thread_after_its_job_and_releases_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(MemLogStore::new());
    let mut r = checkpointed(dir.path(), &*log, 3, &[0, 5]);
    let mut s = Scrubber::spawn(Arc::clone(&log)).unwrap();
    assert!(s.offer(vec![whole(&mut r)]));
    // Dropped while the job may still run; the drop joins the thread, so it is bounded
    // here by dropping on a helper thread.
    let dropper = std::thread::spawn(move || drop(s));
    join_within(dropper, WAIT).expect("the drop did not panic");
    assert_eq!(
        Arc::strong_count(&log),
        1,
        "the thread is gone: nothing holds the log store any more"
    );
}

#[test]
fn dropping_an_idle_handle_stops_the_thread() {
    let log = Arc::new(MemLogStore::new());
    let s = Scrubber::spawn(Arc::clone(&log)).unwrap();
    let dropper = std::thread::spawn(move || drop(s));
    join_within(dropper, WAIT).expect("the drop did not panic");
    assert_eq!(Arc::strong_count(&log), 1);
}
