//! Block copies: a replica that installed a snapshot (or was found corrupted) copies its
//! volume data from a healthy replica, chunk by chunk over the network, then the core
//! replays its log from the copy's recovery point. Each chunk is read from the source's
//! data when it is sent, so chunks reflect different source states, all at or after the
//! recovery point if the copy started after it: the replay makes the result exact. As
//! on the storage node, a copy whose recovery point changed stops before its next chunk
//! — except when the check races with the store thread (`copy_stop_per_million`), and
//! then it reports done for its old point, which the core must refuse.

use roamdisk_core::ids::{GroupId, NodeId};

use crate::checker::Check;
use crate::config::MS;
use crate::machine::VOLUME_BYTES;
use crate::sim::{Event, Simulation};

/// Bytes per copied chunk (the volume is copied in eight).
pub const COPY_CHUNK_BYTES: usize = VOLUME_BYTES / 8;

impl Simulation {
    pub(crate) fn copy_chunk(
        &mut self,
        node: NodeId,
        incarnation: u64,
        group: GroupId,
        point: u64,
        chunk: usize,
    ) -> Check {
        let n = &self.nodes[&node];
        if !n.up || n.incarnation != incarnation || n.copies.get(&group).map(|c| c.0) != Some(point)
        {
            return Ok(());
        }
        if n.recovery_point(group) != Some(point) && self.rng.chance(self.cfg.copy_stop_per_million)
        {
            // The storage node's check between chunks saw the new point: it stops, and
            // the copy for the new point starts once this one has ended.
            self.trace.note(self.now, || {
                format!("n{node} g{group}: copy for {point} stops (superseded)")
            });
            self.nodes
                .get_mut(&node)
                .expect("node")
                .copies
                .remove(&group);
            return self.restart_copy(node, group);
        }
        if n.fenced(group) {
            // A failover fenced the replica: its copy stops (the core refuses it too).
            self.nodes
                .get_mut(&node)
                .expect("node")
                .copies
                .remove(&group);
            return Ok(());
        }
        // Copy from the leader, which serves reads (the storage node's copy asks it
        // through a read barrier), of the copying replica's epoch: the storage node's
        // requests carry their epoch, and another epoch's are refused.
        let epoch = n.epoch(group);
        let source = self.leader(group).filter(|l| {
            *l != node
                && self.nodes[l].epoch(group) == epoch
                && !self.net.is_cut(node, *l)
                && !self.net.is_cut(*l, node)
        });
        let Some((data, applied)) = source
            .and_then(|l| self.nodes[&l].copy_source(group))
            .map(|(d, a)| (d.clone(), a))
        else {
            self.schedule(
                50 * MS,
                Event::CopyChunk {
                    node,
                    incarnation,
                    group,
                    point,
                    chunk,
                },
            );
            return Ok(());
        };
        let source = source.expect("a source");
        let at = chunk * COPY_CHUNK_BYTES;
        self.nodes.get_mut(&node).expect("node").copy_chunk(
            group,
            point,
            &data,
            applied,
            at..at + COPY_CHUNK_BYTES,
        );
        if at + COPY_CHUNK_BYTES < VOLUME_BYTES {
            let there = self.net.delay_between_sites(
                &mut self.rng,
                self.net.site_of(node),
                self.net.site_of(source),
            );
            let back = self.net.delay_between_sites(
                &mut self.rng,
                self.net.site_of(source),
                self.net.site_of(node),
            );
            self.schedule(
                there + back,
                Event::CopyChunk {
                    node,
                    incarnation,
                    group,
                    point,
                    chunk: chunk + 1,
                },
            );
            return Ok(());
        }
        let accepted = self.with_node(node, |n, ctx| n.copy_done(group, point, ctx))?;
        if accepted {
            self.stats.copies_accepted += 1;
        } else {
            self.stats.copies_refused += 1;
            self.trace.note(self.now, || {
                format!("n{node} g{group}: copy for {point} refused")
            });
        }
        self.restart_copy(node, group)
    }

    /// Starts a copy for the replica's current recovery point if it needs one and none
    /// runs.
    fn restart_copy(&mut self, node: NodeId, group: GroupId) -> Check {
        let n = self.nodes.get_mut(&node).expect("node");
        let Some(point) = n.recovery_point(group) else {
            return Ok(());
        };
        if n.copies.contains_key(&group) {
            return Ok(());
        }
        n.copies.insert(group, (point, 0));
        let incarnation = n.incarnation;
        self.schedule(
            MS,
            Event::CopyChunk {
                node,
                incarnation,
                group,
                point,
                chunk: 0,
            },
        );
        Ok(())
    }
}
