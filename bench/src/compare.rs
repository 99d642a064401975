//! Side-by-side benchmark (issues 7, 12): modehub -> MODE emulator against Mosquitto -> bridge ->
//! Mosquitto, plus the ceilings (rumqttd alone, the outbox append path alone), run interleaved
//! (A B A B ...) with medians over repeats, because the machines here are shared and noisy; and
//! the *home profile* (50 sensors, one event every 10 s each), where every system under test
//! runs at the same time for the same minutes, so drift on the machine hits them alike.
//!
//! Driven by `benches/compare.sh`, which builds the binaries and installs Mosquitto. This
//! process hosts the load generator (K rumqttc sensors publishing QoS 1 MODE events with a send
//! timestamp inside), the receivers (the in-process MODE emulator for modehub, a subscriber on
//! the "cloud" Mosquitto for the peer) and the measurements; every broker under test runs as a
//! separate process so that its RSS, CPU time and disk writes are read from `/proc/PID`.
//! Timing figures are reported, never asserted.

use anyhow::{bail, Context, Result};
use clap::Parser;
use hdrhistogram::Histogram;
use modehub::emulator::{Behaviour, Emulator, EmulatorConfig, Seed, SeedDevice};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

#[derive(Parser, Debug, Clone)]
#[command(about = "modehub vs Mosquitto bridge, and the hub's own ceilings")]
struct Args {
    /// Short run for CI: one repeat, few messages, 100 devices only for the scale rows.
    #[arg(long)]
    quick: bool,
    /// Interleaved repeats (medians are reported).
    #[arg(long)]
    repeats: Option<usize>,
    /// Messages per full-speed run (all sensors together).
    #[arg(long)]
    messages: Option<usize>,
    /// Publishing sensors (each its own device and connection).
    #[arg(long, default_value_t = 20)]
    sensors: usize,
    /// Event payload size in bytes (a MODE event `{"eventType":..,"eventData":{..}}`).
    #[arg(long, default_value_t = 120)]
    payload: usize,
    /// Total publish rate of the latency run, messages per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Length of the latency run, seconds (the first second is warm-up, not recorded).
    #[arg(long)]
    latency_secs: Option<u64>,
    /// QoS 1 publishes each sensor keeps in flight at full speed.
    #[arg(long, default_value_t = 100)]
    inflight: u16,
    /// Configured device counts for the scale rows (modehub only), comma separated.
    #[arg(long, value_delimiter = ',')]
    scale: Option<Vec<usize>>,
    /// The modehub binary under test.
    #[arg(long, default_value = "target/release/modehub")]
    hub_bin: PathBuf,
    /// Another modehub binary (e.g. before a change) run in the same interleaving.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Name of the baseline column.
    #[arg(long, default_value = "before")]
    baseline_name: String,
    /// The rumqttd-alone ceiling (default: this binary's `rumqttd-alone` mode).
    #[arg(long)]
    rumqttd_bin: Option<PathBuf>,
    /// The outbox-alone ceiling (default: this binary's `outbox-alone` mode).
    #[arg(long)]
    outbox_bin: Option<PathBuf>,
    #[arg(long, default_value = "mosquitto")]
    mosquitto_bin: String,
    /// Scratch directory (data dirs, configs); on the disk being measured.
    #[arg(long, default_value = "target/bench-work")]
    work: PathBuf,
    /// Child PIDs are written here so the driving script can clean up after a crash.
    #[arg(long)]
    pidfile: Option<PathBuf>,
    /// Also write the final table here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Skip the Mosquitto runs (e.g. when it is not installed).
    #[arg(long)]
    no_mosquitto: bool,
    /// Run only these parts (modehub, base, mosquitto, rumqttd, outbox, scale, home), comma
    /// separated.
    #[arg(long, value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// Home profile: sensors (each its own device and connection).
    #[arg(long, default_value_t = 50)]
    home_sensors: usize,
    /// Home profile: seconds between two events of one sensor.
    #[arg(long, default_value_t = 10.0)]
    home_period: f64,
    /// Home profile: measured seconds per repeat (default 300, 60 with --quick).
    #[arg(long)]
    home_secs: Option<u64>,
}

// ------------------------------------------------------------------------------------------
// Processes and /proc
// ------------------------------------------------------------------------------------------

/// A child process that is killed when dropped (and listed in the pidfile meanwhile).
struct Proc {
    child: Child,
    name: String,
    pidfile: Option<PathBuf>,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, log: &Path, pidfile: &Option<PathBuf>) -> Result<Proc> {
        let out = std::fs::File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        if let Some(p) = pidfile {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?;
            writeln!(f, "{}", child.id())?;
        }
        Ok(Proc {
            child,
            name: name.to_string(),
            pidfile: pidfile.clone(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then SIGKILL after `grace`.
    fn stop(&mut self, grace: Duration) {
        if self.alive() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.pid().to_string()])
                .status();
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline && self.alive() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if self.alive() {
            eprintln!("  ({} did not stop on SIGTERM; killing it)", self.name);
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if let Some(p) = &self.pidfile {
            if let Ok(text) = std::fs::read_to_string(p) {
                let me = self.pid().to_string();
                let rest: String = text
                    .lines()
                    .filter(|l| !l.is_empty() && *l != me)
                    .map(|l| format!("{l}\n"))
                    .collect();
                let _ = std::fs::write(p, rest);
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct ProcSample {
    rss_kb: u64,
    hwm_kb: u64,
    cpu_ticks: u64,
    write_bytes: u64,
    /// Context switches (voluntary + involuntary) of all the process's live threads: each is
    /// a thread going to sleep or being woken, the cost that dominates at low rates.
    switches: u64,
}

/// Sum of `voluntary_ctxt_switches` + `nonvoluntary_ctxt_switches` over the threads of `pid`
/// (`/proc/PID/status` alone counts the main thread only).
fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    let mut n = 0;
    for t in tasks.flatten() {
        let Ok(st) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        for l in st.lines() {
            if let Some(v) = l
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                n += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    n
}

fn clk_tck() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

fn sample(pid: u32) -> Result<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // After ")": state is field 3 of stat(5), so utime (14) is index 11, stime (15) index 12.
    let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    let write_bytes = io
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Ok(ProcSample {
        rss_kb: kb("VmRSS:"),
        hwm_kb: kb("VmHWM:"),
        cpu_ticks: ticks,
        write_bytes,
        switches: context_switches(pid),
    })
}

fn free_port() -> Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

async fn wait_port(addr: SocketAddr, timeout: Duration, proc_: &mut Proc) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if !proc_.alive() {
            bail!("{} exited before listening on {addr}", proc_.name);
        }
        if Instant::now() > deadline {
            bail!("{} did not listen on {addr} within {timeout:?}", proc_.name);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ------------------------------------------------------------------------------------------
// Payloads, receivers, sensors
// ------------------------------------------------------------------------------------------

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A MODE event of exactly `size` bytes (when `size` is large enough) carrying the send time.
fn payload(size: usize, sensor: usize, n: u64) -> Vec<u8> {
    let head = format!(
        r#"{{"eventType":"reading","eventData":{{"t":{},"s":{sensor},"n":{n},"celsius":21.5,"pad":""#,
        now_ns()
    );
    let tail = "\"}}";
    let pad = size.saturating_sub(head.len() + tail.len());
    let mut p = Vec::with_capacity(head.len() + pad + tail.len());
    p.extend_from_slice(head.as_bytes());
    p.resize(p.len() + pad, b'x');
    p.extend_from_slice(tail.as_bytes());
    p
}

/// Arrivals at the "cloud" end.
struct Receiver {
    count: AtomicU64,
    recording: AtomicBool,
    record_from_ns: AtomicU64,
    hist: Mutex<Histogram<u64>>,
    notify: Notify,
}

impl Receiver {
    fn new() -> Arc<Receiver> {
        Arc::new(Receiver {
            count: AtomicU64::new(0),
            recording: AtomicBool::new(false),
            record_from_ns: AtomicU64::new(0),
            hist: Mutex::new(Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram")),
            notify: Notify::new(),
        })
    }

    /// `n` events arrived (more than one only when the emulator's broadcast lagged).
    fn arrived(&self, sent_ns: Option<u64>, n: u64) {
        let now = now_ns();
        if let Some(t) = sent_ns {
            if self.recording.load(Relaxed) && t >= self.record_from_ns.load(Relaxed) {
                let us = now.saturating_sub(t) / 1000;
                let _ = self.hist.lock().unwrap().record(us.max(1));
            }
        }
        self.count.fetch_add(n, Relaxed);
        self.notify.notify_waiters();
    }

    async fn wait_for(&self, n: u64, timeout: Duration) -> Option<Instant> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            if self.count.load(Relaxed) >= n {
                return Some(Instant::now());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return (self.count.load(Relaxed) >= n).then(Instant::now);
            }
        }
    }
}

fn sent_ns_of_event(data: &serde_json::Value) -> Option<u64> {
    data.get("t").and_then(|t| t.as_u64())
}

fn sent_ns_of_payload(p: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(p).ok()?;
    sent_ns_of_event(v.get("eventData")?)
}

/// The MQTT side of a subscriber on the cloud Mosquitto.
async fn mqtt_receiver(
    addr: SocketAddr,
    rx: Arc<Receiver>,
    tag: &str,
) -> Result<tokio::task::JoinHandle<()>> {
    let mut opts = MqttOptions::new(
        format!("bench-cloud-receiver-{tag}"),
        addr.ip().to_string(),
        addr.port(),
    );
    opts.set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = AsyncClient::new(opts, 64);
    client
        .subscribe("/devices/+/event", QoS::AtLeastOnce)
        .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) if Instant::now() > deadline => bail!("cloud subscriber: {e}"),
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(_) => bail!("cloud subscriber: no SUBACK"),
        }
    }
    Ok(tokio::spawn(async move {
        let _client = client;
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    rx.arrived(sent_ns_of_payload(&p.payload), 1)
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }))
}

/// Local sensors: one rumqttc connection each.
struct Fleet {
    clients: Vec<AsyncClient>,
    topics: Vec<String>,
    acked: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    acked_notify: Arc<Notify>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

struct Login {
    user: String,
    pass: String,
    topic: String,
}

impl Fleet {
    async fn connect(addr: SocketAddr, logins: &[Login], inflight: u16) -> Result<Fleet> {
        let acked = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let acked_notify = Arc::new(Notify::new());
        let mut clients = Vec::new();
        let mut tasks = Vec::new();
        let mut ready = Vec::new();
        for (i, l) in logins.iter().enumerate() {
            let mut opts = MqttOptions::new(
                format!("bench-sensor-{i}"),
                addr.ip().to_string(),
                addr.port(),
            );
            opts.set_credentials(l.user.clone(), l.pass.clone())
                .set_keep_alive(Duration::from_secs(30))
                .set_inflight(inflight)
                .set_clean_session(true);
            let (client, mut el) = AsyncClient::new(opts, 256);
            let (tx, rx) = tokio::sync::oneshot::channel::<std::result::Result<(), String>>();
            let acked = acked.clone();
            let errors = errors.clone();
            let notify = acked_notify.clone();
            tasks.push(tokio::spawn(async move {
                let mut tx = Some(tx);
                loop {
                    match el.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(a))) => {
                            if let Some(tx) = tx.take() {
                                let _ = tx.send(if a.code == rumqttc::ConnectReturnCode::Success {
                                    Ok(())
                                } else {
                                    Err(format!("{:?}", a.code))
                                });
                            }
                        }
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            acked.fetch_add(1, Relaxed);
                            notify.notify_waiters();
                        }
                        Ok(_) => {}
                        Err(e) => {
                            if let Some(tx) = tx.take() {
                                let _ = tx.send(Err(e.to_string()));
                                return;
                            }
                            errors.fetch_add(1, Relaxed);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }));
            clients.push(client);
            ready.push((i, rx));
            // The hub's front keeps at most 8 connections per peer address waiting for their
            // login (`max_unauthenticated_per_peer`) and evicts the oldest beyond: every sensor
            // here comes from 127.0.0.1, so they log in in waves of at most 8.
            if ready.len() == 8 || i + 1 == logins.len() {
                for (i, r) in ready.drain(..) {
                    match tokio::time::timeout(Duration::from_secs(20), r).await {
                        Ok(Ok(Ok(()))) => {}
                        Ok(Ok(Err(e))) => bail!("sensor {i} could not connect: {e}"),
                        _ => bail!("sensor {i}: no CONNACK"),
                    }
                }
            }
        }
        Ok(Fleet {
            clients,
            topics: logins.iter().map(|l| l.topic.clone()).collect(),
            acked,
            errors,
            acked_notify,
            tasks,
        })
    }

    async fn wait_acked(&self, n: u64, timeout: Duration) -> Option<Instant> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.acked_notify.notified();
            if self.acked.load(Relaxed) >= n {
                return Some(Instant::now());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return (self.acked.load(Relaxed) >= n).then(Instant::now);
            }
        }
    }

    /// Every sensor publishes `per_sensor` events as fast as its window allows.
    async fn full_speed(&self, per_sensor: usize, size: usize) {
        let mut pubs = Vec::new();
        for (i, c) in self.clients.iter().enumerate() {
            let c = c.clone();
            let topic = self.topics[i].clone();
            pubs.push(tokio::spawn(async move {
                for n in 0..per_sensor as u64 {
                    if c.publish(topic.as_str(), QoS::AtLeastOnce, false, payload(size, i, n))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }));
        }
        for p in pubs {
            let _ = p.await;
        }
    }

    /// All sensors together publish `rate` events/s for `secs`, each sensor at its own even
    /// pace, the sensors' phases spread over one period; returns how many were sent.
    fn fixed_rate(
        &self,
        rate: f64,
        secs: f64,
        size: usize,
    ) -> impl std::future::Future<Output = u64> + Send + 'static {
        let clients = self.clients.clone();
        let topics = self.topics.clone();
        async move { Self::fixed_rate_on(clients, topics, rate, secs, size).await }
    }

    async fn fixed_rate_on(
        clients: Vec<AsyncClient>,
        topics: Vec<String>,
        rate: f64,
        secs: f64,
        size: usize,
    ) -> u64 {
        let k = clients.len() as f64;
        let period = Duration::from_secs_f64(k / rate);
        let start = tokio::time::Instant::now() + Duration::from_millis(50);
        let end = start + Duration::from_secs_f64(secs);
        let sent = Arc::new(AtomicU64::new(0));
        let mut pubs = Vec::new();
        for (i, c) in clients.into_iter().enumerate() {
            let topic = topics[i].clone();
            let sent = sent.clone();
            let first = start + period.mul_f64(i as f64 / k);
            pubs.push(tokio::spawn(async move {
                let mut n = 0u64;
                loop {
                    let at = first + period * n as u32;
                    if at >= end {
                        return;
                    }
                    tokio::time::sleep_until(at).await;
                    if c.publish(topic.as_str(), QoS::AtLeastOnce, false, payload(size, i, n))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    sent.fetch_add(1, Relaxed);
                    n += 1;
                }
            }));
        }
        for p in pubs {
            let _ = p.await;
        }
        sent.load(Relaxed)
    }

    async fn close(self) {
        for c in &self.clients {
            let _ = c.try_disconnect();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        for t in self.tasks {
            t.abort();
        }
    }
}

// ------------------------------------------------------------------------------------------
// Results
// ------------------------------------------------------------------------------------------

/// Figures of one run of one system; missing ones are NaN.
#[derive(Debug, Clone, Default)]
struct Figures(BTreeMap<&'static str, f64>);

impl Figures {
    fn set(&mut self, k: &'static str, v: f64) {
        self.0.insert(k, v);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[derive(Default)]
struct Results {
    runs: BTreeMap<String, Vec<Figures>>,
}

impl Results {
    fn add(&mut self, system: &str, f: Figures) {
        self.runs.entry(system.to_string()).or_default().push(f);
    }
    fn med(&self, system: &str, key: &str) -> f64 {
        self.runs
            .get(system)
            .map(|runs| {
                median(
                    runs.iter()
                        .map(|f| f.0.get(key).copied().unwrap_or(f64::NAN))
                        .collect(),
                )
            })
            .unwrap_or(f64::NAN)
    }
    fn all(&self, system: &str, key: &str) -> Vec<f64> {
        self.runs
            .get(system)
            .map(|runs| {
                runs.iter()
                    .map(|f| f.0.get(key).copied().unwrap_or(f64::NAN))
                    .collect()
            })
            .unwrap_or_default()
    }
}

// ------------------------------------------------------------------------------------------
// The scenario shared by modehub and Mosquitto
// ------------------------------------------------------------------------------------------

struct Plan {
    sensors: usize,
    payload: usize,
    inflight: u16,
    messages: usize,
    rate: u32,
    latency_secs: u64,
}

/// Idle RSS, latency at a fixed rate, then full-speed ingest and end-to-end, with the broker's
/// `/proc` figures around each phase. `fleet` is connected, `rx` receives at the cloud end.
async fn measure(
    plan: &Plan,
    pid: u32,
    fleet: &Fleet,
    rx: &Receiver,
    f: &mut Figures,
) -> Result<()> {
    // Warm-up: one event end to end proves the path (bridge, upstream session) is up.
    let c0 = rx.count.load(Relaxed);
    let a0 = fleet.acked.load(Relaxed);
    fleet.clients[0]
        .publish(
            fleet.topics[0].as_str(),
            QoS::AtLeastOnce,
            false,
            payload(plan.payload, 0, 0),
        )
        .await?;
    if rx.wait_for(c0 + 1, Duration::from_secs(30)).await.is_none() {
        bail!("the warm-up event did not reach the cloud within 30 s");
    }
    fleet.wait_acked(a0 + 1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = sample(pid)?;
    f.set("rss_idle_mb", idle.rss_kb as f64 / 1024.0);

    // Latency at a fixed rate.
    {
        let s0 = sample(pid)?;
        let c0 = rx.count.load(Relaxed);
        rx.hist.lock().unwrap().reset();
        rx.record_from_ns.store(now_ns() + 1_000_000_000, Relaxed);
        rx.recording.store(true, Relaxed);
        let sent = fleet
            .fixed_rate(plan.rate as f64, plan.latency_secs as f64, plan.payload)
            .await;
        let got = rx.wait_for(c0 + sent, Duration::from_secs(30)).await;
        rx.recording.store(false, Relaxed);
        let s1 = sample(pid)?;
        if got.is_none() {
            eprintln!(
                "  warning: latency run: {} of {sent} events arrived",
                rx.count.load(Relaxed) - c0
            );
        }
        let h = rx.hist.lock().unwrap().clone();
        f.set("lat_p50_ms", h.value_at_quantile(0.50) as f64 / 1000.0);
        f.set("lat_p99_ms", h.value_at_quantile(0.99) as f64 / 1000.0);
        f.set("lat_p999_ms", h.value_at_quantile(0.999) as f64 / 1000.0);
        f.set("lat_max_ms", h.max() as f64 / 1000.0);
        f.set(
            "disk_per_event_rate",
            (s1.write_bytes - s0.write_bytes) as f64 / sent.max(1) as f64,
        );
        f.set(
            "cpu_per_100k_rate",
            (s1.cpu_ticks - s0.cpu_ticks) as f64 / clk_tck() / sent.max(1) as f64 * 100_000.0,
        );
        f.set(
            "wakeups_per_event_rate",
            s1.switches.saturating_sub(s0.switches) as f64 / sent.max(1) as f64,
        );
    }

    // Full speed.
    {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let per = plan.messages / plan.sensors;
        let total = (per * plan.sensors) as u64;
        let s0 = sample(pid)?;
        let c0 = rx.count.load(Relaxed);
        let a0 = fleet.acked.load(Relaxed);
        let started = Instant::now();
        let publish = fleet.full_speed(per, plan.payload);
        let (_, acked_at) = tokio::join!(
            publish,
            fleet.wait_acked(a0 + total, Duration::from_secs(300))
        );
        let delivered_at = rx.wait_for(c0 + total, Duration::from_secs(300)).await;
        let s1 = sample(pid)?;
        match acked_at {
            Some(t) => f.set("ingest_per_s", total as f64 / (t - started).as_secs_f64()),
            None => eprintln!("  warning: not every publish was acknowledged"),
        }
        match delivered_at {
            Some(t) => f.set("e2e_per_s", total as f64 / (t - started).as_secs_f64()),
            None => eprintln!(
                "  warning: only {} of {total} events reached the cloud",
                rx.count.load(Relaxed) - c0
            ),
        }
        f.set(
            "cpu_per_100k",
            (s1.cpu_ticks - s0.cpu_ticks) as f64 / clk_tck() / total as f64 * 100_000.0,
        );
        f.set(
            "disk_per_event",
            (s1.write_bytes - s0.write_bytes) as f64 / total as f64,
        );
        f.set("rss_peak_mb", s1.hwm_kb as f64 / 1024.0);
        f.set("sensor_errors", fleet.errors.load(Relaxed) as f64);
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// modehub
// ------------------------------------------------------------------------------------------

const MODE_ID_BASE: u64 = 100_000;

fn device_key(i: usize) -> String {
    format!(
        "v1.bench.{i}.k{:016x}",
        0x5eed_u64.wrapping_mul(i as u64 + 7)
    )
}

/// A modehub process under test, with its MODE emulator and the arrivals there.
struct HubUnderTest {
    hub: Proc,
    emu: Emulator,
    rx: Arc<Receiver>,
    recv_task: tokio::task::JoinHandle<()>,
    local: SocketAddr,
    dir: PathBuf,
    devices: usize,
    startup_s: f64,
}

impl HubUnderTest {
    /// Starts the hub with `devices` configured devices and waits until every upstream session
    /// is up at the emulator.
    async fn start(args: &Args, bin: &Path, devices: usize, tag: &str) -> Result<HubUnderTest> {
        let seed = Seed {
            device: (0..devices)
                .map(|i| SeedDevice {
                    id: MODE_ID_BASE + i as u64,
                    api_key: device_key(i),
                    name: Some(format!("s{i}")),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        // The emulator's rate limit is turned off explicitly: this measures the hub, and
        // MODE's limits would cap a device at 9 msg/s.
        let emu = Emulator::start(EmulatorConfig {
            behaviour: Behaviour {
                rate_limit_per_minute: None,
                project_rate_limit_per_minute: None,
                max_recorded_events: 1000,
                session_queue: 4096,
                ..Default::default()
            },
            ..EmulatorConfig::local(seed)
        })
        .await?;
        let cloud = emu.handle();
        let rx = Receiver::new();
        let mut events = cloud.subscribe_events();
        let rx2 = rx.clone();
        let recv_task = tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(ev) => rx2.arrived(sent_ns_of_event(&ev.event_data), 1),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        rx2.arrived(None, n)
                    }
                    Err(_) => return,
                }
            }
        });

        let dir = args.work.join(format!("{tag}-{devices}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let local = free_port()?;
        let mut cfg = format!(
            "[hub]\ndata_dir = \"{}\"\nlog = \"warn\"\n\n[local.mqtt]\nlisten = \"{local}\"\nmax_connections = {}\n\n[cloud]\napi_url = \"http://{}\"\nmqtt_url = \"mqtt://{}\"\n# Rate limits off (issue 7): MODE's pacing would cap a device at 9 msg/s.\nmax_messages_per_minute = 100000000\nmax_project_messages_per_minute = 100000000\n\n# Several hubs may run at once (the home profile): no fixed ops port.\n[ops]\nlisten = \"off\"\n",
            dir.join("data").display(),
            devices + 64,
            emu.http_addr(),
            emu.mqtt_addr()
        );
        for i in 0..devices {
            let _ = write!(
                cfg,
                "\n[[device]]\nname = \"s{i}\"\nmode_id = {}\napi_key = \"{}\"\nlocal_password = \"pw{i}\"\n",
                MODE_ID_BASE + i as u64,
                device_key(i)
            );
        }
        let cfg_path = dir.join("config.toml");
        std::fs::write(&cfg_path, cfg)?;
        let started = Instant::now();
        let mut hub = Proc::spawn(
            tag,
            Command::new(bin).arg("run").arg("--config").arg(&cfg_path),
            &dir.join("hub.log"),
            &args.pidfile,
        )?;
        wait_port(local, Duration::from_secs(30), &mut hub).await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let up = cloud.devices().iter().filter(|d| d.connected).count();
            if up >= devices {
                break;
            }
            if Instant::now() > deadline || !hub.alive() {
                bail!("{tag}: only {up} of {devices} upstream sessions came up");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(HubUnderTest {
            hub,
            emu,
            rx,
            recv_task,
            local,
            dir,
            devices,
            startup_s: started.elapsed().as_secs_f64(),
        })
    }

    /// Connects `sensors` local sensors (the first devices of the config).
    async fn fleet(&self, sensors: usize, inflight: u16) -> Result<Fleet> {
        let logins: Vec<Login> = (0..sensors.min(self.devices))
            .map(|i| Login {
                user: format!("s{i}"),
                pass: format!("pw{i}"),
                topic: format!("/devices/s{i}/event"),
            })
            .collect();
        Fleet::connect(self.local, &logins, inflight).await
    }

    fn wal_mb(&self) -> f64 {
        std::fs::metadata(self.dir.join("data").join("hub.db-wal"))
            .map(|m| m.len())
            .unwrap_or(0) as f64
            / 1e6
    }

    async fn stop(mut self) {
        self.hub.stop(Duration::from_secs(10));
        self.recv_task.abort();
        self.emu.shutdown().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The full-speed and fixed-rate scenario against one modehub with `devices` configured.
async fn run_modehub(
    args: &Args,
    plan: &Plan,
    bin: &Path,
    devices: usize,
    tag: &str,
) -> Result<Figures> {
    let mut f = Figures::default();
    let h = HubUnderTest::start(args, bin, devices, tag).await?;
    f.set("startup_s", h.startup_s);
    tokio::time::sleep(Duration::from_millis(500)).await;
    f.set(
        "rss_idle_no_clients_mb",
        sample(h.hub.pid())?.rss_kb as f64 / 1024.0,
    );
    let fleet = h.fleet(plan.sensors, plan.inflight).await?;
    let r = measure(plan, h.hub.pid(), &fleet, &h.rx, &mut f).await;
    // The WAL must not grow without bound now that checkpoints run beside the writer.
    f.set("wal_mb_end", h.wal_mb());
    fleet.close().await;
    h.stop().await;
    r.map(|_| f)
}

/// Memory only: the hub's RSS with `devices` configured devices (each with its upstream
/// session up), with no local client and then with the plan's sensors connected, after one
/// event from each.
async fn run_scale(args: &Args, plan: &Plan, bin: &Path, devices: usize) -> Result<Figures> {
    let mut f = Figures::default();
    let h = HubUnderTest::start(args, bin, devices, "scale").await?;
    f.set("startup_s", h.startup_s);
    tokio::time::sleep(Duration::from_secs(1)).await;
    f.set(
        "rss_idle_no_clients_mb",
        sample(h.hub.pid())?.rss_kb as f64 / 1024.0,
    );
    let sensors = plan.sensors.min(devices);
    let fleet = h.fleet(sensors, plan.inflight).await?;
    let c0 = h.rx.count.load(Relaxed);
    for (i, c) in fleet.clients.iter().enumerate() {
        c.publish(
            fleet.topics[i].as_str(),
            QoS::AtLeastOnce,
            false,
            payload(plan.payload, i, 0),
        )
        .await?;
    }
    let arrived =
        h.rx.wait_for(c0 + sensors as u64, Duration::from_secs(30))
            .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    f.set("rss_idle_mb", sample(h.hub.pid())?.rss_kb as f64 / 1024.0);
    fleet.close().await;
    h.stop().await;
    if arrived.is_none() {
        bail!("scale {devices}: the sensors' events did not all reach the cloud");
    }
    Ok(f)
}

// ------------------------------------------------------------------------------------------
// Mosquitto with a bridge
// ------------------------------------------------------------------------------------------

/// A local Mosquitto with persistence and a QoS 1 bridge to a second Mosquitto (the cloud),
/// and a subscriber timestamping arrivals there.
struct MosquittoUnderTest {
    broker: Proc,
    cloud: Proc,
    rx: Arc<Receiver>,
    recv_task: tokio::task::JoinHandle<()>,
    local: SocketAddr,
    dir: PathBuf,
    sensors: usize,
}

impl MosquittoUnderTest {
    async fn start(args: &Args, sensors: usize, tag: &str) -> Result<MosquittoUnderTest> {
        let dir = args.work.join(tag);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("persist"))?;
        let dir = std::fs::canonicalize(&dir)?;
        let cloud_addr = free_port()?;
        let local = free_port()?;
        // The cloud: plain, in memory, unlimited queues so nothing is dropped.
        let cloud_conf = dir.join("cloud.conf");
        std::fs::write(
            &cloud_conf,
            format!(
                "user root\nlistener {} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\nlog_dest stderr\nlog_type error\nlog_type warning\n",
                cloud_addr.port()
            ),
        )?;
        let mut cloud = Proc::spawn(
            &format!("{tag}-cloud"),
            Command::new(&args.mosquitto_bin).arg("-c").arg(&cloud_conf),
            &dir.join("cloud.log"),
            &args.pidfile,
        )?;
        wait_port(cloud_addr, Duration::from_secs(10), &mut cloud).await?;
        let rx = Receiver::new();
        let recv_task = mqtt_receiver(cloud_addr, rx.clone(), tag).await?;

        // The local broker: Debian's defaults plus a password file, persistence on, and a
        // QoS 1 bridge of the event topics to the cloud.
        let pwfile = dir.join("passwd");
        std::fs::write(&pwfile, "")?;
        for i in 0..sensors {
            let st = Command::new("mosquitto_passwd")
                .arg("-b")
                .arg(&pwfile)
                .arg(format!("s{i}"))
                .arg(format!("pw{i}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?;
            if !st.success() {
                bail!("mosquitto_passwd failed");
            }
        }
        let local_conf = dir.join("local.conf");
        std::fs::write(
            &local_conf,
            format!(
                "user root\nlistener {port} 127.0.0.1\nallow_anonymous false\npassword_file {pw}\n\
                 persistence true\npersistence_location {persist}/\nmax_queued_messages 0\n\
                 log_dest stderr\nlog_type error\nlog_type warning\n\n\
                 connection cloud\naddress 127.0.0.1:{cloud}\nbridge_protocol_version mqttv311\n\
                 cleansession false\nclientid {tag}-bridge\nnotifications false\n\
                 topic /devices/+/event out 1\n",
                port = local.port(),
                pw = pwfile.display(),
                persist = dir.join("persist").display(),
                cloud = cloud_addr.port(),
            ),
        )?;
        let mut broker = Proc::spawn(
            &format!("{tag}-local"),
            Command::new(&args.mosquitto_bin).arg("-c").arg(&local_conf),
            &dir.join("local.log"),
            &args.pidfile,
        )?;
        wait_port(local, Duration::from_secs(10), &mut broker).await?;
        Ok(MosquittoUnderTest {
            broker,
            cloud,
            rx,
            recv_task,
            local,
            dir,
            sensors,
        })
    }

    async fn fleet(&self, inflight: u16) -> Result<Fleet> {
        let logins: Vec<Login> = (0..self.sensors)
            .map(|i| Login {
                user: format!("s{i}"),
                pass: format!("pw{i}"),
                topic: format!("/devices/s{i}/event"),
            })
            .collect();
        Fleet::connect(self.local, &logins, inflight).await
    }

    async fn stop(mut self) {
        self.broker.stop(Duration::from_secs(5));
        self.cloud.stop(Duration::from_secs(5));
        self.recv_task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn run_mosquitto(args: &Args, plan: &Plan) -> Result<Figures> {
    let mut f = Figures::default();
    let m = MosquittoUnderTest::start(args, plan.sensors, "mosquitto").await?;
    let fleet = m.fleet(plan.inflight).await?;
    let r = measure(plan, m.broker.pid(), &fleet, &m.rx, &mut f).await;
    fleet.close().await;
    m.stop().await;
    r.map(|_| f)
}

// ------------------------------------------------------------------------------------------
// The home profile
// ------------------------------------------------------------------------------------------

/// One system in the home profile: its broker's PID, its sensors and its arrivals.
struct HomeSystem {
    name: String,
    pid: u32,
    fleet: Fleet,
    rx: Arc<Receiver>,
}

/// Tens of sensors, one event every few seconds each: every system under test at once, each
/// with its own sensors, for the same minutes. Reports per event what a Pi pays at home: CPU,
/// bytes written to the card, wake-ups; and p99 and RSS.
async fn run_home(args: &Args, plan: &Plan, secs: u64) -> Result<Vec<(String, Figures)>> {
    let sensors = args.home_sensors.max(1);
    let rate = sensors as f64 / args.home_period.max(0.01);
    let mut hubs = Vec::new();
    let mut mosq = None;
    let mut systems = Vec::new();
    let mut bins = vec![("modehub".to_string(), args.hub_bin.clone())];
    if let Some(b) = &args.baseline {
        bins.push((format!("modehub@{}", args.baseline_name), b.clone()));
    }
    let result = async {
        for (i, (name, bin)) in bins.iter().enumerate() {
            let h = HubUnderTest::start(args, bin, sensors, &format!("home{i}")).await?;
            let fleet = h.fleet(sensors, 10).await?;
            systems.push(HomeSystem {
                name: name.clone(),
                pid: h.hub.pid(),
                fleet,
                rx: h.rx.clone(),
            });
            hubs.push(h);
        }
        if !args.no_mosquitto {
            let m = MosquittoUnderTest::start(args, sensors, "home-mosquitto").await?;
            let fleet = m.fleet(10).await?;
            systems.push(HomeSystem {
                name: "mosquitto".into(),
                pid: m.broker.pid(),
                fleet,
                rx: m.rx.clone(),
            });
            mosq = Some(m);
        }
        // Warm-up: one event from every sensor, end to end, on every system.
        for s in &systems {
            let c0 = s.rx.count.load(Relaxed);
            for (i, c) in s.fleet.clients.iter().enumerate() {
                c.publish(
                    s.fleet.topics[i].as_str(),
                    QoS::AtLeastOnce,
                    false,
                    payload(plan.payload, i, 0),
                )
                .await?;
            }
            if s.rx
                .wait_for(c0 + sensors as u64, Duration::from_secs(60))
                .await
                .is_none()
            {
                bail!("home: {}'s warm-up events did not reach the cloud", s.name);
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut starts = Vec::new();
        for s in &systems {
            s.rx.hist.lock().unwrap().reset();
            s.rx.record_from_ns.store(now_ns(), Relaxed);
            s.rx.recording.store(true, Relaxed);
            starts.push((sample(s.pid)?, s.rx.count.load(Relaxed)));
        }
        let runs: Vec<_> = systems
            .iter()
            .map(|s| tokio::spawn(s.fleet.fixed_rate(rate, secs as f64, plan.payload)))
            .collect();
        let mut sent = Vec::new();
        for r in runs {
            sent.push(r.await.unwrap_or(0));
        }
        let mut out = Vec::new();
        for ((s, (s0, c0)), sent) in systems.iter().zip(&starts).zip(&sent) {
            let got = s.rx.wait_for(c0 + sent, Duration::from_secs(60)).await;
            s.rx.recording.store(false, Relaxed);
            if got.is_none() {
                eprintln!(
                    "  warning: home: {}: {} of {sent} events arrived",
                    s.name,
                    s.rx.count.load(Relaxed) - c0
                );
            }
            let s1 = sample(s.pid)?;
            let n = (*sent).max(1) as f64;
            let h = s.rx.hist.lock().unwrap().clone();
            let mut f = Figures::default();
            f.set("home_events", n);
            f.set(
                "home_cpu_ms_per_event",
                (s1.cpu_ticks - s0.cpu_ticks) as f64 / clk_tck() * 1000.0 / n,
            );
            let bytes = (s1.write_bytes - s0.write_bytes) as f64 / n;
            f.set("home_disk_per_event", bytes);
            f.set("home_disk_mb_per_day", bytes * rate * 86_400.0 / 1e6);
            f.set(
                "home_wakeups_per_event",
                s1.switches.saturating_sub(s0.switches) as f64 / n,
            );
            f.set("home_p50_ms", h.value_at_quantile(0.50) as f64 / 1000.0);
            f.set("home_p99_ms", h.value_at_quantile(0.99) as f64 / 1000.0);
            f.set("home_rss_mb", s1.rss_kb as f64 / 1024.0);
            out.push((s.name.clone(), f));
        }
        anyhow::Ok(out)
    }
    .await;
    for s in systems {
        s.fleet.close().await;
    }
    for h in hubs {
        h.stop().await;
    }
    if let Some(m) = mosq {
        m.stop().await;
    }
    result
}

// ------------------------------------------------------------------------------------------
// Ceilings
// ------------------------------------------------------------------------------------------

/// The given binary, or this one in `mode`.
fn self_mode(bin: &Option<PathBuf>, mode: &str) -> Result<Command> {
    Ok(match bin {
        Some(b) => Command::new(b),
        None => {
            let mut c = Command::new(std::env::current_exe().context("finding this binary")?);
            c.arg(mode);
            c
        }
    })
}

async fn run_rumqttd(args: &Args, plan: &Plan) -> Result<Figures> {
    let mut f = Figures::default();
    let dir = args.work.join("rumqttd");
    std::fs::create_dir_all(&dir)?;
    let addr = free_port()?;
    let mut cmd = self_mode(&args.rumqttd_bin, "rumqttd-alone")?;
    cmd.arg(addr.to_string());
    for i in 0..plan.sensors {
        cmd.arg(format!("s{i}:pw{i}"));
    }
    let mut broker = Proc::spawn(
        "rumqttd-alone",
        &mut cmd,
        &dir.join("rumqttd.log"),
        &args.pidfile,
    )?;
    wait_port(addr, Duration::from_secs(10), &mut broker).await?;
    let logins: Vec<Login> = (0..plan.sensors)
        .map(|i| Login {
            user: format!("s{i}"),
            pass: format!("pw{i}"),
            topic: format!("/devices/s{i}/event"),
        })
        .collect();
    let fleet = Fleet::connect(addr, &logins, plan.inflight).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    f.set("rss_idle_mb", sample(broker.pid())?.rss_kb as f64 / 1024.0);
    let per = plan.messages / plan.sensors;
    let total = (per * plan.sensors) as u64;
    let s0 = sample(broker.pid())?;
    let started = Instant::now();
    let (_, acked) = tokio::join!(
        fleet.full_speed(per, plan.payload),
        fleet.wait_acked(total, Duration::from_secs(300))
    );
    let s1 = sample(broker.pid())?;
    if let Some(t) = acked {
        f.set("ingest_per_s", total as f64 / (t - started).as_secs_f64());
    }
    f.set(
        "cpu_per_100k",
        (s1.cpu_ticks - s0.cpu_ticks) as f64 / clk_tck() / total as f64 * 100_000.0,
    );
    f.set("rss_peak_mb", s1.hwm_kb as f64 / 1024.0);
    fleet.close().await;
    broker.stop(Duration::from_secs(2));
    Ok(f)
}

async fn run_outbox(args: &Args, plan: &Plan) -> Result<Figures> {
    let mut f = Figures::default();
    let dir = args.work.join("outbox-alone");
    let _ = std::fs::remove_dir_all(&dir);
    // The body the hub stores for our events: the eventData object (payload minus envelope).
    let body = plan.payload.saturating_sub(38);
    let out = self_mode(&args.outbox_bin, "outbox-alone")?
        .arg(&dir)
        .arg(plan.messages.to_string())
        .arg(plan.sensors.to_string())
        .arg(plan.inflight.to_string())
        .arg(body.to_string())
        .output()
        .context("running outbox_alone")?;
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() {
        bail!(
            "outbox_alone failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    f.set(
        "ingest_per_s",
        v["appends_per_s"].as_f64().unwrap_or(f64::NAN),
    );
    f.set(
        "disk_per_event",
        v["write_bytes_per_row"].as_f64().unwrap_or(f64::NAN),
    );
    f.set(
        "rows_per_commit",
        v["rows_per_commit"].as_f64().unwrap_or(f64::NAN),
    );
    Ok(f)
}

// ------------------------------------------------------------------------------------------
// The table
// ------------------------------------------------------------------------------------------

fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        "–".into()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else if v.abs() >= 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b != 0.0 {
        format!("{:.2}", a / b)
    } else {
        "–".into()
    }
}

const FIGURES: &[(&str, &str, bool)] = &[
    // key, label, higher is better
    ("ingest_per_s", "local ingest, PUBACKs/s (full speed)", true),
    ("e2e_per_s", "end-to-end delivered/s (full speed)", true),
    (
        "lat_p50_ms",
        "latency p50, ms (publish -> cloud, fixed rate)",
        false,
    ),
    ("lat_p99_ms", "latency p99, ms", false),
    ("lat_p999_ms", "latency p99.9, ms", false),
    ("lat_max_ms", "latency max, ms", false),
    ("rss_idle_mb", "RSS idle, MB (sensors connected)", false),
    ("rss_peak_mb", "RSS peak (VmHWM), MB", false),
    ("cpu_per_100k", "CPU s per 100k msgs (full speed)", false),
    (
        "cpu_per_100k_rate",
        "CPU s per 100k msgs (fixed rate)",
        false,
    ),
    (
        "wakeups_per_event_rate",
        "wake-ups (context switches) per event (fixed rate)",
        false,
    ),
    (
        "disk_per_event",
        "disk bytes written per event (full speed)",
        false,
    ),
    (
        "disk_per_event_rate",
        "disk bytes written per event (fixed rate)",
        false,
    ),
    (
        "wal_mb_end",
        "SQLite WAL file at the end, MB (hub only)",
        false,
    ),
];

/// The home profile's figures (key, label).
const HOME_FIGURES: &[(&str, &str)] = &[
    ("home_cpu_ms_per_event", "CPU ms per event"),
    ("home_disk_per_event", "disk bytes written per event"),
    ("home_disk_mb_per_day", "disk MB written per day"),
    (
        "home_wakeups_per_event",
        "wake-ups (context switches) per event",
    ),
    ("home_p50_ms", "latency p50, ms (publish -> cloud)"),
    ("home_p99_ms", "latency p99, ms"),
    ("home_rss_mb", "RSS at the end, MB"),
];

fn home_table(s: &mut String, args: &Args, res: &Results, hub: &str) {
    let hub_home = format!("{hub}/home");
    let repeats = res.runs.get(&hub_home).map(|r| r.len()).unwrap_or(0);
    if repeats == 0 {
        return;
    }
    let base = format!("modehub@{}/home", args.baseline_name);
    let has_base = args.baseline.is_some();
    let _ = writeln!(
        s,
        "\n### Home profile (medians of {repeats} runs; {} sensors, one event every {} s each = {:.1} events/s; all systems at once)\n",
        args.home_sensors,
        args.home_period,
        args.home_sensors as f64 / args.home_period
    );
    if has_base {
        let _ = writeln!(s, "| figure | modehub | modehub@{} | mosquitto+bridge | modehub / mosquitto | modehub / modehub@{} |", args.baseline_name, args.baseline_name);
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
    } else {
        let _ = writeln!(
            s,
            "| figure | modehub | mosquitto+bridge | modehub / mosquitto |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|");
    }
    for (k, label) in HOME_FIGURES {
        let a = res.med(&hub_home, k);
        let m = res.med("mosquitto/home", k);
        if has_base {
            let b = res.med(&base, k);
            let _ = writeln!(
                s,
                "| {label} | {} | {} | {} | {} | {} |",
                fmt_num(a),
                fmt_num(b),
                fmt_num(m),
                ratio(a, m),
                ratio(a, b)
            );
        } else {
            let _ = writeln!(
                s,
                "| {label} | {} | {} | {} |",
                fmt_num(a),
                fmt_num(m),
                ratio(a, m)
            );
        }
    }
}

fn table(args: &Args, plan: &Plan, res: &Results, hub: &str, scale: &[usize]) -> String {
    let mut s = String::new();
    let has_base = args.baseline.is_some();
    let base = format!("modehub@{}", args.baseline_name);
    let repeats = res.runs.get(hub).map(|r| r.len()).unwrap_or(0);
    let _ = writeln!(
        s,
        "\n### modehub vs Mosquitto bridge (medians of {repeats} interleaved runs; {} sensors, {}-byte QoS 1 events, {} msgs full speed, {} msg/s for {} s)\n",
        plan.sensors, plan.payload, plan.messages, plan.rate, plan.latency_secs
    );
    if has_base {
        let _ = writeln!(s, "| figure | modehub | {base} | mosquitto+bridge | modehub / mosquitto | modehub / {base} |");
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
    } else {
        let _ = writeln!(
            s,
            "| figure | modehub | mosquitto+bridge | modehub / mosquitto |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|");
    }
    for (k, label, _) in FIGURES {
        let a = res.med(hub, k);
        let m = res.med("mosquitto", k);
        if has_base {
            let b = res.med(&base, k);
            let _ = writeln!(
                s,
                "| {label} | {} | {} | {} | {} | {} |",
                fmt_num(a),
                fmt_num(b),
                fmt_num(m),
                ratio(a, m),
                ratio(a, b)
            );
        } else {
            let _ = writeln!(
                s,
                "| {label} | {} | {} | {} |",
                fmt_num(a),
                fmt_num(m),
                ratio(a, m)
            );
        }
    }
    let _ = writeln!(s, "\n### Ceilings (same load, same disk)\n");
    let _ = writeln!(s, "| figure | modehub | ceiling | modehub / ceiling |");
    let _ = writeln!(s, "|---|---:|---:|---:|");
    // (figure, modehub's key, ceiling run, ceiling's key)
    let ceilings = [
        (
            "local ingest vs rumqttd alone, PUBACKs/s",
            "ingest_per_s",
            "rumqttd",
            "ingest_per_s",
        ),
        (
            "local ingest vs outbox append alone, rows/s",
            "ingest_per_s",
            "outbox",
            "ingest_per_s",
        ),
        (
            "end-to-end vs outbox append alone",
            "e2e_per_s",
            "outbox",
            "ingest_per_s",
        ),
        (
            "RSS idle vs rumqttd alone, MB",
            "rss_idle_mb",
            "rumqttd",
            "rss_idle_mb",
        ),
        (
            "CPU s per 100k vs rumqttd alone",
            "cpu_per_100k",
            "rumqttd",
            "cpu_per_100k",
        ),
        (
            "disk bytes per event vs outbox alone",
            "disk_per_event",
            "outbox",
            "disk_per_event",
        ),
    ];
    for (label, key, run, ceiling_key) in ceilings {
        let (a, c) = (res.med(hub, key), res.med(run, ceiling_key));
        let _ = writeln!(
            s,
            "| {label} | {} | {} | {} |",
            fmt_num(a),
            fmt_num(c),
            ratio(a, c)
        );
    }
    let _ = writeln!(
        s,
        "\noutbox alone: {} rows per commit (median).",
        fmt_num(res.med("outbox", "rows_per_commit"))
    );

    home_table(&mut s, args, res, hub);
    let _ = writeln!(
        s,
        "\n### Memory per configured device (modehub, one upstream session each; idle)\n"
    );
    let _ = writeln!(s, "| devices | startup s | RSS, no clients MB | RSS, {} sensors connected MB | KB per device above 1 device | modehub@{b}: RSS, no clients MB | modehub@{b}: KB per device |", plan.sensors, b = args.baseline_name);
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|");
    let per_device = |prefix: &str, d: usize| {
        let rss = res.med(&format!("{prefix}-{d}"), "rss_idle_no_clients_mb");
        let base = res.med(&format!("{prefix}-1"), "rss_idle_no_clients_mb");
        let per = if d > 1 {
            fmt_num((rss - base) * 1024.0 / (d - 1) as f64)
        } else {
            "–".into()
        };
        (fmt_num(rss), per)
    };
    for d in std::iter::once(&1).chain(scale.iter()) {
        let sys = format!("scale-{d}");
        let (rss, per) = per_device("scale", *d);
        let (b_rss, b_per) = per_device("base-scale", *d);
        let _ = writeln!(
            s,
            "| {d} | {} | {rss} | {} | {per} | {b_rss} | {b_per} |",
            fmt_num(res.med(&sys, "startup_s")),
            fmt_num(res.med(&sys, "rss_idle_mb")),
        );
    }
    goals_table(&mut s, args, res, hub, scale);
    let _ = writeln!(s, "\n### Every run (for the spread)\n");
    for (sys, runs) in &res.runs {
        let _ = writeln!(s, "- {sys} ({} runs)", runs.len());
        for k in [
            "ingest_per_s",
            "e2e_per_s",
            "lat_p99_ms",
            "rss_idle_mb",
            "cpu_per_100k",
            "disk_per_event",
            "rss_idle_no_clients_mb",
            "home_cpu_ms_per_event",
            "home_disk_per_event",
            "home_wakeups_per_event",
            "home_p99_ms",
        ] {
            let v = res.all(sys, k);
            if v.iter().any(|x| x.is_finite()) {
                let list: Vec<String> = v.iter().map(|x| fmt_num(*x)).collect();
                let _ = writeln!(s, "  - {k}: {}", list.join(", "));
            }
        }
    }
    s
}

/// Issue 12's goals, each as (label, goal, value of a system, x of goal): the figure is computed
/// for modehub and, with `--baseline`, for the baseline in the same runs. "x of goal" is the
/// value divided by the goal; a "<=" goal is met at <= 1, a ">=" goal at >= 1.
fn goals_table(s: &mut String, args: &Args, res: &Results, hub: &str, scale: &[usize]) {
    let base = format!("modehub@{}", args.baseline_name);
    let has_base = args.baseline.is_some();
    // (label, goal as text, higher is better, goal value, figure of a system prefix ("" or "base-"))
    type Fig<'a> = Box<dyn Fn(&str) -> f64 + 'a>;
    let sys_name = |p: &str| {
        if p.is_empty() {
            hub.to_string()
        } else {
            base.clone()
        }
    };
    let largest = scale.iter().copied().max().unwrap_or(1);
    let per_device = move |p: &str| {
        let prefix = if p.is_empty() { "scale" } else { "base-scale" };
        let rss = res.med(&format!("{prefix}-{largest}"), "rss_idle_no_clients_mb");
        let one = res.med(&format!("{prefix}-1"), "rss_idle_no_clients_mb");
        if largest > 1 {
            (rss - one) * 1024.0 / (largest - 1) as f64
        } else {
            f64::NAN
        }
    };
    let rows: Vec<(String, &str, bool, f64, Fig)> = vec![
        (
            "local ingest vs rumqttd alone".into(),
            ">= 0.8x",
            true,
            0.8,
            Box::new(|p| {
                res.med(&sys_name(p), "ingest_per_s") / res.med("rumqttd", "ingest_per_s")
            }),
        ),
        (
            "end-to-end vs Mosquitto bridge".into(),
            ">= 1.5x",
            true,
            1.5,
            Box::new(|p| res.med(&sys_name(p), "e2e_per_s") / res.med("mosquitto", "e2e_per_s")),
        ),
        (
            "p99 publish -> cloud at the fixed rate vs Mosquitto".into(),
            "<= 1.5x",
            false,
            1.5,
            Box::new(|p| res.med(&sys_name(p), "lat_p99_ms") / res.med("mosquitto", "lat_p99_ms")),
        ),
        (
            "CPU per event at the fixed rate vs Mosquitto".into(),
            "<= 2x",
            false,
            2.0,
            Box::new(|p| {
                res.med(&sys_name(p), "cpu_per_100k_rate")
                    / res.med("mosquitto", "cpu_per_100k_rate")
            }),
        ),
        (
            "disk bytes per event at full speed vs outbox alone".into(),
            "<= 2x",
            false,
            2.0,
            Box::new(|p| {
                res.med(&sys_name(p), "disk_per_event") / res.med("outbox", "disk_per_event")
            }),
        ),
        (
            "disk bytes per event at the fixed rate".into(),
            "<= 1,000 B",
            false,
            1000.0,
            Box::new(|p| res.med(&sys_name(p), "disk_per_event_rate")),
        ),
        (
            format!("RSS per configured device (1 -> {largest} devices), KB"),
            "<= 16 KB",
            false,
            16.0,
            Box::new(per_device),
        ),
        (
            "home: disk bytes per event".into(),
            "<= 1,000 B",
            false,
            1000.0,
            Box::new(|p| res.med(&format!("{}/home", sys_name(p)), "home_disk_per_event")),
        ),
        (
            "home: CPU per event vs Mosquitto".into(),
            "<= 2x",
            false,
            2.0,
            Box::new(|p| {
                res.med(&format!("{}/home", sys_name(p)), "home_cpu_ms_per_event")
                    / res.med("mosquitto/home", "home_cpu_ms_per_event")
            }),
        ),
    ];
    let _ = writeln!(
        s,
        "\n### Against the goals (issue 12; x of goal = value / goal: <= 1 meets a \"<=\" goal, >= 1 a \">=\" goal)\n"
    );
    if has_base {
        let _ = writeln!(
            s,
            "| figure | goal | {base} | modehub | modehub, x of goal | met? |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---|");
    } else {
        let _ = writeln!(s, "| figure | goal | modehub | modehub, x of goal | met? |");
        let _ = writeln!(s, "|---|---|---:|---:|---|");
    }
    for (label, goal_text, higher, goal, fig) in rows {
        let v = fig("");
        let x = v / goal;
        let met = if !x.is_finite() {
            "–"
        } else if (higher && x >= 1.0) || (!higher && x <= 1.0) {
            "yes"
        } else {
            "no"
        };
        if has_base {
            let _ = writeln!(
                s,
                "| {label} | {goal_text} | {} | {} | {} | {met} |",
                fmt_num(fig("base-")),
                fmt_num(v),
                fmt_num(x)
            );
        } else {
            let _ = writeln!(
                s,
                "| {label} | {goal_text} | {} | {} | {met} |",
                fmt_num(v),
                fmt_num(x)
            );
        }
    }
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).ok();
    let _ = write!(
        s,
        "\nbinary size: modehub {} B",
        size(&args.hub_bin).map_or("?".into(), |n| n.to_string())
    );
    if let Some(b) = &args.baseline {
        let _ = write!(
            s,
            ", {base} {} B",
            size(b).map_or("?".into(), |n| n.to_string())
        );
    }
    let _ = writeln!(s);
}

// ------------------------------------------------------------------------------------------

pub fn main(argv: Vec<String>) -> Result<()> {
    let args = Args::parse_from(std::iter::once("modehub-bench compare".to_string()).chain(argv));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let plan = Plan {
        sensors: args.sensors.max(1),
        payload: args.payload,
        inflight: args.inflight,
        messages: args
            .messages
            .unwrap_or(if args.quick { 4_000 } else { 40_000 }),
        rate: args.rate,
        latency_secs: args.latency_secs.unwrap_or(if args.quick { 3 } else { 8 }),
    };
    let repeats = args.repeats.unwrap_or(if args.quick { 1 } else { 5 });
    let scale = args.scale.clone().unwrap_or_else(|| vec![20, 100, 1000]);
    let home_secs = args.home_secs.unwrap_or(if args.quick { 60 } else { 300 });
    std::fs::create_dir_all(&args.work)?;
    let ceilings = [&args.rumqttd_bin, &args.outbox_bin];
    for bin in std::iter::once(&args.hub_bin).chain(ceilings.into_iter().flatten()) {
        if !bin.exists() {
            bail!(
                "{} not found: build it first (benches/compare.sh does)",
                bin.display()
            );
        }
    }
    let hub = "modehub".to_string();
    let base = format!("modehub@{}", args.baseline_name);
    let mut res = Results::default();
    let t0 = Instant::now();
    for r in 0..repeats {
        eprintln!(
            "== repeat {}/{repeats} ({:.0} s so far)",
            r + 1,
            t0.elapsed().as_secs_f64()
        );
        // Alternate which system goes first, so drift on the machine hits both alike.
        let mut order: Vec<&str> = vec!["modehub", "base", "mosquitto", "rumqttd", "outbox"];
        if r % 2 == 1 {
            order.swap(0, 2);
        }
        let wanted = |s: &str| args.only.as_ref().is_none_or(|o| o.iter().any(|x| x == s));
        for sys in order.into_iter().filter(|s| wanted(s)) {
            let out = match sys {
                "modehub" => Some((
                    hub.clone(),
                    run_modehub(&args, &plan, &args.hub_bin, plan.sensors, "modehub").await,
                )),
                "base" => match &args.baseline {
                    Some(b) => Some((
                        base.clone(),
                        run_modehub(&args, &plan, b, plan.sensors, "baseline").await,
                    )),
                    None => None,
                },
                "mosquitto" if !args.no_mosquitto => {
                    Some(("mosquitto".into(), run_mosquitto(&args, &plan).await))
                }
                "rumqttd" => Some(("rumqttd".into(), run_rumqttd(&args, &plan).await)),
                "outbox" => Some(("outbox".into(), run_outbox(&args, &plan).await)),
                _ => None,
            };
            if let Some((name, r)) = out {
                match r {
                    Ok(f) => {
                        eprintln!(
                            "  {name:<16} ingest {:>8}/s  e2e {:>8}/s  p99 {:>7} ms  idle {:>6} MB",
                            fmt_num(f.0.get("ingest_per_s").copied().unwrap_or(f64::NAN)),
                            fmt_num(f.0.get("e2e_per_s").copied().unwrap_or(f64::NAN)),
                            fmt_num(f.0.get("lat_p99_ms").copied().unwrap_or(f64::NAN)),
                            fmt_num(f.0.get("rss_idle_mb").copied().unwrap_or(f64::NAN))
                        );
                        res.add(&name, f);
                    }
                    Err(e) => eprintln!("  {name}: run failed: {e:#}"),
                }
            }
        }
        if wanted("scale") {
            let mut bins = vec![("scale", &args.hub_bin)];
            if let Some(b) = &args.baseline {
                bins.push(("base-scale", b));
            }
            for (d, (prefix, bin)) in std::iter::once(&1)
                .chain(scale.iter())
                .flat_map(|d| bins.iter().map(move |b| (d, b)))
            {
                let name = format!("{prefix}-{d}");
                match run_scale(&args, &plan, bin, *d).await {
                    Ok(f) => {
                        eprintln!(
                            "  {name:<16} startup {:>6} s  RSS {:>6} MB (no clients), {:>6} MB (sensors)",
                            fmt_num(f.0.get("startup_s").copied().unwrap_or(f64::NAN)),
                            fmt_num(f.0.get("rss_idle_no_clients_mb").copied().unwrap_or(f64::NAN)),
                            fmt_num(f.0.get("rss_idle_mb").copied().unwrap_or(f64::NAN)),
                        );
                        res.add(&name, f);
                    }
                    Err(e) => eprintln!("  {name}: run failed: {e:#}"),
                }
            }
        }
        if wanted("home") {
            eprintln!("  home profile: {home_secs} s");
            match run_home(&args, &plan, home_secs).await {
                Ok(all) => {
                    for (name, f) in all {
                        eprintln!(
                            "  {:<16} CPU {:>6} ms/event  disk {:>7} B/event  wake-ups {:>6}/event  p99 {:>7} ms",
                            format!("{name}/home"),
                            fmt_num(f.0.get("home_cpu_ms_per_event").copied().unwrap_or(f64::NAN)),
                            fmt_num(f.0.get("home_disk_per_event").copied().unwrap_or(f64::NAN)),
                            fmt_num(f.0.get("home_wakeups_per_event").copied().unwrap_or(f64::NAN)),
                            fmt_num(f.0.get("home_p99_ms").copied().unwrap_or(f64::NAN)),
                        );
                        res.add(&format!("{name}/home"), f);
                    }
                }
                Err(e) => eprintln!("  home profile: run failed: {e:#}"),
            }
        }
    }
    let t = table(&args, &plan, &res, &hub, &scale);
    println!("{t}");
    eprintln!("(total {:.0} s)", t0.elapsed().as_secs_f64());
    if let Some(out) = &args.out {
        std::fs::write(out, &t)?;
    }
    Ok(())
}
