//! Counters the hub keeps about itself: what came in, what went out, what was dropped and why.
//!
//! Plain atomics, cheap enough for the hot path; `ops` renders them for Prometheus and status.
//! This module must not log, allocate per message, or know about transports.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a local message was refused. The label is the Prometheus `reason` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    TooLarge = 0,
    NotJson,
    NotAnObject,
    MissingEventType,
    EventDataNotObject,
    InvalidKvKey,
    InvalidKvAction,
    UnknownDevice,
    NotOwnTopic,
    AuthFailed,
    StorageUnavailable,
}

impl RejectReason {
    pub const ALL: [RejectReason; 11] = [
        RejectReason::TooLarge,
        RejectReason::NotJson,
        RejectReason::NotAnObject,
        RejectReason::MissingEventType,
        RejectReason::EventDataNotObject,
        RejectReason::InvalidKvKey,
        RejectReason::InvalidKvAction,
        RejectReason::UnknownDevice,
        RejectReason::NotOwnTopic,
        RejectReason::AuthFailed,
        RejectReason::StorageUnavailable,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RejectReason::TooLarge => "too_large",
            RejectReason::NotJson => "not_json",
            RejectReason::NotAnObject => "not_an_object",
            RejectReason::MissingEventType => "missing_event_type",
            RejectReason::EventDataNotObject => "event_data_not_object",
            RejectReason::InvalidKvKey => "invalid_kv_key",
            RejectReason::InvalidKvAction => "invalid_kv_action",
            RejectReason::UnknownDevice => "unknown_device",
            RejectReason::NotOwnTopic => "not_own_topic",
            RejectReason::AuthFailed => "auth_failed",
            RejectReason::StorageUnavailable => "storage_unavailable",
        }
    }
}

/// Hub-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Local messages accepted into the outbox.
    pub accepted: AtomicU64,
    /// Messages MODE acknowledged.
    pub delivered: AtomicU64,
    rejected: [AtomicU64; 11],
    /// Upstream (re)connect attempts and successes.
    pub upstream_connects: AtomicU64,
    /// Messages MODE had acknowledged and then was found to have dropped (their home turned
    /// out to be deactivated), put back in the outbox to be sent again.
    pub requeued_deactivated: AtomicU64,
    pub upstream_connect_failures: AtomicU64,
    /// Local MQTT connections accepted after authentication.
    pub local_connections: AtomicU64,
    /// Commands received from MODE and delivered down.
    pub commands_received: AtomicU64,
    /// Serial adapters' counters (all ports).
    pub serial: SerialStats,
    /// The way down (commands and DDP from MODE to local devices).
    pub down: DownStats,
    /// Per device: accepted messages a minute over the last hour, and the last one's time.
    pub activity: Activity,
    /// What the local MQTT front refused or slowed down (see docs/local-mqtt.md).
    pub front: FrontStats,
}

/// Per-device activity for the status page: a ring of 60 one-minute counts and the time of the
/// last accepted message, keyed by MODE id. One short lock per accepted message; a device's
/// entry is allocated once, on its first message.
#[derive(Debug, Default)]
pub struct Activity {
    devices: std::sync::Mutex<std::collections::HashMap<u64, DeviceActivity>>,
}

/// One device's [`Activity`].
#[derive(Debug, Clone, Copy)]
pub struct DeviceActivity {
    /// (unix minute, count) per slot `minute % 60`.
    minutes: [(i64, u32); 60],
    /// Unix ms of the last accepted message.
    pub last_ms: i64,
}

impl Activity {
    /// Counts one accepted message of device `mode_id` at unix ms `now_ms`.
    pub fn record(&self, mode_id: u64, now_ms: i64) {
        let minute = now_ms.div_euclid(60_000);
        let mut map = self.devices.lock().expect("activity lock");
        let d = map.entry(mode_id).or_insert(DeviceActivity {
            minutes: [(i64::MIN, 0); 60],
            last_ms: now_ms,
        });
        let slot = &mut d.minutes[minute.rem_euclid(60) as usize];
        if slot.0 != minute {
            *slot = (minute, 0);
        }
        slot.1 = slot.1.saturating_add(1);
        d.last_ms = now_ms;
    }

    /// Messages per minute of `mode_id` for the 60 minutes up to `now_ms`, oldest first, and
    /// the time of its last message (`None` if it sent nothing since the hub started).
    pub fn last_hour(&self, mode_id: u64, now_ms: i64) -> (Vec<u32>, Option<i64>) {
        let now = now_ms.div_euclid(60_000);
        let map = self.devices.lock().expect("activity lock");
        let Some(d) = map.get(&mode_id) else {
            return (vec![0; 60], None);
        };
        let counts = (now - 59..=now)
            .map(|m| {
                let (at, n) = d.minutes[m.rem_euclid(60) as usize];
                if at == m {
                    n
                } else {
                    0
                }
            })
            .collect();
        (counts, Some(d.last_ms))
    }
}

/// Counters of the local MQTT front.
#[derive(Debug, Default)]
pub struct FrontStats {
    /// Connections closed because they did not log in in time.
    pub connect_timeouts: AtomicU64,
    /// Not-logged-in connections closed to make room for a new one.
    pub evicted: AtomicU64,
    /// Connections refused because every slot held a logged-in device.
    pub refused_full: AtomicU64,
    /// Failed logins answered after a delay.
    pub delayed_logins: AtomicU64,
    /// PUBLISHes acknowledged and dropped (topic not allowed, QoS 2).
    pub denied_publishes: AtomicU64,
    /// QoS 1 PUBLISHes dropped as retransmissions: their packet id's PUBACK was still owed.
    pub retransmits: AtomicU64,
    /// Connections taken over by a new one with the same device and client id.
    pub taken_over: AtomicU64,
    /// CONNECTs of a protocol other than MQTT 3.1.1.
    pub bad_protocol: AtomicU64,
}

/// Counters of the downlink.
#[derive(Debug, Default)]
pub struct DownStats {
    /// Commands handed to a listening local device.
    pub commands_delivered: AtomicU64,
    /// Commands stored because the device was not listening.
    pub commands_queued: AtomicU64,
    /// Stored commands dropped (oldest first) over `hub.max_pending_commands`.
    pub commands_dropped: AtomicU64,
    /// Stored commands discarded after `hub.command_ttl_secs`.
    pub commands_expired: AtomicU64,
    /// Commands that could not be handed over (local broker refused, serial queue full).
    pub commands_lost: AtomicU64,
    /// DDP messages from MODE applied to the mirror / ignored by the revision rule / malformed.
    pub kv_applied: AtomicU64,
    pub kv_ignored: AtomicU64,
    pub kv_invalid: AtomicU64,
    /// `reload`s served to local devices from the mirror.
    pub kv_reloads_served: AtomicU64,
    /// Messages for a device dropped because its downlink queue was full (its path is stuck).
    pub queue_full: AtomicU64,
}

impl Metrics {
    pub fn reject(&self, r: RejectReason) {
        self.rejected[r as usize].fetch_add(1, Relaxed);
    }
    pub fn rejected(&self, r: RejectReason) -> u64 {
        self.rejected[r as usize].load(Relaxed)
    }
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().map(|c| c.load(Relaxed)).sum()
    }
}

/// Serial counters, hub-wide (all ports). Rendered by ops as `modehub_serial_*`; the serial
/// adapter counts into it.
#[derive(Debug, Default)]
pub struct SerialStats {
    /// Lines the router accepted (events and kv changes).
    pub lines_ok: AtomicU64,
    /// Lines dropped, by reason.
    pub bad_utf8: AtomicU64,
    pub too_long: AtomicU64,
    pub bad_checksum: AtomicU64,
    pub missing_checksum: AtomicU64,
    pub parse_error: AtomicU64,
    pub unknown_device: AtomicU64,
    /// Refused by the router (counted there too, by its reason).
    pub rejected: AtomicU64,
    /// Resends of a number already committed or in flight (answered, not stored again).
    pub duplicate: AtomicU64,
    /// Lines or acks dropped because a port's write queue was full (a sensor not reading).
    pub write_queue_full: AtomicU64,
    /// Downlink messages that could not be turned into lines.
    pub down_bad_payload: AtomicU64,
    /// Downlink messages dequeued but not written because the port was lost.
    pub write_failed: AtomicU64,
    /// Lines written to ports (acks, commands, DDP).
    pub lines_written: AtomicU64,
    pub acks_ok: AtomicU64,
    pub acks_err: AtomicU64,
    pub port_opens: AtomicU64,
    pub port_open_failures: AtomicU64,
    pub port_lost: AtomicU64,
    /// Ports open right now.
    pub ports_open: AtomicU64,
}

impl SerialStats {
    /// `(reason, count)` of every dropped-line reason, for rendering.
    pub fn dropped(&self) -> [(&'static str, u64); 9] {
        [
            ("bad_utf8", self.bad_utf8.load(Relaxed)),
            ("too_long", self.too_long.load(Relaxed)),
            ("bad_checksum", self.bad_checksum.load(Relaxed)),
            ("missing_checksum", self.missing_checksum.load(Relaxed)),
            ("parse_error", self.parse_error.load(Relaxed)),
            ("unknown_device", self.unknown_device.load(Relaxed)),
            ("rejected", self.rejected.load(Relaxed)),
            ("duplicate", self.duplicate.load(Relaxed)),
            ("write_queue_full", self.write_queue_full.load(Relaxed)),
        ]
    }
}
