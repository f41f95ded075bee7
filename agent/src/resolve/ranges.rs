//! Reading changed ranges from the source: a range event's bytes, ranges read again
//! (overlaps, parts a file did not have yet), holes kept as holes.

use super::*;

impl<W: Watcher> Resolver<W> {
    /// A data event about `[offset, offset + len)` of `file` captured at `time`: the parts
    /// that may be older than what the replica was sent are read again at
    /// [`Resolver::finish`] (see `overlap.rs`).
    pub(super) fn read_overlaps(&mut self, file: FileId, offset: u64, len: u64, time: u64) {
        let since = monotonic_ns();
        for (start, end) in self.overlaps.write(file, offset, len, time) {
            self.reread_ranges += 1;
            self.deferred.push(Deferred {
                file,
                offset: start,
                len: end - start,
                since,
                short: false,
                after: 0,
            });
        }
    }

    /// Emits the bytes of `file`'s range as the source has them now; if `loc` no longer
    /// names the file (renamed or replaced, with events still to come), tries again at
    /// the next [`Resolver::finish`], where the index says the file is by then.
    pub(super) fn read_range(
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
            self.sent_as_read(loc.set, file, offset, len, now);
            self.defer_unseen(file, offset, len, size, now);
        } else {
            self.deferred.push(Deferred {
                file,
                offset,
                len,
                since: monotonic_ns(),
                short: false,
                after: 0,
            });
        }
    }

    /// `[offset, offset + len)` of `file` of `set`, read at `now`, was sent: bytes newer
    /// than their event (the set is not crash-consistent until they are applied), and
    /// newer than events captured before `now` and handled after (overlap.rs).
    pub(super) fn sent_as_read(
        &mut self,
        set: usize,
        file: FileId,
        offset: u64,
        len: u64,
        now: u64,
    ) {
        self.note_read_back(set);
        self.overlaps.read(file, offset, len, now);
    }

    /// `[offset, offset + len)` of `file` was read when the file had `size` bytes: the
    /// part past them is read again shortly (see [`UNSEEN_PATIENCE_NS`]).
    pub(super) fn defer_unseen(
        &mut self,
        file: FileId,
        offset: u64,
        len: u64,
        size: u64,
        since: u64,
    ) {
        let end = offset.saturating_add(len);
        if size < end && len != u64::MAX {
            let from = size.max(offset);
            self.deferred.push(Deferred {
                file,
                offset: from,
                len: end - from,
                since,
                short: true,
                after: 0,
            });
        }
    }

    /// Whether ranges wait to be read again ([`Resolver::finish`] reads them).
    pub fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }
}

/// Appends a write of `data` at `offset`, joined to the op before it when that one
/// writes the bytes just before in the same file. A program writing a file in 4 KiB
/// pieces then costs one record, one frame entry and one `pwrite` on the replica per
/// [`READ_CHUNK`], not per piece: the result on the replica is the same, since nothing
/// lies between the two.
pub(super) fn push_write(
    out: &mut Vec<SetOp>,
    set: usize,
    path: RelPath,
    offset: u64,
    data: Vec<u8>,
) {
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

pub(super) fn write_op(set: usize, path: &RelPath, offset: u64, data: Vec<u8>) -> SetOp {
    SetOp {
        set,
        op: Op::Write {
            path: path.clone(),
            offset,
            data: data.into(),
        },
    }
}

/// Reads up to `buf.len()` bytes at `pos`; fewer only at the end of the file (or on an
/// error, which the caller's next event or comparison corrects).
pub(super) fn read_full(f: &File, buf: &mut [u8], pos: u64) -> usize {
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
pub(super) enum FallocPlan {
    Apply(Op),
    Nothing,
    RereadFromOffset,
}

pub(super) fn plan_fallocate(rel: &Path, mode: u32, offset: u64, len: u64) -> FallocPlan {
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
pub(super) fn emit_range(
    set: usize,
    abs: &Path,
    rel: &Path,
    offset: u64,
    len: u64,
    id: FileId,
    out: &mut Vec<SetOp>,
) -> Option<u64> {
    let (f, m) = open_as(abs, id)?;
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
pub(super) fn punch(
    set: usize,
    path: &RelPath,
    offset: u64,
    len: u64,
    size: u64,
    out: &mut Vec<SetOp>,
) {
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
pub(super) fn may_have_holes(f: &File, m: &Metadata) -> bool {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    m.blocks().saturating_mul(512) < m.len()
        || rustix::fs::fstatfs(f).map_or(true, |s| s.f_type as u64 != TMPFS_MAGIC)
}

/// The holes of `f` as (offset, len), in order.
pub(super) fn holes(f: &File, m: &Metadata) -> Vec<(u64, u64)> {
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
pub(super) fn next_data(f: &File, pos: u64, end: u64) -> (u64, u64) {
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
