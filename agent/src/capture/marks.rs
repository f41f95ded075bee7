//! The inode bitmap of the filesystem programs (ebpf/src/fs.rs), mapped into the agent.
//!
//! One bit per inode number of each watched filesystem says "this file or directory is
//! in a set". The agent sets the bits of what it enters into its index (before it reads
//! the file, so a write the read misses is captured) and the kernel marks new inodes
//! in marked directories itself; both sides update words with atomic operations on the
//! same shared pages, so neither loses the other's bit.

use std::{
    os::fd::AsFd,
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, HashMap as BpfHashMap, Map, MapData},
    Pod,
};
use doppel_common::{
    abi::{bloom_bits, MarkFs, MARK_FS_MAX},
    event::FileId,
};

use super::PodFileId;

use super::decode::user_dev_to_kernel;

/// ext4's `statfs` magic.
pub const EXT4_SUPER_MAGIC: i64 = 0xEF53;
/// xfs's `statfs` magic ("XFSB").
pub const XFS_SUPER_MAGIC: i64 = 0x5846_5342;

/// The filesystems whose own tracepoints the capture programs use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    Ext4,
    Xfs,
}

impl FsKind {
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Ext4 => "ext4",
            FsKind::Xfs => "xfs",
        }
    }
}

/// A filesystem whose sets are captured inside the filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MarkedFs {
    /// `st_dev` of the filesystem.
    pub dev: u64,
    /// One more than its largest possible inode number: the bitmap's size in bits.
    pub inodes: u64,
    pub kind: FsKind,
}

/// Whether `path` lies on a filesystem the filesystem programs know (ext4, xfs), and
/// then which one and how large its inode numbers can be.
pub fn marked_fs(path: &std::path::Path) -> Result<Option<MarkedFs>> {
    use std::os::unix::fs::MetadataExt;
    let st = rustix::fs::statfs(path).with_context(|| format!("statfs {}", path.display()))?;
    let (kind, inodes) = match st.f_type as i64 {
        // Inode numbers run from 1 to f_files on ext4: one bit more than the count.
        EXT4_SUPER_MAGIC => (FsKind::Ext4, st.f_files + 1),
        XFS_SUPER_MAGIC => (FsKind::Xfs, xfs_inode_numbers(path)?),
        _ => return Ok(None),
    };
    let dev = std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .dev();
    Ok(Some(MarkedFs { dev, inodes, kind }))
}

/// `struct xfs_fsop_geom_v1` (xfs_fs.h), the part read here.
#[repr(C)]
#[derive(Default)]
struct XfsGeometryV1 {
    blocksize: u32,
    rtextsize: u32,
    agblocks: u32,
    agcount: u32,
    logblocks: u32,
    sectsize: u32,
    inodesize: u32,
    imaxpct: u32,
    datablocks: u64,
    rtblocks: u64,
    rtextents: u64,
    logstart: u64,
    uuid: [u8; 16],
    sunit: u32,
    swidth: u32,
    version: i32,
    flags: u32,
    logsectsize: u32,
    rtsectsize: u32,
    dirblocksize: u32,
}

/// One more than the largest inode number an xfs filesystem can have: an inode number
/// is its allocation group's number above the group-relative number, which takes
/// `agblklog + inopblog` bits (log2 of the group's blocks rounded up, and of the inodes
/// per block).
fn xfs_inode_numbers(path: &std::path::Path) -> Result<u64> {
    use std::os::fd::AsRawFd;
    // XFS_IOC_FSGEOMETRY_V1: _IOR('X', 100, struct xfs_fsop_geom_v1).
    const XFS_IOC_FSGEOMETRY_V1: libc::c_ulong = (2 << 30)
        | ((std::mem::size_of::<XfsGeometryV1>() as libc::c_ulong) << 16)
        | ((b'X' as libc::c_ulong) << 8)
        | 100;
    let dir = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut g = XfsGeometryV1::default();
    // SAFETY: the ioctl fills a struct of exactly this layout.
    let r = unsafe { libc::ioctl(dir.as_raw_fd(), XFS_IOC_FSGEOMETRY_V1 as _, &mut g) };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot read the xfs geometry of {}", path.display()));
    }
    xfs_numbers(g.agcount, g.agblocks, g.blocksize, g.inodesize)
}

fn xfs_numbers(agcount: u32, agblocks: u32, blocksize: u32, inodesize: u32) -> Result<u64> {
    if agcount == 0 || agblocks < 2 || inodesize == 0 || blocksize < inodesize {
        bail!("implausible xfs geometry ({agcount} groups of {agblocks} blocks of {blocksize} bytes, inodes of {inodesize})");
    }
    let agblklog = 32 - (agblocks - 1).leading_zeros();
    let inopblog = (blocksize / inodesize).trailing_zeros();
    let bits = agblklog + inopblog;
    (agcount as u64)
        .checked_shl(bits)
        .filter(|n| n >> bits == agcount as u64)
        .context("xfs inode numbers too large")
}

#[derive(Clone, Copy)]
#[repr(transparent)]
struct PodMarkFs(MarkFs);
// SAFETY: four u64, no padding.
unsafe impl Pod for PodMarkFs {}

/// Where one filesystem's bits are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    /// `st_dev`.
    dev: u64,
    base: u64,
    words: u64,
    /// 0: an exact bitmap; else a bloom filter of `1 << bloom_log2` bits.
    bloom_log2: u64,
}

/// Most words of bitmap, all filesystems together: 64 MiB of kernel memory, one bit
/// for each of 512 M inode numbers. A filesystem that would not fit exactly gets a
/// bloom filter; one that would not fit even so is left to the syscall capture (the
/// agent says so at start).
pub const MAX_WORDS: u64 = 1 << 23;

/// A bloom filter's size: 2^23 bits (1 MiB). With two bits per inode, one lookup in
/// 20 of an unwatched file's writes goes on to the exact map at a million marked
/// inodes, one in 1,500 at 100,000.
pub const BLOOM_LOG2: u64 = 23;

/// Most inodes marked on bloom-filtered filesystems (entries are allocated as they are
/// inserted, about 100 bytes each).
pub const EXACT_MAX: u32 = 1 << 22;

/// Bitmap layout for `filesystems` (the same device once, at most [`MARK_FS_MAX`],
/// at most [`MAX_WORDS`] in all): the slots and the total number of words.
fn layout(filesystems: &[MarkedFs]) -> (Vec<Slot>, u64) {
    let mut slots: Vec<Slot> = Vec::new();
    let mut total = 0u64;
    for fs in filesystems {
        if slots.iter().any(|s| s.dev == fs.dev) || slots.len() == MARK_FS_MAX as usize {
            continue;
        }
        let exact = fs.inodes.div_ceil(64);
        let bloom = 1u64 << (BLOOM_LOG2 - 6);
        let (words, bloom_log2) = if total + exact <= MAX_WORDS && exact <= bloom * 4 {
            (exact, 0)
        } else if total + bloom <= MAX_WORDS {
            (bloom, BLOOM_LOG2)
        } else {
            continue;
        };
        slots.push(Slot {
            dev: fs.dev,
            base: total,
            words,
            bloom_log2,
        });
        total += words;
    }
    (slots, total)
}

/// Devices of `filesystems` the bitmap will cover (those that fit).
pub fn covered_devs(filesystems: &[MarkedFs]) -> Vec<u64> {
    layout(filesystems).0.iter().map(|s| s.dev).collect()
}

/// Words of the `MARKS` array to create for `filesystems` (at least one).
pub fn words_for(filesystems: &[MarkedFs]) -> u32 {
    let (_, total) = layout(filesystems);
    u32::try_from(total.max(1)).unwrap_or(u32::MAX)
}

/// Entries of the `MARK_EXACT` map to allow for `filesystems`.
pub fn exact_entries_for(filesystems: &[MarkedFs]) -> u32 {
    if layout(filesystems).0.iter().any(|s| s.bloom_log2 != 0) {
        EXACT_MAX
    } else {
        1
    }
}

/// A word of the mapped bits, and one bit's mask in it.
type Bit<'a> = (&'a AtomicU64, u64);

/// The bitmap, mapped.
pub struct InodeMarks {
    words: NonNull<AtomicU64>,
    len: usize,
    map_bytes: usize,
    slots: Vec<Slot>,
    _map: MapData,
    /// `MARK_EXACT`, for bloom-filtered filesystems.
    exact: std::sync::Mutex<BpfHashMap<MapData, PodFileId, u8>>,
    /// Marks the exact map had no room for (each warned about once in a while).
    exact_full: AtomicU64,
}

// SAFETY: the mapping is shared memory accessed only through atomics.
unsafe impl Send for InodeMarks {}
// SAFETY: as above.
unsafe impl Sync for InodeMarks {}

impl InodeMarks {
    /// Describes `filesystems` to the program (`mark_fs`) and maps `marks`, which was
    /// created with [`words_for`] of the same list.
    pub fn new(
        marks: Map,
        mark_fs: Map,
        exact: Map,
        filesystems: &[MarkedFs],
        covered: &[u64],
    ) -> Result<Self> {
        let Map::Array(marks) = marks else {
            bail!("the capture program's MARKS map is not an array (build mismatch)");
        };
        // The layout the map was sized by; only the filesystems whose programs are
        // attached are described to them (the syscall door leaves to these programs
        // the files of every filesystem described).
        let (mut slots, total) = layout(filesystems);
        slots.retain(|s| covered.contains(&s.dev));
        let mut fs_map: Array<MapData, PodMarkFs> =
            Array::try_from(mark_fs).context("MARK_FS is not an array (build mismatch)")?;
        for (i, s) in slots.iter().enumerate() {
            let dev = user_dev_to_kernel(s.dev).with_context(|| {
                format!(
                    "device number {:#x} does not fit the kernel's encoding",
                    s.dev
                )
            })?;
            let v = MarkFs {
                dev,
                base: s.base,
                words: s.words,
                bloom_log2: s.bloom_log2,
            };
            fs_map
                .set(i as u32, PodMarkFs(v), 0)
                .context("cannot describe a filesystem to the capture program")?;
            if s.bloom_log2 == 0 {
                tracing::info!(
                    dev = s.dev,
                    "inode marks: an exact bitmap of {} KiB",
                    s.words * 8 / 1024
                );
            } else {
                tracing::info!(
                    dev = s.dev,
                    "inode marks: the filesystem's inode numbers are sparse; a bloom filter \
                     of {} KiB and an exact map of at most {EXACT_MAX} entries",
                    s.words * 8 / 1024
                );
            }
        }
        let len = usize::try_from(total.max(1)).context("inode bitmap too large")?;
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let map_bytes = (len * 8).next_multiple_of(page);
        // SAFETY: a shared mapping of an mmapable BPF array of at least `len` words;
        // the kernel rejects a length larger than the array.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&marks.fd().as_fd()),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .context("cannot map the capture program's inode bitmap");
        }
        let exact =
            BpfHashMap::try_from(exact).context("MARK_EXACT is not a hash (build mismatch)")?;
        Ok(InodeMarks {
            words: NonNull::new(p as *mut AtomicU64).context("mmap returned null")?,
            len,
            map_bytes,
            slots,
            _map: marks,
            exact: std::sync::Mutex::new(exact),
            exact_full: AtomicU64::new(0),
        })
    }

    /// The word holding bit `bit` of `slot`'s bits, and the bit's mask.
    fn word(&self, slot: &Slot, bit: u64) -> Option<Bit<'_>> {
        let word = bit / 64;
        if word >= slot.words {
            return None;
        }
        let index = usize::try_from(slot.base + word).ok()?;
        if index >= self.len {
            return None;
        }
        // SAFETY: `index < len`, inside the mapping, which lives as long as `self`.
        let w = unsafe { &*self.words.as_ptr().add(index) };
        Some((w, 1u64 << (bit % 64)))
    }

    /// The bits `id` sets in its filesystem's words (one, or a bloom filter's two).
    fn bits(&self, id: FileId) -> Option<(&Slot, [Option<Bit<'_>>; 2])> {
        let slot = self.slots.iter().find(|s| s.dev == id.dev)?;
        let (a, b) = if slot.bloom_log2 == 0 {
            (id.ino, id.ino)
        } else {
            bloom_bits(id.ino, slot.bloom_log2)
        };
        Some((slot, [self.word(slot, a), self.word(slot, b)]))
    }

    /// Whether the filesystem of device `dev` (`st_dev`) is captured inside the
    /// filesystem.
    pub fn covers(&self, dev: u64) -> bool {
        self.slots.iter().any(|s| s.dev == dev)
    }

    /// Marks `id` as in a set; false if its filesystem is not covered (or, bloom-
    /// filtered, the exact map is full: said in the log).
    pub fn mark(&self, id: FileId) -> bool {
        let Some((slot, words)) = self.bits(id) else {
            return false;
        };
        if slot.bloom_log2 != 0 {
            let Ok(key) = super::kernel_key(id) else {
                return false;
            };
            let inserted = self
                .exact
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, 1, 0);
            if inserted.is_err() {
                let n = self.exact_full.fetch_add(1, Ordering::Relaxed);
                if n.is_power_of_two() {
                    tracing::error!(
                        "more than {EXACT_MAX} files are marked on filesystems with sparse \
                         inode numbers: writes to {} files beyond that are not captured \
                         (until a rescan finds room)",
                        n + 1
                    );
                }
                return false;
            }
        }
        for (w, bit) in words.into_iter().flatten() {
            w.fetch_or(bit, Ordering::Relaxed);
        }
        true
    }

    /// Whether `id` is marked (a file or directory of a set, or made in one since).
    pub fn is_marked(&self, id: FileId) -> bool {
        let Some((slot, words)) = self.bits(id) else {
            return false;
        };
        let bits = words
            .into_iter()
            .all(|w| w.is_some_and(|(w, bit)| w.load(Ordering::Relaxed) & bit != 0));
        if !bits || slot.bloom_log2 == 0 {
            return bits;
        }
        let Ok(key) = super::kernel_key(id) else {
            return false;
        };
        self.exact
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key, 0)
            .is_ok()
    }
}

impl Drop for InodeMarks {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.words.as_ptr() as *mut libc::c_void, self.map_bytes) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fs(dev: u64, inodes: u64) -> MarkedFs {
        MarkedFs {
            dev,
            inodes,
            kind: FsKind::Ext4,
        }
    }

    #[test]
    fn xfs_inode_numbers_span_every_allocation_group() {
        // mkfs.xfs of 512 MiB: 4 groups of 32768 4 KiB blocks, 512-byte inodes, so
        // 15 + 3 bits per group.
        assert_eq!(xfs_numbers(4, 32768, 4096, 512).unwrap(), 4 << 18);
        // A group of 32769 blocks needs 16 bits of block number.
        assert_eq!(xfs_numbers(4, 32769, 4096, 512).unwrap(), 4 << 19);
        assert!(xfs_numbers(0, 32768, 4096, 512).is_err());
        assert!(xfs_numbers(4, 32768, 256, 512).is_err());
    }

    #[test]
    fn each_filesystem_gets_its_own_words_once() {
        let fss = [fs(1, 101), fs(2, 65), fs(1, 101)];
        let (slots, total) = layout(&fss);
        assert_eq!(
            slots,
            vec![
                Slot {
                    dev: 1,
                    base: 0,
                    words: 2,
                    bloom_log2: 0,
                },
                Slot {
                    dev: 2,
                    base: 2,
                    words: 2,
                    bloom_log2: 0,
                },
            ]
        );
        assert_eq!(total, 4);
        assert_eq!(words_for(&[]), 1);
    }

    #[test]
    fn sparse_numbers_get_a_bloom_filter() {
        let bloom_words = 1 << (BLOOM_LOG2 - 6);
        let fss = [
            fs(1, 65),
            // Exact would take the whole budget: a bloom filter instead.
            fs(2, MAX_WORDS * 64),
            fs(3, 65),
        ];
        let (slots, total) = layout(&fss);
        let kinds: Vec<(u64, u64)> = slots.iter().map(|s| (s.dev, s.bloom_log2)).collect();
        assert_eq!(kinds, vec![(1, 0), (2, BLOOM_LOG2), (3, 0)]);
        assert_eq!(total, 2 + bloom_words + 2);
        assert_eq!(exact_entries_for(&fss), EXACT_MAX);
        assert_eq!(exact_entries_for(&[fs(1, 65)]), 1);
        // As many huge filesystems as the program scans all fit, as bloom filters.
        let many: Vec<MarkedFs> = (0..8).map(|d| fs(d, u64::MAX / 2)).collect();
        let (slots, total) = layout(&many);
        assert_eq!(slots.len(), MARK_FS_MAX as usize);
        assert!(slots.iter().all(|s| s.bloom_log2 == BLOOM_LOG2));
        assert_eq!(total, 8 * bloom_words);
    }

    #[test]
    fn bloom_bits_spread_and_stay_in_range() {
        let mut seen = std::collections::HashSet::new();
        for ino in 0..10_000u64 {
            let (a, b) = bloom_bits(ino << 20 | 0x80, BLOOM_LOG2);
            assert!(a < 1 << BLOOM_LOG2 && b < 1 << BLOOM_LOG2);
            seen.insert(a);
        }
        assert!(seen.len() > 9_990, "{} distinct of 10000", seen.len());
    }

    #[test]
    fn no_more_filesystems_than_the_program_scans() {
        let fss: Vec<MarkedFs> = (0..20).map(|d| fs(d, 1)).collect();
        let (slots, _) = layout(&fss);
        assert_eq!(slots.len(), MARK_FS_MAX as usize);
    }
}
