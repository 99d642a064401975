//! The checks on values a config file can fail without touching the network: ranges, names,
//! URLs, duplicate ids, key files and their permissions, serial ports and their devices. Every
//! problem says where it is and how to fix it. It must not start anything.

use super::problems::{did_you_mean, display_path, Locator};
use super::{read_secret_file, Config, MqttEndpoint, Problem};
use std::net::SocketAddr;
use std::path::Path;

/// Shortest `local_password` accepted when `[local.mqtt] listen` is reachable from the LAN.
pub const MIN_LOCAL_PASSWORD: usize = 8;

impl Config {
    pub(super) fn validate(&mut self, loc: &Locator, base: &Path, problems: &mut Vec<Problem>) {
        let mut push = |table: &str, key: &str, what: String, fix: String| {
            problems.push(Problem {
                key: display_path(table, key),
                line: loc.line(table, key),
                what,
                fix,
            });
        };
        // Each local connection may hold one packet of this size (+64 KiB) in memory.
        if self.hub.max_payload_bytes < 64 || self.hub.max_payload_bytes > 1024 * 1024 {
            push(
                "hub",
                "max_payload_bytes",
                format!("{} is out of range", self.hub.max_payload_bytes),
                "use a value between 64 and 1048576 (default 65536): every local connection may hold one message of this size in memory".into(),
            );
        }
        let mqtt = &mut self.local.mqtt;
        match (&mqtt.tls_cert_file, &mqtt.tls_key_file) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                let (cert, key) = (base.join(cert), base.join(key));
                for (k, f) in [("tls_cert_file", &cert), ("tls_key_file", &key)] {
                    if let Err(e) = std::fs::File::open(f) {
                        push(
                            "local.mqtt",
                            k,
                            format!("cannot read {}: {e}", f.display()),
                            "give a PEM file the hub can read (key file mode 0600)".into(),
                        );
                    }
                }
                mqtt.tls_cert_file = Some(cert);
                mqtt.tls_key_file = Some(key);
            }
            (Some(_), None) | (None, Some(_)) => push(
                "local.mqtt",
                if mqtt.tls_key_file.is_none() {
                    "tls_key_file"
                } else {
                    "tls_cert_file"
                },
                "TLS needs both tls_cert_file and tls_key_file".into(),
                "set both (PEM certificate chain and its private key), or neither for plain MQTT"
                    .into(),
            ),
        }
        if tracing_subscriber::EnvFilter::try_new(&self.hub.log).is_err() {
            push(
                "hub",
                "log",
                format!("`{}` is not a log filter", self.hub.log),
                "use e.g. \"info\" or \"modehub=debug,info\"".into(),
            );
        }
        if let Err(e) = MqttEndpoint::parse(&self.cloud.mqtt_url) {
            push(
                "cloud",
                "mqtt_url",
                e,
                "use mqtts://host:8883 (TLS), mqtt://host:1883, or wss://host:443 (MQTT over WebSocket, for HTTPS-only networks)".into(),
            );
        }
        match url::Url::parse(&self.cloud.api_url) {
            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
            _ => push(
                "cloud",
                "api_url",
                format!("`{}` is not an http(s) URL", self.cloud.api_url),
                "use https://api.tinkermode.com".into(),
            ),
        }
        if self.ops.listen != "off" && self.ops.listen.parse::<SocketAddr>().is_err() {
            push(
                "ops",
                "listen",
                format!("`{}` is not an address", self.ops.listen),
                "use e.g. \"127.0.0.1:9464\", or \"off\"".into(),
            );
        }
        if let Some(pf) = &self.ops.password_file {
            match read_secret_file(&base.join(pf)) {
                Ok(p) => self.ops.password = Some(p),
                Err((what, fix)) => push("ops", "password_file", what, fix),
            }
        }
        if let Ok(a) = self.ops.listen.parse::<SocketAddr>() {
            if !a.ip().is_loopback() && self.ops.password_file.is_none() {
                push(
                    "ops",
                    "listen",
                    format!("`{}` shows the status page and metrics beyond this machine, but no password is set", self.ops.listen),
                    "set [ops] password_file to a file (mode 0600) holding a password, or keep listen = \"127.0.0.1:9464\"".into(),
                );
            }
        }
        if !(1..=86_400).contains(&self.ops.stall_after_secs) {
            push(
                "ops",
                "stall_after_secs",
                format!("{} is out of range", self.ops.stall_after_secs),
                "use 1..=86400 seconds (default 300)".into(),
            );
        }
        if self.hub.max_pending_commands == 0 || self.hub.max_pending_commands > 100_000 {
            push(
                "hub",
                "max_pending_commands",
                format!("{} is out of range", self.hub.max_pending_commands),
                "use 1..=100000 (default 100)".into(),
            );
        }
        if !(1..=1024).contains(&self.hub.kv_max_key_len) {
            push(
                "hub",
                "kv_max_key_len",
                format!("{} is out of range", self.hub.kv_max_key_len),
                "use 1..=1024 (default 128)".into(),
            );
        }
        if self.hub.max_outbox_bytes < 1024 * 1024 {
            push(
                "hub",
                "max_outbox_bytes",
                format!("{} is too small", self.hub.max_outbox_bytes),
                "use at least 1048576 (default 268435456 = 256 MiB)".into(),
            );
        }
        if self.hub.commit_window_ms > 10_000 {
            push(
                "hub",
                "commit_window_ms",
                format!(
                    "{} ms would hold every PUBACK that long",
                    self.hub.commit_window_ms
                ),
                "use at most 10000 (default 2000; 0 commits at once)".into(),
            );
        }
        if self.hub.max_outbox_rows < 100 {
            push(
                "hub",
                "max_outbox_rows",
                format!("{} is too small", self.hub.max_outbox_rows),
                "use at least 100".into(),
            );
        }
        if self.cloud.max_messages_per_minute == 0
            || self.cloud.max_project_messages_per_minute == 0
        {
            push(
                "cloud",
                "max_messages_per_minute",
                "message rates must be above 0".into(),
                "use the defaults (540 per device, 5400 per hub) or your plan's limits".into(),
            );
        }
        if self.cloud.home_poll_interval_secs < 5 {
            push(
                "cloud",
                "home_poll_interval_secs",
                format!(
                    "{} s polls MODE too often",
                    self.cloud.home_poll_interval_secs
                ),
                "use 5 or more (default 60)".into(),
            );
        }
        if self.cloud.max_inflight == 0 || self.cloud.max_inflight > 1000 {
            push(
                "cloud",
                "max_inflight",
                format!("{} is out of range", self.cloud.max_inflight),
                "use 1..=1000 (default 32)".into(),
            );
        }
        if self.cloud.keepalive_secs < 5 || self.cloud.keepalive_secs > 3600 {
            push(
                "cloud",
                "keepalive_secs",
                format!("{} is out of range", self.cloud.keepalive_secs),
                "use 5..=3600 (default 30)".into(),
            );
        }
        if !(4096..=268_435_455).contains(&self.cloud.max_downlink_packet_bytes) {
            push(
                "cloud",
                "max_downlink_packet_bytes",
                format!("{} is out of range", self.cloud.max_downlink_packet_bytes),
                "use 4096..=268435455 (default 16777216, 16 MiB)".into(),
            );
        }
        if let Some(pk) = &self.cloud.project_key_file {
            let pk = base.join(pk);
            match read_secret_file(&pk) {
                Ok(key) => self.cloud.project_key = Some(key),
                Err((what, fix)) => push("cloud", "project_key_file", what, fix),
            }
        }
        if self.devices.is_empty() {
            push(
                "",
                "device",
                "no [[device]] is configured".into(),
                "add a [[device]] table with name, mode_id and api_key".into(),
            );
        }
        let mut names = std::collections::HashMap::new();
        let mut ids = std::collections::HashMap::new();
        // Only a listener on the LAN can be guessed at from the LAN.
        let listen = self.local.mqtt.listen;
        let lan_reachable = !listen.ip().is_loopback();
        for (i, d) in self.devices.iter_mut().enumerate() {
            let table = format!("device[{i}]");
            if !valid_name(&d.name) {
                push(
                    &table,
                    "name",
                    format!("`{}` is not a valid device name", d.name),
                    "use 1-64 letters, digits, '-', '_' or '.', not only digits".into(),
                );
            } else if let Some(prev) = names.insert(d.name.clone(), i) {
                push(
                    &table,
                    "name",
                    format!("name `{}` is already used by device[{prev}]", d.name),
                    "give every device its own name".into(),
                );
            }
            if d.mode_id.get() == 0 {
                push(
                    &table,
                    "mode_id",
                    "mode_id 0 is not a MODE device ID".into(),
                    "copy the device ID from the MODE console".into(),
                );
            } else if let Some(prev) = ids.insert(d.mode_id, i) {
                push(
                    &table,
                    "mode_id",
                    format!("mode_id {} is already used by device[{prev}]", d.mode_id),
                    "each MODE device may be configured once".into(),
                );
            }
            match (&d.api_key, &d.api_key_file) {
                (Some(_), Some(_)) => push(
                    &table,
                    "api_key_file",
                    "both api_key and api_key_file are set".into(),
                    "keep one of them (api_key_file is safer)".into(),
                ),
                (None, None) => push(
                    &table,
                    "api_key",
                    format!("device `{}` has no API key", d.name),
                    "set api_key_file = \"/etc/modehub/keys/NAME\" (mode 0600) or api_key".into(),
                ),
                (Some(k), None) if k.expose().trim().is_empty() => push(
                    &table,
                    "api_key",
                    "api_key is empty".into(),
                    "copy the device API key from the MODE console".into(),
                ),
                (None, Some(f)) => match read_secret_file(&base.join(f)) {
                    Ok(k) => d.api_key = Some(k),
                    Err((what, fix)) => push(&table, "api_key_file", what, fix),
                },
                _ => {}
            }
            if let Some(p) = &d.local_password {
                if p.expose().is_empty() {
                    push(
                        &table,
                        "local_password",
                        "local_password is empty".into(),
                        "set a password or remove the key".into(),
                    );
                } else if lan_reachable && p.expose().chars().count() < MIN_LOCAL_PASSWORD {
                    push(
                        &table,
                        "local_password",
                        format!(
                            "local_password is shorter than {MIN_LOCAL_PASSWORD} characters, and [local.mqtt] listen = \"{}\" lets the LAN try it: even slowed to 20 guesses a second, a short password falls in hours",
                            listen
                        ),
                        format!(
                            "use {MIN_LOCAL_PASSWORD} or more random characters (e.g. `openssl rand -base64 12`), or listen on 127.0.0.1 only"
                        ),
                    );
                } else if p.expose() == d.name {
                    push(
                        &table,
                        "local_password",
                        "local_password is the device's name, which anyone can guess".into(),
                        "use random characters".into(),
                    );
                }
            }
        }
    }

    pub(super) fn validate_serial(&self, loc: &Locator, problems: &mut Vec<Problem>) {
        let mut owner: std::collections::HashMap<&str, usize> = Default::default();
        let mut ports: std::collections::HashMap<&Path, usize> = Default::default();
        for (i, s) in self.serial.iter().enumerate() {
            let table = format!("serial[{i}]");
            let mut push = |key: &str, what: String, fix: String| {
                problems.push(Problem {
                    key: display_path(&table, key),
                    line: loc.line(&table, key),
                    what,
                    fix,
                })
            };
            if s.port.as_os_str().is_empty() {
                push(
                    "port",
                    "port is empty".into(),
                    "set the device path, e.g. /dev/ttyUSB0".into(),
                );
            } else if let Some(prev) = ports.insert(&s.port, i) {
                push(
                    "port",
                    format!(
                        "port {} is already used by serial[{prev}]",
                        s.port.display()
                    ),
                    "list every device of one port in one [[serial]] table".into(),
                );
            }
            if s.baud == 0 || s.baud > 4_000_000 {
                push(
                    "baud",
                    format!("{} is not a baud rate", s.baud),
                    "use e.g. 9600 or 115200".into(),
                );
            }
            if !(5..=8).contains(&s.data_bits) {
                push(
                    "data_bits",
                    format!("{} data bits", s.data_bits),
                    "use 5, 6, 7 or 8".into(),
                );
            }
            if !(1..=2).contains(&s.stop_bits) {
                push(
                    "stop_bits",
                    format!("{} stop bits", s.stop_bits),
                    "use 1 or 2".into(),
                );
            }
            if !(16..=65536).contains(&s.max_line_bytes) {
                push(
                    "max_line_bytes",
                    format!("{} is out of range", s.max_line_bytes),
                    "use 16..=65536 (default 1024)".into(),
                );
            }
            if s.write_queue == 0 || s.write_queue > 10_000 {
                push(
                    "write_queue",
                    format!("{} is out of range", s.write_queue),
                    "use 1..=10000 (default 64)".into(),
                );
            }
            if s.devices.is_empty() {
                push(
                    "devices",
                    "no devices listed".into(),
                    "name the [[device]]s that speak on this port".into(),
                );
            }
            for name in &s.devices {
                if !self.devices.iter().any(|d| &d.name == name) {
                    let names: Vec<&str> = self.devices.iter().map(|d| d.name.as_str()).collect();
                    let hint = did_you_mean(name, &names)
                        .map(|n| format!("did you mean `{n}`? "))
                        .unwrap_or_default();
                    push(
                        "devices",
                        format!("`{name}` is not a configured [[device]] name"),
                        format!("{hint}add a [[device]] named `{name}` or fix the name"),
                    );
                } else if let Some(prev) = owner.insert(name.as_str(), i) {
                    push(
                        "devices",
                        format!("device `{name}` is already on serial[{prev}]"),
                        "a device speaks on one port only".into(),
                    );
                }
            }
        }
    }
}

/// A local device name: used in topics, so restricted to a safe alphabet.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.bytes().all(|b| b.is_ascii_digit())
}
