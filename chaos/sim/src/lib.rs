//! roamdisk-sim: deterministic simulation of roamdisk's replication core.
//!
//! The core (`roamdisk-core`) is I/O-free: Raft groups take ticks and messages and
//! return work; storage is a `LogStore`. This crate runs several storage nodes in one
//! process over simulated time, a simulated network and in-memory disks with a
//! power-loss model, injects faults from a seed, and checks invariants after every
//! event. A failing seed prints itself and replays exactly.
//!
//! Like the core, this crate does no I/O: no clock, no sockets, no files, no threads,
//! and its only randomness is [`rng::SimRng`] seeded per run (raft-rs's own randomness,
//! the election timeout, is kept out of play: see [`node`]).
//!
//! Module map:
//! - [`sim`]: the event loop, fault schedule, phases and final checks. Start here.
//! - [`node`]: one storage node: the driver that follows the core's Ready order and
//!   crash rule, the election timer, crash and restart.
//! - [`checker`]: the invariants and the global record they are checked against.
//! - [`shadow`]: an independent model of what each node's disk holds (written, synced).
//! - [`machine`]: the replicated state machines (volume bytes; cluster metadata).
//! - [`net`]: delays, drops, duplicates, partitions.
//! - [`client`]: clients with leader hints and retries; the command workload.
//! - [`topology`]: sites, nodes and initial group membership, drawn from the seed.
//! - [`failover`]: the site-loss scenario: the home lost, a failover planned and
//!   executed through the core, the old home fenced, resynced and rejoined.
//! - [`config`]: knobs, including deliberately broken drivers for negative controls.
//! - [`corelog`]: an ERROR logged by the core fails the run.
//! - [`runner`]: running one seed (panics become failures); the tests' environment.
//! - [`rng`], [`trace`]: the seeded generator; the trace hash and verbose trace.
//!
//! Where the simulated driver differs from the storage node today (each is a
//! `SimConfig` knob, so the difference can be replayed):
//! - it owns followers' election timers, because raft-rs's randomized timeout cannot
//!   be pinned through `GroupConfig` (see [`node`]);
//! - it syncs the store on restart (`sync_on_restart`): without it a restarted node
//!   acknowledges entries that survived a process crash unsynced (the storage node now
//!   does the same in `Store::open`, a fix this simulation found);
//! - it never removes a voter or the leader (`allow_removing_leader`), only demotes,
//!   because raft-rs 0.7 panics or stalls when a leader is removed.
//!
//! New fault kinds belong in `sim` (drawn in `Simulation::fault`); new invariants in
//! `checker`, called from `node` where the driver observes the fact, or from
//! `Simulation::check_after_event`.

// raft-rs's protobuf structs are built by assigning fields of a default value.
#![allow(clippy::field_reassign_with_default)]

pub mod checker;
pub mod client;
pub mod config;
pub mod copy;
pub mod corelog;
pub mod failover;
pub mod faults;
pub mod machine;
pub mod net;
pub mod node;
pub mod rng;
pub mod runner;
pub mod shadow;
pub mod sim;
pub mod store;
pub mod topology;
pub mod trace;

pub use checker::{Invariant, Violation};
pub use config::{CoreBug, SimConfig};
pub use runner::run_seed;
pub use sim::{Outcome, SimFailure, Simulation, Stats};
