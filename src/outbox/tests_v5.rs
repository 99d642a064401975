//! Unit tests of schema v5 (issue 12): no `(device, id)` index. A group commit of many
//! devices' events writes the table's last page, not an index page per device; a device's
//! rows are still read in order, between the id bounds the writer keeps, before and after a
//! restart and a restore. And of the writer's tick under a steady high rate (its next window
//! starts at its last commit).

use super::schema::{open_db, MIGRATIONS, SCHEMA_VERSION};
use super::tests::rec;
use super::*;
use rusqlite::Connection;

fn noop() -> Notifier {
    Arc::new(|_| {})
}

/// WAL frames one transaction of `rows` (device, n) appends: 10 devices with 400 rows each
/// already stored (their index entries spread over many leaves) and the WAL emptied first.
fn frames_of_one_group(conn: &Connection, rows: &[(i64, i64)]) -> u64 {
    let wal = |c: &Connection| -> u64 {
        let path: String = c
            .query_row("PRAGMA database_list", [], |r| r.get(2))
            .unwrap();
        std::fs::metadata(format!("{path}-wal"))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    let insert = |c: &Connection, id: i64, device: i64| {
        c.execute(
            "INSERT INTO outbox (id, device, kind, key, body, dev_seq, captured_at, created_at)
             VALUES (?1, ?2, 0, 't', ?3, ?1, 1, 1)",
            params![id, device, "x".repeat(120)],
        )
        .unwrap();
    };
    conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    conn.execute_batch("BEGIN").unwrap();
    let mut id = 1;
    for _ in 0..400 {
        for d in 0..10 {
            insert(conn, id, d);
            id += 1;
        }
    }
    conn.execute_batch("COMMIT").unwrap();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    assert_eq!(wal(conn), 0);
    conn.execute_batch("BEGIN").unwrap();
    for &(d, _) in rows {
        insert(conn, id, d);
        id += 1;
    }
    conn.execute_batch("COMMIT").unwrap();
    let page = 4096 + 24;
    (wal(conn) - 32) / page
}

#[test]
fn a_group_of_ten_devices_writes_the_tables_last_page_not_an_index_page_each() {
    let ten: Vec<(i64, i64)> = (0..10).map(|d| (d, 0)).collect();

    let dir = tempfile::tempdir().unwrap();
    let conn = open_db(&dir.path().join("hub.db"), false, &OutboxStats::default()).unwrap();
    let now = frames_of_one_group(&conn, &ten);
    assert!(
        now <= 2,
        "schema v{SCHEMA_VERSION}: {now} pages for one group"
    );

    // The same group under schema v4 (the index) wrote a page per device besides.
    let dir = tempfile::tempdir().unwrap();
    let c = Connection::open(dir.path().join("hub.db")).unwrap();
    c.pragma_update(None, "journal_mode", "WAL").unwrap();
    for sql in &MIGRATIONS[..4] {
        c.execute_batch(sql).unwrap();
    }
    let v4 = frames_of_one_group(&c, &ten);
    assert!(v4 >= 10, "schema v4: {v4} pages for one group");
}

#[tokio::test]
async fn a_devices_rows_are_read_in_order_between_its_bounds_across_restart_and_restore() {
    let dir = tempfile::tempdir().unwrap();
    let (ob, th) = Outbox::open(dir.path(), false, noop()).unwrap();
    // Interleaved: device 1 every third row, devices 2 and 3 between.
    for n in 0..30 {
        ob.append(rec(1 + (n % 3) as u64, n)).await.unwrap();
    }
    let ones = ob.fetch(1, 0, 100).await.unwrap();
    assert_eq!(ones.len(), 10);
    assert!(ones.windows(2).all(|w| w[0].id < w[1].id));
    assert!(ones.iter().all(|r| r.device == 1));
    // Paging by cursor.
    let page = ob.fetch(1, ones[3].id, 2).await.unwrap();
    assert_eq!(page, ones[4..6].to_vec());
    // A device with no rows, and a read past a device's last row.
    assert!(ob.fetch(9, 0, 100).await.unwrap().is_empty());
    assert!(ob.fetch(1, ones[9].id, 100).await.unwrap().is_empty());
    // The first rows acknowledged and deleted; then put back with their old ids (below every
    // row left): they are read first again.
    for r in &ones[..4] {
        ob.ack(r.id).await;
    }
    assert_eq!(ob.depth().await.unwrap()[&1].rows, 6);
    assert_eq!(ob.fetch(1, 0, 100).await.unwrap(), ones[4..].to_vec());
    drop(ob);
    th.join().unwrap();

    // After a restart the bounds come from the table.
    let (ob, th) = Outbox::open(dir.path(), false, noop()).unwrap();
    assert_eq!(ob.fetch(1, 0, 100).await.unwrap(), ones[4..].to_vec());
    assert_eq!(ob.restore(ones[..2].to_vec()).await.unwrap(), 2);
    let mut want = ones[..2].to_vec();
    want.extend_from_slice(&ones[4..]);
    assert_eq!(ob.fetch(1, 0, 100).await.unwrap(), want);
    // A new row of device 1 goes after all of them.
    ob.append(rec(1, 99)).await.unwrap();
    let all = ob.fetch(1, 0, 100).await.unwrap();
    assert_eq!(all.len(), want.len() + 1);
    assert_eq!(all[..want.len()], want[..]);
    assert_eq!(ob.fetch(2, 0, 100).await.unwrap().len(), 10);
    drop(ob);
    th.join().unwrap();

    let c = Connection::open(dir.path().join("hub.db")).unwrap();
    let (version, index): (i64, i64) = c
        .query_row(
            "SELECT (SELECT user_version FROM pragma_user_version),
                    (SELECT COUNT(*) FROM sqlite_master WHERE name = 'outbox_device')",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((version, index), (SCHEMA_VERSION, 0));
}

#[test]
fn a_steady_high_rate_ticks_and_a_low_one_or_no_window_does_not() {
    use super::pace::{Pace, TICK};
    use std::time::{Duration, Instant};
    let window = Duration::from_secs(2);
    let mut pace = Pace::default();
    let t0 = Instant::now();
    let ms = |n: u64| t0 + Duration::from_millis(n);
    assert_eq!(pace.tick(window, t0), None, "no rate known yet");
    // 100 events a second: windows from the first append, as before.
    for n in 0..100 {
        pace.grouped(1, ms(n * 10));
    }
    assert_eq!(pace.tick(window, ms(1000)), None);
    // 1,000 a second (two every 2 ms): the next window starts now.
    let mut at = 1000;
    for _ in 0..500 {
        at += 2;
        pace.grouped(2, ms(at));
    }
    assert_eq!(pace.tick(window, ms(at)), Some(TICK));
    // A shorter configured window bounds it; none means commit at once, no tick.
    let short = Duration::from_micros(500);
    assert_eq!(pace.tick(short, ms(at)), Some(short));
    assert_eq!(pace.tick(Duration::ZERO, ms(at)), None);
    // Quiet for two seconds: no more ticking.
    assert_eq!(pace.tick(window, ms(at + 2000)), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_stream_is_committed_whole_while_ticking_and_stops_at_once() {
    // 20 devices at ~1,000 events a second for a second and a half: the writer ticks. Every
    // append is committed and answered, in order per device, and dropping the handle mid-tick
    // ends the writer (it does not wait on the channel then).
    let dir = tempfile::tempdir().unwrap();
    let opts = OutboxOptions {
        // The hub's default.
        commit_window: std::time::Duration::from_secs(2),
        ..OutboxOptions::default()
    };
    let (ob, th) = Outbox::open_with(dir.path(), opts, noop()).unwrap();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(1));
    let mut waiters = Vec::new();
    for n in 0..1500 {
        tick.tick().await;
        waiters.push(ob.submit(rec((n % 20) as u64, n)).await.unwrap());
    }
    for w in waiters {
        w.await.unwrap().unwrap();
    }
    assert_eq!(ob.stats().rows_appended.load(Relaxed), 1500);
    let commits = ob.stats().commits.load(Relaxed);
    assert!(commits < 1500, "grouped: {commits} commits");
    for d in 0..20u64 {
        let rows = ob.fetch(d, 0, 1000).await.unwrap();
        assert_eq!(rows.len(), 75);
        assert!(rows.windows(2).all(|w| w[1].dev_seq == w[0].dev_seq + 1));
    }
    // One more append, then the last handle goes while the writer ticks.
    let last = ob.submit(rec(3, 9999)).await.unwrap();
    drop(ob);
    last.await.unwrap().unwrap();
    tokio::task::spawn_blocking(move || th.join().unwrap())
        .await
        .unwrap();
}

#[test]
fn the_free_space_is_read_again_when_old_near_the_floor_or_after_much_was_appended() {
    use super::writer::DiskReading;
    use std::time::{Duration, Instant};
    let t0 = Instant::now();
    let mib = 1024 * 1024;
    let r = |free: u64, appended: u64| DiskReading {
        at: t0,
        free,
        appended,
    };
    let min = 64 * mib;
    // A wide margin, just read, little appended: no system call.
    assert!(r(10_000 * mib, mib).fresh(t0 + Duration::from_millis(100), min));
    // Too old.
    assert!(!r(10_000 * mib, 0).fresh(t0 + DiskReading::MAX_AGE, min));
    // Appended an eighth of the margin: read again.
    assert!(!r(min + 80 * mib, 10 * mib).fresh(t0, min));
    assert!(r(min + 80 * mib, 9 * mib).fresh(t0, min));
    // Under the floor (or on it): every commit reads again, so space coming back is seen.
    assert!(!r(min, 0).fresh(t0, min));
    assert!(!r(mib, 0).fresh(t0, min));
}

#[tokio::test]
async fn a_read_from_the_start_narrows_a_devices_bounds_to_the_rows_left() {
    // Without this a device whose rows MODE acknowledged kept its old lower bound, and every
    // new session's read from the start scanned the other devices' rows from there again.
    let dir = tempfile::tempdir().unwrap();
    let (ob, _th) = Outbox::open(dir.path(), false, noop()).unwrap();
    for n in 0..10 {
        ob.append(rec(1 + (n % 2) as u64, n)).await.unwrap();
    }
    let span = |ob: &Outbox| {
        let ob = ob.clone();
        async move { ob.job(|w| Ok(w.spans.get(&1).copied())).await.unwrap() }
    };
    let ones = ob.fetch(1, 0, 100).await.unwrap();
    assert_eq!(ones.len(), 5);
    let before = span(&ob).await.unwrap();
    assert_eq!((before.first, before.last), (ones[0].id, ones[4].id));
    for r in &ones[..3] {
        ob.ack(r.id).await;
    }
    // Deleted with the next commit (a job forces it), then a read from the start.
    assert_eq!(ob.depth().await.unwrap()[&1].rows, 2);
    assert_eq!(ob.fetch(1, 0, 100).await.unwrap(), ones[3..].to_vec());
    assert_eq!(span(&ob).await.unwrap().first, ones[3].id);
    // A read from a cursor learns nothing about the start.
    assert_eq!(
        ob.fetch(1, ones[3].id, 100).await.unwrap(),
        ones[4..].to_vec()
    );
    assert_eq!(span(&ob).await.unwrap().first, ones[3].id);
    for r in &ones[3..] {
        ob.ack(r.id).await;
    }
    assert!(!ob.depth().await.unwrap().contains_key(&1));
    assert!(ob.fetch(1, 0, 100).await.unwrap().is_empty());
    assert_eq!(span(&ob).await, None, "no rows left");
    // The other device is untouched, and a new row of device 1 is found.
    assert_eq!(ob.fetch(2, 0, 100).await.unwrap().len(), 5);
    ob.append(rec(1, 99)).await.unwrap();
    assert_eq!(ob.fetch(1, 0, 100).await.unwrap().len(), 1);
}
