//! A lean MQTT 3.1.1 client connection on rumqttc's packet codec (`mqttbytes::v4`): connect,
//! frame packets in and out, and keep the connection alive: a PINGREQ only when nothing was
//! sent or nothing was heard for a keepalive (traffic both ways already proves the link, and a
//! home's sensors publish more often than the keepalive: issue 12), and no PINGRESP within a
//! keepalive ends it. Buffers are sized on demand and given back as soon as
//! they are drained, so an idle connection holds nothing beyond its socket (issue 12). It must
//! not know MODE, topics or the outbox: the session on top decides what to send and what
//! packets mean.

#[cfg(test)]
mod tests;
mod transport;

pub use rumqttc::mqttbytes::v4::{ConnAck, Connect, Login, Packet, Subscribe};
pub use rumqttc::mqttbytes::{Error as CodecError, QoS};
pub use transport::Target;

use bytes::{BufMut, BytesMut};
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use transport::{Stream, READ_CHUNK};

/// Why a connection ended or could not go on.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the server closed the connection")]
    Closed,
    #[error("network error: {0}")]
    Io(#[from] io::Error),
    #[error("bad MQTT from the server: {0:?}")]
    Codec(CodecError),
    #[error("the server sent a packet of {size} bytes, over the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("a packet of {size} bytes is over the server's limit of {limit}")]
    OutgoingTooLarge { size: usize, limit: usize },
    #[error("the server answered CONNECT with something other than CONNACK")]
    NoConnAck,
    #[error("no answer to a PINGREQ within the keepalive ({0:?}): the connection is dead")]
    PingTimeout(Duration),
}

/// What [`Conn::next`] yields.
#[derive(Debug)]
pub enum Event {
    Packet(Packet),
    /// The caller's deadline passed.
    Deadline,
}

/// Limits and timing of one connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest incoming packet (remaining length), bytes.
    pub max_incoming: usize,
    /// Largest outgoing packet, bytes.
    pub max_outgoing: usize,
    /// The keepalive (see `Conn::keepalive_due`); zero: none.
    pub keepalive: Duration,
}

/// One MQTT connection to a server.
pub struct Conn {
    stream: Stream,
    /// Received bytes not yet a whole packet (empty, no allocation, when idle).
    rbuf: BytesMut,
    /// Encoded packets not yet written.
    wbuf: BytesMut,
    limits: Limits,
    /// When a PINGREQ went out that no PINGRESP answered yet.
    ping_sent: Option<Instant>,
    /// Everything was handed to the stream, which has not flushed it all yet (TLS, WebSocket).
    flush_pending: bool,
    /// When the last bytes were written, and the last packet read.
    last_sent: Instant,
    last_heard: Instant,
    /// Fires at the earlier of `keepalive_due` and the caller's deadline.
    timer: Pin<Box<Sleep>>,
    timer_at: Instant,
}

impl Conn {
    /// Connects to `target`, sends CONNECT and waits for the CONNACK (the caller bounds the
    /// time). The CONNACK's return code is the caller's to judge.
    pub async fn open(
        target: &Target,
        connect: &Connect,
        limits: Limits,
    ) -> Result<(Conn, ConnAck), WireError> {
        let stream = Stream::connect(target).await?;
        let now = Instant::now();
        let ping_at = now + limits.keepalive;
        let mut conn = Conn {
            stream,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            // No PINGREQ before the CONNACK.
            limits: Limits {
                keepalive: Duration::ZERO,
                ..limits
            },
            ping_sent: None,
            flush_pending: false,
            last_sent: now,
            last_heard: now,
            timer: Box::pin(tokio::time::sleep_until(ping_at)),
            timer_at: ping_at,
        };
        conn.send(&Packet::Connect(connect.clone()))?;
        loop {
            match conn.next(None).await? {
                Event::Packet(Packet::ConnAck(ack)) => {
                    conn.limits = limits;
                    conn.last_heard = Instant::now();
                    return Ok((conn, ack));
                }
                Event::Packet(_) => return Err(WireError::NoConnAck),
                Event::Deadline => {}
            }
        }
    }

    /// Queues `packet` (written by the next [`Conn::next`]).
    pub fn send(&mut self, packet: &Packet) -> Result<(), WireError> {
        match packet.write(&mut self.wbuf, self.limits.max_outgoing) {
            Ok(_) => Ok(()),
            Err(CodecError::OutgoingPacketTooLarge { pkt_size, max }) => {
                Err(WireError::OutgoingTooLarge {
                    size: pkt_size,
                    limit: max,
                })
            }
            Err(e) => Err(WireError::Codec(e)),
        }
    }

    /// Queues a QoS 1 PUBLISH, encoded straight from borrowed parts (no packet built).
    pub fn send_publish_qos1(
        &mut self,
        pkid: u16,
        topic: &str,
        payload: &[u8],
    ) -> Result<(), WireError> {
        let remaining = 2 + topic.len() + 2 + payload.len();
        let size = 1 + remaining_len_len(remaining) + remaining;
        if size > self.limits.max_outgoing || topic.len() > u16::MAX as usize {
            return Err(WireError::OutgoingTooLarge {
                size,
                limit: self.limits.max_outgoing,
            });
        }
        let w = &mut self.wbuf;
        w.reserve(size);
        w.put_u8(0x32); // PUBLISH, QoS 1, no DUP, no RETAIN
        let mut len = remaining;
        loop {
            let mut b = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                b |= 0x80;
            }
            w.put_u8(b);
            if len == 0 {
                break;
            }
        }
        w.put_u16(topic.len() as u16);
        w.put_slice(topic.as_bytes());
        w.put_u16(pkid);
        w.put_slice(payload);
        Ok(())
    }

    /// Writes what is queued, reads and keeps the connection alive until a packet arrives or
    /// `deadline` passes. Cancel-safe: bytes read or written stay accounted for in the buffers.
    pub async fn next(&mut self, deadline: Option<Instant>) -> Result<Event, WireError> {
        poll_fn(|cx| loop {
            if let Some(p) = self.decode()? {
                return Poll::Ready(Ok(Event::Packet(p)));
            }
            if !self.wbuf.is_empty() || self.flush_pending {
                match self.stream.poll_write_from(cx, &mut self.wbuf) {
                    Poll::Ready(r) => {
                        r?;
                        self.flush_pending = false;
                        self.last_sent = Instant::now();
                        // Buffers exist only while they hold bytes.
                        self.wbuf = BytesMut::new();
                    }
                    Poll::Pending => self.flush_pending = true,
                }
            }
            let want = match rumqttc::mqttbytes::check(self.rbuf.iter(), self.limits.max_incoming) {
                Err(CodecError::InsufficientBytes(n)) if !self.rbuf.is_empty() => n.max(64),
                _ => READ_CHUNK,
            };
            match self.stream.poll_read_into(cx, &mut self.rbuf, want) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(WireError::Closed)),
                Poll::Ready(Ok(_)) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Pending => {}
            }
            let keepalive = self.keepalive_due();
            let wake_at = match (deadline, keepalive) {
                (Some(d), Some(k)) => d.min(k),
                (Some(d), None) => d,
                (None, Some(k)) => k,
                (None, None) => return Poll::Pending,
            };
            if wake_at != self.timer_at {
                self.timer.as_mut().reset(wake_at);
                self.timer_at = wake_at;
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            if keepalive.is_some_and(|k| k <= now) {
                if self.ping_sent.is_some() {
                    return Poll::Ready(Err(WireError::PingTimeout(self.limits.keepalive)));
                }
                self.ping_sent = Some(now);
                self.send(&Packet::PingReq)?;
                continue;
            }
            if deadline.is_some_and(|d| d <= now) {
                return Poll::Ready(Ok(Event::Deadline));
            }
        })
        .await
    }

    /// When the keepalive acts next (`None`: no keepalive): the PINGREQ in flight times out a
    /// keepalive after it went; otherwise a PINGREQ goes a keepalive after the older of the last
    /// write and the last packet read. The MQTT rule (a packet sent at least every keepalive)
    /// holds, and a link that only carries one way (a half-open connection still taking our
    /// publishes) is found within two keepalives, as with a PINGREQ every keepalive.
    fn keepalive_due(&self) -> Option<Instant> {
        let k = self.limits.keepalive;
        if k.is_zero() {
            return None;
        }
        Some(match self.ping_sent {
            Some(at) => at + k,
            None => self.last_sent.min(self.last_heard) + k,
        })
    }

    /// One whole packet out of the read buffer, if there is one.
    fn decode(&mut self) -> Result<Option<Packet>, WireError> {
        if self.rbuf.is_empty() {
            return Ok(None);
        }
        match Packet::read(&mut self.rbuf, self.limits.max_incoming) {
            Ok(p) => {
                if self.rbuf.is_empty() {
                    // Buffers exist only while they hold bytes: an idle connection keeps no
                    // room for what may come (one small allocation per drained read instead).
                    self.rbuf = BytesMut::new();
                }
                self.last_heard = Instant::now();
                if matches!(p, Packet::PingResp) {
                    self.ping_sent = None;
                }
                Ok(Some(p))
            }
            Err(CodecError::InsufficientBytes(_)) => Ok(None),
            Err(CodecError::PayloadSizeLimitExceeded(size)) => Err(WireError::TooLarge {
                size,
                limit: self.limits.max_incoming,
            }),
            Err(e) => Err(WireError::Codec(e)),
        }
    }

    /// Bytes held by the buffers.
    #[cfg(test)]
    pub fn buffered_capacity(&self) -> usize {
        self.rbuf.capacity() + self.wbuf.capacity()
    }

    /// Sends DISCONNECT and ends the stream (best effort; the caller bounds the time).
    pub async fn close(mut self) {
        let _ = self.send(&Packet::Disconnect);
        let _ = poll_fn(|cx| self.stream.poll_write_from(cx, &mut self.wbuf)).await;
        self.stream.shutdown().await;
    }
}

fn remaining_len_len(len: usize) -> usize {
    match len {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}
