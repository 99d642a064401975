//! Operations: what an installer and systemd see of a running hub.
//!
//! - [`notify`]: the systemd notify protocol (READY, a progress-gated WATCHDOG, STATUS, STOPPING).
//! - [`http`]: the local endpoint (`[ops] listen`, default 127.0.0.1:9464) with `/healthz`,
//!   Prometheus `/metrics` ([`prom`]) and `/status.json`.
//! - [`status`]: the `modehub status` command, a client of `/status.json`.
//!
//! Everything here only *reads* the hub: counters ([`crate::metrics::Metrics`],
//! [`crate::outbox::OutboxStats`]), the outbox's per-device depth, the upstream session states
//! and local presence (the one tracker, [`Presence`], kept by the downlink). A running hub's
//! view is an [`OpsContext`], built by [`crate::Hub::ops_context`]. Its background tasks end when
//! the hub shuts down, so they never keep the outbox open. Nothing here prints a secret.

mod auth;
pub mod http;
pub mod notify;
pub mod page;
pub mod prom;
mod readouts;
pub mod status;

use crate::config::Config;
use crate::local::ModeId;
use crate::metrics::Metrics;
use crate::outbox::{DeviceDepth, Outbox};
pub use crate::presence::Presence;
use crate::registry::{Device, Registry};
use crate::timing::now_ms;
use crate::uplink::SessionState;
use crate::Hub;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How long a health or watchdog probe of the outbox writer may take before it counts as stuck.
pub const OUTBOX_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the monitor task learns over time (the rest is read fresh on each request).
#[derive(Debug)]
struct Progress {
    /// Last time MODE acknowledged something, or the backlog shrank or was empty.
    last_progress: Instant,
    last_delivered: u64,
    last_total: Option<u64>,
    last_commits: u64,
    last_commit_errors: u64,
    /// The most recent commit attempt failed.
    commits_failing: bool,
}

/// A running hub as ops sees it. Cheap to share (`Arc`).
pub struct OpsContext {
    metrics: Arc<Metrics>,
    /// Taken away when the hub stops, so ops never keeps the outbox writer alive.
    outbox: Mutex<Option<Outbox>>,
    /// Devices, their session states, uplink status and transports (swapped on reload).
    view: crate::SharedView,
    presence: Arc<Presence>,
    local_addr: SocketAddr,
    started: Instant,
    data_dir: PathBuf,
    stall_after: Duration,
    progress: Mutex<Progress>,
    shutdown: CancellationToken,
    homes: Arc<crate::homes::Homes>,
}

impl Hub {
    /// The ops view of this hub, with its monitor tasks started (they stop with the hub).
    pub fn ops_context(&mut self, cfg: &Config) -> Arc<OpsContext> {
        let ctx = Arc::new(OpsContext {
            metrics: self.metrics.clone(),
            outbox: Mutex::new(Some(self.outbox.clone())),
            view: self.view().clone(),
            presence: self.presence.clone(),
            local_addr: self.local_addr,
            started: self.started,
            data_dir: cfg.hub.data_dir.clone(),
            stall_after: Duration::from_secs(cfg.ops.stall_after_secs),
            progress: Mutex::new(Progress {
                last_progress: Instant::now(),
                last_delivered: 0,
                last_total: None,
                last_commits: 0,
                last_commit_errors: 0,
                commits_failing: false,
            }),
            shutdown: self.shutdown.clone(),
            homes: self.homes.clone(),
        });
        self.tracker.spawn(ctx.clone().monitor());
        ctx
    }

    /// Starts the local HTTP endpoint if `[ops] listen` is not "off"; it stops with the hub.
    /// Returns the bound address.
    pub async fn start_ops_server(
        &mut self,
        ctx: Arc<OpsContext>,
        cfg: &Config,
    ) -> anyhow::Result<Option<SocketAddr>> {
        let Some(addr) = cfg.ops.listen_addr() else {
            return Ok(None);
        };
        let bound = http::serve(
            ctx,
            addr,
            cfg.ops.password.clone(),
            self.shutdown.clone(),
            &self.tracker,
        )
        .await?;
        Ok(Some(bound))
    }
}

/// Outcome of one health check.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// The hub's health: healthy only if every check is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub healthy: bool,
    pub checks: Vec<Check>,
}

impl Health {
    /// One line: "ok" or the failed checks' details joined by "; ".
    pub fn summary(&self) -> String {
        if self.healthy {
            "ok".into()
        } else {
            self.checks
                .iter()
                .filter(|c| !c.ok)
                .map(|c| format!("{}: {}", c.name, c.detail))
                .collect::<Vec<_>>()
                .join("; ")
        }
    }
}

/// One device in `/status.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub name: String,
    pub mode_id: ModeId,
    pub home_id: Option<u64>,
    /// `mqtt` or `serial <port>`.
    pub transport: String,
    pub local_connections: usize,
    /// `up`, `connecting`, `down: <why>`, `refused: <why>`.
    pub upstream: String,
    /// "active", "deactivated" or "unknown" (until a home watcher feeds it).
    pub home_state: String,
    pub queued: u64,
    pub queued_bytes: u64,
    /// Capture-independent age of the oldest row waiting for MODE, seconds.
    pub oldest_pending_secs: Option<u64>,
    pub last_error: Option<String>,
    pub last_error_secs_ago: Option<u64>,
    /// What is wrong with kv for this device (MODE refused it, a reload too large...); `None`
    /// when kv works. Events and commands are not affected.
    #[serde(default)]
    pub kv_problem: Option<String>,
}

/// `/status.json`: what `modehub status` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub uptime_secs: u64,
    pub data_dir: String,
    pub data_dir_bytes: u64,
    pub local_mqtt: String,
    pub health: Health,
    pub devices: Vec<DeviceStatus>,
}

/// "up", "connecting", "down: why", "refused: why".
pub fn session_label(s: &SessionState) -> String {
    match s {
        SessionState::Up => "up".into(),
        SessionState::Connecting => "connecting".into(),
        SessionState::Down(r) => format!("down: {r}"),
        SessionState::Refused(r) => format!("refused: {r}"),
    }
}

/// The Prometheus label value of a session state.
pub fn session_state_name(s: &SessionState) -> &'static str {
    match s {
        SessionState::Up => "up",
        SessionState::Connecting => "connecting",
        SessionState::Down(_) => "down",
        SessionState::Refused(_) => "refused",
    }
}

/// Bytes of the files in `dir` (one level of subdirectories deep).
pub fn dir_size(dir: &Path) -> u64 {
    fn walk(dir: &Path, depth: u32) -> u64 {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return 0;
        };
        rd.flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_file() => m.len(),
                Ok(m) if m.is_dir() && depth > 0 => walk(&e.path(), depth - 1),
                _ => 0,
            })
            .sum()
    }
    walk(dir, 1)
}

/// Bytes this process caused to be written to storage (`write_bytes` of /proc/self/io).
pub fn process_write_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

impl OpsContext {
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
    /// The outbox, until the hub stops.
    pub fn outbox(&self) -> Option<Outbox> {
        self.outbox.lock().expect("ops lock").clone()
    }
    fn view(&self) -> Arc<crate::DeviceView> {
        self.view.read().expect("view lock").clone()
    }
    /// The device table in force.
    pub fn registry(&self) -> Arc<Registry> {
        self.view().registry.clone()
    }
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
    /// Session state of each configured device, in registry order.
    pub fn session_states(&self) -> Vec<SessionState> {
        self.devices().into_iter().map(|(_, s)| s).collect()
    }
    /// Each configured device with its session state, from one view (a reload in between
    /// cannot pair a state with the wrong device).
    pub fn devices(&self) -> Vec<(Device, SessionState)> {
        let v = self.view();
        v.registry
            .iter()
            .map(|d| (d.clone(), v.sessions[d.id].borrow().clone()))
            .collect()
    }
    pub fn local_connections(&self, dev: crate::local::DeviceId) -> usize {
        self.presence.connections(dev)
    }
    /// The state of a device's home from the home watcher: "active", "deactivated",
    /// "unknown", or "-" for a device configured without a home.
    pub fn home_state(&self, device: &Device) -> &'static str {
        let Some(home) = device.home_id else {
            return "-";
        };
        self.homes
            .statuses()
            .iter()
            .find(|h| h.home_id == home)
            .map(|h| h.state.label())
            .unwrap_or("unknown")
    }

    /// Commands waiting in the outbox for each device (by MODE id) that is away locally.
    pub async fn command_queue_depth(&self) -> HashMap<ModeId, u64> {
        let Some(outbox) = self.outbox() else {
            return HashMap::new();
        };
        match tokio::time::timeout(OUTBOX_PROBE_TIMEOUT, outbox.pending_commands()).await {
            Ok(Ok(m)) => m.into_iter().map(|(id, n)| (ModeId(id), n)).collect(),
            _ => HashMap::new(),
        }
    }

    /// The outbox's backlog per device, or why it could not be read.
    pub async fn depth(&self) -> Result<HashMap<ModeId, DeviceDepth>, String> {
        let Some(outbox) = self.outbox() else {
            return Err("hub stopping".into());
        };
        match tokio::time::timeout(OUTBOX_PROBE_TIMEOUT, outbox.depth()).await {
            Ok(Ok(d)) => Ok(d.into_iter().map(|(id, x)| (ModeId(id), x)).collect()),
            Ok(Err(e)) => Err(format!("cannot read the outbox: {e}")),
            Err(_) => Err(format!(
                "the outbox writer did not answer within {} s (stuck commit or disk)",
                OUTBOX_PROBE_TIMEOUT.as_secs()
            )),
        }
    }

    /// Whether the outbox writer answers a ping within [`OUTBOX_PROBE_TIMEOUT`]: answered after
    /// the commit of its group (so pending commits completed), without a read or a commit of its
    /// own, and without ending a commit window.
    async fn writer_answers(&self) -> Result<(), String> {
        let Some(outbox) = self.outbox() else {
            return Err("hub stopping".into());
        };
        match tokio::time::timeout(OUTBOX_PROBE_TIMEOUT, outbox.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("cannot reach the outbox writer: {e}")),
            Err(_) => Err(format!(
                "the outbox writer did not answer within {} s (stuck commit or disk)",
                OUTBOX_PROBE_TIMEOUT.as_secs()
            )),
        }
    }

    /// Liveness for the systemd watchdog: `Ok` only while the hub makes progress — the outbox
    /// writer answers a ping queued behind any pending commits (so those commits completed),
    /// the downlink takes local presence events, and the hub is not stopping.
    pub async fn liveness(&self) -> Result<(), String> {
        if self.shutdown.is_cancelled() {
            return Err("hub stopping".into());
        }
        self.writer_answers().await?;
        if let Some(d) = self.presence.downlink_stuck() {
            if d > Duration::from_secs(5) {
                return Err(format!(
                    "the downlink has not taken local events for {} s",
                    d.as_secs()
                ));
            }
        }
        Ok(())
    }

    /// Samples counters and the backlog; ends when the hub stops.
    async fn monitor(self: Arc<Self>) {
        let every =
            (self.stall_after / 4).clamp(Duration::from_millis(200), Duration::from_secs(5));
        let shutdown = self.shutdown.clone();
        loop {
            self.sample().await;
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.cancelled() => {
                    self.outbox.lock().expect("ops lock").take();
                    return;
                }
            }
        }
    }

    async fn sample(&self) {
        // The writer's own count, not a read: a read of the whole outbox every few seconds
        // cost the writer a scan of the backlog and ended its commit window (issue 12).
        let Some(outbox) = self.outbox() else { return };
        let total = Some(outbox.pending_rows());
        let delivered = self.metrics.delivered.load(Relaxed);
        let commits = outbox.stats().commits.load(Relaxed);
        let errors = outbox.stats().commit_errors.load(Relaxed);
        let mut p = self.progress.lock().expect("ops lock");
        let shrank = matches!((p.last_total, total), (Some(a), Some(b)) if b < a);
        if delivered != p.last_delivered || total == Some(0) || shrank {
            p.last_progress = Instant::now();
        }
        p.last_delivered = delivered;
        if total.is_some() {
            p.last_total = total;
        }
        if commits != p.last_commits {
            p.commits_failing = false;
        } else if errors != p.last_commit_errors {
            p.commits_failing = true;
        }
        p.last_commits = commits;
        p.last_commit_errors = errors;
    }

    /// Evaluates every health check now.
    pub async fn health(&self) -> Health {
        let mut checks = Vec::new();
        // Outbox: the writer answers, and the last commit did not fail.
        let depth = self.depth().await;
        let (failing, since_progress, errors) = {
            let p = self.progress.lock().expect("ops lock");
            (
                p.commits_failing,
                p.last_progress.elapsed(),
                self.outbox()
                    .map_or(0, |o| o.stats().commit_errors.load(Relaxed)),
            )
        };
        checks.push(match (&depth, failing) {
            (Err(e), _) => Check {
                name: "outbox".into(),
                ok: false,
                detail: e.clone(),
            },
            (Ok(_), true) => Check {
                name: "outbox".into(),
                ok: false,
                detail: format!(
                    "commits are failing ({errors} failed since start); see the log for the cause (disk full? read-only file system?)"
                ),
            },
            (Ok(_), false) if self.outbox().is_some_and(|o| o.stats().disk_full.load(Relaxed) == 1) => Check {
                name: "outbox".into(),
                ok: false,
                detail: format!(
                    "new messages are refused: the disk holding {} is (nearly) full ([hub] min_free_disk); free space or lower the outbox bounds",
                    self.data_dir.display()
                ),
            },
            (Ok(_), false) => Check {
                name: "outbox".into(),
                ok: true,
                detail: "writer answers, commits succeed".into(),
            },
        });
        // Broker: the local MQTT port accepts connections.
        let probe = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(connectable(self.local_addr)),
        )
        .await;
        checks.push(Check {
            name: "broker".into(),
            ok: matches!(probe, Ok(Ok(_))),
            detail: match probe {
                Ok(Ok(_)) => format!("listening on {}", self.local_addr),
                Ok(Err(e)) => format!("local MQTT port {} refuses: {e}", self.local_addr),
                Err(_) => format!("local MQTT port {} does not answer", self.local_addr),
            },
        });
        // Cloud: at least the reachable part works — some session is up (if there are devices).
        let devices = self.devices();
        let up = devices
            .iter()
            .filter(|(_, s)| *s == SessionState::Up)
            .count();
        let cloud_ok = devices.is_empty() || up > 0;
        let detail = if cloud_ok {
            format!("{up}/{} upstream sessions up", devices.len())
        } else {
            let first: Vec<String> = devices
                .iter()
                .take(3)
                .map(|(d, s)| format!("{} {}", d.name, session_label(s)))
                .collect();
            format!(
                "no upstream session is up ({}); check the network and [cloud] mqtt_url",
                first.join(", ")
            )
        };
        checks.push(Check {
            name: "cloud".into(),
            ok: cloud_ok,
            detail,
        });
        // Draining: sessions up and a backlog, but no MODE acknowledgement for too long. Only
        // configured devices count: a removed device's backlog waits on disk by design.
        let queued: u64 = depth
            .as_ref()
            .map(|d| {
                devices
                    .iter()
                    .filter_map(|(dev, _)| d.get(&dev.mode_id))
                    .map(|x| x.rows)
                    .sum()
            })
            .unwrap_or(0);
        let stalled = queued > 0 && up > 0 && since_progress > self.stall_after;
        checks.push(Check {
            name: "draining".into(),
            ok: !stalled,
            detail: if stalled {
                format!(
                    "connected but not draining: {queued} messages queued, {up} sessions up, no acknowledgement from MODE and no shrinking backlog for {} s (limit [ops] stall_after_secs = {})",
                    since_progress.as_secs(),
                    self.stall_after.as_secs()
                )
            } else {
                format!("{queued} messages queued")
            },
        });
        // kv: shown, never failing the hub (events and commands do not depend on it).
        let view = self.view();
        let degraded: Vec<String> = view
            .registry
            .iter()
            .filter_map(|d| {
                let p = view.uplinks[d.id].kv.problem()?;
                Some(format!("{}: {}", d.name, p.0))
            })
            .collect();
        checks.push(Check {
            name: "kv".into(),
            ok: true,
            detail: if degraded.is_empty() {
                "no kv problem".into()
            } else {
                format!(
                    "kv degraded for {} device(s), events and commands unaffected: {}",
                    degraded.len(),
                    degraded.join("; ")
                )
            },
        });
        Health {
            healthy: checks.iter().all(|c| c.ok),
            checks,
        }
    }

    /// Everything `/status.json` returns.
    pub async fn status(&self) -> StatusReport {
        let health = self.health().await;
        let depth = self.depth().await.unwrap_or_default();
        let view = self.view();
        let now = now_ms();
        let devices = view
            .registry
            .iter()
            .map(|d| {
                let s = view.sessions[d.id].borrow().clone();
                let dd = depth.get(&d.mode_id).cloned().unwrap_or_default();
                let err = view.uplinks[d.id].last_error();
                DeviceStatus {
                    name: d.name.clone(),
                    mode_id: d.mode_id,
                    home_id: d.home_id,
                    transport: view.transports[d.id].clone(),
                    local_connections: self.local_connections(d.id),
                    upstream: session_label(&s),
                    home_state: self.home_state(d).to_string(),
                    queued: dd.rows,
                    queued_bytes: dd.bytes,
                    oldest_pending_secs: dd.oldest_ms.map(|t| ((now - t).max(0) / 1000) as u64),
                    last_error_secs_ago: err.as_ref().map(|e| ((now - e.1).max(0) / 1000) as u64),
                    last_error: err.map(|e| e.0),
                    kv_problem: view.uplinks[d.id].kv.problem().map(|p| p.0),
                }
            })
            .collect();
        StatusReport {
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_secs: self.uptime().as_secs(),
            data_dir: self.data_dir.display().to_string(),
            data_dir_bytes: dir_size(&self.data_dir),
            local_mqtt: self.local_addr.to_string(),
            health,
            devices,
        }
    }

    /// The one-line STATUS= text for systemd.
    pub async fn status_line(&self) -> String {
        let states = self.session_states();
        let up = states.iter().filter(|s| **s == SessionState::Up).count();
        let local = self
            .registry()
            .iter()
            .filter(|d| self.presence.connections(d.id) > 0)
            .count();
        let queued = match self.outbox() {
            Some(o) => o.pending_rows().to_string(),
            None => "?".into(),
        };
        format!(
            "{up}/{n} upstream up, {local}/{n} local, {queued} queued, {} in / {} out",
            self.metrics.accepted.load(Relaxed),
            self.metrics.delivered.load(Relaxed),
            n = states.len()
        )
    }
}

/// An address a client on this machine can connect to (0.0.0.0 / :: become loopback).
pub fn connectable(addr: SocketAddr) -> SocketAddr {
    let mut a = addr;
    if a.ip().is_unspecified() {
        a.set_ip(if a.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    a
}
