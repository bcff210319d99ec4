//! The relay as a separate process (the built binary), for tests that kill it or measure
//! its memory.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::tokens::SECRET;

pub struct RelayProcess {
    child: Child,
    pub port: u16,
}

impl RelayProcess {
    /// Starts `rls-relay serve` on `database_url` (and a free port, unless `port` is
    /// given), with `env` on top of the test defaults, and waits until /readyz says ready.
    pub async fn start(database_url: &str, port: Option<u16>, env: &[(&str, &str)]) -> Self {
        let port = port.unwrap_or_else(free_port);
        let mut command = Command::new(env!("CARGO_BIN_EXE_rls-relay"));
        command
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", database_url)
            .env("RELAY_JWT_SECRET", SECRET)
            .env("RELAY_LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("RELAY_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().expect("spawn rls-relay");
        let process = Self { child, port };
        process.wait_ready().await;
        process
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Ok((200, _))) = tokio::time::timeout(
                Duration::from_secs(2),
                super::http::try_request(self.port, "GET", "/readyz", None),
            )
            .await
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "relay process not ready in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no shutdown, no cleanup.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Resident set size, KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
