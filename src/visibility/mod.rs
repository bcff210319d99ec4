//! "Which credentials may these claims see?", asked of Postgres and never decided here.
//!
//! Each question runs in a transaction: `SET LOCAL ROLE <RELAY_DB_ROLE>`,
//! `set_config(<claims setting>, <claims>, true)`, then `RELAY_VISIBILITY_SQL`. Everything
//! is transaction-local, so nothing survives into the next use of the connection. The
//! claims travel as a bind parameter; the only SQL text built here is the role name, which
//! comes from configuration and is checked at start-up.

pub mod cache;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use futures_util::future::join4;
use tokio_postgres::{Client, GenericClient, Statement};

use crate::auth::Claims;
use crate::config::{quote_identifier, VisibilityConfig};
use crate::db::snapshot::{InvalidSnapshot, Snapshot};
use crate::domain::CredentialId;
use crate::metrics::Metrics;

/// The credentials one claims set may see.
pub type VisibleSet = Arc<HashSet<CredentialId>>;

#[derive(Debug, thiserror::Error)]
pub enum VisibilityError {
    #[error("visibility query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("no database connection for the visibility query: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("visibility query timed out")]
    Timeout,
    #[error(transparent)]
    Snapshot(#[from] InvalidSnapshot),
}

/// A visibility answer and the snapshot it was taken in: it holds for events that commit
/// after that snapshot, until the next visibility announcement.
#[derive(Clone, Debug)]
pub struct Answer {
    pub visible: VisibleSet,
    pub as_of: Arc<Snapshot>,
}

/// The configured question, ready to ask.
#[derive(Clone)]
pub struct VisibilityQuery {
    role: String,
    set_role: String,
    claims_setting: String,
    wrapped_sql: String,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl VisibilityQuery {
    pub fn new(config: &VisibilityConfig, metrics: Arc<Metrics>) -> Self {
        let user_sql = config
            .visibility_sql
            .trim()
            .trim_end_matches(';')
            .trim_end();
        Self {
            role: config.db_role.clone(),
            set_role: format!("set local role {}", quote_identifier(&config.db_role)),
            claims_setting: config.claims_setting.clone(),
            // One column of any type, as text: uuid, bigint and text ids compare alike.
            wrapped_sql: format!("select v.c::text from ({user_sql}\n) as v(c)"),
            timeout: config.visibility_timeout,
            metrics,
        }
    }

    pub fn role(&self) -> &str {
        &self.role
    }

    pub fn claims_setting(&self) -> &str {
        &self.claims_setting
    }

    pub fn wrapped_sql(&self) -> &str {
        &self.wrapped_sql
    }

    pub fn set_role_statement(&self) -> String {
        self.set_role.clone()
    }

    fn local_timeout_statement(&self) -> String {
        format!(
            "set local statement_timeout = {}",
            self.timeout.as_millis().max(1)
        )
    }

    /// Asks on a pooled connection, in a fresh REPEATABLE READ snapshot that is returned
    /// with the answer (a new subscription is exact from that snapshot on).
    pub async fn ask(&self, pool: &Pool, claims: &Claims) -> Result<Answer, VisibilityError> {
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout + Duration::from_secs(1), async {
            let mut client = pool.get().await?;
            let set_claims = client
                .prepare_cached("select set_config($1, $2, true)")
                .await?;
            let visible = client.prepare_cached(&self.wrapped_sql).await?;
            let transaction = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let snapshot: String = transaction
                .query_one("select pg_current_snapshot()::text", &[])
                .await?
                .get(0);
            transaction
                .batch_execute(&format!(
                    "{}; {}",
                    self.local_timeout_statement(),
                    self.set_role
                ))
                .await?;
            transaction
                .query_one(&set_claims, &[&self.claims_setting, &claims.as_json()])
                .await?;
            let rows = transaction.query(&visible, &[]).await?;
            transaction.rollback().await?;
            Ok::<_, VisibilityError>(Answer {
                visible: Arc::new(
                    rows.iter()
                        .map(|r| CredentialId::from_database(r.get(0)))
                        .collect(),
                ),
                as_of: Arc::new(Snapshot::parse(&snapshot)?),
            })
        })
        .await
        .unwrap_or(Err(VisibilityError::Timeout));
        self.metrics
            .visibility_query(started.elapsed(), result.is_ok());
        result
    }

    /// Prepares the statements [`recompute`](Self::recompute) uses, on the stream connection.
    pub async fn prepare(
        &self,
        client: &impl GenericClient,
    ) -> Result<PreparedVisibility, tokio_postgres::Error> {
        Ok(PreparedVisibility {
            set_claims: client.prepare("select set_config($1, $2, true)").await?,
            visible: client.prepare(&self.wrapped_sql).await?,
        })
    }

    /// Answers for several claims sets inside the reader's REPEATABLE READ transaction, so
    /// that each answer is exactly as of the batch's snapshot. Each claims set runs in its
    /// own savepoint: one whose policies fail (a bad claim, a timeout) gets an error and
    /// the others still get answers. Statements of one claims set are pipelined (one round
    /// trip). The role switch is undone before returning.
    pub async fn recompute(
        &self,
        client: &Client,
        prepared: &PreparedVisibility,
        claims: &[Claims],
    ) -> Result<Vec<Result<VisibleSet, VisibilityError>>, tokio_postgres::Error> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        client
            .batch_execute(&format!(
                "savepoint relay_recompute; {}; {}",
                self.local_timeout_statement(),
                self.set_role
            ))
            .await?;
        let mut answers = Vec::with_capacity(claims.len());
        for one in claims {
            let started = Instant::now();
            let (savepoint, set, rows, release) = join4(
                client.batch_execute("savepoint relay_claims"),
                client.query_one(
                    &prepared.set_claims,
                    &[&self.claims_setting, &one.as_json()],
                ),
                client.query(&prepared.visible, &[]),
                client.batch_execute("release savepoint relay_claims"),
            )
            .await;
            savepoint?;
            let answer = match (set, rows, release) {
                (Ok(_), Ok(rows), Ok(())) => Ok(Arc::new(
                    rows.iter()
                        .map(|r| CredentialId::from_database(r.get(0)))
                        .collect(),
                )),
                (set, rows, _) => {
                    client
                        .batch_execute("rollback to savepoint relay_claims")
                        .await?;
                    Err(match (set, rows) {
                        (Err(e), _) | (_, Err(e)) => VisibilityError::Query(e),
                        _ => VisibilityError::Timeout,
                    })
                }
            };
            self.metrics
                .visibility_query(started.elapsed(), answer.is_ok());
            answers.push(answer);
        }
        client
            .batch_execute("rollback to savepoint relay_recompute")
            .await?;
        Ok(answers)
    }
}

/// Statements prepared on the stream connection.
pub struct PreparedVisibility {
    set_claims: Statement,
    visible: Statement,
}
