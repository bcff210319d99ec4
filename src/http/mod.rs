//! The HTTP surface: `/ws`, `/healthz`, `/readyz`, `/metrics`, and `/client.js` (the
//! browser client module). The demo adds its page and controls with
//! [`crate::startup::Application::with_routes`]; `serve` never has them.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Verifier;
use crate::config::LimitsConfig;
use crate::metrics::Metrics;
use crate::outbox::replay::Replayer;
use crate::outbox::tracked::TrackedTables;
use crate::router::Router;
use crate::ws;
use crate::ws::limits::{ConnectionCounter, OriginPolicy};

/// Everything a request handler or a socket needs.
pub struct AppState {
    pub verifier: Arc<Verifier>,
    pub router: Router,
    pub replayer: Arc<Replayer>,
    pub tracked: Arc<TrackedTables>,
    pub metrics: Arc<Metrics>,
    pub limits: LimitsConfig,
    pub origins: OriginPolicy,
    pub connections: Arc<ConnectionCounter>,
    /// Cancelled on shutdown: every socket closes with 1001.
    pub shutdown: CancellationToken,
    /// Sockets, so that shutdown can wait for them (with a bound).
    pub tracker: TaskTracker,
}

pub fn app(state: Arc<AppState>) -> axum::Router {
    axum::Router::new()
        .route("/ws", get(ws::upgrade))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/client.js", get(client_js))
        .with_state(state)
}

/// The browser client (protocol v1: auth, refresh, reconnect, resume), a plain ES module.
pub const CLIENT_JS: &str = include_str!("client.js");

async fn client_js() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            // Cross-origin pages may import it (the relay often has its own host).
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        CLIENT_JS,
    )
}

/// The process is alive and serving HTTP.
async fn healthz() -> &'static str {
    "ok"
}

/// The LISTEN connection is up and the last outbox read caught up: safe to route
/// clients here.
async fn readyz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    if state.router.status().is_ready() && !state.shutdown.is_cancelled() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
