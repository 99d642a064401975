//! The `_seq` high-water mark that survives the database: a small side file (`seq-floor` in the
//! data directory) with, per device, a number above every sequence number ever handed out.
//!
//! `_seq` must never go back: a consumer that drops duplicates by `_seq` would drop new data.
//! The database keeps the next number per device, but a corrupt `hub.db` that is salvaged with
//! nothing readable (or a deleted one) would restart at 1. So before a commit hands out numbers
//! past the mark, the writer moves the mark [`BLOCK`] ahead and writes the file (fsynced, 0600)
//! first; one write per [`BLOCK`] events per device. On open, a device whose number in the
//! database is below `mark - BLOCK` (the least it can be if the database is intact) continues
//! at the mark instead: a gap, never a repeat. This module must not touch the database.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// How far ahead of the next sequence number the mark is moved.
pub(super) const BLOCK: u64 = 1000;
/// The file's name in the data directory.
pub(super) const FILE: &str = "seq-floor";

pub(super) struct SeqFloor {
    path: PathBuf,
    /// Per device: every number handed out is below this.
    marks: HashMap<u64, u64>,
}

impl SeqFloor {
    /// Reads the marks of `data_dir` (none if the file is missing; a line that does not parse
    /// is skipped with a warning).
    pub(super) fn load(data_dir: &Path) -> SeqFloor {
        let path = data_dir.join(FILE);
        let mut marks = HashMap::new();
        if let Ok(text) = std::fs::read_to_string(&path) {
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let mut w = line.split_whitespace();
                match (
                    w.next().and_then(|d| d.parse::<u64>().ok()),
                    w.next().and_then(|m| m.parse::<u64>().ok()),
                ) {
                    (Some(d), Some(m)) => {
                        marks.insert(d, m);
                    }
                    _ => {
                        tracing::warn!(path = %path.display(), "seq-floor: skipping a line that does not read `device mark`")
                    }
                }
            }
        }
        SeqFloor { path, marks }
    }

    /// Raises next numbers read from the database where the database went back.
    pub(super) fn apply(&self, seqs: &mut HashMap<u64, u64>) {
        for (&d, &mark) in &self.marks {
            let next = seqs.entry(d).or_insert(1);
            if *next + BLOCK < mark {
                tracing::warn!(
                    device = d,
                    database = *next,
                    continues_at = mark,
                    "the outbox database lost this device's sequence numbers: _seq continues above every number handed out"
                );
                *next = mark;
            }
        }
    }

    /// After a writer that did not stop cleanly: every device with a mark continues at it (the
    /// database's `device_seq` is written only at a clean stop, so it may be behind). A gap of
    /// at most [`BLOCK`], never a repeat. Returns how many devices moved.
    pub(super) fn raise_to_marks(&self, seqs: &mut HashMap<u64, u64>) -> usize {
        let mut moved = 0;
        for (&d, &mark) in &self.marks {
            let next = seqs.entry(d).or_insert(1);
            if *next < mark {
                *next = mark;
                moved += 1;
            }
        }
        moved
    }

    /// Makes sure numbers below `next` of each `(device, next)` are under the mark, writing
    /// the file first if a mark has to move.
    pub(super) fn cover(
        &mut self,
        upto: impl IntoIterator<Item = (u64, u64)>,
    ) -> std::io::Result<()> {
        let mut moved = false;
        for (d, next) in upto {
            let mark = self.marks.entry(d).or_insert(0);
            if next > *mark {
                *mark = next + BLOCK;
                moved = true;
            }
        }
        if moved {
            self.save()?;
        }
        Ok(())
    }

    fn save(&self) -> std::io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut text = String::new();
        let mut marks: Vec<_> = self.marks.iter().collect();
        marks.sort();
        for (d, m) in marks {
            text.push_str(&format!("{d} {m}\n"));
        }
        {
            let mut o = std::fs::OpenOptions::new();
            o.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
            let mut f = o.open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)
    }
}
