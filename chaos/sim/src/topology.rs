//! The shape of a simulated cluster, drawn from the seed: sites, nodes, and the initial
//! membership of the two Raft groups.
//!
//! - Site 0 is the volume's home site; its nodes are the volume group's voters.
//! - Every other site holds one learner of the volume group: that is how roamdisk ships
//!   a volume to other sites (slower links, no say in commits).
//! - The metadata group's voters span sites (as DESIGN.md asks); every other node holds a
//!   metadata learner, as every node of a cluster does: a node answers volume requests
//!   only under its lease, which the metadata group grants (`roamdisk_core::node`'s
//!   `lease`), so no node ever leaves it.
//! - Spare nodes start without a volume replica and join through membership changes.

use std::collections::BTreeMap;

use roamdisk_core::ids::{GroupId, NodeId, SiteId, META_GROUP};

use crate::config::SimConfig;
use crate::machine::MachineKind;
use crate::rng::SimRng;

/// The volume group's id.
pub const VOLUME_GROUP: GroupId = GroupId(1);

/// Voters a group may have (raft-rs sends vote requests through a 7-slot array, and a
/// joint configuration counts the union of both sides).
pub const VOTERS_MAX: usize = 5;
pub const VOTERS_MIN: usize = 3;

#[derive(Clone, Debug)]
pub struct GroupSpec {
    pub kind: MachineKind,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
}

#[derive(Clone, Debug)]
pub struct Topology {
    pub sites: Vec<SiteId>,
    pub nodes: BTreeMap<NodeId, SiteId>,
    pub groups: BTreeMap<GroupId, GroupSpec>,
}

pub const HOME_SITE: SiteId = SiteId(0);

impl Topology {
    pub fn draw(rng: &mut SimRng, cfg: &SimConfig) -> Topology {
        let voters = *rng
            .pick(&cfg.voters_choices)
            .expect("voters_choices is empty");
        assert!(
            (VOTERS_MIN..=VOTERS_MAX).contains(&voters),
            "voters must be in {VOTERS_MIN}..={VOTERS_MAX}"
        );
        let remote_sites = rng.range(0, cfg.remote_sites_max as u64) as usize;
        let spares = rng.range(0, cfg.spare_nodes_max as u64) as usize;
        let sites: Vec<SiteId> = (0..=remote_sites as u64).map(SiteId).collect();

        let mut nodes = BTreeMap::new();
        let mut next = 1u64;
        let mut home = Vec::new();
        for _ in 0..voters {
            nodes.insert(NodeId(next), HOME_SITE);
            home.push(NodeId(next));
            next += 1;
        }
        let mut remote = Vec::new();
        for site in &sites[1..] {
            nodes.insert(NodeId(next), *site);
            remote.push(NodeId(next));
            next += 1;
        }
        for _ in 0..spares {
            let site = *rng.pick(&sites).expect("at least the home site");
            nodes.insert(NodeId(next), site);
            next += 1;
        }

        let mut groups = BTreeMap::new();
        groups.insert(
            VOLUME_GROUP,
            GroupSpec {
                kind: MachineKind::Volume,
                voters: home.clone(),
                learners: remote.clone(),
            },
        );
        // Metadata voters: one per site first, then more home nodes, three in all.
        let mut meta_voters: Vec<NodeId> = Vec::new();
        meta_voters.push(home[0]);
        meta_voters.extend(remote.iter().take(2));
        for n in &home[1..] {
            if meta_voters.len() == 3 {
                break;
            }
            meta_voters.push(*n);
        }
        meta_voters.sort();
        let meta_learners: Vec<NodeId> = nodes
            .keys()
            .copied()
            .filter(|n| !meta_voters.contains(n))
            .collect();
        groups.insert(
            META_GROUP,
            GroupSpec {
                kind: MachineKind::Meta,
                voters: meta_voters,
                learners: meta_learners,
            },
        );
        Topology {
            sites,
            nodes,
            groups,
        }
    }

    pub fn site_of(&self, node: NodeId) -> SiteId {
        self.nodes[&node]
    }
}
