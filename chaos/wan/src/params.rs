//! What a link is told to do: site names, [`LinkParams`] and [`Partition`], their
//! validation, and the values derived from them (queue limit, chunk size, burst).
//!
//! Pure data: no I/O, no clock. The JSON forms for the control API live in `control`.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::limits::*;

/// A site (datacenter) name: 1 to [`SITE_NAME_MAX_BYTES`] bytes of lower-case ASCII
/// letters, digits, `-` and `_`, starting with a letter or digit. Names are compared
/// exactly; "Osaka" is rejected rather than silently taken for "osaka".
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Site(String);

impl Site {
    /// Validates a site name.
    pub fn new(name: &str) -> Result<Site, SiteError> {
        let reason = if name.is_empty() {
            Some("must not be empty")
        } else if name.len() > SITE_NAME_MAX_BYTES {
            Some("is longer than 64 bytes")
        } else if !name.as_bytes()[0].is_ascii_alphanumeric() {
            Some("must start with a letter or digit")
        } else if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            Some("may only contain lower-case letters, digits, '-' and '_'")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(SiteError {
                name: name.to_owned(),
                reason,
            }),
            None => Ok(Site(name.to_owned())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A site name that [`Site::new`] rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid site name {name:?}: {reason}")]
pub struct SiteError {
    pub name: String,
    pub reason: &'static str,
}

/// Whether a directed link forwards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Partition {
    /// Forward normally.
    #[default]
    None,
    /// Connections fail, as peers see a real partition: every connection between the two
    /// sites is reset (RST to both ends) and new ones are accepted and reset at once.
    ///
    /// A TCP connection needs both directions, so a `Drop` on either direction of a site
    /// pair breaks every connection between the two sites, whichever side opened it.
    /// (A real one-way loss would instead stall the connection until TCP times out, which
    /// takes minutes on Linux; `Hold` is that stall, minus the timeout.)
    Drop,
    /// Stop forwarding in this direction: bytes queue up to the link's queue limit, then
    /// the senders see TCP backpressure. On heal, everything queued is delivered in order
    /// (what TCP's retransmissions achieve after a real outage, without its timeouts).
    /// Bytes already past the bottleneck when the hold starts (in the delay line) still
    /// arrive.
    Hold,
}

impl Partition {
    pub fn name(self) -> &'static str {
        match self {
            Partition::None => "none",
            Partition::Drop => "drop",
            Partition::Hold => "hold",
        }
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The behaviour of one directed link (site a → site b).
///
/// Bandwidth is in **bytes** per second (not bits): every other quantity here (queue,
/// chunk, counters) is in bytes, and storage people think in MiB/s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkParams {
    /// One-way delay added to every byte.
    pub delay: Duration,
    /// Each chunk gets an extra delay drawn uniformly from `[0, jitter]`. Bytes of one
    /// connection are never reordered: a chunk is never released before the previous
    /// chunk of its connection.
    pub jitter: Duration,
    /// Token-bucket rate shared by all connections crossing the link; `None` = unlimited.
    pub bandwidth_bytes_per_sec: Option<u64>,
    /// Bound on the bytes inside the link (waiting for tokens or in the delay line);
    /// `None` = automatic, see [`LinkParams::queue_limit_effective_bytes`]. When the link
    /// is full, the emulator stops reading from the senders' sockets (TCP backpressure).
    pub queue_limit_bytes: Option<u64>,
    pub partition: Partition,
}

impl Default for LinkParams {
    /// A LAN: no delay, no limit, forwarding.
    fn default() -> Self {
        LinkParams {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            bandwidth_bytes_per_sec: None,
            queue_limit_bytes: None,
            partition: Partition::None,
        }
    }
}

/// Link parameters that [`LinkParams::validate`] rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParamsError {
    #[error("delay {delay_ms} ms exceeds the maximum of {max_ms} ms")]
    DelayTooLarge { delay_ms: u128, max_ms: u128 },
    #[error("jitter {jitter_ms} ms exceeds the maximum of {max_ms} ms")]
    JitterTooLarge { jitter_ms: u128, max_ms: u128 },
    #[error(
        "bandwidth {bytes_per_sec} bytes/s is outside {min}..={max} \
         (use partition \"hold\" to stop a link, null for unlimited)"
    )]
    Bandwidth {
        bytes_per_sec: u64,
        min: u64,
        max: u64,
    },
    #[error("queue limit {bytes} bytes is outside {min}..={max} (null for automatic)")]
    QueueLimit { bytes: u64, min: u64, max: u64 },
}

impl LinkParams {
    /// Checks every field against the limits in [`crate::limits`].
    pub fn validate(&self) -> Result<(), ParamsError> {
        if self.delay > DELAY_MAX {
            return Err(ParamsError::DelayTooLarge {
                delay_ms: self.delay.as_millis(),
                max_ms: DELAY_MAX.as_millis(),
            });
        }
        if self.jitter > JITTER_MAX {
            return Err(ParamsError::JitterTooLarge {
                jitter_ms: self.jitter.as_millis(),
                max_ms: JITTER_MAX.as_millis(),
            });
        }
        if let Some(rate) = self.bandwidth_bytes_per_sec {
            if !(BANDWIDTH_MIN_BYTES_PER_SEC..=BANDWIDTH_MAX_BYTES_PER_SEC).contains(&rate) {
                return Err(ParamsError::Bandwidth {
                    bytes_per_sec: rate,
                    min: BANDWIDTH_MIN_BYTES_PER_SEC,
                    max: BANDWIDTH_MAX_BYTES_PER_SEC,
                });
            }
        }
        if let Some(bytes) = self.queue_limit_bytes {
            if !(QUEUE_LIMIT_MIN_BYTES..=QUEUE_LIMIT_MAX_BYTES).contains(&bytes) {
                return Err(ParamsError::QueueLimit {
                    bytes,
                    min: QUEUE_LIMIT_MIN_BYTES,
                    max: QUEUE_LIMIT_MAX_BYTES,
                });
            }
        }
        Ok(())
    }

    /// The queue limit in force: the explicit one, or for a rate-limited link twice the
    /// bandwidth-delay product (with the delay including the jitter) clamped to
    /// [`QUEUE_AUTO_MIN_BYTES`]..=[`QUEUE_AUTO_MAX_BYTES`], or for an unlimited link
    /// [`QUEUE_UNLIMITED_BYTES`].
    ///
    /// The automatic limit follows delay and bandwidth changes, so slowing a link down at
    /// run time does not silently cap its throughput with a queue sized for the old BDP.
    pub fn queue_limit_effective_bytes(&self) -> u64 {
        if let Some(bytes) = self.queue_limit_bytes {
            return bytes;
        }
        match self.bandwidth_bytes_per_sec {
            None => QUEUE_UNLIMITED_BYTES,
            Some(rate) => {
                let one_way = self.delay + self.jitter;
                let bdp_bytes = (u128::from(rate) * one_way.as_nanos() / 1_000_000_000) as u64;
                bdp_bytes
                    .saturating_mul(2)
                    .clamp(QUEUE_AUTO_MIN_BYTES, QUEUE_AUTO_MAX_BYTES)
            }
        }
    }

    /// Largest chunk read from a socket for this link: [`CHUNK_MAX_BYTES`], or on a
    /// rate-limited link the bytes serialized in [`CHUNK_SERIALIZATION_TARGET`] (at least
    /// [`CHUNK_MIN_BYTES`]), and never more than the queue limit.
    pub fn chunk_limit_bytes(&self) -> u64 {
        let by_rate = match self.bandwidth_bytes_per_sec {
            None => CHUNK_MAX_BYTES,
            Some(rate) => {
                bytes_in(rate, CHUNK_SERIALIZATION_TARGET).clamp(CHUNK_MIN_BYTES, CHUNK_MAX_BYTES)
            }
        };
        by_rate.min(self.queue_limit_effective_bytes())
    }

    /// Capacity of the token bucket: [`BUCKET_BURST_DURATION`] worth of tokens, at least
    /// one chunk. `None` for an unlimited link.
    pub fn bucket_capacity_bytes(&self) -> Option<u64> {
        self.bandwidth_bytes_per_sec
            .map(|rate| bytes_in(rate, BUCKET_BURST_DURATION).max(self.chunk_limit_bytes()))
    }
}

/// Bytes a link of `rate` bytes/s serializes in `time`.
fn bytes_in(rate: u64, time: Duration) -> u64 {
    (u128::from(rate) * time.as_nanos() / 1_000_000_000) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_names() {
        assert!(Site::new("osaka").is_ok());
        assert!(Site::new("site-2_b").is_ok());
        assert!(Site::new("9").is_ok());
        assert!(Site::new("").is_err());
        assert!(Site::new("Osaka").is_err());
        assert!(Site::new("-osaka").is_err());
        assert!(Site::new("osaka kita").is_err());
        assert!(Site::new(&"a".repeat(65)).is_err());
        assert!(Site::new(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn validation() {
        let ok = LinkParams::default();
        assert_eq!(ok.validate(), Ok(()));
        let p = LinkParams {
            delay: DELAY_MAX + Duration::from_millis(1),
            ..ok
        };
        assert!(matches!(
            p.validate(),
            Err(ParamsError::DelayTooLarge { .. })
        ));
        let p = LinkParams {
            bandwidth_bytes_per_sec: Some(0),
            ..ok
        };
        assert!(matches!(p.validate(), Err(ParamsError::Bandwidth { .. })));
        let p = LinkParams {
            queue_limit_bytes: Some(10),
            ..ok
        };
        assert!(matches!(p.validate(), Err(ParamsError::QueueLimit { .. })));
    }

    #[test]
    fn derived_values() {
        let lan = LinkParams::default();
        assert_eq!(lan.queue_limit_effective_bytes(), QUEUE_UNLIMITED_BYTES);
        assert_eq!(lan.chunk_limit_bytes(), CHUNK_MAX_BYTES);
        assert_eq!(lan.bucket_capacity_bytes(), None);

        // 100 MiB/s, 40 ms one-way: BDP 4 MiB, queue 8 MiB.
        let wan = LinkParams {
            delay: Duration::from_millis(40),
            bandwidth_bytes_per_sec: Some(100 << 20),
            ..lan
        };
        assert_eq!(wan.queue_limit_effective_bytes(), 8 << 20);
        assert_eq!(wan.chunk_limit_bytes(), CHUNK_MAX_BYTES);
        assert_eq!(wan.bucket_capacity_bytes(), Some((100 << 20) / 200));

        // 8 MiB/s, no delay: the queue floor, 16 KiB chunks.
        let slow = LinkParams {
            bandwidth_bytes_per_sec: Some(8 << 20),
            ..lan
        };
        assert_eq!(slow.queue_limit_effective_bytes(), QUEUE_AUTO_MIN_BYTES);
        assert_eq!(slow.chunk_limit_bytes(), 16_777);
        // An explicit queue smaller than a chunk bounds the chunk.
        let tiny = LinkParams {
            queue_limit_bytes: Some(8192),
            ..slow
        };
        assert_eq!(tiny.chunk_limit_bytes(), 8192);
    }
}
