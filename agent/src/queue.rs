//! The queue of one replication set: records numbered in capture order, kept until
//! every target of the set has acknowledged them, in memory, in the on-disk journal,
//! or in memory first and spilled to the journal (see [`QueueMode`]).
//!
//! Plain state plus the journal's file IO: the sender asks for batches after a
//! target's cursor and reports acks; the pipeline pushes ops and, in realtime mode,
//! waits while the memory bound is exceeded.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use doppel_common::wire::{Op, Record};
use tracing::{info, warn};

use crate::age::PushTimes;
use crate::journal::{AppendError, Journal};
use crate::marks::Marks;
use crate::rate::Rate;

/// Where a set's unacknowledged records live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueueMode {
    /// Memory only, bounded: above the bound the pipeline waits (the kernel meanwhile
    /// remembers changed ranges, which are re-read and sent when there is room). An
    /// agent restart copies the set again.
    Realtime,
    /// Every record goes to the journal first and is sent from it; its space is reclaimed
    /// once every target acknowledged it. After a crash the journal is replayed.
    StoreAndForward,
    /// Memory while the targets keep up; when the memory bound is hit or a target is
    /// unreachable, the queue spills to the journal until the targets catch up again.
    Hybrid,
}

impl QueueMode {
    /// As the config writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueMode::Realtime => "realtime",
            QueueMode::StoreAndForward => "store-and-forward",
            QueueMode::Hybrid => "hybrid",
        }
    }

    pub fn uses_journal(self) -> bool {
        self != QueueMode::Realtime
    }
}

#[derive(Debug)]
pub struct SetQueue {
    /// The sequence space these numbers belong to (see `wire::SetHello`).
    pub epoch: u64,
    mode: QueueMode,
    next_seq: u64,
    /// Records after the journal's: seqs `mem[0].seq ..= next_seq - 1`, contiguous.
    mem: VecDeque<Record>,
    /// Per record of `mem`: the [`record_size`] of every record pushed to `mem` before
    /// it (a running total), so that the bytes a target lags behind take a binary
    /// search, not a walk of the queue, whatever its length.
    mem_before: VecDeque<u64>,
    /// The running total after the last record pushed.
    mem_total: u64,
    mem_bytes: usize,
    mem_limit: usize,
    journal: Option<Journal>,
    /// Hybrid: new records go to the journal until it drains.
    spilled: bool,
    /// Highest acknowledged sequence, per target of the set.
    acked: Vec<u64>,
    /// The journal budget was hit and records were dropped: the set must be copied
    /// again once the queue has drained (see [`SetQueue::take_resync`]).
    overflowed: bool,
    /// What the records dropped at the budget changed (see marks.rs).
    marks: Marks,
    resync_due: bool,
    /// Total data bytes ever pushed, and records dropped at the journal budget.
    pub pushed_bytes: u64,
    pub dropped: u64,
    /// When records were pushed, for lag in seconds.
    times: PushTimes,
    /// Per target: file data handed to its session, and its rate.
    sent: Vec<u64>,
    rates: Vec<Rate>,
    /// Per target: the last record of bytes read back from a file rather than captured
    /// at write time (see [`SetQueue::order_broken`]), until it is applied with nothing
    /// newer pending.
    unordered_until: Vec<Option<u64>>,
}

/// A batch encoded for the wire (see [`SetQueue::encoded_batch`]).
pub struct EncodedBatch {
    /// The Batch frame with its length prefix, uncompressed, in pieces
    /// (`wire::encode_batch_pieces`: large writes' data is not copied).
    pub frame: Vec<bytes::Bytes>,
    /// Sequence of its last record, and the file data it carries.
    pub last: u64,
    pub data_bytes: u64,
}

/// A target needs records this queue no longer holds (its state was reset, or it is
/// ahead of us): the set must start a new epoch and be copied again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub applied: u64,
    pub first_held: u64,
}

/// What `r` holds on the heap, as the allocator counts it: each buffer rounded up to
/// malloc's 16-byte chunks plus its header. The record itself lives in the queue's
/// deque, counted by capacity in [`SetQueue::bytes`]. Many small records (a random
/// write storm) cost far more than their data: the memory bound must see that.
fn held_bytes(r: &Record) -> usize {
    fn chunk(n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (n + 8).next_multiple_of(16).max(32)
        }
    }
    let sums = match &r.op {
        Op::Sum { sums, .. } => chunk(sums.len() * 8),
        _ => 0,
    };
    chunk(r.op.data_len()) + sums + r.op.paths().map(|p| chunk(p.0.len())).sum::<usize>()
}

pub fn record_size(r: &Record) -> usize {
    let sums = match &r.op {
        Op::Sum { sums, .. } => sums.len() * 8,
        _ => 0,
    };
    64 + r.op.data_len() + sums + r.op.paths().map(|p| p.0.len()).sum::<usize>()
}

impl SetQueue {
    /// A memory-only queue (realtime mode).
    pub fn new(epoch: u64, targets: usize) -> Self {
        Self::with(QueueMode::Realtime, None, epoch, targets, usize::MAX)
    }

    /// A queue in `mode`; `journal` is required unless the mode is realtime. A journal
    /// that still holds records (the agent stopped before they were acknowledged)
    /// keeps its epoch and sequence: they are resent after the receiver's Welcome.
    pub fn with(
        mode: QueueMode,
        journal: Option<Journal>,
        epoch: u64,
        targets: usize,
        mem_limit: usize,
    ) -> Self {
        // Only store-and-forward resumes a journal: there every record sent was first
        // journaled (and is sent only once durable), so the journal is never behind a
        // target. A hybrid queue may have sent memory-only records past the journal's
        // end, so after a restart it starts a new epoch (the set is copied again).
        let resume = mode == QueueMode::StoreAndForward;
        let (epoch, next_seq) = match &journal {
            Some(j) if resume && !j.is_empty() => (j.epoch(), j.next_seq()),
            _ => (epoch, 1),
        };
        let mut q = SetQueue {
            epoch,
            mode,
            next_seq,
            mem: VecDeque::new(),
            mem_before: VecDeque::new(),
            mem_total: 0,
            mem_bytes: 0,
            mem_limit,
            spilled: false,
            journal,
            acked: vec![0; targets],
            overflowed: false,
            marks: Marks::default(),
            resync_due: false,
            pushed_bytes: 0,
            dropped: 0,
            times: PushTimes::default(),
            sent: vec![0; targets],
            // A young rate counts from the queue's start, not from its first send: a
            // first batch sent at once would otherwise be a rate of its own.
            rates: vec![Rate::since(Instant::now()); targets],
            unordered_until: vec![None; targets],
        };
        if let Some(j) = &mut q.journal {
            if !resume || j.is_empty() {
                if let Err(e) = j.reset_at(epoch, 1) {
                    warn!(error = %e, "cannot reset the journal; records stay in memory");
                    q.journal = None;
                }
            } else {
                // Their push times died with the last process: count from now.
                q.times.pushed(j.first_seq(), Instant::now());
                info!(
                    epoch,
                    first = j.first_seq(),
                    last = j.last_seq(),
                    "journal replayed: resending what targets have not acknowledged"
                );
            }
        }
        q
    }

    /// Starts over in a new sequence space (everything queued is dropped: the caller
    /// re-copies the set).
    pub fn reset(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.next_seq = 1;
        self.mem.clear();
        self.mem_before.clear();
        self.mem_bytes = 0;
        self.spilled = false;
        self.overflowed = false;
        self.marks = Marks::default();
        self.acked.iter_mut().for_each(|a| *a = 0);
        self.times.clear();
        if let Some(j) = &mut self.journal {
            if let Err(e) = j.reset_at(epoch, 1) {
                warn!(error = %e, "cannot reset the journal; records stay in memory");
                self.journal = None;
            }
        }
    }

    pub fn mode(&self) -> QueueMode {
        self.mode
    }

    /// Whether records now go to the journal.
    fn to_journal(&self) -> bool {
        self.journal.is_some() && (self.mode == QueueMode::StoreAndForward || self.spilled)
    }

    /// Appends a record for `op`. Returns false if it was dropped (journal budget).
    pub fn push(&mut self, op: Op) -> bool {
        if self.overflowed {
            self.dropped += 1;
            self.marks.add(&op);
            return false;
        }
        let seq = self.next_seq;
        let r = Record { seq, op };
        let data_len = r.op.data_len() as u64;
        if self.to_journal() {
            let j = self.journal.as_mut().expect("to_journal checked");
            match j.append(std::slice::from_ref(&r)) {
                Ok(()) => {}
                Err(AppendError::Full { .. }) => {
                    warn!(seq, "journal budget reached: changes are no longer queued, only which files they touched; those are copied again once targets catch up");
                    self.overflowed = true;
                    self.dropped += 1;
                    self.marks.add(&r.op);
                    return false;
                }
                Err(e) => {
                    warn!(seq, error = %e, "journal append failed: queueing in memory instead");
                    self.journal = None;
                    self.spilled = false;
                    return self.push(r.op);
                }
            }
        } else {
            self.mem_bytes += held_bytes(&r);
            self.mem_before.push_back(self.mem_total);
            self.mem_total += record_size(&r) as u64;
            self.mem.push_back(r);
        }
        self.pushed_bytes += data_len;
        self.times.pushed(seq, Instant::now());
        self.next_seq += 1;
        if self.mode == QueueMode::Hybrid && !self.spilled && self.bytes() > self.mem_limit {
            self.spill("the memory queue is full");
        }
        true
    }

    /// Hybrid: moves the memory records to the journal; later records follow them there.
    pub fn spill(&mut self, why: &str) {
        if self.mode != QueueMode::Hybrid || self.spilled || self.journal.is_none() {
            return;
        }
        let j = self.journal.as_mut().expect("checked");
        if j.is_empty() {
            let first = self.mem.front().map_or(self.next_seq, |r| r.seq);
            if j.next_seq() != first {
                if let Err(e) = j.reset_at(self.epoch, first) {
                    warn!(error = %e, "cannot spill to the journal");
                    return;
                }
            }
        }
        // One record at a time, moved rather than copied: the memory queue is at its
        // bound when this runs, and a copy of it would double the agent's footprint.
        let count = self.mem.len();
        while let Some(r) = self.mem.pop_front() {
            if let Err(e) = j.append(std::slice::from_ref(&r)) {
                warn!(error = %e, "cannot spill to the journal; the memory queue keeps the records");
                self.mem.push_front(r);
                return;
            }
            self.mem_before.pop_front();
            self.mem_bytes -= held_bytes(&r);
        }
        self.mem.shrink_to_fit();
        info!(records = count, why, "spilled the queue to the journal");
        self.spilled = true;
    }

    /// Bytes held in memory: the records' buffers and the deque that holds them.
    pub fn bytes(&self) -> usize {
        self.mem_bytes + self.mem.capacity() * std::mem::size_of::<Record>()
    }

    /// Whether the pipeline must wait for acks before pushing more (memory over its
    /// bound and nowhere to spill).
    pub fn full(&self) -> bool {
        !self.mem.is_empty() && self.bytes() > self.mem_limit && !self.to_journal()
    }

    /// How much file data the mirror may queue now. Its data is read again from the
    /// files whenever wanted, so rather than spill it to the journal or overfill memory it
    /// waits until the targets took what is queued; half the memory bound stays free
    /// for live changes, which must never wait.
    pub fn mirror_room(&self) -> usize {
        let (queued, bound) = match &self.journal {
            // The journal's size counts whole segments, acknowledged records included:
            // only when nothing is unacknowledged is it known to hold nothing.
            Some(j) if self.to_journal() => {
                let unacked = if self.min_acked() >= self.last_seq() {
                    0
                } else {
                    j.bytes() as usize
                };
                (unacked, self.mem_limit.min(j.budget() as usize))
            }
            _ => (self.bytes(), self.mem_limit),
        };
        (bound / 2).saturating_sub(queued)
    }

    pub fn journal_bytes(&self) -> u64 {
        self.journal.as_ref().map_or(0, |j| j.bytes())
    }

    pub fn journal_written_bytes(&self) -> u64 {
        self.journal.as_ref().map_or(0, |j| j.written_bytes())
    }

    pub fn len(&self) -> usize {
        (self.next_seq - self.first_held()) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sequence of the newest record pushed (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    pub fn acked(&self, target: usize) -> u64 {
        self.acked[target]
    }

    fn first_held(&self) -> u64 {
        match &self.journal {
            Some(j) if !j.is_empty() => j.first_seq(),
            _ => self.mem.front().map_or(self.next_seq, |r| r.seq),
        }
    }

    /// Records after `after`, in order, at most about `max_bytes` (at least one).
    pub fn batch(&self, after: u64, max_bytes: usize) -> Result<Vec<Record>, Gap> {
        self.with_batch(after, max_bytes, |rs| {
            rs.iter().map(|r| (*r).clone()).collect()
        })
    }

    /// As [`SetQueue::batch`], encoded as `set`'s Batch frame (plain: see
    /// `wire::compress_frame`) straight from the queue, without copying the records;
    /// `None` when there is nothing to send.
    pub fn encoded_batch(
        &self,
        set: &str,
        after: u64,
        max_bytes: usize,
    ) -> Result<Option<EncodedBatch>, Gap> {
        self.with_batch(after, max_bytes, |rs| {
            let last = rs.last()?.seq;
            Some(EncodedBatch {
                frame: doppel_common::wire::encode_batch_pieces(set, rs),
                last,
                data_bytes: rs.iter().map(|r| r.op.data_len() as u64).sum(),
            })
        })
    }

    /// Hands the records after `after` (see [`SetQueue::batch`]) to `f`, borrowed.
    fn with_batch<R>(
        &self,
        after: u64,
        max_bytes: usize,
        f: impl FnOnce(&[&Record]) -> R,
    ) -> Result<R, Gap> {
        let first = self.first_held();
        if after + 1 < first || after > self.last_seq() {
            return Err(Gap {
                applied: after,
                first_held: first,
            });
        }
        if let Some(j) = &self.journal {
            if !j.is_empty() && after < j.last_seq() {
                // Only what is on disk: a record a target applied must never be lost
                // by a host crash and its sequence number reused for another op.
                if after >= j.durable_seq() {
                    return Ok(f(&[]));
                }
                let mut records = j.read_after(after, max_bytes).map_err(|e| {
                    warn!(error = %e, "cannot read the journal");
                    Gap {
                        applied: after,
                        first_held: first,
                    }
                })?;
                records.retain(|r| r.seq <= j.durable_seq());
                let refs: Vec<&Record> = records.iter().collect();
                return Ok(f(&refs));
            }
        }
        let Some(front) = self.mem.front() else {
            return Ok(f(&[]));
        };
        let skip = (after + 1).saturating_sub(front.seq) as usize;
        let mut out = Vec::new();
        let mut size = 0;
        for r in self.mem.iter().skip(skip) {
            if !out.is_empty() && size + record_size(r) > max_bytes {
                break;
            }
            size += record_size(r);
            out.push(r);
        }
        Ok(f(&out))
    }

    /// The records queued last carry bytes read back from a file (a range the capture
    /// could not copy at write time): newer than the records queued after them may be,
    /// they can put one file ahead of another on the replica. Each target is not
    /// crash-consistent until it has applied them with nothing newer pending.
    pub fn order_broken(&mut self) {
        let last = self.last_seq();
        for u in &mut self.unordered_until {
            *u = Some(last);
        }
    }

    /// Whether `target`'s replica shows writes in the order the source made them (a
    /// state the source went through): no read-back bytes applied since it last
    /// caught up.
    pub fn crash_consistent(&self, target: usize) -> bool {
        self.unordered_until.get(target).is_none_or(|u| u.is_none())
    }

    /// Records that `target` has applied everything up to `seq`; drops what every
    /// target has.
    pub fn ack(&mut self, target: usize, seq: u64) {
        let seq = seq.min(self.last_seq());
        if seq > self.acked[target] {
            self.acked[target] = seq;
        }
        let last = self.last_seq();
        if let Some(u) = self.unordered_until.get_mut(target) {
            if u.is_some_and(|until| seq >= until && seq == last) {
                *u = None;
            }
        }
        let low = self.acked.iter().copied().min().unwrap_or(0);
        self.times.trim(low);
        while self.mem.front().is_some_and(|r| r.seq <= low) {
            let r = self.mem.pop_front().expect("front exists");
            self.mem_before.pop_front();
            self.mem_bytes -= held_bytes(&r);
        }
        // A burst grew the deque; give most of it back once the targets caught up.
        if self.mem.capacity() > 4096 && self.mem.len() < self.mem.capacity() / 8 {
            self.mem.shrink_to(self.mem.len() * 2);
        }
        if let Some(j) = &mut self.journal {
            if let Err(e) = j.trim(low) {
                warn!(error = %e, "cannot reclaim journal space");
            }
            if self.spilled && self.mode == QueueMode::Hybrid && low >= j.last_seq() {
                info!("targets caught up: the queue is back in memory");
                self.spilled = false;
            }
        }
        if self.overflowed && low == self.last_seq() {
            self.overflowed = false;
            self.resync_due = true;
        }
    }

    /// True once after the queue drained from a journal overflow: copy the set again.
    /// The highest sequence every target acknowledged.
    pub fn min_acked(&self) -> u64 {
        self.acked.iter().copied().min().unwrap_or(0)
    }

    /// Once targets caught up after records were dropped: what must be copied again.
    pub fn take_resync(&mut self) -> Option<Marks> {
        // Dropping may start when every target has acknowledged everything already,
        // and then no acknowledgement comes to notice the end of it.
        if self.overflowed && self.min_acked() >= self.last_seq() {
            self.overflowed = false;
            self.resync_due = true;
        }
        std::mem::take(&mut self.resync_due).then(|| std::mem::take(&mut self.marks))
    }

    /// fsyncs the journal if its policy says it is time; true if records became
    /// durable (and may now be sent).
    pub fn sync_due(&mut self, now: std::time::Instant) -> bool {
        let Some(j) = &mut self.journal else {
            return false;
        };
        if j.sync_deadline().is_none_or(|d| d > now) {
            return false;
        }
        let before = j.durable_seq();
        if let Err(e) = j.sync() {
            warn!(error = %e, "journal fsync failed");
        }
        j.durable_seq() > before
    }

    /// When the journal next wants an fsync.
    pub fn sync_deadline(&self) -> Option<std::time::Instant> {
        self.journal.as_ref().and_then(|j| j.sync_deadline())
    }

    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Records were dropped (journal overflow) and what they touched is not copied again
    /// yet.
    pub fn resync_pending(&self) -> bool {
        self.overflowed || self.resync_due
    }

    pub fn spilled(&self) -> bool {
        self.spilled
    }

    /// How long the oldest record `target` has not acknowledged has waited (zero when
    /// it has them all).
    pub fn lag_age(&self, target: usize, now: Instant) -> Duration {
        self.times
            .age(self.acked[target], self.last_seq(), now)
            .unwrap_or_default()
    }

    /// How long record `seq` has waited, if still known (before it is acknowledged by
    /// every target).
    pub fn waited(&self, seq: u64, now: Instant) -> Option<Duration> {
        self.times.age(seq.checked_sub(1)?, self.last_seq(), now)
    }

    /// `bytes` of file data were handed to `target`'s session.
    pub fn sent(&mut self, target: usize, bytes: u64, now: Instant) {
        self.sent[target] += bytes;
        self.rates[target].note(now, self.sent[target]);
    }

    /// File data handed to `target`'s session so far, and per second lately.
    pub fn sent_bytes(&self, target: usize) -> u64 {
        self.sent[target]
    }

    pub fn throughput(&self, target: usize, now: Instant) -> f64 {
        self.rates[target].per_sec(now, self.sent[target])
    }

    /// Records and bytes (approximate) `target` has not acknowledged yet.
    pub fn lag(&self, target: usize) -> (u64, usize) {
        let acked = self.acked[target];
        let recs = self.last_seq() - acked;
        // Records are in seq order: the first one `target` has not acknowledged.
        let first = self.mem.partition_point(|r| r.seq <= acked);
        let bytes = self
            .mem_before
            .get(first)
            .map_or(0, |&before| (self.mem_total - before) as usize);
        let journal = if acked < self.first_held() || self.to_journal() {
            self.journal_bytes() as usize
        } else {
            0
        };
        (recs, bytes + journal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{FsyncPolicy, JournalOptions};
    use doppel_common::wire::RelPath;

    fn w(n: u8) -> Op {
        Op::Write {
            path: RelPath(b"f".to_vec()),
            offset: n as u64,
            data: vec![n; 100].into(),
        }
    }

    #[test]
    fn mode_names_are_the_config_s() {
        for m in [
            QueueMode::Realtime,
            QueueMode::StoreAndForward,
            QueueMode::Hybrid,
        ] {
            assert_eq!(serde_json::to_value(m).unwrap(), m.as_str());
        }
    }

    fn journal(dir: &std::path::Path) -> Journal {
        let opts = JournalOptions {
            segment_bytes: 4096,
            fsync: FsyncPolicy::Always,
            budget_bytes: 1 << 20,
        };
        Journal::open(dir, opts, 7).unwrap()
    }

    fn seqs(v: &[Record]) -> Vec<u64> {
        v.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn lag_bytes_are_counted_without_walking_the_queue() {
        let mut q = SetQueue::new(1, 2);
        let sizes: Vec<usize> = (0..1000u64).map(|i| (i as usize * 37) % 500).collect();
        for (i, &n) in sizes.iter().enumerate() {
            q.push(Op::Write {
                path: RelPath(format!("f{i}").into_bytes()),
                offset: 0,
                data: vec![1; n].into(),
            });
        }
        let walked = |q: &SetQueue, acked: u64| -> usize {
            q.mem
                .iter()
                .filter(|r| r.seq > acked)
                .map(record_size)
                .sum()
        };
        for acked in [0u64, 1, 2, 499, 998, 999, 1000] {
            q.ack(0, acked);
            assert_eq!(q.lag(0).1, walked(&q, acked), "acked {acked}");
            assert_eq!(q.lag(1).1, walked(&q, 0), "target 1 acked nothing");
        }
        // Both acked: the front goes, the running totals with it.
        q.ack(1, 600);
        assert_eq!(q.mem.len(), 400);
        assert_eq!(q.lag(1).1, walked(&q, 600));
        assert_eq!(q.lag(0).1, 0);
    }

    #[test]
    fn records_stay_until_every_target_acks() {
        let mut q = SetQueue::new(1, 2);
        for i in 0..5 {
            q.push(w(i));
        }
        assert_eq!(q.last_seq(), 5);
        assert_eq!(q.batch(0, usize::MAX).unwrap().len(), 5);
        q.ack(0, 3);
        assert_eq!(q.len(), 5, "target 1 has acked nothing");
        q.ack(1, 2);
        assert_eq!(q.len(), 3);
        assert_eq!(seqs(&q.batch(2, usize::MAX).unwrap()), vec![3, 4, 5]);
        assert_eq!(q.lag(1).0, 3);
        assert!(q.lag(1).1 > 0);
        q.ack(1, 5);
        q.ack(0, 5);
        assert!(q.is_empty());
        assert_eq!(q.mem_bytes, 0, "no record buffer is held");
        assert!(q.batch(5, 10).unwrap().is_empty());
    }

    #[test]
    fn records_dropped_at_the_journal_budget_leave_marks_for_the_resync() {
        let d = tempfile::tempdir().unwrap();
        let mut j = journal(d.path());
        j.reset_at(1, 1).unwrap();
        let mut q = SetQueue::with(QueueMode::StoreAndForward, Some(j), 1, 1, 1 << 20);
        let big = |path: &str| Op::Write {
            path: RelPath(path.as_bytes().to_vec()),
            offset: 0,
            data: vec![7; 300 << 10].into(),
        };
        let mut pushed = 0;
        while q.push(big("kept")) {
            pushed += 1;
        }
        assert!(q.overflowed() && pushed > 0);
        assert!(!q.push(big("dir/late")));
        assert!(!q.push(Op::Remove {
            path: RelPath(b"gone".to_vec())
        }));
        assert_eq!(q.take_resync(), None, "not before the targets caught up");
        q.ack(0, q.last_seq());
        let marks = q.take_resync().expect("a resync is due");
        assert!(!marks.whole);
        let entries: Vec<&[u8]> = marks.entries.iter().map(|p| p.0.as_slice()).collect();
        assert_eq!(entries, vec![b"dir/late".as_slice(), b"kept"]);
        assert_eq!(marks.dirs.iter().collect::<Vec<_>>(), vec![&None]);
        assert_eq!(q.take_resync(), None, "once");
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

    #[test]
    fn store_and_forward_resumes_from_the_journal_after_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let mut q = SetQueue::with(
            QueueMode::StoreAndForward,
            Some(journal(d.path())),
            42,
            1,
            1 << 20,
        );
        for i in 0..50 {
            assert!(q.push(w(i)));
        }
        assert_eq!(q.bytes(), 0, "nothing is held in memory");
        q.ack(0, 20);
        let epoch = q.epoch;
        drop(q);
        let mut q = SetQueue::with(
            QueueMode::StoreAndForward,
            Some(journal(d.path())),
            99,
            1,
            1 << 20,
        );
        assert_eq!(q.epoch, epoch, "the journal's sequence space continues");
        assert_eq!(q.last_seq(), 50);
        let b = q.batch(20, usize::MAX).unwrap();
        assert_eq!(b.first().map(|r| r.seq), Some(21));
        assert_eq!(b.last().map(|r| r.seq), Some(50));
        assert_eq!(b[0].op, w(20));
        q.ack(0, 50);
        assert!(q.push(w(1)));
        assert_eq!(q.last_seq(), 51);
    }

    #[test]
    fn hybrid_spills_when_memory_is_full_and_comes_back() {
        let d = tempfile::tempdir().unwrap();
        let mut q = SetQueue::with(QueueMode::Hybrid, Some(journal(d.path())), 5, 1, 2000);
        for i in 0..4 {
            q.push(w(i));
        }
        assert!(!q.spilled());
        for i in 4..20 {
            q.push(w(i));
        }
        assert!(
            q.spilled(),
            "over 2000 bytes of records (buffers and deque slots) spill to the journal"
        );
        assert_eq!(q.bytes(), 0, "spilled: nothing in memory, the deque freed");
        assert!(!q.full(), "a spilled queue never makes the pipeline wait");
        let all: Vec<u64> = (1..=20).collect();
        let mut got = Vec::new();
        let mut after = 0;
        while after < 20 {
            let b = q.batch(after, 300).unwrap();
            after = b.last().unwrap().seq;
            got.extend(seqs(&b));
        }
        assert_eq!(got, all);
        q.ack(0, 20);
        assert!(!q.spilled(), "drained: back to memory");
        q.push(w(1));
        assert_eq!(q.batch(20, usize::MAX).unwrap()[0].seq, 21);
        // Spilling again continues the sequence in the journal.
        q.spill("test");
        q.push(w(2));
        assert_eq!(seqs(&q.batch(20, usize::MAX).unwrap()), vec![21, 22]);
    }

    #[test]
    fn the_memory_bound_counts_what_small_records_really_cost() {
        let mut q = SetQueue::with(QueueMode::Realtime, None, 1, 1, 1 << 20);
        let mut n = 0u64;
        while !q.full() {
            q.push(Op::Write {
                path: RelPath(b"f".to_vec()),
                offset: n,
                data: vec![1].into(),
            });
            n += 1;
        }
        // A 160-byte record in the deque plus two 32-byte allocations: about 4800
        // records fit in 1 MiB (counting their data alone, 500000 would).
        assert!(
            (3000..6000).contains(&n),
            "{n} one-byte records filled 1 MiB"
        );
        q.ack(0, n);
        assert!(
            q.bytes() < 4096 * std::mem::size_of::<Record>(),
            "the deque shrinks once drained: {} bytes",
            q.bytes()
        );
    }

    #[test]
    fn realtime_memory_bound_makes_the_pipeline_wait() {
        let mut q = SetQueue::with(QueueMode::Realtime, None, 1, 1, 500);
        for i in 0..10 {
            q.push(w(i));
        }
        assert!(q.full());
        q.ack(0, 10);
        assert!(!q.full());
    }
}
