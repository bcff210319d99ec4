//! Writers like a trading engine's: several connections, each committing orders in a
//! loop; a write cut by a database fault is retried on a new connection.

use std::time::Duration;

use tokio::task::JoinSet;
use tokio_postgres::NoTls;

/// Starts `writers` tasks that each commit `per_writer` orders, round-robin over
/// `credentials`, pausing `pace` between commits. Resolves to the number committed.
pub fn spawn(
    url: String,
    credentials: Vec<String>,
    writers: usize,
    per_writer: usize,
    pace: Duration,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut set = JoinSet::new();
        for writer in 0..writers {
            let url = url.clone();
            let credentials = credentials.clone();
            set.spawn(async move {
                let mut committed = 0;
                let mut client = None;
                let mut attempts = 0;
                while committed < per_writer {
                    attempts += 1;
                    assert!(attempts < per_writer * 20 + 1000, "writer {writer} cannot make progress");
                    if client.is_none() {
                        match tokio_postgres::connect(&url, NoTls).await {
                            Ok((c, connection)) => {
                                tokio::spawn(connection);
                                client = Some(c);
                            }
                            Err(_) => {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            }
                        }
                    }
                    let Some(c) = client.as_ref() else { continue };
                    let credential = &credentials[(writer + committed) % credentials.len()];
                    let symbol = format!("W{writer}-{committed}");
                    let result = c
                        .execute(
                            "insert into orders (credential_id, symbol, side, qty) values ($1::text::uuid, $2, 'buy', 1)",
                            &[credential, &symbol],
                        )
                        .await;
                    match result {
                        Ok(_) => committed += 1,
                        Err(_) => client = None,
                    }
                    if !pace.is_zero() {
                        tokio::time::sleep(pace).await;
                    }
                }
                committed
            });
        }
        let mut total = 0;
        while let Some(done) = set.join_next().await {
            total += done.expect("writer task");
        }
        total
    })
}
