//! The one dedicated connection (`application_name = 'rls-relay listener'`): it LISTENs
//! on the channel, and the router reads the outbox through it.
//!
//! The connection will drop (a terminated backend, a Postgres restart, a network cut):
//! this task reconnects with exponential backoff and jitter, LISTENs *before* anything is
//! read, and publishes the new connection; the router then catches up from its snapshot
//! cursor, which covers everything committed while no one was listening. A terminated
//! backend or a restart is noticed at once (the socket closes); a silent network cut by
//! TCP keepalives within about 11 s.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Mutex, Notify};
use tokio_postgres::{AsyncMessage, Client};
use tokio_util::sync::CancellationToken;

use super::reader::{ReaderStatements, TimestampSource};
use crate::config::quote_identifier;
use crate::metrics::Metrics;
use crate::visibility::{PreparedVisibility, VisibilityQuery};

/// What the listener needs to (re)connect.
#[derive(Clone)]
pub struct ListenerSettings {
    /// From [`crate::db::connection_config`] with [`crate::db::LISTENER_APPLICATION_NAME`].
    pub connection: tokio_postgres::Config,
    /// From [`crate::db::tls`].
    pub tls: tokio_postgres_rustls::MakeRustlsConnect,
    pub channel: String,
    /// This instance's row in `relay.listeners`.
    pub instance_id: uuid::Uuid,
    pub visibility: VisibilityQuery,
    pub metrics: Arc<Metrics>,
}

/// A live stream connection with its prepared statements.
pub struct StreamConnection {
    pub client: Mutex<Client>,
    pub reader: ReaderStatements,
    pub visibility: PreparedVisibility,
    pub timestamps: TimestampSource,
    instance_id: String,
    channel: String,
    broken: CancellationToken,
}

impl StreamConnection {
    /// Drops this connection (after a query timeout, say); the listener reconnects.
    pub fn mark_broken(&self) {
        self.broken.cancel();
    }

    /// Tells writers whether to NOTIFY this instance when they commit (see
    /// `relay.wake()`). Not durable on purpose: the row is a hint, refreshed constantly.
    pub async fn set_idle(&self, idle: bool) -> Result<(), tokio_postgres::Error> {
        let client = self.client.lock().await;
        client
            .execute(
                "insert into relay.listeners (instance_id, channel, idle, seen_at)
                 values ($1::text::uuid, $2, $3, now())
                 on conflict (instance_id) do update
                 set channel = excluded.channel, idle = excluded.idle, seen_at = excluded.seen_at",
                &[&self.instance_id, &self.channel, &idle],
            )
            .await?;
        Ok(())
    }

    /// Removes this instance's row (graceful shutdown).
    pub async fn unregister(&self) -> Result<(), tokio_postgres::Error> {
        let client = self.client.lock().await;
        client
            .execute(
                "delete from relay.listeners where instance_id = $1::text::uuid",
                &[&self.instance_id],
            )
            .await?;
        Ok(())
    }
}

/// The router's view of the listener.
#[derive(Clone)]
pub struct ListenerHandle {
    connection: watch::Receiver<Option<Arc<StreamConnection>>>,
    wake: Arc<Notify>,
    /// The flag value a new connection registers with: the router's current mode.
    idle: Arc<AtomicBool>,
}

impl ListenerHandle {
    /// The current connection, if any.
    pub fn current(&self) -> Option<Arc<StreamConnection>> {
        self.connection.borrow().clone()
    }

    /// Resolves when a connection comes or goes.
    pub async fn changed(&mut self) {
        if self.connection.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Resolves on a NOTIFY (or one that arrived since the last call).
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Records the flag the router last wrote, for the next reconnect.
    pub fn remember_idle(&self, idle: bool) {
        self.idle.store(idle, Ordering::Release);
    }
}

pub fn spawn(settings: ListenerSettings, shutdown: CancellationToken) -> ListenerHandle {
    let (sender, receiver) = watch::channel(None);
    let wake = Arc::new(Notify::new());
    let idle = Arc::new(AtomicBool::new(true));
    tokio::spawn(run(settings, idle.clone(), sender, wake.clone(), shutdown));
    ListenerHandle {
        connection: receiver,
        wake,
        idle,
    }
}

async fn run(
    settings: ListenerSettings,
    idle: Arc<AtomicBool>,
    sender: watch::Sender<Option<Arc<StreamConnection>>>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut failures: u32 = 0;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        match connect(&settings, idle.load(Ordering::Acquire), &wake).await {
            Ok((connection, mut driver)) => {
                if failures > 0 {
                    tracing::info!("listener connection re-established");
                }
                failures = 0;
                settings.metrics.listener_reconnects.inc();
                settings.metrics.listener_connected.set(1);
                let broken = connection.broken.clone();
                sender.send_replace(Some(connection));
                tokio::select! {
                    result = &mut driver => match result {
                        Ok(Some(error)) => tracing::warn!(error = %crate::errors::Chain(&error), "listener connection lost"),
                        Ok(None) => tracing::warn!("listener connection closed by the server"),
                        Err(error) => tracing::error!(%error, "listener driver failed"),
                    },
                    () = broken.cancelled() => tracing::warn!("listener connection dropped after a failed read"),
                    () = shutdown.cancelled() => {}
                }
                driver.abort();
                sender.send_replace(None);
                settings.metrics.listener_connected.set(0);
            }
            Err(error) => {
                tracing::warn!(error = %crate::errors::Chain(&error), attempt = failures + 1, "cannot connect the listener")
            }
        }
        failures = failures.saturating_add(1);
        let delay = backoff(failures);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Exponential backoff from 50 ms to 5 s, with ±50% jitter so that several relays do not
/// reconnect in lockstep after a restart.
fn backoff(failures: u32) -> Duration {
    let base_ms = 50u64.saturating_mul(1 << failures.min(7)).min(5_000);
    let jitter = rand::random::<f64>() + 0.5;
    Duration::from_millis((base_ms as f64 * jitter) as u64)
}

type Driver = tokio::task::JoinHandle<Option<tokio_postgres::Error>>;

async fn connect(
    settings: &ListenerSettings,
    initially_idle: bool,
    wake: &Arc<Notify>,
) -> Result<(Arc<StreamConnection>, Driver), tokio_postgres::Error> {
    let (client, mut connection) = settings.connection.connect(settings.tls.clone()).await?;
    let notify = wake.clone();
    let metrics = settings.metrics.clone();
    // The Connection future drops notifications; poll_message hands them over.
    let driver: Driver = tokio::spawn(async move {
        loop {
            match poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => {
                    metrics.notifications.inc();
                    notify.notify_one();
                }
                Some(Ok(AsyncMessage::Notice(notice))) => {
                    tracing::debug!(notice = notice.message(), "notice")
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => return Some(error),
                None => return None,
            }
        }
    });
    let setup = async {
        // Flag updates need no fsync. Custom plans always: a generic plan of the batch
        // query, which Postgres may pick after a few executions, can scan the whole outbox
        // (a parallel bitmap scan, ~13 ms on 175,000 rows). LISTEN before the first read
        // so nothing is missed.

        client
            .batch_execute(&format!(
                "set synchronous_commit = off; set plan_cache_mode = force_custom_plan; listen {}",
                quote_identifier(&settings.channel)
            ))
            .await?;
        let timestamps = TimestampSource::detect(&client).await?;
        let reader = ReaderStatements::prepare(&client, timestamps).await?;
        let visibility = settings.visibility.prepare(&client).await?;
        Ok::<_, tokio_postgres::Error>((timestamps, reader, visibility))
    };
    let (timestamps, reader, visibility) = match setup.await {
        Ok(prepared) => prepared,
        Err(error) => {
            driver.abort();
            return Err(error);
        }
    };
    let stream = Arc::new(StreamConnection {
        client: Mutex::new(client),
        reader,
        visibility,
        timestamps,
        instance_id: settings.instance_id.to_string(),
        channel: settings.channel.clone(),
        broken: CancellationToken::new(),
    });
    if let Err(error) = stream.set_idle(initially_idle).await {
        driver.abort();
        return Err(error);
    }
    // A wake-up for the catch-up read right after (re)connecting.
    wake.notify_one();
    Ok((stream, driver))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let first = backoff(1);
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(150));
        for failures in 10..20 {
            assert!(backoff(failures) <= Duration::from_millis(7_500));
        }
    }
}
