//! Stores through `MAP_SHARED` mappings. They make no syscall, so the only trace they
//! leave is a page becoming dirty (`writeback_dirty_folio`), and a page dirty already
//! does not report later stores. So the agent keeps such pages "hot" and re-reads them
//! until a writeback that began after their last report has ended (after it, the next
//! store must dirty the page again and be reported). This program reports both halves:
//! dirtied pages of files mapped shared and writable, and writeback begin/end of those
//! files.
//!
//! These tracepoints can fire in interrupt context (writeback ends in I/O completion),
//! possibly on a CPU where another of our programs is half-way through the per-CPU
//! scratch buffer: records here are built on the stack.

use aya_ebpf::{
    macros::{map, raw_tracepoint},
    maps::LruHashMap,
    programs::RawTracePointContext,
};
use doppel_common::abi::{KFileId, KIND_MAP_DIRTY, KIND_WRITEBACK, WRITEBACK_BEGIN, WRITEBACK_END};

use crate::{
    bytes::send_range,
    kernel::{first_parent, inode_id, linked_inode, off, rk, rk_ptr, tgid, S_IFMT, S_IFREG},
    maps::{bump, contents_watched, ignored, record_missed},
};

/// x86_64 pages.
const PAGE_SHIFT: u64 = 12;

/// Files (kernel ids) with reported mapped pages: only their writeback is reported.
#[map]
static MAPPED_FILES: LruHashMap<KFileId, u8> = LruHashMap::with_max_entries(16384, 0);

#[raw_tracepoint(tracepoint = "writeback_dirty_folio")]
pub fn doppel_dirty_folio(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct folio *folio, struct address_space *mapping)
    let folio: u64 = ctx.arg(0);
    let mapping: u64 = ctx.arg(1);
    if mapping == 0 {
        return 0;
    }
    // Pages dirtied by write(2) and friends are captured at their syscall; only a file
    // mapped shared and writable somewhere can be changed by stores.
    if !mapped_writable(mapping) {
        return 0;
    }
    let Some(inode) = rk_ptr(mapping + off::OFF_MAPPING_HOST()) else {
        return 0;
    };
    match rk::<u16>(inode + off::OFF_INODE_I_MODE()) {
        Some(m) if m & S_IFMT == S_IFREG => {}
        _ => return 0,
    }
    // As for writes, only the directory of the inode's first name is looked at.
    let Some(parent) = first_parent(inode) else {
        return 0;
    };
    if !contents_watched(&parent) && !linked_inode(inode) {
        return 0;
    }
    let pid = tgid();
    if ignored(pid) {
        return 0;
    }
    let Some(file) = inode_id(inode) else {
        return 0;
    };
    let index = rk::<u64>(folio + off::OFF_FOLIO_INDEX()).unwrap_or(0);
    // A large folio is dirtied as a whole.
    let offset = index << PAGE_SHIFT;
    let len = 1u64 << (PAGE_SHIFT + folio_order(folio));
    report_hot(pid, file, parent, offset, len);
    0
}

/// Pages `[offset, offset + len)` of `file`, mapped shared and writable somewhere, are
/// dirty: stores into them leave no trace until a writeback cleans them, so the agent
/// keeps them hot (re-read at every pass) until then.
#[inline(always)]
pub fn report_hot(pid: u32, file: KFileId, parent: KFileId, offset: u64, len: u64) {
    let _ = MAPPED_FILES.insert(&file, &1, 0);
    if !send_range(KIND_MAP_DIRTY, pid, file, parent, offset, len) {
        record_missed(&file, offset, offset + len);
    }
}

/// The order of `folio` (it spans `1 << order` pages): 0 for a single page, else in
/// the second page's flags.
#[inline(always)]
pub fn folio_order(folio: u64) -> u64 {
    let flags = rk::<u64>(folio + off::OFF_FOLIO_FLAGS()).unwrap_or(0);
    if flags & (1 << (off::PG_HEAD() & 63)) != 0 {
        rk::<u64>(folio + off::OFF_FOLIO_FLAGS_1()).unwrap_or(0) & 0x1f
    } else {
        0
    }
}

/// Whether the file of `mapping` is mapped shared and writable somewhere now.
#[inline(always)]
pub fn mapped_writable(mapping: u64) -> bool {
    matches!(rk::<i32>(mapping + off::OFF_MAPPING_MMAP_WRITABLE()), Some(n) if n > 0)
}

#[inline(always)]
fn writeback(ctx: &RawTracePointContext, phase: u64) {
    // TP_PROTO(struct inode *inode)
    let inode: u64 = ctx.arg(0);
    let Some(file) = inode_id(inode) else {
        return;
    };
    // SAFETY: presence check only.
    if unsafe { MAPPED_FILES.get(&file) }.is_none() {
        return;
    }
    let none = KFileId { dev: 0, ino: 0 };
    if !send_range(KIND_WRITEBACK, 0, file, none, 0, phase) && phase == WRITEBACK_END {
        // The agent keeps the pages hot and re-reads them on its timer until a later
        // writeback ends: late, never lost.
        bump(doppel_common::abi::STAT_MISSED, 1);
    }
}

#[raw_tracepoint(tracepoint = "sb_mark_inode_writeback")]
pub fn doppel_writeback_begin(ctx: RawTracePointContext) -> i32 {
    writeback(&ctx, WRITEBACK_BEGIN);
    0
}

#[raw_tracepoint(tracepoint = "sb_clear_inode_writeback")]
pub fn doppel_writeback_end(ctx: RawTracePointContext) -> i32 {
    writeback(&ctx, WRITEBACK_END);
    0
}
