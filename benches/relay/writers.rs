//! The writers: N superuser connections, as a trading engine service would hold, each
//! committing fills on credentials of its own (so writers never wait on each other's row
//! locks: what limits them is the commit path, which is what is measured).
//!
//! One transaction = one statement in autocommit: the order's fill, its position and its
//! credential's balance are updated (three rows, three events when the relay tracks the
//! tables), and the statement returns the transaction id, which the latency phase uses to
//! match commits to deliveries. The commit time is taken right after the statement (and
//! so the commit) returns.
//!
//! Writers run on a runtime of their own, so that the WebSocket clients' work in the
//! benchmark's main runtime cannot delay them inside one scheduler.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::runtime::{Handle, Runtime};
use tokio_postgres::{Client, NoTls, Statement};

use crate::database::{Target, WRITER_APPLICATION_NAME};

const FILL: &str = "
with o as (
    update public.orders
       set filled_qty = filled_qty + 1, status = 'partially_filled', updated_at = now()
     where id = $1
), p as (
    update public.positions
       set qty = qty + 1, market_value = (qty + 1) * avg_price, updated_at = now()
     where id = $2
), b as (
    update public.balances
       set cash = cash - 100, equity = equity + 1, buying_power = buying_power - 100, updated_at = now()
     where credential_id = $3::text::uuid
)
select pg_current_xact_id()::text";

struct Writer {
    client: Client,
    fill: Statement,
    targets: Vec<Target>,
}

pub struct Writers {
    /// Taken on drop: a runtime cannot be dropped (blocking) inside another one.
    runtime: Option<Runtime>,
    writers: Vec<Arc<Writer>>,
}

/// A burst at full speed.
pub struct MaxRate {
    /// Commits per second after the warm-up.
    pub commits_per_second: f64,
    /// All commits of the burst, warm-up included.
    pub commits: u64,
    /// When the writers stopped (microseconds since the epoch)...
    pub stopped_micros: i64,
    /// ...and of the counted part, after the warm-up.
    pub window: (i64, i64),
}

/// A fixed-rate phase: each commit's transaction id and commit time.
pub struct Timed {
    pub commits: Vec<(u64, i64)>,
    pub achieved_rate: f64,
}

impl Writers {
    pub async fn connect(url: &str, count: usize, targets: &[Target]) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bench-writer")
            .enable_all()
            .build()?;
        let mut writers = Vec::with_capacity(count);
        for index in 0..count {
            let mine: Vec<Target> = targets
                .iter()
                .filter(|t| t.credential_index % count == index)
                .cloned()
                .collect();
            let mut config: tokio_postgres::Config = url.parse()?;
            config.application_name(WRITER_APPLICATION_NAME);
            let writer = runtime.spawn(async move {
                let (client, connection) = config.connect(NoTls).await?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                let fill = client.prepare(FILL).await?;
                Ok::<_, tokio_postgres::Error>(Writer {
                    client,
                    fill,
                    targets: mine,
                })
            });
            let writer = writer
                .await
                .context("writer setup panicked")?
                .context("connecting a writer")?;
            writers.push(Arc::new(writer));
        }
        Ok(Self {
            runtime: Some(runtime),
            writers,
        })
    }

    fn handle(&self) -> Handle {
        match &self.runtime {
            Some(runtime) => runtime.handle().clone(),
            None => Handle::current(),
        }
    }

    /// Every writer commits as fast as it can for `duration`; commits/s is counted after
    /// `warmup`.
    pub async fn max_rate(&self, duration: Duration, warmup: Duration) -> anyhow::Result<MaxRate> {
        let stop = Arc::new(AtomicBool::new(false));
        let commits = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let tasks: Vec<_> = self
            .writers
            .iter()
            .enumerate()
            .map(|(index, writer)| {
                let (writer, stop, commits) = (writer.clone(), stop.clone(), commits.clone());
                self.handle().spawn(async move {
                    let mut n = index;
                    while !stop.load(Ordering::Relaxed) {
                        writer.commit(n).await?;
                        commits.fetch_add(1, Ordering::Relaxed);
                        n += 1;
                    }
                    Ok::<_, anyhow::Error>(())
                })
            })
            .collect();
        tokio::time::sleep(warmup).await;
        let (counted_from, at) = (commits.load(Ordering::Relaxed), Instant::now());
        let window_start = now_micros();
        tokio::time::sleep_until((started + duration).into()).await;
        let (counted_to, until) = (commits.load(Ordering::Relaxed), Instant::now());
        let window_end = now_micros();
        stop.store(true, Ordering::Relaxed);
        for task in tasks {
            task.await.context("writer panicked")??;
        }
        Ok(MaxRate {
            commits_per_second: (counted_to - counted_from) as f64
                / until.duration_since(at).as_secs_f64(),
            commits: commits.load(Ordering::Relaxed),
            stopped_micros: now_micros(),
            window: (window_start, window_end),
        })
    }

    /// `rate` transactions per second in total, spread evenly over the writers and in
    /// time, for `duration`.
    pub async fn fixed_rate(&self, rate: f64, duration: Duration) -> anyhow::Result<Timed> {
        let count = self.writers.len();
        let period = Duration::from_secs_f64(count as f64 / rate);
        let started = Instant::now();
        let deadline = started + duration;
        let tasks: Vec<_> = self
            .writers
            .iter()
            .enumerate()
            .map(|(index, writer)| {
                let writer = writer.clone();
                let offset = period.mul_f64(index as f64 / count as f64);
                self.handle().spawn(async move {
                    let mut ticks = tokio::time::interval_at((started + offset).into(), period);
                    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let mut commits = Vec::new();
                    let mut n = index;
                    loop {
                        let tick = ticks.tick().await;
                        if tick.into_std() >= deadline {
                            break;
                        }
                        let xid = writer.commit(n).await?;
                        commits.push((xid, now_micros()));
                        n += 1;
                    }
                    Ok::<_, anyhow::Error>(commits)
                })
            })
            .collect();
        let mut commits = Vec::new();
        for task in tasks {
            commits.extend(task.await.context("writer panicked")??);
        }
        let achieved_rate = commits.len() as f64 / duration.as_secs_f64();
        Ok(Timed {
            commits,
            achieved_rate,
        })
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Writer {
    /// One fill on this writer's `n`-th target (round robin); returns the transaction id.
    async fn commit(&self, n: usize) -> anyhow::Result<u64> {
        let target = &self.targets[n % self.targets.len()];
        let row = self
            .client
            .query_one(
                &self.fill,
                &[&target.order_id, &target.position_id, &target.credential],
            )
            .await
            .context("a writer's transaction failed")?;
        let xid: &str = row.get(0);
        xid.parse().context("transaction id")
    }
}

pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
