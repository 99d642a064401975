//! Crash safety for real: the hub *binary* runs as a child against an in-process MODE emulator,
//! sensors stream numbered QoS 1 events, and the hub is SIGKILLed at random (seeded) moments and
//! restarted on the same data directory, over and over. At the end, every event the hub
//! PUBACKed must have arrived at the emulator, in order per device; duplicates (at-least-once)
//! are counted and must stay within the in-flight window per kill. Then SIGTERM must stop the
//! hub cleanly (exit 0).
//!
//! Replay a failure with `CRASH_SEED=<seed printed by the test> cargo test --test crash`.
//! `CRASH_KILLS` changes the number of kills (default 24).

mod common;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rumqttc::{Event, Outgoing, Packet, QoS};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DEVICES: usize = 4;
/// The hub's MQTT in-flight window towards MODE (`cloud.max_inflight`).
const WINDOW: usize = 32;
/// Events a sensor keeps unacknowledged at once.
const SENSOR_INFLIGHT: usize = 8;

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn spawn_hub(config: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_modehub"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start the hub binary")
}

/// What one sensor saw.
#[derive(Default)]
struct Record {
    /// Events the hub PUBACKed.
    acked: Vec<u64>,
    /// Publish -> PUBACK times.
    latencies: Vec<Duration>,
    /// Events published (acknowledged or not).
    published: u64,
}

/// Streams numbered events to the hub at `addr` as device `i`, across hub restarts, until
/// `stop`; then waits for the last PUBACKs.
async fn sensor(i: usize, addr: SocketAddr, stop: Arc<AtomicBool>, rec: Arc<Mutex<Record>>) {
    let topic = format!("/devices/dev{i}/event");
    let mut n = 0u64;
    loop {
        if stop.load(Relaxed) {
            return;
        }
        let Ok(Ok((client, mut el))) = tokio::time::timeout(
            Duration::from_secs(2),
            connect_raw(addr, &format!("dev{i}"), &format!("pw{i}")),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(30)).await;
            continue;
        };
        let mut requested: VecDeque<(u64, Instant)> = VecDeque::new();
        let mut by_pkid: HashMap<u16, (u64, Instant)> = HashMap::new();
        let mut stopping_since: Option<Instant> = None;
        loop {
            if stop.load(Relaxed) {
                let since = *stopping_since.get_or_insert_with(Instant::now);
                if requested.is_empty() && by_pkid.is_empty()
                    || since.elapsed() > Duration::from_secs(10)
                {
                    return;
                }
            } else {
                while requested.len() + by_pkid.len() < SENSOR_INFLIGHT {
                    if client
                        .try_publish(&topic, QoS::AtLeastOnce, false, event_json(n as usize))
                        .is_err()
                    {
                        break;
                    }
                    requested.push_back((n, Instant::now()));
                    rec.lock().unwrap().published += 1;
                    n += 1;
                }
            }
            let polled = tokio::time::timeout(Duration::from_secs(5), el.poll()).await;
            match polled {
                Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                    if let Some(x) = requested.pop_front() {
                        by_pkid.insert(pkid, x);
                    }
                }
                Ok(Ok(Event::Incoming(Packet::PubAck(a)))) => {
                    if let Some((n, t)) = by_pkid.remove(&a.pkid) {
                        let mut r = rec.lock().unwrap();
                        r.acked.push(n);
                        r.latencies.push(t.elapsed());
                    }
                }
                Ok(Ok(_)) => {}
                // The hub died (or hung): what was not acknowledged is abandoned, as a sensor
                // that does not resend would; numbering goes on.
                Ok(Err(_)) | Err(_) => break,
            }
        }
    }
}

/// The last lines of the hub's log (its stderr, all runs appended).
fn log_tail(log: &Path) -> String {
    let log = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<_> = log.lines().rev().take(60).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_no_acknowledged_event() {
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let kills: usize = std::env::var("CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    eprintln!("crash test: CRASH_SEED={seed} CRASH_KILLS={kills}");
    let mut rng = fastrand::Rng::with_seed(seed);

    let emu = emulator(DEVICES).await;
    let h = emu.handle();
    let dir = tempfile::tempdir().unwrap();
    let local = free_port();
    let text = hub_config_text(
        &emu,
        dir.path(),
        DEVICES,
        &format!("max_inflight = {WINDOW}\nmax_messages_per_minute = 100000\nmax_project_messages_per_minute = 1000000\n"),
    )
    .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{local}\""))
        // Its own ops port: the default (9464) may be taken by any other hub on the machine, and
        // a hub that cannot bind it does not start (exit 1).
        + "[ops]\nlisten = \"127.0.0.1:0\"\n";
    let config = dir.path().join("hub.toml");
    std::fs::write(&config, text).unwrap();
    let log = dir.path().join("hub.log");

    let stop = Arc::new(AtomicBool::new(false));
    let records: Vec<Arc<Mutex<Record>>> = (0..DEVICES).map(|_| Default::default()).collect();
    let sensors: Vec<_> = (0..DEVICES)
        .map(|i| tokio::spawn(sensor(i, local, stop.clone(), records[i].clone())))
        .collect();

    let mut killed_at = Vec::new();
    for k in 0..kills {
        let mut child = spawn_hub(&config, &log);
        // Mostly mid-stream; sometimes during start-up.
        let after = if rng.u8(..) < 40 {
            rng.u64(0..300)
        } else {
            rng.u64(300..1500)
        };
        tokio::time::sleep(Duration::from_millis(after)).await;
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
        let status = child.wait().unwrap();
        // Killed, not ended by itself (a hub that failed to start exits 1: that is a failure
        // here, not a kill).
        assert_eq!(
            status.signal(),
            Some(Signal::SIGKILL as i32),
            "seed {seed}: kill {k}: the hub had already ended by itself: {status}\nhub log:\n{}",
            log_tail(&log)
        );
        killed_at.push(after);
    }

    // A last run: let the sensors finish, then everything acknowledged must arrive.
    let mut child = spawn_hub(&config, &log);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Relaxed);
    for s in sensors {
        s.await.unwrap();
    }
    let mut acked_total = 0;
    let mut arrived_total = 0;
    let mut dups_total = 0;
    let mut latencies = Vec::new();
    let mut published = 0;
    for (i, rec) in records.iter().enumerate() {
        let acked: HashSet<u64> = {
            let rec = rec.lock().unwrap();
            published += rec.published;
            latencies.extend(rec.latencies.iter().copied());
            rec.acked.iter().copied().collect()
        };
        acked_total += acked.len();
        let dev = device_id(i);
        let deadline = Instant::now() + Duration::from_secs(90);
        let got = loop {
            let got = h.events(dev);
            let have: HashSet<u64> = ns(&got).into_iter().collect();
            if acked.is_subset(&have) {
                break got;
            }
            if Instant::now() > deadline {
                let missing: Vec<_> = acked.difference(&have).take(20).collect();
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: String = log.lines().rev().take(40).collect::<Vec<_>>().join("\n");
                panic!("seed {seed}: device {i}: acknowledged events never arrived, e.g. {missing:?}\nhub log (newest first):\n{tail}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let order = ns(&got);
        // Per-device order: the first arrival of each event comes in publish order.
        let mut seen = HashSet::new();
        let firsts: Vec<u64> = order.iter().copied().filter(|n| seen.insert(*n)).collect();
        assert!(
            firsts.windows(2).all(|w| w[0] < w[1]),
            "seed {seed}: device {i}: out of order: {firsts:?}"
        );
        // `_seq` is monotonic across restarts and a duplicate carries its original's.
        let mut seq_of: HashMap<u64, u64> = HashMap::new();
        for e in &got {
            let n = e.event_data["n"].as_u64().unwrap();
            let s = e.event_data["_seq"].as_u64().unwrap();
            assert_eq!(
                *seq_of.entry(n).or_insert(s),
                s,
                "seed {seed}: device {i}: event {n} with two _seq"
            );
        }
        let seqs: Vec<u64> = firsts.iter().map(|n| seq_of[n]).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "seed {seed}: device {i}: _seq not increasing"
        );
        let dups = order.len() - firsts.len();
        // Each kill can leave at most one window of sent-but-unacknowledged rows to resend.
        assert!(
            dups <= (kills + 1) * WINDOW,
            "seed {seed}: device {i}: {dups} duplicates for {kills} kills"
        );
        arrived_total += firsts.len();
        dups_total += dups;
    }

    // SIGTERM: stop accepting, finish the commit, close sessions, exit 0.
    if let Some(s) = child.try_wait().unwrap() {
        panic!(
            "seed {seed}: the last hub ended by itself before SIGTERM ({s})\nhub log:\n{}",
            log_tail(&log)
        );
    }
    let t = Instant::now();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!(
                "seed {seed}: the hub did not stop within 30 s of SIGTERM\nhub log:\n{}",
                log_tail(&log)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let term_time = t.elapsed();
    assert!(
        status.success(),
        "seed {seed}: SIGTERM exit status: {status}\nhub log:\n{}",
        log_tail(&log)
    );

    let p50 = percentile(&mut latencies, 0.5);
    let p99 = percentile(&mut latencies, 0.99);
    let max = latencies.last().copied().unwrap_or_default();
    eprintln!(
        "crash test (seed {seed}): {kills} SIGKILLs (after {killed_at:?} ms); {published} published, \
         {acked_total} acknowledged, {arrived_total} distinct arrived (every acknowledged one), \
         {dups_total} duplicates (bound {} per device); PUBACK latency p50 {p50:?} p99 {p99:?} max {max:?}; \
         SIGTERM exit 0 after {term_time:?}",
        (kills + 1) * WINDOW
    );
}
