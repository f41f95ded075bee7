//! Hot pages of files mapped shared and writable: which pages must be read again, and
//! when a page may be forgotten. Plain state, no I/O (the resolver reads the pages).
//!
//! A store into a shared mapping leaves one trace: the page becoming dirty. Later stores
//! to the page while it stays dirty leave none. So a reported page stays hot and is read
//! on every pass (only pages whose content changed since the last read are sent) until
//! a writeback that began after the page's last report has ended, and the page is
//! clean: the next store then dirties it again, which is reported. The page is read
//! once more after that and then forgotten. The writeback's end alone is not enough:
//! a writeback may cover only part of the file (`sync_file_range`, `msync` of a part,
//! the flusher's chunks of a few MiB), so the resolver asks the page cache whether a
//! page is clean (`pagecache.rs`) before it reads it for the last time.
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
    /// Read in the pass going on.
    read: bool,
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
    /// Whether file `id` has hot pages.
    pub fn holds(&self, id: FileId) -> bool {
        self.files.contains_key(&id)
    }

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
                read: false,
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

    /// Pages of `run` that a writeback's end marked to be forgotten after this pass.
    pub fn retiring(&self, file: FileId, run: Run) -> Vec<u64> {
        let Some(f) = self.files.get(&file) else {
            return Vec::new();
        };
        f.pages
            .range(run.first..run.first + run.count)
            .filter(|(_, p)| p.retire)
            .map(|(&idx, _)| idx)
            .collect()
    }

    /// Page `idx` of `file` is still dirty although a writeback that began after its
    /// report has ended (the writeback covered only part of the file): it stays hot.
    pub fn still_dirty(&mut self, file: FileId, idx: u64) {
        if let Some(p) = self
            .files
            .get_mut(&file)
            .and_then(|f| f.pages.get_mut(&idx))
        {
            p.retire = false;
        }
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
        p.read = true;
        changed
    }

    /// End of a pass: retired pages read in it are forgotten (those it could not read
    /// wait for the next one), and so are files whose pages are all gone. (Events older
    /// than the pass that arrive after it are the resolver's to deal with: see
    /// `overlap.rs`.)
    pub fn end_pass(&mut self) {
        self.retired = false;
        self.files.retain(|_, f| {
            f.pages.retain(|_, p| !(p.retire && p.read));
            for p in f.pages.values_mut() {
                p.read = false;
            }
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

    /// A pass as the resolver makes it: every hot page read (content unchanged), then
    /// its end.
    fn pass(m: &mut Mapped) {
        for (file, _, runs) in m.runs() {
            for run in runs {
                for idx in run.first..run.first + run.count {
                    m.read(file, idx, 0);
                }
            }
        }
        m.end_pass();
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
        pass(&mut m);
        assert_eq!(m.hot_pages(), 1);
        m.writeback(id(5), false, 21);
        m.writeback(id(5), true, 22);
        pass(&mut m);
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
        pass(&mut m);
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
        pass(&mut m);
        assert_eq!(m.hot_pages(), 1);
    }

    #[test]
    fn a_retired_page_is_forgotten_only_once_read() {
        let mut m = Mapped::default();
        m.dirty(id(5), id(1), 0, 2 * PAGE, 10);
        m.writeback(id(5), false, 11);
        m.writeback(id(5), true, 12);
        // The file could not be read in this pass (renamed meanwhile, say).
        m.end_pass();
        assert_eq!(m.hot_pages(), 2);
        pass(&mut m);
        assert!(m.is_empty());
    }

    #[test]
    fn a_page_a_partial_writeback_left_dirty_stays_hot() {
        let mut m = Mapped::default();
        m.dirty(id(5), id(1), 0, PAGE, 10);
        m.dirty(id(5), id(1), 1500 * PAGE, PAGE, 10);
        // sync_file_range of page 0 only.
        m.writeback(id(5), false, 11);
        m.writeback(id(5), true, 12);
        let run = |first| Run { first, count: 1 };
        assert_eq!(m.retiring(id(5), run(0)), vec![0]);
        assert_eq!(m.retiring(id(5), run(1500)), vec![1500]);
        // The pass finds page 1500 dirty still.
        m.still_dirty(id(5), 1500);
        pass(&mut m);
        assert_eq!(m.runs()[0].2, vec![run(1500)]);
        assert!(m.retiring(id(5), run(1500)).is_empty());
        // The writeback that cleans it retires it.
        m.writeback(id(5), false, 20);
        m.writeback(id(5), true, 21);
        pass(&mut m);
        assert!(m.is_empty());
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
