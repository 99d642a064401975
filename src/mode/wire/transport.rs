//! The byte stream under an MQTT client connection: TCP, TLS over TCP, or MQTT over WebSocket
//! (binary frames, subprotocol `mqtt`), with or without TLS. It moves bytes between the socket
//! and the connection's buffers, reserving read room only once the socket has something to
//! read (so an idle plain-TCP connection holds no read buffer). It must not know MQTT packets.

use bytes::{Buf, BytesMut};
use futures_util::{Sink, Stream as _};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Where to connect and how.
#[derive(Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    /// TLS with this configuration (`mqtts://`, `wss://`).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// MQTT over WebSocket at this path (`ws://`, `wss://`).
    pub ws_path: Option<String>,
}

/// An open byte stream to the server.
pub enum Stream {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Ws(Box<WebSocketStream<MaybeTlsStream<TcpStream>>>),
}

/// Read room reserved at a time when nothing says how much is coming (a partial packet says
/// exactly). Small: an idle session's read buffer is mostly a PINGRESP.
pub const READ_CHUNK: usize = 512;

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl Stream {
    /// Opens the TCP connection, then TLS and the WebSocket handshake as the target asks.
    pub async fn connect(t: &Target) -> io::Result<Stream> {
        let tcp = TcpStream::connect((t.host.as_str(), t.port)).await?;
        // Each packet is written whole, and PUBACK latency matters more than segment count.
        tcp.set_nodelay(true)?;
        match (&t.ws_path, &t.tls) {
            (None, None) => Ok(Stream::Tcp(tcp)),
            (None, Some(cfg)) => {
                let name = rustls::pki_types::ServerName::try_from(t.host.clone())
                    .map_err(|e| other(format!("{:?} is not a TLS server name: {e}", t.host)))?;
                let tls = tokio_rustls::TlsConnector::from(Arc::clone(cfg))
                    .connect(name, tcp)
                    .await?;
                Ok(Stream::Tls(Box::new(tls)))
            }
            (Some(path), tls) => {
                let host = if t.host.contains(':') {
                    format!("[{}]", t.host)
                } else {
                    t.host.clone()
                };
                let scheme = if tls.is_some() { "wss" } else { "ws" };
                let mut req = format!("{scheme}://{host}:{}{path}", t.port)
                    .into_client_request()
                    .map_err(other)?;
                req.headers_mut().insert(
                    "Sec-WebSocket-Protocol",
                    tungstenite::http::HeaderValue::from_static("mqtt"),
                );
                let connector = match tls {
                    Some(cfg) => tokio_tungstenite::Connector::Rustls(Arc::clone(cfg)),
                    None => tokio_tungstenite::Connector::Plain,
                };
                // tungstenite's default buffers are 128 KiB each; MQTT packets are framed by
                // the connection's own buffer, so small ones do here.
                let ws_cfg = tungstenite::protocol::WebSocketConfig::default()
                    .read_buffer_size(4096)
                    .write_buffer_size(0);
                let (ws, resp) = tokio_tungstenite::client_async_tls_with_config(
                    req,
                    tcp,
                    Some(ws_cfg),
                    Some(connector),
                )
                .await
                .map_err(other)?;
                let proto = resp
                    .headers()
                    .get("Sec-WebSocket-Protocol")
                    .and_then(|v| v.to_str().ok())
                    .map(str::trim);
                if proto != Some("mqtt") {
                    return Err(other(format!(
                        "the WebSocket server did not accept the subprotocol mqtt (it answered {proto:?}): check the URL's path"
                    )));
                }
                Ok(Stream::Ws(Box::new(ws)))
            }
        }
    }

    /// Reads what is there into `buf` (reserving `want` bytes of room first, once there is
    /// something to read); `Ok(0)` is the end of the stream.
    pub fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        want: usize,
    ) -> Poll<io::Result<usize>> {
        match self {
            Stream::Tcp(s) => loop {
                ready!(s.poll_read_ready(cx))?;
                buf.reserve(want);
                match s.try_read_buf(buf) {
                    Ok(n) => return Poll::Ready(Ok(n)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // A stale readiness: keep no room while waiting for the real one.
                        if buf.is_empty() {
                            *buf = BytesMut::new();
                        }
                        continue;
                    }
                    Err(e) => return Poll::Ready(Err(e)),
                }
            },
            Stream::Tls(s) => {
                buf.reserve(want);
                tokio_util::io::poll_read_buf(Pin::new(&mut **s), cx, buf)
            }
            Stream::Ws(s) => loop {
                match ready!(Pin::new(&mut **s).poll_next(cx)) {
                    None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(0)),
                    Some(Ok(Message::Binary(b))) if !b.is_empty() => {
                        buf.extend_from_slice(&b);
                        return Poll::Ready(Ok(b.len()));
                    }
                    // Pings are answered by tungstenite; text is not MQTT.
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Poll::Ready(Err(other(e))),
                }
            },
        }
    }

    /// Writes all of `buf` (advancing it) and flushes.
    pub fn poll_write_from(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<()>> {
        match self {
            Stream::Tcp(s) => poll_write_all(Pin::new(s), cx, buf),
            Stream::Tls(s) => poll_write_all(Pin::new(&mut **s), cx, buf),
            Stream::Ws(s) => {
                let mut s = Pin::new(&mut **s);
                if !buf.is_empty() {
                    ready!(s.as_mut().poll_ready(cx)).map_err(other)?;
                    let frame = buf.split().freeze();
                    s.as_mut()
                        .start_send(Message::Binary(frame))
                        .map_err(other)?;
                }
                s.poll_flush(cx).map_err(other)
            }
        }
    }

    /// Ends the stream politely (TLS close_notify, WebSocket close frame, TCP FIN).
    pub async fn shutdown(&mut self) {
        match self {
            Stream::Tcp(s) => {
                let _ = s.shutdown().await;
            }
            Stream::Tls(s) => {
                let _ = s.shutdown().await;
            }
            Stream::Ws(s) => {
                let _ = s.close(None).await;
            }
        }
    }
}

fn poll_write_all<W: AsyncWrite + ?Sized>(
    mut w: Pin<&mut W>,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<()>> {
    while !buf.is_empty() {
        let n = ready!(w.as_mut().poll_write(cx, buf.chunk()))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        buf.advance(n);
    }
    w.poll_flush(cx)
}
