//! Every bound of the emulator in one place. Each constant says what happens when it is
//! reached, so that nothing a peer does makes the emulator allocate without bound.

use std::time::Duration;

/// Largest chunk read from a socket in one go. A chunk is the unit that waits for tokens
/// and travels through the delay line, so a smaller chunk keeps rate limiting smooth and
/// lets a small message on another connection slip in between; 64 KiB keeps the per-chunk
/// overhead negligible at hundreds of MiB/s.
pub const CHUNK_MAX_BYTES: u64 = 64 * 1024;

/// Smallest chunk size the bandwidth-derived chunk limit goes down to (see
/// [`CHUNK_SERIALIZATION_TARGET`]). Below this, per-chunk overhead dominates.
pub const CHUNK_MIN_BYTES: u64 = 1024;

/// On a rate-limited link a chunk is at most the bytes the link serializes in this time
/// (clamped to [`CHUNK_MIN_BYTES`]..=[`CHUNK_MAX_BYTES`]). At 8 MiB/s that is 16 KiB, so
/// one chunk occupies the link for 2 ms and a rate change takes effect within that.
pub const CHUNK_SERIALIZATION_TARGET: Duration = Duration::from_millis(2);

/// The token bucket holds at most this much time's worth of tokens (and never less than
/// one chunk). It absorbs the lateness of timer wake-ups (tokio's timer has 1 ms
/// granularity) without losing rate, while keeping the burst after an idle period small.
pub const BUCKET_BURST_DURATION: Duration = Duration::from_millis(5);

/// Smallest explicit queue limit accepted; a smaller one would make chunks tiny.
pub const QUEUE_LIMIT_MIN_BYTES: u64 = 4 * 1024;

/// Largest explicit queue limit accepted (per directed link).
pub const QUEUE_LIMIT_MAX_BYTES: u64 = 1024 * 1024 * 1024;

/// Automatic queue limit of a rate-limited link: twice the bandwidth-delay product (one
/// BDP in flight, one BDP of router queue), but at least this much ...
pub const QUEUE_AUTO_MIN_BYTES: u64 = 1024 * 1024;

/// ... and at most this much.
pub const QUEUE_AUTO_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// Automatic queue limit of a link without a bandwidth limit. The queue then only holds
/// the bytes in the delay line, so it caps throughput at this size divided by the
/// one-way delay: 200 MiB/s at 20 ms, more than this machine's nodes produce.
pub const QUEUE_UNLIMITED_BYTES: u64 = 4 * 1024 * 1024;

/// Chunks queued in one directed link at most, whatever their size. When reached,
/// readers stop reading as if the byte limit were reached. It bounds memory when peers
/// send tiny writes that are read one by one; bulk chunks never get near it.
pub const QUEUE_CHUNKS_MAX: u64 = 16 * 1024;

/// Chunks one connection direction may hold at most (in the link and waiting for the
/// destination socket). See [`QUEUE_CHUNKS_MAX`].
pub const CONN_WINDOW_CHUNKS_MAX: u64 = 4 * 1024;

/// Default limit on simultaneous connections through one route. A connection accepted
/// beyond it is reset at once and a warning is logged.
pub const CONNECTIONS_PER_ROUTE_MAX: usize = 1024;

/// A connection to a route's target that does not complete within this time fails; the
/// accepted connection is then reset, as a peer would see an unreachable host.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest one-way delay accepted.
pub const DELAY_MAX: Duration = Duration::from_secs(10);

/// Largest jitter accepted.
pub const JITTER_MAX: Duration = Duration::from_secs(10);

/// Smallest bandwidth accepted (a zero bandwidth is a partition: use `Partition::Hold`).
pub const BANDWIDTH_MIN_BYTES_PER_SEC: u64 = 1024;

/// Largest bandwidth accepted; also keeps the token arithmetic far from overflow.
pub const BANDWIDTH_MAX_BYTES_PER_SEC: u64 = 1 << 40;

/// Longest site name accepted.
pub const SITE_NAME_MAX_BYTES: usize = 64;
