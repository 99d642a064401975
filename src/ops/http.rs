//! The local ops endpoint: `/healthz`, `/metrics`, `/status.json` (axum).
//!
//! It binds where `[ops] listen` says: loopback by default. Elsewhere the config demands
//! `[ops] password_file`, and clients not on this machine must send it (`auth`). It shows
//! device names and MODE ids, never keys. `/` is the homeowner's page (`page`).
//!
//! Whoever can reach it must not be able to starve the hub of file descriptors (which the MQTT
//! accept and the outbox need too): at most [`MAX_CONNECTIONS`] connections are open at once
//! and at most [`MAX_PER_PEER`] from one address (a new one closes the oldest to make room),
//! and every connection is closed [`CONNECTION_LIFETIME`] after it was accepted, whatever it
//! did: headers, body and all (a request here takes milliseconds; a scraper reconnects). It
//! must not serve anything that changes state.

use super::OpsContext;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

/// Most ops connections open at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Most ops connections open at once from one IP address.
pub const MAX_PER_PEER: usize = 8;
/// Every ops connection is closed this long after it was accepted (so this is also the header
/// read timeout).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(10);
/// How often an accept error (e.g. "Too many open files") is logged at most.
const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// Binds `addr` and serves on `tracker` until `shutdown` is cancelled. Returns the bound address.
pub async fn serve(
    ctx: Arc<OpsContext>,
    addr: SocketAddr,
    password: Option<crate::config::Secret>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on [ops] listen = \"{addr}\": {e}. Pick a free port, or set listen = \"off\" to switch the health/metrics endpoint off"
        )
    })?;
    let bound = listener.local_addr()?;
    let listener = Capped::new(listener);
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/status.json", get(status))
        .merge(super::page::routes())
        .with_state(ctx);
    // Off loopback, a password ([ops] password_file; config validation demands one there).
    let app = match password {
        Some(p) => app.layer(axum::middleware::from_fn(move |req, next| {
            super::auth::require_password(p.clone(), req, next)
        })),
        None => app,
    };
    tracker.spawn(async move {
        let app = app.into_make_service_with_connect_info::<super::auth::Peer>();
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "ops endpoint stopped");
        }
    });
    tracing::info!(addr = %bound, "ops endpoint listening (/healthz, /metrics, /status.json)");
    Ok(bound)
}

async fn healthz(State(ctx): State<Arc<OpsContext>>) -> Response {
    let h = ctx.health().await;
    let mut body = if h.healthy {
        "ok\n".to_string()
    } else {
        format!("unhealthy: {}\n", h.summary())
    };
    for c in &h.checks {
        body.push_str(&format!(
            "{} {}: {}\n",
            if c.ok { "ok  " } else { "FAIL" },
            c.name,
            c.detail
        ));
    }
    let code = if h.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn metrics(State(ctx): State<Arc<OpsContext>>) -> Response {
    let body = super::prom::render(&ctx).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn status(State(ctx): State<Arc<OpsContext>>) -> Response {
    let report = ctx.status().await;
    match serde_json::to_string_pretty(&report) {
        Ok(s) => ([(header::CONTENT_TYPE, "application/json")], s).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Capped>>
    for super::auth::Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, Capped>) -> Self {
        super::auth::Peer(*stream.remote_addr())
    }
}

/// The ops listener with its limits. A new connection always gets in: when the endpoint is full
/// the oldest connection is closed (and gone) before the next `accept`, and an address holding
/// [`MAX_PER_PEER`] loses its oldest, so a quick `/healthz` is never stuck behind idle
/// connections and the sockets open never exceed [`MAX_CONNECTIONS`].
struct Capped {
    listener: TcpListener,
    table: Arc<Mutex<OpenConns>>,
    /// Signalled whenever a connection's socket is closed.
    closed: Arc<Notify>,
    next_id: u64,
    last_error_log: Option<Instant>,
}

/// The open connections, oldest first (ids only grow).
#[derive(Default)]
struct OpenConns {
    /// Connections not yet told to close.
    by_id: BTreeMap<u64, (IpAddr, CancellationToken)>,
    /// Connections whose socket is still open (told to close or not): the descriptors in use.
    live: usize,
    /// Connections closed to make room, for the log.
    evicted: u64,
}

impl OpenConns {
    fn evict(&mut self, id: u64) {
        if let Some((_, token)) = self.by_id.remove(&id) {
            token.cancel();
            self.evicted += 1;
        }
    }
}

impl Capped {
    fn new(listener: TcpListener) -> Capped {
        Capped {
            listener,
            table: Default::default(),
            closed: Arc::new(Notify::new()),
            next_id: 0,
            last_error_log: None,
        }
    }

    /// Returns once fewer than [`MAX_CONNECTIONS`] sockets are open, closing the oldest
    /// connection if needed (and waiting, up to a second each, for it to go).
    async fn make_room(&mut self) {
        loop {
            {
                let mut t = self.table.lock().expect("ops connection table");
                if t.live < MAX_CONNECTIONS {
                    return;
                }
                if let Some(oldest) = t.by_id.keys().next().copied() {
                    t.evict(oldest);
                    if t.evicted.is_power_of_two() {
                        tracing::warn!(
                            evicted = t.evicted,
                            limit = MAX_CONNECTIONS,
                            per_peer = MAX_PER_PEER,
                            "ops endpoint full: closed its oldest connections to make room"
                        );
                    }
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), self.closed.notified()).await;
        }
    }

    /// Enters a new connection from `ip`, closing that address's oldest beyond
    /// [`MAX_PER_PEER`].
    fn admit(&mut self, ip: IpAddr) -> (u64, CancellationToken) {
        let mut t = self.table.lock().expect("ops connection table");
        let mine: Vec<u64> = t
            .by_id
            .iter()
            .filter(|(_, (p, _))| *p == ip)
            .map(|(id, _)| *id)
            .collect();
        if mine.len() >= MAX_PER_PEER {
            t.evict(mine[0]);
        }
        self.next_id += 1;
        let token = CancellationToken::new();
        t.by_id.insert(self.next_id, (ip, token.clone()));
        t.live += 1;
        (self.next_id, token)
    }
}

impl axum::serve::Listener for Capped {
    type Io = Limited;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Limited, SocketAddr) {
        loop {
            self.make_room().await;
            let (stream, peer) = match self.listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning, log rarely.
                    if self
                        .last_error_log
                        .is_none_or(|t| t.elapsed() >= ACCEPT_ERROR_LOG_EVERY)
                    {
                        self.last_error_log = Some(Instant::now());
                        tracing::warn!(error = %e, "ops endpoint cannot accept a connection");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (id, token) = self.admit(peer.ip());
            return (
                Limited {
                    stream,
                    deadline: Box::pin(tokio::time::sleep(CONNECTION_LIFETIME)),
                    evicted: Box::pin(token.cancelled_owned()),
                    _entry: Entry {
                        id,
                        table: self.table.clone(),
                        closed: self.closed.clone(),
                    },
                },
                peer,
            );
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Removes a connection from the table when its socket is closed.
struct Entry {
    id: u64,
    table: Arc<Mutex<OpenConns>>,
    closed: Arc<Notify>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        {
            let mut t = self.table.lock().expect("ops connection table");
            t.by_id.remove(&self.id);
            t.live -= 1;
        }
        self.closed.notify_one();
    }
}

/// An accepted ops connection that fails every read and write once its lifetime is over or it
/// was evicted (so the HTTP server drops it).
struct Limited {
    stream: TcpStream,
    deadline: Pin<Box<tokio::time::Sleep>>,
    evicted: Pin<Box<WaitForCancellationFutureOwned>>,
    _entry: Entry,
}

impl Limited {
    /// Err once the connection must end; polling also wakes the connection at that moment.
    fn ended(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let why = if self.deadline.as_mut().poll(cx).is_ready() {
            "open longer than the ops connection lifetime"
        } else if self.evicted.as_mut().poll(cx).is_ready() {
            "closed to make room for a newer ops connection"
        } else {
            return Ok(());
        };
        Err(io::Error::new(io::ErrorKind::TimedOut, why))
    }
}

impl AsyncRead for Limited {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.ended(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Limited {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Err(e) = this.ended(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.ended(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
