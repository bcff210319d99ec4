//! The routing table: which sockets get an event. Pure data, no I/O.
//!
//! `index` maps a credential to the sockets that both subscribed to it and may see it
//! (per their current visibility answer), so routing an event costs one hash lookup and
//! a walk over exactly its candidate sockets, whatever the number of users.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::auth::Claims;
use crate::db::snapshot::Snapshot;
use crate::domain::{CredentialId, TableFilter, UserId};
use crate::outbox::event::Event;
use crate::router::queue::{Outgoing, QueueSender, SessionControl};
use crate::ws::protocol::Reference;

pub type SessionId = u64;

/// One `subscribe`: an event matches when its table and credential pass the filters.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub reference: Option<Reference>,
    /// `None`: every tracked table.
    pub tables: Option<Box<[TableFilter]>>,
    /// `None`: every credential the user may see, now and later.
    pub credentials: Option<HashSet<CredentialId>>,
    /// Live from this snapshot on: events whose transaction is visible in it committed
    /// before the subscription's visibility answer and are not delivered.
    pub starts_after: Option<Arc<Snapshot>>,
}

impl Subscription {
    fn covers(&self, credential: &CredentialId) -> bool {
        self.credentials
            .as_ref()
            .is_none_or(|set| set.contains(credential))
    }

    fn matches(&self, event: &Event) -> bool {
        self.covers(&event.credential)
            && self
                .tables
                .as_ref()
                .is_none_or(|tables| tables.iter().any(|t| t.matches(&event.table)))
            && self
                .starts_after
                .as_ref()
                .is_none_or(|s| !s.is_visible(event.xid))
    }
}

/// A registered socket.
pub struct Route {
    pub claims: Claims,
    pub user: UserId,
    pub queue: QueueSender,
    pub control: Arc<SessionControl>,
    pub subscriptions: Vec<Subscription>,
    /// The credentials under which this socket sits in the index.
    indexed: Vec<CredentialId>,
}

/// Result of routing one event.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Sockets the event was queued for (to be woken once the read is routed).
    pub recipients: Vec<SessionId>,
    /// Sockets whose queue was full: the caller closes them as slow consumers.
    pub overflowed: Vec<SessionId>,
}

#[derive(Default)]
pub struct RoutingTable {
    routes: HashMap<SessionId, Route>,
    index: HashMap<CredentialId, Vec<SessionId>>,
}

impl RoutingTable {
    pub fn insert(
        &mut self,
        id: SessionId,
        claims: Claims,
        user: UserId,
        queue: QueueSender,
        control: Arc<SessionControl>,
    ) {
        self.routes.insert(
            id,
            Route {
                claims,
                user,

                queue,
                control,
                subscriptions: Vec::new(),
                indexed: Vec::new(),
            },
        );
    }

    pub fn remove(&mut self, id: SessionId) -> Option<Route> {
        let route = self.routes.remove(&id)?;
        for credential in &route.indexed {
            self.unindex(credential, id);
        }
        Some(route)
    }

    pub fn get(&self, id: SessionId) -> Option<&Route> {
        self.routes.get(&id)
    }

    pub fn get_mut(&mut self, id: SessionId) -> Option<&mut Route> {
        self.routes.get_mut(&id)
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn ids(&self) -> impl Iterator<Item = SessionId> + '_ {
        self.routes.keys().copied()
    }

    /// Puts socket `id` in the index under the credentials it subscribed to and may see.
    /// `visible == None` (unknown) indexes it nowhere: it gets nothing (fail closed).
    pub fn reindex(&mut self, id: SessionId, visible: Option<&HashSet<CredentialId>>) {
        let Some(route) = self.routes.get_mut(&id) else {
            return;
        };
        let desired: Vec<CredentialId> = match visible {
            None => Vec::new(),
            Some(visible) if route.subscriptions.iter().any(|s| s.credentials.is_none()) => {
                visible.iter().cloned().collect()
            }
            Some(visible) => {
                let mut wanted: Vec<CredentialId> = route
                    .subscriptions
                    .iter()
                    .filter_map(|s| s.credentials.as_ref())
                    .flatten()
                    .filter(|c| visible.contains(*c))
                    .cloned()
                    .collect();
                wanted.sort();
                wanted.dedup();
                wanted
            }
        };
        let previous = std::mem::replace(&mut route.indexed, desired.clone());
        let desired_set: HashSet<&CredentialId> = desired.iter().collect();
        let previous_set: HashSet<&CredentialId> = previous.iter().collect();
        for credential in previous.iter().filter(|c| !desired_set.contains(c)) {
            self.unindex(credential, id);
        }
        for credential in desired.iter().filter(|c| !previous_set.contains(c)) {
            self.index.entry(credential.clone()).or_default().push(id);
        }
    }

    fn unindex(&mut self, credential: &CredentialId, id: SessionId) {
        if let Some(ids) = self.index.get_mut(credential) {
            if let Some(at) = ids.iter().position(|&x| x == id) {
                ids.swap_remove(at);
            }
            if ids.is_empty() {
                self.index.remove(credential);
            }
        }
    }

    /// Enqueues `event` for every socket that subscribed to it and may see it, once each.
    pub fn route(&self, event: &Event) -> Delivery {
        let mut delivery = Delivery::default();
        self.route_into(event, &mut delivery);
        delivery
    }

    /// [`route`](Self::route), accumulating into `delivery`.
    pub fn route_into(&self, event: &Event, delivery: &mut Delivery) {
        for &id in self.indexed(&event.credential) {
            self.deliver(id, event, delivery);
        }
    }

    /// Wakes the sockets events were queued for.
    pub fn wake(&self, ids: &[SessionId]) {
        for id in ids {
            if let Some(route) = self.routes.get(id) {
                route.queue.wake();
            }
        }
    }

    /// Sockets in the index under `credential` (tests and metrics).
    pub fn candidates(&self, credential: &CredentialId) -> usize {
        self.index.get(credential).map_or(0, Vec::len)
    }

    /// The sockets in the index under `credential`.
    pub fn indexed(&self, credential: &CredentialId) -> &[SessionId] {
        self.index.get(credential).map_or(&[], Vec::as_slice)
    }

    /// Enqueues `event` for socket `id` if one of its subscriptions matches it (the caller
    /// has established that the socket may see it).
    pub fn deliver(&self, id: SessionId, event: &Event, delivery: &mut Delivery) {
        let Some(route) = self.routes.get(&id) else {
            return;
        };
        if !route.subscriptions.iter().any(|s| s.matches(event)) {
            return;
        }
        let outgoing = Outgoing {
            frame: event.frame.clone(),
            committed_at_micros: event.committed_at_micros,
        };
        match route.queue.push(outgoing) {
            Ok(()) => delivery.recipients.push(id),
            Err(_) => delivery.overflowed.push(id),
        }
    }

    /// Drops `starts_after` markers that no future batch can match any more.
    pub fn forget_passed_starts(&mut self, position: &Snapshot) {
        for route in self.routes.values_mut() {
            for subscription in &mut route.subscriptions {
                if subscription
                    .starts_after
                    .as_ref()
                    .is_some_and(|s| position.has_passed(s))
                {
                    subscription.starts_after = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::queue::{channel, QueueReceiver};

    fn event(id: i64, credential: &str, table: &str) -> Event {
        Event::for_test(id, 100, credential, table)
    }

    fn credentials(ids: &[&str]) -> HashSet<CredentialId> {
        ids.iter().map(|c| CredentialId::from_database(c)).collect()
    }

    fn subscription(tables: Option<&[&str]>, creds: Option<&[&str]>) -> Subscription {
        Subscription {
            reference: None,
            tables: tables.map(|t| t.iter().filter_map(|n| TableFilter::parse(n)).collect()),
            credentials: creds.map(credentials),
            starts_after: None,
        }
    }

    fn session(
        table: &mut RoutingTable,
        id: SessionId,
        subs: Vec<Subscription>,
        visible: &[&str],
    ) -> QueueReceiver {
        let (tx, rx) = channel(16, 1 << 20);
        table.insert(
            id,
            Claims::from_token_claims(&serde_json::Map::new()),
            UserId::new("u"),
            tx,
            Arc::default(),
        );
        table.get_mut(id).expect("inserted").subscriptions = subs;
        table.reindex(id, Some(&credentials(visible)));
        rx
    }

    fn pending(rx: &mut QueueReceiver) -> usize {
        futures_util::FutureExt::now_or_never(rx.recv_many(usize::MAX))
            .flatten()
            .map_or(0, |batch| batch.len())
    }

    #[test]
    fn an_event_reaches_only_sockets_that_may_see_its_credential() {
        let mut table = RoutingTable::default();
        let mut alice = session(&mut table, 1, vec![subscription(None, None)], &["a"]);
        let mut bob = session(&mut table, 2, vec![subscription(None, None)], &["b"]);
        assert_eq!(table.route(&event(1, "a", "positions")).recipients.len(), 1);
        assert_eq!((pending(&mut alice), pending(&mut bob)), (1, 0));
    }

    #[test]
    fn table_and_credential_filters_apply_and_overlapping_subscriptions_deliver_once() {
        let mut table = RoutingTable::default();
        let mut rx = session(
            &mut table,
            1,
            vec![
                subscription(Some(&["positions"]), None),
                subscription(None, Some(&["a"])),
            ],
            &["a", "b"],
        );
        assert_eq!(table.route(&event(1, "a", "positions")).recipients.len(), 1);
        assert_eq!(table.route(&event(2, "b", "orders")).recipients.len(), 0);
        assert_eq!(table.route(&event(3, "b", "positions")).recipients.len(), 1);
        assert_eq!(pending(&mut rx), 2);
    }

    #[test]
    fn a_named_credential_that_is_no_longer_visible_stops_delivery() {
        let mut table = RoutingTable::default();
        let _rx = session(
            &mut table,
            1,
            vec![subscription(None, Some(&["a"]))],
            &["a"],
        );
        assert_eq!(table.candidates(&CredentialId::from_database("a")), 1);
        table.reindex(1, Some(&credentials(&["b"])));
        assert_eq!(table.route(&event(1, "a", "positions")).recipients.len(), 0);
        table.reindex(1, None);
        assert_eq!(table.candidates(&CredentialId::from_database("b")), 0);
    }

    #[test]
    fn removing_a_socket_removes_it_from_the_index() {
        let mut table = RoutingTable::default();
        let _rx = session(&mut table, 1, vec![subscription(None, None)], &["a", "b"]);
        assert!(table.remove(1).is_some());
        assert_eq!(table.candidates(&CredentialId::from_database("a")), 0);
        assert_eq!(
            table.route(&event(1, "a", "positions")),
            Delivery::default()
        );
    }

    #[test]
    fn a_full_queue_is_reported_not_waited_on() {
        let mut table = RoutingTable::default();
        let (tx, _rx) = channel(1, 1 << 20);
        table.insert(
            7,
            Claims::from_token_claims(&serde_json::Map::new()),
            UserId::new("u"),
            tx,
            Arc::default(),
        );
        table.get_mut(7).expect("inserted").subscriptions = vec![subscription(None, None)];
        table.reindex(7, Some(&credentials(&["a"])));
        assert_eq!(table.route(&event(1, "a", "t")).recipients.len(), 1);
        assert_eq!(table.route(&event(2, "a", "t")).overflowed, vec![7]);
    }

    #[test]
    fn events_committed_before_a_subscription_started_are_skipped() {
        let mut table = RoutingTable::default();
        let mut sub = subscription(None, None);
        sub.starts_after = Some(Arc::new(Snapshot::parse("100:105:").expect("valid")));
        let mut rx = session(&mut table, 1, vec![sub], &["a"]);
        assert_eq!(
            table.route(&event(1, "a", "t")).recipients.len(),
            0,
            "xid 100 committed before"
        );
        let mut later = event(2, "a", "t");
        later.xid = 105;
        assert_eq!(table.route(&later).recipients.len(), 1);
        assert_eq!(pending(&mut rx), 1);
    }
}
