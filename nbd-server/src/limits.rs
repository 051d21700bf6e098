//! Every bound the NBD front end enforces, in one place.
//!
//! Each limit says what happens when a client reaches it. None of them can be
//! exceeded by anything a client sends: they are checked before memory is reserved.

/// Largest WRITE payload or READ length we accept (2^25, the spec's interoperable
/// maximum, advertised as the maximum block size). A WRITE above it has its payload
/// discarded without being buffered and fails with `EINVAL`; a READ above it fails with
/// `EOVERFLOW` (structured replies) or `EINVAL` (simple replies).
pub const REQUEST_PAYLOAD_MAX_BYTES: u32 = 32 << 20;

/// Requests in flight on one connection. When reached, the server stops reading the
/// socket until a reply has been queued, so the client sees TCP back-pressure.
pub const INFLIGHT_REQUESTS_MAX: usize = 256;

/// Bytes of request and reply payload held for one connection: writes not yet
/// applied, reads not yet sent. When reached, reading pauses as above. Must be at
/// least one maximal request plus one maximal reply so a single request always fits.
pub const INFLIGHT_BYTES_MAX: usize = 2 * REQUEST_PAYLOAD_MAX_BYTES as usize + (8 << 20);

/// Concurrent client connections per listener. The next connection waits in the
/// kernel's accept backlog until one closes.
pub const CONNECTIONS_MAX: usize = 512;

/// Largest option payload during the handshake (export names are at most 4096 bytes;
/// a meta-context request carries a few of them). A larger option is discarded
/// without being buffered and answered with `NBD_REP_ERR_TOO_BIG`.
pub const OPTION_PAYLOAD_MAX_BYTES: u32 = 64 << 10;

/// Longest string (export name, meta context query) the spec allows.
pub const STRING_MAX_BYTES: usize = 4096;

/// Meta-context queries in one `NBD_OPT_{LIST,SET}_META_CONTEXT`; more gets
/// `NBD_REP_ERR_TOO_BIG`.
pub const META_QUERIES_MAX: u32 = 128;

/// Options one handshake may send before the server hangs up: a client that never
/// reaches transmission cannot hold a connection slot forever by chatting.
pub const OPTIONS_PER_HANDSHAKE_MAX: u32 = 1024;

/// Seconds a client may take to finish the handshake; then the connection is closed.
pub const HANDSHAKE_DEADLINE_SECS: u64 = 30;

/// Extents in one BLOCK_STATUS reply (the spec says SHOULD NOT exceed 2^20). The reply
/// is truncated there; clients continue from the first offset not covered.
pub const BLOCK_STATUS_EXTENTS_MAX: usize = 16 << 10;

/// Bytes queued for the socket before the connection stops starting new requests.
pub const OUTPUT_QUEUE_BYTES_MAX: usize = 48 << 20;

/// Longest human-readable error message in an error chunk (spec: 4096).
pub const ERROR_MESSAGE_MAX_BYTES: usize = 4096;

const _: () = assert!(INFLIGHT_BYTES_MAX >= 2 * REQUEST_PAYLOAD_MAX_BYTES as usize);
const _: () = assert!(OUTPUT_QUEUE_BYTES_MAX > REQUEST_PAYLOAD_MAX_BYTES as usize);
