//! Postgres `pg_snapshot` values, parsed so that "did transaction X commit before this
//! snapshot?" is answered in memory.
//!
//! The relay's read cursor is a snapshot: a batch is what became visible between two of
//! them, and an announcement carries the snapshot taken as it committed. Transaction ids
//! are `xid8` (epoch-extended), so they never wrap.

use std::fmt;

/// `xmin:xmax:xip1,xip2,…` as printed by `pg_current_snapshot()::text`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Every transaction below this had finished when the snapshot was taken.
    xmin: u64,
    /// Every transaction at or above this had not started.
    xmax: u64,
    /// Transactions in `[xmin, xmax)` that were still running; sorted.
    in_progress: Box<[u64]>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed pg_snapshot {0:?}")]
pub struct InvalidSnapshot(String);

impl Snapshot {
    pub fn parse(text: &str) -> Result<Self, InvalidSnapshot> {
        let invalid = || InvalidSnapshot(text.chars().take(64).collect());
        let mut parts = text.splitn(3, ':');
        let xmin = parts
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(invalid)?;
        let xmax = parts
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(invalid)?;
        let list = parts.next().ok_or_else(invalid)?;
        let mut in_progress = if list.is_empty() {
            Vec::new()
        } else {
            list.split(',')
                .map(|x| x.parse::<u64>().map_err(|_| invalid()))
                .collect::<Result<Vec<_>, _>>()?
        };
        if xmin > xmax || in_progress.iter().any(|&x| x < xmin || x >= xmax) {
            return Err(invalid());
        }
        in_progress.sort_unstable();
        Ok(Self {
            xmin,
            xmax,
            in_progress: in_progress.into_boxed_slice(),
        })
    }

    /// A snapshot in which no transaction is visible: whatever is compared with it counts
    /// as later (the cautious reading of a missing snapshot).
    pub fn nothing_visible() -> Self {
        Self {
            xmin: 0,
            xmax: 0,
            in_progress: Box::new([]),
        }
    }

    /// Whether transaction `xid` had committed (or aborted) when the snapshot was taken:
    /// `pg_visible_in_snapshot`, without a round trip.
    pub fn is_visible(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && self.in_progress.binary_search(&xid).is_err())
    }

    /// Whether `xid` was running or not yet started: its rows may still appear.
    pub fn is_pending(&self, xid: u64) -> bool {
        !self.is_visible(xid)
    }

    /// Whether everything visible in `earlier` is visible here and every transaction that
    /// was pending in `earlier` has finished, so that no later batch can hold a row that
    /// `earlier` did not see… except rows of transactions that started after it.
    pub fn has_passed(&self, earlier: &Snapshot) -> bool {
        self.xmin >= earlier.xmax
    }

    pub fn xmin(&self) -> u64 {
        self.xmin
    }

    pub fn xmax(&self) -> u64 {
        self.xmax
    }

    pub fn in_progress(&self) -> &[u64] {
        &self.in_progress
    }

    /// The running transactions as text, for `xid = any($1::text[]::xid8[])`.
    pub fn in_progress_text(&self) -> Vec<String> {
        self.in_progress.iter().map(u64::to_string).collect()
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:", self.xmin, self.xmax)?;
        for (i, xid) in self.in_progress.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{xid}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_postgres_prints_and_prints_it_back() {
        for text in ["10:20:", "10:20:10,14,19", "5:5:"] {
            assert_eq!(Snapshot::parse(text).expect("valid").to_string(), text);
        }
    }

    #[test]
    fn visibility_follows_pg_visible_in_snapshot() {
        let s = Snapshot::parse("10:20:12,15").expect("valid");
        assert!(s.is_visible(9));
        assert!(s.is_visible(10) && s.is_visible(11) && s.is_visible(19));
        assert!(!s.is_visible(12) && !s.is_visible(15));
        assert!(!s.is_visible(20) && !s.is_visible(1000));
        assert!(s.is_pending(12) && s.is_pending(20));
    }

    #[test]
    fn refuses_malformed_text() {
        for text in ["", "1", "1:2", "x:2:", "3:2:", "1:5:7", "1:5:a", "1:5:0"] {
            assert!(Snapshot::parse(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn a_later_snapshot_has_passed_an_earlier_one_once_its_running_transactions_ended() {
        let earlier = Snapshot::parse("10:20:12").expect("valid");
        assert!(!Snapshot::parse("12:25:12")
            .expect("valid")
            .has_passed(&earlier));
        assert!(Snapshot::parse("20:25:")
            .expect("valid")
            .has_passed(&earlier));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn any_text_parses_or_errs(text in "[0-9:,]{0,40}") {
                if let Ok(snapshot) = Snapshot::parse(&text) {
                    prop_assert_eq!(Snapshot::parse(&snapshot.to_string()), Ok(snapshot));
                }
            }

            #[test]
            fn visibility_matches_its_definition(xmin in 0u64..1000, span in 0u64..100, running in prop::collection::vec(0u64..100, 0..10), probe in 0u64..1200) {
                let xmax = xmin + span;
                let mut running: Vec<u64> = running.into_iter().map(|x| xmin + x).filter(|x| *x < xmax).collect();
                running.sort_unstable();
                running.dedup();
                let list: Vec<String> = running.iter().map(u64::to_string).collect();
                let snapshot = Snapshot::parse(&format!("{xmin}:{xmax}:{}", list.join(","))).unwrap();
                let expected = probe < xmin || (probe < xmax && !running.contains(&probe));
                prop_assert_eq!(snapshot.is_visible(probe), expected);
            }
        }
    }
}
