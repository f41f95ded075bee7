//! When records were queued, coarsely, so that lag can be told in seconds: how long the
//! oldest record a target has not acknowledged has been waiting.
//!
//! One stamp per [`STEP`] of pushes rather than one per record keeps this cheap on the
//! write path; a stamp is the time of the first record it covers, so an age read from it
//! is never less than the truth and at most `STEP` more. During a long outage the stamps
//! are thinned (every other one dropped) when [`MAX_STAMPS`] is reached: memory stays
//! bounded and the error stays small relative to the age.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub const STEP: Duration = Duration::from_millis(50);
pub const MAX_STAMPS: usize = 4096;

#[derive(Debug, Default)]
pub struct PushTimes {
    /// (first sequence covered, when it was pushed), both increasing.
    stamps: VecDeque<(u64, Instant)>,
}

impl PushTimes {
    /// Notes that `seq` (higher than any before) was pushed at `now`.
    pub fn pushed(&mut self, seq: u64, now: Instant) {
        if let Some(&(_, t)) = self.stamps.back() {
            if now.saturating_duration_since(t) < STEP {
                return;
            }
        }
        if self.stamps.len() >= MAX_STAMPS {
            self.thin();
        }
        self.stamps.push_back((seq, now));
    }

    /// How long the first record after `acked` has waited, if there is one (`last_seq`
    /// is the newest pushed).
    pub fn age(&self, acked: u64, last_seq: u64, now: Instant) -> Option<Duration> {
        if acked >= last_seq {
            return None;
        }
        let first = acked + 1;
        // The last stamp at or before `first`: the stamp covering it.
        let i = self.stamps.partition_point(|&(s, _)| s <= first);
        let (_, t) = *self.stamps.get(i.checked_sub(1)?)?;
        Some(now.saturating_duration_since(t))
    }

    /// Forgets stamps that only cover records up to `acked` (acknowledged everywhere).
    pub fn trim(&mut self, acked: u64) {
        while self.stamps.len() >= 2 && self.stamps[1].0 <= acked + 1 {
            self.stamps.pop_front();
        }
    }

    /// A new sequence space: nothing is queued.
    pub fn clear(&mut self) {
        self.stamps.clear();
    }

    fn thin(&mut self) {
        // Keep the first (it covers the oldest record) and every other one after it;
        // records of a dropped stamp fall to the earlier one, so ages only grow.
        let mut i = 0;
        self.stamps.retain(|_| {
            i += 1;
            i % 2 == 1
        });
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.stamps.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn age_is_that_of_the_oldest_unacknowledged_record() {
        let t0 = Instant::now();
        let mut p = PushTimes::default();
        p.pushed(1, at(t0, 0));
        p.pushed(2, at(t0, 10)); // same stamp as 1
        p.pushed(3, at(t0, 100));
        p.pushed(4, at(t0, 1000));
        let now = at(t0, 2000);
        assert_eq!(p.age(0, 4, now), Some(Duration::from_millis(2000)));
        // Record 2 is covered by record 1's stamp: over-estimated by less than STEP.
        assert_eq!(p.age(1, 4, now), Some(Duration::from_millis(2000)));
        assert_eq!(p.age(2, 4, now), Some(Duration::from_millis(1900)));
        assert_eq!(p.age(3, 4, now), Some(Duration::from_millis(1000)));
        assert_eq!(p.age(4, 4, now), None);
    }

    #[test]
    fn trim_keeps_the_stamp_covering_the_next_record() {
        let t0 = Instant::now();
        let mut p = PushTimes::default();
        for (seq, ms) in [(1, 0), (5, 100), (9, 200)] {
            p.pushed(seq, at(t0, ms));
        }
        p.trim(6); // record 7 is covered by the stamp of 5
        assert_eq!(p.len(), 2);
        assert_eq!(p.age(6, 10, at(t0, 300)), Some(Duration::from_millis(200)));
        p.trim(8);
        assert_eq!(p.len(), 1);
        assert_eq!(p.age(8, 10, at(t0, 300)), Some(Duration::from_millis(100)));
    }

    #[test]
    fn memory_stays_bounded_and_ages_never_shrink() {
        let t0 = Instant::now();
        let mut p = PushTimes::default();
        for i in 0..(MAX_STAMPS as u64 * 4) {
            p.pushed(i + 1, at(t0, i * 100));
        }
        assert!(p.len() <= MAX_STAMPS);
        let now = at(t0, MAX_STAMPS as u64 * 400);
        assert_eq!(p.age(0, u64::MAX, now), Some(now - t0));
        for acked in [10, 1000, 5000, 12000] {
            let truth = now - at(t0, acked * 100);
            assert!(p.age(acked, u64::MAX, now).unwrap() >= truth);
        }
    }
}
