//! When the router reads the outbox next, and whether writers should NOTIFY.
//!
//! Postgres serializes the commits of every transaction that issued a NOTIFY (a
//! server-wide lock held through the WAL flush), so under many concurrent writers a
//! NOTIFY per transaction caps the whole database at about one commit per disk flush.
//!
//! `notify` mode: writers always NOTIFY; the router reads on each wake-up.
//!
//! `adaptive` mode (default): the relay measures the rate of committing transactions it
//! reads (an exponential moving average) and how many write transactions are running when
//! it reads. While both are low it is *idle*: writers NOTIFY and each wake-up triggers a
//! read, the lowest latency there is, and at such rates the commit lock costs writers
//! little. Above [`BUSY_RATE`], or when writers pile up ([`PILE_UP`] running transactions:
//! the lock queues them, which also caps the rate the relay can observe), it turns *busy*:
//! it clears its flag in `relay.listeners`, writers stop notifying (and stay off the
//! lock), and the relay reads continuously every [`BUSY_INTERVAL`]. Once the rate stays
//! below [`IDLE_RATE`] with no pile-up for [`LINGER`], it sets the flag again. The race at that switch (a writer
//! that saw "busy" commits after the last read) is closed by re-reading every
//! [`RECHECK_INTERVAL`] until every transaction that was running when the flag was set has
//! finished. Worst-case latency is therefore bounded by the busy interval, the recheck
//! interval, or at most [`IDLE_POLL`] should a wake-up be lost some other way.

use std::time::{Duration, Instant};

use crate::config::WakeupMode;
use crate::db::snapshot::Snapshot;

/// Committing transactions per second above which the relay turns busy.
pub const BUSY_RATE: f64 = 400.0;
/// ... and below which (for [`LINGER`]) it turns idle again.
pub const IDLE_RATE: f64 = 250.0;
/// Write transactions running at a read that show writers queueing on the commit lock
/// (with at least [`PILE_UP_MIN_RATE`] commits per second, so that a few long-running
/// transactions alone do not count).
pub const PILE_UP: usize = 8;
const PILE_UP_MIN_RATE: f64 = 20.0;
/// Time constant of the rate's moving average: short, so that a burst's end is seen
/// within a few hundred milliseconds.
const RATE_TIME_CONSTANT: Duration = Duration::from_millis(100);
/// Pause between reads while busy: long enough for batches to carry many events, short
/// enough to bound the latency under load.
pub const BUSY_INTERVAL: Duration = Duration::from_millis(5);
/// How long the rate must stay low before a busy relay goes idle.
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

/// Transactions per second, as an exponential moving average over reads.
#[derive(Debug)]
struct Rate {
    per_second: f64,
    at: Instant,
}

impl Rate {
    fn observe(&mut self, now: Instant, transactions: usize) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        let tau = RATE_TIME_CONSTANT.as_secs_f64();
        self.per_second = self.per_second * (-elapsed / tau).exp() + transactions as f64 / tau;
        self.at = now;
        self.per_second
    }
}

#[derive(Debug)]
pub struct WakeupPolicy {
    mode: WakeupMode,
    busy: bool,
    rate: Rate,
    /// Since when the rate has been below [`IDLE_RATE`] while busy.
    calm_since: Option<Instant>,
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
            rate: Rate {
                per_second: 0.0,
                at: now,
            },
            calm_since: None,
            flag_just_set: false,
            unsure: Vec::new(),
        }
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
        let rate = self.rate.observe(now, transactions);
        if self.mode == WakeupMode::Notify {
            return (Next::WaitUntil(now + IDLE_POLL), None);
        }
        let piling_up = rate >= PILE_UP_MIN_RATE && snapshot.in_progress().len() >= PILE_UP;
        if self.busy {
            if rate >= IDLE_RATE || piling_up {
                self.calm_since = None;
                return (Next::ReadAt(now + BUSY_INTERVAL), None);
            }
            let calm_since = *self.calm_since.get_or_insert(now);
            if now.duration_since(calm_since) < LINGER {
                return (Next::ReadAt(now + BUSY_INTERVAL), None);
            }
            self.busy = false;
            self.calm_since = None;
            self.flag_just_set = true;
            return (Next::ReadAt(now), Some(FlagChange::Idle));
        }
        if rate >= BUSY_RATE || piling_up {
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

    /// Feeds reads of `per_read` transactions every `every` for `for_how_long`.
    fn feed(
        policy: &mut WakeupPolicy,
        start: Instant,
        every: Duration,
        per_read: usize,
        for_how_long: Duration,
    ) -> (Instant, Vec<Option<FlagChange>>) {
        let mut now = start;
        let mut flags = Vec::new();
        while now < start + for_how_long {
            now += every;
            flags.push(policy.after_read(now, per_read, &snapshot("10:10:")).1);
        }
        (now, flags)
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
    fn a_moderate_rate_stays_on_notify_wake_ups() {
        let start = Instant::now();
        let mut policy = WakeupPolicy::new(WakeupMode::Adaptive, start);
        // 200 transactions/s, one per read (each NOTIFY wakes a read).
        let (_, flags) = feed(
            &mut policy,
            start,
            Duration::from_millis(5),
            1,
            Duration::from_secs(3),
        );
        assert!(flags.iter().all(Option::is_none));
        assert!(!policy.is_busy());
    }

    #[test]
    fn a_high_rate_turns_busy_and_a_calm_one_idle_again() {
        let start = Instant::now();
        let mut policy = WakeupPolicy::new(WakeupMode::Adaptive, start);
        // 2,000 transactions/s.
        let (now, flags) = feed(
            &mut policy,
            start,
            Duration::from_millis(5),
            10,
            Duration::from_millis(500),
        );
        assert_eq!(
            flags.iter().flatten().collect::<Vec<_>>(),
            vec![&FlagChange::Busy]
        );
        assert!(policy.is_busy());
        // Quiet: idle after the rate decays and the linger passes, not before.
        let (now, flags) = feed(
            &mut policy,
            now,
            Duration::from_millis(5),
            0,
            Duration::from_millis(300),
        );
        assert!(flags.iter().all(Option::is_none), "still lingering");
        let (_, flags) = feed(
            &mut policy,
            now,
            Duration::from_millis(5),
            0,
            Duration::from_secs(2),
        );
        assert_eq!(
            flags.iter().flatten().collect::<Vec<_>>(),
            vec![&FlagChange::Idle]
        );
        assert!(!policy.is_busy());
    }

    #[test]
    fn writers_piling_up_on_the_commit_lock_turn_it_busy_at_any_rate() {
        let start = Instant::now();
        let mut policy = WakeupPolicy::new(WakeupMode::Adaptive, start);
        let piled = snapshot("100:120:100,101,102,103,104,105,106,107,108,109");
        let mut flags = Vec::new();
        for i in 1..=20 {
            flags.push(
                policy
                    .after_read(start + Duration::from_millis(5 * i), 1, &piled)
                    .1,
            );
        }
        assert!(flags.contains(&Some(FlagChange::Busy)));
        // A few long transactions and no commits: no pile-up.
        let mut quiet = WakeupPolicy::new(WakeupMode::Adaptive, start);
        assert_eq!(
            quiet
                .after_read(start + Duration::from_secs(1), 0, &piled)
                .1,
            None
        );
    }

    #[test]
    fn after_going_idle_it_rereads_until_transactions_that_missed_the_flag_end() {
        let start = Instant::now();
        let mut policy = WakeupPolicy::new(WakeupMode::Adaptive, start);

        policy.busy = true;
        policy.calm_since = Some(start);
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
