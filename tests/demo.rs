//! `rls-relay demo` as a person would try it (SPEC §6): the real binary on a free port,
//! the page and the client module, a token for a demo user, a socket that sees that
//! user's accounts' trades and nobody else's; Ctrl-C leaves no Postgres process and no
//! directory behind. And `serve` never has the demo's endpoints.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use common::client::{Read, WsClient, PATIENCE};
use common::http::get;
use common::tokens::token;
use common::{TestDb, TestRelay};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A request to the demo; a JSON body when given.
async fn http(port: u16, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
    common::http::request(port, method, path, body.as_ref()).await
}

fn postgres_processes_using(directory: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .filter(|cmdline| cmdline.contains("postgres") && cmdline.contains(directory))
        // The cluster's watchdog shell names the directory too, and exits with the demo.
        .filter(|cmdline| !cmdline.starts_with("sh -c"))
        .collect()
}

#[tokio::test]
async fn the_demo_serves_two_users_their_own_trades_and_cleans_up_on_ctrl_c() {
    let mut demo = tokio::process::Command::new(env!("CARGO_BIN_EXE_rls-relay"))
        .args([
            "demo",
            "--listen-addr",
            "127.0.0.1:0",
            "--trades-per-second",
            "20",
        ])
        .env("RELAY_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let mut stdout = BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut first_lines = Vec::new();
    let read_two = async {
        while first_lines.len() < 2 {
            match stdout.next_line().await.unwrap() {
                Some(line) => first_lines.push(line),
                None => panic!("the demo exited early: {first_lines:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read_two)
        .await
        .expect("the demo printed its URL within 60 s");
    let url = first_lines[0]
        .strip_prefix("rls-relay demo: ")
        .unwrap_or_else(|| panic!("first line: {:?}", first_lines[0]))
        .to_owned();
    println!("demo ready in {:?}: {url}", started.elapsed());
    let port: u16 = url
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap();
    let directory = first_lines[1]
        .split("cluster in ")
        .nth(1)
        .and_then(|rest| rest.split(" (port").next())
        .unwrap_or_else(|| panic!("second line: {:?}", first_lines[1]))
        .to_owned();
    assert!(std::path::Path::new(&directory).is_dir());
    assert!(!postgres_processes_using(&directory).is_empty());

    let (status, page) = get(port, "/").await;
    assert_eq!(status, 200);
    assert!(page.contains("/client.js"));
    let (status, client) = get(port, "/client.js").await;
    assert_eq!(status, 200);
    assert!(client.contains("export class RelayClient"));

    let (status, state) = http(port, "GET", "/demo/state", None).await;
    assert_eq!(status, 200, "{state}");
    let state: Value = serde_json::from_str(&state).unwrap();
    let owned_by = |owner: &str| -> BTreeSet<String> {
        state["credentials"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["owner_id"] == owner)
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let shared = state["shared_credential"].as_str().unwrap().to_owned();
    let mut bobs: BTreeSet<String> = owned_by("bob");
    bobs.insert(shared.clone());

    let (status, minted) = http(port, "POST", "/demo/token/bob", None).await;
    assert_eq!(status, 200, "{minted}");
    let bob_token = serde_json::from_str::<Value>(&minted).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = http(port, "POST", "/demo/token/mallory", None).await;
    assert_eq!(status, 404);

    let ws_url = format!("ws://127.0.0.1:{port}/ws");
    let mut bob = WsClient::wrap(WsClient::open(&ws_url).await);
    bob.send(json!({"type": "auth", "token": bob_token})).await;
    assert_eq!(bob.expect_type("welcome").await["user_id"], "bob");
    bob.subscribe_all().await;
    let mut seen = BTreeSet::new();
    while seen != bobs {
        match bob.read(PATIENCE).await {
            Read::Message(event) if event.get("op").is_some() => {
                let credential = event["credential_id"].as_str().unwrap().to_owned();
                assert!(bobs.contains(&credential), "bob received {event}");
                seen.insert(credential);
            }
            Read::Message(_) => {}
            other => panic!("waiting for bob's trades: {other:?}"),
        }
    }

    // Bob may not order on Alice's main account: RLS refuses it, as the REST API would.
    let alices_main = owned_by("alice")
        .into_iter()
        .find(|id| *id != shared && *id != state["transferable_credential"])
        .unwrap();
    let order = json!({"credential_id": alices_main, "symbol": "AAPL", "side": "buy", "qty": 1});
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let body = order.to_string();
    let request = format!(
        "POST /demo/api/orders HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {bob_token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 403"), "{response}");

    // Alice's retirement account is given to Bob: what commits after it reaches him.
    let transferable = state["transferable_credential"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, moved) = http(port, "POST", "/demo/transfer", Some(json!({"to": "bob"}))).await;
    assert_eq!(status, 200, "{moved}");
    let after = serde_json::from_str::<Value>(&moved).unwrap()["after"]
        .as_i64()
        .unwrap();
    loop {
        match bob.read(PATIENCE).await {
            Read::Message(event)
                if event["credential_id"] == transferable.as_str()
                    && event["id"].as_i64().unwrap() > after =>
            {
                break
            }
            Read::Message(_) => {}
            other => panic!("waiting for the transferred account's trades: {other:?}"),
        }
    }

    // Ctrl-C.
    let pid = demo.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let exit = tokio::time::timeout(Duration::from_secs(30), demo.wait())
        .await
        .expect("the demo stops within 30 s of Ctrl-C")
        .unwrap();
    assert!(exit.success(), "{exit}");
    assert_eq!(bob.expect_close().await.0, 1001);
    let mut rest = Vec::new();
    while let Ok(Some(line)) = stdout.next_line().await {
        rest.push(line);
    }
    assert!(
        rest.iter().any(|l| l.contains("stopped and deleted")),
        "{rest:?}"
    );
    assert!(
        !std::path::Path::new(&directory).exists(),
        "{directory} is left behind"
    );
    assert_eq!(postgres_processes_using(&directory), Vec::<String>::new());
}

#[tokio::test]
async fn serve_has_the_client_module_but_none_of_the_demo_endpoints() {
    let db = TestDb::example().await;
    let relay = TestRelay::start(&db.url()).await;
    let (status, client) = get(relay.port, "/client.js").await;
    assert_eq!(status, 200);
    assert!(client.contains("export class RelayClient"));
    assert_eq!(get(relay.port, "/").await.0, 404);
    assert_eq!(get(relay.port, "/demo/state").await.0, 404);
    assert_eq!(
        http(relay.port, "POST", "/demo/token/alice", None).await.0,
        404
    );
    assert_eq!(
        http(
            relay.port,
            "POST",
            "/demo/share",
            Some(json!({"shared": false}))
        )
        .await
        .0,
        404
    );
    // The relay itself still works.
    WsClient::connect(&relay, &token("alice")).await;
}
