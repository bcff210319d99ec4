//! An outbox row decoded into what the relay routes: an event with its protocol frame
//! already serialized (once per event, never per socket), or a visibility announcement.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::value::RawValue;

use crate::db::snapshot::{InvalidSnapshot, Snapshot};
use crate::domain::{CredentialId, EventId, TableName, UserId};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
}

impl Op {
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "INSERT" => Some(Self::Insert),
            "UPDATE" => Some(Self::Update),
            "DELETE" => Some(Self::Delete),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Insert => "INSERT",
            Self::Update => "UPDATE",
            Self::Delete => "DELETE",
        }
    }
}

/// A change to one row of a tracked table, routed by its credential.
#[derive(Clone)]
pub struct Event {
    pub id: EventId,
    /// The writing transaction: places the event in the commit stream.
    pub xid: u64,
    pub credential: CredentialId,
    pub table: TableName,
    pub op: Op,
    /// Commit time (or write time), microseconds since the epoch: the `timestamp` field
    /// and the start of the end-to-end latency measurement.
    pub committed_at_micros: i64,
    /// The protocol message, ready to send to every socket that may see it.
    pub frame: Utf8Bytes,
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("id", &self.id)
            .field("xid", &self.xid)
            .field("credential", &self.credential)
            .field("table", &self.table)
            .field("op", &self.op)
            .finish_non_exhaustive()
    }
}

/// "Who may see `credential` (every credential when `None`) may have changed", as of
/// the announcing transaction's commit.
#[derive(Clone, Debug)]
pub struct Announcement {
    pub id: EventId,
    pub xid: u64,
    pub credential: Option<CredentialId>,
    /// The one user concerned; `None`: anyone.
    pub user: Option<UserId>,
    /// Taken while the announcing transaction committed: an event whose transaction is
    /// visible in it committed before the announcement.
    pub snapshot: Snapshot,
}

impl Announcement {
    /// Whether `event` committed before this announcement (the announcement's snapshot
    /// saw it commit). An event of the announcing transaction itself commits with it, so
    /// it does not.
    pub fn saw_commit_of(&self, event: &Event) -> bool {
        event.xid != self.xid && self.snapshot.is_visible(event.xid)
    }
}

/// An outbox event row as the reader query returns it.
#[derive(Debug)]
pub struct EventRow<'a> {
    pub id: i64,
    pub xid: &'a str,
    pub table_schema: &'a str,
    pub table_name: &'a str,
    pub event_type: &'a str,
    pub row_key: &'a str,
    pub op: &'a str,
    pub credential_id: &'a str,
    pub new_row: Option<&'a str>,
    pub old_row: Option<&'a str>,
    pub committed_at_micros: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("outbox row {id}: invalid {field}")]
    Field { id: i64, field: &'static str },
    #[error("outbox row {id}: row image is not JSON: {error}")]
    Json { id: i64, error: serde_json::Error },
    #[error(transparent)]
    Snapshot(#[from] InvalidSnapshot),
}

/// Interns table names so that events of one table share their `Arc<str>`s.
#[derive(Default)]
pub struct TableNames(HashMap<(Box<str>, Box<str>), TableName>);

impl TableNames {
    pub fn get(&mut self, schema: &str, name: &str) -> TableName {
        if let Some(found) = self.0.get(&(Box::from(schema), Box::from(name))) {
            return found.clone();
        }
        let table = TableName {
            schema: Arc::from(schema),
            name: Arc::from(name),
        };
        if self.0.len() < 10_000 {
            self.0.insert((schema.into(), name.into()), table.clone());
        }
        table
    }
}

impl Event {
    /// Decodes a row and serializes its frame:
    /// `{"type", "id", "table", "schema", "op", "credential_id", <row_key>, "old", "timestamp"}`.
    /// The row key holds the new row, or the deleted row for DELETE; `old` only on UPDATE.
    pub fn decode(row: &EventRow<'_>, tables: &mut TableNames) -> Result<Self, DecodeError> {
        let field = |field| DecodeError::Field { id: row.id, field };
        let op = Op::parse(row.op).ok_or_else(|| field("op"))?;
        let xid = row.xid.parse::<u64>().map_err(|_| field("xid"))?;
        let raw = |text: Option<&str>| -> Result<Option<Box<RawValue>>, DecodeError> {
            text.map(|t| {
                RawValue::from_string(t.to_owned())
                    .map_err(|error| DecodeError::Json { id: row.id, error })
            })
            .transpose()
        };
        let (subject, old) = match op {
            Op::Insert => (raw(row.new_row)?, None),
            Op::Update => (raw(row.new_row)?, raw(row.old_row)?),
            Op::Delete => (raw(row.old_row)?, None),
        };
        let subject = subject.ok_or_else(|| field("row image"))?;
        let frame = EventFrame {
            event_type: row.event_type,
            id: row.id,
            table: row.table_name,
            schema: row.table_schema,
            op: op.as_str(),
            credential_id: row.credential_id,
            row_key: row.row_key,
            row: &subject,
            old: old.as_deref(),
            timestamp: &format_timestamp(row.committed_at_micros),
        };
        let text = serde_json::to_string(&frame)
            .map_err(|error| DecodeError::Json { id: row.id, error })?;
        Ok(Self {
            id: EventId(row.id),
            xid,
            credential: CredentialId::from_database(row.credential_id),
            table: tables.get(row.table_schema, row.table_name),
            op,
            committed_at_micros: row.committed_at_micros,
            frame: Utf8Bytes::from(text),
        })
    }
}

struct EventFrame<'a> {
    event_type: &'a str,
    id: i64,
    table: &'a str,
    schema: &'a str,
    op: &'a str,
    credential_id: &'a str,
    row_key: &'a str,
    row: &'a RawValue,
    old: Option<&'a RawValue>,
    timestamp: &'a str,
}

impl Serialize for EventFrame<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("type", self.event_type)?;
        map.serialize_entry("id", &self.id)?;
        map.serialize_entry("table", self.table)?;
        map.serialize_entry("schema", self.schema)?;
        map.serialize_entry("op", self.op)?;
        map.serialize_entry("credential_id", self.credential_id)?;
        map.serialize_entry(self.row_key, self.row)?;
        if let Some(old) = self.old {
            map.serialize_entry("old", old)?;
        }
        map.serialize_entry("timestamp", self.timestamp)?;
        map.end()
    }
}

impl Event {
    /// An INSERT of `{}` into `public.<table>` on `credential`, by transaction `xid`: the
    /// event unit tests route.
    #[cfg(test)]
    pub fn for_test(id: i64, xid: u64, credential: &str, table: &str) -> Self {
        let xid = xid.to_string();
        let row = EventRow {
            id,
            xid: &xid,
            table_schema: "public",
            table_name: table,
            event_type: "position_update",
            row_key: "position",
            op: "INSERT",
            credential_id: credential,
            new_row: Some("{}"),
            old_row: None,
            committed_at_micros: 0,
        };
        match Self::decode(&row, &mut TableNames::default()) {
            Ok(event) => event,
            Err(error) => unreachable!("a valid test event: {error}"),
        }
    }
}

/// RFC 3339 UTC with microseconds, e.g. `2026-12-04T16:23:54.123456Z`.
pub fn format_timestamp(micros: i64) -> String {
    let micros = u64::try_from(micros).unwrap_or(0);
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_micros(micros);
    humantime::format_rfc3339_micros(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn row<'a>(op: &'a str, new_row: Option<&'a str>, old_row: Option<&'a str>) -> EventRow<'a> {
        EventRow {
            id: 1235,
            xid: "900",
            table_schema: "public",
            table_name: "positions",
            event_type: "position_update",
            row_key: "position",
            op,
            credential_id: "c-1",
            new_row,
            old_row,
            committed_at_micros: 1_796_400_000_123_456,
        }
    }

    fn frame(event: &Event) -> Value {
        serde_json::from_str(&event.frame).expect("frame is JSON")
    }

    #[test]
    fn an_update_carries_the_new_row_under_its_key_and_the_old_row() {
        let event = Event::decode(
            &row("UPDATE", Some(r#"{"qty": 2}"#), Some(r#"{"qty": 1}"#)),
            &mut TableNames::default(),
        )
        .expect("decodes");
        let value = frame(&event);
        assert_eq!(value["type"], "position_update");
        assert_eq!(value["id"], 1235);
        assert_eq!(value["table"], "positions");
        assert_eq!(value["schema"], "public");
        assert_eq!(value["op"], "UPDATE");
        assert_eq!(value["credential_id"], "c-1");
        assert_eq!(value["position"]["qty"], 2);
        assert_eq!(value["old"]["qty"], 1);
        assert_eq!(value["timestamp"], "2026-12-04T16:00:00.123456Z");
        assert!(event
            .frame
            .starts_with(r#"{"type":"position_update","id":1235,"#));
    }

    #[test]
    fn a_delete_carries_the_deleted_row_under_its_key_and_no_old() {
        let event = Event::decode(
            &row("DELETE", None, Some(r#"{"qty": 1}"#)),
            &mut TableNames::default(),
        )
        .expect("decodes");
        let value = frame(&event);
        assert_eq!(value["position"]["qty"], 1);
        assert!(value.get("old").is_none());
    }

    #[test]
    fn an_insert_has_no_old() {
        let event = Event::decode(
            &row("INSERT", Some(r#"{"qty": 3}"#), None),
            &mut TableNames::default(),
        )
        .expect("decodes");
        assert!(frame(&event).get("old").is_none());
    }

    #[test]
    fn malformed_rows_are_errors_not_panics() {
        let mut tables = TableNames::default();
        assert!(Event::decode(&row("MERGE", Some("{}"), None), &mut tables).is_err());
        assert!(Event::decode(&row("INSERT", None, None), &mut tables).is_err());
        assert!(Event::decode(&row("INSERT", Some("{not json"), None), &mut tables).is_err());
        let mut bad_xid = row("INSERT", Some("{}"), None);
        bad_xid.xid = "x";
        assert!(Event::decode(&bad_xid, &mut tables).is_err());
    }

    #[test]
    fn an_announcement_saw_only_events_committed_before_its_snapshot() {
        let announcement = Announcement {
            id: EventId(10),
            xid: 50,
            credential: None,
            user: None,
            snapshot: Snapshot::parse("40:50:45").expect("valid"),
        };
        let mut tables = TableNames::default();
        let mut event =
            Event::decode(&row("INSERT", Some("{}"), None), &mut tables).expect("decodes");
        event.xid = 44;
        assert!(announcement.saw_commit_of(&event));
        event.xid = 45; // still running when the announcement committed
        assert!(!announcement.saw_commit_of(&event));
        event.xid = 50; // the announcing transaction itself
        assert!(!announcement.saw_commit_of(&event));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2_000))]

            /// Whatever a row holds, decoding yields an event whose frame is valid JSON, or a
            /// decode error: never a panic.
            #[test]
            fn any_outbox_row_decodes_or_errs(
                id in any::<i64>(),
                xid in "[0-9a-z]{0,24}",
                op in "[A-Z]{0,8}",
                event_type in any::<String>(),
                row_key in any::<String>(),
                credential in any::<String>(),
                new_row in proptest::option::of(any::<String>()),
                old_row in proptest::option::of(any::<String>()),
                micros in any::<i64>(),
            ) {
                let row = EventRow {
                    id, xid: &xid, table_schema: "s", table_name: "t", event_type: &event_type,
                    row_key: &row_key, op: &op, credential_id: &credential,
                    new_row: new_row.as_deref(), old_row: old_row.as_deref(), committed_at_micros: micros,
                };
                if let Ok(event) = Event::decode(&row, &mut TableNames::default()) {
                    let parsed: Result<serde_json::Value, _> = serde_json::from_str(&event.frame);
                    prop_assert!(parsed.is_ok());
                }
            }
        }
    }
}
