//! A throwaway Postgres cluster from the local binaries (`initdb`, `pg_ctl`), for the
//! demo, the tests and the benchmark: ~0.6 s to start, gone when dropped.
//!
//! `initdb` refuses to run as root, so as root the cluster runs as the `postgres` OS user
//! (through `runuser`). A watchdog process stops the cluster and deletes its directory if
//! the owning process dies without dropping it (a killed test run leaves nothing behind).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "no PostgreSQL server binaries found (looked for initdb in $RELAY_PG_BIN_DIR, \
         `pg_config --bindir` and /usr/lib/postgresql/*/bin); install postgresql or set RELAY_PG_BIN_DIR"
    )]
    BinariesNotFound,
    #[error("running as root and there is no `postgres` OS user to run the cluster as (initdb refuses root)")]
    NoUnprivilegedUser,
    #[error("{step} failed: {detail}")]
    Step { step: &'static str, detail: String },
}

/// Settings of a throwaway cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// `fsync = off` makes tests fast; a benchmark wants real commits.
    pub durable: bool,
    pub max_connections: u32,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            durable: false,
            max_connections: 300,
        }
    }
}

/// A running throwaway cluster. Trust authentication for `postgres` on 127.0.0.1 only.
#[derive(Debug)]
pub struct LocalCluster {
    bin_dir: PathBuf,
    data_dir: PathBuf,
    port: u16,
    run_as_postgres: bool,
}

impl LocalCluster {
    /// initdb + start; blocking (about half a second), so call it from a blocking context
    /// or `spawn_blocking`.
    pub fn start(options: &ClusterOptions) -> Result<Self, ClusterError> {
        let bin_dir = find_bin_dir().ok_or(ClusterError::BinariesNotFound)?;
        let run_as_postgres = is_root();
        if run_as_postgres && !user_exists("postgres") {
            return Err(ClusterError::NoUnprivilegedUser);
        }
        let base =
            std::env::temp_dir().join(format!("rls-relay-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&base).map_err(|e| step("creating the cluster directory", e))?;
        let cluster = Self {
            bin_dir,
            data_dir: base.join("data"),
            port: free_port().map_err(|e| step("finding a free port", e))?,
            run_as_postgres,
        };
        if run_as_postgres {
            run(
                Command::new("chown").arg("-R").arg("postgres").arg(&base),
                "chown of the cluster directory",
            )?;
        }
        run(
            cluster
                .pg_command("initdb")
                .args([
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "-D",
                ])
                .arg(&cluster.data_dir),
            "initdb",
        )?;
        cluster.spawn_watchdog(&base);
        cluster.pg_ctl_start(options)?;
        Ok(cluster)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory that holds the cluster (data, socket, log); deleted on drop.
    pub fn directory(&self) -> &Path {
        self.data_dir.parent().unwrap_or(&self.data_dir)
    }

    /// Connection string for `database` as the superuser `postgres`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// `pg_ctl restart -m fast`: every connection is cut, the data stays.
    pub fn restart(&self) -> Result<(), ClusterError> {
        // With a log file: a server writing to pg_ctl's stdout would keep our pipe open.
        run(
            self.pg_command("pg_ctl")
                .args(["-w", "-m", "fast", "-D"])
                .arg(&self.data_dir)
                .arg("-l")
                .arg(self.log_file())
                .arg("restart"),
            "pg_ctl restart",
        )
    }

    fn log_file(&self) -> PathBuf {
        self.data_dir
            .parent()
            .unwrap_or(&self.data_dir)
            .join("server.log")
    }

    /// `pg_ctl stop -m fast`.
    pub fn stop(&self) -> Result<(), ClusterError> {
        run(
            self.pg_command("pg_ctl")
                .args(["-w", "-m", "fast", "-D"])
                .arg(&self.data_dir)
                .arg("stop"),
            "pg_ctl stop",
        )
    }

    /// `pg_ctl start` again after [`stop`](Self::stop).
    pub fn start_again(&self) -> Result<(), ClusterError> {
        self.pg_ctl_start(&ClusterOptions::default())
    }

    fn pg_ctl_start(&self, options: &ClusterOptions) -> Result<(), ClusterError> {
        let socket_dir = self.data_dir.parent().unwrap_or(&self.data_dir);
        let mut server_options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections={} -c shared_buffers=128MB",
            self.port,
            socket_dir.display(),
            options.max_connections
        );
        if !options.durable {
            server_options
                .push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        let log = self.log_file();
        run(
            self.pg_command("pg_ctl")
                .args(["-w", "-t", "30", "-D"])
                .arg(&self.data_dir)
                .arg("-l")
                .arg(&log)
                .args(["-o", &server_options, "start"]),
            "pg_ctl start",
        )
    }

    fn pg_command(&self, program: &str) -> Command {
        let binary = self.bin_dir.join(program);
        let mut command = if self.run_as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(binary);
            c
        } else {
            Command::new(binary)
        };
        command.current_dir(std::env::temp_dir());
        command
    }

    /// A shell that waits for this process to exit, then stops the cluster and deletes it.
    /// It is how a cluster outlives neither a panic nor a SIGKILL of its owner.
    fn spawn_watchdog(&self, base: &Path) {
        let pg_ctl = self.bin_dir.join("pg_ctl");
        let stop = if self.run_as_postgres {
            format!(
                "runuser -u postgres -- '{}' -D '{}' -m immediate stop",
                pg_ctl.display(),
                self.data_dir.display()
            )
        } else {
            format!(
                "'{}' -D '{}' -m immediate stop",
                pg_ctl.display(),
                self.data_dir.display()
            )
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf '{base}'",
            pid = std::process::id(),
            base = base.display(),
        );
        // In a session of its own (setsid), so that killing the owner's process group, as
        // a test runner or CI does on a timeout, does not kill the watchdog with it.
        let mut command = if Path::new("/usr/bin/setsid").exists() {
            let mut c = Command::new("/usr/bin/setsid");
            c.arg("sh");
            c
        } else {
            Command::new("sh")
        };
        let spawned = command
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start the cluster watchdog; a killed process would leave the cluster running");
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _stopped = self
            .pg_command("pg_ctl")
            .args(["-w", "-m", "immediate", "-D"])
            .arg(&self.data_dir)
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(base) = self.data_dir.parent() {
            let _removed = std::fs::remove_dir_all(base);
        }
    }
}

fn step(step: &'static str, error: impl std::fmt::Display) -> ClusterError {
    ClusterError::Step {
        step,
        detail: error.to_string(),
    }
}

fn run(command: &mut Command, what: &'static str) -> Result<(), ClusterError> {
    let output = command.output().map_err(|e| step(what, e))?;
    if output.status.success() {
        Ok(())
    } else {
        let mut detail = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        if detail.is_empty() {
            detail = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        }
        Err(step(what, format!("{} ({})", detail, output.status)))
    }
}

fn find_bin_dir() -> Option<PathBuf> {
    let has_initdb = |dir: &Path| dir.join("initdb").is_file();
    if let Some(dir) = std::env::var_os("RELAY_PG_BIN_DIR").map(PathBuf::from) {
        return has_initdb(&dir).then_some(dir);
    }
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if output.status.success() && has_initdb(&dir) {
            return Some(dir);
        }
    }
    let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let dir = entry.path().join("bin");
            has_initdb(&dir).then_some((version, dir))
        })
        .collect();
    candidates.sort();
    candidates.pop().map(|(_, dir)| dir)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn user_exists(name: &str) -> bool {
    Command::new("id")
        .arg("-u")
        .arg(name)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until the cluster accepts connections (pg_ctl -w already waits; this covers a
/// restart racing a test's first query).
pub async fn wait_until_accepting(url: &str, timeout: Duration) -> Result<(), ClusterError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            Ok(_) => return Ok(()),
            Err(error) if tokio::time::Instant::now() >= deadline => {
                return Err(step("waiting for the cluster", error))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
