//! Serial adapters: one task per `[[serial]]` port, bridging line-speaking sensors to the router
//! and writing what MODE sends them back as lines.
//!
//! A port task opens its device with tokio-serial (retrying with jittered backoff while it is
//! missing, busy or forbidden, and saying how to fix it), announces its devices to the downlink
//! as connected, reads bounded lines ([`frame`]), parses them ([`line`](mod@line)), hands events and kv
//! changes to the router, and answers numbered lines with `OK <n>` only once the outbox has
//! committed them (`ERR <n> <reason>` otherwise). One writer per open port writes acks,
//! commands and DDP changes as whole lines from bounded queues, so a sensor that stops reading
//! stalls nothing but its own queue. When the port is lost its devices are reported
//! disconnected and the task waits for it to come back. This module must not know MODE's wire
//! format beyond the command/DDP JSON the downlink hands it, speak SQL, or panic on any input.
//!
//! Files: `open` (opening a port, backing off while it cannot be opened, one session after
//! another), `session` (reading lines, answering them once committed, presence), `writer`
//! (the port's one writer of whole lines).

pub mod frame;
pub mod line;
mod open;
mod session;
mod writer;

use crate::config::{FlowControl, Parity, SerialConfig};
use crate::local::{next_conn_id, ConnId, DeviceId, DownMsg, LocalEvent, TopicKind};
use crate::metrics::Metrics;
pub use crate::metrics::SerialStats;
use crate::registry::Registry;
use crate::router::{CommitWaiter, Router};
use crate::timing::Backoff;
use frame::{Frame, LineFramer};
use line::{LineError, LineFault, Up, UpLine};
pub use open::{run_port, OpenFailure};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Everything a port task needs.
pub struct PortContext {
    pub cfg: SerialConfig,
    /// The devices that may speak on this port (from `cfg.devices`).
    pub devices: Vec<DeviceId>,
    pub registry: Arc<Registry>,
    pub router: Router,
    pub metrics: Arc<Metrics>,
    /// Presence: `Connected` + `Subscribed(dev, Command)` + `Subscribed(dev, Kv)` for each device
    /// when the port opens, `Disconnected` when it is lost.
    pub events: mpsc::Sender<LocalEvent>,
    /// Commands and DDP messages (MODE JSON) to write to this port as lines.
    pub down: mpsc::Receiver<DownMsg>,
    pub shutdown: watch::Receiver<bool>,
}

/// Counts a dropped line under its reason.
fn count_fault(stats: &SerialStats, f: LineFault) {
    match f {
        LineFault::BadUtf8 => &stats.bad_utf8,
        LineFault::BadChecksum => &stats.bad_checksum,
        LineFault::MissingChecksum => &stats.missing_checksum,
        LineFault::Parse => &stats.parse_error,
    }
    .fetch_add(1, Relaxed);
}

/// Offers a message to a port's write queue without waiting (what the downlink should call):
/// `false`, counted as `write_queue_full`, when the port's sensor is not keeping up.
pub fn offer(tx: &mpsc::Sender<DownMsg>, msg: DownMsg, stats: &SerialStats) -> bool {
    match tx.try_send(msg) {
        Ok(()) => true,
        Err(_) => {
            stats.write_queue_full.fetch_add(1, Relaxed);
            false
        }
    }
}

/// First wait after a failed open or a lost port.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Longest wait between attempts to open a port that exists but cannot be opened.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// While a port's path is missing, how often to look for it (cheap `stat`).
const PATH_POLL: Duration = Duration::from_millis(250);
/// A session shorter than this does not reset the backoff (a port that opens, then fails).
const STABLE_AFTER: Duration = Duration::from_secs(5);
/// Acks waiting for the writer, per port: room for a whole group commit's worth (the outbox
/// answers up to 4096 appends at once); beyond it the writer is stuck and acks are dropped.
const ACK_QUEUE: usize = 4096;
/// How long reading waits for room in a full ack queue before calling the writer stuck.
const ACK_WAIT: Duration = Duration::from_secs(1);
/// How long a stopping port (reload or hub stop) may take to write the answers of lines already
/// committed and the downlink lines already queued before it closes.
const STOP_FLUSH: Duration = Duration::from_secs(2);
/// Answers waiting, in line order, for an earlier line's commit.
const MAX_PENDING: usize = 8192;
/// Most ack bytes the writer gathers into one write.
const ACK_BATCH_BYTES: usize = 8 * 1024;
/// Committed or in-flight numbers remembered per device for dropping resends.
const DEDUP_WINDOW: usize = 32;
/// How long a number is remembered.
const DEDUP_TTL: Duration = Duration::from_secs(60);
/// Least time between two warnings about garbage on one port (the rest go to debug).
const NOISE_WARN_EVERY: Duration = Duration::from_secs(10);
