//! The local MQTT side: an authenticating front on the public port, and rumqttd behind it.
//!
//! rumqttd 0.20 acknowledges a publish on receipt, has no per-topic ACL for password clients and
//! does not say who published, so sensors never talk to it directly. Each sensor connection is
//! served by a small relay task that parses MQTT with rumqttc's codec and:
//! - authenticates CONNECT against the registry (MODE ID + API key, or name + local password);
//! - takes PUBLISHes to the device's own `/devices/{id}/event` and `/devices/{id}/kv` itself,
//!   hands them to the router, and sends PUBACK only once the outbox has committed them;
//! - lets through only SUBSCRIBE filters inside the device's own `/devices/{id}/` space (others
//!   get a SUBACK failure) and drops a client that publishes outside it;
//! - relays everything else to rumqttd on a loopback port with internal credentials.
//!
//! rumqttd carries what goes down to devices: the hub publishes commands and kv updates through
//! an in-process link. This module must not validate payloads (the router does) or know MODE.

use crate::config::LocalMqttConfig;
use crate::local::{next_conn_id, LocalEvent};
use crate::metrics::{Metrics, RejectReason};
use crate::registry::{DeviceId, Registry, SharedRegistry, TopicKind};
use crate::router::Router;
use bytes::Bytes;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, SinkExt, StreamExt};
use rumqttc::mqttbytes::v4::{
    Codec, ConnAck, Connect, ConnectReturnCode, Login, Packet, PubAck, SubAck, Subscribe,
    SubscribeReasonCode,
};
use rumqttc::mqttbytes::QoS;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::codec::Framed;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen on {addr} for local MQTT: {source}. Is another broker (mosquitto?) using the port? Change [local.mqtt] listen or stop it.")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the embedded MQTT broker did not start: {0}")]
    Embedded(String),
}

/// The running local broker.
pub struct LocalBroker {
    addr: SocketAddr,
    link: Arc<Mutex<rumqttd::local::LinkTx>>,
}

/// Slack above the payload limit for a local packet: payloads up to this much over the limit are
/// read, refused and counted by the router (the device stays connected); larger packets cannot
/// be skipped in an MQTT stream, so the device is disconnected (also counted).
const PACKET_OVERHEAD: usize = 64 * 1024;
/// Most PUBACKs one connection may have waiting for a commit before we stop reading it.
const MAX_PENDING_ACKS: usize = 256;

struct Front {
    registry: Arc<SharedRegistry>,
    router: Router,
    metrics: Arc<Metrics>,
    internal: SocketAddr,
    internal_login: Login,
    max_packet: usize,
    events: mpsc::Sender<LocalEvent>,
    conn_seq: AtomicU64,
}

fn free_loopback_port() -> std::io::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    l.local_addr()
}

fn random_token() -> String {
    (0..32)
        .map(|_| fastrand::alphanumeric())
        .collect::<String>()
}

/// Starts rumqttd on a loopback port and returns a link for publishing to devices.
fn start_rumqttd(
    max_connections: usize,
    max_packet: usize,
    user: &str,
    pass: &str,
) -> Result<(SocketAddr, rumqttd::local::LinkTx), BrokerError> {
    let internal = free_loopback_port().map_err(|e| BrokerError::Embedded(e.to_string()))?;
    let mut auth = HashMap::new();
    auth.insert(user.to_string(), pass.to_string());
    let server = rumqttd::ServerSettings {
        name: "modehub-internal".into(),
        listen: internal,
        tls: None,
        next_connection_delay_ms: 0,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 5000,
            max_payload_size: max_packet,
            max_inflight_count: 100,
            auth: Some(auth),
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: max_connections + 8,
            max_outgoing_packet_count: 200,
            max_segment_size: 1024 * 1024,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("internal".to_string(), server)])),
        ..Default::default()
    };
    let mut broker = rumqttd::Broker::new(config);
    let (link_tx, mut link_rx) = broker
        .link("modehub-downlink")
        .map_err(|e| BrokerError::Embedded(e.to_string()))?;
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })
        .map_err(|e| BrokerError::Embedded(e.to_string()))?;
    // The link receives nothing we need (we subscribe to nothing), but must be drained.
    tokio::spawn(async move { while let Ok(Some(_)) = link_rx.next().await {} });
    Ok((internal, link_tx))
}

/// Waits until rumqttd answers a CONNECT (a bare TCP probe would make it log an error).
async fn wait_until_listening(addr: SocketAddr, login: &Login) -> Result<(), BrokerError> {
    let codec = Codec {
        max_incoming_size: 4096,
        max_outgoing_size: 4096,
    };
    for _ in 0..200 {
        if let Ok(stream) = TcpStream::connect(addr).await {
            let mut probe = Framed::new(stream, codec.clone());
            let mut connect = Connect::new(format!("probe-{}", random_token()));
            connect.login = Some(login.clone());
            if probe.send(Packet::Connect(connect)).await.is_ok() {
                if let Ok(Some(Ok(Packet::ConnAck(_)))) =
                    tokio::time::timeout(Duration::from_secs(2), probe.next()).await
                {
                    let _ = probe.send(Packet::Disconnect).await;
                    return Ok(());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(BrokerError::Embedded(format!(
        "rumqttd did not answer on {addr} within 2 s"
    )))
}

impl LocalBroker {
    /// Binds the public port, starts rumqttd behind it, and serves until `shutdown` turns true.
    pub async fn start(
        cfg: &LocalMqttConfig,
        max_payload: usize,
        registry: Arc<SharedRegistry>,
        router: Router,
        metrics: Arc<Metrics>,
        events: mpsc::Sender<LocalEvent>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<LocalBroker, BrokerError> {
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| BrokerError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| BrokerError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let max_packet = max_payload + PACKET_OVERHEAD;
        let user = format!("modehub-{}", random_token());
        let pass = random_token();
        let (internal, link) = start_rumqttd(cfg.max_connections, max_packet, &user, &pass)?;
        let internal_login = Login::new(user, pass);
        wait_until_listening(internal, &internal_login).await?;
        let front = Arc::new(Front {
            registry,
            router,
            metrics,
            internal,
            internal_login,
            max_packet,
            events,
            conn_seq: AtomicU64::new(0),
        });
        let limit = Arc::new(Semaphore::new(cfg.max_connections));
        tokio::spawn(accept_loop(listener, front, limit, shutdown));
        tracing::info!(%addr, "local MQTT broker listening");
        Ok(LocalBroker {
            addr,
            link: Arc::new(Mutex::new(link)),
        })
    }

    /// Where sensors connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Publishes `payload` to `/devices/{name}/{sub}` and `/devices/{mode_id}/{sub}` so the
    /// device gets it whichever way it subscribed.
    pub fn deliver(
        &self,
        registry: &Registry,
        dev: DeviceId,
        sub: &str,
        payload: Bytes,
    ) -> Result<(), String> {
        let d = registry.get(dev);
        let mut link = self.link.lock().expect("link lock");
        for who in [&d.name, &d.mode_id_str] {
            link.try_publish(format!("/devices/{who}/{sub}"), payload.clone())
                .map_err(|e| format!("local broker refused the message: {e}"))?;
        }
        Ok(())
    }
}

async fn accept_loop(
    listener: TcpListener,
    front: Arc<Front>,
    limit: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "local accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many local MQTT connections; refusing (raise [local.mqtt] max_connections)");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let front = front.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                r = front.serve(stream, peer) => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "local connection ended");
                    }
                }
                _ = shutdown.changed() => {}
            }
            drop(permit);
        });
    }
}

type AckFuture = Pin<Box<dyn Future<Output = (u16, bool)> + Send>>;

/// Sends the PUBACKs of everything already committed (best effort: the client may be gone).
async fn flush_acks(acks: &mut FuturesOrdered<AckFuture>, client: &mut Framed<TcpStream, Codec>) {
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

impl Front {
    fn codec(&self) -> Codec {
        Codec {
            max_incoming_size: self.max_packet,
            max_outgoing_size: self.max_packet,
        }
    }

    async fn serve(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr) -> Result<(), String> {
        let mut client = Framed::new(stream, self.codec());
        let connect = match tokio::time::timeout(Duration::from_secs(10), client.next()).await {
            Ok(Some(Ok(Packet::Connect(c)))) => c,
            Ok(Some(Ok(_))) => return Err("first packet was not CONNECT".into()),
            Ok(Some(Err(e))) => return Err(format!("bad CONNECT: {e}")),
            Ok(None) => return Err("closed before CONNECT".into()),
            Err(_) => return Err("no CONNECT within 10 s".into()),
        };
        let registry = self.registry.load();
        let Some(dev) = connect
            .login
            .as_ref()
            .and_then(|l| registry.authenticate(&l.username, l.password.as_bytes()))
        else {
            self.metrics.reject(RejectReason::AuthFailed);
            let user = connect
                .login
                .as_ref()
                .map(|l| l.username.as_str())
                .unwrap_or("");
            tracing::warn!(%peer, username = %user, "local MQTT login refused: unknown user or wrong password");
            let _ = client
                .send(Packet::ConnAck(ConnAck::new(
                    ConnectReturnCode::BadUserNamePassword,
                    false,
                )))
                .await;
            return Err("authentication failed".into());
        };
        if let Some(will) = &connect.last_will {
            if !registry.owns_topic(dev, &will.topic) {
                self.metrics.reject(RejectReason::NotOwnTopic);
                let _ = client
                    .send(Packet::ConnAck(ConnAck::new(
                        ConnectReturnCode::NotAuthorized,
                        false,
                    )))
                    .await;
                return Err("will topic outside the device's own topics".into());
            }
        }
        let name = registry.get(dev).name.clone();
        let mut broker = self
            .open_internal(registry.get(dev).mode_id, &connect)
            .await?;
        let ack = match tokio::time::timeout(Duration::from_secs(5), broker.next()).await {
            Ok(Some(Ok(Packet::ConnAck(a)))) => a,
            _ => {
                let _ = client
                    .send(Packet::ConnAck(ConnAck::new(
                        ConnectReturnCode::ServiceUnavailable,
                        false,
                    )))
                    .await;
                return Err("embedded broker did not accept the relay".into());
            }
        };
        client
            .send(Packet::ConnAck(ack))
            .await
            .map_err(|e| e.to_string())?;
        self.metrics.local_connections.fetch_add(1, Relaxed);
        tracing::info!(device = %name, %peer, "local device connected");
        let conn = next_conn_id();
        let _ = self.events.send(LocalEvent::Connected(dev, conn)).await;
        let r = self
            .relay(dev, conn, registry, &mut client, &mut broker)
            .await;
        tracing::info!(device = %name, %peer, reason = %r.as_ref().err().map(String::as_str).unwrap_or("disconnect"), "local device disconnected");
        let _ = self.events.send(LocalEvent::Disconnected(dev, conn)).await;
        r
    }

    async fn open_internal(
        &self,
        mode_id: u64,
        connect: &Connect,
    ) -> Result<Framed<TcpStream, Codec>, String> {
        let stream = TcpStream::connect(self.internal)
            .await
            .map_err(|e| format!("embedded broker unreachable: {e}"))?;
        let _ = stream.set_nodelay(true);
        let mut broker = Framed::new(stream, self.codec());
        let n = self.conn_seq.fetch_add(1, Relaxed);
        let mut inner = Connect::new(format!("{mode_id}-{n}"));
        inner.keep_alive = connect.keep_alive;
        inner.clean_session = true;
        inner.last_will = connect.last_will.clone();
        inner.login = Some(self.internal_login.clone());
        broker
            .send(Packet::Connect(inner))
            .await
            .map_err(|e| e.to_string())?;
        Ok(broker)
    }

    /// Relays one authenticated connection until it ends. `registry` is the table it logged in
    /// under; a reload that removes or changes the device closes the connection (after the
    /// PUBACKs of what was committed), so it logs in again under the new settings or not at all.
    async fn relay(
        &self,
        dev: DeviceId,
        conn: u64,
        mut registry: Arc<Registry>,
        client: &mut Framed<TcpStream, Codec>,
        broker: &mut Framed<TcpStream, Codec>,
    ) -> Result<(), String> {
        let mut reloads = self.registry.changed();
        reloads.mark_unchanged();
        if !self.registry.load().is_live(dev) {
            return Err("device removed or changed by a config reload".into());
        }
        let mut acks: FuturesOrdered<AckFuture> = FuturesOrdered::new();
        // SUBSCRIBE packet id -> per filter: Some(kind) if relayed, None if refused here.
        let mut pending_subs: HashMap<u16, Vec<Option<TopicKind>>> = HashMap::new();
        loop {
            tokio::select! {
                pkt = client.next(), if acks.len() < MAX_PENDING_ACKS => {
                    let pkt = match pkt {
                        None => {
                            flush_acks(&mut acks, client).await;
                            return Ok(());
                        }
                        Some(Err(e)) => {
                            if matches!(e, rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(_)) {
                                self.metrics.reject(RejectReason::TooLarge);
                                tracing::warn!(device = %registry.get(dev).name, "device sent an MQTT packet far over hub.max_payload_bytes; disconnecting it");
                            }
                            // What was committed before the bad packet still gets its PUBACK.
                            flush_acks(&mut acks, client).await;
                            return Err(format!("bad packet from device: {e}"));
                        }
                        Some(Ok(p)) => p,
                    };
                    match pkt {
                        Packet::Publish(p) => self.publish(&registry, dev, p, &mut acks, broker).await?,
                        Packet::Subscribe(s) => self.subscribe(&registry, dev, s, &mut pending_subs, client, broker).await?,
                        Packet::Disconnect => {
                            // Let queued commits finish so their PUBACKs are not lost.
                            flush_acks(&mut acks, client).await;
                            let _ = broker.send(Packet::Disconnect).await;
                            return Ok(());
                        }
                        Packet::Connect(_) => return Err("second CONNECT".into()),
                        other => broker.send(other).await.map_err(|e| e.to_string())?,
                    }
                }
                Some((pkid, ok)) = acks.next(), if !acks.is_empty() => {
                    if !ok {
                        // Not committed: no PUBACK; closing makes the client resend.
                        return Err("outbox could not commit; closing so the device resends".into());
                    }
                    client.feed(Packet::PubAck(PubAck::new(pkid))).await.map_err(|e| e.to_string())?;
                    // Whatever else the same commit made ready goes out in the same write.
                    while let Some(Some((pkid, ok))) = acks.next().now_or_never() {
                        if !ok {
                            let _ = client.flush().await;
                            return Err("outbox could not commit; closing so the device resends".into());
                        }
                        client.feed(Packet::PubAck(PubAck::new(pkid))).await.map_err(|e| e.to_string())?;
                    }
                    client.flush().await.map_err(|e| e.to_string())?;
                }
                Ok(()) = reloads.changed() => {
                    registry = self.registry.load();
                    if !registry.is_live(dev) {
                        flush_acks(&mut acks, client).await;
                        let _ = broker.send(Packet::Disconnect).await;
                        return Err("device removed or changed by a config reload".into());
                    }
                }
                pkt = broker.next() => {
                    let pkt = match pkt {
                        None => return Err("embedded broker closed the relay".into()),
                        Some(Err(e)) => return Err(format!("embedded broker: {e}")),
                        Some(Ok(p)) => p,
                    };
                    let pkt = match pkt {
                        Packet::SubAck(ack) => match pending_subs.remove(&ack.pkid) {
                            Some(mask) => {
                                let merged = self.merge_suback(dev, conn, ack, &mask).await;
                                Packet::SubAck(merged)
                            }
                            None => Packet::SubAck(ack),
                        },
                        other => other,
                    };
                    client.send(pkt).await.map_err(|e| e.to_string())?;
                }
            }
        }
    }

    async fn publish(
        &self,
        registry: &Registry,
        dev: DeviceId,
        p: rumqttc::mqttbytes::v4::Publish,
        acks: &mut FuturesOrdered<AckFuture>,
        broker: &mut Framed<TcpStream, Codec>,
    ) -> Result<(), String> {
        if p.qos == QoS::ExactlyOnce {
            return Err("QoS 2 is not supported (MODE allows QoS 0 and 1)".into());
        }
        if !registry.owns_topic(dev, &p.topic) {
            self.metrics.reject(RejectReason::NotOwnTopic);
            tracing::warn!(device = %registry.get(dev).name, topic = %p.topic, "device published outside its own topics; disconnecting it");
            return Err(format!("publish to {} is not allowed", p.topic));
        }
        let kind = registry
            .parse_topic(&p.topic)
            .map(|(_, _, k)| k)
            .unwrap_or(TopicKind::Other);
        let submitted = match kind {
            TopicKind::Event => self.router.event(dev, &p.payload).await,
            TopicKind::Kv => self.router.kv(dev, &p.payload).await,
            TopicKind::Command | TopicKind::Other => {
                return broker
                    .send(Packet::Publish(p))
                    .await
                    .map_err(|e| e.to_string());
            }
        };
        let pkid = p.pkid;
        let qos1 = p.qos == QoS::AtLeastOnce;
        match submitted {
            Ok(waiter) if qos1 => {
                acks.push_back(Box::pin(async move {
                    (pkid, matches!(waiter.await, Ok(Ok(()))))
                }));
            }
            Ok(_) => {}
            Err(crate::router::Rejected::Storage(e)) => {
                return Err(format!("storage unavailable: {e}"));
            }
            Err(_) if qos1 => {
                // MQTT 3.1.1 cannot refuse a single publish; the bad message is counted and
                // dropped (the router logged why) and acknowledged so the device moves on.
                // The PUBACK goes through the same ordered queue to keep PUBACK order.
                acks.push_back(Box::pin(async move { (pkid, true) }));
            }
            Err(_) => {}
        }
        Ok(())
    }

    async fn subscribe(
        &self,
        registry: &Registry,
        dev: DeviceId,
        s: Subscribe,
        pending: &mut HashMap<u16, Vec<Option<TopicKind>>>,
        client: &mut Framed<TcpStream, Codec>,
        broker: &mut Framed<TcpStream, Codec>,
    ) -> Result<(), String> {
        let mut mask = Vec::with_capacity(s.filters.len());
        let mut allowed = Vec::new();
        for f in &s.filters {
            if registry.owns_topic(dev, &f.path) {
                let kind = registry
                    .parse_topic(&f.path)
                    .map(|(_, _, k)| k)
                    .unwrap_or(TopicKind::Other);
                mask.push(Some(kind));
                allowed.push(f.clone());
            } else {
                self.metrics.reject(RejectReason::NotOwnTopic);
                tracing::warn!(device = %registry.get(dev).name, filter = %f.path, "refused a subscription outside the device's own topics");
                mask.push(None);
            }
        }
        if allowed.is_empty() {
            let codes = vec![SubscribeReasonCode::Failure; mask.len()];
            return client
                .send(Packet::SubAck(SubAck::new(s.pkid, codes)))
                .await
                .map_err(|e| e.to_string());
        }
        pending.insert(s.pkid, mask);
        let mut inner = s;
        inner.filters = allowed;
        broker
            .send(Packet::Subscribe(inner))
            .await
            .map_err(|e| e.to_string())
    }

    /// Puts the refusals back in place among rumqttd's answers and reports active subscriptions.
    async fn merge_suback(
        &self,
        dev: DeviceId,
        conn: u64,
        ack: SubAck,
        mask: &[Option<TopicKind>],
    ) -> SubAck {
        let mut inner = ack.return_codes.into_iter();
        let mut codes = Vec::with_capacity(mask.len());
        for m in mask {
            match m {
                None => codes.push(SubscribeReasonCode::Failure),
                Some(kind) => {
                    let code = inner.next().unwrap_or(SubscribeReasonCode::Failure);
                    if !matches!(code, SubscribeReasonCode::Failure)
                        && matches!(kind, TopicKind::Command | TopicKind::Kv)
                    {
                        let _ = self
                            .events
                            .send(LocalEvent::Subscribed(dev, conn, *kind))
                            .await;
                    }
                    codes.push(code);
                }
            }
        }
        SubAck::new(ack.pkid, codes)
    }
}
