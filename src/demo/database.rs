//! Where the demo gets Postgres: the database it was given, else a throwaway cluster from
//! the local server binaries, else a throwaway container where Docker answers. Whatever
//! it started is stopped and deleted when [`DemoDatabase`] is dropped.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::db::cluster::{self, ClusterOptions, LocalCluster};

/// The image of the Docker fallback.
const POSTGRES_IMAGE: &str = "postgres:16-alpine";

pub struct DemoDatabase {
    url: String,
    /// What the demo started, kept alive until drop.
    owned: Owned,
    pub description: String,
}

/// Held for their `Drop`, which stops and deletes the server.
#[allow(dead_code)]
enum Owned {
    Nothing,
    Cluster(LocalCluster),
    Container(Container),
}

impl DemoDatabase {
    /// `given`: a database URL to use as it is (it must not hold the example schema yet).
    pub async fn start(given: Option<&str>) -> anyhow::Result<Self> {
        if let Some(url) = given {
            return Ok(Self {
                url: url.to_owned(),
                owned: Owned::Nothing,
                description: "the database given in RELAY_DEMO_DATABASE_URL".into(),
            });
        }
        let local = tokio::task::spawn_blocking(|| LocalCluster::start(&ClusterOptions::default()))
            .await
            .context("starting the local cluster")?;
        let local_error = match local {
            Ok(cluster) => {
                let description = format!(
                    "a throwaway cluster in {} (port {})",
                    cluster.directory().display(),
                    cluster.port()
                );
                return Ok(Self {
                    url: cluster.url("postgres"),
                    owned: Owned::Cluster(cluster),
                    description,
                });
            }
            Err(error) => error,
        };
        if !docker_answers() {
            bail!(
                "no Postgres for the demo: {local_error}; and no Docker daemon answers. \
                 Install the PostgreSQL server (Debian: apt-get install postgresql), or set \
                 RELAY_DEMO_DATABASE_URL to an empty database"
            );
        }
        tracing::info!(%local_error, "no local Postgres binaries; starting a container");
        let container = tokio::task::spawn_blocking(Container::start)
            .await
            .context("starting the container")??;
        let url = format!("postgres://postgres@127.0.0.1:{}/postgres", container.port);
        cluster::wait_until_accepting(&url, Duration::from_secs(60))
            .await
            .context("waiting for the container's Postgres")?;
        Ok(Self {
            url,
            description: format!("a throwaway container {} ({POSTGRES_IMAGE})", container.id),
            owned: Owned::Container(container),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether dropping this removes a server the demo started.
    pub fn is_throwaway(&self) -> bool {
        !matches!(self.owned, Owned::Nothing)
    }
}

fn docker_answers() -> bool {
    Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A `docker run --rm` Postgres on a random loopback port; removed on drop.
struct Container {
    id: String,
    port: u16,
}

impl Container {
    fn start() -> anyhow::Result<Self> {
        let output = Command::new("docker")
            .args([
                "run",
                "--detach",
                "--rm",
                "--env",
                "POSTGRES_HOST_AUTH_METHOD=trust",
                "--publish",
                "127.0.0.1::5432",
                POSTGRES_IMAGE,
                "-c",
                "fsync=off",
            ])
            .stdin(Stdio::null())
            .output()
            .context("running docker")?;
        if !output.status.success() {
            bail!(
                "docker run failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let id = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        // From here on, dropping `container` removes it.
        let mut container = Self { id, port: 0 };
        let output = Command::new("docker")
            .args(["port", &container.id, "5432/tcp"])
            .output()
            .context("docker port")?;
        let mapping = String::from_utf8_lossy(&output.stdout);
        container.port = mapping
            .lines()
            .filter_map(|line| line.rsplit_once(':'))
            .find_map(|(_, port)| port.trim().parse().ok())
            .with_context(|| format!("cannot read the container's port from {mapping:?}"))?;
        Ok(container)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _removed = Command::new("docker")
            .args(["rm", "--force", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
