//! The tables whose changes become events, read from `relay.tracked` (the triggers
//! themselves), so that a subscription naming a table that is not tracked gets a clear
//! `bad_request` instead of silence.

use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio::sync::Mutex;

use crate::domain::{TableFilter, TableName};

/// How often a miss may re-read the list (a table tracked after start-up is found then).
const REFRESH_AT_MOST_EVERY: Duration = Duration::from_secs(2);

pub struct TrackedTables {
    pool: Pool,
    state: Mutex<State>,
}

struct State {
    read_at: Option<Instant>,
    tables: Vec<TableName>,
}

impl TrackedTables {
    pub fn new(pool: Pool) -> Self {
        Self {
            pool,
            state: Mutex::new(State {
                read_at: None,
                tables: Vec::new(),
            }),
        }
    }

    /// The filters that match no tracked table, and the tracked tables (for the error
    /// message). When the list cannot be read, nothing is reported unknown: an unknown
    /// table only ever matches nothing.
    pub async fn unknown(&self, filters: &[TableFilter]) -> (Vec<TableFilter>, Vec<String>) {
        let mut state = self.state.lock().await;
        let missing = |tables: &[TableName]| -> Vec<TableFilter> {
            filters
                .iter()
                .filter(|f| !tables.iter().any(|t| f.matches(t)))
                .cloned()
                .collect()
        };
        let mut unknown = missing(&state.tables);
        let stale = state
            .read_at
            .is_none_or(|at| at.elapsed() >= REFRESH_AT_MOST_EVERY);
        if !unknown.is_empty() && stale {
            match self.read().await {
                Ok(tables) => {
                    state.tables = tables;
                    state.read_at = Some(Instant::now());
                    unknown = missing(&state.tables);
                }
                Err(error) => {
                    tracing::warn!(error = %crate::errors::Chain(&*error), "cannot read relay.tracked; table names are not checked");
                    return (Vec::new(), Vec::new());
                }
            }
        }
        let names = state
            .tables
            .iter()
            .map(|t| format!("{}.{}", t.schema, t.name))
            .collect();
        (unknown, names)
    }

    async fn read(&self) -> Result<Vec<TableName>, Box<dyn std::error::Error + Send + Sync>> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "select table_schema, table_name from relay.tracked where kind = 'events' order by 1, 2",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| TableName {
                schema: r.get::<_, &str>(0).into(),
                name: r.get::<_, &str>(1).into(),
            })
            .collect())
    }
}
