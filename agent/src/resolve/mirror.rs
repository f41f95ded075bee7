//! Mirror and verify emission: block checksums of files, answers to the receiver's
//! comparisons, directory listings and prunes.

use super::*;

impl<W: Watcher> Resolver<W> {
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
        let found = open_as(&abs, file).filter(|(_, m)| m.is_file());
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
            if self.enter(set, parent, name, &abs, rel, &m, Copy::Compare, out) && m.is_dir() {
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
    pub(super) fn send_listing(&mut self, set: usize, dir: Option<RelPath>, out: &mut Vec<SetOp>) {
        let rel = dir.as_ref().map_or(Path::new(""), |d| d.as_path());
        let Some(keep) = self.listing(set, rel) else {
            return; // gone itself: its own directory's listing covers it
        };
        self.prune_to(set, dir, keep, out);
    }

    /// A `Prune` of directory `dir` keeping only `keep`.
    pub(super) fn prune_to(
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
    pub(super) fn listing(&self, set: usize, rel: &Path) -> Option<Vec<RelPath>> {
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
    pub(super) fn prune_op(&self, set: usize, dir: Option<RelPath>, keep: Vec<RelPath>) -> Op {
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
    pub(super) fn forget_pruned(&mut self, dir: FileId, keep: &[RelPath]) {
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

    pub(super) fn verify_dir(
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
}

/// The entry's extended attributes (with `xattrs`) and then its mode, owner and times.
/// Times go last: nothing applied after them in this batch changes the entry.
pub(super) fn emit_meta(
    set: usize,
    abs: &Path,
    rel: &Path,
    m: &Metadata,
    xattrs: bool,
    out: &mut Vec<SetOp>,
) {
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
pub(super) fn emit_mirror_file(
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

impl<W: Watcher> Resolver<W> {
    /// A new file of `set` whose bytes go in the stream ([`Copy::Send`]): made, then
    /// its bytes as read now (cut to the size it has then). False if `abs` is no longer
    /// file `id`.
    pub(super) fn send_new_file(
        &mut self,
        set: usize,
        abs: &Path,
        rel: &Path,
        id: FileId,
        m: &Metadata,
        out: &mut Vec<SetOp>,
    ) -> bool {
        let mut ops = vec![SetOp {
            set,
            op: Op::CreateFile {
                path: rel_path(rel),
                mode: m.mode() & 0o7777,
            },
        }];
        let now = monotonic_ns();
        let Some(size) = emit_range(set, abs, rel, 0, u64::MAX, id, &mut ops) else {
            return false;
        };
        out.append(&mut ops);
        if self.streaming {
            // The initial copy, which is not crash-consistent before its end anyway:
            // an event captured before this read and handled after it is followed by
            // every later one, so the file ends as it is (see overlap.rs). Remembering
            // each read until the scan ends (no event is handled meanwhile) held
            // 220 B per file: 45 MiB at 200,000 files.
            self.note_read_back(set);
        } else {
            self.sent_as_read(set, id, 0, size, now);
        }
        true
    }
}

/// The mirror's quick check of a file (`mirror_quick_check`): a Sum without blocks
/// that compares size, mode, owner and mtime; a difference comes back as an answer of
/// [`QUICK_JOB`](doppel_common::wire::sums::QUICK_JOB) and the file is then mirrored
/// block by block ([`Resolver::resum`]).
pub(super) fn emit_quick_check(
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
pub(super) const SUMS_PER_OP: usize = 1024;

/// The file's block checksums as [`Op::Sum`]s. For the mirror (`verify` is `None`) a
/// `Truncate` to the file's size goes first; a verify job's comparisons change nothing
/// and also compare the attributes. Returns the size the sums were taken against, or
/// `None` if `abs` is no longer file `id`.
pub(super) fn emit_sums(
    set: usize,
    abs: &Path,
    rel: &Path,
    id: FileId,
    block: u32,
    verify: Option<u64>,
    out: &mut Vec<SetOp>,
) -> Option<u64> {
    let (f, m) = open_as(abs, id)?;
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
pub(super) fn block_sums(
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
pub(super) fn differing_fine(
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
