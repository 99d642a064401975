//! Reloading the device table and serial ports in a running hub (what SIGHUP does; the
//! signal itself is tested on the real binary in tests/it/ops.rs): unchanged devices keep their
//! upstream sessions and local connections, removed devices are shut out, changed devices
//! start again under their new settings, new devices work at once, and only serial ports whose
//! settings or devices changed are reopened.

use crate::common::pty::Pty;
use crate::common::*;
use modehub::config::Config;
use modehub::Hub;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

fn config(emu: &modehub::emulator::Emulator, dir: &Path, tables: &[String]) -> Config {
    let text = format!(
        "{}{}",
        hub_config_text(emu, dir, 0, NO_PACING),
        tables.concat()
    );
    Config::parse(&text, dir).unwrap()
}

async fn wait_closed(s: &mut Sensor, who: &str) -> String {
    let r = tokio::time::timeout(Duration::from_secs(10), s.closed.wait_for(|c| c.is_some()))
        .await
        .unwrap_or_else(|_| panic!("{who}'s local connection was not closed"));
    r.unwrap().clone().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_unchanged_devices_and_applies_the_new_table() {
    let emu = emulator(4).await;
    let h = emu.handle();
    let dir = tempfile::tempdir().unwrap();
    let before = config(
        &emu,
        dir.path(),
        &[
            device_table(0, "pw0"),
            device_table(1, "pw1"),
            device_table(2, "pw2"),
        ],
    );
    let mut hub = Hub::start(before).await.unwrap();
    let addr = hub.local_addr();
    let mut s0 = Sensor::connect(addr, "dev0", "pw0").await;
    let mut s1 = Sensor::connect(addr, "dev1", "pw1").await;
    let mut s2 = Sensor::connect(addr, "dev2", "pw2").await;
    for i in 0..3 {
        wait_until("upstream sessions up", || h.is_connected(device_id(i))).await;
    }
    let connects0 = h.connect_count(device_id(0));

    // dev0 unchanged, dev1 removed, dev2's local password changed, dev3 new.
    let after = config(
        &emu,
        dir.path(),
        &[
            device_table(0, "pw0"),
            device_table(2, "new-pw2"),
            device_table(3, "pw3"),
        ],
    );
    let report = hub.reload(&after).await;
    assert_eq!(report.added, vec!["dev3".to_string()]);
    assert_eq!(report.removed, vec!["dev1".to_string()]);
    assert_eq!(report.changed, vec!["dev2".to_string()]);
    assert!(report.ports.is_empty(), "{report:?}");

    // Removed and changed devices' local connections are closed; they log in anew or not at all.
    wait_closed(&mut s1, "dev1").await;
    wait_closed(&mut s2, "dev2").await;
    assert!(connect_raw(addr, "dev1", "pw1").await.is_err());
    assert!(connect_raw(addr, "dev2", "pw2").await.is_err());
    let mut s2 = Sensor::connect(addr, "dev2", "new-pw2").await;
    s2.publish_all("/devices/dev2/event", vec![event_json(20)])
        .await;
    assert_eq!(ns(&wait_events(&h, device_id(2), 1).await), vec![20]);
    // The removed device's upstream session ends.
    wait_until("dev1's upstream session closed", || {
        !h.is_connected(device_id(1))
    })
    .await;

    // A new device works at once, both ways.
    let mut s3 = Sensor::connect(addr, "dev3", "pw3").await;
    s3.subscribe("/devices/dev3/command").await;
    s3.publish_all("/devices/dev3/event", vec![event_json(30)])
        .await;
    assert_eq!(ns(&wait_events(&h, device_id(3), 1).await), vec![30]);
    send_command(&emu, device_id(3), "blink", serde_json::json!({"times": 2})).await;
    let p = s3
        .next_publish(Duration::from_secs(10))
        .await
        .expect("dev3 gets its command");
    assert_eq!(p.topic, "/devices/dev3/command");

    // The unchanged device never noticed: same local connection, same upstream session.
    s0.publish_all("/devices/dev0/event", vec![event_json(1)])
        .await;
    assert_eq!(ns(&wait_events(&h, device_id(0), 1).await), vec![1]);
    assert!(
        s0.closed.borrow().is_none(),
        "dev0's local connection survived"
    );
    assert_eq!(
        h.connect_count(device_id(0)),
        connects0,
        "dev0's upstream session was not reconnected"
    );

    // The hub's view matches the new table.
    let names: Vec<String> = hub.registry().iter().map(|d| d.name.clone()).collect();
    assert_eq!(names, ["dev0", "dev2", "dev3"]);
    assert_eq!(hub.session_states().len(), 3);
    assert_eq!(hub.uplink_status().len(), 3);
    // Reloading the same table again changes nothing.
    assert!(hub.reload(&after).await.is_empty());
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_reopens_only_the_serial_ports_that_changed() {
    let emu = emulator(3).await;
    let h = emu.handle();
    let dir = tempfile::tempdir().unwrap();
    let a = Pty::open();
    let b = Pty::open();
    let port = |pty: &Pty, dev: &str, extra: &str| {
        format!(
            "[[serial]]\nport = \"{}\"\ndevices = [\"{dev}\"]\n{extra}",
            pty.path.display()
        )
    };
    let devices = [
        device_table(0, "pw0"),
        device_table(1, "pw1"),
        device_table(2, "pw2"),
    ];
    let mut tables = devices.to_vec();
    tables.push(port(&a, "dev0", ""));
    let mut hub = Hub::start(config(&emu, dir.path(), &tables)).await.unwrap();
    a.send("E tick #1").await;
    a.expect("OK 1").await;
    assert_eq!(hub_opens(&hub), 1);

    // Port a unchanged, port b added for dev2.
    let mut tables = devices.to_vec();
    tables.push(port(&a, "dev0", ""));
    tables.push(port(&b, "dev2", ""));
    let report = hub.reload(&config(&emu, dir.path(), &tables)).await;
    assert_eq!(report.ports, vec![format!("{} started", b.path.display())]);
    b.send("E boot #1").await;
    b.expect("OK 1").await;
    wait_until("dev2's event up", || !h.events(device_id(2)).is_empty()).await;
    // Port a was not reopened.
    a.send("E tick #2").await;
    a.expect("OK 2").await;
    assert_eq!(hub_opens(&hub), 2, "only port b opened");
    // A command for the new serial device comes down its port.
    send_command(&emu, device_id(2), "blink", serde_json::json!({})).await;
    // (kv reload lines come when the port opens and when MODE's store arrives.)
    let line = loop {
        let l = b
            .line(Duration::from_secs(10))
            .await
            .expect("a command line");
        if !l.contains("\"reload\"") {
            break l;
        }
    };
    assert!(line.contains("blink"), "{line}");

    // Port a's settings change: it is reopened; port b removed: it is closed.
    let mut tables = devices.to_vec();
    tables.push(port(&a, "dev0", "max_line_bytes = 2048\n"));
    let report = hub.reload(&config(&emu, dir.path(), &tables)).await;
    assert_eq!(
        report.ports,
        vec![
            format!("{} stopped", a.path.display()),
            format!("{} stopped", b.path.display()),
            format!("{} started", a.path.display()),
        ]
    );
    wait_until("port a reopened", || hub_opens(&hub) == 3).await;
    wait_until("one port open", || {
        hub.metrics().serial.ports_open.load(Relaxed) == 1
    })
    .await;
    a.send("E tick #3").await;
    a.expect("OK 3").await;
    wait_until("dev0's events up", || h.events(device_id(0)).len() >= 3).await;
    hub.shutdown().await;
}

fn hub_opens(hub: &Hub) -> u64 {
    hub.metrics().serial.port_opens.load(Relaxed)
}

/// A port restarted by a reload answers every line it committed before closing: nothing the
/// cloud gets goes unacknowledged (which would make the sensor resend it, a duplicate), and
/// nothing acknowledged is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_port_answers_what_it_committed() {
    let emu = emulator(1).await;
    let h = emu.handle();
    let dir = tempfile::tempdir().unwrap();
    let a = Pty::open();
    let port = |extra: &str| {
        format!(
            "[[serial]]\nport = \"{}\"\ndevices = [\"dev0\"]\n{extra}",
            a.path.display()
        )
    };
    let dev = device_table(0, "pw0");
    let mut hub = Hub::start(config(&emu, dir.path(), &[dev.clone(), port("")]))
        .await
        .unwrap();
    a.send("E tick n=0 #1000").await;
    a.expect("OK 1000").await;
    let lines: String = (1..=300).map(|i| format!("E tick n={i} #{i}\n")).collect();
    a.write_all(lines.as_bytes()).await;
    // Restart the port while the lines are being read and committed.
    let report = hub
        .reload(&config(
            &emu,
            dir.path(),
            &[dev, port("max_line_bytes = 2048\n")],
        ))
        .await;
    assert_eq!(report.ports.len(), 2, "{report:?}");
    let mut oks = std::collections::BTreeSet::new();
    while let Some(l) = a.line(Duration::from_secs(2)).await {
        if let Some(n) = l.strip_prefix("OK ") {
            assert!(oks.insert(n.parse::<u64>().unwrap()), "answered twice: {l}");
        }
    }
    assert!(!oks.is_empty());
    oks.insert(1000);
    wait_until("MODE has every answered line", || {
        h.events(device_id(0)).len() >= oks.len()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = ns(&h.events(device_id(0)));
    let (firsts, dups) = first_arrivals(&got);
    assert_eq!(dups, 0, "no line was committed twice");
    let mut cloud: std::collections::BTreeSet<u64> = firsts.into_iter().collect();
    cloud.remove(&0);
    cloud.insert(1000);
    assert_eq!(
        cloud, oks,
        "what MODE got is exactly what the sensor was told"
    );
    hub.shutdown().await;
}

/// The installer's typo: a device configured with a wrong API key is refused by MODE (and
/// would retry only every 10 minutes). Fixing the key and reloading sends its backlog at once,
/// and status shows the new state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixing_a_wrong_key_by_reload_delivers_the_backlog() {
    use modehub::uplink::SessionState;
    let emu = emulator(2).await;
    let h = emu.handle();
    let dir = tempfile::tempdir().unwrap();
    let wrong = device_table(1, "pw1").replace(&device_key(1), "v1.wrong-key");
    let before = config(&emu, dir.path(), &[device_table(0, "pw0"), wrong]);
    let mut hub = Hub::start(before.clone()).await.unwrap();
    let ops = hub.ops_context(&before);
    let mut s1 = Sensor::connect(hub.local_addr(), "dev1", "pw1").await;
    s1.publish_all("/devices/dev1/event", (0..3).map(event_json).collect())
        .await;
    wait_until("dev1 refused by MODE", || {
        matches!(hub.session_states()[1], SessionState::Refused(_))
    })
    .await;
    let st = ops.status().await;
    assert!(st.devices[1].upstream.starts_with("refused"), "{st:?}");
    assert!(
        !format!("{st:?}").contains("v1.wrong-key"),
        "no key in status"
    );

    let after = config(
        &emu,
        dir.path(),
        &[device_table(0, "pw0"), device_table(1, "pw1")],
    );
    let report = hub.reload(&after).await;
    assert_eq!(report.changed, vec!["dev1".to_string()]);
    assert_eq!(ns(&wait_events(&h, device_id(1), 3).await), vec![0, 1, 2]);
    wait_until("dev1 up", || hub.session_states()[1] == SessionState::Up).await;
    // (MODE's acknowledgements are committed to the outbox a moment after the events arrive.)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let st = loop {
        let st = ops.status().await;
        if st.devices[1].queued == 0 || tokio::time::Instant::now() > deadline {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let names: Vec<&str> = st.devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["dev0", "dev1"]);
    assert_eq!(st.devices[1].upstream, "up");
    assert_eq!(st.devices[1].queued, 0, "{st:?}");
    hub.shutdown().await;
}
