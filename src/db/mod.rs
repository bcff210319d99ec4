//! Everything that talks to Postgres outside the event stream: connection settings, the
//! pool, the relay's migrations, the start-up audit, and a throwaway local cluster for the
//! demo, the tests and the benchmark.

pub mod audit;
pub mod cluster;
pub mod migrate;
pub mod snapshot;
pub mod tls;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{DatabaseConfig, Secret};

/// `application_name` of pooled connections (visibility queries, replays, pruning).
pub const POOL_APPLICATION_NAME: &str = "rls-relay";
/// `application_name` of the one connection that LISTENs and reads the outbox.
pub const LISTENER_APPLICATION_NAME: &str = "rls-relay listener";

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("DATABASE_URL is not a valid Postgres connection string: {0}")]
    InvalidUrl(tokio_postgres::Error),
    #[error("cannot build the connection pool: {0}")]
    Pool(String),
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    #[error("no connection from the pool: {0}")]
    Checkout(#[from] deadpool_postgres::PoolError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// The TLS connector for `database` (see [`tls`]).
pub fn tls(database: &DatabaseConfig) -> Result<MakeRustlsConnect, DbError> {
    Ok(tls::connector(database.database_ca_file.as_deref())?)
}

/// Parses the connection string and applies what every relay connection needs: a name
/// that shows in `pg_stat_activity`, a connect timeout, and TCP keepalives so that a dead
/// peer is noticed in seconds rather than after the kernel's two hours.
pub fn connection_config(
    url: &Secret,
    application_name: &str,
) -> Result<tokio_postgres::Config, DbError> {
    let mut config: tokio_postgres::Config = url.expose().parse().map_err(DbError::InvalidUrl)?;
    config.application_name(application_name);
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(5))
        .keepalives_interval(Duration::from_secs(2))
        .keepalives_retries(3);
    Ok(config)
}

/// The pool for visibility queries, replays and housekeeping. Recycling runs `RESET ALL`:
/// the relay only ever sets transaction-local settings, and this makes sure that nothing
/// set at session level, by mistake, survives into the next checkout.
pub fn pool(database: &DatabaseConfig, size: usize) -> Result<Pool, DbError> {
    let config = connection_config(&database.database_url, POOL_APPLICATION_NAME)?;
    let manager = Manager::from_config(
        config,
        tls(database)?,
        ManagerConfig {
            recycling_method: RecyclingMethod::Custom("RESET ALL".into()),
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(10)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| DbError::Pool(e.to_string()))
}

/// One connection outside the pool, driven by a spawned task (migrations, checks).
pub async fn connect_once(
    database: &DatabaseConfig,
    application_name: &str,
) -> Result<tokio_postgres::Client, DbError> {
    let config = connection_config(&database.database_url, application_name)?;
    let (client, connection) = config.connect(tls(database)?).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "connection closed");
        }
    });
    Ok(client)
}
