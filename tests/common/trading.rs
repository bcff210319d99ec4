//! The example trading schema from a test's point of view: seed users and credentials,
//! write as the trading engine would, and ask Postgres (as the REST role) what a user
//! may see, which is what every delivery is checked against.

use std::collections::BTreeSet;

use serde_json::{json, Value};
use tokio_postgres::Client;

pub struct Trading {
    pub client: Client,
}

impl Trading {
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    pub async fn user(&self, id: &str) {
        self.client
            .execute(
                "insert into users (id, display_name) values ($1, $1)",
                &[&id],
            )
            .await
            .expect("insert user");
    }

    /// A credential owned by `owner`; returns its id.
    pub async fn credential(&self, owner: &str, label: &str) -> String {
        let row = self
            .client
            .query_one(
                "insert into credentials (owner_id, label) values ($1, $2) returning id::text",
                &[&owner, &label],
            )
            .await
            .expect("insert credential");
        row.get(0)
    }

    pub async fn share(&self, credential: &str, user: &str) {
        self.client
            .execute(
                "insert into credential_members (credential_id, user_id) values ($1::text::uuid, $2)",
                &[&credential, &user],
            )
            .await
            .expect("share");
    }

    pub async fn unshare(&self, credential: &str, user: &str) {
        self.client
            .execute(
                "delete from credential_members where credential_id = $1::text::uuid and user_id = $2",
                &[&credential, &user],
            )
            .await
            .expect("unshare");
    }

    pub async fn transfer(&self, credential: &str, new_owner: &str) {
        self.client
            .execute(
                "update credentials set owner_id = $2 where id = $1::text::uuid",
                &[&credential, &new_owner],
            )
            .await
            .expect("transfer");
    }

    /// An order on `credential`; returns its outbox event id.
    pub async fn order(&self, credential: &str, symbol: &str) -> i64 {
        self.client
            .execute(
                "insert into orders (credential_id, symbol, side, qty) values ($1::text::uuid, $2, 'buy', 1)",
                &[&credential, &symbol],
            )
            .await
            .expect("insert order");
        self.last_event_id().await
    }

    /// A fill: the position and the balance of `credential` change.
    pub async fn fill(&self, credential: &str, symbol: &str, qty: i64) {
        self.client
            .execute(
                "insert into positions (credential_id, symbol, qty, avg_price) values ($1::text::uuid, $2, $3::int8, 100)
                 on conflict (credential_id, symbol) do update set qty = positions.qty + excluded.qty, updated_at = now()",
                &[&credential, &symbol, &qty],
            )
            .await
            .expect("upsert position");
        self.client
            .execute(
                "insert into balances (credential_id, cash) values ($1::text::uuid, 1000)
                 on conflict (credential_id) do update set cash = balances.cash - 1, updated_at = now()",
                &[&credential],
            )
            .await
            .expect("upsert balance");
    }

    pub async fn last_event_id(&self) -> i64 {
        self.client
            .query_one("select max(id) from relay.outbox where kind = 'event'", &[])
            .await
            .expect("max id")
            .get::<_, Option<i64>>(0)
            .unwrap_or(0)
    }

    /// Credentials `user` can SELECT through RLS right now, asked as the REST role.
    pub async fn visible_to(&self, user: &str) -> BTreeSet<String> {
        visible(
            &self.client,
            "app_user",
            "request.jwt.claims",
            &json!({"sub": user}),
            "select id::text from public.credentials",
        )
        .await
    }

    /// Outbox events with id in `(after, up_to]` as (id, credential).
    pub async fn events_between(&self, after: i64, up_to: i64) -> Vec<(i64, String)> {
        self.client
            .query(
                "select id, credential_id from relay.outbox where kind = 'event' and id > $1 and id <= $2 order by id",
                &[&after, &up_to],
            )
            .await
            .expect("events")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }
}

/// Credentials visible to `claims` under `role`, asked exactly as a REST API would.
pub async fn visible(
    client: &Client,
    role: &str,
    setting: &str,
    claims: &Value,
    sql: &str,
) -> BTreeSet<String> {
    client.batch_execute("begin").await.expect("begin");
    client
        .batch_execute(&format!("set local role {role}"))
        .await
        .expect("set role");
    client
        .query_one(
            "select set_config($1, $2, true)",
            &[&setting, &claims.to_string()],
        )
        .await
        .expect("claims");
    let rows = client.query(sql, &[]).await.expect("visibility");
    client.batch_execute("commit").await.expect("commit");
    rows.iter().map(|r| r.get::<_, String>(0)).collect()
}
