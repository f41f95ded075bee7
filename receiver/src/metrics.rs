//! The receiver's Prometheus metrics (`[metrics] listen`): per source, its health, what
//! its sessions applied, apply errors, and heartbeats.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use doppel_control::metrics::{labels, Exposition, Histograms};

use crate::control::{status, SourceStatus};
use crate::monitor::Health;
use crate::server::Slot;

/// The OpenMetrics text of one scrape.
pub fn render(slots: &HashMap<String, Arc<Slot>>, state_dir: &Path, rtt: &Histograms) -> String {
    let s = status(slots, state_dir);
    let mut e = Exposition::default();
    let src = |x: &SourceStatus| labels([("source", &x.source)]);
    let each = |f: fn(&SourceStatus) -> u64| {
        s.sources
            .iter()
            .map(move |x| (src(x), f(x)))
            .collect::<Vec<_>>()
    };
    e.gauge(
        "source_health",
        "1 for each source's health (from heartbeats), 0 for the others.",
        s.sources.iter().flat_map(|x| {
            Health::ALL.iter().map(move |h| {
                let mut l = src(x);
                l.push(("health".into(), h.to_string()));
                (l, (x.health == *h) as u8 as f64)
            })
        }),
    );
    e.gauge(
        "source_connected",
        "1 while a session with the source's agent runs.",
        s.sources.iter().map(|x| (src(x), x.connected as u8 as f64)),
    );
    e.counter(
        "sessions",
        "Sessions with the source.",
        each(|x| x.sessions),
    );
    e.counter(
        "session_errors",
        "Sessions with the source that ended in an error.",
        each(|x| x.session_errors),
    );
    e.counter(
        "applied_records",
        "Records applied to the replica (a resent record counts once).",
        each(|x| x.records_applied),
    );
    e.counter(
        "applied_bytes",
        "File data written to the replica.",
        each(|x| x.data_bytes_applied),
    );
    e.counter(
        "apply_errors",
        "Batches the receiver could not apply (it asks the agent to resend them).",
        each(|x| x.apply_errors),
    );
    e.counter(
        "heartbeats_sent",
        "Heartbeats sent to the source's agent.",
        each(|x| x.heartbeats_sent),
    );
    e.counter(
        "heartbeats_answered",
        "Heartbeats the source's agent echoed.",
        each(|x| x.heartbeats_answered),
    );
    e.gauge(
        "applied_seq",
        "Highest record applied, per set (its sequence restarts with each epoch).",
        s.sources.iter().flat_map(|x| {
            x.sets.iter().map(move |a| {
                (
                    labels([("source", &x.source), ("set", &a.set)]),
                    a.applied as f64,
                )
            })
        }),
    );
    e.gauge(
        "failed_over",
        "1 while this receiver has taken over the source.",
        s.sources
            .iter()
            .map(|x| (src(x), x.failed_over_at_ms.is_some() as u8 as f64)),
    );
    e.histograms(
        "heartbeat_rtt_seconds",
        "Round-trip time of heartbeats to the source's agent.",
        rtt,
    );
    e.render()
}
