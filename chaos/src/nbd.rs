//! A small synchronous NBD client: blocking I/O on a [`TcpStream`], one request in
//! flight, simple replies only.
//!
//! The handshake is fixed newstyle with `NBD_OPT_GO` (see `doc/proto.md` of the NBD
//! project, and our server in `nbd-server/src/handshake.rs`). Structured replies are
//! never negotiated, so every transmission reply is a 16-byte simple reply, followed by
//! the data for a successful read.
//!
//! Everything the server sends is validated: magics, option numbers, reply cookies,
//! lengths (option replies and reads are bounded). Every operation runs under a
//! deadline of the connection's timeout. After any error the connection is marked
//! broken and every later call fails at once: the stream may be out of step with the
//! server, and the caller is expected to reconnect.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};

/// Protocol constants: the server's (`roamdisk_nbd::wire`, named as `doc/proto.md` names
/// them without the `NBD_` prefix), plus the error bit of option replies.
mod wire {
    pub use roamdisk_nbd::wire::*;
    pub const REP_FLAG_ERROR: u32 = 1 << 31;
}

/// Largest read or write this client issues or accepts.
pub const MAX_IO_BYTES: u32 = 32 << 20;
/// Largest option reply payload accepted during the handshake.
const MAX_OPTION_REPLY_BYTES: u32 = 64 << 10;
/// Most option replies accepted for one `NBD_OPT_GO` before giving up.
const MAX_OPTION_REPLIES: u32 = 64;
/// Longest export name the spec allows.
const MAX_EXPORT_NAME_BYTES: usize = 4096;
/// How much of a server's error message is kept in our error.
const MAX_MESSAGE_CHARS: usize = 200;

/// An NBD connection in transmission phase.
pub struct NbdConn {
    stream: TcpStream,
    /// `host:port` as given, for error messages.
    addr: String,
    export: String,
    size: u64,
    flags: u16,
    timeout: Duration,
    next_cookie: u64,
    /// Set by any failed call; the connection then refuses every operation.
    broken: bool,
}

impl NbdConn {
    /// Connects to `addr` (`host:port`) and negotiates `export` with `NBD_OPT_GO`.
    /// `timeout` bounds the TCP connect, the whole handshake, and later each operation.
    pub fn connect(addr: &str, export: &str, timeout: Duration) -> Result<NbdConn> {
        ensure!(
            export.len() <= MAX_EXPORT_NAME_BYTES,
            "export name is {} bytes, more than {MAX_EXPORT_NAME_BYTES}",
            export.len()
        );
        ensure!(!timeout.is_zero(), "NBD timeout must not be zero");
        let deadline = Instant::now() + timeout;
        let stream = tcp_connect(addr, timeout).with_context(|| format!("connect to {addr}"))?;
        stream
            .set_nodelay(true)
            .with_context(|| format!("set TCP_NODELAY on {addr}"))?;
        let mut io = Io {
            stream: &stream,
            deadline,
        };
        let (size, flags) = handshake(&mut io, export)
            .with_context(|| format!("NBD handshake with {addr} for export {export:?}"))?;
        Ok(NbdConn {
            stream,
            addr: addr.to_owned(),
            export: export.to_owned(),
            size,
            flags,
            timeout,
            next_cookie: 1,
            broken: false,
        })
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags the server sent (`NBD_FLAG_*`).
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// `host:port` this connection was made to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Whether an earlier error made this connection unusable.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>> {
        let what = format!("NBD read of {len} bytes at {offset}");
        self.guard(&what, |c| {
            ensure!(len <= MAX_IO_BYTES, "read larger than {MAX_IO_BYTES} bytes");
            let mut data = vec![0u8; len as usize];
            c.exchange(wire::CMD_READ, offset, len, &[], Some(&mut data))?;
            Ok(data)
        })
    }

    /// Writes `data` at `offset`; returns once the server acknowledged it.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let what = format!("NBD write of {} bytes at {offset}", data.len());
        self.guard(&what, |c| {
            let len = u32::try_from(data.len())
                .ok()
                .filter(|&n| n <= MAX_IO_BYTES)
                .ok_or_else(|| anyhow!("write larger than {MAX_IO_BYTES} bytes"))?;
            ensure!(c.flags & wire::FLAG_READ_ONLY == 0, "export is read-only");
            c.exchange(wire::CMD_WRITE, offset, len, data, None)
        })
    }

    /// Asks the server to make every acknowledged write durable (`NBD_CMD_FLUSH`).
    pub fn flush(&mut self) -> Result<()> {
        self.guard("NBD flush", |c| {
            ensure!(
                c.flags & wire::FLAG_SEND_FLUSH != 0,
                "server does not support flush"
            );
            c.exchange(wire::CMD_FLUSH, 0, 0, &[], None)
        })
    }

    /// Runs `f` unless the connection is broken; marks it broken if `f` fails, and
    /// adds what was attempted and where to the error.
    fn guard<T>(&mut self, what: &str, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if self.broken {
            bail!(
                "{what} on {} ({:?}): connection is broken by an earlier error",
                self.addr,
                self.export
            );
        }
        let result = f(self);
        if result.is_err() {
            self.broken = true;
            let _ = self.stream.shutdown(Shutdown::Both);
        }
        result.with_context(|| format!("{what} on {} ({:?})", self.addr, self.export))
    }

    /// Sends one request (with `payload`, for a write) and reads its simple reply and,
    /// for a successful read, the data into `data`; all within one timeout.
    fn exchange(
        &mut self,
        cmd: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
        data: Option<&mut [u8]>,
    ) -> Result<()> {
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        let mut io = Io {
            stream: &self.stream,
            deadline: Instant::now() + self.timeout,
        };
        let mut buf = Vec::with_capacity(REQUEST_HEADER_BYTES + payload.len());
        buf.extend_from_slice(&request_header(cmd, cookie, offset, len));
        buf.extend_from_slice(payload);
        io.write_all(&buf).context("send request")?;
        receive_reply(&mut io, cookie)?;
        if let Some(data) = data {
            io.read_exact(data).context("read data")?;
        }
        Ok(())
    }
}

impl Drop for NbdConn {
    /// Sends `NBD_CMD_DISC` (best effort) so the server ends the session cleanly.
    fn drop(&mut self) {
        if !self.broken {
            let header = request_header(wire::CMD_DISC, self.next_cookie, 0, 0);
            let mut io = Io {
                stream: &self.stream,
                deadline: Instant::now() + self.timeout.min(Duration::from_secs(1)),
            };
            let _ = io.write_all(&header);
        }
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// Size of a request header on the wire.
const REQUEST_HEADER_BYTES: usize = 28;

/// The request header (command flags are always 0: no FUA, no other flags).
fn request_header(cmd: u16, cookie: u64, offset: u64, len: u32) -> [u8; REQUEST_HEADER_BYTES] {
    let mut h = [0u8; REQUEST_HEADER_BYTES];
    h[0..4].copy_from_slice(&wire::REQUEST_MAGIC.to_be_bytes());
    h[6..8].copy_from_slice(&cmd.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

/// Reads a simple reply and checks it answers `cookie` with success.
fn receive_reply(io: &mut Io<'_>, cookie: u64) -> Result<()> {
    let magic = io.u32().context("read reply header")?;
    match magic {
        wire::SIMPLE_REPLY_MAGIC => {}
        wire::STRUCTURED_REPLY_MAGIC => bail!("structured reply, which was not negotiated"),
        other => bail!("bad reply magic {other:#010x}"),
    }
    let errno = io.u32().context("read reply header")?;
    let got = io.u64().context("read reply header")?;
    ensure!(got == cookie, "reply for cookie {got}, expected {cookie}");
    ensure!(errno == 0, "server error {} ({errno})", errno_name(errno));
    Ok(())
}

/// Name of an NBD error value (the spec allows only these on the wire).
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown error",
    }
}

/// Connects to the first address of `addr` that accepts within `timeout`.
fn tcp_connect(addr: &str, timeout: Duration) -> Result<TcpStream> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .with_context(|| format!("resolve {addr:?}"))?
        .collect();
    let mut last = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => return Ok(s),
            // The caller names `addr`; name the address only when there are several.
            Err(e) if addrs.len() > 1 => last = Some(anyhow!(e).context(format!("{a}"))),
            Err(e) => last = Some(anyhow!(e)),
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("{addr:?} resolves to no address")))
}

/// Fixed-newstyle handshake up to transmission: returns (export size, transmission
/// flags).
fn handshake(io: &mut Io<'_>, export: &str) -> Result<(u64, u16)> {
    let magic = io.u64().context("read greeting")?;
    ensure!(magic == wire::NBDMAGIC, "bad greeting magic {magic:#018x}");
    let magic = io.u64().context("read greeting")?;
    ensure!(
        magic == wire::IHAVEOPT,
        "server is not newstyle (magic {magic:#018x})"
    );
    let server_flags = io.u16().context("read handshake flags")?;
    ensure!(
        server_flags & wire::FLAG_FIXED_NEWSTYLE != 0,
        "server does not speak fixed newstyle (flags {server_flags:#06x})"
    );
    let mut client_flags = wire::FLAG_C_FIXED_NEWSTYLE;
    if server_flags & wire::FLAG_NO_ZEROES != 0 {
        client_flags |= wire::FLAG_C_NO_ZEROES;
    }
    io.write_all(&client_flags.to_be_bytes())
        .context("send client flags")?;
    send_go(io, export)?;
    receive_go_replies(io)
}

/// Sends `NBD_OPT_GO` for `export`, asking for no particular information.
fn send_go(io: &mut Io<'_>, export: &str) -> Result<()> {
    let name = export.as_bytes();
    // Name length (4) + name + number of info requests (2).
    let payload_len = 4 + name.len() + 2;
    let mut buf = Vec::with_capacity(16 + payload_len);
    buf.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
    buf.extend_from_slice(&wire::OPT_GO.to_be_bytes());
    buf.extend_from_slice(&len_u32(payload_len).to_be_bytes());
    buf.extend_from_slice(&len_u32(name.len()).to_be_bytes());
    buf.extend_from_slice(name);
    buf.extend_from_slice(&0u16.to_be_bytes());
    io.write_all(&buf).context("send NBD_OPT_GO")
}

/// Sends `NBD_OPT_ABORT` without waiting for its reply.
fn send_abort(io: &mut Io<'_>) -> io::Result<()> {
    let mut buf = Vec::with_capacity(16);
    buf.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
    buf.extend_from_slice(&wire::OPT_ABORT.to_be_bytes());
    buf.extend_from_slice(&0u32.to_be_bytes());
    io.write_all(&buf)
}

/// Reads option replies to `NBD_OPT_GO` until the ACK; returns (size, flags) from the
/// `NBD_INFO_EXPORT` reply, which the server must send before the ACK.
fn receive_go_replies(io: &mut Io<'_>) -> Result<(u64, u16)> {
    let mut export_info = None;
    for _ in 0..MAX_OPTION_REPLIES {
        let (reply_type, payload) = read_option_reply(io)?;
        match reply_type {
            wire::REP_ACK => {
                let (size, flags) =
                    export_info.ok_or_else(|| anyhow!("NBD_REP_ACK without NBD_INFO_EXPORT"))?;
                ensure!(
                    flags & wire::FLAG_HAS_FLAGS != 0,
                    "transmission flags {flags:#06x} lack NBD_FLAG_HAS_FLAGS"
                );
                return Ok((size, flags));
            }
            wire::REP_INFO => {
                if let Some(info) = parse_info(&payload)? {
                    export_info = Some(info);
                }
            }
            t if t & wire::REP_FLAG_ERROR != 0 => {
                // Say goodbye properly (best effort) so the server does not log an
                // aborted negotiation.
                let _ = send_abort(io);
                bail!("server refused the export: {}", option_error(t, &payload))
            }
            t => bail!("unexpected option reply type {t} to NBD_OPT_GO"),
        }
    }
    bail!("more than {MAX_OPTION_REPLIES} option replies to NBD_OPT_GO")
}

/// Reads one option reply to `NBD_OPT_GO`: (reply type, payload).
fn read_option_reply(io: &mut Io<'_>) -> Result<(u32, Vec<u8>)> {
    let magic = io.u64().context("read option reply")?;
    ensure!(
        magic == wire::OPTION_REPLY_MAGIC,
        "bad option reply magic {magic:#018x}"
    );
    let opt = io.u32().context("read option reply")?;
    ensure!(
        opt == wire::OPT_GO,
        "option reply for option {opt}, expected NBD_OPT_GO"
    );
    let reply_type = io.u32().context("read option reply")?;
    let len = io.u32().context("read option reply")?;
    ensure!(
        len <= MAX_OPTION_REPLY_BYTES,
        "option reply of {len} bytes (limit {MAX_OPTION_REPLY_BYTES})"
    );
    let mut payload = vec![0u8; len as usize];
    io.read_exact(&mut payload)
        .context("read option reply payload")?;
    Ok((reply_type, payload))
}

/// Parses an `NBD_REP_INFO` payload: `Some((size, flags))` for `NBD_INFO_EXPORT`,
/// `None` for information this client does not use.
fn parse_info(payload: &[u8]) -> Result<Option<(u64, u16)>> {
    ensure!(
        payload.len() >= 2,
        "NBD_REP_INFO of {} bytes",
        payload.len()
    );
    let info_type = u16::from_be_bytes([payload[0], payload[1]]);
    if info_type != wire::INFO_EXPORT {
        return Ok(None);
    }
    ensure!(
        payload.len() == 12,
        "NBD_INFO_EXPORT of {} bytes, expected 12",
        payload.len()
    );
    let mut size = [0u8; 8];
    size.copy_from_slice(&payload[2..10]);
    let flags = u16::from_be_bytes([payload[10], payload[11]]);
    Ok(Some((u64::from_be_bytes(size), flags)))
}

/// Describes an `NBD_REP_ERR_*` reply, with the server's message if it sent one.
fn option_error(reply_type: u32, payload: &[u8]) -> String {
    let name = match reply_type & !wire::REP_FLAG_ERROR {
        1 => "NBD_REP_ERR_UNSUP (option not supported)",
        2 => "NBD_REP_ERR_POLICY (forbidden by policy)",
        3 => "NBD_REP_ERR_INVALID (invalid request)",
        4 => "NBD_REP_ERR_PLATFORM (not supported on this platform)",
        5 => "NBD_REP_ERR_TLS_REQD (TLS required)",
        6 => "NBD_REP_ERR_UNKNOWN (unknown export)",
        7 => "NBD_REP_ERR_SHUTDOWN (server shutting down)",
        8 => "NBD_REP_ERR_BLOCK_SIZE_REQD (block size negotiation required)",
        9 => "NBD_REP_ERR_TOO_BIG (request too big)",
        _ => "unknown NBD_REP_ERR",
    };
    let message: String = String::from_utf8_lossy(payload)
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_MESSAGE_CHARS)
        .collect();
    if message.is_empty() {
        format!("{name} [{reply_type:#010x}]")
    } else {
        format!("{name} [{reply_type:#010x}]: {message}")
    }
}

/// Length of something this client built itself, bounded by [`MAX_EXPORT_NAME_BYTES`].
fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Blocking reads and writes on a stream, all finished by one deadline.
struct Io<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl Io<'_> {
    /// Time left before the deadline, as a timed-out error when none is left.
    fn remaining(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "operation timed out",
            ));
        }
        Ok(left)
    }

    fn read_exact(&mut self, mut buf: &mut [u8]) -> io::Result<()> {
        while !buf.is_empty() {
            self.stream.set_read_timeout(Some(self.remaining()?))?;
            match (&mut &*self.stream).read(buf) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "server closed the connection",
                    ))
                }
                Ok(n) => buf = &mut buf[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(timeout_as_timed_out(e)),
            }
        }
        Ok(())
    }

    fn write_all(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            self.stream.set_write_timeout(Some(self.remaining()?))?;
            match (&mut &*self.stream).write(buf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(timeout_as_timed_out(e)),
            }
        }
        Ok(())
    }

    fn u16(&mut self) -> io::Result<u16> {
        let mut b = [0u8; 2];
        self.read_exact(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }

    fn u32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn u64(&mut self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }
}

/// Socket timeouts surface as `WouldBlock` on Unix; report them as timeouts.
fn timeout_as_timed_out(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(io::ErrorKind::TimedOut, "operation timed out")
    } else {
        e
    }
}

/// A `qemu-nbd` serving a temporary raw file, for tests.
#[cfg(test)]
pub(crate) mod qemu {
    use std::net::{TcpListener, TcpStream};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// A running `qemu-nbd`; killed when dropped.
    pub struct QemuNbd {
        child: Child,
        pub addr: String,
        _file: tempfile::NamedTempFile,
    }

    impl QemuNbd {
        /// Serves a zero-filled file of `size` bytes as export `name` on a free port.
        pub fn start(name: &str, size: u64) -> QemuNbd {
            let file = tempfile::NamedTempFile::new().expect("temp file");
            file.as_file().set_len(size).expect("size temp file");
            // The port may be taken between our probe and qemu-nbd's bind: retry.
            for _ in 0..10 {
                let port = free_port();
                let mut child = Command::new("qemu-nbd")
                    .args(["-f", "raw", "-t", "-e", "0", "-b", "127.0.0.1"])
                    .arg("-p")
                    .arg(port.to_string())
                    .arg("-x")
                    .arg(name)
                    .arg(file.path())
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn qemu-nbd");
                let addr = format!("127.0.0.1:{port}");
                if wait_listening(&mut child, &addr, Duration::from_secs(10)) {
                    return QemuNbd {
                        child,
                        addr,
                        _file: file,
                    };
                }
                let _ = child.kill();
                let _ = child.wait();
            }
            panic!("qemu-nbd did not start");
        }
    }

    impl Drop for QemuNbd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// A port in 20000..30000 that was free when probed.
    pub fn free_port() -> u16 {
        let mut rng = fastrand::Rng::new();
        for _ in 0..1000 {
            let port = rng.u16(20000..30000);
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
        panic!("no free port in 20000..30000");
    }

    /// Polls `addr` until it accepts a connection; false if `child` exits or the
    /// deadline passes first.
    fn wait_listening(child: &mut Child, addr: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            let sa = addr.parse().expect("socket address");
            if TcpStream::connect_timeout(&sa, Duration::from_millis(200)).is_ok() {
                return true;
            }
            // Poll interval while qemu-nbd starts up; the loop is bounded by `deadline`.
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::qemu::QemuNbd;
    use super::*;

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn write_read_flush_roundtrip() {
        let q = QemuNbd::start("disk", 1 << 20);
        let mut c = NbdConn::connect(&q.addr, "disk", T).unwrap();
        assert_eq!(c.size(), 1 << 20);
        assert_ne!(c.flags() & wire::FLAG_HAS_FLAGS, 0);
        assert_ne!(c.flags() & wire::FLAG_SEND_FLUSH, 0);
        assert_eq!(c.read(0, 4096).unwrap(), vec![0u8; 4096]);
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
        c.write(4096, &data).unwrap();
        c.flush().unwrap();
        assert_eq!(c.read(4096, 8192).unwrap(), data);
        assert_eq!(c.read(6144, 1024).unwrap(), &data[2048..3072]);
        drop(c);
        // A second connection sees what the first wrote.
        let mut c = NbdConn::connect(&q.addr, "disk", T).unwrap();
        assert_eq!(c.read(4096, 8192).unwrap(), data);
    }

    #[test]
    fn unknown_export_is_reported() {
        let q = QemuNbd::start("disk", 1 << 20);
        let err = NbdConn::connect(&q.addr, "nope", T)
            .err()
            .expect("must fail");
        let msg = format!("{err:#}");
        assert!(msg.contains("NBD_REP_ERR_UNKNOWN"), "{msg}");
        assert!(msg.contains("nope"), "{msg}");
    }

    #[test]
    fn read_beyond_end_fails_and_breaks_connection() {
        let q = QemuNbd::start("disk", 1 << 20);
        let mut c = NbdConn::connect(&q.addr, "disk", T).unwrap();
        let err = c.read((1 << 20) - 512, 4096).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("server error"), "{msg}");
        assert!(c.is_broken());
        let err = c.read(0, 512).unwrap_err();
        assert!(format!("{err:#}").contains("broken"), "{err:#}");
    }

    #[test]
    fn oversized_read_is_refused_locally() {
        let q = QemuNbd::start("disk", 1 << 20);
        let mut c = NbdConn::connect(&q.addr, "disk", T).unwrap();
        let err = c.read(0, MAX_IO_BYTES + 1).unwrap_err();
        assert!(format!("{err:#}").contains("larger than"), "{err:#}");
    }

    #[test]
    fn dead_port_fails_to_connect() {
        let port = qemu::free_port();
        let err = NbdConn::connect(&format!("127.0.0.1:{port}"), "disk", T)
            .err()
            .expect("must fail");
        assert!(format!("{err:#}").contains("connect"), "{err:#}");
    }

    #[test]
    fn silent_server_times_out() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let t0 = Instant::now();
        let err = NbdConn::connect(&addr, "disk", Duration::from_millis(300))
            .err()
            .expect("must fail");
        assert!(t0.elapsed() < Duration::from_secs(3));
        assert!(format!("{err:#}").contains("timed out"), "{err:#}");
        drop(listener);
    }

    #[test]
    fn errno_names() {
        assert_eq!(errno_name(5), "EIO");
        assert_eq!(errno_name(9999), "unknown error");
    }
}
