//! Resume: the events a reconnecting client missed, read back from the outbox. A replay
//! covers exactly what the router had already relayed when the subscription went live
//! (ids after the client's cursor, committed in the router's position snapshot); live
//! delivery covers the rest, so the seam has neither gap nor overlap.
//!
//! A replay uses the visibility of the moment it runs (the subscription's answer), not of
//! each event's commit: a user who has since lost a credential gets none of its history.

use deadpool_postgres::Pool;

use super::event::{Event, TableNames};
use super::reader::{decode_event, replay_sql, TimestampSource};
use crate::db::snapshot::Snapshot;
use crate::domain::EventId;

/// Events per replay query.
pub const PAGE: i64 = 500;

#[derive(Debug, PartialEq, Eq)]
pub enum Cursor {
    /// Everything after the cursor is still in the outbox.
    Retained,
    /// Events after the cursor may have been pruned: refetch over REST.
    Gap { pruned_through: i64 },
    /// The cursor is beyond any id this database handed out (another database, or a
    /// restored one): treated as a gap.
    Unknown { last_id: i64 },
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Pool(#[from] deadpool_postgres::PoolError),
}

pub struct Replayer {
    pool: Pool,
    sql: String,
}

impl Replayer {
    pub fn new(pool: Pool, timestamps: TimestampSource) -> Self {
        Self {
            pool,
            sql: replay_sql(timestamps),
        }
    }

    /// Whether a client can resume from `since`.
    pub async fn check(&self, since: EventId) -> Result<Cursor, ReplayError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "select pruned_through,
                        coalesce(pg_sequence_last_value(pg_get_serial_sequence('relay.outbox', 'id')), 0)
                 from relay.retention",
                &[],
            )
            .await?;
        let (pruned_through, last_id): (i64, i64) = (row.get(0), row.get(1));
        Ok(if since.0 < pruned_through {
            Cursor::Gap { pruned_through }
        } else if since.0 > last_id {
            Cursor::Unknown { last_id }
        } else {
            Cursor::Retained
        })
    }

    /// Up to [`PAGE`] events after `after` on `credentials`, committed in `position`.
    pub async fn page(
        &self,
        after: EventId,
        credentials: &[&str],
        position: &Snapshot,
        tables: &mut TableNames,
    ) -> Result<Vec<Event>, ReplayError> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(&self.sql).await?;
        let rows = client
            .query(
                &statement,
                &[
                    &after.0,
                    &credentials,
                    &position.xmax().to_string(),
                    &position.to_string(),
                    &PAGE,
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|row| match decode_event(row, tables) {
                Ok(event) => Some(event),
                Err(error) => {
                    tracing::error!(%error, "skipping an undecodable outbox row in a replay");
                    None
                }
            })
            .collect())
    }
}
