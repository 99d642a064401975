//! The systemd notify protocol (`Type=notify`), through the `sd-notify` crate.
//!
//! - `READY=1` once the local broker listens and the outbox is open (after `Hub::start`).
//! - `WATCHDOG=1` every third of `WATCHDOG_USEC`, but **only** while [`OpsContext::liveness`]
//!   holds: the outbox writer answers a request queued behind any pending commits (so those
//!   commits completed), the downlink takes local events, and the runtime runs this task. A
//!   wedged writer or a stuck downlink stops the pings, and systemd restarts the hub after
//!   `WatchdogSec=`. Commit *errors* (disk full) do not stop the pings: a restart cannot fix
//!   them; `/healthz` reports them.
//! - `STATUS=` a one-line summary, refreshed with each tick.
//! - `STOPPING=1` when shutdown starts.
//!
//! Without `NOTIFY_SOCKET` (not under systemd) every call is a no-op.

use super::OpsContext;
use crate::Hub;
use sd_notify::NotifyState;
use std::sync::Arc;
use std::time::Duration;

/// How often STATUS= is refreshed when there is no watchdog.
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// Talks to the service manager, if there is one.
#[derive(Debug, Clone)]
pub struct SystemdNotifier {
    enabled: bool,
    watchdog: Option<Duration>,
}

impl SystemdNotifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from the environment.
    pub fn from_env() -> SystemdNotifier {
        SystemdNotifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            watchdog: sd_notify::watchdog_enabled(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The watchdog period systemd asked for (`WatchdogSec=`), if any.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    fn send(&self, states: &[NotifyState]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn stopping(&self, status: &str) {
        self.send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }

    pub fn reloading(&self) {
        self.send(&[NotifyState::Reloading]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    /// Watchdog pings and STATUS refreshes until the hub stops.
    async fn run(self, ctx: Arc<OpsContext>, shutdown: tokio_util::sync::CancellationToken) {
        let every = self
            .watchdog
            .map(|w| (w / 3).max(Duration::from_millis(50)))
            .unwrap_or(STATUS_EVERY);
        let mut stalled: Option<String> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.cancelled() => return,
            }
            match ctx.liveness().await {
                Ok(()) => {
                    if let Some(why) = stalled.take() {
                        tracing::info!(was = %why, "hub makes progress again; watchdog pings resume");
                    }
                    let line = ctx.status_line().await;
                    if self.watchdog.is_some() {
                        self.send(&[NotifyState::Watchdog, NotifyState::Status(&line)]);
                    } else {
                        self.status(&line);
                    }
                }
                Err(why) => {
                    if stalled.as_deref() != Some(why.as_str()) {
                        tracing::error!(reason = %why, "hub is not making progress; withholding the systemd watchdog ping (systemd restarts the hub if this lasts WatchdogSec)");
                    }
                    self.status(&format!("not making progress: {why}"));
                    stalled = Some(why);
                }
            }
        }
    }
}

impl Hub {
    /// Starts the watchdog/STATUS task (a no-op outside systemd); it stops with the hub.
    pub fn start_notifier(&mut self, ctx: Arc<OpsContext>, notifier: &SystemdNotifier) {
        if !notifier.enabled() {
            return;
        }
        self.tracker
            .spawn(notifier.clone().run(ctx, self.shutdown.clone()));
    }
}
