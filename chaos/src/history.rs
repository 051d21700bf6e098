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
    pub t_us: u64,
    pub vol: u32,
    pub site: String,
    pub bytes: u64,
    pub entries: u64,
}

/// A line of `history.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Op(OpRecord),
    Fault(FaultRecord),
    Lag(LagSample),
}

/// Everything a run recorded.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct History {
    pub ops: Vec<OpRecord>,
    pub faults: Vec<FaultRecord>,
    pub lag: Vec<LagSample>,
}

impl History {
    pub fn push(&mut self, e: Event) {
        match e {
            Event::Op(o) => self.ops.push(o),
            Event::Fault(f) => self.faults.push(f),
            Event::Lag(l) => self.lag.push(l),
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
    /// `fault_not_applied` (a scheduled fault that never took effect).
    pub kind: String,
    pub vol: u32,
    pub block: Option<u64>,
    pub at_us: u64,
    pub detail: String,
}
