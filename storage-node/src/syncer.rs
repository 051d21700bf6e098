//! The fsync half of a checkpoint, on its own thread. The store thread hashes the touched
//! blocks and builds the checkpoint's batch, hands the extent files to this thread, and
//! writes the batch (applied indexes, hashes) only when it reports them synced, so the
//! crash rule holds: a recorded applied index never covers data that is not durable.
//! Measured before it existed: the extent fsyncs stalled the store thread 4–35 ms every
//! second on each node of the 3-site playground under a QD1 writer, and every write in
//! flight on that node waited.

use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use roamdisk_nbd::file::RawFile;

use crate::stats::StoreStats;

pub struct Syncer {
    jobs: SyncSender<Vec<RawFile>>,
    done: Receiver<Result<(), String>>,
    in_flight: bool,
}

impl Syncer {
    /// Starts the thread; it stops when the `Syncer` is dropped.
    pub fn spawn(stats: Arc<StoreStats>) -> std::io::Result<Syncer> {
        let (jobs, job_rx) = mpsc::sync_channel::<Vec<RawFile>>(1);
        let (done_tx, done) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("extent-sync".into())
            .spawn(move || {
                for files in job_rx {
                    let started = Instant::now();
                    let r = files
                        .iter()
                        .try_for_each(|f| f.sync_data())
                        .map_err(|e| format!("fsync extent file: {e}"));
                    stats.extent_sync.observe(started.elapsed());
                    if done_tx.send(r).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Syncer {
            jobs,
            done,
            in_flight: false,
        })
    }

    /// Starts syncing `files`; one job at a time (call only when none is in flight).
    pub fn start(&mut self, files: Vec<RawFile>) -> Result<(), String> {
        assert!(!self.in_flight, "one extent sync at a time");
        self.jobs
            .send(files)
            .map_err(|_| "the extent-sync thread stopped".to_owned())?;
        self.in_flight = true;
        Ok(())
    }

    /// The result of the job in flight: `None` while it runs (with `wait`, blocks until
    /// it ends instead), or when there is none.
    pub fn poll(&mut self, wait: bool) -> Option<Result<(), String>> {
        if !self.in_flight {
            return None;
        }
        let r = if wait {
            self.done
                .recv()
                .unwrap_or_else(|_| Err("the extent-sync thread stopped".to_owned()))
        } else {
            match self.done.try_recv() {
                Ok(r) => r,
                Err(TryRecvError::Empty) => return None,
                Err(TryRecvError::Disconnected) => Err("the extent-sync thread stopped".to_owned()),
            }
        };
        self.in_flight = false;
        Some(r)
    }
}
