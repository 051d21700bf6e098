//! Protocol-aware recovery (`node::recovery`): the synced mark, the rewrite at open, the
//! quarantine after a reboot and what ends it.

use std::time::Duration;

use raft::eraftpb::Message;

use super::*;

/// The schedule quarantine exists for: a write answered early on the leader's and one
/// follower's write; that follower loses power (it forgets the write) and reboots; the
/// leader is cut off; the third voter, which never had the write, and the rebooted one
/// could elect a leader without it. Quarantined, the rebooted voter grants no vote until
/// the leader is back, and the write survives. With the negative control (no quarantine),
/// the write is lost: the schedule that loses an answered write on the old code.
#[test]
fn a_rebooted_voter_does_not_help_elect_a_leader_without_writes_it_forgot() {
    for bug in [None, Some(CoreBug::NoQuarantine)] {
        let mut h = Harness::new(3, bug);
        let l = h.elect();
        let mut others = (1..=3).filter(|n| *n != l);
        let (b, c) = (others.next().unwrap(), others.next().unwrap());
        h.cut.insert(NodeId(c));
        h.auto_sync = false;
        let w = h.propose(l, write_cmd(0, 42), Ack::Written);
        h.deliver();
        assert_eq!(
            h.answer(l, w),
            Some(Ok(Outcome::Volume)),
            "answered on two writes"
        );
        let (index, term) = {
            let r = h.nodes[&NodeId(l)].core.raft(G).unwrap();
            (r.last_index().0, r.term().0)
        };
        assert!(h.holds(b, index, term));
        // b loses power before any sync covers the write, and comes back without it.
        h.crash_restart(b, true);
        assert!(!h.holds(b, index, term), "the write was never synced on b");
        assert_eq!(h.node(b).core.quarantined(G), bug.is_none());
        h.cut.clear();
        h.cut.insert(NodeId(l));
        h.auto_sync = true;
        h.advance(Duration::from_secs(5));
        let leader = h.leader();
        if bug.is_some() {
            let leader = leader.expect("b and c elect a leader at once");
            assert!(
                !h.holds(leader, index, term),
                "the new leader lacks the answered write"
            );
            continue;
        }
        assert_eq!(
            leader, None,
            "no leader while the only other holder is away"
        );
        h.cut.clear();
        let leader = h.elect();
        assert!(
            h.holds(leader, index, term),
            "the write answered early survived"
        );
        h.advance(Duration::from_secs(1));
        assert!(
            !h.node(b).core.quarantined(G),
            "b's synced log caught up with the leader's"
        );
        assert!(h.commit(leader) >= index);
    }
}

/// A voter gone for good (its disk lost) must not stop the group forever: without a
/// leader heard for `QUARANTINE_MAX`, the rebooted voter ends its quarantine and the two
/// that remain elect a leader.
#[test]
fn a_quarantine_ends_after_quarantine_max_without_a_leader() {
    let mut h = Harness::new(3, None);
    let l = h.elect();
    let b = (1..=3).find(|n| *n != l).unwrap();
    h.crash_restart(b, true);
    assert!(h.node(b).core.quarantined(G));
    h.cut.insert(NodeId(l));
    h.advance(QUARANTINE_MAX / 2);
    assert_eq!(h.leader(), None, "no leader while b is quarantined");
    assert!(h.node(b).core.quarantined(G));
    h.advance(QUARANTINE_MAX);
    assert!(!h.node(b).core.quarantined(G), "the quarantine timed out");
    let leader = h.leader().expect("b and the third voter elect a leader");
    assert_ne!(leader, l);
}

/// Quarantine ends by itself when at least half of the voters rebooted: the others could
/// never elect a leader without them (a whole site's power loss).
#[test]
fn quarantine_ends_when_half_of_the_voters_rebooted() {
    let mut h = Harness::new(3, None);
    let l = h.elect();
    let b = (1..=3).find(|n| *n != l).unwrap();
    h.crash_restart(l, true);
    h.crash_restart(b, true);
    assert!(h.node(l).core.quarantined(G) && h.node(b).core.quarantined(G));
    h.elect();
    assert!(!h.node(l).core.quarantined(G) && !h.node(b).core.quarantined(G));
}

/// A failed log sync: Linux keeps the pages readable but never writes them; the node
/// stops, restarts on the same boot, and reads entries back that its disk does not have.
/// It must not acknowledge them on that strength: the restart writes everything past its
/// synced mark again. With the negative control (the old recovery, which only synced),
/// a power loss afterwards takes entries it had acknowledged.
#[test]
fn entries_a_failed_sync_left_unwritten_are_written_again_at_restart() {
    for bug in [None, Some(CoreBug::TrustLogAfterFailedSync)] {
        let mut h = Harness::new(3, bug);
        let l = h.elect();
        let f = (1..=3).find(|n| *n != l).unwrap();
        h.auto_sync = false;
        h.node(f).log.fail_next_sync();
        h.propose(l, write_cmd(0, 7), Ack::Committed);
        h.deliver();
        for _ in 0..5 {
            h.now = h.now + Duration::from_millis(1);
            h.process(NodeId(f));
        }
        // The follower's sync fails: it stops (its core reports the failure).
        let now = h.now;
        let n = h.node(f);
        assert!(n.sync_started, "the follower syncs the append");
        n.sync_started = false;
        let r = n.log.sync();
        assert!(r.is_err(), "injected failure");
        assert!(n
            .core
            .log_synced(now, r.map_err(|e| e.to_string()))
            .is_err());
        h.crash_restart(f, false);
        h.auto_sync = true;
        h.advance(Duration::from_secs(2));
        let acked = h.nodes[&NodeId(l)]
            .core
            .raft(G)
            .unwrap()
            .progress()
            .iter()
            .find(|p| p.node == NodeId(f))
            .unwrap()
            .matched;
        // Power loss: only what was synced stays.
        let restarted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            h.crash_restart(f, true);
            h.node(f).core.raft(G).unwrap().last_index().0
        }));
        match (bug, restarted) {
            (None, Ok(last)) => {
                assert!(
                    last >= acked,
                    "entries acknowledged by {f} survive ({last} < {acked})"
                )
            }
            // The old recovery: the disk lost entries it had acknowledged (raft-rs refuses
            // to open a log shorter than its recorded commit index).
            (Some(_), Ok(last)) => assert!(last < acked, "{last} >= {acked}"),
            (Some(_), Err(_)) => {}
            (None, Err(_)) => panic!("the restart after the power loss failed"),
        }
    }
}

/// A crafted append from leader `from` of `term` to node 2.
fn append_to_2(from: u64, term: u64, index: u64, log_term: u64, entries: &[(u64, u64)]) -> Message {
    use raft::eraftpb::{Entry, MessageType};
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgAppend);
    (m.from, m.to, m.term, m.index, m.log_term) = (from, 2, term, index, log_term);
    m.entries = entries
        .iter()
        .map(|&(index, term)| {
            let mut e = Entry::default();
            (e.index, e.term) = (index, term);
            e
        })
        .collect();
    m
}

/// A follower reports entries written only in a term it has synced: otherwise a power
/// loss takes the term and the entries it reported, its store opens with the older term,
/// and a deposed leader of that term, heard first, would end its quarantine although it
/// lacks what the newer leader answered on the report. The negative control reports at
/// once.
#[test]
fn a_follower_reports_writes_only_in_a_term_it_has_synced() {
    for bug in [None, Some(CoreBug::WrittenBeforeTermSynced)] {
        let mut h = Harness::new(3, bug);
        h.auto_sync = false;
        let reports = |h: &mut Harness| {
            let n = h.net.len();
            h.net
                .drain(..n)
                .filter_map(|(from, _, _, _, w)| match w {
                    Wire::Written(w) if from == NodeId(2) => Some(w.index),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        // The first append of term 2 (term 1 is what node 2 has synced).
        h.node(2)
            .core
            .step(Time::ZERO, G, 0, append_to_2(1, 2, 0, 0, &[(1, 2), (2, 2)]));
        h.process(NodeId(2));
        let first = reports(&mut h);
        match bug {
            None => assert!(first.is_empty(), "reported in an unsynced term: {first:?}"),
            Some(_) => assert_eq!(first, vec![2], "the negative control reports at once"),
        }
        let now = h.now;
        h.node(2).core.sync_now(now);
        h.process(NodeId(2));
        h.finish_sync(NodeId(2));
        reports(&mut h);
        // Term 2 is synced: the next write is reported, and covers the first.
        h.node(2)
            .core
            .step(Time::ZERO, G, 0, append_to_2(1, 2, 2, 2, &[(3, 2)]));
        h.process(NodeId(2));
        assert_eq!(reports(&mut h), vec![3]);
    }
}

/// A quarantine survives a process crash during it: the restart is on the same boot, so
/// it sees no reboot, but the record kept until the quarantine ends says the log may
/// still lack what it forgot.
#[test]
fn a_quarantine_survives_a_process_crash_and_its_record_goes_when_it_ends() {
    let mut h = Harness::new(3, None);
    let l = h.elect();
    let b = (1..=3).find(|n| *n != l).unwrap();
    h.crash_restart(b, true);
    assert!(h.node(b).core.quarantined(G));
    h.crash_restart(b, false);
    assert!(
        h.node(b).core.quarantined(G),
        "still quarantined after a process crash"
    );
    assert!(h
        .node(b)
        .log
        .get(&crate::node::recovery::quarantine_key(G))
        .unwrap()
        .is_some());
    // A leader of a later term ends it; the record goes with the next batch.
    h.node(l)
        .core
        .transfer_leader(G, NodeId((1..=3).find(|n| *n != l && *n != b).unwrap()));
    h.process(NodeId(l));
    h.deliver();
    h.elect();
    h.propose(h.leader().unwrap(), write_cmd(0, 1), Ack::Committed);
    h.deliver();
    h.finish_syncs();
    assert!(!h.node(b).core.quarantined(G));
    assert!(h
        .node(b)
        .log
        .get(&crate::node::recovery::quarantine_key(G))
        .unwrap()
        .is_none());
    h.crash_restart(b, false);
    assert!(
        !h.node(b).core.quarantined(G),
        "a clean process restart after it ended"
    );
}

/// The synced mark rises to what a sync covered only if the log still holds it: a Ready
/// written while the sync ran may have replaced those entries, and the sync need not
/// cover the replacement (a restart would then trust entries a failed sync lost).
#[test]
fn the_synced_mark_does_not_cover_entries_replaced_while_the_sync_ran() {
    let mut h = Harness::new(3, None);
    h.auto_sync = false;
    let append = append_to_2;
    let synced = |h: &Harness| h.nodes[&NodeId(2)].core.groups[&G].synced_to;
    // Leader 1 (term 2) sends entries 1-3; node 2 writes them and starts a sync.
    h.node(2).core.step(
        Time::ZERO,
        G,
        0,
        append(1, 2, 0, 0, &[(1, 2), (2, 2), (3, 2)]),
    );
    h.process(NodeId(2));
    let now = h.now;
    h.node(2).core.sync_now(now);
    h.process(NodeId(2));
    assert!(h.node(2).sync_started, "a sync covers entries 1-3");
    // Leader 3 (term 3) replaces 2-3 with its own entry 2 while that sync runs.
    h.node(2)
        .core
        .step(Time::ZERO, G, 0, append(3, 3, 1, 2, &[(2, 3)]));
    h.process(NodeId(2));
    assert!(h.holds(2, 2, 3) && !h.holds(2, 3, 2));
    // The first sync ends: it covered entries 1-3 of term 2, of which only 1 is left.
    h.finish_sync(NodeId(2));
    // (It stays where it was: proving entry 1 would need the log's matching prefix;
    // the open-time rewrite costs one entry more.)
    assert!(
        synced(&h) <= 1,
        "the mark covers the replaced entries: {}",
        synced(&h)
    );
    // The next sync covers the replacement.
    let now = h.now;
    h.node(2).core.sync_now(now);
    h.process(NodeId(2));
    h.finish_sync(NodeId(2));
    assert_eq!(synced(&h), 2);
}

/// Hearing the leader does not end a quarantine: the rebooted voter must first hold the
/// leader's log again (synced). Otherwise, if the leader dies right after its first
/// heartbeat, the rebooted voter and the one that never had the write elect a leader
/// without it (what `roamdisk-sim --seed 1624` found). The negative control (the old
/// rule) loses the write.
#[test]
fn a_quarantine_ends_only_once_the_rebooted_log_holds_the_leaders() {
    use raft::eraftpb::MessageType;
    for bug in [None, Some(CoreBug::QuarantineEndsOnLeaderHeard)] {
        let mut h = Harness::new(3, bug);
        let l = h.elect();
        let mut others = (1..=3).filter(|n| *n != l);
        let (b, c) = (others.next().unwrap(), others.next().unwrap());
        h.cut.insert(NodeId(c));
        h.auto_sync = false;
        let w = h.propose(l, write_cmd(0, 5), Ack::Written);
        h.deliver();
        assert_eq!(h.answer(l, w), Some(Ok(Outcome::Volume)));
        let (index, term) = {
            let r = h.nodes[&NodeId(l)].core.raft(G).unwrap();
            (r.last_index().0, r.term().0)
        };
        h.crash_restart(b, true);
        assert!(!h.holds(b, index, term) && h.node(b).core.quarantined(G));
        // One heartbeat from the leader reaches b; then the leader is gone for good.
        let mut hb = Message::default();
        hb.set_msg_type(MessageType::MsgHeartbeat);
        (hb.from, hb.to, hb.term) = (l, b, term);
        h.node(b).core.step(Time::ZERO, G, 0, hb);
        h.process(NodeId(b));
        h.net.clear();
        assert_eq!(h.node(b).core.quarantined(G), bug.is_none());
        h.auto_sync = true;
        h.cut.clear();
        h.cut.insert(NodeId(l));
        h.advance(QUARANTINE_MAX / 2);
        match (bug, h.leader()) {
            (None, leader) => assert_eq!(leader, None, "no leader without the write's holder"),
            (Some(_), Some(leader)) => {
                assert!(!h.holds(leader, index, term), "the control lost it")
            }
            (Some(_), None) => panic!("the negative control elected no leader"),
        }
    }
}
