//! Authentication (SPEC §5): every bad token is refused and receives nothing; the
//! algorithm is pinned to the configured key; expiry closes with 4001 unless refreshed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::client::{Read, WsClient};
use common::tokens::{now, sign, sign_with, token, SECRET};
use common::TestRelay;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::json;
use tokio_tungstenite::tungstenite;

const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/keys");

fn key_file(name: &str) -> std::path::PathBuf {
    std::path::Path::new(KEYS).join(name)
}

fn rsa_key(name: &str) -> EncodingKey {
    EncodingKey::from_rsa_pem(&std::fs::read(key_file(name)).unwrap()).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    use std::fmt::Write;
    // base64url without padding, enough for hand-made tokens.
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            let _ = out.write_char(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// A token with `alg: none` and no signature.
fn unsigned_token(claims: serde_json::Value) -> String {
    format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes())
    )
}

/// Asserts that `token` is refused in all three ways of presenting it, and that the
/// socket gets nothing but the refusal.
async fn assert_refused(relay: &TestRelay, token: &str, why: &str) {
    match WsClient::connect_bearer(relay, token).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 401, "{why}"),
        Err(other) => panic!("{why}: unexpected error {other}"),
        Ok(_) => panic!("{why}: a bad bearer token was accepted"),
    }
    let mut socket = WsClient::wrap(WsClient::open(&relay.ws_url()).await);
    socket.send(json!({"type": "auth", "token": token})).await;
    assert_closed_4001_with_nothing_else(&mut socket, why).await;

    let url = format!("{}?token={}", relay.ws_url(), token);
    let mut socket = WsClient::wrap(WsClient::open(&url).await);
    assert_closed_4001_with_nothing_else(&mut socket, why).await;
}

async fn assert_closed_4001_with_nothing_else(socket: &mut WsClient, why: &str) {
    match socket.read(Duration::from_secs(10)).await {
        Read::Closed(Some((code, _))) => assert_eq!(code, 4001, "{why}"),
        Read::Message(message) => panic!("{why}: a refused socket received {message}"),
        other => panic!("{why}: expected a 4001 close, got {other:?}"),
    }
}

#[tokio::test]
async fn every_bad_token_is_refused_and_receives_nothing() {
    let (_db, relay) = TestRelay::on_example(|_| {}).await;
    let exp = now() + 600;
    let cases = [
        (sign(json!({"sub": "alice", "exp": now() - 60})), "expired"),
        (sign(json!({"sub": "alice"})), "no exp"),
        (
            sign(json!({"sub": "alice", "exp": "tomorrow"})),
            "string exp",
        ),
        (
            sign(json!({"sub": "alice", "exp": exp, "nbf": now() + 600})),
            "not yet valid",
        ),
        (sign(json!({"exp": exp})), "no sub"),
        (
            unsigned_token(json!({"sub": "alice", "exp": exp})),
            "alg none",
        ),
        (
            sign_with(
                Algorithm::HS256,
                &EncodingKey::from_secret(b"another-secret-of-sufficient-length!!").unwrap(),
                json!({"sub": "alice", "exp": exp}),
            ),
            "wrong key",
        ),
        (
            sign_with(
                Algorithm::HS512,
                &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
                json!({"sub": "alice", "exp": exp}),
            ),
            "HS512 when HS256 is configured",
        ),
        (
            sign_with(
                Algorithm::RS256,
                &rsa_key("rsa_private.pem"),
                json!({"sub": "alice", "exp": exp}),
            ),
            "RS256 when HS256 is configured",
        ),
        ("garbage".into(), "garbage"),
        ("a.b.c".into(), "three garbage parts"),
    ];
    for (token, why) in cases {
        assert_refused(&relay, &token, why).await;
    }
    assert!(relay.router.status().is_ready());
}

#[tokio::test]
async fn rs256_is_pinned_to_the_public_key_and_hs256_made_with_it_is_refused() {
    let (_db, relay) = TestRelay::on_example(|config| {
        config.jwt.jwt_secret = None;
        config.jwt.jwt_public_key_file = Some(key_file("rsa_public.pem"));
    })
    .await;
    let claims = json!({"sub": "alice", "exp": now() + 600});
    let good = sign_with(
        Algorithm::RS256,
        &rsa_key("rsa_private.pem"),
        claims.clone(),
    );
    let socket = WsClient::connect(&relay, &good).await;
    assert_eq!(socket.welcome["user_id"], "alice");

    // The classic confusion: an HMAC over the token with the *public* key as secret.
    let public_pem = std::fs::read(key_file("rsa_public.pem")).unwrap();
    let confused = sign_with(
        Algorithm::HS256,
        &EncodingKey::from_secret(&public_pem).unwrap(),
        claims.clone(),
    );
    assert_refused(&relay, &confused, "HS256 signed with the RSA public key").await;
    let other = sign_with(
        Algorithm::RS256,
        &rsa_key("other_rsa_private.pem"),
        claims.clone(),
    );
    assert_refused(&relay, &other, "another RSA key").await;
}

#[tokio::test]
async fn es256_keys_work() {
    let (_db, relay) = TestRelay::on_example(|config| {
        config.jwt.jwt_secret = None;
        config.jwt.jwt_public_key_file = Some(key_file("ec_public.pem"));
    })
    .await;
    let key =
        EncodingKey::from_ec_pem(&std::fs::read(key_file("ec_private.pem")).unwrap()).unwrap();
    let token = sign_with(
        Algorithm::ES256,
        &key,
        json!({"sub": "alice", "exp": now() + 600}),
    );
    let socket = WsClient::connect(&relay, &token).await;
    assert_eq!(socket.welcome["user_id"], "alice");
}

#[tokio::test]
async fn issuer_and_audience_are_required_when_configured() {
    let (_db, relay) = TestRelay::on_example(|config| {
        config.jwt.jwt_issuer = Some("https://auth.example".into());
        config.jwt.jwt_audience = vec!["trading".into()];
    })
    .await;
    let exp = now() + 600;
    let good =
        sign(json!({"sub": "alice", "exp": exp, "iss": "https://auth.example", "aud": "trading"}));
    WsClient::connect(&relay, &good).await;
    for (claims, why) in [
        (
            json!({"sub": "alice", "exp": exp, "iss": "https://evil.example", "aud": "trading"}),
            "wrong iss",
        ),
        (
            json!({"sub": "alice", "exp": exp, "aud": "trading"}),
            "missing iss",
        ),
        (
            json!({"sub": "alice", "exp": exp, "iss": "https://auth.example", "aud": "other"}),
            "wrong aud",
        ),
        (
            json!({"sub": "alice", "exp": exp, "iss": "https://auth.example"}),
            "missing aud",
        ),
    ] {
        assert_refused(&relay, &sign(claims), why).await;
    }
}

#[tokio::test]
async fn malformed_and_unknown_messages_get_bad_request_and_the_socket_keeps_working() {
    let (_db, relay) = TestRelay::on_example(|_| {}).await;
    let mut socket = WsClient::connect(&relay, &token("alice")).await;
    for text in [
        "{not json",
        "[]",
        r#"{"type":"dance","ref":"1"}"#,
        r#"{"type":"subscribe","tables":"positions"}"#,
        r#"{"type":"subscribe","since":-5}"#,
        &format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)),
    ] {
        socket.send_text(text).await;
        let reply = socket.next().await;
        assert_eq!(reply["type"], "error", "{text}: {reply}");
        assert_eq!(reply["code"], "bad_request", "{text}: {reply}");
    }
    let pong = socket.request(json!({"type": "ping", "ref": 7})).await;
    assert_eq!(pong, json!({"type": "pong", "ref": 7}));
}

#[tokio::test]
async fn a_token_expiring_mid_connection_closes_with_4001_unless_refreshed() {
    let (_db, relay) =
        TestRelay::on_example(|config| config.jwt.jwt_leeway = Duration::from_secs(1)).await;
    let short = |seconds: u64| sign(json!({"sub": "alice", "exp": now() + seconds}));

    let mut expiring = WsClient::connect(&relay, &short(2)).await;
    let mut refreshed = WsClient::connect(&relay, &short(2)).await;
    let reply = refreshed
        .request(json!({"type": "auth", "token": short(600)}))
        .await;
    assert_eq!(reply["type"], "authenticated", "{reply}");
    // Someone else's token is not a refresh.
    let reply = refreshed
        .request(json!({"type": "auth", "token": token("bob")}))
        .await;
    assert_eq!(reply["code"], "unauthorized", "{reply}");

    let (code, reason) = expiring.expect_close().await;
    assert_eq!((code, reason.as_str()), (4001, "token expired"));
    // Past the first token's expiry (and leeway), the refreshed socket still answers.
    let pong = refreshed
        .request(json!({"type": "ping", "ref": "after"}))
        .await;
    assert_eq!(pong["type"], "pong");
}

#[tokio::test]
async fn a_socket_that_does_not_authenticate_in_time_is_closed() {
    let (_db, relay) =
        TestRelay::on_example(|config| config.limits.auth_timeout = Duration::from_secs(1)).await;
    let mut silent = WsClient::wrap(WsClient::open(&relay.ws_url()).await);
    assert_eq!(
        silent.expect_close().await,
        (4001, "authentication timeout".into())
    );
    let mut eager = WsClient::wrap(WsClient::open(&relay.ws_url()).await);
    eager.send(json!({"type": "subscribe"})).await;
    assert_eq!(eager.expect_close().await.0, 4001);
}

#[tokio::test]
async fn the_old_front_ends_query_token_still_works() {
    let (_db, relay) = TestRelay::on_example(|_| {}).await;
    let url = format!("{}?token={}", relay.ws_url(), token("alice"));
    let mut socket = WsClient::wrap(WsClient::open(&url).await);
    let welcome = socket.expect_type("welcome").await;
    assert_eq!(welcome["user_id"], "alice");
    assert!(welcome["connection_id"]
        .as_str()
        .is_some_and(|id| !id.is_empty()));
    assert!(welcome["expires_at"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
}
