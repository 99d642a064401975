//! Client compatibility (issue 10 item 4): the clients people actually flash or script, against
//! the real `modehub` binary and an in-process MODE emulator.
//!
//! Each client is an *agent*: a stock library driven line by line (tests/compat/*_agent.*; the
//! rumqttc one lives below), so the scenario is written once, here, and the clients only use
//! their ordinary API (their own keepalive, reconnect and QoS 1 resend). Between every agent and
//! the hub sits a small TCP proxy of this test, which counts the packet types the client sends
//! (to show who publishes without PINGREQ) and can swallow the hub's answers and cut the
//! connection, to leave a QoS 1 publish in flight across a reconnect.
//!
//! Scenario per client, twice: logged in by `name` + `local_password` (the full run) and by
//! MODE ID + API key (login, QoS 0/1 events, a command):
//! subscribe to its command and kv topics, publish QoS 0 and QoS 1 events (both reach MODE),
//! get a kv reload and a live kv set, publish a kv set (reaches MODE), get a command sent through
//! the emulator, publish every 0.4 s with keepalive 2 s for 6 s (never cut), publish to a topic
//! it may not use (acknowledged and dropped, the sensor keeps working), and resend an in-flight
//! QoS 1 publish after a cut (acknowledged, reaches MODE).
//!
//! The stock clients come from `.ci/run` (pip `paho-mqtt`, `npm ci` in tests/compat/, apt
//! `mosquitto-clients`). Without them the test says which are missing and skips them, unless
//! `MODEHUB_COMPAT_REQUIRED=1` (set by `.ci/run`), where a missing client is a failure.

use crate::common::*;
use futures_util::FutureExt;
use modehub::emulator::{Emulator, EmulatorHandle};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, watch};

/// How long any one expected thing may take before the step fails (generous: a shared CI box).
const STEP: Duration = Duration::from_secs(30);
/// How often the fast phase publishes: well inside every client's keepalive.
const FAST_EVERY: Duration = Duration::from_millis(400);

fn compat_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/compat")
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Client {
    Paho,
    MqttJs,
    Mosquitto,
    Rumqttc,
}

impl Client {
    const ALL: [Client; 4] = [
        Client::Paho,
        Client::MqttJs,
        Client::Mosquitto,
        Client::Rumqttc,
    ];

    fn name(self) -> &'static str {
        match self {
            Client::Paho => "paho-mqtt (Python)",
            Client::MqttJs => "MQTT.js",
            Client::Mosquitto => "mosquitto_pub/mosquitto_sub",
            Client::Rumqttc => "rumqttc",
        }
    }

    /// The keepalive the agent asks for, seconds: 2, or the least the client accepts
    /// (mosquitto_pub refuses less than 5).
    fn keepalive(self) -> u64 {
        match self {
            Client::Mosquitto => 5,
            _ => 2,
        }
    }

    /// None when the client is installed, else what is missing.
    fn missing(self) -> Option<String> {
        let ok = |cmd: &mut std::process::Command| {
            cmd.stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        let (present, what) = match self {
            Client::Paho => (
                ok(std::process::Command::new("python3").args(["-c", "import paho.mqtt.client"])),
                "python3 with paho-mqtt (pip install paho-mqtt)",
            ),
            Client::MqttJs => (
                ok(std::process::Command::new("node")
                    .current_dir(compat_dir())
                    .args(["-e", "require('mqtt')"])),
                "node with MQTT.js (npm ci in tests/compat)",
            ),
            Client::Mosquitto => (
                ok(std::process::Command::new("python3").arg("--version"))
                    && ok(std::process::Command::new("which").arg("mosquitto_pub"))
                    && ok(std::process::Command::new("which").arg("mosquitto_sub")),
                "mosquitto-clients (apt-get install mosquitto-clients) and python3",
            ),
            Client::Rumqttc => (true, ""),
        };
        (!present).then(|| what.to_string())
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy

/// A TCP proxy in front of the hub: counts the client's packet types, can swallow what the hub
/// sends, and can cut every connection.
struct Proxy {
    addr: SocketAddr,
    /// While set, bytes from the hub are read and dropped (a PUBACK that never arrives).
    swallow: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
    /// Packets the clients sent, by MQTT packet type (1 = CONNECT, 3 = PUBLISH, 12 = PINGREQ).
    sent: Arc<Mutex<HashMap<u8, u64>>>,
}

impl Proxy {
    async fn start(hub: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let swallow = Arc::new(AtomicBool::new(false));
        let (cut, _) = watch::channel(0u64);
        let sent = Arc::new(Mutex::new(HashMap::new()));
        let (s, c, n) = (swallow.clone(), cut.clone(), sent.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = TcpStream::connect(hub).await else {
                    continue;
                };
                tokio::spawn(pump_pair(
                    client,
                    upstream,
                    s.clone(),
                    c.subscribe(),
                    n.clone(),
                ));
            }
        });
        Proxy {
            addr,
            swallow,
            cut,
            sent,
        }
    }

    fn count(&self, kind: u8) -> u64 {
        self.sent.lock().unwrap().get(&kind).copied().unwrap_or(0)
    }

    /// Closes every open connection and lets answers through again.
    fn cut_all(&self) {
        self.cut.send_modify(|g| *g += 1);
        self.swallow.store(false, Relaxed);
    }
}

async fn pump_pair(
    client: TcpStream,
    hub: TcpStream,
    swallow: Arc<AtomicBool>,
    mut cut: watch::Receiver<u64>,
    sent: Arc<Mutex<HashMap<u8, u64>>>,
) {
    let (mut cr, mut cw) = client.into_split();
    let (mut hr, mut hw) = hub.into_split();
    let up = async {
        let mut parser = PacketTypes::default();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            for kind in parser.feed(&buf[..n]) {
                *sent.lock().unwrap().entry(kind).or_default() += 1;
            }
            if hw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match hr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if !swallow.load(Relaxed) && cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = cut.changed() => {}
    }
}

/// Splits a client's byte stream into MQTT packets and yields their types.
#[derive(Default)]
struct PacketTypes {
    /// Header bytes of the packet being read: type byte, then remaining-length bytes.
    header: Vec<u8>,
    /// Body bytes still to skip.
    skip: usize,
}

impl PacketTypes {
    fn feed(&mut self, mut bytes: &[u8]) -> Vec<u8> {
        let mut kinds = Vec::new();
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            self.header.push(bytes[0]);
            bytes = &bytes[1..];
            let len_bytes = &self.header[1..];
            if let Some(last) = len_bytes.last() {
                if last & 0x80 == 0 || len_bytes.len() == 4 {
                    let len = len_bytes.iter().enumerate().fold(0usize, |acc, (i, b)| {
                        acc | (((b & 0x7f) as usize) << (7 * i))
                    });
                    kinds.push(self.header[0] >> 4);
                    self.header.clear();
                    self.skip = len;
                }
            }
        }
        kinds
    }
}

// ---------------------------------------------------------------------------------------------
// Agents

/// One client under test: commands in, event lines out (the protocol of tests/compat/*_agent.*).
struct Agent {
    client: Client,
    label: String,
    input: AgentInput,
    lines: mpsc::UnboundedReceiver<String>,
    /// Lines received and not yet taken by an [`Agent::expect`].
    backlog: std::collections::VecDeque<String>,
    /// Every line seen, for the failure message.
    transcript: Vec<String>,
    _child: Option<Child>,
}

enum AgentInput {
    Process(ChildStdin),
    InProcess(mpsc::UnboundedSender<String>),
}

impl Agent {
    async fn start(client: Client, addr: SocketAddr, user: &str, pass: &str, label: &str) -> Agent {
        let client_id = format!("compat-{}-{}", user, fastrand::u32(..));
        let args = [
            addr.ip().to_string(),
            addr.port().to_string(),
            user.to_string(),
            pass.to_string(),
            client_id,
            client.keepalive().to_string(),
        ];
        let (tx, lines) = mpsc::unbounded_channel();
        let (input, child) = match client {
            Client::Rumqttc => {
                let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
                tokio::spawn(rumqttc_agent(args, cmd_rx, tx));
                (AgentInput::InProcess(cmd_tx), None)
            }
            _ => {
                let mut cmd = match client {
                    Client::Paho => {
                        let mut c = Command::new("python3");
                        c.arg("paho_agent.py");
                        c
                    }
                    Client::MqttJs => {
                        let mut c = Command::new("node");
                        c.arg("mqttjs_agent.js");
                        c
                    }
                    _ => {
                        let mut c = Command::new("python3");
                        c.arg("mosquitto_agent.py");
                        c
                    }
                };
                let mut child = cmd
                    .args(&args)
                    .current_dir(compat_dir())
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
                    .unwrap_or_else(|e| panic!("start the {} agent: {e}", client.name()));
                for (stream, prefix) in [
                    (
                        Box::new(child.stdout.take().unwrap())
                            as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                        "",
                    ),
                    (Box::new(child.stderr.take().unwrap()), "stderr: "),
                ] {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let mut r = BufReader::new(stream).lines();
                        while let Ok(Some(l)) = r.next_line().await {
                            let _ = tx.send(format!("{prefix}{l}"));
                        }
                    });
                }
                (
                    AgentInput::Process(child.stdin.take().unwrap()),
                    Some(child),
                )
            }
        };
        Agent {
            client,
            label: label.to_string(),
            input,
            lines,
            backlog: Default::default(),
            transcript: Vec::new(),
            _child: child,
        }
    }

    async fn send(&mut self, line: &str) {
        self.transcript.push(format!("> {line}"));
        match &mut self.input {
            AgentInput::Process(stdin) => {
                stdin
                    .write_all(format!("{line}\n").as_bytes())
                    .await
                    .unwrap();
                stdin.flush().await.unwrap();
            }
            AgentInput::InProcess(tx) => tx.send(line.to_string()).unwrap(),
        }
    }

    /// Takes the first line (received earlier or waited for) that `pred` accepts; the others
    /// stay for later expectations.
    async fn expect(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        if let Some(i) = self.backlog.iter().position(|l| pred(l)) {
            return self.backlog.remove(i).unwrap();
        }
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(l)) => {
                    self.transcript.push(l.clone());
                    if pred(&l) {
                        return l;
                    }
                    self.backlog.push_back(l);
                }
                _ => self.fail(&format!("timed out waiting for {what}")),
            }
        }
    }

    /// Takes every line not yet taken, without waiting.
    fn drain(&mut self) -> Vec<String> {
        while let Ok(l) = self.lines.try_recv() {
            self.transcript.push(l.clone());
            self.backlog.push_back(l);
        }
        self.backlog.drain(..).collect()
    }

    fn fail(&self, why: &str) -> ! {
        panic!(
            "{} ({}): {why}\n--- agent transcript ---\n{}",
            self.client.name(),
            self.label,
            self.transcript.join("\n")
        )
    }

    fn check(&self, ok: bool, why: &str) {
        if !ok {
            self.fail(why)
        }
    }
}

/// The rumqttc agent: the same line protocol as the scripts, in process.
///
/// rumqttc resends in-flight publishes itself only into a resumed session (CONNACK session
/// present), as MQTT 3.1.1 says, and the hub keeps no sessions: so, like any rumqttc
/// application that must not lose data, this one publishes again what was not acknowledged
/// when a reconnect starts a new session. The other clients resend on any reconnect by
/// themselves.
async fn rumqttc_agent(
    args: [String; 6],
    mut cmds: mpsc::UnboundedReceiver<String>,
    out: mpsc::UnboundedSender<String>,
) {
    let [host, port, user, pass, client_id, keepalive] = args;
    let mut opts = MqttOptions::new(client_id, host, port.parse().unwrap());
    opts.set_credentials(user, pass);
    opts.set_keep_alive(Duration::from_secs(keepalive.parse().unwrap()));
    let (client, mut el) = AsyncClient::new(opts, 64);
    let say = |s: String| {
        let _ = out.send(s);
    };
    // (order, topic, payload): QoS 1 publishes asked for, waiting for their packet id; then by
    // packet id until acknowledged.
    type Pub = (u64, String, String);
    let mut order = 0u64;
    let mut requested: std::collections::VecDeque<Pub> = Default::default();
    let mut by_pkid: HashMap<u16, Pub> = HashMap::new();
    let mut qos0: std::collections::VecDeque<String> = Default::default();
    loop {
        tokio::select! {
            cmd = cmds.recv() => {
                let Some(cmd) = cmd else { return };
                let w: Vec<&str> = cmd.split_whitespace().collect();
                match w.as_slice() {
                    ["sub", t] => client.subscribe(*t, QoS::AtLeastOnce).await.unwrap(),
                    ["pub", "1", t, p] => {
                        order += 1;
                        requested.push_back((order, t.to_string(), p.to_string()));
                        client.publish(*t, QoS::AtLeastOnce, false, p.as_bytes().to_vec()).await.unwrap();
                    }
                    ["pub", _, t, p] => {
                        qos0.push_back(p.to_string());
                        client.publish(*t, QoS::AtMostOnce, false, p.as_bytes().to_vec()).await.unwrap();
                    }
                    ["quit"] => {
                        let _ = client.disconnect().await;
                        say("bye".into());
                        return;
                    }
                    _ => {}
                }
            }
            ev = el.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(a))) => {
                    if a.code != rumqttc::ConnectReturnCode::Success {
                        say(format!("connfail {:?}", a.code));
                        continue;
                    }
                    say("connected".into());
                    if !a.session_present && !by_pkid.is_empty() {
                        let mut again: Vec<Pub> = by_pkid.drain().map(|(_, p)| p).collect();
                        again.extend(requested.drain(..));
                        again.sort();
                        for (o, t, p) in again {
                            client.try_publish(&t, QoS::AtLeastOnce, false, p.as_bytes().to_vec()).unwrap();
                            requested.push_back((o, t, p));
                        }
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(a))) => say(format!(
                    "suback {}",
                    a.return_codes
                        .iter()
                        .map(|c| match c {
                            rumqttc::SubscribeReasonCode::Success(q) => (*q as u8).to_string(),
                            _ => "128".into(),
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                )),
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    say(format!("msg {} {}", p.topic, String::from_utf8_lossy(&p.payload)))
                }
                Ok(Event::Incoming(Packet::PubAck(a))) => {
                    if let Some((_, _, p)) = by_pkid.remove(&a.pkid) {
                        say(format!("acked {p}"))
                    }
                }
                Ok(Event::Outgoing(Outgoing::Publish(0))) => {
                    if let Some(p) = qos0.pop_front() {
                        say(format!("sent {p}"))
                    }
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if let std::collections::hash_map::Entry::Vacant(e) = by_pkid.entry(pkid) {
                        if let Some(x) = requested.pop_front() {
                            e.insert(x);
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    say(format!("closed {}", e.to_string().replace(' ', "_")));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The hub binary

struct HubProcess {
    child: std::process::Child,
    log: PathBuf,
    local: SocketAddr,
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl HubProcess {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn start_hub(emu: &Emulator, dir: &Path, devices: usize) -> HubProcess {
    let local = free_port();
    let text = hub_config_text(emu, dir, devices, NO_PACING)
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{local}\""))
        + "[ops]\nlisten = \"off\"\n";
    let config = dir.join("hub.toml");
    std::fs::write(&config, text).unwrap();
    let log = dir.join("hub.log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_modehub"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start the hub binary");
    let hub = HubProcess { child, log, local };
    let deadline = tokio::time::Instant::now() + STEP;
    while TcpStream::connect(local).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the hub never listened on {local}\n{}",
            hub.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    hub
}

// ---------------------------------------------------------------------------------------------
// The scenario

fn event(n: u64) -> String {
    format!(r#"{{"eventType":"compat","eventData":{{"n":{n}}}}}"#)
}

fn has_event(h: &EmulatorHandle, dev: u64, n: u64) -> bool {
    h.events(dev)
        .iter()
        .any(|e| e.event_data.get("n").and_then(|v| v.as_u64()) == Some(n))
}

async fn wait_event(a: &Agent, h: &EmulatorHandle, dev: u64, n: u64) {
    let deadline = tokio::time::Instant::now() + STEP;
    while !has_event(h, dev, n) {
        if tokio::time::Instant::now() >= deadline {
            a.fail(&format!("event n={n} never reached MODE"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What one client's full run measured, for the summary.
struct Outcome {
    client: Client,
    /// PINGREQs the client sent while publishing every 0.4 s, well inside its keepalive.
    pings_in_fast_phase: u64,
    reconnects_in_fast_phase: usize,
}

/// The full run for device `i`, logged in by name + local password.
async fn full_run(client: Client, hub: SocketAddr, emu: &Emulator, i: usize) -> Outcome {
    let h = emu.handle();
    let dev = device_id(i);
    let name = format!("dev{i}");
    let proxy = Proxy::start(hub).await;
    h.set_kv(dev, "seeded", json!(1)).unwrap();
    let mut a = Agent::start(
        client,
        proxy.addr,
        &name,
        &format!("pw{i}"),
        "name + local_password",
    )
    .await;
    a.expect("connected", |l| l == "connected").await;

    // Subscriptions: command and kv, by name.
    let base = format!("/devices/{name}");
    for t in ["command", "kv"] {
        a.send(&format!("sub {base}/{t}")).await;
        let ack = a.expect("suback", |l| l.starts_with("suback ")).await;
        a.check(!ack.contains("128"), "its own topic was refused");
    }

    // QoS 0 and QoS 1 events reach MODE.
    a.send(&format!("pub 0 {base}/event {}", event(1))).await;
    a.send(&format!("pub 1 {base}/event {}", event(2))).await;
    a.expect("PUBACK of n=2", |l| l == format!("acked {}", event(2)))
        .await;
    wait_event(&a, &h, dev, 2).await;
    wait_event(&a, &h, dev, 1).await;

    // kv: a reload with MODE's store, then a live set from the app, then a set from the device.
    a.expect("kv reload", |l| {
        l.starts_with(&format!("msg {base}/kv ")) && l.contains("reload") && l.contains("seeded")
    })
    .await;
    h.set_kv(dev, "live", json!("on")).unwrap();
    a.expect("kv set pushed", |l| {
        l.starts_with(&format!("msg {base}/kv ")) && l.contains("\"live\"")
    })
    .await;
    let set = r#"{"action":"set","key":"fromdev","value":7}"#;
    a.send(&format!("pub 1 {base}/kv {set}")).await;
    a.expect("PUBACK of the kv set", |l| l == format!("acked {set}"))
        .await;
    let deadline = tokio::time::Instant::now() + STEP;
    while !h
        .kv(dev)
        .1
        .iter()
        .any(|(k, v)| k == "fromdev" && *v == json!(7))
    {
        if tokio::time::Instant::now() >= deadline {
            a.fail("the device's kv set never reached MODE");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A command sent through the emulator arrives on the command topic.
    send_command(emu, dev, "compat", json!({"x": i})).await;
    a.expect("command", |l| {
        l.starts_with(&format!("msg {base}/command ")) && l.contains("\"compat\"")
    })
    .await;

    // Faster than the keepalive, without (necessarily) PINGREQ: never cut.
    a.drain();
    let pings_before = proxy.count(12);
    let connects_before = proxy.count(1);
    // Two and a half keepalives: past the 1.5x a server may wait before it cuts a silent client.
    let count = (client.keepalive() * 2500 / FAST_EVERY.as_millis() as u64).max(15);
    let last = 100 + count - 1;
    for n in 100..=last {
        a.send(&format!("pub 1 {base}/event {}", event(n))).await;
        tokio::time::sleep(FAST_EVERY).await;
    }
    for n in 100..=last {
        a.expect("PUBACK in the fast phase", |l| {
            l == format!("acked {}", event(n))
        })
        .await;
    }
    let pings = proxy.count(12) - pings_before;
    let reconnects = (proxy.count(1) - connects_before) as usize;
    let cut = a.drain().iter().any(|l| l.starts_with("closed"));
    a.check(
        !cut && reconnects == 0,
        "the hub cut a client that published well inside its keepalive",
    );
    wait_event(&a, &h, dev, last).await;

    // A publish it may not make (another device's topic, its own command topic) is
    // acknowledged and dropped; the sensor is not locked out and the next event goes through.
    for t in [
        "/devices/dev-not-mine/event".to_string(),
        format!("{base}/command"),
    ] {
        let bad = event(900);
        a.send(&format!("pub 1 {t} {bad}")).await;
        a.expect(&format!("PUBACK of the denied publish to {t}"), |l| {
            l == format!("acked {bad}")
        })
        .await;
    }
    a.send(&format!("pub 1 {base}/event {}", event(901))).await;
    a.expect("PUBACK after the denied publishes", |l| {
        l == format!("acked {}", event(901))
    })
    .await;
    wait_event(&a, &h, dev, 901).await;
    a.check(!has_event(&h, dev, 900), "a denied publish reached MODE");
    let planted = a
        .drain()
        .iter()
        .any(|l| l.starts_with(&format!("msg {base}/command ")) && l.contains("900"));
    a.check(!planted, "a device published onto its own command topic");

    // In-flight QoS 1 across a cut: the hub stores it, its PUBACK is lost, the connection
    // breaks; the client reconnects, resends, and gets the PUBACK.
    proxy.swallow.store(true, Relaxed);
    a.send(&format!("pub 1 {base}/event {}", event(500))).await;
    wait_event(&a, &h, dev, 500).await;
    proxy.cut_all();
    a.expect("reconnect", |l| l == "connected").await;
    a.expect("PUBACK of the resent publish", |l| {
        l == format!("acked {}", event(500))
    })
    .await;
    a.send(&format!("pub 1 {base}/event {}", event(501))).await;
    a.expect("PUBACK after the reconnect", |l| {
        l == format!("acked {}", event(501))
    })
    .await;
    wait_event(&a, &h, dev, 501).await;

    a.send("quit").await;
    a.expect("bye", |l| l == "bye").await;
    Outcome {
        client,
        pings_in_fast_phase: pings,
        reconnects_in_fast_phase: reconnects,
    }
}

/// The short run for device `i`, logged in by MODE ID + API key.
async fn id_run(client: Client, hub: SocketAddr, emu: &Emulator, i: usize) {
    let h = emu.handle();
    let dev = device_id(i);
    let mut a = Agent::start(
        client,
        hub,
        &dev.to_string(),
        &device_key(i),
        "MODE id + key",
    )
    .await;
    a.expect("connected", |l| l == "connected").await;
    let base = format!("/devices/{dev}");
    a.send(&format!("sub {base}/command")).await;
    let ack = a.expect("suback", |l| l.starts_with("suback ")).await;
    a.check(!ack.contains("128"), "its own command topic was refused");
    a.send(&format!("pub 0 {base}/event {}", event(1))).await;
    a.send(&format!("pub 1 {base}/event {}", event(2))).await;
    a.expect("PUBACK of n=2", |l| l == format!("acked {}", event(2)))
        .await;
    wait_event(&a, &h, dev, 1).await;
    wait_event(&a, &h, dev, 2).await;
    send_command(emu, dev, "compat", json!({})).await;
    a.expect("command", |l| {
        l.starts_with(&format!("msg {base}/command ")) && l.contains("\"compat\"")
    })
    .await;
    a.send("quit").await;
    a.expect("bye", |l| l == "bye").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_clients_work_against_the_hub_binary() {
    let required = std::env::var("MODEHUB_COMPAT_REQUIRED").is_ok_and(|v| v == "1");
    let mut clients = Vec::new();
    // `MODEHUB_COMPAT_ONLY=mosquitto` (a part of the name) runs one client, when debugging it.
    let only = std::env::var("MODEHUB_COMPAT_ONLY").unwrap_or_default();
    for c in Client::ALL {
        if !c.name().to_lowercase().contains(&only.to_lowercase()) {
            continue;
        }
        match c.missing() {
            None => clients.push(c),
            Some(what) if required => panic!("{}: missing {what}", c.name()),
            Some(what) => eprintln!("compat: SKIPPED {} (missing {what})", c.name()),
        }
    }

    // Two devices per client: 2k by name + local_password, 2k+1 by MODE ID + key.
    let emu = emulator(2 * Client::ALL.len()).await;
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(&emu, dir.path(), 2 * Client::ALL.len()).await;

    let mut outcomes = Vec::new();
    for c in clients {
        let k = Client::ALL.iter().position(|x| *x == c).unwrap();
        let run = async {
            let o = full_run(c, hub.local, &emu, 2 * k).await;
            id_run(c, hub.local, &emu, 2 * k + 1).await;
            o
        };
        // A panic inside shows the agent's transcript; add the hub's log.
        match std::panic::AssertUnwindSafe(run).catch_unwind().await {
            Ok(o) => outcomes.push(o),
            Err(e) => {
                eprintln!("--- hub log ---\n{}", hub.log_text());
                std::panic::resume_unwind(e);
            }
        }
    }
    eprintln!(
        "compat: {:<28} | result | keepalive | PINGREQs while publishing every 0.4 s | reconnects",
        "client"
    );
    for o in &outcomes {
        eprintln!(
            "compat: {:<28} | ok     | {:>7} s | {:>3} | {}",
            o.client.name(),
            o.client.keepalive(),
            o.pings_in_fast_phase,
            o.reconnects_in_fast_phase
        );
    }
    emu.shutdown().await;
}
