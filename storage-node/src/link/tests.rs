//! Tests of batching, compression, record decoding and the cap.

use super::*;
use roamdisk_core::ids::GroupId;

fn raft_frame(n: usize, fill: u8) -> PeerFrame {
    PeerFrame::Raft {
        group: GroupId(7),
        epoch: 0,
        msg: vec![fill; n],
    }
}

async fn round_trip(mode: &WriterMode, frames: &[PeerFrame]) -> (usize, Vec<PeerFrame>) {
    let mut out = Vec::new();
    let wire = mode.write_batch(&mut out, frames).await.unwrap();
    assert_eq!(wire, out.len());
    let mut rd = &out[..];
    let mut got = Vec::new();
    while let Some(fs) = read_record(&mut rd).await.unwrap() {
        got.extend(fs);
    }
    (wire, got)
}

/// `n` bytes that do not compress (xorshift).
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ seed;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn link() -> std::sync::Arc<SiteLink> {
    std::sync::Arc::new(SiteLink::new("far".into(), None))
}

#[tokio::test]
async fn remote_bulk_batches_compress_and_decode_in_order() {
    let mode = WriterMode {
        lane: Lane::Log,
        link: Some(link()),
    };
    let frames: Vec<_> = (0..8u8).map(|i| raft_frame(64 << 10, i)).collect();
    let (wire, got) = round_trip(&mode, &frames).await;
    assert!(
        wire < 8 * (64 << 10) / 10,
        "zeros-like data compresses: {wire}"
    );
    assert_eq!(got.len(), 8);
    for (i, f) in got.iter().enumerate() {
        match f {
            PeerFrame::Raft { msg, .. } => assert!(msg.iter().all(|b| *b == i as u8)),
            other => panic!("{other:?}"),
        }
    }
    let st = mode.link.as_ref().unwrap().status();
    let log = &st.lanes[Lane::Log.index()];
    assert_eq!(log.wire_bytes as usize, wire);
    assert!(log.logical_bytes > 8 * (64 << 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_writer_keeps_order_across_inline_and_pooled_batches_under_a_cap() {
    // Large batches are prepared on the blocking pool while the one before is sent,
    // small ones inline: the stream must still decode in order, at the capped rate.
    let rate = 8u64 << 20;
    let mode = WriterMode {
        lane: Lane::Bulk,
        link: Some(std::sync::Arc::new(SiteLink::new("far".into(), Some(rate)))),
    };
    let mut batches: std::collections::VecDeque<Vec<PeerFrame>> = (0..12u8)
        .map(|i| {
            let n = if i % 3 == 0 { 4 << 10 } else { 300 << 10 };
            let mut msg = noise(n, u64::from(i));
            msg[0] = i;
            vec![PeerFrame::Raft {
                group: GroupId(7),
                epoch: 0,
                msg,
            }]
        })
        .collect();
    let total: usize = batches.iter().flatten().map(PeerFrame::approx_len).sum();
    let mut out = Vec::new();
    let started = Instant::now();
    write_pipelined(&mut out, &mode, || batches.pop_front())
        .await
        .unwrap();
    let took = started.elapsed().as_secs_f64();
    let mut rd = &out[..];
    let mut got = Vec::new();
    while let Some(fs) = read_record(&mut rd).await.unwrap() {
        got.extend(fs);
    }
    let fills: Vec<u8> = got
        .iter()
        .map(|f| match f {
            PeerFrame::Raft { msg, .. } => msg[0],
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(fills, (0..12u8).collect::<Vec<_>>());
    // Noise does not compress: the bytes left no faster than the cap (less its burst).
    let wire = out.len() as f64;
    let burst = mode.link.as_ref().unwrap().cap.as_ref().unwrap().burst;
    assert!(
        wire >= 0.99 * total as f64,
        "sent raw: {wire} of about {total}"
    );
    assert!(
        took + 0.005 >= (wire - burst) / rate as f64,
        "{wire} bytes in {took} s at a cap of {rate} B/s"
    );
}

#[tokio::test]
async fn control_lane_and_local_peers_are_not_compressed() {
    let big = [raft_frame(64 << 10, 1)];
    let control = WriterMode {
        lane: Lane::Control,
        link: Some(link()),
    };
    let (wire, got) = round_trip(&control, &big).await;
    assert!(wire > 64 << 10);
    assert_eq!(got.len(), 1);
    let (wire, _) = round_trip(&WriterMode::local(Lane::Log), &big).await;
    assert!(wire > 64 << 10);
}

#[tokio::test]
async fn incompressible_batches_go_as_plain_frames() {
    let noise = noise(256 << 10, 0);
    let mode = WriterMode {
        lane: Lane::Bulk,
        link: Some(link()),
    };
    let f = PeerFrame::Raft {
        group: GroupId(1),
        epoch: 0,
        msg: noise.clone(),
    };
    let (wire, got) = round_trip(&mode, &[f]).await;
    assert!(wire >= noise.len());
    assert!(matches!(&got[0], PeerFrame::Raft { msg, .. } if *msg == noise));
}

#[test]
fn hostile_records_are_refused() {
    // Announced raw length above the limit.
    let mut r = vec![KIND_ZSTD_BATCH];
    r.extend_from_slice(&(u32::MAX).to_be_bytes());
    assert!(decode_record(&r).is_err());
    // Decompresses to more than announced.
    let raw = vec![0u8; 1 << 20];
    let z = zstd::bulk::compress(&raw, 1).unwrap();
    let mut r = vec![KIND_ZSTD_BATCH];
    r.extend_from_slice(&(1000u32).to_be_bytes());
    r.extend_from_slice(&z);
    assert!(decode_record(&r).is_err());
    // An inner length past the end.
    let mut raw = (100u32).to_be_bytes().to_vec();
    raw.extend_from_slice(&[0; 10]);
    let z = zstd::bulk::compress(&raw, 1).unwrap();
    let mut r = vec![KIND_ZSTD_BATCH];
    r.extend_from_slice(&(raw.len() as u32).to_be_bytes());
    r.extend_from_slice(&z);
    assert!(decode_record(&r).is_err());
    // Unknown kind, empty record.
    assert!(decode_record(&[9, 1, 2]).is_err());
    assert!(decode_record(&[]).is_err());
}

#[tokio::test]
async fn oversized_record_is_refused_before_allocation() {
    let mut bytes = (u32::MAX).to_be_bytes().to_vec();
    bytes.extend_from_slice(&[0; 16]);
    let mut rd = &bytes[..];
    assert!(read_record(&mut rd).await.is_err());
}

#[test]
fn bucket_lets_its_rate_through() {
    let b = TokenBucket::new(10 << 20);
    let burst = b.burst as usize;
    assert_eq!(
        burst, BATCH_BYTES_MAX,
        "at 10 MiB/s one batch is more than 5 ms"
    );
    let t0 = Instant::now();
    // The burst goes at once; after it, each MiB costs 100 ms.
    assert_eq!(b.take_at(burst, t0), Duration::ZERO);
    let wait = b.take_at(1 << 20, t0);
    assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
    // Time passing pays the debt back.
    let later = t0 + Duration::from_millis(200);
    assert_eq!(b.take_at(burst, later), Duration::ZERO);
    // Idle time never saves more than the burst.
    let much_later = later + Duration::from_secs(60);
    assert_eq!(b.take_at(burst, much_later), Duration::ZERO);
    assert!(b.take_at(1, much_later) > Duration::ZERO);
}

#[test]
fn rates_parse_with_units() {
    assert_eq!(parse_rate("45MiB").unwrap(), 45 << 20);
    assert_eq!(parse_rate("400Mbit").unwrap(), 50_000_000);
    assert_eq!(parse_rate("2GiB/s").unwrap(), 2 << 30);
    assert_eq!(parse_rate("1048576").unwrap(), 1 << 20);
    assert!(parse_rate("fast").is_err());
    assert!(parse_rate("10 parsecs").is_err());
    assert!(parse_rate("0MiB").is_err());
}
