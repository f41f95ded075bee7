//! Namespace and attribute changes reported by the filesystem itself: a fanotify group
//! with a filesystem mark on each filesystem whose sets are captured inside the
//! filesystem. Every create, delete, rename (with both names in one event), mode,
//! owner, time, link-count and extended-attribute change of that filesystem arrives
//! here as "directory D, name N", whatever door it came in by (any syscall, io_uring,
//! 32-bit). Writes and syscalls pay nothing for it beyond fsnotify's own check (the mask
//! holds no write event); namespace changes elsewhere on the filesystem are queued to
//! the group too and dropped here.
//!
//! The events carry no bytes and no verdict: the resolver looks at what the directory
//! holds under the name when it handles one, and makes the index and the replica agree
//! with that. So the order of namespace events against the ring's data records does
//! not decide the outcome, and a lost event is repaired by the next look at the name.
//!
//! Events of directories that are not marked in the inode bitmap (outside every set)
//! are dropped here, before they cost the resolver anything. A queue overflow is a
//! loss the agent repairs with a rescan, as for the ring.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use doppel_common::event::{CaptureEvent, EntryChange, FileId};

/// What the group asks for: directory entries made, removed and renamed, and attribute
/// changes, of files and directories.
const MASK: u64 =
    libc::FAN_CREATE | libc::FAN_DELETE | libc::FAN_RENAME | libc::FAN_ATTRIB | libc::FAN_ONDIR;

/// Bytes read from the group at once.
const READ_BUF: usize = 64 << 10;

/// `struct fanotify_event_metadata` and `struct fanotify_event_info_header` sizes.
const METADATA_LEN: usize = 24;
const INFO_HEADER_LEN: usize = 4;
/// Info record types (`FAN_EVENT_INFO_TYPE_*`).
const INFO_DFID_NAME: u8 = 2;
const INFO_OLD_DFID_NAME: u8 = 10;
const INFO_NEW_DFID_NAME: u8 = 12;
/// `FILEID_INO32_GEN` and `FILEID_INO32_GEN_PARENT` (ext4 and most others): a 32-bit
/// inode number first. xfs's 64-bit forms (`XFS_FILEID_TYPE_64FLAG`): a 64-bit one.
const FILEID_INO32_GEN: i32 = 1;
const FILEID_INO32_GEN_PARENT: i32 = 2;
const FILEID_INO64_GEN: i32 = 0x81;
const FILEID_INO64_GEN_PARENT: i32 = 0x82;

/// One marked filesystem: its `f_fsid` (what events name it by), its `st_dev`, and a
/// descriptor on it to open handles of an encoding this module does not decode.
struct MarkedFilesystem {
    fsid: [i32; 2],
    dev: u64,
    mount: OwnedFd,
}

/// The fanotify group.
pub struct Namespace {
    fd: OwnedFd,
    filesystems: Vec<MarkedFilesystem>,
    buf: Vec<u8>,
}

impl Namespace {
    /// A group marking the filesystem of each of `roots` (one path on each).
    pub fn new<'a>(roots: impl IntoIterator<Item = &'a Path>) -> Result<Namespace> {
        let flags = libc::FAN_CLASS_NOTIF
            | libc::FAN_CLOEXEC
            | libc::FAN_NONBLOCK
            | libc::FAN_REPORT_DFID_NAME;
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::fanotify_init(flags, libc::O_RDONLY as u32) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            bail!(
                "fanotify_init with directory handles and names failed: {e} (Linux 5.17 or \
                 later with CONFIG_FANOTIFY is needed, and CAP_SYS_ADMIN)"
            );
        }
        // SAFETY: a new descriptor this function owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut filesystems: Vec<MarkedFilesystem> = Vec::new();
        for root in roots {
            let c = CString::new(root.as_os_str().as_bytes())
                .with_context(|| format!("{} has a NUL byte", root.display()))?;
            let (fsid, dev) = fsid_of(&c, root)?;
            if filesystems.iter().any(|f| f.dev == dev) {
                continue;
            }
            // SAFETY: a valid path; the result is checked.
            let r = unsafe {
                libc::fanotify_mark(
                    fd.as_raw_fd(),
                    libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM,
                    MASK,
                    libc::AT_FDCWD,
                    c.as_ptr(),
                )
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                bail!(
                    "cannot watch the filesystem of {} for namespace changes: {e} (its \
                     filesystem must support file handles)",
                    root.display()
                );
            }
            // SAFETY: a valid path; the result is checked.
            let m = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
            if m < 0 {
                let e = std::io::Error::last_os_error();
                bail!("cannot open {}: {e}", root.display());
            }
            filesystems.push(MarkedFilesystem {
                fsid,
                dev,
                // SAFETY: a new descriptor this function owns.
                mount: unsafe { OwnedFd::from_raw_fd(m) },
            });
        }
        Ok(Namespace {
            fd,
            filesystems,
            buf: vec![0; READ_BUF],
        })
    }

    /// Whether this kernel gives fanotify groups directory handles and names (what
    /// [`Namespace::new`] needs), without marking anything.
    pub fn probe() -> Result<()> {
        Namespace::new(std::iter::empty()).map(|_| ())
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads every queued event into `out`, keeping those about a directory `wanted`
    /// says yes to. Returns how many it read (kept or not).
    pub fn read(&mut self, wanted: &dyn Fn(FileId) -> bool, out: &mut Vec<CaptureEvent>) -> usize {
        let mut total = 0;
        loop {
            // SAFETY: reads into a buffer of the length given.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                )
            };
            if n <= 0 {
                // EAGAIN (drained), EINTR, or an error a later read reports again.
                return total;
            }
            let buf = std::mem::take(&mut self.buf);
            total += parse(
                &buf[..n as usize],
                &|fsid, ty, h| self.inode(fsid, ty, h),
                &mut |ev| {
                    if event_wanted(&ev, wanted) {
                        out.push(ev);
                    }
                },
            );
            self.buf = buf;
        }
    }

    /// The identity a handle names on one of the marked filesystems.
    fn inode(&self, fsid: [i32; 2], handle_type: i32, handle: &[u8]) -> Option<FileId> {
        let fs = self.filesystems.iter().find(|f| f.fsid == fsid)?;
        let ino = match handle_type {
            FILEID_INO32_GEN | FILEID_INO32_GEN_PARENT if handle.len() >= 4 => {
                u32::from_ne_bytes(handle[..4].try_into().ok()?) as u64
            }
            FILEID_INO64_GEN | FILEID_INO64_GEN_PARENT if handle.len() >= 8 => {
                u64::from_ne_bytes(handle[..8].try_into().ok()?)
            }
            _ => return open_handle(fs, handle_type, handle),
        };
        Some(FileId { dev: fs.dev, ino })
    }
}

/// Whether an event concerns a directory the caller wants.
fn event_wanted(ev: &CaptureEvent, wanted: &dyn Fn(FileId) -> bool) -> bool {
    match ev {
        CaptureEvent::Entry { dir, .. } => wanted(*dir),
        CaptureEvent::Moved {
            from_dir, to_dir, ..
        } => wanted(*from_dir) || wanted(*to_dir),
        _ => true,
    }
}

/// `f_fsid` and `st_dev` of the filesystem `path` is on.
fn fsid_of(c: &CString, path: &Path) -> Result<([i32; 2], u64)> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: zeroed plain-data out-parameter, valid path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } < 0 {
        let e = std::io::Error::last_os_error();
        bail!("statfs {}: {e}", path.display());
    }
    // SAFETY: fsid_t is two ints.
    let fsid: [i32; 2] = unsafe { std::mem::transmute(st.f_fsid) };
    let dev = std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .dev();
    Ok((fsid, dev))
}

/// Opens a handle this module cannot decode and asks the inode its number.
fn open_handle(fs: &MarkedFilesystem, handle_type: i32, handle: &[u8]) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    // struct file_handle: handle_bytes, handle_type, then the bytes.
    let mut raw = Vec::with_capacity(8 + handle.len());
    raw.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
    raw.extend_from_slice(&handle_type.to_ne_bytes());
    raw.extend_from_slice(handle);
    // SAFETY: `raw` is a well-formed file_handle of the length it says.
    let fd = unsafe {
        libc::open_by_handle_at(
            fs.mount.as_raw_fd(),
            raw.as_mut_ptr().cast(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None; // gone since (a stale handle): nothing to look at there
    }
    // SAFETY: a new descriptor owned here.
    let f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let m = f.metadata().ok()?;
    Some(FileId {
        dev: m.dev(),
        ino: m.ino(),
    })
}

/// Turns (fsid, handle type, handle bytes) into an identity.
pub type HandleToInode<'a> = dyn Fn([i32; 2], i32, &[u8]) -> Option<FileId> + 'a;

/// A directory handle and a name, as an info record gives them.
struct DirName<'a> {
    dir: FileId,
    name: &'a [u8],
}

/// Parses a buffer of events. `inode` turns (fsid, handle type, handle) into an
/// identity. Malformed input stops the parse (the kernel never writes any; a
/// truncated tail is not possible with whole-event reads). Returns the events seen.
pub fn parse(buf: &[u8], inode: &HandleToInode<'_>, emit: &mut dyn FnMut(CaptureEvent)) -> usize {
    let mut off = 0;
    let mut count = 0;
    while buf.len() - off >= METADATA_LEN {
        let ev = &buf[off..];
        let event_len = u32::from_ne_bytes(ev[0..4].try_into().expect("4 bytes")) as usize;
        let metadata_len = u16::from_ne_bytes(ev[6..8].try_into().expect("2 bytes")) as usize;
        let mask = u64::from_ne_bytes(ev[8..16].try_into().expect("8 bytes"));
        if event_len < METADATA_LEN || event_len > ev.len() || metadata_len > event_len {
            break;
        }
        count += 1;
        off += event_len;
        if mask & libc::FAN_Q_OVERFLOW != 0 {
            emit(CaptureEvent::Lost { records: 1 });
            continue;
        }
        let (mut plain, mut old, mut new) = (None, None, None);
        let mut info = &ev[metadata_len..event_len];
        while info.len() >= INFO_HEADER_LEN {
            let kind = info[0];
            let len = u16::from_ne_bytes([info[2], info[3]]) as usize;
            if len < INFO_HEADER_LEN || len > info.len() {
                break;
            }
            let record = &info[..len];
            info = &info[len..];
            let slot = match kind {
                INFO_DFID_NAME => &mut plain,
                INFO_OLD_DFID_NAME => &mut old,
                INFO_NEW_DFID_NAME => &mut new,
                _ => continue,
            };
            *slot = dir_name(record, inode);
        }
        if mask & libc::FAN_RENAME != 0 {
            // A side that could not be decoded (or that a mark does not cover): a move
            // in is a new entry here, a move out a removal there.
            let removed = if mask & libc::FAN_ONDIR != 0 {
                EntryChange::RemovedDir
            } else {
                EntryChange::Removed
            };
            match (old, new) {
                (Some(from), Some(to)) => emit(CaptureEvent::Moved {
                    from_dir: from.dir,
                    from_name: from.name.to_vec(),
                    to_dir: to.dir,
                    to_name: to.name.to_vec(),
                }),
                (None, Some(to)) => emit(CaptureEvent::Entry {
                    dir: to.dir,
                    name: to.name.to_vec(),
                    change: EntryChange::Made,
                }),
                (Some(from), None) => emit(CaptureEvent::Entry {
                    dir: from.dir,
                    name: from.name.to_vec(),
                    change: removed,
                }),
                (None, None) => {}
            }
            continue;
        }
        let Some(at) = plain else { continue };
        // Events merged in the queue carry several bits: each is looked at the same way
        // (what the name holds now), removal first so a replaced entry is copied again.
        let removed = if mask & libc::FAN_ONDIR != 0 {
            EntryChange::RemovedDir
        } else {
            EntryChange::Removed
        };
        for (bit, change) in [
            (libc::FAN_DELETE, removed),
            (libc::FAN_CREATE, EntryChange::Made),
            (libc::FAN_ATTRIB, EntryChange::Attrib),
        ] {
            if mask & bit != 0 {
                emit(CaptureEvent::Entry {
                    dir: at.dir,
                    name: at.name.to_vec(),
                    change,
                });
            }
        }
    }
    count
}

/// The directory and name of a `*_DFID_NAME` info record (header, fsid, file handle,
/// NUL-terminated name; "." for the directory itself, given as an empty name). `None`
/// for an unknown filesystem or a name that cannot be one.
fn dir_name<'a>(record: &'a [u8], inode: &HandleToInode<'_>) -> Option<DirName<'a>> {
    let fsid = [
        i32::from_ne_bytes(record.get(4..8)?.try_into().ok()?),
        i32::from_ne_bytes(record.get(8..12)?.try_into().ok()?),
    ];
    let bytes = u32::from_ne_bytes(record.get(12..16)?.try_into().ok()?) as usize;
    let handle_type = i32::from_ne_bytes(record.get(16..20)?.try_into().ok()?);
    let handle = record.get(20..20usize.checked_add(bytes)?)?;
    let rest = &record[20 + bytes..];
    let name = &rest[..rest.iter().position(|&b| b == 0)?];
    // "." names the directory itself (an attribute change of a directory): an empty
    // name here.
    let name = if name == b"." { &name[..0] } else { name };
    if name.contains(&b'/') || name == b".." {
        return None;
    }
    Some(DirName {
        dir: inode(fsid, handle_type, handle)?,
        name,
    })
}

/// Encodes fanotify's records the way the kernel writes them, for tests and the fuzz
/// seeds: a `*_DFID_NAME` info record (`kind`) for an ext4 handle of `ino` on
/// filesystem `1:2`, and an event of `mask` with its info records.
pub mod encode {
    pub fn dir_name(kind: u8, ino: u32, name: &[u8]) -> Vec<u8> {
        let mut r = vec![kind, 0, 0, 0];
        r.extend_from_slice(&1i32.to_ne_bytes());
        r.extend_from_slice(&2i32.to_ne_bytes());
        r.extend_from_slice(&8u32.to_ne_bytes());
        r.extend_from_slice(&super::FILEID_INO32_GEN.to_ne_bytes());
        r.extend_from_slice(&ino.to_ne_bytes());
        r.extend_from_slice(&7u32.to_ne_bytes());
        r.extend_from_slice(name);
        r.push(0);
        while r.len() % 4 != 0 {
            r.push(0);
        }
        let len = r.len() as u16;
        r[2..4].copy_from_slice(&len.to_ne_bytes());
        r
    }

    pub fn event(mask: u64, infos: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = infos.concat();
        let mut e = Vec::new();
        e.extend_from_slice(&((super::METADATA_LEN + body.len()) as u32).to_ne_bytes());
        e.extend_from_slice(&[3, 0]);
        e.extend_from_slice(&(super::METADATA_LEN as u16).to_ne_bytes());
        e.extend_from_slice(&mask.to_ne_bytes());
        e.extend_from_slice(&(-1i32).to_ne_bytes());
        e.extend_from_slice(&42i32.to_ne_bytes());
        e.extend_from_slice(&body);
        e
    }

    /// Info record kinds, as [`dir_name`] takes them.
    pub const DFID_NAME: u8 = super::INFO_DFID_NAME;
    pub const OLD_DFID_NAME: u8 = super::INFO_OLD_DFID_NAME;
    pub const NEW_DFID_NAME: u8 = super::INFO_NEW_DFID_NAME;
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::encode::{dir_name as info, event};

    fn parse_all(buf: &[u8]) -> Vec<CaptureEvent> {
        let mut out = Vec::new();
        let inode = |fsid: [i32; 2], ty: i32, h: &[u8]| {
            (fsid == [1, 2] && ty == FILEID_INO32_GEN)
                .then(|| dir(u32::from_ne_bytes(h[..4].try_into().unwrap()) as u64))
        };
        parse(buf, &inode, &mut |e| out.push(e));
        out
    }

    /// Directory `ino` of the filesystem `parse_all` decodes handles on.
    fn dir(ino: u64) -> FileId {
        FileId { dev: 9, ino }
    }

    fn entry(ino: u64, name: &[u8], change: EntryChange) -> CaptureEvent {
        CaptureEvent::Entry {
            dir: dir(ino),
            name: name.to_vec(),
            change,
        }
    }

    #[test]
    fn creates_deletes_attributes_and_renames_are_decoded() {
        let mut buf = event(libc::FAN_CREATE, &[info(INFO_DFID_NAME, 5, b"a")]);
        buf.extend(event(
            libc::FAN_RENAME | libc::FAN_ONDIR,
            &[
                info(INFO_OLD_DFID_NAME, 5, b"a"),
                info(INFO_NEW_DFID_NAME, 6, b"bb"),
            ],
        ));
        buf.extend(event(
            libc::FAN_CREATE | libc::FAN_DELETE | libc::FAN_ATTRIB,
            &[info(INFO_DFID_NAME, 6, b"c")],
        ));
        buf.extend(event(
            libc::FAN_ATTRIB | libc::FAN_ONDIR,
            &[info(INFO_DFID_NAME, 8, b".")],
        ));
        buf.extend(event(libc::FAN_Q_OVERFLOW, &[]));
        assert_eq!(
            parse_all(&buf),
            vec![
                entry(5, b"a", EntryChange::Made),
                CaptureEvent::Moved {
                    from_dir: dir(5),
                    from_name: b"a".to_vec(),
                    to_dir: dir(6),
                    to_name: b"bb".to_vec(),
                },
                entry(6, b"c", EntryChange::Removed),
                entry(6, b"c", EntryChange::Made),
                entry(6, b"c", EntryChange::Attrib),
                entry(8, b"", EntryChange::Attrib),
                CaptureEvent::Lost { records: 1 },
            ]
        );
    }

    #[test]
    fn a_rename_with_one_known_side_is_an_entry_made_or_removed() {
        let mut buf = event(libc::FAN_RENAME, &[info(INFO_NEW_DFID_NAME, 6, b"in")]);
        buf.extend(event(
            libc::FAN_RENAME | libc::FAN_ONDIR,
            &[info(INFO_OLD_DFID_NAME, 5, b"out")],
        ));
        buf.extend(event(
            libc::FAN_RENAME,
            &[info(INFO_OLD_DFID_NAME, 5, b"f")],
        ));
        assert_eq!(
            parse_all(&buf),
            vec![
                entry(6, b"in", EntryChange::Made),
                entry(5, b"out", EntryChange::RemovedDir),
                entry(5, b"f", EntryChange::Removed),
            ]
        );
    }

    #[test]
    fn malformed_input_stops_without_a_panic() {
        let good = event(libc::FAN_CREATE, &[info(INFO_DFID_NAME, 5, b"a")]);
        for cut in 0..good.len() {
            let _ = parse_all(&good[..cut]);
        }
        let mut bad = good.clone();
        bad[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse_all(&bad).is_empty());
        // A name with a slash, or "..", is never a name in a directory.
        for name in [&b"x/y"[..], b".."] {
            let e = event(libc::FAN_CREATE, &[info(INFO_DFID_NAME, 5, name)]);
            assert!(parse_all(&e).is_empty(), "{name:?}");
        }
        // An unknown filesystem's event is dropped.
        let mut other = good.clone();
        other[METADATA_LEN + 4..METADATA_LEN + 8].copy_from_slice(&3i32.to_ne_bytes());
        assert!(parse_all(&other).is_empty());
    }
}
