//! A sub-millisecond timer for the link tasks.
//!
//! tokio's timer has 1 ms granularity and rounds deadlines up: measured through the
//! emulator, every delayed direction came out 1.0–1.5 ms late (a 15 ms one-way delay gave
//! a 32.6 ms RTT instead of 30), a 10% error on the `sinet5` RTTs. A Linux `timerfd`
//! registered with tokio's reactor wakes within tens of microseconds of the deadline and
//! costs one file descriptor per link. Where a timerfd cannot be created, the link falls
//! back to tokio's timer.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

/// One re-armable deadline.
pub(crate) enum Timer {
    Fd(AsyncFd<OwnedFd>),
    Tokio(std::pin::Pin<Box<tokio::time::Sleep>>),
}

impl Timer {
    /// A timerfd-based timer, or tokio's if that fails. Needs a tokio runtime.
    pub(crate) fn new() -> Timer {
        match timerfd() {
            Ok(fd) => Timer::Fd(fd),
            Err(e) => {
                tracing::debug!(error = %e, "create timerfd; using tokio's 1 ms timer");
                Timer::Tokio(Box::pin(tokio::time::sleep_until(Instant::now())))
            }
        }
    }

    /// Arms the timer for `deadline` (a deadline in the past fires at once).
    pub(crate) fn arm(&mut self, deadline: Instant) {
        match self {
            Timer::Fd(fd) => {
                // 0 would disarm the timer: a due deadline gets the smallest delay.
                let after = deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_nanos(1));
                let spec = libc::itimerspec {
                    it_interval: libc::timespec {
                        tv_sec: 0,
                        tv_nsec: 0,
                    },
                    it_value: libc::timespec {
                        tv_sec: after.as_secs() as libc::time_t,
                        tv_nsec: after.subsec_nanos() as libc::c_long,
                    },
                };
                // SAFETY: a valid timerfd and a fully initialised itimerspec; the old
                // value is not requested.
                let rc = unsafe {
                    libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut())
                };
                if rc != 0 {
                    let e = io::Error::last_os_error();
                    tracing::warn!(error = %e, "arm timerfd; using tokio's 1 ms timer");
                    *self = Timer::Tokio(Box::pin(tokio::time::sleep_until(deadline)));
                }
            }
            Timer::Tokio(sleep) => sleep.as_mut().reset(deadline),
        }
    }

    /// Completes when the armed deadline has passed. Cancel-safe; may complete early
    /// (spuriously) once, which callers tolerate by re-checking the time.
    pub(crate) async fn fired(&mut self) {
        match self {
            Timer::Fd(fd) => loop {
                let Ok(mut ready) = fd.readable().await else {
                    // The reactor is gone (runtime shutting down): nothing to wait for.
                    return std::future::pending().await;
                };
                let read = ready.try_io(|fd| {
                    let mut expirations = [0u8; 8];
                    // SAFETY: reading 8 bytes into an 8-byte buffer from a valid fd.
                    let n = unsafe {
                        libc::read(
                            fd.as_raw_fd(),
                            expirations.as_mut_ptr().cast(),
                            expirations.len(),
                        )
                    };
                    if n < 0 {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(())
                    }
                });
                match read {
                    Ok(_) => return,
                    // Not expired yet (readiness was stale): wait again.
                    Err(_would_block) => continue,
                }
            },
            Timer::Tokio(sleep) => sleep.as_mut().await,
        }
    }
}

fn timerfd() -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: timerfd_create has no memory effects; the result is checked.
    let raw = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new file descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: the OwnedFd is valid and stays open, with the same descriptor, for as long
    // as the AsyncFd that owns it.
    let registered = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) };
    registered.map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fires_close_to_the_deadline() {
        let mut timer = Timer::new();
        assert!(matches!(timer, Timer::Fd(_)), "timerfd unavailable");
        let mut late = Vec::new();
        for _ in 0..20 {
            let deadline = Instant::now() + Duration::from_micros(2500);
            timer.arm(deadline);
            while Instant::now() < deadline {
                timer.fired().await;
            }
            late.push(Instant::now() - deadline);
        }
        late.sort();
        let median = late[late.len() / 2];
        assert!(
            median < Duration::from_micros(500),
            "median lateness {median:?}"
        );
    }

    #[tokio::test]
    async fn past_deadline_fires_at_once() {
        let mut timer = Timer::new();
        timer.arm(Instant::now() - Duration::from_millis(5));
        let fired = tokio::time::timeout(Duration::from_secs(5), timer.fired()).await;
        assert!(fired.is_ok());
    }
}
