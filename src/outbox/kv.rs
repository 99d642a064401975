//! The hub's mirror of each device's MODE store (DDP with MODE's revision rule) and the snapshot
//! served to a local device: the mirror with unacknowledged local changes on top. It must not
//! parse DDP's JSON (`mode` does).

use super::writer::Writer;
use super::{Kind, KvChange, KvSnapshot, Outbox, OutboxError};
use rusqlite::{params, Connection, OptionalExtension};

impl Outbox {
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

impl Writer {
    pub(super) fn kv_apply(&mut self, device: u64, change: KvChange) -> Result<bool, OutboxError> {
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
}
