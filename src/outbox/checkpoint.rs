//! The checkpointer thread: syncs the WAL (what makes commits durable under
//! `synchronous=NORMAL`) and copies it into the database file, on its own connection so that a
//! commit never waits for an fsync. It must not write rows.

use super::OutboxStats;
use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the checkpointer looks. At each look it makes the commits since the last sync
/// durable (`fdatasync` of the WAL) once [`SYNC_ROWS`] rows are unsynced or the oldest unsynced
/// commit is [`SYNC_AT_LEAST_EVERY`] old: a power cut loses at most the last half second under
/// load, and at most the last ~5 s (fewer than [`SYNC_ROWS`] events) at home rates.
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
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Checkpointer {
    pub(super) fn start(
        path: &Path,
        sync_full: bool,
        stats: Arc<OutboxStats>,
    ) -> Result<Checkpointer, rusqlite::Error> {
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
        let (stop, rx) = std::sync::mpsc::channel::<()>();
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
                loop {
                    let stopping = !matches!(
                        rx.recv_timeout(SYNC_EVERY),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                    );
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
                            || unsynced_since.get_or_insert_with(Instant::now).elapsed()
                                >= SYNC_AT_LEAST_EVERY)
                    {
                        // (With `synchronous=FULL` every commit is synced already.)
                        if wal.is_none() {
                            wal = std::fs::File::open(&wal_path).ok();
                        }
                        match wal.as_ref().map(|f| f.sync_data()) {
                            Some(Ok(())) => {
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
        Ok(Checkpointer { stop, thread })
    }

    /// A last checkpoint, then the thread ends.
    pub(super) fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}
