//! Lossless delivery (SPEC §4) through every fault we can produce here: the LISTEN
//! backend terminated, Postgres restarted, a transaction committing out of id order, the
//! relay killed, a client that stops reading, two relays on one database.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::client::{events, Read};
use common::isolation::{
    assert_exactly_visible, assert_resumed_exactly_visible, read_through_sentinels, seed,
};
use common::process::RelayProcess;
use common::tokens::token;
use common::trading::Trading;
use common::{writers, TestDb, TestRelay, WsClient};
use serde_json::{json, Value};

/// Terminates the relay's LISTEN backend(s) in this database.
async fn terminate_listener(trading: &Trading) -> u64 {
    trading
        .client
        .query_one(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity
             where application_name = 'rls-relay listener' and datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0) as u64
}

#[tokio::test]
async fn a_terminated_listener_backend_during_continuous_writes_loses_nothing() {
    let db = TestDb::example().await;
    let trading = Trading::new(db.client().await);
    let world = seed(&trading).await;
    let relay = TestRelay::start(&db.url()).await;
    let mut sockets = Vec::new();
    for user in ["alice", "alice", "bob", "carol"] {
        let mut socket = WsClient::connect(&relay, &token(user)).await;
        socket.subscribe_all().await;
        sockets.push((user, socket));
    }
    let since = trading.last_event_id().await;
    let credentials = vec![
        world.alice_own.clone(),
        world.bob_own.clone(),
        world.carol_own.clone(),
        world.shared.clone(),
    ];
    let writing = writers::spawn(db.url(), credentials, 4, 150, Duration::from_millis(3));
    let mut terminated = 0;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        terminated += terminate_listener(&trading).await;
        relay.wait_ready().await;
    }
    assert!(writing.await.unwrap() >= 600);
    assert!(
        terminated >= 3,
        "the listener was terminated {terminated} times"
    );

    let mut refs: Vec<(&str, &mut WsClient)> = sockets.iter_mut().map(|(u, s)| (*u, s)).collect();
    let received = read_through_sentinels(&trading, &mut refs).await;
    for ((user, _), got) in sockets.iter().zip(&received) {
        assert_exactly_visible(&trading, user, got, since).await;
    }
    // A backend still exiting can be counted twice, so only "it did reconnect" is exact.
    let connections = relay.metrics.listener_reconnects.get();
    assert!(
        connections >= 2,
        "the listener reconnected: {connections} connections"
    );
}

#[tokio::test]
async fn a_transaction_that_took_its_id_first_but_commits_last_is_delivered_live_and_on_replay() {
    let db = TestDb::example().await;
    let trading = Trading::new(db.client().await);
    let world = seed(&trading).await;
    let relay = TestRelay::start(&db.url()).await;
    let mut live = WsClient::connect(&relay, &token("alice")).await;
    live.subscribe_all().await;
    let mut leaving = WsClient::connect(&relay, &token("alice")).await;
    leaving.subscribe_all().await;

    // T1 takes an id, then waits; T2 takes a later id and commits first.
    let slow = db.client().await;
    slow.batch_execute("begin").await.unwrap();
    slow.execute(
        "insert into orders (credential_id, symbol, side, qty) values ($1::text::uuid, 'EARLY-ID', 'buy', 1)",
        &[&world.alice_own],
    )
    .await
    .unwrap();
    let late_id: i64 = slow
        .query_one("select max(id) from relay.outbox", &[])
        .await
        .unwrap()
        .get(0);
    let early_commit = trading.order(&world.alice_own, "LATE-ID").await;
    assert!(early_commit > late_id);
    let first = live.events_until(|v| v["id"] == early_commit).await;
    assert_eq!(events(&first).len(), 1);
    // The leaving client got the later id, then goes away before T1 commits.
    leaving.events_until(|v| v["id"] == early_commit).await;
    drop(leaving);
    slow.batch_execute("commit").await.unwrap();

    let second = live.events_until(|v| v["id"] == late_id).await;
    assert_eq!(events(&second).len(), 1, "the late commit arrives live");

    // Resuming from the last id it saw, the leaving client still gets the lower id.
    let mut back = WsClient::connect(&relay, &token("alice")).await;
    back.subscribe(json!({"since": early_commit})).await;
    let after = trading.order(&world.alice_own, "AFTER").await;
    let replayed = back.events_until(|v| v["id"] == after).await;
    let ids: Vec<i64> = events(&replayed)
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![late_id, after]);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_with_4008_while_a_healthy_one_keeps_up() {
    let db = TestDb::example().await;
    let trading = Trading::new(db.client().await);
    let world = seed(&trading).await;
    let relay = RelayProcess::start(&db.url(), None, &[("RELAY_SEND_QUEUE_MESSAGES", "64")]).await;
    let mut healthy = WsClient::connect_to(&relay.ws_url(), &token("alice")).await;
    healthy.subscribe_all().await;
    let mut stalled = WsClient::connect_to(&relay.ws_url(), &token("alice")).await;
    stalled.subscribe_all().await;
    let rss_before = relay.rss_kib();

    // The healthy reader drains concurrently; the stalled one reads nothing.
    let done = Arc::new(AtomicBool::new(false));
    let reading = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut count = 0usize;
            loop {
                match healthy.read(Duration::from_millis(200)).await {
                    Read::Message(v) if v.get("op").is_some() => count += 1,
                    Read::Message(_) => {}
                    Read::TimedOut if done.load(Ordering::Acquire) => return (healthy, count),
                    Read::TimedOut => {}
                    Read::Closed(frame) => panic!("the healthy socket was closed: {frame:?}"),
                }
            }
        })
    };
    // Rows of 2 KB, enough to fill the socket buffers and then the queue.
    let big: String = "x".repeat(2_000);
    let mut written = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        for _ in 0..100 {
            trading.order(&world.alice_own, &big).await;
            written += 1;
        }
        let (_, metrics) = common::http::get(relay.port, "/metrics").await;
        if common::http::metric(&metrics, "relay_slow_consumer_closes_total") == Some(1.0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no slow-consumer close after {written} events"
        );
    }
    let rss_at_close = relay.rss_kib();
    // Now read: whatever the kernel buffered, then the close frame.
    let (code, reason) = stalled.expect_close().await;
    assert_eq!((code, reason.as_str()), (4008, "slow consumer"));

    let last = trading.order(&world.alice_own, "LAST").await;
    done.store(true, Ordering::Release);
    let (mut healthy, count) = reading.await.unwrap();
    let tail = healthy.drain(Duration::from_millis(300)).await;
    let total = count + events(&tail).len();
    assert!(
        total > written,
        "healthy socket got {total} of {} events",
        written + 1
    );
    let _ = last;
    eprintln!(
        "slow consumer: {written} events of 2 KB written; relay RSS {rss_before} KiB before, {rss_at_close} KiB at the close, {} KiB after",
        relay.rss_kib()
    );
    assert!(
        rss_at_close < rss_before + 64 * 1024,
        "relay memory stays bounded: {rss_before} KiB -> {rss_at_close} KiB"
    );
}

#[tokio::test]
async fn a_relay_killed_mid_stream_and_restarted_loses_nothing_for_clients_that_resume() {
    let db = TestDb::example().await;
    let trading = Trading::new(db.client().await);
    let world = seed(&trading).await;
    let mut relay = RelayProcess::start(&db.url(), None, &[]).await;
    let port = relay.port;
    let since = trading.last_event_id().await;
    let mut alice = WsClient::connect_to(&relay.ws_url(), &token("alice")).await;
    let mut bob = WsClient::connect_to(&relay.ws_url(), &token("bob")).await;
    alice.subscribe_all().await;
    bob.subscribe_all().await;

    let credentials = vec![
        world.alice_own.clone(),
        world.bob_own.clone(),
        world.shared.clone(),
    ];
    let writing = writers::spawn(db.url(), credentials, 3, 200, Duration::from_millis(2));
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.kill();
    let mut received: Vec<(&str, Vec<Value>)> = Vec::new();
    for (user, socket) in [("alice", &mut alice), ("bob", &mut bob)] {
        let before_kill = socket.drain(Duration::from_millis(200)).await;
        received.push((user, before_kill));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let relay = RelayProcess::start(&db.url(), Some(port), &[]).await;
    writing.await.unwrap();

    let mut resumed = Vec::new();
    for (user, got) in &received {
        let last = events(got)
            .iter()
            .filter_map(|e| e["id"].as_i64())
            .max()
            .unwrap_or(since);
        let mut socket = WsClient::connect_to(&relay.ws_url(), &token(user)).await;
        socket.subscribe(json!({"since": last})).await;
        resumed.push((*user, socket));
    }
    let mut refs: Vec<(&str, &mut WsClient)> = resumed.iter_mut().map(|(u, s)| (*u, s)).collect();
    let after = read_through_sentinels(&trading, &mut refs).await;
    for ((user, before), after) in received.iter().zip(after) {
        let mut all = before.clone();
        all.extend(after);
        assert_resumed_exactly_visible(&trading, user, &all, since).await;
    }
}

#[tokio::test]
async fn two_relays_on_one_database_each_deliver_correctly_and_a_client_resumes_on_the_other() {
    let db = TestDb::example().await;
    let trading = Trading::new(db.client().await);
    let world = seed(&trading).await;
    let first = TestRelay::start(&db.url()).await;
    let second = TestRelay::start(&db.url()).await;
    let since = trading.last_event_id().await;
    let mut on_first = Vec::new();
    let mut on_second = Vec::new();
    for user in ["alice", "bob", "carol"] {
        let mut a = WsClient::connect(&first, &token(user)).await;
        let mut b = WsClient::connect(&second, &token(user)).await;
        a.subscribe_all().await;
        b.subscribe_all().await;
        on_first.push((user, a));
        on_second.push((user, b));
    }
    for round in 0..20 {
        for credential in [
            &world.alice_own,
            &world.bob_own,
            &world.carol_own,
            &world.shared,
        ] {
            trading.order(credential, &format!("R{round}")).await;
        }
    }
    // alice leaves the first relay midway and resumes on the second.
    let (_, mut alice_first) = on_first.remove(0);
    let midway = alice_first
        .events_until(|v| v["order"]["symbol"] == "R9")
        .await;
    drop(alice_first);
    let last_seen = events(&midway)
        .iter()
        .filter_map(|e| e["id"].as_i64())
        .max()
        .unwrap();
    let mut alice_resumed = WsClient::connect(&second, &token("alice")).await;
    alice_resumed.subscribe(json!({"since": last_seen})).await;

    let mut refs: Vec<(&str, &mut WsClient)> = on_first.iter_mut().map(|(u, s)| (*u, s)).collect();
    refs.extend(on_second.iter_mut().map(|(u, s)| (*u, s)));
    refs.push(("alice", &mut alice_resumed));
    let received = read_through_sentinels(&trading, &mut refs).await;
    let users: Vec<&str> = refs.iter().map(|(u, _)| *u).collect();
    for (user, got) in users.iter().zip(&received).take(users.len() - 1) {
        assert_exactly_visible(&trading, user, got, since).await;
    }
    let mut alice_all = midway;
    alice_all.extend(received.last().unwrap().clone());
    assert_resumed_exactly_visible(&trading, "alice", &alice_all, since).await;
}
