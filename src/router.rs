//! The router: checks what local devices send and appends the good part to the outbox.
//!
//! Adapters (the MQTT front, serial ports) hand the router a device and a raw payload; the router
//! validates it (size, JSON shape, DDP key rules), records the capture time, and queues it in the
//! outbox, returning a waiter that resolves on commit — the adapter acknowledges the sensor only
//! then. Bad input is refused with a counted reason and a warning naming the device; it never
//! affects other devices. The router must not speak SQL, MQTT or MODE's wire format.

use crate::metrics::{Metrics, RejectReason};
pub use crate::outbox::CommitWaiter;
use crate::outbox::{Capture, Kind, NewRecord, Outbox};
use crate::registry::{DeviceId, SharedRegistry};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Why a message was refused.
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    #[error("{reason}: {detail}")]
    Invalid {
        reason: RejectReason,
        detail: String,
    },
    #[error("the outbox cannot take it: {0}")]
    Storage(String),
}

impl Rejected {
    fn invalid(reason: RejectReason, detail: impl Into<String>) -> Self {
        Rejected::Invalid {
            reason,
            detail: detail.into(),
        }
    }
    pub fn reason(&self) -> RejectReason {
        match self {
            Rejected::Invalid { reason, .. } => *reason,
            Rejected::Storage(_) => RejectReason::StorageUnavailable,
        }
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

#[derive(Deserialize)]
struct EventIn<'a> {
    #[serde(rename = "eventType", borrow)]
    event_type: Option<Cow<'a, str>>,
    #[serde(rename = "eventData", borrow)]
    event_data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct KvIn<'a> {
    #[serde(borrow)]
    action: Option<Cow<'a, str>>,
    #[serde(borrow)]
    key: Option<Cow<'a, str>>,
    #[serde(borrow)]
    value: Option<&'a RawValue>,
}

/// Longest accepted `eventType`.
const MAX_EVENT_TYPE: usize = 256;

/// Checks a DDP key against MODE's rule `^[A-Za-z0-9]([A-Za-z0-9_-]*[A-Za-z0-9])?$`.
pub fn valid_kv_key(key: &str, max_len: usize) -> bool {
    let b = key.as_bytes();
    !b.is_empty()
        && b.len() <= max_len
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'-')
}

/// Injectable capture clock, so tests can control capture times.
pub type Clock = Arc<dyn Fn() -> Capture + Send + Sync>;

/// The system clock, assumed synchronised.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        Capture::at(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0),
        )
    })
}

#[derive(Clone)]
pub struct Router {
    registry: Arc<SharedRegistry>,
    outbox: Outbox,
    metrics: Arc<Metrics>,
    max_payload: usize,
    max_key_len: usize,
    clock: Clock,
}

impl Router {
    pub fn new(
        registry: Arc<SharedRegistry>,
        outbox: Outbox,
        metrics: Arc<Metrics>,
        max_payload: usize,
        clock: Clock,
    ) -> Router {
        Router {
            registry,
            outbox,
            metrics,
            max_payload,
            max_key_len: 128,
            clock,
        }
    }

    /// Longest accepted DDP key (`hub.kv_max_key_len`).
    pub fn with_max_key_len(mut self, n: usize) -> Router {
        self.max_key_len = n;
        self
    }

    pub fn registry(&self) -> &Arc<SharedRegistry> {
        &self.registry
    }

    /// MODE device ID of a slot (a retired slot keeps the identity it was accepted under).
    fn mode_id(&self, dev: DeviceId) -> u64 {
        self.registry.load().get(dev).mode_id.get()
    }

    fn refuse(&self, dev: DeviceId, r: Rejected) -> Rejected {
        self.metrics.reject(r.reason());
        tracing::warn!(device = %self.registry.load().get(dev).name, reason = %r.reason(), detail = %r, "dropped a message from a local device");
        r
    }

    /// Validates an event payload `{"eventType": s, "eventData": {...}}` and queues it.
    pub async fn event(&self, dev: DeviceId, payload: &[u8]) -> Result<CommitWaiter, Rejected> {
        let rec = self
            .parse_event(dev, payload)
            .map_err(|r| self.refuse(dev, r))?;
        self.submit(dev, rec).await
    }

    /// Validates a DDP change `{"action":"set","key":k,"value":v}` / `{"action":"delete","key":k}`.
    pub async fn kv(&self, dev: DeviceId, payload: &[u8]) -> Result<CommitWaiter, Rejected> {
        let rec = self
            .parse_kv(dev, payload)
            .map_err(|r| self.refuse(dev, r))?;
        self.submit(dev, rec).await
    }

    async fn submit(&self, dev: DeviceId, rec: NewRecord) -> Result<CommitWaiter, Rejected> {
        match self.outbox.submit(rec).await {
            Ok(w) => {
                self.metrics
                    .accepted
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.metrics
                    .activity
                    .record(self.mode_id(dev), crate::timing::now_ms());
                Ok(w)
            }
            Err(e) => Err(self.refuse(dev, Rejected::Storage(e.to_string()))),
        }
    }

    fn check_size(&self, payload: &[u8]) -> Result<(), Rejected> {
        if payload.len() > self.max_payload {
            return Err(Rejected::invalid(
                RejectReason::TooLarge,
                format!(
                    "{} bytes is over hub.max_payload_bytes = {}",
                    payload.len(),
                    self.max_payload
                ),
            ));
        }
        Ok(())
    }

    fn parse_event(&self, dev: DeviceId, payload: &[u8]) -> Result<NewRecord, Rejected> {
        self.check_size(payload)?;
        let ev: EventIn = parse_object(payload)?;
        let event_type = ev.event_type.filter(|t| !t.is_empty()).ok_or_else(|| {
            Rejected::invalid(
                RejectReason::MissingEventType,
                "an event needs a non-empty string \"eventType\"",
            )
        })?;
        if event_type.len() > MAX_EVENT_TYPE {
            return Err(Rejected::invalid(
                RejectReason::MissingEventType,
                format!("eventType is longer than {MAX_EVENT_TYPE} bytes"),
            ));
        }
        let body = match ev.event_data {
            None => "{}".to_string(),
            Some(raw) if raw.get().starts_with('{') => raw.get().to_string(),
            Some(_) => {
                return Err(Rejected::invalid(
                    RejectReason::EventDataNotObject,
                    "\"eventData\" must be a JSON object",
                ))
            }
        };
        Ok(NewRecord {
            device: self.mode_id(dev),
            kind: Kind::Event,
            key: event_type.into_owned(),
            body,
            captured: (self.clock)(),
        })
    }

    fn parse_kv(&self, dev: DeviceId, payload: &[u8]) -> Result<NewRecord, Rejected> {
        self.check_size(payload)?;
        let kv: KvIn = parse_object(payload)?;
        let key = kv.key.unwrap_or_default();
        if !valid_kv_key(&key, self.max_key_len) {
            return Err(Rejected::invalid(
                RejectReason::InvalidKvKey,
                format!(
                    "key {key:?} must be 1-{} letters, digits, '_' or '-', starting and ending with a letter or digit",
                    self.max_key_len
                ),
            ));
        }
        let (kind, body) = match (kv.action.as_deref(), kv.value) {
            (Some("set"), Some(v)) => (Kind::KvSet, v.get().to_string()),
            (Some("set"), None) => {
                return Err(Rejected::invalid(
                    RejectReason::InvalidKvAction,
                    "a \"set\" needs a \"value\"",
                ))
            }
            (Some("delete"), _) => (Kind::KvDelete, String::new()),
            (other, _) => {
                return Err(Rejected::invalid(
                    RejectReason::InvalidKvAction,
                    format!("action {other:?} is not \"set\" or \"delete\""),
                ))
            }
        };
        Ok(NewRecord {
            device: self.mode_id(dev),
            kind,
            key: key.into_owned(),
            body,
            captured: (self.clock)(),
        })
    }
}

fn parse_object<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, Rejected> {
    let text = std::str::from_utf8(payload)
        .map_err(|_| Rejected::invalid(RejectReason::NotJson, "payload is not UTF-8"))?;
    if !text.trim_start().starts_with('{') {
        return Err(Rejected::invalid(
            RejectReason::NotAnObject,
            "payload must be a JSON object",
        ));
    }
    // Numbers a double cannot hold (`1e999999`) are refused here, counted, rather than stored
    // and lost at MODE, which cannot parse them: one pass that allocates nothing.
    serde_json::from_str::<FiniteJson>(text).map_err(|e| {
        Rejected::invalid(
            RejectReason::NotJson,
            format!("{e} (numbers must fit a 64-bit float: no infinities)"),
        )
    })?;
    serde_json::from_str(text).map_err(|e| Rejected::invalid(RejectReason::NotJson, e.to_string()))
}

/// Any JSON value whose numbers are all finite doubles; keeps nothing.
struct FiniteJson;

impl<'de> Deserialize<'de> for FiniteJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FiniteJson)
    }
}

impl<'de> serde::de::Visitor<'de> for FiniteJson {
    type Value = FiniteJson;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value with finite numbers")
    }
    fn visit_bool<E>(self, _: bool) -> Result<FiniteJson, E> {
        Ok(FiniteJson)
    }
    fn visit_i64<E>(self, _: i64) -> Result<FiniteJson, E> {
        Ok(FiniteJson)
    }
    fn visit_u64<E>(self, _: u64) -> Result<FiniteJson, E> {
        Ok(FiniteJson)
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<FiniteJson, E> {
        if v.is_finite() {
            Ok(FiniteJson)
        } else {
            Err(E::custom("number out of range"))
        }
    }
    fn visit_str<E>(self, _: &str) -> Result<FiniteJson, E> {
        Ok(FiniteJson)
    }
    fn visit_unit<E>(self) -> Result<FiniteJson, E> {
        Ok(FiniteJson)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<FiniteJson, A::Error> {
        while seq.next_element::<FiniteJson>()?.is_some() {}
        Ok(FiniteJson)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<FiniteJson, A::Error> {
        while map
            .next_entry::<serde::de::IgnoredAny, FiniteJson>()?
            .is_some()
        {}
        Ok(FiniteJson)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_json_cannot_carry_are_refused() {
        #[derive(Deserialize)]
        struct Any {}
        for bad in [
            r#"{"eventType":"x","eventData":{"a":1e999999}}"#,
            r#"{"eventType":"x","eventData":{"a":[1,{"b":-1e400}]}}"#,
            r#"{"action":"set","key":"k","value":1E309}"#,
        ] {
            let r = parse_object::<Any>(bad.as_bytes()).map(|_| ()).unwrap_err();
            assert_eq!(r.reason(), RejectReason::NotJson, "{bad}");
            assert!(r.to_string().contains("out of range"), "{r}");
        }
        for ok in [
            r#"{"eventType":"x","eventData":{"a":1e308,"b":-0.0,"c":123456789012345678901234567890}}"#,
            r#"{"eventType":"x","eventData":{"s":"1e999999","n":null,"t":true,"l":[]}}"#,
        ] {
            assert!(parse_object::<Any>(ok.as_bytes()).is_ok(), "{ok}");
        }
    }

    #[test]
    fn kv_key_rule() {
        for ok in ["a", "a1", "A-b_c9", "0"] {
            assert!(valid_kv_key(ok, 128), "{ok}");
        }
        for bad in ["", "-a", "a-", "_", "a b", "a/b", "ü", &"a".repeat(129)] {
            assert!(!valid_kv_key(bad, 128), "{bad}");
        }
    }
}
