//! In-memory model of the emulated MODE project: homes, devices, keys and what they may do,
//! device kv stores with their revs, live connections with their bounded outgoing queues,
//! recorded events, rate-limit windows and counters. Every operation is a plain synchronous
//! method called under the one state mutex; nothing here awaits, does I/O or knows a wire
//! format beyond the JSON payloads MODE defines (events, commands, kv sync messages).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{
    Behaviour, CommandError, DeactivatedHome, DeviceStatus, Faults, KvError, Permission,
    RecordedEvent, Seed, Stats, Transport,
};

/// Who a key belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Principal {
    Device(u64),
    Project {
        admin: bool,
        commands: bool,
        kv_write: bool,
    },
    User {
        user_id: u64,
        home_ids: Vec<u64>,
    },
}

impl Principal {
    fn member_of(&self, home: Option<u64>) -> bool {
        match (self, home) {
            (Principal::User { home_ids, .. }, Some(h)) => home_ids.contains(&h),
            _ => false,
        }
    }
}

/// What a connection is sent.
#[derive(Clone, Debug)]
pub(crate) enum Push {
    Command(Bytes),
    Kv(Bytes),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConnKind {
    Mqtt,
    WebSocket,
}

struct Conn {
    kind: ConnKind,
    tx: mpsc::Sender<Push>,
    cancel: CancellationToken,
    sub_command: bool,
    sub_kv: bool,
}

pub(crate) struct Home {
    pub id: u64,
    pub name: String,
    pub deactivated: bool,
    pub creation_time: String,
}

pub(crate) struct KvItem {
    pub value: Value,
    pub modification_time: String,
}

pub(crate) struct Device {
    pub id: u64,
    api_key: String,
    pub home_id: Option<u64>,
    pub name: String,
    pub tag: String,
    pub device_class: String,
    pub creation_time: String,
    pub kv_rev: u64,
    pub kv: BTreeMap<String, KvItem>,
    conns: BTreeMap<u64, Conn>,
    pub connect_count: u64,
    pub last_connect_time: Option<String>,
    pub last_disconnect_time: Option<String>,
    window: VecDeque<Instant>,
}

/// A refused connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConnRefusal {
    BadCredentials,
    TooMany,
    Offline,
}

/// Outcome of an event submission.
#[derive(Debug)]
pub(crate) enum EventOutcome {
    Recorded,
    DroppedDeactivated,
    Invalid(String),
    RateLimited(u32),
    /// The device's home is deactivated and `deactivated_home` is `Refuse`.
    RefusedDeactivated,
}

/// A kv change.
#[derive(Clone, Debug)]
pub(crate) enum KvOp {
    Set(String, Value),
    Delete(String),
}

pub(crate) struct NewConn {
    pub conn_id: u64,
    pub rx: mpsc::Receiver<Push>,
    pub cancel: CancellationToken,
}

pub(crate) struct State {
    pub project_id: u64,
    pub homes: BTreeMap<u64, Home>,
    pub devices: BTreeMap<u64, Device>,
    keys: HashMap<String, Principal>,
    events: VecDeque<RecordedEvent>,
    /// Events dropped because the device's home was deactivated (bounded like `events`).
    dropped: VecDeque<RecordedEvent>,
    next_event_seq: u64,
    next_conn_id: u64,
    pub stats: Stats,
    pub faults: Faults,
    pub behaviour: Behaviour,
    offline: bool,
    /// Project-wide rate-limit window (`project_rate_limit_per_minute`).
    project_window: VecDeque<Instant>,
    events_tx: broadcast::Sender<RecordedEvent>,
    event_seq: watch::Sender<u64>,
}

/// MODE's key rule (documented for home kv, assumed for device kv).
pub(crate) fn valid_kv_key(k: &str) -> bool {
    let b = k.as_bytes();
    let edge = |c: u8| c.is_ascii_alphanumeric();
    let mid = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'-';
    match b {
        [] => false,
        [c] => edge(*c),
        [first, inner @ .., last] => edge(*first) && edge(*last) && inner.iter().all(|c| mid(*c)),
    }
}

/// RFC 3339 UTC with nanoseconds, e.g. `2015-08-25T18:53:42.365519896Z`.
pub(crate) fn rfc3339_nanos(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (y, m, day) = civil_from_days((secs / 86_400) as i64);
    let sod = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60,
        d.subsec_nanos()
    )
}

pub(crate) fn now_rfc3339() -> String {
    rfc3339_nanos(SystemTime::now())
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Builds `{"action":..,"parameters":..}` keeping the parameters' JSON text as given;
/// `parameters` is left out when `raw_params` is `None` (MODE treats it as optional).
pub(crate) fn command_payload(
    action: &str,
    raw_params: Option<&str>,
) -> Result<Bytes, CommandError> {
    if action.is_empty() {
        return Err(CommandError::InvalidInput(
            "action must not be empty".into(),
        ));
    }
    let action =
        serde_json::to_string(action).map_err(|e| CommandError::InvalidInput(e.to_string()))?;
    Ok(Bytes::from(match raw_params {
        Some(p) => format!("{{\"action\":{action},\"parameters\":{p}}}"),
        None => format!("{{\"action\":{action}}}"),
    }))
}

/// Validates an event payload: a JSON object with a string `eventType` and an optional object
/// `eventData`. Returns (eventType, eventData as an object).
pub(crate) fn parse_event(raw: &[u8]) -> Result<(String, Value, String), String> {
    let text = std::str::from_utf8(raw).map_err(|_| "payload is not UTF-8".to_string())?;
    let v: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(mut obj) = v else {
        return Err("payload must be a JSON object".into());
    };
    let event_type = match obj.remove("eventType") {
        Some(Value::String(s)) if !s.is_empty() => s,
        Some(Value::String(_)) => return Err("eventType must not be empty".into()),
        Some(_) => return Err("eventType must be a string".into()),
        None => return Err("eventType is missing".into()),
    };
    let data = match obj.remove("eventData") {
        None => Value::Object(Default::default()),
        Some(v @ Value::Object(_)) => v,
        Some(_) => return Err("eventData must be a JSON object".into()),
    };
    Ok((event_type, data, text.to_string()))
}

/// Parses a device's MQTT kv publish: `{"action":"set","key":k,"value":v}` or
/// `{"action":"delete","key":k}` (extra fields such as `rev` are ignored).
pub(crate) fn parse_kv_publish(raw: &[u8]) -> Result<KvOp, String> {
    let v: Value = serde_json::from_slice(raw).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(mut obj) = v else {
        return Err("payload must be a JSON object".into());
    };
    let key = match obj.remove("key") {
        Some(Value::String(k)) => k,
        _ => return Err("key must be a string".into()),
    };
    match obj.get("action").and_then(Value::as_str) {
        Some("set") => match obj.remove("value") {
            Some(v) => Ok(KvOp::Set(key, v)),
            None => Err("set without value".into()),
        },
        Some("delete") => Ok(KvOp::Delete(key)),
        _ => Err("action must be \"set\" or \"delete\"".into()),
    }
}

/// Slides the one-minute window; Ok when the message fits, Err(retry-after seconds) if not.
fn rate_check(window: &mut VecDeque<Instant>, limit: Option<u32>, now: Instant) -> Result<(), u32> {
    let Some(limit) = limit else {
        return Ok(());
    };
    const MINUTE: Duration = Duration::from_secs(60);
    while let Some(front) = window.front() {
        if now.duration_since(*front) >= MINUTE {
            window.pop_front();
        } else {
            break;
        }
    }
    if (window.len() as u64) < u64::from(limit) {
        window.push_back(now);
        return Ok(());
    }
    let wait = window
        .front()
        .map(|f| MINUTE.saturating_sub(now.duration_since(*f)))
        .unwrap_or(MINUTE);
    Err(wait.as_secs_f64().ceil().max(1.0) as u32)
}

/// Sends to every matching connection; connections whose queue is full or closed are dropped.
fn push_to(
    device: &mut Device,
    stats: &mut Stats,
    push: &Push,
    filter: impl Fn(u64, &Conn) -> bool,
) -> usize {
    let mut delivered = 0;
    let mut dead = Vec::new();
    for (id, conn) in device.conns.iter() {
        if !filter(*id, conn) {
            continue;
        }
        match conn.tx.try_send(push.clone()) {
            Ok(()) => delivered += 1,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(
                    device = device.id,
                    "emulator: outgoing queue full, dropping connection"
                );
                stats.sessions_dropped_overflow += 1;
                dead.push(*id);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => dead.push(*id),
        }
    }
    let removed = !dead.is_empty();
    for id in dead {
        if let Some(c) = device.conns.remove(&id) {
            c.cancel.cancel();
        }
    }
    if removed && device.conns.is_empty() {
        device.last_disconnect_time = Some(now_rfc3339());
    }
    delivered
}

fn kv_push_set(rev: u64, key: &str, value: &Value) -> Bytes {
    Bytes::from(json!({"action": "set", "rev": rev, "key": key, "value": value}).to_string())
}

fn kv_push_delete(rev: u64, key: &str) -> Bytes {
    Bytes::from(json!({"action": "delete", "rev": rev, "key": key}).to_string())
}

impl State {
    pub(crate) fn new(
        seed: &Seed,
        behaviour: Behaviour,
        events_tx: broadcast::Sender<RecordedEvent>,
        event_seq: watch::Sender<u64>,
    ) -> State {
        let now = now_rfc3339();
        let homes = seed
            .home
            .iter()
            .map(|h| {
                (
                    h.id,
                    Home {
                        id: h.id,
                        name: h.name.clone(),
                        deactivated: h.deactivated,
                        creation_time: now.clone(),
                    },
                )
            })
            .collect();
        let mut keys = HashMap::new();
        let mut devices = BTreeMap::new();
        for d in &seed.device {
            keys.insert(d.api_key.clone(), Principal::Device(d.id));
            let mut kv = BTreeMap::new();
            let mut rev = 0;
            for (k, v) in &d.kv {
                rev += 1;
                kv.insert(
                    k.clone(),
                    KvItem {
                        value: v.clone(),
                        modification_time: now.clone(),
                    },
                );
            }
            devices.insert(
                d.id,
                Device {
                    id: d.id,
                    api_key: d.api_key.clone(),
                    home_id: d.home_id,
                    name: d.name.clone().unwrap_or_else(|| format!("device-{}", d.id)),
                    tag: d.tag.clone().unwrap_or_default(),
                    device_class: d.device_class.clone().unwrap_or_else(|| "generic".into()),
                    creation_time: now.clone(),
                    kv_rev: rev,
                    kv,
                    conns: BTreeMap::new(),
                    connect_count: 0,
                    last_connect_time: None,
                    last_disconnect_time: None,
                    window: VecDeque::new(),
                },
            );
        }
        for p in &seed.project_key {
            keys.insert(
                p.key.clone(),
                Principal::Project {
                    admin: p.permissions.contains(&Permission::Admin),
                    commands: p.permissions.contains(&Permission::Commands),
                    kv_write: p.permissions.contains(&Permission::KvWrite),
                },
            );
        }
        for (i, u) in seed.user.iter().enumerate() {
            keys.insert(
                u.key.clone(),
                Principal::User {
                    user_id: u.id.unwrap_or(i as u64 + 1),
                    home_ids: u.home_ids.clone(),
                },
            );
        }
        State {
            project_id: seed.project_id,
            homes,
            devices,
            keys,
            events: VecDeque::new(),
            dropped: VecDeque::new(),
            next_event_seq: 0,
            next_conn_id: 0,
            stats: Stats::default(),
            faults: Faults::default(),
            behaviour,
            offline: false,
            project_window: VecDeque::new(),
            events_tx,
            event_seq,
        }
    }

    // ---- keys and permissions --------------------------------------------------------------

    pub(crate) fn principal(&self, key: &str) -> Option<Principal> {
        self.keys.get(key).cloned()
    }

    pub(crate) fn can_read_device(&self, p: &Principal, device: &Device) -> bool {
        match p {
            Principal::Device(id) => *id == device.id,
            Principal::Project { .. } => true,
            Principal::User { .. } => p.member_of(device.home_id),
        }
    }

    pub(crate) fn can_write_kv(&self, p: &Principal, device: &Device) -> bool {
        match p {
            Principal::Device(id) => *id == device.id,
            Principal::Project { kv_write, .. } => *kv_write,
            Principal::User { .. } => p.member_of(device.home_id),
        }
    }

    pub(crate) fn can_command(&self, p: &Principal, device: &Device) -> bool {
        match p {
            Principal::Device(_) => false,
            Principal::Project { commands, .. } => *commands,
            Principal::User { .. } => p.member_of(device.home_id),
        }
    }

    pub(crate) fn can_read_home(&self, p: &Principal, home_id: u64) -> bool {
        match p {
            Principal::Device(id) => {
                self.behaviour.device_key_can_read_home
                    && self
                        .devices
                        .get(id)
                        .is_some_and(|d| d.home_id == Some(home_id))
            }
            Principal::Project { .. } => true,
            Principal::User { .. } => p.member_of(Some(home_id)),
        }
    }

    pub(crate) fn device_home_deactivated(&self, device_id: u64) -> bool {
        self.devices
            .get(&device_id)
            .and_then(|d| d.home_id)
            .is_some_and(|h| self.home_deactivated(h))
    }

    pub(crate) fn home_deactivated(&self, home_id: u64) -> bool {
        self.homes.get(&home_id).is_some_and(|h| h.deactivated)
    }

    pub(crate) fn set_home_deactivated(&mut self, home_id: u64, deactivated: bool) -> bool {
        match self.homes.get_mut(&home_id) {
            Some(h) => {
                if h.deactivated != deactivated {
                    tracing::info!(home = home_id, deactivated, "emulator: home state changed");
                }
                h.deactivated = deactivated;
                true
            }
            None => false,
        }
    }

    pub(crate) fn set_rate_limit(&mut self, per_minute: Option<u32>) {
        self.behaviour.rate_limit_per_minute = per_minute;
        for d in self.devices.values_mut() {
            d.window.clear();
        }
    }

    // ---- connections -----------------------------------------------------------------------

    pub(crate) fn is_offline(&self) -> bool {
        self.offline
    }

    pub(crate) fn set_offline(&mut self, offline: bool) {
        self.offline = offline;
        if offline {
            self.kill_all_connections(true);
        }
    }

    /// Checks the MQTT credentials (username = decimal device ID, password = its key).
    pub(crate) fn check_device_credentials(&self, username: &str, password: &str) -> Option<u64> {
        let id: u64 = username.parse().ok()?;
        if username != id.to_string() {
            return None;
        }
        let d = self.devices.get(&id)?;
        (d.api_key == password).then_some(id)
    }

    /// Registers a connection of a device (counted against the per-device limit).
    pub(crate) fn register_conn(
        &mut self,
        device_id: u64,
        kind: ConnKind,
        parent: &CancellationToken,
    ) -> Result<NewConn, ConnRefusal> {
        if self.offline {
            return Err(ConnRefusal::Offline);
        }
        let max = self.behaviour.max_connections_per_device;
        let queue = self.behaviour.session_queue.max(1);
        let Some(device) = self.devices.get_mut(&device_id) else {
            return Err(ConnRefusal::BadCredentials);
        };
        if device.conns.len() >= max {
            return Err(ConnRefusal::TooMany);
        }
        self.next_conn_id += 1;
        let conn_id = self.next_conn_id;
        let (tx, rx) = mpsc::channel(queue);
        let cancel = parent.child_token();
        device.conns.insert(
            conn_id,
            Conn {
                kind,
                tx,
                cancel: cancel.clone(),
                sub_command: kind == ConnKind::WebSocket,
                sub_kv: false,
            },
        );
        device.connect_count += 1;
        device.last_connect_time = Some(now_rfc3339());
        device.last_disconnect_time = None;
        match kind {
            ConnKind::Mqtt => self.stats.mqtt_connects_accepted += 1,
            ConnKind::WebSocket => self.stats.ws_connects_accepted += 1,
        }
        Ok(NewConn {
            conn_id,
            rx,
            cancel,
        })
    }

    pub(crate) fn unregister_conn(&mut self, device_id: u64, conn_id: u64) {
        if let Some(d) = self.devices.get_mut(&device_id) {
            if d.conns.remove(&conn_id).is_some() && d.conns.is_empty() {
                d.last_disconnect_time = Some(now_rfc3339());
            }
        }
    }

    fn kill_where(&mut self, device: Option<u64>, count: bool) {
        let now = now_rfc3339();
        for d in self.devices.values_mut() {
            if device.is_some_and(|id| id != d.id) || d.conns.is_empty() {
                continue;
            }
            for (_, c) in std::mem::take(&mut d.conns) {
                c.cancel.cancel();
                if count {
                    self.stats.sessions_dropped_control += 1;
                }
            }
            d.last_disconnect_time = Some(now.clone());
        }
    }

    pub(crate) fn kill_all_connections(&mut self, count: bool) {
        self.kill_where(None, count);
    }

    pub(crate) fn kill_device_connections(&mut self, device_id: u64) {
        self.kill_where(Some(device_id), true);
    }

    pub(crate) fn conn_alive(&self, device_id: u64, conn_id: u64) -> bool {
        self.devices
            .get(&device_id)
            .is_some_and(|d| d.conns.contains_key(&conn_id))
    }

    pub(crate) fn connection_count(&self, device_id: u64) -> usize {
        self.devices.get(&device_id).map_or(0, |d| d.conns.len())
    }

    pub(crate) fn connect_count(&self, device_id: u64) -> u64 {
        self.devices.get(&device_id).map_or(0, |d| d.connect_count)
    }

    pub(crate) fn device_statuses(&self) -> Vec<DeviceStatus> {
        self.devices
            .values()
            .map(|d| DeviceStatus {
                id: d.id,
                home_id: d.home_id,
                connected: !d.conns.is_empty(),
                mqtt_sessions: d
                    .conns
                    .values()
                    .filter(|c| c.kind == ConnKind::Mqtt)
                    .count(),
                websockets: d
                    .conns
                    .values()
                    .filter(|c| c.kind == ConnKind::WebSocket)
                    .count(),
                connect_count: d.connect_count,
                kv_rev: d.kv_rev,
            })
            .collect()
    }

    /// Marks an MQTT connection as subscribed to its command topic.
    pub(crate) fn subscribe_command(&mut self, device_id: u64, conn_id: u64, on: bool) {
        if let Some(c) = self
            .devices
            .get_mut(&device_id)
            .and_then(|d| d.conns.get_mut(&conn_id))
        {
            c.sub_command = on;
        }
    }

    /// Marks an MQTT connection as subscribed to its kv topic and queues the full `reload`.
    pub(crate) fn subscribe_kv(&mut self, device_id: u64, conn_id: u64, on: bool) {
        let Some(device) = self.devices.get_mut(&device_id) else {
            return;
        };
        let Some(conn) = device.conns.get_mut(&conn_id) else {
            return;
        };
        conn.sub_kv = on;
        if !on {
            return;
        }
        let items: Vec<Value> = device
            .kv
            .iter()
            .map(|(k, it)| json!({"key": k, "value": it.value, "modificationTime": it.modification_time}))
            .collect();
        let reload = json!({
            "action": "reload",
            "rev": device.kv_rev,
            "numItems": items.len(),
            "items": items,
        });
        let push = Push::Kv(Bytes::from(reload.to_string()));
        push_to(device, &mut self.stats, &push, |id, _| id == conn_id);
    }

    // ---- events ----------------------------------------------------------------------------

    /// Takes an event from a device (rate limit, validation, home state, record).
    pub(crate) fn ingest_event(
        &mut self,
        device_id: u64,
        raw: &[u8],
        transport: Transport,
    ) -> EventOutcome {
        let limit = self.behaviour.rate_limit_per_minute;
        let project_limit = self.behaviour.project_rate_limit_per_minute;
        let Some(device) = self.devices.get_mut(&device_id) else {
            return EventOutcome::Invalid("unknown device".into());
        };
        let now = Instant::now();
        if let Err(secs) = rate_check(&mut device.window, limit, now)
            .and_then(|()| rate_check(&mut self.project_window, project_limit, now))
        {
            return EventOutcome::RateLimited(secs);
        }
        let home_id = device.home_id;
        let (event_type, event_data, raw) = match parse_event(raw) {
            Ok(v) => v,
            Err(e) => {
                self.stats.events_rejected_invalid += 1;
                tracing::debug!(device = device_id, "emulator: invalid event: {e}");
                return EventOutcome::Invalid(e);
            }
        };
        let deactivated = self.device_home_deactivated(device_id);
        if deactivated && self.behaviour.deactivated_home == DeactivatedHome::Refuse {
            self.stats.events_refused_deactivated += 1;
            return EventOutcome::RefusedDeactivated;
        }
        let ev = RecordedEvent {
            seq: if deactivated {
                0
            } else {
                self.next_event_seq + 1
            },
            device_id,
            home_id,
            event_type,
            event_data,
            raw,
            timestamp: now_rfc3339(),
            transport,
        };
        if deactivated {
            self.stats.events_dropped_deactivated += 1;
            if self.dropped.len() >= self.behaviour.max_recorded_events.max(1) {
                self.dropped.pop_front();
            }
            self.dropped.push_back(ev);
            return EventOutcome::DroppedDeactivated;
        }
        self.next_event_seq += 1;
        self.stats.events_accepted += 1;
        if self.events.len() >= self.behaviour.max_recorded_events.max(1) {
            self.events.pop_front();
            self.stats.events_evicted += 1;
        }
        let _ = self.events_tx.send(ev.clone());
        self.events.push_back(ev);
        self.event_seq.send_replace(self.next_event_seq);
        EventOutcome::Recorded
    }

    pub(crate) fn events(&self, device: Option<u64>) -> Vec<RecordedEvent> {
        self.events
            .iter()
            .filter(|e| device.is_none_or(|d| d == e.device_id))
            .cloned()
            .collect()
    }

    pub(crate) fn dropped_events(&self, device: u64) -> Vec<RecordedEvent> {
        self.dropped
            .iter()
            .filter(|e| e.device_id == device)
            .cloned()
            .collect()
    }

    pub(crate) fn clear_events(&mut self) {
        self.events.clear();
        self.dropped.clear();
    }

    // ---- commands --------------------------------------------------------------------------

    /// Delivers a command payload to every command subscriber of the device.
    pub(crate) fn send_command(
        &mut self,
        device_id: u64,
        payload: Bytes,
    ) -> Result<(), CommandError> {
        let deactivated = self.device_home_deactivated(device_id);
        let drop_all = self.faults.drop_commands;
        let Some(device) = self.devices.get_mut(&device_id) else {
            return Err(CommandError::UnknownDevice(device_id));
        };
        if deactivated {
            self.stats.commands_refused_deactivated += 1;
            return Err(CommandError::HomeDeactivated(device_id));
        }
        if device.conns.is_empty() {
            self.stats.commands_refused_offline += 1;
            return Err(CommandError::DeviceOffline(device_id));
        }
        self.stats.commands_accepted += 1;
        if drop_all {
            return Ok(());
        }
        let push = Push::Command(payload);
        let n = push_to(device, &mut self.stats, &push, |_, c| c.sub_command);
        self.stats.command_deliveries += n as u64;
        Ok(())
    }

    // ---- kv --------------------------------------------------------------------------------

    /// Applies a kv change. `origin`: the MQTT connection that published it (for the
    /// echo-to-self choice); `device_origin`: the write was made with the device's own key
    /// (counts against the rate limit).
    pub(crate) fn kv_write(
        &mut self,
        device_id: u64,
        op: KvOp,
        origin: Option<u64>,
        device_origin: bool,
    ) -> Result<u64, KvError> {
        let deactivated = self.device_home_deactivated(device_id);
        let limit = self.behaviour.rate_limit_per_minute;
        let project_limit = self.behaviour.project_rate_limit_per_minute;
        let echo = self.behaviour.kv_echo_to_self;
        let Some(device) = self.devices.get_mut(&device_id) else {
            return Err(KvError::UnknownDevice(device_id));
        };
        if device_origin {
            let now = Instant::now();
            if let Err(secs) = rate_check(&mut device.window, limit, now)
                .and_then(|()| rate_check(&mut self.project_window, project_limit, now))
            {
                return Err(KvError::RateLimited(secs));
            }
        }
        let key = match &op {
            KvOp::Set(k, _) | KvOp::Delete(k) => k.clone(),
        };
        if !valid_kv_key(&key) {
            self.stats.kv_writes_rejected_invalid += 1;
            return Err(KvError::InvalidKey(key));
        }
        if let KvOp::Set(_, Value::Null) = &op {
            self.stats.kv_writes_rejected_invalid += 1;
            return Err(KvError::InvalidValue("value must not be null".into()));
        }
        if deactivated {
            self.stats.kv_writes_refused_deactivated += 1;
            return Err(KvError::HomeDeactivated);
        }
        let payload = match op {
            KvOp::Set(k, v) => {
                device.kv_rev += 1;
                let p = kv_push_set(device.kv_rev, &k, &v);
                device.kv.insert(
                    k,
                    KvItem {
                        value: v,
                        modification_time: now_rfc3339(),
                    },
                );
                p
            }
            KvOp::Delete(k) => {
                if device.kv.remove(&k).is_none() {
                    return Err(KvError::KeyNotFound(k));
                }
                device.kv_rev += 1;
                kv_push_delete(device.kv_rev, &k)
            }
        };
        self.stats.kv_writes_applied += 1;
        let rev = device.kv_rev;
        let push = Push::Kv(payload);
        push_to(device, &mut self.stats, &push, |id, c| {
            c.sub_kv && (echo || Some(id) != origin)
        });
        Ok(rev)
    }

    pub(crate) fn kv_snapshot(&self, device_id: u64) -> (u64, Vec<(String, Value)>) {
        match self.devices.get(&device_id) {
            Some(d) => (
                d.kv_rev,
                d.kv.iter()
                    .map(|(k, v)| (k.clone(), v.value.clone()))
                    .collect(),
            ),
            None => (0, Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_nanos(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        assert_eq!(rfc3339_nanos(t), "2023-11-14T22:13:20.123456789Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339_nanos(t), "2000-02-29T00:00:00.000000000Z");
    }

    #[test]
    fn kv_keys() {
        for ok in ["a", "A1", "temp_c", "a-b", "9"] {
            assert!(valid_kv_key(ok), "{ok}");
        }
        for bad in ["", "_a", "a_", "-", "a b", "é", "a/b"] {
            assert!(!valid_kv_key(bad), "{bad}");
        }
    }

    #[test]
    fn events_are_validated() {
        assert!(parse_event(br#"{"eventType":"t"}"#).is_ok());
        assert!(parse_event(br#"{"eventType":"t","eventData":{"a":1}}"#).is_ok());
        assert!(parse_event(br#"{"eventType":"t","eventData":[1]}"#).is_err());
        assert!(parse_event(br#"{"eventData":{}}"#).is_err());
        assert!(parse_event(br#"[]"#).is_err());
        assert!(parse_event(b"\xff").is_err());
    }

    #[test]
    fn rate_window() {
        let mut w = VecDeque::new();
        let t0 = Instant::now();
        assert!(rate_check(&mut w, Some(2), t0).is_ok());
        assert!(rate_check(&mut w, Some(2), t0).is_ok());
        let retry = rate_check(&mut w, Some(2), t0 + Duration::from_secs(10)).unwrap_err();
        assert_eq!(retry, 50);
        assert!(rate_check(&mut w, Some(2), t0 + Duration::from_secs(61)).is_ok());
        assert!(rate_check(&mut w, None, t0).is_ok());
    }

    #[test]
    fn command_payload_keeps_raw_parameters() {
        let p = command_payload("go", Some(r#"{"n":12345678901234567890}"#)).unwrap();
        assert_eq!(
            &p[..],
            br#"{"action":"go","parameters":{"n":12345678901234567890}}"#
        );
        assert!(command_payload("", Some("{}")).is_err());
        assert_eq!(
            &command_payload("go", None).unwrap()[..],
            br#"{"action":"go"}"#
        );
    }
}
