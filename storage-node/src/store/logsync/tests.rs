//! Tests of the `log-sync` thread: one sync at a time, each covering what was written
//! before it was started, a failed sync reported as one, and the thread joined on drop.

use std::sync::atomic::{AtomicUsize, Ordering};

use roamdisk_core::logstore::{LogBatch, LogOp, MemLogStore};

use super::*;
use crate::store::tests::{join_within, HookedLog, WAIT};

fn record(n: u8) -> LogBatch {
    LogBatch {
        ops: vec![LogOp::Put {
            key: vec![b'r', n],
            value: vec![n],
        }],
    }
}

#[test]
fn one_sync_at_a_time_each_covering_what_was_written_before_it_started() {
    // Each sync reports the batches written when it began (what it covers), then waits
    // for the test to let it finish; `running_max` counts syncs running at once.
    let (entered_tx, entered) = flume::unbounded::<u64>();
    let (gate_tx, gate_rx) = flume::unbounded::<()>();
    let running = Arc::new(AtomicUsize::new(0));
    let running_max = Arc::new(AtomicUsize::new(0));
    let (r, r_max) = (Arc::clone(&running), Arc::clone(&running_max));
    let log = Arc::new(HookedLog::new().on_sync(move |mem| {
        let now = r.fetch_add(1, Ordering::SeqCst) + 1;
        r_max.fetch_max(now, Ordering::SeqCst);
        let covers = mem.written_batches();
        let _ = entered_tx.send(covers);
        // The test gone (it failed): finish rather than hang the syncer's join.
        let _ = gate_rx.recv();
        let done = mem.sync_through(covers);
        r.fetch_sub(1, Ordering::SeqCst);
        done
    }));
    let syncer = LogSyncer::spawn(Arc::clone(&log)).unwrap();
    // Declared after the syncer, so dropped before it when an assertion fails: the held
    // sync then finishes and the syncer's join does not hang.
    let gate = gate_tx;

    log.write(record(1)).unwrap();
    syncer.start().unwrap();
    let first_covers = entered.recv_timeout(WAIT).expect("the first sync began");
    assert_eq!(first_covers, 1, "the batch written before the start");
    // Written while the first sync runs, then a second sync asked for.
    log.write(record(2)).unwrap();
    syncer.start().unwrap();
    assert!(
        syncer.done.is_empty(),
        "the first sync is held at the gate: nothing is done yet"
    );
    gate.send(()).unwrap();
    assert_eq!(syncer.done.recv_timeout(WAIT).expect("first done"), Ok(()));
    let second_covers = entered.recv_timeout(WAIT).expect("the second sync began");
    assert_eq!(
        second_covers, 2,
        "the batch written before the second start"
    );
    gate.send(()).unwrap();
    assert_eq!(syncer.done.recv_timeout(WAIT).expect("second done"), Ok(()));

    assert_eq!(running_max.load(Ordering::SeqCst), 1, "never two at once");
    assert_eq!(log.mem.unsynced_batches(), 0);
    assert!(syncer.done.is_empty(), "one result per start");
    assert!(entered.is_empty(), "one sync per start");
    drop(syncer);
    assert_eq!(
        Arc::strong_count(&log),
        1,
        "the thread is joined on drop, its handle on the log released"
    );
}

#[test]
fn what_was_written_before_a_sync_survives_a_power_loss() {
    let log = Arc::new(MemLogStore::new());
    let syncer = LogSyncer::spawn(Arc::clone(&log)).unwrap();
    log.write(record(1)).unwrap();
    log.write(record(2)).unwrap();
    syncer.start().unwrap();
    assert_eq!(syncer.done.recv_timeout(WAIT).expect("done"), Ok(()));
    log.crash();
    assert_eq!(log.get(&[b'r', 1]).unwrap(), Some(vec![1]));
    assert_eq!(log.get(&[b'r', 2]).unwrap(), Some(vec![2]));
}

#[test]
fn a_failed_sync_is_reported_as_a_failure_and_the_thread_goes_on() {
    let log = Arc::new(MemLogStore::new());
    let syncer = LogSyncer::spawn(Arc::clone(&log)).unwrap();
    log.write(record(1)).unwrap();
    log.fail_next_sync();
    syncer.start().unwrap();
    let e = syncer
        .done
        .recv_timeout(WAIT)
        .expect("done")
        .expect_err("the sync failed");
    assert!(e.starts_with("sync raft log: "), "{e}");
    assert!(e.contains("injected"), "the store's own error is kept: {e}");
    // Its batch is not durable: a power loss takes it.
    log.crash();
    assert_eq!(log.get(&[b'r', 1]).unwrap(), None);
    // The store stops the node on a failure; the thread itself still answers.
    log.write(record(2)).unwrap();
    syncer.start().unwrap();
    assert_eq!(syncer.done.recv_timeout(WAIT).expect("done"), Ok(()));
}

#[test]
fn a_stopped_thread_is_an_error_not_a_hang() {
    let log = HookedLog::new().on_sync(|_| panic!("sync panicked (deliberately, in a test)"));
    let mut syncer = LogSyncer::spawn(Arc::new(log)).unwrap();
    syncer.start().unwrap();
    assert_eq!(
        syncer.done.recv_timeout(WAIT),
        Err(flume::RecvTimeoutError::Disconnected),
        "the store's wait for the sync ends"
    );
    let thread = syncer.thread.take().expect("spawned");
    assert!(join_within(thread, WAIT).is_err(), "the thread panicked");
    let e = syncer.start().expect_err("no thread to sync");
    assert!(e.to_string().contains("log-sync thread stopped"), "{e}");
}
