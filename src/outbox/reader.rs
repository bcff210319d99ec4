//! The outbox queries. A batch is every row whose transaction committed between the
//! previous snapshot and the current one: `xid >= prev.xmax` (started after it) or
//! `xid = any(prev.xip)` (running in it), restricted by the current REPEATABLE READ
//! snapshot to what has committed. Nothing that commits late is skipped, nothing is read
//! twice, and a long-running transaction elsewhere holds nothing back.

use futures_util::{pin_mut, TryStreamExt};
use tokio_postgres::{GenericClient, Row, Statement};

use super::event::{Announcement, DecodeError, Event, EventRow, TableNames};
use crate::db::snapshot::Snapshot;
use crate::domain::{CredentialId, EventId, UserId};

const EVENT_COLUMNS: &str =
    "id, xid::text, table_schema, table_name, event_type, row_key, op, credential_id, \
                             new_row::text, old_row::text";

/// Where the `timestamp` of an event comes from: the commit timestamp when the server
/// tracks them, else the time the trigger wrote the row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestampSource {
    Commit,
    Write,
}

impl TimestampSource {
    pub async fn detect(client: &impl GenericClient) -> Result<Self, tokio_postgres::Error> {
        let on: bool = client
            .query_one(
                "select current_setting('track_commit_timestamp')::bool",
                &[],
            )
            .await?
            .get(0);
        Ok(if on { Self::Commit } else { Self::Write })
    }

    fn expression(self) -> &'static str {
        match self {
            Self::Commit => "(extract(epoch from coalesce(pg_xact_commit_timestamp(xmin), written_at)) * 1000000)::int8",
            Self::Write => "(extract(epoch from written_at) * 1000000)::int8",
        }
    }
}

pub fn events_sql(timestamps: TimestampSource) -> String {
    format!(
        "select {EVENT_COLUMNS}, {} from relay.outbox
         where kind = 'event' and (xid >= $1::text::xid8 or xid = any($2::text[]::xid8[]))
         order by id",
        timestamps.expression()
    )
}

/// A replay page: events after `$1` that come after the client's cursor `$2` — by id, or,
/// for transactions that took a lower id but may have committed after the cursor's
/// event, by `xid >= $3` (the cursor event's `written_xmin`) — on the credentials `$4`,
/// committed in the router's position `$5`/`$6`.
pub fn replay_sql(timestamps: TimestampSource) -> String {
    format!(
        "select {EVENT_COLUMNS}, {} from relay.outbox
         where kind = 'event' and id > $1 and id <> $2 and (id > $2 or xid >= $3::text::xid8)
           and credential_id = any($4)
           and xid < $5::text::xid8 and pg_visible_in_snapshot(xid, $6::text::pg_snapshot)
         order by id limit $7",
        timestamps.expression()
    )
}

const ANNOUNCEMENTS_SQL: &str =
    "select id, xid::text, credential_id, snapshot::text, user_id from relay.outbox

     where kind = 'visibility' and (xid >= $1::text::xid8 or xid = any($2::text[]::xid8[]))
     order by id";

/// Statements prepared once per stream connection.
pub struct ReaderStatements {
    snapshot: Statement,
    announcements: Statement,
    events: Statement,
}

impl ReaderStatements {
    pub async fn prepare(
        client: &impl GenericClient,
        timestamps: TimestampSource,
    ) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            snapshot: client.prepare("select pg_current_snapshot()::text").await?,
            announcements: client.prepare(ANNOUNCEMENTS_SQL).await?,
            events: client.prepare(&events_sql(timestamps)).await?,
        })
    }

    /// The transaction's snapshot (the first statement of a REPEATABLE READ transaction
    /// fixes it).
    pub async fn snapshot(&self, client: &impl GenericClient) -> Result<Snapshot, ReadError> {
        let text: String = client.query_one(&self.snapshot, &[]).await?.get(0);
        Ok(Snapshot::parse(&text).map_err(DecodeError::from)?)
    }

    /// Announcements committed since `previous`.
    pub async fn announcements(
        &self,
        client: &impl GenericClient,
        previous: &Snapshot,
    ) -> Result<Vec<Announcement>, ReadError> {
        let rows = client
            .query(
                &self.announcements,
                &[&previous.xmax().to_string(), &previous.in_progress_text()],
            )
            .await?;
        rows.iter().map(decode_announcement).collect()
    }

    /// Streams the events committed since `previous`, in id order, to `each`; rows arrive
    /// as they are consumed, so a large backlog does not sit in memory.
    pub async fn for_each_event(
        &self,
        client: &impl GenericClient,
        previous: &Snapshot,
        tables: &mut TableNames,
        mut each: impl FnMut(Result<Event, DecodeError>),
    ) -> Result<(), ReadError> {
        let xmax = previous.xmax().to_string();
        let running = previous.in_progress_text();
        let rows = client
            .query_raw(
                &self.events,
                [
                    &xmax as &(dyn tokio_postgres::types::ToSql + Sync),
                    &running,
                ],
            )
            .await?;
        pin_mut!(rows);
        while let Some(row) = rows.try_next().await? {
            each(decode_event(&row, tables));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

pub fn decode_event(row: &Row, tables: &mut TableNames) -> Result<Event, DecodeError> {
    let id: i64 = row
        .try_get(0)
        .map_err(|_| DecodeError::Field { id: 0, field: "id" })?;
    let text = |index: usize, field: &'static str| -> Result<&str, DecodeError> {
        row.try_get::<_, &str>(index)
            .map_err(|_| DecodeError::Field { id, field })
    };
    Event::decode(
        &EventRow {
            id,
            xid: text(1, "xid")?,
            table_schema: text(2, "table_schema")?,
            table_name: text(3, "table_name")?,
            event_type: text(4, "event_type")?,
            row_key: text(5, "row_key")?,
            op: text(6, "op")?,
            credential_id: text(7, "credential_id")?,
            new_row: row.try_get(8).map_err(|_| DecodeError::Field {
                id,
                field: "new_row",
            })?,
            old_row: row.try_get(9).map_err(|_| DecodeError::Field {
                id,
                field: "old_row",
            })?,
            committed_at_micros: row.try_get(10).map_err(|_| DecodeError::Field {
                id,
                field: "timestamp",
            })?,
        },
        tables,
    )
}

fn decode_announcement(row: &Row) -> Result<Announcement, ReadError> {
    let id: i64 = row
        .try_get(0)
        .map_err(|_| DecodeError::Field { id: 0, field: "id" })?;
    let field = |field| DecodeError::Field { id, field };
    let text = |index: usize, name: &'static str| -> Result<Option<&str>, DecodeError> {
        row.try_get::<_, Option<&str>>(index)
            .map_err(|_| field(name))
    };
    let xid = text(1, "xid")?
        .and_then(|x| x.parse::<u64>().ok())
        .ok_or_else(|| field("xid"))?;
    // Stamped while the announcing transaction committed; should a stamp be missing
    // (SET CONSTRAINTS … IMMEDIATE), every event of the batch counts as later.
    let snapshot = match text(3, "snapshot")? {
        Some(text) => Snapshot::parse(text).map_err(DecodeError::from)?,
        None => Snapshot::nothing_visible(),
    };
    Ok(Announcement {
        id: EventId(id),
        xid,
        credential: text(2, "credential_id")?.map(CredentialId::from_database),
        user: text(4, "user_id")?.map(UserId::new),
        snapshot,
    })
}
