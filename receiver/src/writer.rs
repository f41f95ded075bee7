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

impl Writer {
    pub async fn run(mut self, mut rx: mpsc::Receiver<ToWriter>) -> anyhow::Result<()> {
        while let Some(first) = rx.recv().await {
            let mut marks = BTreeMap::new();
            let mut dirty = Dirty::default();
            let mut close = None;
            let mut next = Some(first);
            while let Some(msg) = next {
                match msg {
                    ToWriter::Applied {
                        set,
                        epoch,
                        seq,
                        dirty: d,
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
                                // The connection is gone; the agent asks again after
                                // the next Welcome (see the agent's mirror.rs).
                                break;
                            }
                        }
                        marks.insert(
                            set,
                            SetState {
                                epoch,
                                seq,
                                stale: false,
                            },
                        );
                        dirty.merge(d);
                    }
                    ToWriter::Close {
                        code,
                        reason,
                        linger,
                    } => {
                        close = Some((code, reason, linger));
                        break;
                    }
                }
                next = rx.try_recv().ok();
            }
            if !marks.is_empty() {
                if let Err(e) = self.commit(&marks, dirty).await {
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
        }
        // The reader finished: the agent ended its stream (or the connection is gone).
        let _ = self.tx.finish();
        let _ = tokio::time::timeout(FLUSH_TIMEOUT, self.tx.flushed()).await;
        Ok(())
    }

    async fn commit(&self, marks: &BTreeMap<String, SetState>, dirty: Dirty) -> anyhow::Result<()> {
        let store = self.store.clone();
        let fsync = self.fsync;
        let source = self.source.clone();
        let marks = marks.clone();
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
