//! The start-up audit (`rls-relay check`, and before `serve` accepts a socket): the relay
//! refuses to serve when Postgres would not actually filter what it relays. Each finding
//! names the exact statement that fixes it.

use std::fmt;

use serde_json::Value;
use tokio_postgres::Client;

use crate::config::quote_identifier;
use crate::visibility::VisibilityQuery;

/// Something that makes RLS not hold, and the statement that fixes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\n    fix: {}", self.problem, self.fix)
    }
}

/// What the audit saw.
#[derive(Debug, Default)]
pub struct AuditReport {
    /// Each one is a reason to refuse to serve.
    pub findings: Vec<Finding>,
    /// Worth a look, not a refusal.
    pub warnings: Vec<String>,
    /// `schema.table` of every table whose changes become events.
    pub event_tables: Vec<String>,
    /// `schema.table` of every table announcing visibility changes.
    pub visibility_tables: Vec<String>,
}

impl AuditReport {
    pub fn passed(&self) -> bool {
        self.findings.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("the audit could not query the database: {0}")]
    Postgres(#[from] tokio_postgres::Error),
}

struct RelationFacts {
    name: String,
    rls_enabled: bool,
    rls_forced: bool,
    owned_by_role: bool,
    role_can_select: bool,
}

/// Runs every check; database errors (not findings) are returned as errors.
pub async fn run(
    client: &mut Client,
    visibility: &VisibilityQuery,
) -> Result<AuditReport, AuditError> {
    let mut report = AuditReport::default();
    let role = visibility.role();

    let Some(role_row) = client
        .query_opt(
            "select rolsuper, rolbypassrls from pg_roles where rolname = $1",
            &[&role],
        )
        .await?
    else {
        report.findings.push(Finding {
            problem: format!("RELAY_DB_ROLE {role:?} does not exist"),
            fix: format!(
                "CREATE ROLE {} NOLOGIN NOBYPASSRLS; (the role your REST API uses), or set RELAY_DB_ROLE",
                quote_identifier(role)
            ),
        });
        return Ok(report);
    };
    let quoted = quote_identifier(role);
    if role_row.get::<_, bool>(0) {
        report.findings.push(Finding {
            problem: format!(
                "RELAY_DB_ROLE {role:?} is a superuser: superusers bypass every RLS policy"
            ),
            fix: format!("ALTER ROLE {quoted} NOSUPERUSER;"),
        });
    }
    if role_row.get::<_, bool>(1) {
        report.findings.push(Finding {
            problem: format!(
                "RELAY_DB_ROLE {role:?} has BYPASSRLS: RLS policies do not apply to it"
            ),
            fix: format!("ALTER ROLE {quoted} NOBYPASSRLS;"),
        });
    }

    let login: String = client
        .query_one("select current_user::text", &[])
        .await?
        .get(0);
    let can_set_role = {
        let transaction = client.transaction().await?;
        let switched = transaction
            .batch_execute(&format!("set local role {quoted}"))
            .await
            .is_ok();
        drop(transaction); // rolls back
        switched
    };
    if !can_set_role {
        report.findings.push(Finding {
            problem: format!("the relay's login {login:?} cannot SET ROLE to {role:?}"),
            fix: format!("GRANT {quoted} TO {};", quote_identifier(&login)),
        });
        return Ok(report);
    }

    if client
        .query_one("select to_regclass('relay.outbox') is null", &[])
        .await?
        .get::<_, bool>(0)
    {
        report.findings.push(Finding {
            problem: "the relay's schema is not installed in this database".into(),
            fix: "rls-relay migrate".into(),
        });
        return Ok(report);
    }

    let tracked = client
        .query(
            "select t.kind, format('%I.%I', n.nspname, c.relname), c.relrowsecurity, c.relforcerowsecurity,
                    pg_has_role($1, c.relowner, 'USAGE'), has_table_privilege($1, c.oid, 'SELECT')
             from relay.tracked t
             join pg_class c on c.oid = t.tbl
             join pg_namespace n on n.oid = c.relnamespace
             order by 1, 2",
            &[&role],
        )
        .await?;
    for row in &tracked {
        let kind: &str = row.get(0);
        let facts = RelationFacts {
            name: row.get(1),
            rls_enabled: row.get(2),
            rls_forced: row.get(3),
            owned_by_role: row.get(4),
            role_can_select: row.get(5),
        };
        if kind == "events" {
            report.event_tables.push(facts.name.clone());
            check_relation(&mut report, &facts, role, "a tracked table");
        } else {
            report.visibility_tables.push(facts.name.clone());
            // A table the policies read through SECURITY DEFINER functions may be
            // unreadable by the role and need no RLS; one the role can read must have it.
            if facts.role_can_select {
                check_relation(&mut report, &facts, role, "a visibility table");
            }
        }
    }
    if report.event_tables.is_empty() {
        report.warnings.push(
            "no table is tracked yet: call relay.track_events(...) for the tables whose changes clients should receive"
                .into(),
        );
    }

    check_visibility_query(client, visibility, role, &mut report).await?;
    Ok(report)
}

fn check_relation(report: &mut AuditReport, facts: &RelationFacts, role: &str, what: &str) {
    let name = &facts.name;
    if !facts.rls_enabled {
        report.findings.push(Finding {
            problem: format!(
                "row-level security is off on {name}, {what}: {role:?} would see every row"
            ),
            fix: format!("ALTER TABLE {name} ENABLE ROW LEVEL SECURITY; (and create its policies)"),
        });
    } else if facts.owned_by_role && !facts.rls_forced {
        report.findings.push(Finding {
            problem: format!(
                "{role:?} owns {name}, {what}, and owners bypass RLS unless it is forced"
            ),
            fix: format!("ALTER TABLE {name} FORCE ROW LEVEL SECURITY;"),
        });
    }
}

/// The visibility query must run as the role, return one column, and read only tables
/// that RLS filters: EXPLAIN (as the role, so policies are expanded) names every
/// relation it touches.
async fn check_visibility_query(
    client: &mut Client,
    visibility: &VisibilityQuery,
    role: &str,
    report: &mut AuditReport,
) -> Result<(), AuditError> {
    let transaction = client.build_transaction().read_only(true).start().await?;
    transaction
        .batch_execute(&visibility.set_role_statement())
        .await?;
    let plan = match transaction
        .query_one(
            &format!("explain (format json) {}", visibility.wrapped_sql()),
            &[],
        )
        .await
    {
        Ok(row) => row.get::<_, Value>(0),
        Err(error) => {
            report.findings.push(Finding {
                problem: format!("RELAY_VISIBILITY_SQL does not run as {role:?}: {}", describe(&error)),
                fix: "set RELAY_VISIBILITY_SQL to a query returning one column of credential ids, readable by RELAY_DB_ROLE, e.g. select id from public.credentials".into(),
            });
            return Ok(());
        }
    };
    let mut relations = Vec::new();
    collect_relations(&plan, &mut relations);
    relations.sort();
    relations.dedup();
    for (schema, table) in relations {
        if schema == "pg_catalog" || schema == "information_schema" {
            continue;
        }
        let row = transaction
            .query_one(
                "select format('%I.%I', n.nspname, c.relname), c.relrowsecurity, c.relforcerowsecurity,
                        pg_has_role($1, c.relowner, 'USAGE')
                 from pg_class c join pg_namespace n on n.oid = c.relnamespace
                 where n.nspname = $2 and c.relname = $3",
                &[&role, &schema, &table],
            )
            .await?;
        let facts = RelationFacts {
            name: row.get(0),
            rls_enabled: row.get(1),
            rls_forced: row.get(2),
            owned_by_role: row.get(3),
            role_can_select: true,
        };
        check_relation(report, &facts, role, "read by RELAY_VISIBILITY_SQL");
    }

    // With no claims at all, a policy should show nothing.
    transaction
        .query_one(
            "select set_config($1, '', true)",
            &[&visibility.claims_setting()],
        )
        .await?;
    match transaction.query(visibility.wrapped_sql(), &[]).await {
        Ok(rows) if !rows.is_empty() => report.warnings.push(format!(
            "RELAY_VISIBILITY_SQL returns {} credential(s) to a session without claims: check that the policies require a user",
            rows.len()
        )),
        Ok(_) => {}
        Err(error) => report.findings.push(Finding {
            problem: format!("RELAY_VISIBILITY_SQL fails as {role:?} without claims: {}", describe(&error)),
            fix: "make the policies treat missing claims as \"no user\" (e.g. nullif(current_setting(..., true), '')::jsonb)".into(),
        }),
    }
    transaction.rollback().await?;
    Ok(())
}

/// Every `(Schema, Relation Name)` in an EXPLAIN (FORMAT JSON) plan, subplans included.
fn collect_relations(node: &Value, out: &mut Vec<(String, String)>) {
    match node {
        Value::Object(map) => {
            if let (Some(Value::String(schema)), Some(Value::String(table))) =
                (map.get("Schema"), map.get("Relation Name"))
            {
                out.push((schema.clone(), table.clone()));
            }
            map.values().for_each(|v| collect_relations(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_relations(v, out)),
        _ => {}
    }
}

fn describe(error: &tokio_postgres::Error) -> String {
    error
        .as_db_error()
        .map(|db| db.message().to_owned())
        .unwrap_or_else(|| error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relations_are_found_anywhere_in_a_plan() {
        let plan: Value = serde_json::json!([{"Plan": {"Node Type": "Seq Scan", "Schema": "public", "Relation Name": "credentials",
            "Plans": [{"Node Type": "Index Scan", "Schema": "public", "Relation Name": "credential_members", "Parent Relationship": "SubPlan"}]}}]);
        let mut found = Vec::new();
        collect_relations(&plan, &mut found);
        assert_eq!(
            found,
            vec![
                ("public".into(), "credentials".into()),
                ("public".into(), "credential_members".into())
            ]
        );
    }
}
