//! Pacing: how fast the uplink may send, per device and for the hub as a whole.
//!
//! MODE allows a device about 600 data messages a minute (and ends the MQTT session of a device
//! that goes over) and a project about 6,000. The uplink therefore takes a token for every
//! message it sends, from two token buckets:
//!
//! - the device's own bucket ([`DevicePacer`], `cloud.max_messages_per_minute`, default 540,
//!   burst 1/20 of a minute), whose rate is lowered multiplicatively (AIMD) when MODE drops a
//!   session right after a burst and raised again additively while sessions stay up;
//! - the hub-wide bucket ([`Pacer`], `cloud.max_project_messages_per_minute`, default 5,400,
//!   burst 1/20 of a minute), shared by every device.
//!
//! Fairness (see `docs/store-and-forward.md`): a message is *live* when its device has no
//! backlog, and *backlog* while the device is replaying. Live messages take hub-wide tokens
//! directly and may use the whole bucket. Backlog messages queue in one FIFO line (each device
//! waits for one token at a time, so devices with a backlog are served round robin) and may take
//! a token only while more than [`LIVE_RESERVE`] of the burst is left, so a live message never
//! waits behind a replay and every live token pushes the replay back. Per-device order is the
//! uplink's business: it sends a device's rows strictly in outbox order whatever the class.
//! This module knows nothing of MODE, SQL or sessions: it hands out time.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Fraction of the hub-wide burst that a replay may never use: it is kept for live traffic.
pub const LIVE_RESERVE: f64 = 0.5;
/// Burst of a bucket, as a fraction of its per-minute rate (3 s worth of messages).
const BURST_FRACTION: f64 = 1.0 / 20.0;
/// A session that ends within this long after at least [`BURST_MIN`] sends is taken as a
/// rate-limit drop.
pub const BURST_WINDOW: Duration = Duration::from_secs(5);
pub const BURST_MIN: usize = 10;
/// AIMD: never below this fraction of the configured rate...
const AIMD_FLOOR: f64 = 0.1;
/// ...and back up by this fraction every [`AIMD_STEP`] of sending without a drop.
const AIMD_INCREASE: f64 = 0.05;
const AIMD_STEP: Duration = Duration::from_secs(10);

/// A token bucket (tokens refill continuously at `per_sec` up to `burst`).
#[derive(Debug, Clone)]
pub struct Bucket {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket for `per_minute` messages a minute.
    pub fn per_minute(per_minute: f64) -> Bucket {
        let per_minute = per_minute.max(1.0);
        let burst = (per_minute * BURST_FRACTION).max(1.0);
        Bucket {
            per_sec: per_minute / 60.0,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.per_sec).min(self.burst);
        self.last = now;
    }

    /// Takes one token if at least `1 + keep` are there (so `keep` stay for others); otherwise
    /// says how long until they will be.
    pub fn try_take(&mut self, now: Instant, keep: f64) -> Result<(), Duration> {
        self.refill(now);
        let need = 1.0 + keep.min(self.burst - 1.0).max(0.0);
        if self.tokens >= need {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let secs = (need - self.tokens) / self.per_sec;
            Err(Duration::from_secs_f64(secs).max(Duration::from_millis(1)))
        }
    }

    /// Changes the rate (the tokens already there stay, capped to the new burst).
    pub fn set_per_minute(&mut self, per_minute: f64, now: Instant) {
        self.refill(now);
        let per_minute = per_minute.max(1.0);
        self.per_sec = per_minute / 60.0;
        self.burst = (per_minute * BURST_FRACTION).max(1.0);
        self.tokens = self.tokens.min(self.burst);
    }

    pub fn per_minute_rate(&self) -> f64 {
        self.per_sec * 60.0
    }

    pub fn burst(&self) -> f64 {
        self.burst
    }
}

/// Whether a message is part of a replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The device had nothing else waiting.
    Live,
    /// The device is working through a backlog.
    Backlog,
}

/// Hub-wide counters of the pacing.
#[derive(Debug, Default)]
pub struct PacingStats {
    /// Messages that had to wait for a token (device or hub-wide).
    pub waited: AtomicU64,
    /// Times MODE answered 429 (REST) and the session paused.
    pub throttled_429: AtomicU64,
    /// Sessions dropped right after a burst (taken as rate-limit drops).
    pub burst_drops: AtomicU64,
    /// Multiplicative decreases applied.
    pub aimd_decreases: AtomicU64,
    /// Devices currently replaying a backlog.
    pub devices_replaying: AtomicU64,
}

/// The hub-wide bucket and the replay line.
pub struct Pacer {
    project: Mutex<Bucket>,
    /// Backlog messages wait here one at a time, in arrival order (tokio's mutex is fair).
    replay_line: tokio::sync::Mutex<()>,
    per_device_per_minute: u32,
    stats: PacingStats,
}

impl Pacer {
    pub fn new(project_per_minute: u32, per_device_per_minute: u32) -> Arc<Pacer> {
        Arc::new(Pacer {
            project: Mutex::new(Bucket::per_minute(project_per_minute as f64)),
            replay_line: tokio::sync::Mutex::new(()),
            per_device_per_minute,
            stats: PacingStats::default(),
        })
    }

    pub fn stats(&self) -> &PacingStats {
        &self.stats
    }

    /// Configured hub-wide rate, messages a minute.
    pub fn project_per_minute(&self) -> f64 {
        self.project.lock().expect("pacer lock").per_minute_rate()
    }

    /// Configured per-device rate, messages a minute.
    pub fn device_per_minute(&self) -> u32 {
        self.per_device_per_minute
    }

    fn try_take(&self, keep_fraction: f64) -> Result<(), Duration> {
        let mut b = self.project.lock().expect("pacer lock");
        let keep = b.burst() * keep_fraction;
        b.try_take(Instant::now(), keep)
    }

    /// Takes a live hub-wide token if one is there now (what [`Pacer::acquire`] with
    /// [`Class::Live`] would return at once), without a future: the uplink's path per event.
    pub fn try_live(&self) -> bool {
        self.try_take(0.0).is_ok()
    }

    /// Waits for a hub-wide token. Cancel-safe (nothing is taken until it returns), but a
    /// backlog waiter that is cancelled loses its place in the line.
    pub async fn acquire(&self, class: Class) {
        match class {
            Class::Live => loop {
                match self.try_take(0.0) {
                    Ok(()) => return,
                    Err(d) => tokio::time::sleep(d).await,
                }
            },
            Class::Backlog => {
                let _turn = self.replay_line.lock().await;
                loop {
                    match self.try_take(LIVE_RESERVE) {
                        Ok(()) => return,
                        Err(d) => tokio::time::sleep(d).await,
                    }
                }
            }
        }
    }

    /// Rough hub-wide rate a replaying device can expect (for drain estimates), a minute.
    pub fn fair_share_per_minute(&self, replaying: u64) -> f64 {
        self.project_per_minute() / replaying.max(1) as f64
    }
}

/// What status shows of one device's pacing (shared with the uplink task).
#[derive(Debug)]
pub struct DevicePaceStatus {
    /// Current per-device rate in messages a minute (after AIMD), times 1000.
    rate_milli: AtomicU32,
    /// Acknowledged messages per minute recently (EWMA), times 1000.
    drain_milli: AtomicU32,
    /// Whether the device is replaying a backlog right now.
    replaying: AtomicU32,
    pub aimd_decreases: AtomicU64,
}

impl DevicePaceStatus {
    fn new(rate: f64) -> Self {
        DevicePaceStatus {
            rate_milli: AtomicU32::new((rate * 1000.0) as u32),
            drain_milli: AtomicU32::new(0),
            replaying: AtomicU32::new(0),
            aimd_decreases: AtomicU64::new(0),
        }
    }
    /// Current allowed rate, messages a minute.
    pub fn rate_per_minute(&self) -> f64 {
        self.rate_milli.load(Relaxed) as f64 / 1000.0
    }
    /// Recent delivery rate, messages a minute.
    pub fn drain_per_minute(&self) -> f64 {
        self.drain_milli.load(Relaxed) as f64 / 1000.0
    }
    pub fn replaying(&self) -> bool {
        self.replaying.load(Relaxed) == 1
    }
}

/// One device's bucket with AIMD, owned by its uplink task.
pub struct DevicePacer {
    configured: f64,
    factor: f64,
    bucket: Bucket,
    last_increase: Instant,
    /// Send times within the last [`BURST_WINDOW`].
    recent: std::collections::VecDeque<Instant>,
    /// Delivery rate estimate.
    acked_in_slot: u32,
    slot_start: Instant,
    drain_ewma: f64,
    replaying: bool,
    status: Arc<DevicePaceStatus>,
}

impl DevicePacer {
    pub fn new(per_minute: u32) -> DevicePacer {
        let configured = per_minute.max(1) as f64;
        let now = Instant::now();
        DevicePacer {
            configured,
            factor: 1.0,
            bucket: Bucket::per_minute(configured),
            last_increase: now,
            recent: Default::default(),
            acked_in_slot: 0,
            slot_start: now,
            drain_ewma: 0.0,
            replaying: false,
            status: Arc::new(DevicePaceStatus::new(configured)),
        }
    }

    pub fn status(&self) -> Arc<DevicePaceStatus> {
        self.status.clone()
    }

    /// Current allowed rate (messages a minute).
    pub fn rate(&self) -> f64 {
        self.configured * self.factor
    }

    /// How long until this device may send (zero = now). Does not take the token.
    pub fn wait(&mut self) -> Duration {
        let mut probe = self.bucket.clone();
        match probe.try_take(Instant::now(), 0.0) {
            Ok(()) => Duration::ZERO,
            Err(d) => d,
        }
    }

    /// Takes the device token for a send happening now.
    pub fn take(&mut self) {
        let now = Instant::now();
        let _ = self.bucket.try_take(now, 0.0).or_else(|_| {
            // Called after `wait()` said zero; a rounding miss just goes slightly into debt.
            self.bucket.tokens -= 1.0;
            Ok::<(), ()>(())
        });
        self.recent.push_back(now);
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > BURST_WINDOW)
        {
            self.recent.pop_front();
        }
    }

    /// MODE acknowledged a message: counts toward the drain rate and the additive increase.
    pub fn acked(&mut self) {
        let now = Instant::now();
        self.acked_in_slot += 1;
        let slot = now.saturating_duration_since(self.slot_start);
        if slot >= Duration::from_secs(5) {
            let rate = self.acked_in_slot as f64 * 60.0 / slot.as_secs_f64();
            self.drain_ewma = if self.drain_ewma == 0.0 {
                rate
            } else {
                0.7 * self.drain_ewma + 0.3 * rate
            };
            self.status
                .drain_milli
                .store((self.drain_ewma * 1000.0) as u32, Relaxed);
            self.acked_in_slot = 0;
            self.slot_start = now;
        }
        if self.factor < 1.0 && now.saturating_duration_since(self.last_increase) >= AIMD_STEP {
            self.factor = (self.factor + AIMD_INCREASE).min(1.0);
            self.last_increase = now;
            self.apply(now);
        }
    }

    /// The session ended. If it ended right after a burst, MODE probably cut it for going over
    /// its rate: halve this device's rate (never below 10 %). Returns whether it did.
    pub fn session_ended(&mut self, stats: &PacingStats) -> bool {
        let now = Instant::now();
        let sent = self
            .recent
            .iter()
            .filter(|t| now.saturating_duration_since(**t) <= BURST_WINDOW)
            .count();
        self.recent.clear();
        self.acked_in_slot = 0;
        self.slot_start = now;
        if sent < BURST_MIN {
            return false;
        }
        stats.burst_drops.fetch_add(1, Relaxed);
        stats.aimd_decreases.fetch_add(1, Relaxed);
        self.status.aimd_decreases.fetch_add(1, Relaxed);
        self.factor = (self.factor * 0.5).max(AIMD_FLOOR);
        self.last_increase = now;
        self.apply(now);
        true
    }

    fn apply(&mut self, now: Instant) {
        let rate = self.rate();
        self.bucket.set_per_minute(rate, now);
        self.status
            .rate_milli
            .store((rate * 1000.0) as u32, Relaxed);
    }

    /// Marks whether the device is replaying a backlog (kept in the hub-wide count).
    pub fn set_replaying(&mut self, replaying: bool, stats: &PacingStats) {
        if replaying != self.replaying {
            self.replaying = replaying;
            self.status.replaying.store(replaying as u32, Relaxed);
            if replaying {
                stats.devices_replaying.fetch_add(1, Relaxed);
            } else {
                stats.devices_replaying.fetch_sub(1, Relaxed);
            }
        }
    }
}

impl Drop for DevicePacer {
    fn drop(&mut self) {
        self.status.replaying.store(0, Relaxed);
    }
}

/// Estimated time to drain `rows` at `per_minute`; `None` when nothing moves.
pub fn eta(rows: u64, per_minute: f64) -> Option<Duration> {
    if rows == 0 {
        return Some(Duration::ZERO);
    }
    if per_minute <= 0.0 {
        return None;
    }
    Some(Duration::from_secs_f64(rows as f64 * 60.0 / per_minute))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bucket_allows_burst_then_rate() {
        let mut b = Bucket::per_minute(600.0); // 10/s, burst 30
        let now = Instant::now();
        for _ in 0..30 {
            b.try_take(now, 0.0).unwrap();
        }
        let d = b.try_take(now, 0.0).unwrap_err();
        assert!(d <= Duration::from_millis(101) && d >= Duration::from_millis(99));
        // Over any minute: at most burst + rate.
        let mut sent = 30;
        let start = now;
        let mut t = now;
        while t < start + Duration::from_secs(60) {
            match b.try_take(t, 0.0) {
                Ok(()) => sent += 1,
                Err(d) => t += d,
            }
        }
        assert!(sent <= 30 + 600 + 1, "{sent}");
        assert!(sent >= 600, "{sent}");
    }

    #[tokio::test(start_paused = true)]
    async fn reserve_is_kept_for_live() {
        let p = Pacer::new(600, 540); // burst 30, replay keeps 15
        for _ in 0..15 {
            p.acquire(Class::Backlog).await;
        }
        // The replay must now wait...
        assert!(p.try_take(LIVE_RESERVE).is_err());
        // ...while live traffic still has the reserve.
        for _ in 0..15 {
            assert!(p.try_take(0.0).is_ok());
        }
        assert!(p.try_take(0.0).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn replay_is_round_robin_across_devices() {
        // 3 devices with a backlog each take tokens one at a time through the line.
        let p = Pacer::new(60, 540); // 1/s, burst 3, replay may use 1 of it
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for dev in 0..3u32 {
            let (p, order) = (p.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..5 {
                    p.acquire(Class::Backlog).await;
                    order.lock().unwrap().push(dev);
                    tokio::task::yield_now().await;
                }
            }));
            tokio::task::yield_now().await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(order.len(), 15);
        // The first device got a head start from the burst; after it, strict round robin.
        for w in order[2..11].chunks(3) {
            let mut w = w.to_vec();
            w.sort();
            assert_eq!(w, vec![0, 1, 2], "{order:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn live_goes_ahead_of_a_waiting_replay() {
        let p = Pacer::new(60, 540); // 1/s, burst 3
                                     // Drain the replay's share.
        p.acquire(Class::Backlog).await;
        p.acquire(Class::Backlog).await;
        let replay = {
            let p = p.clone();
            tokio::spawn(async move {
                p.acquire(Class::Backlog).await;
                Instant::now()
            })
        };
        tokio::task::yield_now().await;
        let live_at = {
            p.acquire(Class::Live).await;
            Instant::now()
        };
        let replay_at = replay.await.unwrap();
        assert!(live_at < replay_at);
    }

    #[tokio::test(start_paused = true)]
    async fn aimd_halves_after_a_burst_drop_and_recovers() {
        let stats = PacingStats::default();
        let mut d = DevicePacer::new(540);
        assert_eq!(d.rate(), 540.0);
        // A drop without a burst does nothing.
        d.take();
        assert!(!d.session_ended(&stats));
        assert_eq!(d.rate(), 540.0);
        for _ in 0..BURST_MIN {
            d.take();
        }
        assert!(d.session_ended(&stats));
        assert_eq!(d.rate(), 270.0);
        assert_eq!(d.status().rate_per_minute(), 270.0);
        for _ in 0..10 {
            for _ in 0..BURST_MIN {
                d.take();
            }
            d.session_ended(&stats);
        }
        assert_eq!(d.rate(), 54.0, "floor at 10 %");
        assert_eq!(stats.aimd_decreases.load(Relaxed), 11);
        // Additive increase while acks flow.
        for _ in 0..40 {
            tokio::time::advance(AIMD_STEP).await;
            d.acked();
        }
        assert_eq!(d.rate(), 540.0);
    }

    #[tokio::test(start_paused = true)]
    async fn device_wait_reflects_its_bucket() {
        let mut d = DevicePacer::new(60); // 1/s, burst 3
        for _ in 0..3 {
            assert_eq!(d.wait(), Duration::ZERO);
            d.take();
        }
        let w = d.wait();
        assert!(w > Duration::from_millis(900) && w <= Duration::from_millis(1001));
    }

    #[test]
    fn eta_estimates() {
        assert_eq!(eta(0, 0.0), Some(Duration::ZERO));
        assert_eq!(eta(10, 0.0), None);
        assert_eq!(eta(540, 540.0), Some(Duration::from_secs(60)));
    }
}
