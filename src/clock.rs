//! The capture clock: when was a message captured, on a device with no real-time clock.
//!
//! A Raspberry Pi boots with a wrong wall clock (1970, or the last time `fake-hwclock` saved)
//! until NTP synchronises it. So every capture records, besides the wall time, whether the clock
//! was synchronised, the boot it happened in (a hash of `/proc/sys/kernel/random/boot_id`) and
//! the monotonic time since that boot (`CLOCK_BOOTTIME`, which also counts suspend). The
//! [`ClockWatch`] task checks once a second whether the kernel says the clock is synchronised
//! (`adjtimex`: no `STA_UNSYNC`, state not `TIME_ERROR`); when it becomes so, rows captured
//! unsynchronised during *this* boot get their wall time repaired as `mono + (wall - mono)`
//! ([`Outbox::repair_capture`]). It also watches `wall - mono`: a change of more than a second
//! between two checks is a clock jump (an NTP step, someone running `date`), logged and counted.
//!
//! Rows from an *earlier* boot that never saw a synchronised clock cannot be repaired (their
//! monotonic time belongs to a boot that is gone). They are sent with their best guess (the wall
//! clock at capture) and marked as approximate (see `docs/store-and-forward.md`). The time source
//! is injectable ([`TimeSource`], [`ManualTime`]) so tests can drive all of this.

use crate::outbox::{Capture, Outbox};
use crate::router::Clock;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// Where time comes from.
pub trait TimeSource: Send + Sync {
    /// Wall clock, Unix milliseconds.
    fn wall_ms(&self) -> i64;
    /// Monotonic milliseconds since boot (including suspend).
    fn mono_ms(&self) -> i64;
    /// Whether the kernel believes the wall clock is synchronised.
    fn synced(&self) -> bool;
    /// Identifies this boot.
    fn boot_id(&self) -> i64;
}

/// The system's clocks.
pub struct SystemTimeSource {
    boot_id: i64,
    /// `hub.trust_clock`: report the wall clock as synchronised whatever the kernel says.
    pub trust: bool,
}

/// FNV-1a, 63 bits (so it stays a positive SQLite integer).
fn hash63(s: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h >> 1) as i64
}

impl SystemTimeSource {
    pub fn new() -> SystemTimeSource {
        let boot_id = match std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
            Ok(s) if !s.trim().is_empty() => hash63(s.trim()),
            _ => {
                // Without a boot id, treat this process's life as its own "boot": rows of an
                // earlier run then count as unrepairable rather than being repaired wrongly.
                let id = (fastrand::u64(..) >> 1) as i64;
                tracing::warn!("cannot read /proc/sys/kernel/random/boot_id: capture times taken before the clock is synchronised are repaired only within this run");
                id
            }
        };
        SystemTimeSource {
            boot_id,
            trust: false,
        }
    }
}

impl Default for SystemTimeSource {
    fn default() -> Self {
        Self::new()
    }
}

impl TimeSource for SystemTimeSource {
    fn wall_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }

    fn mono_ms(&self) -> i64 {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let id = nix::time::ClockId::CLOCK_BOOTTIME;
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        let id = nix::time::ClockId::CLOCK_MONOTONIC;
        // time_t and c_long are 32 bits on armhf (armv7 gnueabihf): widen before multiplying.
        #[allow(clippy::unnecessary_cast)]
        nix::time::clock_gettime(id)
            .map(|t| t.tv_sec() as i64 * 1000 + t.tv_nsec() as i64 / 1_000_000)
            .unwrap_or(0)
    }

    fn synced(&self) -> bool {
        self.trust || kernel_clock_synced()
    }

    fn boot_id(&self) -> i64 {
        self.boot_id
    }
}

/// `adjtimex` in read-only mode: synchronised unless `STA_UNSYNC` is set or the state is
/// `TIME_ERROR`. Where it cannot be asked, the clock is taken as synchronised.
#[cfg(target_os = "linux")]
pub fn kernel_clock_synced() -> bool {
    // SAFETY: adjtimex with modes = 0 only reads into the zeroed struct we own.
    unsafe {
        let mut tx: libc::timex = std::mem::zeroed();
        tx.modes = 0;
        let state = libc::adjtimex(&mut tx);
        if state == -1 {
            return true;
        }
        state != libc::TIME_ERROR && (tx.status & libc::STA_UNSYNC) == 0
    }
}

#[cfg(not(target_os = "linux"))]
pub fn kernel_clock_synced() -> bool {
    true
}

/// A clock that tests set by hand.
#[derive(Debug, Default)]
pub struct ManualTime {
    pub wall: AtomicI64,
    pub mono: AtomicI64,
    pub synced: AtomicBool,
    pub boot: AtomicI64,
}

impl ManualTime {
    pub fn new(wall_ms: i64, mono_ms: i64, synced: bool, boot_id: i64) -> Arc<ManualTime> {
        Arc::new(ManualTime {
            wall: AtomicI64::new(wall_ms),
            mono: AtomicI64::new(mono_ms),
            synced: AtomicBool::new(synced),
            boot: AtomicI64::new(boot_id),
        })
    }
    /// Time passes: both clocks move by `ms`.
    pub fn advance(&self, ms: i64) {
        self.wall.fetch_add(ms, Relaxed);
        self.mono.fetch_add(ms, Relaxed);
    }
    /// The wall clock is set (NTP step, `date`): it moves by `ms`, monotonic time does not.
    pub fn step_wall(&self, ms: i64) {
        self.wall.fetch_add(ms, Relaxed);
    }
}

impl TimeSource for ManualTime {
    fn wall_ms(&self) -> i64 {
        self.wall.load(Relaxed)
    }
    fn mono_ms(&self) -> i64 {
        self.mono.load(Relaxed)
    }
    fn synced(&self) -> bool {
        self.synced.load(Relaxed)
    }
    fn boot_id(&self) -> i64 {
        self.boot.load(Relaxed)
    }
}

/// A wall-clock change relative to monotonic time above this is a jump.
pub const JUMP_THRESHOLD_MS: i64 = 1000;
/// How often the watch checks the clock.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Follows the system clock: synchronised or not, jumps, and repairs captures once it is known.
pub struct ClockWatch {
    src: Arc<dyn TimeSource>,
    synced: AtomicBool,
    /// `wall - mono` at the last check.
    offset: AtomicI64,
    /// Repairs still to run (the first synchronised check and one more, for rows that were in
    /// the writer's queue during the first).
    repair_rounds: AtomicU64,
    /// Clock jumps seen.
    pub jumps: AtomicU64,
    /// Rows whose capture time was repaired.
    pub repaired: AtomicU64,
}

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Check {
    pub synced: bool,
    /// The clock just became synchronised.
    pub became_synced: bool,
    /// `wall - mono` moved by this much since the last check (only when over the threshold).
    pub jump_ms: Option<i64>,
    /// Rows repaired by this check.
    pub repaired: u64,
}

impl ClockWatch {
    /// The system clock; `trust`: take it as synchronised (`hub.trust_clock`).
    pub fn system(trust: bool) -> Arc<ClockWatch> {
        let mut src = SystemTimeSource::new();
        src.trust = trust;
        ClockWatch::with_source(Arc::new(src))
    }

    pub fn with_source(src: Arc<dyn TimeSource>) -> Arc<ClockWatch> {
        let synced = src.synced();
        if !synced {
            tracing::warn!("the system clock is not synchronised yet: capture times are recorded against the boot's monotonic clock and repaired once it is");
        }
        Arc::new(ClockWatch {
            synced: AtomicBool::new(synced),
            offset: AtomicI64::new(src.wall_ms() - src.mono_ms()),
            repair_rounds: AtomicU64::new(if synced { 2 } else { 0 }),
            src,
            jumps: AtomicU64::new(0),
            repaired: AtomicU64::new(0),
        })
    }

    pub fn boot_id(&self) -> i64 {
        self.src.boot_id()
    }

    /// Whether captures are currently taken as synchronised.
    pub fn synced(&self) -> bool {
        self.synced.load(Relaxed)
    }

    /// A capture now.
    pub fn capture(&self) -> Capture {
        Capture {
            wall_ms: self.src.wall_ms(),
            synced: self.synced.load(Relaxed),
            boot_id: self.src.boot_id(),
            mono_ms: self.src.mono_ms(),
        }
    }

    /// The router's capture clock.
    pub fn clock(self: &Arc<Self>) -> Clock {
        let me = self.clone();
        Arc::new(move || me.capture())
    }

    /// One check: synchronisation, jumps, repair.
    pub async fn check(&self, outbox: &Outbox) -> Check {
        let now_synced = self.src.synced();
        let offset = self.src.wall_ms() - self.src.mono_ms();
        let last = self.offset.swap(offset, Relaxed);
        let mut out = Check {
            synced: now_synced,
            ..Check::default()
        };
        let delta = offset - last;
        if delta.abs() > JUMP_THRESHOLD_MS {
            self.jumps.fetch_add(1, Relaxed);
            out.jump_ms = Some(delta);
            tracing::warn!(
                jump_ms = delta,
                synced = now_synced,
                "the wall clock jumped; capture times are kept on the boot's monotonic clock"
            );
        }
        let was = self.synced.swap(now_synced, Relaxed);
        if now_synced && !was {
            out.became_synced = true;
            self.repair_rounds.store(2, Relaxed);
            tracing::info!(
                "the system clock is synchronised: repairing capture times of this boot"
            );
        } else if !now_synced && was {
            tracing::warn!(
                "the system clock lost synchronisation: new captures are marked unsynchronised"
            );
        }
        if now_synced && self.repair_rounds.load(Relaxed) > 0 {
            match outbox.repair_capture(self.src.boot_id(), offset).await {
                Ok(n) => {
                    self.repair_rounds.fetch_sub(1, Relaxed);
                    out.repaired = n;
                    self.repaired.fetch_add(n, Relaxed);
                    if n > 0 {
                        tracing::info!(rows = n, "repaired capture times");
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot repair capture times"),
            }
        }
        out
    }

    /// Checks every [`CHECK_EVERY`] until shutdown.
    pub async fn run(
        self: Arc<Self>,
        outbox: Outbox,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            self.check(&outbox).await;
            tokio::select! {
                _ = tokio::time::sleep(CHECK_EVERY) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn trust_clock_reports_the_system_clock_as_synchronised() {
        let mut src = SystemTimeSource::new();
        src.trust = true;
        assert!(src.synced());
        let w = ClockWatch::with_source(Arc::new(src));
        let c = (w.clock())();
        assert!(c.synced, "captures are not marked approximate");
        assert!(c.wall_ms > 1_600_000_000_000);
    }

    use super::*;
    use crate::outbox::{Kind, NewRecord};

    fn rec(c: Capture) -> NewRecord {
        NewRecord {
            device: 7,
            kind: Kind::Event,
            key: "t".into(),
            body: "{}".into(),
            captured: c,
        }
    }

    #[tokio::test]
    async fn unsynced_captures_are_repaired_when_the_clock_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _t) = Outbox::open(dir.path(), false, Arc::new(|_| {})).unwrap();
        // Boots in 1970-ish + a bit, unsynchronised; boot 11, 5 s after boot.
        let t = ManualTime::new(86_400_000, 5_000, false, 11);
        let w = ClockWatch::with_source(t.clone());
        let c1 = w.capture();
        assert!(!c1.synced);
        assert_eq!((c1.boot_id, c1.mono_ms), (11, 5_000));
        ob.append(rec(c1)).await.unwrap();
        // A row from an older boot that never synced: never repaired.
        ob.append(rec(Capture {
            wall_ms: 1000,
            synced: false,
            boot_id: 10,
            mono_ms: 3000,
        }))
        .await
        .unwrap();
        t.advance(2_000);
        ob.append(rec(w.capture())).await.unwrap();
        assert_eq!(w.check(&ob).await.repaired, 0);
        // NTP steps the clock to the real time: wall jumps forward, mono does not.
        let real_now = 1_764_000_000_000;
        t.step_wall(real_now - t.wall_ms());
        t.synced.store(true, Relaxed);
        let c = w.check(&ob).await;
        assert!(c.became_synced && c.synced);
        assert!(c.jump_ms.is_some());
        assert_eq!(c.repaired, 2);
        assert_eq!(w.jumps.load(Relaxed), 1);
        let rows = ob.fetch(7, 0, 10).await.unwrap();
        // Row 1 was captured 2 s before "now", row 3 at "now".
        assert_eq!(rows[0].captured.wall_ms, real_now - 2_000);
        assert!(rows[0].captured.synced);
        assert_eq!(rows[1].captured.wall_ms, 1000, "older boot untouched");
        assert!(!rows[1].captured.synced);
        assert_eq!(rows[2].captured.wall_ms, real_now);
        // New captures are synchronised and true.
        t.advance(10);
        let c = w.capture();
        assert!(c.synced);
        assert_eq!(c.wall_ms, real_now + 10);
        // A second round runs once more, then no more repairs.
        assert_eq!(w.check(&ob).await.repaired, 0);
        assert_eq!(
            w.check(&ob).await,
            Check {
                synced: true,
                ..Check::default()
            }
        );
    }

    #[tokio::test]
    async fn jumps_are_detected_while_synced() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _t) = Outbox::open(dir.path(), false, Arc::new(|_| {})).unwrap();
        let t = ManualTime::new(1_764_000_000_000, 1_000, true, 3);
        let w = ClockWatch::with_source(t.clone());
        t.advance(1_000);
        assert_eq!(w.check(&ob).await.jump_ms, None);
        t.step_wall(-3_600_000);
        assert_eq!(w.check(&ob).await.jump_ms, Some(-3_600_000));
        t.advance(500);
        t.step_wall(400); // small NTP slews are not jumps
        assert_eq!(w.check(&ob).await.jump_ms, None);
        assert_eq!(w.jumps.load(Relaxed), 1);
    }

    #[test]
    fn system_source_reads_something_sane() {
        let s = SystemTimeSource::new();
        assert!(s.mono_ms() > 0);
        assert!(s.wall_ms() > 1_600_000_000_000);
        assert_eq!(s.boot_id(), SystemTimeSource::new().boot_id());
        assert!(s.boot_id() >= 0);
        let _ = s.synced();
    }
}
