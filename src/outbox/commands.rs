//! Commands from MODE waiting for a device that is not listening: bounded per device, with an
//! expiry, handed out oldest first. It must not decide when a device listens (the downlink does).

use super::{Outbox, OutboxError};
use rusqlite::{params, Connection};
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;

/// When the first waiting command expires (`i64::MAX` when none waits).
pub(super) fn earliest_expiry(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT MIN(expires_at) FROM pending_command", [], |r| {
        r.get::<_, Option<i64>>(0)
    })
    .map(|m| m.unwrap_or(i64::MAX))
}

#[derive(Debug, Default)]
pub struct TakenCommands {
    /// Payloads to deliver, oldest first.
    pub deliver: Vec<Vec<u8>>,
    /// Commands that had expired and were discarded.
    pub expired: u64,
}

impl Outbox {
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
        let expires = now_ms + ttl_ms;
        // Before the job is queued, so that a sweep queued behind it runs; and again in the job,
        // after any sweep that ran before it and raised the mark.
        self.stats.next_command_expiry.fetch_min(expires, Relaxed);
        self.job(move |w| {
            w.stats.next_command_expiry.fetch_min(expires, Relaxed);
            let tx = w.conn.transaction()?;
            tx.execute(
                "INSERT INTO pending_command (device, payload, received_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4)",
                params![device as i64, payload, now_ms, expires],
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
    /// Asks the writer only when a waiting command may have expired: the downlink sweeps every
    /// few seconds, and a job on the writer ends its commit window (at home an extra commit
    /// every sweep, issue 12).
    pub async fn expire_commands(&self, now_ms: i64) -> Result<Vec<(u64, u64)>, OutboxError> {
        if now_ms < self.stats.next_command_expiry.load(Relaxed) {
            return Ok(Vec::new());
        }
        self.job(move |w| {
            let mut per: HashMap<u64, u64> = HashMap::new();
            {
                let mut st = w.conn.prepare_cached(
                    "DELETE FROM pending_command WHERE expires_at <= ?1 RETURNING device",
                )?;
                for d in st.query_map([now_ms], |r| r.get::<_, i64>(0))? {
                    *per.entry(d? as u64).or_default() += 1;
                }
            }
            // Commands queued after this job started lower the mark again in their own job.
            w.stats
                .next_command_expiry
                .store(earliest_expiry(&w.conn)?, Relaxed);
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
}
