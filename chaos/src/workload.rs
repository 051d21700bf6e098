//! The verifying workload: NBD connections writing, reading and flushing self-describing
//! blocks ([`crate::block`]), recording every operation as a [`history::Event::Op`].
//!
//! Rules that make the history checkable:
//! - connection `c` works on volume `c % volumes.len()`;
//! - each block of a volume is written by exactly one connection, so writes to a block
//!   are sequential: among the `k` connections on a volume, the one of rank `r` (its
//!   index among them, `c / volumes.len()`) owns the blocks `b` with `b % k == r` (with a
//!   single volume this is `b % connections == c`);
//! - a write of a block carries version = last version issued for it + 1, whether or not
//!   the previous write succeeded (a failed write's outcome is unknown);
//! - reads target any block of the volume, including other connections' blocks;
//! - every random choice comes from a per-connection rng seeded from (seed, c).
//!
//! A connection attaches to a random node of the shared [`Nodes`] list and, after any
//! error (or when its node leaves the list), to another random node of the list as it is
//! then, after a short bounded backoff. An operation that could not even connect is
//! recorded as failed, with the node it tried.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::block::{self, BLOCK_SIZE};
use crate::history::{Event, Op, OpRecord, Seen};
use crate::nbd::NbdConn;

/// `conn` of the reads [`final_verify`] records (the checker owns the convention).
pub const VERIFY_CONN: u32 = crate::checker::FINAL_VERIFY_CONN;
/// `node` of an operation that failed because the node list was empty.
pub const NO_NODE: u64 = u64::MAX;

/// First retry backoff after a failed operation.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest retry backoff.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Granularity at which a backoff notices the stop flag.
const STOP_POLL: Duration = Duration::from_millis(20);
/// Consecutive failed reads after which [`final_verify`] gives up on a node.
const VERIFY_NODE_FAILURES_MAX: u32 = 3;

/// One volume the workload uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeTarget {
    /// Volume name, which is also its NBD export name.
    pub name: String,
    /// [`block::volume_tag`] of the name.
    pub tag: u64,
    /// How many 4 KiB blocks at the start of the volume the workload uses.
    pub blocks: u64,
}

impl VolumeTarget {
    /// A target using the first `blocks` blocks of volume `name`.
    pub fn new(name: &str, blocks: u64) -> VolumeTarget {
        VolumeTarget {
            name: name.to_owned(),
            tag: block::volume_tag(name),
            blocks,
        }
    }
}

/// What the workload does.
#[derive(Clone, Debug)]
pub struct WorkloadConfig {
    pub seed: u64,
    pub volumes: Vec<VolumeTarget>,
    pub connections: u32,
    /// Bounds each NBD operation, and each connect and handshake.
    pub op_timeout: Duration,
    /// A connection flushes after a random number of writes in this inclusive range
    /// (drawn again after every flush); `(_, 0)` never flushes.
    pub flush_every: (u32, u32),
    /// Percentage (0..=100) of non-flush operations that are reads.
    pub read_percent: u32,
}

impl WorkloadConfig {
    /// Checks the configuration makes sense; [`Workload::start`] does not refuse a bad
    /// one (connections on a volume without blocks do nothing), so callers should.
    pub fn validate(&self) -> Result<()> {
        ensure!(!self.volumes.is_empty(), "workload has no volumes");
        ensure!(self.connections > 0, "workload has no connections");
        ensure!(
            self.read_percent <= 100,
            "read_percent {} > 100",
            self.read_percent
        );
        ensure!(!self.op_timeout.is_zero(), "op_timeout must not be zero");
        for v in &self.volumes {
            ensure!(v.blocks > 0, "volume {:?} has no blocks", v.name);
            ensure!(
                v.blocks.checked_mul(BLOCK_SIZE as u64).is_some(),
                "volume {:?}: {} blocks overflow",
                v.name,
                v.blocks
            );
            ensure!(
                v.tag == block::volume_tag(&v.name),
                "volume {:?}: tag does not match the name",
                v.name
            );
        }
        Ok(())
    }
}

/// (node id, NBD `host:port`) the workload may attach to; the runner may change it at
/// any time (e.g. after a volume moved to another site).
pub type Nodes = Arc<RwLock<Vec<(u64, String)>>>;

/// For every block a write was issued to, `(volume index, block)` → the highest
/// version issued (acknowledged or not).
pub type Written = BTreeMap<(u32, u64), u64>;

/// Counts of a finished workload, and what it wrote. `Debug` shows only the size of
/// `written`, so that the summary fits in a log line.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct WorkloadSummary {
    /// Operations recorded (successful or not).
    pub ops: u64,
    pub writes_ok: u64,
    pub writes_failed: u64,
    pub reads_ok: u64,
    pub reads_failed: u64,
    pub flushes_ok: u64,
    pub flushes_failed: u64,
    /// Successful NBD handshakes.
    pub connects: u64,
    /// Successful reads that saw a torn or foreign block (the checker decides; this is
    /// a quick signal for logs).
    pub anomalies: u64,
    /// Connection threads that panicked (their operations up to then are in the history
    /// but their blocks are missing from `written`).
    pub panicked: u32,
    pub written: Written,
}

impl std::fmt::Debug for WorkloadSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadSummary")
            .field("ops", &self.ops)
            .field("writes_ok", &self.writes_ok)
            .field("writes_failed", &self.writes_failed)
            .field("reads_ok", &self.reads_ok)
            .field("reads_failed", &self.reads_failed)
            .field("flushes_ok", &self.flushes_ok)
            .field("flushes_failed", &self.flushes_failed)
            .field("connects", &self.connects)
            .field("anomalies", &self.anomalies)
            .field("panicked", &self.panicked)
            .field("blocks_written", &self.written.len())
            .finish()
    }
}

impl WorkloadSummary {
    fn merge(&mut self, other: WorkloadSummary) {
        self.ops += other.ops;
        self.writes_ok += other.writes_ok;
        self.writes_failed += other.writes_failed;
        self.reads_ok += other.reads_ok;
        self.reads_failed += other.reads_failed;
        self.flushes_ok += other.flushes_ok;
        self.flushes_failed += other.flushes_failed;
        self.connects += other.connects;
        self.anomalies += other.anomalies;
        self.panicked += other.panicked;
        self.written.extend(other.written);
    }

    /// Counts one recorded operation.
    fn count(&mut self, rec: &OpRecord) {
        self.ops += 1;
        let ok = rec.ok();
        let (good, bad) = match rec.op {
            Op::Write { .. } => (&mut self.writes_ok, &mut self.writes_failed),
            Op::Read { .. } => (&mut self.reads_ok, &mut self.reads_failed),
            Op::Flush => (&mut self.flushes_ok, &mut self.flushes_failed),
        };
        if ok {
            *good += 1;
        } else {
            *bad += 1;
        }
        if ok
            && matches!(
                rec.op,
                Op::Read {
                    seen: Seen::Torn | Seen::Foreign { .. },
                    ..
                }
            )
        {
            self.anomalies += 1;
        }
    }
}

/// Operations so far of a running workload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub ops: u64,
    pub ok: u64,
    pub failed: u64,
}

#[derive(Default)]
struct LiveCounters {
    ok: AtomicU64,
    failed: AtomicU64,
}

/// A running workload: one thread per connection.
pub struct Workload {
    stop: Arc<AtomicBool>,
    live: Arc<LiveCounters>,
    threads: Vec<JoinHandle<WorkloadSummary>>,
}

impl Workload {
    /// Starts one thread per connection. Every completed operation goes to `sink` as an
    /// [`Event::Op`] with times in µs since `start`; a thread blocks while `sink` is
    /// full, and ends if its receiver is gone.
    pub fn start(
        cfg: WorkloadConfig,
        nodes: Nodes,
        sink: SyncSender<Event>,
        start: Instant,
    ) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let live = Arc::new(LiveCounters::default());
        let n_vols = cfg.volumes.len() as u64;
        let threads = if n_vols == 0 {
            Vec::new()
        } else {
            (0..cfg.connections)
                .map(|c| {
                    let worker = Worker::new(
                        &cfg,
                        c,
                        nodes.clone(),
                        sink.clone(),
                        start,
                        stop.clone(),
                        live.clone(),
                    );
                    thread::Builder::new()
                        .name(format!("chaos-conn-{c}"))
                        .spawn(move || worker.run())
                        .expect("spawn workload thread")
                })
                .collect()
        };
        Workload {
            stop,
            live,
            threads,
        }
    }

    /// Operations recorded so far.
    pub fn progress(&self) -> Progress {
        let ok = self.live.ok.load(Ordering::Relaxed);
        let failed = self.live.failed.load(Ordering::Relaxed);
        Progress {
            ops: ok + failed,
            ok,
            failed,
        }
    }

    /// Stops the connections after their current operation (an operation on a dead
    /// connection ends by the op timeout) and returns what they did.
    pub fn stop(self) -> WorkloadSummary {
        self.stop.store(true, Ordering::Relaxed);
        let mut summary = WorkloadSummary::default();
        for t in self.threads {
            match t.join() {
                Ok(s) => summary.merge(s),
                Err(_) => summary.panicked += 1,
            }
        }
        summary
    }
}

/// Which blocks of its volume a connection writes: `rank + k * stride` for `k` in
/// `0..count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ownership {
    rank: u64,
    stride: u64,
    count: u64,
}

impl Ownership {
    /// The blocks connection `conn` owns among `connections` spread over `volumes`
    /// volumes, on a volume of `blocks` blocks.
    fn of(conn: u32, connections: u32, volumes: u64, blocks: u64) -> Ownership {
        let (conn, connections) = (u64::from(conn), u64::from(connections));
        let vol = conn % volumes;
        let rank = conn / volumes;
        // Connections vol, vol + volumes, vol + 2 * volumes, ... below `connections`.
        let stride = (connections - vol).div_ceil(volumes);
        let count = if rank < blocks {
            (blocks - rank).div_ceil(stride)
        } else {
            0
        };
        Ownership {
            rank,
            stride,
            count,
        }
    }

    fn block(&self, k: u64) -> u64 {
        self.rank + k * self.stride
    }
}

/// What a connection is about to do.
#[derive(Clone, Copy, Debug)]
enum Planned {
    Write { block: u64, version: u64 },
    Read { block: u64 },
    Flush,
}

/// The NBD connection of a worker, with the node it is attached to.
struct Attached {
    node: u64,
    addr: String,
    conn: NbdConn,
}

/// One workload connection.
struct Worker {
    id: u32,
    vol_index: u32,
    vol: VolumeTarget,
    seed: u64,
    timeout: Duration,
    flush_every: (u32, u32),
    read_percent: u32,
    owned: Ownership,
    rng: fastrand::Rng,
    nodes: Nodes,
    sink: SyncSender<Event>,
    start: Instant,
    stop: Arc<AtomicBool>,
    live: Arc<LiveCounters>,
    attached: Option<Attached>,
    /// Node of the last failure, avoided by the next pick when there is a choice.
    last_failed_node: Option<u64>,
    /// Last version issued per owned block.
    versions: HashMap<u64, u64>,
    writes_until_flush: Option<u32>,
    backoff: Duration,
    summary: WorkloadSummary,
}

impl Worker {
    fn new(
        cfg: &WorkloadConfig,
        id: u32,
        nodes: Nodes,
        sink: SyncSender<Event>,
        start: Instant,
        stop: Arc<AtomicBool>,
        live: Arc<LiveCounters>,
    ) -> Worker {
        let n_vols = cfg.volumes.len() as u64;
        let vol_index = (u64::from(id) % n_vols) as u32;
        let vol = cfg.volumes[vol_index as usize].clone();
        let owned = Ownership::of(id, cfg.connections, n_vols, vol.blocks);
        let mut w = Worker {
            id,
            vol_index,
            vol,
            seed: cfg.seed,
            timeout: cfg.op_timeout,
            flush_every: cfg.flush_every,
            read_percent: cfg.read_percent.min(100),
            owned,
            rng: fastrand::Rng::with_seed(conn_seed(cfg.seed, id)),
            nodes,
            sink,
            start,
            stop,
            live,
            attached: None,
            last_failed_node: None,
            versions: HashMap::new(),
            writes_until_flush: None,
            backoff: BACKOFF_MIN,
            summary: WorkloadSummary::default(),
        };
        w.writes_until_flush = w.draw_flush_interval();
        w
    }

    /// Runs operations until the stop flag is set or the sink is closed.
    fn run(mut self) -> WorkloadSummary {
        if self.vol.blocks == 0 {
            return self.finish();
        }
        while !self.stop.load(Ordering::Relaxed) {
            let planned = self.plan();
            let rec = self.execute(planned);
            let ok = rec.ok();
            self.summary.count(&rec);
            let counter = if ok { &self.live.ok } else { &self.live.failed };
            counter.fetch_add(1, Ordering::Relaxed);
            if self.sink.send(Event::Op(rec)).is_err() {
                break;
            }
            if ok {
                self.backoff = BACKOFF_MIN;
            } else {
                self.back_off();
            }
        }
        self.finish()
    }

    fn finish(mut self) -> WorkloadSummary {
        for (block, version) in self.versions.drain() {
            self.summary
                .written
                .insert((self.vol_index, block), version);
        }
        std::mem::take(&mut self.summary)
    }

    /// Chooses the next operation (and, for a write, issues its version).
    fn plan(&mut self) -> Planned {
        if self.writes_until_flush == Some(0) {
            self.writes_until_flush = self.draw_flush_interval();
            return Planned::Flush;
        }
        if self.owned.count == 0 || self.rng.u32(0..100) < self.read_percent {
            return Planned::Read {
                block: self.rng.u64(0..self.vol.blocks),
            };
        }
        let block = self.owned.block(self.rng.u64(0..self.owned.count));
        let version = self.versions.entry(block).or_insert(0);
        *version += 1;
        if let Some(n) = &mut self.writes_until_flush {
            *n = n.saturating_sub(1);
        }
        Planned::Write {
            block,
            version: *version,
        }
    }

    /// Writes before the next flush, `None` when flushing is disabled.
    fn draw_flush_interval(&mut self) -> Option<u32> {
        let (a, b) = self.flush_every;
        if b == 0 {
            return None;
        }
        Some(self.rng.u32(a.min(b)..=a.max(b)).max(1))
    }

    /// Performs `planned` on the current connection (connecting first if needed) and
    /// returns its record. Any failure drops the connection.
    fn execute(&mut self, planned: Planned) -> OpRecord {
        let start_us = micros_since(self.start);
        let (node, result) = match self.ensure_attached() {
            Ok(()) => self.perform(planned),
            Err((node, e)) => (node, Err(e)),
        };
        let (op, error) = match result {
            Ok(op) => (op, None),
            Err(e) => {
                self.attached = None;
                self.last_failed_node = Some(node);
                (failed_op(planned), Some(format!("{e:#}")))
            }
        };
        OpRecord {
            conn: self.id,
            vol: self.vol_index,
            node,
            start_us,
            end_us: micros_since(self.start),
            op,
            error,
        }
    }

    /// Runs `planned` on the attached connection: (node, the completed op).
    fn perform(&mut self, planned: Planned) -> (u64, Result<Op>) {
        let Some(a) = self.attached.as_mut() else {
            return (NO_NODE, Err(anyhow::anyhow!("not attached")));
        };
        let result = match planned {
            Planned::Write { block, version } => {
                let data = block::encode(self.vol.tag, block, version, self.seed);
                a.conn
                    .write(block_offset(block), &data)
                    .map(|()| Op::Write { block, version })
            }
            Planned::Read { block } => {
                a.conn
                    .read(block_offset(block), BLOCK_SIZE as u32)
                    .map(|data| Op::Read {
                        block,
                        seen: block::decode(&data, self.vol.tag, block, self.seed),
                    })
            }
            Planned::Flush => a.conn.flush().map(|()| Op::Flush),
        };
        (a.node, result)
    }

    /// Makes sure the worker is attached to a node that is still listed; on failure
    /// returns the node it tried (or [`NO_NODE`]) and why.
    fn ensure_attached(&mut self) -> Result<(), (u64, anyhow::Error)> {
        let nodes = read_nodes(&self.nodes);
        if let Some(a) = &self.attached {
            if nodes
                .iter()
                .any(|(id, addr)| *id == a.node && *addr == a.addr)
            {
                return Ok(());
            }
            // Our node left the list: move without counting it as a failure.
            self.attached = None;
        }
        let Some((node, addr)) = self.pick_node(&nodes) else {
            return Err((NO_NODE, anyhow::anyhow!("no nodes to attach to")));
        };
        let conn = self.connect(&addr).map_err(|e| (node, e))?;
        self.summary.connects += 1;
        self.attached = Some(Attached { node, addr, conn });
        Ok(())
    }

    /// Connects to the worker's volume on `addr` and checks it is large enough.
    fn connect(&self, addr: &str) -> Result<NbdConn> {
        let conn = NbdConn::connect(addr, &self.vol.name, self.timeout)?;
        let needed = self.vol.blocks.saturating_mul(BLOCK_SIZE as u64);
        if conn.size() < needed {
            bail!(
                "export {:?} on {addr} is {} bytes, the workload needs {needed}",
                self.vol.name,
                conn.size()
            );
        }
        Ok(conn)
    }

    /// A random node of `nodes`, avoiding the last failed one when there is a choice.
    fn pick_node(&mut self, nodes: &[(u64, String)]) -> Option<(u64, String)> {
        let candidates: Vec<&(u64, String)> = match self.last_failed_node {
            Some(bad) if nodes.iter().any(|(id, _)| *id != bad) => {
                nodes.iter().filter(|(id, _)| *id != bad).collect()
            }
            _ => nodes.iter().collect(),
        };
        if candidates.is_empty() {
            return None;
        }
        let (id, addr) = candidates[self.rng.usize(0..candidates.len())];
        Some((*id, addr.clone()))
    }

    /// Waits the current backoff (waking early on stop), then doubles it up to the cap.
    fn back_off(&mut self) {
        let until = Instant::now() + self.backoff;
        while !self.stop.load(Ordering::Relaxed) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            thread::sleep(left.min(STOP_POLL));
        }
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }
}

/// The op recorded for a failed `planned` operation.
fn failed_op(planned: Planned) -> Op {
    match planned {
        Planned::Write { block, version } => Op::Write { block, version },
        // `seen` is meaningless on error.
        Planned::Read { block } => Op::Read {
            block,
            seen: Seen::Zero,
        },
        Planned::Flush => Op::Flush,
    }
}

/// The per-connection rng seed: splitmix64 of the run seed and the connection.
fn conn_seed(seed: u64, conn: u32) -> u64 {
    let mut z = seed ^ (u64::from(conn) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Byte offset of `block` (validated configurations do not overflow).
fn block_offset(block: u64) -> u64 {
    block.saturating_mul(BLOCK_SIZE as u64)
}

fn micros_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// A snapshot of the node list (a poisoned lock still holds a usable list).
fn read_nodes(nodes: &Nodes) -> Vec<(u64, String)> {
    match nodes.read() {
        Ok(g) => g.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

/// After a run: reads every block in `summary.written` through `nodes` and records each read
/// as an [`Op::Read`] with `conn` = [`VERIFY_CONN`].
///
/// First round: each block once, through the first node (in list order, starting from
/// the last one that worked) that serves it; failed attempts are recorded too. Second
/// round: every block again through each listed node, so that a stale replica anywhere
/// shows up (a node that cannot be reached is skipped after its failure is recorded).
///
/// Returns the number of successful block reads over both rounds, or an error if some
/// block could not be read from any node in the first round (or the sink is closed).
pub fn final_verify(
    cfg: &WorkloadConfig,
    nodes: &[(u64, String)],
    sink: &SyncSender<Event>,
    start: Instant,
    summary: &WorkloadSummary,
) -> Result<u64> {
    let written = &summary.written;
    let mut by_vol: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for &(vol, block) in written.keys() {
        by_vol.entry(vol).or_default().push(block);
    }
    let mut reads = 0;
    let mut unreadable = 0;
    for (&vol, blocks) in &by_vol {
        let target = cfg
            .volumes
            .get(vol as usize)
            .with_context(|| format!("written block of unknown volume index {vol}"))?;
        let mut v = Verifier::new(cfg, vol, target, sink, start);
        let (ok, missed) = v.any_node_round(nodes, blocks)?;
        reads += ok;
        unreadable += missed;
        for (node, addr) in nodes {
            reads += v.node_round(*node, addr, blocks)?;
        }
    }
    if unreadable > 0 {
        bail!(
            "final verification: {unreadable} of {} written blocks could not be read from \
             any node",
            written.len()
        );
    }
    Ok(reads)
}

/// Blocks a final-verification request reads at most (256 KiB).
const VERIFY_RUN_BLOCKS: usize = 64;

/// Splits sorted `blocks` into runs of consecutive indexes, at most
/// [`VERIFY_RUN_BLOCKS`] long: one NBD read each, so that verifying through a node at
/// another site costs a round trip per run rather than per block.
fn runs(blocks: &[u64]) -> Vec<&[u64]> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=blocks.len() {
        if i == blocks.len() || blocks[i] != blocks[i - 1] + 1 || i - start == VERIFY_RUN_BLOCKS {
            if i > start {
                out.push(&blocks[start..i]);
            }
            start = i;
        }
    }
    out
}

/// How one verification read went.
enum Outcome {
    Read,
    ReadFailed,
    ConnectFailed,
}

/// Final-verification reads of one volume.
struct Verifier<'a> {
    vol_index: u32,
    vol: &'a VolumeTarget,
    seed: u64,
    timeout: Duration,
    sink: &'a SyncSender<Event>,
    start: Instant,
    attached: Option<(u64, NbdConn)>,
}

impl<'a> Verifier<'a> {
    fn new(
        cfg: &WorkloadConfig,
        vol_index: u32,
        vol: &'a VolumeTarget,
        sink: &'a SyncSender<Event>,
        start: Instant,
    ) -> Verifier<'a> {
        Verifier {
            vol_index,
            vol,
            seed: cfg.seed,
            timeout: cfg.op_timeout,
            sink,
            start,
            attached: None,
        }
    }

    /// Reads each block through the first node that serves it: (blocks read, blocks no
    /// node could serve). A node that refuses a connection is not tried again.
    fn any_node_round(&mut self, nodes: &[(u64, String)], blocks: &[u64]) -> Result<(u64, u64)> {
        let mut reachable = vec![true; nodes.len()];
        let mut preferred = 0;
        let (mut ok, mut missed) = (0, 0);
        for run in runs(blocks) {
            let mut done = false;
            for i in (0..nodes.len()).map(|k| (preferred + k) % nodes.len()) {
                if !reachable[i] {
                    continue;
                }
                match self.read_via(nodes[i].0, &nodes[i].1, run)? {
                    Outcome::Read => {
                        preferred = i;
                        done = true;
                        break;
                    }
                    Outcome::ReadFailed => {}
                    Outcome::ConnectFailed => reachable[i] = false,
                }
            }
            if done {
                ok += run.len() as u64;
            } else {
                missed += run.len() as u64;
            }
        }
        Ok((ok, missed))
    }

    /// Reads every block through `node`: the number read. Gives up on the node when it
    /// cannot be connected to or after a few failed reads in a row.
    fn node_round(&mut self, node: u64, addr: &str, blocks: &[u64]) -> Result<u64> {
        let (mut ok, mut failures) = (0, 0);
        for run in runs(blocks) {
            match self.read_via(node, addr, run)? {
                Outcome::Read => {
                    ok += run.len() as u64;
                    failures = 0;
                }
                Outcome::ReadFailed => {
                    failures += 1;
                    if failures >= VERIFY_NODE_FAILURES_MAX {
                        break;
                    }
                }
                Outcome::ConnectFailed => break,
            }
        }
        Ok(ok)
    }

    /// Reads the contiguous `run` of blocks through `node` in one request (connecting if
    /// needed) and records one read per block.
    fn read_via(&mut self, node: u64, addr: &str, run: &[u64]) -> Result<Outcome> {
        let start_us = micros_since(self.start);
        let len = run.len() as u32 * BLOCK_SIZE as u32;
        let (outcome, result) = match self.conn_to(node, addr) {
            Err(e) => (Outcome::ConnectFailed, Err(e)),
            Ok(conn) => match conn.read(block_offset(run[0]), len) {
                Ok(data) => (Outcome::Read, Ok(data)),
                Err(e) => (Outcome::ReadFailed, Err(e)),
            },
        };
        let end_us = micros_since(self.start);
        if result.is_err() {
            self.attached = None;
        }
        for (i, &block) in run.iter().enumerate() {
            let (seen, error) = match &result {
                Ok(data) => (
                    block::decode(
                        &data[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE],
                        self.vol.tag,
                        block,
                        self.seed,
                    ),
                    None,
                ),
                Err(e) => (Seen::Zero, Some(format!("{e:#}"))),
            };
            let rec = OpRecord {
                conn: VERIFY_CONN,
                vol: self.vol_index,
                node,
                start_us,
                end_us,
                op: Op::Read { block, seen },
                error,
            };
            self.sink
                .send(Event::Op(rec))
                .context("final verification: history sink closed")?;
        }
        Ok(outcome)
    }

    /// The connection to `node`, reusing the current one if it is to that node.
    fn conn_to(&mut self, node: u64, addr: &str) -> Result<&mut NbdConn> {
        if !matches!(&self.attached, Some((n, c)) if *n == node && c.addr() == addr) {
            self.attached = None;
            let conn = NbdConn::connect(addr, &self.vol.name, self.timeout)?;
            self.attached = Some((node, conn));
        }
        match &mut self.attached {
            Some((_, conn)) => Ok(conn),
            None => bail!("not connected"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::qemu::{self, QemuNbd};
    use std::sync::mpsc;

    const BLOCKS: u64 = 64;

    #[test]
    fn runs_split_at_gaps_and_at_the_limit() {
        let blocks: Vec<u64> = [1, 2, 3, 7, 8].into_iter().chain(100..230).collect();
        let r = runs(&blocks);
        assert_eq!(r[0], &[1, 2, 3]);
        assert_eq!(r[1], &[7, 8]);
        assert_eq!(r[2].len(), VERIFY_RUN_BLOCKS);
        assert_eq!(r.iter().map(|r| r.len()).sum::<usize>(), blocks.len());
        assert!(runs(&[]).is_empty());
    }

    fn config(seed: u64, connections: u32, volumes: Vec<VolumeTarget>) -> WorkloadConfig {
        WorkloadConfig {
            seed,
            volumes,
            connections,
            op_timeout: Duration::from_secs(5),
            flush_every: (2, 6),
            read_percent: 40,
        }
    }

    /// Collects every event until all senders are gone.
    fn collector(rx: mpsc::Receiver<Event>) -> JoinHandle<Vec<OpRecord>> {
        thread::spawn(move || {
            rx.iter()
                .filter_map(|e| match e {
                    Event::Op(o) => Some(o),
                    _ => None,
                })
                .collect()
        })
    }

    /// Waits until `done(progress)` or `max` elapsed, whichever first; at least `min`.
    fn run_until(w: &Workload, min: Duration, max: Duration, done: impl Fn(Progress) -> bool) {
        let t0 = Instant::now();
        loop {
            let elapsed = t0.elapsed();
            if elapsed >= max || (elapsed >= min && done(w.progress())) {
                return;
            }
            // Pacing of the test's observation loop; ends are decided by the conditions.
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Highest version written (issued) and highest acknowledged, per (vol, block).
    fn write_versions(ops: &[OpRecord]) -> (Written, Written) {
        let (mut issued, mut acked) = (Written::new(), Written::new());
        for o in ops {
            if let Op::Write { block, version } = o.op {
                let e = issued.entry((o.vol, block)).or_insert(0);
                *e = (*e).max(version);
                if o.ok() {
                    let e = acked.entry((o.vol, block)).or_insert(0);
                    *e = (*e).max(version);
                }
            }
        }
        (issued, acked)
    }

    /// Workload reads saw nothing torn, foreign or from the future; final reads saw
    /// exactly the last acknowledged version. Returns the number of final reads.
    fn check_history(ops: &[OpRecord], written: &Written) -> usize {
        let (issued, acked) = write_versions(ops);
        assert_eq!(
            &issued, written,
            "summary.written disagrees with the history"
        );
        let mut final_reads = 0;
        for o in ops.iter().filter(|o| o.ok()) {
            let Op::Read { block, seen } = &o.op else {
                continue;
            };
            if o.conn == VERIFY_CONN {
                let last = acked.get(&(o.vol, *block)).copied();
                let want = match last {
                    Some(version) => Seen::Version { version },
                    None => Seen::Zero,
                };
                assert_eq!(seen, &want, "final read of vol {} block {block}", o.vol);
                final_reads += 1;
                continue;
            }
            let max = issued.get(&(o.vol, *block)).copied().unwrap_or(0);
            // A read that overlaps another connection's write of the block may see part
            // of each (the page cache copies a page while the write fills it).
            let overlapped = || {
                ops.iter().any(|w| {
                    matches!(w.op, Op::Write { block: b, .. } if b == *block)
                        && w.vol == o.vol
                        && w.start_us <= o.end_us
                        && (!w.ok() || w.end_us >= o.start_us)
                })
            };
            match seen {
                Seen::Torn if overlapped() => {}
                Seen::Zero => {}
                Seen::Version { version } => assert!(
                    *version >= 1 && *version <= max,
                    "read of block {block} saw v{version}, max written {max}"
                ),
                other => panic!("read of block {block} saw {other:?}"),
            }
        }
        final_reads
    }

    #[test]
    fn ownership_partitions_blocks() {
        for (connections, volumes, blocks) in [(4, 1, 10), (4, 2, 9), (5, 2, 7), (3, 4, 5)] {
            let mut owner = vec![vec![None; blocks as usize]; volumes as usize];
            for c in 0..connections {
                let o = Ownership::of(c, connections, volumes, blocks);
                let v = (u64::from(c) % volumes) as usize;
                for k in 0..o.count {
                    let b = o.block(k) as usize;
                    assert!(owner[v][b].is_none(), "block {b} owned twice");
                    owner[v][b] = Some(c);
                }
            }
            for (v, blocks) in owner.iter().enumerate() {
                if (v as u32) < connections {
                    assert!(blocks.iter().all(Option::is_some), "{v}: {blocks:?}");
                }
            }
        }
    }

    #[test]
    fn verifying_workload_against_qemu_nbd() {
        let q = QemuNbd::start("vol0", BLOCKS * BLOCK_SIZE as u64);
        let cfg = config(7, 4, vec![VolumeTarget::new("vol0", BLOCKS)]);
        cfg.validate().unwrap();
        let nodes: Nodes = Arc::new(RwLock::new(vec![(1, q.addr.clone())]));
        let (tx, rx) = mpsc::sync_channel(1024);
        let events = collector(rx);
        let start = Instant::now();
        let w = Workload::start(cfg.clone(), nodes, tx.clone(), start);
        run_until(&w, Duration::from_secs(2), Duration::from_secs(2), |_| true);
        let summary = w.stop();
        assert_eq!(summary.panicked, 0);
        assert!(summary.writes_ok > 20, "{summary:?}");
        assert!(summary.reads_ok > 10, "{summary:?}");
        assert!(summary.flushes_ok > 2, "{summary:?}");
        assert_eq!(
            summary.writes_failed + summary.reads_failed,
            0,
            "{summary:?}"
        );
        assert_eq!(summary.anomalies, 0);

        let list = vec![(1, q.addr.clone())];
        let n = final_verify(&cfg, &list, &tx, start, &summary).unwrap();
        // Once in the first round, once through each (here: the one) node.
        assert_eq!(n, 2 * summary.written.len() as u64);
        drop(tx);
        let ops = events.join().unwrap();
        assert_eq!(ops.len() as u64, summary.ops + n);
        assert_eq!(check_history(&ops, &summary.written), n as usize);
        // Each block is written by one connection only.
        let mut writer = HashMap::new();
        for o in &ops {
            if let Op::Write { block, .. } = o.op {
                assert_eq!(*writer.entry(block).or_insert(o.conn), o.conn);
            }
        }
    }

    #[test]
    fn workload_survives_a_dead_node() {
        let q = QemuNbd::start("vol0", BLOCKS * BLOCK_SIZE as u64);
        let dead = format!("127.0.0.1:{}", qemu::free_port());
        let cfg = config(11, 4, vec![VolumeTarget::new("vol0", BLOCKS)]);
        // Only the dead node at first: every connection fails; then the live one joins.
        let nodes: Nodes = Arc::new(RwLock::new(vec![(1, dead.clone())]));
        let (tx, rx) = mpsc::sync_channel(1024);
        let events = collector(rx);
        let start = Instant::now();
        let w = Workload::start(cfg.clone(), nodes.clone(), tx.clone(), start);
        run_until(&w, Duration::ZERO, Duration::from_secs(10), |p| {
            p.failed >= 8
        });
        assert!(w.progress().failed >= 8, "{:?}", w.progress());
        assert_eq!(w.progress().ok, 0);
        nodes.write().unwrap().push((2, q.addr.clone()));
        run_until(&w, Duration::from_secs(1), Duration::from_secs(15), |p| {
            p.ok >= 100
        });
        let summary = w.stop();
        assert!(summary.writes_ok > 0 && summary.reads_ok > 0, "{summary:?}");
        assert!(summary.writes_failed > 0, "{summary:?}");

        let list = read_nodes(&nodes);
        let n = final_verify(&cfg, &list, &tx, start, &summary).unwrap();
        assert_eq!(n, 2 * summary.written.len() as u64);
        drop(tx);
        let ops = events.join().unwrap();
        for o in &ops {
            if o.ok() {
                assert_eq!(o.node, 2, "{o:?}");
            } else {
                assert_eq!(o.node, 1, "{o:?}");
                assert!(
                    o.error.as_deref().unwrap_or("").contains("connect"),
                    "{o:?}"
                );
            }
        }
        // Failed final reads went to the dead node; they are recorded.
        assert!(ops.iter().any(|o| o.conn == VERIFY_CONN && !o.ok()));
        assert_eq!(check_history(&ops, &summary.written), n as usize);
    }

    #[test]
    fn final_verify_fails_when_no_node_answers() {
        let dead = format!("127.0.0.1:{}", qemu::free_port());
        let cfg = config(3, 1, vec![VolumeTarget::new("vol0", BLOCKS)]);
        let summary = WorkloadSummary {
            written: [((0, 1), 2), ((0, 5), 1)].into_iter().collect(),
            ..WorkloadSummary::default()
        };
        let (tx, rx) = mpsc::sync_channel(64);
        let err = final_verify(&cfg, &[(1, dead)], &tx, Instant::now(), &summary).unwrap_err();
        assert!(format!("{err:#}").contains("2 of 2"), "{err:#}");
        drop(tx);
        let recorded: Vec<Event> = rx.iter().collect();
        // One failed connect per block in the first round (the node is then skipped for
        // later blocks, so just one) and one in the per-node round.
        assert_eq!(recorded.len(), 2, "{recorded:?}");
    }

    #[test]
    fn plans_are_deterministic_per_seed() {
        let plan = |seed| {
            let cfg = config(seed, 2, vec![VolumeTarget::new("v", 16)]);
            let (tx, _rx) = mpsc::sync_channel(1);
            let nodes: Nodes = Arc::new(RwLock::new(Vec::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let live = Arc::new(LiveCounters::default());
            let mut w = Worker::new(&cfg, 1, nodes, tx, Instant::now(), stop, live);
            (0..200)
                .map(|_| format!("{:?}", w.plan()))
                .collect::<Vec<_>>()
        };
        assert_eq!(plan(5), plan(5));
        assert_ne!(plan(5), plan(6));
        let p = plan(5);
        assert!(p.iter().any(|s| s.starts_with("Flush")));
        assert!(p.iter().any(|s| s.starts_with("Read")));
        // Connection 1 of 2 writes only odd blocks, versions 1, 2, ... per block.
        let mut last = HashMap::new();
        for s in &p {
            if let Some(rest) = s.strip_prefix("Write { block: ") {
                let (b, v) = rest
                    .trim_end_matches(" }")
                    .split_once(", version: ")
                    .unwrap();
                let (b, v): (u64, u64) = (b.parse().unwrap(), v.parse().unwrap());
                assert_eq!(b % 2, 1);
                let prev = last.insert(b, v).unwrap_or(0);
                assert_eq!(v, prev + 1);
            }
        }
    }
}
