//! Small time helpers every layer shares: the wall clock in Unix milliseconds and the one retry
//! backoff (exponential with jitter). It must not sleep, spawn or know about any transport.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The wall clock, Unix milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Backoff: exponential from `base` to `cap` with jitter.
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
    /// The next delay is drawn from the same interval as the last one (no growth).
    pub fn hold(&mut self) {
        self.attempt = self.attempt.saturating_sub(1);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_backoff_does_not_grow() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
        for _ in 0..3 {
            b.next_delay();
        }
        for _ in 0..10 {
            b.hold();
            let d = b.next_delay();
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(2),
                "{d:?}"
            );
        }
    }

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
