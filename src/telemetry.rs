//! Logging: `tracing` to stderr, human-readable or one JSON object per line.
//!
//! Nothing in this crate logs a token, a query string or a claims body; the `Authorization`
//! header never reaches a span. Tests grep captured logs for tokens to keep it so.
//!
//! Two dependencies would: tokio-postgres logs every statement with its parameters at
//! debug level (the visibility query's parameters are the user's claims), and tungstenite
//! logs every message received at trace level (an `auth` message holds a token). So, on
//! top of RELAY_LOG, a second filter caps them at info and debug, unless RELAY_LOG names
//! them explicitly (someone debugging that layer, who then sees claims or tokens).

use tracing::Level;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

use crate::config::{LogConfig, LogFormat};

/// Targets whose finer levels log secrets, and the most they may log unless named.
const CAPPED: [(&str, Level); 2] = [
    ("tokio_postgres", Level::INFO),
    ("tungstenite", Level::DEBUG),
];

/// Installs the global subscriber; a second call (tests, embedded use) is a no-op.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_new(&config.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let most_verbose = filter.max_level_hint();
    let caps = caps(&config.log_filter);

    let registry = tracing_subscriber::registry().with(filter);
    let _already_installed = match config.log_format {
        LogFormat::Human => registry
            .with(fmt::layer().with_writer(std::io::stderr).with_filter(caps))
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr)
                    .with_filter(caps),
            )
            .try_init(),
    };
    // The bridge from the `log` crate (tokio-postgres logs through it) lets every record
    // through to be filtered here; tell `log` the real ceiling, so that the statement logs
    // of every query are skipped at the call site instead.
    log::set_max_level(match most_verbose {
        Some(LevelFilter::OFF) => log::LevelFilter::Off,
        Some(LevelFilter::ERROR) => log::LevelFilter::Error,
        Some(LevelFilter::WARN) => log::LevelFilter::Warn,
        Some(LevelFilter::INFO) => log::LevelFilter::Info,
        Some(LevelFilter::DEBUG) => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    });
}

/// Everything passes, but the capped targets only up to their cap. An event is logged
/// when both RELAY_LOG and this allow it, so a cap never makes a target more verbose.
fn caps(spec: &str) -> Targets {
    CAPPED
        .iter()
        .filter(|(target, _)| !spec.contains(target))
        .fold(
            Targets::new().with_default(LevelFilter::TRACE),
            |targets, (target, level)| targets.with_target(*target, *level),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_parameters_and_messages_stay_out_of_logs_unless_asked_for() {
        let caps = caps("trace");
        assert!(!caps.would_enable("tokio_postgres::query", &Level::DEBUG));
        assert!(caps.would_enable("tokio_postgres::query", &Level::INFO));
        assert!(!caps.would_enable("tungstenite::protocol", &Level::TRACE));
        assert!(caps.would_enable("rls_relay::ws::session", &Level::TRACE));
        let asked = super::caps("info,tokio_postgres=debug");
        assert!(asked.would_enable("tokio_postgres::query", &Level::DEBUG));
        assert!(!asked.would_enable("tungstenite::protocol", &Level::TRACE));
    }
}
