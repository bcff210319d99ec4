//! The outbox side of the pipeline: the LISTEN connection and its reconnects, the batch
//! queries, the decoded events, replays for resuming clients, retention.

pub mod event;
pub mod listener;
pub mod prune;
pub mod reader;
pub mod replay;
pub mod tracked;
pub mod wakeup;
