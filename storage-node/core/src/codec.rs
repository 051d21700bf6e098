//! The one place that encodes and decodes roamdisk's own messages and records.
//!
//! Everything roamdisk writes to disk or sends to a peer (except raft-rs's protobuf
//! messages, which raft-rs encodes) goes through [`encode`] and [`decode`], so the
//! serialization library (bincode 2.0.1 today) can be swapped here alone. Decoding is
//! bounded: input from the network or disk cannot make it allocate more than
//! [`DECODE_LIMIT_BYTES`].

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest value [`decode`] will materialise: one 32 MiB NBD write plus headroom.
pub const DECODE_LIMIT_BYTES: usize = 40 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("encode: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("decode: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("decode: {0} trailing bytes")]
    Trailing(usize),
    #[error("format version {found} is newer than this node understands ({known})")]
    Version { found: u16, known: u16 },
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT_BYTES>()
}

pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    Ok(bincode::serde::encode_to_vec(value, config())?)
}

/// Appends the encoding of `value` to `out`.
pub fn encode_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let bytes = bincode::serde::encode_to_vec(value, config())?;
    out.extend_from_slice(&bytes);
    Ok(())
}

/// Decodes exactly one value occupying all of `bytes`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, config())?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
    }
    Ok(value)
}

/// Decodes a value that borrows from `bytes` (zero-copy for byte payloads).
pub fn decode_borrowed<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::borrow_decode_from_slice(bytes, config())?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Sample {
        a: u64,
        #[serde(with = "serde_bytes")]
        b: Vec<u8>,
    }

    #[test]
    fn round_trip_and_trailing_bytes_rejected() {
        let s = Sample {
            a: 7,
            b: vec![1, 2, 3],
        };
        let mut bytes = encode(&s).unwrap();
        assert_eq!(decode::<Sample>(&bytes).unwrap(), s);
        bytes.push(0);
        assert!(matches!(
            decode::<Sample>(&bytes),
            Err(CodecError::Trailing(1))
        ));
    }

    #[test]
    fn hostile_length_prefix_does_not_allocate() {
        // A byte string claiming to be ~2^62 bytes long.
        let bytes = [7u8, 253, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x3f];
        assert!(decode::<Sample>(&bytes).is_err());
    }
}
