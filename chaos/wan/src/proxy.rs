//! Routes and connections: the accept loop of a route, and per connection the two pumps
//! (one per direction) that move bytes from a socket through a link to the other socket.
//!
//! A pump is a reader and a writer running concurrently:
//! - the reader takes a window permit (per connection direction) and a queue permit (per
//!   link) before each read, so a full link or a stalled receiver stops it reading: TCP
//!   backpressure towards the sender, as a full router queue and a closed receive window
//!   would cause;
//! - the writer writes what the link delivers and shuts the write side down when the
//!   end of stream arrives.
//!
//! A connection ends cleanly when both directions have delivered their end of stream.
//! Any I/O error, a `reset`/`Drop` partition or shutdown ends it abortively instead: both
//! sockets are closed with `SO_LINGER` 0, so both peers see a reset (`ECONNRESET`), as
//! they would after a real connection loss.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn, Instrument};

use crate::budget::Budget;
use crate::limits::{CHUNK_MAX_BYTES, CONNECT_TIMEOUT, CONN_WINDOW_CHUNKS_MAX};
use crate::link::{Chunk, Counters, Delivered, Link, Segment};
use crate::params::Partition;
use crate::shaper::ConnId;

/// Pause after a failed `accept` (e.g. out of file descriptors), so that the loop does
/// not spin while the condition lasts.
const ACCEPT_ERROR_BACKOFF: std::time::Duration = std::time::Duration::from_millis(10);

/// What a route's tasks share.
pub(crate) struct RouteCtx {
    /// Link for bytes from the connecting side to the target.
    pub forward: Arc<Link>,
    /// Link for the replies.
    pub backward: Arc<Link>,
    pub target: SocketAddr,
    pub connections_max: usize,
    pub connections_open: AtomicUsize,
    pub next_conn_id: Arc<AtomicU64>,
    pub tracker: TaskTracker,
    pub shutdown: CancellationToken,
}

/// Accepts connections until shutdown and starts one task per connection.
pub(crate) async fn accept_loop(listener: TcpListener, route: Arc<RouteCtx>) {
    loop {
        let accepted = tokio::select! {
            _ = route.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (client, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "accept connection");
                tokio::select! {
                    _ = route.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => continue,
                }
            }
        };
        if route.connections_open.load(Ordering::Relaxed) >= route.connections_max {
            warn!(%peer, max = route.connections_max, "route at its connection limit; resetting new connection");
            abort(&client);
            continue;
        }
        route.connections_open.fetch_add(1, Ordering::Relaxed);
        let conn = route.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let span = tracing::debug_span!("conn", conn, %peer);
        let route2 = Arc::clone(&route);
        route.tracker.spawn(
            async move {
                run_connection(client, conn, &route2).await;
                route2.connections_open.fetch_sub(1, Ordering::Relaxed);
            }
            .instrument(span),
        );
    }
    debug!("route stopped accepting");
}

/// Why a connection ended.
enum End {
    /// Both directions delivered their end of stream.
    Closed,
    /// The emulator reset it (`reset`, `Drop` partition, shutdown).
    Reset,
    /// A socket failed (a peer reset, a write to a closed peer, the link stopped).
    Failed(io::Error),
}

async fn run_connection(mut client: TcpStream, conn: ConnId, route: &RouteCtx) {
    let token = route.shutdown.child_token();
    let links = [&route.forward, &route.backward];
    for link in links {
        link.register(conn, token.clone());
    }
    // Checked after registering: a partition set concurrently either sees this
    // connection in the registry or is seen here.
    let dropped = links
        .iter()
        .any(|l| l.params().partition == Partition::Drop);
    if dropped {
        debug!("refused: the link is partitioned (drop)");
        Counters::add(&route.forward.counters.connections_refused, 1);
        abort(&client);
    } else {
        match connect(route.target, &token).await {
            Err(e) => {
                debug!(target = %route.target, error = %e, "connect to target; resetting client");
                abort(&client);
            }
            Ok(mut target) => {
                set_nodelay(&client);
                set_nodelay(&target);
                let end = proxy(&mut client, &mut target, conn, route, &token).await;
                match end {
                    End::Closed => debug!("closed"),
                    End::Reset => {
                        debug!("reset by the emulator");
                        for link in links {
                            Counters::add(&link.counters.connections_reset, 1);
                        }
                    }
                    End::Failed(ref e) => {
                        debug!(error = %e, "connection failed; resetting both ends")
                    }
                }
                if !matches!(end, End::Closed) {
                    abort(&target);
                    abort(&client);
                }
            }
        }
    }
    for link in links {
        link.unregister(conn);
    }
}

async fn connect(target: SocketAddr, token: &CancellationToken) -> io::Result<TcpStream> {
    tokio::select! {
        _ = token.cancelled() => Err(io::Error::new(io::ErrorKind::ConnectionAborted, "reset by the emulator")),
        r = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)) => match r {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
        },
    }
}

async fn proxy(
    client: &mut TcpStream,
    target: &mut TcpStream,
    conn: ConnId,
    route: &RouteCtx,
    token: &CancellationToken,
) -> End {
    let (client_read, client_write) = client.split();
    let (target_read, target_write) = target.split();
    let up = Pump::new(conn, &route.forward);
    let down = Pump::new(conn, &route.backward);
    let both = async {
        tokio::try_join!(
            up.run(client_read, target_write),
            down.run(target_read, client_write)
        )
    };
    let end = tokio::select! {
        _ = token.cancelled() => End::Reset,
        r = both => match r {
            Ok(_) => End::Closed,
            Err(e) => End::Failed(e),
        },
    };
    for pump in [&up, &down] {
        pump.account_drops();
    }
    end
}

/// One direction of one connection.
struct Pump<'a> {
    conn: ConnId,
    link: &'a Link,
    /// Bytes of this direction inside the emulator (link and writer queue).
    window: Arc<Budget>,
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
}

impl<'a> Pump<'a> {
    fn new(conn: ConnId, link: &'a Link) -> Self {
        Pump {
            conn,
            link,
            window: Budget::new(
                link.params().queue_limit_effective_bytes(),
                CONN_WINDOW_CHUNKS_MAX,
            ),
            read_bytes: AtomicU64::new(0),
            written_bytes: AtomicU64::new(0),
        }
    }

    async fn run(&self, src: ReadHalf<'_>, dst: WriteHalf<'_>) -> io::Result<()> {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::try_join!(self.read_side(src, tx), self.write_side(dst, rx))?;
        Ok(())
    }

    async fn read_side(
        &self,
        src: ReadHalf<'_>,
        deliver: mpsc::UnboundedSender<Delivered>,
    ) -> io::Result<()> {
        loop {
            let want = self.link.chunk_limit_bytes().min(CHUNK_MAX_BYTES);
            // A connection may hold up to a full link queue, so one connection can fill
            // the link; the limit follows the link's current queue limit.
            self.window.set_limit_bytes(self.link.queue.limit_bytes());
            let mut window_permit = self.window.acquire(want).await;
            // Wait for data before taking queue space, so that idle connections hold none.
            src.readable().await?;
            let mut link_permit = self.link.queue.acquire(want).await;
            // A fresh buffer per read: idle connections hold none, and a full read becomes
            // the chunk without a copy.
            let mut buf = BytesMut::with_capacity(want as usize);
            let n = match src.try_read_buf(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            window_permit.shrink_to(n as u64);
            link_permit.shrink_to(n as u64);
            let segment = if n == 0 {
                Segment::Fin
            } else {
                self.read_bytes.fetch_add(n as u64, Ordering::Relaxed);
                Segment::Data(if n >= buf.capacity() / 2 {
                    buf.freeze()
                } else {
                    // A short read: copy, so that queued memory stays close to the bytes
                    // accounted for.
                    Bytes::copy_from_slice(&buf)
                })
            };
            let chunk = Chunk {
                segment,
                link_permit,
                window_permit,
                deliver: deliver.clone(),
            };
            if self.link.push(self.conn, chunk).is_err() {
                return Err(io::Error::other("the WAN emulator is shutting down"));
            }
            if n == 0 {
                return Ok(());
            }
        }
    }

    async fn write_side(
        &self,
        mut dst: WriteHalf<'_>,
        mut arrived: mpsc::UnboundedReceiver<Delivered>,
    ) -> io::Result<()> {
        while let Some(Delivered {
            segment,
            window_permit,
        }) = arrived.recv().await
        {
            match segment {
                Segment::Data(bytes) => {
                    dst.write_all(&bytes).await?;
                    let n = bytes.len() as u64;
                    self.written_bytes.fetch_add(n, Ordering::Relaxed);
                    Counters::add(&self.link.counters.bytes_forwarded, n);
                }
                Segment::Fin => {
                    dst.shutdown().await?;
                    return Ok(());
                }
            }
            drop(window_permit);
        }
        // Every sender is gone without an end of stream: the link dropped our chunks.
        Err(io::Error::other("the link stopped delivering"))
    }

    /// Adds the bytes read but never written to the link's drop counter.
    fn account_drops(&self) {
        let read = self.read_bytes.load(Ordering::Relaxed);
        let written = self.written_bytes.load(Ordering::Relaxed);
        Counters::add(
            &self.link.counters.bytes_dropped,
            read.saturating_sub(written),
        );
    }
}

fn set_nodelay(stream: &TcpStream) {
    // The emulator must not add Nagle delays of its own; a failure only costs latency.
    if let Err(e) = stream.set_nodelay(true) {
        debug!(error = %e, "set TCP_NODELAY");
    }
}

/// Makes the coming close of `stream` send a reset instead of a FIN.
fn abort(stream: &TcpStream) {
    if let Err(e) = stream.set_zero_linger() {
        debug!(error = %e, "set SO_LINGER 0");
    }
}
