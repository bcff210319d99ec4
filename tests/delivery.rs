//! Live delivery end to end (SPEC §3, §5): a write in SQL, an event on a socket, and
//! only on the sockets whose users can SELECT its credential through RLS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::client::events;
use common::isolation::{assert_exactly_visible, read_through_sentinels, seed};
use common::trading::{visible, Trading};
use common::{TestDb, TestRelay, WsClient};
use serde_json::{json, Value};

#[tokio::test]
async fn each_user_receives_exactly_the_events_of_the_credentials_it_can_select() {
    let db = TestDb::example().await;
    let trading = Trading::new(db.client().await);
    let world = seed(&trading).await;
    let relay = TestRelay::start(&db.url()).await;

    let mut alice = WsClient::connect(&relay, &common::tokens::token("alice")).await;
    let mut alice_phone = WsClient::connect_bearer(&relay, &common::tokens::token("alice"))
        .await
        .unwrap();
    let mut bob = WsClient::connect(&relay, &common::tokens::token("bob")).await;
    let mut carol = WsClient::connect(&relay, &common::tokens::token("carol")).await;
    for socket in [&mut alice, &mut alice_phone, &mut bob, &mut carol] {
        socket.subscribe_all().await;
    }
    let since = trading.last_event_id().await;
    for round in 0..5 {
        for credential in [
            &world.alice_own,
            &world.bob_own,
            &world.carol_own,
            &world.shared,
        ] {
            trading.fill(credential, &format!("SYM{round}"), 10).await;
            trading.order(credential, "AAPL").await;
        }
    }
    let received = read_through_sentinels(
        &trading,
        &mut [
            ("alice", &mut alice),
            ("alice", &mut alice_phone),
            ("bob", &mut bob),
            ("carol", &mut carol),
        ],
    )
    .await;
    for (user, got) in ["alice", "alice", "bob", "carol"].iter().zip(&received) {
        assert_exactly_visible(&trading, user, got, since).await;
    }
    // The shapes the front end handles.
    let position = received[0]
        .iter()
        .find(|v| v["type"] == "position_update")
        .unwrap();
    assert!(
        position["position"]["symbol"].is_string()
            && position["table"] == "positions"
            && position["schema"] == "public"
    );
    let balance = received[2]
        .iter()
        .find(|v| v["type"] == "balance_update" && v["op"] == "UPDATE")
        .unwrap();
    assert!(balance["balance"]["cash"].is_number() && balance["old"]["cash"].is_number());
    assert!(balance["timestamp"].as_str().unwrap().ends_with('Z'));
    // bob shares nothing with anyone: not one of his ids reached alice or carol.
    for got in [&received[0], &received[1], &received[3]] {
        assert!(events(got)
            .iter()
            .all(|e| e["credential_id"] != world.bob_own.as_str()));
    }
}

#[tokio::test]
async fn routing_events_costs_no_visibility_query_in_steady_state() {
    let db = TestDb::example().await;
    let trading = Trading::new(db.client().await);
    let world = seed(&trading).await;
    let relay = TestRelay::start(&db.url()).await;
    let mut sockets = Vec::new();
    for user in ["alice", "alice", "bob", "carol", "carol"] {
        let mut socket = WsClient::connect(&relay, &common::tokens::token(user)).await;
        socket.subscribe_all().await;
        sockets.push((user, socket));
    }
    let after_subscribing = relay.visibility_queries();
    assert_eq!(
        after_subscribing, 3,
        "one query per distinct claims set, then the cache"
    );
    for round in 0..50 {
        for credential in [&world.alice_own, &world.bob_own, &world.shared] {
            trading.order(credential, &format!("S{round}")).await;
        }
    }
    let mut refs: Vec<(&str, &mut WsClient)> = sockets.iter_mut().map(|(u, s)| (*u, s)).collect();
    let received = read_through_sentinels(&trading, &mut refs).await;
    let delivered: usize = received.iter().map(|r| events(r).len()).sum();
    assert!(delivered > 300, "{delivered}");
    assert_eq!(
        relay.visibility_queries(),
        after_subscribing,
        "no query per event"
    );
    let (_, metrics) = common::http::get(relay.port, "/metrics").await;
    assert_eq!(
        common::http::metric(&metrics, "relay_visibility_cache_hits_total"),
        Some(2.0)
    );
}

#[tokio::test]
async fn revocation_and_grant_take_effect_at_their_place_in_the_commit_stream() {
    let db = TestDb::example().await;
    let trading = Trading::new(db.client().await);
    let world = seed(&trading).await;
    let relay = TestRelay::start(&db.url()).await;
    let mut alice = WsClient::connect(&relay, &common::tokens::token("alice")).await;
    let mut bob = WsClient::connect(&relay, &common::tokens::token("bob")).await;
    let mut carol = WsClient::connect(&relay, &common::tokens::token("carol")).await;
    for socket in [&mut alice, &mut bob, &mut carol] {
        socket.subscribe_all().await;
    }
    // No pause anywhere: each step is its own transaction, and all of them are sent in
    // one round trip, so they commit microseconds apart and the relay usually reads them
    // in one batch, several visibility changes of one credential included.
    let shared = &world.shared;
    let order = |symbol: &str| {
        format!("begin; insert into orders (credential_id, symbol, side, qty) values ('{shared}', '{symbol}', 'buy', 1); commit;")
    };
    let script = [
        order("BEFORE"),
        format!("begin; delete from credential_members where credential_id = '{shared}' and user_id = 'carol'; commit;"),
        order("AFTER-REVOKE"),
        format!("begin; insert into credential_members (credential_id, user_id) values ('{shared}', 'bob'); commit;"),
        order("AFTER-GRANT"),
        // alice loses it; carol gets it back, as its owner.
        format!("begin; update credentials set owner_id = 'carol' where id = '{shared}'; commit;"),
        order("AFTER-TRANSFER"),
    ]
    .concat();
    trading.client.batch_execute(&script).await.unwrap();
    let id_of = |symbol: &'static str| {
        let client = &trading.client;
        async move {
            client
                .query_one(
                    "select id from relay.outbox where kind = 'event' and new_row ->> 'symbol' = $1",
                    &[&symbol],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    let (before, after_revoke, after_grant, after_transfer) = (
        id_of("BEFORE").await,
        id_of("AFTER-REVOKE").await,
        id_of("AFTER-GRANT").await,
        id_of("AFTER-TRANSFER").await,
    );

    let received = read_through_sentinels(
        &trading,
        &mut [
            ("alice", &mut alice),
            ("bob", &mut bob),
            ("carol", &mut carol),
        ],
    )
    .await;
    let shared_ids = |got: &Vec<Value>| -> Vec<i64> {
        events(got)
            .iter()
            .filter(|e| {
                e["credential_id"] == world.shared.as_str() && e["order"]["symbol"] != "SENTINEL"
            })
            .map(|e| e["id"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(
        shared_ids(&received[0]),
        vec![before, after_revoke, after_grant],
        "alice, until the transfer"
    );
    assert_eq!(
        shared_ids(&received[1]),
        vec![after_grant, after_transfer],
        "bob, from the grant"
    );
    assert_eq!(
        shared_ids(&received[2]),
        vec![before, after_transfer],
        "carol, except while revoked"
    );
}

#[tokio::test]
async fn a_moved_row_is_a_removal_for_old_viewers_and_an_arrival_for_new_ones() {
    let db = TestDb::example().await;
    let trading = Trading::new(db.client().await);
    let world = seed(&trading).await;
    let relay = TestRelay::start(&db.url()).await;
    let mut alice = WsClient::connect(&relay, &common::tokens::token("alice")).await;
    let mut bob = WsClient::connect(&relay, &common::tokens::token("bob")).await;
    alice.subscribe_all().await;
    bob.subscribe_all().await;
    trading.fill(&world.alice_own, "MOVE", 7).await;
    trading
        .client
        .execute(
            "update positions set credential_id = $1::text::uuid where symbol = 'MOVE'",
            &[&world.bob_own],
        )
        .await
        .unwrap();
    trading
        .client
        .execute("delete from positions where symbol = 'MOVE'", &[])
        .await
        .unwrap();
    let received =
        read_through_sentinels(&trading, &mut [("alice", &mut alice), ("bob", &mut bob)]).await;
    let moves = |got: &Vec<Value>| -> Vec<(String, String, i64)> {
        events(got)
            .iter()
            .filter(|e| e["type"] == "position_update")
            .map(|e| {
                (
                    e["op"].as_str().unwrap().to_owned(),
                    e["credential_id"].as_str().unwrap().to_owned(),
                    e["position"]["qty"].as_i64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(
        moves(&received[0]),
        vec![
            ("INSERT".into(), world.alice_own.clone(), 7),
            ("DELETE".into(), world.alice_own.clone(), 7)
        ]
    );
    assert_eq!(
        moves(&received[1]),
        vec![
            ("INSERT".into(), world.bob_own.clone(), 7),
            ("DELETE".into(), world.bob_own.clone(), 7)
        ]
    );
    assert!(events(&received[0])
        .iter()
        .all(|e| e.get("old").is_none() || e["op"] == "UPDATE"));
}

#[tokio::test]
async fn a_large_row_is_delivered_whole() {
    let db = TestDb::example().await;
    let trading = Trading::new(db.client().await);
    let world = seed(&trading).await;
    let relay = TestRelay::start(&db.url()).await;
    let mut alice = WsClient::connect(&relay, &common::tokens::token("alice")).await;
    let mut bob = WsClient::connect(&relay, &common::tokens::token("bob")).await;
    alice.subscribe_all().await;
    bob.subscribe_all().await;
    let big: String = (0..700)
        .map(|_| uuid::Uuid::new_v4().simple().to_string())
        .collect();
    trading.order(&world.alice_own, &big).await;
    let received =
        read_through_sentinels(&trading, &mut [("alice", &mut alice), ("bob", &mut bob)]).await;
    let order = events(&received[0])
        .into_iter()
        .find(|e| e["order"]["symbol"].as_str().map(str::len) == Some(big.len()));
    assert_eq!(order.unwrap()["order"]["symbol"].as_str().unwrap(), big);
    assert!(events(&received[1])
        .iter()
        .all(|e| e["credential_id"] == world.bob_own.as_str()));
}

#[tokio::test]
async fn subscriptions_filter_by_table_and_credential_and_refuse_what_is_not_visible() {
    let db = TestDb::example().await;
    let trading = Trading::new(db.client().await);
    let world = seed(&trading).await;
    let relay = TestRelay::start(&db.url()).await;
    let mut alice = WsClient::connect(&relay, &common::tokens::token("alice")).await;

    // Naming a credential alice cannot see is refused whole, whether or not it exists.
    for credential in [
        world.bob_own.clone(),
        "00000000-0000-0000-0000-000000000000".into(),
    ] {
        let reply = alice
            .request(json!({"type": "subscribe", "ref": "x", "credential_ids": [world.alice_own, credential]}))
            .await;
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["code"], "forbidden");
        assert_eq!(reply["ref"], "x");
    }
    alice
        .subscribe(
            json!({"ref": "orders-shared", "tables": ["orders"], "credential_ids": [world.shared]}),
        )
        .await;
    alice
        .subscribe(json!({"ref": "all-positions", "tables": ["public.positions"]}))
        .await;
    trading.fill(&world.alice_own, "P1", 1).await; // position (yes) + balance (no)
    trading.order(&world.alice_own, "O1").await; // order on alice_own (no)
    trading.order(&world.shared, "O2").await; // order on shared (yes)
    trading.fill(&world.shared, "P2", 1).await; // position on shared (yes, once), balance (no)
    let last_position = trading.last_event_id().await - 1; // the balance came last
    let got = alice.events_until(|v| v["id"] == last_position).await;
    let seen: Vec<(String, String)> = events(&got)
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_owned(),
                e["credential_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("position_update".into(), world.alice_own.clone()),
            ("order_update".into(), world.shared.clone()),
            ("position_update".into(), world.shared.clone()),
        ]
    );

    // Unsubscribing one ref leaves the other.
    let reply = alice
        .request(json!({"type": "unsubscribe", "ref": "all-positions"}))
        .await;
    assert_eq!(reply["type"], "unsubscribed");
    trading.fill(&world.alice_own, "P3", 1).await;
    let last = trading.order(&world.shared, "O3").await;
    let got = alice.events_until(|v| v["id"] == last).await;
    assert_eq!(events(&got).len(), 1, "only the shared order: {got:?}");
}

#[tokio::test]
async fn a_second_schema_works_with_configuration_alone() {
    let db = TestDb::relay_only().await;
    let client = db.client().await;
    client
        .batch_execute(include_str!("fixtures/desk.sql"))
        .await
        .unwrap();
    client
        .batch_execute(
            "insert into desk.teams values (1, 'rates'), (2, 'fx'), (3, 'solo');
             insert into desk.team_members values (1, 'ann@desk.example'), (2, 'ann@desk.example'), (2, 'ben@desk.example'), (3, 'cy@desk.example');
             insert into desk.accounts values (101, 1, 'rates'), (202, 2, 'fx'), (303, 3, 'cy');",
        )
        .await
        .unwrap();
    let mut config = common::relay::config(&db.url());
    config.visibility.db_role = "desk_api".into();
    config.visibility.claims_setting = "app.claims".into();
    config.visibility.visibility_sql = "select account_no from desk.accounts".into();
    config.jwt.user_claim = "email".into();
    let relay = TestRelay::start_with(config).await;
    let token = |email: &str| {
        common::tokens::sign(
            json!({"sub": format!("id-{email}"), "email": email, "exp": common::tokens::now() + 600}),
        )
    };
    let mut ann = WsClient::connect(&relay, &token("ann@desk.example")).await;
    let mut ben = WsClient::connect(&relay, &token("ben@desk.example")).await;
    let mut cy = WsClient::connect(&relay, &token("cy@desk.example")).await;
    assert_eq!(ann.welcome["user_id"], "ann@desk.example");
    for socket in [&mut ann, &mut ben, &mut cy] {
        socket.subscribe(json!({"tables": ["fills"]})).await;
    }
    let fill = |account: i64, symbol: &str| {
        format!("insert into desk.fills (account_no, symbol, qty, price) values ({account}, '{symbol}', 1, 1)")
    };
    for (account, symbol) in [(101, "A"), (202, "B"), (303, "C")] {
        client.batch_execute(&fill(account, symbol)).await.unwrap();
    }
    // ben joins the rates team: one membership row, a change for every rates account.
    client
        .batch_execute("insert into desk.team_members values (1, 'ben@desk.example')")
        .await
        .unwrap();
    client.batch_execute(&fill(101, "D")).await.unwrap();
    client.batch_execute(&fill(303, "LAST")).await.unwrap();
    client.batch_execute(&fill(202, "LAST")).await.unwrap();

    let symbols = |got: Vec<Value>| -> Vec<String> {
        events(&got)
            .iter()
            .map(|e| e["fill"]["symbol"].as_str().unwrap().to_owned())
            .collect()
    };
    let is_last = |v: &Value| v["fill"]["symbol"] == "LAST";
    assert_eq!(
        symbols(ann.events_until(is_last).await),
        vec!["A", "B", "D", "LAST"]
    );
    assert_eq!(
        symbols(ben.events_until(is_last).await),
        vec!["B", "D", "LAST"]
    );
    assert_eq!(symbols(cy.events_until(is_last).await), vec!["C", "LAST"]);
    // What each would get over REST, asked the same way.
    let ann_sees = visible(
        &client,
        "desk_api",
        "app.claims",
        &json!({"email": "ann@desk.example"}),
        "select account_no::text from desk.accounts",
    )
    .await;
    assert_eq!(
        ann_sees,
        ["101", "202"].iter().map(|s| s.to_string()).collect()
    );
}
