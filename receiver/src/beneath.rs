//! Path resolution confined to a replica root.
//!
//! Every lookup goes through `openat2(2)` with `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`
//! from a directory descriptor, so `..`, absolute symlinks, symlinks that climb out and
//! `/proc` magic links all fail with `EXDEV`/`ELOOP` inside the kernel, whatever the
//! replica contains. Syscalls that take a name (`mkdirat`, `unlinkat`, `renameat2`) only
//! ever get a single component, relative to a parent descriptor resolved this way.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

pub const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_MAGICLINKS);

/// Flags for directories we look into: O_RDONLY rather than O_PATH so that the same
/// descriptor can be fsync'ed and listed.
pub const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::CLOEXEC);

pub fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

/// `openat2` beneath `dir`. `EAGAIN` means a concurrent rename or mount raced the lookup
/// (the kernel refuses to guess); retry a few times before giving up.
pub fn open<Fd: AsFd>(dir: Fd, path: &[u8], flags: OFlags, mode: Mode) -> Result<OwnedFd, Errno> {
    let mut tries = 0;
    loop {
        match rustix::fs::openat2(dir.as_fd(), os(path), flags, mode, RESOLVE) {
            Err(Errno::AGAIN | Errno::INTR) if tries < 8 => tries += 1,
            r => return r,
        }
    }
}

/// Splits `a/b/c` into (`Some("a/b")`, `c`) and `c` into (`None`, `c`).
pub fn split(path: &[u8]) -> (Option<&[u8]>, &[u8]) {
    match path.iter().rposition(|&c| c == b'/') {
        Some(i) => (Some(&path[..i]), &path[i + 1..]),
        None => (None, path),
    }
}

/// Each prefix of `path` that names a directory: `a/b/c` -> `a`, `a/b`, `a/b/c`.
pub fn prefixes(path: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    let ends = path
        .iter()
        .enumerate()
        .filter(|&(_, &c)| c == b'/')
        .map(|(i, _)| i)
        .chain(std::iter::once(path.len()));
    let mut start = 0;
    ends.map(move |end| {
        let component = &path[start..end];
        start = end + 1;
        (&path[..end], component)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_prefixes() {
        assert_eq!(split(b"a/b/c"), (Some(&b"a/b"[..]), &b"c"[..]));
        assert_eq!(split(b"c"), (None, &b"c"[..]));
        let p: Vec<_> = prefixes(b"a/bb/c").collect();
        assert_eq!(
            p,
            vec![
                (&b"a"[..], &b"a"[..]),
                (&b"a/bb"[..], &b"bb"[..]),
                (&b"a/bb/c"[..], &b"c"[..])
            ]
        );
    }
}
