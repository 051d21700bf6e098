//! A partial change of a link's parameters, as the control API and the Rust client send
//! it. Its own module so that [`crate::wan`] can name its error without depending on the
//! HTTP layer (`control` depends on `wan`, never the other way).

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::limits::{DELAY_MAX, JITTER_MAX};
use crate::params::{LinkParams, Partition};

/// A partial update of a link's parameters: absent fields stay as they are. For
/// `bandwidth_bytes_per_sec` and `queue_limit_bytes`, `null` means unlimited / automatic
/// and is different from leaving the field out.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter_ms: Option<f64>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub bandwidth_bytes_per_sec: Option<Option<u64>>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub queue_limit_bytes: Option<Option<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<Partition>,
}

/// A field that is present (possibly `null`) becomes `Some(value)`; an absent one stays
/// `None` through `#[serde(default)]`.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// A [`LinkUpdate`] value out of range.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{field} must be a number of milliseconds in 0..={max_ms}, got {value}")]
pub struct UpdateError {
    pub field: &'static str,
    pub value: f64,
    pub max_ms: u128,
}

impl LinkUpdate {
    /// Applies the present fields to `params`; fails on a negative, non-finite or too
    /// large time (the rest is checked by [`LinkParams::validate`]).
    pub fn apply_to(&self, params: &mut LinkParams) -> Result<(), UpdateError> {
        if let Some(ms) = self.delay_ms {
            params.delay = millis("delay_ms", ms, DELAY_MAX)?;
        }
        if let Some(ms) = self.jitter_ms {
            params.jitter = millis("jitter_ms", ms, JITTER_MAX)?;
        }
        if let Some(rate) = self.bandwidth_bytes_per_sec {
            params.bandwidth_bytes_per_sec = rate;
        }
        if let Some(limit) = self.queue_limit_bytes {
            params.queue_limit_bytes = limit;
        }
        if let Some(partition) = self.partition {
            params.partition = partition;
        }
        Ok(())
    }
}

fn millis(field: &'static str, ms: f64, max: Duration) -> Result<Duration, UpdateError> {
    let error = UpdateError {
        field,
        value: ms,
        max_ms: max.as_millis(),
    };
    if !ms.is_finite() || ms < 0.0 {
        return Err(error);
    }
    match Duration::try_from_secs_f64(ms / 1e3) {
        Ok(d) if d <= max => Ok(d),
        _ => Err(error),
    }
}
