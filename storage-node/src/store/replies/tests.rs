//! Tests of the callers' replies: each registered request gets the core's one answer,
//! and a second answer, or one for an id never registered, reaches nobody.

use tokio::sync::oneshot;

use roamdisk_core::ids::GroupId;
use roamdisk_core::node::{Outcome, Refused, ReqId};

use super::*;

fn propose(replies: &mut Replies) -> (ReqId, oneshot::Receiver<Answer>) {
    let (tx, rx) = oneshot::channel();
    (replies.register(Reply::Propose(tx)), rx)
}

fn read(replies: &mut Replies) -> (ReqId, oneshot::Receiver<Result<(), Refused>>) {
    let (tx, rx) = oneshot::channel();
    (replies.register(Reply::Read(tx)), rx)
}

#[test]
fn every_registered_request_gets_its_own_id_and_counts_as_waiting() {
    let mut replies = Replies::default();
    assert_eq!(replies.len(), 0);
    let (a, _ra) = propose(&mut replies);
    let (b, _rb) = read(&mut replies);
    let (c, _rc) = propose(&mut replies);
    assert_ne!(a, b);
    assert_ne!(b, c);
    assert_ne!(a, c);
    assert_eq!(replies.len(), 3);
}

#[test]
fn an_answer_reaches_its_own_caller_and_no_other() {
    let mut replies = Replies::default();
    let (a, mut ra) = propose(&mut replies);
    let (b, mut rb) = propose(&mut replies);
    replies.answer(b, Err(Refused::Busy));
    assert_eq!(rb.try_recv(), Ok(Err(Refused::Busy)));
    assert!(
        matches!(ra.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
        "the other caller still waits"
    );
    assert_eq!(replies.len(), 1);
    replies.answer(a, Ok(Outcome::Volume));
    assert_eq!(ra.try_recv(), Ok(Ok(Outcome::Volume)));
    assert_eq!(replies.len(), 0);
}

#[test]
fn a_read_gets_the_answer_without_its_outcome() {
    let mut replies = Replies::default();
    let (ok, mut r_ok) = read(&mut replies);
    let (refused, mut r_refused) = read(&mut replies);
    replies.answer(ok, Ok(Outcome::Volume));
    replies.answer(refused, Err(Refused::NoGroup(GroupId(4))));
    assert_eq!(r_ok.try_recv(), Ok(Ok(())));
    assert_eq!(r_refused.try_recv(), Ok(Err(Refused::NoGroup(GroupId(4)))));
    assert_eq!(replies.len(), 0);
}

#[test]
fn a_second_answer_or_one_for_an_unknown_id_is_ignored() {
    let mut replies = Replies::default();
    let (a, mut ra) = propose(&mut replies);
    let (b, mut rb) = propose(&mut replies);
    replies.answer(a, Ok(Outcome::Volume));
    // Answered already: the caller keeps the first answer, the other request still waits.
    replies.answer(a, Err(Refused::Superseded));
    assert_eq!(replies.len(), 1);
    // Never registered: nothing waits on it, nothing changes.
    replies.answer(ReqId(u64::MAX), Err(Refused::Busy));
    assert_eq!(replies.len(), 1);
    assert_eq!(ra.try_recv(), Ok(Ok(Outcome::Volume)));
    assert!(matches!(
        rb.try_recv(),
        Err(oneshot::error::TryRecvError::Empty)
    ));
    // The remaining request is answered as usual.
    replies.answer(b, Err(Refused::Superseded));
    assert_eq!(rb.try_recv(), Ok(Err(Refused::Superseded)));
    assert_eq!(replies.len(), 0);
}

#[test]
fn an_answer_to_a_caller_that_gave_up_is_dropped_and_forgotten() {
    let mut replies = Replies::default();
    let (a, ra) = propose(&mut replies);
    let (b, rb) = read(&mut replies);
    drop(ra);
    drop(rb);
    replies.answer(a, Ok(Outcome::Volume));
    replies.answer(b, Ok(Outcome::Volume));
    assert_eq!(replies.len(), 0);
}

#[test]
fn ids_are_not_reused_after_an_answer() {
    let mut replies = Replies::default();
    let (a, _ra) = propose(&mut replies);
    replies.answer(a, Ok(Outcome::Volume));
    let (b, mut rb) = propose(&mut replies);
    assert_ne!(a, b, "a late duplicate answer for `a` must not reach `b`");
    replies.answer(a, Err(Refused::Busy));
    assert!(matches!(
        rb.try_recv(),
        Err(oneshot::error::TryRecvError::Empty)
    ));
    assert_eq!(replies.len(), 1);
}
