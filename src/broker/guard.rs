//! The front's defences against the LAN: connection slots, login slow-down, safe log fields.
//!
//! Everything here is bounded whatever a peer sends: the slot table holds at most
//! `max_connections` entries, the failed-login table at most [`MAX_PEERS_TRACKED`] peers, the
//! internal client-id pool at most as many ids as connections were ever open at once. Log helpers
//! escape control characters and truncate attacker-controlled text, and rate-limit repeated
//! warnings. This module must not touch sockets or MQTT packets (the relay does).

use crate::metrics::FrontStats;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Limits of the local front. Defaults are what `docs/local-mqtt.md` documents.
#[derive(Debug, Clone)]
pub struct FrontLimits {
    /// Most connections at once (logged in or not): `[local.mqtt] max_connections`.
    pub max_connections: usize,
    /// Time a new connection has to send its CONNECT.
    pub connect_timeout: Duration,
    /// Most not-yet-logged-in connections from one IP address; a new one evicts that peer's
    /// oldest.
    pub max_unauthenticated_per_peer: usize,
    /// Largest packet read before login (a CONNECT with a Will is well under this).
    pub max_prelogin_packet: usize,
    /// Failed logins from one IP address answered without delay (within [`FAIL_MEMORY`]).
    pub free_login_failures: u32,
    /// Delay of the first slowed failed login; doubles per further failure up to
    /// `max_login_delay`.
    pub login_delay: Duration,
    pub max_login_delay: Duration,
    /// Failed logins per second, all peers together, above which every failed login is
    /// answered after `max_login_delay`.
    pub global_failures_per_sec: u32,
}

impl Default for FrontLimits {
    fn default() -> Self {
        FrontLimits {
            max_connections: 256,
            connect_timeout: Duration::from_secs(5),
            max_unauthenticated_per_peer: 8,
            max_prelogin_packet: 8 * 1024,
            free_login_failures: 3,
            login_delay: Duration::from_millis(250),
            max_login_delay: Duration::from_secs(4),
            global_failures_per_sec: 20,
        }
    }
}

/// Why a connection could not get a slot.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Every slot holds a logged-in connection.
    Full,
}

struct Pending {
    ip: IpAddr,
    kick: oneshot::Sender<()>,
}

#[derive(Default)]
struct SlotTable {
    next: u64,
    /// Connections that have not logged in yet, oldest first.
    pending: BTreeMap<u64, Pending>,
    pending_per_peer: HashMap<IpAddr, usize>,
    authenticated: usize,
}

impl SlotTable {
    fn remove_pending(&mut self, seq: u64) -> Option<Pending> {
        let p = self.pending.remove(&seq)?;
        if let Some(n) = self.pending_per_peer.get_mut(&p.ip) {
            *n -= 1;
            if *n == 0 {
                self.pending_per_peer.remove(&p.ip);
            }
        }
        Some(p)
    }

    fn evict(&mut self, seq: u64) {
        if let Some(p) = self.remove_pending(seq) {
            let _ = p.kick.send(());
        }
    }
}

/// Connection slots: a logged-in device keeps its slot; a connection that has not logged in
/// yet may lose its slot to a newer one (oldest first, and per peer).
pub struct Slots {
    table: Mutex<SlotTable>,
    max: usize,
    per_peer: usize,
}

/// A connection's slot; dropping it frees the slot.
pub struct Slot {
    slots: Arc<Slots>,
    seq: u64,
    authenticated: bool,
}

impl Slots {
    pub fn new(limits: &FrontLimits) -> Slots {
        Slots {
            table: Mutex::new(SlotTable::default()),
            max: limits.max_connections.max(1),
            per_peer: limits.max_unauthenticated_per_peer.max(1),
        }
    }

    /// A slot for a new connection from `ip`, and the signal that it was evicted before it
    /// logged in. `evicted` counts the connections closed to make room.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        stats: &FrontStats,
    ) -> Result<(Slot, oneshot::Receiver<()>), Admission> {
        let mut t = self.table.lock().expect("slot lock");
        if t.pending_per_peer.get(&ip).copied().unwrap_or(0) >= self.per_peer {
            let oldest = t.pending.iter().find(|(_, p)| p.ip == ip).map(|(&s, _)| s);
            if let Some(seq) = oldest {
                t.evict(seq);
                stats.evicted.fetch_add(1, Relaxed);
            }
        }
        if t.pending.len() + t.authenticated >= self.max {
            match t.pending.keys().next().copied() {
                Some(seq) => {
                    t.evict(seq);
                    stats.evicted.fetch_add(1, Relaxed);
                }
                None => return Err(Admission::Full),
            }
        }
        let seq = t.next;
        t.next += 1;
        let (kick, kicked) = oneshot::channel();
        t.pending.insert(seq, Pending { ip, kick });
        *t.pending_per_peer.entry(ip).or_default() += 1;
        Ok((
            Slot {
                slots: self.clone(),
                seq,
                authenticated: false,
            },
            kicked,
        ))
    }

    /// (not logged in, logged in) connections now.
    pub fn counts(&self) -> (usize, usize) {
        let t = self.table.lock().expect("slot lock");
        (t.pending.len(), t.authenticated)
    }

    /// Entries of the per-peer table (bounded by the pending connections).
    #[cfg(test)]
    fn peers_tracked(&self) -> usize {
        self.table.lock().expect("slot lock").pending_per_peer.len()
    }
}

impl Slot {
    /// The connection logged in: its slot can no longer be taken. False if it was evicted
    /// meanwhile (the connection must close).
    pub fn authenticated(&mut self) -> bool {
        let mut t = self.slots.table.lock().expect("slot lock");
        if t.remove_pending(self.seq).is_none() {
            return false;
        }
        t.authenticated += 1;
        self.authenticated = true;
        true
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut t = self.slots.table.lock().expect("slot lock");
        if self.authenticated {
            t.authenticated -= 1;
        } else {
            t.remove_pending(self.seq);
        }
    }
}

/// Failed logins of one peer are remembered this long after the last one.
pub const FAIL_MEMORY: Duration = Duration::from_secs(60);
/// Most peers whose failed logins are remembered (a full table forgets the stalest).
pub const MAX_PEERS_TRACKED: usize = 4096;

struct Failures {
    count: u32,
    last: Instant,
}

#[derive(Default)]
struct ThrottleState {
    peers: HashMap<IpAddr, Failures>,
    window_start: Option<Instant>,
    window_failures: u32,
}

/// Slows down password guessing: the answer to a failed login comes later the more a peer
/// failed recently (and for everyone when many peers fail at once). A good login is never
/// delayed by another peer's failures.
pub struct LoginThrottle {
    state: Mutex<ThrottleState>,
    limits: FrontLimits,
}

impl LoginThrottle {
    pub fn new(limits: &FrontLimits) -> LoginThrottle {
        LoginThrottle {
            state: Mutex::new(ThrottleState::default()),
            limits: limits.clone(),
        }
    }

    /// Records a failed login from `ip`; returns how long to wait before answering it.
    pub fn failed(&self, ip: IpAddr, now: Instant) -> Duration {
        let mut s = self.state.lock().expect("throttle lock");
        if s.peers.len() >= MAX_PEERS_TRACKED && !s.peers.contains_key(&ip) {
            s.peers
                .retain(|_, f| now.saturating_duration_since(f.last) < FAIL_MEMORY);
            if s.peers.len() >= MAX_PEERS_TRACKED {
                // Forget the stalest half; the global limit still holds meanwhile.
                let mut lasts: Vec<Instant> = s.peers.values().map(|f| f.last).collect();
                lasts.sort_unstable();
                let cut = lasts[lasts.len() / 2];
                s.peers.retain(|_, f| f.last > cut);
            }
        }
        let f = s.peers.entry(ip).or_insert(Failures {
            count: 0,
            last: now,
        });
        if now.saturating_duration_since(f.last) >= FAIL_MEMORY {
            f.count = 0;
        }
        f.count = f.count.saturating_add(1);
        f.last = now;
        let count = f.count;
        match s.window_start {
            Some(w) if now.saturating_duration_since(w) < Duration::from_secs(1) => {
                s.window_failures += 1
            }
            _ => {
                s.window_start = Some(now);
                s.window_failures = 1;
            }
        }
        let l = &self.limits;
        let mut delay = Duration::ZERO;
        if count > l.free_login_failures {
            let doublings = (count - l.free_login_failures - 1).min(16);
            delay = l.login_delay.saturating_mul(1 << doublings);
        }
        if s.window_failures > l.global_failures_per_sec {
            delay = l.max_login_delay;
        }
        delay.min(l.max_login_delay)
    }

    pub fn peers_tracked(&self) -> usize {
        self.state.lock().expect("throttle lock").peers.len()
    }
}

/// Internal client ids for rumqttd. rumqttd keeps a record per client id it has ever seen
/// (its "graveyard"), so fresh ids per connection would grow it for ever; ids are reused
/// instead, and an id is handed out again only once rumqttd has let go of its last user.
#[derive(Default)]
pub struct InnerIds {
    free: Mutex<Vec<u64>>,
    minted: AtomicU64,
}

impl InnerIds {
    pub fn take(&self) -> u64 {
        if let Some(id) = self.free.lock().expect("id lock").pop() {
            return id;
        }
        self.minted.fetch_add(1, Relaxed)
    }

    /// Back to the pool (only once rumqttd has closed the connection that used it).
    pub fn give_back(&self, id: u64) {
        self.free.lock().expect("id lock").push(id);
    }

    /// Distinct ids ever used: bounded by the most connections ever open at once.
    pub fn minted(&self) -> u64 {
        self.minted.load(Relaxed)
    }
}

/// Attacker-controlled text made safe for a log line: control characters escaped (no forged
/// lines, no terminal escapes) and cut to `max` characters.
pub fn clean(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max) + 8);
    for (i, c) in s.chars().enumerate() {
        if i >= max {
            out.push('…');
            break;
        }
        if c.is_control() || c == '\u{2028}' || c == '\u{2029}' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Longest topic, filter or client id put in a log line.
pub const LOG_FIELD_MAX: usize = 120;

/// Lets at most `burst` warnings of one kind through per `period`; says how many it held back.
pub struct LogLimiter {
    state: Mutex<(Option<Instant>, u32, u64)>,
    burst: u32,
    period: Duration,
}

impl LogLimiter {
    pub const fn new(burst: u32, period: Duration) -> LogLimiter {
        LogLimiter {
            state: Mutex::new((None, 0, 0)),
            burst,
            period,
        }
    }

    /// `Some(suppressed since the last one)` when this warning may be logged.
    pub fn allow(&self) -> Option<u64> {
        let now = Instant::now();
        let mut s = self.state.lock().expect("log limiter lock");
        let (start, used, held) = &mut *s;
        if start.is_none_or(|t| now.saturating_duration_since(t) >= self.period) {
            *start = Some(now);
            *used = 0;
        }
        if *used < self.burst {
            *used += 1;
            let n = *held;
            *held = 0;
            Some(n)
        } else {
            *held += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn full_table_evicts_oldest_unauthenticated_and_never_a_logged_in_one() {
        let limits = FrontLimits {
            max_connections: 3,
            max_unauthenticated_per_peer: 10,
            ..Default::default()
        };
        let slots = Arc::new(Slots::new(&limits));
        let stats = FrontStats::default();
        let (mut a, _ka) = slots.admit(ip(1), &stats).unwrap();
        assert!(a.authenticated());
        let (_b, mut kb) = slots.admit(ip(2), &stats).unwrap();
        let (_c, mut kc) = slots.admit(ip(2), &stats).unwrap();
        let (_d, _kd) = slots.admit(ip(3), &stats).unwrap();
        assert!(kb.try_recv().is_ok(), "oldest pending evicted");
        assert!(kc.try_recv().is_err());
        assert_eq!(slots.counts(), (2, 1));
        assert_eq!(stats.evicted.load(Relaxed), 1);
        // All logged in: a new one is refused, nobody is evicted.
        let slots = Arc::new(Slots::new(&FrontLimits {
            max_connections: 1,
            ..Default::default()
        }));
        let (mut x, _kx) = slots.admit(ip(1), &stats).unwrap();
        assert!(x.authenticated());
        assert_eq!(slots.admit(ip(2), &stats).err(), Some(Admission::Full));
        drop(x);
        assert!(slots.admit(ip(2), &stats).is_ok());
        assert_eq!(slots.counts(), (0, 0));
    }

    #[test]
    fn per_peer_cap_evicts_that_peers_oldest_only() {
        let limits = FrontLimits {
            max_connections: 100,
            max_unauthenticated_per_peer: 2,
            ..Default::default()
        };
        let slots = Arc::new(Slots::new(&limits));
        let stats = FrontStats::default();
        let (_o, mut other) = slots.admit(ip(9), &stats).unwrap();
        let (_a, mut ka) = slots.admit(ip(1), &stats).unwrap();
        let (mut b, _kb) = slots.admit(ip(1), &stats).unwrap();
        let (_c, _kc) = slots.admit(ip(1), &stats).unwrap();
        assert!(ka.try_recv().is_ok());
        assert!(other.try_recv().is_err());
        assert!(b.authenticated());
        drop(_a);
        assert_eq!(slots.counts(), (2, 1));
        assert_eq!(slots.peers_tracked(), 2);
    }

    #[test]
    fn failed_logins_slow_down_per_peer_and_globally() {
        let l = FrontLimits::default();
        let t = LoginThrottle::new(&l);
        let now = Instant::now();
        let delays: Vec<Duration> = (0..8).map(|_| t.failed(ip(1), now)).collect();
        assert_eq!(delays[..3], [Duration::ZERO; 3]);
        assert_eq!(delays[3], l.login_delay);
        assert_eq!(delays[4], l.login_delay * 2);
        assert_eq!(delays[7], l.max_login_delay);
        // Another peer starts free.
        assert_eq!(t.failed(ip(2), now), Duration::ZERO);
        // Many peers failing in one second: everyone's failures wait.
        let t = LoginThrottle::new(&l);
        let mut last = Duration::ZERO;
        for i in 0..=l.global_failures_per_sec {
            last = t.failed(IpAddr::from([10, 1, 0, i as u8]), now);
        }
        assert_eq!(last, l.max_login_delay);
        // Forgotten after a quiet minute.
        assert_eq!(t.failed(ip(7), now + FAIL_MEMORY * 2), Duration::ZERO);
    }

    #[test]
    fn throttle_table_is_bounded() {
        let t = LoginThrottle::new(&FrontLimits::default());
        let now = Instant::now();
        for i in 0..(MAX_PEERS_TRACKED as u32 * 2) {
            t.failed(IpAddr::from(i.to_be_bytes()), now);
        }
        assert!(t.peers_tracked() <= MAX_PEERS_TRACKED);
    }

    #[test]
    fn clean_escapes_controls_and_truncates() {
        assert_eq!(clean("a\nb\x1b[31m", 100), "a\\nb\\u{1b}[31m");
        let long = "x".repeat(1000);
        let c = clean(&long, 10);
        assert_eq!(c.chars().count(), 11);
        assert!(c.ends_with('…'));
    }

    #[test]
    fn log_limiter_holds_back_and_reports() {
        let l = LogLimiter::new(2, Duration::from_secs(3600));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
    }

    #[test]
    fn inner_ids_are_reused() {
        let ids = InnerIds::default();
        for _ in 0..100 {
            let a = ids.take();
            let b = ids.take();
            ids.give_back(a);
            ids.give_back(b);
        }
        assert_eq!(ids.minted(), 2);
    }
}
