//! Prometheus metrics, one registry per relay instance (not a process-global recorder), so
//! that two relays in one process, as in the tests, each count their own.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Every metric the relay exports. Cloning shares the underlying values.
#[derive(Clone, Default)]
pub struct Metrics {
    pub connections: Gauge,
    pub authentications: Family<ResultLabel, Counter>,
    pub subscriptions: Gauge,
    pub events_in: Counter,
    pub deliveries: Counter,
    pub deliveries_denied: Family<ReasonLabel, Counter>,
    pub socket_closes: Family<ReasonLabel, Counter>,
    pub slow_consumer_closes: Counter,
    pub queue_drops: Counter,
    pub visibility_cache_hits: Counter,
    pub visibility_cache_misses: Counter,
    pub visibility_invalidations: Counter,
    pub visibility_queries: Family<ResultLabel, Counter>,
    pub visibility_query_seconds: HistogramHandle,
    pub delivery_latency_seconds: HistogramHandle,
    pub listener_reconnects: Counter,
    pub listener_connected: Gauge,
    pub notifications: Counter,
    pub outbox_reads: Counter,
    pub outbox_lag_seconds: Gauge<f64, AtomicU64>,
    pub outbox_pruned: Counter,
    pub replayed_events: Counter,
    pub decode_errors: Counter,
}

/// A histogram with the buckets chosen for latencies (0.1 ms to ~6.5 s).
#[derive(Clone)]
pub struct HistogramHandle(Histogram);

impl Default for HistogramHandle {
    fn default() -> Self {
        Self(Histogram::new(exponential_buckets(0.0001, 2.0, 17)))
    }
}

impl HistogramHandle {
    pub fn observe(&self, elapsed: Duration) {
        self.0.observe(elapsed.as_secs_f64());
    }
}

/// Label values known in advance. Their series are created at zero, so that they exist
/// before the first occurrence: an alert on `rate(relay_deliveries_denied_total[5m]) > 0`
/// needs the series to be there, and a dashboard shows 0 rather than "no data". Values not
/// listed here still appear once they occur.
const AUTHENTICATION_RESULTS: [&str; 6] = [
    "ok",
    "malformed",
    "bad_signature",
    "wrong_algorithm",
    "expired",
    "invalid_claims",
];
const DENIAL_REASONS: [&str; 3] = [
    "ambiguous_visibility",
    "visibility_unavailable",
    "forbidden_subscription",
];
const CLOSE_REASONS: [&str; 5] = [
    "shutdown",
    "unauthorized",
    "token_expired",
    "slow_consumer",
    "too_many_connections",
];

impl Metrics {
    pub fn new() -> Arc<Self> {
        let metrics = Self::default();
        // Creating a series is touching it: `inc_by(0)`.
        for result in AUTHENTICATION_RESULTS {
            metrics
                .authentications
                .get_or_create(&ResultLabel { result })
                .inc_by(0);
        }
        for result in ["ok", "error"] {
            metrics
                .visibility_queries
                .get_or_create(&ResultLabel { result })
                .inc_by(0);
        }
        for reason in DENIAL_REASONS {
            metrics
                .deliveries_denied
                .get_or_create(&ReasonLabel { reason })
                .inc_by(0);
        }
        for reason in CLOSE_REASONS {
            metrics
                .socket_closes
                .get_or_create(&ReasonLabel { reason })
                .inc_by(0);
        }
        Arc::new(metrics)
    }

    pub fn visibility_query(&self, elapsed: Duration, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.visibility_queries
            .get_or_create(&ResultLabel { result })
            .inc();
        self.visibility_query_seconds.observe(elapsed);
    }

    pub fn authentication(&self, result: &'static str) {
        self.authentications
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    pub fn denied(&self, reason: &'static str, count: u64) {
        self.deliveries_denied
            .get_or_create(&ReasonLabel { reason })
            .inc_by(count);
    }

    pub fn socket_closed(&self, reason: &'static str) {
        self.socket_closes
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Visibility queries run so far (both outcomes): what a test reads to show that
    /// routing events costs none.
    pub fn visibility_query_count(&self) -> u64 {
        ["ok", "error"]
            .iter()
            .map(|result| {
                self.visibility_queries
                    .get_or_create(&ResultLabel { result })
                    .get()
            })
            .sum()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut registry = Registry::with_prefix("relay");
        let m = self.clone();
        registry.register("connections", "Open WebSockets", m.connections);
        registry.register(
            "authentications",
            "Token verifications by result",
            m.authentications,
        );
        registry.register("subscriptions", "Active subscriptions", m.subscriptions);
        registry.register("events_in", "Events read from the outbox", m.events_in);
        registry.register("deliveries", "Events enqueued to sockets", m.deliveries);
        registry.register(
            "deliveries_denied",
            "Deliveries withheld because visibility was ambiguous or unavailable",
            m.deliveries_denied,
        );
        registry.register(
            "socket_closes",
            "Sockets closed by the relay, by reason",
            m.socket_closes,
        );
        registry.register(
            "slow_consumer_closes",
            "Sockets closed with 4008",
            m.slow_consumer_closes,
        );
        registry.register(
            "queue_drops",
            "Events dropped because a send queue was full",
            m.queue_drops,
        );
        registry.register(
            "visibility_cache_hits",
            "Subscriptions answered from the cache",
            m.visibility_cache_hits,
        );
        registry.register(
            "visibility_cache_misses",
            "Subscriptions that needed a query",
            m.visibility_cache_misses,
        );
        registry.register(
            "visibility_invalidations",
            "Visibility announcements applied",
            m.visibility_invalidations,
        );
        registry.register(
            "visibility_queries",
            "Visibility queries by result",
            m.visibility_queries,
        );
        registry.register(
            "visibility_query_seconds",
            "Visibility query latency",
            m.visibility_query_seconds.0,
        );
        registry.register(
            "delivery_latency_seconds",
            "Commit (or outbox write) to socket send",
            m.delivery_latency_seconds.0,
        );
        registry.register(
            "listener_reconnects",
            "Listener connections established",
            m.listener_reconnects,
        );
        registry.register(
            "listener_connected",
            "1 while the listener is connected",
            m.listener_connected,
        );
        registry.register("notifications", "NOTIFY wake-ups received", m.notifications);
        registry.register("outbox_reads", "Outbox batch reads", m.outbox_reads);
        registry.register(
            "outbox_lag_seconds",
            "Age of the newest event of the last batch when it was read",
            m.outbox_lag_seconds,
        );
        registry.register(
            "outbox_pruned",
            "Outbox rows pruned past retention",
            m.outbox_pruned,
        );
        registry.register(
            "replayed_events",
            "Events sent by resume replays",
            m.replayed_events,
        );
        registry.register(
            "decode_errors",
            "Outbox rows that could not be decoded",
            m.decode_errors,
        );
        let mut text = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_counts() {
        let metrics = Metrics::new();
        metrics.events_in.inc_by(3);
        metrics.visibility_query(Duration::from_millis(2), true);
        let text = metrics.render();
        assert!(text.contains("relay_events_in_total 3"), "{text}");
        assert!(
            text.contains("relay_visibility_queries_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("relay_visibility_query_seconds_bucket"),
            "{text}"
        );
        assert_eq!(metrics.visibility_query_count(), 1);
    }

    #[test]
    fn known_label_values_are_exported_at_zero_before_they_occur() {
        let text = Metrics::new().render();
        for line in [
            "relay_authentications_total{result=\"bad_signature\"} 0",
            "relay_deliveries_denied_total{reason=\"visibility_unavailable\"} 0",
            "relay_socket_closes_total{reason=\"slow_consumer\"} 0",
            "relay_visibility_queries_total{result=\"error\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
