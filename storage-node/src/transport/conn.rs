//! Connections to peers: accepting them, dialing them (one outbound connection per peer
//! and [`Lane`]), and every connection's reader and writer tasks.

use std::sync::Arc;
use std::time::Duration;

use roamdisk_core::ids::NodeId;
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{Conn, Transport, PEER_QUEUE_FRAMES_MAX, READ_BUFFER_BYTES, RECONNECT_DELAY_MS};
use crate::link::{read_record, WriterMode, BATCH_BYTES_MAX};
use crate::store::Event;
use crate::wire::{Lane, PeerFrame, PEER_PROTOCOL_VERSION};

impl Transport {
    /// Accepts peer connections until shutdown.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "peer accept failed");
                        continue;
                    }
                },
                _ = self.shutdown.cancelled() => return,
            };
            let _ = stream.set_nodelay(true);
            let me = Arc::clone(&self);
            tokio::spawn(async move {
                if let Err(e) = me.run_conn(stream).await {
                    debug!(%peer, error = %e, "inbound peer connection ended");
                }
            });
        }
    }

    pub(super) fn conn(
        self: &Arc<Self>,
        to: NodeId,
        lane: Lane,
    ) -> Option<mpsc::Sender<PeerFrame>> {
        let mut conns = self.conns.lock().expect("conn lock");
        if let Some(c) = conns.get(&(to, lane)) {
            if !c.tx.is_closed() {
                return Some(c.tx.clone());
            }
        }
        let addr = self.addrs.read().expect("addr lock").get(&to)?.addr.clone();
        let (tx, rx) = mpsc::channel(PEER_QUEUE_FRAMES_MAX);
        conns.insert((to, lane), Conn { tx: tx.clone() });
        let me = Arc::clone(self);
        self.rt
            .spawn(async move { me.dial_loop(to, lane, addr, rx).await });
        Some(tx)
    }

    /// Keeps one outbound connection to `to` alive, feeding it frames from `rx`.
    async fn dial_loop(
        self: Arc<Self>,
        to: NodeId,
        lane: Lane,
        addr: String,
        mut rx: mpsc::Receiver<PeerFrame>,
    ) {
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            match TcpStream::connect(&addr).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    info!(peer = %to, %addr, lane = lane.name(), "connected to peer");
                    match self.run_dialed(stream, to, lane, &mut rx).await {
                        Ok(()) => return,
                        Err(e) => debug!(peer = %to, error = %e, "peer connection lost"),
                    }
                }
                Err(e) => debug!(peer = %to, %addr, error = %e, "connect to peer failed"),
            }
            let _ = self.store.try_send(Event::Unreachable { node: to });
            // Frames queued while disconnected are stale: Raft retransmits its messages,
            // and requests fail now (the caller retries elsewhere) rather than reach the
            // peer after it restarts.
            while rx.try_recv().is_ok() {}
            self.fail_pending(to);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(RECONNECT_DELAY_MS)) => {}
                _ = self.shutdown.cancelled() => return,
            }
        }
    }

    async fn run_dialed(
        self: &Arc<Self>,
        stream: TcpStream,
        to: NodeId,
        lane: Lane,
        rx: &mut mpsc::Receiver<PeerFrame>,
    ) -> anyhow::Result<()> {
        let (rd, wr) = stream.into_split();
        let mut wr = BufWriter::with_capacity(256 << 10, wr);
        let hello = PeerFrame::Hello {
            version: PEER_PROTOCOL_VERSION,
            from: self.me,
            lane,
        };
        WriterMode::local(Lane::Control)
            .write_batch(&mut wr, &[hello])
            .await?;
        wr.flush().await?;
        let mode = self.mode_for(to, lane);
        let me = Arc::clone(self);
        let (reply_tx, mut reply_rx) = mpsc::channel::<PeerFrame>(PEER_QUEUE_FRAMES_MAX);
        let rd = BufReader::with_capacity(READ_BUFFER_BYTES, rd);
        let reader = tokio::spawn(async move { me.read_frames(rd, to, reply_tx).await });
        let result = async {
            loop {
                let frame = tokio::select! {
                    f = rx.recv() => match f { Some(f) => f, None => return Ok(()) },
                    f = reply_rx.recv() => match f {
                        Some(f) => {
                            mode.write_batch(&mut wr, &[f]).await?;
                            wr.flush().await?;
                            continue;
                        }
                        None => anyhow::bail!("reader ended"),
                    },
                    _ = self.shutdown.cancelled() => return Ok(()),
                };
                write_queued(&mut wr, &mode, frame, rx).await?;
            }
        }
        .await;
        reader.abort();
        result
    }

    /// An accepted connection: reads frames, answers requests on the same connection.
    async fn run_conn(self: Arc<Self>, stream: TcpStream) -> anyhow::Result<()> {
        let (rd, wr) = stream.into_split();
        let mut rd = BufReader::with_capacity(READ_BUFFER_BYTES, rd);
        let hello = read_record(&mut rd).await?.unwrap_or_default();
        let (from, lane) = match hello.as_slice() {
            [PeerFrame::Hello {
                version,
                from,
                lane,
            }] => {
                anyhow::ensure!(
                    *version == PEER_PROTOCOL_VERSION,
                    "peer {from} speaks protocol {version}, not {PEER_PROTOCOL_VERSION}"
                );
                debug!(peer = %from, lane = lane.name(), "peer connected");
                (*from, *lane)
            }
            _ => anyhow::bail!("peer did not start with Hello"),
        };
        let mode = self.mode_for(from, lane);
        let (tx, mut rx) = mpsc::channel::<PeerFrame>(PEER_QUEUE_FRAMES_MAX);
        let writer = tokio::spawn(async move {
            let mut wr = BufWriter::with_capacity(256 << 10, wr);
            while let Some(f) = rx.recv().await {
                write_queued(&mut wr, &mode, f, &mut rx).await?;
            }
            anyhow::Ok(())
        });
        let r = self.read_frames(rd, from, tx).await;
        writer.abort();
        r
    }

    /// Reads frames from `from` until the connection ends; requests are answered through
    /// `reply`. Frames are handled in order (an append with references waits for them to
    /// resolve before the next frame is read).
    async fn read_frames(
        self: Arc<Self>,
        mut rd: BufReader<tokio::net::tcp::OwnedReadHalf>,
        from: NodeId,
        reply: mpsc::Sender<PeerFrame>,
    ) -> anyhow::Result<()> {
        while let Some(frames) = read_record(&mut rd).await? {
            for frame in frames {
                match frame {
                    PeerFrame::RaftRefs {
                        group,
                        epoch,
                        msg,
                        refs,
                    } => self.receive_refs(from, group, epoch, msg, refs).await?,
                    frame => self.receive(from, frame, &reply)?,
                }
            }
        }
        Ok(())
    }
}

/// Writes `first` and whatever else is queued, in batches of up to [`BATCH_BYTES_MAX`],
/// then flushes.
async fn write_queued<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut BufWriter<W>,
    mode: &WriterMode,
    first: PeerFrame,
    rx: &mut mpsc::Receiver<PeerFrame>,
) -> anyhow::Result<()> {
    let mut next = Some(first);
    crate::link::write_pipelined(wr, mode, || {
        let f = next.take().or_else(|| rx.try_recv().ok())?;
        let mut bytes = f.approx_len();
        let mut batch = vec![f];
        while bytes < BATCH_BYTES_MAX {
            match rx.try_recv() {
                Ok(f) => {
                    bytes += f.approx_len();
                    batch.push(f);
                }
                Err(_) => break,
            }
        }
        Some(batch)
    })
    .await?;
    wr.flush().await?;
    Ok(())
}
