//! Every bad input gets a clear answer and every resource a limit (SPEC §5–§6): each limit
//! hit gets its documented close code or error while healthy sockets carry on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::client::{events, Read, WsClient};
use common::process::RelayProcess;
use common::tokens::{sign, token};
use common::trading::Trading;
use common::{TestDb, TestRelay};
use futures_util::{SinkExt, StreamExt};
use rls_relay::auth::claims::Claims;
use rls_relay::config::DatabaseConfig;
use rls_relay::metrics::Metrics;
use rls_relay::visibility::VisibilityQuery;
use serde_json::json;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A healthy socket that must keep working while limits are hit next to it.
async fn healthy(relay: &TestRelay) -> WsClient {
    let mut socket = WsClient::connect(relay, &token("healthy")).await;
    socket.subscribe_all().await;
    socket
}

async fn assert_still_healthy(socket: &mut WsClient) {
    let pong = socket
        .request(json!({"type": "ping", "ref": "still"}))
        .await;
    assert_eq!(pong["type"], "pong");
}

#[tokio::test]
async fn an_oversized_message_closes_with_1009() {
    let (_db, relay) = TestRelay::on_example(|c| c.limits.max_frame_bytes = 4_096).await;
    let mut ok = healthy(&relay).await;
    let mut big = WsClient::connect(&relay, &token("alice")).await;
    big.send_text(&format!(
        r#"{{"type":"ping","ref":"{}"}}"#,
        "x".repeat(5_000)
    ))
    .await;
    assert_eq!(big.expect_close().await.0, 1009);
    assert_still_healthy(&mut ok).await;
}

#[tokio::test]
async fn subscriptions_per_socket_are_limited() {
    let (_db, relay) = TestRelay::on_example(|c| c.limits.max_subscriptions = 3).await;
    let mut socket = WsClient::connect(&relay, &token("alice")).await;
    for i in 0..3 {
        socket.subscribe(json!({"ref": i})).await;
    }
    let reply = socket
        .request(json!({"type": "subscribe", "ref": "4th"}))
        .await;
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("bad_request"))
    );
    assert!(reply["message"].as_str().unwrap().contains("at most 3"));
    socket
        .request(json!({"type": "unsubscribe", "ref": 0}))
        .await;
    socket.subscribe(json!({"ref": "again"})).await;
}

#[tokio::test]
async fn connections_are_limited_in_total_and_per_user() {
    let (_db, relay) = TestRelay::on_example(|c| {
        c.limits.max_connections = 4;
        c.limits.max_connections_per_user = 2;
    })
    .await;
    let _a1 = WsClient::connect(&relay, &token("alice")).await;
    let _a2 = WsClient::connect(&relay, &token("alice")).await;
    // The third for alice: refused before the upgrade with a header token...
    match WsClient::connect_bearer(&relay, &token("alice")).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 429),
        other => panic!("expected 429, got {:?}", other.map(|_| ())),
    }
    // ...closed with 4029 after first-message auth.
    let mut third = WsClient::wrap(WsClient::open(&relay.ws_url()).await);
    third
        .send(json!({"type": "auth", "token": token("alice")}))
        .await;
    assert_eq!(third.expect_close().await.0, 4029);
    // Other users still get in, up to the total.
    let _b1 = WsClient::connect(&relay, &token("bob")).await;
    let _b2 = WsClient::connect(&relay, &token("bob")).await;
    match tokio_tungstenite::connect_async(relay.ws_url()).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn a_socket_flooding_messages_is_closed_with_4029() {
    let (_db, relay) = TestRelay::on_example(|c| c.limits.max_messages_per_second = 5).await;
    let mut ok = healthy(&relay).await;
    let mut flood = WsClient::connect(&relay, &token("alice")).await;
    for i in 0..30 {
        flood.send(json!({"type": "ping", "ref": i})).await;
    }
    let mut rate_limited = false;
    let code = loop {
        match flood.read(Duration::from_secs(10)).await {
            Read::Message(m) if m["code"] == "rate_limited" => rate_limited = true,
            Read::Message(_) => {}
            Read::Closed(Some((code, _))) => break code,
            other => panic!("{other:?}"),
        }
    };
    assert!(rate_limited);
    assert_eq!(code, 4029);
    assert_still_healthy(&mut ok).await;
}

#[tokio::test]
async fn a_half_open_socket_that_never_answers_pings_is_closed() {
    let (_db, relay) =
        TestRelay::on_example(|c| c.limits.ping_interval = Duration::from_millis(500)).await;
    let mut silent = WsClient::connect(&relay, &token("alice")).await;
    // Not reading means not answering pings; after one unanswered interval it is closed.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(silent.expect_close().await, (1001, "ping timeout".into()));
}

#[tokio::test]
async fn permessage_deflate_is_not_negotiated() {
    let (_db, relay) = TestRelay::on_example(|_| {}).await;
    let mut request = relay.ws_url().into_client_request().unwrap();
    request.headers_mut().insert(
        "sec-websocket-extensions",
        "permessage-deflate; client_max_window_bits"
            .parse()
            .unwrap(),
    );
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert!(response.headers().get("sec-websocket-extensions").is_none());
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn a_binary_frame_or_invalid_input_is_an_error_and_the_socket_keeps_working() {
    let (_db, relay) = TestRelay::on_example(|_| {}).await;
    let mut socket = WsClient::connect(&relay, &token("alice")).await;
    socket
        .raw()
        .send(tungstenite::Message::binary(vec![0xff, 0xfe, 0x00, 0x80]))
        .await
        .unwrap();
    let reply = socket.next().await;
    assert_eq!(reply["code"], "bad_request");
    assert_still_healthy(&mut socket).await;
}

#[tokio::test]
async fn claims_are_data_never_sql() {
    let db = TestDb::example().await;
    let trading = Trading::new(db.client().await);
    trading.user("alice").await;
    let credential = trading.credential("alice", "main").await;
    let relay = TestRelay::start(&db.url()).await;
    let hostile = sign(json!({
        "sub": "alice'); drop table public.users; --",
        "exp": common::tokens::now() + 600,
        "role": "postgres\"; reset role; --",
    }));
    let mut socket = WsClient::connect(&relay, &hostile).await;
    socket.subscribe_all().await;
    let mut alice = WsClient::connect(&relay, &token("alice")).await;
    alice.subscribe_all().await;
    let id = trading.order(&credential, "X").await;
    alice.events_until(|v| v["id"] == id).await;
    assert!(events(&socket.drain(Duration::from_millis(300)).await).is_empty());
    let users: i64 = trading
        .client
        .query_one("select count(*) from users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(users, 1);
}

#[tokio::test]
async fn a_pooled_connection_keeps_nothing_from_one_visibility_query_to_the_next() {
    let db = TestDb::example().await;
    let trading = Trading::new(db.client().await);
    for user in ["alice", "bob"] {
        trading.user(user).await;
        trading.credential(user, "main").await;
    }
    let pool = rls_relay::db::pool(&DatabaseConfig::new(db.url()), 1).unwrap();
    let config = common::relay::config(&db.url());
    let visibility = VisibilityQuery::new(&config.visibility, Metrics::new());
    let claims = |sub: &str| match json!({ "sub": sub }) {
        serde_json::Value::Object(map) => Claims::from_token_claims(&map),
        _ => unreachable!(),
    };
    let alice = visibility.ask(&pool, &claims("alice")).await.unwrap();
    let bob = visibility.ask(&pool, &claims("bob")).await.unwrap();
    assert_eq!((alice.visible.len(), bob.visible.len()), (1, 1));
    assert!(alice.visible.is_disjoint(&bob.visible));

    // The pool's only connection, next: no role, no claims left behind.
    let client = pool.get().await.unwrap();
    let row = client
        .query_one(
            "select current_user::text, coalesce(current_setting('request.jwt.claims', true), '')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1)),
        ("postgres".into(), String::new())
    );
    client
        .batch_execute("begin; set local role app_user")
        .await
        .unwrap();
    let seen = client
        .query("select id from public.credentials", &[])
        .await
        .unwrap();
    client.batch_execute("rollback").await.unwrap();
    assert!(seen.is_empty(), "a query with no claims sees nothing");
}

#[tokio::test]
async fn memory_returns_to_its_baseline_after_ten_thousand_connections() {
    let db = TestDb::example().await;
    let relay = RelayProcess::start(
        &db.url(),
        None,
        &[("RELAY_MAX_CONNECTIONS_PER_USER", "1000")],
    )
    .await;
    let url = Arc::new(relay.ws_url());
    let cycle = |batch: usize| {
        let url = url.clone();
        async move {
            let mut tasks = Vec::new();
            for i in 0..batch {
                let url = url.clone();
                tasks.push(tokio::spawn(async move {
                    let mut socket =
                        WsClient::connect_to(&url, &token(&format!("user{}", i % 50))).await;
                    socket.subscribe_all().await;
                    socket.raw().close(None).await.ok();
                    while let Some(Ok(_)) = socket.raw().next().await {}
                }));
            }
            for task in tasks {
                task.await.unwrap();
            }
        }
    };
    // Warm up (allocator pools, caches), then measure.
    cycle(500).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = relay.rss_kib();
    for _ in 0..20 {
        cycle(500).await;
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let after = relay.rss_kib();
    let (_, metrics) = common::http::get(relay.port, "/metrics").await;
    eprintln!("10,000 connect/subscribe/close cycles: relay RSS {baseline} KiB -> {after} KiB");
    assert_eq!(
        common::http::metric(&metrics, "relay_connections"),
        Some(0.0)
    );
    assert_eq!(
        common::http::metric(&metrics, "relay_subscriptions"),
        Some(0.0)
    );
    assert!(
        after < baseline + 8 * 1024,
        "RSS grew from {baseline} KiB to {after} KiB"
    );
}
