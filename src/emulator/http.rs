//! HTTP side of the emulator (axum): MODE's device-facing REST API (`/auth`, devices, events,
//! device kv, homes, send-command), the command WebSocket, and the unauthenticated
//! `/_emulator/` inspection and control API used by tests and the demo. It checks
//! `Authorization: ModeCloud <key>` and permissions, answers MODE-style JSON errors
//! (`{"reason": ..., "data": {}}`) and applies injected faults to the MODE routes only. It must
//! not keep state of its own, hold the state lock across an `.await`, or log keys.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::state::{ConnKind, ConnRefusal, EventOutcome, KvOp, Principal, Push};
use super::{CommandError, Faults, KvError, Shared, Transport};

type S = Arc<Shared>;

const WS_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

// ---- errors --------------------------------------------------------------------------------

/// A MODE-style error answer.
pub(crate) struct ApiError {
    status: StatusCode,
    reason: String,
    data: Value,
    retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: u16, reason: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            reason: reason.into(),
            data: json!({}),
            retry_after: None,
        }
    }

    fn with_message(mut self, msg: impl Into<String>) -> Self {
        self.data = json!({ "message": msg.into() });
        self
    }

    fn retry_after(mut self, secs: u32) -> Self {
        self.retry_after = Some(secs);
        self
    }

    fn unauthenticated() -> Self {
        Self::new(401, "UNAUTHENTICATED_CLIENT")
    }

    fn denied() -> Self {
        Self::new(403, "PERMISSION_DENIED")
    }

    fn not_found() -> Self {
        Self::new(404, "NOT_FOUND")
    }

    fn invalid(msg: impl Into<String>) -> Self {
        Self::new(400, "INVALID_INPUT").with_message(msg)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(json!({ "reason": self.reason, "data": self.data })),
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn body_err(e: BytesRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(413, "PAYLOAD_TOO_LARGE")
    } else {
        ApiError::invalid(e.body_text())
    }
}

fn parse_id(s: &str) -> ApiResult<u64> {
    s.parse().map_err(|_| ApiError::not_found())
}

fn path1(p: Result<Path<String>, PathRejection>) -> ApiResult<u64> {
    match p {
        Ok(Path(id)) => parse_id(&id),
        Err(_) => Err(ApiError::not_found()),
    }
}

fn path2(p: Result<Path<(String, String)>, PathRejection>) -> ApiResult<(u64, String)> {
    match p {
        Ok(Path((id, key))) => Ok((parse_id(&id)?, key)),
        Err(_) => Err(ApiError::not_found()),
    }
}

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

fn kv_error(shared: &Shared, e: KvError) -> ApiError {
    match e {
        KvError::UnknownDevice(_) => ApiError::not_found(),
        KvError::InvalidKey(k) => {
            ApiError::new(400, "INVALID_KEY").with_message(format!("invalid key {k:?}"))
        }
        KvError::InvalidValue(m) => ApiError::invalid(m),
        KvError::KeyNotFound(_) => ApiError::new(404, "KEY_NOT_FOUND"),
        KvError::HomeDeactivated => {
            ApiError::new(403, shared.lock().behaviour.deactivated_kv_reason.clone())
        }
        KvError::RateLimited(secs) => {
            shared.lock().stats.rest_rate_limited += 1;
            ApiError::new(429, "RATE_LIMIT_EXCEEDED").retry_after(secs)
        }
    }
}

fn command_error(shared: &Shared, e: CommandError) -> ApiError {
    let st = shared.lock();
    match e {
        CommandError::UnknownDevice(_) => ApiError::not_found(),
        CommandError::DeviceOffline(_) => {
            ApiError::new(st.behaviour.device_offline_status, "DEVICE_OFFLINE")
        }
        CommandError::HomeDeactivated(_) => {
            ApiError::new(403, st.behaviour.deactivated_command_reason.clone())
        }
        CommandError::InvalidInput(m) => ApiError::invalid(m),
    }
}

// ---- auth ----------------------------------------------------------------------------------

fn token_of(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let v = v.to_str().map_err(|_| ApiError::unauthenticated())?;
    match v.strip_prefix("ModeCloud ") {
        Some(t) if !t.trim().is_empty() => Ok(Some(t.trim().to_string())),
        _ => Err(ApiError::unauthenticated()),
    }
}

/// The caller's principal: missing header -> 401 AUTHORIZATION_REQUIRED, unknown key -> 401
/// UNAUTHENTICATED_CLIENT.
fn auth(shared: &Shared, headers: &HeaderMap) -> ApiResult<Principal> {
    let Some(token) = token_of(headers)? else {
        return Err(ApiError::new(401, "AUTHORIZATION_REQUIRED"));
    };
    shared
        .lock()
        .principal(&token)
        .ok_or_else(ApiError::unauthenticated)
}

// ---- router --------------------------------------------------------------------------------

pub(crate) fn router(shared: S) -> Router {
    let max_body = shared.lock().behaviour.max_body_size;
    let api = Router::new()
        .route("/auth", get(get_auth))
        .route("/devices/{id}", get(get_device))
        .route("/devices/{id}/event", put(put_event))
        .route("/devices/{id}/command", put(put_command).get(ws_command))
        .route("/devices/{id}/kv", get(list_kv))
        .route(
            "/devices/{id}/kv/{key}",
            get(get_kv).put(put_kv).delete(delete_kv),
        )
        .route("/homes/{id}", get(get_home).patch(patch_home))
        .layer(middleware::from_fn_with_state(shared.clone(), mode_gate));
    let control = Router::new()
        .route("/_emulator/events", get(c_events).delete(c_clear_events))
        .route("/_emulator/stats", get(c_stats))
        .route("/_emulator/devices", get(c_devices))
        .route("/_emulator/homes/{id}/deactivate", post(c_deactivate))
        .route("/_emulator/homes/{id}/activate", post(c_activate))
        .route("/_emulator/faults", get(c_get_faults).post(c_set_faults))
        .route("/_emulator/offline", post(c_offline))
        .route("/_emulator/online", post(c_online))
        .route("/_emulator/rate_limit", post(c_rate_limit))
        .route("/_emulator/drop_sessions", post(c_drop_all))
        .route("/_emulator/devices/{id}/drop", post(c_drop_device))
        .route("/_emulator/devices/{id}/command", post(c_command))
        .route("/_emulator/devices/{id}/kv", get(c_kv))
        .route(
            "/_emulator/devices/{id}/kv/{key}",
            put(c_put_kv).delete(c_delete_kv),
        );
    // Device MQTT over WebSocket: MODE serves it at the root of its MQTT host.
    let mqtt_ws = Router::new()
        .route("/", get(ws_mqtt))
        .route("/mqtt", get(ws_mqtt));
    Router::new()
        .merge(api)
        .merge(control)
        .merge(mqtt_ws)
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(|| async { ApiError::new(405, "METHOD_NOT_ALLOWED") })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(shared.clone(), reason_gate))
        .with_state(shared)
}

/// Reasons found in MODE's own sources (`mode-api.md` §10); every other one is the emulator's.
const MODE_REASONS: [&str; 5] = [
    "RATE_LIMIT_EXCEEDED",
    "UNAUTHENTICATED_CLIENT",
    "AUTHORIZATION_REQUIRED",
    "PERMISSION_DENIED",
    "DEVICE_OFFLINE",
];

/// With `invented_reasons` off, an error answer of a MODE route whose `reason` is not one of
/// [`MODE_REASONS`] loses its body (`{}`): the client sees the status only.
async fn reason_gate(State(shared): State<S>, req: Request, next: Next) -> Response {
    let control = req.uri().path().starts_with("/_emulator/");
    let resp = next.run(req).await;
    if control || resp.status().is_success() || shared.lock().behaviour.invented_reasons {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 64 * 1024).await else {
        return (parts.status, Json(json!({}))).into_response();
    };
    let reason = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v.get("reason").and_then(|r| r.as_str()).map(str::to_string));
    match reason {
        Some(r) if !MODE_REASONS.contains(&r.as_str()) => {
            let mut out = (parts.status, Json(json!({}))).into_response();
            if let Some(ra) = parts.headers.get(header::RETRY_AFTER) {
                out.headers_mut().insert(header::RETRY_AFTER, ra.clone());
            }
            out
        }
        _ => Response::from_parts(parts, axum::body::Body::from(bytes)),
    }
}

/// Offline, delay, 5xx and 429 faults for MODE API routes.
async fn mode_gate(State(shared): State<S>, req: Request, next: Next) -> Response {
    let (offline, faults) = {
        let mut st = shared.lock();
        st.stats.rest_requests += 1;
        (st.is_offline(), st.faults.clone())
    };
    if offline {
        shared.lock().stats.rest_faults_injected += 1;
        return ApiError::new(503, "SERVICE_UNAVAILABLE").into_response();
    }
    if let Some(d) = faults.delay {
        tokio::time::sleep(d).await;
    }
    if faults.http_5xx {
        shared.lock().stats.rest_faults_injected += 1;
        return ApiError::new(503, "SERVICE_UNAVAILABLE").into_response();
    }
    if let Some(secs) = faults.http_429_retry_after {
        shared.lock().stats.rest_faults_injected += 1;
        return ApiError::new(429, "RATE_LIMIT_EXCEEDED")
            .retry_after(secs)
            .into_response();
    }
    next.run(req).await
}

// ---- MODE API ------------------------------------------------------------------------------

/// `GET /auth`: 200 with the key's identity, `{"type":"nobody"}` for a missing or bad key.
async fn get_auth(State(shared): State<S>, headers: HeaderMap) -> Json<Value> {
    let token = token_of(&headers).ok().flatten();
    let st = shared.lock();
    let p = token.and_then(|t| st.principal(&t));
    Json(match p {
        Some(Principal::Device(id)) => {
            json!({"type": "device", "deviceId": id, "projectId": st.project_id})
        }
        Some(Principal::Project { .. }) => json!({"type": "project", "projectId": st.project_id}),
        Some(Principal::User { user_id, .. }) => {
            json!({"type": "user", "userId": user_id, "projectId": st.project_id})
        }
        None => json!({"type": "nobody"}),
    })
}

/// Resolves a device the principal may read: a device key for another device -> 403, unknown
/// device -> 404.
fn readable_device(shared: &Shared, p: &Principal, id: u64) -> ApiResult<()> {
    if let Principal::Device(own) = p {
        if *own != id {
            return Err(ApiError::denied());
        }
    }
    let st = shared.lock();
    let d = st.devices.get(&id).ok_or_else(ApiError::not_found)?;
    if st.can_read_device(p, d) {
        Ok(())
    } else {
        Err(ApiError::denied())
    }
}

async fn get_device(
    State(shared): State<S>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let p = auth(&shared, &headers)?;
    let id = path1(path)?;
    readable_device(&shared, &p, id)?;
    let st = shared.lock();
    let d = st.devices.get(&id).ok_or_else(ApiError::not_found)?;
    let mut obj = json!({
        "id": d.id,
        "projectId": st.project_id,
        "name": d.name,
        "tag": d.tag,
        "deviceClass": d.device_class,
        "creationTime": d.creation_time,
        "isConnected": st.connection_count(id) > 0,
    });
    if let Some(h) = d.home_id {
        obj["homeId"] = json!(h);
    }
    if let Some(t) = &d.last_connect_time {
        obj["lastConnectTime"] = json!(t);
    }
    if let Some(t) = &d.last_disconnect_time {
        obj["lastDisconnectTime"] = json!(t);
    }
    Ok(Json(obj))
}

/// `PUT /devices/{id}/event` with the device's own key.
async fn put_event(
    State(shared): State<S>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let p = auth(&shared, &headers)?;
    let id = path1(path)?;
    if p != Principal::Device(id) {
        return Err(ApiError::denied());
    }
    let body = body.map_err(body_err)?;
    let outcome = shared.lock().ingest_event(id, &body, Transport::Rest);
    match outcome {
        EventOutcome::Recorded | EventOutcome::DroppedDeactivated => Ok(no_content()),
        EventOutcome::RefusedDeactivated => Err(ApiError::new(
            403,
            shared.lock().behaviour.deactivated_kv_reason.clone(),
        )),
        EventOutcome::Invalid(m) => Err(ApiError::invalid(m)),
        EventOutcome::RateLimited(secs) => {
            shared.lock().stats.rest_rate_limited += 1;
            Err(ApiError::new(429, "RATE_LIMIT_EXCEEDED").retry_after(secs))
        }
    }
}

#[derive(Deserialize)]
struct CommandBody<'a> {
    action: Option<String>,
    #[serde(default, borrow)]
    parameters: Option<&'a RawValue>,
}

/// Parses `{"action": string, "parameters"?: object}` into the payload MODE pushes (without
/// `parameters` when none were given, unless `command_parameters_default`).
fn command_from_body(body: &[u8], add_default: bool) -> ApiResult<bytes::Bytes> {
    let cmd: CommandBody<'_> =
        serde_json::from_slice(body).map_err(|e| ApiError::invalid(e.to_string()))?;
    let action = cmd
        .action
        .ok_or_else(|| ApiError::invalid("action is missing"))?;
    let params = match cmd.parameters.map(|r| r.get().trim()) {
        None | Some("null") => add_default.then_some("{}"),
        Some(raw) if raw.starts_with('{') => Some(raw),
        Some(_) => return Err(ApiError::invalid("parameters must be a JSON object")),
    };
    super::state::command_payload(&action, params).map_err(|e| ApiError::invalid(e.to_string()))
}

/// `PUT /devices/{id}/command` (project key with "commands", or a user of the device's home).
async fn put_command(
    State(shared): State<S>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let p = auth(&shared, &headers)?;
    let id = path1(path)?;
    {
        let st = shared.lock();
        let d = st.devices.get(&id).ok_or_else(ApiError::not_found)?;
        if !st.can_command(&p, d) {
            return Err(ApiError::denied());
        }
    }
    let body = body.map_err(body_err)?;
    let payload = command_from_body(&body, shared.lock().behaviour.command_parameters_default)?;
    let res = shared.lock().send_command(id, payload);
    res.map(|()| no_content())
        .map_err(|e| command_error(&shared, e))
}

#[derive(Deserialize)]
struct WsQuery {
    #[serde(rename = "authToken")]
    auth_token: Option<String>,
}

/// `GET /devices/{id}/command` WebSocket (device key in the header or `?authToken=`).
async fn ws_command(
    State(shared): State<S>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    query: Result<Query<WsQuery>, QueryRejection>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let token = match token_of(&headers)? {
        Some(t) => t,
        None => query
            .ok()
            .and_then(|Query(q)| q.auth_token)
            .ok_or_else(|| ApiError::new(401, "AUTHORIZATION_REQUIRED"))?,
    };
    let p = shared
        .lock()
        .principal(&token)
        .ok_or_else(ApiError::unauthenticated)?;
    let id = path1(path)?;
    if p != Principal::Device(id) {
        return Err(ApiError::denied());
    }
    {
        let st = shared.lock();
        if st.connection_count(id) >= st.behaviour.max_connections_per_device {
            return Err(ApiError::new(503, "TOO_MANY_CONNECTIONS"));
        }
    }
    let ws = ws.map_err(|e| ApiError::invalid(format!("WebSocket upgrade required: {e}")))?;
    Ok(ws.on_upgrade(move |socket| ws_session(shared, id, socket)))
}

/// `GET /` (or `/mqtt`) with a WebSocket upgrade, subprotocol `mqtt`: device MQTT over
/// WebSocket. Authentication is the MQTT CONNECT inside, as on the TCP endpoint.
async fn ws_mqtt(
    State(shared): State<S>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    if shared.lock().is_offline() {
        return Err(ApiError::new(503, "SERVICE_UNAVAILABLE"));
    }
    let ws = ws.map_err(|e| ApiError::invalid(format!("WebSocket upgrade required: {e}")))?;
    let peer = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
    Ok(ws
        .protocols(["mqtt"])
        .on_upgrade(move |socket| super::mqtt::serve_websocket(shared, socket, peer)))
}

async fn ws_session(shared: S, device_id: u64, mut socket: WebSocket) {
    let registered = shared
        .lock()
        .register_conn(device_id, ConnKind::WebSocket, shared.root());
    let mut conn = match registered {
        Ok(c) => c,
        Err(r) => {
            if r == ConnRefusal::TooMany {
                tracing::debug!(device = device_id, "emulator WS: too many connections");
            }
            return; // dropping the socket cuts the connection
        }
    };
    tracing::debug!(device = device_id, "emulator WS: command socket open");
    loop {
        tokio::select! {
            biased;
            _ = conn.cancel.cancelled() => break,
            out = conn.rx.recv() => {
                let Some(push) = out else { break };
                let Push::Command(payload) = push else { continue };
                let text = String::from_utf8_lossy(&payload).into_owned();
                let sent = tokio::time::timeout(
                    WS_WRITE_TIMEOUT,
                    socket.send(Message::Text(text.into())),
                )
                .await;
                if !matches!(sent, Ok(Ok(()))) {
                    break;
                }
            }
            inp = socket.recv() => match inp {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                // Pings are answered by the WebSocket layer; anything else is ignored.
                Some(Ok(_)) => {}
            },
        }
    }
    shared.lock().unregister_conn(device_id, conn.conn_id);
    tracing::debug!(device = device_id, "emulator WS: command socket closed");
}

fn kv_item_json(key: &str, value: &Value, time: &str) -> Value {
    json!({"key": key, "value": value, "modificationTime": time})
}

#[derive(Deserialize)]
struct KvQuery {
    #[serde(rename = "keyPrefix")]
    key_prefix: Option<String>,
}

/// `GET /devices/{id}/kv[?keyPrefix=]`.
async fn list_kv(
    State(shared): State<S>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    query: Result<Query<KvQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let p = auth(&shared, &headers)?;
    let id = path1(path)?;
    readable_device(&shared, &p, id)?;
    kv_rest_allowed(&shared, &p)?;
    let prefix = query
        .ok()
        .and_then(|Query(q)| q.key_prefix)
        .unwrap_or_default();
    let st = shared.lock();
    let d = st.devices.get(&id).ok_or_else(ApiError::not_found)?;
    let items: Vec<Value> =
        d.kv.iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(k, it)| kv_item_json(k, &it.value, &it.modification_time))
            .collect();
    Ok(Json(Value::Array(items)))
}

/// `GET /devices/{id}/kv/{key}`.
async fn get_kv(
    State(shared): State<S>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let p = auth(&shared, &headers)?;
    let (id, key) = path2(path)?;
    readable_device(&shared, &p, id)?;
    kv_rest_allowed(&shared, &p)?;
    if !super::state::valid_kv_key(&key) {
        return Err(kv_error(&shared, KvError::InvalidKey(key)));
    }
    let st = shared.lock();
    let d = st.devices.get(&id).ok_or_else(ApiError::not_found)?;
    let it =
        d.kv.get(&key)
            .ok_or_else(|| ApiError::new(404, "KEY_NOT_FOUND"))?;
    Ok(Json(kv_item_json(&key, &it.value, &it.modification_time)))
}

/// The `device_key_kv_rest` knob: whether a device key may use the kv REST routes at all.
fn kv_rest_allowed(shared: &Shared, p: &Principal) -> ApiResult<()> {
    if matches!(p, Principal::Device(_)) && !shared.lock().behaviour.device_key_kv_rest {
        return Err(ApiError::denied());
    }
    Ok(())
}

/// Checks write access: a device key for another device -> 403, unknown device -> 404.
/// Returns whether the write is made with the device's own key (rate-limited).
fn writable_device(shared: &Shared, p: &Principal, id: u64) -> ApiResult<bool> {
    if let Principal::Device(own) = p {
        if *own != id {
            return Err(ApiError::denied());
        }
    }
    kv_rest_allowed(shared, p)?;
    let st = shared.lock();
    let d = st.devices.get(&id).ok_or_else(ApiError::not_found)?;
    if st.can_write_kv(p, d) {
        Ok(matches!(p, Principal::Device(_)))
    } else {
        Err(ApiError::denied())
    }
}

#[derive(Deserialize)]
struct KvBody {
    #[serde(default)]
    value: Option<Value>,
}

fn kv_value_from_body(body: &[u8]) -> ApiResult<Value> {
    let b: KvBody = serde_json::from_slice(body).map_err(|e| ApiError::invalid(e.to_string()))?;
    b.value
        .ok_or_else(|| ApiError::invalid("value is missing or null"))
}

/// `PUT /devices/{id}/kv/{key}` with `{"value": any}` -> 204.
async fn put_kv(
    State(shared): State<S>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let p = auth(&shared, &headers)?;
    let (id, key) = path2(path)?;
    let own = writable_device(&shared, &p, id)?;
    if !super::state::valid_kv_key(&key) {
        return Err(kv_error(&shared, KvError::InvalidKey(key)));
    }
    let value = kv_value_from_body(&body.map_err(body_err)?)?;
    let res = shared.lock().kv_write(id, KvOp::Set(key, value), None, own);
    res.map(|_| no_content()).map_err(|e| kv_error(&shared, e))
}

/// `DELETE /devices/{id}/kv/{key}` -> 204; an absent key answers `delete_missing_kv_status`
/// (404 `KEY_NOT_FOUND` by default).
async fn delete_kv(
    State(shared): State<S>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let p = auth(&shared, &headers)?;
    let (id, key) = path2(path)?;
    let own = writable_device(&shared, &p, id)?;
    let res = shared.lock().kv_write(id, KvOp::Delete(key), None, own);
    match res {
        Ok(_) => Ok(no_content()),
        Err(KvError::KeyNotFound(k)) => {
            let status = shared.lock().behaviour.delete_missing_kv_status;
            if (200..300).contains(&status) {
                Ok(StatusCode::from_u16(status)
                    .unwrap_or(StatusCode::NO_CONTENT)
                    .into_response())
            } else {
                Err(ApiError::new(status, "KEY_NOT_FOUND").with_message(format!("no key {k:?}")))
            }
        }
        Err(e) => Err(kv_error(&shared, e)),
    }
}

/// `GET /homes/{id}`.
async fn get_home(
    State(shared): State<S>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let p = auth(&shared, &headers)?;
    let id = path1(path)?;
    let st = shared.lock();
    if !st.can_read_home(&p, id) {
        return Err(ApiError::denied());
    }
    let h = st.homes.get(&id).ok_or_else(ApiError::not_found)?;
    Ok(Json(json!({
        "id": h.id,
        "projectId": st.project_id,
        "name": h.name,
        "creationTime": h.creation_time,
        "deactivated": h.deactivated,
    })))
}

#[derive(Deserialize)]
struct HomePatch {
    name: Option<String>,
    deactivated: Option<bool>,
}

/// `PATCH /homes/{id}` `{"name"?, "deactivated"?}` -> 204. Name: admin project key or a
/// member; `deactivated`: admin project key only.
async fn patch_home(
    State(shared): State<S>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let p = auth(&shared, &headers)?;
    let id = path1(path)?;
    let body = body.map_err(body_err)?;
    let patch: HomePatch =
        serde_json::from_slice(&body).map_err(|e| ApiError::invalid(e.to_string()))?;
    let admin = matches!(p, Principal::Project { admin: true, .. });
    let mut st = shared.lock();
    if !st.can_read_home(&p, id) {
        return Err(ApiError::denied());
    }
    if !st.homes.contains_key(&id) {
        return Err(ApiError::not_found());
    }
    let member = matches!(p, Principal::User { ref home_ids, .. } if home_ids.contains(&id));
    if patch.deactivated.is_some() && !admin {
        return Err(ApiError::denied());
    }
    if patch.name.is_some() && !(admin || member) {
        return Err(ApiError::denied());
    }
    if let Some(d) = patch.deactivated {
        st.set_home_deactivated(id, d);
    }
    if let (Some(name), Some(h)) = (patch.name, st.homes.get_mut(&id)) {
        h.name = name;
    }
    Ok(no_content())
}

// ---- control API (emulator only, no auth) --------------------------------------------------

#[derive(Deserialize)]
struct EventsQuery {
    device: Option<u64>,
}

async fn c_events(
    State(shared): State<S>,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> Response {
    match q {
        Ok(Query(q)) => Json(shared.lock().events(q.device)).into_response(),
        Err(e) => ApiError::invalid(e.body_text()).into_response(),
    }
}

async fn c_clear_events(State(shared): State<S>) -> Response {
    shared.lock().clear_events();
    no_content()
}

async fn c_stats(State(shared): State<S>) -> Response {
    Json(shared.lock().stats.clone()).into_response()
}

async fn c_devices(State(shared): State<S>) -> Response {
    Json(shared.lock().device_statuses()).into_response()
}

fn set_home(shared: &Shared, path: Result<Path<String>, PathRejection>, d: bool) -> Response {
    match path1(path) {
        Ok(id) if shared.lock().set_home_deactivated(id, d) => no_content(),
        _ => ApiError::not_found().into_response(),
    }
}

async fn c_deactivate(
    State(shared): State<S>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    set_home(&shared, path, true)
}

async fn c_activate(
    State(shared): State<S>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    set_home(&shared, path, false)
}

async fn c_get_faults(State(shared): State<S>) -> Response {
    Json(shared.lock().faults.clone()).into_response()
}

async fn c_set_faults(State(shared): State<S>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return body_err(e).into_response(),
    };
    match serde_json::from_slice::<Faults>(&body) {
        Ok(f) => {
            tracing::info!("emulator: faults set to {f:?}");
            shared.lock().faults = f;
            no_content()
        }
        Err(e) => ApiError::invalid(e.to_string()).into_response(),
    }
}

async fn c_offline(State(shared): State<S>) -> Response {
    shared.set_offline(true);
    no_content()
}

async fn c_online(State(shared): State<S>) -> Response {
    shared.set_offline(false);
    no_content()
}

#[derive(Deserialize)]
struct RateLimitBody {
    #[serde(rename = "perMinute")]
    per_minute: Option<u32>,
}

async fn c_rate_limit(State(shared): State<S>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return body_err(e).into_response(),
    };
    match serde_json::from_slice::<RateLimitBody>(&body) {
        Ok(b) => {
            shared.lock().set_rate_limit(b.per_minute);
            no_content()
        }
        Err(e) => ApiError::invalid(e.to_string()).into_response(),
    }
}

async fn c_drop_all(State(shared): State<S>) -> Response {
    shared.lock().kill_all_connections(true);
    no_content()
}

async fn c_drop_device(
    State(shared): State<S>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    match path1(path) {
        Ok(id) => {
            shared.lock().kill_device_connections(id);
            no_content()
        }
        Err(e) => e.into_response(),
    }
}

async fn c_command(
    State(shared): State<S>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let id = path1(path)?;
    let payload = command_from_body(
        &body.map_err(body_err)?,
        shared.lock().behaviour.command_parameters_default,
    )?;
    let res = shared.lock().send_command(id, payload);
    res.map(|()| no_content())
        .map_err(|e| command_error(&shared, e))
}

async fn c_kv(
    State(shared): State<S>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let id = path1(path)?;
    let st = shared.lock();
    let d = st.devices.get(&id).ok_or_else(ApiError::not_found)?;
    let items: Vec<Value> =
        d.kv.iter()
            .map(|(k, it)| kv_item_json(k, &it.value, &it.modification_time))
            .collect();
    Ok(Json(json!({"rev": d.kv_rev, "items": items})))
}

async fn c_put_kv(
    State(shared): State<S>,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let (id, key) = path2(path)?;
    let value = kv_value_from_body(&body.map_err(body_err)?)?;
    let res = shared
        .lock()
        .kv_write(id, KvOp::Set(key, value), None, false);
    res.map(|rev| Json(json!({"rev": rev})).into_response())
        .map_err(|e| kv_error(&shared, e))
}

async fn c_delete_kv(
    State(shared): State<S>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<Response> {
    let (id, key) = path2(path)?;
    let res = shared.lock().kv_write(id, KvOp::Delete(key), None, false);
    res.map(|rev| Json(json!({"rev": rev})).into_response())
        .map_err(|e| kv_error(&shared, e))
}
