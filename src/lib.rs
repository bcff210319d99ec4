//! rls-relay: relays Postgres row changes to WebSocket clients, each event only to the
//! users whose Row-Level Security policies let them see it.
//!
//! ```text
//!  writer ──INSERT/UPDATE/DELETE──▶ table ──trigger──▶ relay.outbox row (+ NOTIFY when the relay idles)
//!                                                             │
//!   outbox::listener   one LISTEN connection; reconnects; the router reads batches through it
//!   outbox::reader     a batch = what committed between two snapshots (nothing skipped, nothing twice)
//!   router             one task: events and visibility announcements in commit order
//!     ├─ visibility    "which credentials may these claims see?" asked of Postgres as the REST role; cached
//!     └─ router::table credential → subscribed sockets that may see it; bounded queue per socket
//!   ws                 /ws: JWT auth, protocol v1, replay on resume, close codes
//!   http               /healthz /readyz /metrics /client.js
//!   demo               `rls-relay demo`: throwaway Postgres, simulator, the two-user page
//! ```
//!
//! The relay never decides on its own who may see what: Postgres' policies answer, under
//! the same role and claims as the REST API.

pub mod auth;
pub mod config;
pub mod db;
pub mod demo;
pub mod domain;
pub mod errors;
pub mod http;
pub mod metrics;
pub mod outbox;
pub mod router;
pub mod shutdown;
pub mod startup;
pub mod telemetry;
pub mod visibility;
pub mod ws;
