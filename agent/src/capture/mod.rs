//! Kernel capture: loads the embedded eBPF program (`ebpf/`), keeps its filter maps
//! current, and turns its ring-buffer records into [`CaptureEvent`]s.
//!
//! Design in one paragraph: one raw-tracepoint program on `sys_exit` sees every syscall
//! return together with its saved arguments. For the write family it walks
//! fd -> file -> dentry -> parent directory and drops the event with a single map lookup
//! unless that directory is in `WATCHED_DIRS` as `Contents`; only then is data copied
//! (up to [`INLINE_CAP`] bytes in [`CHUNK_SIZE`] records, above that a `Dirty` range).
//! Path-based namespace syscalls report absolute paths always and relative ones when
//! their base directory is watched. When the ring is full the program records the
//! missed byte range in `MISSED_RANGES` (or counts a loss); a reader thread here drains
//! the ring as it fills and the missed ranges every [`DRAIN_PERIOD`].

pub mod btf;
pub mod decode;
pub mod fanotify;
mod kallsyms;
pub mod marks;
mod tracefs;

#[cfg(not(target_arch = "x86_64"))]
compile_error!("doppel's capture program knows only the x86_64 syscall table and registers");

use std::{
    os::fd::{AsFd, AsRawFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, Program, ProgramError, RawTracePoint},
    Ebpf, EbpfError, EbpfLoader, Pod,
};
use doppel_common::{
    abi::{
        self, KFileId, MissedKey, MissedRange, CONTROL_MISSED_GEN, STAT_DATA_BYTES, STAT_EVENTS,
        STAT_LOST, STAT_MISSED, STAT_UNMARKED, WATCH_ANCESTOR, WATCH_CONTENTS,
    },
    event::{monotonic_ns, CaptureEvent, Captured, FileId},
};
use tokio::sync::mpsc;
use tracing::{debug, warn};

pub use doppel_common::abi::{CHUNK_SIZE, INLINE_CAP, PATH_CAP};
use marks::InodeMarks;
pub use marks::MarkedFs;

/// The compiled capture program, built by build.rs from `ebpf/`.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/doppel-ebpf.o"));

/// Longest a record's capture time precedes its commit to the ring (a program runs for
/// microseconds): the ring found empty at T holds nothing captured before T minus this.
const COMMIT_MARGIN_NS: u64 = 10_000_000;

/// One hand-over of the capture's reader: events in capture order, and how far the
/// capture is complete.
#[derive(Debug, Default)]
pub struct CaptureBatch {
    pub events: Vec<Captured>,
    /// Every record captured before this time (CLOCK_MONOTONIC ns) is in this batch or
    /// an earlier one (the reader found the ring empty after it); 0 when not known yet.
    pub complete_before: u64,
}

impl CaptureBatch {
    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

impl IntoIterator for CaptureBatch {
    type Item = Captured;
    type IntoIter = std::vec::IntoIter<Captured>;

    fn into_iter(self) -> Self::IntoIter {
        self.events.into_iter()
    }
}

/// How often missed ranges and the loss counter are collected.
pub const DRAIN_PERIOD: Duration = Duration::from_millis(20);
/// Batches buffered between the reader thread and the consumer. When the consumer falls
/// behind, the thread stops reading, the ring fills, and the kernel side degrades to
/// missed ranges: the writer never waits. Small on purpose: what waits here is memory
/// (up to CHANNEL_BATCHES * BATCH_MAX * CHUNK_SIZE = 8 MiB of data) that the ring and
/// the missed-range map hold more cheaply.
const CHANNEL_BATCHES: usize = 4;
/// Largest batch handed over at once (events).
const BATCH_MAX: usize = 512;
/// After handing over a batch, the reader waits this long before reading again instead
/// of going back to poll(2). Under a steady stream this keeps it off the ring's wait
/// queue, so writers do not pay for a thread wakeup per record; an idle ring still
/// wakes the reader at once (the first record after a quiet period costs one wakeup).
const COALESCE: Duration = Duration::from_micros(200);

/// How far the capture's clock moves on, with nothing captured, before the reader
/// hands over a batch that only says so.
const PROGRESS_NS: u64 = 200_000_000;

/// How a directory is watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchMode {
    /// Files directly inside are captured (data, creates, truncates), and relative path
    /// operations starting here are reported.
    Contents,
    /// Only relative path operations starting here are reported (a directory on the way
    /// to a watched one).
    Ancestor,
}

#[derive(Debug, Clone)]
pub struct CaptureOptions {
    /// Ring buffer size; rounded up to a power of two (at least one page).
    pub ring_bytes: usize,
    /// Processes whose changes are never captured. The agent's own pid is always added.
    pub ignore_tgids: Vec<u32>,
    /// Filesystems (ext4) whose writes are captured inside the filesystem, which sees
    /// every way bytes reach a file (Linux AIO, 32-bit syscalls), filtered by an inode
    /// bitmap sized from these.
    pub mark_filesystems: Vec<MarkedFs>,
    /// The sets' roots: the filesystem of each one covered by the inode bitmap gets a
    /// fanotify mark for its namespace changes (see `fanotify.rs`).
    pub set_roots: Vec<std::path::PathBuf>,
    /// When the syscall, io_uring and mmap-syscall programs are attached.
    pub syscall_capture: SyscallCapture,
}

/// When the `sys_exit` program (and the io_uring programs) are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyscallCapture {
    /// Always (the capture's own tests of the syscall path).
    Always,
    /// Only when a set's filesystem is not captured entirely inside the filesystem
    /// (data, sizes, namespace): the daemon. A host whose sets all live on ext4 then
    /// pays nothing per syscall.
    WhereNeeded,
    /// Never: what capture costs once no syscall hook is needed (`cargo xtask bench
    /// capture`); without `set_roots`, namespace changes are then not captured.
    Never,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        Self {
            ring_bytes: 32 << 20,
            ignore_tgids: Vec::new(),
            mark_filesystems: Vec::new(),
            set_roots: Vec::new(),
            syscall_capture: SyscallCapture::Always,
        }
    }
}

/// Sums of the program's per-CPU counters since load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CaptureStats {
    /// Records written into the ring.
    pub events: u64,
    /// Data bytes copied into the ring.
    pub data_bytes: u64,
    /// Ranges recorded in the missed-range map because the ring was full.
    pub missed_ranges: u64,
    /// Records lost outright (ring and missed-range map full, or a namespace record that
    /// did not fit into the ring).
    pub lost: u64,
    /// Additions of directories and hard-linked files (one per name met) the kernel's
    /// maps refused, full: changes through them are not captured (see
    /// [`Capture::watch_dir`], [`Capture::watch_linked`]).
    #[serde(default)]
    pub refused: u64,
}

/// `#[repr(C)]` ABI types as map keys/values. (aya's `Pod` is foreign to doppel-common,
/// so the impls live on local transparent wrappers.)
#[derive(Clone, Copy)]
#[repr(transparent)]
pub(crate) struct PodFileId(pub(crate) KFileId);
// SAFETY: two u64, no padding.
unsafe impl Pod for PodFileId {}

#[derive(Clone, Copy)]
#[repr(transparent)]
struct PodMissedKey(MissedKey);
// SAFETY: three u64, no padding.
unsafe impl Pod for PodMissedKey {}

#[derive(Clone, Copy)]
#[repr(transparent)]
struct PodMissedRange(MissedRange);
// SAFETY: two u64, no padding.
unsafe impl Pod for PodMissedRange {}

struct Shared {
    stats: PerCpuArray<MapData, u64>,
    /// Overflows of the fanotify queue (namespace changes lost, each answered with a
    /// rescan): counted with the kernel's lost records.
    namespace_lost: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn stat(&self, index: u32) -> u64 {
        match self.stats.get(&index, 0) {
            Ok(values) => values.iter().fold(0u64, |a, v| a.wrapping_add(*v)),
            Err(e) => {
                warn!("reading capture counter {index} failed: {e}");
                0
            }
        }
    }
}

/// A loaded and attached capture program. Dropping it detaches the program and stops
/// the reader thread.
pub struct Capture {
    watched: Mutex<BpfHashMap<MapData, PodFileId, u32>>,
    linked: Mutex<BpfHashMap<MapData, PodFileId, u32>>,
    /// The linked-file map was found full once (warned once).
    linked_full: AtomicBool,
    /// The watch list refused a directory already (logged once; counted in `refused`).
    watched_full: AtomicBool,
    /// Entries the watch and link maps refused (full).
    refused: std::sync::atomic::AtomicU64,
    ignore: Mutex<BpfHashMap<MapData, u32, u32>>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    /// The inode bitmap of the filesystem programs, when they are attached.
    marks: Option<Arc<InodeMarks>>,
    /// Devices whose namespace changes come from fanotify (see `fanotify.rs`).
    namespace_devs: Vec<u64>,
    /// Whether the `sys_exit` program is attached.
    syscall_hook: bool,
    /// Why the filesystem programs were wanted but could not be attached.
    fs_problem: Option<String>,
    /// Test hook: while set, the reader leaves the ring alone (so it can fill up).
    #[cfg_attr(not(test), allow(dead_code))]
    paused: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    /// Owns the attached program; dropped (detached) after the reader has stopped.
    _ebpf: Mutex<Ebpf>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave a map half-updated (each
    // operation is one syscall), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn ring_size(requested: usize) -> Result<u32> {
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let size = requested.max(page).checked_next_power_of_two();
    size.and_then(|s| u32::try_from(s).ok()).ok_or_else(|| {
        anyhow!("capture ring of {requested} bytes is too large: use at most 2 GiB (ring_bytes)")
    })
}

fn is_eperm(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
}

const PERMISSION_HINT: &str = "run doppel-agent as root (or with CAP_BPF, CAP_PERFMON and \
    CAP_SYS_ADMIN), and check that unprivileged/locked-down BPF policy allows tracing programs";

fn explain_load_error(e: EbpfError) -> anyhow::Error {
    let eperm = match &e {
        EbpfError::MapError(MapError::CreateError { io_error, .. }) => is_eperm(io_error),
        _ => false,
    };
    if eperm {
        anyhow!("creating the capture program's BPF maps was refused ({e}): {PERMISSION_HINT}")
    } else {
        anyhow!(e).context("cannot load the embedded eBPF capture program")
    }
}

fn explain_program_error(e: ProgramError, what: &str) -> anyhow::Error {
    match &e {
        // The verifier answers EACCES too: with a log, it is the verifier's refusal.
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } if is_eperm(io_error) && verifier_log.to_string().trim().is_empty() => anyhow!(
            "the kernel refused to load the capture program ({io_error}): {PERMISSION_HINT}"
        ),
        ProgramError::LoadError { verifier_log, .. } => {
            let log = verifier_log.to_string();
            let tail: Vec<&str> = log.lines().rev().take(6).collect();
            tracing::debug!("verifier log:\n{log}");
            anyhow!(
                "the kernel verifier rejected the capture program: {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            )
            .context(
                "this kernel is not supported by this build of doppel, please report it \
                 (the verifier's whole log is logged at debug level)",
            )
        }
        _ => anyhow!(e).context(format!("cannot {what} the capture program")),
    }
}

/// Raw tracepoint programs that are attached together: (program, tracepoint).
type Group = &'static [(&'static str, &'static str)];

/// The main program, at every system call's exit (ebpf/src/main.rs).
const SYS_EXIT: Group = &[(abi::PROG_SYS_EXIT, "sys_exit")];

/// The io_uring completion programs (ebpf/src/uring.rs).
const URING: Group = &[
    (abi::PROG_URING_SUBMIT, "io_uring_submit_req"),
    (abi::PROG_URING_COMPLETE, "io_uring_complete"),
    (abi::PROG_URING_OVERFLOW, "io_uring_cqe_overflow"),
];

/// The shared-mapping programs (ebpf/src/mmap.rs).
const MMAP: Group = &[
    (abi::PROG_DIRTY_FOLIO, "writeback_dirty_folio"),
    (abi::PROG_WRITEBACK_BEGIN, "sb_mark_inode_writeback"),
    (abi::PROG_WRITEBACK_END, "sb_clear_inode_writeback"),
];

/// The filesystem programs (ebpf/src/fs.rs): (program, tp_btf tracepoint).
const FS: Group = &[
    (abi::PROG_ALLOCATE_INODE, "ext4_allocate_inode"),
    (abi::PROG_FREE_INODE, "ext4_free_inode"),
    (abi::PROG_EXT4_DA_WRITE_END, "ext4_da_write_end"),
    (abi::PROG_EXT4_WRITE_END, "ext4_write_end"),
    (
        abi::PROG_EXT4_JOURNALLED_WRITE_END,
        "ext4_journalled_write_end",
    ),
    (abi::PROG_DIO_BEGIN, "iomap_dio_rw_begin"),
    (abi::PROG_DIO_COMPLETE, "iomap_dio_complete"),
];

/// Programs inside ext4 for sizes and `fallocate` (ebpf/src/fs_meta.rs).
const FS_META: Group = &[
    (abi::PROG_EXT4_SETATTR, "ext4_mark_inode_dirty"),
    (abi::PROG_EXT4_TRUNCATE, "ext4_truncate_enter"),
    (abi::PROG_EXT4_SYNC_FILE, "ext4_sync_file_enter"),
    (abi::PROG_EXT4_FALLOCATE, "ext4_fallocate_enter"),
    (abi::PROG_EXT4_PUNCH_HOLE, "ext4_punch_hole"),
    (abi::PROG_EXT4_ZERO_RANGE, "ext4_zero_range"),
    (abi::PROG_EXT4_COLLAPSE_RANGE, "ext4_collapse_range"),
    (abi::PROG_EXT4_INSERT_RANGE, "ext4_insert_range"),
];

/// Programs inside xfs and iomap (ebpf/src/xfs.rs), attached when a set is on xfs.
const XFS: Group = &[
    (abi::PROG_XFS_BUFFERED_WRITE, "xfs_file_buffered_write"),
    (abi::PROG_IOMAP_ITER, "iomap_iter"),
    (abi::PROG_XFS_TRUNCATE, "xfs_itruncate_extents_start"),
    (abi::PROG_XFS_ZERO_EOF, "xfs_zero_eof"),
    (abi::PROG_XFS_UPDATE_TIME, "xfs_update_time"),
    (abi::PROG_XFS_SETATTR, "xfs_setattr"),
    (abi::PROG_XFS_FSYNC, "xfs_file_fsync"),
    (abi::PROG_XFS_ALLOC_SPACE, "xfs_alloc_file_space"),
    (abi::PROG_XFS_FREE_SPACE, "xfs_free_file_space"),
    (abi::PROG_XFS_ZERO_SPACE, "xfs_zero_file_space"),
    (abi::PROG_XFS_COLLAPSE_SPACE, "xfs_collapse_file_space"),
    (abi::PROG_XFS_INSERT_SPACE, "xfs_insert_file_space"),
    (abi::PROG_XFS_SF_ADDNAME, "xfs_dir2_sf_addname"),
    (abi::PROG_XFS_BLOCK_ADDNAME, "xfs_dir2_block_addname"),
    (abi::PROG_XFS_LEAF_ADDNAME, "xfs_dir2_leaf_addname"),
    (abi::PROG_XFS_NODE_ADDNAME, "xfs_dir2_node_addname"),
    (abi::PROG_XFS_IUNLINK_REMOVE, "xfs_iunlink_remove"),
    (abi::PROG_XFS_REMAP, "xfs_reflink_remap_range"),
];

/// Page-cache faults into files mapped shared and writable (raw tracepoints).
const FS_FAULTS: Group = &[
    (abi::PROG_FILEMAP_FAULT, "mm_filemap_fault"),
    (abi::PROG_FILEMAP_MAP_PAGES, "mm_filemap_map_pages"),
];

/// Every program of the capture inside the filesystem, or none: a set is captured
/// there entirely (data, sizes, allocation, mapping faults) or at the syscall door.
fn attach_filesystem(ebpf: &mut Ebpf) -> Result<()> {
    attach_btf(ebpf, FS)?;
    attach_btf(ebpf, FS_META)?;
    for &(name, _) in FS_FAULTS {
        raw_tracepoint(name, ebpf.program_mut(name))?
            .load()
            .map_err(|e| explain_program_error(e, "load"))?;
    }
    attach(ebpf, FS_FAULTS)
}

/// The kernel functions whose code ranges the size and times program compares its
/// caller with (ebpf/src/fs_meta.rs), and the globals that hold each range.
const CALLERS: [(&str, &str, &str); 2] = [
    ("ext4_setattr", "SETATTR_IP_START", "SETATTR_IP_END"),
    (
        "ext4_dirty_inode",
        "DIRTY_INODE_IP_START",
        "DIRTY_INODE_IP_END",
    ),
];

fn caller_ranges() -> Result<[(u64, u64); 2]> {
    kallsyms::function_ranges(CALLERS.map(|(function, _, _)| function))
}

/// The filesystem globals with the ranges of [`CALLERS`], which the size and times
/// program needs: without them, the filesystem programs are not attached.
fn with_caller_ranges(
    mut globals: Vec<(&'static str, u64)>,
    found: Result<()>,
) -> (Vec<(&'static str, u64)>, Result<()>) {
    let ranges = caller_ranges();
    let unknown = [(u64::MAX, 0); 2];
    for ((_, start, end), range) in CALLERS.iter().zip(ranges.as_ref().unwrap_or(&unknown)) {
        globals.push((start, range.0));
        globals.push((end, range.1));
    }
    (globals, found.and(ranges.map(|_| ())))
}

/// What capture inside the filesystem needs beyond loading programs: fanotify with
/// directory handles and names, and where [`CALLERS`] lie (`doppel-agent check`).
pub fn filesystem_capture_available() -> Result<()> {
    fanotify::Namespace::probe()?;
    caller_ranges().map(|_| ())
}

/// `st_dev` of a set root, if it can be looked at.
fn root_dev(root: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(root).ok().map(|m| m.dev())
}

/// Loads and attaches BTF tracepoint programs (the filesystem programs, the floor).
/// The kernel verifies them against the tracepoints' types, read from its BTF.
fn attach_btf(ebpf: &mut Ebpf, group: Group) -> Result<()> {
    let btf = aya::Btf::from_sys_fs().context("cannot read the kernel's BTF")?;
    for &(name, tracepoint) in group {
        let prog: &mut BtfTracePoint = ebpf
            .program_mut(name)
            .with_context(|| {
                format!("the embedded capture program has no {name} (build mismatch)")
            })?
            .try_into()
            .with_context(|| format!("{name} is not a BTF tracepoint (build mismatch)"))?;
        prog.load(tracepoint, &btf).map_err(|e| {
            explain_program_error(e, "load").context(format!("{name} at {tracepoint}"))
        })?;
        prog.attach().map_err(|e| {
            explain_program_error(e, &format!("attach to the {tracepoint} tracepoint"))
        })?;
    }
    Ok(())
}

/// An empty program attached to `ext4_da_write_end` alone, for benchmarks: what any
/// per-write hook costs at least (`doppel-agent bench-floor`). Detached when dropped.
pub struct FloorHook {
    _ebpf: Ebpf,
}

impl FloorHook {
    pub fn attach() -> Result<FloorHook> {
        tracefs::ensure_mounted().ok();
        let mut ebpf = EbpfLoader::new()
            .load(PROGRAM)
            .map_err(explain_load_error)?;
        attach_btf(&mut ebpf, &[(abi::PROG_FLOOR, "ext4_da_write_end")])?;
        Ok(FloorHook { _ebpf: ebpf })
    }
}

/// Loads the programs of `main` on this thread and those of the `rest` (`None`: not
/// wanted) on a second one, attaching none: loading runs the kernel's verifier, about
/// 45 ms for sys_exit and 12 ms for the others, the largest part of the agent's
/// start-up (which the mirror waits for). Returns each group's first failure.
fn load_groups<const N: usize>(
    ebpf: &mut Ebpf,
    main: Group,
    rest: [Option<Group>; N],
) -> (Result<()>, [Result<()>; N]) {
    let mut progs: std::collections::HashMap<&str, &mut Program> = ebpf.programs_mut().collect();
    let mut take = |group: Group| -> Vec<(&'static str, Option<&mut Program>)> {
        group
            .iter()
            .map(|&(name, _)| (name, progs.remove(name)))
            .collect()
    };
    let main = take(main);
    let rest = rest.map(|g| g.map(&mut take));
    std::thread::scope(|s| {
        let helper = s.spawn(move || rest.map(|g| g.map_or(Ok(()), load_group)));
        let main = load_group(main);
        let rest = helper.join().unwrap_or_else(|_| {
            std::array::from_fn(|_| Err(anyhow!("loading a capture program panicked")))
        });
        (main, rest)
    })
}

fn load_group(progs: Vec<(&str, Option<&mut Program>)>) -> Result<()> {
    for (name, prog) in progs {
        raw_tracepoint(name, prog)?
            .load()
            .map_err(|e| explain_program_error(e, "load"))?;
    }
    Ok(())
}

/// Program `name` of the embedded object as the raw tracepoint program it must be.
fn raw_tracepoint<'a>(name: &str, prog: Option<&'a mut Program>) -> Result<&'a mut RawTracePoint> {
    prog.with_context(|| format!("the embedded capture program has no {name} (build mismatch)"))?
        .try_into()
        .with_context(|| format!("{name} is not a raw tracepoint (build mismatch)"))
}

/// Attaches the (loaded) programs of `group` to their tracepoints.
fn attach(ebpf: &mut Ebpf, group: Group) -> Result<()> {
    for &(name, tracepoint) in group {
        let prog = raw_tracepoint(name, ebpf.program_mut(name))?;
        prog.attach(tracepoint).map_err(|e| {
            explain_program_error(e, &format!("attach to the {tracepoint} tracepoint"))
        })?;
    }
    Ok(())
}

impl Capture {
    /// Mounts tracefs if needed, reads offsets from BTF, loads the embedded program,
    /// attaches it. Events arrive on the returned channel in ring order, in batches.
    /// Errors name what is missing (BTF, BPF permission, ...) and the fix.
    pub fn start(opts: CaptureOptions) -> Result<(Capture, mpsc::Receiver<CaptureBatch>)> {
        if let Err(e) = tracefs::ensure_mounted() {
            // Not fatal: the program attaches to a raw tracepoint by name.
            warn!("{e:#}");
        }
        // aya's loader parses the kernel's BTF in full (for CO-RE relocations, which this
        // program has none of; it cannot be told not to): ~13 ms. Ours, which only
        // indexes the BTF (mapped, not copied) and finds the fields, takes ~4 ms on a
        // thread of its own meanwhile. Not the other way round: aya's ~20 MiB of short-
        // lived allocations belong in the main thread's malloc arena, which the agent
        // reuses later (with aya's parse or its freeing on another thread, the rss
        // bench's peak went up by as much as 20 MiB).
        let ours = std::thread::Builder::new()
            .name("doppel-btf".into())
            .spawn(|| -> Result<_> {
                let btf = btf::Btf::from_sys_fs()?;
                let offsets = btf::program_offsets(&btf).context(
                    "cannot locate the kernel structure fields the capture program reads",
                )?;
                // /proc/kallsyms is read here too, off the main thread.
                let (fs_globals, fs) = btf::fs_globals(&btf);
                Ok((
                    offsets,
                    btf::uring_globals(&btf),
                    btf::mmap_globals(&btf),
                    with_caller_ranges(fs_globals, fs),
                    btf::xfs_globals(&btf),
                ))
            })
            .context("cannot start a thread")?;
        let mut loader = EbpfLoader::new();
        let (
            offsets,
            (uring_globals, uring),
            (mmap_globals, mmap),
            (fs_globals, fs),
            (xfs_globals, xfs),
        ) = ours
            .join()
            .map_err(|_| anyhow::anyhow!("reading the kernel's BTF panicked"))??;
        let ring_bytes = ring_size(opts.ring_bytes)?;
        let globals = offsets.iter().chain(&uring_globals).chain(&mmap_globals);
        for (name, value) in globals.chain(&fs_globals).chain(&xfs_globals) {
            loader.override_global(name, value, true);
        }
        loader.map_max_entries(abi::MAP_RING, ring_bytes);
        loader.map_max_entries(abi::MAP_MARKS, marks::words_for(&opts.mark_filesystems));
        loader.map_max_entries(
            abi::MAP_MARK_EXACT,
            marks::exact_entries_for(&opts.mark_filesystems),
        );
        // The loader lives to the end of this function, as it always did: dropped here,
        // right after load(), the events bench's sustained rate fell from 200k to 100k
        // events/s (4 runs of 4, against 4 of 4 at 200k without); freed on a thread of
        // its own, the rss bench's peak varied by 20 MiB. Neither is understood (the
        // heap's layout after freeing aya's ~20 MiB copy of the BTF, most likely).
        let mut ebpf = loader.load(PROGRAM).map_err(explain_load_error)?;

        // Inside the filesystem first: whether a set still needs the syscall hook
        // depends on what of it could be attached.
        let fs_wanted = !opts.mark_filesystems.is_empty();
        let mut fs_problem = None;
        let fs_attached = fs_wanted
            && match fs
                .and(mmap.as_ref().map(|_| ()).map_err(|e| anyhow!("{e:#}")))
                .and_then(|()| attach_filesystem(&mut ebpf))
            {
                Ok(()) => true,
                Err(e) => {
                    warn!(
                        "writes will not be captured inside the filesystem: {e:#}; writes \
                         through Linux AIO (io_submit) and 32-bit syscalls are not replicated"
                    );
                    fs_problem = Some(format!("{e:#}"));
                    false
                }
            };
        // xfs's own programs, only where a set lives on xfs.
        let xfs_wanted = fs_attached
            && opts
                .mark_filesystems
                .iter()
                .any(|f| f.kind == marks::FsKind::Xfs);
        let xfs_attached = xfs_wanted
            && match xfs.and_then(|()| attach_btf(&mut ebpf, XFS)) {
                Ok(()) => true,
                Err(e) => {
                    warn!("writes to sets on xfs will be captured at the syscall door: {e:#}");
                    fs_problem = Some(format!("{e:#}"));
                    false
                }
            };
        let marked_devs = if fs_attached {
            let attached = |dev: &u64| {
                opts.mark_filesystems
                    .iter()
                    .any(|f| f.dev == *dev && (f.kind == marks::FsKind::Ext4 || xfs_attached))
            };
            marks::covered_devs(&opts.mark_filesystems)
                .into_iter()
                .filter(attached)
                .collect()
        } else {
            Vec::new()
        };
        // Each root's filesystem, and those the bitmap covers.
        let roots: Vec<(&std::path::Path, Option<u64>)> = opts
            .set_roots
            .iter()
            .map(|r| (r.as_path(), root_dev(r)))
            .collect();
        let covered: Vec<(&std::path::Path, u64)> = roots
            .iter()
            .filter_map(|&(r, dev)| dev.filter(|d| marked_devs.contains(d)).map(|d| (r, d)))
            .collect();
        let namespace = if covered.is_empty() {
            None
        } else {
            match fanotify::Namespace::new(covered.iter().map(|&(r, _)| r)) {
                Ok(n) => Some(n),
                Err(e) => {
                    warn!(
                        "namespace changes of sets on ext4 or xfs will be captured at the \
                         syscall door: {e:#}"
                    );
                    fs_problem = Some(format!("{e:#}"));
                    None
                }
            }
        };
        let namespace_devs: Vec<u64> = if namespace.is_some() {
            covered.iter().map(|&(_, d)| d).collect()
        } else {
            Vec::new()
        };
        let sys = match opts.syscall_capture {
            SyscallCapture::Always => true,
            SyscallCapture::Never => false,
            SyscallCapture::WhereNeeded => roots
                .iter()
                .any(|&(_, dev)| dev.is_none_or(|d| !namespace_devs.contains(&d))),
        };
        let main = if sys { SYS_EXIT } else { &[][..] };
        let wanted = [
            mmap.is_ok().then_some(MMAP),
            (sys && uring.is_ok()).then_some(URING),
        ];
        let (loaded, [mmap_loaded, uring_loaded]) = load_groups(&mut ebpf, main, wanted);
        loaded?;
        attach(&mut ebpf, main)?;
        if sys {
            tracing::info!("the syscall capture (sys_exit) is attached");
        } else {
            tracing::info!(
                "no syscall hook is attached: every set is captured inside its filesystem"
            );
        }
        if let Err(e) = mmap.and(mmap_loaded).and_then(|()| attach(&mut ebpf, MMAP)) {
            warn!(
                "stores through shared mappings will not be captured: {e:#}; files written \
                 through MAP_SHARED mappings are not replicated"
            );
        } else {
            tracing::info!("stores through shared mappings are captured");
        }
        if sys {
            match uring
                .and(uring_loaded)
                .and_then(|()| attach(&mut ebpf, URING))
            {
                Ok(()) => tracing::info!("io_uring writes are captured"),
                Err(e) => warn!(
                    "io_uring writes will not be captured: {e:#}; programs writing watched \
                     files through io_uring are not replicated"
                ),
            }
        }
        if fs_attached {
            tracing::info!(
                "writes to sets on ext4 and xfs are captured inside the filesystem (every way \
                 bytes reach a file, Linux AIO and 32-bit syscalls included)"
            );
        }
        // Maps are taken out of the object only once every program is loaded: the
        // loads refer to them.
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("the embedded capture program has no map {name}"))
        };
        let marks = if fs_attached {
            let m = InodeMarks::new(
                take(abi::MAP_MARKS)?,
                take(abi::MAP_MARK_FS)?,
                take(abi::MAP_MARK_EXACT)?,
                &opts.mark_filesystems,
                &marked_devs,
            )?;
            Some(Arc::new(m))
        } else {
            None
        };
        let ring = RingBuf::try_from(take(abi::MAP_RING)?)?;
        let watched = BpfHashMap::try_from(take(abi::MAP_WATCHED_DIRS)?)?;
        let linked = BpfHashMap::try_from(take(abi::MAP_LINKED_FILES)?)?;
        let ignore = BpfHashMap::try_from(take(abi::MAP_IGNORE_TGIDS)?)?;
        let missed = BpfHashMap::try_from(take(abi::MAP_MISSED_RANGES)?)?;
        let control = Array::try_from(take(abi::MAP_CONTROL)?)?;
        let stats = PerCpuArray::try_from(take(abi::MAP_STATS)?)?;

        let marks_for_reader = marks.clone();
        let (tx, rx) = mpsc::channel(CHANNEL_BATCHES);
        let shared = Arc::new(Shared {
            stats,
            namespace_lost: Default::default(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let mut reader = Reader {
            ring,
            missed,
            control,
            shared: shared.clone(),
            stop: stop.clone(),
            paused: paused.clone(),
            tx,
            complete_before: 0,
            delivered_before: 0,
            gen: 0,
            missed_seen: 0,
            missed_held: false,
            lost: LostMarker::new(ring_bytes as u64),
            bad_records: 0,
            namespace,
            marks: marks_for_reader,
        };
        let mut capture = Capture {
            watched: Mutex::new(watched),
            linked: Mutex::new(linked),
            linked_full: AtomicBool::new(false),
            watched_full: AtomicBool::new(false),
            refused: std::sync::atomic::AtomicU64::new(0),
            marks,
            namespace_devs,
            syscall_hook: sys,
            fs_problem,
            ignore: Mutex::new(ignore),
            shared,
            stop,
            paused,
            reader: None,
            _ebpf: Mutex::new(ebpf),
        };
        capture.ignore_pid(std::process::id())?;
        for pid in &opts.ignore_tgids {
            capture.ignore_pid(*pid)?;
        }
        capture.reader = Some(
            std::thread::Builder::new()
                .name("doppel-capture".into())
                .spawn(move || reader.run())
                .context("cannot start the capture reader thread")?,
        );
        Ok((capture, rx))
    }

    /// Starts watching `dir` (identity in `st_dev` encoding). Setting a new mode for a
    /// watched directory replaces the old one.
    pub fn watch_dir(&self, dir: FileId, mode: WatchMode) -> Result<()> {
        let key = kernel_key(dir)?;
        let flags = match mode {
            WatchMode::Contents => WATCH_CONTENTS,
            WatchMode::Ancestor => WATCH_ANCESTOR,
        };
        lock(&self.watched).insert(key, flags, 0).with_context(|| {
            self.refused.fetch_add(1, Ordering::Relaxed);
            format!(
                "cannot add directory {dir:?} to the kernel watch list (at most {} \
                 directories can be watched)",
                abi::WATCHED_DIRS_MAX
            )
        })
    }

    /// True the first time only: whether a refusal of [`Capture::watch_dir`] is the first
    /// (logged as an error; later ones are counted, and logged at debug level).
    pub fn first_dir_refusal(&self) -> bool {
        !self.watched_full.swap(true, Ordering::Relaxed)
    }

    /// Captures writes to the hard-linked file `file` through any of its names, also
    /// those outside every watched directory.
    pub fn watch_linked(&self, file: FileId) {
        let Ok(key) = kernel_key(file) else {
            return;
        };
        if lock(&self.linked).insert(key, 1, 0).is_ok() {
            return;
        }
        self.refused.fetch_add(1, Ordering::Relaxed);
        if !self.linked_full.swap(true, Ordering::Relaxed) {
            tracing::error!(
                "more than {} hard-linked files in the sets: writes through names outside \
                 every set are not captured for further ones",
                abi::LINKED_FILES_MAX
            );
        }
    }

    /// Stops watching `dir`. Not an error if it was not watched.
    pub fn unwatch_dir(&self, dir: FileId) -> Result<()> {
        let key = kernel_key(dir)?;
        match lock(&self.watched).remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) | Err(MapError::ElementNotFound) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(e) => Err(anyhow!(e).context(format!("cannot unwatch directory {dir:?}"))),
        }
    }

    /// Marks `id` (a file or directory of a set) in the inode bitmap, if its
    /// filesystem is captured inside the filesystem. The agent never clears a mark:
    /// an inode number it would clear may already be a new file's; the kernel clears
    /// a mark when it frees the inode.
    pub fn mark(&self, id: FileId) {
        if let Some(m) = &self.marks {
            m.mark(id);
        }
    }

    /// Why capture inside the filesystem was wanted and is not in place, if it is not.
    pub fn filesystem_capture_problem(&self) -> Option<&str> {
        self.fs_problem.as_deref()
    }

    /// Whether writes to files on device `dev` are captured inside the filesystem.
    pub fn in_filesystem(&self, dev: u64) -> bool {
        self.marks.as_ref().is_some_and(|m| m.covers(dev))
    }

    /// Whether namespace and attribute changes on device `dev` are reported by the
    /// filesystem (fanotify) rather than at the syscall door.
    pub fn namespace_in_filesystem(&self, dev: u64) -> bool {
        self.namespace_devs.contains(&dev)
    }

    /// Whether the `sys_exit` program is attached (some set needs it).
    pub fn syscall_hook(&self) -> bool {
        self.syscall_hook
    }

    /// Never capture changes made by process `tgid`.
    pub fn ignore_pid(&self, tgid: u32) -> Result<()> {
        lock(&self.ignore).insert(tgid, 1, 0).with_context(|| {
            format!(
                "cannot add pid {tgid} to the capture ignore list (at most {} entries)",
                abi::IGNORE_TGIDS_MAX
            )
        })
    }

    #[cfg(test)]
    fn pause_ring_reading(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    pub fn stats(&self) -> CaptureStats {
        CaptureStats {
            events: self.shared.stat(STAT_EVENTS),
            data_bytes: self.shared.stat(STAT_DATA_BYTES),
            missed_ranges: self.shared.stat(STAT_MISSED),
            lost: self.shared.stat(STAT_LOST)
                + self.shared.stat(STAT_UNMARKED)
                + self.shared.namespace_lost.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            if reader.join().is_err() {
                warn!("the capture reader thread panicked");
            }
        }
        // `_ebpf` drops after this: the program's link closes and it detaches.
    }
}

pub(crate) fn kernel_key(dir: FileId) -> Result<PodFileId> {
    let dev = decode::user_dev_to_kernel(dir.dev).with_context(|| {
        format!(
            "device number {:#x} of {dir:?} does not fit the kernel's dev_t encoding",
            dir.dev
        )
    })?;
    Ok(PodFileId(KFileId { dev, ino: dir.ino }))
}

/// When to report records the kernel lost (and the agent answers with a rescan).
///
/// The rescan must come after every record the ring held when the loss was seen: a
/// record still unread then is older than the rescan's listing, and applied after it,
/// it could bring back on the replica what the lost change removed (the create of a
/// file whose unlink was lost, say). Records are read in the order they were reserved,
/// so the report waits until the ring has been empty once, or until a whole ring's
/// worth of bytes has been read since.
#[derive(Debug)]
struct LostMarker {
    ring_bytes: u64,
    /// The kernel's lost-record counter when last read.
    counter: u64,
    /// Lost records not reported yet.
    records: u64,
    /// Bytes still to read before the report is due.
    wait: u64,
}

impl LostMarker {
    fn new(ring_bytes: u64) -> Self {
        LostMarker {
            ring_bytes,
            counter: 0,
            records: 0,
            wait: 0,
        }
    }

    /// The kernel's lost-record counter reads `counter` now.
    fn counted(&mut self, counter: u64) {
        if counter > self.counter {
            self.records += counter - self.counter;
            self.counter = counter;
            self.wait = self.ring_bytes;
        }
    }

    /// One record of `len` bytes was read (the ring also holds an 8-byte header per
    /// record, and rounds each to 8 bytes).
    fn consumed(&mut self, len: usize) {
        let used = (len as u64 + 8).next_multiple_of(8);
        self.wait = self.wait.saturating_sub(used);
    }

    fn ring_empty(&mut self) {
        self.wait = 0;
    }

    /// The records to report now, if the report is due.
    fn due(&mut self) -> Option<u64> {
        (self.records > 0 && self.wait == 0).then(|| std::mem::take(&mut self.records))
    }
}

/// The reader thread's state.
struct Reader {
    ring: RingBuf<MapData>,
    missed: BpfHashMap<MapData, PodMissedKey, PodMissedRange>,
    control: Array<MapData, u64>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    tx: mpsc::Sender<CaptureBatch>,
    /// Every record captured before this time has been read (see [`CaptureBatch`]).
    complete_before: u64,
    /// The `complete_before` last handed over.
    delivered_before: u64,
    /// Current missed-range generation (what the program tags new entries with).
    gen: u64,
    /// The programs' count of missed ranges recorded, at the last drain; and whether
    /// that drain left entries in the map. With neither moving, the map is empty and
    /// is not walked (walking even an empty hash map visits all its buckets).
    missed_seen: u64,
    missed_held: bool,
    /// Losses counted by the kernel and not reported yet (see [`LostMarker`]).
    lost: LostMarker,
    bad_records: u64,
    /// Namespace changes of the filesystems captured inside the filesystem.
    namespace: Option<fanotify::Namespace>,
    /// Which directories are in a set (their namespace events are kept).
    marks: Option<Arc<InodeMarks>>,
}

impl Reader {
    fn run(&mut self) {
        let mut pending: Vec<Captured> = Vec::new();
        let mut next_drain = Instant::now() + DRAIN_PERIOD;
        while !self.stop.load(Ordering::Relaxed) {
            if pending.is_empty() && !self.paused.load(Ordering::Relaxed) {
                // Namespace changes first: the ring's records may be older than them,
                // never newer (what was queued before the ring was read is in).
                self.read_namespace(&mut pending);
                self.read_ring(&mut pending);
            }
            let now = Instant::now();
            if now >= next_drain {
                self.drain_missed(&mut pending);
                next_drain = now + DRAIN_PERIOD;
            }
            if !pending.is_empty() {
                let batch = CaptureBatch {
                    events: std::mem::take(&mut pending),
                    complete_before: self.complete_before,
                };
                match self.tx.try_send(batch) {
                    Ok(()) => {
                        self.delivered_before = self.complete_before;
                        std::thread::sleep(COALESCE);
                        continue;
                    }
                    Err(mpsc::error::TrySendError::Full(batch)) => {
                        // Consumer behind: hold this batch, stop reading the ring.
                        pending = batch.events;
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        debug!("capture event receiver dropped; reader thread stops");
                        return;
                    }
                }
            }
            if self.complete_before >= self.delivered_before + PROGRESS_NS
                && !self.paused.load(Ordering::Relaxed)
            {
                // Nothing captured lately: the clock still moves on, so that what waits
                // on it (what the mirror read, in overlap.rs) is forgotten without
                // waiting for the next write. Through the channel, behind the batches
                // before it, as its promise is about them.
                let batch = CaptureBatch {
                    events: Vec::new(),
                    complete_before: self.complete_before,
                };
                if self.tx.try_send(batch).is_ok() {
                    self.delivered_before = self.complete_before;
                }
            }
            // Missed ranges are recorded only when the ring is full, which wakes this
            // thread anyway: with none held, an idle agent wakes only for the clock.
            let timeout = if self.missed_held || self.shared.stat(STAT_MISSED) != self.missed_seen {
                next_drain.saturating_duration_since(Instant::now())
            } else {
                Duration::from_nanos(PROGRESS_NS)
            };
            self.wait_readable(timeout);
        }
    }

    fn read_ring(&mut self, out: &mut Vec<Captured>) {
        let mut events = Vec::new();
        while out.len() < BATCH_MAX {
            let before = monotonic_ns();
            let Some(item) = self.ring.next() else {
                self.lost.ring_empty();
                self.complete_before = before.saturating_sub(COMMIT_MARGIN_NS);
                break;
            };
            self.lost.consumed(item.len());
            let time = decode::record_time(&item);
            let r = decode::decode_record(&item, &mut events);
            out.extend(events.drain(..).map(|event| Captured { time, event }));
            if let Err(e) = r {
                self.bad_records += 1;
                // Rate-limit: the first few, then every 1000th.
                if self.bad_records <= 5 || self.bad_records.is_multiple_of(1000) {
                    warn!(
                        "dropping undecodable capture record ({e}); {} so far. The agent and \
                         its embedded program disagree: rebuild doppel-agent",
                        self.bad_records
                    );
                }
            }
        }
        if let Some(records) = self.lost.due() {
            out.push(Captured {
                time: monotonic_ns(),
                event: CaptureEvent::Lost { records },
            });
        }
    }

    fn read_namespace(&mut self, out: &mut Vec<Captured>) {
        let (Some(ns), Some(marks)) = (self.namespace.as_mut(), self.marks.as_ref()) else {
            return;
        };
        let mut events = Vec::new();
        ns.read(&|dir| marks.is_marked(dir), &mut events);
        let lost = events
            .iter()
            .filter(|e| matches!(e, CaptureEvent::Lost { .. }))
            .count();
        if lost > 0 {
            warn!("the namespace event queue overflowed: the sets are rescanned");
            self.shared
                .namespace_lost
                .fetch_add(lost as u64, Ordering::Relaxed);
        }
        let time = monotonic_ns();
        out.extend(events.into_iter().map(|event| Captured { time, event }));
    }

    fn wait_readable(&self, timeout: Duration) {
        let pfd = |fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let mut fds = [pfd(self.ring.as_fd().as_raw_fd()), pfd(-1)];
        if let Some(ns) = &self.namespace {
            fds[1] = pfd(ns.raw_fd());
        }
        let ms = timeout.as_millis().clamp(1, 1000) as libc::c_int;
        // SAFETY: two valid pollfds (a negative fd is ignored). EINTR or errors just
        // end the wait early.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
    }

    /// Collects missed ranges recorded at least one drain period ago, then moves the
    /// program on to a new generation. Entries of the current generation may still be
    /// widened by a running program, so they are left for the next round; an entry of an
    /// older generation can no longer change (a program run lasts microseconds, not a
    /// drain period), so reading and deleting it loses nothing.
    fn drain_missed(&mut self, held: &mut Vec<Captured>) {
        self.lost.counted(self.shared.stat(STAT_LOST));
        // Read before the walk: a range recorded after it moves the count again.
        let missed = self.shared.stat(STAT_MISSED);
        if missed == self.missed_seen && !self.missed_held {
            return;
        }
        self.missed_seen = missed;
        let time = monotonic_ns();
        let mut fresh = Vec::new();
        let out = &mut fresh;
        let keys: Vec<PodMissedKey> = self.missed.keys().filter_map(|k| k.ok()).collect();
        self.missed_held = !keys.is_empty();
        for key in keys {
            if key.0.gen >= self.gen {
                continue;
            }
            match self.missed.get(&key, 0) {
                Ok(range) => {
                    out.push(Captured {
                        time,
                        event: decode::missed_to_event(&key.0, &range.0),
                    });
                    if let Err(e) = self.missed.remove(&key) {
                        warn!("cannot delete a drained missed range: {e}");
                    }
                }
                Err(e) => debug!("missed range vanished while draining: {e}"),
            }
        }
        self.gen += 1;
        if let Err(e) = self.control.set(CONTROL_MISSED_GEN, self.gen, 0) {
            warn!("cannot advance the missed-range generation: {e}");
        }
        decode::coalesce_missed(held, fresh);
    }
}

#[cfg(test)]
mod fs_tests;
#[cfg(test)]
mod tests;
