//! One device's MQTT session with MODE (rumqttc): log in as the device, publish at QoS 1,
//! report which outbox rows MODE acknowledged, and hand over what MODE sends down.
//!
//! MODE wants MQTT 3.1.1, an empty client ID, a clean session, username = device ID and
//! password = device API key; devices publish at QoS 0/1 and subscribe at QoS 0 only. A session
//! object lives for exactly one network connection: when it ends, the caller drops it and makes a
//! new one, so nothing queued inside rumqttc is ever replayed behind the outbox's back. This
//! module must not decide *what* to send or when to retry: that is the uplink's job.
//!
//! The connection runs over TCP (`mqtt://`), TLS (`mqtts://`) or WebSocket (`ws://`, `wss://`,
//! subprotocol `mqtt`, as MODE serves on `wss://mqtt.tinkermode.com:443`): the same MQTT either
//! way. Kv trouble is the session's to absorb, never a reason to stop events or commands: a
//! refused subscription is retried with backoff (and shown in [`KvHealth`]); a kv reload over
//! the downlink packet limit ends the session once, and the next sessions leave kv off for a
//! while instead of reconnecting into the same reload again.

use super::{ConnectError, KvHealth, SessionConfig, SessionEvent};
use crate::config::Secret;

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Outgoing,
    Packet, QoS, StateError, TlsConfiguration, Transport,
};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::time::Instant;

/// How long kv stays off after a reload over the downlink packet limit.
pub const KV_OFF_AFTER_OVERSIZE: Duration = Duration::from_secs(15 * 60);
/// First wait before subscribing again after MODE refused a subscription; doubles up to
/// [`SUBSCRIBE_RETRY_MAX`].
const SUBSCRIBE_RETRY_FIRST: Duration = Duration::from_secs(5);
const SUBSCRIBE_RETRY_MAX: Duration = Duration::from_secs(600);

/// The two topics a device subscribes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sub {
    Command,
    Kv,
}

/// One subscription's lifecycle on this session.
#[derive(Debug, Default)]
struct SubState {
    /// Granted by MODE.
    granted: bool,
    /// Subscribe (again) at this time.
    retry_at: Option<Instant>,
    /// The wait before the next retry after a refusal.
    backoff: Option<Duration>,
}

pub struct Session {
    client: AsyncClient,
    eventloop: EventLoop,
    mode_id: crate::local::ModeId,
    /// Rows handed to rumqttc, not yet given a packet id (rumqttc sends in order).
    unsent: VecDeque<i64>,
    /// Packet id -> outbox row, for publishes awaiting PUBACK.
    by_pkid: HashMap<u16, i64>,
    /// Subscriptions handed to rumqttc, not yet given a packet id (in order).
    subs_unsent: VecDeque<Sub>,
    /// Packet id -> subscription, awaiting SUBACK.
    subs_by_pkid: HashMap<u16, Sub>,
    command: SubState,
    kv_sub: SubState,
    /// A kv message arrived on this session (so an oversized packet was not the reload).
    kv_seen: bool,
    max_downlink: usize,
    kv: Arc<KvHealth>,
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
        mode_id: crate::local::ModeId,
        key: &Secret,
        kv: Arc<KvHealth>,
    ) -> Result<Session, ConnectError> {
        let host = &cfg.mqtt.host;
        let mut opts = match &cfg.mqtt.ws_path {
            // rumqttc takes the whole URL as the "host" of a WebSocket transport.
            Some(path) => {
                let h = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.clone()
                };
                let scheme = if cfg.mqtt.tls { "wss" } else { "ws" };
                let url = format!("{scheme}://{h}:{}{path}", cfg.mqtt.port);
                MqttOptions::new("", url, cfg.mqtt.port)
            }
            None => MqttOptions::new("", host.clone(), cfg.mqtt.port),
        };
        opts.set_credentials(mode_id.to_string(), key.expose())
            .set_clean_session(true)
            .set_keep_alive(cfg.keepalive)
            .set_inflight(cfg.inflight.clamp(1, u16::MAX as usize) as u16)
            .set_max_packet_size(cfg.max_downlink_packet.max(cfg.max_packet), cfg.max_packet)
            .set_request_channel_capacity(cfg.inflight + 8);
        match (cfg.mqtt.ws_path.is_some(), cfg.mqtt.tls) {
            (false, false) => {}
            (false, true) => {
                let tls = tls_config().map_err(ConnectError::Transport)?;
                opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
            }
            (true, false) => {
                opts.set_transport(Transport::Ws);
            }
            (true, true) => {
                let tls = tls_config().map_err(ConnectError::Transport)?;
                opts.set_transport(Transport::wss_with_config(TlsConfiguration::Rustls(tls)));
            }
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
        let mut s = Session {
            client,
            eventloop,
            mode_id,
            unsent: VecDeque::new(),
            by_pkid: HashMap::new(),
            subs_unsent: VecDeque::new(),
            subs_by_pkid: HashMap::new(),
            command: SubState::default(),
            kv_sub: SubState::default(),
            kv_seen: false,
            max_downlink: cfg.max_downlink_packet.max(cfg.max_packet),
            kv,
        };
        s.subscribe(Sub::Command)
            .map_err(|e| ConnectError::Transport(e.to_string()))?;
        match s.kv.skip_until() {
            // The last reload did not fit: kv stays off until then (the session goes on).
            Some(t) => s.kv_sub.retry_at = Some(t),
            None => s
                .subscribe(Sub::Kv)
                .map_err(|e| ConnectError::Transport(e.to_string()))?,
        }
        Ok(s)
    }

    fn subscribe(&mut self, sub: Sub) -> Result<(), rumqttc::ClientError> {
        let topic = match sub {
            Sub::Command => super::command_topic(self.mode_id),
            Sub::Kv => super::kv_topic(self.mode_id),
        };
        self.client.try_subscribe(topic, QoS::AtMostOnce)?;
        self.subs_unsent.push_back(sub);
        Ok(())
    }

    fn sub_state(&mut self, sub: Sub) -> &mut SubState {
        match sub {
            Sub::Command => &mut self.command,
            Sub::Kv => &mut self.kv_sub,
        }
    }

    /// MODE answered a SUBSCRIBE: note it, and on a refusal plan the next try.
    fn suback(&mut self, sub: Sub, ok: bool) {
        let mode_id = self.mode_id;
        let st = self.sub_state(sub);
        if ok {
            st.granted = true;
            st.backoff = None;
            return;
        }
        let wait = st
            .backoff
            .map_or(SUBSCRIBE_RETRY_FIRST, |b| (b * 2).min(SUBSCRIBE_RETRY_MAX));
        st.backoff = Some(wait);
        st.retry_at = Some(Instant::now() + wait);
        match sub {
            Sub::Kv => {
                self.kv.refusals.fetch_add(1, Relaxed);
                self.kv.set_problem(
                    mode_id,
                    format!("MODE refused the kv subscription; retrying every {wait:?} or so"),
                );
            }
            Sub::Command => tracing::warn!(device = mode_id.get(), retry_in = ?wait,
                "MODE refused the command subscription; commands for this device will not arrive until a retry works"),
        }
    }

    /// The kv subscription is asked for (not refused, not skipped) and no kv message came yet.
    pub fn awaits_reload(&self) -> bool {
        !self.kv_seen && self.kv_sub.retry_at.is_none()
    }

    /// The earliest planned re-subscription.
    fn next_retry(&self) -> Option<Instant> {
        match (self.command.retry_at, self.kv_sub.retry_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
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
            let retry = self.next_retry();
            let polled = tokio::select! {
                r = self.eventloop.poll() => r,
                _ = async { tokio::time::sleep_until(retry.expect("guarded")).await }, if retry.is_some() => {
                    let now = Instant::now();
                    for sub in [Sub::Command, Sub::Kv] {
                        if self.sub_state(sub).retry_at.is_some_and(|t| t <= now) {
                            self.sub_state(sub).retry_at = None;
                            if let Err(e) = self.subscribe(sub) {
                                return SessionEvent::Closed(format!("cannot subscribe: {e}"));
                            }
                        }
                    }
                    continue;
                }
            };
            match polled {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if let Some(row) = self.unsent.pop_front() {
                        self.by_pkid.insert(pkid, row);
                    }
                }
                Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => {
                    if let Some(sub) = self.subs_unsent.pop_front() {
                        self.subs_by_pkid.insert(pkid, sub);
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
                        if !self.kv_seen {
                            self.kv_seen = true;
                            self.kv.clear(self.mode_id);
                        }
                        return SessionEvent::Kv(p.payload);
                    }
                    tracing::debug!(topic = %p.topic, "ignoring unexpected publish from MODE");
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if let Some(sub) = self.subs_by_pkid.remove(&ack.pkid) {
                        let ok = !ack
                            .return_codes
                            .iter()
                            .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                        self.suback(sub, ok);
                    }
                }
                Ok(_) => {}
                Err(ConnectionError::MqttState(StateError::Deserialization(
                    rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(size),
                ))) => {
                    let limit = self.max_downlink;
                    // The kv subscription granted, or still waiting for its SUBACK: rumqttc may
                    // fail on the oversized reload that follows the SUBACK in the same read,
                    // before it hands us the SUBACK itself.
                    let kv_asked =
                        self.kv_sub.granted || self.subs_by_pkid.values().any(|s| *s == Sub::Kv);
                    if kv_asked && !self.kv_seen {
                        // The reload (the whole store in one publish) does not fit. Reconnecting
                        // would get the same reload again: leave kv off for a while instead.
                        self.kv.reloads_too_large.fetch_add(1, Relaxed);
                        self.kv.skip_for(KV_OFF_AFTER_OVERSIZE);
                        self.kv.set_problem(self.mode_id, format!(
                            "MODE's kv reload ({size} bytes) is over the downlink packet limit ({limit} bytes, cloud.max_downlink_packet_bytes); kv off for {KV_OFF_AFTER_OVERSIZE:?}"));
                    } else {
                        tracing::warn!(device = self.mode_id.get(), size, limit, "MODE sent a packet over the downlink packet limit; reconnecting without it");
                    }
                    return SessionEvent::Closed(format!(
                        "MODE sent a packet of {size} bytes, over the downlink limit of {limit}"
                    ));
                }
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
