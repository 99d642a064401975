//! Serial adapters: one task per `[[serial]]` port, bridging line-speaking sensors to the router
//! and writing what MODE sends them back as lines.
//!
//! A port task opens its device with tokio-serial (retrying with jittered backoff while it is
//! missing, busy or forbidden, and saying how to fix it), announces its devices to the downlink
//! as connected, reads bounded lines ([`frame`]), parses them ([`line`](mod@line)), hands events and kv
//! changes to the router, and answers numbered lines with `OK <n>` only once the outbox has
//! committed them (`ERR <n> <reason>` otherwise). One writer per open port writes acks,
//! commands and DDP changes as whole lines from bounded queues, so a sensor that stops reading
//! stalls nothing but its own queue. When the port is lost its devices are reported
//! disconnected and the task waits for it to come back. This module must not know MODE's wire
//! format beyond the command/DDP JSON the downlink hands it, speak SQL, or panic on any input.

pub mod frame;
pub mod line;

use crate::config::{FlowControl, Parity, SerialConfig};
use crate::local::{next_conn_id, ConnId, DeviceId, DownMsg, LocalEvent, TopicKind};
pub use crate::metrics::SerialStats;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::router::{CommitWaiter, Router};
use crate::timing::Backoff;
use frame::{Frame, LineFramer};
use line::{LineError, LineFault, Up, UpLine};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Everything a port task needs.
pub struct PortContext {
    pub cfg: SerialConfig,
    /// The devices that may speak on this port (from `cfg.devices`).
    pub devices: Vec<DeviceId>,
    pub registry: Arc<Registry>,
    pub router: Router,
    pub metrics: Arc<Metrics>,
    /// Presence: `Connected` + `Subscribed(dev, Command)` + `Subscribed(dev, Kv)` for each device
    /// when the port opens, `Disconnected` when it is lost.
    pub events: mpsc::Sender<LocalEvent>,
    /// Commands and DDP messages (MODE JSON) to write to this port as lines.
    pub down: mpsc::Receiver<DownMsg>,
    pub shutdown: watch::Receiver<bool>,
}

/// Counts a dropped line under its reason.
fn count_fault(stats: &SerialStats, f: LineFault) {
    match f {
        LineFault::BadUtf8 => &stats.bad_utf8,
        LineFault::BadChecksum => &stats.bad_checksum,
        LineFault::MissingChecksum => &stats.missing_checksum,
        LineFault::Parse => &stats.parse_error,
    }
    .fetch_add(1, Relaxed);
}

/// Offers a message to a port's write queue without waiting (what the downlink should call):
/// `false`, counted as `write_queue_full`, when the port's sensor is not keeping up.
pub fn offer(tx: &mpsc::Sender<DownMsg>, msg: DownMsg, stats: &SerialStats) -> bool {
    match tx.try_send(msg) {
        Ok(()) => true,
        Err(_) => {
            stats.write_queue_full.fetch_add(1, Relaxed);
            false
        }
    }
}

/// First wait after a failed open or a lost port.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Longest wait between attempts to open a port that exists but cannot be opened.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// While a port's path is missing, how often to look for it (cheap `stat`).
const PATH_POLL: Duration = Duration::from_millis(250);
/// A session shorter than this does not reset the backoff (a port that opens, then fails).
const STABLE_AFTER: Duration = Duration::from_secs(5);
/// Acks waiting for the writer, per port: room for a whole group commit's worth (the outbox
/// answers up to 4096 appends at once); beyond it the writer is stuck and acks are dropped.
const ACK_QUEUE: usize = 4096;
/// How long reading waits for room in a full ack queue before calling the writer stuck.
const ACK_WAIT: Duration = Duration::from_secs(1);
/// How long a stopping port (reload or hub stop) may take to write the answers of lines already
/// committed and the downlink lines already queued before it closes.
const STOP_FLUSH: Duration = Duration::from_secs(2);
/// Answers waiting, in line order, for an earlier line's commit.
const MAX_PENDING: usize = 8192;
/// Most ack bytes the writer gathers into one write.
const ACK_BATCH_BYTES: usize = 8 * 1024;
/// Committed or in-flight numbers remembered per device for dropping resends.
const DEDUP_WINDOW: usize = 32;
/// How long a number is remembered.
const DEDUP_TTL: Duration = Duration::from_secs(60);
/// Least time between two warnings about garbage on one port (the rest go to debug).
const NOISE_WARN_EVERY: Duration = Duration::from_secs(10);

/// Why an open failed, for the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenFailure {
    /// The path does not exist (unplugged, not enumerated yet, wrong by-id path).
    Missing,
    /// The hub's user may not open it.
    Permission,
    /// Another process holds it (TIOCEXCL or a lock).
    Busy,
    /// Anything else (not a tty, unsupported settings...).
    Other,
}

impl OpenFailure {
    /// Classifies a tokio-serial open error.
    pub fn of(e: &tokio_serial::Error) -> OpenFailure {
        use std::io::ErrorKind as Io;
        use tokio_serial::ErrorKind as K;
        match e.kind() {
            K::Io(Io::NotFound) => OpenFailure::Missing,
            K::Io(Io::PermissionDenied) => OpenFailure::Permission,
            K::NoDevice => OpenFailure::Busy,
            _ => OpenFailure::Other,
        }
    }

    /// How to fix it.
    pub fn fix(self, port: &str) -> String {
        match self {
            OpenFailure::Missing => format!(
                "plug the adapter in or correct the path (stable names: `ls -l /dev/serial/by-id/`); \
                 the hub keeps looking for {port} and opens it when it appears"
            ),
            OpenFailure::Permission => format!(
                "add the service user to the dialout group: `sudo usermod -aG dialout modehub` and restart \
                 the service (or set SupplementaryGroups=dialout in the unit); check with `ls -l {port}`"
            ),
            OpenFailure::Busy => format!(
                "another process holds {port}: find it with `sudo fuser -v {port}` and stop it \
                 (a serial console, another modehub; ModemManager probes USB serial adapters: \
                 `sudo systemctl disable --now ModemManager`)"
            ),
            OpenFailure::Other => format!(
                "check that {port} is a serial device and that baud, data_bits, parity, stop_bits and \
                 flow_control suit it"
            ),
        }
    }
}

fn builder(cfg: &SerialConfig) -> tokio_serial::SerialPortBuilder {
    use tokio_serial::{DataBits, FlowControl as F, Parity as P, StopBits};
    tokio_serial::new(cfg.port.to_string_lossy(), cfg.baud)
        .data_bits(match cfg.data_bits {
            5 => DataBits::Five,
            6 => DataBits::Six,
            7 => DataBits::Seven,
            _ => DataBits::Eight,
        })
        .parity(match cfg.parity {
            Parity::None => P::None,
            Parity::Odd => P::Odd,
            Parity::Even => P::Even,
        })
        .stop_bits(if cfg.stop_bits == 2 {
            StopBits::Two
        } else {
            StopBits::One
        })
        .flow_control(match cfg.flow_control {
            FlowControl::None => F::None,
            FlowControl::Software => F::Software,
            FlowControl::Hardware => F::Hardware,
        })
}

/// How a session with an open port ended.
enum End {
    Shutdown,
    /// `gone`: the port's path had disappeared when the loss was noticed (unplugged).
    Lost {
        why: String,
        gone: bool,
    },
}

/// Runs one port until shutdown: opens it (retrying with backoff), reads lines, writes lines.
pub async fn run_port(ctx: PortContext) {
    let PortContext {
        cfg,
        devices,
        registry,
        router,
        metrics,
        events,
        mut down,
        mut shutdown,
    } = ctx;
    let port = cfg.port.display().to_string();
    let mut task = Port {
        port: port.clone(),
        cfg,
        devices,
        registry,
        router,
        metrics,
        noise: Noise::default(),
        windows: HashMap::new(),
        writer_stuck: false,
    };
    if task.devices.is_empty() {
        tracing::warn!(%port, "serial port has no known devices; not opening it");
        let _ = shutdown.wait_for(|s| *s).await;
        return;
    }
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    let mut failures: u64 = 0;
    let mut last_failure: Option<OpenFailure> = None;
    loop {
        if *shutdown.borrow() {
            return;
        }
        // Whether the port's path was seen missing since the last attempt: once it has been,
        // its reappearance (a replug, a re-enumeration) ends the wait at once.
        // open() and tcsetattr() are blocking calls (a USB adapter may take a moment).
        let b = builder(&task.cfg);
        let opened = tokio::task::spawn_blocking(move || tokio_serial::SerialStream::open(&b))
            .await
            .unwrap_or_else(|e| {
                Err(tokio_serial::Error::new(
                    tokio_serial::ErrorKind::Unknown,
                    e.to_string(),
                ))
            });
        let mut saw_missing = match opened {
            Ok(stream) => {
                if failures > 0 {
                    tracing::info!(%port, failed_attempts = failures, "serial port is back");
                }
                failures = 0;
                last_failure = None;
                let opened = Instant::now();
                let gone = match task
                    .session(stream, &mut down, &events, &mut shutdown)
                    .await
                {
                    End::Shutdown => return,
                    End::Lost { why, gone } => {
                        task.metrics.serial.port_lost.fetch_add(1, Relaxed);
                        tracing::warn!(%port, error = %why, "serial port lost; its devices are disconnected until it comes back");
                        gone
                    }
                };
                if opened.elapsed() >= STABLE_AFTER {
                    backoff.reset();
                }
                gone
            }
            Err(e) => {
                failures += 1;
                task.metrics.serial.port_open_failures.fetch_add(1, Relaxed);
                let kind = OpenFailure::of(&e);
                if last_failure != Some(kind) {
                    tracing::warn!(%port, error = %e.description, fix = %kind.fix(&port), "cannot open serial port; retrying");
                } else {
                    tracing::debug!(%port, error = %e.description, attempt = failures, "serial port still cannot be opened");
                }
                last_failure = Some(kind);
                kind == OpenFailure::Missing
            }
        };
        let delay = backoff.next_delay();
        let path = &task.cfg.port;
        let sleep = async {
            // Watch the path (a cheap stat) rather than hammering open(): a port that went away
            // is picked up as soon as it is back, one that stays broken waits out its backoff.
            let deadline = Instant::now() + delay;
            while Instant::now() < deadline {
                if !path.exists() {
                    saw_missing = true;
                } else if saw_missing {
                    // udev may still be setting permissions on a fresh node.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    return;
                }
                tokio::time::sleep(
                    PATH_POLL.min(deadline.saturating_duration_since(Instant::now())),
                )
                .await;
            }
        };
        tokio::select! {
            _ = sleep => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Garbage-warning rate limiter for one port.
#[derive(Default)]
struct Noise {
    last_warn: Option<Instant>,
    suppressed: u64,
}

/// Recently seen numbers of one device.
#[derive(Default)]
struct AckWindow {
    /// (number, content hash, committed, seen at)
    entries: VecDeque<(u32, u64, bool, Instant)>,
}

impl AckWindow {
    fn find(&mut self, n: u32, hash: u64) -> Option<&mut (u32, u64, bool, Instant)> {
        let now = Instant::now();
        while self
            .entries
            .front()
            .is_some_and(|e| now.duration_since(e.3) > DEDUP_TTL)
        {
            self.entries.pop_front();
        }
        self.entries.iter_mut().find(|e| e.0 == n && e.1 == hash)
    }
    fn insert(&mut self, n: u32, hash: u64) {
        if self.entries.len() >= DEDUP_WINDOW {
            self.entries.pop_front();
        }
        self.entries.push_back((n, hash, false, Instant::now()));
    }
    fn settle(&mut self, n: u32, hash: u64, committed: bool) {
        if let Some(i) = self.entries.iter().position(|e| e.0 == n && e.1 == hash) {
            if committed {
                self.entries[i].2 = true;
            } else {
                self.entries.remove(i);
            }
        }
    }
}

/// The state of one port task that outlives its sessions.
struct Port {
    port: String,
    cfg: SerialConfig,
    devices: Vec<DeviceId>,
    registry: Arc<Registry>,
    router: Router,
    metrics: Arc<Metrics>,
    noise: Noise,
    windows: HashMap<DeviceId, AckWindow>,
    /// This session's writer made no room for acks within `ACK_WAIT`.
    writer_stuck: bool,
}

/// The answer to a numbered line.
struct Answer {
    n: u32,
    /// The dedup window entry to settle: (device, content hash).
    settle: Option<(DeviceId, u64)>,
    /// `None` for `OK`, else the `ERR` reason.
    err: Option<&'static str>,
}

/// An answer owed to a numbered line, in line order.
struct Owed {
    n: u32,
    settle: Option<(DeviceId, u64)>,
    /// The commit to wait for, or `None` when the answer is known (`err`).
    commit: Option<CommitWaiter>,
    err: Option<&'static str>,
}

/// Answers owed, oldest first: the head waits for its commit, the rest wait for the head.
type Owing = VecDeque<Owed>;

/// The next answer, once the oldest owed one is known.
fn poll_owed(owing: &mut Owing, cx: &mut Context<'_>) -> Poll<Answer> {
    let Some(head) = owing.front_mut() else {
        return Poll::Pending;
    };
    let err = match head.commit.as_mut() {
        None => head.err,
        Some(w) => match Pin::new(w).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(Ok(()))) => None,
            Poll::Ready(_) => Some("storage_unavailable"),
        },
    };
    match owing.pop_front() {
        Some(h) => Poll::Ready(Answer {
            n: h.n,
            settle: h.settle,
            err,
        }),
        None => Poll::Pending,
    }
}

fn content_hash(dev: DeviceId, payload: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    dev.hash(&mut h);
    payload.hash(&mut h);
    h.finish()
}

impl Port {
    async fn presence(&self, events: &mpsc::Sender<LocalEvent>, conn: ConnId, up: bool) {
        for &dev in &self.devices {
            if up {
                let _ = events.send(LocalEvent::Connected(dev, conn)).await;
                let _ = events
                    .send(LocalEvent::Subscribed(dev, conn, TopicKind::Command))
                    .await;
                let _ = events
                    .send(LocalEvent::Subscribed(dev, conn, TopicKind::Kv))
                    .await;
            } else {
                let _ = events.send(LocalEvent::Disconnected(dev, conn)).await;
            }
        }
    }

    async fn session<S: AsyncRead + AsyncWrite>(
        &mut self,
        stream: S,
        down: &mut mpsc::Receiver<DownMsg>,
        events: &mpsc::Sender<LocalEvent>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> End {
        let conn = next_conn_id();
        let stats = &self.metrics.serial;
        stats.port_opens.fetch_add(1, Relaxed);
        stats.ports_open.fetch_add(1, Relaxed);
        // A sensor that restarted with the port may reuse its numbers: start afresh.
        self.windows.clear();
        self.writer_stuck = false;
        tracing::info!(port = %self.port, baud = self.cfg.baud, devices = self.devices.len(), "serial port open");
        self.presence(events, conn, true).await;
        let (rd, wr) = tokio::io::split(stream);
        let (ack_tx, ack_rx) = mpsc::channel::<Vec<u8>>(ACK_QUEUE);
        let writer = Writer {
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            devices: self.devices.clone(),
            format: self.cfg.downlink_format,
            checksum: self.cfg.require_checksum,
            port: self.port.clone(),
        };
        let writer = writer.run(wr, down, ack_rx);
        tokio::pin!(writer);
        let end = tokio::select! {
            why = self.read_loop(rd, ack_tx, shutdown) => match why {
                Some(why) => End::Lost { why, gone: !self.cfg.port.exists() },
                // Stopping: the reader settled what it owed and closed the answer queue; the
                // writer writes what is queued (answers, then downlink lines) and ends.
                None => {
                    let _ = tokio::time::timeout(STOP_FLUSH, &mut writer).await;
                    End::Shutdown
                }
            },
            e = &mut writer => End::Lost { why: format!("write failed: {e}"), gone: !self.cfg.port.exists() },
        };
        self.metrics.serial.ports_open.fetch_sub(1, Relaxed);
        if matches!(end, End::Shutdown) {
            for &dev in &self.devices {
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    events.send(LocalEvent::Disconnected(dev, conn)),
                )
                .await;
            }
        } else {
            self.presence(events, conn, false).await;
        }
        end
    }

    /// Reads until the port fails (returns why) or `shutdown` turns true (returns `None` once the
    /// answers owed for lines already read are settled and queued, or after `STOP_FLUSH`).
    async fn read_loop<R: AsyncRead>(
        &mut self,
        rd: R,
        acks: mpsc::Sender<Vec<u8>>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<String> {
        tokio::pin!(rd);
        let mut buf = vec![0u8; 4096];
        let mut framer = LineFramer::new(self.cfg.max_line_bytes);
        let mut pending: Owing = VecDeque::new();
        let mut stop_by: Option<Instant> = None;
        loop {
            if stop_by.is_some() && pending.is_empty() {
                return None;
            }
            tokio::select! {
                r = rd.read(&mut buf), if stop_by.is_none() => {
                    let n = match r {
                        Ok(0) => return Some("end of file".into()),
                        Ok(n) => n,
                        Err(e) => return Some(e.to_string()),
                    };
                    let mut chunk = &buf[..n];
                    while let Some(frame) = framer.next_frame(&mut chunk) {
                        match frame {
                            Frame::Line(l) => self.on_line(l, &mut pending).await,
                            Frame::TooLong { bytes } => {
                                self.metrics.serial.too_long.fetch_add(1, Relaxed);
                                self.garbage("too_long", &format!("{bytes} bytes is over max_line_bytes = {}", self.cfg.max_line_bytes), b"");
                            }
                        }
                    }
                }
                a = std::future::poll_fn(|cx| poll_owed(&mut pending, cx)), if !pending.is_empty() => {
                    if let Some((dev, hash)) = a.settle {
                        self.windows.entry(dev).or_default().settle(a.n, hash, a.err.is_none());
                    }
                    self.ack(&acks, a.n, a.err).await;
                }
                _ = async { let _ = shutdown.wait_for(|s| *s).await; }, if stop_by.is_none() => {
                    stop_by = Some(Instant::now() + STOP_FLUSH);
                }
                _ = tokio::time::sleep_until(stop_by.unwrap_or_else(Instant::now)), if stop_by.is_some() => {
                    return None;
                }
            }
        }
    }

    /// Queues an answer known at once behind those waiting for commits; dropped (counted) when
    /// a stalled commit already holds `MAX_PENDING` answers back.
    fn answer(&self, pending: &mut Owing, n: u32, err: Option<&'static str>) {
        if pending.len() >= MAX_PENDING {
            self.metrics.serial.write_queue_full.fetch_add(1, Relaxed);
        } else {
            pending.push_back(Owed {
                n,
                settle: None,
                commit: None,
                err,
            });
        }
    }

    /// Queues `OK n` / `ERR n reason` for the writer; dropped (counted) if the writer is stuck.
    ///
    /// A writer that is merely behind (a sensor that reads slower than it writes) slows the
    /// reading of this port down instead; one that made no room for `ACK_WAIT` is stuck (the
    /// sensor stopped reading), and its acks are dropped until it makes room again.
    async fn ack(&mut self, acks: &mpsc::Sender<Vec<u8>>, n: u32, err: Option<&str>) {
        let mut out = Vec::with_capacity(24);
        line::encode_ack(n, err, self.cfg.require_checksum, &mut out);
        let sent = match acks.try_send(out) {
            Ok(()) => {
                self.writer_stuck = false;
                true
            }
            Err(mpsc::error::TrySendError::Full(out)) if !self.writer_stuck => {
                let ok = matches!(
                    tokio::time::timeout(ACK_WAIT, acks.send(out)).await,
                    Ok(Ok(()))
                );
                self.writer_stuck = !ok;
                ok
            }
            Err(_) => false,
        };
        let stats = &self.metrics.serial;
        if !sent {
            stats.write_queue_full.fetch_add(1, Relaxed);
            return;
        }
        if err.is_some() {
            stats.acks_err.fetch_add(1, Relaxed);
        } else {
            stats.acks_ok.fetch_add(1, Relaxed);
        }
    }

    fn garbage(&mut self, reason: &str, detail: &str, line: &[u8]) {
        let preview: String = line
            .iter()
            .take(48)
            .copied()
            .flat_map(std::ascii::escape_default)
            .map(char::from)
            .collect();
        let now = Instant::now();
        if self
            .noise
            .last_warn
            .is_none_or(|t| now.duration_since(t) >= NOISE_WARN_EVERY)
        {
            tracing::warn!(port = %self.port, reason, detail, line = %preview, suppressed = self.noise.suppressed, "serial line dropped");
            self.noise.last_warn = Some(now);
            self.noise.suppressed = 0;
        } else {
            self.noise.suppressed += 1;
            tracing::debug!(port = %self.port, reason, detail, line = %preview, "serial line dropped");
        }
    }

    fn resolve(&self, dev: Option<&str>) -> Result<DeviceId, String> {
        match dev {
            None if self.devices.len() == 1 => Ok(self.devices[0]),
            None => Err(format!(
                "this port carries {} devices: the line must name one",
                self.devices.len()
            )),
            Some(name) => match self.registry.lookup(name) {
                Some(d) if self.devices.contains(&d.id) => Ok(d.id),
                Some(_) => Err(format!("device {name:?} is not on this port")),
                None => Err(format!("no device {name:?}")),
            },
        }
    }

    async fn on_line(&mut self, raw: &[u8], pending: &mut Owing) {
        let stats = &self.metrics.serial;
        let parsed = match line::parse_up(raw, self.cfg.require_checksum) {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(LineError { fault, detail, ack }) => {
                count_fault(stats, fault);
                self.garbage(fault.label(), &detail, raw);
                if let Some(n) = ack {
                    self.answer(pending, n, Some(fault.label()));
                }
                return;
            }
        };
        let UpLine { dev, msg, ack, .. } = parsed;
        let dev = match self.resolve(dev.as_deref()) {
            Ok(d) => d,
            Err(detail) => {
                stats.unknown_device.fetch_add(1, Relaxed);
                self.garbage("unknown_device", &detail, raw);
                if let Some(n) = ack {
                    self.answer(pending, n, Some("unknown_device"));
                }
                return;
            }
        };
        let payload = msg.router_payload();
        let hash = content_hash(dev, &payload);
        if let Some(n) = ack {
            if let Some(e) = self.windows.entry(dev).or_default().find(n, hash) {
                stats.duplicate.fetch_add(1, Relaxed);
                if e.2 {
                    self.answer(pending, n, None);
                }
                // In flight: the first copy's answer is on its way.
                return;
            }
        }
        let submitted = match msg {
            Up::Event { .. } => self.router.event(dev, payload.as_bytes()).await,
            Up::KvSet { .. } | Up::KvDelete { .. } => self.router.kv(dev, payload.as_bytes()).await,
        };
        match submitted {
            Ok(waiter) => {
                stats.lines_ok.fetch_add(1, Relaxed);
                if let Some(n) = ack {
                    self.windows.entry(dev).or_default().insert(n, hash);
                    pending.push_back(Owed {
                        n,
                        settle: Some((dev, hash)),
                        commit: Some(waiter),
                        err: None,
                    });
                }
            }
            Err(rej) => {
                // The router has counted and logged it.
                stats.rejected.fetch_add(1, Relaxed);
                if let Some(n) = ack {
                    self.answer(pending, n, Some(rej.reason().label()));
                }
            }
        }
    }
}

/// Writes acks (first) and downlink messages as whole lines; returns the error that ended it.
struct Writer {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    devices: Vec<DeviceId>,
    format: crate::config::LineFormat,
    checksum: bool,
    port: String,
}

impl Writer {
    async fn run<W: AsyncWrite>(
        self,
        wr: W,
        down: &mut mpsc::Receiver<DownMsg>,
        mut acks: mpsc::Receiver<Vec<u8>>,
    ) -> std::io::Error {
        tokio::pin!(wr);
        let stats = &self.metrics.serial;
        let mut down_open = true;
        let mut out: Vec<u8> = Vec::with_capacity(512);
        loop {
            out.clear();
            let (lines, from_down) = tokio::select! {
                biased;
                a = acks.recv() => match a {
                    Some(bytes) => {
                        out = bytes;
                        let mut lines = 1;
                        while out.len() < ACK_BATCH_BYTES {
                            match acks.try_recv() {
                                Ok(more) => { out.extend_from_slice(&more); lines += 1; }
                                Err(_) => break,
                            }
                        }
                        (lines, false)
                    }
                    None => {
                        // The reader stopped (the port is closing): write the downlink lines
                        // already queued, they were counted as delivered.
                        while let Ok(m) = down.try_recv() {
                            out.clear();
                            if let Some(n) = self.encode(&m, &mut out) {
                                if wr.write_all(&out).await.is_err() {
                                    break;
                                }
                                stats.lines_written.fetch_add(n as u64, Relaxed);
                            }
                        }
                        let _ = wr.flush().await;
                        return std::io::Error::other("the reader stopped");
                    }
                },
                m = down.recv(), if down_open => match m {
                    Some(m) => match self.encode(&m, &mut out) {
                        Some(n) => (n, true),
                        None => continue,
                    },
                    None => { down_open = false; continue }
                },
            };
            if let Err(e) = wr.write_all(&out).await {
                if from_down {
                    stats.write_failed.fetch_add(1, Relaxed);
                }
                return e;
            }
            stats.lines_written.fetch_add(lines as u64, Relaxed);
        }
    }

    fn encode(&self, m: &DownMsg, out: &mut Vec<u8>) -> Option<usize> {
        let stats = &self.metrics.serial;
        if !self.devices.contains(&m.dev) || m.dev >= self.registry.len() {
            stats.down_bad_payload.fetch_add(1, Relaxed);
            tracing::warn!(port = %self.port, device = m.dev, "a downlink message for a device not on this port was dropped");
            return None;
        }
        let name = &self.registry.get(m.dev).name;
        match line::encode_down(name, m.kind, &m.payload, self.format, self.checksum, out) {
            Ok(n) => Some(n),
            Err(e) => {
                stats.down_bad_payload.fetch_add(1, Relaxed);
                tracing::warn!(port = %self.port, device = %name, error = %e, "a downlink message could not be written as a line");
                None
            }
        }
    }
}
