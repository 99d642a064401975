//! The messages that cross layers, in one neutral place: what the adapters tell the downlink
//! (presence), what goes down to a device, the device slot id and MODE's device id, and the rows
//! and DDP changes that the router, the outbox and MODE's wire module pass along. Every layer may
//! import this module; it imports none of them. It must not hold behaviour beyond small
//! constructors and conversions.

use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A device's slot in the registry (an index into its per-device tables). Stable across
/// reloads: a slot is never reused. Not MODE's device ID (that is [`ModeId`], the `mode_id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub usize);

impl DeviceId {
    /// The slot as an index into per-device tables.
    pub fn index(self) -> usize {
        self.0
    }
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Per-device tables are indexed by slot.
impl<T> std::ops::Index<DeviceId> for Vec<T> {
    type Output = T;
    fn index(&self, id: DeviceId) -> &T {
        &self[id.0]
    }
}

impl<T> std::ops::IndexMut<DeviceId> for Vec<T> {
    fn index_mut(&mut self, id: DeviceId) -> &mut T {
        &mut self[id.0]
    }
}

/// A device's ID at MODE (the config's `mode_id`): what the hub logs in as and what MODE's
/// topics and URLs name. Not the local slot (that is [`DeviceId`]). Serialized, shown and parsed
/// as the bare decimal number, so config, JSON and logs read the same as a plain `u64`.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct ModeId(pub u64);

impl ModeId {
    /// The number MODE knows the device by.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for ModeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Debug shows the bare number too, so `Debug` output of configs and rows stays as it was.
impl std::fmt::Debug for ModeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for ModeId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<ModeId, Self::Err> {
        s.parse().map(ModeId)
    }
}

impl From<u64> for ModeId {
    fn from(id: u64) -> ModeId {
        ModeId(id)
    }
}

impl From<ModeId> for u64 {
    fn from(id: ModeId) -> u64 {
        id.0
    }
}

/// What a topic under `/devices/{x}/...` is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    Event,
    Kv,
    Command,
    /// Any other sub-topic of the device's own namespace.
    Other,
}

/// Identifies one local connection (an MQTT client or an open serial port).
pub type ConnId = u64;

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// A new, unique connection id.
pub fn next_conn_id() -> ConnId {
    NEXT_CONN.fetch_add(1, Relaxed)
}

/// What adapters tell the downlink about local devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalEvent {
    Connected(DeviceId, ConnId),
    Disconnected(DeviceId, ConnId),
    /// The connection's subscription to the device's command or kv topic is active.
    Subscribed(DeviceId, ConnId, TopicKind),
}

/// What goes down to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownKind {
    /// `{"action": ..., "parameters": {...}}`, MODE's JSON unchanged.
    Command,
    /// A DDP message `{"action":"reload"|"set"|"delete", "rev": ..., ...}` (MODE's JSON).
    Kv,
}

/// A message for one device, handed to the adapter that owns it.
#[derive(Debug, Clone)]
pub struct DownMsg {
    pub dev: DeviceId,
    pub kind: DownKind,
    pub payload: Bytes,
}

/// What a row carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Event = 0,
    KvSet = 1,
    KvDelete = 2,
}

impl Kind {
    pub(crate) fn from_i64(v: i64) -> Kind {
        match v {
            1 => Kind::KvSet,
            2 => Kind::KvDelete,
            _ => Kind::Event,
        }
    }
}

/// When a message was captured. A Pi has no real-time clock: until the system clock is
/// synchronised, `wall_ms` is a guess and `(boot_id, mono_ms)` is what can be trusted; the wall
/// time of such rows is repaired later with [`crate::outbox::Outbox::repair_capture`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capture {
    /// Wall clock, Unix milliseconds.
    pub wall_ms: i64,
    /// Whether the wall clock was known to be synchronised at capture.
    pub synced: bool,
    /// Identifies the boot (a hash of the kernel's boot id); 0 = unknown.
    pub boot_id: i64,
    /// Monotonic time since boot (CLOCK_BOOTTIME), milliseconds.
    pub mono_ms: i64,
}

impl Capture {
    /// A capture at a known wall time (tests, tools).
    pub fn at(wall_ms: i64) -> Capture {
        Capture {
            wall_ms,
            synced: true,
            boot_id: 0,
            mono_ms: 0,
        }
    }
}

/// A stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub id: i64,
    pub device: u64,
    pub kind: Kind,
    pub key: String,
    pub body: String,
    /// Per-device sequence number, monotonic across restarts.
    pub dev_seq: u64,
    pub captured: Capture,
}

/// A DDP change from MODE, already parsed (the wire format lives in `mode`).
#[derive(Debug, Clone, PartialEq)]
pub enum KvChange {
    /// Replace the whole store: always applied, whatever its rev (MODE sends one on every kv
    /// subscription and it is the truth). `rev` is `None` when the transport has no revisions
    /// (REST).
    Reload {
        rev: Option<i64>,
        /// (key, raw JSON value)
        items: Vec<(String, String)>,
    },
    Set {
        rev: i64,
        key: String,
        value: String,
    },
    Delete {
        rev: i64,
        key: String,
    },
}

/// What the hub serves a local device as its store: the mirror plus local changes MODE has not
/// acknowledged yet.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KvSnapshot {
    /// Whether MODE's store was ever loaded into the mirror.
    pub loaded: bool,
    pub rev: i64,
    /// (key, raw JSON value), sorted by key.
    pub items: Vec<(String, String)>,
}

#[cfg(test)]
mod mode_id_tests {
    use super::ModeId;

    #[test]
    fn mode_id_reads_and_prints_as_the_bare_number() {
        let id: ModeId = "1234".parse().unwrap();
        assert_eq!(id, ModeId(1234));
        assert_eq!(id.to_string(), "1234");
        assert_eq!(format!("{id:?}"), "1234");
        assert_eq!(serde_json::to_string(&id).unwrap(), "1234");
        assert_eq!(serde_json::from_str::<ModeId>("1234").unwrap(), id);
        assert!("x1".parse::<ModeId>().is_err());
        assert!(serde_json::from_str::<ModeId>("\"1234\"").is_err());
    }
}
