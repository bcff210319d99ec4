//! The per-socket send queue: bounded in messages and in bytes. The router never waits on
//! a socket: when a queue is full the socket is a slow consumer, closed with 4008, and the
//! queue's memory is freed; the client resumes from its last id.
//!
//! Pushing does not wake the socket: the router wakes each socket it pushed to once per
//! read (and every few hundred events of a large one), so that a socket writes the
//! events of a read with one flush, one system call, instead of one per event.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::ws::close::CloseReason;

/// One event on its way to a socket: the shared frame, and its commit time for the
/// commit → send latency histogram.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub frame: Utf8Bytes,
    pub committed_at_micros: i64,
}

struct Shared {
    state: Mutex<State>,
    max_messages: usize,
    max_bytes: usize,
    ready: Notify,
}

#[derive(Default)]
struct State {
    items: VecDeque<Outgoing>,
    bytes: usize,
    /// Set by the first refused push: every later push is refused too, so a socket never
    /// receives an event after one it missed (it resumes from the last one it got).
    poisoned: bool,
    /// The router dropped its end.
    sender_gone: bool,
}

/// Router side.
pub struct QueueSender {
    shared: Arc<Shared>,
    /// Whether a push happened since the last wake (spares needless wake-ups).
    pending: AtomicBool,
}

/// Socket side.
pub struct QueueReceiver {
    shared: Arc<Shared>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct QueueFull;

pub fn channel(max_messages: usize, max_bytes: usize) -> (QueueSender, QueueReceiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        max_messages: max_messages.max(1),
        max_bytes,
        ready: Notify::new(),
    });
    (
        QueueSender {
            shared: shared.clone(),
            pending: AtomicBool::new(false),
        },
        QueueReceiver { shared },
    )
}

impl QueueSender {
    /// Enqueues without waiting or waking; `QueueFull` when either bound would be
    /// exceeded (a single frame larger than the byte bound still goes through an empty
    /// queue), or the socket stopped taking events.
    pub fn push(&self, item: Outgoing) -> Result<(), QueueFull> {
        let Ok(mut state) = self.shared.state.lock() else {
            return Err(QueueFull);
        };
        let size = item.frame.len();
        let fits = state.items.len() < self.shared.max_messages
            && (state.items.is_empty() || state.bytes + size <= self.shared.max_bytes);
        if state.poisoned || !fits {
            state.poisoned = true;
            return Err(QueueFull);
        }
        state.bytes += size;
        state.items.push_back(item);
        self.pending.store(true, Ordering::Release);
        Ok(())
    }

    /// Wakes the socket if anything was pushed since the last wake.
    pub fn wake(&self) {
        if self.pending.swap(false, Ordering::AcqRel) {
            self.shared.ready.notify_one();
        }
    }
}

impl Drop for QueueSender {
    fn drop(&mut self) {
        if let Ok(mut state) = self.shared.state.lock() {
            state.sender_gone = true;
        }
        self.shared.ready.notify_one();
    }
}

impl QueueReceiver {
    /// Waits for events and takes up to `max` of them; `None` once the router has gone
    /// and nothing is left.
    pub async fn recv_many(&mut self, max: usize) -> Option<Vec<Outgoing>> {
        loop {
            {
                let Ok(mut state) = self.shared.state.lock() else {
                    return None;
                };
                if !state.items.is_empty() {
                    let take = state.items.len().min(max.max(1));
                    let batch: Vec<Outgoing> = state.items.drain(..take).collect();
                    state.bytes -= batch.iter().map(|o| o.frame.len()).sum::<usize>();
                    if state.items.is_empty() && state.items.capacity() > 64 {
                        state.items.shrink_to(16);
                    }
                    return Some(batch);
                }
                if state.sender_gone {
                    return None;
                }
            }
            self.shared.ready.notified().await;
        }
    }

    /// Frees everything queued and refuses what follows (a socket being closed will not
    /// send it).
    pub fn discard(&mut self) {
        if let Ok(mut state) = self.shared.state.lock() {
            state.items = VecDeque::new();
            state.bytes = 0;
            state.poisoned = true;
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
    use futures_util::FutureExt;

    fn frame(len: usize) -> Outgoing {
        Outgoing {
            frame: Utf8Bytes::from("x".repeat(len)),
            committed_at_micros: 0,
        }
    }

    fn sizes(batch: Option<Vec<Outgoing>>) -> Vec<usize> {
        batch
            .unwrap_or_default()
            .iter()
            .map(|o| o.frame.len())
            .collect()
    }

    #[tokio::test]
    async fn the_queue_refuses_past_its_message_bound_and_then_for_good() {
        let (tx, mut rx) = channel(2, 1 << 20);
        assert!(tx.push(frame(1)).is_ok());
        assert!(tx.push(frame(1)).is_ok());
        assert_eq!(tx.push(frame(1)), Err(QueueFull));
        assert_eq!(sizes(rx.recv_many(10).await), vec![1, 1]);
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
        assert_eq!(sizes(rx.recv_many(10).await), vec![6]);
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

    #[tokio::test]
    async fn a_socket_wakes_once_for_everything_pushed_before_the_wake() {
        let (tx, mut rx) = channel(100, 1 << 20);
        let mut waiting = Box::pin(rx.recv_many(64));
        assert!(waiting.as_mut().now_or_never().is_none(), "nothing yet");
        for len in 1..=5 {
            tx.push(frame(len)).expect("fits");
        }
        tx.wake();
        assert_eq!(sizes(waiting.await), vec![1, 2, 3, 4, 5]);
        drop(tx);
        assert!(rx.recv_many(64).await.is_none(), "the router is gone");
    }

    #[test]
    fn the_first_close_reason_wins() {
        let control = SessionControl::default();
        control.close(CloseReason::SlowConsumer);
        control.close(CloseReason::ShuttingDown);
        assert_eq!(control.reason(), CloseReason::SlowConsumer);
    }
}
