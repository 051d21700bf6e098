//! roamdisk admin client library and the `roamdisk` CLI.
//!
//! Not built yet: arrives with the storage-node issue (admin API, `roamdisk playground`).
