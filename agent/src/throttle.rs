//! Bandwidth cap of one target: a byte rate that may depend on the local time of day,
//! enforced with a token bucket.
//!
//! Everything here is pure: the current time is always an argument (an [`Instant`] for
//! the bucket, a minute of the day for the schedule), so the tests simulate hours in
//! microseconds. Only [`local_minute_of_day`] reads a clock.

use std::time::{Duration, Instant};

/// Bytes per second; 0 means no limit.
pub type Rate = u64;

/// How many seconds' worth of bytes may go out back to back after an idle period. Small,
/// so that a cap also holds over short intervals (a link shared with other traffic
/// notices bursts, not averages).
const BURST_SECS: f64 = 0.25;

/// `[from, to)` in minutes since local midnight, with its own rate. `from > to` wraps
/// midnight (22:00-06:00 covers the night).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub from: u16,
    pub to: u16,
    pub limit: Rate,
}

impl Window {
    pub fn contains(&self, minute: u16) -> bool {
        if self.from <= self.to {
            self.from <= minute && minute < self.to
        } else {
            minute >= self.from || minute < self.to
        }
    }
}

/// The rate in force at each minute of the day: the first window that contains it, else
/// `default`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    pub default: Rate,
    pub windows: Vec<Window>,
}

impl Schedule {
    pub fn limit_at(&self, minute: u16) -> Rate {
        self.windows
            .iter()
            .find(|w| w.contains(minute))
            .map_or(self.default, |w| w.limit)
    }

    /// Never limits anything: the sender can skip the throttle entirely.
    pub fn is_unlimited(&self) -> bool {
        self.default == 0 && self.windows.iter().all(|w| w.limit == 0)
    }
}

/// Parses a local time of day written "HH:MM" (00:00 to 23:59) into minutes since
/// midnight.
pub fn parse_hhmm(s: &str) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    // Digits only: u16's parser would also take "+1".
    let two_digits = |x: &str| x.len() == 2 && x.bytes().all(|b| b.is_ascii_digit());
    if !two_digits(h) || !two_digits(m) {
        return None;
    }
    let h: u16 = h.parse().ok()?;
    let m: u16 = m.parse().ok()?;
    (h < 24 && m < 60).then_some(h * 60 + m)
}

/// A token bucket that may go into debt: a frame is sent once the balance is not
/// negative, and then its real (compressed) size is taken, however large. So a frame
/// bigger than the burst is never stuck, and over any interval T at most
/// `burst + rate * T + one frame` bytes go out.
#[derive(Debug, Clone, Default)]
pub struct TokenBucket {
    /// Balance in bytes and when it was last brought up to date; `None` = full.
    state: Option<(f64, Instant)>,
}

impl TokenBucket {
    fn burst(rate: Rate) -> f64 {
        rate as f64 * BURST_SECS
    }

    /// The balance at `now`, refilled at `rate` since the last update, capped at the burst.
    fn balance(&self, rate: Rate, now: Instant) -> f64 {
        let burst = Self::burst(rate);
        match self.state {
            None => burst,
            Some((tokens, at)) => {
                // An `at` after `now` (callers racing clocks) refills nothing.
                let dt = now.saturating_duration_since(at).as_secs_f64();
                (tokens + rate as f64 * dt).min(burst)
            }
        }
    }

    /// How long to wait, from `now`, before the next frame may go at `rate`.
    pub fn delay(&mut self, rate: Rate, now: Instant) -> Duration {
        if rate == 0 {
            // Unlimited: forget any debt, so that a later limit starts with a full bucket.
            self.state = None;
            return Duration::ZERO;
        }
        let tokens = self.balance(rate, now);
        self.state = Some((tokens, now));
        if tokens >= 0.0 {
            return Duration::ZERO;
        }
        // Finite and positive (rate > 0); try_from only guards against absurd debts.
        Duration::try_from_secs_f64(-tokens / rate as f64).unwrap_or(Duration::MAX)
    }

    /// Takes `bytes` that were just sent at `rate`.
    pub fn spend(&mut self, bytes: u64, rate: Rate, now: Instant) {
        if rate == 0 {
            self.state = None;
            return;
        }
        let tokens = self.balance(rate, now) - bytes as f64;
        self.state = Some((tokens, now));
    }
}

/// A target's schedule and bucket together.
#[derive(Debug, Clone, Default)]
pub struct Throttle {
    schedule: Schedule,
    bucket: TokenBucket,
}

impl Throttle {
    pub fn new(schedule: Schedule) -> Self {
        Throttle {
            schedule,
            bucket: TokenBucket::default(),
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.schedule.is_unlimited()
    }

    /// How long to wait before the next frame, at `now` and local `minute` of the day.
    pub fn delay(&mut self, now: Instant, minute: u16) -> Duration {
        let rate = self.schedule.limit_at(minute);
        self.bucket.delay(rate, now)
    }

    /// Accounts `bytes` just sent.
    pub fn spend(&mut self, bytes: u64, now: Instant, minute: u16) {
        let rate = self.schedule.limit_at(minute);
        self.bucket.spend(bytes, rate, now)
    }
}

/// Minutes since local midnight (the host's time zone), for [`Schedule::limit_at`].
/// UTC if the local time cannot be determined.
pub fn local_minute_of_day() -> u16 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as libc::time_t;
    // SAFETY: localtime_r only writes the struct it is given; a zeroed tm is valid.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = !unsafe { libc::localtime_r(&now, &mut tm) }.is_null();
    if ok && (0..24).contains(&tm.tm_hour) && (0..60).contains(&tm.tm_min) {
        (tm.tm_hour * 60 + tm.tm_min) as u16
    } else {
        ((now.rem_euclid(86_400)) / 60) as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hm(s: &str) -> u16 {
        parse_hhmm(s).unwrap()
    }

    #[test]
    fn times_parse_strictly() {
        assert_eq!(parse_hhmm("00:00"), Some(0));
        assert_eq!(parse_hhmm("23:59"), Some(23 * 60 + 59));
        assert_eq!(parse_hhmm("08:30"), Some(510));
        for bad in [
            "24:00", "12:60", "8:30", "08:3", "0830", "", "ab:cd", "-1:00", "+1:00",
        ] {
            assert_eq!(parse_hhmm(bad), None, "{bad}");
        }
    }

    #[test]
    fn first_matching_window_wins_and_night_wraps_midnight() {
        let s = Schedule {
            default: 100,
            windows: vec![
                // Office hours: slow.
                Window {
                    from: hm("08:00"),
                    to: hm("18:00"),
                    limit: 10,
                },
                // Overlaps the first; never wins before 18:00.
                Window {
                    from: hm("17:00"),
                    to: hm("19:00"),
                    limit: 20,
                },
                // The night, across midnight: unlimited.
                Window {
                    from: hm("22:00"),
                    to: hm("06:00"),
                    limit: 0,
                },
            ],
        };
        assert_eq!(s.limit_at(hm("07:59")), 100);
        assert_eq!(s.limit_at(hm("08:00")), 10);
        assert_eq!(s.limit_at(hm("17:30")), 10);
        assert_eq!(s.limit_at(hm("18:00")), 20);
        assert_eq!(s.limit_at(hm("19:00")), 100);
        assert_eq!(s.limit_at(hm("22:00")), 0);
        assert_eq!(s.limit_at(hm("23:59")), 0);
        assert_eq!(s.limit_at(hm("00:00")), 0);
        assert_eq!(s.limit_at(hm("05:59")), 0);
        assert_eq!(s.limit_at(hm("06:00")), 100);
        assert!(!s.is_unlimited());
        assert!(Schedule::default().is_unlimited());
    }

    /// Sends frames of `frame` bytes as fast as the bucket allows for `secs` of simulated
    /// time; returns (time, bytes sent so far) after each frame.
    fn simulate(rate: Rate, frame: u64, secs: u64) -> Vec<(Duration, u64)> {
        let t0 = Instant::now();
        let mut now = t0;
        let mut b = TokenBucket::default();
        let mut sent = 0;
        let mut log = Vec::new();
        while now - t0 < Duration::from_secs(secs) {
            now += b.delay(rate, now);
            assert_eq!(b.delay(rate, now), Duration::ZERO, "waited enough");
            b.spend(frame, rate, now);
            sent += frame;
            log.push((now - t0, sent));
        }
        log
    }

    #[test]
    fn the_rate_holds_over_simulated_time() {
        for (rate, frame) in [(2_000_000, 1 << 20), (1_000, 100), (10_000_000, 4096)] {
            let log = simulate(rate, frame, 60);
            let (t, sent) = *log.last().unwrap();
            // Whatever went out by t is at most the burst, the rate over t and one frame...
            let most = rate as f64 * (t.as_secs_f64() + BURST_SECS) + frame as f64;
            assert!(sent as f64 <= most + 1.0, "{rate}: {sent} > {most}");
            // ... and the bucket does not slow it down below the rate either.
            let least = rate as f64 * t.as_secs_f64();
            assert!(sent as f64 >= least, "{rate}: {sent} < {least}");
        }
    }

    #[test]
    fn bursts_are_bounded_even_after_a_long_idle_time() {
        let rate = 1_000_000;
        let t0 = Instant::now();
        let mut b = TokenBucket::default();
        b.spend(10, rate, t0);
        // An hour idle refills only the burst, not an hour's worth.
        let now = t0 + Duration::from_secs(3600);
        let mut free = 0;
        while b.delay(rate, now).is_zero() {
            b.spend(1000, rate, now);
            free += 1000;
        }
        assert!(free as f64 <= rate as f64 * BURST_SECS + 1000.0, "{free}");
        // A frame bigger than the burst is not stuck: it waits for its debt, no more.
        let mut b = TokenBucket::default();
        assert_eq!(b.delay(rate, t0), Duration::ZERO);
        b.spend(4 << 20, rate, t0);
        let d = b.delay(rate, t0);
        let expect = ((4 << 20) as f64 - rate as f64 * BURST_SECS) / rate as f64;
        assert!((d.as_secs_f64() - expect).abs() < 1e-6, "{d:?}");
    }

    #[test]
    fn unlimited_never_waits_and_forgets_debt() {
        let t0 = Instant::now();
        let mut t = Throttle::new(Schedule {
            default: 1000,
            windows: vec![Window {
                from: hm("23:00"),
                to: hm("01:00"),
                limit: 0,
            }],
        });
        let day = hm("12:00");
        let night = hm("00:30");
        t.spend(1_000_000, t0, day);
        assert!(t.delay(t0, day) > Duration::from_secs(900));
        // At night the limit is off: no wait, and the day's debt is gone the next day.
        assert_eq!(t.delay(t0, night), Duration::ZERO);
        t.spend(u64::MAX, t0, night);
        assert_eq!(t.delay(t0, day), Duration::ZERO);
    }

    #[test]
    fn the_local_clock_gives_a_minute_of_the_day() {
        assert!(local_minute_of_day() < 24 * 60);
    }
}
