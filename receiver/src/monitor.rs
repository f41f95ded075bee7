//! Is a source alive? A sans-IO account of its heartbeats.
//!
//! While a session runs, the receiver sends a small QUIC datagram every `interval` and
//! the agent echoes it at once ([`heartbeat`] has the bytes). Datagrams bypass stream
//! flow control, so a source whose batches queue behind a slow disk still answers at
//! once: silence means the host, its agent or the network between them is gone. Each echo
//! is a beat; the time since the last one, in whole intervals, is the number of missed
//! beats:
//!
//! | missed beats            | health    |
//! |-------------------------|-----------|
//! | never connected         | `unknown` |
//! | < 2                     | `alive`   |
//! | 2 ..= threshold - 1     | `suspect` |
//! | >= threshold            | `lost`    |
//!
//! A source whose agent ended its session in an orderly way is `stopped` (a restart or
//! maintenance, not a death), and one that was failed over is `failed-over`. Only `lost`
//! arms automatic failover, and only once per loss: the source must be seen alive again
//! before another loss can trigger it.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    Unknown,
    Alive,
    Suspect,
    Lost,
    Stopped,
    FailedOver,
}

impl Health {
    pub const ALL: [Health; 6] = [
        Health::Unknown,
        Health::Alive,
        Health::Suspect,
        Health::Lost,
        Health::Stopped,
        Health::FailedOver,
    ];
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Health::Unknown => "unknown",
            Health::Alive => "alive",
            Health::Suspect => "suspect",
            Health::Lost => "lost",
            Health::Stopped => "stopped",
            Health::FailedOver => "failed-over",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub interval: Duration,
    /// Missed beats after which the source is lost (at least 2).
    pub threshold: u32,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            interval: Duration::from_millis(200),
            threshold: 5,
        }
    }
}

#[derive(Debug)]
pub struct Monitor {
    settings: Settings,
    last_beat: Option<Instant>,
    rtt: Option<Duration>,
    sessions: u64,
    stopped: bool,
    failed_over: bool,
    /// A loss was already reported by [`Monitor::poll_lost`] and no beat came since.
    loss_reported: bool,
}

impl Monitor {
    pub fn new(settings: Settings, failed_over: bool) -> Monitor {
        Monitor {
            settings,
            last_beat: None,
            rtt: None,
            sessions: 0,
            stopped: false,
            failed_over,
            loss_reported: false,
        }
    }

    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// A session started: the handshake itself proves the source alive.
    pub fn connected(&mut self, now: Instant) {
        self.sessions += 1;
        self.stopped = false;
        self.beat(now, None);
    }

    /// An echo arrived.
    pub fn beat(&mut self, now: Instant, rtt: Option<Duration>) {
        self.last_beat = Some(now);
        self.loss_reported = false;
        if rtt.is_some() {
            self.rtt = rtt;
        }
    }

    /// The session ended; `orderly` when the agent said goodbye (it is stopping), not
    /// when the connection timed out or broke.
    pub fn ended(&mut self, orderly: bool) {
        if orderly {
            self.stopped = true;
        }
    }

    pub fn set_failed_over(&mut self, yes: bool) {
        self.failed_over = yes;
        if !yes {
            // After a failback the source starts over: unknown until it connects.
            self.last_beat = None;
            self.loss_reported = false;
        }
    }

    /// Whole intervals since the last beat.
    pub fn missed(&self, now: Instant) -> Option<u32> {
        let since = now.saturating_duration_since(self.last_beat?);
        Some(
            (since.as_nanos() / self.settings.interval.as_nanos().max(1)).min(u32::MAX as u128)
                as u32,
        )
    }

    pub fn since_beat(&self, now: Instant) -> Option<Duration> {
        self.last_beat.map(|b| now.saturating_duration_since(b))
    }

    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    pub fn health(&self, now: Instant) -> Health {
        if self.failed_over {
            return Health::FailedOver;
        }
        if self.stopped {
            return Health::Stopped;
        }
        match self.missed(now) {
            None => Health::Unknown,
            Some(m) if m < 2 => Health::Alive,
            Some(m) if m < self.settings.threshold => Health::Suspect,
            Some(_) => Health::Lost,
        }
    }

    /// `true` once when the source becomes lost: the moment automatic failover acts.
    pub fn poll_lost(&mut self, now: Instant) -> bool {
        if self.health(now) == Health::Lost && !self.loss_reported {
            self.loss_reported = true;
            return true;
        }
        false
    }
}

/// The heartbeat datagram: a magic, a sequence number and the sender's clock, echoed back
/// unchanged by the agent.
pub mod heartbeat {
    use std::time::Duration;

    pub const MAGIC: &[u8; 4] = b"dphb";
    pub const LEN: usize = 20;

    pub fn encode(seq: u64, sent: Duration) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[..4].copy_from_slice(MAGIC);
        b[4..12].copy_from_slice(&seq.to_le_bytes());
        b[12..20].copy_from_slice(&(sent.as_nanos() as u64).to_le_bytes());
        b
    }

    /// The sequence number and send time of an echo, or `None` for anything else.
    pub fn decode(b: &[u8]) -> Option<(u64, Duration)> {
        if b.len() != LEN || &b[..4] != MAGIC {
            return None;
        }
        let seq = u64::from_le_bytes(b[4..12].try_into().ok()?);
        let sent = u64::from_le_bytes(b[12..20].try_into().ok()?);
        Some((seq, Duration::from_nanos(sent)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn health_follows_missed_beats_and_loss_fires_once() {
        let t0 = Instant::now();
        let mut m = Monitor::new(Settings::default(), false);
        assert_eq!(m.health(t0), Health::Unknown);
        assert!(!m.poll_lost(t0 + 10_000 * MS), "never seen is not lost");
        m.connected(t0);
        assert_eq!(m.health(t0 + 399 * MS), Health::Alive);
        assert_eq!(m.health(t0 + 400 * MS), Health::Suspect);
        assert_eq!(m.health(t0 + 999 * MS), Health::Suspect);
        assert!(!m.poll_lost(t0 + 999 * MS));
        assert_eq!(m.health(t0 + 1000 * MS), Health::Lost);
        assert!(m.poll_lost(t0 + 1000 * MS));
        assert!(!m.poll_lost(t0 + 1200 * MS), "a loss fires once");
        m.beat(t0 + 1300 * MS, Some(MS));
        assert_eq!(m.health(t0 + 1300 * MS), Health::Alive);
        assert_eq!(m.rtt(), Some(MS));
        assert!(
            m.poll_lost(t0 + 2300 * MS),
            "a new loss after a beat fires again"
        );
    }

    #[test]
    fn an_orderly_end_is_stopped_not_lost() {
        let t0 = Instant::now();
        let mut m = Monitor::new(Settings::default(), false);
        m.connected(t0);
        m.ended(true);
        assert_eq!(m.health(t0 + 60_000 * MS), Health::Stopped);
        assert!(!m.poll_lost(t0 + 60_000 * MS));
        m.connected(t0 + 60_000 * MS);
        m.ended(false);
        assert!(m.poll_lost(t0 + 61_000 * MS), "a broken session is a loss");
    }

    #[test]
    fn failed_over_wins_and_failback_starts_over() {
        let t0 = Instant::now();
        let mut m = Monitor::new(Settings::default(), true);
        m.connected(t0);
        assert_eq!(m.health(t0), Health::FailedOver);
        assert!(!m.poll_lost(t0 + 60_000 * MS));
        m.set_failed_over(false);
        assert_eq!(m.health(t0), Health::Unknown);
    }

    #[test]
    fn heartbeats_round_trip_and_garbage_is_ignored() {
        let b = heartbeat::encode(7, Duration::from_nanos(123_456));
        assert_eq!(
            heartbeat::decode(&b),
            Some((7, Duration::from_nanos(123_456)))
        );
        assert_eq!(heartbeat::decode(&b[..19]), None);
        let mut bad = b;
        bad[0] = b'x';
        assert_eq!(heartbeat::decode(&bad), None);
    }
}
