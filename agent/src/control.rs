//! The control socket, `<state_dir>/control.sock` (mode 0600: root only): how the
//! `doppel-agent` commands talk to the running daemon.
//!
//! One request per connection, a JSON line; the daemon answers with JSON lines until the
//! request is done, then closes. Both ends are here: [`serve`] in the daemon, [`call`]
//! in the command.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{info, warn};

use std::sync::Arc;

use std::sync::atomic::Ordering;

use crate::capture::CaptureStats;
use crate::queue::QueueMode;
use crate::send::Shared;
use crate::verify::{Progress, Report};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Where every set stands with every target.
    Status,
    /// Compare sets (all when `set` is `None`) with every target's replica.
    Verify {
        set: Option<String>,
        #[serde(default)]
        repair: bool,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reply {
    Status(Status),
    Progress(Progress),
    Report(Report),
    Error(String),
}

/// Where one set stands with one target, worst first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// The receiver took over this source (`doppel-receiver failover`): nothing is
    /// replicated to it until it fails back.
    FailedOver,
    /// No session with the target; changes queue up.
    Disconnected,
    /// Connected, but the replica is known to miss changes or to lag too far (see
    /// `reason`).
    Degraded,
    /// Connected and comparing the set with the replica (initial mirror or resync).
    Mirroring,
    /// Connected, mirrored, and keeping up.
    Protected,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::FailedOver => "failed-over",
            State::Disconnected => "disconnected",
            State::Degraded => "degraded",
            State::Mirroring => "mirroring",
            State::Protected => "protected",
        }
    }

    pub const ALL: [State; 5] = [
        State::FailedOver,
        State::Disconnected,
        State::Degraded,
        State::Mirroring,
        State::Protected,
    ];
}

/// What decides a set's state with a target (see [`judge`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Facts {
    pub connected: bool,
    pub failed_over: bool,
    pub scanning: bool,
    /// Comparisons of this set the target has not answered.
    pub mirror_pending: u64,
    /// The journal budget was hit: changes are dropped until the targets catch up, then
    /// the touched files are copied again.
    pub overflowed: bool,
    pub lag_seconds: f64,
    pub degraded_lag_seconds: f64,
    /// Changes the capture lost since the agent started (ring and missed-range map full).
    pub capture_lost: u64,
    /// Additions of directories and hard-linked files the kernel's maps refused (full).
    pub capture_refused: u64,
}

/// A set's state with a target, and why when it is not protected.
pub fn judge(f: &Facts) -> (State, String) {
    if !f.connected && f.failed_over {
        return (
            State::FailedOver,
            "the target took over this source; fail back with `doppel-receiver failback` there"
                .into(),
        );
    }
    if !f.connected {
        return (State::Disconnected, "no session; see last_error".into());
    }
    if f.overflowed {
        return (State::Degraded, "the journal budget was reached: changes are dropped until the target catches up, then the touched files are copied again; raise journal_budget_mib".into());
    }
    if f.capture_lost > 0 {
        return (State::Degraded, format!("the capture lost {} changes (its ring was full): run `doppel-agent verify --repair`, and raise capture_ring_kib", f.capture_lost));
    }
    if f.capture_refused > 0 {
        return (State::Degraded, format!("the kernel's maps were full for {} additions (at most {} watched directories, {} hard-linked files): changes through the directories or hard links left out are not captured; see the agent's log", f.capture_refused, doppel_common::abi::WATCHED_DIRS_MAX, doppel_common::abi::LINKED_FILES_MAX));
    }
    if f.lag_seconds >= f.degraded_lag_seconds {
        return (State::Degraded, format!("the oldest unacknowledged change is {:.0} s old (degraded_lag_s = {}): the target or the link is too slow", f.lag_seconds, f.degraded_lag_seconds));
    }
    if f.scanning || f.mirror_pending > 0 {
        return (
            State::Mirroring,
            format!("{} comparisons pending", f.mirror_pending),
        );
    }
    (State::Protected, String::new())
}

/// One set towards one target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetStatus {
    pub set: String,
    pub target: String,
    pub state: State,
    /// Why the state is not `protected` (empty when it is).
    pub reason: String,
    pub queue: QueueMode,
    pub connected: bool,
    /// Last sequence number queued, and the last one the target acknowledged.
    pub last_seq: u64,
    pub acked: u64,
    pub lag_records: u64,
    pub lag_bytes: u64,
    /// How long the oldest change the target has not acknowledged has waited.
    pub lag_seconds: f64,
    /// The set's queue: bytes in memory and in the journal (whole segments), and whether
    /// a hybrid queue spilled to the journal.
    pub memory_bytes: u64,
    pub journal_bytes: u64,
    pub spilled: bool,
    /// File data queued for the set since the agent started.
    pub queued_bytes: u64,
    /// File data of this set handed to the target, and per second over the last 10 s.
    pub set_sent_bytes: u64,
    pub bytes_per_sec: f64,
    /// Mirror comparisons of this set the target has not answered yet.
    pub mirror_pending: u64,
    /// Changes dropped at the journal budget (copied again later), and whether that is
    /// going on now.
    pub dropped_records: u64,
    pub overflowed: bool,
    /// File data sent to the target (all sets), and UDP bytes exchanged with it both
    /// ways (QUIC, TLS and framing included).
    pub sent_bytes: u64,
    pub wire_bytes: u64,
    /// Sessions with the target so far, and how many ended in an error.
    pub sessions: u64,
    pub failures: u64,
    pub last_error: Option<LastError>,
    /// The target's replica of the set shows a state the source went through: every
    /// byte applied since it last caught up was captured as it was written, in order.
    /// False from the moment bytes had to be read back from a file (a write larger than
    /// the capture copies, Linux AIO, a full ring, stores through a mapping, the
    /// mirror) until the target has applied them with nothing newer pending.
    #[serde(default = "yes")]
    pub crash_consistent: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastError {
    /// RFC 3339, UTC.
    pub at: String,
    pub unix_ms: u64,
    pub message: String,
}

impl LastError {
    fn new(at: std::time::SystemTime, message: &str) -> Self {
        LastError {
            at: humantime::format_rfc3339_seconds(at).to_string(),
            unix_ms: at
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            message: message.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub source: String,
    pub sets: Vec<SetStatus>,
    pub capture: CaptureStats,
    /// Mirror comparisons whose answers are still to come or to be acted on.
    pub mirror_pending: u64,
    /// Bytes of files queued for comparison by the mirror since the agent started, and
    /// how many of them every target has compared (its progress).
    pub mirror_queued_bytes: u64,
    pub mirror_compared_bytes: u64,
    pub mirror_queued_files: u64,
    pub mirror_compared_files: u64,
    /// Verifies running now.
    pub verifies: Vec<Progress>,
    /// Pages of files mapped shared and writable that the agent reads again at every
    /// pass, because a store into them would leave no trace (see `mapped.rs`).
    #[serde(default)]
    pub mapped_hot_pages: u64,
    /// Block checksums whose file shrank while it was read through a mapping (then read
    /// again with pread; see mapread/). Counted since the agent started.
    #[serde(default)]
    pub mapped_reads_spoiled: u64,
    /// Every change queued so far is acknowledged by every target and no comparison is
    /// pending: the replicas were equal to the sources when this was taken.
    pub synced: bool,
    pub uptime_seconds: u64,
}

impl Shared {
    pub fn status(&self) -> Status {
        let now = std::time::Instant::now();
        let capture = (self.capture_stats)();
        let scanning = self.scanning.load(Ordering::SeqCst);
        let mut sets = Vec::new();
        let mut synced = true;
        let mut min_acked = Vec::new();
        let target_sent: Vec<u64> = (0..self.targets.len())
            .map(|t| self.target_sent_bytes(t))
            .collect();
        for (s, targets) in self.set_targets.iter().enumerate() {
            let q = self.queue(s);
            min_acked.push(q.min_acked());
            for (slot, &t) in targets.iter().enumerate() {
                let st = self.targets[t].lock().expect("target lock").clone();
                let (lag_records, lag_bytes) = q.lag(slot);
                synced &= q.acked(slot) >= q.last_seq();
                // Answers received and not yet acted on count too: until their data
                // is queued, the replica still differs.
                let mirror_pending = self.tracker().pending_for(s, slot) as u64
                    + self.mirror_inflight[s].load(Ordering::SeqCst);
                let lag_seconds = q.lag_age(slot, now).as_secs_f64();
                let (state, reason) = judge(&Facts {
                    connected: st.connected,
                    failed_over: st.failed_over,
                    scanning,
                    mirror_pending,
                    overflowed: q.overflowed(),
                    lag_seconds,
                    degraded_lag_seconds: self.degraded_lag.as_secs_f64(),
                    capture_lost: capture.lost,
                    capture_refused: capture.refused,
                });
                sets.push(SetStatus {
                    set: self.set_names[s].clone(),
                    target: self.target_names[t].clone(),
                    state,
                    reason,
                    queue: q.mode(),
                    connected: st.connected,
                    last_seq: q.last_seq(),
                    acked: q.acked(slot),
                    lag_records,
                    lag_bytes: lag_bytes as u64,
                    lag_seconds,
                    memory_bytes: q.bytes() as u64,
                    journal_bytes: q.journal_bytes(),
                    spilled: q.spilled(),
                    queued_bytes: q.pushed_bytes,
                    set_sent_bytes: q.sent_bytes(slot),
                    bytes_per_sec: q.throughput(slot, now),
                    mirror_pending,
                    dropped_records: q.dropped,
                    overflowed: q.overflowed(),
                    sent_bytes: target_sent[t],
                    wire_bytes: st.wire_bytes(),
                    sessions: st.sessions,
                    failures: st.failures,
                    last_error: st.last_error.as_ref().map(|(at, m)| LastError::new(*at, m)),
                    crash_consistent: q.crash_consistent(slot) && !scanning,
                });
            }
        }
        // Answers being acted on count until their ops are queued.
        let (pending, queued, compared, files) = {
            let t = self.tracker();
            let files = (t.queued_files, t.compared_files);
            (t.pending() as u64, t.queued_bytes, t.compared_bytes, files)
        };
        let inflight: u64 = self
            .mirror_inflight
            .iter()
            .map(|n| n.load(Ordering::SeqCst))
            .sum();
        let pending = pending + inflight;
        let verifies = self
            .jobs()
            .values()
            .map(|j| j.progress(|s| min_acked[s]))
            .collect();
        Status {
            source: self.source.clone(),
            sets,
            capture,
            mirror_pending: pending,
            mirror_queued_bytes: queued,
            mirror_compared_bytes: compared,
            mirror_queued_files: files.0,
            mirror_compared_files: files.1,
            verifies,
            mapped_hot_pages: self.mapped_hot_pages.load(Ordering::Relaxed),
            mapped_reads_spoiled: doppel_mapread::spoiled_reads(),
            synced: synced && pending == 0 && !scanning,
            uptime_seconds: self.started.elapsed().unwrap_or_default().as_secs(),
        }
    }
}

/// A verify the daemon is asked to run: the sets (indexes) and where to send replies.
pub struct VerifyRequest {
    pub sets: Vec<usize>,
    pub repair: bool,
    pub reply: mpsc::UnboundedSender<Reply>,
}

pub use doppel_control::socket_path;

/// Listens on `path` until the process ends; verify requests go to `requests`.
pub async fn serve(
    path: PathBuf,
    shared: Arc<Shared>,
    requests: mpsc::UnboundedSender<VerifyRequest>,
) -> Result<()> {
    let listener = doppel_control::listen(&path)?;
    info!(path = %path.display(), "control socket ready");
    loop {
        let (stream, _) = listener.accept().await?;
        let shared = shared.clone();
        let requests = requests.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &shared, &requests).await {
                warn!(error = %format!("{e:#}"), "control request failed");
            }
        });
    }
}

async fn handle(
    stream: tokio::net::UnixStream,
    shared: &Shared,
    requests: &mpsc::UnboundedSender<VerifyRequest>,
) -> Result<()> {
    let (req, mut conn) = doppel_control::Conn::accept::<Request>(stream).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    match req.and_then(|r| check(r, &shared.set_names)) {
        Ok(Parsed::Status) => {
            let _ = tx.send(Reply::Status(shared.status()));
        }
        Ok(Parsed::Verify { sets, repair }) => {
            let _ = requests.send(VerifyRequest {
                sets,
                repair,
                reply: tx,
            });
        }
        Err(e) => {
            let _ = tx.send(Reply::Error(e));
        }
    }
    while let Some(reply) = rx.recv().await {
        conn.reply(&reply).await?;
        if !matches!(reply, Reply::Progress(_)) {
            break;
        }
    }
    conn.close().await
}

/// A request checked against this daemon's sets.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Status,
    Verify { sets: Vec<usize>, repair: bool },
}

fn check(req: Request, set_names: &[String]) -> std::result::Result<Parsed, String> {
    match req {
        Request::Status => Ok(Parsed::Status),
        Request::Verify { set: None, repair } => Ok(Parsed::Verify {
            sets: (0..set_names.len()).collect(),
            repair,
        }),
        Request::Verify {
            set: Some(name),
            repair,
        } => match set_names.iter().position(|n| *n == name) {
            Some(i) => Ok(Parsed::Verify {
                sets: vec![i],
                repair,
            }),
            None => Err(format!(
                "no set named {name:?}; this agent replicates {}",
                set_names.join(", ")
            )),
        },
    }
}

/// Sends `req` to the agent listening at `path` and hands each reply to `on_reply`
/// until the daemon is done.
pub fn call(path: &Path, req: &Request, on_reply: impl FnMut(Reply)) -> Result<()> {
    doppel_control::call(path, "the agent", req, on_reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_follow_the_facts_worst_first() {
        let ok = Facts {
            connected: true,
            degraded_lag_seconds: 30.0,
            ..Facts::default()
        };
        assert_eq!(judge(&ok), (State::Protected, String::new()));
        let state = |f: Facts| judge(&f).0;
        assert_eq!(
            state(Facts {
                mirror_pending: 3,
                ..ok
            }),
            State::Mirroring
        );
        assert_eq!(
            state(Facts {
                scanning: true,
                ..ok
            }),
            State::Mirroring
        );
        assert_eq!(
            state(Facts {
                lag_seconds: 31.0,
                mirror_pending: 3,
                ..ok
            }),
            State::Degraded
        );
        assert_eq!(
            state(Facts {
                overflowed: true,
                ..ok
            }),
            State::Degraded
        );
        assert_eq!(
            state(Facts {
                capture_lost: 1,
                ..ok
            }),
            State::Degraded
        );
        let down = Facts {
            connected: false,
            overflowed: true,
            ..ok
        };
        assert_eq!(state(down), State::Disconnected);
        assert_eq!(
            state(Facts {
                failed_over: true,
                ..down
            }),
            State::FailedOver
        );
        // A new session after a failback clears it, whatever the flag says.
        assert_eq!(
            state(Facts {
                failed_over: true,
                ..ok
            }),
            State::Protected
        );
        assert!(judge(&Facts {
            capture_lost: 2,
            ..ok
        })
        .1
        .contains("verify --repair"));
        let full = judge(&Facts {
            capture_refused: 3,
            ..ok
        });
        assert_eq!(full.0, State::Degraded);
        assert!(full.1.contains("full for 3 additions"), "{}", full.1);
    }

    fn parse(line: &[u8], names: &[String]) -> std::result::Result<Parsed, String> {
        check(
            serde_json::from_str(std::str::from_utf8(line).unwrap()).map_err(|e| e.to_string())?,
            names,
        )
    }

    #[test]
    fn requests_name_known_sets() {
        let names = vec!["a".to_string(), "b".to_string()];
        assert_eq!(
            parse(br#"{"cmd":"verify"}"#, &names),
            Ok(Parsed::Verify {
                sets: vec![0, 1],
                repair: false
            })
        );
        assert_eq!(
            parse(br#"{"cmd":"verify","set":"b","repair":true}"#, &names),
            Ok(Parsed::Verify {
                sets: vec![1],
                repair: true
            })
        );
        assert_eq!(parse(br#"{"cmd":"status"}"#, &names), Ok(Parsed::Status));
        let e = parse(br#"{"cmd":"verify","set":"c"}"#, &names).unwrap_err();
        assert!(e.contains("no set named \"c\""), "{e}");
        assert!(parse(b"garbage", &names).is_err());
        assert!(parse(br#"{"cmd":"verify","bogus":1}"#, &names).is_err());
    }
}
