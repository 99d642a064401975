//! The home watcher: knows whether each configured home is active or deactivated, and holds the
//! devices of a deactivated home.
//!
//! MODE accepts events from the devices of a deactivated home and drops them without a word, so
//! the hub has to know. With a project API key (`cloud.project_key_file`, read permission is
//! enough) the watcher reads `GET /homes/{id}` for every configured home at start, every
//! `cloud.home_poll_interval_secs`, and at once when an uplink pokes it (MODE refused one of a
//! device's messages in a way that hints at deactivation). A home that cannot be read keeps its
//! last known state: the hub never releases nor holds on a guess. Without a project key the
//! watcher says once that deactivation cannot be watched and every home stays unknown (not
//! held); the uplink then holds a device on an explicit refusal and retries periodically.
//!
//! Uplinks follow a home through [`Homes::held`] (a `watch` channel per home: `true` = hold).
//! Status and metrics read [`crate::Hub::home_states`] / [`crate::Hub::home_status`]. The HTTP call lives in
//! `mode::homes`; this module must not speak MODE's wire format or SQL.

use crate::config::Secret;
use crate::local::ModeId;
use crate::mode::homes::HomeError;
use crate::timing::now_ms;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

/// What the hub knows about a home.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HomeState {
    Active,
    Deactivated,
    /// Never read successfully (no project key, MODE unreachable, key refused).
    Unknown,
}

impl HomeState {
    pub fn label(self) -> &'static str {
        match self {
            HomeState::Active => "active",
            HomeState::Deactivated => "deactivated",
            HomeState::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for HomeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// One home as status shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HomeStatus {
    pub home_id: u64,
    /// Last known state (a failed read keeps it; `Unknown` until the first good read).
    pub state: HomeState,
    /// Since when (unix ms) `state` holds; the hub's start for a home never read.
    pub since_ms: i64,
    /// Whether the last read failed (the state shown is then the last known one).
    pub stale: bool,
    /// Why the last read failed.
    pub last_error: Option<String>,
    /// When MODE last answered for this home (unix ms).
    pub last_checked_ms: Option<i64>,
    /// MODE device IDs of the configured devices in this home.
    pub devices: Vec<ModeId>,
}

impl HomeStatus {
    /// Whether the home's devices are held (nothing of theirs is sent).
    pub fn held(&self) -> bool {
        self.state == HomeState::Deactivated
    }
}

/// [`HomeStatus`] plus how much its devices have waiting in the outbox.
#[derive(Debug, Clone)]
pub struct HomeReport {
    pub status: HomeStatus,
    /// Outbox rows of the home's devices (all held while the home is deactivated).
    pub pending_rows: u64,
    pub pending_bytes: u64,
}

/// Shared state of every configured home.
pub struct Homes {
    watched: bool,
    inner: Mutex<BTreeMap<u64, HomeStatus>>,
    /// One per home ever configured (a reload may add homes; a sender is never dropped, so
    /// an uplink's hold receiver stays valid).
    holds: Mutex<HashMap<u64, watch::Sender<bool>>>,
    /// For devices without a (known) home: never held.
    never: watch::Sender<bool>,
    /// Per home: when the last read that found it active was *asked* (monotonic, so a clock
    /// set at boot cannot move it). MODE may have deactivated the home any time after that, so
    /// what MODE acknowledged since is suspect.
    active_asked: Mutex<HashMap<u64, std::time::Instant>>,
    poke: Notify,
}

impl Homes {
    /// `devices`: (MODE device ID, home ID) of every configured device. `watched`: whether a
    /// project key lets the watcher read homes.
    pub fn new(
        devices: impl IntoIterator<Item = (ModeId, Option<u64>)>,
        watched: bool,
    ) -> Arc<Homes> {
        let homes = Arc::new(Homes {
            watched,
            inner: Mutex::new(BTreeMap::new()),
            holds: Mutex::new(HashMap::new()),
            never: watch::channel(false).0,
            active_asked: Mutex::new(HashMap::new()),
            poke: Notify::new(),
        });
        homes.set_devices(devices);
        homes
    }

    /// Puts a new device list in force (a config reload). Homes that keep devices keep their
    /// state; new homes start unknown and are read at once; homes left without devices are
    /// no longer watched.
    pub fn set_devices(&self, devices: impl IntoIterator<Item = (ModeId, Option<u64>)>) {
        let start = now_ms();
        let mut added = false;
        {
            let mut inner = self.inner.lock().expect("homes lock");
            for st in inner.values_mut() {
                st.devices.clear();
            }
            for (dev, home) in devices {
                if let Some(h) = home {
                    inner
                        .entry(h)
                        .or_insert_with(|| {
                            added = true;
                            HomeStatus {
                                home_id: h,
                                state: HomeState::Unknown,
                                since_ms: start,
                                stale: false,
                                last_error: None,
                                last_checked_ms: None,
                                devices: Vec::new(),
                            }
                        })
                        .devices
                        .push(dev);
                }
            }
            inner.retain(|_, st| !st.devices.is_empty());
            let mut holds = self.holds.lock().expect("homes lock");
            // A home no longer configured holds nothing (if it comes back, it starts unknown).
            for (h, tx) in holds.iter() {
                if !inner.contains_key(h) {
                    tx.send_if_modified(|held| std::mem::replace(held, false));
                }
            }
            for h in inner.keys() {
                holds.entry(*h).or_insert_with(|| watch::channel(false).0);
            }
        }
        if added {
            self.poke();
        }
    }

    /// Whether a project key lets the hub read homes.
    pub fn watched(&self) -> bool {
        self.watched
    }

    /// Follows whether `home`'s devices are held (`true`). A device without a home is never held.
    pub fn held(&self, home: Option<u64>) -> watch::Receiver<bool> {
        let holds = self.holds.lock().expect("homes lock");
        home.and_then(|h| holds.get(&h))
            .unwrap_or(&self.never)
            .subscribe()
    }

    /// Asks the watcher to read the homes now (an uplink saw a hint of deactivation).
    pub fn poke(&self) {
        self.poke.notify_one();
    }

    /// Every configured home, by ID.
    pub fn statuses(&self) -> Vec<HomeStatus> {
        self.inner
            .lock()
            .expect("homes lock")
            .values()
            .cloned()
            .collect()
    }

    pub fn home_ids(&self) -> Vec<u64> {
        self.inner
            .lock()
            .expect("homes lock")
            .keys()
            .copied()
            .collect()
    }

    /// When the last read that found `home` active was asked; `None` if none did.
    pub fn active_asked(&self, home: u64) -> Option<std::time::Instant> {
        self.active_asked
            .lock()
            .expect("homes lock")
            .get(&home)
            .copied()
    }

    /// Records the answer of one read of `home` (`Ok(deactivated)`) asked at `asked`.
    pub fn record_read(
        &self,
        home: u64,
        asked: std::time::Instant,
        answer: Result<bool, &HomeError>,
    ) {
        if matches!(answer, Ok(false)) {
            self.active_asked
                .lock()
                .expect("homes lock")
                .insert(home, asked);
        }
        self.record(home, answer);
    }

    /// Records the answer of one read of `home` (`Ok(deactivated)`).
    pub fn record(&self, home: u64, answer: Result<bool, &HomeError>) {
        let now = now_ms();
        let mut inner = self.inner.lock().expect("homes lock");
        let Some(st) = inner.get_mut(&home) else {
            return;
        };
        match answer {
            Ok(deactivated) => {
                let new = if deactivated {
                    HomeState::Deactivated
                } else {
                    HomeState::Active
                };
                if st.state != new {
                    match new {
                        HomeState::Deactivated => tracing::warn!(home, devices = ?st.devices,
                            "home is DEACTIVATED in MODE: holding its devices' events and kv changes in the outbox (commands still flow)"),
                        _ if st.state == HomeState::Deactivated => tracing::info!(
                            home,
                            "home is active again: sending what was held, in order"
                        ),
                        _ => tracing::info!(home, "home is active"),
                    }
                    st.state = new;
                    st.since_ms = now;
                }
                if st.stale {
                    tracing::info!(home, "MODE answers for this home again");
                }
                st.stale = false;
                st.last_error = None;
                st.last_checked_ms = Some(now);
            }
            Err(e) => {
                if !st.stale {
                    tracing::warn!(home, error = %e, state = %st.state,
                        "cannot read the home's state from MODE; keeping the last known state");
                }
                st.stale = true;
                st.last_error = Some(e.to_string());
            }
        }
        let held = st.state == HomeState::Deactivated;
        if let Some(tx) = self.holds.lock().expect("homes lock").get(&home) {
            tx.send_if_modified(|h| {
                let changed = *h != held;
                *h = held;
                changed
            });
        }
    }
}

/// How soon after a poke the watcher reads again at the earliest (many uplinks may poke at once).
const POKE_DEBOUNCE: Duration = Duration::from_millis(500);

/// Runs the watcher until shutdown. Without a project key it only logs that deactivation
/// cannot be watched.
pub async fn run(
    homes: Arc<Homes>,
    api_url: String,
    project_key: Option<Secret>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let Some(key) = project_key else {
        if !homes.home_ids().is_empty() {
            tracing::warn!("no cloud.project_key_file: the hub cannot watch whether a home is deactivated (MODE then drops its devices' events silently). A device whose messages MODE refuses is held and retried periodically. Set cloud.project_key_file to a project API key with read permission to watch homes.");
        }
        return;
    };
    loop {
        for home in homes.home_ids() {
            let asked = std::time::Instant::now();
            let answer = tokio::select! {
                a = crate::mode::homes::home_deactivated(&api_url, &key, home) => a,
                _ = shutdown.cancelled() => return,
            };
            if let Err(e) = &answer {
                if e.is_auth() {
                    tracing::error!(home, error = %e, "MODE REFUSED THE PROJECT KEY for this home: check cloud.project_key_file (a project API key of this home's project)");
                }
            }
            homes.record_read(home, asked, answer.as_ref().map(|d| *d));
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = homes.poke.notified() => {
                tracing::debug!("home watcher poked");
                tokio::time::sleep(POKE_DEBOUNCE).await;
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keeps_last_known_state() {
        let homes = Homes::new(
            [
                (ModeId(100), Some(42)),
                (ModeId(101), Some(43)),
                (ModeId(102), None),
            ],
            true,
        );
        let mut h42 = homes.held(Some(42));
        let none = homes.held(None);
        assert!(!*h42.borrow());
        assert_eq!(homes.statuses()[0].state, HomeState::Unknown);

        homes.record(42, Ok(true));
        assert!(h42.has_changed().unwrap());
        assert!(*h42.borrow_and_update());
        let err = HomeError::Transport("down".into());
        homes.record(42, Err(&err));
        let st = &homes.statuses()[0];
        assert_eq!(st.state, HomeState::Deactivated);
        assert!(st.stale && st.held());
        assert!(*h42.borrow(), "still held while MODE cannot be reached");
        assert!(!h42.has_changed().unwrap());

        homes.record(42, Ok(false));
        assert!(!*h42.borrow_and_update());
        let st = &homes.statuses()[0];
        assert_eq!(st.state, HomeState::Active);
        assert!(!st.stale);
        assert_eq!(st.devices, vec![ModeId(100)]);
        assert!(!*none.borrow());
        // Unknown homes are not held.
        assert!(!*homes.held(Some(43)).borrow());
    }
}
