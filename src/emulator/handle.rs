//! The running [`Emulator`] (owns the listeners and the HTTP server task) and the cloneable
//! [`EmulatorHandle`] tests use to inspect and steer it. It must not contain wire-protocol code.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::shared::{bind_listener, Shared};
use super::state::{self, State};
use super::{
    http, CommandError, DeviceStatus, EmulatorConfig, Faults, KvError, RecordedEvent, Stats,
};

/// A running emulator. It stops when dropped or on [`Emulator::shutdown`].
pub struct Emulator {
    shared: Arc<Shared>,
    http_task: Option<JoinHandle<()>>,
}

impl fmt::Debug for Emulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Emulator")
            .field("http_addr", &self.shared.http_addr)
            .field("mqtt_addr", &self.shared.mqtt_addr)
            .finish()
    }
}

impl Emulator {
    /// Binds both listeners (port 0 allowed) and starts serving. Must be called inside a tokio
    /// runtime.
    pub async fn start(cfg: EmulatorConfig) -> anyhow::Result<Emulator> {
        cfg.seed.validate().context("invalid emulator seed")?;
        let http_listener = TcpListener::bind(cfg.http_listen)
            .await
            .with_context(|| format!("binding emulator HTTP on {}", cfg.http_listen))?;
        let http_addr = http_listener.local_addr()?;
        let mqtt_listener = bind_listener(cfg.mqtt_listen)
            .with_context(|| format!("binding emulator MQTT on {}", cfg.mqtt_listen))?;
        let mqtt_addr = mqtt_listener.local_addr()?;
        let (events_tx, _) = broadcast::channel(4096);
        let (event_seq, _) = watch::channel(0u64);
        let root = CancellationToken::new();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(
                &cfg.seed,
                cfg.behaviour,
                events_tx.clone(),
                event_seq.clone(),
            )),
            listener: Mutex::new(None),
            accept_token: Mutex::new(None),
            events_tx,
            event_seq,
            root: root.clone(),
            http_addr,
            mqtt_addr,
            rt: tokio::runtime::Handle::current(),
        });
        shared.install_listener(mqtt_listener);
        let app = http::router(Arc::clone(&shared));
        let token = root.clone();
        let http_task = tokio::spawn(async move {
            let serve = axum::serve(http_listener, app).with_graceful_shutdown(async move {
                token.cancelled().await;
            });
            if let Err(e) = serve.await {
                tracing::warn!("emulator HTTP server stopped: {e}");
            }
        });
        tracing::debug!(%http_addr, %mqtt_addr, "emulator started");
        Ok(Emulator {
            shared,
            http_task: Some(http_task),
        })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.shared.http_addr
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        self.shared.mqtt_addr
    }

    pub fn handle(&self) -> EmulatorHandle {
        EmulatorHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Stops listening, cuts every connection and waits (at most 5 s) for the HTTP server.
    pub async fn shutdown(mut self) {
        self.stop();
        if let Some(task) = self.http_task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }

    fn stop(&self) {
        self.shared.root.cancel();
        self.shared.close_listener();
        self.shared.lock().kill_all_connections(false);
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Cloneable handle to inspect and steer a running emulator.
#[derive(Clone)]
pub struct EmulatorHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for EmulatorHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmulatorHandle")
            .field("http_addr", &self.shared.http_addr)
            .field("mqtt_addr", &self.shared.mqtt_addr)
            .finish()
    }
}

impl EmulatorHandle {
    pub fn http_addr(&self) -> SocketAddr {
        self.shared.http_addr
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        self.shared.mqtt_addr
    }

    /// Recorded events of one device, in arrival order.
    pub fn events(&self, device_id: u64) -> Vec<RecordedEvent> {
        self.shared.lock().events(Some(device_id))
    }

    /// All recorded events, in arrival order.
    pub fn all_events(&self) -> Vec<RecordedEvent> {
        self.shared.lock().events(None)
    }

    /// Events of the device that were taken and dropped because its home was deactivated
    /// (what MODE does; `seq` is 0). Kept so tests can tell a drop by MODE from a loss.
    pub fn dropped_events(&self, device_id: u64) -> Vec<RecordedEvent> {
        self.shared.lock().dropped_events(device_id)
    }

    /// Forgets the recorded events (counters are kept).
    pub fn clear_events(&self) {
        self.shared.lock().clear_events();
    }

    /// Every event recorded from now on (capacity 4096; a slow receiver sees `Lagged`).
    pub fn subscribe_events(&self) -> broadcast::Receiver<RecordedEvent> {
        self.shared.events_tx.subscribe()
    }

    /// Waits until `device_id` has at least `n` recorded events, or `timeout`; returns the
    /// device's events at that moment (possibly fewer than `n`).
    pub async fn wait_for_events(
        &self,
        device_id: u64,
        n: usize,
        timeout: Duration,
    ) -> Vec<RecordedEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.shared.event_seq.subscribe();
        loop {
            let evs = self.events(device_id);
            if evs.len() >= n {
                return evs;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return self.events(device_id),
            }
        }
    }

    /// `true`: the MQTT listener is closed (new connections are refused by the OS), every MQTT
    /// session and command WebSocket is cut, and MODE API REST routes answer 503
    /// `SERVICE_UNAVAILABLE` (the `/_emulator/` control API keeps working). `false`: the
    /// listener is bound again on the same address.
    pub fn set_offline(&self, offline: bool) {
        self.shared.set_offline(offline);
    }

    pub fn is_offline(&self) -> bool {
        self.shared.lock().is_offline()
    }

    /// Cuts every MQTT session and command WebSocket (TCP close, no DISCONNECT/close frame).
    pub fn drop_sessions(&self) {
        self.shared.lock().kill_all_connections(true);
    }

    /// Cuts the MQTT sessions and command WebSockets of one device.
    pub fn drop_session(&self, device_id: u64) {
        self.shared.lock().kill_device_connections(device_id);
    }

    /// Activates or deactivates a home; returns false when the home is unknown.
    pub fn set_home_deactivated(&self, home_id: u64, deactivated: bool) -> bool {
        self.shared
            .lock()
            .set_home_deactivated(home_id, deactivated)
    }

    /// Whether the home is deactivated (false for unknown homes).
    pub fn home_deactivated(&self, home_id: u64) -> bool {
        self.shared.lock().home_deactivated(home_id)
    }

    /// Sends a command as an app would: `{"action":..,"parameters":..}` as a QoS 0 PUBLISH on
    /// `/devices/{id}/command` to every MQTT session subscribed to it and as a text frame to
    /// every command WebSocket. `parameters` must be an object, or null: then the command has
    /// no `parameters` (as MODE allows), or `{}` with `command_parameters_default`.
    pub fn send_command(
        &self,
        device_id: u64,
        action: &str,
        parameters: serde_json::Value,
    ) -> Result<(), CommandError> {
        let params = match &parameters {
            serde_json::Value::Null => {
                let add = self.shared.lock().behaviour.command_parameters_default;
                add.then(|| "{}".to_string())
            }
            serde_json::Value::Object(_) => Some(parameters.to_string()),
            _ => {
                return Err(CommandError::InvalidInput(
                    "parameters must be an object".into(),
                ))
            }
        };
        let payload = state::command_payload(action, params.as_deref())?;
        self.shared.lock().send_command(device_id, payload)
    }

    /// Sets a device kv item as an app would: bumps the device store's rev and pushes
    /// `{"action":"set",...}` to the device's kv subscribers. Returns the new rev. Refused for
    /// a device of a deactivated home, like the REST API.
    pub fn set_kv(
        &self,
        device_id: u64,
        key: &str,
        value: serde_json::Value,
    ) -> Result<u64, KvError> {
        self.shared.lock().kv_write(
            device_id,
            state::KvOp::Set(key.to_string(), value),
            None,
            false,
        )
    }

    /// Deletes a device kv item as an app would; returns the new rev.
    pub fn delete_kv(&self, device_id: u64, key: &str) -> Result<u64, KvError> {
        self.shared
            .lock()
            .kv_write(device_id, state::KvOp::Delete(key.to_string()), None, false)
    }

    /// The device's kv store: (rev, items sorted by key). Unknown device: (0, []).
    pub fn kv(&self, device_id: u64) -> (u64, Vec<(String, serde_json::Value)>) {
        self.shared.lock().kv_snapshot(device_id)
    }

    /// Whether the device has at least one MQTT session or command WebSocket.
    pub fn is_connected(&self, device_id: u64) -> bool {
        self.shared.lock().connection_count(device_id) > 0
    }

    /// Number of current connections (MQTT + WebSocket) of the device.
    pub fn session_count(&self, device_id: u64) -> usize {
        self.shared.lock().connection_count(device_id)
    }

    /// Successful connections (MQTT CONNACK 0 and WebSocket upgrades) since start.
    pub fn connect_count(&self, device_id: u64) -> u64 {
        self.shared.lock().connect_count(device_id)
    }

    /// Connection summary of every device.
    pub fn devices(&self) -> Vec<DeviceStatus> {
        self.shared.lock().device_statuses()
    }

    /// Replaces the injected faults (takes effect at once).
    pub fn set_faults(&self, faults: Faults) {
        self.shared.lock().faults = faults;
    }

    pub fn faults(&self) -> Faults {
        self.shared.lock().faults.clone()
    }

    /// Changes the per-device rate limit at run time (`None` = off).
    pub fn set_rate_limit(&self, per_minute: Option<u32>) {
        self.shared.lock().set_rate_limit(per_minute);
    }

    pub fn stats(&self) -> Stats {
        self.shared.lock().stats.clone()
    }
}
