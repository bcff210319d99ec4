//! Logs of the real binary (SPEC §5–§6): with RELAY_LOG_FORMAT=json every stderr line is a
//! JSON object, a socket's lines carry its connection_id and user_id, and no token (good,
//! refreshed or bad; by query string, first message or header), no claims body and no
//! secret ever shows, even at debug level.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::client::{Read, WsClient, PATIENCE};
use common::tokens::{now, sign_with, token, SECRET};
use common::TestDb;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// `rls-relay serve` as a child process, its stderr captured line by line.
struct Served {
    child: tokio::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    port: u16,
}

impl Served {
    async fn start(database_url: &str, log_filter: &str) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rls-relay"))
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", database_url)
            .env("RELAY_JWT_SECRET", SECRET)
            .env("RELAY_LISTEN_ADDR", "127.0.0.1:0")
            .env("RELAY_LOG_FORMAT", "json")
            .env("RELAY_LOG", log_filter)
            .env("RELAY_SHUTDOWN_TIMEOUT", "5s")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn rls-relay serve");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (port_tx, port_rx) = tokio::sync::oneshot::channel();
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let captured = lines.clone();
        tokio::spawn(async move {
            let mut port_tx = Some(port_tx);
            while let Ok(Some(line)) = stderr.next_line().await {
                if let Ok(value) = serde_json::from_str::<Value>(&line) {
                    if value["message"] == "serving" {
                        if let (Some(tx), Some(port)) = (port_tx.take(), value["port"].as_u64()) {
                            let _ = tx.send(port as u16);
                        }
                    }
                }
                captured.lock().unwrap().push(line);
            }
        });
        let port = tokio::time::timeout(Duration::from_secs(30), port_rx)
            .await
            .unwrap_or_else(|_| panic!("no 'serving' line: {:#?}", lines.lock().unwrap()))
            .expect("the relay exited before serving");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while common::http::get(port, "/readyz").await.0 != 200 {
            assert!(tokio::time::Instant::now() < deadline, "never ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self { child, lines, port }
    }

    fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// SIGTERM, then waits for the exit; returns every line logged.
    async fn stop(mut self) -> Vec<String> {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("exit within the shutdown bound")
            .unwrap();
        assert!(exit.success(), "exit status {exit}");
        // The reader task finishes at EOF; give it the moment it needs.
        for _ in 0..100 {
            if Arc::strong_count(&self.lines) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let lines = self.lines.lock().unwrap().clone();
        lines
    }
}

async fn expect_welcome(client: &mut WsClient) -> Value {
    match client.read(PATIENCE).await {
        Read::Message(message) if message["type"] == "welcome" => message,
        other => panic!("expected welcome, got {other:?}"),
    }
}

#[tokio::test]
async fn json_logs_carry_the_connection_and_never_a_token_claims_or_secret() {
    let db = TestDb::example().await;
    // Everything at trace, dependencies included: the strictest place to look for leaks.
    let relay = Served::start(&db.url(), "trace").await;

    // 1. ?token= (the old front end).
    let by_query = token("alice");
    let mut query_socket =
        WsClient::wrap(WsClient::open(&format!("{}?token={by_query}", relay.ws_url())).await);
    let alice = expect_welcome(&mut query_socket).await;
    query_socket.subscribe_all().await;

    // 2. First message, then a refresh on the same socket.
    let by_message = token("bob");
    let refreshed =
        common::tokens::sign(json!({"sub": "bob", "exp": now() + 900, "role": "authenticated"}));
    let mut message_socket = WsClient::wrap(WsClient::open(&relay.ws_url()).await);
    message_socket
        .send(json!({"type": "auth", "token": by_message}))
        .await;
    expect_welcome(&mut message_socket).await;
    let reply = message_socket
        .request(json!({"type": "auth", "token": refreshed}))
        .await;
    assert_eq!(reply["type"], "authenticated", "{reply}");

    // 3. Authorization header.
    let by_header = common::tokens::sign(json!({"sub": "carol", "exp": now() + 600}));
    let mut request = relay.ws_url().into_client_request().unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {by_header}").parse().unwrap(),
    );
    let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let mut header_socket = WsClient::wrap(ws);
    expect_welcome(&mut header_socket).await;

    // 4. A bad token, all three ways.
    let bad = sign_with(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"not-the-relay-secret-but-long-enough!!").unwrap(),
        json!({"sub": "mallory", "exp": now() + 600, "email": "mallory@example.com"}),
    );
    let mut bad_message = WsClient::wrap(WsClient::open(&relay.ws_url()).await);
    bad_message
        .send(json!({"type": "auth", "token": bad}))
        .await;
    assert_eq!(bad_message.expect_close().await.0, 4001);
    let mut bad_query =
        WsClient::wrap(WsClient::open(&format!("{}?token={bad}", relay.ws_url())).await);
    assert_eq!(bad_query.expect_close().await.0, 4001);
    let mut request = relay.ws_url().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {bad}").parse().unwrap());
    assert!(tokio_tungstenite::connect_async(request).await.is_err());

    // Sockets still open at SIGTERM are closed with 1001, inside their spans.
    let lines = relay.stop().await;
    assert_eq!(query_socket.expect_close().await.0, 1001);

    assert!(lines.len() > 5, "too few lines to judge: {lines:#?}");
    let parsed: Vec<Value> = lines
        .iter()
        .map(|line| {
            let value: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            assert!(value.is_object(), "not a JSON object: {line}");
            value
        })
        .collect();

    let connection_id = alice["connection_id"].as_str().unwrap();
    let in_alices_span = parsed
        .iter()
        .filter(|v| v["span"]["connection_id"] == connection_id)
        .collect::<Vec<_>>();
    assert!(
        in_alices_span
            .iter()
            .any(|v| v["span"]["user_id"] == "alice"),
        "no line of alice's socket carries connection_id and user_id: {lines:#?}"
    );

    let mut secrets = vec![
        SECRET.to_owned(),
        "token=".to_owned(),
        "mallory@example.com".to_owned(),
    ];
    for token in [&by_query, &by_message, &refreshed, &by_header, &bad] {
        // The whole token, and its payload and signature alone.
        secrets.push(token.to_string());
        secrets.extend(token.split('.').skip(1).map(str::to_owned));
    }
    // Claims bodies as Postgres receives them (canonical JSON).
    secrets.push(r#""role":"authenticated","sub":"alice""#.into());
    secrets.push(r#"{"role":"authenticated","sub":"bob"}"#.into());
    // Look at the raw lines and at every string inside them, without quotes and
    // backslashes: a claims body may show escaped once or twice ({\\\"sub\\\":…}).
    for (line, value) in lines.iter().zip(&parsed) {
        let mut texts = vec![line.clone()];
        strings(value, &mut texts);
        for text in texts.iter().map(|t| bare(t)) {
            for secret in &secrets {
                assert!(
                    !text.contains(&bare(secret)),
                    "leaked {secret:?} in: {line}"
                );
            }
        }
    }
}

/// Every string in a JSON value, recursively.
fn strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
        Value::Object(map) => map.values().for_each(|v| strings(v, out)),
        _ => {}
    }
}

/// Text without the quotes and backslashes that escaping adds.
fn bare(text: &str) -> String {
    text.chars().filter(|c| !matches!(c, '"' | '\\')).collect()
}

#[tokio::test]
async fn at_the_default_level_nothing_below_info_is_logged() {
    let db = TestDb::example().await;
    let relay = Served::start(&db.url(), "info").await;
    // A socket that the client closes: tungstenite logs its close reply at debug.
    let mut socket = WsClient::wrap(WsClient::open(&relay.ws_url()).await);
    socket
        .send(json!({"type": "auth", "token": token("alice")}))
        .await;
    expect_welcome(&mut socket).await;
    socket.subscribe_all().await;
    socket.raw().close(None).await.unwrap();
    while let Read::Message(_) = socket.read(PATIENCE).await {}
    let lines = relay.stop().await;
    for line in &lines {
        let value: Value = serde_json::from_str(line).unwrap();
        assert!(
            matches!(value["level"].as_str(), Some("INFO" | "WARN" | "ERROR")),
            "{line}"
        );
    }
}
