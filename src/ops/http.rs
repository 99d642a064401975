//! The local ops endpoint: `/healthz`, `/metrics`, `/status.json` (axum).
//!
//! It binds where `[ops] listen` says: loopback by default. Elsewhere the config demands
//! `[ops] password_file`, and clients not on this machine must send it (`auth`). It shows
//! device names and MODE ids, never keys. `/` is the homeowner's page (`page`).

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
    password: Option<crate::config::Secret>,
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
    // Off loopback, a password ([ops] password_file; config validation demands one there).
    let app = match password {
        Some(p) => app.layer(axum::middleware::from_fn(move |req, next| {
            super::auth::require_password(p.clone(), req, next)
        })),
        None => app,
    };
    let task = tokio::spawn(async move {
        let stop = async move {
            while !*shutdown.borrow() {
                if shutdown.changed().await.is_err() {
                    break;
                }
            }
        };
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
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
