//! The `roamdisk` CLI (`main.rs`: `roamdisk status | node | volume | playground`).
//!
//! This library only gathers what the CLI and its integration tests use: the admin API
//! client (`roamdisk-admin-client`) and the playground (`roamdisk-playground`). It must
//! not link RocksDB: the CLI talks to nodes over HTTP only.

pub use roamdisk_admin_client::{format_size, parse_size, AdminClient};
pub use roamdisk_playground as playground;
