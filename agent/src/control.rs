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

/// One set towards one target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetStatus {
    pub set: String,
    pub target: String,
    pub connected: bool,
    /// Last sequence number queued, and the last one the target acknowledged.
    pub last_seq: u64,
    pub acked: u64,
    pub lag_records: u64,
    pub lag_bytes: u64,
    /// File data sent to the target (all sets), and UDP bytes exchanged with it both
    /// ways (QUIC, TLS and framing included).
    pub sent_bytes: u64,
    pub wire_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub sets: Vec<SetStatus>,
    /// Mirror comparisons whose answers are still to come or to be acted on.
    pub mirror_pending: u64,
    /// Bytes of files queued for comparison by the mirror since the agent started, and
    /// how many of them every target has compared (its progress).
    pub mirror_queued_bytes: u64,
    pub mirror_compared_bytes: u64,
    /// Every change queued so far is acknowledged by every target and no comparison is
    /// pending: the replicas were equal to the sources when this was taken.
    pub synced: bool,
}

impl Shared {
    pub fn status(&self) -> Status {
        let mut sets = Vec::new();
        let mut synced = true;
        for (s, targets) in self.set_targets.iter().enumerate() {
            for (slot, &t) in targets.iter().enumerate() {
                let st = self.targets[t].lock().expect("target lock").clone();
                let q = self.queue(s);
                let (lag_records, lag_bytes) = q.lag(slot);
                synced &= q.acked(slot) >= q.last_seq();
                sets.push(SetStatus {
                    set: self.set_names[s].clone(),
                    target: self.target_names[t].clone(),
                    connected: st.connected,
                    last_seq: q.last_seq(),
                    acked: q.acked(slot),
                    lag_records,
                    lag_bytes: lag_bytes as u64,
                    sent_bytes: st.sent_bytes,
                    wire_bytes: st.wire_bytes(),
                });
            }
        }
        // Answers being acted on count until their ops are queued.
        let (pending, queued, compared) = {
            let t = self.tracker();
            (t.pending() as u64, t.queued_bytes, t.compared_bytes)
        };
        let pending = pending
            + self
                .mirror_inflight
                .load(std::sync::atomic::Ordering::SeqCst);
        Status {
            sets,
            mirror_pending: pending,
            mirror_queued_bytes: queued,
            mirror_compared_bytes: compared,
            synced: synced && pending == 0,
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
