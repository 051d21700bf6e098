//! Replication lag of a volume's replicas as its leader sees it: entries, bytes and
//! seconds behind, and the rate at which each replica drains, for the RPO a remote site
//! would lose now and the time it needs to catch up.
//!
//! The leader records every entry it proposes (index, bytes, time). A replica that has
//! `matched` is behind by the entries after it; its age is the time since the oldest of
//! those was proposed. Entries proposed by an earlier leader are not recorded here: their
//! bytes are estimated with the mean entry size and their age counts from when this
//! leader took over. Pure bookkeeping, no I/O; times come from the caller.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::time::Time;

/// Entries remembered; past this the oldest are forgotten (and lag bytes of a replica
/// further behind become an estimate).
pub const LAG_MARKS_MAX: usize = 1 << 16;
/// Weight of the newest rate sample.
const RATE_ALPHA: f64 = 0.3;
/// Rate samples are taken no more often than this.
const RATE_SAMPLE: Duration = Duration::from_millis(500);

/// How far one replica is behind the leader.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Lag {
    pub entries: u64,
    pub bytes: u64,
    /// Age of the oldest entry the replica lacks (0 when it lacks none).
    pub seconds: f64,
    /// Bytes per second the replica has been catching up at lately.
    pub drain_bytes_per_sec: f64,
}

impl Lag {
    /// Seconds to drain at the recent rate, if it is draining.
    pub fn eta_seconds(&self) -> Option<f64> {
        if self.bytes == 0 {
            Some(0.0)
        } else if self.drain_bytes_per_sec > 0.0 {
            Some(self.bytes as f64 / self.drain_bytes_per_sec)
        } else {
            None
        }
    }
}

#[derive(Debug)]
struct Rate {
    matched: u64,
    at: Time,
    bytes_per_sec: f64,
}

#[derive(Debug)]
pub struct LagTracker {
    /// (index, cumulative bytes up to and including it, its bytes, proposed at), by
    /// increasing index.
    marks: VecDeque<(u64, u64, u64, Time)>,
    total: u64,
    /// When this node started recording (became leader).
    since: Time,
    rates: BTreeMap<u64, Rate>,
}

impl LagTracker {
    pub fn new(now: Time) -> LagTracker {
        LagTracker {
            marks: VecDeque::new(),
            total: 0,
            since: now,
            rates: BTreeMap::new(),
        }
    }

    /// Forgets everything (leadership changed: indexes may be reused by the new term).
    pub fn reset(&mut self, now: Time) {
        *self = LagTracker::new(now);
    }

    /// The leader appended entry `index` holding `bytes`.
    pub fn proposed(&mut self, index: u64, bytes: u64, now: Time) {
        // A re-proposal at an index already recorded replaces the tail from there.
        while self.marks.back().is_some_and(|m| m.0 >= index) {
            self.marks.pop_back();
        }
        let base = self.marks.back().map_or(self.total, |m| m.1);
        self.total = base + bytes;
        self.marks.push_back((index, self.total, bytes, now));
        if self.marks.len() > LAG_MARKS_MAX {
            self.marks.pop_front();
        }
    }

    /// Drops marks every replica has (`min_matched` is the smallest match index).
    pub fn shipped_to_all(&mut self, min_matched: u64) {
        while self.marks.len() > 1 && self.marks[1].0 <= min_matched {
            self.marks.pop_front();
        }
    }

    fn mean_entry_bytes(&self) -> f64 {
        match (self.marks.front(), self.marks.back()) {
            (Some(f), Some(b)) => (b.1 - (f.1 - f.2)) as f64 / (b.0 - f.0 + 1) as f64,
            _ => 0.0,
        }
    }

    /// Cumulative bytes up to and including `index` (estimated before the first mark).
    fn bytes_through(&self, index: u64) -> f64 {
        let Some(first) = self.marks.front() else {
            return 0.0;
        };
        if index < first.0 {
            let before_first = (first.1 - first.2) as f64;
            return before_first - (first.0 - 1 - index) as f64 * self.mean_entry_bytes();
        }
        // Marks are dense in index only if every entry was proposed here; search by index.
        let pos = self.marks.partition_point(|m| m.0 <= index);
        self.marks[pos - 1].1 as f64
    }

    /// Lag of a replica at `matched` when the log ends at `last_index`.
    pub fn lag(&self, peer: u64, matched: u64, last_index: u64, now: Time) -> Lag {
        let entries = last_index.saturating_sub(matched);
        let drain = self.rates.get(&peer).map_or(0.0, |r| r.bytes_per_sec);
        if entries == 0 {
            return Lag {
                drain_bytes_per_sec: drain,
                ..Lag::default()
            };
        }
        let end = self.marks.back().map_or(0, |m| m.1) as f64;
        let bytes = (end - self.bytes_through(matched)).max(0.0) as u64;
        let oldest = self
            .marks
            .iter()
            .find(|m| m.0 > matched)
            .map_or(self.since, |m| m.3);
        let oldest = if self.marks.front().is_some_and(|f| f.0 > matched + 1) {
            self.since.min(oldest)
        } else {
            oldest
        };
        Lag {
            entries,
            bytes,
            seconds: now.saturating_duration_since(oldest).as_secs_f64(),
            drain_bytes_per_sec: drain,
        }
    }

    /// Samples how fast `peer` advances (call every tick with its match index).
    pub fn observe(&mut self, peer: u64, matched: u64, now: Time) {
        let through = self.bytes_through(matched);
        let before = self
            .rates
            .get(&peer)
            .map_or(0.0, |r| self.bytes_through(r.matched));
        match self.rates.get_mut(&peer) {
            None => {
                self.rates.insert(
                    peer,
                    Rate {
                        matched,
                        at: now,
                        bytes_per_sec: 0.0,
                    },
                );
            }
            Some(r) => {
                let dt = now.saturating_duration_since(r.at);
                if dt < RATE_SAMPLE {
                    return;
                }
                let moved = if matched > r.matched {
                    (through - before).max(0.0)
                } else {
                    0.0
                };
                let sample = moved / dt.as_secs_f64();
                r.bytes_per_sec = RATE_ALPHA * sample + (1.0 - RATE_ALPHA) * r.bytes_per_sec;
                r.matched = matched;
                r.at = now;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_entries_bytes_and_age() {
        let t0 = Time::ZERO;
        let mut t = LagTracker::new(t0);
        for i in 1..=10u64 {
            t.proposed(i, 1000, t0 + Duration::from_secs(i));
        }
        let now = t0 + Duration::from_secs(20);
        let l = t.lag(2, 4, 10, now);
        assert_eq!(l.entries, 6);
        assert_eq!(l.bytes, 6000);
        // Oldest missing entry is 5, proposed at t0+5.
        assert!((l.seconds - 15.0).abs() < 1e-6, "{l:?}");
        assert_eq!(t.lag(2, 10, 10, now), Lag::default());
        assert_eq!(t.lag(2, 10, 10, now).eta_seconds(), Some(0.0));
    }

    #[test]
    fn rate_and_eta_follow_the_replica() {
        let t0 = Time::ZERO;
        let mut t = LagTracker::new(t0);
        for i in 1..=100u64 {
            t.proposed(i, 1 << 20, t0);
        }
        t.observe(7, 0, t0);
        // 10 MiB in one second.
        t.observe(7, 10, t0 + Duration::from_secs(1));
        let l = t.lag(7, 10, 100, t0 + Duration::from_secs(1));
        assert_eq!(l.bytes, 90 << 20);
        assert!(l.drain_bytes_per_sec > 0.0);
        let eta = l.eta_seconds().unwrap();
        assert!(eta > 0.0 && eta.is_finite());
        // A stalled replica has no ETA once its rate decays to zero... it never reaches
        // zero exactly, but a replica never observed has none.
        assert_eq!(t.lag(9, 10, 100, t0).eta_seconds(), None);
    }

    #[test]
    fn reproposal_replaces_tail_and_marks_are_bounded() {
        let t0 = Time::ZERO;
        let mut t = LagTracker::new(t0);
        t.proposed(1, 10, t0);
        t.proposed(2, 10, t0);
        t.proposed(2, 30, t0);
        assert_eq!(t.lag(1, 0, 2, t0).bytes, 40);
        for i in 3..(LAG_MARKS_MAX as u64 + 100) {
            t.proposed(i, 1, t0);
        }
        assert!(t.marks.len() <= LAG_MARKS_MAX);
        t.shipped_to_all(LAG_MARKS_MAX as u64);
        assert!(t.marks.len() < 200);
    }

    #[test]
    fn entries_before_this_leader_are_estimated() {
        let t0 = Time::ZERO;
        let mut t = LagTracker::new(t0);
        for i in 101..=110u64 {
            t.proposed(i, 100, t0 + Duration::from_secs(1));
        }
        // Replica at 90: 20 entries behind, 10 of them from before this leader.
        let l = t.lag(3, 90, 110, t0 + Duration::from_secs(5));
        assert_eq!(l.entries, 20);
        assert!((1900..=2100).contains(&l.bytes), "{l:?}");
        assert!((l.seconds - 5.0).abs() < 1e-6, "{l:?}");
    }
}
