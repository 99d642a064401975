//! The outbox: the SQLite store of everything accepted locally and not yet acknowledged by MODE.
//!
//! This is the only module that speaks SQL. One writer thread owns the connection; requests
//! arrive on a bounded channel and are handled in *group commits*: whatever is queued when the
//! thread wakes is written in one transaction (WAL, `synchronous=NORMAL` by default), and only
//! then is each append answered — that answer is what lets the local front send its PUBACK.
//! Rows are kept in per-device FIFO order (`id` is AUTOINCREMENT, never reused) and leave only
//! when the uplink acknowledges them. It must not know about MQTT, MODE or devices' names.

use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// What a row carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Event = 0,
    KvSet = 1,
    KvDelete = 2,
}

impl Kind {
    fn from_i64(v: i64) -> Kind {
        match v {
            1 => Kind::KvSet,
            2 => Kind::KvDelete,
            _ => Kind::Event,
        }
    }
}

/// When a message was captured. A Pi has no real-time clock: until the system clock is
/// synchronised, `wall_ms` is a guess and `(boot_id, mono_ms)` is what can be trusted; the wall
/// time of such rows is repaired later with [`Outbox::repair_capture`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capture {
    /// Wall clock, Unix milliseconds.
    pub wall_ms: i64,
    /// Whether the wall clock was known to be synchronised at capture.
    pub synced: bool,
    /// Identifies the boot (a hash of the kernel's boot id); 0 = unknown.
    pub boot_id: i64,
    /// Monotonic time since boot (CLOCK_BOOTTIME), milliseconds.
    pub mono_ms: i64,
}

impl Capture {
    /// A capture at a known wall time (tests, tools).
    pub fn at(wall_ms: i64) -> Capture {
        Capture {
            wall_ms,
            synced: true,
            boot_id: 0,
            mono_ms: 0,
        }
    }
}

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

/// A stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub id: i64,
    pub device: u64,
    pub kind: Kind,
    pub key: String,
    pub body: String,
    /// Per-device sequence number, monotonic across restarts.
    pub dev_seq: u64,
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

/// A DDP change from MODE, already parsed (the wire format lives in `mode`).
#[derive(Debug, Clone, PartialEq)]
pub enum KvChange {
    /// Replace the whole store. `rev` is `None` when the transport has no revisions (REST):
    /// then the reload is authoritative and applied unconditionally.
    Reload {
        rev: Option<i64>,
        /// (key, raw JSON value)
        items: Vec<(String, String)>,
    },
    Set {
        rev: i64,
        key: String,
        value: String,
    },
    Delete {
        rev: i64,
        key: String,
    },
}

/// What the hub serves a local device as its store: the mirror plus local changes MODE has not
/// acknowledged yet.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KvSnapshot {
    /// Whether MODE's store was ever loaded into the mirror.
    pub loaded: bool,
    pub rev: i64,
    /// (key, raw JSON value), sorted by key.
    pub items: Vec<(String, String)>,
}

/// Result of taking a device's waiting commands.
#[derive(Debug, Default)]
pub struct TakenCommands {
    /// Payloads to deliver, oldest first.
    pub deliver: Vec<Vec<u8>>,
    /// Commands that had expired and were discarded.
    pub expired: u64,
}

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

const SCHEMA_VERSION: i64 = 2;
const MAX_BATCH: usize = 4096;
/// Rough per-row overhead counted against `max_bytes` (row header, index entries).
const ROW_OVERHEAD: u64 = 48;

/// Each entry migrates the schema from version `index` to `index + 1`.
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE outbox (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        device      INTEGER NOT NULL,
        kind        INTEGER NOT NULL,
        key         TEXT    NOT NULL,
        body        TEXT    NOT NULL,
        dev_seq     INTEGER NOT NULL,
        captured_at INTEGER NOT NULL,
        created_at  INTEGER NOT NULL
    );
    CREATE INDEX outbox_device ON outbox(device, id);
    CREATE TABLE device_seq (
        device   INTEGER PRIMARY KEY,
        next_seq INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE dead_letter (
        id          INTEGER PRIMARY KEY,
        device      INTEGER NOT NULL,
        kind        INTEGER NOT NULL,
        key         TEXT    NOT NULL,
        body        TEXT    NOT NULL,
        dev_seq     INTEGER NOT NULL,
        captured_at INTEGER NOT NULL,
        reason      TEXT    NOT NULL,
        failed_at   INTEGER NOT NULL
    );
",
    "
    ALTER TABLE outbox ADD COLUMN synced  INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE outbox ADD COLUMN boot_id INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE outbox ADD COLUMN mono_ms INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX outbox_kv ON outbox(device, key) WHERE kind != 0;
    CREATE INDEX outbox_unsynced ON outbox(boot_id) WHERE synced = 0;
    CREATE TABLE pending_command (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        device      INTEGER NOT NULL,
        payload     BLOB    NOT NULL,
        received_at INTEGER NOT NULL,
        expires_at  INTEGER NOT NULL
    );
    CREATE INDEX pending_command_device ON pending_command(device, id);
    CREATE TABLE kv_mirror (
        device INTEGER NOT NULL,
        key    TEXT    NOT NULL,
        value  TEXT,
        rev    INTEGER NOT NULL,
        PRIMARY KEY (device, key)
    ) WITHOUT ROWID;
    CREATE TABLE kv_state (
        device     INTEGER PRIMARY KEY,
        rev        INTEGER NOT NULL,
        reload_rev INTEGER NOT NULL
    ) WITHOUT ROWID;
",
];

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
}

/// Opens the database, applies the pragmas and checks it is readable.
fn open_raw(path: &Path, sync_full: bool) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // New databases use 1 KiB pages: every group commit appends each page it touched to the WAL,
    // and a commit touches a handful of pages whatever its size, so at a few rows per commit
    // small pages write ~4x fewer bytes per event (SD-card wear; docs/BENCHMARKS.md). Must come
    // before WAL mode; it does nothing to an existing database.
    conn.pragma_update(None, "page_size", 1024)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(
        None,
        "synchronous",
        if sync_full { "FULL" } else { "NORMAL" },
    )?;
    // A small page cache: the hub reads what it just wrote, and RAM on a Pi is scarce.
    conn.pragma_update(None, "cache_size", -2000)?;
    let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if check != "ok" {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
            Some(format!("quick_check: {check}")),
        ));
    }
    Ok(conn)
}

fn migrate(conn: &Connection, path: &Path) -> Result<(), OutboxError> {
    let open_err = |source| OutboxError::Open {
        path: path.to_path_buf(),
        source,
    };
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(open_err)?;
    if version > SCHEMA_VERSION {
        return Err(OutboxError::TooNew {
            path: path.to_path_buf(),
            found: version,
            known: SCHEMA_VERSION,
        });
    }
    for (v, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.unchecked_transaction().map_err(open_err)?;
        tx.execute_batch(sql).map_err(open_err)?;
        tx.pragma_update(None, "user_version", v as i64 + 1)
            .map_err(open_err)?;
        tx.commit().map_err(open_err)?;
        tracing::info!(from = v, to = v + 1, "outbox schema migrated");
    }
    Ok(())
}

/// Opens (creating or migrating) the database. A corrupt file is never deleted nor silently
/// recreated: it is moved aside, what can still be read is salvaged into a fresh database, and
/// the event is logged loudly and counted.
fn open_db(path: &Path, sync_full: bool, stats: &OutboxStats) -> Result<Connection, OutboxError> {
    let open_err = |source| OutboxError::Open {
        path: path.to_path_buf(),
        source,
    };
    match open_raw(path, sync_full) {
        Ok(conn) => {
            migrate(&conn, path)?;
            Ok(conn)
        }
        Err(e) if is_corruption(&e) => {
            stats.corruption_detected.fetch_add(1, Relaxed);
            let aside = path.with_extension(format!("db.corrupt-{}", now_ms()));
            tracing::error!(path = %path.display(), error = %e, moved_to = %aside.display(),
                "OUTBOX DATABASE IS CORRUPT: moving it aside and salvaging what can be read into a new one");
            for suffix in ["", "-wal", "-shm"] {
                let from = PathBuf::from(format!("{}{suffix}", path.display()));
                if from.exists() {
                    let to = PathBuf::from(format!("{}{suffix}", aside.display()));
                    std::fs::rename(&from, &to).map_err(|source| OutboxError::DataDir {
                        path: from.clone(),
                        source,
                    })?;
                }
            }
            let conn = open_raw(path, sync_full).map_err(open_err)?;
            migrate(&conn, path)?;
            let n = salvage(&aside, &conn);
            stats.salvaged_rows.fetch_add(n, Relaxed);
            tracing::error!(salvaged_rows = n, from = %aside.display(),
                "outbox salvage finished; the corrupt file is kept for inspection");
            Ok(conn)
        }
        Err(e) => Err(open_err(e)),
    }
}

/// Copies what can be read from a corrupt database into `into`. Best effort, row by row:
/// rows that cannot be read are skipped. Sequence numbers are kept ahead of everything salvaged.
fn salvage(from: &Path, into: &Connection) -> u64 {
    let Ok(old) = Connection::open_with_flags(from, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return 0;
    };
    let mut copied = 0u64;
    let mut last = 0i64;
    let mut errors = 0;
    let mut seq_max: HashMap<i64, i64> = HashMap::new();
    while errors < 1000 {
        let res = (|| -> rusqlite::Result<bool> {
            let mut st = old.prepare(
                "SELECT id, device, kind, key, body, dev_seq, captured_at, created_at
                 FROM outbox WHERE id > ?1 ORDER BY id LIMIT 1000",
            )?;
            let mut rows = st.query([last])?;
            let mut any = false;
            while let Some(r) = rows.next()? {
                any = true;
                let id: i64 = r.get(0)?;
                last = id;
                let device: i64 = r.get(1)?;
                let seq: i64 = r.get(5)?;
                into.execute(
                    "INSERT OR IGNORE INTO outbox (id, device, kind, key, body, dev_seq, captured_at, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![
                        id,
                        device,
                        r.get::<_, i64>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                        seq,
                        r.get::<_, i64>(6)?,
                        r.get::<_, i64>(7)?
                    ],
                )?;
                let m = seq_max.entry(device).or_insert(0);
                *m = (*m).max(seq);
                copied += 1;
            }
            Ok(any)
        })();
        match res {
            Ok(true) => {}
            Ok(false) => break,
            Err(_) => {
                errors += 1;
                last += 1;
            }
        }
    }
    // Sequence numbers must never go back: take the old table where readable, and leave a gap
    // above the highest salvaged row in case the old table was lost.
    if let Ok(mut st) = old.prepare("SELECT device, next_seq FROM device_seq") {
        if let Ok(rows) = st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))) {
            for (d, s) in rows.flatten() {
                let m = seq_max.entry(d).or_insert(0);
                *m = (*m).max(s);
            }
        }
    }
    for (d, s) in seq_max {
        let _ = into.execute(
            "INSERT INTO device_seq (device, next_seq) VALUES (?1, ?2)
             ON CONFLICT(device) DO UPDATE SET next_seq = max(next_seq, excluded.next_seq)",
            params![d, s + 1000],
        );
    }
    for table in ["kv_mirror", "kv_state", "dead_letter"] {
        let _ = into.execute_batch(&format!(
            "ATTACH DATABASE '{}' AS old; INSERT OR IGNORE INTO main.{table} SELECT * FROM old.{table}; DETACH DATABASE old;",
            from.display().to_string().replace('\'', "''")
        ));
        let _ = into.execute_batch("DETACH DATABASE old;");
    }
    copied
}

/// Free bytes for unprivileged users on the file system holding `path`.
fn free_disk(path: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some(st.blocks_available() as u64 * st.fragment_size() as u64)
}

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

    /// Stores a command for a device that is not listening, keeping at most `max` per device
    /// (the oldest are dropped). Returns how many were dropped.
    pub async fn queue_command(
        &self,
        device: u64,
        payload: Vec<u8>,
        now_ms: i64,
        ttl_ms: i64,
        max: usize,
    ) -> Result<u64, OutboxError> {
        self.job(move |w| {
            let tx = w.conn.transaction()?;
            tx.execute(
                "INSERT INTO pending_command (device, payload, received_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4)",
                params![device as i64, payload, now_ms, now_ms + ttl_ms],
            )?;
            let dropped = tx.execute(
                "DELETE FROM pending_command WHERE device = ?1 AND id NOT IN
                   (SELECT id FROM pending_command WHERE device = ?1 ORDER BY id DESC LIMIT ?2)",
                params![device as i64, max as i64],
            )?;
            tx.commit()?;
            Ok(dropped as u64)
        })
        .await
    }

    /// Removes and returns a device's waiting commands, oldest first; expired ones are
    /// discarded and counted instead.
    pub async fn take_commands(
        &self,
        device: u64,
        now_ms: i64,
    ) -> Result<TakenCommands, OutboxError> {
        self.job(move |w| {
            let tx = w.conn.transaction()?;
            let mut out = TakenCommands::default();
            {
                let mut st = tx.prepare_cached(
                    "DELETE FROM pending_command WHERE device = ?1
                     RETURNING id, payload, expires_at",
                )?;
                let mut rows: Vec<(i64, Vec<u8>, i64)> = st
                    .query_map([device as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect::<Result<_, _>>()?;
                rows.sort_by_key(|r| r.0);
                for (_, payload, expires) in rows {
                    if expires <= now_ms {
                        out.expired += 1;
                    } else {
                        out.deliver.push(payload);
                    }
                }
            }
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    /// Discards expired commands; returns (device, count) for each device that lost some.
    pub async fn expire_commands(&self, now_ms: i64) -> Result<Vec<(u64, u64)>, OutboxError> {
        self.job(move |w| {
            let mut st = w.conn.prepare_cached(
                "DELETE FROM pending_command WHERE expires_at <= ?1 RETURNING device",
            )?;
            let mut per: HashMap<u64, u64> = HashMap::new();
            for d in st.query_map([now_ms], |r| r.get::<_, i64>(0))? {
                *per.entry(d? as u64).or_default() += 1;
            }
            Ok(per.into_iter().collect())
        })
        .await
    }

    /// Commands waiting per device.
    pub async fn pending_commands(&self) -> Result<HashMap<u64, u64>, OutboxError> {
        self.job(|w| {
            let mut st = w
                .conn
                .prepare_cached("SELECT device, COUNT(*) FROM pending_command GROUP BY device")?;
            let rows = st.query_map([], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// Applies a DDP change from MODE to the device's mirror with MODE's revision rule: nothing
    /// that is not newer than what is held, and no set/delete before the first reload. Returns
    /// whether it changed the mirror.
    pub async fn kv_apply(&self, device: u64, change: KvChange) -> Result<bool, OutboxError> {
        self.job(move |w| w.kv_apply(device, change)).await
    }

    /// The device's store as served locally: the mirror with unacknowledged local changes on top.
    pub async fn kv_snapshot(&self, device: u64) -> Result<KvSnapshot, OutboxError> {
        self.job(move |w| kv_snapshot(&w.conn, device)).await
    }
}

/// Reads dead letters, newest first (also used by the `outbox` CLI on a read-only connection).
pub fn dead_letters(conn: &Connection, limit: usize) -> Result<Vec<DeadLetter>, OutboxError> {
    let mut st = conn.prepare_cached(
        "SELECT id, device, kind, key, reason, failed_at FROM dead_letter ORDER BY id DESC LIMIT ?1",
    )?;
    let rows = st.query_map([limit as i64], |r| {
        Ok(DeadLetter {
            id: r.get(0)?,
            device: r.get::<_, i64>(1)? as u64,
            kind: Kind::from_i64(r.get(2)?),
            key: r.get(3)?,
            reason: r.get(4)?,
            failed_at_ms: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn kv_snapshot(conn: &Connection, device: u64) -> Result<KvSnapshot, OutboxError> {
    let state: Option<i64> = conn
        .query_row(
            "SELECT rev FROM kv_state WHERE device = ?1",
            [device as i64],
            |r| r.get(0),
        )
        .optional()?;
    let mut items: std::collections::BTreeMap<String, String> = Default::default();
    {
        let mut st = conn.prepare_cached(
            "SELECT key, value FROM kv_mirror WHERE device = ?1 AND value IS NOT NULL",
        )?;
        for r in st.query_map([device as i64], |r| Ok((r.get(0)?, r.get(1)?)))? {
            let (k, v): (String, String) = r?;
            items.insert(k, v);
        }
        let mut st = conn.prepare_cached(
            "SELECT kind, key, body FROM outbox WHERE device = ?1 AND kind != 0 ORDER BY id",
        )?;
        for r in st.query_map([device as i64], |r| {
            Ok((r.get::<_, i64>(0)?, r.get(1)?, r.get(2)?))
        })? {
            let (kind, k, v): (i64, String, String) = r?;
            if Kind::from_i64(kind) == Kind::KvSet {
                items.insert(k, v);
            } else {
                items.remove(&k);
            }
        }
    }
    Ok(KvSnapshot {
        loaded: state.is_some(),
        rev: state.unwrap_or(0),
        items: items.into_iter().collect(),
    })
}

/// How often the checkpointer copies committed WAL frames into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// WAL length (pages) at which the checkpointer briefly holds off the writer so that the WAL can
/// start over (16 MiB with 1 KiB pages); below it, checkpoints never block a commit.
const WAL_RESTART_PAGES: i64 = 16 * 1024;

/// Copies the WAL into the database file on its own thread and connection. SQLite's automatic
/// checkpoint would run inside a commit on the writer thread and make that commit (and every
/// PUBACK waiting for it) wait for two fsyncs: tens of ms on an SD card or a busy disk, which was
/// the hub's p99 latency (docs/BENCHMARKS.md). A PASSIVE checkpoint runs alongside commits.
struct Checkpointer {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Checkpointer {
    fn start(path: &Path, sync_full: bool) -> Result<Checkpointer, rusqlite::Error> {
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
    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

pub(crate) struct Writer {
    conn: Connection,
    dir: PathBuf,
    opts: OutboxOptions,
    /// Next per-device sequence number.
    seqs: HashMap<u64, u64>,
    notifier: Notifier,
    stats: Arc<OutboxStats>,
    /// In a burst of bound-enforcing drops (to log once per burst).
    dropping: bool,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Req>) {
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
    fn classify(&self, e: OutboxError) -> OutboxError {
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
    fn check_disk(&mut self) -> Result<(), OutboxError> {
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

    fn reload_seqs(&mut self) {
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

    fn commit(
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
    fn enforce_bounds(&mut self) -> Result<(), OutboxError> {
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

    fn dead_letter(&mut self, id: i64, reason: &str) -> Result<bool, OutboxError> {
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

    fn kv_apply(&mut self, device: u64, change: KvChange) -> Result<bool, OutboxError> {
        let d = device as i64;
        let tx = self.conn.transaction()?;
        let state: Option<(i64, i64)> = tx
            .query_row(
                "SELECT rev, reload_rev FROM kv_state WHERE device = ?1",
                [d],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let applied = match change {
            KvChange::Reload { rev, items } => {
                let new_rev = match (rev, state) {
                    (Some(r), Some((held, _))) if r <= held => None,
                    (Some(r), _) => Some(r),
                    (None, Some((held, _))) => Some(held),
                    (None, None) => Some(0),
                };
                match new_rev {
                    None => false,
                    Some(r) => {
                        tx.execute("DELETE FROM kv_mirror WHERE device = ?1", [d])?;
                        {
                            let mut ins = tx.prepare_cached(
                                "INSERT OR REPLACE INTO kv_mirror (device, key, value, rev) VALUES (?1, ?2, ?3, ?4)",
                            )?;
                            for (k, v) in &items {
                                ins.execute(params![d, k, v, r])?;
                            }
                        }
                        tx.execute(
                            "INSERT OR REPLACE INTO kv_state (device, rev, reload_rev) VALUES (?1, ?2, ?2)",
                            params![d, r],
                        )?;
                        true
                    }
                }
            }
            KvChange::Set { rev, ref key, .. } | KvChange::Delete { rev, ref key } => {
                let Some((held, reload_rev)) = state else {
                    return Ok(false); // nothing before the first reload
                };
                let key_rev: Option<i64> = tx
                    .query_row(
                        "SELECT rev FROM kv_mirror WHERE device = ?1 AND key = ?2",
                        params![d, key],
                        |r| r.get(0),
                    )
                    .optional()?;
                if rev <= reload_rev || rev <= key_rev.unwrap_or(i64::MIN) {
                    false
                } else {
                    let value = match &change {
                        KvChange::Set { value, .. } => Some(value.as_str()),
                        _ => None, // a tombstone keeps the delete's revision
                    };
                    tx.execute(
                        "INSERT OR REPLACE INTO kv_mirror (device, key, value, rev) VALUES (?1, ?2, ?3, ?4)",
                        params![d, key, value, rev],
                    )?;
                    tx.execute(
                        "UPDATE kv_state SET rev = ?2 WHERE device = ?1",
                        params![d, rev.max(held)],
                    )?;
                    true
                }
            }
        };
        tx.commit()?;
        Ok(applied)
    }

    fn restore(&mut self, rows: Vec<Row>) -> Result<u64, OutboxError> {
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

    fn fetch(&mut self, device: u64, after: i64, limit: usize) -> Result<Vec<Row>, OutboxError> {
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

    fn depth(&mut self) -> Result<HashMap<u64, DeviceDepth>, OutboxError> {
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

fn add_signed(a: &AtomicU64, delta: i64) {
    if delta >= 0 {
        a.fetch_add(delta as u64, Relaxed);
    } else {
        let _ = a.fetch_update(Relaxed, Relaxed, |v| {
            Some(v.saturating_sub((-delta) as u64))
        });
    }
}

/// One device's line in [`inspect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceReport {
    pub device: u64,
    pub rows: u64,
    pub events: u64,
    pub kv_changes: u64,
    pub bytes: u64,
    /// When the oldest pending row was accepted (unix ms).
    pub oldest_created_ms: Option<i64>,
    /// Capture time of the oldest pending row (unix ms).
    pub oldest_captured_ms: Option<i64>,
    /// Rows whose capture time is a guess (clock never synchronised).
    pub unsynced: u64,
}

/// What `modehub outbox` prints: the outbox read through a read-only connection (works while
/// the hub runs, thanks to WAL).
#[derive(Debug, Clone)]
pub struct OutboxReport {
    pub schema_version: i64,
    pub devices: Vec<DeviceReport>,
    pub dead_letters_total: u64,
    pub dead_letters: Vec<DeadLetter>,
    pub pending_commands: u64,
}

/// Reads `data_dir/hub.db` read-only: depth per device, oldest pending, dead letters (newest
/// `dead_limit`).
pub fn inspect(data_dir: &Path, dead_limit: usize) -> Result<OutboxReport, OutboxError> {
    let path = data_dir.join("hub.db");
    if !path.exists() {
        return Err(OutboxError::Open {
            path: path.clone(),
            source: rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                Some("no outbox database here: check hub.data_dir in the config".into()),
            ),
        });
    }
    let conn = Connection::open_with_flags(
        &path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| OutboxError::Open {
        path: path.clone(),
        source,
    })?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let schema_version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let mut st = conn.prepare(
        "SELECT device, COUNT(*), SUM(kind = 0), SUM(kind != 0),
                COALESCE(SUM(LENGTH(body) + LENGTH(key)), 0), MIN(created_at), MIN(captured_at),
                SUM(synced = 0)
         FROM outbox GROUP BY device ORDER BY device",
    )?;
    let devices = st
        .query_map([], |r| {
            Ok(DeviceReport {
                device: r.get::<_, i64>(0)? as u64,
                rows: r.get::<_, i64>(1)? as u64,
                events: r.get::<_, i64>(2)? as u64,
                kv_changes: r.get::<_, i64>(3)? as u64,
                bytes: r.get::<_, i64>(4)? as u64,
                oldest_created_ms: r.get(5)?,
                oldest_captured_ms: r.get(6)?,
                unsynced: r.get::<_, i64>(7)? as u64,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let dead_letters_total: i64 =
        conn.query_row("SELECT COUNT(*) FROM dead_letter", [], |r| r.get(0))?;
    let pending_commands: i64 =
        conn.query_row("SELECT COUNT(*) FROM pending_command", [], |r| r.get(0))?;
    Ok(OutboxReport {
        schema_version,
        devices,
        dead_letters_total: dead_letters_total as u64,
        dead_letters: dead_letters(&conn, dead_limit)?,
        pending_commands: pending_commands as u64,
    })
}

/// Reads the schema version of a database file without opening it for writing (for tools).
pub fn schema_version(path: &Path) -> Result<Option<i64>, OutboxError> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|source| OutboxError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .optional()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(device: u64, n: usize) -> NewRecord {
        NewRecord {
            device,
            kind: Kind::Event,
            key: "t".into(),
            body: format!("{{\"n\":{n}}}"),
            captured: Capture::at(1),
        }
    }

    #[tokio::test]
    async fn inspect_reads_depth_and_dead_letters_while_open() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _th) = Outbox::open(dir.path(), false, Arc::new(|_| {})).unwrap();
        for n in 0..3 {
            ob.append(rec(5, n)).await.unwrap();
        }
        let mut unsynced = rec(6, 0);
        unsynced.captured.synced = false;
        ob.append(unsynced).await.unwrap();
        let first = ob.fetch(5, 0, 1).await.unwrap()[0].id;
        assert!(ob
            .dead_letter(first, "400 INVALID_INPUT".into())
            .await
            .unwrap());
        // The writer still holds the database open.
        let r = inspect(dir.path(), 10).unwrap();
        assert!(r.schema_version > 0);
        assert_eq!(r.devices.len(), 2);
        assert_eq!((r.devices[0].device, r.devices[0].rows), (5, 2));
        assert_eq!(r.devices[0].events, 2);
        assert_eq!(r.devices[1].unsynced, 1);
        assert_eq!(r.dead_letters_total, 1);
        assert_eq!(r.dead_letters[0].reason, "400 INVALID_INPUT");
        let missing = inspect(&dir.path().join("nope"), 10).unwrap_err();
        assert!(missing.to_string().contains("hub.db"), "{missing}");
    }

    #[tokio::test]
    async fn restored_rows_take_their_old_places_and_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _th) = Outbox::open(dir.path(), false, Arc::new(|_| {})).unwrap();
        for n in 0..5 {
            ob.append(rec(5, n)).await.unwrap();
        }
        let all = ob.fetch(5, 0, 10).await.unwrap();
        for r in &all[..3] {
            ob.ack(r.id).await;
        }
        // A job runs after the pending acks' commit.
        assert_eq!(ob.fetch(5, 0, 10).await.unwrap().len(), 2);
        let rows_before = ob.stats().pending_rows.load(Relaxed);
        // Put back the first two, and one still present (left alone).
        let back = vec![all[0].clone(), all[1].clone(), all[4].clone()];
        assert_eq!(ob.restore(back).await.unwrap(), 2);
        assert_eq!(ob.stats().pending_rows.load(Relaxed), rows_before + 2);
        let now = ob.fetch(5, 0, 10).await.unwrap();
        let expect: Vec<Row> = vec![
            all[0].clone(),
            all[1].clone(),
            all[3].clone(),
            all[4].clone(),
        ];
        assert_eq!(
            now, expect,
            "same ids, sequence numbers and capture, in order"
        );
        // New appends keep numbering after the highest.
        ob.append(rec(5, 9)).await.unwrap();
        let last = ob.fetch(5, all[4].id, 10).await.unwrap();
        assert_eq!(last[0].dev_seq, all[4].dev_seq + 1);
        assert!(last[0].id > all[4].id);
    }

    #[tokio::test]
    async fn append_fetch_ack_keeps_fifo_and_seq_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let noop: Notifier = Arc::new(|_| {});
        let (ob, th) = Outbox::open(dir.path(), false, noop.clone()).unwrap();
        let mut waiters = Vec::new();
        for n in 0..100 {
            waiters.push(ob.submit(rec(7, n)).await.unwrap());
            waiters.push(ob.submit(rec(8, n)).await.unwrap());
        }
        for w in waiters {
            w.await.unwrap().unwrap();
        }
        let rows = ob.fetch(7, 0, 1000).await.unwrap();
        assert_eq!(rows.len(), 100);
        for (n, r) in rows.iter().enumerate() {
            assert_eq!(r.body, format!("{{\"n\":{n}}}"));
            assert_eq!(r.dev_seq, n as u64 + 1);
        }
        for r in &rows[..50] {
            ob.ack(r.id).await;
        }
        let d = ob.depth().await.unwrap();
        assert_eq!(d[&7].rows, 50);
        assert_eq!(d[&8].rows, 100);
        drop(ob);
        th.join().unwrap();

        let (ob, _th) = Outbox::open(dir.path(), false, noop).unwrap();
        let rows = ob.fetch(7, 0, 1000).await.unwrap();
        assert_eq!(rows.len(), 50);
        assert_eq!(rows[0].dev_seq, 51);
        ob.append(rec(7, 100)).await.unwrap();
        let rows = ob.fetch(7, rows.last().unwrap().id, 10).await.unwrap();
        assert_eq!(rows[0].dev_seq, 101, "sequence continues after restart");
        assert_eq!(
            schema_version(&dir.path().join("hub.db")).unwrap(),
            Some(SCHEMA_VERSION)
        );
    }

    fn kv(device: u64, kind: Kind, key: &str, body: &str) -> NewRecord {
        NewRecord {
            device,
            kind,
            key: key.into(),
            body: body.into(),
            captured: Capture::at(1),
        }
    }

    fn open(dir: &Path, opts: OutboxOptions) -> (Outbox, std::thread::JoinHandle<()>) {
        Outbox::open_with(dir, opts, Arc::new(|_| {})).unwrap()
    }

    #[tokio::test]
    async fn corrupt_file_is_moved_aside_never_deleted_and_rows_are_salvaged() {
        let dir = tempfile::tempdir().unwrap();
        // Not a database at all: kept byte for byte, a fresh one takes its place.
        std::fs::write(dir.path().join("hub.db"), vec![0x42u8; 8192]).unwrap();
        let (ob, th) = open(dir.path(), OutboxOptions::default());
        assert_eq!(ob.stats().corruption_detected.load(Relaxed), 1);
        ob.append(rec(1, 0)).await.unwrap();
        drop(ob);
        th.join().unwrap();
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| {
                n.starts_with("hub.db.corrupt-") && !n.ends_with("-wal") && !n.ends_with("-shm")
            })
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert_eq!(
            std::fs::read(dir.path().join(&aside[0])).unwrap(),
            vec![0x42u8; 8192]
        );

        // A real database with a damaged page: readable rows come back, sequence numbers
        // never go back.
        let dir = tempfile::tempdir().unwrap();
        let (ob, th) = open(dir.path(), OutboxOptions::default());
        for n in 0..2000 {
            ob.submit(rec(5, n)).await.unwrap();
        }
        ob.append(rec(5, 2000)).await.unwrap();
        drop(ob);
        th.join().unwrap();
        let path = dir.path().join("hub.db");
        {
            let c = Connection::open(&path).unwrap();
            c.pragma_update(None, "wal_checkpoint", "TRUNCATE").unwrap();
        }
        let mut bytes = std::fs::read(&path).unwrap();
        let page = 4096;
        let pages = bytes.len() / page;
        assert!(pages > 8);
        // Scribble over a page in the middle of the table.
        for b in &mut bytes[(pages / 2) * page..(pages / 2) * page + page] {
            *b = 0xA5;
        }
        std::fs::write(&path, &bytes).unwrap();
        let (ob, _th) = open(dir.path(), OutboxOptions::default());
        assert_eq!(ob.stats().corruption_detected.load(Relaxed), 1);
        let salvaged = ob.stats().salvaged_rows.load(Relaxed);
        assert!(salvaged > 1000 && salvaged < 2001, "salvaged {salvaged}");
        let rows = ob.fetch(5, 0, 5000).await.unwrap();
        assert_eq!(rows.len() as u64, salvaged);
        assert!(rows.windows(2).all(|w| w[0].dev_seq < w[1].dev_seq));
        ob.append(rec(5, 9999)).await.unwrap();
        let last = ob.fetch(5, rows.last().unwrap().id, 10).await.unwrap();
        assert!(
            last[0].dev_seq > 2001,
            "seq {} must not go back",
            last[0].dev_seq
        );
    }

    #[tokio::test]
    async fn pending_kv_changes_coalesce_to_the_final_state() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _th) = open(dir.path(), OutboxOptions::default());
        ob.append(rec(1, 0)).await.unwrap();
        for n in 0..100 {
            ob.submit(kv(1, Kind::KvSet, "k", &n.to_string()))
                .await
                .unwrap();
        }
        ob.append(kv(1, Kind::KvSet, "other", "true"))
            .await
            .unwrap();
        ob.append(kv(1, Kind::KvSet, "gone", "1")).await.unwrap();
        ob.append(kv(1, Kind::KvDelete, "gone", "")).await.unwrap();
        ob.append(rec(1, 1)).await.unwrap();
        let rows = ob.fetch(1, 0, 1000).await.unwrap();
        let shape: Vec<(Kind, &str, &str)> = rows
            .iter()
            .map(|r| (r.kind, r.key.as_str(), r.body.as_str()))
            .collect();
        assert_eq!(
            shape,
            vec![
                (Kind::Event, "t", "{\"n\":0}"),
                (Kind::KvSet, "k", "99"),
                (Kind::KvSet, "other", "true"),
                (Kind::KvDelete, "gone", ""),
                (Kind::Event, "t", "{\"n\":1}"),
            ]
        );
        assert_eq!(ob.stats().kv_coalesced.load(Relaxed), 100);
        assert_eq!(ob.stats().pending_rows.load(Relaxed), 5);
    }

    #[tokio::test]
    async fn kv_mirror_follows_modes_revision_rule_and_serves_local_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _th) = open(dir.path(), OutboxOptions::default());
        let set = |rev, k: &str, v: &str| KvChange::Set {
            rev,
            key: k.into(),
            value: v.into(),
        };
        // Nothing before the first reload.
        assert!(!ob.kv_apply(1, set(5, "a", "1")).await.unwrap());
        let snap = ob.kv_snapshot(1).await.unwrap();
        assert!(!snap.loaded && snap.items.is_empty());
        let reload = KvChange::Reload {
            rev: Some(10),
            items: vec![("a".into(), "1".into()), ("b".into(), "\"x\"".into())],
        };
        assert!(ob.kv_apply(1, reload.clone()).await.unwrap());
        // Not newer than the reload: ignored. Newer: applied, in any order.
        assert!(!ob.kv_apply(1, set(9, "a", "old")).await.unwrap());
        assert!(ob.kv_apply(1, set(12, "a", "12")).await.unwrap());
        assert!(
            !ob.kv_apply(1, set(11, "a", "11")).await.unwrap(),
            "older than the key's rev"
        );
        assert!(
            ob.kv_apply(1, set(11, "c", "3")).await.unwrap(),
            "newer than the reload"
        );
        assert!(ob
            .kv_apply(
                1,
                KvChange::Delete {
                    rev: 13,
                    key: "b".into()
                }
            )
            .await
            .unwrap());
        assert!(
            !ob.kv_apply(1, set(13, "b", "late")).await.unwrap(),
            "tombstone keeps its rev"
        );
        assert!(
            !ob.kv_apply(1, reload).await.unwrap(),
            "a stale reload is ignored"
        );
        let snap = ob.kv_snapshot(1).await.unwrap();
        assert_eq!((snap.loaded, snap.rev), (true, 13));
        assert_eq!(
            snap.items,
            vec![("a".into(), "12".into()), ("c".into(), "3".into())]
        );
        // Local changes not yet acknowledged show through; once acked they stay in the mirror.
        ob.append(kv(1, Kind::KvSet, "d", "[1]")).await.unwrap();
        ob.append(kv(1, Kind::KvDelete, "a", "")).await.unwrap();
        let snap = ob.kv_snapshot(1).await.unwrap();
        assert_eq!(
            snap.items,
            vec![("c".into(), "3".into()), ("d".into(), "[1]".into())]
        );
        for r in ob.fetch(1, 0, 10).await.unwrap() {
            ob.ack(r.id).await;
        }
        assert_eq!(ob.kv_snapshot(1).await.unwrap().items, snap.items);
        // A revision-less (REST) reload replaces everything.
        assert!(ob
            .kv_apply(
                1,
                KvChange::Reload {
                    rev: None,
                    items: vec![("z".into(), "0".into())]
                }
            )
            .await
            .unwrap());
        assert_eq!(
            ob.kv_snapshot(1).await.unwrap().items,
            vec![("z".into(), "0".into())]
        );
    }

    #[tokio::test]
    async fn commands_wait_bounded_expire_and_come_out_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _th) = open(dir.path(), OutboxOptions::default());
        let mut dropped = 0;
        for n in 0..5u8 {
            dropped += ob
                .queue_command(1, vec![n], 1000 + n as i64, 10_000, 3)
                .await
                .unwrap();
        }
        assert_eq!(dropped, 2, "oldest dropped beyond the bound");
        ob.queue_command(2, vec![9], 1000, 100, 3).await.unwrap();
        assert_eq!(ob.pending_commands().await.unwrap()[&1], 3);
        assert_eq!(ob.expire_commands(1100).await.unwrap(), vec![(2, 1)]);
        let t = ob.take_commands(1, 11_002).await.unwrap();
        assert_eq!(t.deliver, vec![vec![3], vec![4]]);
        assert_eq!(t.expired, 1);
        assert!(ob.take_commands(1, 0).await.unwrap().deliver.is_empty());
    }

    #[tokio::test]
    async fn full_outbox_drops_oldest_events_but_keeps_kv() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _th) = open(
            dir.path(),
            OutboxOptions {
                max_rows: 100,
                ..OutboxOptions::default()
            },
        );
        ob.append(kv(1, Kind::KvSet, "cfg", "1")).await.unwrap();
        for n in 0..300 {
            ob.append(rec(1, n)).await.unwrap();
        }
        let rows = ob.fetch(1, 0, 1000).await.unwrap();
        assert!(rows.len() <= 100, "{}", rows.len());
        assert_eq!(rows[0].kind, Kind::KvSet, "kv state is never dropped");
        assert_eq!(rows.last().unwrap().body, "{\"n\":299}", "newest kept");
        let events: Vec<_> = rows.iter().filter(|r| r.kind == Kind::Event).collect();
        assert!(events.windows(2).all(|w| w[0].dev_seq + 1 == w[1].dev_seq));
        assert_eq!(
            ob.stats().dropped_full.load(Relaxed),
            300 - events.len() as u64
        );
    }

    #[tokio::test]
    async fn low_disk_refuses_appends_and_dead_letters_move_rows() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _th) = open(
            dir.path(),
            OutboxOptions {
                min_free_disk: u64::MAX,
                ..OutboxOptions::default()
            },
        );
        let e = ob.append(rec(1, 0)).await.unwrap_err();
        assert!(e.is_disk_full(), "{e}");
        assert!(e.to_string().contains("min_free_disk"), "{e}");
        assert_eq!(ob.stats().disk_full.load(Relaxed), 1);

        let dir = tempfile::tempdir().unwrap();
        let (ob, _th) = open(dir.path(), OutboxOptions::default());
        ob.append(rec(1, 0)).await.unwrap();
        ob.append(rec(1, 1)).await.unwrap();
        let rows = ob.fetch(1, 0, 10).await.unwrap();
        assert!(ob
            .dead_letter(rows[0].id, "400 BAD_EVENT".into())
            .await
            .unwrap());
        let dl = ob.dead_letters(10).await.unwrap();
        assert_eq!(dl.len(), 1);
        assert_eq!(dl[0].reason, "400 BAD_EVENT");
        let left = ob.fetch(1, 0, 10).await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].body, "{\"n\":1}");
    }
}
