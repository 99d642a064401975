//! One device's MQTT session with MODE (rumqttc): log in as the device, publish at QoS 1,
//! report which outbox rows MODE acknowledged, and hand over what MODE sends down.
//!
//! MODE wants MQTT 3.1.1, an empty client ID, a clean session, username = device ID and
//! password = device API key; devices publish at QoS 0/1 and subscribe at QoS 0 only. A session
//! object lives for exactly one network connection: when it ends, the caller drops it and makes a
//! new one, so nothing queued inside rumqttc is ever replayed behind the outbox's back. This
//! module must not decide *what* to send or when to retry: that is the uplink's job.

use super::{ConnectError, SessionConfig, SessionEvent};
use crate::config::Secret;

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Outgoing,
    Packet, QoS, TlsConfiguration, Transport,
};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub struct Session {
    client: AsyncClient,
    eventloop: EventLoop,
    /// Rows handed to rumqttc, not yet given a packet id (rumqttc sends in order).
    unsent: VecDeque<i64>,
    /// Packet id -> outbox row, for publishes awaiting PUBACK.
    by_pkid: HashMap<u16, i64>,
}

fn refused(code: ConnectReturnCode) -> ConnectError {
    ConnectError::Refused {
        auth: matches!(
            code,
            ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized
        ),
        detail: format!("{code:?}"),
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

fn tls_config() -> Result<Arc<rumqttc::tokio_rustls::rustls::ClientConfig>, String> {
    static TLS: OnceLock<Result<Arc<rumqttc::tokio_rustls::rustls::ClientConfig>, String>> =
        OnceLock::new();
    TLS.get_or_init(|| {
        use rumqttc::tokio_rustls::rustls;
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            return Err(
                "no CA certificates found for TLS to MODE: install the `ca-certificates` package"
                    .into(),
            );
        }
        Ok(Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        ))
    })
    .clone()
}

impl Session {
    /// Connects as device `mode_id`, waits for CONNACK and subscribes to its command and kv
    /// topics at QoS 0.
    pub async fn connect(
        cfg: &SessionConfig,
        mode_id: u64,
        key: &Secret,
    ) -> Result<Session, ConnectError> {
        let mut opts = MqttOptions::new("", cfg.mqtt.host.clone(), cfg.mqtt.port);
        opts.set_credentials(mode_id.to_string(), key.expose())
            .set_clean_session(true)
            .set_keep_alive(cfg.keepalive)
            .set_inflight(cfg.inflight.clamp(1, u16::MAX as usize) as u16)
            .set_max_packet_size(cfg.max_packet, cfg.max_packet)
            .set_request_channel_capacity(cfg.inflight + 8);
        if cfg.mqtt.tls {
            let tls = tls_config().map_err(ConnectError::Transport)?;
            opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        }
        let (client, mut eventloop) = AsyncClient::new(opts, cfg.inflight + 8);
        // rumqttc reserves room for 100 buffered events (144 B each, 14 KiB) per session; an
        // idle device needs a handful. Let it grow on demand instead: with 1,000 configured
        // devices that is 14 MB less (issue 12; docs/BENCHMARKS.md).
        eventloop.state.events = VecDeque::new();
        let mut net = eventloop.network_options();
        net.set_connection_timeout(CONNECT_TIMEOUT.as_secs());
        eventloop.set_network_options(net);
        loop {
            match tokio::time::timeout(CONNECT_TIMEOUT, eventloop.poll()).await {
                Err(_) => return Err(ConnectError::Timeout(CONNECT_TIMEOUT)),
                Ok(Err(ConnectionError::ConnectionRefused(code))) => return Err(refused(code)),
                Ok(Err(e)) => return Err(ConnectError::Transport(e.to_string())),
                Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                    if ack.code != ConnectReturnCode::Success {
                        return Err(refused(ack.code));
                    }
                    break;
                }
                Ok(Ok(_)) => {}
            }
        }
        for topic in [super::command_topic(mode_id), super::kv_topic(mode_id)] {
            client
                .try_subscribe(topic, QoS::AtMostOnce)
                .map_err(|e| ConnectError::Transport(e.to_string()))?;
        }
        Ok(Session {
            client,
            eventloop,
            unsent: VecDeque::new(),
            by_pkid: HashMap::new(),
        })
    }

    /// Number of publishes not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.unsent.len() + self.by_pkid.len()
    }

    /// Queues a QoS 1 publish of outbox row `row_id`. Never blocks: the caller keeps the window
    /// below `SessionConfig::inflight`.
    pub fn publish(&mut self, row_id: i64, topic: String, payload: Vec<u8>) -> Result<(), String> {
        self.client
            .try_publish(topic, QoS::AtLeastOnce, false, payload)
            .map_err(|e| format!("cannot queue publish: {e}"))?;
        self.unsent.push_back(row_id);
        Ok(())
    }

    /// Drives the connection until something the caller cares about happens.
    pub async fn next(&mut self) -> SessionEvent {
        loop {
            match self.eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if let Some(row) = self.unsent.pop_front() {
                        self.by_pkid.insert(pkid, row);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some(row) = self.by_pkid.remove(&ack.pkid) {
                        return SessionEvent::Acked(row);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if p.topic.ends_with("/command") {
                        return SessionEvent::Command(p.payload);
                    } else if p.topic.ends_with("/kv") {
                        return SessionEvent::Kv(p.payload);
                    }
                    tracing::debug!(topic = %p.topic, "ignoring unexpected publish from MODE");
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    {
                        tracing::warn!("MODE refused a subscription; commands or kv updates for this device will not arrive");
                    }
                }
                Ok(_) => {}
                Err(e) => return SessionEvent::Closed(e.to_string()),
            }
        }
    }

    /// Says goodbye politely (best effort, bounded).
    pub async fn close(mut self) {
        let _ = self.client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while self.eventloop.poll().await.is_ok() {}
        })
        .await;
    }
}
