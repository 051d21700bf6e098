//! One directed link (site a → site b) at run time: its task, which owns the [`Shaper`]
//! and moves chunks from readers to writers, and the few things other tasks share with
//! it (parameters, the queue budget, counters, the registry of connections).
//!
//! Only the link task touches the shaper (one owner, a closed command enum). What is
//! shared sits behind short `std` mutexes and atomics: readers need the queue budget and
//! the chunk size without a round trip to the task, and the control API needs parameters
//! and counters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, Instrument};

use crate::budget::{Budget, Permit};
use crate::limits::QUEUE_CHUNKS_MAX;
use crate::params::{LinkParams, Site};
use crate::shaper::{ConnId, Shaper};
use crate::timer::Timer;

/// What travels through a link for one connection direction.
#[derive(Debug)]
pub(crate) enum Segment {
    Data(Bytes),
    /// The sender closed its write side; the receiver's write side is shut down when this
    /// arrives (after all data before it).
    Fin,
}

impl Segment {
    pub(crate) fn len(&self) -> u64 {
        match self {
            Segment::Data(b) => b.len() as u64,
            Segment::Fin => 0,
        }
    }
}

/// A chunk inside a link, with the permits that account for it.
#[derive(Debug)]
pub(crate) struct Chunk {
    pub segment: Segment,
    /// Held in the link's queue budget until the chunk arrives.
    pub link_permit: Permit,
    /// Held in the connection direction's window until the chunk is written.
    pub window_permit: Permit,
    /// The writer of this connection direction.
    pub deliver: mpsc::UnboundedSender<Delivered>,
}

/// A chunk that has crossed the link, handed to its connection's writer.
#[derive(Debug)]
pub(crate) struct Delivered {
    pub segment: Segment,
    pub window_permit: Permit,
}

/// Commands to the link task. Unbounded channel, bounded in practice: a `Push` needs a
/// queue permit, and there is one `Forget` per connection.
enum Cmd {
    Push { conn: ConnId, chunk: Chunk },
    Forget { conn: ConnId },
    Params(LinkParams),
}

/// Counters of one directed link, as seen by the control API and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStats {
    /// Bytes written to destinations after crossing the link: the wire bytes.
    pub bytes_forwarded: u64,
    /// Bytes inside the link now (waiting for tokens or in the delay line, plus space a
    /// reader has reserved for the read it is doing). Never above the queue limit.
    pub bytes_queued: u64,
    /// Chunks inside the link now.
    pub chunks_queued: u64,
    /// Bytes read from a sender but never written because the connection was reset.
    pub bytes_dropped: u64,
    /// Connections crossing the link now (every connection between the two sites crosses
    /// both directions).
    pub connections_open: u64,
    /// Connections accepted since start on routes over the link (in either direction),
    /// including refused ones and ones whose target could not be reached.
    pub connections_total: u64,
    /// Live connections the emulator reset (`reset`, a `Drop` partition, shutdown).
    pub connections_reset: u64,
    /// New connections reset at once because of a `Drop` partition.
    pub connections_refused: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub bytes_forwarded: AtomicU64,
    pub bytes_dropped: AtomicU64,
    pub connections_total: AtomicU64,
    pub connections_reset: AtomicU64,
    pub connections_refused: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

pub(crate) struct Link {
    pub from: Site,
    pub to: Site,
    params: Mutex<LinkParams>,
    chunk_limit_bytes: AtomicU64,
    pub queue: Arc<Budget>,
    pub counters: Counters,
    conns: Mutex<HashMap<ConnId, CancellationToken>>,
    cmd: mpsc::UnboundedSender<Cmd>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // No critical section in this module can panic half-way, so a poisoned lock still
    // guards a consistent value.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Link {
    /// Creates the link and starts its task on `tracker`; the task ends on `shutdown` or
    /// when the link is dropped.
    pub(crate) fn spawn(
        from: Site,
        to: Site,
        params: LinkParams,
        seed: u64,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Link> {
        let (cmd, rx) = mpsc::unbounded_channel();
        let link = Arc::new(Link {
            queue: Budget::new(params.queue_limit_effective_bytes(), QUEUE_CHUNKS_MAX),
            chunk_limit_bytes: AtomicU64::new(params.chunk_limit_bytes()),
            params: Mutex::new(params),
            counters: Counters::default(),
            conns: Mutex::new(HashMap::new()),
            cmd,
            from,
            to,
        });
        let shaper = Shaper::new(params, seed, Instant::now());
        let span = tracing::debug_span!("link", from = %link.from, to = %link.to);
        tracker.spawn(run(shaper, rx, shutdown).instrument(span));
        link
    }

    pub(crate) fn params(&self) -> LinkParams {
        *lock(&self.params)
    }

    /// Applies validated parameters: the queue limit and chunk size at once, the shaper
    /// as soon as the link task reads its next command.
    pub(crate) fn set_params(&self, params: LinkParams) {
        let mut current = lock(&self.params);
        *current = params;
        self.chunk_limit_bytes
            .store(params.chunk_limit_bytes(), Ordering::Relaxed);
        self.queue
            .set_limit_bytes(params.queue_limit_effective_bytes());
        // Sent under the lock so that the task sees changes in the order they were made.
        // A send error means the link task has ended (shutdown): nothing left to shape.
        let _ = self.cmd.send(Cmd::Params(params));
    }

    /// Largest chunk a reader may take now.
    pub(crate) fn chunk_limit_bytes(&self) -> u64 {
        self.chunk_limit_bytes.load(Ordering::Relaxed)
    }

    /// Hands a chunk to the link task. Fails only once the task has ended (shutdown);
    /// the chunk is then dropped, which releases its permits.
    pub(crate) fn push(&self, conn: ConnId, chunk: Chunk) -> Result<(), LinkStopped> {
        self.cmd
            .send(Cmd::Push { conn, chunk })
            .map_err(|_| LinkStopped)
    }

    pub(crate) fn register(&self, conn: ConnId, token: CancellationToken) {
        lock(&self.conns).insert(conn, token);
        Counters::add(&self.counters.connections_total, 1);
    }

    /// Removes a finished connection and drops whatever of it is still in the link.
    pub(crate) fn unregister(&self, conn: ConnId) {
        lock(&self.conns).remove(&conn);
        let _ = self.cmd.send(Cmd::Forget { conn });
    }

    /// Cancel tokens of every connection crossing the link.
    pub(crate) fn connection_tokens(&self) -> Vec<(ConnId, CancellationToken)> {
        lock(&self.conns)
            .iter()
            .map(|(id, t)| (*id, t.clone()))
            .collect()
    }

    pub(crate) fn stats(&self) -> LinkStats {
        let c = &self.counters;
        LinkStats {
            bytes_forwarded: c.bytes_forwarded.load(Ordering::Relaxed),
            bytes_queued: self.queue.bytes(),
            chunks_queued: self.queue.chunks(),
            bytes_dropped: c.bytes_dropped.load(Ordering::Relaxed),
            connections_open: lock(&self.conns).len() as u64,
            connections_total: c.connections_total.load(Ordering::Relaxed),
            connections_reset: c.connections_reset.load(Ordering::Relaxed),
            connections_refused: c.connections_refused.load(Ordering::Relaxed),
        }
    }
}

/// The link's task has ended: the emulator is shutting down.
#[derive(Debug)]
pub(crate) struct LinkStopped;

/// The link task: apply commands, let the shaper move time, deliver what arrived.
async fn run(
    mut shaper: Shaper<Chunk>,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    shutdown: CancellationToken,
) {
    let mut arrived = Vec::new();
    let mut next: Option<Instant> = None;
    let mut timer = Timer::new();
    loop {
        let cmd = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            cmd = rx.recv() => match cmd {
                Some(cmd) => Some(cmd),
                None => break,
            },
            _ = timer.fired(), if next.is_some() => None,
        };
        if let Some(cmd) = cmd {
            apply(&mut shaper, cmd);
            // Take whatever else is waiting, so that one poll serves a burst of pushes.
            while let Ok(cmd) = rx.try_recv() {
                apply(&mut shaper, cmd);
            }
        }
        next = shaper.poll(Instant::now(), &mut arrived);
        for (_, chunk) in arrived.drain(..) {
            deliver(chunk);
        }
        if let Some(at) = next {
            timer.arm(at);
        }
    }
    debug!(chunks = shaper.len(), "link task stopped");
}

fn apply(shaper: &mut Shaper<Chunk>, cmd: Cmd) {
    match cmd {
        Cmd::Push { conn, chunk } => {
            let len = chunk.segment.len();
            shaper.push(conn, len, chunk);
        }
        // Dropping the chunks releases their permits.
        Cmd::Forget { conn } => drop(shaper.forget(conn)),
        Cmd::Params(params) => shaper.set_params(Instant::now(), params),
    }
}

fn deliver(chunk: Chunk) {
    let Chunk {
        segment,
        link_permit,
        window_permit,
        deliver,
    } = chunk;
    // The chunk has left the link.
    drop(link_permit);
    // A send error means the connection is gone; the window permit goes with it.
    let _ = deliver.send(Delivered {
        segment,
        window_permit,
    });
}
