//! Store-and-forward under faults, against the MODE emulator: deactivated homes (with and
//! without a project key), offline + replay, refused connections, dropped sessions, delays,
//! REST 5xx / 429, the per-device rate limit, a full outbox, the free-disk watermark, and the
//! capture clock.

use crate::common::*;
use modehub::config::Config;
use modehub::emulator::Faults;
use modehub::homes::HomeState;
use modehub::outbox::{Capture, Kind, NewRecord};
use modehub::uplink::Hold;
use modehub::{Hub, StartOptions};
use rumqttc::{Packet, QoS};
use std::path::Path;
use std::sync::atomic::Ordering::{self, Relaxed};
use std::time::Duration;

/// Pacing out of the way, for tests that are about something else.
const FAST: &str = "max_messages_per_minute = 100000\nmax_project_messages_per_minute = 1000000\n";

fn config(
    emu: &modehub::emulator::Emulator,
    dir: &Path,
    n: usize,
    cloud: &str,
    hub: &str,
) -> Config {
    let text =
        hub_config_text(emu, dir, n, cloud).replacen("[hub]\n", &format!("[hub]\n{hub}\n"), 1);
    Config::parse(&text, dir).unwrap_or_else(|e| panic!("config: {e:?}\n{text}"))
}

/// Writes the emulator's project key to a 0600 file and returns the cloud config lines for it.
fn project_key(dir: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("project.key");
    std::fs::write(&path, "v1.project\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    format!(
        "project_key_file = \"{}\"\nhome_poll_interval_secs = 5\n",
        path.display()
    )
}

async fn until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn home_state(hub: &Hub, home: u64) -> HomeState {
    hub.home_states()
        .into_iter()
        .find(|h| h.home_id == home)
        .map(|h| h.state)
        .unwrap()
}

async fn wait_distinct(emu: &modehub::emulator::EmulatorHandle, dev: u64, n: usize) -> Vec<u64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got = ns(&emu.events(dev));
        if first_arrivals(&got).0.len() >= n {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "device {dev}: {} of {n} distinct events arrived",
            first_arrivals(&got).0.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deactivated_home_is_held_and_released_in_order_while_the_other_home_flows() {
    let emu = emulator(2).await;
    let h = emu.handle();
    let dir = tempfile::tempdir().unwrap();
    let cloud = project_key(dir.path());
    let hub = Hub::start(config(&emu, dir.path(), 2, &cloud, ""))
        .await
        .unwrap();
    until("both homes active", Duration::from_secs(10), || {
        home_state(&hub, 42) == HomeState::Active && home_state(&hub, 43) == HomeState::Active
    })
    .await;

    h.set_home_deactivated(42, true);
    until(
        "the watcher to see home 42 deactivated",
        Duration::from_secs(15),
        || home_state(&hub, 42) == HomeState::Deactivated,
    )
    .await;
    let mut s0 = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
    let mut s1 = Sensor::connect(hub.local_addr(), "dev1", "pw1").await;
    s0.publish_all("/devices/dev0/event", (0..20).map(event_json).collect())
        .await;
    s0.publish_all(
        "/devices/dev0/kv",
        vec![r#"{"action":"set","key":"mode","value":"away"}"#],
    )
    .await;
    s1.publish_all("/devices/dev1/event", (0..20).map(event_json).collect())
        .await;
    // The other home flows...
    let other = wait_events(&h, device_id(1), 20).await;
    assert_eq!(ns(&other), (0..20).collect::<Vec<_>>());
    // ...while nothing of dev0 left the hub (MODE would have dropped it silently).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(h.events(device_id(0)).is_empty());
    assert_eq!(h.stats().events_dropped_deactivated, 0);
    assert_eq!(h.stats().kv_writes_refused_deactivated, 0);
    // Status: held, with the backlog and no drain estimate; the session stays up for commands.
    let backlog = hub.backlog().await;
    assert_eq!(backlog[0].rows, 21);
    assert_eq!(backlog[0].hold, Some(Hold::HomeDeactivated));
    assert_eq!(backlog[0].eta, None);
    assert_eq!(backlog[1].rows, 0);
    let report = hub.home_status().await;
    let home42 = report.iter().find(|r| r.status.home_id == 42).unwrap();
    assert!(home42.status.held());
    assert_eq!(home42.pending_rows, 21);
    assert!(h.is_connected(device_id(0)));

    h.set_home_deactivated(42, false);
    let got = wait_events(&h, device_id(0), 20).await;
    assert_eq!(
        ns(&got),
        (0..20).collect::<Vec<_>>(),
        "held events in their original order"
    );
    let seqs: Vec<u64> = got
        .iter()
        .map(|e| e.event_data["_seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    until("the held kv change", Duration::from_secs(10), || {
        h.kv(device_id(0))
            .1
            .iter()
            .any(|(k, v)| k == "mode" && v == "away")
    })
    .await;
    assert_eq!(home_state(&hub, 42), HomeState::Active);
    hub.shutdown().await;
}

/// MODE acknowledges and drops a deactivated home's MQTT events. What the hub sent between the
/// deactivation and the moment its watcher saw it is put back and sent again once the home is
/// active: nothing is lost, and a repeat carries its original `_seq` (detectable).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_mode_dropped_before_the_hub_saw_the_deactivation_are_sent_again() {
    let emu = emulator(1).await;
    let h = emu.handle();
    let dir = tempfile::tempdir().unwrap();
    let cloud = format!("{}{FAST}", project_key(dir.path()));
    let hub = Hub::start(config(&emu, dir.path(), 1, &cloud, ""))
        .await
        .unwrap();
    until("home active", Duration::from_secs(10), || {
        home_state(&hub, 42) == HomeState::Active
    })
    .await;
    let mut s0 = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
    s0.publish_all("/devices/dev0/event", (0..10).map(event_json).collect())
        .await;
    wait_events(&h, device_id(0), 10).await;

    // Deactivated behind the hub's back: the next events are acknowledged and dropped.
    h.set_home_deactivated(42, true);
    s0.publish_all("/devices/dev0/event", (10..20).map(event_json).collect())
        .await;
    until("MODE to drop them", Duration::from_secs(10), || {
        h.dropped_events(device_id(0)).len() == 10
    })
    .await;
    assert_eq!(home_state(&hub, 42), HomeState::Active, "not seen yet");
    hub.homes().poke(); // (the periodic read would find it within home_poll_interval_secs)
    until("the watcher to see it", Duration::from_secs(15), || {
        home_state(&hub, 42) == HomeState::Deactivated
    })
    .await;
    until(
        "the dropped rows back in the outbox",
        Duration::from_secs(10),
        || hub.metrics().requeued_deactivated.load(Ordering::Relaxed) >= 10,
    )
    .await;
    s0.publish_all("/devices/dev0/event", (20..25).map(event_json).collect())
        .await;

    h.set_home_deactivated(42, false);
    hub.homes().poke();
    let got = wait_events(&h, device_id(0), 25).await;
    let (firsts, dups) = first_arrivals(&ns(&got));
    assert_eq!(firsts, (0..25).collect::<Vec<_>>(), "all, in order");
    // Repeats are only of what MODE may have dropped (sent since the last "active" read), and
    // each repeat carries its original sequence number.
    assert!(dups <= 10, "{dups} repeats");
    let mut seq_of = std::collections::HashMap::new();
    for e in &got {
        let n = e.event_data["n"].as_u64().unwrap();
        let seq = e.event_data["_seq"].as_u64().unwrap();
        assert_eq!(
            *seq_of.entry(n).or_insert(seq),
            seq,
            "a repeat keeps its _seq"
        );
    }
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_project_key_a_refusal_holds_the_device_and_it_retries() {
    let emu = emulator(2).await;
    let h = emu.handle();
    let dir = tempfile::tempdir().unwrap();
    // REST: MODE answers a kv write of a deactivated home with 403 HOME_DEACTIVATED.
    let cloud = "transport = \"rest\"\nhome_poll_interval_secs = 5\n";
    let hub = Hub::start(config(&emu, dir.path(), 2, cloud, ""))
        .await
        .unwrap();
    assert!(!hub.homes().watched());
    assert!(hub
        .home_states()
        .iter()
        .all(|s| s.state == HomeState::Unknown));
    until("dev0 connected", Duration::from_secs(10), || {
        h.is_connected(device_id(0))
    })
    .await;
    h.set_home_deactivated(42, true);
    let mut s0 = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
    s0.publish_all(
        "/devices/dev0/kv",
        vec![r#"{"action":"set","key":"mode","value":"away"}"#],
    )
    .await;
    s0.publish_all("/devices/dev0/event", (0..5).map(event_json).collect())
        .await;
    let mut held = None;
    until(
        "dev0 held after the refusal",
        Duration::from_secs(10),
        || {
            held = hub.uplink_status()[0].hold();
            held.is_some()
        },
    )
    .await;
    assert!(matches!(held, Some(Hold::Refused { .. })), "{held:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        h.events(device_id(0)).is_empty(),
        "events behind the refused kv wait"
    );
    assert!(h.kv(device_id(0)).1.is_empty());
    assert!(
        h.is_connected(device_id(0)),
        "the command WebSocket stays up"
    );

    h.set_home_deactivated(42, false);
    // The periodic retry (home_poll_interval_secs) sends the kv change, then the events.
    let got = wait_events(&h, device_id(0), 5).await;
    assert_eq!(ns(&got), (0..5).collect::<Vec<_>>());
    assert!(h
        .kv(device_id(0))
        .1
        .iter()
        .any(|(k, v)| k == "mode" && v == "away"));
    assert_eq!(
        hub.outbox().dead_letters(10).await.unwrap().len(),
        0,
        "nothing dead-lettered"
    );
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_then_replay_keeps_every_event_in_order_per_device() {
    let emu = emulator(4).await;
    let h = emu.handle();
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(config(&emu, dir.path(), 4, FAST, ""))
        .await
        .unwrap();
    h.set_offline(true);
    let mut sensors = Vec::new();
    for i in 0..4 {
        sensors
            .push(Sensor::connect(hub.local_addr(), &format!("dev{i}"), &format!("pw{i}")).await);
    }
    for (i, s) in sensors.iter_mut().enumerate() {
        s.publish_all(
            &format!("/devices/dev{i}/event"),
            (0..150).map(event_json).collect(),
        )
        .await;
    }
    let backlog = hub.backlog().await;
    assert!(backlog.iter().all(|b| b.rows == 150), "{backlog:?}");
    assert!(h.all_events().is_empty());
    h.set_offline(false);
    for i in 0..4 {
        let got = wait_events(&h, device_id(i), 150).await;
        assert_eq!(ns(&got), (0..150).collect::<Vec<_>>(), "device {i}");
    }
    until("outbox drained", Duration::from_secs(10), || {
        hub.outbox().stats().pending_rows.load(Relaxed) == 0
    })
    .await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_dropped_sessions_and_delays_lose_nothing() {
    let emu = emulator(2).await;
    let h = emu.handle();
    let dir = tempfile::tempdir().unwrap();
    h.set_faults(Faults {
        refuse_connections: true,
        ..Faults::default()
    });
    let hub = Hub::start(config(&emu, dir.path(), 2, FAST, ""))
        .await
        .unwrap();
    let mut s0 = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
    let mut s1 = Sensor::connect(hub.local_addr(), "dev1", "pw1").await;
    s0.publish_all("/devices/dev0/event", (0..40).map(event_json).collect())
        .await;
    until(
        "refused connection attempts",
        Duration::from_secs(10),
        || h.stats().mqtt_connections_refused_fault >= 2,
    )
    .await;
    // Sessions cut after every 15th publish, whose PUBACK is lost; answers delayed.
    h.set_faults(Faults {
        drop_after_publishes: Some(15),
        delay: Some(Duration::from_millis(30)),
        ..Faults::default()
    });
    s1.publish_all("/devices/dev1/event", (0..40).map(event_json).collect())
        .await;
    s0.publish_all("/devices/dev0/event", (40..60).map(event_json).collect())
        .await;
    let d0 = wait_distinct(&h, device_id(0), 60).await;
    let d1 = wait_distinct(&h, device_id(1), 40).await;
    for (got, n, dev) in [(d0, 60u64, 0), (d1, 40, 1)] {
        let (firsts, dups) = first_arrivals(&got);
        assert_eq!(
            firsts,
            (0..n).collect::<Vec<_>>(),
            "device {dev}: every event, in order"
        );
        // Each cut session re-sends at most its window (32) from the oldest unacknowledged row.
        let cuts = (got.len() as f64 / 15.0).ceil() as usize;
        assert!(
            dups <= cuts * 32,
            "device {dev}: {dups} duplicates for {cuts} cuts"
        );
        eprintln!("device {dev}: {} arrivals, {dups} duplicates", got.len());
    }
    assert!(h.stats().mqtt_sessions_dropped_fault >= 2);
    h.set_faults(Faults::default());
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_transport_rides_out_5xx_429_and_delays() {
    let emu = emulator(2).await;
    let h = emu.handle();
    let dir = tempfile::tempdir().unwrap();
    let cloud = format!("transport = \"rest\"\n{FAST}");
    let hub = Hub::start(config(&emu, dir.path(), 2, &cloud, ""))
        .await
        .unwrap();
    until("dev0 connected", Duration::from_secs(10), || {
        h.is_connected(device_id(0))
    })
    .await;
    let mut s0 = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
    let mut s1 = Sensor::connect(hub.local_addr(), "dev1", "pw1").await;
    s0.publish_all("/devices/dev0/event", (0..10).map(event_json).collect())
        .await;
    wait_events(&h, device_id(0), 10).await;

    h.set_faults(Faults {
        http_5xx: true,
        ..Faults::default()
    });
    s0.publish_all("/devices/dev0/event", (10..20).map(event_json).collect())
        .await;
    until("5xx answers", Duration::from_secs(10), || {
        h.stats().rest_faults_injected >= 2
    })
    .await;
    h.set_faults(Faults {
        http_429_retry_after: Some(1),
        ..Faults::default()
    });
    s1.publish_all("/devices/dev1/event", (0..10).map(event_json).collect())
        .await;
    until("a 429 seen by the hub", Duration::from_secs(20), || {
        hub.pacing_stats().throttled_429.load(Relaxed) >= 1
    })
    .await;
    h.set_faults(Faults {
        delay: Some(Duration::from_millis(50)),
        ..Faults::default()
    });
    s0.publish_all("/devices/dev0/event", (20..30).map(event_json).collect())
        .await;
    let d0 = wait_distinct(&h, device_id(0), 30).await;
    let d1 = wait_distinct(&h, device_id(1), 10).await;
    // REST sends one request at a time and retries the same one: no duplicates, exact order.
    assert_eq!(d0, (0..30).collect::<Vec<_>>());
    assert_eq!(d1, (0..10).collect::<Vec<_>>());
    assert!(h.events(device_id(0)).iter().all(|e| e.transport == "rest"));
    h.set_faults(Faults::default());
    hub.shutdown().await;
}

/// The default pacing keeps 10 % under MODE's limit. Scaled down so it runs in seconds: the
/// emulator allows 120 a minute, the hub paces at 108 (the default 540/600 ratio).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pacing_keeps_a_backlog_under_the_rate_limit_without_a_dropped_session() {
    let emu = emulator(2).await;
    let h = emu.handle();
    h.set_rate_limit(Some(120));
    let dir = tempfile::tempdir().unwrap();
    let cloud = "max_messages_per_minute = 108\n";
    let hub = Hub::start(config(&emu, dir.path(), 2, cloud, ""))
        .await
        .unwrap();
    h.set_offline(true);
    let mut s0 = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
    let mut s1 = Sensor::connect(hub.local_addr(), "dev1", "pw1").await;
    s0.publish_all("/devices/dev0/event", (0..30).map(event_json).collect())
        .await;
    s1.publish_all("/devices/dev1/event", (0..30).map(event_json).collect())
        .await;
    h.set_offline(false);
    let d0 = wait_events(&h, device_id(0), 30).await;
    let d1 = wait_events(&h, device_id(1), 30).await;
    assert_eq!(ns(&d0), (0..30).collect::<Vec<_>>());
    assert_eq!(ns(&d1), (0..30).collect::<Vec<_>>());
    assert_eq!(h.stats().mqtt_sessions_dropped_rate_limit, 0);
    assert_eq!(hub.pacing_stats().burst_drops.load(Relaxed), 0);
    hub.shutdown().await;
}

/// The same with the real defaults (540 a minute against MODE's 600) for 700 messages per
/// device: about 80 s, so not in CI. `cargo test --test it -- --ignored store_forward::`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn default_pacing_against_modes_600_a_minute() {
    let emu = emulator(2).await;
    let h = emu.handle();
    h.set_rate_limit(Some(600));
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(config(&emu, dir.path(), 2, "", ""))
        .await
        .unwrap();
    h.set_offline(true);
    let mut s0 = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
    let mut s1 = Sensor::connect(hub.local_addr(), "dev1", "pw1").await;
    s0.publish_all("/devices/dev0/event", (0..700).map(event_json).collect())
        .await;
    s1.publish_all("/devices/dev1/event", (0..700).map(event_json).collect())
        .await;
    let t = std::time::Instant::now();
    h.set_offline(false);
    let d0 = h
        .wait_for_events(device_id(0), 700, Duration::from_secs(150))
        .await;
    let d1 = h
        .wait_for_events(device_id(1), 700, Duration::from_secs(150))
        .await;
    eprintln!("1400 events drained in {:?}", t.elapsed());
    assert_eq!(ns(&d0), (0..700).collect::<Vec<_>>());
    assert_eq!(ns(&d1), (0..700).collect::<Vec<_>>());
    assert_eq!(h.stats().mqtt_sessions_dropped_rate_limit, 0);
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_drops_the_oldest_events_and_keeps_kv() {
    let emu = emulator(1).await;
    let h = emu.handle();
    let dir = tempfile::tempdir().unwrap();
    h.set_offline(true);
    let hub = Hub::start(config(&emu, dir.path(), 1, FAST, "max_outbox_rows = 100"))
        .await
        .unwrap();
    let mut s0 = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
    s0.publish_all(
        "/devices/dev0/kv",
        vec![r#"{"action":"set","key":"keep","value":1}"#],
    )
    .await;
    s0.publish_all("/devices/dev0/event", (0..300).map(event_json).collect())
        .await;
    let dropped = hub.outbox().stats().dropped_full.load(Relaxed);
    assert!(dropped >= 200, "dropped {dropped}");
    h.set_offline(false);
    until("the kv change", Duration::from_secs(20), || {
        h.kv(device_id(0)).1.iter().any(|(k, _)| k == "keep")
    })
    .await;
    until("outbox drained", Duration::from_secs(30), || {
        hub.outbox().stats().pending_rows.load(Relaxed) == 0
    })
    .await;
    let got = ns(&h.events(device_id(0)));
    // What arrived is the newest events, in order, ending with the last one.
    assert!(!got.is_empty() && got.len() <= 100, "{}", got.len());
    assert_eq!(*got.last().unwrap(), 299);
    assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "{got:?}");
    assert_eq!(got.len() as u64 + dropped, 300);
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_disk_watermark_a_sensor_gets_no_puback() {
    let emu = emulator(1).await;
    let dir = tempfile::tempdir().unwrap();
    // No file system has this much free: every commit is refused by the watermark.
    let hub = Hub::start(config(
        &emu,
        dir.path(),
        1,
        "",
        "min_free_disk = 9000000000000000000",
    ))
    .await
    .unwrap();
    let mut s0 = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
    s0.client
        .publish(
            "/devices/dev0/event",
            QoS::AtLeastOnce,
            false,
            event_json(1),
        )
        .await
        .unwrap();
    let mut acked = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(Some(p)) = tokio::time::timeout_at(deadline, s0.incoming.recv()).await {
        acked |= matches!(p, Packet::PubAck(_));
    }
    assert!(!acked, "a refused message must not be acknowledged");
    assert!(hub.outbox().stats().refused_disk_full.load(Relaxed) >= 1);
    assert_eq!(hub.outbox().stats().disk_full.load(Relaxed), 1);
    assert!(emu.handle().all_events().is_empty());
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_times_are_repaired_when_the_clock_syncs_and_older_boots_are_flagged() {
    use modehub::clock::{ClockWatch, ManualTime};
    let emu = emulator(1).await;
    let h = emu.handle();
    let dir = tempfile::tempdir().unwrap();
    h.set_offline(true);
    // Boot 7, 20 s after boot, clock still at the fake-hwclock guess and not synchronised.
    let guess = 1_700_000_000_000;
    let t = ManualTime::new(guess, 20_000, false, 7);
    let watch = ClockWatch::with_source(t.clone());
    let opts = StartOptions {
        clock: Some(watch.clock()),
    };
    let hub = Hub::start_with(config(&emu, dir.path(), 1, "", ""), opts)
        .await
        .unwrap();
    // A row from an earlier boot that never got a synchronised clock.
    hub.outbox()
        .append(NewRecord {
            device: device_id(0),
            kind: Kind::Event,
            key: "reading".into(),
            body: r#"{"n":0}"#.into(),
            captured: Capture {
                wall_ms: guess - 3_600_000,
                synced: false,
                boot_id: 6,
                mono_ms: 1_000,
            },
        })
        .await
        .unwrap();
    let mut s0 = Sensor::connect(hub.local_addr(), "dev0", "pw0").await;
    s0.publish_all("/devices/dev0/event", vec![event_json(1)])
        .await;
    t.advance(5_000);
    s0.publish_all("/devices/dev0/event", vec![event_json(2)])
        .await;
    // NTP: the real time is 10 days later than the guess.
    let real = guess + 10 * 86_400_000;
    t.step_wall(real - t.wall.load(Relaxed));
    t.synced.store(true, Relaxed);
    let c = watch.check(hub.outbox()).await;
    assert!(c.became_synced);
    assert_eq!(c.repaired, 2);
    s0.publish_all("/devices/dev0/event", vec![event_json(3)])
        .await;
    h.set_offline(false);
    let got = wait_events(&h, device_id(0), 4).await;
    assert_eq!(ns(&got), vec![0, 1, 2, 3]);
    let at = |i: usize| {
        got[i].event_data["_capturedAt"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let approx = |i: usize| got[i].event_data.get("_capturedAtApprox").cloned();
    assert_eq!(at(0), modehub::mode::rfc3339_ms(guess - 3_600_000));
    assert_eq!(
        approx(0),
        Some(serde_json::json!(true)),
        "older boot: best guess, flagged"
    );
    assert_eq!(
        at(1),
        modehub::mode::rfc3339_ms(real - 5_000),
        "repaired from boot time"
    );
    assert_eq!(at(2), modehub::mode::rfc3339_ms(real));
    assert_eq!(at(3), modehub::mode::rfc3339_ms(real));
    for i in 1..4 {
        assert_eq!(approx(i), None);
    }
    hub.shutdown().await;
}
