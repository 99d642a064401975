//! The `modehub` command line: run the hub, check a config, run the MODE emulator, or a demo.

use anyhow::Context;
use clap::{Parser, Subcommand};
use modehub::config::{Config, ConfigError};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "modehub", version, about = "Edge gateway hub: local MQTT and serial sensors to the MODE cloud", long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the hub (the systemd service runs this).
    Run {
        /// Config file.
        #[arg(long, short, default_value = "/etc/modehub/config.toml")]
        config: PathBuf,
    },
    /// Validate a config file and print every problem found, with where and how to fix it.
    CheckConfig {
        /// Config file.
        #[arg(long, short, default_value = "/etc/modehub/config.toml")]
        config: PathBuf,
    },
    /// Show what waits in the outbox (depth per device, oldest pending, dead letters).
    /// Read-only: safe while the hub runs.
    Outbox {
        /// Config file (for hub.data_dir).
        #[arg(long, short, default_value = "/etc/modehub/config.toml")]
        config: PathBuf,
        /// How many of the newest dead letters to list.
        #[arg(long, default_value_t = 20)]
        dead: usize,
    },
    /// Run the MODE cloud emulator on its own (for tests and trying things out).
    Emulator(modehub::emulator::EmulatorArgs),
    /// Run emulator + hub + a simulated sensor in one process, printing what travels.
    Demo(modehub::demo::DemoArgs),
}

fn init_logging(filter: &str) {
    use tracing_subscriber::EnvFilter;
    // rumqttd logs routine client disconnects at ERROR; keep it quiet unless asked for.
    let wanted = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_string());
    let wanted = if wanted.contains("rumqttd") {
        wanted
    } else {
        format!("{wanted},rumqttd=off")
    };
    let filter = EnvFilter::try_new(&wanted).unwrap_or_else(|_| EnvFilter::new("info,rumqttd=off"));
    // Under systemd, journald adds its own timestamps and does not render colours.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    if journald {
        builder.with_ansi(false).without_time().init();
    } else {
        builder.init();
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("error: {e}");
        if matches!(e, ConfigError::Invalid { .. }) {
            eprintln!(
                "(run `modehub check-config --config {}` after fixing)",
                path.display()
            );
        }
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Two async workers by default (SQLite has its own threads). MODEHUB_WORKER_THREADS sets
    // another count; see docs/BENCHMARKS.md for what 1 vs 2 costs.
    let workers = std::env::var("MODEHUB_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(2);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.cmd {
        Cmd::CheckConfig { config } => return check_config(&config),
        Cmd::Outbox { config, dead } => return outbox_report(&config, dead),
        Cmd::Run { config } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging(&cfg.hub.log);
            rt.block_on(run(cfg))
        }
        Cmd::Emulator(args) => {
            init_logging("info");
            rt.block_on(modehub::emulator::run_cli(args))
        }
        Cmd::Demo(args) => {
            init_logging("warn");
            rt.block_on(modehub::demo::run(args))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(cfg) => {
            println!("{}: OK", path.display());
            println!("  data_dir:   {}", cfg.hub.data_dir.display());
            println!("  local MQTT: {}", cfg.local.mqtt.listen);
            println!("  MODE MQTT:  {}", cfg.cloud.mqtt_url);
            println!("  devices:    {}", cfg.devices.len());
            for d in &cfg.devices {
                let home = d
                    .home_id
                    .map(|h| h.to_string())
                    .unwrap_or_else(|| "-".into());
                println!(
                    "    {:<24} mode_id {:<10} home {:<8} local login: {}",
                    d.name,
                    d.mode_id,
                    home,
                    if d.local_password.is_some() {
                        "name or MODE id"
                    } else {
                        "MODE id + API key"
                    }
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

fn outbox_report(path: &std::path::Path, dead: usize) -> ExitCode {
    let cfg = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let report = match modehub::outbox::inspect(&cfg.hub.data_dir, dead) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let age = |ms: Option<i64>| match ms {
        Some(t) => humantime::format_duration(std::time::Duration::from_secs(
            ((now - t).max(0) / 1000) as u64,
        ))
        .to_string(),
        None => "-".into(),
    };
    let names: std::collections::HashMap<u64, &str> = cfg
        .devices
        .iter()
        .map(|d| (d.mode_id, d.name.as_str()))
        .collect();
    println!(
        "outbox {} (schema v{})",
        cfg.hub.data_dir.join("hub.db").display(),
        report.schema_version
    );
    println!(
        "{:<24} {:>10} {:>8} {:>8} {:>12} {:>16} {:>9}",
        "device", "mode_id", "events", "kv", "bytes", "oldest pending", "unsynced"
    );
    let (mut rows, mut bytes) = (0, 0);
    for d in &report.devices {
        rows += d.rows;
        bytes += d.bytes;
        println!(
            "{:<24} {:>10} {:>8} {:>8} {:>12} {:>16} {:>9}",
            names.get(&d.device).copied().unwrap_or("(not configured)"),
            d.device,
            d.events,
            d.kv_changes,
            d.bytes,
            age(d.oldest_created_ms),
            d.unsynced
        );
    }
    println!(
        "total: {rows} rows, {bytes} bytes; {} commands waiting for their device",
        report.pending_commands
    );
    println!("dead letters: {}", report.dead_letters_total);
    for dl in &report.dead_letters {
        println!(
            "  #{:<8} device {:<10} {:?} {:<24} {} ago: {}",
            dl.id,
            dl.device,
            dl.kind,
            dl.key,
            age(Some(dl.failed_at_ms)),
            dl.reason
        );
    }
    ExitCode::SUCCESS
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    let hub = modehub::Hub::start(cfg).await.context("starting the hub")?;
    wait_for_stop().await;
    tracing::info!("stopping: finishing the current commit and closing sessions");
    hub.shutdown().await;
    Ok(())
}

async fn wait_for_stop() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
