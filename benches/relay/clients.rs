//! The receiving side: a fleet of WebSocket clients (authenticated with a Bearer token,
//! subscribed to everything their user may see) that log every event id with its arrival
//! time, and a bare tokio-postgres LISTEN client, the delivery floor.
//!
//! Clients do as little as a client can: an event's id is read from the frame's head
//! (`{"type":…,"id":N,…`) without parsing the rest, so that the benchmark's own CPU stays
//! small next to the relay's on a machine where they share two cores.

use std::future::poll_fn;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use crate::writers::now_micros;

type Socket = WebSocketStream<TcpStream>;

/// Source addresses the clients bind to, round robin: each has its own ephemeral port
/// range, so thousands of sockets (and the TIME_WAIT of earlier phases) never run out.
const SOURCE_ADDRESSES: u8 = 16;

/// What one socket received.
#[derive(Default)]
pub struct SocketLog {
    /// (event id, arrival time in microseconds since the epoch).
    pub events: Vec<(i64, i64)>,
    /// Replies and other non-event messages after `subscribed`.
    pub others: u64,
    /// Why the socket ended, if it did before the benchmark closed it.
    pub ended: Option<String>,
}

pub struct Client {
    pub user: usize,
    pub log: Arc<Mutex<SocketLog>>,
}

/// Sockets of one phase, and totals they keep up to date.
pub struct Fleet {
    pub clients: Vec<Client>,
    /// Events received by all sockets.
    pub received: Arc<AtomicU64>,
    /// Arrival time of the last event (microseconds since the epoch).
    pub last_arrival: Arc<AtomicI64>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl Fleet {
    /// Opens `users.len()` sockets, `concurrency` at a time; `users[i]` is the user of
    /// socket i and `tokens[user]` its token. Returns when every socket is subscribed.
    pub async fn connect(
        relay: SocketAddr,
        users: &[usize],
        tokens: &[String],
        concurrency: usize,
    ) -> anyhow::Result<Self> {
        let received = Arc::new(AtomicU64::new(0));
        let last_arrival = Arc::new(AtomicI64::new(0));
        let stop = CancellationToken::new();
        let permits = Arc::new(Semaphore::new(concurrency));
        let mut opening = JoinSet::new();
        for (index, &user) in users.iter().enumerate() {
            let permits = permits.clone();
            let token = tokens[user].clone();
            opening.spawn(async move {
                let _permit = permits.acquire_owned().await?;
                let source =
                    Ipv4Addr::new(127, 0, 0, 2 + (index % SOURCE_ADDRESSES as usize) as u8);
                let socket = open(relay, source, &token).await?;
                Ok::<_, anyhow::Error>((index, socket))
            });
        }
        let mut sockets: Vec<Option<Socket>> = (0..users.len()).map(|_| None).collect();
        while let Some(opened) = opening.join_next().await {
            let (index, socket) = opened.context("socket setup panicked")??;
            sockets[index] = Some(socket);
        }
        let mut clients = Vec::with_capacity(users.len());
        let mut tasks = JoinSet::new();
        for (socket, &user) in sockets.into_iter().zip(users) {
            let Some(socket) = socket else {
                bail!("a socket did not open");
            };
            let log = Arc::new(Mutex::new(SocketLog::default()));
            tasks.spawn(read_events(
                socket,
                log.clone(),
                received.clone(),
                last_arrival.clone(),
                stop.clone(),
            ));
            clients.push(Client { user, log });
        }
        Ok(Self {
            clients,
            received,
            last_arrival,
            stop,
            tasks,
        })
    }

    /// Forgets what was received so far (between phases).
    pub fn reset(&self) {
        for client in &self.clients {
            if let Ok(mut log) = client.log.lock() {
                log.events.clear();
                log.others = 0;
            }
        }
        self.received.store(0, Ordering::Release);
        self.last_arrival.store(0, Ordering::Release);
    }

    /// Waits until `expected` events have arrived in all, or none arrived for
    /// `patience`; returns how many arrived.
    pub async fn wait_for(&self, expected: u64, patience: Duration) -> u64 {
        let mut last = self.received.load(Ordering::Acquire);
        let mut progress_at = Instant::now();
        loop {
            let now = self.received.load(Ordering::Acquire);
            if now >= expected {
                // Anything beyond what may be seen would be a duplicate or a leak: give
                // it a moment to show up.
                tokio::time::sleep(Duration::from_millis(200)).await;
                return self.received.load(Ordering::Acquire);
            }
            if now != last {
                last = now;
                progress_at = Instant::now();
            } else if progress_at.elapsed() >= patience {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Sockets that ended on their own, with why.
    pub fn ended(&self) -> Vec<String> {
        self.clients
            .iter()
            .filter_map(|c| c.log.lock().ok().and_then(|l| l.ended.clone()))
            .collect()
    }

    pub async fn close(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// TCP connect from `source`, WebSocket upgrade with `Authorization: Bearer`, `welcome`,
/// then `subscribe` to everything and its `subscribed`.
async fn open(relay: SocketAddr, source: Ipv4Addr, token: &str) -> anyhow::Result<Socket> {
    let tcp = TcpSocket::new_v4()?;
    tcp.bind(SocketAddrV4::new(source, 0).into())?;
    let stream = tcp
        .connect(relay)
        .await
        .with_context(|| format!("TCP connect to the relay from {source}"))?;
    stream.set_nodelay(true)?;
    let mut request = format!("ws://{relay}/ws").into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    // tungstenite reads into 128 KiB per socket by default: 1.3 GB at 10,000 sockets of
    // this process's memory, for messages of a few hundred bytes.
    let config = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0);
    let (mut socket, _) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(config))
            .await
            .context("WebSocket upgrade")?;
    expect_reply(&mut socket, "\"welcome\"").await?;
    socket
        .send(Message::text(r#"{"type":"subscribe","ref":"all"}"#))
        .await?;
    expect_reply(&mut socket, "\"subscribed\"").await?;
    Ok(socket)
}

async fn expect_reply(socket: &mut Socket, kind: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let message = tokio::time::timeout_at(deadline, socket.next())
            .await
            .with_context(|| format!("no {kind} within 60 s"))?;
        match message {
            Some(Ok(Message::Text(text))) if text.contains(kind) => return Ok(()),
            Some(Ok(Message::Text(text))) => bail!("expected {kind}, got {text}"),
            Some(Ok(Message::Close(frame))) => bail!("closed while waiting for {kind}: {frame:?}"),
            Some(Ok(_)) => {}
            Some(Err(error)) => return Err(error).context(format!("waiting for {kind}")),
            None => bail!("socket ended while waiting for {kind}"),
        }
    }
}

async fn read_events(
    mut socket: Socket,
    log: Arc<Mutex<SocketLog>>,
    received: Arc<AtomicU64>,
    last_arrival: Arc<AtomicI64>,
    stop: CancellationToken,
) {
    let ended = loop {
        let message = tokio::select! {
            biased;
            () = stop.cancelled() => break None,
            message = socket.next() => message,
        };
        match message {
            Some(Ok(Message::Text(text))) => {
                let arrived = now_micros();
                let id = event_id(&text);
                if let Ok(mut log) = log.lock() {
                    match id {
                        Some(id) => log.events.push((id, arrived)),
                        None => log.others += 1,
                    }
                }
                if id.is_some() {
                    received.fetch_add(1, Ordering::AcqRel);
                    last_arrival.fetch_max(arrived, Ordering::AcqRel);
                }
            }
            Some(Ok(Message::Close(frame))) => {
                break Some(match frame {
                    Some(frame) => format!("closed {} {}", u16::from(frame.code), frame.reason),
                    None => "closed without a code".to_owned(),
                })
            }
            Some(Ok(_)) => {}
            Some(Err(error)) => break Some(format!("error: {error}")),
            None => break Some("connection ended".to_owned()),
        }
    };
    if let Some(reason) = ended {
        if let Ok(mut log) = log.lock() {
            log.ended = Some(reason);
        }
    } else {
        let _ = socket.close(None).await;
    }
}

/// The `id` of an event frame, read from its head: the relay writes `type` then `id`
/// first. Replies (`welcome`, `subscribed`, `pong`, `error`) have no top-level `id`.
pub fn event_id(frame: &str) -> Option<i64> {
    let head = frame.get(..frame.len().min(96))?;
    let start = head.find(",\"id\":")? + 6;
    let digits = &frame[start..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// A bare tokio-postgres LISTEN client on the naive trigger's channel: what a service
/// that just forwards NOTIFYs would see. Payloads are `<xid>:<table>`.
pub struct BareListener {
    /// (transaction id, arrival time) of each notification, while recording.
    pub log: Arc<Mutex<Vec<(u64, i64)>>>,
    pub received: Arc<AtomicU64>,
    _client: tokio_postgres::Client,
    task: tokio::task::JoinHandle<()>,
}

impl BareListener {
    pub async fn connect(url: &str, channel: &str) -> anyhow::Result<Self> {
        let (client, mut connection) = tokio_postgres::connect(url, NoTls).await?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let received = Arc::new(AtomicU64::new(0));
        let (task_log, task_received) = (log.clone(), received.clone());
        // The Connection future drops notifications: poll_message hands them over.
        let task = tokio::spawn(async move {
            while let Some(message) = poll_fn(|cx| connection.poll_message(cx)).await {
                match message {
                    Ok(AsyncMessage::Notification(notification)) => {
                        let arrived = now_micros();
                        let xid = notification
                            .payload()
                            .split(':')
                            .next()
                            .and_then(|x| x.parse::<u64>().ok());
                        if let (Some(xid), Ok(mut log)) = (xid, task_log.lock()) {
                            log.push((xid, arrived));
                        }
                        task_received.fetch_add(1, Ordering::AcqRel);
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        client.batch_execute(&format!("listen {channel}")).await?;
        Ok(Self {
            log,
            received,
            _client: client,
            task,
        })
    }

    pub fn reset(&self) {
        if let Ok(mut log) = self.log.lock() {
            log.clear();
        }
        self.received.store(0, Ordering::Release);
    }

    pub async fn wait_for(&self, expected: u64, patience: Duration) -> u64 {
        let deadline = Instant::now() + patience;
        while self.received.load(Ordering::Acquire) < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.received.load(Ordering::Acquire)
    }
}

impl Drop for BareListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}
