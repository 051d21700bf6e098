//! roamdisk-sim: deterministic simulation of the replication core (under construction).
