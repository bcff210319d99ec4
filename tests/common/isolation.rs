//! The isolation check every delivery test ends with: what each socket received equals
//! what its user can SELECT through RLS, once each, and nothing foreign.

use std::collections::{BTreeSet, HashMap};

use serde_json::Value;

use super::client::events;
use super::trading::Trading;
use super::WsClient;

/// Writes one sentinel order on every credential, then reads each socket up to the last
/// sentinel it may see. Since the router relays in commit order and each socket's queue
/// is FIFO, everything committed before the sentinels has reached the socket by then.
/// Returns the events each socket received (sentinels included).
pub async fn read_through_sentinels(
    trading: &Trading,
    sockets: &mut [(&str, &mut WsClient)],
) -> Vec<Vec<Value>> {
    let credentials: Vec<String> = trading
        .client
        .query("select id::text from credentials order by id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut sentinel_of = HashMap::new();
    for credential in &credentials {
        let id = trading.order(credential, "SENTINEL").await;
        sentinel_of.insert(credential.clone(), id);
    }
    let mut received = Vec::new();
    for (user, socket) in sockets.iter_mut() {
        let visible = trading.visible_to(user).await;
        let last = visible
            .iter()
            .filter_map(|c| sentinel_of.get(c))
            .max()
            .copied();
        let Some(last) = last else {
            received.push(Vec::new());
            continue;
        };
        let got = socket.events_until(|v| v["id"] == last).await;
        received.push(got);
    }
    received
}

/// Every event a user received is on a credential it can see, and it received every
/// outbox event after `since` on those credentials, each exactly once.
pub async fn assert_exactly_visible(trading: &Trading, user: &str, received: &[Value], since: i64) {
    check_visible(trading, user, received, since, false).await;
}

/// The same for what a client received over several connections: an event may come
/// twice around a resume (with its id), none may be missing or foreign.
pub async fn assert_resumed_exactly_visible(
    trading: &Trading,
    user: &str,
    received: &[Value],
    since: i64,
) {
    check_visible(trading, user, received, since, true).await;
}

async fn check_visible(
    trading: &Trading,
    user: &str,
    received: &[Value],
    since: i64,
    duplicates_allowed: bool,
) {
    let visible = trading.visible_to(user).await;
    let mut ids = Vec::new();
    for event in events(received) {
        let credential = event["credential_id"].as_str().unwrap();
        assert!(
            visible.contains(credential),
            "{user} received a foreign event: {event}"
        );
        ids.push(event["id"].as_i64().unwrap());
    }
    let unique: BTreeSet<i64> = ids.iter().copied().collect();
    if !duplicates_allowed {
        assert_eq!(
            unique.len(),
            ids.len(),
            "{user} received duplicates: {ids:?}"
        );
    }
    let up_to = unique.iter().max().copied().unwrap_or(since);
    let expected: BTreeSet<i64> = trading
        .events_between(since, up_to)
        .await
        .into_iter()
        .filter(|(_, c)| visible.contains(c))
        .map(|(id, _)| id)
        .collect();
    let missing: Vec<_> = expected.difference(&unique).collect();
    assert!(
        missing.is_empty(),
        "{user} missed {} events: {missing:?}",
        missing.len()
    );
    assert_eq!(
        unique, expected,
        "{user} received events outside the expected range"
    );
}

pub struct World {
    pub alice_own: String,
    pub bob_own: String,
    pub carol_own: String,
    pub shared: String,
}

/// alice owns A and S (shared with carol); bob owns B; carol owns C.
pub async fn seed(trading: &Trading) -> World {
    for user in ["alice", "bob", "carol"] {
        trading.user(user).await;
    }
    let world = World {
        alice_own: trading.credential("alice", "alice main").await,
        bob_own: trading.credential("bob", "bob main").await,
        carol_own: trading.credential("carol", "carol main").await,
        shared: trading.credential("alice", "shared with carol").await,
    };
    trading.share(&world.shared, "carol").await;
    world
}
