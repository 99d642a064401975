//! The configuration's model: the structs serde fills from the TOML file, their defaults and small
//! derived values. It must not validate (see `validate`) or read files.

use super::Secret;
use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub hub: HubConfig,
    #[serde(default)]
    pub local: LocalConfig,
    #[serde(default)]
    pub cloud: CloudConfig,
    #[serde(default)]
    pub ops: OpsConfig,
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceConfig>,
    #[serde(default, rename = "serial")]
    pub serial: Vec<SerialConfig>,
}

/// Parity of a serial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    #[default]
    None,
    Odd,
    Even,
}

/// Flow control of a serial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FlowControl {
    #[default]
    None,
    Software,
    Hardware,
}

/// How the hub writes commands and DDP changes to a serial port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LineFormat {
    #[default]
    Json,
    Compact,
}

/// One serial port carrying one or more devices (`[[serial]]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// Device path; stable `/dev/serial/by-id/...` paths recommended.
    pub port: PathBuf,
    #[serde(default = "default_baud")]
    pub baud: u32,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    #[serde(default)]
    pub flow_control: FlowControl,
    /// Names of `[[device]]`s that may speak on this port.
    pub devices: Vec<String>,
    /// Longest accepted line, bytes (without the newline).
    #[serde(default = "default_max_line")]
    pub max_line_bytes: usize,
    /// Refuse lines without a valid `*XX` checksum.
    #[serde(default)]
    pub require_checksum: bool,
    /// Form of the lines the hub writes down.
    #[serde(default)]
    pub downlink_format: LineFormat,
    /// Lines waiting to be written before new ones are dropped (a sensor that stopped reading).
    #[serde(default = "default_write_queue")]
    pub write_queue: usize,
}

fn default_baud() -> u32 {
    115_200
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_max_line() -> usize {
    1024
}
fn default_write_queue() -> usize {
    64
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// Where `hub.db` lives.
    pub data_dir: PathBuf,
    /// Largest accepted event or kv payload, in bytes.
    pub max_payload_bytes: usize,
    /// `RUST_LOG`-style log filter, used when `RUST_LOG` is not set.
    pub log: String,
    /// Take the system clock as correct even when the kernel does not say it is synchronised
    /// (a board with a battery-backed RTC, a container whose host keeps time). Default false:
    /// capture times wait for synchronisation and are repaired then.
    pub trust_clock: bool,
    /// Commands waiting for a device that is away, per device (oldest dropped first).
    pub max_pending_commands: usize,
    /// A waiting command older than this is dropped, never delivered late.
    pub command_ttl_secs: u64,
    /// Longest accepted DDP key.
    pub kv_max_key_len: usize,
    /// Outbox bound in bytes of payload; when full the oldest *events* are dropped.
    pub max_outbox_bytes: u64,
    /// Outbox bound in rows.
    pub max_outbox_rows: u64,
    /// Stop accepting new events when the data directory's file system has less free space.
    pub min_free_disk: u64,
    /// `"normal"`: a crash loses nothing acknowledged (SQLite WAL, synchronous=NORMAL); a power
    /// cut may lose what the WAL sync (64 rows or 5 s) had not reached yet;
    /// `"full"`: also survives power cuts (an fsync per group commit).
    pub durability: Durability,
    /// At low arrival rates (home rates: a few events a second) the outbox holds a group
    /// commit open this long for more events, and a local PUBACK waits with it: SD-card bytes
    /// per event fall ~10x (docs/BENCHMARKS.md). Under load the window is 1.5 ms at most (2 ms from the
    /// previous commit at a steady 600 events/s or more), and a device that waits for each
    /// PUBACK before sending again is not held. 0: commit at once.
    pub commit_window_ms: u64,
}

/// How hard the outbox works to survive power loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    #[default]
    Normal,
    Full,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            data_dir: PathBuf::from("/var/lib/modehub"),
            max_payload_bytes: 64 * 1024,
            log: "info".into(),
            trust_clock: false,
            max_pending_commands: 100,
            command_ttl_secs: 600,
            kv_max_key_len: 128,
            max_outbox_bytes: 256 * 1024 * 1024,
            max_outbox_rows: 2_000_000,
            min_free_disk: 64 * 1024 * 1024,
            durability: Durability::Normal,
            commit_window_ms: 2000,
        }
    }
}

/// Health, metrics and status endpoint (`[ops]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpsConfig {
    /// Local HTTP endpoint for /healthz and /metrics; "off" disables it.
    pub listen: String,
    /// /healthz turns 503 when a backlog exists, sessions are up, and MODE has acknowledged
    /// nothing for this long ("connected but not draining").
    pub stall_after_secs: u64,
    /// A file (mode 0600) holding the password that clients not on this machine must send
    /// (HTTP Basic, any user name); required when `listen` is not a loopback address.
    pub password_file: Option<PathBuf>,
    /// The password read from `password_file` by `Config::load` (never printed).
    #[serde(skip)]
    pub password: Option<Secret>,
}

impl Default for OpsConfig {
    fn default() -> Self {
        OpsConfig {
            listen: "127.0.0.1:9464".into(),
            stall_after_secs: 300,
            password_file: None,
            password: None,
        }
    }
}

impl OpsConfig {
    /// The endpoint address, or `None` when switched off.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        if self.listen == "off" {
            None
        } else {
            self.listen.parse().ok()
        }
    }
}

/// How the hub talks to MODE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Device MQTT (one session per device).
    #[default]
    Mqtt,
    /// HTTPS only: REST for events and kv, a WebSocket for commands.
    Rest,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    pub mqtt: LocalMqttConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalMqttConfig {
    /// The port sensors connect to (our authenticating front).
    pub listen: SocketAddr,
    /// Most local MQTT clients at once.
    pub max_connections: usize,
    /// TLS on the local port (both or neither; PEM; convention: listen on 8883). Relative paths
    /// are resolved against the config file's directory when the config is loaded.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

impl Default for LocalMqttConfig {
    fn default() -> Self {
        LocalMqttConfig {
            listen: "127.0.0.1:1883".parse().expect("static address"),
            max_connections: 256,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloudConfig {
    pub api_url: String,
    pub mqtt_url: String,
    pub project_key_file: Option<PathBuf>,
    pub transport: Transport,
    /// How often the home watcher reads each home's state (needs project_key_file).
    pub home_poll_interval_secs: u64,
    /// Pace per device (MODE allows about 600 a minute).
    pub max_messages_per_minute: u32,
    /// Pace for the whole hub (MODE allows a project about 6,000 a minute).
    pub max_project_messages_per_minute: u32,
    /// Unacknowledged QoS 1 publishes per device session.
    pub max_inflight: usize,
    /// MQTT keepalive towards MODE, seconds. A PINGREQ goes only when nothing was sent or
    /// nothing was heard for this long (a device that publishes more often never pings); no
    /// PINGRESP within it ends the session, so a dead link is found within two keepalives.
    pub keepalive_secs: u64,
    /// Largest MQTT packet taken from MODE (a kv reload carries the whole store in one).
    pub max_downlink_packet_bytes: usize,
    /// Field added to every event's `eventData` with the per-device sequence number ("" = off).
    pub seq_field: String,
    /// Field added to every event's `eventData` with the capture time ("" = off).
    pub captured_at_field: String,
    /// The project API key read from `project_key_file` by `Config::load` (never printed).
    #[serde(skip)]
    pub project_key: Option<Secret>,
}

impl Default for CloudConfig {
    fn default() -> Self {
        CloudConfig {
            api_url: "https://api.tinkermode.com".into(),
            mqtt_url: "mqtts://mqtt.tinkermode.com:8883".into(),
            project_key_file: None,
            transport: Transport::Mqtt,
            home_poll_interval_secs: 60,
            max_messages_per_minute: 540,
            max_project_messages_per_minute: 5400,
            max_inflight: 32,
            keepalive_secs: 30,
            max_downlink_packet_bytes: 16 * 1024 * 1024,
            seq_field: "_seq".into(),
            captured_at_field: "_capturedAt".into(),
            project_key: None,
        }
    }
}

impl CloudConfig {
    /// The MQTT endpoint, already validated by `Config::load`.
    pub fn mqtt_endpoint(&self) -> Result<MqttEndpoint, String> {
        MqttEndpoint::parse(&self.mqtt_url)
    }
    pub fn keepalive(&self) -> Duration {
        Duration::from_secs(self.keepalive_secs)
    }
}

/// Where MODE's device MQTT endpoint is: `mqtt://`, `mqtts://`, or MQTT over WebSocket
/// (`ws://`, `wss://`, e.g. `wss://mqtt.tinkermode.com:443` for HTTPS-only networks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttEndpoint {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// `Some(path)` for MQTT over WebSocket (`ws://`, `wss://`).
    pub ws_path: Option<String>,
}

impl MqttEndpoint {
    pub fn parse(s: &str) -> Result<Self, String> {
        let url = url::Url::parse(s).map_err(|e| format!("`{s}` is not a URL ({e})"))?;
        let (tls, ws) = match url.scheme() {
            "mqtts" | "ssl" => (true, false),
            "mqtt" | "tcp" => (false, false),
            "wss" => (true, true),
            "ws" => (false, true),
            other => {
                return Err(format!(
                    "scheme `{other}` is not mqtt://, mqtts://, ws:// or wss://"
                ))
            }
        };
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("`{s}` has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = match (ws, tls) {
            (true, _) => url
                .port_or_known_default()
                .unwrap_or(if tls { 443 } else { 80 }),
            (false, true) => url.port().unwrap_or(8883),
            (false, false) => url.port().unwrap_or(1883),
        };
        let ws_path = ws.then(|| url.path().to_string());
        Ok(MqttEndpoint {
            host,
            port,
            tls,
            ws_path,
        })
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub name: String,
    pub mode_id: crate::local::ModeId,
    #[serde(default)]
    pub home_id: Option<u64>,
    #[serde(default)]
    pub api_key: Option<Secret>,
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    #[serde(default)]
    pub local_password: Option<Secret>,
}

impl fmt::Debug for DeviceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceConfig")
            .field("name", &self.name)
            .field("mode_id", &self.mode_id)
            .field("home_id", &self.home_id)
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .field("api_key_file", &self.api_key_file)
            .field(
                "local_password",
                &self.local_password.as_ref().map(|_| "***"),
            )
            .finish()
    }
}

impl DeviceConfig {
    /// The device API key; present after `Config::load` (read from `api_key_file` if needed).
    pub fn key(&self) -> &Secret {
        self.api_key
            .as_ref()
            .expect("Config::load resolves api_key_file into api_key")
    }
}
