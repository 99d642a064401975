//! The downlink: routes what MODE sends each device to the local adapter that owns it.
//!
//! It receives commands and DDP messages from the uplink sessions and presence events from the
//! local adapters (MQTT front, serial ports). A command for a device that is not listening locally
//! waits in the outbox database (bounded per device, with expiry) and is delivered in order when
//! the device subscribes. DDP messages update the hub's local mirror of each device's store,
//! and a device that subscribes to its kv topic gets a full `reload` from that mirror, also while
//! MODE is unreachable. It must not talk to MODE or parse event payloads.

use crate::broker::LocalBroker;
pub use crate::local::{next_conn_id, ConnId, DownKind, DownMsg, LocalEvent};
use crate::local::{DeviceId, KvChange, TopicKind};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::registry::SharedRegistry;
use crate::timing::now_ms;
use crate::uplink::Downstream;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Where a device's downstream messages go.
#[derive(Clone)]
pub enum Adapter {
    /// The local MQTT broker (the device subscribes to its topics).
    Mqtt,
    /// A serial port's bounded write queue.
    Serial(mpsc::Sender<DownMsg>),
}

/// Per device slot (by `DeviceId`), where its messages go; the hub updates it on a reload
/// (a slot not listed goes to the MQTT broker).
pub type Adapters = Arc<RwLock<Vec<Adapter>>>;

/// Settings of the way down.
#[derive(Debug, Clone)]
pub struct DownlinkConfig {
    /// Commands kept per device while it is away.
    pub max_pending_commands: usize,
    /// How long a waiting command stays deliverable.
    pub command_ttl: Duration,
}

/// Which local connections of a device listen for what.
#[derive(Default)]
struct Presence {
    /// conn -> (listens for commands, listens for kv)
    conns: HashMap<ConnId, (bool, bool)>,
}

impl Presence {
    fn commands(&self) -> bool {
        self.conns.values().any(|c| c.0)
    }
    fn kv(&self) -> bool {
        self.conns.values().any(|c| c.1)
    }
}

/// How often expired commands are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

pub struct Downlink {
    pub registry: Arc<SharedRegistry>,
    pub broker: LocalBroker,
    pub outbox: Outbox,
    pub metrics: Arc<Metrics>,
    pub adapters: Adapters,
    pub cfg: DownlinkConfig,
}

impl Downlink {
    /// Runs until shutdown or until both inputs close.
    pub async fn run(
        self,
        mut local: mpsc::Receiver<LocalEvent>,
        mut down: mpsc::Receiver<Downstream>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        // Grows when a reload adds device slots.
        let mut presence: Vec<Presence> = Vec::new();
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ev = local.recv() => match ev {
                    Some(ev) => self.local_event(&mut presence, ev).await,
                    None => return,
                },
                msg = down.recv() => match msg {
                    Some(Downstream::Command(dev, payload)) => self.command(&presence, dev, payload).await,
                    Some(Downstream::Kv(dev, payload)) => self.kv(&presence, dev, payload).await,
                    Some(Downstream::KvBarrier(dev, payload, done)) => {
                        self.kv(&presence, dev, payload).await;
                        let _ = done.send(());
                    }
                    None => return,
                },
                _ = sweep.tick() => self.sweep().await,
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn local_event(&self, presence: &mut Vec<Presence>, ev: LocalEvent) {
        let dev = match ev {
            LocalEvent::Connected(d, _)
            | LocalEvent::Disconnected(d, _)
            | LocalEvent::Subscribed(d, _, _) => d,
        };
        if presence.len() <= dev {
            presence.resize_with(dev + 1, Presence::default);
        }
        match ev {
            LocalEvent::Connected(dev, conn) => {
                presence[dev].conns.entry(conn).or_default();
            }
            LocalEvent::Disconnected(dev, conn) => {
                presence[dev].conns.remove(&conn);
            }
            LocalEvent::Subscribed(dev, conn, TopicKind::Command) => {
                presence[dev].conns.entry(conn).or_default().0 = true;
                self.flush_commands(dev).await;
            }
            LocalEvent::Subscribed(dev, conn, TopicKind::Kv) => {
                presence[dev].conns.entry(conn).or_default().1 = true;
                self.serve_reload(dev).await;
            }
            LocalEvent::Subscribed(..) => {}
        }
    }

    /// Hands a message to the device's adapter.
    fn hand_over(&self, dev: DeviceId, kind: DownKind, payload: Bytes) -> Result<(), String> {
        let adapters = self.adapters.read().expect("adapters lock");
        match adapters.get(dev).unwrap_or(&Adapter::Mqtt) {
            Adapter::Mqtt => {
                let sub = match kind {
                    DownKind::Command => "command",
                    DownKind::Kv => "kv",
                };
                self.broker
                    .deliver(&self.registry.load(), dev, sub, payload)
            }
            Adapter::Serial(tx) => {
                if crate::serial::offer(tx, DownMsg { dev, kind, payload }, &self.metrics.serial) {
                    Ok(())
                } else {
                    Err("the serial port's write queue is full (the sensor is not reading)".into())
                }
            }
        }
    }

    async fn command(&self, presence: &[Presence], dev: DeviceId, payload: Bytes) {
        let registry = self.registry.load();
        let d = registry.get(dev);
        let m = &self.metrics.down;
        if presence.get(dev).is_some_and(Presence::commands) {
            match self.hand_over(dev, DownKind::Command, payload) {
                Ok(()) => {
                    m.commands_delivered.fetch_add(1, Relaxed);
                }
                Err(e) => {
                    m.commands_lost.fetch_add(1, Relaxed);
                    tracing::warn!(device = %d.name, error = %e, "command not delivered");
                }
            }
            return;
        }
        let ttl = self.cfg.command_ttl.as_millis() as i64;
        match self
            .outbox
            .queue_command(
                d.mode_id,
                payload.to_vec(),
                now_ms(),
                ttl,
                self.cfg.max_pending_commands,
            )
            .await
        {
            Ok(dropped) => {
                m.commands_queued.fetch_add(1, Relaxed);
                tracing::info!(device = %d.name, "device is not listening: command stored until it subscribes");
                if dropped > 0 {
                    m.commands_dropped.fetch_add(dropped, Relaxed);
                    tracing::warn!(device = %d.name, dropped, max = self.cfg.max_pending_commands,
                        "too many commands waiting for this device: dropped the oldest (raise hub.max_pending_commands)");
                }
            }
            Err(e) => {
                m.commands_lost.fetch_add(1, Relaxed);
                tracing::error!(device = %d.name, error = %e, "cannot store a command for an absent device; it is lost");
            }
        }
    }

    /// Delivers, in order, what waited for `dev`; expired ones are counted, never delivered.
    async fn flush_commands(&self, dev: DeviceId) {
        let registry = self.registry.load();
        let d = registry.get(dev);
        let m = &self.metrics.down;
        let taken = match self.outbox.take_commands(d.mode_id, now_ms()).await {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(device = %d.name, error = %e, "cannot read waiting commands");
                return;
            }
        };
        if taken.expired > 0 {
            m.commands_expired.fetch_add(taken.expired, Relaxed);
            tracing::warn!(device = %d.name, expired = taken.expired, "waiting commands expired before the device came back; not delivered");
        }
        let n = taken.deliver.len();
        for p in taken.deliver {
            match self.hand_over(dev, DownKind::Command, Bytes::from(p)) {
                Ok(()) => m.commands_delivered.fetch_add(1, Relaxed),
                Err(e) => {
                    tracing::warn!(device = %d.name, error = %e, "waiting command not delivered");
                    m.commands_lost.fetch_add(1, Relaxed)
                }
            };
        }
        if n > 0 {
            tracing::info!(device = %d.name, delivered = n, "delivered commands that waited for the device");
        }
    }

    async fn sweep(&self) {
        match self.outbox.expire_commands(now_ms()).await {
            Ok(per) => {
                for (mode_id, n) in per {
                    self.metrics.down.commands_expired.fetch_add(n, Relaxed);
                    let name = self
                        .registry
                        .load()
                        .by_mode_id(mode_id)
                        .map(|d| d.name.clone())
                        .unwrap_or_else(|| mode_id.to_string());
                    tracing::warn!(device = %name, expired = n, ttl = ?self.cfg.command_ttl,
                        "waiting commands expired (the device did not come back in time); not delivered");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot expire waiting commands"),
        }
    }

    /// Sends the device its whole store (mirror + local changes not yet acknowledged by MODE).
    async fn serve_reload(&self, dev: DeviceId) {
        let registry = self.registry.load();
        let d = registry.get(dev);
        match self.outbox.kv_snapshot(d.mode_id).await {
            Ok(snap) => {
                let msg = crate::mode::kv_reload_message(&snap);
                match self.hand_over(dev, DownKind::Kv, Bytes::from(msg)) {
                    Ok(()) => {
                        self.metrics.down.kv_reloads_served.fetch_add(1, Relaxed);
                    }
                    Err(e) => {
                        tracing::warn!(device = %d.name, error = %e, "kv reload not delivered")
                    }
                }
            }
            Err(e) => tracing::error!(device = %d.name, error = %e, "cannot read the kv mirror"),
        }
    }

    async fn kv(&self, presence: &[Presence], dev: DeviceId, payload: Bytes) {
        let registry = self.registry.load();
        let d = registry.get(dev);
        let m = &self.metrics.down;
        let change = match crate::mode::parse_kv(&payload) {
            Ok(c) => c,
            Err(e) => {
                m.kv_invalid.fetch_add(1, Relaxed);
                tracing::warn!(device = %d.name, error = %e, "ignoring a malformed DDP message from MODE");
                return;
            }
        };
        let is_reload = matches!(change, KvChange::Reload { .. });
        match self.outbox.kv_apply(d.mode_id, change).await {
            Ok(true) => {
                m.kv_applied.fetch_add(1, Relaxed);
                if !presence.get(dev).is_some_and(Presence::kv) {
                    return; // it gets a reload from the mirror when it subscribes
                }
                if is_reload {
                    self.serve_reload(dev).await;
                } else if let Err(e) = self.hand_over(dev, DownKind::Kv, payload) {
                    tracing::warn!(device = %d.name, error = %e, "kv update not delivered");
                }
            }
            Ok(false) => {
                m.kv_ignored.fetch_add(1, Relaxed);
                tracing::debug!(device = %d.name, "DDP message not newer than the mirror; ignored");
            }
            Err(e) => tracing::error!(device = %d.name, error = %e, "cannot update the kv mirror"),
        }
    }
}
