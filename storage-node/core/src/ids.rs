//! Newtype identifiers, so that a volume id is never passed where a node id belongs.

use serde::{Deserialize, Serialize};

macro_rules! id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

id!(
    /// A storage node; also its Raft peer id in every group it belongs to. Never 0
    /// (raft-rs reserves 0 for "none").
    NodeId
);
id!(
    /// A Raft group. Group 0 is the cluster-metadata group; a volume's group id is its
    /// volume id.
    GroupId
);
id!(
    /// A volume, allocated by the metadata group. Never 0.
    VolumeId
);
id!(
    /// A site (datacenter).
    SiteId
);
id!(
    /// Index of a Raft log entry.
    LogIndex
);
id!(
    /// A Raft term.
    Term
);
id!(
    /// A volume's generation: bumped by every move (and, with the site-loss issue, by a
    /// forced failover). Nothing checks it on the data path yet: fencing by generation
    /// is still to be built.
    Generation
);

/// The metadata group's id.
pub const META_GROUP: GroupId = GroupId(0);

impl VolumeId {
    pub fn group(self) -> GroupId {
        GroupId(self.0)
    }
}

/// Block size inside the engine (the NBD minimum block size advertised to clients).
pub const BLOCK_BYTES: u64 = 4096;

/// Index of a 4 KiB block within a volume.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct BlockIndex(pub u64);

impl BlockIndex {
    pub fn of_offset(offset: u64) -> BlockIndex {
        BlockIndex(offset / BLOCK_BYTES)
    }
    pub fn offset(self) -> u64 {
        self.0 * BLOCK_BYTES
    }
}
