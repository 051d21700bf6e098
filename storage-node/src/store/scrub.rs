//! The background half of the scrub: a thread that reads slices of extent files and
//! compares them with the hash index, so that the store thread, which every write waits
//! for, does not. Measured before it existed: verifying 4096 blocks per second on the
//! store thread stalled it for 10–85 ms each second on a 3-site playground (every write
//! in flight waited), which was most of the durability=site latency tail.
//!
//! The scan runs while replicas apply writes, so what it finds are suspects: a block
//! written since the last checkpoint differs from the index as much as a corrupted one.
//! The store confirms suspects itself, right after a checkpoint, when the index is exact
//! (`VolumeReplica::confirm_corrupted`); that costs it a few reads, not a pass.

use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;

use roamdisk_core::ids::GroupId;
use roamdisk_core::logstore::LogStore;
use tracing::debug;

use crate::volume::{scan_slice, ScrubSlice};

/// What the scan found in one slice.
#[derive(Debug)]
pub struct Finding {
    pub group: GroupId,
    /// Blocks that differ from the index; or why the slice could not be read (an I/O
    /// error on a replica that still exists stops the node, as any failed disk does).
    pub suspects: Result<Vec<u64>, String>,
}

/// Handle to the scan thread. One job in flight at a time: the store offers the next one
/// only when the previous is done, so the scan's pace is at most one job per checkpoint.
pub struct Scrubber {
    /// `None` once dropping: the thread then ends after the job it is on.
    jobs: Option<SyncSender<Vec<(GroupId, ScrubSlice)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    findings: Receiver<Finding>,
    busy: bool,
    /// The thread is gone (it panicked): no more work is offered.
    dead: bool,
    /// Slices of the job in flight whose findings have not arrived yet.
    outstanding: usize,
}

impl Scrubber {
    /// Starts the scan thread; it reads the index through `log` and stops when the
    /// `Scrubber` is dropped.
    pub fn spawn<S: LogStore>(log: Arc<S>) -> std::io::Result<Scrubber> {
        let (jobs, job_rx) = mpsc::sync_channel::<Vec<(GroupId, ScrubSlice)>>(1);
        // Bounded by the job size: the store never has more than one job out.
        let (found_tx, findings) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("scrub".into())
            .spawn(move || {
                for job in job_rx {
                    for (group, slice) in job {
                        let suspects = scan_slice(&slice, |from, to| log.scan_range(from, to))
                            .map_err(|e| match e {
                                crate::volume::ScrubError::Io(e) => e.to_string(),
                                crate::volume::ScrubError::Index(e) => {
                                    format!("read the hash index: {e}")
                                }
                            });
                        debug!(volume = %slice.volume, first = slice.first, n = slice.n,
                            ?suspects, "scrub slice scanned");
                        if found_tx.send(Finding { group, suspects }).is_err() {
                            return;
                        }
                    }
                }
            })?;
        Ok(Scrubber {
            jobs: Some(jobs),
            thread: Some(thread),
            findings,
            busy: false,
            dead: false,
            outstanding: 0,
        })
    }

    /// Whether the scan thread can take a job now.
    pub fn idle(&self) -> bool {
        !self.busy && !self.dead
    }

    /// Hands the scan thread its next job; false (and nothing sent) unless it is idle.
    pub fn offer(&mut self, job: Vec<(GroupId, ScrubSlice)>) -> bool {
        if !self.idle() || job.is_empty() {
            return false;
        }
        let n = job.len();
        let Some(jobs) = &self.jobs else {
            return false;
        };
        match jobs.try_send(job) {
            Ok(()) => {
                self.busy = true;
                self.outstanding = n;
                true
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
        }
    }

    /// Whether the scan thread is gone (it panicked).
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// Findings that arrived since the last call.
    pub fn take_findings(&mut self) -> Vec<Finding> {
        let mut out = Vec::new();
        loop {
            match self.findings.try_recv() {
                Ok(f) => {
                    self.outstanding = self.outstanding.saturating_sub(1);
                    out.push(f);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.dead = true;
                    break;
                }
            }
        }
        if self.outstanding == 0 && !out.is_empty() {
            self.busy = false;
        }
        out
    }
}

impl Drop for Scrubber {
    /// Waits for the thread: it reads the index through the log store, so it must be gone
    /// before the store closes. Left running, it could hold the last reference to RocksDB
    /// while the process exited, and a node stopped by Ctrl-C aborted ("pthread lock:
    /// Invalid argument", 2 of 9 playground nodes once).
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests;
