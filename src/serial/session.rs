//! One session with an open port: reads bounded lines, parses them, hands events and kv changes
//! to the router, answers numbered lines once the outbox committed them (in line order, dropping
//! resends), and announces its devices' presence. It must not write to the port itself (the
//! writer does).

use super::writer::Writer;
use super::*;

/// How a session with an open port ended.
pub(super) enum End {
    Shutdown,
    /// `gone`: the port's path had disappeared when the loss was noticed (unplugged).
    Lost {
        why: String,
        gone: bool,
    },
}

/// Garbage-warning rate limiter for one port.
#[derive(Default)]
pub(super) struct Noise {
    pub(super) last_warn: Option<Instant>,
    pub(super) suppressed: u64,
}

/// Recently seen numbers of one device.
#[derive(Default)]
pub(super) struct AckWindow {
    /// (number, content hash, committed, seen at)
    entries: VecDeque<(u32, u64, bool, Instant)>,
}

impl AckWindow {
    pub(super) fn find(&mut self, n: u32, hash: u64) -> Option<&mut (u32, u64, bool, Instant)> {
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
    pub(super) fn insert(&mut self, n: u32, hash: u64) {
        if self.entries.len() >= DEDUP_WINDOW {
            self.entries.pop_front();
        }
        self.entries.push_back((n, hash, false, Instant::now()));
    }
    pub(super) fn settle(&mut self, n: u32, hash: u64, committed: bool) {
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
pub(super) struct Port {
    pub(super) port: String,
    pub(super) cfg: SerialConfig,
    pub(super) devices: Vec<DeviceId>,
    pub(super) registry: Arc<Registry>,
    pub(super) router: Router,
    pub(super) metrics: Arc<Metrics>,
    pub(super) noise: Noise,
    pub(super) windows: HashMap<DeviceId, AckWindow>,
    /// This session's writer made no room for acks within `ACK_WAIT`.
    pub(super) writer_stuck: bool,
}

/// The answer to a numbered line.
pub(super) struct Answer {
    n: u32,
    /// The dedup window entry to settle: (device, content hash).
    settle: Option<(DeviceId, u64)>,
    /// `None` for `OK`, else the `ERR` reason.
    err: Option<&'static str>,
}

/// An answer owed to a numbered line, in line order.
pub(super) struct Owed {
    n: u32,
    settle: Option<(DeviceId, u64)>,
    /// The commit to wait for, or `None` when the answer is known (`err`).
    commit: Option<CommitWaiter>,
    err: Option<&'static str>,
}

/// Answers owed, oldest first: the head waits for its commit, the rest wait for the head.
pub(super) type Owing = VecDeque<Owed>;

/// The next answer, once the oldest owed one is known.
pub(super) fn poll_owed(owing: &mut Owing, cx: &mut Context<'_>) -> Poll<Answer> {
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

pub(super) fn content_hash(dev: DeviceId, payload: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    dev.hash(&mut h);
    payload.hash(&mut h);
    h.finish()
}

impl Port {
    pub(super) async fn presence(&self, events: &mpsc::Sender<LocalEvent>, conn: ConnId, up: bool) {
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

    pub(super) async fn session<S: AsyncRead + AsyncWrite>(
        &mut self,
        stream: S,
        down: &mut mpsc::Receiver<DownMsg>,
        events: &mpsc::Sender<LocalEvent>,
        shutdown: &CancellationToken,
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
    pub(super) async fn read_loop<R: AsyncRead>(
        &mut self,
        rd: R,
        acks: mpsc::Sender<Vec<u8>>,
        shutdown: &CancellationToken,
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
                _ = shutdown.cancelled(), if stop_by.is_none() => {
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
    pub(super) fn answer(&self, pending: &mut Owing, n: u32, err: Option<&'static str>) {
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
    pub(super) async fn ack(&mut self, acks: &mpsc::Sender<Vec<u8>>, n: u32, err: Option<&str>) {
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

    pub(super) fn garbage(&mut self, reason: &str, detail: &str, line: &[u8]) {
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

    pub(super) fn resolve(&self, dev: Option<&str>) -> Result<DeviceId, String> {
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

    pub(super) async fn on_line(&mut self, raw: &[u8], pending: &mut Owing) {
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
