//! Named scenarios and the fault schedule a seed derives from one.
//!
//! A schedule is a pure function of (scenario, seed, duration): the same arguments give
//! the same list of faults at the same offsets, printed before the run starts and
//! written to `schedule.json`. What a fault hits (which node is the leader, which site
//! is home) is resolved when it is injected, from the cluster's state at that moment and
//! a random draw that also comes from the seed.
//!
//! Faults never overlap: each one is injected, held, undone, and followed by a quiet gap,
//! so that the time without successful I/O (RTO) is attributed to one fault.

use serde::{Deserialize, Serialize};

/// What a fault does. Targets are picked at injection time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// kill -9 a random node, restart it after the hold.
    KillNode,
    /// kill -9 the volume's leader, restart it after the hold.
    KillLeader,
    /// Cut a non-home site off from every other site (both directions), then heal.
    PartitionSite,
    /// Hold one direction between the home site and another site, then heal.
    PartitionOneWay,
    /// Slow a link from the home site: +delay, jitter, a low bandwidth; then restore.
    DegradeLink,
    /// kill -9 every node of a non-home site, restart them after the hold.
    SiteOutage,
    /// Fill the filesystem of a node's data directory (a size-limited tmpfs), then free it.
    DiskFull,
    /// Flip bytes of a cold block (written once at the start, never rewritten) in the
    /// extent file of a running follower: only the storage's own verification (the
    /// scrub) can find and repair it before the final reads.
    CorruptBlock,
    /// Move the volume's home to another site while the workload writes (the workload
    /// follows it, as a migrated VM would).
    MoveVolume,
    /// Hand the volume's leadership to another voter.
    TransferLeader,
    /// kill -9 every node of the volume's home site; fail the volume over to another
    /// site (plan, execute, writes go on there); after the hold, start the old home
    /// again, check its replicas are fenced with their divergent writes reported,
    /// discard them (incremental resync) and move the volume back (failback).
    SiteLoss,
    /// Cut the home site off from every other site while the workload writes there;
    /// fail over to another site; after the hold, heal; then as `SiteLoss`.
    SplitBrain,
}

impl FaultKind {
    pub const ALL: [FaultKind; 12] = [
        FaultKind::KillNode,
        FaultKind::KillLeader,
        FaultKind::PartitionSite,
        FaultKind::PartitionOneWay,
        FaultKind::DegradeLink,
        FaultKind::SiteOutage,
        FaultKind::DiskFull,
        FaultKind::CorruptBlock,
        FaultKind::MoveVolume,
        FaultKind::TransferLeader,
        FaultKind::SiteLoss,
        FaultKind::SplitBrain,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillNode => "kill_node",
            FaultKind::KillLeader => "kill_leader",
            FaultKind::PartitionSite => "partition_site",
            FaultKind::PartitionOneWay => "partition_one_way",
            FaultKind::DegradeLink => "degrade_link",
            FaultKind::SiteOutage => "site_outage",
            FaultKind::DiskFull => "disk_full",
            FaultKind::CorruptBlock => "corrupt_block",
            FaultKind::MoveVolume => "move_volume",
            FaultKind::TransferLeader => "transfer_leader",
            FaultKind::SiteLoss => "site_loss",
            FaultKind::SplitBrain => "split_brain",
        }
    }

    /// True if the fault needs more than one site.
    pub fn needs_sites(self) -> bool {
        matches!(
            self,
            FaultKind::PartitionSite
                | FaultKind::PartitionOneWay
                | FaultKind::DegradeLink
                | FaultKind::SiteOutage
                | FaultKind::MoveVolume
                | FaultKind::SiteLoss
                | FaultKind::SplitBrain
        )
    }
}

/// A named scenario: the cluster it runs on and the faults it draws from.
#[derive(Clone, Debug, Serialize)]
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub sites: &'static [&'static str],
    pub nodes_per_site: usize,
    /// WAN profile between the sites.
    pub wan: &'static str,
    /// Faults the schedule draws from, with weights.
    pub faults: &'static [(FaultKind, u32)],
    /// Duration when `--duration` is not given, in seconds.
    pub default_duration_s: u64,
}

const TWO_SITES: &[&str] = &["osaka", "hokkaido"];
const THREE_SITES: &[&str] = &["osaka", "hokkaido", "fukuoka"];

pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "smoke",
        about: "a short mix for CI: node and leader crashes, a site partition, a move and a \
                leader transfer, over sinet5",
        sites: TWO_SITES,
        nodes_per_site: 3,
        wan: "sinet5",
        faults: &[
            (FaultKind::KillNode, 2),
            (FaultKind::KillLeader, 2),
            (FaultKind::PartitionSite, 1),
            (FaultKind::MoveVolume, 1),
            (FaultKind::TransferLeader, 1),
        ],
        default_duration_s: 60,
    },
    Scenario {
        name: "node-crash",
        about: "kill -9 of random nodes and of the volume's leader, restarted after a while",
        sites: TWO_SITES,
        nodes_per_site: 3,
        wan: "sinet5",
        faults: &[(FaultKind::KillNode, 1), (FaultKind::KillLeader, 1)],
        default_duration_s: 90,
    },
    Scenario {
        name: "partition",
        about: "symmetric and one-way partitions between sites and degraded links",
        sites: THREE_SITES,
        nodes_per_site: 3,
        wan: "sinet5",
        faults: &[
            (FaultKind::PartitionSite, 2),
            (FaultKind::PartitionOneWay, 2),
            (FaultKind::DegradeLink, 1),
        ],
        default_duration_s: 90,
    },
    Scenario {
        name: "site-outage",
        about: "every node of a remote site killed at once and restarted, and node crashes",
        sites: THREE_SITES,
        nodes_per_site: 3,
        wan: "sinet5",
        faults: &[(FaultKind::SiteOutage, 2), (FaultKind::KillNode, 1)],
        default_duration_s: 90,
    },
    Scenario {
        name: "moves",
        about: "volume moves between sites and leader transfers in the middle of writes",
        sites: THREE_SITES,
        nodes_per_site: 3,
        wan: "sinet5",
        faults: &[(FaultKind::MoveVolume, 2), (FaultKind::TransferLeader, 1)],
        default_duration_s: 90,
    },
    Scenario {
        name: "disk-full",
        about: "a node's data filesystem fills up and is freed again",
        sites: TWO_SITES,
        nodes_per_site: 3,
        wan: "lan",
        faults: &[(FaultKind::DiskFull, 1)],
        default_duration_s: 60,
    },
    Scenario {
        name: "corruption",
        about: "a written block silently corrupted on disk in one running replica",
        sites: TWO_SITES,
        nodes_per_site: 3,
        wan: "lan",
        faults: &[(FaultKind::CorruptBlock, 1)],
        default_duration_s: 60,
    },
    Scenario {
        name: "site-loss",
        about: "the volume's home site killed: forced failover to another site, writes \
                there, the old home back (fenced, its divergent writes reported, then \
                discarded and resynced) and a move back; node crashes in between",
        sites: THREE_SITES,
        nodes_per_site: 3,
        wan: "sinet5",
        faults: &[(FaultKind::SiteLoss, 2), (FaultKind::KillNode, 1)],
        default_duration_s: 120,
    },
    Scenario {
        name: "split-brain",
        about: "the home site cut off from the others while it is written: failover, heal, \
                nothing acknowledged by the fenced home after the new one answered",
        sites: THREE_SITES,
        nodes_per_site: 3,
        wan: "sinet5",
        faults: &[(FaultKind::SplitBrain, 2), (FaultKind::KillNode, 1)],
        default_duration_s: 120,
    },
    Scenario {
        name: "mixed",
        about: "every fault kind, for soaks",
        sites: THREE_SITES,
        nodes_per_site: 3,
        wan: "sinet5",
        faults: &[
            (FaultKind::KillNode, 3),
            (FaultKind::KillLeader, 3),
            (FaultKind::PartitionSite, 2),
            (FaultKind::PartitionOneWay, 2),
            (FaultKind::DegradeLink, 1),
            (FaultKind::SiteOutage, 1),
            (FaultKind::DiskFull, 1),
            (FaultKind::CorruptBlock, 1),
            (FaultKind::MoveVolume, 2),
            (FaultKind::TransferLeader, 2),
        ],
        default_duration_s: 180,
    },
];

pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

/// One fault of a schedule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Planned {
    /// Offset from the start of the workload, in milliseconds.
    pub at_ms: u64,
    pub kind: FaultKind,
    /// How long the fault is held before it is undone, in milliseconds.
    pub hold_ms: u64,
    /// Seed of the draw that picks the fault's target at injection time.
    pub target_seed: u64,
}

/// Quiet time before the first fault, so the workload's steady state is on record.
pub const WARMUP_MS: u64 = 3_000;
/// Quiet time after a fault is undone before the next one.
pub const GAP_MS: (u64, u64) = (2_000, 5_000);
/// How long a fault is held.
pub const HOLD_MS: (u64, u64) = (2_000, 8_000);

/// The faults `scenario` injects in a run of `duration_ms` with `seed`: one after
/// another, each held for a random time and followed by a random gap, none starting
/// after `duration_ms - hold`.
pub fn schedule(scenario: &Scenario, seed: u64, duration_ms: u64) -> Vec<Planned> {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5ce7_a210_c4a0_5eed);
    let total: u32 = scenario.faults.iter().map(|(_, w)| w).sum();
    let mut out = Vec::new();
    let mut t = WARMUP_MS;
    loop {
        let hold_ms = rng.u64(HOLD_MS.0..=HOLD_MS.1);
        if total == 0 || t + hold_ms > duration_ms {
            break;
        }
        let mut pick = rng.u32(0..total);
        let kind = scenario
            .faults
            .iter()
            .find(|(_, w)| {
                if pick < *w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .map(|(k, _)| *k)
            .expect("weights cover the draw");
        out.push(Planned {
            at_ms: t,
            kind,
            hold_ms,
            target_seed: rng.u64(..),
        });
        t += hold_ms + rng.u64(GAP_MS.0..=GAP_MS.1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_one_schedule() {
        let s = find("mixed").unwrap();
        assert_eq!(schedule(s, 7, 120_000), schedule(s, 7, 120_000));
        assert_ne!(schedule(s, 7, 120_000), schedule(s, 8, 120_000));
    }

    #[test]
    fn faults_do_not_overlap_and_fit_the_duration() {
        for seed in 0..200 {
            for s in SCENARIOS {
                let plan = schedule(s, seed, 60_000);
                for w in plan.windows(2) {
                    assert!(w[0].at_ms + w[0].hold_ms + GAP_MS.0 <= w[1].at_ms, "{w:?}");
                }
                for p in &plan {
                    assert!(p.at_ms >= WARMUP_MS && p.at_ms + p.hold_ms <= 60_000);
                    assert!(s.faults.iter().any(|(k, _)| *k == p.kind));
                }
            }
        }
    }

    #[test]
    fn every_kind_of_a_scenario_is_drawn_over_many_seeds() {
        let s = find("mixed").unwrap();
        let mut seen = std::collections::HashSet::new();
        for seed in 0..50 {
            seen.extend(schedule(s, seed, 180_000).into_iter().map(|p| p.kind));
        }
        assert_eq!(seen.len(), s.faults.len());
    }

    #[test]
    fn scenarios_are_consistent() {
        for s in SCENARIOS {
            assert!(!s.faults.is_empty(), "{}", s.name);
            assert!(
                roamdisk_wan::WanProfile::from_name(s.wan).is_some(),
                "{}",
                s.name
            );
            if s.sites.len() < 2 {
                assert!(s.faults.iter().all(|(k, _)| !k.needs_sites()), "{}", s.name);
            }
            assert!(
                !schedule(s, 1, s.default_duration_s * 1000).is_empty(),
                "{}",
                s.name
            );
        }
    }
}
