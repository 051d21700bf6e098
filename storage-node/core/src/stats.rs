//! Where the store thread's time goes, for `/metrics`: how many rounds it runs, how many
//! entries each persists, and how long the log write, the log sync and the apply take.
//! An operator reads a write's latency off these (a slow disk shows in the sync
//! histogram, a busy node in the apply time), and they are what a write-path change is
//! measured with.
//!
//! Plain atomics written by the store thread and read by the admin server: no locks on
//! the write path.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the duration histograms' buckets, in seconds (the last is +Inf).
const BUCKETS_SECS: [f64; 12] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.512,
];

/// A Prometheus histogram of durations with fixed buckets.
#[derive(Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative; the last counts those above every bound).
    counts: [AtomicU64; BUCKETS_SECS.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS_SECS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS_SECS.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_ns
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Relaxed)).sum()
    }

    pub fn sum_secs(&self) -> f64 {
        self.sum_ns.load(Relaxed) as f64 / 1e9
    }

    /// Appends the histogram in Prometheus text format, with `labels` (`k="v",...`).
    pub fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Relaxed);
            let le = BUCKETS_SECS
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum_secs());
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// Counters of the store thread.
#[derive(Default)]
pub struct StoreStats {
    /// Rounds that had a Raft Ready to process.
    pub rounds: AtomicU64,
    /// Log entries appended (leader proposals and follower appends).
    pub entries_persisted: AtomicU64,
    /// Bytes of entry payloads appended.
    pub bytes_persisted: AtomicU64,
    /// Committed entries applied to state machines.
    pub entries_applied: AtomicU64,
    /// Writes answered once a quorum of voters had written them, before they committed.
    pub acked_written: AtomicU64,
    /// Followers' reports of what they wrote: taken, and refused (another term, or a log
    /// that does not match the leader's there).
    pub written_reports: AtomicU64,
    pub written_reports_refused: AtomicU64,
    /// Raft messages dropped because they were of another epoch of their group (a
    /// failover fenced the sender or this node), or for a fenced replica.
    pub fenced_messages: AtomicU64,
    /// Replicas the scrub found corrupted on disk (each then copies its blocks again).
    pub scrub_corrupted: AtomicU64,
    /// One RocksDB batch write (all groups of a round).
    pub log_write: Histogram,
    /// One log sync (fdatasync of the WAL), shared by every group of a round.
    pub log_sync: Histogram,
    /// Applying one round's committed entries (extent writes).
    pub apply: Histogram,
    /// A whole round: Readies, persistence, messages, apply, answers.
    pub round: Histogram,
    /// From proposal to answer of a write answered once a quorum had written it.
    pub write_written: Histogram,
    /// From arrival to answer of a flush on the leader.
    pub flush: Histogram,
    /// The store thread's part of a checkpoint (taking the touched sets, the batch).
    pub checkpoint: Histogram,
    /// Hashing the touched blocks and fsyncing the extent files of a checkpoint (on the
    /// `extent-sync` thread).
    pub checkpoint_extents: Histogram,
}

impl StoreStats {
    /// Appends every counter and histogram in Prometheus text format.
    pub fn render(&self, out: &mut String, node: u64) {
        let labels = format!("node=\"{node}\"");
        for (name, help, v) in [
            (
                "roamdisk_store_rounds_total",
                "Store thread rounds that processed a Raft Ready.",
                &self.rounds,
            ),
            (
                "roamdisk_store_entries_persisted_total",
                "Raft log entries appended to this node's log.",
                &self.entries_persisted,
            ),
            (
                "roamdisk_store_bytes_persisted_total",
                "Bytes of entry payloads appended to this node's log.",
                &self.bytes_persisted,
            ),
            (
                "roamdisk_store_entries_applied_total",
                "Committed entries applied on this node.",
                &self.entries_applied,
            ),
            (
                "roamdisk_store_acked_written_total",
                "Writes acknowledged once a quorum had written their entry, before commit.",
                &self.acked_written,
            ),
            (
                "roamdisk_store_written_reports_total",
                "Followers' reports of how far they wrote the log, taken by this leader.",
                &self.written_reports,
            ),
            (
                "roamdisk_store_written_reports_refused_total",
                "Followers' reports refused (another term, or a log not matching there).",
                &self.written_reports_refused,
            ),
            (
                "roamdisk_store_fenced_messages_total",
                "Raft messages dropped as of another epoch of their group (fencing after a failover).",
                &self.fenced_messages,
            ),
            (
                "roamdisk_store_scrub_corrupted_total",
                "Times the scrub found a replica's block differing from its recorded hash.",
                &self.scrub_corrupted,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name}{{{labels}}} {}", v.load(Relaxed));
        }
        for (h, name, help) in [
            (
                &self.log_write,
                "roamdisk_store_log_write_seconds",
                "Writing one round's batch to the log store.",
            ),
            (
                &self.log_sync,
                "roamdisk_store_log_sync_seconds",
                "Syncing the log (one per round that persisted entries or votes).",
            ),
            (
                &self.apply,
                "roamdisk_store_apply_seconds",
                "Applying one round's committed entries.",
            ),
            (
                &self.write_written,
                "roamdisk_store_write_written_seconds",
                "From proposal to answer of a write answered once a quorum had written it.",
            ),
            (
                &self.flush,
                "roamdisk_store_flush_seconds",
                "From arrival to answer of a flush on the volume's leader.",
            ),
            (
                &self.round,
                "roamdisk_store_round_seconds",
                "One store round with a Raft Ready, from Readies to answers.",
            ),
            (
                &self.checkpoint,
                "roamdisk_store_checkpoint_seconds",
                "The store thread's part of a checkpoint (building its batch).",
            ),
            (
                &self.checkpoint_extents,
                "roamdisk_store_checkpoint_extents_seconds",
                "Hashing touched blocks and fsyncing extent files for one checkpoint (off the store thread).",
            ),
        ] {
            h.render(out, name, help, &labels);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_the_count() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50)); // first bucket
        h.observe(Duration::from_micros(900)); // le 0.001
        h.observe(Duration::from_secs(2)); // +Inf only
        let mut out = String::new();
        h.render(&mut out, "x", "help", "node=\"1\"");
        assert!(
            out.contains("x_bucket{node=\"1\",le=\"0.0001\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{node=\"1\",le=\"0.0005\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{node=\"1\",le=\"0.001\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{node=\"1\",le=\"0.512\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{node=\"1\",le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("x_count{node=\"1\"} 3\n"), "{out}");
        assert_eq!(h.count(), 3);
        assert!((h.sum_secs() - 2.00095).abs() < 1e-9);
    }
}
