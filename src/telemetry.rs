//! Logging: `tracing` to stderr, human-readable or one JSON object per line.
//!
//! Nothing in this crate logs a token, a query string or a claims body; the `Authorization`
//! header never reaches a span. Tests grep captured logs for tokens to keep it so.
//!
//! Two dependencies would: tokio-postgres logs every statement with its parameters at
//! debug level (the visibility query's parameters are the user's claims), and tungstenite
//! logs every message received at trace level (an `auth` message holds a token). So they
//! stay at info and debug whatever the filter says, unless the filter names them
//! explicitly (someone debugging that layer, who then sees claims or tokens in the log).

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter};

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber; a second call (tests, embedded use) is a no-op.
pub fn init(config: &LogConfig) {
    let filter = filter(&config.log_filter);
    let registry = tracing_subscriber::registry().with(filter);
    let _already_installed = match config.log_format {
        LogFormat::Human => registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
}

/// Targets whose finer levels log secrets, and the most they may log by default.
const CAPPED: [(&str, &str); 2] = [("tokio_postgres", "info"), ("tungstenite", "debug")];

fn filter(spec: &str) -> EnvFilter {
    let mut filter = EnvFilter::try_new(spec).unwrap_or_else(|_| EnvFilter::new("info"));
    for (target, level) in CAPPED {
        if spec.contains(target) {
            continue;
        }
        if let Ok(directive) = format!("{target}={level}").parse() {
            filter = filter.add_directive(directive);
        }
    }
    filter
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_parameters_stay_out_of_debug_logs_unless_asked_for() {
        assert!(filter("debug").to_string().contains("tokio_postgres=info"));
        assert!(filter("trace").to_string().contains("tokio_postgres=info"));
        assert!(filter("trace").to_string().contains("tungstenite=debug"));
        assert!(!filter("debug,tokio_postgres=debug")
            .to_string()
            .contains("tokio_postgres=info"));
    }
}
