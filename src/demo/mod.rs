//! `rls-relay demo`: the whole thing on one machine with no configuration.
//!
//! ```text
//!  throwaway Postgres ── relay migrations + example schema + seed (alice, bob, a shared credential)
//!        ▲    │
//!  simulator  └──▶ the relay, in process, HS256 with a random secret ──▶ /ws
//!  (trades)        + demo routes: the page at /, short-lived tokens, REST snapshot, controls
//! ```
//!
//! Ctrl-C (or SIGTERM) stops the relay as `serve` would, stops the simulator, then stops
//! and deletes the throwaway Postgres.

mod database;
mod routes;
mod trading;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use jsonwebtoken::EncodingKey;
use tokio_util::sync::CancellationToken;

use crate::auth::Verifier;
use crate::config::{Cli, Command, DatabaseConfig, DemoConfig, Secret, ServeConfig};
use crate::db::{self, migrate};
use crate::startup::Application;
use database::DemoDatabase;

/// Runs the demo until `stop` is cancelled (Ctrl-C/SIGTERM in `main`).
pub async fn run(config: DemoConfig, stop: CancellationToken) -> anyhow::Result<()> {
    let started = Instant::now();
    let database = tokio::select! {
        database = DemoDatabase::start(config.database_url.as_ref().map(Secret::expose)) => database?,
        () = stop.cancelled() => return Ok(()),
    };
    tracing::info!(database = %database.description, "demo database");
    // From here on `database` is dropped (the throwaway server stopped and deleted) on
    // every path out of this function, errors included, and only after the relay has
    // closed its sockets.
    let outcome = serve(&config, &database, started, stop.clone()).await;
    let throwaway = database.is_throwaway();
    drop(database);
    if throwaway {
        println!("rls-relay demo: stopped; the throwaway Postgres is stopped and deleted");
    }
    outcome
}

async fn serve(
    config: &DemoConfig,
    database: &DemoDatabase,
    started: Instant,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let url = Secret::new(database.url());
    let connect = DatabaseConfig::new(database.url());
    let mut admin = db::connect_once(&connect, "rls-relay demo").await?;
    migrate::run(&mut admin)
        .await
        .context("applying the relay's migrations")?;
    admin.batch_execute(migrate::EXAMPLE_SCHEMA).await.context(
        "applying the example schema (RELAY_DEMO_DATABASE_URL must be an empty database)",
    )?;
    let world = trading::seed(&admin).await?;

    let secret = random_secret();
    let serve_config = serve_config(config, &url, &secret)?;
    let verifier = Arc::new(Verifier::from_config(&serve_config.jwt)?);
    let listen_addr = serve_config.listen_addr;
    let app = Application::build(serve_config).await.with_context(|| {
        format!(
            "starting the relay on {listen_addr} (another address: --listen-addr 127.0.0.1:0 picks a free port)"
        )
    })?;
    let state = Arc::new(routes::DemoState {
        pool: db::pool(&connect, 4)?,
        signer: EncodingKey::from_secret(secret.expose().as_bytes())?,
        verifier,
        token_ttl: config.token_ttl,
        world: world.clone(),
    });
    let app = app.with_routes(routes::router(state));
    let port = app.port();
    let router = app.router();
    let relay_stop = stop.clone();
    let relay = tokio::spawn(app.run_until_stopped(async move { relay_stop.cancelled().await }));

    let simulator_client = db::connect_once(&connect, "rls-relay demo simulator").await?;
    let simulator = tokio::spawn(trading::simulate(
        simulator_client,
        world,
        config.trades_per_second,
        stop.clone(),
    ));

    let deadline = Instant::now() + Duration::from_secs(30);
    while !router.status().is_ready() && !stop.is_cancelled() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the relay was not ready within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let host = match config.listen_addr.ip() {
        ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    let page = format!("http://{host}:{port}/");
    // Tests read the first line: keep its shape.
    println!("rls-relay demo: {page}");
    println!(
        "  ready in {:.1} s; Postgres: {}; {} trades/s; tokens live {}",
        started.elapsed().as_secs_f64(),
        database.description,
        config.trades_per_second,
        humantime::format_duration(config.token_ttl),
    );
    println!(
        "  try: TOKEN=$(curl -s -X POST {page}demo/token/alice | sed 's/.*\"token\":\"\\([^\"]*\\)\".*/\\1/')"
    );
    println!("       websocat ws://{host}:{port}/ws  then send {{\"type\":\"auth\",\"token\":\"$TOKEN\"}} and {{\"type\":\"subscribe\"}}");
    println!("  metrics: {page}metrics   Ctrl-C stops and deletes everything");

    let served = relay.await.context("the relay task panicked")?;
    stop.cancel();
    let _ = simulator.await;
    served.context("serving")?;
    Ok(())
}

/// The relay's settings: `serve`'s defaults (and whatever RELAY_* the environment sets,
/// such as RELAY_LOG or the limits), with the database, address and key the demo owns.
fn serve_config(demo: &DemoConfig, url: &Secret, secret: &Secret) -> anyhow::Result<ServeConfig> {
    let listen = demo.listen_addr.to_string();
    let cli = Cli::try_parse_from([
        "rls-relay",
        "serve",
        "--database-url",
        url.expose(),
        "--listen-addr",
        &listen,
        "--jwt-secret",
        secret.expose(),
    ])
    .context("building the relay's configuration")?;
    let Command::Serve(mut config) = cli.command else {
        anyhow::bail!("unexpected command");
    };
    // Only the demo's key: a key source from the environment would be a second one.
    config.jwt.jwt_public_key_file = None;
    config.jwt.jwt_jwks_file = None;
    config.jwt.jwt_jwks_url = None;
    config.jwt.jwt_algorithm = None;
    config.jwt.jwt_issuer = None;
    config.jwt.jwt_audience.clear();
    config.jwt.user_claim = "sub".into();
    config.log = demo.log.clone();
    Ok(*config)
}

/// 32 random bytes, hex: the HS256 secret of this run only.
fn random_secret() -> Secret {
    let hex: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    Secret::new(hex)
}
