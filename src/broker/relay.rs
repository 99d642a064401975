//! One sensor connection: login, then relay between the sensor and rumqttd.
//!
//! Before login a connection may send one small CONNECT within the pre-login deadline (and may
//! lose its slot to a newer connection); a failed login is answered after the throttle's delay.
//! After login the relay takes event and kv publishes itself (PUBACK once committed), answers
//! or drops everything a device may not do (with an acknowledgement, so no client loops), owns
//! the keepalive and the Will, and passes subscriptions and downstream acks to rumqttd. It must
//! not validate payloads (the router does) nor keep anything per connection once it ends.

use super::acks::Acks;
use super::codec::FrontCodec;
use super::guard::{clean, Slot, LOG_FIELD_MAX};
use super::{Front, Session};
use crate::local::{next_conn_id, LocalEvent};
use crate::metrics::RejectReason;
use crate::registry::{DeviceId, Registry, TopicKind};
use futures_util::{SinkExt, StreamExt};
use rumqttc::mqttbytes::v4::{
    Codec, ConnAck, Connect, ConnectReturnCode, LastWill, Packet, PubAck, PubComp, PubRec, Publish,
    SubAck, Subscribe, SubscribeReasonCode, UnsubAck, Unsubscribe,
};
use rumqttc::mqttbytes::{Error as MqttError, QoS};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::codec::Framed;

/// Most PUBACKs one connection may have waiting for a commit before we stop reading it.
const MAX_PENDING_ACKS: usize = 256;
/// Keepalive the relay announces to rumqttd (the front owns the client's keepalive) and how
/// often it pings rumqttd so that never expires.
const INTERNAL_KEEPALIVE: u16 = 3600;
const INTERNAL_PING: Duration = Duration::from_secs(1200);
/// How long closing the internal connection may take before its id is retired, not reused.
const INTERNAL_CLOSE: Duration = Duration::from_secs(2);

type Client<S> = Framed<S, FrontCodec>;
type Broker = Framed<TcpStream, Codec>;

/// How a logged-in connection ended.
enum Ended {
    /// The client sent DISCONNECT: no Will.
    Disconnect,
    /// Anything else the Will is for (network loss, keepalive, protocol error, takeover).
    Lost(String),
    /// A reload removed or changed the device: no Will (it is not that device any more).
    Reload,
}

/// Sends the PUBACKs of everything already committed (best effort: the client may be gone).
async fn flush_acks<S: AsyncRead + AsyncWrite + Unpin>(acks: &mut Acks, client: &mut Client<S>) {
    while let Some((pkid, ok)) = acks.next().await {
        if !ok {
            return;
        }
        if client
            .send(Packet::PubAck(PubAck::new(pkid)))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// The filters a device may subscribe to, and which downstream kinds each one covers.
fn allowed_filter(
    registry: &Registry,
    dev: DeviceId,
    filter: &str,
) -> Option<&'static [TopicKind]> {
    let d = registry.get(dev);
    let rest = filter.strip_prefix("/devices/")?;
    let (who, sub) = rest.split_once('/')?;
    if who != d.name && who != d.mode_id_str {
        return None;
    }
    match sub {
        "command" => Some(&[TopicKind::Command]),
        "kv" => Some(&[TopicKind::Kv]),
        "#" | "+" => Some(&[TopicKind::Command, TopicKind::Kv]),
        _ => None,
    }
}

impl Front {
    /// Serves one accepted connection (TLS first if configured) until it ends.
    pub(super) async fn serve(
        self: &Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        slot: Slot,
        mut kicked: oneshot::Receiver<()>,
    ) -> Result<(), String> {
        let deadline = Instant::now() + self.limits.connect_timeout;
        let Some(tls) = &self.tls else {
            return self.serve_io(stream, peer, slot, kicked, deadline).await;
        };
        let accepted = tokio::select! {
            r = tokio::time::timeout_at(deadline, tls.accept(stream)) => r,
            _ = &mut kicked => return Err(self.evicted(peer)),
        };
        match accepted {
            Ok(Ok(s)) => self.serve_io(s, peer, slot, kicked, deadline).await,
            Ok(Err(e)) => Err(self.prelogin_refused(peer, &format!("TLS handshake failed: {e}"))),
            Err(_) => {
                self.metrics.front.connect_timeouts.fetch_add(1, Relaxed);
                Err(self.prelogin_refused(peer, "no TLS handshake and CONNECT in time"))
            }
        }
    }

    fn evicted(&self, peer: SocketAddr) -> String {
        if let Some(held) = self.log_evicted.allow() {
            tracing::warn!(%peer, held_back = held, "closed a local MQTT connection that had not logged in, to make room for a new one (too many unauthenticated connections)");
        }
        "evicted before login to make room".into()
    }

    fn prelogin_refused(&self, peer: SocketAddr, why: &str) -> String {
        if let Some(held) = self.log_prelogin.allow() {
            tracing::info!(%peer, held_back = held, reason = %clean(why, LOG_FIELD_MAX), "local MQTT connection closed before login");
        }
        why.to_string()
    }

    async fn serve_io<S>(
        self: &Arc<Self>,
        stream: S,
        peer: SocketAddr,
        mut slot: Slot,
        mut kicked: oneshot::Receiver<()>,
        deadline: Instant,
    ) -> Result<(), String>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let mut client = Framed::new(
            stream,
            FrontCodec::new(self.limits.max_prelogin_packet, self.max_packet),
        );
        let first = tokio::select! {
            r = tokio::time::timeout_at(deadline, client.next()) => r,
            _ = &mut kicked => return Err(self.evicted(peer)),
        };
        let connect = match first {
            Ok(Some(Ok(Packet::Connect(c)))) => c,
            Ok(Some(Ok(_))) => {
                return Err(self.prelogin_refused(peer, "first packet was not CONNECT"))
            }
            Ok(Some(Err(MqttError::InvalidProtocolLevel(_) | MqttError::InvalidProtocol))) => {
                self.metrics.front.bad_protocol.fetch_add(1, Relaxed);
                let _ = client
                    .send(Packet::ConnAck(ConnAck::new(
                        ConnectReturnCode::RefusedProtocolVersion,
                        false,
                    )))
                    .await;
                return Err(self.prelogin_refused(
                    peer,
                    "CONNECT of a protocol other than MQTT 3.1.1 (answered CONNACK 0x01)",
                ));
            }
            Ok(Some(Err(MqttError::PayloadSizeLimitExceeded(n)))) => {
                return Err(self.prelogin_refused(
                    peer,
                    &format!(
                        "a {n}-byte packet before login (limit {} bytes)",
                        self.limits.max_prelogin_packet
                    ),
                ))
            }
            Ok(Some(Err(e))) => {
                return Err(self.prelogin_refused(peer, &format!("bad CONNECT: {e}")))
            }
            Ok(None) => return Err("closed before CONNECT".into()),
            Err(_) => {
                self.metrics.front.connect_timeouts.fetch_add(1, Relaxed);
                return Err(self.prelogin_refused(
                    peer,
                    &format!("no CONNECT within {:?}", self.limits.connect_timeout),
                ));
            }
        };
        let registry = self.registry.load();
        let user = connect
            .login
            .as_ref()
            .map(|l| l.username.as_str())
            .unwrap_or("");
        let dev = connect
            .login
            .as_ref()
            .and_then(|l| registry.authenticate(&l.username, l.password.as_bytes()));
        let Some(dev) = dev else {
            self.metrics.reject(RejectReason::AuthFailed);
            let delay = self.throttle.failed(peer.ip(), std::time::Instant::now());
            if let Some(held) = self.log_auth.allow() {
                // A username that names no device is not logged: it may be a password typed
                // into the wrong field.
                match registry.lookup(user) {
                    Some(d) => {
                        tracing::warn!(%peer, device = %d.name, held_back = held, "local MQTT login refused: wrong password")
                    }
                    None => {
                        tracing::warn!(%peer, username_len = user.len(), held_back = held, "local MQTT login refused: the username is no device's name or MODE ID (not logged)")
                    }
                }
            }
            if !delay.is_zero() {
                self.metrics.front.delayed_logins.fetch_add(1, Relaxed);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = &mut kicked => return Err(self.evicted(peer)),
                }
            }
            let _ = client
                .send(Packet::ConnAck(ConnAck::new(
                    ConnectReturnCode::BadUserNamePassword,
                    false,
                )))
                .await;
            return Err("authentication failed".into());
        };
        let name = registry.get(dev).name.clone();
        if let Some(will) = &connect.last_will {
            let kind = registry.parse_topic(&will.topic).map(|(_, _, k)| k);
            if !registry.owns_topic(dev, &will.topic)
                || !matches!(kind, Some(TopicKind::Event | TopicKind::Kv))
            {
                self.metrics.reject(RejectReason::NotOwnTopic);
                if let Some(held) = self.log_denied.allow() {
                    tracing::warn!(device = %name, topic = %clean(&will.topic, LOG_FIELD_MAX), held_back = held, "refused a login whose Will is not the device's own event or kv topic");
                }
                let _ = client
                    .send(Packet::ConnAck(ConnAck::new(
                        ConnectReturnCode::NotAuthorized,
                        false,
                    )))
                    .await;
                return Err("Will topic is not the device's own event or kv topic".into());
            }
        }
        if !slot.authenticated() {
            return Err(self.evicted(peer));
        }
        client.codec_mut().logged_in(self.max_packet);
        let inner_id = self.inner_ids.take();
        let mut broker = match self.open_internal(inner_id).await {
            Ok(b) => b,
            Err(e) => {
                let _ = client
                    .send(Packet::ConnAck(ConnAck::new(
                        ConnectReturnCode::ServiceUnavailable,
                        false,
                    )))
                    .await;
                return Err(e);
            }
        };
        client
            .send(Packet::ConnAck(ConnAck::new(
                ConnectReturnCode::Success,
                false,
            )))
            .await
            .map_err(|e| e.to_string())?;
        // MQTT 3.1.1 §3.1.4: a new connection with the same client id takes over the old one
        // (same device only; an empty client id never takes over).
        let (take_tx, mut taken) = oneshot::channel();
        let seq = self.session_seq.fetch_add(1, Relaxed);
        let key = (dev, connect.client_id.clone());
        let mut _keep_tx = None;
        if connect.client_id.is_empty() {
            _keep_tx = Some(take_tx);
        } else {
            let old = self.sessions.lock().expect("sessions lock").insert(
                key.clone(),
                Session {
                    seq,
                    take_over: take_tx,
                },
            );
            if let Some(old) = old {
                self.metrics.front.taken_over.fetch_add(1, Relaxed);
                let _ = old.take_over.send(());
            }
        }
        self.metrics.local_connections.fetch_add(1, Relaxed);
        tracing::info!(device = %name, %peer, "local device connected");
        let conn = next_conn_id();
        let _ = self.events.send(LocalEvent::Connected(dev, conn)).await;
        let (ended, broker_open) = self
            .relay(
                dev,
                conn,
                &connect,
                registry,
                &mut client,
                &mut broker,
                &mut taken,
            )
            .await;
        let _ = self.events.send(LocalEvent::Disconnected(dev, conn)).await;
        if !connect.client_id.is_empty() {
            let mut sessions = self.sessions.lock().expect("sessions lock");
            if sessions.get(&key).is_some_and(|s| s.seq == seq) {
                sessions.remove(&key);
            }
        }
        let reason = match &ended {
            Ended::Disconnect => "disconnect".to_string(),
            Ended::Reload => "device removed or changed by a config reload".to_string(),
            Ended::Lost(why) => clean(why, 200),
        };
        tracing::info!(device = %name, %peer, %reason, "local device disconnected");
        if let (Ended::Lost(_), Some(will)) = (&ended, &connect.last_will) {
            self.publish_will(dev, will).await;
        }
        // rumqttd keeps a record per client id; reuse the id only once it let go of it.
        if broker_open && close_internal(&mut broker).await {
            self.inner_ids.give_back(inner_id);
        }
        match ended {
            Ended::Disconnect => Ok(()),
            Ended::Reload => Err(reason),
            Ended::Lost(why) => Err(why),
        }
    }

    /// The Will of a connection lost without DISCONNECT: an event or kv message like any other
    /// (never relayed to rumqttd, so it can neither be retained nor reach a command topic).
    async fn publish_will(&self, dev: DeviceId, will: &LastWill) {
        let registry = self.registry.load();
        if !registry.is_live(dev) {
            return;
        }
        let kind = registry.parse_topic(&will.topic).map(|(_, _, k)| k);
        let _ = match kind {
            Some(TopicKind::Event) => self.router.event(dev, &will.message).await,
            Some(TopicKind::Kv) => self.router.kv(dev, &will.message).await,
            _ => return,
        };
    }

    async fn open_internal(&self, inner_id: u64) -> Result<Broker, String> {
        let stream = TcpStream::connect(self.internal)
            .await
            .map_err(|e| format!("embedded broker unreachable: {e}"))?;
        let _ = stream.set_nodelay(true);
        let mut broker = Framed::new(
            stream,
            Codec {
                max_incoming_size: self.max_packet,
                max_outgoing_size: self.max_packet,
            },
        );
        let mut inner = Connect::new(format!("front-{inner_id}"));
        inner.keep_alive = INTERNAL_KEEPALIVE;
        inner.clean_session = true;
        inner.login = Some(self.internal_login.clone());
        broker
            .send(Packet::Connect(inner))
            .await
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(Duration::from_secs(5), broker.next()).await {
            Ok(Some(Ok(Packet::ConnAck(a)))) if a.code == ConnectReturnCode::Success => Ok(broker),
            _ => Err("embedded broker did not accept the relay".into()),
        }
    }

    /// Relays one logged-in connection until it ends; also says whether the internal
    /// connection is still open. `registry` is the table it logged in under; a reload that
    /// removes or changes the device closes the connection (after the PUBACKs of what was
    /// committed), so it logs in again under the new settings or not at all.
    #[allow(clippy::too_many_arguments)]
    async fn relay<S>(
        &self,
        dev: DeviceId,
        conn: u64,
        connect: &Connect,
        mut registry: Arc<Registry>,
        client: &mut Client<S>,
        broker: &mut Broker,
        taken: &mut oneshot::Receiver<()>,
    ) -> (Ended, bool)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let mut reloads = self.registry.changed();
        reloads.mark_unchanged();
        if !self.registry.load().is_live(dev) {
            return (Ended::Reload, true);
        }
        let mut acks = Acks::default();
        // SUBSCRIBE packet id -> per filter: the kinds it covers if relayed, None if refused.
        let mut pending_subs: std::collections::HashMap<u16, Vec<Option<&'static [TopicKind]>>> =
            Default::default();
        // MQTT 3.1.1 §3.1.2.10: any control packet from the client within 1.5 x keepalive;
        // 0 turns the check off.
        let keepalive = (connect.keep_alive > 0)
            .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
        let mut last_seen = Instant::now();
        let ka_timer = tokio::time::sleep(keepalive.unwrap_or(INTERNAL_PING));
        tokio::pin!(ka_timer);
        let mut ping = tokio::time::interval_at(Instant::now() + INTERNAL_PING, INTERNAL_PING);
        macro_rules! lost {
            ($e:expr) => {
                return (Ended::Lost($e), true)
            };
        }
        loop {
            tokio::select! {
                pkt = client.next(), if acks.len() < MAX_PENDING_ACKS => {
                    let pkt = match pkt {
                        None => {
                            flush_acks(&mut acks, client).await;
                            lost!("connection closed without DISCONNECT".into());
                        }
                        Some(Err(e)) => {
                            if matches!(e, MqttError::PayloadSizeLimitExceeded(_)) {
                                self.metrics.reject(RejectReason::TooLarge);
                                tracing::warn!(device = %registry.get(dev).name, "device sent an MQTT packet far over hub.max_payload_bytes; disconnecting it");
                            }
                            // What was committed before the bad packet still gets its PUBACK.
                            flush_acks(&mut acks, client).await;
                            lost!(format!("bad packet from device: {e}"));
                        }
                        Some(Ok(p)) => p,
                    };
                    last_seen = Instant::now();
                    let r = match pkt {
                        Packet::Publish(p) => self.publish(&registry, dev, p, &mut acks, client).await,
                        Packet::Subscribe(s) => self.subscribe(&registry, dev, s, &mut pending_subs, client, broker).await,
                        Packet::Unsubscribe(u) => self.unsubscribe(&registry, dev, u, client, broker).await,
                        Packet::PingReq => client.send(Packet::PingResp).await.map_err(|e| e.to_string()),
                        // The second half of a QoS 2 publish we dropped (see `publish`).
                        Packet::PubRel(r) => client.send(Packet::PubComp(PubComp::new(r.pkid))).await.map_err(|e| e.to_string()),
                        Packet::Disconnect => {
                            // Let queued commits finish so their PUBACKs are not lost.
                            flush_acks(&mut acks, client).await;
                            return (Ended::Disconnect, true);
                        }
                        Packet::Connect(_) => Err("second CONNECT".into()),
                        other => broker.send(other).await.map_err(|e| e.to_string()),
                    };
                    if let Err(e) = r {
                        lost!(e);
                    }
                }
                Some((pkid, ok)) = acks.next(), if !acks.is_empty() => {
                    if !ok {
                        // Not committed: no PUBACK; closing makes the client resend.
                        lost!("outbox could not commit; closing so the device resends".into());
                    }
                    if let Err(e) = client.feed(Packet::PubAck(PubAck::new(pkid))).await {
                        lost!(e.to_string());
                    }
                    // Whatever else the same commit made ready goes out in the same write.
                    while let Some((pkid, ok)) = acks.next_ready() {
                        if !ok {
                            let _ = client.flush().await;
                            lost!("outbox could not commit; closing so the device resends".into());
                        }
                        if let Err(e) = client.feed(Packet::PubAck(PubAck::new(pkid))).await {
                            lost!(e.to_string());
                        }
                    }
                    if let Err(e) = client.flush().await {
                        lost!(e.to_string());
                    }
                }
                _ = &mut ka_timer, if keepalive.is_some() => {
                    let ka = keepalive.unwrap_or(INTERNAL_PING);
                    let due = last_seen + ka;
                    let now = Instant::now();
                    if now >= due && acks.len() < MAX_PENDING_ACKS {
                        flush_acks(&mut acks, client).await;
                        lost!(format!("no packet from the client within 1.5 x its keepalive ({} s)", connect.keep_alive));
                    }
                    // Not due yet, or we are not reading the client (backpressure).
                    ka_timer.as_mut().reset(if now >= due { now + ka } else { due });
                }
                _ = ping.tick() => {
                    if broker.send(Packet::PingReq).await.is_err() {
                        return (Ended::Lost("embedded broker closed the relay".into()), false);
                    }
                }
                r = &mut *taken => {
                    if r.is_ok() {
                        flush_acks(&mut acks, client).await;
                        lost!("taken over by a new connection with the same client id".into());
                    }
                }
                Ok(()) = reloads.changed() => {
                    registry = self.registry.load();
                    if !registry.is_live(dev) {
                        flush_acks(&mut acks, client).await;
                        return (Ended::Reload, true);
                    }
                }
                pkt = broker.next() => {
                    let pkt = match pkt {
                        None => return (Ended::Lost("embedded broker closed the relay".into()), false),
                        Some(Err(e)) => return (Ended::Lost(format!("embedded broker: {e}")), false),
                        Some(Ok(p)) => p,
                    };
                    let pkt = match pkt {
                        Packet::SubAck(ack) => match pending_subs.remove(&ack.pkid) {
                            Some(mask) => Packet::SubAck(self.merge_suback(dev, conn, ack, &mask).await),
                            None => Packet::SubAck(ack),
                        },
                        // Ours: the front answers the client's pings and unsubscribes itself.
                        Packet::PingResp | Packet::UnsubAck(_) => continue,
                        other => other,
                    };
                    if let Err(e) = client.send(pkt).await {
                        lost!(e.to_string());
                    }
                }
            }
        }
    }

    /// A publish the device may not make: counted, logged (rate-limited) and acknowledged so
    /// that the client moves on (what Mosquitto does for MQTT 3.1.1), never relayed.
    async fn deny<S>(
        &self,
        registry: &Registry,
        dev: DeviceId,
        p: &Publish,
        why: &str,
        acks: &mut Acks,
        client: &mut Client<S>,
    ) -> Result<(), String>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        self.metrics.reject(RejectReason::NotOwnTopic);
        self.metrics.front.denied_publishes.fetch_add(1, Relaxed);
        if let Some(held) = self.log_denied.allow() {
            tracing::warn!(device = %registry.get(dev).name, topic = %clean(&p.topic, LOG_FIELD_MAX), held_back = held, "dropped a publish: {why}");
        }
        let pkid = p.pkid;
        match p.qos {
            QoS::AtMostOnce => Ok(()),
            // Through the ordered queue, to keep PUBACK order.
            QoS::AtLeastOnce => {
                acks.now(pkid);
                Ok(())
            }
            QoS::ExactlyOnce => client
                .send(Packet::PubRec(PubRec::new(pkid)))
                .await
                .map_err(|e| e.to_string()),
        }
    }

    async fn publish<S>(
        &self,
        registry: &Registry,
        dev: DeviceId,
        p: Publish,
        acks: &mut Acks,
        client: &mut Client<S>,
    ) -> Result<(), String>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        if p.qos == QoS::AtLeastOnce && acks.owes(p.pkid) {
            // A retransmission while the first copy waits for its commit (the commit window is
            // up to 2 s at home rates). Storing it again would give the same event a second
            // `_seq`: a duplicate no consumer can tell. The first copy's PUBACK answers both; a
            // second PUBACK could acknowledge a later publish that reuses the id.
            self.metrics.front.retransmits.fetch_add(1, Relaxed);
            tracing::debug!(device = %registry.get(dev).name, pkid = p.pkid, "dropped a retransmitted publish whose PUBACK is still owed");
            return Ok(());
        }
        if p.topic.contains(['+', '#']) {
            return self
                .deny(
                    registry,
                    dev,
                    &p,
                    "wildcard in a PUBLISH topic",
                    acks,
                    client,
                )
                .await;
        }
        if !registry.owns_topic(dev, &p.topic) {
            return self
                .deny(
                    registry,
                    dev,
                    &p,
                    "outside the device's own /devices/{id}/",
                    acks,
                    client,
                )
                .await;
        }
        if p.qos == QoS::ExactlyOnce {
            return self
                .deny(
                    registry,
                    dev,
                    &p,
                    "QoS 2 is not supported (use QoS 0 or 1)",
                    acks,
                    client,
                )
                .await;
        }
        let kind = registry.parse_topic(&p.topic).map(|(_, _, k)| k);
        // The retain flag is ignored: nothing a device publishes is kept for others.
        let submitted = match kind {
            Some(TopicKind::Event) => self.router.event(dev, &p.payload).await,
            Some(TopicKind::Kv) => self.router.kv(dev, &p.payload).await,
            _ => {
                return self
                    .deny(
                        registry,
                        dev,
                        &p,
                        "devices publish only to their event and kv topics",
                        acks,
                        client,
                    )
                    .await
            }
        };
        let pkid = p.pkid;
        let qos1 = p.qos == QoS::AtLeastOnce;
        match submitted {
            Ok(waiter) if qos1 => {
                acks.after_commit(pkid, waiter);
            }
            Ok(_) => {}
            Err(crate::router::Rejected::Storage(e)) => {
                return Err(format!("storage unavailable: {e}"));
            }
            Err(_) if qos1 => {
                // MQTT 3.1.1 cannot refuse a single publish; the bad message is counted and
                // dropped (the router logged why) and acknowledged so the device moves on.
                acks.now(pkid);
            }
            Err(_) => {}
        }
        Ok(())
    }

    async fn subscribe<S>(
        &self,
        registry: &Registry,
        dev: DeviceId,
        s: Subscribe,
        pending: &mut std::collections::HashMap<u16, Vec<Option<&'static [TopicKind]>>>,
        client: &mut Client<S>,
        broker: &mut Broker,
    ) -> Result<(), String>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let mut mask = Vec::with_capacity(s.filters.len());
        let mut allowed = Vec::new();
        for f in &s.filters {
            match allowed_filter(registry, dev, &f.path) {
                Some(kinds) => {
                    mask.push(Some(kinds));
                    allowed.push(f.clone());
                }
                None => {
                    self.metrics.reject(RejectReason::NotOwnTopic);
                    if let Some(held) = self.log_denied.allow() {
                        tracing::warn!(device = %registry.get(dev).name, filter = %clean(&f.path, LOG_FIELD_MAX), held_back = held, "refused a subscription: devices may subscribe to their own command and kv topics only");
                    }
                    mask.push(None);
                }
            }
        }
        if allowed.is_empty() {
            let codes = vec![SubscribeReasonCode::Failure; mask.len()];
            return client
                .send(Packet::SubAck(SubAck::new(s.pkid, codes)))
                .await
                .map_err(|e| e.to_string());
        }
        // At most a few filters per connection, and a client waits for each SUBACK.
        if pending.len() >= 64 {
            return Err("too many SUBSCRIBEs without SUBACK".into());
        }
        pending.insert(s.pkid, mask);
        let mut inner = s;
        inner.filters = allowed;
        broker
            .send(Packet::Subscribe(inner))
            .await
            .map_err(|e| e.to_string())
    }

    /// Answers UNSUBSCRIBE itself (rumqttd only answers for filters it had) and passes on the
    /// filters it could have had.
    async fn unsubscribe<S>(
        &self,
        registry: &Registry,
        dev: DeviceId,
        u: Unsubscribe,
        client: &mut Client<S>,
        broker: &mut Broker,
    ) -> Result<(), String>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let topics: Vec<String> = u
            .topics
            .iter()
            .filter(|t| allowed_filter(registry, dev, t).is_some())
            .cloned()
            .collect();
        if !topics.is_empty() {
            broker
                .send(Packet::Unsubscribe(Unsubscribe {
                    pkid: u.pkid,
                    topics,
                }))
                .await
                .map_err(|e| e.to_string())?;
        }
        client
            .send(Packet::UnsubAck(UnsubAck::new(u.pkid)))
            .await
            .map_err(|e| e.to_string())
    }

    /// Puts the refusals back in place among rumqttd's answers and reports active subscriptions.
    async fn merge_suback(
        &self,
        dev: DeviceId,
        conn: u64,
        ack: SubAck,
        mask: &[Option<&'static [TopicKind]>],
    ) -> SubAck {
        let mut inner = ack.return_codes.into_iter();
        let mut codes = Vec::with_capacity(mask.len());
        for m in mask {
            match m {
                None => codes.push(SubscribeReasonCode::Failure),
                Some(kinds) => {
                    let code = inner.next().unwrap_or(SubscribeReasonCode::Failure);
                    if !matches!(code, SubscribeReasonCode::Failure) {
                        for kind in kinds.iter() {
                            let _ = self
                                .events
                                .send(LocalEvent::Subscribed(dev, conn, *kind))
                                .await;
                        }
                    }
                    codes.push(code);
                }
            }
        }
        SubAck::new(ack.pkid, codes)
    }
}

/// Disconnects from rumqttd and waits until it closed the connection, which it does once its
/// router has forgotten the connection; true if that happened in time.
async fn close_internal(broker: &mut Broker) -> bool {
    if broker.send(Packet::Disconnect).await.is_err() {
        return false;
    }
    let until = Instant::now() + INTERNAL_CLOSE;
    loop {
        match tokio::time::timeout_at(until, broker.next()).await {
            Ok(None) | Ok(Some(Err(_))) => return true,
            Ok(Some(Ok(_))) => continue,
            Err(_) => return false,
        }
    }
}
