//! Protocol-aware recovery: a node never votes or acknowledges on the strength of log
//! entries it cannot prove durable (the reference is Alagappan et al., "Protocol-Aware
//! Recovery for Consensus-Based Storage", FAST 2018).
//!
//! Two ways a restarted node can hold a log that is not what it promised:
//!
//! 1. **A failed fsync.** Linux marks the dirty pages of a failed `fsync` clean: the
//!    entries stay readable from the page cache but are not on disk, and the next sync
//!    succeeds without writing them. The node stops on the failure (fail-stop), but a
//!    supervisor restarts it on the same boot: it reads those entries back, and would
//!    acknowledge them to a leader as persisted, until a power loss takes them. So every
//!    group keeps a *synced mark* (`synced/<group>`): the highest entry a finished sync
//!    covered, written with the next batch (so it is durable only once a later sync
//!    succeeded, and never claims more than was synced; a batch that replaces entries
//!    lowers it in the same write). On every start the entries past the mark are read and
//!    written again, then synced, before anything runs: the rewrite is new dirty pages,
//!    which that sync does make durable. It costs the entries of about one sync. A group
//!    whose log starts past its mark (a snapshot installed since) has its whole state
//!    written again, with the records a snapshot writes: otherwise a lost snapshot batch
//!    would leave the entries appended after it behind a hole (the simulation found it:
//!    a replica whose sync failed acknowledged entries its disk could never recover).
//! 2. **A reboot without a clean shutdown** (a power loss). The node forgot the entries
//!    it had written and not synced, among them entries it had reported as *written* to
//!    its leader, which answered writes early on the strength of those reports
//!    ([`crate::written`]). Raft lets it vote at once, and with one other failure a
//!    leader without those entries can be elected: an answered write is lost. So after
//!    such a start each group is *quarantined* while this node is one of its voters: it
//!    grants no vote (and pre-vote) and does not campaign, until its own synced log holds
//!    the last entry of a leader of the term its synced hard state held at that start,
//!    or later (the leader tells it in its answer to the quarantine report), or until at
//!    least half of the voters (of either configuration, while one is joint) report
//!    that they are quarantined too: the others can then never elect a leader by
//!    themselves, and waiting would stop the group for good (a whole site's power loss),
//!    or after `quarantine_max` (a voter gone for good must not stop the group forever).
//!    What only the rebooted voters had written, and not synced, may be lost then: the
//!    documented limit for writes no flush covered. The quarantine is recorded
//!    (`quarantine/<group>`, with that term) and synced before anything runs, and the
//!    record is deleted only once it ends: a process crash during it (the same boot, so
//!    no reboot is seen) does not end it.
//!
//!    Why that leader's log is proof: this node reports entries written only in a term
//!    it has synced (`GroupCore::term_synced`), so every report it sent was of that term
//!    or earlier. A leader of that very term is the one that counted the reports of that
//!    term (one leader a term) and holds those entries; reports of earlier terms were
//!    counted by leaders whose entries, on a quorum of their term, are in every later
//!    leader's log (Raft's leader completeness; this node's own vote, if any, was given
//!    before it forgot them); a leader of a later term was elected without this node's
//!    vote (a vote goes out only once synced). Everything answered on this node's
//!    forgotten reports was answered before the leader's answer, so it lies at or below
//!    that leader's last entry; once this node's synced log holds that entry, it holds
//!    all of them again. Hearing the leader is not enough: the simulation found a voter
//!    that ended its quarantine on the leader's first heartbeat, before it had the
//!    forgotten write back, and elected a leader without it once that leader died
//!    (`roamdisk-sim --seed 1624`). Without the term rule, a follower could report
//!    entries of a term it had not synced, lose both to a power loss, and take a
//!    deposed leader of its older term for proof (the negative control
//!    `written-before-term-synced`).
//!
//!    Why this is safe otherwise: a write answered early was written by a quorum Q; if
//!    `r` of those forgot it, `|Q| - r` still hold it, and every election quorum drawn
//!    from the voters that are not quarantined (`n - r` of them) meets them, since
//!    `(|Q| - r) + |quorum| > n - r`.
//!
//! A process crash on the same boot keeps the page cache: nothing is forgotten, and the
//! sync at open makes it durable (case 1 aside), so it needs no quarantine.

use std::collections::BTreeMap;
use std::time::Duration;

use raft::eraftpb::{Message, MessageType};

use crate::ids::{GroupId, LogIndex, NodeId};
use crate::logstore::{LogBatch, LogOp, LogStore};
use crate::time::Time;

use super::api::{Effect, LeaderLog, Note, QuarantineEnd, QuarantineReport};
use super::group::GroupCore;
use super::{CoreBug, CoreError, NodeCore};

/// A peer's report that it is quarantined counts this long (peers repeat it every tick).
pub const QUARANTINE_REPORT_FRESH: Duration = Duration::from_millis(1000);
/// Bytes of entries read back per write while rewriting a log's unproven tail.
const REWRITE_CHUNK_BYTES: u64 = 16 << 20;

/// Record of the highest entry of `group` a finished sync covered.
pub fn synced_key(group: GroupId) -> Vec<u8> {
    let mut k = b"synced/".to_vec();
    k.extend_from_slice(&group.0.to_be_bytes());
    k
}

/// Record of a group's quarantine (value: the synced term at its start; a leader of that
/// term or later may end it), kept until it ends.
pub fn quarantine_key(group: GroupId) -> Vec<u8> {
    let mut k = b"quarantine/".to_vec();
    k.extend_from_slice(&group.0.to_be_bytes());
    k
}

/// A group's quarantine: the voters that reported theirs, and when; and the newest
/// membership heard of (a rebooted node may have lost the record of a change it had
/// applied, and count against a stale one).
#[derive(Debug, Default)]
pub(crate) struct Quarantine {
    /// When it began (the store's open).
    pub since: Time,
    /// The term of the synced hard state when it began: a leader of it or later may end it.
    pub term: u64,
    /// The log end of such a leader, heard in its answer: the quarantine ends once this
    /// node's synced log holds it. A leader of a later term replaces it (the entry may
    /// have been replaced since).
    pub need: Option<LeaderLog>,
    pub peers: BTreeMap<NodeId, Time>,
    pub conf: Option<(u64, Vec<NodeId>, Vec<NodeId>)>,
}

/// Makes every log entry past each group's synced mark durable again: reads it back and
/// writes it anew (with the hard state), then syncs. Returns the groups and the index
/// their logs are now synced to.
pub(super) fn rewrite_unproven<S: LogStore>(
    log: &S,
    skip: bool,
) -> Result<BTreeMap<GroupId, u64>, CoreError> {
    let mut synced = BTreeMap::new();
    for g in log.groups()? {
        let Some(st) = log.state(g)? else {
            continue;
        };
        let last = log.last_index(g)?;
        let mark =
            match log.get(&synced_key(g))? {
                Some(v) => u64::from_be_bytes(v.as_slice().try_into().map_err(|_| {
                    CoreError::Invalid(format!("corrupt synced mark of group {g}"))
                })?),
                None => 0,
            };
        if skip {
            // Negative control: trust the log as it reads.
            synced.insert(g, last);
            continue;
        }
        let mut batch = LogBatch::default();
        let mut next = mark.max(st.truncated_index) + 1;
        if st.truncated_index > mark {
            // A snapshot installed (or a compaction) since the last proven sync: its
            // batch may be lost too, and entries appended after it would then follow a
            // hole. Write the group's whole state again, and the records written with a
            // snapshot (the metadata state, a replica's recovery point).
            batch.push(LogOp::Snapshot {
                group: g,
                index: st.truncated_index,
                term: st.truncated_term,
                conf_state: st.conf_state.clone(),
            });
            batch.push(LogOp::Applied {
                group: g,
                index: st.applied_index,
            });
            for key in [super::recovering_key(g), super::META_SNAPSHOT_KEY.to_vec()] {
                if key == super::META_SNAPSHOT_KEY && g != crate::ids::META_GROUP {
                    continue;
                }
                if let Some(value) = log.get(&key)? {
                    batch.push(LogOp::Put { key, value });
                }
            }
            next = st.truncated_index + 1;
        }
        // The membership too: a change applied in a lost batch, under an applied index
        // recorded by a later one, would not be applied again after a power loss.
        batch.push(LogOp::ConfState {
            group: g,
            conf_state: st.conf_state.clone(),
            index: st.conf_index,
        });
        batch.push(LogOp::HardState {
            group: g,
            hard_state: st.hard_state.clone(),
        });
        while next <= last {
            let entries = log.entries(g, next, last + 1, REWRITE_CHUNK_BYTES)?;
            next += entries.len() as u64;
            batch.push(LogOp::Append { group: g, entries });
            log.write(std::mem::take(&mut batch))?;
        }
        if !batch.is_empty() {
            log.write(batch)?;
        }
        if last > mark.max(st.truncated_index) || st.truncated_index > mark {
            tracing::info!(group = %g, mark, truncated = st.truncated_index, last,
                "log state past the synced mark written again");
        }
        synced.insert(g, last);
    }
    log.sync()?;
    Ok(synced)
}

impl<S: LogStore> NodeCore<S> {
    /// Drops a vote request (and a leader's `TimeoutNow`) to a quarantined group.
    /// Returns false if `msg` must not be stepped.
    pub(super) fn quarantine_filter(
        g: &mut GroupCore<S>,
        msg: &Message,
        bug: Option<CoreBug>,
    ) -> bool {
        if bug == Some(CoreBug::QuarantineEndsOnLeaderHeard)
            && g.quarantine.as_ref().is_some_and(|q| msg.term >= q.term)
            && matches!(
                msg.get_msg_type(),
                MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot
            )
        {
            // Negative control: the old rule.
            g.quarantine = None;
        }
        g.quarantine.is_none()
            || !matches!(
                msg.get_msg_type(),
                MessageType::MsgRequestVote
                    | MessageType::MsgRequestPreVote
                    | MessageType::MsgTimeoutNow
            )
    }

    /// Whether a quarantined group's synced log now holds the leader's log end it heard.
    fn caught_up(g: &GroupCore<S>) -> bool {
        g.quarantine.as_ref().and_then(|q| q.need).is_some_and(|n| {
            g.synced_to >= n.last
                && g.raft.log_term(LogIndex(n.last)) == Some(crate::ids::Term(n.last_term))
        })
    }

    /// The report this node sends about `g`.
    fn report(g: &GroupCore<S>) -> QuarantineReport {
        let (voters, outgoing) = g.raft.voter_sets();
        let leader_log = g.raft.is_leader().then(|| {
            let last = g.raft.last_index();
            LeaderLog {
                term: g.raft.term().0,
                last: last.0,
                last_term: g.raft.log_term(last).map_or(0, |t| t.0),
            }
        });
        QuarantineReport {
            quarantined: g.quarantine.is_some(),
            conf_index: g.raft.conf_index().0,
            voters: voters.iter().map(|n| n.0).collect(),
            outgoing: outgoing.iter().map(|n| n.0).collect(),
            leader_log,
        }
    }

    /// The membership a quarantined group counts against: its own, or a newer one heard.
    fn counted_conf(g: &GroupCore<S>) -> (Vec<NodeId>, Vec<NodeId>) {
        match g.quarantine.as_ref().and_then(|q| q.conf.as_ref()) {
            Some((index, voters, outgoing)) if *index > g.raft.conf_index().0 => {
                (voters.clone(), outgoing.clone())
            }
            _ => g.raft.voter_sets(),
        }
    }

    /// Each tick of a quarantined group: tell the other voters, and end the quarantine
    /// once the voters that are not quarantined cannot elect a leader by themselves (at
    /// least half of the voters, of either configuration while joint, are quarantined),
    /// or once it has lasted `max` without a leader heard.
    pub(super) fn quarantine_tick(
        me: NodeId,
        g: &mut GroupCore<S>,
        now: Time,
        max: Duration,
        observe: bool,
        effects: &mut Vec<Effect>,
    ) {
        if Self::caught_up(g) {
            tracing::info!(group = %g.raft.id, "quarantine ends: this replica's synced log \
                holds the leader's log end");
            g.quarantine = None;
            return;
        }
        let (voters, outgoing) = Self::counted_conf(g);
        let report = Self::report(g);
        let Some(q) = &mut g.quarantine else {
            return;
        };
        q.peers
            .retain(|_, at| now.saturating_duration_since(*at) < QUARANTINE_REPORT_FRESH);
        let majority = |set: &[NodeId]| {
            !set.is_empty()
                && set
                    .iter()
                    .filter(|n| **n == me || q.peers.contains_key(n))
                    .count()
                    * 2
                    >= set.len()
        };
        let why = if majority(&voters) || majority(&outgoing) {
            tracing::warn!(group = %g.raft.id,
                "quarantine ends: at least half of the voters rebooted without a clean \
                 shutdown (writes only they had written and not synced may be lost)");
            Some(QuarantineEnd::HalfQuarantined)
        } else if now.saturating_duration_since(q.since) >= max {
            tracing::warn!(group = %g.raft.id, after = ?max,
                "quarantine ends: no leader heard (writes answered before the reboot and \
                 not flushed, that only this node and unreachable voters had written, may \
                 be lost)");
            Some(QuarantineEnd::TimedOut)
        } else {
            None
        };
        if let Some(why) = why {
            g.quarantine = None;
            if observe {
                effects.push(Effect::Note(Note::QuarantineEnded {
                    group: g.raft.id,
                    why,
                }));
            }
            return;
        }
        let mut to: Vec<NodeId> = voters.iter().chain(&outgoing).copied().collect();
        let (own_v, own_o) = g.raft.voter_sets();
        to.extend(own_v.into_iter().chain(own_o));
        to.sort_unstable();
        to.dedup();
        for to in to.into_iter().filter(|n| *n != me) {
            effects.push(Effect::Quarantine {
                to,
                group: g.raft.id,
                epoch: g.epoch,
                report: report.clone(),
            });
        }
    }

    /// `from` told this node about its quarantine in `group`. A quarantined node counts
    /// the sender and learns a newer membership from it; it answers a sender outside its
    /// membership (that one may not hear from it otherwise), and a node that is not
    /// quarantined answers a quarantined one with the membership it knows; each at most
    /// a few times a second per peer.
    pub fn quarantine_report(
        &mut self,
        now: Time,
        group: GroupId,
        epoch: u64,
        from: NodeId,
        report: QuarantineReport,
    ) {
        let Some(g) = self.groups.get_mut(&group).filter(|g| g.epoch == epoch) else {
            return;
        };
        let answer = match g.quarantine.as_mut() {
            Some(q) => {
                if report.quarantined {
                    q.peers.insert(from, now);
                }
                if let Some(l) = report.leader_log {
                    // A leader of the quarantine's term or later; a later term's
                    // replaces what an earlier one said.
                    if l.term >= q.term && q.need.is_none_or(|n| l.term > n.term) {
                        q.need = Some(l);
                    }
                }
                let newer = q.conf.as_ref().map_or(g.raft.conf_index().0, |c| c.0);
                if report.conf_index > newer {
                    let ids = |v: &[u64]| v.iter().copied().map(NodeId).collect();
                    q.conf = Some((
                        report.conf_index,
                        ids(&report.voters),
                        ids(&report.outgoing),
                    ));
                }
                let (voters, outgoing) = g.raft.voter_sets();
                report.quarantined && !voters.contains(&from) && !outgoing.contains(&from)
            }
            None => {
                if report.quarantined {
                    // It rebooted: what it reported as written may be gone.
                    g.written.forget(from);
                }
                report.quarantined
            }
        };
        if !answer {
            return;
        }
        let recent = g
            .quarantine_answered
            .get(&from)
            .is_some_and(|at| now.saturating_duration_since(*at) < QUARANTINE_REPORT_FRESH / 4);
        if recent {
            return;
        }
        if g.quarantine_answered.len() >= 256 {
            // Bounded: only members report, and a cluster has fewer nodes than this.
            g.quarantine_answered.clear();
        }
        g.quarantine_answered.insert(from, now);
        self.effects.push(Effect::Quarantine {
            to: from,
            group,
            epoch,
            report: Self::report(g),
        });
    }

    /// Whether `group` is quarantined on this node.
    pub fn quarantined(&self, group: GroupId) -> bool {
        self.groups
            .get(&group)
            .is_some_and(|g| g.quarantine.is_some())
    }
}

/// Adds the synced marks that changed to `batch` (written with it), and the deletion of
/// the records of quarantines that ended.
pub(super) fn write_marks<S: LogStore>(
    groups: &mut BTreeMap<GroupId, GroupCore<S>>,
    batch: &mut LogBatch,
) {
    for (&id, g) in groups.iter_mut() {
        if g.quarantine_recorded && g.quarantine.is_none() {
            batch.push(LogOp::Delete {
                key: quarantine_key(id),
            });
            g.quarantine_recorded = false;
        }
        if g.synced_to != g.mark_written {
            batch.push(LogOp::Put {
                key: synced_key(id),
                value: g.synced_to.to_be_bytes().to_vec(),
            });
            g.mark_written = g.synced_to;
        }
    }
}

/// The index a group's log is synced to after the open-time rewrite.
pub(super) fn synced_at_open(synced: &BTreeMap<GroupId, u64>, g: GroupId) -> LogIndex {
    LogIndex(synced.get(&g).copied().unwrap_or(0))
}
