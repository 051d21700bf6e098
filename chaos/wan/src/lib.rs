//! roamdisk-wan: a userspace WAN emulator. The kernel here has no netem, so traffic
//! between sites goes through TCP proxies that add per-direction delay, jitter, a shared
//! bandwidth limit with a bounded queue, partitions and connection resets, all
//! changeable at run time.
//!
//! ```no_run
//! # async fn demo(node_b: std::net::SocketAddr) -> Result<(), roamdisk_wan::WanError> {
//! use roamdisk_wan::{Partition, Wan, WanConfig, WanProfile};
//! let wan = Wan::new(WanConfig { profile: WanProfile::Sinet5, ..WanConfig::default() })?;
//! // A node at osaka is given `via` instead of node_b's address (a node at hokkaido).
//! let via = wan.route("osaka", "hokkaido", node_b).await?;
//! wan.partition("osaka", "hokkaido", Partition::Hold)?;
//! wan.heal_all();
//! # let _ = via; Ok(()) }
//! ```
//!
//! # Model
//! A [`Wan`] has one link per ordered site pair. A route is a listener on one side; each
//! accepted connection is proxied to the route's target, the connecting side's bytes over
//! link from → to, the replies over to → from. A link is a FIFO bottleneck with a token
//! bucket, then a delay line (see `shaper`); its queue and bandwidth are shared by every
//! connection crossing it, so several node pairs between two sites share the site pair's
//! bandwidth. A full queue stops the emulator reading from senders: TCP backpressure.
//!
//! # Module map (where new code belongs)
//! - `limits`: every bound, with what happens when it is reached. New limits go here.
//! - `params`: [`Site`], [`LinkParams`], [`Partition`], validation and derived sizes.
//! - `profile`: [`WanProfile`] (`lan`, `sinet5`, `wide-2010`) and why its numbers.
//! - `shaper` (**I/O-free**): the link model — token bucket, FIFO, delay line, jitter —
//!   driven by explicit time and unit-tested in virtual time. Behaviour changes go here.
//! - `budget`: byte/chunk budgets with owned permits: the accounting behind every queue.
//! - `link`: a directed link's task (sole owner of its shaper) and shared counters.
//! - `timer`: a timerfd-based timer (tokio's 1 ms timer made RTTs 1–1.5 ms too long
//!   per direction).
//! - `proxy`: route accept loops and per-connection pumps (the only socket code).
//! - `wan`: [`Wan`], the API everything else uses.
//! - `control` (**API boundary**): the HTTP/JSON control API and its wire types.
//! - `client`: a blocking client of the control API.
//! - `bin/roamdisk-wan.rs`: the standalone emulator process.
//!
//! # Invariants
//! - Bytes of one connection direction are delivered in order, each no earlier than
//!   read time + delay of the link at read time.
//! - Bytes inside a link (`LinkStats::bytes_queued`) never exceed its queue limit, and
//!   bytes of one connection direction inside the emulator never exceed it either (a
//!   stalled receiver cannot take a link from other connections).
//! - Every connection, chunk and queue is bounded (`limits`); accounting is by permits
//!   that are released on drop, so resets and shutdown cannot leak queue space.
//! - Deliberately absent: packet-level effects (loss, reordering, duplication) and TCP's
//!   own dynamics over the emulated path (handshake round trip, slow start, congestion
//!   window). The emulator terminates TCP on both sides, so each peer talks to a local
//!   socket and sees only delay, rate, backpressure, stalls and resets. Protocol-level
//!   windows (waiting for a reply before sending more) do see the emulated RTT.

mod budget;
pub mod client;
pub mod control;
pub mod limits;
mod link;
mod params;
mod profile;
mod proxy;
mod shaper;
mod timer;
mod update;
mod wan;

pub use client::{ClientError, ControlClient};
pub use control::{router as control_router, LinkJson, LinkParamsJson};
pub use link::LinkStats;
pub use params::{LinkParams, ParamsError, Partition, Site, SiteError};
pub use profile::{UnknownProfile, WanProfile};
pub use update::{LinkUpdate, UpdateError};
pub use wan::{LinkStatus, RouteInfo, Wan, WanConfig, WanError};

/// A duration of `ms` milliseconds (for concise parameter changes in tests and drills).
pub const fn ms(ms: u64) -> std::time::Duration {
    std::time::Duration::from_millis(ms)
}
