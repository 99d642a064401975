//! The checkpointer thread: syncs the WAL (what makes commits durable under
//! `synchronous=NORMAL`) and copies it into the database file, on its own connection so that a
//! commit never waits for an fsync. It sleeps until something is due: the writer nudges it
//! ([`Nudge`]) for the first commit after a sync and when [`SYNC_ROWS`] rows wait. It must not
//! write rows.

use super::OutboxStats;
use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::mpsc::{RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the checkpointer looks while [`SYNC_ROWS`] rows or [`CHECKPOINT_COMMITS`] commits
/// wait. It makes the commits since the last sync durable (`fdatasync` of the WAL) once
/// [`SYNC_ROWS`] rows are unsynced (at this cadence) or the oldest unsynced commit is
/// [`SYNC_AT_LEAST_EVERY`] old: a power cut loses at most the last half second under load, and
/// at most the last ~5 s (fewer than [`SYNC_ROWS`] events) at home rates. It used to look every
/// 500 ms whatever the load: at home two wake-ups a second for a sync every five (issue 12).
pub(super) const SYNC_EVERY: Duration = Duration::from_millis(500);
/// Unsynced rows that make the next look sync.
pub(super) const SYNC_ROWS: u64 = 64;
/// The longest a commit stays unsynced (plus one look). Why not every look: each sync makes the
/// WAL's last, partly written 4 KiB page clean, and the next commit writes it again; at home
/// rates (a group commit every ~2 s) a sync per commit was ~4 KiB of a ~9 KiB commit, and an SD
/// card writes that page once per sync (issue 12: 1,038 -> ~800 B per event at home).
pub(super) const SYNC_AT_LEAST_EVERY: Duration = Duration::from_secs(5);
/// How often it copies the WAL into the database file (a checkpoint: two fsyncs and every
/// touched database page written again), unless `CHECKPOINT_COMMITS` commits come first (under
/// load it still checkpoints at every look, as before). At home rates each checkpoint rewrote
/// the same few pages for a few events; the WAL is synced by the rule above whatever this is,
/// so a longer cadence costs no durability, only a longer WAL (issue 12: every 500 ms, then
/// 5 s, then 60 s / 32 commits, where a checkpoint still cost ~70 B per event at home: ~24 KB
/// pages of `hub.db` rewritten each minute; now 5 min / 128 commits, a WAL of ~0.8 MB at home).
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_secs(300);
pub(super) const CHECKPOINT_COMMITS: u64 = 128;
/// WAL length (pages) at which the checkpointer briefly holds off the writer so that the WAL can
/// start over (8 MiB with 512-byte pages, 16 MiB with 1 KiB); below it, checkpoints never
/// block a commit.
pub(super) const WAL_RESTART_PAGES: i64 = 16 * 1024;
/// `journal_size_limit`: the WAL file is truncated back to this when it starts over.
pub(super) const WAL_KEEP_BYTES: i64 = 4 * 1024 * 1024;

/// Copies the WAL into the database file on its own thread and connection. SQLite's automatic
/// checkpoint would run inside a commit on the writer thread and make that commit (and every
/// PUBACK waiting for it) wait for two fsyncs: tens of ms on an SD card or a busy disk, which was
/// the hub's p99 latency (docs/BENCHMARKS.md). A PASSIVE checkpoint runs alongside commits.
/// Between checkpoints it syncs the WAL file itself, which is what makes commits durable under
/// `synchronous=NORMAL` (SQLite replays committed WAL frames at open).
pub(super) struct Checkpointer {
    stop: Sender<Msg>,
    thread: std::thread::JoinHandle<()>,
}

enum Msg {
    /// Something may have become due (see [`Nudge`]).
    Nudge,
    Stop,
}

/// The writer's side: after each commit it wakes the checkpointer only when it sleeps with
/// nothing unsynced (the first commit starts the [`SYNC_AT_LEAST_EVERY`] clock), or when the
/// unsynced rows reach [`SYNC_ROWS`]. A nudge missed by a race would delay a sync by at most
/// one [`SYNC_AT_LEAST_EVERY`] (the longest the checkpointer ever sleeps), never skip it.
pub(super) struct Nudge {
    flags: Arc<Flags>,
    tx: Sender<Msg>,
}

#[derive(Default)]
struct Flags {
    /// The checkpointer sleeps with everything synced.
    idle: AtomicBool,
    /// The checkpointer sleeps until `rows_limit` rows are appended (in all).
    rows_armed: AtomicBool,
    rows_limit: AtomicU64,
}

impl Nudge {
    /// After a commit that brought the appended rows to `rows` (in all).
    pub(super) fn committed(&self, rows: u64) {
        // The commit's counters (stored `Relaxed`) before the flags are read: pairs with the
        // checkpointer's flag stores and its second look at the counters.
        std::sync::atomic::fence(SeqCst);
        let rows_due = self.flags.rows_armed.load(SeqCst)
            && rows >= self.flags.rows_limit.load(SeqCst)
            && self.flags.rows_armed.swap(false, SeqCst);
        if self.flags.idle.swap(false, SeqCst) || rows_due {
            let _ = self.tx.send(Msg::Nudge);
        }
    }
}

impl Checkpointer {
    pub(super) fn start(
        path: &Path,
        sync_full: bool,
        stats: Arc<OutboxStats>,
    ) -> Result<(Checkpointer, Nudge), rusqlite::Error> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(
            None,
            "synchronous",
            if sync_full { "FULL" } else { "NORMAL" },
        )?;
        let wal_path = {
            let mut p = path.as_os_str().to_owned();
            p.push("-wal");
            PathBuf::from(p)
        };
        let (stop, rx) = std::sync::mpsc::channel::<Msg>();
        let flags = Arc::new(Flags::default());
        let nudge = Nudge {
            flags: flags.clone(),
            tx: stop.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("outbox-ckpt".into())
            .spawn(move || {
                let checkpoint = |mode: &str| {
                    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                        r.get::<_, i64>(1)
                    })
                };
                let mut wal: Option<std::fs::File> = None;
                let mut synced_commits = stats.commits.load(Relaxed);
                let mut synced_rows = stats.rows_appended.load(Relaxed);
                // When this thread first saw commits that are not synced yet.
                let mut unsynced_since: Option<Instant> = None;
                let mut checkpointed_commits = synced_commits;
                let mut checkpointed_at = Instant::now();
                let mut last_look = Instant::now();
                loop {
                    // Sleep until the next thing that can be due.
                    let commits = stats.commits.load(SeqCst);
                    let rows = stats.rows_appended.load(SeqCst);
                    let now = Instant::now();
                    let unsynced = commits != synced_commits && !sync_full;
                    if unsynced {
                        unsynced_since.get_or_insert(now);
                    }
                    let busy = (unsynced && rows.saturating_sub(synced_rows) >= SYNC_ROWS)
                        || commits - checkpointed_commits >= CHECKPOINT_COMMITS;
                    let mut at = now + SYNC_AT_LEAST_EVERY;
                    if busy {
                        at = at.min(last_look + SYNC_EVERY);
                    }
                    if let Some(since) = unsynced_since {
                        at = at.min(since + SYNC_AT_LEAST_EVERY);
                    }
                    if commits != checkpointed_commits {
                        at = at.min(checkpointed_at + CHECKPOINT_EVERY);
                    }
                    // Arm the writer's nudges, then look again at what it did meanwhile: either
                    // this sees its commit or it sees the flag (no nudge is lost to the race).
                    // (With `synchronous=FULL` every commit is synced already: no nudges, only
                    // checkpoints, looked for at least every `SYNC_AT_LEAST_EVERY`.)
                    if !unsynced && !sync_full {
                        flags.idle.store(true, SeqCst);
                    }
                    if unsynced && !busy {
                        flags.rows_limit.store(synced_rows + SYNC_ROWS, SeqCst);
                        flags.rows_armed.store(true, SeqCst);
                    }
                    let msg = if stats.commits.load(SeqCst) != commits {
                        Ok(Msg::Nudge)
                    } else {
                        rx.recv_timeout(at.saturating_duration_since(Instant::now()))
                    };
                    flags.idle.store(false, SeqCst);
                    flags.rows_armed.store(false, SeqCst);
                    let stopping = match msg {
                        Ok(Msg::Nudge) => continue,
                        Err(RecvTimeoutError::Timeout) => false,
                        Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => true,
                    };
                    last_look = Instant::now();
                    let commits = stats.commits.load(Relaxed);
                    let rows = stats.rows_appended.load(Relaxed);
                    let due = stopping
                        || commits - checkpointed_commits >= CHECKPOINT_COMMITS
                        || (commits != checkpointed_commits
                            && checkpointed_at.elapsed() >= CHECKPOINT_EVERY);
                    if due {
                        let r = match checkpoint("PASSIVE") {
                            Ok(wal_pages) if wal_pages >= WAL_RESTART_PAGES => {
                                checkpoint("RESTART")
                            }
                            other => other,
                        };
                        match r {
                            Ok(_) => {
                                stats.wal_syncs.fetch_add(1, Relaxed);
                                checkpointed_commits = commits;
                                synced_commits = commits;
                                synced_rows = rows;
                                unsynced_since = None;
                                checkpointed_at = Instant::now();
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "outbox checkpoint failed; retrying later")
                            }
                        }
                    } else if commits != synced_commits
                        && !sync_full
                        && (rows.saturating_sub(synced_rows) >= SYNC_ROWS
                            || unsynced_since.get_or_insert(last_look).elapsed()
                                >= SYNC_AT_LEAST_EVERY)
                    {
                        // (With `synchronous=FULL` every commit is synced already.)
                        if wal.is_none() {
                            wal = std::fs::File::open(&wal_path).ok();
                        }
                        match wal.as_ref().map(|f| f.sync_data()) {
                            Some(Ok(())) => {
                                stats.wal_syncs.fetch_add(1, Relaxed);
                                synced_commits = commits;
                                synced_rows = rows;
                                unsynced_since = None;
                            }
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "cannot sync the outbox WAL; retrying");
                                wal = None;
                            }
                            None => {}
                        }
                    }
                    if stopping {
                        return;
                    }
                }
            })
            .expect("spawn outbox checkpoint thread");
        Ok((Checkpointer { stop, thread }, nudge))
    }

    /// A last checkpoint, then the thread ends.
    pub(super) fn stop(self) {
        let _ = self.stop.send(Msg::Stop);
        let _ = self.thread.join();
    }
}
