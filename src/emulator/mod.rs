//! MODE cloud emulator: a stand-in for MODE's device-facing cloud (REST, command WebSocket and
//! device MQTT) used by tests, benchmarks and `modehub demo`/`modehub emulator`. This file holds
//! the public surface: the seed (projects, homes, devices, keys), the configuration and the
//! [`Behaviour`] choices made where MODE's real behaviour is unconfirmed, run-time [`Faults`],
//! the [`Emulator`] that owns the listeners, the cloneable [`EmulatorHandle`] used to inspect
//! and steer it, and the CLI entry [`run_cli`]. It must not contain wire-protocol code (that is
//! in `mqtt.rs` and `http.rs`) and it must never be used by the hub's production code paths:
//! it is a test tool that trusts its seed, keeps everything in memory and never logs API keys.

mod http;
mod mqtt;
mod state;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use state::State;

// ------------------------------------------------------------------------------------------
// Seed
// ------------------------------------------------------------------------------------------

/// Initial content of the emulated MODE project. Load it with [`Seed::from_file`] (`.toml` or
/// `.json`) or build it in code. See `docs/emulator.md` for the file format.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seed {
    /// MODE project ID reported in `GET /auth`, device and home objects. Default 1.
    #[serde(default = "default_project_id")]
    pub project_id: u64,
    /// Homes (`[[home]]`).
    #[serde(default, alias = "homes")]
    pub home: Vec<SeedHome>,
    /// Devices (`[[device]]`).
    #[serde(default, alias = "devices")]
    pub device: Vec<SeedDevice>,
    /// Project API keys (`[[project_key]]`).
    #[serde(default, alias = "project_keys")]
    pub project_key: Vec<SeedProjectKey>,
    /// User session keys (`[[user]]`).
    #[serde(default, alias = "users")]
    pub user: Vec<SeedUser>,
}

fn default_project_id() -> u64 {
    1
}

impl Default for Seed {
    fn default() -> Self {
        Seed {
            project_id: 1,
            home: Vec::new(),
            device: Vec::new(),
            project_key: Vec::new(),
            user: Vec::new(),
        }
    }
}

/// A home of the project.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedHome {
    pub id: u64,
    #[serde(default)]
    pub name: String,
    /// Starts deactivated. Default false.
    #[serde(default)]
    pub deactivated: bool,
}

/// A device instance with its API key.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedDevice {
    pub id: u64,
    pub api_key: String,
    /// The home the device belongs to, if any.
    #[serde(default)]
    pub home_id: Option<u64>,
    /// Default `device-{id}`.
    #[serde(default)]
    pub name: Option<String>,
    /// Free text, default "".
    #[serde(default)]
    pub tag: Option<String>,
    /// Default "generic".
    #[serde(default)]
    pub device_class: Option<String>,
    /// Initial device key-value store (each item bumps the store's rev by one).
    #[serde(default)]
    pub kv: BTreeMap<String, serde_json::Value>,
}

impl fmt::Debug for SeedDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeedDevice")
            .field("id", &self.id)
            .field("api_key", &"<redacted>")
            .field("home_id", &self.home_id)
            .field("name", &self.name)
            .field("tag", &self.tag)
            .field("device_class", &self.device_class)
            .field("kv_items", &self.kv.len())
            .finish()
    }
}

/// Permission of a project API key beyond reading (which every project key has).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    /// Read only; every project key has it, listing it changes nothing.
    Read,
    /// Admin tasks: may `PATCH /homes/{id}` (name and `deactivated`).
    Admin,
    /// May send commands (`PUT /devices/{id}/command`).
    Commands,
    /// May write device key-value stores.
    KvWrite,
}

/// A project API key.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedProjectKey {
    pub key: String,
    #[serde(default)]
    pub permissions: Vec<Permission>,
}

impl fmt::Debug for SeedProjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeedProjectKey")
            .field("key", &"<redacted>")
            .field("permissions", &self.permissions)
            .finish()
    }
}

/// A user session key, member of some homes.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedUser {
    pub key: String,
    /// User ID reported by `GET /auth`; default: position in the list, starting at 1.
    #[serde(default)]
    pub id: Option<u64>,
    #[serde(default)]
    pub home_ids: Vec<u64>,
}

impl fmt::Debug for SeedUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeedUser")
            .field("key", &"<redacted>")
            .field("id", &self.id)
            .field("home_ids", &self.home_ids)
            .finish()
    }
}

impl Seed {
    /// Reads a seed file; the format follows the extension (`.toml` or `.json`).
    pub fn from_file(path: impl AsRef<Path>) -> anyhow::Result<Seed> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading seed file {}", path.display()))?;
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        let seed: Seed = match ext.as_deref() {
            Some("toml") => toml::from_str(&text)
                .with_context(|| format!("parsing TOML seed {}", path.display()))?,
            Some("json") => serde_json::from_str(&text)
                .with_context(|| format!("parsing JSON seed {}", path.display()))?,
            _ => anyhow::bail!("seed file {} must end in .toml or .json", path.display()),
        };
        seed.validate()
            .with_context(|| format!("invalid seed {}", path.display()))?;
        Ok(seed)
    }

    /// Checks references and uniqueness (IDs, keys, kv key names).
    pub fn validate(&self) -> anyhow::Result<()> {
        let mut homes = std::collections::HashSet::new();
        for h in &self.home {
            anyhow::ensure!(homes.insert(h.id), "home {} is listed twice", h.id);
        }
        let mut keys = std::collections::HashSet::new();
        let mut devices = std::collections::HashSet::new();
        for d in &self.device {
            anyhow::ensure!(devices.insert(d.id), "device {} is listed twice", d.id);
            anyhow::ensure!(
                !d.api_key.is_empty(),
                "device {} has an empty api_key",
                d.id
            );
            anyhow::ensure!(
                keys.insert(d.api_key.as_str()),
                "device {}: its api_key is used more than once",
                d.id
            );
            if let Some(h) = d.home_id {
                anyhow::ensure!(homes.contains(&h), "device {}: unknown home_id {h}", d.id);
            }
            for k in d.kv.keys() {
                anyhow::ensure!(
                    state::valid_kv_key(k),
                    "device {}: invalid kv key {k:?}",
                    d.id
                );
            }
        }
        for (i, p) in self.project_key.iter().enumerate() {
            anyhow::ensure!(!p.key.is_empty(), "project_key #{} is empty", i + 1);
            anyhow::ensure!(
                keys.insert(p.key.as_str()),
                "project_key #{}: key is used more than once",
                i + 1
            );
        }
        for (i, u) in self.user.iter().enumerate() {
            anyhow::ensure!(!u.key.is_empty(), "user #{}: key is empty", i + 1);
            anyhow::ensure!(
                keys.insert(u.key.as_str()),
                "user #{}: key is used more than once",
                i + 1
            );
            for h in &u.home_ids {
                anyhow::ensure!(homes.contains(h), "user #{}: unknown home {h}", i + 1);
            }
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------
// Configuration, behaviour, faults
// ------------------------------------------------------------------------------------------

/// Choices where MODE's behaviour is unconfirmed, plus limits. Every default is documented on
/// its field and in `docs/emulator.md`.
#[derive(Clone, Debug)]
pub struct Behaviour {
    /// Per-device sliding one-minute limit on data messages (events and kv writes made with the
    /// device's own key, MQTT and REST together). `None` (default) = no limit. MODE documents
    /// 600/min. Over the limit: MQTT session closed (TCP), REST 429 `RATE_LIMIT_EXCEEDED`.
    pub rate_limit_per_minute: Option<u32>,
    /// At most this many simultaneous connections (MQTT sessions + command WebSockets) per
    /// device. Default 5 (MODE's documented limit). The next MQTT CONNECT gets CONNACK
    /// `ServiceUnavailable` (3); the next WebSocket 503 `TOO_MANY_CONNECTIONS`.
    pub max_connections_per_device: usize,
    /// Whether a device's own MQTT kv write is echoed back (as `set`/`delete` with the new rev)
    /// on the very session that published it. Default true. Other sessions of the device and
    /// writes from REST are always pushed.
    pub kv_echo_to_self: bool,
    /// `reason` of the 403 answered to kv writes for a device whose home is deactivated.
    /// Default `HOME_DEACTIVATED`.
    pub deactivated_kv_reason: String,
    /// `reason` of the 403 answered to commands for a device whose home is deactivated.
    /// Default `HOME_DEACTIVATED`.
    pub deactivated_command_reason: String,
    /// HTTP status of `PUT /devices/{id}/command` when the device has no connection (reason
    /// `DEVICE_OFFLINE`). Default 409.
    pub device_offline_status: u16,
    /// Whether a device key may `GET /homes/{its home}`. Default false (403).
    pub device_key_can_read_home: bool,
    /// Largest MQTT packet (remaining length) accepted; bigger ones close the session.
    /// Default 1 MiB.
    pub max_packet_size: usize,
    /// Largest REST body accepted; bigger ones get 413 `PAYLOAD_TOO_LARGE`. Default 1 MiB.
    pub max_body_size: usize,
    /// Outgoing queue per connection; a connection whose queue overflows is dropped, like a
    /// real server would. Default 1024.
    pub session_queue: usize,
    /// Recorded events kept in memory; the oldest are evicted (counted). Default 1,000,000.
    pub max_recorded_events: usize,
    /// Time allowed between TCP accept and the MQTT CONNECT. Default 10 s.
    pub connect_timeout: Duration,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            rate_limit_per_minute: None,
            max_connections_per_device: 5,
            kv_echo_to_self: true,
            deactivated_kv_reason: "HOME_DEACTIVATED".to_string(),
            deactivated_command_reason: "HOME_DEACTIVATED".to_string(),
            device_offline_status: 409,
            device_key_can_read_home: false,
            max_packet_size: 1024 * 1024,
            max_body_size: 1024 * 1024,
            session_queue: 1024,
            max_recorded_events: 1_000_000,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Faults injected at run time ([`EmulatorHandle::set_faults`], `POST /_emulator/faults`).
/// All off by default. JSON form: the field names below; `delay` is milliseconds (number) or a
/// humantime string such as `"250ms"`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// New MQTT TCP connections are accepted and closed at once, before any CONNACK.
    pub refuse_connections: bool,
    /// Every MQTT CONNECT that would succeed is answered with this CONNACK return code (1..=5)
    /// instead, and the connection closed.
    pub connack_code: Option<u8>,
    /// Added latency: before answering each REST request (MODE API routes), and before
    /// handling each MQTT CONNECT, PUBLISH and SUBSCRIBE (so acks come late).
    #[serde(with = "duration_opt")]
    pub delay: Option<Duration>,
    /// MODE API routes answer 503 `{"reason":"SERVICE_UNAVAILABLE"}`.
    pub http_5xx: bool,
    /// MODE API routes answer 429 `{"reason":"RATE_LIMIT_EXCEEDED"}` with this `Retry-After`.
    pub http_429_retry_after: Option<u32>,
    /// Each MQTT session is cut (TCP close, no DISCONNECT) right after it sends its Nth
    /// PUBLISH: that publish is processed (recorded) but its PUBACK is never sent, as if the
    /// ack were lost. `Some(0)` is treated as off.
    pub drop_after_publishes: Option<u32>,
    /// Commands are accepted (204 / Ok) but not delivered to any connection.
    pub drop_commands: bool,
}

mod duration_opt {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Millis(u64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<Repr>::deserialize(d)? {
            None => Ok(None),
            Some(Repr::Millis(ms)) => Ok(Some(Duration::from_millis(ms))),
            Some(Repr::Text(t)) => humantime::parse_duration(&t)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// How the emulator is started.
#[derive(Clone, Debug)]
pub struct EmulatorConfig {
    /// REST + WebSocket + `/_emulator/` control API. Port 0 picks a free port.
    pub http_listen: SocketAddr,
    /// Device MQTT endpoint (plain TCP, MQTT 3.1.1). Port 0 picks a free port; it is kept
    /// when the emulator goes offline and back online.
    pub mqtt_listen: SocketAddr,
    pub seed: Seed,
    pub behaviour: Behaviour,
}

impl EmulatorConfig {
    /// Both listeners on 127.0.0.1 with free ports, default behaviour.
    pub fn local(seed: Seed) -> Self {
        EmulatorConfig {
            http_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            mqtt_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            seed,
            behaviour: Behaviour::default(),
        }
    }
}

// ------------------------------------------------------------------------------------------
// Public records
// ------------------------------------------------------------------------------------------

/// How an event or request reached the emulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Mqtt,
    Rest,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Mqtt => "mqtt",
            Transport::Rest => "rest",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for Transport {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Transport {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// An event accepted by the emulator, as MODE would store it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordedEvent {
    /// Arrival order over the whole emulator, starting at 1.
    pub seq: u64,
    pub device_id: u64,
    /// The device's home at arrival.
    pub home_id: Option<u64>,
    pub event_type: String,
    /// Always a JSON object (`{}` when the payload had no `eventData`).
    pub event_data: serde_json::Value,
    /// The exact payload received (MQTT payload or REST body).
    pub raw: String,
    /// Arrival time, RFC 3339 UTC with nanoseconds, as MODE stamps events.
    pub timestamp: String,
    pub transport: Transport,
}

/// Counters since start.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Stats {
    /// Events recorded.
    pub events_accepted: u64,
    /// Event payloads that were not `{"eventType": string, "eventData"?: object}`.
    pub events_rejected_invalid: u64,
    /// Events acknowledged but dropped because the device's home is deactivated.
    pub events_dropped_deactivated: u64,
    /// Recorded events evicted because of `max_recorded_events`.
    pub events_evicted: u64,
    /// Device kv writes applied (all origins).
    pub kv_writes_applied: u64,
    /// Device kv writes with a bad payload or key.
    pub kv_writes_rejected_invalid: u64,
    /// Device kv writes refused because the home is deactivated (MQTT: acked and dropped).
    pub kv_writes_refused_deactivated: u64,
    /// Commands accepted for a connected device.
    pub commands_accepted: u64,
    /// Command copies handed to connections (MQTT subscribers and WebSockets).
    pub command_deliveries: u64,
    pub commands_refused_offline: u64,
    pub commands_refused_deactivated: u64,
    pub mqtt_connects_accepted: u64,
    /// CONNECTs answered with a non-zero CONNACK code.
    pub mqtt_connects_refused: u64,
    /// TCP connections closed at once by the `refuse_connections` fault.
    pub mqtt_connections_refused_fault: u64,
    pub mqtt_sessions_dropped_rate_limit: u64,
    /// Sessions closed for using another device's or an unknown topic.
    pub mqtt_sessions_dropped_acl: u64,
    pub mqtt_sessions_dropped_keepalive: u64,
    /// Sessions closed for malformed or unsupported packets (including QoS 2, oversize).
    pub mqtt_sessions_dropped_protocol: u64,
    /// Sessions cut by the `drop_after_publishes` fault.
    pub mqtt_sessions_dropped_fault: u64,
    /// Connections dropped because their outgoing queue overflowed.
    pub sessions_dropped_overflow: u64,
    /// Connections cut by `drop_session(s)` or going offline.
    pub sessions_dropped_control: u64,
    pub ws_connects_accepted: u64,
    /// REST requests on MODE API routes.
    pub rest_requests: u64,
    /// REST requests answered 429 by the per-device rate limit.
    pub rest_rate_limited: u64,
    /// REST requests answered by an injected fault (503/429) or while offline.
    pub rest_faults_injected: u64,
}

/// Why a command was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("unknown device {0}")]
    UnknownDevice(u64),
    #[error("device {0} has no connection (DEVICE_OFFLINE)")]
    DeviceOffline(u64),
    #[error("home of device {0} is deactivated")]
    HomeDeactivated(u64),
    #[error("invalid command: {0}")]
    InvalidInput(String),
}

impl CommandError {
    /// The `reason` string the REST API answers (the deactivated one is configurable there).
    pub fn reason(&self) -> &'static str {
        match self {
            CommandError::UnknownDevice(_) => "NOT_FOUND",
            CommandError::DeviceOffline(_) => "DEVICE_OFFLINE",
            CommandError::HomeDeactivated(_) => "HOME_DEACTIVATED",
            CommandError::InvalidInput(_) => "INVALID_INPUT",
        }
    }
}

/// Why a kv write was not applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("unknown device {0}")]
    UnknownDevice(u64),
    #[error("invalid key {0:?}")]
    InvalidKey(String),
    #[error("invalid value: {0}")]
    InvalidValue(String),
    #[error("key {0:?} not found")]
    KeyNotFound(String),
    #[error("home of the device is deactivated")]
    HomeDeactivated,
    #[error("rate limit exceeded, retry after {0} s")]
    RateLimited(u32),
}

/// Connection summary of one device (`GET /_emulator/devices`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatus {
    pub id: u64,
    pub home_id: Option<u64>,
    pub connected: bool,
    pub mqtt_sessions: usize,
    pub websockets: usize,
    pub connect_count: u64,
    pub kv_rev: u64,
}

// ------------------------------------------------------------------------------------------
// Shared core
// ------------------------------------------------------------------------------------------

/// What the listeners, the HTTP handlers and the handle share.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// The MQTT listener; taken (dropped at once) when going offline.
    listener: Mutex<Option<TcpListener>>,
    /// Token of the current accept loop.
    accept_token: Mutex<Option<CancellationToken>>,
    events_tx: broadcast::Sender<RecordedEvent>,
    event_seq: watch::Sender<u64>,
    root: CancellationToken,
    http_addr: SocketAddr,
    mqtt_addr: SocketAddr,
    rt: tokio::runtime::Handle,
}

impl Shared {
    /// Locks the state; a poisoned lock (a panic elsewhere) is recovered, the state being a
    /// plain in-memory model.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn root(&self) -> &CancellationToken {
        &self.root
    }

    pub(crate) fn poll_accept(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<Option<(TcpStream, SocketAddr)>>> {
        let guard = self.listener.lock().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            Some(l) => l.poll_accept(cx).map(|r| r.map(Some)),
            None => Poll::Ready(Ok(None)),
        }
    }

    fn install_listener(self: &Arc<Self>, listener: TcpListener) {
        *self.listener.lock().unwrap_or_else(|e| e.into_inner()) = Some(listener);
        let token = self.root.child_token();
        if let Some(old) = self
            .accept_token
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(token.clone())
        {
            old.cancel();
        }
        let shared = Arc::clone(self);
        self.rt.spawn(mqtt::accept_loop(shared, token));
    }

    fn close_listener(&self) {
        // Dropping the TcpListener here closes the socket synchronously: connection refused.
        drop(
            self.listener
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        if let Some(t) = self
            .accept_token
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            t.cancel();
        }
    }

    fn listener_open(&self) -> bool {
        self.listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Goes offline or back online; see [`EmulatorHandle::set_offline`].
    pub(crate) fn set_offline(self: &Arc<Self>, offline: bool) {
        if offline {
            self.lock().set_offline(true);
            self.close_listener();
            tracing::info!("emulator: offline (MQTT listener closed, sessions dropped)");
            return;
        }
        if self.listener_open() {
            self.lock().set_offline(false);
            return;
        }
        let addr = self.mqtt_addr;
        let bound = {
            let _guard = self.rt.enter();
            bind_listener(addr)
        };
        match bound {
            Ok(l) => self.install_listener(l),
            Err(e) => {
                tracing::warn!("emulator: rebinding MQTT {addr} failed ({e}); retrying");
                let shared = Arc::clone(self);
                self.rt.spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        if shared.root.is_cancelled() || shared.lock().is_offline() {
                            return;
                        }
                        if let Ok(l) = bind_listener(addr) {
                            shared.install_listener(l);
                            return;
                        }
                    }
                });
            }
        }
        self.lock().set_offline(false);
        tracing::info!("emulator: online again (MQTT on {addr})");
    }
}

fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

// ------------------------------------------------------------------------------------------
// Emulator and handle
// ------------------------------------------------------------------------------------------

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
    /// every command WebSocket. `parameters` must be an object or null (sent as `{}`).
    pub fn send_command(
        &self,
        device_id: u64,
        action: &str,
        parameters: serde_json::Value,
    ) -> Result<(), CommandError> {
        let params = match &parameters {
            serde_json::Value::Null => "{}".to_string(),
            serde_json::Value::Object(_) => parameters.to_string(),
            _ => {
                return Err(CommandError::InvalidInput(
                    "parameters must be an object".into(),
                ))
            }
        };
        let payload = state::command_payload(action, &params)?;
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

// ------------------------------------------------------------------------------------------
// CLI
// ------------------------------------------------------------------------------------------

/// `modehub emulator` arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct EmulatorArgs {
    /// Seed file (.toml or .json) with homes, devices and keys.
    #[arg(long, value_name = "FILE")]
    pub seed: PathBuf,
    /// REST / WebSocket / control API listen address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// Device MQTT listen address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:1884")]
    pub mqtt: SocketAddr,
    /// Per-device data messages per minute (MODE documents 600); off when absent.
    #[arg(long, value_name = "N")]
    pub rate_limit: Option<u32>,
}

/// Runs the emulator until Ctrl-C, logging each arriving event.
pub async fn run_cli(args: EmulatorArgs) -> anyhow::Result<()> {
    let seed = Seed::from_file(&args.seed)?;
    let (homes, devices) = (seed.home.len(), seed.device.len());
    let cfg = EmulatorConfig {
        http_listen: args.http,
        mqtt_listen: args.mqtt,
        seed,
        behaviour: Behaviour {
            rate_limit_per_minute: args.rate_limit,
            ..Behaviour::default()
        },
    };
    let emu = Emulator::start(cfg).await?;
    println!(
        "MODE emulator: REST/WebSocket on http://{}, device MQTT on {} ({} homes, {} devices); \
         control API under http://{}/_emulator/",
        emu.http_addr(),
        emu.mqtt_addr(),
        homes,
        devices,
        emu.http_addr()
    );
    let mut rx = emu.handle().subscribe_events();
    let logger = tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(ev) => tracing::info!(
                    device = ev.device_id,
                    home = ?ev.home_id,
                    transport = %ev.transport,
                    event_type = %ev.event_type,
                    data = %ev.event_data,
                    "event"
                ),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!("event log lagged, {n} events not logged")
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    println!("MODE emulator: shutting down");
    logger.abort();
    emu.shutdown().await;
    Ok(())
}
