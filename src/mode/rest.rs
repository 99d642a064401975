//! One device's REST + WebSocket session with MODE, for networks that allow only HTTPS.
//!
//! Events go as `PUT /devices/{id}/event` (204 = delivered), kv changes as
//! `PUT /devices/{id}/kv/{key}` `{"value":V}` and `DELETE /devices/{id}/kv/{key}`, commands arrive
//! as text frames on the WebSocket `/devices/{id}/command`, and the kv store is read with
//! `GET /devices/{id}/kv` on every (re)connect and handed up as a `reload` without revision. One
//! request is in flight at a time, so MODE sees a device's messages in outbox order. `429`
//! waits for `Retry-After` and sends the same request again; a transient failure (5xx, network)
//! is retried a few times before the session ends. All devices share one pooled HTTP client.
//! The session pings the WebSocket every 30 s and ends when a pong does not come back. This
//! module must not decide what to send or keep anything across sessions.

use super::{ConnectError, SessionConfig, SessionEvent, Stamping};
use crate::config::Secret;
use crate::local::{Kind, Row};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How often the WebSocket is pinged; a ping whose pong has not come back by the next one
/// ends the session.
pub const WS_PING_EVERY: Duration = Duration::from_secs(30);
const HTTP_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Transient failures of one request before the session is declared lost.
const MAX_RETRIES: u32 = 3;

/// The pooled HTTP client every device shares (keep-alive connections are reused).
pub fn http_client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("modehub/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("the HTTP client's configuration is static")
    })
}

/// `Authorization` header value.
fn auth(key: &Secret) -> String {
    format!("ModeCloud {}", key.expose())
}

/// The `reason` of a MODE error body, or the status text.
pub(crate) fn reason_of(status: reqwest::StatusCode, body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct E {
        reason: Option<String>,
    }
    serde_json::from_slice::<E>(body)
        .ok()
        .and_then(|e| e.reason)
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("UNKNOWN").to_string())
}

/// One request that can be sent again.
#[derive(Clone)]
struct Request {
    row: i64,
    method: reqwest::Method,
    url: String,
    body: Option<Vec<u8>>,
}

enum Outcome {
    Done,
    Refused { status: u16, reason: String },
    Throttled(Duration),
    Transient(String),
}

type Pending = Pin<Box<dyn Future<Output = Outcome> + Send>>;

pub struct Session {
    base: String,
    mode_id: u64,
    auth: String,
    ws: Ws,
    /// The request in flight, and how often it was tried.
    current: Option<(Request, u32)>,
    pending: Option<Pending>,
    /// When set, the current request waits until then (429 or a retry backoff).
    resume_at: Option<tokio::time::Instant>,
    queued: VecDeque<SessionEvent>,
    ping: tokio::time::Interval,
    awaiting_pong: bool,
}

impl Session {
    /// Checks the key, opens the command WebSocket, and reads the kv store.
    pub async fn connect(
        cfg: &SessionConfig,
        mode_id: u64,
        key: &Secret,
    ) -> Result<Session, ConnectError> {
        let base = cfg.api_url.trim_end_matches('/').to_string();
        let auth = auth(key);
        let client = http_client();
        let transport = |e: reqwest::Error| ConnectError::Transport(format!("{base}: {e}"));
        // The kv store first: it also proves the key works for this device.
        let resp = client
            .get(format!("{base}/devices/{mode_id}/kv"))
            .header("Authorization", &auth)
            .send()
            .await
            .map_err(transport)?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(transport)?;
        if !status.is_success() {
            let reason = reason_of(status, &body);
            return Err(match status.as_u16() {
                401 | 403 => ConnectError::Refused {
                    auth: status.as_u16() == 401 || reason == "PERMISSION_DENIED",
                    detail: format!("{status} {reason}"),
                },
                _ => ConnectError::Transport(format!("GET kv: {status} {reason}")),
            });
        }
        let reload = reload_from_rest(&body)
            .map_err(|e| ConnectError::Transport(format!("GET kv answered {e}")))?;

        let ws_url = if let Some(rest) = base.strip_prefix("https://") {
            format!("wss://{rest}/devices/{mode_id}/command")
        } else if let Some(rest) = base.strip_prefix("http://") {
            format!("ws://{rest}/devices/{mode_id}/command")
        } else {
            return Err(ConnectError::Transport(format!(
                "cloud.api_url `{base}` must start with http:// or https://"
            )));
        };
        let mut req = ws_url
            .as_str()
            .into_client_request()
            .map_err(|e| ConnectError::Transport(format!("{ws_url}: {e}")))?;
        req.headers_mut().insert(
            "Authorization",
            auth.parse()
                .map_err(|_| ConnectError::Transport("the API key is not a valid header".into()))?,
        );
        let (ws, _) = tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(req))
            .await
            .map_err(|_| ConnectError::Timeout(CONNECT_TIMEOUT))?
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(r)
                    if matches!(r.status().as_u16(), 401 | 403) =>
                {
                    ConnectError::Refused {
                        auth: r.status().as_u16() == 401,
                        detail: format!("command WebSocket: {}", r.status()),
                    }
                }
                other => ConnectError::Transport(format!("command WebSocket {ws_url}: {other}")),
            })?;
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + WS_PING_EVERY, WS_PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut queued = VecDeque::new();
        queued.push_back(SessionEvent::Kv(Bytes::from(reload)));
        Ok(Session {
            base,
            mode_id,
            auth,
            ws,
            current: None,
            pending: None,
            resume_at: None,
            queued,
            ping,
            awaiting_pong: false,
        })
    }

    /// The `reload` read at connect, if not yet taken.
    pub fn take_initial_kv(&mut self) -> Option<Bytes> {
        match self.queued.front() {
            Some(SessionEvent::Kv(_)) => match self.queued.pop_front() {
                Some(SessionEvent::Kv(b)) => Some(b),
                _ => None,
            },
            _ => None,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.current.is_some() as usize
    }

    /// Starts sending `row`. One at a time: the caller waits for its answer.
    pub fn send(&mut self, row: &Row, stamping: &Stamping) -> Result<(), String> {
        if self.current.is_some() {
            return Err("a request is already in flight".into());
        }
        let (method, url, body) = match row.kind {
            Kind::Event => {
                let mut buf = Vec::with_capacity(row.body.len() + 96);
                super::upstream_message(row, stamping, &mut buf);
                (
                    reqwest::Method::PUT,
                    format!("{}/devices/{}/event", self.base, self.mode_id),
                    Some(buf),
                )
            }
            Kind::KvSet => {
                let mut buf = Vec::with_capacity(row.body.len() + 12);
                buf.extend_from_slice(b"{\"value\":");
                buf.extend_from_slice(row.body.as_bytes());
                buf.push(b'}');
                (
                    reqwest::Method::PUT,
                    format!(
                        "{}/devices/{}/kv/{}",
                        self.base,
                        self.mode_id,
                        url_segment(&row.key)
                    ),
                    Some(buf),
                )
            }
            Kind::KvDelete => (
                reqwest::Method::DELETE,
                format!(
                    "{}/devices/{}/kv/{}",
                    self.base,
                    self.mode_id,
                    url_segment(&row.key)
                ),
                None,
            ),
        };
        let req = Request {
            row: row.id,
            method,
            url,
            body,
        };
        self.pending = Some(self.start(&req));
        self.current = Some((req, 1));
        Ok(())
    }

    fn start(&self, req: &Request) -> Pending {
        let mut b = http_client()
            .request(req.method.clone(), &req.url)
            .header("Authorization", &self.auth);
        if let Some(body) = &req.body {
            b = b
                .header("Content-Type", "application/json")
                .body(body.clone());
        }
        Box::pin(async move {
            let resp = match b.send().await {
                Ok(r) => r,
                Err(e) => return Outcome::Transient(e.to_string()),
            };
            let status = resp.status();
            if status.is_success() {
                return Outcome::Done;
            }
            let retry_after = resp
                .headers()
                .get("Retry-After")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            let body = resp.bytes().await.unwrap_or_default();
            let reason = reason_of(status, &body);
            match status.as_u16() {
                429 => Outcome::Throttled(Duration::from_secs(retry_after.unwrap_or(5).max(1))),
                500..=599 | 408 => Outcome::Transient(format!("{status} {reason}")),
                s => Outcome::Refused { status: s, reason },
            }
        })
    }

    pub async fn next(&mut self) -> SessionEvent {
        loop {
            if let Some(ev) = self.queued.pop_front() {
                return ev;
            }
            let resume = self.resume_at;
            tokio::select! {
                outcome = async {
                    match self.pending.as_mut() {
                        Some(p) => p.await,
                        None => std::future::pending().await,
                    }
                }, if resume.is_none() => {
                    self.pending = None;
                    let (req, tries) = self.current.take().expect("a pending request has a row");
                    match outcome {
                        Outcome::Done => return SessionEvent::Acked(req.row),
                        Outcome::Refused { status, reason } => {
                            let permanent = !matches!(status, 401 | 403 | 404 | 409 | 423);
                            return SessionEvent::Rejected { row: req.row, status, reason, permanent };
                        }
                        Outcome::Throttled(d) => {
                            self.resume_at = Some(tokio::time::Instant::now() + d);
                            self.current = Some((req, tries));
                            return SessionEvent::Throttled(d);
                        }
                        Outcome::Transient(e) => {
                            if tries >= MAX_RETRIES {
                                return SessionEvent::Closed(format!("MODE did not take a message after {tries} tries: {e}"));
                            }
                            tracing::debug!(error = %e, tries, "REST request failed; retrying");
                            let wait = Duration::from_millis(500 * (1 << tries) + fastrand::u64(0..250));
                            self.resume_at = Some(tokio::time::Instant::now() + wait);
                            self.current = Some((req, tries + 1));
                        }
                    }
                }
                _ = async {
                    match resume {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.resume_at = None;
                    if let Some((req, _)) = &self.current {
                        self.pending = Some(self.start(req));
                    }
                }
                msg = self.ws.next() => match msg {
                    Some(Ok(Message::Text(t))) => {
                        return SessionEvent::Command(Bytes::copy_from_slice(t.as_bytes()));
                    }
                    Some(Ok(Message::Binary(b))) => return SessionEvent::Command(b),
                    Some(Ok(Message::Pong(_))) => self.awaiting_pong = false,
                    Some(Ok(Message::Close(f))) => {
                        return SessionEvent::Closed(format!("MODE closed the command WebSocket ({f:?})"));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return SessionEvent::Closed(format!("command WebSocket: {e}")),
                    None => return SessionEvent::Closed("command WebSocket ended".into()),
                },
                _ = self.ping.tick() => {
                    if self.awaiting_pong {
                        return SessionEvent::Closed(format!("no WebSocket pong within {WS_PING_EVERY:?}"));
                    }
                    self.awaiting_pong = true;
                    let ts = format!("ts={}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0));
                    if let Err(e) = self.ws.send(Message::Ping(Bytes::from(ts))).await {
                        return SessionEvent::Closed(format!("command WebSocket: {e}"));
                    }
                }
            }
        }
    }

    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_millis(500), self.ws.close(None)).await;
    }
}

/// Percent-encodes a kv key for a URL path (keys are `[A-Za-z0-9_-]`, so this is a safeguard).
fn url_segment(key: &str) -> String {
    url::form_urlencoded::byte_serialize(key.as_bytes()).collect()
}

/// `GET /devices/{id}/kv` answers `[{"key","value","modificationTime"}]`: turn it into a
/// revision-less `reload` for the mirror.
fn reload_from_rest(body: &[u8]) -> Result<Vec<u8>, String> {
    #[derive(serde::Deserialize)]
    struct Item<'a> {
        key: String,
        #[serde(borrow)]
        value: &'a serde_json::value::RawValue,
    }
    let items: Vec<Item> = serde_json::from_slice(body)
        .map_err(|e| format!("something that is not a kv list: {e}"))?;
    let mut out = Vec::with_capacity(body.len() + 32);
    out.extend_from_slice(b"{\"action\":\"reload\",\"items\":[");
    for (i, it) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"key\":");
        serde_json::to_writer(&mut out, &it.key).expect("writing to a Vec cannot fail");
        out.extend_from_slice(b",\"value\":");
        out.extend_from_slice(it.value.get().as_bytes());
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_kv_list_becomes_a_revisionless_reload() {
        let r = reload_from_rest(
            br#"[{"key":"a","value":{"x":1},"modificationTime":"t"},{"key":"b","value":2}]"#,
        )
        .unwrap();
        match super::super::parse_kv(&r).unwrap() {
            crate::local::KvChange::Reload { rev, items } => {
                assert_eq!(rev, None);
                assert_eq!(
                    items,
                    vec![("a".into(), r#"{"x":1}"#.into()), ("b".into(), "2".into())]
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(reload_from_rest(b"{}").is_err());
    }
}
