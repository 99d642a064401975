//! The outbox: the SQLite store of everything accepted locally and not yet acknowledged by MODE.
//!
//! This is the only module that speaks SQL. One writer thread owns the connection; requests
//! arrive on a bounded channel and are handled in *group commits*: whatever is queued when the
//! thread wakes is written in one transaction (WAL, `synchronous=NORMAL` by default), and only
//! then is each append answered — that answer is what lets the local front send its PUBACK.
//! Rows are kept in per-device FIFO order (`id` is AUTOINCREMENT, never reused) and leave only
//! when the uplink acknowledges them. It must not know about MQTT, MODE or devices' names.
//!
//! Files: `schema` (tables, migrations, opening and salvaging a corrupt file), `writer` (the
//! writer thread with its group commits and the checkpointer), `commands` (commands waiting for
//! a device), `kv` (the mirror of each device's MODE store), `inspect` (read-only reports for
//! the `outbox` command). The row and DDP types live in [`crate::local`], shared with `mode`.

mod commands;
mod inspect;
mod kv;
mod schema;
#[cfg(test)]
mod tests;
mod writer;

pub use crate::local::{Capture, Kind, KvChange, KvSnapshot, Row};
pub use commands::TakenCommands;
pub use inspect::{dead_letters, inspect, schema_version, DeviceReport, OutboxReport};
use schema::{open_db, ROW_OVERHEAD};
use writer::{Checkpointer, Writer};

use rusqlite::params;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
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
    /// `synchronous=FULL` (fsync every commit) instead of NORMAL (fsync at checkpoints; a power
    /// cut may lose the last commits but never corrupts).
    pub sync_full: bool,
    /// Above this many bytes of pending messages the oldest events are dropped.
    pub max_bytes: u64,
    /// Above this many pending rows the oldest events are dropped.
    pub max_rows: u64,
    /// New messages are refused while the data disk has less free space than this.
    pub min_free_disk: u64,
}

impl Default for OutboxOptions {
    fn default() -> Self {
        OutboxOptions {
            sync_full: false,
            max_bytes: 256 * 1024 * 1024,
            max_rows: 2_000_000,
            min_free_disk: 64 * 1024 * 1024,
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
    Ack(i64),
    Job(Job),
}

/// Cheap-to-clone handle to the writer thread.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Req>,
    stats: Arc<OutboxStats>,
}

/// Counters the writer thread keeps (read by metrics).
#[derive(Debug, Default)]
pub struct OutboxStats {
    pub commits: AtomicU64,
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

    /// Opens `data_dir/hub.db` and starts the writer thread.
    pub fn open_with(
        data_dir: &Path,
        opts: OutboxOptions,
        notifier: Notifier,
    ) -> Result<(Outbox, std::thread::JoinHandle<()>), OutboxError> {
        std::fs::create_dir_all(data_dir).map_err(|source| OutboxError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = data_dir.join("hub.db");
        let stats = Arc::new(OutboxStats::default());
        let conn = open_db(&path, opts.sync_full, &stats)?;
        let mut seqs = HashMap::new();
        {
            let mut st = conn.prepare("SELECT device, next_seq FROM device_seq")?;
            let rows = st.query_map([], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })?;
            for r in rows {
                let (d, s) = r?;
                seqs.insert(d, s);
            }
        }
        let (rows, bytes): (i64, i64) = conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(body) + LENGTH(key)), 0) FROM outbox",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        stats.pending_rows.store(rows as u64, Relaxed);
        stats
            .pending_bytes
            .store(bytes as u64 + rows as u64 * ROW_OVERHEAD, Relaxed);
        // Checkpoints (which fsync) run on their own thread so that a commit never waits for them.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        let checkpointer = Checkpointer::start(&path, opts.sync_full)?;
        let (tx, rx) = mpsc::channel(MAX_BATCH);
        let writer = Writer {
            conn,
            dir: data_dir.to_path_buf(),
            opts,
            seqs,
            notifier,
            stats: stats.clone(),
            dropping: false,
        };
        let handle = std::thread::Builder::new()
            .name("outbox".into())
            .spawn(move || {
                writer.run(rx);
                checkpointer.stop();
            })
            .expect("spawn outbox thread");
        Ok((Outbox { tx, stats }, handle))
    }

    pub fn stats(&self) -> &OutboxStats {
        &self.stats
    }

    /// Queues a record; the returned waiter resolves once it is committed. Awaiting this call
    /// only waits for queue space (backpressure), so callers keep their submission order.
    pub async fn submit(&self, rec: NewRecord) -> Result<CommitWaiter, OutboxError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Req::Append(rec, tx))
            .await
            .map_err(|_| OutboxError::Closed)?;
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

    /// MODE acknowledged row `id`: delete it (in the next group commit). An acknowledged kv
    /// change is also applied to the device's mirror.
    pub async fn ack(&self, id: i64) {
        let _ = self.tx.send(Req::Ack(id)).await;
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
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// Up to `limit` rows of `device` with `id > after`, oldest first.
    pub async fn fetch(
        &self,
        device: u64,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Row>, OutboxError> {
        self.job(move |w| w.fetch(device, after, limit)).await
    }

    /// Pending rows per device.
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
            Ok(w.conn.execute(
                "UPDATE outbox SET captured_at = mono_ms + ?2, synced = 1
                 WHERE synced = 0 AND boot_id = ?1",
                params![boot_id, offset_ms],
            )? as u64)
        })
        .await
    }
}
