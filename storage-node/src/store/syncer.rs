//! The I/O half of a checkpoint, on its own thread. The store thread takes each replica's
//! applied index and touched blocks and builds the checkpoint's batch; this thread reads
//! and hashes the touched blocks and fsyncs the extent files ([`ExtentWork`]); the store
//! writes the batch (applied indexes, hashes) only when it reports them done, so the crash
//! rule holds: a recorded applied index never covers data that is not durable.
//! Measured before it existed: the extent fsyncs stalled the store thread 4–35 ms every
//! second on each node of the 3-site playground under a QD1 writer, and every write in
//! flight on that node waited; hashing there too stalled it 95–125 ms per checkpoint
//! under 1 MiB writes (32 MiB of touched blocks read back and hashed).

use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use roamdisk_core::ids::VolumeId;
use roamdisk_core::logstore::LogOp;

use crate::dedup::ContentIndex;
use crate::volume::ExtentWork;
use roamdisk_core::stats::StoreStats;

/// What a finished job returns: the hash records of each replica's touched blocks.
pub type SyncResult = Result<Vec<(VolumeId, Vec<LogOp>)>, String>;

pub struct Syncer {
    jobs: SyncSender<Vec<ExtentWork>>,
    done: Receiver<SyncResult>,
    in_flight: bool,
}

impl Syncer {
    /// Starts the thread; it stops when the `Syncer` is dropped. Hashed blocks are also
    /// recorded in `content` (dedup's index).
    pub fn spawn(stats: Arc<StoreStats>, content: Arc<ContentIndex>) -> std::io::Result<Syncer> {
        let (jobs, job_rx) = mpsc::sync_channel::<Vec<ExtentWork>>(1);
        let (done_tx, done) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("extent-sync".into())
            .spawn(move || {
                for work in job_rx {
                    let started = Instant::now();
                    let r = work
                        .iter()
                        .map(|w| {
                            let mut ops = Vec::new();
                            w.run(&mut ops, &content).map_err(|e| {
                                format!("hash and fsync extent file of volume {}: {e}", w.volume)
                            })?;
                            Ok((w.volume, ops))
                        })
                        .collect();
                    stats.checkpoint_extents.observe(started.elapsed());
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

    /// Starts a job; one at a time (call only when none is in flight).
    pub fn start(&mut self, work: Vec<ExtentWork>) -> Result<(), String> {
        assert!(!self.in_flight, "one extent job at a time");
        self.jobs
            .send(work)
            .map_err(|_| "the extent-sync thread stopped".to_owned())?;
        self.in_flight = true;
        Ok(())
    }

    /// The result of the job in flight: `None` while it runs (with `wait`, blocks until
    /// it ends instead), or when there is none.
    pub fn poll(&mut self, wait: bool) -> Option<SyncResult> {
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

#[cfg(test)]
mod tests;
