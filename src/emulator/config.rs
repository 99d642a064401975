//! How the emulator is configured: [`Behaviour`] (the choices made where MODE's real behaviour
//! is unconfirmed, plus limits; each is listed in `docs/emulator.md`), the run-time [`Faults`]
//! and the listen addresses ([`EmulatorConfig`]). It must not contain protocol code.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Seed;

/// What the emulator does with a device whose home is deactivated. MODE documents nothing for
/// this (`mode-api.md` §4, §9): both are guesses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeactivatedHome {
    /// Events are taken (PUBACK / 204) and dropped; kv writes over MQTT are acked and dropped,
    /// over REST refused 403; commands refused 403. The default.
    Drop,
    /// Events and kv writes are refused: REST 403 with `deactivated_kv_reason`, MQTT session
    /// closed without a PUBACK (the device must keep them). Commands refused 403.
    Refuse,
}

/// The environment variable that flips every *assumed* knob ([`Behaviour::from_env`]): set it to
/// `flipped` to run a test suite against the other guess of each unconfirmed behaviour.
pub const ASSUMED_ENV: &str = "MODEHUB_EMULATOR_ASSUMED";

/// How the emulator behaves. Where MODE's behaviour is known the default follows MODE (source
/// on each field); where it is not, the field is an *assumed* knob: its default is a guess and
/// [`Behaviour::flip_assumed`] switches it to the other plausible answer. Every field is listed
/// in `docs/emulator.md` (behaviour, source, knob).
#[derive(Clone, Debug)]
pub struct Behaviour {
    /// Per-device sliding one-minute limit on data messages (events and kv writes made with the
    /// device's own key, MQTT and REST together). Default 600 (MODE documents 600 per minute);
    /// `None` = off. Over the limit: MQTT session closed (TCP), REST 429 `RATE_LIMIT_EXCEEDED`
    /// with `Retry-After`.
    pub rate_limit_per_minute: Option<u32>,
    /// The same limit over all devices of the project. Default 6,000 (MODE documents 6,000 per
    /// minute per project); `None` = off.
    pub project_rate_limit_per_minute: Option<u32>,
    /// At most this many simultaneous connections (MQTT sessions + command WebSockets) per
    /// device. Default 5 (MODE's documented limit). The next MQTT CONNECT gets CONNACK
    /// `too_many_connections_connack`; the next WebSocket 503.
    pub max_connections_per_device: usize,
    /// CONNACK return code for a CONNECT over `max_connections_per_device`. Assumed: 3
    /// (server unavailable); flipped: 5 (not authorised).
    pub too_many_connections_connack: u8,
    /// Whether a device's own MQTT kv write is echoed back (as `set`/`delete` with the new rev)
    /// on the very session that published it. Assumed: true; flipped: false. Other sessions of
    /// the device and writes from REST are always pushed.
    pub kv_echo_to_self: bool,
    /// What a device of a deactivated home sees. Assumed: [`DeactivatedHome::Drop`]; flipped:
    /// [`DeactivatedHome::Refuse`].
    pub deactivated_home: DeactivatedHome,
    /// `reason` of the 403 answered to kv writes (and events, when refused) for a device whose
    /// home is deactivated. Assumed: `HOME_DEACTIVATED`; flipped: `PERMISSION_DENIED`.
    pub deactivated_kv_reason: String,
    /// `reason` of the 403 answered to commands for a device whose home is deactivated.
    /// Assumed: `HOME_DEACTIVATED`; flipped: `PERMISSION_DENIED`.
    pub deactivated_command_reason: String,
    /// Whether error bodies carry the emulator's own `reason` names (`NOT_FOUND`,
    /// `INVALID_INPUT`, `KEY_NOT_FOUND`, ...) where MODE's reason is unknown. Assumed: true;
    /// flipped: false (the body is `{}`: the client sees the status only). The reasons found
    /// in MODE's sources (`RATE_LIMIT_EXCEEDED`, `UNAUTHENTICATED_CLIENT`,
    /// `AUTHORIZATION_REQUIRED`, `PERMISSION_DENIED`, `DEVICE_OFFLINE`) are always sent.
    pub invented_reasons: bool,
    /// HTTP status of `PUT /devices/{id}/command` when the device has no connection (reason
    /// `DEVICE_OFFLINE`). Assumed: 409; flipped: 404.
    pub device_offline_status: u16,
    /// Whether a device key may `GET /homes/{its home}`. Assumed: false (403); flipped: true.
    pub device_key_can_read_home: bool,
    /// Whether a device key may use the kv REST routes (`/devices/{id}/kv...`). MODE documents
    /// them for applications only. Assumed: true; flipped: false (403 `PERMISSION_DENIED`).
    pub device_key_kv_rest: bool,
    /// HTTP status of `DELETE /devices/{id}/kv/{key}` for a key that does not exist. Assumed:
    /// 404; flipped: 204 (done, nothing to delete).
    pub delete_missing_kv_status: u16,
    /// Whether a command sent without `parameters` gets `"parameters":{}` added. MODE treats
    /// `parameters` as optional, so the default is false (forwarded without it).
    pub command_parameters_default: bool,
    /// Largest MQTT packet (remaining length) accepted; bigger ones close the session.
    /// Default 1 MiB (assumed; MODE documents no limit).
    pub max_packet_size: usize,
    /// Largest REST body accepted; bigger ones get 413. Default 1 MiB (assumed).
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
            rate_limit_per_minute: Some(600),
            project_rate_limit_per_minute: Some(6000),
            max_connections_per_device: 5,
            too_many_connections_connack: 3,
            kv_echo_to_self: true,
            deactivated_home: DeactivatedHome::Drop,
            deactivated_kv_reason: "HOME_DEACTIVATED".to_string(),
            deactivated_command_reason: "HOME_DEACTIVATED".to_string(),
            invented_reasons: true,
            device_offline_status: 409,
            device_key_can_read_home: false,
            device_key_kv_rest: true,
            delete_missing_kv_status: 404,
            command_parameters_default: false,
            max_packet_size: 1024 * 1024,
            max_body_size: 1024 * 1024,
            session_queue: 1024,
            max_recorded_events: 1_000_000,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl Behaviour {
    /// Every assumed knob switched to its other setting (see each field); the known ones and
    /// the limits are kept.
    pub fn flip_assumed(self) -> Self {
        Behaviour {
            too_many_connections_connack: if self.too_many_connections_connack == 3 {
                5
            } else {
                3
            },
            kv_echo_to_self: !self.kv_echo_to_self,
            deactivated_home: match self.deactivated_home {
                DeactivatedHome::Drop => DeactivatedHome::Refuse,
                DeactivatedHome::Refuse => DeactivatedHome::Drop,
            },
            deactivated_kv_reason: flip_reason(&self.deactivated_kv_reason),
            deactivated_command_reason: flip_reason(&self.deactivated_command_reason),
            invented_reasons: !self.invented_reasons,
            device_offline_status: if self.device_offline_status == 409 {
                404
            } else {
                409
            },
            device_key_can_read_home: !self.device_key_can_read_home,
            device_key_kv_rest: !self.device_key_kv_rest,
            delete_missing_kv_status: if self.delete_missing_kv_status == 404 {
                204
            } else {
                404
            },
            ..self
        }
    }

    /// The defaults, with the assumed knobs flipped when the environment variable
    /// [`ASSUMED_ENV`] is `flipped` (how CI runs the hub's tests against both guesses).
    pub fn from_env() -> Self {
        let b = Behaviour::default();
        match std::env::var(ASSUMED_ENV).as_deref() {
            Ok("flipped") => b.flip_assumed(),
            _ => b,
        }
    }

    /// No rate limits (for tests and benchmarks that send faster than MODE allows on purpose).
    pub fn without_rate_limits(self) -> Self {
        Behaviour {
            rate_limit_per_minute: None,
            project_rate_limit_per_minute: None,
            ..self
        }
    }
}

fn flip_reason(r: &str) -> String {
    if r == "HOME_DEACTIVATED" {
        "PERMISSION_DENIED".to_string()
    } else {
        "HOME_DEACTIVATED".to_string()
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
    /// MQTT SUBSCRIBEs to the device's kv topic get a SUBACK failure (0x80) and no reload.
    pub refuse_kv_subscriptions: bool,
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
