//! The hub's read-outs for ops and tools: backlog and pacing per device, home states with what
//! their devices have waiting. They only read the parts (outbox depth, uplink status, pacer,
//! homes); nothing here changes the hub.

use crate::homes::{HomeReport, HomeStatus};
use crate::uplink::DeviceBacklog;
use crate::Hub;
use std::sync::atomic::Ordering::Relaxed;

impl Hub {
    /// Each device's backlog, allowed rate and estimated time to drain, in registry order.
    pub async fn backlog(&self) -> Vec<DeviceBacklog> {
        let depth = self.outbox().depth().await.unwrap_or_default();
        let pacer = self.pacer();
        let replaying = pacer.stats().devices_replaying.load(Relaxed);
        self.uplink_status()
            .iter()
            .map(|u| {
                let d = depth.get(&u.mode_id.get()).cloned().unwrap_or_default();
                let hold = u.hold();
                let rate = u.pace.rate_per_minute();
                // Expected: what the device may send, within its fair share of the hub's budget
                // while others replay too; what it actually delivered if that is known.
                let expected = rate.min(pacer.fair_share_per_minute(replaying.max(1)));
                let seen = u.pace.drain_per_minute();
                let per_minute = if seen > 0.0 { seen.min(rate) } else { expected };
                DeviceBacklog {
                    name: u.name.clone(),
                    mode_id: u.mode_id,
                    rows: d.rows,
                    bytes: d.bytes,
                    oldest_ms: d.oldest_ms,
                    rate_per_minute: rate,
                    drain_per_minute: seen,
                    replaying: u.pace.replaying(),
                    eta: if hold.is_some() {
                        None
                    } else {
                        crate::pacing::eta(d.rows, per_minute)
                    },
                    hold,
                }
            })
            .collect()
    }

    /// Hub-wide pacing counters (429s, burst drops, AIMD decreases, devices replaying).
    pub fn pacing_stats(&self) -> &crate::pacing::PacingStats {
        self.pacer().stats()
    }
}

impl Hub {
    /// Every configured home: last known state, since when, whether the last read failed.
    pub fn home_states(&self) -> Vec<HomeStatus> {
        self.homes().statuses()
    }

    /// [`Hub::home_states`] with how much each home's devices have waiting in the outbox.
    pub async fn home_status(&self) -> Vec<HomeReport> {
        let depth = self.outbox().depth().await.unwrap_or_default();
        self.home_states()
            .into_iter()
            .map(|status| {
                let (rows, bytes) = status
                    .devices
                    .iter()
                    .filter_map(|d| depth.get(&d.get()))
                    .fold((0, 0), |(r, b), d| (r + d.rows, b + d.bytes));
                HomeReport {
                    status,
                    pending_rows: rows,
                    pending_bytes: bytes,
                }
            })
            .collect()
    }
}
