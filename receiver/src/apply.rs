//! Applies [`Op`]s beneath one replica root.
//!
//! [`Applier`] is plain synchronous code over a directory descriptor: no sockets, no
//! async, so it is unit-tested in a temporary directory and run on a blocking thread by
//! the session. Every path is validated ([`RelPath::validate`]) and then resolved with
//! [`beneath`](crate::beneath), never by string concatenation onto the root.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use doppel_common::wire::{sums, Attr, Op, PathError, RelPath, ORPHANS_DIR};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

use crate::beneath::{self, os, DIR_FLAGS};
use crate::compare::{add_range, dataless, differing, fine_sums, Blocks};
use crate::dirty::Dirty;
use crate::fdcache::FdCache;

/// Open files kept per replica root.
const FD_CACHE: usize = 16;
/// Deepest directory tree `Rmdir` walks into (each level holds a descriptor).
const MAX_RMDIR_DEPTH: usize = 256;
/// Mode of directories created because a path needed them.
const PARENT_MODE: u32 = 0o755;
/// Mode of files created by `Write`/`Truncate` (the source's real mode arrives with a
/// `CreateFile` when it created the file).
pub(crate) const FILE_MODE: u32 = 0o644;
/// Files are created without set-user/group-ID: a file is never set-ID while its
/// content is still arriving. The source's exact mode, set-ID bits included, comes with
/// the `SetAttr` sent after the content. Directories may keep set-group-ID (group
/// inheritance) from the start.
pub(crate) const FILE_MODE_MASK: u32 = 0o1777;
const DIR_MODE_MASK: u32 = 0o3777;
/// How replica files are opened. Read-write: `Sum` reads through the same cached
/// descriptors. O_NOFOLLOW: a symlink at the final component is never written through.
/// O_NONBLOCK: a FIFO planted on the replica fails instead of hanging the session.
const FILE_FLAGS: OFlags = OFlags::RDWR
    .union(OFlags::NOFOLLOW)
    .union(OFlags::NONBLOCK)
    .union(OFlags::CLOEXEC);

/// The answer to a `Sum` that found differences (see `Frame::Need`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    pub job: u64,
    pub file: [u64; 2],
    pub path: RelPath,
    pub ranges: Vec<(u64, u64)>,
    /// See `Frame::Need::fine`.
    pub fine: Vec<Vec<u64>>,
    pub missing: bool,
    pub attr: bool,
    /// See `Frame::Need::listing` and `Frame::Need::extra`.
    pub listing: bool,
    pub extra: bool,
}

/// Why an op was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("refused path {path}: {err}")]
    BadPath { path: RelPath, err: PathError },
    #[error("{op} {path}: {}{}", .errno, hint(*.errno))]
    Io {
        op: &'static str,
        path: RelPath,
        errno: Errno,
    },
    #[error("{op} {path}: not a regular file on the replica")]
    NotRegular { op: &'static str, path: RelPath },
    #[error("{op} {path}: refused: {why}")]
    Refused {
        op: &'static str,
        path: RelPath,
        why: &'static str,
    },
    #[error("sum {path}: {why}")]
    BadSum { path: RelPath, why: String },
    #[error("rename {from} -> {to}: unsupported flags {flags:#x} (only RENAME_NOREPLACE and RENAME_EXCHANGE)")]
    RenameFlags {
        from: RelPath,
        to: RelPath,
        flags: u32,
    },
}

fn hint(e: Errno) -> &'static str {
    match e {
        Errno::XDEV | Errno::LOOP => {
            " (refused: the path leaves the replica root or goes through a symlink)"
        }
        _ => "",
    }
}

impl ApplyError {
    /// Errors of the target host itself (full disk, I/O error, no memory or descriptors)
    /// rather than of the op: applying later may succeed, so the session ends without
    /// acknowledging the op and the agent resends it after reconnecting. Everything else
    /// is specific to the op and would fail again; it is logged and skipped.
    pub fn is_fatal(&self) -> bool {
        match self {
            ApplyError::Io { errno, .. } => matches!(
                *errno,
                Errno::IO
                    | Errno::NOSPC
                    | Errno::DQUOT
                    | Errno::ROFS
                    | Errno::NOMEM
                    | Errno::MFILE
                    | Errno::NFILE
                    | Errno::NOBUFS
                    | Errno::STALE
                    | Errno::UCLEAN
                    | Errno::AGAIN
                    | Errno::BADF
            ),
            _ => false,
        }
    }
}

/// Applies ops beneath one replica root.
///
/// An applier is one thread's context: its descriptor cache and dirty set are its own.
/// [`fork`](Applier::fork) makes another context over the same root for a worker thread
/// and [`absorb`](Applier::absorb) takes its cache and dirty set back, so that data ops
/// on different files can be applied in parallel (see `set.rs`).
pub struct Applier {
    root: Arc<OwnedFd>,
    root_path: PathBuf,
    pub(crate) files: FdCache,
    pub(crate) dirty: Dirty,
    /// Answers to `Sum` ops, for the session to send (see [`Applier::take_needs`]).
    needs: Vec<Need>,
    /// Test-only fault injection: an op touching one of these paths fails with the errno.
    #[cfg(test)]
    pub(crate) faults: Arc<std::sync::Mutex<Vec<(RelPath, Errno)>>>,
}

pub(crate) type Result<T> = std::result::Result<T, ApplyError>;

impl Applier {
    /// Opens the replica root, creating it (mode 0755) if missing. The root itself comes
    /// from the receiver's config and is trusted; everything beneath it is not.
    pub fn open(root: &Path) -> anyhow::Result<Applier> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(PARENT_MODE)
            .create(root)
            .with_context(|| format!("cannot create replica root {}", root.display()))?;
        let fd = rustix::fs::open(root, DIR_FLAGS, Mode::empty())
            .with_context(|| format!("cannot open replica root {}", root.display()))?;
        Ok(Applier {
            root: Arc::new(fd),
            root_path: root.to_path_buf(),
            files: FdCache::new(FD_CACHE),
            dirty: Dirty::default(),
            needs: Vec::new(),
            #[cfg(test)]
            faults: Default::default(),
        })
    }

    /// With `durable` false (the receiver's `fsync = false`) nothing is held for syncing.
    pub fn durable(mut self, durable: bool) -> Applier {
        self.dirty = Dirty::new(durable);
        self
    }

    /// Another context over the same root, with an empty cache and dirty set. It must
    /// only be given data ops (`Write`, `Truncate`, `CreateFile`) on paths no other
    /// context touches meanwhile, and be [`absorb`](Applier::absorb)ed afterwards.
    pub fn fork(&self) -> Applier {
        Applier {
            root: self.root.clone(),
            root_path: self.root_path.clone(),
            files: FdCache::new(FD_CACHE),
            dirty: self.dirty.emptied(),
            needs: Vec::new(),
            #[cfg(test)]
            faults: self.faults.clone(),
        }
    }

    /// Takes a forked context back: what it made dirty is synced with ours, and its open
    /// descriptors join our cache (the oldest are evicted above the cache size).
    pub fn absorb(&mut self, other: Applier) {
        self.dirty.merge(other.dirty);
        self.needs.extend(other.needs);
        for (path, fd) in other.files.into_entries() {
            self.files.insert(path, fd);
        }
    }

    /// Removes `path`'s cached descriptor, to hand it to the context that will write
    /// the file next (see [`cache_file`](Applier::cache_file)).
    pub fn take_cached(&mut self, path: &RelPath) -> Option<Arc<OwnedFd>> {
        self.files.take(path)
    }

    /// Caches a descriptor taken from another context with
    /// [`take_cached`](Applier::take_cached).
    pub fn cache_file(&mut self, path: RelPath, fd: Arc<OwnedFd>) {
        self.files.insert(path, fd);
    }

    pub fn root(&self) -> &Path {
        &self.root_path
    }

    /// Descriptors touched since the last call, to be synced before the applied
    /// sequence number is persisted.
    pub fn take_dirty(&mut self) -> Dirty {
        let fresh = self.dirty.emptied();
        std::mem::replace(&mut self.dirty, fresh)
    }

    /// Answers of the `Sum` ops applied since the last call.
    pub fn take_needs(&mut self) -> Vec<Need> {
        std::mem::take(&mut self.needs)
    }

    pub fn apply(&mut self, op: &Op) -> Result<()> {
        for p in op.paths() {
            p.validate().map_err(|err| ApplyError::BadPath {
                path: p.clone(),
                err,
            })?;
        }
        #[cfg(test)]
        if let Some(e) = self.injected(op) {
            return Err(e);
        }
        match op {
            Op::Write { path, offset, data } => self.write(path, *offset, data),
            Op::Truncate { path, size } => self.truncate(path, *size),
            Op::CreateFile { path, mode } => self.create_file(path, *mode),
            Op::Mkdir { path, mode } => self.mkdir(path, *mode),
            Op::Remove { path } => self.remove(path),
            Op::Rmdir { path } => self.rmdir(path),
            Op::Rename { from, to, flags } => self.rename(from, to, *flags),
            Op::Prune { dir, keep } => self.prune(dir.as_ref(), keep, None),
            Op::PruneAside { dir, keep, batch } => self.prune(dir.as_ref(), keep, Some(*batch)),
            Op::List { dir, keep, job } => self.list(dir.as_ref(), keep, *job),
            // Ordering only (see set.rs).
            Op::Barrier => Ok(()),
            Op::SetAttr { path, attr } => self.set_attr(path, attr),
            Op::SetXattrs { path, xattrs } => self.set_xattrs(path, xattrs),
            Op::Link { from, to } => self.link(from, to),
            Op::Symlink { path, target } => self.symlink(path, target),
            Op::Mknod { path, mode, .. } => self.mknod(path, *mode),
            Op::Fallocate {
                path,
                mode,
                offset,
                len,
            } => self.fallocate(path, *mode, *offset, *len),
            Op::Sum {
                path,
                job,
                file,
                size,
                offset,
                block,
                sums,
                attr,
            } => {
                let blocks = Blocks {
                    size: *size,
                    offset: *offset,
                    block: *block,
                    sums,
                };
                self.sum(path, *job, *file, &blocks, attr.as_ref())
            }
        }
    }

    /// Compares the replica's file with the source's blocks; remembers an answer when
    /// something differs. Changes nothing.
    fn sum(
        &mut self,
        path: &RelPath,
        job: u64,
        file: [u64; 2],
        b: &Blocks,
        attr: Option<&Attr>,
    ) -> Result<()> {
        sums::check(b.size, b.offset, b.block, b.sums.len()).map_err(|why| ApplyError::BadSum {
            path: path.clone(),
            why,
        })?;
        let mut need = Need {
            job,
            file,
            path: path.clone(),
            ranges: Vec::new(),
            fine: Vec::new(),
            missing: false,
            attr: false,
            listing: false,
            extra: false,
        };
        let fd = match self.file_if_any(path) {
            Ok(fd) => fd,
            Err(Errno::NOENT | Errno::NOTDIR | Errno::ISDIR | Errno::LOOP | Errno::NXIO) => {
                need.missing = true;
                add_range(&mut need.ranges, b.offset, b.size - b.offset);
                self.needs.push(need);
                return Ok(());
            }
            Err(e) => return Err(io("sum", path, e)),
        };
        let st = rustix::fs::fstat(&*fd).map_err(|e| io("sum", path, e))?;
        let target_size = st.st_size as u64;
        if job == sums::LAYOUT_JOB {
            if !b.sums.is_empty() {
                return Err(ApplyError::BadSum {
                    path: path.clone(),
                    why: "a layout question carries no checksums".into(),
                });
            }
            need.ranges = dataless(&*fd, target_size, b.offset, b.size, b.block)
                .map_err(|e| io("sum", path, e))?;
            self.needs.push(need); // always answered, even when it is empty
            return Ok(());
        }
        need.ranges = differing(&*fd, target_size, b).map_err(|e| io("sum", path, e))?;
        // The run that ends the file also reports a longer replica's extra bytes; one
        // without blocks compares the sizes only.
        let end = b.offset + b.sums.len() as u64 * b.block as u64;
        if b.sums.is_empty() {
            let (lo, hi) = (target_size.min(b.size), target_size.max(b.size));
            add_range(&mut need.ranges, lo, hi - lo);
        } else if end >= b.size && target_size > b.size {
            add_range(&mut need.ranges, b.size, target_size - b.size);
        }
        // The mirror sends what differs: a finer look saves sending whole blocks for a
        // few changed bytes. A verify only reports.
        if job == 0 {
            need.fine =
                fine_sums(&*fd, target_size, &need.ranges).map_err(|e| io("sum", path, e))?;
        }
        if let Some(a) = attr {
            need.attr = st.st_mode & 0o7777 != a.mode
                || st.st_uid != a.uid
                || st.st_gid != a.gid
                || st.st_mtime != a.mtime.sec
                || st.st_mtime_nsec as u32 != a.mtime.nsec;
        }
        if !need.ranges.is_empty() || need.attr {
            self.needs.push(need);
        }
        Ok(())
    }

    /// The regular file at `path` if there is one (never created), opened afresh: what
    /// a comparison reads must be what the path names now, even if something else
    /// replaced or removed the file behind a cached descriptor (which is then dropped,
    /// so that a repair writes where the path leads).
    fn file_if_any(&mut self, path: &RelPath) -> std::result::Result<Arc<OwnedFd>, Errno> {
        let found = beneath::open(&*self.root, &path.0, FILE_FLAGS, Mode::empty()).and_then(|fd| {
            let st = rustix::fs::fstat(&fd)?;
            if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
                return Err(Errno::NXIO);
            }
            Ok((fd, (st.st_dev, st.st_ino)))
        });
        let cached = self
            .files
            .get(path)
            .and_then(|fd| rustix::fs::fstat(&*fd).ok())
            .map(|st| (st.st_dev, st.st_ino));
        match found {
            Ok((fd, id)) => {
                if cached.is_some_and(|c| c != id) {
                    self.files.invalidate(path);
                }
                Ok(Arc::new(fd))
            }
            Err(e) => {
                self.files.invalidate(path);
                Err(e)
            }
        }
    }

    #[cfg(test)]
    fn injected(&self, op: &Op) -> Option<ApplyError> {
        let faults = self.faults.lock().unwrap();
        op.paths().find_map(|p| {
            faults
                .iter()
                .find(|(f, _)| f == p)
                .map(|&(_, errno)| io("injected", p, errno))
        })
    }

    /// Removes the entries of `dir` not in `keep`, or with `aside` moves them beneath
    /// `ORPHANS_DIR/<aside>/<dir>/`.
    fn prune(&mut self, dir: Option<&RelPath>, keep: &[RelPath], aside: Option<u64>) -> Result<()> {
        let Some((fd, doomed)) = self.unkept(dir, keep, "prune")? else {
            return Ok(()); // nothing there, nothing to prune
        };
        for n in doomed {
            let full = child(dir, &n);
            self.files.invalidate(&full);
            if let Some(batch) = aside {
                self.move_aside(&fd, dir, &n, batch, &full)?;
                continue;
            }
            match remove_tree(fd.as_fd(), &n, 0) {
                // Not a directory: unlink it.
                Err(Errno::NOTDIR) => rustix::fs::unlinkat(&*fd, os(&n), AtFlags::empty())
                    .or_else(|e| if e == Errno::NOENT { Ok(()) } else { Err(e) })
                    .map_err(|e| io("prune", &full, e))?,
                Ok(()) | Err(Errno::NOENT) => {}
                Err(e) => return Err(io("prune", &full, e)),
            }
            self.dirty.dir(&fd);
        }
        Ok(())
    }

    /// Verify: answers every entry of `dir` not in `keep`, or that the replica has no
    /// directory at `dir`. Changes nothing.
    fn list(&mut self, dir: Option<&RelPath>, keep: &[RelPath], job: u64) -> Result<()> {
        let answer = |path: RelPath, extra: bool| Need {
            job,
            file: [0, 0],
            path,
            ranges: Vec::new(),
            fine: Vec::new(),
            missing: !extra,
            attr: false,
            listing: true,
            extra,
        };
        let Some((_, extra)) = self.unkept(dir, keep, "list")? else {
            // (The root is always there: this applier holds it open.)
            if let Some(d) = dir {
                self.needs.push(answer(d.clone(), false));
            }
            return Ok(());
        };
        for n in extra {
            self.needs.push(answer(child(dir, &n), true));
        }
        Ok(())
    }

    /// The open directory `dir` and its entries not in `keep` (never `ORPHANS_DIR` at
    /// the root), or `None` if the replica has no directory there.
    fn unkept(
        &mut self,
        dir: Option<&RelPath>,
        keep: &[RelPath],
        op: &'static str,
    ) -> Result<Option<Unkept>> {
        let shown = dir.cloned().unwrap_or_else(|| RelPath(b".".to_vec()));
        for k in keep {
            k.validate_name().map_err(|err| ApplyError::BadPath {
                path: k.clone(),
                err,
            })?;
        }
        let keep: std::collections::HashSet<&[u8]> = keep.iter().map(|k| k.0.as_slice()).collect();
        let fd = match self.dir(dir.map(|d| d.0.as_slice()), false) {
            Ok(d) => d,
            // (LOOP: a symlink there, never followed.)
            Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => return Ok(None),
            Err(e) => return Err(io(op, &shown, e)),
        };
        let mut unkept = Vec::new();
        let listing = rustix::fs::Dir::read_from(&*fd).map_err(|e| io(op, &shown, e))?;
        for entry in listing {
            let entry = entry.map_err(|e| io(op, &shown, e))?;
            let n = entry.file_name().to_bytes();
            let quarantine = dir.is_none() && n == ORPHANS_DIR.as_bytes();
            if n != b"." && n != b".." && !keep.contains(n) && !quarantine {
                unkept.push(n.to_vec());
            }
        }
        unkept.sort();
        Ok(Some((fd, unkept)))
    }

    /// Moves entry `name` of `dir` (open as `fd`) to `ORPHANS_DIR/<batch>/<dir>/`, under
    /// a numbered name if an earlier orphan of this batch has its name.
    fn move_aside(
        &mut self,
        fd: &Arc<OwnedFd>,
        dir: Option<&RelPath>,
        name: &[u8],
        batch: u64,
        full: &RelPath,
    ) -> Result<()> {
        let mut into = format!("{ORPHANS_DIR}/{batch}").into_bytes();
        if let Some(d) = dir {
            into.push(b'/');
            into.extend_from_slice(&d.0);
        }
        let shown = RelPath(into.clone());
        let to = self
            .dir(Some(&into), true)
            .map_err(|e| io("move aside", &shown, e))?;
        for n in 0u32.. {
            let dest = match n {
                0 => name.to_vec(),
                n => [name, format!(".{n}").as_bytes()].concat(),
            };
            match rustix::fs::renameat_with(
                &**fd,
                os(name),
                &*to,
                os(&dest),
                RenameFlags::NOREPLACE,
            ) {
                Ok(()) => break,
                Err(Errno::EXIST) if n < 1000 => continue,
                Err(Errno::NOENT) => return Ok(()), // gone meanwhile
                Err(e) => return Err(io("move aside", full, e)),
            }
        }
        self.dirty.dir(fd);
        self.dirty.dir(&to);
        Ok(())
    }

    fn write(&mut self, path: &RelPath, offset: u64, mut data: &[u8]) -> Result<()> {
        let fd = self.file(path, FILE_MODE, "write")?;
        let mut off = offset;
        while !data.is_empty() {
            match rustix::io::pwrite(&*fd, data, off) {
                Ok(0) => return Err(io("write", path, Errno::IO)),
                Ok(n) => {
                    data = &data[n..];
                    off += n as u64;
                }
                Err(Errno::INTR) => {}
                Err(e) => return Err(io("write", path, e)),
            }
        }
        self.dirty.file(&fd);
        Ok(())
    }

    fn truncate(&mut self, path: &RelPath, size: u64) -> Result<()> {
        let fd = self.file(path, FILE_MODE, "truncate")?;
        // A file already that long, with nothing allocated past its end, is left alone:
        // a file sent whole ends with a cut to the size it was written to, and a
        // truncate is a journaled inode update even when it changes nothing. (A cut to
        // the same size does free blocks allocated past the end, fallocate's KEEP_SIZE:
        // then it is made.)
        let now = rustix::fs::fstat(&*fd).map_err(|e| io("truncate", path, e))?;
        let allocated = now.st_blocks as u64 * 512;
        let blk = (now.st_blksize as u64).max(512);
        if now.st_size as u64 != size || allocated > size.div_ceil(blk) * blk {
            rustix::fs::ftruncate(&*fd, size).map_err(|e| io("truncate", path, e))?;
            self.dirty.file(&fd);
        }
        Ok(())
    }

    fn fallocate(&mut self, path: &RelPath, mode: u32, offset: u64, len: u64) -> Result<()> {
        use doppel_common::wire::falloc::{KEEP_SIZE, PUNCH_HOLE, REPLICATED, ZERO_RANGE};
        // Collapse and insert range shift the file's contents; the agent sends the
        // shifted bytes instead, so they never arrive here.
        if mode & !REPLICATED != 0 {
            return Err(ApplyError::Refused {
                op: "fallocate",
                path: path.clone(),
                why: "only plain, keep-size, punch-hole and zero-range modes are replicated",
            });
        }
        let fd = self.file(path, FILE_MODE, "fallocate")?;
        let flags = rustix::fs::FallocateFlags::from_bits_truncate(mode);
        match rustix::fs::fallocate(&*fd, flags, offset, len) {
            Ok(()) => {}
            // The replica's filesystem lacks the mode: do what it means with writes.
            Err(Errno::OPNOTSUPP) => {
                let size = rustix::fs::fstat(&*fd)
                    .map_err(|e| io("fallocate", path, e))?
                    .st_size as u64;
                let end = offset.saturating_add(len);
                if mode & (PUNCH_HOLE | ZERO_RANGE) != 0 {
                    let zeros = vec![0u8; 1 << 16];
                    let mut pos = offset;
                    let stop = if mode & KEEP_SIZE != 0 {
                        end.min(size)
                    } else {
                        end
                    };
                    while pos < stop {
                        let n = ((stop - pos) as usize).min(zeros.len());
                        self.write(path, pos, &zeros[..n])?;
                        pos += n as u64;
                    }
                }
                if mode & KEEP_SIZE == 0 && end > size {
                    rustix::fs::ftruncate(&*fd, end).map_err(|e| io("fallocate", path, e))?;
                }
            }
            Err(e) => return Err(io("fallocate", path, e)),
        }
        self.dirty.file(&fd);
        Ok(())
    }

    /// Makes sure a regular file exists at `path`. A directory there is replaced: the
    /// source replaced it by this file (see `mkdir` for the converse).
    fn create_file(&mut self, path: &RelPath, mode: u32) -> Result<()> {
        match self.file(path, mode, "create") {
            Err(ApplyError::Io {
                errno: Errno::ISDIR,
                ..
            }) => {
                let (parent, name) = beneath::split(&path.0);
                let dir = self.dir(parent, true).map_err(|e| io("create", path, e))?;
                self.files.invalidate(path);
                match remove_tree(dir.as_fd(), name, 0) {
                    Ok(()) | Err(Errno::NOENT) => {}
                    Err(e) => return Err(io("create", path, e)),
                }
                self.dirty.dir(&dir);
                self.file(path, mode, "create").map(drop)
            }
            r => r.map(drop),
        }
    }

    /// An open, writable descriptor of the regular file at `path`, created (with its
    /// missing parents) if needed.
    pub(crate) fn file(
        &mut self,
        path: &RelPath,
        mode: u32,
        op: &'static str,
    ) -> Result<Arc<OwnedFd>> {
        if let Some(fd) = self.files.get(path) {
            return Ok(fd);
        }
        let flags = FILE_FLAGS;
        let fd = match beneath::open(&*self.root, &path.0, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => {
                let (parent, name) = beneath::split(&path.0);
                let dir = self.dir(parent, true).map_err(|e| io(op, path, e))?;
                let mode = Mode::from_bits_truncate(mode & FILE_MODE_MASK);
                let fd = beneath::open(&*dir, name, flags | OFlags::CREATE, mode)
                    .map_err(|e| io(op, path, e))?;
                self.dirty.dir(&dir);
                fd
            }
            Err(e) => return Err(io(op, path, e)),
        };
        // Device nodes and sockets must not be written to, even if they got there.
        let st = rustix::fs::fstat(&fd).map_err(|e| io(op, path, e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(ApplyError::NotRegular {
                op,
                path: path.clone(),
            });
        }
        let fd = Arc::new(fd);
        self.files.insert(path.clone(), fd.clone());
        Ok(fd)
    }

    /// The directory `path` (`None` = the root), creating missing components (mode 0755)
    /// if `create`.
    pub(crate) fn dir(
        &mut self,
        path: Option<&[u8]>,
        create: bool,
    ) -> std::result::Result<Arc<OwnedFd>, Errno> {
        let Some(path) = path else {
            return Ok(self.root.clone());
        };
        match beneath::open(&*self.root, path, DIR_FLAGS, Mode::empty()) {
            Err(Errno::NOENT) if create => {}
            r => return r.map(Arc::new),
        }
        // Slow path: walk down, creating what is missing. Each prefix is resolved from the
        // root again (not from its parent) so that a symlink staying inside the replica
        // behaves as it does for every other lookup.
        let mut parent = self.root.clone();
        for (prefix, name) in beneath::prefixes(path) {
            let fd = match beneath::open(&*self.root, prefix, DIR_FLAGS, Mode::empty()) {
                Err(Errno::NOENT) => {
                    match rustix::fs::mkdirat(
                        &*parent,
                        os(name),
                        Mode::from_bits_truncate(PARENT_MODE),
                    ) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(e),
                    }
                    self.dirty.dir(&parent);
                    beneath::open(&*self.root, prefix, DIR_FLAGS, Mode::empty())?
                }
                r => r?,
            };
            parent = Arc::new(fd);
        }
        Ok(parent)
    }

    fn mkdir(&mut self, path: &RelPath, mode: u32) -> Result<()> {
        let (parent, name) = beneath::split(&path.0);
        let dir = self.dir(parent, true).map_err(|e| io("mkdir", path, e))?;
        let mode = Mode::from_bits_truncate(mode & DIR_MODE_MASK);
        match rustix::fs::mkdirat(&*dir, os(name), mode) {
            Ok(()) => {
                self.dirty.dir(&dir);
                Ok(())
            }
            Err(Errno::EXIST) => {
                let st = rustix::fs::statat(&*dir, os(name), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| io("mkdir", path, e))?;
                if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                    return Ok(());
                }
                // The source replaced a file by a directory (RENAME_EXCHANGE, or records
                // a killed agent never sent): the directory wins, as on the source.
                self.files.invalidate(path);
                rustix::fs::unlinkat(&*dir, os(name), AtFlags::empty())
                    .map_err(|e| io("mkdir", path, e))?;
                rustix::fs::mkdirat(&*dir, os(name), mode).map_err(|e| io("mkdir", path, e))?;
                self.dirty.dir(&dir);
                Ok(())
            }
            Err(e) => Err(io("mkdir", path, e)),
        }
    }

    fn remove(&mut self, path: &RelPath) -> Result<()> {
        self.files.invalidate(path);
        let (parent, name) = beneath::split(&path.0);
        let dir = match self.dir(parent, false) {
            Ok(d) => d,
            // No parent, no file: a resend of an applied removal.
            Err(Errno::NOENT | Errno::NOTDIR) => return Ok(()),
            Err(e) => return Err(io("remove", path, e)),
        };
        match rustix::fs::unlinkat(&*dir, os(name), AtFlags::empty()) {
            Ok(()) => {
                self.dirty.dir(&dir);
                Ok(())
            }
            Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(io("remove", path, e)),
        }
    }

    fn rmdir(&mut self, path: &RelPath) -> Result<()> {
        self.files.invalidate(path);
        let (parent, name) = beneath::split(&path.0);
        let dir = match self.dir(parent, false) {
            Ok(d) => d,
            Err(Errno::NOENT | Errno::NOTDIR) => return Ok(()),
            Err(e) => return Err(io("rmdir", path, e)),
        };
        match remove_tree(dir.as_fd(), name, 0) {
            Ok(()) => {
                self.dirty.dir(&dir);
                Ok(())
            }
            Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(io("rmdir", path, e)),
        }
    }

    fn rename(&mut self, from: &RelPath, to: &RelPath, flags: u32) -> Result<()> {
        let allowed = RenameFlags::NOREPLACE | RenameFlags::EXCHANGE;
        let rflags = RenameFlags::from_bits(flags)
            .filter(|f| allowed.contains(*f))
            .ok_or_else(|| ApplyError::RenameFlags {
                from: from.clone(),
                to: to.clone(),
                flags,
            })?;
        self.files.invalidate(from);
        self.files.invalidate(to);
        let (fparent, fname) = beneath::split(&from.0);
        let (tparent, tname) = beneath::split(&to.0);
        let fdir = match self.dir(fparent, false) {
            Ok(d) => d,
            // The source is gone: this rename was applied before (a resend).
            Err(Errno::NOENT) => return Ok(()),
            Err(e) => return Err(io("rename", from, e)),
        };
        let tdir = self.dir(tparent, true).map_err(|e| io("rename", to, e))?;
        match rustix::fs::renameat_with(&*fdir, os(fname), &*tdir, os(tname), rflags) {
            Ok(()) => {
                self.dirty.dir(&fdir);
                self.dirty.dir(&tdir);
                Ok(())
            }
            Err(Errno::NOENT) => {
                tracing::debug!(%from, %to, "rename source missing; treating as applied before");
                Ok(())
            }
            Err(e) => Err(io("rename", from, e)),
        }
    }
}

/// Removes `name` in `parent` and everything beneath it, without following symlinks
/// (a symlink is unlinked, never descended into).
pub(crate) fn remove_tree(
    parent: std::os::fd::BorrowedFd<'_>,
    name: &[u8],
    depth: usize,
) -> std::result::Result<(), Errno> {
    match rustix::fs::unlinkat(parent, os(name), AtFlags::REMOVEDIR) {
        Ok(()) => return Ok(()),
        Err(Errno::NOTEMPTY | Errno::EXIST) => {}
        Err(e) => return Err(e),
    }
    if depth >= MAX_RMDIR_DEPTH {
        return Err(Errno::NAMETOOLONG);
    }
    let flags = DIR_FLAGS | OFlags::NOFOLLOW;
    let dir = beneath::open(parent, name, flags, Mode::empty())?;
    // Read the whole listing first: deleting while iterating getdents may skip entries.
    let mut entries = Vec::new();
    for entry in rustix::fs::Dir::read_from(&dir)? {
        let entry = entry?;
        let n = entry.file_name().to_bytes();
        if n != b"." && n != b".." {
            entries.push((n.to_vec(), entry.file_type()));
        }
    }
    for (n, ty) in entries {
        let ty = match ty {
            FileType::Unknown => {
                let st = rustix::fs::statat(&dir, os(&n), AtFlags::SYMLINK_NOFOLLOW)?;
                FileType::from_raw_mode(st.st_mode)
            }
            t => t,
        };
        let r = if ty == FileType::Directory {
            remove_tree(dir.as_fd(), &n, depth + 1)
        } else {
            rustix::fs::unlinkat(&dir, os(&n), AtFlags::empty())
        };
        match r {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(e) => return Err(e),
        }
    }
    rustix::fs::unlinkat(parent, os(name), AtFlags::REMOVEDIR)
}

/// An open directory of the replica and the names in it that the source lacks.
type Unkept = (Arc<OwnedFd>, Vec<Vec<u8>>);

/// Entry `name` of directory `dir` (`None`: the root).
fn child(dir: Option<&RelPath>, name: &[u8]) -> RelPath {
    match dir {
        Some(d) => RelPath([d.0.as_slice(), b"/", name].concat()),
        None => RelPath(name.to_vec()),
    }
}

pub(crate) fn io(op: &'static str, path: &RelPath, errno: Errno) -> ApplyError {
    ApplyError::Io {
        op,
        path: path.clone(),
        errno,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn p(s: &str) -> RelPath {
        RelPath(s.as_bytes().to_vec())
    }

    fn setup() -> (tempfile::TempDir, Applier) {
        let d = tempfile::tempdir().unwrap();
        let a = Applier::open(&d.path().join("replica")).unwrap();
        (d, a)
    }

    /// A replica holding `files` (each holds its own path as data) and `link`, a
    /// symlink to `outside/` (holding `keep-me`), a directory beside the replica.
    fn populated(files: &[&str]) -> (tempfile::TempDir, Applier, PathBuf) {
        let (d, mut a) = setup();
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep-me"), b"x").unwrap();
        for f in files {
            a.apply(&Op::Write {
                path: p(f),
                offset: 0,
                data: f.as_bytes().to_vec().into(),
            })
            .unwrap();
        }
        std::os::unix::fs::symlink(&outside, a.root().join("link")).unwrap();
        (d, a, outside)
    }

    fn write(path: &str, offset: u64, data: &[u8]) -> Op {
        Op::Write {
            path: p(path),
            offset,
            data: data.to_vec().into(),
        }
    }

    #[test]
    fn write_creates_parents_and_writes_at_offset() {
        let (_d, mut a) = setup();
        a.apply(&write("a/b/c.txt", 0, b"hello")).unwrap();
        a.apply(&write("a/b/c.txt", 6, b"world")).unwrap();
        let f = a.root().join("a/b/c.txt");
        assert_eq!(fs::read(&f).unwrap(), b"hello\0world");
        assert_eq!(
            fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert!(!a.take_dirty().is_empty());
        assert!(a.take_dirty().is_empty());
    }

    #[test]
    fn truncate_and_create_file() {
        let (_d, mut a) = setup();
        a.apply(&write("f", 0, b"0123456789")).unwrap();
        a.apply(&Op::Truncate {
            path: p("f"),
            size: 4,
        })
        .unwrap();
        assert_eq!(fs::read(a.root().join("f")).unwrap(), b"0123");
        a.apply(&Op::Truncate {
            path: p("new/g"),
            size: 3,
        })
        .unwrap();
        assert_eq!(fs::read(a.root().join("new/g")).unwrap(), b"\0\0\0");
        a.apply(&Op::CreateFile {
            path: p("h"),
            mode: 0o4755,
        })
        .unwrap();
        let mode = fs::metadata(a.root().join("h"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7000, 0, "set-user-ID must be stripped");
        // CreateFile on an existing file keeps its content (no O_EXCL, no O_TRUNC).
        a.apply(&Op::CreateFile {
            path: p("f"),
            mode: 0o644,
        })
        .unwrap();
        assert_eq!(fs::read(a.root().join("f")).unwrap(), b"0123");
    }

    /// A cut to the size a file has changes nothing (no inode update), except that it
    /// frees what fallocate's KEEP_SIZE allocated past the end, as on the source.
    #[test]
    fn a_cut_to_the_same_size_is_skipped_unless_blocks_lie_past_the_end() {
        use std::os::unix::fs::MetadataExt;
        let (_d, mut a) = setup();
        a.apply(&write("f", 0, b"0123456789")).unwrap();
        let f = a.root().join("f");
        let before = fs::metadata(&f).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let cut = Op::Truncate {
            path: p("f"),
            size: 10,
        };
        a.apply(&cut).unwrap();
        let after = fs::metadata(&f).unwrap();
        assert_eq!(
            (after.ctime(), after.ctime_nsec()),
            (before.ctime(), before.ctime_nsec()),
            "nothing was changed"
        );
        a.apply(&Op::Fallocate {
            path: p("f"),
            mode: doppel_common::wire::falloc::KEEP_SIZE,
            offset: 0,
            len: 1 << 20,
        })
        .unwrap();
        assert!(fs::metadata(&f).unwrap().blocks() * 512 >= 1 << 20);
        a.apply(&cut).unwrap();
        let m = fs::metadata(&f).unwrap();
        assert!(m.blocks() * 512 < 1 << 20, "{} blocks", m.blocks());
        assert_eq!(fs::read(&f).unwrap(), b"0123456789");
    }

    #[test]
    fn mkdir_is_idempotent_and_replaces_a_file() {
        let (_d, mut a) = setup();
        a.apply(&Op::Mkdir {
            path: p("x/y"),
            mode: 0o750,
        })
        .unwrap();
        a.apply(&Op::Mkdir {
            path: p("x/y"),
            mode: 0o750,
        })
        .unwrap();
        assert!(a.root().join("x/y").is_dir());
        a.apply(&write("file", 0, b"")).unwrap();
        a.apply(&Op::Mkdir {
            path: p("file"),
            mode: 0o755,
        })
        .unwrap();
        assert!(a.root().join("file").is_dir());
        // And the converse: a file made where the replica has a directory.
        a.apply(&write("x/y/inner", 0, b"abc")).unwrap();
        a.apply(&Op::CreateFile {
            path: p("x"),
            mode: 0o644,
        })
        .unwrap();
        assert!(a.root().join("x").is_file());
    }

    #[test]
    fn remove_and_rmdir_tolerate_missing() {
        let (_d, mut a) = setup();
        a.apply(&write("d/e/f", 0, b"x")).unwrap();
        a.apply(&write("d/g", 0, b"x")).unwrap();
        std::os::unix::fs::symlink("/etc", a.root().join("d/e/link")).unwrap();
        a.apply(&Op::Remove { path: p("d/g") }).unwrap();
        assert!(!a.root().join("d/g").exists());
        a.apply(&Op::Remove { path: p("d/g") }).unwrap();
        a.apply(&Op::Remove { path: p("nope/g") }).unwrap();
        a.apply(&Op::Rmdir { path: p("d") }).unwrap();
        assert!(!a.root().join("d").exists());
        assert!(
            Path::new("/etc/passwd").exists(),
            "rmdir must not follow symlinks"
        );
        a.apply(&Op::Rmdir { path: p("d") }).unwrap();
        // The cached descriptor of d/e/f is gone: a new write creates a new file.
        a.apply(&write("d/e/f", 0, b"y")).unwrap();
        assert_eq!(fs::read(a.root().join("d/e/f")).unwrap(), b"y");
    }

    #[test]
    fn rename_moves_and_tolerates_resend() {
        let (_d, mut a) = setup();
        a.apply(&write("a", 0, b"1")).unwrap();
        let op = Op::Rename {
            from: p("a"),
            to: p("sub/b"),
            flags: 0,
        };
        a.apply(&op).unwrap();
        assert_eq!(fs::read(a.root().join("sub/b")).unwrap(), b"1");
        a.apply(&op).unwrap(); // resend: `a` is gone
                               // The cache must not send this write to the renamed inode.
        a.apply(&write("a", 0, b"2")).unwrap();
        assert_eq!(fs::read(a.root().join("a")).unwrap(), b"2");
        assert_eq!(fs::read(a.root().join("sub/b")).unwrap(), b"1");
        let bad = Op::Rename {
            from: p("a"),
            to: p("c"),
            flags: 4, // RENAME_WHITEOUT
        };
        assert!(matches!(a.apply(&bad), Err(ApplyError::RenameFlags { .. })));
        let noreplace = Op::Rename {
            from: p("a"),
            to: p("sub/b"),
            flags: 1,
        };
        let e = a.apply(&noreplace).unwrap_err();
        assert!(!e.is_fatal(), "{e}");
    }

    #[test]
    fn attributes_links_and_nodes_never_reach_outside_the_replica() {
        use doppel_common::wire::{Attr, Timestamp, Xattr};
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        fs::write(&outside, b"secret").unwrap();
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o600)).unwrap();
        let before = fs::metadata(&outside).unwrap();
        let mut a = Applier::open(&d.path().join("replica")).unwrap();
        // A peer makes symlinks pointing out (allowed: the target is only stored)...
        a.apply(&Op::Symlink {
            path: p("out"),
            target: outside.as_os_str().as_encoded_bytes().to_vec(),
        })
        .unwrap();
        a.apply(&Op::Symlink {
            path: p("up"),
            target: b"../outside".to_vec(),
        })
        .unwrap();
        // ...then tries to change what they point to.
        let attr = Attr {
            mode: 0o4777,
            uid: 1234,
            gid: 1234,
            atime: Timestamp { sec: 1, nsec: 0 },
            mtime: Timestamp { sec: 1, nsec: 0 },
        };
        for link in ["out", "up"] {
            a.apply(&Op::SetAttr {
                path: p(link),
                attr,
            })
            .unwrap();
            let _ = a.apply(&Op::SetXattrs {
                path: p(link),
                xattrs: vec![Xattr {
                    name: b"user.x".to_vec(),
                    value: b"v".to_vec(),
                }],
            });
            assert!(a.apply(&write(link, 0, b"pwned")).is_err());
            assert!(a
                .apply(&Op::Fallocate {
                    path: p(link),
                    mode: 0x03,
                    offset: 0,
                    len: 6,
                })
                .is_err());
        }
        // The symlinks themselves got the owner and times; the outside file nothing.
        let l = fs::symlink_metadata(a.root().join("out")).unwrap();
        assert_eq!((l.uid(), l.mtime()), (1234, 1));
        let after = fs::metadata(&outside).unwrap();
        assert_eq!(after.mode(), before.mode());
        assert_eq!((after.uid(), after.mtime()), (before.uid(), before.mtime()));
        assert_eq!(fs::read(&outside).unwrap(), b"secret");
        assert!(xattr_names(&outside).is_empty());
        // A hard link of a symlink links the symlink, not what it points to.
        a.apply(&Op::Link {
            from: p("up"),
            to: p("up2"),
        })
        .unwrap();
        assert!(fs::symlink_metadata(a.root().join("up2"))
            .unwrap()
            .file_type()
            .is_symlink());
        // Device nodes are never made; FIFOs are.
        let e = a
            .apply(&Op::Mknod {
                path: p("sda"),
                mode: 0o060600,
                rdev: 0x800,
            })
            .unwrap_err();
        assert!(!e.is_fatal(), "{e}");
        assert!(!a.root().join("sda").exists());
        a.apply(&Op::Mknod {
            path: p("fifo"),
            mode: 0o010640,
            rdev: 0,
        })
        .unwrap();
        assert!(fs::symlink_metadata(a.root().join("fifo"))
            .unwrap()
            .file_type()
            .is_fifo());
    }

    fn xattr_names(p: &Path) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        let n = rustix::fs::listxattr(p, &mut buf[..]).unwrap_or(0);
        buf.truncate(n);
        buf
    }

    #[test]
    fn hostile_paths_are_refused_and_nothing_escapes() {
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let mut a = Applier::open(&d.path().join("replica")).unwrap();
        std::os::unix::fs::symlink(&outside, a.root().join("evil")).unwrap();
        std::os::unix::fs::symlink("../outside/file", a.root().join("evil_file")).unwrap();
        std::os::unix::fs::symlink("/proc/self/root", a.root().join("magic")).unwrap();
        let hostile = [
            write("../x", 0, b"x"),
            write("/etc/x", 0, b"x"),
            write("a/../../x", 0, b"x"),
            write("evil/passwd", 0, b"x"),
            write("evil/new/deeper", 0, b"x"),
            write("evil_file", 0, b"x"),
            write("magic/tmp/x", 0, b"x"),
            Op::Truncate {
                path: p("evil/t"),
                size: 1,
            },
            Op::CreateFile {
                path: p("evil/c"),
                mode: 0o644,
            },
            Op::Mkdir {
                path: p("evil/dir"),
                mode: 0o755,
            },
            Op::Rename {
                from: p("evil_file"),
                to: p("evil/moved"),
                flags: 0,
            },
        ];
        for op in &hostile {
            let e = a.apply(op).unwrap_err();
            assert!(!e.is_fatal(), "{op:?}: {e}");
        }
        // Remove/Rmdir through the symlink must not touch the outside either.
        fs::write(outside.join("keep"), b"k").unwrap();
        let _ = a.apply(&Op::Remove {
            path: p("evil/keep"),
        });
        let _ = a.apply(&Op::Rmdir { path: p("evil") });
        assert_eq!(fs::read(outside.join("keep")).unwrap(), b"k");
        let left: Vec<_> = fs::read_dir(&outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("keep")]);
        assert!(!d.path().join("x").exists());
    }

    #[test]
    fn special_files_are_not_written() {
        let (_d, mut a) = setup();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            a.root().join("fifo"),
            FileType::Fifo,
            Mode::from_bits_truncate(0o644),
            0,
        )
        .unwrap();
        let e = a.apply(&write("fifo", 0, b"x")).unwrap_err();
        assert!(!e.is_fatal(), "{e}");
    }

    #[test]
    fn prune_aside_moves_orphans_under_their_batch_and_never_touches_the_quarantine() {
        // A symlink orphan is moved as a link: what it points to stays put.
        let (_d, mut a, outside) = populated(&["a", "d/x", "d/y"]);
        let aside = |dir: Option<&str>, keep: &[&str], batch| Op::PruneAside {
            dir: dir.map(p),
            keep: keep.iter().map(|k| p(k)).collect(),
            batch,
        };
        a.apply(&aside(Some("d"), &["x"], 7)).unwrap();
        a.apply(&aside(None, &["d"], 7)).unwrap();
        let q = a.root().join(ORPHANS_DIR).join("7");
        assert_eq!(std::fs::read(q.join("d/y")).unwrap(), b"d/y");
        assert_eq!(std::fs::read(q.join("a")).unwrap(), b"a");
        assert!(std::fs::symlink_metadata(q.join("link"))
            .unwrap()
            .is_symlink());
        assert!(outside.exists());
        assert!(!a.root().join("a").exists() && a.root().join("d/x").exists());
        // The same name again in the same batch: numbered, not overwritten.
        a.apply(&Op::Write {
            path: p("a"),
            offset: 0,
            data: b"again".to_vec().into(),
        })
        .unwrap();
        a.apply(&aside(None, &["d"], 7)).unwrap();
        assert_eq!(std::fs::read(q.join("a.1")).unwrap(), b"again");
        // A plain prune at the root leaves the quarantine alone too.
        a.apply(&Op::Prune {
            dir: None,
            keep: vec![],
        })
        .unwrap();
        assert!(q.join("a").exists() && !a.root().join("d").exists());
    }

    #[test]
    fn prune_removes_what_is_not_kept_and_only_beneath_the_root() {
        let (_d, mut a, outside) = populated(&["a", "b", "d/x", "d/y"]);
        a.apply(&Op::Prune {
            dir: Some(p("d")),
            keep: vec![p("x")],
        })
        .unwrap();
        assert!(a.root().join("d/x").exists() && !a.root().join("d/y").exists());
        a.apply(&Op::Prune {
            dir: None,
            keep: vec![p("a"), p("d")],
        })
        .unwrap();
        let mut left: Vec<_> = std::fs::read_dir(a.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, vec!["a", "d"]);
        assert!(
            outside.join("keep-me").exists(),
            "a symlink is unlinked, never followed"
        );
        for bad in ["..", "a/b", ""] {
            assert!(a
                .apply(&Op::Prune {
                    dir: None,
                    keep: vec![p(bad)]
                })
                .is_err());
        }
        assert!(a
            .apply(&Op::Prune {
                dir: Some(p("../outside")),
                keep: vec![]
            })
            .is_err());
        assert!(outside.join("keep-me").exists());
    }

    #[test]
    fn list_answers_what_the_source_does_not_have_and_changes_nothing() {
        let quarantined = format!("{ORPHANS_DIR}/1/z");
        let (_d, mut a, _) = populated(&["a", "b", "d/x", "d/y", &quarantined]);
        let list = |dir: Option<&str>, keep: &[&str]| Op::List {
            dir: dir.map(p),
            keep: keep.iter().map(|k| p(k)).collect(),
            job: 7,
        };
        a.apply(&list(None, &["a", "d"])).unwrap();
        a.apply(&list(Some("d"), &["x", "y"])).unwrap();
        let needs = a.take_needs();
        let extra: Vec<_> = needs.iter().map(|n| n.path.to_string()).collect();
        assert_eq!(extra, vec!["b", "link"], "the quarantine is never reported");
        assert!(needs
            .iter()
            .all(|n| n.listing && n.extra && n.job == 7 && !n.missing));
        // A directory the replica lacks, or has a file or a symlink at, is missing.
        for dir in ["nowhere", "a", "d/x"] {
            a.apply(&list(Some(dir), &["q"])).unwrap();
            let needs = a.take_needs();
            assert_eq!(needs.len(), 1, "{dir}");
            let n = &needs[0];
            assert!(
                n.listing && n.missing && !n.extra && n.path == p(dir),
                "{n:?}"
            );
        }
        assert!(a.root().join("b").exists() && a.root().join("link").exists());
        // Confined like every op, and never followed out of the root.
        let through = a.apply(&list(Some("link"), &[]));
        assert!(through.is_err_and(|e| !e.is_fatal()));
        assert!(a.take_needs().is_empty(), "a symlink is not listed through");
        assert!(a.apply(&list(Some("../outside"), &[])).is_err());
        assert!(a.apply(&list(None, &["a/b"])).is_err());
    }
}
