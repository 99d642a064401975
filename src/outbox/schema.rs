//! The outbox's tables: schema version and migrations, opening the file with its pragmas, and
//! salvaging what can be read from a corrupt file into a new one (the old one is moved aside, never
//! deleted). It must not hold the writer's state or answer requests.

use super::{OutboxError, OutboxStats};
use crate::timing::now_ms;
use rusqlite::{params, Connection};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

pub(super) const SCHEMA_VERSION: i64 = 5;
/// Rough per-row overhead counted against `max_bytes` (row header, the cell, the `kv` index
/// entry of a kv change).
pub(super) const ROW_OVERHEAD: u64 = 48;

/// What a row of `body` and `key` counts against `max_bytes` (the same as
/// `octet_length(body) + octet_length(key)` plus [`ROW_OVERHEAD`] in SQL).
pub(super) fn counted(body: &str, key: &str) -> u64 {
    (body.len() + key.len()) as u64 + ROW_OVERHEAD
}

/// Each entry migrates the schema from version `index` to `index + 1`.
pub(super) const MIGRATIONS: &[&str] = &[
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
    // v3 (issue 12): fewer pages per commit. `id` is no longer AUTOINCREMENT (the writer hands
    // ids out, so no `sqlite_sequence` page per commit); the highest id ever handed out is kept
    // in `meta` so the ids of rows already sent are not handed out again after the upgrade.
    // `device_seq` stays, but is now written only by commits that delete a device's newest row.
    "
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO meta (key, value)
        SELECT 'next_id', COALESCE(MAX(seq), 0) + 1 FROM sqlite_sequence WHERE name = 'outbox';
    CREATE TABLE outbox_v3 (
        id          INTEGER PRIMARY KEY,
        device      INTEGER NOT NULL,
        kind        INTEGER NOT NULL,
        key         TEXT    NOT NULL,
        body        TEXT    NOT NULL,
        dev_seq     INTEGER NOT NULL,
        captured_at INTEGER NOT NULL,
        created_at  INTEGER NOT NULL,
        synced      INTEGER NOT NULL DEFAULT 1,
        boot_id     INTEGER NOT NULL DEFAULT 0,
        mono_ms     INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO outbox_v3 (id, device, kind, key, body, dev_seq, captured_at, created_at, synced, boot_id, mono_ms)
        SELECT id, device, kind, key, body, dev_seq, captured_at, created_at, synced, boot_id, mono_ms FROM outbox;
    INSERT INTO device_seq (device, next_seq)
        SELECT device, MAX(dev_seq) + 1 FROM outbox WHERE true GROUP BY device
        ON CONFLICT(device) DO UPDATE SET next_seq = max(next_seq, excluded.next_seq);
    DROP TABLE outbox;
    ALTER TABLE outbox_v3 RENAME TO outbox;
    CREATE INDEX outbox_device ON outbox(device, id);
    CREATE INDEX outbox_kv ON outbox(device, key) WHERE kind != 0;
    CREATE INDEX outbox_unsynced ON outbox(boot_id) WHERE synced = 0;
",
    // v4 (issue 12): no `outbox_unsynced` index. On a Pi whose clock is not synchronised every
    // row went into it, a page per commit; the writer keeps the first unsynchronised row id of
    // each boot in memory (read back at open) and the repair scans from there by rowid.
    "
    DROP INDEX IF EXISTS outbox_unsynced;
",
    // v5 (issue 12): no `outbox_device` index. Each commit rewrote the index's last leaf of
    // every device in it (at home, ten events of ten devices: ten index pages besides the
    // table's one). A device's rows are read by rowid between the bounds the writer keeps in
    // memory (`Start::spans`), and the per-device totals come from one scan by rowid.
    "
    DROP INDEX IF EXISTS outbox_device;
",
];

/// Where the writer starts: the next id to hand out (above every row and dead letter, and above
/// every id a v2 database had handed out), and per device the next `_seq` and the number
/// `device_seq` holds. `device_seq` is written only at a clean stop, so the next number is the
/// highest of `device_seq`, the rows left and the dead letters (and, after an unclean stop, the
/// `seq-floor` mark).
pub(super) struct Start {
    pub(super) next_id: i64,
    /// Rows in the outbox, and the bytes of their bodies and keys.
    pub(super) rows: u64,
    pub(super) bytes: u64,
    pub(super) seqs: HashMap<u64, u64>,
    pub(super) stored_seqs: HashMap<u64, u64>,
    /// The last writer did not stop cleanly (meta `seq_dirty`): `device_seq` may be behind the
    /// numbers it handed out, so every device continues at its `seq-floor` mark.
    pub(super) seq_dirty: bool,
    /// Per boot, the lowest id of a row captured before the clock was synchronised.
    pub(super) unsynced_from: HashMap<i64, i64>,
    /// Per device, the lowest and the highest id of its rows.
    pub(super) spans: HashMap<u64, Span>,
}

/// Bounds on the ids of a device's rows (no index: a read of its rows scans the table by rowid
/// between them). Widened by every insert, never narrowed by a delete, so every row of the
/// device is within them; a read after `last` needs no scan at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Span {
    pub(super) first: i64,
    pub(super) last: i64,
}

impl Span {
    pub(super) fn widen(spans: &mut HashMap<u64, Span>, device: u64, id: i64) {
        spans
            .entry(device)
            .and_modify(|s| {
                s.first = s.first.min(id);
                s.last = s.last.max(id);
            })
            .or_insert(Span {
                first: id,
                last: id,
            });
    }
}

pub(super) fn load_start(conn: &Connection) -> rusqlite::Result<Start> {
    let next_id: i64 = conn.query_row(
        "SELECT MAX(COALESCE((SELECT value FROM meta WHERE key = 'next_id'), 1),
                    COALESCE((SELECT MAX(id) FROM outbox), 0) + 1,
                    COALESCE((SELECT MAX(id) FROM dead_letter), 0) + 1)",
        [],
        |r| r.get(0),
    )?;
    let mut seqs: HashMap<u64, u64> = HashMap::new();
    let mut stored_seqs = HashMap::new();
    {
        let mut st = conn.prepare("SELECT device, next_seq FROM device_seq")?;
        for r in st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))? {
            let (d, s) = r?;
            stored_seqs.insert(d as u64, s as u64);
            seqs.insert(d as u64, s as u64);
        }
    }
    let mut raise = |d: i64, s: i64| {
        let next = seqs.entry(d as u64).or_insert(1);
        *next = (*next).max(s as u64);
    };
    {
        let mut st =
            conn.prepare("SELECT device, MAX(dev_seq) + 1 FROM dead_letter GROUP BY device")?;
        for r in st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))? {
            let (d, s) = r?;
            raise(d, s);
        }
    }
    // One pass over the outbox by rowid (a backlog can be a million rows on an SD card; no
    // GROUP BY, which would sort them in a temporary file): per device the next `_seq` and the
    // bounds of its ids, the totals, and per boot the first row captured before the clock was
    // set.
    let (mut rows, mut bytes) = (0u64, 0u64);
    let mut unsynced_from: HashMap<i64, i64> = HashMap::new();
    let mut spans: HashMap<u64, Span> = HashMap::new();
    {
        let mut st = conn.prepare(
            "SELECT id, device, dev_seq, octet_length(body) + octet_length(key), synced, boot_id
             FROM outbox ORDER BY id",
        )?;
        let mut all = st.query([])?;
        while let Some(r) = all.next()? {
            let (id, d): (i64, i64) = (r.get(0)?, r.get(1)?);
            raise(d, r.get::<_, i64>(2)? + 1);
            rows += 1;
            bytes += r.get::<_, i64>(3)? as u64;
            if !r.get::<_, bool>(4)? {
                // In id order: the first one seen is the lowest.
                unsynced_from.entry(r.get(5)?).or_insert(id);
            }
            Span::widen(&mut spans, d as u64, id);
        }
    }
    let seq_dirty: i64 = conn.query_row(
        "SELECT COALESCE((SELECT value FROM meta WHERE key = 'seq_dirty'), 0)",
        [],
        |r| r.get(0),
    )?;
    Ok(Start {
        next_id,
        rows,
        bytes,
        seqs,
        stored_seqs,
        seq_dirty: seq_dirty != 0,
        unsynced_from,
        spans,
    })
}

/// Sets meta `seq_dirty` (a writer is running, `device_seq` may fall behind) or clears it (a
/// writer stopped and wrote `device_seq` in the same transaction). Setting it is synced
/// before it returns, so no number is handed out before a power cut could lose the flag.
pub(super) fn set_seq_dirty(conn: &Connection, dirty: bool) -> rusqlite::Result<()> {
    if dirty {
        let was: i64 = conn.pragma_query_value(None, "synchronous", |r| r.get(0))?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        let done = conn.execute(
            "INSERT INTO meta (key, value) VALUES ('seq_dirty', 1)
             ON CONFLICT(key) DO UPDATE SET value = 1",
            [],
        );
        conn.pragma_update(None, "synchronous", was)?;
        done.map(|_| ())
    } else {
        conn.execute("DELETE FROM meta WHERE key = 'seq_dirty'", [])
            .map(|_| ())
    }
}

pub(super) fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
}

/// Opens the database, applies the pragmas and checks it is readable.
pub(super) fn open_raw(path: &Path, sync_full: bool) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // New databases use 512-byte pages (SQLite's smallest): every group commit appends each
    // page it touched to the WAL, and a commit touches a handful of pages whatever its size, so
    // at a few rows per commit small pages write fewer bytes per event (SD-card wear; 1 KiB
    // pages wrote ~1.3x more at home rates and ~1.8x more at 1,000/s, docs/store-and-forward.md).
    // Must come before WAL mode; it does nothing to an existing database.
    conn.pragma_update(None, "page_size", 512)?;
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

pub(super) fn migrate(conn: &Connection, path: &Path) -> Result<(), OutboxError> {
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
pub(super) fn open_db(
    path: &Path,
    sync_full: bool,
    stats: &OutboxStats,
) -> Result<Connection, OutboxError> {
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
pub(super) fn salvage(from: &Path, into: &Connection) -> u64 {
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
pub(super) fn free_disk(path: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some(st.blocks_available() as u64 * st.fragment_size() as u64)
}
