//! The port's one writer: acks first, then commands and DDP changes, each as a whole line from
//! bounded queues, so a sensor that stops reading stalls only its own port. It must not read.

use super::*;

/// Writes acks (first) and downlink messages as whole lines; returns the error that ended it.
pub(super) struct Writer {
    pub(super) registry: Arc<Registry>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) devices: Vec<DeviceId>,
    pub(super) format: crate::config::LineFormat,
    pub(super) checksum: bool,
    pub(super) port: String,
}

impl Writer {
    pub(super) async fn run<W: AsyncWrite>(
        self,
        wr: W,
        down: &mut mpsc::Receiver<DownMsg>,
        mut acks: mpsc::Receiver<Vec<u8>>,
    ) -> std::io::Error {
        tokio::pin!(wr);
        let stats = &self.metrics.serial;
        let mut down_open = true;
        let mut out: Vec<u8> = Vec::with_capacity(512);
        loop {
            out.clear();
            let (lines, from_down) = tokio::select! {
                biased;
                a = acks.recv() => match a {
                    Some(bytes) => {
                        out = bytes;
                        let mut lines = 1;
                        while out.len() < ACK_BATCH_BYTES {
                            match acks.try_recv() {
                                Ok(more) => { out.extend_from_slice(&more); lines += 1; }
                                Err(_) => break,
                            }
                        }
                        (lines, false)
                    }
                    None => {
                        // The reader stopped (the port is closing): write the downlink lines
                        // already queued, they were counted as delivered.
                        while let Ok(m) = down.try_recv() {
                            out.clear();
                            if let Some(n) = self.encode(&m, &mut out) {
                                if wr.write_all(&out).await.is_err() {
                                    break;
                                }
                                stats.lines_written.fetch_add(n as u64, Relaxed);
                            }
                        }
                        let _ = wr.flush().await;
                        return std::io::Error::other("the reader stopped");
                    }
                },
                m = down.recv(), if down_open => match m {
                    Some(m) => match self.encode(&m, &mut out) {
                        Some(n) => (n, true),
                        None => continue,
                    },
                    None => { down_open = false; continue }
                },
            };
            if let Err(e) = wr.write_all(&out).await {
                if from_down {
                    stats.write_failed.fetch_add(1, Relaxed);
                }
                return e;
            }
            stats.lines_written.fetch_add(lines as u64, Relaxed);
        }
    }

    pub(super) fn encode(&self, m: &DownMsg, out: &mut Vec<u8>) -> Option<usize> {
        let stats = &self.metrics.serial;
        if !self.devices.contains(&m.dev) || m.dev >= self.registry.len() {
            stats.down_bad_payload.fetch_add(1, Relaxed);
            tracing::warn!(port = %self.port, device = m.dev, "a downlink message for a device not on this port was dropped");
            return None;
        }
        let name = &self.registry.get(m.dev).name;
        match line::encode_down(name, m.kind, &m.payload, self.format, self.checksum, out) {
            Ok(n) => Some(n),
            Err(e) => {
                stats.down_bad_payload.fetch_add(1, Relaxed);
                tracing::warn!(port = %self.port, device = %name, error = %e, "a downlink message could not be written as a line");
                None
            }
        }
    }
}
