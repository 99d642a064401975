//! The lean client against real sockets: a scripted peer built on the same codec (framing split
//! across reads, keepalive, limits, buffers given back), and Debian's stock `mosquitto` when it
//! is installed (an independent broker). No timing is asserted: keepalives are short only so
//! the tests end quickly.

use super::*;
use bytes::Bytes;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, PubAck, Publish};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn limits(keepalive_ms: u64) -> Limits {
    Limits {
        max_incoming: 64 * 1024,
        max_outgoing: 4096,
        keepalive: Duration::from_millis(keepalive_ms),
    }
}

fn target(port: u16) -> Target {
    Target {
        host: "127.0.0.1".into(),
        port,
        tls: None,
        ws_path: None,
    }
}

fn connect_packet() -> Connect {
    let mut c = Connect::new("");
    c.keep_alive = 30;
    c.login = Some(Login::new("1234", "secret-key"));
    c
}

/// The server side of one connection: reads whole packets, writes raw bytes.
struct Peer {
    sock: TcpStream,
    buf: BytesMut,
}

impl Peer {
    async fn accept(l: &TcpListener) -> Peer {
        let (sock, _) = l.accept().await.unwrap();
        Peer {
            sock,
            buf: BytesMut::new(),
        }
    }

    async fn read(&mut self) -> Option<Packet> {
        loop {
            match Packet::read(&mut self.buf, 1 << 20) {
                Ok(p) => return Some(p),
                Err(CodecError::InsufficientBytes(_)) => {}
                Err(e) => panic!("bad packet from the client: {e:?}"),
            }
            if self.sock.read_buf(&mut self.buf).await.unwrap() == 0 {
                return None;
            }
        }
    }

    async fn write(&mut self, p: Packet) {
        let mut b = BytesMut::new();
        p.write(&mut b, 1 << 24).unwrap();
        self.sock.write_all(&b).await.unwrap();
    }

    async fn connack(&mut self) -> Connect {
        let Some(Packet::Connect(c)) = self.read().await else {
            panic!("no CONNECT first");
        };
        self.write(Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            false,
        )))
        .await;
        c
    }
}

async fn pair(keepalive_ms: u64) -> (Conn, Peer) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        let c = p.connack().await;
        (p, c)
    });
    let (conn, ack) = Conn::open(&target(port), &connect_packet(), limits(keepalive_ms))
        .await
        .unwrap();
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let (peer, c) = server.await.unwrap();
    let login = c.login.unwrap();
    assert_eq!(
        (login.username.as_str(), c.client_id.as_str()),
        ("1234", "")
    );
    (conn, peer)
}

#[tokio::test]
async fn publishes_frame_as_mqtt_and_split_packets_are_reassembled() {
    let (mut conn, mut peer) = pair(60_000).await;
    let payload = vec![b'x'; 300]; // a two-byte remaining length
    conn.send_publish_qos1(7, "/devices/1234/event", &payload)
        .unwrap();
    conn.send_publish_qos1(8, "/devices/1234/event", b"{}")
        .unwrap();
    let client = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < 3 {
            match conn.next(None).await.unwrap() {
                Event::Packet(p) => got.push(p),
                Event::Deadline => panic!("no deadline was set"),
            }
        }
        (conn, got)
    });
    for pkid in [7, 8] {
        let Some(Packet::Publish(p)) = peer.read().await else {
            panic!("expected a PUBLISH");
        };
        assert_eq!(
            (p.qos, p.pkid, p.topic.as_str()),
            (QoS::AtLeastOnce, pkid, "/devices/1234/event")
        );
        assert_eq!(p.payload.len(), if pkid == 7 { 300 } else { 2 });
    }
    // Two PUBACKs and a 20 KB PUBLISH, dribbled out a few bytes at a time.
    let mut bytes = BytesMut::new();
    Packet::PubAck(PubAck::new(7))
        .write(&mut bytes, 1 << 20)
        .unwrap();
    Packet::PubAck(PubAck::new(8))
        .write(&mut bytes, 1 << 20)
        .unwrap();
    let big = Publish::new("/devices/1234/kv", QoS::AtMostOnce, vec![b'k'; 20_000]);
    Packet::Publish(big).write(&mut bytes, 1 << 20).unwrap();
    for chunk in bytes.chunks(997) {
        peer.sock.write_all(chunk).await.unwrap();
        tokio::task::yield_now().await;
    }
    let (conn, got) = client.await.unwrap();
    assert!(
        matches!(got[0], Packet::PubAck(PubAck { pkid: 7 })),
        "{:?}",
        got[0]
    );
    assert!(
        matches!(got[1], Packet::PubAck(PubAck { pkid: 8 })),
        "{:?}",
        got[1]
    );
    let Packet::Publish(p) = &got[2] else {
        panic!("expected the kv PUBLISH");
    };
    assert_eq!(p.topic, "/devices/1234/kv");
    assert_eq!(p.payload, Bytes::from(vec![b'k'; 20_000]));
    // The big packet's room is not kept once it is through.
    assert_eq!(conn.buffered_capacity(), 0);
}

#[tokio::test]
async fn keepalive_pings_and_a_dead_peer_ends_the_connection() {
    let (mut conn, mut peer) = pair(150).await;
    // An answering peer: the connection lives through several keepalives.
    let answering = tokio::spawn(async move {
        for _ in 0..3 {
            assert!(matches!(peer.read().await, Some(Packet::PingReq)));
            peer.write(Packet::PingResp).await;
        }
        peer
    });
    let mut pongs = 0;
    while pongs < 3 {
        match conn.next(None).await.unwrap() {
            Event::Packet(Packet::PingResp) => pongs += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    let mut peer = answering.await.unwrap();
    // Between pings nothing is held for reading or writing.
    assert_eq!(conn.buffered_capacity(), 0);
    // A peer that stops answering (but keeps the socket open): the next tick ends it.
    let silent = tokio::spawn(async move { while peer.read().await.is_some() {} });
    match conn.next(None).await {
        Err(WireError::PingTimeout(d)) => assert_eq!(d, Duration::from_millis(150)),
        other => panic!("expected a ping timeout, got {other:?}"),
    }
    drop(conn);
    silent.await.unwrap();
}

#[tokio::test]
async fn deadlines_come_back_to_the_caller_and_limits_hold() {
    let (mut conn, mut peer) = pair(60_000).await;
    let soon = Instant::now() + Duration::from_millis(20);
    assert!(matches!(conn.next(Some(soon)).await, Ok(Event::Deadline)));
    // Over the outgoing limit: refused before anything is written.
    match conn.send_publish_qos1(1, "t", &[0; 5000]) {
        Err(WireError::OutgoingTooLarge { limit: 4096, .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(conn.buffered_capacity(), 0);
    // Over the incoming limit: the header alone ends the connection, with the size.
    let mut bytes = BytesMut::new();
    let huge = Publish::new("/devices/1234/kv", QoS::AtMostOnce, vec![0; 70_000]);
    Packet::Publish(huge).write(&mut bytes, 1 << 20).unwrap();
    peer.sock.write_all(&bytes[..100]).await.unwrap();
    match conn.next(None).await {
        Err(WireError::TooLarge { size, limit }) => {
            assert_eq!((size, limit), (70_000 + 2 + 16, 64 * 1024))
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

#[tokio::test]
async fn the_server_closing_is_an_error_not_a_hang() {
    let (mut conn, peer) = pair(60_000).await;
    drop(peer);
    assert!(matches!(
        conn.next(None).await,
        Err(WireError::Closed | WireError::Io(_))
    ));
}

fn mosquitto_bin() -> Option<&'static str> {
    let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    if bin.is_none() {
        // CI installs it and sets MODEHUB_COMPAT_REQUIRED=1: there a missing peer is a failure.
        assert!(
            std::env::var_os("MODEHUB_COMPAT_REQUIRED").is_none(),
            "mosquitto is not installed (apt-get install mosquitto) and MODEHUB_COMPAT_REQUIRED is set"
        );
        eprintln!("mosquitto is not installed; skipping");
    }
    bin
}

/// Starts mosquitto with `listener` lines (after `listener PORT 127.0.0.1`) and connects to it
/// as `target` would, retrying while it comes up.
async fn mosquitto(
    bin: &str,
    dir: &std::path::Path,
    extra: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> (tokio::process::Child, Conn) {
    mosquitto_with_keepalive(bin, dir, extra, tls, 5).await
}

async fn mosquitto_with_keepalive(
    bin: &str,
    dir: &std::path::Path,
    extra: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
    keepalive_secs: u16,
) -> (tokio::process::Child, Conn) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let conf = dir.join("m.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\n{extra}"),
    )
    .unwrap();
    let broker = tokio::process::Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .kill_on_drop(true)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Target {
        tls,
        ..target(port)
    };
    let mut last = None;
    for _ in 0..100 {
        let mut c = Connect::new("modehub-wire-test");
        c.keep_alive = keepalive_secs;
        match Conn::open(&t, &c, limits(u64::from(keepalive_secs) * 1000)).await {
            Ok((conn, ack)) => {
                assert_eq!(ack.code, ConnectReturnCode::Success);
                return (broker, conn);
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cannot connect to mosquitto: {last:?}");
}

/// Subscribe at QoS 0, publish at QoS 1 to the same topic, get the PUBACK and the message back.
async fn round_trip(conn: &mut Conn) {
    let mut sub = Subscribe::new("t/1", QoS::AtMostOnce);
    sub.pkid = 1;
    conn.send(&Packet::Subscribe(sub)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = (false, false, false); // SUBACK, PUBACK, the message
    while seen != (true, true, true) {
        match tokio::time::timeout_at(deadline, conn.next(None)).await {
            Err(_) => panic!("mosquitto did not answer: {seen:?}"),
            Ok(Err(e)) => panic!("{e}"),
            Ok(Ok(Event::Packet(Packet::SubAck(a)))) => {
                assert_eq!(a.pkid, 1);
                seen.0 = true;
                conn.send_publish_qos1(2, "t/1", b"hello").unwrap();
            }
            Ok(Ok(Event::Packet(Packet::PubAck(a)))) => {
                assert_eq!(a.pkid, 2);
                seen.1 = true;
            }
            Ok(Ok(Event::Packet(Packet::Publish(p)))) => {
                assert_eq!((p.topic.as_str(), &p.payload[..]), ("t/1", &b"hello"[..]));
                seen.2 = true;
            }
            Ok(Ok(other)) => panic!("unexpected {other:?}"),
        }
    }
}

/// Debian's mosquitto as the peer (skipped when it is not installed).
#[tokio::test]
async fn against_a_stock_mosquitto() {
    let Some(bin) = mosquitto_bin() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (mut broker, mut conn) = mosquitto(bin, dir.path(), "", None).await;
    round_trip(&mut conn).await;
    conn.close().await;
    let _ = broker.kill().await;
}

/// Mosquitto enforces the keepalive we declare (it drops a client silent for 1.5x of it): with
/// a 1 s keepalive the connection lives through publishes with no PINGREQ between them, then
/// through idle seconds kept alive by PINGREQs, and still works at the end.
#[tokio::test]
async fn a_stock_mosquitto_keeps_us_through_traffic_and_idle_time() {
    let Some(bin) = mosquitto_bin() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (mut broker, mut conn) = mosquitto_with_keepalive(bin, dir.path(), "", None, 1).await;
    let mut pongs = 0;
    let mut pkid = 10;
    // ~3 keepalives of publishes every 0.3 s, then ~3 idle keepalives.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(6) {
        if started.elapsed() < Duration::from_secs(3) {
            pkid += 1;
            conn.send_publish_qos1(pkid, "t/2", b"x").unwrap();
        }
        let until = Instant::now() + Duration::from_millis(300);
        loop {
            match conn.next(Some(until)).await {
                Ok(Event::Deadline) => break,
                Ok(Event::Packet(Packet::PingResp)) => pongs += 1,
                Ok(Event::Packet(_)) => {}
                Err(e) => panic!("mosquitto dropped us after {:?}: {e}", started.elapsed()),
            }
        }
    }
    assert!(pongs >= 1, "idle time without a PINGREQ answered");
    round_trip(&mut conn).await;
    conn.close().await;
    let _ = broker.kill().await;
}

/// The same over TLS (`mqtts://`), with a CA made by `openssl` for the test (skipped when
/// mosquitto or openssl is missing). The server's files are readable by all: mosquitto started
/// as root reads them as its own user.
#[tokio::test]
async fn against_a_stock_mosquitto_over_tls() {
    let Some(bin) = mosquitto_bin() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sh = format!(
        "cd {} && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
         -keyout ca.key -out ca.pem -subj /CN=test-ca -days 2 && \
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout srv.key \
         -out srv.csr -subj /CN=127.0.0.1 && \
         printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\n' > ext && \
         openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem \
         -days 2 -extfile ext && chmod 755 . && chmod 644 srv.pem srv.key",
        d.display()
    );
    let made = std::process::Command::new("sh")
        .arg("-c")
        .arg(&sh)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    if !made.is_ok_and(|s| s.success()) {
        assert!(
            std::env::var_os("MODEHUB_COMPAT_REQUIRED").is_none(),
            "openssl could not make a test CA and MODEHUB_COMPAT_REQUIRED is set"
        );
        eprintln!("openssl could not make a test CA; skipping");
        return;
    }
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(d.join("ca.pem")).unwrap())
        .unwrap();
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let extra = format!("certfile {0}/srv.pem\nkeyfile {0}/srv.key\n", d.display());
    let (mut broker, mut conn) = mosquitto(bin, d, &extra, Some(Arc::new(cfg))).await;
    round_trip(&mut conn).await;
    conn.close().await;
    let _ = broker.kill().await;
}

#[tokio::test]
async fn traffic_both_ways_needs_no_ping_and_one_way_traffic_is_found_dead() {
    let (mut conn, mut peer) = pair(1000).await;
    // A peer that answers each PUBLISH with its PUBACK and reports what else it saw.
    let answering = tokio::spawn(async move {
        let mut others = Vec::new();
        for _ in 0..12 {
            match peer.read().await {
                Some(Packet::Publish(p)) => peer.write(Packet::PubAck(PubAck::new(p.pkid))).await,
                Some(p) => others.push(p),
                None => panic!("the client went away"),
            }
        }
        (peer, others)
    });
    // Publishes every tenth of a keepalive, for over a keepalive: each is answered, so no
    // PINGREQ is needed (the old rule sent one every keepalive regardless).
    let mut acked = 0;
    let mut pkid = 0;
    while acked < 12 {
        pkid += 1;
        conn.send_publish_qos1(pkid, "/devices/1234/event", b"{}")
            .unwrap();
        let until = Instant::now() + Duration::from_millis(100);
        loop {
            match conn.next(Some(until)).await.unwrap() {
                Event::Packet(Packet::PubAck(_)) => acked += 1,
                Event::Deadline => break,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    let (mut peer, others) = answering.await.unwrap();
    assert!(
        others.is_empty(),
        "the client sent {others:?} besides its publishes"
    );
    // Now the peer takes the publishes but never answers (a half-open link that still accepts
    // bytes): the client keeps sending, yet finds it dead by the unanswered PINGREQ.
    let silent = tokio::spawn(async move {
        let mut pings = 0;
        while let Some(p) = peer.read().await {
            pings += matches!(p, Packet::PingReq) as u32;
        }
        pings
    });
    let result = loop {
        pkid += 1;
        conn.send_publish_qos1(pkid, "/devices/1234/event", b"{}")
            .unwrap();
        match conn
            .next(Some(Instant::now() + Duration::from_millis(100)))
            .await
        {
            Ok(Event::Deadline) => {}
            other => break other,
        }
    };
    match result {
        Err(WireError::PingTimeout(d)) => assert_eq!(d, Duration::from_millis(1000)),
        other => panic!("expected a ping timeout, got {other:?}"),
    }
    drop(conn);
    assert_eq!(silent.await.unwrap(), 1, "one PINGREQ, unanswered");
}
