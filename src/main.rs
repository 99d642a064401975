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
    /// Show the running hub's devices, queues and health (asks its ops endpoint).
    Status {
        /// Print the raw JSON (`/status.json`) for scripts.
        #[arg(long)]
        json: bool,
        /// The hub's ops endpoint ([ops] listen); default: read from --config.
        #[arg(long, value_name = "ADDR", conflicts_with = "config")]
        ops: Option<String>,
        /// Config file whose [ops] listen to use.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run the MODE cloud emulator on its own (for tests and trying things out).
    #[cfg(feature = "emulator")]
    Emulator(modehub::emulator::EmulatorArgs),
    /// Run emulator + hub + a simulated sensor in one process, printing what travels.
    #[cfg(feature = "emulator")]
    Demo(modehub::demo::DemoArgs),
    /// Check the setup (config, disk, clock, MODE reachable, keys, homes, serial ports, local
    /// port) and say how to fix each problem. Exit code 1 when a check fails.
    Doctor {
        /// Config file.
        #[arg(long, short, default_value = "/etc/modehub/config.toml")]
        config: PathBuf,
        /// Print the checklist as JSON (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// List, add or remove devices and set local passwords, editing the config in place.
    Device(modehub::device_cli::DeviceArgs),
    /// Print the man page (roff), generated from these definitions (the .deb build uses it).
    #[command(hide = true)]
    Man {
        /// Write modehub.1 and one page per subcommand (modehub-run.1, ...) into this directory.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

/// Changes the log filter of a running hub (SIGHUP with a new `[hub] log`).
type LogReload = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// The filter actually used: `RUST_LOG` wins over the config; rumqttd's routine disconnect
/// ERRORs stay off unless asked for.
fn log_filter(configured: &str) -> String {
    let wanted = std::env::var("RUST_LOG").unwrap_or_else(|_| configured.to_string());
    if wanted.contains("rumqttd") {
        wanted
    } else {
        format!("{wanted},rumqttd=off")
    }
}

/// Human format with colours on a terminal; plain under journald (journald adds its own
/// timestamps and renders no colours) and when stderr is a file or pipe (no ANSI codes).
fn init_logging(configured: &str) -> LogReload {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{fmt, reload, EnvFilter};
    let filter = EnvFilter::try_new(log_filter(configured))
        .unwrap_or_else(|_| EnvFilter::new("info,rumqttd=off"));
    let (filter, handle) = reload::Layer::new(filter);
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let ansi = !journald && std::io::stderr().is_terminal();
    let layer = fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi);
    if journald {
        tracing_subscriber::registry()
            .with(filter)
            .with(layer.without_time())
            .init();
    } else {
        tracing_subscriber::registry()
            .with(filter)
            .with(layer)
            .init();
    }
    Box::new(move |configured: &str| {
        let f = EnvFilter::try_new(log_filter(configured)).map_err(|e| e.to_string())?;
        handle.reload(f).map_err(|e| e.to_string())
    })
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
    // One thread for all async work by default (SQLite has its own threads): every event
    // crosses between threads only to the outbox writer and back. With two workers each event
    // also woke the idle worker (work stealing) and moved the I/O driver between them: ~11
    // context switches per event at home rates instead of ~7 (issue 12, docs/BENCHMARKS.md).
    // MODEHUB_WORKER_THREADS=N (N >= 1) runs N workers instead (a hub with many busy serial
    // ports or a multi-core box under heavy load may want that).
    let workers = std::env::var("MODEHUB_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0);
    let built = match workers {
        None => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    };
    let rt = match built {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if matches!(
        cli.cmd,
        Cmd::CheckConfig { .. } | Cmd::Status { .. } | Cmd::Outbox { .. }
    ) {
        // Report commands end quietly when their reader goes away (`| head`), like other
        // Unix tools, instead of failing on a closed pipe. The hub itself keeps ignoring SIGPIPE.
        // SAFETY: setting a disposition is process-wide and async-signal-safe; nothing in these
        // commands relies on SIGPIPE being ignored.
        let _ = unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            )
        };
    }
    let result = match cli.cmd {
        Cmd::CheckConfig { config } => return check_config(&config),
        Cmd::Status { json, ops, config } => return status(json, ops, config),
        Cmd::Outbox { config, dead } => return outbox_report(&config, dead),
        Cmd::Man { out_dir } => return man_page(out_dir),
        Cmd::Device(args) => return device(&args),
        Cmd::Doctor { config, json } => {
            let report = rt.block_on(modehub::doctor::run(&config, &Default::default()));
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!("{}", report.render());
            }
            return if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            };
        }
        Cmd::Run { config } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let reload_log = init_logging(&cfg.hub.log);
            for w in cfg.file_warnings(&config) {
                tracing::warn!("{w}");
            }
            rt.block_on(run(cfg, config, reload_log))
        }
        #[cfg(feature = "emulator")]
        Cmd::Emulator(args) => {
            let _ = init_logging("info");
            rt.block_on(modehub::emulator::run_cli(args))
        }
        #[cfg(feature = "emulator")]
        Cmd::Demo(args) => {
            let _ = init_logging("warn");
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

fn device(args: &modehub::device_cli::DeviceArgs) -> ExitCode {
    match modehub::device_cli::run(args, &mut std::io::stdin().lock()) {
        Ok(out) => {
            for l in out.lines {
                println!("{l}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn man_page(out_dir: Option<PathBuf>) -> ExitCode {
    let cmd = <Cli as clap::CommandFactory>::command();
    let written = match out_dir {
        Some(dir) => clap_mangen::generate_to(cmd, dir),
        None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout().lock()),
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write the man page: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(cfg) => {
            println!("{}: OK", path.display());
            for w in cfg.file_warnings(path) {
                println!("  warning: {w}");
            }
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

fn status(json: bool, ops: Option<String>, config: Option<PathBuf>) -> ExitCode {
    use modehub::ops::status as st;
    const DEFAULT_CONFIG: &str = "/etc/modehub/config.toml";
    let addr = match (ops, config) {
        (Some(a), _) => a,
        (None, Some(c)) => match st::ops_addr_from_config(&c) {
            Ok(Some(a)) => a,
            Ok(None) => {
                eprintln!(
                    "error: {} switches the ops endpoint off ([ops] listen = \"off\"); `modehub status` needs it. Set e.g. listen = \"127.0.0.1:9464\" and restart the hub.",
                    c.display()
                );
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
        // The default config may be unreadable for this user: fall back to the default address.
        (None, None) => match st::ops_addr_from_config(std::path::Path::new(DEFAULT_CONFIG)) {
            Ok(Some(a)) => a,
            _ => st::DEFAULT_OPS.to_string(),
        },
    };
    match st::fetch(&addr) {
        Ok((report, raw)) => {
            if json {
                println!("{}", raw.trim_end());
            } else {
                print!("{}", st::render_table(&report));
            }
            if report.health.healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(3)
        }
    }
}

/// Runs the hub until SIGTERM or SIGINT; SIGHUP re-reads the config.
async fn run(cfg: Config, path: PathBuf, reload_log: LogReload) -> anyhow::Result<()> {
    use modehub::ops::notify::SystemdNotifier;
    use tokio::signal::unix::{signal, SignalKind};
    let started = std::time::Instant::now();
    let notifier = SystemdNotifier::from_env();
    // Subscribe before starting, so no signal is lost in between.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut hub = modehub::Hub::start(cfg.clone())
        .await
        .context("starting the hub")?;
    let ctx = hub.ops_context(&cfg);
    let ops_addr = hub
        .start_ops_server(ctx.clone(), &cfg)
        .await
        .context("starting the ops endpoint")?;
    hub.start_notifier(ctx.clone(), &notifier);
    let line = ctx.status_line().await;
    notifier.ready(&line);
    tracing::info!(
        startup_ms = started.elapsed().as_millis() as u64,
        ops = %ops_addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        watchdog = ?notifier.watchdog(),
        "ready"
    );
    let mut current = cfg;
    let why = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => {
                notifier.reloading();
                current = reload(&path, current, &reload_log, &mut hub).await;
                notifier.ready(&ctx.status_line().await);
            }
        }
    };
    tracing::info!(
        signal = why,
        "stopping: finishing the current commit and closing sessions"
    );
    notifier.stopping("stopping: draining");
    drop(ctx);
    // Systemd's stop timeout is longer; 5 s is our own promise (committed rows are safe anyway).
    if tokio::time::timeout(std::time::Duration::from_secs(5), hub.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown took longer than 5 s; exiting anyway (every acknowledged message is committed)");
    } else {
        tracing::info!("stopped cleanly");
    }
    Ok(())
}

/// SIGHUP: re-reads and validates the config. A bad file is rejected (the running config
/// stays); a good one applies the log filter, the device table and the serial ports at once
/// (unchanged devices keep their sessions) and says which other changes need a restart.
async fn reload(
    path: &std::path::Path,
    old: Config,
    reload_log: &LogReload,
    hub: &mut modehub::Hub,
) -> Config {
    let new = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(
                "SIGHUP: config rejected, the running configuration stays in force. {e}"
            );
            return old;
        }
    };
    if new.hub.log != old.hub.log {
        match reload_log(&new.hub.log) {
            Ok(()) => tracing::info!(log = %new.hub.log, "SIGHUP: log filter changed"),
            Err(e) => tracing::warn!(error = %e, "SIGHUP: cannot change the log filter"),
        }
    }
    let applied = hub.reload(&new).await;
    if applied.is_empty() {
        tracing::info!("SIGHUP: devices and serial ports unchanged");
    } else {
        tracing::info!(
            added = ?applied.added,
            removed = ?applied.removed,
            changed = ?applied.changed,
            serial = ?applied.ports,
            "SIGHUP: device table and serial ports reloaded; unchanged devices kept their sessions"
        );
    }
    let needs_restart = old.restart_needed(&new);
    if needs_restart.is_empty() {
        new
    } else {
        tracing::warn!(
            changed = %needs_restart.join(", "),
            "SIGHUP: config is valid, but these changes take effect only after a restart (systemctl restart modehub); the running hub keeps the old values for them"
        );
        // Keep the values that were not applied, so a later SIGHUP compares against what runs.
        Config {
            hub: modehub::config::HubConfig {
                log: new.hub.log.clone(),
                ..old.hub.clone()
            },
            local: old.local,
            cloud: old.cloud,
            ops: old.ops,
            ..new
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
        .map(|d| (d.mode_id.get(), d.name.as_str()))
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
