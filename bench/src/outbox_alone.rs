//! The outbox's SQLite append path alone: `writers` concurrent producers (like the hub's local
//! connections), each keeping up to `window` appends waiting for their commit (like a sensor's
//! QoS 1 in-flight window), through the public `modehub::outbox::Outbox` API. Prints one JSON
//! line: appends/s, commits, rows per commit, and bytes written to disk (`/proc/self/io`).
//!
//! ```text
//! target/release/modehub-bench outbox-alone DIR [MESSAGES] [WRITERS] [WINDOW] [BODY_BYTES] [full]
//! target/release/modehub-bench outbox-alone DIR home RATE SECS [DEVICES] [BODY_BYTES]
//! ```
//! The `home` form is the outbox's part of the home profile: RATE appends a second spread over
//! DEVICES, each row fetched and acknowledged after its commit the way the uplink does, for
//! SECS seconds; it prints the bytes written and commits per event.

use modehub::outbox::{Capture, Kind, NewRecord, Notifier, Outbox};
use std::collections::VecDeque;
use std::sync::atomic::Ordering::{self, Relaxed};
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
    if args.get(1).is_some_and(|a| a == "home") {
        return home(args).await;
    }
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

/// Appends at a fixed rate; after each commit the row is fetched and acknowledged (as the
/// uplink does once MODE's PUBACK is in).
async fn home(args: Vec<String>) -> anyhow::Result<()> {
    let dir = std::path::PathBuf::from(&args[0]);
    let rate: f64 = arg(&args, 2, 5.0);
    let secs: f64 = arg(&args, 3, 60.0);
    let devices: u64 = arg(&args, 4, 50u64).max(1);
    let body_bytes: usize = arg(&args, 5, 80);
    let noop: Notifier = Arc::new(|_| {});
    let (outbox, thread) = Outbox::open(&dir, false, noop)?;
    let body = format!(
        "{{\"pad\":\"{}\"}}",
        "x".repeat(body_bytes.saturating_sub(10))
    );
    let period = std::time::Duration::from_secs_f64(1.0 / rate);
    let n = (rate * secs) as u64;
    let mut cursors = std::collections::HashMap::new();
    let before = write_bytes();
    let commits0 = outbox.stats().commits.load(Ordering::Relaxed);
    let start = tokio::time::Instant::now();
    for i in 0..n {
        tokio::time::sleep_until(start + period * i as u32).await;
        let device = 100_000 + i % devices;
        outbox
            .append(NewRecord {
                device,
                kind: Kind::Event,
                key: "reading".into(),
                body: body.clone(),
                captured: Capture::at(1),
            })
            .await?;
        let cursor = cursors.entry(device).or_insert(0i64);
        for row in outbox.fetch(device, *cursor, 32).await? {
            *cursor = row.id;
            outbox.ack(row.id).await;
        }
    }
    // Let the last acknowledgements and a checkpoint happen.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let written = write_bytes() - before;
    let commits = outbox.stats().commits.load(Ordering::Relaxed) - commits0;
    println!(
        "{{\"events\":{n},\"write_bytes\":{written},\"write_bytes_per_event\":{:.1},\"commits_per_event\":{:.2}}}",
        written as f64 / n.max(1) as f64,
        commits as f64 / n.max(1) as f64
    );
    drop(outbox);
    let _ = thread.join();
    Ok(())
}
