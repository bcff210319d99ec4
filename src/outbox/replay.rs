//! Resume: the events a reconnecting client missed, read back from the outbox.
//!
//! A client resumes from the id of the last event it received. Ids are taken before
//! commit, so a transaction that took a lower id may have committed after that event:
//! the replay also covers every event below the cursor whose transaction was not yet
//! finished when the cursor's event was written (`xid >= written_xmin`). Such events may
//! reach the client twice, with the same id — the only duplicates the protocol allows.
//!
//! A replay covers exactly what the router had already relayed when the subscription
//! went live (committed in the router's position snapshot); live delivery covers the
//! rest, so the seam has neither gap nor overlap. It uses the visibility of the moment it
//! runs (the subscription's answer), not of each event's commit.

use deadpool_postgres::Pool;

use super::event::{Event, TableNames};
use super::reader::{decode_event, replay_sql, TimestampSource};
use crate::db::snapshot::Snapshot;
use crate::domain::EventId;

/// Events per replay query.
pub const PAGE: i64 = 500;

#[derive(Debug, PartialEq, Eq, Clone)]
pub enum Cursor {
    /// Everything the client may have missed is still in the outbox.
    Retained(ReplayStart),
    /// Events after the cursor may have been pruned: refetch over REST.
    Gap { pruned_through: i64 },
    /// The cursor is no event this database handed out (another database, a restored
    /// one, a made-up id): treated as a gap.
    Unknown { last_id: i64 },
}

/// Where a replay starts.
#[derive(Debug, PartialEq, Eq, Clone)]
pub struct ReplayStart {
    pub since: EventId,
    /// Transactions at or above this may have committed after the cursor's event.
    pub lookback_xid: String,
    /// Page from here (below `since` when late commits are possible).
    pub first_after: EventId,
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

    /// Whether a client can resume from `since`, and from where.
    pub async fn check(&self, since: EventId) -> Result<Cursor, ReplayError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "select r.pruned_through,
                        coalesce(pg_sequence_last_value(pg_get_serial_sequence('relay.outbox', 'id')), 0),
                        o.written_xmin::text,
                        (select min(l.id) from relay.outbox l where l.xid >= o.written_xmin)
                 from relay.retention r left join relay.outbox o on o.id = $1",
                &[&since.0],
            )
            .await?;
        let pruned_through: i64 = row.get(0);
        let last_id: i64 = row.get(1);
        let lookback: Option<String> = row.get(2);
        let earliest_late: Option<i64> = row.get(3);
        if since.0 > last_id {
            return Ok(Cursor::Unknown { last_id });
        }
        if since.0 == 0 && pruned_through == 0 {
            // From the very beginning, nothing pruned yet.
            return Ok(Cursor::Retained(ReplayStart {
                since,
                lookback_xid: "0".into(),
                first_after: EventId(0),
            }));
        }
        if since.0 <= pruned_through {
            return Ok(Cursor::Gap { pruned_through });
        }
        let Some(lookback_xid) = lookback else {
            // Not an event of this outbox (never committed, or pruned meanwhile).
            return Ok(Cursor::Gap { pruned_through });
        };
        let first_after = earliest_late.map_or(since.0, |id| (id - 1).min(since.0));
        Ok(Cursor::Retained(ReplayStart {
            since,
            lookback_xid,
            first_after: EventId(first_after),
        }))
    }

    /// Up to [`PAGE`] events after `after` (and after the start's cursor) on
    /// `credentials`, committed in `position`.
    pub async fn page(
        &self,
        start: &ReplayStart,
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
                    &start.since.0,
                    &start.lookback_xid,
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
