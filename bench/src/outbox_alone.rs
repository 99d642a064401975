//! The outbox's SQLite append path alone: `writers` concurrent producers (like the hub's local
//! connections), each keeping up to `window` appends waiting for their commit (like a sensor's
//! QoS 1 in-flight window), through the public `modehub::outbox::Outbox` API. Prints one JSON
//! line: appends/s, commits, rows per commit, and bytes written to disk (`/proc/self/io`).
//!
//! ```text
//! target/release/modehub-bench outbox-alone DIR [MESSAGES] [WRITERS] [WINDOW] [BODY_BYTES] [full]
//! ```

use modehub::outbox::{Capture, Kind, NewRecord, Notifier, Outbox};
use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

fn write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| {
                    l.strip_prefix("write_bytes:")
                        .map(|v| v.trim().parse().ok())
                })
                .flatten()
        })
        .unwrap_or(0)
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> T {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

pub fn main(args: Vec<String>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Vec<String>) -> anyhow::Result<()> {
    let dir = std::path::PathBuf::from(
        args.first()
            .cloned()
            .unwrap_or_else(|| "outbox-alone".into()),
    );
    let messages: usize = arg(&args, 1, 50_000);
    let writers: usize = arg(&args, 2, 20).max(1);
    let window: usize = arg(&args, 3, 100).max(1);
    let body_bytes: usize = arg(&args, 4, 80);
    let sync_full = args.get(5).is_some_and(|a| a == "full");

    let noop: Notifier = Arc::new(|_| {});
    let (outbox, thread) = Outbox::open(&dir, sync_full, noop)?;
    let body = format!(
        "{{\"pad\":\"{}\"}}",
        "x".repeat(body_bytes.saturating_sub(10))
    );
    let per_writer = messages / writers;
    let before = write_bytes();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let outbox = outbox.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut pending = VecDeque::with_capacity(window);
            for _ in 0..per_writer {
                if pending.len() >= window {
                    let waiter: modehub::outbox::CommitWaiter = pending.pop_front().unwrap();
                    waiter.await??;
                }
                let rec = NewRecord {
                    device: 100_000 + w as u64,
                    kind: Kind::Event,
                    key: "bench".into(),
                    body: body.clone(),
                    captured: Capture::at(1),
                };
                pending.push_back(outbox.submit(rec).await?);
            }
            for waiter in pending {
                waiter.await??;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let written = write_bytes() - before;
    let stats = outbox.stats();
    let commits = stats.commits.load(Relaxed);
    let rows = stats.rows_appended.load(Relaxed);
    println!(
        "{{\"appends\":{rows},\"seconds\":{elapsed:.4},\"appends_per_s\":{:.1},\"commits\":{commits},\"rows_per_commit\":{:.2},\"write_bytes\":{written},\"write_bytes_per_row\":{:.1}}}",
        rows as f64 / elapsed,
        rows as f64 / commits.max(1) as f64,
        written as f64 / rows.max(1) as f64
    );
    drop(outbox);
    let _ = thread.join();
    Ok(())
}
