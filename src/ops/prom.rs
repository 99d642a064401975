//! `/metrics` in the Prometheus text exposition format (version 0.0.4), written by hand: the
//! format is a few lines per family and the hub's counters are plain atomics.
//!
//! Device labels carry the local `name` and the MODE id, never a key.

use super::{process_write_bytes, session_state_name, OpsContext};
use crate::metrics::RejectReason;
use crate::outbox::COMMIT_BUCKETS_MICROS;
use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

/// Escapes a label value (`\`, `"` and newlines).
pub fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// Renders every metric of the hub.
pub async fn render(ctx: &OpsContext) -> String {
    let m = ctx.metrics();
    let mut o = Out(String::with_capacity(8192));
    o.family("modehub_build_info", "gauge", "Version of the running hub.");
    o.sample(
        "modehub_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );
    o.single(
        "modehub_uptime_seconds",
        "gauge",
        "Seconds since the hub started.",
        ctx.uptime().as_secs_f64(),
    );
    o.single(
        "modehub_messages_in_total",
        "counter",
        "Local messages (events, kv changes) accepted into the outbox.",
        m.accepted.load(Relaxed),
    );
    o.single(
        "modehub_messages_out_total",
        "counter",
        "Messages MODE acknowledged.",
        m.delivered.load(Relaxed),
    );
    o.family(
        "modehub_messages_dropped_total",
        "counter",
        "Local messages refused, by reason.",
    );
    for r in RejectReason::ALL {
        o.sample(
            "modehub_messages_dropped_total",
            &[("reason", r.label())],
            m.rejected(r),
        );
    }
    o.single(
        "modehub_upstream_connects_total",
        "counter",
        "Upstream (MODE) session connect attempts, reconnects included.",
        m.upstream_connects.load(Relaxed),
    );
    o.single(
        "modehub_requeued_after_deactivation_total",
        "counter",
        "Messages MODE acknowledged while their home was (found later to be) deactivated, put back to be sent again.",
        m.requeued_deactivated.load(Relaxed),
    );
    o.single(
        "modehub_upstream_connect_failures_total",
        "counter",
        "Upstream connect attempts that failed.",
        m.upstream_connect_failures.load(Relaxed),
    );
    o.single(
        "modehub_local_connections_total",
        "counter",
        "Local MQTT connections accepted after authentication.",
        m.local_connections.load(Relaxed),
    );
    o.single(
        "modehub_commands_received_total",
        "counter",
        "Commands received from MODE.",
        m.commands_received.load(Relaxed),
    );
    o.family(
        "modehub_commands_total",
        "counter",
        "Commands from MODE by outcome: delivered to a listening device, queued while it is away, dropped over hub.max_pending_commands, expired after hub.command_ttl_secs, lost (adapter refused).",
    );
    for (outcome, c) in [
        ("delivered", &m.down.commands_delivered),
        ("queued", &m.down.commands_queued),
        ("dropped", &m.down.commands_dropped),
        ("expired", &m.down.commands_expired),
        ("lost", &m.down.commands_lost),
    ] {
        o.sample(
            "modehub_commands_total",
            &[("outcome", outcome)],
            c.load(Relaxed),
        );
    }
    o.single(
        "modehub_downlink_queue_full_total",
        "counter",
        "Messages from MODE dropped because their device's downlink queue was full (its storage or serial port is stuck).",
        m.down.queue_full.load(Relaxed),
    );
    o.family(
        "modehub_local_front_total",
        "counter",
        "What the local MQTT front refused or slowed down: connections without CONNECT in time, not-logged-in connections evicted for a new one, connections refused (all slots logged in), failed logins answered late, publishes acknowledged and dropped, connections taken over by the same client id, CONNECTs of another MQTT version.",
    );
    let f = &m.front;
    for (event, c) in [
        ("connect_timeout", &f.connect_timeouts),
        ("evicted", &f.evicted),
        ("refused_full", &f.refused_full),
        ("login_delayed", &f.delayed_logins),
        ("publish_denied", &f.denied_publishes),
        ("publish_retransmit", &f.retransmits),
        ("taken_over", &f.taken_over),
        ("bad_protocol", &f.bad_protocol),
    ] {
        o.sample(
            "modehub_local_front_total",
            &[("event", event)],
            c.load(Relaxed),
        );
    }
    o.family(
        "modehub_kv_updates_total",
        "counter",
        "DDP messages from MODE: applied to the local mirror, ignored by the revision rule, invalid.",
    );
    for (outcome, c) in [
        ("applied", &m.down.kv_applied),
        ("ignored", &m.down.kv_ignored),
        ("invalid", &m.down.kv_invalid),
    ] {
        o.sample(
            "modehub_kv_updates_total",
            &[("outcome", outcome)],
            c.load(Relaxed),
        );
    }
    o.single(
        "modehub_serial_lines_ok_total",
        "counter",
        "Serial lines accepted (all ports).",
        m.serial.lines_ok.load(Relaxed),
    );

    // Per device: upstream state, local presence, backlog, waiting commands.
    let devices = ctx.devices();
    let depth = ctx.depth().await.unwrap_or_default();
    let commands = ctx.command_queue_depth().await;
    let now_ms = super::now_ms();
    o.family(
        "modehub_upstream_session_state",
        "gauge",
        "Upstream session state per device: 1 for the current state.",
    );
    for (d, s) in &devices {
        let id = d.mode_id.to_string();
        for name in ["connecting", "up", "down", "refused"] {
            o.sample(
                "modehub_upstream_session_state",
                &[("device", &d.name), ("mode_id", &id), ("state", name)],
                u8::from(session_state_name(s) == name),
            );
        }
    }
    o.family(
        "modehub_local_connected",
        "gauge",
        "Live local connections per device (MQTT clients or open serial port).",
    );
    for (d, _) in &devices {
        o.sample(
            "modehub_local_connected",
            &[("device", &d.name), ("mode_id", &d.mode_id.to_string())],
            ctx.local_connections(d.id),
        );
    }
    o.family(
        "modehub_home_state",
        "gauge",
        "State of each device's MODE home: 1 for the current state (unknown until watched).",
    );
    for (d, _) in &devices {
        let state = ctx.home_state(d);
        for name in ["active", "deactivated", "unknown"] {
            o.sample(
                "modehub_home_state",
                &[
                    ("device", &d.name),
                    ("mode_id", &d.mode_id.to_string()),
                    ("state", name),
                ],
                u8::from(state == name),
            );
        }
    }
    o.family(
        "modehub_outbox_depth_messages",
        "gauge",
        "Messages waiting in the outbox for MODE, per device.",
    );
    for (d, _) in &devices {
        let dd = depth.get(&d.mode_id);
        o.sample(
            "modehub_outbox_depth_messages",
            &[("device", &d.name), ("mode_id", &d.mode_id.to_string())],
            dd.map_or(0, |x| x.rows),
        );
    }
    o.family(
        "modehub_outbox_depth_bytes",
        "gauge",
        "Payload bytes waiting in the outbox, per device.",
    );
    for (d, _) in &devices {
        let dd = depth.get(&d.mode_id);
        o.sample(
            "modehub_outbox_depth_bytes",
            &[("device", &d.name), ("mode_id", &d.mode_id.to_string())],
            dd.map_or(0, |x| x.bytes),
        );
    }
    o.family(
        "modehub_outbox_oldest_age_seconds",
        "gauge",
        "Age of the oldest message waiting for MODE, per device (0 when none waits).",
    );
    for (d, _) in &devices {
        let age = depth
            .get(&d.mode_id)
            .and_then(|x| x.oldest_ms)
            .map_or(0.0, |t| (now_ms - t).max(0) as f64 / 1000.0);
        o.sample(
            "modehub_outbox_oldest_age_seconds",
            &[("device", &d.name), ("mode_id", &d.mode_id.to_string())],
            age,
        );
    }
    let uplinks = ctx.view().uplinks.clone();
    for (name, help, pick) in [
        (
            "modehub_kv_refusals_total",
            "kv reads, writes or subscriptions MODE refused, per device (kv degraded, events unaffected).",
            0usize,
        ),
        (
            "modehub_kv_reloads_too_large_total",
            "kv reloads over [cloud] max_downlink_packet_bytes, per device.",
            1,
        ),
    ] {
        o.family(name, "counter", help);
        for (d, _) in &devices {
            let kv = &uplinks[d.id].kv;
            let v = if pick == 0 {
                kv.refusals.load(Relaxed)
            } else {
                kv.reloads_too_large.load(Relaxed)
            };
            o.sample(
                name,
                &[("device", &d.name), ("mode_id", &d.mode_id.to_string())],
                v,
            );
        }
    }
    o.family(
        "modehub_command_queue_depth",
        "gauge",
        "Commands from MODE waiting for a device that is away locally.",
    );
    for (d, _) in &devices {
        o.sample(
            "modehub_command_queue_depth",
            &[("device", &d.name), ("mode_id", &d.mode_id.to_string())],
            commands.get(&d.mode_id).copied().unwrap_or(0),
        );
    }

    // Storage (absent while the hub stops).
    let Some(outbox) = ctx.outbox() else {
        return o.0;
    };
    let st = outbox.stats();
    o.single(
        "modehub_outbox_commits_total",
        "counter",
        "Group commits of the outbox.",
        st.commits.load(Relaxed),
    );
    o.single(
        "modehub_outbox_wal_syncs_total",
        "counter",
        "fdatasync calls on the outbox's WAL and checkpoints (what makes commits durable under durability = \"normal\"; an SD card writes a page per sync).",
        st.wal_syncs.load(Relaxed),
    );
    o.single(
        "modehub_outbox_commit_errors_total",
        "counter",
        "Outbox commits that failed.",
        st.commit_errors.load(Relaxed),
    );
    o.family(
        "modehub_outbox_dropped_total",
        "counter",
        "Stored messages the outbox gave up on: oldest events dropped at its bounds (full), appends refused for lack of disk (disk_full), rows moved to the dead-letter table (dead_letter).",
    );
    for (reason, c) in [
        ("full", &st.dropped_full),
        ("disk_full", &st.refused_disk_full),
        ("dead_letter", &st.dead_lettered),
    ] {
        o.sample(
            "modehub_outbox_dropped_total",
            &[("reason", reason)],
            c.load(Relaxed),
        );
    }
    o.single(
        "modehub_outbox_disk_full",
        "gauge",
        "1 while new messages are refused because the data directory's disk is (nearly) full.",
        st.disk_full.load(Relaxed),
    );
    o.single(
        "modehub_outbox_kv_coalesced_total",
        "counter",
        "kv changes replaced by a newer change of the same key before they were sent.",
        st.kv_coalesced.load(Relaxed),
    );
    o.single(
        "modehub_outbox_corruption_detected_total",
        "counter",
        "Times the outbox database was found corrupt (salvaged rows: modehub_outbox_salvaged_rows_total).",
        st.corruption_detected.load(Relaxed),
    );
    o.single(
        "modehub_outbox_salvaged_rows_total",
        "counter",
        "Rows recovered from a corrupt database into a new one.",
        st.salvaged_rows.load(Relaxed),
    );
    o.single(
        "modehub_outbox_rows_appended_total",
        "counter",
        "Rows written to the outbox.",
        st.rows_appended.load(Relaxed),
    );
    o.single(
        "modehub_outbox_rows_acked_total",
        "counter",
        "Rows deleted from the outbox after MODE acknowledged them.",
        st.rows_acked.load(Relaxed),
    );
    o.family(
        "modehub_sqlite_commit_seconds",
        "histogram",
        "Duration of outbox group commits (SQLite transactions).",
    );
    let mut cumulative = 0u64;
    for (i, bound) in COMMIT_BUCKETS_MICROS.iter().enumerate() {
        cumulative += st.commit_buckets[i].load(Relaxed);
        let le = format!("{}", *bound as f64 / 1e6);
        o.sample(
            "modehub_sqlite_commit_seconds_bucket",
            &[("le", &le)],
            cumulative,
        );
    }
    cumulative += st.commit_buckets[COMMIT_BUCKETS_MICROS.len()].load(Relaxed);
    o.sample(
        "modehub_sqlite_commit_seconds_bucket",
        &[("le", "+Inf")],
        cumulative,
    );
    o.sample(
        "modehub_sqlite_commit_seconds_sum",
        &[],
        st.commit_micros.load(Relaxed) as f64 / 1e6,
    );
    o.sample("modehub_sqlite_commit_seconds_count", &[], cumulative);
    if let Some(w) = process_write_bytes() {
        o.single(
            "modehub_disk_write_bytes_total",
            "counter",
            "Bytes this process caused to be written to storage (/proc/self/io write_bytes); the rate estimates SD-card wear.",
            w,
        );
    }
    o.single(
        "modehub_data_dir_bytes",
        "gauge",
        "Size of the files in the data directory (hub.db, its WAL).",
        super::dir_size(ctx.data_dir()),
    );
    o.0
}
