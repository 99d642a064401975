//! Serial adapters (being written): one task per `[[serial]]` port.

use crate::config::SerialConfig;
use crate::downlink::{DownMsg, LocalEvent};
use crate::metrics::Metrics;
use crate::registry::{DeviceId, Registry};
use crate::router::Router;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

/// Everything a port task needs.
pub struct PortContext {
    pub cfg: SerialConfig,
    /// The devices that may speak on this port (from `cfg.devices`).
    pub devices: Vec<DeviceId>,
    pub registry: Arc<Registry>,
    pub router: Router,
    pub metrics: Arc<Metrics>,
    /// Presence: `Connected` + `Subscribed(dev, Command)` + `Subscribed(dev, Kv)` for each device
    /// when the port opens, `Disconnected` when it is lost.
    pub events: mpsc::Sender<LocalEvent>,
    /// Commands and DDP messages (MODE JSON) to write to this port as lines.
    pub down: mpsc::Receiver<DownMsg>,
    pub shutdown: watch::Receiver<bool>,
}

/// Runs one port until shutdown: opens it (retrying with backoff), reads lines, writes lines.
pub async fn run_port(ctx: PortContext) {
    let mut shutdown = ctx.shutdown.clone();
    tracing::warn!(port = %ctx.cfg.port.display(), "serial adapters are not implemented yet");
    let _ = shutdown.changed().await;
}
