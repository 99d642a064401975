//! The commit window's rule: how long the writer holds a group commit open for more appends,
//! from the arrival rate and from when each device last got its answer (under a steady high rate
//! the next window starts at the last commit: the tick), and which appends must
//! wake the writer during a window ([`Shared::ends_window`]; the others wait for its end
//! unseen). It must not touch the database or the channel (the writer does).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Above this many appends a second (counted over the last half second or second) the window is
/// [`SHORT_WINDOW`] at most: under load the queue fills while a commit runs and batches by
/// itself, and the latency budget is a millisecond or two.
const LOW_RATE: f64 = 50.0;
/// 1.5 ms, exactly: the writer waits it parked (`park_timeout`). It was 1 ms on a tokio timer,
/// which rounds up to the next whole millisecond (1-2 ms); 1 ms exact gave 1.7x the bytes and
/// 1.25x the CPU per event at 1,000 msg/s, 1.5 ms the old figures with 12 % fewer wake-ups, for
/// ~0.4 ms more p99 there (issue 12, docs/BENCHMARKS.md).
pub(super) const SHORT_WINDOW: Duration = Duration::from_micros(1500);
/// At or above this many appends a second a group's window starts when the previous commit
/// ends, not at its first append ([`Pace::tick`]): the writer sleeps one [`TICK`] parked
/// and then commits what came, so no append has to wake it (a system call for the
/// submitter and a wake-up for the writer per commit; issue 12, CPU at 1,000 msg/s). At this
/// rate a window holds one append or more on average; the first empty one ends the ticking.
const TICK_RATE: f64 = 600.0;
/// The window of a tick: 2 ms, so that at 1,000 msg/s a commit still takes two events as the
/// 1.5 ms window from the first append did (a commit every 2 ms either way), with half the
/// wait on average.
pub(super) const TICK: Duration = Duration::from_millis(2);
/// A window ends when this many rows are waiting.
pub(super) const WINDOW_ROWS: usize = 64;
/// A device that sends again this soon after its last PUBACK is taken to wait for each PUBACK
/// (one message in flight): holding its appends would hold it to one message per window, so
/// its appends end the window (at low rates; at high rates the bound is the short window).
const CLOSED_LOOP: Duration = Duration::from_millis(50);

/// The commit window's inputs: the arrival rate (appends counted over the current and the
/// previous [`RATE_BUCKET`]), and (in [`Shared`]) when each device last got its answer.
#[derive(Default)]
pub(super) struct Pace {
    /// Appends in the current bucket (started at `bucket_at`) and in the one before.
    current: u64,
    previous: u64,
    bucket_at: Option<Instant>,
    pub(super) shared: Arc<Shared>,
}

/// What the submitting side reads to decide whether an append must wake the writer in its
/// window: the writer keeps it, [`super::Outbox::submit`] reads it.
#[derive(Default)]
pub(super) struct Shared {
    /// Whether the current group's window is the long one.
    long: AtomicBool,
    /// When each device last got its answer (a lock per append and per device answered).
    answered: Mutex<HashMap<u64, Instant>>,
    /// Appends submitted and not yet taken into a commit.
    pub(super) queued: AtomicUsize,
}

impl Shared {
    /// Whether `device` seems to wait for each PUBACK before sending again (see `CLOSED_LOOP`).
    pub(super) fn waits_for_puback(&self, device: u64, now: Instant) -> bool {
        let bound = if self.long.load(Relaxed) {
            CLOSED_LOOP
        } else {
            SHORT_WINDOW
        };
        self.answered
            .lock()
            .expect("pace lock")
            .get(&device)
            .is_some_and(|at| now.saturating_duration_since(*at) <= bound)
    }

    /// Whether an append of `device`, submitted now, ends an open window (the writer decides
    /// again when it takes it: a wrong guess here costs a wake-up or a window's wait, never an
    /// append). The others need not wake the writer: it takes them when the window ends, so at
    /// home a group commit costs the writer one wake-up instead of one per event (issue 12).
    pub(super) fn ends_window(&self, device: u64) -> bool {
        self.queued.load(Relaxed) >= WINDOW_ROWS || self.waits_for_puback(device, Instant::now())
    }
}

/// The arrival rate is counted over half-second buckets.
const RATE_BUCKET: Duration = Duration::from_millis(500);

impl Pace {
    /// Appends per second over the current and the previous bucket.
    fn rate(&mut self, now: Instant) -> f64 {
        let at = *self.bucket_at.get_or_insert(now);
        let age = now.saturating_duration_since(at);
        if age >= RATE_BUCKET {
            self.previous = if age < 2 * RATE_BUCKET {
                self.current
            } else {
                0
            };
            self.current = 0;
            self.bucket_at = Some(now);
        }
        let span = RATE_BUCKET + now.saturating_duration_since(self.bucket_at.unwrap_or(now));
        (self.previous + self.current) as f64 / span.as_secs_f64()
    }

    /// How long the writer, just done with a commit of appends at `now`, should wait parked
    /// for the next group instead of waiting for its first append on the channel; `None`: wait
    /// on the channel (see [`TICK_RATE`]).
    pub(super) fn tick(&mut self, commit_window: Duration, now: Instant) -> Option<Duration> {
        if commit_window.is_zero() || self.rate(now) < TICK_RATE {
            return None;
        }
        self.shared.long.store(false, Relaxed);
        Some(commit_window.min(TICK))
    }

    /// Where the window of a group whose first append (of `device`) came at `now` ends;
    /// `None`: commit at once.
    pub(super) fn window_for(
        &mut self,
        commit_window: Duration,
        device: u64,
        now: Instant,
    ) -> Option<Instant> {
        if commit_window.is_zero() {
            return None;
        }
        let long = self.rate(now) < LOW_RATE;
        self.shared.long.store(long, Relaxed);
        if self.waits_for_puback(device, now) {
            return None;
        }
        let w = if long {
            commit_window
        } else {
            commit_window.min(SHORT_WINDOW)
        };
        Some(now + w)
    }

    pub(super) fn waits_for_puback(&self, device: u64, now: Instant) -> bool {
        self.shared.waits_for_puback(device, now)
    }

    /// A group of `rows` appends (taken from the queue, so counted in `queued` by `submit`) is
    /// about to be committed.
    pub(super) fn grouped(&mut self, rows: usize, now: Instant) {
        self.rate(now);
        self.current += rows as u64;
        self.shared.queued.fetch_sub(rows, Relaxed);
    }

    /// The devices of a commit got their answers at `at`.
    pub(super) fn answered(&mut self, devices: &[u64], at: Instant) {
        let mut answered = self.shared.answered.lock().expect("pace lock");
        for d in devices {
            answered.insert(*d, at);
        }
    }
}
