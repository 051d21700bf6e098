//! Election timeouts drawn from a seed.
//!
//! raft-rs draws each randomized election timeout from a thread-local generator whenever
//! a replica's role, term or leader changes. The core replaces every such draw with one
//! from its own generator, seeded by the driver: a storage node passes something random
//! (its elections stay randomized), the simulation its run's seed (a run replays
//! exactly). Timeouts stay within raft-rs's `[election_tick, 2 × election_tick)`.

use crate::logstore::LogStore;

use super::group::GroupCore;

/// A small xorshift64* generator: enough to spread election timeouts.
pub(super) struct ElectionRng(u64);

impl ElectionRng {
    pub fn new(seed: u64) -> ElectionRng {
        // Never zero (xorshift's fixed point); mix the seed so that nearby seeds differ.
        ElectionRng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Redraws `g`'s election timeout if raft-rs drew one since the last call (its role,
    /// term or leader changed).
    pub fn fix<S: LogStore>(&mut self, g: &mut GroupCore<S>) {
        let key = g.raft.election_key();
        if key == g.election_seen {
            return;
        }
        g.election_seen = key;
        let base = g.raft.election_tick() as u64;
        let ticks = base + self.next() % base;
        g.raft.set_election_timeout(ticks as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_spread_and_repeat_for_a_seed() {
        let draws = |seed| {
            let mut r = ElectionRng::new(seed);
            (0..64).map(|_| r.next() % 10).collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7));
        assert_ne!(draws(7), draws(8));
        let d = draws(7);
        let distinct: std::collections::BTreeSet<_> = d.iter().collect();
        assert!(distinct.len() >= 8, "{d:?}");
    }
}
