//! The emulator against what MODE is known to do, and each *assumed* knob in both settings
//! (issue 11 items 4, 9, 10): MQTT over WebSocket, the default rate limits, optional command
//! `parameters`, and the flipped guesses (kv REST refused to device keys, deleting a missing key
//! succeeds, deactivated homes refuse, no invented error reasons). rumqttc is the device client
//! (TCP and WebSocket), reqwest the REST client.

use std::time::Duration;

use modehub::emulator::{
    Behaviour, DeactivatedHome, Emulator, EmulatorConfig, Seed, SeedDevice, SeedHome,
};
use modehub::emulator::{Permission, SeedProjectKey};
use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet, QoS, Transport};
use serde_json::{json, Value};
use tokio::sync::mpsc;

const K1: &str = "v1.fid-1001.aaaa";
const K2: &str = "v1.fid-1002.bbbb";
const PK: &str = "v1.fid-project.admin";
const T: Duration = Duration::from_secs(10);

fn seed() -> Seed {
    let dev = |id, key: &str| SeedDevice {
        id,
        api_key: key.to_string(),
        home_id: Some(42),
        name: Some(format!("dev{id}")),
        ..SeedDevice::default()
    };
    Seed {
        project_id: 7,
        home: vec![SeedHome {
            id: 42,
            name: "Home".into(),
            deactivated: false,
        }],
        device: vec![dev(1001, K1), dev(1002, K2)],
        project_key: vec![SeedProjectKey {
            key: PK.into(),
            permissions: vec![Permission::Admin, Permission::Commands, Permission::KvWrite],
        }],
        ..Seed::default()
    }
}

async fn start(behaviour: Behaviour) -> Emulator {
    let mut cfg = EmulatorConfig::local(seed());
    cfg.behaviour = behaviour;
    Emulator::start(cfg).await.expect("emulator starts")
}

struct Dev {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Result<Packet, ConnectionError>>,
}

impl Dev {
    fn spawn(opts: MqttOptions) -> Dev {
        let (client, mut el) = AsyncClient::new(opts, 1024);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(p)) => {
                        if tx.send(Ok(p)).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            }
        });
        Dev { client, rx }
    }

    /// The next incoming packet matching `f` (others are skipped); panics on a closed session.
    async fn next_where(&mut self, f: impl Fn(&Packet) -> bool) -> Packet {
        loop {
            match tokio::time::timeout(T, self.rx.recv()).await {
                Ok(Some(Ok(p))) if f(&p) => return p,
                Ok(Some(Ok(_))) => continue,
                other => panic!("no matching packet: {other:?}"),
            }
        }
    }

    /// Waits for the session to end; returns the packets seen before.
    async fn closed(&mut self) -> Vec<Packet> {
        let mut seen = Vec::new();
        loop {
            match tokio::time::timeout(T, self.rx.recv()).await {
                Ok(Some(Ok(p))) => seen.push(p),
                Ok(Some(Err(_))) | Ok(None) => return seen,
                Err(_) => panic!("session still open; saw {seen:?}"),
            }
        }
    }
}

fn tcp_opts(emu: &Emulator, id: u64, key: &str) -> MqttOptions {
    let a = emu.mqtt_addr();
    let mut o = MqttOptions::new("", a.ip().to_string(), a.port());
    o.set_credentials(id.to_string(), key);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(100);
    o
}

async fn connected(opts: MqttOptions) -> Dev {
    let mut d = Dev::spawn(opts);
    d.next_where(|p| matches!(p, Packet::ConnAck(_))).await;
    d
}

async fn rest(
    emu: &Emulator,
    method: &str,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let url = format!("http://{}{path}", emu.http_addr());
    let mut req = reqwest::Client::new()
        .request(method.parse().unwrap(), url)
        .header("Authorization", format!("ModeCloud {key}"));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test]
async fn mqtt_over_websocket_has_the_full_semantics() {
    let emu = start(Behaviour::default()).await;
    emu.handle().set_kv(1001, "mode", json!("eco")).unwrap();
    let url = format!("ws://{}/", emu.http_addr());
    let mut o = MqttOptions::new("", url, emu.http_addr().port());
    o.set_transport(Transport::Ws);
    o.set_credentials("1001", K1);
    o.set_keep_alive(Duration::from_secs(30));
    let mut d = connected(o).await;
    d.client
        .subscribe("/devices/1001/command", QoS::AtMostOnce)
        .await
        .unwrap();
    d.client
        .subscribe("/devices/1001/kv", QoS::AtMostOnce)
        .await
        .unwrap();
    // The kv store arrives as a reload on subscribe.
    let Packet::Publish(p) = d.next_where(|p| matches!(p, Packet::Publish(_))).await else {
        unreachable!()
    };
    let v: Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(v["action"], "reload");
    assert_eq!(v["items"][0]["key"], "mode");
    // QoS 1 event: PUBACK and recorded.
    d.client
        .publish(
            "/devices/1001/event",
            QoS::AtLeastOnce,
            false,
            r#"{"eventType":"t","eventData":{"c":1}}"#,
        )
        .await
        .unwrap();
    d.next_where(|p| matches!(p, Packet::PubAck(_))).await;
    let evs = emu.handle().wait_for_events(1001, 1, T).await;
    assert_eq!(evs[0].event_type, "t");
    // Commands are pushed.
    emu.handle()
        .send_command(1001, "go", json!({"n": 1}))
        .unwrap();
    let Packet::Publish(p) = d
        .next_where(|p| matches!(p, Packet::Publish(p) if p.topic.ends_with("/command")))
        .await
    else {
        unreachable!()
    };
    assert_eq!(
        serde_json::from_slice::<Value>(&p.payload).unwrap(),
        json!({"action":"go","parameters":{"n":1}})
    );
    // A wrong key is refused in the CONNACK, as over TCP.
    let url = format!("ws://{}/", emu.http_addr());
    let mut o = MqttOptions::new("", url, emu.http_addr().port());
    o.set_transport(Transport::Ws);
    o.set_credentials("1001", "wrong");
    let mut bad = Dev::spawn(o);
    match tokio::time::timeout(T, bad.rx.recv()).await.unwrap() {
        Some(Err(ConnectionError::ConnectionRefused(_))) => {}
        Some(Ok(Packet::ConnAck(a))) => assert_ne!(a.code, rumqttc::ConnectReturnCode::Success),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn defaults_follow_mode_rate_limits_and_optional_parameters() {
    let b = Behaviour::default();
    assert_eq!(b.rate_limit_per_minute, Some(600));
    assert_eq!(b.project_rate_limit_per_minute, Some(6000));
    assert!(!b.command_parameters_default);
    let emu = start(b).await;
    // 600 events a minute are taken, the 601st drops the MQTT session.
    let mut d = connected(tcp_opts(&emu, 1001, K1)).await;
    for i in 0..601 {
        d.client
            .publish(
                "/devices/1001/event",
                QoS::AtLeastOnce,
                false,
                format!(r#"{{"eventType":"n","eventData":{{"i":{i}}}}}"#),
            )
            .await
            .unwrap();
    }
    d.closed().await;
    assert_eq!(emu.handle().events(1001).len(), 600);
    assert_eq!(emu.handle().stats().mqtt_sessions_dropped_rate_limit, 1);
    // REST over the limit: 429 RATE_LIMIT_EXCEEDED.
    let (st, body) = rest(
        &emu,
        "PUT",
        "/devices/1001/event",
        K1,
        Some(json!({"eventType":"x"})),
    )
    .await;
    assert_eq!(
        (st, body["reason"].as_str()),
        (429, Some("RATE_LIMIT_EXCEEDED"))
    );
    // A command without parameters is pushed without them.
    let mut d2 = connected(tcp_opts(&emu, 1002, K2)).await;
    d2.client
        .subscribe("/devices/1002/command", QoS::AtMostOnce)
        .await
        .unwrap();
    d2.next_where(|p| matches!(p, Packet::SubAck(_))).await;
    let (st, _) = rest(
        &emu,
        "PUT",
        "/devices/1002/command",
        PK,
        Some(json!({"action":"reboot"})),
    )
    .await;
    assert_eq!(st, 204);
    let Packet::Publish(p) = d2.next_where(|p| matches!(p, Packet::Publish(_))).await else {
        unreachable!()
    };
    assert_eq!(&p.payload[..], br#"{"action":"reboot"}"#);
}

#[tokio::test]
async fn the_project_limit_counts_all_devices() {
    let emu = start(Behaviour {
        rate_limit_per_minute: None,
        project_rate_limit_per_minute: Some(4),
        ..Behaviour::default()
    })
    .await;
    for (id, key) in [(1001, K1), (1002, K2), (1001, K1), (1002, K2)] {
        let (st, _) = rest(
            &emu,
            "PUT",
            &format!("/devices/{id}/event"),
            key,
            Some(json!({"eventType":"x"})),
        )
        .await;
        assert_eq!(st, 204);
    }
    let (st, _) = rest(
        &emu,
        "PUT",
        "/devices/1002/event",
        K2,
        Some(json!({"eventType":"x"})),
    )
    .await;
    assert_eq!(st, 429);
    assert_eq!(
        Behaviour::default()
            .without_rate_limits()
            .rate_limit_per_minute,
        None
    );
}

#[tokio::test]
async fn assumed_knobs_in_their_default_setting() {
    let emu = start(Behaviour::default()).await;
    // A device key may use kv REST; deleting a missing key is 404 KEY_NOT_FOUND.
    let (st, _) = rest(&emu, "GET", "/devices/1001/kv", K1, None).await;
    assert_eq!(st, 200);
    let (st, body) = rest(&emu, "DELETE", "/devices/1001/kv/nope", K1, None).await;
    assert_eq!((st, body["reason"].as_str()), (404, Some("KEY_NOT_FOUND")));
    // A deactivated home takes events and drops them.
    emu.handle().set_home_deactivated(42, true);
    let (st, _) = rest(
        &emu,
        "PUT",
        "/devices/1001/event",
        K1,
        Some(json!({"eventType":"x"})),
    )
    .await;
    assert_eq!(st, 204);
    assert_eq!(emu.handle().dropped_events(1001).len(), 1);
}

#[tokio::test]
async fn assumed_knobs_flipped() {
    let b = Behaviour::default().flip_assumed();
    assert_eq!(b.deactivated_home, DeactivatedHome::Refuse);
    assert!(!b.kv_echo_to_self);
    let emu = start(b).await;
    // kv REST is refused to a device key (MODE documents it for applications only)...
    let (st, body) = rest(&emu, "GET", "/devices/1001/kv", K1, None).await;
    assert_eq!(
        (st, body["reason"].as_str()),
        (403, Some("PERMISSION_DENIED"))
    );
    let (st, _) = rest(
        &emu,
        "PUT",
        "/devices/1001/kv/a",
        K1,
        Some(json!({"value":1})),
    )
    .await;
    assert_eq!(st, 403);
    // ...but not to the project key; deleting a missing key is done.
    let (st, _) = rest(&emu, "DELETE", "/devices/1001/kv/nope", PK, None).await;
    assert_eq!(st, 204);
    // Invented reasons are gone: the status alone.
    let (st, body) = rest(&emu, "GET", "/devices/999", PK, None).await;
    assert_eq!((st, body), (404, json!({})));
    // A deactivated home refuses: REST 403, MQTT session closed without a PUBACK.
    emu.handle().set_home_deactivated(42, true);
    let (st, body) = rest(
        &emu,
        "PUT",
        "/devices/1001/event",
        K1,
        Some(json!({"eventType":"x"})),
    )
    .await;
    assert_eq!(
        (st, body["reason"].as_str()),
        (403, Some("PERMISSION_DENIED"))
    );
    let mut d = connected(tcp_opts(&emu, 1002, K2)).await;
    d.client
        .publish(
            "/devices/1002/event",
            QoS::AtLeastOnce,
            false,
            r#"{"eventType":"x"}"#,
        )
        .await
        .unwrap();
    let seen = d.closed().await;
    assert!(!seen.iter().any(|p| matches!(p, Packet::PubAck(_))));
    assert!(emu.handle().dropped_events(1002).is_empty());
    assert_eq!(emu.handle().stats().events_refused_deactivated, 2);
}
