//! The outbox's unit tests.

use super::schema::SCHEMA_VERSION;
use super::*;
use rusqlite::Connection;

/// An event of `device` whose body is `{"n": n}` (also used by `tests_v3`).
pub(super) fn rec(device: u64, n: usize) -> NewRecord {
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
async fn committed_rows_are_handed_over_until_the_sequence_breaks() {
    let dir = tempfile::tempdir().unwrap();
    let (ob, _th) = Outbox::open(dir.path(), false, Arc::new(|_| {})).unwrap();
    ob.append(rec(7, 0)).await.unwrap();
    // Not listening yet: the uplink must read.
    assert!(ob.take_committed(7, 0, 10).is_none());
    ob.listen(7);
    let read = ob.fetch(7, 0, 10).await.unwrap();
    assert_eq!(read.len(), 1);
    ob.append(rec(7, 1)).await.unwrap();
    ob.append(rec(8, 1)).await.unwrap();
    ob.append(rec(7, 2)).await.unwrap();
    let handed = ob.take_committed(7, read[0].id, 10).unwrap();
    // Exactly what a read would have returned, without the other device's row.
    assert_eq!(handed, ob.fetch(7, read[0].id, 10).await.unwrap());
    assert_eq!(handed.len(), 2);
    assert_eq!(ob.take_committed(7, handed[1].id, 10), Some(vec![]));
    // A kv change (which may be coalesced) breaks the sequence: read again.
    ob.append(kv(7, Kind::KvSet, "k", "1")).await.unwrap();
    assert!(ob.take_committed(7, handed[1].id, 10).is_none());
}

#[tokio::test]
async fn acknowledged_rows_are_skipped_at_once_and_deleted_later() {
    let dir = tempfile::tempdir().unwrap();
    let (ob, _th) = Outbox::open(dir.path(), false, Arc::new(|_| {})).unwrap();
    for n in 0..3 {
        ob.append(rec(5, n)).await.unwrap();
    }
    let all = ob.fetch(5, 0, 10).await.unwrap();
    ob.ack(all[0].id).await;
    // From the start again (a reconnect): the acknowledged row is not sent again.
    assert_eq!(ob.fetch(5, 0, 10).await.unwrap(), all[1..].to_vec());
    // Deleted with the next append's commit.
    ob.append(rec(5, 3)).await.unwrap();
    assert_eq!(ob.stats().rows_acked.load(Relaxed), 1);
    // Or alone, after `ACK_DELAY` without appends.
    ob.ack(all[1].id).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while ob.stats().rows_acked.load(Relaxed) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the acknowledged row was never deleted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(ob.depth().await.unwrap()[&5].rows, 2);
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
    // Acknowledged rows are skipped at once, and deleted before any other job runs.
    assert_eq!(ob.fetch(5, 0, 10).await.unwrap().len(), 2);
    assert_eq!(ob.depth().await.unwrap()[&5].rows, 2);
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

pub(super) fn kv(device: u64, kind: Kind, key: &str, body: &str) -> NewRecord {
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
    // Scribble over a 4 KiB page in the middle of the table that holds only leaves (eight
    // 512-byte b-tree pages of type 13, rows, or 10, index entries) and some rows: a damaged
    // interior page would hide every row under it from the salvage's ordered reads, and where
    // those land depends on the schema's layout.
    let kinds = |c: usize| -> Vec<u8> { (0..8).map(|i| bytes[c * page + i * 512]).collect() };
    let chunk = (pages / 2..pages)
        .chain((1..pages / 2).rev())
        .find(|&c| {
            let k = kinds(c);
            k.iter().all(|&k| k == 0x0d || k == 0x0a) && k.contains(&0x0d)
        })
        .expect("a 4 KiB page of leaves");
    for b in &mut bytes[chunk * page..chunk * page + page] {
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
    // A reload is the truth whatever its rev (MODE's SDK always applies it): a store
    // re-created in the cloud starts its revisions again.
    assert!(
        ob.kv_apply(1, reload).await.unwrap(),
        "a reload with an older rev is applied"
    );
    let snap = ob.kv_snapshot(1).await.unwrap();
    assert_eq!((snap.loaded, snap.rev), (true, 10));
    assert_eq!(
        snap.items,
        vec![("a".into(), "1".into()), ("b".into(), "\"x\"".into())]
    );
    // Set/delete are filtered against the reload's rev again.
    assert!(!ob.kv_apply(1, set(10, "a", "old")).await.unwrap());
    assert!(ob.kv_apply(1, set(12, "a", "12")).await.unwrap());
    assert!(ob.kv_apply(1, set(11, "c", "3")).await.unwrap());
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

/// The sweep asks the writer only once a command may have expired, and still expires every
/// one on time: across reopen, after a sweep raised the mark, and for a command queued later
/// that expires before the ones already waiting.
#[tokio::test]
async fn command_sweeps_skip_the_writer_until_one_is_due_and_miss_none() {
    let dir = tempfile::tempdir().unwrap();
    let mark = |ob: &Outbox| ob.stats().next_command_expiry.load(Relaxed);
    {
        let (ob, th) = open(dir.path(), OutboxOptions::default());
        assert_eq!(mark(&ob), i64::MAX, "nothing waits");
        assert!(ob.expire_commands(i64::MAX - 1).await.unwrap().is_empty());
        ob.queue_command(1, vec![1], 1000, 500, 8).await.unwrap();
        ob.queue_command(2, vec![2], 1000, 9000, 8).await.unwrap();
        assert_eq!(mark(&ob), 1500);
        drop(ob);
        th.join().unwrap();
    }
    let (ob, _th) = open(dir.path(), OutboxOptions::default());
    assert_eq!(mark(&ob), 1500, "the mark is read back at open");
    assert!(ob.expire_commands(1499).await.unwrap().is_empty());
    assert_eq!(ob.expire_commands(1500).await.unwrap(), vec![(1, 1)]);
    assert_eq!(mark(&ob), 10_000, "raised to the next one waiting");
    // Queued later, expiring sooner than the one waiting.
    ob.queue_command(3, vec![3], 2000, 100, 8).await.unwrap();
    assert_eq!(ob.expire_commands(2100).await.unwrap(), vec![(3, 1)]);
    assert_eq!(ob.expire_commands(10_000).await.unwrap(), vec![(2, 1)]);
    assert_eq!(mark(&ob), i64::MAX);
    assert!(ob.pending_commands().await.unwrap().is_empty());
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

#[tokio::test]
async fn seq_never_goes_back_when_the_database_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let (ob, th) = open(dir.path(), OutboxOptions::default());
    for n in 0..29 {
        ob.append(rec(5, n)).await.unwrap();
    }
    let before = ob.fetch(5, 0, 100).await.unwrap();
    assert_eq!(before.last().unwrap().dev_seq, 29);
    drop(ob);
    th.join().unwrap();

    // A normal restart continues without a gap.
    let (ob, th) = open(dir.path(), OutboxOptions::default());
    ob.append(rec(5, 29)).await.unwrap();
    let rows = ob.fetch(5, 0, 100).await.unwrap();
    assert_eq!(rows.last().unwrap().dev_seq, 30);
    drop(ob);
    th.join().unwrap();

    // The database is lost (nothing salvageable): the next event is numbered above 30.
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(dir.path().join(format!("hub.db{suffix}")));
    }
    std::fs::write(dir.path().join("hub.db"), vec![0x42u8; 8192]).unwrap();
    let (ob, th) = open(dir.path(), OutboxOptions::default());
    assert_eq!(ob.stats().corruption_detected.load(Relaxed), 1);
    ob.append(rec(5, 30)).await.unwrap();
    let rows = ob.fetch(5, 0, 100).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert!(
        rows[0].dev_seq > 30,
        "_seq went back to {}",
        rows[0].dev_seq
    );
    drop(ob);
    th.join().unwrap();

    // Deleted outright (a new database): the same.
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(dir.path().join(format!("hub.db{suffix}")));
    }
    let last = rows[0].dev_seq;
    let (ob, _th) = open(dir.path(), OutboxOptions::default());
    ob.append(rec(5, 31)).await.unwrap();
    let rows = ob.fetch(5, 0, 100).await.unwrap();
    assert!(
        rows[0].dev_seq > last,
        "_seq went back to {}",
        rows[0].dev_seq
    );
}

#[cfg(unix)]
#[tokio::test]
async fn data_dir_and_database_are_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let top = tempfile::tempdir().unwrap();
    let dir = top.path().join("var/lib/modehub");
    // Even a umask that lets everyone read: the hub's files stay private.
    let old = unsafe { libc::umask(0o022) };
    let (ob, th) = open(&dir, OutboxOptions::default());
    unsafe { libc::umask(old) };
    ob.append(rec(1, 0)).await.unwrap();
    assert_eq!(mode(&dir), 0o700, "data dir");
    for f in ["hub.db", "hub.db-wal", "seq-floor"] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    drop(ob);
    th.join().unwrap();
    // An existing database left readable by others is narrowed on open.
    std::fs::set_permissions(dir.join("hub.db"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let (_ob, _th) = open(&dir, OutboxOptions::default());
    assert_eq!(mode(&dir.join("hub.db")), 0o600);
}
