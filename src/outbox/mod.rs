//! The outbox: the SQLite store of everything accepted locally and not yet acknowledged by MODE.
//!
//! This is the only module that speaks SQL. One writer thread owns the connection; requests
//! arrive on a bounded channel and are handled in *group commits*: whatever is queued when the
//! thread wakes (at low rates, whatever comes within the commit window) is written in one
//! transaction (WAL, `synchronous=NORMAL` by default), and only then is each append answered —
//! that answer is what lets the local front send its PUBACK.
//! Rows are kept in per-device FIFO order (`id` is handed out by the writer, increasing, never
//! reused while the hub runs nor colliding with a dead letter's) and leave only
//! when the uplink acknowledges them. It must not know about MQTT, MODE or devices' names.
//!
//! Files: `schema` (tables, migrations, opening and salvaging a corrupt file), `writer` (the
//! writer thread with its group commits), `pace` (the commit window's rule), `checkpoint` (the
//! thread that syncs and checkpoints the WAL), `answers` (a commit's answers to the runtime in
//! one hand-off), `handoff` (committed rows to the
//! uplink, acknowledged rows to the writer, without a round trip), `commands` (commands waiting
//! for a device), `kv` (the mirror of each device's MODE store), `inspect` (read-only reports
//! for the `outbox` command). The row and DDP types live in [`crate::local`], shared with `mode`.

mod answers;
mod checkpoint;
mod commands;
mod handoff;
mod inspect;
mod kv;
mod pace;
mod schema;
mod seqfloor;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_v3;
#[cfg(test)]
mod tests_v4;
#[cfg(test)]
mod tests_v5;
mod writer;

pub use crate::local::{Capture, Kind, KvChange, KvSnapshot, Row};
use checkpoint::{Checkpointer, WAL_KEEP_BYTES};
pub use commands::TakenCommands;
use handoff::{Acked, Handoff, ACK_BATCH};
pub use inspect::{dead_letters, inspect, schema_version, DeviceReport, OutboxReport};
use schema::{load_start, open_db, set_seq_dirty, ROW_OVERHEAD};
use writer::Writer;

use rusqlite::params;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// A message to store.
#[derive(Debug, Clone)]
pub struct NewRecord {
    /// MODE device ID.
    pub device: u64,
    pub kind: Kind,
    /// Event type, or kv key.
    pub key: String,
    /// Raw JSON: the event's data object, or the kv value ("" for a delete).
    pub body: String,
    pub captured: Capture,
}

/// Backlog of one device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceDepth {
    pub rows: u64,
    pub bytes: u64,
    /// Unix ms of the oldest pending row.
    pub oldest_ms: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("cannot create data directory {path}: {source}. Create it and give the hub's user write access.")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the outbox database {path}: {source}. The hub never deletes it for you; check the file's permissions and the disk.")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("outbox database {path} has schema version {found}, newer than this modehub knows ({known}). Upgrade modehub.")]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("only {free} bytes free on the data disk, below hub.min_free_disk = {min}: new messages are refused until space returns. Free space under {path} or lower hub.min_free_disk.")]
    DiskFull { path: PathBuf, free: u64, min: u64 },
    #[error("outbox write failed: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("outbox commit failed: {0}")]
    Commit(Arc<OutboxError>),
    #[error("outbox is shut down")]
    Closed,
}

impl OutboxError {
    /// The disk (or the free-space watermark) is full: retrying later may work.
    pub fn is_disk_full(&self) -> bool {
        match self {
            OutboxError::DiskFull { .. } => true,
            OutboxError::Commit(e) => e.is_disk_full(),
            OutboxError::Sql(e) => e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull),
            _ => false,
        }
    }
}

/// Bounds and durability of the outbox.
#[derive(Debug, Clone)]
pub struct OutboxOptions {
    /// `synchronous=FULL` (fsync every commit) instead of NORMAL (the checkpointer syncs the
    /// WAL once 64 rows or 5 s of commits wait; a power cut may lose those but never corrupts).
    pub sync_full: bool,
    /// Above this many bytes of pending messages the oldest events are dropped.
    pub max_bytes: u64,
    /// Above this many pending rows the oldest events are dropped.
    pub max_rows: u64,
    /// New messages are refused while the data disk has less free space than this.
    pub min_free_disk: u64,
    /// At low arrival rates the writer holds the first append of a group commit this long for
    /// more (the commit waiter, so the local PUBACK, waits with it): every commit rewrites a
    /// few whole pages and every WAL sync a 4 KiB one, so at a few events a second a commit
    /// per event wrote ~7 KB per event to the card. Zero: commit at once. See
    /// `pace::Pace::window_for` for the adaptive rule (short at high rates, ended early for a
    /// device that waits for its PUBACK before sending again).
    pub commit_window: std::time::Duration,
}

impl Default for OutboxOptions {
    fn default() -> Self {
        OutboxOptions {
            sync_full: false,
            max_bytes: 256 * 1024 * 1024,
            max_rows: 2_000_000,
            min_free_disk: 64 * 1024 * 1024,
            commit_window: std::time::Duration::ZERO,
        }
    }
}

/// Answers one append once its commit is done.
type CommitReply = oneshot::Sender<Result<(), Arc<OutboxError>>>;

/// Callback run after each commit for every device that got new rows.
pub type Notifier = Arc<dyn Fn(u64) + Send + Sync>;

/// Work run on the writer thread after the current group commit.
type Job = Box<dyn FnOnce(&mut Writer) + Send>;

enum Req {
    Append(NewRecord, CommitReply),
    /// Acknowledged rows are waiting in [`Acked`] and the writer may sleep without a deadline.
    Wake,
    /// `fetch`: the uplink's read, kept apart from other jobs because it need not wait for the
    /// deferred acknowledgements to be committed (it skips them).
    Fetch(
        u64,
        i64,
        usize,
        oneshot::Sender<Result<Vec<Row>, OutboxError>>,
    ),
    Job(Job),
    /// `ping`: answered after the current group's commit, like a job, but it neither ends the
    /// commit window nor forces the deferred deletes into a commit (the watchdog's check).
    Ping(oneshot::Sender<()>),
}

/// Cheap-to-clone handle to the writer thread.
#[derive(Clone)]
pub struct Outbox {
    // Declared (so dropped) before `wake`: when the last handle goes, the channel is closed
    // before the writer is unparked to see it.
    tx: mpsc::Sender<Req>,
    wake: Arc<WriterWake>,
    stats: Arc<OutboxStats>,
    acked: Arc<Acked>,
    handoff: Arc<Handoff>,
}

/// Wakes the writer while it holds a commit window open (it waits parked, not on the channel:
/// see `pace::Shared::ends_window`). Unparks it once more when the last handle is dropped, so
/// that it sees the closed channel at once instead of at the window's end.
struct WriterWake {
    thread: std::thread::Thread,
    pace: Arc<pace::Shared>,
}

impl Drop for WriterWake {
    fn drop(&mut self) {
        self.thread.unpark();
    }
}

/// Counters the writer thread keeps (read by metrics).
#[derive(Debug, Default)]
pub struct OutboxStats {
    pub commits: AtomicU64,
    /// WAL syncs and checkpoints by the checkpointer thread.
    pub wal_syncs: AtomicU64,
    pub rows_appended: AtomicU64,
    pub rows_acked: AtomicU64,
    pub commit_errors: AtomicU64,
    /// Sum of commit durations in microseconds.
    pub commit_micros: AtomicU64,
    /// kv rows replaced by a newer change of the same key before they were sent.
    pub kv_coalesced: AtomicU64,
    /// Events dropped (oldest first) because the outbox hit its bounds.
    pub dropped_full: AtomicU64,
    /// Appends refused because the disk is (nearly) full.
    pub refused_disk_full: AtomicU64,
    /// 1 while appends are being refused for lack of disk space.
    pub disk_full: AtomicU64,
    /// Rows moved to the dead-letter table.
    pub dead_lettered: AtomicU64,
    /// Times the database was found corrupt (at open or at run time).
    pub corruption_detected: AtomicU64,
    /// Rows recovered from a corrupt database into a new one.
    pub salvaged_rows: AtomicU64,
    /// Pending rows and their bytes (kept by the writer).
    pub pending_rows: AtomicU64,
    pub pending_bytes: AtomicU64,
    /// No waiting command expires before this (ms since the epoch; `i64::MAX`: none waits). May
    /// be early, never late: [`Outbox::expire_commands`] asks the writer only once it is due.
    pub next_command_expiry: AtomicI64,
    /// Commit latency histogram: slot `i` counts commits that took more than the previous
    /// bound and at most `COMMIT_BUCKETS_MICROS[i]`; the last slot counts slower ones (+Inf).
    pub commit_buckets: [AtomicU64; COMMIT_BUCKETS_MICROS.len() + 1],
}

/// Upper bounds of the commit latency histogram's buckets, in microseconds.
pub const COMMIT_BUCKETS_MICROS: [u64; 12] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000,
];

impl OutboxStats {
    fn observe_commit(&self, micros: u64) {
        self.commit_micros.fetch_add(micros, Relaxed);
        let slot = COMMIT_BUCKETS_MICROS
            .iter()
            .position(|b| micros <= *b)
            .unwrap_or(COMMIT_BUCKETS_MICROS.len());
        self.commit_buckets[slot].fetch_add(1, Relaxed);
    }
}

/// Waits for one append to be committed.
pub type CommitWaiter = oneshot::Receiver<Result<(), Arc<OutboxError>>>;

/// Result of taking a device's waiting commands.
/// A message MODE refused for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: i64,
    pub device: u64,
    pub kind: Kind,
    pub key: String,
    pub reason: String,
    pub failed_at_ms: i64,
}

/// Most requests the writer takes in one group commit (and its queue length).
const MAX_BATCH: usize = 4096;

impl Outbox {
    /// Opens `data_dir/hub.db` with default bounds and starts the writer thread.
    pub fn open(
        data_dir: &Path,
        sync_full: bool,
        notifier: Notifier,
    ) -> Result<(Outbox, std::thread::JoinHandle<()>), OutboxError> {
        Outbox::open_with(
            data_dir,
            OutboxOptions {
                sync_full,
                ..OutboxOptions::default()
            },
            notifier,
        )
    }

    /// Opens `data_dir/hub.db` and starts the writer thread. The data directory is created 0700
    /// and the database 0600 whatever the umask (SQLite gives its WAL and shm files the
    /// database's mode): they hold device data and the command queue.
    pub fn open_with(
        data_dir: &Path,
        opts: OutboxOptions,
        notifier: Notifier,
    ) -> Result<(Outbox, std::thread::JoinHandle<()>), OutboxError> {
        let path = data_dir.join("hub.db");
        private_files(data_dir, &path).map_err(|source| OutboxError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let stats = Arc::new(OutboxStats::default());
        let conn = open_db(&path, opts.sync_full, &stats)?;
        let floor = seqfloor::SeqFloor::load(data_dir);
        let start = load_start(&conn)?;
        let mut seqs = start.seqs;
        floor.apply(&mut seqs);
        if start.seq_dirty {
            let moved = floor.raise_to_marks(&mut seqs);
            if moved > 0 {
                tracing::warn!(
                    devices = moved,
                    "the outbox writer did not stop cleanly last time (crash, kill or power cut): _seq continues at the seq-floor mark, a gap of at most {} per device, never a repeat",
                    seqfloor::BLOCK
                );
            }
        }
        set_seq_dirty(&conn, true).map_err(|source| OutboxError::Open {
            path: path.clone(),
            source,
        })?;
        stats.pending_rows.store(start.rows, Relaxed);
        stats
            .pending_bytes
            .store(start.bytes + start.rows * ROW_OVERHEAD, Relaxed);
        stats.next_command_expiry.store(
            commands::earliest_expiry(&conn).map_err(|source| OutboxError::Open {
                path: path.clone(),
                source,
            })?,
            Relaxed,
        );
        // Checkpoints (which fsync) run on their own thread so that a commit never waits for them.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        // A WAL that grew in a burst is cut back to this when it starts over.
        conn.pragma_update(None, "journal_size_limit", WAL_KEEP_BYTES)?;
        let (checkpointer, nudge) = Checkpointer::start(&path, opts.sync_full, stats.clone())?;
        let (tx, rx) = mpsc::channel(MAX_BATCH);
        let acked = Arc::new(Acked::default());
        let handoff = Arc::new(Handoff::default());
        let pace = pace::Pace::default();
        let pace_shared = pace.shared.clone();
        let writer = Writer {
            nudge,
            answers: answers::Answers::start(notifier),
            replies: Vec::new(),
            acked: acked.clone(),
            handoff: handoff.clone(),
            acks: Vec::new(),
            committed: Vec::new(),
            conn,
            dir: data_dir.to_path_buf(),
            opts,
            seqs,
            stored_seqs: start.stored_seqs,
            next_id: start.next_id,
            floor,
            stats: stats.clone(),
            dropping: false,
            pace,
            unsynced_from: start.unsynced_from,
            spans: start.spans,
            disk: None,
        };
        let handle = std::thread::Builder::new()
            .name("outbox".into())
            .spawn(move || {
                writer.run(rx);
                checkpointer.stop();
            })
            .expect("spawn outbox thread");
        Ok((
            Outbox {
                tx,
                wake: Arc::new(WriterWake {
                    thread: handle.thread().clone(),
                    pace: pace_shared,
                }),
                stats,
                acked,
                handoff,
            },
            handle,
        ))
    }

    pub fn stats(&self) -> &OutboxStats {
        &self.stats
    }

    /// Queues a record; the returned waiter resolves once it is committed. Awaiting this call
    /// only waits for queue space (backpressure), so callers keep their submission order.
    pub async fn submit(&self, rec: NewRecord) -> Result<CommitWaiter, OutboxError> {
        let (tx, rx) = oneshot::channel();
        let device = rec.device;
        let pace = &self.wake.pace;
        pace.queued.fetch_add(1, Relaxed);
        if self.tx.send(Req::Append(rec, tx)).await.is_err() {
            pace.queued.fetch_sub(1, Relaxed);
            return Err(OutboxError::Closed);
        }
        if pace.ends_window(device) {
            self.wake.thread.unpark();
        }
        Ok(rx)
    }

    /// Submits and waits for the commit.
    pub async fn append(&self, rec: NewRecord) -> Result<(), OutboxError> {
        let waiter = self.submit(rec).await?;
        match waiter.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(OutboxError::Commit(e)),
            Err(_) => Err(OutboxError::Closed),
        }
    }

    /// MODE acknowledged row `id`: delete it (with the next append's commit, or within
    /// `handoff::ACK_DELAY`; reads skip it at once). An acknowledged kv change is also applied
    /// to the device's mirror then. Wakes the writer only when it sleeps without a deadline.
    pub async fn ack(&self, id: i64) {
        let wake = {
            let mut ids = self.acked.ids.lock().expect("acked lock");
            ids.push(id);
            ids.len() >= ACK_BATCH || self.acked.writer_idle.swap(false, Relaxed)
        };
        if wake {
            let _ = self.tx.send(Req::Wake).await;
        }
    }

    /// Puts back rows MODE had acknowledged (it dropped them: a deactivated home), with their
    /// original ids, sequence numbers and capture times, so they go again in their original
    /// order. A row whose id is present is left alone. Returns how many were put back.
    pub async fn restore(&self, rows: Vec<Row>) -> Result<u64, OutboxError> {
        self.job(move |w| w.restore(rows)).await
    }

    /// Runs `f` on the writer thread (after the current group commit) and returns its result.
    async fn job<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Writer) -> Result<T, OutboxError> + Send + 'static,
    ) -> Result<T, OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Req::Job(Box::new(move |w| {
                let _ = reply.send(f(w));
            })))
            .await
            .map_err(|_| OutboxError::Closed)?;
        // A job ends the commit window.
        self.wake.thread.unpark();
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// Up to `limit` rows of `device` with `id > after`, oldest first.
    pub async fn fetch(
        &self,
        device: u64,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Row>, OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Req::Fetch(device, after, limit, reply))
            .await
            .map_err(|_| OutboxError::Closed)?;
        // So does a read.
        self.wake.thread.unpark();
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// Answers after the commit of the group this request joined: the writer is alive and
    /// everything queued before this one is committed. Costs no read and no commit of its own,
    /// and does not end the commit window (the systemd watchdog's check).
    pub async fn ping(&self) -> Result<(), OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Req::Ping(reply))
            .await
            .map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)
    }

    /// Rows in the outbox, from the writer's own count (no read): it includes rows MODE
    /// acknowledged whose delete waits for the next commit (`handoff::ACK_DELAY`).
    pub fn pending_rows(&self) -> u64 {
        self.stats.pending_rows.load(Relaxed)
    }

    /// Pending rows per device (a read of the whole outbox on the writer thread: for operators'
    /// requests, not for timers).
    pub async fn depth(&self) -> Result<HashMap<u64, DeviceDepth>, OutboxError> {
        self.job(|w| w.depth()).await
    }

    /// MODE refused row `id` for good: move it to the dead-letter table with `reason`.
    pub async fn dead_letter(&self, id: i64, reason: String) -> Result<bool, OutboxError> {
        self.job(move |w| w.dead_letter(id, &reason)).await
    }

    /// The most recent dead letters, newest first.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, OutboxError> {
        self.job(move |w| dead_letters(&w.conn, limit)).await
    }

    /// The wall clock became known: rows captured during boot `boot_id` before that get
    /// `wall = mono_ms + offset_ms`. Returns how many rows were repaired.
    pub async fn repair_capture(&self, boot_id: i64, offset_ms: i64) -> Result<u64, OutboxError> {
        self.job(move |w| {
            // Every row of this boot still unsynchronised has an id from here on.
            let Some(&from) = w.unsynced_from.get(&boot_id) else {
                return Ok(0);
            };
            let n = w.conn.execute(
                "UPDATE outbox SET captured_at = mono_ms + ?2, synced = 1
                 WHERE id >= ?3 AND synced = 0 AND boot_id = ?1",
                params![boot_id, offset_ms, from],
            )? as u64;
            w.unsynced_from.remove(&boot_id);
            Ok(n)
        })
        .await
    }
}

/// Creates `data_dir` (0700, with missing parents) if needed, and `db` 0600 (an existing one is
/// narrowed to 0600, and so are its WAL and shm files). Outside systemd's StateDirectoryMode
/// the umask would leave them 0755 / 0644.
fn private_files(data_dir: &Path, db: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        if !data_dir.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(data_dir)?;
            // DirBuilder's mode passes through the umask; make sure.
            std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(db)?;
        for suffix in ["", "-wal", "-shm"] {
            let f = PathBuf::from(format!("{}{suffix}", db.display()));
            if let Ok(meta) = std::fs::metadata(&f) {
                if meta.permissions().mode() & 0o077 != 0 {
                    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600))?;
                }
            }
        }
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(data_dir)?;
    Ok(())
}
