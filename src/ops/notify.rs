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
//!
//! Every message is one datagram sent **without blocking**: the hub's async work runs on one
//! thread, and a service manager that is slow to read (a full socket queue: ten datagrams by
//! default, `net.unix.max_dgram_qlen`) must not stall PUBACKs and uploads. A message that does
//! not fit is dropped (logged once per stall, with the count when it ends), and the next one is
//! tried as usual (a dropped ping is a late ping; systemd waits `WatchdogSec=`, three ping
//! periods).

use super::OpsContext;
use crate::Hub;
use sd_notify::NotifyState;
use std::ffi::OsString;
use std::io;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// How often STATUS= is refreshed when there is no watchdog.
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// Talks to the service manager, if there is one.
#[derive(Debug, Clone)]
pub struct SystemdNotifier {
    /// `NOTIFY_SOCKET`: a path, or `@name` for an abstract socket.
    socket: Option<OsString>,
    watchdog: Option<Duration>,
    /// Messages dropped because the socket's queue was full since the last one that got
    /// through (logged once per stall, and the count when it ends).
    dropped: Arc<AtomicU64>,
}

impl SystemdNotifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from the environment.
    pub fn from_env() -> SystemdNotifier {
        SystemdNotifier {
            socket: std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty()),
            watchdog: sd_notify::watchdog_enabled(),
            dropped: Arc::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// The watchdog period systemd asked for (`WatchdogSec=`), if any.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    fn send(&self, states: &[NotifyState]) {
        let Some(socket) = &self.socket else {
            return;
        };
        let mut msg = String::new();
        for s in states {
            msg.push_str(&s.to_string());
            msg.push('\n');
        }
        match send_datagram(socket, msg.as_bytes()) {
            Ok(()) => {
                let dropped = self.dropped.swap(0, Relaxed);
                if dropped > 0 {
                    tracing::info!(dropped, "the service manager reads notifications again");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if self.dropped.fetch_add(1, Relaxed) == 0 {
                    tracing::warn!("the service manager's notify socket is full (it does not read): dropping notifications until it reads again");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)"),
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

/// One datagram to `socket` (a path, or `@name` for Linux's abstract namespace), without
/// blocking: `WouldBlock` when the receiver's queue is full.
fn send_datagram(socket: &std::ffi::OsStr, msg: &[u8]) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::SocketAddr;
    let sock = UnixDatagram::unbound()?;
    sock.set_nonblocking(true)?;
    let addr = match socket.as_bytes().strip_prefix(b"@") {
        #[cfg(target_os = "linux")]
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)?
        }
        #[cfg(not(target_os = "linux"))]
        Some(_) => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "abstract NOTIFY_SOCKET names exist only on Linux",
            ))
        }
        None => SocketAddr::from_pathname(std::path::Path::new(socket))?,
    };
    let sent = sock.send_to_addr(msg, &addr)?;
    if sent != msg.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "notification cut short",
        ));
    }
    Ok(())
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
