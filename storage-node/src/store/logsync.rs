//! The `log-sync` thread: syncs the log store when the core asks (`Effect::StartSync`),
//! one sync at a time, each covering everything written before it started, while the
//! store thread goes on.

use std::sync::Arc;

use roamdisk_core::logstore::LogStore;

/// The thread that syncs the log for the store (`Effect::StartSync`): one sync at a
/// time, each covering everything written before it started.
pub(super) struct LogSyncer<S: LogStore> {
    start: Option<flume::Sender<()>>,
    pub done: flume::Receiver<Result<(), String>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _log: std::marker::PhantomData<S>,
}

impl<S: LogStore> LogSyncer<S> {
    pub fn spawn(log: Arc<S>) -> std::io::Result<Self> {
        let (start, start_rx) = flume::bounded::<()>(1);
        let (done_tx, done) = flume::bounded(1);
        let thread = std::thread::Builder::new()
            .name("log-sync".into())
            .spawn(move || {
                for () in start_rx.iter() {
                    let r = log.sync().map_err(|e| format!("sync raft log: {e}"));
                    if done_tx.send(r).is_err() {
                        return;
                    }
                }
            })?;
        Ok(LogSyncer {
            start: Some(start),
            done,
            thread: Some(thread),
            _log: std::marker::PhantomData,
        })
    }

    pub fn start(&self) -> anyhow::Result<()> {
        self.start
            .as_ref()
            .expect("running until dropped")
            .send(())
            .map_err(|_| anyhow::anyhow!("the log-sync thread stopped"))
    }
}

impl<S: LogStore> Drop for LogSyncer<S> {
    /// Joined before the store (and RocksDB) closes, like the scrub's thread.
    fn drop(&mut self) {
        self.start.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests;
