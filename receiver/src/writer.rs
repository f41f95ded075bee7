//! The session's sending half: makes applied records durable, then acknowledges them.
//!
//! It runs beside the frame reader so that applying the next batch (and making its bytes
//! readable on the replica) never waits for the previous batch's fsync. Whatever queued
//! up while a sync was running is committed together: one fdatasync per file and one
//! state write per set for many batches ("group commit").

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use doppel_common::wire::Frame;
use doppel_transport::{close, FrameSender};
use quinn::VarInt;
use tokio::sync::mpsc;

use crate::apply::Need;
use crate::dirty::Dirty;
use crate::state::{SetState, StateStore};

/// How long to wait for the agent to take a final frame before closing anyway.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

pub enum ToWriter {
    /// Records of `set` up to `seq` are applied; sync `dirty`, persist, acknowledge.
    Applied {
        set: String,
        epoch: u64,
        seq: u64,
        dirty: Dirty,
        /// Answers to Sum ops among those records: sent at once, before the Ack that
        /// covers them (the agent reads "an Ack without a Need" as "identical").
        needs: Vec<Need>,
    },
    /// Commit what came before, then tell the agent why the session ends and close.
    /// Without `linger` the reason goes only in the close frame and nothing waits for the
    /// agent: a failover drains a source that is usually dead.
    Close {
        code: VarInt,
        reason: String,
        linger: bool,
    },
}

pub struct Writer {
    pub source: String,
    pub store: Arc<StateStore>,
    pub fsync: bool,
    pub tx: FrameSender,
    pub conn: quinn::Connection,
}

/// What the next commit covers: the last record applied per set, the files to sync,
/// and a close asked for after them.
#[derive(Default)]
struct Group {
    marks: BTreeMap<String, SetState>,
    dirty: Dirty,
    close: Option<(VarInt, String, bool)>,
}

impl Writer {
    pub async fn run(mut self, mut rx: mpsc::Receiver<ToWriter>) -> anyhow::Result<()> {
        let mut group = Group::default();
        let mut reading = true;
        loop {
            if group.marks.is_empty() && group.close.is_none() {
                match rx.recv().await {
                    Some(msg) => self.take(msg, &mut group).await,
                    None => break,
                }
            }
            while group.close.is_none() {
                match rx.try_recv() {
                    Ok(msg) => self.take(msg, &mut group).await,
                    Err(_) => break,
                }
            }
            let Group {
                marks,
                dirty,
                close,
            } = std::mem::take(&mut group);
            if !marks.is_empty() {
                let commit = commit(
                    self.store.clone(),
                    self.fsync,
                    self.source.clone(),
                    marks.clone(),
                    dirty,
                );
                tokio::pin!(commit);
                // While it syncs, the batches applied meanwhile join the next group and
                // their answers go out at once: the agent reads and sends what differs
                // while this side waits for the disk, instead of after.
                let result = loop {
                    tokio::select! {
                        r = &mut commit => break r,
                        msg = rx.recv(), if reading && close.is_none() && group.close.is_none() => {
                            match msg {
                                Some(msg) => self.take(msg, &mut group).await,
                                None => reading = false,
                            }
                        }
                    }
                };
                if let Err(e) = result {
                    let reason = format!(
                        "{e:#}; the receiver will take the records again after a reconnect"
                    );
                    tracing::error!(source = %self.source, "{reason}");
                    self.close(close::RETRY_LATER, reason, true).await;
                    return Err(e);
                }
                for (set, st) in marks {
                    // The agent may already be gone; the mark is persisted and the next
                    // Welcome reports it, so a lost Ack costs only a resend.
                    if self
                        .tx
                        .send(&Frame::Ack { set, seq: st.seq })
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
            if let Some((code, reason, linger)) = close {
                self.close(code, reason, linger).await;
                return Ok(());
            }
            if !reading && group.marks.is_empty() && group.close.is_none() {
                break;
            }
        }
        // The reader finished: the agent ended its stream (or the connection is gone).
        let _ = self.tx.finish();
        let _ = tokio::time::timeout(FLUSH_TIMEOUT, self.tx.flushed()).await;
        Ok(())
    }

    /// Adds `msg` to `group`; the answers it carries go out now, before the Ack that
    /// covers their records.
    async fn take(&mut self, msg: ToWriter, group: &mut Group) {
        match msg {
            ToWriter::Applied {
                set,
                epoch,
                seq,
                dirty,
                needs,
            } => {
                for n in needs {
                    let frame = Frame::Need {
                        set: set.clone(),
                        job: n.job,
                        file: n.file,
                        path: n.path,
                        ranges: n.ranges,
                        fine_block: doppel_common::wire::sums::FINE_BLOCK,
                        fine: n.fine,
                        missing: n.missing,
                        attr: n.attr,
                        listing: n.listing,
                        extra: n.extra,
                    };
                    if self.tx.send(&frame).await.is_err() {
                        // The connection is gone; the agent asks again after the next
                        // Welcome (see the agent's mirror.rs).
                        break;
                    }
                }
                group.marks.insert(
                    set,
                    SetState {
                        epoch,
                        seq,
                        stale: false,
                    },
                );
                group.dirty.merge(dirty);
            }
            ToWriter::Close {
                code,
                reason,
                linger,
            } => group.close = Some((code, reason, linger)),
        }
    }

    async fn close(&mut self, code: VarInt, reason: String, linger: bool) {
        if !linger {
            self.conn.close(code, reason.as_bytes());
            return;
        }
        let _ = self
            .tx
            .send(&Frame::Refused {
                reason: reason.clone(),
            })
            .await;
        let _ = self.tx.finish();
        let _ = tokio::time::timeout(FLUSH_TIMEOUT, self.tx.flushed()).await;
        self.conn.close(code, reason.as_bytes());
    }
}

/// Syncs `dirty` (when `fsync`) and persists `marks`, off the runtime's threads.
async fn commit(
    store: Arc<StateStore>,
    fsync: bool,
    source: String,
    marks: BTreeMap<String, SetState>,
    dirty: Dirty,
) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || {
        let mut dirty = dirty;
        if fsync {
            dirty
                .sync()
                .context("cannot sync replicated files to disk (fdatasync/fsync)")?;
        }
        for (set, st) in &marks {
            store.store(&source, set, *st)?;
        }
        anyhow::Ok(())
    })
    .await
    .context("commit task failed")?
}
