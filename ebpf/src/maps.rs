//! Maps shared with the agent, the in-kernel filter, and the "ring full" fallback.

use aya_ebpf::{
    helpers::generated::bpf_ringbuf_output,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use doppel_common::abi::{
    KFileId, MissedKey, MissedRange, CONTROL_COUNT, CONTROL_MISSED_GEN, IGNORE_TGIDS_MAX,
    LINKED_FILES_MAX, MAX_RECORD_SIZE, MISSED_RANGES_MAX, STAT_COUNT, STAT_LOST, STAT_MISSED,
    WATCHED_DIRS_MAX, WATCH_CONTENTS,
};

/// `BPF_F_NO_PREALLOC`: entries are allocated on insert (only the agent inserts).
const BPF_F_NO_PREALLOC: u32 = 1;
/// `BPF_NOEXIST`.
const BPF_NOEXIST: u64 = 1;

/// Records for the agent. The agent sets the real size at load time.
#[map]
pub static RING: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// (dev, ino) of watched directories -> `WATCH_CONTENTS` or `WATCH_ANCESTOR`.
#[map]
static WATCHED_DIRS: HashMap<KFileId, u32> =
    HashMap::with_max_entries(WATCHED_DIRS_MAX, BPF_F_NO_PREALLOC);

/// (dev, ino) of hard-linked files inside the sets (the value is unused).
#[map]
static LINKED_FILES: HashMap<KFileId, u32> =
    HashMap::with_max_entries(LINKED_FILES_MAX, BPF_F_NO_PREALLOC);

/// Thread-group ids whose syscalls are never captured (the agent itself, at least).
#[map]
static IGNORE_TGIDS: HashMap<u32, u32> = HashMap::with_max_entries(IGNORE_TGIDS_MAX, 0);

/// Byte ranges that did not fit into the ring. A plain hash (not LRU): an LRU would evict
/// ranges silently, whereas a full hash makes the insert fail and we count a loss.
#[map]
static MISSED_RANGES: HashMap<MissedKey, MissedRange> =
    HashMap::with_max_entries(MISSED_RANGES_MAX, 0);

/// Control words written by the agent (`CONTROL_MISSED_GEN`).
#[map]
static CONTROL: Array<u64> = Array::with_max_entries(CONTROL_COUNT, 0);

/// Per-CPU counters, indexed by `STAT_*`.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

/// Per-CPU staging area: records are assembled here and copied into the ring with their
/// exact length (`bpf_ringbuf_reserve` only takes constant sizes, which would make every
/// small write cost a whole chunk of ring space).
#[repr(C, align(8))]
pub struct Scratch {
    pub buf: [u8; MAX_RECORD_SIZE],
}

#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn scratch() -> Option<*mut u8> {
    SCRATCH.get_ptr_mut(0).map(|p| p as *mut u8)
}

#[inline(always)]
pub fn bump(stat: u32, by: u64) {
    if let Some(p) = STATS.get_ptr_mut(stat) {
        // SAFETY: per-CPU slot; programs do not nest on one CPU.
        unsafe { *p += by };
    }
}

/// Watch flags of a directory (0 if not watched).
#[inline(always)]
pub fn watch_flags(dir: &KFileId) -> u32 {
    // SAFETY: the value is read once and copied.
    unsafe { WATCHED_DIRS.get(dir) }.copied().unwrap_or(0)
}

#[inline(always)]
pub fn contents_watched(dir: &KFileId) -> bool {
    watch_flags(dir) & WATCH_CONTENTS != 0
}

#[inline(always)]
pub fn linked(file: &KFileId) -> bool {
    // SAFETY: only presence is checked.
    unsafe { LINKED_FILES.get(file) }.is_some()
}

#[inline(always)]
pub fn ignored(tgid: u32) -> bool {
    // SAFETY: only presence is checked.
    unsafe { IGNORE_TGIDS.get(tgid) }.is_some()
}

/// Copies `len` bytes of the scratch buffer into the ring. `len` must already be bounded
/// by `MAX_RECORD_SIZE` in a way the verifier can see.
#[inline(always)]
pub fn output(buf: *mut u8, len: u64) -> bool {
    // SAFETY: `buf` is the scratch map value, `len <= MAX_RECORD_SIZE`.
    let r = unsafe {
        bpf_ringbuf_output(
            core::ptr::addr_of!(RING) as *mut core::ffi::c_void,
            buf as *mut core::ffi::c_void,
            len,
            0,
        )
    };
    r == 0
}

/// Remembers that `[start, end)` of `file` could not be sent. Never blocks; if even the
/// missed-range map is full, counts one lost record so the agent resyncs.
#[inline(always)]
pub fn record_missed(file: &KFileId, start: u64, end: u64) {
    let gen = CONTROL.get(CONTROL_MISSED_GEN).copied().unwrap_or(0);
    let key = MissedKey { file: *file, gen };
    if let Some(v) = MISSED_RANGES.get_ptr_mut(key) {
        // SAFETY: map value pointer. Two CPUs widening the same entry at the same instant
        // can race; the agent resyncs a file's whole dirty range anyway.
        unsafe {
            if start < (*v).start {
                (*v).start = start;
            }
            if end > (*v).end {
                (*v).end = end;
            }
        }
        bump(STAT_MISSED, 1);
        return;
    }
    let range = MissedRange { start, end };
    if MISSED_RANGES.insert(key, range, BPF_NOEXIST).is_ok() {
        bump(STAT_MISSED, 1);
    } else {
        bump(STAT_LOST, 1);
    }
}
