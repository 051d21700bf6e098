//! roamdisk's replication core.
//!
//! This crate is free of I/O and must stay so: no sockets, no clocks, no files, no
//! RocksDB (its Cargo.toml has none of them). Storage enters through the
//! [`logstore::LogStore`] trait, time through `tick`, the network through `step`. That is
//! what lets the chaos crate run the same code under simulated time and faults.
//!
//! Module map:
//! - [`ids`]: newtype identifiers and the block size.
//! - [`codec`]: the one serialization module (bincode behind it).
//! - [`command`]: commands replicated in a volume's log, versioned.
//! - [`logstore`]: the storage trait, an in-memory implementation with a power-loss
//!   model, and the conformance suite every implementation runs.
//! - [`meta`]: the cluster-metadata state machine (sites, nodes, volumes, placement).
//! - [`group`]: one Raft group over raft-rs, as a sans-I/O state machine, and the
//!   documented Ready order.
//! - [`written`]: how far a quorum has written (not yet synced) the log, for writes
//!   acknowledged before their fsync.
//! - [`node`]: the node core — every group of a node and every decision about them
//!   (answers, flushes, reads, syncs, checkpoints, catch-up), driven by the storage
//!   node's store thread and by the simulation alike.
//! - [`failover`]: failover plans (the replica a group re-forms from when its home site
//!   is lost, and the loss stated before anything changes); what each node does is in
//!   `node::failover`.
//! - [`lag`]: replication lag per replica (entries, bytes, seconds, drain rate).
//! - [`stats`]: counters and histograms of the node's work, for `/metrics`.
//! - [`time`]: time as an input.
//!
//! New replication logic belongs here with a deterministic test; anything that waits on
//! a socket or a disk belongs in `roamdisk-storage-node`.

// raft-rs's protobuf structs are built by assigning fields of a default value.
#![allow(clippy::field_reassign_with_default)]

pub mod codec;
pub mod command;
pub mod failover;
pub mod group;
pub mod ids;
pub mod lag;
pub mod logstore;
pub mod meta;
pub mod node;
pub mod stats;
pub mod time;
pub mod written;
