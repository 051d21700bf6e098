//! One Raft group on a node with everything the node decides about it: which proposals
//! are answered when (early, at commit, after another site has the entry), flushes,
//! reads and their read index, proposals held through a leader transfer, and whether its
//! log must sync now.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use raft::eraftpb::Message;

use crate::group::{ProposeError, RaftGroup};
use crate::ids::{GroupId, LogIndex, NodeId, Term};
use crate::lag::LagTracker;
use crate::logstore::LogStore;
use crate::meta::{ClusterState, Durability, VolumeInfo};
use crate::stats::StoreStats;
use crate::time::Time;
use crate::written::WrittenTracker;

use super::api::{Ack, Answer, Effect, Note, Outcome, Refused, ReqId, SyncWanted};
use super::{CoreBug, EARLY_ACK_BYTES_MAX, HELD_PROPOSAL_MAX};

/// What a group replicates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The cluster metadata; its state is the node core's `ClusterState`.
    Meta,
    /// A volume; its data is the driver's (applied through `Effect::Apply`).
    Volume,
}

/// What the metadata says about how a group's writes are acknowledged.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Policy {
    /// Acknowledge a write only once a replica outside the home site has its entry.
    pub site_durable: bool,
    /// Replicas outside the volume's home site.
    pub remote: Vec<NodeId>,
    /// A site-durable volume commits on the home quorum alone after this long without a
    /// remote replica (`OnNoSite::DegradeAfter`); `None`: its writes wait.
    pub degrade_after: Option<Duration>,
}

impl Policy {
    pub fn of(cluster: &ClusterState, v: &VolumeInfo) -> Policy {
        let remote = v
            .voters
            .iter()
            .chain(&v.learners)
            .copied()
            .filter(|n| cluster.nodes.get(n).is_some_and(|i| i.site != v.home_site))
            .collect();
        Policy {
            site_durable: v.durability == Durability::Site,
            remote,
            degrade_after: match v.on_no_site {
                crate::meta::OnNoSite::Suspend => None,
                crate::meta::OnNoSite::DegradeAfter { ms } => Some(Duration::from_millis(ms)),
            },
        }
    }
}

/// Where answers and observations go while a group decides.
pub(crate) struct Out<'a> {
    pub effects: &'a mut Vec<Effect>,
    pub stats: &'a StoreStats,
    pub observe: bool,
    pub bug: Option<CoreBug>,
    /// The time of the input being handled, and the leader's wall clock then (Unix ms,
    /// stamped on proposals).
    pub now: Time,
    pub unix_ms: u64,
    /// This node holds its lease (see `lease`): volume answers may be given.
    pub open: bool,
    /// This node was granted a lease since it started (or runs without one). Only then
    /// may a site-durable volume degrade: a home that restarts while it is still cut off
    /// cannot know whether it was failed over meanwhile, so its writes wait until the
    /// metadata answers (and fences it, if it was). Found by the simulation's site-loss
    /// runs: a home killed for a failover, as the plan advises, came back still cut off
    /// and degraded, acknowledging writes the new home never saw.
    pub leased_since_start: bool,
}

impl<'a> Out<'a> {
    /// An `Out` for handling that only refuses (no time, no answers given).
    pub fn refusing(effects: &'a mut Vec<Effect>, stats: &'a StoreStats, observe: bool) -> Out<'a> {
        Out {
            effects,
            stats,
            observe,
            bug: None,
            now: Time::ZERO,
            unix_ms: 0,
            open: false,
            leased_since_start: false,
        }
    }
}

impl Out<'_> {
    pub fn answer(&mut self, id: ReqId, answer: Answer) {
        self.effects.push(Effect::Answer { id, answer });
    }

    pub fn note(&mut self, note: impl FnOnce() -> Note) {
        if self.observe {
            self.effects.push(Effect::Note(note()));
        }
    }
}

pub(crate) struct GroupCore<S: LogStore> {
    pub raft: RaftGroup<S>,
    pub kind: Kind,
    /// Highest entry applied to the state machine (commands and skipped entries).
    pub applied: LogIndex,
    /// Highest applied index recorded in the log store (data durable up to it).
    pub durable_applied: LogIndex,
    /// Proposals by log index: (term proposed in, request).
    pub proposals: BTreeMap<u64, (Term, ReqId)>,
    /// Proposals (index → command bytes, proposed at) that may be answered once a quorum
    /// has written them.
    pub early: BTreeMap<u64, (u64, Time)>,
    /// Answered early and not yet committed, oldest first: (index, bytes), and their
    /// sum, bounded by `EARLY_ACK_BYTES_MAX`.
    pub early_uncommitted: VecDeque<(u64, u64)>,
    pub early_uncommitted_bytes: u64,
    /// How far each voter wrote the log in this leader's term.
    pub written: WrittenTracker,
    /// Highest index of a proposal answered before it committed. Reads wait for it and
    /// flushes for its commit.
    pub early_acked: u64,
    /// Flushes waiting for the commit index to reach an index (and this leader's term),
    /// with when they arrived.
    pub flushes: Vec<(u64, Time, ReqId)>,
    /// Reads waiting for their ReadState, by request context, with when they started.
    pub reads_waiting_index: BTreeMap<u64, (Time, ReqId)>,
    /// Reads waiting for apply to reach an index, with when they started.
    pub reads_waiting_apply: Vec<(u64, Time, ReqId)>,
    /// Applied command entries still in the log: (index, bytes), oldest first.
    pub retained: VecDeque<(u64, u64)>,
    pub retained_bytes: u64,
    /// Set while this replica installed a Raft snapshot at this index and has not yet
    /// copied the blocks: committed entries are not applied (they stay in the log) and
    /// reads are refused.
    pub recovering: Option<LogIndex>,
    /// Highest committed index delivered while recovering.
    pub deferred_to: u64,
    /// Reads are refused until applied reaches this index (the end of a catch-up copy).
    pub serve_after: u64,
    /// The store may hold this group's `whole_key` record (see there).
    pub whole_recorded: bool,
    /// `NodeCore::recoveries` when this replica was opened or last started a recovery
    /// other than by snapshot: a checkpoint begun before it is stale for this group
    /// (its batch would delete the new recovery record; found in review).
    pub recovery_gen: u64,
    /// The catch-up finished; its recovery record goes with the next checkpoint, which
    /// makes the copied blocks durable.
    pub recovery_record_stale: bool,
    /// Lag of every peer (meaningful while this node leads).
    pub lag: LagTracker,
    /// Replication policy of the volume, refreshed from the cluster metadata.
    pub policy: Policy,
    /// durability=site: applied writes whose acknowledgement waits until a replica at
    /// another site has their entry, oldest first. Bounded with `proposals` and `held`
    /// by `PENDING_PROPOSALS_MAX` (a new proposal is refused `Busy` past it): while no
    /// other site is reachable they wait, as the durability the volume asked for says.
    pub site_waiting: VecDeque<(u64, Time, ReqId)>,
    /// Leader of a site-durable volume with `degrade_after`: since when it commits on the
    /// home quorum alone (no remote replica took its writes in time). Ends once a remote
    /// replica holds the whole log again.
    pub degraded_since: Option<Time>,
    /// The log's last index when it degraded: a remote replica past it has been heard
    /// from since.
    pub degraded_at: u64,
    /// Answers to metadata proposals, sent once the new cluster state is published, so
    /// that a caller reading this node's view right after sees its own change.
    pub meta_replies: Vec<(ReqId, Outcome)>,
    /// Proposals that arrived while this leader hands leadership over (raft-rs refuses
    /// them then). Refusing at once sends the caller into a backoff that outlasts the
    /// transfer; held, they are answered the moment it ends: with the new leader's name
    /// (the caller goes straight there) or, if the transfer failed, proposed here.
    /// Bounded with `proposals` by `PENDING_PROPOSALS_MAX`.
    pub held: Vec<(Time, Vec<u8>, Ack, ReqId)>,
    /// Highest entry index a finished sync covered, and the value of its record in the
    /// log store (`recovery`).
    pub synced_to: u64,
    pub mark_written: u64,
    /// Highest term of a hard state a finished sync covered. A follower reports entries
    /// written (`Written`) only in a term it has synced: a power loss cannot then take
    /// the term of a report it sent, so the term its store opens with is at least that of
    /// every report it sent, and a leader of that term (or later) ends its quarantine
    /// safely (`recovery`).
    pub term_synced: u64,
    /// Set after a reboot without a clean shutdown, while this node may not vote.
    pub quarantine: Option<super::recovery::Quarantine>,
    /// The quarantine's record is in the log store (deleted with the next batch once the
    /// quarantine ended).
    pub quarantine_recorded: bool,
    /// When this node last answered each peer's quarantine report (bounded by the
    /// group's membership: only members report).
    pub quarantine_answered: BTreeMap<NodeId, Time>,
    /// Follower: what the leader asked to be synced now. Leader: what it asked for.
    pub sync_wanted: SyncWanted,
    /// Leader: a follower asked for a read index since the last round (its read waits
    /// for the commit of every write answered early).
    pub read_asked: bool,
    /// Role, term and leader when raft-rs last drew an election timeout (see
    /// `election`).
    pub election_seen: (raft::StateRole, u64, u64),
    /// The group's epoch here and its first log index (see `failover`).
    pub epoch: u64,
    pub epoch_start: u64,
    /// Answers wait until then: the fencing wait of a new epoch (see `failover`).
    pub hold_until: Option<Time>,
    /// A failover fenced this replica (the epoch that did): no Raft, no answers.
    pub fenced: Option<u64>,
    /// It reported for a failover about to be executed: until then it installs no
    /// snapshot, so that it stays as whole as it reported (see `failover::FAILOVER_HOLD`).
    pub failover_hold: Option<Time>,
    /// The Ready (its number) that wrote a snapshot's recovery record, until a sync
    /// covers it: no block copy starts before (see `publish_recovering`).
    pub recovery_unsynced: Option<u64>,
    /// Requests done here whose answers wait for the lease or the fencing wait.
    /// Bounded with `proposals` by `PENDING_PROPOSALS_MAX`.
    pub suspended: Vec<ReqId>,
    /// When this replica last heard from its leader (a follower), and the leader's last
    /// tail report with when it came (see `Effect::Tail`).
    pub heard_leader: Option<Time>,
    pub tail: Option<(Time, super::api::TailReport)>,
    /// Leader: when it last sent tail reports.
    pub tail_sent: Time,
    /// When this replica, leading while it copied blocks, last handed leadership on.
    pub handed_over_at: Option<Time>,
}

impl<S: LogStore> GroupCore<S> {
    pub fn id(&self) -> GroupId {
        self.raft.id
    }

    /// Ends the wait of proposals held during a leader transfer once it is over: a new
    /// leader known → refused with its name; still leading → proposed again. Proposals
    /// held longer than `HELD_PROPOSAL_MAX` are refused plainly (the caller retries).
    pub fn release_held(&mut self, now: Time, out: &mut Out<'_>) {
        if self.held.is_empty() {
            return;
        }
        let group = self.id();
        let leading = self.raft.is_leader();
        let transferring = leading && self.raft.transferring_to().is_some();
        let leader = self.raft.leader().filter(|_| !leading);
        let expired = self
            .held
            .iter()
            .any(|(t, _, _, _)| now.saturating_duration_since(*t) > HELD_PROPOSAL_MAX);
        if (transferring || (!leading && leader.is_none())) && !expired {
            return;
        }
        for (_, data, ack, id) in std::mem::take(&mut self.held) {
            if leading && !transferring {
                self.propose(now, data, ack, id, out);
                continue;
            }
            out.answer(
                id,
                Err(match leader {
                    Some(l) => Refused::NotLeader {
                        group,
                        leader: Some(l),
                    },
                    None => Refused::Superseded,
                }),
            );
        }
    }

    /// Proposes `data`; the request waits in `proposals` (and in `early` if it may be
    /// answered once a quorum has written the entry).
    pub fn propose(&mut self, now: Time, data: Vec<u8>, ack: Ack, id: ReqId, out: &mut Out<'_>) {
        let group = self.id();
        let bytes = data.len() as u64;
        match self.raft.propose(data, out.unix_ms) {
            Ok((index, term)) => {
                self.lag.proposed(index.0, bytes, now);
                if let Some((_, old)) = self.proposals.insert(index.0, (term, id)) {
                    // An index is proposed again only in a later term of ours, after
                    // the earlier entry there was replaced.
                    out.answer(old, Err(Refused::Superseded));
                }
                if ack == Ack::Written && self.early_allowed() {
                    self.early.insert(index.0, (bytes, now));
                } else {
                    self.early.remove(&index.0);
                }
            }
            Err(ProposeError::NotLeader { leader }) => {
                out.answer(id, Err(Refused::NotLeader { group, leader }));
            }
            Err(ProposeError::Dropped) => out.answer(id, Err(Refused::Superseded)),
            Err(ProposeError::Raft(e)) => out.answer(id, Err(Refused::Failed(e))),
        }
    }

    /// Off the leader: refuses the proposals whose entry is no longer in this log (a new
    /// leader replaced it, or cut the log short of it): by log matching, an entry with
    /// the proposal's index and term is the proposal, anything else never will be. Left
    /// waiting, such a proposal was answered only once a later entry applied past its
    /// index, which an idle volume never does.
    pub fn drop_replaced_proposals(&mut self, out: &mut Out<'_>) {
        if self.raft.is_leader() || self.proposals.is_empty() {
            return;
        }
        let truncated = self.raft.first_index().0.saturating_sub(1);
        let replaced: Vec<u64> = self
            .proposals
            .iter()
            .filter(|(&i, (term, _))| {
                i > truncated && self.raft.log_term(LogIndex(i)) != Some(*term)
            })
            .map(|(&i, _)| i)
            .collect();
        for i in replaced {
            let (_, id) = self.proposals.remove(&i).expect("listed");
            self.early.remove(&i);
            out.answer(id, Err(Refused::Superseded));
        }
    }

    /// Writes may be answered before they commit: volume groups that are not
    /// site-durable (a site-durable write waits for another site's synced log), or are
    /// degraded.
    pub fn early_allowed(&self) -> bool {
        self.kind == Kind::Volume && !self.site_gated()
    }

    /// Writes are answered only once a remote replica has them: site-durable and not
    /// degraded.
    pub fn site_gated(&self) -> bool {
        self.policy.site_durable && self.degraded_since.is_none()
    }

    /// Leader: whether anything but writes already answered waits for the commit (a
    /// flush, a read, a proposal answered at commit or held, a leader transfer, or the
    /// early-answer budget half spent), so that the logs must sync now.
    pub fn commit_awaited(&self) -> bool {
        !self.early_allowed()
            || self.read_asked
            || !self.flushes.is_empty()
            || !self.reads_waiting_index.is_empty()
            || !self.reads_waiting_apply.is_empty()
            || !self.held.is_empty()
            || self.raft.transferring_to().is_some()
            || self.early_uncommitted_bytes >= EARLY_ACK_BYTES_MAX / 2
            || self.proposals.keys().any(|i| !self.early.contains_key(i))
    }

    /// Whether this replica's written, unsynced log must sync now rather than within
    /// `SYNC_LAZY_MAX`.
    pub fn sync_urgent(&self) -> bool {
        if !self.early_allowed()
            || !self.reads_waiting_index.is_empty()
            || !self.reads_waiting_apply.is_empty()
        {
            return true;
        }
        let want = self.sync_wanted;
        want.term == self.raft.term().0 && want.index > self.synced_to
    }

    /// Answers the early proposals that a quorum of voters has written (leader only).
    /// Off the leader they stay in `proposals` and are answered at apply, or refused.
    pub fn release_written(&mut self, me: NodeId, now: Time, out: &mut Out<'_>) {
        self.trim_early_uncommitted();
        if self.early.is_empty() {
            return;
        }
        if !self.raft.is_leader() || !self.early_allowed() {
            self.early.clear();
            return;
        }
        let term = self.raft.term();
        let quorum = if out.bug == Some(CoreBug::EarlyAckOnLeaderWrite) {
            // Negative control: the leader's own write stands for a quorum.
            self.raft.last_index().0
        } else {
            let (voters, outgoing) = self.raft.voter_sets();
            let progress = self.raft.progress();
            let matched = |n: NodeId| {
                progress
                    .iter()
                    .find(|p| p.node == n)
                    .map_or(0, |p| p.matched)
            };
            self.written.quorum(term, me, &voters, &outgoing, matched).0
        };
        while let Some((&i, &(bytes, proposed))) = self.early.first_key_value() {
            if i > quorum {
                break;
            }
            if self.early_uncommitted_bytes + bytes > EARLY_ACK_BYTES_MAX
                && !self.early_uncommitted.is_empty()
            {
                // Enough answered ahead of the fsyncs: the rest wait for their commit.
                break;
            }
            self.early.pop_first();
            // Proposed in an earlier term of ours: the entry may have been replaced,
            // so it waits for apply, which knows.
            if self.proposals.get(&i).is_none_or(|(t, _)| *t != term) {
                continue;
            }
            let (_, id) = self.proposals.remove(&i).expect("present");
            self.early_acked = self.early_acked.max(i);
            self.early_uncommitted.push_back((i, bytes));
            self.early_uncommitted_bytes += bytes;
            out.stats
                .write_written
                .observe(now.saturating_duration_since(proposed));
            out.stats
                .acked_written
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let group = self.id();
            out.note(|| Note::AnsweredEarly {
                id,
                group,
                index: i,
                term: term.0,
            });
            self.answer_ok(id, out);
        }
    }

    /// Forgets the early answers that have committed since.
    fn trim_early_uncommitted(&mut self) {
        let commit = self.raft.commit_index().0;
        while let Some(&(i, bytes)) = self.early_uncommitted.front() {
            if i > commit && self.raft.is_leader() {
                break;
            }
            self.early_uncommitted.pop_front();
            self.early_uncommitted_bytes -= bytes;
        }
    }

    /// Answers the flushes whose writes are committed: the commit index has reached
    /// their index and an entry of this leader's term (so whatever an earlier leader
    /// answered early is committed too). Off the leader they are sent to the new one.
    pub fn release_flushes(&mut self, now: Time, out: &mut Out<'_>) {
        if self.flushes.is_empty() {
            return;
        }
        let group = self.id();
        if !self.raft.is_leader() {
            let leader = self.raft.leader();
            for (_, _, id) in self.flushes.drain(..) {
                out.answer(id, Err(Refused::NotLeader { group, leader }));
            }
            return;
        }
        let early_flush = out.bug == Some(CoreBug::FlushBeforeCommit);
        if !self.raft.committed_in_term() && !early_flush {
            return;
        }
        let commit = self.raft.commit_index().0;
        let (done, waiting): (Vec<_>, Vec<_>) = self
            .flushes
            .drain(..)
            .partition(|(i, _, _)| *i <= commit || early_flush);
        self.flushes = waiting;
        for (_, arrived, id) in done {
            out.stats
                .flush
                .observe(now.saturating_duration_since(arrived));
            out.note(|| Note::Flushed { group, commit });
            self.answer_ok(id, out);
        }
    }

    /// A leader's answer to a follower's ReadIndex carries at least the highest write
    /// it answered early, so that the follower's read waits for it to apply.
    pub fn stamp_read_index(&self, m: &mut Message) {
        if m.get_msg_type() == raft::eraftpb::MessageType::MsgReadIndexResp {
            m.index = m.index.max(self.early_acked);
        }
    }

    /// Highest index a replica outside the home site has persisted (leader only).
    fn remote_matched(&self) -> u64 {
        self.raft
            .progress()
            .iter()
            .filter(|p| self.policy.remote.contains(&p.node))
            .map(|p| p.matched)
            .max()
            .unwrap_or(0)
    }

    /// Answers the site-durable writes that a remote replica now has; refuses them all
    /// if this node no longer leads (the caller retries; writes are idempotent). With
    /// `degrade_after`, a write that waited that long degrades the volume: everything
    /// waiting is answered, and writes commit on the home quorum alone until a remote
    /// replica holds the whole log again.
    pub fn release_site_waiting(&mut self, out: &mut Out<'_>) {
        let group = self.id();
        if let Some(since) = self.degraded_since {
            // Close enough: the writes from here on wait for the remote replica again
            // (under a steady writer it always trails by what is in flight, so "the
            // whole log" would never come); the ones answered while degraded reach it
            // within that many entries.
            let remote = self.remote_matched();
            let caught_up = remote > self.degraded_at
                && remote + super::DEGRADED_RECOVER_ENTRIES >= self.raft.last_index().0;
            if !self.raft.is_leader() || caught_up {
                self.degraded_since = None;
                if caught_up && self.raft.is_leader() {
                    tracing::warn!(%group, degraded_for = ?out.now.saturating_duration_since(since),
                        "a remote replica caught up: site-durable again");
                }
            }
        }
        if self.site_waiting.is_empty() {
            return;
        }
        if !self.raft.is_leader() {
            for (_, _, id) in self.site_waiting.drain(..) {
                out.answer(id, Err(Refused::Superseded));
            }
            return;
        }
        if let (Some(after), None, true) = (
            self.policy.degrade_after,
            self.degraded_since,
            out.leased_since_start,
        ) {
            let waited = self
                .site_waiting
                .front()
                .map(|(_, at, _)| out.now.saturating_duration_since(*at));
            if waited.is_some_and(|w| w >= after) {
                tracing::warn!(%group, ?after,
                    "no other site took the writes in time: DEGRADED, committing on the home quorum alone");
                self.degraded_since = Some(out.now);
                self.degraded_at = self.raft.last_index().0;
            }
        }
        let shipped = if self.degraded_since.is_some() {
            u64::MAX
        } else {
            self.remote_matched()
        };
        while self
            .site_waiting
            .front()
            .is_some_and(|(i, _, _)| *i <= shipped)
        {
            let (_, _, id) = self.site_waiting.pop_front().expect("present");
            self.answer_ok(id, out);
        }
    }

    /// Whether reads may be served by this replica: its data is whole (not copying
    /// blocks) and applied past the end of its last copy.
    pub fn serves_reads(&self) -> bool {
        self.recovering.is_none() && self.raft.applied_index().0 >= self.serve_after
    }

    /// Answers the reads whose index has been applied; refuses all of them while the
    /// replica's data is being replaced by a block copy.
    pub fn complete_reads(&mut self, out: &mut Out<'_>) {
        if !self.serves_reads() {
            // The replica's blocks are being replaced (a snapshot arrived while these
            // reads waited): its applied index says nothing about its data, so they read
            // elsewhere. (Answering them when applied passed their index served zeros
            // that a flushed write had replaced: the chaos smoke drill found it.)
            let group = self.id();
            for (_, _, id) in std::mem::take(&mut self.reads_waiting_apply) {
                out.answer(id, Err(Refused::Recovering(group)));
            }
            return;
        }
        let applied = self.raft.applied_index().0;
        let waiting = std::mem::take(&mut self.reads_waiting_apply);
        for (index, started, id) in waiting {
            if index <= applied {
                self.answer_ok(id, out);
            } else {
                self.reads_waiting_apply.push((index, started, id));
            }
        }
    }

    /// Refuses reads whose read index did not arrive, or was not applied, within
    /// `expiry` of their start (no leader, a partition, a replica cut off after its read
    /// index came), so that their callers retry or read elsewhere.
    pub fn expire_reads(&mut self, now: Time, expiry: Duration, out: &mut Out<'_>) {
        let expired = |started: &Time| now.saturating_duration_since(*started) >= expiry;
        let (late, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reads_waiting_apply)
            .into_iter()
            .partition(|(_, started, _)| expired(started));
        self.reads_waiting_apply = waiting;
        for (_, _, id) in late {
            out.answer(id, Err(Refused::Superseded));
        }
        let expired: Vec<u64> = self
            .reads_waiting_index
            .iter()
            .filter(|(_, (started, _))| now.saturating_duration_since(*started) >= expiry)
            .map(|(ctx, _)| *ctx)
            .collect();
        for ctx in expired {
            let (_, id) = self.reads_waiting_index.remove(&ctx).expect("listed");
            out.answer(id, Err(Refused::Superseded));
        }
    }

    /// Answers a volume request done here: at once if this node holds its lease and the
    /// group's fencing wait is over, else once they are (`suspended`; see `lease`).
    pub fn answer_ok(&mut self, id: ReqId, out: &mut Out<'_>) {
        if let Some(epoch) = self.fenced {
            let group = self.id();
            out.answer(
                id,
                Err(Refused::Fenced {
                    group,
                    epoch,
                    asked: self.epoch,
                }),
            );
        } else if self.answers_open(out) {
            out.answer(id, Ok(Outcome::Volume));
        } else {
            self.suspended.push(id);
        }
    }

    /// Whether answers may be given now: under the lease, past a new epoch's fencing
    /// wait. A degraded site-durable volume answers without the lease: its policy chose
    /// to go on alone when no other site answers, and the home that loses every other
    /// site loses the metadata majority too, so under the lease degrading could never
    /// help. The price: a failover while it is degraded cannot fence it (the plan says
    /// so), and what it writes meanwhile becomes its divergent tail. A node degrades only
    /// once it held a lease since it started (`Out::leased_since_start`).
    pub fn answers_open(&self, out: &Out<'_>) -> bool {
        (out.open || (self.degraded_since.is_some() && self.raft.is_leader()))
            && self.fenced.is_none()
            && self.hold_until.is_none_or(|h| out.now >= h)
    }

    /// Gives the suspended answers once the lease and the fencing wait allow it.
    pub fn release_suspended(&mut self, out: &mut Out<'_>) {
        if !self.suspended.is_empty() && self.answers_open(out) {
            for id in std::mem::take(&mut self.suspended) {
                out.answer(id, Ok(Outcome::Volume));
            }
        }
    }

    /// Leader: tells each replica at another site how far the log reaches and how far
    /// behind it is (see `Effect::Tail`).
    pub fn report_tail(
        &self,
        now: Time,
        progress: &[crate::group::PeerProgress],
        out: &mut Out<'_>,
    ) {
        let last = self.raft.last_index().0;
        let term = self.raft.term().0;
        for p in progress
            .iter()
            .filter(|p| self.policy.remote.contains(&p.node))
        {
            out.effects.push(Effect::Tail {
                to: p.node,
                group: self.id(),
                epoch: self.epoch,
                tail: super::api::TailReport {
                    term,
                    last,
                    unix_ms: out.unix_ms,
                    lag: self.lag.lag(p.node.0, p.matched, last, now),
                },
            });
        }
    }

    /// Requests waiting in this group, counted against `PENDING_PROPOSALS_MAX`.
    pub fn pending(&self) -> usize {
        self.proposals.len() + self.held.len() + self.site_waiting.len() + self.suspended.len()
    }

    /// Refuses everything waiting (the group leaves this node, or the node stops).
    pub fn fail_all(&mut self, why: Refused, out: &mut Out<'_>) {
        for id in std::mem::take(&mut self.suspended) {
            out.answer(id, Err(why.clone()));
        }
        self.early.clear();
        self.early_uncommitted.clear();
        self.early_uncommitted_bytes = 0;
        for (_, _, id) in std::mem::take(&mut self.flushes) {
            out.answer(id, Err(why.clone()));
        }
        for (_, _, _, id) in std::mem::take(&mut self.held) {
            out.answer(id, Err(why.clone()));
        }
        for (_, _, id) in std::mem::take(&mut self.site_waiting) {
            out.answer(id, Err(why.clone()));
        }
        for (_, (_, id)) in std::mem::take(&mut self.proposals) {
            out.answer(id, Err(why.clone()));
        }
        for (_, (_, id)) in std::mem::take(&mut self.reads_waiting_index) {
            out.answer(id, Err(why.clone()));
        }
        for (_, _, id) in std::mem::take(&mut self.reads_waiting_apply) {
            out.answer(id, Err(why.clone()));
        }
        for (id, outcome) in std::mem::take(&mut self.meta_replies) {
            out.answer(id, Ok(outcome));
        }
    }
}
