//! Scanning: whole sets, directories found or rescanned, and entering what a scan
//! finds into the index (watched, marked, copied).

use super::*;

impl<W: Watcher> Resolver<W> {
    /// Watches every directory of every set and mirrors every entry: the initial copy.
    pub fn scan_all(&mut self, out: &mut Vec<SetOp>) {
        self.orphan_batch = unix_seconds();
        self.streaming = self.scan_sink.is_some();
        self.rescan_all(out);
        if !self.sent_whole.is_empty() {
            // Their notes go with their ops.
            self.hand_over(out);
        }
        self.streaming = false;
        self.first_copy_sends.clear();
        self.drop_stamps();
    }

    /// Hands what `out` holds to the scan's sink, with the notes of the files sent whole.
    fn hand_over(&mut self, out: &mut Vec<SetOp>) {
        if let Some(sink) = self.scan_sink.as_mut() {
            sink(out, &mut self.sent_whole);
        }
        self.sent_whole.clear();
    }

    /// How the scan of `set` copies a file's bytes.
    fn scan_copy(&self, set: usize) -> Copy {
        if self.first_copy_sends.get(set).copied().unwrap_or(false) {
            Copy::Send
        } else {
            Copy::Compare
        }
    }

    /// Whether `bytes` of a file of `set` may go in the stream now. During a streaming
    /// scan the queue is asked, counting the data the scan emitted and did not hand
    /// over yet (handing it over here, file by file, made batches of a few files, each
    /// synced on its own by the receiver); otherwise it may.
    pub(super) fn room_to_send(&mut self, set: usize, bytes: u64, out: &mut Vec<SetOp>) -> bool {
        if !self.streaming {
            return true;
        }
        let mut held: u64 = out.iter().map(|o| o.op.data_len() as u64).sum();
        if held >= SCAN_FLUSH_BYTES {
            self.hand_over(out);
            held = 0;
        }
        self.scan_room
            .as_mut()
            .is_none_or(|room| room(set, bytes + held))
    }

    /// As [`Resolver::scan_all`], never streaming: also the fallback when the kernel lost
    /// events it could not even record, in the middle of resolving events.
    pub(super) fn rescan_all(&mut self, out: &mut Vec<SetOp>) {
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

    pub(super) fn paced_rescan(&mut self, out: &mut Vec<SetOp>) {
        let started = std::time::Instant::now();
        self.rescan_all(out);
        self.pacing.done(started, std::time::Instant::now());
    }

    /// During a streaming scan, hands what `out` holds to the sink once it is enough.
    pub(super) fn flush_scan(&mut self, out: &mut Vec<SetOp>) {
        if self.streaming && out.len() >= SCAN_FLUSH_OPS {
            self.hand_over(out);
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

    pub(super) fn scan_root(&mut self, set: usize, out: &mut Vec<SetOp>) {
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
    pub(super) fn scan_dir(
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
            if self.enter(
                set,
                dir,
                &name,
                &child_abs,
                &child_rel,
                &m,
                self.scan_copy(set),
                out,
            ) {
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
    /// `how` says how a regular file's bytes go (see [`Copy`]). Returns whether it is
    /// replicated.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn enter(
        &mut self,
        set: usize,
        parent: FileId,
        name: &OsStr,
        abs: &Path,
        rel: &Path,
        m: &Metadata,
        how: Copy,
        out: &mut Vec<SetOp>,
    ) -> bool {
        let id = file_id(m);
        if self.namespace_in_filesystem(set) {
            // Known under a name the source no longer has it by (moved here, or the
            // number reused by a new entry, while the event that says so is still to
            // come): that name goes from the replica, and this one is entered as new.
            let here = Location {
                set,
                rel: rel.to_path_buf(),
            };
            self.drop_stale_names(id, &here, out);
            if let Some(k) = self.index.lookup(&here).filter(|&k| k != id) {
                // Another entry had this name (renamed over, or removed and the name
                // made again): the replica's is removed first, so that a creation here
                // does not write into it (a hard link's other names share it).
                let is_dir = self.index.is_dir(k);
                self.remove(here, is_dir, out);
            }
        }
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
                if self.link_pending(set, id, parent) {
                    self.not_sent(parent, name);
                    return false;
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
                if self.vouched_for(set, rel, m) {
                    // Unchanged since the last run stamped it as the replica has it.
                    return true;
                }
            }
            let path = rel_path(rel);
            let mut whole = false;
            if m.is_file() {
                if how == Copy::Send
                    && m.len() <= SEND_NEW_UP_TO
                    && self.room_to_send(set, m.len(), out)
                {
                    whole = true;
                    if !self.send_new_file(set, abs, rel, id, m, out) {
                        self.rescan.entry(parent).or_insert_with(monotonic_ns);
                        self.not_sent(parent, name);
                        return false;
                    }
                } else if self.sets[set].mirror_quick_check {
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
            if whole && self.streaming {
                self.sent_whole.push(SentWhole {
                    set,
                    file: id,
                    bytes: m.len(),
                    end: out.len(),
                });
            }
            true
        }
    }

    /// [`Resolver::enter`] registered `name` in `parent` but could not send it (it went
    /// between its stat and its copy). The index must not say the replica has it there:
    /// the rename that took it away would be sent as a rename of a file the replica
    /// lacks, which the receiver takes for a resend and skips, and the file would be
    /// missing under its new name. Unknown, its rename copies it where it went.
    pub(super) fn not_sent(&mut self, parent: FileId, name: &OsStr) {
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
    pub(super) fn other_name(&self, set: usize, id: FileId, rel: &Path) -> Option<PathBuf> {
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
}

/// The names in directory `abs`, sorted.
pub(super) fn sorted_names(abs: &Path) -> std::io::Result<Vec<std::ffi::OsString>> {
    let mut names: Vec<_> = std::fs::read_dir(abs)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    names.sort();
    Ok(names)
}

/// Whether the replica's directory holds the entry `rel` (found with metadata `m`): the
/// set's rules replicate it, and it is no device node (never replicated).
pub(super) fn kept(s: &Set, rel: &Path, m: &Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let ft = m.file_type();
    if m.is_dir() {
        s.rules.dir(rel)
    } else {
        s.rules.file(rel) && !ft.is_block_device() && !ft.is_char_device()
    }
}
