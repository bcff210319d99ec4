//! `make bench`: what the relay costs the writers, how fast and how completely it
//! delivers, how late, and how much memory a socket takes, each against a baseline
//! measured in the same run.
//!
//! ```text
//!  16 writers ──fills──▶ durable Postgres ──outbox + wake-up──▶ rls-relay (release binary,
//!  (own runtime)          (throwaway cluster)                   its own process)
//!                                │ per-row NOTIFY (naive design)        │ WebSocket
//!                                ▼                                      ▼
//!                         bare LISTEN client                     1,000 clients (10 per user)
//! ```
//!
//! Rounds of four bursts, in alternating order so that drift on a shared machine spreads
//! evenly: writers flat out with no trigger, with a naive per-row `pg_notify` trigger, and
//! with the relay's triggers while the relay runs in `adaptive` and in `notify` mode. In
//! the relay bursts every socket must receive exactly the events its user may see (checked
//! against the outbox and RLS). Then, per mode, a fixed-rate phase measures commit →
//! socket latency next to a bare LISTEN client receiving a per-row NOTIFY of the same
//! writes. Last, 10,000 idle sockets: connect time and the relay's resident memory.
//!
//! Under `cargo test --all-targets` (no `--bench` argument) it only says so and exits.

mod clients;
mod database;
mod options;
mod process;
mod report;
mod writers;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use jsonwebtoken::{encode, EncodingKey, Header};
use rls_relay::config::WakeupMode;

use clients::{BareListener, Fleet};
use database::{Database, OutboxEvent, Triggers, WaitSampler, Waits, NAIVE_CHANNEL};
use options::Options;
use process::{CpuSample, CpuUse, RelayProcess, RelaySettings};
use report::{ms, thousands, yes_no, Percentiles, Spread};
use writers::Writers;

fn main() -> ExitCode {
    let benchmarking = std::env::args().any(|a| a == "--bench");
    if !benchmarking {
        // `cargo test --all-targets` runs bench targets without `--bench`: a self-check
        // only, never the multi-minute benchmark.
        let ok = clients::event_id(r#"{"type":"order_update","id":42,"order":{"id": 7}}"#)
            == Some(42)
            && clients::event_id(r#"{"type":"welcome","user_id":"u"}"#).is_none();
        println!("rls-relay benchmark: run it with `make bench` (self-check ok: {ok})");
        return if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let result = Options::from_env_and_args().and_then(|options| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bench-client")
            .enable_all()
            .build()?;
        runtime.block_on(run(options))
    });
    match result {
        Ok(table) => {
            println!("{table}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("benchmark failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Progress on stderr, with the time since the start.
struct Progress(Instant);

impl Progress {
    fn say(&self, message: impl AsRef<str>) {
        eprintln!(
            "[{:>6.1}s] {}",
            self.0.elapsed().as_secs_f64(),
            message.as_ref()
        );
    }
}

/// One burst of writers at full speed.
#[derive(Clone, Debug, Default)]
struct Burst {
    commits_per_second: f64,
    /// All commits, warm-up included (for per-commit costs).
    commits: u64,
    cpu: CpuUse,
    /// What the writers' backends were doing, sampled...
    waits: Waits,
    /// ...and the relay's outbox reader.
    reader_waits: Waits,
    wal_flushes_per_second: f64,
    wal_flush_ms: f64,
    wal_bytes: f64,
}

/// Samplers running during a burst.
struct Probe {
    sampler: WaitSampler,
    wal: (i64, f64, i64),
    cpu: CpuSample,
}

impl Probe {
    async fn start(db: &Database, relay: Option<u32>) -> anyhow::Result<Self> {
        Ok(Self {
            sampler: WaitSampler::start(&db.url).await?,
            wal: db.wal_stats().await?,
            cpu: CpuSample::take(db.postmaster_pid, relay),
        })
    }

    async fn finish(
        self,
        db: &Database,
        relay: Option<u32>,
        result: &writers::MaxRate,
    ) -> anyhow::Result<Burst> {
        let cpu = CpuSample::take(db.postmaster_pid, relay);
        let (waits, reader_waits) = self.sampler.stop().await;
        let wal = db.wal_stats().await?;
        let flushes = (wal.0 - self.wal.0).max(0) as f64;
        let seconds = match (self.cpu.at, cpu.at) {
            (Some(a), Some(b)) => b.duration_since(a).as_secs_f64().max(1e-9),
            _ => 1.0,
        };
        Ok(Burst {
            commits_per_second: result.commits_per_second,
            commits: result.commits,
            cpu: CpuUse::between(&self.cpu, &cpu, process::clock_ticks_per_second()),
            waits,
            reader_waits,
            wal_flushes_per_second: flushes / seconds,
            wal_bytes: (wal.2 - self.wal.2).max(0) as f64,
            wal_flush_ms: if flushes > 0.0 {
                (wal.1 - self.wal.1) / flushes
            } else {
                0.0
            },
        })
    }
}

/// A relay burst: the writers' side and what the sockets got.
#[derive(Clone, Debug, Default)]
struct Delivery {
    burst: Burst,
    events: usize,
    committed_events_per_second: f64,
    delivered_events_per_second: f64,
    socket_messages_per_second: f64,
    /// From the writers' stop to the last arrival.
    drain_micros: i64,
    check: Check,
    /// Relay CPU per socket message, burst and drain.
    relay_micros_per_message: f64,
    relay_micros_per_event: f64,
    notifications: f64,
    reads: f64,
}

/// Each socket against what its user may see.
#[derive(Clone, Debug, Default)]
struct Check {
    expected: u64,
    received: u64,
    missing: u64,
    /// Events a socket got that its user may not see, or from outside the phase.
    unexpected: u64,
    duplicates: u64,
    ended: Vec<String>,
}

impl Check {
    fn clean(&self) -> bool {
        self.missing == 0 && self.unexpected == 0 && self.duplicates == 0 && self.ended.is_empty()
    }

    fn summary(&self) -> String {
        let mut text = format!(
            "{} of {} deliveries",
            thousands(self.received as f64),
            thousands(self.expected as f64)
        );
        if self.missing > 0 {
            let _ = write!(text, ", {} missing", self.missing);
        }
        if self.unexpected > 0 {
            let _ = write!(
                text,
                ", {} NOT VISIBLE TO THE SOCKET'S USER",
                self.unexpected
            );
        }
        if self.duplicates > 0 {
            let _ = write!(text, ", {} duplicates", self.duplicates);
        }
        if !self.ended.is_empty() {
            let _ = write!(
                text,
                ", {} sockets closed (first: {})",
                self.ended.len(),
                self.ended[0]
            );
        }
        text
    }
}

#[derive(Clone, Debug, Default)]
struct Latency {
    rate: f64,
    relay: Percentiles,
    bare: Percentiles,
    check: Check,
    notifications: f64,
}

#[derive(Default)]
struct ModeResults {
    /// Writers flat out with the relay running and reading every event, no socket
    /// connected: the write path's cost (figure 1).
    write_path: Vec<Burst>,
    deliveries: Vec<Delivery>,
    latency: Option<Latency>,
    visibility_queries: f64,
    events_in: f64,
    deliveries_total: f64,
    rss_kib_1000: Vec<u64>,
}

struct Idle {
    sockets: usize,
    rss_before_kib: u64,
    rss_after_kib: u64,
    connect: Duration,
    visibility_queries: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    NoTrigger,
    Naive,
    Relay(WakeupMode),
}

async fn run(options: Options) -> anyhow::Result<String> {
    let progress = Progress(Instant::now());
    let needed = options.idle_sockets.max(options.sockets()) as u64 + 512;
    match process::open_files_limit() {
        Some(limit) if limit < needed => bail!(
            "the open-files limit is {limit}, {needed} are needed (sockets here and in the relay): \
             run `ulimit -n {needed}` first (make bench does), or lower BENCH_IDLE_SOCKETS"
        ),
        _ => {}
    }
    let work_dir = std::env::temp_dir().join(format!("rls-relay-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work_dir)?;
    let ticks = process::clock_ticks_per_second();

    progress.say("starting a durable throwaway Postgres and seeding the workload");
    let db = Database::start(&options).await?;
    let tokens: Vec<String> = db
        .users
        .iter()
        .map(|u| mint_token(u))
        .collect::<anyhow::Result<_>>()?;
    let writers = Writers::connect(&db.url, options.writers, &db.targets).await?;
    let bare = BareListener::connect(&db.url, NAIVE_CHANNEL).await?;
    let fleet_users: Vec<usize> = (0..options.users)
        .flat_map(|u| std::iter::repeat_n(u, options.sockets_per_user))
        .collect();
    progress.say(format!(
        "{} users, {} credentials ({} shared), {} targets; {} writers",
        db.users.len(),
        db.credentials.len(),
        options.shared,
        db.targets.len(),
        options.writers
    ));

    let mut no_trigger: Vec<Burst> = Vec::new();
    let mut naive: Vec<Burst> = Vec::new();
    let mut modes: HashMap<&'static str, ModeResults> = HashMap::new();
    let mut per_round_ratio: HashMap<String, Vec<f64>> = HashMap::new();
    let order = [
        Kind::NoTrigger,
        Kind::Naive,
        Kind::Relay(WakeupMode::Adaptive),
        Kind::Relay(WakeupMode::Notify),
    ];
    for round in 0..options.rounds {
        let mut kinds = order.to_vec();
        if round % 2 == 1 {
            kinds.reverse();
        }
        let mut this_round: HashMap<&'static str, f64> = HashMap::new();
        for kind in kinds {
            match kind {
                Kind::NoTrigger | Kind::Naive => {
                    let triggers = if kind == Kind::Naive {
                        Triggers::Naive
                    } else {
                        Triggers::None
                    };
                    db.set_triggers(triggers).await?;
                    bare.reset();
                    let burst = plain_burst(&db, &writers, &options, None).await?;
                    progress.say(format!(
                        "round {}/{}: {:<10} {:>7} commits/s",
                        round + 1,
                        options.rounds,
                        label(kind),
                        thousands(burst.commits_per_second)
                    ));
                    this_round.insert(label(kind), burst.commits_per_second);
                    if kind == Kind::Naive {
                        naive.push(burst);
                    } else {
                        no_trigger.push(burst);
                    }
                }
                Kind::Relay(mode) => {
                    let session = Session {
                        db: &db,
                        writers: &writers,
                        bare: &bare,
                        tokens: &tokens,
                        fleet_users: &fleet_users,
                        options: &options,
                        progress: &progress,
                        ticks,
                    };
                    let log_path = work_dir.join(format!("relay-{}-{round}.log", label(kind)));
                    let results = modes.entry(label(kind)).or_default();
                    let (write_path, with_sockets) =
                        session.run(mode, round, log_path, results).await?;
                    this_round.insert(label(kind), write_path);
                    this_round.insert(sockets_label(mode), with_sockets);
                }
            }
        }
        let base = this_round.get("no trigger").copied().unwrap_or(f64::NAN);
        let naive_rate = this_round.get("naive").copied().unwrap_or(f64::NAN);
        for mode in ["adaptive", "notify", "adaptive+sockets", "notify+sockets"] {
            if let Some(rate) = this_round.get(mode) {
                per_round_ratio
                    .entry(format!("{mode}/none"))
                    .or_default()
                    .push(rate / base);
                per_round_ratio
                    .entry(format!("{mode}/naive"))
                    .or_default()
                    .push(rate / naive_rate);
            }
        }
    }
    db.set_triggers(Triggers::Relay).await?;

    progress.say(format!(
        "idle phase: {} sockets",
        thousands(options.idle_sockets as f64)
    ));
    let idle = idle_phase(&db, &tokens, &options, &work_dir).await?;
    progress.say(format!(
        "{} sockets connected, authenticated and subscribed in {:.2} s; relay RSS {} → {} KiB",
        thousands(idle.sockets as f64),
        idle.connect.as_secs_f64(),
        thousands(idle.rss_before_kib as f64),
        thousands(idle.rss_after_kib as f64)
    ));

    let machine = Machine::describe(&db);
    drop(bare);
    drop(writers);
    let _ = std::fs::remove_dir_all(&work_dir);
    Ok(render(
        &options,
        &machine,
        &no_trigger,
        &naive,
        &modes,
        &per_round_ratio,
        &idle,
    ))
}

/// One relay session: a fresh relay process in `mode`, the sockets, a burst checked
/// socket by socket, in the first round the latency phase, and the steady-state counters.
struct Session<'a> {
    db: &'a Database,
    writers: &'a Writers,
    bare: &'a BareListener,
    tokens: &'a [String],
    fleet_users: &'a [usize],
    options: &'a Options,
    progress: &'a Progress,
    ticks: f64,
}

impl Session<'_> {
    /// Returns the commits/s of the write-path burst (no sockets) and of the delivery
    /// burst (every socket served on the same cores).
    async fn run(
        &self,
        mode: WakeupMode,
        round: usize,
        log_path: PathBuf,
        results: &mut ModeResults,
    ) -> anyhow::Result<(f64, f64)> {
        let (db, options) = (self.db, self.options);
        let name = label(Kind::Relay(mode));
        db.set_triggers(Triggers::Relay).await?;
        db.forget_listeners().await?;
        let relay = RelayProcess::start(&RelaySettings {
            database_url: db.url.clone(),
            wakeup: mode,
            max_connections_per_user: options.sockets_per_user.max(32),
            log_path,
        })
        .await?;
        // The write path first, with no socket connected: the relay reads every event as
        // it does in production, while its fan-out (which would run on other machines
        // there) does not take these 2 cores from Postgres. The delivery burst below
        // measures the writers again with the fan-out on the same cores.
        let write_path = plain_burst(db, self.writers, options, Some(relay.pid())).await?;
        self.progress.say(format!(
            "round {}/{}: {name:<10} {:>7} commits/s (relay reading, no sockets)",
            round + 1,
            options.rounds,
            thousands(write_path.commits_per_second),
        ));
        let write_rate = write_path.commits_per_second;
        results.write_path.push(write_path);
        let fleet = Fleet::connect(
            relay.addr,
            self.fleet_users,
            self.tokens,
            options.connect_concurrency,
        )
        .await
        .context("connecting the sockets")?;
        let listeners = db.listeners().await?;
        if listeners != 1 {
            bail!("{listeners} relays registered in relay.listeners, expected this one only");
        }
        results.rss_kib_1000.push(relay.rss_kib()?);
        let steady_from = relay.metrics().await?;
        let profile =
            std::env::var_os("BENCH_PERF").filter(|_| round == 0 && mode == WakeupMode::Adaptive);
        let delivery = relay_burst(
            db,
            self.writers,
            &fleet,
            &relay,
            options,
            self.ticks,
            profile.as_deref(),
        )
        .await?;
        self.progress.say(format!(
            "round {}/{}: {name:<10} {:>7} commits/s; {} events, {} events/s delivered, {} socket messages/s; {}",
            round + 1,
            options.rounds,
            thousands(delivery.burst.commits_per_second),
            thousands(delivery.events as f64),
            thousands(delivery.delivered_events_per_second),
            thousands(delivery.socket_messages_per_second),
            delivery.check.summary()
        ));
        let rate = delivery.burst.commits_per_second;
        results.deliveries.push(delivery);
        if round == 0 {
            let latency =
                latency_phase(db, self.writers, &fleet, self.bare, &relay, options).await?;
            self.progress.say(format!(
                "latency at {} tx/s, {name}: relay {}, bare LISTEN {}; {}",
                thousands(latency.rate),
                latency.relay.millis(),
                latency.bare.millis(),
                latency.check.summary()
            ));
            results.latency = Some(latency);
        }
        let steady_to = relay.metrics().await?;
        results.visibility_queries +=
            steady_to.delta(&steady_from, "relay_visibility_queries_total");
        results.events_in += steady_to.delta(&steady_from, "relay_events_in_total");
        results.deliveries_total += steady_to.delta(&steady_from, "relay_deliveries_total");
        fleet.close().await;
        relay.stop().await?;
        db.forget_listeners().await?;
        Ok((write_rate, rate))
    }
}

fn label(kind: Kind) -> &'static str {
    match kind {
        Kind::NoTrigger => "no trigger",
        Kind::Naive => "naive",
        Kind::Relay(WakeupMode::Adaptive) => "adaptive",
        Kind::Relay(WakeupMode::Notify) => "notify",
    }
}

fn sockets_label(mode: WakeupMode) -> &'static str {
    match mode {
        WakeupMode::Adaptive => "adaptive+sockets",
        WakeupMode::Notify => "notify+sockets",
    }
}

fn mint_token(user: &str) -> anyhow::Result<String> {
    let now = rls_relay::auth::unix_now();
    let claims = serde_json::json!({
        "sub": user,
        "role": "authenticated",
        "iat": now,
        "exp": now + 6 * 3600,
    });
    Ok(encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(process::JWT_SECRET.as_bytes())?,
    )?)
}

/// Writers flat out: the baselines without a relay, or the write path with the relay
/// `relay` (a pid: its CPU is counted) running.
async fn plain_burst(
    db: &Database,
    writers: &Writers,
    options: &Options,
    relay: Option<u32>,
) -> anyhow::Result<Burst> {
    db.checkpoint().await?;
    let probe = Probe::start(db, relay).await?;
    let result = writers.max_rate(options.burst, options.warmup).await?;
    probe.finish(db, relay, &result).await
}

/// Writers flat out with the relay delivering to every socket; then a check of every
/// socket against the outbox.
async fn relay_burst(
    db: &Database,
    writers: &Writers,
    fleet: &Fleet,
    relay: &RelayProcess,
    options: &Options,
    ticks: f64,
    profile: Option<&std::ffi::OsStr>,
) -> anyhow::Result<Delivery> {
    fleet.reset();
    db.checkpoint().await?;
    let start_id = db.last_outbox_id().await?;
    let metrics_before = relay.metrics().await?;
    let probe = Probe::start(db, Some(relay.pid())).await?;
    let cpu_before = probe.cpu;
    // BENCH_PERF=<file>: a flat CPU profile of the relay during this burst
    // (`perf report -i <file> --sort dso,sym`).
    let mut perf = match profile {
        Some(path) => Some(
            std::process::Command::new("perf")
                .args(["record", "-q", "-e", "cpu-clock", "-F", "999", "-p"])
                .arg(relay.pid().to_string())
                .arg("-o")
                .arg(path)
                .args(["--", "sleep"])
                .arg(format!("{}", options.burst.as_secs_f64()))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("BENCH_PERF is set: starting `perf record`")?,
        ),
        None => None,
    };
    let result = writers.max_rate(options.burst, options.warmup).await?;
    if let Some(perf) = perf.as_mut() {
        let _ = perf.wait();
    }
    let burst = probe.finish(db, Some(relay.pid()), &result).await?;
    let events = db.events_after(start_id).await?;
    let expected = Expected::new(&events, &db.visible);
    fleet
        .wait_for(expected.total(fleet), Duration::from_secs(15))
        .await;
    let cpu_drained = CpuSample::take(db.postmaster_pid, Some(relay.pid()));
    let metrics_after = relay.metrics().await?;
    let check = expected.check(fleet);
    let last_arrival = fleet
        .last_arrival
        .load(std::sync::atomic::Ordering::Acquire);
    // Steady state: what committed during the counted window (after the warm-up) against
    // what was delivered during it. A relay that keeps up delivers at the rate writers
    // commit, shifted by its lag; one that falls behind delivers less.
    let (from, to) = result.window;
    let window_seconds = ((to - from) as f64 / 1e6).max(1e-9);
    let mut completed_at: HashMap<i64, i64> = HashMap::new();
    let mut messages_in_window = 0u64;
    for client in &fleet.clients {
        let Ok(log) = client.log.lock() else { continue };
        for &(id, arrived) in &log.events {
            let at = completed_at.entry(id).or_insert(arrived);
            *at = (*at).max(arrived);
            messages_in_window += u64::from((from..=to).contains(&arrived));
        }
    }
    let committed_in_window = events
        .iter()
        .filter(|e| (from..=to).contains(&e.written_micros))
        .count();
    let delivered_in_window = completed_at
        .values()
        .filter(|at| (from..=to).contains(*at))
        .count();
    let relay_seconds = CpuUse::between(&cpu_before, &cpu_drained, ticks).relay_seconds;
    Ok(Delivery {
        burst,
        events: events.len(),
        committed_events_per_second: committed_in_window as f64 / window_seconds,
        delivered_events_per_second: delivered_in_window as f64 / window_seconds,
        socket_messages_per_second: messages_in_window as f64 / window_seconds,
        drain_micros: last_arrival - result.stopped_micros,
        relay_micros_per_message: relay_seconds * 1e6 / (check.received.max(1) as f64),
        relay_micros_per_event: relay_seconds * 1e6 / (events.len().max(1) as f64),
        notifications: metrics_after.delta(&metrics_before, "relay_notifications_total"),
        reads: metrics_after.delta(&metrics_before, "relay_outbox_reads_total"),
        check,
    })
}

/// A fixed write rate; commit → socket latency of every delivery, and commit → NOTIFY
/// of a bare LISTEN client, for the same transactions.
async fn latency_phase(
    db: &Database,
    writers: &Writers,
    fleet: &Fleet,
    bare: &BareListener,
    relay: &RelayProcess,
    options: &Options,
) -> anyhow::Result<Latency> {
    db.set_triggers(Triggers::RelayAndNaive).await?;
    // Warm up at the same rate, so that what is measured is the steady state at that
    // rate (in `adaptive` mode the relay goes back to NOTIFY wake-ups a few hundred
    // milliseconds after the preceding burst), then start clean.
    let warmup_from = db.last_outbox_id().await?;
    writers
        .fixed_rate(options.latency_rate, options.warmup)
        .await?;
    let warmup_events = db.events_after(warmup_from).await?;
    fleet
        .wait_for(
            Expected::new(&warmup_events, &db.visible).total(fleet),
            Duration::from_secs(15),
        )
        .await;
    fleet.reset();
    bare.reset();
    let start_id = db.last_outbox_id().await?;

    let metrics_before = relay.metrics().await?;
    let timed = writers
        .fixed_rate(options.latency_rate, options.latency_duration)
        .await?;
    let events = db.events_after(start_id).await?;
    let expected = Expected::new(&events, &db.visible);
    fleet
        .wait_for(expected.total(fleet), Duration::from_secs(15))
        .await;
    bare.wait_for(events.len() as u64, Duration::from_secs(5))
        .await;
    let metrics_after = relay.metrics().await?;
    db.set_triggers(Triggers::Relay).await?;
    let check = expected.check(fleet);

    let committed_at: HashMap<u64, i64> = timed.commits.iter().copied().collect();
    let xid_of: HashMap<i64, u64> = events.iter().map(|e| (e.id, e.xid)).collect();
    let mut relay_latencies = Vec::new();
    for client in &fleet.clients {
        let Ok(log) = client.log.lock() else { continue };
        for (id, arrived) in &log.events {
            if let Some(commit) = xid_of.get(id).and_then(|x| committed_at.get(x)) {
                relay_latencies.push(arrived - commit);
            }
        }
    }
    let bare_latencies: Vec<i64> = match bare.log.lock() {
        Ok(log) => log
            .iter()
            .filter_map(|(xid, arrived)| committed_at.get(xid).map(|c| arrived - c))
            .collect(),
        Err(_) => Vec::new(),
    };
    Ok(Latency {
        rate: timed.achieved_rate,
        relay: Percentiles::of(relay_latencies),
        bare: Percentiles::of(bare_latencies),
        check,
        notifications: metrics_after.delta(&metrics_before, "relay_notifications_total"),
    })
}

async fn idle_phase(
    db: &Database,
    tokens: &[String],
    options: &Options,
    work_dir: &std::path::Path,
) -> anyhow::Result<Idle> {
    db.forget_listeners().await?;
    let per_user = options.idle_sockets.div_ceil(options.users);
    let relay = RelayProcess::start(&RelaySettings {
        database_url: db.url.clone(),
        wakeup: WakeupMode::Adaptive,
        max_connections_per_user: per_user.max(32),
        log_path: work_dir.join("relay-idle.log"),
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before_kib = relay.rss_kib()?;
    let users: Vec<usize> = (0..options.idle_sockets)
        .map(|i| i % options.users)
        .collect();
    let started = Instant::now();
    let fleet = Fleet::connect(relay.addr, &users, tokens, options.connect_concurrency)
        .await
        .context("connecting the idle sockets")?;
    let connect = started.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_after_kib = relay.rss_kib()?;
    let metrics = relay.metrics().await?;
    let ended = fleet.ended();
    if !ended.is_empty() {
        bail!(
            "{} idle sockets were closed (first: {})",
            ended.len(),
            ended[0]
        );
    }
    fleet.close().await;
    relay.stop().await?;
    db.forget_listeners().await?;
    Ok(Idle {
        sockets: options.idle_sockets,
        rss_before_kib,
        rss_after_kib,
        connect,
        visibility_queries: metrics.get("relay_visibility_queries_total"),
    })
}

/// What each user's sockets must receive: the phase's events whose credential the user
/// may see, per Postgres (RLS, as the REST role).
struct Expected {
    per_user: Vec<Vec<i64>>,
}

impl Expected {
    fn new(events: &[OutboxEvent], visible: &[std::collections::BTreeSet<String>]) -> Self {
        let per_user = visible
            .iter()
            .map(|credentials| {
                events
                    .iter()
                    .filter(|e| credentials.contains(&e.credential))
                    .map(|e| e.id)
                    .collect()
            })
            .collect();
        Self { per_user }
    }

    fn total(&self, fleet: &Fleet) -> u64 {
        fleet
            .clients
            .iter()
            .map(|c| self.per_user[c.user].len() as u64)
            .sum()
    }

    fn check(&self, fleet: &Fleet) -> Check {
        let mut check = Check {
            ended: fleet.ended(),
            ..Check::default()
        };
        for client in &fleet.clients {
            let expected = &self.per_user[client.user];
            let mut got: Vec<i64> = match client.log.lock() {
                Ok(log) => log.events.iter().map(|(id, _)| *id).collect(),
                Err(_) => Vec::new(),
            };
            got.sort_unstable();
            check.expected += expected.len() as u64;
            check.received += got.len() as u64;
            let before = got.len();
            got.dedup();
            check.duplicates += (before - got.len()) as u64;
            // Both sorted: walk them together.
            let (mut i, mut j) = (0, 0);
            while i < expected.len() || j < got.len() {
                match (expected.get(i), got.get(j)) {
                    (Some(e), Some(g)) if e == g => {
                        i += 1;
                        j += 1;
                    }
                    (Some(e), Some(g)) if e < g => {
                        check.missing += 1;
                        i += 1;
                    }
                    (Some(_), None) => {
                        check.missing += 1;
                        i += 1;
                    }
                    _ => {
                        check.unexpected += 1;
                        j += 1;
                    }
                }
            }
        }
        check
    }
}

struct Machine {
    cpu: String,
    cores: usize,
    memory_gib: f64,
    kernel: String,
    postgres: String,
}

impl Machine {
    fn describe(db: &Database) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown CPU".into());
        let memory_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse::<f64>().ok())
            })
            .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|k| k.trim().to_owned())
            .unwrap_or_default();
        Self {
            cpu,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory_gib,
            kernel,
            postgres: db.server_version.clone(),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn render(
    options: &Options,
    machine: &Machine,
    no_trigger: &[Burst],
    naive: &[Burst],
    modes: &HashMap<&'static str, ModeResults>,
    per_round_ratio: &HashMap<String, Vec<f64>>,
    idle: &Idle,
) -> String {
    let rates = |bursts: &[Burst]| Spread::over(bursts, |b| b.commits_per_second);
    let none = rates(no_trigger);
    let naive_rate = rates(naive);
    let empty = ModeResults::default();
    let mode = |name: &str| modes.get(name).unwrap_or(&empty);
    let ratio = |name: &str| Spread::of(per_round_ratio.get(name).map_or(&[][..], |v| v));
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "Machine: {} cores ({}), {:.1} GiB, Linux {}; PostgreSQL {} durable (fsync, synchronous_commit on). \
         The same {} cores run Postgres, the relay (release build, its own process), the {} writers and the \
         {} WebSocket clients: see the CPU table. Medians of {} rounds, [min–max]; ratios against baselines of the same run.",
        machine.cores,
        machine.cpu,
        machine.memory_gib,
        machine.kernel,
        machine.postgres,
        machine.cores,
        options.writers,
        thousands(options.sockets() as f64),
        options.rounds
    );
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "Workload: {} users, {} credentials ({} shared by two users), {} sockets ({} per user, each subscribed to \
         everything it may see); {} writer connections (superuser), each transaction a fill = 1 order + 1 position \
         + 1 balance update = 3 events; bursts of {} s ({} s warm-up).",
        options.users,
        options.credentials,
        options.shared,
        thousands(options.sockets() as f64),
        options.sockets_per_user,
        options.writers,
        options.burst.as_secs_f64(),
        options.warmup.as_secs_f64()
    );
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "| # | Figure | Measured | Baseline (same run) | Ratio | Target | Met |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|");
    for (name, target) in [("adaptive", Some(0.5)), ("notify", None)] {
        let measured = rates(&mode(name).write_path);
        let r = ratio(&format!("{name}/none"));
        let _ = writeln!(
            w,
            "| 1 | Writers' commits/s, relay triggers, relay in `{name}` mode reading every event (no socket connected) | {} | no trigger: {} | {} | {} | {} |",
            measured.whole(),
            none.whole(),
            r.percent(),
            target.map_or("—".to_owned(), |t| format!("≥ {:.0}%", t * 100.0)),
            target.map_or("—", |t| yes_no(r.median >= t)),
        );
    }
    for name in ["adaptive", "notify"] {
        let measured = Spread::over(&mode(name).deliveries, |d| d.burst.commits_per_second);
        let r = ratio(&format!("{name}+sockets/none"));
        let _ = writeln!(
            w,
            "| 1 | Writers' commits/s, relay in `{name}` mode serving the {} sockets on the same {} cores (figure 3's burst) | {} | no trigger: {} | {} | — | — |",
            thousands(options.sockets() as f64),
            machine.cores,
            measured.whole(),
            none.whole(),
            r.percent(),
        );
    }
    for name in ["adaptive", "notify"] {
        let measured = rates(&mode(name).write_path);
        let r = ratio(&format!("{name}/naive"));
        let _ = writeln!(
            w,
            "| 2 | Writers' commits/s, `{name}` vs a naive per-row `pg_notify` trigger | {} | naive: {} | {} | — | — |",
            measured.whole(),
            naive_rate.whole(),
            r.times(),
        );
    }
    for name in ["adaptive", "notify"] {
        let results = mode(name);
        let clean = results.deliveries.iter().all(|d| d.check.clean());
        let delivered = Spread::over(&results.deliveries, |d| d.delivered_events_per_second);
        let committed = Spread::over(&results.deliveries, |d| d.committed_events_per_second);
        let messages = Spread::over(&results.deliveries, |d| d.socket_messages_per_second);
        let keeps_up = Spread::over(&results.deliveries, |d| {
            d.delivered_events_per_second / d.committed_events_per_second
        });
        let lost: u64 = results
            .deliveries
            .iter()
            .map(|d| d.check.missing + d.check.unexpected + d.check.duplicates)
            .sum();
        let drain = Spread::over(&results.deliveries, |d| d.drain_micros as f64 / 1000.0);
        let _ = writeln!(
            w,
            "| 3 | Events delivered/s at the writers' top rate, `{name}`, after the warm-up (socket messages/s: {}; last delivery {} ms after the writers stopped; {} wrong or lost deliveries) | {} | committed: {} events/s | {} | = committed (±3%), 0 lost | {} |",
            messages.whole(),
            drain.whole(),
            lost,
            delivered.whole(),
            committed.whole(),
            keeps_up.percent(),
            yes_no(clean && keeps_up.min >= 0.97),
        );
    }
    for name in ["adaptive", "notify"] {
        if let Some(latency) = &mode(name).latency {
            let gap = latency.relay.p99 - latency.bare.p99;
            let _ = writeln!(
                w,
                "| 4 | Commit → socket p50 / p99 / max at {} tx/s, `{name}` ({} deliveries, {}) | {} | bare LISTEN: {} | p99 {:+} ms | p99 ≤ bare + 2 ms | {} |",
                thousands(latency.rate),
                thousands(latency.relay.count as f64),
                if latency.check.clean() { "none lost".to_owned() } else { latency.check.summary() },
                latency.relay.millis(),
                latency.bare.millis(),
                ms(gap),
                yes_no(gap <= 2_000 && latency.check.clean()),
            );
        }
    }
    let per_socket_kib =
        (idle.rss_after_kib as f64 - idle.rss_before_kib as f64) / idle.sockets as f64;
    let _ = writeln!(
        w,
        "| 5 | Relay RSS per idle authenticated, subscribed socket, {} sockets | {:.1} KiB | before connecting: {} KiB; after: {} KiB | — | ≤ 16 KiB | {} |",
        thousands(idle.sockets as f64),
        per_socket_kib,
        thousands(idle.rss_before_kib as f64),
        thousands(idle.rss_after_kib as f64),
        yes_no(per_socket_kib <= 16.0),
    );
    let queries: f64 = modes.values().map(|m| m.visibility_queries).sum();
    let events: f64 = modes.values().map(|m| m.events_in).sum();
    let deliveries: f64 = modes.values().map(|m| m.deliveries_total).sum();
    let _ = writeln!(
        w,
        "| 6 | Visibility queries per delivered event, steady state (all relay bursts and latency phases) | {} | {} queries / {} events ({} socket messages) | — | 0 | {} |",
        if events > 0.0 { format!("{:.4}", queries / events) } else { "n/a".into() },
        thousands(queries),
        thousands(events),
        thousands(deliveries),
        yes_no(queries == 0.0 && events > 0.0),
    );
    let _ = writeln!(
        w,
        "| 7 | Time for {} sockets to connect, authenticate (Bearer) and subscribe, {} at a time | {:.2} s ({} sockets/s; {} visibility queries, one per user) | — | — | — | — |",
        thousands(idle.sockets as f64),
        options.connect_concurrency,
        idle.connect.as_secs_f64(),
        thousands(idle.sockets as f64 / idle.connect.as_secs_f64().max(1e-9)),
        thousands(idle.visibility_queries),
    );

    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "Where the {} cores went during the bursts (cores busy, medians), and the relay's cost:",
        machine.cores
    );
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "| Burst | Postgres | Relay | Benchmark (writers + clients) | Postgres CPU per commit | WAL per commit | WAL flushes/s, mean flush | Writers' backends (sampled) | Relay's outbox reader (sampled) | Relay CPU per event / per socket message | Wake-ups (NOTIFYs received) / outbox reads per s |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|---|---|");
    let cores = |bursts: Vec<&Burst>| {
        let pick = |f: &dyn Fn(&Burst) -> f64| Spread::over(&bursts, |b| f(b)).median;
        let (mut waits, mut reader) = (Waits::default(), Waits::default());
        for burst in &bursts {
            waits.merge(&burst.waits);
            reader.merge(&burst.reader_waits);
        }
        format!(
            "{:.2} | {:.2} | {:.2} | {:.0} µs | {} B | {} /s, {:.2} ms | {} | {}",
            pick(&|b| b.cpu.postgres),
            pick(&|b| b.cpu.relay),
            pick(&|b| b.cpu.bench),
            pick(&|b| b.cpu.postgres * 1e6 / b.commits_per_second.max(1e-9)),
            thousands(pick(&|b| b.wal_bytes / b.commits.max(1) as f64)),
            thousands(pick(&|b| b.wal_flushes_per_second)),
            pick(&|b| b.wal_flush_ms),
            waits.top(3),
            reader.top(3),
        )
    };
    for (name, bursts) in [("no trigger", no_trigger), ("naive pg_notify", naive)] {
        let _ = writeln!(w, "| {name} | {} | — | — |", cores(bursts.iter().collect()));
    }
    for name in ["adaptive", "notify"] {
        let _ = writeln!(
            w,
            "| relay `{name}`, no sockets | {} | — | — |",
            cores(mode(name).write_path.iter().collect())
        );
    }
    for name in ["adaptive", "notify"] {
        let results = mode(name);
        let machine_use = cores(results.deliveries.iter().map(|d| &d.burst).collect());
        let per_event = Spread::over(&results.deliveries, |d| d.relay_micros_per_event);
        let per_message = Spread::over(&results.deliveries, |d| d.relay_micros_per_message);
        let seconds = options.burst.as_secs_f64();
        let wakeups = Spread::over(&results.deliveries, |d| d.notifications / seconds);
        let reads = Spread::over(&results.deliveries, |d| d.reads / seconds);
        let _ = writeln!(
            w,
            "| relay `{name}`, {} sockets | {machine_use} | {:.1} µs / {:.2} µs | {} / {} |",
            thousands(options.sockets() as f64),
            per_event.median,
            per_message.median,
            thousands(wakeups.median),
            thousands(reads.median),
        );
    }
    let rss_1000 = |name: &str| Spread::over(&mode(name).rss_kib_1000, |&k| k as f64);
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "Relay RSS with the {} subscribed sockets, before the first burst: {} KiB (adaptive), {} KiB (notify).",
        thousands(options.sockets() as f64),
        rss_1000("adaptive").whole(),
        rss_1000("notify").whole(),
    );
    if let Some(latency) = &mode("adaptive").latency {
        let _ = writeln!(
            w,
            "Latency phase, `adaptive`: the relay received {} NOTIFYs for {} transactions.",
            thousands(latency.notifications),
            thousands(latency.rate * options.latency_duration.as_secs_f64()),
        );
    }
    out
}
