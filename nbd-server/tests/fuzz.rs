//! Property-based fuzzing of everything a client controls: option frames in the
//! handshake, request headers and payloads in transmission, and whole byte streams fed to
//! the real connection driver. Cases come from proptest (structure-aware and raw bytes);
//! `ROAMDISK_FUZZ_CASES` sets how many per property (CI uses a short run).
//!
//! The properties: nothing panics; the decoder never holds more than one maximal
//! request; a request that passes validation is inside the export and uses only
//! negotiated features; every option gets a well-formed reply stream.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use proptest::prelude::*;
use roamdisk_nbd::handshake::{Negotiation, Step};
use roamdisk_nbd::mem::MemCatalog;
use roamdisk_nbd::server::{run_connection, Stats};
use roamdisk_nbd::transmission::{validate, Decoded, Op, RequestDecoder, Session};
use roamdisk_nbd::{limits, wire};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn cases() -> u32 {
    std::env::var("ROAMDISK_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000)
}

const SIZE: u64 = 1 << 20;

/// Option numbers worth hitting often, plus anything else.
fn option_number() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..=12, any::<u32>()]
}

/// Option payloads: structured GO/meta-context shapes with hostile lengths, or raw bytes.
fn option_payload() -> impl Strategy<Value = Vec<u8>> {
    let name = prop_oneof![
        Just(b"vm1".to_vec()),
        Just(Vec::new()),
        proptest::collection::vec(any::<u8>(), 0..12)
    ];
    let structured = (
        name,
        any::<u32>(),
        proptest::collection::vec(any::<u16>(), 0..6),
        any::<bool>(),
        any::<u32>(),
    )
        .prop_map(|(name, lie, infos, honest, n)| {
            let mut v = Vec::new();
            let len = if honest { name.len() as u32 } else { lie };
            v.extend_from_slice(&len.to_be_bytes());
            v.extend_from_slice(&name);
            if honest {
                v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
            } else {
                v.extend_from_slice(&n.to_be_bytes());
            }
            for i in infos {
                v.extend_from_slice(&i.to_be_bytes());
            }
            v
        });
    prop_oneof![structured, proptest::collection::vec(any::<u8>(), 0..64)]
}

/// Parses a reply stream from the handshake; panics if it is not well-formed.
fn check_option_replies(mut out: &[u8], opt: u32) {
    while !out.is_empty() {
        assert!(out.len() >= 20, "truncated option reply");
        assert_eq!(
            u64::from_be_bytes(out[..8].try_into().unwrap()),
            wire::OPTION_REPLY_MAGIC
        );
        assert_eq!(u32::from_be_bytes(out[8..12].try_into().unwrap()), opt);
        let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        assert!(out.len() >= 20 + len);
        out = &out[20 + len..];
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn handshake_options_never_panic_and_replies_are_well_formed(
        ops in proptest::collection::vec((option_number(), option_payload()), 1..12)
    ) {
        let catalog = MemCatalog::single("vm1", SIZE);
        let mut n = Negotiation::new();
        let _ = n.client_flags(wire::FLAG_C_FIXED_NEWSTYLE);
        for (opt, data) in ops {
            let mut out = BytesMut::new();
            let step = n.option(opt, &data, &catalog, &mut out);
            match step {
                Step::Continue | Step::Close => check_option_replies(&out, opt),
                Step::Disconnect(_) => {
                    prop_assert_eq!(opt, wire::OPT_EXPORT_NAME);
                    break;
                }
                Step::Transmission(export, negotiated) => {
                    prop_assert!(opt == wire::OPT_GO || opt == wire::OPT_EXPORT_NAME);
                    prop_assert_eq!(export.info.size, SIZE);
                    prop_assert!(negotiated.transmission_flags & wire::FLAG_HAS_FLAGS != 0);
                    if !negotiated.structured_replies {
                        prop_assert!(!negotiated.base_allocation);
                        prop_assert_eq!(negotiated.transmission_flags & wire::FLAG_SEND_DF, 0);
                    }
                    break;
                }
            }
        }
    }

    #[test]
    fn request_stream_decodes_within_bounds_and_validated_ops_are_in_range(
        reqs in proptest::collection::vec(
            (any::<u16>(), prop_oneof![0u16..=8, any::<u16>()], any::<u64>(),
             prop_oneof![0u64..SIZE + 8192, any::<u64>()],
             prop_oneof![0u32..70000, any::<u32>()], any::<bool>()),
            1..16),
        structured in any::<bool>(),
        agreed in any::<bool>(),
        chunking in 1usize..5000,
    ) {
        // Build a byte stream: well-formed headers, WRITE payloads only when small.
        let mut stream = Vec::new();
        for (flags, cmd, cookie, offset, len, _) in &reqs {
            let mut h = BytesMut::new();
            h.put_u32(wire::REQUEST_MAGIC);
            h.put_u16(*flags);
            h.put_u16(*cmd);
            h.put_u64(*cookie);
            h.put_u64(*offset);
            let len = if *cmd == wire::CMD_WRITE { len % 70000 } else { *len };
            h.put_u32(len);
            stream.extend_from_slice(&h);
            if *cmd == wire::CMD_WRITE {
                stream.resize(stream.len() + len as usize, 0x5a);
            }
        }
        let info = MemCatalog::single("vm1", SIZE).lookup_info();
        let session = Session {
            size: SIZE,
            read_only: false,
            minimum_block: 4096,
            negotiated: roamdisk_nbd::handshake::Negotiated {
                structured_replies: structured,
                base_allocation: structured,
                block_size_agreed: agreed,
                transmission_flags: info.transmission_flags(structured),
            },
        };
        let mut dec = RequestDecoder::new();
        let mut buf = BytesMut::new();
        let mut decoded = 0;
        for piece in stream.chunks(chunking) {
            buf.extend_from_slice(piece);
            while let Some(d) = dec.decode(&mut buf).expect("magic is valid") {
                decoded += 1;
                if let Decoded::Request(r) = d {
                    if let Ok(op) = validate(r, &session) {
                        let (offset, len) = match op {
                            Op::Read { offset, len, .. } | Op::Trim { offset, len, .. }
                            | Op::WriteZeroes { offset, len, .. } | Op::BlockStatus { offset, len, .. }
                            | Op::Cache { offset, len } => (offset, u64::from(len)),
                            Op::Write { offset, ref data, .. } => (offset, data.len() as u64),
                            Op::Flush | Op::Disconnect => (0, 0),
                        };
                        prop_assert!(offset + len <= SIZE);
                        if agreed {
                            prop_assert_eq!(offset % 4096, 0);
                            prop_assert_eq!(len % 4096, 0);
                        }
                    }
                }
            }
            prop_assert!(buf.len() <= wire::REQUEST_HEADER_BYTES + limits::REQUEST_PAYLOAD_MAX_BYTES as usize + chunking);
        }
        prop_assert_eq!(decoded, reqs.len());
    }

    #[test]
    fn raw_bytes_into_the_real_driver_never_panic(
        prefix in prop_oneof![Just(0u8), Just(1u8), Just(2u8)],
        garbage in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let catalog = Arc::new(MemCatalog::single("vm1", SIZE));
            let (client, server) = tokio::io::duplex(1 << 16);
            let (srd, swr) = tokio::io::split(server);
            let shutdown = tokio_util::sync::CancellationToken::new();
            let stats = Stats::default();
            let driver = run_connection(&*catalog, srd, swr, &stats, &shutdown);
            let feeder = async move {
                let (mut crd, mut cwr) = tokio::io::split(client);
                let mut bytes = Vec::new();
                // Prefix 1: a valid handshake reaching transmission, then garbage
                // requests. Prefix 2: valid client flags, then garbage options.
                if prefix >= 1 {
                    bytes.extend_from_slice(&wire::FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
                }
                if prefix == 1 {
                    bytes.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
                    bytes.extend_from_slice(&wire::OPT_EXPORT_NAME.to_be_bytes());
                    bytes.extend_from_slice(&3u32.to_be_bytes());
                    bytes.extend_from_slice(b"vm1");
                }
                bytes.extend_from_slice(&garbage);
                let reader = tokio::spawn(async move {
                    let mut sink = Vec::new();
                    let _ = crd.read_to_end(&mut sink).await;
                });
                let _ = cwr.write_all(&bytes).await;
                let _ = cwr.shutdown().await;
                drop(cwr);
                let _ = reader.await;
            };
            let (res, ()) = tokio::join!(
                tokio::time::timeout(Duration::from_secs(10), driver),
                feeder,
            );
            assert!(res.is_ok(), "driver must finish once input ends");
        });
    }
}
