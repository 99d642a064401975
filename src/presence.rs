//! Who is connected locally, in one tracker: per device, its live local connections (MQTT
//! clients, open serial ports) and whether each listens for commands and for kv. The downlink
//! applies every presence event in the order it handles them (so "is it listening?" is always
//! answered in step with the messages it routes); ops and the watchdog read it. A tap on the
//! adapters' presence channel notes whether the downlink keeps up. It must not change or reorder
//! the events it passes on.

use crate::local::{ConnId, DeviceId, LocalEvent, TopicKind};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

/// One device's local connections: conn -> (listens for commands, listens for kv).
#[derive(Debug, Default, Clone)]
struct Listeners {
    conns: HashMap<ConnId, (bool, bool)>,
}

/// Local presence of every device slot.
#[derive(Debug)]
pub struct Presence {
    devices: Mutex<Vec<Listeners>>,
    /// Set while the downlink is behind on presence events (see [`Presence::downlink_stuck`]).
    forward_full_since: Mutex<Option<Instant>>,
}

/// What a presence event calls for on the way down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listening {
    /// The device subscribed to its command topic: deliver what waited.
    Commands,
    /// The device subscribed to its kv topic: send it its whole store.
    Kv,
}

impl Presence {
    pub fn new(devices: usize) -> Presence {
        Presence {
            devices: Mutex::new(vec![Listeners::default(); devices]),
            forward_full_since: Mutex::new(None),
        }
    }

    /// Passes every event of `rx` on to the returned receiver (a task on `tracker` that ends
    /// when every sender of `rx` is gone or the receiver is dropped, whichever comes first: at
    /// shutdown the downlink ends while the adapters still hold their senders), noting when the
    /// receiver (the downlink) does not keep up.
    pub fn tap(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<LocalEvent>,
        tracker: &TaskTracker,
    ) -> mpsc::Receiver<LocalEvent> {
        let (tx, out) = mpsc::channel(rx.max_capacity());
        tracker.spawn(async move {
            loop {
                let ev = tokio::select! {
                    ev = rx.recv() => match ev {
                        Some(ev) => ev,
                        None => return,
                    },
                    _ = tx.closed() => return,
                };
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

    /// Applies one event (the downlink calls this in its order); says what it calls for.
    pub fn apply(&self, ev: &LocalEvent) -> Option<(DeviceId, Listening)> {
        let mut devices = self.devices.lock().expect("presence lock");
        let dev = match *ev {
            LocalEvent::Connected(d, _)
            | LocalEvent::Disconnected(d, _)
            | LocalEvent::Subscribed(d, _, _) => d,
        };
        // A reload may have added slots since the hub started.
        if devices.len() <= dev.index() {
            devices.resize_with(dev.index() + 1, Listeners::default);
        }
        let conns = &mut devices[dev].conns;
        match *ev {
            LocalEvent::Connected(_, c) => {
                conns.entry(c).or_default();
                None
            }
            LocalEvent::Disconnected(_, c) => {
                conns.remove(&c);
                None
            }
            LocalEvent::Subscribed(_, c, TopicKind::Command) => {
                conns.entry(c).or_default().0 = true;
                Some((dev, Listening::Commands))
            }
            LocalEvent::Subscribed(_, c, TopicKind::Kv) => {
                conns.entry(c).or_default().1 = true;
                Some((dev, Listening::Kv))
            }
            LocalEvent::Subscribed(..) => None,
        }
    }

    fn any(&self, dev: DeviceId, f: impl Fn(&(bool, bool)) -> bool) -> bool {
        self.devices
            .lock()
            .expect("presence lock")
            .get(dev.index())
            .is_some_and(|l| l.conns.values().any(f))
    }

    /// Whether a connection of `dev` listens for commands.
    pub fn listens_for_commands(&self, dev: DeviceId) -> bool {
        self.any(dev, |c| c.0)
    }

    /// Whether a connection of `dev` listens for kv messages.
    pub fn listens_for_kv(&self, dev: DeviceId) -> bool {
        self.any(dev, |c| c.1)
    }

    /// Live local connections of device `dev` (registry index).
    pub fn connections(&self, dev: DeviceId) -> usize {
        self.devices
            .lock()
            .expect("presence lock")
            .get(dev.index())
            .map_or(0, |l| l.conns.len())
    }

    /// How long the downlink has not taken presence events it was offered, if it is behind.
    pub fn downlink_stuck(&self) -> Option<Duration> {
        self.forward_full_since
            .lock()
            .expect("presence lock")
            .map(|t| t.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_follows_subscriptions_and_disconnects() {
        let p = Presence::new(1);
        assert_eq!(p.apply(&LocalEvent::Connected(DeviceId(2), 7)), None);
        assert_eq!(p.connections(DeviceId(2)), 1);
        assert!(!p.listens_for_commands(DeviceId(2)));
        assert_eq!(
            p.apply(&LocalEvent::Subscribed(DeviceId(2), 7, TopicKind::Command)),
            Some((DeviceId(2), Listening::Commands))
        );
        assert!(p.listens_for_commands(DeviceId(2)) && !p.listens_for_kv(DeviceId(2)));
        p.apply(&LocalEvent::Connected(DeviceId(2), 8));
        assert_eq!(p.connections(DeviceId(2)), 2);
        p.apply(&LocalEvent::Disconnected(DeviceId(2), 7));
        assert!(!p.listens_for_commands(DeviceId(2)));
        assert_eq!(p.connections(DeviceId(2)), 1);
    }
}
