//! The relay's own schema, embedded with refinery: `rls-relay migrate` applies
//! `sql/relay/V*__*.sql` in order and records them in `relay.schema_history`.

use tokio_postgres::Client;

mod embedded {
    refinery::embed_migrations!("sql/relay");
}

/// The example trading schema (not a relay migration): applied by the demo and the tests
/// after [`run`], the way an application's own migrations would be.
pub const EXAMPLE_SCHEMA: &str = include_str!("../../sql/example/trading.sql");

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("rls-relay needs PostgreSQL 14 or later (found server_version_num {0})")]
    ServerTooOld(i32),
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    #[error("migration failed: {0}")]
    Refinery(#[from] refinery::Error),
}

/// Applies every pending relay migration; returns the names of those applied now.
pub async fn run(client: &mut Client) -> Result<Vec<String>, MigrateError> {
    let version: i32 = client
        .query_one("select current_setting('server_version_num')::int", &[])
        .await?
        .get(0);
    if version < 140_000 {
        return Err(MigrateError::ServerTooOld(version));
    }
    // refinery's history table lives in our schema, which must exist before it runs.
    client
        .batch_execute("set client_min_messages = warning; create schema if not exists relay")
        .await?;
    let report = embedded::migrations::runner()
        .set_migration_table_name("relay.schema_history")
        .run_async(client)
        .await?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| m.to_string())
        .collect())
}
