//! The node's lease: how a site that is cut off stops acknowledging before another site
//! takes its volumes over.
//!
//! A node answers volume requests (writes, flushes, reads: every `Ok` a client sees)
//! only while it holds a lease from the metadata quorum, whose voters span sites. The
//! core renews it itself: every `lease / 4` it asks the metadata group for a read index
//! (`ReadOnlySafe`: the metadata leader confirms its leadership with a quorum heartbeat
//! round), and once this node's metadata has applied up to that index the lease runs
//! until `started + lease`, `started` being when the renewal was asked. Answers that
//! arrive without a valid lease wait (`GroupCore::suspended`); they are given when the
//! lease comes back, or refused with `Refused::Fenced` if a failover fenced the group
//! meanwhile. Writes wait; they never fail because the site lost its link.
//!
//! Why it fences: a failover commits in the metadata group at some instant F. A renewal
//! whose read was linearized before F started before F; the old home answers at most
//! `lease` after that start, as measured by its own clock. A renewal linearized after F
//! applies F (the metadata up to the read index) before it grants anything, and F
//! fences the group here. The new home holds its answers for `lease + drift` after it
//! applied F, which is after F. With clock *rates* that differ by at most ε, the old
//! home's lease ends before the new home answers when `drift ≥ 2·ε·lease/(1-ε)`; no
//! wall clocks need to agree. `LEASE_DRIFT` (500 ms against a 4 s lease) allows ε up to
//! 5.8 %, far above what a crystal or NTP's slew (0.05 %) drifts.

use std::time::Duration;

use crate::ids::META_GROUP;
use crate::logstore::LogStore;
use crate::time::Time;

use super::{NodeConfig, NodeCore};

/// High bit of a lease renewal's sequence number. A renewal's read-index context is 16
/// bytes, the number and this node's id (other reads' are 8): the metadata leader
/// answers only the first of two pending requests with the same context, so it must be
/// unique in the cluster (two nodes renewing with equal numbers starved one of them).
pub(super) const LEASE_CTX: u64 = 1 << 63;

/// The read-index context of lease renewal `seq` of node `me`.
fn lease_ctx(seq: u64, me: u64) -> Vec<u8> {
    let mut v = (LEASE_CTX | seq).to_be_bytes().to_vec();
    v.extend_from_slice(&me.to_be_bytes());
    v
}

/// The renewal number in a read state's context, if it is a lease renewal's.
pub(super) fn lease_seq(ctx: &[u8]) -> Option<u64> {
    (ctx.len() == 16)
        .then(|| u64::from_be_bytes(ctx[..8].try_into().expect("16 bytes")))
        .filter(|s| s & LEASE_CTX != 0)
}

#[derive(Debug, Default)]
pub(super) struct Lease {
    /// Answers may be given until then (`None`: not granted since the start).
    pub until: Option<Time>,
    /// A renewal in flight: its context and when it was asked.
    pub(in crate::node) asked: Option<(u64, Time)>,
    /// A renewal whose read index arrived: granted once the metadata applied that far.
    pub(in crate::node) granted: Option<(Time, u64)>,
    /// When the last renewal was asked.
    last_ask: Option<Time>,
    seq: u64,
}

impl Lease {
    /// Whether volume answers may be given now.
    pub fn open(&self, cfg: &NodeConfig, now: Time) -> bool {
        cfg.lease.is_none() || self.until.is_some_and(|u| now < u)
    }
}

impl<S: LogStore> NodeCore<S> {
    /// Renews the lease when due, and grants a renewal whose read index has applied.
    pub(super) fn lease_tick(&mut self, now: Time) {
        let Some(len) = self.cfg.lease else {
            return;
        };
        self.lease_grant(now);
        let every = len / 4;
        if let Some((_, at)) = self.lease.asked {
            // Lost (no metadata leader, a partition): ask again.
            if now.saturating_duration_since(at) >= every.max(Duration::from_millis(500)) {
                self.lease.asked = None;
            }
        }
        if self.lease.asked.is_some() || self.lease.granted.is_some() {
            return;
        }
        if self
            .lease
            .last_ask
            .is_some_and(|t| now.saturating_duration_since(t) < every)
        {
            return;
        }
        let Some(meta) = self.groups.get_mut(&META_GROUP) else {
            return;
        };
        self.lease.seq += 1;
        let ctx = LEASE_CTX | self.lease.seq;
        meta.raft
            .read_index(lease_ctx(self.lease.seq, self.cfg.me.0));
        self.lease.asked = Some((ctx, now));
        self.lease.last_ask = Some(now);
    }

    /// A read state of the metadata group arrived; returns whether it was the lease's.
    pub(super) fn lease_read_state(&mut self, ctx: u64, index: u64, now: Time) -> bool {
        if ctx & LEASE_CTX == 0 {
            return false;
        }
        if let Some((asked, started)) = self.lease.asked {
            if asked == ctx {
                self.lease.asked = None;
                self.lease.granted = Some((started, index));
                self.lease_grant(now);
            }
        }
        true
    }

    /// Grants a renewal once the metadata applied its read index: any failover
    /// committed before the read is applied (and has fenced its groups) by then.
    pub(super) fn lease_grant(&mut self, now: Time) {
        let Some(len) = self.cfg.lease else {
            return;
        };
        let Some((started, index)) = self.lease.granted else {
            return;
        };
        let applied = self.groups.get(&META_GROUP).map_or(0, |g| g.applied.0);
        if applied < index {
            return;
        }
        self.lease.granted = None;
        let until = started + len;
        if self.lease.until.is_none_or(|u| u < until) {
            if !self.lease.open(&self.cfg, now) {
                tracing::info!("lease from the metadata quorum granted: volume answers resume");
            }
            self.lease.until = Some(until);
        }
    }

    /// Whether this node holds the lease now (always, when leases are off).
    pub fn lease_valid(&self, now: Time) -> bool {
        self.lease.open(&self.cfg, now)
    }
}
