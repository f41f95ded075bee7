//! One agent connection: Hello/Welcome, then batches applied in order and acknowledged.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use doppel_common::wire::{Frame, PriorMark, SetHello, PROTOCOL_VERSION};
use doppel_transport::{close, FrameReceiver, FrameSender, FramedStream};
use tokio::sync::mpsc;

use crate::apply::Applier;
use crate::config::{check_name, SourceConfig};
use crate::counters::Counters;
use crate::monitor::{heartbeat, Monitor};
use crate::set::{BatchEnd, SetApplier};
use crate::state::{SetState, StateStore};
use crate::writer::{ToWriter, Writer};

/// How long a connected agent may take to open its stream and say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Batches applied but not yet committed. Bounded so that a slow disk slows the reader
/// (and through QUIC flow control, the agent) instead of growing memory.
const COMMIT_QUEUE: usize = 64;

/// After a drain is asked for, the session stops once no frame arrived for this long:
/// what the source had already sent is applied, nothing after it.
const DRAIN_IDLE: Duration = Duration::from_millis(50);

/// Everything a session needs besides its connection.
pub struct SessionCtx {
    pub source: SourceConfig,
    pub store: Arc<StateStore>,
    pub fsync: bool,
    /// Set to `Some(reason)` to drain: apply what already arrived, commit it, then end
    /// the session with `close::FAILED_OVER` and `reason`.
    pub drain: tokio::sync::watch::Receiver<Option<String>>,
    /// Heartbeats land here.
    pub monitor: Arc<std::sync::Mutex<crate::monitor::Monitor>>,
    pub counters: Arc<Counters>,
}

/// Runs one session to its end. `Ok` means it ended in an orderly way (including a
/// refusal that was delivered); `Err` carries what went wrong for the log.
pub async fn run(conn: quinn::Connection, stream: Stream, ctx: &SessionCtx) -> anyhow::Result<()> {
    let (send, recv) = stream;
    let (mut tx, mut rx) = FramedStream::new(send, recv).split();

    let hello = tokio::time::timeout(HELLO_TIMEOUT, rx.recv())
        .await
        .context("the agent sent no Hello within 10 s")?
        .context("reading Hello")?;
    let sets = match hello {
        Some(Frame::Hello {
            version,
            source,
            sets,
        }) => match check_hello(&ctx.source, version, &source, &sets) {
            Ok(()) => sets,
            Err(reason) => {
                refuse(&mut tx, &conn, close::REFUSED, &reason).await;
                bail!("refused: {reason}");
            }
        },
        Some(other) => {
            let reason = format!(
                "expected Hello as the first frame, got {}",
                frame_name(&other)
            );
            refuse(&mut tx, &conn, close::REFUSED, &reason).await;
            bail!("refused: {reason}");
        }
        None => return Ok(()),
    };

    let source = ctx.source.clone();
    let store = ctx.store.clone();
    let opened = tokio::task::spawn_blocking(move || open_sets(&source, &store, &sets))
        .await
        .context("opening sets panicked")?;
    let opened = match opened {
        Ok(a) => a,
        Err(e) => {
            let reason = format!("{e:#}");
            refuse(&mut tx, &conn, close::RETRY_LATER, &reason).await;
            bail!("cannot start the session: {reason}");
        }
    };
    let Opened {
        mut appliers,
        resync,
        empty,
        prior,
    } = opened;
    let applied = appliers
        .iter()
        .map(|(name, s)| (name.clone(), s.as_ref().map_or(0, |s| s.applied)))
        .collect();
    for set in &resync {
        // Nothing of the stale sequence space is applied: a batch for it ends the session.
        appliers.remove(set);
    }
    if !resync.is_empty() {
        tracing::warn!(source = %ctx.source.name, sets = ?resync, "the agent still holds changes from before a failback: asking it to start those sets over");
    }
    tx.send(&Frame::Welcome {
        version: PROTOCOL_VERSION,
        applied,
        resync,
        empty,
        prior,
    })
    .await?;

    ctx.monitor
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .connected(std::time::Instant::now());
    let (wtx, wrx) = mpsc::channel(COMMIT_QUEUE);
    let writer = Writer {
        source: ctx.source.name.clone(),
        store: ctx.store.clone(),
        fsync: ctx.fsync,
        tx,
        conn: conn.clone(),
    };
    let writer = tokio::spawn(writer.run(wrx));
    Counters::add(&ctx.counters.sessions, 1);
    let beats = tokio::spawn(heartbeats(
        conn.clone(),
        ctx.monitor.clone(),
        ctx.counters.clone(),
    ));
    let mut drain = ctx.drain.clone();
    let read = read_batches(
        &mut rx,
        &mut appliers,
        &wtx,
        &ctx.source.name,
        &mut drain,
        &ctx.counters,
    )
    .await;
    beats.abort();
    // An agent that stops says so in its close; anything else (a timeout, a reset) may
    // be a death, which the missed heartbeats then show.
    let orderly = matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(ref c)) if c.error_code == close::SHUTDOWN
    );
    ctx.monitor
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .ended(orderly);
    match &read {
        Err(e) => {
            // The writer delivers the reason if the connection still stands.
            let _ = wtx
                .send(ToWriter::Close {
                    code: close::REFUSED,
                    reason: format!("{e:#}"),
                    linger: true,
                })
                .await;
        }
        Ok(Ended::Drained(reason)) => {
            let _ = wtx
                .send(ToWriter::Close {
                    code: close::FAILED_OVER,
                    reason: reason.clone(),
                    linger: false,
                })
                .await;
        }
        Ok(Ended::Stream) => {}
    }
    drop(wtx);
    let written = writer.await.context("the session writer panicked")?;
    conn.close(close::DONE, b"session finished");
    read.map(|_| ()).and(written)
}

/// Sends a heartbeat datagram every interval and counts the agent's echoes as beats
/// (see `monitor`). Runs until aborted or the connection ends.
async fn heartbeats(
    conn: quinn::Connection,
    monitor: Arc<std::sync::Mutex<Monitor>>,
    counters: Arc<Counters>,
) {
    let interval = monitor
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .settings()
        .interval;
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                seq += 1;
                let b = heartbeat::encode(seq, start.elapsed());
                if conn.send_datagram(bytes::Bytes::copy_from_slice(&b)).is_err() {
                    return;
                }
                Counters::add(&counters.heartbeats_sent, 1);
            }
            d = conn.read_datagram() => {
                let Ok(d) = d else { return };
                // Any datagram on this authenticated connection proves the agent alive;
                // the echoed clock only feeds the round-trip figure.
                let now = start.elapsed();
                let rtt = heartbeat::decode(&d)
                    .map(|(_, sent)| now.saturating_sub(sent))
                    .filter(|r| *r < Duration::from_secs(60));
                Counters::add(&counters.heartbeats_answered, 1);
                if let Some(r) = rtt {
                    counters.rtt.observe(r.as_secs_f64());
                }
                monitor
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .beat(std::time::Instant::now(), rtt);
            }
        }
    }
}

/// How reading a session's frames ended without a protocol error.
enum Ended {
    /// The agent finished its stream, ended the session, or a batch ended it (a gap, a
    /// failing disk: the writer was told why).
    Stream,
    /// A drain was asked for (failover); the reason goes to the agent.
    Drained(String),
}

/// Reads frames until the stream ends, applying each batch and handing the result to the
/// writer. Protocol violations are errors; a gap or a failing disk is sent to the writer
/// as a `Close` and ends the loop normally.
async fn read_batches(
    rx: &mut FrameReceiver,
    appliers: &mut HashMap<String, Option<SetApplier>>,
    wtx: &mpsc::Sender<ToWriter>,
    source: &str,
    drain: &mut tokio::sync::watch::Receiver<Option<String>>,
    counters: &Counters,
) -> anyhow::Result<Ended> {
    loop {
        // The receive is never cancelled mid-frame while the session goes on: only a
        // drain that found the stream idle drops it, and the session ends then.
        let frame = {
            let recv = rx.recv();
            tokio::pin!(recv);
            let mut draining = drain.borrow().clone();
            loop {
                tokio::select! {
                    f = &mut recv => break f?,
                    changed = drain.changed(), if draining.is_none() => {
                        if changed.is_err() {
                            // The server is gone; keep reading until the connection ends.
                            std::future::pending::<()>().await;
                        }
                        draining = drain.borrow().clone();
                    }
                    _ = tokio::time::sleep(DRAIN_IDLE), if draining.is_some() => {
                        return Ok(Ended::Drained(draining.unwrap_or_default()));
                    }
                }
            }
        };
        let Some(frame) = frame else {
            return Ok(Ended::Stream);
        };
        let (set, records) = match frame {
            Frame::Batch { set, records } => (set, records),
            Frame::Refused { reason } => {
                tracing::info!(source, "the agent ended the session: {reason}");
                return Ok(Ended::Stream);
            }
            other => bail!("unexpected {} frame after Hello", frame_name(&other)),
        };
        let Some(slot) = appliers.get_mut(&set) else {
            bail!("batch for set {set:?}, which the agent did not announce in its Hello");
        };
        let mut applier = slot
            .take()
            .expect("set applier is put back after every batch");
        let before = applier.applied;
        let (applier, outcome, records) = tokio::task::spawn_blocking(move || {
            let outcome = applier.apply_batch(&records);
            (applier, outcome, records)
        })
        .await
        .context("applying a batch panicked")?;
        let (epoch, seq) = (applier.epoch, applier.applied);
        let fresh = records.iter().filter(|r| r.seq > before && r.seq <= seq);
        let (n, bytes) = fresh.fold((0, 0), |(n, b), r| (n + 1, b + r.op.data_len() as u64));
        Counters::add(&counters.records_applied, n);
        Counters::add(&counters.data_bytes_applied, bytes);
        *slot = Some(applier);
        let applied = ToWriter::Applied {
            set: set.clone(),
            epoch,
            seq,
            dirty: outcome.dirty,
            needs: outcome.needs,
        };
        if wtx.send(applied).await.is_err() {
            return Ok(Ended::Stream); // the writer failed and closed the connection
        }
        let close = match outcome.end {
            BatchEnd::Done => continue,
            BatchEnd::Gap { expected, got } => ToWriter::Close {
                linger: true,
                code: close::REFUSED,
                reason: format!(
                    "set {set:?}: expected record {expected}, got {got}: records in between are \
                     missing; resend from {expected} (or re-mirror the set in a new epoch)"
                ),
            },
            BatchEnd::Fatal { seq, err } => {
                tracing::error!(source, set = %set, seq, "{err}");
                Counters::add(&counters.apply_errors, 1);
                counters.error(format!("set {set:?}: record {seq}: {err}"));
                ToWriter::Close {
                    linger: true,
                    code: close::RETRY_LATER,
                    reason: format!(
                        "set {set:?}: record {seq}: {err}; the receiver cannot apply it now, \
                         resend it after reconnecting"
                    ),
                }
            }
        };
        let _ = wtx.send(close).await;
        return Ok(Ended::Stream);
    }
}

fn check_hello(
    cfg: &SourceConfig,
    version: u32,
    source: &str,
    sets: &[SetHello],
) -> Result<(), String> {
    if version != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {version} is not supported: this receiver speaks version \
             {PROTOCOL_VERSION}; run the same doppel release on both hosts"
        ));
    }
    if source != cfg.name {
        return Err(format!(
            "this agent's certificate belongs to source {:?} in the receiver config, but the \
             agent calls itself {source:?}; make `source` in the agent config and `name` of \
             the [[source]] with its fingerprint agree",
            cfg.name
        ));
    }
    let mut seen = HashSet::new();
    for s in sets {
        check_name(&s.name).map_err(|e| format!("set {:?}: {e}", s.name))?;
        if !seen.insert(&s.name) {
            return Err(format!("set {:?} is announced twice in Hello", s.name));
        }
    }
    Ok(())
}

/// What [`open_sets`] found: an applier per announced set, and what the Welcome says.
struct Opened {
    appliers: HashMap<String, Option<SetApplier>>,
    /// Sets the agent must start over (a stale epoch, see `SetState`).
    resync: Vec<String>,
    /// Sets whose replica holds nothing yet.
    empty: Vec<String>,
    /// Sets that start a new epoch now, and where their replica stood in the one before.
    prior: Vec<PriorMark>,
}

/// Opens every announced set's replica root and loads its mark. A set whose stored epoch
/// differs from the announced one starts over at 0, and the new epoch is stored at once
/// so that marks of the old sequence space can never be mistaken for the new one.
fn open_sets(
    source: &SourceConfig,
    store: &StateStore,
    sets: &[SetHello],
) -> anyhow::Result<Opened> {
    let mut opened = Opened {
        appliers: HashMap::new(),
        resync: Vec::new(),
        empty: Vec::new(),
        prior: Vec::new(),
    };
    for s in sets {
        let root = source.set_root(&s.name);
        let applier = Applier::open(&root)?.durable(store.fsync());
        let empty = holds_nothing(&root)?;
        if empty {
            opened.empty.push(s.name.clone());
        }
        let stored = store.load(&source.name, &s.name)?;
        let applied = match stored {
            Some(st) if st.epoch == s.epoch && st.stale => {
                opened.resync.push(s.name.clone());
                st.seq
            }
            Some(st) if st.epoch == s.epoch => st.seq,
            old => {
                if let Some(old) = old {
                    tracing::info!(
                        source = %source.name,
                        set = %s.name,
                        old_epoch = old.epoch,
                        new_epoch = s.epoch,
                        "new epoch: the agent starts the set over"
                    );
                    // A stale epoch's replica was written by others meanwhile.
                    if !old.stale && !empty {
                        opened.prior.push(PriorMark {
                            set: s.name.clone(),
                            epoch: old.epoch,
                            applied: old.seq,
                        });
                    }
                }
                store.store(
                    &source.name,
                    &s.name,
                    SetState {
                        epoch: s.epoch,
                        seq: 0,
                        stale: false,
                    },
                )?;
                0
            }
        };
        tracing::info!(
            source = %source.name,
            set = %s.name,
            root = %root.display(),
            epoch = s.epoch,
            applied,
            "set ready"
        );
        opened.appliers.insert(
            s.name.clone(),
            Some(SetApplier::new(
                source.name.clone(),
                s.name.clone(),
                s.epoch,
                applied,
                applier,
            )),
        );
    }
    Ok(opened)
}

/// Whether a replica root holds no entry (the orphans kept aside do not count).
fn holds_nothing(root: &std::path::Path) -> anyhow::Result<bool> {
    let mut entries = std::fs::read_dir(root)
        .with_context(|| format!("cannot list the replica root {}", root.display()))?;
    Ok(!entries.any(|e| {
        e.map_or(true, |e| {
            e.file_name().as_encoded_bytes() != doppel_common::wire::ORPHANS_DIR.as_bytes()
        })
    }))
}

/// Refuses a connection before its session starts: reads the agent's stream open and
/// Hello (briefly), answers Refused, closes.
pub async fn refuse_connection(
    conn: &quinn::Connection,
    (send, recv): Stream,
    code: quinn::VarInt,
    reason: &str,
) {
    let (mut tx, _rx) = FramedStream::new(send, recv).split();
    refuse(&mut tx, conn, code, reason).await;
}

/// The agent's one bidirectional stream.
pub type Stream = (quinn::SendStream, quinn::RecvStream);

/// Waits for the agent to open its stream. A connection that opens none (a preflight
/// check only proving the handshake) ends here without touching the running session.
pub async fn accept_stream(conn: &quinn::Connection) -> anyhow::Result<Stream> {
    tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi())
        .await
        .context("the agent opened no stream within 10 s")?
        .context("the agent closed the connection before opening its stream")
}

async fn refuse(tx: &mut FrameSender, conn: &quinn::Connection, code: quinn::VarInt, reason: &str) {
    let _ = tx
        .send(&Frame::Refused {
            reason: reason.to_string(),
        })
        .await;
    let _ = tx.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), tx.flushed()).await;
    conn.close(code, reason.as_bytes());
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello { .. } => "Hello",
        Frame::Welcome { .. } => "Welcome",
        Frame::Batch { .. } => "Batch",
        Frame::Ack { .. } => "Ack",
        Frame::Refused { .. } => "Refused",
        Frame::Compressed { .. } => "Compressed",
        Frame::Need { .. } => "Need",
    }
}
