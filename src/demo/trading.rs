//! The demo's trading world: two users, their broker credentials (one of Alice's shared
//! with Bob), and a simulator that places and fills orders the way a trading engine
//! would, writing straight to the tables. It knows nothing about the relay: the triggers
//! turn its writes into events.

use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

pub const USERS: [(&str, &str); 2] = [("alice", "Alice"), ("bob", "Bob")];

const SYMBOLS: [(&str, f64); 6] = [
    ("AAPL", 228.0),
    ("MSFT", 431.0),
    ("NVDA", 138.0),
    ("TSLA", 251.0),
    ("AMZN", 197.0),
    ("GOOG", 171.0),
];

/// A credential the demo created.
#[derive(Clone, Debug, Serialize)]
pub struct DemoCredential {
    pub id: String,
    pub label: String,
    /// Owner at seeding time (transfers change it later).
    pub owner: &'static str,
}

/// What the seed created, and which credentials the controls act on.
#[derive(Clone, Debug)]
pub struct World {
    pub credentials: Vec<DemoCredential>,
    /// Alice's, shared with Bob through credential_members.
    pub shared: String,
    /// Alice's, which "transfer" moves between Alice and Bob.
    pub transferable: String,
}

/// Users, credentials, a membership, opening balances and positions.
pub async fn seed(client: &Client) -> anyhow::Result<World> {
    for (id, name) in USERS {
        client
            .execute(
                "insert into users (id, display_name) values ($1, $2)",
                &[&id, &name],
            )
            .await
            .context("inserting the demo users")?;
    }
    let mut credentials = Vec::new();
    for (owner, label) in [
        ("alice", "Alice · main"),
        ("alice", "Alice · retirement"),
        ("alice", "Alice · family"),
        ("bob", "Bob · main"),
    ] {
        let id: String = client
            .query_one(
                "insert into credentials (owner_id, label) values ($1, $2) returning id::text",
                &[&owner, &label],
            )
            .await
            .context("inserting the demo credentials")?
            .get(0);
        credentials.push(DemoCredential {
            id,
            label: label.to_owned(),
            owner,
        });
    }
    let shared = credentials[2].id.clone();
    let transferable = credentials[1].id.clone();
    client
        .execute(
            "insert into credential_members (credential_id, user_id) values ($1::text::uuid, 'bob')",
            &[&shared],
        )
        .await
        .context("sharing the family credential with bob")?;
    for (n, credential) in credentials.iter().enumerate() {
        client
            .execute(
                "insert into balances (credential_id, cash, equity, buying_power)
                 values ($1::text::uuid, 100000, 100000, 200000)",
                &[&credential.id],
            )
            .await
            .context("opening balances")?;
        let (symbol, price) = SYMBOLS[n % SYMBOLS.len()];
        client
            .execute(
                "insert into positions (credential_id, symbol, qty, avg_price, market_value)
                 values ($1::text::uuid, $2, 10, $3::float8::numeric, 10 * $3::float8::numeric)",
                &[&credential.id, &symbol, &price],
            )
            .await
            .context("opening positions")?;
    }
    Ok(World {
        credentials,
        shared,
        transferable,
    })
}

/// Trades on every credential in turn, `per_second` times a second, until cancelled.
/// A tick places an order on the credential, or fills its open one: the order, the
/// position and the balance change in one transaction, as a broker's fill would.
pub async fn simulate(mut client: Client, world: World, per_second: f64, stop: CancellationToken) {
    let period = Duration::from_secs_f64(1.0 / per_second.clamp(0.01, 1000.0));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut prices: Vec<f64> = SYMBOLS.iter().map(|(_, p)| *p).collect();
    let mut tick: usize = 0;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        for price in &mut prices {
            *price = (*price * (1.0 + (rand::random::<f64>() - 0.5) * 0.004)).max(1.0);
        }
        let credential = &world.credentials[tick % world.credentials.len()].id;
        let symbol_index = (tick / world.credentials.len() + tick) % SYMBOLS.len();
        let (symbol, _) = SYMBOLS[symbol_index];
        let price = (prices[symbol_index] * 100.0).round() / 100.0;
        tick += 1;
        if let Err(error) = trade(&mut client, credential, symbol, price).await {
            if stop.is_cancelled() {
                return;
            }
            tracing::warn!(%error, "simulated trade failed");
            if client.is_closed() {
                tracing::warn!("the simulator lost its connection; no more trades");
                return;
            }
        }
    }
}

async fn trade(
    client: &mut Client,
    credential: &str,
    symbol: &str,
    price: f64,
) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let open = tx
        .query_opt(
            "select id, symbol, side, qty::float8 from orders
             where credential_id = $1::text::uuid and status = 'new'
             order by id limit 1 for update",
            &[&credential],
        )
        .await?;
    match open {
        None => {
            // Mostly buys, so that positions build up.
            let side = if rand::random::<f64>() < 0.6 {
                "buy"
            } else {
                "sell"
            };
            let qty = f64::from(1 + rand::random::<u8>() % 9);
            tx.execute(
                "insert into orders (credential_id, symbol, side, qty, limit_price)
                 values ($1::text::uuid, $2, $3, $4::float8::numeric, $5::float8::numeric)",
                &[&credential, &symbol, &side, &qty, &price],
            )
            .await?;
        }
        Some(order) => {
            let (id, symbol, side, qty): (i64, String, String, f64) =
                (order.get(0), order.get(1), order.get(2), order.get(3));
            let signed = if side == "buy" { qty } else { -qty };
            tx.execute(
                "update orders set status = 'filled', filled_qty = qty, updated_at = now() where id = $1",
                &[&id],
            )
            .await?;
            tx.execute(
                "insert into positions (credential_id, symbol, qty, avg_price, market_value)
                 values ($1::text::uuid, $2, $3::float8::numeric, $4::float8::numeric, $3::float8::numeric * $4::float8::numeric)
                 on conflict (credential_id, symbol) do update
                 set avg_price = case
                         -- flat: no cost basis
                         when positions.qty + excluded.qty = 0 then 0
                         -- opening or adding in the same direction: weighted average
                         when positions.qty = 0 or sign(positions.qty) = sign(excluded.qty)
                           then round((positions.qty * positions.avg_price + excluded.qty * excluded.avg_price)
                                      / (positions.qty + excluded.qty), 2)
                         -- crossing zero: the rest opened at this price
                         when sign(positions.qty + excluded.qty) <> sign(positions.qty) then excluded.avg_price
                         -- reducing: the basis of what is left does not change
                         else positions.avg_price end,
                     qty = positions.qty + excluded.qty,
                     market_value = round((positions.qty + excluded.qty) * excluded.avg_price, 2),
                     updated_at = now()",
                &[&credential, &symbol, &signed, &price],
            )
            .await?;
            tx.execute(
                "update balances
                 set cash = round(cash - $2::float8::numeric * $3::float8::numeric, 2),
                     equity = round(cash - $2::float8::numeric * $3::float8::numeric
                                    + coalesce((select sum(market_value) from positions p
                                                where p.credential_id = balances.credential_id), 0), 2),
                     buying_power = round(2 * (cash - $2::float8::numeric * $3::float8::numeric), 2),
                     updated_at = now()
                 where credential_id = $1::text::uuid",
                &[&credential, &signed, &price],
            )
            .await?;
        }
    }
    tx.commit().await
}
