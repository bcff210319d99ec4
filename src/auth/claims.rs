//! The claims of a verified token, in the form Postgres receives them and the visibility
//! cache is keyed by.

use std::fmt::Write as _;
use std::sync::Arc;

use serde_json::{Map, Value};

/// Registered claims that change from one token of a user to the next without changing
/// what the user may see. Leaving them out lets every token of a user share one cached
/// visibility answer, and keeps Postgres from seeing values that vary per token.
const PER_TOKEN_CLAIMS: [&str; 4] = ["exp", "iat", "nbf", "jti"];

/// Canonical JSON of a token's claims minus the per-token ones: keys sorted at every
/// level, no whitespace. Two tokens with the same identity claims produce the same text,
/// which is both what `set_config(<claims setting>, …, true)` receives and the cache key.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Claims(Arc<str>);

impl Claims {
    pub fn from_token_claims(claims: &Map<String, Value>) -> Self {
        let mut out = String::with_capacity(128);
        out.push('{');
        let mut keys: Vec<&String> = claims
            .keys()
            .filter(|k| !PER_TOKEN_CLAIMS.contains(&k.as_str()))
            .collect();
        keys.sort();
        for (i, key) in keys.into_iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            write_canonical(&Value::String(key.clone()), &mut out);
            out.push(':');
            write_canonical(&claims[key], &mut out);
        }
        out.push('}');
        Self(Arc::from(out))
    }

    /// The JSON text handed to Postgres.
    pub fn as_json(&self) -> &str {
        &self.0
    }
}

/// Never prints the claims: they may hold e-mail addresses and the like.
impl std::fmt::Debug for Claims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Claims({} bytes)", self.0.len())
    }
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            out.push('{');
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(&Value::String(key.clone()), out);
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => {
            // Strings, numbers, booleans and null serialize canonically on their own.
            let _ = write!(out, "{scalar}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(value: Value) -> Claims {
        match value {
            Value::Object(map) => Claims::from_token_claims(&map),
            _ => unreachable!("test claims are objects"),
        }
    }

    #[test]
    fn tokens_of_one_identity_share_one_key_whatever_their_lifetime() {
        let first = claims(
            json!({"sub": "alice", "role": "authenticated", "exp": 1, "iat": 0, "jti": "a"}),
        );
        let second = claims(
            json!({"role": "authenticated", "sub": "alice", "exp": 99, "nbf": 5, "jti": "b"}),
        );
        assert_eq!(first, second);
        assert_eq!(first.as_json(), r#"{"role":"authenticated","sub":"alice"}"#);
    }

    #[test]
    fn different_identity_claims_are_different_keys() {
        assert_ne!(
            claims(json!({"sub": "alice"})),
            claims(json!({"sub": "bob"}))
        );
        assert_ne!(
            claims(json!({"sub": "alice", "org": {"id": 1}})),
            claims(json!({"sub": "alice", "org": {"id": 2}}))
        );
    }

    #[test]
    fn nested_objects_are_canonical_and_strings_escaped() {
        let c = claims(json!({"b": {"z": 1, "a": [true, null]}, "a": "quote\"d"}));
        assert_eq!(
            c.as_json(),
            r#"{"a":"quote\"d","b":{"a":[true,null],"z":1}}"#
        );
        let parsed: Value = serde_json::from_str(c.as_json()).expect("valid JSON");
        assert_eq!(parsed["a"], "quote\"d");
    }

    #[test]
    fn debug_output_hides_the_claims() {
        assert!(!format!("{:?}", claims(json!({"email": "a@b.c"}))).contains("a@b.c"));
    }
}
