//! The writer thread: owns the connection, turns queued appends and acks into group commits
//! (holding one open for the commit window, `pace`; the answers go back through `answers`),
//! keeps the outbox within its bounds and the disk-space floor. It must not be called except
//! through the [`super::Outbox`] handle's channel.

use super::handoff::{Acked, Handoff, ACK_BATCH, ACK_DELAY};
use super::pace::WINDOW_ROWS;
use super::schema::{counted, free_disk, is_corruption, Span, ROW_OVERHEAD};
use super::{
    Capture, CommitReply, DeviceDepth, Job, Kind, NewRecord, OutboxError, OutboxOptions,
    OutboxStats, Req, Row, MAX_BATCH,
};
use crate::timing::now_ms;
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

pub(super) struct Writer {
    pub(super) conn: Connection,
    pub(super) dir: PathBuf,
    pub(super) opts: OutboxOptions,
    /// Next per-device sequence number.
    pub(super) seqs: HashMap<u64, u64>,
    /// What `device_seq` holds per device (written only at a clean stop).
    pub(super) stored_seqs: HashMap<u64, u64>,
    /// The next row id to hand out.
    pub(super) next_id: i64,
    /// The sequence numbers' high-water mark outside the database.
    pub(super) floor: super::seqfloor::SeqFloor,
    pub(super) stats: Arc<OutboxStats>,
    /// In a burst of bound-enforcing drops (to log once per burst).
    pub(super) dropping: bool,
    /// Rows MODE acknowledged, to delete with the next commit (`handoff::ACK_DELAY`).
    pub(super) acks: Vec<i64>,
    /// Where [`super::Outbox::ack`] puts them.
    pub(super) acked: Arc<Acked>,
    pub(super) handoff: Arc<Handoff>,
    /// Rows of the current commit for the handoff (`None`: one that must be read back).
    pub(super) committed: Vec<(u64, Option<Row>)>,
    /// The arrival rate and when each device was last answered, for the commit window.
    pub(super) pace: super::pace::Pace,
    /// Per boot, the lowest id of a row captured before the clock was synchronised (where
    /// `repair_capture` starts; no index on disk).
    pub(super) unsynced_from: HashMap<i64, i64>,
    /// Per device, bounds on the ids of its rows (`schema::Span`; no index on disk).
    pub(super) spans: HashMap<u64, Span>,
    /// The data disk's free space as last read (`check_disk`).
    pub(super) disk: Option<DiskReading>,
    /// Wakes the checkpointer when a commit makes something due.
    pub(super) nudge: super::checkpoint::Nudge,
    /// Where a commit's answers go, in one hand-off, and their buffer.
    pub(super) answers: super::answers::Answers,
    pub(super) replies: Vec<CommitReply>,
}

/// A group commit's transaction, begun and ended with cached statements:
/// `Connection::transaction` parses "BEGIN" and "COMMIT" anew for every commit (~1 % of the
/// hub's CPU at 1,000 msg/s). Rolled back when dropped uncommitted.
struct Txn<'c> {
    conn: &'c Connection,
}

impl<'c> Txn<'c> {
    fn begin(conn: &'c Connection) -> rusqlite::Result<Self> {
        conn.prepare_cached("BEGIN")?.execute([])?;
        Ok(Txn { conn })
    }

    fn commit(self) -> rusqlite::Result<()> {
        self.conn.prepare_cached("COMMIT")?.execute([])?;
        Ok(())
    }
}

impl std::ops::Deref for Txn<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
    }
}

impl Drop for Txn<'_> {
    fn drop(&mut self) {
        // Committed (or ended by SQLite itself after an error): nothing to undo.
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

/// The data disk's free space as last read, and the bytes of rows appended since.
#[derive(Clone, Copy, Debug)]
pub(super) struct DiskReading {
    pub(super) at: Instant,
    pub(super) free: u64,
    pub(super) appended: u64,
}

impl DiskReading {
    /// Read again after this long at the latest.
    pub(super) const MAX_AGE: std::time::Duration = std::time::Duration::from_secs(1);

    /// Whether this reading still tells that appends are safe: above the floor `min`, younger
    /// than `MAX_AGE`, and with a margin above the floor wider than 8 times the rows appended
    /// since (the WAL, the checkpoint and the pages around a row write more than the row).
    /// A reading under the floor is never fresh, so space coming back is seen at once.
    pub(super) fn fresh(&self, now: Instant, min: u64) -> bool {
        let margin = self.free.saturating_sub(min);
        margin > 0
            && now.saturating_duration_since(self.at) < Self::MAX_AGE
            && self.appended.saturating_mul(8) < margin
    }
}

impl Writer {
    /// Sleeps until the next request, or until the acknowledged rows waiting are due
    /// (`Req::Wake` then); `None`: the channel is closed.
    fn wait_for_request(
        &self,
        rx: &mut mpsc::Receiver<Req>,
        timer: &tokio::runtime::Runtime,
        acks_due: &mut Option<Instant>,
    ) -> Option<Req> {
        if acks_due.is_none() {
            // Going to sleep without a deadline: an acknowledgement must wake us. Checked
            // after setting the flag, so one that came just before is not missed.
            self.acked.writer_idle.store(true, Relaxed);
            if !self.acked.ids.lock().expect("acked lock").is_empty() {
                self.acked.writer_idle.store(false, Relaxed);
                *acks_due = Some(Instant::now() + ACK_DELAY);
            }
        }
        let first = match *acks_due {
            None => rx.blocking_recv(),
            Some(due) => {
                let wait = due.saturating_duration_since(Instant::now());
                match timer.block_on(async { tokio::time::timeout(wait, rx.recv()).await }) {
                    Ok(r) => r,
                    // Time to delete the acknowledged rows.
                    Err(_) => Some(Req::Wake),
                }
            }
        };
        self.acked.writer_idle.store(false, Relaxed);
        first
    }

    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Req>) {
        let mut appends: Vec<(NewRecord, CommitReply)> = Vec::new();
        let mut jobs: Vec<Job> = Vec::new();
        let mut fetches = Vec::new();
        let mut pings: Vec<tokio::sync::oneshot::Sender<()>> = Vec::new();
        let mut touched: Vec<u64> = Vec::new();
        // Only to wait for a request with a deadline (the deferred acknowledgements).
        let timer = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("outbox timer runtime");
        // When the acknowledged rows waiting (in `self.acks` or `self.acked`) must be deleted
        // even if no append comes; `None`: sleep until a request comes.
        let mut acks_due: Option<Instant> = None;
        // Under steady load, where the next group's window ends (`pace::Pace::tick`): it starts
        // once the last commit is answered (the reads and jobs that came with it run inside
        // it), and the writer waits it out parked, so appends need not wake it.
        let mut tick: Option<Instant> = None;
        loop {
            let mut next = None;
            // Group commit: take everything already queued, up to a bound; at low rates wait a
            // bounded window for more (`window_for`).
            let mut window: Option<Instant> = tick.take();
            if window.is_none() {
                let Some(first) = self.wait_for_request(&mut rx, &timer, &mut acks_due) else {
                    break;
                };
                next = Some(first);
            }
            loop {
                while let Some(req) = next.take() {
                    match req {
                        Req::Append(rec, tx) => {
                            window = match window {
                                None if appends.is_empty() => self.pace.window_for(
                                    self.opts.commit_window,
                                    rec.device,
                                    Instant::now(),
                                ),
                                w => w.filter(|_| {
                                    !self.pace.waits_for_puback(rec.device, Instant::now())
                                }),
                            };
                            appends.push((rec, tx));
                        }
                        Req::Wake => {}
                        Req::Fetch(d, after, limit, tx) => fetches.push((d, after, limit, tx)),
                        Req::Job(j) => jobs.push(j),
                        Req::Ping(tx) => pings.push(tx),
                    }
                    if appends.len() + self.acks.len() < MAX_BATCH {
                        next = rx.try_recv().ok();
                    }
                }
                // A read or a job does not wait for the window, nor does a full batch.
                let Some(end) = window.filter(|_| {
                    fetches.is_empty() && jobs.is_empty() && appends.len() < WINDOW_ROWS
                }) else {
                    break;
                };
                match rx.try_recv() {
                    Ok(req) => {
                        next = Some(req);
                        continue;
                    }
                    // Closed: the next receive ends the loop.
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                    Err(mpsc::error::TryRecvError::Empty) => {}
                }
                let wait = end.saturating_duration_since(Instant::now());
                if wait.is_zero() {
                    break;
                }
                // Not a wait on the channel: an append that need not end the window does not
                // wake this thread (issue 12: one wake-up per event at home, and per event at
                // 1,000 msg/s). What must end it early (`pace::Shared::ends_window`, a read or a
                // job) unparks it, and so does dropping the last handle (`WriterWake`).
                std::thread::park_timeout(wait);
            }
            let grouped = appends.len();
            if grouped > 0 {
                self.pace.grouped(grouped, Instant::now());
            }
            self.acks
                .append(&mut self.acked.ids.lock().expect("acked lock"));
            // Deferred acknowledgements go with the next append's commit; alone only when they
            // are due, many, or a job (which may look at them) is waiting.
            let acks_now = !appends.is_empty()
                || !jobs.is_empty()
                || self.acks.len() >= ACK_BATCH
                || acks_due.is_some_and(|d| Instant::now() >= d);
            let acks = if acks_now {
                std::mem::take(&mut self.acks)
            } else {
                Vec::new()
            };
            // After appends, their acknowledgements are expected soon: wait for them with a
            // deadline instead of being woken by each one.
            acks_due = if !appends.is_empty() {
                Some(Instant::now() + ACK_DELAY)
            } else if self.acks.is_empty() {
                None
            } else {
                acks_due.or(Some(Instant::now() + ACK_DELAY))
            };
            if !appends.is_empty() {
                let bytes = appends.iter().map(|(r, _)| counted(&r.body, &r.key)).sum();
                if let Err(e) = self.check_disk(bytes) {
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
                        self.nudge.committed(self.stats.rows_appended.load(Relaxed));
                        // Bounds first, so a sensor that got its PUBACK sees the outbox (and
                        // its drop counters) as they will stay.
                        if let Err(e) = self.enforce_bounds() {
                            tracing::error!(error = %e, "cannot enforce the outbox bounds");
                        }
                        self.handoff.committed(&mut self.committed);
                        touched.clear();
                        for (rec, tx) in appends.drain(..) {
                            if !touched.contains(&rec.device) {
                                touched.push(rec.device);
                            }
                            self.replies.push(tx);
                        }
                        self.pace.answered(&touched, Instant::now());
                        self.answers.hand_over(&mut self.replies, &touched);
                    }
                    Err(e) => {
                        self.stats.commit_errors.fetch_add(1, Relaxed);
                        let e = self.classify(e);
                        tracing::error!(error = %e, rows = appends.len(), "outbox commit failed; nothing was acknowledged");
                        // The disk may be what failed: read its free space again next time.
                        self.disk = None;
                        // The failed commit's sequence numbers are not handed out again: a
                        // gap, never a repeat (the seq-floor mark already covers them).
                        self.committed.clear();
                        let e = Arc::new(e);
                        for (_, tx) in appends.drain(..) {
                            let _ = tx.send(Err(e.clone()));
                        }
                    }
                }
            }
            // A group of appends at a steady high rate: the next window starts now. One that
            // found nothing ends the ticking.
            if grouped > 0 {
                tick = self
                    .pace
                    .tick(self.opts.commit_window, Instant::now())
                    .map(|w| Instant::now() + w);
            }
            for tx in pings.drain(..) {
                let _ = tx.send(());
            }
            for (d, after, limit, tx) in fetches.drain(..) {
                let _ = tx.send(self.fetch(d, after, limit));
            }
            for job in jobs.drain(..) {
                job(&mut self);
            }
        }
        // Stopping: the acknowledged rows still waiting are deleted now.
        self.acks
            .append(&mut self.acked.ids.lock().expect("acked lock"));
        let acks = std::mem::take(&mut self.acks);
        if !acks.is_empty() {
            if let Err(e) = self.commit(&[], &acks) {
                tracing::warn!(error = %e, "cannot delete acknowledged rows at shutdown; they will be sent again");
            }
        }
        self.answers.close();
        if let Err(e) = self.store_seqs_and_stop() {
            tracing::warn!(error = %e, "cannot store the sequence numbers at shutdown; _seq continues at the seq-floor mark next time (a gap, never a repeat)");
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

    /// Refuses `appended` more bytes of rows when the data disk's free space is under the floor.
    /// The free space is read again (a `statvfs` call) only when the last reading is stale
    /// (`DiskReading::fresh`): at 1,000 msg/s a call per commit was 2 % of the hub's CPU.
    pub(super) fn check_disk(&mut self, appended: u64) -> Result<(), OutboxError> {
        let now = Instant::now();
        if let Some(r) = &mut self.disk {
            r.appended += appended;
            if r.fresh(now, self.opts.min_free_disk) {
                return Ok(());
            }
        }
        let Some(free) = free_disk(&self.dir) else {
            return Ok(());
        };
        // The group about to be written counts against this reading too.
        self.disk = Some(DiskReading {
            at: now,
            free,
            appended,
        });
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

    /// A clean stop: `device_seq` gets every device's next number and meta `seq_dirty` is
    /// cleared, in one transaction (while the writer runs, `device_seq` is not written at all:
    /// at home rates it cost a page per commit; a stop that does not get here is handled at
    /// the next open by the `seq-floor` marks).
    pub(super) fn store_seqs_and_stop(&mut self) -> Result<(), OutboxError> {
        let behind: Vec<u64> = self
            .seqs
            .iter()
            .filter(|(d, next)| self.stored_seqs.get(d).is_none_or(|s| s < next))
            .map(|(d, _)| *d)
            .collect();
        let tx = self.conn.transaction()?;
        store_seqs(&tx, &self.seqs, &behind)?;
        super::schema::set_seq_dirty(&tx, false)?;
        tx.commit()?;
        for d in behind {
            self.stored_seqs.insert(d, self.seqs[&d]);
        }
        Ok(())
    }

    pub(super) fn commit(
        &mut self,
        appends: &[(NewRecord, CommitReply)],
        acks: &[i64],
    ) -> Result<(), OutboxError> {
        self.committed.clear();
        // The numbers this commit hands out are under the mark on disk before they exist.
        let mut upto: HashMap<u64, u64> = HashMap::new();
        for (rec, _) in appends {
            *upto
                .entry(rec.device)
                .or_insert_with(|| self.seqs.get(&rec.device).copied().unwrap_or(1)) += 1;
        }
        self.floor
            .cover(upto)
            .map_err(|source| OutboxError::DataDir {
                path: self.dir.join(super::seqfloor::FILE),
                source,
            })?;
        let tx = Txn::begin(&self.conn)?;
        let mut rows_delta: i64 = 0;
        let mut bytes_delta: i64 = 0;
        let mut coalesced = 0u64;
        {
            let now = now_ms();
            let mut ins = tx.prepare_cached(
                "INSERT INTO outbox (id, device, kind, key, body, dev_seq, captured_at, created_at, synced, boot_id, mono_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?;
            // A newer change of a key replaces the pending ones: replay sends the fewest
            // messages that give the same final state.
            let mut coalesce = tx.prepare_cached(
                "DELETE FROM outbox WHERE device = ?1 AND kind != 0 AND key = ?2
                 RETURNING octet_length(body) + octet_length(key)",
            )?;
            // Acknowledged rows go first: the space they free in the table's last pages takes
            // the new rows, so a commit rewrites fewer pages (at home rates,
            // where each commit deletes the previous one's rows, about half as many).
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
                    bytes_delta -= counted(&body, &key) as i64;
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
                let id = self.next_id;
                self.next_id += 1;
                if !rec.captured.synced {
                    self.unsynced_from.entry(rec.captured.boot_id).or_insert(id);
                }
                let seq = self.seqs.entry(rec.device).or_insert(1);
                ins.execute(params![
                    id,
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
                Span::widen(&mut self.spans, rec.device, id);
                self.committed.push((
                    rec.device,
                    (rec.kind == Kind::Event).then(|| Row {
                        id,
                        device: rec.device,
                        kind: rec.kind,
                        key: rec.key.clone(),
                        body: rec.body.clone(),
                        dev_seq: *seq,
                        captured: rec.captured,
                    }),
                ));
                rows_delta += 1;
                bytes_delta += counted(&rec.body, &rec.key) as i64;
                *seq += 1;
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
            let lens: Vec<i64> = self
                .conn
                .prepare_cached(
                    "DELETE FROM outbox WHERE id IN
                       (SELECT id FROM outbox WHERE kind = 0 ORDER BY id LIMIT ?1)
                     RETURNING octet_length(body) + octet_length(key)",
                )?
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
                "DELETE FROM outbox WHERE id = ?1 RETURNING octet_length(body) + octet_length(key)",
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
                    Span::widen(&mut self.spans, r.device, r.id);
                    if !r.captured.synced {
                        let from = self.unsynced_from.entry(r.captured.boot_id).or_insert(r.id);
                        *from = (*from).min(r.id);
                    }
                    n += 1;
                    bytes += counted(&r.body, &r.key);
                }
            }
        }
        tx.commit()?;
        self.stats.pending_rows.fetch_add(n, Relaxed);
        self.stats.pending_bytes.fetch_add(bytes, Relaxed);
        Ok(n)
    }

    /// Up to `limit` rows after `after`, leaving out those acknowledged and not yet deleted.
    pub(super) fn fetch(
        &mut self,
        device: u64,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Row>, OutboxError> {
        // Acknowledged rows are nearly always behind `after` (already sent): read again only
        // when some were left out.
        let mut out: Vec<Row> = Vec::new();
        let mut after = after;
        loop {
            let want = limit - out.len();
            let rows = self.fetch_stored(device, after, want)?;
            let full = rows.len() == want;
            if let Some(last) = rows.last() {
                after = last.id;
            }
            out.extend(rows.into_iter().filter(|r| !self.acks.contains(&r.id)));
            if !full || out.len() >= limit {
                return Ok(out);
            }
        }
    }

    fn fetch_stored(
        &mut self,
        device: u64,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Row>, OutboxError> {
        // By rowid between the device's bounds: no index (schema v5). A device that has had
        // no row since `after` costs no read.
        let Some(span) = self.spans.get(&device).filter(|s| s.last > after) else {
            return Ok(Vec::new());
        };
        let mut st = self.conn.prepare_cached(
            "SELECT id, kind, key, body, dev_seq, captured_at, synced, boot_id, mono_ms FROM outbox
             WHERE id > ?2 AND id <= ?4 AND device = ?1 ORDER BY id LIMIT ?3",
        )?;
        let from = after.max(span.first - 1);
        let (first, last) = (span.first, span.last);
        let rows = st.query_map(params![device as i64, from, limit as i64, last], |r| {
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
        let rows: Vec<Row> = rows.collect::<Result<_, _>>()?;
        // A read from the device's lower bound learns where its rows start now (a delete never
        // narrows the bounds), so the next read from the start (each new session's) does not
        // scan again past what MODE acknowledged. Nothing up to the upper bound: no rows left.
        if after < first && limit > 0 {
            match rows.first() {
                Some(r) => {
                    if let Some(s) = self.spans.get_mut(&device) {
                        s.first = r.id;
                    }
                }
                None => {
                    self.spans.remove(&device);
                }
            }
        }
        Ok(rows)
    }

    /// Per device: rows, bytes and the oldest row's age, from one scan by rowid (no GROUP BY:
    /// without an index it would sort the whole outbox).
    pub(super) fn depth(&mut self) -> Result<HashMap<u64, DeviceDepth>, OutboxError> {
        let mut st = self.conn.prepare_cached(
            "SELECT device, octet_length(body) + octet_length(key), created_at FROM outbox",
        )?;
        let mut out: HashMap<u64, DeviceDepth> = HashMap::new();
        let mut all = st.query([])?;
        while let Some(r) = all.next()? {
            let created: i64 = r.get(2)?;
            let d = out
                .entry(r.get::<_, i64>(0)? as u64)
                .or_insert(DeviceDepth {
                    rows: 0,
                    bytes: 0,
                    oldest_ms: Some(created),
                });
            d.rows += 1;
            d.bytes += r.get::<_, i64>(1)? as u64;
            d.oldest_ms = Some(d.oldest_ms.map_or(created, |o| o.min(created)));
        }
        Ok(out)
    }
}

/// Writes `device_seq` for `devices` inside `tx` (at a clean stop).
pub(super) fn store_seqs(
    tx: &Connection,
    seqs: &HashMap<u64, u64>,
    devices: &[u64],
) -> Result<(), OutboxError> {
    let mut upd = tx.prepare_cached(
        "INSERT INTO device_seq (device, next_seq) VALUES (?1, ?2)
         ON CONFLICT(device) DO UPDATE SET next_seq = max(next_seq, excluded.next_seq)",
    )?;
    for d in devices {
        upd.execute(params![*d as i64, seqs.get(d).copied().unwrap_or(1) as i64])?;
    }
    Ok(())
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
