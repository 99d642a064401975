//! rumqttd alone, configured the way `src/broker.rs` configures the hub's embedded broker (same
//! router limits, same per-connection settings), but listening on the given port and with a
//! static user table: the ceiling the hub's local ingest is compared against in
//! `docs/BENCHMARKS.md`. It acknowledges QoS 1 on receipt and stores nothing on disk.
//!
//! ```text
//! target/release/modehub-bench rumqttd-alone 127.0.0.1:18830 user1:pass1 user2:pass2 ...
//! ```
//! Runs until killed.

use std::collections::HashMap;
use std::net::SocketAddr;

pub fn main(args: Vec<String>) {
    let mut args = args.into_iter();
    let listen: SocketAddr = args
        .next()
        .and_then(|a| a.parse().ok())
        .expect("usage: modehub-bench rumqttd-alone HOST:PORT [USER:PASS ...]");
    let auth: HashMap<String, String> = args
        .filter_map(|a| {
            a.split_once(':')
                .map(|(u, p)| (u.to_string(), p.to_string()))
        })
        .collect();
    let max_connections = auth.len().max(1) * 2 + 8;
    let server = rumqttd::ServerSettings {
        name: "rumqttd-alone".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 5000,
            max_payload_size: 64 * 1024 + 64 * 1024,
            max_inflight_count: 100,
            auth: if auth.is_empty() { None } else { Some(auth) },
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections,
            max_outgoing_packet_count: 200,
            max_segment_size: 1024 * 1024,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("bench".to_string(), server)])),
        ..Default::default()
    };
    let mut broker = rumqttd::Broker::new(config);
    if let Err(e) = broker.start() {
        eprintln!("rumqttd stopped: {e}");
        std::process::exit(1);
    }
}
