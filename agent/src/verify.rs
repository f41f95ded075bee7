//! Verify jobs: every file of some sets is compared with each target's replica by block
//! checksums ([`Op::Sum`](doppel_common::wire::Op::Sum) with the job's id), without
//! changing anything unless the job repairs.
//!
//! The comparison runs in the set's sequence like every change, so a file being written
//! is compared with the replica at exactly the point the records before it reached:
//! replication lag shows as nothing, and only real differences are reported. The job is
//! complete once every target acknowledged its last comparison (answers precede the
//! acknowledgement that covers them, on the same stream).
//!
//! Plain bookkeeping: the daemon records the job's records as they are queued and the
//! targets' answers as they arrive, and asks for progress with the acknowledgements.

use serde::{Deserialize, Serialize};

/// One difference a target reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub target: String,
    pub set: String,
    pub path: String,
    /// Differing byte ranges `(offset, len)`.
    pub ranges: Vec<(u64, u64)>,
    /// The replica has no regular file there.
    pub missing: bool,
    /// Mode, owner or mtime differ.
    pub attr: bool,
    /// The replica has an entry at `path` that the source does not have.
    #[serde(default)]
    pub extra: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Progress {
    pub files_done: u64,
    pub files: u64,
    pub bytes_done: u64,
    pub bytes: u64,
}

/// What a job ended with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub files: u64,
    pub bytes: u64,
    pub findings: Vec<Finding>,
    pub repaired: bool,
    pub seconds: f64,
}

/// One comparison: `(seq, bytes, first op of its file)`.
type Compared = (u64, u64, bool);

#[derive(Debug)]
pub struct Job {
    pub repair: bool,
    /// Per set index: its comparisons in order.
    records: Vec<(usize, Vec<Compared>)>,
    findings: Vec<Finding>,
    /// Set once every comparison is queued: only then can the job be complete.
    sealed: bool,
    /// The targets' session counters when the job started: a reconnect may lose
    /// answers, which makes the job incomplete.
    pub sessions: Vec<u64>,
    pub started: std::time::Instant,
}

impl Job {
    pub fn new(repair: bool, sessions: Vec<u64>) -> Self {
        Job {
            repair,
            records: Vec::new(),
            findings: Vec::new(),
            sealed: false,
            sessions,
            started: std::time::Instant::now(),
        }
    }

    /// A comparison of `bytes` of a file was queued as record `seq` of `set`.
    pub fn queued(&mut self, set: usize, seq: u64, bytes: u64, first: bool) {
        match self.records.iter_mut().find(|(s, _)| *s == set) {
            Some((_, r)) => r.push((seq, bytes, first)),
            None => self.records.push((set, vec![(seq, bytes, first)])),
        }
    }

    pub fn seal(&mut self) {
        self.sealed = true;
    }

    pub fn found(&mut self, f: Finding) {
        self.findings.push(f);
    }

    /// `acked(set)`: the lowest sequence every target of `set` acknowledged.
    pub fn progress(&self, acked: impl Fn(usize) -> u64) -> Progress {
        let mut p = Progress::default();
        for (set, records) in &self.records {
            let upto = acked(*set);
            for &(seq, bytes, first) in records {
                let done = seq <= upto;
                p.bytes += bytes;
                p.files += first as u64;
                if done {
                    p.bytes_done += bytes;
                    p.files_done += first as u64;
                }
            }
        }
        p
    }

    pub fn complete(&self, acked: impl Fn(usize) -> u64) -> bool {
        self.sealed
            && self
                .records
                .iter()
                .all(|(set, r)| r.last().is_none_or(|&(seq, ..)| seq <= acked(*set)))
    }

    pub fn report(self, acked: impl Fn(usize) -> u64) -> Report {
        let p = self.progress(acked);
        let mut findings = self.findings;
        findings.sort_by(|a, b| (&a.target, &a.set, &a.path).cmp(&(&b.target, &b.set, &b.path)));
        // A file compared in several ops answers once per op: one finding per file.
        let mut merged: Vec<Finding> = Vec::new();
        for f in findings {
            match merged.last_mut() {
                Some(m) if (&m.target, &m.set, &m.path) == (&f.target, &f.set, &f.path) => {
                    m.ranges.extend(f.ranges);
                    m.missing |= f.missing;
                    m.attr |= f.attr;
                    m.extra |= f.extra;
                }
                _ => merged.push(f),
            }
        }
        Report {
            files: p.files,
            bytes: p.bytes,
            findings: merged,
            repaired: self.repair,
            seconds: self.started.elapsed().as_secs_f64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(path: &str, ranges: Vec<(u64, u64)>) -> Finding {
        Finding {
            target: "t".into(),
            set: "s".into(),
            path: path.into(),
            ranges,
            missing: false,
            attr: false,
            extra: false,
        }
    }

    #[test]
    fn completes_when_every_comparison_is_acknowledged() {
        let mut j = Job::new(false, vec![0]);
        j.queued(0, 10, 100, true);
        j.queued(0, 11, 50, false);
        j.queued(1, 3, 7, true);
        assert!(!j.complete(|_| u64::MAX), "not sealed yet");
        j.seal();
        let acked = |s: usize| if s == 0 { 10 } else { 3 };
        assert!(!j.complete(acked));
        assert_eq!(
            j.progress(acked),
            Progress {
                files_done: 2,
                files: 2,
                bytes_done: 107,
                bytes: 157
            }
        );
        assert!(j.complete(|_| 11));
        j.found(finding("b", vec![(0, 4)]));
        j.found(finding("a", vec![(8, 8)]));
        j.found(finding("b", vec![(64, 4)]));
        let r = j.report(|_| 11);
        assert_eq!(r.files, 2);
        assert_eq!(
            r.findings,
            vec![
                finding("a", vec![(8, 8)]),
                finding("b", vec![(0, 4), (64, 4)])
            ]
        );
    }
}
