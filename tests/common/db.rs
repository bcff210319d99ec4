//! Where tests get Postgres, and a fresh database per test.

use std::time::Duration;

use rls_relay::db::cluster::{ClusterOptions, LocalCluster};
use tokio::sync::OnceCell;
use tokio_postgres::{Client, NoTls};

/// The server every test of this binary uses.
pub struct Server {
    /// `postgres://…/` without a database name.
    base_url: String,
    _cluster: Option<LocalCluster>,
    _container: Option<Box<dyn std::any::Any + Send + Sync>>,
    pub description: String,
}

static SERVER: OnceCell<Server> = OnceCell::const_new();
static TEMPLATES: OnceCell<(String, String)> = OnceCell::const_new();

impl Server {
    pub fn url(&self, database: &str) -> String {
        format!("{}/{database}", self.base_url.trim_end_matches('/'))
    }
}

/// TEST_DATABASE_URL when set; else testcontainers where a Docker daemon answers; else a
/// throwaway cluster from the local binaries. Panics naming every path tried.
pub async fn server() -> &'static Server {
    SERVER
        .get_or_init(|| async {
            let mut tried = Vec::new();
            if let Ok(url) = std::env::var("TEST_DATABASE_URL") {
                let base = strip_database(&url);
                match tokio_postgres::connect(&format!("{base}/postgres"), NoTls).await {
                    Ok(_) => {
                        return Server {
                            base_url: base,
                            _cluster: None,
                            _container: None,
                            description: "TEST_DATABASE_URL".into(),
                        };
                    }
                    Err(error) => tried.push(format!("TEST_DATABASE_URL: {error}")),
                }
            }
            match container().await {
                Ok(server) => return server,
                Err(why) => tried.push(format!("testcontainers: {why}")),
            }
            match tokio::task::spawn_blocking(|| LocalCluster::start(&ClusterOptions::default()))
                .await
            {
                Ok(Ok(cluster)) => {
                    let base = cluster.url("");
                    Server {
                        base_url: base.trim_end_matches('/').to_owned(),
                        _cluster: Some(cluster),
                        _container: None,
                        description: "local initdb cluster".into(),
                    }
                }
                Ok(Err(error)) => {
                    tried.push(format!("local cluster: {error}"));
                    panic!(
                        "no Postgres for the tests; tried:\n  {}",
                        tried.join("\n  ")
                    )
                }
                Err(error) => panic!("local cluster start panicked: {error}"),
            }
        })
        .await
}

async fn container() -> Result<Server, String> {
    let docker_configured = std::env::var_os("DOCKER_HOST").is_some()
        || std::path::Path::new("/var/run/docker.sock").exists();
    if !docker_configured {
        return Err("no Docker daemon (no DOCKER_HOST, no /var/run/docker.sock)".into());
    }
    use testcontainers_modules::postgres::Postgres;
    use testcontainers_modules::testcontainers::runners::AsyncRunner;
    let container = Postgres::default()
        .with_host_auth()
        .start()
        .await
        .map_err(|e| e.to_string())?;
    let port = container
        .get_host_port_ipv4(5432)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Server {
        base_url: format!("postgres://postgres@127.0.0.1:{port}"),
        _cluster: None,
        _container: Some(Box::new(container)),
        description: "testcontainers".into(),
    })
}

fn strip_database(url: &str) -> String {
    match url.rsplit_once('/') {
        Some((base, _db)) if base.contains("://") && base.len() > "postgres://".len() => {
            base.to_owned()
        }
        _ => url.trim_end_matches('/').to_owned(),
    }
}

pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to the test database: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

const RELAY_SQL: &str = include_str!("../../sql/relay/V1__outbox_and_tracking.sql");
const EXAMPLE_SQL: &str = rls_relay::db::migrate::EXAMPLE_SCHEMA;

/// Two templates per server, built once: the relay's schema alone, and with the example.
async fn templates() -> &'static (String, String) {
    TEMPLATES
        .get_or_init(|| async {
            let server = server().await;
            let digest = {
                use std::hash::{Hash, Hasher};
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                RELAY_SQL.hash(&mut hasher);
                EXAMPLE_SQL.hash(&mut hasher);
                hasher.finish()
            };
            let relay_only = format!("rls_relay_tmpl_{digest:x}_relay");
            let example = format!("rls_relay_tmpl_{digest:x}_example");
            let admin = connect(&server.url("postgres")).await;
            admin
                .batch_execute("select pg_advisory_lock(7263521)")
                .await
                .expect("template lock");
            for (name, with_example) in [(&relay_only, false), (&example, true)] {
                // A template is complete once commented 'ready' (a run killed halfway
                // through leaves one without the comment, rebuilt here).
                let ready = admin
                    .query_opt(
                        "select 1 from pg_database d
                         where d.datname = $1 and shobj_description(d.oid, 'pg_database') = 'ready'",
                        &[name],
                    )
                    .await
                    .expect("pg_database")
                    .is_some();
                if ready {
                    continue;
                }
                for statement in [format!("drop database if exists {name} with (force)"), format!("create database {name}")] {
                    admin.batch_execute(&statement).await.expect("create template");
                }
                let mut client = connect(&server.url(name)).await;
                rls_relay::db::migrate::run(&mut client).await.expect("relay migrations");
                if with_example {
                    client.batch_execute(EXAMPLE_SQL).await.expect("example schema");
                }
                drop(client);
                admin
                    .batch_execute(&format!("comment on database {name} is 'ready'"))
                    .await
                    .expect("mark template ready");
            }
            admin
                .batch_execute("select pg_advisory_unlock(7263521)")
                .await
                .expect("template unlock");
            (relay_only, example)
        })
        .await
}

/// A database of its own for one test, dropped (WITH FORCE) when the test ends, along
/// with any role the test created.
pub struct TestDb {
    pub name: String,
    url: String,
    admin_url: String,
    roles: std::sync::Mutex<Vec<String>>,
}

impl TestDb {
    /// The relay's schema and the example trading schema.
    pub async fn example() -> Self {
        let (_, example) = templates().await;
        Self::clone_of(example).await
    }

    /// Only the relay's schema: for tests that bring their own application schema.
    pub async fn relay_only() -> Self {
        let (relay_only, _) = templates().await;
        Self::clone_of(relay_only).await
    }

    async fn clone_of(template: &str) -> Self {
        let server = server().await;
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let admin = connect(&server.url("postgres")).await;
        let mut attempts = 0;
        loop {
            match admin
                .batch_execute(&format!("create database {name} template {template}"))
                .await
            {
                Ok(()) => break,
                Err(error) if attempts < 50 => {
                    attempts += 1;
                    let _ = error;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => panic!("cannot clone {template}: {error}"),
            }
        }
        Self {
            url: server.url(&name),
            admin_url: server.url("postgres"),
            name,
            roles: Default::default(),
        }
    }

    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// A superuser connection to this database.
    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// A role unique to this test, dropped with the database.
    pub async fn create_role(&self, prefix: &str, attributes: &str) -> String {
        let name = format!(
            "{prefix}_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        self.client()
            .await
            .batch_execute(&format!("create role {name} {attributes}"))
            .await
            .expect("create role");
        self.roles.lock().expect("roles").push(name.clone());
        name
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin_url = self.admin_url.clone();
        let roles = std::mem::take(&mut *self.roles.lock().expect("roles"));
        // Drop runs inside a test's runtime: do the async cleanup on a thread of its own.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let Ok((admin, connection)) = tokio_postgres::connect(&admin_url, NoTls).await
                else {
                    return;
                };
                tokio::spawn(connection);
                let _ = admin
                    .batch_execute(&format!("drop database if exists {name} with (force)"))
                    .await;
                for role in roles {
                    let _ = admin
                        .batch_execute(&format!("drop role if exists {role}"))
                        .await;
                }
            });
        });
        let _ = cleanup.join();
    }
}
