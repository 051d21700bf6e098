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
//! - A site-loss run (`SimConfig::site_loss`) has two other sites, no spares, and as
//!   many nodes at the first of them as the home has: the failover's site, where the
//!   metadata places the voters of the re-formed group.

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
/// Where a site-loss run fails the volume over to.
pub const FAILOVER_SITE: SiteId = SiteId(1);

/// The site's name in the metadata.
pub fn site_name(site: SiteId) -> String {
    format!("site{}", site.0)
}

impl Topology {
    pub fn draw(rng: &mut SimRng, cfg: &SimConfig) -> Topology {
        let voters = *rng
            .pick(&cfg.voters_choices)
            .expect("voters_choices is empty");
        assert!(
            (VOTERS_MIN..=VOTERS_MAX).contains(&voters),
            "voters must be in {VOTERS_MIN}..={VOTERS_MAX}"
        );
        let mut remote_sites = rng.range(0, cfg.remote_sites_max as u64) as usize;
        let mut spares = rng.range(0, cfg.spare_nodes_max as u64) as usize;
        if cfg.site_loss {
            // Two other sites, so that the metadata quorum survives the home; the first
            // has as many nodes as the home (the failover places its voters there).
            remote_sites = 2;
            spares = 0;
        }
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
        if cfg.site_loss {
            // Nodes at the failover's site that hold no replica yet.
            for _ in 1..voters {
                nodes.insert(NodeId(next), FAILOVER_SITE);
                next += 1;
            }
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

    /// The nodes at `site`.
    pub fn at(&self, site: SiteId) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, s)| **s == site)
            .map(|(n, _)| *n)
            .collect()
    }
}
