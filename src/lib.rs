//! modehub: an edge gateway hub bridging a home's local devices to the MODE IoT cloud.
//!
//! Data flows one way each direction:
//! adapters ([`broker`]) -> [`router`] -> [`outbox`] (SQLite) -> [`uplink`] -> MODE, and
//! MODE -> [`uplink`] sessions -> [`downlink`] -> adapters. [`Hub::start`] wires the parts for a
//! validated [`config::Config`] and returns a handle; [`Hub::reload`] puts a new device table
//! and serial port list in force (SIGHUP) and [`Hub::shutdown`] stops it.
//! MODE's wire format lives in [`mode`], SQL in [`outbox`], the messages that cross layers in
//! [`local`], and the cloud stand-in used by tests, benchmarks and the demo in `emulator` (Cargo
//! feature `emulator`, on by default).

pub mod broker;
pub mod clock;
pub mod config;
#[cfg(feature = "emulator")]
pub mod demo;
pub mod device_cli;
pub mod doctor;
pub mod downlink;
#[cfg(feature = "emulator")]
pub mod emulator;
pub mod generation;
pub mod homes;
pub mod local;
pub mod metrics;
pub mod mode;
pub mod ops;
pub mod outbox;
pub mod pacing;
pub mod presence;
pub mod registry;
pub mod router;
pub mod serial;
pub mod timing;
pub mod uplink;

use crate::config::{Config, SerialConfig};
pub use crate::generation::{DeviceView, SharedView};
use crate::metrics::Metrics;
use crate::mode::SessionConfig;
use crate::outbox::{Notifier, Outbox, OutboxOptions};
use crate::registry::{DeviceId, Registry, SharedRegistry};
use crate::router::{Clock, Router};
use crate::uplink::{DeviceUplink, SessionState, UplinkStatus};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A running task with its own stop switch (a device's uplink, a serial port): a child of the
/// hub's shutdown token, so the hub's stop reaches it too, and tracked by the hub's tracker.
struct Stoppable {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Stoppable {
    /// Stops them all at once and waits for each to end; a task that does not end within
    /// `STOP_WAIT` is aborted, so it can never run on beside its replacement.
    async fn stop_all(all: Vec<Stoppable>) {
        for s in &all {
            s.stop.cancel();
        }
        let waits = all.into_iter().map(|s| async move {
            let abort = s.task.abort_handle();
            if tokio::time::timeout(STOP_WAIT, s.task).await.is_err() {
                abort.abort();
            }
        });
        futures_util::future::join_all(waits).await;
    }
}

/// How long a stopping uplink or serial port may take to finish what it owes.
const STOP_WAIT: Duration = Duration::from_secs(3);

/// A running serial port and the device slots it serves.
struct RunningPort {
    cfg: SerialConfig,
    devices: Vec<DeviceId>,
    tx: mpsc::Sender<downlink::DownMsg>,
    run: Stoppable,
}

/// What uplink tasks are made of; kept to start new devices' uplinks on a reload.
struct UplinkParts {
    outbox: Outbox,
    session: SessionConfig,
    notifies: Arc<RwLock<HashMap<u64, Arc<Notify>>>>,
    downstream: mpsc::Sender<uplink::Downstream>,
    metrics: Arc<Metrics>,
    pacer: Arc<pacing::Pacer>,
    homes: Arc<homes::Homes>,
    per_device_rate: u32,
    refusal_retry: Duration,
    retain_acked: Duration,
    /// The hub's shutdown token (each uplink gets a child) and task tracker.
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl UplinkParts {
    /// Starts `d`'s uplink; returns its session state, status and stop switch.
    fn spawn(
        &self,
        d: &registry::Device,
    ) -> (watch::Receiver<SessionState>, Arc<UplinkStatus>, Stoppable) {
        let (state, state_rx) = watch::channel(SessionState::Connecting);
        let pace = pacing::DevicePacer::new(self.per_device_rate);
        let status = DeviceUplink::new_status(d, &pace);
        let notify = self
            .notifies
            .write()
            .expect("notify lock")
            .entry(d.mode_id.get())
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone();
        let stop = self.shutdown.child_token();
        let up = DeviceUplink {
            device: d.clone(),
            outbox: self.outbox.clone(),
            session: self.session.clone(),
            notify,
            downstream: self.downstream.clone(),
            metrics: self.metrics.clone(),
            state,
            shutdown: stop.clone(),
            pacer: self.pacer.clone(),
            pace,
            homes: self.homes.clone(),
            refusal_retry: self.refusal_retry,
            retain_acked: self.retain_acked,
            status: status.clone(),
        };
        let task = self.tracker.spawn(up.run());
        (state_rx, status, Stoppable { stop, task })
    }
}

/// What serial port tasks share; kept to (re)start ports on a reload.
struct SerialParts {
    router: Router,
    metrics: Arc<Metrics>,
    events: mpsc::Sender<downlink::LocalEvent>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl SerialParts {
    /// Starts a port task that waits for `go` before it opens the port (a reload puts the
    /// port's queue in the new generation first); dropping `go` ends it unopened.
    fn spawn(
        &self,
        cfg: &SerialConfig,
        registry: &Arc<Registry>,
    ) -> (RunningPort, tokio::sync::oneshot::Sender<()>) {
        let (go, go_rx) = tokio::sync::oneshot::channel::<()>();
        let (tx, rx) = mpsc::channel(cfg.write_queue.max(1));
        let devices: Vec<DeviceId> = cfg
            .devices
            .iter()
            .filter_map(|n| registry.lookup(n).map(|d| d.id))
            .collect();
        let stop = self.shutdown.child_token();
        let ctx = serial::PortContext {
            cfg: cfg.clone(),
            devices: devices.clone(),
            registry: registry.clone(),
            router: self.router.clone(),
            metrics: self.metrics.clone(),
            events: self.events.clone(),
            down: rx,
            shutdown: stop.clone(),
        };
        let task = self.tracker.spawn(async move {
            if go_rx.await.is_ok() {
                serial::run_port(ctx).await;
            }
        });
        let port = RunningPort {
            cfg: cfg.clone(),
            devices,
            tx,
            run: Stoppable { stop, task },
        };
        (port, go)
    }
}

/// What a reload changed, in words for the log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Devices whose MODE ID, home or credentials changed (their sessions restarted).
    pub changed: Vec<String>,
    /// Serial ports started, stopped or restarted.
    pub ports: Vec<String>,
}

impl ReloadReport {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && self.ports.is_empty()
    }
}

/// A running hub.
pub struct Hub {
    local_addr: SocketAddr,
    metrics: Arc<Metrics>,
    outbox: Outbox,
    registry: Arc<SharedRegistry>,
    view: SharedView,
    homes: Arc<homes::Homes>,
    pacer: Arc<pacing::Pacer>,
    clock: Option<Arc<clock::ClockWatch>>,
    /// One shutdown: cancelled once by [`Hub::shutdown`]; every task of the hub watches it (or a
    /// child of it) and runs on `tracker`, which the stop waits for.
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// Per slot: the device's uplink (`None` once retired).
    uplinks: Vec<Option<Stoppable>>,
    ports: Vec<RunningPort>,
    uplink_parts: UplinkParts,
    serial_parts: SerialParts,
    outbox_thread: Option<std::thread::JoinHandle<()>>,
    /// Which devices are connected locally, and since when the hub runs (read by `ops`).
    presence: Arc<presence::Presence>,
    started: std::time::Instant,
}

/// Options that tests and tools set; production uses the defaults.
#[derive(Clone, Default)]
pub struct StartOptions {
    /// Capture clock; `None` = the system's ([`clock::ClockWatch`]: boot id, boot-time
    /// monotonic, synchronised or not, repaired once synchronised).
    pub clock: Option<Clock>,
}

/// `mqtt` or `serial <port>`.for each slot of `registry`.
fn transports(registry: &Registry, ports: &[RunningPort]) -> Vec<String> {
    (0..registry.len())
        .map(DeviceId)
        .map(|id| {
            ports
                .iter()
                .find(|p| p.devices.contains(&id))
                .map(|p| format!("serial {}", p.cfg.port.display()))
                .unwrap_or_else(|| "mqtt".to_string())
        })
        .collect()
}

/// Where each slot's downstream messages go, given the running ports.
fn adapter_table(registry: &Registry, ports: &[RunningPort]) -> Vec<generation::Adapter> {
    let mut table = vec![generation::Adapter::Mqtt; registry.len()];
    for p in ports {
        for &d in &p.devices {
            table[d] = generation::Adapter::Serial(p.tx.clone());
        }
    }
    table
}

impl Hub {
    /// Opens the outbox, starts the local broker and one uplink per device.
    pub async fn start(cfg: Config) -> anyhow::Result<Hub> {
        Hub::start_with(cfg, StartOptions::default()).await
    }

    pub async fn start_with(cfg: Config, opts: StartOptions) -> anyhow::Result<Hub> {
        let shared = SharedRegistry::new(Registry::from_config(&cfg));
        let registry = shared.load();
        let metrics = Arc::new(Metrics::default());
        let notifies: Arc<RwLock<HashMap<u64, Arc<Notify>>>> = Arc::new(RwLock::new(
            registry
                .iter()
                .map(|d| (d.mode_id.get(), Arc::new(Notify::new())))
                .collect(),
        ));
        let n = notifies.clone();
        let notifier: Notifier = Arc::new(move |dev| {
            if let Some(x) = n.read().expect("notify lock").get(&dev) {
                x.notify_one();
            }
        });
        let (outbox, outbox_thread) = Outbox::open_with(
            &cfg.hub.data_dir,
            OutboxOptions {
                sync_full: cfg.hub.durability == config::Durability::Full,
                max_bytes: cfg.hub.max_outbox_bytes,
                max_rows: cfg.hub.max_outbox_rows,
                min_free_disk: cfg.hub.min_free_disk,
                commit_window: std::time::Duration::from_millis(cfg.hub.commit_window_ms),
            },
            notifier,
        )?;
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (capture_clock, clock_watch) = match opts.clock {
            Some(c) => (c, None),
            None => {
                let w = clock::ClockWatch::system(cfg.hub.trust_clock);
                tracker.spawn(w.clone().run(outbox.clone(), shutdown.clone()));
                (w.clock(), Some(w))
            }
        };
        let router = Router::new(
            shared.clone(),
            outbox.clone(),
            metrics.clone(),
            cfg.hub.max_payload_bytes,
            capture_clock,
        )
        .with_max_key_len(cfg.hub.kv_max_key_len);
        let (local_tx, local_rx) = mpsc::channel(1024);
        // The one presence tracker: the downlink applies events in its order, ops reads it; the
        // tap in front of the downlink notes whether it keeps up (for the watchdog).
        let presence = Arc::new(presence::Presence::new(registry.len()));
        let local_rx = presence.clone().tap(local_rx, &tracker);
        // Serial ports: one task per [[serial]] table, each with a bounded write queue that the
        // downlink fills without waiting.
        let serial_parts = SerialParts {
            router: router.clone(),
            metrics: metrics.clone(),
            events: local_tx.clone(),
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
        };
        let ports: Vec<RunningPort> = cfg
            .serial
            .iter()
            .map(|s| {
                let (port, go) = serial_parts.spawn(s, &registry);
                let _ = go.send(());
                port
            })
            .collect();
        // The first generation: the device table and its adapters (sessions follow below, once
        // the uplinks exist; until then nobody reads them).
        let view: SharedView = Arc::new(RwLock::new(Arc::new(DeviceView {
            adapters: adapter_table(&registry, &ports),
            transports: transports(&registry, &ports),
            registry: registry.clone(),
            sessions: Vec::new(),
            uplinks: Vec::new(),
        })));
        let broker = broker::LocalBroker::start(
            &cfg.local.mqtt,
            cfg.hub.max_payload_bytes,
            shared.clone(),
            router,
            metrics.clone(),
            local_tx,
            shutdown.clone(),
            &tracker,
        )
        .await?;
        let local_addr = broker.local_addr();
        let (down_tx, down_rx) = mpsc::channel(1024);
        let down = downlink::Downlink {
            view: view.clone(),
            presence: presence.clone(),
            broker,
            outbox: outbox.clone(),
            metrics: metrics.clone(),
            cfg: downlink::DownlinkConfig {
                max_pending_commands: cfg.hub.max_pending_commands,
                command_ttl: Duration::from_secs(cfg.hub.command_ttl_secs),
            },
        };
        tracker.spawn(down.run(local_rx, down_rx, shutdown.clone()));
        let endpoint = cfg
            .cloud
            .mqtt_endpoint()
            .map_err(|e| anyhow::anyhow!("cloud.mqtt_url: {e}"))?;
        let session = SessionConfig {
            transport: cfg.cloud.transport,
            mqtt: endpoint,
            api_url: cfg.cloud.api_url.clone(),
            keepalive: cfg.cloud.keepalive(),
            inflight: cfg.cloud.max_inflight,
            max_packet: cfg.hub.max_payload_bytes + 4096,
            max_downlink_packet: cfg.cloud.max_downlink_packet_bytes,
            stamping: mode::Stamping {
                seq_field: cfg.cloud.seq_field.clone(),
                captured_at_field: cfg.cloud.captured_at_field.clone(),
            },
        };
        let homes = homes::Homes::new(
            registry.iter().map(|d| (d.mode_id, d.home_id)),
            cfg.cloud.project_key.is_some(),
        );
        tracker.spawn(homes::run(
            homes.clone(),
            cfg.cloud.api_url.clone(),
            cfg.cloud.project_key.clone(),
            Duration::from_secs(cfg.cloud.home_poll_interval_secs),
            shutdown.clone(),
        ));
        let pacer = pacing::Pacer::new(
            cfg.cloud.max_project_messages_per_minute,
            cfg.cloud.max_messages_per_minute,
        );
        let uplink_parts = UplinkParts {
            outbox: outbox.clone(),
            session,
            notifies,
            downstream: down_tx,
            metrics: metrics.clone(),
            pacer: pacer.clone(),
            homes: homes.clone(),
            per_device_rate: cfg.cloud.max_messages_per_minute,
            refusal_retry: Duration::from_secs(cfg.cloud.home_poll_interval_secs),
            // Two polls and some slack: a deactivation is seen within one poll interval.
            retain_acked: Duration::from_secs(2 * cfg.cloud.home_poll_interval_secs + 10),
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
        };
        let mut uplinks = Vec::new();
        let mut sessions = Vec::new();
        let mut statuses = Vec::new();
        for d in registry.iter() {
            let (state, status, run) = uplink_parts.spawn(d);
            sessions.push(state);
            statuses.push(status);
            uplinks.push(Some(run));
        }
        *view.write().expect("view lock") = Arc::new(DeviceView {
            adapters: adapter_table(&registry, &ports),
            transports: transports(&registry, &ports),
            registry: registry.clone(),
            sessions,
            uplinks: statuses,
        });
        tracing::info!(
            devices = registry.len(),
            local = %local_addr,
            data_dir = %cfg.hub.data_dir.display(),
            "modehub started"
        );
        Ok(Hub {
            local_addr,
            metrics,
            outbox,
            registry: shared,
            view,
            homes,
            pacer,
            clock: clock_watch,
            shutdown,
            tracker,
            uplinks,
            ports,
            uplink_parts,
            serial_parts,
            outbox_thread: Some(outbox_thread),
            presence,
            started: std::time::Instant::now(),
        })
    }

    /// Puts a new device table and serial port list in force without a restart (SIGHUP).
    ///
    /// Unchanged devices keep their upstream sessions and local connections. A removed device's
    /// local connections are closed and its uplink stopped; its backlog stays in the outbox
    /// (it drains if the device comes back). A changed device (MODE ID, home or credentials)
    /// is removed and added anew. Serial ports whose settings or devices changed are
    /// restarted; the others keep running. Every other setting needs a restart: the caller
    /// says so (see `modehub run`).
    pub async fn reload(&mut self, cfg: &Config) -> ReloadReport {
        let old = self.registry.load();
        let (new, changes) = old.reconcile(cfg);
        let new = Arc::new(new);
        let mut report = ReloadReport::default();
        for &id in &changes.retired {
            let name = &old.get(id).name;
            if new.lookup(name).is_some() {
                report.changed.push(name.clone());
            } else {
                report.removed.push(name.clone());
            }
        }
        for &id in &changes.added {
            let name = &new.get(id).name;
            if !report.changed.contains(name) {
                report.added.push(name.clone());
            }
        }
        // Stop first, all at once: retired devices' uplinks (a changed device never has two
        // sessions with MODE) and the serial ports whose settings or devices change (so they
        // stop answering for a retired device before the new table is in force).
        let mut stopping: Vec<Stoppable> = changes
            .retired
            .iter()
            .filter_map(|&id| self.uplinks.get_mut(id.index()).and_then(Option::take))
            .collect();
        let mut keep = Vec::new();
        let mut wanted: Vec<&SerialConfig> = cfg.serial.iter().collect();
        for port in std::mem::take(&mut self.ports) {
            let slots: Vec<DeviceId> = port
                .cfg
                .devices
                .iter()
                .filter_map(|n| new.lookup(n).map(|d| d.id))
                .collect();
            match wanted.iter().position(|w| **w == port.cfg) {
                Some(i) if slots == port.devices => {
                    wanted.remove(i);
                    keep.push(port);
                }
                _ => {
                    report
                        .ports
                        .push(format!("{} stopped", port.cfg.port.display()));
                    stopping.push(port.run);
                }
            }
        }
        Stoppable::stop_all(stopping).await;
        let current = self.view.read().expect("view lock").clone();
        let mut sessions = current.sessions.clone();
        let mut statuses = current.uplinks.clone();
        for &id in &changes.added {
            let (state, status, run) = self.uplink_parts.spawn(new.get(id));
            debug_assert_eq!(sessions.len(), id.index());
            sessions.push(state);
            statuses.push(status);
            self.uplinks.push(Some(run));
        }
        let mut go = Vec::new();
        for w in wanted {
            let name = format!("{} started", w.port.display());
            // A restarted port reads "stopped" then "started".
            report.ports.push(name);
            let (port, start) = self.serial_parts.spawn(w, &new);
            keep.push(port);
            go.push(start);
        }
        self.ports = keep;
        // The new generation, in force at once (no await in between): the device table for
        // the adapters (retired devices' local connections close, new ones may log in), the
        // home watcher's devices, and the view with the adapter table the downlink routes by.
        let generation = Arc::new(DeviceView {
            adapters: adapter_table(&new, &self.ports),
            transports: transports(&new, &self.ports),
            registry: new.clone(),
            sessions,
            uplinks: statuses,
        });
        self.registry.store(new.clone());
        self.homes
            .set_devices(new.iter().map(|d| (d.mode_id, d.home_id)));
        *self.view.write().expect("view lock") = generation;
        // Only now do new ports open and announce their devices.
        for g in go {
            let _ = g.send(());
        }
        report
    }

    /// The per-slot view ops reads (shared; replaced on reload).
    pub fn view(&self) -> &SharedView {
        &self.view
    }

    fn current_view(&self) -> Arc<DeviceView> {
        self.view.read().expect("view lock").clone()
    }

    /// Where local sensors connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// The device table in force.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.load()
    }

    /// The home watcher's shared state.
    pub fn homes(&self) -> &Arc<homes::Homes> {
        &self.homes
    }

    /// Hub-wide pacing (token buckets).
    pub fn pacer(&self) -> &Arc<pacing::Pacer> {
        &self.pacer
    }

    /// Each configured device's uplink status (pacing, hold), in registry order.
    pub fn uplink_status(&self) -> Vec<Arc<UplinkStatus>> {
        let v = self.current_view();
        v.registry.iter().map(|d| v.uplinks[d.id].clone()).collect()
    }

    /// The capture clock's state (`None` when a test injected its own clock).
    pub fn clock(&self) -> Option<&Arc<clock::ClockWatch>> {
        self.clock.as_ref()
    }

    /// Upstream session state of each configured device, in registry order.
    pub fn session_states(&self) -> Vec<SessionState> {
        let v = self.current_view();
        v.registry
            .iter()
            .map(|d| v.sessions[d.id].borrow().clone())
            .collect()
    }

    /// Stops accepting, closes sessions, waits for every task of the hub, and then for the
    /// outbox's last commit.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        let stopping: Vec<Stoppable> = self
            .uplinks
            .drain(..)
            .flatten()
            .chain(self.ports.drain(..).map(|p| p.run))
            .collect();
        Stoppable::stop_all(stopping).await;
        self.tracker.close();
        if tokio::time::timeout(STOP_WAIT, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                tasks = self.tracker.len(),
                "some tasks did not end within {STOP_WAIT:?} of the stop; leaving them"
            );
        }
        let thread = self.outbox_thread.take();
        drop(self);
        if let Some(t) = thread {
            // The writer ends when the last outbox handle is gone; local relay tasks may still
            // hold one for a moment, so wait off the async runtime.
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}
