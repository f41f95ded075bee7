//! Send: one task per target drives a QUIC session that streams the queued records of
//! every set replicated to that target, and reports acknowledgements back to the queue.
//!
//! After any reconnect the receiver's Welcome says what it applied last, and sending
//! resumes right after it; a record sent twice is skipped by the receiver.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use doppel_common::wire::{Frame, SetHello, PROTOCOL_VERSION};
use doppel_transport::{FramedStream, Identity};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::capture::CaptureStats;
use crate::config::Target;
use crate::mirror::{Answer, Tracker, Work};
use crate::queue::SetQueue;
use crate::throttle::{local_minute_of_day, Throttle};
use crate::verify::{Finding, Job};
use doppel_common::wire::sums::is_mirror_job;
use doppel_control::metrics::{Histogram, Histograms};
use std::collections::HashMap;

/// Largest batch put in one frame (bytes of records, approximately).
const BATCH_BYTES: usize = 1 << 20;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Longest single sleep of the bandwidth throttle: the wait is re-computed after it, so
/// that a schedule window that opens (or lifts the limit) takes effect promptly.
const THROTTLE_STEP: Duration = Duration::from_secs(1);

/// What the pipeline and the senders share.
pub struct Shared {
    pub source: String,
    pub set_names: Vec<String>,
    pub queues: Vec<Mutex<SetQueue>>,
    /// Bumped after records are pushed: wakes idle senders.
    pub pushed: watch::Sender<u64>,
    /// Bumped after acks free queue space: wakes a pipeline waiting for room.
    pub acked: watch::Sender<u64>,
    pub targets: Vec<Mutex<TargetState>>,
    /// Pages of shared mappings being re-read (see mapped.rs), for status.
    pub mapped_hot_pages: std::sync::atomic::AtomicU64,
    /// Ranges read again because an event may have carried older bytes (overlap.rs).
    pub reread_ranges: std::sync::atomic::AtomicU64,
    /// Losses of capture records whose full rescan was deferred (pacing.rs), for status.
    pub rescans_deferred: std::sync::atomic::AtomicU64,
    /// Block comparisons that may still need an answer (lock after a queue, never before).
    pub mirror: Mutex<Tracker>,
    /// Answers and re-comparisons for the pipeline, which owns the files' paths.
    pub mirror_work: mpsc::UnboundedSender<Work>,
    /// Answers handed to the pipeline whose ops are not queued yet.
    pub mirror_inflight: Vec<std::sync::atomic::AtomicU64>,
    /// Verify jobs running, by id (lock after a queue, never before).
    pub jobs: Mutex<HashMap<u64, Job>>,
    /// Per set, the target (index) of each of its queue's slots.
    pub set_targets: Vec<Vec<usize>>,
    pub target_names: Vec<String>,
    /// Per set and slot: seconds from queueing a record to its acknowledgement.
    pub ack_latency: Vec<Vec<Histogram>>,
    pub ack_latency_family: Histograms,
    /// The capture's counters, read when status or metrics ask.
    pub capture_stats: Box<dyn Fn() -> CaptureStats + Send + Sync>,
    /// The initial scan still runs: sets are being mirrored.
    pub scanning: std::sync::atomic::AtomicBool,
    /// Lag at which a connected set is shown as degraded.
    pub degraded_lag: Duration,
    pub started: std::time::SystemTime,
}

#[derive(Debug, Default, Clone)]
pub struct TargetState {
    pub connected: bool,
    /// Sessions established so far (a verify spanning a reconnect may miss answers).
    pub sessions: u64,
    /// UDP bytes of ended sessions, both ways (QUIC, TLS and framing included).
    pub wire_bytes_ended: u64,
    /// The current session's connection, for its byte counters.
    pub conn: Option<quinn::Connection>,
    /// Its endpoint, to wait for the goodbye to go out when the agent stops.
    pub endpoint: Option<quinn::Endpoint>,
    pub last_error: Option<(std::time::SystemTime, String)>,
    /// Sessions that ended in an error.
    pub failures: u64,
    /// The receiver ended the last session because it took over this source (failed
    /// over); cleared by the next session.
    pub failed_over: bool,
    /// What this target said of its replicas at its first Welcome; `None` until then.
    pub first_welcome: Option<FirstWelcome>,
}

/// What a target's first Welcome said of the replicas of the sets it holds (by index).
#[derive(Debug, Clone, Default)]
pub struct FirstWelcome {
    /// Sets whose replica holds nothing.
    pub empty: Vec<usize>,
    /// Sets that started a new epoch: (set, the epoch before, applied in it).
    pub prior: Vec<(usize, u64, u64)>,
}

impl TargetState {
    /// UDP bytes exchanged with the target so far, both ways.
    pub fn wire_bytes(&self) -> u64 {
        self.wire_bytes_ended + self.conn.as_ref().map_or(0, udp_bytes)
    }
}

fn udp_bytes(c: &quinn::Connection) -> u64 {
    let s = c.stats();
    s.udp_tx.bytes + s.udp_rx.bytes
}

impl Shared {
    pub fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Job>> {
        self.jobs.lock().expect("jobs lock poisoned")
    }

    /// Every target's session counter.
    pub fn sessions(&self) -> Vec<u64> {
        self.targets
            .iter()
            .map(|t| t.lock().expect("target lock").sessions)
            .collect()
    }

    /// File data handed to target `t`'s sessions, all sets (each set's queue counts its
    /// own). Takes the queues' locks one at a time: call it holding none.
    pub fn target_sent_bytes(&self, t: usize) -> u64 {
        let mut sum = 0;
        for (s, targets) in self.set_targets.iter().enumerate() {
            if let Some(slot) = targets.iter().position(|&x| x == t) {
                sum += self.queue(s).sent_bytes(slot);
            }
        }
        sum
    }

    pub fn tracker(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.mirror.lock().expect("mirror tracker lock poisoned")
    }

    pub fn queue(&self, set: usize) -> std::sync::MutexGuard<'_, SetQueue> {
        // A poisoned lock means a sender panicked mid-update: nothing sane to do but stop.
        self.queues[set].lock().expect("queue lock poisoned")
    }
}

/// One target's view of a set: the set's index and the target's ack slot in its queue.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub set: usize,
    pub slot: usize,
}

/// How long a stopping agent waits for its goodbye to reach a target.
const GOODBYE_WAIT: Duration = Duration::from_millis(500);

/// Connects, streams, reconnects with backoff, until `stop` turns true: then closes the
/// session with `SHUTDOWN` and returns. Stopping is this task's job, not the caller's, so
/// that no reconnect can slip in after the goodbye: a session that started after it
/// and then vanished with the process made the receiver see a source that died.
pub async fn run_target(
    shared: Arc<Shared>,
    identity: Arc<Identity>,
    index: usize,
    target: Target,
    routes: Vec<Route>,
    gaps: mpsc::UnboundedSender<usize>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            r = session(&shared, &identity, index, &target, &routes, &gaps) => r,
            _ = stopped(&mut stop) => {
                say_goodbye(&shared, index).await;
                return;
            }
        };
        {
            let mut st = shared.targets[index].lock().expect("target lock");
            st.connected = false;
            st.endpoint = None;
            if let Some(c) = st.conn.take() {
                st.wire_bytes_ended += udp_bytes(&c);
            }
            if let Err(e) = &result {
                st.last_error = Some((std::time::SystemTime::now(), format!("{e:#}")));
                st.failures += 1;
            }
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = BACKOFF_MIN;
        }
        // Hybrid sets stop holding this target's backlog in memory while it is away.
        for r in &routes {
            shared.queue(r.set).spill("a target is unreachable");
        }
        match result {
            Ok(()) => info!(target = %target.name, "session ended; reconnecting"),
            Err(e) => {
                warn!(target = %target.name, address = %target.address, error = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64, "replication session failed")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stopped(&mut stop) => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Resolves once the agent is stopping (or whoever could stop it is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`: drop it here, not across an await.
    let _ = stop.wait_for(|&s| s).await.map(|_| ());
}

/// Closes the current session, if any, so that the receiver sees a source that stopped,
/// not one that died (which would look like a reason to fail over). The close frame
/// leaves with the endpoint's driver after `close` returns: wait until the connection
/// is shut down (a few round trips), at most [`GOODBYE_WAIT`] for a target that does not
/// answer. A fixed 50 ms pause was once not enough on a loaded host.
async fn say_goodbye(shared: &Shared, index: usize) {
    let session = {
        let mut st = shared.targets[index].lock().expect("target lock");
        st.connected = false;
        st.conn.take().zip(st.endpoint.take())
    };
    if let Some((conn, endpoint)) = session {
        conn.close(doppel_transport::close::SHUTDOWN, b"the agent is stopping");
        let _ = tokio::time::timeout(GOODBYE_WAIT, endpoint.wait_idle()).await;
    }
}

/// The receiver watches this source's health by heartbeat datagrams; each goes straight
/// back. Datagrams skip stream flow control, so a backlog never delays an echo.
async fn echo_heartbeats(conn: quinn::Connection) {
    while let Ok(d) = conn.read_datagram().await {
        if d.len() <= 64 {
            let _ = conn.send_datagram(d);
        }
    }
}

async fn session(
    shared: &Arc<Shared>,
    identity: &Identity,
    index: usize,
    target: &Target,
    routes: &[Route],
    gaps: &mpsc::UnboundedSender<usize>,
) -> Result<()> {
    let (conn, endpoint) = doppel_transport::connect_with_endpoint(
        identity,
        target.address,
        &target.fingerprint,
        doppel_transport::Tuning::Doppel,
    )
    .await
    .with_context(|| format!("cannot connect to {}", target.address))?;
    {
        // Known once established, before the Hello: a stop from then on closes it.
        let mut st = shared.targets[index].lock().expect("target lock");
        st.conn = Some(conn.clone());
        st.endpoint = Some(endpoint);
    }
    let result = stream_sets(shared, index, target, routes, gaps, &conn).await;
    if result.is_err() {
        // A refusal arrives as a frame just before the connection's close code.
        let reason = tokio::time::timeout(Duration::from_millis(200), conn.closed()).await;
        if let Ok(quinn::ConnectionError::ApplicationClosed(c)) = reason {
            if c.error_code == doppel_transport::close::FAILED_OVER {
                shared.targets[index]
                    .lock()
                    .expect("target lock")
                    .failed_over = true;
            }
        }
    }
    result
}

/// The session on an established connection: Hello, Welcome, then batches out and
/// acknowledgements in until something fails.
async fn stream_sets(
    shared: &Arc<Shared>,
    index: usize,
    target: &Target,
    routes: &[Route],
    gaps: &mpsc::UnboundedSender<usize>,
    conn: &quinn::Connection,
) -> Result<()> {
    let (send, recv) = conn.open_bi().await.context("cannot open a stream")?;
    let (mut tx, mut rx) = FramedStream::new(send, recv).split();

    let epochs: Vec<u64> = routes.iter().map(|r| shared.queue(r.set).epoch).collect();
    let sets = routes
        .iter()
        .zip(&epochs)
        .map(|(r, &epoch)| SetHello {
            name: shared.set_names[r.set].clone(),
            epoch,
        })
        .collect();
    tx.send(&Frame::Hello {
        version: PROTOCOL_VERSION,
        source: shared.source.clone(),
        sets,
    })
    .await?;
    // The Hello above went out plain; the receiver's decoder reads both forms.
    tx.set_compression(target.compression_level);
    let applied = match rx.recv().await? {
        Some(Frame::Welcome {
            version,
            applied,
            resync,
            empty,
            prior,
        }) if version == PROTOCOL_VERSION => {
            {
                let mut st = shared.targets[index].lock().expect("target lock");
                if st.first_welcome.is_none() {
                    let set = |name: &str| {
                        routes
                            .iter()
                            .find(|r| shared.set_names[r.set] == name)
                            .map(|r| r.set)
                    };
                    st.first_welcome = Some(FirstWelcome {
                        empty: empty.iter().filter_map(|n| set(n)).collect(),
                        prior: prior
                            .iter()
                            .filter_map(|p| Some((set(&p.set)?, p.epoch, p.applied)))
                            .collect(),
                    });
                }
            }
            let stale: Vec<&Route> = routes
                .iter()
                .filter(|r| resync.contains(&shared.set_names[r.set]))
                .collect();
            if !stale.is_empty() {
                for r in &stale {
                    let _ = gaps.send(r.set);
                }
                bail!(
                    "the receiver asks to copy sets {resync:?} again: they were failed over to it and back, so the changes this agent still holds for them are stale"
                );
            }
            applied
        }
        Some(Frame::Welcome { version, .. }) => {
            bail!("receiver speaks protocol {version}, this agent {PROTOCOL_VERSION}: upgrade one side")
        }
        Some(Frame::Refused { reason }) => bail!("receiver refused this agent: {reason}"),
        Some(other) => bail!("protocol error: expected Welcome, got {other:?}"),
        None => bail!("receiver closed the stream before its Welcome"),
    };
    let mut cursors = Vec::with_capacity(routes.len());
    for r in routes {
        let name = &shared.set_names[r.set];
        let seq = applied
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, s)| *s);
        let mut q = shared.queue(r.set);
        if let Err(gap) = q.batch(seq, 1) {
            drop(q);
            let _ = gaps.send(r.set);
            bail!(
                "target has applied set {name:?} up to {} but the queue starts at {}: copying the set again",
                gap.applied,
                gap.first_held
            );
        }
        q.ack(r.slot, seq);
        drop(q);
        let files = shared.tracker().welcome(r.set, r.slot, seq);
        if !files.is_empty() {
            info!(target = %target.name, set = %name, files = files.len(), "comparing files again whose answers may have been lost with the last session");
            let _ = shared.mirror_work.send(Work::Resum { set: r.set, files });
        }
        cursors.push(seq);
    }
    shared.acked.send_modify(|g| *g += 1);
    {
        let mut st = shared.targets[index].lock().expect("target lock");
        st.connected = true;
        st.failed_over = false;
        st.sessions += 1;
    }
    info!(target = %target.name, address = %target.address, "connected; resuming after {:?}", cursors);

    // Acks arrive on the same stream; read them in their own task.
    let acks = {
        let shared = shared.clone();
        let routes = routes.to_vec();
        let target_name = target.name.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await? {
                    Some(Frame::Ack { set, seq }) => {
                        let Some(r) = routes.iter().find(|r| shared.set_names[r.set] == set) else {
                            bail!("receiver acknowledged unknown set {set:?}");
                        };
                        {
                            let mut q = shared.queue(r.set);
                            if let Some(w) = q.waited(seq, Instant::now()) {
                                shared.ack_latency[r.set][r.slot].observe(w.as_secs_f64());
                            }
                            q.ack(r.slot, seq);
                        }
                        shared.tracker().acked(r.set, r.slot, seq);
                        shared.acked.send_modify(|g| *g += 1);
                    }
                    Some(frame @ Frame::Need { .. }) => {
                        let Frame::Need { set, .. } = &frame else {
                            unreachable!("matched above")
                        };
                        let Some(r) = routes.iter().find(|r| shared.set_names[r.set] == *set)
                        else {
                            bail!("receiver answered a comparison of unknown set {set:?}");
                        };
                        let a = Answer::from_frame(r.set, frame).expect("a Need frame");
                        if !is_mirror_job(a.job) {
                            let mut jobs = shared.jobs();
                            // Unknown: a job that ended (its command went away).
                            let Some(j) = jobs.get_mut(&a.job) else {
                                continue;
                            };
                            j.found(Finding {
                                target: target_name.clone(),
                                set: shared.set_names[a.set].clone(),
                                path: a.path.to_string(),
                                ranges: a.ranges.clone(),
                                missing: a.missing,
                                attr: a.attr,
                                extra: a.extra,
                            });
                            // A directory's entries are repaired by the ops that
                            // follow its question (see `Resolver::verify`).
                            if !j.repair || a.listing {
                                continue;
                            }
                        }
                        shared.mirror_inflight[r.set]
                            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if shared.mirror_work.send(Work::Need(a)).is_err() {
                            return Ok(()); // the pipeline is gone: shutting down
                        }
                    }
                    Some(Frame::Refused { reason }) => {
                        bail!("receiver ended the session: {reason}")
                    }
                    Some(other) => bail!("protocol error: unexpected {other:?}"),
                    None => return Ok::<(), anyhow::Error>(()),
                }
            }
        })
    };
    let _abort = AbortOnDrop(acks.abort_handle());
    let mut acks = acks;
    let echo = tokio::spawn(echo_heartbeats(conn.clone()));
    let _echo = AbortOnDrop(echo.abort_handle());

    let mut throttle = Throttle::new(target.bandwidth.clone());
    let mut pushed = shared.pushed.subscribe();
    loop {
        pushed.borrow_and_update();
        let mut sent = false;
        for (i, r) in routes.iter().enumerate() {
            let batch = {
                let q = shared.queue(r.set);
                if q.epoch != epochs[i] {
                    bail!(
                        "set {:?} started a new epoch; reconnecting",
                        shared.set_names[r.set]
                    );
                }
                q.encoded_batch(&shared.set_names[r.set], cursors[i], BATCH_BYTES)
            };
            let batch = match batch {
                Ok(None) => continue,
                Ok(Some(b)) => b,
                Err(gap) => {
                    let _ = gaps.send(r.set);
                    bail!("queue gap {gap:?}");
                }
            };
            cursors[i] = batch.last;
            let bytes = batch.data_bytes as usize;
            if !throttle.is_unlimited() {
                // Wait off the debt of what was sent before; this batch's own (compressed)
                // size is taken once it is sent, as the bucket may go into debt.
                loop {
                    let wait = throttle.delay(Instant::now(), local_minute_of_day());
                    if wait.is_zero() {
                        break;
                    }
                    tokio::time::sleep(wait.min(THROTTLE_STEP)).await;
                }
            }
            let before = tx.bytes_sent();
            tx.send_encoded_batch(batch.frame).await?;
            if !throttle.is_unlimited() {
                throttle.spend(
                    tx.bytes_sent() - before,
                    Instant::now(),
                    local_minute_of_day(),
                );
            }
            shared
                .queue(r.set)
                .sent(r.slot, bytes as u64, Instant::now());
            sent = true;
        }
        if !sent {
            tokio::select! {
                r = pushed.changed() => r.map_err(|_| anyhow!("agent shutting down"))?,
                r = &mut acks => {
                    return match r {
                        Ok(Ok(())) => Err(anyhow!("receiver closed the stream")),
                        Ok(Err(e)) => Err(e),
                        Err(e) => Err(anyhow!("ack reader failed: {e}")),
                    };
                }
            }
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
