//! Capture inside the filesystem (ext4): tp_btf programs on the filesystem's own write
//! path, which every write passes whatever door it came in by (Linux AIO `io_submit`,
//! 32-bit syscalls, and any syscall the `sys_exit` program does not decode).
//!
//! The filter is an exact bitmap of inode numbers per watched filesystem (`MARKS`, an
//! mmapable ARRAY the agent sets bits in with atomic operations, `MARK_FS` says where
//! each filesystem's bits start): a write to an unwatched file costs three loads, a
//! short scan of `MARK_FS` and one inlined array lookup, and no helper call. New inodes
//! in a marked directory are marked here, at `ext4_allocate_inode`, before they have a
//! name, so a create followed at once by a write is never missed; a freed inode's bit
//! is cleared at `ext4_free_inode`, so a reused inode number inherits nothing.
//!
//! For now the bytes of a write seen here are not copied: the write is reported as a
//! dirty range and the agent reads it back. Writes the `sys_exit` program decodes
//! itself (and io_uring requests, which `uring` sees complete) are left to it, so
//! nothing is reported twice and `write(2)` keeps its inline copy.

use core::intrinsics::{atomic_and, atomic_or, AtomicOrdering};

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
    },
    macros::{btf_tracepoint, map},
    maps::{Array, HashMap},
    programs::BtfTracePointContext,
};
use doppel_common::abi::{
    DioWrite, FileRecord, Header, KFileId, MarkFs, FILE_RECORD_SIZE, KIND_DIRTY, MARK_FS_MAX,
    STAT_EVENTS,
};

use crate::{
    kernel::{current_task, in_compat_syscall, inode_id, off, rk, rk_ptr},
    maps::{bump, ignored, output, record_missed},
    syscalls,
};

/// `BPF_F_MMAPABLE`: the agent maps the bitmap and sets bits without a syscall.
const BPF_F_MMAPABLE: u32 = 1 << 10;
/// `PF_IO_WORKER`: an io_uring worker or SQPOLL thread (the uring programs report its
/// writes when they complete).
const PF_IO_WORKER: u32 = 0x10;
/// In-flight direct writes remembered between their begin and their completion.
const DIO_PENDING_MAX: u32 = 8192;

/// One bit per inode number of each watched filesystem. The agent sizes it at load.
#[map]
static MARKS: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Where each watched filesystem's bits start in `MARKS`; the first entry with
/// `words == 0` ends the list.
#[map]
static MARK_FS: Array<MarkFs> = Array::with_max_entries(MARK_FS_MAX, 0);

/// Direct writes (kiocb address) between `iomap_dio_rw_begin` and their completion,
/// which may run in another context (an AIO completion worker) and no longer knows
/// where the write began.
#[map]
static DIO_PENDING: HashMap<u64, DioWrite> = HashMap::with_max_entries(DIO_PENDING_MAX, 0);

/// The bitmap word holding `inode`'s bit, and the bit, if its filesystem is watched.
#[inline(always)]
fn mark_word(inode: u64) -> Option<(*mut u64, u64, KFileId)> {
    let id = inode_id(inode)?;
    let mut i = 0;
    while i < MARK_FS_MAX {
        let fs = MARK_FS.get(i)?;
        if fs.words == 0 {
            return None;
        }
        if fs.dev == id.dev {
            let word = id.ino >> 6;
            if word >= fs.words {
                return None;
            }
            let p = MARKS.get_ptr_mut((fs.base + word) as u32)?;
            return Some((p, 1u64 << (id.ino & 63), id));
        }
        i += 1;
    }
    None
}

/// `inode`'s identity if it is marked (a file or directory of a set).
#[inline(always)]
fn marked(inode: u64) -> Option<KFileId> {
    let (p, bit, id) = mark_word(inode)?;
    // SAFETY: an ARRAY value pointer; a racing update only makes this read old or new.
    let word = unsafe { core::ptr::read_volatile(p) };
    (word & bit != 0).then_some(id)
}

/// Whether another program reports the current task's write: the `sys_exit` program
/// for the write-family syscalls it decodes (not in a 32-bit syscall, whose numbers
/// differ), the io_uring programs for io_uring's workers and `io_uring_enter`.
#[inline(always)]
fn reported_elsewhere() -> bool {
    let task = current_task();
    let flags = rk::<u32>(task + off::OFF_TASK_FLAGS()).unwrap_or(0);
    if flags & PF_IO_WORKER != 0 {
        return true;
    }
    if in_compat_syscall() {
        return false;
    }
    // SAFETY: helpers without preconditions; the task pointer is the current task's.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as u64;
    let Some(nr) = rk::<u64>(regs + off::OFF_REGS_ORIG_AX()) else {
        return false;
    };
    use syscalls::*;
    matches!(
        nr,
        WRITE
            | PWRITE64
            | WRITEV
            | PWRITEV
            | PWRITEV2
            | COPY_FILE_RANGE
            | SPLICE
            | SENDFILE
            | IO_URING_ENTER
    )
}

/// The directory of `inode`'s first name, or zeros when it has none (yet).
#[inline(always)]
fn first_parent(inode: u64) -> KFileId {
    let none = KFileId { dev: 0, ino: 0 };
    let Some(first) = rk_ptr(inode + off::OFF_INODE_I_DENTRY()) else {
        return none;
    };
    let dentry = first - off::OFF_DENTRY_D_ALIAS();
    let Some(pdentry) = rk_ptr(dentry + off::OFF_DENTRY_D_PARENT()) else {
        return none;
    };
    match rk_ptr(pdentry + off::OFF_DENTRY_D_INODE()).and_then(inode_id) {
        Some(p) => p,
        None => none,
    }
}

/// Reports `[offset, offset + len)` of `file` dirty (or, with the ring full, missed).
/// Built on the stack: a completion can run in interrupt context, on a CPU where
/// another program is half-way through the per-CPU scratch buffer.
#[inline(always)]
fn report_dirty(file: KFileId, parent: KFileId, pid: u32, offset: u64, len: u64) {
    let mut rec = FileRecord {
        hdr: Header {
            kind: KIND_DIRTY,
            pid,
            // SAFETY: helper without preconditions.
            ktime: unsafe { bpf_ktime_get_ns() },
        },
        file,
        parent,
        offset,
        len,
    };
    if output(
        &mut rec as *mut FileRecord as *mut u8,
        FILE_RECORD_SIZE as u64,
    ) {
        bump(STAT_EVENTS, 1);
    } else {
        record_missed(&file, offset, offset + len);
    }
}

#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// A buffered write put `copied` bytes at `pos` into the page cache.
#[inline(always)]
fn write_end(ctx: &BtfTracePointContext) {
    // TP_PROTO(struct inode *inode, loff_t pos, unsigned int len, unsigned int copied)
    let inode: u64 = ctx.arg(0);
    let pos: u64 = ctx.arg(1);
    let copied: u64 = ctx.arg::<u64>(3) & 0xffff_ffff;
    if copied == 0 {
        return;
    }
    let Some(file) = marked(inode) else {
        return;
    };
    let pid = current_tgid();
    if ignored(pid) || reported_elsewhere() {
        return;
    }
    report_dirty(file, first_parent(inode), pid, pos, copied);
}

#[btf_tracepoint(function = "ext4_da_write_end")]
pub fn doppel_ext4_da_write_end(ctx: BtfTracePointContext) -> i32 {
    write_end(&ctx);
    0
}

#[btf_tracepoint(function = "ext4_write_end")]
pub fn doppel_ext4_write_end(ctx: BtfTracePointContext) -> i32 {
    write_end(&ctx);
    0
}

#[btf_tracepoint(function = "ext4_journalled_write_end")]
pub fn doppel_ext4_journalled_write_end(ctx: BtfTracePointContext) -> i32 {
    write_end(&ctx);
    0
}

/// A direct write begins: remembered until it completes (direct reads are not).
#[btf_tracepoint(function = "iomap_dio_rw_begin")]
pub fn doppel_dio_begin(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct kiocb *iocb, struct iov_iter *iter, unsigned int dio_flags,
    //          size_t done_before)
    let iocb: u64 = ctx.arg(0);
    let iter: u64 = ctx.arg(1);
    // `data_source` is true when the iterator is the source of the I/O: a write.
    match rk::<u8>(iter + off::OFF_ITER_DATA_SOURCE()) {
        Some(s) if s != 0 => {}
        _ => return 0,
    }
    let Some(inode) =
        rk_ptr(iocb + off::OFF_KIOCB_FILP()).and_then(|f| rk_ptr(f + off::OFF_FILE_F_INODE()))
    else {
        return 0;
    };
    let Some(file) = marked(inode) else {
        return 0;
    };
    let pid = current_tgid();
    if ignored(pid) || reported_elsewhere() {
        return 0;
    }
    let write = DioWrite {
        file,
        parent: first_parent(inode),
        offset: rk::<u64>(iocb + off::OFF_KIOCB_POS()).unwrap_or(0),
        len: rk::<u64>(iter + off::OFF_ITER_COUNT()).unwrap_or(0),
        pid: pid as u64,
    };
    if DIO_PENDING.insert(&iocb, &write, 0).is_err() {
        // No room to remember it: report it now, whole, as missed. The agent reads the
        // range when it drains the missed ranges (one drain period from now at the
        // earliest, by which time a direct write has long completed; if not, its bytes
        // are older on the replica until the next write there).
        record_missed(&file, write.offset, write.offset + write.len);
    }
    0
}

/// A direct I/O completed (here `ki_pos` has moved past what was written).
#[btf_tracepoint(function = "iomap_dio_complete")]
pub fn doppel_dio_complete(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct kiocb *iocb, int error, ssize_t ret)
    let iocb: u64 = ctx.arg(0);
    let ret: i64 = ctx.arg(2);
    // SAFETY: the value is copied out at once.
    let Some(w) = (unsafe { DIO_PENDING.get(&iocb) }).copied() else {
        return 0;
    };
    let _ = DIO_PENDING.remove(&iocb);
    // A failed or partly failed write may still have changed bytes: report all it
    // was asked to write (reading unchanged bytes back costs only the read).
    let len = if ret > 0 {
        w.len.max(ret as u64)
    } else {
        w.len
    };
    if len > 0 {
        report_dirty(w.file, w.parent, w.pid as u32, w.offset, len);
    }
    0
}

/// A new inode in a marked directory is marked before it gets a name.
#[btf_tracepoint(function = "ext4_allocate_inode")]
pub fn doppel_allocate_inode(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct inode *inode, struct inode *dir, int mode)
    let inode: u64 = ctx.arg(0);
    let dir: u64 = ctx.arg(1);
    if marked(dir).is_none() {
        return 0;
    }
    if let Some((p, bit, _)) = mark_word(inode) {
        // SAFETY: an ARRAY value pointer, 8-aligned; the agent updates the same words
        // with atomic operations through its mapping.
        unsafe { atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(p, bit) };
    }
    0
}

/// A freed inode loses its mark: its number may be reused for an unrelated file.
#[btf_tracepoint(function = "ext4_free_inode")]
pub fn doppel_free_inode(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct inode *inode)
    let inode: u64 = ctx.arg(0);
    if let Some((p, bit, _)) = mark_word(inode) {
        // SAFETY: as in doppel_allocate_inode.
        unsafe { atomic_and::<u64, u64, { AtomicOrdering::Relaxed }>(p, !bit) };
    }
    0
}
