//! Frames that arrive from peers: Raft messages (an append sent with block references is
//! restored first, from this node's blocks or another node's of its site), reports for
//! the store, and requests, answered by the [`RequestHandler`].
//!
//! [`RequestHandler`]: super::RequestHandler

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::Message;
use roamdisk_core::ids::{GroupId, NodeId, VolumeId};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{Transport, SITE_LOOKUP_TIMEOUT_MS};
use crate::dedup::{self, EntryRefs, Hash};
use crate::store::Event;
use crate::wire::{
    Lane, PeerFrame, PeerRequest, PeerResponse, WireRefused, FRAME_MAX_BYTES, QUARANTINE_VOTERS_MAX,
};

impl Transport {
    /// Restores an append sent with references and hands it to Raft, or drops it and
    /// tells the sender which blocks this site lacks (Raft then resends the entries).
    pub(super) async fn receive_refs(
        self: &Arc<Self>,
        from: NodeId,
        group: GroupId,
        epoch: u64,
        msg: Vec<u8>,
        refs: Vec<EntryRefs>,
    ) -> anyhow::Result<()> {
        let mut m = Message::default();
        m.merge_from_bytes(&msg)?;
        drop(msg);
        let want: Vec<Hash> = dedup::wanted(&refs)
            .into_iter()
            .filter(|h| h != dedup::zero_hash())
            .collect();
        anyhow::ensure!(
            want.len() <= FRAME_MAX_BYTES / crate::dedup::BLOCK,
            "append from {from} names {} blocks",
            want.len()
        );
        let mut found: HashMap<Hash, Vec<u8>> = HashMap::with_capacity(want.len());
        if !want.is_empty() {
            let handler = self.handler.read().expect("handler lock").clone();
            let mut missing = want.clone();
            for attempt in 0..=dedup::RESOLVE_RETRIES {
                if let Some(h) = &handler {
                    for (hash, b) in missing.iter().zip(h.local_blocks(&missing)) {
                        if let Some(b) = b {
                            found.insert(*hash, b);
                        }
                    }
                }
                missing.retain(|h| !found.contains_key(h));
                // Named by the index but not there yet: its entry is waiting to apply.
                let pending = missing.iter().any(|h| self.content.get(h).is_some());
                if missing.is_empty() || !pending || attempt == dedup::RESOLVE_RETRIES {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(dedup::RESOLVE_RETRY_MS)).await;
            }
            self.dedup
                .resolved_local
                .fetch_add(found.len() as u64, Ordering::Relaxed);
            for peer in self.site_peers() {
                if missing.is_empty() {
                    break;
                }
                let req = PeerRequest::BlocksByHash {
                    hashes: missing.clone(),
                };
                let timeout = Duration::from_millis(SITE_LOOKUP_TIMEOUT_MS);
                let Ok(PeerResponse::BlocksByHash(blocks)) =
                    self.request_within(peer, req, timeout).await
                else {
                    continue;
                };
                if blocks.len() != missing.len() {
                    continue;
                }
                for (hash, b) in missing.iter().zip(blocks) {
                    if let Some(b) = b.filter(|b| dedup::verify(hash, &b.0)) {
                        found.insert(*hash, b.0);
                        self.dedup.resolved_site.fetch_add(1, Ordering::Relaxed);
                    }
                }
                missing.retain(|h| !found.contains_key(h));
            }
            if !missing.is_empty() {
                self.dedup
                    .missed
                    .fetch_add(missing.len() as u64, Ordering::Relaxed);
                debug!(peer = %from, %group, missing = missing.len(), "append refers to blocks this site lacks; dropped");
                // On the control lane, ahead of this node's next Raft answer to `from`:
                // by the time the leader resends, it knows to send these as data.
                if let Some(tx) = self.conn(from, Lane::Control) {
                    let _ = tx.try_send(PeerFrame::DedupMiss { hashes: missing });
                }
                return Ok(());
            }
        }
        dedup::restore(&mut m, &refs, FRAME_MAX_BYTES, |h| {
            found.get(h).map(|b| b.as_slice())
        })?;
        self.index_remote_append(from, group, &m);
        let _ = self.store.try_send(Event::Raft {
            group,
            epoch,
            msg: m,
        });
        Ok(())
    }

    /// An append from another site: its blocks are indexed as they arrive.
    fn index_remote_append(&self, from: NodeId, group: GroupId, m: &Message) {
        if m.get_msg_type() == raft::eraftpb::MessageType::MsgAppend
            && group != roamdisk_core::ids::META_GROUP
            && self.site_of(from).is_some_and(|s| s != self.site)
        {
            dedup::index_writes(m, VolumeId(group.0), &self.content);
        }
    }

    pub(super) fn receive(
        &self,
        from: NodeId,
        frame: PeerFrame,
        reply: &mpsc::Sender<PeerFrame>,
    ) -> anyhow::Result<()> {
        match frame {
            PeerFrame::Hello { .. } => anyhow::bail!("unexpected Hello"),
            PeerFrame::RaftRefs { .. } => anyhow::bail!("RaftRefs handled by the reader"),
            PeerFrame::DedupMiss { hashes } => {
                anyhow::ensure!(
                    hashes.len() <= FRAME_MAX_BYTES / crate::dedup::BLOCK,
                    "DedupMiss from {from} names {} blocks",
                    hashes.len()
                );
                if let Some(site) = self.site_of(from) {
                    self.misses.insert(&site, &hashes);
                }
            }
            PeerFrame::Written { group, epoch, w } => {
                let _ = self.store.try_send(Event::Written {
                    group,
                    epoch,
                    from,
                    w,
                });
            }
            PeerFrame::Tail { group, epoch, tail } => {
                let _ = self.store.try_send(Event::Tail {
                    group,
                    epoch,
                    from,
                    tail,
                });
            }
            PeerFrame::Quarantine {
                group,
                epoch,
                report,
            } => {
                if report.voters.len() + report.outgoing.len() > QUARANTINE_VOTERS_MAX {
                    warn!(peer = %from, "quarantine report with too many voters; ignored");
                } else {
                    let _ = self.store.try_send(Event::Quarantine {
                        group,
                        epoch,
                        from,
                        report,
                    });
                }
            }
            PeerFrame::SyncWanted { group, epoch, want } => {
                let _ = self
                    .store
                    .try_send(Event::SyncWanted { group, epoch, want });
            }
            PeerFrame::Raft { group, epoch, msg } => {
                let mut m = Message::default();
                m.merge_from_bytes(&msg)?;
                self.index_remote_append(from, group, &m);
                // Dropping under overload is safe: Raft retransmits.
                let _ = self.store.try_send(Event::Raft {
                    group,
                    epoch,
                    msg: m,
                });
            }
            PeerFrame::Request { id, req } => {
                let handler = self.handler.read().expect("handler lock").clone();
                let reply = reply.clone();
                tokio::spawn(async move {
                    let resp = match handler {
                        Some(h) => h.handle(req).await,
                        None => PeerResponse::Proposed(Err(WireRefused::Shutdown)),
                    };
                    let _ = reply.send(PeerFrame::Response { id, resp }).await;
                });
            }
            PeerFrame::Response { id, resp } => {
                if let Some((_, tx)) = self.pending.lock().expect("pending lock").remove(&id) {
                    let _ = tx.send(resp);
                }
            }
        }
        Ok(())
    }
}
