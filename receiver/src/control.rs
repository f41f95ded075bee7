//! The receiver's control socket, `<state_dir>/control.sock` (root only): how
//! `doppel-receiver status` and `failover` talk to the running daemon (transport in
//! `doppel-control`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;

use crate::counters::Counters;
use crate::failover::{self, Options, Report};
use crate::monitor::Health;
use crate::server::Slot;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status,
    Failover {
        source: String,
        #[serde(default)]
        dry_run: bool,
        #[serde(default)]
        force: bool,
    },
    Failback {
        source: String,
        #[serde(default)]
        dry_run: bool,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reply {
    Status(Status),
    Report(Report),
    Error(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceStatus {
    pub source: String,
    pub health: Health,
    pub connected: bool,
    /// Since the last heartbeat (or the session start), if any.
    pub last_beat_ms: Option<u64>,
    pub rtt_ms: Option<f64>,
    pub heartbeat_ms: u64,
    pub missed_beats: u32,
    pub auto_failover: bool,
    /// Unix time (ms) of the failover, while failed over.
    pub failed_over_at_ms: Option<u64>,
    /// The newest error: of a session, of applying a batch, or of an automatic failover.
    pub last_error: Option<String>,
    pub last_error_at_ms: Option<u64>,
    /// Since the receiver started.
    pub sessions: u64,
    pub session_errors: u64,
    pub records_applied: u64,
    pub data_bytes_applied: u64,
    pub apply_errors: u64,
    pub heartbeats_sent: u64,
    pub heartbeats_answered: u64,
    /// Where each of the source's sets stands (from the state files).
    pub sets: Vec<SetApplied>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetApplied {
    pub set: String,
    pub epoch: u64,
    /// Highest record applied (and durable with fsync on).
    pub applied: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub sources: Vec<SourceStatus>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn status(slots: &HashMap<String, Arc<Slot>>, state_dir: &std::path::Path) -> Status {
    let mut sources: Vec<SourceStatus> = slots
        .values()
        .map(|slot| {
            let src = slot.source();
            let (health, since) = slot.health();
            let (rtt, connected) = slot.beat_info();
            let c = &slot.ctx().counters;
            let err = c.last_error();
            let store = slot.store();
            let sets = store
                .sets(&src.name)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|set| {
                    let st = store.load(&src.name, &set).ok().flatten()?;
                    Some(SetApplied {
                        set,
                        epoch: st.epoch,
                        applied: st.seq,
                    })
                })
                .collect();
            let n = Counters::get;
            let record = failover::Record::load(state_dir, &src.name).ok().flatten();
            SourceStatus {
                source: src.name.clone(),
                health,
                connected,
                last_beat_ms: since.map(|d| d.as_millis() as u64),
                rtt_ms: rtt.map(|d| d.as_secs_f64() * 1e3),
                heartbeat_ms: src.monitor.interval.as_millis() as u64,
                missed_beats: src.monitor.threshold,
                auto_failover: src.failover.auto,
                failed_over_at_ms: record.map(|r| r.at_ms),
                last_error_at_ms: err.as_ref().map(|(t, _)| unix_ms(*t)),
                last_error: err.map(|(_, e)| e),
                sessions: n(&c.sessions),
                session_errors: n(&c.session_errors),
                records_applied: n(&c.records_applied),
                data_bytes_applied: n(&c.data_bytes_applied),
                apply_errors: n(&c.apply_errors),
                heartbeats_sent: n(&c.heartbeats_sent),
                heartbeats_answered: n(&c.heartbeats_answered),
                sets,
            }
        })
        .collect();
    sources.sort_by(|a, b| a.source.cmp(&b.source));
    Status { sources }
}

/// Answers requests until the process ends.
pub async fn serve(
    listener: UnixListener,
    slots: Arc<HashMap<String, Arc<Slot>>>,
    state_dir: PathBuf,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::error!("control socket: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let slots = slots.clone();
        let state_dir = state_dir.clone();
        tokio::spawn(async move {
            let r = async {
                let (req, mut conn) = doppel_control::Conn::accept::<Request>(stream).await?;
                let reply = match req {
                    Err(e) => Reply::Error(e),
                    Ok(Request::Status) => Reply::Status(status(&slots, &state_dir)),
                    Ok(Request::Failback { source, dry_run }) => match slot(&slots, &source) {
                        Err(e) => e,
                        Ok(slot) => {
                            let _guard = slot.switching.lock().await;
                            tracing::warn!(%source, dry_run, "failback requested");
                            let opts = Options {
                                dry_run,
                                force: false,
                            };
                            Reply::Report(
                                failover::failback::failback(slot, &state_dir, slot.store(), opts)
                                    .await,
                            )
                        }
                    },
                    Ok(Request::Failover {
                        source,
                        dry_run,
                        force,
                    }) => match slot(&slots, &source) {
                        Err(e) => e,
                        Ok(slot) => {
                            let _guard = slot.switching.lock().await;
                            tracing::warn!(%source, dry_run, force, "failover requested");
                            Reply::Report(
                                failover::failover(slot, &state_dir, Options { dry_run, force })
                                    .await,
                            )
                        }
                    },
                };
                conn.reply(&reply).await?;
                conn.close().await
            };
            if let Err(e) = r.await {
                tracing::warn!("control request failed: {e:#}");
            }
        });
    }
}

/// The slot of the source named `name`, or the error reply naming the configured ones.
fn slot<'a>(slots: &'a HashMap<String, Arc<Slot>>, name: &str) -> Result<&'a Arc<Slot>, Reply> {
    slots
        .values()
        .find(|s| s.source().name == name)
        .ok_or_else(|| {
            let mut n: Vec<&str> = slots.values().map(|s| s.source().name.as_str()).collect();
            n.sort();
            Reply::Error(format!(
                "no source named {name:?} in this receiver's config (it has {})",
                n.join(", ")
            ))
        })
}

/// Sends `req` to the receiver listening at `path`.
pub fn call(
    path: &std::path::Path,
    req: &Request,
    on_reply: impl FnMut(Reply),
) -> anyhow::Result<()> {
    doppel_control::call(path, "the receiver", req, on_reply)
}
