//! roamdisk chaos: the userspace WAN emulator, the chaos runner and the deterministic
//! simulation of the replication core.
//!
//! Not built yet: arrives with the across-sites and chaos issues.
