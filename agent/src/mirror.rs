//! Mirror bookkeeping: which block comparisons ([`Op::Sum`](doppel_common::wire::Op::Sum))
//! may still need an answer, per target.
//!
//! # How the mirror stays correct while files change
//!
//! A file is mirrored with ops in its set's sequence, like any change: `CreateFile`,
//! `Truncate` to the source's size, then a layout question (a `Sum` of
//! [`LAYOUT_JOB`](doppel_common::wire::sums::LAYOUT_JOB), without blocks). The receiver
//! answers it when it applies it, so the replica is in exactly the state of the records
//! before it: a `Need` with the blocks in which the replica has no data at all (holes, or
//! past its end). The agent sends those as they are now, without checksums (nothing there
//! could match), and for the other blocks queues `Sum`s read from the source at that
//! moment ([`Work::CompareRest`]). The receiver compares each when it applies it and
//! answers `Need` with the ranges that differ. The agent then reads those ranges from the
//! source *as they are now* and sends them as ordinary writes, numbered after everything
//! captured so far. A mirror to an empty target thus reads each source byte once.
//!
//! Live changes keep flowing meanwhile and are never overwritten by older bytes: every
//! write captured before the mirror read the file is numbered before the mirror's ops
//! (or, still in the ring, after them, carrying its own bytes in capture order), and
//! mirror data is always read after the `Need` arrived, so it is never older than a write
//! numbered before it. The same holds for the `Sum`s a layout answer leads to: they are
//! read after the answer arrived and numbered after what was captured before that. A
//! block the comparison found equal is equal at the `Sum`'s place in the sequence, and
//! later writes to it arrive as records of their own.
//!
//! # Answers lost with a connection
//!
//! The receiver sends each `Need` before the `Ack` that covers its `Sum`, on the same
//! stream: an Ack up to `seq` settles every `Sum` up to `seq` for that target. A `Sum`
//! the receiver applied (and persisted) in a session that broke before its Ack may have
//! lost its answer; it is not resent, as the receiver's Welcome says it is applied. Such
//! files are compared again ([`Tracker::welcome`]). Unapplied ones are resent anyway.

use std::collections::VecDeque;

use doppel_common::event::FileId;
use doppel_common::wire::{Frame, RelPath};

/// A target's answer to a `Sum` (`Frame::Need`): these ranges of `file` differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The set's index.
    pub set: usize,
    pub job: u64,
    pub file: FileId,
    pub path: RelPath,
    pub ranges: Vec<(u64, u64)>,
    /// The replica's finer checksums of each range (`Frame::Need::fine`).
    pub fine_block: u32,
    pub fine: Vec<Vec<u64>>,
    pub missing: bool,
    pub attr: bool,
    /// An answer about a directory's entries (`Frame::Need::listing`), and whether
    /// it is an entry only the replica has (`Frame::Need::extra`).
    pub listing: bool,
    pub extra: bool,
}

impl Answer {
    /// The answer a `Frame::Need` of set `set` (its index) carries; `None` for any other
    /// frame.
    pub fn from_frame(set: usize, frame: Frame) -> Option<Answer> {
        let Frame::Need {
            job,
            file,
            path,
            ranges,
            fine_block,
            fine,
            missing,
            attr,
            listing,
            extra,
            ..
        } = frame
        else {
            return None;
        };
        Some(Answer {
            set,
            job,
            file: FileId {
                dev: file[0],
                ino: file[1],
            },
            path,
            ranges,
            fine_block,
            fine,
            missing,
            attr,
            listing,
            extra,
        })
    }
}

/// What the senders hand back to the pipeline for the mirror.
#[derive(Debug)]
pub enum Work {
    Need(Answer),
    /// Compare these files again (their answers may be lost, see [`Tracker::welcome`]).
    Resum {
        set: usize,
        files: Vec<FileId>,
    },
    /// Compare the blocks of `file` outside `sent` (which a layout answer said the
    /// replica has no data in, and which are sent whole).
    CompareRest {
        set: usize,
        file: FileId,
        sent: Vec<(u64, u64)>,
    },
}

impl Work {
    /// The set the work is about.
    pub fn set(&self) -> usize {
        match self {
            Work::Need(a) => a.set,
            Work::Resum { set, .. } | Work::CompareRest { set, .. } => *set,
        }
    }

    /// Bytes of file ranges this work may queue (0 for a re-comparison, whose data
    /// comes back as answers).
    pub fn bytes(&self) -> u64 {
        match self {
            Work::Need(a) => a.ranges.iter().map(|r| r.1).sum(),
            Work::Resum { .. } | Work::CompareRest { .. } => 0,
        }
    }
}

/// Splits a `Need` into pieces of at most `piece` bytes of ranges, so that the mirror
/// queues its data a little at a time (a queue or journal bound smaller than one file
/// must not be overrun). A fine block is never split. The file is made (`missing`) by
/// the first piece only. A layout answer becomes its data-less ranges, sent whole in
/// pieces, then a [`Work::CompareRest`] of the rest. Other work comes back as it is.
pub fn split(work: Work, piece: u64) -> Vec<Work> {
    let Work::Need(a) = work else {
        return vec![work];
    };
    if a.job == doppel_common::wire::sums::QUICK_JOB {
        return vec![Work::Need(a)]; // one re-comparison of the file, whatever the ranges
    }
    if a.job == doppel_common::wire::sums::LAYOUT_JOB {
        // Where the replica has no data: sent whole, in pieces like any answer (no fine
        // checksums: nothing there could match). Then the rest is compared.
        let rest = Work::CompareRest {
            set: a.set,
            file: a.file,
            sent: a.ranges.clone(),
        };
        let whole = Answer {
            job: 0,
            fine: Vec::new(),
            fine_block: 0,
            attr: false,
            ..a
        };
        let mut pieces = if whole.ranges.is_empty() && !whole.missing {
            Vec::new()
        } else {
            split(Work::Need(whole), piece)
        };
        pieces.push(rest);
        return pieces;
    }
    let (ranges, fine, fine_block) = (&a.ranges, &a.fine, a.fine_block);
    let has_fine = fine.len() == ranges.len() && fine_block > 0;
    let unit = if has_fine { fine_block as u64 } else { 1 };
    let piece = piece.max(unit) / unit * unit;
    // Per piece: its ranges, their fine checksums, and its bytes so far.
    type Piece = (Vec<(u64, u64)>, Vec<Vec<u64>>, u64);
    let mut pieces: Vec<Piece> = vec![(Vec::new(), Vec::new(), 0)];
    for (i, &(offset, len)) in ranges.iter().enumerate() {
        let mut done = 0;
        while done < len {
            let (r, f, bytes) = pieces.last_mut().expect("one piece at least");
            let mut take = (piece - *bytes).min(len - done);
            if take < len - done {
                take = take / unit * unit; // a fine block is never split
            }
            if take == 0 {
                pieces.push((Vec::new(), Vec::new(), 0));
                continue;
            }
            r.push((offset + done, take));
            if has_fine {
                let a = (done / unit) as usize;
                let b = (done + take).div_ceil(unit) as usize;
                f.push(fine[i][a.min(fine[i].len())..b.min(fine[i].len())].to_vec());
            }
            *bytes += take;
            done += take;
        }
    }
    let n = pieces.len();
    pieces
        .into_iter()
        .enumerate()
        .map(|(i, (ranges, fine, _))| {
            Work::Need(Answer {
                ranges,
                fine,
                path: a.path.clone(),
                missing: a.missing && i == 0,
                attr: a.attr && i + 1 == n,
                set: a.set,
                job: a.job,
                file: a.file,
                fine_block: a.fine_block,
                listing: a.listing,
                extra: a.extra,
            })
        })
        .collect()
}

/// Outstanding comparisons of every set, in sequence order, and how far each target
/// (slot of the set's queue) has acknowledged them. Every operation costs what it
/// settles or returns (or a binary search), never a walk of what is pending: a first
/// mirror keeps one comparison per file pending, and `status` asks often.
#[derive(Debug, Default)]
pub struct Tracker {
    sets: Vec<SetPending>,
    /// Bytes of files queued for comparison, and compared by every target (progress).
    pub queued_bytes: u64,
    pub compared_bytes: u64,
    /// Files queued for comparison, and compared by every target (their first piece
    /// counts for the file).
    pub queued_files: u64,
    pub compared_files: u64,
}

#[derive(Debug, Default)]
struct SetPending {
    /// By sequence number, ascending; those every slot acknowledged are gone.
    pending: VecDeque<Pending>,
    /// Per slot: every record up to here is acknowledged.
    acked: Vec<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    seq: u64,
    file: FileId,
    bytes: u64,
    first: bool,
    /// The file went with its bytes (a first mirror): nothing is to answer, and a
    /// reconnect resends its records by sequence like any others.
    whole: bool,
}

impl SetPending {
    /// Index of the first comparison after record `seq`.
    fn after(&self, seq: u64) -> usize {
        self.pending.partition_point(|p| p.seq <= seq)
    }
}

/// Most targets one set may have.
pub const MAX_TARGETS: usize = 64;

impl Tracker {
    /// `slots[s]`: how many targets set `s` has (at most [`MAX_TARGETS`]).
    pub fn new(slots: Vec<usize>) -> Self {
        assert!(slots.iter().all(|&n| n <= MAX_TARGETS));
        Tracker {
            sets: slots
                .iter()
                .map(|&n| SetPending {
                    pending: VecDeque::new(),
                    acked: vec![0; n],
                })
                .collect(),
            ..Tracker::default()
        }
    }

    /// A comparison of `bytes` of `file` was queued as record `seq` of `set`; `first`
    /// when it is the file's first piece.
    pub fn sent(&mut self, set: usize, seq: u64, file: FileId, bytes: u64, first: bool) {
        self.track(set, seq, file, bytes, first, false);
    }

    /// A file of `bytes` went whole, its last record being `seq` of `set`: it counts
    /// as mirrored (progress, state) once every target acknowledged that.
    pub fn sent_whole(&mut self, set: usize, seq: u64, file: FileId, bytes: u64) {
        self.track(set, seq, file, bytes, true, true);
    }

    fn track(&mut self, set: usize, seq: u64, file: FileId, bytes: u64, first: bool, whole: bool) {
        self.queued_bytes += bytes;
        self.queued_files += first as u64;
        let s = &mut self.sets[set];
        if s.acked.iter().all(|&a| a >= seq) {
            // No target (or every one has it already): nothing to wait for.
            self.compared_bytes += bytes;
            self.compared_files += first as u64;
            return;
        }
        let p = Pending {
            seq,
            file,
            bytes,
            first,
            whole,
        };
        // Records are queued in sequence order; anything else goes where it belongs.
        match s.pending.back() {
            Some(last) if last.seq >= seq => {
                let at = s.after(seq);
                s.pending.insert(at, p);
            }
            _ => s.pending.push_back(p),
        }
    }

    /// Target `slot` acknowledged `set` up to `seq`: its answers up to there arrived.
    pub fn acked(&mut self, set: usize, slot: usize, seq: u64) {
        let s = &mut self.sets[set];
        let Some(a) = s.acked.get_mut(slot) else {
            return;
        };
        *a = (*a).max(seq);
        let everywhere = s.acked.iter().copied().min().unwrap_or(u64::MAX);
        while s.pending.front().is_some_and(|p| p.seq <= everywhere) {
            let p = s.pending.pop_front().expect("front exists");
            self.compared_bytes += p.bytes;
            self.compared_files += p.first as u64;
        }
    }

    /// Target `slot` says it applied `set` up to `applied` (a new session): comparisons
    /// up to there that it never acknowledged may have lost their answers. Returns the
    /// files to compare again (each once), and settles those records for the slot.
    pub fn welcome(&mut self, set: usize, slot: usize, applied: u64) -> Vec<FileId> {
        let s = &self.sets[set];
        let Some(&acked) = s.acked.get(slot) else {
            return Vec::new();
        };
        let (from, to) = (s.after(acked), s.after(applied));
        let mut files: Vec<FileId> = s
            .pending
            .range(from..to.max(from))
            .filter(|p| !p.whole)
            .map(|p| p.file)
            .collect();
        self.acked(set, slot, applied);
        files.sort();
        files.dedup();
        files
    }

    /// The set starts a new sequence space (it is mirrored again from scratch).
    pub fn reset(&mut self, set: usize) {
        let s = &mut self.sets[set];
        s.pending.clear();
        s.acked.iter_mut().for_each(|a| *a = 0);
    }

    /// Comparisons of `set` that target `slot` has not acknowledged.
    pub fn pending_for(&self, set: usize, slot: usize) -> usize {
        let s = &self.sets[set];
        s.acked
            .get(slot)
            .map_or(0, |&a| s.pending.len() - s.after(a))
    }

    /// Comparisons not yet settled by every target, over all sets.
    pub fn pending(&self) -> usize {
        self.sets.iter().map(|s| s.pending.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(ino: u64) -> FileId {
        FileId { dev: 1, ino }
    }

    #[test]
    fn acks_settle_and_welcomes_return_what_may_be_unanswered() {
        let mut t = Tracker::new(vec![2]);
        t.sent(0, 3, f(1), 10, true);
        t.sent(0, 5, f(2), 10, true);
        t.sent(0, 9, f(3), 10, true);
        assert_eq!(t.pending(), 3);
        // Slot 0 acknowledges up to 5; slot 1 nothing yet.
        t.acked(0, 0, 5);
        assert_eq!(t.pending(), 3);
        // Slot 1 reconnects having applied up to 6: records 3 and 5 may have lost their
        // answers; 9 will be resent.
        assert_eq!(t.welcome(0, 1, 6), vec![f(1), f(2)]);
        assert_eq!(t.pending(), 1);
        // Slot 0 reconnects having applied everything: 9 was never acknowledged by it.
        assert_eq!(t.welcome(0, 0, 9), vec![f(3)]);
        t.acked(0, 1, 9);
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn needs_split_into_pieces_at_fine_block_boundaries() {
        let need = Work::Need(Answer {
            set: 0,
            job: 0,
            file: f(1),
            path: RelPath(b"p".to_vec()),
            ranges: vec![(0, 3000), (10_000, 1500)],
            fine_block: 1024,
            fine: vec![vec![1, 2, 3], vec![4, 5]],
            missing: true,
            attr: false,
            listing: false,
            extra: false,
        });
        let pieces: Vec<_> = split(need, 2048)
            .into_iter()
            .map(|w| match w {
                Work::Need(a) => (a.ranges, a.fine, a.missing),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(
            pieces,
            vec![
                (vec![(0, 2048)], vec![vec![1, 2]], true),
                (
                    vec![(2048, 952), (10_000, 1024)],
                    vec![vec![3], vec![4]],
                    false
                ),
                (vec![(11_024, 476)], vec![vec![5]], false),
            ]
        );
    }

    /// A first mirror keeps a comparison per file pending, one target may be away, and
    /// `status` asks for the counts often: each ack and each count costs what it
    /// settles, not the whole backlog (walking it made 200,000 acks take minutes).
    #[test]
    fn acks_and_counts_cost_what_they_settle_with_one_target_away() {
        const N: u64 = 200_000;
        let mut t = Tracker::new(vec![2]);
        let started = std::time::Instant::now();
        for seq in 1..=N {
            t.sent(0, seq, f(seq), 1, true);
        }
        for seq in 1..=N {
            // Slot 0 acknowledges record by record; slot 1 is away.
            t.acked(0, 0, seq);
            assert_eq!(t.pending_for(0, 0), (N - seq) as usize);
            assert_eq!(t.pending_for(0, 1), N as usize);
        }
        assert_eq!(t.pending(), N as usize);
        assert_eq!(t.welcome(0, 1, N / 2).len(), (N / 2) as usize);
        assert_eq!(t.pending(), (N / 2) as usize);
        assert_eq!(t.compared_files, N / 2);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn files_sent_whole_count_until_acknowledged_and_are_never_compared_again() {
        let mut t = Tracker::new(vec![1]);
        t.sent_whole(0, 4, f(1), 100);
        t.sent(0, 6, f(2), 10, true);
        assert_eq!(
            (t.pending_for(0, 0), t.queued_files, t.queued_bytes),
            (2, 2, 110)
        );
        // A reconnect after neither was acknowledged: only the comparison comes back.
        assert_eq!(t.welcome(0, 0, 6), vec![f(2)]);
        assert_eq!(
            (t.pending(), t.compared_files, t.compared_bytes),
            (0, 2, 110)
        );
    }

    #[test]
    fn a_welcome_after_every_ack_returns_nothing() {
        let mut t = Tracker::new(vec![1, 1]);
        t.sent(1, 1, f(7), 10, true);
        t.sent(1, 2, f(7), 10, true);
        t.acked(1, 0, 2);
        assert_eq!(t.pending(), 0);
        assert!(t.welcome(1, 0, 2).is_empty());
        t.sent(1, 3, f(7), 10, true);
        t.sent(1, 4, f(7), 10, true);
        // The same file twice comes back once.
        assert_eq!(t.welcome(1, 0, 4), vec![f(7)]);
        t.sent(0, 1, f(8), 10, true);
        t.reset(0);
        assert_eq!(t.pending(), 0);
    }
}
