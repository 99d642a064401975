//! The hub against what MODE is known to do, and safe where it is not (issue 11): the REST
//! fallback never parks a device over kv, a delete of a missing key is done, MQTT over
//! WebSocket carries everything MQTT does, and the hub survives both settings of the
//! emulator's assumed knobs.

mod common;

use common::*;
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
    let emu = emulator_with(1, Behaviour::from_env()).await;
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
    hub.shutdown().await;
}
