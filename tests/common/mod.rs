//! Shared test fixtures: an emulator with seeded devices, a hub pointed at it, and a sensor.
#![allow(dead_code)]

pub mod pty;

use modehub::config::Config;
use modehub::emulator::{Emulator, EmulatorConfig, EmulatorHandle, RecordedEvent, Seed};
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::sync::mpsc;

pub const HOME: u64 = 42;

pub fn device_id(i: usize) -> u64 {
    100 + i as u64
}

pub fn device_key(i: usize) -> String {
    format!("v1.key-{i}-{}", 7919 * (i + 1))
}

pub fn seed(n: usize) -> Seed {
    let mut s = String::from(
        "project_id = 1\n[[home]]\nid = 42\nname = \"Home\"\n[[home]]\nid = 43\nname = \"Other\"\n",
    );
    for i in 0..n {
        s.push_str(&format!(
            "[[device]]\nid = {}\napi_key = \"{}\"\nhome_id = {}\nname = \"dev{i}\"\n",
            device_id(i),
            device_key(i),
            if i % 2 == 0 { 42 } else { 43 }
        ));
    }
    s.push_str("[[project_key]]\nkey = \"v1.project\"\npermissions = [\"admin\", \"commands\", \"kv_write\"]\n");
    toml::from_str(&s).unwrap()
}

pub async fn emulator(n: usize) -> Emulator {
    Emulator::start(EmulatorConfig {
        http_listen: "127.0.0.1:0".parse().unwrap(),
        mqtt_listen: "127.0.0.1:0".parse().unwrap(),
        seed: seed(n),
        behaviour: Default::default(),
    })
    .await
    .unwrap()
}

/// Hub config text for `n` devices `dev{i}` (password `pw{i}`) against `emu`.
pub fn hub_config_text(emu: &Emulator, data_dir: &Path, n: usize, extra_cloud: &str) -> String {
    let mut s = format!(
        "[hub]\ndata_dir = \"{}\"\n[local.mqtt]\nlisten = \"127.0.0.1:0\"\n[cloud]\napi_url = \"http://{}\"\nmqtt_url = \"mqtt://{}\"\n{extra_cloud}\n",
        data_dir.display(),
        emu.http_addr(),
        emu.mqtt_addr()
    );
    for i in 0..n {
        s.push_str(&device_table(i, &format!("pw{i}")));
    }
    s
}

/// The `[[device]]` table of `dev{i}` (home 42 or 43) with local password `password`.
pub fn device_table(i: usize, password: &str) -> String {
    format!(
        "[[device]]\nname = \"dev{i}\"\nmode_id = {}\nhome_id = {}\napi_key = \"{}\"\nlocal_password = \"{password}\"\n",
        device_id(i),
        if i.is_multiple_of(2) { 42 } else { 43 },
        device_key(i)
    )
}

/// `[cloud]` lines that raise the hub's pacing out of the way, for tests about something else
/// (pacing itself is tested in tests/it/store_forward.rs).
pub const NO_PACING: &str =
    "max_messages_per_minute = 1000000\nmax_project_messages_per_minute = 1000000\n";

/// [`hub_config`] with pacing out of the way ([`NO_PACING`]).
pub fn unpaced_hub_config(emu: &Emulator, data_dir: &Path, n: usize) -> Config {
    Config::parse(&hub_config_text(emu, data_dir, n, NO_PACING), data_dir).unwrap()
}

pub fn hub_config(emu: &Emulator, data_dir: &Path, n: usize) -> Config {
    Config::parse(&hub_config_text(emu, data_dir, n, ""), data_dir).unwrap()
}

/// A local sensor speaking MQTT to the hub.
pub struct Sensor {
    pub client: AsyncClient,
    pub incoming: mpsc::UnboundedReceiver<Packet>,
    pub closed: tokio::sync::watch::Receiver<Option<String>>,
}

pub async fn connect_raw(
    addr: SocketAddr,
    user: &str,
    pass: &str,
) -> Result<(AsyncClient, EventLoop), ConnectionError> {
    let mut opts = MqttOptions::new(
        format!("sensor-{user}-{}", fastrand::u32(..)),
        addr.ip().to_string(),
        addr.port(),
    );
    opts.set_credentials(user, pass);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(256 * 1024, 256 * 1024);
    opts.set_inflight(100);
    let (client, mut el) = AsyncClient::new(opts, 1024);
    loop {
        match el.poll().await? {
            Event::Incoming(Packet::ConnAck(_)) => return Ok((client, el)),
            _ => continue,
        }
    }
}

impl Sensor {
    pub async fn connect(addr: SocketAddr, user: &str, pass: &str) -> Sensor {
        let (client, mut el) = connect_raw(addr, user, pass)
            .await
            .expect("sensor connects");
        let (tx, incoming) = mpsc::unbounded_channel();
        let (closed_tx, closed) = tokio::sync::watch::channel(None);
        tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(p)) => {
                        let _ = tx.send(p);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = closed_tx.send(Some(e.to_string()));
                        return;
                    }
                }
            }
        });
        Sensor {
            client,
            incoming,
            closed,
        }
    }

    /// Publishes each payload at QoS 1 to `topic` and waits until all are PUBACKed.
    pub async fn publish_all<P: Into<Vec<u8>>>(&mut self, topic: &str, payloads: Vec<P>) {
        let n = payloads.len();
        for p in payloads {
            self.client
                .publish(topic, QoS::AtLeastOnce, false, p)
                .await
                .unwrap();
        }
        let mut acked = 0;
        while acked < n {
            match tokio::time::timeout(Duration::from_secs(20), self.incoming.recv()).await {
                Ok(Some(Packet::PubAck(_))) => acked += 1,
                Ok(Some(_)) => {}
                other => panic!("waiting for PUBACK {acked}/{n}: {other:?}"),
            }
        }
    }

    /// Waits for the next PUBLISH from the hub.
    pub async fn next_publish(&mut self, timeout: Duration) -> Option<rumqttc::Publish> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.incoming.recv()).await {
                Ok(Some(Packet::Publish(p))) => return Some(p),
                Ok(Some(_)) => continue,
                _ => return None,
            }
        }
    }

    pub async fn subscribe(&mut self, filter: &str) -> rumqttc::SubAck {
        self.client
            .subscribe(filter, QoS::AtMostOnce)
            .await
            .unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.incoming.recv()).await {
                Ok(Some(Packet::SubAck(a))) => return a,
                Ok(Some(_)) => continue,
                other => panic!("no SUBACK: {other:?}"),
            }
        }
    }
}

pub fn event_json(n: usize) -> String {
    format!(r#"{{"eventType":"reading","eventData":{{"n":{n}}}}}"#)
}

/// The `n` values of a device's recorded events, in arrival order.
pub fn ns(events: &[RecordedEvent]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e.event_data["n"].as_u64().expect("n"))
        .collect()
}

/// Waits (up to 30 s) until `n` *distinct* events of `dev` arrived and returns all recorded
/// ones, duplicates included. Delivery is at-least-once, so a resend after a cut must not
/// count towards `n`: an event is told apart by its `n` field, events without one all count.
pub async fn wait_events(h: &EmulatorHandle, dev: u64, n: usize) -> Vec<RecordedEvent> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut want = n;
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let evs = h.wait_for_events(dev, want, remaining).await;
        let distinct = distinct_events(&evs);
        if distinct >= n || tokio::time::Instant::now() >= deadline {
            return evs;
        }
        // Each duplicate seen so far needs one more arrival.
        want = evs.len() + (n - distinct);
    }
}

/// The first occurrence of each `n`, in arrival order, and how many arrivals were repeats.
/// At-least-once delivery may repeat an event after a cut; it must never reorder firsts.
pub fn first_arrivals(ns: &[u64]) -> (Vec<u64>, usize) {
    let mut seen = std::collections::HashSet::new();
    let firsts: Vec<u64> = ns.iter().copied().filter(|n| seen.insert(*n)).collect();
    let dups = ns.len() - firsts.len();
    (firsts, dups)
}

fn distinct_events(events: &[RecordedEvent]) -> usize {
    let mut seen = std::collections::HashSet::new();
    events
        .iter()
        .filter(|e| match e.event_data.get("n").and_then(|v| v.as_u64()) {
            Some(n) => seen.insert(n),
            None => true,
        })
        .count()
}

/// Sends a command once MODE has a session for the device that takes it: MODE drops a command
/// that reaches a session before it subscribed, so resend until one was handed to a connection.
pub async fn send_command(emu: &Emulator, dev: u64, action: &str, params: serde_json::Value) {
    let h = emu.handle();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let before = h.stats().command_deliveries;
        match h.send_command(dev, action, params.clone()) {
            Ok(()) if h.stats().command_deliveries > before => return,
            r => assert!(
                tokio::time::Instant::now() < deadline,
                "device {dev} never got an upstream session that takes commands: {r:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
