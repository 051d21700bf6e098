//! Time as the core sees it: an input, never read from a clock here.
//!
//! A [`Time`] is microseconds since an epoch the driver chooses (the storage node: when
//! its store thread started; the simulation: the start of the run). Only differences
//! between two times mean anything.

use std::ops::{Add, Sub};
use std::time::Duration;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Time(u64);

impl Time {
    pub const ZERO: Time = Time(0);

    pub const fn from_micros(us: u64) -> Time {
        Time(us)
    }

    pub const fn as_micros(self) -> u64 {
        self.0
    }

    /// `self - earlier`, or zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Time) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Time {
    type Output = Time;
    fn add(self, d: Duration) -> Time {
        Time(
            self.0
                .saturating_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
        )
    }
}

impl Sub<Duration> for Time {
    type Output = Time;
    fn sub(self, d: Duration) -> Time {
        Time(
            self.0
                .saturating_sub(u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates_and_differences_are_durations() {
        let t = Time::from_micros(1_500);
        assert_eq!(t + Duration::from_millis(1), Time::from_micros(2_500));
        assert_eq!(t - Duration::from_millis(2), Time::ZERO);
        assert_eq!(
            Time::from_micros(2_500).saturating_duration_since(t),
            Duration::from_millis(1)
        );
        assert_eq!(
            t.saturating_duration_since(Time::from_micros(9_000)),
            Duration::ZERO
        );
    }
}
