//! Who is connected locally: which devices have a live local connection (MQTT client or open
//! serial port), learnt from a tap on the adapters' presence channel on its way to the downlink,
//! and whether the downlink keeps up with that channel. Ops and the watchdog read it. It must not
//! change or reorder the events it passes on.

use crate::local::{ConnId, LocalEvent};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Which devices have a live local connection (MQTT client or open serial port).
///
/// Fed by [`Presence::tap`], which sits on the adapters' presence channel on its way to the
/// downlink, so neither side needs to know about it.
#[derive(Debug)]
pub struct Presence {
    conns: Mutex<Vec<Vec<ConnId>>>,
    /// Set while the downlink keeps up with presence events (see [`Presence::downlink_stuck`]).
    forward_full_since: Mutex<Option<Instant>>,
}

impl Presence {
    pub fn new(devices: usize) -> Presence {
        Presence {
            conns: Mutex::new(vec![Vec::new(); devices]),
            forward_full_since: Mutex::new(None),
        }
    }

    /// Passes every event of `rx` on to the returned receiver, noting presence on the way.
    pub fn tap(self: Arc<Self>, mut rx: mpsc::Receiver<LocalEvent>) -> mpsc::Receiver<LocalEvent> {
        let (tx, out) = mpsc::channel(rx.max_capacity());
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                self.apply(&ev);
                let ev = match tx.try_send(ev) {
                    Ok(()) => continue,
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                    Err(mpsc::error::TrySendError::Full(ev)) => ev,
                };
                // The downlink is behind; remember since when, for the watchdog.
                self.forward_full_since
                    .lock()
                    .expect("presence lock")
                    .get_or_insert_with(Instant::now);
                let sent = tx.send(ev).await;
                *self.forward_full_since.lock().expect("presence lock") = None;
                if sent.is_err() {
                    return;
                }
            }
        });
        out
    }

    fn apply(&self, ev: &LocalEvent) {
        let mut conns = self.conns.lock().expect("presence lock");
        match ev {
            LocalEvent::Connected(dev, c) => {
                // A reload may have added slots since the hub started.
                if conns.len() <= *dev {
                    conns.resize_with(dev + 1, Vec::new);
                }
                if !conns[*dev].contains(c) {
                    conns[*dev].push(*c);
                }
            }
            LocalEvent::Disconnected(dev, c) => {
                if let Some(v) = conns.get_mut(*dev) {
                    v.retain(|x| x != c);
                }
            }
            LocalEvent::Subscribed(..) => {}
        }
    }

    /// Live local connections of device `dev` (registry index).
    pub fn connections(&self, dev: usize) -> usize {
        self.conns
            .lock()
            .expect("presence lock")
            .get(dev)
            .map_or(0, Vec::len)
    }

    /// How long the downlink has not taken presence events it was offered, if it is behind.
    pub fn downlink_stuck(&self) -> Option<Duration> {
        self.forward_full_since
            .lock()
            .expect("presence lock")
            .map(|t| t.elapsed())
    }
}
