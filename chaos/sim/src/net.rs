//! The simulated network: per-link delay (sites farther apart are slower, every message
//! gets jitter, so messages reorder), seeded drops and duplicates, and partitions.
//!
//! A partition is a set of one-way cuts `(from, to)`; it can isolate a node or a whole
//! site in one or both directions, or split the cluster in two. Partitions overlap
//! freely; a cut is lifted when every partition that made it has healed. Cuts are
//! checked when a message would be delivered, so a message in flight when a partition
//! starts is lost too.

use std::collections::BTreeMap;

use roamdisk_core::ids::{NodeId, SiteId};

use crate::config::{Micros, SimConfig, MS};
use crate::rng::SimRng;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Both,
    /// Messages from the isolated side are lost; it still hears the others.
    Outbound,
    /// Messages to the isolated side are lost; it can still talk.
    Inbound,
}

#[derive(Clone, Debug)]
pub struct Partition {
    pub description: String,
    cuts: Vec<(NodeId, NodeId)>,
}

pub struct Network {
    site_of: BTreeMap<NodeId, SiteId>,
    /// One-way base delay between two different sites, keyed by the ordered pair.
    site_delay_us: BTreeMap<(SiteId, SiteId), Micros>,
    local_delay_us: (u64, u64),
    remote_jitter_us: u64,
    pub drop_per_million: u32,
    pub duplicate_per_million: u32,
    blocked: BTreeMap<(NodeId, NodeId), u32>,
    partitions: BTreeMap<u64, Partition>,
    next_partition: u64,
}

impl Network {
    pub fn new(rng: &mut SimRng, cfg: &SimConfig, site_of: BTreeMap<NodeId, SiteId>) -> Network {
        let mut sites: Vec<SiteId> = site_of.values().copied().collect();
        sites.sort();
        sites.dedup();
        let mut site_delay_us = BTreeMap::new();
        for (i, a) in sites.iter().enumerate() {
            for b in &sites[i + 1..] {
                let ms = rng.range(cfg.remote_delay_ms.0, cfg.remote_delay_ms.1);
                site_delay_us.insert((*a, *b), ms * MS);
                site_delay_us.insert((*b, *a), ms * MS);
            }
        }
        Network {
            site_of,
            site_delay_us,
            local_delay_us: cfg.local_delay_us,
            remote_jitter_us: cfg.remote_jitter_ms * MS,
            drop_per_million: rng.range(0, u64::from(cfg.drop_per_million_max)) as u32,
            duplicate_per_million: rng.range(0, u64::from(cfg.duplicate_per_million_max)) as u32,
            blocked: BTreeMap::new(),
            partitions: BTreeMap::new(),
            next_partition: 1,
        }
    }

    pub fn site_of(&self, node: NodeId) -> SiteId {
        self.site_of[&node]
    }

    /// One-way delay of one message from a node at `from` to a node at `to`.
    pub fn delay_between_sites(&self, rng: &mut SimRng, from: SiteId, to: SiteId) -> Micros {
        let local = rng.range(self.local_delay_us.0, self.local_delay_us.1);
        match self.site_delay_us.get(&(from, to)) {
            None => local,
            Some(base) => base + local + rng.range(0, self.remote_jitter_us),
        }
    }

    /// Delays after which copies of one message arrive: none if it is dropped, two if
    /// it is duplicated.
    pub fn plan(&self, rng: &mut SimRng, from: NodeId, to: NodeId) -> Vec<Micros> {
        if rng.chance(self.drop_per_million) {
            return Vec::new();
        }
        let (fs, ts) = (self.site_of(from), self.site_of(to));
        let mut out = vec![self.delay_between_sites(rng, fs, ts)];
        if rng.chance(self.duplicate_per_million) {
            out.push(self.delay_between_sites(rng, fs, ts));
        }
        out
    }

    pub fn is_cut(&self, from: NodeId, to: NodeId) -> bool {
        self.blocked.contains_key(&(from, to))
    }

    pub fn partitions(&self) -> usize {
        self.partitions.len()
    }

    /// Draws a partition over `nodes` and starts it; returns its id and description.
    pub fn start_random_partition(&mut self, rng: &mut SimRng, nodes: &[NodeId]) -> (u64, String) {
        let dir = match rng.below(4) {
            0 => Direction::Outbound,
            1 => Direction::Inbound,
            _ => Direction::Both,
        };
        let mut sites: Vec<SiteId> = nodes.iter().map(|n| self.site_of(*n)).collect();
        sites.sort();
        sites.dedup();
        let (side, description): (Vec<NodeId>, String) = match rng.below(3) {
            0 if sites.len() > 1 => {
                let site = *rng.pick(&sites).expect("sites");
                (
                    nodes
                        .iter()
                        .copied()
                        .filter(|n| self.site_of(*n) == site)
                        .collect(),
                    format!("site {site} {dir:?}"),
                )
            }
            1 => {
                let side: Vec<NodeId> = nodes
                    .iter()
                    .copied()
                    .filter(|_| rng.below(2) == 0)
                    .collect();
                let names: Vec<String> = side.iter().map(|n| n.to_string()).collect();
                (side, format!("split [{}] {dir:?}", names.join(",")))
            }
            _ => {
                let node = *rng.pick(nodes).expect("nodes");
                (vec![node], format!("node {node} {dir:?}"))
            }
        };
        let id = self.start(&side, nodes, dir, description.clone());
        (id, description)
    }

    /// Cuts `node` off from every other node of `nodes`, both ways; returns the
    /// partition's id.
    /// Cuts `side` off from every other node, both ways.
    pub fn isolate_set(&mut self, side: &[NodeId], nodes: &[NodeId], what: String) -> u64 {
        self.start(side, nodes, Direction::Both, format!("{what} Both"))
    }

    pub fn isolate(&mut self, node: NodeId, nodes: &[NodeId]) -> u64 {
        self.start(&[node], nodes, Direction::Both, format!("node {node} Both"))
    }

    fn start(
        &mut self,
        side: &[NodeId],
        nodes: &[NodeId],
        dir: Direction,
        description: String,
    ) -> u64 {
        let mut cuts = Vec::new();
        for a in side {
            for b in nodes.iter().filter(|n| !side.contains(n)) {
                if dir != Direction::Inbound {
                    cuts.push((*a, *b));
                }
                if dir != Direction::Outbound {
                    cuts.push((*b, *a));
                }
            }
        }
        for cut in &cuts {
            *self.blocked.entry(*cut).or_default() += 1;
        }
        let id = self.next_partition;
        self.next_partition += 1;
        self.partitions.insert(id, Partition { description, cuts });
        id
    }

    pub fn heal(&mut self, id: u64) -> Option<Partition> {
        let p = self.partitions.remove(&id)?;
        for cut in &p.cuts {
            if let Some(n) = self.blocked.get_mut(cut) {
                *n -= 1;
                if *n == 0 {
                    self.blocked.remove(cut);
                }
            }
        }
        Some(p)
    }

    pub fn heal_all(&mut self) {
        let ids: Vec<u64> = self.partitions.keys().copied().collect();
        for id in ids {
            self.heal(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_overlap_and_heal() {
        let mut rng = SimRng::new(1);
        let site_of: BTreeMap<NodeId, SiteId> = [
            (NodeId(1), SiteId(0)),
            (NodeId(2), SiteId(0)),
            (NodeId(3), SiteId(1)),
        ]
        .into();
        let mut net = Network::new(&mut rng, &SimConfig::default(), site_of);
        let nodes = [NodeId(1), NodeId(2), NodeId(3)];
        let mut ids = Vec::new();
        for _ in 0..20 {
            ids.push(net.start_random_partition(&mut rng, &nodes).0);
        }
        assert!(!net.blocked.is_empty());
        for id in ids {
            net.heal(id);
        }
        assert!(net.blocked.is_empty());
        assert_eq!(net.partitions(), 0);
    }
}
