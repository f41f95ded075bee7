//! Throughput over the last [`WINDOW`], from a running total sampled as it grows.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub const WINDOW: Duration = Duration::from_secs(10);
const EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Default, Clone)]
pub struct Rate {
    /// (when, total then), oldest first; the first is at or before the window's start
    /// once there is history that old.
    samples: VecDeque<(Instant, u64)>,
}

impl Rate {
    /// A rate whose total was zero at `start`.
    pub fn since(start: Instant) -> Self {
        Rate {
            samples: VecDeque::from([(start, 0)]),
        }
    }

    /// The total is `total` at `now`.
    pub fn note(&mut self, now: Instant, total: u64) {
        if self
            .samples
            .back()
            .is_none_or(|&(t, _)| now.saturating_duration_since(t) >= EVERY)
        {
            self.samples.push_back((now, total));
        }
        let start = now.checked_sub(WINDOW);
        while self.samples.len() >= 2 && start.is_some_and(|s| self.samples[1].0 <= s) {
            self.samples.pop_front();
        }
    }

    /// Units per second over the last `WINDOW` (or since the first sample, if younger),
    /// given the total now.
    pub fn per_sec(&self, now: Instant, total: u64) -> f64 {
        let start = now.checked_sub(WINDOW);
        // The newest sample at or before the window's start is the baseline; without
        // one, the oldest sample.
        let base = self
            .samples
            .iter()
            .rev()
            .find(|&&(t, _)| start.is_some_and(|s| t <= s))
            .or(self.samples.front());
        let Some(&(t, v)) = base else {
            return 0.0;
        };
        let span = now
            .saturating_duration_since(t)
            .clamp(Duration::from_secs(1), WINDOW);
        total.saturating_sub(v) as f64 / span.as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_over_the_window_then_zero_when_idle() {
        let t0 = Instant::now() + Duration::from_secs(100);
        let mut r = Rate::default();
        for i in 0..=20u64 {
            r.note(t0 + Duration::from_secs(i), i * 1000);
        }
        let now = t0 + Duration::from_secs(20);
        assert_eq!(r.per_sec(now, 20_000), 1000.0);
        // Nothing more for a minute: nothing over the last window.
        let later = now + Duration::from_secs(60);
        assert_eq!(r.per_sec(later, 20_000), 0.0);
        assert!(r.samples.len() <= 12);
    }

    #[test]
    fn a_young_rate_counts_from_its_first_sample() {
        let t0 = Instant::now();
        let mut r = Rate::default();
        r.note(t0, 0);
        assert_eq!(r.per_sec(t0 + Duration::from_secs(2), 4000), 2000.0);
        assert_eq!(Rate::default().per_sec(t0, 5), 0.0);
    }

    #[test]
    fn a_burst_soon_after_the_start_is_spread_over_the_time_since() {
        let t0 = Instant::now();
        let mut r = Rate::since(t0);
        // 1 MB at 4 s, then 1 MB more at 5 s: 2 MB over the 5 s since the start.
        r.note(t0 + Duration::from_secs(4), 1_000_000);
        r.note(t0 + Duration::from_secs(5), 2_000_000);
        assert_eq!(r.per_sec(t0 + Duration::from_secs(5), 2_000_000), 400_000.0);
    }
}
