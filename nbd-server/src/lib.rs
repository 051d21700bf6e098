//! roamdisk's NBD front end.
//!
//! Module map (protocol first, I/O last):
//! - [`wire`]: the spec's constants, nothing else.
//! - [`limits`]: every bound the server enforces, each with what happens at the bound.
//! - [`handshake`]: sans-I/O fixed-newstyle negotiation (options in, replies out).
//! - [`transmission`]: sans-I/O request decoding, validation and reply encoding.
//! - [`backend`]: the API boundary to storage ([`backend::Backend`], [`backend::Catalog`])
//!   and the one errno mapping ([`backend::BackendError::nbd_errno`]).
//! - [`mem`], [`file`]: an in-memory backend for tests and a raw-file backend.
//! - [`server`]: the tokio driver (TCP and unix listeners, the per-connection loop).
//!
//! New protocol features go into `handshake`/`transmission` with unit tests there; new
//! storage goes behind `Backend` in the crate that owns it (the storage node), never here.
//! `handshake` and `transmission` must stay free of I/O so they can be fuzzed.

pub mod backend;
pub mod file;
pub mod handshake;
pub mod limits;
pub mod mem;
pub mod server;
pub mod transmission;
pub mod wire;

pub use backend::{Backend, BackendError, Catalog, Export, ExportInfo};
pub use server::Server;
