//! The tokio driver: accepts TCP or unix connections, runs the handshake state machine
//! and then the transmission loop, calling the backend. All protocol decisions are made
//! in `handshake` and `transmission`; this module only moves bytes and futures.
//!
//! One task per connection owns everything about it (read buffer, in-flight requests,
//! output queue); there is no lock on the path of a request. The loop is:
//!
//! 1. decode every complete request already buffered, validate it, start its backend
//!    future (while the in-flight limits allow);
//! 2. wait for whichever comes first: a backend completion (its reply is queued), room
//!    to write queued replies (written with one vectored write), more bytes from the
//!    client, or shutdown.
//!
//! Replies therefore go out in completion order, not request order, and many requests
//! are in flight at once. Every read of the socket stops while the connection holds
//! `INFLIGHT_REQUESTS_MAX` requests or `INFLIGHT_BYTES_MAX` bytes, which bounds memory
//! per connection whatever the client sends.

use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument};

use crate::backend::{Backend, BackendError, Catalog, Extent, ReadChunk};
use crate::handshake::{self, Negotiation, Step};
use crate::transmission::{
    normalize_extents, validate, Decoded, Op, OutQueue, RequestDecoder, Session,
};
use crate::{limits, wire};

/// Counters an operator can scrape (the storage node exports them as Prometheus
/// metrics). Relaxed atomics: they are statistics, not synchronisation.
#[derive(Default, Debug)]
pub struct Stats {
    pub connections_total: AtomicU64,
    pub connections_open: AtomicU64,
    pub requests_total: AtomicU64,
    pub request_errors_total: AtomicU64,
    pub bytes_read_total: AtomicU64,
    pub bytes_written_total: AtomicU64,
}

impl Stats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// An NBD server over one catalog.
pub struct Server<C: Catalog> {
    catalog: Arc<C>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
    connections: Arc<Semaphore>,
    tracker: TaskTracker,
}

impl<C: Catalog> Server<C> {
    pub fn new(catalog: Arc<C>, shutdown: CancellationToken) -> Self {
        Server {
            catalog,
            stats: Arc::new(Stats::default()),
            shutdown,
            connections: Arc::new(Semaphore::new(limits::CONNECTIONS_MAX)),
            tracker: TaskTracker::new(),
        }
    }

    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    /// Serves TCP connections until shutdown, then waits for open connections to
    /// finish their in-flight requests.
    pub async fn serve_tcp(&self, listener: TcpListener) -> std::io::Result<()> {
        loop {
            let Some(permit) = self.connection_permit().await else {
                break;
            };
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        continue;
                    }
                },
                _ = self.shutdown.cancelled() => break,
            };
            // Small replies must not wait for Nagle: QD1 latency depends on it.
            if let Err(e) = stream.set_nodelay(true) {
                warn!(error = %e, "set TCP_NODELAY");
            }
            let (rd, wr) = stream.into_split();
            self.spawn_connection(rd, wr, peer.to_string(), permit);
        }
        self.drain().await;
        Ok(())
    }

    /// Serves unix-socket connections until shutdown.
    pub async fn serve_unix(&self, listener: UnixListener) -> std::io::Result<()> {
        loop {
            let Some(permit) = self.connection_permit().await else {
                break;
            };
            let stream = tokio::select! {
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        continue;
                    }
                },
                _ = self.shutdown.cancelled() => break,
            };
            let (rd, wr) = stream.into_split();
            self.spawn_connection(rd, wr, "unix".to_string(), permit);
        }
        self.drain().await;
        Ok(())
    }

    async fn connection_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        tokio::select! {
            p = Arc::clone(&self.connections).acquire_owned() => p.ok(),
            _ = self.shutdown.cancelled() => None,
        }
    }

    async fn drain(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }

    fn spawn_connection<R, W>(
        &self,
        rd: R,
        wr: W,
        peer: String,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let catalog = Arc::clone(&self.catalog);
        let stats = Arc::clone(&self.stats);
        let shutdown = self.shutdown.clone();
        let span = tracing::info_span!("nbd", peer = %peer);
        self.tracker.spawn(
            async move {
                Stats::add(&stats.connections_total, 1);
                Stats::add(&stats.connections_open, 1);
                match run_connection(&*catalog, rd, wr, &stats, &shutdown).await {
                    Ok(()) => debug!("connection closed"),
                    Err(e) => info!(reason = %e, "connection ended"),
                }
                stats.connections_open.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("handshake took longer than {0} s")]
    HandshakeDeadline(u64),
}

/// Runs one connection to completion: handshake, then transmission.
pub async fn run_connection<C, R, W>(
    catalog: &C,
    mut rd: R,
    mut wr: W,
    stats: &Stats,
    shutdown: &CancellationToken,
) -> Result<(), ConnError>
where
    C: Catalog,
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let deadline = Duration::from_secs(limits::HANDSHAKE_DEADLINE_SECS);
    let negotiated =
        match tokio::time::timeout(deadline, handshake(catalog, &mut rd, &mut wr)).await {
            Err(_) => {
                return Err(ConnError::HandshakeDeadline(
                    limits::HANDSHAKE_DEADLINE_SECS,
                ))
            }
            Ok(r) => r?,
        };
    let Some((export, negotiated)) = negotiated else {
        return Ok(());
    };
    let session = Session {
        size: export.info.size,
        read_only: export.info.read_only,
        minimum_block: export.info.block_sizes.minimum,
        negotiated,
    };
    let span = tracing::info_span!("export", name = %export.info.name);
    transmission(export.backend, session, rd, wr, stats, shutdown)
        .instrument(span)
        .await
}

type Negotiated<B> = Option<(crate::backend::Export<B>, handshake::Negotiated)>;

async fn handshake<C, R, W>(
    catalog: &C,
    rd: &mut R,
    wr: &mut W,
) -> Result<Negotiated<C::Backend>, ConnError>
where
    C: Catalog,
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let mut out = BytesMut::with_capacity(256);
    handshake::greeting(&mut out);
    wr.write_all(&out).await?;
    out.clear();
    let mut negotiation = Negotiation::new();
    let flags = rd.read_u32().await?;
    if let Err(bad) = negotiation.client_flags(flags) {
        return Err(ConnError::Protocol(format!(
            "unknown client flags {:#x}",
            bad.0
        )));
    }
    let mut data = Vec::new();
    loop {
        let mut header = [0u8; wire::OPTION_HEADER_BYTES];
        rd.read_exact(&mut header).await?;
        let magic = u64::from_be_bytes(header[..8].try_into().expect("8 bytes"));
        if magic != wire::IHAVEOPT {
            return Err(ConnError::Protocol(format!("bad option magic {magic:#x}")));
        }
        let opt = u32::from_be_bytes(header[8..12].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(header[12..16].try_into().expect("4 bytes"));
        let step = if len > limits::OPTION_PAYLOAD_MAX_BYTES {
            // Drop the payload as it arrives rather than buffering it.
            let skipped =
                tokio::io::copy(&mut (&mut *rd).take(u64::from(len)), &mut tokio::io::sink())
                    .await?;
            if skipped < u64::from(len) {
                return Err(ConnError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            match negotiation.oversized_option(opt, &mut out) {
                Some(why) => Step::Disconnect(why),
                None => Step::Continue,
            }
        } else {
            data.resize(len as usize, 0);
            rd.read_exact(&mut data).await?;
            negotiation.option(opt, &data, catalog, &mut out)
        };
        if !out.is_empty() {
            wr.write_all(&out).await?;
            out.clear();
        }
        match step {
            Step::Continue => {}
            Step::Close => return Ok(None),
            Step::Disconnect(why) => return Err(ConnError::Protocol(why)),
            Step::Transmission(export, negotiated) => return Ok(Some((export, negotiated))),
        }
    }
}

/// What a finished backend call produced.
enum Outcome {
    Done,
    Read {
        offset: u64,
        len: u32,
        df: bool,
        chunks: Vec<ReadChunk>,
    },
    BlockStatus(Vec<Extent>),
    Failed(BackendError),
}

struct Completion {
    cookie: u64,
    /// Bytes charged against `INFLIGHT_BYTES_MAX` while this request was in flight.
    charge: usize,
    outcome: Outcome,
}

type InFlight = Pin<Box<dyn Future<Output = Completion> + Send>>;

fn start<B: Backend>(backend: &Arc<B>, cookie: u64, op: Op) -> (InFlight, usize) {
    let backend = Arc::clone(backend);
    let charge = match &op {
        Op::Read { len, .. } => *len as usize,
        Op::Write { data, .. } => data.len(),
        _ => 0,
    };
    let fut = async move {
        let result = match op {
            Op::Read { offset, len, df } => {
                backend.read(offset, len).await.map(|chunks| Outcome::Read {
                    offset,
                    len,
                    df,
                    chunks,
                })
            }
            Op::Write { offset, data, fua } => backend
                .write(offset, data, fua)
                .await
                .map(|()| Outcome::Done),
            Op::Flush => backend.flush().await.map(|()| Outcome::Done),
            Op::Trim { offset, len, fua } => {
                backend.trim(offset, len, fua).await.map(|()| Outcome::Done)
            }
            Op::WriteZeroes { offset, len, flags } => backend
                .write_zeroes(offset, len, flags)
                .await
                .map(|()| Outcome::Done),
            Op::BlockStatus {
                offset,
                len,
                req_one,
            } => backend
                .block_status(offset, len, limits::BLOCK_STATUS_EXTENTS_MAX)
                .await
                .map(|e| Outcome::BlockStatus(normalize_extents(e, len, req_one))),
            Op::Cache { offset, len } => backend.cache(offset, len).await.map(|()| Outcome::Done),
            Op::Disconnect => unreachable!("DISC is handled by the connection loop"),
        };
        Completion {
            cookie,
            charge,
            outcome: result.unwrap_or_else(Outcome::Failed),
        }
    };
    (Box::pin(fut), charge)
}

/// Segments handed to one vectored write.
const WRITE_SEGMENTS_MAX: usize = 64;
/// Queued reply bytes above which the loop writes before completing more requests.
const OUTPUT_BATCH_BYTES: usize = 512 << 10;
/// Read buffer capacity kept between requests.
const READ_BUFFER_BYTES: usize = 256 << 10;

async fn transmission<B, R, W>(
    backend: Arc<B>,
    session: Session,
    mut rd: R,
    mut wr: W,
    stats: &Stats,
    shutdown: &CancellationToken,
) -> Result<(), ConnError>
where
    B: Backend,
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let structured = session.negotiated.structured_replies;
    let mut rbuf = BytesMut::with_capacity(READ_BUFFER_BYTES);
    let mut decoder = RequestDecoder::new();
    let mut inflight: FuturesUnordered<InFlight> = FuturesUnordered::new();
    let mut inflight_bytes = 0usize;
    let mut outq = OutQueue::new();
    // Set by DISC, end of input, or shutdown: read no more, finish what is in flight.
    let mut closing = false;

    loop {
        let has_room = |n: usize, bytes: usize, q: &OutQueue| {
            n < limits::INFLIGHT_REQUESTS_MAX && bytes + q.bytes() < limits::INFLIGHT_BYTES_MAX
        };

        while !closing && has_room(inflight.len(), inflight_bytes, &outq) {
            let decoded = decoder
                .decode(&mut rbuf)
                .map_err(|e| ConnError::Protocol(e.to_string()))?;
            let Some(decoded) = decoded else { break };
            Stats::add(&stats.requests_total, 1);
            match decoded {
                Decoded::Rejected { cookie, errno } => {
                    Stats::add(&stats.request_errors_total, 1);
                    warn!(cookie, "write payload over the maximum, discarded");
                    outq.error(
                        structured,
                        cookie,
                        errno,
                        "write payload exceeds the maximum block size",
                    );
                }
                Decoded::Request(req) => {
                    let cookie = req.cookie;
                    match validate(req, &session) {
                        Err(refusal) => {
                            Stats::add(&stats.request_errors_total, 1);
                            debug!(
                                cookie,
                                errno = refusal.errno,
                                reason = refusal.message,
                                "request refused"
                            );
                            outq.error(structured, cookie, refusal.errno, refusal.message);
                        }
                        Ok(Op::Disconnect) => closing = true,
                        Ok(op) => {
                            let (fut, charge) = start(&backend, cookie, op);
                            inflight_bytes += charge;
                            inflight.push(fut);
                        }
                    }
                }
            }
        }

        if closing && inflight.is_empty() && outq.is_empty() {
            wr.shutdown().await.ok();
            return Ok(());
        }

        let can_read = !closing && has_room(inflight.len(), inflight_bytes, &outq);
        if can_read {
            let wanted = decoder.wanted(&rbuf).max(rbuf.len() + 1);
            rbuf.reserve((wanted - rbuf.len()).max(READ_BUFFER_BYTES / 4));
        }
        let segments: Vec<Bytes> = if outq.is_empty() {
            Vec::new()
        } else {
            outq.front(WRITE_SEGMENTS_MAX)
        };
        let slices: Vec<IoSlice<'_>> = segments.iter().map(|b| IoSlice::new(b)).collect();

        tokio::select! {
            biased;
            // With enough already queued, write before producing more: large reads then
            // overlap with sending instead of all being read first.
            Some(done) = inflight.next(), if !inflight.is_empty() && outq.bytes() < OUTPUT_BATCH_BYTES => {
                inflight_bytes -= done.charge;
                encode_completion(&mut outq, structured, done, stats);
            }
            written = wr.write_vectored(&slices), if !slices.is_empty() => {
                let n = written?;
                if n == 0 {
                    return Err(ConnError::Io(std::io::ErrorKind::WriteZero.into()));
                }
                outq.consume(n);
            }
            got = rd.read_buf(&mut rbuf), if can_read => {
                if got? == 0 {
                    if !rbuf.is_empty() {
                        debug!(bytes = rbuf.len(), "client closed mid-request");
                    }
                    closing = true;
                }
            }
            _ = shutdown.cancelled(), if !closing => {
                info!("shutting down: finishing in-flight requests");
                closing = true;
            }
        }
    }
}

fn encode_completion(outq: &mut OutQueue, structured: bool, done: Completion, stats: &Stats) {
    match done.outcome {
        Outcome::Done => {
            Stats::add(&stats.bytes_written_total, done.charge as u64);
            outq.ok(done.cookie);
        }
        Outcome::Read {
            offset,
            len,
            df,
            chunks,
        } => {
            Stats::add(&stats.bytes_read_total, u64::from(len));
            outq.read(structured, df, done.cookie, offset, len, chunks);
        }
        Outcome::BlockStatus(extents) => outq.block_status(done.cookie, &extents),
        Outcome::Failed(e) => {
            Stats::add(&stats.request_errors_total, 1);
            let errno = e.nbd_errno();
            if errno == wire::EIO {
                error!(cookie = done.cookie, error = %e, "backend I/O error");
            } else {
                debug!(cookie = done.cookie, error = %e, "request failed");
            }
            outq.error(structured, done.cookie, errno, &e.to_string());
        }
    }
}
