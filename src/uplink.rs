//! The uplink: drains the outbox to MODE, one MQTT session per device.
//!
//! Each device gets its own task and session, so one slow, refused or offline device never holds
//! up another. A task sends its device's rows strictly in outbox order with a bounded window of
//! unacknowledged publishes, deletes a row only when MODE's PUBACK for it arrives, and after any
//! connection loss starts again from the oldest row still in the outbox (at-least-once; the
//! per-device `_seq` lets consumers drop the duplicates). Reconnects back off exponentially with
//! full jitter up to a minute; a refused login parks the device and retries rarely. What MODE
//! sends down is passed on untouched to the downlink. This module must not speak SQL or parse
//! MODE payloads: it moves rows and bytes.

use crate::metrics::Metrics;
use crate::mode::{Session, SessionConfig, SessionEvent};
use crate::outbox::Outbox;
use crate::registry::{Device, DeviceId};
use bytes::Bytes;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};

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

/// Backoff: exponential from `base` to `cap` with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
    /// The next delay: uniform in [ceiling/2, ceiling], ceiling = min(cap, base * 2^attempt).
    /// (Half-jitter keeps a floor so a fleet of devices cannot hammer MODE, while still
    /// spreading 100 devices' reconnects over the interval.)
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(16));
        let ceiling = exp.min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        half + ceiling.mul_f64(fastrand::f64()) / 2
    }
}

/// How long a refused device waits before trying its credentials again.
const PARKED_RETRY: Duration = Duration::from_secs(600);
/// A session that stayed up this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(30);

pub struct DeviceUplink {
    pub device: Device,
    pub outbox: Outbox,
    pub session: SessionConfig,
    pub notify: Arc<Notify>,
    pub downstream: mpsc::Sender<Downstream>,
    pub metrics: Arc<Metrics>,
    pub state: watch::Sender<SessionState>,
    pub shutdown: watch::Receiver<bool>,
}

impl DeviceUplink {
    /// Runs until shutdown.
    pub async fn run(mut self) {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
        // Spread the first connects of many devices a little.
        self.sleep(Duration::from_millis(fastrand::u64(0..200)))
            .await;
        while !*self.shutdown.borrow() {
            self.state.send_replace(SessionState::Connecting);
            self.metrics.upstream_connects.fetch_add(1, Relaxed);
            let connected = tokio::select! {
                r = Session::connect(&self.session, self.device.mode_id, &self.device.api_key) => r,
                _ = self.shutdown.changed() => break,
            };
            let delay = match connected {
                Ok(session) => {
                    tracing::info!(device = %self.device.name, mode_id = self.device.mode_id, "upstream session up");
                    self.state.send_replace(SessionState::Up);
                    let started = tokio::time::Instant::now();
                    let reason = self.pump(session).await;
                    if *self.shutdown.borrow() {
                        break;
                    }
                    if started.elapsed() >= STABLE_SESSION {
                        backoff.reset();
                    }
                    let d = backoff.next_delay();
                    tracing::warn!(device = %self.device.name, %reason, retry_in = ?d, "upstream session lost; outbox keeps everything");
                    self.state.send_replace(SessionState::Down(reason));
                    d
                }
                Err(e) if e.is_auth() => {
                    self.metrics.upstream_connect_failures.fetch_add(1, Relaxed);
                    tracing::error!(device = %self.device.name, mode_id = self.device.mode_id, error = %e, retry_in = ?PARKED_RETRY, "MODE REFUSED THIS DEVICE'S CREDENTIALS; its data is kept in the outbox. Fix mode_id / api_key in the config.");
                    self.state
                        .send_replace(SessionState::Refused(e.to_string()));
                    PARKED_RETRY
                }
                Err(e) => {
                    self.metrics.upstream_connect_failures.fetch_add(1, Relaxed);
                    let d = backoff.next_delay();
                    tracing::warn!(device = %self.device.name, error = %e, retry_in = ?d, "cannot reach MODE; outbox keeps everything");
                    self.state.send_replace(SessionState::Down(e.to_string()));
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
            _ = self.shutdown.changed() => {}
        }
    }

    /// Sends rows and handles answers until the session ends; returns why it ended.
    async fn pump(&mut self, mut session: Session) -> String {
        let window = session.window(&self.session);
        if let Some(reload) = session.take_initial_kv() {
            let (done, applied) = tokio::sync::oneshot::channel();
            let _ = self
                .downstream
                .send(Downstream::KvBarrier(self.device.id, reload, done))
                .await;
            let _ = tokio::time::timeout(Duration::from_secs(10), applied).await;
        }
        let mut cursor = 0i64;
        let mut more = true;
        let mut buf = Vec::with_capacity(256);
        loop {
            // Refill when half the window is free: one outbox read per batch of PUBACKs, not one
            // read (a round trip through the writer thread) per PUBACK.
            if more && session.in_flight() <= window / 2 {
                let room = window - session.in_flight();
                match self.outbox.fetch(self.device.mode_id, cursor, room).await {
                    Ok(rows) => {
                        more = rows.len() == room;
                        for row in rows {
                            if let Err(e) = session.send(&row, &self.session.stamping, &mut buf) {
                                session.close().await;
                                return e;
                            }
                            cursor = row.id;
                        }
                    }
                    Err(e) => {
                        tracing::error!(device = %self.device.name, error = %e, "cannot read the outbox");
                        more = false;
                    }
                }
            }
            tokio::select! {
                ev = session.next() => match ev {
                    SessionEvent::Acked(id) => {
                        self.metrics.delivered.fetch_add(1, Relaxed);
                        self.outbox.ack(id).await;
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
                    SessionEvent::Rejected { status, reason, .. } => {
                        // Not sendable now (e.g. a deactivated home): keep it and start over later.
                        session.close().await;
                        return format!("MODE refused a message: {status} {reason}");
                    }
                    SessionEvent::Throttled(d) => {
                        tracing::warn!(device = %self.device.name, wait = ?d, "MODE asked to slow down (429); waiting");
                    }
                    SessionEvent::Closed(reason) => return reason,
                },
                _ = self.notify.notified() => more = true,
                _ = self.shutdown.changed() => {
                    session.close().await;
                    return "hub stopping".into();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_jitters_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(250) && first <= Duration::from_millis(500));
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(60));
        }
        let late: Vec<_> = (0..50).map(|_| b.next_delay()).collect();
        assert!(late.iter().all(|d| *d >= Duration::from_secs(30)));
        assert!(late.iter().any(|d| *d != late[0]), "jittered");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(500));
    }
}
