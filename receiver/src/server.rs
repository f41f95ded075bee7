//! The listener: accepts agents, maps each to its configured source, runs sessions.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use doppel_transport::{close, peer_fingerprint, server_endpoint, Identity};
use tokio::task::JoinSet;

use crate::config::Config;
use crate::session::{self, SessionCtx};
use crate::state::StateStore;

/// How long shutdown waits for running sessions to commit what they applied.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// One configured source. At most one session per source runs at a time: two would
/// apply the same sets concurrently. A reconnecting agent (say, after a network blip the
/// old connection has not timed out from yet) replaces the old session.
struct Slot {
    ctx: SessionCtx,
    running: tokio::sync::Mutex<()>,
    current: Mutex<Option<quinn::Connection>>,
}

/// A bound receiver, ready to [`run`](Server::run).
pub struct Server {
    endpoint: quinn::Endpoint,
    slots: Arc<HashMap<String, Arc<Slot>>>,
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
        let endpoint = server_endpoint(config.listen, &id, allowed)?;
        let slots = config
            .sources
            .into_iter()
            .map(|source| {
                let slot = Slot {
                    ctx: SessionCtx {
                        source: source.clone(),
                        store: store.clone(),
                        fsync: config.fsync,
                    },
                    running: tokio::sync::Mutex::new(()),
                    current: Mutex::new(None),
                };
                (source.fingerprint, Arc::new(slot))
            })
            .collect();
        tracing::info!(
            listen = %endpoint.local_addr()?,
            fingerprint = %id.fingerprint(),
            "receiver listening"
        );
        Ok(Server {
            endpoint,
            slots: Arc::new(slots),
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
    tracing::info!(%source, %remote, "session started");
    match session::run(conn.clone(), &slot.ctx).await {
        Ok(()) => tracing::info!(%source, %remote, "session ended"),
        Err(e) => tracing::warn!(%source, %remote, "session ended: {e:#}"),
    }
    let mut cur = slot.current.lock().unwrap_or_else(|e| e.into_inner());
    if cur
        .as_ref()
        .is_some_and(|c| c.stable_id() == conn.stable_id())
    {
        *cur = None;
    }
}
