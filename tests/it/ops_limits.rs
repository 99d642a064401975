//! The ops endpoint under a connection flood (issue 10 item 10): the hub binary runs with a
//! low file-descriptor limit, hundreds of idle connections are opened to its ops port from
//! many addresses, and still a sensor logs in over MQTT and its events reach MODE, and a
//! `/healthz` from 127.0.0.1 is answered.

use crate::common::*;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The hub's RLIMIT_NOFILE in this test: room for its own files and a few sensors, far less
/// than the idle connections below.
const NOFILE: u64 = 128;
/// Idle connections to the ops port, [`PER_ADDRESS`] from each of many loopback addresses.
const IDLE: usize = 300;
const PER_ADDRESS: usize = 5;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn get_healthz(ops: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect(ops).await.map_err(|e| e.to_string())?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&buf)
        .lines()
        .next()
        .unwrap_or("")
        .to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_ops_connections_starve_neither_mqtt_nor_healthz() {
    let emu = emulator(1).await;
    let dir = tempfile::tempdir().unwrap();
    let (mqtt, ops): (SocketAddr, SocketAddr) = (
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
    );
    let text = hub_config_text(&emu, dir.path(), 1, NO_PACING)
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{mqtt}\""))
        + &format!("[ops]\nlisten = \"{ops}\"\n");
    let cfg = dir.path().join("hub.toml");
    std::fs::write(&cfg, text).unwrap();
    let log = dir.path().join("hub.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_modehub"));
    cmd.args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: NOFILE,
                rlim_max: NOFILE,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("start modehub");
    let hub_log = || String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(mqtt).await.is_err() || TcpStream::connect(ops).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "hub did not start:\n{}",
            hub_log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The flood: idle connections that never send a byte, held open by this test.
    // (Concurrently, 5 s at most: a full accept queue drops SYNs.)
    let idle: Vec<TcpStream> = futures_util::future::join_all((0..IDLE).map(|k| async move {
        let from = IpAddr::V4(Ipv4Addr::new(127, 0, 1, (k / PER_ADDRESS) as u8 + 1));
        let s = TcpSocket::new_v4().ok()?;
        s.bind(SocketAddr::new(from, 0)).ok()?;
        tokio::time::timeout(Duration::from_secs(5), s.connect(ops))
            .await
            .ok()?
            .ok()
    }))
    .await
    .into_iter()
    .flatten()
    .collect();
    // Give the hub time to accept what it will.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let result = async {
        // MQTT still accepts, and events still reach MODE.
        let (client, el) =
            tokio::time::timeout(Duration::from_secs(30), connect_raw(mqtt, "dev0", "pw0"))
                .await
                .map_err(|_| "the sensor's login timed out".to_string())?
                .map_err(|e| format!("the sensor could not log in: {e}"))?;
        let _runner = el_runner(el);
        for n in 0..5 {
            client
                .publish(
                    "/devices/dev0/event",
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    event_json(n),
                )
                .await
                .map_err(|e| e.to_string())?;
        }
        let evs = wait_events(&emu.handle(), device_id(0), 5).await;
        if evs.len() < 5 {
            return Err(format!("only {} of 5 events reached MODE", evs.len()));
        }
        // /healthz answers while the flood is still open.
        match tokio::time::timeout(Duration::from_secs(30), get_healthz(ops)).await {
            Ok(Ok(l)) if l.starts_with("HTTP/1.1 ") => Ok(l),
            other => Err(format!("/healthz did not answer: {other:?}")),
        }
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    drop(idle);
    let log = hub_log();
    match result {
        Ok(status) => eprintln!(
            "ops flood: {IDLE} idle connections under RLIMIT_NOFILE={NOFILE}: sensor ok, /healthz {status:?}"
        ),
        Err(e) => panic!("{e}\n---- hub log ----\n{log}"),
    }
    assert!(
        !log.contains("Too many open files"),
        "the hub ran out of file descriptors:\n{log}"
    );
}

/// Polls a sensor's event loop in the background (PUBACKs, pings).
fn el_runner(mut el: rumqttc::EventLoop) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move { while el.poll().await.is_ok() {} })
}
