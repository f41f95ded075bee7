//! Stamps: what the agent keeps of each file between runs, so that a restart compares
//! only the files that changed while no agent was watching.
//!
//! A stamp says: the replica holds, at this path, the file with this inode number, size
//! and ctime, once it has applied record `seq` of sequence space `epoch`. The restart's
//! scan skips a file whose path, inode, size and ctime (nanoseconds) all match its stamp,
//! provided every target of the set says, in its first Welcome, that its replica got at
//! least that far in that epoch (`wire::PriorMark`): the replica was neither emptied,
//! nor failed over to, nor restored to an older state meanwhile. Anything else (no stamp,
//! a mismatch, a target that does not vouch) is compared block by block as before.
//!
//! Why ctime: every change of a file's bytes, size, mode, owner, times or extended
//! attributes sets it to the current time, and no user can set it back (unlike mtime,
//! which `touch -d` sets). A rename sets the renamed file's ctime too; the rename of a
//! directory above it does not, but changes its path, which the stamp names (by hash).
//! A new file that reuses an inode number is made later than any stamp of the old one.
//!
//! When stamps are taken ([`Checkpoint`]): at a time T when nothing of the set is left
//! to do (no comparison, rescan or journal overflow pending, no capture refusal), once
//! every change captured before T is resolved into records up to `seq`. Then each file
//! whose ctime is older than T minus [`MARGIN`] is stamped. The margin covers what a
//! ctime does not: a `write` sets ctime when it begins, and its bytes are captured as
//! they are copied, which may end later; a store into a shared mapping sets ctime when
//! the page is first dirtied, and later stores to the page until its writeback leave
//! no trace (the dirty page is written back within about 35 s by default). Files changed
//! within the margin are simply not stamped (compared at the next start). Files with
//! hot shared-mapping pages are never stamped.
//!
//! When a full comparison is still needed: the first run; a restart after the set was
//! copied again (new epoch) and before a checkpoint of the new one; a target that does
//! not answer within the first seconds, or was emptied, failed over to, or restored;
//! a crash before the first checkpoint of a run; a wall clock set back by more than the
//! margin while stopped. A restart trusts that nobody changed the replica behind the
//! receiver's back: `doppel-agent verify` proves that.
//!
//! File: `<state_dir>/stamps/<set>`, replaced atomically; a header (magic, epoch, seq,
//! the set root's path), the entries, and an XXH3 of everything before it. A file that
//! does not check out is ignored (with a warning): the set is compared in full.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use doppel_common::wire::sums::block_sum;

/// How far before a checkpoint a file's last change must be for it to be stamped
/// (default of `stamp_margin_s`).
pub const MARGIN: Duration = Duration::from_secs(60);

/// How often a running agent takes stamps while changes flow (and once its initial copy
/// is complete), so that a restart after a crash also skips what did not change.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(600);

const MAGIC: &[u8; 8] = b"DPLSTMP1";
const ENTRY: usize = 36;

/// One file as the replica holds it (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp {
    /// XXH3 of the path relative to the set root.
    pub path: u64,
    pub ino: u64,
    pub size: u64,
    pub ctime_sec: i64,
    pub ctime_nsec: u32,
}

impl Stamp {
    pub fn of(rel: &Path, m: &std::fs::Metadata) -> Stamp {
        Stamp {
            path: path_hash(rel),
            ino: m.ino(),
            size: m.len(),
            ctime_sec: m.ctime(),
            ctime_nsec: m.ctime_nsec() as u32,
        }
    }

    fn ctime(&self) -> i128 {
        self.ctime_sec as i128 * 1_000_000_000 + self.ctime_nsec as i128
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.path.to_le_bytes());
        out.extend_from_slice(&self.ino.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.ctime_sec.to_le_bytes());
        out.extend_from_slice(&self.ctime_nsec.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Stamp {
        let u = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Stamp {
            path: u(0),
            ino: u(8),
            size: u(16),
            ctime_sec: u(24) as i64,
            ctime_nsec: u32::from_le_bytes(b[32..36].try_into().expect("4 bytes")),
        }
    }
}

fn path_hash(rel: &Path) -> u64 {
    block_sum(rel.as_os_str().as_bytes())
}

/// The stamps of one set, as loaded at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamps {
    pub epoch: u64,
    pub seq: u64,
    /// Sorted.
    entries: Vec<Stamp>,
}

impl Stamps {
    pub fn new(epoch: u64, seq: u64, mut entries: Vec<Stamp>) -> Stamps {
        entries.sort_unstable();
        Stamps {
            epoch,
            seq,
            entries,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether the file found at `rel` with metadata `m` is the one stamped there.
    pub fn vouch(&self, rel: &Path, m: &std::fs::Metadata) -> bool {
        self.vouch_stamp(&Stamp::of(rel, m))
    }

    fn vouch_stamp(&self, s: &Stamp) -> bool {
        self.entries.binary_search(s).is_ok()
    }

    /// Where the stamps of set `name` live under the agent's state directory.
    pub fn file(state_dir: &Path, name: &str) -> PathBuf {
        state_dir.join("stamps").join(name)
    }

    /// Loads the stamps in `file` taken for a set rooted at `root`. `Ok(None)`: there are
    /// none. An error: the file is damaged or belongs to another root.
    pub fn load(file: &Path, root: &Path) -> Result<Option<Stamps>> {
        let mut bytes = Vec::new();
        match File::open(file) {
            Ok(mut f) => f
                .read_to_end(&mut bytes)
                .with_context(|| format!("cannot read {}", file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", file.display())),
        };
        Self::decode(&bytes, root)
            .with_context(|| format!("{} is not usable", file.display()))
            .map(Some)
    }

    fn decode(bytes: &[u8], root: &Path) -> Result<Stamps> {
        if bytes.len() < MAGIC.len() + 8 + 8 + 4 + 8 + 8 || &bytes[..8] != MAGIC {
            bail!("not a stamps file of this version");
        }
        let (body, sum) = bytes.split_at(bytes.len() - 8);
        if block_sum(body).to_le_bytes() != sum {
            bail!("its checksum does not match (torn or damaged)");
        }
        let u64_at = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8 bytes"));
        let epoch = u64_at(8);
        let seq = u64_at(16);
        let root_len = u32::from_le_bytes(body[24..28].try_into().expect("4 bytes")) as usize;
        let Some(stored_root) = body.get(28..28 + root_len) else {
            bail!("its header is cut short");
        };
        if stored_root != root.as_os_str().as_bytes() {
            bail!(
                "it was taken for root {}, the set's root is now {}",
                String::from_utf8_lossy(stored_root),
                root.display()
            );
        }
        let at = 28 + root_len;
        let Some(count) = body.get(at..at + 8) else {
            bail!("its header is cut short");
        };
        let count = u64::from_le_bytes(count.try_into().expect("8 bytes")) as usize;
        let entries = &body[at + 8..];
        if entries.len() != count.saturating_mul(ENTRY) {
            bail!(
                "it holds {} bytes of entries for {count} entries",
                entries.len()
            );
        }
        let entries = entries.chunks_exact(ENTRY).map(Stamp::decode).collect();
        Ok(Stamps::new(epoch, seq, entries))
    }

    /// Writes stamps for set `root` atomically into `file` (temporary file, fsync,
    /// rename, fsync of the directory).
    pub fn store(file: &Path, root: &Path, epoch: u64, seq: u64, entries: &[Stamp]) -> Result<()> {
        let dir = file.parent().context("a stamps file has a directory")?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let tmp = file.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut w = Summed {
                out: BufWriter::new(File::create(&tmp)?),
                sum: twox_hash::XxHash3_64::new(),
            };
            let root = root.as_os_str().as_bytes();
            w.put(MAGIC)?;
            w.put(&epoch.to_le_bytes())?;
            w.put(&seq.to_le_bytes())?;
            w.put(&(root.len() as u32).to_le_bytes())?;
            w.put(root)?;
            w.put(&(entries.len() as u64).to_le_bytes())?;
            let mut buf = Vec::with_capacity(ENTRY);
            for e in entries {
                buf.clear();
                e.encode(&mut buf);
                w.put(&buf)?;
            }
            let sum = std::hash::Hasher::finish(&w.sum);
            w.out.write_all(&sum.to_le_bytes())?;
            w.out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(&tmp, file)?;
            File::open(dir)?.sync_all()
        };
        write().with_context(|| format!("cannot write {}", file.display()))
    }

    /// Removes the stamps of a set (consumed at start: a new epoch makes them stale).
    pub fn remove(file: &Path) {
        let _ = std::fs::remove_file(file);
    }
}

/// A writer that checksums what goes through it.
struct Summed<W> {
    out: W,
    sum: twox_hash::XxHash3_64,
}

impl<W: Write> Summed<W> {
    fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        std::hash::Hasher::write(&mut self.sum, b);
        self.out.write_all(b)
    }
}

/// Takes the stamps of files at `rels` (relative to `root`): those regular files whose
/// last change is older than `cutoff`. Runs off the event loop (one `stat` per file).
pub fn take(root: &Path, rels: &PathList, cutoff: SystemTime) -> Vec<Stamp> {
    let cutoff = match cutoff.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(_) => return Vec::new(),
    };
    let mut out = Vec::with_capacity(rels.len());
    for rel in rels.iter() {
        let Ok(m) = std::fs::symlink_metadata(root.join(rel)) else {
            continue;
        };
        if !m.is_file() {
            continue;
        }
        let s = Stamp::of(rel, &m);
        if s.ctime() < cutoff {
            out.push(s);
        }
    }
    out
}

/// Relative paths packed into one buffer (a million of them in a few tens of MiB).
#[derive(Debug, Default, Clone)]
pub struct PathList {
    bytes: Vec<u8>,
    ends: Vec<u32>,
}

impl PathList {
    pub fn push(&mut self, rel: &Path) {
        self.bytes.extend_from_slice(rel.as_os_str().as_bytes());
        self.ends.push(self.bytes.len() as u32);
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Path> + '_ {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(&self.ends).map(|(a, &b)| {
            Path::new(std::ffi::OsStr::from_bytes(
                &self.bytes[a as usize..b as usize],
            ))
        })
    }
}

/// When a set's stamps are taken: a plain state machine fed with time, the capture's
/// progress and whether the set is settled; no I/O.
#[derive(Debug)]
pub struct Checkpoint {
    /// Asked at this capture time (monotonic ns) and wall-clock time; taken once every
    /// change captured before then is resolved.
    asked: Option<(u64, SystemTime)>,
    /// When the next periodic checkpoint is due.
    next: Instant,
    /// The queue's last sequence at the last checkpoint taken (or at start).
    last_seq: u64,
    /// Whether one was taken since the initial copy (the first comes as soon as the set
    /// is settled).
    taken: bool,
    /// A checkpoint is being written.
    pub writing: bool,
    margin: Duration,
}

impl Checkpoint {
    pub fn new(now: Instant, margin: Duration) -> Checkpoint {
        Checkpoint {
            margin,
            asked: None,
            next: now + CHECKPOINT_EVERY,
            last_seq: 0,
            taken: false,
            writing: false,
        }
    }

    /// Whether a checkpoint should be asked for now: the first once the initial copy is
    /// done, then every [`CHECKPOINT_EVERY`] if records were queued meanwhile.
    pub fn wanted(&self, now: Instant, last_seq: u64) -> bool {
        self.asked.is_none()
            && !self.writing
            && (!self.taken || (now >= self.next && last_seq != self.last_seq))
    }

    pub fn ask(&mut self, capture_now: u64, wall: SystemTime) {
        self.asked.get_or_insert((capture_now, wall));
    }

    /// The capture reported every change before `complete_before` resolved: if a
    /// checkpoint was asked before that, it is to be taken now with the cutoff for
    /// ctimes returned, provided `settled()` says the set is settled; an unsettled set
    /// drops the request (asked again later). `settled` is called only then, as this is
    /// asked after every capture batch.
    pub fn ready(
        &mut self,
        complete_before: u64,
        settled: impl FnOnce() -> bool,
    ) -> Option<SystemTime> {
        let (at, wall) = self.asked?;
        if complete_before < at {
            return None;
        }
        self.asked = None;
        settled().then(|| self.cutoff(wall))
    }

    /// The latest ctime a file may have to be stamped by a checkpoint taken at `wall`.
    pub fn cutoff(&self, wall: SystemTime) -> SystemTime {
        wall.checked_sub(self.margin)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// A checkpoint taken at queue sequence `seq` began writing.
    pub fn began(&mut self, now: Instant, seq: u64) {
        self.taken = true;
        self.writing = true;
        self.last_seq = seq;
        self.next = now + CHECKPOINT_EVERY;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_vouch_only_for_the_same_file_at_the_same_path() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join("d/a"), b"one").unwrap();
        std::fs::write(root.join("b"), b"two").unwrap();
        let mut rels = PathList::default();
        rels.push(Path::new("d/a"));
        rels.push(Path::new("b"));
        rels.push(Path::new("gone"));
        rels.push(Path::new("d"));
        let far = SystemTime::now() + Duration::from_secs(3600);
        let taken = take(&root, &rels, far);
        assert_eq!(taken.len(), 2, "regular files only, what exists");
        let file = Stamps::file(dir.path(), "www");
        Stamps::store(&file, &root, 7, 42, &taken).unwrap();
        let s = Stamps::load(&file, &root).unwrap().unwrap();
        assert_eq!((s.epoch, s.seq, s.len()), (7, 42, 2));

        let m = |p: &str| std::fs::symlink_metadata(root.join(p)).unwrap();
        assert!(s.vouch(Path::new("d/a"), &m("d/a")));
        assert!(s.vouch(Path::new("b"), &m("b")));
        // The same file under another path (its directory renamed) is not vouched for.
        assert!(!s.vouch(Path::new("e/a"), &m("d/a")));
        // A change sets ctime: even with size and mtime put back, it is not.
        let before = m("b");
        std::fs::write(root.join("b"), b"TWO").unwrap();
        let f = File::options().write(true).open(root.join("b")).unwrap();
        f.set_times(
            std::fs::FileTimes::new()
                .set_modified(before.modified().unwrap())
                .set_accessed(before.accessed().unwrap()),
        )
        .unwrap();
        assert_eq!(m("b").len(), before.len());
        assert_eq!(m("b").modified().unwrap(), before.modified().unwrap());
        assert!(!s.vouch(Path::new("b"), &m("b")));
        // Another file made at the path: another inode (and ctime).
        std::fs::remove_file(root.join("d/a")).unwrap();
        std::fs::write(root.join("d/a"), b"one").unwrap();
        assert!(!s.vouch(Path::new("d/a"), &m("d/a")));
    }

    #[test]
    fn files_changed_within_the_margin_are_not_stamped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("new"), b"x").unwrap();
        let mut rels = PathList::default();
        rels.push(Path::new("new"));
        let cutoff = SystemTime::now() - MARGIN;
        assert!(take(dir.path(), &rels, cutoff).is_empty());
    }

    #[test]
    fn damaged_or_foreign_stamps_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = Stamps::file(dir.path(), "www");
        let stamp = Stamp {
            path: 1,
            ino: 2,
            size: 3,
            ctime_sec: 4,
            ctime_nsec: 5,
        };
        Stamps::store(&file, Path::new("/srv/www"), 1, 2, &[stamp]).unwrap();
        assert!(Stamps::load(&file, Path::new("/srv/www"))
            .unwrap()
            .is_some());
        let err = Stamps::load(&file, Path::new("/srv/other")).unwrap_err();
        assert!(format!("{err:#}").contains("root"), "{err:#}");
        let mut bytes = std::fs::read(&file).unwrap();
        let n = bytes.len();
        bytes[n - 12] ^= 1;
        std::fs::write(&file, &bytes).unwrap();
        let err = Stamps::load(&file, Path::new("/srv/www")).unwrap_err();
        assert!(format!("{err:#}").contains("checksum"), "{err:#}");
        std::fs::write(&file, &bytes[..20]).unwrap();
        assert!(Stamps::load(&file, Path::new("/srv/www")).is_err());
        Stamps::remove(&file);
        assert_eq!(Stamps::load(&file, Path::new("/srv/www")).unwrap(), None);
    }

    #[test]
    fn a_checkpoint_waits_for_the_capture_then_needs_a_settled_set() {
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let mut c = Checkpoint::new(t0, MARGIN);
        assert!(c.wanted(t0, 0), "the first as soon as possible");
        c.ask(1_000, wall);
        assert!(!c.wanted(t0, 0), "one at a time");
        assert_eq!(
            c.ready(999, || panic!("looked at before the capture is there")),
            None,
            "the capture is not there yet"
        );
        assert_eq!(c.ready(1_000, || false), None, "not settled: dropped");
        assert!(c.wanted(t0, 0), "and asked again");
        c.ask(2_000, wall);
        assert_eq!(c.ready(2_500, || true), Some(wall - MARGIN));
        c.began(t0, 10);
        assert!(!c.wanted(t0, 11), "being written");
        c.writing = false;
        assert!(!c.wanted(t0 + CHECKPOINT_EVERY / 2, 11), "not due yet");
        assert!(!c.wanted(t0 + CHECKPOINT_EVERY, 10), "nothing changed");
        assert!(c.wanted(t0 + CHECKPOINT_EVERY, 11));
    }
}
