//! The homeowner's status page: `GET /` serves one HTML file (embedded, no build step, no CDN)
//! whose script polls `GET /page.json` every few seconds and draws the homes, each device's
//! local connection, upstream session, last event, events a minute over the last hour, backlog
//! with an estimated time to drain, and the last error in words.
//!
//! It only reads the hub (through [`OpsContext`]); the page builds its DOM with `textContent`,
//! never `innerHTML`, so a device name or an error text cannot inject markup. Access control
//! is the ops endpoint's (see [`super::http`]).

use super::OpsContext;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use std::sync::Arc;

/// The page itself.
const PAGE: &str = include_str!("page.html");

/// The page's routes: `/` and `/page.json`.
pub fn routes() -> Router<Arc<OpsContext>> {
    Router::new()
        .route("/", get(index))
        .route("/page.json", get(data))
}

async fn index() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}

/// One device on the page.
#[derive(Debug, Serialize)]
pub struct PageDevice {
    pub name: String,
    pub mode_id: crate::local::ModeId,
    pub home_id: Option<u64>,
    pub transport: String,
    pub local_connections: usize,
    /// `up`, `connecting`, `down: why`, `refused: why`.
    pub upstream: String,
    pub last_event_secs_ago: Option<u64>,
    /// Accepted messages a minute, the last 60 minutes, oldest first.
    pub per_minute: Vec<u32>,
    pub queued: u64,
    /// Estimated time to send the backlog at the current pace (none while held or idle).
    pub drain_secs: Option<u64>,
    pub last_error: Option<String>,
    pub last_error_secs_ago: Option<u64>,
}

/// A home as the hub last saw it.
#[derive(Debug, Serialize)]
pub struct PageHome {
    pub home_id: u64,
    /// "active", "deactivated" or "unknown" (no project key, or not read yet).
    pub state: String,
}

/// `/page.json`.
#[derive(Debug, Serialize)]
pub struct PageData {
    pub version: String,
    pub uptime_secs: u64,
    pub healthy: bool,
    pub health: String,
    pub homes: Vec<PageHome>,
    pub devices: Vec<PageDevice>,
}

/// What the page shows, from one status read.
pub async fn page_data(ctx: &OpsContext) -> PageData {
    let report = ctx.status().await;
    let view = ctx.view();
    let now = crate::timing::now_ms();
    let mut homes: Vec<PageHome> = Vec::new();
    let devices = report
        .devices
        .into_iter()
        .map(|d| {
            if let Some(h) = d.home_id {
                if !homes.iter().any(|x| x.home_id == h) {
                    homes.push(PageHome {
                        home_id: h,
                        state: d.home_state.clone(),
                    });
                }
            }
            let (per_minute, last) = ctx.metrics().activity.last_hour(d.mode_id.get(), now);
            let pace = view
                .uplinks
                .iter()
                .find(|u| u.mode_id == d.mode_id)
                .map(|u| {
                    (
                        u.pace.drain_per_minute(),
                        u.pace.rate_per_minute(),
                        u.hold(),
                    )
                });
            let drain_secs = match pace {
                Some((seen, rate, None)) => {
                    let per_minute = if seen > 0.0 { seen.min(rate) } else { rate };
                    crate::pacing::eta(d.queued, per_minute).map(|e| e.as_secs())
                }
                _ => None,
            };
            PageDevice {
                name: d.name,
                mode_id: d.mode_id,
                home_id: d.home_id,
                transport: d.transport,
                local_connections: d.local_connections,
                upstream: d.upstream,
                last_event_secs_ago: last.map(|t| ((now - t).max(0) / 1000) as u64),
                per_minute,
                queued: d.queued,
                drain_secs: if d.queued == 0 { Some(0) } else { drain_secs },
                last_error: d.last_error,
                last_error_secs_ago: d.last_error_secs_ago,
            }
        })
        .collect();
    homes.sort_by_key(|h| h.home_id);
    PageData {
        version: report.version,
        uptime_secs: report.uptime_secs,
        healthy: report.health.healthy,
        health: report.health.summary(),
        homes,
        devices,
    }
}

async fn data(State(ctx): State<Arc<OpsContext>>) -> Response {
    let d = page_data(&ctx).await;
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(d)).into_response()
}
