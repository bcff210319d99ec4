//! Browser origins (SPEC §5–§6, RELAY_ALLOWED_ORIGINS): a page from an origin that is not
//! allowed cannot open a socket (close 1008, before any authentication), an allowed one
//! can, and a client without an `Origin` header (not a browser) always can.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::client::{Read, WsClient, PATIENCE};
use common::tokens::token;
use common::{TestDb, TestRelay};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Opens /ws with `origin` (if any), authenticates with a first message, and returns the
/// first thing the relay answers.
async fn open_from(relay: &TestRelay, origin: Option<&str>, bearer: bool) -> Read {
    let mut request = relay.ws_url().into_client_request().unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
    }
    if bearer {
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {}", token("alice")).parse().unwrap(),
        );
    }
    let (ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("the upgrade itself succeeds");
    let mut client = WsClient::wrap(ws);
    if !bearer {
        client
            .send(json!({"type": "auth", "token": token("alice")}))
            .await;
    }
    client.read(PATIENCE).await
}

fn is_welcome(read: &Read) -> bool {
    matches!(read, Read::Message(message) if message["type"] == "welcome")
}

fn is_bad_origin(read: &Read) -> bool {
    matches!(read, Read::Closed(Some((1008, _))))
}

#[tokio::test]
async fn a_listed_origin_passes_another_is_closed_with_1008_and_no_origin_passes() {
    let db = TestDb::example().await;
    let mut config = common::relay::config(&db.url());
    config.allowed_origins = vec!["https://app.example".into(), "http://localhost:3000".into()];
    let relay = TestRelay::start_with(config).await;

    for bearer in [false, true] {
        let allowed = open_from(&relay, Some("https://app.example"), bearer).await;
        assert!(is_welcome(&allowed), "listed origin: {allowed:?}");
        let allowed = open_from(&relay, Some("http://localhost:3000"), bearer).await;
        assert!(is_welcome(&allowed), "second listed origin: {allowed:?}");
        let none = open_from(&relay, None, bearer).await;
        assert!(is_welcome(&none), "no Origin header: {none:?}");
        for refused in [
            "https://evil.example",
            "https://app.example.evil.example",
            "http://app.example",
            "null",
        ] {
            let read = open_from(&relay, Some(refused), bearer).await;
            assert!(
                is_bad_origin(&read),
                "{refused} (bearer: {bearer}): {read:?}"
            );
        }
    }
}

#[tokio::test]
async fn by_default_only_the_relays_own_origin_passes() {
    let db = TestDb::example().await;
    let relay = TestRelay::start(&db.url()).await;
    // tungstenite sends Host: 127.0.0.1:<port>; a page served by the relay has that origin.
    let own = format!("http://127.0.0.1:{}", relay.port);
    assert!(is_welcome(&open_from(&relay, Some(&own), false).await));
    assert!(is_welcome(&open_from(&relay, None, false).await));
    let other = open_from(&relay, Some("https://elsewhere.example"), false).await;
    assert!(is_bad_origin(&other), "{other:?}");
}

#[tokio::test]
async fn a_star_allows_any_origin() {
    let db = TestDb::example().await;
    let mut config = common::relay::config(&db.url());
    config.allowed_origins = vec!["*".into()];
    let relay = TestRelay::start_with(config).await;
    assert!(is_welcome(
        &open_from(&relay, Some("https://anywhere.example"), false).await
    ));
}
