//! Every volume of the cluster as an NBD export on this node.
//!
//! Writes become Raft proposals (forwarded to the volume's leader when it is elsewhere);
//! reads are linearizable (ReadIndex, then the local extent file; forwarded when this
//! node has no replica). A write without FUA is acknowledged once a quorum of voters has
//! written its entry, before their fsyncs ([`Ack::Written`]); a write with FUA once it
//! is committed on a quorum of synced logs; FLUSH returns once every write acknowledged
//! before it is committed. Reads see every acknowledged write. See `store` for the
//! argument.

use std::sync::Arc;

use bytes::Bytes;
use roamdisk_core::command::VolumeCommand;
use roamdisk_core::ids::VolumeId;
use roamdisk_nbd::backend::{
    Backend, BackendError, BackendResult, Catalog, Export, ExportInfo, Extent, ReadChunk, ZeroFlags,
};
use tracing::warn;

use crate::node::{Node, NodeError};
use crate::store::Ack;

/// One NBD connection's view of a volume. It belongs to the epoch of the volume's group
/// it was opened in: after a forced failover its requests are refused (the client must
/// reconnect, and then reaches the new epoch wherever its leader is), so a client at a
/// fenced home can never write into the re-formed group (see
/// `roamdisk_core::node::failover`).
///
/// A volume of a consistency group is bytes `base..base + size` of its group's Raft
/// group: every request is moved by `base` (the NBD server has already refused any
/// beyond `size`), so its writes join the one log the group's volumes share.
pub struct VolumeBackend {
    node: Arc<Node>,
    volume: VolumeId,
    epoch: u64,
    base: u64,
    size: u64,
}

fn unavailable(e: NodeError) -> BackendError {
    warn!(error = %e, "volume request failed");
    match e {
        NodeError::NoVolume(v) => BackendError::Unavailable(format!("volume {v} was deleted")),
        e => BackendError::Unavailable(e.to_string()),
    }
}

impl VolumeBackend {
    async fn propose(&self, cmd: VolumeCommand<'_>, fua: bool) -> BackendResult<()> {
        let ack = if fua { Ack::Committed } else { Ack::Written };
        self.node
            .propose_acked(self.volume.group(), Some(self.epoch), cmd.encode(), ack)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }
}

/// The chaos runner's negative control: with `ROAMDISK_NEGATIVE_CONTROL=drop-acked-writes`
/// in its environment, a node acknowledges every 16th NBD write it receives without
/// proposing it, so the write is lost on every replica. It exists to prove that the
/// chaos checker catches a storage layer that breaks its contract; nothing else sets it.
pub const NEGATIVE_CONTROL_ENV: &str = "ROAMDISK_NEGATIVE_CONTROL";

fn drops_this_write() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static ON: OnceLock<bool> = OnceLock::new();
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let on = *ON.get_or_init(|| {
        let on = std::env::var(NEGATIVE_CONTROL_ENV).is_ok_and(|v| v == "drop-acked-writes");
        if on {
            warn!("NEGATIVE CONTROL: acknowledging 1 in 16 writes without storing them");
        }
        on
    });
    on && WRITES.fetch_add(1, Ordering::Relaxed) % 16 == 15
}

impl Backend for VolumeBackend {
    async fn read(&self, offset: u64, len: u32) -> BackendResult<Vec<ReadChunk>> {
        self.node
            .read(self.volume, Some(self.epoch), self.base + offset, len)
            .await
            .map_err(unavailable)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BackendResult<()> {
        if drops_this_write() {
            return Ok(());
        }
        self.propose(
            VolumeCommand::Write {
                offset: self.base + offset,
                data: &data,
            },
            fua,
        )
        .await
    }

    async fn flush(&self) -> BackendResult<()> {
        self.node
            .flush(self.volume.group(), Some(self.epoch))
            .await
            .map_err(unavailable)
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> BackendResult<()> {
        self.propose(
            VolumeCommand::Zero {
                offset: self.base + offset,
                len: u64::from(len),
                punch: true,
            },
            fua,
        )
        .await
    }

    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> BackendResult<()> {
        // Zeroing is one small log entry whatever its length: always fast.
        self.propose(
            VolumeCommand::Zero {
                offset: self.base + offset,
                len: u64::from(len),
                punch: !flags.no_hole,
            },
            flags.fua,
        )
        .await
    }

    async fn block_status(
        &self,
        offset: u64,
        len: u32,
        extents_max: usize,
    ) -> BackendResult<Vec<Extent>> {
        let cluster = self.node.cluster();
        let Some(info) = cluster.volume_by_id(self.volume) else {
            return Err(BackendError::Unavailable(format!(
                "volume {} was deleted",
                self.volume
            )));
        };
        if !info.replicas_on(self.node.me) {
            // Without a local replica, "allocated, contents unknown" is always correct.
            return Ok(vec![Extent {
                length: len,
                flags: 0,
            }]);
        }
        // Status as of a linearizable point, from the local replica's holes.
        self.node
            .read_barrier(self.volume, Some(self.epoch))
            .await
            .map_err(|e| unavailable(e.into()))?;
        let raw = self
            .node
            .read_handle(self.volume)
            .map_err(|e| BackendError::io("open extent file", e))?;
        // Extents are lengths from the first byte asked: the same within the group.
        raw.extents(
            self.base + offset,
            u64::from(len),
            self.base + self.size,
            extents_max,
        )
        .map_err(|e| BackendError::io("seek data/hole in extent file", e))
    }

    async fn cache(&self, _offset: u64, _len: u32) -> BackendResult<()> {
        Ok(())
    }
}

fn describe(name: &str, v: &roamdisk_core::meta::VolumeInfo) -> String {
    if v.members.is_empty() {
        format!("roamdisk volume {name} (home {})", v.home_site)
    } else {
        format!(
            "roamdisk volume {name} of consistency group {} (home {})",
            v.name, v.home_site
        )
    }
}

/// The catalog of all volumes, as this node's cluster state knows them.
pub struct NodeCatalog {
    pub node: Arc<Node>,
}

impl Catalog for NodeCatalog {
    type Backend = VolumeBackend;

    fn list(&self) -> Vec<(String, String)> {
        let cluster = self.node.cluster();
        cluster
            .export_names()
            .into_iter()
            .filter_map(|name| {
                let (v, _, _) = cluster.export(&name)?;
                let what = describe(&name, v);
                Some((name, what))
            })
            .collect()
    }

    fn lookup(&self, name: &str) -> Option<Export<VolumeBackend>> {
        let cluster = self.node.cluster();
        let name = if name.is_empty() {
            cluster.export_names().into_iter().next()?
        } else {
            name.to_owned()
        };
        let (v, base, size) = cluster.export(&name)?;
        // One Raft group per volume (or group): every connection on every node sees the
        // same committed order, and FLUSH/FUA are global, so multi-conn holds.
        let description = format!("{} ({} replicas)", describe(&name, v), v.replicas);
        let info = ExportInfo::full_featured(&name, description, size);
        Some(Export {
            info,
            backend: Arc::new(VolumeBackend {
                node: Arc::clone(&self.node),
                volume: v.id,
                epoch: v.epoch,
                base,
                size,
            }),
        })
    }
}
