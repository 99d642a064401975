//! The outbox's SQLite append path alone: `writers` concurrent producers (like the hub's local
//! connections), each keeping up to `window` appends waiting for their commit (like a sensor's
//! QoS 1 in-flight window), through the public `modehub::outbox::Outbox` API. Prints one JSON
//! line: appends/s, commits, rows per commit, and bytes written to disk (`/proc/self/io`).
//!
//! ```text
//! target/release/modehub-bench outbox-alone DIR [MESSAGES] [WRITERS] [WINDOW] [BODY_BYTES] [full]
//! target/release/modehub-bench outbox-alone DIR home RATE SECS [DEVICES] [BODY_BYTES] [WINDOW_MS] [full]
//! ```
//! The `home` form is the outbox's part of the home profile (and, with RATE 1000, of the fixed
//! rate run): RATE appends a second spread over DEVICES, each device keeping up to 100 appends
//! waiting for their commit (a sensor's QoS 1 window), each row fetched and acknowledged after
//! its commit the way the uplink does, for SECS seconds, with the hub's default commit window
//! (`hub.commit_window_ms`) unless WINDOW_MS is given; it prints the bytes written, commits per
//! event, and the time from submit to commit (p50, p99, worst; after a first second of warm-up).

use modehub::outbox::{Capture, Kind, NewRecord, Notifier, Outbox, OutboxOptions};
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
    let window_ms: u64 = arg(
        &args,
        6,
        modehub::config::HubConfig::default().commit_window_ms,
    );
    let sync_full = args.get(7).is_some_and(|a| a == "full");
    let noop: Notifier = Arc::new(|_| {});
    let (outbox, thread) = Outbox::open_with(
        &dir,
        OutboxOptions {
            sync_full,
            commit_window: std::time::Duration::from_millis(window_ms),
            ..OutboxOptions::default()
        },
        noop,
    )?;
    let body = format!(
        "{{\"pad\":\"{}\"}}",
        "x".repeat(body_bytes.saturating_sub(10))
    );
    let period = std::time::Duration::from_secs_f64(1.0 / rate);
    let n = (rate * secs) as u64;
    let warmup = rate as u64;
    let before = write_bytes();
    let commits0 = outbox.stats().commits.load(Ordering::Relaxed);
    // One task per device: its appends in order, each acknowledged after its commit.
    let mut feeds = Vec::new();
    let mut tasks = Vec::new();
    for d in 0..devices {
        let (tx, mut rx) =
            tokio::sync::mpsc::channel::<(u64, Instant, modehub::outbox::CommitWaiter)>(100);
        feeds.push(tx);
        let outbox = outbox.clone();
        tasks.push(tokio::spawn(async move {
            let device = 100_000 + d;
            let mut cursor = 0i64;
            let mut waits = Vec::new();
            while let Some((i, at, waiter)) = rx.recv().await {
                waiter.await??;
                // The first second is warm-up (the writer has not seen the rate yet).
                if i >= warmup {
                    waits.push(at.elapsed().as_secs_f64());
                }
                let rows = match outbox.take_committed(device, cursor, 32) {
                    Some(rows) if !rows.is_empty() => rows,
                    _ => {
                        outbox.listen(device);
                        outbox.fetch(device, cursor, 32).await?
                    }
                };
                for row in rows {
                    cursor = row.id;
                    outbox.ack(row.id).await;
                }
            }
            anyhow::Ok(waits)
        }));
    }
    let start = tokio::time::Instant::now();
    for i in 0..n {
        tokio::time::sleep_until(start + period * i as u32).await;
        let device = i % devices;
        let waiter = outbox
            .submit(NewRecord {
                device: 100_000 + device,
                kind: Kind::Event,
                key: "reading".into(),
                body: body.clone(),
                captured: Capture::at(1),
            })
            .await?;
        feeds[device as usize]
            .send((i, Instant::now(), waiter))
            .await
            .map_err(|_| anyhow::anyhow!("a device task ended early"))?;
    }
    drop(feeds);
    let mut waits = Vec::new();
    for t in tasks {
        waits.extend(t.await??);
    }
    waits.sort_by(f64::total_cmp);
    let at = |q: f64| {
        waits
            .get(((waits.len() as f64 * q) as usize).min(waits.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
            * 1000.0
    };
    // Let the last acknowledgements and a checkpoint happen.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let written = write_bytes() - before;
    let commits = outbox.stats().commits.load(Ordering::Relaxed) - commits0;
    println!(
        "{{\"events\":{n},\"rate\":{rate},\"commit_window_ms\":{window_ms},\"write_bytes\":{written},\"write_bytes_per_event\":{:.1},\"commits_per_event\":{:.3},\"commit_wait_ms_p50\":{:.2},\"commit_wait_ms_p99\":{:.2},\"commit_wait_ms_max\":{:.2}}}",
        written as f64 / n.max(1) as f64,
        commits as f64 / n.max(1) as f64,
        at(0.5),
        at(0.99),
        at(1.0)
    );
    drop(outbox);
    let _ = thread.join();
    Ok(())
}
