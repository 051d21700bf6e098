//! roamdisk storage node: everything that touches disks and sockets around the I/O-free
//! replication core (`roamdisk-core`).
//!
//! Module map:
//! - [`config`]: node configuration (TOML and flags).
//! - [`rocks`]: the RocksDB `LogStore` (Raft logs, Raft state, node records, block index).
//! - [`volume`]: one volume replica — sparse extent file, blake3 block index, crash rule.
//! - [`store`]: the store thread, the I/O shell around the node core
//!   (`roamdisk_core::node`): log syncs, extent files, checkpoints, scrub.
//! - [`wire`]: the peer wire types (`PeerFrame` and what it carries, lanes), the peer
//!   protocol version and the frame limits.
//! - [`transport`]: node-to-node TCP (Raft messages, forwarded proposals and reads).
//! - [`dedup`]: blocks sent to other sites by reference when the site stores them.
//! - [`link`]: batching, zstd compression and the bandwidth cap of links to other
//!   sites, per lane, and the peer wire records.
//! - [`node`]: the API above the store: propose anywhere, linearizable reads, status.
//! - [`mover`]: volume moves, stepped by the volume group's leader.
//! - [`nbd`]: every volume as an NBD export (`roamdisk_nbd::Backend` over `node`).
//! - [`verify`]: `volume verify`, replicas compared by digests at one index, and repaired.
//! - [`admin`]: the HTTP/JSON admin API and Prometheus `/metrics`.
//!
//! API boundaries: `store::Event` (everything the store does is asked through it),
//! `wire::PeerFrame` (the peer wire format, versioned), `admin` (the HTTP API the CLI
//! and the chaos runner use). Replication decisions belong in `roamdisk-core`.

// raft-rs's protobuf structs are built by assigning fields of a default value.
#![allow(clippy::field_reassign_with_default)]

pub use roamdisk_core::{lag, stats};

pub mod admin;
pub mod config;
pub mod dedup;
pub mod link;
pub mod mover;
pub mod nbd;
pub mod node;
pub mod rocks;
pub mod store;
pub mod transport;
pub mod verify;
pub mod volume;
pub mod wire;
