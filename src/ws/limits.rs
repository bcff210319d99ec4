//! Resource limits of the WebSocket side: connections in total and per user, inbound
//! message rate, allowed browser origins.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::http::HeaderMap;

use crate::domain::UserId;

/// Open sockets, in total and per user. Slots are guards: dropping one frees it, so a
/// socket that ends in any way gives its place back.
#[derive(Default)]
pub struct ConnectionCounter {
    total: AtomicUsize,
    per_user: Mutex<HashMap<UserId, usize>>,
}

pub struct TotalSlot {
    counter: Arc<ConnectionCounter>,
}

pub struct UserSlot {
    counter: Arc<ConnectionCounter>,
    user: UserId,
}

impl ConnectionCounter {
    /// A place among `max` sockets, or `None` when all are taken.
    pub fn acquire_total(self: &Arc<Self>, max: usize) -> Option<TotalSlot> {
        let previous = self.total.fetch_add(1, Ordering::AcqRel);
        if previous >= max {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(TotalSlot {
            counter: self.clone(),
        })
    }

    /// A place among `max` sockets of `user`, or `None`.
    pub fn acquire_user(self: &Arc<Self>, user: &UserId, max: usize) -> Option<UserSlot> {
        let mut per_user = self.per_user.lock().ok()?;
        let count = per_user.entry(user.clone()).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(UserSlot {
            counter: self.clone(),
            user: user.clone(),
        })
    }

    pub fn total(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

impl Drop for TotalSlot {
    fn drop(&mut self) {
        self.counter.total.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        if let Ok(mut per_user) = self.counter.per_user.lock() {
            if let Some(count) = per_user.get_mut(&self.user) {
                *count -= 1;
                if *count == 0 {
                    per_user.remove(&self.user);
                }
            }
        }
    }
}

/// A token bucket: `rate` messages per second, bursts of `rate`.
pub struct RateLimiter {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    pub fn new(per_second: u32) -> Self {
        let rate = f64::from(per_second.max(1));
        Self {
            rate,
            tokens: rate,
            last: Instant::now(),
        }
    }

    /// Takes one token; `false` when the socket is over its rate.
    pub fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Which browser origins may open a socket.
#[derive(Clone, Debug)]
pub enum OriginPolicy {
    /// The page's origin must match the Host it connects to.
    SameOrigin,
    Any,
    List(Vec<String>),
}

impl OriginPolicy {
    pub fn from_config(origins: &[String]) -> Self {
        let origins: Vec<String> = origins
            .iter()
            .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
            .filter(|o| !o.is_empty())
            .collect();
        if origins.is_empty() {
            Self::SameOrigin
        } else if origins.iter().any(|o| o == "*") {
            Self::Any
        } else {
            Self::List(origins)
        }
    }

    /// Requests without an `Origin` header (non-browser clients) pass.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(origin) = headers.get(axum::http::header::ORIGIN) else {
            return true;
        };
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        match self {
            Self::Any => true,
            Self::List(allowed) => allowed.contains(&origin),
            Self::SameOrigin => {
                let host = headers
                    .get(axum::http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_ascii_lowercase);
                let origin_host = origin.split_once("://").map(|(_, rest)| rest);
                matches!((origin_host, host), (Some(o), Some(h)) if o == h)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(axum::http::header::HOST, host.parse().expect("valid"));
        if let Some(origin) = origin {
            headers.insert(axum::http::header::ORIGIN, origin.parse().expect("valid"));
        }
        headers
    }

    #[test]
    fn connection_slots_are_bounded_and_given_back_on_drop() {
        let counter = Arc::new(ConnectionCounter::default());
        let first = counter.acquire_total(1);
        assert!(first.is_some());
        assert!(counter.acquire_total(1).is_none());
        drop(first);
        assert!(counter.acquire_total(1).is_some());

        let alice = UserId::new("alice");
        let a = counter.acquire_user(&alice, 2);
        let b = counter.acquire_user(&alice, 2);
        assert!(a.is_some() && b.is_some());
        assert!(counter.acquire_user(&alice, 2).is_none());
        assert!(counter.acquire_user(&UserId::new("bob"), 2).is_some());
        drop(a);
        assert!(counter.acquire_user(&alice, 2).is_some());
    }

    #[test]
    fn the_rate_limiter_allows_a_burst_then_the_rate() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(5);
        assert!((0..5).all(|_| limiter.allow(start)));
        assert!(!limiter.allow(start));
        assert!(limiter.allow(start + Duration::from_millis(250)));
    }

    #[test]
    fn origins_same_origin_by_default_a_list_or_any() {
        let same = OriginPolicy::from_config(&[]);
        assert!(same.allows(&headers(None, "relay:8080")));
        assert!(same.allows(&headers(Some("http://relay:8080"), "relay:8080")));
        assert!(!same.allows(&headers(Some("https://evil.example"), "relay:8080")));

        let list = OriginPolicy::from_config(&["https://app.example/".into()]);
        assert!(list.allows(&headers(Some("https://APP.example"), "relay")));
        assert!(!list.allows(&headers(Some("https://app.example.evil"), "relay")));

        let any = OriginPolicy::from_config(&["*".into()]);
        assert!(any.allows(&headers(Some("https://anything"), "relay")));
    }
}
