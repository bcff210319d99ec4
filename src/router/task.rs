//! The router task's loop. One task, so that the order of events, visibility
//! announcements and subscriptions is simply the order in which it handles them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use futures_util::future::{join, join3};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant as TokioInstant;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::commit_order::{AnnouncementPlan, Phase};
use super::table::{Delivery, RoutingTable, SessionId, Subscription};
use super::{NewSubscription, RelayStatus, Request, Router, SubscribeError, Subscribed};
use crate::auth::Claims;
use crate::config::{FaultInjection, WakeupMode};
use crate::db::snapshot::Snapshot;
use crate::domain::{CredentialId, EventId, UserId};
use crate::metrics::Metrics;
use crate::outbox::event::{Announcement, DecodeError, Event, TableNames};
use crate::outbox::listener::{ListenerHandle, StreamConnection};
use crate::outbox::reader::ReadError;
use crate::outbox::wakeup::{FlagChange, Next, WakeupPolicy};
use crate::visibility::cache::VisibilityCache;
use crate::visibility::{Answer, VisibilityError, VisibilityQuery, VisibleSet};
use crate::ws::close::CloseReason;

/// A read that takes longer is abandoned and the connection replaced.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests from sockets waiting for the router.
const REQUEST_QUEUE: usize = 4_096;

pub struct RouterSettings {
    pub visibility: VisibilityQuery,
    pub pool: Pool,
    pub listener: ListenerHandle,
    pub wakeup: WakeupMode,
    pub max_subscriptions: usize,
    pub metrics: Arc<Metrics>,
    pub faults: FaultInjection,
}

pub fn spawn(settings: RouterSettings, shutdown: CancellationToken) -> (Router, JoinHandle<()>) {
    let (requests_tx, requests) = mpsc::channel(REQUEST_QUEUE);
    let (removals_tx, removals) = mpsc::unbounded_channel();
    let (answers_tx, answers) = mpsc::unbounded_channel();
    let status = Arc::new(RelayStatus::default());
    let now = Instant::now();
    let task = Task {
        requests,
        removals,
        answers,
        answers_tx,
        table: RoutingTable::default(),
        cache: VisibilityCache::default(),
        visibility: settings.visibility,
        pool: settings.pool,
        listener_changes: settings.listener.clone(),
        listener: settings.listener,
        policy: WakeupPolicy::new(settings.wakeup, now),
        next: Next::ReadAt(now),
        position: None,
        epoch: 0,
        tables: TableNames::default(),
        routed_this_read: Vec::new(),
        already_routed: HashSet::new(),
        max_subscriptions: settings.max_subscriptions,
        status: status.clone(),
        metrics: settings.metrics,
        starts_pending: false,
        faults: settings.faults,
    };
    let handle = tokio::spawn(task.run(shutdown));
    let router = Router {
        requests: requests_tx,
        removals: removals_tx,
        next_id: Arc::default(),
        status,
    };
    (router, handle)
}

/// A request parked until a visibility answer arrives.
enum Parked {
    Subscribe {
        id: SessionId,
        subscription: NewSubscription,
        reply: oneshot::Sender<Result<Subscribed, SubscribeError>>,
    },
    /// A socket moving to these claims after a token refresh.
    Switch { id: SessionId },
}

/// A visibility answer for a new claims set.
struct Computed {
    claims: Claims,
    epoch: u64,
    result: Result<Answer, VisibilityError>,
}

struct Task {
    requests: mpsc::Receiver<Request>,
    removals: mpsc::UnboundedReceiver<SessionId>,
    answers: mpsc::UnboundedReceiver<Computed>,
    answers_tx: mpsc::UnboundedSender<Computed>,
    table: RoutingTable,
    cache: VisibilityCache<Parked>,
    visibility: VisibilityQuery,
    pool: Pool,
    listener: ListenerHandle,
    listener_changes: ListenerHandle,
    policy: WakeupPolicy,
    next: Next,
    /// The snapshot up to which everything has been relayed; `None` before the first read.
    position: Option<Arc<Snapshot>>,
    /// Counts applied announcement batches: an answer asked for in an older epoch may
    /// predate an announcement and is asked again.
    epoch: u64,
    tables: TableNames,
    /// Ids routed by the read in progress, and by reads that failed midway: the next
    /// read skips the latter, so a connection lost mid-batch delivers nothing twice.
    routed_this_read: Vec<EventId>,
    already_routed: HashSet<EventId>,
    max_subscriptions: usize,
    status: Arc<RelayStatus>,
    metrics: Arc<Metrics>,
    /// Whether some subscription still has a `starts_after` marker to expire.
    starts_pending: bool,
    faults: FaultInjection,
}

impl Task {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut housekeeping = tokio::time::interval(Duration::from_secs(30));
        loop {
            let connection = self.listener.current();
            let listener = &self.listener;
            let next = self.next;
            let read_due = async {
                match (&connection, next) {
                    (None, _) => std::future::pending::<()>().await,
                    (Some(_), Next::ReadAt(at)) => {
                        tokio::time::sleep_until(TokioInstant::from_std(at)).await
                    }
                    (Some(_), Next::WaitUntil(at)) => tokio::select! {
                        () = listener.woken() => {}
                        () = tokio::time::sleep_until(TokioInstant::from_std(at)) => {}
                    },
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(id) = self.removals.recv() => self.remove(id),
                Some(request) = self.requests.recv() => self.handle(request),
                Some(computed) = self.answers.recv() => self.on_answer(computed),
                () = self.listener_changes.changed() => {
                    if self.listener.current().is_none() {
                        self.status.set_ready(false);
                    }
                    self.next = Next::ReadAt(Instant::now());
                }
                () = read_due => {
                    if let Some(connection) = connection {
                        self.read(&connection).await;
                    }
                }
                _ = housekeeping.tick() => self.cache.evict_idle(Instant::now()),
            }
        }
        self.status.set_ready(false);
        if let Some(connection) = self.listener.current() {
            if let Err(error) = connection.unregister().await {
                tracing::debug!(%error, "could not remove this instance from relay.listeners");
            }
        }
    }

    fn handle(&mut self, request: Request) {
        match request {
            Request::Register {
                id,
                claims,
                user,
                queue,
                control,
            } => {
                self.cache.attach(&claims, &user, id);
                self.table.insert(id, claims, user, queue, control);
            }
            Request::Subscribe {
                id,
                subscription,
                reply,
            } => self.subscribe(id, subscription, reply),
            Request::Unsubscribe {
                id,
                reference,
                reply,
            } => {
                let removed = self.unsubscribe(id, reference.as_ref());
                let _ = reply.send(removed);
            }
            Request::Reauthenticate { id, claims } => self.reauthenticate(id, claims),
        }
    }

    fn remove(&mut self, id: SessionId) {
        if let Some(route) = self.table.remove(id) {
            self.metrics
                .subscriptions
                .dec_by(route.subscriptions.len() as i64);
            self.cache.detach(&route.claims, id);
        }
    }

    fn subscribe(
        &mut self,
        id: SessionId,
        subscription: NewSubscription,
        reply: oneshot::Sender<Result<Subscribed, SubscribeError>>,
    ) {
        let Some(route) = self.table.get(id) else {
            let _ = reply.send(Err(SubscribeError::Gone));
            return;
        };
        if self.position.is_none() {
            let _ = reply.send(Err(SubscribeError::NotReady));
            return;
        }
        if route.subscriptions.len() >= self.max_subscriptions {
            let _ = reply.send(Err(SubscribeError::TooManySubscriptions));
            return;
        }
        let claims = route.claims.clone();
        let entry = self.cache.entry(&claims);
        match entry.answer.clone() {
            Some(answer) => {
                self.metrics.visibility_cache_hits.inc();
                // The cached answer holds at the router's position: live from here.
                self.complete_subscribe(id, subscription, reply, &answer, None);
            }
            None => {
                self.metrics.visibility_cache_misses.inc();
                entry.waiting.push(Parked::Subscribe {
                    id,
                    subscription,
                    reply,
                });
                if entry.in_flight.is_none() {
                    self.ask(claims);
                }
            }
        }
    }

    /// Asks Postgres for `claims`' visibility on a pooled connection, off this task.
    fn ask(&mut self, claims: Claims) {
        let entry = self.cache.entry(&claims);
        entry.in_flight = Some(self.epoch);
        let epoch = self.epoch;
        let visibility = self.visibility.clone();
        let pool = self.pool.clone();
        let answers = self.answers_tx.clone();
        tokio::spawn(async move {
            let result = visibility.ask(&pool, &claims).await;
            let _ = answers.send(Computed {
                claims,
                epoch,
                result,
            });
        });
    }

    fn on_answer(&mut self, computed: Computed) {
        let Computed {
            claims,
            epoch,
            result,
        } = computed;
        let Some(entry) = self.cache.get_mut(&claims) else {
            return;
        };
        entry.in_flight = None;
        match result {
            Ok(_) if epoch != self.epoch => {
                // An announcement was applied while the query ran: its answer may predate it.
                self.ask(claims);
            }
            Ok(answer) => {
                entry.answer = Some(answer.clone());
                let sessions: Vec<SessionId> = entry.sessions.iter().copied().collect();
                let waiting = std::mem::take(&mut entry.waiting);
                for id in sessions {
                    self.table.reindex(id, Some(&answer.visible));
                }
                for parked in waiting {
                    match parked {
                        Parked::Subscribe {
                            id,
                            subscription,
                            reply,
                        } => self.complete_subscribe(
                            id,
                            subscription,
                            reply,
                            &answer,
                            Some(answer.as_of.clone()),
                        ),
                        Parked::Switch { id } => self.switch_claims(id, &claims),
                    }
                }
            }
            Err(error) => {
                tracing::warn!(error = %crate::errors::Chain(&error), "visibility query failed; the request is refused (fail closed)");
                for parked in std::mem::take(&mut entry.waiting) {
                    match parked {
                        Parked::Subscribe { reply, .. } => {
                            let _ = reply.send(Err(SubscribeError::VisibilityUnavailable));
                        }
                        Parked::Switch { id } => self.close(id, CloseReason::VisibilityUnavailable),
                    }
                }
            }
        }
    }

    fn complete_subscribe(
        &mut self,
        id: SessionId,
        subscription: NewSubscription,
        reply: oneshot::Sender<Result<Subscribed, SubscribeError>>,
        answer: &Answer,
        fresh_as_of: Option<Arc<Snapshot>>,
    ) {
        let (Some(position), Some(route)) = (self.position.clone(), self.table.get_mut(id)) else {
            let _ = reply.send(Err(SubscribeError::Gone));
            return;
        };
        if let Some(wanted) = &subscription.credentials {
            if !wanted.is_subset(&answer.visible) {
                self.metrics.denied("forbidden_subscription", 1);
                let _ = reply.send(Err(SubscribeError::Forbidden));
                return;
            }
        }
        if route.subscriptions.len() >= self.max_subscriptions {
            let _ = reply.send(Err(SubscribeError::TooManySubscriptions));
            return;
        }
        // A fresh answer is exact from its own snapshot on; a resuming client gets the
        // time before from its replay instead.
        let starts_after = if subscription.resuming {
            None
        } else {
            fresh_as_of
        };
        self.starts_pending |= starts_after.is_some();
        route.subscriptions.push(Subscription {
            reference: subscription.reference,
            tables: subscription.tables.map(Vec::into_boxed_slice),
            credentials: subscription.credentials,
            starts_after,
        });
        self.metrics.subscriptions.inc();
        self.table.reindex(id, Some(&answer.visible));
        let _ = reply.send(Ok(Subscribed {
            position,
            visible: answer.visible.clone(),
        }));
    }

    fn unsubscribe(
        &mut self,
        id: SessionId,
        reference: Option<&crate::ws::protocol::Reference>,
    ) -> usize {
        let Some(route) = self.table.get_mut(id) else {
            return 0;
        };
        let before = route.subscriptions.len();
        match reference {
            None => route.subscriptions.clear(),
            Some(reference) => route
                .subscriptions
                .retain(|s| s.reference.as_ref() != Some(reference)),
        }
        let removed = before - route.subscriptions.len();
        self.metrics.subscriptions.dec_by(removed as i64);
        let visible = self
            .cache
            .get(&route.claims)
            .and_then(|e| e.answer.as_ref())
            .map(|a| a.visible.clone());
        self.table.reindex(id, visible.as_deref());
        removed
    }

    fn reauthenticate(&mut self, id: SessionId, claims: Claims) {
        let Some(route) = self.table.get(id) else {
            return;
        };
        if route.claims == claims {
            return;
        }
        let entry = self.cache.entry(&claims);
        if entry.answer.is_some() {
            self.switch_claims(id, &claims);
        } else {
            entry.waiting.push(Parked::Switch { id });
            if entry.in_flight.is_none() {
                self.ask(claims);
            }
        }
    }

    fn switch_claims(&mut self, id: SessionId, claims: &Claims) {
        let Some(route) = self.table.get_mut(id) else {
            return;
        };
        let previous = std::mem::replace(&mut route.claims, claims.clone());
        let user = route.user.clone();
        self.cache.detach(&previous, id);
        self.cache.attach(claims, &user, id);
        let visible = self
            .cache
            .get(claims)
            .and_then(|e| e.answer.as_ref())
            .map(|a| a.visible.clone());
        self.table.reindex(id, visible.as_deref());
    }

    fn close(&mut self, id: SessionId, reason: CloseReason) {
        if let Some(route) = self.table.get(id) {
            route.control.close(reason);
        }
        self.remove(id);
    }

    async fn read(&mut self, connection: &Arc<StreamConnection>) {
        self.routed_this_read.clear();
        let outcome = tokio::time::timeout(READ_TIMEOUT, self.read_batch(connection)).await;
        let transactions = match outcome {
            Ok(Ok(transactions)) => transactions,
            Ok(Err(error)) => {
                tracing::warn!(error = %crate::errors::Chain(&error), "outbox read failed; replacing the listener connection");
                return self.read_failed(connection);
            }
            Err(_) => {
                tracing::warn!(timeout = ?READ_TIMEOUT, "outbox read timed out; replacing the listener connection");
                return self.read_failed(connection);
            }
        };
        self.already_routed.clear();
        self.metrics.outbox_reads.inc();
        self.status.set_ready(true);
        let Some(position) = self.position.clone() else {
            return;
        };
        if self.starts_pending {
            self.table.forget_passed_starts(&position);
        }
        let (next, flag) = self
            .policy
            .after_read(Instant::now(), transactions, &position);
        self.next = next;
        if let Some(flag) = flag {
            tracing::debug!(?flag, "wake-up mode change");
            let idle = flag == FlagChange::Idle;
            self.listener.remember_idle(idle);
            if let Err(error) = connection.set_idle(idle).await {
                tracing::warn!(error = %crate::errors::Chain(&error), "cannot update relay.listeners; replacing the listener connection");
                connection.mark_broken();
            }
        }
    }

    fn read_failed(&mut self, connection: &StreamConnection) {
        self.already_routed.extend(self.routed_this_read.drain(..));
        self.status.set_ready(false);
        connection.mark_broken();
        // The listener replaces the connection and the change triggers a read; until
        // then, do not spin on the broken one.
        self.next = Next::ReadAt(Instant::now() + Duration::from_millis(250));
    }

    /// Reads one batch and routes it; returns how many transactions it held.
    async fn read_batch(&mut self, connection: &StreamConnection) -> Result<usize, ReadError> {
        let client = connection.client.lock().await;
        let client: &Client = &client;
        // One round trip for BEGIN, the snapshot (the first statement of a REPEATABLE
        // READ transaction fixes it) and the announcements since the last one. On any
        // error the connection is replaced, open transaction and all.
        let begin = client.batch_execute("begin isolation level repeatable read read only");
        let current = connection.reader.snapshot(client);
        let (snapshot, announcements) = match self.position.clone() {
            None => {
                let (began, snapshot) = join(begin, current).await;
                began?;
                let snapshot = snapshot?;
                client.batch_execute("commit").await?;
                tracing::info!(%snapshot, "relaying what commits from now on");
                self.position = Some(Arc::new(snapshot));
                return Ok(0);
            }
            Some(previous) => {
                let (began, snapshot, announcements) = join3(
                    begin,
                    current,
                    connection.reader.announcements(client, &previous),
                )
                .await;
                began?;
                (snapshot?, announcements?)
            }
        };
        let previous = self
            .position
            .clone()
            .unwrap_or_else(|| Arc::new(snapshot.clone()));
        let mut announcements = announcements;
        if self.faults.ignore_visibility_announcements {
            announcements.clear();
        }
        let mut batch = BatchStats::default();
        let routed = if announcements.is_empty() {
            self.route_events(connection, client, &previous, &mut batch, None)
                .await
        } else {
            self.route_with_announcements(
                connection,
                client,
                &previous,
                &snapshot,
                &announcements,
                &mut batch,
            )
            .await
        };
        // Whatever was queued goes out, even if the read failed midway (its retry skips
        // those events).
        self.finish_batch(&mut batch);
        routed?;
        client.batch_execute("commit").await?;
        self.position = Some(Arc::new(snapshot));
        Ok(batch.transactions.len() + announcements.len())
    }

    /// A batch with visibility announcements. The answers of the users they concern are
    /// asked again, as of this batch's snapshot (inside the read transaction); then each
    /// event of a credential they mention goes to each candidate socket by the answer
    /// that held when the event committed: the old one before the socket user's
    /// announcements, the new one after (see [`AnnouncementPlan`]). Finally the new
    /// answers are installed. An answer that cannot be computed closes its sockets
    /// (1011): they resume and get what they may see by replay (fail closed).
    async fn route_with_announcements(
        &mut self,
        connection: &StreamConnection,
        client: &Client,
        previous: &Snapshot,
        snapshot: &Snapshot,
        announcements: &[Announcement],
        batch: &mut BatchStats,
    ) -> Result<(), ReadError> {
        let plan = AnnouncementPlan::new(announcements);
        self.epoch += 1;
        self.metrics
            .visibility_invalidations
            .inc_by(announcements.len() as u64);
        let claims = self.cache.claims_to_recompute(|user| plan.concerns(user));
        let answers = self
            .visibility
            .recompute(client, &connection.visibility, &claims)
            .await?;

        // Old and new answers of the claims sets concerned; sockets newly granted a
        // credential are candidates for its events besides the index.
        let mut changes: HashMap<Claims, Change> = HashMap::new();
        let mut granted: HashMap<CredentialId, Vec<SessionId>> = HashMap::new();
        for (claims, answer) in claims.into_iter().zip(answers) {
            let Some(entry) = self.cache.get(&claims) else {
                continue;
            };
            let old = entry.answer.as_ref().map(|a| a.visible.clone());
            let new = match answer {
                Ok(visible) => Some(visible),
                Err(error) => {
                    tracing::warn!(error = %crate::errors::Chain(&error), sockets = entry.sessions.len(), "visibility recompute failed; closing the sockets concerned");
                    None
                }
            };
            if let Some(new) = &new {
                for credential in new
                    .iter()
                    .filter(|c| old.as_ref().is_none_or(|o| !o.contains(*c)))
                {
                    granted
                        .entry(credential.clone())
                        .or_default()
                        .extend(entry.sessions.iter().copied());
                }
            }
            changes.insert(
                claims,
                Change {
                    user: entry.user.clone(),
                    old,
                    new,
                },
            );
        }

        let transition = Transition {
            plan,
            changes,
            granted,
        };
        self.route_events(connection, client, previous, batch, Some(&transition))
            .await?;

        let as_of = Arc::new(snapshot.clone());
        let mut failed = Vec::new();
        for (claims, change) in transition.changes {
            let Some(entry) = self.cache.get_mut(&claims) else {
                continue;
            };
            let sessions: Vec<SessionId> = entry.sessions.iter().copied().collect();
            match change.new {
                Some(visible) => {
                    entry.answer = Some(Answer {
                        visible: visible.clone(),
                        as_of: as_of.clone(),
                    });
                    for id in sessions {
                        self.table.reindex(id, Some(&visible));
                    }
                }
                None => {
                    entry.answer = None;
                    failed.extend(sessions);
                }
            }
        }
        for id in failed {
            self.metrics.denied("visibility_unavailable", 1);
            self.close(id, CloseReason::VisibilityUnavailable);
        }
        Ok(())
    }

    /// Streams the batch's events and routes each: by the index, or, for a credential
    /// that the batch's announcements mention, socket by socket with the answer that held
    /// when the event committed (see [`Self::route_with_announcements`]).
    async fn route_events(
        &mut self,
        connection: &StreamConnection,
        client: &Client,
        previous: &Snapshot,
        batch: &mut BatchStats,
        transition: Option<&Transition<'_>>,
    ) -> Result<(), ReadError> {
        let table = &self.table;
        let already_routed = &self.already_routed;
        let routed_this_read = &mut self.routed_this_read;
        let metrics = &self.metrics;
        connection
            .reader
            .for_each_event(client, previous, &mut self.tables, |decoded| {
                let Some(event) = batch.take(decoded, metrics) else {
                    return;
                };
                if already_routed.contains(&event.id) {
                    return;
                }
                routed_this_read.push(event.id);
                match transition {
                    Some(transition) if transition.plan.mentions(&event.credential) => {
                        transition.route(table, &event, metrics, &mut batch.delivery);
                    }
                    _ => table.route_into(&event, &mut batch.delivery),
                }
                batch.routed(table);
            })
            .await
    }

    fn finish_batch(&mut self, batch: &mut BatchStats) {
        batch.wake(&self.table);
        self.metrics.events_in.inc_by(batch.events);
        self.metrics.deliveries.inc_by(batch.deliveries);
        if batch.events > 0 {
            let now_micros = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as i64)
                .unwrap_or(0);
            self.metrics
                .outbox_lag_seconds
                .set((now_micros - batch.newest_commit_micros).max(0) as f64 / 1e6);
        }
        let overflowed: HashSet<SessionId> = batch.delivery.overflowed.drain(..).collect();
        for id in overflowed {
            self.metrics.slow_consumer_closes.inc();
            self.metrics.queue_drops.inc();
            self.close(id, CloseReason::SlowConsumer);
        }
    }
}

/// Events routed by a read between two wake-ups of their sockets.
const WAKE_EVERY: u64 = 256;

#[derive(Default)]
struct BatchStats {
    transactions: HashSet<u64>,
    events: u64,
    deliveries: u64,
    newest_commit_micros: i64,
    /// Queued since the last wake-up, and sockets whose queue overflowed.
    delivery: Delivery,
}

impl BatchStats {
    /// Counts a read row; the event, when it decoded.
    fn take(&mut self, decoded: Result<Event, DecodeError>, metrics: &Metrics) -> Option<Event> {
        match decoded {
            Ok(event) => {
                self.transactions.insert(event.xid);
                self.events += 1;
                self.newest_commit_micros =
                    self.newest_commit_micros.max(event.committed_at_micros);
                Some(event)
            }
            Err(error) => {
                decode_failed(metrics, &error);
                None
            }
        }
    }

    /// After an event: wakes its sockets' now and then during a large read (each socket
    /// then writes what it has with one flush).
    fn routed(&mut self, table: &RoutingTable) {
        if self.events % WAKE_EVERY == 0 {
            self.wake(table);
        }
    }

    /// Wakes every socket events were queued for since the last call.
    fn wake(&mut self, table: &RoutingTable) {
        self.deliveries += self.delivery.recipients.len() as u64;
        table.wake(&self.delivery.recipients);
        self.delivery.recipients.clear();
    }
}

/// What a batch with announcements changes: the plan placing events among them, the old
/// and new answers of the claims sets concerned, and the sockets newly granted each
/// credential.
struct Transition<'a> {
    plan: AnnouncementPlan<'a>,
    changes: HashMap<Claims, Change>,
    granted: HashMap<CredentialId, Vec<SessionId>>,
}

impl Transition<'_> {
    /// Routes an event of a credential the announcements mention: each candidate socket
    /// (indexed, or newly granted) gets it if the answer that held at its commit, for its
    /// user, contains the credential.
    fn route(
        &self,
        table: &RoutingTable,
        event: &Event,
        metrics: &Metrics,
        delivery: &mut Delivery,
    ) {
        let mut seen = HashSet::new();
        let granted = self
            .granted
            .get(&event.credential)
            .map_or(&[][..], Vec::as_slice);
        for &id in table.indexed(&event.credential).iter().chain(granted) {
            if !seen.insert(id) {
                continue;
            }
            let Some(route) = table.get(id) else { continue };
            let may_see = match self.changes.get(&route.claims) {
                // Not concerned by any announcement: the index answer holds.
                None => true,
                Some(change) => match self.plan.phase(event, change.user.as_ref()) {
                    Phase::Before => change
                        .old
                        .as_ref()
                        .is_some_and(|v| v.contains(&event.credential)),
                    Phase::After => change
                        .new
                        .as_ref()
                        .is_some_and(|v| v.contains(&event.credential)),
                    Phase::Ambiguous => {
                        metrics.denied("ambiguous_visibility", 1);
                        false
                    }
                },
            };
            if may_see {
                table.deliver(id, event, delivery);
            }
        }
    }
}

/// A claims set's answer across a batch with announcements.
struct Change {
    user: Option<UserId>,
    old: Option<VisibleSet>,
    /// `None`: could not be computed (the sockets are closed).
    new: Option<VisibleSet>,
}

fn decode_failed(metrics: &Metrics, error: &DecodeError) {
    metrics.decode_errors.inc();
    tracing::error!(%error, "skipping an outbox row that cannot be decoded");
}
