//! Knobs of a simulation run. A run's concrete topology, link delays and fault rates
//! are drawn from its seed within these bounds (see `topology` and `sim`), so one
//! `SimConfig` covers many shapes of cluster.

/// Simulated time, in microseconds since the start of the run.
pub type Micros = u64;

pub const MS: Micros = 1_000;

/// A deliberately broken rule, to prove the checker can fail (negative controls): the
/// core's own knobs (`roamdisk_core::node::CoreBug`, the code under test broken on
/// purpose), or a disk that loses what it synced.
pub use roamdisk_core::node::CoreBug;

#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    /// Simulated time with faults and client load.
    pub fault_phase_ms: u64,
    /// Simulated time after every fault has healed, before the liveness checks.
    pub quiet_phase_ms: u64,
    /// Interval between Raft ticks on a node.
    pub tick_ms: u64,
    /// raft-rs `election_tick`; the driver draws election timeouts in `[E, 2E)`.
    pub election_tick: u32,
    pub heartbeat_tick: usize,
    /// raft-rs `max_size_per_msg`: small, so catch-up takes several appends.
    pub max_size_per_msg: u64,
    pub max_inflight_msgs: usize,

    /// Voters of the volume group at the home site: 3 or 5, drawn from the seed.
    pub voters_choices: Vec<usize>,
    /// Other sites (each with one learner of the volume group), drawn from `0..=max`.
    pub remote_sites_max: usize,
    /// Nodes that hold no replica at the start, for membership changes.
    pub spare_nodes_max: usize,
    /// Log index every bootstrap member starts at (TiKV uses 5). Above zero, a replica
    /// created empty can only be caught up by a snapshot; see the crate docs.
    pub bootstrap_index: u64,

    /// One-way delay inside a site: `[lo, hi]` microseconds.
    pub local_delay_us: (u64, u64),
    /// One-way base delay between two sites: `[lo, hi]` ms, drawn per site pair.
    pub remote_delay_ms: (u64, u64),
    /// Jitter added to every message on a cross-site link: up to this many ms.
    pub remote_jitter_ms: u64,
    /// Upper bounds of the per-run probabilities (per million messages).
    pub drop_per_million_max: u32,
    pub duplicate_per_million_max: u32,
    /// Time a sync takes: `[lo, hi]` microseconds. A power loss can land inside it.
    pub sync_us: (u64, u64),
    /// Interval between a node's checkpoints (volume data synced, applied index recorded).
    pub checkpoint_ms: (u64, u64),
    /// Entries kept behind the recorded applied index when compacting, drawn per run
    /// from `[lo, hi]`; small values force snapshots.
    pub retained_entries: (u64, u64),

    /// Interval between two fault decisions.
    pub fault_interval_ms: (u64, u64),
    /// How long a crashed node stays down.
    pub downtime_ms: (u64, u64),
    /// How long a partition lasts.
    pub partition_ms: (u64, u64),
    /// Relative weights of the faults: crash, partition, leader transfer, membership
    /// change, compaction burst.
    pub fault_weights: FaultWeights,
    /// Share of crashes that are power losses (the rest are process kills, which keep
    /// what was written).
    pub power_loss_per_million: u32,
    /// Share of crashes aimed at the sync window: the node crashes when its next sync
    /// would complete, after the write and before the sync.
    pub crash_in_sync_per_million: u32,
    /// Share of runs whose volume is `durability=site` (writes answered once a replica
    /// at another site has them), when the run has another site.
    pub site_durable_per_million: u32,
    /// A block copy whose recovery point changed stops before its next chunk with this
    /// probability (the storage node checks between chunks); otherwise it goes on and
    /// reports done for its old point, as it can when the check races with the store
    /// thread, and the core must refuse it.
    pub copy_stop_per_million: u32,

    /// Clients of the volume group (the metadata group has one more).
    pub volume_clients: usize,
    /// Pause between a client's requests.
    pub think_ms: (u64, u64),
    /// A client gives up on an attempt after this long and retries elsewhere.
    pub client_timeout_ms: u64,

    /// Let membership changes remove voters (a plain `RemoveNode(voter)`, or a joint
    /// replacement whose old voter leaves instead of staying as a learner), and remove
    /// the current leader. Off by default, because the core lets these through and
    /// raft-rs 0.7 then fails in two ways the simulator found: a leader removed while
    /// it leads panics in `maybe_commit` (it unwraps its own progress), and an outgoing
    /// voter that becomes leader during a joint configuration and is removed by leaving
    /// it keeps leading, drops every proposal and never steps down (followers stay in
    /// its lease). With it off, voters only become learners, as in a volume move.
    pub allow_removing_leader: bool,
    /// A broken rule in the core (negative controls).
    pub core_bug: Option<CoreBug>,
    /// A power loss also loses synced data: the node comes back with an empty disk
    /// under its old identity (a disk that lies about fsync; negative control).
    pub lose_synced_data: bool,
    /// Check that committed entries stay durable on a quorum (against the disk model).
    /// Only the negative controls turn it off, to see the other checks catch the
    /// consequences of a broken driver.
    pub check_durable_quorum: bool,
    /// The site-loss scenario: the volume is also in the metadata, its home site is
    /// lost (every node killed, or cut off from both other sites) once, at a time drawn
    /// from `site_loss_at_ms`, and the run's admin plans and executes a failover to site
    /// 1 with the core's planner; the old home comes back later and is fenced (see
    /// `failover`).
    pub site_loss: bool,
    pub site_loss_at_ms: (u64, u64),
    /// Print every event to stderr.
    pub trace: bool,
}

impl SimConfig {
    /// The command that replays `seed` under this configuration: the test's
    /// environment variable for the default configuration, the binary's flags for a
    /// preset with knobs changed, or a note for anything else.
    pub fn replay_command(&self, seed: u64) -> String {
        let mut want = self.clone();
        want.trace = false;
        let presets = [
            (SimConfig::default(), None),
            (SimConfig::membership_stress(), Some("--stress")),
            (SimConfig::power_loss_stress(), Some("--power-stress")),
            (SimConfig::site_loss(), Some("--site-loss")),
        ];
        for (mut cfg, preset) in presets {
            let mut flags: Vec<String> = preset.into_iter().map(String::from).collect();
            if let Some(bug) = want.core_bug {
                cfg.core_bug = Some(bug);
                flags.push(bug_flag(bug));
            }
            if want.lose_synced_data {
                cfg.lose_synced_data = true;
                flags.push("--bug lose-synced".into());
            }
            if !want.check_durable_quorum {
                cfg.check_durable_quorum = false;
                flags.push("--no-quorum-check".into());
            }
            if want.allow_removing_leader {
                cfg.allow_removing_leader = true;
                flags.push("--allow-removing-leader".into());
            }
            if cfg == want {
                return if flags.is_empty() {
                    format!("ROAMDISK_SIM_SEED={seed} cargo nextest run -p roamdisk-sim --release seeds_part")
                } else {
                    format!(
                        "cargo run -p roamdisk-sim --release -- --seed {seed} --trace {}",
                        flags.join(" ")
                    )
                };
            }
        }
        format!("run_seed({seed}, &config) with this test's SimConfig")
    }

    /// Membership churn: frequent membership changes, frequent process kills (which
    /// keep what was written but not synced), and slow checkpoints, so that restarts
    /// and snapshots often land between applying a change and recording it.
    pub fn membership_stress() -> SimConfig {
        SimConfig {
            fault_weights: FaultWeights {
                crash: 50,
                partition: 10,
                transfer_leader: 12,
                membership: 50,
                compact: 10,
                catch_up_race: 5,
                sync_failure: 5,
            },
            power_loss_per_million: 0,
            checkpoint_ms: (1_000, 2_000),
            ..SimConfig::default()
        }
    }
}

impl SimConfig {
    /// Power losses and partitions only, in three-voter groups: the schedules where a
    /// rebooted voter that forgot writes it reported as written could help elect a
    /// leader without them (what quarantine prevents).
    pub fn power_loss_stress() -> SimConfig {
        SimConfig {
            voters_choices: vec![3],
            fault_weights: FaultWeights {
                crash: 40,
                partition: 40,
                transfer_leader: 5,
                membership: 0,
                compact: 0,
                catch_up_race: 0,
                sync_failure: 0,
            },
            power_loss_per_million: 1_000_000,
            crash_in_sync_per_million: 500_000,
            downtime_ms: (50, 1_500),
            partition_ms: (300, 3_000),
            fault_interval_ms: (100, 500),
            ..SimConfig::default()
        }
    }
}

impl SimConfig {
    /// A home site lost once per run (see `site_loss`), with the usual faults around it
    /// except membership changes (the metadata places the volume's replicas in these
    /// runs, and the simulation's changes bypass it). Long enough for the lease and the
    /// new epoch's fencing wait (4.5 s) and for writes at the new home after them.
    pub fn site_loss() -> SimConfig {
        let mut cfg = SimConfig {
            site_loss: true,
            site_loss_at_ms: (1_000, 7_000),
            fault_phase_ms: 18_000,
            quiet_phase_ms: 10_000,
            ..SimConfig::default()
        };
        cfg.fault_weights.membership = 0;
        cfg
    }
}

/// The `roamdisk-sim` flag that turns `bug` on.
pub fn bug_flag(bug: CoreBug) -> String {
    format!("--bug {}", bug.name())
}

/// The bug a `--bug NAME` flag names (`lose-synced` is not the core's: see
/// `SimConfig::lose_synced_data`).
pub fn bug_named(name: &str) -> Option<CoreBug> {
    CoreBug::named(name)
}

#[derive(Clone, Debug, PartialEq)]
pub struct FaultWeights {
    pub crash: u32,
    pub partition: u32,
    pub transfer_leader: u32,
    pub membership: u32,
    pub compact: u32,
    /// A replica is cut off until it needs a snapshot, and again while it copies its
    /// blocks, so that a second snapshot lands during the copy.
    pub catch_up_race: u32,
    /// A node's next log sync fails (the node stops, and restarts on the same boot).
    pub sync_failure: u32,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            fault_phase_ms: 12_000,
            quiet_phase_ms: 8_000,
            tick_ms: 20,
            election_tick: 10,
            heartbeat_tick: 2,
            max_size_per_msg: 2048,
            max_inflight_msgs: 16,
            voters_choices: vec![3, 3, 5],
            remote_sites_max: 2,
            spare_nodes_max: 2,
            bootstrap_index: 5,
            local_delay_us: (100, 2_000),
            remote_delay_ms: (10, 40),
            remote_jitter_ms: 10,
            drop_per_million_max: 50_000,
            duplicate_per_million_max: 20_000,
            sync_us: (100, 3_000),
            checkpoint_ms: (50, 400),
            retained_entries: (0, 40),
            fault_interval_ms: (150, 900),
            downtime_ms: (50, 3_000),
            partition_ms: (100, 3_000),
            fault_weights: FaultWeights {
                crash: 30,
                partition: 30,
                transfer_leader: 12,
                membership: 20,
                compact: 8,
                catch_up_race: 6,
                sync_failure: 5,
            },
            power_loss_per_million: 700_000,
            crash_in_sync_per_million: 300_000,
            site_durable_per_million: 300_000,
            copy_stop_per_million: 500_000,
            volume_clients: 3,
            think_ms: (1, 60),
            client_timeout_ms: 600,
            allow_removing_leader: false,
            core_bug: None,
            lose_synced_data: false,
            check_durable_quorum: true,
            site_loss: false,
            site_loss_at_ms: (0, 0),
            trace: false,
        }
    }
}
