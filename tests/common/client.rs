//! A WebSocket client as a front end would use it: authenticate, subscribe, read events.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::relay::TestRelay;

/// How long a test waits for something that should arrive. Generous: it bounds a
/// failure, it is not a timing assertion.
pub const PATIENCE: Duration = Duration::from_secs(15);

pub type RawSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct WsClient {
    ws: RawSocket,
    pub welcome: Value,
    /// Events seen while waiting for a reply.
    backlog: VecDeque<Value>,
    /// Close frame received, if any.
    pub closed: Option<(u16, String)>,
}

/// What reading the socket produced.
#[derive(Debug)]
pub enum Read {
    Message(Value),
    Closed(Option<(u16, String)>),
    TimedOut,
}

impl WsClient {
    /// Connects and authenticates with a first `auth` message (the browser way).
    pub async fn connect(relay: &TestRelay, token: &str) -> Self {
        Self::connect_to(&relay.ws_url(), token).await
    }

    /// The same, to any relay's `ws://…/ws` URL.
    pub async fn connect_to(url: &str, token: &str) -> Self {
        let ws = Self::open(url).await;
        let mut client = Self::wrap(ws);
        client.send(json!({"type": "auth", "token": token})).await;
        client.welcome = client.expect_type("welcome").await;
        client
    }

    /// Connects with `Authorization: Bearer`.
    pub async fn connect_bearer(
        relay: &TestRelay,
        token: &str,
    ) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        let mut request = relay.ws_url().into_client_request()?;
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
        let (ws, _) = tokio_tungstenite::connect_async(request).await?;
        let mut client = Self::wrap(ws);
        client.welcome = client.expect_type("welcome").await;
        Ok(client)
    }

    /// Opens a socket without authenticating.
    pub async fn open(url: &str) -> RawSocket {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connect");
        ws
    }

    pub fn wrap(ws: RawSocket) -> Self {
        Self {
            ws,
            welcome: Value::Null,
            backlog: VecDeque::new(),
            closed: None,
        }
    }

    pub async fn send(&mut self, message: Value) {
        self.send_text(&message.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// The next JSON message (pings are answered by tungstenite while reading).
    pub async fn read(&mut self, timeout: Duration) -> Read {
        if let Some(value) = self.backlog.pop_front() {
            return Read::Message(value);
        }
        if self.closed.is_some() {
            return Read::Closed(self.closed.clone());
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next()).await;
            match next {
                Err(_) => return Read::TimedOut,
                Ok(None) | Ok(Some(Err(_))) => {
                    return Read::Closed(self.closed.clone());
                }
                Ok(Some(Ok(Message::Text(text)))) => {
                    return Read::Message(serde_json::from_str(&text).expect("server sends JSON"));
                }
                Ok(Some(Ok(Message::Close(frame)))) => {
                    self.closed = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                    if self.closed.is_none() {
                        self.closed = Some((u16::from(CloseCode::Status), String::new()));
                    }
                }
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// The next message, which must arrive.
    pub async fn next(&mut self) -> Value {
        match self.read(PATIENCE).await {
            Read::Message(value) => value,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// Reads until a message of `kind` (events in between are kept for later).
    pub async fn expect_type(&mut self, kind: &str) -> Value {
        let mut skipped = VecDeque::new();
        let found = loop {
            let value = match self.read(PATIENCE).await {
                Read::Message(value) => value,
                other => panic!("waiting for {kind:?}: {other:?}; skipped {skipped:?}"),
            };
            if value["type"] == kind {
                break value;
            }
            skipped.push_back(value);
        };
        skipped.extend(self.backlog.drain(..));
        self.backlog = skipped;
        found
    }

    /// Sends a request with `ref` and returns the reply to it (`subscribed`, `error`, …);
    /// events that arrive first are kept for later reads.
    pub async fn request(&mut self, mut message: Value) -> Value {
        let reference = message
            .get("ref")
            .cloned()
            .unwrap_or_else(|| json!(uuid::Uuid::new_v4().to_string()));
        message["ref"] = reference.clone();
        self.send(message).await;
        let mut skipped = VecDeque::new();
        let reply = loop {
            let value = match self.read(PATIENCE).await {
                Read::Message(value) => value,
                other => panic!("waiting for the reply to {reference}: {other:?}"),
            };
            let is_reply = value.get("ref") == Some(&reference)
                && !value["type"].as_str().unwrap_or("").ends_with("_update");
            if is_reply {
                break value;
            }
            skipped.push_back(value);
        };
        skipped.extend(self.backlog.drain(..));
        self.backlog = skipped;
        reply
    }

    /// Subscribes and asserts success.
    pub async fn subscribe(&mut self, message: Value) {
        let mut message = message;
        message["type"] = json!("subscribe");
        let reply = self.request(message).await;
        assert_eq!(reply["type"], "subscribed", "subscribe refused: {reply}");
    }

    /// Subscribes to everything the user may see.
    pub async fn subscribe_all(&mut self) {
        self.subscribe(json!({})).await;
    }

    /// Reads events until `last` returns true for one (included); panics on anything but
    /// events, or if it does not come.
    pub async fn events_until(&mut self, mut last: impl FnMut(&Value) -> bool) -> Vec<Value> {
        let mut events = Vec::new();
        loop {
            let value = match self.read(PATIENCE).await {
                Read::Message(value) => value,
                other => panic!("waiting for events: {other:?}; got so far {events:#?}"),
            };
            let done = last(&value);
            events.push(value);
            if done {
                return events;
            }
        }
    }

    /// Like `events_until`, but gives up after `patience` and returns what it got as an
    /// error (for tests that must report a missing event rather than panic on it).
    pub async fn try_events_until(
        &mut self,
        patience: Duration,
        mut last: impl FnMut(&Value) -> bool,
    ) -> Result<Vec<Value>, Vec<Value>> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut events = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read(left).await {
                Read::Message(value) => {
                    let done = last(&value);
                    events.push(value);
                    if done {
                        return Ok(events);
                    }
                }
                _ => return Err(events),
            }
        }
    }

    /// Reads what arrives within `window` (used only after a sentinel has shown that
    /// everything before it was delivered).
    pub async fn drain(&mut self, window: Duration) -> Vec<Value> {
        let mut out = Vec::new();
        while let Read::Message(value) = self.read(window).await {
            out.push(value);
        }
        out
    }

    /// Waits for the relay to close the socket; returns the close code and reason.
    pub async fn expect_close(&mut self) -> (u16, String) {
        loop {
            match self.read(PATIENCE).await {
                Read::Closed(Some(frame)) => return frame,
                Read::Closed(None) => panic!("socket dropped without a close frame"),
                Read::TimedOut => panic!("socket not closed in time"),
                Read::Message(_) => {}
            }
        }
    }

    pub fn raw(&mut self) -> &mut RawSocket {
        &mut self.ws
    }
}

/// Events only (drops non-event messages).
pub fn events(values: &[Value]) -> Vec<&Value> {
    values.iter().filter(|v| v.get("op").is_some()).collect()
}
