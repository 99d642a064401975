//! The PUBACKs one connection owes its client, in the order its publishes came.
//!
//! Each entry waits for its commit (or is due at once: a publish the front dropped or refused is
//! acknowledged anyway, so the client moves on). The outbox commits in submission order, so only
//! the front entry is ever awaited: no boxed future and no task node per publish (issue 12: the
//! relay allocated two per event). The queue is bounded by its caller (`MAX_PENDING_ACKS`). This
//! file must not send anything: the relay writes the PUBACKs.

use crate::router::CommitWaiter;
use futures_util::FutureExt;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// PUBACKs owed, oldest first: the packet id, and the commit it waits for (`None`: due now).
#[derive(Default)]
pub(super) struct Acks {
    queue: VecDeque<(u16, Option<CommitWaiter>)>,
}

impl Acks {
    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// A PUBACK due once `waiter` says the publish is committed.
    pub(super) fn after_commit(&mut self, pkid: u16, waiter: CommitWaiter) {
        self.queue.push_back((pkid, Some(waiter)));
    }

    /// Whether a PUBACK for `pkid` is still owed. A client may not reuse a packet id before
    /// its PUBACK, so a QoS 1 publish with such an id is a retransmission of one already taken
    /// (clients such as ESP-IDF's resend after 1 s, shorter than a commit window).
    pub(super) fn owes(&self, pkid: u16) -> bool {
        self.queue.iter().any(|(p, _)| *p == pkid)
    }

    /// A PUBACK due as soon as those before it went out.
    pub(super) fn now(&mut self, pkid: u16) {
        self.queue.push_back((pkid, None));
    }

    fn poll_front(&mut self, cx: &mut Context<'_>) -> Poll<Option<(u16, bool)>> {
        let Some((pkid, waiter)) = self.queue.front_mut() else {
            return Poll::Ready(None);
        };
        let committed = match waiter {
            None => true,
            Some(w) => match Pin::new(w).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(r) => matches!(r, Ok(Ok(()))),
            },
        };
        let pkid = *pkid;
        self.queue.pop_front();
        Poll::Ready(Some((pkid, committed)))
    }

    /// The next PUBACK in order once it is due: its packet id and whether the publish was
    /// committed (false: the outbox failed; no PUBACK may go out). `None` when nothing is owed.
    /// Cancel-safe: an entry leaves the queue only when this returns it.
    pub(super) async fn next(&mut self) -> Option<(u16, bool)> {
        std::future::poll_fn(|cx| self.poll_front(cx)).await
    }

    /// The next PUBACK if it is due right now (what the same commit made ready).
    pub(super) fn next_ready(&mut self) -> Option<(u16, bool)> {
        std::future::poll_fn(|cx| self.poll_front(cx))
            .now_or_never()
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn puback_order_follows_the_publishes_and_waits_for_each_commit() {
        let mut acks = Acks::default();
        let (c1, w1) = tokio::sync::oneshot::channel();
        let (c2, w2) = tokio::sync::oneshot::channel();
        acks.after_commit(1, w1);
        acks.now(2);
        acks.after_commit(3, w2);
        assert_eq!(acks.len(), 3);
        // Nothing is due before the first commit, not even the entry that needs none.
        assert_eq!(acks.next_ready(), None);
        c2.send(Ok(())).unwrap();
        assert_eq!(
            acks.next_ready(),
            None,
            "a later commit does not jump the line"
        );
        c1.send(Ok(())).unwrap();
        assert_eq!(acks.next().await, Some((1, true)));
        assert_eq!(acks.next_ready(), Some((2, true)));
        assert_eq!(acks.next_ready(), Some((3, true)));
        assert!(acks.is_empty());
        assert_eq!(acks.next().await, None);
    }

    #[tokio::test]
    async fn a_failed_or_abandoned_commit_is_not_acknowledged() {
        let mut acks = Acks::default();
        let (c1, w1) = tokio::sync::oneshot::channel();
        let (c2, w2) = tokio::sync::oneshot::channel::<Result<(), Arc<_>>>();
        acks.after_commit(7, w1);
        acks.after_commit(8, w2);
        c1.send(Err(Arc::new(crate::outbox::OutboxError::Closed)))
            .unwrap();
        drop(c2);
        assert_eq!(acks.next().await, Some((7, false)));
        assert_eq!(acks.next().await, Some((8, false)));
    }
}
