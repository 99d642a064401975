//! Replay and disk measurements (ignored: run by hand, numbers go in the report).
//!
//! ```sh
//! cargo test --release --test replay_bench -- --ignored --nocapture --test-threads 1
//! BENCH_EVENTS=20000 cargo test --release --test replay_bench replay_unpaced -- --ignored --nocapture
//! ```
//! - `replay_unpaced`: a 100,000-event backlog across 20 devices, pacing raised out of the way:
//!   events/s from reconnect to the last arrival.
//! - `replay_default_pacing`: the same backlog with the default pacing (540/min per device,
//!   5,400/min hub-wide) against the emulator's 600/min per-device limit: how long, and whether
//!   MODE dropped any session. Takes ~19 minutes.
//! - `disk_bytes_per_event`: the outbox's bytes written per event (file growth and
//!   /proc/self/io write_bytes), batched and one commit per event.
//!
//! Everything runs in one process on the same cores (emulator, hub, filler), so the figures are
//! a lower bound for the hub alone.

mod common;

use common::*;
use modehub::config::Config;
use modehub::outbox::{Capture, Kind, NewRecord, Outbox};
use modehub::Hub;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const DEVICES: usize = 20;

fn events() -> usize {
    std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000)
}

fn write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| {
                    l.strip_prefix("write_bytes: ")
                        .map(|v| v.trim().parse().ok())
                })
                .flatten()
        })
        .unwrap_or(0)
}

fn db_size(dir: &Path) -> u64 {
    ["hub.db", "hub.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

fn record(dev: usize, n: usize) -> NewRecord {
    NewRecord {
        device: device_id(dev),
        kind: Kind::Event,
        key: "reading".into(),
        // A typical small sensor reading.
        body: format!(r#"{{"n":{n},"celsius":21.5,"humidity":48.2,"battery":3.71}}"#),
        captured: Capture::at(1_764_000_000_000 + n as i64),
    }
}

/// Fills the outbox with `total` events spread over the devices, in batches (as a burst of
/// sensors would), and closes it.
async fn fill(dir: &Path, total: usize) -> (u64, u64) {
    let (ob, th) = Outbox::open(dir, false, Arc::new(|_| {})).unwrap();
    let (wb0, size0) = (write_bytes(), db_size(dir));
    let per = total / DEVICES;
    let mut waiters = Vec::with_capacity(1024);
    for n in 0..per {
        for d in 0..DEVICES {
            waiters.push(ob.submit(record(d, n)).await.unwrap());
            if waiters.len() == 1024 {
                for w in waiters.drain(..) {
                    w.await.unwrap().unwrap();
                }
            }
        }
    }
    for w in waiters.drain(..) {
        w.await.unwrap().unwrap();
    }
    let out = (write_bytes() - wb0, db_size(dir) - size0);
    drop(ob);
    tokio::task::spawn_blocking(move || th.join())
        .await
        .unwrap()
        .unwrap();
    out
}

async fn replay(cloud: &str, rate_limit: Option<u32>) {
    let total = events();
    let emu = emulator(DEVICES).await;
    let h = emu.handle();
    h.set_rate_limit(rate_limit);
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    fill(dir.path(), total).await;
    eprintln!("filled {total} events in {:?}", t.elapsed());
    let cfg = Config::parse(
        &hub_config_text(&emu, dir.path(), DEVICES, cloud),
        dir.path(),
    )
    .unwrap();
    let start = Instant::now();
    let hub = Hub::start(cfg).await.unwrap();
    let mut last_report = Instant::now();
    loop {
        let got = h.stats().events_accepted as usize;
        if got >= total {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(60) {
            eprintln!("  {got}/{total} after {:?}", start.elapsed());
            last_report = Instant::now();
        }
        assert!(
            start.elapsed() < Duration::from_secs(3600),
            "replay stalled at {got}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = start.elapsed();
    let st = h.stats();
    eprintln!(
        "replayed {total} events across {DEVICES} devices in {took:?}: {:.0} events/s; \
         sessions dropped by the rate limit: {}; pacing: {} burst drops, {} AIMD decreases",
        total as f64 / took.as_secs_f64(),
        st.mqtt_sessions_dropped_rate_limit,
        hub.pacing_stats()
            .burst_drops
            .load(std::sync::atomic::Ordering::Relaxed),
        hub.pacing_stats()
            .aimd_decreases
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    // Every device got all of its events, in order.
    for d in 0..DEVICES {
        let got = ns(&h.events(device_id(d)));
        let mut seen = std::collections::HashSet::new();
        let firsts: Vec<u64> = got.iter().copied().filter(|n| seen.insert(*n)).collect();
        assert_eq!(
            firsts,
            (0..(total / DEVICES) as u64).collect::<Vec<_>>(),
            "device {d}"
        );
    }
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn replay_unpaced() {
    replay(
        "max_messages_per_minute = 10000000\nmax_project_messages_per_minute = 10000000\n",
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn replay_default_pacing() {
    replay("", Some(600)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn disk_bytes_per_event() {
    let n = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let (wb, grown) = fill(dir.path(), n).await;
    eprintln!(
        "batched appends: {:.0} bytes written per event (write_bytes), file growth {:.0} bytes per event",
        wb as f64 / n as f64,
        grown as f64 / n as f64
    );
    // One commit per event (a single sensor trickling), then acknowledging them all.
    let dir = tempfile::tempdir().unwrap();
    let (ob, th) = Outbox::open(dir.path(), false, Arc::new(|_| {})).unwrap();
    let trickle = 2_000;
    let (wb0, s0) = (write_bytes(), db_size(dir.path()));
    for i in 0..trickle {
        ob.append(record(0, i)).await.unwrap();
    }
    let (wb1, s1) = (write_bytes(), db_size(dir.path()));
    let rows = ob.fetch(device_id(0), 0, trickle).await.unwrap();
    for r in &rows {
        ob.ack(r.id).await;
    }
    ob.depth().await.unwrap();
    let wb2 = write_bytes();
    eprintln!(
        "one commit per event: {:.0} bytes written per event, file growth {:.0} bytes per event; \
         acknowledging (delete): {:.0} bytes written per event",
        (wb1 - wb0) as f64 / trickle as f64,
        (s1 - s0) as f64 / trickle as f64,
        (wb2 - wb1) as f64 / trickle as f64,
    );
    drop(ob);
    let _ = tokio::task::spawn_blocking(move || th.join()).await;
}
