//! The local ops endpoint: `/healthz`, `/metrics`, `/status.json` (axum).
//!
//! It binds where `[ops] listen` says (loopback by default: it has no authentication, and
//! shows device names and MODE ids, never keys).

use super::OpsContext;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Binds `addr` and serves on `tracker` until `shutdown` is cancelled. Returns the bound address.
pub async fn serve(
    ctx: Arc<OpsContext>,
    addr: SocketAddr,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on [ops] listen = \"{addr}\": {e}. Pick a free port, or set listen = \"off\" to switch the health/metrics endpoint off"
        )
    })?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/status.json", get(status))
        .route("/", get(index))
        .with_state(ctx);
    tracker.spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "ops endpoint stopped");
        }
    });
    tracing::info!(addr = %bound, "ops endpoint listening (/healthz, /metrics, /status.json)");
    Ok(bound)
}

async fn index() -> &'static str {
    "modehub ops endpoint: /healthz /metrics /status.json\n"
}

async fn healthz(State(ctx): State<Arc<OpsContext>>) -> Response {
    let h = ctx.health().await;
    let mut body = if h.healthy {
        "ok\n".to_string()
    } else {
        format!("unhealthy: {}\n", h.summary())
    };
    for c in &h.checks {
        body.push_str(&format!(
            "{} {}: {}\n",
            if c.ok { "ok  " } else { "FAIL" },
            c.name,
            c.detail
        ));
    }
    let code = if h.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn metrics(State(ctx): State<Arc<OpsContext>>) -> Response {
    let body = super::prom::render(&ctx).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn status(State(ctx): State<Arc<OpsContext>>) -> Response {
    let report = ctx.status().await;
    match serde_json::to_string_pretty(&report) {
        Ok(s) => ([(header::CONTENT_TYPE, "application/json")], s).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
