//! The benchmark's knobs: environment variables (`BENCH_*`), or `--quick` after `--` for
//! a smoke run. Defaults are the workload of the performance issue.

use std::time::Duration;

use anyhow::{bail, Context};

#[derive(Clone, Debug)]
pub struct Options {
    /// Users of the example schema; each owns `credentials / users` credentials.
    pub users: usize,
    pub credentials: usize,
    /// Credentials shared with a second user through `credential_members`.
    pub shared: usize,
    /// Positions and open orders per credential (one of each per symbol).
    pub symbols: usize,
    /// WebSockets per user in the delivery phases; each subscribes to everything.
    pub sockets_per_user: usize,
    /// Concurrent writer connections (superuser, like a trading engine service).
    pub writers: usize,
    /// Rounds of [no trigger, naive NOTIFY, relay adaptive, relay notify] bursts.
    pub rounds: usize,
    /// Writers run flat out this long per burst...
    pub burst: Duration,
    /// ...of which the first part is not counted in commits/s.
    pub warmup: Duration,
    /// Fixed write rate (transactions/s) of the latency phase, and its length.
    pub latency_rate: f64,
    pub latency_duration: Duration,
    /// Idle authenticated, subscribed sockets of the memory and connect phase.
    pub idle_sockets: usize,
    /// Sockets connecting at once.
    pub connect_concurrency: usize,
}

impl Options {
    pub fn from_env_and_args() -> anyhow::Result<Self> {
        // `cargo bench` passes `--bench`; anything else unknown is a mistake.
        let mut quick = false;
        for arg in std::env::args().skip(1) {
            match arg.as_str() {
                "--bench" => {}
                "--quick" => quick = true,
                "-h" | "--help" => {
                    eprintln!("{}", HELP);
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?}\n{HELP}"),
            }
        }
        let defaults = if quick {
            Self::quick()
        } else {
            Self::default()
        };
        let options = Self {
            users: env_usize("BENCH_USERS", defaults.users)?,
            credentials: env_usize("BENCH_CREDENTIALS", defaults.credentials)?,
            shared: env_usize("BENCH_SHARED", defaults.shared)?,
            symbols: env_usize("BENCH_SYMBOLS", defaults.symbols)?,
            sockets_per_user: env_usize("BENCH_SOCKETS_PER_USER", defaults.sockets_per_user)?,
            writers: env_usize("BENCH_WRITERS", defaults.writers)?,
            rounds: env_usize("BENCH_ROUNDS", defaults.rounds)?,
            burst: env_duration("BENCH_BURST", defaults.burst)?,
            warmup: env_duration("BENCH_WARMUP", defaults.warmup)?,
            latency_rate: env_f64("BENCH_LATENCY_RATE", defaults.latency_rate)?,
            latency_duration: env_duration("BENCH_LATENCY_DURATION", defaults.latency_duration)?,
            idle_sockets: env_usize("BENCH_IDLE_SOCKETS", defaults.idle_sockets)?,
            connect_concurrency: env_usize(
                "BENCH_CONNECT_CONCURRENCY",
                defaults.connect_concurrency,
            )?,
        };
        options.validate()?;
        Ok(options)
    }

    fn quick() -> Self {
        Self {
            rounds: 1,
            burst: Duration::from_secs(2),
            warmup: Duration::from_millis(500),
            latency_duration: Duration::from_secs(3),
            idle_sockets: 2_000,
            ..Self::default()
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.users == 0 || self.credentials < self.users {
            bail!("BENCH_CREDENTIALS must be at least BENCH_USERS (every user owns one), and both > 0");
        }
        if self.shared > self.credentials || (self.shared > 0 && self.users < 2) {
            bail!("BENCH_SHARED must be at most BENCH_CREDENTIALS, and sharing needs two users");
        }
        if self.writers == 0 || self.writers > self.credentials {
            bail!("BENCH_WRITERS must be between 1 and BENCH_CREDENTIALS (writers own disjoint credentials)");
        }
        if self.rounds == 0 || self.symbols == 0 || self.sockets_per_user == 0 {
            bail!("BENCH_ROUNDS, BENCH_SYMBOLS and BENCH_SOCKETS_PER_USER must be > 0");
        }
        if self.warmup >= self.burst {
            bail!("BENCH_WARMUP must be shorter than BENCH_BURST");
        }
        if self.latency_rate <= 0.0 || self.connect_concurrency == 0 {
            bail!("BENCH_LATENCY_RATE and BENCH_CONNECT_CONCURRENCY must be > 0");
        }
        Ok(())
    }

    pub fn sockets(&self) -> usize {
        self.users * self.sockets_per_user
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            users: 100,
            credentials: 200,
            shared: 20,
            symbols: 5,
            sockets_per_user: 10,
            writers: 16,
            rounds: 3,
            burst: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            latency_rate: 200.0,
            latency_duration: Duration::from_secs(10),
            idle_sockets: 10_000,
            connect_concurrency: 200,
        }
    }
}

const HELP: &str = "\
usage: cargo bench --bench relay [-- --quick]

Environment (defaults in brackets):
  BENCH_USERS [100]  BENCH_CREDENTIALS [200]  BENCH_SHARED [20]  BENCH_SYMBOLS [5]
  BENCH_SOCKETS_PER_USER [10]  BENCH_WRITERS [16]
  BENCH_ROUNDS [3]  BENCH_BURST [5s]  BENCH_WARMUP [1s]
  BENCH_LATENCY_RATE [200]  BENCH_LATENCY_DURATION [10s]
  BENCH_IDLE_SOCKETS [10000]  BENCH_CONNECT_CONCURRENCY [200]
--quick: 1 round of 2 s bursts, a 3 s latency phase, 2,000 idle sockets.";

fn env_usize(name: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(name) {
        Ok(raw) => raw
            .replace(['_', ','], "")
            .parse()
            .with_context(|| format!("{name}={raw:?} is not a whole number")),
        Err(_) => Ok(default),
    }
}

fn env_f64(name: &str, default: f64) -> anyhow::Result<f64> {
    match std::env::var(name) {
        Ok(raw) => raw
            .parse()
            .with_context(|| format!("{name}={raw:?} is not a number")),
        Err(_) => Ok(default),
    }
}

fn env_duration(name: &str, default: Duration) -> anyhow::Result<Duration> {
    match std::env::var(name) {
        Ok(raw) => humantime::parse_duration(&raw)
            .with_context(|| format!("{name}={raw:?} is not a duration (examples: 500ms, 5s)")),
        Err(_) => Ok(default),
    }
}
