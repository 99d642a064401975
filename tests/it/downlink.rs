//! The way down (issue 3): commands and the Device Data Proxy between MODE, the hub and local
//! sensors, over both cloud transports (device MQTT, and REST + command WebSocket).

use crate::common::*;
use modehub::config::Config;
use modehub::emulator::Emulator;
use modehub::Hub;
use rumqttc::{QoS, SubscribeReasonCode};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

const TRANSPORTS: [&str; 2] = ["mqtt", "rest"];

async fn start(transport: &str, n: usize, hub_extra: &str) -> (Emulator, Hub, tempfile::TempDir) {
    let emu = emulator(n).await;
    let dir = tempfile::tempdir().unwrap();
    let text = hub_config_text(&emu, dir.path(), n, &format!("transport = \"{transport}\""))
        .replace("[local.mqtt]", &format!("{hub_extra}\n[local.mqtt]"));
    let hub = Hub::start(Config::parse(&text, dir.path()).unwrap())
        .await
        .unwrap();
    (emu, hub, dir)
}

fn json_of(p: &rumqttc::Publish) -> Value {
    serde_json::from_slice(&p.payload).unwrap()
}

/// A sensor's copy of its store, kept the way MODE's SDK does.
#[derive(Default, Debug)]
struct SensorKv {
    loaded: bool,
    items: BTreeMap<String, Value>,
}

impl SensorKv {
    fn apply(&mut self, m: &Value) {
        match m["action"].as_str().unwrap() {
            "reload" => {
                self.loaded = true;
                self.items = m["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|i| (i["key"].as_str().unwrap().to_string(), i["value"].clone()))
                    .collect();
                assert_eq!(m["numItems"].as_u64().unwrap() as usize, self.items.len());
            }
            "set" if self.loaded => {
                self.items
                    .insert(m["key"].as_str().unwrap().into(), m["value"].clone());
            }
            "delete" if self.loaded => {
                self.items.remove(m["key"].as_str().unwrap());
            }
            _ => {}
        }
    }
    /// Applies whatever arrives within `quiet` of the previous message.
    async fn drain(&mut self, s: &mut Sensor, quiet: Duration) {
        while let Some(p) = s.next_publish(quiet).await {
            self.apply(&json_of(&p));
        }
    }
}

fn as_map(items: &[(String, Value)]) -> BTreeMap<String, Value> {
    items.iter().cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_reaches_the_right_local_device_and_no_other() {
    for transport in TRANSPORTS {
        let (emu, hub, _dir) = start(transport, 2, "").await;
        let mut s0 = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
        let mut s1 =
            Sensor::connect(hub.local_addr(), &device_id(1).to_string(), &device_key(1)).await;
        // dev0 subscribes by name and tries dev1's topics; dev1 subscribes by MODE ID.
        let ack = s0.subscribe("/devices/dev0/command").await;
        assert!(!matches!(ack.return_codes[0], SubscribeReasonCode::Failure));
        for other in [
            "/devices/dev1/command",
            "/devices/101/command",
            "/devices/+/command",
        ] {
            let ack = s0.subscribe(other).await;
            assert!(
                matches!(ack.return_codes[0], SubscribeReasonCode::Failure),
                "{transport}: {other} must be refused"
            );
        }
        s1.subscribe("/devices/101/command").await;

        // Integer parameters stay integers; the payload is MODE's JSON unchanged.
        send_command(
            &emu,
            device_id(0),
            "light",
            json!({"level": 3, "big": 12345678901234u64}),
        )
        .await;
        let p = s0
            .next_publish(Duration::from_secs(10))
            .await
            .expect("dev0 gets its command");
        assert_eq!(p.topic, "/devices/dev0/command");
        let text = std::str::from_utf8(&p.payload).unwrap();
        assert!(
            text.contains("\"level\":3") && text.contains("12345678901234"),
            "{text}"
        );
        assert_eq!(json_of(&p)["action"], "light");
        assert!(
            s1.next_publish(Duration::from_millis(500)).await.is_none(),
            "{transport}: dev1 got dev0's command"
        );

        send_command(&emu, device_id(1), "beep", json!({})).await;
        let p = s1
            .next_publish(Duration::from_secs(10))
            .await
            .expect("dev1 gets its command");
        assert_eq!(p.topic, "/devices/101/command");
        assert_eq!(json_of(&p), json!({"action": "beep", "parameters": {}}));
        assert!(
            s0.next_publish(Duration::from_millis(500)).await.is_none(),
            "{transport}: dev0 got dev1's command"
        );
        assert_eq!(hub.metrics().down.commands_delivered.load(Relaxed), 2);
        hub.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_for_an_absent_device_wait_in_order_and_expired_ones_never_arrive() {
    for transport in TRANSPORTS {
        let (emu, hub, _dir) = start(transport, 2, "command_ttl_secs = 2").await;
        // Neither sensor is connected. dev1's command will expire; dev0's three will wait.
        send_command(&emu, device_id(1), "stale", json!({})).await;
        wait_until("dev1's command stored", || {
            hub.metrics().down.commands_queued.load(Relaxed) == 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        for i in 0..3 {
            send_command(&emu, device_id(0), "step", json!({ "i": i })).await;
        }
        wait_until("dev0's commands stored", || {
            hub.metrics().down.commands_queued.load(Relaxed) == 4
        })
        .await;

        let mut s0 = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
        s0.subscribe("/devices/dev0/command").await;
        for i in 0..3 {
            let p = s0
                .next_publish(Duration::from_secs(10))
                .await
                .expect("waiting command");
            assert_eq!(json_of(&p)["parameters"]["i"], i, "{transport}: in order");
        }
        let mut s1 = Sensor::connect(hub.local_addr(), "dev1", "pw1").await;
        s1.subscribe("/devices/dev1/command").await;
        assert!(
            s1.next_publish(Duration::from_millis(800)).await.is_none(),
            "{transport}: an expired command was delivered late"
        );
        assert_eq!(hub.metrics().down.commands_expired.load(Relaxed), 1);
        assert_eq!(hub.metrics().down.commands_delivered.load(Relaxed), 3);
        hub.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_commands_are_bounded_per_device() {
    let (emu, hub, _dir) = start("mqtt", 1, "max_pending_commands = 5").await;
    for i in 0..8 {
        send_command(&emu, device_id(0), "n", json!({ "i": i })).await;
    }
    wait_until("all stored", || {
        hub.metrics().down.commands_queued.load(Relaxed) == 8
    })
    .await;
    assert_eq!(hub.metrics().down.commands_dropped.load(Relaxed), 3);
    let mut s0 = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
    s0.subscribe("/devices/100/command").await;
    for i in 3..8 {
        let p = s0.next_publish(Duration::from_secs(10)).await.unwrap();
        assert_eq!(json_of(&p)["parameters"]["i"], i, "the oldest were dropped");
    }
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_mirror_converges_after_an_outage_where_app_and_sensor_both_changed_keys() {
    for transport in TRANSPORTS {
        let (emu, hub, _dir) = start(transport, 1, "").await;
        let h = emu.handle();
        h.set_kv(device_id(0), "a", json!(1)).unwrap();
        h.set_kv(device_id(0), "gone", json!("x")).unwrap();
        let mut s = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
        // Subscribe once the hub's mirror has MODE's store (the reload carries it).
        wait_until("upstream session", || h.is_connected(device_id(0))).await;
        let mut view = SensorKv::default();
        loop {
            s.subscribe("/devices/dev0/kv").await;
            view.drain(&mut s, Duration::from_millis(300)).await;
            if view.items.contains_key("a") {
                break;
            }
            s.client.unsubscribe("/devices/dev0/kv").await.unwrap();
        }
        assert_eq!(
            view.items,
            as_map(&h.kv(device_id(0)).1),
            "{transport}: reload on subscribe"
        );

        // The app changes a key while the hub is connected: the sensor hears it (MQTT pushes;
        // REST refreshes on reconnect, tested below).
        if transport == "mqtt" {
            h.set_kv(device_id(0), "live", json!({"on": true})).unwrap();
            view.drain(&mut s, Duration::from_millis(500)).await;
            assert_eq!(view.items["live"], json!({"on": true}));
        }

        // Outage: the app and the sensor both change keys.
        h.set_offline(true);
        wait_until("hub sees the outage", || !h.is_connected(device_id(0))).await;
        h.set_kv(device_id(0), "b", json!(2)).unwrap();
        h.delete_kv(device_id(0), "gone").unwrap();
        s.publish_all(
            "/devices/dev0/kv",
            vec![
                r#"{"action":"set","key":"c","value":[3]}"#,
                r#"{"action":"set","key":"a","value":9}"#,
            ],
        )
        .await;
        h.set_offline(false);
        let want: BTreeMap<String, Value> = [("a", json!(9)), ("b", json!(2)), ("c", json!([3]))]
            .into_iter()
            .chain((transport == "mqtt").then(|| ("live", json!({"on": true}))))
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        wait_until("cloud converges", || as_map(&h.kv(device_id(0)).1) == want).await;
        let mut mirror = BTreeMap::new();
        for _ in 0..200 {
            let snap = hub.outbox().kv_snapshot(device_id(0)).await.unwrap();
            mirror = snap
                .items
                .into_iter()
                .map(|(k, v)| (k, serde_json::from_str(&v).unwrap()))
                .collect();
            if mirror == want && hub.outbox().depth().await.unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(mirror, want, "{transport}: hub mirror");
        view.drain(&mut s, Duration::from_millis(500)).await;
        assert_eq!(view.items, want, "{transport}: the sensor's view");
        hub.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_offline_sets_of_one_key_reach_mode_as_one_message() {
    for transport in TRANSPORTS {
        let (emu, hub, _dir) = start(transport, 1, "").await;
        let h = emu.handle();
        let mut s = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
        wait_until("upstream session", || h.is_connected(device_id(0))).await;
        h.set_offline(true);
        wait_until("hub sees the outage", || !h.is_connected(device_id(0))).await;
        let sets: Vec<String> = (0..100)
            .map(|i| format!(r#"{{"action":"set","key":"k","value":{i}}}"#))
            .collect();
        s.publish_all("/devices/dev0/kv", sets).await;
        let before = h.stats().kv_writes_applied;
        h.set_offline(false);
        wait_until("replayed", || {
            h.kv(device_id(0))
                .1
                .iter()
                .any(|(k, v)| k == "k" && *v == json!(99))
        })
        .await;
        for _ in 0..100 {
            if hub.outbox().depth().await.unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(hub.outbox().depth().await.unwrap().is_empty());
        let writes = h.stats().kv_writes_applied - before;
        assert_eq!(writes, 1, "{transport}: replay sent {writes} kv messages");
        assert_eq!(hub.outbox().stats().kv_coalesced.load(Relaxed), 99);
        hub.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sensor_subscribing_during_an_outage_gets_a_reload_from_the_mirror() {
    for transport in TRANSPORTS {
        let (emu, hub, _dir) = start(transport, 1, "").await;
        let h = emu.handle();
        h.set_kv(device_id(0), "interval", json!(30)).unwrap();
        wait_until("upstream session", || h.is_connected(device_id(0))).await;
        for _ in 0..200 {
            if hub
                .outbox()
                .kv_snapshot(device_id(0))
                .await
                .unwrap()
                .items
                .len()
                == 1
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        h.set_offline(true);
        wait_until("hub sees the outage", || !h.is_connected(device_id(0))).await;
        // A sensor that rebooted during the outage: its own unsent change shows through too.
        let mut s = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
        s.publish_all(
            "/devices/dev0/kv",
            vec![r#"{"action":"set","key":"mode","value":"eco"}"#],
        )
        .await;
        s.subscribe("/devices/100/kv").await;
        let p = s
            .next_publish(Duration::from_secs(10))
            .await
            .expect("a reload");
        let m = json_of(&p);
        assert_eq!(m["action"], "reload", "{transport}");
        let mut view = SensorKv::default();
        view.apply(&m);
        assert_eq!(
            view.items,
            [
                ("interval".to_string(), json!(30)),
                ("mode".to_string(), json!("eco"))
            ]
            .into_iter()
            .collect::<BTreeMap<_, _>>(),
            "{transport}"
        );
        h.set_offline(false);
        hub.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_ddp_from_the_cloud_is_counted_and_ignored() {
    // The hub must survive whatever comes down; the mirror is untouched by junk.
    let (emu, hub, _dir) = start("mqtt", 1, "").await;
    let h = emu.handle();
    wait_until("upstream session", || h.is_connected(device_id(0))).await;
    h.set_kv(device_id(0), "ok", json!(1)).unwrap();
    for _ in 0..200 {
        if !hub
            .outbox()
            .kv_snapshot(device_id(0))
            .await
            .unwrap()
            .items
            .is_empty()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = hub.metrics();
    assert!(
        m.down.kv_applied.load(Relaxed) >= 1,
        "the reload (and the set, unless the reload had it)"
    );
    let s = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
    s.client
        .publish(
            "/devices/dev0/kv",
            QoS::AtLeastOnce,
            false,
            "{\"action\":\"set\",\"key\":\"-bad\",\"value\":1}",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        hub.outbox().kv_snapshot(device_id(0)).await.unwrap().items,
        vec![("ok".to_string(), "1".to_string())]
    );
    hub.shutdown().await;
}

/// Command latency, cloud publish -> local subscriber. Run with
/// `cargo test --release --test it -- --ignored --nocapture downlink::command_latency`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn command_latency() {
    for transport in TRANSPORTS {
        let (emu, hub, _dir) = start(transport, 1, "").await;
        let mut s = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
        s.subscribe("/devices/dev0/command").await;
        send_command(&emu, device_id(0), "warmup", json!({})).await;
        s.next_publish(Duration::from_secs(10)).await.unwrap();
        let mut lat = Vec::with_capacity(1000);
        for i in 0..1000 {
            let t = std::time::Instant::now();
            emu.handle()
                .send_command(device_id(0), "n", json!({ "i": i }))
                .unwrap();
            let p = s.next_publish(Duration::from_secs(10)).await.unwrap();
            lat.push(t.elapsed());
            assert_eq!(json_of(&p)["parameters"]["i"], i);
        }
        lat.sort();
        println!(
            "{transport}: command latency over 1000: p50 {:?} p99 {:?} max {:?}",
            lat[500], lat[990], lat[999]
        );
        hub.shutdown().await;
    }
}
