//! io_uring: requests write files without a write-family syscall of their own, so they
//! are caught where their completion is posted, at the `io_uring:io_uring_complete`
//! tracepoint, whichever thread completes them (the submitter, an io-wq worker or the
//! SQPOLL thread: all belong to the submitting process).
//!
//! At that point the request (`struct io_kiocb`) still holds its file and its
//! command-specific state (`io_kiocb.cmd`), and the result is in `io_kiocb.cqe.res`:
//! - WRITE, WRITEV, WRITE_FIXED, WRITEV_FIXED: the kiocb's position has been advanced
//!   past the bytes written, so they are `[ki_pos - res, ki_pos)` (also for position -1
//!   and O_APPEND). Reported dirty: the agent reads them back from the file.
//! - SPLICE into a file: like splice(2), the output offset (or f_pos) has advanced.
//! - FALLOCATE and FTRUNCATE: the same records as the syscalls.
//! - OPENAT/OPENAT2 with O_CREAT or O_TRUNC into a plain fd: the file's size now, so
//!   the replica has the (possibly empty) file.
//! - FSETXATTR: the same record as fsetxattr(2).
//! - RENAMEAT, UNLINKAT, MKDIRAT, SYMLINKAT, LINKAT, SETXATTR: their paths are gone by
//!   completion (the request drops its `struct filename`s), so the record is built at
//!   submission (`io_uring:io_uring_submit_req`, after the request was prepared, with
//!   the kernel's copy of each path), kept by request, and sent at completion if the
//!   request succeeded; dropped otherwise.
//!
//! Not seen here: requests completed with IOSQE_CQE_SKIP_SUCCESS (no completion is
//! posted) and completions that overflow the CQ ring. The latter are counted as lost
//! when the ring is known to write watched files, so the agent resyncs.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{map, raw_tracepoint},
    maps::LruHashMap,
    programs::RawTracePointContext,
};
use doppel_common::abi::{
    NsRecord, ATTR_XATTR, AT_REMOVEDIR, KIND_ATTR, KIND_FALLOC, KIND_FTRUNCATE, KIND_LINK,
    KIND_MADE, KIND_MKDIR, KIND_RENAME, KIND_UNLINK, NS_RECORD_SIZE, O_CREAT, O_TRUNC, PATH_CAP,
    STAT_EVENTS, STAT_LOST,
};

use crate::{
    data::on_uring_write,
    kernel::{fd_file, off, rk, rk_ptr, tgid, AT_FDCWD},
    maps::{bump, ignored, output, scratch},
    ns::{file_record, one_path, two_paths, PathStr},
};

/// A namespace record built at submission, up to two paths long.
const STAGED_SIZE: usize = NS_RECORD_SIZE + 2 * PATH_CAP;

#[repr(C, align(8))]
pub struct Staged {
    buf: [u8; STAGED_SIZE],
}

/// Namespace records of submitted requests (`struct io_kiocb *` -> record), sent when
/// the request completes successfully. LRU: a request that never posts a completion
/// (IOSQE_CQE_SKIP_SUCCESS) must not hold an entry forever.
#[map]
static STAGED: LruHashMap<u64, Staged> = LruHashMap::with_max_entries(1024, 0);

/// Rings (`struct io_ring_ctx *`) that completed a write to a watched file. A CQ
/// overflow on one of them may have hidden such a completion.
#[map]
static WATCHED_RINGS: LruHashMap<u64, u8> = LruHashMap::with_max_entries(4096, 0);

#[raw_tracepoint(tracepoint = "io_uring_complete")]
pub fn doppel_uring_complete(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct io_ring_ctx *ctx, void *req, struct io_uring_cqe *cqe)
    let ring: u64 = ctx.arg(0);
    let req: u64 = ctx.arg(1);
    // Auxiliary completions (multishot, msg_ring) have no request.
    if req == 0 {
        return 0;
    }
    let Some(res) = rk::<i32>(req + off::OFF_REQ_RES()) else {
        return 0;
    };
    if res < 0 {
        return 0;
    }
    let Some(op) = rk::<u8>(req + off::OFF_REQ_OPCODE()) else {
        return 0;
    };
    let op = op as u64;
    let Some(file) = rk::<u64>(req + off::OFF_REQ_FILE()) else {
        return 0;
    };
    let cmd = req + off::OFF_REQ_CMD();
    if op == off::URING_OP_WRITE()
        || op == off::URING_OP_WRITEV()
        || op == off::URING_OP_WRITE_FIXED()
        || op == off::URING_OP_WRITEV_FIXED()
    {
        if res > 0 && file != 0 {
            let Some(pos) = rk::<i64>(cmd + off::OFF_RW_POS()) else {
                return 0;
            };
            if on_uring_write(file, pos as u64, res as u64) {
                let _ = WATCHED_RINGS.insert(&ring, &1, 0);
            }
        }
    } else if op == off::URING_OP_SPLICE() {
        if res > 0 && file != 0 {
            let Some(off_out) = rk::<i64>(cmd + off::OFF_SPLICE_OFF_OUT()) else {
                return 0;
            };
            let end = if off_out == -1 {
                rk::<i64>(file + off::OFF_FILE_F_POS()).unwrap_or(0)
            } else {
                off_out
            };
            on_uring_write(file, end as u64, res as u64);
        }
    } else if op == off::URING_OP_FALLOCATE() {
        let len = rk::<u64>(cmd + off::OFF_SYNC_LEN()).unwrap_or(0);
        let offset = rk::<u64>(cmd + off::OFF_SYNC_OFF()).unwrap_or(0);
        let mode = rk::<u32>(cmd + off::OFF_SYNC_MODE()).unwrap_or(0);
        file_record(file, true, KIND_FALLOC, mode, offset, len);
    } else if op == off::URING_OP_FTRUNCATE() {
        let len = rk::<u64>(cmd + off::OFF_FTRUNC_LEN()).unwrap_or(0);
        file_record(file, true, KIND_FTRUNCATE, 0, 0, len);
    } else if op == off::URING_OP_OPENAT() || op == off::URING_OP_OPENAT2() {
        on_open(cmd, res as u64);
    } else if op == off::URING_OP_FSETXATTR() {
        file_record(file, false, KIND_ATTR, ATTR_XATTR, 0, 0);
    } else if is_path_op(op) {
        send_staged(req);
    }
    0
}

#[inline(always)]
fn is_path_op(op: u64) -> bool {
    op == off::URING_OP_RENAMEAT()
        || op == off::URING_OP_UNLINKAT()
        || op == off::URING_OP_MKDIRAT()
        || op == off::URING_OP_SYMLINKAT()
        || op == off::URING_OP_LINKAT()
        || op == off::URING_OP_SETXATTR()
}

/// The path-based request `req` succeeded: send the record staged at its submission,
/// stamped now (what a scan reads after this reflects it).
#[inline(always)]
fn send_staged(req: u64) {
    let Some(v) = STAGED.get_ptr_mut(&req) else {
        return;
    };
    let rec = v as *mut NsRecord;
    // SAFETY: map value of STAGED_SIZE bytes, starting with an NsRecord.
    let len = unsafe {
        (*rec).hdr.ktime = bpf_ktime_get_ns();
        let last = if (*rec).npaths == 2 { 1 } else { 0 };
        let tail = ((*rec).paths[last].len as usize) & (PATH_CAP - 1);
        NS_RECORD_SIZE + last * PATH_CAP + tail
    };
    if len <= STAGED_SIZE {
        if output(v as *mut u8, len as u64) {
            bump(STAT_EVENTS, 1);
        } else {
            bump(STAT_LOST, 1);
        }
    }
    let _ = STAGED.remove(&req);
}

/// The `struct filename *` at `at` -> its kernel string.
#[inline(always)]
fn name(at: u64) -> PathStr {
    let f = rk_ptr(at).unwrap_or(0);
    PathStr::Kernel(rk_ptr(f + off::OFF_FILENAME_NAME()).unwrap_or(0))
}

#[raw_tracepoint(tracepoint = "io_uring_submit_req")]
pub fn doppel_uring_submit(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct io_kiocb *req): called once the request is prepared.
    let req: u64 = ctx.arg(0);
    let Some(op) = rk::<u8>(req + off::OFF_REQ_OPCODE()) else {
        return 0;
    };
    let op = op as u64;
    if !is_path_op(op) {
        return 0;
    }
    let pid = tgid();
    if ignored(pid) {
        return 0;
    }
    let Some(s) = scratch() else {
        return 0;
    };
    let cmd = req + off::OFF_REQ_CMD();
    let int = |o: u64| rk::<i32>(cmd + o).unwrap_or(0);
    // SAFETY: `s` is the per-CPU scratch value, at least STAGED_SIZE bytes.
    let staged = unsafe {
        if op == off::URING_OP_RENAMEAT() {
            let (d0, d1) = (
                int(off::OFF_RENAME_OLD_DFD()),
                int(off::OFF_RENAME_NEW_DFD()),
            );
            let (p0, p1) = (
                name(cmd + off::OFF_RENAME_OLDPATH()),
                name(cmd + off::OFF_RENAME_NEWPATH()),
            );
            let flags = int(off::OFF_RENAME_FLAGS()) as u32;
            two_paths(s, KIND_RENAME, pid, d0, p0, d1, p1, flags)
        } else if op == off::URING_OP_LINKAT() {
            let (d0, d1) = (int(off::OFF_LINK_OLD_DFD()), int(off::OFF_LINK_NEW_DFD()));
            let (p0, p1) = (
                name(cmd + off::OFF_LINK_OLDPATH()),
                name(cmd + off::OFF_LINK_NEWPATH()),
            );
            let flags = int(off::OFF_LINK_FLAGS()) as u32;
            two_paths(s, KIND_LINK, pid, d0, p0, d1, p1, flags)
        } else if op == off::URING_OP_SYMLINKAT() {
            // io_link: oldpath is the target, newpath the link made.
            let d = int(off::OFF_LINK_NEW_DFD());
            let p = name(cmd + off::OFF_LINK_NEWPATH());
            one_path(s, KIND_MADE, pid, d, p, 0, 0, 0)
        } else if op == off::URING_OP_SETXATTR() {
            // setxattr(2) semantics: relative to the cwd, following symlinks.
            let p = name(cmd + off::OFF_XATTR_NAME());
            one_path(s, KIND_ATTR, pid, AT_FDCWD, p, ATTR_XATTR, 0, 0)
        } else if op == off::URING_OP_UNLINKAT() {
            let d = int(off::OFF_UNLINK_DFD());
            let flags = int(off::OFF_UNLINK_FLAGS()) as u32 & AT_REMOVEDIR;
            let p = name(cmd + off::OFF_UNLINK_NAME());
            one_path(s, KIND_UNLINK, pid, d, p, flags, 0, 0)
        } else {
            let d = int(off::OFF_MKDIR_DFD());
            let mode = rk::<u16>(cmd + off::OFF_MKDIR_MODE()).unwrap_or(0) as u32;
            let p = name(cmd + off::OFF_MKDIR_NAME());
            one_path(s, KIND_MKDIR, pid, d, p, 0, mode, 0)
        }
    };
    if staged.is_some() {
        // SAFETY: the scratch value is at least as large as `Staged`.
        let v = unsafe { &*(s as *const Staged) };
        if STAGED.insert(&req, v, 0).is_err() {
            bump(STAT_LOST, 1);
        }
    }
    0
}

/// An io_uring open returned `fd` (into the process's file table unless a fixed slot
/// was asked for, in which case `res` is 0 and the file is found by its first write).
#[inline(always)]
fn on_open(cmd: u64, fd: u64) {
    let flags = rk::<u64>(cmd + off::OFF_OPEN_FLAGS()).unwrap_or(0) as u32;
    if flags & (O_CREAT | O_TRUNC) == 0 {
        return;
    }
    if rk::<u32>(cmd + off::OFF_OPEN_SLOT()).unwrap_or(0) != 0 {
        return;
    }
    let Some(file) = fd_file(fd) else {
        return;
    };
    // The file's size as it is now: 0 after O_TRUNC or for a new file, unchanged for an
    // existing one opened with O_CREAT only (then the record changes nothing).
    let size = if flags & O_TRUNC != 0 {
        0
    } else {
        crate::kernel::inode_ptr(file)
            .and_then(|i| rk::<i64>(i + off::OFF_INODE_I_SIZE()))
            .unwrap_or(0) as u64
    };
    file_record(file, true, KIND_FTRUNCATE, 0, 0, size);
}

/// `io_uring:io_uring_cqe_overflow`: a completion did not fit the CQ ring, so it was not
/// posted through `io_uring_complete` (and carries no request to look at). If its ring
/// writes watched files, it may have been one of those writes: count a loss, which makes
/// the agent resync.
#[raw_tracepoint(tracepoint = "io_uring_cqe_overflow")]
pub fn doppel_uring_overflow(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct io_ring_ctx *ctx, unsigned long long user_data, s32 res, u32 cflags,
    //          struct io_overflow_cqe *ocqe)
    let ring: u64 = ctx.arg(0);
    // SAFETY: presence check only.
    if unsafe { WATCHED_RINGS.get(&ring) }.is_some() {
        bump(STAT_LOST, 1);
    }
    0
}
