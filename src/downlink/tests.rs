//! The downlink in-process, with real storage and serial-style adapters whose queues the test
//! reads: one device's stuck path must not hold up another device. A gate (the test hook below)
//! stands in for a slow path; nothing here waits on time except generous deadlines.

use super::*;
use crate::broker::FrontLimits;
use crate::config::Config;
use crate::local::TopicKind;
use crate::registry::{Registry, SharedRegistry};
use crate::router::Router;
use std::sync::Mutex;
use tokio::sync::{oneshot, watch};

/// Closed gates by MODE device id: that device's downlink work waits until its gate opens.
static GATES: Mutex<Vec<(u64, watch::Receiver<bool>)>> = Mutex::new(Vec::new());

/// The hook the worker calls before each piece of work: waits while `mode_id`'s gate is closed.
pub(super) async fn gate(mode_id: u64) {
    let gate = GATES
        .lock()
        .unwrap()
        .iter()
        .find(|(id, _)| *id == mode_id)
        .map(|(_, rx)| rx.clone());
    if let Some(mut open) = gate {
        let _ = open.wait_for(|open| *open).await;
    }
}

/// Closes `mode_id`'s gate; sending `true` opens it.
fn close_gate(mode_id: u64) -> watch::Sender<bool> {
    let (tx, rx) = watch::channel(false);
    GATES.lock().unwrap().push((mode_id, rx));
    tx
}

/// Mode ids no other test uses, so the gate holds only this test's device.
const SLOW: u64 = 7_770_001;
const QUICK: u64 = 7_770_002;

const DEADLINE: Duration = Duration::from_secs(30);

/// Waits (polling) until `cond` holds; panics after [`DEADLINE`].
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn next(rx: &mut mpsc::Receiver<DownMsg>, what: &str) -> DownMsg {
    tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {DEADLINE:?}"))
        .expect("adapter queue open")
}

/// One device's work is held at its gate; another device's reload, command, MODE store (through
/// storage) and kv change must still reach its adapter, and once released the held device gets
/// its stored and direct commands in order. Fails if all devices' work ran inline on the routing
/// task (presence stops being applied) or on one shared task (the quick device waits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_whose_path_is_stuck_does_not_hold_up_another() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = format!(
        "[hub]\ndata_dir = \"{}\"\n[local.mqtt]\nlisten = \"127.0.0.1:0\"\n[cloud]\napi_url = \"http://127.0.0.1:9\"\nmqtt_url = \"mqtt://127.0.0.1:9\"\n",
        dir.path().display()
    );
    for (i, mode_id) in [SLOW, QUICK].into_iter().enumerate() {
        text += &format!(
            "[[device]]\nname = \"dev{i}\"\nmode_id = {mode_id}\nhome_id = 42\napi_key = \"v1.key-{i}\"\nlocal_password = \"pw{i}\"\n"
        );
    }
    let cfg = Config::parse(&text, dir.path()).unwrap();
    let registry = Registry::from_config(&cfg);
    let (slow, quick) = (DeviceId(0), DeviceId(1));
    assert_eq!(registry.get(slow).mode_id.get(), SLOW);
    assert_eq!(registry.get(quick).mode_id.get(), QUICK);

    let metrics = Arc::new(Metrics::default());
    let (outbox, _writer) = Outbox::open(dir.path(), false, Arc::new(|_| {})).unwrap();
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    // The broker is the MQTT devices' way down; both devices here are on serial-style queues.
    let shared = SharedRegistry::new(Registry::from_config(&cfg));
    let clock = crate::clock::ClockWatch::system(true).clock();
    let router = Router::new(
        shared.clone(),
        outbox.clone(),
        metrics.clone(),
        65536,
        clock,
    );
    let (broker_events, _broker_events_rx) = mpsc::channel(16);
    let broker = LocalBroker::start_with(
        "127.0.0.1:0".parse().unwrap(),
        FrontLimits::default(),
        None,
        65536,
        shared,
        router,
        metrics.clone(),
        broker_events,
        shutdown.clone(),
        &tracker,
    )
    .await
    .unwrap();
    let (slow_tx, mut slow_rx) = mpsc::channel(16);
    let (quick_tx, mut quick_rx) = mpsc::channel(16);
    let view = Arc::new(std::sync::RwLock::new(Arc::new(DeviceView {
        registry: Arc::new(registry),
        adapters: vec![Adapter::Serial(slow_tx), Adapter::Serial(quick_tx)],
        sessions: Vec::new(),
        uplinks: Vec::new(),
        transports: Vec::new(),
    })));
    let presence = Arc::new(Presence::new(2));
    let downlink = Downlink {
        view,
        presence: presence.clone(),
        broker,
        outbox,
        metrics: metrics.clone(),
        cfg: DownlinkConfig {
            max_pending_commands: 100,
            command_ttl: Duration::from_secs(3600),
        },
    };
    let (local, local_rx) = mpsc::channel(16);
    let (down, down_rx) = mpsc::channel(16);
    let open_slow = close_gate(SLOW);
    let run = tokio::spawn(downlink.run(local_rx, down_rx, shutdown.clone()));

    // The slow device: a command while it is away (stored), then it subscribes (flush), then
    // one while it listens (handed straight over). Its gate holds all of it.
    let cmd = |n: &str| Bytes::from(format!(r#"{{"action":"{n}","parameters":{{}}}}"#));
    down.send(Downstream::Command(slow, cmd("a1")))
        .await
        .unwrap();
    // Presence and MODE's messages come on separate channels: each step is taken before the next.
    wait_until("a1 routed", || down.capacity() == down.max_capacity()).await;
    local
        .send(LocalEvent::Subscribed(slow, 1, TopicKind::Command))
        .await
        .unwrap();
    wait_until("the slow device listens", || {
        presence.listens_for_commands(slow)
    })
    .await;
    down.send(Downstream::Command(slow, cmd("a2")))
        .await
        .unwrap();

    // The quick device, after it: its kv reload, a command, and a kv change through the mirror
    // (storage), all while the slow one is still held.
    for kind in [TopicKind::Command, TopicKind::Kv] {
        local
            .send(LocalEvent::Subscribed(quick, 2, kind))
            .await
            .unwrap();
    }
    wait_until("the quick device listens", || {
        presence.listens_for_commands(quick) && presence.listens_for_kv(quick)
    })
    .await;
    down.send(Downstream::Command(quick, cmd("b1")))
        .await
        .unwrap();
    // MODE's store (through the mirror, in storage), then a change to it.
    let (applied, applied_rx) = oneshot::channel();
    let store = br#"{"action":"reload","rev":1,"items":[{"key":"k","value":4}]}"#;
    down.send(Downstream::KvBarrier(
        quick,
        Bytes::from_static(store),
        applied,
    ))
    .await
    .unwrap();
    let set = Bytes::from_static(br#"{"action":"set","rev":2,"key":"k","value":5}"#);
    down.send(Downstream::Kv(quick, set.clone())).await.unwrap();

    let held = "while the slow device is held";
    let m = next(
        &mut quick_rx,
        &format!("the quick device's first reload {held}"),
    )
    .await;
    assert_eq!((m.dev, m.kind), (quick, DownKind::Kv));
    assert!(m.payload.starts_with(br#"{"action":"reload""#), "{m:?}");
    let m = next(&mut quick_rx, &format!("the quick device's command {held}")).await;
    assert_eq!(
        (m.dev, m.kind, m.payload),
        (quick, DownKind::Command, cmd("b1"))
    );
    tokio::time::timeout(DEADLINE, applied_rx)
        .await
        .unwrap_or_else(|_| panic!("the quick device's store not applied {held}"))
        .unwrap();
    let m = next(&mut quick_rx, &format!("MODE's store {held}")).await;
    let reload: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!((m.dev, m.kind), (quick, DownKind::Kv));
    assert_eq!(reload["items"][0]["value"], 4, "{reload}");
    let m = next(
        &mut quick_rx,
        &format!("the quick device's kv change {held}"),
    )
    .await;
    assert_eq!((m.dev, m.kind, m.payload), (quick, DownKind::Kv, set));
    assert!(
        slow_rx.try_recv().is_err(),
        "the slow device's work passed its closed gate"
    );

    // Released, the slow device gets its commands in order: the stored one, then the new one.
    open_slow.send(true).unwrap();
    for want in ["a1", "a2"] {
        let m = next(&mut slow_rx, "the slow device once released").await;
        assert_eq!(
            (m.dev, m.kind, m.payload),
            (slow, DownKind::Command, cmd(want))
        );
    }
    assert_eq!(metrics.down.commands_queued.load(Relaxed), 1);
    // Counted just after the hand-over, so possibly after the test has the message.
    let delivered = || metrics.down.commands_delivered.load(Relaxed);
    wait_until("three commands counted as delivered", || delivered() >= 3).await;
    assert_eq!(delivered(), 3);

    shutdown.cancel();
    tokio::time::timeout(DEADLINE, run)
        .await
        .expect("the downlink stops")
        .unwrap();
    tracker.close();
    tracker.wait().await;
}
