//! The benchmark's Postgres: a durable throwaway cluster (fsync and synchronous commit
//! on, so commit rates are honest), the relay's schema, the example trading schema, a
//! seeded workload, and switches for the triggers under test.

use std::collections::{BTreeSet, HashMap};

use anyhow::Context;
use rls_relay::db::cluster::{ClusterOptions, LocalCluster};
use tokio_postgres::{Client, NoTls};

use crate::options::Options;

/// Channel of the naive per-row NOTIFY trigger (the baseline design, and the delivery
/// floor of the latency phase).
pub const NAIVE_CHANNEL: &str = "bench_naive";

/// The tables writers update, with the relay's `track_events` arguments.
pub const TRACKED: [(&str, &str, &str); 3] = [
    ("public.positions", "position_update", "position"),
    ("public.orders", "order_update", "order"),
    ("public.balances", "balance_update", "balance"),
];

/// Which triggers fire on the writers' tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Triggers {
    /// Untracked: the write path with no trigger at all.
    None,
    /// Only a plain per-row `pg_notify` (the naive design).
    Naive,
    /// The relay's `capture_event` (outbox row, NOTIFY only per the wake-up mode).
    Relay,
    /// Both: the relay's, and a per-row NOTIFY for the bare LISTEN client.
    RelayAndNaive,
}

/// One row set a writer transaction touches: an order fill, its position and its
/// credential's balance.
#[derive(Clone, Debug)]
pub struct Target {
    pub order_id: i64,
    pub position_id: i64,
    pub credential: String,
    /// Index of the credential, which decides the writer that owns it.
    pub credential_index: usize,
}

pub struct Database {
    /// Stopped and deleted when dropped.
    _cluster: LocalCluster,
    pub url: String,
    pub admin: Client,
    /// `users[i]` is the user id of user i.
    pub users: Vec<String>,
    /// Credential ids by index.
    pub credentials: Vec<String>,
    /// Credentials each user may see, as Postgres answers for the REST role.
    pub visible: Vec<BTreeSet<String>>,
    pub targets: Vec<Target>,
    pub server_version: String,
    pub postmaster_pid: Option<u32>,
}

impl Database {
    pub async fn start(options: &Options) -> anyhow::Result<Self> {
        let cluster = tokio::task::spawn_blocking(|| {
            LocalCluster::start(&ClusterOptions {
                durable: true,
                max_connections: 300,
            })
        })
        .await
        .context("cluster start panicked")?
        .context("starting a throwaway Postgres")?;
        let postgres = connect(&cluster.url("postgres")).await?;
        postgres.batch_execute("create database bench").await?;
        drop(postgres);
        let url = cluster.url("bench");
        let mut admin = connect(&url).await?;
        rls_relay::db::migrate::run(&mut admin)
            .await
            .context("relay migrations")?;
        admin
            .batch_execute(rls_relay::db::migrate::EXAMPLE_SCHEMA)
            .await
            .context("example schema")?;
        admin
            .batch_execute(&format!(
                "create schema bench;
                 create function bench.naive_notify() returns trigger language plpgsql as $$
                 begin
                     perform pg_notify('{NAIVE_CHANNEL}', pg_current_xact_id()::text || ':' || tg_table_name);
                     return null;
                 end $$;"
            ))
            .await
            .context("naive trigger function")?;
        // Mean WAL flush time per burst: the disk's speed changes under other load, and
        // every notifying commit waits for one flush.
        admin
            .batch_execute("alter system set track_wal_io_timing = on")
            .await?;
        admin.batch_execute("select pg_reload_conf()").await?;
        let server_version: String = admin
            .query_one("select current_setting('server_version')", &[])
            .await?
            .get(0);
        let backend: i32 = admin
            .query_one("select pg_backend_pid()", &[])
            .await?
            .get(0);
        let postmaster_pid = crate::process::parent_pid(backend as u32);
        let mut database = Self {
            _cluster: cluster,
            url,
            admin,
            users: Vec::new(),
            credentials: Vec::new(),
            visible: Vec::new(),
            targets: Vec::new(),
            server_version,
            postmaster_pid,
        };
        database.seed(options).await?;
        Ok(database)
    }

    /// Users u0000…, credential i owned by user i % users, `shared` credentials spread
    /// evenly shared with the user half-way round, one position and one open order per
    /// symbol, one balance per credential.
    async fn seed(&mut self, options: &Options) -> anyhow::Result<()> {
        let users = options.users as i32;
        let credentials = options.credentials as i32;
        let symbols = options.symbols as i32;
        self.admin
            .batch_execute(&format!(
                "insert into users (id, display_name)
                     select format('u%s', lpad(i::text, 4, '0')), format('User %s', i)
                     from generate_series(0, {users} - 1) i;
                 insert into credentials (owner_id, label)
                     select format('u%s', lpad((i % {users})::text, 4, '0')), format('c%s', lpad(i::text, 6, '0'))
                     from generate_series(0, {credentials} - 1) i;"
            ))
            .await
            .context("seeding users and credentials")?;
        let rows = self
            .admin
            .query("select id::text from credentials order by label", &[])
            .await?;
        let ids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        let (mut shared_ids, mut members) = (Vec::new(), Vec::new());
        for k in 0..options.shared {
            let i = k * options.credentials / options.shared;
            let owner = i % options.users;
            let mut member = (owner + options.users / 2) % options.users;
            if member == owner {
                member = (owner + 1) % options.users;
            }
            shared_ids.push(ids[i].clone());
            members.push(format!("u{member:04}"));
        }
        self.admin
            .execute(
                "insert into credential_members (credential_id, user_id)
                 select c::uuid, u from unnest($1::text[], $2::text[]) as s(c, u)",
                &[&shared_ids, &members],
            )
            .await
            .context("sharing credentials")?;
        self.admin
            .batch_execute(&format!(
                "insert into positions (credential_id, symbol, qty, avg_price, market_value)
                     select c.id, format('SYM%s', s), 100, 100, 10000
                     from credentials c, generate_series(0, {symbols} - 1) s;
                 insert into orders (credential_id, symbol, side, qty, limit_price)
                     select c.id, format('SYM%s', s), 'buy', 1000000000, 100
                     from credentials c, generate_series(0, {symbols} - 1) s;
                 insert into balances (credential_id, cash, equity, buying_power)
                     select id, 1000000, 1000000, 1000000 from credentials;"
            ))
            .await
            .context("seeding positions, orders and balances")?;
        // VACUUM refuses to run in a multi-statement string (an implicit transaction).
        self.admin.batch_execute("vacuum analyze").await?;

        self.users = (0..options.users).map(|i| format!("u{i:04}")).collect();
        self.credentials = ids;
        let index: HashMap<&str, usize> = self
            .credentials
            .iter()
            .enumerate()
            .map(|(i, c)| (c.as_str(), i))
            .collect();
        let rows = self
            .admin
            .query(
                "select o.id, p.id, o.credential_id::text
                 from orders o join positions p using (credential_id, symbol)
                 order by o.id",
                &[],
            )
            .await?;
        self.targets = rows
            .iter()
            .map(|r| {
                let credential: String = r.get(2);
                Target {
                    order_id: r.get(0),
                    position_id: r.get(1),
                    credential_index: index.get(credential.as_str()).copied().unwrap_or(0),
                    credential,
                }
            })
            .collect();
        for user in self.users.clone() {
            let visible = self.visible_to(&user).await?;
            self.visible.push(visible);
        }
        Ok(())
    }

    /// What `user` may see, asked exactly as the REST API (and the relay) ask: as
    /// `app_user`, with the claims in `request.jwt.claims`, under RLS.
    async fn visible_to(&self, user: &str) -> anyhow::Result<BTreeSet<String>> {
        let claims = serde_json::json!({ "sub": user }).to_string();
        self.admin
            .batch_execute("begin; set local role app_user")
            .await?;
        self.admin
            .query_one(
                "select set_config('request.jwt.claims', $1, true)",
                &[&claims],
            )
            .await?;
        let rows = self
            .admin
            .query("select id::text from public.credentials", &[])
            .await?;
        self.admin.batch_execute("commit").await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    pub async fn set_triggers(&self, triggers: Triggers) -> anyhow::Result<()> {
        let (relay, naive) = match triggers {
            Triggers::None => (false, false),
            Triggers::Naive => (false, true),
            Triggers::Relay => (true, false),
            Triggers::RelayAndNaive => (true, true),
        };
        let mut sql = String::from("set client_min_messages = warning;");
        for (table, event_type, row_key) in TRACKED {
            if relay {
                sql.push_str(&format!(
                    "select relay.track_events('{table}', 'credential_id', '{event_type}', '{row_key}');"
                ));
            } else {
                sql.push_str(&format!("select relay.untrack_events('{table}');"));
            }
            if naive {
                sql.push_str(&format!(
                    "create or replace trigger bench_naive after insert or update or delete on {table}
                     for each row execute function bench.naive_notify();"
                ));
            } else {
                sql.push_str(&format!("drop trigger if exists bench_naive on {table};"));
            }
        }
        self.admin
            .batch_execute(&sql)
            .await
            .with_context(|| format!("switching triggers to {triggers:?}"))
    }

    /// A vacuum and a checkpoint before each burst, so that no burst pays for an earlier
    /// one's dead rows (autovacuum would otherwise land in whichever burst follows the
    /// fastest one) or dirty pages, and all start with the same full-page-write cost.
    /// Autovacuum stays on, as in production: a burst's own dead rows are its own.
    pub async fn checkpoint(&self) -> anyhow::Result<()> {
        // VACUUM refuses to run inside a multi-statement string (an implicit transaction).
        self.admin
            .batch_execute("vacuum public.positions, public.orders, public.balances, relay.outbox")
            .await?;
        self.admin.batch_execute("checkpoint").await?;
        Ok(())
    }

    /// The highest outbox id (everything is committed when this is called).
    pub async fn last_outbox_id(&self) -> anyhow::Result<i64> {
        Ok(self
            .admin
            .query_one("select coalesce(max(id), 0) from relay.outbox", &[])
            .await?
            .get(0))
    }

    /// Events after `after`: (id, credential, xid).
    pub async fn events_after(&self, after: i64) -> anyhow::Result<Vec<OutboxEvent>> {
        let rows = self
            .admin
            .query(
                "select id, credential_id, xid::text, (extract(epoch from written_at) * 1000000)::int8
                 from relay.outbox where kind = 'event' and id > $1 order by id",
                &[&after],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let xid: &str = r.get(2);
                Ok(OutboxEvent {
                    id: r.get(0),
                    credential: r.get(1),
                    xid: xid.parse().context("xid")?,
                    written_micros: r.get(3),
                })
            })
            .collect()
    }

    /// Relays that stopped without unregistering would keep asking writers to NOTIFY for
    /// up to a minute: the next phase must not inherit them.
    pub async fn forget_listeners(&self) -> anyhow::Result<()> {
        self.admin
            .batch_execute("delete from relay.listeners")
            .await?;
        Ok(())
    }

    /// WAL flushes so far, the milliseconds they took, and the bytes written
    /// (pg_stat_wal).
    pub async fn wal_stats(&self) -> anyhow::Result<(i64, f64, i64)> {
        let row = self
            .admin
            .query_one(
                "select wal_sync, wal_sync_time, wal_bytes::int8 from pg_stat_wal",
                &[],
            )
            .await?;
        Ok((row.get(0), row.get(1), row.get(2)))
    }

    pub async fn listeners(&self) -> anyhow::Result<i64> {
        Ok(self
            .admin
            .query_one("select count(*) from relay.listeners", &[])
            .await?
            .get(0))
    }
}

#[derive(Clone, Debug)]
pub struct OutboxEvent {
    pub id: i64,
    pub credential: String,
    pub xid: u64,
    /// When the trigger wrote it (microseconds since the epoch; the commit follows
    /// within a flush).
    pub written_micros: i64,
}

/// Samples what the writers' backends and the relay's outbox reader (its listener
/// connection) are doing (`pg_stat_activity`) every 20 ms, from a connection of its own,
/// until stopped: where the write path's and the read path's time goes. Parallel query
/// workers are counted with the reader.
pub struct WaitSampler {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<(Waits, Waits)>,
}

impl WaitSampler {
    pub async fn start(url: &str) -> anyhow::Result<Self> {
        let client = connect(url).await?;
        let statement = client
            .prepare(&format!(
                "select backend_type = 'parallel worker' or application_name = '{LISTENER}',
                        case when backend_type = 'parallel worker' then 'parallel query worker'
                             when state = 'idle' then 'ClientRead (idle)'
                             when state like 'idle in transaction%' then 'ClientRead (in a transaction)'
                             when wait_event is null then 'CPU'
                             else wait_event_type || ':' || wait_event end, count(*)
                 from pg_stat_activity
                 where application_name in ('{WRITER_APPLICATION_NAME}', '{LISTENER}')
                    or backend_type = 'parallel worker'
                 group by 1, 2",
                LISTENER = rls_relay::db::LISTENER_APPLICATION_NAME,
            ))
            .await?;
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let (mut writers, mut reader) = (Waits::default(), Waits::default());
            let mut ticks = tokio::time::interval(std::time::Duration::from_millis(20));
            loop {
                tokio::select! {
                    () = stopped.cancelled() => break,
                    _ = ticks.tick() => {}
                }
                let Ok(rows) = client.query(&statement, &[]).await else {
                    break;
                };
                for row in rows {
                    let is_reader: bool = row.get(0);
                    let state: String = row.get(1);
                    let count = row.get::<_, i64>(2) as u64;
                    let waits = if is_reader { &mut reader } else { &mut writers };
                    *waits.0.entry(state).or_insert(0) += count;
                }
            }
            (writers, reader)
        });
        Ok(Self { stop, task })
    }

    /// The writers' samples and the relay reader's.
    pub async fn stop(self) -> (Waits, Waits) {
        self.stop.cancel();
        self.task.await.unwrap_or_default()
    }
}

/// Samples of the writers' backends by state or wait event.
#[derive(Clone, Debug, Default)]
pub struct Waits(pub HashMap<String, u64>);

impl Waits {
    /// `Lock:object 89%, IO:WALSync 5%, CPU 3%`
    pub fn top(&self, n: usize) -> String {
        let total: u64 = self.0.values().sum();
        if total == 0 {
            return "—".into();
        }
        let mut entries: Vec<(&String, &u64)> = self.0.iter().collect();
        entries.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        entries
            .iter()
            .take(n)
            .map(|(k, v)| format!("{k} {:.0}%", **v as f64 * 100.0 / total as f64))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn merge(&mut self, other: &Waits) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_insert(0) += v;
        }
    }
}

/// `application_name` of the writers' connections, which the sampler looks for.
pub const WRITER_APPLICATION_NAME: &str = "bench-writer";

pub async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| "connecting to the benchmark's Postgres".to_string())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}
