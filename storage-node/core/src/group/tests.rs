//! A deterministic in-process cluster over `MemLogStore`s that drives `RaftGroup`s in
//! the documented Ready order, with a byte-map state machine. It checks elections,
//! replication, power loss, snapshots, joint-consensus membership changes, leader
//! transfer and ReadIndex.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use raft::eraftpb::{
    ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState, Message,
};

use super::*;
use crate::command::VolumeCommand;
use crate::logstore::MemLogStore;

const G: GroupId = GroupId(1);

/// State machine: offset → byte, plus the applied index. Shared with the snapshot
/// callback so that a snapshot carries the current state.
#[derive(Default, Clone, Debug, PartialEq)]
struct Sm {
    bytes: BTreeMap<u64, u8>,
    applied: u64,
}

struct Peer {
    id: NodeId,
    store: Arc<MemLogStore>,
    group: Option<RaftGroup<MemLogStore>>,
    sm: Arc<Mutex<Sm>>,
    /// Durable state-machine image (the crash rule: applied index persisted with data).
    sm_durable: Sm,
}

struct Cluster {
    peers: BTreeMap<NodeId, Peer>,
    net: VecDeque<Message>,
    down: Vec<NodeId>,
    logger: slog::Logger,
}

fn snapshot_fn(sm: Arc<Mutex<Sm>>) -> crate::group::SnapshotData {
    Arc::new(move |_| {
        let sm = sm.lock().unwrap();
        let pairs: Vec<(u64, u8)> = sm.bytes.iter().map(|(k, v)| (*k, *v)).collect();
        Ok(crate::codec::encode(&(sm.applied, pairs)).unwrap())
    })
}

impl Cluster {
    fn new(voters: &[u64]) -> Cluster {
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut c = Cluster {
            peers: BTreeMap::new(),
            net: VecDeque::new(),
            down: vec![],
            logger,
        };
        for &id in voters {
            let mut cs = ConfState::default();
            cs.voters = voters.to_vec();
            c.add_peer(NodeId(id), Some(cs));
        }
        c
    }

    /// Adds a peer process; `conf` is its bootstrap membership, or `None` for a new
    /// replica that will receive a snapshot.
    fn add_peer(&mut self, id: NodeId, conf: Option<ConfState>) {
        let store = Arc::new(MemLogStore::new());
        let mut state = GroupState::default();
        if let Some(cs) = conf {
            state.conf_state = cs;
        }
        let mut b = LogBatch::default();
        b.push(LogOp::Create { group: G, state });
        store.write(b).unwrap();
        store.sync().unwrap();
        let sm = Arc::new(Mutex::new(Sm::default()));
        let mut p = Peer {
            id,
            store,
            group: None,
            sm,
            sm_durable: Sm::default(),
        };
        self.open(&mut p);
        self.peers.insert(id, p);
    }

    fn open(&self, p: &mut Peer) {
        *p.sm.lock().unwrap() = p.sm_durable.clone();
        let g = RaftGroup::open(
            G,
            p.id,
            Arc::clone(&p.store),
            &GroupConfig::default(),
            snapshot_fn(Arc::clone(&p.sm)),
            0,
            0,
            &self.logger,
        )
        .unwrap();
        p.group = Some(g);
    }

    fn group(&mut self, id: u64) -> &mut RaftGroup<MemLogStore> {
        self.peers
            .get_mut(&NodeId(id))
            .unwrap()
            .group
            .as_mut()
            .unwrap()
    }

    fn leader(&self) -> Option<u64> {
        self.peers
            .values()
            .filter(|p| !self.down.contains(&p.id))
            .find(|p| p.group.as_ref().unwrap().is_leader())
            .map(|p| p.id.0)
    }

    /// One round: tick everyone, process all Readies in order, deliver all messages.
    fn round(&mut self, tick: bool) -> Vec<(u64, ReadState)> {
        let mut reads = vec![];
        let ids: Vec<NodeId> = self.peers.keys().copied().collect();
        for id in ids {
            if self.down.contains(&id) {
                continue;
            }
            let p = self.peers.get_mut(&id).unwrap();
            let g = p.group.as_mut().unwrap();
            if tick {
                g.tick();
            }
            while let Some(mut work) = g.ready() {
                self.net.extend(work.messages.drain(..));
                if let Some(snap) = &work.snapshot {
                    let (applied, pairs): (u64, Vec<(u64, u8)>) =
                        crate::codec::decode(&snap.data).unwrap();
                    let mut sm = p.sm.lock().unwrap();
                    sm.bytes = pairs.into_iter().collect();
                    sm.applied = applied;
                }
                let mut batch = std::mem::take(&mut work.persist);
                apply(g, &p.sm, work.committed, &mut batch);
                p.store.write(batch).unwrap();
                if work.must_sync {
                    p.store.sync().unwrap();
                }
                self.net.extend(work.persisted_messages);
                reads.extend(work.read_states.into_iter().map(|r| (id.0, r)));
                let adv = g.advance();
                self.net.extend(adv.messages);
                let mut batch = adv.persist;
                apply(g, &p.sm, adv.committed, &mut batch);
                // Crash rule: the state machine image and its applied index become durable together.
                let applied = p.sm.lock().unwrap().applied;
                if applied > 0 {
                    batch.push(LogOp::Applied {
                        group: G,
                        index: applied,
                    });
                }
                p.store.write(batch).unwrap();
                p.store.sync().unwrap();
                p.sm_durable = p.sm.lock().unwrap().clone();
                g.advance_apply_to(LogIndex(applied));
            }
        }
        let msgs: Vec<Message> = self.net.drain(..).collect();
        for m in msgs {
            let to = NodeId(m.to);
            if self.down.contains(&to) || self.down.contains(&NodeId(m.from)) {
                continue;
            }
            if let Some(p) = self.peers.get_mut(&to) {
                let _ = p.group.as_mut().unwrap().step(m);
            }
        }
        reads
    }

    fn run(&mut self, rounds: usize) {
        for _ in 0..rounds {
            self.round(true);
        }
    }

    fn settle(&mut self) {
        for _ in 0..50 {
            self.round(false);
        }
    }

    fn elect(&mut self) -> u64 {
        for _ in 0..200 {
            self.round(true);
            if let Some(l) = self.leader() {
                self.settle();
                return l;
            }
        }
        panic!("no leader elected");
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> LogIndex {
        let l = self.leader().expect("leader");
        let (index, _) = self
            .group(l)
            .propose(VolumeCommand::Write { offset, data }.encode(), 0)
            .unwrap();
        self.settle();
        index
    }

    fn sm(&self, id: u64) -> Sm {
        self.peers[&NodeId(id)].sm.lock().unwrap().clone()
    }

    fn power_loss(&mut self, id: u64) {
        let p = self.peers.get_mut(&NodeId(id)).unwrap();
        p.store.crash();
        p.group = None;
    }

    fn restart(&mut self, id: u64) {
        let mut p = self.peers.remove(&NodeId(id)).unwrap();
        self.open(&mut p);
        self.peers.insert(NodeId(id), p);
        self.down.retain(|d| d.0 != id);
    }
}

fn apply(
    g: &mut RaftGroup<MemLogStore>,
    sm: &Mutex<Sm>,
    entries: Vec<Entry>,
    batch: &mut LogBatch,
) {
    let mut sm = sm.lock().unwrap();
    for a in g.apply_committed(entries, batch).unwrap() {
        match a {
            Applied::Command { index, data, .. } => {
                if index.0 <= sm.applied {
                    continue; // idempotent replay after a restart
                }
                if let VolumeCommand::Write { offset, data } = VolumeCommand::decode(&data).unwrap()
                {
                    for (i, b) in data.iter().enumerate() {
                        sm.bytes.insert(offset + i as u64, *b);
                    }
                }
                sm.applied = index.0;
            }
            Applied::Internal { index } => sm.applied = sm.applied.max(index.0),
        }
    }
}

#[test]
fn three_voters_elect_replicate_and_agree() {
    let mut c = Cluster::new(&[1, 2, 3]);
    c.elect();
    c.write(0, b"hello");
    c.write(3, b"p!");
    let want = c.sm(1);
    assert_eq!(
        want.bytes.values().copied().collect::<Vec<u8>>(),
        b"help!".to_vec()
    );
    assert_eq!(c.sm(2), want);
    assert_eq!(c.sm(3), want);
}

#[test]
fn follower_power_loss_keeps_acknowledged_state_and_catches_up() {
    let mut c = Cluster::new(&[1, 2, 3]);
    let l = c.elect();
    c.write(0, b"abc");
    let f = [1, 2, 3].into_iter().find(|&i| i != l).unwrap();
    c.power_loss(f);
    c.down.push(NodeId(f));
    c.write(10, b"xyz"); // committed by the two others
    c.restart(f);
    c.run(30);
    c.settle();
    assert_eq!(c.sm(f), c.sm(l));
    assert_eq!(c.sm(f).bytes.len(), 6);
}

#[test]
fn leader_loss_elects_a_new_leader_that_has_every_committed_write() {
    let mut c = Cluster::new(&[1, 2, 3]);
    let old = c.elect();
    c.write(0, b"committed");
    c.power_loss(old);
    c.down.push(NodeId(old));
    let new = c.elect();
    assert_ne!(new, old);
    assert_eq!(c.sm(new).bytes.len(), 9);
    c.write(100, b"more");
    c.restart(old);
    c.run(30);
    c.settle();
    assert_eq!(c.sm(old), c.sm(new));
}

#[test]
fn new_replica_catches_up_by_snapshot_then_joint_consensus_replaces_a_voter() {
    let mut c = Cluster::new(&[1, 2, 3]);
    let l = c.elect();
    for i in 0..20u64 {
        c.write(i * 10, &[i as u8; 4]);
    }
    // Compact the leader's log so that the new replica needs a snapshot.
    let applied = c.group(l).applied_index().0;
    let mut b = LogBatch::default();
    b.push(LogOp::Compact {
        group: G,
        index: applied,
    });
    c.peers[&NodeId(l)].store.write(b).unwrap();

    c.add_peer(NodeId(4), None);
    let mut cc = ConfChangeV2::default();
    let mut add = ConfChangeSingle::default();
    add.set_change_type(ConfChangeType::AddLearnerNode);
    add.node_id = 4;
    cc.mut_changes().push(add);
    c.group(l).propose_conf_change(cc.clone()).unwrap();
    // A second change while the first is pending is refused, not silently dropped.
    assert!(matches!(
        c.group(l).propose_conf_change(cc),
        Err(ProposeError::Raft(_))
    ));
    // So is removing the leader itself.
    let mut remove_me = ConfChangeV2::default();
    let mut rm = ConfChangeSingle::default();
    rm.set_change_type(ConfChangeType::RemoveNode);
    rm.node_id = l;
    remove_me.mut_changes().push(rm);
    assert!(matches!(
        c.group(l).propose_conf_change(remove_me),
        Err(ProposeError::Raft(_))
    ));
    c.run(20);
    c.settle();
    assert_eq!(
        c.sm(4).bytes,
        c.sm(l).bytes,
        "learner caught up through the snapshot"
    );
    assert!(c.group(l).conf_state().learners.contains(&4));

    // Joint consensus: promote 4, demote 1 to learner, in one change.
    let l = c.leader().unwrap();
    let mut cc = ConfChangeV2::default();
    cc.set_transition(ConfChangeTransition::Explicit);
    let mut promote = ConfChangeSingle::default();
    promote.set_change_type(ConfChangeType::AddNode);
    promote.node_id = 4;
    let mut demote = ConfChangeSingle::default();
    demote.set_change_type(ConfChangeType::AddLearnerNode);
    demote.node_id = 1;
    cc.mut_changes().push(promote);
    cc.mut_changes().push(demote);
    c.group(l).propose_conf_change(cc).unwrap();
    c.run(10);
    c.settle();
    let l = c.leader().unwrap();
    // Leave the joint configuration (explicit transition).
    c.group(l)
        .propose_conf_change(ConfChangeV2::default())
        .unwrap();
    c.run(10);
    c.settle();
    let mut cs = c.group(c.leader().unwrap()).conf_state();
    cs.voters.sort();
    assert_eq!(cs.voters, vec![2, 3, 4]);
    assert_eq!(cs.learners, vec![1]);
    assert!(cs.voters_outgoing.is_empty(), "joint configuration left");
    c.write(500, b"after");
    for id in 1..=4 {
        assert_eq!(c.sm(id).bytes.get(&500), Some(&b'a'), "node {id}");
    }
}

#[test]
fn leader_transfer_and_follower_read_index() {
    let mut c = Cluster::new(&[1, 2, 3]);
    let l = c.elect();
    let target = [1, 2, 3].into_iter().find(|&i| i != l).unwrap();
    c.write(0, b"x");
    c.group(l).transfer_leader(NodeId(target));
    c.settle();
    assert_eq!(c.leader(), Some(target));
    let follower = [1, 2, 3].into_iter().find(|&i| i != target).unwrap();
    let w = c.write(1, b"y");
    c.group(follower).read_index(b"ctx".to_vec());
    let mut got = vec![];
    for _ in 0..10 {
        got.extend(c.round(false));
    }
    let (who, rs) = got
        .into_iter()
        .find(|(who, _)| *who == follower)
        .expect("read state on the follower");
    assert_eq!(who, follower);
    assert_eq!(rs.request_ctx, b"ctx".to_vec());
    assert!(rs.index >= w.0, "read index covers the last write");
}

#[test]
fn proposals_on_a_follower_are_refused_with_a_leader_hint() {
    let mut c = Cluster::new(&[1, 2, 3]);
    let l = c.elect();
    let f = [1, 2, 3].into_iter().find(|&i| i != l).unwrap();
    match c.group(f).propose(b"x".to_vec(), 0) {
        Err(ProposeError::NotLeader { leader }) => assert_eq!(leader, Some(NodeId(l))),
        other => panic!("expected NotLeader, got {other:?}"),
    }
}
