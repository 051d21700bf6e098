//! Checkpoints (volume data made durable before the core records its applied index) and
//! the scrub (blocks compared with their recorded hashes).

use std::time::{Duration, Instant};

use roamdisk_core::ids::VolumeId;
use roamdisk_core::logstore::LogStore;
use tracing::{error, warn};

use super::{Store, CHECKPOINT_INTERVAL_MS, SCRUB_BLOCKS_PER_ROUND, SCRUB_CONFIRM_PER_ROUND};

impl<S: LogStore> Store<S> {
    /// Once a round: finishes the checkpoint in flight if its extent work is done, and
    /// starts the next one every `CHECKPOINT_INTERVAL_MS` (at once when a replica's
    /// touched blocks reach their bound).
    pub(super) fn checkpoint_round(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        self.poll_checkpoint(false)?;
        let must = self.volumes.values().any(|v| v.must_checkpoint());
        if self.last_checkpoint.elapsed() >= Duration::from_millis(CHECKPOINT_INTERVAL_MS) || must {
            if must {
                // The touched-block bound: wait for the one in flight, start the next.
                self.poll_checkpoint(true)?;
            }
            self.start_checkpoint()?;
            if self.checkpoint_pending.is_none() {
                // Nothing to sync (or done at once): the index is written, scrub now.
                // Otherwise the scrub runs when the extent work is done.
                self.scrub()?;
            }
        }
        // Every write waits while this thread checkpoints: keep it visible.
        let took = started.elapsed();
        if took > Duration::from_millis(50) {
            warn!(
                took_ms = took.as_secs_f64() * 1e3,
                "slow checkpoint (writes waited)"
            );
        }
        Ok(())
    }

    /// Makes applied state durable for every group, then compacts logs behind it; waits
    /// for the checkpoint in flight first, and for this one's extent work.
    pub(super) fn checkpoint(&mut self) -> anyhow::Result<()> {
        self.poll_checkpoint(true)?;
        self.start_checkpoint()?;
        self.poll_checkpoint(true)
    }

    /// Starts a checkpoint unless one is in flight: the core takes the applied indexes,
    /// and the hashing of touched blocks and the extent fsyncs go to the `extent-sync`
    /// thread; [`Store::poll_checkpoint`] hands the records back once they are done.
    fn start_checkpoint(&mut self) -> anyhow::Result<()> {
        if self.checkpoint_pending.is_some() {
            return Ok(());
        }
        self.last_checkpoint = Instant::now();
        let volumes = &self.volumes;
        let Some(plan) = self
            .core
            .checkpoint_begin(|v| volumes.get(&v).is_some_and(|r| r.is_dirty()))?
        else {
            return Ok(());
        };
        let mut work = Vec::new();
        for (v, _) in &plan.volumes {
            if let Some(w) = self
                .volumes
                .get_mut(v)
                .map(|r| r.checkpoint_work())
                .transpose()?
            {
                work.extend(w);
            }
        }
        self.stats
            .checkpoint
            .observe(self.last_checkpoint.elapsed());
        if work.is_empty() {
            self.core.checkpoint_end(plan, Vec::new())?;
            return Ok(());
        }
        self.syncer.start(work).map_err(anyhow::Error::msg)?;
        self.checkpoint_pending = Some(plan);
        Ok(())
    }

    /// Finishes the checkpoint in flight if its extent work is done (with `wait`, waits
    /// for it), then runs a scrub round: right after the batch is written the index is
    /// exact for every block not written since the checkpoint started.
    fn poll_checkpoint(&mut self, wait: bool) -> anyhow::Result<()> {
        let Some(done) = self.syncer.poll(wait) else {
            return Ok(());
        };
        let plan = self
            .checkpoint_pending
            .take()
            .expect("extent work in flight belongs to a pending checkpoint");
        let records = done.map_err(anyhow::Error::msg)?;
        self.core.checkpoint_end(plan, records)?;
        self.scrub()
    }

    /// Verifies a slice of every volume replica against its hash index (see
    /// [`crate::volume::VolumeReplica::confirm_corrupted`]; runs right after a
    /// checkpoint, when the index is exact). A replica with a block that differs from its
    /// recorded hash was corrupted on disk: the core makes it copy the differing blocks
    /// from a healthy replica, exactly as after a snapshot install.
    fn scrub(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.scrubber.is_dead(), "the scrub thread stopped");
        for f in self.scrubber.take_findings() {
            let volume = VolumeId(f.group.0);
            if !self.volumes.contains_key(&volume) {
                continue; // deleted since
            }
            let suspects = f
                .suspects
                .map_err(|e| anyhow::anyhow!("scrub volume {volume}: {e}"))?;
            if self.core.recovering(f.group).is_some() || suspects.is_empty() {
                continue;
            }
            let set = self.scrub_suspects.entry(volume).or_default();
            let room = (SCRUB_BLOCKS_PER_ROUND as usize).saturating_sub(set.len());
            set.extend(suspects.into_iter().take(room));
        }
        // Confirm where the index is exact: no checkpoint batch waiting to be written,
        // every committed entry applied, and (checked per block) not written since the
        // last checkpoint. Other suspects wait for a later round. Most suspects are
        // blocks written since the last checkpoint, so a round confirms at most
        // `SCRUB_CONFIRM_PER_ROUND` of them (a few ms of this thread at most).
        let log = &self.log;
        let mut corrupted = Vec::new();
        let mut budget = if self.checkpoint_pending.is_some() {
            0
        } else {
            SCRUB_CONFIRM_PER_ROUND
        };
        for (volume, set) in self.scrub_suspects.iter_mut() {
            let group = volume.group();
            let Some(v) = self.volumes.get(volume) else {
                set.clear(); // deleted since
                continue;
            };
            if self.core.recovering(group).is_some() {
                set.clear(); // the copy rewrites every block anyway
                continue;
            }
            let behind = match (self.core.applied(group), self.core.raft(group)) {
                (Some(applied), Some(raft)) => applied < raft.commit_index(),
                _ => true,
            };
            if budget == 0 || behind {
                continue;
            }
            let blocks: Vec<u64> = set.iter().copied().take(budget).collect();
            let found = v
                .confirm_corrupted(&blocks, |k| log.get(k))
                .map_err(|e| anyhow::anyhow!("scrub volume {volume}: {e}"))?;
            budget -= blocks.len();
            for b in &blocks {
                set.remove(b);
            }
            set.extend(found.deferred);
            let bad = found.corrupted;
            if !bad.is_empty() {
                error!(%volume, blocks = ?&bad[..bad.len().min(16)], count = bad.len(),
                    "scrub: blocks differ from their recorded hashes (corrupted on disk); \
                     copying them from a healthy replica");
                corrupted.push(*volume);
            }
        }
        self.scrub_suspects.retain(|_, set| !set.is_empty());
        self.offer_scrub_job();
        for volume in corrupted {
            self.core.corrupted(volume)?;
        }
        self.run_effects()
    }

    /// Gives the scan thread its next slices, `SCRUB_BLOCKS_PER_ROUND` blocks shared by
    /// the replicas in turn, unless it is still busy with the last ones.
    fn offer_scrub_job(&mut self) {
        if !self.scrubber.idle() {
            return;
        }
        let mut budget = SCRUB_BLOCKS_PER_ROUND;
        let next = self.scrub_next;
        let order: Vec<VolumeId> = (self.volumes.range(next..))
            .chain(self.volumes.range(..next))
            .map(|(id, _)| *id)
            .collect();
        let mut job = Vec::new();
        for id in order {
            if budget == 0 {
                self.scrub_next = id;
                break;
            }
            if self.core.recovering(id.group()).is_some() {
                continue;
            }
            let v = self.volumes.get_mut(&id).expect("listed");
            if let Some(slice) = v.next_scrub_slice(budget) {
                budget -= slice.n;
                job.push((id.group(), slice));
            }
        }
        self.scrubber.offer(job);
    }
}
