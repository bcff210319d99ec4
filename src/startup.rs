//! Builds the relay from its configuration (audit, pool, listener, router, HTTP) and
//! runs it until shutdown. Building and running are separate so that tests bind port 0
//! and learn the real port before anything runs.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{KeyError, Verifier};
use crate::config::{ServeConfig, WakeupMode};
use crate::db::audit::{self, AuditError, AuditReport};
use crate::db::{self, DbError, LISTENER_APPLICATION_NAME};
use crate::http::{self, AppState};
use crate::metrics::Metrics;
use crate::outbox::reader::TimestampSource;
use crate::outbox::replay::Replayer;
use crate::outbox::tracked::TrackedTables;
use crate::outbox::{listener, prune};
use crate::router::{self, Router, RouterSettings};
use crate::visibility::VisibilityQuery;
use crate::ws::limits::{ConnectionCounter, OriginPolicy};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Database(#[from] DbError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("the start-up audit refused to serve:\n{}", render_findings(.0))]
    Refused(AuditReport),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error("cannot bind {addr}: {error}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
}

fn render_findings(report: &AuditReport) -> String {
    report
        .findings
        .iter()
        .map(|f| format!("  - {f}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs the audit and returns its report (database errors are errors, findings are not).
pub async fn audit(config: &ServeConfig) -> Result<AuditReport, StartupError> {
    let mut client = db::connect_once(&config.database, db::POOL_APPLICATION_NAME).await?;
    let visibility = VisibilityQuery::new(&config.visibility, Metrics::new());
    Ok(audit::run(&mut client, &visibility).await?)
}

/// A relay, built and bound, not yet running.
pub struct Application {
    listener: TcpListener,
    port: u16,
    state: Arc<AppState>,
    router_task: tokio::task::JoinHandle<()>,
    shutdown_timeout: Duration,
    /// Routes served beside the relay's own (the demo's page and controls).
    extra_routes: Option<axum::Router>,
}

impl Application {
    pub async fn build(config: ServeConfig) -> Result<Self, StartupError> {
        let report = audit(&config).await?;
        for warning in &report.warnings {
            tracing::warn!("{warning}");
        }
        if !report.passed() {
            return Err(StartupError::Refused(report));
        }
        tracing::info!(
            event_tables = ?report.event_tables,
            visibility_tables = ?report.visibility_tables,
            "start-up audit passed"
        );
        if config.allowed_origins.iter().any(|o| o.trim() == "*") {
            tracing::warn!("RELAY_ALLOWED_ORIGINS=*: any web page may open sockets here");
        }

        let metrics = Metrics::new();
        let verifier = Arc::new(Verifier::from_config(&config.jwt)?);
        verifier.prefetch().await;
        let pool = db::pool(&config.database, usize::from(config.pool_size))?;
        let visibility = VisibilityQuery::new(&config.visibility, metrics.clone());
        let timestamps = {
            let client = pool.get().await.map_err(DbError::from)?;
            TimestampSource::detect(&**client)
                .await
                .map_err(DbError::from)?
        };

        let shutdown = CancellationToken::new();
        let listener_handle = listener::spawn(
            listener::ListenerSettings {
                connection: db::connection_config(
                    &config.database.database_url,
                    LISTENER_APPLICATION_NAME,
                )?,
                tls: db::tls(&config.database)?,
                channel: config.channel.clone(),
                instance_id: uuid::Uuid::new_v4(),
                visibility: visibility.clone(),
                metrics: metrics.clone(),
            },
            shutdown.clone(),
        );
        let (router, router_task) = router::spawn(
            RouterSettings {
                visibility,
                pool: pool.clone(),
                listener: listener_handle,
                wakeup: config.wakeup,
                max_subscriptions: config.limits.max_subscriptions,
                metrics: metrics.clone(),
                faults: config.faults,
            },
            shutdown.clone(),
        );
        tokio::spawn(prune::run(
            pool.clone(),
            config.retention,
            prune_interval(config.retention),
            metrics.clone(),
            shutdown.clone(),
        ));
        if config.faults.ignore_visibility_announcements {
            tracing::error!(
                "FAULT INJECTION: visibility announcements are ignored; this relay leaks"
            );
        }
        if config.wakeup == WakeupMode::Notify {
            tracing::info!("wake-up mode: notify (every writing transaction NOTIFYs)");
        }

        let listener = TcpListener::bind(config.listen_addr)
            .await
            .map_err(|error| StartupError::Bind {
                addr: config.listen_addr,
                error,
            })?;
        let port = listener
            .local_addr()
            .map(|a| a.port())
            .unwrap_or(config.listen_addr.port());
        let state = Arc::new(AppState {
            verifier,
            router,
            replayer: Arc::new(Replayer::new(pool.clone(), timestamps)),
            tracked: Arc::new(TrackedTables::new(pool)),
            metrics,
            limits: config.limits.clone(),
            origins: OriginPolicy::from_config(&config.allowed_origins),
            connections: Arc::new(ConnectionCounter::default()),
            shutdown,
            tracker: TaskTracker::new(),
        });
        Ok(Self {
            listener,
            port,
            state,
            router_task,
            shutdown_timeout: config.shutdown_timeout,
            extra_routes: None,
        })
    }

    /// Serves `routes` beside the relay's own; `rls-relay demo` mounts its page and
    /// controls this way, so that `serve` never has them.
    pub fn with_routes(mut self, routes: axum::Router) -> Self {
        self.extra_routes = Some(match self.extra_routes.take() {
            Some(existing) => existing.merge(routes),
            None => routes,
        });
        self
    }

    /// The bound port (useful when binding port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.state.metrics.clone()
    }

    pub fn router(&self) -> Router {
        self.state.router.clone()
    }

    /// Cancelling it shuts the relay down as SIGTERM would.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.state.shutdown.clone()
    }

    /// Serves until `signal` resolves (or the shutdown token is cancelled), then stops
    /// accepting, closes every socket with 1001 and waits for them, at most
    /// RELAY_SHUTDOWN_TIMEOUT.
    pub async fn run_until_stopped(
        self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let shutdown = self.state.shutdown.clone();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = signal => trigger.cancel(),
                () = trigger.cancelled() => {}
            }
        });
        tracing::info!(port = self.port, "serving");
        let mut app = http::app(self.state.clone());
        if let Some(extra) = self.extra_routes {
            app = app.merge(extra);
        }
        let stopped = shutdown.clone();
        axum::serve(self.listener, app)
            .with_graceful_shutdown(async move { stopped.cancelled().await })
            .await?;
        let tracker = self.state.tracker.clone();
        tracker.close();
        let open = tracker.len();
        if tokio::time::timeout(self.shutdown_timeout, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = tracker.len(),
                "sockets still open at the shutdown deadline; exiting anyway"
            );
        } else {
            tracing::info!(closed = open, "all sockets closed");
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.router_task).await;
        Ok(())
    }
}

/// Prune often enough to stay near the retention, at most every minute.
fn prune_interval(retention: Duration) -> Duration {
    (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}
