//! What passes between the writer thread and the uplink without a round trip through the
//! writer's queue (issue 12: at home rates each such round trip was a thread wake-up, and a
//! read, per event). Rows just committed go to the uplink with the commit notification; rows
//! MODE acknowledged go to the writer, which deletes them with its next commit. The outbox
//! stays the only truth: either side falls back to it when the sequence is broken. This file
//! must not touch the database.

use super::{Outbox, Row};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::Duration;

/// Acknowledged rows are deleted in the next append's transaction, or after this long when no
/// append comes, or at once when `ACK_BATCH` are waiting: a delete of its own costs a commit (a
/// few pages written to the card, and a sync). With 1 s, a home sending less than about once a
/// second paid two commits per group, one for the rows and one for their deletes; with 10 s the
/// deletes ride on the next group down to one event in 10 s. Until then `fetch` skips them, and
/// after a crash or power cut they are only sent again (at-least-once; `_seq` tells the
/// duplicates).
pub(super) const ACK_DELAY: Duration = Duration::from_secs(10);
pub(super) const ACK_BATCH: usize = 1024;

/// Most rows kept per device for its uplink; beyond, it reads the outbox instead.
const HANDOFF_MAX: usize = 64;

/// Rows MODE acknowledged, handed to the writer without waking it.
#[derive(Default)]
pub(super) struct Acked {
    pub(super) ids: Mutex<Vec<i64>>,
    /// The writer sleeps without a deadline: the next acknowledgement must wake it.
    pub(super) writer_idle: AtomicBool,
}

/// Rows just committed, per device, for an uplink that said it is caught up
/// ([`Outbox::listen`]). Anything that breaks the sequence (too many waiting, a kv change,
/// which may be coalesced later) turns it off until the uplink reads the outbox again.
#[derive(Default)]
pub(super) struct Handoff {
    devices: Mutex<HashMap<u64, Committed>>,
}

#[derive(Default)]
struct Committed {
    listening: bool,
    rows: VecDeque<Row>,
}

impl Handoff {
    /// The rows of one commit, `(device, Some(row))` for an event and `(device, None)` for a
    /// row the uplink must read back. Called by the writer after the commit, before notifying.
    pub(super) fn committed(&self, rows: &mut Vec<(u64, Option<Row>)>) {
        if rows.is_empty() {
            return;
        }
        let mut h = self.devices.lock().expect("handoff lock");
        for (device, row) in rows.drain(..) {
            let Some(c) = h.get_mut(&device).filter(|c| c.listening) else {
                continue;
            };
            match row {
                Some(row) if c.rows.len() < HANDOFF_MAX => c.rows.push_back(row),
                _ => {
                    c.listening = false;
                    c.rows = VecDeque::new();
                }
            }
        }
    }
}

impl Outbox {
    /// The uplink of `device` is about to read the outbox up to its end: from now on, rows
    /// committed for it are also kept for [`Outbox::take_committed`].
    pub fn listen(&self, device: u64) {
        let mut h = self.handoff.devices.lock().expect("handoff lock");
        let c = h.entry(device).or_default();
        c.listening = true;
        c.rows.clear();
    }

    /// Up to `limit` rows of `device` with `id > after` committed since [`Outbox::listen`],
    /// oldest first, without reading the database; `None` when the sequence was broken and the
    /// caller must [`Outbox::listen`] and [`Outbox::fetch`] again.
    pub fn take_committed(&self, device: u64, after: i64, limit: usize) -> Option<Vec<Row>> {
        let mut h = self.handoff.devices.lock().expect("handoff lock");
        let c = h.get_mut(&device).filter(|c| c.listening)?;
        while c.rows.front().is_some_and(|r| r.id <= after) {
            c.rows.pop_front();
        }
        let n = c.rows.len().min(limit);
        Some(c.rows.drain(..n).collect())
    }
}
