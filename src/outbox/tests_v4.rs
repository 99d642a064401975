//! Unit tests of schema v4 (issue 12): a group commit writes neither `device_seq` nor an index
//! of unsynchronised rows. `_seq` goes on without a gap after a clean stop (which writes
//! `device_seq`) and jumps to the `seq-floor` mark after an unclean one (never a repeat);
//! capture times are repaired from the first unsynchronised row of the boot, kept in memory
//! and read back at open.

use super::schema::{MIGRATIONS, SCHEMA_VERSION};
use super::*;
use rusqlite::{Connection, OptionalExtension};

use super::tests::{kv, rec};

fn noop() -> Notifier {
    Arc::new(|_| {})
}

fn device_seq(dir: &Path) -> Vec<(i64, i64)> {
    let c = Connection::open(dir.join("hub.db")).unwrap();
    let mut st = c
        .prepare("SELECT device, next_seq FROM device_seq ORDER BY device")
        .unwrap();
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    rows.map(Result::unwrap).collect()
}

fn seq_dirty(dir: &Path) -> Option<i64> {
    let c = Connection::open(dir.join("hub.db")).unwrap();
    c.query_row("SELECT value FROM meta WHERE key = 'seq_dirty'", [], |r| {
        r.get(0)
    })
    .optional()
    .unwrap()
}

#[tokio::test]
async fn seq_goes_on_after_a_clean_stop_and_jumps_to_the_floor_mark_after_an_unclean_one() {
    let dir = tempfile::tempdir().unwrap();
    let (ob, th) = Outbox::open(dir.path(), false, noop()).unwrap();
    assert_eq!(seq_dirty(dir.path()), Some(1), "set (and synced) at open");
    for n in 0..3 {
        ob.append(rec(5, n)).await.unwrap();
        ob.append(rec(6, n)).await.unwrap();
    }
    // Device 5: every row acknowledged (its newest goes); device 6: only the oldest.
    for r in ob.fetch(5, 0, 10).await.unwrap() {
        ob.ack(r.id).await;
    }
    let oldest_six = ob.fetch(6, 0, 10).await.unwrap()[0].id;
    ob.ack(oldest_six).await;
    // A ping is answered after the writer's next commit (the acks go with it or on their own).
    ob.append(rec(7, 0)).await.unwrap();
    ob.ping().await.unwrap();
    assert_eq!(
        device_seq(dir.path()),
        vec![],
        "commits while running write no device_seq (the rows deleted were device 5's newest)"
    );
    drop(ob);
    th.join().unwrap();
    assert_eq!(
        device_seq(dir.path()),
        vec![(5, 4), (6, 4), (7, 2)],
        "a clean stop writes every device's next number"
    );
    assert_eq!(seq_dirty(dir.path()), None, "and clears the flag");

    // A clean restart: no gap, from device_seq (no row of device 5 is left) and from the rows.
    let (ob, th) = Outbox::open(dir.path(), false, noop()).unwrap();
    ob.append(rec(5, 3)).await.unwrap();
    ob.append(rec(6, 3)).await.unwrap();
    assert_eq!(ob.fetch(5, 0, 10).await.unwrap()[0].dev_seq, 4);
    let six: Vec<u64> = ob
        .fetch(6, 0, 10)
        .await
        .unwrap()
        .iter()
        .map(|r| r.dev_seq)
        .collect();
    assert_eq!(six, vec![2, 3, 4]);
    drop(ob);
    th.join().unwrap();

    // What a crash leaves: the flag set, and device_seq behind the numbers handed out (here
    // put back to before the last run, which handed out 4 for both).
    {
        let c = Connection::open(dir.path().join("hub.db")).unwrap();
        c.execute_batch(
            "INSERT INTO meta (key, value) VALUES ('seq_dirty', 1);
             UPDATE device_seq SET next_seq = 2;
             DELETE FROM outbox WHERE device = 5;",
        )
        .unwrap();
    }
    let (ob, th) = Outbox::open(dir.path(), false, noop()).unwrap();
    ob.append(rec(5, 4)).await.unwrap();
    ob.append(rec(8, 0)).await.unwrap();
    let five = ob.fetch(5, 0, 10).await.unwrap();
    // Device 5's mark was moved to 2 + 1,000 by its first append: every number handed out is
    // below it.
    assert_eq!(
        five[0].dev_seq,
        2 + seqfloor::BLOCK,
        "continues at the mark"
    );
    assert_eq!(
        ob.fetch(8, 0, 10).await.unwrap()[0].dev_seq,
        1,
        "a device never seen starts at 1"
    );
    drop(ob);
    th.join().unwrap();
}

fn unsynced(device: u64, n: usize, boot_id: i64, mono_ms: i64) -> NewRecord {
    let mut r = rec(device, n);
    r.captured = Capture {
        wall_ms: 5,
        synced: false,
        boot_id,
        mono_ms,
    };
    r
}

fn captures(dir: &Path) -> Vec<(i64, i64, bool)> {
    let c = Connection::open(dir.join("hub.db")).unwrap();
    let mut st = c
        .prepare("SELECT id, captured_at, synced FROM outbox ORDER BY id")
        .unwrap();
    let rows = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap();
    rows.map(Result::unwrap).collect()
}

#[tokio::test]
async fn capture_times_are_repaired_per_boot_without_an_index_also_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (ob, th) = Outbox::open(dir.path(), false, noop()).unwrap();
    ob.append(rec(5, 0)).await.unwrap(); // synced, wall 1
    ob.append(unsynced(5, 1, 7, 100)).await.unwrap();
    ob.append(unsynced(6, 0, 8, 200)).await.unwrap();
    ob.append(unsynced(5, 2, 7, 300)).await.unwrap();
    assert_eq!(ob.repair_capture(9, 1000).await.unwrap(), 0, "no such boot");
    assert_eq!(ob.repair_capture(7, 1000).await.unwrap(), 2);
    assert_eq!(
        ob.repair_capture(7, 5000).await.unwrap(),
        0,
        "a second round finds nothing left"
    );
    drop(ob);
    th.join().unwrap();
    let got = captures(dir.path());
    assert_eq!(
        got.iter().map(|c| (c.1, c.2)).collect::<Vec<_>>(),
        vec![(1, true), (1100, true), (5, false), (1300, true)]
    );
    let c = Connection::open(dir.path().join("hub.db")).unwrap();
    let indexes: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'outbox_unsynced'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(indexes, 0);
    drop(c);

    // Boot 8's row is found again after a restart, and so are new ones of boot 7 (the clock
    // lost synchronisation again).
    let (ob, th) = Outbox::open(dir.path(), false, noop()).unwrap();
    ob.append(unsynced(5, 3, 7, 400)).await.unwrap();
    assert_eq!(ob.repair_capture(8, 10).await.unwrap(), 1);
    assert_eq!(ob.repair_capture(7, 10).await.unwrap(), 1);
    drop(ob);
    th.join().unwrap();
    let got = captures(dir.path());
    assert_eq!(
        got.iter().map(|c| (c.1, c.2)).collect::<Vec<_>>(),
        vec![
            (1, true),
            (1100, true),
            (210, true),
            (1300, true),
            (410, true)
        ]
    );
}

#[tokio::test]
async fn a_v3_database_loses_its_unsynced_index_and_keeps_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    {
        let c = Connection::open(dir.path().join("hub.db")).unwrap();
        c.pragma_update(None, "journal_mode", "WAL").unwrap();
        for sql in &MIGRATIONS[..3] {
            c.execute_batch(sql).unwrap();
        }
        c.pragma_update(None, "user_version", 3).unwrap();
        c.execute(
            "INSERT INTO outbox (id, device, kind, key, body, dev_seq, captured_at, created_at, synced, boot_id, mono_ms)
             VALUES (3, 5, 0, 't', '{}', 9, 5, 5, 0, 7, 40)",
            [],
        )
        .unwrap();
    }
    let (ob, th) = Outbox::open(dir.path(), false, noop()).unwrap();
    assert_eq!(
        schema_version(&dir.path().join("hub.db")).unwrap(),
        Some(SCHEMA_VERSION)
    );
    assert_eq!(ob.repair_capture(7, 100).await.unwrap(), 1);
    ob.append(rec(5, 0)).await.unwrap();
    let rows = ob.fetch(5, 0, 10).await.unwrap();
    assert_eq!(
        rows.iter().map(|r| (r.id, r.dev_seq)).collect::<Vec<_>>(),
        vec![(3, 9), (4, 10)]
    );
    drop(ob);
    th.join().unwrap();
}

#[tokio::test]
async fn pending_bytes_count_utf8_bytes_on_append_ack_and_reopen_alike() {
    // SQLite's LENGTH() counts characters: a count of bytes taken on append and given back in
    // characters on delete drifted with every non-ASCII payload, and so did the bound.
    let dir = tempfile::tempdir().unwrap();
    let (ob, th) = Outbox::open(dir.path(), false, noop()).unwrap();
    let mut event = rec(3, 0);
    event.body = r#"{"eventType":"température","eventData":{"unit":"°C","note":"☃"}}"#.into();
    ob.append(event).await.unwrap();
    ob.append(kv(3, Kind::KvSet, "pièce", "\"salle à manger\""))
        .await
        .unwrap();
    ob.append(rec(3, 1)).await.unwrap();
    let bytes = ob.stats().pending_bytes.load(Relaxed);
    drop(ob);
    th.join().unwrap();
    let (ob, _th) = Outbox::open(dir.path(), false, noop()).unwrap();
    assert_eq!(
        ob.stats().pending_bytes.load(Relaxed),
        bytes,
        "read back at open"
    );
    let rows = ob.fetch(3, 0, 10).await.unwrap();
    assert_eq!(rows.len(), 3);
    for r in &rows[..2] {
        ob.ack(r.id).await;
    }
    // A read runs after the acknowledged rows are deleted.
    assert_eq!(ob.depth().await.unwrap()[&3].rows, 1);
    let left = rows[2].body.len() + rows[2].key.len() + super::schema::ROW_OVERHEAD as usize;
    assert_eq!(ob.stats().pending_bytes.load(Relaxed), left as u64);
}
