//! A relay running in the test's runtime, bound to port 0.

use std::sync::Arc;
use std::time::Duration;

use rls_relay::config::{
    DatabaseConfig, JwtConfig, LimitsConfig, LogConfig, LogFormat, Secret, ServeConfig,
    VisibilityConfig, WakeupMode,
};
use rls_relay::metrics::Metrics;
use rls_relay::startup::Application;
use tokio_util::sync::CancellationToken;

use super::tokens::SECRET;

/// The configuration a test relay starts from: the example schema's defaults, HS256 with
/// the test secret, port 0, every limit at its documented default.
pub fn config(database_url: &str) -> ServeConfig {
    ServeConfig {
        database: DatabaseConfig::new(database_url),
        log: LogConfig {
            log_format: LogFormat::Human,
            log_filter: "info".into(),
        },
        jwt: JwtConfig {
            jwt_secret: Some(Secret::new(SECRET)),
            jwt_public_key_file: None,
            jwt_jwks_file: None,
            jwt_jwks_url: None,
            jwt_jwks_min_refresh: Duration::from_secs(30),
            jwt_algorithm: None,
            jwt_issuer: None,
            jwt_audience: Vec::new(),
            jwt_leeway: Duration::from_secs(5),
            user_claim: "sub".into(),
        },
        visibility: VisibilityConfig {
            db_role: "app_user".into(),
            claims_setting: "request.jwt.claims".into(),
            visibility_sql: "select id from public.credentials".into(),
            visibility_timeout: Duration::from_secs(5),
        },
        limits: LimitsConfig {
            max_connections: 100_000,
            max_connections_per_user: 32,
            max_subscriptions: 64,
            max_frame_bytes: 65_536,
            send_queue_messages: 1_024,
            send_queue_bytes: 4 * 1024 * 1024,
            max_messages_per_second: 50,
            auth_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(30),
        },
        listen_addr: "127.0.0.1:0".parse().expect("address"),
        channel: "rls_relay".into(),
        wakeup: WakeupMode::Adaptive,
        allowed_origins: Vec::new(),
        retention: Duration::from_secs(3600),
        pool_size: 4,
        shutdown_timeout: Duration::from_secs(5),
        faults: Default::default(),
    }
}

pub struct TestRelay {
    pub port: u16,
    pub metrics: Arc<Metrics>,
    pub router: rls_relay::router::Router,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestRelay {
    /// Starts a relay on `database_url` with the test configuration.
    pub async fn start(database_url: &str) -> Self {
        Self::start_with(config(database_url)).await
    }

    /// A fresh database with the example schema and a relay on it, configured by
    /// `configure` from the test defaults.
    pub async fn on_example(configure: impl FnOnce(&mut ServeConfig)) -> (super::TestDb, Self) {
        let db = super::TestDb::example().await;
        let mut config = config(&db.url());
        configure(&mut config);
        let relay = Self::start_with(config).await;
        (db, relay)
    }

    pub async fn start_with(config: ServeConfig) -> Self {
        let app = Application::build(config)
            .await
            .unwrap_or_else(|e| panic!("relay failed to start: {e}"));
        let port = app.port();
        let metrics = app.metrics();
        let router = app.router();
        let shutdown = app.shutdown_token();
        let task = tokio::spawn(app.run_until_stopped(std::future::pending()));
        let relay = Self {
            port,
            metrics,
            router,
            shutdown,
            task: Some(task),
        };
        relay.wait_ready().await;
        relay
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Waits until the relay's listener has connected and read once.
    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !self.router.status().is_ready() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "relay not ready within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Shuts down as SIGTERM would and waits for it.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
    }

    pub fn visibility_queries(&self) -> u64 {
        self.metrics.visibility_query_count()
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
