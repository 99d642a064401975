//! The downlink: routes what MODE sends each device to the local adapter that owns it.
//!
//! It receives commands and DDP messages from the uplink sessions and presence events from the
//! local adapters (MQTT front, serial ports). A command for a device that is not listening locally
//! waits in the outbox database (bounded per device, with expiry) and is delivered in order when
//! the device subscribes. DDP messages update the hub's local mirror of each device's store,
//! and a device that subscribes to its kv topic gets a full `reload` from that mirror, also while
//! MODE is unreachable. Each device's work runs on its own task behind a bounded queue, so one
//! device's slow path (storage, a full serial queue) never stalls another's or the uplinks. It
//! must not talk to MODE or parse event payloads.

use crate::broker::LocalBroker;
use crate::generation::{DeviceView, SharedView};
pub use crate::local::{next_conn_id, ConnId, DownKind, DownMsg, LocalEvent};
use crate::local::{DeviceId, KvChange, ModeId};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::presence::{Listening, Presence};
use crate::timing::now_ms;
use crate::uplink::Downstream;
use bytes::Bytes;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::generation::Adapter;

/// Settings of the way down.
#[derive(Debug, Clone)]
pub struct DownlinkConfig {
    /// Commands kept per device while it is away.
    pub max_pending_commands: usize,
    /// How long a waiting command stays deliverable.
    pub command_ttl: Duration,
}

/// Work waiting for one device's task, in arrival order. The flags say whether the device was
/// listening (commands / kv) when the message arrived.
enum Work {
    Command(Bytes, bool),
    Kv(Bytes, bool, Option<tokio::sync::oneshot::Sender<()>>),
    /// The device subscribed to its command topic: deliver what waited.
    FlushCommands,
    /// The device subscribed to its kv topic: send it the whole store.
    ServeReload,
}

impl Work {
    fn what(&self) -> &'static str {
        match self {
            Work::Command(..) => "command",
            Work::Kv(..) => "kv",
            Work::FlushCommands => "waiting commands",
            Work::ServeReload => "kv reload",
        }
    }
}

/// Work queued per device before new work for it is dropped (its path is stuck).
const DEVICE_QUEUE: usize = 256;

/// How often expired commands are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

pub struct Downlink {
    /// The hub's current generation: the device table and where each slot's messages go, read
    /// together from one snapshot.
    pub view: SharedView,
    /// Local presence, applied here in the order events are handled (ops reads it too).
    pub presence: Arc<Presence>,
    pub broker: LocalBroker,
    pub outbox: Outbox,
    pub metrics: Arc<Metrics>,
    pub cfg: DownlinkConfig,
}

impl Downlink {
    /// The generation in force.
    fn generation(&self) -> Arc<DeviceView> {
        self.view.read().expect("view lock").clone()
    }

    /// Runs until shutdown or until both inputs close.
    ///
    /// This task only keeps presence and routes: each device's work (which waits on SQLite)
    /// runs on a task of its own, in arrival order, behind a bounded queue, so one device's
    /// slow path never holds up another's. A device whose queue is full loses the message
    /// (counted in `modehub_downlink_queue_full_total`, logged) rather than stall the rest.
    pub async fn run(
        self,
        mut local: mpsc::Receiver<LocalEvent>,
        mut down: mpsc::Receiver<Downstream>,
        shutdown: CancellationToken,
    ) {
        let this = Arc::new(self);
        let tracker = TaskTracker::new();
        tracker.spawn(this.clone().sweeper(shutdown.clone()));
        // Per slot; grows when a reload adds device slots.
        let mut workers: Vec<Option<mpsc::Sender<Work>>> = Vec::new();
        loop {
            let (dev, work) = tokio::select! {
                ev = local.recv() => match ev {
                    Some(ev) => match this.presence.apply(&ev) {
                        Some((dev, Listening::Commands)) => (dev, Work::FlushCommands),
                        Some((dev, Listening::Kv)) => (dev, Work::ServeReload),
                        None => continue,
                    },
                    None => break,
                },
                msg = down.recv() => match msg {
                    Some(Downstream::Command(dev, payload)) => {
                        let listening = this.presence.listens_for_commands(dev);
                        (dev, Work::Command(payload, listening))
                    }
                    Some(Downstream::Kv(dev, payload)) => {
                        let listening = this.presence.listens_for_kv(dev);
                        (dev, Work::Kv(payload, listening, None))
                    }
                    Some(Downstream::KvBarrier(dev, payload, done)) => {
                        let listening = this.presence.listens_for_kv(dev);
                        (dev, Work::Kv(payload, listening, Some(done)))
                    }
                    None => break,
                },
                _ = shutdown.cancelled() => break,
            };
            this.dispatch(&mut workers, &tracker, &shutdown, dev, work);
        }
        // Each worker ends once its queue is drained and closed, or at shutdown.
        drop(workers);
        tracker.close();
        tracker.wait().await;
    }

    /// Queues `work` for device `dev`'s task (started on first use), without waiting.
    fn dispatch(
        self: &Arc<Self>,
        workers: &mut Vec<Option<mpsc::Sender<Work>>>,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
        dev: DeviceId,
        work: Work,
    ) {
        if workers.len() <= dev.index() {
            workers.resize_with(dev.index() + 1, || None);
        }
        let tx = workers[dev].get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel(DEVICE_QUEUE);
            tracker.spawn(self.clone().worker(dev, rx, shutdown.clone()));
            tx
        });
        match tx.try_send(work) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(work)) => {
                let m = &self.metrics.down;
                m.queue_full.fetch_add(1, Relaxed);
                if matches!(work, Work::Command(..)) {
                    m.commands_lost.fetch_add(1, Relaxed);
                }
                let name = self.generation().registry.get(dev).name.clone();
                tracing::warn!(device = %name, queue = DEVICE_QUEUE, work = work.what(),
                    "this device's downlink queue is full (its storage or port is slow): dropped");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Does one device's work in order until its queue closes or the hub stops.
    async fn worker(
        self: Arc<Self>,
        dev: DeviceId,
        mut rx: mpsc::Receiver<Work>,
        shutdown: CancellationToken,
    ) {
        loop {
            let work = tokio::select! {
                w = rx.recv() => match w {
                    Some(w) => w,
                    None => return,
                },
                _ = shutdown.cancelled() => return,
            };
            // Test hook: a test can hold this device's path, as slow storage or a port would.
            #[cfg(test)]
            tests::gate(self.generation().registry.get(dev).mode_id.get()).await;
            match work {
                Work::Command(payload, listening) => self.command(listening, dev, payload).await,
                Work::Kv(payload, listening, done) => {
                    self.kv(listening, dev, payload).await;
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                }
                Work::FlushCommands => self.flush_commands(dev).await,
                Work::ServeReload => self.serve_reload(dev).await,
            }
        }
    }

    /// Expires waiting commands every [`SWEEP_EVERY`] until shutdown.
    async fn sweeper(self: Arc<Self>, shutdown: CancellationToken) {
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = sweep.tick() => self.sweep().await,
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Hands a message to the device's adapter.
    fn hand_over(&self, dev: DeviceId, kind: DownKind, payload: Bytes) -> Result<(), String> {
        let generation = self.generation();
        match generation.adapter(dev) {
            Adapter::Mqtt => {
                let sub = match kind {
                    DownKind::Command => "command",
                    DownKind::Kv => "kv",
                };
                self.broker.deliver(&generation.registry, dev, sub, payload)
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

    async fn command(&self, listening: bool, dev: DeviceId, payload: Bytes) {
        let registry = self.generation().registry.clone();
        let d = registry.get(dev);
        let m = &self.metrics.down;
        if listening {
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
                d.mode_id.get(),
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
        let registry = self.generation().registry.clone();
        let d = registry.get(dev);
        let m = &self.metrics.down;
        let taken = match self.outbox.take_commands(d.mode_id.get(), now_ms()).await {
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
                        .generation()
                        .registry
                        .by_mode_id(ModeId(mode_id))
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
        let registry = self.generation().registry.clone();
        let d = registry.get(dev);
        match self.outbox.kv_snapshot(d.mode_id.get()).await {
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

    async fn kv(&self, listening: bool, dev: DeviceId, payload: Bytes) {
        let registry = self.generation().registry.clone();
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
        match self.outbox.kv_apply(d.mode_id.get(), change).await {
            Ok(true) => {
                m.kv_applied.fetch_add(1, Relaxed);
                if !listening {
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

#[cfg(test)]
mod tests;
