//! `GET /ws`: limits and authentication before the upgrade where possible, then one
//! session task per socket.
//!
//! Tokens come, in order of preference, from `Authorization: Bearer` (verified before the
//! upgrade: a bad one gets HTTP 401), a first `{"type":"auth"}` message (browsers: keeps
//! tokens out of URLs), or `?token=` (the old front end). Neither tokens nor query
//! strings are ever logged.

pub mod close;
pub mod limits;
pub mod protocol;
mod replay;
mod session;

use std::sync::Arc;

use axum::extract::{RawQuery, State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::auth::Identity;
use crate::http::AppState;
use limits::{TotalSlot, UserSlot};

/// How the socket will authenticate.
pub(crate) enum PreAuth {
    /// Verified from the Authorization header, with its per-user slot.
    Verified(Identity, UserSlot),
    /// `?token=`: verified after the upgrade so that a failure is a readable 4001.
    QueryToken(String),
    /// A first `auth` message within the deadline.
    FirstMessage,
}

/// Inbound read buffer per socket: small, since clients send little. (tungstenite's
/// default of 128 KiB per socket would cost 1.3 GB at 10,000 sockets.)
const READ_BUFFER: usize = 4 * 1024;
/// Outgoing bytes buffered before a write to the TCP socket.
const WRITE_BUFFER: usize = 8 * 1024;

pub async fn upgrade(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    upgrade: WebSocketUpgrade,
) -> Response {
    let Some(total_slot) = state
        .connections
        .acquire_total(state.limits.max_connections)
    else {
        state.metrics.socket_closed("too_many_connections");
        return (StatusCode::SERVICE_UNAVAILABLE, "too many connections").into_response();
    };
    let origin_allowed = state.origins.allows(&headers);
    let pre_auth = match bearer_token(&headers) {
        Some(token) if origin_allowed => match state.verifier.verify(token).await {
            Ok(identity) => {
                state.metrics.authentication("ok");
                let Some(user_slot) = state
                    .connections
                    .acquire_user(&identity.user, state.limits.max_connections_per_user)
                else {
                    state.metrics.socket_closed("too_many_connections");
                    return (
                        StatusCode::TOO_MANY_REQUESTS,
                        "too many connections for this user",
                    )
                        .into_response();
                };
                PreAuth::Verified(identity, user_slot)
            }
            Err(error) => {
                state.metrics.authentication(error_label(&error));
                return (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer")],
                    error.to_string(),
                )
                    .into_response();
            }
        },
        _ => match query.as_deref().and_then(query_token) {
            Some(token) => PreAuth::QueryToken(token),
            None => PreAuth::FirstMessage,
        },
    };
    let max_frame = state.limits.max_frame_bytes;
    let tracker = state.tracker.clone();
    upgrade
        .max_message_size(max_frame)
        .max_frame_size(max_frame)
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .on_upgrade(move |socket| {
            tracker.track_future(session::run(
                socket,
                state,
                pre_auth,
                origin_allowed,
                total_slot,
            ))
        })
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn query_token(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "token")
        .map(|(_, value)| value.into_owned())
        .filter(|t| !t.is_empty())
}

/// Metric label for a refused token.
pub(crate) fn error_label(error: &crate::auth::AuthError) -> &'static str {
    use crate::auth::AuthError::*;
    match error {
        Malformed | TooLarge => "malformed",
        BadSignature | UnknownKey => "bad_signature",
        WrongAlgorithm => "wrong_algorithm",
        Expired | NotYetValid => "expired",
        WrongIssuer | WrongAudience | MissingClaim(_) => "invalid_claims",
    }
}

/// Keeps the total slot alive with the socket.
pub(crate) struct Slots {
    pub _total: TotalSlot,
    pub _user: Option<UserSlot>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_read_from_a_bearer_header_or_the_query() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            "Bearer abc.def.ghi".parse().expect("valid"),
        );
        assert_eq!(bearer_token(&headers), Some("abc.def.ghi"));
        headers.insert(header::AUTHORIZATION, "Basic xyz".parse().expect("valid"));
        assert_eq!(bearer_token(&headers), None);
        assert_eq!(
            query_token("a=1&token=abc.def&b=2").as_deref(),
            Some("abc.def")
        );
        assert_eq!(query_token("token=").as_deref(), None);
        assert_eq!(query_token("other=1"), None);
    }
}
