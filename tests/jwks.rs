//! Keys from a JWKS URL (SPEC §5): chosen by `kid`, a rotation picked up without a restart,
//! and tokens with unknown `kid`s refused without hammering the identity provider.
//!
//! The identity provider is a tiny axum server in the test that serves a JWKS built from
//! the fixture keys and counts its requests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::get;
use common::client::{Read, WsClient, PATIENCE};
use common::tokens::now;
use common::{TestDb, TestRelay};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/keys");

fn private_key(name: &str, algorithm: Algorithm) -> EncodingKey {
    let pem = std::fs::read(std::path::Path::new(KEYS).join(name)).unwrap();
    match algorithm {
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem).unwrap(),
        _ => EncodingKey::from_rsa_pem(&pem).unwrap(),
    }
}

/// A signing key and the public JWK that verifies it, under `kid`.
struct Signer {
    kid: String,
    algorithm: Algorithm,
    key: EncodingKey,
}

impl Signer {
    fn new(kid: &str, file: &str, algorithm: Algorithm) -> Self {
        Self {
            kid: kid.into(),
            algorithm,
            key: private_key(file, algorithm),
        }
    }

    fn jwk(&self) -> Jwk {
        let mut jwk = Jwk::from_encoding_key(&self.key, self.algorithm).unwrap();
        jwk.common.key_id = Some(self.kid.clone());
        jwk
    }

    fn token(&self, sub: &str) -> String {
        self.token_with_kid(sub, &self.kid)
    }

    fn token_with_kid(&self, sub: &str, kid: &str) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, &json!({"sub": sub, "exp": now() + 600}), &self.key).unwrap()
    }
}

/// The identity provider: serves the current set and counts the fetches.
struct Provider {
    keys: Arc<Mutex<JwkSet>>,
    requests: Arc<AtomicUsize>,
    url: String,
}

impl Provider {
    async fn start(initial: &[&Signer]) -> Self {
        let keys = Arc::new(Mutex::new(JwkSet {
            keys: initial.iter().map(|s| s.jwk()).collect(),
        }));
        let requests = Arc::new(AtomicUsize::new(0));
        let (served, counted) = (keys.clone(), requests.clone());
        let app = axum::Router::new().route(
            "/.well-known/jwks.json",
            get(move || {
                let set = served.lock().unwrap().clone();
                counted.fetch_add(1, Ordering::SeqCst);
                async move { axum::Json(set) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            keys,
            requests,
            url: format!("http://127.0.0.1:{port}/.well-known/jwks.json"),
        }
    }

    fn publish(&self, signers: &[&Signer]) {
        self.keys.lock().unwrap().keys = signers.iter().map(|s| s.jwk()).collect();
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

async fn relay(db: &TestDb, provider: &Provider, min_refresh: Duration) -> TestRelay {
    let mut config = common::relay::config(&db.url());
    config.jwt.jwt_secret = None;
    config.jwt.jwt_jwks_url = Some(provider.url.clone());
    config.jwt.jwt_jwks_min_refresh = min_refresh;
    TestRelay::start_with(config).await
}

/// Authenticates with a first `auth` message: `true` on `welcome`, `false` on 4001.
async fn accepted(relay: &TestRelay, token: &str) -> bool {
    let mut socket = WsClient::wrap(WsClient::open(&relay.ws_url()).await);
    socket.send(json!({"type": "auth", "token": token})).await;
    match socket.read(PATIENCE).await {
        Read::Message(message) if message["type"] == "welcome" => true,
        Read::Closed(Some((4001, _))) => false,
        other => panic!("expected welcome or 4001, got {other:?}"),
    }
}

#[tokio::test]
async fn a_rotated_key_is_picked_up_without_a_restart_and_a_removed_one_stops_verifying() {
    let db = TestDb::example().await;
    let old = Signer::new("2026-old", "rsa_private.pem", Algorithm::RS256);
    let new = Signer::new("2026-new", "other_rsa_private.pem", Algorithm::RS256);
    let ec = Signer::new("2026-ec", "ec_private.pem", Algorithm::ES256);
    let provider = Provider::start(&[&old]).await;
    let relay = relay(&db, &provider, Duration::from_secs(1)).await;
    assert_eq!(provider.requests(), 1, "fetched once at start");

    assert!(accepted(&relay, &old.token("alice")).await);
    assert!(accepted(&relay, &old.token("bob")).await);
    assert_eq!(
        provider.requests(),
        1,
        "known kids are served from the cache"
    );

    // The provider rotates: new keys published, the old one withdrawn.
    provider.publish(&[&new, &ec]);
    // The first token with the new kid triggers a refetch, once the minimum interval
    // since the start-up fetch has passed; until then it is refused.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !accepted(&relay, &new.token("alice")).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new key was never picked up"
        );
    }
    assert!(
        accepted(&relay, &ec.token("alice")).await,
        "ES256 key by kid"
    );
    assert!(
        !accepted(&relay, &old.token("alice")).await,
        "the withdrawn key still verifies"
    );
    assert_eq!(
        provider.requests(),
        2,
        "one fetch at start, one for the rotation"
    );
}

#[tokio::test]
async fn unknown_kids_are_refused_without_hammering_the_provider() {
    let db = TestDb::example().await;
    let published = Signer::new("published", "rsa_private.pem", Algorithm::RS256);
    let stranger = Signer::new("stranger", "other_rsa_private.pem", Algorithm::RS256);
    let provider = Provider::start(&[&published]).await;
    let relay = relay(&db, &provider, Duration::from_secs(30)).await;
    assert_eq!(provider.requests(), 1);

    // Forty tokens with made-up kids, twenty of them at once.
    let mut sockets = Vec::new();
    let shared = &relay;
    for i in 0..20 {
        let token = stranger.token_with_kid("mallory", &format!("made-up-{i}"));
        sockets.push(async move { accepted(shared, &token).await });
    }
    for accepted in futures_util::future::join_all(sockets).await {
        assert!(!accepted, "a token with an unknown kid was accepted");
    }
    for i in 20..40 {
        let token = stranger.token_with_kid("mallory", &format!("made-up-{i}"));
        assert!(!accepted(&relay, &token).await);
    }
    // A real kid signed with the wrong key is refused too.
    assert!(!accepted(&relay, &stranger.token_with_kid("mallory", &published.kid)).await);
    assert!(accepted(&relay, &published.token("alice")).await);
    assert_eq!(
        provider.requests(),
        1,
        "within RELAY_JWT_JWKS_MIN_REFRESH of the last fetch, no unknown kid causes another"
    );
}
