//! Tokens for tests, signed with the shared HS256 secret the test relays use.

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

pub const SECRET: &str = "test-secret-that-is-long-enough-for-hs256!";

pub fn now() -> u64 {
    rls_relay::auth::unix_now()
}

/// A token for `sub`, valid for an hour.
pub fn token(sub: &str) -> String {
    sign(json!({ "sub": sub, "exp": now() + 3600, "iat": now(), "role": "authenticated" }))
}

/// Signs arbitrary claims with the test secret (HS256).
pub fn sign(claims: Value) -> String {
    sign_with(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()).expect("key"),
        claims,
    )
}

pub fn sign_with(algorithm: Algorithm, key: &EncodingKey, claims: Value) -> String {
    encode(&Header::new(algorithm), &claims, key).expect("sign token")
}
