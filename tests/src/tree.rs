//! Compares two directory trees.
//!
//! Two modes:
//!
//! - **content** ([`snapshot`], [`diff`], [`wait_equal`]): names, types, sizes, contents
//!   and symlink targets. What every replication test checks.
//! - **strict** ([`snapshot_full`], [`diff_full`], [`wait_identical`]): everything a
//!   faithful copy must keep, per entry:
//!   - type (file, dir, symlink, fifo, socket, char or block device, with `rdev`);
//!   - for files: size, content (blake3) and holes: the replica's allocated extents
//!     (FIEMAP, preallocated ones included) must lie within the source's, so a sparse
//!     source stays sparse (a range allocated on the source may be a hole on the
//!     replica: zeros either way);
//!   - permission bits (`mode & 0o7777`), uid, gid;
//!   - mtime with nanoseconds (`lstat`, so a symlink's own), never atime or ctime;
//!   - every extended attribute (`llistxattr`/`lgetxattr`, symlinks not followed:
//!     `user.*`, `trusted.*`, `security.*`, POSIX ACLs as `system.posix_acl_access` and
//!     `system.posix_acl_default`) as a name -> bytes map;
//!   - symlink targets;
//!   - hard links: paths of the tree that share an inode on the source must share one
//!     inode on the replica, and that inode must have no other path in the tree (the
//!     groups are the same sets of paths on both sides).
//!
//!   The root itself is compared for mode, uid, gid and xattrs (shown as `.`), never
//!   for its mtime: the replica root is made by the receiver and its entries change
//!   under it.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CString, OsString};
use std::fmt;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir,
    File { size: u64, hash: [u8; 32] },
    Symlink(PathBuf),
    Other(u32),
}

pub type Snapshot = BTreeMap<PathBuf, Entry>;

/// Every entry below `root` (not the root itself), keyed by relative path.
pub fn snapshot(root: &Path) -> std::io::Result<Snapshot> {
    let mut out = BTreeMap::new();
    walk(root, Path::new(""), &mut out)?;
    Ok(out)
}

fn walk(abs: &Path, rel: &Path, out: &mut Snapshot) -> std::io::Result<()> {
    for e in std::fs::read_dir(abs)? {
        let e = e?;
        let child = abs.join(e.file_name());
        let crel = rel.join(e.file_name());
        let m = match std::fs::symlink_metadata(&child) {
            Ok(m) => m,
            // Raced with a deletion on a live tree; the next snapshot sees it.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err),
        };
        let entry = if m.is_dir() {
            walk(&child, &crel, out)?;
            Entry::Dir
        } else if m.is_file() {
            match hash_file(&child) {
                Ok((size, hash)) => Entry::File { size, hash },
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err),
            }
        } else if m.file_type().is_symlink() {
            Entry::Symlink(std::fs::read_link(&child)?)
        } else {
            Entry::Other(m.mode())
        };
        out.insert(crel, entry);
    }
    Ok(())
}

pub fn hash_file(p: &Path) -> std::io::Result<(u64, [u8; 32])> {
    let mut f = std::fs::File::open(p)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((size, *h.finalize().as_bytes()))
}

/// Human-readable differences between two snapshots (empty = identical).
pub fn diff(src: &Snapshot, dst: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    for (p, e) in src {
        match dst.get(p) {
            None => out.push(format!("missing on replica: {}", p.display())),
            Some(d) if d != e => out.push(format!(
                "differs: {} (source {}, replica {})",
                p.display(),
                describe(e),
                describe(d)
            )),
            _ => {}
        }
    }
    for p in dst.keys() {
        if !src.contains_key(p) {
            out.push(format!("extra on replica: {}", p.display()));
        }
    }
    out
}

fn describe(e: &Entry) -> String {
    match e {
        Entry::Dir => "directory".into(),
        Entry::File { size, hash } => format!("{size} bytes, blake3 {}", hex8(hash)),
        Entry::Symlink(t) => format!("symlink -> {}", t.display()),
        Entry::Other(m) => format!("special file mode {m:o}"),
    }
}

fn hex8(h: &[u8; 32]) -> String {
    h[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// Waits until `dst` equals `src` in content (see the module doc) or `timeout` passes.
/// `src` is snapshotted once (it must be quiescent), `dst` anew each try. Returns how
/// long it took, or the last differences.
pub fn wait_equal(
    src: &Path,
    dst: &Path,
    timeout: std::time::Duration,
) -> Result<std::time::Duration, Vec<String>> {
    wait_until_same(src, dst, timeout, Duration::from_millis(50), snapshot, diff)
}

/// Snapshots `src` once, then `dst` every `poll` until `compare` finds no difference
/// or `timeout` passes.
fn wait_until_same<S>(
    src: &Path,
    dst: &Path,
    timeout: Duration,
    poll: Duration,
    snap: fn(&Path) -> std::io::Result<S>,
    compare: fn(&S, &S) -> Vec<String>,
) -> Result<Duration, Vec<String>> {
    let start = Instant::now();
    let want = snap(src).map_err(|e| vec![format!("cannot read source: {e}")])?;
    loop {
        let diffs = match snap(dst) {
            Ok(got) => compare(&want, &got),
            Err(e) => vec![format!("cannot read replica: {e}")],
        };
        if diffs.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            return Err(diffs);
        }
        std::thread::sleep(poll);
    }
}

// ---------------------------------------------------------------------------------
// Strict mode
// ---------------------------------------------------------------------------------

/// The type of a directory entry, with what only that type has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink(PathBuf),
    Fifo,
    Socket,
    Char { rdev: u64 },
    Block { rdev: u64 },
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::File => write!(f, "file"),
            Kind::Dir => write!(f, "directory"),
            Kind::Symlink(t) => write!(f, "symlink -> {}", t.display()),
            Kind::Fifo => write!(f, "fifo"),
            Kind::Socket => write!(f, "socket"),
            Kind::Char { rdev } => write!(f, "char device {}:{}", major(*rdev), minor(*rdev)),
            Kind::Block { rdev } => {
                write!(f, "block device {}:{}", major(*rdev), minor(*rdev))
            }
        }
    }
}

fn major(rdev: u64) -> u32 {
    libc::major(rdev as libc::dev_t)
}

fn minor(rdev: u64) -> u32 {
    libc::minor(rdev as libc::dev_t)
}

/// Content of a regular file: its size, blake3 hash and data extents (`[start, end)`
/// ranges FIEMAP reports allocated, see [`data_extents`]; the rest are holes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    pub size: u64,
    pub hash: [u8; 32],
    pub data: Vec<(u64, u64)>,
}

/// Everything strict mode compares about one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    /// Regular files only.
    pub content: Option<Content>,
    /// `st_mode & 0o7777`.
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    /// (seconds, nanoseconds) from `lstat`.
    pub mtime: (i64, i64),
    pub xattrs: BTreeMap<OsString, Vec<u8>>,
    /// (st_dev, st_ino): hard-link groups are computed from it; never compared across
    /// trees.
    pub inode: (u64, u64),
}

/// A strict snapshot: the root's attributes and every entry below it by relative path.
#[derive(Debug, Clone)]
pub struct FullSnapshot {
    pub root: Meta,
    pub entries: BTreeMap<PathBuf, Meta>,
}

impl FullSnapshot {
    /// Sets of (two or more) paths of the tree that share an inode.
    pub fn link_groups(&self) -> Vec<BTreeSet<PathBuf>> {
        let mut by_inode: BTreeMap<(u64, u64), BTreeSet<PathBuf>> = BTreeMap::new();
        for (p, m) in &self.entries {
            if m.kind != Kind::Dir {
                by_inode.entry(m.inode).or_default().insert(p.clone());
            }
        }
        by_inode.into_values().filter(|g| g.len() > 1).collect()
    }
}

/// Every entry below `root` with its full metadata (see the module doc). Entries that
/// vanish while the tree is read are skipped: the next snapshot sees the new state.
pub fn snapshot_full(root: &Path) -> std::io::Result<FullSnapshot> {
    let root_meta = meta(root)?
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "root vanished"))?;
    if root_meta.kind != Kind::Dir {
        return Err(std::io::Error::other(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let mut entries = BTreeMap::new();
    walk_full(root, Path::new(""), &mut entries)?;
    Ok(FullSnapshot {
        root: root_meta,
        entries,
    })
}

fn walk_full(abs: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, Meta>) -> std::io::Result<()> {
    let rd = match std::fs::read_dir(abs) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for e in rd {
        let e = e?;
        let child = abs.join(e.file_name());
        let crel = rel.join(e.file_name());
        let Some(m) = meta(&child)? else { continue };
        if m.kind == Kind::Dir {
            walk_full(&child, &crel, out)?;
        }
        out.insert(crel, m);
    }
    Ok(())
}

fn not_found(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR))
}

/// The metadata of `p` (not following a final symlink), None if it is gone.
fn meta(p: &Path) -> std::io::Result<Option<Meta>> {
    let m = match std::fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) if not_found(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    let ft = m.file_type();
    let mut content = None;
    let kind = if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        match file_content(p) {
            Ok(Some(c)) => content = Some(c),
            Ok(None) => return Ok(None),
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(e),
        }
        Kind::File
    } else if ft.is_symlink() {
        match std::fs::read_link(p) {
            Ok(t) => Kind::Symlink(t),
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(e),
        }
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_socket() {
        Kind::Socket
    } else if ft.is_char_device() {
        Kind::Char { rdev: m.rdev() }
    } else if ft.is_block_device() {
        Kind::Block { rdev: m.rdev() }
    } else {
        return Err(std::io::Error::other(format!(
            "{}: unknown file type, mode {:o}",
            p.display(),
            m.mode()
        )));
    };
    let xattrs = match xattrs(p) {
        Ok(x) => x,
        Err(e) if not_found(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(Some(Meta {
        kind,
        content,
        perm: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime: (m.mtime(), m.mtime_nsec()),
        xattrs,
        inode: (m.dev(), m.ino()),
    }))
}

/// Size, hash and data extents of a regular file; None if it is no longer a regular
/// file (replaced by something else since `lstat`).
fn file_content(p: &Path) -> std::io::Result<Option<Content>> {
    // O_NOFOLLOW | O_NONBLOCK: a symlink or fifo swapped in since lstat must neither be
    // followed nor block us.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(p);
    let mut f = match f {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(None),
        Err(e) => return Err(e),
    };
    if !f.metadata()?.is_file() {
        return Ok(None);
    }
    let data = data_extents(&f)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok(Some(Content {
        size,
        hash: *h.finalize().as_bytes(),
        data,
    }))
}

/// The allocated extents of an open file, as FIEMAP reports them after syncing it
/// (written and unwritten alike): unlike `SEEK_DATA`, whose answer for preallocated
/// (unwritten) extents depends on what happens to be in the page cache, this is
/// deterministic. Filesystems without FIEMAP (tmpfs) fall back to `SEEK_DATA`.
pub fn data_extents(f: &std::fs::File) -> std::io::Result<Vec<(u64, u64)>> {
    match fiemap_extents(f) {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => seek_data_extents(f),
        r => r,
    }
}

fn fiemap_extents(f: &std::fs::File) -> std::io::Result<Vec<(u64, u64)>> {
    const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
    const FIEMAP_FLAG_SYNC: u32 = 1;
    const FIEMAP_EXTENT_LAST: u32 = 1;
    const BATCH: usize = 64;
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Extent {
        logical: u64,
        physical: u64,
        length: u64,
        _reserved64: [u64; 2],
        flags: u32,
        _reserved: [u32; 3],
    }
    #[repr(C)]
    struct Fiemap {
        start: u64,
        length: u64,
        flags: u32,
        mapped: u32,
        count: u32,
        _reserved: u32,
        extents: [Extent; BATCH],
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut start = 0u64;
    loop {
        let mut m = Fiemap {
            start,
            length: u64::MAX - start,
            flags: FIEMAP_FLAG_SYNC,
            mapped: 0,
            count: BATCH as u32,
            _reserved: 0,
            extents: [Extent::default(); BATCH],
        };
        // SAFETY: FS_IOC_FIEMAP reads and fills a struct fiemap with `count` extents.
        if unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FIEMAP, &mut m as *mut Fiemap) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = (m.mapped as usize).min(BATCH);
        for e in &m.extents[..n] {
            let (a, b) = (e.logical, e.logical + e.length);
            match out.last_mut() {
                Some(last) if last.1 >= a => last.1 = last.1.max(b),
                _ => out.push((a, b)),
            }
        }
        if n == 0 || m.extents[n - 1].flags & FIEMAP_EXTENT_LAST != 0 {
            return Ok(out);
        }
        let last = &m.extents[n - 1];
        start = last.logical + last.length;
    }
}

fn seek_data_extents(f: &std::fs::File) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut off: libc::off_t = 0;
    loop {
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data at or after `off`
            }
            return Err(e);
        }
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // truncated meanwhile
            }
            return Err(e);
        }
        if hole <= data {
            break;
        }
        out.push((data as u64, hole as u64));
        off = hole;
    }
    // Back to the start for the reader.
    if unsafe { libc::lseek(fd, 0, libc::SEEK_SET) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(out)
}

fn cpath(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other(format!("{}: NUL in path", p.display())))
}

/// All extended attributes of `p` (a symlink's own), name -> value.
pub fn xattrs(p: &Path) -> std::io::Result<BTreeMap<OsString, Vec<u8>>> {
    let c = cpath(p)?;
    let mut names = vec![0u8; 1024];
    let len = loop {
        let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
        if n >= 0 {
            break n as usize;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) => {
                let need = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
                if need < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                names.resize(need as usize + 1024, 0);
            }
            Some(libc::ENOTSUP) => return Ok(BTreeMap::new()),
            _ => return Err(e),
        }
    };
    let mut out = BTreeMap::new();
    for name in names[..len].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).expect("no NUL inside a split name");
        let mut val = vec![0u8; 256];
        loop {
            let n = unsafe {
                libc::lgetxattr(
                    c.as_ptr(),
                    cname.as_ptr(),
                    val.as_mut_ptr().cast(),
                    val.len(),
                )
            };
            if n >= 0 {
                val.truncate(n as usize);
                out.insert(OsString::from_vec(name.to_vec()), val);
                break;
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ERANGE) => {
                    let need = unsafe {
                        libc::lgetxattr(c.as_ptr(), cname.as_ptr(), std::ptr::null_mut(), 0)
                    };
                    if need < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    val.resize(need as usize + 256, 0);
                }
                // Removed between list and get.
                Some(libc::ENODATA) => break,
                _ => return Err(e),
            }
        }
    }
    Ok(out)
}

fn fmt_time((s, ns): (i64, i64)) -> String {
    format!("{s}.{ns:09}")
}

/// An xattr value for a message: text when printable, else hex (long values cut).
fn fmt_value(v: &[u8]) -> String {
    let printable = v.iter().all(|b| (0x20..0x7f).contains(b));
    if printable && !v.is_empty() {
        if v.len() <= 64 {
            format!("{:?}", String::from_utf8_lossy(v))
        } else {
            format!(
                "{:?}... ({} bytes)",
                String::from_utf8_lossy(&v[..64]),
                v.len()
            )
        }
    } else {
        let hex: String = v.iter().take(32).map(|b| format!("{b:02x}")).collect();
        if v.len() > 32 {
            format!("0x{hex}... ({} bytes)", v.len())
        } else {
            format!("0x{hex} ({} bytes)", v.len())
        }
    }
}

fn fmt_extents(e: &[(u64, u64)]) -> String {
    if e.is_empty() {
        return "none".into();
    }
    let mut s: Vec<String> = e
        .iter()
        .take(6)
        .map(|(a, b)| format!("[{a}, {b})"))
        .collect();
    if e.len() > 6 {
        s.push(format!("... ({} extents)", e.len()));
    }
    s.join(" ")
}

/// The first part of `got` not covered by `allowed` (both sorted, non-overlapping).
fn first_uncovered(got: &[(u64, u64)], allowed: &[(u64, u64)]) -> Option<(u64, u64)> {
    for &(mut a, b) in got {
        for &(x, y) in allowed {
            if y <= a || x >= b {
                continue;
            }
            if x > a {
                return Some((a, x));
            }
            a = y;
            if a >= b {
                break;
            }
        }
        if a < b {
            return Some((a, b));
        }
    }
    None
}

fn display_rel(p: &Path) -> std::borrow::Cow<'_, str> {
    if p.as_os_str().is_empty() {
        ".".into()
    } else {
        p.to_string_lossy()
    }
}

/// Differences of one entry's attributes (not its hard links), each line starting with
/// the path.
fn diff_meta(p: &Path, s: &Meta, d: &Meta, is_root: bool, out: &mut Vec<String>) {
    let name = display_rel(p);
    let same_type = std::mem::discriminant(&s.kind) == std::mem::discriminant(&d.kind);
    if !same_type {
        out.push(format!("{name}: type source {} replica {}", s.kind, d.kind));
        return;
    }
    match (&s.kind, &d.kind) {
        (Kind::Symlink(a), Kind::Symlink(b)) if a != b => out.push(format!(
            "{name}: symlink target source {} replica {}",
            a.display(),
            b.display()
        )),
        (Kind::Char { rdev: a }, Kind::Char { rdev: b })
        | (Kind::Block { rdev: a }, Kind::Block { rdev: b })
            if a != b =>
        {
            out.push(format!(
                "{name}: rdev source {}:{} replica {}:{}",
                major(*a),
                minor(*a),
                major(*b),
                minor(*b)
            ))
        }
        _ => {}
    }
    if let (Some(a), Some(b)) = (&s.content, &d.content) {
        if a.size != b.size {
            out.push(format!("{name}: size source {} replica {}", a.size, b.size));
        }
        if a.hash != b.hash {
            out.push(format!(
                "{name}: content source blake3 {} replica blake3 {}",
                hex8(&a.hash),
                hex8(&b.hash)
            ));
        }
        // Extents end at i_size: past the source's size the difference is one of size.
        let within: Vec<(u64, u64)> = b
            .data
            .iter()
            .filter(|(x, _)| *x < a.size)
            .map(|&(x, y)| (x, y.min(a.size)))
            .collect();
        if let Some((x, y)) = first_uncovered(&within, &a.data) {
            out.push(format!(
                "{name}: holes filled: replica has data at [{x}, {y}) where the source \
                 has a hole (data extents source {} replica {})",
                fmt_extents(&a.data),
                fmt_extents(&b.data)
            ));
        }
    }
    if s.perm != d.perm {
        out.push(format!(
            "{name}: mode source {:04o} replica {:04o}",
            s.perm, d.perm
        ));
    }
    if s.uid != d.uid {
        out.push(format!("{name}: uid source {} replica {}", s.uid, d.uid));
    }
    if s.gid != d.gid {
        out.push(format!("{name}: gid source {} replica {}", s.gid, d.gid));
    }
    if !is_root && s.mtime != d.mtime {
        out.push(format!(
            "{name}: mtime source {} replica {}",
            fmt_time(s.mtime),
            fmt_time(d.mtime)
        ));
    }
    for (k, v) in &s.xattrs {
        let key = k.to_string_lossy();
        match d.xattrs.get(k) {
            None => out.push(format!(
                "{name}: xattr {key} source {} replica missing",
                fmt_value(v)
            )),
            Some(w) if w != v => out.push(format!(
                "{name}: xattr {key} source {} replica {}",
                fmt_value(v),
                fmt_value(w)
            )),
            _ => {}
        }
    }
    for (k, w) in &d.xattrs {
        if !s.xattrs.contains_key(k) {
            out.push(format!(
                "{name}: xattr {} source missing replica {}",
                k.to_string_lossy(),
                fmt_value(w)
            ));
        }
    }
}

fn fmt_group(g: &BTreeSet<PathBuf>) -> String {
    g.iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Human-readable differences between two strict snapshots (empty = identical). Every
/// line names the path and the attribute, with both values.
pub fn diff_full(src: &FullSnapshot, dst: &FullSnapshot) -> Vec<String> {
    let mut out = Vec::new();
    diff_meta(Path::new(""), &src.root, &dst.root, true, &mut out);
    for (p, s) in &src.entries {
        match dst.entries.get(p) {
            None => out.push(format!("missing on replica: {} ({})", p.display(), s.kind)),
            Some(d) => diff_meta(p, s, d, false, &mut out),
        }
    }
    for (p, d) in &dst.entries {
        if !src.entries.contains_key(p) {
            out.push(format!("extra on replica: {} ({})", p.display(), d.kind));
        }
    }
    // Hard links: the same groups of paths on both sides.
    let dst_groups = dst.link_groups();
    let group_of = |p: &PathBuf| -> BTreeSet<PathBuf> {
        dst_groups
            .iter()
            .find(|g| g.contains(p))
            .cloned()
            .unwrap_or_else(|| BTreeSet::from([p.clone()]))
    };
    let src_groups = src.link_groups();
    for g in &src_groups {
        // Only the paths the replica has: missing ones are reported above.
        let present: BTreeSet<PathBuf> = g
            .iter()
            .filter(|p| dst.entries.contains_key(*p))
            .cloned()
            .collect();
        let Some(first) = present.iter().next() else {
            continue;
        };
        let mut seen = BTreeSet::new();
        let mut parts = Vec::new();
        for p in &present {
            if seen.contains(p) {
                continue;
            }
            let rg = group_of(p);
            seen.extend(rg.iter().cloned());
            parts.push(rg);
        }
        let exact = parts.len() == 1 && parts[0] == *g;
        if !exact {
            let desc = parts
                .iter()
                .map(|rg| format!("{{{}}}", fmt_group(rg)))
                .collect::<Vec<_>>()
                .join(" ");
            out.push(format!(
                "{}: hard links: source {{{}}} share one inode, replica inodes group them as {desc}",
                first.display(),
                fmt_group(g)
            ));
        }
    }
    for rg in &dst_groups {
        // A replica group is fine if it is a source group; groups that overlap a source
        // group were reported above.
        if src_groups.contains(rg) || src_groups.iter().any(|g| !g.is_disjoint(rg)) {
            continue;
        }
        out.push(format!(
            "{}: hard links: replica {{{}}} share one inode, on the source they are separate",
            rg.iter().next().expect("groups have 2+ paths").display(),
            fmt_group(rg)
        ));
    }
    out
}

/// Waits until `dst` is identical to `src` in strict mode (see the module doc) or
/// `timeout` passes. `src` is snapshotted once (it must be quiescent), `dst` anew each
/// try. Returns how long it took, or the last differences.
pub fn wait_identical(src: &Path, dst: &Path, timeout: Duration) -> Result<Duration, Vec<String>> {
    wait_until_same(
        src,
        dst,
        timeout,
        Duration::from_millis(100),
        snapshot_full,
        diff_full,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, FileExt, PermissionsExt};
    use std::process::Command;

    fn c(p: &Path) -> CString {
        cpath(p).unwrap()
    }

    fn check(r: libc::c_int, what: &str) {
        assert!(r == 0, "{what}: {}", std::io::Error::last_os_error());
    }

    /// Sets `p`'s mtime (a symlink's own), atime untouched.
    fn set_mtime(p: &Path, (s, ns): (i64, i64)) {
        let t = [
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            libc::timespec {
                tv_sec: s,
                tv_nsec: ns,
            },
        ];
        let r = unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c(p).as_ptr(),
                t.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        check(r, "utimensat");
    }

    fn mtime_of(p: &Path) -> (i64, i64) {
        let m = std::fs::symlink_metadata(p).unwrap();
        (m.mtime(), m.mtime_nsec())
    }

    fn set_xattr(p: &Path, name: &str, v: &[u8]) {
        let n = CString::new(name).unwrap();
        let r =
            unsafe { libc::lsetxattr(c(p).as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
        check(r, "lsetxattr");
    }

    /// Runs `f` on a path of the replica, then puts back the mtime of its parent
    /// directory (which `f` may have changed by adding or removing names), so that a test
    /// sees only the difference it made.
    fn keeping_parent_mtime(p: &Path, f: impl FnOnce()) {
        let parent = p.parent().unwrap();
        let t = mtime_of(parent);
        f();
        set_mtime(parent, t);
    }

    /// A source tree with one of everything, and an exact copy of it (`cp -a`).
    struct Pair {
        _dir: tempfile::TempDir,
        src: PathBuf,
        dst: PathBuf,
    }

    impl Pair {
        fn new() -> Pair {
            let dir = tempfile::tempdir().unwrap();
            let src = dir.path().join("src");
            let dst = dir.path().join("dst");
            std::fs::create_dir(&src).unwrap();
            let s = &src;
            std::fs::create_dir_all(s.join("a/b")).unwrap();
            std::fs::write(s.join("a/b/file"), b"hello").unwrap();
            std::fs::set_permissions(s.join("a/b/file"), PermissionsExt::from_mode(0o640)).unwrap();
            set_xattr(&s.join("a/b/file"), "user.color", b"blue");
            set_xattr(&s.join("a"), "user.dir", b"\x00\x01binary");
            // Sparse: data at 0 and at 1 MiB, a hole in between and after.
            let f = std::fs::File::create(s.join("sparse")).unwrap();
            f.write_all_at(&[7u8; 4096], 0).unwrap();
            f.write_all_at(&[9u8; 4096], 1 << 20).unwrap();
            f.set_len(4 << 20).unwrap();
            drop(f);
            std::fs::write(s.join("a/linked"), b"one inode, three names").unwrap();
            std::fs::hard_link(s.join("a/linked"), s.join("a/b/linked2")).unwrap();
            std::fs::hard_link(s.join("a/linked"), s.join("linked3")).unwrap();
            for t in ["twin1", "twin2"] {
                std::fs::write(s.join(t), b"equal twins").unwrap();
                set_mtime(&s.join(t), (1_650_000_000, 5));
            }
            symlink("a/b/file", s.join("rel")).unwrap();
            symlink("/nonexistent/doppel/target", s.join("dangling")).unwrap();
            let r = unsafe { libc::mkfifo(c(&s.join("fifo")).as_ptr(), 0o600) };
            check(r, "mkfifo");
            set_mtime(&s.join("a/b/file"), (1_700_000_000, 123_456_789));
            set_mtime(&s.join("rel"), (1_600_000_000, 1));
            set_mtime(&s.join("a/b"), (1_500_000_000, 999_999_999));
            let st = Command::new("cp")
                .arg("-a")
                .arg("--sparse=always")
                .arg(&src)
                .arg(&dst)
                .status()
                .unwrap();
            assert!(st.success(), "cp -a failed");
            Pair {
                _dir: dir,
                src,
                dst,
            }
        }

        fn diff(&self) -> Vec<String> {
            diff_full(
                &snapshot_full(&self.src).unwrap(),
                &snapshot_full(&self.dst).unwrap(),
            )
        }
    }

    #[test]
    fn an_exact_copy_has_no_differences() {
        let p = Pair::new();
        let s = snapshot_full(&p.src).unwrap();
        assert_eq!(s.link_groups().len(), 1, "{:?}", s.link_groups());
        let sparse = s.entries[Path::new("sparse")].content.clone().unwrap();
        assert_eq!(sparse.size, 4 << 20);
        assert_eq!(sparse.data, vec![(0, 4096), (1 << 20, (1 << 20) + 4096)]);
        assert_eq!(p.diff(), Vec::<String>::new());
        // Content mode agrees.
        assert_eq!(
            diff(&snapshot(&p.src).unwrap(), &snapshot(&p.dst).unwrap()),
            Vec::<String>::new()
        );
    }

    #[test]
    fn detects_a_changed_mode() {
        let p = Pair::new();
        std::fs::set_permissions(p.dst.join("a/b/file"), PermissionsExt::from_mode(0o4600))
            .unwrap();
        assert_eq!(p.diff(), vec!["a/b/file: mode source 0640 replica 4600"]);
    }

    #[test]
    fn detects_a_changed_mtime_to_the_nanosecond() {
        let p = Pair::new();
        set_mtime(&p.dst.join("a/b/file"), (1_700_000_000, 123_456_780));
        set_mtime(&p.dst.join("a/b"), (1_500_000_000, 0));
        assert_eq!(
            p.diff(),
            vec![
                "a/b: mtime source 1500000000.999999999 replica 1500000000.000000000",
                "a/b/file: mtime source 1700000000.123456789 replica 1700000000.123456780",
            ]
        );
        // Content mode does not look at times.
        assert!(diff(&snapshot(&p.src).unwrap(), &snapshot(&p.dst).unwrap()).is_empty());
    }

    #[test]
    fn detects_changed_missing_and_extra_xattrs() {
        let p = Pair::new();
        set_xattr(&p.dst.join("a/b/file"), "user.color", b"red");
        set_xattr(&p.dst.join("a/b/file"), "user.extra", b"");
        let n = CString::new("user.dir").unwrap();
        let r = unsafe { libc::lremovexattr(c(&p.dst.join("a")).as_ptr(), n.as_ptr()) };
        check(r, "lremovexattr");
        assert_eq!(
            p.diff(),
            vec![
                "a: xattr user.dir source 0x000162696e617279 (8 bytes) replica missing",
                "a/b/file: xattr user.color source \"blue\" replica \"red\"",
                "a/b/file: xattr user.extra source missing replica 0x (0 bytes)",
            ]
        );
    }

    #[test]
    fn detects_a_posix_acl_as_its_xattr() {
        if Command::new("setfacl").arg("--version").output().is_err() {
            eprintln!("skipping: setfacl is missing (Debian package acl)");
            return;
        }
        let p = Pair::new();
        let st = Command::new("setfacl")
            .args(["-m", "u:1234:rw"])
            .arg(p.dst.join("a/b/file"))
            .status()
            .unwrap();
        assert!(st.success());
        let d = p.diff();
        // The ACL's mask also shows in the group bits of the mode.
        assert_eq!(d.len(), 2, "{d:#?}");
        assert_eq!(d[0], "a/b/file: mode source 0640 replica 0660");
        assert!(
            d[1].starts_with("a/b/file: xattr system.posix_acl_access source missing replica 0x"),
            "{d:#?}"
        );
    }

    #[test]
    fn detects_a_broken_hard_link() {
        let p = Pair::new();
        // Same bytes, mode and mtime, but its own inode.
        let victim = p.dst.join("a/b/linked2");
        keeping_parent_mtime(&victim, || {
            let t = mtime_of(&victim);
            let tmp = p.dst.join("a/b/tmp");
            std::fs::copy(&victim, &tmp).unwrap();
            std::fs::rename(&tmp, &victim).unwrap();
            set_mtime(&victim, t);
        });
        assert_eq!(
            p.diff(),
            vec![
                "a/b/linked2: hard links: source {a/b/linked2, a/linked, linked3} share one \
                 inode, replica inodes group them as {a/b/linked2} {a/linked, linked3}"
            ]
        );
    }

    #[test]
    fn detects_a_hard_link_the_source_does_not_have() {
        let p = Pair::new();
        // twin1 and twin2 are equal files with their own inodes; link them on the replica.
        keeping_parent_mtime(&p.dst.join("twin2"), || {
            std::fs::remove_file(p.dst.join("twin2")).unwrap();
            std::fs::hard_link(p.dst.join("twin1"), p.dst.join("twin2")).unwrap();
        });
        assert_eq!(
            p.diff(),
            vec!["twin1: hard links: replica {twin1, twin2} share one inode, on the source they are separate"]
        );
        // A link that joins a source group to another path shows in that group's line.
        let q = Pair::new();
        keeping_parent_mtime(&q.dst.join("twin1"), || {
            std::fs::remove_file(q.dst.join("twin1")).unwrap();
            std::fs::hard_link(q.dst.join("linked3"), q.dst.join("twin1")).unwrap();
        });
        let d = q.diff();
        assert!(
            d.iter().any(|l| l
                == "a/b/linked2: hard links: source {a/b/linked2, a/linked, linked3} share one \
                    inode, replica inodes group them as {a/b/linked2, a/linked, linked3, twin1}"),
            "{d:#?}"
        );
    }

    #[test]
    fn detects_filled_holes_but_not_holes_punched_into_zeros() {
        let p = Pair::new();
        let victim = p.dst.join("sparse");
        let t = mtime_of(&victim);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&victim)
            .unwrap();
        // Zeros where the source has a hole: same bytes, but allocated.
        f.write_all_at(&vec![0u8; 8192], 8192).unwrap();
        f.sync_all().unwrap();
        drop(f);
        set_mtime(&victim, t);
        let d = p.diff();
        assert_eq!(d.len(), 1, "{d:#?}");
        assert!(
            d[0].starts_with(
                "sparse: holes filled: replica has data at [8192, 16384) where the source has a hole"
            ),
            "{d:#?}"
        );
        // The other way round is fine: allocated zeros on the source may be a hole on the
        // replica.
        let q = Pair::new();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(q.src.join("sparse"))
            .unwrap();
        let t = mtime_of(&q.src.join("sparse"));
        f.write_all_at(&vec![0u8; 8192], 8192).unwrap();
        f.sync_all().unwrap();
        drop(f);
        set_mtime(&q.src.join("sparse"), t);
        assert_eq!(q.diff(), Vec::<String>::new());
    }

    #[test]
    fn detects_a_changed_symlink_target() {
        let p = Pair::new();
        let l = p.dst.join("rel");
        keeping_parent_mtime(&l, || {
            let t = mtime_of(&l);
            std::fs::remove_file(&l).unwrap();
            symlink("a/b/other", &l).unwrap();
            set_mtime(&l, t);
        });
        assert_eq!(
            p.diff(),
            vec!["rel: symlink target source a/b/file replica a/b/other"]
        );
    }

    #[test]
    fn detects_type_content_size_owner_missing_and_extra() {
        let p = Pair::new();
        keeping_parent_mtime(&p.dst.join("fifo"), || {
            let t = mtime_of(&p.dst.join("fifo"));
            std::fs::remove_file(p.dst.join("fifo")).unwrap();
            std::fs::write(p.dst.join("fifo"), b"").unwrap();
            set_mtime(&p.dst.join("fifo"), t);
            std::fs::remove_file(p.dst.join("dangling")).unwrap();
            std::fs::create_dir(p.dst.join("new")).unwrap();
        });
        let f = p.dst.join("a/b/file");
        let t = mtime_of(&f);
        std::fs::write(&f, b"hello!").unwrap();
        set_mtime(&f, t);
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            std::os::unix::fs::lchown(p.dst.join("rel"), Some(1234), Some(5678)).unwrap();
        }
        let mut want = vec![
            "a/b/file: size source 5 replica 6".to_string(),
            format!(
                "a/b/file: content source blake3 {} replica blake3 {}",
                hex8(blake3::hash(b"hello").as_bytes()),
                hex8(blake3::hash(b"hello!").as_bytes())
            ),
            "fifo: type source fifo replica file".to_string(),
        ];
        if root {
            want.push("rel: uid source 0 replica 1234".into());
            want.push("rel: gid source 0 replica 5678".into());
        }
        want.insert(
            0,
            "missing on replica: dangling (symlink -> /nonexistent/doppel/target)".into(),
        );
        want.push("extra on replica: new (directory)".into());
        let mut got = p.diff();
        got.sort();
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn the_root_is_compared_but_not_its_mtime() {
        let p = Pair::new();
        set_mtime(&p.dst, (1, 2));
        assert!(p.diff().is_empty(), "{:#?}", p.diff());
        std::fs::set_permissions(&p.dst, PermissionsExt::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&p.src, PermissionsExt::from_mode(0o700)).unwrap();
        assert_eq!(p.diff(), vec![".: mode source 0700 replica 0755"]);
    }

    #[test]
    fn uncovered_ranges() {
        assert_eq!(first_uncovered(&[], &[(0, 10)]), None);
        assert_eq!(first_uncovered(&[(0, 10)], &[(0, 10)]), None);
        assert_eq!(first_uncovered(&[(2, 8)], &[(0, 10)]), None);
        assert_eq!(first_uncovered(&[(0, 10)], &[(0, 4), (4, 10)]), None);
        assert_eq!(
            first_uncovered(&[(0, 10)], &[(0, 4), (6, 10)]),
            Some((4, 6))
        );
        assert_eq!(first_uncovered(&[(0, 10)], &[(2, 10)]), Some((0, 2)));
        assert_eq!(first_uncovered(&[(0, 10)], &[(0, 8)]), Some((8, 10)));
        assert_eq!(
            first_uncovered(&[(0, 4), (20, 30)], &[(0, 4)]),
            Some((20, 30))
        );
    }
}
