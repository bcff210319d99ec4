//! Visibility answers cached per distinct claims set, so that routing an event costs no
//! database round trip in steady state. Owned by the router task: no locks.
//!
//! An entry lives while sockets use it, and a while after (a reconnecting user hits the
//! cache). A visibility announcement invalidates in stream order: entries in use are
//! recomputed as of the batch that carried it, idle ones are dropped.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::Answer;
use crate::auth::Claims;
use crate::domain::UserId;
use crate::router::table::SessionId;

/// Idle entries kept at most, and for how long.
const MAX_IDLE_ENTRIES: usize = 10_000;
const IDLE_TTL: Duration = Duration::from_secs(300);

pub struct Entry<W> {
    /// `None` until a query answers, or after one failed (fail closed).
    pub answer: Option<Answer>,
    /// The user these claims name (RELAY_USER_CLAIM): announcements about one user
    /// concern only that user's answers.
    pub user: Option<UserId>,
    /// Sockets whose claims these are.
    pub sessions: HashSet<SessionId>,
    /// The epoch a query in flight was started in.
    pub in_flight: Option<u64>,
    /// Requests waiting for the answer.
    pub waiting: Vec<W>,
    idle_since: Option<Instant>,
}

impl<W> Entry<W> {
    fn new() -> Self {
        Self {
            answer: None,
            user: None,
            sessions: HashSet::new(),
            in_flight: None,
            waiting: Vec::new(),
            idle_since: Some(Instant::now()),
        }
    }
}

pub struct VisibilityCache<W> {
    entries: HashMap<Claims, Entry<W>>,
}

impl<W> Default for VisibilityCache<W> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
        }
    }
}

impl<W> VisibilityCache<W> {
    pub fn get(&self, claims: &Claims) -> Option<&Entry<W>> {
        self.entries.get(claims)
    }

    pub fn get_mut(&mut self, claims: &Claims) -> Option<&mut Entry<W>> {
        self.entries.get_mut(claims)
    }

    /// The entry for `claims`, created empty when missing.
    pub fn entry(&mut self, claims: &Claims) -> &mut Entry<W> {
        self.entries
            .entry(claims.clone())
            .or_insert_with(Entry::new)
    }

    pub fn attach(&mut self, claims: &Claims, user: &UserId, session: SessionId) {
        let entry = self.entry(claims);
        entry.sessions.insert(session);
        entry.user.get_or_insert_with(|| user.clone());
        entry.idle_since = None;
    }

    pub fn detach(&mut self, claims: &Claims, session: SessionId) {
        if let Some(entry) = self.entries.get_mut(claims) {
            entry.sessions.remove(&session);
            if entry.sessions.is_empty() && entry.waiting.is_empty() {
                entry.idle_since = Some(Instant::now());
            }
        }
    }

    /// Claims of the answers that sockets use and that `concerned` selects (by user):
    /// what an announcement must recompute. Answers nobody uses are dropped instead; a
    /// query in flight is asked again when it returns (its epoch is stale), and sockets
    /// that never subscribed need no answer.
    pub fn claims_to_recompute(
        &mut self,
        concerned: impl Fn(Option<&UserId>) -> bool,
    ) -> Vec<Claims> {
        self.entries.retain(|_, entry| {
            !entry.sessions.is_empty() || entry.in_flight.is_some() || !entry.waiting.is_empty()
        });
        self.entries
            .iter()
            .filter(|(_, entry)| {
                !entry.sessions.is_empty()
                    && entry.in_flight.is_none()
                    && entry.answer.is_some()
                    && concerned(entry.user.as_ref())
            })
            .map(|(claims, _)| claims.clone())
            .collect()
    }

    /// Drops idle entries past their time, and the oldest when there are too many.
    pub fn evict_idle(&mut self, now: Instant) {
        self.entries.retain(|_, entry| {
            entry
                .idle_since
                .is_none_or(|since| now.duration_since(since) < IDLE_TTL)
        });
        let idle = self
            .entries
            .values()
            .filter(|e| e.idle_since.is_some())
            .count();
        if idle > MAX_IDLE_ENTRIES {
            let mut by_age: Vec<(Instant, Claims)> = self
                .entries
                .iter()
                .filter_map(|(claims, e)| e.idle_since.map(|since| (since, claims.clone())))
                .collect();
            by_age.sort_by_key(|(since, _)| *since);
            for (_, claims) in by_age.into_iter().take(idle - MAX_IDLE_ENTRIES) {
                self.entries.remove(&claims);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(sub: &str) -> Claims {
        match json!({ "sub": sub }) {
            serde_json::Value::Object(map) => Claims::from_token_claims(&map),
            _ => unreachable!(),
        }
    }

    fn answered(cache: &mut VisibilityCache<()>, sub: &str) {
        cache.entry(&claims(sub)).answer = Some(Answer {
            visible: Default::default(),
            as_of: std::sync::Arc::new(crate::db::snapshot::Snapshot::nothing_visible()),
        });
    }

    #[test]
    fn only_answers_in_use_are_recomputed_and_idle_ones_are_dropped() {
        let mut cache: VisibilityCache<()> = VisibilityCache::default();
        for (sub, session) in [("alice", 1), ("bob", 2), ("carol", 3), ("dave", 4)] {
            cache.attach(&claims(sub), &UserId::new(sub), session);
        }
        for sub in ["alice", "bob", "dave"] {
            answered(&mut cache, sub);
        }
        cache.detach(&claims("bob"), 2);
        // carol never subscribed: nothing to recompute for her; dave is not concerned.
        let concerned = |user: Option<&UserId>| user.is_some_and(|u| u.as_str() != "dave");
        assert_eq!(cache.claims_to_recompute(concerned), vec![claims("alice")]);
        assert!(cache.get(&claims("bob")).is_none());
    }

    #[test]
    fn idle_entries_expire() {
        let mut cache: VisibilityCache<()> = VisibilityCache::default();
        cache.attach(&claims("alice"), &UserId::new("alice"), 1);
        cache.detach(&claims("alice"), 1);
        cache.evict_idle(Instant::now());
        assert_eq!(cache.len(), 1, "kept for a reconnect");
        cache.evict_idle(Instant::now() + IDLE_TTL + Duration::from_secs(1));
        assert!(cache.is_empty());
    }
}
