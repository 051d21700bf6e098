//! A byte-and-chunk budget with owned permits: the bound behind every queue.
//!
//! A reader takes a [`Permit`] before it reads from a socket and the permit travels with
//! the chunk; dropping it gives the bytes back, wherever that happens (delivered, the
//! connection reset, the emulator shut down). So the accounting cannot leak, and
//! "bytes queued" is exactly the sum of live permits.
//!
//! Unlike `tokio::sync::Semaphore`, the byte limit can shrink at run time (the queue limit
//! is a link parameter): holders keep what they have and new permits wait until the total
//! is back under the limit.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

#[derive(Debug)]
struct State {
    bytes: u64,
    chunks: u64,
    limit_bytes: u64,
    limit_chunks: u64,
}

/// Bytes and chunks in use, with limits on both.
#[derive(Debug)]
pub struct Budget {
    state: Mutex<State>,
    released: Notify,
}

impl Budget {
    pub fn new(limit_bytes: u64, limit_chunks: u64) -> Arc<Budget> {
        Arc::new(Budget {
            state: Mutex::new(State {
                bytes: 0,
                chunks: 0,
                limit_bytes,
                limit_chunks,
            }),
            released: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The critical sections below cannot panic, so a poisoned lock still holds a
        // consistent state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes currently held by permits.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// Chunks (permits) currently held.
    pub fn chunks(&self) -> u64 {
        self.lock().chunks
    }

    pub fn limit_bytes(&self) -> u64 {
        self.lock().limit_bytes
    }

    /// Changes the byte limit; waiters re-check at once.
    pub fn set_limit_bytes(&self, limit_bytes: u64) {
        self.lock().limit_bytes = limit_bytes;
        self.released.notify_waiters();
    }

    /// Takes `bytes` as one chunk if both limits allow it now. A request larger than the
    /// whole limit is granted when nothing else is held, so it cannot wait forever.
    pub fn try_acquire(self: &Arc<Self>, bytes: u64) -> Option<Permit> {
        let mut s = self.lock();
        let fits = s.bytes.saturating_add(bytes) <= s.limit_bytes || s.bytes == 0;
        if !fits || s.chunks >= s.limit_chunks {
            return None;
        }
        s.bytes += bytes;
        s.chunks += 1;
        Some(Permit {
            budget: Arc::clone(self),
            bytes,
        })
    }

    /// Waits until [`Budget::try_acquire`] succeeds.
    pub async fn acquire(self: &Arc<Self>, bytes: u64) -> Permit {
        loop {
            // Register interest before checking, so a release between the check and the
            // wait is not missed.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(permit) = self.try_acquire(bytes) {
                return permit;
            }
            released.await;
        }
    }

    fn release(&self, bytes: u64) {
        {
            let mut s = self.lock();
            assert!(s.bytes >= bytes, "budget released more than it held");
            assert!(s.chunks >= 1, "budget released a chunk it did not hold");
            s.bytes = s.bytes.saturating_sub(bytes);
            s.chunks = s.chunks.saturating_sub(1);
        }
        self.released.notify_waiters();
    }
}

/// Bytes (one chunk) held in a [`Budget`]; given back on drop.
#[derive(Debug)]
pub struct Permit {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Permit {
    #[cfg(test)]
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Gives back what is not needed (a read returned less than was reserved).
    pub fn shrink_to(&mut self, bytes: u64) {
        if bytes >= self.bytes {
            return;
        }
        let surplus = self.bytes - bytes;
        self.bytes = bytes;
        {
            let mut s = self.budget.lock();
            s.bytes = s.bytes.saturating_sub(surplus);
        }
        self.budget.released.notify_waiters();
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn limits_bytes_and_chunks() {
        let b = Budget::new(100, 3);
        let p1 = b.try_acquire(60);
        assert!(p1.is_some());
        assert!(b.try_acquire(50).is_none());
        let mut p2 = b.try_acquire(40);
        assert!(p2.is_some());
        assert_eq!(b.bytes(), 100);
        if let Some(p) = p2.as_mut() {
            p.shrink_to(10);
        }
        assert_eq!(b.bytes(), 70);
        let p3 = b.try_acquire(0);
        assert!(p3.is_some());
        assert!(b.try_acquire(0).is_none(), "chunk limit");
        drop((p1, p2, p3));
        assert_eq!((b.bytes(), b.chunks()), (0, 0));
    }

    #[test]
    fn oversized_request_granted_when_empty() {
        let b = Budget::new(100, 10);
        let p = b.try_acquire(500);
        assert!(p.is_some());
        assert!(b.try_acquire(1).is_none());
    }

    #[tokio::test]
    async fn waiter_wakes_on_release_and_on_limit_change() {
        let b = Budget::new(100, 10);
        let held = b.try_acquire(100);
        let b2 = Arc::clone(&b);
        let waiter = tokio::spawn(async move { b2.acquire(50).await.bytes() });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(held);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert!(matches!(got, Ok(Ok(50))));

        let held = b.try_acquire(100);
        let b3 = Arc::clone(&b);
        let waiter = tokio::spawn(async move { b3.acquire(50).await.bytes() });
        tokio::task::yield_now().await;
        b.set_limit_bytes(200);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert!(matches!(got, Ok(Ok(50))));
        drop(held);
    }
}
