//! Retention: the outbox is pruned past `RELAY_RETENTION` by one instance at a time (a
//! transaction-level advisory lock), in batches of ids from the oldest, so that deletes
//! never hold anything a writer waits for.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Advisory lock key: "rls-relay prune" (any constant unlikely to collide).
pub const PRUNE_LOCK: i64 = 0x726c_7372_7072_756e;
const BATCH: i64 = 5_000;

/// Prunes every `interval` until shutdown.
pub async fn run(
    pool: Pool,
    retention: Duration,
    interval: Duration,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        match prune_once(&pool, retention, &shutdown).await {
            Ok(deleted) if deleted > 0 => {
                metrics.outbox_pruned.inc_by(deleted);
                tracing::info!(deleted, "pruned the outbox past retention");
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(error = %crate::errors::Chain(&error), "outbox pruning failed; will retry")
            }
        }
    }
}

/// Deletes outbox rows older than `retention`; returns how many.
pub async fn prune_once(
    pool: &Pool,
    retention: Duration,
    shutdown: &CancellationToken,
) -> Result<u64, PruneError> {
    let retention_secs = retention.as_secs_f64();
    let mut total = 0;
    loop {
        let mut client = pool.get().await?;
        let transaction = client.transaction().await?;
        let locked: bool = transaction
            .query_one("select pg_try_advisory_xact_lock($1)", &[&PRUNE_LOCK])
            .await?
            .get(0);
        if !locked {
            return Ok(total); // another instance is pruning
        }
        let cutoff: Option<i64> = transaction
            .query_one(
                "select max(id) from (select id, written_at from relay.outbox order by id limit $1) oldest
                 where written_at < now() - make_interval(secs => $2)",
                &[&BATCH, &retention_secs],
            )
            .await?
            .get(0);
        let Some(cutoff) = cutoff else {
            transaction
                .execute(
                    "delete from relay.listeners where seen_at < now() - interval '1 day'",
                    &[],
                )
                .await?;
            transaction.commit().await?;
            return Ok(total);
        };
        let deleted = transaction
            .execute("delete from relay.outbox where id <= $1", &[&cutoff])
            .await?;
        transaction
            .execute(
                "update relay.retention set pruned_through = greatest(pruned_through, $1)",
                &[&cutoff],
            )
            .await?;
        transaction.commit().await?;
        total += deleted;
        if deleted < u64::try_from(BATCH).unwrap_or(u64::MAX) || shutdown.is_cancelled() {
            return Ok(total);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Pool(#[from] deadpool_postgres::PoolError),
}
