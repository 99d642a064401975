//! Device MQTT endpoint of the emulator: an MQTT 3.1.1 server for MODE devices built on
//! rumqttc's `mqttbytes::v4` codec. It authenticates CONNECT (username = device ID, password =
//! device key, clean session, no Will), confines each device to its own `/devices/{id}/event`,
//! `/devices/{id}/kv` and `/devices/{id}/command` topics, turns publishes into state changes
//! and forwards queued pushes (commands, kv sync) as QoS 0 PUBLISHes. It must not parse MQTT by
//! hand, hold the state lock across an `.await`, keep retained messages or sessions, or log
//! passwords.
//!
//! The same session code serves MQTT over WebSocket ([`serve_websocket`], subprotocol `mqtt`,
//! binary frames), as MODE does on `wss://mqtt.tinkermode.com:443`: the frames are bridged onto
//! an in-memory byte stream, so both transports share every rule above.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rumqttc::mqttbytes::v4::{
    Codec, ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode,
    UnsubAck,
};
use rumqttc::mqttbytes::{Error as MqttError, Protocol, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use super::state::{ConnKind, ConnRefusal, EventOutcome, Push};
use super::{DeactivatedHome, KvError, Shared, Transport};

/// A write that cannot complete in this time means a stuck client: the session is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest packet the emulator itself sends (MQTT's maximum remaining length).
const MAX_OUTGOING: usize = 268_435_455;

/// A byte stream carrying MQTT: a TCP connection or a bridged WebSocket.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Conn = Framed<Box<dyn Io>, Codec>;

/// Accepts device connections until `cancel` fires or the listener is taken away.
pub(crate) async fn accept_loop(shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            r = poll_fn(|cx| shared.poll_accept(cx)) => r,
        };
        match accepted {
            Ok(Some((stream, peer))) => {
                let refuse = shared.lock().faults.refuse_connections;
                if refuse {
                    shared.lock().stats.mqtt_connections_refused_fault += 1;
                    drop(stream);
                    continue;
                }
                let _ = stream.set_nodelay(true);
                let s = Arc::clone(&shared);
                tokio::spawn(async move { session(s, Box::new(stream), peer).await });
            }
            Ok(None) => return,
            Err(e) => {
                // e.g. too many open files: back off a little instead of spinning.
                tracing::warn!("emulator MQTT accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn send(framed: &mut Conn, pkt: Packet) -> bool {
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, framed.send(pkt)).await,
        Ok(Ok(()))
    )
}

async fn refuse(shared: &Shared, framed: &mut Conn, code: ConnectReturnCode) {
    shared.lock().stats.mqtt_connects_refused += 1;
    let _ = send(framed, Packet::ConnAck(ConnAck::new(code, false))).await;
}

/// Serves one MQTT-over-WebSocket connection (already upgraded with subprotocol `mqtt`):
/// binary frames in both directions, bridged to the ordinary MQTT session. A text frame or a
/// close ends it; so does the session ending (the WebSocket is then closed).
pub(crate) async fn serve_websocket(
    shared: Arc<Shared>,
    mut socket: axum::extract::ws::WebSocket,
    peer: SocketAddr,
) {
    use axum::extract::ws::Message;
    if shared.lock().faults.refuse_connections {
        shared.lock().stats.mqtt_connections_refused_fault += 1;
        return;
    }
    let (mqtt_side, bridge) = tokio::io::duplex(64 * 1024);
    let s = Arc::clone(&shared);
    let session = tokio::spawn(async move { session(s, Box::new(mqtt_side), peer).await });
    let (mut from_session, mut to_session) = tokio::io::split(bridge);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            n = from_session.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let frame = Message::Binary(bytes::Bytes::copy_from_slice(&buf[..n]));
                    match tokio::time::timeout(WRITE_TIMEOUT, socket.send(frame)).await {
                        Ok(Ok(())) => {}
                        _ => break,
                    }
                }
            },
            inp = socket.recv() => match inp {
                Some(Ok(Message::Binary(b))) => {
                    if to_session.write_all(&b).await.is_err() {
                        break;
                    }
                }
                // Pings are answered by the WebSocket layer.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                _ => break,
            },
        }
    }
    // Dropping our side of the bridge ends the session if it is still running.
    drop((from_session, to_session));
    let _ = session.await;
    let _ = tokio::time::timeout(Duration::from_secs(1), socket.send(Message::Close(None))).await;
}

fn code_from_u8(c: u8) -> Option<ConnectReturnCode> {
    Some(match c {
        1 => ConnectReturnCode::RefusedProtocolVersion,
        2 => ConnectReturnCode::BadClientId,
        3 => ConnectReturnCode::ServiceUnavailable,
        4 => ConnectReturnCode::BadUserNamePassword,
        5 => ConnectReturnCode::NotAuthorized,
        _ => return None,
    })
}

/// One device connection, from CONNECT to close.
async fn session(shared: Arc<Shared>, stream: Box<dyn Io>, peer: SocketAddr) {
    let (max_in, connect_timeout) = {
        let st = shared.lock();
        (st.behaviour.max_packet_size, st.behaviour.connect_timeout)
    };
    let mut framed = Framed::new(
        stream,
        Codec {
            max_incoming_size: max_in,
            max_outgoing_size: MAX_OUTGOING,
        },
    );
    let connect = tokio::select! {
        _ = shared.root().cancelled() => return,
        r = tokio::time::timeout(connect_timeout, framed.next()) => r,
    };
    let connect = match connect {
        Ok(Some(Ok(Packet::Connect(c)))) => c,
        Ok(Some(Err(MqttError::InvalidProtocol | MqttError::InvalidProtocolLevel(_)))) => {
            refuse(
                &shared,
                &mut framed,
                ConnectReturnCode::RefusedProtocolVersion,
            )
            .await;
            return;
        }
        other => {
            tracing::debug!(%peer, "emulator MQTT: no valid CONNECT ({other:?})");
            shared.lock().stats.mqtt_sessions_dropped_protocol += 1;
            return;
        }
    };
    let delay = shared.lock().faults.delay;
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    // Order of checks: protocol, Will, clean session, credentials, injected code, limit.
    if connect.protocol != Protocol::V4 {
        return refuse(
            &shared,
            &mut framed,
            ConnectReturnCode::RefusedProtocolVersion,
        )
        .await;
    }
    if connect.last_will.is_some() {
        return refuse(&shared, &mut framed, ConnectReturnCode::NotAuthorized).await;
    }
    if !connect.clean_session {
        return refuse(&shared, &mut framed, ConnectReturnCode::BadClientId).await;
    }
    let device_id = {
        let st = shared.lock();
        connect
            .login
            .as_ref()
            .and_then(|l| st.check_device_credentials(&l.username, &l.password))
    };
    let Some(device_id) = device_id else {
        tracing::debug!(%peer, "emulator MQTT: bad username or password");
        return refuse(&shared, &mut framed, ConnectReturnCode::BadUserNamePassword).await;
    };
    let injected = shared.lock().faults.connack_code.and_then(code_from_u8);
    if let Some(code) = injected {
        return refuse(&shared, &mut framed, code).await;
    }
    let registered = shared
        .lock()
        .register_conn(device_id, ConnKind::Mqtt, shared.root());
    let mut conn = match registered {
        Ok(c) => c,
        Err(ConnRefusal::TooMany) => {
            tracing::debug!(device = device_id, "emulator MQTT: too many connections");
            let code = shared.lock().behaviour.too_many_connections_connack;
            let code = code_from_u8(code).unwrap_or(ConnectReturnCode::ServiceUnavailable);
            return refuse(&shared, &mut framed, code).await;
        }
        Err(ConnRefusal::BadCredentials) => {
            return refuse(&shared, &mut framed, ConnectReturnCode::BadUserNamePassword).await;
        }
        Err(ConnRefusal::Offline) => return,
    };
    if !send(
        &mut framed,
        Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)),
    )
    .await
    {
        shared.lock().unregister_conn(device_id, conn.conn_id);
        return;
    }
    tracing::debug!(device = device_id, %peer, "emulator MQTT: device connected");

    let mut ctx = Session {
        shared: Arc::clone(&shared),
        device_id,
        conn_id: conn.conn_id,
        event_topic: format!("/devices/{device_id}/event"),
        kv_topic: format!("/devices/{device_id}/kv"),
        command_topic: format!("/devices/{device_id}/command"),
        publishes: 0,
    };
    // Keepalive: a client silent for 1.5 x its keepalive is dropped; 0 disables the check.
    let keepalive = (connect.keep_alive > 0)
        .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
    let far = Duration::from_secs(365 * 24 * 3600);
    let sleep = tokio::time::sleep(keepalive.unwrap_or(far));
    tokio::pin!(sleep);

    let reason: &str = loop {
        tokio::select! {
            biased;
            _ = conn.cancel.cancelled() => break "cut by the emulator",
            _ = &mut sleep, if keepalive.is_some() => {
                shared.lock().stats.mqtt_sessions_dropped_keepalive += 1;
                break "keepalive timeout";
            }
            out = conn.rx.recv() => {
                let Some(push) = out else { break "cut by the emulator" };
                let (topic, payload) = match push {
                    Push::Command(p) => (ctx.command_topic.clone(), p),
                    Push::Kv(p) => (ctx.kv_topic.clone(), p),
                };
                let pkt = Packet::Publish(Publish::from_bytes(topic, QoS::AtMostOnce, payload));
                if !send(&mut framed, pkt).await {
                    break "write failed";
                }
            }
            inp = framed.next() => {
                let pkt = match inp {
                    None => break "closed by the client",
                    Some(Err(e)) => {
                        tracing::debug!(device = device_id, "emulator MQTT: bad packet: {e}");
                        shared.lock().stats.mqtt_sessions_dropped_protocol += 1;
                        break "malformed packet";
                    }
                    Some(Ok(p)) => p,
                };
                if let Some(k) = keepalive {
                    sleep.as_mut().reset(Instant::now() + k);
                }
                // A session cut while this packet was in flight must not act on it.
                if !shared.lock().conn_alive(device_id, ctx.conn_id) {
                    break "cut by the emulator";
                }
                if let Err(why) = ctx.handle(&mut framed, pkt).await {
                    break why;
                }
            }
        }
    };
    shared.lock().unregister_conn(device_id, ctx.conn_id);
    tracing::debug!(device = device_id, %peer, "emulator MQTT: session closed: {reason}");
}

struct Session {
    shared: Arc<Shared>,
    device_id: u64,
    conn_id: u64,
    event_topic: String,
    kv_topic: String,
    command_topic: String,
    publishes: u32,
}

impl Session {
    /// Handles one packet; `Err(reason)` closes the connection.
    async fn handle(&mut self, framed: &mut Conn, pkt: Packet) -> Result<(), &'static str> {
        match pkt {
            Packet::Publish(p) => self.publish(framed, p).await,
            Packet::Subscribe(s) => {
                self.delay().await;
                let mut codes = Vec::with_capacity(s.filters.len());
                {
                    let mut st = self.shared.lock();
                    for f in &s.filters {
                        // Subscriptions are granted at QoS 0 whatever was asked.
                        if f.path == self.command_topic {
                            st.subscribe_command(self.device_id, self.conn_id, true);
                            codes.push(SubscribeReasonCode::Success(QoS::AtMostOnce));
                        } else if f.path == self.kv_topic && st.faults.refuse_kv_subscriptions {
                            st.stats.kv_subscriptions_refused_fault += 1;
                            codes.push(SubscribeReasonCode::Failure);
                        } else if f.path == self.kv_topic {
                            // Queues the reload; it goes out after the SUBACK below.
                            st.subscribe_kv(self.device_id, self.conn_id, true);
                            codes.push(SubscribeReasonCode::Success(QoS::AtMostOnce));
                        } else {
                            codes.push(SubscribeReasonCode::Failure);
                        }
                    }
                }
                self.ack(framed, Packet::SubAck(SubAck::new(s.pkid, codes)))
                    .await
            }
            Packet::Unsubscribe(u) => {
                {
                    let mut st = self.shared.lock();
                    for t in &u.topics {
                        if *t == self.command_topic {
                            st.subscribe_command(self.device_id, self.conn_id, false);
                        } else if *t == self.kv_topic {
                            st.subscribe_kv(self.device_id, self.conn_id, false);
                        }
                    }
                }
                self.ack(framed, Packet::UnsubAck(UnsubAck::new(u.pkid)))
                    .await
            }
            Packet::PingReq => self.ack(framed, Packet::PingResp).await,
            Packet::Disconnect => Err("DISCONNECT"),
            // The emulator only sends QoS 0, so a PUBACK from the client is harmless.
            Packet::PubAck(_) => Ok(()),
            other => {
                tracing::debug!(
                    device = self.device_id,
                    "emulator MQTT: unexpected packet {other:?}"
                );
                self.shared.lock().stats.mqtt_sessions_dropped_protocol += 1;
                Err("unexpected packet")
            }
        }
    }

    async fn ack(&self, framed: &mut Conn, pkt: Packet) -> Result<(), &'static str> {
        if send(framed, pkt).await {
            Ok(())
        } else {
            Err("write failed")
        }
    }

    async fn delay(&self) {
        let delay = self.shared.lock().faults.delay;
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
    }

    async fn publish(&mut self, framed: &mut Conn, p: Publish) -> Result<(), &'static str> {
        self.delay().await;
        if p.qos == QoS::ExactlyOnce {
            self.shared.lock().stats.mqtt_sessions_dropped_protocol += 1;
            return Err("QoS 2 is not supported");
        }
        self.publishes = self.publishes.saturating_add(1);
        let (rate_limited, refused, drop_now) = {
            let mut st = self.shared.lock();
            let drop_now = st
                .faults
                .drop_after_publishes
                .is_some_and(|n| n > 0 && self.publishes >= n);
            let mut refused = false;
            let rate_limited = if p.topic == self.event_topic {
                match st.ingest_event(self.device_id, &p.payload, Transport::Mqtt) {
                    EventOutcome::RateLimited(_) => true,
                    // MQTT has no error channel: a refusal closes the session unacked.
                    EventOutcome::RefusedDeactivated => {
                        refused = true;
                        false
                    }
                    // Invalid events and (by default) events of deactivated homes are acked
                    // (counted in stats).
                    EventOutcome::Recorded
                    | EventOutcome::DroppedDeactivated
                    | EventOutcome::Invalid(_) => false,
                }
            } else if p.topic == self.kv_topic {
                let res = match super::state::parse_kv_publish(&p.payload) {
                    Ok(op) => st.kv_write(self.device_id, op, Some(self.conn_id), true),
                    Err(e) => {
                        st.stats.kv_writes_rejected_invalid += 1;
                        Err(KvError::InvalidValue(e))
                    }
                };
                match res {
                    Err(KvError::RateLimited(_)) => true,
                    Err(KvError::HomeDeactivated)
                        if st.behaviour.deactivated_home == DeactivatedHome::Refuse =>
                    {
                        refused = true;
                        false
                    }
                    Ok(_) => false,
                    Err(e) => {
                        tracing::debug!(
                            device = self.device_id,
                            "emulator MQTT: kv write not applied: {e}"
                        );
                        false
                    }
                }
            } else {
                st.stats.mqtt_sessions_dropped_acl += 1;
                tracing::debug!(
                    device = self.device_id,
                    topic = %p.topic,
                    "emulator MQTT: publish to a topic the device does not own"
                );
                return Err("publish to a foreign topic");
            };
            if rate_limited {
                st.stats.mqtt_sessions_dropped_rate_limit += 1;
            } else if refused {
                st.stats.mqtt_sessions_dropped_deactivated += 1;
            } else if drop_now {
                st.stats.mqtt_sessions_dropped_fault += 1;
            }
            (rate_limited, refused, drop_now)
        };
        if rate_limited {
            return Err("rate limit exceeded");
        }
        if refused {
            return Err("home deactivated (refused)");
        }
        if drop_now {
            return Err("drop_after_publishes fault");
        }
        if p.qos == QoS::AtLeastOnce {
            self.ack(framed, Packet::PubAck(PubAck::new(p.pkid)))
                .await?;
        }
        Ok(())
    }
}
