//! Coverage-guided fuzzing of the sans-I/O protocol core: the first byte picks the
//! negotiated state, the rest is split into option frames for the handshake and fed as
//! a byte stream to the request decoder and validator.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use roamdisk_nbd::handshake::{Negotiated, Negotiation, Step};
use roamdisk_nbd::mem::MemCatalog;
use roamdisk_nbd::transmission::{validate, Decoded, RequestDecoder, Session};
use roamdisk_nbd::{limits, wire};

const SIZE: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let catalog = MemCatalog::single("vm1", SIZE);
    if mode & 1 == 0 {
        // Handshake: [opt u32][len u16][payload] frames.
        let mut n = Negotiation::new();
        let _ = n.client_flags(u32::from(mode >> 1) & 3);
        let mut rest = rest;
        while rest.len() >= 6 {
            let opt = u32::from_be_bytes(rest[..4].try_into().unwrap());
            let len = (u16::from_be_bytes(rest[4..6].try_into().unwrap()) as usize).min(rest.len() - 6);
            let payload = &rest[6..6 + len];
            rest = &rest[6 + len..];
            let mut out = BytesMut::new();
            match n.option(opt, payload, &catalog, &mut out) {
                Step::Continue => {}
                _ => break,
            }
        }
    } else {
        let info = catalog.lookup_info();
        let structured = mode & 2 != 0;
        let session = Session {
            size: SIZE,
            read_only: mode & 8 != 0,
            minimum_block: 4096,
            negotiated: Negotiated {
                structured_replies: structured,
                base_allocation: structured,
                block_size_agreed: mode & 4 != 0,
                transmission_flags: info.transmission_flags(structured),
            },
        };
        let mut dec = RequestDecoder::new();
        let mut buf = BytesMut::new();
        for piece in rest.chunks(((mode >> 4) as usize + 1) * 7) {
            buf.extend_from_slice(piece);
            loop {
                match dec.decode(&mut buf) {
                    Ok(Some(Decoded::Request(r))) => {
                        let _ = validate(r, &session);
                    }
                    Ok(Some(Decoded::Rejected { .. })) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            assert!(buf.len() <= wire::REQUEST_HEADER_BYTES + limits::REQUEST_PAYLOAD_MAX_BYTES as usize + 7 * 16);
        }
    }
});
