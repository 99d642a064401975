//! The TOML configuration: its model, defaults, and validation.
//!
//! `Config::load` reads a file, rejects unknown keys with a "did you mean" hint, checks every
//! value it can check without touching the network (ids, names, URLs, key files and their
//! permissions), and returns either a ready-to-use `Config` or *every* problem found, each with
//! its location and a fix. Secrets are wrapped in [`Secret`], whose `Debug`/`Display` never show
//! the value. This module must not start anything or keep state: it only describes the hub.

use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A secret string (API key, password). Never printed.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself: call only where it is sent or compared, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Constant-time comparison, so a local client cannot guess a password byte by byte.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        let a = self.0.as_bytes();
        if a.len() != candidate.len() {
            return false;
        }
        a.iter()
            .zip(candidate)
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

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

#[derive(Debug, Clone, Deserialize)]
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
    /// `"normal"`: a crash loses nothing acknowledged (SQLite WAL, synchronous=NORMAL);
    /// `"full"`: also survives power cuts (an fsync per group commit).
    pub durability: Durability,
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
        }
    }
}

/// Health, metrics and status endpoint (`[ops]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpsConfig {
    /// Local HTTP endpoint for /healthz and /metrics; "off" disables it.
    pub listen: String,
    /// /healthz turns 503 when a backlog exists, sessions are up, and MODE has acknowledged
    /// nothing for this long ("connected but not draining").
    pub stall_after_secs: u64,
}

impl Default for OpsConfig {
    fn default() -> Self {
        OpsConfig {
            listen: "127.0.0.1:9464".into(),
            stall_after_secs: 300,
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

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    pub mqtt: LocalMqttConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalMqttConfig {
    /// The port sensors connect to (our authenticating front).
    pub listen: SocketAddr,
    /// Most local MQTT clients at once.
    pub max_connections: usize,
}

impl Default for LocalMqttConfig {
    fn default() -> Self {
        LocalMqttConfig {
            listen: "127.0.0.1:1883".parse().expect("static address"),
            max_connections: 256,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
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
    /// MQTT keepalive towards MODE, seconds.
    pub keepalive_secs: u64,
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

/// Where MODE's device MQTT endpoint is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttEndpoint {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl MqttEndpoint {
    pub fn parse(s: &str) -> Result<Self, String> {
        let url = url::Url::parse(s).map_err(|e| format!("`{s}` is not a URL ({e})"))?;
        let tls = match url.scheme() {
            "mqtts" | "ssl" => true,
            "mqtt" | "tcp" => false,
            other => return Err(format!("scheme `{other}` is not mqtt:// or mqtts://")),
        };
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("`{s}` has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
        Ok(MqttEndpoint { host, port, tls })
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub name: String,
    pub mode_id: u64,
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

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path, e.g. `device[2].mode_id` (empty for the whole file).
    pub key: String,
    /// 1-based line in the file, when it could be found.
    pub line: Option<usize>,
    pub what: String,
    pub fix: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}. Check the path given with --config.")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", render_problems(.path, .problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn render_problems(path: &Path, problems: &[Problem]) -> String {
    let mut out = format!(
        "{} has {} problem{}:",
        path.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        out.push_str("\n  ");
        out.push_str(&path.display().to_string());
        if let Some(line) = p.line {
            out.push_str(&format!(":{line}"));
        }
        if !p.key.is_empty() {
            out.push_str(&format!(": {}", p.key));
        }
        out.push_str(&format!(": {}\n      fix: {}", p.what, p.fix));
    }
    out
}

/// The keys each table may hold; used for unknown-key errors with a "did you mean" hint.
const SCHEMA: &[(&str, &[&str])] = &[
    ("", &["hub", "local", "cloud", "ops", "device", "serial"]),
    ("ops", &["listen", "stall_after_secs"]),
    (
        "serial",
        &[
            "port",
            "baud",
            "data_bits",
            "parity",
            "stop_bits",
            "flow_control",
            "devices",
            "max_line_bytes",
            "require_checksum",
            "downlink_format",
            "write_queue",
        ],
    ),
    (
        "hub",
        &[
            "data_dir",
            "max_payload_bytes",
            "log",
            "trust_clock",
            "max_pending_commands",
            "command_ttl_secs",
            "kv_max_key_len",
            "max_outbox_bytes",
            "max_outbox_rows",
            "min_free_disk",
            "durability",
        ],
    ),
    ("local", &["mqtt"]),
    ("local.mqtt", &["listen", "max_connections"]),
    (
        "cloud",
        &[
            "api_url",
            "mqtt_url",
            "project_key_file",
            "transport",
            "home_poll_interval_secs",
            "max_messages_per_minute",
            "max_project_messages_per_minute",
            "max_inflight",
            "keepalive_secs",
            "seq_field",
            "captured_at_field",
        ],
    ),
    (
        "device",
        &[
            "name",
            "mode_id",
            "home_id",
            "api_key",
            "api_key_file",
            "local_password",
        ],
    ),
];

fn known_keys(table: &str) -> Option<&'static [&'static str]> {
    SCHEMA.iter().find(|(t, _)| *t == table).map(|(_, k)| *k)
}

fn did_you_mean(word: &str, candidates: &[&str]) -> Option<String> {
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(word, c), *c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c.to_string())
}

/// Finds the line of `key` inside table `table` (`device[1]` style) by scanning the source.
fn find_line(src: &str, table: &str, key: &str) -> Option<usize> {
    let (base, index) = match table.split_once('[') {
        Some((b, rest)) => (b, rest.trim_end_matches(']').parse::<usize>().ok()),
        None => (table, None),
    };
    let mut current = String::new();
    let mut array_seen: std::collections::HashMap<String, usize> = Default::default();
    let mut current_index = None;
    for (n, raw) in src.lines().enumerate() {
        let line = raw.trim();
        if let Some(h) = line.strip_prefix("[[") {
            let name = h.split("]]").next().unwrap_or("").trim().to_string();
            let i = array_seen.entry(name.clone()).or_insert(0);
            current_index = Some(*i);
            *i += 1;
            current = name;
            if key.is_empty() && current == base && current_index == index {
                return Some(n + 1);
            }
            continue;
        }
        if let Some(h) = line.strip_prefix('[') {
            current = h.split(']').next().unwrap_or("").trim().to_string();
            current_index = None;
            if key.is_empty() && current == base {
                return Some(n + 1);
            }
            continue;
        }
        if current == base && current_index == index && !key.is_empty() {
            if let Some((k, _)) = line.split_once('=') {
                if k.trim().trim_matches('"') == key {
                    return Some(n + 1);
                }
            }
        }
    }
    None
}

fn unknown_keys(src: &str, table: &toml::Table, path: &str, out: &mut Vec<Problem>) {
    let Some(known) = known_keys(path) else {
        return;
    };
    for (k, v) in table {
        let child = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        if !known.contains(&k.as_str()) {
            let fix = match did_you_mean(k, known) {
                Some(s) => format!("did you mean `{s}`? Known keys here: {}", known.join(", ")),
                None => format!("remove it; known keys here: {}", known.join(", ")),
            };
            let shown = display_path(path, k);
            out.push(Problem {
                line: find_line(src, &table_for_line(path), k),
                key: shown,
                what: format!("unknown key `{k}`"),
                fix,
            });
            continue;
        }
        match v {
            toml::Value::Table(t) => unknown_keys(src, t, &child, out),
            toml::Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let toml::Value::Table(t) = item {
                        let before = out.len();
                        unknown_keys(src, t, &child, out);
                        for p in &mut out[before..] {
                            let field = p.key.rsplit('.').next().unwrap_or("").to_string();
                            p.key = format!("{child}[{i}].{field}");
                            p.line = find_line(src, &format!("{child}[{i}]"), &field);
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

fn table_for_line(path: &str) -> String {
    path.to_string()
}

fn display_path(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// A local device name: used in topics, so restricted to a safe alphabet.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(unix)]
fn group_or_world_readable(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o077 != 0
}

#[cfg(not(unix))]
fn group_or_world_readable(_meta: &std::fs::Metadata) -> bool {
    false
}

/// Reads a secret from a file: one line, must not be readable by group or others.
pub fn read_secret_file(path: &Path) -> Result<Secret, (String, String)> {
    let meta = std::fs::metadata(path).map_err(|e| {
        (
            format!("cannot read key file {}: {e}", path.display()),
            "check the path, and that the hub's user may read it".to_string(),
        )
    })?;
    if group_or_world_readable(&meta) {
        return Err((
            format!(
                "key file {} is readable by other users (a device API key must stay secret)",
                path.display()
            ),
            format!("run `chmod 600 {}`", path.display()),
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        (
            format!("cannot read key file {}: {e}", path.display()),
            "check that the hub's user owns the file".to_string(),
        )
    })?;
    let key = text.trim();
    if key.is_empty() {
        return Err((
            format!("key file {} is empty", path.display()),
            "put the device API key from the MODE console in it".to_string(),
        ));
    }
    Ok(Secret::new(key))
}

impl Config {
    /// Reads and validates a config file. See the module doc.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&src, path.parent().unwrap_or(Path::new("."))).map_err(|problems| {
            ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            }
        })
    }

    /// Parses and validates config text; relative key-file paths are resolved against `base`.
    pub fn parse(src: &str, base: &Path) -> Result<Config, Vec<Problem>> {
        let table: toml::Table = toml::from_str(src).map_err(|e| {
            vec![Problem {
                key: String::new(),
                line: e.span().map(|s| src[..s.start].lines().count().max(1)),
                what: format!("not valid TOML: {}", e.message()),
                fix: "fix the syntax at that line (strings need quotes, tables need [brackets])"
                    .into(),
            }]
        })?;
        let mut problems = Vec::new();
        unknown_keys(src, &table, "", &mut problems);
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut cfg: Config = toml::from_str(src).map_err(|e| {
            vec![Problem {
                key: String::new(),
                line: e.span().map(|s| src[..s.start].lines().count().max(1)),
                what: e.message().to_string(),
                fix: "give the value the type shown in config/modehub.example.toml".into(),
            }]
        })?;
        cfg.validate(src, base, &mut problems);
        cfg.validate_serial(src, &mut problems);
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(problems)
        }
    }

    fn validate(&mut self, src: &str, base: &Path, problems: &mut Vec<Problem>) {
        let mut push = |table: &str, key: &str, what: String, fix: String| {
            problems.push(Problem {
                key: display_path(table, key),
                line: find_line(src, table, key),
                what,
                fix,
            });
        };
        if self.hub.max_payload_bytes < 64 || self.hub.max_payload_bytes > 16 * 1024 * 1024 {
            push(
                "hub",
                "max_payload_bytes",
                format!("{} is out of range", self.hub.max_payload_bytes),
                "use a value between 64 and 16777216 (default 65536)".into(),
            );
        }
        if tracing_subscriber::EnvFilter::try_new(&self.hub.log).is_err() {
            push(
                "hub",
                "log",
                format!("`{}` is not a log filter", self.hub.log),
                "use e.g. \"info\" or \"modehub=debug,info\"".into(),
            );
        }
        if let Err(e) = MqttEndpoint::parse(&self.cloud.mqtt_url) {
            push(
                "cloud",
                "mqtt_url",
                e,
                "use mqtts://host:8883 (TLS) or mqtt://host:1883".into(),
            );
        }
        match url::Url::parse(&self.cloud.api_url) {
            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
            _ => push(
                "cloud",
                "api_url",
                format!("`{}` is not an http(s) URL", self.cloud.api_url),
                "use https://api.tinkermode.com".into(),
            ),
        }
        if self.ops.listen != "off" && self.ops.listen.parse::<SocketAddr>().is_err() {
            push(
                "ops",
                "listen",
                format!("`{}` is not an address", self.ops.listen),
                "use e.g. \"127.0.0.1:9464\", or \"off\"".into(),
            );
        }
        if !(1..=86_400).contains(&self.ops.stall_after_secs) {
            push(
                "ops",
                "stall_after_secs",
                format!("{} is out of range", self.ops.stall_after_secs),
                "use 1..=86400 seconds (default 300)".into(),
            );
        }
        if self.hub.max_pending_commands == 0 || self.hub.max_pending_commands > 100_000 {
            push(
                "hub",
                "max_pending_commands",
                format!("{} is out of range", self.hub.max_pending_commands),
                "use 1..=100000 (default 100)".into(),
            );
        }
        if !(1..=1024).contains(&self.hub.kv_max_key_len) {
            push(
                "hub",
                "kv_max_key_len",
                format!("{} is out of range", self.hub.kv_max_key_len),
                "use 1..=1024 (default 128)".into(),
            );
        }
        if self.hub.max_outbox_bytes < 1024 * 1024 {
            push(
                "hub",
                "max_outbox_bytes",
                format!("{} is too small", self.hub.max_outbox_bytes),
                "use at least 1048576 (default 268435456 = 256 MiB)".into(),
            );
        }
        if self.hub.max_outbox_rows < 100 {
            push(
                "hub",
                "max_outbox_rows",
                format!("{} is too small", self.hub.max_outbox_rows),
                "use at least 100".into(),
            );
        }
        if self.cloud.max_messages_per_minute == 0
            || self.cloud.max_project_messages_per_minute == 0
        {
            push(
                "cloud",
                "max_messages_per_minute",
                "message rates must be above 0".into(),
                "use the defaults (540 per device, 5400 per hub) or your plan's limits".into(),
            );
        }
        if self.cloud.home_poll_interval_secs < 5 {
            push(
                "cloud",
                "home_poll_interval_secs",
                format!(
                    "{} s polls MODE too often",
                    self.cloud.home_poll_interval_secs
                ),
                "use 5 or more (default 60)".into(),
            );
        }
        if self.cloud.max_inflight == 0 || self.cloud.max_inflight > 1000 {
            push(
                "cloud",
                "max_inflight",
                format!("{} is out of range", self.cloud.max_inflight),
                "use 1..=1000 (default 32)".into(),
            );
        }
        if self.cloud.keepalive_secs < 5 || self.cloud.keepalive_secs > 3600 {
            push(
                "cloud",
                "keepalive_secs",
                format!("{} is out of range", self.cloud.keepalive_secs),
                "use 5..=3600 (default 30)".into(),
            );
        }
        if let Some(pk) = &self.cloud.project_key_file {
            let pk = base.join(pk);
            match read_secret_file(&pk) {
                Ok(key) => self.cloud.project_key = Some(key),
                Err((what, fix)) => push("cloud", "project_key_file", what, fix),
            }
        }
        if self.devices.is_empty() {
            push(
                "",
                "device",
                "no [[device]] is configured".into(),
                "add a [[device]] table with name, mode_id and api_key".into(),
            );
        }
        let mut names = std::collections::HashMap::new();
        let mut ids = std::collections::HashMap::new();
        for (i, d) in self.devices.iter_mut().enumerate() {
            let table = format!("device[{i}]");
            if !valid_name(&d.name) {
                push(
                    &table,
                    "name",
                    format!("`{}` is not a valid device name", d.name),
                    "use 1-64 letters, digits, '-', '_' or '.', not only digits".into(),
                );
            } else if let Some(prev) = names.insert(d.name.clone(), i) {
                push(
                    &table,
                    "name",
                    format!("name `{}` is already used by device[{prev}]", d.name),
                    "give every device its own name".into(),
                );
            }
            if d.mode_id == 0 {
                push(
                    &table,
                    "mode_id",
                    "mode_id 0 is not a MODE device ID".into(),
                    "copy the device ID from the MODE console".into(),
                );
            } else if let Some(prev) = ids.insert(d.mode_id, i) {
                push(
                    &table,
                    "mode_id",
                    format!("mode_id {} is already used by device[{prev}]", d.mode_id),
                    "each MODE device may be configured once".into(),
                );
            }
            match (&d.api_key, &d.api_key_file) {
                (Some(_), Some(_)) => push(
                    &table,
                    "api_key_file",
                    "both api_key and api_key_file are set".into(),
                    "keep one of them (api_key_file is safer)".into(),
                ),
                (None, None) => push(
                    &table,
                    "api_key",
                    format!("device `{}` has no API key", d.name),
                    "set api_key_file = \"/etc/modehub/keys/NAME\" (mode 0600) or api_key".into(),
                ),
                (Some(k), None) if k.expose().trim().is_empty() => push(
                    &table,
                    "api_key",
                    "api_key is empty".into(),
                    "copy the device API key from the MODE console".into(),
                ),
                (None, Some(f)) => match read_secret_file(&base.join(f)) {
                    Ok(k) => d.api_key = Some(k),
                    Err((what, fix)) => push(&table, "api_key_file", what, fix),
                },
                _ => {}
            }
            if let Some(p) = &d.local_password {
                if p.expose().is_empty() {
                    push(
                        &table,
                        "local_password",
                        "local_password is empty".into(),
                        "set a password or remove the key".into(),
                    );
                }
            }
        }
    }

    fn validate_serial(&self, src: &str, problems: &mut Vec<Problem>) {
        let mut owner: std::collections::HashMap<&str, usize> = Default::default();
        let mut ports: std::collections::HashMap<&Path, usize> = Default::default();
        for (i, s) in self.serial.iter().enumerate() {
            let table = format!("serial[{i}]");
            let mut push = |key: &str, what: String, fix: String| {
                problems.push(Problem {
                    key: display_path(&table, key),
                    line: find_line(src, &table, key),
                    what,
                    fix,
                })
            };
            if s.port.as_os_str().is_empty() {
                push(
                    "port",
                    "port is empty".into(),
                    "set the device path, e.g. /dev/ttyUSB0".into(),
                );
            } else if let Some(prev) = ports.insert(&s.port, i) {
                push(
                    "port",
                    format!(
                        "port {} is already used by serial[{prev}]",
                        s.port.display()
                    ),
                    "list every device of one port in one [[serial]] table".into(),
                );
            }
            if s.baud == 0 || s.baud > 4_000_000 {
                push(
                    "baud",
                    format!("{} is not a baud rate", s.baud),
                    "use e.g. 9600 or 115200".into(),
                );
            }
            if !(5..=8).contains(&s.data_bits) {
                push(
                    "data_bits",
                    format!("{} data bits", s.data_bits),
                    "use 5, 6, 7 or 8".into(),
                );
            }
            if !(1..=2).contains(&s.stop_bits) {
                push(
                    "stop_bits",
                    format!("{} stop bits", s.stop_bits),
                    "use 1 or 2".into(),
                );
            }
            if !(16..=65536).contains(&s.max_line_bytes) {
                push(
                    "max_line_bytes",
                    format!("{} is out of range", s.max_line_bytes),
                    "use 16..=65536 (default 1024)".into(),
                );
            }
            if s.write_queue == 0 || s.write_queue > 10_000 {
                push(
                    "write_queue",
                    format!("{} is out of range", s.write_queue),
                    "use 1..=10000 (default 64)".into(),
                );
            }
            if s.devices.is_empty() {
                push(
                    "devices",
                    "no devices listed".into(),
                    "name the [[device]]s that speak on this port".into(),
                );
            }
            for name in &s.devices {
                if !self.devices.iter().any(|d| &d.name == name) {
                    let names: Vec<&str> = self.devices.iter().map(|d| d.name.as_str()).collect();
                    let hint = did_you_mean(name, &names)
                        .map(|n| format!("did you mean `{n}`? "))
                        .unwrap_or_default();
                    push(
                        "devices",
                        format!("`{name}` is not a configured [[device]] name"),
                        format!("{hint}add a [[device]] named `{name}` or fix the name"),
                    );
                } else if let Some(prev) = owner.insert(name.as_str(), i) {
                    push(
                        "devices",
                        format!("device `{name}` is already on serial[{prev}]"),
                        "a device speaks on one port only".into(),
                    );
                }
            }
        }
    }

    /// The serial port (index into `serial`) a device speaks on, if any.
    pub fn serial_port_of(&self, name: &str) -> Option<usize> {
        self.serial
            .iter()
            .position(|s| s.devices.iter().any(|d| d == name))
    }

    /// The database file.
    pub fn db_path(&self) -> PathBuf {
        self.hub.data_dir.join("hub.db")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[hub]
data_dir = "/tmp/x"

[local.mqtt]
listen = "127.0.0.1:1883"

[cloud]
mqtt_url = "mqtt://127.0.0.1:1884"

[[device]]
name = "porch-temp"
mode_id = 1234
home_id = 42
api_key = "v1.secret-key"
local_password = "s3cret"
"#;

    #[test]
    fn parses_good_config_with_defaults() {
        let c = Config::parse(GOOD, Path::new(".")).unwrap();
        assert_eq!(c.devices[0].mode_id, 1234);
        assert_eq!(c.cloud.api_url, "https://api.tinkermode.com");
        assert_eq!(c.hub.max_payload_bytes, 65536);
        assert_eq!(
            c.cloud.mqtt_endpoint().unwrap(),
            MqttEndpoint {
                host: "127.0.0.1".into(),
                port: 1884,
                tls: false
            }
        );
    }

    #[test]
    fn secrets_never_in_debug() {
        let c = Config::parse(GOOD, Path::new(".")).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("v1.secret-key"), "{dbg}");
        assert!(!dbg.contains("s3cret"), "{dbg}");
    }

    #[test]
    fn unknown_keys_get_did_you_mean_with_lines() {
        let src = GOOD
            .replace("listen =", "lisen =")
            .replace("home_id", "homeid");
        let problems = Config::parse(&src, Path::new(".")).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        let lisen = problems
            .iter()
            .find(|p| p.key == "local.mqtt.lisen")
            .unwrap();
        assert!(lisen.fix.contains("did you mean `listen`"));
        assert_eq!(lisen.line, Some(6));
        let homeid = problems
            .iter()
            .find(|p| p.key == "device[0].homeid")
            .unwrap();
        assert!(homeid.fix.contains("`home_id`"));
        assert_eq!(homeid.line, Some(14));
    }

    #[test]
    fn reports_every_semantic_problem() {
        let src = r#"
[cloud]
mqtt_url = "http://x"
[[device]]
name = "a"
mode_id = 1
[[device]]
name = "a"
mode_id = 1
api_key = "k"
"#;
        let problems = Config::parse(src, Path::new(".")).unwrap_err();
        let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"cloud.mqtt_url"), "{keys:?}");
        assert!(keys.contains(&"device[0].api_key"), "{keys:?}");
        assert!(keys.contains(&"device[1].name"), "{keys:?}");
        assert!(keys.contains(&"device[1].mode_id"), "{keys:?}");
        let dev1 = problems.iter().find(|p| p.key == "device[1].name").unwrap();
        assert_eq!(dev1.line, Some(8));
    }

    #[cfg(unix)]
    #[test]
    fn key_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        std::fs::write(&key, "v1.filekey\n").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let src = "[[device]]\nname = \"a\"\nmode_id = 1\napi_key_file = \"k\"\n";
        let problems = Config::parse(src, dir.path()).unwrap_err();
        assert!(problems[0].fix.contains("chmod 600"), "{problems:?}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = Config::parse(src, dir.path()).unwrap();
        assert_eq!(c.devices[0].key().expose(), "v1.filekey");
    }

    #[test]
    fn bad_toml_is_reported_with_line() {
        let problems = Config::parse("[hub]\ndata_dir = /x\n", Path::new(".")).unwrap_err();
        assert_eq!(problems[0].line, Some(2));
    }
}
