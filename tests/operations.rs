//! Operating the relay (SPEC §6): health, readiness, metrics, graceful shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::http::{get, metric};
use common::tokens::token;
use common::trading::Trading;
use common::{TestDb, TestRelay, WsClient};

#[tokio::test]
async fn health_and_readiness_answer() {
    let db = TestDb::example().await;
    let relay = TestRelay::start(&db.url()).await;
    assert_eq!(get(relay.port, "/healthz").await, (200, "ok".into()));
    assert_eq!(get(relay.port, "/readyz").await, (200, "ready".into()));
}

#[tokio::test]
async fn shutdown_closes_every_socket_with_1001() {
    let db = TestDb::example().await;
    let relay = TestRelay::start(&db.url()).await;
    let mut alice = WsClient::connect(&relay, &token("alice")).await;
    let mut bob = WsClient::connect(&relay, &token("bob")).await;
    bob.subscribe_all().await;
    let stopping = tokio::spawn(relay.stop());
    assert_eq!(alice.expect_close().await.0, 1001);
    assert_eq!(bob.expect_close().await.0, 1001);
    stopping.await.unwrap();
}

#[tokio::test]
async fn metrics_count_what_flows() {
    let db = TestDb::example().await;
    let trading = Trading::new(db.client().await);
    trading.user("alice").await;
    let credential = trading.credential("alice", "main").await;
    let relay = TestRelay::start(&db.url()).await;
    let mut alice = WsClient::connect(&relay, &token("alice")).await;
    alice.subscribe_all().await;
    let mut last = 0;
    for i in 0..5 {
        last = trading.order(&credential, &format!("M{i}")).await;
    }
    alice.events_until(|v| v["id"] == last).await;
    // Counters move when a read completes, just after its events are queued.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let (status, text) = loop {
        let (status, text) = get(relay.port, "/metrics").await;
        let done = metric(&text, "relay_deliveries_total").unwrap_or(0.0) >= 5.0;
        if done || tokio::time::Instant::now() > deadline {
            break (status, text);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(status, 200);

    assert_eq!(metric(&text, "relay_connections"), Some(1.0));
    assert_eq!(metric(&text, "relay_subscriptions"), Some(1.0));
    assert!(
        metric(&text, "relay_events_in_total").unwrap() >= 5.0,
        "{text}"
    );
    assert!(
        metric(&text, "relay_deliveries_total").unwrap() >= 5.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "relay_authentications_total{result=\"ok\"}"),
        Some(1.0)
    );
    assert_eq!(metric(&text, "relay_listener_connected"), Some(1.0));
    assert!(
        metric(&text, "relay_delivery_latency_seconds_count").unwrap() >= 5.0,
        "{text}"
    );
}

#[tokio::test]
async fn a_client_that_closes_gets_the_close_handshake_back() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::Message;

    let db = TestDb::example().await;
    let relay = TestRelay::start(&db.url()).await;
    let mut alice = WsClient::connect(&relay, &token("alice")).await;
    alice
        .raw()
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        })))
        .await
        .unwrap();
    let reply = tokio::time::timeout(std::time::Duration::from_secs(5), alice.raw().next())
        .await
        .expect("a reply to the close");
    match reply {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("expected the close handshake, got {other:?}"),
    }
}
