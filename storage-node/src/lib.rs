//! roamdisk storage node.
//!
//! Not built yet: the replicated volume engine (multi-Raft over raft-rs, RocksDB log and
//! metadata, sparse extent files) arrives with the storage-node issue. This crate exists
//! so that the workspace has its fixed shape from the start.
