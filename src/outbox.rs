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
    /// Capture time, Unix milliseconds.
    pub captured_at_ms: i64,
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
    pub captured_at_ms: i64,
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
    #[error("cannot open the outbox database {path}: {source}. If the file is not a modehub database, move it away; the hub never deletes it for you.")]
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
    #[error("outbox write failed: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("outbox commit failed: {0}")]
    Commit(Arc<OutboxError>),
    #[error("outbox is shut down")]
    Closed,
}

/// Answers one append once its commit is done.
type CommitReply = oneshot::Sender<Result<(), Arc<OutboxError>>>;

/// Callback run after each commit for every device that got new rows.
pub type Notifier = Arc<dyn Fn(u64) + Send + Sync>;

enum Req {
    Append(NewRecord, CommitReply),
    Fetch {
        device: u64,
        after: i64,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<Row>, OutboxError>>,
    },
    Ack(i64),
    Depth(oneshot::Sender<Result<HashMap<u64, DeviceDepth>, OutboxError>>),
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
    pub commits: std::sync::atomic::AtomicU64,
    pub rows_appended: std::sync::atomic::AtomicU64,
    pub rows_acked: std::sync::atomic::AtomicU64,
    pub commit_errors: std::sync::atomic::AtomicU64,
    /// Sum of commit durations in microseconds.
    pub commit_micros: std::sync::atomic::AtomicU64,
    /// Commit latency histogram: slot `i` counts commits that took more than the previous
    /// bound and at most `COMMIT_BUCKETS_MICROS[i]`; the last slot counts slower ones (+Inf).
    pub commit_buckets: [std::sync::atomic::AtomicU64; COMMIT_BUCKETS_MICROS.len() + 1],
}

/// Upper bounds of the commit latency histogram's buckets, in microseconds.
pub const COMMIT_BUCKETS_MICROS: [u64; 12] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000,
];

impl OutboxStats {
    fn observe_commit(&self, micros: u64) {
        use std::sync::atomic::Ordering::Relaxed;
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

const SCHEMA_VERSION: i64 = 1;
const MAX_BATCH: usize = 4096;

/// Each entry migrates the schema from version `index` to `index + 1`.
const MIGRATIONS: &[&str] = &["
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
"];

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Opens (creating or migrating) the database and applies the pragmas.
fn open_db(path: &Path, sync_full: bool) -> Result<Connection, OutboxError> {
    let open_err = |source| OutboxError::Open {
        path: path.to_path_buf(),
        source,
    };
    let conn = Connection::open(path).map_err(open_err)?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(open_err)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(open_err)?;
    conn.pragma_update(
        None,
        "synchronous",
        if sync_full { "FULL" } else { "NORMAL" },
    )
    .map_err(open_err)?;
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
    Ok(conn)
}

impl Outbox {
    /// Opens `data_dir/hub.db` and starts the writer thread.
    pub fn open(
        data_dir: &Path,
        sync_full: bool,
        notifier: Notifier,
    ) -> Result<(Outbox, std::thread::JoinHandle<()>), OutboxError> {
        std::fs::create_dir_all(data_dir).map_err(|source| OutboxError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = data_dir.join("hub.db");
        let conn = open_db(&path, sync_full)?;
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
        let (tx, rx) = mpsc::channel(MAX_BATCH);
        let stats = Arc::new(OutboxStats::default());
        let writer = Writer {
            conn,
            seqs,
            notifier,
            stats: stats.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("outbox".into())
            .spawn(move || writer.run(rx))
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

    /// Up to `limit` rows of `device` with `id > after`, oldest first.
    pub async fn fetch(
        &self,
        device: u64,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Row>, OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Req::Fetch {
                device,
                after,
                limit,
                reply,
            })
            .await
            .map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// MODE acknowledged row `id`: delete it (in the next group commit).
    pub async fn ack(&self, id: i64) {
        let _ = self.tx.send(Req::Ack(id)).await;
    }

    /// Pending rows per device.
    pub async fn depth(&self) -> Result<HashMap<u64, DeviceDepth>, OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Req::Depth(reply))
            .await
            .map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }
}

struct Writer {
    conn: Connection,
    /// Next per-device sequence number.
    seqs: HashMap<u64, u64>,
    notifier: Notifier,
    stats: Arc<OutboxStats>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Req>) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut appends: Vec<(NewRecord, CommitReply)> = Vec::new();
        let mut acks: Vec<i64> = Vec::new();
        let mut reads: Vec<Req> = Vec::new();
        let mut touched: Vec<u64> = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut next = Some(first);
            // Group commit: take everything already queued, up to a bound.
            while let Some(req) = next.take() {
                match req {
                    Req::Append(rec, tx) => appends.push((rec, tx)),
                    Req::Ack(id) => acks.push(id),
                    other => reads.push(other),
                }
                if appends.len() + acks.len() < MAX_BATCH {
                    next = rx.try_recv().ok();
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
            for req in reads.drain(..) {
                self.read(req);
            }
        }
        tracing::debug!("outbox writer stopped");
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
        {
            let now = now_ms();
            let mut ins = tx.prepare_cached(
                "INSERT INTO outbox (device, kind, key, body, dev_seq, captured_at, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            let mut seq_touched: Vec<u64> = Vec::new();
            for (rec, _) in appends {
                let seq = self.seqs.entry(rec.device).or_insert(1);
                ins.execute(params![
                    rec.device as i64,
                    rec.kind as i64,
                    rec.key,
                    rec.body,
                    *seq as i64,
                    rec.captured_at_ms,
                    now
                ])?;
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
            let mut del = tx.prepare_cached("DELETE FROM outbox WHERE id = ?1")?;
            for id in acks {
                del.execute([id])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn read(&mut self, req: Req) {
        match req {
            Req::Fetch {
                device,
                after,
                limit,
                reply,
            } => {
                let _ = reply.send(self.fetch(device, after, limit));
            }
            Req::Depth(reply) => {
                let _ = reply.send(self.depth());
            }
            Req::Append(..) | Req::Ack(_) => unreachable!("writes are batched"),
        }
    }

    fn fetch(&mut self, device: u64, after: i64, limit: usize) -> Result<Vec<Row>, OutboxError> {
        let mut st = self.conn.prepare_cached(
            "SELECT id, kind, key, body, dev_seq, captured_at FROM outbox
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
                captured_at_ms: r.get(5)?,
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
            captured_at_ms: 1,
        }
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
        assert_eq!(schema_version(&dir.path().join("hub.db")).unwrap(), Some(1));
    }

    #[tokio::test]
    async fn refuses_a_file_that_is_not_a_database() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hub.db"), vec![0x42u8; 8192]).unwrap();
        let noop: Notifier = Arc::new(|_| {});
        let err = Outbox::open(dir.path(), false, noop).err().unwrap();
        assert!(err.to_string().contains("never deletes it"), "{err}");
        assert_eq!(
            std::fs::read(dir.path().join("hub.db")).unwrap(),
            vec![0x42u8; 8192]
        );
    }
}
