//! Namespace and size changes: creating opens, `mkdir`, `unlink`/`rmdir`, `rename`,
//! `truncate`, `ftruncate`.
//!
//! fd-based events (creating/truncating opens, `ftruncate`) are filtered exactly like
//! data: the file's directory must be CONTENTS-watched. Path-based events cannot be
//! resolved cheaply in the kernel, so an absolute path is always reported (user space
//! decides), and a relative one only when its base directory (dirfd or cwd) is watched.
//! Attribute calls through `/proc/self/fd/N` are the exception: they are reported as
//! the fd-based calls they are (see `proc_fd_path`).

use aya_ebpf::helpers::generated::{
    bpf_probe_read_kernel, bpf_probe_read_kernel_str, bpf_probe_read_user, bpf_probe_read_user_str,
};
use doppel_common::abi::{
    Header, KFileId, NsRecord, PathSlot, ATTR_NOFOLLOW, ATTR_XATTR, AT_REMOVEDIR, KIND_ATTR,
    KIND_FALLOC, KIND_FTRUNCATE, KIND_LINK, KIND_MADE, KIND_MAPPED, KIND_MKDIR, KIND_OPEN,
    KIND_RENAME, KIND_TRUNCATE, KIND_UNLINK, NS_RECORD_SIZE, O_CREAT, O_TRUNC, PATH_CAP,
    STAT_EVENTS, STAT_LOST,
};

use crate::{
    kernel::{
        arg, base_dir, fd_file, file_parent, in_compat_syscall, inode_ptr, linked_inode, off,
        regular_inode, rk, tgid, AT_FDCWD,
    },
    maps::{bump, contents_watched, ignored, output, scratch, watch_flags},
    syscalls,
};

const O_WRONLY: u32 = 0o1;

/// Reads a user value (for `struct open_how`).
#[inline(always)]
fn read_user_u64(addr: u64) -> Option<u64> {
    let mut v: u64 = 0;
    // SAFETY: destination is a local u64.
    let r = unsafe {
        bpf_probe_read_user(
            &mut v as *mut u64 as *mut core::ffi::c_void,
            8,
            addr as *const core::ffi::c_void,
        )
    };
    (r == 0).then_some(v)
}

/// Resets the fixed part of the record in the scratch buffer.
#[inline(always)]
unsafe fn init(rec: *mut NsRecord, kind: u32, pid: u32) {
    *rec = NsRecord {
        hdr: Header {
            kind,
            pid,
            ktime: aya_ebpf::helpers::bpf_ktime_get_ns(),
        },
        ..NsRecord::default()
    };
}

/// The entry behind `file` (a `struct file *`), if its directory is CONTENTS-watched:
/// (its id, the directory's id). With `regular_only`, only a regular file counts.
#[inline(always)]
fn watched_file(file: u64, regular_only: bool) -> Option<(KFileId, KFileId)> {
    let parent = file_parent(file)?;
    let watched = contents_watched(&parent);
    let inode = if regular_only {
        regular_inode(file)?
    } else {
        inode_ptr(file)?
    };
    // A hard-linked file of a set, through a name outside (only regular files are
    // listed, so anything else just misses the lookup).
    if !watched && !linked_inode(inode) {
        return None;
    }
    let ino = rk::<u64>(inode + off::OFF_INODE_I_INO())?;
    Some((
        KFileId {
            dev: parent.dev,
            ino,
        },
        parent,
    ))
}

/// [`watched_file`] for a just-returned or argument fd.
#[inline(always)]
fn watched_entry(fd: u64, regular_only: bool) -> Option<(KFileId, KFileId)> {
    watched_file(fd_file(fd)?, regular_only)
}

/// Reads the first byte of a user string (0 for an empty one, `None` if unreadable).
#[inline(always)]
fn first_byte(addr: u64) -> Option<u8> {
    if addr == 0 {
        return None;
    }
    let mut b: u8 = 0;
    // SAFETY: destination is a local byte.
    let r = unsafe {
        bpf_probe_read_user(
            &mut b as *mut u8 as *mut core::ffi::c_void,
            1,
            addr as *const core::ffi::c_void,
        )
    };
    (r == 0).then_some(b)
}

/// Where a path argument's string is: in the caller's memory (a syscall argument) or in
/// the kernel's (an io_uring request's `struct filename`, copied at submission).
#[derive(Clone, Copy)]
pub enum PathStr {
    User(u64),
    Kernel(u64),
}

impl PathStr {
    #[inline(always)]
    unsafe fn read_str(self, dst: *mut u8) -> i64 {
        match self {
            PathStr::User(p) => bpf_probe_read_user_str(
                dst as *mut core::ffi::c_void,
                PATH_CAP as u32,
                p as *const core::ffi::c_void,
            ),
            PathStr::Kernel(p) => bpf_probe_read_kernel_str(
                dst as *mut core::ffi::c_void,
                PATH_CAP as u32,
                p as *const core::ffi::c_void,
            ),
        }
    }

    /// The byte at `off` (for the truncation check).
    #[inline(always)]
    unsafe fn byte_at(self, off: u64) -> u8 {
        let mut b: u8 = 1;
        let dst = &mut b as *mut u8 as *mut core::ffi::c_void;
        match self {
            PathStr::User(p) => {
                bpf_probe_read_user(dst, 1, (p + off) as *const core::ffi::c_void);
            }
            PathStr::Kernel(p) => {
                bpf_probe_read_kernel(dst, 1, (p + off) as *const core::ffi::c_void);
            }
        }
        b
    }
}

/// Copies path argument `path` into slot `i` (0 or 1) of the record and fills its
/// header. Returns (bytes copied, whether the path passes the filter).
#[inline(always)]
unsafe fn fill_path(
    s: *mut u8,
    rec: *mut NsRecord,
    i: usize,
    dirfd: i32,
    path: PathStr,
) -> (u64, bool) {
    let dst = s.add(NS_RECORD_SIZE + i * PATH_CAP);
    let r = path.read_str(dst);
    let mut slot = PathSlot {
        dirfd,
        ..PathSlot::default()
    };
    let mut len: u64 = 0;
    if r <= 0 {
        // Unreadable path (not resident): report it empty and truncated.
        slot.truncated = 1;
    } else {
        // r counts the NUL; mask so the verifier sees the bound.
        len = ((r - 1) as u64) & (PATH_CAP as u64 - 1);
        // The buffer is full: truncated unless the NUL sits exactly at the end.
        if r as usize == PATH_CAP && path.byte_at(PATH_CAP as u64 - 1) != 0 {
            slot.truncated = 1;
        }
    }
    slot.len = len as u16;
    let absolute = len > 0 && *dst == b'/';
    let mut relevant = absolute;
    if !absolute {
        if let Some(base) = base_dir(dirfd) {
            slot.has_base = 1;
            slot.base = base;
            relevant = watch_flags(&base) != 0;
        }
    }
    (*rec).paths[i] = slot;
    (len, relevant)
}

/// Builds a one-path record in the scratch buffer `s`; returns its length if the path
/// passes the filter.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub unsafe fn one_path(
    s: *mut u8,
    kind: u32,
    pid: u32,
    dirfd: i32,
    path: PathStr,
    flags: u32,
    mode: u32,
    size: u64,
) -> Option<u64> {
    let rec = s as *mut NsRecord;
    init(rec, kind, pid);
    (*rec).flags = flags;
    (*rec).mode = mode;
    (*rec).size = size;
    (*rec).npaths = 1;
    let (len, relevant) = fill_path(s, rec, 0, dirfd, path);
    relevant.then_some(NS_RECORD_SIZE as u64 + len)
}

/// Builds a two-path record (rename, link) in `s`; returns its length if either path
/// passes the filter.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub unsafe fn two_paths(
    s: *mut u8,
    kind: u32,
    pid: u32,
    d0: i32,
    p0: PathStr,
    d1: i32,
    p1: PathStr,
    flags: u32,
) -> Option<u64> {
    let rec = s as *mut NsRecord;
    init(rec, kind, pid);
    (*rec).flags = flags;
    (*rec).npaths = 2;
    let (_, rel0) = fill_path(s, rec, 0, d0, p0);
    let (len1, rel1) = fill_path(s, rec, 1, d1, p1);
    (rel0 || rel1).then_some((NS_RECORD_SIZE + PATH_CAP) as u64 + len1)
}

#[inline(always)]
fn send(s: *mut u8, len: u64) {
    if output(s, len) {
        bump(STAT_EVENTS, 1);
    } else {
        // A namespace change cannot be remembered as a byte range: count it lost so
        // the agent resyncs.
        bump(STAT_LOST, 1);
    }
}

/// open/openat/openat2/creat returned the fd `fd`.
#[inline(always)]
pub fn on_open(regs: u64, nr: u64, fd: u64) {
    let (dirfd, path, flags, mode) = match nr {
        syscalls::OPEN => (
            AT_FDCWD,
            arg(regs, 0),
            arg(regs, 1) as u32,
            arg(regs, 2) as u32,
        ),
        syscalls::OPENAT => (
            arg(regs, 0) as i32,
            arg(regs, 1),
            arg(regs, 2) as u32,
            arg(regs, 3) as u32,
        ),
        syscalls::CREAT => (
            AT_FDCWD,
            arg(regs, 0),
            O_CREAT | O_WRONLY | O_TRUNC,
            arg(regs, 1) as u32,
        ),
        _ => {
            // openat2(dirfd, path, struct open_how *how, size): how = {u64 flags; u64 mode; ..}
            let how = arg(regs, 2);
            let Some(flags) = read_user_u64(how) else {
                return;
            };
            let mode = read_user_u64(how + 8).unwrap_or(0);
            (arg(regs, 0) as i32, arg(regs, 1), flags as u32, mode as u32)
        }
    };
    // Most opens neither create nor truncate: leave before any pointer walk.
    if flags & (O_CREAT | O_TRUNC) == 0 {
        return;
    }
    let Some((file, parent)) = watched_entry(fd, true) else {
        return;
    };
    let pid = tgid();
    if ignored(pid) || in_compat_syscall() {
        return;
    }
    let Some(s) = scratch() else {
        bump(STAT_LOST, 1);
        return;
    };
    let rec = s as *mut NsRecord;
    // SAFETY: `s` is the per-CPU scratch value (MAX_RECORD_SIZE bytes, 8-aligned).
    unsafe {
        init(rec, KIND_OPEN, pid);
        (*rec).flags = flags;
        (*rec).mode = mode;
        (*rec).file = file;
        (*rec).parent = parent;
        (*rec).npaths = 1;
        let (len, _) = fill_path(s, rec, 0, dirfd, PathStr::User(path));
        send(s, NS_RECORD_SIZE as u64 + len);
    }
}

/// A path-less record about the entry behind `fd` (ftruncate, fallocate, fd-based
/// attribute calls), if it passes the filter: regular files only unless
/// `regular_only` is false (an fchmod on a directory counts too).
#[inline(always)]
fn fd_record(fd: u64, regular_only: bool, kind: u32, flags: u32, offset: u64, size: u64) {
    let Some(file) = fd_file(fd) else {
        return;
    };
    if in_compat_syscall() {
        return;
    }
    file_record(file, regular_only, kind, flags, offset, size);
}

/// A path-less record about `file` (a `struct file *`): [`fd_record`]'s body, and what
/// io_uring completions report (see `uring.rs`).
#[inline(always)]
pub fn file_record(file: u64, regular_only: bool, kind: u32, flags: u32, offset: u64, size: u64) {
    let Some((file, parent)) = watched_file(file, regular_only) else {
        return;
    };
    // Sizes, allocation and mappings of a file on a filesystem the bitmap covers are
    // reported inside it (fs_meta.rs), whatever door the call came in by.
    if matches!(kind, KIND_FTRUNCATE | KIND_FALLOC | KIND_MAPPED) && crate::fs::covers(&file) {
        return;
    }
    let pid = tgid();
    if ignored(pid) {
        return;
    }
    let Some(s) = scratch() else {
        bump(STAT_LOST, 1);
        return;
    };
    let rec = s as *mut NsRecord;
    // SAFETY: scratch value, see on_open.
    unsafe {
        init(rec, kind, pid);
        (*rec).file = file;
        (*rec).parent = parent;
        (*rec).flags = flags;
        (*rec).offset = offset;
        (*rec).size = size;
    }
    send(s, NS_RECORD_SIZE as u64);
}

/// ftruncate(fd, length) succeeded.
#[inline(always)]
pub fn on_ftruncate(regs: u64) {
    fd_record(arg(regs, 0), true, KIND_FTRUNCATE, 0, 0, arg(regs, 1));
}

/// mmap(addr, len, prot, flags, fd, offset) succeeded: a shared mapping of a file that
/// can be stored through (now, or after an mprotect since the file is open read-write).
#[inline(always)]
pub fn on_mmap(regs: u64) {
    const PROT_WRITE: u64 = 0x2;
    const MAP_TYPE: u64 = 0x0f;
    const MAP_SHARED: u64 = 0x01;
    const MAP_SHARED_VALIDATE: u64 = 0x03;
    const O_ACCMODE: u32 = 0o3;
    const O_RDWR: u32 = 0o2;
    let flags = arg(regs, 3) & MAP_TYPE;
    if flags != MAP_SHARED && flags != MAP_SHARED_VALIDATE {
        return;
    }
    let fd = arg(regs, 4);
    let Some(file) = fd_file(fd) else {
        return;
    };
    if arg(regs, 2) & PROT_WRITE == 0 {
        let f_flags = rk::<u32>(file + off::OFF_FILE_F_FLAGS()).unwrap_or(0);
        if f_flags & O_ACCMODE != O_RDWR {
            return;
        }
    }
    if in_compat_syscall() {
        return;
    }
    file_record(file, true, KIND_MAPPED, 0, arg(regs, 5), arg(regs, 1));
}

/// fallocate(fd, mode, offset, len) succeeded.
#[inline(always)]
pub fn on_fallocate(regs: u64) {
    let (mode, offset, len) = (arg(regs, 1) as u32, arg(regs, 2), arg(regs, 3));
    fd_record(arg(regs, 0), true, KIND_FALLOC, mode, offset, len);
}

/// An fd-based attribute change (fchmod, fchown, fsetxattr, fremovexattr, and the *at
/// calls given AT_EMPTY_PATH or a NULL path).
#[inline(always)]
fn attr_fd(fd: u64, flags: u32) {
    fd_record(fd, false, KIND_ATTR, flags, 0, 0);
}

/// A path-based attribute change of `path` relative to `dirfd`.
#[inline(always)]
fn attr_path(dirfd: i32, path: u64, flags: u32) {
    let pid = tgid();
    if ignored(pid) || in_compat_syscall() {
        return;
    }
    let Some(s) = scratch() else {
        bump(STAT_LOST, 1);
        return;
    };
    // SAFETY: scratch value, see on_open.
    if let Some(len) =
        unsafe { one_path(s, KIND_ATTR, pid, dirfd, PathStr::User(path), flags, 0, 0) }
    {
        send(s, len);
    }
}

const AT_SYMLINK_NOFOLLOW: u64 = 0x100;
const AT_EMPTY_PATH: u64 = 0x1000;

/// chmod/chown/utimes/xattr families succeeded.
#[inline(always)]
pub fn on_attr(regs: u64, nr: u64) {
    use syscalls::*;
    let nofollow = |f: u64| {
        if f & AT_SYMLINK_NOFOLLOW != 0 {
            ATTR_NOFOLLOW
        } else {
            0
        }
    };
    // (dirfd, path, flags, at-flags) of the *at calls; fd-only calls return early.
    let (dirfd, path, flags, at_flags) = match nr {
        FCHMOD | FCHOWN => return attr_fd(arg(regs, 0), 0),
        FSETXATTR | FREMOVEXATTR => return attr_fd(arg(regs, 0), ATTR_XATTR),
        CHMOD | CHOWN | UTIME | UTIMES => (AT_FDCWD, arg(regs, 0), 0, 0),
        LCHOWN => (AT_FDCWD, arg(regs, 0), ATTR_NOFOLLOW, 0),
        SETXATTR | REMOVEXATTR => (AT_FDCWD, arg(regs, 0), ATTR_XATTR, 0),
        LSETXATTR | LREMOVEXATTR => (AT_FDCWD, arg(regs, 0), ATTR_XATTR | ATTR_NOFOLLOW, 0),
        FCHMODAT | FUTIMESAT => (arg(regs, 0) as i32, arg(regs, 1), 0, 0),
        FCHOWNAT => {
            let f = arg(regs, 4);
            (arg(regs, 0) as i32, arg(regs, 1), nofollow(f), f)
        }
        FCHMODAT2 | UTIMENSAT => {
            let f = arg(regs, 3);
            (arg(regs, 0) as i32, arg(regs, 1), nofollow(f), f)
        }
        // SETXATTRAT | REMOVEXATTRAT
        _ => {
            let f = arg(regs, 2);
            (
                arg(regs, 0) as i32,
                arg(regs, 1),
                ATTR_XATTR | nofollow(f),
                f,
            )
        }
    };
    // utimensat(fd, NULL, ..) is futimens; an empty path with AT_EMPTY_PATH names the
    // dirfd itself.
    let fd_itself = if nr == UTIMENSAT && path == 0 {
        true
    } else {
        at_flags & AT_EMPTY_PATH != 0 && first_byte(path) == Some(0)
    };
    if fd_itself {
        attr_fd(dirfd as u64, flags);
        return;
    }
    match proc_fd_path(path) {
        Some((fd, 0)) => attr_fd(fd, flags),
        Some((fd, rest)) => attr_path(fd as i32, rest, flags),
        None => attr_path(dirfd, path, flags),
    }
}

/// Reads up to `N` bytes of the user string at `addr` (NUL-terminated, zero-padded).
#[inline(always)]
fn user_bytes<const N: usize>(addr: u64) -> Option<[u8; N]> {
    let mut buf = [0u8; N];
    // SAFETY: the destination is the local buffer, of the size given.
    let r = unsafe {
        bpf_probe_read_user_str(
            buf.as_mut_ptr() as *mut core::ffi::c_void,
            N as u32,
            addr as *const core::ffi::c_void,
        )
    };
    (r > 0).then_some(buf)
}

/// A path through the caller's own descriptor table, `/proc/self/fd/N` or
/// `/proc/thread-self/fd/N` (optionally followed by `/rest`): (N, 0) when it names fd
/// N's file itself, (N, address of `rest`) when it goes on from fd N's directory.
///
/// tar and glibc set attributes this way (`chmod("/proc/self/fd/5")` on an `O_PATH`
/// descriptor, closed right after): user space could only read the link from
/// `/proc/PID/fd/N` later, by which time the descriptor is closed or names another
/// file, and the change was lost or applied to the wrong entry. Which file the
/// descriptor names is certain only now, while the syscall returns.
///
/// Compared a word at a time: a byte loop with a flag per prefix made the verifier
/// walk too many states.
#[inline(always)]
fn proc_fd_path(path: u64) -> Option<(u64, u64)> {
    const PROC_SE: u64 = u64::from_le_bytes(*b"/proc/se");
    const LF_FD: u64 = u64::from_le_bytes(*b"lf/fd/\0\0");
    const PROC_TH: u64 = u64::from_le_bytes(*b"/proc/th");
    const READ_SEL: u64 = u64::from_le_bytes(*b"read-sel");
    const F_FD: u64 = u64::from_le_bytes(*b"f/fd/\0\0\0");
    const SIX: u64 = (1 << 48) - 1;
    const FIVE: u64 = (1 << 40) - 1;
    if path == 0 {
        return None;
    }
    // The string read ends with its NUL inside the buffer: 24 bytes hold the longer
    // prefix (21).
    let head = user_bytes::<24>(path)?;
    let word = |i: usize| {
        u64::from_le_bytes([
            head[i],
            head[i + 1],
            head[i + 2],
            head[i + 3],
            head[i + 4],
            head[i + 5],
            head[i + 6],
            head[i + 7],
        ])
    };
    let (w0, w1) = (word(0), word(8));
    let start: u64 = if w0 == PROC_SE && w1 & SIX == LF_FD {
        14
    } else if w0 == PROC_TH && w1 == READ_SEL && word(16) & FIVE == F_FD {
        21
    } else {
        return None;
    };
    // Up to ten digits, then the NUL or a '/' (11 characters and the read's NUL).
    let digits = user_bytes::<12>(path + start)?;
    let mut fd: u64 = 0;
    let mut n: u64 = 0;
    for &c in digits.iter() {
        if !c.is_ascii_digit() {
            if n == 0 || fd > i32::MAX as u64 {
                return None;
            }
            return match c {
                0 => Some((fd, 0)),
                b'/' => Some((fd, path + start + n + 1)),
                _ => None,
            };
        }
        fd = fd * 10 + (c - b'0') as u64;
        n += 1;
    }
    None
}

/// truncate, mkdir(at), unlink(at), rmdir, rename(at/at2), link(at), symlink(at),
/// mknod(at) succeeded.
#[inline(always)]
pub fn on_path_op(regs: u64, nr: u64) {
    let pid = tgid();
    if ignored(pid) {
        return;
    }
    let Some(s) = scratch() else {
        bump(STAT_LOST, 1);
        return;
    };
    // SAFETY: scratch value, see on_open.
    unsafe {
        match nr {
            syscalls::RENAME
            | syscalls::RENAMEAT
            | syscalls::RENAMEAT2
            | syscalls::LINK
            | syscalls::LINKAT => {
                let (d0, p0, d1, p1, flags) = match nr {
                    syscalls::LINK => (AT_FDCWD, arg(regs, 0), AT_FDCWD, arg(regs, 1), 0),
                    syscalls::LINKAT => (
                        arg(regs, 0) as i32,
                        arg(regs, 1),
                        arg(regs, 2) as i32,
                        arg(regs, 3),
                        arg(regs, 4) as u32,
                    ),
                    syscalls::RENAME => (AT_FDCWD, arg(regs, 0), AT_FDCWD, arg(regs, 1), 0),
                    syscalls::RENAMEAT => (
                        arg(regs, 0) as i32,
                        arg(regs, 1),
                        arg(regs, 2) as i32,
                        arg(regs, 3),
                        0,
                    ),
                    _ => (
                        arg(regs, 0) as i32,
                        arg(regs, 1),
                        arg(regs, 2) as i32,
                        arg(regs, 3),
                        arg(regs, 4) as u32,
                    ),
                };
                let kind = if nr == syscalls::LINK || nr == syscalls::LINKAT {
                    KIND_LINK
                } else {
                    KIND_RENAME
                };
                let (p0, p1) = (PathStr::User(p0), PathStr::User(p1));
                if let Some(len) = two_paths(s, kind, pid, d0, p0, d1, p1, flags) {
                    send(s, len);
                }
            }
            _ => {
                let (kind, dirfd, path, flags, mode, size) = match nr {
                    syscalls::MKDIR => (KIND_MKDIR, AT_FDCWD, arg(regs, 0), 0, arg(regs, 1), 0),
                    syscalls::MKDIRAT => (
                        KIND_MKDIR,
                        arg(regs, 0) as i32,
                        arg(regs, 1),
                        0,
                        arg(regs, 2),
                        0,
                    ),
                    syscalls::UNLINK => (KIND_UNLINK, AT_FDCWD, arg(regs, 0), 0, 0, 0),
                    syscalls::SYMLINK => (KIND_MADE, AT_FDCWD, arg(regs, 1), 0, 0, 0),
                    syscalls::SYMLINKAT => (KIND_MADE, arg(regs, 1) as i32, arg(regs, 2), 0, 0, 0),
                    syscalls::MKNOD => (KIND_MADE, AT_FDCWD, arg(regs, 0), 0, arg(regs, 1), 0),
                    syscalls::MKNODAT => (
                        KIND_MADE,
                        arg(regs, 0) as i32,
                        arg(regs, 1),
                        0,
                        arg(regs, 2),
                        0,
                    ),
                    syscalls::RMDIR => (KIND_UNLINK, AT_FDCWD, arg(regs, 0), AT_REMOVEDIR, 0, 0),
                    syscalls::UNLINKAT => (
                        KIND_UNLINK,
                        arg(regs, 0) as i32,
                        arg(regs, 1),
                        arg(regs, 2) as u32 & AT_REMOVEDIR,
                        0,
                        0,
                    ),
                    // TRUNCATE
                    _ => (KIND_TRUNCATE, AT_FDCWD, arg(regs, 0), 0, 0, arg(regs, 1)),
                };
                let path = PathStr::User(path);
                if let Some(len) = one_path(s, kind, pid, dirfd, path, flags, mode as u32, size) {
                    send(s, len);
                }
            }
        }
    }
}
