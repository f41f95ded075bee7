//! The user-space view of one captured change, decoded from the ring buffer records
//! in [`crate::abi`]. Produced by the agent's capture stage, consumed by its resolver.
//!
//! Identity is `(dev, ino)` in the *user-space* `st_dev` encoding (what `stat(2)`
//! returns), already converted from the kernel's `major << 20 | minor` form.

/// A file or directory as the kernel knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

/// A path argument of a namespace syscall, as the process passed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathArg {
    /// The directory a relative `path` starts from (the dirfd's directory, or the
    /// process's cwd for `AT_FDCWD`). `None` when `path` is absolute.
    pub base: Option<FileId>,
    /// Process that made the call (for a `/proc/PID/{cwd,fd}` fallback).
    pub pid: u32,
    /// The dirfd argument (`-100` = `AT_FDCWD`).
    pub dirfd: i32,
    /// Raw bytes of the path, without the trailing NUL.
    pub path: Vec<u8>,
    /// The path was longer than the kernel program copies; `path` is a prefix.
    pub truncated: bool,
}

/// A captured change and when it was complete (CLOCK_MONOTONIC, ns). Ranges recovered
/// from the missed-range map carry the time they were drained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    pub time: u64,
    pub event: CaptureEvent,
}

/// Now on the clock [`Captured::time`] uses (the kernel's `bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc_timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { clock_gettime(1, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[repr(C)]
struct libc_timespec {
    tv_sec: i64,
    tv_nsec: i64,
}

extern "C" {
    fn clock_gettime(clk: i32, ts: *mut libc_timespec) -> i32;
}

/// What happened to a directory entry, as the filesystem reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryChange {
    /// Made (created, linked, a directory made, a node made).
    /// (`Attrib` with an empty name is about the directory itself.)
    Made,
    /// Removed (unlinked).
    Removed,
    /// A directory removed.
    RemovedDir,
    /// Mode, owner, times, link count or extended attributes changed.
    Attrib,
}

/// One change seen by the kernel program, in capture order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaptureEvent {
    /// `data` was written at `offset` of `file` (one chunk of a write; a large write
    /// arrives as several chunks, in order).
    Data {
        file: FileId,
        parent: FileId,
        offset: u64,
        data: Vec<u8>,
    },
    /// `len` bytes at `offset` of `file` changed but were not copied (the write was
    /// larger than the inline cap, or the ring buffer was full): read them from the
    /// file. `len == u64::MAX` means "from offset to end of file".
    Dirty {
        file: FileId,
        parent: Option<FileId>,
        offset: u64,
        len: u64,
    },
    /// A regular file was opened with `O_CREAT` (it may have existed already), or a
    /// directory was made (`is_dir`; `file` is `None` then: resolve `path`).
    Created {
        file: Option<FileId>,
        parent: Option<FileId>,
        path: PathArg,
        is_dir: bool,
        mode: u32,
    },
    /// The file's size was set to `size` (`ftruncate`, `O_TRUNC`: `file` is known;
    /// `truncate(2)`: only `path` is).
    Truncated {
        file: Option<FileId>,
        parent: Option<FileId>,
        path: Option<PathArg>,
        size: u64,
    },
    /// The size of `file` was set (inside the filesystem: truncate, `O_TRUNC`, up or
    /// down): the file's size when this is handled is what it must have.
    Resized {
        file: FileId,
        parent: Option<FileId>,
    },
    /// `file` was fsynced or fdatasynced: what was written to it before comes before
    /// what is written to any file after, on the replica too.
    Synced { file: FileId },
    /// The attributes of `file` (times, most often) may have changed: inside the
    /// filesystem, where `utimensat` of the mtime alone leaves its only trace.
    Touched { file: FileId },
    /// An entry named `name` in directory `dir` was made, removed, or had its
    /// attributes changed (`change`), as the filesystem reported it (fanotify): what the
    /// directory holds under that name now is what the replica must hold.
    Entry {
        dir: FileId,
        name: Vec<u8>,
        change: EntryChange,
    },
    /// The entry `from_name` of `from_dir` was renamed to `to_name` of `to_dir`
    /// (fanotify; a `RENAME_EXCHANGE` reports both directions, one after the other).
    Moved {
        from_dir: FileId,
        from_name: Vec<u8>,
        to_dir: FileId,
        to_name: Vec<u8>,
    },
    /// `unlink`/`unlinkat` (`is_dir == false`) or `rmdir`/`unlinkat(AT_REMOVEDIR)`.
    Removed { path: PathArg, is_dir: bool },
    /// `rename`/`renameat`/`renameat2` (`flags` as given to renameat2).
    Renamed {
        from: PathArg,
        to: PathArg,
        flags: u32,
    },
    /// Mode, owner, times (`xattrs == false`) or extended attributes (`xattrs`) of an
    /// entry changed. fd-based calls know `file`; path-based ones give `path`, and
    /// `follow` says whether the call followed a symlink at it.
    AttrChanged {
        file: Option<FileId>,
        parent: Option<FileId>,
        path: Option<PathArg>,
        xattrs: bool,
        follow: bool,
    },
    /// `link`/`linkat`: `to` is a new name of what `from` names.
    Linked { from: PathArg, to: PathArg },
    /// An entry of any type was made at `path` (`symlink`, `mknod` and their `at`
    /// forms): look at what is there.
    Made { path: PathArg },
    /// `fallocate(2)` with `mode` on `file`.
    Fallocated {
        file: FileId,
        parent: FileId,
        mode: u32,
        offset: u64,
        len: u64,
    },
    /// Pages of a file mapped shared and writable became dirty (see `abi::KIND_MAP_DIRTY`).
    MapDirty {
        file: FileId,
        parent: FileId,
        offset: u64,
        len: u64,
    },
    /// `[offset, offset + len)` of a file was mapped shared, writable now or later.
    Mapped {
        file: FileId,
        parent: FileId,
        offset: u64,
        len: u64,
    },
    /// `[offset, offset + len)` of a file is being replaced by blocks shared with another
    /// file (a reflink), reported before the remap is done.
    Remapped {
        file: FileId,
        parent: FileId,
        offset: u64,
        len: u64,
    },
    /// Writeback of a file with hot mapped pages began (`end` false) or ended.
    Writeback { file: FileId, end: bool },
    /// Records were dropped and could not even be remembered as ranges (the missed-range
    /// map was full too). The agent must schedule a resync of every set.
    Lost { records: u64 },
}
