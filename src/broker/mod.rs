//! The local MQTT side: an authenticating front on the public port, and rumqttd behind it.
//!
//! rumqttd 0.20 acknowledges a publish on receipt, has no per-topic ACL for password clients and
//! does not say who published, so sensors never talk to it directly. Each sensor connection is
//! served by a small relay task ([`relay`]) that parses MQTT with rumqttc's codec and:
//! - authenticates CONNECT against the registry (MODE ID + API key, or name + local password);
//! - takes PUBLISHes to the device's own `/devices/{id}/event` and `/devices/{id}/kv` itself,
//!   hands them to the router, and sends PUBACK only once the outbox has committed them;
//!   any other publish is acknowledged and dropped (counted, logged), never relayed;
//! - lets through only SUBSCRIBE filters for the device's own command and kv topics (others
//!   get a SUBACK failure);
//! - owns the keepalive, the Will and the connection slots ([`guard`]);
//! - relays the rest (subscriptions, acks of downstream messages) to rumqttd on a loopback port
//!   with internal credentials.
//!
//! rumqttd carries what goes down to devices: the hub publishes commands and kv updates through
//! an in-process link. This module must not validate payloads (the router does) or know MODE.

mod acks;
mod codec;
mod guard;
mod relay;

pub use guard::FrontLimits;

use crate::config::LocalMqttConfig;
use crate::local::LocalEvent;
use crate::metrics::Metrics;
use crate::registry::{DeviceId, Registry, SharedRegistry};
use crate::router::Router;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use guard::{Admission, InnerIds, LogLimiter, LoginThrottle, Slots};
use rumqttc::mqttbytes::v4::{Codec, Connect, Login, Packet};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen on {addr} for local MQTT: {source}. Is another broker (mosquitto?) using the port? Change [local.mqtt] listen or stop it.")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the embedded MQTT broker did not start: {0}")]
    Embedded(String),
    #[error("cannot use {path} for local MQTT TLS: {reason}. Check [local.mqtt] tls_cert_file / tls_key_file (PEM files readable by the hub).")]
    Tls { path: PathBuf, reason: String },
}

/// Certificate chain and key (PEM) for TLS on the local listener.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// The running local broker.
pub struct LocalBroker {
    addr: SocketAddr,
    link: Arc<Mutex<rumqttd::local::LinkTx>>,
    front: Arc<Front>,
}

/// Slack above the payload limit for a local packet: payloads up to this much over the limit are
/// read, refused and counted by the router (the device stays connected); larger packets cannot
/// be skipped in an MQTT stream, so the device is disconnected (also counted).
const PACKET_OVERHEAD: usize = 64 * 1024;

/// A logged-in connection, for takeover by a new one with the same device and client id.
struct Session {
    seq: u64,
    take_over: oneshot::Sender<()>,
}

struct Front {
    registry: Arc<SharedRegistry>,
    router: Router,
    metrics: Arc<Metrics>,
    limits: FrontLimits,
    internal: SocketAddr,
    internal_login: Login,
    max_packet: usize,
    events: mpsc::Sender<LocalEvent>,
    slots: Arc<Slots>,
    throttle: LoginThrottle,
    inner_ids: InnerIds,
    sessions: Mutex<HashMap<(DeviceId, String), Session>>,
    session_seq: std::sync::atomic::AtomicU64,
    tls: Option<tokio_rustls::TlsAcceptor>,
    log_full: LogLimiter,
    log_evicted: LogLimiter,
    log_auth: LogLimiter,
    log_denied: LogLimiter,
    log_prelogin: LogLimiter,
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
            // What rumqttd keeps per subscribed filter (only what the hub sends down: devices
            // cannot publish into it): at most 2 segments of 256 KiB, each over by at most one
            // message. A device may hold at most 8 filters (see `relay::allowed_filter`).
            max_segment_size: 256 * 1024,
            max_segment_count: 2,
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
            // Always the same id: rumqttd keeps a record per client id it has seen.
            let mut connect = Connect::new("modehub-probe");
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

/// The TLS acceptor for `files`, or why the files cannot serve.
pub fn tls_acceptor(files: &TlsFiles) -> Result<tokio_rustls::TlsAcceptor, BrokerError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let err = |path: &Path, reason: String| BrokerError::Tls {
        path: path.to_path_buf(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert_file)
        .map_err(|e| err(&files.cert_file, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(&files.cert_file, e.to_string()))?;
    if certs.is_empty() {
        return Err(err(
            &files.cert_file,
            "no CERTIFICATE block in the file".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key_file)
        .map_err(|e| err(&files.key_file, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(&files.cert_file, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            err(
                &files.key_file,
                format!("certificate and key do not go together: {e}"),
            )
        })?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

impl LocalBroker {
    /// Binds the public port, starts rumqttd behind it, and serves until `shutdown` is cancelled.
    /// The accept loop and every connection's task run on `tracker`, so the hub's stop waits
    /// for them.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        cfg: &LocalMqttConfig,
        max_payload: usize,
        registry: Arc<SharedRegistry>,
        router: Router,
        metrics: Arc<Metrics>,
        events: mpsc::Sender<LocalEvent>,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<LocalBroker, BrokerError> {
        let limits = FrontLimits {
            max_connections: cfg.max_connections,
            ..FrontLimits::default()
        };
        let tls = match (&cfg.tls_cert_file, &cfg.tls_key_file) {
            (Some(cert_file), Some(key_file)) => Some(TlsFiles {
                cert_file: cert_file.clone(),
                key_file: key_file.clone(),
            }),
            _ => None,
        };
        LocalBroker::start_with(
            cfg.listen,
            limits,
            tls,
            max_payload,
            registry,
            router,
            metrics,
            events,
            shutdown,
            tracker,
        )
        .await
    }

    /// [`LocalBroker::start`] with every limit and TLS given.
    #[allow(clippy::too_many_arguments)]
    pub async fn start_with(
        listen: SocketAddr,
        limits: FrontLimits,
        tls: Option<TlsFiles>,
        max_payload: usize,
        registry: Arc<SharedRegistry>,
        router: Router,
        metrics: Arc<Metrics>,
        events: mpsc::Sender<LocalEvent>,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<LocalBroker, BrokerError> {
        let tls = tls.as_ref().map(tls_acceptor).transpose()?;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| BrokerError::Bind {
                addr: listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| BrokerError::Bind {
            addr: listen,
            source,
        })?;
        let max_packet = max_payload + PACKET_OVERHEAD;
        let user = format!("modehub-{}", random_token());
        let pass = random_token();
        let (internal, link) = start_rumqttd(limits.max_connections, max_packet, &user, &pass)?;
        let internal_login = Login::new(user, pass);
        wait_until_listening(internal, &internal_login).await?;
        let period = Duration::from_secs(10);
        let front = Arc::new(Front {
            registry,
            router,
            metrics,
            slots: Arc::new(Slots::new(&limits)),
            throttle: LoginThrottle::new(&limits),
            limits,
            internal,
            internal_login,
            max_packet,
            events,
            inner_ids: InnerIds::default(),
            sessions: Mutex::new(HashMap::new()),
            session_seq: Default::default(),
            tls,
            log_full: LogLimiter::new(5, period),
            log_evicted: LogLimiter::new(5, period),
            log_auth: LogLimiter::new(10, period),
            log_denied: LogLimiter::new(10, period),
            log_prelogin: LogLimiter::new(5, period),
        });
        let tls_on = front.tls.is_some();
        tracker.spawn(accept_loop(
            listener,
            front.clone(),
            shutdown,
            tracker.clone(),
        ));
        tracing::info!(%addr, tls = tls_on, "local MQTT broker listening");
        Ok(LocalBroker {
            addr,
            link: Arc::new(Mutex::new(link)),
            front,
        })
    }

    /// Where sensors connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sizes of the front's tables, to check that they stay bounded.
    pub fn table_sizes(&self) -> TableSizes {
        let (pending, authenticated) = self.front.slots.counts();
        TableSizes {
            pending,
            authenticated,
            sessions: self.front.sessions.lock().expect("sessions lock").len(),
            inner_ids: self.front.inner_ids.minted(),
            login_peers: self.front.throttle.peers_tracked(),
        }
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

/// How big the front's tables are (see [`LocalBroker::table_sizes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableSizes {
    /// Connections that have not logged in yet.
    pub pending: usize,
    pub authenticated: usize,
    /// Logged-in (device, client id) pairs.
    pub sessions: usize,
    /// Internal client ids ever used towards rumqttd.
    pub inner_ids: u64,
    /// Peers with recent failed logins.
    pub login_peers: usize,
}

async fn accept_loop(
    listener: TcpListener,
    front: Arc<Front>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let log_accept = LogLimiter::new(5, Duration::from_secs(10));
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    if let Some(held) = log_accept.allow() {
                        tracing::warn!(error = %e, held_back = held, "local accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let (slot, kicked) = match front.slots.admit(peer.ip(), &front.metrics.front) {
            Ok(x) => x,
            Err(Admission::Full) => {
                front.metrics.front.refused_full.fetch_add(1, Relaxed);
                if let Some(held) = front.log_full.allow() {
                    tracing::warn!(%peer, held_back = held, "every local MQTT slot holds a logged-in device; refusing a connection (raise [local.mqtt] max_connections)");
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let front = front.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            tokio::select! {
                r = front.serve(stream, peer, slot, kicked) => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %guard::clean(&e, 300), "local connection ended");
                    }
                }
                _ = shutdown.cancelled() => {}
            }
        });
        // Let the new connection read its CONNECT and log in before the next accept: a burst
        // of connections from one host (a gateway, a restart of many sensors behind one
        // address) would otherwise all be pending at once, and the oldest beyond
        // `max_unauthenticated_per_peer` evicted before they had a chance.
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests;
