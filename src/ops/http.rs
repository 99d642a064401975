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
use tokio::sync::watch;

/// Binds `addr` and serves until `shutdown` turns true. Returns the bound address and the task.
pub async fn serve(
    ctx: Arc<OpsContext>,
    addr: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
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
        .merge(super::page::routes())
        .with_state(ctx);
    let task = tokio::spawn(async move {
        let stop = async move {
            while !*shutdown.borrow() {
                if shutdown.changed().await.is_err() {
                    break;
                }
            }
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %e, "ops endpoint stopped");
        }
    });
    tracing::info!(addr = %bound, "ops endpoint listening (/healthz, /metrics, /status.json)");
    Ok((bound, task))
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
