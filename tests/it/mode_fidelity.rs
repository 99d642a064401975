//! The hub against what MODE is known to do, and safe where it is not (issue 11): the REST
//! fallback never parks a device over kv, a delete of a missing key is done, MQTT over
//! WebSocket carries everything MQTT does, and the hub survives both settings of the
//! emulator's assumed knobs.

use crate::common::*;
use modehub::config::Config;
use modehub::emulator::{Behaviour, Emulator, EmulatorConfig};
use modehub::Hub;
use serde_json::json;
use std::time::Duration;

async fn emulator_with(n: usize, behaviour: Behaviour) -> Emulator {
    let mut cfg = EmulatorConfig::local(seed(n));
    cfg.behaviour = behaviour;
    Emulator::start(cfg).await.unwrap()
}

async fn hub(emu: &Emulator, dir: &std::path::Path, n: usize, cloud: &str) -> Hub {
    let text = hub_config_text(emu, dir, n, cloud);
    Hub::start(Config::parse(&text, dir).unwrap())
        .await
        .unwrap()
}

/// Waits until the outbox is empty (everything acknowledged or dead-lettered).
async fn drained(hub: &Hub) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !hub.outbox().depth().await.unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "outbox never drained: {:?}",
            hub.outbox().depth().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Item 2: MODE answers 404 to the delete of a key it does not have; the hub used to retry it
/// forever and hold every later event of the device behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_delete_of_a_missing_key_does_not_stall_the_device() {
    // Both answers to deleting a missing key (404 or 204) must work; kv REST must be allowed.
    let emu = emulator_with(
        1,
        Behaviour {
            device_key_kv_rest: true,
            ..Behaviour::from_env()
        },
    )
    .await;
    let h = emu.handle();
    let dir = tempfile::tempdir().unwrap();
    let hub = hub(&emu, dir.path(), 1, "transport = \"rest\"\n").await;
    let mut s = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
    s.publish_all(
        "/devices/dev0/kv",
        vec![r#"{"action":"delete","key":"ghost"}"#],
    )
    .await;
    s.publish_all("/devices/dev0/event", vec![event_json(1)])
        .await;
    let evs = wait_events(&h, device_id(0), 1).await;
    assert_eq!(ns(&evs), vec![1], "the event behind the delete arrives");
    drained(&hub).await;
    assert!(
        hub.outbox().dead_letters(10).await.unwrap().is_empty(),
        "a delete of a missing key is done, not dead"
    );
    hub.shutdown().await;
}

/// Item 1: MODE may refuse kv over REST to a device key. Events and commands must go on; the
/// refused kv write is dead-lettered, nothing else is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_kv_refused_degrades_kv_only() {
    let emu = emulator_with(
        1,
        Behaviour {
            device_key_kv_rest: false,
            ..Behaviour::from_env()
        },
    )
    .await;
    let h = emu.handle();
    let dir = tempfile::tempdir().unwrap();
    let hub = hub(&emu, dir.path(), 1, "transport = \"rest\"\n").await;
    let mut s = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
    s.subscribe("/devices/dev0/command").await;
    // The session comes up although GET kv is refused: commands arrive.
    send_command(&emu, device_id(0), "ping", json!({"n": 1})).await;
    let p = s
        .next_publish(Duration::from_secs(20))
        .await
        .expect("command reaches the sensor");
    assert!(p.topic.ends_with("/command"), "{}", p.topic);
    // A kv write is refused; the events around it still go.
    s.publish_all("/devices/dev0/event", vec![event_json(1)])
        .await;
    s.publish_all(
        "/devices/dev0/kv",
        vec![r#"{"action":"set","key":"a","value":1}"#],
    )
    .await;
    s.publish_all("/devices/dev0/event", vec![event_json(2)])
        .await;
    let evs = wait_events(&h, device_id(0), 2).await;
    assert_eq!(first_arrivals(&ns(&evs)).0, vec![1, 2]);
    drained(&hub).await;
    let dead = hub.outbox().dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].key, "a");
    // Shown as kv trouble of this device, counted.
    let kv = &hub.uplink_status()[0].kv;
    assert!(kv.problem().is_some());
    assert!(kv.refusals.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    hub.shutdown().await;
}

/// Hub config text with extra `[cloud]` lines and the MQTT URL replaced.
fn config_text(emu: &Emulator, dir: &std::path::Path, n: usize, cloud: &str, url: &str) -> String {
    hub_config_text(emu, dir, n, cloud).replace(
        &format!("mqtt_url = \"mqtt://{}\"", emu.mqtt_addr()),
        &format!("mqtt_url = \"{url}\""),
    )
}

/// Item 4: `mqtt_url = "ws://..."` is MQTT with its full semantics (QoS 1 events, commands,
/// live kv push) over WebSocket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_websocket_carries_events_commands_and_live_kv() {
    let emu = emulator(1).await;
    let h = emu.handle();
    h.set_kv(device_id(0), "mode", json!("eco")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("ws://{}/", emu.http_addr());
    let text = config_text(&emu, dir.path(), 1, "", &url);
    assert!(text.contains("ws://"), "{text}");
    let hub = Hub::start(Config::parse(&text, dir.path()).unwrap())
        .await
        .unwrap();
    let mut s = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
    s.subscribe("/devices/dev0/command").await;
    s.publish_all("/devices/dev0/event", vec![event_json(1), event_json(2)])
        .await;
    let evs = wait_events(&h, device_id(0), 2).await;
    assert_eq!(first_arrivals(&ns(&evs)).0, vec![1, 2]);
    assert!(evs.iter().all(|e| e.transport == "mqtt"));
    send_command(&emu, device_id(0), "go", json!({"n": 1})).await;
    let p = s.next_publish(Duration::from_secs(20)).await.unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&p.payload).unwrap(),
        json!({"action":"go","parameters":{"n":1}})
    );
    // The reload on subscribe, then a live change from the cloud, reach the mirror.
    wait_until("reload mirrored", || {
        futures_lite_block(hub.outbox().kv_snapshot(device_id(0)))
            .items
            .iter()
            .any(|(k, _)| k == "mode")
    })
    .await;
    h.set_kv(device_id(0), "live", json!(1)).unwrap();
    wait_until("live kv change mirrored", || {
        futures_lite_block(hub.outbox().kv_snapshot(device_id(0)))
            .items
            .iter()
            .any(|(k, _)| k == "live")
    })
    .await;
    hub.shutdown().await;
}

/// Runs a future to completion from a sync closure (the outbox answers from its own thread).
fn futures_lite_block<F: std::future::Future<Output = Result<T, E>>, T, E: std::fmt::Debug>(
    f: F,
) -> T {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f)).unwrap()
}

/// Item 7: MODE's `parameters` is optional; a command without it reaches the sensor unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_without_parameters_is_forwarded_unchanged() {
    let emu = emulator(1).await;
    let dir = tempfile::tempdir().unwrap();
    let hub = hub(&emu, dir.path(), 1, "").await;
    let mut s = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
    s.subscribe("/devices/dev0/command").await;
    send_command(&emu, device_id(0), "reboot", serde_json::Value::Null).await;
    let p = s.next_publish(Duration::from_secs(20)).await.unwrap();
    assert_eq!(&p.payload[..], br#"{"action":"reboot"}"#);
    hub.shutdown().await;
}

/// Item 6: a reload bigger than the downlink packet limit must not make the session reconnect
/// into the same reload again and again; events go on and the problem shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_over_the_downlink_limit_does_not_loop() {
    let emu = emulator(1).await;
    let h = emu.handle();
    // A store of ~200 KB against a limit of 64 KiB + the upload size (~68 KiB).
    for i in 0..4 {
        h.set_kv(device_id(0), &format!("big{i}"), json!("x".repeat(50_000)))
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let text = hub_config_text(&emu, dir.path(), 1, "max_downlink_packet_bytes = 65536\n")
        + "[ops]\nlisten = \"127.0.0.1:0\"\n";
    let cfg = Config::parse(&text, dir.path()).unwrap();
    let mut hub = Hub::start(cfg.clone()).await.unwrap();
    let ops = hub.ops_context(&cfg);
    let mut s = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
    s.publish_all("/devices/dev0/event", vec![event_json(1)])
        .await;
    assert_eq!(ns(&wait_events(&h, device_id(0), 1).await), vec![1]);
    // The problem is shown in status and health.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        let st = ops.status().await;
        if st.devices[0].kv_problem.is_some() {
            break st;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no kv problem shown"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let problem = status.devices[0].kv_problem.clone().unwrap();
    assert!(problem.contains("downlink packet limit"), "{problem}");
    assert_eq!(
        hub.uplink_status()[0]
            .kv
            .reloads_too_large
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // Events keep flowing on the session without kv, and it is not reconnecting.
    wait_until("a session is up again", || h.is_connected(device_id(0))).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let health = loop {
        let health = ops.health().await;
        if health.healthy || tokio::time::Instant::now() > deadline {
            break health;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let kv = health.checks.iter().find(|c| c.name == "kv").unwrap();
    assert!(kv.ok && kv.detail.contains("dev0"), "{kv:?}");
    assert!(
        health.healthy,
        "kv trouble alone does not make the hub unhealthy: {}",
        health.summary()
    );
    let connects = h.connect_count(device_id(0));
    s.publish_all("/devices/dev0/event", vec![event_json(2)])
        .await;
    let evs = wait_events(&h, device_id(0), 2).await;
    assert_eq!(first_arrivals(&ns(&evs)).0, vec![1, 2]);
    assert_eq!(h.connect_count(device_id(0)), connects, "no reconnect loop");
    assert!(connects <= 2, "{connects} connects");
    hub.shutdown().await;
}

/// Item 8: a kv subscription MODE refuses is retried, and shown meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_kv_subscription_is_retried_and_shown() {
    let emu = emulator(1).await;
    let h = emu.handle();
    h.set_kv(device_id(0), "mode", json!("eco")).unwrap();
    h.set_faults(modehub::emulator::Faults {
        refuse_kv_subscriptions: true,
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let text = hub_config_text(&emu, dir.path(), 1, "") + "[ops]\nlisten = \"127.0.0.1:0\"\n";
    let cfg = Config::parse(&text, dir.path()).unwrap();
    let mut hub = Hub::start(cfg.clone()).await.unwrap();
    let ops = hub.ops_context(&cfg);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let st = ops.status().await;
        if let Some(p) = &st.devices[0].kv_problem {
            assert!(p.contains("kv subscription"), "{p}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no kv problem shown"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let kv = ops.health().await;
    assert!(kv
        .checks
        .iter()
        .any(|c| c.name == "kv" && c.detail.contains("kv subscription")));
    assert!(!hub.outbox().kv_snapshot(device_id(0)).await.unwrap().loaded);
    // MODE takes it again: the retry loads the mirror and the problem clears.
    h.set_faults(Default::default());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let snap = hub.outbox().kv_snapshot(device_id(0)).await.unwrap();
        if snap.loaded && ops.status().await.devices[0].kv_problem.is_none() {
            assert_eq!(snap.items.len(), 1);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "kv never loaded after the refusal"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    hub.shutdown().await;
}
