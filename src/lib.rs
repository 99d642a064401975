//! modehub: an edge gateway hub bridging a home's local devices to the MODE IoT cloud.
//!
//! Data flows one way each direction:
//! adapters ([`broker`]) -> [`router`] -> [`outbox`] (SQLite) -> [`uplink`] -> MODE, and
//! MODE -> [`uplink`] sessions -> [`downlink`] -> adapters. [`Hub::start`] wires the parts for a
//! validated [`config::Config`] and returns a handle; dropping the handle's shutdown stops it.
//! MODE's wire format lives in [`mode`], SQL in [`outbox`], and the cloud stand-in used by tests,
//! benchmarks and the demo in [`emulator`].

pub mod broker;
pub mod clock;
pub mod config;
pub mod demo;
pub mod downlink;
#[cfg(not(modehub_no_emulator))]
pub mod emulator;
pub mod homes;
pub mod metrics;
pub mod mode;
pub mod ops;
pub mod outbox;
pub mod pacing;
pub mod registry;
pub mod router;
pub mod serial;
pub mod uplink;

use crate::broker::LocalBroker;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::mode::SessionConfig;
use crate::outbox::{Notifier, Outbox, OutboxOptions};
use crate::registry::Registry;
use crate::router::{Clock, Router};
use crate::uplink::{DeviceUplink, SessionState, UplinkStatus};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::{mpsc, watch, Notify};

/// A running hub.
pub struct Hub {
    local_addr: SocketAddr,
    metrics: Arc<Metrics>,
    outbox: Outbox,
    registry: Arc<Registry>,
    sessions: Vec<watch::Receiver<SessionState>>,
    homes: Arc<homes::Homes>,
    pacer: Arc<pacing::Pacer>,
    uplinks: Vec<Arc<UplinkStatus>>,
    clock: Option<Arc<clock::ClockWatch>>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    outbox_thread: Option<std::thread::JoinHandle<()>>,
    /// Which devices are connected locally, and since when the hub runs (read by `ops`).
    presence: Arc<ops::Presence>,
    started: std::time::Instant,
}

/// Options that tests and tools set; production uses the defaults.
#[derive(Clone, Default)]
pub struct StartOptions {
    /// Capture clock; `None` = the system's ([`clock::ClockWatch`]: boot id, boot-time
    /// monotonic, synchronised or not, repaired once synchronised).
    pub clock: Option<Clock>,
}

impl Hub {
    /// Opens the outbox, starts the local broker and one uplink per device.
    pub async fn start(cfg: Config) -> anyhow::Result<Hub> {
        Hub::start_with(cfg, StartOptions::default()).await
    }

    pub async fn start_with(cfg: Config, opts: StartOptions) -> anyhow::Result<Hub> {
        let registry = Arc::new(Registry::from_config(&cfg));
        let metrics = Arc::new(Metrics::default());
        let notifies: Arc<HashMap<u64, Arc<Notify>>> = Arc::new(
            registry
                .iter()
                .map(|d| (d.mode_id, Arc::new(Notify::new())))
                .collect(),
        );
        let n = notifies.clone();
        let notifier: Notifier = Arc::new(move |dev| {
            if let Some(x) = n.get(&dev) {
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
            },
            notifier,
        )?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let (capture_clock, clock_watch) = match opts.clock {
            Some(c) => (c, None),
            None => {
                let w = clock::ClockWatch::system(cfg.hub.trust_clock);
                tasks.push(tokio::spawn(
                    w.clone().run(outbox.clone(), shutdown_rx.clone()),
                ));
                (w.clock(), Some(w))
            }
        };
        let router = Router::new(
            registry.clone(),
            outbox.clone(),
            metrics.clone(),
            cfg.hub.max_payload_bytes,
            capture_clock,
        )
        .with_max_key_len(cfg.hub.kv_max_key_len);
        let (local_tx, local_rx) = mpsc::channel(1024);
        // ops watches local presence on its way to the downlink (status: "local connected?").
        let presence = Arc::new(ops::Presence::new(registry.len()));
        let local_rx = presence.clone().tap(local_rx);
        // Serial ports: one task per [[serial]] table, each with a bounded write queue that the
        // downlink fills without waiting.
        let mut adapters = vec![downlink::Adapter::Mqtt; registry.len()];
        let mut serial_tasks = Vec::new();
        for s in &cfg.serial {
            let (tx, rx) = mpsc::channel(s.write_queue.max(1));
            let devices: Vec<_> = s
                .devices
                .iter()
                .filter_map(|n| registry.lookup(n).map(|d| d.id))
                .collect();
            for &d in &devices {
                adapters[d] = downlink::Adapter::Serial(tx.clone());
            }
            serial_tasks.push(tokio::spawn(serial::run_port(serial::PortContext {
                cfg: s.clone(),
                devices,
                registry: registry.clone(),
                router: router.clone(),
                metrics: metrics.clone(),
                events: local_tx.clone(),
                down: rx,
                shutdown: shutdown_rx.clone(),
            })));
        }
        let broker = LocalBroker::start(
            &cfg.local.mqtt,
            cfg.hub.max_payload_bytes,
            registry.clone(),
            router,
            metrics.clone(),
            local_tx,
            shutdown_rx.clone(),
        )
        .await?;
        let local_addr = broker.local_addr();
        let (down_tx, down_rx) = mpsc::channel(1024);
        tasks.extend(serial_tasks);
        let down = downlink::Downlink {
            registry: registry.clone(),
            broker,
            outbox: outbox.clone(),
            metrics: metrics.clone(),
            adapters,
            cfg: downlink::DownlinkConfig {
                max_pending_commands: cfg.hub.max_pending_commands,
                command_ttl: std::time::Duration::from_secs(cfg.hub.command_ttl_secs),
            },
        };
        tasks.push(tokio::spawn(down.run(
            local_rx,
            down_rx,
            shutdown_rx.clone(),
        )));
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
            stamping: mode::Stamping {
                seq_field: cfg.cloud.seq_field.clone(),
                captured_at_field: cfg.cloud.captured_at_field.clone(),
            },
        };
        let homes = homes::Homes::new(
            registry.iter().map(|d| (d.mode_id, d.home_id)),
            cfg.cloud.project_key.is_some(),
        );
        tasks.push(tokio::spawn(homes::run(
            homes.clone(),
            cfg.cloud.api_url.clone(),
            cfg.cloud.project_key.clone(),
            std::time::Duration::from_secs(cfg.cloud.home_poll_interval_secs),
            shutdown_rx.clone(),
        )));
        let pacer = pacing::Pacer::new(
            cfg.cloud.max_project_messages_per_minute,
            cfg.cloud.max_messages_per_minute,
        );
        let mut uplinks = Vec::new();
        let mut sessions = Vec::new();
        for d in registry.iter() {
            let (state, state_rx) = watch::channel(SessionState::Connecting);
            sessions.push(state_rx);
            let pace = pacing::DevicePacer::new(cfg.cloud.max_messages_per_minute);
            let status = DeviceUplink::new_status(d, &pace);
            uplinks.push(status.clone());
            let up = DeviceUplink {
                device: d.clone(),
                outbox: outbox.clone(),
                session: session.clone(),
                notify: notifies[&d.mode_id].clone(),
                downstream: down_tx.clone(),
                metrics: metrics.clone(),
                state,
                shutdown: shutdown_rx.clone(),
                pacer: pacer.clone(),
                pace,
                homes: homes.clone(),
                refusal_retry: std::time::Duration::from_secs(cfg.cloud.home_poll_interval_secs),
                status,
            };
            tasks.push(tokio::spawn(up.run()));
        }
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
            registry,
            sessions,
            homes,
            pacer,
            uplinks,
            clock: clock_watch,
            shutdown,
            tasks,
            outbox_thread: Some(outbox_thread),
            presence,
            started: std::time::Instant::now(),
        })
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

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The home watcher's shared state.
    pub fn homes(&self) -> &Arc<homes::Homes> {
        &self.homes
    }

    /// Hub-wide pacing (token buckets).
    pub fn pacer(&self) -> &Arc<pacing::Pacer> {
        &self.pacer
    }

    /// Each device's uplink status (pacing, hold), in registry order.
    pub fn uplink_status(&self) -> &[Arc<UplinkStatus>] {
        &self.uplinks
    }

    /// The capture clock's state (`None` when a test injected its own clock).
    pub fn clock(&self) -> Option<&Arc<clock::ClockWatch>> {
        self.clock.as_ref()
    }

    /// Upstream session state of each device, in registry order.
    pub fn session_states(&self) -> Vec<SessionState> {
        self.sessions.iter().map(|s| s.borrow().clone()).collect()
    }

    /// Stops accepting, closes sessions, and waits for the outbox's last commit.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks.drain(..) {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(3), t).await;
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
