//! Commit answers in one hand-off per group commit: the writer thread leaves the commit's
//! replies (what lets each PUBACK go) and the devices to notify in a batch, and wakes one task
//! on the hub's runtime, which answers them there. Each answer sent from the writer thread was a
//! wake-up from outside the runtime, a write to its eventfd: at home ~20 system calls per group
//! commit, two per event (issue 12). Order is kept: replies in commit order, then the devices.
//! Without a tokio runtime at open the writer answers directly. Only successful commits come
//! here (a failed one's errors go straight back). It must not touch the database.

use super::{CommitReply, Notifier};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Where the writer hands a commit's answers.
pub(super) enum Answers {
    /// On the writer thread itself (no runtime at open).
    Direct(Notifier),
    /// To the answering task on the runtime.
    Task(Arc<Shared>),
}

#[derive(Default)]
struct Batch {
    replies: Vec<CommitReply>,
    devices: Vec<u64>,
}

pub(super) struct Shared {
    batch: Mutex<Batch>,
    ready: Notify,
    closed: AtomicBool,
}

impl Answers {
    /// Starts the answering task on the current runtime, if there is one.
    pub(super) fn start(notifier: Notifier) -> Answers {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return Answers::Direct(notifier);
        };
        let shared = Arc::new(Shared {
            batch: Mutex::new(Batch::default()),
            ready: Notify::new(),
            closed: AtomicBool::new(false),
        });
        let me = shared.clone();
        rt.spawn(async move {
            // Swapped with the shared batch, so both keep their room (no allocation per commit).
            let mut spare = Batch::default();
            loop {
                let closed = me.closed.load(SeqCst);
                std::mem::swap(&mut spare, &mut me.batch.lock().expect("answers lock"));
                answer(&mut spare.replies, &spare.devices, &notifier);
                spare.devices.clear();
                if closed {
                    return;
                }
                me.ready.notified().await;
            }
        });
        Answers::Task(shared)
    }

    /// Hands over one successful commit's replies (drained) and devices.
    pub(super) fn hand_over(&self, replies: &mut Vec<CommitReply>, devices: &[u64]) {
        match self {
            Answers::Direct(notifier) => answer(replies, devices, notifier),
            Answers::Task(s) => {
                {
                    let mut b = s.batch.lock().expect("answers lock");
                    b.replies.append(replies);
                    b.devices.extend_from_slice(devices);
                }
                s.ready.notify_one();
            }
        }
    }

    /// The writer stops: the task answers what is left and ends.
    pub(super) fn close(&self) {
        if let Answers::Task(s) = self {
            s.closed.store(true, SeqCst);
            s.ready.notify_one();
        }
    }
}

fn answer(replies: &mut Vec<CommitReply>, devices: &[u64], notifier: &Notifier) {
    for tx in replies.drain(..) {
        let _ = tx.send(Ok(()));
    }
    for d in devices {
        notifier(*d);
    }
}
