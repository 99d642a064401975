//! MODE's wire format: topics, payloads, and the device MQTT session.
//!
//! Everything the hub knows about how MODE spells things lives here (see
//! `../shared/mode-api.md`): `/devices/{id}/event` with `{"eventType","eventData"}`, the DDP
//! `{"action":"set"|"delete"}` messages, and (in [`mqtt`]) how a device logs in. The rest of the
//! hub hands this module outbox rows and gets back bytes to send. It must not touch SQL or local
//! sockets.

pub mod mqtt;

use crate::outbox::{Kind, Row};
use std::fmt::Write as _;

pub fn event_topic(mode_id: u64) -> String {
    format!("/devices/{mode_id}/event")
}

pub fn kv_topic(mode_id: u64) -> String {
    format!("/devices/{mode_id}/kv")
}

pub fn command_topic(mode_id: u64) -> String {
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
            event_topic(row.device)
        }
        Kind::KvSet | Kind::KvDelete => {
            write_kv(row, out);
            kv_topic(row.device)
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
        let _ = write!(extra, "\"{}\"", rfc3339_ms(row.captured_at_ms));
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
            captured_at_ms: 1_700_000_000_123,
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
