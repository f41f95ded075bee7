//! Hot pages of files mapped shared and writable: which pages must be read again, and
//! when a page may be forgotten. Plain state, no I/O (the resolver reads the pages).
//!
//! A store into a shared mapping leaves one trace: the page becoming dirty. Later stores
//! to the page while it stays dirty leave none. So a reported page stays hot and is read
//! on every pass (only pages whose content changed since the last read are sent) until
//! a writeback that began after the page's last report has ended: that writeback made
//! the page clean, and the next store dirties it again, which is reported. The page is
//! read once more after such a writeback and then forgotten.
//!
//! RPO for a mapping writer: a store reaches the agent at the next pass (every
//! [`PASS_INTERVAL`]) or right after the writeback that `msync(MS_SYNC)`/`fsync` start.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use doppel_common::event::FileId;

/// How often hot pages are read.
pub const PASS_INTERVAL: Duration = Duration::from_millis(500);
pub const PAGE: u64 = 4096;

#[derive(Debug, Default)]
struct Page {
    /// Capture time of the page's last report.
    reported: u64,
    /// Hash of the content last sent, if any.
    sent: Option<u64>,
    /// A writeback begun after `reported` has ended: read once more, then forget.
    retire: bool,
}

#[derive(Debug)]
struct File {
    parent: FileId,
    pages: BTreeMap<u64, Page>,
    /// Capture time of the running writeback's begin.
    writeback_began: Option<u64>,
}

/// Consecutive hot pages of one file: `[first, first + count)` in pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub first: u64,
    pub count: u64,
}

#[derive(Debug, Default)]
pub struct Mapped {
    files: HashMap<FileId, File>,
    /// Some page was retired since the last pass: a pass is due now.
    retired: bool,
}

/// Most pages one report can make hot (a large folio is at most a few MiB).
const MAX_REPORT_PAGES: u64 = 1024;
/// Longest run read at once.
const MAX_RUN_PAGES: u64 = 256;

impl Mapped {
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    fn file(&mut self, file: FileId, parent: FileId) -> &mut File {
        self.files.entry(file).or_insert_with(|| File {
            parent,
            pages: BTreeMap::new(),
            writeback_began: None,
        })
    }

    pub fn tracks(&self, file: FileId) -> bool {
        self.files.contains_key(&file)
    }

    /// `[offset, offset + len)` of `file` became dirty at `time`.
    pub fn dirty(&mut self, file: FileId, parent: FileId, offset: u64, len: u64, time: u64) {
        let f = self.file(file, parent);
        let first = offset / PAGE;
        let end = offset.saturating_add(len).div_ceil(PAGE);
        // A bogus length must not make us track the whole address space.
        for idx in first..end.min(first.saturating_add(MAX_REPORT_PAGES)) {
            let p = f.pages.entry(idx).or_default();
            p.reported = p.reported.max(time);
            p.retire = false;
        }
    }

    /// `[offset, offset + len)` of `file` was mapped and written back (see
    /// `abi::KIND_MAPPED`): pages not hot already are read at the next pass, once.
    pub fn read_once(&mut self, file: FileId, parent: FileId, offset: u64, len: u64, time: u64) {
        let f = self.file(file, parent);
        let first = offset / PAGE;
        let end = offset.saturating_add(len).div_ceil(PAGE);
        for idx in first..end {
            f.pages.entry(idx).or_insert(Page {
                reported: time,
                sent: None,
                retire: true,
            });
        }
        self.retired = true;
    }

    /// Writeback of `file` began or ended at `time`.
    pub fn writeback(&mut self, file: FileId, end: bool, time: u64) {
        let Some(f) = self.files.get_mut(&file) else {
            return;
        };
        if !end {
            f.writeback_began = Some(time);
            return;
        }
        let Some(began) = f.writeback_began.take() else {
            return; // its begin was not seen: keep everything hot
        };
        for p in f.pages.values_mut() {
            if p.reported < began {
                p.retire = true;
                self.retired = true;
            }
        }
    }

    /// Whether a pass should run before the timer's next one.
    pub fn pass_due(&self) -> bool {
        self.retired
    }

    /// Files with hot pages and their runs, for a pass.
    pub fn runs(&self) -> Vec<(FileId, FileId, Vec<Run>)> {
        let mut out = Vec::with_capacity(self.files.len());
        for (&id, f) in &self.files {
            let mut runs: Vec<Run> = Vec::new();
            for &idx in f.pages.keys() {
                match runs.last_mut() {
                    Some(r) if r.first + r.count == idx && r.count < MAX_RUN_PAGES => r.count += 1,
                    _ => runs.push(Run {
                        first: idx,
                        count: 1,
                    }),
                }
            }
            out.push((id, f.parent, runs));
        }
        out
    }

    /// Page `idx` of `file` was read with content hash `hash`: true if it changed since
    /// it was last sent (send it).
    pub fn read(&mut self, file: FileId, idx: u64, hash: u64) -> bool {
        let Some(p) = self
            .files
            .get_mut(&file)
            .and_then(|f| f.pages.get_mut(&idx))
        else {
            return false;
        };
        let changed = p.sent != Some(hash);
        p.sent = Some(hash);
        changed
    }

    /// End of a pass: retired pages (read in it) are forgotten, and so are files whose
    /// pages are all gone. (Events older than the pass that arrive after it are the
    /// resolver's to deal with: see `overlap.rs`.)
    pub fn end_pass(&mut self) {
        self.retired = false;
        self.files.retain(|_, f| {
            f.pages.retain(|_, p| !p.retire);
            !f.pages.is_empty() || f.writeback_began.is_some()
        });
    }

    /// `file` is gone (removed, or its pages cannot be read any more).
    pub fn forget(&mut self, file: FileId) {
        self.files.remove(&file);
    }

    /// Number of hot pages, for status.
    pub fn hot_pages(&self) -> usize {
        self.files.values().map(|f| f.pages.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ino: u64) -> FileId {
        FileId { dev: 1, ino }
    }

    #[test]
    fn pages_stay_hot_until_a_later_writeback_ends() {
        let mut m = Mapped::default();
        m.dirty(id(5), id(1), 0, 2 * PAGE, 10);
        m.dirty(id(5), id(1), 8 * PAGE, 1, 11);
        assert_eq!(
            m.runs(),
            vec![(
                id(5),
                id(1),
                vec![Run { first: 0, count: 2 }, Run { first: 8, count: 1 }]
            )]
        );
        // A writeback that began before page 8's report does not retire it.
        m.writeback(id(5), false, 11);
        m.dirty(id(5), id(1), 8 * PAGE, PAGE, 12);
        m.writeback(id(5), true, 13);
        assert!(m.pass_due());
        for idx in [0, 1, 8] {
            assert!(m.read(id(5), idx, 7));
        }
        m.end_pass();
        assert_eq!(m.runs()[0].2, vec![Run { first: 8, count: 1 }]);
        // Unchanged content is not sent again; changed content is.
        assert!(!m.read(id(5), 8, 7));
        assert!(m.read(id(5), 8, 9));
        // A writeback whose begin was missed retires nothing.
        m.writeback(id(5), true, 20);
        m.end_pass();
        assert_eq!(m.hot_pages(), 1);
        m.writeback(id(5), false, 21);
        m.writeback(id(5), true, 22);
        m.end_pass();
        assert!(m.is_empty());
    }

    #[test]
    fn a_mapped_range_is_read_once_unless_reported() {
        let mut m = Mapped::default();
        m.dirty(id(5), id(1), 0, PAGE, 10);
        m.read_once(id(5), id(1), 0, 3 * PAGE, 11);
        assert!(m.pass_due());
        assert_eq!(m.hot_pages(), 3);
        m.dirty(id(5), id(1), 2 * PAGE, PAGE, 12);
        m.end_pass();
        // Page 0 was hot already, page 2 was reported after: both stay.
        assert_eq!(
            m.runs()[0].2,
            vec![Run { first: 0, count: 1 }, Run { first: 2, count: 1 }]
        );
    }

    #[test]
    fn a_report_after_retirement_keeps_the_page() {
        let mut m = Mapped::default();
        m.dirty(id(5), id(1), 0, PAGE, 10);
        m.writeback(id(5), false, 11);
        m.writeback(id(5), true, 12);
        m.dirty(id(5), id(1), 0, PAGE, 13);
        m.end_pass();
        assert_eq!(m.hot_pages(), 1);
    }

    #[test]
    fn runs_are_bounded_and_lengths_sane() {
        let mut m = Mapped::default();
        m.dirty(id(5), id(1), 0, 300 * PAGE, 1);
        let runs = &m.runs()[0].2;
        assert_eq!(runs[0].count, MAX_RUN_PAGES);
        assert_eq!(
            runs[1],
            Run {
                first: 256,
                count: 44
            }
        );
        m.dirty(id(6), id(1), u64::MAX - 5, u64::MAX, 1);
        assert!(m.hot_pages() < 400);
    }
}
