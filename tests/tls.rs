//! TLS to Postgres: encrypted as libpq's `sslmode` says, and, with
//! RELAY_DATABASE_CA_FILE, the server's certificate verified (chain and host name).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::tokens::token;
use common::{TestRelay, WsClient};
use rls_relay::db::cluster::{ClusterOptions, LocalCluster};
use rls_relay::startup::Application;

fn openssl(args: &[&str], dir: &Path) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A certificate authority `<name>-ca.crt`, and a server certificate for 127.0.0.1 that it
/// signed (`<name>.crt`, `<name>.key`), in `dir`. Returns the CA's path.
fn certificates(dir: &Path, name: &str) -> PathBuf {
    let ca = format!("{name}-ca");
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={ca}"),
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.crt"),
        ],
        dir,
    );
    openssl(
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
        dir,
    );
    std::fs::write(
        dir.join(format!("{name}.ext")),
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.crt"),
        ],
        dir,
    );
    dir.join(format!("{ca}.crt"))
}

/// A cluster of the test's own with ssl = on, the example schema, and the CA that signed
/// its certificate.
async fn cluster_with_tls() -> (LocalCluster, PathBuf, tempdir::Dir) {
    let cluster = tokio::task::spawn_blocking(|| LocalCluster::start(&ClusterOptions::default()))
        .await
        .unwrap()
        .expect("own cluster");
    let keys = tempdir::Dir::new();
    let ca = certificates(keys.path(), "server");
    let (cert, key) = (
        keys.path().join("server.crt"),
        keys.path().join("server.key"),
    );
    // The server's key: owned by the server's OS user, readable by it alone.
    let data = cluster.directory().join("data");
    for (from, to) in [(&cert, "server.crt"), (&key, "server.key")] {
        std::fs::copy(from, data.join(to)).unwrap();
    }
    Command::new("chmod")
        .arg("600")
        .arg(data.join("server.key"))
        .status()
        .unwrap();
    let _ = Command::new("chown")
        .arg("postgres")
        .arg(data.join("server.key"))
        .arg(data.join("server.crt"))
        .status();
    let admin = common::db::connect(&cluster.url("postgres")).await;
    for statement in [
        "alter system set ssl = on",
        "select pg_reload_conf()",
        "create database app",
    ] {
        admin.batch_execute(statement).await.unwrap_or_else(|e| {
            panic!(
                "{statement}: {:?}",
                e.as_db_error().map(|d| d.message().to_owned())
            )
        });
    }

    {
        let mut client = common::db::connect(&cluster.url("app")).await;
        rls_relay::db::migrate::run(&mut client).await.unwrap();
        client
            .batch_execute(rls_relay::db::migrate::EXAMPLE_SCHEMA)
            .await
            .unwrap();
        client
            .batch_execute("insert into users values ('alice', 'Alice')")
            .await
            .unwrap();
    }
    (cluster, ca, keys)
}

/// Whether every relay connection to `url`'s server is encrypted.
async fn relay_connections_encrypted(url: &str) -> (usize, bool) {
    let client = common::db::connect(url).await;
    let rows = client
        .query(
            "select s.ssl from pg_stat_activity a join pg_stat_ssl s using (pid)
             where a.application_name like 'rls-relay%'",
            &[],
        )
        .await
        .unwrap();
    (rows.len(), rows.iter().all(|r| r.get::<_, bool>(0)))
}

#[tokio::test]
async fn sslmode_require_encrypts_every_relay_connection() {
    let (cluster, _ca, _keys) = cluster_with_tls().await;
    let relay = TestRelay::start(&format!("{}?sslmode=require", cluster.url("app"))).await;
    let mut alice = WsClient::connect(&relay, &token("alice")).await;
    alice.subscribe_all().await;
    let (count, encrypted) = relay_connections_encrypted(&cluster.url("app")).await;
    assert!(count >= 2, "the listener and a pooled connection: {count}");
    assert!(encrypted);
}

#[tokio::test]
async fn a_trusted_ca_file_verifies_the_server_and_another_refuses_it() {
    let (cluster, ca, keys) = cluster_with_tls().await;
    let mut config = common::relay::config(&format!("{}?sslmode=require", cluster.url("app")));
    config.database.database_ca_file = Some(ca.display().to_string());
    let relay = TestRelay::start_with(config.clone()).await;
    WsClient::connect(&relay, &token("alice")).await;
    assert!(relay_connections_encrypted(&cluster.url("app")).await.1);

    let other = certificates(keys.path(), "other");
    config.database.database_ca_file = Some(other.display().to_string());
    match Application::build(config).await {
        Err(error) => {
            let message = format!("{error:?}");
            assert!(message.to_lowercase().contains("certificate"), "{message}");
        }
        Ok(_) => panic!("a server whose certificate is not trusted must be refused"),
    }
}

/// A temporary directory, removed on drop.
mod tempdir {
    pub struct Dir(std::path::PathBuf);

    impl Dir {
        pub fn new() -> Self {
            let path = std::env::temp_dir()
                .join(format!("rls-relay-tls-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
