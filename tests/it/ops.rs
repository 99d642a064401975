//! Operations: the systemd notify protocol (real binary, fake NOTIFY_SOCKET), signals,
//! /healthz, /metrics (parsed with a Prometheus text parser) and `modehub status`.

use crate::common::*;
use modehub::config::Config;
use modehub::ops::status::http_get;
use modehub::Hub;
use prometheus_parse::{Scrape, Value};
use rumqttc::QoS;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::net::UnixDatagram;

const BIN: &str = env!("CARGO_BIN_EXE_modehub");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Config text for the real binary: local MQTT on `port`, ops endpoint off.
fn binary_config(emu: &modehub::emulator::Emulator, dir: &Path, n: usize, port: u16) -> String {
    hub_config_text(emu, dir, n, "")
        .replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
        )
        .replace("[hub]\n", "[hub]\nlog = \"info\"\n")
        + "[ops]\nlisten = \"off\"\n"
}

/// The fake service manager: reads what the hub sends to NOTIFY_SOCKET.
struct FakeSystemd {
    sock: UnixDatagram,
    seen: Vec<String>,
}

impl FakeSystemd {
    fn bind(dir: &Path) -> (FakeSystemd, std::path::PathBuf) {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        (
            FakeSystemd {
                sock,
                seen: Vec::new(),
            },
            path,
        )
    }

    /// Waits for a message that satisfies `pred` and returns it.
    async fn wait_for(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let mut buf = vec![0u8; 4096];
        // One deadline for the whole wait: watchdog pings keep arriving meanwhile.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout_at(deadline, self.sock.recv(&mut buf)).await {
                Ok(Ok(n)) => {
                    let m = String::from_utf8_lossy(&buf[..n]).to_string();
                    self.seen.push(m.clone());
                    if pred(&m) {
                        return m;
                    }
                }
                other => panic!(
                    "no notify message with {what}: {other:?}; seen: {:?}",
                    self.seen
                ),
            }
        }
    }
}

fn spawn_hub(config: &Path, notify: &Path) -> Child {
    spawn_hub_with_watchdog(config, notify, "300000")
}

fn spawn_hub_with_watchdog(config: &Path, notify: &Path, watchdog_usec: &str) -> Child {
    Command::new(BIN)
        .args(["run", "--config"])
        .arg(config)
        .env("NOTIFY_SOCKET", notify)
        .env("WATCHDOG_USEC", watchdog_usec)
        .env_remove("WATCHDOG_PID")
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start modehub")
}

fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
}

/// Waits (off the runtime) for the child to exit; returns its status and stderr.
async fn wait_exit(mut child: Child) -> (std::process::ExitStatus, String) {
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                return (status, err);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("modehub did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_ready_watchdog_status_reload_and_sigterm() {
    let emu = emulator(3).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg_path = dir.path().join("hub.toml");
    std::fs::write(&cfg_path, binary_config(&emu, dir.path(), 2, port)).unwrap();
    let (mut systemd, sock) = FakeSystemd::bind(dir.path());
    let started = Instant::now();
    let child = spawn_hub(&cfg_path, &sock);

    let ready = systemd.wait_for("READY=1", |m| m.contains("READY=1")).await;
    eprintln!("READY=1 after {:?}", started.elapsed());
    assert!(ready.contains("STATUS="), "{ready}");
    // The local port listens by the time READY=1 arrives.
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("broker listens at READY=1");
    // Watchdog pings come (WATCHDOG_USEC = 0.3 s) with a status line.
    let ping = systemd
        .wait_for("WATCHDOG=1", |m| m.contains("WATCHDOG=1"))
        .await;
    assert!(ping.contains("STATUS="), "{ping}");

    // One event goes up; the status line counts it.
    let mut s = Sensor::connect(format!("127.0.0.1:{port}").parse().unwrap(), "dev0", "pw0").await;
    s.publish_all("/devices/dev0/event", vec![event_json(1)])
        .await;
    wait_events(&emu.handle(), device_id(0), 1).await;
    let line = systemd
        .wait_for("status with 1 in / 1 out", |m| {
            m.contains("WATCHDOG=1") && m.contains("1 in / 1 out")
        })
        .await;
    assert!(line.contains("2/2 upstream up"), "{line}");
    assert!(line.contains("1/2 local"), "{line}");

    // SIGHUP with a broken config: rejected, the hub keeps running (and keeps pinging).
    std::fs::write(&cfg_path, "[hub\nthis is not toml").unwrap();
    signal(&child, nix::sys::signal::Signal::SIGHUP);
    systemd
        .wait_for("RELOADING=1", |m| m.contains("RELOADING=1"))
        .await;
    systemd
        .wait_for("READY=1 after reload", |m| m.contains("READY=1"))
        .await;
    systemd
        .wait_for("WATCHDOG=1 after reload", |m| m.contains("WATCHDOG=1"))
        .await;
    s.publish_all("/devices/dev0/event", vec![event_json(2)])
        .await;
    wait_events(&emu.handle(), device_id(0), 2).await;

    // SIGHUP with a third device and a new [cloud] setting: the device works at once, the
    // others keep their sessions, the [cloud] change waits for a restart (and says so).
    let connects = emu.handle().connect_count(device_id(0));
    std::fs::write(
        &cfg_path,
        binary_config(&emu, dir.path(), 3, port)
            .replace("[cloud]\n", "[cloud]\nmax_inflight = 7\n"),
    )
    .unwrap();
    signal(&child, nix::sys::signal::Signal::SIGHUP);
    systemd
        .wait_for("READY=1 after the second reload", |m| m.contains("READY=1"))
        .await;
    let mut s2 = Sensor::connect(format!("127.0.0.1:{port}").parse().unwrap(), "dev2", "pw2").await;
    s2.publish_all("/devices/dev2/event", vec![event_json(7)])
        .await;
    assert_eq!(
        ns(&wait_events(&emu.handle(), device_id(2), 1).await),
        vec![7]
    );
    s.publish_all("/devices/dev0/event", vec![event_json(3)])
        .await;
    wait_events(&emu.handle(), device_id(0), 3).await;
    assert!(s.closed.borrow().is_none(), "dev0 stayed connected locally");
    assert_eq!(
        emu.handle().connect_count(device_id(0)),
        connects,
        "dev0's upstream session was kept"
    );
    systemd
        .wait_for("a status line counting 3 devices", |m| {
            m.contains("WATCHDOG=1") && m.contains("3/3 upstream up")
        })
        .await;

    // SIGTERM: STOPPING=1, drain, exit 0.
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    systemd
        .wait_for("STOPPING=1", |m| m.contains("STOPPING=1"))
        .await;
    let (status, stderr) = wait_exit(child).await;
    assert!(status.success(), "exit {status:?}; stderr:\n{stderr}");
    assert!(
        stderr.contains("SIGHUP: config rejected, the running configuration stays in force"),
        "{stderr}"
    );
    assert!(stderr.contains("not valid TOML"), "{stderr}");
    assert!(
        stderr.contains("SIGHUP: device table and serial ports reloaded")
            && stderr.contains("added=[\"dev2\"]"),
        "{stderr}"
    );
    assert!(
        stderr.contains("take effect only after a restart") && stderr.contains("[cloud]"),
        "{stderr}"
    );
    assert!(stderr.contains("stopped cleanly"), "{stderr}");
    // Every task ended at the stop (the presence tap used to wait for the adapters' senders,
    // which live until after the wait: 3 s on every stop).
    assert!(!stderr.contains("did not end"), "{stderr}");
    assert!(!stderr.contains("v1.key-"), "no secrets in logs: {stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "no ANSI codes when not on a terminal"
    );
}

/// A service manager that stops reading its notify socket must not stall the hub. Its queue
/// holds `net.unix.max_dgram_qlen` datagrams (ten on Debian's default); a blocking send to a
/// full queue held the hub's one async thread, and PUBACKs and uploads stopped with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_manager_that_does_not_read_does_not_stall_the_hub() {
    let emu = emulator(1).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg_path = dir.path().join("hub.toml");
    std::fs::write(&cfg_path, binary_config(&emu, dir.path(), 1, port)).unwrap();
    // Bound and never read.
    let (systemd, sock) = FakeSystemd::bind(dir.path());
    // A ping (with a status line) every 50 ms.
    let mut child = spawn_hub_with_watchdog(&cfg_path, &sock, "150000");
    let qlen: u64 = std::fs::read_to_string("/proc/sys/net/unix/max_dgram_qlen")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(512);
    let outcome = async {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the local port never listened");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Twice the pings the queue holds, and then some.
        tokio::time::sleep(Duration::from_millis(100 * qlen + 1000)).await;
        let mut s =
            Sensor::connect(format!("127.0.0.1:{port}").parse().unwrap(), "dev0", "pw0").await;
        s.publish_all("/devices/dev0/event", (1..=5).map(event_json).collect())
            .await;
        assert_eq!(
            ns(&wait_events(&emu.handle(), device_id(0), 5).await),
            vec![1, 2, 3, 4, 5]
        );
        // What the queue kept is the oldest: READY=1 first. (How many it holds is not asserted:
        // the hub's pings go on arriving while it is drained.)
        let mut buf = vec![0u8; 4096];
        let mut queued = Vec::new();
        while let Ok(n) = systemd.sock.try_recv(&mut buf) {
            queued.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
        assert!(!queued.is_empty());
        assert!(queued[0].contains("READY=1"), "{queued:?}");
    };
    let outcome = tokio::time::timeout(
        Duration::from_secs(120),
        futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(outcome)),
    )
    .await;
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    let stop = Instant::now();
    while child.try_wait().unwrap().is_none() && stop.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let status = child.wait().unwrap();
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(panic)) => {
            eprintln!("hub log:\n{stderr}");
            std::panic::resume_unwind(panic)
        }
        Err(_) => panic!("timed out; hub log:\n{stderr}"),
    }
    assert!(status.success(), "exit {status:?}; hub log:\n{stderr}");
    assert!(
        stderr.contains("notify socket is full"),
        "the drop is logged: {stderr}"
    );
    assert!(!stderr.contains("did not end"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_is_withheld_while_the_outbox_writer_is_stuck() {
    let emu = emulator(1).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg_path = dir.path().join("hub.toml");
    std::fs::write(&cfg_path, binary_config(&emu, dir.path(), 1, port)).unwrap();
    let (mut systemd, sock) = FakeSystemd::bind(dir.path());
    let child = spawn_hub(&cfg_path, &sock);
    systemd.wait_for("READY=1", |m| m.contains("READY=1")).await;
    systemd
        .wait_for("WATCHDOG=1", |m| m.contains("WATCHDOG=1"))
        .await;

    // Another process holds SQLite's write lock: the hub's next commit waits (busy_timeout),
    // so the writer cannot answer, and the watchdog ping must stop.
    let db = rusqlite::Connection::open(dir.path().join("hub.db")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let s = Sensor::connect(format!("127.0.0.1:{port}").parse().unwrap(), "dev0", "pw0").await;
    s.client
        .publish(
            "/devices/dev0/event",
            QoS::AtLeastOnce,
            false,
            event_json(1),
        )
        .await
        .unwrap();
    let stuck = systemd
        .wait_for("a not-making-progress status", |m| {
            m.contains("not making progress")
        })
        .await;
    assert!(!stuck.contains("WATCHDOG=1"), "{stuck}");
    assert!(stuck.contains("outbox writer did not answer"), "{stuck}");
    db.execute_batch("ROLLBACK").unwrap();
    drop(db);
    // Progress again: pings resume.
    systemd
        .wait_for("WATCHDOG=1 again", |m| m.contains("WATCHDOG=1"))
        .await;
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    let (status, stderr) = wait_exit(child).await;
    assert!(status.success(), "exit {status:?}; stderr:\n{stderr}");
    assert!(
        stderr.contains("withholding the systemd watchdog ping"),
        "{stderr}"
    );
}

/// An in-process hub with its ops endpoint on a free port.
async fn hub_with_ops(
    emu: &modehub::emulator::Emulator,
    dir: &Path,
    n: usize,
    stall_after: u64,
) -> (Hub, String) {
    let text = hub_config_text(emu, dir, n, "")
        + &format!("[ops]\nlisten = \"127.0.0.1:0\"\nstall_after_secs = {stall_after}\n");
    let cfg = Config::parse(&text, dir).unwrap();
    let mut hub = Hub::start(cfg.clone()).await.unwrap();
    let ctx = hub.ops_context(&cfg);
    let addr = hub.start_ops_server(ctx, &cfg).await.unwrap().unwrap();
    (hub, addr.to_string())
}

async fn get(addr: &str, path: &str) -> (u16, String) {
    let (addr, path) = (addr.to_string(), path.to_string());
    tokio::task::spawn_blocking(move || http_get(&addr, &path, Duration::from_secs(10)).unwrap())
        .await
        .unwrap()
}

fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            other => panic!("{metric} is not a plain value: {other:?}"),
        })
}

async fn scrape(addr: &str) -> Scrape {
    let (code, body) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("valid Prometheus text")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_count_what_the_test_did() {
    let emu = emulator(2).await;
    let dir = tempfile::tempdir().unwrap();
    let (hub, ops) = hub_with_ops(&emu, dir.path(), 2, 300).await;
    let mut s = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
    s.publish_all(
        "/devices/dev0/event",
        vec![
            event_json(1),
            event_json(2),
            event_json(3),
            "{not json".to_string(),
            r#"{"eventData":{}}"#.to_string(),
        ],
    )
    .await;
    wait_events(&emu.handle(), device_id(0), 3).await;

    // Acks are committed shortly after delivery: wait until the backlog shows empty.
    let mut m = scrape(&ops).await;
    for _ in 0..200 {
        if value(&m, "modehub_outbox_depth_messages", &[("device", "dev0")]) == Some(0.0)
            && value(&m, "modehub_messages_out_total", &[]) == Some(3.0)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        m = scrape(&ops).await;
    }
    assert_eq!(value(&m, "modehub_messages_in_total", &[]), Some(3.0));
    assert_eq!(value(&m, "modehub_messages_out_total", &[]), Some(3.0));
    assert_eq!(
        value(
            &m,
            "modehub_messages_dropped_total",
            &[("reason", "not_json")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &m,
            "modehub_messages_dropped_total",
            &[("reason", "missing_event_type")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &m,
            "modehub_messages_dropped_total",
            &[("reason", "too_large")]
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &m,
            "modehub_upstream_session_state",
            &[("device", "dev0"), ("state", "up")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&m, "modehub_local_connected", &[("device", "dev0")]),
        Some(1.0)
    );
    assert_eq!(
        value(&m, "modehub_local_connected", &[("device", "dev1")]),
        Some(0.0)
    );
    assert_eq!(
        value(&m, "modehub_outbox_depth_messages", &[("device", "dev0")]),
        Some(0.0)
    );
    assert_eq!(
        value(&m, "modehub_command_queue_depth", &[("device", "dev1")]),
        Some(0.0)
    );

    // A command for dev1, which is away locally, waits in the outbox and is counted.
    for _ in 0..100 {
        let _ = emu
            .handle()
            .send_command(device_id(1), "ping", serde_json::json!({}));
        tokio::time::sleep(Duration::from_millis(200)).await;
        m = scrape(&ops).await;
        if value(&m, "modehub_command_queue_depth", &[("device", "dev1")]) >= Some(1.0) {
            break;
        }
    }
    let waiting = value(&m, "modehub_command_queue_depth", &[("device", "dev1")]).unwrap();
    assert!(waiting >= 1.0);
    assert_eq!(
        value(&m, "modehub_commands_total", &[("outcome", "queued")]),
        Some(waiting)
    );
    assert_eq!(
        value(&m, "modehub_command_queue_depth", &[("device", "dev0")]),
        Some(0.0)
    );
    assert_eq!(
        value(
            &m,
            "modehub_home_state",
            &[("device", "dev0"), ("state", "unknown")]
        ),
        Some(1.0)
    );
    assert!(value(&m, "modehub_upstream_connects_total", &[]).unwrap() >= 2.0);
    // 3 appends and 3 acks took at least one commit each way; the histogram says so.
    let hist = m
        .samples
        .iter()
        .find(|s| s.metric == "modehub_sqlite_commit_seconds")
        .expect("commit latency histogram");
    let Value::Histogram(buckets) = &hist.value else {
        panic!("not a histogram: {:?}", hist.value)
    };
    let inf = buckets.iter().find(|b| b.less_than.is_infinite()).unwrap();
    assert!(inf.count >= 2.0, "{buckets:?}");
    assert!(buckets.windows(2).all(|w| w[0].count <= w[1].count));
    assert_eq!(
        value(&m, "modehub_sqlite_commit_seconds_count", &[]),
        Some(inf.count)
    );
    assert!(m.docs.contains_key("modehub_disk_write_bytes_total"));
    assert!(value(&m, "modehub_data_dir_bytes", &[]).unwrap() > 0.0);
    let (_, raw) = get(&ops, "/metrics").await;
    assert!(!raw.contains("v1.key-"), "no keys in metrics");
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_reports_not_draining_and_cloud_down() {
    let emu = emulator(1).await;
    let dir = tempfile::tempdir().unwrap();
    let (hub, ops) = hub_with_ops(&emu, dir.path(), 1, 1).await;
    // Healthy once the session is up.
    let mut last = (0, String::new());
    for _ in 0..400 {
        last = get(&ops, "/healthz").await;
        if last.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last.0, 200, "{}", last.1);
    assert!(last.1.starts_with("ok\n"), "{}", last.1);

    // The cloud goes away altogether: no session up.
    emu.handle().set_offline(true);
    for _ in 0..400 {
        last = get(&ops, "/healthz").await;
        if last.1.contains("no upstream session is up") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last.0, 503, "{}", last.1);
    assert!(last.1.contains("no upstream session is up"), "{}", last.1);
    assert!(last.1.contains("ok   outbox"), "{}", last.1);
    assert!(last.1.contains("ok   broker"), "{}", last.1);

    // Back online: healthy again once the session is back.
    emu.handle().set_offline(false);
    for _ in 0..1200 {
        last = get(&ops, "/healthz").await;
        if last.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last.0, 200, "{}", last.1);

    // MODE stops acknowledging (but the session stays up): a backlog that does not drain.
    emu.handle().set_faults(modehub::emulator::Faults {
        delay: Some(Duration::from_secs(120)),
        ..Default::default()
    });
    let mut s = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
    s.publish_all("/devices/dev0/event", vec![event_json(1)])
        .await;
    for _ in 0..400 {
        last = get(&ops, "/healthz").await;
        if last.0 == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last.0, 503, "{}", last.1);
    assert!(last.1.contains("connected but not draining"), "{}", last.1);
    assert!(last.1.contains("1 messages queued"), "{}", last.1);
    assert!(last.1.contains("ok   cloud"), "{}", last.1);
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_command_prints_the_table_and_json() {
    let emu = emulator(2).await;
    let dir = tempfile::tempdir().unwrap();
    let (hub, ops) = hub_with_ops(&emu, dir.path(), 2, 300).await;
    let mut s = Sensor::connect(hub.local_addr(), "dev1", "pw1").await;
    s.publish_all("/devices/dev1/event", vec![event_json(1)])
        .await;
    wait_events(&emu.handle(), device_id(1), 1).await;
    // Wait until both sessions are up, so the table is stable.
    for _ in 0..400 {
        if hub
            .session_states()
            .iter()
            .all(|s| *s == modehub::uplink::SessionState::Up)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || Command::new(BIN).args(args).output().unwrap())
    };
    let out = run(vec!["status".into(), "--ops".into(), ops.clone()])
        .await
        .unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    eprintln!("{table}");
    assert!(out.status.success(), "{table}");
    let header = table
        .lines()
        .find(|l| l.starts_with("DEVICE"))
        .expect("a header");
    for col in [
        "MODE ID",
        "TRANSPORT",
        "LOCAL",
        "UPSTREAM",
        "HOME",
        "QUEUED",
        "OLDEST",
        "LAST ERROR",
    ] {
        assert!(header.contains(col), "{header}");
    }
    let dev1 = table.lines().find(|l| l.starts_with("dev1 ")).unwrap();
    let cells: Vec<&str> = dev1.split_whitespace().collect();
    assert_eq!(cells[..5], ["dev1", "101", "mqtt", "yes", "up"], "{dev1}");
    let dev0 = table.lines().find(|l| l.starts_with("dev0 ")).unwrap();
    assert!(dev0.contains(" no "), "{dev0}");
    assert!(table.contains("health: ok"), "{table}");
    assert!(table.contains("modehub 0.1.0"), "{table}");

    let out = run(vec![
        "status".into(),
        "--json".into(),
        "--ops".into(),
        ops.clone(),
    ])
    .await
    .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["devices"][1]["name"], "dev1");
    assert_eq!(json["devices"][1]["local_connections"], 1);
    assert_eq!(json["devices"][0]["home_state"], "unknown");
    assert_eq!(json["health"]["healthy"], true);

    // Nothing listening: a message that says what to check, exit code 3.
    let out = run(vec![
        "status".into(),
        "--ops".into(),
        format!("127.0.0.1:{}", free_port()),
    ])
    .await
    .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("Is modehub running"), "{err}");
    hub.shutdown().await;
}
