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
//! Bytes are copied at write time, so the replica sees writes in the order the
//! filesystem took them (a log record fdatasynced before its data page never arrives
//! after it): a buffered write's bytes from the page-cache folio it just filled (under
//! the folio's lock, found through the mapping's xarray, addressed through the folio's
//! first buffer head), a synchronous direct write's from the caller's buffer once it is
//! on the disk.
//! What cannot be copied that way (more than `INLINE_CAP` at once, a short copy, a folio
//! without buffer heads, a vectored or asynchronous direct write, one that fell short)
//! is reported as a range the agent reads back once it is in the file.
//!
//! On a filesystem the bitmap covers, the `sys_exit` and io_uring programs leave data
//! to these programs, which see io_uring's writes too (in `io_uring_enter`, an io-wq
//! worker or the SQPOLL thread).

use core::intrinsics::{atomic_and, atomic_or, AtomicOrdering};

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{btf_tracepoint, map},
    maps::{Array, HashMap},
    programs::BtfTracePointContext,
};
use doppel_common::abi::{bloom_bits, DioWrite, KFileId, MarkFs, INLINE_CAP, MARK_FS_MAX};

use crate::{
    bytes::{report_dirty, send_bytes, Source},
    kernel::{first_parent, inode_id, off, rk, rk_ptr, tgid},
    maps::{ignored, record_missed, scratch},
};

/// `BPF_F_MMAPABLE`: the agent maps the bitmap and sets bits without a syscall.
const BPF_F_MMAPABLE: u32 = 1 << 10;
/// `BPF_F_NO_PREALLOC`: hash entries allocated on insert.
const BPF_F_NO_PREALLOC: u32 = 1;
/// In-flight direct writes remembered between their begin and their completion.
const DIO_PENDING_MAX: u32 = 8192;
/// x86_64 pages.
const PAGE_SHIFT: u64 = 12;
/// Largest folio: a PMD (2 MiB).
const MAX_FOLIO: u64 = 2 << 20;

/// One bit per inode number of each watched filesystem, or a bloom filter's bits for a
/// filesystem with sparse numbers. The agent sizes it at load.
#[map]
static MARKS: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// The marked inodes of filesystems whose bits are a bloom filter. The agent sizes it
/// at load; entries are allocated as they are inserted.
#[map]
static MARK_EXACT: HashMap<KFileId, u8> = HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);

/// Where each watched filesystem's bits start in `MARKS`; the first entry with
/// `words == 0` ends the list.
#[map]
static MARK_FS: Array<MarkFs> = Array::with_max_entries(MARK_FS_MAX, 0);

/// Direct writes (kiocb address) between `iomap_dio_rw_begin` and their completion,
/// which may run in another context (an AIO completion worker) and no longer knows
/// where the write began.
#[map]
static DIO_PENDING: HashMap<u64, DioWrite> = HashMap::with_max_entries(DIO_PENDING_MAX, 0);

/// `(dev, ino)` of an inode the tracepoint handed in (a trusted BTF pointer): plain
/// loads, which the verifier checks against the kernel's types (offsets are constants
/// of the frozen `.rodata`), no helper call.
#[inline(always)]
pub fn arg_inode_id(inode: u64) -> KFileId {
    // SAFETY: `inode` is a `struct inode *` argument of a BTF tracepoint; the verifier
    // turns these loads into fault-tolerant ones and checks each offset's field.
    unsafe {
        let sb = core::ptr::read_volatile((inode + off::OFF_INODE_I_SB()) as *const u64);
        let dev = core::ptr::read_volatile((sb + off::OFF_SB_S_DEV()) as *const u32);
        let ino = core::ptr::read_volatile((inode + off::OFF_INODE_I_INO()) as *const u64);
        KFileId {
            dev: dev as u64,
            ino,
        }
    }
}

/// The `MARK_FS` entry of filesystem `dev`, if it is watched.
#[inline(always)]
fn fs_of(dev: u64) -> Option<MarkFs> {
    let mut i = 0;
    while i < MARK_FS_MAX {
        let fs = MARK_FS.get(i)?;
        if fs.words == 0 {
            return None;
        }
        if fs.dev == dev {
            return Some(*fs);
        }
        i += 1;
    }
    None
}

/// The word holding bit `bit` of `fs`'s bits, and the bit's mask.
#[inline(always)]
fn word_of(fs: &MarkFs, bit: u64) -> Option<(*mut u64, u64)> {
    let word = bit >> 6;
    if word >= fs.words {
        return None;
    }
    let p = MARKS.get_ptr_mut((fs.base + word) as u32)?;
    Some((p, 1u64 << (bit & 63)))
}

#[inline(always)]
fn bit_set((p, mask): (*mut u64, u64)) -> bool {
    // SAFETY: an ARRAY value pointer; a racing update only makes this read old or new.
    unsafe { core::ptr::read_volatile(p) & mask != 0 }
}

/// Whether `id` is marked: one bit of an exact bitmap, or two bits of a bloom filter
/// and then (only on a hit) an exact lookup.
#[inline(always)]
pub fn is_marked_id(id: KFileId) -> bool {
    let Some(fs) = fs_of(id.dev) else {
        return false;
    };
    if fs.bloom_log2 == 0 {
        return word_of(&fs, id.ino).is_some_and(bit_set);
    }
    let (a, b) = bloom_bits(id.ino, fs.bloom_log2);
    word_of(&fs, a).is_some_and(bit_set)
        && word_of(&fs, b).is_some_and(bit_set)
        // SAFETY: only presence is checked.
        && unsafe { MARK_EXACT.get(&id) }.is_some()
}

/// Marks `id` (a new inode in a marked directory).
#[inline(always)]
pub fn set_mark(id: KFileId) {
    let Some(fs) = fs_of(id.dev) else {
        return;
    };
    let (a, b) = if fs.bloom_log2 == 0 {
        (id.ino, id.ino)
    } else {
        // In the exact map first: a reader that sees the bloom bits finds it there.
        if MARK_EXACT.insert(&id, &1, 0).is_err() {
            record_unmarked();
            return;
        }
        bloom_bits(id.ino, fs.bloom_log2)
    };
    for bit in [a, b] {
        if let Some((p, mask)) = word_of(&fs, bit) {
            // SAFETY: an ARRAY value pointer, 8-aligned; the agent updates the same
            // words with atomic operations through its mapping.
            unsafe { atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(p, mask) };
        }
    }
}

/// Unmarks `id` (its inode is freed: the number may be reused by an unrelated file).
/// A bloom filter's bits stay (others may share them): the exact entry goes.
#[inline(always)]
pub fn clear_mark(id: KFileId) {
    let Some(fs) = fs_of(id.dev) else {
        return;
    };
    if fs.bloom_log2 == 0 {
        if let Some((p, mask)) = word_of(&fs, id.ino) {
            // SAFETY: as in `set_mark`.
            unsafe { atomic_and::<u64, u64, { AtomicOrdering::Relaxed }>(p, !mask) };
        }
    } else {
        let _ = MARK_EXACT.remove(&id);
    }
}

/// A new inode the exact map had no room for: counted, and its writes are not
/// captured (the agent reports the count as a degraded capture).
#[inline(always)]
fn record_unmarked() {
    crate::maps::bump(doppel_common::abi::STAT_UNMARKED, 1);
}

/// `inode`'s identity if it is marked (a file or directory of a set).
#[inline(always)]
pub fn marked(inode: u64) -> Option<KFileId> {
    let id = inode_id(inode)?;
    is_marked_id(id).then_some(id)
}

/// [`marked`] for an inode handed in by the tracepoint: the unwatched fast path.
#[inline(always)]
pub fn arg_marked(inode: u64) -> Option<KFileId> {
    let id = arg_inode_id(inode);
    is_marked_id(id).then_some(id)
}

/// A change of an inode handed in by the tracepoint that is marked, made by a process
/// whose changes count: the inode's identity and the process.
#[inline(always)]
pub fn arg_marked_change(inode: u64) -> Option<(KFileId, u32)> {
    let file = arg_marked(inode)?;
    let pid = tgid();
    (!ignored(pid)).then_some((file, pid))
}

/// Whether `file`'s filesystem is covered by the bitmap: its writes are reported here,
/// not by the `sys_exit` or io_uring programs.
#[inline(always)]
pub fn covers(file: &KFileId) -> bool {
    fs_of(file.dev).is_some()
}

/// The directory of `inode`'s first name, or zeros when it has none (yet).
#[inline(always)]
pub fn parent_or_none(inode: u64) -> KFileId {
    first_parent(inode).unwrap_or(KFileId { dev: 0, ino: 0 })
}

/// xarray entries (include/linux/xarray.h): internal entries end in binary 10; a node
/// pointer is an internal entry above 4096, a sibling one below 62 << 2.
#[inline(always)]
fn xa_is_node(e: u64) -> bool {
    e & 3 == 2 && e > 4096
}

#[inline(always)]
fn xa_is_sibling(e: u64) -> bool {
    e & 3 == 2 && e < (62 << 2)
}

/// Deepest xarray walked: 64^6 pages of 4 KiB is 256 TiB, more than any file here.
const XA_MAX_DEPTH: usize = 6;

/// The folio at page `index` of the page cache of `mapping`, if it is there.
#[inline(always)]
pub fn folio_at(mapping: u64, index: u64) -> Option<u64> {
    let mut entry = rk::<u64>(mapping + off::OFF_MAPPING_XA_HEAD())?;
    if !xa_is_node(entry) {
        // A lone entry stands for index 0 only.
        return (index == 0 && entry != 0 && entry & 3 == 0).then_some(entry);
    }
    let slots = off::OFF_XA_NODE_SLOTS();
    for _ in 0..XA_MAX_DEPTH {
        if !xa_is_node(entry) {
            break;
        }
        let node = entry - 2;
        let shift = rk::<u8>(node + off::OFF_XA_NODE_SHIFT())? as u64;
        let slot = (index >> (shift & 63)) & 63;
        entry = rk::<u64>(node + slots + slot * 8)?;
        if xa_is_sibling(entry) {
            entry = rk::<u64>(node + slots + ((entry >> 2) & 63) * 8)?;
        }
    }
    // Null, a value (shadow) entry or an internal one: no folio.
    (entry != 0 && entry & 3 == 0).then_some(entry)
}

/// Kernel address of the byte at `pos` of the page cache `mapping`, in a folio that holds
/// at least `len` bytes from there; `None` when it cannot be found that way.
#[inline(always)]
fn cached_bytes(mapping: u64, pos: u64, len: u64) -> Option<u64> {
    let folio = folio_at(mapping, pos >> PAGE_SHIFT)?;
    if rk::<u64>(folio + off::OFF_FOLIO_MAPPING())? != mapping {
        return None;
    }
    let first = rk::<u64>(folio + off::OFF_FOLIO_INDEX())? << PAGE_SHIFT;
    let skip = pos.checked_sub(first)?;
    if skip + len > MAX_FOLIO {
        return None;
    }
    // ext4 attaches buffer heads to a folio it writes (write_begin); the first one's
    // data is the folio's start in the kernel's direct map.
    let bh = rk_ptr(folio + off::OFF_FOLIO_PRIVATE())?;
    let data = rk_ptr(bh + off::OFF_BH_B_DATA())?;
    if data & ((1 << PAGE_SHIFT) - 1) != 0 {
        return None;
    }
    Some(data + skip)
}

/// A buffered write put `copied` bytes at `pos` into the page cache.
#[inline(always)]
fn write_end(ctx: &BtfTracePointContext) {
    // TP_PROTO(struct inode *inode, loff_t pos, unsigned int len, unsigned int copied)
    let inode: u64 = ctx.arg(0);
    let pos: u64 = ctx.arg(1);
    let len: u64 = ctx.arg::<u64>(2) & 0xffff_ffff;
    let copied: u64 = ctx.arg::<u64>(3) & 0xffff_ffff;
    if copied == 0 {
        return;
    }
    let Some((file, pid)) = arg_marked_change(inode) else {
        return;
    };
    let parent = parent_or_none(inode);
    // A short copy into a folio that was not up to date is thrown away and retried by
    // the kernel: its bytes are not the file's. Read back whatever the file ends with.
    let mapping = rk_ptr(inode + off::OFF_INODE_I_MAPPING());
    let src = if copied < len || copied > INLINE_CAP as u64 {
        None
    } else {
        mapping.and_then(|m| cached_bytes(m, pos, copied))
    };
    match (src, scratch()) {
        (Some(src), Some(s)) => {
            send_bytes(s, pid, &file, &parent, pos, src, copied, Source::Kernel)
        }
        _ => report_dirty(pid, &file, &parent, pos, copied),
    }
    keep_hot(mapping, pid, file, parent, pos, copied);
}

/// In a file mapped shared and writable, the pages a buffered write dirtied take stores
/// without a trace (a dirty page reports nothing): they are kept hot.
#[inline(always)]
pub fn keep_hot(
    mapping: Option<u64>,
    pid: u32,
    file: KFileId,
    parent: KFileId,
    pos: u64,
    len: u64,
) {
    if mapping.is_some_and(crate::mmap::mapped_writable) {
        let first = pos & !((1 << PAGE_SHIFT) - 1);
        let end = (pos + len + (1 << PAGE_SHIFT) - 1) & !((1 << PAGE_SHIFT) - 1);
        crate::mmap::report_hot(pid, file, parent, first, end - first);
    }
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

/// A direct write begins: remembered, with its buffer, until it completes (direct
/// reads are not looked at).
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
    let task = bpf_get_current_pid_tgid();
    let pid = (task >> 32) as u32;
    if ignored(pid) {
        return 0;
    }
    let len = rk::<u64>(iter + off::OFF_ITER_COUNT()).unwrap_or(0);
    let ubuf = rk::<u8>(iter + off::OFF_ITER_TYPE()).map(u64::from) == Some(off::ITER_UBUF());
    let buf = if ubuf && len <= INLINE_CAP as u64 {
        rk::<u64>(iter + off::OFF_ITER_UBUF()).unwrap_or(0)
            + rk::<u64>(iter + off::OFF_ITER_IOV_OFFSET()).unwrap_or(0)
    } else {
        0
    };
    let write = DioWrite {
        file,
        parent: parent_or_none(inode),
        offset: rk::<u64>(iocb + off::OFF_KIOCB_POS()).unwrap_or(0),
        len,
        task,
        buf,
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

/// A direct I/O completed: the bytes are on the disk now. A synchronous write completes
/// in its submitter, whose buffer is still at hand: its bytes are sent. An asynchronous
/// one (Linux AIO) completes in a worker or an interrupt, without the submitter's
/// memory: its range is reported for the agent to read back. So does a write that
/// failed or fell short, which may still have changed some bytes.
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
    if w.len == 0 {
        return 0;
    }
    let pid = (w.task >> 32) as u32;
    let whole = ret >= 0 && ret as u64 == w.len;
    if whole && w.buf != 0 && bpf_get_current_pid_tgid() == w.task {
        if let Some(s) = scratch() {
            send_bytes(
                s,
                pid,
                &w.file,
                &w.parent,
                w.offset,
                w.buf,
                w.len,
                Source::User,
            );
            return 0;
        }
    }
    report_dirty(pid, &w.file, &w.parent, w.offset, w.len);
    0
}

/// A new inode in a marked directory is marked before it gets a name.
#[btf_tracepoint(function = "ext4_allocate_inode")]
pub fn doppel_allocate_inode(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct inode *inode, struct inode *dir, int mode)
    let inode: u64 = ctx.arg(0);
    let dir: u64 = ctx.arg(1);
    if arg_marked(dir).is_some() {
        set_mark(arg_inode_id(inode));
    }
    0
}

/// A freed inode loses its mark: its number may be reused for an unrelated file.
#[btf_tracepoint(function = "ext4_free_inode")]
pub fn doppel_free_inode(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct inode *inode)
    clear_mark(arg_inode_id(ctx.arg(0)));
    0
}

/// Does nothing: `cargo xtask bench capture` attaches it alone (`doppel-agent
/// bench-floor`) to measure the floor of any program that runs per buffered write.
#[btf_tracepoint(function = "ext4_da_write_end")]
pub fn doppel_floor(_ctx: BtfTracePointContext) -> i32 {
    0
}
