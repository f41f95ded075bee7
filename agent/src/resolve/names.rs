//! Names: path arguments placed in the sets, files found by inode, and the namespace
//! changes (removals, renames, arrivals) applied to the index.

use super::*;

impl<W: Watcher> Resolver<W> {
    /// Absolute, normalised path of a syscall's path argument.
    pub(super) fn abs_path(&self, p: &PathArg) -> Option<PathBuf> {
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

    /// Directories left the index: the kernel stops watching them. Their marks in the
    /// inode bitmap stay, as files' do, until the kernel frees the inode: a node also
    /// leaves the index when its name turns out stale while it is still in a set (its
    /// rename's event still to come), and an inode number the agent learns is gone may
    /// already be a new file's. What really left reports writes that resolve to
    /// nothing (counted as unresolved).
    pub(super) fn forget(&self, dirs: Vec<FileId>) {
        for d in dirs {
            self.watcher.unwatch(d);
        }
    }

    /// Location and parent directory of a path argument inside a set.
    pub(super) fn place(&self, p: &PathArg) -> Option<(Location, PathBuf)> {
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

    pub(super) fn parent_of(&self, loc: &Location) -> Option<FileId> {
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
    pub(super) fn file_location(
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
            self.enter(ploc.set, parent, &name, &abs, &rel, &m, Copy::Send, out);
            return self.index.location(file);
        }
        None
    }

    pub(super) fn remove(&mut self, loc: Location, is_dir: bool, out: &mut Vec<SetOp>) {
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

    pub(super) fn replicated(&self, loc: &Location, is_dir: bool) -> bool {
        let r = &self.sets[loc.set].rules;
        if is_dir {
            r.dir(&loc.rel)
        } else {
            r.file(&loc.rel)
        }
    }

    pub(super) fn rename(
        &mut self,
        from: &PathArg,
        to: &PathArg,
        flags: u32,
        time: u64,
        out: &mut Vec<SetOp>,
    ) {
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
                self.send_rename((sp, &sname, &sl), (dp, &dname, &dl), flags, out);
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

    /// Renames `from` to `to` (directory, name, location) in the index, or swaps them
    /// with `RENAME_EXCHANGE` in `flags`, and sends the rename.
    pub(super) fn send_rename(
        &mut self,
        from: (FileId, &OsStr, &Location),
        to: (FileId, &OsStr, &Location),
        flags: u32,
        out: &mut Vec<SetOp>,
    ) {
        if flags & RENAME_EXCHANGE != 0 {
            self.index.exchange((from.0, from.1), (to.0, to.1));
        } else {
            let dropped = self.index.rename((from.0, from.1), (to.0, to.1));
            self.forget(dropped);
        }
        out.push(SetOp {
            set: to.2.set,
            op: Op::Rename {
                from: rel_path(&from.2.rel),
                to: rel_path(&to.2.rel),
                flags,
            },
        });
    }

    /// The entry a path-based attribute call changed: the symlink itself with
    /// `follow == false`, else what it points to (if that is in a set too).
    pub(super) fn attr_target(&self, p: &PathArg, follow: bool) -> Option<FileId> {
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
    pub(super) fn arrive(&mut self, loc: Location, abs: &Path, out: &mut Vec<SetOp>) {
        let Some(parent) = self.parent_of(&loc) else {
            self.unresolved += 1;
            return;
        };
        match std::fs::symlink_metadata(abs) {
            Ok(m) => {
                let name = loc.rel.file_name().unwrap_or_default().to_owned();
                self.enter(loc.set, parent, &name, abs, &loc.rel, &m, Copy::Send, out);
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
    pub(super) fn made_elsewhere(&mut self, parent: FileId, abs: &Path) {
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

/// A path the caller gave as `/proc/self/<rest>`: the caller's /proc, not ours. The
/// magic link (`fd/N`, `cwd`, `root`) names a file or directory; what follows it is
/// looked up from there. Racy: the descriptor may be closed (or reused) by now, so the
/// capture resolves the `fd/N` of attribute calls itself (tar's `chmod` through an
/// `O_PATH` descriptor) and this serves the remaining cases.
pub(super) fn proc_self_path(pid: u32, rest: &Path) -> Option<PathBuf> {
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
pub(super) fn proc_base(p: &PathArg) -> Option<PathBuf> {
    const AT_FDCWD: i32 = -100;
    let link = if p.dirfd == AT_FDCWD {
        format!("/proc/{}/cwd", p.pid)
    } else {
        format!("/proc/{}/fd/{}", p.pid, p.dirfd)
    };
    std::fs::read_link(link).ok()
}
