//! `modehub demo`: the MODE emulator, the hub and one simulated sensor in one process.
//!
//! A newcomer runs it to watch events travel sensor -> hub -> outbox -> MODE, and commands and
//! DDP changes come back down. It uses a temporary data directory and loopback ports only, and
//! must not be used as a production entry point.

use crate::config::{Config, Secret};
use crate::emulator::{Emulator, EmulatorConfig, Seed};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Seconds between the simulated sensor's readings.
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
}

const DEVICE_ID: u64 = 1001;
const HOME_ID: u64 = 42;

fn seed(api_key: &str) -> Seed {
    let text = format!(
        r#"
project_id = 1
[[home]]
id = {HOME_ID}
name = "Demo home"
[[device]]
id = {DEVICE_ID}
api_key = "{api_key}"
home_id = {HOME_ID}
name = "demo-sensor"
"#
    );
    toml::from_str(&text).expect("demo seed is valid")
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let api_key = format!("v1.demo.{}", fastrand::u64(..));
    let emulator = Emulator::start(EmulatorConfig {
        http_listen: "127.0.0.1:0".parse()?,
        mqtt_listen: "127.0.0.1:0".parse()?,
        seed: seed(&api_key),
        behaviour: Default::default(),
    })
    .await?;
    let cloud = emulator.handle();
    let data = tempfile::tempdir()?;
    let cfg_text = format!(
        r#"
[hub]
data_dir = "{}"
[local.mqtt]
listen = "127.0.0.1:0"
[cloud]
api_url = "http://{}"
mqtt_url = "mqtt://{}"
[[device]]
name = "demo-sensor"
mode_id = {DEVICE_ID}
home_id = {HOME_ID}
api_key = "{api_key}"
local_password = "demo"
"#,
        data.path().display(),
        emulator.http_addr(),
        emulator.mqtt_addr()
    );
    let cfg = Config::parse(&cfg_text, data.path())
        .map_err(|p| anyhow::anyhow!("demo config invalid: {p:?}"))?;
    let hub = crate::Hub::start(cfg).await?;
    println!("modehub demo");
    println!(
        "  emulated MODE cloud: REST http://{}  MQTT {}",
        emulator.http_addr(),
        emulator.mqtt_addr()
    );
    println!(
        "  hub local broker:    mqtt://{} (login demo-sensor / demo)",
        hub.local_addr()
    );
    println!("  data dir:            {}", data.path().display());
    println!();

    let mut events = cloud.subscribe_events();
    tokio::spawn(async move {
        while let Ok(ev) = events.recv().await {
            println!(
                "  cloud <- device {} event {:<12} {}  (arrived {})",
                ev.device_id, ev.event_type, ev.event_data, ev.timestamp
            );
        }
    });

    let mut opts = MqttOptions::new(
        "demo-sensor",
        hub.local_addr().ip().to_string(),
        hub.local_addr().port(),
    );
    opts.set_credentials("demo-sensor", Secret::new("demo").expose());
    let (sensor, mut el) = AsyncClient::new(opts, 16);
    let stopping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopping_rx = stopping.clone();
    sensor
        .subscribe("/devices/demo-sensor/command", QoS::AtMostOnce)
        .await?;
    sensor
        .subscribe("/devices/demo-sensor/kv", QoS::AtMostOnce)
        .await?;
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    println!(
                        "  sensor <- {:<32} {}",
                        p.topic,
                        String::from_utf8_lossy(&p.payload)
                    );
                }
                Ok(_) => {}
                Err(_) if stopping_rx.load(std::sync::atomic::Ordering::Relaxed) => return,
                Err(e) => {
                    println!("  sensor: connection problem: {e}; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });

    let interval = Duration::from_secs_f64(args.interval.max(0.05));
    let deadline = args
        .seconds
        .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let mut tick = 0u64;
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            break;
        }
        tick += 1;
        let celsius = 20.0 + (tick as f64 / 5.0).sin() * 2.0;
        let body = format!(
            r#"{{"eventType":"temperature","eventData":{{"celsius":{celsius:.2},"reading":{tick}}}}}"#
        );
        println!("  sensor -> /devices/demo-sensor/event {body}");
        sensor
            .publish("/devices/demo-sensor/event", QoS::AtLeastOnce, false, body)
            .await?;
        if tick.is_multiple_of(4) {
            let params = serde_json::json!({"times": tick / 4, "color": "green"});
            println!("  cloud -> command blink {params}");
            if let Err(e) = cloud.send_command(DEVICE_ID, "blink", params) {
                println!("  cloud: command not sent: {e:?}");
            }
        }
        if tick.is_multiple_of(6) {
            let v = serde_json::json!(tick);
            println!("  cloud -> DDP set threshold = {v}");
            let _ = cloud.set_kv(DEVICE_ID, "threshold", v);
        }
    }
    stopping.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = sensor.disconnect().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    hub.shutdown().await;
    emulator.shutdown().await;
    Ok(())
}
