//! Data events that may carry older bytes than the replica was last sent: such ranges
//! are read again from the file once the event is handled.
//!
//! Two ways it happens:
//! - The agent read the range (a re-read range, a missed range, a mapped page) after the
//!   event was captured but before it was handled: the event's bytes are older than
//!   what the read sent. Under overload the ring can hold seconds of events.
//! - Two threads wrote the same bytes: the kernel serializes them (the inode lock), but
//!   each reports its write at syscall exit, after the lock is released, so a thread
//!   preempted in between reports after a later write of another thread. Nothing in
//!   the records tells the two orders apart: any two writes of one file that overlap and
//!   were reported within [`WINDOW_NS`] of each other make the overlap be read again.
//!
//! Reading again is always right: the file then holds the bytes that won.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};

use doppel_common::event::FileId;

/// Far longer than a thread is normally preempted between its write and its report,
/// and than events of different CPUs are apart in the ring.
pub const WINDOW_NS: u64 = 50_000_000;
/// Writes remembered per file.
const WRITES_PER_FILE: usize = 8;
/// Read ranges remembered per file before they are merged into one.
const READS_PER_FILE: usize = 32;

#[derive(Debug, Default)]
struct Recent {
    /// (start, end, capture time) of recent writes.
    writes: VecDeque<(u64, u64, u64)>,
    /// (start, end, read time) of ranges the agent read.
    reads: Vec<(u64, u64, u64)>,
}

/// Recorded times, soonest to expire first, with their file.
type Expiry = BinaryHeap<Reverse<(u64, FileId)>>;

#[derive(Debug, Default)]
pub struct Overlaps {
    files: HashMap<FileId, Recent>,
    /// Latest capture time handled.
    latest: u64,
    /// Every event captured before this time has been handled (the capture found its
    /// ring empty after it): the clock that moves on when nothing is captured, so what
    /// the mirror read is forgotten without waiting for the next write.
    complete: u64,
    /// Each write's and each read's time, so that [`Overlaps::prune`] visits only what
    /// expires (its work follows the changes, not the files recorded).
    write_expiry: Expiry,
    read_expiry: Expiry,
    /// Files [`Overlaps::prune`] looked at, all told (for tests).
    visited: u64,
}

impl Overlaps {
    /// A data event about `[offset, offset + len)` of `file`, captured at `time`, is
    /// handled. Returns the ranges to read again.
    pub fn write(&mut self, file: FileId, offset: u64, len: u64, time: u64) -> Vec<(u64, u64)> {
        let end = offset.saturating_add(len);
        self.latest = self.latest.max(time);
        let recent = self.files.entry(file).or_default();
        let mut again: Vec<(u64, u64)> = Vec::new();
        let mut add = |s: u64, e: u64| {
            let r = (s.max(offset), e.min(end));
            if s < end && offset < e && !again.contains(&r) {
                again.push(r);
            }
        };
        for &(s, e, t) in &recent.writes {
            if time.abs_diff(t) < WINDOW_NS {
                add(s, e);
            }
        }
        for &(s, e, read) in &recent.reads {
            if time < read {
                add(s, e);
            }
        }
        if recent.writes.len() == WRITES_PER_FILE {
            recent.writes.pop_front();
        }
        recent.writes.push_back((offset, end, time));
        self.write_expiry.push(Reverse((time, file)));
        again
    }

    /// The agent read `[offset, offset + len)` of `file` at `time` (and sent it).
    pub fn read(&mut self, file: FileId, offset: u64, len: u64, time: u64) {
        let end = offset.saturating_add(len);
        let reads = &mut self.files.entry(file).or_default().reads;
        if reads.len() == READS_PER_FILE {
            // One range covering them all, read at the latest time: more is read again
            // later than strictly needed, never less.
            let s = reads.iter().map(|r| r.0).min().unwrap_or(offset);
            let e = reads.iter().map(|r| r.1).max().unwrap_or(end);
            let t = reads.iter().map(|r| r.2).max().unwrap_or(time);
            reads.clear();
            reads.push((s, e, t));
        }
        reads.push((offset, end, time));
        self.read_expiry.push(Reverse((time, file)));
    }

    /// Every event captured before `time` has been handled.
    pub fn complete_before(&mut self, time: u64) {
        self.complete = self.complete.max(time);
    }

    /// Forgets writes that no event still to come can be within the window of, and
    /// reads that every event still to come was captured after.
    pub fn prune(&mut self) {
        // A write at t matters to events captured within the window around t.
        let writes_before = self.latest.max(self.complete).saturating_sub(WINDOW_NS);
        // A read at t matters to events captured before t and handled after it.
        let reads_before = self.latest.saturating_sub(WINDOW_NS).max(self.complete);
        let horizons = (writes_before, reads_before);
        self.visited += expire(
            &mut self.write_expiry,
            writes_before,
            &mut self.files,
            horizons,
        );
        self.visited += expire(
            &mut self.read_expiry,
            reads_before,
            &mut self.files,
            horizons,
        );
    }
}

/// Pops the times of `expiry` before `before` and forgets what expired of their files
/// (writes before `horizons.0`, reads before `horizons.1`). Returns the times popped.
fn expire(
    expiry: &mut Expiry,
    before: u64,
    files: &mut HashMap<FileId, Recent>,
    (writes_before, reads_before): (u64, u64),
) -> u64 {
    let mut visited = 0;
    while let Some(&Reverse((t, file))) = expiry.peek() {
        if t >= before {
            break;
        }
        expiry.pop();
        visited += 1;
        if let Some(r) = files.get_mut(&file) {
            r.writes.retain(|&(_, _, t)| t >= writes_before);
            r.reads.retain(|&(_, _, t)| t >= reads_before);
            if r.writes.is_empty() && r.reads.is_empty() {
                files.remove(&file);
            }
        }
    }
    visited
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: FileId = FileId { dev: 1, ino: 2 };
    const G: FileId = FileId { dev: 1, ino: 3 };

    #[test]
    fn overlapping_writes_close_in_time_are_read_again() {
        let mut o = Overlaps::default();
        assert!(o.write(F, 0, 100, 1_000).is_empty());
        // Another file, and a disjoint range: nothing.
        assert!(o.write(G, 0, 100, 1_001).is_empty());
        assert!(o.write(F, 100, 50, 1_002).is_empty());
        // Overlaps both earlier writes of F.
        assert_eq!(o.write(F, 90, 20, 1_003), vec![(90, 100), (100, 110)]);
        // Reported before an earlier-handled one (the race itself): still caught.
        assert_eq!(o.write(F, 0, 10, 900), vec![(0, 10)]);
        // Far apart in time: ordered by the ring, nothing to do.
        assert!(o.write(F, 0, 100, 1_003 + WINDOW_NS).is_empty());
        o.prune();
        assert!(o.write(F, 0, 100, 10 * WINDOW_NS).is_empty());
    }

    #[test]
    fn events_captured_before_a_read_are_read_again() {
        let mut o = Overlaps::default();
        o.read(F, 4096, 8192, 5 * WINDOW_NS);
        // Captured after the read: current.
        assert!(o.write(F, 4096, 10, 5 * WINDOW_NS + 1).is_empty());
        // Captured long before the read (a backlog in the ring): stale.
        assert_eq!(o.write(F, 0, 5000, WINDOW_NS), vec![(4096, 5000)]);
        // Once events from well after the read are handled, it is forgotten.
        o.write(G, 0, 1, 7 * WINDOW_NS);
        o.prune();
        assert!(o.write(F, 4096, 1, WINDOW_NS).is_empty());
    }

    #[test]
    fn pruning_visits_what_expires_not_every_file_recorded() {
        let mut o = Overlaps::default();
        // The mirror reads 100,000 files while nothing is captured.
        for ino in 0..100_000 {
            o.read(FileId { dev: 1, ino }, 0, 4096, 1_000 + ino);
        }
        // Many batches go by with nothing expiring: no file is visited.
        for i in 0..1_000 {
            o.write(F, 0, 1, 2_000 + i);
            o.prune();
        }
        assert_eq!(o.visited, 0);
        // The capture's ring was found empty after all of it: everything read before
        // then is forgotten, each file once, with nothing captured meanwhile.
        o.complete_before(1_000 + 100_000 + 1);
        o.prune();
        assert_eq!(o.visited, 100_000);
        assert_eq!(o.files.len(), 1, "only F's writes are left");
        // An event captured before the reads (a backlog) would still be read again
        // until then: checked above by events_captured_before_a_read_are_read_again.
    }

    #[test]
    fn memory_is_bounded_and_merging_keeps_staleness() {
        let mut o = Overlaps::default();
        for i in 0..100 {
            o.write(F, i * 10, 10, i);
            o.read(F, i * 1000, 10, 1_000 + i);
        }
        assert_eq!(o.files[&F].writes.len(), WRITES_PER_FILE);
        assert!(o.files[&F].reads.len() <= READS_PER_FILE);
        // Every range read is still covered.
        assert_eq!(o.write(F, 0, 1, 500), vec![(0, 1)]);
        assert_eq!(o.write(F, 99_000, 5, 500), vec![(99_000, 99_005)]);
    }
}
