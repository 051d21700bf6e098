//! One chaos run: a real cluster, a seeded fault schedule, a verifying workload, checks.
//!
//! The steps, in order:
//! 1. start a playground cluster (real `roamdisk-node` processes, the WAN emulator
//!    between sites) in `OUT/cluster`, with one volume `chaos` at the first site;
//! 2. start the workload on the home site's nodes, a lag sampler, and the history writer
//!    (`OUT/history.jsonl`, every operation, fault and lag sample);
//! 3. inject the schedule's faults one at a time, each held and then undone;
//! 4. heal everything (links, dead nodes, full disks), let the workload run on, stop it,
//!    and read back every block it wrote through every node (final verification);
//! 5. wait until all replicas of the volume hold the same blocks (blake3 digests of
//!    their extent files);
//! 6. check the history ([`crate::checker`]) and write the report ([`crate::report`]).

use std::collections::BTreeMap;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use roamdisk_admin_client::AdminClient;
use roamdisk_playground::{self as playground, Cluster};
use roamdisk_wan::{ControlClient, LinkUpdate, Partition};
use serde_json::Value;

use crate::block::{volume_tag, BLOCK_SIZE};
use crate::history::{Event, FaultRecord, History, LagSample, Violation};
use crate::report::{self, ReplicaDigest, Report};
use crate::scenario::{self, FaultKind, Planned, Scenario};
use crate::workload::{self, Nodes, VolumeTarget, Workload, WorkloadConfig};

mod failover;

/// The volume every run writes.
pub const VOLUME: &str = "chaos";
/// Environment variable (read by `roamdisk-node`) that turns on the negative control.
pub const NEGATIVE_CONTROL_ENV: &str = "ROAMDISK_NEGATIVE_CONTROL";
/// The negative control this runner knows: the nodes acknowledge 1 write in 16 without
/// storing it anywhere.
pub const NEGATIVE_CONTROL: &str = "drop-acked-writes";
/// Blocks after the workload's range written once at the start and never again: the
/// `corrupt_block` fault corrupts one of them in a replica, so that nothing but the
/// storage's own verification can repair it before the final reads find it.
pub const COLD_BLOCKS: u64 = 256;
/// Connection id recorded for the cold blocks' writes.
pub const COLD_CONN: u32 = u32::MAX - 2;
/// Bound on history events waiting for the writer thread (the workload blocks when the
/// writer falls this far behind).
const HISTORY_QUEUE: usize = 1 << 16;
/// How long a scheduled fault the cluster refuses is tried again before it is recorded as
/// not applied (which fails the run), and how often.
pub const FAULT_APPLY_RETRY_MS: u64 = 5_000;
pub const FAULT_APPLY_RETRY_EVERY_MS: u64 = 250;
/// Size of the tmpfs a `disk_full` target keeps its data on. Its own footprint must fit
/// with room to spare when no fault is on: RocksDB keeps up to four 128 MiB memtables,
/// each with its WAL file (`rocks`), besides the volume. At 256 MiB a faster machine
/// (the workload writing ~1,400 acknowledged writes a second) filled it with no fault
/// active: the node stopped on ENOSPC as it should, could not restart, and the 2026-12-07
/// soak failed `mixed` seeds 7 and 14 on replicas that never converged.
const DISK_FULL_FS_BYTES: u64 = 1 << 30;
/// How long the end of a run waits for the replicas to converge.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a move may take before the runner stops waiting for it.
const MOVE_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub scenario: &'static Scenario,
    pub seed: u64,
    pub duration: Duration,
    pub out: PathBuf,
    pub base_port: u16,
    pub node_bin: PathBuf,
    pub negative_control: bool,
    pub connections: u32,
    pub volume_size: u64,
    /// Blocks at the start of the volume the workload uses.
    pub blocks: u64,
    /// Every link between two sites capped at this many bytes per second (each way).
    pub link_bandwidth: Option<u64>,
    /// A broken core rule the nodes run with (a negative control; `CoreBug::named`).
    pub core_bug: Option<String>,
    /// The command line that replays this run (printed in the report).
    pub command: String,
    /// Print progress lines to stderr.
    pub verbose: bool,
}

/// Runs one scenario and writes its report; the report says whether it passed.
pub fn run(opts: &RunOptions) -> Result<Report> {
    let started = Instant::now();
    std::fs::create_dir_all(&opts.out).with_context(|| format!("create {}", opts.out.display()))?;
    let out = opts.out.canonicalize()?;
    let plan = scenario::schedule(opts.scenario, opts.seed, opts.duration.as_millis() as u64);
    std::fs::write(out.join("schedule.json"), serde_json::to_vec_pretty(&plan)?)?;
    let say = |msg: String| {
        if opts.verbose {
            eprintln!("[chaos {:>6.1}s] {msg}", started.elapsed().as_secs_f64());
        }
    };
    say(format!(
        "scenario {} seed {}: {} faults planned over {} s",
        opts.scenario.name,
        opts.seed,
        plan.len(),
        opts.duration.as_secs()
    ));
    for p in &plan {
        say(format!(
            "  at {:>5.1} s: {} for {:.1} s",
            p.at_ms as f64 / 1e3,
            p.kind.name(),
            p.hold_ms as f64 / 1e3
        ));
    }

    let cluster_dir = out.join("cluster");
    let mut mounts = Mounts::default();
    if cluster_dir.exists() {
        unmount_under(&cluster_dir);
        std::fs::remove_dir_all(&cluster_dir)
            .with_context(|| format!("clear {}", cluster_dir.display()))?;
    }
    // A disk_full target keeps its data on a small tmpfs, mounted before it starts.
    let disk_full_node = opts
        .scenario
        .faults
        .iter()
        .any(|(k, _)| *k == FaultKind::DiskFull)
        .then_some(2u64);
    if let Some(id) = disk_full_node {
        let dir = cluster_dir.join(format!("node-{id}"));
        if let Err(e) = mounts.tmpfs(&dir, DISK_FULL_FS_BYTES) {
            say(format!(
                "no size-limited filesystem for node {id} ({e:#}); disk_full faults are \
                 taken off the schedule"
            ));
        }
    }
    let wan = roamdisk_wan::WanProfile::from_name(opts.scenario.wan)
        .with_context(|| format!("unknown WAN profile {}", opts.scenario.wan))?;
    let mut node_env = vec![("RUST_LOG".to_owned(), "info".to_owned())];
    if opts.negative_control {
        node_env.push((NEGATIVE_CONTROL_ENV.to_owned(), NEGATIVE_CONTROL.to_owned()));
    }
    if let Some(bug) = &opts.core_bug {
        // A node takes a core bug only with the test faults on (none is injected here).
        node_env.push(("ROAMDISK_TEST_FAULTS".to_owned(), "1".to_owned()));
        node_env.push(("ROAMDISK_CORE_BUG".to_owned(), bug.clone()));
    }
    say("starting the cluster".into());
    let cluster = playground::start(&playground::Options {
        dir: cluster_dir.clone(),
        sites: opts.scenario.sites.iter().map(|s| s.to_string()).collect(),
        nodes_per_site: opts.scenario.nodes_per_site,
        volumes: vec![(VOLUME.to_owned(), opts.volume_size)],
        base_port: opts.base_port,
        node_bin: opts.node_bin.clone(),
        wan,
        node_env,
    })
    .context("start the cluster")?;
    let disk_full_node = disk_full_node.filter(|_| !mounts.0.is_empty());
    let plan: Vec<Planned> = if disk_full_node.is_none() {
        let kept: Vec<Planned> = plan
            .into_iter()
            .filter(|p| p.kind != FaultKind::DiskFull)
            .collect();
        std::fs::write(out.join("schedule.json"), serde_json::to_vec_pretty(&kept)?)?;
        kept
    } else {
        plan
    };
    let mut ctx = Ctx::new(opts, cluster, disk_full_node)?;
    say(format!(
        "cluster up: {} nodes; volume {VOLUME} id {} at {}",
        ctx.cluster.manifest().nodes().count(),
        ctx.volume_id,
        ctx.home
    ));
    if let Some(rate) = opts.link_bandwidth {
        ctx.restore_links().context("cap the links between sites")?;
        say(format!(
            "links between sites capped at {} MiB/s",
            rate >> 20
        ));
    }

    // History writer.
    let (sink, events) = sync_channel::<Event>(HISTORY_QUEUE);
    let history_path = out.join("history.jsonl");
    let writer = {
        let file = std::fs::File::create(&history_path)?;
        std::thread::Builder::new()
            .name("history".into())
            .spawn(move || -> Result<History> {
                let mut w = BufWriter::new(file);
                let mut h = History::default();
                for e in events {
                    serde_json::to_writer(&mut w, &e)?;
                    w.write_all(b"\n")?;
                    h.push(e);
                }
                w.flush()?;
                Ok(h)
            })?
    };

    let t0 = Instant::now();
    ctx.t0 = t0;
    ctx.t0_unix_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let cfg = WorkloadConfig {
        seed: opts.seed,
        volumes: vec![VolumeTarget {
            name: VOLUME.to_owned(),
            tag: volume_tag(VOLUME),
            blocks: opts.blocks,
        }],
        connections: opts.connections,
        // Longer than a node's own deadline for a write (30 s): the node answers first,
        // so a write the workload saw fail can no longer land behind a newer one.
        op_timeout: Duration::from_secs(35),
        flush_every: (4, 32),
        read_percent: 30,
    };
    let home_nodes = ctx.site_nodes(&ctx.home.clone());
    write_cold_blocks(&home_nodes, opts, &sink, t0).context("write the cold blocks")?;
    let nodes: Nodes = Arc::new(RwLock::new(home_nodes));
    let load = Workload::start(cfg.clone(), Arc::clone(&nodes), sink.clone(), t0);
    let sampler = LagSampler::start(ctx.admin_addrs(), sink.clone(), t0);

    // The schedule.
    for p in &plan {
        let at = t0 + Duration::from_millis(p.at_ms);
        sleep_until(at);
        ctx.inject(p, &nodes, &sink, t0, &say);
    }
    sleep_until(t0 + opts.duration);

    // Heal everything and let the workload run on a little.
    say("healing: links, nodes, disks".into());
    ctx.heal_all(&sink, t0, &say);
    let healed_at = Instant::now();
    ctx.wait_for_leader(Duration::from_secs(60));
    sleep_until(healed_at + Duration::from_secs(3));
    say("stopping the workload".into());
    let mut summary = load.stop();
    for b in opts.blocks..opts.blocks + COLD_BLOCKS {
        summary.written.insert((0, b), 1);
    }
    say(format!("workload: {summary:?}"));
    sampler.stop();

    say("final verification through every node".into());
    let all_nodes: Vec<(u64, String)> = ctx
        .cluster
        .manifest()
        .nodes()
        .map(|n| (n.id, n.nbd.clone()))
        .collect();
    let verified = workload::final_verify(&cfg, &all_nodes, &sink, t0, &summary)
        .context("final verification")?;
    say(format!("final verification read {verified} blocks"));

    say("waiting for the replicas to converge".into());
    let (converged, convergence) = ctx.converge(CONVERGE_TIMEOUT);
    // Every drill ends with a verify: every replica compared block by block at one log
    // index, digests only (it finds a replica whose data agrees with its own hash
    // records and not with the others, which the convergence check above, comparing
    // whole files at different moments, may miss once writes resume).
    say("verifying every replica by digest at one index".into());
    let verify = ctx.verify_replicas();
    drop(sink);
    let history = writer.join().expect("history writer panicked")?;
    let mut result = crate::checker::check(&history);
    if !converged {
        result.violations.push(Violation {
            kind: "divergent_replicas".into(),
            vol: 0,
            block: None,
            at_us: t0.elapsed().as_micros() as u64,
            detail: format!(
                "replicas of {VOLUME} still differ {} s after the run: {}",
                CONVERGE_TIMEOUT.as_secs(),
                convergence
                    .iter()
                    .map(|d| format!("node {} {}", d.node, &d.digest[..12.min(d.digest.len())]))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    match &verify {
        Ok((0, _)) => {}
        Ok((n, r)) => result.violations.push(Violation {
            kind: "differing_blocks".into(),
            vol: 0,
            block: None,
            at_us: t0.elapsed().as_micros() as u64,
            detail: format!("volume verify found {n} blocks differing between replicas: {r}"),
        }),
        Err(e) => result.violations.push(Violation {
            kind: "differing_blocks".into(),
            vol: 0,
            block: None,
            at_us: t0.elapsed().as_micros() as u64,
            detail: format!("volume verify could not run: {e:#}"),
        }),
    }
    let (p50, p99) = report::write_latency_ms(&history);
    let report = Report {
        scenario: opts.scenario.name.to_owned(),
        seed: opts.seed,
        duration_s: opts.duration.as_secs_f64(),
        negative_control: opts.negative_control.then(|| NEGATIVE_CONTROL.to_owned()),
        faults_injected: history
            .faults
            .iter()
            .filter(|f| f.scheduled && f.applied)
            .count() as u64,
        faults_not_applied: history
            .faults
            .iter()
            .filter(|f| f.scheduled && !f.applied)
            .count() as u64,
        faults: history.faults.clone(),
        writes_acked: result.writes_acked,
        writes_failed: result.writes_failed,
        writes_verified: result.writes_verified,
        reads_checked: result.reads_checked,
        flushes_ok: result.flushes_ok,
        passed: result.violations.is_empty(),
        violations: result.violations,
        rto: result.rto,
        converged,
        convergence,
        p50_write_ms: p50,
        p99_write_ms: p99,
        max_lag_bytes: report::max_lag_bytes(&history),
        verify_differing_blocks: verify.as_ref().ok().map(|(n, _)| *n),
        command: opts.command.clone(),
    };
    report::write(&out, &report, &history)?;
    say(format!(
        "{}: {} faults, {} writes verified, {} violations; report in {}",
        if report.passed { "PASS" } else { "FAIL" },
        report.faults_injected,
        report.writes_verified,
        report.violations.len(),
        out.display()
    ));
    drop(ctx);
    drop(mounts);
    Ok(report)
}

/// Writes version 1 of the cold blocks through the first home node that works, then
/// flushes; every operation goes to the history like the workload's.
fn write_cold_blocks(
    nodes: &[(u64, String)],
    opts: &RunOptions,
    sink: &SyncSender<Event>,
    t0: Instant,
) -> Result<()> {
    use crate::history::{Op, OpRecord};
    let (node, addr) = nodes.first().context("no home node")?;
    let mut conn = crate::nbd::NbdConn::connect(addr, VOLUME, Duration::from_secs(30))?;
    let tag = volume_tag(VOLUME);
    let record = |op: Op, start_us: u64, r: &Result<()>| {
        let _ = sink.send(Event::Op(OpRecord {
            conn: COLD_CONN,
            vol: 0,
            node: *node,
            start_us,
            end_us: us(t0),
            op,
            error: r.as_ref().err().map(|e| format!("{e:#}")),
        }));
    };
    for block in opts.blocks..opts.blocks + COLD_BLOCKS {
        let start_us = us(t0);
        let data = crate::block::encode(tag, block, 1, opts.seed);
        let r = conn.write(block * BLOCK_SIZE as u64, &data);
        record(Op::Write { block, version: 1 }, start_us, &r);
        r?;
    }
    let start_us = us(t0);
    let r = conn.flush();
    record(Op::Flush, start_us, &r);
    r
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

fn us(t0: Instant) -> u64 {
    t0.elapsed().as_micros() as u64
}

/// The run's view of the cluster, and the faults it has in force.
struct Ctx {
    cluster: Cluster,
    wan: Option<ControlClient>,
    wan_profile: String,
    link_bandwidth: Option<u64>,
    sites: Vec<String>,
    /// node id -> site
    site_of: BTreeMap<u64, String>,
    volume_id: u64,
    /// The volume's home as the runner last saw it (the workload runs there).
    home: String,
    disk_full_node: Option<u64>,
    /// Nodes the runner killed and must restart.
    down: Vec<u64>,
    cluster_dir: PathBuf,
    blocks: u64,
    seed: u64,
    /// The run's start, and the wall clock then (Unix µs).
    t0: Instant,
    t0_unix_us: u64,
    /// History events a fault produced besides its own record (failovers).
    events: Vec<Event>,
}

impl Ctx {
    fn new(opts: &RunOptions, cluster: Cluster, disk_full_node: Option<u64>) -> Result<Ctx> {
        let m = cluster.manifest().clone();
        let wan = m
            .wan
            .as_ref()
            .map(|w| ControlClient::with_base_url(format!("http://{}", w.control)));
        let site_of = m
            .sites
            .iter()
            .flat_map(|s| s.nodes.iter().map(move |n| (n.id, s.name.clone())))
            .collect();
        let admin = AdminClient::with_timeout(&m.sites[0].nodes[0].admin, Duration::from_secs(10));
        let v = admin.volume(VOLUME)?;
        let volume_id = v["id"].as_u64().context("volume id")?;
        let home = v["home_site"].as_str().context("home site")?.to_owned();
        Ok(Ctx {
            cluster_dir: m.sites[0].nodes[0]
                .data_dir
                .parent()
                .context("node dirs have a parent")?
                .to_owned(),
            cluster,
            wan,
            wan_profile: opts.scenario.wan.to_owned(),
            link_bandwidth: opts.link_bandwidth,
            sites: m.sites.iter().map(|s| s.name.clone()).collect(),
            site_of,
            volume_id,
            home,
            disk_full_node,
            down: Vec::new(),
            blocks: opts.blocks,
            seed: opts.seed,
            t0: Instant::now(),
            t0_unix_us: 0,
            events: Vec::new(),
        })
    }

    fn site_nodes(&self, site: &str) -> Vec<(u64, String)> {
        self.cluster
            .manifest()
            .sites
            .iter()
            .filter(|s| s.name == site)
            .flat_map(|s| s.nodes.iter().map(|n| (n.id, n.nbd.clone())))
            .collect()
    }

    fn admin_addrs(&self) -> Vec<String> {
        self.cluster
            .manifest()
            .nodes()
            .map(|n| n.admin.clone())
            .collect()
    }

    /// An admin client on a running node, home site first.
    fn admin(&mut self) -> Option<AdminClient> {
        let m = self.cluster.manifest().clone();
        let mut ids: Vec<(bool, u64, String)> = m
            .nodes()
            .map(|n| (self.site_of[&n.id] != self.home, n.id, n.admin.clone()))
            .collect();
        ids.sort();
        ids.into_iter()
            .find(|(_, id, _)| self.cluster.is_running(*id))
            .map(|(_, _, a)| AdminClient::with_timeout(&a, Duration::from_secs(5)))
    }

    fn volume(&mut self) -> Option<Value> {
        self.admin()?.volume(VOLUME).ok()
    }

    fn other_sites(&self) -> Vec<String> {
        self.sites
            .iter()
            .filter(|s| **s != self.home)
            .cloned()
            .collect()
    }

    /// Injects `p`, holds it, undoes it, and records it. A fault the cluster refuses
    /// (no leader to kill yet, a move while another runs) is tried again for up to
    /// `FAULT_APPLY_RETRY_MS`; one that still cannot be applied is recorded as not
    /// applied, which fails the run.
    fn inject(
        &mut self,
        p: &Planned,
        nodes: &Nodes,
        sink: &SyncSender<Event>,
        t0: Instant,
        say: &dyn Fn(String),
    ) {
        let mut rng = fastrand::Rng::with_seed(p.target_seed);
        let start_us = us(t0);
        let hold = Duration::from_millis(p.hold_ms);
        let give_up = Instant::now() + Duration::from_millis(FAULT_APPLY_RETRY_MS);
        let outcome = loop {
            match self.apply(p.kind, &mut rng, hold, nodes, say) {
                Err(e) if Instant::now() < give_up => {
                    say(format!(
                        "{} not applied yet ({e:#}); trying again",
                        p.kind.name()
                    ));
                    std::thread::sleep(Duration::from_millis(FAULT_APPLY_RETRY_EVERY_MS));
                }
                r => break r,
            }
        };
        let (target, note, applied) = match outcome {
            Ok(t) => (t, None, true),
            Err(e) => ("-".to_owned(), Some(format!("not applied: {e:#}")), false),
        };
        say(format!(
            "{} {target}{}",
            p.kind.name(),
            note.as_deref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        ));
        let _ = sink.send(Event::Fault(FaultRecord {
            kind: p.kind.name().to_owned(),
            target,
            start_us,
            end_us: Some(us(t0)),
            note,
            applied,
            scheduled: true,
        }));
        for e in self.events.drain(..) {
            let _ = sink.send(e);
        }
    }

    /// Applies one fault, holds it for `hold`, and undoes it; returns its target.
    fn apply(
        &mut self,
        kind: FaultKind,
        rng: &mut fastrand::Rng,
        hold: Duration,
        nodes: &Nodes,
        say: &dyn Fn(String),
    ) -> Result<String> {
        let until = Instant::now() + hold;
        match kind {
            FaultKind::KillNode => {
                let ids: Vec<u64> = self.site_of.keys().copied().collect();
                let id = ids[rng.usize(..ids.len())];
                self.kill(id)?;
                sleep_until(until);
                self.restart_down()?;
                Ok(format!("node {id}"))
            }
            FaultKind::KillLeader => {
                let id = self
                    .volume()
                    .and_then(|v| v["leader"].as_u64())
                    .context("the volume has no leader to kill")?;
                self.kill(id)?;
                sleep_until(until);
                self.restart_down()?;
                Ok(format!("leader node {id}"))
            }
            FaultKind::SiteOutage => {
                let others = self.other_sites();
                let site = others
                    .get(rng.usize(..others.len().max(1)))
                    .context("one site")?;
                let ids: Vec<u64> = self
                    .site_of
                    .iter()
                    .filter(|(_, s)| *s == site)
                    .map(|(id, _)| *id)
                    .collect();
                for id in &ids {
                    self.kill(*id)?;
                }
                sleep_until(until);
                self.restart_down()?;
                Ok(format!("site {site}"))
            }
            FaultKind::PartitionSite => {
                let wan = self.wan.clone().context("no WAN")?;
                let others = self.other_sites();
                let site = others
                    .get(rng.usize(..others.len().max(1)))
                    .context("one site")?;
                for other in self.sites.iter().filter(|s| *s != site) {
                    wan.partition(site, other, Partition::Drop)?;
                    wan.partition(other, site, Partition::Drop)?;
                }
                sleep_until(until);
                wan.heal()?;
                Ok(format!("{site}<->*"))
            }
            FaultKind::PartitionOneWay => {
                let wan = self.wan.clone().context("no WAN")?;
                let others = self.other_sites();
                let site = others
                    .get(rng.usize(..others.len().max(1)))
                    .context("one site")?;
                let (from, to) = if rng.bool() {
                    (self.home.clone(), site.clone())
                } else {
                    (site.clone(), self.home.clone())
                };
                wan.partition(&from, &to, Partition::Hold)?;
                sleep_until(until);
                wan.heal()?;
                Ok(format!("{from}->{to} (hold)"))
            }
            FaultKind::DegradeLink => {
                let wan = self.wan.clone().context("no WAN")?;
                let others = self.other_sites();
                let site = others
                    .get(rng.usize(..others.len().max(1)))
                    .context("one site")?;
                let delay = rng.u32(20..=80) as f64;
                let rate = rng.u64(1..=4) << 20;
                for (a, b) in [(&self.home, site), (site, &self.home)] {
                    let base = wan.link(a, b)?;
                    wan.update(
                        a,
                        b,
                        &LinkUpdate {
                            delay_ms: Some(base.params.delay_ms + delay),
                            jitter_ms: Some(5.0),
                            bandwidth_bytes_per_sec: Some(Some(rate)),
                            ..LinkUpdate::default()
                        },
                    )?;
                }
                sleep_until(until);
                self.restore_links()?;
                Ok(format!(
                    "{}<->{site} +{delay} ms, {} MiB/s",
                    self.home,
                    rate >> 20
                ))
            }
            FaultKind::DiskFull => {
                let id = self
                    .disk_full_node
                    .context("no size-limited filesystem here")?;
                let dir = self.cluster_dir.join(format!("node-{id}"));
                let filler = dir.join("chaos-filler");
                let filled = fill_fs(&filler)?;
                sleep_until(until);
                std::fs::remove_file(&filler)?;
                if !self.cluster.is_running(id) {
                    say(format!("node {id} stopped on the full disk; restarting it"));
                    self.down.push(id);
                    self.restart_down()?;
                }
                Ok(format!("node {id} ({} MiB filled)", filled >> 20))
            }
            FaultKind::CorruptBlock => {
                let v = self.volume().context("volume unknown")?;
                let leader = v["leader"].as_u64();
                let voters: Vec<u64> = v["voters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_u64)
                    .filter(|id| Some(*id) != leader)
                    .collect();
                let id = *voters
                    .get(rng.usize(..voters.len().max(1)))
                    .context("a follower")?;
                // In place, under the running node: silent corruption, as a disk or a
                // stray write causes it (a restart would repair it by accident whenever
                // the node catches up by a block copy).
                let path = self
                    .cluster_dir
                    .join(format!("node-{id}/volumes/{}.img", self.volume_id));
                let cold = self.blocks..self.blocks + COLD_BLOCKS;
                let block = corrupt_a_block(&path, rng.u64(cold.clone()), cold)?;
                sleep_until(until);
                Ok(format!("node {id} block {block}"))
            }
            FaultKind::MoveVolume => {
                let others = self.other_sites();
                let to = others
                    .get(rng.usize(..others.len().max(1)))
                    .context("one site")?
                    .clone();
                let admin = self.admin().context("no node answers")?;
                // The VM migrates first; its writes are forwarded until the disk follows.
                *nodes.write().expect("nodes lock") = self.site_nodes(&to);
                if let Err(e) = admin.move_volume(VOLUME, &to) {
                    *nodes.write().expect("nodes lock") = self.site_nodes(&self.home);
                    return Err(e.context(format!("move to {to}")));
                }
                let deadline = Instant::now() + MOVE_TIMEOUT;
                loop {
                    if let Some(v) = self.volume() {
                        if v["home_site"].as_str() == Some(&to) && v["moving"].is_null() {
                            break;
                        }
                    }
                    if Instant::now() > deadline {
                        bail!(
                            "move to {to} not finished after {} s",
                            MOVE_TIMEOUT.as_secs()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                let from = std::mem::replace(&mut self.home, to.clone());
                Ok(format!("{VOLUME} {from}->{to}"))
            }
            FaultKind::SiteLoss => self.site_loss(false, rng, hold, nodes, say),
            FaultKind::SplitBrain => self.site_loss(true, rng, hold, nodes, say),
            FaultKind::TransferLeader => {
                let v = self.volume().context("volume unknown")?;
                let leader = v["leader"].as_u64().context("no leader")?;
                let voters: Vec<u64> = v["voters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_u64)
                    .filter(|id| *id != leader && self.cluster.is_running(*id))
                    .collect();
                let to = *voters
                    .get(rng.usize(..voters.len().max(1)))
                    .context("no voter")?;
                self.admin()
                    .context("no node answers")?
                    .transfer_leader(VOLUME, to)?;
                Ok(format!("node {leader}->node {to}"))
            }
        }
    }

    fn kill(&mut self, id: u64) -> Result<()> {
        if !self.cluster.is_running(id) {
            bail!("node {id} is already down");
        }
        self.cluster.kill(id)?;
        self.down.push(id);
        Ok(())
    }

    fn restart_down(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        for id in std::mem::take(&mut self.down) {
            if let Err(e) = self.cluster.restart(id) {
                errors.push(format!("node {id}: {e:#}"));
                self.down.push(id);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("restart failed: {}", errors.join("; "))
        }
    }

    /// Clears partitions and degraded links, frees full disks and restarts every node
    /// that is down (killed or exited by itself; the latter is recorded).
    fn heal_all(&mut self, sink: &SyncSender<Event>, t0: Instant, say: &dyn Fn(String)) {
        if let Some(wan) = &self.wan {
            let _ = wan.heal();
        }
        if let Err(e) = self.restore_links() {
            say(format!("restore the links: {e:#}"));
        }
        if let Some(id) = self.disk_full_node {
            let _ = std::fs::remove_file(self.cluster_dir.join(format!("node-{id}/chaos-filler")));
        }
        for id in self.cluster.exited() {
            if !self.down.contains(&id) {
                say(format!("node {id} had exited on its own; restarting it"));
                let _ = sink.send(Event::Fault(FaultRecord {
                    kind: "node_exited".into(),
                    target: format!("node {id}"),
                    start_us: us(t0),
                    end_us: None,
                    note: Some(format!(
                        "found stopped at the end of the run; see {}/node-{id}/node.log",
                        self.cluster_dir.display()
                    )),
                    applied: true,
                    scheduled: false,
                }));
                self.down.push(id);
            }
        }
        if let Err(e) = self.restart_down() {
            say(format!("{e:#}"));
        }
    }

    /// Puts every link back to the scenario's profile, capped at `--link-mib-per-sec`.
    fn restore_links(&self) -> Result<()> {
        let Some(wan) = &self.wan else {
            return Ok(());
        };
        wan.apply_profile(&self.wan_profile)?;
        if let Some(rate) = self.link_bandwidth {
            for a in &self.sites {
                for b in self.sites.iter().filter(|b| *b != a) {
                    wan.update(
                        a,
                        b,
                        &LinkUpdate {
                            bandwidth_bytes_per_sec: Some(Some(rate)),
                            ..LinkUpdate::default()
                        },
                    )?;
                }
            }
        }
        Ok(())
    }

    fn wait_for_leader(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.volume().is_some_and(|v| v["leader"].is_u64()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until every replica's extent file holds the same blocks; returns whether
    /// they converged and the last digests.
    fn converge(&mut self, timeout: Duration) -> (bool, Vec<ReplicaDigest>) {
        let deadline = Instant::now() + timeout;
        loop {
            // A node that stopped on its own after the heal (e.g. it was still stopping
            // after a disk error) would never catch up: start it again.
            for id in self.cluster.exited() {
                let _ = self.cluster.restart(id);
            }
            let digests = self.digests();
            let same = digests.windows(2).all(|w| w[0].digest == w[1].digest);
            if (same && !digests.is_empty()) || Instant::now() > deadline {
                return (same && !digests.is_empty(), digests);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Compares every replica of the volume by digest at one index (`volume verify`);
    /// returns the differing blocks, or why the verify could not run.
    fn verify_replicas(&mut self) -> Result<(u64, Value)> {
        let addr = self.admin().context("no node answers")?.addr().to_owned();
        let long = AdminClient::with_timeout(&addr, Duration::from_secs(600));
        let r = long.verify_volume(VOLUME, false)?;
        Ok((r["differing_blocks"].as_u64().unwrap_or(0), r))
    }

    fn digests(&mut self) -> Vec<ReplicaDigest> {
        let Some(v) = self.volume() else {
            return vec![];
        };
        let replicas: Vec<u64> = ["voters", "learners"]
            .iter()
            .flat_map(|k| v[*k].as_array().cloned().unwrap_or_default())
            .filter_map(|x| x.as_u64())
            .collect();
        replicas
            .into_iter()
            .map(|id| {
                let path = self
                    .cluster_dir
                    .join(format!("node-{id}/volumes/{}.img", self.volume_id));
                ReplicaDigest {
                    vol: 0,
                    volume: VOLUME.to_owned(),
                    node: id,
                    site: self.site_of.get(&id).cloned().unwrap_or_default(),
                    digest: image_digest(&path).unwrap_or_else(|e| format!("unreadable: {e}")),
                }
            })
            .collect()
    }
}

/// blake3 over (index, content) of every non-zero 4 KiB block: equal for two replicas
/// holding the same data whatever their sparseness or length.
pub fn image_digest(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut index = 0u64;
    loop {
        let n = read_full(&mut f, &mut buf)?;
        if n == 0 {
            break;
        }
        for block in buf[..n].chunks(BLOCK_SIZE) {
            if block.iter().any(|b| *b != 0) {
                h.update(&index.to_le_bytes());
                h.update(block);
            }
            index += 1;
        }
    }
    Ok(h.finalize().to_hex().to_string())
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Flips bytes in the middle of the first non-zero block at or after `from` (wrapping
/// within `range`); returns its index.
fn corrupt_a_block(path: &Path, from: u64, range: std::ops::Range<u64>) -> Result<u64> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let mut buf = vec![0u8; BLOCK_SIZE];
    let blocks = range.end.saturating_sub(range.start);
    for i in 0..blocks {
        let b = range.start + (from.saturating_sub(range.start) + i) % blocks;
        f.seek(SeekFrom::Start(b * BLOCK_SIZE as u64))?;
        if read_full(&mut f, &mut buf)? < BLOCK_SIZE || buf.iter().all(|x| *x == 0) {
            continue;
        }
        for x in &mut buf[1024..1088] {
            *x ^= 0xa5;
        }
        f.seek(SeekFrom::Start(b * BLOCK_SIZE as u64))?;
        f.write_all(&buf)?;
        f.sync_all()?;
        return Ok(b);
    }
    bail!("no written block in {}", path.display())
}

/// Fills the filesystem holding `filler` (allocating all its free space); returns the
/// bytes allocated.
fn fill_fs(filler: &Path) -> Result<u64> {
    let f = std::fs::File::create(filler)?;
    let dir = filler.parent().context("filler has a directory")?;
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: statvfs on a valid C string with a zeroed out-parameter.
    let free = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            bail!(
                "statvfs {}: {}",
                dir.display(),
                std::io::Error::last_os_error()
            );
        }
        st.f_bavail as u64 * st.f_frsize as u64
    };
    use std::os::fd::AsRawFd;
    // Allocate in steps: the last one may not fit exactly.
    let mut allocated = 0u64;
    let mut step = free.max(1 << 20);
    while step >= 4096 {
        // SAFETY: fallocate on an open file descriptor.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, allocated as i64, step as i64) };
        if r == 0 {
            allocated += step;
        } else {
            step /= 2;
        }
    }
    Ok(allocated)
}

/// tmpfs mounts made for a run, unmounted when dropped.
#[derive(Default)]
struct Mounts(Vec<PathBuf>);

impl Mounts {
    fn tmpfs(&mut self, dir: &Path, bytes: u64) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={bytes}"))
            .arg("tmpfs")
            .arg(dir)
            .status()
            .context("run mount")?;
        if !status.success() {
            bail!("mount -t tmpfs {} failed ({status})", dir.display());
        }
        self.0.push(dir.to_owned());
        Ok(())
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for d in self.0.drain(..) {
            // The node's data goes with the tmpfs: keep its log for the post-mortem.
            let _ = std::fs::copy(d.join("node.log"), d.with_extension("log"));
            let _ = std::process::Command::new("umount").arg(&d).status();
        }
    }
}

/// Unmounts any tmpfs a previous run left under `dir`.
fn unmount_under(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let prefix = dir.to_string_lossy().to_string();
    for line in mounts.lines() {
        if let Some(point) = line.split_whitespace().nth(1) {
            if point.starts_with(&prefix) {
                let _ = std::process::Command::new("umount").arg(point).status();
            }
        }
    }
}

/// Samples every remote site's lag once a second into the history.
struct LagSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl LagSampler {
    fn start(admins: Vec<String>, sink: SyncSender<Event>, t0: Instant) -> LagSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let clients: Vec<AdminClient> = admins
                .iter()
                .map(|a| AdminClient::with_timeout(a, Duration::from_secs(2)))
                .collect();
            let mut next = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                let t_us = us(t0);
                let v = clients.iter().find_map(|c| c.volume(VOLUME).ok());
                for l in v
                    .as_ref()
                    .and_then(|v| v["site_lag"].as_array())
                    .into_iter()
                    .flatten()
                {
                    let _ = sink.send(Event::Lag(LagSample {
                        t_us,
                        vol: 0,
                        site: l["site"].as_str().unwrap_or("?").to_owned(),
                        bytes: l["bytes"].as_u64().unwrap_or(0),
                        entries: l["entries"].as_u64().unwrap_or(0),
                        seconds_ms: (l["seconds"].as_f64().unwrap_or(0.0) * 1000.0) as u64,
                    }));
                }
                next += Duration::from_secs(1);
                sleep_until(next);
            }
        });
        LagSampler { stop, thread }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_ignores_sparseness_and_trailing_zeroes() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let b = d.path().join("b");
        let mut data = vec![0u8; 3 * BLOCK_SIZE];
        data[BLOCK_SIZE + 5] = 7;
        std::fs::write(&a, &data).unwrap();
        data.extend_from_slice(&[0u8; BLOCK_SIZE * 4]);
        std::fs::write(&b, &data).unwrap();
        assert_eq!(image_digest(&a).unwrap(), image_digest(&b).unwrap());
        data[5] = 1;
        std::fs::write(&b, &data).unwrap();
        assert_ne!(image_digest(&a).unwrap(), image_digest(&b).unwrap());
    }

    #[test]
    fn corrupting_changes_a_written_block_only() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        let mut data = vec![0u8; 8 * BLOCK_SIZE];
        data[5 * BLOCK_SIZE..6 * BLOCK_SIZE].fill(9);
        std::fs::write(&p, &data).unwrap();
        assert_eq!(corrupt_a_block(&p, 2, 0..8).unwrap(), 5);
        let after = std::fs::read(&p).unwrap();
        assert_ne!(
            after[5 * BLOCK_SIZE..6 * BLOCK_SIZE],
            data[5 * BLOCK_SIZE..6 * BLOCK_SIZE]
        );
        assert_eq!(after[..5 * BLOCK_SIZE], data[..5 * BLOCK_SIZE]);
        assert_eq!(after[6 * BLOCK_SIZE..], data[6 * BLOCK_SIZE..]);
        assert_eq!(
            corrupt_a_block(&p, 7, 4..8).unwrap(),
            5,
            "wraps within the range"
        );
        assert!(corrupt_a_block(&d.path().join("img"), 0, 0..4).is_err());
    }
}
