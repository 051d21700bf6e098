//! The cluster-metadata state machine: sites, nodes, volumes, their placement and
//! generations. It is replicated by the metadata Raft group (group 0), whose voters span
//! sites, and every node keeps a replica of it.
//!
//! Invariants (checked by `ClusterState::check` after every apply in tests):
//! - `apply` is deterministic: replicas applying the same commands hold equal states.
//!   Placement in particular is decided at apply time from the state alone.
//! - volume names and ids are unique; ids are never reused;
//! - a volume's voters are distinct nodes of its home site, its learners distinct nodes
//!   of other sites, and no node is both;
//! - generations only grow.
//!
//! Commands are versioned like volume commands (`META_FORMAT_VERSION`); a command of a
//! newer version than this node knows is refused at decode (every replica refuses it
//! alike, so the node stops rather than diverge). Changelog:
//! - 1: AddNode, CreateVolume, ResizeVolume, DeleteVolume.
//! - 2: MoveVolume, FinishMove (they were added under version 1 at first; entries
//!   written then still decode).
//! - 3: Failover (a forced failover of a volume whose home site is lost: the group
//!   re-forms from one surviving replica in a new epoch) and DiscardDivergent (the
//!   fenced replicas of the old home give up their divergent writes and come back as
//!   learners); SetPolicy (what a `durability=site` volume does while no other site
//!   answers: suspend or degrade).
//! - 4: CreateGroup and AddToGroup (consistency groups: volumes that are ranges of one
//!   Raft group's address space, so that they share one log and every cut of it is
//!   crash-consistent across them; see `docs/decisions/032-consistency-groups.md`).
//!
//! The encoded [`ClusterState`] (the metadata snapshot) carries its own format version,
//! [`CLUSTER_STATE_VERSION`]; a state of a newer version is refused at decode (version 2
//! still decodes).
//!
//! A node's site never changes (`AddNode` with a known id and another site is refused):
//! its replicas were placed by site.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError};
use crate::ids::{Generation, NodeId, VolumeId, BLOCK_BYTES};

pub const META_FORMAT_VERSION: u16 = 4;
/// Format of the encoded [`ClusterState`]. 1 had no version (before failovers); 2 adds
/// each volume's epoch, divergent replicas and last failover; 3 a group's members (a
/// state of version 2 still decodes, with none).
pub const CLUSTER_STATE_VERSION: u16 = 3;
/// Members of a consistency group start at multiples of this (1 MiB), so that a
/// member's blocks never share a catch-up chunk or a scan slice boundary oddly with its
/// neighbour's and its offset reads well in `group show`.
pub const MEMBER_ALIGN_BYTES: u64 = 1 << 20;
/// Most volumes in one consistency group.
pub const GROUP_MEMBERS_MAX: usize = 32;

/// Largest volume: 64 TiB.
pub const VOLUME_SIZE_MAX_BYTES: u64 = 64 << 40;
/// Longest volume or site name.
pub const NAME_MAX_BYTES: usize = 64;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Durability {
    /// A write commits on a quorum of the home site; other sites lag (reported).
    #[default]
    Node,
    /// A write commits only once a replica outside the home site has it.
    Site,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: NodeId,
    pub site: String,
    /// Address other nodes use for Raft and forwarding.
    pub peer_addr: String,
    /// HTTP admin API.
    pub admin_addr: String,
    /// NBD export address.
    pub nbd_addr: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub id: VolumeId,
    pub name: String,
    pub size: u64,
    pub replicas: u32,
    pub home_site: String,
    pub durability: Durability,
    /// Raft voters (home site).
    pub voters: Vec<NodeId>,
    /// Raft learners (at least one per other site; a former home keeps its replicas as
    /// learners so that moving back copies nothing).
    pub learners: Vec<NodeId>,
    /// Bumped when the volume's home changes; never goes back.
    pub generation: Generation,
    /// Membership the group was bootstrapped with (its state at index 0), so that a
    /// replica added later starts from the same state as the others.
    pub initial_voters: Vec<NodeId>,
    pub initial_learners: Vec<NodeId>,
    /// A move in progress: the placement the group's leader is driving towards.
    pub moving: Option<MoveTarget>,
    /// The incarnation of the volume's Raft group: 0 until a forced failover, then the
    /// generation that failover made. Raft messages and requests of any other epoch are
    /// refused, so that a cut-off old home can never reach the re-formed group.
    pub epoch: u64,
    /// Replicas fenced by a failover (the old home's): they may hold writes the
    /// re-formed group never saw, kept untouched until `DiscardDivergent`.
    pub divergent: Vec<Divergent>,
    /// The last forced failover.
    pub failover: Option<FailoverRecord>,
    /// What a site-durable volume does while no other site answers.
    pub on_no_site: OnNoSite,
    /// A consistency group: the volumes that are ranges of this group's address space,
    /// exported under their own names (the group itself is not exported). Empty for a
    /// plain volume.
    pub members: Vec<Member>,
}

/// A volume of a consistency group: bytes `offset..offset + size` of the group's
/// Raft group, exported as a volume of `size` bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub offset: u64,
    pub size: u64,
}

/// What a `durability=site` volume does when no replica at another site takes its
/// writes (the home is cut off from every other site).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnNoSite {
    /// Writes wait until another site has them; they never fail (DRBD's `on-no-quorum
    /// suspend-io`, what LINBIT advises for VMs).
    #[default]
    Suspend,
    /// After `ms` without another site, writes commit on the home quorum alone: the
    /// volume is reported degraded, with its growing RPO, and is site-durable again by
    /// itself once a remote replica has caught up (TiKV DR auto-sync's sync, async,
    /// sync-recover).
    DegradeAfter { ms: u64 },
}

/// Longest `degrade-after`: an hour.
pub const DEGRADE_AFTER_MAX_MS: u64 = 3_600_000;

/// A replica fenced by a failover, with what it may hold that the others do not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Divergent {
    pub node: NodeId,
    /// The epoch it was fenced in (its writes after the divergence point are of it).
    pub epoch: u64,
}

/// The loss a failover states before it acts (see `roamdisk_core::failover`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rpo {
    /// Every write acknowledged at the old home is in the replica the group re-forms from.
    pub lossless: bool,
    /// Entries and bytes the old home's leader had and the chosen replica lacks, as last
    /// reported to the surviving sites (writes acknowledged after that report add to it).
    pub entries: u64,
    pub bytes: u64,
    /// Writes acknowledged after this home-site time may be lost (Unix ms); `None` when
    /// lossless (or no stamped entry survives).
    pub after_unix_ms: Option<u64>,
    /// When the home's leader made the report `entries` and `bytes` come from.
    pub as_of_unix_ms: Option<u64>,
}

/// What a forced failover did, for `volume show`, the failback and the checker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRecord {
    pub plan: String,
    /// The site the volume failed over to, and the site it lost.
    pub to: String,
    pub from_site: String,
    /// The replica the group re-formed from, and its log's end then: the divergence
    /// point is (`generation`, `index`).
    pub node: NodeId,
    pub index: u64,
    pub term: u64,
    /// Highest index that replica knew committed when the plan was made: every replica's
    /// log agrees up to it.
    pub committed: u64,
    pub term_floor: u64,
    pub generation: Generation,
    pub at_unix_ms: u64,
    pub rpo: Rpo,
}

/// Where a moving volume is going.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveTarget {
    pub to: String,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
}

impl VolumeInfo {
    /// True if `node` has (or, during a move, gets) a replica.
    pub fn replicas_on(&self, node: NodeId) -> bool {
        self.voters.contains(&node)
            || self.learners.contains(&node)
            || self
                .moving
                .as_ref()
                .is_some_and(|m| m.voters.contains(&node) || m.learners.contains(&node))
    }

    /// The placement the group should have: the move target while moving.
    pub fn desired(&self) -> (&[NodeId], &[NodeId]) {
        match &self.moving {
            Some(m) => (&m.voters, &m.learners),
            None => (&self.voters, &self.learners),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub nodes: BTreeMap<NodeId, NodeInfo>,
    pub volumes: BTreeMap<String, VolumeInfo>,
    pub next_volume_id: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Add or update a node (same id: addresses and site are replaced).
    AddNode(NodeInfo),
    CreateVolume {
        name: String,
        size: u64,
        replicas: u32,
        home_site: Option<String>,
        durability: Durability,
    },
    /// Grow a volume.
    ResizeVolume {
        name: String,
        size: u64,
    },
    DeleteVolume {
        name: String,
    },
    /// Start moving a volume's home to `to`: its replicas there become the voters, the
    /// old home's voters become learners. The group's leader drives the membership change.
    MoveVolume {
        name: String,
        to: String,
    },
    /// The group's membership and leader reached the move target: make it the placement
    /// and bump the generation. Refused unless `generation` is the current one (so a
    /// repeated finish does nothing).
    FinishMove {
        name: String,
        to: String,
        generation: Generation,
    },
    /// The volume's home site is lost: re-form its group from replica `node` (outside the
    /// home) in a new epoch, with voters placed at `to` by the mover; the old home's
    /// replicas are fenced and keep their divergent writes. Refused unless the volume is
    /// still at `generation` (the plan's).
    Failover {
        name: String,
        to: String,
        node: NodeId,
        /// The chosen replica's log end and known commit when the plan was made.
        index: u64,
        term: u64,
        committed: u64,
        /// The highest term any surviving replica had: the re-formed group's terms start
        /// above it.
        term_floor: u64,
        generation: Generation,
        plan: String,
        at_unix_ms: u64,
        rpo: Rpo,
    },
    /// The fenced replica on `node` (every one with `None`) gives up its divergent writes
    /// and becomes a learner again: it resyncs the blocks that differ.
    DiscardDivergent {
        name: String,
        node: Option<NodeId>,
    },
    /// Sets what a `durability=site` volume does while no other site answers.
    SetPolicy {
        name: String,
        on_no_site: OnNoSite,
    },
    /// Creates a consistency group: one Raft group (named `name`, placed like a volume)
    /// whose address space holds `members` (name, size) one after another, each exported
    /// as a volume. They share one log, so they move and fail over together to one cut.
    CreateGroup {
        name: String,
        members: Vec<(String, u64)>,
        replicas: u32,
        home_site: Option<String>,
        durability: Durability,
    },
    /// Adds a new volume of `size` bytes to consistency group `group`: the group grows by
    /// it (aligned) and it starts empty.
    AddToGroup {
        group: String,
        name: String,
        size: u64,
    },
}

#[derive(Serialize, Deserialize)]
struct MetaEnvelope {
    version: u16,
    command: MetaCommand,
}

/// Why a metadata command was refused. Deterministic: every replica refuses the same
/// commands for the same reasons.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MetaError {
    #[error("volume {0:?} already exists")]
    VolumeExists(String),
    #[error("volume {0:?} not found")]
    VolumeNotFound(String),
    #[error("invalid volume name {0:?}: use 1-64 characters from a-z, A-Z, 0-9, '-', '_', '.'")]
    InvalidName(String),
    #[error("invalid size {size}: must be a positive multiple of {BLOCK_BYTES} bytes up to {VOLUME_SIZE_MAX_BYTES}")]
    InvalidSize { size: u64 },
    #[error("volume {name:?} is {current} bytes; it can only grow (asked {requested})")]
    Shrink {
        name: String,
        current: u64,
        requested: u64,
    },
    #[error("invalid replica count {0}: must be 1..=7")]
    InvalidReplicas(u32),
    #[error("site {site:?} has {available} nodes, {wanted} replicas requested")]
    NotEnoughNodes {
        site: String,
        available: usize,
        wanted: u32,
    },
    #[error("site {0:?} has no nodes")]
    UnknownSite(String),
    #[error("no nodes in the cluster")]
    NoNodes,
    #[error("node {node} is in site {from:?}; it cannot move to {to:?} (add it as a new node)")]
    NodeSiteChange {
        node: NodeId,
        from: String,
        to: String,
    },
    #[error("durability=site needs a replica outside the home site {home:?}, and the cluster has no other site")]
    NoRemoteSite { home: String },
    #[error("volume {name:?} is already moving to {to:?}")]
    MoveInProgress { name: String, to: String },
    #[error("volume {name:?} is not moving to {to:?}, or the move already finished")]
    NotMoving { name: String, to: String },
    #[error("volume {name:?} already lives in site {site:?}")]
    AlreadyHome { name: String, site: String },
    #[error("volume {name:?} is at generation {current}, the failover plan was made at {planned}: make a new plan")]
    StaleFailover {
        name: String,
        planned: Generation,
        current: Generation,
    },
    #[error("node {node} holds no replica of volume {name:?} outside its home site {home:?}")]
    NotASurvivor {
        name: String,
        node: NodeId,
        home: String,
    },
    #[error("volume {name:?} cannot fail over to {site:?}: that is the home site it is losing")]
    FailoverToLostHome { name: String, site: String },
    #[error("invalid policy: {0}")]
    InvalidPolicy(String),
    #[error("volume {name:?} is in consistency group {group:?}: its group moves, fails over, grows and is deleted as a whole (use the group's name)")]
    InGroup { name: String, group: String },
    #[error("{0:?} is not a consistency group")]
    NotAGroup(String),
    #[error("invalid consistency group: {0}")]
    InvalidGroup(String),
    #[error("volume {name:?} has no divergent replica{}", node.map(|n| format!(" on node {n}")).unwrap_or_default())]
    NotDivergent { name: String, node: Option<NodeId> },
    /// Applied, the command would break an invariant of the metadata (a bug in `apply`):
    /// every replica refuses it alike and keeps the state it had.
    #[error("refused: the command would leave the cluster metadata invalid ({0})")]
    WouldBreakInvariant(String),
}

/// Result of applying one command.
pub type MetaResult = Result<Option<VolumeInfo>, MetaError>;

impl MetaCommand {
    /// The volume a command acts on by name (not `CreateVolume`, which names a new one).
    fn volume_name(&self) -> Option<&str> {
        match self {
            MetaCommand::ResizeVolume { name, .. }
            | MetaCommand::DeleteVolume { name }
            | MetaCommand::MoveVolume { name, .. }
            | MetaCommand::FinishMove { name, .. }
            | MetaCommand::Failover { name, .. }
            | MetaCommand::DiscardDivergent { name, .. }
            | MetaCommand::SetPolicy { name, .. } => Some(name),
            MetaCommand::AddToGroup { group, .. } => Some(group),
            MetaCommand::AddNode(_)
            | MetaCommand::CreateVolume { .. }
            | MetaCommand::CreateGroup { .. } => None,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        codec::encode(&MetaEnvelope {
            version: META_FORMAT_VERSION,
            command: self.clone(),
        })
        .expect("meta commands always encode")
    }

    pub fn decode(bytes: &[u8]) -> Result<MetaCommand, CodecError> {
        let env: MetaEnvelope = codec::decode(bytes)?;
        if env.version > META_FORMAT_VERSION {
            return Err(CodecError::Version {
                found: env.version,
                known: META_FORMAT_VERSION,
            });
        }
        Ok(env.command)
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NAME_MAX_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn valid_size(size: u64) -> bool {
    size > 0 && size % BLOCK_BYTES == 0 && size <= VOLUME_SIZE_MAX_BYTES
}

/// Where the next member starts after one of `size` bytes at `offset`; `None` past the
/// largest volume.
fn aligned_end(offset: u64, size: u64) -> Option<u64> {
    let end = offset
        .checked_add(size)?
        .checked_next_multiple_of(MEMBER_ALIGN_BYTES)?;
    (end <= VOLUME_SIZE_MAX_BYTES).then_some(end)
}

impl ClusterState {
    pub fn sites(&self) -> Vec<String> {
        let mut s: Vec<String> = self.nodes.values().map(|n| n.site.clone()).collect();
        s.sort();
        s.dedup();
        s
    }

    pub fn volume_by_id(&self, id: VolumeId) -> Option<&VolumeInfo> {
        self.volumes.values().find(|v| v.id == id)
    }

    /// The consistency group `name` is a member of.
    pub fn group_of(&self, name: &str) -> Option<&VolumeInfo> {
        self.volumes
            .values()
            .find(|v| v.members.iter().any(|m| m.name == name))
    }

    /// A volume or group by its name, or the group of a member named `name`.
    pub fn resolve(&self, name: &str) -> Option<&VolumeInfo> {
        self.volumes.get(name).or_else(|| self.group_of(name))
    }

    fn name_taken(&self, name: &str) -> bool {
        self.volumes.contains_key(name) || self.group_of(name).is_some()
    }

    /// What an NBD export named `name` serves: the Raft group and the byte range of it
    /// (`(group, offset, size)`). Plain volumes and group members are exports; a group's
    /// own name is not.
    pub fn export(&self, name: &str) -> Option<(&VolumeInfo, u64, u64)> {
        match self.volumes.get(name) {
            Some(v) if v.members.is_empty() => Some((v, 0, v.size)),
            Some(_) => None,
            None => {
                let g = self.group_of(name)?;
                let m = g.members.iter().find(|m| m.name == name)?;
                Some((g, m.offset, m.size))
            }
        }
    }

    /// Every export's name, in order: plain volumes and group members.
    pub fn export_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .volumes
            .values()
            .flat_map(|v| {
                if v.members.is_empty() {
                    vec![v.name.clone()]
                } else {
                    v.members.iter().map(|m| m.name.clone()).collect()
                }
            })
            .collect();
        names.sort();
        names
    }

    /// Replicas each node carries, for placement.
    fn load(&self) -> BTreeMap<NodeId, usize> {
        let mut load: BTreeMap<NodeId, usize> = self.nodes.keys().map(|n| (*n, 0)).collect();
        for v in self.volumes.values() {
            let mut all: Vec<NodeId> = v.voters.iter().chain(&v.learners).copied().collect();
            if let Some(m) = &v.moving {
                all.extend(m.voters.iter().chain(&m.learners));
            }
            all.sort();
            all.dedup();
            for n in all {
                *load.entry(n).or_default() += 1;
            }
        }
        load
    }

    /// The `count` least-loaded nodes of `site` (ties by id): deterministic.
    fn pick(&self, site: &str, count: usize, load: &BTreeMap<NodeId, usize>) -> Vec<NodeId> {
        let mut candidates: Vec<(usize, NodeId)> = self
            .nodes
            .values()
            .filter(|n| n.site == site)
            .map(|n| (load[&n.id], n.id))
            .collect();
        candidates.sort();
        candidates
            .into_iter()
            .take(count)
            .map(|(_, id)| id)
            .collect()
    }

    pub fn apply(&mut self, cmd: MetaCommand) -> MetaResult {
        // A member has no placement, generation or size of its own: its group's are.
        if let Some(name) = cmd.volume_name() {
            if let Some(g) = self.group_of(name) {
                return Err(MetaError::InGroup {
                    name: name.to_owned(),
                    group: g.name.clone(),
                });
            }
        }
        match cmd {
            MetaCommand::AddNode(info) => {
                // A node keeps its site for life: its replicas were placed by site.
                if let Some(old) = self.nodes.get(&info.id) {
                    if old.site != info.site {
                        return Err(MetaError::NodeSiteChange {
                            node: info.id,
                            from: old.site.clone(),
                            to: info.site,
                        });
                    }
                }
                if !valid_name(&info.site) {
                    return Err(MetaError::InvalidName(info.site));
                }
                self.nodes.insert(info.id, info);
                Ok(None)
            }
            MetaCommand::CreateVolume {
                name,
                size,
                replicas,
                home_site,
                durability,
            } => {
                if !valid_name(&name) {
                    return Err(MetaError::InvalidName(name));
                }
                if self.name_taken(&name) {
                    return Err(MetaError::VolumeExists(name));
                }
                if !valid_size(size) {
                    return Err(MetaError::InvalidSize { size });
                }
                if !(1..=7).contains(&replicas) {
                    return Err(MetaError::InvalidReplicas(replicas));
                }
                let sites = self.sites();
                let home = match home_site {
                    Some(s) if sites.contains(&s) => s,
                    Some(s) => return Err(MetaError::UnknownSite(s)),
                    None => sites.first().cloned().ok_or(MetaError::NoNodes)?,
                };
                let load = self.load();
                let voters = self.pick(&home, replicas as usize, &load);
                if voters.len() < replicas as usize {
                    return Err(MetaError::NotEnoughNodes {
                        site: home,
                        available: voters.len(),
                        wanted: replicas,
                    });
                }
                let learners: Vec<NodeId> = sites
                    .iter()
                    .filter(|s| **s != home)
                    .flat_map(|s| self.pick(s, 1, &load))
                    .collect();
                if durability == Durability::Site && learners.is_empty() {
                    return Err(MetaError::NoRemoteSite { home });
                }
                self.next_volume_id += 1;
                let info = VolumeInfo {
                    id: VolumeId(self.next_volume_id),
                    name: name.clone(),
                    size,
                    replicas,
                    home_site: home,
                    durability,
                    initial_voters: voters.clone(),
                    initial_learners: learners.clone(),
                    voters,
                    learners,
                    generation: Generation(1),
                    moving: None,
                    epoch: 0,
                    divergent: Vec::new(),
                    failover: None,
                    on_no_site: OnNoSite::default(),
                    members: Vec::new(),
                };
                self.volumes.insert(name, info.clone());
                Ok(Some(info))
            }
            MetaCommand::ResizeVolume { name, size } => {
                let v = self
                    .volumes
                    .get_mut(&name)
                    .ok_or_else(|| MetaError::VolumeNotFound(name.clone()))?;
                if !v.members.is_empty() {
                    return Err(MetaError::InvalidGroup(format!(
                        "{name:?} grows by adding volumes to it (`volume create NAME --group {name}`), not by resizing"
                    )));
                }
                if !valid_size(size) {
                    return Err(MetaError::InvalidSize { size });
                }
                if size < v.size {
                    return Err(MetaError::Shrink {
                        name,
                        current: v.size,
                        requested: size,
                    });
                }
                v.size = size;
                Ok(Some(v.clone()))
            }
            MetaCommand::DeleteVolume { name } => {
                let v = self
                    .volumes
                    .remove(&name)
                    .ok_or(MetaError::VolumeNotFound(name))?;
                Ok(Some(v))
            }
            MetaCommand::MoveVolume { name, to } => self.start_move(name, to),
            MetaCommand::Failover {
                name,
                to,
                node,
                index,
                term,
                committed,
                term_floor,
                generation,
                plan,
                at_unix_ms,
                rpo,
            } => {
                let record = FailoverRecord {
                    plan,
                    to: to.clone(),
                    from_site: String::new(),
                    node,
                    index,
                    term,
                    committed,
                    term_floor,
                    generation,
                    at_unix_ms,
                    rpo,
                };
                self.failover(name, to, record)
            }
            MetaCommand::DiscardDivergent { name, node } => self.discard_divergent(name, node),
            MetaCommand::CreateGroup {
                name,
                members,
                replicas,
                home_site,
                durability,
            } => self.create_group(name, members, replicas, home_site, durability),
            MetaCommand::AddToGroup { group, name, size } => self.add_to_group(group, name, size),
            MetaCommand::SetPolicy { name, on_no_site } => {
                if let OnNoSite::DegradeAfter { ms } = on_no_site {
                    if ms == 0 || ms > DEGRADE_AFTER_MAX_MS {
                        return Err(MetaError::InvalidPolicy(format!(
                            "degrade-after must be 1 ms to {DEGRADE_AFTER_MAX_MS} ms, not {ms}"
                        )));
                    }
                }
                let v = self
                    .volumes
                    .get_mut(&name)
                    .ok_or_else(|| MetaError::VolumeNotFound(name.clone()))?;
                v.on_no_site = on_no_site;
                Ok(Some(v.clone()))
            }
            MetaCommand::FinishMove {
                name,
                to,
                generation,
            } => {
                let v = self
                    .volumes
                    .get_mut(&name)
                    .ok_or_else(|| MetaError::VolumeNotFound(name.clone()))?;
                match &v.moving {
                    Some(m) if m.to == to && v.generation == generation => {
                        let m = v.moving.take().expect("checked");
                        v.home_site = m.to;
                        v.voters = m.voters;
                        v.learners = m.learners;
                        v.generation = Generation(v.generation.0 + 1);
                        Ok(Some(v.clone()))
                    }
                    _ => Err(MetaError::NotMoving { name, to }),
                }
            }
        }
    }

    /// See [`MetaCommand::CreateGroup`].
    fn create_group(
        &mut self,
        name: String,
        members: Vec<(String, u64)>,
        replicas: u32,
        home_site: Option<String>,
        durability: Durability,
    ) -> MetaResult {
        if members.is_empty() || members.len() > GROUP_MEMBERS_MAX {
            return Err(MetaError::InvalidGroup(format!(
                "a group has 1 to {GROUP_MEMBERS_MAX} volumes, not {}",
                members.len()
            )));
        }
        let mut layout = Vec::with_capacity(members.len());
        let mut end = 0u64;
        for (i, (m, size)) in members.iter().enumerate() {
            if !valid_name(m) {
                return Err(MetaError::InvalidName(m.clone()));
            }
            if self.name_taken(m) || *m == name || members[..i].iter().any(|(o, _)| o == m) {
                return Err(MetaError::VolumeExists(m.clone()));
            }
            if !valid_size(*size) {
                return Err(MetaError::InvalidSize { size: *size });
            }
            layout.push(Member {
                name: m.clone(),
                offset: end,
                size: *size,
            });
            end = aligned_end(end, *size).ok_or(MetaError::InvalidSize { size: *size })?;
        }
        if self.name_taken(&name) {
            return Err(MetaError::VolumeExists(name));
        }
        self.apply(MetaCommand::CreateVolume {
            name: name.clone(),
            size: end,
            replicas,
            home_site,
            durability,
        })?;
        let g = self.volumes.get_mut(&name).expect("just created");
        g.members = layout;
        Ok(Some(g.clone()))
    }

    /// See [`MetaCommand::AddToGroup`].
    fn add_to_group(&mut self, group: String, name: String, size: u64) -> MetaResult {
        if !valid_name(&name) {
            return Err(MetaError::InvalidName(name));
        }
        if self.name_taken(&name) {
            return Err(MetaError::VolumeExists(name));
        }
        if !valid_size(size) {
            return Err(MetaError::InvalidSize { size });
        }
        let g = self
            .volumes
            .get_mut(&group)
            .ok_or_else(|| MetaError::VolumeNotFound(group.clone()))?;
        if g.members.is_empty() {
            return Err(MetaError::NotAGroup(group));
        }
        if g.members.len() >= GROUP_MEMBERS_MAX {
            return Err(MetaError::InvalidGroup(format!(
                "group {group:?} already has {GROUP_MEMBERS_MAX} volumes"
            )));
        }
        // Groups only grow here, by aligned ranges; aligned again all the same.
        let offset = g
            .size
            .checked_next_multiple_of(MEMBER_ALIGN_BYTES)
            .ok_or(MetaError::InvalidSize { size })?;
        let end = aligned_end(offset, size).ok_or(MetaError::InvalidSize { size })?;
        g.members.push(Member { name, offset, size });
        g.size = end;
        Ok(Some(g.clone()))
    }

    /// See [`MetaCommand::Failover`].
    fn failover(&mut self, name: String, to: String, mut record: FailoverRecord) -> MetaResult {
        let v = self
            .volumes
            .get(&name)
            .ok_or_else(|| MetaError::VolumeNotFound(name.clone()))?;
        if v.generation != record.generation {
            return Err(MetaError::StaleFailover {
                name,
                planned: record.generation,
                current: v.generation,
            });
        }
        if !self.sites().contains(&to) {
            return Err(MetaError::UnknownSite(to));
        }
        let lost = v.home_site.clone();
        if to == lost {
            return Err(MetaError::FailoverToLostHome { name, site: to });
        }
        let from = record.node;
        let from_site = match self.nodes.get(&from) {
            Some(n) if n.site != lost && v.replicas_on(from) => n.site.clone(),
            _ => {
                return Err(MetaError::NotASurvivor {
                    name,
                    node: from,
                    home: lost,
                })
            }
        };
        let site_of = |n: &NodeId| self.nodes.get(n).map(|i| i.site.clone());
        let mut placed: Vec<NodeId> = v.voters.iter().chain(&v.learners).copied().collect();
        if let Some(m) = &v.moving {
            placed.extend(m.voters.iter().chain(&m.learners));
        }
        placed.sort();
        placed.dedup();
        let (fenced, survivors): (Vec<NodeId>, Vec<NodeId>) = placed
            .into_iter()
            .partition(|n| site_of(n).as_deref() == Some(lost.as_str()));
        let generation = Generation(v.generation.0 + 1);
        let old_epoch = v.epoch;
        // The voters at `to`: the chosen replica if it is there, warm replicas there,
        // then the least loaded nodes of the site.
        let wanted = v.replicas as usize;
        let in_to = |n: &NodeId| site_of(n).as_deref() == Some(to.as_str());
        let mut voters: Vec<NodeId> = Vec::new();
        if in_to(&from) {
            voters.push(from);
        }
        for n in survivors.iter().filter(|n| in_to(n)) {
            if voters.len() < wanted && !voters.contains(n) {
                voters.push(*n);
            }
        }
        // Never a replica a failover fenced (it holds writes the group never saw).
        let divergent: Vec<NodeId> = v.divergent.iter().map(|d| d.node).collect();
        let load = self.load();
        for n in self.pick(&to, wanted + voters.len() + divergent.len(), &load) {
            if voters.len() < wanted && !voters.contains(&n) && !divergent.contains(&n) {
                voters.push(n);
            }
        }
        if voters.len() < wanted {
            return Err(MetaError::NotEnoughNodes {
                site: to,
                available: voters.len(),
                wanted: v.replicas,
            });
        }
        // Every other survivor stays a learner; a surviving site with no replica gets
        // one. The lost site gets none: its replicas come back with DiscardDivergent.
        let mut learners: Vec<NodeId> = survivors
            .iter()
            .copied()
            .filter(|n| !voters.contains(n))
            .collect();
        for site in self.sites().iter().filter(|s| **s != to && **s != lost) {
            if !learners.iter().any(|n| site_of(n).as_deref() == Some(site)) {
                learners.extend(
                    self.pick(site, 1 + divergent.len(), &load)
                        .into_iter()
                        .filter(|n| !divergent.contains(n))
                        .take(1),
                );
            }
        }
        learners.sort();
        record.from_site = lost;
        let v = self.volumes.get_mut(&name).expect("looked up");
        v.generation = generation;
        v.epoch = generation.0;
        // Re-formed: the chosen replica alone votes; the mover places the voters.
        v.home_site = from_site;
        v.voters = vec![from];
        v.learners = survivors.iter().copied().filter(|n| *n != from).collect();
        for n in fenced {
            v.divergent.retain(|d| d.node != n);
            v.divergent.push(Divergent {
                node: n,
                epoch: old_epoch,
            });
        }
        v.divergent.sort_by_key(|d| d.node);
        v.failover = Some(record);
        v.moving = if v.voters == voters && v.home_site == to {
            None
        } else {
            Some(MoveTarget {
                to,
                voters,
                learners,
            })
        };
        Ok(Some(v.clone()))
    }

    /// See [`MetaCommand::DiscardDivergent`].
    fn discard_divergent(&mut self, name: String, node: Option<NodeId>) -> MetaResult {
        let v = self
            .volumes
            .get_mut(&name)
            .ok_or_else(|| MetaError::VolumeNotFound(name.clone()))?;
        let gone: Vec<NodeId> = v
            .divergent
            .iter()
            .map(|d| d.node)
            .filter(|n| node.is_none_or(|x| x == *n))
            .collect();
        if gone.is_empty() {
            return Err(MetaError::NotDivergent { name, node });
        }
        v.divergent.retain(|d| !gone.contains(&d.node));
        for n in gone {
            if !v.replicas_on(n) {
                v.learners.push(n);
                if let Some(m) = &mut v.moving {
                    m.learners.push(n);
                    m.learners.sort();
                }
            }
        }
        v.learners.sort();
        Ok(Some(v.clone()))
    }

    fn start_move(&mut self, name: String, to: String) -> MetaResult {
        let v = self
            .volumes
            .get(&name)
            .ok_or_else(|| MetaError::VolumeNotFound(name.clone()))?;
        if let Some(m) = &v.moving {
            return if m.to == to {
                Ok(Some(v.clone()))
            } else {
                Err(MetaError::MoveInProgress {
                    name,
                    to: m.to.clone(),
                })
            };
        }
        if v.home_site == to {
            return Err(MetaError::AlreadyHome { name, site: to });
        }
        let sites = self.sites();
        if !sites.contains(&to) {
            return Err(MetaError::UnknownSite(to));
        }
        // Voters at the new home: replicas already there first (they are warm), then the
        // least loaded nodes.
        let wanted = v.replicas as usize;
        let in_to = |n: &NodeId| self.nodes.get(n).is_some_and(|i| i.site == to);
        let mut voters: Vec<NodeId> = v.learners.iter().copied().filter(in_to).collect();
        voters.truncate(wanted);
        let load = self.load();
        for n in self.pick(&to, wanted + voters.len(), &load) {
            if voters.len() < wanted && !voters.contains(&n) {
                voters.push(n);
            }
        }
        if voters.len() < v.replicas as usize {
            return Err(MetaError::NotEnoughNodes {
                site: to,
                available: voters.len(),
                wanted: v.replicas,
            });
        }
        // Everything else stays as a learner; a site with no replica gets one.
        let mut learners: Vec<NodeId> = v
            .voters
            .iter()
            .chain(&v.learners)
            .copied()
            .filter(|n| !voters.contains(n))
            .collect();
        let load = self.load();
        for site in sites.iter().filter(|s| **s != to) {
            let has = learners
                .iter()
                .any(|n| self.nodes.get(n).is_some_and(|i| i.site == *site));
            if !has {
                learners.extend(self.pick(site, 1, &load));
            }
        }
        learners.sort();
        let target = MoveTarget {
            to,
            voters,
            learners,
        };
        let v = self.volumes.get_mut(&name).expect("looked up");
        v.moving = Some(target);
        Ok(Some(v.clone()))
    }

    /// Checks the invariants in the module doc; returns the first violation.
    pub fn check(&self) -> Result<(), String> {
        let mut ids = std::collections::BTreeSet::new();
        let mut member_names = std::collections::BTreeSet::new();
        for (name, v) in &self.volumes {
            let mut end = 0;
            for m in &v.members {
                if self.volumes.contains_key(&m.name) || !member_names.insert(&m.name) {
                    return Err(format!("volume name {:?} used twice", m.name));
                }
                if m.offset < end || m.offset % MEMBER_ALIGN_BYTES != 0 || m.size == 0 {
                    return Err(format!("group {name:?} places {:?} badly", m.name));
                }
                end = m.offset + m.size;
                if end > v.size {
                    return Err(format!(
                        "group {name:?} is smaller than its volume {:?}",
                        m.name
                    ));
                }
            }
            if *name != v.name {
                return Err(format!("volume keyed {name:?} is named {:?}", v.name));
            }
            if !ids.insert(v.id) || v.id.0 > self.next_volume_id || v.id.0 == 0 {
                return Err(format!("volume id {} duplicated or out of range", v.id));
            }
            let mut all: Vec<NodeId> = v.voters.iter().chain(&v.learners).copied().collect();
            let n = all.len();
            all.sort();
            all.dedup();
            if all.len() != n {
                return Err(format!("volume {name:?} places a node twice"));
            }
            for voter in &v.voters {
                if self
                    .nodes
                    .get(voter)
                    .is_some_and(|node| node.site != v.home_site)
                {
                    return Err(format!(
                        "volume {name:?} has voter {voter} outside its home site"
                    ));
                }
            }
            // Learners may share the home site only after a failover, which re-forms a
            // group at a site that can hold several of them.
            for learner in &v.learners {
                if v.failover.is_none()
                    && self
                        .nodes
                        .get(learner)
                        .is_some_and(|node| node.site == v.home_site)
                {
                    return Err(format!(
                        "volume {name:?} has learner {learner} in its home site"
                    ));
                }
            }
            for d in &v.divergent {
                if v.replicas_on(d.node) {
                    return Err(format!(
                        "volume {name:?} places its divergent replica {}",
                        d.node
                    ));
                }
            }
            if v.epoch > v.generation.0 {
                return Err(format!("volume {name:?} has an epoch past its generation"));
            }
            if let Some(m) = &v.moving {
                let in_to = |n: &NodeId| self.nodes.get(n).is_none_or(|i| i.site == m.to);
                if !m.voters.iter().all(in_to)
                    || m.learners
                        .iter()
                        .any(|n| self.nodes.get(n).is_some_and(|i| i.site == m.to))
                {
                    return Err(format!(
                        "volume {name:?} moves to {:?} with a misplaced replica",
                        m.to
                    ));
                }
                if m.voters.len() != v.replicas as usize {
                    return Err(format!(
                        "volume {name:?} moves with {} voters",
                        m.voters.len()
                    ));
                }
            }
        }
        Ok(())
    }

    /// The whole state, for a metadata snapshot.
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(&(CLUSTER_STATE_VERSION, self)).expect("cluster state always encodes")
    }

    /// A state of this version, or of version 2 (before consistency groups: every
    /// volume then had no members), so that a node upgraded in place still opens its
    /// metadata snapshot.
    pub fn decode(bytes: &[u8]) -> Result<ClusterState, CodecError> {
        match codec::decode::<(u16, ClusterState)>(bytes) {
            Ok((CLUSTER_STATE_VERSION, state)) => return Ok(state),
            Ok((found, _)) if found > CLUSTER_STATE_VERSION => {
                return Err(CodecError::Version {
                    found,
                    known: CLUSTER_STATE_VERSION,
                })
            }
            _ => {}
        }
        match codec::decode::<(u16, v2::ClusterState)>(bytes) {
            Ok((2, state)) => Ok(state.into()),
            Ok((found, _)) => Err(CodecError::Version {
                found,
                known: CLUSTER_STATE_VERSION,
            }),
            Err(e) => Err(e),
        }
    }
}

/// The encoded state of version 2 (`CLUSTER_STATE_VERSION` before groups), as bbda138
/// and later wrote it: the builds between 663f578 and bbda138 (one day of development,
/// never released) wrote version 2 without `on_no_site`, which does not decode here.
mod v2 {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    use super::{Divergent, Durability, FailoverRecord, MoveTarget, NodeInfo, OnNoSite};
    use crate::ids::{Generation, NodeId, VolumeId};

    #[derive(Serialize, Deserialize)]
    pub struct VolumeInfo {
        pub id: VolumeId,
        pub name: String,
        pub size: u64,
        pub replicas: u32,
        pub home_site: String,
        pub durability: Durability,
        pub voters: Vec<NodeId>,
        pub learners: Vec<NodeId>,
        pub generation: Generation,
        pub initial_voters: Vec<NodeId>,
        pub initial_learners: Vec<NodeId>,
        pub moving: Option<MoveTarget>,
        pub epoch: u64,
        pub divergent: Vec<Divergent>,
        pub failover: Option<FailoverRecord>,
        pub on_no_site: OnNoSite,
    }

    #[derive(Serialize, Deserialize)]
    pub struct ClusterState {
        pub nodes: BTreeMap<NodeId, NodeInfo>,
        pub volumes: BTreeMap<String, VolumeInfo>,
        pub next_volume_id: u64,
    }

    impl From<VolumeInfo> for super::VolumeInfo {
        fn from(v: VolumeInfo) -> Self {
            super::VolumeInfo {
                id: v.id,
                name: v.name,
                size: v.size,
                replicas: v.replicas,
                home_site: v.home_site,
                durability: v.durability,
                voters: v.voters,
                learners: v.learners,
                generation: v.generation,
                initial_voters: v.initial_voters,
                initial_learners: v.initial_learners,
                moving: v.moving,
                epoch: v.epoch,
                divergent: v.divergent,
                failover: v.failover,
                on_no_site: v.on_no_site,
                members: Vec::new(),
            }
        }
    }

    impl From<ClusterState> for super::ClusterState {
        fn from(s: ClusterState) -> Self {
            super::ClusterState {
                nodes: s.nodes,
                volumes: s.volumes.into_iter().map(|(k, v)| (k, v.into())).collect(),
                next_volume_id: s.next_volume_id,
            }
        }
    }

    #[cfg(test)]
    impl From<&super::VolumeInfo> for VolumeInfo {
        fn from(v: &super::VolumeInfo) -> Self {
            let v = v.clone();
            VolumeInfo {
                id: v.id,
                name: v.name,
                size: v.size,
                replicas: v.replicas,
                home_site: v.home_site,
                durability: v.durability,
                voters: v.voters,
                learners: v.learners,
                generation: v.generation,
                initial_voters: v.initial_voters,
                initial_learners: v.initial_learners,
                moving: v.moving,
                epoch: v.epoch,
                divergent: v.divergent,
                failover: v.failover,
                on_no_site: v.on_no_site,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(id: u64, site: &str) -> MetaCommand {
        MetaCommand::AddNode(NodeInfo {
            id: NodeId(id),
            site: site.into(),
            peer_addr: format!("127.0.0.1:{}", 7000 + id),
            admin_addr: format!("127.0.0.1:{}", 8000 + id),
            nbd_addr: format!("127.0.0.1:{}", 9000 + id),
        })
    }

    fn create(name: &str, size: u64, replicas: u32, home: Option<&str>) -> MetaCommand {
        MetaCommand::CreateVolume {
            name: name.into(),
            size,
            replicas,
            home_site: home.map(str::to_owned),
            durability: Durability::Node,
        }
    }

    #[test]
    fn placement_spreads_voters_in_home_and_one_learner_per_other_site() {
        let mut s = ClusterState::default();
        for (id, site) in [
            (1, "osaka"),
            (2, "osaka"),
            (3, "osaka"),
            (4, "osaka"),
            (5, "hokkaido"),
            (6, "fukuoka"),
            (7, "fukuoka"),
        ] {
            s.apply(node(id, site)).unwrap();
        }
        let v = s
            .apply(create("vm1", 1 << 30, 3, Some("osaka")))
            .unwrap()
            .unwrap();
        assert_eq!(v.voters, vec![NodeId(1), NodeId(2), NodeId(3)]);
        assert_eq!(v.learners, vec![NodeId(6), NodeId(5)]); // fukuoka, hokkaido (site order)
        let v2 = s
            .apply(create("vm2", 1 << 30, 3, Some("osaka")))
            .unwrap()
            .unwrap();
        assert!(
            v2.voters.contains(&NodeId(4)),
            "least-loaded node is used first: {:?}",
            v2.voters
        );
        assert!(v2.learners.contains(&NodeId(7)));
        s.check().unwrap();
    }

    #[test]
    fn a_group_lays_its_volumes_out_in_one_address_space_and_acts_as_one() {
        let mut s = ClusterState::default();
        for (id, site) in [(1, "osaka"), (2, "hokkaido")] {
            s.apply(node(id, site)).unwrap();
        }
        let group = |members: Vec<(&str, u64)>| MetaCommand::CreateGroup {
            name: "vm".into(),
            members: members
                .into_iter()
                .map(|(n, s)| (n.to_owned(), s))
                .collect(),
            replicas: 1,
            home_site: Some("osaka".into()),
            durability: Durability::Node,
        };
        // Refused: no volumes, a bad size, a repeated name, the group's own name.
        assert!(matches!(
            s.apply(group(vec![])),
            Err(MetaError::InvalidGroup(_))
        ));
        assert!(matches!(
            s.apply(group(vec![("a", 100)])),
            Err(MetaError::InvalidSize { .. })
        ));
        assert!(matches!(
            s.apply(group(vec![("a", 4096), ("a", 4096)])),
            Err(MetaError::VolumeExists(_))
        ));
        assert!(matches!(
            s.apply(group(vec![("vm", 4096)])),
            Err(MetaError::VolumeExists(_))
        ));
        assert_eq!(s, {
            let mut e = ClusterState::default();
            e.apply(node(1, "osaka")).unwrap();
            e.apply(node(2, "hokkaido")).unwrap();
            e
        });
        let g = s
            .apply(group(vec![("a", 3 * 4096), ("b", 2 << 20)]))
            .unwrap()
            .unwrap();
        let at = |g: &VolumeInfo| {
            g.members
                .iter()
                .map(|m| (m.name.clone(), m.offset, m.size))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            at(&g),
            [("a".into(), 0, 3 * 4096), ("b".into(), 1 << 20, 2 << 20)]
        );
        assert_eq!(g.size, 3 << 20);
        // Exports: the members, not the group.
        assert_eq!(s.export_names(), ["a", "b"]);
        assert!(s.export("vm").is_none());
        let (v, off, size) = s.export("b").unwrap();
        assert_eq!((v.name.as_str(), off, size), ("vm", 1 << 20, 2 << 20));
        assert_eq!(s.resolve("a").unwrap().name, "vm");
        // A member's name is taken, and a member cannot act alone.
        assert!(matches!(
            s.apply(create("a", 4096, 1, None)),
            Err(MetaError::VolumeExists(_))
        ));
        for cmd in [
            MetaCommand::MoveVolume {
                name: "a".into(),
                to: "hokkaido".into(),
            },
            MetaCommand::DeleteVolume { name: "b".into() },
            MetaCommand::ResizeVolume {
                name: "a".into(),
                size: 1 << 30,
            },
        ] {
            assert!(matches!(s.apply(cmd), Err(MetaError::InGroup { .. })));
        }
        // The group grows by volumes, not by a resize (which would unalign the next).
        assert!(matches!(
            s.apply(MetaCommand::ResizeVolume {
                name: "vm".into(),
                size: (3 << 20) + 4096
            }),
            Err(MetaError::InvalidGroup(_))
        ));
        // A volume joins at the end, aligned; a plain volume is no group.
        let g = s
            .apply(MetaCommand::AddToGroup {
                group: "vm".into(),
                name: "c".into(),
                size: 4096,
            })
            .unwrap()
            .unwrap();
        assert_eq!(
            g.members[2],
            Member {
                name: "c".into(),
                offset: 3 << 20,
                size: 4096
            }
        );
        assert_eq!(g.size, 4 << 20);
        s.apply(create("plain", 4096, 1, None)).unwrap();
        assert_eq!(
            s.apply(MetaCommand::AddToGroup {
                group: "plain".into(),
                name: "d".into(),
                size: 4096
            }),
            Err(MetaError::NotAGroup("plain".into()))
        );
        // The group moves as one.
        let moved = s
            .apply(MetaCommand::MoveVolume {
                name: "vm".into(),
                to: "hokkaido".into(),
            })
            .unwrap()
            .unwrap();
        assert_eq!(moved.moving.unwrap().to, "hokkaido");
        s.check().unwrap();
        let copy = ClusterState::decode(&s.encode()).unwrap();
        assert_eq!(copy, s);
        // Deleting the group deletes its volumes' names.
        s.apply(MetaCommand::DeleteVolume { name: "vm".into() })
            .unwrap();
        assert_eq!(s.export_names(), ["plain"]);
        s.check().unwrap();
    }

    #[test]
    fn bad_requests_are_refused_and_change_nothing() {
        let mut s = ClusterState::default();
        assert_eq!(
            s.apply(create("vm1", 4096, 1, None)),
            Err(MetaError::NoNodes)
        );
        s.apply(node(1, "a")).unwrap();
        let before = s.clone();
        assert!(matches!(
            s.apply(create("bad name", 4096, 1, None)),
            Err(MetaError::InvalidName(_))
        ));
        assert!(matches!(
            s.apply(create("vm", 1000, 1, None)),
            Err(MetaError::InvalidSize { .. })
        ));
        assert!(matches!(
            s.apply(create("vm", 4096, 3, None)),
            Err(MetaError::NotEnoughNodes { .. })
        ));
        assert!(matches!(
            s.apply(create("vm", 4096, 1, Some("zz"))),
            Err(MetaError::UnknownSite(_))
        ));
        assert!(matches!(
            s.apply(create("vm", 4096, 0, None)),
            Err(MetaError::InvalidReplicas(0))
        ));
        assert!(matches!(
            s.apply(MetaCommand::CreateVolume {
                name: "vm".into(),
                size: 4096,
                replicas: 1,
                home_site: None,
                durability: Durability::Site,
            }),
            Err(MetaError::NoRemoteSite { .. })
        ));
        assert_eq!(s, before);
        s.apply(create("vm", 8192, 1, None)).unwrap();
        assert!(matches!(
            s.apply(create("vm", 4096, 1, None)),
            Err(MetaError::VolumeExists(_))
        ));
        assert!(matches!(
            s.apply(MetaCommand::ResizeVolume {
                name: "vm".into(),
                size: 4096
            }),
            Err(MetaError::Shrink { .. })
        ));
        assert_eq!(
            s.apply(MetaCommand::ResizeVolume {
                name: "vm".into(),
                size: 16384
            })
            .unwrap()
            .unwrap()
            .size,
            16384
        );
        assert!(s
            .apply(MetaCommand::DeleteVolume { name: "vm".into() })
            .is_ok());
        assert!(matches!(
            s.apply(MetaCommand::DeleteVolume { name: "vm".into() }),
            Err(MetaError::VolumeNotFound(_))
        ));
        // Ids are not reused after a delete.
        let v = s.apply(create("vm", 8192, 1, None)).unwrap().unwrap();
        assert_eq!(v.id, VolumeId(2));
    }

    #[test]
    fn move_keeps_the_old_home_as_learners_and_bumps_the_generation() {
        let mut s = ClusterState::default();
        for (id, site) in [
            (1, "a"),
            (2, "a"),
            (3, "a"),
            (4, "b"),
            (5, "b"),
            (6, "b"),
            (7, "c"),
        ] {
            s.apply(node(id, site)).unwrap();
        }
        let v = s.apply(create("vm", 4096, 3, Some("a"))).unwrap().unwrap();
        let warm_b = *v.learners.iter().find(|n| s.nodes[n].site == "b").unwrap();
        let before = s.clone();
        assert!(matches!(
            s.apply(MetaCommand::MoveVolume {
                name: "vm".into(),
                to: "a".into()
            }),
            Err(MetaError::AlreadyHome { .. })
        ));
        assert!(matches!(
            s.apply(MetaCommand::MoveVolume {
                name: "vm".into(),
                to: "zz".into()
            }),
            Err(MetaError::UnknownSite(_))
        ));
        assert!(matches!(
            s.apply(MetaCommand::FinishMove {
                name: "vm".into(),
                to: "b".into(),
                generation: Generation(1)
            }),
            Err(MetaError::NotMoving { .. })
        ));
        assert_eq!(s, before);
        let moving = s
            .apply(MetaCommand::MoveVolume {
                name: "vm".into(),
                to: "b".into(),
            })
            .unwrap()
            .unwrap();
        let m = moving.moving.clone().unwrap();
        assert!(
            m.voters.contains(&warm_b),
            "the warm replica becomes a voter"
        );
        assert_eq!(m.voters.len(), 3);
        for old in &v.voters {
            assert!(
                m.learners.contains(old),
                "old voter {old} stays as a learner"
            );
        }
        assert!(m.learners.iter().any(|n| s.nodes[n].site == "c"));
        assert!(moving.replicas_on(NodeId(5)) && moving.replicas_on(NodeId(1)));
        assert!(matches!(
            s.apply(MetaCommand::MoveVolume {
                name: "vm".into(),
                to: "c".into()
            }),
            Err(MetaError::MoveInProgress { .. })
        ));
        let done = s
            .apply(MetaCommand::FinishMove {
                name: "vm".into(),
                to: "b".into(),
                generation: Generation(1),
            })
            .unwrap()
            .unwrap();
        assert_eq!(done.home_site, "b");
        assert_eq!(done.generation, Generation(2));
        assert_eq!(done.voters, m.voters);
        assert!(done.moving.is_none());
        assert_eq!(
            done.initial_voters, v.voters,
            "the bootstrap membership never changes"
        );
        // Finishing twice does nothing.
        assert!(s
            .apply(MetaCommand::FinishMove {
                name: "vm".into(),
                to: "b".into(),
                generation: Generation(1)
            })
            .is_err());
        s.check().unwrap();
    }

    fn failover_to(s: &ClusterState, name: &str, to: &str, node: u64) -> MetaCommand {
        MetaCommand::Failover {
            name: name.into(),
            to: to.into(),
            node: NodeId(node),
            index: 10,
            term: 2,
            committed: 9,
            term_floor: 3,
            generation: s.volumes.get(name).map_or(Generation(1), |v| v.generation),
            plan: "p".into(),
            at_unix_ms: 1,
            rpo: Rpo::default(),
        }
    }

    #[test]
    fn a_failover_reforms_from_one_survivor_fences_the_home_and_places_voters_at_the_site() {
        let mut s = ClusterState::default();
        for (id, site) in [
            (1, "a"),
            (2, "a"),
            (3, "a"),
            (4, "b"),
            (5, "b"),
            (6, "b"),
            (7, "c"),
        ] {
            s.apply(node(id, site)).unwrap();
        }
        let v = s.apply(create("vm", 4096, 3, Some("a"))).unwrap().unwrap();
        let warm_b = *v.learners.iter().find(|n| s.nodes[n].site == "b").unwrap();
        let before = s.clone();
        // The replica must be a survivor: not at the lost home, and placed.
        assert!(matches!(
            s.apply(failover_to(&before, "vm", "b", 1)),
            Err(MetaError::NotASurvivor { .. })
        ));
        assert!(matches!(
            s.apply(failover_to(&before, "vm", "b", 6)),
            Err(MetaError::NotASurvivor { .. })
        ));
        let mut stale = failover_to(&before, "vm", "b", warm_b.0);
        if let MetaCommand::Failover { generation, .. } = &mut stale {
            *generation = Generation(7);
        }
        assert!(matches!(
            s.apply(stale),
            Err(MetaError::StaleFailover { .. })
        ));
        assert_eq!(s, before);
        let f = s
            .apply(failover_to(&before, "vm", "b", warm_b.0))
            .unwrap()
            .unwrap();
        assert_eq!(f.generation, Generation(2));
        assert_eq!(f.epoch, 2);
        assert_eq!(f.voters, vec![warm_b], "the survivor alone votes");
        assert_eq!(f.home_site, "b");
        let fenced: Vec<NodeId> = f.divergent.iter().map(|d| d.node).collect();
        assert_eq!(fenced, vec![NodeId(1), NodeId(2), NodeId(3)]);
        let m = f.moving.clone().expect("the mover places the voters");
        assert_eq!(m.to, "b");
        assert_eq!(m.voters.len(), 3);
        assert!(m.voters.contains(&warm_b));
        assert!(m.learners.iter().any(|n| s.nodes[n].site == "c"));
        assert!(
            m.learners.iter().all(|n| s.nodes[n].site != "a"),
            "nothing at the lost site"
        );
        for n in [1, 2, 3] {
            assert!(!f.replicas_on(NodeId(n)));
        }
        let rec = f.failover.clone().unwrap();
        assert_eq!(
            (rec.from_site.as_str(), rec.index, rec.committed),
            ("a", 10, 9)
        );
        s.check().unwrap();
        // Discarding brings the fenced replicas back as learners.
        assert!(matches!(
            s.apply(MetaCommand::DiscardDivergent {
                name: "vm".into(),
                node: Some(NodeId(4))
            }),
            Err(MetaError::NotDivergent { .. })
        ));
        let d = s
            .apply(MetaCommand::DiscardDivergent {
                name: "vm".into(),
                node: Some(NodeId(2)),
            })
            .unwrap()
            .unwrap();
        assert!(d.learners.contains(&NodeId(2)));
        assert_eq!(d.divergent.len(), 2);
        assert!(d.moving.as_ref().unwrap().learners.contains(&NodeId(2)));
        s.check().unwrap();
        assert!(
            matches!(
                s.apply(failover_to(&before, "vm", "c", 7)),
                Err(MetaError::StaleFailover { .. })
            ),
            "a plan made before the first failover is stale"
        );
    }

    #[test]
    fn state_and_commands_round_trip() {
        let mut s = ClusterState::default();
        s.apply(node(1, "a")).unwrap();
        s.apply(create("vm", 8192, 1, None)).unwrap();
        assert_eq!(ClusterState::decode(&s.encode()).unwrap(), s);
        let c = create("x", 4096, 1, Some("a"));
        assert_eq!(MetaCommand::decode(&c.encode()).unwrap(), c);
        // A state of version 2 (before groups), as a node upgraded in place has it.
        let old = v2::ClusterState {
            nodes: s.nodes.clone(),
            volumes: s
                .volumes
                .iter()
                .map(|(k, v)| (k.clone(), v.into()))
                .collect(),
            next_volume_id: s.next_volume_id,
        };
        let bytes = codec::encode(&(2u16, old)).unwrap();
        assert_eq!(ClusterState::decode(&bytes).unwrap(), s);
        // A newer one is refused, as is garbage.
        let newer = codec::encode(&(CLUSTER_STATE_VERSION + 1, &s)).unwrap();
        assert!(matches!(
            ClusterState::decode(&newer),
            Err(CodecError::Version { .. })
        ));
        assert!(ClusterState::decode(&[1, 2, 3]).is_err());
    }

    proptest! {
        /// Two replicas applying the same random command sequence stay equal and valid.
        #[test]
        fn apply_is_deterministic_and_keeps_invariants(cmds in proptest::collection::vec(
            prop_oneof![
                (1u64..8, 0usize..3).prop_map(|(id, s)| node(id, ["a", "b", "c"][s])),
                (0usize..4, 1u64..5, 1u32..4, proptest::option::of(0usize..3)).prop_map(|(n, sz, r, h)| {
                    create(["v0", "v1", "v2", "v3"][n], sz * 4096, r, h.map(|i| ["a", "b", "c"][i]))
                }),
                (0usize..4, 1u64..9).prop_map(|(n, sz)| MetaCommand::ResizeVolume { name: ["v0", "v1", "v2", "v3"][n].into(), size: sz * 4096 }),
                (0usize..4, 1u64..2000).prop_map(|(n, sz)| MetaCommand::ResizeVolume { name: ["v0", "v1", "v2", "v3"][n].into(), size: sz * 4096 }),
                (0usize..4).prop_map(|n| MetaCommand::DeleteVolume { name: ["v0", "v1", "v2", "v3"][n].into() }),
                (0usize..4, 0usize..3).prop_map(|(n, s)| MetaCommand::MoveVolume { name: ["v0", "v1", "v2", "v3"][n].into(), to: ["a", "b", "c"][s].into() }),
                (0usize..4, 0usize..3, 1u64..4).prop_map(|(n, s, g)| MetaCommand::FinishMove { name: ["v0", "v1", "v2", "v3"][n].into(), to: ["a", "b", "c"][s].into(), generation: Generation(g) }),
                (0usize..4, 0usize..3, 1u64..8, 1u64..4).prop_map(|(n, s, node, g)| MetaCommand::Failover {
                    name: ["v0", "v1", "v2", "v3"][n].into(), to: ["a", "b", "c"][s].into(), node: NodeId(node),
                    index: 5, term: 1, committed: 4, term_floor: 1, generation: Generation(g), plan: String::new(),
                    at_unix_ms: 0, rpo: Rpo::default() }),
                (0usize..4, proptest::option::of(1u64..8)).prop_map(|(n, node)| MetaCommand::DiscardDivergent { name: ["v0", "v1", "v2", "v3"][n].into(), node: node.map(NodeId) }),
                // Groups share the volumes' names, so that names collide both ways.
                (0usize..4, 0usize..4, 1u64..600).prop_map(|(g, m, sz)| MetaCommand::CreateGroup {
                    name: ["v0", "v1", "v2", "v3"][g].into(),
                    members: vec![(["v0", "v1", "v2", "v3"][m].into(), sz * 4096), ("m".into(), 4096)],
                    replicas: 1, home_site: None, durability: Durability::Node }),
                (0usize..4, 0usize..5, 1u64..600).prop_map(|(g, m, sz)| MetaCommand::AddToGroup {
                    group: ["v0", "v1", "v2", "v3"][g].into(), name: ["v0", "v1", "v2", "v3", "m"][m].into(), size: sz * 4096 }),
            ], 1..40)) {
            let mut a = ClusterState::default();
            let mut b = ClusterState::default();
            for c in cmds {
                let before = a.clone();
                let ra = a.apply(c.clone());
                let rb = b.apply(MetaCommand::decode(&c.encode()).unwrap());
                prop_assert_eq!(&ra, &rb);
                prop_assert_eq!(&a, &b);
                prop_assert!(a.check().is_ok(), "{:?}", a.check());
                if ra.is_err() {
                    prop_assert_eq!(&a, &before, "a refused command changed the state");
                }
                // A generation never goes back.
                for (name, v) in &before.volumes {
                    if let Some(now) = a.volumes.get(name) {
                        prop_assert!(now.generation >= v.generation);
                    }
                }
            }
        }
    }
}
