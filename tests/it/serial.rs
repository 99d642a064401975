//! Serial adapters over real pseudo-terminals: the test plays the sensor on the pty master and
//! the hub opens the slave path with tokio-serial exactly as it opens a USB adapter.
//!
//! Hub-level tests run the whole hub against the MODE emulator; port-level tests run one
//! `serial::run_port` task against a real router and outbox so that they can feed downlink
//! messages and watch presence events directly. These tests must not sleep to "let things
//! settle" where a condition can be awaited instead.

use crate::common::pty::Pty;
use crate::common::*;
use bytes::Bytes;
use modehub::config::{Config, SerialConfig};
use modehub::downlink::{DownKind, DownMsg, LocalEvent};
use modehub::metrics::Metrics;
use modehub::outbox::{Kind, Outbox};
use modehub::registry::{Registry, SharedRegistry, TopicKind};
use modehub::router::Router;
use modehub::serial::line::{crc8, with_checksum};
use modehub::serial::{self, OpenFailure, PortContext};
use modehub::Hub;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::{timeout, Instant};

const T: Duration = Duration::from_secs(10);

fn link(target: &Path, link: &Path) {
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(target, link).unwrap();
}

fn serial_cfg(toml_text: &str) -> SerialConfig {
    toml::from_str(toml_text).unwrap()
}

/// A router and outbox for `n` devices `dev{i}`, with no uplink: rows stay where tests see them.
struct Rig {
    _dir: tempfile::TempDir,
    registry: Arc<Registry>,
    router: Router,
    outbox: Outbox,
    metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
}

impl Rig {
    fn new(n: usize) -> Rig {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "modehub=warn".into()))
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let mut text = format!("[hub]\ndata_dir = \"{}\"\n", dir.path().display());
        for i in 0..n {
            text.push_str(&format!(
                "[[device]]\nname = \"dev{i}\"\nmode_id = {}\napi_key = \"k{i}\"\n",
                device_id(i)
            ));
        }
        let cfg = Config::parse(&text, dir.path()).unwrap();
        let shared = SharedRegistry::new(Registry::from_config(&cfg));
        let registry = shared.load();
        let metrics = Arc::new(Metrics::default());
        let (outbox, _thread) = Outbox::open(dir.path(), false, Arc::new(|_| {})).unwrap();
        let router = Router::new(
            shared,
            outbox.clone(),
            metrics.clone(),
            cfg.hub.max_payload_bytes,
            modehub::router::system_clock(),
        );
        Rig {
            _dir: dir,
            registry,
            router,
            outbox,
            metrics,
            shutdown: watch::channel(false).0,
        }
    }

    /// Starts a port task; returns its write queue and its presence events.
    fn port(&self, cfg: SerialConfig) -> (mpsc::Sender<DownMsg>, mpsc::Receiver<LocalEvent>) {
        let (tx, rx) = mpsc::channel(cfg.write_queue);
        let (ev_tx, ev_rx) = mpsc::channel(1024);
        let devices = cfg
            .devices
            .iter()
            .map(|n| self.registry.lookup(n).unwrap().id)
            .collect();
        tokio::spawn(serial::run_port(PortContext {
            cfg,
            devices,
            registry: self.registry.clone(),
            router: self.router.clone(),
            metrics: self.metrics.clone(),
            events: ev_tx,
            down: rx,
            shutdown: self.shutdown.subscribe(),
        }));
        (tx, ev_rx)
    }

    /// Stored rows of device `i`: (kind, key, body).
    async fn rows(&self, i: usize) -> Vec<(Kind, String, String)> {
        self.outbox
            .fetch(device_id(i), 0, 100_000)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.kind, r.key, r.body))
            .collect()
    }

    fn stat(&self, f: impl Fn(&serial::SerialStats) -> &std::sync::atomic::AtomicU64) -> u64 {
        f(&self.metrics.serial).load(Relaxed)
    }

    async fn wait_stat(
        &self,
        what: &str,
        f: impl Fn(&serial::SerialStats) -> &std::sync::atomic::AtomicU64,
        at_least: u64,
    ) {
        let deadline = Instant::now() + T;
        while self.stat(&f) < at_least {
            assert!(
                Instant::now() < deadline,
                "{what} stayed at {}",
                self.stat(&f)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// Waits for the presence events of one open (`up`) or loss for `devs`; returns the conn id.
async fn presence(ev: &mut mpsc::Receiver<LocalEvent>, devs: &[usize], up: bool) -> u64 {
    let mut conn = None;
    let want = if up { devs.len() * 3 } else { devs.len() };
    for _ in 0..want {
        let e = timeout(T, ev.recv())
            .await
            .expect("presence event")
            .unwrap();
        let (d, c) = match (up, &e) {
            (true, LocalEvent::Connected(d, c)) => (*d, *c),
            (true, LocalEvent::Subscribed(d, c, TopicKind::Command | TopicKind::Kv)) => (*d, *c),
            (false, LocalEvent::Disconnected(d, c)) => (*d, *c),
            _ => panic!("unexpected {e:?} (up = {up})"),
        };
        assert!(devs.contains(&d), "{e:?}");
        assert_eq!(*conn.get_or_insert(c), c);
    }
    conn.unwrap()
}

fn cmd(dev: usize, action: &str, params: &str) -> DownMsg {
    DownMsg {
        dev,
        kind: DownKind::Command,
        payload: Bytes::from(format!(r#"{{"action":"{action}","parameters":{params}}}"#)),
    }
}

fn kv(dev: usize, json: &str) -> DownMsg {
    DownMsg {
        dev,
        kind: DownKind::Kv,
        payload: Bytes::from(json.to_string()),
    }
}

// ------------------------------------------------------------------------------------------
// Hub level: sensor lines reach the MODE emulator.

fn hub_with_serial(
    emu: &modehub::emulator::Emulator,
    dir: &Path,
    n: usize,
    serial: &str,
) -> Config {
    let text = format!("{}{serial}", hub_config_text(emu, dir, n, ""));
    Config::parse(&text, dir).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_compact_events_reach_mode() {
    let emu = emulator(3).await;
    let dir = tempfile::tempdir().unwrap();
    let solo = Pty::open();
    let bus = Pty::open();
    let serial = format!(
        "[[serial]]\nport = \"{}\"\ndevices = [\"dev0\"]\n[[serial]]\nport = \"{}\"\ndevices = [\"dev1\", \"dev2\"]\nrequire_checksum = true\n",
        solo.path.display(),
        bus.path.display()
    );
    let hub = Hub::start(hub_with_serial(&emu, dir.path(), 3, &serial))
        .await
        .unwrap();
    // One device on the port: `dev` may be left out.
    solo.send("E opened door=1 temp=21.5 label=front\\sdoor #1")
        .await;
    solo.send(r#"{"event":"closed","data":{"door":0},"id":2}"#)
        .await;
    solo.send("E dev0 tick #3").await;
    for n in 1..=3 {
        solo.expect(&format!("OK {n}")).await;
    }
    // A bus: every line names its device, and this port requires checksums.
    bus.send(&with_checksum("E dev1 motion level=3 #10")).await;
    bus.send(&with_checksum(&format!(
        r#"{{"dev":{},"eventType":"motion","eventData":{{"level":4}},"id":11}}"#,
        device_id(2)
    )))
    .await;
    bus.send("E dev1 motion level=5 #12").await; // no checksum: refused
    bus.send(&with_checksum("E motion #13")).await; // which device?
    bus.expect(&with_checksum("OK 10")).await;
    bus.expect(&with_checksum("OK 11")).await;
    bus.expect(&with_checksum("ERR 12 missing_checksum")).await;
    bus.expect(&with_checksum("ERR 13 unknown_device")).await;

    let got = wait_events(&emu.handle(), device_id(0), 3).await;
    let types: Vec<&str> = got.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["opened", "closed", "tick"]);
    assert_eq!(got[0].event_data["door"], 1);
    assert_eq!(got[0].event_data["temp"], 21.5);
    assert_eq!(got[0].event_data["label"], "front door");
    assert_eq!(got[1].event_data["door"], 0);
    let got = wait_events(&emu.handle(), device_id(1), 1).await;
    assert_eq!(
        (got[0].event_type.as_str(), &got[0].event_data["level"]),
        ("motion", &serde_json::json!(3))
    );
    let got = wait_events(&emu.handle(), device_id(2), 1).await;
    assert_eq!(got[0].event_data["level"], 4);
    let s = &hub.metrics().serial;
    assert_eq!(s.lines_ok.load(Relaxed), 5);
    assert_eq!(s.missing_checksum.load(Relaxed), 1);
    assert_eq!(s.unknown_device.load(Relaxed), 1);
    assert_eq!(s.ports_open.load(Relaxed), 2);
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_set_and_delete_go_up() {
    let emu = emulator(1).await;
    let dir = tempfile::tempdir().unwrap();
    let pty = Pty::open();
    let serial = format!(
        "[[serial]]\nport = \"{}\"\ndevices = [\"dev0\"]\n",
        pty.path.display()
    );
    let hub = Hub::start(hub_with_serial(&emu, dir.path(), 1, &serial))
        .await
        .unwrap();
    pty.send("K set mode eco #1").await;
    pty.send(r#"{"kv":"set","key":"limits","value":{"lo":1,"hi":[2,3]},"id":2}"#)
        .await;
    pty.send("K dev0 set count 42 #3").await;
    pty.send("K delete mode #4").await;
    for n in 1..=4 {
        pty.expect(&format!("OK {n}")).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, items) = emu.handle().kv(device_id(0));
        let want = vec![
            ("count".to_string(), serde_json::json!(42)),
            ("limits".to_string(), serde_json::json!({"lo":1,"hi":[2,3]})),
        ];
        if items == want {
            break;
        }
        assert!(Instant::now() < deadline, "kv store is {items:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    hub.shutdown().await;
}

/// MODE's commands and DDP messages reach a serial sensor as lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_and_mirror_changes_come_down_through_the_hub() {
    let emu = emulator(1).await;
    let dir = tempfile::tempdir().unwrap();
    let pty = Pty::open();
    let serial = format!(
        "[[serial]]\nport = \"{}\"\ndevices = [\"dev0\"]\ndownlink_format = \"compact\"\n",
        pty.path.display()
    );
    let hub = Hub::start(hub_with_serial(&emu, dir.path(), 1, &serial))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !emu.handle().is_connected(device_id(0)) {
        assert!(Instant::now() < deadline, "device session never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Subscribing to kv gets a reload of the (empty) mirror first.
    assert!(pty.line(T).await.unwrap().starts_with("K dev0 reload "));
    // MODE drops a command that reaches the session before it subscribed: resend until one
    // was handed to a connection.
    let h = emu.handle();
    loop {
        let before = h.stats().command_deliveries;
        h.send_command(device_id(0), "blink", serde_json::json!({"times": 3}))
            .unwrap();
        if h.stats().command_deliveries > before {
            break;
        }
        assert!(Instant::now() < deadline, "the session never took commands");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // MODE's own reload (sent when the upstream session subscribed) may come through first.
    loop {
        let l = pty.line(T).await.expect("a line");
        if l.starts_with("K dev0 reload ") {
            continue;
        }
        assert_eq!(l, "C dev0 blink times=3");
        break;
    }
    let rev = emu
        .handle()
        .set_kv(device_id(0), "color", serde_json::json!("red"))
        .unwrap();
    pty.expect(&format!("K dev0 set color red {rev}")).await;
    let rev = emu.handle().delete_kv(device_id(0), "color").unwrap();
    pty.expect(&format!("K dev0 delete color {rev}")).await;
    hub.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// Port level.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_come_back_only_after_commit_and_resends_are_not_stored_twice() {
    let rig = Rig::new(2);
    let pty = Pty::open();
    let (_down, mut ev) = rig.port(serial_cfg(&format!(
        "port = \"{}\"\ndevices = [\"dev0\", \"dev1\"]",
        pty.path.display()
    )));
    presence(&mut ev, &[0, 1], true).await;
    for n in 1..=20u32 {
        pty.send(&format!("E dev0 reading n={n} #{n}")).await;
        pty.expect(&format!("OK {n}")).await;
        // The row is committed by the time its OK is written.
        let rows = rig.rows(0).await;
        assert_eq!(rows.len(), n as usize);
        assert_eq!(rows.last().unwrap().2, format!(r#"{{"n":{n}}}"#));
    }
    // A resend (the OK was lost on the wire) is answered again and not stored again.
    pty.send("E dev0 reading n=20 #20").await;
    pty.expect("OK 20").await;
    assert_eq!(rig.rows(0).await.len(), 20);
    assert_eq!(rig.stat(|s| &s.duplicate), 1);
    // The same number with other content (a sensor that restarted its count) is new.
    pty.send("E dev0 boot #1").await;
    pty.expect("OK 1").await;
    assert_eq!(rig.rows(0).await.len(), 21);
    // Refusals are answered with their reason and store nothing.
    pty.send("K dev1 set bad/key 1 #30").await;
    pty.expect("ERR 30 invalid_kv_key").await;
    pty.send(&with_checksum("E dev1 x #31").replace(" x ", " y "))
        .await;
    pty.expect("ERR 31 bad_checksum").await;
    pty.send("E dev9 x #32").await;
    pty.expect("ERR 32 unknown_device").await;
    pty.send("E dev1 one two three #33").await;
    pty.expect("ERR 33 parse_error").await;
    pty.send(r#"{"dev":"dev1","event":"x","data":[1],"id":34}"#)
        .await;
    pty.expect("ERR 34 event_data_not_object").await;
    assert!(rig.rows(1).await.is_empty());
    // Lines without a number are stored and never answered.
    pty.send("K dev1 set good 1").await;
    pty.send("K dev1 delete good").await;
    pty.send("E dev1 x #35").await;
    pty.expect("OK 35").await;
    let rows = rig.rows(1).await;
    // The delete replaced the pending set of the same key (outbox coalescing).
    assert_eq!(
        rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        [Kind::KvDelete, Kind::Event]
    );
    assert_eq!(rig.stat(|s| &s.acks_ok), 23);
    assert_eq!(rig.stat(|s| &s.acks_err), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_between_good_lines_costs_only_itself() {
    let rig = Rig::new(1);
    let pty = Pty::open();
    let (_down, mut ev) = rig.port(serial_cfg(&format!(
        "port = \"{}\"\ndevices = [\"dev0\"]\nmax_line_bytes = 256",
        pty.path.display()
    )));
    presence(&mut ev, &[0], true).await;
    let mut rng = fastrand::Rng::with_seed(7);
    let mut expected = 0u32;
    for round in 0..50u32 {
        let mut junk: Vec<u8> = Vec::new();
        match round % 6 {
            // Binary burst, newlines and all (several garbage lines), ending in a newline.
            0 => junk.extend((0..rng.usize(1..600)).map(|_| rng.u8(..))),
            // Invalid UTF-8.
            1 => junk.extend_from_slice(b"E dev0 x=\xff\xfe"),
            // Far over max_line_bytes, no newline inside: dropped while streaming.
            2 => junk.extend(std::iter::repeat_n(b'A', 5000 + rng.usize(..5000))),
            // Line noise at the wrong baud rate.
            3 => junk.extend((0..rng.usize(1..80)).map(|_| rng.u8(0x80..))),
            4 => junk.extend_from_slice(b"E nobody thing here=1"),
            _ => junk.extend_from_slice(
                with_checksum("E dev0 flipped=1")
                    .replace("=1", "=2")
                    .as_bytes(),
            ),
        }
        junk.push(b'\n');
        pty.write_all(&junk).await;
        expected += 1;
        pty.send(&format!("E good n={round} #{expected}")).await;
    }
    for n in 1..=expected {
        pty.expect(&format!("OK {n}")).await;
    }
    let rows = rig.rows(0).await;
    let ns: Vec<String> = rows.iter().map(|r| r.2.clone()).collect();
    assert_eq!(
        ns,
        (0..50)
            .map(|n| format!(r#"{{"n":{n}}}"#))
            .collect::<Vec<_>>()
    );
    let s = &rig.metrics.serial;
    assert_eq!(s.lines_ok.load(Relaxed), 50);
    assert!(s.bad_utf8.load(Relaxed) >= 8, "{s:?}");
    assert!(s.too_long.load(Relaxed) >= 8, "{s:?}");
    assert!(s.unknown_device.load(Relaxed) >= 8, "{s:?}");
    assert!(s.bad_checksum.load(Relaxed) >= 8, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_and_kv_changes_come_down_as_lines() {
    let rig = Rig::new(3);
    let json = Pty::open();
    let compact = Pty::open();
    let (jtx, mut jev) = rig.port(serial_cfg(&format!(
        "port = \"{}\"\ndevices = [\"dev0\"]",
        json.path.display()
    )));
    let (ctx, mut cev) = rig.port(serial_cfg(&format!(
        "port = \"{}\"\ndevices = [\"dev1\", \"dev2\"]\ndownlink_format = \"compact\"\nrequire_checksum = true",
        compact.path.display()
    )));
    presence(&mut jev, &[0], true).await;
    presence(&mut cev, &[1, 2], true).await;

    jtx.send(cmd(0, "blink", r#"{"times":3}"#)).await.unwrap();
    json.expect(r#"{"dev":"dev0","command":"blink","parameters":{"times":3}}"#)
        .await;
    jtx.send(kv(0, r#"{"action":"reload","rev":5,"numItems":2,"items":[{"key":"a","value":1,"modificationTime":"2026-01-01T00:00:00.000Z"},{"key":"b","value":{"x":"y z"}}]}"#)).await.unwrap();
    json.expect(r#"{"dev":"dev0","kv":"reload","rev":5,"items":[{"key":"a","value":1},{"key":"b","value":{"x":"y z"}}]}"#).await;
    jtx.send(kv(0, r#"{"action":"set","rev":6,"key":"k","value":42}"#))
        .await
        .unwrap();
    json.expect(r#"{"dev":"dev0","kv":"set","key":"k","value":42,"rev":6}"#)
        .await;
    jtx.send(kv(0, r#"{"action":"delete","rev":7,"key":"k"}"#))
        .await
        .unwrap();
    json.expect(r#"{"dev":"dev0","kv":"delete","key":"k","rev":7}"#)
        .await;

    ctx.send(cmd(
        2,
        "say",
        r#"{"text":"hello world","loud":true,"n":2.5,"code":"007"}"#,
    ))
    .await
    .unwrap();
    compact
        .expect(&with_checksum(
            r#"C dev2 say code=007 loud=true n=2.5 text=hello\sworld"#,
        ))
        .await;
    ctx.send(kv(
        1,
        r#"{"action":"reload","rev":9,"numItems":1,"items":[{"key":"a","value":"x"}]}"#,
    ))
    .await
    .unwrap();
    compact.expect(&with_checksum("K dev1 reload 9 1")).await;
    compact.expect(&with_checksum("K dev1 item a x")).await;
    ctx.send(kv(
        1,
        r#"{"action":"set","rev":10,"key":"a","value":[1,2]}"#,
    ))
    .await
    .unwrap();
    compact
        .expect(&with_checksum("K dev1 set a [1,2] 10"))
        .await;
    // Not MODE's JSON, or a device of another port: dropped with a count, nothing written.
    ctx.send(kv(1, "garbage")).await.unwrap();
    ctx.send(cmd(0, "blink", "{}")).await.unwrap();
    ctx.send(kv(1, r#"{"action":"delete","rev":11,"key":"a"}"#))
        .await
        .unwrap();
    compact.expect(&with_checksum("K dev1 delete a 11")).await;
    assert_eq!(rig.stat(|s| &s.down_bad_payload), 2);
    // Acks and downlink lines share the port without mixing mid-line.
    for i in 0..200u32 {
        ctx.send(cmd(
            1,
            "tick",
            &format!(r#"{{"i":{i},"pad":"{}"}}"#, "x".repeat(100)),
        ))
        .await
        .unwrap();
        compact
            .send(&with_checksum(&format!("E dev1 up i={i} #{i}")))
            .await;
    }
    let (mut oks, mut ticks) = (0, 0);
    while oks < 200 || ticks < 200 {
        let l = compact.line(T).await.expect("line");
        let (body, sum) = l.rsplit_once('*').expect("checksummed");
        assert_eq!(format!("{:02X}", crc8(body.as_bytes())), sum, "{l}");
        if body.starts_with("OK ") {
            oks += 1;
        } else {
            assert!(
                body.starts_with(&format!("C dev1 tick i={ticks} pad=")),
                "{l}"
            );
            ticks += 1;
        }
    }
    compact.quiet(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_missing_at_start_unplugged_and_replugged_recovers_on_its_own() {
    let rig = Rig::new(1);
    let dir = tempfile::tempdir().unwrap();
    let by_id = dir.path().join("usb-FTDI_FT232R-if00-port0");
    let (down, mut ev) = rig.port(serial_cfg(&format!(
        "port = \"{}\"\ndevices = [\"dev0\"]",
        by_id.display()
    )));
    // Missing at start: counted, retried, no presence.
    rig.wait_stat("open failures", |s| &s.port_open_failures, 1)
        .await;
    assert!(ev.try_recv().is_err());
    let err = tokio_serial::SerialStream::open(&tokio_serial::new(by_id.to_string_lossy(), 9600))
        .unwrap_err();
    assert_eq!(OpenFailure::of(&err), OpenFailure::Missing);

    for round in 0..4u32 {
        let pty = Pty::open();
        link(&pty.path, &by_id);
        let t0 = Instant::now();
        let conn = presence(&mut ev, &[0], true).await;
        let picked_up = t0.elapsed();
        assert!(picked_up < Duration::from_secs(3), "took {picked_up:?}");
        if round > 0 {
            // What was sent while the port was away is written once it is back.
            pty.expect(&format!(
                r#"{{"dev":"dev0","command":"while-away","parameters":{{"r":{}}}}}"#,
                round - 1
            ))
            .await;
        }
        if round == 3 {
            assert_eq!(rig.stat(|s| &s.port_lost), 3);
            assert_eq!(rig.stat(|s| &s.port_opens), 4);
            break;
        }
        pty.send(&format!("E plugged round={round} #{round}")).await;
        pty.expect(&format!("OK {round}")).await;
        down.send(cmd(0, "hello", &format!(r#"{{"round":{round}}}"#)))
            .await
            .unwrap();
        pty.expect(&format!(
            r#"{{"dev":"dev0","command":"hello","parameters":{{"round":{round}}}}}"#
        ))
        .await;
        // Unplug: the device node goes away and the pty closes.
        std::fs::remove_file(&by_id).unwrap();
        drop(pty);
        let lost = presence(&mut ev, &[0], false).await;
        assert_eq!(lost, conn);
        down.send(cmd(0, "while-away", &format!(r#"{{"r":{round}}}"#)))
            .await
            .unwrap();
    }
    assert_eq!(rig.rows(0).await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_held_by_another_process_is_reported_and_taken_when_released() {
    let rig = Rig::new(1);
    let pty = Pty::open();
    // Another program has the port open exclusively (serialport's TIOCEXCL + flock).
    let holder =
        tokio_serial::SerialStream::open(&tokio_serial::new(pty.path.to_string_lossy(), 9600))
            .unwrap();
    let err =
        tokio_serial::SerialStream::open(&tokio_serial::new(pty.path.to_string_lossy(), 9600))
            .unwrap_err();
    assert_eq!(OpenFailure::of(&err), OpenFailure::Busy);
    assert!(OpenFailure::Busy
        .fix("/dev/ttyUSB0")
        .contains("fuser -v /dev/ttyUSB0"));
    assert!(OpenFailure::Permission
        .fix("/dev/ttyUSB0")
        .contains("sudo usermod -aG dialout modehub"));
    let (_down, mut ev) = rig.port(serial_cfg(&format!(
        "port = \"{}\"\ndevices = [\"dev0\"]",
        pty.path.display()
    )));
    rig.wait_stat("open failures", |s| &s.port_open_failures, 2)
        .await;
    assert!(ev.try_recv().is_err());
    drop(holder);
    presence(&mut ev, &[0], true).await;
    pty.send("E free #1").await;
    pty.expect("OK 1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sensor_that_never_reads_does_not_stall_other_devices() {
    let rig = Rig::new(2);
    let deaf = Pty::open();
    let ok = Pty::open();
    let (deaf_tx, mut dev) = rig.port(serial_cfg(&format!(
        "port = \"{}\"\ndevices = [\"dev0\"]\nwrite_queue = 4",
        deaf.path.display()
    )));
    let (ok_tx, mut oev) = rig.port(serial_cfg(&format!(
        "port = \"{}\"\ndevices = [\"dev1\"]\nwrite_queue = 4",
        ok.path.display()
    )));
    presence(&mut dev, &[0], true).await;
    presence(&mut oev, &[1], true).await;
    // Flood the deaf port far beyond what the pty buffers; the downlink never waits.
    let big = format!(r#"{{"blob":"{}"}}"#, "x".repeat(8 * 1024));
    let t0 = Instant::now();
    let mut refused = 0;
    for _ in 0..500 {
        if !serial::offer(&deaf_tx, cmd(0, "fill", &big), &rig.metrics.serial) {
            refused += 1;
        }
        tokio::task::yield_now().await;
    }
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(refused > 400, "only {refused} refused");
    assert_eq!(rig.stat(|s| &s.write_queue_full), refused);
    // The other port works at once, both ways.
    for i in 0..20u32 {
        assert!(serial::offer(
            &ok_tx,
            cmd(1, "ping", &format!(r#"{{"i":{i}}}"#)),
            &rig.metrics.serial
        ));
        ok.expect(&format!(
            r#"{{"dev":"dev1","command":"ping","parameters":{{"i":{i}}}}}"#
        ))
        .await;
        ok.send(&format!("E pong i={i} #{i}")).await;
        ok.expect(&format!("OK {i}")).await;
    }
    // The deaf sensor can still talk: its lines are stored (its acks wait or are dropped).
    for i in 0..10u32 {
        deaf.send(&format!("E still-here i={i} #{i}")).await;
    }
    let deadline = Instant::now() + T;
    while rig.rows(0).await.len() < 10 {
        assert!(
            Instant::now() < deadline,
            "deaf sensor's lines were not stored"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(rig.rows(1).await.len(), 20);
}

/// Lines per second through one port: numbered compact lines of ~40 bytes, each answered
/// `OK n` only after its commit, (1) at full pty speed and (2) paced at 115200 baud (11,520
/// bytes/s), and unnumbered lines at full speed. Run with
/// `cargo test --release --test it -- --ignored --nocapture serial::throughput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn throughput_one_port() {
    let rig = Rig::new(1);
    let pty = Pty::open();
    let (_down, mut ev) = rig.port(serial_cfg(&format!(
        "port = \"{}\"\ndevices = [\"dev0\"]",
        pty.path.display()
    )));
    presence(&mut ev, &[0], true).await;
    let mut next = 0u32;
    // THROUGHPUT_SCALE=10 for a quick run in a debug build.
    let scale: u32 = std::env::var("THROUGHPUT_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let runs = [
        ("full speed, numbered", 200_000u32 / scale, true, None),
        ("full speed, unnumbered", 200_000 / scale, false, None),
        (
            "115200 baud-equivalent, numbered",
            3_000,
            true,
            Some(11_520.0f64),
        ),
    ];
    for (label, n, acked, bytes_per_sec) in runs {
        let before = rig.outbox.stats().rows_appended.load(Relaxed);
        let mut text = Vec::new();
        for _ in 0..n {
            let i = next;
            next += 1;
            let mut l = format!(
                "E dev0 env t={}.{} rh={} door={} bat=3.{}",
                18 + i % 10,
                i % 10,
                40 + i % 30,
                i % 2,
                60 + i % 40
            );
            if acked {
                l.push_str(&format!(" #{i}"));
            }
            l.push('\n');
            text.extend_from_slice(l.as_bytes());
        }
        let last = next - 1;
        let t0 = Instant::now();
        let writer = async {
            match bytes_per_sec {
                None => pty.write_all(&text).await,
                Some(rate) => {
                    // Write what a UART at this rate would have sent by now, every 5 ms.
                    let mut sent = 0;
                    while sent < text.len() {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        let due = ((t0.elapsed().as_secs_f64() * rate) as usize).min(text.len());
                        if due > sent {
                            pty.write_all(&text[sent..due]).await;
                            sent = due;
                        }
                    }
                }
            }
            Instant::now()
        };
        let reader = async {
            if acked {
                // One answer line per line, in order: count newlines, then check the last.
                let mut lines = 0;
                let mut tail = Vec::new();
                while lines < n {
                    let chunk = pty.chunk(Duration::from_secs(20)).await.unwrap_or_else(|| {
                        panic!(
                            "{lines}/{n} answers; {:?} {:?}",
                            rig.metrics.serial,
                            rig.outbox.stats()
                        )
                    });
                    lines += chunk.iter().filter(|&&b| b == b'\n').count() as u32;
                    tail = chunk;
                }
                let tail = String::from_utf8_lossy(&tail);
                assert!(tail.ends_with(&format!("OK {last}\n")), "{tail}");
            } else {
                while rig.outbox.stats().rows_appended.load(Relaxed) - before < n as u64 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            Instant::now()
        };
        let (written, done) = tokio::join!(writer, reader);
        let secs = (done - t0).as_secs_f64();
        let avg = text.len() as f64 / n as f64;
        println!(
            "{label}: {n} lines ({avg:.1} B avg) in {secs:.2}s = {:.0} lines/s ({:.0} KiB/s); \
             last OK {:.1} ms after the last byte; 115200 baud carries {:.0} such lines/s",
            n as f64 / secs,
            text.len() as f64 / secs / 1024.0,
            (done - written).as_secs_f64() * 1000.0,
            11520.0 / avg
        );
    }
    assert_eq!(rig.outbox.stats().rows_appended.load(Relaxed), next as u64);
}
