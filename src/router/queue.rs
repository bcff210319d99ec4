//! The per-socket send queue: bounded in messages and in bytes. The router never waits on
//! a socket: when a queue is full the socket is a slow consumer, closed with 4008, and the
//! queue's memory is freed; the client resumes from its last id.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ws::close::CloseReason;

/// One event on its way to a socket: the shared frame, and its commit time for the
/// commit → send latency histogram.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub frame: Utf8Bytes,
    pub committed_at_micros: i64,
}

struct Budget {
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    /// Set by the first refused push: every later push is refused too, so a socket never
    /// receives an event after one it missed (it resumes from the last one it got).
    poisoned: AtomicBool,
}

/// Router side.
#[derive(Clone)]
pub struct QueueSender {
    frames: mpsc::Sender<Outgoing>,
    budget: Arc<Budget>,
}

/// Socket side.
pub struct QueueReceiver {
    frames: mpsc::Receiver<Outgoing>,
    budget: Arc<Budget>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct QueueFull;

pub fn channel(max_messages: usize, max_bytes: usize) -> (QueueSender, QueueReceiver) {
    let (tx, rx) = mpsc::channel(max_messages.max(1));
    let budget = Arc::new(Budget {
        queued_bytes: AtomicUsize::new(0),
        max_bytes,
        poisoned: AtomicBool::new(false),
    });
    (
        QueueSender {
            frames: tx,
            budget: budget.clone(),
        },
        QueueReceiver { frames: rx, budget },
    )
}

impl QueueSender {
    /// Enqueues without waiting; `QueueFull` when either bound would be exceeded (or the
    /// socket is gone).
    pub fn push(&self, item: Outgoing) -> Result<(), QueueFull> {
        if self.budget.poisoned.load(Ordering::Acquire) {
            return Err(QueueFull);
        }
        let size = item.frame.len();
        let before = self.budget.queued_bytes.fetch_add(size, Ordering::AcqRel);
        let refused = if before + size > self.budget.max_bytes && before > 0 {
            true
        } else {
            self.frames.try_send(item).is_err()
        };
        if refused {
            self.budget.queued_bytes.fetch_sub(size, Ordering::AcqRel);
            self.budget.poisoned.store(true, Ordering::Release);
            return Err(QueueFull);
        }
        Ok(())
    }
}

impl QueueReceiver {
    pub async fn recv(&mut self) -> Option<Outgoing> {
        let item = self.frames.recv().await?;
        self.budget
            .queued_bytes
            .fetch_sub(item.frame.len(), Ordering::AcqRel);
        Some(item)
    }

    /// Frees everything queued (a socket being closed will not send it).
    pub fn discard(&mut self) {
        self.frames.close();
        while let Ok(item) = self.frames.try_recv() {
            self.budget
                .queued_bytes
                .fetch_sub(item.frame.len(), Ordering::AcqRel);
        }
    }
}

/// How the router (or anyone else) tells a socket to close, and why. The first reason wins.
#[derive(Default)]
pub struct SessionControl {
    close: CancellationToken,
    reason: Mutex<Option<CloseReason>>,
}

impl SessionControl {
    pub fn close(&self, reason: CloseReason) {
        if let Ok(mut slot) = self.reason.lock() {
            slot.get_or_insert(reason);
        }
        self.close.cancel();
    }

    pub async fn closed(&self) -> CloseReason {
        self.close.cancelled().await;
        self.reason()
    }

    pub fn reason(&self) -> CloseReason {
        self.reason
            .lock()
            .ok()
            .and_then(|slot| slot.clone())
            .unwrap_or(CloseReason::Internal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize) -> Outgoing {
        Outgoing {
            frame: Utf8Bytes::from("x".repeat(len)),
            committed_at_micros: 0,
        }
    }

    #[tokio::test]
    async fn the_queue_refuses_past_its_message_bound_and_then_for_good() {
        let (tx, mut rx) = channel(2, 1 << 20);
        assert!(tx.push(frame(1)).is_ok());
        assert!(tx.push(frame(1)).is_ok());
        assert_eq!(tx.push(frame(1)), Err(QueueFull));
        assert!(rx.recv().await.is_some());
        assert_eq!(
            tx.push(frame(1)),
            Err(QueueFull),
            "no event after a missed one"
        );
    }

    #[tokio::test]
    async fn the_queue_frees_bytes_as_frames_leave_and_refuses_past_its_byte_bound() {
        let (tx, mut rx) = channel(100, 10);
        assert!(tx.push(frame(6)).is_ok());
        assert_eq!(rx.recv().await.map(|f| f.frame.len()), Some(6));
        assert!(tx.push(frame(6)).is_ok());
        assert_eq!(tx.push(frame(6)), Err(QueueFull));
    }

    #[tokio::test]
    async fn one_frame_larger_than_the_byte_bound_still_goes_through_an_empty_queue() {
        let (tx, mut rx) = channel(100, 10);
        assert!(tx.push(frame(50)).is_ok());
        assert_eq!(tx.push(frame(1)), Err(QueueFull));
        rx.discard();
        assert_eq!(
            tx.push(frame(1)),
            Err(QueueFull),
            "a discarded queue takes nothing"
        );
    }

    #[test]
    fn the_first_close_reason_wins() {
        let control = SessionControl::default();
        control.close(CloseReason::SlowConsumer);
        control.close(CloseReason::ShuttingDown);
        assert_eq!(control.reason(), CloseReason::SlowConsumer);
    }
}
