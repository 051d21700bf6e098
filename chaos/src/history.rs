//! What a chaos run records: every workload operation with its outcome, every fault
//! injected, and samples of replication lag. The checker and the report read only this,
//! so a run's history (`history.jsonl` in the run directory) can be checked again offline.
//!
//! Times are microseconds since the start of the run (`t_us`).

use serde::{Deserialize, Serialize};

/// One workload operation on one NBD connection, recorded when it completes (or fails).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct OpRecord {
    /// Workload connection (0..connections); blocks are owned by one connection each.
    pub conn: u32,
    /// Index of the volume in the run's volume list.
    pub vol: u32,
    /// Node whose NBD export served the operation.
    pub node: u64,
    pub start_us: u64,
    pub end_us: u64,
    pub op: Op,
    /// `None` when the server replied with success; the error otherwise (a server error,
    /// a timeout or a broken connection: the outcome of a failed write is unknown).
    pub error: Option<String>,
}

impl OpRecord {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Op {
    /// Wrote `version` (1, 2, ... per block) of `block`.
    Write { block: u64, version: u64 },
    /// Read `block`; `seen` is what the content decoded to (meaningless on error).
    Read { block: u64, seen: Seen },
    /// NBD_CMD_FLUSH on the connection.
    Flush,
}

/// What a read returned, decoded from the block's self-describing content.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Seen {
    /// All zeroes: never written.
    Zero,
    /// A well-formed block of this volume, block index and run seed.
    Version { version: u64 },
    /// A block whose checksum does not match its content (torn or corrupted).
    Torn,
    /// A well-formed block that belongs elsewhere: another volume, block or seed.
    Foreign {
        volume: u64,
        block: u64,
        seed: u64,
        version: u64,
    },
}

/// One injected fault, from injection to its end (heal, restart, ...).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FaultRecord {
    /// Short kind, e.g. `kill_node`, `partition`, `degrade_link`, `move_volume`.
    pub kind: String,
    /// What it hit, e.g. `node 4`, `osaka<->hokkaido`, `vm1 -> fukuoka`.
    pub target: String,
    pub start_us: u64,
    /// When the fault was undone (`None` when it ends by itself or was never undone).
    pub end_us: Option<u64>,
    /// Error or remark, e.g. why an injection was refused by the cluster.
    pub note: Option<String>,
    /// The fault took effect. A scheduled fault that could not be applied (after
    /// retrying for `FAULT_APPLY_RETRY_MS`) is recorded with `false` and fails the run:
    /// a drill must not pass on faults it never injected.
    #[serde(default = "yes")]
    pub applied: bool,
    /// It was on the schedule (`false`: something the runner found, e.g. a node that had
    /// exited on its own).
    #[serde(default = "yes")]
    pub scheduled: bool,
}

fn yes() -> bool {
    true
}

/// Replication lag of one volume towards one remote site, sampled during the run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LagSample {
    /// When the sample was asked for (the leader measured it at or after this).
    pub t_us: u64,
    pub vol: u32,
    pub site: String,
    pub bytes: u64,
    pub entries: u64,
    /// Age of the oldest entry the site lacked, in ms.
    #[serde(default)]
    pub seconds_ms: u64,
}

/// A forced failover the runner executed, with what it stated and what it found.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FailoverEvent {
    pub vol: u32,
    /// The site lost (killed or cut off), its nodes, and when.
    pub from: String,
    pub old_home_nodes: Vec<u64>,
    pub lost_us: u64,
    /// The site failed over to, and the site of the replica the group re-formed from.
    pub to: String,
    pub source_site: String,
    /// When `execute` returned, and when the new home first answered.
    pub executed_us: u64,
    pub serving_us: u64,
    /// When the runner pointed the workload at the old home again (its replicas rejoined
    /// the new epoch after `discard-divergent`); `None` if it never did. Until then no
    /// old-home node may acknowledge a write.
    #[serde(default)]
    pub rejoined_us: Option<u64>,
    /// The plan's stated loss: nothing, or writes acknowledged after `after_us` (run time;
    /// 0 if the stated instant precedes the run).
    pub lossless: bool,
    pub after_us: Option<u64>,
    /// Every block's version read through the new home right after it first answered,
    /// before the workload wrote there: (block, version; 0 = zeros).
    pub present: Vec<(u64, u64)>,
}

/// A line of `history.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Op(OpRecord),
    Fault(FaultRecord),
    Lag(LagSample),
    Failover(FailoverEvent),
}

/// Everything a run recorded.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct History {
    pub ops: Vec<OpRecord>,
    pub faults: Vec<FaultRecord>,
    pub lag: Vec<LagSample>,
    #[serde(default)]
    pub failovers: Vec<FailoverEvent>,
}

impl History {
    pub fn push(&mut self, e: Event) {
        match e {
            Event::Op(o) => self.ops.push(o),
            Event::Fault(f) => self.faults.push(f),
            Event::Lag(l) => self.lag.push(l),
            Event::Failover(f) => self.failovers.push(f),
        }
    }

    /// Parses `history.jsonl`.
    pub fn from_jsonl(text: &str) -> anyhow::Result<History> {
        let mut h = History::default();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let e: Event = serde_json::from_str(line)
                .map_err(|e| anyhow::anyhow!("history line {}: {e}", i + 1))?;
            h.push(e);
        }
        Ok(h)
    }
}

/// A broken promise found by the checker.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Violation {
    /// `stale_read` (older than the last flushed version), `future_read` (a version never
    /// written), `torn_block`, `foreign_block`, `lost_write` (final verification),
    /// `divergent_replicas`, `differing_blocks` (the cross-replica verify after the run),
    /// `fault_not_applied` (a scheduled fault that never took effect); after a forced
    /// failover: `lost_beyond_rpo` (a write acknowledged before the plan's stated time is
    /// gone), `loss_beyond_reported_lag` (a lost write older than the lag reported before
    /// the loss), `acked_by_fenced_generation` (the old home acknowledged after the new
    /// home answered).
    pub kind: String,
    pub vol: u32,
    pub block: Option<u64>,
    pub at_us: u64,
    pub detail: String,
}
