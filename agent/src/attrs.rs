//! Reads what the replica needs besides content: permission bits, owner, times and
//! extended attributes (POSIX ACLs included), without following symlinks.

use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use doppel_common::wire::{Attr, Timestamp, Xattr, MAX_XATTR_VALUE};
use rustix::io::Errno;
use tracing::debug;

/// The attributes of an entry as `lstat` reported them.
pub fn attr_of(m: &Metadata) -> Attr {
    Attr {
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        atime: Timestamp {
            sec: m.atime(),
            nsec: m.atime_nsec() as u32,
        },
        mtime: Timestamp {
            sec: m.mtime(),
            nsec: m.mtime_nsec() as u32,
        },
    }
}

/// Every extended attribute of the entry at `path` (not following a symlink). An
/// entry that vanished or a filesystem without xattrs yields an empty list.
pub fn xattrs_of(path: &Path) -> Vec<Xattr> {
    let names = match list(path) {
        Ok(n) => n,
        Err(Errno::NOENT | Errno::NOTSUP) => return Vec::new(),
        Err(e) => {
            debug!(path = %path.display(), error = %e, "cannot list extended attributes");
            return Vec::new();
        }
    };
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        match get(path, &name) {
            Ok(value) => out.push(Xattr { name, value }),
            // Removed meanwhile: its removal is an event of its own.
            Err(Errno::NODATA | Errno::NOENT) => {}
            Err(e) => {
                debug!(path = %path.display(), error = %e, "cannot read an extended attribute")
            }
        }
    }
    out
}

fn list(path: &Path) -> Result<Vec<Vec<u8>>, Errno> {
    let mut buf = vec![0u8; 1024];
    loop {
        match rustix::fs::llistxattr(path, &mut buf[..]) {
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

fn get(path: &Path, name: &[u8]) -> Result<Vec<u8>, Errno> {
    let name = std::ffi::OsStr::from_bytes(name);
    let mut buf = vec![0u8; 256];
    loop {
        match rustix::fs::lgetxattr(path, name, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) if buf.len() < MAX_XATTR_VALUE => {
                buf.resize((buf.len() * 4).min(MAX_XATTR_VALUE), 0)
            }
            Err(e) => return Err(e),
        }
    }
}
