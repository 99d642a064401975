//! One device's MQTT session with MODE (on the lean client in [`super::wire`]): log in as the
//! device, publish at QoS 1, report which outbox rows MODE acknowledged, and hand over what MODE
//! sends down.
//!
//! MODE wants MQTT 3.1.1, an empty client ID, a clean session, username = device ID and
//! password = device API key; devices publish at QoS 0/1 and subscribe at QoS 0 only. A session
//! object lives for exactly one network connection: when it ends, the caller drops it and makes a
//! new one, so nothing queued inside the client is ever replayed behind the outbox's back. This
//! module must not decide *what* to send or when to retry: that is the uplink's job.
//!
//! The connection runs over TCP (`mqtt://`), TLS (`mqtts://`) or WebSocket (`ws://`, `wss://`,
//! subprotocol `mqtt`, as MODE serves on `wss://mqtt.tinkermode.com:443`): the same MQTT either
//! way. Kv trouble is the session's to absorb, never a reason to stop events or commands: a
//! refused subscription is retried with backoff (and shown in [`KvHealth`]); a kv reload over
//! the downlink packet limit ends the session once, and the next sessions leave kv off for a
//! while instead of reconnecting into the same reload again.

use super::wire::{self, Conn, Connect, Event, Limits, Login, Packet, QoS, Subscribe, WireError};
use super::{ConnectError, KvHealth, SessionConfig, SessionEvent};
use crate::config::Secret;

use rumqttc::mqttbytes::v4::{ConnectReturnCode, PubAck, PubComp, PubRec, SubscribeReasonCode};
use std::collections::VecDeque;
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
    /// The SUBSCRIBE's packet id while its SUBACK is awaited.
    awaiting: Option<u16>,
}

pub struct Session {
    conn: Conn,
    mode_id: crate::local::ModeId,
    /// (packet id, outbox row) of publishes awaiting PUBACK, in the order sent (empty, no
    /// allocation, when idle).
    in_flight: VecDeque<(u16, i64)>,
    /// The last packet id handed out.
    last_pkid: u16,
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

fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static TLS: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    TLS.get_or_init(|| {
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
        let tls = if cfg.mqtt.tls {
            Some(tls_config().map_err(ConnectError::Transport)?)
        } else {
            None
        };
        let target = wire::Target {
            host: cfg.mqtt.host.clone(),
            port: cfg.mqtt.port,
            tls,
            ws_path: cfg.mqtt.ws_path.clone(),
        };
        let mut connect = Connect::new("");
        connect.keep_alive = cfg.keepalive.as_secs().min(u16::MAX as u64) as u16;
        connect.clean_session = true;
        connect.login = Some(Login::new(mode_id.to_string(), key.expose()));
        let max_downlink = cfg.max_downlink_packet.max(cfg.max_packet);
        let limits = Limits {
            max_incoming: max_downlink,
            max_outgoing: cfg.max_packet,
            keepalive: cfg.keepalive,
        };
        let (conn, ack) = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            Conn::open(&target, &connect, limits),
        )
        .await
        {
            Err(_) => return Err(ConnectError::Timeout(CONNECT_TIMEOUT)),
            Ok(Err(e)) => return Err(ConnectError::Transport(e.to_string())),
            Ok(Ok(c)) => c,
        };
        if ack.code != ConnectReturnCode::Success {
            return Err(refused(ack.code));
        }
        let mut s = Session {
            conn,
            mode_id,
            in_flight: VecDeque::new(),
            last_pkid: 0,
            command: SubState::default(),
            kv_sub: SubState::default(),
            kv_seen: false,
            max_downlink,
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

    /// A packet id not in use on this session.
    fn pkid(&mut self) -> u16 {
        loop {
            self.last_pkid = self.last_pkid.wrapping_add(1).max(1);
            let id = self.last_pkid;
            let busy = self.in_flight.iter().any(|(p, _)| *p == id)
                || self.command.awaiting == Some(id)
                || self.kv_sub.awaiting == Some(id);
            if !busy {
                return id;
            }
        }
    }

    fn subscribe(&mut self, sub: Sub) -> Result<(), WireError> {
        let topic = match sub {
            Sub::Command => super::command_topic(self.mode_id),
            Sub::Kv => super::kv_topic(self.mode_id),
        };
        let mut packet = Subscribe::new(topic, QoS::AtMostOnce);
        packet.pkid = self.pkid();
        self.conn.send(&Packet::Subscribe(packet.clone()))?;
        self.sub_state(sub).awaiting = Some(packet.pkid);
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
        st.awaiting = None;
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
        self.in_flight.len()
    }

    /// Queues a QoS 1 publish of outbox row `row_id` (written out by [`Session::next`]). Never
    /// blocks: the caller keeps the window below `SessionConfig::inflight`.
    pub fn publish(&mut self, row_id: i64, topic: &str, payload: &[u8]) -> Result<(), String> {
        let pkid = self.pkid();
        self.conn
            .send_publish_qos1(pkid, topic, payload)
            .map_err(|e| format!("cannot send row {row_id}: {e}"))?;
        self.in_flight.push_back((pkid, row_id));
        Ok(())
    }

    /// MODE acknowledged packet `pkid`: the row it carried.
    fn puback(&mut self, pkid: u16) -> Option<i64> {
        let at = self.in_flight.iter().position(|(p, _)| *p == pkid)?;
        let row = self.in_flight.remove(at).map(|(_, row)| row);
        if self.in_flight.is_empty() && self.in_flight.capacity() > 64 {
            // A replay's window: an idle device holds none of it.
            self.in_flight = VecDeque::new();
        }
        row
    }

    /// Drives the connection until something the caller cares about happens. Cancel-safe.
    pub async fn next(&mut self) -> SessionEvent {
        loop {
            let packet = match self.conn.next(self.next_retry()).await {
                Ok(Event::Packet(p)) => p,
                Ok(Event::Deadline) => {
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
                Err(WireError::TooLarge { size, .. }) => return self.oversized(size),
                Err(e) => return SessionEvent::Closed(e.to_string()),
            };
            match packet {
                Packet::PubAck(ack) => {
                    if let Some(row) = self.puback(ack.pkid) {
                        return SessionEvent::Acked(row);
                    }
                }
                Packet::Publish(p) => {
                    // Subscriptions are QoS 0; should MODE deliver at QoS 1 or 2 anyway, answer
                    // as MQTT wants (a repeated QoS 2 delivery may then be passed on twice).
                    let answer = match p.qos {
                        QoS::AtMostOnce => Ok(()),
                        QoS::AtLeastOnce => self.conn.send(&Packet::PubAck(PubAck::new(p.pkid))),
                        QoS::ExactlyOnce => self.conn.send(&Packet::PubRec(PubRec::new(p.pkid))),
                    };
                    if let Err(e) = answer {
                        return SessionEvent::Closed(e.to_string());
                    }
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
                Packet::PubRel(rel) => {
                    if let Err(e) = self.conn.send(&Packet::PubComp(PubComp::new(rel.pkid))) {
                        return SessionEvent::Closed(e.to_string());
                    }
                }
                Packet::SubAck(ack) => {
                    let sub = [Sub::Command, Sub::Kv]
                        .into_iter()
                        .find(|s| self.sub_state(*s).awaiting == Some(ack.pkid));
                    if let Some(sub) = sub {
                        let ok = !ack
                            .return_codes
                            .iter()
                            .any(|c| matches!(c, SubscribeReasonCode::Failure));
                        self.suback(sub, ok);
                    }
                }
                Packet::Disconnect => {
                    return SessionEvent::Closed("MODE closed the connection".into())
                }
                _ => {}
            }
        }
    }

    /// MODE sent a packet over the downlink limit: the session ends; when it was the kv
    /// reload, kv is left off for a while (reconnecting would get the same reload again).
    fn oversized(&mut self, size: usize) -> SessionEvent {
        let limit = self.max_downlink;
        // The kv subscription granted, or still waiting for its SUBACK.
        let kv_asked = self.kv_sub.granted || self.kv_sub.awaiting.is_some();
        if kv_asked && !self.kv_seen {
            // The reload (the whole store in one publish) does not fit.
            self.kv.reloads_too_large.fetch_add(1, Relaxed);
            self.kv.skip_for(KV_OFF_AFTER_OVERSIZE);
            self.kv.set_problem(self.mode_id, format!(
                "MODE's kv reload ({size} bytes) is over the downlink packet limit ({limit} bytes, cloud.max_downlink_packet_bytes); kv off for {KV_OFF_AFTER_OVERSIZE:?}"));
        } else {
            tracing::warn!(
                device = self.mode_id.get(),
                size,
                limit,
                "MODE sent a packet over the downlink packet limit; reconnecting without it"
            );
        }
        SessionEvent::Closed(format!(
            "MODE sent a packet of {size} bytes, over the downlink limit of {limit}"
        ))
    }

    /// Says goodbye politely (best effort, bounded).
    pub async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_millis(500), self.conn.close()).await;
    }
}
