//! `modehub emulator`: runs the emulator from a seed file until Ctrl-C, logging each event.
//! It must not add behaviour the library API lacks.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use tokio::sync::broadcast;

use super::{Behaviour, Emulator, EmulatorConfig, Seed};

/// `modehub emulator` arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct EmulatorArgs {
    /// Seed file (.toml or .json) with homes, devices and keys.
    #[arg(long, value_name = "FILE")]
    pub seed: PathBuf,
    /// REST / WebSocket / control API listen address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// Device MQTT listen address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:1884")]
    pub mqtt: SocketAddr,
    /// Per-device data messages per minute (default 600, as MODE documents; 0 = off). The
    /// project-wide limit (6,000) is switched off with it.
    #[arg(long, value_name = "N")]
    pub rate_limit: Option<u32>,
    /// Flip every assumed (unconfirmed) behaviour to its other guess (see docs/emulator.md);
    /// also set by `MODEHUB_EMULATOR_ASSUMED=flipped`.
    #[arg(long)]
    pub flip_assumed: bool,
}

/// Runs the emulator until Ctrl-C, logging each arriving event.
pub async fn run_cli(args: EmulatorArgs) -> anyhow::Result<()> {
    let seed = Seed::from_file(&args.seed)?;
    let (homes, devices) = (seed.home.len(), seed.device.len());
    let cfg = EmulatorConfig {
        http_listen: args.http,
        mqtt_listen: args.mqtt,
        seed,
        behaviour: {
            let mut b = Behaviour::from_env();
            if args.flip_assumed && std::env::var(super::ASSUMED_ENV).as_deref() != Ok("flipped") {
                b = b.flip_assumed();
            }
            match args.rate_limit {
                Some(0) => b.without_rate_limits(),
                Some(n) => Behaviour {
                    rate_limit_per_minute: Some(n),
                    ..b
                },
                None => b,
            }
        },
    };
    let emu = Emulator::start(cfg).await?;
    println!(
        "MODE emulator: REST/WebSocket on http://{}, device MQTT on {} ({} homes, {} devices); \
         control API under http://{}/_emulator/",
        emu.http_addr(),
        emu.mqtt_addr(),
        homes,
        devices,
        emu.http_addr()
    );
    let mut rx = emu.handle().subscribe_events();
    let logger = tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(ev) => tracing::info!(
                    device = ev.device_id,
                    home = ?ev.home_id,
                    transport = %ev.transport,
                    event_type = %ev.event_type,
                    data = %ev.event_data,
                    "event"
                ),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!("event log lagged, {n} events not logged")
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    println!("MODE emulator: shutting down");
    logger.abort();
    emu.shutdown().await;
    Ok(())
}
