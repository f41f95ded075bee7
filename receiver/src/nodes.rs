//! Applies the entries that are not plain files or directories: hard links
//! ([`Op::Link`]), symlinks ([`Op::Symlink`]) and FIFOs/sockets ([`Op::Mknod`]; its
//! `rdev` only matters for device nodes, which are refused).
//!
//! Each replaces what the target name held (a resent record finds its own result there
//! and leaves it). A symlink's target is stored, never resolved: every other lookup of
//! the receiver refuses to leave the replica root through it.
//!
//! [`Op::Link`]: doppel_common::wire::Op::Link
//! [`Op::Symlink`]: doppel_common::wire::Op::Symlink
//! [`Op::Mknod`]: doppel_common::wire::Op::Mknod

use std::os::fd::{AsFd, BorrowedFd};

use doppel_common::wire::{RelPath, MAX_SYMLINK};
use rustix::fs::{AtFlags, FileType, Mode};
use rustix::io::Errno;

use crate::apply::{io, remove_tree, Applier, ApplyError, Result, FILE_MODE_MASK};
use crate::beneath::{self, os};

impl Applier {
    pub(crate) fn link(&mut self, from: &RelPath, to: &RelPath) -> Result<()> {
        self.files.invalidate(to);
        let (fparent, fname) = beneath::split(&from.0);
        let (tparent, tname) = beneath::split(&to.0);
        let fdir = match self.dir(fparent, false) {
            Ok(d) => d,
            // The original is gone: a later record of this resend removed it, and the
            // records after it recreate whatever `to` must be.
            Err(Errno::NOENT | Errno::NOTDIR) => return Ok(()),
            Err(e) => return Err(io("link", from, e)),
        };
        let tdir = self.dir(tparent, true).map_err(|e| io("link", to, e))?;
        let src = match rustix::fs::statat(&*fdir, os(fname), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(()),
            Err(e) => return Err(io("link", from, e)),
        };
        if FileType::from_raw_mode(src.st_mode) == FileType::Directory {
            return Err(ApplyError::Refused {
                op: "link",
                path: from.clone(),
                why: "a directory cannot be hard-linked",
            });
        }
        if let Ok(dst) = rustix::fs::statat(&*tdir, os(tname), AtFlags::SYMLINK_NOFOLLOW) {
            if dst.st_dev == src.st_dev && dst.st_ino == src.st_ino {
                return Ok(());
            }
            clear(tdir.as_fd(), tname).map_err(|e| io("link", to, e))?;
        }
        rustix::fs::linkat(&*fdir, os(fname), &*tdir, os(tname), AtFlags::empty())
            .map_err(|e| io("link", to, e))?;
        self.dirty.dir(&tdir);
        Ok(())
    }

    pub(crate) fn symlink(&mut self, path: &RelPath, target: &[u8]) -> Result<()> {
        if target.is_empty() || target.len() > MAX_SYMLINK || target.contains(&0) {
            return Err(ApplyError::Refused {
                op: "symlink",
                path: path.clone(),
                why: "symlink target is empty, longer than 4096 bytes or contains NUL",
            });
        }
        self.files.invalidate(path);
        let (parent, name) = beneath::split(&path.0);
        let dir = self.dir(parent, true).map_err(|e| io("symlink", path, e))?;
        if let Ok(st) = rustix::fs::statat(&*dir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
            if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
                let buf = Vec::with_capacity(target.len() + 1);
                if rustix::fs::readlinkat(&*dir, os(name), buf)
                    .is_ok_and(|cur| cur.as_bytes() == target)
                {
                    return Ok(());
                }
            }
            clear(dir.as_fd(), name).map_err(|e| io("symlink", path, e))?;
        }
        rustix::fs::symlinkat(os(target), &*dir, os(name)).map_err(|e| io("symlink", path, e))?;
        self.dirty.dir(&dir);
        Ok(())
    }

    pub(crate) fn mknod(&mut self, path: &RelPath, mode: u32) -> Result<()> {
        let kind = FileType::from_raw_mode(mode);
        if !matches!(kind, FileType::Fifo | FileType::Socket) {
            // A device node on the replica would open the target host's devices to
            // whoever can reach the replica: never created from the network.
            return Err(ApplyError::Refused {
                op: "mknod",
                path: path.clone(),
                why: "only FIFOs and sockets are replicated, not device nodes",
            });
        }
        self.files.invalidate(path);
        let (parent, name) = beneath::split(&path.0);
        let dir = self.dir(parent, true).map_err(|e| io("mknod", path, e))?;
        if let Ok(st) = rustix::fs::statat(&*dir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
            if FileType::from_raw_mode(st.st_mode) == kind {
                return Ok(());
            }
            clear(dir.as_fd(), name).map_err(|e| io("mknod", path, e))?;
        }
        let perm = Mode::from_bits_truncate(mode & FILE_MODE_MASK);
        rustix::fs::mknodat(&*dir, os(name), kind, perm, 0).map_err(|e| io("mknod", path, e))?;
        self.dirty.dir(&dir);
        Ok(())
    }
}

/// Removes whatever `name` in `dir` is (a directory with its contents), so that a new
/// entry can take the name.
fn clear(dir: BorrowedFd<'_>, name: &[u8]) -> std::result::Result<(), Errno> {
    match rustix::fs::unlinkat(dir, os(name), AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(Errno::ISDIR | Errno::PERM) => match remove_tree(dir, name, 0) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    }
}
