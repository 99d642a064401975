//! The emulator's public records: recorded events, counters, device summaries and the typed
//! refusals of commands and kv writes. Plain data; it must not reach into the running state.

use std::fmt;

use serde::{Deserialize, Serialize};

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
    /// Events refused because the device's home is deactivated (`deactivated_home = Refuse`).
    pub events_refused_deactivated: u64,
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
    /// Sessions closed for publishing while the home is deactivated (`Refuse`).
    pub mqtt_sessions_dropped_deactivated: u64,
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
    /// kv SUBSCRIBEs refused by the `refuse_kv_subscriptions` fault.
    pub kv_subscriptions_refused_fault: u64,
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
