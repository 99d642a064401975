//! The downlink: routes what MODE sends each device to the local adapter that owns it.
//!
//! It receives commands and DDP messages from the uplink sessions and presence events from the
//! local front, and publishes to the device's local topics through the embedded broker. It must
//! not talk to MODE or parse event payloads.

use crate::broker::{LocalBroker, LocalEvent};
use crate::registry::Registry;
use crate::uplink::Downstream;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

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
