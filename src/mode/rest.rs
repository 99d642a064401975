//! One device's REST + WebSocket session with MODE, the fallback for networks that allow only
//! HTTPS (MQTT over `wss://` is the better one: it keeps kv push).
//!
//! Events go as `PUT /devices/{id}/event` (204 = delivered), kv changes as
//! `PUT /devices/{id}/kv/{key}` `{"value":V}` and `DELETE /devices/{id}/kv/{key}`, commands arrive
//! as text frames on the WebSocket `/devices/{id}/command`, and the kv store is read with
//! `GET /devices/{id}/kv` on every (re)connect and handed up as a `reload` without revision.
//! MODE documents kv REST for applications, not for device keys: when MODE refuses the kv
//! read, kv is degraded for the session (reported in [`KvHealth`]; refused kv writes go to the
//! dead letters) and the device's events and commands never wait for it. When the read worked,
//! a refused kv write means something else (a deactivated home, say) and is held like an event. REST never hears kv changes made in the cloud
//! during a session: they arrive with the next session's read. A delete of a key MODE does not
//! have (404) is done. One request is in flight at a time, so MODE sees a device's messages in
//! outbox order. `429` waits for `Retry-After` and sends the same request again; a transient
//! failure (5xx, network) is retried a few times before the session ends; any other 4xx that
//! sending again cannot fix is reported permanent (dead letters). All devices share one pooled
//! HTTP client. The session pings the WebSocket every 30 s and ends when a pong does not come
//! back. This module must not decide what to send or keep anything across sessions.

use super::{ConnectError, KvHealth, SessionConfig, SessionEvent, Stamping};
use crate::config::Secret;
use crate::local::{Kind, Row};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
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

/// What a refusal (a 4xx other than 408 and 429) means for the row that got it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Nothing left to do: deleting a key MODE does not have.
    Done,
    /// kv over REST is not allowed for this device key: the row is dropped to the dead
    /// letters and kv is marked degraded; events and commands go on.
    KvRefused,
    /// The row may go through later (a key, permission or home problem that an operator or
    /// MODE fixes): the uplink holds the device and retries.
    Hold,
    /// Sending it again can never work (bad request, too large...): dead letters.
    Permanent,
}

/// Decides by HTTP status (MODE's `reason` values are not documented for device calls).
/// `kv_readable`: this session's `GET kv` worked, so kv REST is allowed to this key and a
/// refused kv write means something else (a deactivated home, say): it is held like an event.
fn verdict(kind: Kind, status: u16, kv_readable: bool) -> Verdict {
    match (kind, status) {
        (Kind::KvDelete, 404 | 410) => Verdict::Done,
        (Kind::KvSet | Kind::KvDelete, 401 | 403 | 404 | 405) if !kv_readable => Verdict::KvRefused,
        (_, 401 | 403 | 404 | 409 | 423) => Verdict::Hold,
        _ => Verdict::Permanent,
    }
}

/// One request that can be sent again.
#[derive(Clone)]
struct Request {
    row: i64,
    kind: Kind,
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
    mode_id: crate::local::ModeId,
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
    /// Where kv refusals are reported (kept across sessions by the caller).
    kv: Arc<KvHealth>,
    /// This session's `GET kv` worked (kv REST is allowed to this device key).
    kv_readable: bool,
}

impl Session {
    /// Checks the key, opens the command WebSocket, and reads the kv store.
    pub async fn connect(
        cfg: &SessionConfig,
        mode_id: crate::local::ModeId,
        key: &Secret,
        kv: Arc<KvHealth>,
    ) -> Result<Session, ConnectError> {
        let base = cfg.api_url.trim_end_matches('/').to_string();
        let auth = auth(key);
        let client = http_client();
        let transport = |e: reqwest::Error| ConnectError::Transport(format!("{base}: {e}"));
        // The kv store first. A refusal degrades kv only: the command WebSocket below is what
        // proves the key works for this device.
        let resp = client
            .get(format!("{base}/devices/{mode_id}/kv"))
            .header("Authorization", &auth)
            .send()
            .await
            .map_err(transport)?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(transport)?;
        let (reload, kv_refused) = if status.is_success() {
            let reload = reload_from_rest(&body)
                .map_err(|e| ConnectError::Transport(format!("GET kv answered {e}")))?;
            (Some(reload), None)
        } else {
            let reason = reason_of(status, &body);
            match status.as_u16() {
                401 => {
                    return Err(ConnectError::Refused {
                        auth: true,
                        detail: format!("{status} {reason}"),
                    })
                }
                403..=405 => (None, Some(format!("GET kv: {status} {reason}"))),
                _ => {
                    return Err(ConnectError::Transport(format!(
                        "GET kv: {status} {reason}"
                    )))
                }
            }
        };

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
        if let Some(reload) = reload {
            queued.push_back(SessionEvent::Kv(Bytes::from(reload)));
        }
        let kv_readable = kv_refused.is_none();
        match kv_refused {
            Some(why) => {
                kv.refusals.fetch_add(1, Relaxed);
                kv.set_problem(mode_id, format!("MODE refused kv over REST ({why})"));
            }
            None => kv.clear(mode_id),
        }
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
            kv,
            kv_readable,
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
            kind: row.kind,
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
                        Outcome::Done => {
                            if req.kind != Kind::Event {
                                self.kv.clear(self.mode_id);
                            }
                            return SessionEvent::Acked(req.row);
                        }
                        Outcome::Refused { status, reason } => match verdict(req.kind, status, self.kv_readable) {
                            Verdict::Done => return SessionEvent::Acked(req.row),
                            Verdict::KvRefused => {
                                self.kv.refusals.fetch_add(1, Relaxed);
                                self.kv.set_problem(self.mode_id, format!("MODE refused a kv write over REST ({status} {reason}); refused writes go to the dead letters"));
                                let reason = format!("kv over REST refused: {reason}");
                                return SessionEvent::Rejected { row: req.row, status, reason, permanent: true };
                            }
                            v => {
                                let permanent = v == Verdict::Permanent;
                                return SessionEvent::Rejected { row: req.row, status, reason, permanent };
                            }
                        },
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
    fn refusals_are_judged_by_status() {
        for readable in [true, false] {
            assert_eq!(verdict(Kind::KvDelete, 404, readable), Verdict::Done);
            assert_eq!(verdict(Kind::Event, 403, readable), Verdict::Hold);
            assert_eq!(verdict(Kind::Event, 404, readable), Verdict::Hold);
            assert_eq!(verdict(Kind::Event, 400, readable), Verdict::Permanent);
            assert_eq!(verdict(Kind::KvSet, 400, readable), Verdict::Permanent);
            assert_eq!(verdict(Kind::Event, 413, readable), Verdict::Permanent);
        }
        // kv REST refused to this key (the read failed too): kv only.
        assert_eq!(verdict(Kind::KvSet, 403, false), Verdict::KvRefused);
        assert_eq!(verdict(Kind::KvDelete, 403, false), Verdict::KvRefused);
        // The read worked: a refused write is something else (a deactivated home?): held.
        assert_eq!(verdict(Kind::KvSet, 403, true), Verdict::Hold);
    }

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
