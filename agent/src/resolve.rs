//! Resolve: turns captured kernel events into replication ops on set-relative paths.
//!
//! This stage owns the [`Index`] (inode -> path), applies each set's include/exclude
//! rules, tells the kernel which directories to watch, and reads file data for events
//! that carry a range instead of bytes ("Dirty") and for files that enter a set whole
//! (initial scan, a directory created before its watch was installed, a rename into a
//! set). Reading newer bytes than an event saw is safe: a later change to the same
//! range produces its own event after this one.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, Metadata};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use doppel_common::event::{monotonic_ns, CaptureEvent, Captured, FileId, PathArg};
use doppel_common::wire::{falloc, Op, RelPath};
use tracing::{debug, warn};

use crate::attrs::{attr_of, xattrs_of};
use crate::config::{Orphans, Set};
use crate::index::{normalize, Dropped, Index, Location};
use crate::mapped::{Mapped, Run, PAGE};
use crate::marks::Marks;
use crate::overlap::Overlaps;
use crate::pacing::RescanPacing;
use crate::pagecache::{dirty_pages, write_back};

/// Largest data payload the resolver puts in one Write op when it reads a file.
pub const READ_CHUNK: usize = 1 << 20;

/// The kernel side of watching: which directories' contents are captured.
pub trait Watcher {
    /// Files directly inside `dir` are captured from now on.
    fn watch(&self, dir: FileId);
    /// `dir` is above a set root: relative path events starting there pass the filter.
    fn watch_ancestor(&self, dir: FileId);
    fn unwatch(&self, dir: FileId);
    /// The regular file `file` has several names: its writes are captured through any of
    /// them, also names outside every set.
    fn watch_linked(&self, _file: FileId) {}
    /// The regular file `file` is in a set: its writes are captured inside the
    /// filesystem (where the filesystem allows). Called before the file is read.
    fn watch_file(&self, _file: FileId) {}
}

/// How a captured change of a file's bytes stands against the file's last scan.
enum Standing {
    /// Newer than the scan (or not scanned): the change is sent as captured.
    Fresh(Location),
    /// Older than the scan, which may not have seen all of it: its range is read again.
    Reread(Location),
    /// Older than the scan, which saw it.
    Covered,
    /// The file is not in the sets (or no longer where the index says).
    Unknown,
}

/// One op for one set, in the order it must be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetOp {
    pub set: usize,
    pub op: Op,
}

pub struct Resolver<W: Watcher> {
    sets: Vec<Set>,
    index: Index,
    watcher: W,
    /// Events that could not be resolved to a path (counted, logged at debug).
    pub unresolved: u64,
    /// Ranges read again because an event may have carried older bytes.
    pub reread_ranges: u64,
    /// Entries whose attributes changed since they were last sent: data changes the
    /// mtime, entries made or removed change their directory's.
    touched: HashMap<FileId, Touched>,
    /// Directories that moved while being scanned, and since when: scanned again at
    /// their new place by [`Resolver::finish`].
    rescan: HashMap<FileId, u64>,
    /// Ranges whose file was not where the index said when they were read.
    deferred: Vec<Deferred>,
    /// Hot pages of files mapped shared and writable.
    mapped: Mapped,
    /// Recent writes, to catch two threads' writes reported in the wrong order.
    overlaps: Overlaps,
    /// Full rescans after lost records, at most one in a while.
    pacing: RescanPacing,
    /// Where [`Resolver::scan_all`] and [`Resolver::scan_set`] hand their ops as they go
    /// (see [`Resolver::set_scan_sink`]), and whether a scan is streaming now.
    scan_sink: Option<ScanSink>,
    streaming: bool,
    /// When the running scan started (Unix seconds): where its orphans are moved aside.
    orphan_batch: u64,
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Takes a scan's ops out of the vector, in order (see [`Resolver::set_scan_sink`]).
pub type ScanSink = Box<dyn FnMut(&mut Vec<SetOp>)>;

/// A streaming scan hands its ops over every this many.
const SCAN_FLUSH_OPS: usize = 32;

/// A changed range to read once the index knows where its file went.
#[derive(Debug, Clone, Copy)]
struct Deferred {
    file: FileId,
    offset: u64,
    len: u64,
    since: u64,
    /// The file was shorter than the range when it was read: the rest is read again
    /// until it is there or [`UNSEEN_PATIENCE_NS`] passed.
    short: bool,
}

/// How long the part of a changed range past the end of its file is read again. A write
/// is reported inside the filesystem just before it extends the file's size; the agent
/// can read the range in between (the writer preempted there). Past this the file is
/// taken to have been cut meanwhile (its truncate's event follows).
const UNSEEN_PATIENCE_NS: u64 = 500_000_000;

/// An entry whose attributes are due.
#[derive(Debug, Clone, Copy, Default)]
struct Touched {
    /// Its extended attributes too.
    xattrs: bool,
    /// When [`Resolver::finish`] first found it elsewhere than the index says (0: not
    /// yet). The source is ahead of the events resolved so far, e.g. the file was
    /// renamed and that event is still to come: it is kept until the index catches up.
    mismatch_since: u64,
}

/// How long a touched entry that cannot be found where the index says is kept.
const TOUCH_PATIENCE_NS: u64 = 5_000_000_000;

fn file_id(m: &Metadata) -> FileId {
    FileId {
        dev: m.dev(),
        ino: m.ino(),
    }
}

fn rel_path(rel: &Path) -> RelPath {
    RelPath(rel.as_os_str().as_bytes().to_vec())
}

impl<W: Watcher> Resolver<W> {
    /// Registers the set roots and their ancestors. Call [`Resolver::scan_all`] next.
    pub fn new(sets: Vec<Set>, watcher: W) -> std::io::Result<Self> {
        let mut index = Index::new();
        for s in &sets {
            let m = std::fs::metadata(&s.root)?;
            index.add_root(file_id(&m), s.root.clone());
            for a in s.root.ancestors().skip(1) {
                if let Ok(m) = std::fs::metadata(a) {
                    index.add_ancestor(file_id(&m), a.to_path_buf());
                    watcher.watch_ancestor(file_id(&m));
                }
            }
        }
        Ok(Resolver {
            sets,
            index,
            watcher,
            unresolved: 0,
            reread_ranges: 0,
            touched: HashMap::new(),
            rescan: HashMap::new(),
            deferred: Vec::new(),
            mapped: Mapped::default(),
            overlaps: Overlaps::default(),
            pacing: RescanPacing::default(),
            scan_sink: None,
            orphan_batch: 0,
            streaming: false,
        })
    }

    pub fn sets(&self) -> &[Set] {
        &self.sets
    }

    /// Emits the attributes of every entry touched since the last call, as they are
    /// now. Called after each batch of events, so the ops that changed an entry come
    /// first and its final times win on the replica.
    pub fn finish(&mut self, out: &mut Vec<SetOp>) {
        if self.mapped.pass_due() {
            self.mapped_pass(out);
        }
        let now = monotonic_ns();
        for d in std::mem::take(&mut self.deferred) {
            let Some(loc) = self.index.location(d.file) else {
                continue; // removed (or out of every set): nothing to send
            };
            if self.index.is_dir(d.file) {
                continue; // removed, and a directory took its inode number
            }
            if !self.sets[loc.set].rules.file(&loc.rel) {
                continue;
            }
            let abs = self.index.abs(&loc);
            let read = monotonic_ns();
            if d.short {
                // Only what the file has now: a range past its end would cut the
                // replica's file to this size again.
                match std::fs::metadata(&abs).map(|m| m.len()) {
                    Ok(size) if size > d.offset => {}
                    Ok(_) if now - d.since < UNSEEN_PATIENCE_NS => {
                        self.deferred.push(d);
                        continue;
                    }
                    _ => continue,
                }
            }
            if let Some(size) = emit_range(loc.set, &abs, &loc.rel, d.offset, d.len, d.file, out) {
                self.overlaps.read(d.file, d.offset, d.len, read);
                self.touch(Some(d.file), false);
                if now - d.since < UNSEEN_PATIENCE_NS {
                    self.defer_unseen(d.file, d.offset, d.len, size, d.since);
                }
            } else if now - d.since < TOUCH_PATIENCE_NS {
                self.deferred.push(d);
            } else if let Some(dir) = self.parent_of(&loc) {
                // The index is wrong about this name: copy its directory again.
                warn!(path = %abs.display(), "a changed file is not where the index says; copying its directory again");
                self.rescan.entry(dir).or_insert(now);
            }
        }
        let rescan: Vec<(FileId, u64)> = self.rescan.drain().collect();
        for (dir, since) in rescan {
            let Some(loc) = self.index.location(dir) else {
                continue; // removed, or moved out of every set
            };
            let abs = self.index.abs(&loc);
            match std::fs::symlink_metadata(&abs) {
                Ok(m) if file_id(&m) == dir => {
                    self.scan_dir(loc.set, dir, &abs, &loc.rel, out);
                    self.touch(Some(dir), false);
                }
                _ if now - since < TOUCH_PATIENCE_NS => {
                    self.rescan.insert(dir, since);
                }
                _ => {}
            }
        }
        self.overlaps.prune();
        let mut touched: Vec<(FileId, Touched)> = self.touched.drain().collect();
        touched.sort_by_key(|(id, _)| *id);
        for (id, mut t) in touched {
            let Some(loc) = self.index.location(id) else {
                continue; // removed, or never replicated
            };
            if loc.rel.as_os_str().is_empty() {
                continue; // a root: not replicated as an entry
            }
            let abs = self.index.abs(&loc);
            match std::fs::symlink_metadata(&abs) {
                Ok(m) if file_id(&m) == id => {
                    if self.replicated(&loc, m.is_dir()) {
                        tracing::trace!(path = %loc.rel.display(), "attributes");
                        emit_meta(loc.set, &abs, &loc.rel, &m, t.xattrs, out);
                    }
                }
                other => {
                    tracing::trace!(path = %loc.rel.display(), found = ?other.map(|m| file_id(&m)), "attributes postponed");
                    if t.mismatch_since == 0 {
                        t.mismatch_since = now;
                    }
                    if now - t.mismatch_since < TOUCH_PATIENCE_NS {
                        self.touched.insert(id, t);
                    }
                }
            }
        }
    }

    /// A data event about `[offset, offset + len)` of `file` captured at `time`: the parts
    /// that may be older than what the replica was sent are read again at
    /// [`Resolver::finish`] (see `overlap.rs`).
    fn read_overlaps(&mut self, file: FileId, offset: u64, len: u64, time: u64) {
        let since = monotonic_ns();
        for (start, end) in self.overlaps.write(file, offset, len, time) {
            self.reread_ranges += 1;
            self.deferred.push(Deferred {
                file,
                offset: start,
                len: end - start,
                since,
                short: false,
            });
        }
    }

    /// Whether files with hot mapped pages exist (then [`Resolver::mapped_pass`] is due
    /// every [`crate::mapped::PASS_INTERVAL`]).
    pub fn has_mapped(&self) -> bool {
        !self.mapped.is_empty()
    }

    /// Pages of shared mappings being re-read.
    pub fn mapped_hot_pages(&self) -> usize {
        self.mapped.hot_pages()
    }

    /// Reads every hot page of every file mapped shared and sends those whose content
    /// changed since they were last sent (see `mapped.rs`).
    pub fn mapped_pass(&mut self, out: &mut Vec<SetOp>) {
        let started = monotonic_ns();
        let mut buf = Vec::new();
        for (file, parent, runs) in self.mapped.runs() {
            let Some(loc) = self.file_location(file, Some(parent), out) else {
                self.mapped.forget(file); // gone from every set
                continue;
            };
            if !self.sets[loc.set].rules.file(&loc.rel) {
                self.mapped.forget(file);
                continue;
            }
            let abs = self.index.abs(&loc);
            let f = match File::open(&abs) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // events will say
                Err(e) => {
                    warn!(path = %abs.display(), "cannot read pages of a mapped file: {e}");
                    continue;
                }
            };
            match f.metadata() {
                Ok(m) if file_id(&m) == file => {}
                _ => continue, // renamed or replaced: the index catches up first
            }
            let path = rel_path(&loc.rel);
            let mut sent = false;
            for run in runs {
                self.keep_dirty_pages_hot(file, run, &f, &abs);
                buf.resize((run.count * PAGE) as usize, 0);
                let n = match f.read_at(&mut buf, run.first * PAGE) {
                    Ok(n) => {
                        self.overlaps
                            .read(file, run.first * PAGE, n as u64, started);
                        n
                    }
                    Err(e) => {
                        warn!(path = %abs.display(), "cannot read pages of a mapped file: {e}");
                        break;
                    }
                };
                // Changed pages, joined into one write per consecutive stretch.
                let mut pending: Option<(u64, Vec<u8>)> = None;
                for (i, page) in buf[..n].chunks(PAGE as usize).enumerate() {
                    let idx = run.first + i as u64;
                    let hash = doppel_common::wire::sums::block_sum(page);
                    // A page in a hole of the source reads as zeros: not data to send.
                    let hole = page.iter().all(|&b| b == 0) && {
                        let at = idx * PAGE;
                        next_data(&f, at, at + PAGE).0 >= at + PAGE
                    };
                    if !self.mapped.read(file, idx, hash) || hole {
                        if let Some((offset, data)) = pending.take() {
                            out.push(write_op(loc.set, &path, offset, data));
                            sent = true;
                        }
                        continue;
                    }
                    match &mut pending {
                        Some((_, data)) => data.extend_from_slice(page),
                        None => pending = Some((idx * PAGE, page.to_vec())),
                    }
                }
                if let Some((offset, data)) = pending.take() {
                    out.push(write_op(loc.set, &path, offset, data));
                    sent = true;
                }
            }
            if sent {
                self.touch(Some(file), false);
            }
        }
        self.mapped.end_pass();
    }

    /// A writeback of the file ended since the run's pages were reported, but it may
    /// have covered only part of the file (`sync_file_range`, `msync` of a part, the
    /// flusher's chunks): pages it left dirty stay hot, since a store into them would
    /// leave no trace. Asked before the pages are read, so that a page found clean
    /// reports every store after the read.
    fn keep_dirty_pages_hot(&mut self, file: FileId, run: Run, f: &File, abs: &Path) {
        let retiring = self.mapped.retiring(file, run);
        if retiring.is_empty() {
            return;
        }
        match dirty_pages(f, abs, run.first * PAGE, run.count * PAGE) {
            Some(0) | None => return,
            Some(_) => {}
        }
        for idx in retiring {
            if dirty_pages(f, abs, idx * PAGE, PAGE).is_none_or(|n| n > 0) {
                self.mapped.still_dirty(file, idx);
            }
        }
    }

    /// A range of `file` was mapped shared. Its pages that are dirty already (written by
    /// `write(2)` before) would not report stores: write them back now, so that from
    /// here on every store does, and read the range once for the stores made meanwhile.
    fn mapped_range(
        &mut self,
        file: FileId,
        parent: FileId,
        offset: u64,
        len: u64,
        time: u64,
        out: &mut Vec<SetOp>,
    ) {
        let Some(loc) = self.file_location(file, Some(parent), out) else {
            return;
        };
        if !self.sets[loc.set].rules.file(&loc.rel) {
            return;
        }
        let abs = self.index.abs(&loc);
        let Ok(f) = File::open(&abs) else {
            return; // gone already: its events follow
        };
        let size = match f.metadata() {
            Ok(m) if file_id(&m) == file => m.len(),
            _ => return,
        };
        let len = len.min(size.saturating_sub(offset));
        if len == 0 {
            return;
        }
        write_back(&f, &abs, offset, len);
        debug!(path = %abs.display(), offset, len, "mapped shared: reading the range once");
        self.mapped.read_once(file, parent, offset, len, time);
    }

    /// Emits the bytes of `file`'s range as the source has them now; if `loc` no longer
    /// names the file (renamed or replaced, with events still to come), tries again at
    /// the next [`Resolver::finish`], where the index says the file is by then.
    fn read_range(
        &mut self,
        file: FileId,
        loc: &Location,
        offset: u64,
        len: u64,
        out: &mut Vec<SetOp>,
    ) {
        // The file is gone and a directory took its inode number: nothing to read.
        if self.index.is_dir(file) {
            return;
        }
        let abs = self.index.abs(loc);
        let now = monotonic_ns();
        if let Some(size) = emit_range(loc.set, &abs, &loc.rel, offset, len, file, out) {
            self.overlaps.read(file, offset, len, now);
            self.defer_unseen(file, offset, len, size, now);
        } else {
            self.deferred.push(Deferred {
                file,
                offset,
                len,
                since: monotonic_ns(),
                short: false,
            });
        }
    }

    /// `[offset, offset + len)` of `file` was read when the file had `size` bytes: the
    /// part past them is read again shortly (see [`UNSEEN_PATIENCE_NS`]).
    fn defer_unseen(&mut self, file: FileId, offset: u64, len: u64, size: u64, since: u64) {
        let end = offset.saturating_add(len);
        if size < end && len != u64::MAX {
            let from = size.max(offset);
            self.deferred.push(Deferred {
                file,
                offset: from,
                len: end - from,
                since,
                short: true,
            });
        }
    }

    /// Whether ranges wait to be read again ([`Resolver::finish`] reads them).
    pub fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// The receiver found `ranges` of `file` different from the source's (its answer to
    /// the [`Op::Sum`]s of a mirror): sends them as the source has them now, then the
    /// file's attributes (the writes changed its times on the replica). `fine` is the
    /// replica's finer checksums of each range (block size, sums per range; see
    /// `Frame::Need`): only the fine blocks that differ are sent. With `missing` the
    /// replica has no file there at all: it is made first.
    pub fn mirror_need(
        &mut self,
        set: usize,
        file: FileId,
        ranges: &[(u64, u64)],
        fine: (u32, &[Vec<u64>]),
        missing: bool,
        out: &mut Vec<SetOp>,
    ) {
        let Some(loc) = self.index.location(file) else {
            return; // removed since: its removal was sent
        };
        if loc.set != set || !self.sets[set].rules.file(&loc.rel) {
            return; // moved to another set (copied there) or out of this one
        }
        // The answer may be older than the index: a comparison queued by an earlier agent
        // (replayed from the journal) names an inode whose number a directory may have
        // taken since. Never make a file where a directory is.
        if self.index.is_dir(file) {
            return;
        }
        if missing {
            // Made here only if the path still holds this very file; otherwise the
            // writes below make it (or wait for the index to catch up).
            let here = std::fs::symlink_metadata(self.index.abs(&loc))
                .ok()
                .filter(|m| m.is_file() && file_id(m) == file);
            if let Some(m) = here {
                out.push(SetOp {
                    set,
                    op: Op::CreateFile {
                        path: rel_path(&loc.rel),
                        mode: m.mode() & 0o7777,
                    },
                });
            }
        }
        let (fine_block, fine) = fine;
        let usable = (512..=doppel_common::wire::sums::MAX_BLOCK).contains(&fine_block)
            && fine.len() == ranges.len();
        // The file whose bytes are compared must be the one the index places there.
        let src = File::open(self.index.abs(&loc))
            .ok()
            .filter(|f| f.metadata().is_ok_and(|m| file_id(&m) == file));
        for (i, &(offset, len)) in ranges.iter().enumerate() {
            match (&src, usable && !fine[i].is_empty()) {
                (Some(f), true) => {
                    for (o, l) in differing_fine(f, offset, len, fine_block, &fine[i]) {
                        self.read_range(file, &loc, o, l, out);
                    }
                }
                _ => self.read_range(file, &loc, offset, len, out),
            }
        }
        self.touch(Some(file), false);
    }

    /// Compares `file` with the replica again (the answer to its earlier comparison may
    /// have been lost with a connection).
    pub fn resum(&mut self, set: usize, file: FileId, out: &mut Vec<SetOp>) {
        let Some(loc) = self.index.location(file) else {
            return;
        };
        if loc.set != set || !self.sets[set].rules.file(&loc.rel) {
            return;
        }
        let abs = self.index.abs(&loc);
        let block = self.sets[set].mirror_block;
        let found = std::fs::symlink_metadata(&abs)
            .ok()
            .filter(|m| file_id(m) == file && m.is_file());
        match found {
            Some(m) if emit_mirror_file(set, &abs, &loc.rel, &m, block, out) => {
                self.touch(Some(file), true);
            }
            _ => {
                if let Some(dir) = self.parent_of(&loc) {
                    self.rescan.entry(dir).or_insert_with(monotonic_ns);
                }
            }
        }
    }

    /// The rest of the replica's answer to a file's layout question
    /// ([`LAYOUT_JOB`](doppel_common::wire::sums::LAYOUT_JOB)): the blocks in `sent` had no
    /// data there and go whole (through [`Resolver::mirror_need`]); the others are
    /// compared now, with checksums read now and numbered after everything captured so
    /// far (the same ordering as a scan's; see mirror.rs).
    pub fn compare_rest(
        &mut self,
        set: usize,
        file: FileId,
        sent: &[(u64, u64)],
        out: &mut Vec<SetOp>,
    ) {
        let Some(loc) = self.index.location(file) else {
            return; // removed since: its removal was sent
        };
        if loc.set != set || !self.sets[set].rules.file(&loc.rel) || self.index.is_dir(file) {
            return;
        }
        let abs = self.index.abs(&loc);
        let found = File::open(&abs).ok().and_then(|f| {
            let m = f.metadata().ok()?;
            (m.is_file() && file_id(&m) == file).then_some((f, m))
        });
        let Some((f, m)) = found else {
            // Replaced or moved meanwhile: read the directory again once the events
            // are resolved, as a resum does.
            if let Some(dir) = self.parent_of(&loc) {
                self.rescan.entry(dir).or_insert_with(monotonic_ns);
            }
            return;
        };
        let block = self.sets[set].mirror_block;
        let size = m.len();
        let path = rel_path(&loc.rel);
        let covered = |offset: u64| {
            let end = (offset + block as u64).min(size);
            let i = sent.partition_point(|&(o, l)| o + l <= offset);
            sent.get(i)
                .is_some_and(|&(o, l)| o <= offset && end <= o + l)
        };
        block_sums(
            &f,
            &m,
            block,
            |offset| !covered(offset),
            |offset, sums| {
                out.push(SetOp {
                    set,
                    op: Op::Sum {
                        path: path.clone(),
                        job: 0,
                        file: [file.dev, file.ino],
                        size,
                        offset,
                        block,
                        sums,
                        attr: None,
                    },
                })
            },
        );
    }

    /// Copies again what `marks` says changed while records were dropped (see marks.rs):
    /// each marked entry as it is now (mirrored; a directory with its subtree), then the
    /// listing of every directory that lost entries, so that the replica drops them.
    pub fn resync_marked(&mut self, set: usize, marks: &Marks, out: &mut Vec<SetOp>) {
        let root = self.sets[set].root.clone();
        let mut prune = marks.dirs.clone();
        let mut entered: Vec<PathBuf> = Vec::new();
        // Sorted: a directory comes before what is beneath it, which its copy covers.
        for entry in &marks.entries {
            let rel = entry.as_path();
            if entered.iter().any(|d| rel.starts_with(d)) {
                continue;
            }
            let abs = root.join(rel);
            let (Some(name), Some(parent_rel)) = (rel.file_name(), rel.parent()) else {
                continue;
            };
            let Ok(m) = std::fs::symlink_metadata(&abs) else {
                // Gone: its directory's listing drops it from the replica.
                prune.insert((!parent_rel.as_os_str().is_empty()).then(|| rel_path(parent_rel)));
                continue;
            };
            let Ok(pm) = std::fs::metadata(root.join(parent_rel)) else {
                continue;
            };
            let parent = file_id(&pm);
            let known = parent_rel.as_os_str().is_empty()
                || self.index.location(parent).is_some_and(|l| l.set == set);
            if !known {
                continue; // beneath an excluded or unreplicated directory
            }
            if self.enter(set, parent, name, &abs, rel, &m, out) && m.is_dir() {
                entered.push(rel.to_path_buf());
            }
        }
        if self.sets[set].orphans != Orphans::Keep {
            for dir in prune {
                self.send_listing(set, dir, out);
            }
        }
    }

    /// A `Prune` of directory `dir` keeping what the source has there now.
    fn send_listing(&mut self, set: usize, dir: Option<RelPath>, out: &mut Vec<SetOp>) {
        let rel = dir.as_ref().map_or(Path::new(""), |d| d.as_path());
        let Some(keep) = self.listing(set, rel) else {
            return; // gone itself: its own directory's listing covers it
        };
        self.prune_to(set, dir, keep, out);
    }

    /// A `Prune` of directory `dir` keeping only `keep`.
    fn prune_to(
        &mut self,
        set: usize,
        dir: Option<RelPath>,
        keep: Vec<RelPath>,
        out: &mut Vec<SetOp>,
    ) {
        let rel = dir.as_ref().map_or(Path::new(""), |d| d.as_path());
        let known = self.index.lookup(&Location {
            set,
            rel: rel.to_path_buf(),
        });
        if let Some(id) = known {
            self.forget_pruned(id, &keep);
        }
        out.push(SetOp {
            set,
            op: self.prune_op(set, dir, keep),
        });
    }

    /// What the replica's directory `rel` of `set` should hold: the names the source has
    /// there now and the set's rules replicate, sorted. `None` if it is gone.
    fn listing(&self, set: usize, rel: &Path) -> Option<Vec<RelPath>> {
        let s = &self.sets[set];
        let entries = std::fs::read_dir(s.root.join(rel)).ok()?;
        let mut keep = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name();
            let child = rel.join(&name);
            let Ok(m) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if kept(s, &child, &m) {
                keep.push(RelPath(name.as_bytes().to_vec()));
            }
        }
        keep.sort();
        Some(keep)
    }

    /// The op that makes the replica's directory `dir` hold only `keep`, per the set's
    /// `orphans` (not called for `keep`).
    fn prune_op(&self, set: usize, dir: Option<RelPath>, keep: Vec<RelPath>) -> Op {
        match self.sets[set].orphans {
            Orphans::MoveAside => Op::PruneAside {
                dir,
                keep,
                batch: self.orphan_batch,
            },
            _ => Op::Prune { dir, keep },
        }
    }

    /// A `Prune` of directory `dir` keeping only `keep` is about to be sent: the replica
    /// drops every other name there, so the index must forget them too. Such a name is
    /// one the source no longer has, with its event not resolved yet (a rename out of
    /// the directory, say): still known, that rename would be sent as a rename of a file
    /// the replica no longer has, which the receiver takes for a resend and skips, and
    /// the file would be missing under its new name. Forgotten, its rename copies it.
    fn forget_pruned(&mut self, dir: FileId, keep: &[RelPath]) {
        let keep: std::collections::HashSet<&[u8]> = keep.iter().map(|k| &k.0[..]).collect();
        for name in self.index.names(dir) {
            if keep.contains(name.as_bytes()) {
                continue;
            }
            debug!(name = %name.to_string_lossy(), "pruned from the replica; forgotten");
            let dropped = self.index.remove(dir, &name);
            self.forget(dropped);
        }
    }

    /// Verify job `job`: every replicated regular file of `sets`, as the source has it
    /// now, compared with the replicas, and every directory's entries listed so that
    /// the replicas report what the source does not have (see verify.rs), unless the
    /// set keeps such orphans (`orphans = "keep"`). With `repair`, each directory is
    /// then made (if the replica lacks it) and such entries deleted or moved aside as
    /// the set's `orphans` says. [`Resolver::finish`] follows.
    pub fn verify(&mut self, sets: &[usize], job: u64, repair: bool, out: &mut Vec<SetOp>) {
        for &set in sets {
            let root = self.sets[set].root.clone();
            self.verify_dir(set, &root, Path::new(""), (job, repair), out);
        }
    }

    fn verify_dir(
        &mut self,
        set: usize,
        abs: &Path,
        rel: &Path,
        (job, repair): (u64, bool),
        out: &mut Vec<SetOp>,
    ) {
        let names = match sorted_names(abs) {
            Ok(names) => names,
            Err(e) => {
                warn!(path = %abs.display(), error = %e, "cannot read directory; verify: its files are not compared");
                return;
            }
        };
        let block = self.sets[set].mirror_block;
        // What the replica's directory should hold (`listing`, from this same read).
        let mut keep = Vec::new();
        for name in names {
            let (child_abs, child_rel) = (abs.join(&name), rel.join(&name));
            let Ok(m) = std::fs::symlink_metadata(&child_abs) else {
                continue;
            };
            if kept(&self.sets[set], &child_rel, &m) {
                keep.push(RelPath(name.as_bytes().to_vec()));
            }
            let rules = &self.sets[set].rules;
            if m.is_dir() && rules.dir(&child_rel) {
                self.verify_dir(set, &child_abs, &child_rel, (job, repair), out);
            } else if m.is_file() && rules.file(&child_rel) {
                let id = file_id(&m);
                emit_sums(set, &child_abs, &child_rel, id, block, Some(job), out);
            }
        }
        if self.sets[set].orphans == Orphans::Keep {
            return;
        }
        let dir = (!rel.as_os_str().is_empty()).then(|| rel_path(rel));
        out.push(SetOp {
            set,
            op: Op::List {
                dir: dir.clone(),
                keep: keep.clone(),
                job,
            },
        });
        if repair {
            let Ok(m) = std::fs::symlink_metadata(abs) else {
                return;
            };
            if let Some(path) = &dir {
                // A no-op where the replica has the directory already.
                let mode = m.mode() & 0o7777;
                let path = path.clone();
                out.push(SetOp {
                    set,
                    op: Op::Mkdir { path, mode },
                });
            }
            self.prune_to(set, dir, keep, out);
            // Pruning changes the replica's directory times: the source's go after.
            self.touch(Some(file_id(&m)), false);
        }
    }

    /// Remembers that `id`'s attributes (and, with `xattrs`, its extended attributes)
    /// must be sent at the next [`Resolver::finish`].
    fn touch(&mut self, id: Option<FileId>, xattrs: bool) {
        if let Some(id) = id {
            self.touched.entry(id).or_default().xattrs |= xattrs;
        }
    }

    /// The directory holding `loc` changed (an entry was made, removed or renamed).
    fn touch_parent(&mut self, loc: &Location) {
        let parent = self.parent_of(loc);
        self.touch(parent, false);
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Makes [`Resolver::scan_all`] and [`Resolver::scan_set`] hand their ops to `sink`
    /// as the scan goes (it must take them out of the vector, in order), so that the
    /// targets compare the first files while the scan reads the next ones, and a large
    /// tree's ops are never all in memory at once.
    pub fn set_scan_sink(&mut self, sink: ScanSink) {
        self.scan_sink = Some(sink);
    }

    /// Watches every directory of every set and mirrors every entry: the initial copy.
    pub fn scan_all(&mut self, out: &mut Vec<SetOp>) {
        self.orphan_batch = unix_seconds();
        self.streaming = self.scan_sink.is_some();
        self.rescan_all(out);
        self.streaming = false;
    }

    /// As [`Resolver::scan_all`], never streaming: also the fallback when the kernel lost
    /// events it could not even record, in the middle of resolving events.
    fn rescan_all(&mut self, out: &mut Vec<SetOp>) {
        self.index.clear_nodes();
        for set in 0..self.sets.len() {
            self.scan_root(set, out);
        }
    }

    /// Runs the full rescan owed for lost records, once pacing allows (called on a timer,
    /// as no event may come to trigger it).
    /// True if it ran.
    pub fn rescan_if_due(&mut self, out: &mut Vec<SetOp>) -> bool {
        if !self.pacing.due(std::time::Instant::now()) {
            return false;
        }
        warn!("rescanning every set for the change records the kernel lost meanwhile");
        self.paced_rescan(out);
        true
    }

    /// Losses whose rescan was deferred by pacing (each was answered later, none skipped).
    pub fn rescans_deferred(&self) -> u64 {
        self.pacing.deferred()
    }

    fn paced_rescan(&mut self, out: &mut Vec<SetOp>) {
        let started = std::time::Instant::now();
        self.rescan_all(out);
        self.pacing.done(started, std::time::Instant::now());
    }

    /// During a streaming scan, hands what `out` holds to the sink once it is enough.
    fn flush_scan(&mut self, out: &mut Vec<SetOp>) {
        if self.streaming && out.len() >= SCAN_FLUSH_OPS {
            if let Some(sink) = self.scan_sink.as_mut() {
                sink(out);
            }
        }
    }

    /// Copies one set again (new epoch, journal overflow) without touching what the
    /// index knows of the others: their nodes keep their birth times, so none of their
    /// pending events is mistaken for one a scan already covered.
    pub fn scan_set(&mut self, set: usize, out: &mut Vec<SetOp>) {
        let dropped = self.index.clear_set(set);
        self.forget(dropped);
        self.streaming = self.scan_sink.is_some();
        self.orphan_batch = unix_seconds();
        self.scan_root(set, out);
        self.streaming = false;
    }

    fn scan_root(&mut self, set: usize, out: &mut Vec<SetOp>) {
        let (root, path) = self.index.root(set);
        let path = path.to_path_buf();
        self.watcher.watch(root);
        self.scan_dir(set, root, &path, Path::new(""), out);
    }

    /// Emits the contents of directory `dir` (already watched) at `rel`, recursively.
    /// The watch is installed before the directory is read, so an entry created
    /// concurrently is either read here or captured by the kernel afterwards.
    /// Reads directory `dir` at `abs` and enters what it holds. Returns false, having
    /// emitted nothing, when `abs` no longer names `dir` by the time it is read (renamed
    /// or removed since it was found there; the event of that is still to come).
    fn scan_dir(
        &mut self,
        set: usize,
        dir: FileId,
        abs: &Path,
        rel: &Path,
        out: &mut Vec<SetOp>,
    ) -> bool {
        let names = match sorted_names(abs) {
            Ok(names) => names,
            Err(_) if std::fs::symlink_metadata(abs).map(|m| file_id(&m)).ok() != Some(dir) => {
                return false;
            }
            Err(e) => {
                warn!(path = %abs.display(), error = %e, "cannot read directory; its contents are not replicated until it changes");
                return true;
            }
        };
        let mut keep = Vec::new();
        for name in names {
            let child_abs = abs.join(&name);
            let child_rel = rel.join(&name);
            let Ok(m) = std::fs::symlink_metadata(&child_abs) else {
                continue;
            };
            if self.enter(set, dir, &name, &child_abs, &child_rel, &m, out) {
                keep.push(RelPath(name.as_bytes().to_vec()));
            }
            self.flush_scan(out);
        }
        // Whatever else the replica has here, the source no longer has (it went while
        // no agent was watching, or with records a killed agent never delivered).
        if self.sets[set].orphans != Orphans::Keep {
            self.forget_pruned(dir, &keep);
            let op = self.prune_op(
                set,
                (!rel.as_os_str().is_empty()).then(|| rel_path(rel)),
                keep,
            );
            out.push(SetOp { set, op });
        }
        // Renamed while being read: entries listed under the old path were not found,
        // and those made before the watch have no event of their own. Read it again
        // where the index will have it once the rename's event is resolved.
        if std::fs::symlink_metadata(abs).map(|m| file_id(&m)).ok() != Some(dir) {
            self.rescan.entry(dir).or_insert_with(monotonic_ns);
        }
        true
    }

    /// Something appeared at `rel` (scan, mkdir, rename into the set): watch and emit it.
    /// Returns whether it is replicated.
    #[allow(clippy::too_many_arguments)]
    fn enter(
        &mut self,
        set: usize,
        parent: FileId,
        name: &OsStr,
        abs: &Path,
        rel: &Path,
        m: &Metadata,
        out: &mut Vec<SetOp>,
    ) -> bool {
        let id = file_id(m);
        let rules = &self.sets[set].rules;
        if m.is_dir() {
            if !rules.dir(rel) {
                return false;
            }
            self.watcher.watch(id);
            // Stamped after the watch and before the read: events older than this are
            // reflected in what the scan reads; newer ones are captured.
            self.index
                .insert_born(parent, name, id, true, monotonic_ns());
            out.push(SetOp {
                set,
                op: Op::Mkdir {
                    path: rel_path(rel),
                    mode: m.mode() & 0o7777,
                },
            });
            if !self.scan_dir(set, id, abs, rel, out) {
                // It left `abs` between its stat and its read, maybe before the stamp
                // above: registered here, it would pass for a directory the source has
                // at `rel`, newer than the rename that took it away (which would then
                // leave the replica's copy behind). Not entered: the event that moved or
                // removed it copies it where it is, or drops it. If its directory moved
                // too, that one is copied again once the index has it where it went.
                debug!(path = %abs.display(), "gone before it could be read; its move or removal copies or drops it");
                out.pop();
                let dropped = self.index.remove(parent, name);
                self.forget(dropped);
                self.made_elsewhere(parent, abs);
                return false;
            }
            // After its entries: making them changed the directory's times.
            if let Ok(m) = std::fs::symlink_metadata(abs) {
                emit_meta(set, abs, rel, &m, true, out);
            }
            true
        } else {
            if !rules.file(rel) {
                return false;
            }
            let ft = m.file_type();
            use std::os::unix::fs::FileTypeExt;
            if ft.is_block_device() || ft.is_char_device() {
                debug!(path = %abs.display(), "skipping a device node (never replicated)");
                return false;
            }
            if m.is_file() {
                self.watcher.watch_file(id);
            }
            if m.nlink() > 1 {
                if m.is_file() {
                    self.watcher.watch_linked(id);
                }
                if let Some(first) = self.other_name(set, id, rel) {
                    // Another name of a file the replica has: link, do not copy.
                    self.index.insert_link(parent, name, id);
                    out.push(SetOp {
                        set,
                        op: Op::Link {
                            from: rel_path(&first),
                            to: rel_path(rel),
                        },
                    });
                    return true;
                }
            }
            // Copied to a name the index does not know as `id`, so into a new file on the
            // replica: its file under the names the index knew for `id` (none of which
            // the source has as `id` now) is another one. Known as `id`, a later rename
            // of one of them would be taken for that of a node registered after it (born
            // now) and the old name left on the replica; unknown, it is removed there
            // and the new name linked to this copy. (Copied over a known name, the
            // replica's file stays the one all its names share.)
            let here = Location {
                set,
                rel: rel.to_path_buf(),
            };
            if self.index.lookup(&here) != Some(id) {
                self.index.forget_links(id);
            }
            self.index
                .insert_born(parent, name, id, false, monotonic_ns());
            if m.is_file() {
                self.index.set_seen_len(id, m.len());
            }
            let path = rel_path(rel);
            if m.is_file() {
                if self.sets[set].mirror_quick_check {
                    emit_quick_check(set, rel, file_id(m), m, self.sets[set].mirror_block, out);
                } else if !emit_mirror_file(set, abs, rel, m, self.sets[set].mirror_block, out) {
                    // Replaced or renamed while being copied: copy the directory's
                    // entries again once the events that moved them are resolved.
                    self.rescan.entry(parent).or_insert_with(monotonic_ns);
                    self.not_sent(parent, name);
                    return false;
                }
            } else if ft.is_symlink() {
                let Ok(target) = std::fs::read_link(abs) else {
                    // Gone already: its removal or rename follows.
                    self.not_sent(parent, name);
                    return false;
                };
                out.push(SetOp {
                    set,
                    op: Op::Symlink {
                        path,
                        target: target.as_os_str().as_bytes().to_vec(),
                    },
                });
            } else {
                // Nothing of a special file is read, which would show it gone (as for the
                // others above): look. Renamed between its stat and its stamp, it would
                // pass for a newer entry than the rename, left on the replica beside the
                // copy of its new name (`extra on replica: sp/fifo3`).
                if !std::fs::symlink_metadata(abs).is_ok_and(|n| file_id(&n) == id) {
                    self.not_sent(parent, name);
                    return false;
                }
                out.push(SetOp {
                    set,
                    op: Op::Mknod {
                        path,
                        mode: m.mode(),
                        rdev: m.rdev(),
                    },
                });
            }
            // Taken now, after the content was read: a change between `m` and this
            // node's scan time has no event to replay (it counts as covered).
            let now = std::fs::symlink_metadata(abs)
                .ok()
                .filter(|n| file_id(n) == id);
            emit_meta(set, abs, rel, now.as_ref().unwrap_or(m), true, out);
            true
        }
    }

    /// [`Resolver::enter`] registered `name` in `parent` but could not send it (it went
    /// between its stat and its copy). The index must not say the replica has it there:
    /// the rename that took it away would be sent as a rename of a file the replica
    /// lacks, which the receiver takes for a resend and skips, and the file would be
    /// missing under its new name. Unknown, its rename copies it where it went.
    fn not_sent(&mut self, parent: FileId, name: &OsStr) {
        debug!(name = %name.to_string_lossy(), "gone before it was copied; forgotten");
        let dropped = self.index.remove(parent, name);
        self.forget(dropped);
    }

    /// Where the replica already has file `id` under another name than `rel` in the
    /// same set (hard links), if the source still has it there. Every name the index
    /// knows is tried, not only the first: that one may be gone from the source already
    /// (unlinked or renamed, its event still to come) while the others are not, and a
    /// copy made instead would split the replica's names of the file in two.
    /// A file found under its first name is copied there again, as before.
    fn other_name(&self, set: usize, id: FileId, rel: &Path) -> Option<PathBuf> {
        let locs = self.index.locations(id);
        if locs.first().is_some_and(|l| l.set == set && l.rel == rel) {
            return None;
        }
        locs.into_iter()
            .filter(|loc| loc.set == set && loc.rel != rel)
            .find(|loc| {
                std::fs::symlink_metadata(self.index.abs(loc)).is_ok_and(|m| file_id(&m) == id)
            })
            .map(|loc| loc.rel)
    }

    /// Absolute, normalised path of a syscall's path argument.
    fn abs_path(&self, p: &PathArg) -> Option<PathBuf> {
        let raw = Path::new(OsStr::from_bytes(&p.path));
        if p.truncated {
            return None;
        }
        if let Ok(rest) = raw
            .strip_prefix("/proc/self")
            .or_else(|_| raw.strip_prefix("/proc/thread-self"))
        {
            return proc_self_path(p.pid, rest);
        }
        if raw.is_absolute() {
            return Some(normalize(raw));
        }
        let base = p
            .base
            .and_then(|b| self.index.dir_path(b))
            .or_else(|| proc_base(p))?;
        Some(normalize(&base.join(raw)))
    }

    /// Nodes left the index: the kernel stops watching the directories among them.
    /// Files keep their marks until the kernel frees them: a node leaves the index also
    /// when its name turns out stale while the file is still in a set (its rename's
    /// event still to come), and a file unmarked then would report no more writes.
    /// Written elsewhere, a file that really left reports writes that resolve to
    /// nothing (counted as unresolved).
    fn forget(&self, dropped: Vec<Dropped>) {
        for d in dropped.into_iter().filter(|d| d.is_dir) {
            self.watcher.unwatch(d.id);
        }
    }

    /// Location and parent directory of a path argument inside a set.
    fn place(&self, p: &PathArg) -> Option<(Location, PathBuf)> {
        let mut abs = self.abs_path(p)?;
        let known_dir = |abs: &Path| {
            let dir = abs.parent().unwrap_or(Path::new("/"));
            self.index.ancestor(dir)
                || self
                    .index
                    .locate(dir)
                    .and_then(|l| self.index.lookup(&l))
                    .is_some_and(|id| self.index.is_dir(id))
        };
        if !known_dir(&abs) {
            // The path went through a symlinked directory (or is outside every set):
            // where the kernel went is the real directory.
            if let (Some(dir), Some(name)) = (abs.parent(), abs.file_name()) {
                if let Ok(real) = std::fs::canonicalize(dir) {
                    abs = real.join(name);
                }
            }
        }
        let loc = self.index.locate(&abs)?;
        if loc.rel.as_os_str().is_empty() {
            return None; // the root itself: not replicated as an entry
        }
        Some((loc, abs))
    }

    fn parent_of(&self, loc: &Location) -> Option<FileId> {
        let parent = Location {
            set: loc.set,
            rel: loc.rel.parent().unwrap_or(Path::new("")).to_path_buf(),
        };
        self.index.lookup(&parent)
    }

    /// Location of a file the kernel named by inode. If the index does not know it but
    /// knows its directory, the directory is searched for the inode and the file found is
    /// copied whole (registered as scanned now): its name was made where the capture
    /// could not see it (a directory not watched yet, an io_uring open), so the replica
    /// may lack it or hold it under an older name, and nothing but its content now can
    /// be trusted. Events older than that copy are then skipped as covered.
    fn file_location(
        &mut self,
        file: FileId,
        parent: Option<FileId>,
        out: &mut Vec<SetOp>,
    ) -> Option<Location> {
        if let Some(loc) = self.index.location(file) {
            return Some(loc);
        }
        let parent = parent?;
        let dir = self.index.dir_path(parent)?;
        let ploc = self.index.location(parent)?;
        let entries = std::fs::read_dir(&dir).ok()?;
        for e in entries.flatten() {
            use std::os::unix::fs::DirEntryExt;
            if e.ino() != file.ino {
                continue;
            }
            let name = e.file_name();
            let abs = dir.join(&name);
            let m = std::fs::symlink_metadata(&abs).ok()?;
            if file_id(&m) != file {
                return None;
            }
            let rel = ploc.rel.join(&name);
            debug!(path = %abs.display(), "copying a file whose name the capture did not see");
            self.touch(Some(parent), false);
            self.enter(ploc.set, parent, &name, &abs, &rel, &m, out);
            return self.index.location(file);
        }
        None
    }

    /// Turns one captured event into ops.
    pub fn resolve(&mut self, c: Captured, out: &mut Vec<SetOp>) {
        let Captured { time, event: ev } = c;
        if tracing::enabled!(tracing::Level::TRACE) {
            let before = out.len();
            let summary = summarize(&ev);
            self.resolve_inner(ev, time, out);
            for o in &out[before..] {
                tracing::trace!(event = %summary, op = ?summarize_op(&o.op), "resolved");
            }
            if out.len() == before {
                tracing::trace!(event = %summary, "no op");
            }
            return;
        }
        self.resolve_inner(ev, time, out)
    }

    /// Whether the node `id` was registered by a scan after `time`: an event that
    /// completed at `time` is then already reflected in it (and, if the inode number was
    /// reused, it was about another file).
    fn scanned_after(&self, id: Option<FileId>, time: u64) -> bool {
        id.is_some_and(|id| self.index.born(id) > time)
    }

    /// Location of `file` for an event at `time`, unless a later scan covers it.
    fn current(
        &mut self,
        file: FileId,
        parent: Option<FileId>,
        time: u64,
        out: &mut Vec<SetOp>,
    ) -> Option<Location> {
        let loc = self.file_location(file, parent, out)?;
        (!self.scanned_after(Some(file), time)).then_some(loc)
    }

    /// How a change of the bytes of `file` before `end`, captured at `time`, stands
    /// against the last scan of the file. A write is reported inside the filesystem
    /// before it extends the file's size: a scan after its report may have seen the file
    /// shorter than the write left it, and then the write's range is read again (its
    /// bytes, older than the scan, are not sent: applied after what the scan sent, they
    /// could undo a newer change the scan saw, a truncate say, whose own event is
    /// covered by the scan).
    fn range_standing(
        &mut self,
        file: FileId,
        parent: Option<FileId>,
        time: u64,
        end: u64,
        out: &mut Vec<SetOp>,
    ) -> Standing {
        let Some(loc) = self.file_location(file, parent, out) else {
            return Standing::Unknown;
        };
        if !self.scanned_after(Some(file), time) {
            Standing::Fresh(loc)
        } else if end > self.index.seen_len(file) {
            Standing::Reread(loc)
        } else {
            Standing::Covered
        }
    }

    fn resolve_inner(&mut self, ev: CaptureEvent, time: u64, out: &mut Vec<SetOp>) {
        match ev {
            CaptureEvent::Data {
                file,
                parent,
                offset,
                data,
            } => {
                let len = data.len() as u64;
                let end = offset.saturating_add(len);
                match self.range_standing(file, Some(parent), time, end, out) {
                    Standing::Fresh(loc) => {
                        if self.sets[loc.set].rules.file(&loc.rel) {
                            self.touch(Some(file), false);
                            push_write(out, loc.set, rel_path(&loc.rel), offset, data);
                            self.read_overlaps(file, offset, len, time);
                        }
                    }
                    Standing::Reread(loc) => {
                        if self.sets[loc.set].rules.file(&loc.rel) {
                            self.touch(Some(file), false);
                            self.read_range(file, &loc, offset, len, out);
                        }
                    }
                    Standing::Covered | Standing::Unknown => self.unresolved += 1,
                }
            }
            CaptureEvent::Dirty {
                file,
                parent,
                offset,
                len,
            } => {
                let end = offset.saturating_add(len);
                let (Standing::Fresh(loc) | Standing::Reread(loc)) =
                    self.range_standing(file, parent, time, end, out)
                else {
                    self.unresolved += 1;
                    return;
                };
                if self.sets[loc.set].rules.file(&loc.rel) {
                    self.touch(Some(file), false);
                    if let Some(parent) = parent {
                        if self.mapped.tracks(file) {
                            // Perhaps a report of dirtied mapped pages that did not fit
                            // in the ring: they must stay hot like reported ones.
                            self.mapped.dirty(file, parent, offset, len, time);
                        }
                    }
                    // Read now, so never older than the replica: only a later-handled
                    // data event captured before this read can be (overlap.rs).
                    self.read_range(file, &loc, offset, len, out);
                }
            }
            CaptureEvent::Created {
                file,
                parent: _,
                path,
                is_dir,
                mode,
            } => {
                let Some((loc, abs)) = self.place(&path) else {
                    self.unresolved += 1;
                    return;
                };
                let Some(parent) = self.parent_of(&loc) else {
                    self.unresolved += 1;
                    return;
                };
                let name = loc.rel.file_name().unwrap_or_default().to_owned();
                if self.scanned_after(self.index.lookup(&loc), time)
                    || self.scanned_after(Some(parent), time)
                {
                    // A scan after this creation already registered what is there now.
                    // The directory's own scan time counts too: a name the scan linked
                    // to a file known elsewhere (a hard link) carries the file's older
                    // time, and the file created here first may be another one, its
                    // data not to be written into the file the replica links there.
                    return;
                }
                if self.scanned_after(file, time) {
                    // A scan registered this inode later, under the name it had then. If
                    // the source still has it here as well (a hard link made meanwhile),
                    // this name is one the scan did not see: enter() links it.
                    if let (Some(id), Ok(m)) = (file, std::fs::symlink_metadata(&abs)) {
                        if file_id(&m) == id && m.nlink() > 1 && self.index.lookup(&loc) != file {
                            self.touch(Some(parent), false);
                            self.enter(loc.set, parent, &name, &abs, &loc.rel, &m, out);
                        }
                    }
                    return;
                }
                self.touch(Some(parent), false);
                if is_dir {
                    // Files may already exist in it (made before the watch): enter() scans.
                    // What is there now may be another entry, moved over it since (an
                    // exchange, its event still to come). A file is not the directory
                    // made: entered here, the index would have it under this name too
                    // (linked to its others) and its exchange would swap two names of
                    // one file, which moves nothing; its event copies what went where.
                    match std::fs::symlink_metadata(&abs) {
                        Ok(m) if m.is_dir() => {
                            self.enter(loc.set, parent, &name, &abs, &loc.rel, &m, out);
                        }
                        _ => self.made_elsewhere(parent, &abs),
                    }
                    return;
                }
                if !self.sets[loc.set].rules.file(&loc.rel) {
                    return;
                }
                let (id, mode) = match std::fs::symlink_metadata(&abs) {
                    Ok(m) if m.is_file() => (file.unwrap_or(file_id(&m)), m.mode() & 0o7777),
                    _ => match file {
                        Some(id) => (id, mode & 0o7777),
                        None => return,
                    },
                };
                self.index.insert(parent, &name, id, false);
                // With its extended attributes: the kernel gives a new file some without
                // any setxattr (the access ACL inherited from its directory's default
                // ACL, security labels). The replica's file inherits nothing reliably:
                // the directory's own xattrs are sent after this batch's creations.
                self.touch(Some(id), true);
                out.push(SetOp {
                    set: loc.set,
                    op: Op::CreateFile {
                        path: rel_path(&loc.rel),
                        mode,
                    },
                });
            }
            CaptureEvent::Truncated {
                file,
                parent,
                path,
                size,
            } => {
                let loc = match (file, &path) {
                    (Some(f), _) => self.current(f, parent, time, out),
                    (None, Some(p)) => self
                        .place(p)
                        .map(|(l, _)| l)
                        .filter(|l| !self.scanned_after(self.index.lookup(l), time)),
                    (None, None) => None,
                };
                let Some(loc) = loc else {
                    self.unresolved += 1;
                    return;
                };
                if self.sets[loc.set].rules.file(&loc.rel) {
                    let id = self.index.lookup(&loc);
                    self.touch(id, false);
                    out.push(SetOp {
                        set: loc.set,
                        op: Op::Truncate {
                            path: rel_path(&loc.rel),
                            size,
                        },
                    });
                }
            }
            CaptureEvent::Removed { path, is_dir } => {
                let Some((loc, _)) = self.place(&path) else {
                    self.unresolved += 1;
                    return;
                };
                if self.scanned_after(self.index.lookup(&loc), time) {
                    // What a scan found there is newer than what was removed.
                    return;
                }
                self.touch_parent(&loc);
                self.remove(loc, is_dir, out);
            }
            CaptureEvent::AttrChanged {
                file,
                parent,
                path,
                xattrs,
                follow,
            } => {
                let id = match (file, path) {
                    (Some(f), _) => self.current(f, parent, time, out).map(|_| f),
                    (None, Some(p)) => self.attr_target(&p, follow),
                    (None, None) => None,
                };
                match id {
                    Some(id) => self.touch(Some(id), xattrs),
                    None => self.unresolved += 1,
                }
            }
            CaptureEvent::Linked { from: _, to } | CaptureEvent::Made { path: to } => {
                // enter() sees a hard link's other name if the replica has it, and
                // copies it whole otherwise (e.g. linked from outside the set).
                let Some((loc, abs)) = self.place(&to) else {
                    self.unresolved += 1;
                    return;
                };
                if self.scanned_after(self.index.lookup(&loc), time)
                    || self.scanned_after(self.parent_of(&loc), time)
                {
                    return;
                }
                self.touch_parent(&loc);
                self.arrive(loc, &abs, out);
            }
            CaptureEvent::Fallocated {
                file,
                parent,
                mode,
                offset,
                len,
            } => {
                let Some(loc) = self.current(file, Some(parent), time, out) else {
                    self.unresolved += 1;
                    return;
                };
                if !self.sets[loc.set].rules.file(&loc.rel) {
                    return;
                }
                self.touch(Some(file), false);
                match plan_fallocate(&loc.rel, mode, offset, len) {
                    FallocPlan::Apply(op) => out.push(SetOp { set: loc.set, op }),
                    FallocPlan::Nothing => {}
                    FallocPlan::RereadFromOffset => {
                        self.read_range(file, &loc, offset, u64::MAX, out)
                    }
                }
            }
            CaptureEvent::Renamed { from, to, flags } => self.rename(&from, &to, flags, time, out),
            CaptureEvent::MapDirty {
                file,
                parent,
                offset,
                len,
            } => {
                // Read at the next pass, not now: the store that dirtied the page is
                // usually followed by more.
                self.mapped.dirty(file, parent, offset, len, time);
            }
            CaptureEvent::Writeback { file, end } => self.mapped.writeback(file, end, time),
            CaptureEvent::Mapped {
                file,
                parent,
                offset,
                len,
            } => self.mapped_range(file, parent, offset, len, time, out),
            CaptureEvent::Lost { records } => {
                if self.pacing.lost(std::time::Instant::now()) {
                    warn!(records, "the kernel lost change records it could not even remember as ranges; rescanning every set");
                    self.paced_rescan(out);
                } else {
                    warn!(records, "the kernel lost change records again, soon after a rescan; rescanning every set once more in a while (see pacing.rs)");
                }
            }
        }
    }

    fn remove(&mut self, loc: Location, is_dir: bool, out: &mut Vec<SetOp>) {
        if let Some(parent) = self.parent_of(&loc) {
            let name = loc.rel.file_name().unwrap_or_default();
            let dropped = self.index.remove(parent, name);
            self.forget(dropped);
        }
        let path = rel_path(&loc.rel);
        let op = if is_dir {
            Op::Rmdir { path }
        } else {
            Op::Remove { path }
        };
        out.push(SetOp { set: loc.set, op });
    }

    fn replicated(&self, loc: &Location, is_dir: bool) -> bool {
        let r = &self.sets[loc.set].rules;
        if is_dir {
            r.dir(&loc.rel)
        } else {
            r.file(&loc.rel)
        }
    }

    fn rename(
        &mut self,
        from: &PathArg,
        to: &PathArg,
        flags: u32,
        time: u64,
        out: &mut Vec<SetOp>,
    ) {
        const RENAME_EXCHANGE: u32 = 2;
        let src = self.place(from);
        let dst = self.place(to);
        let dst_meta = dst
            .as_ref()
            .and_then(|(_, abs)| std::fs::symlink_metadata(abs).ok());
        let src_node = src.as_ref().and_then(|(l, _)| self.index.lookup(l));
        let is_dir = match (src_node, &dst_meta) {
            (Some(id), _) => self.index.is_dir(id),
            (None, Some(m)) => m.is_dir(),
            _ => false,
        };
        let src_in = src
            .as_ref()
            .filter(|(l, _)| self.replicated(l, is_dir))
            .cloned();
        let dst_in = dst
            .as_ref()
            .filter(|(l, _)| self.replicated(l, is_dir))
            .cloned();
        // A scan that ran after this rename may already reflect either side of it:
        // `to` (or its directory) registered later means the arrival is covered; a
        // node at `from` registered later is a newer file that must stay.
        let dst_covered = dst_in.as_ref().is_some_and(|(l, _)| {
            self.scanned_after(self.index.lookup(l), time)
                || self.scanned_after(self.parent_of(l), time)
        });
        let src_newer = self.scanned_after(src_node, time);
        for (l, _) in src_in.iter().chain(dst_in.iter()) {
            self.touch_parent(l);
        }
        // Two names of one file for the index. If they were so at the rename,
        // rename(2) did nothing and both stay; but the index may know `to` as the file
        // from a later look at the source (a link resolved after the file was renamed
        // over it), and the rename was a move. On the replica, both names are that one
        // file, so a Rename op would do nothing either way.
        let dst_node = dst.as_ref().and_then(|(l, _)| self.index.lookup(l));
        if flags & RENAME_EXCHANGE == 0 && src_node.is_some() && dst_node == src_node && !src_newer
        {
            let (sl, sabs) = src.as_ref().expect("src_node is known at src");
            let id_at = |p: Option<&Path>| {
                p.and_then(|p| std::fs::symlink_metadata(p).ok())
                    .map(|m| file_id(&m))
            };
            let parent = self.parent_of(sl);
            if id_at(Some(sabs)) == src_node {
                // A no-op: `from` is still there. Taken for a move, the index would
                // forget a name the source has, and with the file's other names gone,
                // the file itself, with what was still to be read for it.
            } else if parent.is_some() && id_at(sabs.parent()) == parent {
                // A move (or `from` went since, its event still to come).
                if src_in.is_some() {
                    self.remove(sl.clone(), false, out);
                }
            } else if let Some(dir) = parent {
                // `from`'s directory moved since: which it was cannot be told here.
                // Its directory is copied again once the index has it where it went,
                // which keeps `from` if the source has it and drops it if not.
                self.rescan.entry(dir).or_insert_with(monotonic_ns);
            }
            return;
        }
        if src_newer || dst_covered || src_node.is_none() {
            if let (Some((sl, sabs)), false) = (&src_in, src_newer) {
                if flags & RENAME_EXCHANGE != 0 {
                    // `from` holds what `to` held: copy whatever is there now.
                    self.arrive(sl.clone(), sabs, out);
                } else {
                    // The replica's `from` is history the source no longer has.
                    self.remove(sl.clone(), is_dir, out);
                }
            }
            if let (Some((dl, dabs)), false) = (dst_in, dst_covered) {
                let current = dst_meta.as_ref().map(file_id);
                if current.is_none() || self.index.lookup(&dl) != current {
                    self.arrive(dl, &dabs, out);
                }
            }
            return;
        }
        match (src_in, dst_in) {
            (Some((sl, _)), Some((dl, dabs))) if sl.set == dl.set => {
                let (Some(sp), Some(dp)) = (self.parent_of(&sl), self.parent_of(&dl)) else {
                    self.remove(sl, is_dir, out);
                    self.arrive(dl, &dabs, out);
                    return;
                };
                let sname = sl.rel.file_name().unwrap_or_default().to_owned();
                let dname = dl.rel.file_name().unwrap_or_default().to_owned();
                if flags & RENAME_EXCHANGE != 0 && dst_node.is_none() {
                    // The index knows nothing at `to`, and the replica may have nothing
                    // there (an exchange would then do nothing) or something the index
                    // forgot (of either kind: a rename over it may fail). Both sides are
                    // copied where they are now instead; the receiver's creations
                    // replace what is in their way.
                    self.arrive(dl, &dabs, out);
                    if let Some((sl, sabs)) = src {
                        self.arrive(sl, &sabs, out);
                    }
                    return;
                }
                if flags & RENAME_EXCHANGE != 0 {
                    self.index.exchange((sp, &sname), (dp, &dname));
                } else {
                    let dropped = self.index.rename((sp, &sname), (dp, &dname));
                    self.forget(dropped);
                }
                out.push(SetOp {
                    set: sl.set,
                    op: Op::Rename {
                        from: rel_path(&sl.rel),
                        to: rel_path(&dl.rel),
                        flags,
                    },
                });
            }
            (src_in, dst_in) => {
                if let Some((sl, _)) = src_in {
                    self.remove(sl, is_dir, out);
                }
                if let Some((dl, dabs)) = dst_in {
                    self.arrive(dl, &dabs, out);
                }
                if flags & RENAME_EXCHANGE != 0 {
                    // The other side moved too: re-read it where it landed.
                    if let Some((sl, sabs)) = src {
                        self.arrive(sl, &sabs, out);
                    }
                }
            }
        }
    }

    /// The entry a path-based attribute call changed: the symlink itself with
    /// `follow == false`, else what it points to (if that is in a set too).
    fn attr_target(&self, p: &PathArg, follow: bool) -> Option<FileId> {
        let (loc, abs) = self.place(p)?;
        // Only a followed symlink needs a look at the source; a path gone or renamed
        // since is still known to the index as the node it named.
        if follow && std::fs::symlink_metadata(&abs).is_ok_and(|m| m.file_type().is_symlink()) {
            let real = std::fs::canonicalize(&abs).ok()?;
            let loc = self.index.locate(&real)?;
            return self.index.lookup(&loc);
        }
        self.index.lookup(&loc)
    }

    /// An entry appeared at `loc` by other means than creation (moved in): copy it whole.
    /// If it is gone from there already (moved on or removed, its event still to come),
    /// nothing can be copied, but what the index knows at `loc` is no longer there: the
    /// entry that arrived replaced it. It is forgotten and removed from the replica, so
    /// that the entry's next event (a rename from `loc`, say) finds nothing known there
    /// and copies the entry where it went, instead of sending a rename of the replaced
    /// file's name, which would put that file's bytes under the entry's names for good.
    fn arrive(&mut self, loc: Location, abs: &Path, out: &mut Vec<SetOp>) {
        let Some(parent) = self.parent_of(&loc) else {
            self.unresolved += 1;
            return;
        };
        match std::fs::symlink_metadata(abs) {
            Ok(m) => {
                let name = loc.rel.file_name().unwrap_or_default().to_owned();
                self.enter(loc.set, parent, &name, abs, &loc.rel, &m, out);
            }
            Err(_) => {
                if let Some(replaced) = self.index.lookup(&loc) {
                    debug!(path = %abs.display(), "an entry arrived over a known one and went on; the known one is forgotten");
                    let is_dir = self.index.is_dir(replaced);
                    self.remove(loc, is_dir, out);
                }
                self.made_elsewhere(parent, abs)
            }
        }
    }

    /// An entry made in directory `parent` is not at `abs`, the path its event names.
    /// If `parent` is not at its path either, it moved (or a directory above it did)
    /// and its rename is still to be resolved: the entry went along, and no later event
    /// names it, so `parent` is copied again once the index has it at its new place.
    /// Otherwise the entry itself went, and its own event follows.
    fn made_elsewhere(&mut self, parent: FileId, abs: &Path) {
        let here = abs
            .parent()
            .and_then(|p| std::fs::symlink_metadata(p).ok())
            .map(|m| file_id(&m));
        if here != Some(parent) {
            debug!(path = %abs.display(), "made in a directory that moved since; copying it again there");
            self.rescan.entry(parent).or_insert_with(monotonic_ns);
        }
    }
}

fn summarize(ev: &CaptureEvent) -> String {
    match ev {
        CaptureEvent::Data {
            file, offset, data, ..
        } => {
            format!("data ino {} off {offset} len {}", file.ino, data.len())
        }
        other => format!("{other:?}"),
    }
}

/// Appends a write of `data` at `offset`, joined to the op before it when that one
/// writes the bytes just before in the same file. A program writing a file in 4 KiB
/// pieces then costs one record, one frame entry and one `pwrite` on the replica per
/// [`READ_CHUNK`], not per piece: the result on the replica is the same, since nothing
/// lies between the two.
fn push_write(out: &mut Vec<SetOp>, set: usize, path: RelPath, offset: u64, data: Vec<u8>) {
    if let Some(SetOp {
        set: last_set,
        op:
            Op::Write {
                path: last_path,
                offset: last_offset,
                data: last_data,
            },
    }) = out.last_mut()
    {
        if *last_set == set
            && *last_path == path
            && *last_offset + last_data.len() as u64 == offset
            && last_data.len() + data.len() <= READ_CHUNK
        {
            // Back to the vector it was made from (not a copy: nothing else holds it).
            let mut joined = Vec::from(std::mem::take(last_data));
            joined.extend_from_slice(&data);
            *last_data = joined.into();
            return;
        }
    }
    out.push(SetOp {
        set,
        op: Op::Write {
            path,
            offset,
            data: data.into(),
        },
    });
}

fn write_op(set: usize, path: &RelPath, offset: u64, data: Vec<u8>) -> SetOp {
    SetOp {
        set,
        op: Op::Write {
            path: path.clone(),
            offset,
            data: data.into(),
        },
    }
}

fn summarize_op(op: &Op) -> String {
    match op {
        Op::Write { path, offset, data } => format!("write {path} off {offset} len {}", data.len()),
        other => format!("{other:?}"),
    }
}

/// A path the caller gave as `/proc/self/<rest>`: the caller's /proc, not ours. The
/// magic link (`fd/N`, `cwd`, `root`) names a file or directory; what follows it is
/// looked up from there. Racy: the descriptor may be closed (or reused) by now, so the
/// capture resolves the `fd/N` of attribute calls itself (tar's `chmod` through an
/// `O_PATH` descriptor) and this serves the remaining cases.
fn proc_self_path(pid: u32, rest: &Path) -> Option<PathBuf> {
    let mut parts = rest.components();
    let first = parts.next()?.as_os_str();
    let magic = if first == "fd" {
        Path::new("/proc")
            .join(pid.to_string())
            .join("fd")
            .join(parts.next()?.as_os_str())
    } else if first == "cwd" || first == "root" {
        Path::new("/proc").join(pid.to_string()).join(first)
    } else {
        return None;
    };
    let target = std::fs::read_link(magic).ok().filter(|t| t.is_absolute())?;
    Some(normalize(&target.join(parts.as_path())))
}

/// `/proc` fallback for a relative path whose base directory the index does not know
/// (a process whose cwd is outside every root). Racy if the process already exited.
fn proc_base(p: &PathArg) -> Option<PathBuf> {
    const AT_FDCWD: i32 = -100;
    let link = if p.dirfd == AT_FDCWD {
        format!("/proc/{}/cwd", p.pid)
    } else {
        format!("/proc/{}/fd/{}", p.pid, p.dirfd)
    };
    std::fs::read_link(link).ok()
}

/// The names in directory `abs`, sorted.
fn sorted_names(abs: &Path) -> std::io::Result<Vec<std::ffi::OsString>> {
    let mut names: Vec<_> = std::fs::read_dir(abs)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    names.sort();
    Ok(names)
}

/// Whether the replica's directory holds the entry `rel` (found with metadata `m`): the
/// set's rules replicate it, and it is no device node (never replicated).
fn kept(s: &Set, rel: &Path, m: &Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let ft = m.file_type();
    if m.is_dir() {
        s.rules.dir(rel)
    } else {
        s.rules.file(rel) && !ft.is_block_device() && !ft.is_char_device()
    }
}

/// The entry's extended attributes (with `xattrs`) and then its mode, owner and times.
/// Times go last: nothing applied after them in this batch changes the entry.
fn emit_meta(set: usize, abs: &Path, rel: &Path, m: &Metadata, xattrs: bool, out: &mut Vec<SetOp>) {
    let path = rel_path(rel);
    if xattrs {
        out.push(SetOp {
            set,
            op: Op::SetXattrs {
                path: path.clone(),
                xattrs: xattrs_of(abs),
            },
        });
    }
    out.push(SetOp {
        set,
        op: Op::SetAttr {
            path,
            attr: attr_of(m),
        },
    });
}

/// Ops that make the replica's copy of a regular file equal to the source's without
/// sending what it already has (the mirror): the file is made to exist with the
/// source's size, then compared block by block ([`Op::Sum`]); the receiver answers with
/// the ranges that differ and [`Resolver::mirror_need`] sends those. Returns false when
/// `abs` no longer names the file `m` describes (nothing is emitted then; the copy must
/// be redone where the file is now).
fn emit_mirror_file(
    set: usize,
    abs: &Path,
    rel: &Path,
    m: &Metadata,
    block: u32,
    out: &mut Vec<SetOp>,
) -> bool {
    let path = rel_path(rel);
    let mut ops = vec![SetOp {
        set,
        op: Op::CreateFile {
            path: path.clone(),
            mode: m.mode() & 0o7777,
        },
    }];
    if emit_sums(set, abs, rel, file_id(m), block, None, &mut ops).is_none() {
        return false;
    }
    out.append(&mut ops);
    true
}

/// The mirror's quick check of a file (`mirror_quick_check`): a Sum without blocks
/// that compares size, mode, owner and mtime; a difference comes back as an answer of
/// [`QUICK_JOB`](doppel_common::wire::sums::QUICK_JOB) and the file is then mirrored
/// block by block ([`Resolver::resum`]).
fn emit_quick_check(
    set: usize,
    rel: &Path,
    id: FileId,
    m: &Metadata,
    block: u32,
    out: &mut Vec<SetOp>,
) {
    out.push(SetOp {
        set,
        op: Op::Sum {
            path: rel_path(rel),
            job: doppel_common::wire::sums::QUICK_JOB,
            file: [id.dev, id.ino],
            size: m.len(),
            offset: 0,
            block,
            sums: Vec::new(),
            attr: Some(attr_of(m)),
        },
    });
}

/// Blocks per [`Op::Sum`] the agent sends: small enough that one op's comparison on the
/// receiver (64 MiB at the default block size) does not hold up the records behind it.
const SUMS_PER_OP: usize = 1024;

/// The file's block checksums as [`Op::Sum`]s. For the mirror (`verify` is `None`) a
/// `Truncate` to the file's size goes first; a verify job's comparisons change nothing
/// and also compare the attributes. Returns the size the sums were taken against, or
/// `None` if `abs` is no longer file `id`.
fn emit_sums(
    set: usize,
    abs: &Path,
    rel: &Path,
    id: FileId,
    block: u32,
    verify: Option<u64>,
    out: &mut Vec<SetOp>,
) -> Option<u64> {
    let f = File::open(abs).ok()?;
    let m = f.metadata().ok()?;
    if file_id(&m) != id {
        return None;
    }
    // Pages dirtied through a shared mapping are read as they are now, and the kernel
    // reports later stores to them (see mapped.rs).
    write_back(&f, abs, 0, 0);
    let size = m.len();
    let path = rel_path(rel);
    if verify.is_none() {
        out.push(SetOp {
            set,
            op: Op::Truncate {
                path: path.clone(),
                size,
            },
        });
        // The checksums of a hole and of written zeros are the same, so the comparison
        // cannot see a replica that has data where the source has a hole: punch the
        // source's holes first (a no-op where the replica has one too).
        for (offset, len) in holes(&f, &m) {
            punch(set, &path, offset, len, size, out);
        }
    }
    let mut attr = verify.map(|_| attr_of(&m));
    let mut emit = |offset: u64, sums: Vec<u64>| {
        out.push(SetOp {
            set,
            op: Op::Sum {
                path: path.clone(),
                // The mirror's only Sum here is its layout question (see below).
                job: verify.unwrap_or(doppel_common::wire::sums::LAYOUT_JOB),
                file: [id.dev, id.ino],
                size,
                offset,
                block,
                sums,
                attr: attr.take(),
            },
        })
    };
    // An empty file has no block; a verify still asks whether the replica has it.
    if size == 0 {
        if verify.is_some() {
            emit(0, Vec::new());
        }
        return Some(size);
    }
    if verify.is_none() {
        // The mirror first asks where the replica has no data: those blocks are sent
        // without reading them twice, and the rest is compared once the answer is here
        // (`Resolver::compare_rest`).
        emit(0, Vec::new());
        return Some(size);
    }
    block_sums(&f, &m, block, |_| true, emit);
    Some(size)
}

/// Hands the checksums of `f`'s blocks to `emit` in runs of at most [`SUMS_PER_OP`],
/// with the offset of each run; only the blocks `wanted` says (by offset), which breaks
/// runs. Holes are not read: their blocks have the checksum of zeros. A block cut short
/// (the file shrank meanwhile) has the checksum of what the file still holds there:
/// read through the mapping, padded with zeros to the end of the page the file now ends
/// in; past that page the mapping faults and the block is read, cut at the end. Either
/// way the truncate that shrank it follows in the sequence.
fn block_sums(
    f: &File,
    m: &Metadata,
    block: u32,
    wanted: impl Fn(u64) -> bool,
    mut emit: impl FnMut(u64, Vec<u64>),
) {
    use doppel_common::wire::sums::{block_sum, zero_sum};
    let size = m.len();
    let sparse = m.blocks().saturating_mul(512) < size;
    let step = block as u64;
    let full_zero = zero_sum(block as usize);
    let mut buf = vec![0u8; block as usize];
    let mut mapped = doppel_mapread::Reader::new(std::os::fd::AsFd::as_fd(f), size);
    let mut sums = Vec::new();
    let (mut first, mut pos) = (0u64, 0u64);
    let mut data = (0u64, 0u64);
    while pos < size {
        let len = step.min(size - pos);
        if !wanted(pos) {
            if !sums.is_empty() {
                emit(first, std::mem::take(&mut sums));
            }
            pos += len;
            first = pos;
            continue;
        }
        if sparse && pos >= data.1 {
            data = next_data(f, pos, size);
        }
        let sum = if sparse && data.0 >= pos + len {
            if len == step {
                full_zero
            } else {
                zero_sum(len as usize)
            }
        } else {
            // Hashed where the page cache holds it; read (and copied) only if the file
            // cannot be mapped or shrank meanwhile, which the short read then shows.
            mapped
                .with(pos, len as usize, block_sum)
                .unwrap_or_else(|_| {
                    let n = read_full(f, &mut buf[..len as usize], pos);
                    block_sum(&buf[..n])
                })
        };
        sums.push(sum);
        pos += len;
        if sums.len() == SUMS_PER_OP || (pos >= size && !sums.is_empty()) {
            emit(first, std::mem::take(&mut sums));
            first = pos;
        }
    }
}

/// The parts of `[offset, offset + len)` of `f` whose blocks of `fine_block` bytes have
/// other checksums than `theirs` (the replica's), merged into ranges. A block the file
/// no longer has in full differs.
fn differing_fine(
    f: &File,
    offset: u64,
    len: u64,
    fine_block: u32,
    theirs: &[u64],
) -> Vec<(u64, u64)> {
    use doppel_common::wire::sums::block_sum;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut buf = vec![0u8; fine_block as usize];
    let end = offset.saturating_add(len);
    let mut pos = offset;
    for i in 0.. {
        if pos >= end {
            break;
        }
        let n = (fine_block as u64).min(end - pos);
        let got = read_full(f, &mut buf[..n as usize], pos);
        let same = got as u64 == n && theirs.get(i) == Some(&block_sum(&buf[..got]));
        if !same {
            match out.last_mut() {
                Some(last) if last.0 + last.1 == pos => last.1 += n,
                _ => out.push((pos, n)),
            }
        }
        pos += n;
    }
    out
}

/// Reads up to `buf.len()` bytes at `pos`; fewer only at the end of the file (or on an
/// error, which the caller's next event or comparison corrects).
fn read_full(f: &File, buf: &mut [u8], pos: u64) -> usize {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], pos + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    done
}

/// What a fallocate(2) on the source needs on the replica. Modes that only allocate,
/// punch or zero travel as they are; the ones that shift the file's contents (collapse,
/// insert range) or are unknown here need the bytes from the offset on, and the new size.
enum FallocPlan {
    Apply(Op),
    Nothing,
    RereadFromOffset,
}

fn plan_fallocate(rel: &Path, mode: u32, offset: u64, len: u64) -> FallocPlan {
    use doppel_common::wire::falloc::{KEEP_SIZE, REPLICATED, UNSHARE_RANGE};
    if mode & !REPLICATED == 0 {
        FallocPlan::Apply(Op::Fallocate {
            path: rel_path(rel),
            mode,
            offset,
            len,
        })
    } else if mode & !(KEEP_SIZE | UNSHARE_RANGE) == 0 {
        FallocPlan::Nothing // unsharing copy-on-write extents changes no byte
    } else {
        FallocPlan::RereadFromOffset
    }
}

/// Emits ops that make `len` bytes at `offset` of the replica's file equal to the
/// source's (to its end if `len` is `u64::MAX`). Holes stay holes: a hole of the source
/// becomes a punched hole on the replica, and data is read only where the source has
/// some. A range that
/// reaches the end of the file also sets the replica's size: a trailing hole has no
/// byte to write. Returns the size the range was read against, or `None` when `abs` no
/// longer names file `id` (nothing is emitted then).
#[allow(clippy::too_many_arguments)]
fn emit_range(
    set: usize,
    abs: &Path,
    rel: &Path,
    offset: u64,
    len: u64,
    id: FileId,
    out: &mut Vec<SetOp>,
) -> Option<u64> {
    // The path must still name the file: if it was renamed away or replaced meanwhile
    // (its events are still to come), reading here would send another file's bytes.
    let f = File::open(abs).ok()?;
    let m = f.metadata().ok()?;
    if file_id(&m) != id {
        return None;
    }
    let size = m.len();
    let sparse = may_have_holes(&f, &m);
    let path = rel_path(rel);
    let end = offset.saturating_add(len).min(size);
    let mut pos = offset;
    while pos < end {
        let (data, hole) = if sparse {
            next_data(&f, pos, end)
        } else {
            (pos, end)
        };
        if data > pos {
            punch(set, &path, pos, data - pos, size, out);
        }
        pos = data;
        while pos < hole {
            let want = ((hole - pos).min(READ_CHUNK as u64)) as usize;
            // Read straight into the op's buffer, uninitialised: no zeroing, no copy
            // (this is the mirror's and every re-read's data path).
            let mut data = Vec::with_capacity(want);
            let n = match rustix::io::pread(&f, rustix::buffer::spare_capacity(&mut data), pos) {
                // Shrank meanwhile: the truncate that did it follows.
                Ok(0) => return Some(size),
                Ok(n) => n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    warn!(path = %abs.display(), error = %e, "cannot read changed range");
                    return Some(size);
                }
            };
            out.push(write_op(set, &path, pos, data));
            pos += n as u64;
        }
    }
    // A hole running to the end already ended with this truncate (see `punch`).
    let cut_at_size = matches!(out.last(), Some(SetOp { op: Op::Truncate { path: p, size: s }, .. }) if *p == path && *s == size);
    if offset.saturating_add(len) >= size && !cut_at_size {
        out.push(SetOp {
            set,
            op: Op::Truncate { path, size },
        });
    }
    Some(size)
}

/// The ops that make `[offset, offset + len)` of the replica's file a hole, its size
/// `size` unchanged.
///
/// A hole that runs to the end of the file is made by cutting the file at its start
/// and extending it again, not by a punch: a punch cannot free a block it only partly
/// covers, and ext4 counts the block holding the end of file as partly covered even
/// then, so it zeroes that block and keeps it as data. (Two truncates to absolute sizes
/// also stay right when a receiver applies them again after a crash.)
fn punch(set: usize, path: &RelPath, offset: u64, len: u64, size: u64, out: &mut Vec<SetOp>) {
    if offset < size && offset.saturating_add(len) >= size {
        for size in [offset, size] {
            out.push(SetOp {
                set,
                op: Op::Truncate {
                    path: path.clone(),
                    size,
                },
            });
        }
        return;
    }
    out.push(SetOp {
        set,
        op: Op::Fallocate {
            path: path.clone(),
            mode: falloc::PUNCH_HOLE | falloc::KEEP_SIZE,
            offset,
            len,
        },
    });
}

/// Whether `f` may have holes, so that its extents are worth asking for (SEEK_DATA).
/// Asking is not free on tmpfs: SEEK_HOLE walks the page cache to the next hole, which
/// for a file without one is its end (quadratic for a file appended in chunks). But
/// tmpfs counts exactly the pages it holds, so there a file with as many blocks as
/// bytes has none. Other filesystems count more than data in `st_blocks` (ext4 counts
/// its extent-tree and xattr blocks), so a file with a hole can show as many blocks as
/// bytes: always ask there.
fn may_have_holes(f: &File, m: &Metadata) -> bool {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    m.blocks().saturating_mul(512) < m.len()
        || rustix::fs::fstatfs(f).map_or(true, |s| s.f_type as u64 != TMPFS_MAGIC)
}

/// The holes of `f` as (offset, len), in order.
fn holes(f: &File, m: &Metadata) -> Vec<(u64, u64)> {
    let size = m.len();
    let mut out = Vec::new();
    if !may_have_holes(f, m) {
        return out;
    }
    let mut pos = 0;
    while pos < size {
        let (data, hole) = next_data(f, pos, size);
        if data > pos {
            out.push((pos, data - pos));
        }
        if hole <= pos {
            break;
        }
        pos = hole;
    }
    out
}

/// The next data extent at or after `pos`, clipped to `end`: (start, end). A
/// filesystem without SEEK_DATA reports everything as data.
fn next_data(f: &File, pos: u64, end: u64) -> (u64, u64) {
    use rustix::fs::{seek, SeekFrom};
    let data = match seek(f, SeekFrom::Data(pos)) {
        Ok(d) => d.min(end),
        Err(rustix::io::Errno::NXIO) => return (end, end), // only a hole up to EOF
        Err(_) => return (pos, end),
    };
    let hole = match seek(f, SeekFrom::Hole(data)) {
        // A hole right at `data` means the file changed between the two calls: read
        // on to the end rather than loop (the change has an event of its own).
        Ok(h) if h > data => h.min(end),
        _ => end,
    };
    (data, hole)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::Rules;
    use std::cell::RefCell;
    use std::collections::HashSet;

    mod scenarios;

    /// The watched directories, what to do when one is watched (a test's way to
    /// change the source between two steps of the resolver), and the marked files.
    #[derive(Default)]
    #[allow(clippy::type_complexity)]
    struct FakeWatch(
        RefCell<HashSet<FileId>>,
        RefCell<Option<Box<dyn FnMut(FileId)>>>,
        /// Files marked in the kernel's inode bitmap.
        RefCell<HashSet<FileId>>,
    );
    impl Watcher for &FakeWatch {
        fn watch(&self, d: FileId) {
            self.0.borrow_mut().insert(d);
            if let Some(hook) = self.1.borrow_mut().as_mut() {
                hook(d);
            }
        }
        fn watch_ancestor(&self, _: FileId) {}
        fn unwatch(&self, d: FileId) {
            self.0.borrow_mut().remove(&d);
        }
        fn watch_file(&self, f: FileId) {
            self.2.borrow_mut().insert(f);
        }
    }

    /// (offset, bytes) of the Write ops in `out`.
    fn writes_of(out: &[SetOp]) -> Vec<(u64, Vec<u8>)> {
        out.iter()
            .filter_map(|o| match &o.op {
                Op::Write { offset, data, .. } => Some((*offset, data.to_vec())),
                _ => None,
            })
            .collect()
    }

    fn now(event: CaptureEvent) -> Captured {
        at(monotonic_ns(), event)
    }

    fn at(time: u64, event: CaptureEvent) -> Captured {
        Captured { time, event }
    }

    fn id_of(p: &Path) -> FileId {
        file_id(&std::fs::symlink_metadata(p).unwrap())
    }

    /// Writes `data` to a new file at `path` and resolves its creation and its data, as
    /// captured: returns the file.
    fn written(
        r: &mut Resolver<&FakeWatch>,
        path: &Path,
        data: &[u8],
        out: &mut Vec<SetOp>,
    ) -> FileId {
        std::fs::write(path, data).unwrap();
        let f = id_of(path);
        r.resolve(
            now(CaptureEvent::Created {
                file: Some(f),
                parent: None,
                path: arg(path),
                is_dir: false,
                mode: 0o644,
            }),
            out,
        );
        r.resolve(
            now(CaptureEvent::Data {
                file: f,
                parent: id_of(path.parent().unwrap()),
                offset: 0,
                data: data.to_vec(),
            }),
            out,
        );
        f
    }

    fn arg(p: &Path) -> PathArg {
        PathArg {
            base: None,
            pid: 0,
            dirfd: -100,
            path: p.as_os_str().as_bytes().to_vec(),
            truncated: false,
        }
    }

    fn setup<'a>(dir: &Path, watch: &'a FakeWatch) -> Resolver<&'a FakeWatch> {
        let set = Set {
            name: "s".into(),
            root: dir.canonicalize().unwrap(),
            rules: Rules::new(&["**".into()], &["**/*.tmp".into()]).unwrap(),
            targets: vec![0],
            queue: crate::queue::QueueMode::Realtime,
            mirror_block: 4096,
            orphans: Orphans::Delete,
            mirror_quick_check: false,
        };
        Resolver::new(vec![set], watch).unwrap()
    }

    /// [`setup`], with the initial scan done and its ops dropped.
    fn scanned<'a>(dir: &Path, watch: &'a FakeWatch) -> Resolver<&'a FakeWatch> {
        let mut r = setup(dir, watch);
        r.scan_all(&mut Vec::new());
        r
    }

    #[test]
    fn a_range_is_never_read_from_the_file_that_replaced_it() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().canonicalize().unwrap();
        let w = FakeWatch::default();
        let mut r = setup(&root, &w);
        let mut out = Vec::new();
        std::fs::write(root.join("p"), b"xxxx").unwrap();
        std::fs::write(root.join("r"), b"yyyy").unwrap();
        r.scan_all(&mut out);
        out.clear();
        let x = id_of(&root.join("p"));
        // x changes, moves to q, and y takes its old name, all before the agent
        // resolves the change.
        std::fs::write(root.join("p"), b"XXXX").unwrap();
        std::fs::rename(root.join("p"), root.join("q")).unwrap();
        std::fs::rename(root.join("r"), root.join("p")).unwrap();
        let dirty = CaptureEvent::Dirty {
            file: x,
            parent: None,
            offset: 0,
            len: 4,
        };
        r.resolve(now(dirty), &mut out);
        assert!(
            out.iter().all(|o| !matches!(o.op, Op::Write { .. })),
            "read y's bytes for x: {out:?}"
        );
        for (from, to) in [("p", "q"), ("r", "p")] {
            r.resolve(
                now(CaptureEvent::Renamed {
                    from: arg(&root.join(from)),
                    to: arg(&root.join(to)),
                    flags: 0,
                }),
                &mut out,
            );
        }
        out.clear();
        r.finish(&mut out);
        let writes: Vec<_> = out
            .iter()
            .filter_map(|o| match &o.op {
                Op::Write { path, data, .. } => Some((path.clone(), data.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            writes,
            vec![(RelPath(b"q".to_vec()), bytes::Bytes::from_static(b"XXXX"))]
        );
    }

    /// Answers the mirror's comparisons in `ops` as a receiver with an empty (all-hole)
    /// replica would, and returns what the resolver sends for them.
    fn answer<W: Watcher>(r: &mut Resolver<W>, ops: &[SetOp]) -> Vec<SetOp> {
        use doppel_common::wire::sums::zero_sum;
        let mut out = Vec::new();
        for o in ops {
            let Op::Sum {
                job,
                file,
                size,
                offset,
                block,
                sums,
                ..
            } = &o.op
            else {
                continue;
            };
            if *job == doppel_common::wire::sums::LAYOUT_JOB {
                // No data anywhere: all of it is sent, nothing is left to compare.
                let id = FileId {
                    dev: file[0],
                    ino: file[1],
                };
                let all = [(*offset, size - offset)];
                r.mirror_need(o.set, id, &all, (0, &[]), false, &mut out);
                let mut rest = Vec::new();
                r.compare_rest(o.set, id, &all, &mut rest);
                assert!(rest.is_empty(), "nothing left to compare: {rest:?}");
                continue;
            }
            let mut ranges = Vec::new();
            for (i, &sum) in sums.iter().enumerate() {
                let start = offset + i as u64 * *block as u64;
                let len = (*block as u64).min(size - start);
                if sum != zero_sum(len as usize) {
                    ranges.push((start, len));
                }
            }
            let id = FileId {
                dev: file[0],
                ino: file[1],
            };
            r.mirror_need(o.set, id, &ranges, (0, &[]), false, &mut out);
        }
        r.finish(&mut out);
        out
    }

    #[test]
    fn block_sums_of_a_large_file_come_in_order_whatever_the_threads() {
        use doppel_common::wire::sums::block_sum;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let data: Vec<u8> = (0..(9 << 20) + 123u32)
            .map(|i| (i * 31 % 253) as u8)
            .collect();
        std::fs::write(&p, &data).unwrap();
        let f = File::open(&p).unwrap();
        let mut runs = Vec::new();
        block_sums(
            &f,
            &f.metadata().unwrap(),
            4096,
            |_| true,
            |off, sums| runs.push((off, sums)),
        );
        let want: Vec<u64> = data.chunks(4096).map(block_sum).collect();
        let mut at = 0;
        for (off, sums) in &runs {
            assert_eq!(*off, at as u64 * 4096);
            assert!(sums.len() <= SUMS_PER_OP);
            assert_eq!(sums[..], want[at..at + sums.len()]);
            at += sums.len();
        }
        assert_eq!(at, want.len());
    }

    /// A fifo renamed between the stat that found it and its registration must not be
    /// entered under its old name: nothing would take that name off the replica.
    #[test]
    fn a_special_file_gone_since_its_stat_is_not_entered() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().canonicalize().unwrap();
        let w = FakeWatch::default();
        let mut r = scanned(&root, &w);
        let mut out = Vec::new();
        let fifo = root.join("fifo3");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let stale = std::fs::symlink_metadata(&fifo).unwrap();
        std::fs::rename(&fifo, root.join("fifo3-renamed")).unwrap();
        let entered = r.enter(
            0,
            id_of(&root),
            OsStr::new("fifo3"),
            &fifo,
            Path::new("fifo3"),
            &stale,
            &mut out,
        );
        assert!(!entered);
        let sent: Vec<String> = out.iter().map(|o| summarize_op(&o.op)).collect();
        assert!(sent.is_empty(), "{sent:?}");
        let here = Location {
            set: 0,
            rel: "fifo3".into(),
        };
        assert_eq!(r.index.lookup(&here), None);
    }

    /// Blocks are hashed through a mapping: a file cut short after its stat faults
    /// (SIGBUS) past its new end. The read is spoiled, not the agent, and each block has
    /// the checksum of what the file still holds there.
    #[test]
    fn a_file_cut_short_while_hashed_has_the_sums_of_what_it_still_holds() {
        use doppel_common::wire::sums::block_sum;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let data: Vec<u8> = (0..512 * 4096u32).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(&p, &data).unwrap();
        let f = File::open(&p).unwrap();
        let stale = f.metadata().unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(10 * 4096 + 5)
            .unwrap();
        let before = doppel_mapread::spoiled_reads();
        let mut sums = Vec::new();
        block_sums(&f, &stale, 4096, |_| true, |_, s| sums.extend(s));
        let mut want: Vec<u64> = data[..10 * 4096].chunks(4096).map(block_sum).collect();
        // The page the file now ends in is still mapped: zeros follow its end there.
        let mut last = data[10 * 4096..10 * 4096 + 5].to_vec();
        last.resize(4096, 0);
        want.push(block_sum(&last));
        // Past it the mapping faults and the blocks are read: nothing is there.
        want.resize(512, block_sum(&[]));
        assert_eq!(sums, want);
        assert!(doppel_mapread::spoiled_reads() > before);
    }

    /// A file renamed between the scan's stat and its copy was not sent: its rename must
    /// not be sent as a rename of a file the replica lacks (which the receiver takes for
    /// a resend and skips), but copy the file where it went.
    #[test]
    fn a_file_renamed_while_being_entered_is_copied_where_it_went() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().canonicalize().unwrap();
        let w = FakeWatch::default();
        let mut r = scanned(&root, &w);
        let mut out = Vec::new();
        std::fs::write(root.join("a"), b"data").unwrap();
        let m = std::fs::symlink_metadata(root.join("a")).unwrap();
        let (rid, _) = r.index.root(0);
        std::fs::rename(root.join("a"), root.join("b")).unwrap();
        // The listing's stat saw `a`; the copy finds it gone.
        let entered = r.enter(
            0,
            rid,
            OsStr::new("a"),
            &root.join("a"),
            Path::new("a"),
            &m,
            &mut out,
        );
        assert!(!entered, "nothing was sent for a: {out:?}");
        assert!(out.is_empty(), "{out:?}");
        r.resolve(
            now(CaptureEvent::Renamed {
                from: arg(&root.join("a")),
                to: arg(&root.join("b")),
                flags: 0,
            }),
            &mut out,
        );
        assert!(
            !out.iter().any(|o| matches!(o.op, Op::Rename { .. })),
            "the replica has no a to rename: {out:?}"
        );
        assert!(
            out.iter()
                .any(|o| matches!(&o.op, Op::CreateFile { path, .. } if path.0 == b"b")),
            "b is copied: {out:?}"
        );
    }

    /// A directory copied again prunes the replica to what the source has now; a file
    /// that left it meanwhile (its rename not yet resolved) is gone from the replica, so
    /// the rename must copy it where it went, not rename what the replica lacks.
    #[test]
    fn a_file_pruned_by_a_rescan_is_copied_where_it_went() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("d")).unwrap();
        std::fs::write(root.join("d/f"), b"data").unwrap();
        let w = FakeWatch::default();
        let mut r = scanned(&root, &w);
        let mut out = Vec::new();
        let dir = id_of(&root.join("d"));
        std::fs::rename(root.join("d/f"), root.join("g")).unwrap();
        let renamed = now(CaptureEvent::Renamed {
            from: arg(&root.join("d/f")),
            to: arg(&root.join("g")),
            flags: 0,
        });
        // Copied again before the rename's event is resolved.
        r.rescan.insert(dir, monotonic_ns());
        r.finish(&mut out);
        assert!(
            out.iter()
                .any(|o| matches!(&o.op, Op::Prune { keep, .. } if keep.is_empty())),
            "{out:?}"
        );
        out.clear();
        r.resolve(renamed, &mut out);
        assert!(
            !out.iter().any(|o| matches!(o.op, Op::Rename { .. })),
            "the replica has no d/f to rename: {out:?}"
        );
        assert!(
            out.iter()
                .any(|o| matches!(&o.op, Op::CreateFile { path, .. } if path.0 == b"g")),
            "g is copied: {out:?}"
        );
    }

    #[test]
    fn a_created_file_carries_the_extended_attributes_it_was_born_with() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().canonicalize().unwrap();
        let w = FakeWatch::default();
        let mut r = scanned(&root, &w);
        let mut out = Vec::new();
        let f = root.join("f");
        std::fs::write(&f, b"x").unwrap();
        // Stands for what the kernel sets at creation without a setxattr call (an ACL
        // inherited from the directory's default ACL): no attribute event follows.
        rustix::fs::lsetxattr(&f, "user.born", b"yes", rustix::fs::XattrFlags::empty()).unwrap();
        r.resolve(
            now(CaptureEvent::Created {
                file: Some(id_of(&f)),
                parent: Some(id_of(&root)),
                path: arg(&f),
                is_dir: false,
                mode: 0o644,
            }),
            &mut out,
        );
        r.finish(&mut out);
        let ops: Vec<&Op> = out.iter().map(|o| &o.op).collect();
        let create = ops
            .iter()
            .position(|o| matches!(o, Op::CreateFile { path, .. } if path.0 == b"f"));
        let xattrs = ops.iter().position(|o| {
            matches!(o, Op::SetXattrs { path, xattrs } if path.0 == b"f"
                && xattrs.iter().any(|x| x.name == b"user.born" && x.value == b"yes"))
        });
        assert!(
            matches!((create, xattrs), (Some(c), Some(x)) if c < x),
            "{ops:?}"
        );
    }

    /// A directory made inside one that moved before the mkdir's event was resolved is
    /// not at the path the event names: it is copied once the move is resolved, with
    /// what was made in it meanwhile.
    #[test]
    fn a_directory_made_in_one_that_moved_since_is_copied() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("a")).unwrap();
        let w = FakeWatch::default();
        let mut r = scanned(&root, &w);
        let mut out = Vec::new();
        std::fs::create_dir(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f"), b"data").unwrap();
        let f = id_of(&root.join("a/b/f"));
        let b = id_of(&root.join("a/b"));
        let events = [
            now(CaptureEvent::Created {
                file: None,
                parent: None,
                path: arg(&root.join("a/b")),
                is_dir: true,
                mode: 0o755,
            }),
            now(CaptureEvent::Created {
                file: Some(f),
                parent: Some(b),
                path: arg(&root.join("a/b/f")),
                is_dir: false,
                mode: 0o644,
            }),
            now(CaptureEvent::Renamed {
                from: arg(&root.join("a")),
                to: arg(&root.join("c")),
                flags: 0,
            }),
        ];
        // The source is ahead: `a` is `c` before any of these is resolved.
        std::fs::rename(root.join("a"), root.join("c")).unwrap();
        for e in events {
            r.resolve(e, &mut out);
        }
        r.finish(&mut out);
        assert!(
            out.iter()
                .any(|o| matches!(&o.op, Op::Mkdir { path, .. } if path.0 == b"c/b")),
            "c/b is made: {out:?}"
        );
        assert!(
            out.iter()
                .any(|o| matches!(&o.op, Op::Sum { path, .. } if path.0 == b"c/b/f")),
            "c/b/f is copied: {out:?}"
        );
    }

    #[test]
    fn an_answer_naming_what_is_now_a_directory_makes_no_file() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("dir")).unwrap();
        let w = FakeWatch::default();
        let mut r = scanned(&root, &w);
        let mut out = Vec::new();
        // An answer from before a restart whose inode number the directory took since.
        let dir = id_of(&root.join("dir"));
        r.mirror_need(0, dir, &[(0, 1 << 20)], (0, &[]), true, &mut out);
        r.finish(&mut out);
        assert!(out.is_empty(), "nothing is sent for the directory: {out:?}");
    }

    #[test]
    fn only_fine_blocks_that_differ_are_sent() {
        use doppel_common::wire::sums::block_sum;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let mut theirs: Vec<u64> = data[4096..].chunks(1024).map(block_sum).collect();
        theirs[2] ^= 1; // the replica differs in [6144, 7168)
        theirs[3] ^= 1; // and [7168, 8192)
        theirs.pop(); // and has no sum for the tail [9216, 10000)
        let f = File::open(&p).unwrap();
        assert_eq!(
            differing_fine(&f, 4096, 10_000 - 4096, 1024, &theirs),
            vec![(6144, 2048), (9216, 784)]
        );
    }

    #[test]
    fn scan_emits_tree_and_keeps_holes() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        let f = File::create(d.path().join("sub/f")).unwrap();
        f.write_all_at(b"hello", (READ_CHUNK * 2) as u64).unwrap();
        std::fs::write(d.path().join("x.tmp"), b"skip").unwrap();
        let w = FakeWatch::default();
        let mut r = setup(d.path(), &w);
        let mut out = Vec::new();
        r.scan_all(&mut out);
        let ops: Vec<_> = out.iter().map(|o| &o.op).collect();
        assert!(matches!(ops[0], Op::Mkdir { path, .. } if path.0 == b"sub"));
        let sent = answer(&mut r, &out);
        let writes: Vec<_> = sent
            .iter()
            .filter(|o| matches!(o.op, Op::Write { .. }))
            .collect();
        assert_eq!(writes.len(), 1, "the hole is not sent: {sent:?}");
        assert!(ops.iter().any(
            |o| matches!(o, Op::Truncate { size, .. } if *size == (READ_CHUNK * 2 + 5) as u64)
        ));
        // Each scanned directory ends with a Prune keeping exactly what was sent.
        assert_eq!(
            *ops[ops.len() - 1],
            Op::Prune {
                dir: None,
                keep: vec![RelPath(b"sub".to_vec())]
            }
        );
        assert!(ops.contains(&&Op::Prune {
            dir: Some(RelPath(b"sub".to_vec())),
            keep: vec![RelPath(b"f".to_vec())]
        }));
        assert!(!ops
            .iter()
            .any(|o| o.paths().any(|p| p.0.ends_with(b".tmp"))));
        assert!(w.0.borrow().contains(&id_of(&d.path().join("sub"))));
    }

    #[test]
    fn a_hole_to_the_end_of_file_is_made_by_truncates_not_a_punch() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("f");
        let f = File::create(&path).unwrap();
        f.write_all_at(&[7; 4096], 0).unwrap();
        f.write_all_at(&[1; 100], 8192).unwrap();
        f.set_len(6814 + 8192).unwrap(); // data, hole, data, hole to the end
        let id = id_of(&path);
        let mut out = Vec::new();
        emit_range(0, &path, Path::new("f"), 0, 6814 + 8192, id, &mut out).unwrap();
        let ops: Vec<String> = out
            .iter()
            .map(|o| match &o.op {
                Op::Write { offset, data, .. } => format!("write {offset}+{}", data.len()),
                Op::Fallocate { offset, len, .. } => format!("punch {offset}+{len}"),
                Op::Truncate { size, .. } => format!("truncate {size}"),
                op => format!("{op:?}"),
            })
            .collect();
        // ext4 would keep the block holding end of file as zeroed data after a punch.
        // (Data is read as the filesystem's blocks hold it: 4 KiB here, on tmpfs and
        // on ext4 alike.)
        assert_eq!(
            ops,
            [
                "write 0+4096",
                "punch 4096+4096",
                "write 8192+4096",
                "truncate 12288",
                "truncate 15006"
            ]
        );
    }

    #[test]
    fn adjacent_writes_to_a_file_become_one_op() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().canonicalize().unwrap();
        std::fs::write(root.join("f"), b"").unwrap();
        std::fs::write(root.join("g"), b"").unwrap();
        let w = FakeWatch::default();
        let mut r = scanned(&root, &w);
        let mut out = Vec::new();
        let (f, g, dir) = (id_of(&root.join("f")), id_of(&root.join("g")), id_of(&root));
        let data = |file, offset: u64, bytes: &[u8]| {
            now(CaptureEvent::Data {
                file,
                parent: dir,
                offset,
                data: bytes.to_vec(),
            })
        };
        for ev in [
            data(f, 0, b"ab"),
            data(f, 2, b"cd"), // joins the one before
            data(f, 10, b"x"), // not adjacent
            data(g, 11, b"y"), // adjacent offset, other file
            data(f, 11, b"z"), // adjacent to f's last write, but g's lies between
        ] {
            r.resolve(ev, &mut out);
        }
        let writes: Vec<(&[u8], u64, &[u8])> = out
            .iter()
            .filter_map(|o| match &o.op {
                Op::Write { path, offset, data } => Some((&path.0[..], *offset, &data[..])),
                _ => None,
            })
            .collect();
        assert_eq!(
            writes,
            [
                (&b"f"[..], 0, &b"abcd"[..]),
                (b"f", 10, b"x"),
                (b"g", 11, b"y"),
                (b"f", 11, b"z")
            ]
        );
    }

    /// A write reported inside the filesystem before it extended the file, stamped
    /// before a scan that saw the file shorter: its range is read again (the file's
    /// bytes now), not sent as captured and not dropped as covered. Within what the scan
    /// saw, it is covered.
    #[test]
    fn an_older_write_past_what_the_scan_saw_is_read_again() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().canonicalize().unwrap();
        std::fs::write(root.join("f"), b"0123").unwrap();
        let before = monotonic_ns();
        let w = FakeWatch::default();
        let mut r = scanned(&root, &w);
        let f = id_of(&root.join("f"));
        let dir = id_of(&root);
        // The file grew after the scan read it; the write was stamped before the scan.
        std::fs::write(root.join("f"), b"0123456789").unwrap();
        let mut out = Vec::new();
        r.resolve(
            at(
                before,
                CaptureEvent::Data {
                    file: f,
                    parent: dir,
                    offset: 4,
                    data: b"stale!".to_vec(),
                },
            ),
            &mut out,
        );
        let writes = writes_of(&out);
        assert_eq!(writes, vec![(4, b"456789".to_vec())]);
        out.clear();
        r.resolve(
            at(
                before,
                CaptureEvent::Data {
                    file: f,
                    parent: dir,
                    offset: 0,
                    data: b"old".to_vec(),
                },
            ),
            &mut out,
        );
        assert!(
            !out.iter().any(|o| matches!(o.op, Op::Write { .. })),
            "{out:?}"
        );
    }

    /// A range reported changed before the write extended the file (the writer was
    /// preempted between the report and the size update): read as far as the file goes,
    /// and the rest again once the file has it.
    #[test]
    fn a_range_past_the_end_is_read_again_once_the_file_has_it() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().canonicalize().unwrap();
        std::fs::write(root.join("f"), b"0123").unwrap();
        let w = FakeWatch::default();
        let mut r = scanned(&root, &w);
        let f = id_of(&root.join("f"));
        let mut out = Vec::new();
        r.resolve(
            now(CaptureEvent::Dirty {
                file: f,
                parent: Some(id_of(&root)),
                offset: 4,
                len: 6,
            }),
            &mut out,
        );
        std::fs::write(root.join("f"), b"0123456789").unwrap();
        out.clear();
        r.finish(&mut out);
        let writes = writes_of(&out);
        assert_eq!(writes, vec![(4, b"456789".to_vec())]);
        assert!(!r.has_deferred());
    }

    /// A file is marked in the kernel when it is entered, before it is read, and stays
    /// marked when it is renamed (also when a stale name of it leaves the index).
    #[test]
    fn files_are_marked_when_entered_and_stay_marked() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("a")).unwrap();
        for f in ["a/stay", "a/other"] {
            std::fs::write(root.join(f), b"x").unwrap();
        }
        let w = FakeWatch::default();
        let mut r = scanned(&root, &w);
        let [stay, other] = ["a/stay", "a/other"].map(|f| id_of(&root.join(f)));
        assert_eq!(*w.2.borrow(), HashSet::from([stay, other]));
        let mut out = Vec::new();
        std::fs::rename(root.join("a/stay"), root.join("a/kept")).unwrap();
        r.resolve(
            now(CaptureEvent::Renamed {
                from: arg(&root.join("a/stay")),
                to: arg(&root.join("a/kept")),
                flags: 0,
            }),
            &mut out,
        );
        std::fs::write(root.join("a/new"), b"y").unwrap();
        let new = id_of(&root.join("a/new"));
        r.resolve(
            now(CaptureEvent::Made {
                path: arg(&root.join("a/new")),
            }),
            &mut out,
        );
        assert_eq!(*w.2.borrow(), HashSet::from([stay, other, new]));
    }

    #[test]
    fn data_renames_and_moves_out() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = d.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("a")).unwrap();
        let w = FakeWatch::default();
        let mut r = scanned(&root, &w);
        let mut out = Vec::new();
        std::fs::write(root.join("a/f"), b"x").unwrap();
        let f = id_of(&root.join("a/f"));
        let a = id_of(&root.join("a"));
        // A write to a file the index has not seen is found by searching its directory,
        // and the file is copied whole as it is now: the write, older, is covered.
        r.resolve(
            now(CaptureEvent::Data {
                file: f,
                parent: a,
                offset: 3,
                data: b"abc".to_vec(),
            }),
            &mut out,
        );
        let sent = answer(&mut r, &out);
        let ops: Vec<Op> = out.drain(..).chain(sent).map(|o| o.op).collect();
        assert!(ops
            .iter()
            .any(|o| matches!(o, Op::CreateFile { path, .. } if path.0 == b"a/f")));
        assert!(ops.contains(&Op::Write {
            path: RelPath(b"a/f".to_vec()),
            offset: 0,
            data: bytes::Bytes::from_static(b"x")
        }));
        assert!(!ops.iter().any(|o| matches!(o, Op::Write { offset: 3, .. })));
        std::fs::rename(root.join("a"), root.join("b")).unwrap();
        r.resolve(
            now(CaptureEvent::Renamed {
                from: arg(&root.join("a")),
                to: arg(&root.join("b")),
                flags: 0,
            }),
            &mut out,
        );
        assert!(
            matches!(&out.pop().unwrap().op, Op::Rename { from, to, .. } if from.0 == b"a" && to.0 == b"b")
        );
        r.resolve(
            now(CaptureEvent::Data {
                file: f,
                parent: a,
                offset: 0,
                data: b"z".to_vec(),
            }),
            &mut out,
        );
        assert!(matches!(&out.pop().unwrap().op, Op::Write { path, .. } if path.0 == b"b/f"));
        let out_path = outside.path().canonicalize().unwrap().join("f");
        std::fs::rename(root.join("b/f"), &out_path).unwrap();
        r.resolve(
            now(CaptureEvent::Renamed {
                from: arg(&root.join("b/f")),
                to: arg(&out_path),
                flags: 0,
            }),
            &mut out,
        );
        assert_eq!(
            out.pop().unwrap().op,
            Op::Remove {
                path: RelPath(b"b/f".to_vec())
            }
        );
        std::fs::rename(&out_path, root.join("back")).unwrap();
        r.resolve(
            now(CaptureEvent::Renamed {
                from: arg(&out_path),
                to: arg(&root.join("back")),
                flags: 0,
            }),
            &mut out,
        );
        let sent = answer(&mut r, &out);
        assert!(sent.iter().any(|o| matches!(&o.op, Op::Write { path, data, .. } if path.0 == b"back" && data[..] == b"x"[..])), "{out:?} {sent:?}");
    }

    #[test]
    fn events_older_than_a_directory_scan_do_not_resurrect_old_names() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("a")).unwrap();
        std::fs::write(root.join("a/f"), b"old").unwrap();
        let w = FakeWatch::default();
        let mut r = scanned(&root, &w);
        let mut out = Vec::new();
        let f = id_of(&root.join("a/f"));
        // The writer makes a directory and moves the file into it with new contents
        // before the agent has processed the mkdir (so the dir was not watched yet).
        std::fs::create_dir(root.join("n")).unwrap();
        std::fs::write(root.join("a/f"), b"new contents").unwrap();
        std::fs::rename(root.join("a/f"), root.join("n/g")).unwrap();
        let old = monotonic_ns();
        let mkdir = CaptureEvent::Created {
            file: None,
            parent: None,
            path: arg(&root.join("n")),
            is_dir: true,
            mode: 0o755,
        };
        r.resolve(now(mkdir), &mut out);
        let sent = answer(&mut r, &out);
        assert!(sent.iter().any(|o| matches!(&o.op, Op::Write { path, data, .. } if path.0 == b"n/g" && data[..] == b"new contents"[..])), "{out:?}");
        out.clear();
        // Older events, captured in "a" (watched) before the scan, now arrive.
        r.resolve(
            at(
                old,
                CaptureEvent::Created {
                    file: Some(f),
                    parent: None,
                    path: arg(&root.join("a/f")),
                    is_dir: false,
                    mode: 0o644,
                },
            ),
            &mut out,
        );
        assert!(
            out.is_empty(),
            "the scan is ahead of this creation: {out:?}"
        );
        r.resolve(
            at(
                old,
                CaptureEvent::Data {
                    file: f,
                    parent: id_of(&root.join("n")),
                    offset: 0,
                    data: b"older".to_vec(),
                },
            ),
            &mut out,
        );
        assert!(
            out.is_empty(),
            "data older than the scan is already in the copy: {out:?}"
        );
        r.resolve(
            at(
                old,
                CaptureEvent::Renamed {
                    from: arg(&root.join("a/f")),
                    to: arg(&root.join("n/g")),
                    flags: 0,
                },
            ),
            &mut out,
        );
        assert_eq!(
            out.iter().map(|o| o.op.clone()).collect::<Vec<_>>(),
            vec![Op::Remove {
                path: RelPath(b"a/f".to_vec())
            }]
        );
        assert_eq!(r.index().location(f).unwrap().rel, PathBuf::from("n/g"));
    }

    /// A replica as the ops make it: which file each name is, and each file's bytes.
    #[derive(Default)]
    struct Replica {
        names: HashMap<Vec<u8>, usize>,
        files: Vec<Vec<u8>>,
    }

    impl Replica {
        /// Answers the mirror questions in `out` as the receiver would, applies `out`
        /// and then the ops the answers led to; returns all of them, one line each,
        /// for assertion messages.
        fn take<W: Watcher>(&mut self, r: &mut Resolver<W>, out: &[SetOp]) -> Vec<String> {
            let sent = answer(r, out);
            self.apply(out);
            self.apply(&sent);
            out.iter()
                .chain(&sent)
                .map(|o| summarize_op(&o.op))
                .collect()
        }

        fn file(&mut self, path: &RelPath) -> usize {
            if let Some(&i) = self.names.get(&path.0) {
                return i;
            }
            self.files.push(Vec::new());
            self.names.insert(path.0.clone(), self.files.len() - 1);
            self.files.len() - 1
        }

        fn apply(&mut self, ops: &[SetOp]) {
            for o in ops {
                match &o.op {
                    Op::CreateFile { path, .. } => {
                        self.file(path);
                    }
                    Op::Write { path, offset, data } => {
                        let i = self.file(path);
                        let (start, f) = (*offset as usize, &mut self.files[i]);
                        if f.len() < start + data.len() {
                            f.resize(start + data.len(), 0);
                        }
                        f[start..start + data.len()].copy_from_slice(data);
                    }
                    Op::Truncate { path, size } => {
                        let i = self.file(path);
                        self.files[i].resize(*size as usize, 0);
                    }
                    Op::Link { from, to } => {
                        if let Some(&i) = self.names.get(&from.0) {
                            self.names.insert(to.0.clone(), i);
                        }
                    }
                    Op::Rename { from, to, .. } => {
                        if let Some(i) = self.names.remove(&from.0) {
                            self.names.insert(to.0.clone(), i);
                        }
                    }
                    Op::Remove { path } => {
                        self.names.remove(&path.0);
                    }
                    Op::Prune { dir, keep } => {
                        let dir = dir.as_ref().map_or(&b""[..], |d| &d.0[..]);
                        self.names.retain(|name, _| {
                            let (parent, base) = match name.iter().rposition(|&b| b == b'/') {
                                Some(i) => (&name[..i], &name[i + 1..]),
                                None => (&b""[..], &name[..]),
                            };
                            parent != dir || keep.iter().any(|k| k.0 == base)
                        });
                    }
                    Op::Sum { .. }
                    | Op::SetAttr { .. }
                    | Op::SetXattrs { .. }
                    | Op::Mkdir { .. } => {}
                    other => panic!("not modelled: {other:?}"),
                }
            }
        }

        /// The names of the replica's files, one group per file.
        fn groups(&self) -> Vec<Vec<String>> {
            let mut groups: Vec<Vec<String>> = vec![Vec::new(); self.files.len()];
            for (name, &i) in &self.names {
                groups[i].push(String::from_utf8_lossy(name).into_owned());
            }
            groups.retain(|g| !g.is_empty());
            groups.iter_mut().for_each(|g| g.sort());
            groups.sort();
            groups
        }
    }

    fn link_event(from: &Path, to: &Path) -> Captured {
        now(CaptureEvent::Linked {
            from: arg(from),
            to: arg(to),
        })
    }

    /// fidelity::links_and_special, with the agent resolving the first links while the
    /// source still has `a/orig` and the rest after the source has moved on: the first
    /// name the index has for the file (`a/orig`) is gone from the source by then, yet
    /// the replica has the file under it and under `b/l1` and `c/l2`. Every later name
    /// must be a link to that file, not a second copy beside it.
    #[test]
    fn a_link_made_after_the_first_name_went_joins_the_replicas_file() {
        use std::os::unix::fs::OpenOptionsExt;
        let d = tempfile::tempdir().unwrap();
        let root = d.path().canonicalize().unwrap();
        for dir in ["a", "b", "c"] {
            std::fs::create_dir(root.join(dir)).unwrap();
        }
        let w = FakeWatch::default();
        let mut r = setup(&root, &w);
        let mut out = Vec::new();
        r.scan_all(&mut out);
        let p = |n: &str| root.join(n);
        let orig: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let f = written(&mut r, &p("a/orig"), &orig, &mut out);
        for to in ["b/l1", "c/l2"] {
            std::fs::hard_link(p("a/orig"), p(to)).unwrap();
            r.resolve(link_event(&p("a/orig"), &p(to)), &mut out);
        }
        // The source runs ahead of the agent from here.
        let mut late = Vec::new();
        for (from, to) in [("a/orig", "a/l3"), ("a/l3", "c/l4")] {
            std::fs::hard_link(p(from), p(to)).unwrap();
            late.push(link_event(&p(from), &p(to)));
        }
        std::fs::remove_file(p("a/orig")).unwrap();
        late.push(now(CaptureEvent::Removed {
            path: arg(&p("a/orig")),
            is_dir: false,
        }));
        std::fs::rename(p("b/l1"), p("b/renamed")).unwrap();
        late.push(now(CaptureEvent::Renamed {
            from: arg(&p("b/l1")),
            to: arg(&p("b/renamed")),
            flags: 0,
        }));
        let written = b"written through c/l2";
        let fd = std::fs::OpenOptions::new()
            .write(true)
            .open(p("c/l2"))
            .unwrap();
        fd.write_all_at(written, 1000).unwrap();
        late.push(now(CaptureEvent::Data {
            file: f,
            parent: id_of(&p("c")),
            offset: 1000,
            data: written.to_vec(),
        }));
        let appended = b", appended through c/l4";
        let mut fd = std::fs::OpenOptions::new()
            .append(true)
            .custom_flags(0)
            .open(p("c/l4"))
            .unwrap();
        std::io::Write::write_all(&mut fd, appended).unwrap();
        late.push(now(CaptureEvent::Data {
            file: f,
            parent: id_of(&p("c")),
            offset: orig.len() as u64,
            data: appended.to_vec(),
        }));
        for ev in late {
            r.resolve(ev, &mut out);
        }
        r.finish(&mut out);
        let mut replica = Replica::default();
        let ops = replica.take(&mut r, &out);
        assert_eq!(
            replica.groups(),
            [["a/l3", "b/renamed", "c/l2", "c/l4"]],
            "one file, under the source's names: {ops:#?}"
        );
        let want = std::fs::read(p("a/l3")).unwrap();
        assert_eq!(replica.files[replica.names[&b"c/l2"[..]]], want);
    }

    /// As above, but with every name the index knows for the file gone from the source
    /// by the time a new name is resolved: that name is copied, and the replica's old
    /// names, of the other file, must go with their events, not stay beside the copy
    /// (the rename of one was taken for that of a file registered after it).
    #[test]
    fn the_old_names_of_a_file_copied_under_a_new_one_are_not_left_behind() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().canonicalize().unwrap();
        for dir in ["a", "b"] {
            std::fs::create_dir(root.join(dir)).unwrap();
        }
        let w = FakeWatch::default();
        let mut r = setup(&root, &w);
        let mut out = Vec::new();
        r.scan_all(&mut out);
        let p = |n: &str| root.join(n);
        let f = written(&mut r, &p("a/orig"), b"original", &mut out);
        std::fs::hard_link(p("a/orig"), p("b/l1")).unwrap();
        r.resolve(link_event(&p("a/orig"), &p("b/l1")), &mut out);
        // The source runs ahead: neither a/orig nor b/l1 is there when a/l3 is resolved.
        let mut late = vec![];
        std::fs::hard_link(p("a/orig"), p("a/l3")).unwrap();
        late.push(link_event(&p("a/orig"), &p("a/l3")));
        std::fs::remove_file(p("a/orig")).unwrap();
        late.push(now(CaptureEvent::Removed {
            path: arg(&p("a/orig")),
            is_dir: false,
        }));
        std::fs::rename(p("b/l1"), p("b/renamed")).unwrap();
        late.push(now(CaptureEvent::Renamed {
            from: arg(&p("b/l1")),
            to: arg(&p("b/renamed")),
            flags: 0,
        }));
        let fd = std::fs::OpenOptions::new()
            .write(true)
            .open(p("a/l3"))
            .unwrap();
        fd.write_all_at(b"O", 0).unwrap();
        late.push(now(CaptureEvent::Data {
            file: f,
            parent: id_of(&p("a")),
            offset: 0,
            data: b"O".to_vec(),
        }));
        for ev in late {
            r.resolve(ev, &mut out);
        }
        r.finish(&mut out);
        let mut replica = Replica::default();
        let ops = replica.take(&mut r, &out);
        assert_eq!(
            replica.groups(),
            [["a/l3", "b/renamed"]],
            "one file, under the source's names: {ops:#?}"
        );
        assert_eq!(replica.files[replica.names[&b"b/renamed"[..]]], b"Original");
    }

    /// The storm's `renamed-3724.bin`: file A is renamed over file C (`s/a` -> `t/x`)
    /// and on (`t/x` -> `t/y`) before the agent resolves either rename, and by then the
    /// index no longer knows A at `s/a` (here: a re-read of A found it gone from there
    /// for too long, and `s` was copied again, which forgot `s/a`). The first rename has
    /// an unknown source and a destination gone from the source: nothing can be copied
    /// there, but C must not stay known at `t/x`, or the second rename moves C's bytes to
    /// `t/y` on the replica and A is never sent.
    #[test]
    fn a_file_renamed_over_another_and_on_before_it_is_resolved_is_not_the_other() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().canonicalize().unwrap();
        let p = |n: &str| root.join(n);
        for dir in ["s", "t"] {
            std::fs::create_dir(p(dir)).unwrap();
        }
        std::fs::write(p("s/a"), b"old bytes of a").unwrap();
        std::fs::write(p("t/c"), b"the other file, c").unwrap();
        let w = FakeWatch::default();
        let mut r = setup(&root, &w);
        let mut out = Vec::new();
        r.scan_all(&mut out);
        let mut replica = Replica::default();
        replica.take(&mut r, &out);
        out.clear();
        let a = id_of(&p("s/a"));
        std::fs::rename(p("t/c"), p("t/x")).unwrap();
        r.resolve(
            now(CaptureEvent::Renamed {
                from: arg(&p("t/c")),
                to: arg(&p("t/x")),
                flags: 0,
            }),
            &mut out,
        );
        // The source runs ahead: A grows (its bytes lost in a full ring: a missed
        // range), goes over C at t/x, then on to t/y.
        let grown: Vec<u8> = (0..30_000u32).map(|i| (i % 241) as u8).collect();
        std::fs::write(p("s/a"), &grown).unwrap();
        let mut late = vec![now(CaptureEvent::Dirty {
            file: a,
            parent: None,
            offset: 0,
            len: grown.len() as u64,
        })];
        for (from, to) in [("s/a", "t/x"), ("t/x", "t/y")] {
            std::fs::rename(p(from), p(to)).unwrap();
            late.push(now(CaptureEvent::Renamed {
                from: arg(&p(from)),
                to: arg(&p(to)),
                flags: 0,
            }));
        }
        let mut late = late.into_iter();
        r.resolve(late.next().unwrap(), &mut out);
        // Not at s/a: deferred; after its patience, s is copied again.
        for d in r.deferred.iter_mut() {
            d.since = monotonic_ns() - TOUCH_PATIENCE_NS - 1;
        }
        r.finish(&mut out);
        for ev in late {
            r.resolve(ev, &mut out);
        }
        r.finish(&mut out);
        let ops = replica.take(&mut r, &out);
        assert_eq!(replica.groups(), [["t/y"]], "{ops:#?}");
        assert!(
            replica.files[replica.names[&b"t/y"[..]]] == grown,
            "t/y holds A's bytes: {ops:#?}"
        );
    }
}
