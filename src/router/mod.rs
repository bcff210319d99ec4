//! The router: one task that owns the routing table and the visibility cache, reads the
//! outbox in commit-order batches, applies visibility announcements at their place in the
//! stream, and pushes each event to exactly the sockets allowed to see it.
//!
//! Sockets talk to it through [`Router`]; a [`Registration`] unregisters its socket when
//! dropped, so a socket that goes away for any reason never stays subscribed.

pub mod commit_order;
pub mod queue;
pub mod table;
mod task;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use self::queue::{QueueSender, SessionControl};
use self::table::SessionId;
pub use self::task::{spawn, RouterSettings};
use crate::auth::Claims;
use crate::db::snapshot::Snapshot;
use crate::domain::{CredentialId, TableFilter, UserId};
use crate::visibility::VisibleSet;
use crate::ws::protocol::Reference;

/// What a socket asks of the router.
enum Request {
    Register {
        id: SessionId,
        claims: Claims,
        user: UserId,
        queue: QueueSender,
        control: Arc<SessionControl>,
    },
    Subscribe {
        id: SessionId,
        subscription: NewSubscription,
        reply: oneshot::Sender<Result<Subscribed, SubscribeError>>,
    },
    Unsubscribe {
        id: SessionId,
        reference: Option<Reference>,
        reply: oneshot::Sender<usize>,
    },
    Reauthenticate {
        id: SessionId,
        claims: Claims,
    },
}

/// A subscription as requested.
#[derive(Debug, Clone)]
pub struct NewSubscription {
    pub reference: Option<Reference>,
    pub tables: Option<Vec<TableFilter>>,
    pub credentials: Option<HashSet<CredentialId>>,
    /// Resuming: the replay covers what the router had relayed before the subscription
    /// went live, so live delivery starts right at the router's position.
    pub resuming: bool,
}

/// A live subscription, and what a replay needs to fill the gap before it.
#[derive(Debug, Clone)]
pub struct Subscribed {
    /// Everything committed in this snapshot was relayed before the subscription went
    /// live; everything after reaches it live.
    pub position: Arc<Snapshot>,
    /// The user's visibility answer at subscription time.
    pub visible: VisibleSet,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("credential not visible")]
    Forbidden,
    #[error("too many subscriptions on this socket")]
    TooManySubscriptions,
    #[error("visibility could not be determined")]
    VisibilityUnavailable,
    #[error("the relay is not connected to the database yet")]
    NotReady,
    #[error("the relay is shutting down")]
    Gone,
}

/// Health of the pipeline, for `/readyz`.
#[derive(Default)]
pub struct RelayStatus {
    /// The listener is connected and the last read caught up.
    caught_up: AtomicBool,
}

impl RelayStatus {
    pub fn is_ready(&self) -> bool {
        self.caught_up.load(Ordering::Acquire)
    }

    fn set_ready(&self, ready: bool) {
        self.caught_up.store(ready, Ordering::Release);
    }
}

/// Handle to the router task; cheap to clone.
#[derive(Clone)]
pub struct Router {
    requests: mpsc::Sender<Request>,
    removals: mpsc::UnboundedSender<SessionId>,
    next_id: Arc<AtomicU64>,
    status: Arc<RelayStatus>,
}

/// A socket's place in the router; dropping it unregisters the socket.
pub struct Registration {
    id: SessionId,
    removals: mpsc::UnboundedSender<SessionId>,
}

impl Registration {
    pub fn id(&self) -> SessionId {
        self.id
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // The router may already be gone at shutdown; nothing to undo then.
        let _ = self.removals.send(self.id);
    }
}

impl Router {
    pub fn status(&self) -> &RelayStatus {
        &self.status
    }

    pub async fn register(
        &self,
        claims: Claims,
        user: UserId,
        queue: QueueSender,
        control: Arc<SessionControl>,
    ) -> Result<Registration, SubscribeError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let registration = Registration {
            id,
            removals: self.removals.clone(),
        };
        self.requests
            .send(Request::Register {
                id,
                claims,
                user,
                queue,
                control,
            })
            .await
            .map_err(|_| SubscribeError::Gone)?;
        Ok(registration)
    }

    pub async fn subscribe(
        &self,
        registration: &Registration,
        subscription: NewSubscription,
    ) -> Result<Subscribed, SubscribeError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::Subscribe {
                id: registration.id,
                subscription,
                reply,
            })
            .await
            .map_err(|_| SubscribeError::Gone)?;
        answer.await.map_err(|_| SubscribeError::Gone)?
    }

    /// Removes the subscriptions made under `reference` (all when `None`); returns how many.
    pub async fn unsubscribe(
        &self,
        registration: &Registration,
        reference: Option<Reference>,
    ) -> usize {
        let (reply, answer) = oneshot::channel();
        let sent = self
            .requests
            .send(Request::Unsubscribe {
                id: registration.id,
                reference,
                reply,
            })
            .await;
        if sent.is_err() {
            return 0;
        }
        answer.await.unwrap_or(0)
    }

    /// A refreshed token whose identity claims differ: the socket switches to the new
    /// claims' visibility once it is known, and keeps the old answer until then.
    pub async fn reauthenticate(&self, registration: &Registration, claims: Claims) {
        let _ = self
            .requests
            .send(Request::Reauthenticate {
                id: registration.id,
                claims,
            })
            .await;
    }
}
