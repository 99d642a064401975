//! MODE's wire format: topics, payloads, and the device MQTT session.
//!
//! Everything the hub knows about how MODE spells things lives here (see
//! `../shared/mode-api.md`): `/devices/{id}/event` with `{"eventType","eventData"}`, the DDP
//! `{"action":"set"|"delete"}` messages, and (in [`mqtt`]) how a device logs in. The rest of the
//! hub hands this module outbox rows and gets back bytes to send. It must not touch SQL or local
//! sockets.

pub mod homes;
pub mod mqtt;
pub mod rest;
mod wire;

use crate::config::{MqttEndpoint, Secret, Transport};
use crate::local::{Kind, KvChange, KvSnapshot, Row};
use bytes::Bytes;
use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How kv stands for one device: shared by its successive sessions (which report refusals and
/// oversized reloads into it) and read by status and health. Kv trouble never stops a device's
/// events or commands; it only shows here.
#[derive(Debug, Default)]
pub struct KvHealth {
    /// What is wrong with kv for this device right now, and since when (unix ms).
    problem: Mutex<Option<(String, i64)>>,
    /// No kv subscription before this: the last reload was over the downlink packet limit.
    skip_until: Mutex<Option<tokio::time::Instant>>,
    /// kv reads, writes or subscriptions MODE refused.
    pub refusals: AtomicU64,
    /// kv reloads larger than the downlink packet limit.
    pub reloads_too_large: AtomicU64,
}

impl KvHealth {
    /// What is wrong with kv for this device (`None`: working, or not tried yet), and since
    /// when (unix ms).
    pub fn problem(&self) -> Option<(String, i64)> {
        self.problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_problem(&self, mode_id: crate::local::ModeId, why: String) {
        let mut p = self.problem.lock().unwrap_or_else(|e| e.into_inner());
        if p.as_ref().map(|(w, _)| w) != Some(&why) {
            tracing::warn!(device = mode_id.get(), problem = %why, "kv degraded for this device; events and commands go on");
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            *p = Some((why, now));
        }
    }

    pub(crate) fn clear(&self, mode_id: crate::local::ModeId) {
        if self
            .problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .is_some()
        {
            tracing::info!(device = mode_id.get(), "kv works again for this device");
        }
    }

    pub(crate) fn skip_until(&self) -> Option<tokio::time::Instant> {
        let mut s = self.skip_until.lock().unwrap_or_else(|e| e.into_inner());
        if s.is_some_and(|t| t <= tokio::time::Instant::now()) {
            *s = None;
        }
        *s
    }

    pub(crate) fn skip_for(&self, d: Duration) {
        *self.skip_until.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(tokio::time::Instant::now() + d);
    }
}

/// How to reach MODE as a device.
#[derive(Clone)]
pub struct SessionConfig {
    pub transport: Transport,
    /// Device MQTT endpoint (transport = mqtt).
    pub mqtt: MqttEndpoint,
    /// REST base URL, e.g. `https://api.tinkermode.com` (transport = rest, and the home watcher).
    pub api_url: String,
    pub keepalive: Duration,
    /// Unacknowledged QoS 1 publishes at once (MQTT; REST sends one at a time to keep order).
    pub inflight: usize,
    /// Largest packet the hub sends (and takes over REST).
    pub max_packet: usize,
    /// Largest MQTT packet taken from MODE: a kv reload carries the whole store in one
    /// publish, so this is separate and generous. A bigger one is logged, counted in
    /// [`KvHealth`], and kv is left off for a while instead of reconnecting into it again.
    pub max_downlink_packet: usize,
    /// Fields the hub adds to events.
    pub stamping: Stamping,
}

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// MODE refused the login. `auth`: the key or ID is wrong (retrying will not help).
    #[error("MODE refused the login ({detail}): check mode_id and the device API key")]
    Refused { auth: bool, detail: String },
    #[error("{0}")]
    Transport(String),
    #[error("no answer from MODE within {0:?}")]
    Timeout(Duration),
}

impl ConnectError {
    /// A refusal that retrying with the same credentials will not fix.
    pub fn is_auth(&self) -> bool {
        matches!(self, ConnectError::Refused { auth: true, .. })
    }
}

/// What happened on an open session.
#[derive(Debug)]
pub enum SessionEvent {
    /// MODE acknowledged this outbox row (PUBACK, or a 2xx answer).
    Acked(i64),
    /// MODE answered this row with an error (REST). `permanent`: sending it again will never
    /// work (a 4xx other than 401/403/404/408/409/423/429, or a kv write MODE does not allow
    /// this device key), so it belongs in the dead-letter table; otherwise (401, 403, 404,
    /// 409, 423) the row stays and the device is held. A delete of a missing key is `Acked`.
    Rejected {
        row: i64,
        status: u16,
        reason: String,
        permanent: bool,
    },
    /// MODE asked the hub to slow down (429 + Retry-After): nothing more until then.
    Throttled(Duration),
    /// A command (`{"action":..,"parameters":..}`), raw JSON.
    Command(Bytes),
    /// A DDP message (`{"action":"reload"|"set"|"delete",...}`), raw JSON.
    Kv(Bytes),
    /// The connection ended.
    Closed(String),
}

/// One device's connection to MODE, over device MQTT or REST + WebSocket.
pub enum Session {
    Mqtt(Box<mqtt::Session>),
    Rest(Box<rest::Session>),
}

impl Session {
    /// Logs in as `mode_id` and subscribes to its commands and kv updates; kv trouble is
    /// reported into `kv` (kept by the caller across sessions).
    pub async fn connect(
        cfg: &SessionConfig,
        mode_id: crate::local::ModeId,
        key: &Secret,
        kv: &Arc<KvHealth>,
    ) -> Result<Session, ConnectError> {
        // The connect futures (TCP, TLS and WebSocket handshakes, HTTP requests) are kilobytes
        // big and needed once per session: boxed, they do not make every device's uplink task
        // that big for as long as it lives (issue 12).
        match cfg.transport {
            Transport::Mqtt => Ok(Session::Mqtt(Box::new(
                Box::pin(mqtt::Session::connect(cfg, mode_id, key, Arc::clone(kv))).await?,
            ))),
            Transport::Rest => Ok(Session::Rest(Box::new(
                Box::pin(rest::Session::connect(cfg, mode_id, key, Arc::clone(kv))).await?,
            ))),
        }
    }

    /// The kv store read while connecting (REST), to apply before anything is sent.
    pub fn take_initial_kv(&mut self) -> Option<Bytes> {
        match self {
            Session::Mqtt(_) => None,
            Session::Rest(s) => s.take_initial_kv(),
        }
    }

    /// MQTT: the kv subscription is under way and MODE's reload has not arrived yet (the
    /// caller holds its sends until it does, so the reload cannot wipe a change it just made).
    pub fn awaits_reload(&self) -> bool {
        match self {
            Session::Mqtt(s) => s.awaits_reload(),
            Session::Rest(_) => false,
        }
    }

    /// Publishes not yet answered.
    pub fn in_flight(&self) -> usize {
        match self {
            Session::Mqtt(s) => s.in_flight(),
            Session::Rest(s) => s.in_flight(),
        }
    }

    /// How many may be in flight at once.
    pub fn window(&self, cfg: &SessionConfig) -> usize {
        match self {
            Session::Mqtt(_) => cfg.inflight.max(1),
            Session::Rest(_) => 1,
        }
    }

    /// Sends one outbox row (never blocks; keep `in_flight() < window()`).
    pub fn send(
        &mut self,
        row: &Row,
        stamping: &Stamping,
        buf: &mut Vec<u8>,
    ) -> Result<(), String> {
        match self {
            Session::Mqtt(s) => {
                let topic = upstream_message(row, stamping, buf);
                s.publish(row.id, &topic, buf)
            }
            Session::Rest(s) => s.send(row, stamping),
        }
    }

    /// Drives the connection until something the caller cares about happens.
    pub async fn next(&mut self) -> SessionEvent {
        match self {
            Session::Mqtt(s) => s.next().await,
            Session::Rest(s) => s.next().await,
        }
    }

    /// Says goodbye politely (best effort, bounded).
    pub async fn close(self) {
        // Boxed for the same reason as the connect futures.
        match self {
            Session::Mqtt(s) => Box::pin(s.close()).await,
            Session::Rest(s) => Box::pin(s.close()).await,
        }
    }
}

/// Parses a DDP message from MODE. `None` (with a reason) for anything malformed.
pub fn parse_kv(payload: &[u8]) -> Result<KvChange, String> {
    #[derive(serde::Deserialize)]
    struct Item<'a> {
        key: String,
        #[serde(borrow)]
        value: Option<&'a serde_json::value::RawValue>,
    }
    #[derive(serde::Deserialize)]
    struct Msg<'a> {
        action: String,
        rev: Option<i64>,
        key: Option<String>,
        #[serde(borrow)]
        value: Option<&'a serde_json::value::RawValue>,
        #[serde(borrow, default)]
        items: Option<Vec<Item<'a>>>,
    }
    let m: Msg = serde_json::from_slice(payload).map_err(|e| format!("not a DDP message: {e}"))?;
    match m.action.as_str() {
        "reload" => Ok(KvChange::Reload {
            rev: m.rev,
            items: m
                .items
                .unwrap_or_default()
                .into_iter()
                .map(|i| {
                    (
                        i.key,
                        i.value
                            .map(|v| v.get().to_string())
                            .unwrap_or("null".into()),
                    )
                })
                .collect(),
        }),
        "set" | "delete" => {
            let rev = m.rev.ok_or("a set/delete without rev")?;
            let key = m.key.ok_or("a set/delete without key")?;
            if m.action == "set" {
                let value = m.value.ok_or("a set without value")?.get().to_string();
                Ok(KvChange::Set { rev, key, value })
            } else {
                Ok(KvChange::Delete { rev, key })
            }
        }
        other => Err(format!("unknown DDP action {other:?}")),
    }
}

/// MODE's `reload` message for a snapshot of the store.
pub fn kv_reload_message(snap: &KvSnapshot) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + snap.items.len() * 32);
    out.extend_from_slice(
        format!(
            "{{\"action\":\"reload\",\"rev\":{},\"numItems\":{},\"items\":[",
            snap.rev,
            snap.items.len()
        )
        .as_bytes(),
    );
    for (i, (k, v)) in snap.items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"key\":");
        serde_json::to_writer(&mut out, k).expect("writing to a Vec cannot fail");
        out.extend_from_slice(b",\"value\":");
        out.extend_from_slice(v.as_bytes());
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    out
}

pub fn event_topic(mode_id: crate::local::ModeId) -> String {
    format!("/devices/{mode_id}/event")
}

pub fn kv_topic(mode_id: crate::local::ModeId) -> String {
    format!("/devices/{mode_id}/kv")
}

pub fn command_topic(mode_id: crate::local::ModeId) -> String {
    format!("/devices/{mode_id}/command")
}

/// Which fields the hub adds to `eventData`.
#[derive(Debug, Clone, Default)]
pub struct Stamping {
    /// Field for the per-device sequence number; empty = off.
    pub seq_field: String,
    /// Field for the capture time (RFC 3339 UTC, ms); empty = off.
    pub captured_at_field: String,
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-23T10:00:00.123Z`.
pub fn rfc3339_ms(unix_ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// The MQTT topic and payload that carry `row` to MODE as device `row.device`.
pub fn upstream_message(row: &Row, stamping: &Stamping, out: &mut Vec<u8>) -> String {
    out.clear();
    match row.kind {
        Kind::Event => {
            write_event(row, stamping, out);
            event_topic(crate::local::ModeId(row.device))
        }
        Kind::KvSet | Kind::KvDelete => {
            write_kv(row, out);
            kv_topic(crate::local::ModeId(row.device))
        }
    }
}

/// `{"eventType":T,"eventData":{...,"_seq":N,"_capturedAt":"..."}}`. The stored data is a JSON
/// object (the router checked it); the hub's fields are appended last, so they win for a
/// consumer that keeps the last of duplicate keys.
fn write_event(row: &Row, stamping: &Stamping, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"eventType\":");
    serde_json::to_writer(&mut *out, &row.key).expect("writing to a Vec cannot fail");
    out.extend_from_slice(b",\"eventData\":");
    let data = row.body.trim();
    let inner = data
        .strip_prefix('{')
        .and_then(|d| d.strip_suffix('}'))
        .unwrap_or("");
    let mut extra = String::new();
    if !stamping.seq_field.is_empty() {
        push_field(&mut extra, &stamping.seq_field);
        let _ = write!(extra, "{}", row.dev_seq);
    }
    if !stamping.captured_at_field.is_empty() {
        push_field(&mut extra, &stamping.captured_at_field);
        let _ = write!(extra, "\"{}\"", rfc3339_ms(row.captured.wall_ms));
        if !row.captured.synced {
            // Captured before the clock was synchronised and not repairable (yet): a best guess.
            push_field(&mut extra, &format!("{}Approx", stamping.captured_at_field));
            extra.push_str("true");
        }
    }
    out.push(b'{');
    out.extend_from_slice(inner.as_bytes());
    if !extra.is_empty() {
        if !inner.trim().is_empty() {
            out.push(b',');
        }
        out.extend_from_slice(extra.as_bytes());
    }
    out.extend_from_slice(b"}}");
}

fn push_field(out: &mut String, name: &str) {
    if !out.is_empty() {
        out.push(',');
    }
    out.push_str(&serde_json::to_string(name).expect("string serializes"));
    out.push(':');
}

/// `{"action":"set","key":K,"value":V}` or `{"action":"delete","key":K}`.
fn write_kv(row: &Row, out: &mut Vec<u8>) {
    let action = if row.kind == Kind::KvSet {
        "set"
    } else {
        "delete"
    };
    out.extend_from_slice(b"{\"action\":\"");
    out.extend_from_slice(action.as_bytes());
    out.extend_from_slice(b"\",\"key\":");
    serde_json::to_writer(&mut *out, &row.key).expect("writing to a Vec cannot fail");
    if row.kind == Kind::KvSet {
        out.extend_from_slice(b",\"value\":");
        out.extend_from_slice(row.body.as_bytes());
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: Kind, key: &str, body: &str) -> Row {
        Row {
            id: 1,
            device: 1234,
            kind,
            key: key.into(),
            body: body.into(),
            dev_seq: 7,
            captured: crate::local::Capture::at(1_700_000_000_123),
        }
    }

    #[test]
    fn event_payload_is_mode_shaped_and_stamped() {
        let st = Stamping {
            seq_field: "_seq".into(),
            captured_at_field: "_capturedAt".into(),
        };
        let mut out = Vec::new();
        let topic = upstream_message(&row(Kind::Event, "temp", r#"{"c": 21.5}"#), &st, &mut out);
        assert_eq!(topic, "/devices/1234/event");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["eventType"], "temp");
        assert_eq!(v["eventData"]["c"], 21.5);
        assert_eq!(v["eventData"]["_seq"], 7);
        assert_eq!(v["eventData"]["_capturedAt"], "2023-11-14T22:13:20.123Z");

        upstream_message(&row(Kind::Event, "t\"q", "{}"), &st, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["eventType"], "t\"q");
        assert_eq!(v["eventData"].as_object().unwrap().len(), 2);

        let mut unsynced = row(Kind::Event, "t", "{}");
        unsynced.captured.synced = false;
        upstream_message(&unsynced, &st, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["eventData"]["_capturedAtApprox"], true);

        upstream_message(
            &row(Kind::Event, "t", "{ }"),
            &Stamping::default(),
            &mut out,
        );
        assert_eq!(out, br#"{"eventType":"t","eventData":{ }}"#);
    }

    #[test]
    fn kv_payloads() {
        let mut out = Vec::new();
        let t = upstream_message(
            &row(Kind::KvSet, "k1", "[1,2]"),
            &Stamping::default(),
            &mut out,
        );
        assert_eq!(t, "/devices/1234/kv");
        assert_eq!(out, br#"{"action":"set","key":"k1","value":[1,2]}"#);
        upstream_message(
            &row(Kind::KvDelete, "k1", ""),
            &Stamping::default(),
            &mut out,
        );
        assert_eq!(out, br#"{"action":"delete","key":"k1"}"#);
    }
}
/// What every device's uplink task holds for as long as it lives (issue 12): the futures of
/// `Session`'s methods are stored inline in it, so the big ones must stay boxed.
#[cfg(test)]
mod future_sizes {
    use super::*;

    fn ret<'a, T: 'a, F>(_: fn(&'a mut T) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    fn own<T, F>(_: fn(T) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn session_futures_stay_small() {
        let cfg = SessionConfig {
            transport: Transport::Mqtt,
            mqtt: MqttEndpoint {
                host: "127.0.0.1".into(),
                port: 1,
                tls: false,
                ws_path: None,
            },
            api_url: "http://127.0.0.1:1".into(),
            keepalive: Duration::from_secs(30),
            inflight: 32,
            max_packet: 10_000,
            max_downlink_packet: 100_000,
            stamping: Stamping::default(),
        };
        let key = Secret::new("k");
        let kv = Arc::new(KvHealth::default());
        let connect = Session::connect(&cfg, crate::local::ModeId(1), &key, &kv);
        // Unboxed, the TCP/TLS/WebSocket and HTTP handshakes make this ~10 KB in a debug build.
        assert!(
            std::mem::size_of_val(&connect) <= 256,
            "{}",
            std::mem::size_of_val(&connect)
        );
        drop(connect);
        let close = own::<Session, _>(|s| s.close());
        assert!(close <= 256, "{close}");
        let next = ret::<Session, _>(|s| s.next());
        assert!(next <= 1024, "{next}");
    }
}
