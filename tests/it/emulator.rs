//! Integration tests of the MODE cloud emulator (`modehub::emulator`), driven the way the hub
//! and MODE's SDKs use MODE: rumqttc as the device MQTT client, raw HTTP/1.1 for REST, and
//! tokio-tungstenite for the command WebSocket.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use modehub::emulator::{
    Behaviour, CommandError, Emulator, EmulatorConfig, Faults, Permission, Seed, SeedDevice,
    SeedHome, SeedProjectKey, SeedUser, Transport,
};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, LastWill, MqttOptions, Packet, QoS,
    SubscribeReasonCode,
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

const K1: &str = "v1.ZHwxMDAx.1700000000.aaaa";
const K2: &str = "v1.ZHwxMDAy.1700000000.bbbb";
const K3: &str = "v1.ZHwxMDAz.1700000000.cccc";
const PK_ADMIN: &str = "v1.cGt8MXxrMQ.1700000000.admin";
const PK_READ: &str = "v1.cGt8MXxrMg.1700000000.read";
const USER: &str = "v1.dXN8MQ.1700000000.user";
const T: Duration = Duration::from_secs(5);

fn seed() -> Seed {
    let dev = |id, key: &str, home| SeedDevice {
        id,
        api_key: key.to_string(),
        home_id: Some(home),
        name: Some(format!("dev{id}")),
        ..SeedDevice::default()
    };
    let mut d1 = dev(1001, K1, 42);
    d1.kv = BTreeMap::from([("a".to_string(), json!(1))]);
    Seed {
        project_id: 7,
        home: vec![
            SeedHome {
                id: 42,
                name: "Home".into(),
                deactivated: false,
            },
            SeedHome {
                id: 43,
                name: "Other".into(),
                deactivated: false,
            },
        ],
        device: vec![d1, dev(1002, K2, 42), dev(1003, K3, 43)],
        project_key: vec![
            SeedProjectKey {
                key: PK_ADMIN.into(),
                permissions: vec![Permission::Admin, Permission::Commands, Permission::KvWrite],
            },
            SeedProjectKey {
                key: PK_READ.into(),
                permissions: vec![],
            },
        ],
        user: vec![SeedUser {
            key: USER.into(),
            id: Some(5),
            home_ids: vec![42],
        }],
    }
}

async fn start_with(behaviour: Behaviour) -> Emulator {
    let mut cfg = EmulatorConfig::local(seed());
    cfg.behaviour = behaviour;
    Emulator::start(cfg).await.expect("emulator starts")
}

async fn start() -> Emulator {
    start_with(Behaviour::default()).await
}

// ---- MQTT device client ----------------------------------------------------------------------

/// A rumqttc client whose event loop runs in a task; incoming packets (or the first error)
/// arrive on `rx`.
struct Dev {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Result<Packet, ConnectionError>>,
}

fn options(addr: SocketAddr, user: &str, pass: &str) -> MqttOptions {
    let mut o = MqttOptions::new("", addr.ip().to_string(), addr.port());
    o.set_credentials(user, pass);
    o.set_keep_alive(Duration::from_secs(30));
    o
}

fn spawn_dev(opts: MqttOptions) -> Dev {
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
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

impl Dev {
    async fn next(&mut self) -> Result<Packet, ConnectionError> {
        tokio::time::timeout(T, self.rx.recv())
            .await
            .expect("MQTT packet in time")
            .expect("event loop alive")
    }

    /// Next packet that is not a PINGRESP.
    async fn packet(&mut self) -> Packet {
        loop {
            match self.next().await {
                Ok(Packet::PingResp) => continue,
                Ok(p) => return p,
                Err(e) => panic!("connection error: {e}"),
            }
        }
    }

    /// Waits for the connection to fail; returns the error.
    async fn closed(&mut self) -> ConnectionError {
        loop {
            if let Err(e) = self.next().await {
                return e;
            }
        }
    }

    async fn publish(&mut self, topic: String, payload: String) -> Packet {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
        self.packet().await
    }

    async fn publish_payload(&mut self) -> Value {
        match self.packet().await {
            Packet::Publish(p) => serde_json::from_slice(&p.payload).unwrap(),
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
}

async fn connect(addr: SocketAddr, id: u64, key: &str) -> Dev {
    let mut d = spawn_dev(options(addr, &id.to_string(), key));
    match d.next().await {
        Ok(Packet::ConnAck(a)) => assert_eq!(a.code, ConnectReturnCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    d
}

async fn refused(opts: MqttOptions) -> ConnectReturnCode {
    let mut d = spawn_dev(opts);
    match d.next().await {
        Err(ConnectionError::ConnectionRefused(code)) => code,
        other => panic!("expected refusal, got {other:?}"),
    }
}

// ---- raw HTTP --------------------------------------------------------------------------------

struct Resp {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
    }

    fn reason(&self) -> String {
        self.json()["reason"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> Resp {
    let mut s = TcpStream::connect(addr).await.expect("HTTP connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(k) = key {
        req.push_str(&format!("Authorization: ModeCloud {k}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || matches!(method, "PUT" | "POST" | "PATCH") {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut buf))
        .await
        .expect("HTTP answer in time")
        .unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, rest) = text.split_once("\r\n\r\n").expect("HTTP head");
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|v| v == "chunked")
    {
        let mut out = String::new();
        let mut rest = rest;
        loop {
            let (size, after) = rest.split_once("\r\n").unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        out
    } else {
        rest.to_string()
    };
    Resp {
        status,
        headers,
        body,
    }
}

async fn wait_until(mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + T;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in time"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---- tests -----------------------------------------------------------------------------------

#[tokio::test]
async fn bad_credentials_and_unsupported_connects_are_refused() {
    let emu = start().await;
    let addr = emu.mqtt_addr();
    assert_eq!(
        refused(options(addr, "1001", "wrong")).await,
        ConnectReturnCode::BadUserNamePassword
    );
    assert_eq!(
        refused(options(addr, "1001", K2)).await,
        ConnectReturnCode::BadUserNamePassword,
        "another device's key"
    );
    assert_eq!(
        refused(options(addr, "9999", K1)).await,
        ConnectReturnCode::BadUserNamePassword
    );
    let mut o = MqttOptions::new("", addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    assert_eq!(
        refused(o).await,
        ConnectReturnCode::BadUserNamePassword,
        "no login"
    );

    let mut o = options(addr, "1001", K1);
    o.set_last_will(LastWill::new(
        "/devices/1001/event",
        "x",
        QoS::AtMostOnce,
        false,
    ));
    assert_eq!(refused(o).await, ConnectReturnCode::NotAuthorized, "Will");

    let mut o = MqttOptions::new("persistent", addr.ip().to_string(), addr.port());
    o.set_credentials("1001", K1);
    o.set_clean_session(false);
    assert_eq!(
        refused(o).await,
        ConnectReturnCode::BadClientId,
        "persistent session"
    );

    assert!(!emu.handle().is_connected(1001));
    assert_eq!(emu.handle().stats().mqtt_connects_refused, 6);
    // A good key works, with any client ID.
    let _d = connect(addr, 1001, K1).await;
    let mut o = MqttOptions::new("some-client", addr.ip().to_string(), addr.port());
    o.set_credentials("1001", K1);
    let mut d2 = spawn_dev(o);
    assert!(matches!(d2.next().await, Ok(Packet::ConnAck(_))));
    assert_eq!(emu.handle().session_count(1001), 2);
    emu.shutdown().await;
}

#[tokio::test]
async fn device_is_confined_to_its_own_topics() {
    let emu = start().await;
    let h = emu.handle();
    let mut d = connect(emu.mqtt_addr(), 1001, K1).await;
    d.client
        .subscribe("/devices/1002/command", QoS::AtMostOnce)
        .await
        .unwrap();
    match d.packet().await {
        Packet::SubAck(a) => assert_eq!(a.return_codes, vec![SubscribeReasonCode::Failure]),
        other => panic!("{other:?}"),
    }
    d.client
        .subscribe("/devices/#", QoS::AtMostOnce)
        .await
        .unwrap();
    match d.packet().await {
        Packet::SubAck(a) => assert_eq!(a.return_codes, vec![SubscribeReasonCode::Failure]),
        other => panic!("{other:?}"),
    }
    // Own topic granted at QoS 0 even when QoS 1 is asked.
    d.client
        .subscribe("/devices/1001/command", QoS::AtLeastOnce)
        .await
        .unwrap();
    match d.packet().await {
        Packet::SubAck(a) => assert_eq!(
            a.return_codes,
            vec![SubscribeReasonCode::Success(QoS::AtMostOnce)]
        ),
        other => panic!("{other:?}"),
    }
    // Publishing to another device's topic drops the connection.
    d.client
        .publish(
            "/devices/1002/event",
            QoS::AtLeastOnce,
            false,
            r#"{"eventType":"x"}"#,
        )
        .await
        .unwrap();
    d.closed().await;
    assert!(h.events(1002).is_empty());
    assert_eq!(h.stats().mqtt_sessions_dropped_acl, 1);
    wait_until(|| !h.is_connected(1001)).await;

    // So does an unknown topic of its own tree.
    let mut d = connect(emu.mqtt_addr(), 1001, K1).await;
    d.client
        .publish("/devices/1001/other", QoS::AtMostOnce, false, "x")
        .await
        .unwrap();
    d.closed().await;
    assert_eq!(h.stats().mqtt_sessions_dropped_acl, 2);
}

#[tokio::test]
async fn events_over_mqtt_and_rest_are_recorded_with_arrival_time() {
    let emu = start().await;
    let h = emu.handle();
    let http_addr = emu.http_addr();
    let mut d = connect(emu.mqtt_addr(), 1001, K1).await;
    let payload = r#"{"eventType":"temp","eventData":{"c":21.5,"n":12345678901234}}"#;
    match d
        .publish("/devices/1001/event".into(), payload.into())
        .await
    {
        Packet::PubAck(_) => {}
        other => panic!("expected PUBACK, got {other:?}"),
    }
    // QoS 0 too.
    d.client
        .publish(
            "/devices/1001/event",
            QoS::AtMostOnce,
            false,
            r#"{"eventType":"q0"}"#,
        )
        .await
        .unwrap();
    let r = http(
        http_addr,
        "PUT",
        "/devices/1001/event",
        Some(K1),
        Some(r#"{"eventType":"door","eventData":{"open":true}}"#),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(r.body.is_empty());

    let evs = h.wait_for_events(1001, 3, T).await;
    assert_eq!(evs.len(), 3);
    let mqtt_ev = evs.iter().find(|e| e.event_type == "temp").unwrap();
    assert_eq!(mqtt_ev.transport, Transport::Mqtt);
    assert!(mqtt_ev.transport == "mqtt");
    assert_eq!(mqtt_ev.raw, payload);
    assert_eq!(mqtt_ev.home_id, Some(42));
    assert_eq!(mqtt_ev.event_data, json!({"c":21.5,"n":12345678901234u64}));
    let q0 = evs.iter().find(|e| e.event_type == "q0").unwrap();
    assert_eq!(q0.event_data, json!({}));
    let rest_ev = evs.iter().find(|e| e.event_type == "door").unwrap();
    assert_eq!(rest_ev.transport, Transport::Rest);
    for e in &evs {
        // RFC 3339 UTC with nanoseconds: 2024-01-02T03:04:05.123456789Z
        let ts = &e.timestamp;
        assert_eq!(ts.len(), 30, "{ts}");
        assert!(
            ts.ends_with('Z') && &ts[10..11] == "T" && &ts[19..20] == ".",
            "{ts}"
        );
        assert!(ts.as_str() > "2024-01-01T00:00:00");
    }
    assert!(evs.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(h.all_events().len(), 3);

    // REST errors.
    let bad = http(
        http_addr,
        "PUT",
        "/devices/1001/event",
        Some(K1),
        Some(r#"{"eventData":{}}"#),
    )
    .await;
    assert_eq!((bad.status, bad.reason().as_str()), (400, "INVALID_INPUT"));
    let bad = http(
        http_addr,
        "PUT",
        "/devices/1001/event",
        Some(K1),
        Some("not json"),
    )
    .await;
    assert_eq!((bad.status, bad.reason().as_str()), (400, "INVALID_INPUT"));
    let bad = http(
        http_addr,
        "PUT",
        "/devices/1001/event",
        Some(K1),
        Some(r#"{"eventType":"x","eventData":[1]}"#),
    )
    .await;
    assert_eq!(bad.status, 400);
    let r = http(
        http_addr,
        "PUT",
        "/devices/1001/event",
        None,
        Some(r#"{"eventType":"x"}"#),
    )
    .await;
    assert_eq!(
        (r.status, r.reason().as_str()),
        (401, "AUTHORIZATION_REQUIRED")
    );
    assert_eq!(r.json()["data"], json!({}));
    let r = http(
        http_addr,
        "PUT",
        "/devices/1001/event",
        Some("v1.nope"),
        Some(r#"{"eventType":"x"}"#),
    )
    .await;
    assert_eq!(
        (r.status, r.reason().as_str()),
        (401, "UNAUTHENTICATED_CLIENT")
    );
    let r = http(
        http_addr,
        "PUT",
        "/devices/1002/event",
        Some(K1),
        Some(r#"{"eventType":"x"}"#),
    )
    .await;
    assert_eq!((r.status, r.reason().as_str()), (403, "PERMISSION_DENIED"));
    let r = http(
        http_addr,
        "PUT",
        "/devices/1001/event",
        Some(PK_ADMIN),
        Some(r#"{"eventType":"x"}"#),
    )
    .await;
    assert_eq!(r.status, 403);
    // Invalid MQTT events are acked and counted, not recorded.
    match d.publish("/devices/1001/event".into(), "{}".into()).await {
        Packet::PubAck(_) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(h.events(1001).len(), 3);
    assert_eq!(h.stats().events_rejected_invalid, 4);
    assert_eq!(h.stats().events_accepted, 3);

    // /auth and the device object.
    let r = http(http_addr, "GET", "/auth", Some(K1), None).await;
    assert_eq!(
        r.json(),
        json!({"type":"device","deviceId":1001,"projectId":7})
    );
    let r = http(http_addr, "GET", "/auth", Some("v1.bad"), None).await;
    assert_eq!((r.status, r.json()), (200, json!({"type":"nobody"})));
    let r = http(http_addr, "GET", "/auth", Some(USER), None).await;
    assert_eq!(r.json()["type"], "user");
    let r = http(http_addr, "GET", "/devices/1001", Some(K1), None).await;
    let dev = r.json();
    assert_eq!(
        (dev["id"].as_u64(), dev["homeId"].as_u64()),
        (Some(1001), Some(42))
    );
    assert_eq!(dev["isConnected"], true);
    assert_eq!(dev["projectId"], 7);
    let r = http(http_addr, "GET", "/devices/1002", Some(K1), None).await;
    assert_eq!(r.status, 403);
    let r = http(http_addr, "GET", "/devices/1002", Some(PK_READ), None).await;
    assert_eq!(
        (r.status, r.json()["isConnected"].as_bool()),
        (200, Some(false))
    );
    let r = http(http_addr, "GET", "/devices/5555", Some(PK_READ), None).await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn deactivated_home_acks_events_but_drops_them() {
    let emu = start().await;
    let h = emu.handle();
    let http_addr = emu.http_addr();
    assert!(h.set_home_deactivated(43, true));
    assert!(h.home_deactivated(43));
    let mut d = connect(emu.mqtt_addr(), 1003, K3).await;
    d.client
        .subscribe("/devices/1003/command", QoS::AtMostOnce)
        .await
        .unwrap();
    assert!(matches!(d.packet().await, Packet::SubAck(_)));
    match d
        .publish("/devices/1003/event".into(), r#"{"eventType":"t"}"#.into())
        .await
    {
        Packet::PubAck(_) => {}
        other => panic!("expected PUBACK, got {other:?}"),
    }
    let r = http(
        http_addr,
        "PUT",
        "/devices/1003/event",
        Some(K3),
        Some(r#"{"eventType":"t"}"#),
    )
    .await;
    assert_eq!(r.status, 204);
    assert!(h.events(1003).is_empty());
    assert_eq!(h.stats().events_dropped_deactivated, 2);

    // kv writes refused (REST 403, MQTT acked and dropped), commands refused.
    let r = http(
        http_addr,
        "PUT",
        "/devices/1003/kv/k",
        Some(K3),
        Some(r#"{"value":1}"#),
    )
    .await;
    assert_eq!((r.status, r.reason().as_str()), (403, "HOME_DEACTIVATED"));
    match d
        .publish(
            "/devices/1003/kv".into(),
            r#"{"action":"set","key":"k","value":1}"#.into(),
        )
        .await
    {
        Packet::PubAck(_) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(h.kv(1003), (0, vec![]));
    assert_eq!(h.stats().kv_writes_refused_deactivated, 2);
    let r = http(
        http_addr,
        "PUT",
        "/devices/1003/command",
        Some(PK_ADMIN),
        Some(r#"{"action":"x"}"#),
    )
    .await;
    assert_eq!((r.status, r.reason().as_str()), (403, "HOME_DEACTIVATED"));
    assert_eq!(
        h.send_command(1003, "x", json!({})),
        Err(CommandError::HomeDeactivated(1003))
    );
    // Other homes are unaffected; reactivation restores recording.
    let r = http(
        http_addr,
        "PUT",
        "/devices/1001/event",
        Some(K1),
        Some(r#"{"eventType":"t"}"#),
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(h.events(1001).len(), 1);
    h.set_home_deactivated(43, false);
    match d
        .publish("/devices/1003/event".into(), r#"{"eventType":"t2"}"#.into())
        .await
    {
        Packet::PubAck(_) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(h.wait_for_events(1003, 1, T).await.len(), 1);
}

#[tokio::test]
async fn kv_reload_on_subscribe_then_sets_with_rising_rev() {
    let emu = start().await;
    let h = emu.handle();
    let http_addr = emu.http_addr();
    // Seeded "a" is rev 1; an app write while the device is offline is rev 2.
    assert_eq!(h.set_kv(1001, "b", json!({"x": [1, 2]})), Ok(2));
    let mut d = connect(emu.mqtt_addr(), 1001, K1).await;
    d.client
        .subscribe("/devices/1001/kv", QoS::AtMostOnce)
        .await
        .unwrap();
    assert!(matches!(d.packet().await, Packet::SubAck(_)));
    let reload = d.publish_payload().await;
    assert_eq!(reload["action"], "reload");
    assert_eq!(reload["rev"], 2);
    assert_eq!(reload["numItems"], 2);
    let items = reload["items"].as_array().unwrap();
    assert_eq!(items[0]["key"], "a");
    assert_eq!(items[0]["value"], 1);
    assert_eq!(items[1]["value"], json!({"x": [1, 2]}));
    assert!(items[1]["modificationTime"]
        .as_str()
        .unwrap()
        .ends_with('Z'));

    // App-side writes are pushed with the new rev.
    assert_eq!(h.set_kv(1001, "c", json!("hi")), Ok(3));
    assert_eq!(
        d.publish_payload().await,
        json!({"action":"set","rev":3,"key":"c","value":"hi"})
    );
    let r = http(
        http_addr,
        "PUT",
        "/devices/1001/kv/d",
        Some(PK_ADMIN),
        Some(r#"{"value":true}"#),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(
        d.publish_payload().await,
        json!({"action":"set","rev":4,"key":"d","value":true})
    );
    // The device's own MQTT write: PUBACK, then echoed (default behaviour).
    match d
        .publish(
            "/devices/1001/kv".into(),
            r#"{"action":"set","key":"e","value":5}"#.into(),
        )
        .await
    {
        Packet::PubAck(_) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(
        d.publish_payload().await,
        json!({"action":"set","rev":5,"key":"e","value":5})
    );
    let r = http(http_addr, "DELETE", "/devices/1001/kv/c", Some(USER), None).await;
    assert_eq!(r.status, 204);
    assert_eq!(
        d.publish_payload().await,
        json!({"action":"delete","rev":6,"key":"c"})
    );

    // REST reads and errors.
    let r = http(http_addr, "GET", "/devices/1001/kv/e", Some(K1), None).await;
    assert_eq!(
        (r.json()["key"].clone(), r.json()["value"].clone()),
        (json!("e"), json!(5))
    );
    let r = http(http_addr, "GET", "/devices/1001/kv/zz", Some(K1), None).await;
    assert_eq!((r.status, r.reason().as_str()), (404, "KEY_NOT_FOUND"));
    let r = http(http_addr, "DELETE", "/devices/1001/kv/zz", Some(K1), None).await;
    assert_eq!((r.status, r.reason().as_str()), (404, "KEY_NOT_FOUND"));
    let r = http(
        http_addr,
        "PUT",
        "/devices/1001/kv/_bad",
        Some(K1),
        Some(r#"{"value":1}"#),
    )
    .await;
    assert_eq!((r.status, r.reason().as_str()), (400, "INVALID_KEY"));
    let r = http(
        http_addr,
        "PUT",
        "/devices/1001/kv/ok",
        Some(K1),
        Some(r#"{"nope":1}"#),
    )
    .await;
    assert_eq!((r.status, r.reason().as_str()), (400, "INVALID_INPUT"));
    let r = http(
        http_addr,
        "PUT",
        "/devices/1001/kv/ok",
        Some(PK_READ),
        Some(r#"{"value":1}"#),
    )
    .await;
    assert_eq!((r.status, r.reason().as_str()), (403, "PERMISSION_DENIED"));
    let r = http(
        http_addr,
        "PUT",
        "/devices/1001/kv/ok",
        Some(K2),
        Some(r#"{"value":1}"#),
    )
    .await;
    assert_eq!(r.status, 403);
    let r = http(
        http_addr,
        "GET",
        "/devices/1001/kv?keyPrefix=d",
        Some(PK_READ),
        None,
    )
    .await;
    let list = r.json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["key"], "d");
    let r = http(http_addr, "GET", "/devices/1001/kv", Some(K1), None).await;
    assert_eq!(r.json().as_array().unwrap().len(), 4);

    let (rev, items) = h.kv(1001);
    assert_eq!(rev, 6);
    let keys: Vec<&str> = items.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, vec!["a", "b", "d", "e"]);
    // A second subscribe gives a fresh reload.
    d.client
        .subscribe("/devices/1001/kv", QoS::AtMostOnce)
        .await
        .unwrap();
    assert!(matches!(d.packet().await, Packet::SubAck(_)));
    let reload = d.publish_payload().await;
    assert_eq!(
        (reload["rev"].as_u64(), reload["numItems"].as_u64()),
        (Some(6), Some(4))
    );
}

#[tokio::test]
async fn kv_echo_to_self_can_be_turned_off() {
    let emu = start_with(Behaviour {
        kv_echo_to_self: false,
        ..Behaviour::default()
    })
    .await;
    let mut d = connect(emu.mqtt_addr(), 1002, K2).await;
    let mut other = connect(emu.mqtt_addr(), 1002, K2).await;
    for c in [&mut d, &mut other] {
        c.client
            .subscribe("/devices/1002/kv", QoS::AtMostOnce)
            .await
            .unwrap();
        assert!(matches!(c.packet().await, Packet::SubAck(_)));
        assert_eq!(c.publish_payload().await["action"], "reload");
    }
    match d
        .publish(
            "/devices/1002/kv".into(),
            r#"{"action":"set","key":"k","value":1}"#.into(),
        )
        .await
    {
        Packet::PubAck(_) => {}
        other => panic!("{other:?}"),
    }
    // The other session of the same device gets it; the publisher does not.
    assert_eq!(other.publish_payload().await["rev"], 1);
    emu.handle().set_kv(1002, "k2", json!(2)).unwrap();
    assert_eq!(
        d.publish_payload().await["rev"],
        2,
        "no echo of rev 1 before rev 2"
    );
}

#[tokio::test]
async fn commands_reach_mqtt_and_websocket_and_offline_devices_are_refused() {
    let emu = start().await;
    let h = emu.handle();
    let http_addr = emu.http_addr();
    assert_eq!(
        h.send_command(1001, "ping", json!({})),
        Err(CommandError::DeviceOffline(1001))
    );
    let r = http(
        http_addr,
        "PUT",
        "/devices/1001/command",
        Some(PK_ADMIN),
        Some(r#"{"action":"ping"}"#),
    )
    .await;
    assert_eq!((r.status, r.reason().as_str()), (409, "DEVICE_OFFLINE"));

    let mut d = connect(emu.mqtt_addr(), 1001, K1).await;
    d.client
        .subscribe("/devices/1001/command", QoS::AtMostOnce)
        .await
        .unwrap();
    assert!(matches!(d.packet().await, Packet::SubAck(_)));
    let url = format!("ws://{http_addr}/devices/1001/command?authToken={K1}");
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("ws connects");
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{http_addr}/devices/1001/command")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Authorization", format!("ModeCloud {K1}").parse().unwrap());
    let (mut ws2, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("ws with header");
    wait_until(|| h.session_count(1001) == 3).await;

    let body = r#"{"action":"set","parameters":{"n":12345678901234567890,"f":1.50}}"#;
    let r = http(
        http_addr,
        "PUT",
        "/devices/1001/command",
        Some(PK_ADMIN),
        Some(body),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let expected = r#"{"action":"set","parameters":{"n":12345678901234567890,"f":1.50}}"#;
    match d.packet().await {
        Packet::Publish(p) => {
            assert_eq!(p.topic, "/devices/1001/command");
            assert_eq!(p.qos, QoS::AtMostOnce);
            assert_eq!(std::str::from_utf8(&p.payload).unwrap(), expected);
        }
        other => panic!("{other:?}"),
    }
    use futures_util::StreamExt;
    for w in [&mut ws, &mut ws2] {
        let msg = tokio::time::timeout(T, w.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(msg.into_text().unwrap().as_str(), expected);
    }
    // A user of the home may send commands too; the handle sends as an app.
    let r = http(
        http_addr,
        "PUT",
        "/devices/1001/command",
        Some(USER),
        Some(r#"{"action":"u"}"#),
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(
        d.publish_payload().await,
        json!({"action":"u","parameters":{}})
    );
    h.send_command(1001, "h", json!({"k": 1})).unwrap();
    assert_eq!(
        d.publish_payload().await,
        json!({"action":"h","parameters":{"k":1}})
    );

    // Permission and input errors.
    let r = http(
        http_addr,
        "PUT",
        "/devices/1001/command",
        Some(PK_READ),
        Some(r#"{"action":"x"}"#),
    )
    .await;
    assert_eq!((r.status, r.reason().as_str()), (403, "PERMISSION_DENIED"));
    let r = http(
        http_addr,
        "PUT",
        "/devices/1001/command",
        Some(K1),
        Some(r#"{"action":"x"}"#),
    )
    .await;
    assert_eq!(r.status, 403);
    let r = http(
        http_addr,
        "PUT",
        "/devices/1001/command",
        Some(PK_ADMIN),
        Some(r#"{"action":"x","parameters":[1]}"#),
    )
    .await;
    assert_eq!((r.status, r.reason().as_str()), (400, "INVALID_INPUT"));
    // WebSocket auth.
    let bad = format!("ws://{http_addr}/devices/1002/command?authToken={K1}");
    assert!(tokio_tungstenite::connect_async(bad).await.is_err());

    // The device disconnects: commands are refused again.
    drop(ws);
    drop(ws2);
    d.client.disconnect().await.unwrap();
    wait_until(|| !h.is_connected(1001)).await;
    let r = http(
        http_addr,
        "PUT",
        "/devices/1001/command",
        Some(PK_ADMIN),
        Some(r#"{"action":"ping"}"#),
    )
    .await;
    assert_eq!(r.status, 409);
    assert!(h.stats().command_deliveries >= 5);
}

#[tokio::test]
async fn offline_refuses_connections_and_online_rebinds_the_same_port() {
    let emu = start().await;
    let h = emu.handle();
    let (mqtt, http_addr) = (emu.mqtt_addr(), emu.http_addr());
    let mut d = connect(mqtt, 1001, K1).await;
    let url = format!("ws://{http_addr}/devices/1002/command?authToken={K2}");
    let (mut ws, _) = tokio_tungstenite::connect_async(url.clone()).await.unwrap();
    wait_until(|| h.is_connected(1002)).await;

    h.set_offline(true);
    assert!(h.is_offline());
    d.closed().await;
    use futures_util::StreamExt;
    let end = tokio::time::timeout(T, ws.next())
        .await
        .expect("ws closed in time");
    assert!(!matches!(
        end,
        Some(Ok(tokio_tungstenite::tungstenite::Message::Text(_)))
    ));
    let err = TcpStream::connect(mqtt).await.expect_err("listener closed");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    let r = http(http_addr, "GET", "/auth", Some(K1), None).await;
    assert_eq!(
        (r.status, r.reason().as_str()),
        (503, "SERVICE_UNAVAILABLE")
    );
    assert!(!h.is_connected(1001) && !h.is_connected(1002));
    // The control API still answers.
    let r = http(http_addr, "GET", "/_emulator/stats", None, None).await;
    assert_eq!(r.status, 200);

    h.set_offline(false);
    let _d = connect(mqtt, 1001, K1).await;
    assert_eq!(h.connect_count(1001), 2);
    let r = http(http_addr, "GET", "/auth", Some(K1), None).await;
    assert_eq!(r.status, 200);

    // Same again through the control API.
    assert_eq!(
        http(http_addr, "POST", "/_emulator/offline", None, None)
            .await
            .status,
        204
    );
    assert!(TcpStream::connect(mqtt).await.is_err());
    assert_eq!(
        http(http_addr, "POST", "/_emulator/online", None, None)
            .await
            .status,
        204
    );
    let _d = connect(mqtt, 1001, K1).await;
    assert_eq!(h.connect_count(1001), 3);
    let (_ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
}

#[tokio::test]
async fn rate_limit_drops_the_mqtt_session_and_answers_429_on_rest() {
    let emu = start_with(Behaviour {
        rate_limit_per_minute: Some(3),
        ..Behaviour::default()
    })
    .await;
    let h = emu.handle();
    let mut d = connect(emu.mqtt_addr(), 1001, K1).await;
    for i in 0..3 {
        let p = d
            .publish(
                "/devices/1001/event".into(),
                format!(r#"{{"eventType":"e{i}"}}"#),
            )
            .await;
        assert!(matches!(p, Packet::PubAck(_)), "{p:?}");
    }
    d.client
        .publish(
            "/devices/1001/event",
            QoS::AtLeastOnce,
            false,
            r#"{"eventType":"e3"}"#,
        )
        .await
        .unwrap();
    d.closed().await;
    assert_eq!(h.stats().mqtt_sessions_dropped_rate_limit, 1);
    assert_eq!(h.events(1001).len(), 3);

    // REST shares the window.
    let r = http(
        emu.http_addr(),
        "PUT",
        "/devices/1001/event",
        Some(K1),
        Some(r#"{"eventType":"r"}"#),
    )
    .await;
    assert_eq!(
        (r.status, r.reason().as_str()),
        (429, "RATE_LIMIT_EXCEEDED")
    );
    let retry: u32 = r.headers["retry-after"].parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let r = http(
        emu.http_addr(),
        "PUT",
        "/devices/1001/kv/k",
        Some(K1),
        Some(r#"{"value":1}"#),
    )
    .await;
    assert_eq!(r.status, 429);
    assert_eq!(h.stats().rest_rate_limited, 2);
    // Other devices have their own window; lifting the limit works at run time.
    let r = http(
        emu.http_addr(),
        "PUT",
        "/devices/1002/event",
        Some(K2),
        Some(r#"{"eventType":"r"}"#),
    )
    .await;
    assert_eq!(r.status, 204);
    h.set_rate_limit(None);
    let r = http(
        emu.http_addr(),
        "PUT",
        "/devices/1001/event",
        Some(K1),
        Some(r#"{"eventType":"r"}"#),
    )
    .await;
    assert_eq!(r.status, 204);
}

#[tokio::test]
async fn changing_deactivated_needs_an_admin_project_key() {
    let emu = start().await;
    let a = emu.http_addr();
    let r = http(
        a,
        "PATCH",
        "/homes/42",
        Some(PK_READ),
        Some(r#"{"deactivated":true}"#),
    )
    .await;
    assert_eq!((r.status, r.reason().as_str()), (403, "PERMISSION_DENIED"));
    let r = http(
        a,
        "PATCH",
        "/homes/42",
        Some(USER),
        Some(r#"{"deactivated":true}"#),
    )
    .await;
    assert_eq!(r.status, 403);
    assert!(!emu.handle().home_deactivated(42));
    let r = http(
        a,
        "PATCH",
        "/homes/42",
        Some(PK_ADMIN),
        Some(r#"{"deactivated":true}"#),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(emu.handle().home_deactivated(42));
    let r = http(a, "GET", "/homes/42", Some(PK_READ), None).await;
    let home = r.json();
    assert_eq!(
        (home["id"].as_u64(), home["deactivated"].as_bool()),
        (Some(42), Some(true))
    );
    assert_eq!(home["projectId"], 7);
    assert!(home["creationTime"].as_str().unwrap().ends_with('Z'));
    // Members may rename; devices may not read homes (default behaviour).
    let r = http(
        a,
        "PATCH",
        "/homes/42",
        Some(USER),
        Some(r#"{"name":"Casa"}"#),
    )
    .await;
    assert_eq!(r.status, 204);
    let r = http(a, "GET", "/homes/42", Some(USER), None).await;
    assert_eq!(r.json()["name"], "Casa");
    let r = http(a, "GET", "/homes/43", Some(USER), None).await;
    assert_eq!(r.status, 403);
    let r = http(a, "GET", "/homes/42", Some(K1), None).await;
    assert_eq!(r.status, 403);
    let r = http(a, "GET", "/homes/99", Some(PK_READ), None).await;
    assert_eq!(r.status, 404);
    let r = http(
        a,
        "PATCH",
        "/homes/42",
        Some(PK_ADMIN),
        Some(r#"{"deactivated":"yes"}"#),
    )
    .await;
    assert_eq!((r.status, r.reason().as_str()), (400, "INVALID_INPUT"));
    let r = http(
        a,
        "PATCH",
        "/homes/42",
        Some(PK_ADMIN),
        Some(r#"{"deactivated":false}"#),
    )
    .await;
    assert_eq!(r.status, 204);
    assert!(!emu.handle().home_deactivated(42));
}

#[tokio::test]
async fn connection_limit_and_dropped_sessions() {
    let emu = start().await;
    let h = emu.handle();
    let mut devs = Vec::new();
    for _ in 0..5 {
        devs.push(connect(emu.mqtt_addr(), 1001, K1).await);
    }
    assert_eq!(
        refused(options(emu.mqtt_addr(), "1001", K1)).await,
        ConnectReturnCode::ServiceUnavailable
    );
    // Other devices are not affected.
    let mut other = connect(emu.mqtt_addr(), 1002, K2).await;
    h.drop_session(1001);
    for d in &mut devs {
        d.closed().await;
    }
    assert!(!h.is_connected(1001));
    assert!(h.is_connected(1002));
    assert_eq!(h.connect_count(1001), 5);
    h.drop_sessions();
    other.closed().await;
    assert_eq!(h.stats().sessions_dropped_control, 6);
    let _again = connect(emu.mqtt_addr(), 1001, K1).await;
}

#[tokio::test]
async fn injected_faults() {
    let emu = start().await;
    let h = emu.handle();
    let a = emu.http_addr();
    h.set_faults(Faults {
        http_5xx: true,
        ..Faults::default()
    });
    let r = http(
        a,
        "PUT",
        "/devices/1001/event",
        Some(K1),
        Some(r#"{"eventType":"x"}"#),
    )
    .await;
    assert_eq!(
        (r.status, r.reason().as_str()),
        (503, "SERVICE_UNAVAILABLE")
    );
    // Faults over the control API, with a humantime delay.
    let r = http(
        a,
        "POST",
        "/_emulator/faults",
        None,
        Some(r#"{"http_429_retry_after":7,"delay":"50ms"}"#),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(h.faults().delay, Some(Duration::from_millis(50)));
    let t0 = std::time::Instant::now();
    let r = http(
        a,
        "PUT",
        "/devices/1001/event",
        Some(K1),
        Some(r#"{"eventType":"x"}"#),
    )
    .await;
    assert!(t0.elapsed() >= Duration::from_millis(50));
    assert_eq!(
        (r.status, r.reason().as_str()),
        (429, "RATE_LIMIT_EXCEEDED")
    );
    assert_eq!(r.headers["retry-after"], "7");
    assert!(h.events(1001).is_empty());

    // drop_after_publishes: the Nth publish is recorded but its PUBACK never comes.
    h.set_faults(Faults {
        drop_after_publishes: Some(2),
        ..Faults::default()
    });
    let mut d = connect(emu.mqtt_addr(), 1001, K1).await;
    assert!(matches!(
        d.publish("/devices/1001/event".into(), r#"{"eventType":"a"}"#.into())
            .await,
        Packet::PubAck(_)
    ));
    d.client
        .publish(
            "/devices/1001/event",
            QoS::AtLeastOnce,
            false,
            r#"{"eventType":"b"}"#,
        )
        .await
        .unwrap();
    d.closed().await;
    assert_eq!(h.events(1001).len(), 2);
    assert_eq!(h.stats().mqtt_sessions_dropped_fault, 1);

    h.set_faults(Faults {
        connack_code: Some(3),
        ..Faults::default()
    });
    assert_eq!(
        refused(options(emu.mqtt_addr(), "1001", K1)).await,
        ConnectReturnCode::ServiceUnavailable
    );
    h.set_faults(Faults {
        refuse_connections: true,
        ..Faults::default()
    });
    let mut d = spawn_dev(options(emu.mqtt_addr(), "1001", K1));
    assert!(d.next().await.is_err());
    h.set_faults(Faults::default());
    let _d = connect(emu.mqtt_addr(), 1001, K1).await;
}

#[tokio::test]
async fn malformed_and_silent_mqtt_clients_are_dropped() {
    use rumqttc::mqttbytes::v4::Connect;
    let emu = start().await;
    let h = emu.handle();
    // Garbage instead of CONNECT.
    let mut s = TcpStream::connect(emu.mqtt_addr()).await.unwrap();
    s.write_all(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x01])
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(T, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without answer");

    // A valid CONNECT with keepalive 1 s, then silence: dropped after ~1.5 s.
    let mut c = Connect::new("");
    c.keep_alive = 1;
    c.set_login("1001", K1);
    let mut out = bytes::BytesMut::new();
    c.write(&mut out).unwrap();
    let mut s = TcpStream::connect(emu.mqtt_addr()).await.unwrap();
    s.write_all(&out).await.unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    let t0 = std::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(1200) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    assert_eq!(h.stats().mqtt_sessions_dropped_keepalive, 1);

    // A packet larger than the limit closes the session; the server keeps serving.
    let mut o = options(emu.mqtt_addr(), "1001", K1);
    o.set_max_packet_size(8 << 20, 8 << 20);
    let mut d = spawn_dev(o);
    assert!(matches!(d.next().await, Ok(Packet::ConnAck(_))));
    let big = format!(
        r#"{{"eventType":"big","eventData":{{"s":"{}"}}}}"#,
        "x".repeat(2 << 20)
    );
    d.client
        .publish("/devices/1001/event", QoS::AtLeastOnce, false, big)
        .await
        .unwrap();
    d.closed().await;
    assert!(h.events(1001).is_empty());
    let _d = connect(emu.mqtt_addr(), 1001, K1).await;
    let r = http(emu.http_addr(), "GET", "/nowhere", None, None).await;
    assert_eq!((r.status, r.reason().as_str()), (404, "NOT_FOUND"));
}

#[tokio::test]
async fn control_api_inspects_and_steers() {
    let emu = start().await;
    let a = emu.http_addr();
    let h = emu.handle();
    let r = http(
        a,
        "PUT",
        "/devices/1002/event",
        Some(K2),
        Some(r#"{"eventType":"x","eventData":{"v":1}}"#),
    )
    .await;
    assert_eq!(r.status, 204);
    let r = http(a, "GET", "/_emulator/events?device=1002", None, None).await;
    let evs = r.json();
    assert_eq!(evs.as_array().unwrap().len(), 1);
    assert_eq!(evs[0]["eventType"], "x");
    assert_eq!(evs[0]["deviceId"], 1002);
    assert_eq!(evs[0]["transport"], "rest");
    let r = http(a, "GET", "/_emulator/events?device=1001", None, None).await;
    assert_eq!(r.json(), json!([]));
    let r = http(a, "GET", "/_emulator/stats", None, None).await;
    assert_eq!(r.json()["events_accepted"], 1);

    assert_eq!(
        http(a, "POST", "/_emulator/homes/42/deactivate", None, None)
            .await
            .status,
        204
    );
    assert!(h.home_deactivated(42));
    assert_eq!(
        http(a, "POST", "/_emulator/homes/42/activate", None, None)
            .await
            .status,
        204
    );
    assert!(!h.home_deactivated(42));
    assert_eq!(
        http(a, "POST", "/_emulator/homes/77/activate", None, None)
            .await
            .status,
        404
    );

    let r = http(
        a,
        "PUT",
        "/_emulator/devices/1002/kv/mode",
        None,
        Some(r#"{"value":"eco"}"#),
    )
    .await;
    assert_eq!((r.status, r.json()["rev"].as_u64()), (200, Some(1)));
    assert_eq!(h.kv(1002), (1, vec![("mode".to_string(), json!("eco"))]));
    let r = http(a, "GET", "/_emulator/devices/1002/kv", None, None).await;
    assert_eq!(r.json()["rev"], 1);

    let r = http(
        a,
        "POST",
        "/_emulator/devices/1002/command",
        None,
        Some(r#"{"action":"x"}"#),
    )
    .await;
    assert_eq!((r.status, r.reason().as_str()), (409, "DEVICE_OFFLINE"));
    let mut d = connect(emu.mqtt_addr(), 1002, K2).await;
    d.client
        .subscribe("/devices/1002/command", QoS::AtMostOnce)
        .await
        .unwrap();
    assert!(matches!(d.packet().await, Packet::SubAck(_)));
    let r = http(
        a,
        "POST",
        "/_emulator/devices/1002/command",
        None,
        Some(r#"{"action":"x","parameters":{"a":1}}"#),
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(
        d.publish_payload().await,
        json!({"action":"x","parameters":{"a":1}})
    );
    let r = http(a, "GET", "/_emulator/devices", None, None).await;
    let devs = r.json();
    let d2 = devs
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == 1002)
        .unwrap();
    assert_eq!(d2["connected"], true);
    assert_eq!(
        http(a, "POST", "/_emulator/drop_sessions", None, None)
            .await
            .status,
        204
    );
    d.closed().await;
    let r = http(
        a,
        "POST",
        "/_emulator/rate_limit",
        None,
        Some(r#"{"perMinute":1}"#),
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(
        http(a, "DELETE", "/_emulator/events", None, None)
            .await
            .status,
        204
    );
    assert!(h.all_events().is_empty());
}

#[tokio::test]
async fn seed_files_load_from_toml_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let toml_path = dir.path().join("seed.toml");
    std::fs::write(
        &toml_path,
        r#"
project_id = 1
[[home]]
id = 42
name = "Home"
[[device]]
id = 1234
api_key = "v1.ZHwxMjM0.1700000000.abcdef"
home_id = 42
name = "porch-temp"
kv = { mode = "eco", level = 3 }
[[project_key]]
key = "v1.cGt8MXxrMQ.1700000000.abcdef"
permissions = ["admin", "commands"]
[[user]]
key = "v1.dXN8MQ.xxx"
home_ids = [42]
"#,
    )
    .unwrap();
    let seed = Seed::from_file(&toml_path).unwrap();
    assert_eq!(seed.device[0].home_id, Some(42));
    assert_eq!(
        seed.project_key[0].permissions,
        vec![Permission::Admin, Permission::Commands]
    );
    assert!(!seed.home[0].deactivated);
    let dbg = format!("{seed:?}");
    assert!(
        !dbg.contains("abcdef") && !dbg.contains("xxx"),
        "keys leak in Debug: {dbg}"
    );

    let json_path = dir.path().join("seed.json");
    std::fs::write(&json_path, serde_json::to_string(&seed).unwrap()).unwrap();
    let again = Seed::from_file(&json_path).unwrap();
    assert_eq!(again.device[0].api_key, seed.device[0].api_key);

    let emu = Emulator::start(EmulatorConfig::local(again)).await.unwrap();
    assert_eq!(emu.handle().kv(1234).0, 2);
    let _d = connect(emu.mqtt_addr(), 1234, "v1.ZHwxMjM0.1700000000.abcdef").await;

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[device]]\nid = 1\napi_key = \"k\"\nhome_id = 9\n").unwrap();
    assert!(Seed::from_file(&bad).is_err(), "unknown home");
    std::fs::write(dir.path().join("seed.yaml"), "").unwrap();
    assert!(Seed::from_file(dir.path().join("seed.yaml")).is_err());
    std::fs::write(&bad, "[[device]]\nid = 1\napi_key = \"k\"\nbogus = 1\n").unwrap();
    assert!(Seed::from_file(&bad).is_err(), "unknown field");
}
