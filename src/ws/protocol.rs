//! Protocol v1 messages: JSON text frames. Client messages are parsed strictly into
//! types (with a clear error for anything else, never a panic); server messages are
//! serialized from types.

use std::collections::HashSet;

use serde::Serialize;
use serde_json::{Map, Number, Value};

use crate::domain::{CredentialId, EventId, TableFilter};

/// Most tables one `subscribe` may name, and most credentials.
const MAX_TABLES: usize = 64;
const MAX_CREDENTIALS: usize = 1_000;
const MAX_REFERENCE_LEN: usize = 128;

/// A client's `ref`, echoed back as it was sent: a string or a number.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Reference {
    Text(String),
    Number(Number),
}

#[derive(Debug, PartialEq)]
pub enum ClientMessage {
    Auth {
        token: String,
        reference: Option<Reference>,
    },
    Subscribe(SubscribeRequest),
    Unsubscribe {
        reference: Option<Reference>,
    },
    Ping {
        reference: Option<Reference>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct SubscribeRequest {
    pub reference: Option<Reference>,
    pub tables: Option<Vec<TableFilter>>,
    pub credentials: Option<HashSet<CredentialId>>,
    pub since: Option<EventId>,
}

/// A message the relay could not accept, with the `ref` to answer under when it was
/// readable.
#[derive(Debug, PartialEq)]
pub struct BadRequest {
    pub message: String,
    pub reference: Option<Reference>,
}

impl ClientMessage {
    pub fn parse(text: &str) -> Result<Self, BadRequest> {
        let value: Value = serde_json::from_str(text).map_err(|e| BadRequest {
            message: format!("not valid JSON ({e})"),
            reference: None,
        })?;
        let Value::Object(object) = value else {
            return Err(bad("a message must be a JSON object", None));
        };
        let reference = match object.get("ref") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.len() <= MAX_REFERENCE_LEN => {
                Some(Reference::Text(s.clone()))
            }
            Some(Value::Number(n)) => Some(Reference::Number(n.clone())),
            Some(_) => {
                return Err(bad(
                    "ref must be a string (at most 128 bytes) or a number",
                    None,
                ))
            }
        };
        let kind = match object.get("type") {
            Some(Value::String(kind)) => kind.as_str(),
            _ => return Err(bad("missing \"type\"", reference)),
        };
        match kind {
            "auth" => match object.get("token") {
                Some(Value::String(token)) if !token.is_empty() => Ok(Self::Auth {
                    token: token.clone(),
                    reference,
                }),
                _ => Err(bad("auth needs a \"token\" string", reference)),
            },
            "subscribe" => parse_subscribe(&object, reference),
            "unsubscribe" => Ok(Self::Unsubscribe { reference }),
            "ping" => Ok(Self::Ping { reference }),
            _ => Err(bad(
                "unknown message type (expected auth, subscribe, unsubscribe or ping)",
                reference,
            )),
        }
    }
}

fn bad(message: &str, reference: Option<Reference>) -> BadRequest {
    BadRequest {
        message: message.to_owned(),
        reference,
    }
}

fn parse_subscribe(
    object: &Map<String, Value>,
    reference: Option<Reference>,
) -> Result<ClientMessage, BadRequest> {
    let tables = match object.get("tables") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) if !items.is_empty() && items.len() <= MAX_TABLES => Some(
            items
                .iter()
                .map(|item| item.as_str().and_then(TableFilter::parse))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    bad(
                        "tables must be table names such as \"positions\" or \"public.positions\"",
                        reference.clone(),
                    )
                })?,
        ),
        Some(_) => {
            return Err(bad(
                "tables must be a non-empty array of at most 64 table names",
                reference,
            ))
        }
    };
    let credentials = match object.get("credential_ids") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) if !items.is_empty() && items.len() <= MAX_CREDENTIALS => Some(
            items
                .iter()
                .map(|item| match item {
                    Value::String(s) => CredentialId::parse(s).ok(),
                    Value::Number(n) => CredentialId::parse(&n.to_string()).ok(),
                    _ => None,
                })
                .collect::<Option<HashSet<_>>>()
                .ok_or_else(|| {
                    bad(
                        "credential_ids must be strings (or integers)",
                        reference.clone(),
                    )
                })?,
        ),
        Some(_) => {
            return Err(bad(
                "credential_ids must be a non-empty array of at most 1000 ids",
                reference,
            ))
        }
    };
    let since = match object.get("since") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(
            n.as_i64()
                .filter(|&id| id >= 0)
                .ok_or_else(|| bad("since must be a non-negative event id", reference.clone()))?,
        ),
        Some(Value::String(s)) => Some(
            s.parse::<i64>()
                .ok()
                .filter(|&id| id >= 0)
                .ok_or_else(|| bad("since must be a non-negative event id", reference.clone()))?,
        ),
        Some(_) => return Err(bad("since must be an event id", reference)),
    };
    Ok(ClientMessage::Subscribe(SubscribeRequest {
        reference,
        tables,
        credentials,
        since: since.map(EventId),
    }))
}

/// Error codes of `{"type":"error"}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Forbidden,
    Unauthorized,
    ResumeGap,
    RateLimited,
    Internal,
}

/// Everything the relay sends besides events (which are pre-serialized).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage<'a> {
    Welcome {
        user_id: &'a str,
        connection_id: &'a str,
        expires_at: String,
    },
    Authenticated {
        expires_at: String,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a Reference>,
    },
    Subscribed {
        #[serde(rename = "ref")]
        reference: Option<&'a Reference>,
    },
    Unsubscribed {
        #[serde(rename = "ref")]
        reference: Option<&'a Reference>,
    },
    Pong {
        #[serde(rename = "ref")]
        reference: Option<&'a Reference>,
    },
    Error {
        code: ErrorCode,
        message: &'a str,
        #[serde(rename = "ref")]
        reference: Option<&'a Reference>,
    },
}

impl ServerMessage<'_> {
    pub fn to_json(&self) -> String {
        // Serializing these types cannot fail (string keys, no maps with other keys).
        serde_json::to_string(self)
            .unwrap_or_else(|_| r#"{"type":"error","code":"internal"}"#.to_owned())
    }
}

/// `exp` as RFC 3339.
pub fn expires_at(exp: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(exp))
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ClientMessage, BadRequest> {
        ClientMessage::parse(text)
    }

    #[test]
    fn a_full_subscribe_parses() {
        let message = parse(
            r#"{"type":"subscribe","ref":"1","tables":["positions","public.orders"],"credential_ids":["a",42],"since":1234}"#,
        )
        .expect("valid");
        let ClientMessage::Subscribe(request) = message else {
            panic!("not a subscribe")
        };
        assert_eq!(request.reference, Some(Reference::Text("1".into())));
        assert_eq!(request.tables.as_ref().map(Vec::len), Some(2));
        let credentials = request.credentials.expect("credentials");
        assert!(credentials.contains(&CredentialId::from_database("42")));
        assert_eq!(request.since, Some(EventId(1234)));
    }

    #[test]
    fn every_field_but_type_is_optional() {
        assert_eq!(
            parse(r#"{"type":"subscribe"}"#),
            Ok(ClientMessage::Subscribe(SubscribeRequest {
                reference: None,
                tables: None,
                credentials: None,
                since: None
            }))
        );
        assert_eq!(
            parse(r#"{"type":"ping","ref":3}"#),
            Ok(ClientMessage::Ping {
                reference: Some(Reference::Number(3.into()))
            })
        );
    }

    #[test]
    fn bad_input_is_a_bad_request_that_keeps_the_ref_when_it_can() {
        let cases = [
            (r#"not json"#, None),
            (r#"[1,2]"#, None),
            (r#"{"ref":"7"}"#, Some("7")),
            (r#"{"type":"dance","ref":"7"}"#, Some("7")),
            (r#"{"type":"auth","ref":"7"}"#, Some("7")),
            (r#"{"type":"subscribe","ref":"7","tables":[]}"#, Some("7")),
            (r#"{"type":"subscribe","ref":"7","tables":[1]}"#, Some("7")),
            (
                r#"{"type":"subscribe","ref":"7","credential_ids":"a"}"#,
                Some("7"),
            ),
            (
                r#"{"type":"subscribe","ref":"7","credential_ids":[{"x":1}]}"#,
                Some("7"),
            ),
            (r#"{"type":"subscribe","ref":"7","since":-1}"#, Some("7")),
            (r#"{"type":"subscribe","ref":"7","since":1e400}"#, None),
            (
                r#"{"type":"subscribe","ref":"7","since":99999999999999999999999}"#,
                Some("7"),
            ),
            (r#"{"type":"ping","ref":{"a":1}}"#, None),
        ];
        for (text, reference) in cases {
            let error = parse(text).expect_err(text);
            assert_eq!(
                error.reference,
                reference.map(|r| Reference::Text(r.into())),
                "{text}"
            );
            assert!(!error.message.is_empty());
        }
    }

    #[test]
    fn deeply_nested_json_is_refused_without_overflowing_the_stack() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(parse(&deep).is_err());
    }

    #[test]
    fn server_messages_have_the_documented_shape() {
        let reference = Reference::Text("1".into());
        assert_eq!(
            ServerMessage::Subscribed {
                reference: Some(&reference)
            }
            .to_json(),
            r#"{"type":"subscribed","ref":"1"}"#
        );
        assert_eq!(
            ServerMessage::Error {
                code: ErrorCode::ResumeGap,
                message: "m",
                reference: None
            }
            .to_json(),
            r#"{"type":"error","code":"resume_gap","message":"m","ref":null}"#
        );
        assert_eq!(expires_at(0), "1970-01-01T00:00:00Z");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// JSON-ish text: fragments that exercise the parser (deep nesting, huge numbers,
        /// escapes), glued at random.
        fn jsonish() -> impl Strategy<Value = String> {
            let fragment = prop_oneof![
                Just("{".to_owned()),
                Just("}".to_owned()),
                Just("[".to_owned()),
                Just("]".to_owned()),
                Just(",".to_owned()),
                Just(":".to_owned()),
                Just("\"type\"".to_owned()),
                Just("\"subscribe\"".to_owned()),
                Just("\"since\"".to_owned()),
                Just("\"credential_ids\"".to_owned()),
                Just("\"tables\"".to_owned()),
                Just("\"ref\"".to_owned()),
                Just("1e999999".to_owned()),
                Just("-0".to_owned()),
                Just("99999999999999999999999999999".to_owned()),
                Just("\"\\ud800\"".to_owned()),
                Just("null".to_owned()),
                "[ -~]{0,8}".prop_map(|s| s),
            ];
            prop::collection::vec(fragment, 0..64).prop_map(|parts| parts.concat())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2_000))]

            #[test]
            fn any_text_yields_a_message_or_a_described_error(text in any::<String>()) {
                if let Err(error) = ClientMessage::parse(&text) {
                    prop_assert!(!error.message.is_empty());
                }
            }

            #[test]
            fn json_like_text_yields_a_message_or_a_described_error(text in jsonish()) {
                if let Err(error) = ClientMessage::parse(&text) {
                    prop_assert!(!error.message.is_empty());
                }
            }

            #[test]
            fn arbitrary_bytes_as_lossy_text_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
                let _ = ClientMessage::parse(&String::from_utf8_lossy(&bytes));
            }

            #[test]
            fn deep_nesting_of_any_depth_is_refused_cleanly(depth in 1usize..100_000) {
                let text = format!("{{\"type\":\"subscribe\",\"tables\":{}{}}}", "[".repeat(depth), "]".repeat(depth));
                prop_assert!(ClientMessage::parse(&text).is_err());
            }
        }
    }
}
