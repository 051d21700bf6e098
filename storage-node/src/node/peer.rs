//! Requests between nodes beyond proposals and reads: serving peers' requests
//! ([`PeerHandler`]), this node's blocks by content (for references sent to its site),
//! and the per-replica queries of `volume verify` (digests at a marker, repair).

use std::sync::Arc;
use std::time::{Duration, Instant};

use roamdisk_core::ids::{NodeId, VolumeId};
use tracing::warn;

use super::{unix_ms, Node};
use crate::dedup::{self, Hash};
use crate::store::{Event, Refused};
use crate::transport::RequestHandler;
use crate::wire::{ByteBuf, PeerRequest, PeerResponse, WireRefused, FRAME_MAX_BYTES};

impl Node {
    /// The digests replica `on` took at verify marker (`id`, `first_block`) of
    /// `volume`, waiting up to `wait` for it to apply the marker; `None`
    /// if it does not answer with them in time.
    pub async fn verify_digests(
        &self,
        on: NodeId,
        volume: VolumeId,
        id: u64,
        first_block: u64,
        wait: Duration,
    ) -> Option<Vec<[u8; 32]>> {
        let deadline = Instant::now() + wait;
        loop {
            let got = if on == self.me {
                self.local_digests(volume, id, first_block, Duration::from_secs(1))
                    .await
            } else {
                let req = PeerRequest::VerifyDigests {
                    volume,
                    id,
                    first_block,
                };
                match self.transport.request(on, req).await {
                    Ok(PeerResponse::VerifyDigests(Some(ByteBuf(b)))) if b.len() % 32 == 0 => Some(
                        b.chunks_exact(32)
                            .map(|c| c.try_into().expect("32 bytes"))
                            .collect(),
                    ),
                    _ => None,
                }
            };
            if got.is_some() || Instant::now() >= deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// This node's digests for a verify marker, waiting up to `wait` for them.
    async fn local_digests(
        &self,
        volume: VolumeId,
        id: u64,
        first_block: u64,
        wait: Duration,
    ) -> Option<Vec<[u8; 32]>> {
        let deadline = Instant::now() + wait;
        loop {
            let got = self
                .digests
                .lock()
                .expect("verify digests")
                .get(volume, id, first_block);
            if got.is_some() || Instant::now() >= deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Makes replica `on` of `volume` copy the blocks that differ from the leader's
    /// (verify's repair; the scrub's path for a corrupted replica).
    pub async fn repair_replica(&self, on: NodeId, volume: VolumeId) -> Result<(), Refused> {
        if on == self.me {
            return self
                .to_store(|reply| Event::Repair { volume, reply })
                .await
                .unwrap_or(Err(Refused::Shutdown));
        }
        match self
            .transport
            .request(on, PeerRequest::Repair { volume })
            .await
        {
            Ok(PeerResponse::Repaired(r)) => r.map_err(Refused::from),
            Ok(_) => Err(Refused::Failed("mismatched response".into())),
            Err(e) => Err(Refused::Failed(e.to_string())),
        }
    }

    /// The blocks this node stores with these blake3 hashes, each read from its replica
    /// and verified (an index entry may be stale); `None` where it has none. At most one
    /// frame's worth is answered.
    pub fn local_blocks(&self, hashes: &[Hash]) -> Vec<Option<Vec<u8>>> {
        use roamdisk_core::ids::BLOCK_BYTES;
        let limit = FRAME_MAX_BYTES / BLOCK_BYTES as usize / 2;
        let content = self.transport.content_index();
        hashes
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let (volume, block) = content.get(h).filter(|_| i < limit)?;
                let file = self.read_handle(volume).ok()?;
                let mut buf = vec![0u8; BLOCK_BYTES as usize];
                file.read_at(&mut buf, block * BLOCK_BYTES).ok()?;
                dedup::verify(h, &buf).then_some(buf)
            })
            .collect()
    }
}

/// Serves peers' forwarded requests from this node.
pub struct PeerHandler(pub Arc<Node>);

impl RequestHandler for PeerHandler {
    fn local_blocks(&self, hashes: &[Hash]) -> Vec<Option<Vec<u8>>> {
        self.0.local_blocks(hashes)
    }

    fn handle(
        &self,
        req: PeerRequest,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = PeerResponse> + Send + '_>> {
        Box::pin(async move {
            match req {
                PeerRequest::Flush { group, epoch } => {
                    let r = self.0.flush_local(group, epoch).await;
                    PeerResponse::Proposed(r.map(Into::into).map_err(WireRefused::from))
                }
                PeerRequest::Propose {
                    group,
                    data,
                    ack,
                    expires_unix_ms,
                    epoch,
                } => {
                    if unix_ms() > expires_unix_ms {
                        // The sender gave up on this copy: landing now could overwrite a
                        // newer write its client made since.
                        warn!(%group, late_ms = unix_ms() - expires_unix_ms, "expired forwarded proposal refused");
                        return PeerResponse::Proposed(Err(WireRefused::Failed(
                            "forwarded proposal arrived after its sender gave up".into(),
                        )));
                    }
                    let r = self.0.propose_local(group, epoch, data, ack).await;
                    PeerResponse::Proposed(r.map(Into::into).map_err(WireRefused::from))
                }
                PeerRequest::Read {
                    volume,
                    offset,
                    len,
                    epoch,
                } => {
                    let r = async {
                        self.0.read_barrier(volume, epoch).await?;
                        let h = self
                            .0
                            .read_handle(volume)
                            .map_err(|e| Refused::Failed(e.to_string()))?;
                        let mut buf = vec![0u8; len as usize];
                        h.read_at(&mut buf, offset)
                            .map_err(|e| Refused::Failed(e.to_string()))?;
                        Ok::<_, Refused>(ByteBuf(buf))
                    }
                    .await;
                    PeerResponse::Read(r.map_err(WireRefused::from))
                }
                PeerRequest::FetchBlocks {
                    volume,
                    start_block,
                    hashes,
                } => PeerResponse::Blocks(
                    self.0
                        .fetch_blocks(volume, start_block, &hashes)
                        .await
                        .map_err(WireRefused::from),
                ),
                PeerRequest::BlocksByHash { hashes } => PeerResponse::BlocksByHash(
                    self.0
                        .local_blocks(&hashes)
                        .into_iter()
                        .map(|b| b.map(ByteBuf))
                        .collect(),
                ),
                PeerRequest::VerifyDigests {
                    volume,
                    id,
                    first_block,
                } => PeerResponse::VerifyDigests(
                    self.0
                        .local_digests(volume, id, first_block, Duration::from_secs(5))
                        .await
                        .map(|d| ByteBuf(d.concat())),
                ),
                PeerRequest::Repair { volume } => PeerResponse::Repaired(
                    self.0
                        .repair_replica(self.0.me, volume)
                        .await
                        .map_err(WireRefused::from),
                ),
                PeerRequest::ReplicaReport { group, hold } => {
                    PeerResponse::ReplicaReport(self.0.local_replica_report(group, hold).await)
                }
                PeerRequest::Divergent { volume } => PeerResponse::Divergent(
                    self.0
                        .local_divergent(volume)
                        .await
                        .map_err(WireRefused::from),
                ),
                PeerRequest::GroupStatus { group } => PeerResponse::GroupStatus(
                    self.0
                        .status()
                        .await
                        .into_iter()
                        .find(|g| g.group == group.0),
                ),
            }
        })
    }
}
