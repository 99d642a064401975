//! How the emulator is configured: [`Behaviour`] (the choices made where MODE's real behaviour
//! is unconfirmed, plus limits; each is listed in `docs/emulator.md`), the run-time [`Faults`]
//! and the listen addresses ([`EmulatorConfig`]). It must not contain protocol code.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Seed;

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
