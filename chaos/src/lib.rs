//! roamdisk chaos runner: starts a real multi-site cluster (real `roamdisk-node`
//! processes behind the userspace WAN emulator), injects faults from a schedule derived
//! from a seed, drives a verifying workload through NBD, and checks that nothing
//! acknowledged was lost.
//!
//! The pieces, in the order a run uses them:
//! - [`scenario`]: named scenarios and the seeded fault schedule each one derives;
//! - [`block`]: self-describing block contents (volume, block, version, seed, checksum);
//! - [`nbd`]: a small synchronous NBD client (one request in flight per connection);
//! - [`workload`]: connections writing, reading and flushing, recording every operation;
//! - [`history`]: what a run records (operations, faults, lag samples);
//! - [`checker`]: the history against the NBD contract; violations and RTO per fault;
//! - [`report`]: `report.json`, `summary.md` and `timeline.png` in the run directory;
//! - [`runner`]: the orchestration of one run.
//!
//! The WAN emulator is the sibling crate `roamdisk-wan`; the deterministic simulation of
//! the replication core is `roamdisk-sim`.

pub mod block;
pub mod checker;
pub mod history;
pub mod nbd;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod workload;
