//! Transmission phase as sans-I/O pieces: decode a request from a buffer, validate it
//! against what was negotiated, encode replies into an output queue.
//!
//! Invariants:
//! - `RequestDecoder` never buffers more than one header plus
//!   `limits::REQUEST_PAYLOAD_MAX_BYTES` of payload; a larger WRITE payload is counted
//!   off and dropped as it arrives, and the request is answered with `EINVAL`.
//! - `validate` runs before any backend call; a request reaching a backend is in range,
//!   uses only negotiated features and flags, and is aligned when the client agreed to
//!   block sizes (as nbdkit's `validate_request` does before `handle_request`).
//! - Once structured replies are negotiated, every READ reply is structured; the chunks
//!   of one read cover its range exactly once, in order, and the last carries DONE.

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::backend::{Extent, ReadChunk, ZeroFlags};
use crate::handshake::Negotiated;
use crate::{limits, wire};

/// A request header with its payload, as it came off the wire (not yet validated).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
    /// WRITE payload, exactly `len` bytes.
    pub payload: Option<Bytes>,
}

/// What the decoder produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Request(Request),
    /// A WRITE whose payload exceeded the limit; the payload has been discarded and the
    /// request must be answered with this errno.
    Rejected {
        cookie: u64,
        errno: u32,
    },
}

/// The stream is not NBD: the connection must be closed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic {0:#010x}")]
pub struct BadMagic(pub u32);

#[derive(Default)]
pub struct RequestDecoder {
    /// Bytes of an oversized WRITE payload still to drop, and whose request it was.
    discarding: Option<(u64, u32)>,
}

impl RequestDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes the next request from `buf`, consuming it. `Ok(None)` means more bytes
    /// are needed; [`RequestDecoder::wanted`] says how many in total.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, BadMagic> {
        if let Some((cookie, remaining)) = self.discarding {
            let n = remaining.min(u32::try_from(buf.len()).unwrap_or(u32::MAX));
            buf.advance(n as usize);
            if n < remaining {
                self.discarding = Some((cookie, remaining - n));
                return Ok(None);
            }
            self.discarding = None;
            return Ok(Some(Decoded::Rejected {
                cookie,
                errno: wire::EINVAL,
            }));
        }
        if buf.len() < wire::REQUEST_HEADER_BYTES {
            return Ok(None);
        }
        let mut h = &buf[..wire::REQUEST_HEADER_BYTES];
        let magic = h.get_u32();
        if magic != wire::REQUEST_MAGIC {
            return Err(BadMagic(magic));
        }
        let flags = h.get_u16();
        let command = h.get_u16();
        let cookie = h.get_u64();
        let offset = h.get_u64();
        let len = h.get_u32();
        if command == wire::CMD_WRITE {
            if len > limits::REQUEST_PAYLOAD_MAX_BYTES {
                buf.advance(wire::REQUEST_HEADER_BYTES);
                self.discarding = Some((cookie, len));
                return self.decode(buf);
            }
            let total = wire::REQUEST_HEADER_BYTES + len as usize;
            if buf.len() < total {
                return Ok(None);
            }
            buf.advance(wire::REQUEST_HEADER_BYTES);
            let payload = buf.split_to(len as usize).freeze();
            return Ok(Some(Decoded::Request(Request {
                flags,
                command,
                cookie,
                offset,
                len,
                payload: Some(payload),
            })));
        }
        buf.advance(wire::REQUEST_HEADER_BYTES);
        Ok(Some(Decoded::Request(Request {
            flags,
            command,
            cookie,
            offset,
            len,
            payload: None,
        })))
    }

    /// Total bytes `buf` must hold for the next `decode` to make progress.
    pub fn wanted(&self, buf: &[u8]) -> usize {
        if self.discarding.is_some() {
            return 1;
        }
        if buf.len() < wire::REQUEST_HEADER_BYTES {
            return wire::REQUEST_HEADER_BYTES;
        }
        let command = u16::from_be_bytes([buf[6], buf[7]]);
        let len = u32::from_be_bytes([buf[24], buf[25], buf[26], buf[27]]);
        if command == wire::CMD_WRITE && len <= limits::REQUEST_PAYLOAD_MAX_BYTES {
            wire::REQUEST_HEADER_BYTES + len as usize
        } else {
            wire::REQUEST_HEADER_BYTES
        }
    }
}

/// Per-connection facts that validation needs.
#[derive(Clone, Debug)]
pub struct Session {
    pub size: u64,
    pub read_only: bool,
    pub minimum_block: u32,
    pub negotiated: Negotiated,
}

/// A validated request.
#[derive(Debug, PartialEq, Eq)]
pub enum Op {
    Read {
        offset: u64,
        len: u32,
        df: bool,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        flags: ZeroFlags,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
    Cache {
        offset: u64,
        len: u32,
    },
    Disconnect,
}

/// A refused request: the errno and a message for the client and the log.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub errno: u32,
    pub message: &'static str,
}

fn refuse(errno: u32, message: &'static str) -> Refusal {
    Refusal { errno, message }
}

/// Checks a request against the session. Mirrors nbdkit's `validate_request`.
pub fn validate(req: Request, s: &Session) -> Result<Op, Refusal> {
    let tflags = s.negotiated.transmission_flags;
    let has = |f: u16| tflags & f != 0;
    let fua_ok = has(wire::FLAG_SEND_FUA);

    // Flags valid per command. FUA is accepted on every command once negotiated
    // (clients are known to send it on reads), and ignored where nothing is written.
    let mut allowed = if fua_ok { wire::CMD_FLAG_FUA } else { 0 };
    match req.command {
        wire::CMD_READ if has(wire::FLAG_SEND_DF) => allowed |= wire::CMD_FLAG_DF,
        wire::CMD_WRITE_ZEROES => {
            allowed |= wire::CMD_FLAG_NO_HOLE;
            if has(wire::FLAG_SEND_FAST_ZERO) {
                allowed |= wire::CMD_FLAG_FAST_ZERO;
            }
        }
        wire::CMD_BLOCK_STATUS => allowed |= wire::CMD_FLAG_REQ_ONE,
        _ => {}
    }
    if req.flags & !allowed != 0 {
        return Err(refuse(
            wire::EINVAL,
            "command flag not valid for this command",
        ));
    }
    let fua = req.flags & wire::CMD_FLAG_FUA != 0;

    let needs_range = matches!(
        req.command,
        wire::CMD_READ
            | wire::CMD_WRITE
            | wire::CMD_TRIM
            | wire::CMD_WRITE_ZEROES
            | wire::CMD_BLOCK_STATUS
            | wire::CMD_CACHE
    );
    if needs_range {
        let writes = matches!(
            req.command,
            wire::CMD_WRITE | wire::CMD_TRIM | wire::CMD_WRITE_ZEROES
        );
        if writes && s.read_only {
            return Err(refuse(wire::EPERM, "export is read-only"));
        }
        let end = req.offset.checked_add(u64::from(req.len));
        if end.is_none_or(|end| end > s.size) {
            let errno = if matches!(req.command, wire::CMD_WRITE | wire::CMD_WRITE_ZEROES) {
                wire::ENOSPC
            } else {
                wire::EINVAL
            };
            return Err(refuse(
                errno,
                "request extends beyond the end of the export",
            ));
        }
        if s.negotiated.block_size_agreed {
            let min = u64::from(s.minimum_block);
            if req.offset % min != 0 || u64::from(req.len) % min != 0 {
                return Err(refuse(
                    wire::EINVAL,
                    "request not aligned to the minimum block size",
                ));
            }
        }
    }

    let df = req.flags & wire::CMD_FLAG_DF != 0;
    match req.command {
        wire::CMD_READ => {
            if req.len > limits::REQUEST_PAYLOAD_MAX_BYTES {
                let errno = if s.negotiated.structured_replies {
                    wire::EOVERFLOW
                } else {
                    wire::EINVAL
                };
                return Err(refuse(errno, "read longer than the maximum payload"));
            }
            Ok(Op::Read {
                offset: req.offset,
                len: req.len,
                df,
            })
        }
        wire::CMD_WRITE => {
            let data = req
                .payload
                .expect("decoder attaches a payload to every WRITE");
            assert_eq!(data.len(), req.len as usize);
            Ok(Op::Write {
                offset: req.offset,
                data,
                fua,
            })
        }
        wire::CMD_FLUSH => {
            if !has(wire::FLAG_SEND_FLUSH) {
                return Err(refuse(wire::EINVAL, "flush not negotiated"));
            }
            if req.offset != 0 || req.len != 0 {
                return Err(refuse(wire::EINVAL, "flush offset and length must be zero"));
            }
            Ok(Op::Flush)
        }
        wire::CMD_TRIM => {
            if !has(wire::FLAG_SEND_TRIM) {
                return Err(refuse(wire::EINVAL, "trim not negotiated"));
            }
            Ok(Op::Trim {
                offset: req.offset,
                len: req.len,
                fua,
            })
        }
        wire::CMD_WRITE_ZEROES => {
            if !has(wire::FLAG_SEND_WRITE_ZEROES) {
                return Err(refuse(wire::EINVAL, "write zeroes not negotiated"));
            }
            let flags = ZeroFlags {
                fua,
                no_hole: req.flags & wire::CMD_FLAG_NO_HOLE != 0,
                fast: req.flags & wire::CMD_FLAG_FAST_ZERO != 0,
            };
            Ok(Op::WriteZeroes {
                offset: req.offset,
                len: req.len,
                flags,
            })
        }
        wire::CMD_BLOCK_STATUS => {
            if !s.negotiated.base_allocation {
                return Err(refuse(wire::EINVAL, "no metadata context was negotiated"));
            }
            if req.len == 0 {
                return Err(refuse(wire::EINVAL, "block status of zero length"));
            }
            Ok(Op::BlockStatus {
                offset: req.offset,
                len: req.len,
                req_one: req.flags & wire::CMD_FLAG_REQ_ONE != 0,
            })
        }
        wire::CMD_CACHE => Ok(Op::Cache {
            offset: req.offset,
            len: req.len,
        }),
        wire::CMD_DISC => Ok(Op::Disconnect),
        _ => Err(refuse(wire::EINVAL, "unknown command")),
    }
}

/// Bytes waiting for the socket, as a queue of segments so that read data is never
/// copied into a contiguous buffer. Headers are carved out of one scratch buffer.
#[derive(Default)]
pub struct OutQueue {
    segments: VecDeque<Bytes>,
    bytes: usize,
    scratch: BytesMut,
}

static ZEROES: [u8; 65536] = [0; 65536];

impl OutQueue {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    pub fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.bytes += b.len();
            self.segments.push_back(b);
        }
    }

    fn push_scratch(&mut self) {
        let b = self.scratch.split().freeze();
        self.push(b);
    }

    fn push_zeroes(&mut self, mut n: usize) {
        while n > 0 {
            let k = n.min(ZEROES.len());
            self.push(Bytes::from_static(&ZEROES[..k]));
            n -= k;
        }
    }

    /// Up to `max` leading segments (cheap reference-counted clones) for a vectored
    /// write; the caller then calls [`OutQueue::consume`] with what was written.
    pub fn front(&self, max: usize) -> Vec<Bytes> {
        self.segments.iter().take(max).cloned().collect()
    }

    /// Drops `n` written bytes from the front.
    pub fn consume(&mut self, mut n: usize) {
        assert!(n <= self.bytes);
        self.bytes -= n;
        while n > 0 {
            let front = self
                .segments
                .front_mut()
                .expect("consume past end of queue");
            if front.len() <= n {
                n -= front.len();
                self.segments.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }

    /// A simple reply with no payload.
    pub fn simple(&mut self, cookie: u64, errno: u32) {
        self.scratch.put_u32(wire::SIMPLE_REPLY_MAGIC);
        self.scratch.put_u32(errno);
        self.scratch.put_u64(cookie);
        self.push_scratch();
    }

    fn chunk_header(&mut self, flags: u16, ty: u16, cookie: u64, len: u32) {
        self.scratch.put_u32(wire::STRUCTURED_REPLY_MAGIC);
        self.scratch.put_u16(flags);
        self.scratch.put_u16(ty);
        self.scratch.put_u64(cookie);
        self.scratch.put_u32(len);
    }

    /// Success for anything but READ and BLOCK_STATUS.
    pub fn ok(&mut self, cookie: u64) {
        self.simple(cookie, 0);
    }

    /// An error reply. With structured replies it carries `message` (required for
    /// READ, preferred otherwise); without, it is a simple reply.
    pub fn error(&mut self, structured: bool, cookie: u64, errno: u32, message: &str) {
        assert_ne!(errno, 0);
        if !structured {
            self.simple(cookie, errno);
            return;
        }
        let msg = &message.as_bytes()[..message.len().min(limits::ERROR_MESSAGE_MAX_BYTES)];
        self.chunk_header(
            wire::REPLY_FLAG_DONE,
            wire::REPLY_TYPE_ERROR,
            cookie,
            6 + msg.len() as u32,
        );
        self.scratch.put_u32(errno);
        self.scratch.put_u16(msg.len() as u16);
        self.scratch.put_slice(msg);
        self.push_scratch();
    }

    /// A successful READ of `offset..offset+len` made of `chunks` (which must cover the
    /// range exactly).
    pub fn read(
        &mut self,
        structured: bool,
        df: bool,
        cookie: u64,
        offset: u64,
        len: u32,
        chunks: Vec<ReadChunk>,
    ) {
        assert_eq!(
            chunks.iter().map(|c| u64::from(c.len())).sum::<u64>(),
            u64::from(len)
        );
        if !structured {
            self.simple(cookie, 0);
            for c in chunks {
                match c {
                    ReadChunk::Data(b) => self.push(b),
                    ReadChunk::Zero(n) => self.push_zeroes(n as usize),
                }
            }
            return;
        }
        if len == 0 || chunks.is_empty() {
            self.chunk_header(wire::REPLY_FLAG_DONE, wire::REPLY_TYPE_NONE, cookie, 0);
            self.push_scratch();
            return;
        }
        if df && chunks.len() > 1 {
            // One content chunk with the zeros written out.
            self.chunk_header(
                wire::REPLY_FLAG_DONE,
                wire::REPLY_TYPE_OFFSET_DATA,
                cookie,
                8 + len,
            );
            self.scratch.put_u64(offset);
            self.push_scratch();
            for c in chunks {
                match c {
                    ReadChunk::Data(b) => self.push(b),
                    ReadChunk::Zero(n) => self.push_zeroes(n as usize),
                }
            }
            return;
        }
        let last = chunks.len() - 1;
        let mut at = offset;
        for (i, c) in chunks.into_iter().enumerate() {
            let flags = if i == last { wire::REPLY_FLAG_DONE } else { 0 };
            let n = c.len();
            assert!(n > 0, "empty read chunk");
            match c {
                ReadChunk::Data(b) => {
                    self.chunk_header(flags, wire::REPLY_TYPE_OFFSET_DATA, cookie, 8 + n);
                    self.scratch.put_u64(at);
                    self.push_scratch();
                    self.push(b);
                }
                ReadChunk::Zero(n) => {
                    self.chunk_header(flags, wire::REPLY_TYPE_OFFSET_HOLE, cookie, 12);
                    self.scratch.put_u64(at);
                    self.scratch.put_u32(n);
                    self.push_scratch();
                }
            }
            at += u64::from(n);
        }
    }

    /// A successful BLOCK_STATUS reply for the one context we serve.
    pub fn block_status(&mut self, cookie: u64, extents: &[Extent]) {
        assert!(!extents.is_empty());
        let len = 4 + 8 * extents.len();
        self.chunk_header(
            wire::REPLY_FLAG_DONE,
            wire::REPLY_TYPE_BLOCK_STATUS,
            cookie,
            len as u32,
        );
        self.scratch.put_u32(wire::META_BASE_ALLOCATION_ID);
        for e in extents {
            assert!(e.length > 0);
            self.scratch.put_u32(e.length);
            self.scratch.put_u32(e.flags);
        }
        self.push_scratch();
    }
}

/// Shapes a backend's extents into a valid reply: drops empty extents, merges
/// neighbours with equal flags, clips to the request when REQ_ONE is set, and never
/// returns an empty list (an empty answer becomes one "allocated, unknown" extent,
/// which the spec says is always safe).
pub fn normalize_extents(mut extents: Vec<Extent>, len: u32, req_one: bool) -> Vec<Extent> {
    extents.retain(|e| e.length > 0);
    let mut merged: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents {
        match merged.last_mut() {
            Some(last) if last.flags == e.flags && last.length.checked_add(e.length).is_some() => {
                last.length += e.length;
            }
            _ => merged.push(e),
        }
    }
    if merged.is_empty() {
        merged.push(Extent {
            length: len,
            flags: 0,
        });
    }
    if req_one {
        merged.truncate(1);
        merged[0].length = merged[0].length.min(len);
    }
    merged.truncate(limits::BLOCK_STATUS_EXTENTS_MAX);
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(flags: u16, command: u16, cookie: u64, offset: u64, len: u32) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u32(wire::REQUEST_MAGIC);
        b.put_u16(flags);
        b.put_u16(command);
        b.put_u64(cookie);
        b.put_u64(offset);
        b.put_u32(len);
        b
    }

    fn session(structured: bool, agreed: bool) -> Session {
        let info = crate::mem::MemCatalog::single("x", 1 << 20).lookup_info();
        Session {
            size: 1 << 20,
            read_only: false,
            minimum_block: 4096,
            negotiated: Negotiated {
                structured_replies: structured,
                base_allocation: structured,
                block_size_agreed: agreed,
                transmission_flags: info.transmission_flags(structured),
            },
        }
    }

    #[test]
    fn decodes_write_only_when_payload_complete() {
        let mut d = RequestDecoder::new();
        let mut b = header(0, wire::CMD_WRITE, 7, 0, 4);
        b.put_slice(&[1, 2, 3]);
        assert_eq!(d.decode(&mut b), Ok(None));
        assert_eq!(d.wanted(&b), 32);
        b.put_u8(4);
        let Some(Decoded::Request(r)) = d.decode(&mut b).unwrap() else {
            panic!()
        };
        assert_eq!(r.payload.as_deref(), Some(&[1u8, 2, 3, 4][..]));
        assert!(b.is_empty());
    }

    #[test]
    fn oversized_write_is_discarded_then_rejected() {
        let mut d = RequestDecoder::new();
        let big = limits::REQUEST_PAYLOAD_MAX_BYTES + 10;
        let mut b = header(0, wire::CMD_WRITE, 9, 0, big);
        b.put_bytes(0xaa, 1000);
        assert_eq!(d.decode(&mut b), Ok(None));
        assert!(b.is_empty(), "discarded bytes must not be buffered");
        b.put_bytes(0xaa, (big - 1000) as usize);
        // Next request follows directly.
        b.extend_from_slice(&header(0, wire::CMD_FLUSH, 10, 0, 0));
        assert_eq!(
            d.decode(&mut b),
            Ok(Some(Decoded::Rejected {
                cookie: 9,
                errno: wire::EINVAL
            }))
        );
        let Some(Decoded::Request(r)) = d.decode(&mut b).unwrap() else {
            panic!()
        };
        assert_eq!(r.cookie, 10);
    }

    #[test]
    fn bad_magic_is_fatal() {
        let mut d = RequestDecoder::new();
        let mut b = BytesMut::from(&[0u8; 28][..]);
        assert_eq!(d.decode(&mut b), Err(BadMagic(0)));
    }

    fn req(flags: u16, command: u16, offset: u64, len: u32) -> Request {
        let payload = (command == wire::CMD_WRITE).then(|| Bytes::from(vec![0u8; len as usize]));
        Request {
            flags,
            command,
            cookie: 1,
            offset,
            len,
            payload,
        }
    }

    #[test]
    fn validation_errnos_follow_the_spec() {
        let s = session(true, true);
        let e = |r| validate(r, &s).unwrap_err().errno;
        assert_eq!(e(req(0, wire::CMD_READ, 1 << 20, 4096)), wire::EINVAL);
        assert_eq!(e(req(0, wire::CMD_WRITE, 1 << 20, 4096)), wire::ENOSPC);
        assert_eq!(
            e(req(0, wire::CMD_WRITE_ZEROES, (1 << 20) - 4096, 8192)),
            wire::ENOSPC
        );
        assert_eq!(e(req(0, wire::CMD_READ, u64::MAX - 10, 4096)), wire::EINVAL);
        assert_eq!(e(req(0, wire::CMD_READ, 512, 4096)), wire::EINVAL);
        assert_eq!(e(req(0, 42, 0, 0)), wire::EINVAL);
        assert_eq!(e(req(1 << 9, wire::CMD_READ, 0, 4096)), wire::EINVAL);
        assert_eq!(
            e(req(wire::CMD_FLAG_REQ_ONE, wire::CMD_READ, 0, 4096)),
            wire::EINVAL
        );
        assert_eq!(e(req(0, wire::CMD_FLUSH, 4096, 0)), wire::EINVAL);
        assert_eq!(e(req(0, wire::CMD_BLOCK_STATUS, 0, 0)), wire::EINVAL);
        // FUA is accepted (and ignored) on a read.
        assert!(validate(req(wire::CMD_FLAG_FUA, wire::CMD_READ, 0, 4096), &s).is_ok());
        // A client that did not agree to block sizes may send unaligned requests.
        let loose = session(false, false);
        assert!(validate(req(0, wire::CMD_WRITE, 3, 5), &loose).is_ok());
        assert_eq!(
            validate(req(wire::CMD_FLAG_DF, wire::CMD_READ, 0, 8), &loose)
                .unwrap_err()
                .errno,
            wire::EINVAL
        );
        assert_eq!(
            validate(req(0, wire::CMD_BLOCK_STATUS, 0, 8), &loose)
                .unwrap_err()
                .errno,
            wire::EINVAL
        );
    }

    fn drain(q: &OutQueue) -> Vec<u8> {
        q.segments.iter().flat_map(|b| b.iter().copied()).collect()
    }

    #[test]
    fn structured_read_uses_holes_and_marks_last_chunk_done() {
        let mut q = OutQueue::new();
        let chunks = vec![
            ReadChunk::Data(Bytes::from_static(b"abcd")),
            ReadChunk::Zero(4096),
        ];
        q.read(true, false, 5, 100, 4100, chunks);
        let v = drain(&q);
        // chunk 1: header(20) + offset(8) + 4 data
        assert_eq!(u16::from_be_bytes([v[4], v[5]]), 0);
        assert_eq!(
            u16::from_be_bytes([v[6], v[7]]),
            wire::REPLY_TYPE_OFFSET_DATA
        );
        let second = &v[32..];
        assert_eq!(
            u16::from_be_bytes([second[4], second[5]]),
            wire::REPLY_FLAG_DONE
        );
        assert_eq!(
            u16::from_be_bytes([second[6], second[7]]),
            wire::REPLY_TYPE_OFFSET_HOLE
        );
        assert_eq!(u64::from_be_bytes(second[20..28].try_into().unwrap()), 104);
        assert_eq!(q.bytes(), v.len());
    }

    #[test]
    fn df_read_is_one_content_chunk() {
        let mut q = OutQueue::new();
        let chunks = vec![
            ReadChunk::Zero(4096),
            ReadChunk::Data(Bytes::from_static(b"xy")),
        ];
        q.read(true, true, 5, 0, 4098, chunks);
        let v = drain(&q);
        assert_eq!(v.len(), 20 + 8 + 4098);
        assert_eq!(u32::from_be_bytes(v[16..20].try_into().unwrap()), 8 + 4098);
        assert_eq!(&v[v.len() - 2..], b"xy");
    }

    #[test]
    fn consume_handles_partial_segments() {
        let mut q = OutQueue::new();
        q.push(Bytes::from_static(b"hello"));
        q.push(Bytes::from_static(b"world"));
        q.consume(7);
        assert_eq!(drain(&q), b"rld");
        assert_eq!(q.bytes(), 3);
    }

    #[test]
    fn extents_are_merged_clipped_and_never_empty() {
        let e = |length, flags| Extent { length, flags };
        assert_eq!(
            normalize_extents(vec![e(4096, 3), e(4096, 3), e(0, 0), e(10, 0)], 100, false),
            vec![e(8192, 3), e(10, 0)]
        );
        assert_eq!(
            normalize_extents(vec![e(8192, 3), e(10, 0)], 100, true),
            vec![e(100, 3)]
        );
        assert_eq!(normalize_extents(vec![], 77, false), vec![e(77, 0)]);
    }
}
