//! End-to-end: sensor (rumqttc) -> hub's local broker -> outbox -> MODE emulator over MQTT.

use crate::common::*;
use modehub::metrics::RejectReason;
use modehub::Hub;
use rumqttc::{ConnectReturnCode, ConnectionError, SubscribeReasonCode};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_goes_up_with_topic_credentials_and_body() {
    let emu = emulator(2).await;
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(hub_config(&emu, dir.path(), 2)).await.unwrap();
    // Log in by local name, and the other device by MODE id + API key.
    let mut s0 = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
    let mut s1 = Sensor::connect(hub.local_addr(), &device_id(1).to_string(), &device_key(1)).await;
    s0.publish_all(
        "/devices/dev0/event",
        vec![r#"{"eventType":"temp","eventData":{"c":21.5,"big":12345678901234}}"#],
    )
    .await;
    s1.publish_all(
        &format!("/devices/{}/event", device_id(1)),
        vec![r#"{"eventType":"door"}"#],
    )
    .await;

    let got = wait_events(&emu.handle(), device_id(0), 1).await;
    assert_eq!(got.len(), 1);
    let e = &got[0];
    assert_eq!(e.event_type, "temp");
    assert_eq!(e.transport, "mqtt");
    assert_eq!(e.event_data["c"], 21.5);
    assert_eq!(e.event_data["big"].as_u64(), Some(12345678901234));
    assert_eq!(e.event_data["_seq"], 1);
    let captured = e.event_data["_capturedAt"].as_str().unwrap();
    assert!(
        captured.ends_with('Z') && captured.len() == 24,
        "{captured}"
    );
    assert!(
        e.raw.starts_with(r#"{"eventType":"temp","eventData":{"#),
        "{}",
        e.raw
    );

    let got = wait_events(&emu.handle(), device_id(1), 1).await;
    assert_eq!(got[0].event_type, "door");
    assert_eq!(got[0].event_data["_seq"], 1);
    assert!(emu
        .handle()
        .events(device_id(0))
        .iter()
        .all(|e| e.device_id == device_id(0)));
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_is_kept_for_1000_events_from_one_device() {
    let emu = emulator(1).await;
    let dir = tempfile::tempdir().unwrap();
    // Pacing raised out of the way (the default, 540 a minute, would take two minutes).
    let hub = Hub::start(unpaced_hub_config(&emu, dir.path(), 1))
        .await
        .unwrap();
    let mut s = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
    s.publish_all("/devices/dev0/event", (0..1000).map(event_json).collect())
        .await;
    let got = wait_events(&emu.handle(), device_id(0), 1000).await;
    assert_eq!(ns(&got), (0..1000).collect::<Vec<u64>>());
    let seqs: Vec<u64> = got
        .iter()
        .map(|e| e.event_data["_seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=1000).collect::<Vec<u64>>());
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_device_does_not_block_another() {
    let emu = emulator(2).await;
    let dir = tempfile::tempdir().unwrap();
    // dev0 has a wrong API key: MODE refuses its session; dev1 must be unaffected.
    let text = hub_config_text(&emu, dir.path(), 2, "").replacen(&device_key(0), "v1.wrong", 1);
    let cfg = modehub::config::Config::parse(&text, dir.path()).unwrap();
    let hub = Hub::start(cfg).await.unwrap();
    let mut s0 = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
    let mut s1 = Sensor::connect(hub.local_addr(), "dev1", "pw1").await;
    s0.publish_all("/devices/dev0/event", (0..50).map(event_json).collect())
        .await;
    s1.publish_all("/devices/dev1/event", (0..50).map(event_json).collect())
        .await;
    let got = wait_events(&emu.handle(), device_id(1), 50).await;
    assert_eq!(ns(&got), (0..50).collect::<Vec<u64>>());
    assert!(emu.handle().events(device_id(0)).is_empty());
    // dev0's events are kept, not lost.
    let depth = hub.outbox().depth().await.unwrap();
    assert_eq!(depth[&device_id(0)].rows, 50);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let states = hub.session_states();
        if matches!(states[0], modehub::uplink::SessionState::Refused(_)) {
            assert_eq!(states[1], modehub::uplink::SessionState::Up);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "dev0 never parked: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_local_password_and_unknown_user_are_refused() {
    let emu = emulator(1).await;
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(hub_config(&emu, dir.path(), 1)).await.unwrap();
    for (user, pass) in [
        ("dev0", "nope"),
        ("ghost", "pw0"),
        (&*device_id(0).to_string(), "pw0"),
    ] {
        let err = connect_raw(hub.local_addr(), user, pass)
            .await
            .err()
            .expect("refused");
        assert!(
            matches!(
                err,
                ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword)
            ),
            "{user}: {err:?}"
        );
    }
    assert_eq!(hub.metrics().rejected(RejectReason::AuthFailed), 3);
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_publish_or_subscribe_as_another() {
    let emu = emulator(2).await;
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(hub_config(&emu, dir.path(), 2)).await.unwrap();
    let mut s0 = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
    let ack = s0.subscribe("/devices/dev1/command").await;
    assert_eq!(ack.return_codes, vec![SubscribeReasonCode::Failure]);
    let ack = s0.subscribe(&format!("/devices/{}/#", device_id(1))).await;
    assert_eq!(ack.return_codes, vec![SubscribeReasonCode::Failure]);
    let ack = s0.subscribe("#").await;
    assert_eq!(ack.return_codes, vec![SubscribeReasonCode::Failure]);
    let ack = s0.subscribe("/devices/dev0/command").await;
    assert!(matches!(
        ack.return_codes[0],
        SubscribeReasonCode::Success(_)
    ));

    // Acknowledged and dropped (what Mosquitto does): the device stays connected, so a
    // client that resends unacknowledged publishes cannot lock itself out.
    s0.publish_all("/devices/dev1/event", vec![event_json(1)])
        .await;
    s0.publish_all("/devices/dev0/event", vec![event_json(2)])
        .await;
    wait_events(&emu.handle(), device_id(0), 1).await;
    assert!(s0.closed.borrow().is_none(), "device stays connected");
    assert_eq!(
        hub.metrics()
            .front
            .denied_publishes
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(emu.handle().events(device_id(1)).is_empty());
    assert!(hub.metrics().rejected(RejectReason::NotOwnTopic) >= 4);
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payloads_are_counted_and_dropped_while_good_ones_pass() {
    let emu = emulator(2).await;
    let dir = tempfile::tempdir().unwrap();
    let text = hub_config_text(&emu, dir.path(), 2, "")
        .replace("[local.mqtt]", "max_payload_bytes = 1024\n[local.mqtt]");
    let hub = Hub::start(modehub::config::Config::parse(&text, dir.path()).unwrap())
        .await
        .unwrap();
    let mut s0 = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
    let mut s1 = Sensor::connect(hub.local_addr(), "dev1", "pw1").await;
    let big = format!(
        r#"{{"eventType":"x","eventData":{{"pad":"{}"}}}}"#,
        "a".repeat(2000)
    );
    let bad: Vec<Vec<u8>> = vec![
        event_json(0).into(),
        b"not json".to_vec(),
        br#"{"eventType":"x","eventData":[1,2]}"#.to_vec(),
        br#"{"eventData":{}}"#.to_vec(),
        b"[1,2,3]".to_vec(),
        br#"{"eventType":"x","eventData":{"#.to_vec(),
        vec![0x7b, 0xff, 0xfe],
        big.into(),
        event_json(1).into(),
    ];
    s0.publish_all("/devices/dev0/event", bad).await;
    s1.publish_all("/devices/dev1/event", (0..10).map(event_json).collect())
        .await;
    let got = wait_events(&emu.handle(), device_id(0), 2).await;
    assert_eq!(ns(&got), vec![0, 1]);
    assert_eq!(
        ns(&wait_events(&emu.handle(), device_id(1), 10).await),
        (0..10).collect::<Vec<u64>>()
    );
    let m = hub.metrics();
    assert_eq!(
        m.rejected(RejectReason::NotJson),
        2,
        "truncated JSON + invalid UTF-8"
    );
    assert_eq!(m.rejected(RejectReason::EventDataNotObject), 1);
    assert_eq!(m.rejected(RejectReason::MissingEventType), 1);
    assert_eq!(
        m.rejected(RejectReason::NotAnObject),
        2,
        "plain text + array"
    );
    assert_eq!(m.rejected(RejectReason::TooLarge), 1);
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_published_while_cloud_is_down_arrive_in_order_after() {
    let emu = emulator(2).await;
    let dir = tempfile::tempdir().unwrap();
    // Pacing raised out of the way (replay pacing is tested in tests/it/store_forward.rs).
    let hub = Hub::start(unpaced_hub_config(&emu, dir.path(), 2))
        .await
        .unwrap();
    let mut s0 = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
    s0.publish_all("/devices/dev0/event", vec![event_json(0)])
        .await;
    wait_events(&emu.handle(), device_id(0), 1).await;
    emu.handle().set_offline(true);
    // Still acknowledged locally: the outbox has them.
    s0.publish_all("/devices/dev0/event", (1..200).map(event_json).collect())
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(emu.handle().events(device_id(0)).len(), 1);
    emu.handle().set_offline(false);
    let got = wait_events(&emu.handle(), device_id(0), 200).await;
    // At-least-once: a resend after the cut is allowed, reordering is not.
    let (firsts, _dups) = first_arrivals(&ns(&got));
    assert_eq!(firsts, (0..200).collect::<Vec<u64>>());
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_hub_delivers_what_it_had_not_sent() {
    let emu = emulator(1).await;
    let dir = tempfile::tempdir().unwrap();
    emu.handle().set_offline(true);
    let hub = Hub::start(hub_config(&emu, dir.path(), 1)).await.unwrap();
    let mut s0 = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
    s0.publish_all("/devices/dev0/event", (0..100).map(event_json).collect())
        .await;
    drop(s0);
    hub.shutdown().await;

    emu.handle().set_offline(false);
    let hub = Hub::start(hub_config(&emu, dir.path(), 1)).await.unwrap();
    let got = wait_events(&emu.handle(), device_id(0), 100).await;
    assert_eq!(ns(&got), (0..100).collect::<Vec<u64>>());
    // The sequence continues across restarts.
    let mut s0 = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
    s0.publish_all("/devices/dev0/event", vec![event_json(100)])
        .await;
    let got = wait_events(&emu.handle(), device_id(0), 101).await;
    assert_eq!(got[100].event_data["_seq"], 101);
    hub.shutdown().await;
}

/// Events/s through the whole path (local publish -> outbox -> emulator), 1 and 20 devices,
/// pacing raised out of the way. Run with
/// `cargo test --release --test it -- --ignored --nocapture hub::throughput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn throughput_end_to_end() {
    for (devices, per_device) in [(1usize, 20_000usize), (20, 2_000)] {
        let emu = emulator(devices).await;
        let dir = tempfile::tempdir().unwrap();
        let text = hub_config_text(
            &emu,
            dir.path(),
            devices,
            "max_messages_per_minute = 100000000\nmax_project_messages_per_minute = 100000000",
        );
        let hub = Hub::start(modehub::config::Config::parse(&text, dir.path()).unwrap())
            .await
            .unwrap();
        let mut sensors = Vec::new();
        for i in 0..devices {
            sensors.push(
                Sensor::connect(hub.local_addr(), &format!("dev{i}"), &format!("pw{i}")).await,
            );
        }
        let h = emu.handle();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !(0..devices).all(|i| h.is_connected(device_id(i))) {
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let t0 = std::time::Instant::now();
        let mut tasks = Vec::new();
        for (i, mut s) in sensors.into_iter().enumerate() {
            tasks.push(tokio::spawn(async move {
                // Batches of 100 keep the sensor's in-flight window full.
                for b in 0..per_device / 100 {
                    s.publish_all(
                        &format!("/devices/dev{i}/event"),
                        (b * 100..b * 100 + 100).map(event_json).collect(),
                    )
                    .await;
                }
                std::time::Instant::now()
            }));
        }
        let mut acked_at = t0;
        for t in tasks {
            acked_at = acked_at.max(t.await.unwrap());
        }
        for i in 0..devices {
            h.wait_for_events(device_id(i), per_device, Duration::from_secs(120))
                .await;
        }
        let total = devices * per_device;
        let e2e = t0.elapsed().as_secs_f64();
        let ingest = (acked_at - t0).as_secs_f64();
        println!(
            "{devices} device(s), {total} events: local ingest {:.0}/s (all PUBACKed in {ingest:.2}s), end to end {:.0}/s ({e2e:.2}s)",
            total as f64 / ingest,
            total as f64 / e2e
        );
        hub.shutdown().await;
    }
}
