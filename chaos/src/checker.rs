//! Checks a run's [`History`] against the NBD contract the workload relies on. Pure: no I/O,
//! so a `history.jsonl` can be checked again offline.
//!
//! What the workload guarantees, and the checker relies on:
//! - every (volume, block) is written by exactly one connection, sequentially, with
//!   versions 1, 2, 3, ... (so ack times and start times grow with the version);
//! - a failed write (error set) has an unknown outcome: it may or may not have landed.
//!
//! What the server promises (it advertises `NBD_FLAG_CAN_MULTI_CONN`): a successful FLUSH on
//! any connection of an export makes durable every write of that export acknowledged before
//! the flush started, on any connection. From this, for a successful read of a block:
//! - **floor**: the highest version acknowledged before a successful flush that itself ended
//!   before the read started; the read must not return anything older (`stale_read`, or
//!   `lost_write` for the final verification);
//! - **ceiling**: the highest version whose write started before the read ended (acked or
//!   not); the read must not return anything newer (`future_read`);
//! - the content must be well formed (`torn_block`) and be this block's (`foreign_block`).
//!
//! Optionally ([`CheckOptions::acked_writes_durable`], on by default) the stricter promise of
//! roamdisk itself: an acknowledged write survives any number of process crashes (it is
//! written by a quorum of voters; synced on a quorum once flushed or written with FUA) and
//! reads are linearizable, so a read that started after an ack must see that version or
//! a later one.
//!
//! A forced failover (`FailoverEvent`) changes what "kept" means, as its plan stated: the
//! old home's acknowledged writes after the stated time (none, for a lossless plan) may be
//! gone, so they are checked as writes of unknown outcome from then on; and three more
//! promises are checked (see [`failover_view`]).
//!
//! Cost: O(n log n) in the number of operations. Writes are indexed per block (sorted by
//! start and by ack, with running maxima) and flushes per volume, so each read is a few
//! binary searches.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

#[cfg(test)]
use crate::history::{FailoverEvent, LagSample};
use crate::history::{FaultRecord, History, Op, OpRecord, Seen, Violation};

/// The `conn` of the reads of the final verification (every block read once after the
/// workload stopped and the cluster healed). Kept here so that the checker, which gives those
/// reads a meaning of their own (`lost_write`, excluded from RTO), owns the convention.
pub const FINAL_VERIFY_CONN: u32 = u32::MAX - 1;

/// How long after a fault ends (or, for a fault without an end, after it starts) an outage
/// still counts as caused by it: recovery (elections, reconnects, catch-up) takes a while.
pub const RTO_TAIL_US: u64 = 30_000_000;

/// Violations kept in a [`CheckResult`]; a broken run (a negative control, typically) can
/// otherwise produce one per read, millions, which no report needs. The rest are counted.
pub const MAX_VIOLATIONS: usize = 10_000;

/// Which promises to hold the history to.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckOptions {
    /// roamdisk acknowledges a write only once a quorum of voters has written it (it
    /// survives process crashes; FLUSH makes it durable against power loss), and reads
    /// are linearizable: a read started after an ack must see that version or a later
    /// one, flush or not. Plain NBD promises this only after a FLUSH.
    pub acked_writes_durable: bool,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            acked_writes_durable: true,
        }
    }
}

/// The verdict on a history, with the counts the report shows.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CheckResult {
    /// Sorted by time; at most [`MAX_VIOLATIONS`].
    pub violations: Vec<Violation>,
    pub writes_acked: u64,
    pub writes_failed: u64,
    /// Acknowledged writes (volume, block, version) confirmed by a later read that returned
    /// this version or a newer one.
    pub writes_verified: u64,
    /// Successful reads, each checked.
    pub reads_checked: u64,
    pub flushes_ok: u64,
    /// One per fault of the history, in the same order.
    pub rto: Vec<FaultRto>,
    /// Violations found beyond the [`MAX_VIOLATIONS`] kept.
    #[serde(default)]
    pub violations_omitted: u64,
}

/// Recovery time of one fault: see [`fault_rtos`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FaultRto {
    pub kind: String,
    pub target: String,
    pub start_us: u64,
    pub rto_ms: u64,
}

/// [`check_with`] with the default (strict) options.
pub fn check(history: &History) -> CheckResult {
    check_with(history, CheckOptions::default())
}

/// Checks every successful read of `history`, counts operations and measures RTO per fault.
pub fn check_with(history: &History, opts: CheckOptions) -> CheckResult {
    let (ops, failover_violations) = failover_view(history);
    let ops = ops.as_deref().unwrap_or(&history.ops);
    let writes = index_writes(ops);
    let flushes = index_flushes(ops);
    let no_writes = BlockWrites::default();
    let no_flushes = Flushes::default();
    let mut res = CheckResult::default();
    let mut violations = failover_violations;
    let mut reads: HashMap<BlockKey, Vec<(u64, u64)>> = HashMap::new();
    for op in ops {
        match &op.op {
            Op::Write { .. } if op.ok() => res.writes_acked += 1,
            Op::Write { .. } => res.writes_failed += 1,
            Op::Flush if op.ok() => res.flushes_ok += 1,
            Op::Flush => {}
            Op::Read { .. } if !op.ok() => {}
            Op::Read { block, seen } => {
                res.reads_checked += 1;
                let key = (op.vol, *block);
                let w = writes.get(&key).unwrap_or(&no_writes);
                let f = flushes.get(&op.vol).unwrap_or(&no_flushes);
                let read = Read {
                    op,
                    block: *block,
                    seen,
                };
                violations.extend(check_read(&read, w, f, opts));
                if let Seen::Version { version } = seen {
                    reads.entry(key).or_default().push((op.start_us, *version));
                }
            }
        }
    }
    // A drill passes only on the faults it injected: one that was scheduled and could
    // not be applied is a failed run, not a quiet one.
    for f in history.faults.iter().filter(|f| f.scheduled && !f.applied) {
        violations.push(Violation {
            kind: "fault_not_applied".into(),
            vol: 0,
            block: None,
            at_us: f.start_us,
            detail: format!(
                "scheduled fault {} was not applied: {}",
                f.kind,
                f.note.as_deref().unwrap_or("no reason recorded")
            ),
        });
    }
    violations.sort_by_key(|v| v.at_us);
    if violations.len() > MAX_VIOLATIONS {
        res.violations_omitted = (violations.len() - MAX_VIOLATIONS) as u64;
        violations.truncate(MAX_VIOLATIONS);
    }
    res.violations = violations;
    res.writes_verified = writes
        .iter()
        .map(|(key, w)| count_verified(w, reads.get_mut(key).map(|r| &mut r[..])))
        .sum();
    res.rto = fault_rtos(&history.ops, &history.faults);
    res
}

/// The history as the failovers it records make it, and what they broke:
/// - every write the old home acknowledged after the plan's stated time (none if the plan
///   was lossless), until the new home answered, becomes a write of unknown outcome: the
///   plan said it may be lost;
/// - `lost_beyond_rpo`: a block read through the new home right after it answered holds
///   an older version than one the old home acknowledged before the stated time;
/// - `loss_beyond_reported_lag`: a write that is gone (acknowledged by the old home, newer
///   than what the new home held) was acknowledged before the last lag sample taken before
///   the loss minus that sample's age for the site failed over to: the lag `status`
///   reported did not bound the loss;
/// - `acked_by_fenced_generation`: an old-home node acknowledged a write of the volume
///   after the new home answered (the workload connects only to the new home from then
///   on, so it was an old-epoch connection).
///
/// Returns `None` for the operations when there was no failover.
pub fn failover_view(history: &History) -> (Option<Vec<OpRecord>>, Vec<Violation>) {
    if history.failovers.is_empty() {
        return (None, Vec::new());
    }
    let mut ops = history.ops.clone();
    let mut violations = Vec::new();
    let mut failovers: Vec<&crate::history::FailoverEvent> = history.failovers.iter().collect();
    failovers.sort_by_key(|f| f.serving_us);
    // Per volume: where the epoch that a failover ends began (the previous failover's
    // rejoin, or the run's start); writes before it were judged by that failover.
    let mut epoch_began: HashMap<u32, u64> = HashMap::new();
    for f in failovers {
        let began = epoch_began.get(&f.vol).copied().unwrap_or(0);
        epoch_began.insert(f.vol, f.rejoined_us.unwrap_or(u64::MAX));
        let old = |op: &OpRecord| {
            op.vol == f.vol && f.old_home_nodes.contains(&op.node) && op.end_us > began
        };
        // Old-generation acknowledged writes, per block, before any lost ones are marked.
        let mut acked: HashMap<u64, Vec<(u64, u64)>> = HashMap::new();
        for op in ops
            .iter()
            .filter(|o| old(o) && o.ok() && o.end_us <= f.serving_us)
        {
            if let Op::Write { block, version } = op.op {
                acked.entry(block).or_default().push((op.end_us, version));
            }
        }
        let present: HashMap<u64, u64> = f.present.iter().copied().collect();
        let after = if f.lossless {
            None
        } else {
            Some(f.after_us.unwrap_or(0))
        };
        for (block, ws) in &acked {
            let Some(&have) = present.get(block) else {
                continue;
            };
            let kept_by_plan = ws
                .iter()
                .filter(|(end, _)| after.is_none_or(|a| *end <= a))
                .map(|(_, v)| *v)
                .max();
            if let Some(v) = kept_by_plan.filter(|v| *v > have) {
                violations.push(Violation {
                    kind: "lost_beyond_rpo".into(),
                    vol: f.vol,
                    block: Some(*block),
                    at_us: f.serving_us,
                    detail: format!(
                        "vol {} block {block}: the new home holds {}, but v{v} was acknowledged at {} before the stated time ({})",
                        f.vol,
                        seen_name(have),
                        f.from,
                        after.map_or_else(|| "lossless".to_string(), secs)
                    ),
                });
            }
        }
        // The lag reported just before the loss bounds it.
        let sample = history
            .lag
            .iter()
            .filter(|l| l.vol == f.vol && l.site == f.source_site && l.t_us <= f.lost_us)
            .max_by_key(|l| l.t_us);
        if let Some(s) = sample {
            let bound = s.t_us.saturating_sub(s.seconds_ms * 1000);
            for (block, ws) in &acked {
                let have = present.get(block).copied().unwrap_or(u64::MAX);
                for (end, v) in ws.iter().filter(|(end, v)| *v > have && *end < bound) {
                    violations.push(Violation {
                        kind: "loss_beyond_reported_lag".into(),
                        vol: f.vol,
                        block: Some(*block),
                        at_us: *end,
                        detail: format!(
                            "vol {} block {block}: v{v}, acknowledged at {}, is gone, but {} was reported {} ms behind at {}",
                            f.vol,
                            secs(*end),
                            f.source_site,
                            s.seconds_ms,
                            secs(s.t_us)
                        ),
                    });
                }
            }
        }
        let rejoined = f.rejoined_us.unwrap_or(u64::MAX);
        for op in ops
            .iter_mut()
            .filter(|o| old(o) && o.ok() && o.end_us <= rejoined)
        {
            let Op::Write { .. } = op.op else { continue };
            if op.end_us > f.serving_us {
                violations.push(Violation {
                    kind: "acked_by_fenced_generation".into(),
                    vol: f.vol,
                    block: None,
                    at_us: op.end_us,
                    detail: format!(
                        "node {} of the old home acknowledged a write at {}, after the new home answered at {}",
                        op.node,
                        secs(op.end_us),
                        secs(f.serving_us)
                    ),
                });
                op.error = Some("acknowledged by a fenced generation".into());
            } else if after.is_some_and(|a| op.end_us > a) {
                op.error =
                    Some("acknowledged after the failover's stated time: may be lost".into());
            }
        }
    }
    (Some(ops), violations)
}

type BlockKey = (u32, u64);

/// An acknowledged version and when it was acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Acked {
    version: u64,
    ack_us: u64,
}

/// The writes of one block, indexed for "highest version started by t" and "highest version
/// acknowledged by t". Running maxima rather than "the last one" keep this right even if
/// the workload ever retried a version or recorded writes out of order.
#[derive(Debug, Default)]
struct BlockWrites {
    /// (start_us, highest version started at or before it), sorted by start_us.
    started: Vec<(u64, u64)>,
    /// (ack_us, version, highest version acknowledged at or before it), sorted by ack_us.
    acked: Vec<(u64, u64, Acked)>,
    /// When each write may have been changing the block: (start_us, end_us), or to the
    /// end of time for a failed write (its outcome, and so its time, is unknown).
    spans: Vec<(u64, u64)>,
}

impl BlockWrites {
    /// Highest version whose write started at or before `t` (0: none).
    fn ceiling(&self, t: u64) -> u64 {
        let n = self.started.partition_point(|&(s, _)| s <= t);
        n.checked_sub(1).map_or(0, |i| self.started[i].1)
    }

    /// Highest version acknowledged at or before `t`.
    fn acked_by(&self, t: u64) -> Option<Acked> {
        let n = self.acked.partition_point(|&(a, _, _)| a <= t);
        n.checked_sub(1).map(|i| self.acked[i].2)
    }

    /// A write of the block may have been in progress at some time in `[from, to]`.
    fn overlaps(&self, from: u64, to: u64) -> bool {
        self.spans.iter().any(|&(s, e)| s <= to && e >= from)
    }
}

fn index_writes(ops: &[OpRecord]) -> HashMap<BlockKey, BlockWrites> {
    let mut raw: HashMap<BlockKey, Vec<&OpRecord>> = HashMap::new();
    for op in ops {
        if let Op::Write { block, .. } = op.op {
            raw.entry((op.vol, block)).or_default().push(op);
        }
    }
    raw.into_iter()
        .map(|(key, ws)| (key, block_writes(&ws)))
        .collect()
}

fn write_version(op: &OpRecord) -> u64 {
    match op.op {
        Op::Write { version, .. } => version,
        _ => 0,
    }
}

fn block_writes(ws: &[&OpRecord]) -> BlockWrites {
    let mut started: Vec<(u64, u64)> = ws.iter().map(|o| (o.start_us, write_version(o))).collect();
    started.sort_unstable();
    running_max(started.iter_mut().map(|(_, v)| v));
    let mut acked: Vec<(u64, u64, Acked)> = ws
        .iter()
        .filter(|o| o.ok())
        .map(|o| {
            let a = Acked {
                version: write_version(o),
                ack_us: o.end_us,
            };
            (o.end_us, a.version, a)
        })
        .collect();
    acked.sort_unstable_by_key(|&(t, v, _)| (t, v));
    let mut best = Acked::default();
    for (_, _, a) in acked.iter_mut() {
        if a.version >= best.version {
            best = *a;
        }
        *a = best;
    }
    let spans = ws
        .iter()
        .map(|o| (o.start_us, if o.ok() { o.end_us } else { u64::MAX }))
        .collect();
    BlockWrites {
        started,
        acked,
        spans,
    }
}

fn running_max<'a>(values: impl Iterator<Item = &'a mut u64>) {
    let mut m = 0;
    for v in values {
        m = m.max(*v);
        *v = m;
    }
}

/// The successful flushes of one volume, indexed both ways round.
#[derive(Debug, Default)]
struct Flushes {
    /// (end_us, latest start_us among flushes ended at or before it), sorted by end_us.
    by_end: Vec<(u64, u64)>,
    /// (start_us, earliest end_us among flushes started at or after it), sorted by start_us.
    by_start: Vec<(u64, u64)>,
}

impl Flushes {
    /// For a read starting at `t`: writes acknowledged at or before the returned time were
    /// flushed before the read started. Taking the latest-starting flush among those that
    /// ended in time is enough, since an earlier one covers fewer writes.
    fn durable_cutoff(&self, t: u64) -> Option<u64> {
        let n = self.by_end.partition_point(|&(e, _)| e <= t);
        n.checked_sub(1).map(|i| self.by_end[i].1)
    }

    /// When a write acknowledged at `ack_us` was first known durable: the earliest end of a
    /// flush started after the ack.
    fn durable_at(&self, ack_us: u64) -> Option<u64> {
        let i = self.by_start.partition_point(|&(s, _)| s < ack_us);
        self.by_start.get(i).map(|&(_, e)| e)
    }
}

/// Flushes per volume: with MULTI_CONN a flush covers every connection of its export, but
/// not other exports.
fn index_flushes(ops: &[OpRecord]) -> HashMap<u32, Flushes> {
    let mut raw: HashMap<u32, Vec<(u64, u64)>> = HashMap::new();
    for op in ops.iter().filter(|o| o.ok() && o.op == Op::Flush) {
        raw.entry(op.vol)
            .or_default()
            .push((op.start_us, op.end_us));
    }
    raw.into_iter()
        .map(|(vol, fs)| (vol, flushes(fs)))
        .collect()
}

fn flushes(fs: Vec<(u64, u64)>) -> Flushes {
    let mut by_end: Vec<(u64, u64)> = fs.iter().map(|&(s, e)| (e, s)).collect();
    by_end.sort_unstable();
    running_max(by_end.iter_mut().map(|(_, s)| s));
    let mut by_start = fs;
    by_start.sort_unstable();
    let mut m = u64::MAX;
    for (_, e) in by_start.iter_mut().rev() {
        m = m.min(*e);
        *e = m;
    }
    Flushes { by_end, by_start }
}

/// A successful read under check.
struct Read<'a> {
    op: &'a OpRecord,
    block: u64,
    seen: &'a Seen,
}

impl Read<'_> {
    fn is_final(&self) -> bool {
        self.op.conn == FINAL_VERIFY_CONN
    }

    fn violation(&self, kind: &str, detail: String) -> Violation {
        Violation {
            kind: kind.to_string(),
            vol: self.op.vol,
            block: Some(self.block),
            at_us: self.op.start_us,
            detail: format!("vol {} block {}: {detail}", self.op.vol, self.block),
        }
    }

    /// Reading something older than a durable version: in the final verification the
    /// version is gone for good.
    fn too_old(&self, detail: String) -> Violation {
        let kind = if self.is_final() {
            "lost_write"
        } else {
            "stale_read"
        };
        let who = if self.is_final() {
            "final verification "
        } else {
            ""
        };
        self.violation(kind, format!("{who}{detail}"))
    }
}

/// At most one violation per read: the first broken promise, from the most to the least
/// telling.
fn check_read(r: &Read, w: &BlockWrites, f: &Flushes, opts: CheckOptions) -> Option<Violation> {
    let at = secs(r.op.start_us);
    let v = match r.seen {
        // NBD promises nothing about a read that overlaps a write of the same bytes
        // (neither does a disk beyond its atomic write unit, nor Linux's page cache: a
        // read copying a page while a write fills it sees part of each). Qemu-nbd showed
        // it in the workload's own test. A torn block with no write in flight is damage.
        Seen::Torn if w.overlaps(r.op.start_us, r.op.end_us) => return None,
        Seen::Torn => {
            let d = format!("read at {at} returned a torn block (checksum mismatch)");
            return Some(r.violation("torn_block", d));
        }
        Seen::Foreign {
            volume,
            block,
            seed,
            version,
        } => {
            let d = format!(
                "read at {at} returned volume {volume} block {block} v{version} (seed {seed})"
            );
            return Some(r.violation("foreign_block", d));
        }
        Seen::Zero => 0,
        Seen::Version { version } => *version,
    };
    let seen = seen_name(v);
    let flushed = f.durable_cutoff(r.op.start_us).and_then(|c| w.acked_by(c));
    if let Some(a) = flushed.filter(|a| v < a.version) {
        let when = f.durable_at(a.ack_us).map_or_else(|| "?".into(), secs);
        let d = format!(
            "read {seen} at {at}, but v{} was flushed at {when}",
            a.version
        );
        return Some(r.too_old(d));
    }
    let ceiling = w.ceiling(r.op.end_us);
    if v > ceiling {
        let by = secs(r.op.end_us);
        let d = match ceiling {
            0 => format!("read v{v} at {at}, but no write had started by {by}"),
            c => format!("read v{v} at {at}, but the newest write started by {by} is v{c}"),
        };
        return Some(r.violation("future_read", d));
    }
    if !opts.acked_writes_durable {
        return None;
    }
    let acked = w.acked_by(r.op.start_us).filter(|a| v < a.version)?;
    let d = format!(
        "read {seen} at {at}, but v{} was acknowledged (not yet flushed) at {}",
        acked.version,
        secs(acked.ack_us)
    );
    Some(r.too_old(d))
}

fn seen_name(v: u64) -> String {
    match v {
        0 => "zeroes".to_string(),
        v => format!("v{v}"),
    }
}

/// `12.345 s`: run-relative microseconds as the report shows them.
fn secs(us: u64) -> String {
    format!("{:.3} s", us as f64 / 1e6)
}

/// Distinct acknowledged versions of a block that a read started after the ack confirmed
/// (it returned that version or a newer one). `reads` are (start_us, version seen).
fn count_verified(w: &BlockWrites, reads: Option<&mut [(u64, u64)]>) -> u64 {
    let Some(reads) = reads else { return 0 };
    reads.sort_unstable();
    // newest[i]: the highest version seen by reads[i..].
    let mut newest = vec![0u64; reads.len() + 1];
    for i in (0..reads.len()).rev() {
        newest[i] = newest[i + 1].max(reads[i].1);
    }
    let mut acked: Vec<(u64, u64)> = w.acked.iter().map(|&(t, v, _)| (v, t)).collect();
    acked.sort_unstable();
    acked.dedup_by_key(|&mut (v, _)| v);
    acked
        .iter()
        .filter(|&&(v, ack)| newest[reads.partition_point(|&(s, _)| s < ack)] >= v)
        .count() as u64
}

/// RTO (recovery time) of each fault, in ms: the longest interval without any successful
/// operation (on any connection) that overlaps the fault's window, from its start to
/// [`RTO_TAIL_US`] after its end, or to the start of the next fault if that is sooner (a
/// gap the next fault causes is that fault's).
///
/// Why this shape: an outage caused by a fault can start a little before the fault is
/// recorded (the injection takes effect while being recorded) and last well after it is
/// undone (elections, reconnects), so the whole gap that touches the window counts, not just
/// its part inside. Intervals run between completions of successful operations, from the
/// first operation's start to the last operation's end, so a run that stops while still
/// failing is clipped there instead of counting until the fault's window closes. The final
/// verification's reads are left out: they come after the workload and would make the
/// pause before them look like an outage. With no gap longer than the usual spacing of
/// operations the RTO is just that spacing, a few ms.
pub fn fault_rtos(ops: &[OpRecord], faults: &[FaultRecord]) -> Vec<FaultRto> {
    let gaps = Gaps::new(ops);
    let mut starts: Vec<u64> = faults.iter().map(|f| f.start_us).collect();
    starts.sort_unstable();
    faults
        .iter()
        .map(|f| {
            let tail = f.end_us.unwrap_or(f.start_us).max(f.start_us) + RTO_TAIL_US;
            let next = starts
                .iter()
                .copied()
                .find(|s| *s > f.start_us)
                .unwrap_or(u64::MAX);
            let until = tail.min(next);
            FaultRto {
                kind: f.kind.clone(),
                target: f.target.clone(),
                start_us: f.start_us,
                rto_ms: gaps.longest_overlapping(f.start_us, until).div_ceil(1000),
            }
        })
        .collect()
}

/// The intervals between successful completions: gap i is `bounds[i]..bounds[i + 1]`.
struct Gaps {
    bounds: Vec<u64>,
    longest: MaxTree,
}

impl Gaps {
    fn new(ops: &[OpRecord]) -> Gaps {
        let work = || ops.iter().filter(|o| o.conn != FINAL_VERIFY_CONN);
        let (Some(first), Some(last)) = (
            work().map(|o| o.start_us).min(),
            work().map(|o| o.end_us.max(o.start_us)).max(),
        ) else {
            return Gaps {
                bounds: Vec::new(),
                longest: MaxTree::new(&[]),
            };
        };
        let mut bounds = vec![first];
        bounds.extend(
            work()
                .filter(|o| o.ok())
                .map(|o| o.end_us.clamp(first, last)),
        );
        bounds.push(last);
        bounds.sort_unstable();
        let lengths: Vec<u64> = bounds.windows(2).map(|p| p[1] - p[0]).collect();
        Gaps {
            bounds,
            longest: MaxTree::new(&lengths),
        }
    }

    /// Longest gap overlapping `from..until` (µs).
    fn longest_overlapping(&self, from: u64, until: u64) -> u64 {
        let Some(n) = self.bounds.len().checked_sub(1) else {
            return 0;
        };
        // First gap ending after `from`, and the gaps starting before `until`.
        let lo = self.bounds[1..].partition_point(|&b| b <= from);
        let hi = self.bounds.partition_point(|&a| a < until).min(n);
        if lo >= hi {
            return 0;
        }
        self.longest.max(lo, hi)
    }
}

/// Range maximum over a fixed array (an iterative segment tree): many faults may each span
/// a large share of a long run.
struct MaxTree {
    n: usize,
    t: Vec<u64>,
}

impl MaxTree {
    fn new(values: &[u64]) -> MaxTree {
        let n = values.len();
        let mut t = vec![0; 2 * n];
        t[n..].copy_from_slice(values);
        for i in (1..n).rev() {
            t[i] = t[2 * i].max(t[2 * i + 1]);
        }
        MaxTree { n, t }
    }

    /// Maximum of `values[l..r]`.
    fn max(&self, l: usize, r: usize) -> u64 {
        let (mut l, mut r, mut m) = (l + self.n, r + self.n, 0);
        while l < r {
            if l & 1 == 1 {
                m = m.max(self.t[l]);
                l += 1;
            }
            if r & 1 == 1 {
                r -= 1;
                m = m.max(self.t[r]);
            }
            l /= 2;
            r /= 2;
        }
        m
    }
}

#[cfg(test)]
mod fault_tests {
    use super::*;
    use crate::history::FaultRecord;

    #[test]
    fn a_scheduled_fault_that_was_not_applied_fails_the_run() {
        let fault = |applied, scheduled| FaultRecord {
            kind: "kill_leader".into(),
            target: "-".into(),
            start_us: 1,
            end_us: Some(2),
            note: Some("not applied: the volume has no leader to kill".into()),
            applied,
            scheduled,
        };
        let h = History {
            faults: vec![fault(true, true), fault(true, false)],
            ..History::default()
        };
        assert!(check(&h).violations.is_empty());
        let h = History {
            faults: vec![fault(true, true), fault(false, true)],
            ..History::default()
        };
        let v = check(&h).violations;
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].kind, "fault_not_applied");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1000;

    fn op(conn: u32, start_ms: u64, end_ms: u64, op: Op, ok: bool) -> OpRecord {
        OpRecord {
            conn,
            vol: 0,
            node: 1,
            start_us: start_ms * MS,
            end_us: end_ms * MS,
            op,
            error: (!ok).then(|| "timeout".to_string()),
        }
    }

    fn write(conn: u32, block: u64, version: u64, start: u64, end: u64) -> OpRecord {
        op(conn, start, end, Op::Write { block, version }, true)
    }

    fn failed_write(conn: u32, block: u64, version: u64, start: u64, end: u64) -> OpRecord {
        op(conn, start, end, Op::Write { block, version }, false)
    }

    fn read(conn: u32, block: u64, seen: Seen, start: u64, end: u64) -> OpRecord {
        op(conn, start, end, Op::Read { block, seen }, true)
    }

    fn read_v(conn: u32, block: u64, version: u64, start: u64, end: u64) -> OpRecord {
        read(conn, block, Seen::Version { version }, start, end)
    }

    fn flush(conn: u32, start: u64, end: u64) -> OpRecord {
        op(conn, start, end, Op::Flush, true)
    }

    fn history(ops: Vec<OpRecord>) -> History {
        History {
            ops,
            ..History::default()
        }
    }

    fn kinds(r: &CheckResult) -> Vec<&str> {
        r.violations.iter().map(|v| v.kind.as_str()).collect()
    }

    fn lax() -> CheckOptions {
        CheckOptions {
            acked_writes_durable: false,
        }
    }

    #[test]
    fn clean_history_has_no_violations() {
        let h = history(vec![
            write(0, 7, 1, 0, 10),
            flush(0, 20, 30),
            read_v(1, 7, 1, 40, 50),
            write(0, 7, 2, 60, 70),
            read_v(1, 7, 2, 80, 90),
            read(1, 8, Seen::Zero, 80, 90),
            read_v(FINAL_VERIFY_CONN, 7, 2, 200, 210),
        ]);
        let r = check(&h);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(r.writes_acked, 2);
        assert_eq!(r.writes_failed, 0);
        assert_eq!(r.writes_verified, 2);
        assert_eq!(r.reads_checked, 4);
        assert_eq!(r.flushes_ok, 1);
    }

    #[test]
    fn lost_flushed_write_in_final_verification() {
        let h = history(vec![
            write(0, 17, 1, 0, 10),
            write(0, 17, 2, 10, 20),
            flush(0, 30, 40),
            read_v(FINAL_VERIFY_CONN, 17, 1, 100, 110),
        ]);
        for opts in [CheckOptions::default(), lax()] {
            let r = check_with(&h, opts);
            assert_eq!(kinds(&r), ["lost_write"]);
            let d = &r.violations[0].detail;
            assert!(d.contains("vol 0 block 17: "), "{d}");
            assert!(
                d.contains("read v1 at 0.100 s, but v2 was flushed at 0.040 s"),
                "{d}"
            );
            assert_eq!(r.writes_verified, 1);
        }
    }

    #[test]
    fn torn_and_foreign_blocks() {
        let foreign = Seen::Foreign {
            volume: 1,
            block: 3,
            seed: 9,
            version: 1,
        };
        let h = history(vec![
            write(0, 1, 1, 0, 10),
            read(1, 1, Seen::Torn, 20, 30),
            read(1, 1, foreign, 40, 50),
        ]);
        let r = check(&h);
        assert_eq!(kinds(&r), ["torn_block", "foreign_block"]);
        assert_eq!(r.writes_verified, 0);
    }

    #[test]
    fn a_torn_block_is_allowed_only_while_a_write_of_it_is_in_flight() {
        let h = history(vec![
            write(0, 1, 1, 0, 10),
            write(0, 1, 2, 20, 30),
            read(1, 1, Seen::Torn, 25, 35), // overlaps v2's write
            read(1, 1, Seen::Torn, 31, 40), // after it: damage
            failed_write(0, 2, 1, 50, 60),
            read(1, 2, Seen::Torn, 100, 110), // the failed write may land any time
        ]);
        let r = check(&h);
        assert_eq!(kinds(&r), ["torn_block"]);
        assert_eq!(
            (r.violations[0].block, r.violations[0].at_us),
            (Some(1), 31_000),
            "{:?}",
            r.violations
        );
    }

    #[test]
    fn in_doubt_write_may_or_may_not_be_seen() {
        let h = history(vec![
            write(0, 1, 1, 0, 10),
            flush(0, 10, 20),
            failed_write(0, 1, 2, 20, 30),
            read_v(1, 1, 2, 40, 50),
            read_v(1, 1, 1, 60, 70),
            read_v(FINAL_VERIFY_CONN, 1, 2, 100, 110),
        ]);
        let r = check(&h);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(
            (r.writes_acked, r.writes_failed, r.writes_verified),
            (1, 1, 1)
        );
    }

    #[test]
    fn a_version_never_written_is_a_future_read() {
        let h = history(vec![
            write(0, 1, 1, 0, 10),
            // v2 starts only after this read ended.
            read_v(1, 1, 2, 12, 15),
            write(0, 1, 2, 20, 30),
            read_v(1, 2, 1, 40, 50),
        ]);
        let r = check_with(&h, lax());
        assert_eq!(kinds(&r), ["future_read", "future_read"]);
        assert!(r.violations[0]
            .detail
            .contains("the newest write started by 0.015 s is v1"));
        assert!(r.violations[1].detail.contains("no write had started"));
    }

    #[test]
    fn read_concurrent_with_a_write_may_see_either() {
        let h = history(vec![
            write(0, 1, 1, 0, 10),
            write(0, 1, 2, 20, 30),
            read_v(1, 1, 2, 5, 25),
            read_v(1, 1, 1, 25, 35),
        ]);
        let r = check(&h);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
    }

    #[test]
    fn stale_read_after_flush_on_another_connection() {
        let h = history(vec![
            write(0, 4, 1, 0, 10),
            write(0, 4, 2, 10, 20),
            flush(1, 25, 35),
            read_v(2, 4, 1, 40, 50),
            read(2, 4, Seen::Zero, 60, 70),
        ]);
        for opts in [CheckOptions::default(), lax()] {
            let r = check_with(&h, opts);
            assert_eq!(kinds(&r), ["stale_read", "stale_read"]);
            assert!(r.violations[0].detail.contains("flushed at 0.035 s"));
            assert!(r.violations[1].detail.contains("read zeroes at 0.060 s"));
        }
    }

    #[test]
    fn flush_started_before_the_ack_does_not_cover_it() {
        let h = history(vec![
            write(0, 4, 1, 0, 10),
            write(0, 4, 2, 10, 30),
            flush(1, 25, 35),
            read_v(2, 4, 1, 40, 50),
        ]);
        assert_eq!(kinds(&check_with(&h, lax())), Vec::<&str>::new());
        // A flush of another volume covers nothing of this one either.
        let mut h = history(vec![
            write(0, 4, 1, 0, 10),
            flush(1, 25, 35),
            read(2, 4, Seen::Zero, 40, 50),
        ]);
        h.ops[1].vol = 1;
        assert!(check_with(&h, lax()).violations.is_empty());
    }

    #[test]
    fn acked_but_unflushed_write_is_checked_only_when_asked() {
        let h = history(vec![
            write(0, 4, 1, 0, 10),
            write(0, 4, 2, 10, 20),
            read_v(2, 4, 1, 40, 50),
            read_v(FINAL_VERIFY_CONN, 4, 1, 100, 110),
        ]);
        let r = check(&h);
        assert_eq!(kinds(&r), ["stale_read", "lost_write"]);
        let d = &r.violations[0].detail;
        assert!(
            d.contains("read v1 at 0.040 s, but v2 was acknowledged (not yet flushed) at 0.020 s"),
            "{d}"
        );
        assert!(check_with(&h, lax()).violations.is_empty());
    }

    #[test]
    fn rto_is_the_longest_gap_around_the_fault() {
        // One op every 10 ms for 50 s, all successful but from 40.000 s to 42.500 s.
        let mut ops = Vec::new();
        for i in 0..5000u64 {
            let t = i * 10;
            if (40_000..42_500).contains(&t) {
                ops.push(failed_write(0, 1, i + 1, t, t + 5));
            } else {
                ops.push(write(0, 1, i + 1, t, t + 5));
            }
        }
        // The final verification long after does not make a gap.
        ops.push(read_v(FINAL_VERIFY_CONN, 1, 5000, 90_000, 90_010));
        let fault = |start_ms: u64, end_ms: Option<u64>| FaultRecord {
            kind: "kill_node".into(),
            target: "node 2".into(),
            start_us: start_ms * MS,
            end_us: end_ms.map(|e| e * MS),
            note: None,
            applied: true,
            scheduled: true,
        };
        let h = History {
            ops,
            faults: vec![
                fault(40_200, Some(41_000)),
                fault(1000, Some(2000)),
                fault(5000, None),
                fault(20_000, None),
                fault(70_000, None),
            ],
            lag: Vec::new(),
            failovers: Vec::new(),
        };
        let rto: Vec<u64> = check(&h).rto.iter().map(|r| r.rto_ms).collect();
        // The last success before the outage ends at 39.995 s, the next at 42.505 s; the
        // fault at 20 s reaches it with its 30 s tail; the last one comes after the run.
        assert_eq!(rto, [2510, 10, 10, 2510, 0]);
        assert!(check(&History::default()).rto.is_empty());
    }

    #[test]
    fn max_tree_matches_a_scan() {
        let mut rng = fastrand::Rng::with_seed(7);
        let values: Vec<u64> = (0..37).map(|_| rng.u64(0..1000)).collect();
        let t = MaxTree::new(&values);
        for l in 0..values.len() {
            for r in l + 1..=values.len() {
                assert_eq!(t.max(l, r), *values[l..r].iter().max().unwrap());
            }
        }
    }

    /// A random history of a correct (linearizable) store: every operation takes effect at
    /// one instant inside its interval; failed writes land or not.
    fn random_correct_history(rng: &mut fastrand::Rng) -> History {
        let conns = rng.u32(1..5);
        let blocks = rng.u64(1..6);
        let mut ops: Vec<(u64, OpRecord, bool)> = Vec::new(); // (effect time, op, lands)
        for conn in 0..conns {
            let mut t = rng.u64(0..5);
            let mut next = vec![1u64; blocks as usize];
            let mine: Vec<u64> = (0..blocks)
                .filter(|b| b % conns as u64 == conn as u64)
                .collect();
            for _ in 0..rng.usize(0..60) {
                let start = t + rng.u64(0..5);
                let effect = start + rng.u64(0..20);
                let end = effect + rng.u64(0..20);
                t = end;
                let rec = match rng.u8(0..10) {
                    0..=3 if !mine.is_empty() => {
                        let block = mine[rng.usize(0..mine.len())];
                        let version = next[block as usize];
                        next[block as usize] += 1;
                        let ok = rng.u8(0..8) != 0;
                        let w = op(conn, start, end, Op::Write { block, version }, ok);
                        (effect, w, ok || rng.bool())
                    }
                    4 => (
                        effect,
                        op(conn, start, end, Op::Flush, rng.u8(0..4) != 0),
                        true,
                    ),
                    _ => {
                        let block = rng.u64(0..blocks);
                        (effect, read(conn, block, Seen::Zero, start, end), true)
                    }
                };
                ops.push(rec);
            }
        }
        ops.sort_by_key(|(effect, o, _)| (*effect, o.conn));
        let mut state = vec![0u64; blocks as usize];
        let last = ops.iter().map(|(_, o, _)| o.end_us).max().unwrap_or(0);
        let mut out = Vec::new();
        for (_, mut o, lands) in ops {
            match &mut o.op {
                Op::Write { block, version } if lands => state[*block as usize] = *version,
                Op::Read { block, seen } => {
                    *seen = match state[*block as usize] {
                        0 => Seen::Zero,
                        version => Seen::Version { version },
                    }
                }
                _ => {}
            }
            out.push(o);
        }
        for b in 0..blocks {
            let seen = match state[b as usize] {
                0 => Seen::Zero,
                version => Seen::Version { version },
            };
            let mut r = read(FINAL_VERIFY_CONN, b, seen, 0, 1);
            (r.start_us, r.end_us) = (last + MS, last + 2 * MS);
            out.push(r);
        }
        rng.shuffle(&mut out);
        history(out)
    }

    #[test]
    fn random_correct_histories_pass() {
        for seed in 0..300 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let h = random_correct_history(&mut rng);
            let r = check(&h);
            assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
            assert_eq!(
                found(&r),
                found(&reference(&h, CheckOptions::default())),
                "seed {seed}"
            );
        }
    }

    /// The checker's definitions, spelled out in O(n²).
    fn reference(h: &History, opts: CheckOptions) -> CheckResult {
        let writes: Vec<(&OpRecord, u64, u64)> = h
            .ops
            .iter()
            .filter_map(|o| match o.op {
                Op::Write { block, version } => Some((o, block, version)),
                _ => None,
            })
            .collect();
        let flushes: Vec<&OpRecord> = h
            .ops
            .iter()
            .filter(|o| o.ok() && o.op == Op::Flush)
            .collect();
        let mut res = CheckResult::default();
        for o in &h.ops {
            let Op::Read { block, seen } = &o.op else {
                continue;
            };
            if !o.ok() {
                continue;
            }
            let same = || writes.iter().filter(|w| w.0.vol == o.vol && w.1 == *block);
            let floor = same()
                .filter(|w| w.0.ok())
                .filter(|w| {
                    flushes.iter().any(|f| {
                        f.vol == o.vol && w.0.end_us <= f.start_us && f.end_us <= o.start_us
                    })
                })
                .map(|w| w.2)
                .max()
                .unwrap_or(0);
            let ceiling = same()
                .filter(|w| w.0.start_us <= o.end_us)
                .map(|w| w.2)
                .max()
                .unwrap_or(0);
            let acked = same()
                .filter(|w| w.0.ok() && w.0.end_us <= o.start_us)
                .map(|w| w.2)
                .max()
                .unwrap_or(0);
            let old = if o.conn == FINAL_VERIFY_CONN {
                "lost_write"
            } else {
                "stale_read"
            };
            let overlapped =
                same().any(|w| w.0.start_us <= o.end_us && (!w.0.ok() || w.0.end_us >= o.start_us));
            let kind = match seen {
                Seen::Torn if overlapped => None,
                Seen::Torn => Some("torn_block"),
                Seen::Foreign { .. } => Some("foreign_block"),
                Seen::Zero if floor > 0 => Some(old),
                Seen::Version { version: v } if *v < floor => Some(old),
                Seen::Version { version: v } if *v > ceiling => Some("future_read"),
                Seen::Zero | Seen::Version { .. } if opts.acked_writes_durable => {
                    let v = match seen {
                        Seen::Version { version } => *version,
                        _ => 0,
                    };
                    (v < acked).then_some(old)
                }
                _ => None,
            };
            if let Some(kind) = kind {
                res.violations.push(Violation {
                    kind: kind.into(),
                    vol: o.vol,
                    block: Some(*block),
                    at_us: o.start_us,
                    detail: String::new(),
                });
            }
        }
        res
    }

    /// Violations without their details, for comparing with [`reference`].
    fn found(r: &CheckResult) -> Vec<(u64, u32, Option<u64>, String)> {
        let mut v: Vec<_> = r
            .violations
            .iter()
            .map(|v| (v.at_us, v.vol, v.block, v.kind.clone()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn random_corrupted_histories_match_the_reference() {
        let mut seen_kinds = HashMap::<String, u32>::new();
        for seed in 0..300 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut h = random_correct_history(&mut rng);
            for o in h.ops.iter_mut() {
                if let Op::Read { seen, .. } = &mut o.op {
                    *seen = match rng.u8(0..20) {
                        0 => Seen::Torn,
                        1 => Seen::Zero,
                        2 => Seen::Version {
                            version: rng.u64(1..30),
                        },
                        3 => match seen {
                            Seen::Version { version } if *version > 1 => Seen::Version {
                                version: *version - 1,
                            },
                            _ => seen.clone(),
                        },
                        _ => seen.clone(),
                    };
                }
            }
            for opts in [CheckOptions::default(), lax()] {
                let r = check_with(&h, opts);
                assert_eq!(
                    found(&r),
                    found(&reference(&h, opts)),
                    "seed {seed} {opts:?}"
                );
                for v in &r.violations {
                    *seen_kinds.entry(v.kind.clone()).or_default() += 1;
                }
            }
        }
        for kind in ["torn_block", "stale_read", "lost_write", "future_read"] {
            assert!(
                seen_kinds.get(kind).copied().unwrap_or(0) > 10,
                "{kind}: {seen_kinds:?}"
            );
        }
    }

    #[test]
    fn writes_verified_matches_the_definition() {
        for seed in 0..200 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut h = random_correct_history(&mut rng);
            // Drop some reads so that not every write is confirmed.
            h.ops
                .retain(|o| !matches!(o.op, Op::Read { .. }) || rng.bool());
            let mut verified = std::collections::HashSet::new();
            for w in h.ops.iter().filter(|o| o.ok()) {
                let Op::Write { block, version } = w.op else {
                    continue;
                };
                let confirmed = h.ops.iter().any(|r| match &r.op {
                    Op::Read {
                        block: b,
                        seen: Seen::Version { version: v },
                    } => r.ok() && *b == block && r.start_us >= w.end_us && *v >= version,
                    _ => false,
                });
                if confirmed {
                    verified.insert((w.vol, block, version));
                }
            }
            assert_eq!(
                check(&h).writes_verified,
                verified.len() as u64,
                "seed {seed}"
            );
        }
    }

    #[test]
    fn violations_are_capped() {
        let mut ops = vec![write(0, 1, 1, 0, 1)];
        for i in 0..(MAX_VIOLATIONS as u64 + 5) {
            ops.push(read(1, 1, Seen::Torn, 10 + i, 11 + i));
        }
        let r = check(&history(ops));
        assert_eq!(r.violations.len(), MAX_VIOLATIONS);
        assert_eq!(r.violations_omitted, 5);
    }

    #[test]
    #[ignore = "timing: run with --ignored --nocapture in release"]
    fn a_million_ops() {
        let mut rng = fastrand::Rng::with_seed(1);
        let mut ops = Vec::new();
        let mut versions = vec![0u64; 20_000];
        for i in 0..1_000_000u64 {
            let block = rng.u64(0..20_000);
            let (start, end) = (i * 10, i * 10 + 8);
            ops.push(match i % 50 {
                0 => flush(0, start, end),
                1..=20 => {
                    versions[block as usize] += 1;
                    write(0, block, versions[block as usize], start, end)
                }
                _ => read_v(1, block, versions[block as usize].max(1), start, end),
            });
        }
        let h = history(ops);
        let t = std::time::Instant::now();
        let r = check(&h);
        println!("checked {} ops in {:?}", h.ops.len(), t.elapsed());
        assert_eq!(r.reads_checked, 580_000);
    }

    fn failover(after_ms: Option<u64>, serving_ms: u64, present: Vec<(u64, u64)>) -> FailoverEvent {
        FailoverEvent {
            vol: 0,
            from: "osaka".into(),
            old_home_nodes: vec![1],
            lost_us: 100 * MS,
            to: "hokkaido".into(),
            source_site: "hokkaido".into(),
            executed_us: 110 * MS,
            serving_us: serving_ms * MS,
            rejoined_us: None,
            lossless: after_ms.is_none(),
            after_us: after_ms.map(|a| a * MS),
            present,
        }
    }

    fn on(node: u64, mut o: OpRecord) -> OpRecord {
        o.node = node;
        o
    }

    #[test]
    fn a_failover_may_lose_what_was_acknowledged_after_its_stated_time_and_nothing_else() {
        // Block 1: v1 at 10 ms, v2 at 60 ms (after the stated 50 ms); the new home has v1.
        let ops = vec![
            on(1, write(0, 1, 1, 5, 10)),
            on(1, flush(0, 11, 12)),
            on(1, write(0, 1, 2, 55, 60)),
            on(1, flush(0, 61, 62)),
            on(4, read_v(0, 1, 1, 200, 201)),
        ];
        let mut h = history(ops.clone());
        h.failovers = vec![failover(Some(50), 120, vec![(1, 1)])];
        let r = check(&h);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        // Without the failover the same read is a lost flushed write.
        let r = check(&history(ops.clone()));
        assert_eq!(kinds(&r), ["stale_read"]);
        // A stated time after v2's acknowledgement: v2 should have been kept.
        let mut h = history(ops);
        h.failovers = vec![failover(Some(70), 120, vec![(1, 1)])];
        assert!(kinds(&check(&h)).contains(&"lost_beyond_rpo"));
    }

    #[test]
    fn a_lossless_failover_keeps_everything_and_the_old_home_acknowledges_nothing_after() {
        let ops = vec![
            on(1, write(0, 1, 1, 5, 10)),
            on(1, write(0, 1, 2, 55, 60)),
            on(1, write(0, 2, 1, 125, 130)),
        ];
        let mut h = history(ops);
        h.failovers = vec![failover(None, 120, vec![(1, 1), (2, 0)])];
        let r = check(&h);
        let k = kinds(&r);
        assert!(k.contains(&"lost_beyond_rpo"), "{k:?}");
        assert!(k.contains(&"acked_by_fenced_generation"), "{k:?}");
    }

    #[test]
    fn the_lag_reported_before_the_loss_bounds_it() {
        let ops = vec![
            on(1, write(0, 1, 1, 5, 10)),
            on(1, write(0, 1, 2, 20, 30)),
            on(1, write(0, 1, 3, 85, 90)),
        ];
        let mut h = history(ops);
        h.failovers = vec![failover(Some(0), 120, vec![(1, 1)])];
        // Sampled at 95 ms, 50 ms behind: writes acknowledged before 45 ms must be kept.
        h.lag = vec![LagSample {
            t_us: 95 * MS,
            vol: 0,
            site: "hokkaido".into(),
            bytes: 0,
            entries: 2,
            seconds_ms: 50,
        }];
        let r = check(&h);
        let k = kinds(&r);
        assert_eq!(k, ["loss_beyond_reported_lag"], "v2 (30 ms) is gone");
        h.lag[0].seconds_ms = 80;
        assert!(check(&h).violations.is_empty());
    }
}
