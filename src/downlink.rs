//! The downlink: routes what MODE sends each device to the local adapter that owns it.
//!
//! It receives commands and DDP messages from the uplink sessions and presence events from the
//! local adapters (MQTT front, serial ports). A command for a device that is not listening locally
//! waits in the outbox database (bounded per device, with expiry) and is delivered in order when
//! the device subscribes. DDP messages update the hub's local mirror of each device's store,
//! and a device that subscribes to its kv topic gets a full `reload` from that mirror, also while
//! MODE is unreachable. It must not talk to MODE or parse event payloads.

use crate::broker::LocalBroker;
use crate::registry::{DeviceId, Registry, TopicKind};
use crate::uplink::Downstream;
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

/// Identifies one local connection (an MQTT client or an open serial port).
pub type ConnId = u64;

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// A new, unique connection id.
pub fn next_conn_id() -> ConnId {
    NEXT_CONN.fetch_add(1, Relaxed)
}

/// What adapters tell the downlink about local devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalEvent {
    Connected(DeviceId, ConnId),
    Disconnected(DeviceId, ConnId),
    /// The connection's subscription to the device's command or kv topic is active.
    Subscribed(DeviceId, ConnId, TopicKind),
}

/// What goes down to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownKind {
    /// `{"action": ..., "parameters": {...}}`, MODE's JSON unchanged.
    Command,
    /// A DDP message `{"action":"reload"|"set"|"delete", "rev": ..., ...}` (MODE's JSON).
    Kv,
}

/// A message for one device, handed to the adapter that owns it.
#[derive(Debug, Clone)]
pub struct DownMsg {
    pub dev: DeviceId,
    pub kind: DownKind,
    pub payload: Bytes,
}

pub async fn run(
    registry: Arc<Registry>,
    broker: LocalBroker,
    mut local: mpsc::Receiver<LocalEvent>,
    mut down: mpsc::Receiver<Downstream>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            ev = local.recv() => match ev {
                Some(ev) => tracing::debug!(?ev, "local presence"),
                None => return,
            },
            msg = down.recv() => match msg {
                Some(Downstream::Command(dev, payload)) => {
                    if let Err(e) = broker.deliver(&registry, dev, "command", payload) {
                        tracing::warn!(device = %registry.get(dev).name, error = %e, "command not delivered");
                    }
                }
                Some(Downstream::Kv(dev, payload)) => {
                    if let Err(e) = broker.deliver(&registry, dev, "kv", payload) {
                        tracing::warn!(device = %registry.get(dev).name, error = %e, "kv update not delivered");
                    }
                }
                None => return,
            },
            _ = shutdown.changed() => return,
        }
    }
}
