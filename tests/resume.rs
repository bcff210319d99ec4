//! Client resume and retention (SPEC §4): `subscribe` with `since` replays what was
//! missed, then continues live with no gap; past retention it is a `resume_gap`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::client::events;
use common::isolation::{read_through_sentinels, seed};
use common::tokens::token;
use common::trading::Trading;
use common::{writers, TestDb, TestRelay, WsClient};
use rls_relay::config::DatabaseConfig;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

fn ids(values: &[Value]) -> Vec<i64> {
    events(values)
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn a_resuming_client_gets_what_it_missed_then_live_events_with_no_gap() {
    let db = TestDb::example().await;
    let trading = Trading::new(db.client().await);
    let world = seed(&trading).await;
    let relay = TestRelay::start(&db.url()).await;
    let since = trading.last_event_id().await;

    let mut alice = WsClient::connect(&relay, &token("alice")).await;
    alice.subscribe_all().await;
    let mut last = 0;
    for i in 0..5 {
        last = trading.order(&world.alice_own, &format!("SEEN{i}")).await;
    }
    let seen = alice.events_until(|v| v["id"] == last).await;
    drop(alice);
    for i in 0..5 {
        trading.order(&world.alice_own, &format!("MISSED{i}")).await;
        trading.order(&world.bob_own, &format!("FOREIGN{i}")).await;
    }
    // Writers keep committing while the client resumes: the seam must hold.
    let credentials = vec![
        world.alice_own.clone(),
        world.shared.clone(),
        world.bob_own.clone(),
    ];
    let writing = writers::spawn(db.url(), credentials, 2, 100, Duration::from_millis(2));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut back = WsClient::connect(&relay, &token("alice")).await;
    back.subscribe(json!({"since": last})).await;
    writing.await.unwrap();
    let resumed = read_through_sentinels(&trading, &mut [("alice", &mut back)])
        .await
        .remove(0);

    let received: Vec<i64> = ids(&seen).into_iter().chain(ids(&resumed)).collect();
    let unique: BTreeSet<i64> = received.iter().copied().collect();
    // A replay looks back below the cursor for transactions that might have committed
    // after it (how far depends on what else runs on the server): those may come twice,
    // with their id; nothing after the cursor may.
    let resumed_ids = ids(&resumed);
    let after_cursor: Vec<i64> = resumed_ids
        .iter()
        .copied()
        .filter(|id| *id > last)
        .collect();
    let after_cursor_unique: BTreeSet<i64> = after_cursor.iter().copied().collect();
    assert_eq!(
        after_cursor.len(),
        after_cursor_unique.len(),
        "{received:?}"
    );
    assert!(
        resumed_ids
            .iter()
            .filter(|id| **id <= last)
            .all(|id| ids(&seen).contains(id)),
        "only events the client had are repeated: {received:?}"
    );

    let visible = trading.visible_to("alice").await;
    let expected: BTreeSet<i64> = trading
        .events_between(since, *unique.iter().max().unwrap())
        .await
        .into_iter()
        .filter(|(_, c)| visible.contains(c))
        .map(|(id, _)| id)
        .collect();
    assert_eq!(unique, expected);
    assert!(events(&resumed)
        .iter()
        .all(|e| e["credential_id"] != world.bob_own.as_str()));
}

#[tokio::test]
async fn a_replay_uses_the_visibility_of_the_time_of_the_replay() {
    let db = TestDb::example().await;
    let trading = Trading::new(db.client().await);
    let world = seed(&trading).await;
    let relay = TestRelay::start(&db.url()).await;
    let mut carol = WsClient::connect(&relay, &token("carol")).await;
    carol.subscribe_all().await;
    let last = trading.order(&world.shared, "SEEN").await;
    carol.events_until(|v| v["id"] == last).await;
    drop(carol);
    trading.order(&world.shared, "MISSED-ON-SHARED").await;
    let own = trading.order(&world.carol_own, "MISSED-ON-OWN").await;
    trading.unshare(&world.shared, "carol").await;

    let mut back = WsClient::connect(&relay, &token("carol")).await;
    back.subscribe(json!({"since": last})).await;
    let replayed = back.events_until(|v| v["id"] == own).await;
    assert_eq!(
        ids(&replayed),
        vec![own],
        "nothing of a credential carol no longer sees"
    );
}

#[tokio::test]
async fn a_resume_honours_the_subscription_filters() {
    let db = TestDb::example().await;
    let trading = Trading::new(db.client().await);
    let world = seed(&trading).await;
    let relay = TestRelay::start(&db.url()).await;
    let since = trading.last_event_id().await;
    trading.fill(&world.alice_own, "P", 1).await; // position + balance on alice_own
    let wanted = trading.order(&world.shared, "O").await;
    trading.order(&world.alice_own, "O").await;
    let mut alice = WsClient::connect(&relay, &token("alice")).await;
    alice
        .subscribe(json!({"since": since, "tables": ["orders"], "credential_ids": [world.shared]}))
        .await;
    let last = trading.order(&world.shared, "LIVE").await;
    let got = alice.events_until(|v| v["id"] == last).await;
    assert_eq!(ids(&got), vec![wanted, last]);
}

#[tokio::test]
async fn a_cursor_past_retention_or_unknown_here_is_a_resume_gap() {
    let db = TestDb::example().await;
    let trading = Trading::new(db.client().await);
    let world = seed(&trading).await;
    let old = trading.order(&world.alice_own, "OLD").await;
    trading.order(&world.alice_own, "OLDER-STILL").await;
    let pool = rls_relay::db::pool(&DatabaseConfig::new(db.url()), 1).unwrap();
    let pruned =
        rls_relay::outbox::prune::prune_once(&pool, Duration::ZERO, &CancellationToken::new())
            .await
            .unwrap();
    assert!(pruned >= 2, "{pruned}");
    let relay = TestRelay::start(&db.url()).await;
    let mut alice = WsClient::connect(&relay, &token("alice")).await;
    for since in [old, 1_000_000_000] {
        let reply = alice
            .request(json!({"type": "subscribe", "ref": "r", "since": since}))
            .await;
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["code"], "resume_gap", "{reply}");
        assert_eq!(reply["ref"], "r");
    }
    // The client refetches over REST, then subscribes without `since`.
    alice.subscribe_all().await;
    let live = trading.order(&world.alice_own, "LIVE").await;
    assert_eq!(
        ids(&alice.events_until(|v| v["id"] == live).await),
        vec![live]
    );
}

#[tokio::test]
async fn pruning_removes_only_what_is_past_retention_and_one_instance_prunes_at_a_time() {
    let db = TestDb::example().await;
    let trading = Trading::new(db.client().await);
    let world = seed(&trading).await;
    for i in 0..20 {
        trading.order(&world.alice_own, &format!("O{i}")).await;
    }
    trading
        .client
        .batch_execute("update relay.outbox set written_at = now() - interval '2 hours' where id <= (select min(id) + 9 from relay.outbox)")
        .await
        .unwrap();
    let pool = rls_relay::db::pool(&DatabaseConfig::new(db.url()), 2).unwrap();
    let shutdown = CancellationToken::new();

    // Another instance holding the prune lock: this one leaves it alone.
    let other = db.client().await;
    other.batch_execute("begin").await.unwrap();
    other
        .execute(
            "select pg_advisory_xact_lock($1)",
            &[&rls_relay::outbox::prune::PRUNE_LOCK],
        )
        .await
        .unwrap();
    let skipped = rls_relay::outbox::prune::prune_once(&pool, Duration::from_secs(3600), &shutdown)
        .await
        .unwrap();
    assert_eq!(skipped, 0);
    other.batch_execute("commit").await.unwrap();

    let before: i64 = trading
        .client
        .query_one("select count(*) from relay.outbox", &[])
        .await
        .unwrap()
        .get(0);
    let pruned = rls_relay::outbox::prune::prune_once(&pool, Duration::from_secs(3600), &shutdown)
        .await
        .unwrap();
    assert_eq!(pruned, 10);
    let after: i64 = trading
        .client
        .query_one("select count(*) from relay.outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(after, before - 10);
    let watermark: i64 = trading
        .client
        .query_one("select pruned_through from relay.retention", &[])
        .await
        .unwrap()
        .get(0);
    let oldest_left: i64 = trading
        .client
        .query_one("select min(id) from relay.outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert!(watermark < oldest_left);
}
