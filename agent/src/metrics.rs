//! The agent's Prometheus metrics (`[metrics] listen`): the numbers of `status`, as
//! series, plus the acknowledgement-latency histograms.

use doppel_control::metrics::{labels, Exposition, Labels};

use crate::control::{SetStatus, State};
use crate::send::Shared;

/// The OpenMetrics text of one scrape.
pub fn render(shared: &Shared) -> String {
    let s = shared.status();
    let mut e = Exposition::default();
    let none = Labels::new;
    let row = |x: &SetStatus| labels([("set", &x.set), ("target", &x.target)]);
    // Set-wide numbers appear once per set, target-wide ones once per target.
    let mut per_set: Vec<&SetStatus> = Vec::new();
    let mut per_target: Vec<&SetStatus> = Vec::new();
    for x in &s.sets {
        if !per_set.iter().any(|y| y.set == x.set) {
            per_set.push(x);
        }
        if !per_target.iter().any(|y| y.target == x.target) {
            per_target.push(x);
        }
    }
    let set = |x: &SetStatus| labels([("set", &x.set)]);
    let target = |x: &SetStatus| labels([("target", &x.target)]);

    let c = &s.capture;
    e.counter(
        "capture_events",
        "Change records the kernel program put into its ring.",
        [(none(), c.events)],
    );
    e.counter(
        "capture_data_bytes",
        "File data the kernel program copied into its ring.",
        [(none(), c.data_bytes)],
    );
    e.counter(
        "capture_missed_ranges",
        "Changes recorded as ranges (re-read from the file) because the ring was full.",
        [(none(), c.missed_ranges)],
    );
    e.counter(
        "capture_lost",
        "Changes lost because the ring and the missed-range map were full (run verify --repair).",
        [(none(), c.lost)],
    );
    e.counter(
        "capture_refused",
        "Directories and hard-linked files the kernel's maps had no room for (their changes are not captured).",
        [(none(), c.refused)],
    );
    e.counter(
        "queued_bytes",
        "File data queued for replication, per set.",
        per_set.iter().map(|x| (set(x), x.queued_bytes)),
    );
    e.counter(
        "journal_dropped_records",
        "Changes dropped at the journal budget (their files are copied again later), per set.",
        per_set.iter().map(|x| (set(x), x.dropped_records)),
    );
    e.gauge(
        "queue_memory_bytes",
        "Bytes of the set's queue held in memory.",
        per_set.iter().map(|x| (set(x), x.memory_bytes as f64)),
    );
    e.gauge(
        "journal_bytes",
        "Bytes of the set's on-disk journal (whole segments).",
        per_set.iter().map(|x| (set(x), x.journal_bytes as f64)),
    );
    e.gauge(
        "journal_overflowed",
        "1 while the set's journal budget is exceeded and changes are being dropped.",
        per_set.iter().map(|x| (set(x), x.overflowed as u8 as f64)),
    );
    e.gauge(
        "state",
        "1 for the state each set is in with each target, 0 for the others.",
        s.sets.iter().flat_map(|x| {
            State::ALL.iter().map(move |st| {
                let mut l = row(x);
                l.push(("state".into(), st.as_str().into()));
                (l, (x.state == *st) as u8 as f64)
            })
        }),
    );
    e.gauge(
        "lag_seconds",
        "Age of the oldest change the target has not acknowledged.",
        s.sets.iter().map(|x| (row(x), x.lag_seconds)),
    );
    e.gauge(
        "lag_records",
        "Changes the target has not acknowledged.",
        s.sets.iter().map(|x| (row(x), x.lag_records as f64)),
    );
    e.gauge(
        "lag_bytes",
        "Bytes of changes the target has not acknowledged (approximate).",
        s.sets.iter().map(|x| (row(x), x.lag_bytes as f64)),
    );
    e.counter(
        "sent_bytes",
        "File data of the set handed to the target's session.",
        s.sets.iter().map(|x| (row(x), x.set_sent_bytes)),
    );
    e.gauge(
        "mirror_pending",
        "Mirror comparisons the target has not answered yet.",
        s.sets.iter().map(|x| (row(x), x.mirror_pending as f64)),
    );
    e.gauge(
        "crash_consistent",
        "1 while the target's replica of the set shows a state the source went through (no bytes read back from a file applied since it last caught up).",
        s.sets.iter().map(|x| (row(x), x.crash_consistent as u8 as f64)),
    );
    e.gauge(
        "connected",
        "1 while a session with the target is up.",
        per_target
            .iter()
            .map(|x| (target(x), x.connected as u8 as f64)),
    );
    e.counter(
        "wire_bytes",
        "UDP bytes exchanged with the target, both ways (QUIC, TLS and framing included).",
        per_target.iter().map(|x| (target(x), x.wire_bytes)),
    );
    e.counter(
        "sessions",
        "Sessions established with the target.",
        per_target.iter().map(|x| (target(x), x.sessions)),
    );
    e.counter(
        "session_failures",
        "Sessions with the target that ended in an error (see status for the last one).",
        per_target.iter().map(|x| (target(x), x.failures)),
    );
    e.gauge(
        "synced",
        "1 when every change queued is acknowledged by every target and no comparison is pending.",
        [(none(), s.synced as u8 as f64)],
    );
    e.histograms(
        "ack_latency_seconds",
        "Time from queueing a change to the target's acknowledgement that it is applied.",
        &shared.ack_latency_family,
    );
    e.render()
}
