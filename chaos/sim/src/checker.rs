//! The invariants, checked by the simulator after every event.
//!
//! The checker keeps a global, omniscient record per group, built from what nodes do:
//!
//! 1. **One leader per term**: every `(term → leader)` ever observed.
//! 2. **Committed entries are never lost or changed**: `index → (term, digest)` of every
//!    entry any node was handed as committed. A node's log below its commit index must
//!    agree with it (also after a restart), and every committed entry must stay durable
//!    (synced, or covered by a durable state image) on a majority of the configuration
//!    that committed it, as far as the independent disk model (`shadow`) tells.
//! 3. **Replicas agree**: the state-machine hash at each applied index; any replica
//!    reaching that index (by applying, restarting or installing a snapshot) must have
//!    the same hash, and at the end a replay of the committed log from scratch must
//!    reproduce every recorded hash.
//! 4. **Generations never go back** (checked by the node driver with
//!    [`crate::machine::MetaMonotone`]).
//! 5. **Acknowledged writes stay**: an acknowledged proposal's `(index, term, digest)`
//!    is in the committed record: at once for a write answered at commit; by the end of
//!    the run for a write answered early, unless, before a flush covering it completed,
//!    a voter lost power after its answer and at least half of the voters (of either side
//!    of a joint configuration) were rebooted at once (the one loss documented for
//!    unflushed writes; any number of process crashes, and power losses of a minority,
//!    must keep it).
//! 6. **Reads see acknowledged writes**: a register read returns the value of the last
//!    write that must survive (5) acknowledged before the read was issued, or a later
//!    one; never a torn value.
//! 7. **A failover loses no more than its plan stated, and fences**: a forced failover
//!    starts a new epoch of the group, recorded apart (its own terms and commits), seeded
//!    with the old epoch's committed entries up to the plan's cut. Every write the old
//!    epoch acknowledged before the plan's stated time (every one, for a lossless plan)
//!    that had to survive by 5 is committed in the new epoch, and counts for its reads;
//!    no node of the old epoch answers a client once a node of the new one has.

use std::collections::BTreeMap;
use std::fmt;

use raft::eraftpb::{ConfState, Entry, EntryType};
use roamdisk_core::command::VolumeCommand;
use roamdisk_core::ids::{GroupId, NodeId};
use roamdisk_core::logstore::LogStore;

use crate::config::Micros;
use crate::machine::{
    register_stamp, Machine, MachineKind, StateHash, REGISTERS_AT, REGISTER_BYTES,
};
use crate::shadow::ShadowLog;

/// A group in one epoch: a failover starts a new record for the group (the old epoch's
/// entries past the cut are given up, its terms are its own), seeded with the old
/// record up to the cut (`Checker::start_epoch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    pub group: GroupId,
    pub epoch: u64,
}

impl Key {
    pub fn new(group: GroupId, epoch: u64) -> Key {
        Key { group, epoch }
    }
}

impl From<GroupId> for Key {
    fn from(group: GroupId) -> Key {
        Key { group, epoch: 0 }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.epoch == 0 {
            write!(f, "{}", self.group)
        } else {
            write!(f, "{} (epoch {})", self.group, self.epoch)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invariant {
    SingleLeaderPerTerm,
    CommittedEntryStable,
    CommittedEntryOnQuorum,
    ReplicaStateAgrees,
    GenerationMonotone,
    AcknowledgedWriteKept,
    ReadSeesAcknowledgedWrites,
    /// After a failover, no node of the old epoch answers once the new one has.
    Fenced,
    CrashRule,
    Liveness,
    /// The core or raft-rs returned an error or panicked where the driver expects none.
    CoreError,
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Invariant::SingleLeaderPerTerm => "at most one leader per term",
            Invariant::CommittedEntryStable => "committed entries are never lost or changed",
            Invariant::CommittedEntryOnQuorum => "a committed entry stays durable on a quorum",
            Invariant::ReplicaStateAgrees => "replicas' state is identical at equal applied index",
            Invariant::GenerationMonotone => "a generation never goes back",
            Invariant::AcknowledgedWriteKept => "acknowledged writes are committed and kept",
            Invariant::ReadSeesAcknowledgedWrites => {
                "a read returns no less than the writes acknowledged before it"
            }
            Invariant::Fenced => "no node of a fenced epoch answers once the new epoch has",
            Invariant::CrashRule => "the recorded applied index matches the recorded state",
            Invariant::Liveness => "after healing, a leader exists and replicas converge",
            Invariant::CoreError => "the core does not fail or panic",
        };
        f.write_str(s)
    }
}

#[derive(Clone, Debug)]
pub struct Violation {
    pub invariant: Invariant,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.invariant, self.detail)
    }
}

pub fn violation(invariant: Invariant, detail: impl Into<String>) -> Violation {
    Violation {
        invariant,
        detail: detail.into(),
    }
}

pub type Check = Result<(), Violation>;

/// blake3 of an entry's type and payload.
pub fn entry_digest(e: &Entry) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&[e.get_entry_type() as u8]);
    h.update(&e.data);
    *h.finalize().as_bytes()
}

#[derive(Clone, Debug)]
pub struct CommittedEntry {
    pub term: u64,
    pub digest: [u8; 32],
    pub normal: bool,
    pub data: Vec<u8>,
    pub first_seen_on: NodeId,
}

/// Indexes `first..=last` were committed by a leader whose configuration was `conf`.
#[derive(Clone, Debug)]
struct CommitRange {
    first: u64,
    last: u64,
    conf: ConfState,
}

/// A write a client was told is done.
#[derive(Clone, Debug)]
struct Ack {
    index: u64,
    term: u64,
    digest: [u8; 32],
    early: bool,
    acked_at: Micros,
    /// When the node answered it (`acked_at` is when the client got the answer).
    answered_at: Micros,
    /// (slot, stamp) of a register write.
    register: Option<(usize, u64)>,
    /// The group's voters when it was answered: incoming, and outgoing while joint.
    voters: (Vec<NodeId>, Vec<NodeId>),
}

/// A register read: what it returned, and when it was issued.
#[derive(Clone, Debug)]
struct Read {
    slot: usize,
    stamp: u64,
    issued_at: Micros,
    node: NodeId,
}

/// Everything the checker knows about one group.
pub struct GroupRecord {
    kind: MachineKind,
    base_index: u64,
    /// The state at `base_index`.
    initial: Machine,
    /// A later epoch's record: it holds the previous epoch's committed entries up to here.
    seeded_to: u64,
    /// The first and last time a node of this epoch answered a client with success.
    first_answer: Option<Micros>,
    last_answer: Option<Micros>,
    leaders: BTreeMap<u64, NodeId>,
    committed: BTreeMap<u64, CommittedEntry>,
    hashes: BTreeMap<u64, StateHash>,
    commit_ranges: Vec<CommitRange>,
    highest_commit_by_leader: u64,
    acks: Vec<Ack>,
    /// When each flush that succeeded was issued and answered.
    flushes: Vec<(Micros, Micros)>,
    /// Acks before this one were checked durable by a flush.
    flushed_upto: usize,
    /// When a node ended its quarantine without hearing a leader (half of the voters
    /// quarantined, or it timed out).
    quarantine_ended_early: Vec<Micros>,
    reads: Vec<Read>,
}

impl GroupRecord {
    pub fn committed_len(&self) -> usize {
        self.committed.len()
    }
    pub fn last_committed(&self) -> u64 {
        self.committed
            .keys()
            .next_back()
            .copied()
            .unwrap_or(self.base_index)
    }
    pub fn terms(&self) -> usize {
        self.leaders.len()
    }
    pub fn acks(&self) -> usize {
        self.acks.len()
    }
}

/// When a write answered early became losable: a voter lost power after its answer (the
/// node's, not the client's receipt, which a WAN delays) (it may have forgotten the write), and either at least half of the voters lost power
/// after the answer, or a quarantine ended without a leader heard after it (half of the
/// voters were quarantined, or it timed out: the contract for writes no flush covered).
/// Never for a write answered at commit.
fn losable_at(rec: &GroupRecord, a: &Ack, power_losses: &[(Micros, NodeId)]) -> Option<Micros> {
    if !a.early {
        return None;
    }
    let voter = |n: &NodeId| a.voters.0.contains(n) || a.voters.1.contains(n);
    let first_loss = power_losses
        .iter()
        .find(|(at, n)| *at >= a.answered_at && voter(n))
        .map(|(at, _)| *at)?;
    let mut lost = std::collections::BTreeSet::new();
    let mut half_lost = None;
    for (at, node) in power_losses.iter().filter(|(at, _)| *at >= a.answered_at) {
        lost.insert(*node);
        let half = [&a.voters.0, &a.voters.1].into_iter().any(|side| {
            !side.is_empty() && side.iter().filter(|n| lost.contains(n)).count() * 2 >= side.len()
        });
        if half {
            half_lost = Some(*at);
            break;
        }
    }
    let quarantine = rec
        .quarantine_ended_early
        .iter()
        .copied()
        .find(|at| *at >= a.answered_at);
    let at = match (half_lost, quarantine) {
        (Some(x), Some(y)) => x.min(y),
        (x, y) => x.or(y)?,
    };
    Some(at.max(first_loss))
}

/// Whether write `a` must survive by invariant 5: answered at commit, or early and not
/// losable before a flush issued after its answer completed (which made it durable).
fn must_survive(rec: &GroupRecord, a: &Ack, power_losses: &[(Micros, NodeId)]) -> bool {
    match losable_at(rec, a, power_losses) {
        None => true,
        Some(t) => rec
            .flushes
            .iter()
            .any(|(issued, answered)| *issued >= a.acked_at && *answered < t),
    }
}

/// What a failover's plan stated it may lose.
#[derive(Clone, Copy, Debug)]
pub struct Stated {
    pub lossless: bool,
    /// Writes answered after this may be lost (`None`, not lossless: any may be).
    pub after: Option<Micros>,
}

#[derive(Default)]
pub struct Checker {
    groups: BTreeMap<Key, GroupRecord>,
}

impl Checker {
    /// Registers a group whose bootstrap members start at `base_index` with the empty
    /// state of `kind`.
    pub fn add_group(&mut self, group: Key, initial: Machine, base_index: u64) {
        let mut hashes = BTreeMap::new();
        hashes.insert(base_index, initial.hash());
        self.groups.insert(
            group,
            GroupRecord {
                kind: initial.kind(),
                base_index,
                initial,
                seeded_to: 0,
                first_answer: None,
                last_answer: None,
                leaders: BTreeMap::new(),
                committed: BTreeMap::new(),
                hashes,
                commit_ranges: Vec::new(),
                highest_commit_by_leader: base_index,
                acks: Vec::new(),
                flushes: Vec::new(),
                flushed_upto: 0,
                quarantine_ended_early: Vec::new(),
                reads: Vec::new(),
            },
        );
    }

    pub fn group(&self, group: Key) -> &GroupRecord {
        &self.groups[&group]
    }

    /// Every epoch's record of `group`.
    pub fn epochs(&self, group: GroupId) -> impl DoubleEndedIterator<Item = (&Key, &GroupRecord)> {
        self.groups
            .range(Key::new(group, 0)..=Key::new(group, u64::MAX))
    }

    /// The newest epoch of `group` the checker knows.
    pub fn current(&self, group: GroupId) -> Key {
        *self
            .epochs(group)
            .next_back()
            .map(|(k, _)| k)
            .expect("group registered")
    }

    /// A failover started epoch `new` of its group, re-formed from a replica whose log
    /// agrees with the committed record up to `cut`: the new epoch's record holds the
    /// previous epoch's committed entries and states up to there. Called with the plan's
    /// known commit by the first replica that joins, and again by the source with its
    /// own commit when it re-forms the group (it may have learned more since the plan;
    /// its whole log becomes the new epoch's). The previous epoch's later entries are
    /// given up; whether that lost an acknowledged write it must not is
    /// `check_failover`'s question.
    pub fn start_epoch(&mut self, new: Key, cut: u64) {
        let (_, old) = self
            .groups
            .range(Key::new(new.group, 0)..new)
            .next_back()
            .expect("an earlier epoch");
        if let Some(rec) = self.groups.get(&new) {
            if cut <= rec.seeded_to {
                return;
            }
            let from = rec.seeded_to;
            let entries: Vec<(u64, CommittedEntry)> = old
                .committed
                .range(from + 1..=cut)
                .map(|(i, c)| (*i, c.clone()))
                .collect();
            let hashes: Vec<(u64, StateHash)> = old
                .hashes
                .range(from + 1..=cut)
                .map(|(i, h)| (*i, *h))
                .collect();
            let rec = self.groups.get_mut(&new).expect("present");
            rec.committed.extend(entries);
            rec.hashes.extend(hashes);
            rec.seeded_to = cut;
            rec.highest_commit_by_leader = rec.highest_commit_by_leader.max(cut);
            return;
        }
        let rec = GroupRecord {
            kind: old.kind,
            base_index: old.base_index,
            initial: old.initial.clone(),
            seeded_to: cut,
            first_answer: None,
            last_answer: None,
            leaders: BTreeMap::new(),
            committed: old
                .committed
                .range(..=cut)
                .map(|(i, c)| (*i, c.clone()))
                .collect(),
            hashes: old.hashes.range(..=cut).map(|(i, h)| (*i, *h)).collect(),
            commit_ranges: Vec::new(),
            highest_commit_by_leader: cut,
            acks: Vec::new(),
            flushes: Vec::new(),
            flushed_upto: 0,
            quarantine_ended_early: Vec::new(),
            reads: Vec::new(),
        };
        self.groups.insert(new, rec);
    }

    /// A node of `group`'s epoch answered a client with success at `at`.
    pub fn observe_answer(&mut self, group: Key, at: Micros) {
        let rec = self.rec(group);
        rec.first_answer.get_or_insert(at);
        rec.last_answer = Some(at);
    }

    /// End of run, for a failover from epoch `old` to `new`, whose plan stated `stated`:
    /// no node of the old epoch answered once the new one had (fencing); every write the
    /// old epoch acknowledged that had to survive (invariant 5) and was answered before
    /// the stated time (every one, for a lossless plan) is committed in the new epoch.
    /// Those writes then count for the new epoch's reads (`check_acks_and_reads`).
    pub fn check_failover(
        &mut self,
        old: Key,
        new: Key,
        stated: Stated,
        power_losses: &[(Micros, NodeId)],
    ) -> Check {
        let (o, n) = (&self.groups[&old], &self.groups[&new]);
        if let (Some(last), Some(first)) = (o.last_answer, n.first_answer) {
            if last >= first {
                return Err(violation(
                    Invariant::Fenced,
                    format!(
                        "group {}: a node of epoch {} answered a client at {last} us, after epoch {} first answered at {first} us",
                        old.group, old.epoch, new.epoch
                    ),
                ));
            }
        }
        let mut kept = Vec::new();
        for a in o.acks.iter().filter(|a| must_survive(o, a, power_losses)) {
            let owed = stated.lossless || stated.after.is_some_and(|t| a.answered_at < t);
            let there = n
                .committed
                .get(&a.index)
                .is_some_and(|c| c.term == a.term && c.digest == a.digest);
            if owed && !there {
                return Err(violation(
                    Invariant::AcknowledgedWriteKept,
                    format!(
                        "group {}: the failover to epoch {} lost the write answered at {} us (entry {} term {}), though its plan stated {}",
                        old.group,
                        new.epoch,
                        a.answered_at,
                        a.index,
                        a.term,
                        match (stated.lossless, stated.after) {
                            (true, _) => "no loss".to_string(),
                            (false, Some(t)) => format!("a loss of writes answered after {t} us"),
                            (false, None) => "any loss".to_string(),
                        }
                    ),
                ));
            }
            if there {
                let mut a = a.clone();
                a.early = false;
                kept.push(a);
            }
        }
        let n = self.rec(new);
        n.acks.extend(kept);
        n.acks.sort_by_key(|a| a.acked_at);
        Ok(())
    }

    fn rec(&mut self, group: Key) -> &mut GroupRecord {
        self.groups.get_mut(&group).expect("group registered")
    }

    /// Invariant 1.
    pub fn observe_leader(&mut self, group: Key, node: NodeId, term: u64) -> Check {
        let rec = self.rec(group);
        let first = *rec.leaders.entry(term).or_insert(node);
        if first != node {
            return Err(violation(
                Invariant::SingleLeaderPerTerm,
                format!("group {group}: nodes {first} and {node} both led term {term}"),
            ));
        }
        Ok(())
    }

    /// A leader's commit index moved from `from` to `to` while its configuration was
    /// `conf`: remember which configuration committed those entries.
    pub fn observe_leader_commit(&mut self, group: Key, from: u64, to: u64, conf: &ConfState) {
        let rec = self.rec(group);
        if to <= rec.highest_commit_by_leader {
            return;
        }
        let first = from.max(rec.highest_commit_by_leader) + 1;
        rec.highest_commit_by_leader = to;
        if let Some(last) = rec.commit_ranges.last_mut() {
            if last.last + 1 == first && last.conf == *conf {
                last.last = to;
                return;
            }
        }
        rec.commit_ranges.push(CommitRange {
            first,
            last: to,
            conf: conf.clone(),
        });
    }

    /// Invariant 2, at the moment a node is handed `e` as committed.
    pub fn observe_committed(&mut self, group: Key, node: NodeId, e: &Entry) -> Check {
        let rec = self.rec(group);
        let digest = entry_digest(e);
        match rec.committed.get(&e.index) {
            Some(c) if c.term != e.term || c.digest != digest => Err(violation(
                Invariant::CommittedEntryStable,
                format!(
                    "group {group}: node {node} was handed entry {} (term {}) as committed, but \
                     node {} was handed a different entry there (term {})",
                    e.index, e.term, c.first_seen_on, c.term
                ),
            )),
            Some(_) => Ok(()),
            None => {
                if e.index > rec.base_index + 1 && !rec.committed.contains_key(&(e.index - 1)) {
                    // Entries are handed over in order, and a replica that skipped some
                    // received a snapshot from a leader that had applied them.
                    return Err(violation(
                        Invariant::CommittedEntryStable,
                        format!(
                            "group {group}: node {node} was handed entry {} as committed before \
                             any node was handed entry {}",
                            e.index,
                            e.index - 1
                        ),
                    ));
                }
                let normal = e.get_entry_type() == EntryType::EntryNormal;
                rec.committed.insert(
                    e.index,
                    CommittedEntry {
                        term: e.term,
                        digest,
                        normal,
                        data: if normal { e.data.to_vec() } else { Vec::new() },
                        first_seen_on: node,
                    },
                );
                Ok(())
            }
        }
    }

    /// Invariant 3: node reached applied index `index` with state `hash`.
    pub fn observe_state(
        &mut self,
        group: Key,
        node: NodeId,
        index: u64,
        hash: StateHash,
        how: &str,
    ) -> Check {
        let rec = self.rec(group);
        let known = *rec.hashes.entry(index).or_insert(hash);
        if known != hash {
            return Err(violation(
                Invariant::ReplicaStateAgrees,
                format!(
                    "group {group}: node {node} has a different state at applied index {index} \
                     (after {how}) than another replica had there"
                ),
            ));
        }
        Ok(())
    }

    /// Invariant 2 on one node's log: entries in `(lo, hi]` that are in the store must
    /// have the committed terms.
    pub fn check_log(
        &self,
        group: Key,
        node: NodeId,
        store: &impl LogStore,
        lo: u64,
        hi: u64,
        when: &str,
    ) -> Check {
        if lo >= hi {
            return Ok(());
        }
        let rec = &self.groups[&group];
        let range: Vec<(&u64, &CommittedEntry)> = rec.committed.range(lo + 1..=hi).collect();
        for (index, c) in range {
            let term = store.term(group.group, *index).map_err(|e| {
                violation(Invariant::CoreError, format!("store term of {index}: {e}"))
            })?;
            match term {
                Some(t) if t == c.term => {}
                None => {
                    // Compacted below, or beyond the end of the store: covered by the
                    // callers, which pass `hi <= last index` and `lo >= truncated`.
                    return Err(violation(
                        Invariant::CommittedEntryStable,
                        format!(
                            "group {group}: node {node} ({when}) has commit index {hi} but entry \
                             {index} is missing from its log"
                        ),
                    ));
                }
                Some(t) => {
                    return Err(violation(
                        Invariant::CommittedEntryStable,
                        format!(
                            "group {group}: node {node} ({when}) has term {t} at index {index}, \
                             below its commit index {hi}, where term {} was committed",
                            c.term
                        ),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Highest committed index `w` such that `log` holds every committed entry up to
    /// `w` (by log matching, holding entry `w` means holding all before it), or has
    /// them covered by its truncation point.
    pub fn durable_watermark(&self, group: Key, log: &ShadowLog) -> u64 {
        let rec = &self.groups[&group];
        let matches = |i: u64| -> bool {
            if i <= log.truncated_index {
                return true;
            }
            match (rec.committed.get(&i), log.term(i)) {
                (Some(c), Some(t)) => c.term == t,
                _ => false,
            }
        };
        let hi = log.last_index.min(rec.last_committed());
        let lo = log.truncated_index.min(hi);
        if matches(hi) {
            return hi;
        }
        // Invariant: matches(lo) (or lo is the truncation point), !matches(hi).
        let (mut lo, mut hi) = (lo, hi);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if matches(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// Invariant 2, quorum part: `watermarks` is each node's durable watermark.
    pub fn check_quorums(&self, group: Key, watermarks: &BTreeMap<NodeId, u64>) -> Check {
        let rec = &self.groups[&group];
        for range in &rec.commit_ranges {
            // Only entries some node has been handed as committed are known; the
            // watermark cannot exceed the last of them.
            let index = range.last.min(rec.last_committed());
            if index < range.first {
                continue;
            }
            for (side, voters) in [
                ("incoming", &range.conf.voters),
                ("outgoing", &range.conf.voters_outgoing),
            ] {
                if voters.is_empty() {
                    continue;
                }
                let holding: Vec<u64> = voters
                    .iter()
                    .copied()
                    .filter(|v| watermarks.get(&NodeId(*v)).copied().unwrap_or(0) >= index)
                    .collect();
                if holding.len() * 2 <= voters.len() {
                    return Err(violation(
                        Invariant::CommittedEntryOnQuorum,
                        format!(
                            "group {group}: entry {index} was committed by {side} voters {voters:?} \
                             but is durable only on {holding:?}"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Invariant 5, when a client is told its write is done: a write answered at commit
    /// must be in the committed record now; one answered early is checked at the end.
    #[allow(clippy::too_many_arguments)]
    pub fn observe_write_ack(
        &mut self,
        group: Key,
        index: u64,
        term: u64,
        digest: [u8; 32],
        early: bool,
        (acked_at, answered_at): (Micros, Micros),
        register: Option<(usize, u64)>,
        voters: (Vec<NodeId>, Vec<NodeId>),
    ) -> Check {
        let rec = self.rec(group);
        if !early {
            match rec.committed.get(&index) {
                Some(c) if c.term == term && c.digest == digest => {}
                other => {
                    return Err(violation(
                        Invariant::AcknowledgedWriteKept,
                        format!(
                        "group {group}: a client was acknowledged for entry {index} term {term} \
                             at its commit, but the committed record has {:?}",
                        other.map(|c| c.term)
                    ),
                    ))
                }
            }
        }
        rec.acks.push(Ack {
            index,
            term,
            digest,
            early,
            acked_at,
            answered_at,
            register,
            voters,
        });
        Ok(())
    }

    /// A node of `group` ended its quarantine without hearing a leader.
    pub fn observe_quarantine_end(&mut self, group: Key, at: Micros) {
        self.rec(group).quarantine_ended_early.push(at);
    }

    /// A flush issued at `issued_at` succeeded: every write acknowledged before then must
    /// be durable now, on a majority of its voters (`synced(node)`: what that node's disk
    /// has synced), unless it was lost before (see `losable_at`).
    pub fn observe_flush(
        &mut self,
        group: Key,
        issued_at: Micros,
        answered_at: Micros,
        power_losses: &[(Micros, NodeId)],
        synced: impl Fn(NodeId) -> Option<ShadowLog>,
    ) -> Check {
        let rec = &self.groups[&group];
        let mut proven = Vec::new();
        for (i, a) in rec.acks.iter().enumerate().skip(rec.flushed_upto) {
            if a.acked_at > issued_at {
                break;
            }
            if !a.early || losable_at(rec, a, power_losses).is_some_and(|t| t <= answered_at) {
                proven.push(i);
                continue;
            }
            // Below a log's truncation point the entry is in the durable state, if it is
            // the one committed there.
            let committed = rec
                .committed
                .get(&a.index)
                .is_some_and(|c| c.term == a.term && c.digest == a.digest);
            let holds = |log: ShadowLog| {
                log.term(a.index) == Some(a.term) || (a.index <= log.truncated_index && committed)
            };
            for side in [&a.voters.0, &a.voters.1] {
                let holding = side
                    .iter()
                    .filter(|n| synced(**n).is_some_and(holds))
                    .count();
                if !side.is_empty() && holding * 2 <= side.len() {
                    return Err(violation(
                        Invariant::AcknowledgedWriteKept,
                        format!(
                            "group {group}: a flush issued at {issued_at} us succeeded, but the \
                             write answered at {} us (entry {} term {}) is synced on only {holding} \
                             of its voters {side:?}",
                            a.acked_at, a.index, a.term
                        ),
                    ));
                }
            }
            proven.push(i);
        }
        let rec = self.rec(group);
        // Acks are in answer order; everything before the first unproven one is done.
        let done = proven
            .iter()
            .enumerate()
            .take_while(|(k, i)| rec.flushed_upto + k == **i)
            .count();
        rec.flushed_upto += done;
        rec.flushes.push((issued_at, answered_at));
        Ok(())
    }

    /// A register read issued at `issued_at` returned `bytes` on `node`.
    pub fn observe_read(
        &mut self,
        group: Key,
        slot: usize,
        bytes: &[u8],
        issued_at: Micros,
        node: NodeId,
    ) -> Check {
        let Some(stamp) = register_stamp(bytes) else {
            return Err(violation(
                Invariant::ReadSeesAcknowledgedWrites,
                format!("group {group}: node {node} returned a torn or foreign value for register {slot}"),
            ));
        };
        self.rec(group).reads.push(Read {
            slot,
            stamp,
            issued_at,
            node,
        });
        Ok(())
    }

    /// End of run, invariants 5 and 6: `power_losses` are the times nodes lost power.
    /// For an epoch a failover ended (`superseded`), only the reads: its writes' fate is
    /// `check_failover`'s (the new epoch has the ones it owed).
    pub fn check_acks_and_reads(
        &self,
        group: Key,
        power_losses: &[(Micros, NodeId)],
        superseded: bool,
    ) -> Check {
        let rec = &self.groups[&group];
        let losable_at = |a: &Ack| losable_at(rec, a, power_losses);
        let must_survive = |a: &Ack| must_survive(rec, a, power_losses);
        for a in rec.acks.iter().filter(|a| !superseded && must_survive(a)) {
            match rec.committed.get(&a.index) {
                Some(c) if c.term == a.term && c.digest == a.digest => {}
                other => {
                    return Err(violation(
                        Invariant::AcknowledgedWriteKept,
                        format!(
                            "group {group}: a write answered {} at {} us (entry {} term {}) is not \
                             in the committed record, which has {:?} there",
                            if a.early { "early" } else { "at commit" },
                            a.acked_at,
                            a.index,
                            a.term,
                            other.map(|c| c.term)
                        ),
                    ))
                }
            }
        }
        // The highest committed index that wrote each (slot, stamp).
        let mut written: BTreeMap<(usize, u64), u64> = BTreeMap::new();
        for (index, c) in &rec.committed {
            if let Ok(VolumeCommand::Write { offset, data }) = VolumeCommand::decode(&c.data) {
                let at = offset as usize;
                if c.normal && at >= REGISTERS_AT && data.len() == REGISTER_BYTES {
                    if let Some(stamp) = register_stamp(data) {
                        written.insert(((at - REGISTERS_AT) / REGISTER_BYTES, stamp), *index);
                    }
                }
            }
        }
        for r in &rec.reads {
            let seen = if r.stamp == 0 {
                Some(rec.base_index)
            } else {
                written.get(&(r.slot, r.stamp)).copied()
            };
            let Some(seen) = seen else {
                return Err(violation(
                    Invariant::ReadSeesAcknowledgedWrites,
                    format!(
                        "group {group}: node {} read stamp {} in register {}, which no committed \
                         entry wrote",
                        r.node, r.stamp, r.slot
                    ),
                ));
            };
            // A read sees every write answered before it was issued that was not lost by
            // then.
            let newest = rec
                .acks
                .iter()
                .filter(|a| {
                    a.acked_at <= r.issued_at
                        && (must_survive(a) || losable_at(a).is_some_and(|t| r.issued_at < t))
                })
                .filter(|a| a.register.is_some_and(|(slot, _)| slot == r.slot))
                .max_by_key(|a| a.index);
            if let Some(a) = newest {
                if seen < a.index {
                    return Err(violation(
                        Invariant::ReadSeesAcknowledgedWrites,
                        format!(
                            "group {group}: node {} read register {} at {} us and saw the write at \
                             entry {seen}, older than the write at entry {} acknowledged at {} us",
                            r.node, r.slot, r.issued_at, a.index, a.acked_at
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Acknowledged writes, reads and flushes recorded for `group`.
    pub fn counts(&self, group: Key) -> (usize, usize, usize) {
        let rec = &self.groups[&group];
        (rec.acks.len(), rec.reads.len(), rec.flushes.len())
    }

    /// End of run: replays the committed log from the bootstrap state through a fresh
    /// machine; every recorded state hash must be reproduced and the record must be
    /// gap-free up to `upto`. Returns the hash at `upto`.
    pub fn replay(&self, group: Key, upto: u64) -> Result<StateHash, Violation> {
        let rec = &self.groups[&group];
        let mut m = rec.initial.clone();
        for index in rec.base_index + 1..=upto {
            let Some(c) = rec.committed.get(&index) else {
                return Err(violation(
                    Invariant::CommittedEntryStable,
                    format!("group {group}: no node was ever handed committed entry {index}"),
                ));
            };
            if c.normal && !c.data.is_empty() {
                m.apply(index, &c.data).map_err(|e| {
                    violation(Invariant::ReplicaStateAgrees, format!("replay: {}", e.0))
                })?;
            } else {
                m.skip(index);
            }
            if let Some(h) = rec.hashes.get(&index) {
                if *h != m.hash() {
                    return Err(violation(
                        Invariant::ReplicaStateAgrees,
                        format!(
                            "group {group}: replicas had a state at index {index} that a replay of \
                             the committed log does not produce"
                        ),
                    ));
                }
            }
        }
        for Ack { index, term, .. } in rec.acks.iter().filter(|a| !a.early) {
            if *index > upto {
                return Err(violation(
                    Invariant::AcknowledgedWriteKept,
                    format!(
                        "group {group}: acknowledged entry {index} (term {term}) is beyond the \
                         final applied index {upto}"
                    ),
                ));
            }
        }
        Ok(m.hash())
    }
}
