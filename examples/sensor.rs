//! A sensor in Rust: logs in to the hub's local MQTT port as a configured device and publishes
//! one MODE event at QoS 1. The hub's PUBACK means the event is committed to its outbox; it goes
//! to MODE from there (README, "Sensors' MQTT topics"). This example only publishes: it must not
//! be taken for the hub's API, which sensors never link against.
//!
//! ```text
//! cargo run --example sensor -- [HOST:PORT] [DEVICE] [PASSWORD]
//! cargo run --example sensor -- 127.0.0.1:1883 porch-temp change-me
//! ```

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:1883".into());
    let device = args.next().unwrap_or_else(|| "porch-temp".into());
    let password = args.next().unwrap_or_else(|| "change-me".into());
    let (host, port) = addr
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse().ok()?)))
        .ok_or_else(|| anyhow::anyhow!("{addr:?} is not HOST:PORT (e.g. 127.0.0.1:1883)"))?;

    let mut opts = MqttOptions::new(format!("{device}-example"), host, port);
    opts.set_credentials(device.clone(), password)
        .set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 8);
    let event = r#"{"eventType":"temperature","eventData":{"celsius":21.5}}"#;
    client
        .publish(
            format!("/devices/{device}/event"),
            QoS::AtLeastOnce,
            false,
            event,
        )
        .await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                println!("the hub stored the event (PUBACK)");
                let _ = client.disconnect().await;
                return Ok(());
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => anyhow::bail!("cannot talk to the hub at {addr}: {e}"),
            Err(_) => anyhow::bail!("no PUBACK from the hub within 10 s"),
        }
    }
}
