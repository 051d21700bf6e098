//! Byte-level protocol tests: a hand-written client sends what real clients never do
//! (bad magic, unknown commands, oversized payloads, deep pipelines) to an in-process
//! server over real TCP sockets, and checks the replies the spec requires.

use std::sync::Arc;

use roamdisk_nbd::mem::{MemBackend, MemCatalog};
use roamdisk_nbd::{wire, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const SIZE: u64 = 8 << 20;

struct Fixture {
    addr: std::net::SocketAddr,
    backend: Arc<MemBackend>,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

async fn serve() -> Fixture {
    let catalog = Arc::new(MemCatalog::single("vm1", SIZE));
    let backend = catalog.backend("vm1").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = Server::new(catalog, shutdown.clone());
    let server = tokio::spawn(async move { server.serve_tcp(listener).await.unwrap() });
    Fixture {
        addr,
        backend,
        shutdown,
        server,
    }
}

struct Client {
    s: TcpStream,
}

#[derive(Debug, PartialEq)]
struct Reply {
    cookie: u64,
    error: u32,
    data: Vec<u8>,
}

impl Client {
    async fn handshake_only(addr: std::net::SocketAddr) -> Client {
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert_eq!(s.read_u64().await.unwrap(), wire::NBDMAGIC);
        assert_eq!(s.read_u64().await.unwrap(), wire::IHAVEOPT);
        let flags = s.read_u16().await.unwrap();
        assert_ne!(flags & wire::FLAG_FIXED_NEWSTYLE, 0);
        s.write_u32(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES)
            .await
            .unwrap();
        Client { s }
    }

    async fn option(&mut self, opt: u32, data: &[u8]) {
        self.s.write_u64(wire::IHAVEOPT).await.unwrap();
        self.s.write_u32(opt).await.unwrap();
        self.s.write_u32(data.len() as u32).await.unwrap();
        self.s.write_all(data).await.unwrap();
    }

    /// Reads option replies until a final one; returns (type, payload) of each.
    async fn option_replies(&mut self) -> Vec<(u32, Vec<u8>)> {
        let mut v = Vec::new();
        loop {
            assert_eq!(self.s.read_u64().await.unwrap(), wire::OPTION_REPLY_MAGIC);
            let _opt = self.s.read_u32().await.unwrap();
            let ty = self.s.read_u32().await.unwrap();
            let len = self.s.read_u32().await.unwrap();
            let mut data = vec![0u8; len as usize];
            self.s.read_exact(&mut data).await.unwrap();
            v.push((ty, data));
            if ty != wire::REP_INFO && ty != wire::REP_SERVER && ty != wire::REP_META_CONTEXT {
                return v;
            }
        }
    }

    /// Negotiates (optionally structured replies) and enters transmission on `vm1`.
    async fn connect(addr: std::net::SocketAddr, structured: bool) -> Client {
        let mut c = Client::handshake_only(addr).await;
        if structured {
            c.option(wire::OPT_STRUCTURED_REPLY, b"").await;
            assert_eq!(c.option_replies().await.last().unwrap().0, wire::REP_ACK);
        }
        let mut go = Vec::new();
        go.extend_from_slice(&3u32.to_be_bytes());
        go.extend_from_slice(b"vm1");
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&wire::INFO_BLOCK_SIZE.to_be_bytes());
        c.option(wire::OPT_GO, &go).await;
        assert_eq!(c.option_replies().await.last().unwrap().0, wire::REP_ACK);
        c
    }

    async fn send(
        &mut self,
        flags: u16,
        cmd: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&wire::REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.s.write_all(&b).await.unwrap();
    }

    /// Reads one simple reply; `read_len` bytes of data follow a successful READ.
    async fn simple_reply(&mut self, read_len: usize) -> Reply {
        assert_eq!(self.s.read_u32().await.unwrap(), wire::SIMPLE_REPLY_MAGIC);
        let error = self.s.read_u32().await.unwrap();
        let cookie = self.s.read_u64().await.unwrap();
        let mut data = vec![0u8; if error == 0 { read_len } else { 0 }];
        self.s.read_exact(&mut data).await.unwrap();
        Reply {
            cookie,
            error,
            data,
        }
    }
}

#[tokio::test]
async fn bad_request_magic_closes_only_that_connection() {
    let f = serve().await;
    let mut c = Client::connect(f.addr, false).await;
    c.s.write_all(&[0xde; 28]).await.unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(
        c.s.read(&mut buf).await.unwrap(),
        0,
        "server must close after a bad magic"
    );
    // The server is still there for everyone else.
    let mut d = Client::connect(f.addr, false).await;
    d.send(0, wire::CMD_READ, 1, 0, 4096, b"").await;
    assert_eq!(d.simple_reply(4096).await.error, 0);
}

#[tokio::test]
async fn bad_option_magic_and_unknown_client_flags_close() {
    let f = serve().await;
    let mut c = Client::handshake_only(f.addr).await;
    c.s.write_all(&[0x11; 16]).await.unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(c.s.read(&mut buf).await.unwrap(), 0);

    let mut s = TcpStream::connect(f.addr).await.unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.unwrap();
    s.write_u32(1 << 7).await.unwrap();
    assert_eq!(
        s.read(&mut buf).await.unwrap(),
        0,
        "unknown client flag must close"
    );
}

#[tokio::test]
async fn unknown_command_flag_and_oversized_write_fail_but_connection_continues() {
    let f = serve().await;
    let mut c = Client::connect(f.addr, false).await;
    c.send(0, 77, 1, 0, 0, b"").await;
    assert_eq!(
        c.simple_reply(0).await,
        Reply {
            cookie: 1,
            error: wire::EINVAL,
            data: vec![]
        }
    );
    c.send(1 << 12, wire::CMD_READ, 2, 0, 4096, b"").await;
    assert_eq!(c.simple_reply(0).await.error, wire::EINVAL);
    // 33 MiB write: payload is discarded by the server without buffering it.
    let big = vec![0xabu8; (33 << 20) as usize];
    c.send(0, wire::CMD_WRITE, 3, 0, big.len() as u32, &big)
        .await;
    assert_eq!(
        c.simple_reply(0).await,
        Reply {
            cookie: 3,
            error: wire::EINVAL,
            data: vec![]
        }
    );
    // This client agreed to block sizes, so a 4-byte write is refused; a block is not.
    c.send(0, wire::CMD_WRITE, 4, 4096, 4, b"live").await;
    assert_eq!(c.simple_reply(0).await.error, wire::EINVAL);
    let mut block = b"live".to_vec();
    block.resize(4096, 0);
    c.send(0, wire::CMD_WRITE, 4, 4096, 4096, &block).await;
    assert_eq!(c.simple_reply(0).await.error, 0);
    c.send(0, wire::CMD_READ, 5, 4096, 4096, b"").await;
    let r = c.simple_reply(4096).await;
    assert_eq!(&r.data[..4], b"live");
    // The oversized write did not land anywhere.
    c.send(0, wire::CMD_READ, 6, 0, 4096, b"").await;
    assert_eq!(c.simple_reply(4096).await.data, vec![0u8; 4096]);
}

#[tokio::test]
async fn deep_pipeline_gets_every_reply_and_disc_finishes_in_flight() {
    let f = serve().await;
    let mut c = Client::connect(f.addr, false).await;
    // 300 writes sent without reading a reply (more than INFLIGHT_REQUESTS_MAX), then DISC.
    for i in 0..300u64 {
        let data = vec![i as u8; 4096];
        c.send(0, wire::CMD_WRITE, 1000 + i, i * 4096, 4096, &data)
            .await;
    }
    c.send(0, wire::CMD_DISC, 9, 0, 0, b"").await;
    let mut cookies = Vec::new();
    for _ in 0..300 {
        let r = c.simple_reply(0).await;
        assert_eq!(r.error, 0);
        cookies.push(r.cookie);
    }
    cookies.sort();
    assert_eq!(cookies, (1000..1300).collect::<Vec<_>>());
    let mut buf = [0u8; 1];
    assert_eq!(
        c.s.read(&mut buf).await.unwrap(),
        0,
        "DISC closes after in-flight work"
    );
    let mut d = Client::connect(f.addr, false).await;
    d.send(0, wire::CMD_READ, 1, 299 * 4096, 4096, b"").await;
    assert_eq!(d.simple_reply(4096).await.data, vec![43u8; 4096]); // 299 as u8
}

#[tokio::test]
async fn flush_on_one_connection_makes_writes_completed_on_another_durable() {
    let f = serve().await;
    let mut a = Client::connect(f.addr, false).await;
    let mut b = Client::connect(f.addr, false).await;
    a.send(0, wire::CMD_WRITE, 1, 0, 4096, &[0x42; 4096]).await;
    assert_eq!(a.simple_reply(0).await.error, 0);
    b.send(0, wire::CMD_FLUSH, 2, 0, 0, b"").await;
    assert_eq!(b.simple_reply(0).await.error, 0);
    // Written after the flush and never flushed: a crash may lose it (and here does).
    a.send(0, wire::CMD_WRITE, 3, 8192, 4096, &[0x43; 4096])
        .await;
    assert_eq!(a.simple_reply(0).await.error, 0);
    // FUA survives on its own.
    a.send(
        wire::CMD_FLAG_FUA,
        wire::CMD_WRITE,
        4,
        16384,
        4096,
        &[0x44; 4096],
    )
    .await;
    assert_eq!(a.simple_reply(0).await.error, 0);
    f.backend.crash();
    b.send(0, wire::CMD_READ, 5, 0, 20480, b"").await;
    let r = b.simple_reply(20480).await;
    assert_eq!(&r.data[..4096], &[0x42; 4096][..], "flushed write lost");
    assert_eq!(
        &r.data[8192..12288],
        &[0u8; 4096][..],
        "crash model must drop unflushed data"
    );
    assert_eq!(&r.data[16384..20480], &[0x44; 4096][..], "FUA write lost");
}

#[tokio::test]
async fn structured_read_error_is_an_error_chunk_and_block_status_needs_context() {
    let f = serve().await;
    let mut c = Client::connect(f.addr, true).await;
    c.send(0, wire::CMD_READ, 7, SIZE, 4096, b"").await;
    assert_eq!(c.s.read_u32().await.unwrap(), wire::STRUCTURED_REPLY_MAGIC);
    assert_eq!(c.s.read_u16().await.unwrap(), wire::REPLY_FLAG_DONE);
    assert_eq!(c.s.read_u16().await.unwrap(), wire::REPLY_TYPE_ERROR);
    assert_eq!(c.s.read_u64().await.unwrap(), 7);
    let len = c.s.read_u32().await.unwrap();
    assert_eq!(c.s.read_u32().await.unwrap(), wire::EINVAL);
    let msg_len = c.s.read_u16().await.unwrap();
    assert_eq!(u32::from(msg_len) + 6, len);
    let mut msg = vec![0u8; msg_len as usize];
    c.s.read_exact(&mut msg).await.unwrap();
    assert!(String::from_utf8(msg).unwrap().contains("beyond the end"));
    // No meta context was selected: BLOCK_STATUS is refused, simply or structurally.
    c.send(0, wire::CMD_BLOCK_STATUS, 8, 0, 4096, b"").await;
    let magic = c.s.read_u32().await.unwrap();
    assert!(magic == wire::SIMPLE_REPLY_MAGIC || magic == wire::STRUCTURED_REPLY_MAGIC);
}

#[tokio::test]
async fn oversized_option_gets_too_big_and_negotiation_continues() {
    let f = serve().await;
    let mut c = Client::handshake_only(f.addr).await;
    c.option(wire::OPT_LIST, &vec![0u8; 1 << 20]).await;
    assert_eq!(
        c.option_replies().await.last().unwrap().0,
        wire::REP_ERR_TOO_BIG
    );
    c.option(wire::OPT_LIST, b"").await;
    let r = c.option_replies().await;
    assert_eq!(r[0].0, wire::REP_SERVER);
    assert_eq!(&r[0].1[4..], b"vm1in-memory export vm1");
    c.option(wire::OPT_ABORT, b"").await;
    assert_eq!(c.option_replies().await[0].0, wire::REP_ACK);
}

#[tokio::test]
async fn read_only_export_refuses_writes_with_eperm() {
    use roamdisk_nbd::file::FileCatalog;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro.img");
    std::fs::write(&path, vec![1u8; 1 << 20]).unwrap();
    let catalog = Arc::new(FileCatalog::new(&path, "vm1", "", true).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = Server::new(catalog, shutdown.clone());
    tokio::spawn(async move { server.serve_tcp(listener).await.unwrap() });
    let mut c = Client::connect(addr, false).await;
    c.send(0, wire::CMD_WRITE, 1, 0, 4096, &[9; 4096]).await;
    assert_eq!(c.simple_reply(0).await.error, wire::EPERM);
    c.send(0, wire::CMD_TRIM, 2, 0, 4096, b"").await;
    assert_eq!(
        c.simple_reply(0).await.error,
        wire::EPERM,
        "spec: EPERM for TRIM on a read-only export"
    );
    c.send(0, wire::CMD_READ, 3, 0, 4096, b"").await;
    assert_eq!(c.simple_reply(4096).await.data, vec![1u8; 4096]);
    shutdown.cancel();
}

#[tokio::test]
async fn shutdown_finishes_in_flight_and_stops_listening() {
    let f = serve().await;
    let mut c = Client::connect(f.addr, false).await;
    c.send(0, wire::CMD_WRITE, 1, 0, 4096, &[5; 4096]).await;
    assert_eq!(c.simple_reply(0).await.error, 0);
    f.shutdown.cancel();
    f.server.await.unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(c.s.read(&mut buf).await.unwrap(), 0);
    assert!(
        TcpStream::connect(f.addr).await.is_err(),
        "listener must be closed"
    );
}
