//! The database contract (SPEC §2): what the relay's SQL writes for each change, what a
//! NOTIFY carries, and that it works for a schema unlike the example.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::future::poll_fn;
use std::time::Duration;

use common::TestDb;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};

const ALICE_CRED: &str = "11111111-1111-1111-1111-111111111111";
const BOB_CRED: &str = "22222222-2222-2222-2222-222222222222";

async fn seed(client: &Client) {
    client
        .batch_execute(&format!(
            "insert into users values ('alice', 'Alice'), ('bob', 'Bob');
             insert into credentials (id, owner_id, label) values ('{ALICE_CRED}', 'alice', 'A'), ('{BOB_CRED}', 'bob', 'B');"
        ))
        .await
        .expect("seed");
}

/// A LISTEN connection that forwards notification payloads.
async fn listen(db: &TestDb, channel: &str) -> (Client, mpsc::UnboundedReceiver<String>) {
    let (client, mut connection) = tokio_postgres::connect(&db.url(), NoTls)
        .await
        .expect("connect");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = poll_fn(|cx| connection.poll_message(cx)).await {
            if let AsyncMessage::Notification(n) = message {
                let _ = tx.send(n.payload().to_owned());
            }
        }
    });
    client
        .batch_execute(&format!("listen {channel}"))
        .await
        .expect("listen");
    (client, rx)
}

/// What the outbox holds, oldest first: (kind, op, credential, has new row, has old row).
async fn outbox(client: &Client) -> Vec<(String, Option<String>, Option<String>, bool, bool)> {
    client
        .query(
            "select kind, op, credential_id, new_row is not null, old_row is not null from relay.outbox order by id",
            &[],
        )
        .await
        .expect("outbox")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

fn event(
    op: &str,
    credential: &str,
    new_row: bool,
    old_row: bool,
) -> (String, Option<String>, Option<String>, bool, bool) {
    (
        "event".into(),
        Some(op.into()),
        Some(credential.into()),
        new_row,
        old_row,
    )
}

#[tokio::test]
async fn each_tracked_write_produces_its_outbox_rows_and_a_notify_without_row_data() {
    let db = TestDb::example().await;
    let client = db.client().await;
    seed(&client).await;
    client
        .batch_execute("delete from relay.outbox")
        .await
        .expect("clear");
    // Stand in for an idle relay so that writers NOTIFY.
    client
        .batch_execute(
            "insert into relay.listeners values (gen_random_uuid(), 'rls_relay', true, now())",
        )
        .await
        .expect("listener row");
    let (_listener, mut notifications) = listen(&db, "rls_relay").await;

    // Four transactions.
    for statement in [
        format!("insert into positions (credential_id, symbol, qty, avg_price) values ('{ALICE_CRED}', 'SECRETSYM', 10, 101.5)"),
        "update positions set qty = 11".to_owned(),
        format!("update positions set credential_id = '{BOB_CRED}'"),
        "delete from positions".to_owned(),
    ] {
        client.batch_execute(&statement).await.expect("write");
    }

    assert_eq!(
        outbox(&client).await,
        vec![
            event("INSERT", ALICE_CRED, true, false),
            event("UPDATE", ALICE_CRED, true, true),
            // A move: a removal for the old credential's viewers, an arrival for the new one's.
            event("DELETE", ALICE_CRED, false, true),
            event("INSERT", BOB_CRED, true, false),
            event("DELETE", BOB_CRED, false, true),
        ]
    );
    let row: serde_json::Value = client
        .query_one(
            "select new_row from relay.outbox where op = 'INSERT' order by id limit 1",
            &[],
        )
        .await
        .expect("row")
        .get(0);
    assert_eq!(row["symbol"], "SECRETSYM");
    assert_eq!(row["qty"], 10);

    // One notification per transaction, each carrying nothing about the rows.
    let mut payloads = Vec::new();
    while let Ok(Some(payload)) =
        tokio::time::timeout(Duration::from_secs(2), notifications.recv()).await
    {
        payloads.push(payload);
        if payloads.len() == 4 {
            break;
        }
    }
    assert_eq!(payloads.len(), 4, "{payloads:?}");
    for payload in &payloads {
        assert!(
            !payload.contains("SECRETSYM") && !payload.contains(ALICE_CRED),
            "{payload}"
        );
    }
}

#[tokio::test]
async fn events_record_the_writing_transaction_and_table() {
    let db = TestDb::example().await;
    let client = db.client().await;
    seed(&client).await;
    let xid: String = client
        .query_one(
            &format!(
                "with w as (insert into orders (credential_id, symbol, side, qty) values ('{ALICE_CRED}', 'AAPL', 'buy', 5) returning 1)
                 select pg_current_xact_id()::text from w"
            ),
            &[],
        )
        .await
        .expect("insert")
        .get(0);
    let row = client
        .query_one(
            "select xid::text, table_schema, table_name, event_type, row_key from relay.outbox where kind = 'event'",
            &[],
        )
        .await
        .expect("event");
    assert_eq!(row.get::<_, String>(0), xid);
    assert_eq!(row.get::<_, String>(1), "public");
    assert_eq!(row.get::<_, String>(2), "orders");
    assert_eq!(row.get::<_, String>(3), "order_update");
    assert_eq!(row.get::<_, String>(4), "order");
}

#[tokio::test]
async fn a_large_row_commits_and_becomes_an_event_without_touching_the_notify_limit() {
    let db = TestDb::example().await;
    let client = db.client().await;
    seed(&client).await;
    client
        .batch_execute(
            "insert into relay.listeners values (gen_random_uuid(), 'rls_relay', true, now())",
        )
        .await
        .expect("listener row");
    for size in [20_000, 1_000_000] {
        // Incompressible, so that the row really is that large.
        let symbol: String = (0..size / 32)
            .map(|_| uuid::Uuid::new_v4().simple().to_string())
            .collect();
        client
            .execute(
                "insert into orders (credential_id, symbol, side, qty) values ($1::text::uuid, $2, 'buy', 1)",
                &[&ALICE_CRED, &symbol],
            )
            .await
            .unwrap_or_else(|e| panic!("a {size}-byte row must commit: {e}"));
        let stored: i32 = client
            .query_one(
                "select length(new_row ->> 'symbol') from relay.outbox where kind = 'event' order by id desc limit 1",
                &[],
            )
            .await
            .expect("event")
            .get(0);
        assert_eq!(stored as usize, size);
    }
}

#[tokio::test]
async fn an_update_that_changes_nothing_is_not_an_event() {
    let db = TestDb::example().await;
    let client = db.client().await;
    seed(&client).await;
    client
        .batch_execute(&format!(
            "insert into balances (credential_id, cash) values ('{ALICE_CRED}', 100);
             delete from relay.outbox;
             update balances set cash = 100;"
        ))
        .await
        .expect("writes");
    assert!(outbox(&client).await.is_empty());
}

/// Commits one tracked write, then a sentinel NOTIFY; true when the write's transaction
/// woke the channel (its notification arrives before the later-committed sentinel).
async fn write_wakes(
    client: &Client,
    notifications: &mut mpsc::UnboundedReceiver<String>,
    cash: i32,
) -> bool {
    client
        .batch_execute(&format!("update balances set cash = {cash}"))
        .await
        .expect("tracked write");
    client
        .batch_execute("notify rls_relay, 'sentinel'")
        .await
        .expect("sentinel");
    let mut woke = false;
    loop {
        let payload = tokio::time::timeout(Duration::from_secs(10), notifications.recv())
            .await
            .expect("the sentinel arrives")
            .expect("listener alive");
        match payload.as_str() {
            "sentinel" => return woke,
            "wake" => woke = true,
            other => panic!("unexpected payload {other}"),
        }
    }
}

#[tokio::test]
async fn writers_notify_exactly_while_some_relay_is_idle() {
    let db = TestDb::example().await;
    let client = db.client().await;
    seed(&client).await;
    client
        .batch_execute(&format!(
            "insert into balances (credential_id, cash) values ('{ALICE_CRED}', 0)"
        ))
        .await
        .expect("balance");
    let (_listener, mut notifications) = listen(&db, "rls_relay").await;
    let set = |instance: &str, idle: bool| {
        format!(
            "insert into relay.listeners values ('{instance}', 'rls_relay', {idle}, now())
             on conflict (instance_id) do update set idle = excluded.idle, seen_at = now()"
        )
    };
    let (a, b) = (
        "aaaaaaaa-0000-0000-0000-000000000000",
        "bbbbbbbb-0000-0000-0000-000000000000",
    );
    // (change to relay.listeners, then: does a write wake the channel?, why)
    let steps = [
        (String::new(), false, "no relay registered"),
        (set(a, true), true, "relay a is idle"),
        (set(a, false), false, "the only relay is busy"),
        (set(b, true), true, "relay b is idle, a busy"),
        (
            format!("update relay.listeners set seen_at = now() - interval '2 minutes' where instance_id = '{b}'"),
            false,
            "an idle relay not seen for a minute is gone",
        ),
        (set(b, true), true, "relay b is back"),
        (
            format!("delete from relay.listeners where instance_id = '{b}'"),
            false,
            "relay b unregistered",
        ),
    ];
    for (cash, (change, wakes, why)) in (1..).zip(steps) {
        client.batch_execute(&change).await.expect(why);
        assert_eq!(
            write_wakes(&client, &mut notifications, cash).await,
            wakes,
            "{why}"
        );
    }
}

#[tokio::test]
async fn writers_need_no_privilege_on_the_relay_schema() {
    let db = TestDb::example().await;
    let client = db.client().await;
    seed(&client).await;
    // The REST role, with a user's claims, writing under its own policies.
    client
        .batch_execute(&format!(
            "begin;
             set local role app_user;
             select set_config('request.jwt.claims', '{{\"sub\":\"alice\"}}', true);
             insert into orders (credential_id, symbol, side, qty) values ('{ALICE_CRED}', 'MSFT', 'sell', 1);
             commit;"
        ))
        .await
        .expect("app_user can write through the trigger");
    let denied = client
        .batch_execute("begin; set local role app_user; select count(*) from relay.outbox; commit;")
        .await;
    assert!(
        denied.is_err(),
        "the outbox must not be readable by the REST role"
    );
    client.batch_execute("rollback").await.ok();
    let events: i64 = client
        .query_one(
            "select count(*) from relay.outbox where kind = 'event'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(events, 1);
}

#[tokio::test]
async fn visibility_changes_announce_their_credential_and_commit_snapshot() {
    let db = TestDb::example().await;
    let client = db.client().await;
    seed(&client).await;
    client
        .batch_execute("delete from relay.outbox")
        .await
        .expect("clear");
    for statement in [
        format!("insert into credential_members (credential_id, user_id) values ('{ALICE_CRED}', 'bob')"),
        format!("update credentials set label = 'renamed' where id = '{BOB_CRED}'"),
        format!("update credentials set owner_id = 'alice' where id = '{BOB_CRED}'"),
        // A membership change and a TRUNCATE in one transaction: the relay's triggers
        // must not make the TRUNCATE fail.
        format!("begin; insert into credential_members (credential_id, user_id) values ('{BOB_CRED}', 'bob'); truncate credential_members; commit"),
    ] {
        client.batch_execute(&statement).await.expect("write");
    }
    let seen: Vec<String> = client
        .query(
            "select concat_ws(' ', table_name, coalesce(credential_id, '*'), coalesce(user_id, '*'), (snapshot is not null)::text)
             from relay.outbox where kind = 'visibility' order by id",
            &[],
        )
        .await
        .expect("announcements")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        seen,
        vec![
            format!("credential_members {ALICE_CRED} bob true"),
            // The label change does not touch the columns the policies read: nothing. The
            // owner change concerns the old owner and the new one.
            format!("credentials {BOB_CRED} bob true"),
            format!("credentials {BOB_CRED} alice true"),
            format!("credential_members {BOB_CRED} bob true"),
            // TRUNCATE fires no row trigger: it announces a change to everything.
            "credential_members * * true".to_owned(),
        ]
    );
}

#[tokio::test]
async fn track_functions_refuse_bad_arguments_with_a_clear_error() {
    let db = TestDb::example().await;
    let client = db.client().await;
    client
        .batch_execute("create view open_positions as select * from positions")
        .await
        .expect("view");
    let cases = [
        (
            "select relay.track_events('positions', 'no_such_column', 'x', 'y')",
            "has no column",
        ),
        (
            "select relay.track_events('positions', 'credential_id', 'bad type!', 'y')",
            "invalid event_type",
        ),
        (
            "select relay.track_events('positions', 'credential_id', 'x', 'old')",
            "field of every event",
        ),
        (
            "select relay.track_events('open_positions', 'credential_id', 'x', 'y')",
            "is not a table",
        ),
        (
            "select relay.track_visibility('credentials', 'nope')",
            "has no column",
        ),
    ];
    for (sql, expected) in cases {
        let error = client.batch_execute(sql).await.expect_err(sql);
        let message = error
            .as_db_error()
            .map(|e| e.message().to_owned())
            .unwrap_or_default();
        assert!(message.contains(expected), "{sql}: {message}");
    }
}

#[tokio::test]
async fn a_schema_unlike_the_example_is_tracked_with_the_same_functions() {
    let db = TestDb::relay_only().await;
    let client = db.client().await;
    client
        .batch_execute(include_str!("fixtures/desk.sql"))
        .await
        .expect("second schema");
    client
        .batch_execute(
            "insert into desk.teams values (1, 'rates'), (2, 'fx');
             insert into desk.accounts values (9001, 1, 'rates book'), (9002, 2, 'fx book');",
        )
        .await
        .expect("setup");
    client
        .batch_execute("delete from relay.outbox")
        .await
        .expect("clear");
    for statement in [
        "insert into desk.fills (account_no, symbol, qty, price) values (9001, 'UST10Y', 5, 99.5)",
        "update desk.accounts set team_id = 2 where account_no = 9001",
        "update desk.accounts set label = 'renamed' where account_no = 9002",
        "insert into desk.team_members values (1, 'ann@desk.example'), (2, 'ann@desk.example')",
    ] {
        client.batch_execute(statement).await.expect("write");
    }
    let seen: Vec<String> = client
        .query(
            "select concat_ws(' ', kind, table_schema || '.' || table_name, event_type, row_key, coalesce(credential_id, '*'), user_id)
             from relay.outbox order by id",
            &[],
        )
        .await
        .expect("outbox")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        seen,
        vec![
            "event desk.fills fill fill 9001",
            // Moving an account to another team changes who sees it; a label does not.
            "visibility desk.accounts 9001",
            // A membership maps to every account of its team, for the member it names.
            "visibility desk.team_members * ann@desk.example",
            "visibility desk.team_members * ann@desk.example",
        ]
    );
    let tracked: Vec<(String, String)> = client
        .query("select table_name, kind from relay.tracked order by 1", &[])
        .await
        .expect("tracked")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        tracked,
        vec![
            ("accounts".into(), "visibility".into()),
            ("fills".into(), "events".into()),
            ("risk_limits".into(), "events".into()),
            ("team_members".into(), "visibility".into()),
        ]
    );
}
