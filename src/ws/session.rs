//! One socket's life: authenticate, register with the router, then serve client
//! messages and relay queued events until something closes it.
//!
//! Generic over any `Stream + Sink` of WebSocket messages, so the loop does not care
//! whether it runs on axum's socket or on a test double.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant as TokioInstant};
use tracing::{field, Instrument};

use super::close::CloseReason;
use super::limits::{RateLimiter, TotalSlot};
use super::protocol::{
    expires_at, BadRequest, ClientMessage, ErrorCode, Reference, ServerMessage, SubscribeRequest,
};
use super::replay::{self, ReplayItem, ReplayRequest};
use super::{error_label, PreAuth, Slots};
use crate::auth::{AuthError, Identity};
use crate::http::AppState;
use crate::outbox::replay::Cursor;
use crate::router::queue::{self, Outgoing, QueueReceiver, SessionControl};
use crate::router::{NewSubscription, Registration, SubscribeError};

/// How long a close frame may take to leave before the connection is just dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Queued events written per flush.
const WRITE_BATCH: usize = 64;

pub(crate) async fn run<S>(
    socket: S,
    state: Arc<AppState>,
    pre_auth: PreAuth,
    origin_allowed: bool,
    total_slot: TotalSlot,
) where
    S: Stream<Item = Result<Message, axum::Error>>
        + Sink<Message, Error = axum::Error>
        + Unpin
        + Send,
{
    let connection_id = uuid::Uuid::new_v4().simple().to_string();
    let span = tracing::info_span!("ws", connection_id = %connection_id, user_id = field::Empty);
    async move {
        state.metrics.connections.inc();
        let mut socket = socket;
        let reason = serve(
            &mut socket,
            &state,
            pre_auth,
            origin_allowed,
            total_slot,
            &connection_id,
        )
        .await;
        state.metrics.connections.dec();
        if let Some(reason) = reason {
            state.metrics.socket_closed(reason.label());
            tracing::debug!(code = reason.code(), reason = %reason.text(), "closing");
            send_close(&mut socket, &reason).await;
        } else {
            // The client closed (or vanished): flush the close reply tungstenite queued,
            // so a client that said goodbye sees its own code, not 1006.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.close()).await;
        }
    }
    .instrument(span)
    .await;
}

/// Runs the socket; returns why the relay closes it (`None` when the client left).
async fn serve<S>(
    socket: &mut S,
    state: &Arc<AppState>,
    pre_auth: PreAuth,
    origin_allowed: bool,
    total_slot: TotalSlot,
    connection_id: &str,
) -> Option<CloseReason>
where
    S: Stream<Item = Result<Message, axum::Error>>
        + Sink<Message, Error = axum::Error>
        + Unpin
        + Send,
{
    if !origin_allowed {
        return Some(CloseReason::BadOrigin);
    }
    let (identity, user_slot) = match pre_auth {
        PreAuth::Verified(identity, slot) => (identity, slot),
        PreAuth::QueryToken(token) => {
            let identity = match verify(state, &token).await {
                Ok(identity) => identity,
                Err(error) => return Some(CloseReason::Unauthorized(error.to_string())),
            };
            let slot = state
                .connections
                .acquire_user(&identity.user, state.limits.max_connections_per_user)?;
            (identity, slot)
        }
        PreAuth::FirstMessage => match first_message_auth(socket, state).await {
            Ok(pair) => pair,
            Err(reason) => return reason,
        },
    };
    tracing::Span::current().record("user_id", field::display(&identity.user));
    let _slots = Slots {
        _total: total_slot,
        _user: Some(user_slot),
    };

    let (queue_tx, queue_rx) = queue::channel(
        state.limits.send_queue_messages,
        state.limits.send_queue_bytes,
    );
    let control = Arc::new(SessionControl::default());
    let registration = match state
        .router
        .register(
            identity.claims.clone(),
            identity.user.clone(),
            queue_tx,
            control.clone(),
        )
        .await
    {
        Ok(registration) => registration,
        Err(_) => return Some(CloseReason::ShuttingDown),
    };
    let welcome = ServerMessage::Welcome {
        user_id: identity.user.as_str(),
        connection_id,
        expires_at: expires_at(identity.expires_at),
    };
    if socket.send(text_message(&welcome)).await.is_err() {
        return None;
    }
    let mut session = Session {
        state: state.clone(),
        identity,
        registration,
        control,
        queue: queue_rx,
        rate: RateLimiter::new(state.limits.max_messages_per_second),
        replay: None,
        replays_waiting: VecDeque::new(),
        awaiting_pong_since: None,
    };
    let reason = session.serve(socket).await;
    session.queue.discard();
    reason
}

/// Waits for `{"type":"auth"}` as the first message, within the deadline.
async fn first_message_auth<S>(
    socket: &mut S,
    state: &Arc<AppState>,
) -> Result<(Identity, super::limits::UserSlot), Option<CloseReason>>
where
    S: Stream<Item = Result<Message, axum::Error>>
        + Sink<Message, Error = axum::Error>
        + Unpin
        + Send,
{
    let deadline = TokioInstant::now() + state.limits.auth_timeout;
    loop {
        let message = tokio::select! {
            () = sleep_until(deadline) => return Err(Some(CloseReason::Unauthorized("authentication timeout".into()))),
            () = state.shutdown.cancelled() => return Err(Some(CloseReason::ShuttingDown)),
            message = socket.next() => message,
        };
        let text = match message {
            None => return Err(None),
            Some(Err(error)) => return Err(read_error_reason(error)),
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(_))) => return Err(None),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Binary(_))) => {
                return Err(Some(CloseReason::Unauthorized(
                    "authenticate first with a text auth message".into(),
                )));
            }
        };
        let token = match ClientMessage::parse(&text) {
            Ok(ClientMessage::Auth { token, .. }) => token,
            Ok(_) => {
                return Err(Some(CloseReason::Unauthorized(
                    "authenticate first: {\"type\":\"auth\",\"token\":…}".into(),
                )))
            }
            Err(BadRequest { message, reference }) => {
                let error = ServerMessage::Error {
                    code: ErrorCode::BadRequest,
                    message: &message,
                    reference: reference.as_ref(),
                };
                if socket.send(text_message(&error)).await.is_err() {
                    return Err(None);
                }
                continue;
            }
        };
        let identity = verify(state, &token)
            .await
            .map_err(|error| Some(CloseReason::Unauthorized(error.to_string())))?;
        let slot = state
            .connections
            .acquire_user(&identity.user, state.limits.max_connections_per_user)
            .ok_or(Some(CloseReason::TooManyConnections))?;
        return Ok((identity, slot));
    }
}

async fn verify(state: &AppState, token: &str) -> Result<Identity, AuthError> {
    let result = state.verifier.verify(token).await;
    match &result {
        Ok(_) => state.metrics.authentication("ok"),
        Err(error) => state.metrics.authentication(error_label(error)),
    }
    result
}

struct Session {
    state: Arc<AppState>,
    identity: Identity,
    registration: Registration,
    control: Arc<SessionControl>,
    queue: QueueReceiver,
    rate: RateLimiter,
    /// The replay being sent; live events wait until it is done.
    replay: Option<mpsc::Receiver<ReplayItem>>,
    replays_waiting: VecDeque<ReplayRequest>,
    awaiting_pong_since: Option<Instant>,
}

impl Session {
    async fn serve<S>(&mut self, socket: &mut S) -> Option<CloseReason>
    where
        S: Stream<Item = Result<Message, axum::Error>>
            + Sink<Message, Error = axum::Error>
            + Unpin
            + Send,
    {
        let leeway = self.state.verifier.leeway();
        let mut expiry = Box::pin(sleep_until(
            TokioInstant::now() + self.identity.remaining() + leeway,
        ));
        let ping_interval = self.state.limits.ping_interval;
        let mut ping = tokio::time::interval_at(TokioInstant::now() + ping_interval, ping_interval);
        let control = self.control.clone();
        let shutdown = self.state.shutdown.clone();
        loop {
            tokio::select! {
                // Closing reasons first, then the client, then events.
                biased;
                reason = control.closed() => return Some(reason),
                () = shutdown.cancelled() => return Some(CloseReason::ShuttingDown),
                () = &mut expiry => return Some(CloseReason::TokenExpired),
                _ = ping.tick() => {
                    if self.awaiting_pong_since.is_some_and(|since| since.elapsed() >= ping_interval) {
                        return Some(CloseReason::PongTimeout);
                    }
                    if self.awaiting_pong_since.is_none() {
                        self.awaiting_pong_since = Some(Instant::now());
                    }
                    if socket.send(Message::Ping(bytes::Bytes::from_static(b"rls-relay"))).await.is_err() {
                        return None;
                    }
                }
                inbound = socket.next() => {
                    let message = match inbound {
                        None => return None,
                        Some(Err(error)) => return read_error_reason(error),
                        Some(Ok(message)) => message,
                    };
                    match message {
                        Message::Text(text) => {
                            if !self.rate.allow(Instant::now()) {
                                let error = ServerMessage::Error { code: ErrorCode::RateLimited, message: "too many messages", reference: None };
                                let _ = socket.send(text_message(&error)).await;
                                return Some(CloseReason::TooManyMessages);
                            }
                            if let Some(reason) = self.on_text(socket, &text, &mut expiry).await {
                                return Some(reason);
                            }
                        }
                        Message::Binary(_) => {
                            let error = ServerMessage::Error { code: ErrorCode::BadRequest, message: "binary frames are not part of the protocol; send JSON text", reference: None };
                            if socket.send(text_message(&error)).await.is_err() {
                                return None;
                            }
                        }
                        Message::Pong(_) => self.awaiting_pong_since = None,
                        Message::Ping(_) => {}
                        Message::Close(_) => return None,
                    }
                }
                item = recv_replay(&mut self.replay), if self.replay.is_some() => match item {
                    Some(ReplayItem::Event(outgoing)) => match self.send_events(socket, vec![outgoing]).await {
                        Sent::Done => {}
                        Sent::Gone => return None,
                        Sent::Closing(reason) => return Some(reason),
                    },
                    Some(ReplayItem::Failed) => return Some(CloseReason::Internal),
                    None => {
                        self.replay = self.replays_waiting.pop_front().map(|request| self.start_replay(request));
                    }
                },
                batch = self.queue.recv_many(WRITE_BATCH), if self.replay.is_none() => match batch {
                    Some(batch) => match self.send_events(socket, batch).await {
                        Sent::Done => {}
                        Sent::Gone => return None,
                        Sent::Closing(reason) => return Some(reason),
                    },
                    // The router is gone: only at shutdown, normally.
                    None if shutdown.is_cancelled() => return Some(CloseReason::ShuttingDown),
                    None => return Some(CloseReason::Internal),
                },
            }
        }
    }

    /// Sends a batch of events with one flush. A write that blocks (the client stopped
    /// reading) gives way to a close request or shutdown, and gives up after one ping
    /// interval: the socket is then a slow consumer.
    async fn send_events<S>(&mut self, socket: &mut S, batch: Vec<Outgoing>) -> Sent
    where
        S: Sink<Message, Error = axum::Error> + Unpin,
    {
        let control = self.control.clone();
        let shutdown = self.state.shutdown.clone();
        let deadline = self.state.limits.ping_interval;
        let sent: Vec<i64> = batch.iter().map(|o| o.committed_at_micros).collect();
        let write = async {
            for outgoing in batch {
                socket.feed(Message::Text(outgoing.frame)).await?;
            }
            socket.flush().await
        };
        let outcome = tokio::select! {
            biased;
            reason = control.closed() => Sent::Closing(reason),
            () = shutdown.cancelled() => Sent::Closing(CloseReason::ShuttingDown),
            written = tokio::time::timeout(deadline, write) => match written {
                Ok(Ok(())) => Sent::Done,
                Ok(Err(_)) => Sent::Gone,
                Err(_) => Sent::Closing(CloseReason::SlowConsumer),
            },
        };
        if outcome == Sent::Done {
            let now = now_micros();
            for committed_at in sent {
                let latency = Duration::from_micros(u64::try_from(now - committed_at).unwrap_or(0));
                self.state.metrics.delivery_latency_seconds.observe(latency);
            }
        }
        outcome
    }

    async fn on_text<S>(
        &mut self,
        socket: &mut S,
        text: &str,
        expiry: &mut std::pin::Pin<Box<tokio::time::Sleep>>,
    ) -> Option<CloseReason>
    where
        S: Sink<Message, Error = axum::Error> + Unpin,
    {
        let reply = match ClientMessage::parse(text) {
            Err(BadRequest { message, reference }) => {
                error_json(ErrorCode::BadRequest, &message, reference.as_ref())
            }
            Ok(ClientMessage::Ping { reference }) => ServerMessage::Pong {
                reference: reference.as_ref(),
            }
            .to_json(),
            Ok(ClientMessage::Auth { token, reference }) => match self.refresh(&token).await {
                Ok(()) => {
                    expiry.as_mut().reset(
                        TokioInstant::now()
                            + self.identity.remaining()
                            + self.state.verifier.leeway(),
                    );
                    ServerMessage::Authenticated {
                        expires_at: expires_at(self.identity.expires_at),
                        reference: reference.as_ref(),
                    }
                    .to_json()
                }
                Err(message) => error_json(ErrorCode::Unauthorized, &message, reference.as_ref()),
            },
            Ok(ClientMessage::Unsubscribe { reference }) => {
                self.state
                    .router
                    .unsubscribe(&self.registration, reference.clone())
                    .await;
                ServerMessage::Unsubscribed {
                    reference: reference.as_ref(),
                }
                .to_json()
            }
            Ok(ClientMessage::Subscribe(request)) => match self.subscribe(request).await {
                Ok(reply) => reply,
                Err(reason) => return Some(reason),
            },
        };
        if socket.send(json_message(reply)).await.is_err() {
            return None;
        }
        None
    }

    /// A fresh token for the same user extends the socket's life.
    async fn refresh(&mut self, token: &str) -> Result<(), String> {
        let identity = verify(&self.state, token)
            .await
            .map_err(|e| e.to_string())?;
        if identity.user != self.identity.user {
            return Err("a refreshed token must be for the same user".into());
        }
        if identity.claims != self.identity.claims {
            self.state
                .router
                .reauthenticate(&self.registration, identity.claims.clone())
                .await;
        }
        self.identity = identity;
        Ok(())
    }

    async fn subscribe(&mut self, request: SubscribeRequest) -> Result<String, CloseReason> {
        let reference = request.reference.clone();
        if let Some(tables) = &request.tables {
            let (unknown, tracked) = self.state.tracked.unknown(tables).await;
            if !unknown.is_empty() {
                let unknown: Vec<String> = unknown.iter().map(ToString::to_string).collect();
                let message = format!(
                    "not a tracked table: {} (tracked: {})",
                    unknown.join(", "),
                    tracked.join(", ")
                );
                return Ok(error_json(
                    ErrorCode::BadRequest,
                    &message,
                    reference.as_ref(),
                ));
            }
        }
        let mut replay_start = None;
        if let Some(since) = request.since {
            match self.state.replayer.check(since).await {
                Ok(Cursor::Retained(start)) => replay_start = Some(start),
                Ok(Cursor::Gap { pruned_through }) => {
                    let message = format!(
                        "events after {since} are no longer retained (pruned through {pruned_through}): refetch, then subscribe without since"
                    );
                    return Ok(error_json(
                        ErrorCode::ResumeGap,
                        &message,
                        reference.as_ref(),
                    ));
                }
                Ok(Cursor::Unknown { last_id }) => {
                    let message = format!(
                        "event {since} is unknown here (last id {last_id}): refetch, then subscribe without since"
                    );
                    return Ok(error_json(
                        ErrorCode::ResumeGap,
                        &message,
                        reference.as_ref(),
                    ));
                }
                Err(error) => {
                    tracing::warn!(error = %crate::errors::Chain(&error), "cannot check a resume cursor");
                    return Ok(error_json(
                        ErrorCode::Internal,
                        "cannot check the resume cursor; retry",
                        reference.as_ref(),
                    ));
                }
            }
        }
        let subscription = NewSubscription {
            reference: reference.clone(),
            tables: request.tables.clone(),
            credentials: request.credentials.clone(),
            resuming: request.since.is_some(),
        };
        let subscribed = match self
            .state
            .router
            .subscribe(&self.registration, subscription)
            .await
        {
            Ok(subscribed) => subscribed,
            Err(error) => {
                let (code, message) = match error {
                    SubscribeError::Forbidden => (
                        ErrorCode::Forbidden,
                        "not allowed to see one of these credentials".to_owned(),
                    ),
                    SubscribeError::TooManySubscriptions => (
                        ErrorCode::BadRequest,
                        format!(
                            "at most {} subscriptions per socket",
                            self.state.limits.max_subscriptions
                        ),
                    ),
                    SubscribeError::VisibilityUnavailable | SubscribeError::NotReady => {
                        (ErrorCode::Internal, format!("{error}; retry"))
                    }
                    SubscribeError::Gone => return Err(CloseReason::ShuttingDown),
                };
                return Ok(error_json(code, &message, reference.as_ref()));
            }
        };
        if let Some(start) = replay_start {
            let credentials = match &request.credentials {
                Some(wanted) => wanted.iter().cloned().collect(),
                None => subscribed.visible.iter().cloned().collect(),
            };
            let replay = ReplayRequest {
                start,
                position: subscribed.position,
                credentials,
                tables: request.tables,
            };
            if self.replay.is_none() {
                self.replay = Some(self.start_replay(replay));
            } else {
                self.replays_waiting.push_back(replay);
            }
        }
        Ok(ServerMessage::Subscribed {
            reference: reference.as_ref(),
        }
        .to_json())
    }

    fn start_replay(&self, request: ReplayRequest) -> mpsc::Receiver<ReplayItem> {
        replay::spawn(
            self.state.replayer.clone(),
            request,
            self.state.metrics.clone(),
        )
    }
}

/// How a write ended.
#[derive(Debug, PartialEq, Eq)]
enum Sent {
    Done,
    /// The client is gone.
    Gone,
    /// The socket must close (the write may be incomplete).
    Closing(CloseReason),
}

async fn recv_replay(replay: &mut Option<mpsc::Receiver<ReplayItem>>) -> Option<ReplayItem> {
    match replay {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

fn read_error_reason(error: axum::Error) -> Option<CloseReason> {
    let inner = error.into_inner();
    match inner.downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(_)) => Some(CloseReason::FrameTooLarge),
        _ => None,
    }
}

async fn send_close<S>(socket: &mut S, reason: &CloseReason)
where
    S: Sink<Message, Error = axum::Error> + Unpin,
{
    let frame = CloseFrame {
        code: reason.code(),
        reason: Utf8Bytes::from(reason.text()),
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        let _ = socket.send(Message::Close(Some(frame))).await;
        let _ = socket.close().await;
    })
    .await;
}

fn json_message(json: String) -> Message {
    Message::Text(Utf8Bytes::from(json))
}

fn text_message(message: &ServerMessage<'_>) -> Message {
    json_message(message.to_json())
}

fn error_json(code: ErrorCode, message: &str, reference: Option<&Reference>) -> String {
    ServerMessage::Error {
        code,
        message,
        reference,
    }
    .to_json()
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
