//! Entries: namespace changes the filesystem reports by directory and name
//! ([`CaptureEvent::Entry`], [`CaptureEvent::Moved`], from fanotify), made to agree with
//! the index by looking at what the directory holds under the name now.
//!
//! Nothing of an event's history is replayed, unlike the syscall door's path events
//! (`names`): the index and the replica are brought to the source as it is. So events
//! handled late, merged in the kernel's queue, or out of step with the ring's data
//! records still converge. A name the source no longer has is removed; one it has is
//! entered: moved there from where the index knew the entry (a rename on the replica,
//! not a copy), swapped with it (an exchange), linked (another name of a known file),
//! or copied.

use doppel_common::event::EntryChange;

use super::*;

impl<W: Watcher> Resolver<W> {
    /// An entry of `dir` named `name` changed as `change` says.
    pub(super) fn entry_changed(
        &mut self,
        dir: FileId,
        name: &[u8],
        change: EntryChange,
        out: &mut Vec<SetOp>,
    ) {
        if name.is_empty() {
            // The directory itself.
            if change == EntryChange::Attrib && self.index.location(dir).is_some() {
                self.touch(Some(dir), true);
            }
            return;
        }
        let Some((loc, abs)) = self.entry_at(dir, name) else {
            return;
        };
        match change {
            EntryChange::Attrib => {
                let now = std::fs::symlink_metadata(&abs).ok().map(|m| file_id(&m));
                match (self.index.lookup(&loc), now) {
                    (Some(known), Some(now)) if known == now => self.touch(Some(known), true),
                    _ => self.settle(dir, &loc, &abs, None, None, out),
                }
            }
            EntryChange::Made => {
                self.touch(Some(dir), false);
                self.settle(dir, &loc, &abs, None, None, out);
            }
            EntryChange::Removed | EntryChange::RemovedDir => {
                self.touch(Some(dir), false);
                self.settle(
                    dir,
                    &loc,
                    &abs,
                    Some(change == EntryChange::RemovedDir),
                    None,
                    out,
                );
            }
        }
    }

    /// `from` was renamed to `to` (each a directory and a name).
    pub(super) fn entry_moved(
        &mut self,
        from: (FileId, &[u8]),
        to: (FileId, &[u8]),
        out: &mut Vec<SetOp>,
    ) {
        // The arrival first: if it is what the index has at the old name, it is renamed
        // on the replica, not copied. Then whatever the old name holds now (nothing, the
        // other side of an exchange, a whiteout).
        let from_at = self.entry_at(from.0, from.1);
        if let Some((loc, abs)) = self.entry_at(to.0, to.1) {
            self.touch(Some(to.0), false);
            let from_loc = from_at.as_ref().map(|(l, _)| l.clone());
            self.settle(to.0, &loc, &abs, None, from_loc, out);
        }
        if let Some((loc, abs)) = self.entry_at(from.0, from.1) {
            self.touch(Some(from.0), false);
            self.settle(from.0, &loc, &abs, None, None, out);
        }
    }

    /// Location and path of `name` in `dir`, if `dir` is a directory of a set whose
    /// namespace the filesystem reports, and is where the index has it.
    fn entry_at(&mut self, dir: FileId, name: &[u8]) -> Option<(Location, PathBuf)> {
        if !self.index.is_dir(dir) {
            return None; // outside every set (or an ancestor of a root)
        }
        let dloc = self.index.location(dir)?;
        if !self.namespace_in_filesystem(dloc.set) {
            return None;
        }
        let dabs = self.index.abs(&dloc);
        if std::fs::symlink_metadata(&dabs).map(|m| file_id(&m)).ok() != Some(dir) {
            // Moved since (its own rename is further on in the queue) or gone: its
            // entries are looked at again where the index will have it.
            self.rescan.entry(dir).or_insert_with(monotonic_ns);
            return None;
        }
        let name = OsStr::from_bytes(name);
        let loc = Location {
            set: dloc.set,
            rel: dloc.rel.join(name),
        };
        Some((loc, dabs.join(name)))
    }

    /// Makes the index and the replica hold at `loc` (name of directory `dir`) what the
    /// source holds at `abs` now. `removed`: the name was removed (`Some(is_dir)`)
    /// since the index learnt it, so the same inode there now is another file (its
    /// number reused) or another name of it, and is entered again. `renamed_from`: the
    /// name a rename that ended at `loc` came from.
    fn settle(
        &mut self,
        dir: FileId,
        loc: &Location,
        abs: &Path,
        removed: Option<bool>,
        renamed_from: Option<Location>,
        out: &mut Vec<SetOp>,
    ) {
        let known = self.index.lookup(loc);
        let now = std::fs::symlink_metadata(abs)
            .ok()
            .filter(|m| self.replicated(loc, m.is_dir()));
        let Some(m) = now else {
            match known {
                Some(k) => {
                    let is_dir = self.index.is_dir(k);
                    self.remove(loc.clone(), is_dir, out);
                }
                // A removal of a name the index does not know: the replica may still
                // have it (a name the index forgot when its file was copied under
                // another one), and the source has nothing there. Removing nothing is
                // fine on the receiver.
                None => {
                    let path = rel_path(&loc.rel);
                    match removed {
                        Some(true) => out.push(SetOp {
                            set: loc.set,
                            op: Op::Rmdir { path },
                        }),
                        Some(false) => out.push(SetOp {
                            set: loc.set,
                            op: Op::Remove { path },
                        }),
                        None => {}
                    }
                }
            }
            return;
        };
        let id = file_id(&m);
        if known == Some(id) && removed.is_none() {
            return;
        }
        if let Some(from) = renamed_from {
            if self.renamed_here(dir, &from, loc, id, out) {
                return;
            }
        }
        // (`renamed_here` changes nothing when it declines.)
        if let Some(k) = known {
            let is_dir = self.index.is_dir(k);
            self.remove(loc.clone(), is_dir, out);
        }
        let name = loc.rel.file_name().unwrap_or_default().to_owned();
        self.enter(loc.set, dir, &name, abs, &loc.rel, &m, Copy::Send, out);
    }

    /// A rename from `from` ended at `loc` (name of `dir`), which holds `id` now. If
    /// the index has `id` at `from` and the source no longer does, that entry is
    /// renamed on the replica (swapped, when what the index has at `loc` is at `from`
    /// now) and true returned. Only the rename's own names are compared: an inode
    /// number found elsewhere may be a new file's (the old one removed, its event
    /// still to come), and moving the old one's bytes there would be wrong.
    fn renamed_here(
        &mut self,
        dir: FileId,
        from: &Location,
        loc: &Location,
        id: FileId,
        out: &mut Vec<SetOp>,
    ) -> bool {
        if from.set != loc.set || self.index.lookup(from) != Some(id) || self.holds(from, id) {
            return false;
        }
        let Some(from_dir) = self.parent_of(from) else {
            return false;
        };
        let name = loc.rel.file_name().unwrap_or_default().to_owned();
        let from_name = from.rel.file_name().unwrap_or_default().to_owned();
        self.touch(Some(from_dir), false);
        let known = self.index.lookup(loc);
        let swapped = known.filter(|&k| k != id && self.holds(from, k));
        let flags = if swapped.is_some() {
            RENAME_EXCHANGE
        } else {
            if let Some(k) = known.filter(|&k| k != id) {
                // What the replica has there went from the source (renamed over, or
                // swapped away and removed since): removed first, as a rename over it
                // may not be possible there (a directory onto a file, a non-empty one).
                let is_dir = self.index.is_dir(k);
                self.remove(loc.clone(), is_dir, out);
            }
            0
        };
        self.send_rename((from_dir, &from_name, from), (dir, &name, loc), flags, out);
        true
    }

    /// Names other than `here` the index knows entry `id` by and the source no longer
    /// has as `id` (it moved, or was removed and its inode number reused, the event
    /// still to come) are removed from the index and the replica: `id` is entered at
    /// `here` as new, and the replica's file under an old name is not the source's.
    pub(super) fn drop_stale_names(&mut self, id: FileId, here: &Location, out: &mut Vec<SetOp>) {
        let stale: Vec<Location> = self
            .index
            .locations(id)
            .into_iter()
            .filter(|l| l != here && !self.holds(l, id) && self.dir_in_place(l))
            .collect();
        let is_dir = self.index.is_dir(id);
        for l in stale {
            self.remove(l, is_dir, out);
        }
    }

    /// A file with several names is entered at a name of directory `parent`, and the
    /// index knows it under another name it cannot find now because that name's
    /// directory moved (its rename still to come). Copied now, it would be a separate
    /// file on the replica from the name the index knows: instead `parent` is looked at
    /// again shortly, when the rename is handled and the other name found, and true is
    /// returned; after [`TOUCH_PATIENCE_NS`] it is copied after all.
    pub(super) fn link_pending(&mut self, set: usize, id: FileId, parent: FileId) -> bool {
        if !self.namespace_in_filesystem(set) {
            return false;
        }
        let moved = self
            .index
            .locations(id)
            .iter()
            .any(|l| !self.dir_in_place(l));
        let now = monotonic_ns();
        if !moved {
            self.link_waits.remove(&id);
            return false;
        }
        let since = *self.link_waits.entry(id).or_insert(now);
        if now - since >= TOUCH_PATIENCE_NS {
            self.link_waits.remove(&id);
            return false;
        }
        self.rescan.entry(parent).or_insert(now);
        true
    }

    /// Whether the directory holding `loc` is where the index has it: if it (or one
    /// above it) moved, its rename still to be handled, nothing can be told from a
    /// look at `loc`'s path yet.
    fn dir_in_place(&self, loc: &Location) -> bool {
        let Some(dir) = self.parent_of(loc) else {
            return false;
        };
        let Some(dloc) = self.index.location(dir) else {
            return false;
        };
        self.holds(&dloc, dir)
    }

    /// Whether the source has entry `id` at `loc`.
    fn holds(&self, loc: &Location, id: FileId) -> bool {
        std::fs::symlink_metadata(self.index.abs(loc)).is_ok_and(|m| file_id(&m) == id)
    }

    /// Whether a change reported at the syscall door concerns a set whose namespace the
    /// filesystem reports (both are captured when another set needs the syscall hook):
    /// the filesystem's report is the one acted on.
    pub(super) fn reported_by_filesystem(&self, ev: &CaptureEvent) -> bool {
        if !self.fs_namespace.iter().any(|&b| b) {
            return false;
        }
        let set_of = |p: &PathArg| self.place(p).map(|(l, _)| l.set);
        let set = match ev {
            CaptureEvent::Created { path, .. }
            | CaptureEvent::Removed { path, .. }
            | CaptureEvent::Made { path } => set_of(path),
            CaptureEvent::Renamed { from, to, .. } | CaptureEvent::Linked { from, to } => {
                set_of(to).or_else(|| set_of(from))
            }
            CaptureEvent::AttrChanged { file: Some(f), .. } => {
                self.index.location(*f).map(|l| l.set)
            }
            CaptureEvent::AttrChanged { path: Some(p), .. } => set_of(p),
            _ => None,
        };
        set.is_some_and(|s| self.namespace_in_filesystem(s))
    }
}
