//! A Postgres restart during writes, on a cluster of the test's own (SPEC §4).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::isolation::{assert_exactly_visible, read_through_sentinels, seed};
use common::tokens::token;
use common::trading::Trading;
use common::{writers, TestRelay, WsClient};
use rls_relay::db::cluster::{ClusterOptions, LocalCluster};

#[tokio::test]
async fn a_postgres_restart_during_writes_loses_nothing_and_readiness_follows() {
    rls_relay::telemetry::init(&rls_relay::config::LogConfig {
        log_format: rls_relay::config::LogFormat::Human,
        log_filter: std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into()),
    });
    let cluster = Arc::new(
        tokio::task::spawn_blocking(|| LocalCluster::start(&ClusterOptions::default()))
            .await
            .unwrap()
            .expect("own cluster"),
    );
    let admin = common::db::connect(&cluster.url("postgres")).await;
    admin.batch_execute("create database app").await.unwrap();
    let url = cluster.url("app");
    {
        let mut client = common::db::connect(&url).await;
        rls_relay::db::migrate::run(&mut client).await.unwrap();
        client
            .batch_execute(rls_relay::db::migrate::EXAMPLE_SCHEMA)
            .await
            .unwrap();
    }
    let trading = Trading::new(common::db::connect(&url).await);
    let world = seed(&trading).await;
    let relay = TestRelay::start(&url).await;
    let mut sockets = Vec::new();
    for user in ["alice", "bob", "carol"] {
        let mut socket = WsClient::connect(&relay, &token(user)).await;
        socket.subscribe_all().await;
        sockets.push((user, socket));
    }
    let since = trading.last_event_id().await;

    // Watch /readyz throughout.
    let readiness = Arc::new(Mutex::new(Vec::<bool>::new()));
    let watcher = {
        let readiness = readiness.clone();
        let port = relay.port;
        tokio::spawn(async move {
            loop {
                let ready = common::http::get(port, "/readyz").await.0 == 200;
                {
                    let mut seen = readiness.lock().unwrap();
                    if seen.last() != Some(&ready) {
                        seen.push(ready);
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let credentials = vec![
        world.alice_own.clone(),
        world.bob_own.clone(),
        world.carol_own.clone(),
        world.shared.clone(),
    ];
    let writing = writers::spawn(url.clone(), credentials, 4, 150, Duration::from_millis(3));
    tokio::time::sleep(Duration::from_millis(250)).await;
    let restarting = cluster.clone();
    tokio::task::spawn_blocking(move || restarting.restart())
        .await
        .unwrap()
        .expect("pg_ctl restart");
    eprintln!("restarted");
    assert!(writing.await.unwrap() >= 600);
    eprintln!("writers done");
    relay.wait_ready().await;
    eprintln!("ready");
    tokio::time::sleep(Duration::from_millis(100)).await;
    watcher.abort();
    assert_eq!(
        *readiness.lock().unwrap(),
        vec![true, false, true],
        "/readyz went false, then true"
    );

    let trading = Trading::new(common::db::connect(&url).await);
    let mut refs: Vec<(&str, &mut WsClient)> = sockets.iter_mut().map(|(u, s)| (*u, s)).collect();
    let received = read_through_sentinels(&trading, &mut refs).await;
    for ((user, _), got) in sockets.iter().zip(&received) {
        assert_exactly_visible(&trading, user, got, since).await;
    }
    relay.stop().await;
}
