//! Sizes, allocations and shared mappings of marked files, seen inside ext4 and the
//! page cache: what the `sys_exit` program's `ftruncate`, `fallocate` and `mmap`
//! handlers see at the syscall door, for sets that need no syscall hook at all.
//!
//! - A size set by `truncate`, `ftruncate`, `O_TRUNC` (up or down) reaches
//!   `ext4_setattr`, which marks the inode dirty right after it set the new size
//!   (`ext4_mark_inode_dirty`, whose caller address the tracepoint gives: the agent
//!   hands in where `ext4_setattr`'s code lies). The record says only "its size was
//!   set": the agent reads the size the file has when it handles it, which is the same
//!   or newer, and newer is followed by the records of what made it so. A cut (or a
//!   truncate to the same size) also reaches `ext4_truncate`, whose record carries the
//!   exact size: a cut followed by a growth then leaves zeros on the replica too.
//! - Every `fallocate` mode has its own ext4 tracepoint, fired before the work (one
//!   per call, whatever door the call came in by).
//! - A page of a file mapped shared and writable that is faulted into a mapping may be
//!   dirty already (written by `write(2)`): stores into it would then dirty nothing and
//!   leave no trace. Page-cache faults into such a file are reported as ranges the agent
//!   writes back and reads once (the `KIND_MAPPED` of `mmap(2)` at the syscall door).
//!
//! A record that finds the ring full becomes a missed range (the agent reads it back:
//! the whole file for a size change), so nothing is lost.

use aya_ebpf::{
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use doppel_common::abi::{
    Header, KFileId, NsRecord, KIND_FALLOC, KIND_FTRUNCATE, KIND_MAPPED, KIND_RESIZED, KIND_SYNCED,
    KIND_TOUCHED, NS_RECORD_SIZE,
};

use crate::{
    bytes::send_range,
    fs::{arg_marked_change, marked, parent_or_none},
    kernel::{off, rk, rk_ptr, tgid},
    maps::{bump, ignored, output, record_missed},
};

/// `fallocate` modes of the operations whose tracepoints do not carry one.
pub const FALLOC_FL_KEEP_SIZE: u32 = 0x01;
pub const FALLOC_FL_PUNCH_HOLE: u32 = 0x02;
pub const FALLOC_FL_COLLAPSE_RANGE: u32 = 0x08;
pub const FALLOC_FL_INSERT_RANGE: u32 = 0x20;
/// x86_64 pages.
const PAGE_SHIFT: u64 = 12;

/// `ext4_setattr` set the size of a marked file, or an inode's times changed.
#[btf_tracepoint(function = "ext4_mark_inode_dirty")]
pub fn doppel_ext4_setattr(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct inode *inode, unsigned long IP)
    let ip: u64 = ctx.arg(1);
    // Every other caller (directory changes, extent work, orphans) leaves here.
    let kind = if ip >= off::SETATTR_IP_START() && ip < off::SETATTR_IP_END() {
        KIND_RESIZED
    } else if ip >= off::DIRTY_INODE_IP_START() && ip < off::DIRTY_INODE_IP_END() {
        // `mark_inode_dirty`: times set by `utimensat` (mtime alone is no fanotify
        // ATTRIB event), by a write, or by an access.
        KIND_TOUCHED
    } else {
        return 0;
    };
    let inode: u64 = ctx.arg(0);
    let Some((file, pid)) = arg_marked_change(inode) else {
        return 0;
    };
    if kind == KIND_TOUCHED && accessed_only(inode) {
        return 0;
    }
    if !send_range(kind, pid, file, parent_or_none(inode), 0, 0) && kind == KIND_RESIZED {
        record_missed(&file, 0, u64::MAX);
    }
    // A lost KIND_TOUCHED costs only the times of an entry nothing else touches: the
    // ring was full, which the agent answers with a rescan of what it missed anyway.
    0
}

/// Whether the inode's atime is newer than its ctime: the time update that dirtied it
/// was a read's (relatime), which the replica does not follow. Anything else that
/// changes times (a write, `utimensat`, an attribute change) sets the ctime to now.
/// Looked at here, when it happens: later, another read could hide a `utimensat`.
#[inline(always)]
pub fn accessed_only(inode: u64) -> bool {
    // The nanoseconds' top bits are flags (multigrain timestamps' "queried").
    const NSEC_MASK: u64 = (1 << 30) - 1;
    // SAFETY: a BTF tracepoint's `struct inode *`, as in `fs::arg_inode_id`.
    let (a_sec, a_nsec, c_sec, c_nsec) = unsafe {
        (
            core::ptr::read_volatile((inode + off::OFF_INODE_ATIME_SEC()) as *const i64),
            core::ptr::read_volatile((inode + off::OFF_INODE_ATIME_NSEC()) as *const u32) as u64,
            core::ptr::read_volatile((inode + off::OFF_INODE_CTIME_SEC()) as *const i64),
            core::ptr::read_volatile((inode + off::OFF_INODE_CTIME_NSEC()) as *const u32) as u64,
        )
    };
    (a_sec, a_nsec & NSEC_MASK) > (c_sec, c_nsec & NSEC_MASK)
}

/// A marked file is cut to its size (a shrinking or equal truncate, whose new size is
/// set by now): the exact size, which the size record of `ext4_setattr` above cannot
/// give (the agent reads the size a file has when it handles that one, and a cut
/// followed by a growth would leave the replica the bytes the cut dropped).
#[btf_tracepoint(function = "ext4_truncate_enter")]
pub fn doppel_ext4_truncate(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct inode *inode)
    let inode: u64 = ctx.arg(0);
    let Some((file, pid)) = arg_marked_change(inode) else {
        return 0;
    };
    // SAFETY: a BTF tracepoint's `struct inode *`, as in `fs::arg_inode_id`.
    let size = unsafe { core::ptr::read_volatile((inode + off::OFF_INODE_I_SIZE()) as *const u64) };
    if !send_ns(KIND_FTRUNCATE, pid, file, parent_or_none(inode), 0, 0, size) {
        record_missed(&file, 0, u64::MAX);
    }
    0
}

/// A marked file is fsynced or fdatasynced (`ext4_sync_file_enter`, whatever door: the
/// syscalls, io_uring, `msync`): what was written to it before must reach the replica
/// before what is written to any file after it (a log record, then its data page). The
/// agent puts a barrier into the set's stream there. A record that finds the ring full
/// is dropped: the ring's overflow already makes the agent read ranges back, which it
/// reports as a break in the order.
#[btf_tracepoint(function = "ext4_sync_file_enter")]
pub fn doppel_ext4_sync_file(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct file *file, int datasync)
    let file: u64 = ctx.arg(0);
    // SAFETY: a BTF tracepoint's `struct file *`: the verifier checks the field load.
    let inode = unsafe { core::ptr::read_volatile((file + off::OFF_FILE_F_INODE()) as *const u64) };
    let Some((id, pid)) = arg_marked_change(inode) else {
        return 0;
    };
    send_range(KIND_SYNCED, pid, id, parent_or_none(inode), 0, 0);
    0
}

/// A `fallocate` of `mode` over `[offset, offset + len)` of a marked file begins.
#[inline(always)]
pub fn fallocate(inode: u64, offset: u64, len: u64, mode: u32) {
    let Some((file, pid)) = arg_marked_change(inode) else {
        return;
    };
    let parent = parent_or_none(inode);
    if !send_ns(KIND_FALLOC, pid, file, parent, mode, offset, len) {
        // Read back: from the offset to the end for the modes that move bytes.
        let end = if mode & (FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE) != 0 {
            u64::MAX
        } else {
            offset.saturating_add(len)
        };
        record_missed(&file, offset, end);
    }
}

/// A path-less namespace record built on the stack (these programs run in the
/// caller's context, but a stack record keeps them independent of the scratch buffer).
#[inline(always)]
pub fn send_ns(
    kind: u32,
    pid: u32,
    file: KFileId,
    parent: KFileId,
    flags: u32,
    offset: u64,
    size: u64,
) -> bool {
    let mut rec = NsRecord {
        hdr: Header {
            kind,
            pid,
            // SAFETY: helper without preconditions.
            ktime: unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() },
        },
        flags,
        file,
        parent,
        offset,
        size,
        ..NsRecord::default()
    };
    let ok = output(&mut rec as *mut NsRecord as *mut u8, NS_RECORD_SIZE as u64);
    if ok {
        bump(doppel_common::abi::STAT_EVENTS, 1);
    }
    ok
}

#[btf_tracepoint(function = "ext4_fallocate_enter")]
pub fn doppel_ext4_fallocate(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct inode *inode, loff_t offset, loff_t len, int mode)
    fallocate(ctx.arg(0), ctx.arg(1), ctx.arg(2), ctx.arg::<u64>(3) as u32);
    0
}

#[btf_tracepoint(function = "ext4_punch_hole")]
pub fn doppel_ext4_punch_hole(ctx: BtfTracePointContext) -> i32 {
    // ext4 passes 0 as this tracepoint's mode; a punch always keeps the size.
    fallocate(
        ctx.arg(0),
        ctx.arg(1),
        ctx.arg(2),
        FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
    );
    0
}

#[btf_tracepoint(function = "ext4_zero_range")]
pub fn doppel_ext4_zero_range(ctx: BtfTracePointContext) -> i32 {
    fallocate(ctx.arg(0), ctx.arg(1), ctx.arg(2), ctx.arg::<u64>(3) as u32);
    0
}

#[btf_tracepoint(function = "ext4_collapse_range")]
pub fn doppel_ext4_collapse_range(ctx: BtfTracePointContext) -> i32 {
    // TP_PROTO(struct inode *inode, loff_t offset, loff_t len)
    fallocate(ctx.arg(0), ctx.arg(1), ctx.arg(2), FALLOC_FL_COLLAPSE_RANGE);
    0
}

#[btf_tracepoint(function = "ext4_insert_range")]
pub fn doppel_ext4_insert_range(ctx: BtfTracePointContext) -> i32 {
    fallocate(ctx.arg(0), ctx.arg(1), ctx.arg(2), FALLOC_FL_INSERT_RANGE);
    0
}

/// Pages `[first, last]` of `mapping` were faulted into a mapping.
#[inline(always)]
fn faulted(mapping: u64, first: u64, last: u64) {
    if mapping == 0 {
        return;
    }
    // Only a file mapped shared and writable somewhere can be stored into.
    match rk::<i32>(mapping + off::OFF_MAPPING_MMAP_WRITABLE()) {
        Some(n) if n > 0 => {}
        _ => return,
    }
    let Some(inode) = rk_ptr(mapping + off::OFF_MAPPING_HOST()) else {
        return;
    };
    let Some(file) = marked(inode) else {
        return;
    };
    let pid = tgid();
    if ignored(pid) {
        return;
    }
    // A fault into a large folio may map all of it: the whole folio is reported.
    let (first, last) = match crate::fs::folio_at(mapping, first) {
        Some(folio) => folio_span(folio, first, last),
        None => (first, last),
    };
    let offset = first << PAGE_SHIFT;
    let len = (last.saturating_sub(first) + 1) << PAGE_SHIFT;
    if !send_ns(
        KIND_MAPPED,
        pid,
        file,
        parent_or_none(inode),
        0,
        offset,
        len,
    ) {
        record_missed(&file, offset, offset + len);
    }
}

/// Pages `[first, last]` widened to the folio found at `first` (its index and order).
#[inline(always)]
fn folio_span(folio: u64, first: u64, last: u64) -> (u64, u64) {
    let Some(index) = rk::<u64>(folio + off::OFF_FOLIO_INDEX()) else {
        return (first, last);
    };
    let end = index + (1u64 << crate::mmap::folio_order(folio)) - 1;
    (index.min(first), end.max(last))
}

#[raw_tracepoint(tracepoint = "mm_filemap_fault")]
pub fn doppel_filemap_fault(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct address_space *mapping, pgoff_t index)
    let index: u64 = ctx.arg(1);
    faulted(ctx.arg(0), index, index);
    0
}

#[raw_tracepoint(tracepoint = "mm_filemap_map_pages")]
pub fn doppel_filemap_map_pages(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct address_space *mapping, pgoff_t index, pgoff_t last_index)
    let (first, last): (u64, u64) = (ctx.arg(1), ctx.arg(2));
    faulted(ctx.arg(0), first, last.max(first));
    0
}
