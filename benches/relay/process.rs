//! The relay as a separate process (the release binary, configured through its
//! environment, as it is deployed), and what /proc says about processes: resident memory
//! and CPU time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rls_relay::config::WakeupMode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The binary `cargo bench` built beside this benchmark (target/release/rls-relay).
pub const RELAY_BINARY: &str = env!("CARGO_BIN_EXE_rls-relay");

/// HS256 secret shared by the relay and the benchmark's token minting.
pub const JWT_SECRET: &str = "benchmark-secret-that-is-long-enough-for-hs256";

pub struct RelaySettings {
    pub database_url: String,
    pub wakeup: WakeupMode,
    pub max_connections_per_user: usize,
    pub log_path: PathBuf,
}

/// A running `rls-relay serve`. Killed when dropped, so a failed benchmark leaves no
/// relay behind.
pub struct RelayProcess {
    child: Child,
    pub addr: SocketAddr,
    pub log_path: PathBuf,
}

impl RelayProcess {
    pub async fn start(settings: &RelaySettings) -> anyhow::Result<Self> {
        let addr: SocketAddr = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
            probe.local_addr()?
        };
        let log = std::fs::File::create(&settings.log_path)
            .with_context(|| format!("creating {}", settings.log_path.display()))?;
        let mut command = Command::new(RELAY_BINARY);
        // Only what is set here: a RELAY_* variable of the caller's shell must not change
        // what is measured.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("RELAY_") {
                command.env_remove(name);
            }
        }
        let wakeup = match settings.wakeup {
            WakeupMode::Adaptive => "adaptive",
            WakeupMode::Notify => "notify",
        };
        command
            .arg("serve")
            .env("DATABASE_URL", &settings.database_url)
            .env("RELAY_JWT_SECRET", JWT_SECRET)
            .env("RELAY_LISTEN_ADDR", addr.to_string())
            .env("RELAY_WAKEUP", wakeup)
            .env(
                "RELAY_MAX_CONNECTIONS_PER_USER",
                settings.max_connections_per_user.to_string(),
            )
            .env("RELAY_SHUTDOWN_TIMEOUT", "5s")
            .env("RELAY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = command
            .spawn()
            .with_context(|| format!("starting {RELAY_BINARY}"))?;
        let relay = Self {
            child,
            addr,
            log_path: settings.log_path.clone(),
        };
        relay.wait_ready(Duration::from_secs(30)).await?;
        Ok(relay)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn wait_ready(&self, patience: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + patience;
        loop {
            if let Ok((200, _)) = http_get(self.addr, "/readyz").await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the relay was not ready within {patience:?}; its log: {}",
                    self.log_path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Resident memory (VmRSS), in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        rss_kib(self.pid())
    }

    /// Every `relay_*` sample of GET /metrics, labels summed away.
    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        let (status, body) = http_get(self.addr, "/metrics").await?;
        if status != 200 {
            bail!("GET /metrics answered {status}");
        }
        Ok(Metrics::parse(&body))
    }

    /// SIGTERM, as an orchestrator would stop it; SIGKILL if it outstays its shutdown
    /// timeout.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        Ok(())
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Counters read from /metrics, by metric name (labels summed).
#[derive(Clone, Debug, Default)]
pub struct Metrics(HashMap<String, f64>);

impl Metrics {
    fn parse(text: &str) -> Self {
        let mut values = HashMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let mut parts = line.split_whitespace();
            let (Some(series), Some(value)) = (parts.next(), parts.next()) else {
                continue;
            };
            let name = series.split('{').next().unwrap_or(series);
            if let Ok(value) = value.parse::<f64>() {
                *values.entry(name.to_owned()).or_insert(0.0) += value;
            }
        }
        Self(values)
    }

    pub fn get(&self, name: &str) -> f64 {
        self.0.get(name).copied().unwrap_or(0.0)
    }

    /// `self - earlier` for one counter.
    pub fn delta(&self, earlier: &Self, name: &str) -> f64 {
        self.get(name) - earlier.get(name)
    }
}

/// A minimal HTTP/1.1 GET: status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/<pid>/status")
}

/// Fields of /proc/<pid>/stat after the command name (which may contain spaces).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    Some(after.split_whitespace().map(str::to_owned).collect())
}

pub fn parent_pid(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// utime + stime of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let Some(fields) = stat_fields(pid) else {
        return 0;
    };
    // After the name: state(0) ppid(1) … utime(11) stime(12).
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

/// CPU ticks of a postmaster and all its children (backends, walwriter, …).
pub fn postgres_cpu_ticks(postmaster: u32) -> u64 {
    let mut total = cpu_ticks(postmaster);
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return total;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if parent_pid(pid) == Some(postmaster) {
            total += cpu_ticks(pid);
        }
    }
    total
}

pub fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU used by each party between two samples.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuSample {
    pub postgres: u64,
    pub relay: u64,
    pub bench: u64,
    pub at: Option<Instant>,
}

impl CpuSample {
    pub fn take(postmaster: Option<u32>, relay: Option<u32>) -> Self {
        Self {
            postgres: postmaster.map_or(0, postgres_cpu_ticks),
            relay: relay.map_or(0, cpu_ticks),
            bench: cpu_ticks(std::process::id()),
            at: Some(Instant::now()),
        }
    }
}

/// Cores busy on average (CPU seconds per second) between two samples.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuUse {
    pub postgres: f64,
    pub relay: f64,
    pub bench: f64,
    /// Relay CPU seconds in the interval, for per-message costs.
    pub relay_seconds: f64,
}

impl CpuUse {
    pub fn between(before: &CpuSample, after: &CpuSample, ticks_per_second: f64) -> Self {
        let seconds = match (before.at, after.at) {
            (Some(a), Some(b)) => b.duration_since(a).as_secs_f64().max(1e-9),
            _ => return Self::default(),
        };
        let cores = |a: u64, b: u64| b.saturating_sub(a) as f64 / ticks_per_second / seconds;
        Self {
            postgres: cores(before.postgres, after.postgres),
            relay: cores(before.relay, after.relay),
            bench: cores(before.bench, after.bench),
            relay_seconds: after.relay.saturating_sub(before.relay) as f64 / ticks_per_second,
        }
    }
}

/// The soft limit on open files of this process (the relay inherits it).
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}
