//! Commit answers in one hand-off per group commit: the writer thread leaves the commit's
//! replies (what lets each PUBACK go) and the devices to notify in a batch, and wakes one task
//! on the hub's runtime, which answers them there. Each answer sent from the writer thread was a
//! wake-up from outside the runtime, a write to its eventfd: at home ~20 system calls per group
//! commit, two per event (issue 12). Order is kept: replies in commit order, then the devices.
//! It must not touch the database, and it needs a tokio runtime at open (without one the writer
//! answers directly, as before).

use super::{CommitReply, Notifier, OutboxError};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// One append's answer.
pub(super) type Answer = (CommitReply, Result<(), Arc<OutboxError>>);

#[derive(Default)]
struct Batch {
    replies: Vec<Answer>,
    devices: Vec<u64>,
}

/// The writer's side of the hand-off.
pub(super) struct Answers {
    batch: Mutex<Batch>,
    ready: Notify,
    closed: AtomicBool,
}

impl Answers {
    /// Starts the answering task on the current runtime, if there is one.
    pub(super) fn start(notifier: Notifier) -> Option<Arc<Answers>> {
        let rt = tokio::runtime::Handle::try_current().ok()?;
        let me = Arc::new(Answers {
            batch: Mutex::new(Batch::default()),
            ready: Notify::new(),
            closed: AtomicBool::new(false),
        });
        let answers = me.clone();
        rt.spawn(async move {
            // Swapped with the shared batch, so both keep their room (no allocation per commit).
            let mut spare = Batch::default();
            loop {
                let closed = answers.closed.load(SeqCst);
                std::mem::swap(&mut spare, &mut answers.batch.lock().expect("answers lock"));
                for (tx, r) in spare.replies.drain(..) {
                    let _ = tx.send(r);
                }
                for d in spare.devices.drain(..) {
                    notifier(d);
                }
                if closed {
                    return;
                }
                answers.ready.notified().await;
            }
        });
        Some(me)
    }

    /// Hands over one commit's answers and devices (drained) and wakes the task once.
    pub(super) fn hand_over(&self, replies: &mut Vec<Answer>, devices: &[u64]) {
        {
            let mut b = self.batch.lock().expect("answers lock");
            b.replies.append(replies);
            b.devices.extend_from_slice(devices);
        }
        self.ready.notify_one();
    }

    /// The writer stops: the task answers what is left and ends.
    pub(super) fn close(&self) {
        self.closed.store(true, SeqCst);
        self.ready.notify_one();
    }
}
