//! Applies attributes: permission bits, owner, times ([`Op::SetAttr`]) and extended
//! attributes including POSIX ACLs ([`Op::SetXattrs`]).
//!
//! Every call names the entry as (parent descriptor resolved beneath the root, single
//! component) and never follows a symlink at the final component, so an attribute op
//! cannot reach outside the replica even if the replica holds hostile symlinks.
//!
//! [`Op::SetAttr`]: doppel_common::wire::Op::SetAttr
//! [`Op::SetXattrs`]: doppel_common::wire::Op::SetXattrs

use std::collections::HashSet;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use doppel_common::wire::{Attr, RelPath, Xattr, MAX_XATTR_NAME, MAX_XATTR_VALUE};
use rustix::fs::{AtFlags, FileType, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;
use rustix::process::{Gid, Uid};

use crate::apply::{io, Applier, ApplyError, Result};
use crate::beneath::{self, os};

/// `AT_SYMLINK_NOFOLLOW` for the raw fchmodat2 call.
const AT_SYMLINK_NOFOLLOW: libc::c_int = 0x100;

impl Applier {
    pub(crate) fn set_attr(&mut self, path: &RelPath, attr: &Attr) -> Result<()> {
        let (parent, name) = beneath::split(&path.0);
        let dir = match self.dir(parent, false) {
            Ok(d) => d,
            // The entry is gone (removed by a later record of a resent batch).
            Err(Errno::NOENT | Errno::NOTDIR) => return Ok(()),
            Err(e) => return Err(io("setattr", path, e)),
        };
        let st = match rustix::fs::statat(&*dir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(()),
            Err(e) => return Err(io("setattr", path, e)),
        };
        let kind = FileType::from_raw_mode(st.st_mode);
        // Owner first: chown clears set-ID bits, which the mode below then sets. What
        // already holds is not set again (each change is a journaled inode update, and
        // a first mirror sets the attributes of every file).
        let (uid, gid) = (Uid::from_raw(attr.uid), Gid::from_raw(attr.gid));
        let chown = st.st_uid != attr.uid || st.st_gid != attr.gid;
        if chown {
            rustix::fs::chownat(
                &*dir,
                os(name),
                Some(uid),
                Some(gid),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| io("chown", path, e))?;
        }
        if kind != FileType::Symlink && (chown || st.st_mode & 0o7777 != attr.mode & 0o7777) {
            // The exact mode, set-ID bits included: a replica is a faithful copy, and a
            // set-user-ID program must stay one for a failover to work. Who may send it
            // is decided by the pinned certificates.
            chmod_nofollow(dir.as_fd(), name, attr.mode & 0o7777)
                .map_err(|e| io("chmod", path, e))?;
        }
        let ts = |t: doppel_common::wire::Timestamp| Timespec {
            tv_sec: t.sec,
            tv_nsec: t.nsec.min(999_999_999) as _,
        };
        let times = Timestamps {
            last_access: ts(attr.atime),
            last_modification: ts(attr.mtime),
        };
        rustix::fs::utimensat(&*dir, os(name), &times, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io("utimensat", path, e))?;
        // Metadata of the entry lives in the same journal transaction as its directory's
        // on the filesystems we sync (ext4, xfs): syncing the directory makes it durable.
        self.dirty.dir(&dir);
        Ok(())
    }

    pub(crate) fn set_xattrs(&mut self, path: &RelPath, xattrs: &[Xattr]) -> Result<()> {
        for x in xattrs {
            if x.name.is_empty() || x.name.len() > MAX_XATTR_NAME || x.name.contains(&0) {
                return Err(ApplyError::Refused {
                    op: "setxattr",
                    path: path.clone(),
                    why: "extended attribute name is empty, too long or contains NUL",
                });
            }
            if x.value.len() > MAX_XATTR_VALUE {
                return Err(ApplyError::Refused {
                    op: "setxattr",
                    path: path.clone(),
                    why: "extended attribute value is larger than 64 KiB",
                });
            }
        }
        if let Some(fd) = self.files.get(path) {
            // A file this batch wrote is open already: no lookup through /proc. Synced
            // whole (fsync, as directories are): its metadata changed, not its data.
            set_xattrs_fd(&fd, path, xattrs)?;
            self.dirty.dir(&fd);
            return Ok(());
        }
        let (parent, name) = beneath::split(&path.0);
        let dir = match self.dir(parent, false) {
            Ok(d) => d,
            Err(Errno::NOENT | Errno::NOTDIR) => return Ok(()),
            Err(e) => return Err(io("setxattr", path, e)),
        };
        // The directory was resolved beneath the root; through its /proc magic link the
        // l*xattr calls look up one component and do not follow it.
        let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
        p.extend_from_slice(name);
        let Ok(p) = CString::new(p) else {
            return Err(ApplyError::BadPath {
                path: path.clone(),
                err: doppel_common::wire::PathError::Nul,
            });
        };
        let current = match list_xattrs(|buf| rustix::fs::llistxattr(p.as_c_str(), buf)) {
            Ok(c) => c,
            Err(Errno::NOENT) => return Ok(()),
            Err(e) => return Err(io("listxattr", path, e)),
        };
        let wanted: HashSet<&[u8]> = xattrs.iter().map(|x| x.name.as_slice()).collect();
        for old in current.iter().filter(|n| !wanted.contains(n.as_slice())) {
            match rustix::fs::lremovexattr(p.as_c_str(), os(old)) {
                Ok(()) | Err(Errno::NODATA) => {}
                Err(e) => return Err(io("removexattr", path, e)),
            }
        }
        for x in xattrs {
            rustix::fs::lsetxattr(p.as_c_str(), os(&x.name), &x.value, XattrFlags::empty())
                .map_err(|e| io("setxattr", path, e))?;
        }
        self.dirty.dir(&dir);
        Ok(())
    }
}

/// The extended attributes of the regular file open as `fd` become `xattrs`.
fn set_xattrs_fd(fd: &OwnedFd, path: &RelPath, xattrs: &[Xattr]) -> Result<()> {
    let current =
        list_xattrs(|buf| rustix::fs::flistxattr(fd, buf)).map_err(|e| io("listxattr", path, e))?;
    let wanted: HashSet<&[u8]> = xattrs.iter().map(|x| x.name.as_slice()).collect();
    for old in current.iter().filter(|n| !wanted.contains(n.as_slice())) {
        match rustix::fs::fremovexattr(fd, os(old)) {
            Ok(()) | Err(Errno::NODATA) => {}
            Err(e) => return Err(io("removexattr", path, e)),
        }
    }
    for x in xattrs {
        rustix::fs::fsetxattr(fd, os(&x.name), &x.value, XattrFlags::empty())
            .map_err(|e| io("setxattr", path, e))?;
    }
    Ok(())
}

/// Names of the extended attributes `list` gives (llistxattr or flistxattr).
fn list_xattrs(
    list: impl Fn(&mut [u8]) -> std::result::Result<usize, Errno>,
) -> std::result::Result<Vec<Vec<u8>>, Errno> {
    let mut buf = vec![0u8; 4096];
    loop {
        match list(&mut buf[..]) {
            Ok(n) => {
                return Ok(buf[..n]
                    .split(|&c| c == 0)
                    .filter(|n| !n.is_empty())
                    .map(<[u8]>::to_vec)
                    .collect())
            }
            Err(Errno::RANGE) if buf.len() < (1 << 20) => buf.resize(buf.len() * 4, 0),
            Err(e) => return Err(e),
        }
    }
}

/// chmod without following a symlink at the final component (fchmodat2, Linux 6.6).
/// Older kernels lack it; the caller has just checked the entry is not a symlink, and
/// only the receiver itself changes the replica, so plain fchmodat is the fallback.
fn chmod_nofollow(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> std::result::Result<(), Errno> {
    let c = CString::new(name).map_err(|_| Errno::INVAL)?;
    // SAFETY: valid descriptor and NUL-terminated name for the duration of the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fchmodat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            mode as libc::mode_t,
            AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        return Ok(());
    }
    match Errno::from_raw_os_error(std::io::Error::last_os_error().raw_os_error().unwrap_or(0)) {
        Errno::NOSYS => rustix::fs::chmodat(
            dir,
            os(name),
            rustix::fs::Mode::from_bits_truncate(mode),
            AtFlags::empty(),
        ),
        e => Err(e),
    }
}
