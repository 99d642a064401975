//! Opening a port: the builder from the config, why an open failed (said so an operator can fix
//! it), and the port task's loop of open, session, back off. It must not parse lines.

use super::session::{End, Noise, Port};
use super::*;

/// Why an open failed, for the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenFailure {
    /// The path does not exist (unplugged, not enumerated yet, wrong by-id path).
    Missing,
    /// The hub's user may not open it.
    Permission,
    /// Another process holds it (TIOCEXCL or a lock).
    Busy,
    /// Anything else (not a tty, unsupported settings...).
    Other,
}

impl OpenFailure {
    /// Classifies a tokio-serial open error.
    pub fn of(e: &tokio_serial::Error) -> OpenFailure {
        use std::io::ErrorKind as Io;
        use tokio_serial::ErrorKind as K;
        match e.kind() {
            K::Io(Io::NotFound) => OpenFailure::Missing,
            K::Io(Io::PermissionDenied) => OpenFailure::Permission,
            K::NoDevice => OpenFailure::Busy,
            _ => OpenFailure::Other,
        }
    }

    /// How to fix it.
    pub fn fix(self, port: &str) -> String {
        match self {
            OpenFailure::Missing => format!(
                "plug the adapter in or correct the path (stable names: `ls -l /dev/serial/by-id/`); \
                 the hub keeps looking for {port} and opens it when it appears"
            ),
            OpenFailure::Permission => format!(
                "add the service user to the dialout group: `sudo usermod -aG dialout modehub` and restart \
                 the service (or set SupplementaryGroups=dialout in the unit); check with `ls -l {port}`"
            ),
            OpenFailure::Busy => format!(
                "another process holds {port}: find it with `sudo fuser -v {port}` and stop it \
                 (a serial console, another modehub; ModemManager probes USB serial adapters: \
                 `sudo systemctl disable --now ModemManager`)"
            ),
            OpenFailure::Other => format!(
                "check that {port} is a serial device and that baud, data_bits, parity, stop_bits and \
                 flow_control suit it"
            ),
        }
    }
}

pub(super) fn builder(cfg: &SerialConfig) -> tokio_serial::SerialPortBuilder {
    use tokio_serial::{DataBits, FlowControl as F, Parity as P, StopBits};
    tokio_serial::new(cfg.port.to_string_lossy(), cfg.baud)
        .data_bits(match cfg.data_bits {
            5 => DataBits::Five,
            6 => DataBits::Six,
            7 => DataBits::Seven,
            _ => DataBits::Eight,
        })
        .parity(match cfg.parity {
            Parity::None => P::None,
            Parity::Odd => P::Odd,
            Parity::Even => P::Even,
        })
        .stop_bits(if cfg.stop_bits == 2 {
            StopBits::Two
        } else {
            StopBits::One
        })
        .flow_control(match cfg.flow_control {
            FlowControl::None => F::None,
            FlowControl::Software => F::Software,
            FlowControl::Hardware => F::Hardware,
        })
}

/// Runs one port until shutdown: opens it (retrying with backoff), reads lines, writes lines.
pub async fn run_port(ctx: PortContext) {
    let PortContext {
        cfg,
        devices,
        registry,
        router,
        metrics,
        events,
        mut down,
        shutdown,
    } = ctx;
    let port = cfg.port.display().to_string();
    let mut task = Port {
        port: port.clone(),
        cfg,
        devices,
        registry,
        router,
        metrics,
        noise: Noise::default(),
        windows: HashMap::new(),
        writer_stuck: false,
    };
    if task.devices.is_empty() {
        tracing::warn!(%port, "serial port has no known devices; not opening it");
        shutdown.cancelled().await;
        return;
    }
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    let mut failures: u64 = 0;
    let mut last_failure: Option<OpenFailure> = None;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        // Whether the port's path was seen missing since the last attempt: once it has been,
        // its reappearance (a replug, a re-enumeration) ends the wait at once.
        // open() and tcsetattr() are blocking calls (a USB adapter may take a moment).
        let b = builder(&task.cfg);
        let opened = tokio::task::spawn_blocking(move || tokio_serial::SerialStream::open(&b))
            .await
            .unwrap_or_else(|e| {
                Err(tokio_serial::Error::new(
                    tokio_serial::ErrorKind::Unknown,
                    e.to_string(),
                ))
            });
        let mut saw_missing = match opened {
            Ok(stream) => {
                if failures > 0 {
                    tracing::info!(%port, failed_attempts = failures, "serial port is back");
                }
                failures = 0;
                last_failure = None;
                let opened = Instant::now();
                let gone = match task.session(stream, &mut down, &events, &shutdown).await {
                    End::Shutdown => return,
                    End::Lost { why, gone } => {
                        task.metrics.serial.port_lost.fetch_add(1, Relaxed);
                        tracing::warn!(%port, error = %why, "serial port lost; its devices are disconnected until it comes back");
                        gone
                    }
                };
                if opened.elapsed() >= STABLE_AFTER {
                    backoff.reset();
                }
                gone
            }
            Err(e) => {
                failures += 1;
                task.metrics.serial.port_open_failures.fetch_add(1, Relaxed);
                let kind = OpenFailure::of(&e);
                if last_failure != Some(kind) {
                    tracing::warn!(%port, error = %e.description, fix = %kind.fix(&port), "cannot open serial port; retrying");
                } else {
                    tracing::debug!(%port, error = %e.description, attempt = failures, "serial port still cannot be opened");
                }
                last_failure = Some(kind);
                kind == OpenFailure::Missing
            }
        };
        let delay = backoff.next_delay();
        let path = &task.cfg.port;
        let sleep = async {
            // Watch the path (a cheap stat) rather than hammering open(): a port that went away
            // is picked up as soon as it is back, one that stays broken waits out its backoff.
            let deadline = Instant::now() + delay;
            while Instant::now() < deadline {
                if !path.exists() {
                    saw_missing = true;
                } else if saw_missing {
                    // udev may still be setting permissions on a fresh node.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    return;
                }
                tokio::time::sleep(
                    PATH_POLL.min(deadline.saturating_duration_since(Instant::now())),
                )
                .await;
            }
        };
        tokio::select! {
            _ = sleep => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
