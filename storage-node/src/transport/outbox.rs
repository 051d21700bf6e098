//! [`ArcOutbox`], the store's view of the transport: Raft messages (appends of volume
//! writes to another site with the blocks it stores sent by hash) and the best-effort
//! reports to peers.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use protobuf::Message as _;
use raft::eraftpb::Message;
use roamdisk_core::ids::{GroupId, NodeId};
use tracing::warn;

use super::{raft_lane, Transport};
use crate::dedup;
use crate::store::{Event, Outbox, QuarantineReport, SyncWanted, TailReport, Written};
use crate::wire::{Lane, PeerFrame};

/// The store's view of the transport.
pub struct ArcOutbox(pub Arc<Transport>);

impl Outbox for ArcOutbox {
    fn send(&self, to: NodeId, group: GroupId, epoch: u64, mut msg: Message) {
        let t = &self.0;
        let Some(tx) = t.conn(to, raft_lane(&msg)) else {
            let _ = t.store.try_send(Event::Unreachable { node: to });
            return;
        };
        // Appends of volume writes to another site: blocks that site stores go by hash.
        let mut refs = Vec::new();
        if msg.get_msg_type() == raft::eraftpb::MessageType::MsgAppend
            && group != roamdisk_core::ids::META_GROUP
            && !msg.entries.is_empty()
        {
            if let Some(site) = t.site_of(to).filter(|s| *s != t.site) {
                refs = dedup::cut_known_blocks(&mut msg, |h| {
                    // A block the site reported missing goes as data (once).
                    t.content.get(h).is_some() && !t.misses.take(&site, h)
                });
                let n: usize = refs.iter().map(|r| r.refs.len()).sum();
                t.dedup.refs_sent.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        let bytes = match msg.write_to_bytes() {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "encode raft message");
                return;
            }
        };
        let frame = if refs.is_empty() {
            PeerFrame::Raft {
                group,
                epoch,
                msg: bytes,
            }
        } else {
            PeerFrame::RaftRefs {
                group,
                epoch,
                msg: bytes,
                refs,
            }
        };
        if tx.try_send(frame).is_err() {
            let _ = self.0.store.try_send(Event::Unreachable { node: to });
        }
    }

    fn written(&self, to: NodeId, group: GroupId, epoch: u64, w: Written) {
        // Best effort: a lost report only means the write waits for its commit.
        if let Some(tx) = self.0.conn(to, Lane::Control) {
            let _ = tx.try_send(PeerFrame::Written { group, epoch, w });
        }
    }

    fn sync_wanted(&self, to: NodeId, group: GroupId, epoch: u64, want: SyncWanted) {
        // Best effort: without it the voter syncs within `SYNC_LAZY_MAX` anyway.
        if let Some(tx) = self.0.conn(to, Lane::Control) {
            let _ = tx.try_send(PeerFrame::SyncWanted { group, epoch, want });
        }
    }

    fn quarantine(&self, to: NodeId, group: GroupId, epoch: u64, report: QuarantineReport) {
        // Best effort: repeated every tick while the sender is quarantined.
        if let Some(tx) = self.0.conn(to, Lane::Control) {
            let _ = tx.try_send(PeerFrame::Quarantine {
                group,
                epoch,
                report,
            });
        }
    }

    fn tail(&self, to: NodeId, group: GroupId, epoch: u64, tail: TailReport) {
        // Best effort: repeated every `TAIL_REPORT_INTERVAL`.
        if let Some(tx) = self.0.conn(to, Lane::Control) {
            let _ = tx.try_send(PeerFrame::Tail { group, epoch, tail });
        }
    }
}
