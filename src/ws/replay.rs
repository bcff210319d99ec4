//! A resume replay running beside its socket: pages of missed events from the outbox,
//! handed over through a small channel so the session keeps reading client messages
//! meanwhile. Live events wait in the socket's queue until the replay is done.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::db::snapshot::Snapshot;
use crate::domain::{CredentialId, TableFilter};
use crate::metrics::Metrics;
use crate::outbox::event::TableNames;
use crate::outbox::replay::{ReplayStart, Replayer};
use crate::router::queue::Outgoing;

pub enum ReplayItem {
    Event(Outgoing),
    /// The replay could not finish; the session closes so the client resumes again.
    Failed,
}

pub struct ReplayRequest {
    pub start: ReplayStart,
    pub position: Arc<Snapshot>,
    pub credentials: Vec<CredentialId>,
    pub tables: Option<Vec<TableFilter>>,
}

pub fn spawn(
    replayer: Arc<Replayer>,
    request: ReplayRequest,
    metrics: Arc<Metrics>,
) -> mpsc::Receiver<ReplayItem> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let credentials: Vec<&str> = request
            .credentials
            .iter()
            .map(CredentialId::as_str)
            .collect();
        let mut tables = TableNames::default();
        let mut cursor = request.start.first_after;
        loop {
            let page = match replayer
                .page(
                    &request.start,
                    cursor,
                    &credentials,
                    &request.position,
                    &mut tables,
                )
                .await
            {
                Ok(page) => page,
                Err(error) => {
                    tracing::warn!(error = %crate::errors::Chain(&error), "replay failed");
                    let _ = tx.send(ReplayItem::Failed).await;
                    return;
                }
            };
            let full = page.len() as i64 >= crate::outbox::replay::PAGE;
            for event in page {
                cursor = event.id;
                let wanted = request
                    .tables
                    .as_ref()
                    .is_none_or(|filters| filters.iter().any(|f| f.matches(&event.table)));
                if !wanted {
                    continue;
                }
                metrics.replayed_events.inc();
                let item = ReplayItem::Event(Outgoing {
                    frame: event.frame,
                    committed_at_micros: event.committed_at_micros,
                });
                if tx.send(item).await.is_err() {
                    return; // the socket is gone
                }
            }
            if !full {
                return;
            }
        }
    });
    rx
}
