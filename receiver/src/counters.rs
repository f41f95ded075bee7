//! What each source's sessions did since the receiver started, for `status` and the
//! metrics endpoint. Written by sessions, read by the control socket and scrapes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use doppel_control::metrics::Histogram;

#[derive(Debug)]
pub struct Counters {
    pub sessions: AtomicU64,
    /// Sessions that ended in an error (protocol, disk, gap).
    pub session_errors: AtomicU64,
    /// Records applied the first time (a resent record counts once), and their file data.
    pub records_applied: AtomicU64,
    pub data_bytes_applied: AtomicU64,
    /// Batches that could not be applied (a failing disk, a path escaping its root...).
    pub apply_errors: AtomicU64,
    pub heartbeats_sent: AtomicU64,
    pub heartbeats_answered: AtomicU64,
    /// Heartbeat round-trip times, seconds.
    pub rtt: Histogram,
    /// The newest error: of a session, of applying a batch, or of an automatic failover.
    pub last_error: Mutex<Option<(SystemTime, String)>>,
}

impl Counters {
    pub fn new(rtt: Histogram) -> Self {
        Counters {
            sessions: AtomicU64::new(0),
            session_errors: AtomicU64::new(0),
            records_applied: AtomicU64::new(0),
            data_bytes_applied: AtomicU64::new(0),
            apply_errors: AtomicU64::new(0),
            heartbeats_sent: AtomicU64::new(0),
            heartbeats_answered: AtomicU64::new(0),
            rtt,
            last_error: Mutex::new(None),
        }
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Notes an error (and when) for `status`.
    pub fn error(&self, message: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((SystemTime::now(), message));
    }

    pub fn last_error(&self) -> Option<(SystemTime, String)> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
