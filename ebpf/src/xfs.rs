//! Capture inside xfs: the same contract as ext4's programs (fs.rs, fs_meta.rs), from
//! xfs's own tracepoints and iomap's, which xfs writes through.
//!
//! - Buffered writes: `iomap_iter` fires between the chunks of a write, once the chunk
//!   before is in the page cache (`[iter_start_pos, pos)`). xfs holds the inode's I/O
//!   lock across the whole write, so no truncate or other write runs in between. The
//!   bytes are copied from the writer's buffer, whose start `xfs_file_buffered_write`
//!   remembered for this thread: a folio's kernel address cannot be computed here
//!   (iomap folios carry no buffer heads, and the direct map's base is randomized and
//!   not exported). What cannot be copied (a vectored write, more than `INLINE_CAP`)
//!   is reported as a range the agent reads back.
//! - Direct writes: `iomap_dio_*`, shared with ext4 (fs.rs).
//! - Sizes: a cut reaches `xfs_itruncate_extents_start` with the exact new size, after
//!   the page cache was cut; a growth (truncate up, a write or `fallocate` past the end)
//!   zeroes the gap first (`xfs_zero_eof`), before the size is set: reported as "its
//!   size was set", which the agent reads now and once more later.
//! - `fallocate`: xfs's five tracepoints carry only the inode; the mode and range come
//!   from the `fallocate` syscall's registers when the call is one (checked against the
//!   inode of its fd). Otherwise (io_uring, an ioctl) the agent reads the whole file now
//!   and once the work is surely over.
//! - Times and attributes: `xfs_update_time` (a write's or a `utimensat`'s), and
//!   `xfs_setattr`; fsync: `xfs_file_fsync`.
//! - Marks: a new name in a marked directory marks its inode as the directory entry is
//!   added (`xfs_dir2_*_addname`), before a file descriptor to it exists; a freed inode
//!   (`xfs_iunlink_remove`, when its last reference goes) loses its mark.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_task_pt_regs},
    macros::{btf_tracepoint, map},
    maps::LruHashMap,
    programs::BtfTracePointContext,
};
use doppel_common::abi::{
    KFileId, INLINE_CAP, KIND_FALLOC, KIND_REMAPPED, KIND_RESIZED, KIND_SYNCED, KIND_TOUCHED,
};

use crate::{
    bytes::{report_dirty, send_bytes, send_range, Source},
    fs::{arg_inode_id, arg_marked_change, clear_mark, keep_hot, parent_or_none, set_mark},
    fs_meta::{
        accessed_only, send_ns, FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE,
        FALLOC_FL_PUNCH_HOLE,
    },
    kernel::{fd_file, inode_ptr, off, rk, rk_ptr},
    maps::{record_missed, scratch},
};

/// `iomap_iter` flags (include/linux/iomap.h).
const IOMAP_WRITE: u32 = 1 << 0;
/// Zeroing, reporting, page faults, direct I/O, unsharing and DAX: not a buffered write
/// of new bytes.
const IOMAP_NOT_BUFFERED: u32 = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 7) | (1 << 8);
/// `fallocate` modes beyond those of fs_meta.rs.
const FALLOC_FL_ZERO_RANGE: u32 = 0x10;
const FALLOC_FL_UNSHARE_RANGE: u32 = 0x40;
/// `fallocate`'s syscall numbers: x86_64, and the 32-bit entry's.
const NR_FALLOCATE: u64 = 285;
const NR_IA32_FALLOCATE: u64 = 324;
/// Threads in a buffered write to a marked file at once.
const WRITES_MAX: u32 = 4096;

/// A buffered write to a marked file in progress on a thread: where its bytes start.
#[derive(Clone, Copy)]
pub struct BufferedWrite {
    /// The VFS inode written (its address: the write's chunks name it).
    inode: u64,
    /// File offset of the write's first byte.
    pos: u64,
    /// Bytes the write asked for.
    len: u64,
    /// The writer's buffer, or 0 when it is not one buffer (a vectored write).
    buf: u64,
}

/// Buffered writes in progress, by thread (`pid_tgid`): an LRU, so a thread killed
/// mid-write leaves nothing behind for long.
#[map]
static BUFFERED: LruHashMap<u64, BufferedWrite> = LruHashMap::with_max_entries(WRITES_MAX, 0);

/// The VFS inode inside an `xfs_inode` handed in by a tracepoint (same BTF pointer,
/// a constant offset further).
#[inline(always)]
fn vfs_inode(ip: u64) -> u64 {
    ip + off::OFF_XFS_I_VNODE()
}

/// `struct kiocb *`'s file's inode, by typed loads.
#[inline(always)]
fn kiocb_inode(iocb: u64) -> u64 {
    // SAFETY: a BTF tracepoint's `struct kiocb *`; the verifier checks each load's field
    // and makes it fault-tolerant.
    unsafe {
        let file = core::ptr::read_volatile((iocb + off::OFF_KIOCB_FILP()) as *const u64);
        core::ptr::read_volatile((file + off::OFF_FILE_F_INODE()) as *const u64)
    }
}

/// A buffered write begins (I/O lock held): where its bytes are, for its chunks.
#[btf_tracepoint(function = "xfs_file_buffered_write")]
pub fn doppel_xfs_buffered_write(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct kiocb *iocb, struct iov_iter *iter)
    let iocb: u64 = ctx.arg(0);
    let iter: u64 = ctx.arg(1);
    let inode = kiocb_inode(iocb);
    if arg_marked_change(inode).is_none() {
        return 0;
    }
    let len = rk::<u64>(iter + off::OFF_ITER_COUNT()).unwrap_or(0);
    let ubuf = rk::<u8>(iter + off::OFF_ITER_TYPE()).map(u64::from) == Some(off::ITER_UBUF());
    let buf = if ubuf {
        rk::<u64>(iter + off::OFF_ITER_UBUF()).unwrap_or(0)
            + rk::<u64>(iter + off::OFF_ITER_IOV_OFFSET()).unwrap_or(0)
    } else {
        0
    };
    let write = BufferedWrite {
        inode,
        pos: rk::<u64>(iocb + off::OFF_KIOCB_POS()).unwrap_or(0),
        len,
        buf,
    };
    let _ = BUFFERED.insert(&bpf_get_current_pid_tgid(), &write, 0);
    0
}

/// One step of an iomap operation: for a buffered write, the chunk before this call is
/// in the page cache now.
#[btf_tracepoint(function = "iomap_iter")]
pub fn doppel_iomap_iter(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct iomap_iter *iter, const struct iomap_ops *ops, unsigned long caller)
    let iter: u64 = ctx.arg(0);
    // SAFETY: a BTF tracepoint's `struct iomap_iter *`, as in `kiocb_inode`.
    let (flags, mapped, start, pos, inode) = unsafe {
        (
            core::ptr::read_volatile((iter + off::OFF_IOMAP_ITER_FLAGS()) as *const u32),
            core::ptr::read_volatile((iter + off::OFF_IOMAP_ITER_MAPPED()) as *const u64),
            core::ptr::read_volatile((iter + off::OFF_IOMAP_ITER_START()) as *const u64),
            core::ptr::read_volatile((iter + off::OFF_IOMAP_ITER_POS()) as *const u64),
            core::ptr::read_volatile((iter + off::OFF_IOMAP_ITER_INODE()) as *const u64),
        )
    };
    // The first call of an operation has no chunk behind it (nothing mapped yet).
    if flags & IOMAP_WRITE == 0 || flags & IOMAP_NOT_BUFFERED != 0 || mapped == 0 {
        return 0;
    }
    if pos <= start {
        return 0;
    }
    let Some((file, pid)) = arg_marked_change(inode) else {
        return 0;
    };
    let len = pos - start;
    let parent = parent_or_none(inode);
    let task = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out at once.
    let src = match unsafe { BUFFERED.get(&task) }.copied() {
        Some(w)
            if w.inode == inode
                && w.buf != 0
                && len <= INLINE_CAP as u64
                && start >= w.pos
                && pos <= w.pos + w.len =>
        {
            Some(w.buf + (start - w.pos))
        }
        _ => None,
    };
    match (src, scratch()) {
        // The mask keeps the verifier's bounds on the length (it is within INLINE_CAP).
        (Some(src), Some(s)) => send_bytes(
            s,
            pid,
            &file,
            &parent,
            start,
            src,
            len & 0xffff_ffff,
            Source::User,
        ),
        _ => report_dirty(pid, &file, &parent, start, len),
    }
    keep_hot(
        rk_ptr(inode + off::OFF_INODE_I_MAPPING()),
        pid,
        file,
        parent,
        start,
        len,
    );
    0
}

/// A cut to an exact size (the page cache is cut already): a truncate down, the end of
/// a collapse, or the trim of preallocation past the end (the size it has).
#[btf_tracepoint(function = "xfs_itruncate_extents_start")]
pub fn doppel_xfs_truncate(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct xfs_inode *ip, xfs_fsize_t new_size)
    let inode = vfs_inode(ctx.arg(0));
    let size: u64 = ctx.arg(1);
    let Some((file, pid)) = arg_marked_change(inode) else {
        return 0;
    };
    if !send_ns(
        doppel_common::abi::KIND_FTRUNCATE,
        pid,
        file,
        parent_or_none(inode),
        0,
        0,
        size,
    ) {
        record_missed(&file, 0, u64::MAX);
    }
    0
}

/// The gap past the end is zeroed before the size grows (a truncate up, a write or a
/// `fallocate` past the end): "its size is being set", read by the agent now and again.
#[btf_tracepoint(function = "xfs_zero_eof")]
pub fn doppel_xfs_zero_eof(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct xfs_inode *ip, xfs_off_t offset, ssize_t count)
    let inode = vfs_inode(ctx.arg(0));
    report(KIND_RESIZED, inode);
    0
}

/// A record without range about a marked inode; a lost size record reads the file back.
#[inline(always)]
fn report(kind: u32, inode: u64) {
    let Some((file, pid)) = arg_marked_change(inode) else {
        return;
    };
    if kind == KIND_TOUCHED && accessed_only(inode) {
        return;
    }
    if !send_range(kind, pid, file, parent_or_none(inode), 0, 0) && kind == KIND_RESIZED {
        record_missed(&file, 0, u64::MAX);
    }
}

/// Times set by a write (`file_update_time`) or a read (relatime, left out).
#[btf_tracepoint(function = "xfs_update_time")]
pub fn doppel_xfs_update_time(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct xfs_inode *ip)
    report(KIND_TOUCHED, vfs_inode(ctx.arg(0)));
    0
}

/// Attributes set (`chmod`, `chown`, `utimensat`, a size): mtime alone is no fanotify
/// ATTRIB event.
#[btf_tracepoint(function = "xfs_setattr")]
pub fn doppel_xfs_setattr(ctx: BtfTracePointContext) -> i32 {
    report(KIND_TOUCHED, vfs_inode(ctx.arg(0)));
    0
}

/// fsync and fdatasync: a barrier in the set's stream (as `ext4_sync_file_enter`).
#[btf_tracepoint(function = "xfs_file_fsync")]
pub fn doppel_xfs_fsync(ctx: BtfTracePointContext) -> i32 {
    report(KIND_SYNCED, vfs_inode(ctx.arg(0)));
    0
}

/// The current `fallocate` call's (mode, offset, len) if the current thread is in one on
/// `inode` (x86_64 or the 32-bit entry).
#[inline(always)]
fn fallocate_call(inode: u64) -> Option<(u32, u64, u64)> {
    // SAFETY: helpers without preconditions; `task` is the current task's BTF pointer.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as u64;
    if regs == 0 {
        return None;
    }
    let nr = rk::<u64>(regs + off::OFF_REGS_ORIG_AX())?;
    let reg = |o: u64| rk::<u64>(regs + o);
    let (fd, mode, offset, len) = if nr == NR_FALLOCATE && !crate::kernel::in_compat_syscall() {
        (
            reg(off::OFF_REGS_DI())?,
            reg(off::OFF_REGS_SI())?,
            reg(off::OFF_REGS_DX())?,
            reg(off::OFF_REGS_R10())?,
        )
    } else if nr == NR_IA32_FALLOCATE && crate::kernel::in_compat_syscall() {
        // ebx fd, ecx mode, edx:esi offset (low, high), edi:ebp length.
        let lo = |o: u64| reg(o).map(|v| v & 0xffff_ffff);
        (
            lo(off::OFF_REGS_BX())?,
            lo(off::OFF_REGS_CX())?,
            lo(off::OFF_REGS_DX())? | (lo(off::OFF_REGS_SI())? << 32),
            lo(off::OFF_REGS_DI())? | (lo(off::OFF_REGS_BP())? << 32),
        )
    } else {
        return None;
    };
    let file = fd_file(fd & 0xffff_ffff)?;
    (inode_ptr(file)? == inode).then_some((mode as u32, offset, len))
}

/// Which of xfs's `fallocate` tracepoints reports a call: each mode once, at its own.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Space {
    Alloc,
    Free,
    Zero,
    Collapse,
    Insert,
}

fn reported_at(mode: u32) -> Space {
    if mode & FALLOC_FL_COLLAPSE_RANGE != 0 {
        Space::Collapse
    } else if mode & FALLOC_FL_INSERT_RANGE != 0 {
        Space::Insert
    } else if mode & FALLOC_FL_ZERO_RANGE != 0 {
        Space::Zero
    } else if mode & FALLOC_FL_PUNCH_HOLE != 0 {
        Space::Free
    } else {
        Space::Alloc
    }
}

/// xfs's space work on a marked file begins (before it is done).
#[inline(always)]
fn space(ip: u64, at: Space) {
    let inode = vfs_inode(ip);
    match fallocate_call(inode) {
        Some((mode, offset, len)) => {
            if reported_at(mode) == at && mode & FALLOC_FL_UNSHARE_RANGE == 0 {
                crate::fs_meta::fallocate(inode, offset, len, mode);
            }
        }
        None => {
            // Not a fallocate call (io_uring, an ioctl): the whole file, now and once the
            // work is surely over (a collapse from offset 0 asks the agent for that).
            if at == Space::Alloc {
                return; // no byte changes; a size change has its own report
            }
            let Some((file, pid)) = arg_marked_change(inode) else {
                return;
            };
            let parent = parent_or_none(inode);
            if !send_ns(
                KIND_FALLOC,
                pid,
                file,
                parent,
                FALLOC_FL_COLLAPSE_RANGE,
                0,
                0,
            ) {
                record_missed(&file, 0, u64::MAX);
            }
        }
    }
}

#[btf_tracepoint(function = "xfs_alloc_file_space")]
pub fn doppel_xfs_alloc_space(ctx: BtfTracePointContext) -> i32 {
    space(ctx.arg(0), Space::Alloc);
    0
}

#[btf_tracepoint(function = "xfs_free_file_space")]
pub fn doppel_xfs_free_space(ctx: BtfTracePointContext) -> i32 {
    space(ctx.arg(0), Space::Free);
    0
}

#[btf_tracepoint(function = "xfs_zero_file_space")]
pub fn doppel_xfs_zero_space(ctx: BtfTracePointContext) -> i32 {
    space(ctx.arg(0), Space::Zero);
    0
}

#[btf_tracepoint(function = "xfs_collapse_file_space")]
pub fn doppel_xfs_collapse_space(ctx: BtfTracePointContext) -> i32 {
    space(ctx.arg(0), Space::Collapse);
    0
}

#[btf_tracepoint(function = "xfs_insert_file_space")]
pub fn doppel_xfs_insert_space(ctx: BtfTracePointContext) -> i32 {
    space(ctx.arg(0), Space::Insert);
    0
}

/// A range of a marked file is about to share another file's blocks (a reflink made by
/// `copy_file_range`, `FICLONERANGE`, or a dedupe, which changes no byte): read now
/// and once the remap is over.
#[btf_tracepoint(function = "xfs_reflink_remap_range")]
pub fn doppel_xfs_remap(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct xfs_inode *src, xfs_off_t soffset, xfs_off_t len,
    //          struct xfs_inode *dest, xfs_off_t doffset)
    let len: u64 = ctx.arg(2);
    let inode = vfs_inode(ctx.arg(3));
    let offset: u64 = ctx.arg(4);
    let Some((file, pid)) = arg_marked_change(inode) else {
        return 0;
    };
    // A length of 0 remaps to the source's end.
    let len = if len == 0 { u64::MAX - offset } else { len };
    if !send_range(KIND_REMAPPED, pid, file, parent_or_none(inode), offset, len) {
        record_missed(&file, offset, offset.saturating_add(len));
    }
    0
}

/// A name is added to a directory: in a marked directory, its inode is marked now,
/// before the file can be opened (a create) or written under this name (a link, a
/// rename into the directory).
#[inline(always)]
fn addname(ctx: &BtfTracePointContext) {
    // TP_PROTO(struct xfs_da_args *args)
    let args: u64 = ctx.arg(0);
    // SAFETY: a BTF tracepoint's `struct xfs_da_args *`, as in `kiocb_inode`.
    let (dp, ino) = unsafe {
        (
            core::ptr::read_volatile((args + off::OFF_DA_ARGS_DP()) as *const u64),
            core::ptr::read_volatile((args + off::OFF_DA_ARGS_INUMBER()) as *const u64),
        )
    };
    let dir = vfs_inode(dp);
    if crate::fs::arg_marked(dir).is_some() {
        let dev = arg_inode_id(dir).dev;
        set_mark(KFileId { dev, ino });
    }
}

#[btf_tracepoint(function = "xfs_dir2_sf_addname")]
pub fn doppel_xfs_sf_addname(ctx: BtfTracePointContext) -> i32 {
    addname(&ctx);
    0
}

#[btf_tracepoint(function = "xfs_dir2_block_addname")]
pub fn doppel_xfs_block_addname(ctx: BtfTracePointContext) -> i32 {
    addname(&ctx);
    0
}

#[btf_tracepoint(function = "xfs_dir2_leaf_addname")]
pub fn doppel_xfs_leaf_addname(ctx: BtfTracePointContext) -> i32 {
    addname(&ctx);
    0
}

#[btf_tracepoint(function = "xfs_dir2_node_addname")]
pub fn doppel_xfs_node_addname(ctx: BtfTracePointContext) -> i32 {
    addname(&ctx);
    0
}

/// An inode leaves the unlinked list: it is being freed (or an `O_TMPFILE` gets its
/// first name, which marks it again right after in a marked directory).
#[btf_tracepoint(function = "xfs_iunlink_remove")]
pub fn doppel_xfs_iunlink_remove(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct xfs_inode *ip)
    clear_mark(arg_inode_id(vfs_inode(ctx.arg(0))));
    0
}
