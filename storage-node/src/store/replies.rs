//! The callers waiting on the core: each request handed to it gets a [`ReqId`], and the
//! core answers every id exactly once (`Effect::Answer`).

use std::collections::HashMap;

use roamdisk_core::node::{Answer, ReqId};
use tracing::error;

use super::{ProposeReply, ReadReply};

pub(super) enum Reply {
    /// A proposal or a flush.
    Propose(ProposeReply),
    Read(ReadReply),
}

/// Requests in flight in the core. Bounded by the core's own bounds on what it keeps
/// waiting (`PENDING_PROPOSALS_MAX`, `PENDING_READS_MAX` per group): it answers at once
/// what it will not keep.
#[derive(Default)]
pub(super) struct Replies {
    next: u64,
    waiting: HashMap<ReqId, Reply>,
}

impl Replies {
    pub fn register(&mut self, reply: Reply) -> ReqId {
        self.next += 1;
        let id = ReqId(self.next);
        self.waiting.insert(id, reply);
        id
    }

    pub fn answer(&mut self, id: ReqId, answer: Answer) {
        match self.waiting.remove(&id) {
            Some(Reply::Propose(tx)) => {
                let _ = tx.send(answer);
            }
            Some(Reply::Read(tx)) => {
                let _ = tx.send(answer.map(|_| ()));
            }
            None => error!(
                id = id.0,
                "the node core answered a request twice or one it never had"
            ),
        }
    }

    /// Requests still waiting (for tests and shutdown).
    pub fn len(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests;
