//! The core shared by the MQTT listener, the HTTP handlers and the handle: the locked state
//! model, the (re)bindable MQTT listener and the event broadcast. It must not contain
//! wire-protocol code (that is `mqtt.rs` and `http.rs`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::mqtt;
use super::state::State;
use super::RecordedEvent;

/// What the listeners, the HTTP handlers and the handle share.
pub(crate) struct Shared {
    pub(super) state: Mutex<State>,
    /// The MQTT listener; taken (dropped at once) when going offline.
    pub(super) listener: Mutex<Option<TcpListener>>,
    /// Token of the current accept loop.
    pub(super) accept_token: Mutex<Option<CancellationToken>>,
    pub(super) events_tx: broadcast::Sender<RecordedEvent>,
    pub(super) event_seq: watch::Sender<u64>,
    pub(super) root: CancellationToken,
    pub(super) http_addr: SocketAddr,
    pub(super) mqtt_addr: SocketAddr,
    pub(super) rt: tokio::runtime::Handle,
}

impl Shared {
    /// Locks the state; a poisoned lock (a panic elsewhere) is recovered, the state being a
    /// plain in-memory model.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn root(&self) -> &CancellationToken {
        &self.root
    }

    pub(crate) fn poll_accept(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<Option<(TcpStream, SocketAddr)>>> {
        let guard = self.listener.lock().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            Some(l) => l.poll_accept(cx).map(|r| r.map(Some)),
            None => Poll::Ready(Ok(None)),
        }
    }

    pub(super) fn install_listener(self: &Arc<Self>, listener: TcpListener) {
        *self.listener.lock().unwrap_or_else(|e| e.into_inner()) = Some(listener);
        let token = self.root.child_token();
        if let Some(old) = self
            .accept_token
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(token.clone())
        {
            old.cancel();
        }
        let shared = Arc::clone(self);
        self.rt.spawn(mqtt::accept_loop(shared, token));
    }

    pub(super) fn close_listener(&self) {
        // Dropping the TcpListener here closes the socket synchronously: connection refused.
        drop(
            self.listener
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        if let Some(t) = self
            .accept_token
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            t.cancel();
        }
    }

    fn listener_open(&self) -> bool {
        self.listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Goes offline or back online; see [`EmulatorHandle::set_offline`].
    pub(crate) fn set_offline(self: &Arc<Self>, offline: bool) {
        if offline {
            self.lock().set_offline(true);
            self.close_listener();
            tracing::info!("emulator: offline (MQTT listener closed, sessions dropped)");
            return;
        }
        if self.listener_open() {
            self.lock().set_offline(false);
            return;
        }
        let addr = self.mqtt_addr;
        let bound = {
            let _guard = self.rt.enter();
            bind_listener(addr)
        };
        match bound {
            Ok(l) => self.install_listener(l),
            Err(e) => {
                tracing::warn!("emulator: rebinding MQTT {addr} failed ({e}); retrying");
                let shared = Arc::clone(self);
                self.rt.spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        if shared.root.is_cancelled() || shared.lock().is_offline() {
                            return;
                        }
                        if let Ok(l) = bind_listener(addr) {
                            shared.install_listener(l);
                            return;
                        }
                    }
                });
            }
        }
        self.lock().set_offline(false);
        tracing::info!("emulator: online again (MQTT on {addr})");
    }
}

pub(super) fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}
