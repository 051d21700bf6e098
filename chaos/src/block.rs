//! Self-describing 4 KiB block contents for the verifying workload.
//!
//! Every block the workload writes says which volume, block index, version and run seed
//! it belongs to, so a read can be judged on its own: never written ([`Seen::Zero`]), a
//! clean version of the right block ([`Seen::Version`]), a mix of two writes or any
//! corruption ([`Seen::Torn`]), or a clean block that belongs somewhere else
//! ([`Seen::Foreign`]).
//!
//! Layout (integers little endian):
//!
//! | bytes          | content                                                    |
//! |----------------|------------------------------------------------------------|
//! | `0..8`         | [`MAGIC`]                                                  |
//! | `8..16`        | volume tag ([`volume_tag`])                                |
//! | `16..24`       | block index                                                |
//! | `24..32`       | version                                                    |
//! | `32..40`       | run seed                                                   |
//! | `40..4064`     | filler: blake3 XOF of (seed, volume, block, version)       |
//! | `4064..4096`   | blake3 of bytes `0..4064`                                  |
//!
//! The filler is pseudo-random per (seed, volume, block, version), so two versions of a
//! block differ in practically every byte and half of one plus half of another never
//! passes the checksum.

use crate::history::Seen;

/// Size of one workload block.
pub const BLOCK_SIZE: usize = 4096;

/// First eight bytes of every block the workload writes.
pub const MAGIC: [u8; 8] = *b"RDCHAOS1";

/// Bytes of header: magic, volume tag, block, version, seed.
const HEADER_BYTES: usize = 40;
/// Bytes of the trailing checksum.
const CHECKSUM_BYTES: usize = 32;
/// Where the checksum starts (everything before it is covered by it).
const BODY_BYTES: usize = BLOCK_SIZE - CHECKSUM_BYTES;
/// Domain-separation context for the filler XOF.
const FILLER_CONTEXT: &str = "roamdisk-chaos block filler v1";

/// The tag identifying a volume inside its blocks: the first 8 bytes of blake3 of the
/// volume name, little endian.
pub fn volume_tag(name: &str) -> u64 {
    let hash = blake3::hash(name.as_bytes());
    le_u64(&hash.as_bytes()[..8])
}

/// Contents of `version` of `block` of the volume tagged `volume` in the run `seed`.
pub fn encode(volume: u64, block: u64, version: u64, seed: u64) -> Vec<u8> {
    let mut buf = vec![0u8; BLOCK_SIZE];
    buf[0..8].copy_from_slice(&MAGIC);
    buf[8..16].copy_from_slice(&volume.to_le_bytes());
    buf[16..24].copy_from_slice(&block.to_le_bytes());
    buf[24..32].copy_from_slice(&version.to_le_bytes());
    buf[32..40].copy_from_slice(&seed.to_le_bytes());
    fill(
        &mut buf[HEADER_BYTES..BODY_BYTES],
        volume,
        block,
        version,
        seed,
    );
    let sum = blake3::hash(&buf[..BODY_BYTES]);
    buf[BODY_BYTES..].copy_from_slice(sum.as_bytes());
    buf
}

/// Judges what a read of `block` of the volume tagged `volume` returned, in the run
/// `seed`. A buffer of the wrong length is [`Seen::Torn`].
pub fn decode(buf: &[u8], volume: u64, block: u64, seed: u64) -> Seen {
    if buf.len() != BLOCK_SIZE {
        return Seen::Torn;
    }
    if buf.iter().all(|&b| b == 0) {
        return Seen::Zero;
    }
    let Some(header) = parse_well_formed(buf) else {
        return Seen::Torn;
    };
    if header.volume != volume || header.block != block || header.seed != seed {
        return Seen::Foreign {
            volume: header.volume,
            block: header.block,
            seed: header.seed,
            version: header.version,
        };
    }
    Seen::Version {
        version: header.version,
    }
}

/// The identity a well-formed block claims.
struct Header {
    volume: u64,
    block: u64,
    version: u64,
    seed: u64,
}

/// The header of `buf` (exactly [`BLOCK_SIZE`] bytes) if its magic, checksum and filler
/// are all consistent; `None` otherwise.
fn parse_well_formed(buf: &[u8]) -> Option<Header> {
    if buf[0..8] != MAGIC {
        return None;
    }
    let sum = blake3::hash(&buf[..BODY_BYTES]);
    // `blake3::Hash` equality is constant time; timing does not matter here, but it is
    // the comparison the crate offers.
    let stored: [u8; 32] = buf[BODY_BYTES..].try_into().ok()?;
    if sum != blake3::Hash::from(stored) {
        return None;
    }
    let header = Header {
        volume: le_u64(&buf[8..16]),
        block: le_u64(&buf[16..24]),
        version: le_u64(&buf[24..32]),
        seed: le_u64(&buf[32..40]),
    };
    // A valid checksum over filler that does not match the header cannot come from
    // `encode`: treat it as corruption rather than trust the header.
    let mut expected = [0u8; BODY_BYTES - HEADER_BYTES];
    fill(
        &mut expected,
        header.volume,
        header.block,
        header.version,
        header.seed,
    );
    (buf[HEADER_BYTES..BODY_BYTES] == expected[..]).then_some(header)
}

/// Fills `out` with the deterministic filler of (seed, volume, block, version).
fn fill(out: &mut [u8], volume: u64, block: u64, version: u64, seed: u64) {
    let mut hasher = blake3::Hasher::new_derive_key(FILLER_CONTEXT);
    hasher.update(&seed.to_le_bytes());
    hasher.update(&volume.to_le_bytes());
    hasher.update(&block.to_le_bytes());
    hasher.update(&version.to_le_bytes());
    hasher.finalize_xof().fill(out);
}

/// Little-endian u64 from exactly 8 bytes (callers slice exactly 8).
fn le_u64(bytes: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(bytes);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VOL: u64 = 0x1234_5678_9abc_def0;
    const SEED: u64 = 42;

    #[test]
    fn roundtrip() {
        for (block, version) in [(0, 1), (7, 2), (u64::MAX, u64::MAX)] {
            let buf = encode(VOL, block, version, SEED);
            assert_eq!(buf.len(), BLOCK_SIZE);
            assert_eq!(decode(&buf, VOL, block, SEED), Seen::Version { version });
        }
    }

    #[test]
    fn encoding_is_deterministic_and_versions_differ_nearly_everywhere() {
        assert_eq!(encode(VOL, 3, 9, SEED), encode(VOL, 3, 9, SEED));
        let a = encode(VOL, 3, 3, SEED);
        let b = encode(VOL, 3, 4, SEED);
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        // Header fields other than the version agree (32 bytes); random bytes agree with
        // probability 1/256 each.
        assert!(same < 32 + 64, "{same} equal bytes");
    }

    #[test]
    fn any_flipped_bit_is_torn() {
        let good = encode(VOL, 5, 3, SEED);
        for byte in 0..BLOCK_SIZE {
            for bit in [0u8, 3, 7] {
                let mut buf = good.clone();
                buf[byte] ^= 1 << bit;
                assert_eq!(
                    decode(&buf, VOL, 5, SEED),
                    Seen::Torn,
                    "byte {byte} bit {bit}"
                );
            }
        }
    }

    #[test]
    fn torn_write_is_torn() {
        let v3 = encode(VOL, 5, 3, SEED);
        let v4 = encode(VOL, 5, 4, SEED);
        for split in [512, BLOCK_SIZE / 2, BLOCK_SIZE - 512] {
            let mut mixed = v3[..split].to_vec();
            mixed.extend_from_slice(&v4[split..]);
            assert_eq!(decode(&mixed, VOL, 5, SEED), Seen::Torn, "v3|v4 at {split}");
            let mut mixed = v4[..split].to_vec();
            mixed.extend_from_slice(&v3[split..]);
            assert_eq!(decode(&mixed, VOL, 5, SEED), Seen::Torn, "v4|v3 at {split}");
        }
    }

    #[test]
    fn block_from_elsewhere_is_foreign() {
        let buf = encode(VOL, 9, 2, SEED);
        let foreign = Seen::Foreign {
            volume: VOL,
            block: 9,
            seed: SEED,
            version: 2,
        };
        assert_eq!(decode(&buf, VOL, 8, SEED), foreign);
        assert_eq!(decode(&buf, VOL + 1, 9, SEED), foreign);
        assert_eq!(decode(&buf, VOL, 9, SEED + 1), foreign);
    }

    #[test]
    fn zeros_and_wrong_lengths() {
        assert_eq!(decode(&[0u8; BLOCK_SIZE], VOL, 0, SEED), Seen::Zero);
        assert_eq!(decode(&[0u8; 512], VOL, 0, SEED), Seen::Torn);
        let buf = encode(VOL, 1, 1, SEED);
        assert_eq!(decode(&buf[..BLOCK_SIZE - 1], VOL, 1, SEED), Seen::Torn);
        let mut long = buf.clone();
        long.push(0);
        assert_eq!(decode(&long, VOL, 1, SEED), Seen::Torn);
    }

    #[test]
    fn volume_tag_is_blake3_prefix() {
        let h = blake3::hash(b"vm1");
        let expected = u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap());
        assert_eq!(volume_tag("vm1"), expected);
        assert_ne!(volume_tag("vm1"), volume_tag("vm2"));
    }
}
