//! The node core's decisions, tested on small clusters of cores over `MemLogStore`s in
//! one thread: messages are delivered by hand, syncs complete when the test lets them,
//! and time moves only when the test moves it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use raft::eraftpb::{ConfState, Message};

use super::*;
use crate::command::VolumeCommand;
use crate::logstore::MemLogStore;

const V: VolumeId = VolumeId(1);
const G: GroupId = GroupId(1);
const TICK: Duration = Duration::from_millis(100);

enum Wire {
    Raft(Message),
    Written(Written),
    SyncWanted(SyncWanted),
    Quarantine(QuarantineReport),
    Tail(TailReport),
}

/// What a node's driver saw, in order.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Applied(u64),
    Answered(ReqId),
}

struct TestNode {
    core: NodeCore<MemLogStore>,
    cfg: NodeConfig,
    log: Arc<MemLogStore>,
    answers: BTreeMap<ReqId, Answer>,
    seen: Vec<Seen>,
    recovering: Vec<(GroupId, LogIndex)>,
    sync_started: bool,
}

struct Harness {
    nodes: BTreeMap<NodeId, TestNode>,
    net: VecDeque<(NodeId, NodeId, GroupId, u64, Wire)>,
    now: Time,
    next_req: u64,
    /// Syncs complete as soon as they start (otherwise only in `finish_syncs`).
    auto_sync: bool,
    /// Nodes whose messages are dropped, both ways.
    cut: BTreeSet<NodeId>,
    /// A partition: messages between these nodes and the others are dropped.
    side: BTreeSet<NodeId>,
}

fn write_cmd(offset: u64, byte: u8) -> Vec<u8> {
    VolumeCommand::Write {
        offset,
        data: &[byte; 16],
    }
    .encode()
}

impl Harness {
    /// `n` nodes, all voters of the metadata group and of volume group `G`.
    fn new(n: u64, bug: Option<CoreBug>) -> Harness {
        let ids: Vec<NodeId> = (1..=n).map(NodeId).collect();
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
            cfg.reconcile = false;
            cfg.bug = bug;
            cfg.retained_log_entries = 0;
            // The lease has tests of its own (`lease.rs`).
            cfg.lease = None;
            let log = Arc::new(MemLogStore::new());
            let mut core =
                NodeCore::open(cfg.clone(), Arc::clone(&log), Arc::default(), Time::ZERO).unwrap();
            let mut cs = ConfState::default();
            cs.voters = ids.iter().map(|n| n.0).collect();
            core.create_group(
                Time::ZERO,
                G,
                GroupState {
                    conf_state: cs,
                    ..Default::default()
                },
            )
            .unwrap();
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
        h
    }

    fn node(&mut self, id: u64) -> &mut TestNode {
        self.nodes.get_mut(&NodeId(id)).unwrap()
    }

    fn req(&mut self) -> ReqId {
        self.next_req += 1;
        ReqId(self.next_req)
    }

    /// Executes a node's effects.
    fn effects(&mut self, id: NodeId) {
        let n = self.nodes.get_mut(&id).unwrap();
        for e in n.core.take_effects() {
            match e {
                Effect::Send {
                    to,
                    group,
                    epoch,
                    msg,
                } => self.net.push_back((id, to, group, epoch, Wire::Raft(msg))),
                Effect::Written {
                    to,
                    group,
                    epoch,
                    w,
                } => self.net.push_back((id, to, group, epoch, Wire::Written(w))),
                Effect::SyncWanted {
                    to,
                    group,
                    epoch,
                    want,
                } => self
                    .net
                    .push_back((id, to, group, epoch, Wire::SyncWanted(want))),
                Effect::Quarantine {
                    to,
                    group,
                    epoch,
                    report,
                } => self
                    .net
                    .push_back((id, to, group, epoch, Wire::Quarantine(report))),
                Effect::Tail {
                    to,
                    group,
                    epoch,
                    tail,
                } => self.net.push_back((id, to, group, epoch, Wire::Tail(tail))),
                Effect::StartSync => {
                    assert!(!n.sync_started, "a second sync started while one runs");
                    n.sync_started = true;
                }
                Effect::Apply { index, .. } => n.seen.push(Seen::Applied(index.0)),
                Effect::Answer { id: req, answer } => {
                    assert!(
                        n.answers.insert(req, answer).is_none(),
                        "request {req:?} answered twice"
                    );
                    n.seen.push(Seen::Answered(req));
                }
                Effect::Recovering(list) => n.recovering = list,
                _ => {}
            }
        }
    }

    fn process(&mut self, id: NodeId) {
        let now = self.now;
        let n = self.nodes.get_mut(&id).unwrap();
        n.core.process(now).unwrap();
        self.effects(id);
        if self.auto_sync {
            self.finish_sync(id);
        }
    }

    fn finish_sync(&mut self, id: NodeId) {
        let now = self.now;
        let n = self.nodes.get_mut(&id).unwrap();
        if !n.sync_started {
            return;
        }
        n.sync_started = false;
        n.log.sync().unwrap();
        n.core.log_synced(now, Ok(())).unwrap();
        self.effects(id);
    }

    /// Completes every sync in flight and the ones they lead to (time moves on by
    /// milliseconds, past any gathering window), delivering what they release.
    fn finish_syncs(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for _ in 0..8 {
            self.now = self.now + Duration::from_millis(1);
            for &id in &ids {
                self.process(id);
                self.finish_sync(id);
            }
            self.deliver();
        }
    }

    /// Delivers messages until none is left (each delivery followed by a round).
    fn deliver(&mut self) {
        let mut steps = 0;
        while let Some((from, to, group, epoch, w)) = self.net.pop_front() {
            steps += 1;
            assert!(steps < 100_000, "messages never settle");
            if self.cut.contains(&from)
                || self.cut.contains(&to)
                || (!self.side.is_empty() && self.side.contains(&from) != self.side.contains(&to))
            {
                continue;
            }
            let n = self.nodes.get_mut(&to).unwrap();
            let now = self.now;
            match w {
                Wire::Raft(m) => n.core.step(now, group, epoch, m),
                Wire::Written(w) => n.core.written(group, epoch, from, w),
                Wire::SyncWanted(want) => n.core.sync_wanted(group, epoch, want),
                Wire::Quarantine(r) => n.core.quarantine_report(now, group, epoch, from, r),
                Wire::Tail(t) => n.core.tail(now, group, epoch, from, t),
            }
            self.process(to);
            let due: Vec<NodeId> = self
                .nodes
                .iter()
                .filter(|(_, n)| n.core.next_wakeup(self.now).is_some_and(|t| t <= self.now))
                .map(|(id, _)| *id)
                .collect();
            for id in due {
                self.process(id);
            }
        }
    }

    /// Moves time on by `d`, a tick at a time, delivering everything in between.
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now = self.now + TICK;
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for id in ids {
                let now = self.now;
                self.nodes.get_mut(&id).unwrap().core.tick(now);
                self.process(id);
            }
            self.deliver();
        }
    }

    fn leader(&self) -> Option<u64> {
        self.nodes
            .iter()
            .filter(|(id, _)| !self.cut.contains(id))
            .find(|(_, n)| n.core.raft(G).is_some_and(|r| r.is_leader()))
            .map(|(id, _)| id.0)
    }

    /// Runs until group `G` has a leader, and it has committed an entry of its term.
    fn elect(&mut self) -> u64 {
        for _ in 0..100 {
            self.advance(TICK);
            if let Some(l) = self.leader() {
                if self.nodes[&NodeId(l)]
                    .core
                    .raft(G)
                    .unwrap()
                    .committed_in_term()
                {
                    return l;
                }
            }
        }
        panic!("no leader");
    }

    fn propose(&mut self, on: u64, data: Vec<u8>, ack: Ack) -> ReqId {
        let id = self.req();
        let now = self.now;
        self.node(on).core.propose(now, G, None, data, ack, id);
        self.process(NodeId(on));
        id
    }

    fn answer(&mut self, on: u64, id: ReqId) -> Option<Answer> {
        self.node(on).answers.get(&id).cloned()
    }

    fn commit(&self, on: u64) -> u64 {
        self.nodes[&NodeId(on)]
            .core
            .raft(G)
            .unwrap()
            .commit_index()
            .0
    }

    /// The node's process dies and starts again at once: with `power_loss`, the machine
    /// rebooted and what was written but not synced is gone.
    fn crash_restart(&mut self, id: u64, power_loss: bool) {
        let now = self.now;
        let n = self.node(id);
        if power_loss {
            n.log.crash();
        }
        n.sync_started = false;
        n.answers.clear();
        let mut cfg = n.cfg.clone();
        cfg.rebooted = power_loss;
        n.core = NodeCore::open(cfg, Arc::clone(&n.log), Arc::default(), now).unwrap();
        self.effects(NodeId(id));
        self.process(NodeId(id));
        // Messages in flight to or from the dead process are gone.
        self.net
            .retain(|(from, to, _, _, _)| from.0 != id && to.0 != id);
    }

    /// Whether the log of `on` holds an entry at `index` with `term`.
    fn holds(&self, on: u64, index: u64, term: u64) -> bool {
        self.nodes[&NodeId(on)]
            .core
            .raft(G)
            .unwrap()
            .log_term(LogIndex(index))
            == Some(Term(term))
    }
}

#[test]
fn a_write_is_answered_once_a_quorum_wrote_it_before_any_sync() {
    let mut h = Harness::new(3, None);
    let l = h.elect();
    h.auto_sync = false;
    let commit = h.commit(l);
    let id = h.propose(l, write_cmd(0, 1), Ack::Written);
    assert_eq!(h.answer(l, id), None, "the leader alone wrote it");
    h.deliver();
    assert_eq!(h.answer(l, id), Some(Ok(Outcome::Volume)));
    assert_eq!(
        h.commit(l),
        commit,
        "answered before any sync let it commit"
    );
    // A flush waits for the commit, which waits for the syncs.
    let f = h.req();
    let now = h.now;
    h.node(l).core.flush(now, G, None, f);
    h.process(NodeId(l));
    h.deliver();
    assert_eq!(h.answer(l, f), None);
    h.finish_syncs();
    h.deliver();
    h.finish_syncs();
    assert_eq!(h.answer(l, f), Some(Ok(Outcome::Volume)));
    assert!(h.commit(l) > commit);
}

#[test]
fn a_write_committed_acknowledgement_waits_for_the_commit() {
    let mut h = Harness::new(3, None);
    let l = h.elect();
    h.auto_sync = false;
    let id = h.propose(l, write_cmd(0, 1), Ack::Committed);
    h.deliver();
    assert_eq!(h.answer(l, id), None, "written on a quorum, not synced");
    h.finish_syncs();
    h.deliver();
    h.finish_syncs();
    assert_eq!(h.answer(l, id), Some(Ok(Outcome::Volume)));
}

#[test]
fn early_answers_need_a_quorum_unless_the_negative_control_is_on() {
    for (bug, early) in [(None, false), (Some(CoreBug::EarlyAckOnLeaderWrite), true)] {
        let mut h = Harness::new(3, bug);
        let l = h.elect();
        let followers: Vec<NodeId> = h.nodes.keys().copied().filter(|n| n.0 != l).collect();
        h.cut.extend(followers);
        let id = h.propose(l, write_cmd(0, 1), Ack::Written);
        h.deliver();
        assert_eq!(h.answer(l, id).is_some(), early, "bug {bug:?}");
    }
}

#[test]
fn a_read_waits_for_the_highest_early_answer_to_apply() {
    let mut h = Harness::new(3, None);
    let l = h.elect();
    h.auto_sync = false;
    let w = h.propose(l, write_cmd(0, 7), Ack::Written);
    h.deliver();
    assert!(h.answer(l, w).is_some());
    let r = h.req();
    let now = h.now;
    h.node(l).core.read(now, G, None, r);
    h.process(NodeId(l));
    h.deliver();
    assert_eq!(h.answer(l, r), None, "the write is not applied yet");
    h.finish_syncs();
    h.deliver();
    h.finish_syncs();
    let seen = &h.node(l).seen;
    let read_at = seen
        .iter()
        .position(|s| *s == Seen::Answered(r))
        .expect("read answered");
    let applied_at = seen
        .iter()
        .rposition(|s| matches!(s, Seen::Applied(_)))
        .expect("write applied");
    assert!(applied_at < read_at, "{seen:?}");
}

#[test]
fn a_flush_before_the_commit_is_only_the_negative_control() {
    for (bug, early) in [(None, false), (Some(CoreBug::FlushBeforeCommit), true)] {
        let mut h = Harness::new(3, bug);
        let l = h.elect();
        h.auto_sync = false;
        h.propose(l, write_cmd(0, 1), Ack::Written);
        h.deliver();
        let f = h.req();
        let now = h.now;
        h.node(l).core.flush(now, G, None, f);
        h.process(NodeId(l));
        assert_eq!(h.answer(l, f).is_some(), early, "bug {bug:?}");
    }
}

#[test]
fn syncs_are_put_off_until_something_waits_for_the_commit() {
    let mut h = Harness::new(3, None);
    let l = h.elect();
    h.auto_sync = false;
    let w = h.propose(l, write_cmd(0, 1), Ack::Written);
    h.deliver();
    assert!(h.answer(l, w).is_some(), "answered early");
    let now = h.now;
    let due = h.node(l).core.next_wakeup(now).expect("a sync is pending");
    assert_eq!(
        due,
        now + super::sync::SYNC_LAZY_MAX,
        "only early answers wait"
    );
    assert!(!h.node(l).sync_started);
    let f = h.req();
    h.node(l).core.flush(now, G, None, f);
    h.process(NodeId(l));
    // Urgent now: at once, or after the gathering window while syncs run back to back.
    let due = h.node(l).core.next_wakeup(now);
    assert!(
        h.node(l).sync_started || due.is_some_and(|t| t <= now + super::sync::SYNC_GATHER),
        "a flush makes the sync urgent ({due:?})"
    );
    // The leader asks the others to sync too.
    assert!(h
        .net
        .iter()
        .any(|(_, _, _, _, w)| matches!(w, Wire::SyncWanted(_))));
}

#[test]
fn site_durable_writes_wait_for_a_remote_replica() {
    let mut h = Harness::new(3, None);
    let l = h.elect();
    let remote: u64 = (1..=3).find(|n| *n != l).unwrap();
    let now = h.now;
    h.node(l)
        .core
        .set_site_durable(G, true, vec![NodeId(remote)]);
    h.cut.insert(NodeId(remote));
    let id = h.propose(l, write_cmd(0, 1), Ack::Written);
    h.advance(Duration::from_millis(500));
    let _ = now;
    assert!(h.commit(l) > 0);
    assert_eq!(
        h.answer(l, id),
        None,
        "committed at home, not yet elsewhere"
    );
    h.cut.clear();
    h.advance(Duration::from_secs(2));
    assert_eq!(h.answer(l, id), Some(Ok(Outcome::Volume)));
}

#[test]
fn proposals_held_through_a_leader_transfer_go_to_the_new_leader() {
    let mut h = Harness::new(3, None);
    let l = h.elect();
    let to: u64 = (1..=3).find(|n| *n != l).unwrap();
    // Keep the transfer running: the target does not hear of it yet.
    h.cut.insert(NodeId(to));
    h.node(l).core.transfer_leader(G, NodeId(to));
    h.process(NodeId(l));
    let id = h.propose(l, write_cmd(0, 1), Ack::Written);
    assert_eq!(h.answer(l, id), None, "held while the transfer runs");
    h.cut.clear();
    h.advance(Duration::from_secs(3));
    match h.answer(l, id) {
        Some(Err(Refused::NotLeader { leader, .. })) => assert_eq!(leader, Some(NodeId(to))),
        Some(Ok(_)) => {} // the transfer timed out and the leader proposed it itself
        other => panic!("held proposal answered {other:?}"),
    }
}

/// Brings a follower behind the leader's log, so that it receives a snapshot and must
/// copy its blocks; returns (leader, follower, recovery point).
fn follower_recovering(h: &mut Harness) -> (u64, u64, LogIndex) {
    let l = h.elect();
    let f: u64 = (1..=3).find(|n| *n != l).unwrap();
    h.cut.insert(NodeId(f));
    for i in 0..20 {
        h.propose(l, write_cmd(i * 16, i as u8), Ack::Committed);
        h.advance(TICK);
    }
    // Checkpoint and compact everything on the leader: the follower is past the log.
    let plan = h.node(l).core.checkpoint_begin(|_| false).unwrap().unwrap();
    h.node(l).core.checkpoint_end(plan, Vec::new()).unwrap();
    h.cut.clear();
    h.advance(Duration::from_secs(2));
    let point = h
        .node(f)
        .core
        .recovering(G)
        .expect("the follower must copy blocks");
    assert_eq!(h.node(f).recovering, vec![(G, point)]);
    (l, f, point)
}

#[test]
fn a_block_copy_for_an_earlier_recovery_point_is_refused() {
    let mut h = Harness::new(3, None);
    let (l, f, point) = follower_recovering(&mut h);
    // Entries committed meanwhile are deferred, not applied.
    let applied_before = h.node(f).seen.len();
    h.propose(l, write_cmd(0, 99), Ack::Committed);
    h.advance(Duration::from_millis(500));
    assert_eq!(
        h.node(f).seen.len(),
        applied_before,
        "deferred while recovering"
    );
    let earlier = LogIndex(point.0 - 1);
    assert!(!h.node(f).core.catch_up_done(G, earlier, point).unwrap());
    assert_eq!(h.node(f).core.recovering(G), Some(point));
    assert!(h.node(f).core.catch_up_done(G, point, point).unwrap());
    h.effects(NodeId(f));
    assert_eq!(h.node(f).core.recovering(G), None);
    assert!(h.node(f).recovering.is_empty(), "published");
    assert!(
        h.node(f).seen[applied_before..]
            .iter()
            .any(|s| matches!(s, Seen::Applied(_))),
        "the deferred entries were replayed"
    );
    // The recovery record goes with the next checkpoint, which makes the copy durable.
    let key = recovering_key(G);
    assert!(h.node(f).log.get(&key).unwrap().is_some());
    let plan = h.node(f).core.checkpoint_begin(|_| false).unwrap().unwrap();
    assert!(plan.volumes.iter().any(|(v, _)| *v == V));
    h.node(f).core.checkpoint_end(plan, Vec::new()).unwrap();
    assert!(h.node(f).log.get(&key).unwrap().is_none());
}

/// A finished copy whose source had applied past this replica's log is not one state
/// until the replica applies that far: reads wait and a failover plan is told
/// (`whole_at`), also after a restart in between (the group test of issue 17 found a
/// plan re-forming a group from such a replica).
#[test]
fn a_copy_ahead_of_the_log_stays_not_whole_across_a_restart() {
    let mut h = Harness::new(3, None);
    let (_, f, point) = follower_recovering(&mut h);
    h.cut.insert(NodeId(f));
    let copy_end = LogIndex(point.0 + 50);
    assert!(h.node(f).core.catch_up_done(G, point, copy_end).unwrap());
    let now = h.now;
    let whole_at = |h: &mut Harness| h.node(f).core.replica_report(now, G).unwrap().whole_at;
    assert_eq!(whole_at(&mut h), copy_end.0);
    let plan = h.node(f).core.checkpoint_begin(|_| false).unwrap().unwrap();
    h.node(f).core.checkpoint_end(plan, Vec::new()).unwrap();
    assert!(h.node(f).log.get(&recovering_key(G)).unwrap().is_none());
    assert!(h.node(f).log.get(&whole_key(G)).unwrap().is_some());
    h.crash_restart(f, false);
    assert_eq!(h.node(f).core.recovering(G), None, "the copy is done");
    assert_eq!(
        whole_at(&mut h),
        copy_end.0,
        "a restart keeps the copy's end"
    );
    let last = h.node(f).core.replica_report(now, G).unwrap().last_index;
    assert!(
        last < copy_end.0,
        "the log ends before the copy's end: {last}"
    );
}

/// A repair that starts and ends while a checkpoint is in flight makes that checkpoint
/// stale for its group: the checkpoint's batch (made before the repair) must not delete
/// the repair's recovery record (found in review).
#[test]
fn a_repair_during_a_checkpoint_keeps_its_recovery_record() {
    let mut h = Harness::new(3, None);
    let (_, f, point) = follower_recovering(&mut h);
    assert!(h.node(f).core.catch_up_done(G, point, point).unwrap());
    let plan = h.node(f).core.checkpoint_begin(|_| false).unwrap().unwrap();
    h.node(f).core.corrupted(V).unwrap();
    let again = h
        .node(f)
        .core
        .recovering(G)
        .expect("the repair copies blocks");
    assert!(h.node(f).core.catch_up_done(G, again, again).unwrap());
    h.node(f).core.checkpoint_end(plan, Vec::new()).unwrap();
    assert!(
        h.node(f).log.get(&recovering_key(G)).unwrap().is_some(),
        "the repair's record goes with a checkpoint made after it, not before"
    );
    let plan = h.node(f).core.checkpoint_begin(|_| false).unwrap().unwrap();
    h.node(f).core.checkpoint_end(plan, Vec::new()).unwrap();
    assert!(h.node(f).log.get(&recovering_key(G)).unwrap().is_none());
}

#[test]
fn the_negative_control_accepts_a_stale_block_copy() {
    let mut h = Harness::new(3, Some(CoreBug::AcceptStaleCatchUp));
    let (_, f, point) = follower_recovering(&mut h);
    assert!(h
        .node(f)
        .core
        .catch_up_done(G, LogIndex(point.0 - 1), point)
        .unwrap());
}

#[test]
fn a_checkpoint_records_the_index_it_began_with_and_compacts_behind_it() {
    let mut h = Harness::new(3, None);
    let l = h.elect();
    for i in 0..5 {
        h.propose(l, write_cmd(i * 16, 1), Ack::Committed);
    }
    h.advance(Duration::from_millis(300));
    let plan = h.node(l).core.checkpoint_begin(|_| false).unwrap().unwrap();
    let (v, at) = plan.volumes[0];
    assert_eq!(v, V);
    assert!(
        h.node(l)
            .core
            .checkpoint_begin(|_| false)
            .unwrap()
            .is_none(),
        "one checkpoint at a time"
    );
    // Applied while the extents sync: not covered by this checkpoint.
    h.propose(l, write_cmd(0, 2), Ack::Committed);
    h.advance(Duration::from_millis(300));
    assert!(h.node(l).core.applied(G).unwrap() > at);
    assert_eq!(h.node(l).log.state(G).unwrap().unwrap().applied_index, 0);
    h.node(l).core.checkpoint_end(plan, Vec::new()).unwrap();
    let st = h.node(l).log.state(G).unwrap().unwrap();
    assert_eq!(st.applied_index, at.0);
    assert!(
        st.truncated_index <= at.0,
        "never compacted past the durable index"
    );
}

#[test]
fn every_request_is_answered_exactly_once() {
    // A small random workload with partitions and leader changes; afterwards nothing
    // may wait unanswered (the harness fails on a second answer).
    let mut h = Harness::new(3, None);
    h.elect();
    let mut rng = 12345u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut issued: Vec<(u64, ReqId, u64)> = Vec::new();
    for step in 0..300u64 {
        let on = 1 + next() % 3;
        let now = h.now;
        let id = h.req();
        let kind = next() % 5;
        match kind {
            0 | 1 => h.node(on).core.propose(
                now,
                G,
                None,
                write_cmd(step % 64, step as u8),
                Ack::Written,
                id,
            ),
            2 => h
                .node(on)
                .core
                .propose(now, G, None, write_cmd(0, 0), Ack::Committed, id),
            3 => h.node(on).core.flush(now, G, None, id),
            _ => h.node(on).core.read(now, G, None, id),
        }
        issued.push((on, id, step));
        h.process(NodeId(on));
        if next() % 40 == 0 {
            let victim = NodeId(1 + next() % 3);
            if !h.cut.remove(&victim) {
                h.cut.insert(victim);
            }
        }
        h.advance(TICK);
    }
    h.cut.clear();
    h.advance(Duration::from_secs(5));
    h.finish_syncs();
    for (on, id, step) in issued {
        assert!(
            h.nodes[&NodeId(on)].answers.contains_key(&id),
            "request {id:?} (step {step}) on node {on} never answered; {:?}",
            h.nodes[&NodeId(on)].core.status(h.now)
        );
    }
}

mod failover;
mod recovery;
