//! Small value types that carry meaning through the pipeline. Each is parsed once at the
//! edge (a database row, a client message, a token) and trusted afterwards.

use std::fmt;
use std::sync::Arc;

/// Longest credential id accepted from a client. Real ids are uuids or integers; the bound
/// keeps a hostile `subscribe` from making the relay hash megabytes.
const MAX_CREDENTIAL_ID_LEN: usize = 256;

/// A credential (broker account) id in its text form: the routing key of every event.
///
/// Postgres gives it as text both from the outbox (`row ->> column`) and from the
/// visibility query (`id::text`), so a uuid, a bigint or a text key compare equal to what
/// a client sends. Cloning is a reference-count increment: the same id sits in the
/// routing index, visibility sets and every event.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CredentialId(Arc<str>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidCredentialId {
    #[error("credential id is empty")]
    Empty,
    #[error("credential id is longer than {MAX_CREDENTIAL_ID_LEN} bytes")]
    TooLong,
    #[error("credential id contains a control character")]
    ControlCharacter,
}

impl CredentialId {
    pub fn parse(raw: &str) -> Result<Self, InvalidCredentialId> {
        if raw.is_empty() {
            return Err(InvalidCredentialId::Empty);
        }
        if raw.len() > MAX_CREDENTIAL_ID_LEN {
            return Err(InvalidCredentialId::TooLong);
        }
        if raw.chars().any(char::is_control) {
            return Err(InvalidCredentialId::ControlCharacter);
        }
        Ok(Self(Arc::from(raw)))
    }

    /// For ids that come from Postgres itself (outbox rows, visibility results), which
    /// need no validation beyond being text.
    pub fn from_database(raw: &str) -> Self {
        Self(Arc::from(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for CredentialId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CredentialId({})", self.0)
    }
}

impl fmt::Display for CredentialId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An outbox id: global, increasing in the order ids were taken (not quite commit
/// order), and the client's resume cursor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct EventId(pub i64);

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The user a token speaks for (its `sub`, or the configured claim).
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct UserId(Arc<str>);

impl UserId {
    pub fn new(raw: &str) -> Self {
        Self(Arc::from(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tracked table as events name it: `table` and `schema` fields of the protocol.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct TableName {
    pub schema: Arc<str>,
    pub name: Arc<str>,
}

/// A table named in a `subscribe`: `positions` matches that table in any schema,
/// `public.positions` only the one.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct TableFilter {
    schema: Option<Box<str>>,
    name: Box<str>,
}

impl TableFilter {
    pub fn parse(raw: &str) -> Option<Self> {
        let valid = |part: &str| {
            !part.is_empty() && part.len() <= 63 && !part.chars().any(char::is_control)
        };
        match raw.split_once('.') {
            Some((schema, name)) if valid(schema) && valid(name) && !name.contains('.') => {
                Some(Self {
                    schema: Some(schema.into()),
                    name: name.into(),
                })
            }
            None if valid(raw) => Some(Self {
                schema: None,
                name: raw.into(),
            }),
            _ => None,
        }
    }

    pub fn matches(&self, table: &TableName) -> bool {
        *self.name == *table.name
            && self
                .schema
                .as_deref()
                .is_none_or(|schema| schema == &*table.schema)
    }
}

impl fmt::Display for TableFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_ids_from_clients_are_bounded_and_printable() {
        assert!(CredentialId::parse("6f1c0a52-3c1e-4b8e-9b1a-1f0e2d3c4b5a").is_ok());
        assert_eq!(CredentialId::parse(""), Err(InvalidCredentialId::Empty));
        assert_eq!(
            CredentialId::parse(&"x".repeat(257)),
            Err(InvalidCredentialId::TooLong)
        );
        assert_eq!(
            CredentialId::parse("a\nb"),
            Err(InvalidCredentialId::ControlCharacter)
        );
    }

    #[test]
    fn a_bare_table_name_matches_any_schema_and_a_qualified_one_only_its_own() {
        let positions = TableName {
            schema: "public".into(),
            name: "positions".into(),
        };
        let other = TableName {
            schema: "archive".into(),
            name: "positions".into(),
        };
        let bare = TableFilter::parse("positions").expect("valid");
        let qualified = TableFilter::parse("public.positions").expect("valid");
        assert!(bare.matches(&positions) && bare.matches(&other));
        assert!(qualified.matches(&positions) && !qualified.matches(&other));
        assert!(!TableFilter::parse("orders")
            .expect("valid")
            .matches(&positions));
    }

    #[test]
    fn malformed_table_names_are_refused() {
        for raw in ["", ".", "a.", ".b", "a.b.c", "tab\u{0}le"] {
            assert_eq!(TableFilter::parse(raw), None, "{raw:?}");
        }
    }
}
