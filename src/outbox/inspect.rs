//! Read-only views of an outbox file for tools (`modehub outbox`): depth per device, oldest
//! pending, dead letters, schema version. Works while the hub runs (WAL). It must not write.

use super::{DeadLetter, Kind, OutboxError};
use rusqlite::{Connection, OptionalExtension};
use std::path::Path;
use std::time::Duration;

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
    // One scan by rowid, summed here: without an index on the device (schema v5) a GROUP BY
    // would sort the whole outbox, in a temporary file for a large backlog.
    let mut by_device: std::collections::BTreeMap<u64, DeviceReport> = Default::default();
    {
        let mut st = conn.prepare(
            "SELECT device, kind, octet_length(body) + octet_length(key), created_at,
                    captured_at, synced
             FROM outbox",
        )?;
        let mut all = st.query([])?;
        while let Some(r) = all.next()? {
            let device = r.get::<_, i64>(0)? as u64;
            let (created, captured): (i64, i64) = (r.get(3)?, r.get(4)?);
            let d = by_device.entry(device).or_insert(DeviceReport {
                device,
                rows: 0,
                events: 0,
                kv_changes: 0,
                bytes: 0,
                oldest_created_ms: Some(created),
                oldest_captured_ms: Some(captured),
                unsynced: 0,
            });
            d.rows += 1;
            if r.get::<_, i64>(1)? == 0 {
                d.events += 1;
            } else {
                d.kv_changes += 1;
            }
            d.bytes += r.get::<_, i64>(2)? as u64;
            d.oldest_created_ms = d.oldest_created_ms.min(Some(created));
            d.oldest_captured_ms = d.oldest_captured_ms.min(Some(captured));
            d.unsynced += u64::from(!r.get::<_, bool>(5)?);
        }
    }
    let devices: Vec<DeviceReport> = by_device.into_values().collect();
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
