//! The writer thread: owns the connection, turns queued appends and acks into group commits,
//! keeps the outbox within its bounds and the disk-space floor, and the checkpointer thread that
//! copies the WAL into the database file beside it. It must not be called except through the
//! [`super::Outbox`] handle's channel.

use super::schema::{free_disk, is_corruption, ROW_OVERHEAD};
use super::{
    Capture, CommitReply, DeviceDepth, Job, Kind, NewRecord, Notifier, OutboxError, OutboxOptions,
    OutboxStats, Req, Row, MAX_BATCH,
};
use crate::timing::now_ms;
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How often the checkpointer copies committed WAL frames into the database file.
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// WAL length (pages) at which the checkpointer briefly holds off the writer so that the WAL can
/// start over (16 MiB with 1 KiB pages); below it, checkpoints never block a commit.
pub(super) const WAL_RESTART_PAGES: i64 = 16 * 1024;

/// Copies the WAL into the database file on its own thread and connection. SQLite's automatic
/// checkpoint would run inside a commit on the writer thread and make that commit (and every
/// PUBACK waiting for it) wait for two fsyncs: tens of ms on an SD card or a busy disk, which was
/// the hub's p99 latency (docs/BENCHMARKS.md). A PASSIVE checkpoint runs alongside commits.
pub(super) struct Checkpointer {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Checkpointer {
    pub(super) fn start(path: &Path, sync_full: bool) -> Result<Checkpointer, rusqlite::Error> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(
            None,
            "synchronous",
            if sync_full { "FULL" } else { "NORMAL" },
        )?;
        let (stop, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("outbox-ckpt".into())
            .spawn(move || {
                let checkpoint = |mode: &str| {
                    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                        r.get::<_, i64>(1)
                    })
                };
                loop {
                    let stopping = !matches!(
                        rx.recv_timeout(CHECKPOINT_EVERY),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                    );
                    let r = match checkpoint("PASSIVE") {
                        Ok(wal_pages) if wal_pages >= WAL_RESTART_PAGES => checkpoint("RESTART"),
                        other => other,
                    };
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "outbox checkpoint failed; retrying later");
                    }
                    if stopping {
                        return;
                    }
                }
            })
            .expect("spawn outbox checkpoint thread");
        Ok(Checkpointer { stop, thread })
    }

    /// A last checkpoint, then the thread ends.
    pub(super) fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

pub(super) struct Writer {
    pub(super) conn: Connection,
    pub(super) dir: PathBuf,
    pub(super) opts: OutboxOptions,
    /// Next per-device sequence number.
    pub(super) seqs: HashMap<u64, u64>,
    pub(super) notifier: Notifier,
    pub(super) stats: Arc<OutboxStats>,
    /// In a burst of bound-enforcing drops (to log once per burst).
    pub(super) dropping: bool,
}

impl Writer {
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Req>) {
        let mut appends: Vec<(NewRecord, CommitReply)> = Vec::new();
        let mut acks: Vec<i64> = Vec::new();
        let mut jobs: Vec<Job> = Vec::new();
        let mut touched: Vec<u64> = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut next = Some(first);
            // Group commit: take everything already queued, up to a bound.
            while let Some(req) = next.take() {
                match req {
                    Req::Append(rec, tx) => appends.push((rec, tx)),
                    Req::Ack(id) => acks.push(id),
                    Req::Job(j) => jobs.push(j),
                }
                if appends.len() + acks.len() < MAX_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            if !appends.is_empty() {
                if let Err(e) = self.check_disk() {
                    self.stats
                        .refused_disk_full
                        .fetch_add(appends.len() as u64, Relaxed);
                    let e = Arc::new(e);
                    for (_, tx) in appends.drain(..) {
                        let _ = tx.send(Err(e.clone()));
                    }
                }
            }
            if !appends.is_empty() || !acks.is_empty() {
                let started = Instant::now();
                match self.commit(&appends, &acks) {
                    Ok(()) => {
                        self.stats.commits.fetch_add(1, Relaxed);
                        self.stats
                            .observe_commit(started.elapsed().as_micros() as u64);
                        self.stats
                            .rows_appended
                            .fetch_add(appends.len() as u64, Relaxed);
                        self.stats.rows_acked.fetch_add(acks.len() as u64, Relaxed);
                        // Bounds first, so a sensor that got its PUBACK sees the outbox (and
                        // its drop counters) as they will stay.
                        if let Err(e) = self.enforce_bounds() {
                            tracing::error!(error = %e, "cannot enforce the outbox bounds");
                        }
                        touched.clear();
                        for (rec, tx) in appends.drain(..) {
                            if !touched.contains(&rec.device) {
                                touched.push(rec.device);
                            }
                            let _ = tx.send(Ok(()));
                        }
                        for d in &touched {
                            (self.notifier)(*d);
                        }
                    }
                    Err(e) => {
                        self.stats.commit_errors.fetch_add(1, Relaxed);
                        let e = self.classify(e);
                        tracing::error!(error = %e, rows = appends.len(), "outbox commit failed; nothing was acknowledged");
                        // The in-memory sequence numbers may be ahead of the database now.
                        self.reload_seqs();
                        let e = Arc::new(e);
                        for (_, tx) in appends.drain(..) {
                            let _ = tx.send(Err(e.clone()));
                        }
                    }
                }
                acks.clear();
            }
            for job in jobs.drain(..) {
                job(&mut self);
            }
        }
        tracing::debug!("outbox writer stopped");
    }

    /// Maps SQLite's "disk full" to our error, and notes corruption loudly.
    pub(super) fn classify(&self, e: OutboxError) -> OutboxError {
        if let OutboxError::Sql(s) = &e {
            if s.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
                self.stats.disk_full.store(1, Relaxed);
                return OutboxError::DiskFull {
                    path: self.dir.clone(),
                    free: free_disk(&self.dir).unwrap_or(0),
                    min: self.opts.min_free_disk,
                };
            }
            if is_corruption(s) {
                self.stats.corruption_detected.fetch_add(1, Relaxed);
                tracing::error!("OUTBOX DATABASE IS CORRUPT at run time; restart the hub to salvage it (the file is never deleted)");
            }
        }
        e
    }

    /// Refuses new data while the disk is below the watermark; resumes by itself.
    pub(super) fn check_disk(&mut self) -> Result<(), OutboxError> {
        let Some(free) = free_disk(&self.dir) else {
            return Ok(());
        };
        let full = free < self.opts.min_free_disk;
        let was = self.stats.disk_full.swap(full as u64, Relaxed) == 1;
        if full {
            if !was {
                tracing::error!(free, min = self.opts.min_free_disk, dir = %self.dir.display(),
                    "data disk nearly full: refusing new messages until space returns");
            }
            return Err(OutboxError::DiskFull {
                path: self.dir.clone(),
                free,
                min: self.opts.min_free_disk,
            });
        }
        if was {
            tracing::warn!(free, "data disk has room again: accepting messages");
        }
        Ok(())
    }

    pub(super) fn reload_seqs(&mut self) {
        let mut seqs = HashMap::new();
        if let Ok(mut st) = self.conn.prepare("SELECT device, next_seq FROM device_seq") {
            if let Ok(rows) = st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))) {
                for (d, s) in rows.flatten() {
                    seqs.insert(d as u64, s as u64);
                }
            }
        }
        self.seqs = seqs;
    }

    pub(super) fn commit(
        &mut self,
        appends: &[(NewRecord, CommitReply)],
        acks: &[i64],
    ) -> Result<(), OutboxError> {
        let tx = self.conn.transaction()?;
        let mut rows_delta: i64 = 0;
        let mut bytes_delta: i64 = 0;
        let mut coalesced = 0u64;
        {
            let now = now_ms();
            let mut ins = tx.prepare_cached(
                "INSERT INTO outbox (device, kind, key, body, dev_seq, captured_at, created_at, synced, boot_id, mono_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?;
            // A newer change of a key replaces the pending ones: replay sends the fewest
            // messages that give the same final state.
            let mut coalesce = tx.prepare_cached(
                "DELETE FROM outbox WHERE device = ?1 AND kind != 0 AND key = ?2
                 RETURNING LENGTH(body) + LENGTH(key)",
            )?;
            let mut seq_touched: Vec<u64> = Vec::new();
            for (rec, _) in appends {
                if rec.kind != Kind::Event {
                    for len in coalesce
                        .query_map(params![rec.device as i64, rec.key], |r| r.get::<_, i64>(0))?
                    {
                        rows_delta -= 1;
                        bytes_delta -= len? + ROW_OVERHEAD as i64;
                        coalesced += 1;
                    }
                }
                let seq = self.seqs.entry(rec.device).or_insert(1);
                ins.execute(params![
                    rec.device as i64,
                    rec.kind as i64,
                    rec.key,
                    rec.body,
                    *seq as i64,
                    rec.captured.wall_ms,
                    now,
                    rec.captured.synced,
                    rec.captured.boot_id,
                    rec.captured.mono_ms
                ])?;
                rows_delta += 1;
                bytes_delta += (rec.body.len() + rec.key.len()) as i64 + ROW_OVERHEAD as i64;
                *seq += 1;
                if !seq_touched.contains(&rec.device) {
                    seq_touched.push(rec.device);
                }
            }
            let mut upd = tx.prepare_cached(
                "INSERT INTO device_seq (device, next_seq) VALUES (?1, ?2)
                 ON CONFLICT(device) DO UPDATE SET next_seq = excluded.next_seq",
            )?;
            for d in seq_touched {
                upd.execute(params![d as i64, self.seqs[&d] as i64])?;
            }
            let mut del = tx.prepare_cached(
                "DELETE FROM outbox WHERE id = ?1 RETURNING device, kind, key, body",
            )?;
            let mut mirror_set = tx.prepare_cached(
                "INSERT INTO kv_mirror (device, key, value, rev)
                 SELECT ?1, ?2, ?3, 0 WHERE EXISTS (SELECT 1 FROM kv_state WHERE device = ?1)
                 ON CONFLICT(device, key) DO UPDATE SET value = excluded.value",
            )?;
            for id in acks {
                let gone: Option<(i64, i64, String, String)> = del
                    .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                    .optional()?;
                if let Some((device, kind, key, body)) = gone {
                    rows_delta -= 1;
                    bytes_delta -= (body.len() + key.len()) as i64 + ROW_OVERHEAD as i64;
                    // MODE has it now: the mirror reflects it until MODE says otherwise.
                    match Kind::from_i64(kind) {
                        Kind::Event => {}
                        Kind::KvSet => {
                            mirror_set.execute(params![device, key, Some(body)])?;
                        }
                        Kind::KvDelete => {
                            mirror_set.execute(params![device, key, None::<String>])?;
                        }
                    }
                }
            }
        }
        tx.commit()?;
        self.stats.kv_coalesced.fetch_add(coalesced, Relaxed);
        add_signed(&self.stats.pending_rows, rows_delta);
        add_signed(&self.stats.pending_bytes, bytes_delta);
        Ok(())
    }

    /// Drops the oldest events while the outbox is over its bounds (down to 95%, so it does not
    /// drop on every commit). kv changes are never dropped.
    pub(super) fn enforce_bounds(&mut self) -> Result<(), OutboxError> {
        let over = |s: &OutboxStats, f: f64| {
            s.pending_rows.load(Relaxed) as f64 > self.opts.max_rows as f64 * f
                || s.pending_bytes.load(Relaxed) as f64 > self.opts.max_bytes as f64 * f
        };
        if !over(&self.stats, 1.0) {
            if self.dropping {
                self.dropping = false;
            }
            return Ok(());
        }
        let mut dropped = 0u64;
        while over(&self.stats, 0.95) {
            // How many rows bring us to 95%, at most 512 per statement.
            let rows = self.stats.pending_rows.load(Relaxed) as f64;
            let bytes = self.stats.pending_bytes.load(Relaxed) as f64;
            let avg = (bytes / rows.max(1.0)).max(1.0);
            let excess = (rows - self.opts.max_rows as f64 * 0.95)
                .max((bytes - self.opts.max_bytes as f64 * 0.95) / avg)
                .ceil()
                .clamp(1.0, 512.0) as i64;
            let mut st = self.conn.prepare_cached(
                "DELETE FROM outbox WHERE id IN
                   (SELECT id FROM outbox WHERE kind = 0 ORDER BY id LIMIT ?1)
                 RETURNING LENGTH(body) + LENGTH(key)",
            )?;
            let lens: Vec<i64> = st
                .query_map([excess], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            if lens.is_empty() {
                break; // only kv state left: keep it
            }
            dropped += lens.len() as u64;
            add_signed(&self.stats.pending_rows, -(lens.len() as i64));
            add_signed(
                &self.stats.pending_bytes,
                -(lens.iter().sum::<i64>() + lens.len() as i64 * ROW_OVERHEAD as i64),
            );
        }
        self.stats.dropped_full.fetch_add(dropped, Relaxed);
        if !self.dropping && dropped > 0 {
            self.dropping = true;
            tracing::warn!(
                dropped,
                max_rows = self.opts.max_rows,
                max_bytes = self.opts.max_bytes,
                "outbox is full: dropped the oldest events (kv changes are kept); raise hub.max_outbox_bytes / max_outbox_rows or restore the cloud connection"
            );
        }
        Ok(())
    }

    pub(super) fn dead_letter(&mut self, id: i64, reason: &str) -> Result<bool, OutboxError> {
        let tx = self.conn.transaction()?;
        let moved = tx.execute(
            "INSERT INTO dead_letter (id, device, kind, key, body, dev_seq, captured_at, reason, failed_at)
             SELECT id, device, kind, key, body, dev_seq, captured_at, ?2, ?3 FROM outbox WHERE id = ?1",
            params![id, reason, now_ms()],
        )?;
        let len: Option<i64> = tx
            .query_row(
                "DELETE FROM outbox WHERE id = ?1 RETURNING LENGTH(body) + LENGTH(key)",
                [id],
                |r| r.get(0),
            )
            .optional()?;
        tx.commit()?;
        if let Some(len) = len {
            add_signed(&self.stats.pending_rows, -1);
            add_signed(&self.stats.pending_bytes, -(len + ROW_OVERHEAD as i64));
        }
        self.stats.dead_lettered.fetch_add(moved as u64, Relaxed);
        Ok(moved > 0)
    }

    pub(super) fn restore(&mut self, rows: Vec<Row>) -> Result<u64, OutboxError> {
        let tx = self.conn.transaction()?;
        let (mut n, mut bytes) = (0u64, 0u64);
        {
            let now = now_ms();
            let mut ins = tx.prepare_cached(
                "INSERT OR IGNORE INTO outbox (id, device, kind, key, body, dev_seq, captured_at, created_at, synced, boot_id, mono_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?;
            for r in &rows {
                let added = ins.execute(params![
                    r.id,
                    r.device as i64,
                    r.kind as i64,
                    r.key,
                    r.body,
                    r.dev_seq as i64,
                    r.captured.wall_ms,
                    now,
                    r.captured.synced,
                    r.captured.boot_id,
                    r.captured.mono_ms
                ])?;
                if added > 0 {
                    n += 1;
                    bytes += (r.body.len() + r.key.len()) as u64 + ROW_OVERHEAD;
                }
            }
        }
        tx.commit()?;
        self.stats.pending_rows.fetch_add(n, Relaxed);
        self.stats.pending_bytes.fetch_add(bytes, Relaxed);
        Ok(n)
    }

    pub(super) fn fetch(
        &mut self,
        device: u64,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Row>, OutboxError> {
        let mut st = self.conn.prepare_cached(
            "SELECT id, kind, key, body, dev_seq, captured_at, synced, boot_id, mono_ms FROM outbox
             WHERE device = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
        )?;
        let rows = st.query_map(params![device as i64, after, limit as i64], |r| {
            Ok(Row {
                id: r.get(0)?,
                device,
                kind: Kind::from_i64(r.get(1)?),
                key: r.get(2)?,
                body: r.get(3)?,
                dev_seq: r.get::<_, i64>(4)? as u64,
                captured: Capture {
                    wall_ms: r.get(5)?,
                    synced: r.get(6)?,
                    boot_id: r.get(7)?,
                    mono_ms: r.get(8)?,
                },
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub(super) fn depth(&mut self) -> Result<HashMap<u64, DeviceDepth>, OutboxError> {
        let mut st = self.conn.prepare_cached(
            "SELECT device, COUNT(*), SUM(LENGTH(body) + LENGTH(key)), MIN(created_at)
             FROM outbox GROUP BY device",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                DeviceDepth {
                    rows: r.get::<_, i64>(1)? as u64,
                    bytes: r.get::<_, Option<i64>>(2)?.unwrap_or(0) as u64,
                    oldest_ms: r.get(3)?,
                },
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

pub(super) fn add_signed(a: &AtomicU64, delta: i64) {
    if delta >= 0 {
        a.fetch_add(delta as u64, Relaxed);
    } else {
        let _ = a.fetch_update(Relaxed, Relaxed, |v| {
            Some(v.saturating_sub((-delta) as u64))
        });
    }
}
