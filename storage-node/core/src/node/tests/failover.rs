//! The lease and forced failovers, on cores that place their groups from the metadata
//! (`reconcile` on): three sites, the home cut off, the volume re-formed elsewhere.

use super::*;
use crate::failover::plan_volume;
use crate::meta::{Durability, MetaCommand, NodeInfo};

/// The layout of these tests: osaka 1-3 (the home), hokkaido 4-6, fukuoka 7; every node
/// a metadata voter, so that osaka alone is a minority of it.
const LAYOUT: [(u64, &str); 7] = [
    (1, "osaka"),
    (2, "osaka"),
    (3, "osaka"),
    (4, "hokkaido"),
    (5, "hokkaido"),
    (6, "hokkaido"),
    (7, "fukuoka"),
];
const OSAKA: [u64; 3] = [1, 2, 3];
const WALL: u64 = 1_796_380_000_000;

impl Harness {
    /// A cluster of `LAYOUT` with leases on, the nodes registered and volume `vm1`
    /// (group `G`) created at osaka with `durability`.
    fn sites(durability: Durability) -> Harness {
        let ids: Vec<NodeId> = LAYOUT.iter().map(|(n, _)| NodeId(*n)).collect();
        let mut h = Harness {
            nodes: BTreeMap::new(),
            net: VecDeque::new(),
            now: Time::ZERO,
            next_req: 0,
            auto_sync: true,
            cut: BTreeSet::new(),
            side: BTreeSet::new(),
        };
        for &id in &ids {
            let mut cfg = NodeConfig::new(
                id,
                GroupConfig::default(),
                slog::Logger::root(slog::Discard, slog::o!()),
            );
            cfg.initial_meta_voters.clone_from(&ids);
            cfg.retained_log_entries = 0;
            cfg.wall_epoch_unix_ms = WALL;
            let log = Arc::new(MemLogStore::new());
            let core =
                NodeCore::open(cfg.clone(), Arc::clone(&log), Arc::default(), Time::ZERO).unwrap();
            h.nodes.insert(
                id,
                TestNode {
                    core,
                    cfg,
                    log,
                    answers: BTreeMap::new(),
                    seen: Vec::new(),
                    recovering: Vec::new(),
                    sync_started: false,
                },
            );
        }
        for id in ids {
            h.effects(id);
        }
        for (id, site) in LAYOUT {
            let _ = h.meta_ok(MetaCommand::AddNode(NodeInfo {
                id: NodeId(id),
                site: site.into(),
                peer_addr: String::new(),
                admin_addr: String::new(),
                nbd_addr: String::new(),
            }));
        }
        h.meta_ok(MetaCommand::CreateVolume {
            name: "vm1".into(),
            size: 1 << 20,
            replicas: 3,
            home_site: Some("osaka".into()),
            durability,
        })
        .expect("volume created");
        h
    }

    /// The metadata leader among the nodes on `side` (any node when no partition).
    fn meta_leader_in(&self, side: &[u64]) -> Option<u64> {
        side.iter().copied().find(|n| {
            self.nodes[&NodeId(*n)]
                .core
                .raft(META_GROUP)
                .is_some_and(|r| r.is_leader() && r.committed_in_term())
        })
    }

    /// Proposes a metadata command through a metadata leader (of the nodes outside
    /// osaka when it is partitioned) and runs until it applied there.
    fn meta_ok(&mut self, cmd: MetaCommand) -> crate::meta::MetaResult {
        let side: Vec<u64> = if self.side.is_empty() {
            LAYOUT.iter().map(|(n, _)| *n).collect()
        } else {
            LAYOUT
                .iter()
                .map(|(n, _)| *n)
                .filter(|n| !self.side.contains(&NodeId(*n)))
                .collect()
        };
        for _ in 0..200 {
            if let Some(l) = self.meta_leader_in(&side) {
                let id = self.req();
                let now = self.now;
                self.node(l)
                    .core
                    .propose(now, META_GROUP, None, cmd.encode(), Ack::Committed, id);
                self.process(NodeId(l));
                for _ in 0..100 {
                    self.advance(TICK);
                    match self.answer(l, id) {
                        Some(Ok(Outcome::Meta(r))) => return r,
                        Some(other) => panic!("metadata command refused: {other:?}"),
                        None => {}
                    }
                }
                panic!("metadata command never applied");
            }
            self.advance(TICK);
        }
        panic!("no metadata leader");
    }

    /// Proposes a write in `G` of `epoch` on `on`.
    fn write_in(&mut self, on: u64, epoch: Option<u64>, byte: u8) -> ReqId {
        let id = self.req();
        let now = self.now;
        self.node(on)
            .core
            .propose(now, G, epoch, write_cmd(0, byte), Ack::Written, id);
        self.process(NodeId(on));
        id
    }

    fn status(&self, on: u64) -> GroupStatus {
        let n = &self.nodes[&NodeId(on)];
        n.core
            .status(self.now)
            .into_iter()
            .find(|g| g.group == G.0)
            .expect("group on node")
    }

    /// Runs until node `on` leads `G` and holds its lease.
    fn until_serving(&mut self, on: u64) {
        for _ in 0..200 {
            let now = self.now;
            let n = &self.nodes[&NodeId(on)];
            if n.core
                .raft(G)
                .is_some_and(|r| r.is_leader() && r.committed_in_term())
                && n.core.lease_valid(now)
            {
                return;
            }
            self.advance(TICK);
        }
        panic!("node {on} never served");
    }
}

#[test]
fn a_cut_off_home_stops_answering_when_its_lease_ends_and_its_writes_wait() {
    let mut h = Harness::sites(Durability::Node);
    h.until_serving(1);
    let w1 = h.write_in(1, None, 1);
    h.advance(TICK);
    assert_eq!(h.answer(1, w1), Some(Ok(Outcome::Volume)));
    // Osaka (3 of the 7 metadata voters) is cut off from the other sites.
    h.side = OSAKA.iter().copied().map(NodeId).collect();
    let w2 = h.write_in(1, None, 2);
    h.advance(TICK);
    assert_eq!(
        h.answer(1, w2),
        Some(Ok(Outcome::Volume)),
        "within its lease the home still answers"
    );
    h.advance(LEASE + TICK);
    assert!(!h.nodes[&NodeId(1)].core.lease_valid(h.now));
    let commit = h.commit(1);
    let w3 = h.write_in(1, None, 3);
    h.advance(Duration::from_secs(3));
    assert!(
        h.commit(1) > commit,
        "osaka's quorum still commits the write"
    );
    assert_eq!(h.answer(1, w3), None, "but no answer without a lease");
    assert!(h.status(1).suspended);
    // Healed: the lease comes back and the write is answered, never failed.
    h.side.clear();
    for _ in 0..50 {
        h.advance(TICK);
        if h.answer(1, w3).is_some() {
            break;
        }
    }
    assert_eq!(h.answer(1, w3), Some(Ok(Outcome::Volume)));
}

/// The replica reports of the nodes outside osaka, as a plan gathers them.
fn reports(h: &Harness) -> Vec<ReplicaReport> {
    [4u64, 5, 6, 7]
        .iter()
        .filter_map(|n| h.nodes[&NodeId(*n)].core.replica_report(h.now, G))
        .collect()
}

#[test]
fn a_failover_fences_the_old_home_and_the_new_epoch_answers_after_the_lease() {
    let mut h = Harness::sites(Durability::Node);
    h.until_serving(1);
    for b in 1..=5 {
        h.write_in(1, None, b);
    }
    // Past a tail report (every 250 ms) and the learners' catch-up.
    h.advance(Duration::from_millis(600));
    h.side = OSAKA.iter().copied().map(NodeId).collect();
    let partitioned_at = h.now;
    let during = h.write_in(1, None, 9);
    h.advance(TICK);
    assert_eq!(
        h.answer(1, during),
        Some(Ok(Outcome::Volume)),
        "answered at osaka within its lease: a write the failover may lose"
    );
    // The plan, made outside osaka.
    let cluster = h.nodes[&NodeId(4)].core.cluster().clone();
    let v = cluster.volumes["vm1"].clone();
    let reports = reports(&h);
    let plan = plan_volume("hokkaido", &v, &cluster, &reports, &[], false).unwrap();
    assert!(!plan.lossless);
    let after = plan.rpo.after_unix_ms.expect("stamped entries");
    assert!(
        after < WALL + partitioned_at.as_micros() / 1000,
        "what was answered before the partition is before the stated time"
    );
    assert!(
        plan.rpo.as_of_unix_ms.is_some(),
        "the leader's tail report arrived"
    );
    let source = plan.node.0;
    let r = h.meta_ok(MetaCommand::Failover {
        name: "vm1".into(),
        to: "hokkaido".into(),
        node: plan.node,
        index: plan.last_index,
        term: plan.last_term,
        committed: plan.commit,
        term_floor: plan.term_floor,
        generation: plan.generation,
        plan: "test".into(),
        at_unix_ms: WALL,
        rpo: plan.rpo.clone(),
    });
    let v2 = r.unwrap().unwrap();
    assert_eq!(v2.epoch, 2);
    let applied_at = h.now;
    // The source leads the new epoch at once, alone, and holds its answers for the
    // lease and the drift after it applied the failover.
    h.advance(TICK);
    assert!(h.nodes[&NodeId(source)].core.raft(G).unwrap().is_leader());
    assert_eq!(h.status(source).epoch, 2);
    let old_epoch = h.write_in(source, Some(0), 10);
    assert!(
        matches!(
            h.answer(source, old_epoch),
            Some(Err(Refused::Fenced { asked: 0, .. }))
        ),
        "a request of the old epoch is refused: {:?}",
        h.answer(source, old_epoch)
    );
    let new = h.write_in(source, Some(2), 11);
    h.advance(Duration::from_secs(2));
    assert_eq!(h.answer(source, new), None, "still within the fencing wait");
    assert!(h.status(source).suspended);
    while h.now < applied_at + LEASE + LEASE_DRIFT + TICK * 3 {
        h.advance(TICK);
    }
    assert_eq!(h.answer(source, new), Some(Ok(Outcome::Volume)));
    // Osaka, still cut off, answered nothing after its lease ran out.
    let late = h.write_in(1, None, 12);
    h.advance(TICK);
    assert_eq!(h.answer(1, late), None);
    // Healed: osaka learns the failover, is fenced, and refuses what waited.
    h.side.clear();
    for _ in 0..50 {
        h.advance(TICK);
    }
    for n in OSAKA {
        let st = h.status(n);
        assert!(st.fenced, "node {n} fenced");
        assert!(!st.is_leader());
    }
    assert!(
        matches!(h.answer(1, late), Some(Err(Refused::Fenced { .. }))),
        "{:?}",
        h.answer(1, late)
    );
    // The new epoch never took osaka's frames: its log is the source's.
    assert_eq!(h.status(source).epoch, 2);
    assert!(h.nodes[&NodeId(source)].core.raft(G).unwrap().is_leader());
    // Discarded: osaka's replicas start empty as learners and copy blocks.
    h.meta_ok(MetaCommand::DiscardDivergent {
        name: "vm1".into(),
        node: None,
    })
    .expect("discarded");
    for n in OSAKA {
        let st = h.status(n);
        assert!(!st.fenced);
        assert_eq!(st.epoch, 2);
        assert!(
            h.nodes[&NodeId(n)]
                .recovering
                .iter()
                .any(|(g, p)| *g == G && p.0 == 0),
            "node {n} copies its blocks from the new home"
        );
    }
}

#[test]
fn a_site_durable_volume_fails_over_losing_nothing() {
    let mut h = Harness::sites(Durability::Site);
    h.until_serving(1);
    let mut answered = Vec::new();
    for b in 1..=5 {
        answered.push(h.write_in(1, None, b));
        h.advance(TICK);
    }
    for id in &answered {
        assert_eq!(h.answer(1, *id), Some(Ok(Outcome::Volume)));
    }
    let last_answered = h.nodes[&NodeId(1)].core.raft(G).unwrap().last_index().0;
    h.side = OSAKA.iter().copied().map(NodeId).collect();
    let cut = h.write_in(1, None, 6);
    h.advance(Duration::from_secs(1));
    assert_eq!(h.answer(1, cut), None, "no other site has it: not answered");
    let cluster = h.nodes[&NodeId(4)].core.cluster().clone();
    let v = cluster.volumes["vm1"].clone();
    let plan = plan_volume("hokkaido", &v, &cluster, &reports(&h), &[], false).unwrap();
    assert!(plan.lossless, "{}", plan.rpo_text);
    assert!(
        plan.last_index >= last_answered,
        "{} < {last_answered}",
        plan.last_index
    );
    h.meta_ok(MetaCommand::Failover {
        name: "vm1".into(),
        to: "hokkaido".into(),
        node: plan.node,
        index: plan.last_index,
        term: plan.last_term,
        committed: plan.commit,
        term_floor: plan.term_floor,
        generation: plan.generation,
        plan: "test".into(),
        at_unix_ms: WALL,
        rpo: plan.rpo.clone(),
    })
    .unwrap();
    h.advance(TICK * 2);
    let source = plan.node.0;
    let g = h.nodes[&NodeId(source)].core.raft(G).unwrap();
    assert!(g.is_leader());
    // Every answered write's entry is in the new epoch's committed log.
    for i in 1..=last_answered {
        assert!(g.log_term(LogIndex(i)).is_some() || i < g.first_index().0);
    }
    assert!(g.commit_index().0 >= plan.last_index);
}

#[test]
fn a_site_durable_volume_degrades_after_its_delay_and_recovers_once_a_remote_caught_up() {
    use crate::meta::OnNoSite;
    let mut h = Harness::sites(Durability::Site);
    h.meta_ok(MetaCommand::SetPolicy {
        name: "vm1".into(),
        on_no_site: OnNoSite::DegradeAfter { ms: 1000 },
    })
    .expect("policy set");
    h.until_serving(1);
    let before = h.write_in(1, None, 1);
    h.advance(TICK * 2);
    assert_eq!(h.answer(1, before), Some(Ok(Outcome::Volume)));
    // Cut off from both other sites, but within its lease (the metadata majority is
    // outside osaka): the write waits for another site, then the volume degrades.
    h.side = OSAKA.iter().copied().map(NodeId).collect();
    let w = h.write_in(1, None, 2);
    h.advance(Duration::from_millis(600));
    assert_eq!(h.answer(1, w), None, "still waiting for another site");
    assert!(!h.status(1).degraded);
    h.advance(Duration::from_millis(600));
    assert_eq!(
        h.answer(1, w),
        Some(Ok(Outcome::Volume)),
        "degraded: answered"
    );
    assert!(h.status(1).degraded);
    let during = h.write_in(1, None, 3);
    h.advance(TICK);
    assert_eq!(h.answer(1, during), Some(Ok(Outcome::Volume)));
    // Healed: a remote replica catches up and the volume is site-durable again.
    h.side.clear();
    for _ in 0..50 {
        h.advance(TICK);
        if !h.status(1).degraded {
            break;
        }
    }
    assert!(
        !h.status(1).degraded,
        "site-durable again once a remote caught up"
    );
    h.side = OSAKA.iter().copied().map(NodeId).collect();
    let after = h.write_in(1, None, 4);
    h.advance(Duration::from_millis(500));
    assert_eq!(h.answer(1, after), None, "waits for another site again");
}

#[test]
fn a_suspended_site_durable_volume_waits_for_good() {
    let mut h = Harness::sites(Durability::Site);
    h.until_serving(1);
    h.side = OSAKA.iter().copied().map(NodeId).collect();
    let w = h.write_in(1, None, 1);
    h.advance(Duration::from_secs(3));
    assert_eq!(h.answer(1, w), None);
    assert!(!h.status(1).degraded);
    h.side.clear();
    for _ in 0..50 {
        h.advance(TICK);
        if h.answer(1, w).is_some() {
            break;
        }
    }
    assert_eq!(
        h.answer(1, w),
        Some(Ok(Outcome::Volume)),
        "answered once another site has it"
    );
}
