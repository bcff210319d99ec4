//! Command line and configuration: every setting is a flag with an environment variable
//! behind it, parsed and validated once here. Secrets are wrapped so that `Debug` and
//! `--help` never print them.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "rls-relay",
    version,
    about = "Relays Postgres row changes to WebSocket clients, each event only to the users \
             whose Row-Level Security policies let them see it.",
    long_about = None,
    after_help = "Start with `rls-relay demo`: it needs no configuration (a throwaway Postgres, \
                  two users side by side at http://127.0.0.1:8080/).\n\
                  Every setting of `serve` and `check` is a flag and an environment variable \
                  (`rls-relay serve --help`); .env.example lists them with comments."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve WebSockets: audit the database, LISTEN, relay events.
    Serve(Box<ServeConfig>),
    /// Install or upgrade the relay's own schema (`relay`) in the database.
    Migrate(MigrateConfig),
    /// Run the start-up audit and exit: non-zero, with the fix, when RLS would not hold.
    Check(Box<ServeConfig>),
    /// Start a throwaway Postgres with the example trading schema, a trade simulator and
    /// a page at / that shows two users side by side.
    Demo(DemoConfig),
}

#[derive(Debug, Clone, Args)]
pub struct DatabaseConfig {
    /// Connection string of the relay's own login: it reads the outbox and must be able
    /// to SET ROLE to RELAY_DB_ROLE. Use a direct (or session-pooled) connection to the
    /// primary: LISTEN does not work through transaction pooling or on a standby.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Secret,

    /// Verify the server's certificate against these roots (a PEM file, or `system`):
    /// chain and host name, like libpq's verify-full. Unset: TLS as `sslmode` in
    /// DATABASE_URL says (prefer by default), encrypted but not verified, like libpq.
    #[arg(long, env = "RELAY_DATABASE_CA_FILE")]
    pub database_ca_file: Option<String>,
}

impl DatabaseConfig {
    /// A connection string with libpq's TLS defaults.
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            database_url: Secret::new(database_url),
            database_ca_file: None,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct MigrateConfig {
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub log: LogConfig,
}

#[derive(Debug, Clone, Args)]
pub struct LogConfig {
    /// Log format: human-readable lines or one JSON object per line.
    #[arg(long, env = "RELAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// Log filter, in tracing's EnvFilter syntax.
    #[arg(long, env = "RELAY_LOG", default_value = "info")]
    pub log_filter: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub log: LogConfig,
    #[command(flatten)]
    pub jwt: JwtConfig,
    #[command(flatten)]
    pub visibility: VisibilityConfig,
    #[command(flatten)]
    pub limits: LimitsConfig,

    /// Address the HTTP/WebSocket server binds to.
    #[arg(long, env = "RELAY_LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen_addr: SocketAddr,

    /// NOTIFY channel that wakes this relay.
    #[arg(long, env = "RELAY_CHANNEL", default_value = "rls_relay", value_parser = parse_identifier)]
    pub channel: String,

    /// How writers wake the relay. `adaptive`: writers NOTIFY only while the relay is idle;
    /// a busy relay reads the outbox continuously, which keeps writers off Postgres'
    /// NOTIFY commit lock. `notify`: every writing transaction NOTIFYs.
    #[arg(long, env = "RELAY_WAKEUP", value_enum, default_value_t = WakeupMode::Adaptive)]
    pub wakeup: WakeupMode,

    /// Browser origins allowed to open a WebSocket, comma-separated (`*` for any). Empty:
    /// same origin only. Requests without an Origin header (non-browser clients) pass.
    #[arg(
        long,
        env = "RELAY_ALLOWED_ORIGINS",
        value_delimiter = ',',
        default_value = ""
    )]
    pub allowed_origins: Vec<String>,

    /// How long outbox events are kept for clients that resume.
    #[arg(long, env = "RELAY_RETENTION", default_value = "1h", value_parser = parse_duration)]
    pub retention: Duration,

    /// Connections in the pool used for visibility queries and replays.
    #[arg(long, env = "RELAY_POOL_SIZE", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=512))]
    pub pool_size: u16,

    /// How long graceful shutdown waits for sockets to close.
    #[arg(long, env = "RELAY_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Deliberate faults for tests that prove they can catch a leak. Not reachable from
    /// the command line or the environment.
    #[arg(skip)]
    pub faults: FaultInjection,
}

/// Deliberate faults, settable only by code that builds a [`ServeConfig`] (tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct FaultInjection {
    /// Ignore visibility announcements: cached answers are never invalidated.
    pub ignore_visibility_announcements: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WakeupMode {
    Adaptive,
    Notify,
}

#[derive(Debug, Clone, Args)]
pub struct VisibilityConfig {
    /// The role the REST API uses: visibility is asked of Postgres as this role. It must
    /// not be a superuser or have BYPASSRLS.
    #[arg(long, env = "RELAY_DB_ROLE", default_value = "app_user", value_parser = parse_identifier)]
    pub db_role: String,

    /// The setting the policies read the JWT claims from (set transaction-locally).
    #[arg(long, env = "RELAY_CLAIMS_SETTING", default_value = "request.jwt.claims", value_parser = parse_setting_name)]
    pub claims_setting: String,

    /// Returns the credential ids the current claims may see (one column). Runs as
    /// RELAY_DB_ROLE, so RLS answers.
    #[arg(
        long,
        env = "RELAY_VISIBILITY_SQL",
        default_value = "select id from public.credentials"
    )]
    pub visibility_sql: String,

    /// Deadline of one visibility query; past it the user gets nothing (fail closed).
    #[arg(long, env = "RELAY_VISIBILITY_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub visibility_timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct JwtConfig {
    /// HS256 shared secret.
    #[arg(long, env = "RELAY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,

    /// PEM file with the RS256 or ES256 public key.
    #[arg(long, env = "RELAY_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,

    /// JWKS file (keys selected by `kid`), read once at start.
    #[arg(long, env = "RELAY_JWT_JWKS_FILE")]
    pub jwt_jwks_file: Option<PathBuf>,

    /// JWKS URL (keys selected by `kid`), fetched at start, again when a token names an
    /// unknown `kid` or the keys are older than 10 minutes, at most once per
    /// RELAY_JWT_JWKS_MIN_REFRESH.
    #[arg(long, env = "RELAY_JWT_JWKS_URL")]
    pub jwt_jwks_url: Option<String>,

    /// Least time between two fetches of RELAY_JWT_JWKS_URL, so that tokens with made-up
    /// `kid`s cannot make the relay hammer the identity provider.
    #[arg(long, env = "RELAY_JWT_JWKS_MIN_REFRESH", default_value = "30s", value_parser = parse_duration)]
    pub jwt_jwks_min_refresh: Duration,

    /// Algorithm the configured key is for. Defaults: HS256 for a secret; read from the
    /// PEM for a public key.
    #[arg(long, env = "RELAY_JWT_ALGORITHM", value_enum)]
    pub jwt_algorithm: Option<JwtAlgorithm>,

    /// Required `iss`, when set.
    #[arg(long, env = "RELAY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Required `aud` (one of them), comma-separated, when set.
    #[arg(long, env = "RELAY_JWT_AUDIENCE", value_delimiter = ',')]
    pub jwt_audience: Vec<String>,

    /// Clock skew tolerated on `exp` and `nbf`.
    #[arg(long, env = "RELAY_JWT_LEEWAY", default_value = "5s", value_parser = parse_duration)]
    pub jwt_leeway: Duration,

    /// The claim that names the user (connection limits, `welcome`, refresh checks).
    #[arg(long, env = "RELAY_USER_CLAIM", default_value = "sub")]
    pub user_claim: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "UPPER")]
pub enum JwtAlgorithm {
    #[value(name = "HS256")]
    Hs256,
    #[value(name = "RS256")]
    Rs256,
    #[value(name = "ES256")]
    Es256,
}

#[derive(Debug, Clone, Args)]
pub struct LimitsConfig {
    /// Open WebSockets in total; past it upgrades get HTTP 503.
    #[arg(long, env = "RELAY_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Open WebSockets per user; past it: HTTP 429 before the upgrade, or close 4029.
    #[arg(long, env = "RELAY_MAX_CONNECTIONS_PER_USER", default_value_t = 32)]
    pub max_connections_per_user: usize,

    /// Subscriptions per socket.
    #[arg(long, env = "RELAY_MAX_SUBSCRIPTIONS", default_value_t = 64)]
    pub max_subscriptions: usize,

    /// Largest inbound message (close 1009 past it).
    #[arg(long, env = "RELAY_MAX_FRAME_BYTES", default_value_t = 65_536)]
    pub max_frame_bytes: usize,

    /// Events queued for one socket before it is closed as a slow consumer (4008).
    #[arg(long, env = "RELAY_SEND_QUEUE_MESSAGES", default_value_t = 1_024)]
    pub send_queue_messages: usize,

    /// Bytes queued for one socket before it is closed as a slow consumer (4008).
    #[arg(long, env = "RELAY_SEND_QUEUE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub send_queue_bytes: usize,

    /// Inbound messages per second per socket (a burst of as many is allowed); past it 4029.
    #[arg(long, env = "RELAY_MAX_MESSAGES_PER_SECOND", default_value_t = 50)]
    pub max_messages_per_second: u32,

    /// How long a socket may take to authenticate (4001 past it).
    #[arg(long, env = "RELAY_AUTH_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub auth_timeout: Duration,

    /// Interval of server pings; a socket that does not answer within another interval
    /// is closed.
    #[arg(long, env = "RELAY_PING_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub ping_interval: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct DemoConfig {
    /// Address the demo serves on.
    #[arg(long, env = "RELAY_LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    pub listen_addr: SocketAddr,
    /// Trades per second of the simulator (each places or fills an order on one account).
    #[arg(long, env = "RELAY_DEMO_TRADES_PER_SECOND", default_value_t = 2.0, value_parser = parse_rate)]
    pub trades_per_second: f64,
    /// Use this database instead of starting a throwaway Postgres (it must be empty).
    #[arg(long, env = "RELAY_DEMO_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<Secret>,
    /// Lifetime of the tokens the demo page gets (short, so that refreshes show).
    #[arg(long, env = "RELAY_DEMO_TOKEN_TTL", default_value = "2m", value_parser = parse_duration)]
    pub token_ttl: Duration,
    #[command(flatten)]
    pub log: LogConfig,
}

/// A string that must never be printed: JWT secrets, connection strings.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    humantime::parse_duration(raw).map_err(|e| format!("{e} (examples: 500ms, 10s, 1h)"))
}

/// A rate: positive, finite, at most 1000 per second.
fn parse_rate(raw: &str) -> Result<f64, String> {
    match raw.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 && rate <= 1000.0 => Ok(rate),
        _ => Err("expected a number above 0 and at most 1000".into()),
    }
}

/// A Postgres identifier used as a role or channel name: it ends up quoted in SQL text
/// (SET ROLE and LISTEN take no parameters), so it is restricted to what needs no care.
pub fn parse_identifier(raw: &str) -> Result<String, String> {
    let mut chars = raw.chars();
    let valid_start = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if valid_start
        && raw.len() <= 63
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
    {
        Ok(raw.to_owned())
    } else {
        Err("expected a Postgres identifier: a letter or _, then letters, digits, _ or $ (at most 63)".into())
    }
}

/// A custom setting name such as `request.jwt.claims`: dot-separated identifiers.
fn parse_setting_name(raw: &str) -> Result<String, String> {
    if raw.contains('.') && raw.split('.').all(|part| parse_identifier(part).is_ok()) {
        Ok(raw.to_owned())
    } else {
        Err("expected a custom setting name such as request.jwt.claims".into())
    }
}

/// Double-quotes an identifier already checked by [`parse_identifier`].
pub fn quote_identifier(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn role_and_channel_names_cannot_smuggle_sql() {
        assert!(parse_identifier("app_user").is_ok());
        for bad in ["", "1abc", "app user", "x\";drop", "a-b", &"a".repeat(64)] {
            assert!(parse_identifier(bad).is_err(), "{bad:?}");
        }
        assert!(parse_setting_name("request.jwt.claims").is_ok());
        assert!(parse_setting_name("claims").is_err());
        assert!(parse_setting_name("a.b'c").is_err());
    }

    #[test]
    fn rates_are_positive_and_finite() {
        assert_eq!(parse_rate("2.5"), Ok(2.5));
        for bad in ["0", "-1", "NaN", "inf", "1001", "fast"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), "Secret(..)");
    }
}
