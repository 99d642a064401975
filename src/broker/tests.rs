//! The front in-process with real sockets and a stock client (rumqttc): state that must stay
//! bounded under churn, and TLS. Black-box behaviour is tested against the binary in
//! tests/local_front.rs.

use super::*;
use crate::config::Config;
use crate::outbox::Outbox;
use crate::registry::Registry;
use rumqttc::{AsyncClient, Event, MqttOptions, QoS, Transport};
use std::path::Path;

struct TestFront {
    broker: LocalBroker,
    _shutdown: watch::Sender<bool>,
}

async fn start(dir: &Path, tls: Option<TlsFiles>) -> TestFront {
    {
        let text = format!(
            "[hub]\ndata_dir = \"{}\"\n[local.mqtt]\nlisten = \"127.0.0.1:0\"\n[cloud]\napi_url = \"http://127.0.0.1:9\"\nmqtt_url = \"mqtt://127.0.0.1:9\"\n[[device]]\nname = \"dev0\"\nmode_id = 100\nhome_id = 42\napi_key = \"v1.key-0\"\nlocal_password = \"pw0\"\n",
            dir.display()
        );
        let cfg = Config::parse(&text, dir).unwrap();
        let shared = SharedRegistry::new(Registry::from_config(&cfg));
        let metrics = Arc::new(Metrics::default());
        let (outbox, _thread) = Outbox::open(dir, false, Arc::new(|_| {})).unwrap();
        let clock = crate::clock::ClockWatch::system(true).clock();
        let router = Router::new(shared.clone(), outbox, metrics.clone(), 65536, clock);
        let (events, mut rx) = mpsc::channel(1024);
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let broker = LocalBroker::start_with(
            "127.0.0.1:0".parse().unwrap(),
            FrontLimits::default(),
            tls,
            65536,
            shared,
            router,
            metrics,
            events,
            shutdown_rx,
        )
        .await
        .unwrap();
        TestFront {
            broker,
            _shutdown: shutdown,
        }
    }
}

/// Connects, publishes one QoS 1 event, waits for its PUBACK, disconnects.
async fn one_session(opts: MqttOptions) -> Result<(), String> {
    let (client, mut el) = AsyncClient::new(opts, 10);
    client
        .publish(
            "/devices/dev0/event",
            QoS::AtLeastOnce,
            false,
            r#"{"eventType":"t","eventData":{}}"#,
        )
        .await
        .map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline, el.poll()).await {
            Ok(Ok(Event::Incoming(rumqttc::Packet::PubAck(_)))) => break,
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("no PUBACK within 20 s".into()),
        }
    }
    client.disconnect().await.map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while let Ok(Ok(ev)) = tokio::time::timeout_at(deadline, el.poll()).await {
        if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
            break;
        }
    }
    Ok(())
}

fn opts(addr: SocketAddr, id: &str, pass: &str) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_credentials("dev0", pass);
    o.set_keep_alive(Duration::from_secs(30));
    o
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_stay_bounded_under_connection_churn() {
    let dir = tempfile::tempdir().unwrap();
    let f = start(dir.path(), None).await;
    let addr = f.broker.local_addr();
    for i in 0..200 {
        // Ever-new client ids, as battery sensors and many libraries use.
        one_session(opts(addr, &format!("battery-{i}"), "pw0"))
            .await
            .unwrap_or_else(|e| panic!("session {i}: {e}"));
    }
    // A few failed logins (more would only wait for the throttle).
    for i in 0..4 {
        let (client, mut el) = AsyncClient::new(opts(addr, &format!("bad-{i}"), "nope"), 10);
        drop(client);
        let _ = tokio::time::timeout(Duration::from_secs(20), el.poll()).await;
    }
    let t = || f.broker.table_sizes();
    wait_until("every connection released", || {
        let s = t();
        s.pending == 0 && s.authenticated == 0 && s.sessions == 0
    })
    .await;
    let s = t();
    // One connection at a time: rumqttd saw a handful of client ids, not 200.
    assert!(s.inner_ids <= 3, "{s:?}");
    assert_eq!(s.login_peers, 1, "{s:?}");
}

/// A CA and a server certificate for 127.0.0.1 signed by it, made with the openssl CLI.
fn make_certs(dir: &Path) -> (TlsFiles, Vec<u8>) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
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
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=modehub test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
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
    (
        TlsFiles {
            cert_file: dir.join("server.pem"),
            key_file: dir.join("server.key"),
        },
        std::fs::read(dir.join("ca.pem")).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_serves_a_stock_client() {
    let dir = tempfile::tempdir().unwrap();
    let (files, ca) = make_certs(dir.path());
    let f = start(dir.path(), Some(files)).await;
    let addr = f.broker.local_addr();
    let mut o = opts(addr, "tls-sensor", "pw0");
    o.set_transport(Transport::tls(ca.clone(), None, None));
    one_session(o).await.expect("MQTT over TLS");
    // Wrong password over TLS: refused like in the clear.
    let mut o = opts(addr, "tls-bad", "nope");
    o.set_transport(Transport::tls(ca, None, None));
    assert!(one_session(o).await.is_err());
    // Plain MQTT on the TLS port gets no CONNACK.
    assert!(one_session(opts(addr, "plain", "pw0")).await.is_err());
}

#[test]
fn tls_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("empty.pem"), "").unwrap();
    let files = TlsFiles {
        cert_file: dir.path().join("empty.pem"),
        key_file: dir.path().join("missing.key"),
    };
    let e = tls_acceptor(&files).err().expect("refused").to_string();
    assert!(
        e.contains("empty.pem") && e.contains("tls_cert_file"),
        "{e}"
    );
}
