//! Test harness: a real Postgres (TEST_DATABASE_URL, else a container where Docker
//! answers, else a throwaway local cluster), a fresh database per test cloned from a
//! migrated template, relays bound to port 0, WebSocket clients and tokens.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod client;
pub mod db;
pub mod relay;
pub mod tokens;

#[allow(unused_imports)]
pub use client::WsClient;
#[allow(unused_imports)]
pub use db::TestDb;
#[allow(unused_imports)]
pub use relay::TestRelay;
pub mod http;
pub mod isolation;
pub mod process;
pub mod trading;
pub mod writers;
