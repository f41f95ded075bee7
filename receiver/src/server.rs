//! The listener: accepts agents, maps each to its configured source, runs sessions.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use doppel_transport::{close, peer_fingerprint, server_endpoint, Identity};
use tokio::task::JoinSet;

use doppel_control::metrics::{labels, Histograms};

use crate::config::{Config, SourceConfig};
use crate::counters::Counters;
use crate::monitor::{Health, Monitor};
use crate::session::{self, SessionCtx};
use crate::state::StateStore;

/// How long shutdown waits for running sessions to commit what they applied.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// One configured source. At most one session per source runs at a time: two would
/// apply the same sets concurrently. A reconnecting agent (say, after a network blip the
/// old connection has not timed out from yet) replaces the old session.
pub struct Slot {
    ctx: SessionCtx,
    running: tokio::sync::Mutex<()>,
    current: Mutex<Option<quinn::Connection>>,
    /// `Some(reason)` while the source is failed over: its sessions drain and new ones
    /// are refused with the reason.
    fence: tokio::sync::watch::Sender<Option<String>>,
    /// Serialises failovers and failbacks of this source.
    pub(crate) switching: tokio::sync::Mutex<()>,
}

impl Slot {
    pub fn source(&self) -> &SourceConfig {
        &self.ctx.source
    }

    pub fn store(&self) -> &crate::state::StateStore {
        &self.ctx.store
    }

    pub fn ctx(&self) -> &SessionCtx {
        &self.ctx
    }

    fn monitor(&self) -> std::sync::MutexGuard<'_, Monitor> {
        self.ctx.monitor.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The source's health and the time since its last beat.
    pub fn health(&self) -> (Health, Option<Duration>) {
        let now = std::time::Instant::now();
        let m = self.monitor();
        (m.health(now), m.since_beat(now))
    }

    /// The last round-trip time and whether a session is running.
    pub fn beat_info(&self) -> (Option<Duration>, bool) {
        let connected = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        (self.monitor().rtt(), connected)
    }

    pub fn fenced(&self) -> bool {
        self.fence.borrow().is_some()
    }

    fn fence_reason(&self) -> String {
        format!(
            "this receiver has taken over source {:?} (failover) and accepts no changes from              it: its replica is now the primary copy. Do not run services on the source;              bring the data back with `doppel-receiver failback --source {}` on the receiver",
            self.ctx.source.name, self.ctx.source.name
        )
    }

    /// Fences the source and waits until its session (if any) applied and committed what
    /// had arrived and ended. The fence must already be recorded on disk.
    pub async fn fence_and_drain(&self) -> anyhow::Result<String> {
        let t = std::time::Instant::now();
        let had = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        self.monitor().set_failed_over(true);
        self.fence.send_replace(Some(self.fence_reason()));
        match tokio::time::timeout(crate::failover::DRAIN_TIMEOUT, self.running.lock()).await {
            Ok(_) if had => Ok(format!(
                "the session applied and committed what had arrived and ended in {} ms; changes from {} are refused from now on",
                t.elapsed().as_millis(),
                self.ctx.source.name
            )),
            Ok(_) => Ok(format!(
                "no session was running; changes from {} are refused from now on",
                self.ctx.source.name
            )),
            Err(_) => anyhow::bail!(
                "the session did not end within {:?} (a slow disk?); the source stays fenced: run the failover again with --force once it has",
                crate::failover::DRAIN_TIMEOUT
            ),
        }
    }

    /// Accepts the source's sessions again and forgets the failover record.
    pub fn unfence(&self, state_dir: &std::path::Path) -> anyhow::Result<()> {
        crate::failover::Record::remove(state_dir, &self.ctx.source.name)?;
        self.fence.send_replace(None);
        self.monitor().set_failed_over(false);
        Ok(())
    }
}

/// A bound receiver, ready to [`run`](Server::run).
pub struct Server {
    endpoint: quinn::Endpoint,
    slots: Arc<HashMap<String, Arc<Slot>>>,
    state_dir: std::path::PathBuf,
    /// The metrics endpoint, bound at start (`[metrics] listen`).
    metrics: Option<tokio::net::TcpListener>,
    /// Heartbeat round-trip times, by source.
    rtt: Histograms,
}

impl Server {
    /// Loads the identity, opens the state directory and binds the QUIC endpoint. Must be
    /// called inside a tokio runtime.
    pub fn bind(config: Config) -> anyhow::Result<Server> {
        let id = Identity::load(&config.cert, &config.key)?;
        let store = Arc::new(StateStore::open(&config.state_dir, config.fsync)?);
        let allowed = config
            .sources
            .iter()
            .map(|s| s.fingerprint.clone())
            .collect();
        doppel_transport::warm_up();
        let endpoint = server_endpoint(config.listen, &id, allowed)?;
        let metrics = config
            .metrics
            .listen
            .map(doppel_control::metrics::bind)
            .transpose()?;
        let rtt = doppel_control::metrics::latency_histograms();
        let mut slots = HashMap::new();
        for source in config.sources {
            let record = crate::failover::Record::load(&config.state_dir, &source.name)?;
            let (fence, drain) = tokio::sync::watch::channel(None);
            let monitor = Monitor::new(source.monitor, record.is_some());
            let slot = Slot {
                ctx: SessionCtx {
                    source: source.clone(),
                    store: store.clone(),
                    fsync: config.fsync,
                    drain,
                    monitor: Arc::new(Mutex::new(monitor)),
                    counters: Arc::new(Counters::new(
                        rtt.get_or_create(&labels([("source", &source.name)]))
                            .clone(),
                    )),
                },
                running: tokio::sync::Mutex::new(()),
                current: Mutex::new(None),
                fence,
                switching: tokio::sync::Mutex::new(()),
            };
            if record.is_some() {
                tracing::warn!(source = %source.name, "this receiver has taken over the source (failover); its changes are refused until a failback");
                slot.fence.send_replace(Some(slot.fence_reason()));
            }
            slots.insert(source.fingerprint, Arc::new(slot));
        }
        tracing::info!(
            listen = %endpoint.local_addr()?,
            fingerprint = %id.fingerprint(),
            "receiver listening"
        );
        Ok(Server {
            endpoint,
            slots: Arc::new(slots),
            state_dir: config.state_dir,
            metrics,
            rtt,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    /// Accepts connections until `shutdown` completes, then closes every connection and
    /// gives sessions a moment to persist what they applied.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let mut sessions = JoinSet::new();
        tokio::pin!(shutdown);
        let mut background = JoinSet::new();
        let path = doppel_control::socket_path(&self.state_dir);
        let listener = doppel_control::listen(&path)?;
        tracing::info!(path = %path.display(), "control socket ready");
        background.spawn(crate::control::serve(
            listener,
            self.slots.clone(),
            self.state_dir.clone(),
        ));
        for slot in self.slots.values() {
            background.spawn(watch_source(slot.clone(), self.state_dir.clone()));
        }
        if let Some(listener) = self.metrics {
            let (slots, state_dir, rtt) = (self.slots.clone(), self.state_dir.clone(), self.rtt);
            let render = Arc::new(move || crate::metrics::render(&slots, &state_dir, &rtt));
            background.spawn(doppel_control::metrics::serve(listener, render));
        }
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    sessions.spawn(handle(incoming, self.slots.clone()));
                }
                Some(done) = sessions.join_next(), if !sessions.is_empty() => {
                    if let Err(e) = done {
                        tracing::error!("session task failed: {e}");
                    }
                }
            }
        }
        tracing::info!("shutting down");
        background.abort_all();
        self.endpoint
            .close(close::SHUTDOWN, b"receiver shutting down");
        let drain = async { while sessions.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            tracing::warn!("sessions did not finish within {SHUTDOWN_GRACE:?}; abandoning them");
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        Ok(())
    }
}

/// Binds and runs until `shutdown` completes.
pub async fn serve(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    Server::bind(config)?.run(shutdown).await
}

async fn handle(incoming: quinn::Incoming, slots: Arc<HashMap<String, Arc<Slot>>>) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            // Unknown certificates end here; the verifier already logged the fingerprint.
            tracing::warn!(%remote, "handshake failed: {e}");
            return;
        }
    };
    let slot = peer_fingerprint(&conn).and_then(|fp| slots.get(&fp).cloned());
    let Some(slot) = slot else {
        // The verifier only admits configured fingerprints, so this is a bug, not an attack.
        tracing::error!(%remote, "connection without a configured client certificate");
        conn.close(close::REFUSED, b"unknown client certificate");
        return;
    };
    let source = slot.ctx.source.name.clone();
    let stream = match session::accept_stream(&conn).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(%source, %remote, "connection without a session: {e:#}");
            return;
        }
    };
    let old = slot
        .current
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .replace(conn.clone());
    if let Some(old) = old {
        tracing::info!(%source, %remote, "new connection replaces the running session");
        old.close(
            close::SUPERSEDED,
            b"a newer connection from the same source took over",
        );
    }
    let _running = slot.running.lock().await;
    if conn.close_reason().is_some() {
        return; // superseded while waiting for the previous session to end
    }
    if slot.fenced() {
        tracing::warn!(%source, %remote, "refused: the source is failed over to this receiver");
        session::refuse_connection(&conn, stream, close::FAILED_OVER, &slot.fence_reason()).await;
        return;
    }
    tracing::info!(%source, %remote, "session started");
    match session::run(conn.clone(), stream, &slot.ctx).await {
        Ok(()) => tracing::info!(%source, %remote, "session ended"),
        Err(e) => {
            tracing::warn!(%source, %remote, "session ended: {e:#}");
            Counters::add(&slot.ctx.counters.session_errors, 1);
            slot.ctx.counters.error(format!("{e:#}"));
        }
    }

    let mut cur = slot.current.lock().unwrap_or_else(|e| e.into_inner());
    if cur
        .as_ref()
        .is_some_and(|c| c.stable_id() == conn.stable_id())
    {
        *cur = None;
    }
}

/// Watches one source's heartbeats: logs changes of health and, when the source is
/// configured for it, fails over automatically once it is lost.
async fn watch_source(slot: Arc<Slot>, state_dir: std::path::PathBuf) {
    let interval = slot.monitor().settings().interval;
    let mut tick = tokio::time::interval(interval / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let source = slot.source().name.clone();
    let mut last = Health::Unknown;
    loop {
        tick.tick().await;
        let now = std::time::Instant::now();
        let (health, lost) = {
            let mut m = slot.monitor();
            (m.health(now), m.poll_lost(now))
        };
        if health != last {
            match health {
                Health::Lost | Health::Suspect => {
                    tracing::warn!(%source, from = %last, "source is {health}")
                }
                _ => tracing::info!(%source, from = %last, "source is {health}"),
            }
            last = health;
        }
        if lost && slot.source().failover.auto {
            tracing::warn!(%source, "source lost: failing over automatically");
            let _guard = slot.switching.lock().await;
            let report =
                crate::failover::failover(&slot, &state_dir, crate::failover::Options::default())
                    .await;
            if report.ok {
                tracing::info!(%source, ms = report.total_ms, "automatic failover done");
            } else {
                let why = report
                    .steps
                    .iter()
                    .rfind(|s| !matches!(s.outcome, crate::failover::Outcome::Done))
                    .map_or(String::new(), |s| format!("{}: {}", s.name, s.detail));
                tracing::error!(%source, "automatic failover did not complete: {why}");
                slot.ctx
                    .counters
                    .error(format!("automatic failover: {why}"));
            }
        }
    }
}
