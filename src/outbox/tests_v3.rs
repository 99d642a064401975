//! Unit tests of schema v3 (issue 12): the upgrade from v2 keeps every row, id, `_seq` and dead
//! letter; the commit window; and the writer's watchdog ping, which must not cost a commit.
//! (`_seq` across clean and unclean stops: `tests_v4.rs`.)

use super::schema::{MIGRATIONS, SCHEMA_VERSION};
use super::*;
use rusqlite::Connection;

use super::tests::rec;

fn noop() -> Notifier {
    Arc::new(|_| {})
}

/// A database exactly as a v2 modehub leaves it.
fn v2_database(dir: &Path) {
    let c = Connection::open(dir.join("hub.db")).unwrap();
    c.pragma_update(None, "journal_mode", "WAL").unwrap();
    for sql in &MIGRATIONS[..2] {
        c.execute_batch(sql).unwrap();
    }
    c.pragma_update(None, "user_version", 2).unwrap();
    let ins = "INSERT INTO outbox (device, kind, key, body, dev_seq, captured_at, created_at, synced, boot_id, mono_ms)
               VALUES (?1, 0, 't', ?2, ?3, 11, 12, 1, 0, 0)";
    // Device 5: ids 1..3 with _seq 1..3; device 6: id 4 (_seq 1), acknowledged and deleted.
    for (device, seq) in [(5, 1), (5, 2), (5, 3), (6, 1)] {
        c.execute(
            ins,
            rusqlite::params![device, format!("{{\"s\":{seq}}}"), seq],
        )
        .unwrap();
    }
    c.execute_batch(
        "INSERT INTO device_seq VALUES (5, 4), (6, 2);
         DELETE FROM outbox WHERE id = 4;
         INSERT INTO dead_letter (id, device, kind, key, body, dev_seq, captured_at, reason, failed_at)
           SELECT id, device, kind, key, body, dev_seq, captured_at, '400 bad', 13 FROM outbox WHERE id = 2;
         DELETE FROM outbox WHERE id = 2;",
    )
    .unwrap();
}

#[tokio::test]
async fn a_v2_database_upgrades_keeping_rows_ids_seqs_and_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    v2_database(dir.path());
    let (ob, th) = Outbox::open(dir.path(), false, noop()).unwrap();
    let rows = ob.fetch(5, 0, 10).await.unwrap();
    let got: Vec<_> = rows
        .iter()
        .map(|r| (r.id, r.dev_seq, r.body.as_str()))
        .collect();
    assert_eq!(got, vec![(1, 1, "{\"s\":1}"), (3, 3, "{\"s\":3}")]);
    assert_eq!(rows[0].captured.wall_ms, 11);
    let dead = ob.dead_letters(10).await.unwrap();
    assert_eq!(
        (dead.len(), dead[0].id, dead[0].reason.as_str()),
        (1, 2, "400 bad")
    );
    // New rows: ids above every id v2 handed out (4 was deleted), _seq where each device was.
    ob.append(rec(5, 0)).await.unwrap();
    ob.append(rec(6, 0)).await.unwrap();
    let five = ob.fetch(5, 3, 10).await.unwrap();
    let six = ob.fetch(6, 0, 10).await.unwrap();
    assert_eq!((five[0].id, five[0].dev_seq), (5, 4));
    assert_eq!((six[0].id, six[0].dev_seq), (6, 2));
    drop(ob);
    th.join().unwrap();
    assert_eq!(
        schema_version(&dir.path().join("hub.db")).unwrap(),
        Some(SCHEMA_VERSION)
    );
    // No AUTOINCREMENT left on the outbox: no `sqlite_sequence` page per commit.
    let c = Connection::open(dir.path().join("hub.db")).unwrap();
    let sql: String = c
        .query_row(
            "SELECT sql FROM sqlite_master WHERE name = 'outbox'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(!sql.contains("AUTOINCREMENT"), "{sql}");
}

#[test]
fn the_commit_window_is_long_at_low_rates_short_under_load_and_skipped_for_closed_loops() {
    use super::pace::{Pace, SHORT_WINDOW};
    use std::time::{Duration, Instant};
    let opts = OutboxOptions {
        commit_window: Duration::from_secs(2),
        ..OutboxOptions::default()
    };
    let mut pace = Pace::default();
    let t0 = Instant::now();
    let ms = |n: u64| t0 + Duration::from_millis(n);
    // Nothing known yet: a low rate, the whole window.
    assert_eq!(pace.window_for(opts.commit_window, 1, t0), Some(ms(2000)));
    pace.grouped(1, ms(2000));
    pace.answered(&[1], ms(2000));
    // Device 1 sends again 10 ms after its PUBACK: it waits for each one, so no window...
    assert_eq!(pace.window_for(opts.commit_window, 1, ms(2010)), None);
    pace.grouped(1, ms(2010));
    pace.answered(&[1], ms(2011));
    // ...but a device heard from long ago gets it.
    assert_eq!(
        pace.window_for(opts.commit_window, 2, ms(4000)),
        Some(ms(6000))
    );
    pace.grouped(10, ms(6000));
    // Under load (groups of 2 every 2 ms) the window is the short one.
    let mut at = 6000;
    for _ in 0..40 {
        at += 2;
        pace.window_for(opts.commit_window, 3, ms(at));
        pace.grouped(2, ms(at));
    }
    assert_eq!(
        pace.window_for(opts.commit_window, 4, ms(at + 2)),
        Some(ms(at + 2) + SHORT_WINDOW)
    );
    // Quiet again for a second: the long window.
    at += 1200;
    assert_eq!(
        pace.window_for(opts.commit_window, 5, ms(at)),
        Some(ms(at + 2000))
    );
    // Zero: commit at once, whatever the rate.
    let zero = OutboxOptions::default();
    assert_eq!(Pace::default().window_for(zero.commit_window, 1, t0), None);
}

/// Default options with a commit window of `secs` seconds.
fn windowed(secs: u64) -> OutboxOptions {
    OutboxOptions {
        commit_window: std::time::Duration::from_secs(secs),
        ..OutboxOptions::default()
    }
}

#[tokio::test]
async fn appends_that_come_during_the_window_share_its_commit() {
    let dir = tempfile::tempdir().unwrap();
    let opts = windowed(30);
    let (ob, th) = Outbox::open_with(dir.path(), opts, noop()).unwrap();
    let first = ob.submit(rec(1, 0)).await.unwrap();
    // The writer holds the first append's commit open for more; 63 more fill the group (64
    // rows end a window early) and all go in one commit.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let mut waiters = vec![first];
    for n in 1..64 {
        waiters.push(ob.submit(rec(100 + n as u64, n)).await.unwrap());
    }
    for w in waiters {
        w.await.unwrap().unwrap();
    }
    assert_eq!(
        ob.stats()
            .commits
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // Device 1 got its answer just now: it is not held when it sends again, nor is the
    // commit it joins (a window of 30 s would hang here).
    ob.append(rec(1, 1)).await.unwrap();
    assert_eq!(
        ob.stats()
            .commits
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    drop(ob);
    th.join().unwrap();
}

/// The watchdog's ping is answered inside a commit window without ending it, and does not
/// force the deferred deletes into a commit of their own (a read every few seconds did both:
/// at home an extra commit, a sync and a few pages on the card every 5 s).
#[tokio::test]
async fn a_ping_neither_ends_the_commit_window_nor_forces_a_commit() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let opts = windowed(3);
    let (ob, _th) = Outbox::open_with(dir.path(), opts, noop()).unwrap();
    let first = ob.submit(rec(1, 0)).await.unwrap();
    // A ping inside the 3 s window: it is answered after the group's commit...
    let ping = tokio::spawn({
        let ob = ob.clone();
        async move { ob.ping().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ...and the window stays open for a second append, so both go in one commit.
    let second = ob.submit(rec(2, 0)).await.unwrap();
    ping.await.unwrap().unwrap();
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    assert_eq!(
        ob.stats().commits.load(Relaxed),
        1,
        "the ping ended the commit window"
    );
    // An acknowledged row waits for the next append's commit; pings do not commit it.
    let row = ob.fetch(1, 0, 10).await.unwrap().remove(0);
    ob.ack(row.id).await;
    for _ in 0..3 {
        ob.ping().await.unwrap();
    }
    assert_eq!(ob.stats().commits.load(Relaxed), 1);
    assert_eq!(ob.stats().rows_acked.load(Relaxed), 0);
    assert_eq!(ob.pending_rows(), 2, "the acked row is still in the table");
    ob.append(rec(1, 1)).await.unwrap();
    assert_eq!(ob.stats().rows_acked.load(Relaxed), 1);
    assert_eq!(ob.pending_rows(), 2);
}

/// The writer waits out a commit window parked, not on the channel: dropping the last handle
/// must still end the window at once, commit what waits and stop (with a window of an hour,
/// a writer that missed the close would hold the join here for that hour).
#[tokio::test]
async fn dropping_the_last_handle_ends_an_open_window_and_commits_it() {
    let dir = tempfile::tempdir().unwrap();
    let opts = windowed(3600);
    let (ob, th) = Outbox::open_with(dir.path(), opts.clone(), noop()).unwrap();
    let first = ob.submit(rec(1, 0)).await.unwrap();
    let second = ob.submit(rec(2, 0)).await.unwrap();
    // (Time for the writer to take both and wait in the window.)
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    drop(ob);
    tokio::task::spawn_blocking(move || th.join().unwrap())
        .await
        .unwrap();
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    let (ob, _th) = Outbox::open_with(dir.path(), opts, noop()).unwrap();
    assert_eq!(ob.pending_rows(), 2, "both appends were committed");
}

/// The checkpointer sleeps until the writer nudges it: a lone commit is still synced (by the
/// `SYNC_AT_LEAST_EVERY` rule), and so are 64 rows that come after (the rows rule). What this
/// cannot show without timing is how soon; the home benchmark counts the wake-ups.
#[tokio::test]
async fn commits_are_synced_with_the_checkpointer_asleep_between_them() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let (ob, _th) = Outbox::open(dir.path(), false, noop()).unwrap();
    let syncs = || ob.stats().wal_syncs.load(Relaxed);
    let wait_for = |n: u64| async move {
        // (A bound only so that a broken checkpointer fails instead of hanging.)
        for _ in 0..600 {
            if syncs() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the WAL was not synced ({} syncs, wanted {n})", syncs());
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(syncs(), 0, "nothing was committed, nothing to sync");
    ob.append(rec(1, 0)).await.unwrap();
    wait_for(1).await;
    for n in 1..=64 {
        ob.append(rec(1, n)).await.unwrap();
    }
    wait_for(2).await;
}
