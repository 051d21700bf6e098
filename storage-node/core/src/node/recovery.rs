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
//!    grants no vote (and pre-vote) and does not campaign, until it hears from a leader of
//!    its term or later (whose election did not need its vote, so its log holds what a
//!    majority wrote), or until at least half of the voters (of either configuration,
//!    while one is joint) report that they are quarantined too: the others can then
//!    never elect a leader by themselves, and waiting would stop the group for good (a
//!    whole site's power loss). What only the rebooted voters had written, and not
//!    synced, may be lost then: the documented limit for writes no flush covered.
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

use super::api::{Effect, Note, QuarantineEnd, QuarantineReport};
use super::group::GroupCore;
use super::{CoreError, NodeCore};

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

/// A group's quarantine: the voters that reported theirs, and when; and the newest
/// membership heard of (a rebooted node may have lost the record of a change it had
/// applied, and count against a stale one).
#[derive(Debug, Default)]
pub(crate) struct Quarantine {
    /// When it began (the store's open).
    pub since: Time,
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
    /// Drops a vote request to a quarantined group, and ends the quarantine on a message
    /// from a leader of this term or later. Returns false if `msg` must not be stepped.
    pub(super) fn quarantine_filter(g: &mut GroupCore<S>, msg: &Message) -> bool {
        if g.quarantine.is_none() {
            return true;
        }
        match msg.get_msg_type() {
            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote => false,
            MessageType::MsgAppend
            | MessageType::MsgHeartbeat
            | MessageType::MsgSnapshot
            | MessageType::MsgTimeoutNow
                if msg.term >= g.raft.term().0 =>
            {
                tracing::info!(group = %g.id(), leader = msg.from, term = msg.term,
                    "quarantine ends: a leader was heard");
                g.quarantine = None;
                true
            }
            _ => true,
        }
    }

    /// The report this node sends about `g`.
    fn report(g: &GroupCore<S>) -> QuarantineReport {
        let (voters, outgoing) = g.raft.voter_sets();
        QuarantineReport {
            quarantined: g.quarantine.is_some(),
            conf_index: g.raft.conf_index().0,
            voters: voters.iter().map(|n| n.0).collect(),
            outgoing: outgoing.iter().map(|n| n.0).collect(),
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
        from: NodeId,
        report: QuarantineReport,
    ) {
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        let answer = match g.quarantine.as_mut() {
            Some(q) => {
                if report.quarantined {
                    q.peers.insert(from, now);
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
            None => report.quarantined,
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

/// Adds the synced marks that changed to `batch` (written with it).
pub(super) fn write_marks<S: LogStore>(
    groups: &mut BTreeMap<GroupId, GroupCore<S>>,
    batch: &mut LogBatch,
) {
    for (&id, g) in groups.iter_mut() {
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
