//! The I/O-free core of one directed link: a bottleneck queue with a token bucket, then a
//! delay line. Time enters as an argument; the caller (the link task in `link`) sleeps
//! until [`Shaper::poll`]'s answer and moves the chunks it returns.
//!
//! The model is a router in front of a long cable:
//! 1. `push`: a chunk read from a socket joins the FIFO of chunks waiting for the link.
//!    Its propagation delay (`delay` + a jitter sample) is drawn now, so a delay change
//!    applies to chunks read after it.
//! 2. departure: the head of the FIFO leaves when the bucket holds enough tokens (and the
//!    link is not held). One FIFO for all connections is what shares the bandwidth.
//! 3. arrival: a departed chunk is delivered at `departure + its delay`, but never before
//!    the previous chunk of its connection, so bytes of one stream are never reordered.
//!
//! Byte accounting and backpressure are not here: the caller bounds what it pushes
//! (`budget`), and a chunk's payload carries its permits.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::params::{LinkParams, Partition};

/// Identifies one proxied connection within a [`crate::Wan`].
pub type ConnId = u64;

/// SplitMix64: a tiny seeded generator, plenty for jitter, and stable across releases so
/// that a seed replays the same jitter sequence.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, max]` (modulo bias is irrelevant at nanosecond resolution).
    pub fn duration_up_to(&mut self, max: Duration) -> Duration {
        let max_ns = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        if max_ns == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.next_u64() % (max_ns + 1))
    }
}

/// A chunk waiting for the link.
struct Waiting<T> {
    conn: ConnId,
    len: u64,
    propagation: Duration,
    item: T,
}

/// A chunk in the delay line, ordered by arrival, then by push order.
struct InFlight<T> {
    arrival: Instant,
    seq: u64,
    conn: ConnId,
    item: T,
}

impl<T> PartialEq for InFlight<T> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl<T> Eq for InFlight<T> {}
impl<T> PartialOrd for InFlight<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for InFlight<T> {
    /// Reversed, so that `BinaryHeap` (a max-heap) pops the earliest arrival first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.arrival, other.seq).cmp(&(self.arrival, self.seq))
    }
}

/// One directed link's scheduler. `T` is the payload (the link task uses the chunk with
/// its permits; tests use plain numbers).
pub struct Shaper<T> {
    params: LinkParams,
    rng: SplitMix64,
    /// Tokens in bytes; negative after a chunk larger than the bucket left (debt).
    tokens: f64,
    /// When `tokens` was last brought up to date.
    refilled_at: Instant,
    waiting: VecDeque<Waiting<T>>,
    in_flight: BinaryHeap<InFlight<T>>,
    /// Arrival time of each connection's latest departed chunk (the no-reorder floor).
    last_arrival: HashMap<ConnId, Instant>,
    /// Push counter; ties in arrival time are broken by it.
    seq: u64,
}

impl<T> Shaper<T> {
    pub fn new(params: LinkParams, seed: u64, now: Instant) -> Self {
        let tokens = params.bucket_capacity_bytes().unwrap_or(0) as f64;
        Shaper {
            params,
            rng: SplitMix64::new(seed),
            tokens,
            refilled_at: now,
            waiting: VecDeque::new(),
            in_flight: BinaryHeap::new(),
            last_arrival: HashMap::new(),
            seq: 0,
        }
    }

    /// Chunks inside the link (waiting plus in flight).
    pub fn len(&self) -> usize {
        self.waiting.len() + self.in_flight.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Changes the parameters from `now` on. Tokens earned so far are earned at the old
    /// rate; chunks already pushed keep the delay drawn for them.
    pub fn set_params(&mut self, now: Instant, params: LinkParams) {
        self.refill(now);
        self.params = params;
        if let Some(capacity) = params.bucket_capacity_bytes() {
            self.tokens = self.tokens.min(capacity as f64);
        }
    }

    /// A chunk of `len` bytes of connection `conn` enters the link. A
    /// zero-length chunk (end of stream) takes no tokens but keeps its place in line.
    pub fn push(&mut self, conn: ConnId, len: u64, item: T) {
        let propagation = self.params.delay + self.rng.duration_up_to(self.params.jitter);
        self.waiting.push_back(Waiting {
            conn,
            len,
            propagation,
            item,
        });
    }

    /// Drops every chunk of `conn` (its connection is gone) and returns them.
    pub fn forget(&mut self, conn: ConnId) -> Vec<T> {
        self.last_arrival.remove(&conn);
        let mut dropped = Vec::new();
        let waiting = std::mem::take(&mut self.waiting);
        for w in waiting {
            if w.conn == conn {
                dropped.push(w.item);
            } else {
                self.waiting.push_back(w);
            }
        }
        let in_flight = std::mem::take(&mut self.in_flight);
        for f in in_flight.into_vec() {
            if f.conn == conn {
                dropped.push(f.item);
            } else {
                self.in_flight.push(f);
            }
        }
        dropped
    }

    /// Moves time to `now`: chunks whose tokens are there depart, chunks whose arrival
    /// time has come are appended to `arrived` (in arrival order). Returns when to call
    /// again at the latest (`None`: nothing will happen until the next push or change).
    pub fn poll(&mut self, now: Instant, arrived: &mut Vec<(ConnId, T)>) -> Option<Instant> {
        let next_departure = self.depart(now);
        while let Some(head) = self.in_flight.peek() {
            if head.arrival > now {
                break;
            }
            let Some(f) = self.in_flight.pop() else {
                break;
            };
            arrived.push((f.conn, f.item));
        }
        let next_arrival = self.in_flight.peek().map(|f| f.arrival);
        match (next_departure, next_arrival) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Lets waiting chunks depart as tokens allow; returns when the head can go, if it
    /// is blocked by tokens (not if the link is held: only a change releases that).
    fn depart(&mut self, now: Instant) -> Option<Instant> {
        if self.params.partition != Partition::None {
            return None;
        }
        self.refill(now);
        while let Some(head) = self.waiting.front() {
            if let (Some(rate), Some(capacity)) = (
                self.params.bandwidth_bytes_per_sec,
                self.params.bucket_capacity_bytes(),
            ) {
                // A chunk bigger than the bucket (the rate dropped after it was read)
                // leaves with a full bucket and leaves debt behind.
                let need = head.len.min(capacity) as f64;
                if self.tokens < need {
                    let wait_secs = (need - self.tokens) / rate as f64;
                    // Round up to whole microseconds so that the wake-up is not early.
                    let wait = Duration::from_micros((wait_secs * 1e6).ceil() as u64);
                    return Some(now + wait.max(Duration::from_micros(1)));
                }
                self.tokens -= head.len as f64;
            }
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            let floor = self.last_arrival.get(&w.conn).copied();
            let arrival = match floor {
                Some(floor) => floor.max(now + w.propagation),
                None => now + w.propagation,
            };
            self.last_arrival.insert(w.conn, arrival);
            self.seq += 1;
            self.in_flight.push(InFlight {
                arrival,
                seq: self.seq,
                conn: w.conn,
                item: w.item,
            });
        }
        None
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled_at);
        self.refilled_at = self.refilled_at.max(now);
        if let (Some(rate), Some(capacity)) = (
            self.params.bandwidth_bytes_per_sec,
            self.params.bucket_capacity_bytes(),
        ) {
            self.tokens = (self.tokens + rate as f64 * elapsed.as_secs_f64()).min(capacity as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Runs the shaper in virtual time until it is empty; returns (arrival, conn, item).
    fn drain(s: &mut Shaper<u64>, start: Instant, limit: Duration) -> Vec<(Instant, ConnId, u64)> {
        let mut now = start;
        let mut out = Vec::new();
        let mut arrived = Vec::new();
        while !s.is_empty() {
            assert!(now - start < limit, "shaper did not drain");
            let next = s.poll(now, &mut arrived);
            for (conn, item) in arrived.drain(..) {
                out.push((now, conn, item));
            }
            match next {
                Some(t) => {
                    assert!(t > now, "poll must move forward");
                    now = t;
                }
                None => break,
            }
        }
        out
    }

    fn params(delay_ms: u64, jitter_ms: u64, rate: Option<u64>) -> LinkParams {
        LinkParams {
            delay: Duration::from_millis(delay_ms),
            jitter: Duration::from_millis(jitter_ms),
            bandwidth_bytes_per_sec: rate,
            ..LinkParams::default()
        }
    }

    #[test]
    fn delay_only() {
        let t0 = Instant::now();
        let mut s = Shaper::new(params(15, 0, None), 1, t0);
        s.push(1, 100, 0);
        let out = drain(&mut s, t0, Duration::from_secs(1));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, t0 + 15 * MS);
    }

    #[test]
    fn jitter_stays_in_range_and_never_reorders() {
        let t0 = Instant::now();
        let mut s = Shaper::new(params(10, 20, None), 7, t0);
        // Two chunks per connection: the second never overtakes the first. (With many
        // chunks per connection, the no-reorder floor makes later ones converge to the
        // largest delay drawn so far, which would hide the spread.)
        for i in 0..1000u64 {
            s.push(1 + i % 500, 10, i);
        }
        let out = drain(&mut s, t0, Duration::from_secs(1));
        assert_eq!(out.len(), 1000);
        let mut last: HashMap<ConnId, u64> = HashMap::new();
        let mut spread = (Duration::MAX, Duration::ZERO);
        for (at, conn, item) in out {
            let d = at - t0;
            assert!(d >= 10 * MS && d <= 30 * MS, "arrival {d:?}");
            spread = (spread.0.min(d), spread.1.max(d));
            if let Some(prev) = last.insert(conn, item) {
                assert!(prev < item, "conn {conn}: {item} after {prev}");
            }
        }
        assert!(
            spread.1 - spread.0 > 15 * MS,
            "jitter not visible: {spread:?}"
        );
    }

    #[test]
    fn same_seed_same_jitter() {
        let t0 = Instant::now();
        let run = |seed| {
            let mut s = Shaper::new(params(0, 5, None), seed, t0);
            for i in 0..100 {
                s.push(i, 1, i);
            }
            drain(&mut s, t0, Duration::from_secs(1))
                .into_iter()
                .map(|(at, _, item)| (at - t0, item))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn rate_is_exact_and_shared_fifo() {
        let t0 = Instant::now();
        let rate = 1 << 20; // 1 MiB/s
        let p = params(0, 0, Some(rate));
        let chunk = p.chunk_limit_bytes();
        let mut s = Shaper::new(p, 1, t0);
        let n = 1000u64;
        for i in 0..n {
            s.push(i % 2, chunk, i);
        }
        let out = drain(&mut s, t0, Duration::from_secs(100));
        assert_eq!(out.len() as u64, n);
        // FIFO across connections.
        assert!(out.windows(2).all(|w| w[0].2 < w[1].2));
        let elapsed = out.last().map(|o| o.0 - t0).unwrap_or_default();
        let sent = (n * chunk) as f64 - p.bucket_capacity_bytes().unwrap_or(0) as f64;
        let measured = sent / elapsed.as_secs_f64();
        assert!(
            (measured / rate as f64 - 1.0).abs() < 0.01,
            "rate {measured} vs {rate}"
        );
    }

    #[test]
    fn hold_then_heal_delivers_in_order() {
        let t0 = Instant::now();
        let mut p = params(5, 0, None);
        p.partition = Partition::Hold;
        let mut s = Shaper::new(p, 1, t0);
        for i in 0..10 {
            s.push(1, 100, i);
        }
        let mut arrived = Vec::new();
        assert_eq!(s.poll(t0 + 1000 * MS, &mut arrived), None);
        assert!(arrived.is_empty());
        p.partition = Partition::None;
        let t1 = t0 + 2000 * MS;
        s.set_params(t1, p);
        assert_eq!(s.poll(t1, &mut arrived), Some(t1 + 5 * MS));
        assert_eq!(s.poll(t1 + 5 * MS, &mut arrived), None);
        let items: Vec<u64> = arrived.iter().map(|a| a.1).collect();
        assert_eq!(items, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn rate_change_applies_to_waiting_chunks() {
        let t0 = Instant::now();
        let p = params(0, 0, Some(10_000));
        let mut s = Shaper::new(p, 1, t0);
        let cap = p.bucket_capacity_bytes().unwrap_or(0);
        // Empty the bucket, then queue 100 KB that would take 10 s at 10 KB/s.
        s.push(1, cap, 0);
        for i in 1..=50 {
            s.push(1, 2000, i);
        }
        let mut arrived = Vec::new();
        s.poll(t0, &mut arrived);
        assert_eq!(arrived.len(), 1);
        let faster = params(0, 0, Some(1_000_000));
        s.set_params(t0, faster);
        let out = drain(&mut s, t0, Duration::from_secs(100));
        let elapsed = out.last().map(|o| o.0 - t0).unwrap_or_default();
        assert!(elapsed < 150 * MS, "took {elapsed:?} after speeding up");
    }

    #[test]
    fn delay_change_applies_to_later_chunks_without_reordering() {
        let t0 = Instant::now();
        let mut s = Shaper::new(params(50, 0, None), 1, t0);
        s.push(1, 1, 0);
        s.set_params(t0, params(5, 0, None));
        s.push(1, 1, 1);
        s.push(2, 1, 2);
        let out = drain(&mut s, t0, Duration::from_secs(1));
        let at: HashMap<u64, Duration> = out.iter().map(|o| (o.2, o.0 - t0)).collect();
        assert_eq!(at[&0], 50 * MS);
        // Same connection: waits behind item 0. Other connection: new delay.
        assert_eq!(at[&1], 50 * MS);
        assert_eq!(at[&2], 5 * MS);
    }

    #[test]
    fn forget_drops_only_that_connection() {
        let t0 = Instant::now();
        let mut s = Shaper::new(params(10, 0, None), 1, t0);
        for i in 0..6 {
            s.push(i % 2, 1, i);
        }
        let mut arrived = Vec::new();
        s.poll(t0, &mut arrived); // all depart, in flight
        let mut dropped = s.forget(1);
        dropped.sort();
        assert_eq!(dropped, vec![1, 3, 5]);
        let out = drain(&mut s, t0, Duration::from_secs(1));
        assert_eq!(out.iter().map(|o| o.2).collect::<Vec<_>>(), vec![0, 2, 4]);
    }
}
