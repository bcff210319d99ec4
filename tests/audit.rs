//! The start-up audit (SPEC §3): the relay refuses to serve when Postgres would not
//! filter what it relays, and names the fix.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::relay::config;
use common::TestDb;
use rls_relay::config::ServeConfig;
use rls_relay::startup::{self, Application, StartupError};

async fn findings(config: &ServeConfig) -> Vec<String> {
    startup::audit(config)
        .await
        .expect("the audit runs")
        .findings
        .iter()
        .map(|f| f.to_string())
        .collect()
}

fn with_role(db: &TestDb, role: &str) -> ServeConfig {
    let mut config = config(&db.url());
    config.visibility.db_role = role.to_owned();
    config
}

fn assert_one_finding(findings: &[String], problem: &str, fix: &str) {
    assert_eq!(findings.len(), 1, "{findings:#?}");
    assert!(findings[0].contains(problem), "{findings:#?}");
    assert!(findings[0].contains(fix), "{findings:#?}");
}

#[tokio::test]
async fn the_example_schema_passes() {
    let db = TestDb::example().await;
    let report = startup::audit(&config(&db.url())).await.expect("audit");
    assert!(report.passed(), "{:#?}", report.findings);
    assert_eq!(
        report.event_tables,
        vec!["public.balances", "public.orders", "public.positions"],
        "tracked tables are read from the triggers"
    );
    assert!(report.warnings.is_empty(), "{:#?}", report.warnings);
}

#[tokio::test]
async fn a_superuser_role_is_refused() {
    let db = TestDb::example().await;
    let role = db.create_role("su", "superuser nologin").await;
    assert_one_finding(
        &findings(&with_role(&db, &role)).await,
        "is a superuser",
        "NOSUPERUSER",
    );
}

#[tokio::test]
async fn a_bypassrls_role_is_refused() {
    let db = TestDb::example().await;
    let role = db.create_role("bypass", "bypassrls nologin").await;
    db.client()
        .await
        .batch_execute(&format!("grant select on all tables in schema public to {role}; grant usage on schema app to {role}; grant execute on function app.current_user_id() to {role}"))
        .await
        .expect("grants");
    assert_one_finding(
        &findings(&with_role(&db, &role)).await,
        "has BYPASSRLS",
        "NOBYPASSRLS",
    );
}

#[tokio::test]
async fn a_role_owning_a_tracked_table_without_force_is_refused() {
    let db = TestDb::example().await;
    let client = db.client().await;
    client
        .batch_execute("alter table positions no force row level security; alter table positions owner to app_user")
        .await
        .expect("misconfigure");
    assert_one_finding(
        &findings(&config(&db.url())).await,
        "owns public.positions",
        "ALTER TABLE public.positions FORCE ROW LEVEL SECURITY;",
    );
}

#[tokio::test]
async fn rls_off_on_a_tracked_table_is_refused() {
    let db = TestDb::example().await;
    db.client()
        .await
        .batch_execute("alter table orders disable row level security")
        .await
        .expect("misconfigure");
    assert_one_finding(
        &findings(&config(&db.url())).await,
        "row-level security is off on public.orders",
        "ALTER TABLE public.orders ENABLE ROW LEVEL SECURITY;",
    );
}

#[tokio::test]
async fn rls_off_on_the_table_the_visibility_query_reads_is_refused() {
    let db = TestDb::example().await;
    db.client()
        .await
        .batch_execute("alter table credentials disable row level security")
        .await
        .expect("misconfigure");
    let found = findings(&config(&db.url())).await;
    assert!(
        found.iter().any(
            |f| f.contains("row-level security is off on public.credentials")
                && f.contains("ALTER TABLE public.credentials ENABLE ROW LEVEL SECURITY;")
        ),
        "{found:#?}"
    );
}

#[tokio::test]
async fn a_login_that_cannot_set_role_is_refused() {
    let db = TestDb::example().await;
    let login = db.create_role("relay_login", "login").await;
    let url = db.url().replacen("postgres@", &format!("{login}@"), 1);
    assert_one_finding(
        &findings(&config(&url)).await,
        "cannot SET ROLE to \"app_user\"",
        &format!("GRANT \"app_user\" TO \"{login}\";"),
    );
}

#[tokio::test]
async fn a_missing_role_or_an_unmigrated_database_is_refused() {
    let db = TestDb::example().await;
    assert_one_finding(
        &findings(&with_role(&db, "no_such_role_here")).await,
        "does not exist",
        "CREATE ROLE",
    );
    let bare = TestDb::relay_only().await;
    bare.client()
        .await
        .batch_execute("drop schema relay cascade")
        .await
        .expect("unmigrate");
    bare.client()
        .await
        .batch_execute("do $$ begin if not exists (select 1 from pg_roles where rolname = 'app_user') then create role app_user nologin; end if; end $$")
        .await
        .expect("role");
    assert_one_finding(
        &findings(&config(&bare.url())).await,
        "not installed",
        "rls-relay migrate",
    );
}

#[tokio::test]
async fn serve_refuses_to_start_when_the_audit_fails() {
    let db = TestDb::example().await;
    let role = db.create_role("su", "superuser nologin").await;
    match Application::build(with_role(&db, &role)).await {
        Err(StartupError::Refused(report)) => assert!(!report.passed()),
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("a superuser role must be refused"),
    }
}

#[tokio::test]
async fn the_check_command_exits_non_zero_and_prints_the_fix() {
    let db = TestDb::example().await;
    let ok = std::process::Command::new(env!("CARGO_BIN_EXE_rls-relay"))
        .args(["check"])
        .env("DATABASE_URL", db.url())
        .env("RELAY_JWT_SECRET", common::tokens::SECRET)
        .output()
        .expect("run rls-relay check");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("ok:"));

    db.client()
        .await
        .batch_execute("alter table balances disable row level security")
        .await
        .expect("misconfigure");
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_rls-relay"))
        .args(["check"])
        .env("DATABASE_URL", db.url())
        .env("RELAY_JWT_SECRET", common::tokens::SECRET)
        .output()
        .expect("run rls-relay check");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("ALTER TABLE public.balances ENABLE ROW LEVEL SECURITY;"),
        "{stderr}"
    );
}
