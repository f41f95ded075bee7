//! Pacing of full rescans after the kernel lost change records.
//!
//! A lost record could have been any change under any set, so the answer is to list
//! every set again and compare every file. In a storm that keeps overflowing the ring,
//! losses are reported again and again; rescanning at each one would spend all the
//! agent's time (and both hosts' disks) comparing, while the storm overflows the ring
//! all the more. One rescan covers every loss reported before it started, so a loss
//! reported soon after a rescan is owed one more rescan, later: at most one runs per
//! [`MIN_GAP`], or per [`COST_FACTOR`] times what the last one took if that is longer.
//!
//! Running a rescan later than asked is always safe: the listing it reads is newer than
//! every record the ring held when the loss was seen.

use std::time::{Duration, Instant};

/// The least time between the end of one full rescan and the start of the next.
pub const MIN_GAP: Duration = Duration::from_secs(1);

/// Between rescans, at least this many times the last one's duration passes: the agent
/// spends at most about a fifth of its time rescanning in a storm.
pub const COST_FACTOR: u32 = 4;

#[derive(Debug, Default)]
pub struct RescanPacing {
    /// When the last rescan ended, and how long it took.
    last: Option<(Instant, Duration)>,
    /// A loss was reported that no rescan has covered yet.
    owed: bool,
    /// Losses answered late (deferred, not skipped), for the status.
    deferred: u64,
}

impl RescanPacing {
    /// A loss was reported at `now`. True: rescan now (then call [`RescanPacing::done`]).
    /// False: one is owed; [`RescanPacing::due`] says when to run it.
    pub fn lost(&mut self, now: Instant) -> bool {
        if self.ready(now) && !self.owed {
            return true;
        }
        if !self.owed {
            self.deferred += 1;
        }
        self.owed = true;
        false
    }

    /// True if an owed rescan may run at `now`.
    pub fn due(&self, now: Instant) -> bool {
        self.owed && self.ready(now)
    }

    /// A rescan that started at `started` has just ended at `now`; it covers every loss
    /// reported before `started`.
    pub fn done(&mut self, started: Instant, now: Instant) {
        self.last = Some((now, now.saturating_duration_since(started)));
        self.owed = false;
    }

    /// A loss is waiting for its rescan.
    pub fn owed(&self) -> bool {
        self.owed
    }

    /// How many losses had their rescan deferred.
    pub fn deferred(&self) -> u64 {
        self.deferred
    }

    fn ready(&self, now: Instant) -> bool {
        match self.last {
            None => true,
            Some((end, took)) => now >= end + MIN_GAP.max(took * COST_FACTOR),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_loss_is_answered_at_once() {
        let mut p = RescanPacing::default();
        assert!(p.lost(Instant::now()));
        assert_eq!(p.deferred(), 0);
    }

    #[test]
    fn losses_soon_after_a_rescan_share_one_later_rescan() {
        let t0 = Instant::now();
        let mut p = RescanPacing::default();
        assert!(p.lost(t0));
        p.done(t0, t0 + Duration::from_millis(10));
        let soon = t0 + Duration::from_millis(200);
        assert!(!p.lost(soon));
        assert!(!p.lost(soon + Duration::from_millis(100)));
        assert!(!p.due(soon + Duration::from_millis(500)));
        let later = t0 + Duration::from_millis(10) + MIN_GAP;
        assert!(p.due(later));
        // A loss reported before the owed rescan ran is covered by it.
        assert!(!p.lost(later));
        p.done(later, later + Duration::from_millis(10));
        assert!(
            !p.due(later + Duration::from_secs(60)),
            "nothing is owed any more"
        );
        assert_eq!(p.deferred(), 1);
    }

    #[test]
    fn a_costly_rescan_spaces_the_next_by_its_cost() {
        let t0 = Instant::now();
        let mut p = RescanPacing::default();
        assert!(p.lost(t0));
        let end = t0 + Duration::from_secs(3);
        p.done(t0, end);
        assert!(!p.lost(end + Duration::from_secs(2)));
        assert!(!p.due(end + Duration::from_secs(11)));
        assert!(p.due(end + Duration::from_secs(12)));
    }
}
