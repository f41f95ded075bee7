//! Records the eBPF program writes into the ring buffer, and the keys/values of the maps
//! it shares with the agent. `#[repr(C)]`, no_std, no allocation: the kernel side
//! (`ebpf/`) builds this crate with default features off.
//!
//! Every ring record starts with a [`Header`]. Two layouts follow it:
//!
//! - [`FileRecord`] (`KIND_DATA`, `KIND_DIRTY`): a byte range of one file. A `KIND_DATA`
//!   record is followed by exactly `len` bytes of data (`len <= CHUNK_SIZE`).
//! - [`NsRecord`] (`KIND_OPEN`, `KIND_MKDIR`, `KIND_UNLINK`, `KIND_RENAME`,
//!   `KIND_TRUNCATE`, `KIND_FTRUNCATE`): a namespace or size change. Path bytes follow
//!   the fixed part: path 0 at `NS_RECORD_SIZE`, path 1 (rename's target) at
//!   `NS_RECORD_SIZE + PATH_CAP`. The record ends right after the last path used, so
//!   ring usage stays proportional to the path lengths.
//!
//! Device numbers in this module are in the *kernel* encoding (`major << 20 | minor`);
//! the agent converts them to the `st_dev` encoding before anything else sees them.

/// Bytes of data carried by one `KIND_DATA` record. A write is split into chunks of
/// this size (the last one shorter).
pub const CHUNK_SIZE: usize = 4096;
/// Writes up to this many bytes are copied into the ring buffer; larger writes become a
/// single `KIND_DIRTY` record and the agent reads the bytes from the file.
pub const INLINE_CAP: usize = 64 * 1024;
/// Most chunks one write can produce (`INLINE_CAP / CHUNK_SIZE`): the kernel loop bound.
pub const MAX_CHUNKS: usize = INLINE_CAP / CHUNK_SIZE;
/// Bytes reserved for one path argument, including the kernel's terminating NUL: at most
/// `PATH_CAP - 1` bytes of a path are copied; longer paths are flagged truncated.
pub const PATH_CAP: usize = 512;

/// Record kinds ([`Header::kind`]).
pub const KIND_DATA: u32 = 1;
pub const KIND_DIRTY: u32 = 2;
/// `open`/`openat`/`openat2`/`creat` that succeeded with `O_CREAT` and/or `O_TRUNC`.
/// `file`/`parent` are known (from the returned fd), `flags` are the open flags.
pub const KIND_OPEN: u32 = 3;
/// `mkdir`/`mkdirat`.
pub const KIND_MKDIR: u32 = 4;
/// `unlink`/`unlinkat`/`rmdir`; `flags & AT_REMOVEDIR` says a directory went.
pub const KIND_UNLINK: u32 = 5;
/// `rename`/`renameat`/`renameat2`; path 0 is the source, path 1 the target.
pub const KIND_RENAME: u32 = 6;
/// `truncate(2)` on a path; `size` is the new size.
pub const KIND_TRUNCATE: u32 = 7;
/// `ftruncate(2)`; `file`/`parent` are known, no path.
pub const KIND_FTRUNCATE: u32 = 8;

/// An attribute change: `chmod`, `chown`, `utimensat` and friends, `setxattr`,
/// `removexattr` (`flags`: `ATTR_*`). fd-based calls have `file`/`parent` set and no
/// path; path-based ones have one path.
pub const KIND_ATTR: u32 = 9;
/// `link`/`linkat`: path 0 is the existing name, path 1 the new one.
pub const KIND_LINK: u32 = 10;
/// An entry of any type was made at path 0 (`symlink`, `symlinkat`, `mknod`,
/// `mknodat`): the agent looks at what is there.
pub const KIND_MADE: u32 = 11;
/// `fallocate(2)`: `file`/`parent` known, `flags` = mode, `offset`, `size` = length.
pub const KIND_FALLOC: u32 = 12;
/// A [`FileRecord`] (no data): pages `[offset, offset + len)` of a file mapped shared
/// and writable became dirty (`writeback_dirty_folio`), most likely through a store
/// into the mapping. They stay "hot" until a writeback begun after their last store ends.
pub const KIND_MAP_DIRTY: u32 = 13;
/// A [`FileRecord`] (no data): writeback of a file with hot pages began (`len` =
/// [`WRITEBACK_BEGIN`]) or ended ([`WRITEBACK_END`]).
pub const KIND_WRITEBACK: u32 = 14;
/// An [`NsRecord`] without paths: `mmap(MAP_SHARED)` of a file that is or may become
/// writable through the mapping; `offset` and `size` give the mapped range. Pages dirty
/// already (written by `write(2)`) would not report stores, so the agent writes them
/// back and reads the range once.
pub const KIND_MAPPED: u32 = 15;
/// A [`FileRecord`] (no data): `ext4_setattr` set the size of a marked file (truncate,
/// `O_TRUNC`, up or down). The agent reads the size the file has now.
pub const KIND_RESIZED: u32 = 16;
/// A [`FileRecord`] (no data): a marked inode's times (or other attributes) may have
/// changed (`ext4_dirty_inode`): the agent sends its attributes as they are.
pub const KIND_TOUCHED: u32 = 17;
/// A [`FileRecord`] (no data): a marked file was fsynced or fdatasynced: writes before
/// it are ordered before writes to any file after it.
pub const KIND_SYNCED: u32 = 18;
/// A [`FileRecord`] (no data): `[offset, offset + len)` of a marked file is about to
/// share another file's blocks (a reflink: `copy_file_range`, `FICLONERANGE` on xfs).
/// The agent reads the range now and once the remap is surely over.
pub const KIND_REMAPPED: u32 = 19;
pub const WRITEBACK_BEGIN: u64 = 0;
pub const WRITEBACK_END: u64 = 1;

/// [`NsRecord::flags`] of `KIND_ATTR`: extended attributes changed (else mode, owner
/// or times).
pub const ATTR_XATTR: u32 = 1;
/// [`NsRecord::flags`] of `KIND_ATTR`: the call did not follow a symlink at the path.
pub const ATTR_NOFOLLOW: u32 = 2;

/// `AT_REMOVEDIR`, as the kernel program reports `rmdir` in [`NsRecord::flags`].
pub const AT_REMOVEDIR: u32 = 0x200;
/// The `O_CREAT` and `O_TRUNC` open flags (x86_64/generic values).
pub const O_CREAT: u32 = 0o100;
pub const O_TRUNC: u32 = 0o1000;

/// Values of the `WATCHED_DIRS` map.
/// Files directly inside this directory are watched (data, creates, truncates).
pub const WATCH_CONTENTS: u32 = 1;
/// The directory leads to a watched one: only lets relative path-based events through.
pub const WATCH_ANCESTOR: u32 = 2;

/// Indices of the per-CPU `STATS` array.
pub const STAT_EVENTS: u32 = 0;
pub const STAT_DATA_BYTES: u32 = 1;
pub const STAT_MISSED: u32 = 2;
pub const STAT_LOST: u32 = 3;
/// New inodes in marked directories that `MARK_EXACT` had no room for.
pub const STAT_UNMARKED: u32 = 4;
pub const STAT_COUNT: u32 = 5;

/// Map names, shared so the agent and the program cannot disagree.
pub const MAP_RING: &str = "RING";
pub const MAP_WATCHED_DIRS: &str = "WATCHED_DIRS";
/// (dev, ino) of hard-linked files inside the sets: captured whatever name (in or out
/// of a watched directory) they are written through.
pub const MAP_LINKED_FILES: &str = "LINKED_FILES";
pub const MAP_IGNORE_TGIDS: &str = "IGNORE_TGIDS";
pub const MAP_MISSED_RANGES: &str = "MISSED_RANGES";
pub const MAP_CONTROL: &str = "CONTROL";
pub const MAP_STATS: &str = "STATS";
/// The one program, attached to the `sys_exit` raw tracepoint.
pub const PROG_SYS_EXIT: &str = "doppel_sys_exit";
/// io_uring completions (raw tracepoint `io_uring_complete`).
pub const PROG_URING_COMPLETE: &str = "doppel_uring_complete";
/// io_uring path-based requests, staged at submission (`io_uring_submit_req`).
pub const PROG_URING_SUBMIT: &str = "doppel_uring_submit";
/// io_uring completions that overflowed the CQ ring (`io_uring_cqe_overflow`).
pub const PROG_URING_OVERFLOW: &str = "doppel_uring_overflow";
/// Pages dirtied in files mapped shared (raw tracepoint `writeback_dirty_folio`).
pub const PROG_DIRTY_FOLIO: &str = "doppel_dirty_folio";
/// Writeback of a mapped file began / ended (`sb_mark_inode_writeback`,
/// `sb_clear_inode_writeback`).
pub const PROG_WRITEBACK_BEGIN: &str = "doppel_writeback_begin";
pub const PROG_WRITEBACK_END: &str = "doppel_writeback_end";

/// Capture inside the filesystem (ebpf/src/fs.rs): buffered writes reaching ext4.
pub const PROG_EXT4_DA_WRITE_END: &str = "doppel_ext4_da_write_end";
pub const PROG_EXT4_WRITE_END: &str = "doppel_ext4_write_end";
pub const PROG_EXT4_JOURNALLED_WRITE_END: &str = "doppel_ext4_journalled_write_end";
/// Direct writes through iomap (ext4, xfs): begin and completion.
pub const PROG_DIO_BEGIN: &str = "doppel_dio_begin";
pub const PROG_DIO_COMPLETE: &str = "doppel_dio_complete";
/// An empty program on `ext4_da_write_end`, for benchmarks: the floor of a per-write hook.
pub const PROG_FLOOR: &str = "doppel_floor";
/// New inodes in marked directories are marked; freed ones are unmarked.
pub const PROG_ALLOCATE_INODE: &str = "doppel_allocate_inode";
pub const PROG_FREE_INODE: &str = "doppel_free_inode";
/// Sizes, fallocate and shared-mapping faults of marked files (ebpf/src/fs_meta.rs).
pub const PROG_EXT4_SETATTR: &str = "doppel_ext4_setattr";
pub const PROG_EXT4_TRUNCATE: &str = "doppel_ext4_truncate";
pub const PROG_EXT4_FALLOCATE: &str = "doppel_ext4_fallocate";
pub const PROG_EXT4_SYNC_FILE: &str = "doppel_ext4_sync_file";
pub const PROG_EXT4_PUNCH_HOLE: &str = "doppel_ext4_punch_hole";
pub const PROG_EXT4_ZERO_RANGE: &str = "doppel_ext4_zero_range";
pub const PROG_EXT4_COLLAPSE_RANGE: &str = "doppel_ext4_collapse_range";
pub const PROG_EXT4_INSERT_RANGE: &str = "doppel_ext4_insert_range";
pub const PROG_FILEMAP_FAULT: &str = "doppel_filemap_fault";
pub const PROG_FILEMAP_MAP_PAGES: &str = "doppel_filemap_map_pages";
/// Programs inside xfs and iomap (ebpf/src/xfs.rs).
pub const PROG_XFS_BUFFERED_WRITE: &str = "doppel_xfs_buffered_write";
pub const PROG_IOMAP_ITER: &str = "doppel_iomap_iter";
pub const PROG_XFS_TRUNCATE: &str = "doppel_xfs_truncate";
pub const PROG_XFS_ZERO_EOF: &str = "doppel_xfs_zero_eof";
pub const PROG_XFS_UPDATE_TIME: &str = "doppel_xfs_update_time";
pub const PROG_XFS_SETATTR: &str = "doppel_xfs_setattr";
pub const PROG_XFS_FSYNC: &str = "doppel_xfs_fsync";
pub const PROG_XFS_ALLOC_SPACE: &str = "doppel_xfs_alloc_space";
pub const PROG_XFS_FREE_SPACE: &str = "doppel_xfs_free_space";
pub const PROG_XFS_ZERO_SPACE: &str = "doppel_xfs_zero_space";
pub const PROG_XFS_COLLAPSE_SPACE: &str = "doppel_xfs_collapse_space";
pub const PROG_XFS_INSERT_SPACE: &str = "doppel_xfs_insert_space";
pub const PROG_XFS_SF_ADDNAME: &str = "doppel_xfs_sf_addname";
pub const PROG_XFS_BLOCK_ADDNAME: &str = "doppel_xfs_block_addname";
pub const PROG_XFS_LEAF_ADDNAME: &str = "doppel_xfs_leaf_addname";
pub const PROG_XFS_NODE_ADDNAME: &str = "doppel_xfs_node_addname";
pub const PROG_XFS_IUNLINK_REMOVE: &str = "doppel_xfs_iunlink_remove";
pub const PROG_XFS_REMAP: &str = "doppel_xfs_remap";
/// The inode bitmap (one bit per inode number of each filesystem in `MARK_FS`).
pub const MAP_MARKS: &str = "MARKS";
pub const MAP_MARK_FS: &str = "MARK_FS";
/// Inodes marked on filesystems whose bits are a bloom filter (`KFileId` -> 1).
pub const MAP_MARK_EXACT: &str = "MARK_EXACT";
/// Most filesystems whose inodes the bitmap covers.
pub const MARK_FS_MAX: u32 = 8;

/// Capacity of `WATCHED_DIRS` (allocated on insert, so unused capacity costs nothing).
pub const WATCHED_DIRS_MAX: u32 = 1 << 20;
pub const LINKED_FILES_MAX: u32 = 1 << 16;
/// Capacity of `IGNORE_TGIDS`.
pub const IGNORE_TGIDS_MAX: u32 = 4096;
/// Capacity of `MISSED_RANGES`. When it is full the program counts the record as lost.
pub const MISSED_RANGES_MAX: u32 = 16384;
/// Index in the `CONTROL` array of the current missed-range generation.
pub const CONTROL_MISSED_GEN: u32 = 0;
pub const CONTROL_COUNT: u32 = 1;

/// A file or directory identity as the kernel sees it (kernel dev_t encoding).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct KFileId {
    pub dev: u64,
    pub ino: u64,
}

/// Start of every ring record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// One of the `KIND_*` constants.
    pub kind: u32,
    /// Thread-group id (the process id as user space knows it).
    pub pid: u32,
    /// CLOCK_MONOTONIC (ns) when the change was complete (at syscall exit). The agent
    /// compares it with the time of its directory scans: an event older than a scan is
    /// already reflected in what the scan read.
    pub ktime: u64,
}

/// `KIND_DATA` / `KIND_DIRTY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileRecord {
    pub hdr: Header,
    pub file: KFileId,
    /// The directory the file was reached through (its dentry's parent).
    pub parent: KFileId,
    pub offset: u64,
    /// `KIND_DATA`: bytes that follow this struct. `KIND_DIRTY`: length of the range.
    pub len: u64,
}
pub const FILE_RECORD_SIZE: usize = core::mem::size_of::<FileRecord>();

/// One path argument of a namespace record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathSlot {
    /// The directory a relative path starts from (dirfd's or cwd's inode); meaningful
    /// only when `has_base != 0`.
    pub base: KFileId,
    /// The dirfd argument, `-100` (`AT_FDCWD`) for the non-`at` syscalls.
    pub dirfd: i32,
    /// Bytes of path stored in the record (without NUL), `<= PATH_CAP - 1`.
    pub len: u16,
    /// Non-zero: the path was longer than what was copied (or unreadable, if `len == 0`).
    pub truncated: u8,
    /// Non-zero: `base` is set (the path is relative).
    pub has_base: u8,
}

/// Every kind but `KIND_DATA` and `KIND_DIRTY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NsRecord {
    pub hdr: Header,
    /// Open flags, unlinkat flags (`AT_REMOVEDIR`), or renameat2 flags.
    pub flags: u32,
    /// Mode argument of open/creat/mkdir.
    pub mode: u32,
    /// `KIND_OPEN`, `KIND_FTRUNCATE`: the file (from the fd).
    pub file: KFileId,
    /// `KIND_OPEN`, `KIND_FTRUNCATE`: its directory.
    pub parent: KFileId,
    /// `KIND_TRUNCATE`, `KIND_FTRUNCATE`: the new size. `KIND_FALLOC`: the length.
    pub size: u64,
    /// `KIND_FALLOC`: the offset.
    pub offset: u64,
    /// How many entries of `paths` are used (0, 1 or 2).
    pub npaths: u32,
    pub _pad: u32,
    pub paths: [PathSlot; 2],
}
pub const NS_RECORD_SIZE: usize = core::mem::size_of::<NsRecord>();

/// Largest record the program ever writes; size of its per-CPU scratch buffer.
pub const MAX_RECORD_SIZE: usize = if FILE_RECORD_SIZE + CHUNK_SIZE > NS_RECORD_SIZE + 2 * PATH_CAP
{
    FILE_RECORD_SIZE + CHUNK_SIZE
} else {
    NS_RECORD_SIZE + 2 * PATH_CAP
};

/// Key of `MISSED_RANGES`: a file, and the drain generation the range was recorded in
/// (see the agent's drain loop: it bumps the generation, then collects the older ones).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MissedKey {
    pub file: KFileId,
    pub gen: u64,
}

/// Value of `MISSED_RANGES`: the union `[start, end)` of the byte ranges that could not be
/// put into the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MissedRange {
    pub start: u64,
    pub end: u64,
}

/// A value of `MARK_FS`: the bits of filesystem `dev` (kernel encoding) are words
/// `[base, base + words)` of `MARKS`. With `bloom_log2 == 0` they are exact: bit
/// `ino % 64` of word `base + ino / 64` is inode `ino`'s. Otherwise (a filesystem whose
/// inode numbers are too sparse for that, as a large xfs) they are a bloom filter of
/// `1 << bloom_log2` bits ([`bloom_bits`]), and a hit is confirmed in `MARK_EXACT`.
/// `words == 0` ends the list.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MarkFs {
    pub dev: u64,
    pub base: u64,
    pub words: u64,
    pub bloom_log2: u64,
}

/// Bits of a bloom filter of `1 << log2` bits (6 < log2 < 64) that inode `ino` sets: two
/// multiplicative hashes (splitmix64's finalizer), the same in the kernel program and
/// the agent.
#[inline(always)]
pub const fn bloom_bits(ino: u64, log2: u64) -> (u64, u64) {
    let mut h = ino ^ (ino >> 30);
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    let a = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    let b = (a ^ (a >> 31)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let shift = (64 - log2) & 63;
    (a >> shift, b >> shift)
}

/// A direct write between its begin and its completion (kernel-internal map value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DioWrite {
    pub file: KFileId,
    pub parent: KFileId,
    pub offset: u64,
    pub len: u64,
    /// `bpf_get_current_pid_tgid()` of the submitter.
    pub task: u64,
    /// The caller's buffer when it is one plain buffer of at most `INLINE_CAP` bytes
    /// (0 otherwise): copied at completion if that runs in the submitter.
    pub buf: u64,
}

// The layouts are part of the contract with the kernel program: pin the sizes so a
// change shows up as a compile error on both sides rather than as garbled records.
const _: () = assert!(core::mem::size_of::<Header>() == 16);
const _: () = assert!(FILE_RECORD_SIZE == 64);
const _: () = assert!(core::mem::size_of::<PathSlot>() == 24);
const _: () = assert!(NS_RECORD_SIZE == 128);
const _: () = assert!(core::mem::size_of::<MarkFs>() == 32);
const _: () = assert!(FILE_RECORD_SIZE.is_multiple_of(8) && NS_RECORD_SIZE.is_multiple_of(8));
const _: () = assert!(PATH_CAP.is_power_of_two() && CHUNK_SIZE.is_power_of_two());
const _: () = assert!(MAX_CHUNKS * CHUNK_SIZE == INLINE_CAP);
