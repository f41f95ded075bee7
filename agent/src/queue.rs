//! The memory queue of one replication set: records numbered in capture order, kept
//! until every target of the set has acknowledged them.
//!
//! Plain state, no IO: the sender asks for batches after a target's cursor and reports
//! acks; the pipeline pushes ops and waits while the queue is over its byte bound.

use std::collections::VecDeque;

use doppel_common::wire::{Op, Record};

#[derive(Debug)]
pub struct SetQueue {
    /// The sequence space these numbers belong to (see `wire::SetHello`).
    pub epoch: u64,
    next_seq: u64,
    records: VecDeque<Record>,
    bytes: usize,
    /// Highest acknowledged sequence, per target of the set.
    acked: Vec<u64>,
    /// Total data bytes ever pushed (for status and rates).
    pub pushed_bytes: u64,
}

/// A target needs records this queue no longer holds (its state was reset, or it is
/// ahead of us): the set must start a new epoch and be copied again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub applied: u64,
    pub first_held: u64,
}

fn record_size(r: &Record) -> usize {
    64 + r.op.data_len() + r.op.paths().map(|p| p.0.len()).sum::<usize>()
}

impl SetQueue {
    pub fn new(epoch: u64, targets: usize) -> Self {
        SetQueue {
            epoch,
            next_seq: 1,
            records: VecDeque::new(),
            bytes: 0,
            acked: vec![0; targets],
            pushed_bytes: 0,
        }
    }

    /// Starts over in a new sequence space (everything queued is dropped: the caller
    /// re-copies the set).
    pub fn reset(&mut self, epoch: u64) {
        let targets = self.acked.len();
        *self = SetQueue::new(epoch, targets);
    }

    pub fn push(&mut self, op: Op) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pushed_bytes += op.data_len() as u64;
        let r = Record { seq, op };
        self.bytes += record_size(&r);
        self.records.push_back(r);
        seq
    }

    /// Bytes held (approximate, including per-record overhead).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Sequence of the newest record pushed (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    pub fn acked(&self, target: usize) -> u64 {
        self.acked[target]
    }

    /// Records after `after`, in order, at most about `max_bytes` (at least one).
    pub fn batch(&self, after: u64, max_bytes: usize) -> Result<Vec<Record>, Gap> {
        let first = self.records.front().map_or(self.next_seq, |r| r.seq);
        if after + 1 < first || after > self.last_seq() {
            return Err(Gap {
                applied: after,
                first_held: first,
            });
        }
        let skip = (after + 1 - first) as usize;
        let mut out = Vec::new();
        let mut size = 0;
        for r in self.records.iter().skip(skip) {
            if !out.is_empty() && size + record_size(r) > max_bytes {
                break;
            }
            size += record_size(r);
            out.push(r.clone());
        }
        Ok(out)
    }

    /// Records that `target` has applied everything up to `seq`; drops what every
    /// target has. Returns the number of records dropped.
    pub fn ack(&mut self, target: usize, seq: u64) -> usize {
        let seq = seq.min(self.last_seq());
        if seq > self.acked[target] {
            self.acked[target] = seq;
        }
        let low = self.acked.iter().copied().min().unwrap_or(0);
        let mut dropped = 0;
        while self.records.front().is_some_and(|r| r.seq <= low) {
            let r = self.records.pop_front().expect("front exists");
            self.bytes -= record_size(&r);
            dropped += 1;
        }
        dropped
    }

    /// Records and bytes `target` has not acknowledged yet.
    pub fn lag(&self, target: usize) -> (u64, usize) {
        let acked = self.acked[target];
        let recs = self.last_seq() - acked;
        let bytes = self
            .records
            .iter()
            .rev()
            .take_while(|r| r.seq > acked)
            .map(record_size)
            .sum();
        (recs, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use doppel_common::wire::RelPath;

    fn w(n: u8) -> Op {
        Op::Write {
            path: RelPath(b"f".to_vec()),
            offset: n as u64,
            data: vec![n; 100],
        }
    }

    #[test]
    fn records_stay_until_every_target_acks() {
        let mut q = SetQueue::new(1, 2);
        for i in 0..5 {
            q.push(w(i));
        }
        assert_eq!(q.last_seq(), 5);
        assert_eq!(q.batch(0, usize::MAX).unwrap().len(), 5);
        assert_eq!(q.ack(0, 3), 0, "target 1 has acked nothing");
        assert_eq!(q.ack(1, 2), 2);
        assert_eq!(q.len(), 3);
        let b = q.batch(2, usize::MAX).unwrap();
        assert_eq!(b.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(q.lag(1), (3, q.bytes()));
        q.ack(1, 5);
        q.ack(0, 5);
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
        assert!(q.batch(5, 10).unwrap().is_empty());
    }

    #[test]
    fn batches_are_bounded_but_never_empty() {
        let mut q = SetQueue::new(1, 1);
        for i in 0..10 {
            q.push(w(i));
        }
        assert_eq!(q.batch(0, 1).unwrap().len(), 1);
        assert_eq!(q.batch(0, 2 * 180).unwrap().len(), 2);
    }

    #[test]
    fn a_target_behind_what_is_held_is_a_gap() {
        let mut q = SetQueue::new(1, 1);
        for i in 0..4 {
            q.push(w(i));
        }
        q.ack(0, 3);
        assert_eq!(
            q.batch(1, 100),
            Err(Gap {
                applied: 1,
                first_held: 4
            })
        );
        assert!(q.batch(9, 100).is_err(), "ahead of us is a gap too");
        assert_eq!(q.batch(3, usize::MAX).unwrap().len(), 1);
    }
}
