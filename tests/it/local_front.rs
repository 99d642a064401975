//! The local MQTT front against the real binary (`modehub run`) over real sockets: what stock
//! clients need (keepalive, acknowledged refusals, UNSUBACK, protocol level, takeover) and what
//! a hostile LAN must not achieve (planted commands, locked-out sensors, big pre-login buffers,
//! fast password guessing, forged log lines).

use crate::common::*;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use rumqttc::mqttbytes::v4::{
    Codec, Connect, ConnectReturnCode, LastWill, Login, Packet, Publish, Subscribe, Unsubscribe,
};
use rumqttc::mqttbytes::QoS;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::codec::Framed;

const BIN: &str = env!("CARGO_BIN_EXE_modehub");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `modehub run` child; its log goes to a file, printed if the test fails.
struct HubProc {
    child: Child,
    log: PathBuf,
    addr: SocketAddr,
}

impl HubProc {
    /// Starts the binary with `n` devices; `local` lines go into `[local.mqtt]`, `hub` lines
    /// into `[hub]`.
    async fn start(
        emu: &modehub::emulator::Emulator,
        dir: &Path,
        n: usize,
        hub: &str,
        local: &str,
    ) -> HubProc {
        let port = free_port();
        let text = hub_config_text(emu, dir, n, NO_PACING)
            .replace(
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"127.0.0.1:{port}\"\n{local}"),
            )
            .replace("[hub]\n", &format!("[hub]\nlog = \"info\"\n{hub}"))
            + "[ops]\nlisten = \"off\"\n";
        let cfg = dir.join("hub.toml");
        std::fs::write(&cfg, text).unwrap();
        let log = dir.join("hub.log");
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&cfg)
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start modehub");
        let h = HubProc {
            child,
            log,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !h.log_text().contains("local MQTT broker listening") {
            assert!(
                tokio::time::Instant::now() < deadline,
                "hub did not start:\n{}",
                h.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        h
    }

    fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let mut b = Vec::new();
            let _ = f.read_to_end(&mut b);
            s = String::from_utf8_lossy(&b).into_owned();
        }
        s
    }

    async fn wait_log(&self, what: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !self.log_text().contains(what) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {what:?} in the hub log"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for HubProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- hub log ----\n{}\n---- end ----", self.log_text());
        }
    }
}

type Raw = Framed<TcpStream, Codec>;

fn codec() -> Codec {
    Codec {
        max_incoming_size: 1 << 20,
        max_outgoing_size: 1 << 20,
    }
}

/// A hand-driven MQTT 3.1.1 client: sends exactly what a test says, nothing else (no pings).
async fn raw_connect(
    addr: SocketAddr,
    client_id: &str,
    user: &str,
    pass: &str,
    keep_alive: u16,
) -> (Raw, ConnectReturnCode) {
    raw_connect_with(addr, client_id, user, pass, keep_alive, None).await
}

async fn raw_connect_with(
    addr: SocketAddr,
    client_id: &str,
    user: &str,
    pass: &str,
    keep_alive: u16,
    will: Option<LastWill>,
) -> (Raw, ConnectReturnCode) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut raw = Framed::new(stream, codec());
    let mut c = Connect::new(client_id);
    c.keep_alive = keep_alive;
    c.login = Some(Login::new(user, pass));
    c.last_will = will;
    raw.send(Packet::Connect(c)).await.unwrap();
    let code = match next(&mut raw).await {
        Some(Packet::ConnAck(a)) => a.code,
        other => panic!("no CONNACK: {other:?}"),
    };
    (raw, code)
}

/// The next packet, or None when the hub closed the connection (20 s at most).
async fn next(raw: &mut Raw) -> Option<Packet> {
    match tokio::time::timeout(Duration::from_secs(20), raw.next()).await {
        Ok(Some(Ok(p))) => Some(p),
        Ok(_) => None,
        Err(_) => panic!("no packet and no close within 20 s"),
    }
}

fn publish(topic: &str, qos: QoS, pkid: u16, payload: impl Into<Bytes>) -> Packet {
    let mut p = Publish::new(topic, qos, payload.into());
    p.pkid = pkid;
    Packet::Publish(p)
}

/// Sends a QoS 1 publish and waits for its PUBACK (skipping other packets).
async fn publish_acked(raw: &mut Raw, topic: &str, pkid: u16, payload: impl Into<Bytes>) {
    raw.send(publish(topic, QoS::AtLeastOnce, pkid, payload))
        .await
        .unwrap();
    loop {
        match next(raw).await {
            Some(Packet::PubAck(a)) => {
                assert_eq!(a.pkid, pkid);
                return;
            }
            Some(_) => continue,
            None => panic!("hub closed the connection instead of PUBACK {pkid} on {topic}"),
        }
    }
}

/// Item 1: the front owns the keepalive; any packet counts, 0 turns it off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_counts_any_packet_and_zero_turns_it_off() {
    let emu = emulator(1).await;
    let dir = tempfile::tempdir().unwrap();
    let hub = HubProc::start(&emu, dir.path(), 1, "", "").await;
    // MQTT.js style: QoS 1 events every 0.4 s, keepalive 2 s, never a PINGREQ.
    let (mut c, code) = raw_connect(hub.addr, "mqttjs", "dev0", "pw0", 2).await;
    assert_eq!(code, ConnectReturnCode::Success);
    for i in 0..15u16 {
        publish_acked(&mut c, "/devices/dev0/event", i + 1, event_json(i as usize)).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(
        ns(&wait_events(&emu.handle(), device_id(0), 15).await).len(),
        15
    );

    // keepalive 0 is legal (no keepalive).
    let (mut z, code) = raw_connect(hub.addr, "zero", "dev0", "pw0", 0).await;
    assert_eq!(code, ConnectReturnCode::Success);
    publish_acked(&mut z, "/devices/dev0/event", 1, event_json(100)).await;

    // A silent client with keepalive 1 is closed by the hub (after 1.5 s).
    let (mut s, code) = raw_connect(hub.addr, "silent", "dev0", "pw0", 1).await;
    assert_eq!(code, ConnectReturnCode::Success);
    assert!(next(&mut s).await.is_none(), "silent client closed");
    hub.wait_log("within 1.5 x its keepalive").await;
    // A PINGREQ is answered.
    z.send(Packet::PingReq).await.unwrap();
    assert!(matches!(next(&mut z).await, Some(Packet::PingResp)));
}

/// Item 2: a refused publish is acknowledged and dropped, the device stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_publishes_are_acknowledged_and_the_device_stays() {
    let emu = emulator(2).await;
    let dir = tempfile::tempdir().unwrap();
    let hub = HubProc::start(&emu, dir.path(), 2, "", "").await;
    let (mut c, _) = raw_connect(hub.addr, "paho", "dev0", "pw0", 30).await;
    let refused = [
        "/devices/dev1/event",
        "/devices/101/event",
        "/devices/dev0/+",
        "/devices/dev0/#",
        "/devices/+/event",
        "/devices/dev0/command",
        "/devices/dev0/anything/else",
        "/elsewhere",
    ];
    for (i, t) in refused.iter().enumerate() {
        publish_acked(&mut c, t, i as u16 + 1, event_json(900 + i)).await;
    }
    // QoS 0 refused: dropped silently; QoS 2: PUBREC / PUBREL / PUBCOMP, dropped.
    c.send(publish(
        "/devices/dev1/event",
        QoS::AtMostOnce,
        0,
        event_json(950),
    ))
    .await
    .unwrap();
    c.send(publish(
        "/devices/dev0/event",
        QoS::ExactlyOnce,
        77,
        event_json(951),
    ))
    .await
    .unwrap();
    assert!(matches!(next(&mut c).await, Some(Packet::PubRec(r)) if r.pkid == 77));
    c.send(Packet::PubRel(rumqttc::mqttbytes::v4::PubRel::new(77)))
        .await
        .unwrap();
    assert!(matches!(next(&mut c).await, Some(Packet::PubComp(r)) if r.pkid == 77));
    // paho's resend of the same unacknowledged publish after a reconnect is acknowledged too.
    drop(c);
    let (mut c, _) = raw_connect(hub.addr, "paho", "dev0", "pw0", 30).await;
    let mut again = Publish::new("/devices/dev1/event", QoS::AtLeastOnce, event_json(900));
    again.pkid = 1;
    again.dup = true;
    c.send(Packet::Publish(again)).await.unwrap();
    assert!(matches!(next(&mut c).await, Some(Packet::PubAck(a)) if a.pkid == 1));
    // And the device's own events still go up.
    publish_acked(&mut c, "/devices/dev0/event", 2, event_json(1)).await;
    assert_eq!(
        ns(&wait_events(&emu.handle(), device_id(0), 1).await),
        vec![1]
    );
    assert!(emu.handle().events(device_id(1)).is_empty());
    hub.wait_log("dropped a publish").await;
}

/// A client that resends an unacknowledged QoS 1 publish on a timer (ESP-IDF's esp-mqtt does
/// after 1 s, shorter than the commit window at home rates) gets one PUBACK for it, and MODE
/// gets the event once: storing each copy would give one event several `_seq`s, duplicates no
/// consumer can tell apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retransmission_while_the_puback_is_owed_is_stored_once() {
    let emu = emulator(1).await;
    let dir = tempfile::tempdir().unwrap();
    let hub = HubProc::start(&emu, dir.path(), 1, "commit_window_ms = 3000\n", "").await;
    let (mut c, _) = raw_connect(hub.addr, "esp-mqtt", "dev0", "pw0", 30).await;
    // The uplink's first read of the outbox would end the commit window early.
    hub.wait_log("upstream session up").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let topic = "/devices/dev0/event";
    c.send(publish(topic, QoS::AtLeastOnce, 7, event_json(1)))
        .await
        .unwrap();
    // Resent (DUP set, same id) while the first copy waits for its group commit.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut again = Publish::new(topic, QoS::AtLeastOnce, event_json(1));
        again.pkid = 7;
        again.dup = true;
        c.send(Packet::Publish(again)).await.unwrap();
    }
    c.send(publish(topic, QoS::AtLeastOnce, 8, event_json(2)))
        .await
        .unwrap();
    // PUBACKs go out in publish order: a second PUBACK 7 would come before 8.
    let mut acked = Vec::new();
    while acked.last() != Some(&8) {
        match next(&mut c).await {
            Some(Packet::PubAck(a)) => acked.push(a.pkid),
            Some(_) => {}
            None => panic!("hub closed the connection; PUBACKs so far {acked:?}"),
        }
    }
    assert_eq!(acked, vec![7, 8]);
    // Per-device order is kept, so a stored copy would arrive before event 2.
    assert_eq!(
        ns(&wait_events(&emu.handle(), device_id(0), 2).await),
        vec![1, 2]
    );
    // Once acknowledged, the id is free again: the same id is a new publish.
    publish_acked(&mut c, topic, 7, event_json(3)).await;
    assert_eq!(
        ns(&wait_events(&emu.handle(), device_id(0), 3).await),
        vec![1, 2, 3]
    );
}

/// Item 3: UNSUBACK, CONNACK 0x01 for MQTT 5 and 3.1, and takeover by client id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsuback_protocol_level_and_takeover() {
    let emu = emulator(1).await;
    let dir = tempfile::tempdir().unwrap();
    let hub = HubProc::start(&emu, dir.path(), 1, "", "").await;
    let (mut c, _) = raw_connect(hub.addr, "u", "dev0", "pw0", 30).await;
    c.send(Packet::Subscribe(Subscribe::new(
        "/devices/dev0/command",
        QoS::AtLeastOnce,
    )))
    .await
    .unwrap();
    assert!(matches!(next(&mut c).await, Some(Packet::SubAck(_))));
    for (pkid, topic) in [(5, "/devices/dev0/command"), (6, "/devices/dev0/never")] {
        let mut u = Unsubscribe::new(topic);
        u.pkid = pkid;
        c.send(Packet::Unsubscribe(u)).await.unwrap();
        assert!(
            matches!(next(&mut c).await, Some(Packet::UnsubAck(a)) if a.pkid == pkid),
            "UNSUBACK for {topic}"
        );
    }

    // MQTT 5 CONNECT (protocol level 5, with an empty property block) and MQTT 3.1 (MQIsdp).
    let v5: &[u8] = &[
        0x10, 0x10, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 30, 0, 0, 3, b'a', b'b', b'c',
    ];
    let v3: &[u8] = &[
        0x10, 0x11, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x02, 0, 30, 0, 3, b'a', b'b',
        b'c',
    ];
    for (what, bytes) in [("MQTT 5", v5), ("MQTT 3.1", v3)] {
        let mut s = TcpStream::connect(hub.addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let mut ack = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut ack))
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer"))
            .unwrap_or_else(|e| panic!("{what}: closed without CONNACK: {e}"));
        assert_eq!(ack, [0x20, 0x02, 0x00, 0x01], "{what}");
    }

    // Same device, same client id: the new connection takes over; another id: both stay.
    let (mut first, _) = raw_connect(hub.addr, "sensor-a", "dev0", "pw0", 30).await;
    let (mut other, _) = raw_connect(hub.addr, "sensor-b", "dev0", "pw0", 30).await;
    let (mut second, code) = raw_connect(hub.addr, "sensor-a", "dev0", "pw0", 30).await;
    assert_eq!(code, ConnectReturnCode::Success);
    assert!(
        next(&mut first).await.is_none(),
        "old connection taken over"
    );
    publish_acked(&mut second, "/devices/dev0/event", 1, event_json(1)).await;
    publish_acked(&mut other, "/devices/dev0/event", 1, event_json(2)).await;
    hub.wait_log("taken over by a new connection").await;
}

/// Item 5: nothing a device publishes is kept or replayed as a command; Wills are events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_cannot_plant_commands_or_retain_anything() {
    let emu = emulator(1).await;
    let dir = tempfile::tempdir().unwrap();
    let hub = HubProc::start(&emu, dir.path(), 1, "", "").await;
    let (mut c, _) = raw_connect(hub.addr, "planter", "dev0", "pw0", 30).await;
    for (i, t) in [
        "/devices/dev0/command",
        "/devices/100/command",
        "/devices/dev0/x",
    ]
    .iter()
    .enumerate()
    {
        let mut p = Publish::new(*t, QoS::AtLeastOnce, r#"{"action":"fake","parameters":{}}"#);
        p.retain = true;
        p.pkid = i as u16 + 1;
        c.send(Packet::Publish(p)).await.unwrap();
        assert!(matches!(next(&mut c).await, Some(Packet::PubAck(_))));
    }
    // A Will on the command topic (retained) is refused at login.
    let will = LastWill::new(
        "/devices/dev0/command",
        r#"{"action":"fake"}"#,
        QoS::AtLeastOnce,
        true,
    );
    let (_, code) = raw_connect_with(hub.addr, "w", "dev0", "pw0", 30, Some(will)).await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
    // Subscriptions only to the device's command and kv topics.
    let mut s = Sensor::connect(hub.addr, "dev0", "pw0").await;
    let ack = s.subscribe("/devices/dev0/x").await;
    assert_eq!(
        ack.return_codes,
        vec![rumqttc::SubscribeReasonCode::Failure]
    );
    // The next subscriber gets MODE's command first, never the planted one.
    let ack = s.subscribe("/devices/dev0/command").await;
    assert!(matches!(
        ack.return_codes[0],
        rumqttc::SubscribeReasonCode::Success(_)
    ));
    send_command(&emu, device_id(0), "real", serde_json::json!({})).await;
    let got = s
        .next_publish(Duration::from_secs(20))
        .await
        .expect("command");
    assert!(
        String::from_utf8_lossy(&got.payload).contains("real"),
        "{:?}",
        got.payload
    );
    // A Will on the event topic becomes an event when the device vanishes.
    let will = LastWill::new(
        "/devices/dev0/event",
        r#"{"eventType":"gone","eventData":{"n":77}}"#,
        QoS::AtLeastOnce,
        true,
    );
    let (w, code) = raw_connect_with(hub.addr, "w2", "dev0", "pw0", 30, Some(will)).await;
    assert_eq!(code, ConnectReturnCode::Success);
    drop(w);
    let evs = wait_events(&emu.handle(), device_id(0), 1).await;
    assert_eq!(evs[0].event_type, "gone");
}

/// Binds to `ip` (a loopback address other than 127.0.0.1: another peer) and connects.
async fn connect_from(ip: &str, addr: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    sock.connect(addr).await.unwrap()
}

/// Item 6: 400 idle connections do not lock a real sensor out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_lock_a_sensor_out() {
    let emu = emulator(1).await;
    let dir = tempfile::tempdir().unwrap();
    let hub = HubProc::start(&emu, dir.path(), 1, "", "").await;
    let mut idle = Vec::new();
    for _ in 0..400 {
        idle.push(connect_from("127.0.0.2", hub.addr).await);
    }
    // Also from the sensor's own address (a NAT, or a scanner on the same host).
    for _ in 0..20 {
        idle.push(connect_from("127.0.0.1", hub.addr).await);
    }
    let mut s = Sensor::connect(hub.addr, "dev0", "pw0").await;
    s.publish_all("/devices/dev0/event", vec![event_json(1)])
        .await;
    assert_eq!(
        ns(&wait_events(&emu.handle(), device_id(0), 1).await),
        vec![1]
    );
    // The idle ones are closed (evicted or after the pre-login deadline).
    let mut last = idle.pop().unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(20), last.read(&mut buf))
        .await
        .expect("idle connection closed by the hub")
        .unwrap_or(0);
    assert_eq!(n, 0);
    // Logs about them are throttled.
    hub.wait_log("closed a local MQTT connection that had not logged in")
        .await;
    let lines = hub
        .log_text()
        .lines()
        .filter(|l| l.contains("had not logged in") || l.contains("refusing"))
        .count();
    assert!(lines <= 20, "{lines} log lines about idle connections");
}

/// A burst of logins from one address (a gateway, or sensors behind one NAT reconnecting after
/// a restart) all get in: the front lets each accepted connection log in before it accepts the
/// next, so they are not all pending at once, when the oldest beyond
/// `max_unauthenticated_per_peer` (8) would be evicted before being read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_logins_from_one_address_all_get_in() {
    use nix::sys::signal::{kill, Signal};
    let emu = emulator(1).await;
    let dir = tempfile::tempdir().unwrap();
    let hub = HubProc::start(&emu, dir.path(), 1, "", "").await;
    let pid = nix::unistd::Pid::from_raw(hub.child.id() as i32);
    // Stopped, the hub accepts nothing: the kernel queues every connection and its CONNECT,
    // and the hub finds all of them at once when it goes on.
    kill(pid, Signal::SIGSTOP).unwrap();
    let mut raws = Vec::new();
    for i in 0..24 {
        let mut raw = Framed::new(TcpStream::connect(hub.addr).await.unwrap(), codec());
        let mut c = Connect::new(format!("burst-{i}"));
        c.login = Some(Login::new("dev0", "pw0"));
        raw.send(Packet::Connect(c)).await.unwrap();
        raws.push(raw);
    }
    kill(pid, Signal::SIGCONT).unwrap();
    for (i, raw) in raws.iter_mut().enumerate() {
        match next(raw).await {
            Some(Packet::ConnAck(a)) => {
                assert_eq!(a.code, ConnectReturnCode::Success, "connection {i}")
            }
            other => panic!("connection {i}: {other:?} instead of a CONNACK"),
        }
    }
}

/// Item 7: before login a connection cannot make the hub buffer a big packet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prelogin_packets_are_small() {
    let emu = emulator(1).await;
    let dir = tempfile::tempdir().unwrap();
    let hub = HubProc::start(&emu, dir.path(), 1, "max_payload_bytes = 1048576\n", "").await;
    // A CONNECT header announcing 1 MiB (remaining length 0x100000), then the bytes.
    let mut s = TcpStream::connect(hub.addr).await.unwrap();
    s.write_all(&[0x10, 0x80, 0x80, 0x40]).await.unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let mut refused = false;
    for _ in 0..16 {
        if s.write_all(&chunk).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "the hub read a 1 MiB packet before login");
    // A normal login still works.
    let (_c, code) = raw_connect(hub.addr, "ok", "dev0", "pw0", 30).await;
    assert_eq!(code, ConnectReturnCode::Success);
}

/// Item 8: failed logins of one peer are answered later and later; another peer's good login
/// is not held up by them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_slow_down_that_peer_only() {
    let emu = emulator(1).await;
    let dir = tempfile::tempdir().unwrap();
    let hub = HubProc::start(&emu, dir.path(), 1, "", "").await;
    async fn attempt(ip: &str, addr: SocketAddr, pass: &str) -> Raw {
        let mut raw = Framed::new(connect_from(ip, addr).await, codec());
        let mut c = Connect::new("guess");
        c.login = Some(Login::new("dev0", pass));
        raw.send(Packet::Connect(c)).await.unwrap();
        raw
    }
    for i in 0..5 {
        let mut a = attempt("127.0.0.2", hub.addr, &format!("guess{i}")).await;
        assert!(
            matches!(next(&mut a).await, Some(Packet::ConnAck(c)) if c.code == ConnectReturnCode::BadUserNamePassword)
        );
    }
    // The guesser's next try is answered after a delay; meanwhile a good login from another
    // peer is answered at once.
    let mut slow = attempt("127.0.0.2", hub.addr, "guess-again").await;
    let mut good = attempt("127.0.0.1", hub.addr, "pw0").await;
    let first = tokio::select! {
        biased;
        p = next(&mut good) => ("good", p),
        p = next(&mut slow) => ("guess", p),
    };
    assert!(
        matches!(&first, ("good", Some(Packet::ConnAck(c))) if c.code == ConnectReturnCode::Success),
        "{first:?}"
    );
    assert!(
        matches!(next(&mut slow).await, Some(Packet::ConnAck(c)) if c.code == ConnectReturnCode::BadUserNamePassword)
    );
}

/// Item 9: attacker text in logs is escaped and cut; unknown usernames are not logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_safe_under_attack() {
    let emu = emulator(1).await;
    let dir = tempfile::tempdir().unwrap();
    let hub = HubProc::start(&emu, dir.path(), 1, "", "").await;
    let secretish = "hunter2-typed-in-the-user-field";
    for user in [
        format!("{secretish}\n2026-01-01T00:00:00Z  INFO FORGED line \x1b[31mred"),
        "x".repeat(6000),
    ] {
        let (_, code) = raw_connect(hub.addr, "c", &user, "pw", 30).await;
        assert_eq!(code, ConnectReturnCode::BadUserNamePassword);
    }
    let (_, code) = raw_connect(hub.addr, "c", "dev0", "wrong", 30).await;
    assert_eq!(code, ConnectReturnCode::BadUserNamePassword);
    let (mut c, _) = raw_connect(hub.addr, "c", "dev0", "pw0", 30).await;
    publish_acked(
        &mut c,
        &format!("/devices/dev0/x\nFORGED {}", "y".repeat(5000)),
        1,
        "{}",
    )
    .await;
    hub.wait_log("wrong password").await;
    hub.wait_log("dropped a publish").await;
    let log = hub.log_text();
    assert!(!log.contains(secretish), "unknown username logged");
    assert!(!log.contains('\x1b'), "raw ESC in the log");
    assert!(
        !log.lines()
            .any(|l| l.contains("FORGED") && !l.contains("\\n")),
        "forged line"
    );
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 1000, "a {longest}-byte log line");
}

/// Item 15: short connections, one after another (battery sensors), each get in and are
/// acknowledged; nothing of a closed connection is left to trip a later one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_churn_leaves_nothing_behind() {
    let emu = emulator(1).await;
    let dir = tempfile::tempdir().unwrap();
    let hub = HubProc::start(&emu, dir.path(), 1, "", "").await;
    for i in 0..300u16 {
        // A fresh client id each time, as many sensors do.
        let (mut c, code) = raw_connect(hub.addr, &format!("battery-{i}"), "dev0", "pw0", 30).await;
        assert_eq!(code, ConnectReturnCode::Success, "connection {i}");
        publish_acked(&mut c, "/devices/dev0/event", 1, event_json(i as usize)).await;
        c.send(Packet::Disconnect).await.unwrap();
    }
    assert_eq!(
        wait_events(&emu.handle(), device_id(0), 300).await.len(),
        300
    );
}

/// A CA and a server certificate for 127.0.0.1 signed by it, made with the openssl CLI;
/// returns the CA certificate (PEM).
fn make_certs(dir: &Path) -> Vec<u8> {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (apt install openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-days",
            "2",
            "-subj",
            "/CN=test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
    ]);
    std::fs::read(dir.join("ca.pem")).unwrap()
}

/// Item 14: TLS on the local port, with a stock client (rumqttc over rustls).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_the_local_port() {
    let emu = emulator(1).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = make_certs(dir.path());
    // Relative paths: resolved against the config file's directory.
    let hub = HubProc::start(
        &emu,
        dir.path(),
        1,
        "",
        "tls_cert_file = \"server.pem\"\ntls_key_file = \"server.key\"\n",
    )
    .await;
    let mut o = rumqttc::MqttOptions::new("tls-sensor", "127.0.0.1", hub.addr.port());
    o.set_credentials("dev0", "pw0");
    o.set_transport(rumqttc::Transport::tls(ca, None, None));
    let (client, mut el) = rumqttc::AsyncClient::new(o, 10);
    client
        .publish(
            "/devices/dev0/event",
            rumqttc::QoS::AtLeastOnce,
            false,
            event_json(5),
        )
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(20), el.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => break,
            Ok(Ok(_)) => continue,
            other => panic!("MQTT over TLS: {other:?}"),
        }
    }
    assert_eq!(
        ns(&wait_events(&emu.handle(), device_id(0), 1).await),
        vec![5]
    );
    // Plain MQTT on the TLS port gets no CONNACK.
    let mut raw = Framed::new(TcpStream::connect(hub.addr).await.unwrap(), codec());
    let mut c = Connect::new("plain");
    c.login = Some(Login::new("dev0", "pw0"));
    raw.send(Packet::Connect(c)).await.unwrap();
    assert!(next(&mut raw).await.is_none());
    hub.wait_log("tls=true").await;
}
