//! The uplink: drains the outbox to MODE, one session per device.
//!
//! Each device gets its own task and session, so one slow, refused, held or offline device never
//! holds up another. A task sends its device's rows strictly in outbox order with a bounded window
//! of unacknowledged publishes, deletes a row only when MODE acknowledges it, and after any
//! connection loss starts again from the oldest row still in the outbox (at-least-once; the
//! per-device `_seq` lets consumers drop the duplicates). Reconnects back off exponentially with
//! half jitter up to a minute; a refused login parks the device and retries rarely.
//!
//! Every send takes a token from the device's bucket and from the hub-wide one ([`crate::pacing`]):
//! a device replaying a backlog queues fairly behind the other replaying devices and leaves the
//! live share alone. A session that MODE ends right after a burst halves the device's rate (AIMD).
//!
//! Holds: while the device's home is deactivated ([`crate::homes`]) the session stays up (commands
//! and kv updates still come down) but nothing of the device's is sent; when the home is active
//! again the held rows go in their original order. A refusal that is not permanent (a 403, a
//! refused kv write, a reason the hub does not know) pokes the home watcher and holds the device
//! for `cloud.home_poll_interval_secs` before it tries again from the refused row. What MODE sends
//! down is passed on untouched to the downlink. This module must not speak SQL or parse MODE
//! payloads: it moves rows and bytes.

use crate::homes::Homes;
use crate::local::ModeId;
use crate::metrics::Metrics;
use crate::mode::{Session, SessionConfig, SessionEvent};
use crate::outbox::{Outbox, Row};
use crate::pacing::{Class, DevicePaceStatus, DevicePacer, Pacer};
use crate::registry::{Device, DeviceId};
use crate::timing::now_ms;
pub use crate::timing::Backoff;
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Something MODE sent to one device.
#[derive(Debug)]
pub enum Downstream {
    Command(DeviceId, Bytes),
    Kv(DeviceId, Bytes),
    /// A kv message that must be in the mirror before the uplink sends anything: the store
    /// read at (re)connect over REST, which has no revisions to order it against local changes
    /// acknowledged afterwards. The sender is answered once it is applied.
    KvBarrier(DeviceId, Bytes, tokio::sync::oneshot::Sender<()>),
}

/// Upstream session state of one device, for status and health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionState {
    Connecting,
    Up,
    /// Waiting to retry after a failure.
    Down(String),
    /// MODE refused the credentials.
    Refused(String),
}

/// Why a device is not sending right now, for status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    /// Its home is deactivated in MODE.
    HomeDeactivated,
    /// MODE refused one of its messages (`status reason`); retried at `retry_at_ms` (unix ms).
    Refused { reason: String, retry_at_ms: i64 },
}

/// What status shows of one device's uplink (shared with its task).
#[derive(Debug)]
pub struct UplinkStatus {
    pub mode_id: ModeId,
    pub name: String,
    pub pace: Arc<DevicePaceStatus>,
    hold: Mutex<Option<Hold>>,
    /// The last upstream error and when (unix ms).
    last_error: Mutex<Option<(String, i64)>>,
    /// How kv stands for this device (refusals, oversized reloads); kept across sessions.
    pub kv: Arc<crate::mode::KvHealth>,
}

impl UplinkStatus {
    pub fn hold(&self) -> Option<Hold> {
        self.hold.lock().expect("status lock").clone()
    }
    /// The last upstream error (session lost, MODE unreachable or refusing) and when (unix ms).
    pub fn last_error(&self) -> Option<(String, i64)> {
        self.last_error.lock().expect("status lock").clone()
    }
    fn set_hold(&self, h: Option<Hold>) {
        *self.hold.lock().expect("status lock") = h;
    }
}

/// One device's backlog, for `modehub status` and metrics.
#[derive(Debug, Clone)]
pub struct DeviceBacklog {
    pub name: String,
    pub mode_id: ModeId,
    pub rows: u64,
    pub bytes: u64,
    /// When the oldest waiting row was accepted (unix ms).
    pub oldest_ms: Option<i64>,
    /// The device's current allowed rate, messages a minute (after AIMD).
    pub rate_per_minute: f64,
    /// Delivery rate seen recently, messages a minute (0 when nothing was delivered lately).
    pub drain_per_minute: f64,
    pub replaying: bool,
    pub hold: Option<Hold>,
    /// Estimated time to drain at the expected rate; `None` while held or when nothing moves.
    pub eta: Option<Duration>,
}

/// Most acknowledged rows remembered per device (see `DeviceUplink::retain_acked`).
const RECENT_MAX: usize = 4096;

/// Rows MODE acknowledged recently, with when (monotonic), oldest first.
type Recent = VecDeque<(std::time::Instant, Row)>;

/// How long a refused device waits before trying its credentials again.
const PARKED_RETRY: Duration = Duration::from_secs(600);
/// A session that stayed up this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(30);

/// Everything one device's uplink task needs.
pub struct DeviceUplink {
    pub device: Device,
    pub outbox: Outbox,
    pub session: SessionConfig,
    pub notify: Arc<Notify>,
    pub downstream: mpsc::Sender<Downstream>,
    pub metrics: Arc<Metrics>,
    pub state: watch::Sender<SessionState>,
    pub shutdown: CancellationToken,
    /// Hub-wide pacing.
    pub pacer: Arc<Pacer>,
    /// This device's bucket (AIMD).
    pub pace: DevicePacer,
    pub homes: Arc<Homes>,
    /// How long a device waits after a refusal before trying again.
    pub refusal_retry: Duration,
    /// How long rows MODE acknowledged are remembered (in memory), so that those acknowledged
    /// after the home's last "active" read can be sent again if the home turns out to be
    /// deactivated (MODE acknowledges and drops such messages). Zero: not remembered.
    pub retain_acked: Duration,
    pub status: Arc<UplinkStatus>,
}

/// Why `pump` returned.
struct Ended {
    reason: String,
    /// MODE (or the network) ended the session, rather than the hub.
    remote: bool,
    /// MODE acknowledged at least one row in the session.
    progressed: bool,
}

type Permit = Pin<Box<dyn Future<Output = ()> + Send>>;

impl DeviceUplink {
    /// The status record to hand to [`crate::Hub`] before the task starts.
    pub fn new_status(device: &Device, pace: &DevicePacer) -> Arc<UplinkStatus> {
        Arc::new(UplinkStatus {
            mode_id: device.mode_id,
            name: device.name.clone(),
            pace: pace.status(),
            hold: Mutex::new(None),
            last_error: Mutex::new(None),
            kv: Arc::default(),
        })
    }

    /// Publishes the session state, remembering errors for status.
    fn set_state(&self, s: SessionState) {
        let error = match &s {
            SessionState::Down(r) => Some(format!("upstream: {r}")),
            SessionState::Refused(r) => Some(format!("upstream refused: {r}")),
            _ => None,
        };
        if let Some(e) = error {
            *self.status.last_error.lock().expect("status lock") = Some((e, now_ms()));
        }
        self.state.send_replace(s);
    }

    /// Runs until shutdown.
    pub async fn run(mut self) {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
        let mut recent = Recent::new();
        // Spread the first connects of many devices a little.
        self.sleep(Duration::from_millis(fastrand::u64(0..200)))
            .await;
        while !self.shutdown.is_cancelled() {
            self.set_state(SessionState::Connecting);
            self.metrics.upstream_connects.fetch_add(1, Relaxed);
            let connected = tokio::select! {
                r = Session::connect(&self.session, self.device.mode_id, &self.device.api_key, &self.status.kv) => r,
                _ = self.shutdown.cancelled() => break,
            };
            let delay = match connected {
                Ok(session) => {
                    tracing::info!(device = %self.device.name, mode_id = self.device.mode_id.get(), "upstream session up");
                    self.set_state(SessionState::Up);
                    let started = tokio::time::Instant::now();
                    let ended = self.pump(session, &mut recent).await;
                    self.pace.set_replaying(false, self.pacer.stats());
                    if self.shutdown.is_cancelled() {
                        break;
                    }
                    if ended.remote && self.pace.session_ended(self.pacer.stats()) {
                        tracing::warn!(device = %self.device.name, rate_per_minute = self.pace.rate() as u64,
                            "MODE ended the session right after a burst (a rate limit?): pacing this device down");
                    }
                    if started.elapsed() >= STABLE_SESSION {
                        backoff.reset();
                    } else if ended.progressed {
                        // MODE took rows in it: the link works, so the wait does not grow (a
                        // session cut after every few messages would otherwise back off to
                        // a minute while the backlog waits; the pace above handles a rate limit).
                        backoff.hold();
                    }
                    let d = backoff.next_delay();
                    tracing::warn!(device = %self.device.name, reason = %ended.reason, retry_in = ?d, "upstream session lost; outbox keeps everything");
                    self.set_state(SessionState::Down(ended.reason));
                    d
                }
                Err(e) if e.is_auth() => {
                    self.metrics.upstream_connect_failures.fetch_add(1, Relaxed);
                    tracing::error!(device = %self.device.name, mode_id = self.device.mode_id.get(), error = %e, retry_in = ?PARKED_RETRY, "MODE REFUSED THIS DEVICE'S CREDENTIALS; its data is kept in the outbox. Fix mode_id / api_key in the config.");
                    self.set_state(SessionState::Refused(e.to_string()));
                    PARKED_RETRY
                }
                Err(e) => {
                    self.metrics.upstream_connect_failures.fetch_add(1, Relaxed);
                    let d = backoff.next_delay();
                    tracing::warn!(device = %self.device.name, error = %e, retry_in = ?d, "cannot reach MODE; outbox keeps everything");
                    self.set_state(SessionState::Down(e.to_string()));
                    d
                }
            };
            self.sleep(delay).await;
        }
        self.state
            .send_replace(SessionState::Down("hub stopping".into()));
    }

    async fn sleep(&mut self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.shutdown.cancelled() => {}
        }
    }

    /// A permit to send one message: the device's token (by waiting) then a hub-wide one.
    fn permit(&mut self, class: Class) -> Permit {
        let wait = self.pace.wait();
        let pacer = self.pacer.clone();
        if !wait.is_zero() {
            pacer.stats().waited.fetch_add(1, Relaxed);
        }
        Box::pin(async move {
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            pacer.acquire(class).await;
        })
    }

    /// Sends `row` now (its tokens were taken or are there), kept in `sent` while `retain` is on.
    fn send_now(
        &mut self,
        session: &mut Session,
        row: Row,
        retain: Duration,
        sent: &mut HashMap<i64, Row>,
        buf: &mut Vec<u8>,
    ) -> Result<(), String> {
        self.pace.take();
        session.send(&row, &self.session.stamping, buf)?;
        if !retain.is_zero() {
            sent.insert(row.id, row);
        }
        Ok(())
    }

    /// Sends rows and handles answers until the session ends; says why it ended.
    async fn pump(&mut self, mut session: Session, recent: &mut Recent) -> Ended {
        // Only a watched home can turn out deactivated after the fact.
        let retain = if self.device.home_id.is_some() && self.homes.watched() {
            self.retain_acked
        } else {
            Duration::ZERO
        };
        // Rows sent and not yet acknowledged, kept only while `retain` is on.
        let mut sent: HashMap<i64, Row> = HashMap::new();
        let mut progressed = false;
        let window = session.window(&self.session);
        let mut initial = session.take_initial_kv();
        // MQTT: MODE sends the whole store right after the kv subscription. A local kv change
        // acknowledged before that reload is applied would be wiped by it when MODE does not
        // echo it back, so nothing is sent until it is in (bounded; commands pass).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while initial.is_none() && session.awaits_reload() {
            match tokio::time::timeout_at(deadline, session.next()).await {
                Err(_) => break,
                Ok(SessionEvent::Kv(p)) => initial = Some(p),
                Ok(SessionEvent::Command(p)) => {
                    self.metrics.commands_received.fetch_add(1, Relaxed);
                    let _ = self
                        .downstream
                        .send(Downstream::Command(self.device.id, p))
                        .await;
                }
                Ok(SessionEvent::Closed(reason)) => {
                    return Ended {
                        progressed,
                        reason,
                        remote: true,
                    }
                }
                Ok(_) => {}
            }
        }
        if let Some(reload) = initial {
            let (done, applied) = tokio::sync::oneshot::channel();
            let _ = self
                .downstream
                .send(Downstream::KvBarrier(self.device.id, reload, done))
                .await;
            let _ = tokio::time::timeout(Duration::from_secs(10), applied).await;
        }
        let mut home = self.homes.held(self.device.home_id);
        let mut home_held = *home.borrow_and_update();
        let mut refused_until: Option<Instant> = None;
        let mut cursor = 0i64;
        let mut more = true;
        // The last outbox read reached its end and the cursor was not moved back since: new rows
        // come with the commit notification (`Outbox::take_committed`), no read needed.
        let mut caught_up = false;
        // Grows to the window when a backlog replays; an idle device holds nothing (issue 12).
        let mut ready: VecDeque<Row> = VecDeque::new();
        let mut permit: Option<Permit> = None;
        let mut buf = Vec::with_capacity(256);
        self.update_hold(home_held, refused_until);
        loop {
            let held = home_held || refused_until.is_some();
            if held {
                // Keep the session (commands), send nothing. A token being waited for is given up.
                permit = None;
            } else {
                // Refill when half the window is free: one outbox read per batch of PUBACKs,
                // not one read (a round trip through the writer thread) per PUBACK.
                let room = window.saturating_sub(session.in_flight() + ready.len());
                if more && ready.is_empty() && session.in_flight() <= window / 2 {
                    let id = self.device.mode_id.get();
                    let handed = if caught_up {
                        self.outbox.take_committed(id, cursor, room)
                    } else {
                        None
                    };
                    let from_db = handed.is_none();
                    let read = match handed {
                        Some(rows) => Ok(rows),
                        None => {
                            // Rows committed from here on are handed over; the read gets the rest.
                            self.outbox.listen(id);
                            self.outbox.fetch(id, cursor, room).await
                        }
                    };
                    match read {
                        Ok(rows) => {
                            more = rows.len() == room;
                            // A read from the outbox that came back short reached its end.
                            if from_db {
                                caught_up = !more;
                            }
                            if let Some(last) = rows.last() {
                                cursor = last.id;
                            }
                            ready.extend(rows);
                            // A full page means more is waiting behind: the device is replaying.
                            self.pace.set_replaying(more, self.pacer.stats());
                        }
                        Err(e) => {
                            tracing::error!(device = %self.device.name, error = %e, "cannot read the outbox");
                            more = false;
                            caught_up = false;
                        }
                    }
                }
                if permit.is_none() && !ready.is_empty() && session.in_flight() < window {
                    let class = if self.pace.status().replaying() {
                        Class::Backlog
                    } else {
                        Class::Live
                    };
                    // A live row whose tokens are both there goes now, without a boxed permit
                    // and a trip through the select (issue 12: one allocation per event less).
                    if class == Class::Live && self.pace.wait().is_zero() && self.pacer.try_live() {
                        if let Some(row) = ready.pop_front() {
                            if let Err(e) =
                                self.send_now(&mut session, row, retain, &mut sent, &mut buf)
                            {
                                session.close().await;
                                return Ended {
                                    progressed,
                                    reason: e,
                                    remote: false,
                                };
                            }
                        }
                        continue;
                    }
                    permit = Some(self.permit(class));
                }
            }
            tokio::select! {
                _ = async { permit.as_mut().expect("guarded").await }, if permit.is_some() => {
                    permit = None;
                    if let Some(row) = ready.pop_front() {
                        if let Err(e) = self.send_now(&mut session, row, retain, &mut sent, &mut buf) {
                            session.close().await;
                            return Ended { progressed, reason: e, remote: false };
                        }
                    }
                }
                ev = session.next() => match ev {
                    SessionEvent::Acked(id) => {
                        let row = sent.remove(&id);
                        if home_held {
                            // Sent before the hold: MODE acknowledges a deactivated home's
                            // messages and drops them. The row stays to be sent again.
                            self.metrics.requeued_deactivated.fetch_add(1, Relaxed);
                            continue;
                        }
                        self.metrics.delivered.fetch_add(1, Relaxed);
                        self.pace.acked();
                        progressed = true;
                        self.outbox.ack(id).await;
                        if let Some(row) = row {
                            let now = std::time::Instant::now();
                            recent.push_back((now, row));
                            while recent.len() > RECENT_MAX
                                || recent.front().is_some_and(|(t, _)| now.duration_since(*t) > retain)
                            {
                                recent.pop_front();
                            }
                        }
                        // A full window may have left rows behind.
                        more = true;
                    }
                    SessionEvent::Command(p) => {
                        self.metrics.commands_received.fetch_add(1, Relaxed);
                        let _ = self.downstream.send(Downstream::Command(self.device.id, p)).await;
                    }
                    SessionEvent::Kv(p) => {
                        let _ = self.downstream.send(Downstream::Kv(self.device.id, p)).await;
                    }
                    SessionEvent::Rejected { row, status, reason, permanent: true } => {
                        tracing::error!(device = %self.device.name, row, status, %reason, "MODE refused a message for good; moved to the dead-letter table");
                        if let Err(e) = self.outbox.dead_letter(row, format!("{status} {reason}")).await {
                            tracing::error!(device = %self.device.name, error = %e, "cannot move the message to the dead-letter table");
                        }
                        more = true;
                    }
                    SessionEvent::Rejected { row, status, reason, .. } => {
                        // Not sendable now (e.g. a deactivated home): keep it, hold the device,
                        // ask the home watcher, and try again from this row later.
                        let hint = crate::mode::homes::hints_deactivation(status, &reason);
                        if hint {
                            self.homes.poke();
                        }
                        tracing::warn!(device = %self.device.name, status, %reason, retry_in = ?self.refusal_retry,
                            "MODE refused a message; holding this device's messages (session kept for commands)");
                        refused_until = Some(Instant::now() + self.refusal_retry);
                        ready.clear();
                        cursor = cursor.min(row - 1);
                        caught_up = false;
                        more = true;
                        self.update_hold(home_held, refused_until);
                    }
                    SessionEvent::Throttled(d) => {
                        self.pacer.stats().throttled_429.fetch_add(1, Relaxed);
                        tracing::warn!(device = %self.device.name, wait = ?d, "MODE asked to slow down (429); waiting");
                    }
                    SessionEvent::Closed(reason) => return Ended { progressed, reason, remote: true },
                },
                _ = async { tokio::time::sleep_until(refused_until.expect("guarded")).await }, if refused_until.is_some() => {
                    tracing::info!(device = %self.device.name, "retrying after MODE's refusal");
                    refused_until = None;
                    self.update_hold(home_held, refused_until);
                }
                r = home.changed() => {
                    if r.is_err() {
                        // The watcher is gone (hub stopping): no more holds from it.
                        home = self.homes.held(None);
                    }
                    let now_held = *home.borrow_and_update();
                    if !home_held && now_held {
                        self.requeue_dropped(recent).await;
                        // Start again from the oldest row when the home is back (put-back rows
                        // and rows acknowledged during the hold are behind the cursor).
                        cursor = 0;
                        caught_up = false;
                        ready.clear();
                        permit = None;
                    }
                    if home_held && !now_held {
                        tracing::info!(device = %self.device.name, "home active: sending held messages in order");
                        // A refusal was probably the deactivation: try again at once.
                        refused_until = None;
                        more = true;
                    }
                    home_held = now_held;
                    self.update_hold(home_held, refused_until);
                }
                _ = self.notify.notified() => more = true,
                _ = self.shutdown.cancelled() => {
                    session.close().await;
                    return Ended { progressed, reason: "hub stopping".into(), remote: false };
                }
            }
        }
    }

    /// The home turned out deactivated: MODE dropped what it acknowledged since the home was
    /// last seen active. Put those rows back in the outbox (original order and numbers).
    async fn requeue_dropped(&self, recent: &mut Recent) {
        let since = self.device.home_id.and_then(|h| self.homes.active_asked(h));
        let back: Vec<Row> = recent
            .drain(..)
            .filter(|(t, _)| since.is_none_or(|s| *t >= s))
            .map(|(_, r)| r)
            .collect();
        if back.is_empty() {
            return;
        }
        match self.outbox.restore(back).await {
            Ok(n) => {
                self.metrics.requeued_deactivated.fetch_add(n, Relaxed);
                tracing::warn!(device = %self.device.name, messages = n,
                    "home found deactivated: messages MODE acknowledged since it was last seen active were dropped by MODE; they are back in the outbox and go again when the home is active");
            }
            Err(e) => {
                tracing::error!(device = %self.device.name, error = %e, "cannot put back messages MODE dropped for a deactivated home; they are lost");
            }
        }
    }

    fn update_hold(&self, home_held: bool, refused_until: Option<Instant>) {
        let hold = if home_held {
            Some(Hold::HomeDeactivated)
        } else {
            refused_until.map(|t| Hold::Refused {
                reason: "MODE refused a message".into(),
                retry_at_ms: now_ms()
                    + t.saturating_duration_since(Instant::now()).as_millis() as i64,
            })
        };
        self.status.set_hold(hold);
    }
}
