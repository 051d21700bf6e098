//! Fixed-newstyle handshake as a sans-I/O state machine.
//!
//! The driver writes [`greeting`], reads the client flags and hands them to
//! [`Negotiation::client_flags`], then reads option headers and payloads and hands each
//! to [`Negotiation::option`], writing whatever bytes it appended to `out`. Nothing here
//! touches a socket or a clock, so every path is unit-tested and fuzzed directly.
//!
//! Invariants:
//! - every option except EXPORT_NAME and a successful GO gets exactly one final reply
//!   (ACK or an error), possibly preceded by informational replies;
//! - a client flag we did not advertise, or an unknown export in EXPORT_NAME, ends the
//!   session (the spec gives no way to report those);
//! - the meta-context selection only survives into transmission if it named the export
//!   that GO selects.

use bytes::{BufMut, BytesMut};

use crate::backend::{Catalog, Export, ExportInfo};
use crate::{limits, wire};

/// Handshake flags this server sends.
pub const SERVER_HANDSHAKE_FLAGS: u16 = wire::FLAG_FIXED_NEWSTYLE | wire::FLAG_NO_ZEROES;

/// The first 18 bytes a server sends.
pub fn greeting(out: &mut BytesMut) {
    out.put_u64(wire::NBDMAGIC);
    out.put_u64(wire::IHAVEOPT);
    out.put_u16(SERVER_HANDSHAKE_FLAGS);
}

/// What the client agreed to; carried into transmission.
#[derive(Clone, Debug)]
pub struct Negotiated {
    pub structured_replies: bool,
    /// `base:allocation` was selected for this export.
    pub base_allocation: bool,
    /// The client asked for NBD_INFO_BLOCK_SIZE in GO, so it promised to honour the
    /// minimum block size; unaligned requests from it are errors.
    pub block_size_agreed: bool,
    pub transmission_flags: u16,
}

/// Result of one option.
pub enum Step<B> {
    /// Keep negotiating.
    Continue,
    /// The client aborted (after our ACK, if any, in `out`): close the connection.
    Close,
    /// A hard disconnect is required (protocol violation, unknown export on
    /// EXPORT_NAME); the string says why, for the log.
    Disconnect(String),
    /// Enter transmission with this export.
    Transmission(Export<B>, Negotiated),
}

/// Why the client flags were refused.
#[derive(Debug, PartialEq, Eq)]
pub struct BadClientFlags(pub u32);

#[derive(Default)]
pub struct Negotiation {
    client_no_zeroes: bool,
    structured_replies: bool,
    /// Export name the last SET_META_CONTEXT referred to, and whether it selected
    /// base:allocation.
    meta_selection: Option<(String, bool)>,
    options_seen: u32,
}

impl Negotiation {
    pub fn new() -> Negotiation {
        Negotiation::default()
    }

    /// Validates the 32-bit client flags. Unknown bits, or NO_ZEROES when we had not
    /// offered it, require the server to drop the connection.
    pub fn client_flags(&mut self, flags: u32) -> Result<(), BadClientFlags> {
        let known = wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES;
        if flags & !known != 0 {
            return Err(BadClientFlags(flags));
        }
        self.client_no_zeroes = flags & wire::FLAG_C_NO_ZEROES != 0;
        Ok(())
    }

    /// Handles option `opt` whose payload was too large to buffer (it has already been
    /// discarded by the driver).
    pub fn oversized_option(&mut self, opt: u32, out: &mut BytesMut) -> Option<String> {
        self.options_seen += 1;
        if opt == wire::OPT_EXPORT_NAME {
            return Some("EXPORT_NAME with an oversized name".into());
        }
        if self.options_seen > limits::OPTIONS_PER_HANDSHAKE_MAX {
            return Some("too many options".into());
        }
        option_reply(out, opt, wire::REP_ERR_TOO_BIG, b"option payload too large");
        None
    }

    /// Handles one option with its whole payload.
    pub fn option<C: Catalog>(
        &mut self,
        opt: u32,
        data: &[u8],
        catalog: &C,
        out: &mut BytesMut,
    ) -> Step<C::Backend> {
        self.options_seen += 1;
        if self.options_seen > limits::OPTIONS_PER_HANDSHAKE_MAX {
            return Step::Disconnect(format!(
                "more than {} options",
                limits::OPTIONS_PER_HANDSHAKE_MAX
            ));
        }
        match opt {
            wire::OPT_EXPORT_NAME => self.export_name(data, catalog, out),
            wire::OPT_ABORT => {
                option_reply(out, opt, wire::REP_ACK, b"");
                Step::Close
            }
            wire::OPT_LIST => {
                if !data.is_empty() {
                    option_reply(
                        out,
                        opt,
                        wire::REP_ERR_INVALID,
                        b"NBD_OPT_LIST takes no data",
                    );
                    return Step::Continue;
                }
                for (name, description) in catalog.list() {
                    let mut payload = BytesMut::with_capacity(4 + name.len() + description.len());
                    payload.put_u32(len_u32(name.len()));
                    payload.put_slice(name.as_bytes());
                    payload.put_slice(description.as_bytes());
                    option_reply(out, opt, wire::REP_SERVER, &payload);
                }
                option_reply(out, opt, wire::REP_ACK, b"");
                Step::Continue
            }
            wire::OPT_STARTTLS => {
                if !data.is_empty() {
                    option_reply(
                        out,
                        opt,
                        wire::REP_ERR_INVALID,
                        b"NBD_OPT_STARTTLS takes no data",
                    );
                } else {
                    option_reply(
                        out,
                        opt,
                        wire::REP_ERR_POLICY,
                        b"TLS is not enabled on this server",
                    );
                }
                Step::Continue
            }
            wire::OPT_INFO | wire::OPT_GO => self.info_or_go(opt, data, catalog, out),
            wire::OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    option_reply(
                        out,
                        opt,
                        wire::REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                } else if self.structured_replies {
                    option_reply(
                        out,
                        opt,
                        wire::REP_ERR_INVALID,
                        b"structured replies already negotiated",
                    );
                } else {
                    self.structured_replies = true;
                    option_reply(out, opt, wire::REP_ACK, b"");
                }
                Step::Continue
            }
            wire::OPT_LIST_META_CONTEXT | wire::OPT_SET_META_CONTEXT => {
                self.meta_context(opt, data, catalog, out);
                Step::Continue
            }
            _ => {
                option_reply(out, opt, wire::REP_ERR_UNSUP, b"option not supported");
                Step::Continue
            }
        }
    }

    fn export_name<C: Catalog>(
        &mut self,
        data: &[u8],
        catalog: &C,
        out: &mut BytesMut,
    ) -> Step<C::Backend> {
        let Ok(name) = std::str::from_utf8(data) else {
            return Step::Disconnect("EXPORT_NAME is not UTF-8".into());
        };
        let Some(export) = catalog.lookup(name) else {
            return Step::Disconnect(format!("EXPORT_NAME names unknown export {name:?}"));
        };
        let negotiated = self.negotiated(name, &export.info, false);
        out.put_u64(export.info.size);
        out.put_u16(negotiated.transmission_flags);
        if !self.client_no_zeroes {
            out.put_bytes(0, 124);
        }
        Step::Transmission(export, negotiated)
    }

    fn negotiated(
        &self,
        requested_name: &str,
        info: &ExportInfo,
        block_size_agreed: bool,
    ) -> Negotiated {
        let base_allocation = self.structured_replies
            && matches!(&self.meta_selection, Some((name, true)) if name == requested_name);
        Negotiated {
            structured_replies: self.structured_replies,
            base_allocation,
            block_size_agreed,
            transmission_flags: info.transmission_flags(self.structured_replies),
        }
    }

    fn info_or_go<C: Catalog>(
        &mut self,
        opt: u32,
        data: &[u8],
        catalog: &C,
        out: &mut BytesMut,
    ) -> Step<C::Backend> {
        let mut r = Reader::new(data);
        let parsed = (|| {
            let name = r.string_u32()?;
            let n = r.u16()?;
            let mut requests = Vec::with_capacity(usize::from(n).min(16));
            for _ in 0..n {
                requests.push(r.u16()?);
            }
            r.finish()?;
            Some((name, requests))
        })();
        let Some((name, requests)) = parsed else {
            option_reply(
                out,
                opt,
                wire::REP_ERR_INVALID,
                b"malformed NBD_OPT_INFO/GO payload",
            );
            return Step::Continue;
        };
        let Some(export) = catalog.lookup(&name) else {
            let msg = format!("export {name:?} not found");
            option_reply(out, opt, wire::REP_ERR_UNKNOWN, msg.as_bytes());
            return Step::Continue;
        };
        let info = &export.info;
        let block_size_agreed = requests.contains(&wire::INFO_BLOCK_SIZE);
        let negotiated = self.negotiated(&name, info, block_size_agreed);

        let mut payload = BytesMut::with_capacity(14);
        payload.put_u16(wire::INFO_EXPORT);
        payload.put_u64(info.size);
        payload.put_u16(negotiated.transmission_flags);
        option_reply(out, opt, wire::REP_INFO, &payload);

        // Block sizes are sent whether or not they were asked for, as qemu-nbd does: a
        // client that did not ask may still use them to align.
        payload.clear();
        payload.put_u16(wire::INFO_BLOCK_SIZE);
        payload.put_u32(info.block_sizes.minimum);
        payload.put_u32(info.block_sizes.preferred);
        payload.put_u32(info.block_sizes.maximum);
        option_reply(out, opt, wire::REP_INFO, &payload);

        if requests.contains(&wire::INFO_NAME) {
            payload.clear();
            payload.put_u16(wire::INFO_NAME);
            payload.put_slice(info.name.as_bytes());
            option_reply(out, opt, wire::REP_INFO, &payload);
        }
        if requests.contains(&wire::INFO_DESCRIPTION) && !info.description.is_empty() {
            payload.clear();
            payload.put_u16(wire::INFO_DESCRIPTION);
            payload.put_slice(info.description.as_bytes());
            option_reply(out, opt, wire::REP_INFO, &payload);
        }
        option_reply(out, opt, wire::REP_ACK, b"");
        if opt == wire::OPT_GO {
            Step::Transmission(export, negotiated)
        } else {
            Step::Continue
        }
    }

    fn meta_context<C: Catalog>(&mut self, opt: u32, data: &[u8], catalog: &C, out: &mut BytesMut) {
        let set = opt == wire::OPT_SET_META_CONTEXT;
        if set {
            // "Issuing this command replaces all previously-set metadata contexts
            // (including when this command fails)".
            self.meta_selection = None;
        }
        if !self.structured_replies {
            option_reply(
                out,
                opt,
                wire::REP_ERR_INVALID,
                b"negotiate structured replies first",
            );
            return;
        }
        let mut r = Reader::new(data);
        let parsed = (|| {
            let name = r.string_u32()?;
            let n = r.u32()?;
            Some((name, n))
        })();
        let Some((name, n_queries)) = parsed else {
            option_reply(
                out,
                opt,
                wire::REP_ERR_INVALID,
                b"malformed meta context request",
            );
            return;
        };
        if n_queries > limits::META_QUERIES_MAX {
            option_reply(
                out,
                opt,
                wire::REP_ERR_TOO_BIG,
                b"too many meta context queries",
            );
            return;
        }
        let mut queries = Vec::with_capacity(n_queries as usize);
        for _ in 0..n_queries {
            match r.string_u32() {
                Some(q) => queries.push(q),
                None => {
                    option_reply(
                        out,
                        opt,
                        wire::REP_ERR_INVALID,
                        b"malformed meta context query",
                    );
                    return;
                }
            }
        }
        if r.finish().is_none() {
            option_reply(
                out,
                opt,
                wire::REP_ERR_INVALID,
                b"trailing bytes in meta context request",
            );
            return;
        }
        if catalog.lookup(&name).is_none() {
            let msg = format!("export {name:?} not found");
            option_reply(out, opt, wire::REP_ERR_UNKNOWN, msg.as_bytes());
            return;
        }
        let selects = |q: &str| {
            if set {
                q == wire::META_BASE_ALLOCATION
            } else {
                q == wire::META_BASE_ALLOCATION || q == "base:"
            }
        };
        let chosen = if queries.is_empty() {
            // LIST with no queries lists everything; SET with none selects nothing.
            !set
        } else {
            queries.iter().any(|q| selects(q))
        };
        if chosen {
            let mut payload = BytesMut::new();
            payload.put_u32(if set {
                wire::META_BASE_ALLOCATION_ID
            } else {
                0
            });
            payload.put_slice(wire::META_BASE_ALLOCATION.as_bytes());
            option_reply(out, opt, wire::REP_META_CONTEXT, &payload);
        }
        if set {
            self.meta_selection = Some((name, chosen));
        }
        option_reply(out, opt, wire::REP_ACK, b"");
    }
}

/// Appends one option reply.
pub fn option_reply(out: &mut BytesMut, opt: u32, reply_type: u32, data: &[u8]) {
    out.put_u64(wire::OPTION_REPLY_MAGIC);
    out.put_u32(opt);
    out.put_u32(reply_type);
    out.put_u32(len_u32(data.len()));
    out.put_slice(data);
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).expect("reply payload bounded by option limits")
}

/// Bounds-checked big-endian reader over an option payload; `None` means malformed.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.data.len() < n {
            return None;
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A string prefixed by its 32-bit length: at most 4096 bytes of UTF-8.
    fn string_u32(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        if n > limits::STRING_MAX_BYTES {
            return None;
        }
        let bytes = self.take(n)?;
        std::str::from_utf8(bytes).ok().map(str::to_owned)
    }
    fn finish(&self) -> Option<()> {
        self.data.is_empty().then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::MemCatalog;

    fn go_payload(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32).to_be_bytes());
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            v.extend_from_slice(&i.to_be_bytes());
        }
        v
    }

    /// Parses option replies back out of `out`: (option, type, payload).
    fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !out.is_empty() {
            assert_eq!(
                u64::from_be_bytes(out[..8].try_into().unwrap()),
                wire::OPTION_REPLY_MAGIC
            );
            let opt = u32::from_be_bytes(out[8..12].try_into().unwrap());
            let ty = u32::from_be_bytes(out[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
            v.push((opt, ty, out[20..20 + len].to_vec()));
            out = &out[20 + len..];
        }
        v
    }

    #[test]
    fn go_sends_export_and_block_size_then_enters_transmission() {
        let catalog = MemCatalog::single("vm1", 1 << 20);
        let mut n = Negotiation::new();
        n.client_flags(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES)
            .unwrap();
        let mut out = BytesMut::new();
        let step = n.option(
            wire::OPT_GO,
            &go_payload("vm1", &[wire::INFO_BLOCK_SIZE]),
            &catalog,
            &mut out,
        );
        let Step::Transmission(export, neg) = step else {
            panic!("expected transmission")
        };
        assert_eq!(export.info.size, 1 << 20);
        assert!(neg.block_size_agreed);
        assert!(!neg.structured_replies);
        let r = replies(&out);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].1, wire::REP_INFO);
        assert_eq!(&r[0].2[..2], &wire::INFO_EXPORT.to_be_bytes());
        assert_eq!(&r[1].2[..2], &wire::INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(r[2].1, wire::REP_ACK);
    }

    #[test]
    fn unknown_export_and_malformed_payloads_get_errors_not_disconnects() {
        let catalog = MemCatalog::single("vm1", 1 << 20);
        let mut n = Negotiation::new();
        let mut out = BytesMut::new();
        assert!(matches!(
            n.option(wire::OPT_GO, &go_payload("nope", &[]), &catalog, &mut out),
            Step::Continue
        ));
        assert_eq!(replies(&out)[0].1, wire::REP_ERR_UNKNOWN);
        out.clear();
        // Name length pointing past the end.
        assert!(matches!(
            n.option(wire::OPT_GO, &[0, 0, 0, 9, b'a'], &catalog, &mut out),
            Step::Continue
        ));
        assert_eq!(replies(&out)[0].1, wire::REP_ERR_INVALID);
        out.clear();
        assert!(matches!(
            n.option(99, b"", &catalog, &mut out),
            Step::Continue
        ));
        assert_eq!(replies(&out)[0].1, wire::REP_ERR_UNSUP);
        out.clear();
        assert!(matches!(
            n.option(wire::OPT_STARTTLS, b"", &catalog, &mut out),
            Step::Continue
        ));
        assert_eq!(replies(&out)[0].1, wire::REP_ERR_POLICY);
    }

    #[test]
    fn export_name_unknown_disconnects_and_known_sends_zeroes() {
        let catalog = MemCatalog::single("vm1", 4096);
        let mut n = Negotiation::new();
        n.client_flags(wire::FLAG_C_FIXED_NEWSTYLE).unwrap();
        let mut out = BytesMut::new();
        assert!(matches!(
            n.option(wire::OPT_EXPORT_NAME, b"zz", &catalog, &mut out),
            Step::Disconnect(_)
        ));
        assert!(out.is_empty());
        assert!(matches!(
            n.option(wire::OPT_EXPORT_NAME, b"vm1", &catalog, &mut out),
            Step::Transmission(..)
        ));
        assert_eq!(out.len(), 8 + 2 + 124);
    }

    #[test]
    fn meta_context_needs_structured_replies_and_matching_export() {
        let catalog = MemCatalog::single("vm1", 1 << 20);
        let mut n = Negotiation::new();
        let mut out = BytesMut::new();
        let mut set = Vec::new();
        set.extend_from_slice(&3u32.to_be_bytes());
        set.extend_from_slice(b"vm1");
        set.extend_from_slice(&1u32.to_be_bytes());
        set.extend_from_slice(&15u32.to_be_bytes());
        set.extend_from_slice(b"base:allocation");
        n.option(wire::OPT_SET_META_CONTEXT, &set, &catalog, &mut out);
        assert_eq!(replies(&out)[0].1, wire::REP_ERR_INVALID);
        out.clear();
        n.option(wire::OPT_STRUCTURED_REPLY, b"", &catalog, &mut out);
        out.clear();
        n.option(wire::OPT_SET_META_CONTEXT, &set, &catalog, &mut out);
        let r = replies(&out);
        assert_eq!(r[0].1, wire::REP_META_CONTEXT);
        assert_eq!(r[1].1, wire::REP_ACK);
        out.clear();
        let Step::Transmission(_, neg) =
            n.option(wire::OPT_GO, &go_payload("vm1", &[]), &catalog, &mut out)
        else {
            panic!()
        };
        assert!(neg.base_allocation);
        assert!(neg.structured_replies);
        assert_ne!(neg.transmission_flags & wire::FLAG_SEND_DF, 0);
    }

    #[test]
    fn bad_client_flags_are_refused() {
        let mut n = Negotiation::new();
        assert_eq!(n.client_flags(1 << 5), Err(BadClientFlags(1 << 5)));
    }
}
