//! Executing the core's effects, in the order it emitted them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use roamdisk_core::ids::VolumeId;
use roamdisk_core::logstore::{LogBatch, LogOp, LogStore};
use roamdisk_core::node::Effect;
use tracing::debug;

use super::Store;
use crate::dedup::CONTENT_INDEX_MAX;
use crate::volume::{hash_prefix, parse_hash_key, VolumeReplica};

impl<S: LogStore> Store<S> {
    /// Executes everything the core asked for since the last call. An error is a disk's
    /// (an extent file, the log store): the node must stop.
    pub(super) fn run_effects(&mut self) -> anyhow::Result<()> {
        let mut apply_took = Duration::ZERO;
        for effect in self.core.take_effects() {
            match effect {
                Effect::Send {
                    to,
                    group,
                    epoch,
                    msg,
                } => self.outbox.send(to, group, epoch, msg),
                Effect::Written {
                    to,
                    group,
                    epoch,
                    w,
                } => self.outbox.written(to, group, epoch, w),
                Effect::SyncWanted {
                    to,
                    group,
                    epoch,
                    want,
                } => self.outbox.sync_wanted(to, group, epoch, want),
                Effect::Quarantine {
                    to,
                    group,
                    epoch,
                    report,
                } => self.outbox.quarantine(to, group, epoch, report),
                Effect::Tail {
                    to,
                    group,
                    epoch,
                    tail,
                } => self.outbox.tail(to, group, epoch, tail),
                Effect::StartSync => {
                    self.log_syncer.start()?;
                    self.sync_started = Instant::now();
                }
                Effect::Apply {
                    volume,
                    index,
                    data,
                } => {
                    let started = Instant::now();
                    let v = self.volumes.get_mut(&volume).ok_or_else(|| {
                        anyhow::anyhow!("entry {} of volume {volume} has no replica here", index.0)
                    })?;
                    v.apply(index, &data)?;
                    apply_took += started.elapsed();
                }
                Effect::Verify {
                    volume,
                    index,
                    id,
                    first_block,
                    count,
                } => {
                    let v = self.volumes.get(&volume).ok_or_else(|| {
                        anyhow::anyhow!(
                            "verify marker {} of volume {volume} has no replica here",
                            index.0
                        )
                    })?;
                    // On the store thread, in log order: the digests are of the state at
                    // `index` on every replica (about a millisecond per MiB, from the page
                    // cache).
                    let digests =
                        crate::volume::verify::digest_blocks(v.extent(), first_block, count)
                            .map_err(|e| anyhow::anyhow!("hash volume {volume} to verify: {e}"))?;
                    self.cfg.digests.lock().expect("verify digests").insert(
                        volume,
                        id,
                        first_block,
                        digests,
                    );
                }
                Effect::Answer { id, answer } => self.replies.answer(id, answer),
                Effect::Leader { group, leader } => {
                    let mut leaders = self.leaders.write().expect("leader map poisoned");
                    match leader {
                        Some(l) => leaders.insert(group, l),
                        None => leaders.remove(&group),
                    };
                }
                Effect::ClusterChanged => {
                    self.cluster_tx
                        .send_replace(Arc::new(self.core.cluster().clone()));
                }
                Effect::VolumeCreated { volume, size } => self.open_volume(volume, size)?,
                Effect::VolumeGrown { volume, size } => {
                    if let Some(v) = self.volumes.get_mut(&volume) {
                        v.grow(size)?;
                    }
                }
                Effect::VolumeRemoved { volume } => self.remove_volume(volume)?,
                Effect::Recovering(list) => {
                    self.recovering_tx.send_replace(list);
                }
                Effect::Note(_) => {}
            }
        }
        if apply_took > Duration::ZERO {
            self.stats.apply.observe(apply_took);
        }
        Ok(())
    }

    /// After the core stopped: delivers its last answers, and nothing else.
    pub(super) fn answer_only(&mut self) {
        for effect in self.core.take_effects() {
            if let Effect::Answer { id, answer } = effect {
                self.replies.answer(id, answer);
            }
        }
        debug!(left = self.replies.len(), "requests unanswered at stop");
    }

    /// Opens (creating if needed) a replica's extent file; its blocks' hashes join
    /// dedup's content index.
    fn open_volume(&mut self, volume: VolumeId, size: u64) -> anyhow::Result<()> {
        let r = VolumeReplica::open(&self.cfg.data_dir.join("volumes"), volume, size)?;
        if self.cfg.content.len() < CONTENT_INDEX_MAX {
            for (k, h) in self.log.scan(&hash_prefix(volume))? {
                if let (Some((_, b)), Ok(h)) =
                    (parse_hash_key(&k), <[u8; 32]>::try_from(h.as_slice()))
                {
                    self.cfg.content.insert(&h, volume, b);
                }
            }
        }
        self.volumes.insert(volume, r);
        Ok(())
    }

    /// The volume left this node: its extent file and hash records go.
    fn remove_volume(&mut self, volume: VolumeId) -> anyhow::Result<()> {
        self.scrub_suspects.remove(&volume);
        if let Some(r) = self.volumes.remove(&volume) {
            r.destroy()?;
        }
        let mut b = LogBatch::default();
        for (k, _) in self.log.scan(&hash_prefix(volume))? {
            b.push(LogOp::Delete { key: k });
        }
        if !b.is_empty() {
            self.log.write(b)?;
        }
        Ok(())
    }
}
