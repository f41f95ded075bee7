//! One replication set of one source: its applier and how far it got.
//!
//! Records are applied strictly in sequence order. A later change can apply records of
//! different files in parallel inside [`SetApplier::apply_batch`] (the wire order only
//! binds records of the same file and namespace ops); the contract towards the session,
//! "everything up to `applied` is done, here is what to sync", stays the same.

use doppel_common::wire::Record;

use crate::apply::{Applier, ApplyError};
use crate::dirty::Dirty;

pub struct SetApplier {
    pub source: String,
    pub name: String,
    pub epoch: u64,
    /// Highest sequence number applied (not necessarily durable yet).
    pub applied: u64,
    applier: Applier,
}

/// How a batch ended.
#[derive(Debug)]
pub enum BatchEnd {
    /// Every record was applied or skipped as already applied.
    Done,
    /// A record's sequence number skipped ahead: records are missing in between.
    Gap { expected: u64, got: u64 },
    /// The target host failed (disk full, I/O error): stop and let the agent resend.
    Fatal { seq: u64, err: ApplyError },
}

pub struct BatchOutcome {
    pub end: BatchEnd,
    /// What must be synced before `applied` may be persisted.
    pub dirty: Dirty,
    /// Records applied now (not counting resends that were skipped).
    pub applied_now: usize,
}

impl SetApplier {
    pub fn new(source: String, name: String, epoch: u64, applied: u64, applier: Applier) -> Self {
        SetApplier {
            source,
            name,
            epoch,
            applied,
            applier,
        }
    }

    pub fn applier(&self) -> &Applier {
        &self.applier
    }

    pub fn apply_batch(&mut self, records: &[Record]) -> BatchOutcome {
        let mut applied_now = 0;
        let mut end = BatchEnd::Done;
        for r in records {
            if r.seq <= self.applied {
                // A resend after a reconnect: already applied.
                continue;
            }
            if r.seq != self.applied + 1 {
                end = BatchEnd::Gap {
                    expected: self.applied + 1,
                    got: r.seq,
                };
                break;
            }
            match self.applier.apply(&r.op) {
                Ok(()) => {}
                Err(err) if err.is_fatal() => {
                    end = BatchEnd::Fatal { seq: r.seq, err };
                    break;
                }
                Err(err) => tracing::warn!(
                    source = %self.source,
                    set = %self.name,
                    seq = r.seq,
                    "skipped record: {err}; the replica may differ from the source for this path"
                ),
            }
            self.applied = r.seq;
            applied_now += 1;
        }
        BatchOutcome {
            end,
            dirty: self.applier.take_dirty(),
            applied_now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use doppel_common::wire::{Op, RelPath};

    fn rec(seq: u64, data: &[u8]) -> Record {
        Record {
            seq,
            op: Op::Write {
                path: RelPath(b"f".to_vec()),
                offset: 0,
                data: data.to_vec(),
            },
        }
    }

    #[test]
    fn resends_are_skipped_and_gaps_stop() {
        let d = tempfile::tempdir().unwrap();
        let a = Applier::open(d.path()).unwrap();
        let mut s = SetApplier::new("src".into(), "set".into(), 1, 0, a);
        let o = s.apply_batch(&[rec(1, b"a"), rec(2, b"b")]);
        assert!(matches!(o.end, BatchEnd::Done));
        assert_eq!((s.applied, o.applied_now), (2, 2));
        let o = s.apply_batch(&[rec(2, b"X"), rec(3, b"c")]);
        assert_eq!((s.applied, o.applied_now), (3, 1));
        assert_eq!(std::fs::read(d.path().join("f")).unwrap(), b"c");
        let o = s.apply_batch(&[rec(4, b"d"), rec(6, b"f")]);
        assert!(matches!(
            o.end,
            BatchEnd::Gap {
                expected: 5,
                got: 6
            }
        ));
        assert_eq!(s.applied, 4);
    }
}
