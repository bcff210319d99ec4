//! When the router reads the outbox next, and whether writers should NOTIFY.
//!
//! Postgres serializes the commits of every transaction that issued a NOTIFY (a
//! server-wide lock held through the WAL flush), so under many concurrent writers a
//! NOTIFY per transaction caps the whole database at about one commit per disk flush.
//!
//! `notify` mode: writers always NOTIFY; the router reads on each wake-up. Lowest latency
//! at low rates, and the lock's cost under load.
//!
//! `adaptive` mode (default): writers NOTIFY only while this relay is *idle*. When a read
//! finds several transactions at once, the relay turns *busy*: it clears its flag in
//! `relay.listeners` and reads continuously every [`BUSY_INTERVAL`], so busy writers never
//! touch the lock. After [`LINGER`] without events it sets the flag again and goes back to
//! waiting. The race at that switch (a writer that saw "busy" commits after the last read)
//! is closed by re-reading every [`RECHECK_INTERVAL`] until every transaction that was
//! running when the flag was set has finished. Worst-case latency is therefore bounded by
//! the busy interval, the recheck interval, or at most [`IDLE_POLL`] should a wake-up be
//! lost some other way.

use std::time::{Duration, Instant};

use crate::config::WakeupMode;
use crate::db::snapshot::Snapshot;

/// Transactions in one read that make an idle relay busy.
pub const BUSY_TRANSACTIONS: usize = 3;
/// Pause between reads while busy and events keep coming.
pub const BUSY_INTERVAL: Duration = Duration::from_millis(2);
/// Pause between reads while busy and the last read was empty.
pub const BUSY_EMPTY_INTERVAL: Duration = Duration::from_millis(5);
/// How long a busy relay keeps reading without events before it goes idle.
pub const LINGER: Duration = Duration::from_millis(250);
/// Re-read interval while transactions that may have missed the idle flag still run.
pub const RECHECK_INTERVAL: Duration = Duration::from_millis(10);
/// An idle relay reads at least this often (also its connection heartbeat).
pub const IDLE_POLL: Duration = Duration::from_secs(1);

/// What to do after a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Read again at this instant.
    ReadAt(Instant),
    /// Wait for a NOTIFY, or read at this instant at the latest.
    WaitUntil(Instant),
}

/// A change of the flag writers read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlagChange {
    Busy,
    Idle,
}

#[derive(Debug)]
pub struct WakeupPolicy {
    mode: WakeupMode,
    busy: bool,
    last_events: Instant,
    /// Set when the idle flag was just written: the next read's running transactions are
    /// the ones that may not have seen it.
    flag_just_set: bool,
    unsure: Vec<u64>,
}

impl WakeupPolicy {
    pub fn new(mode: WakeupMode, now: Instant) -> Self {
        Self {
            mode,
            busy: false,
            last_events: now,
            flag_just_set: false,
            unsure: Vec::new(),
        }
    }

    /// The flag value a new connection registers with.
    pub fn initially_idle(&self) -> bool {
        !self.busy
    }

    pub fn is_busy(&self) -> bool {
        self.busy
    }

    /// Decides after a read that found `transactions` committed transactions, in
    /// `snapshot`.
    pub fn after_read(
        &mut self,
        now: Instant,
        transactions: usize,
        snapshot: &Snapshot,
    ) -> (Next, Option<FlagChange>) {
        if transactions > 0 {
            self.last_events = now;
        }
        if self.mode == WakeupMode::Notify {
            return (Next::WaitUntil(now + IDLE_POLL), None);
        }
        if self.busy {
            if transactions > 0 {
                return (Next::ReadAt(now + BUSY_INTERVAL), None);
            }
            if now.duration_since(self.last_events) < LINGER {
                return (Next::ReadAt(now + BUSY_EMPTY_INTERVAL), None);
            }
            self.busy = false;
            self.flag_just_set = true;
            return (Next::ReadAt(now), Some(FlagChange::Idle));
        }
        if transactions >= BUSY_TRANSACTIONS {
            self.busy = true;
            self.unsure.clear();
            self.flag_just_set = false;
            return (Next::ReadAt(now + BUSY_INTERVAL), Some(FlagChange::Busy));
        }
        if self.flag_just_set {
            self.flag_just_set = false;
            self.unsure = snapshot.in_progress().to_vec();
        } else {
            self.unsure.retain(|&xid| snapshot.is_pending(xid));
        }
        if self.unsure.is_empty() {
            (Next::WaitUntil(now + IDLE_POLL), None)
        } else {
            (Next::ReadAt(now + RECHECK_INTERVAL), None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(text: &str) -> Snapshot {
        Snapshot::parse(text).expect("valid")
    }

    #[test]
    fn notify_mode_always_waits_for_a_notify() {
        let now = Instant::now();
        let mut policy = WakeupPolicy::new(WakeupMode::Notify, now);
        for transactions in [0, 1, 100] {
            assert_eq!(
                policy.after_read(now, transactions, &snapshot("5:9:6")),
                (Next::WaitUntil(now + IDLE_POLL), None)
            );
        }
    }

    #[test]
    fn adaptive_mode_turns_busy_under_load_and_idle_after_the_linger() {
        let start = Instant::now();
        let mut policy = WakeupPolicy::new(WakeupMode::Adaptive, start);
        let quiet = snapshot("10:10:");
        assert_eq!(
            policy.after_read(start, 1, &quiet),
            (Next::WaitUntil(start + IDLE_POLL), None)
        );
        let (next, flag) = policy.after_read(start, BUSY_TRANSACTIONS, &quiet);
        assert_eq!(
            (next, flag),
            (Next::ReadAt(start + BUSY_INTERVAL), Some(FlagChange::Busy))
        );
        let soon = start + Duration::from_millis(10);
        assert_eq!(
            policy.after_read(soon, 0, &quiet).1,
            None,
            "lingers while recently busy"
        );
        let later = start + LINGER + Duration::from_millis(1);
        assert_eq!(
            policy.after_read(later, 0, &quiet),
            (Next::ReadAt(later), Some(FlagChange::Idle))
        );
        assert!(!policy.is_busy());
    }

    #[test]
    fn after_going_idle_it_rereads_until_transactions_that_missed_the_flag_end() {
        let start = Instant::now();
        let mut policy = WakeupPolicy::new(WakeupMode::Adaptive, start);
        policy.after_read(start, BUSY_TRANSACTIONS, &snapshot("10:10:"));
        let t = start + LINGER * 2;
        assert_eq!(
            policy.after_read(t, 0, &snapshot("10:10:")).1,
            Some(FlagChange::Idle)
        );
        // The read right after setting the flag still sees 12 running: keep re-reading.
        assert_eq!(
            policy.after_read(t, 0, &snapshot("12:14:12")).0,
            Next::ReadAt(t + RECHECK_INTERVAL)
        );
        assert_eq!(
            policy.after_read(t, 0, &snapshot("12:15:12,14")).0,
            Next::ReadAt(t + RECHECK_INTERVAL)
        );
        // 12 finished (14 started after the flag: it will NOTIFY): back to waiting.
        assert_eq!(
            policy.after_read(t, 1, &snapshot("14:16:14")).0,
            Next::WaitUntil(t + IDLE_POLL)
        );
    }
}
