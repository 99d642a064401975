//! One generation of the hub's per-device state: the device table, where each slot's downstream
//! messages go, its upstream session state and uplink status, and its transport. A reload
//! builds a new generation and swaps it in once, so a reader (the downlink, ops, the `Hub`
//! accessors) never sees a new device table with old adapters. It must not start or stop
//! anything.

use crate::local::{DeviceId, DownMsg};
use crate::registry::Registry;
use crate::uplink::{SessionState, UplinkStatus};
use std::sync::{Arc, RwLock};
use tokio::sync::{mpsc, watch};

/// Where a device's downstream messages go.
#[derive(Clone)]
pub enum Adapter {
    /// The local MQTT broker (the device subscribes to its topics).
    Mqtt,
    /// A serial port's bounded write queue.
    Serial(mpsc::Sender<DownMsg>),
}

/// Per device slot (index = `DeviceId`), everything read about it; replaced whole on a reload.
/// Retired slots keep their entries so indexes stay valid.
pub struct DeviceView {
    pub registry: Arc<Registry>,
    /// Where each slot's messages go (a slot not listed goes to the MQTT broker).
    pub adapters: Vec<Adapter>,
    pub sessions: Vec<watch::Receiver<SessionState>>,
    pub uplinks: Vec<Arc<UplinkStatus>>,
    /// `mqtt` or `serial <port>`.
    pub transports: Vec<String>,
}

impl DeviceView {
    /// Where slot `dev` 's messages go.
    pub fn adapter(&self, dev: DeviceId) -> &Adapter {
        self.adapters.get(dev.index()).unwrap_or(&Adapter::Mqtt)
    }
}

/// The current generation, swapped whole on a reload.
pub type SharedView = Arc<RwLock<Arc<DeviceView>>>;
