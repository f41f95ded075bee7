//! Resolve: turns captured kernel events into replication ops on set-relative paths.
//!
//! This stage owns the [`Index`] (inode -> path), applies each set's include/exclude
//! rules, tells the kernel which directories to watch, and reads file data for events
//! that carry a range instead of bytes ("Dirty") and for files that enter a set whole
//! (initial scan, a directory created before its watch was installed, a rename into a
//! set). Reading newer bytes than an event saw is safe: a later change to the same
//! range produces its own event after this one.
//!
//! Layout: this file holds the resolver and its event dispatch (`resolve_inner`);
//! `names` places path arguments and applies namespace changes to the index, `scan`
//! walks sets and directories and enters what it finds, `ranges` reads changed ranges
//! from the source, `mirror` emits the mirror's and verify's block checksums and
//! listings, `mappings` re-reads hot pages of shared mappings.

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
use crate::index::{normalize, Index, Location};
use crate::mapped::{Mapped, Run, PAGE};
use crate::marks::Marks;
use crate::overlap::Overlaps;
use crate::pacing::RescanPacing;
use crate::pagecache::{dirty_pages, write_back};
use crate::stamps::{PathList, Stamps};

mod entries;
mod mappings;
mod mirror;
mod names;
mod ranges;
mod restart;
mod scan;
#[cfg(test)]
mod tests;

use mirror::*;
use ranges::*;
use scan::*;

/// `renameat2`'s `RENAME_EXCHANGE`, in a rename's flags as the replica applies them.
const RENAME_EXCHANGE: u32 = 2;

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
    /// Per set: the initial scan sends small files' bytes at once ([`Copy::Send`]),
    /// its targets' replicas holding nothing (see [`Resolver::set_first_copy_sends`]).
    first_copy_sends: Vec<bool>,
    /// Asked before a streaming scan puts a file's bytes in the stream (see
    /// [`Resolver::set_scan_room`]).
    scan_room: Option<ScanRoom>,
    /// Files the streaming scan sent whole since its ops were last handed over.
    sent_whole: Vec<SentWhole>,
    /// When the running scan started (Unix seconds): where its orphans are moved aside.
    orphan_batch: u64,
    /// Per set: its namespace changes are reported by the filesystem (`entries`), not
    /// at the syscall door (`names`).
    fs_namespace: Vec<bool>,
    /// Per set: data ops were sent since its last [`Op::Barrier`].
    unordered: Vec<bool>,
    /// Per set: bytes were read back from a file since [`Resolver::take_read_back`].
    read_back: Vec<bool>,
    /// Files with several names waiting for a moved directory's rename before they are
    /// linked (see `entries::link_pending`), since when.
    link_waits: HashMap<FileId, u64>,
    /// Files whose size was set, looked at again once the change is surely over (xfs
    /// reports a growth before it sets the size): when, and the size sent; and the same
    /// in the order they fall due, so that looking costs what is due, not what waits.
    resize_again: HashMap<FileId, (u64, u64)>,
    resize_due: std::collections::VecDeque<(u64, FileId)>,
    /// Per set: what the last run stamped, for the initial scan to skip what did not
    /// change (see `stamps.rs`); dropped once it is done.
    stamps: Vec<Option<Stamps>>,
    /// Files the initial scan skipped as their stamps vouched for them.
    pub vouched: u64,
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Takes a scan's ops out of the vector, in order, with the notes of the files among
/// them that went whole (see [`Resolver::set_scan_sink`]).
pub type ScanSink = Box<dyn FnMut(&mut Vec<SetOp>, &mut Vec<SentWhole>)>;

/// A file a scan sent with its bytes ([`Copy::Send`]): its ops are those before index
/// `end` of the vector handed to the sink with this note.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentWhole {
    pub set: usize,
    pub file: FileId,
    pub bytes: u64,
    pub end: usize,
}

/// Whether set `.0`'s queue takes `.1` more bytes now (see [`Resolver::set_scan_room`]).
pub type ScanRoom = Box<dyn FnMut(usize, u64) -> bool>;

/// A streaming scan hands its ops over every this many, or once they carry this much
/// data: batches of many small files, which the receiver syncs together.
const SCAN_FLUSH_OPS: usize = 512;
const SCAN_FLUSH_BYTES: u64 = 1 << 20;

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
    /// Not read before this time (CLOCK_MONOTONIC ns; 0: at the next finish).
    after: u64,
}

/// How long the part of a changed range past the end of its file is read again. A write
/// is reported inside the filesystem just before it extends the file's size; the agent
/// can read the range in between (the writer preempted there). Past this the file is
/// taken to have been cut meanwhile (its truncate's event follows).
const UNSEEN_PATIENCE_NS: u64 = 500_000_000;

/// How the bytes of a regular file the index did not know reach the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Copy {
    /// Block checksums, for the receiver to ask for what differs: a scan's way, where
    /// the replica may hold the file already (a restart, a resync).
    Compare,
    /// Read now and sent in the stream, where its event is: a name that appeared as the
    /// source ran (made, moved in, found missing). Its bytes then precede whatever is
    /// captured after, as a database's new log must precede the pages written after
    /// its fsync; a comparison's answer would bring them only a round trip later.
    /// Files larger than [`SEND_NEW_UP_TO`] are compared all the same.
    Send,
}

/// The largest new file whose bytes are sent in the stream rather than compared.
const SEND_NEW_UP_TO: u64 = 4 << 20;

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

/// `abs` opened for reading and its metadata, if it still names file `id`: renamed
/// away or replaced meanwhile (its events still to come), it would give another file's
/// bytes.
fn open_as(abs: &Path, id: FileId) -> Option<(File, Metadata)> {
    let f = File::open(abs).ok()?;
    let m = f.metadata().ok()?;
    (file_id(&m) == id).then_some((f, m))
}

fn rel_path(rel: &Path) -> RelPath {
    RelPath(rel.as_os_str().as_bytes().to_vec())
}

impl<W: Watcher> Resolver<W> {
    /// Registers the set roots and their ancestors. Call [`Resolver::scan_all`] next.
    pub fn new(sets: Vec<Set>, watcher: W) -> std::io::Result<Self> {
        let n_sets = sets.len();
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
            first_copy_sends: Vec::new(),
            scan_room: None,
            sent_whole: Vec::new(),
            orphan_batch: 0,
            streaming: false,
            fs_namespace: Vec::new(),
            unordered: vec![false; n_sets],
            read_back: vec![false; n_sets],
            link_waits: HashMap::new(),
            resize_again: HashMap::new(),
            resize_due: std::collections::VecDeque::new(),
            stamps: Vec::new(),
            vouched: 0,
        })
    }

    pub fn sets(&self) -> &[Set] {
        &self.sets
    }

    /// Every event captured before `time` has been handed to [`Resolver::resolve`]:
    /// what was read before then can no longer be overtaken by an older event.
    pub fn events_complete_before(&mut self, time: u64) {
        self.overlaps.complete_before(time);
    }

    /// Whether set `set`'s namespace changes are reported by its filesystem.
    fn namespace_in_filesystem(&self, set: usize) -> bool {
        self.fs_namespace.get(set).copied().unwrap_or(false)
    }

    /// Set `set`'s namespace changes are reported by its filesystem (fanotify events,
    /// [`CaptureEvent::Entry`]); those of the syscall door about it are ignored.
    pub fn set_namespace_in_filesystem(&mut self, set: usize, yes: bool) {
        if self.fs_namespace.len() < self.sets.len() {
            self.fs_namespace.resize(self.sets.len(), false);
        }
        if let Some(f) = self.fs_namespace.get_mut(set) {
            *f = yes;
        }
    }

    /// Emits the attributes of every entry touched since the last call, as they are
    /// now. Called after each batch of events, so the ops that changed an entry come
    /// first and its final times win on the replica.
    pub fn finish(&mut self, out: &mut Vec<SetOp>) {
        let before = out.len();
        self.finish_inner(out);
        self.note_data(&out[before..]);
    }

    fn finish_inner(&mut self, out: &mut Vec<SetOp>) {
        if self.mapped.pass_due() {
            self.mapped_pass(out);
        }
        let now = monotonic_ns();
        self.resize_again_due(now, out);
        for d in std::mem::take(&mut self.deferred) {
            if d.after > now {
                self.deferred.push(d);
                continue;
            }
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
                self.note_read_back(loc.set);
                self.overlaps.read(d.file, d.offset, d.len, read);
                self.touch(Some(d.file), false);
                if now - d.since < UNSEEN_PATIENCE_NS {
                    self.defer_unseen(d.file, d.offset, d.len, size, d.since);
                }
            } else if now - d.since < TOUCH_PATIENCE_NS {
                self.deferred.push(d);
            } else if let Some(dir) = self.parent_of(&loc) {
                // The index is wrong about this name: copy its directory again. The
                // file may have moved on from there meanwhile (its event still to
                // come): it is read whole once the index knows where it went (or
                // dropped, if that rescan finds it gone).
                warn!(path = %abs.display(), "a changed file is not where the index says; copying its directory again");
                self.rescan.entry(dir).or_insert(now);
                if d.len != u64::MAX || d.offset != 0 {
                    self.deferred.push(Deferred {
                        offset: 0,
                        len: u64::MAX,
                        since: now,
                        short: false,
                        ..d
                    });
                }
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

    /// The initial scan of `set` goes to replicas that hold nothing (every target said
    /// so): a file up to [`SEND_NEW_UP_TO`] goes with its bytes, read once, instead of
    /// its checksums, which would bring back a request for every block a round trip
    /// later. Later scans (a restart, a resync) compare.
    pub fn set_first_copy_sends(&mut self, set: usize, yes: bool) {
        if self.first_copy_sends.len() <= set {
            self.first_copy_sends.resize(set + 1, false);
        }
        self.first_copy_sends[set] = yes;
    }

    /// How a streaming scan learns whether the queue takes a file's bytes now; when it
    /// does not (the target does not keep up), the file is compared instead, so that
    /// the data of a first mirror never fills the journal.
    pub fn set_scan_room(&mut self, room: ScanRoom) {
        self.scan_room = Some(room);
    }

    /// Turns one captured event into ops.
    pub fn resolve(&mut self, c: Captured, out: &mut Vec<SetOp>) {
        let before = out.len();
        self.resolve_traced(c, out);
        self.note_data(&out[before..]);
    }

    /// Sets whose ops since the last call carry bytes read back from a file instead of
    /// captured at write time (see `SetQueue::order_broken`).
    pub fn take_read_back(&mut self) -> Vec<usize> {
        let sets = (0..self.read_back.len())
            .filter(|&s| self.read_back[s])
            .collect();
        self.read_back.iter_mut().for_each(|r| *r = false);
        sets
    }

    /// Bytes of set `set` were read back from a file.
    fn note_read_back(&mut self, set: usize) {
        if let Some(r) = self.read_back.get_mut(set) {
            *r = true;
        }
    }

    /// Remembers which sets got data ops: a later fsync puts a barrier after them.
    fn note_data(&mut self, ops: &[SetOp]) {
        for o in ops {
            if matches!(
                o.op,
                Op::Write { .. }
                    | Op::Truncate { .. }
                    | Op::CreateFile { .. }
                    | Op::Fallocate { .. }
            ) {
                if let Some(u) = self.unordered.get_mut(o.set) {
                    *u = true;
                }
            }
        }
    }

    fn resolve_traced(&mut self, c: Captured, out: &mut Vec<SetOp>) {
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
        if self.index.is_dir(file) {
            // The file was removed and a directory took its inode number.
            return Standing::Unknown;
        }
        if !self.scanned_after(Some(file), time) {
            Standing::Fresh(loc)
        } else if end > self.index.seen_len(file) {
            Standing::Reread(loc)
        } else {
            Standing::Covered
        }
    }

    fn resolve_inner(&mut self, ev: CaptureEvent, time: u64, out: &mut Vec<SetOp>) {
        if self.reported_by_filesystem(&ev) {
            return;
        }
        match ev {
            CaptureEvent::Entry { dir, name, change } => {
                self.entry_changed(dir, &name, change, out)
            }
            CaptureEvent::Moved {
                from_dir,
                from_name,
                to_dir,
                to_name,
            } => self.entry_moved((from_dir, &from_name), (to_dir, &to_name), out),
            CaptureEvent::Resized { file, parent } => self.resized(file, parent, time, out),
            CaptureEvent::Synced { file } => {
                // What was written to the file before comes before what any file of
                // the set gets after: the receiver does not reorder across a barrier.
                if let Some(loc) = self.index.location(file) {
                    if self.unordered.get(loc.set).copied().unwrap_or(false) {
                        self.unordered[loc.set] = false;
                        out.push(SetOp {
                            set: loc.set,
                            op: Op::Barrier,
                        });
                    }
                }
            }
            CaptureEvent::Touched { file } => {
                if self.index.location(file).is_some() {
                    self.touch(Some(file), false);
                }
            }
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
                            self.enter(loc.set, parent, &name, &abs, &loc.rel, &m, Copy::Send, out);
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
                            self.enter(loc.set, parent, &name, &abs, &loc.rel, &m, Copy::Send, out);
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
                let Some(loc) = self.changed_file(file, parent, time, out) else {
                    return;
                };
                match plan_fallocate(&loc.rel, mode, offset, len) {
                    FallocPlan::Apply(op) => out.push(SetOp { set: loc.set, op }),
                    FallocPlan::Nothing => {}
                    // Inside the filesystem the shift is reported as it begins.
                    FallocPlan::RereadFromOffset => {
                        self.read_now_and_later(file, &loc, offset, u64::MAX, out)
                    }
                }
            }
            CaptureEvent::Remapped {
                file,
                parent,
                offset,
                len,
            } => {
                if let Some(loc) = self.changed_file(file, parent, time, out) {
                    self.read_now_and_later(file, &loc, offset, len, out);
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
}

impl<W: Watcher> Resolver<W> {
    /// The size of `file` was set at `time`: the replica's file gets the size the
    /// source's has now. Larger than at `time` only if writes followed, whose records
    /// come after this one and fill what this leaves as zeros.
    fn resized(&mut self, file: FileId, parent: Option<FileId>, time: u64, out: &mut Vec<SetOp>) {
        let Some(loc) = self.current(file, parent, time, out) else {
            self.unresolved += 1;
            return;
        };
        if !self.sets[loc.set].rules.file(&loc.rel) {
            return;
        }
        self.touch(Some(file), false);
        match open_as(&self.index.abs(&loc), file) {
            Some((_, m)) => {
                out.push(SetOp {
                    set: loc.set,
                    op: Op::Truncate {
                        path: rel_path(&loc.rel),
                        size: m.len(),
                    },
                });
                let due = monotonic_ns() + UNSEEN_PATIENCE_NS;
                self.resize_again.insert(file, (due, m.len()));
                self.resize_due.push_back((due, file));
            }
            // Not where the index says (moved on since): read whole once it is known
            // where it went, which sets the size too.
            None => self.deferred.push(Deferred {
                file,
                offset: 0,
                len: u64::MAX,
                since: monotonic_ns(),
                short: false,
                after: 0,
            }),
        }
    }
}

impl<W: Watcher> Resolver<W> {
    /// Where file `file` (reported in `parent`) is, if the sets replicate it: its
    /// attributes are then due too. A file that cannot be placed is counted.
    fn changed_file(
        &mut self,
        file: FileId,
        parent: FileId,
        time: u64,
        out: &mut Vec<SetOp>,
    ) -> Option<Location> {
        let Some(loc) = self.current(file, Some(parent), time, out) else {
            self.unresolved += 1;
            return None;
        };
        if !self.sets[loc.set].rules.file(&loc.rel) {
            return None;
        }
        self.touch(Some(file), false);
        Some(loc)
    }

    /// Reads a range of a file whose change was reported as it began: now, and once
    /// more when it is surely over (the filesystem holds the file's lock for its whole
    /// work, which the read waits for only if it comes late enough).
    fn read_now_and_later(
        &mut self,
        file: FileId,
        loc: &Location,
        offset: u64,
        len: u64,
        out: &mut Vec<SetOp>,
    ) {
        self.read_range(file, loc, offset, len, out);
        let now = monotonic_ns();
        self.deferred.push(Deferred {
            file,
            offset,
            len,
            since: now,
            short: false,
            after: now + UNSEEN_PATIENCE_NS,
        });
    }

    /// Sizes set a while ago looked at again: a size that differs from the one sent is
    /// sent (the report came before the change, or the change was undone).
    fn resize_again_due(&mut self, now: u64, out: &mut Vec<SetOp>) {
        while let Some(&(due, file)) = self.resize_due.front() {
            if due > now {
                break;
            }
            self.resize_due.pop_front();
            // Resized again since: its later entry in the queue looks at it.
            let Some(&(latest, sent)) = self.resize_again.get(&file) else {
                continue;
            };
            if latest > now {
                continue;
            }
            self.resize_again.remove(&file);
            let Some(loc) = self.index.location(file) else {
                continue;
            };
            if self.index.is_dir(file) || !self.sets[loc.set].rules.file(&loc.rel) {
                continue;
            }
            if let Some((_, m)) = open_as(&self.index.abs(&loc), file) {
                if m.len() != sent {
                    self.touch(Some(file), false);
                    out.push(SetOp {
                        set: loc.set,
                        op: Op::Truncate {
                            path: rel_path(&loc.rel),
                            size: m.len(),
                        },
                    });
                }
            }
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

fn summarize_op(op: &Op) -> String {
    match op {
        Op::Write { path, offset, data } => format!("write {path} off {offset} len {}", data.len()),
        other => format!("{other:?}"),
    }
}
