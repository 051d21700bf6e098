//! Named WAN profiles: link parameters for any pair of sites, for benchmarks and drills.
//!
//! Bandwidths are chosen for what this machine can drive, not for the real networks.
//! The development machine has 2 cores that run up to 9 storage-node processes (3 sites
//! × 3 replicas), the emulator and the workload. The emulator copies every byte twice
//! (socket → queue → socket) and a 3-replica volume on this machine writes about
//! 80 MiB/s with all 3 nodes local (`benches/results/cluster.md`, 1M seq write). A WAN
//! link must be *slower* than what the nodes can ship, or benchmarks measure the CPU
//! instead of the link: so `sinet5` gets 50 MiB/s per direction (SINET5 itself is
//! 100 Gbit/s) and `wide-2010` 100 Mbit/s (12.5 MB/s; DESIGN.md names 1 Gbit/s, which
//! the nodes here could never fill, so the link would never be the bottleneck; 100 Mbit/s
//! keeps the 40 ms path a real constraint, 4× below `sinet5`). The emulator's own cost, measured by `tests/throughput.rs` on the
//! `roamdisk-wan` process alone (on a machine busy with builds, so ranges): an unlimited
//! stream runs at 400–600 MiB/s for 0.6–0.9 CPU-seconds per GiB; a stream at `sinet5`'s
//! 50 MiB/s costs 2.3–2.9 CPU-seconds per GiB (per-chunk wake-ups of the timers and
//! tasks), 11–14% of one core. So a home site shipping to the two other `sinet5` sites at
//! full rate costs the emulator about a quarter of a core and leaves the nodes the rest;
//! at 100 MiB/s per direction that would double, while the nodes (80 MiB/s for a local
//! 3-replica volume) could no longer fill the link.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::params::{LinkParams, Partition};

/// A named set of link parameters. See the module documentation for the choice of
/// bandwidths.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WanProfile {
    /// No delay, no bandwidth limit: the sites are one LAN.
    #[default]
    Lan,
    /// SINET5 between the Distcloud sites. Round-trip times Osaka–Hokkaido 20 ms,
    /// Osaka–Fukuoka 15 ms, Hokkaido–Fukuoka 30 ms, any other pair 20 ms; one-way delay is
    /// half of it, jitter 0.5 ms per direction, 50 MiB/s per direction.
    Sinet5,
    /// WIDE Cloud live migration, 2010: 40 ms round trip between any two sites, 1 ms
    /// jitter, 100 Mbit/s (12.5 MB/s) per direction.
    Wide2010,
}

/// `sinet5` bandwidth per direction: 50 MiB/s.
pub const SINET5_BANDWIDTH_BYTES_PER_SEC: u64 = 50 * 1024 * 1024;
/// `sinet5` round-trip time for a site pair not in its table.
pub const SINET5_DEFAULT_RTT: Duration = Duration::from_millis(20);
/// `sinet5` jitter per direction.
pub const SINET5_JITTER: Duration = Duration::from_micros(500);
/// `wide-2010` bandwidth per direction: 100 Mbit/s.
pub const WIDE2010_BANDWIDTH_BYTES_PER_SEC: u64 = 12_500_000;
/// `wide-2010` round-trip time.
pub const WIDE2010_RTT: Duration = Duration::from_millis(40);
/// `wide-2010` jitter per direction.
pub const WIDE2010_JITTER: Duration = Duration::from_millis(1);

/// Round-trip times of `sinet5` for the pairs it knows (unordered).
const SINET5_RTTS: [(&str, &str, Duration); 3] = [
    ("osaka", "hokkaido", Duration::from_millis(20)),
    ("osaka", "fukuoka", Duration::from_millis(15)),
    ("hokkaido", "fukuoka", Duration::from_millis(30)),
];

impl WanProfile {
    pub const ALL: [WanProfile; 3] = [WanProfile::Lan, WanProfile::Sinet5, WanProfile::Wide2010];

    /// The profile called `name` (`lan`, `sinet5`, `wide-2010`), exactly.
    pub fn from_name(name: &str) -> Option<WanProfile> {
        WanProfile::ALL.into_iter().find(|p| p.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            WanProfile::Lan => "lan",
            WanProfile::Sinet5 => "sinet5",
            WanProfile::Wide2010 => "wide-2010",
        }
    }

    /// Round-trip time between two sites under this profile.
    pub fn rtt(self, a: &str, b: &str) -> Duration {
        match self {
            WanProfile::Lan => Duration::ZERO,
            WanProfile::Sinet5 => SINET5_RTTS
                .iter()
                .find(|(x, y, _)| (*x == a && *y == b) || (*x == b && *y == a))
                .map_or(SINET5_DEFAULT_RTT, |(_, _, rtt)| *rtt),
            WanProfile::Wide2010 => WIDE2010_RTT,
        }
    }

    /// Parameters of the directed link a → b (symmetric: the same as b → a). The queue
    /// limit is automatic and nothing is partitioned.
    pub fn params(self, a: &str, b: &str) -> LinkParams {
        let (jitter, bandwidth_bytes_per_sec) = match self {
            WanProfile::Lan => (Duration::ZERO, None),
            WanProfile::Sinet5 => (SINET5_JITTER, Some(SINET5_BANDWIDTH_BYTES_PER_SEC)),
            WanProfile::Wide2010 => (WIDE2010_JITTER, Some(WIDE2010_BANDWIDTH_BYTES_PER_SEC)),
        };
        LinkParams {
            delay: self.rtt(a, b) / 2,
            jitter,
            bandwidth_bytes_per_sec,
            queue_limit_bytes: None,
            partition: Partition::None,
        }
    }
}

impl fmt::Display for WanProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A profile name that is not one of `lan`, `sinet5`, `wide-2010`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown WAN profile {0:?} (known: lan, sinet5, wide-2010)")]
pub struct UnknownProfile(pub String);

impl FromStr for WanProfile {
    type Err = UnknownProfile;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WanProfile::from_name(s).ok_or_else(|| UnknownProfile(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in WanProfile::ALL {
            assert_eq!(WanProfile::from_name(p.name()), Some(p));
            assert_eq!(p.name().parse::<WanProfile>(), Ok(p));
        }
        assert_eq!(WanProfile::from_name("SINET5"), None);
        assert!("wide2010".parse::<WanProfile>().is_err());
    }

    #[test]
    fn sinet5_table() {
        let p = WanProfile::Sinet5;
        assert_eq!(
            p.params("osaka", "hokkaido").delay,
            Duration::from_millis(10)
        );
        assert_eq!(
            p.params("hokkaido", "osaka").delay,
            Duration::from_millis(10)
        );
        assert_eq!(
            p.params("fukuoka", "osaka").delay,
            Duration::from_micros(7500)
        );
        assert_eq!(
            p.params("hokkaido", "fukuoka").delay,
            Duration::from_millis(15)
        );
        assert_eq!(p.params("osaka", "tokyo").delay, Duration::from_millis(10));
        // Case-sensitive: "Osaka" is not osaka, so it gets the default.
        assert_eq!(
            p.params("Osaka", "fukuoka").delay,
            Duration::from_millis(10)
        );
        for (a, b, _) in SINET5_RTTS {
            assert_eq!(p.params(a, b).validate(), Ok(()));
        }
    }

    #[test]
    fn lan_and_wide() {
        assert_eq!(WanProfile::Lan.params("a", "b"), LinkParams::default());
        let w = WanProfile::Wide2010.params("osaka", "tokyo");
        assert_eq!(w.delay, Duration::from_millis(20));
        assert_eq!(w.bandwidth_bytes_per_sec, Some(12_500_000));
        assert_eq!(w.validate(), Ok(()));
    }
}
