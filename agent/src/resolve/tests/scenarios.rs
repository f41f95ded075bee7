//! Random short sequences of source operations whose events the resolver sees late (the
//! source runs ahead of the agent by a random number of events), with lost data records
//! (`Dirty`), deferred reads running out of patience and the mirror's questions answered
//! at random points in between. At the end every event is resolved, and the replica the
//! ops make (a real directory, applied with the receiver's rules) must be the source:
//! the same directories, the same files (hard-link groups) under the same names, with
//! the same bytes. Seeded and deterministic in the choices it makes.

use super::*;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::ErrorKind;

/// xorshift64*: deterministic, no dependency.
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<T: Clone>(&mut self, v: &[T]) -> Option<T> {
        (!v.is_empty()).then(|| v[self.below(v.len())].clone())
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let tag = self.next() as u8;
        (0..n).map(|i| tag.wrapping_add((i % 251) as u8)).collect()
    }
}

/// What a path holds on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Entry {
    Dir,
    File { ino: u64, bytes: Vec<u8> },
}

/// Every entry beneath `root`, by relative path.
pub(super) fn tree(root: &Path) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            let key = r.to_string_lossy().into_owned();
            if m.is_dir() {
                out.insert(key, Entry::Dir);
                stack.push(r);
            } else {
                let bytes = std::fs::read(e.path()).unwrap();
                out.insert(
                    key,
                    Entry::File {
                        ino: m.ino(),
                        bytes,
                    },
                );
            }
        }
    }
    out
}

/// The tree with inode numbers replaced by link groups: directories, then each file's
/// sorted names with its bytes.
pub(super) type Shape = (Vec<String>, Vec<(Vec<String>, Vec<u8>)>);

pub(super) fn shape(root: &Path) -> Shape {
    let mut dirs = Vec::new();
    let mut groups: BTreeMap<u64, (Vec<String>, Vec<u8>)> = BTreeMap::new();
    for (name, e) in tree(root) {
        match e {
            Entry::Dir => dirs.push(name),
            Entry::File { ino, bytes } => {
                let g = groups.entry(ino).or_insert_with(|| (Vec::new(), bytes));
                g.0.push(name);
            }
        }
    }
    let mut files: Vec<_> = groups.into_values().collect();
    files.iter_mut().for_each(|g| g.0.sort());
    files.sort();
    (dirs, files)
}

/// A replica in a real directory, the ops applied as the receiver applies them (only
/// what these tests send: files, directories, hard links).
pub(super) struct Disk {
    pub(super) root: tempfile::TempDir,
    /// Ops the receiver would have refused (a failure of the test too).
    pub(super) errors: Vec<String>,
    /// The mirror's layout questions asked so far: set, file, offset, size, missing.
    needs: Vec<(usize, FileId, u64, u64, bool)>,
}

impl Disk {
    pub(super) fn new() -> Self {
        Disk {
            root: tempfile::tempdir().unwrap(),
            errors: Vec::new(),
            needs: Vec::new(),
        }
    }

    fn at(&self, p: &RelPath) -> PathBuf {
        self.root.path().join(p.as_path())
    }

    fn parent_of(&self, p: &RelPath) -> PathBuf {
        self.at(p).parent().unwrap().to_path_buf()
    }

    fn clear(path: &Path) -> std::io::Result<()> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
            Ok(_) => std::fs::remove_file(path),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn file(&self, p: &RelPath) -> std::io::Result<File> {
        std::fs::create_dir_all(self.parent_of(p))?;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.at(p))
    }

    pub(super) fn apply(&mut self, ops: &[SetOp]) {
        for o in ops {
            if let Err(e) = self.apply_one(&o.op) {
                self.errors.push(format!("{}: {e}", summarize_op(&o.op)));
            }
        }
    }

    fn apply_one(&mut self, op: &Op) -> std::io::Result<()> {
        match op {
            Op::Write { path, offset, data } => self.file(path)?.write_all_at(data, *offset),
            Op::Truncate { path, size } => self.file(path)?.set_len(*size),
            Op::CreateFile { path, .. } => {
                if std::fs::symlink_metadata(self.at(path)).is_ok_and(|m| m.is_dir()) {
                    std::fs::remove_dir_all(self.at(path))?;
                }
                self.file(path).map(drop)
            }
            Op::Mkdir { path, .. } => {
                std::fs::create_dir_all(self.parent_of(path))?;
                match std::fs::symlink_metadata(self.at(path)) {
                    Ok(m) if m.is_dir() => return Ok(()),
                    Ok(_) => std::fs::remove_file(self.at(path))?,
                    Err(_) => {}
                }
                std::fs::create_dir(self.at(path))
            }
            Op::Remove { path } => match std::fs::remove_file(self.at(path)) {
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                r => r,
            },
            Op::Rmdir { path } => match std::fs::symlink_metadata(self.at(path)) {
                Ok(m) if m.is_dir() => std::fs::remove_dir_all(self.at(path)),
                Ok(_) => Err(std::io::Error::other("rmdir of a non-directory")),
                Err(_) => Ok(()),
            },
            Op::Rename { from, to, flags } => {
                if !self.parent_of(from).is_dir() {
                    return Ok(());
                }
                std::fs::create_dir_all(self.parent_of(to))?;
                match renameat2(&self.at(from), &self.at(to), *flags) {
                    Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                    r => r,
                }
            }
            Op::Link { from, to } => {
                if !self.parent_of(from).is_dir() {
                    return Ok(());
                }
                std::fs::create_dir_all(self.parent_of(to))?;
                let src = match std::fs::symlink_metadata(self.at(from)) {
                    Ok(m) => m,
                    Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                    Err(e) => return Err(e),
                };
                if src.is_dir() {
                    return Err(std::io::Error::other("link of a directory"));
                }
                if let Ok(dst) = std::fs::symlink_metadata(self.at(to)) {
                    if file_id(&dst) == file_id(&src) {
                        return Ok(());
                    }
                    Self::clear(&self.at(to))?;
                }
                std::fs::hard_link(self.at(from), self.at(to))
            }
            Op::Prune { dir, keep } => {
                let d = dir
                    .as_ref()
                    .map_or(self.root.path().to_path_buf(), |d| self.at(d));
                let Ok(entries) = std::fs::read_dir(&d) else {
                    return Ok(());
                };
                for e in entries {
                    let e = e?;
                    if !keep.iter().any(|k| k.0 == e.file_name().as_bytes()) {
                        Self::clear(&e.path())?;
                    }
                }
                Ok(())
            }
            Op::Sum {
                path,
                job,
                file,
                size,
                offset,
                ..
            } => {
                assert_eq!(*job, doppel_common::wire::sums::LAYOUT_JOB, "{op:?}");
                let missing = !std::fs::symlink_metadata(self.at(path)).is_ok_and(|m| m.is_file());
                let id = FileId {
                    dev: file[0],
                    ino: file[1],
                };
                self.needs.push((0, id, *offset, *size, missing));
                Ok(())
            }
            Op::SetAttr { .. } | Op::SetXattrs { .. } => Ok(()),
            other => panic!("not modelled: {other:?}"),
        }
    }

    /// Answers the layout questions asked so far as if the replica had no data at all
    /// (every block is sent whole), as the resolver would get the answers later.
    pub(super) fn answer<W: Watcher>(&mut self, r: &mut Resolver<W>, out: &mut Vec<SetOp>) {
        for (set, id, offset, size, missing) in std::mem::take(&mut self.needs) {
            r.mirror_need(set, id, &[(offset, size - offset)], (0, &[]), missing, out);
        }
    }
}

fn renameat2(from: &Path, to: &Path, flags: u32) -> std::io::Result<()> {
    use std::ffi::CString;
    let f = CString::new(from.as_os_str().as_bytes()).unwrap();
    let t = CString::new(to.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid NUL-terminated paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One run: `steps` source operations from `seed`, their events resolved late.
/// Returns a description of what went wrong, if anything did.
/// How the events reach the resolver.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Door {
    /// As the `sys_exit` program reports them: the calls, with their paths.
    Syscalls,
    /// As the filesystem does (fanotify and ext4's tracepoints): directory and name.
    Filesystem,
}

pub(super) fn run(seed: u64, steps: usize) -> Result<(), String> {
    run_through(seed, steps, Door::Syscalls)
}

pub(super) fn run_through(seed: u64, steps: usize, door: Door) -> Result<(), String> {
    let src = tempfile::tempdir().unwrap();
    let root = src.path().canonicalize().unwrap();
    let mut rng = Rng::new(seed);
    let w = FakeWatch::default();
    // Some initial content, scanned.
    for d in ["d", "e"] {
        std::fs::create_dir(root.join(d)).unwrap();
    }
    for f in ["a", "d/a", "e/b"] {
        let n = 1 + rng.below(9000);
        std::fs::write(root.join(f), rng.bytes(n)).unwrap();
    }
    let mut r = setup(&root, &w);
    r.set_namespace_in_filesystem(0, door == Door::Filesystem);
    let mut disk = Disk::new();
    let mut out = Vec::new();
    let mut log: Vec<String> = Vec::new();
    let mut sent: Vec<String> = Vec::new();
    r.scan_all(&mut out);
    let mut pending: VecDeque<Captured> = VecDeque::new();
    let flush = |r: &mut Resolver<&FakeWatch>,
                 disk: &mut Disk,
                 out: &mut Vec<SetOp>,
                 sent: &mut Vec<String>| {
        sent.extend(out.iter().map(|o| summarize_op(&o.op)));
        disk.apply(out);
        out.clear();
        disk.answer(r, out);
    };
    for _ in 0..steps {
        let (what, events) = step(&root, &mut rng, door);
        if let Some(what) = what {
            log.push(what);
        }
        match door {
            Door::Syscalls => pending.extend(events),
            Door::Filesystem => pending.extend(events.into_iter().flat_map(reported_inside)),
        }
        // The agent catches up with some of what happened, or with none of it.
        let n = match rng.below(10) {
            0..=3 => pending.len(),
            4..=5 => rng.below(pending.len() + 1),
            _ => 0,
        };
        if n > 0 {
            log.push(format!(
                "(the agent resolves {n} events; {} wait)",
                pending.len() - n
            ));
        }
        for ev in pending.drain(..n) {
            r.resolve(ev, &mut out);
        }
        match rng.below(10) {
            0..=2 => {
                log.push("(finish)".into());
                r.finish(&mut out)
            }
            3 => {
                log.push("(deferred reads run out of patience)".into());
                expire(&mut r);
                r.finish(&mut out);
            }
            4..=5 => {
                log.push(
                    "(finish; the replica applies, the mirror's questions are answered)".into(),
                );
                r.finish(&mut out);
                flush(&mut r, &mut disk, &mut out, &mut sent);
            }
            _ => {}
        }
    }
    for ev in pending.drain(..) {
        r.resolve(ev, &mut out);
    }
    sent.extend(out.iter().map(|o| summarize_op(&o.op)));
    settle(&mut r, &mut disk, &mut out);
    let (want, got) = (shape(&root), shape(disk.root.path()));
    if want == got && disk.errors.is_empty() {
        return Ok(());
    }
    let names = |s: &Shape| {
        let mut v: Vec<String> = s.0.iter().map(|d| format!("{d}/")).collect();
        v.extend(
            s.1.iter()
                .map(|(n, b)| format!("{n:?} {} bytes {:x?}", b.len(), &b[..b.len().min(4)])),
        );
        v
    };
    Err(format!(
        "seed {seed}:\nsource ops:\n  {}\nsent:\n  {}\nreceiver errors: {:?}\nsource:\n  {}\nreplica:\n  {}",
        log.join("\n  "),
        sent.join("\n  "),
        disk.errors,
        names(&want).join("\n  "),
        names(&got).join("\n  "),
    ))
}

/// The agent has caught up: whatever waited for the index to catch up is done now or
/// never, the replica applies everything and the mirror's questions are answered.
pub(super) fn settle(r: &mut Resolver<&FakeWatch>, disk: &mut Disk, out: &mut Vec<SetOp>) {
    for _ in 0..4 {
        r.finish(out);
        disk.apply(out);
        out.clear();
        disk.answer(r, out);
        expire(r);
    }
    r.finish(out);
    disk.apply(out);
    out.clear();
    disk.answer(r, out);
    r.finish(out);
    disk.apply(out);
    out.clear();
}

/// A scripted run: `source` does its operations on the scanned tree at `root` (before
/// the agent resolves any of their events, and before the answers to the scan's
/// questions are in) and returns the events; the replica must end as the source.
fn scripted(
    prepare: impl FnOnce(&dyn Fn(&str) -> PathBuf),
    source: impl FnOnce(&dyn Fn(&str) -> PathBuf) -> Vec<Captured>,
) {
    let src = tempfile::tempdir().unwrap();
    let root = src.path().canonicalize().unwrap();
    let p = |n: &str| root.join(n);
    prepare(&p);
    let w = FakeWatch::default();
    let mut r = setup(&root, &w);
    let mut disk = Disk::new();
    let mut out = Vec::new();
    r.scan_all(&mut out);
    disk.apply(&out);
    out.clear();
    for ev in source(&p) {
        r.resolve(ev, &mut out);
    }
    let sent: Vec<String> = out.iter().map(|o| summarize_op(&o.op)).collect();
    settle(&mut r, &mut disk, &mut out);
    assert!(disk.errors.is_empty(), "{:?}", disk.errors);
    assert_eq!(shape(disk.root.path()), shape(&root), "sent: {sent:#?}");
}

fn created(p: &Path) -> Captured {
    let m = std::fs::symlink_metadata(p).unwrap();
    now(CaptureEvent::Created {
        file: (!m.is_dir()).then(|| file_id(&m)),
        parent: None,
        path: arg(p),
        is_dir: m.is_dir(),
        mode: 0o644,
    })
}

fn renamed(from: &Path, to: &Path) -> Captured {
    now(CaptureEvent::Renamed {
        from: arg(from),
        to: arg(to),
        flags: 0,
    })
}

/// A file `y` is made in a new directory `n`, and file `x`, which has a second name,
/// is renamed over it, all before the agent resolves the mkdir. The directory's copy
/// finds `x` at `n/f` and links it to `x`'s other name on the replica; the older
/// creation of `y` at `n/f` and its data must then be taken as covered by that copy
/// (the directory was read after them), not written into `x`'s file on the replica,
/// which the name is a link of there: `x`'s bytes under both names would be `y`'s.
#[test]
fn a_file_made_before_its_directory_was_copied_is_not_written_into_a_link_there() {
    scripted(
        |p| {
            std::fs::write(p("a"), b"the bytes of x, linked").unwrap();
            std::fs::hard_link(p("a"), p("c")).unwrap();
        },
        |p| {
            std::fs::create_dir(p("n")).unwrap();
            let mut evs = vec![created(&p("n"))];
            std::fs::write(p("n/f"), b"y").unwrap();
            evs.push(created(&p("n/f")));
            evs.push(now(CaptureEvent::Data {
                file: id_of(&p("n/f")),
                parent: id_of(&p("n")),
                offset: 0,
                data: b"y".to_vec(),
            }));
            std::fs::rename(p("a"), p("n/f")).unwrap();
            evs.push(renamed(&p("a"), &p("n/f")));
            evs
        },
    );
}

/// Deferred reads and postponed attributes give up waiting (the agent lagged more than
/// their patience).
fn expire(r: &mut Resolver<&FakeWatch>) {
    for d in r.deferred.iter_mut() {
        d.since = 1;
    }
    for t in r.touched.values_mut() {
        if t.mismatch_since != 0 {
            t.mismatch_since = 1;
        }
    }
}

/// The entries beneath `root`: (relative path, is a directory).
fn entries(root: &Path) -> Vec<(String, bool)> {
    tree(root)
        .into_iter()
        .map(|(n, e)| (n, e == Entry::Dir))
        .collect()
}

/// One random source operation, done now; its description and the events the capture
/// would report for it.
/// What the filesystem reports for a change `ev` reports at the syscall door: the
/// directory and name of each entry it made, removed or renamed (data records are the
/// same on both doors; sizes are made by `step`). Made while the directories are there.
fn reported_inside(ev: Captured) -> Vec<Captured> {
    let dir_name = |a: &PathArg| {
        let p = Path::new(OsStr::from_bytes(&a.path));
        let dir = id_of(p.parent().unwrap());
        (dir, p.file_name().unwrap().as_bytes().to_vec())
    };
    let entry = |a: &PathArg, change| {
        let (dir, name) = dir_name(a);
        CaptureEvent::Entry { dir, name, change }
    };
    let moved = |from: &PathArg, to: &PathArg| {
        let ((from_dir, from_name), (to_dir, to_name)) = (dir_name(from), dir_name(to));
        CaptureEvent::Moved {
            from_dir,
            from_name,
            to_dir,
            to_name,
        }
    };
    use doppel_common::event::EntryChange::{Made, Removed, RemovedDir};
    let events = match &ev.event {
        CaptureEvent::Created { path, .. }
        | CaptureEvent::Made { path }
        | CaptureEvent::Linked { to: path, .. } => vec![entry(path, Made)],
        CaptureEvent::Removed { path, is_dir } => {
            vec![entry(path, if *is_dir { RemovedDir } else { Removed })]
        }
        CaptureEvent::Renamed { from, to, flags } if flags & RENAME_EXCHANGE != 0 => {
            vec![moved(from, to), moved(to, from)]
        }
        CaptureEvent::Renamed { from, to, .. } => vec![moved(from, to)],
        _ => return vec![ev],
    };
    events.into_iter().map(|e| at(ev.time, e)).collect()
}

fn step(root: &Path, rng: &mut Rng, door: Door) -> (Option<String>, Vec<Captured>) {
    let all = entries(root);
    let files: Vec<String> = all.iter().filter(|e| !e.1).map(|e| e.0.clone()).collect();
    let mut dirs: Vec<String> = vec![String::new()];
    dirs.extend(all.iter().filter(|e| e.1).map(|e| e.0.clone()));
    let exists: BTreeSet<String> = all.iter().map(|e| e.0.clone()).collect();
    let join = |d: &str, n: &str| {
        if d.is_empty() {
            n.to_string()
        } else {
            format!("{d}/{n}")
        }
    };
    let p = |rel: &str| root.join(rel);
    let dir_of = |rel: &str| id_of(p(rel).parent().unwrap());
    // A file name in some directory (existing or not).
    let some_name = |rng: &mut Rng| {
        let d = rng.pick(&dirs).unwrap();
        join(&d, ["a", "b", "c"][rng.below(3)])
    };
    let data_event = |rng: &mut Rng, rel: &str, offset: u64, data: Vec<u8>| {
        let file = id_of(&p(rel));
        let parent = dir_of(rel);
        now(if rng.chance(25) {
            CaptureEvent::Dirty {
                file,
                parent: Some(parent),
                offset,
                len: data.len() as u64,
            }
        } else {
            CaptureEvent::Data {
                file,
                parent,
                offset,
                data,
            }
        })
    };
    match rng.below(13) {
        // Create a file (perhaps where one was just removed: the inode may be reused).
        0 | 1 => {
            let rel = some_name(rng);
            if exists.contains(&rel) {
                return (None, vec![]);
            }
            let n = 1 + rng.below(9000);
            let data = rng.bytes(n);
            std::fs::write(p(&rel), &data).unwrap();
            let created = now(CaptureEvent::Created {
                file: Some(id_of(&p(&rel))),
                parent: Some(dir_of(&rel)),
                path: arg(&p(&rel)),
                is_dir: false,
                mode: 0o644,
            });
            let data = data_event(rng, &rel, 0, data);
            (
                Some(format!("create {rel} ({n} bytes)")),
                vec![created, data],
            )
        }
        2 | 3 => {
            let Some(rel) = rng.pick(&files) else {
                return (None, vec![]);
            };
            let len = std::fs::metadata(p(&rel)).unwrap().len() as usize;
            let offset = rng.below(len + 1) as u64;
            let n = 1 + rng.below(6000);
            let data = rng.bytes(n);
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(p(&rel))
                .unwrap();
            f.write_all_at(&data, offset).unwrap();
            let ev = data_event(rng, &rel, offset, data);
            (
                Some(format!("write {rel} at {offset} ({n} bytes)")),
                vec![ev],
            )
        }
        4 => {
            let Some(rel) = rng.pick(&files) else {
                return (None, vec![]);
            };
            let len = std::fs::metadata(p(&rel)).unwrap().len() as usize;
            let size = rng.below(len + 100) as u64;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(p(&rel))
                .unwrap();
            f.set_len(size).unwrap();
            let (file, parent) = (id_of(&p(&rel)), dir_of(&rel));
            let exact = now(CaptureEvent::Truncated {
                file: Some(file),
                parent: Some(parent),
                path: None,
                size,
            });
            let evs = match door {
                Door::Syscalls => vec![exact],
                // ext4_setattr's "size set" (read when handled), then for a cut
                // ext4_truncate's exact size.
                Door::Filesystem => {
                    let set = now(CaptureEvent::Resized {
                        file,
                        parent: Some(parent),
                    });
                    if size <= len as u64 {
                        vec![set, exact]
                    } else {
                        vec![set]
                    }
                }
            };
            (Some(format!("truncate {rel} to {size}")), evs)
        }
        // Rename a file, perhaps over another.
        5 | 6 => {
            let Some(from) = rng.pick(&files) else {
                return (None, vec![]);
            };
            let to = some_name(rng);
            if to == from || std::fs::symlink_metadata(p(&to)).is_ok_and(|m| m.is_dir()) {
                return (None, vec![]);
            }
            std::fs::rename(p(&from), p(&to)).unwrap();
            let ev = now(CaptureEvent::Renamed {
                from: arg(&p(&from)),
                to: arg(&p(&to)),
                flags: 0,
            });
            (Some(format!("rename {from} -> {to}")), vec![ev])
        }
        7 => {
            let Some(rel) = rng.pick(&files) else {
                return (None, vec![]);
            };
            std::fs::remove_file(p(&rel)).unwrap();
            let ev = now(CaptureEvent::Removed {
                path: arg(&p(&rel)),
                is_dir: false,
            });
            (Some(format!("unlink {rel}")), vec![ev])
        }
        8 => {
            let Some(from) = rng.pick(&files) else {
                return (None, vec![]);
            };
            let to = some_name(rng);
            if exists.contains(&to) {
                return (None, vec![]);
            }
            std::fs::hard_link(p(&from), p(&to)).unwrap();
            let ev = now(CaptureEvent::Linked {
                from: arg(&p(&from)),
                to: arg(&p(&to)),
            });
            (Some(format!("link {from} -> {to}")), vec![ev])
        }
        // Exchange two entries (files or directories, not one inside the other).
        9 => {
            let names: Vec<String> = all.iter().map(|e| e.0.clone()).collect();
            let (Some(a), Some(b)) = (rng.pick(&names), rng.pick(&names)) else {
                return (None, vec![]);
            };
            if a == b || a.starts_with(&format!("{b}/")) || b.starts_with(&format!("{a}/")) {
                return (None, vec![]);
            }
            renameat2(&p(&a), &p(&b), RENAME_EXCHANGE).unwrap();
            let ev = now(CaptureEvent::Renamed {
                from: arg(&p(&a)),
                to: arg(&p(&b)),
                flags: RENAME_EXCHANGE,
            });
            (Some(format!("exchange {a} <-> {b}")), vec![ev])
        }
        // Make a directory.
        10 => {
            let d = rng.pick(&dirs).unwrap();
            if d.matches('/').count() >= 1 {
                return (None, vec![]);
            }
            let rel = join(&d, ["d", "e", "f"][rng.below(3)]);
            if exists.contains(&rel) {
                return (None, vec![]);
            }
            std::fs::create_dir(p(&rel)).unwrap();
            let ev = now(CaptureEvent::Created {
                file: None,
                parent: None,
                path: arg(&p(&rel)),
                is_dir: true,
                mode: 0o755,
            });
            (Some(format!("mkdir {rel}")), vec![ev])
        }
        // Rename a directory (perhaps over an empty one), or remove an empty one.
        11 => {
            let Some(from) = rng.pick(&dirs[1..]) else {
                return (None, vec![]);
            };
            let parent = rng.pick(&dirs).unwrap();
            let to = join(&parent, ["d", "e", "f"][rng.below(3)]);
            if to == from
                || to.starts_with(&format!("{from}/"))
                || to.matches('/').count() > 1
                || exists
                    .iter()
                    .any(|e| e.starts_with(&format!("{from}/")) && e.matches('/').count() > 1)
            {
                return (None, vec![]);
            }
            match std::fs::symlink_metadata(p(&to)) {
                Ok(m) if !m.is_dir() => return (None, vec![]),
                _ => {}
            }
            if std::fs::rename(p(&from), p(&to)).is_err() {
                return (None, vec![]); // not empty
            }
            let ev = now(CaptureEvent::Renamed {
                from: arg(&p(&from)),
                to: arg(&p(&to)),
                flags: 0,
            });
            (Some(format!("rename dir {from} -> {to}")), vec![ev])
        }
        _ => {
            let Some(rel) = rng.pick(&dirs[1..]) else {
                return (None, vec![]);
            };
            if std::fs::remove_dir(p(&rel)).is_err() {
                return (None, vec![]); // not empty
            }
            let ev = now(CaptureEvent::Removed {
                path: arg(&p(&rel)),
                is_dir: true,
            });
            (Some(format!("rmdir {rel}")), vec![ev])
        }
    }
}

#[test]
fn random_late_sequences_end_with_the_source_tree() {
    let steps = std::env::var("SCENARIO_STEPS").map_or(14, |s| s.parse().unwrap());
    if let Ok(seed) = std::env::var("SCENARIO_SEED") {
        run(seed.parse().unwrap(), steps).unwrap();
        return;
    }
    if let Ok(n) = std::env::var("SCENARIO_MANY") {
        let n: u64 = n.parse().unwrap();
        let mut bad = Vec::new();
        for seed in 1000..1000 + n {
            if let Err(e) = run(seed, steps) {
                bad.push((seed, e.len()));
            }
        }
        bad.sort_by_key(|b| b.1);
        panic!("{} of {n} differ: {bad:?}", bad.len());
    }
    let mut failures = Vec::new();
    for seed in 0..200 {
        if let Err(e) = run(seed, 14) {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 200 runs differ; the first:\n{}",
        failures.len(),
        failures[0]
    );
}

/// The same, with the events the filesystem reports (fanotify's directory and name,
/// ext4's sizes): looked at, not replayed.
#[test]
fn random_late_filesystem_reports_end_with_the_source_tree() {
    let steps = std::env::var("SCENARIO_STEPS").map_or(14, |s| s.parse().unwrap());
    if let Ok(seed) = std::env::var("SCENARIO_SEED") {
        run_through(seed.parse().unwrap(), steps, Door::Filesystem).unwrap();
        return;
    }
    let runs = std::env::var("SCENARIO_MANY").map_or(200, |n| n.parse().unwrap());
    let mut failures = Vec::new();
    for seed in 0..runs {
        if let Err(e) = run_through(seed, steps, Door::Filesystem) {
            failures.push(e);
        }
    }
    let seeds: Vec<&str> = failures.iter().filter_map(|f| f.lines().next()).collect();
    assert!(
        failures.is_empty(),
        "{} of {runs} runs differ ({seeds:?}); the first:\n{}",
        failures.len(),
        failures[0]
    );
}

/// rename(2) between two names of one file does nothing: both stay. The index must
/// keep both too. Forgetting `a` (taking the rename for a move), it forgets the file
/// when `b` is unlinked, and what was still to be read for it (here the answer to the
/// scan's question: all of its bytes) is dropped, the replica's `a` left empty.
#[test]
fn a_rename_between_two_names_of_one_file_keeps_both() {
    scripted(
        |p| {
            std::fs::write(p("a"), b"bytes of the file with two names").unwrap();
            std::fs::hard_link(p("a"), p("b")).unwrap();
        },
        |p| {
            std::fs::rename(p("a"), p("b")).unwrap();
            assert!(p("a").exists(), "a no-op on Linux");
            std::fs::remove_file(p("b")).unwrap();
            vec![
                renamed(&p("a"), &p("b")),
                now(CaptureEvent::Removed {
                    path: arg(&p("b")),
                    is_dir: false,
                }),
            ]
        },
    );
}

/// `n` becomes a link of `x`, then `c` is renamed over it, before the agent resolves
/// the link: resolved then, `n` is found to be `c`'s file (it has another name, `l`)
/// and linked to that. The rename of `c` to `n` then names two names of one file for
/// the index, yet it was a move on the source: `c` must go from the replica, where a
/// rename between two names of one file would leave both.
#[test]
fn a_move_onto_a_name_already_linked_to_the_file_removes_the_old_name() {
    scripted(
        |p| {
            std::fs::write(p("x"), b"x").unwrap();
            std::fs::write(p("c"), b"the file with two names").unwrap();
            std::fs::hard_link(p("c"), p("l")).unwrap();
        },
        |p| {
            std::fs::hard_link(p("x"), p("n")).unwrap();
            std::fs::rename(p("c"), p("n")).unwrap();
            vec![link_event(&p("x"), &p("n")), renamed(&p("c"), &p("n"))]
        },
    );
}

/// A rename between two names of one file, `e/a` and `b`, resolved after `e/a`'s
/// directory moved on: the source's `e/a` is not there to tell a no-op from a move.
/// The name must not be forgotten (it is still the source's `f/a`): forgotten, the
/// file is forgotten with `b`'s unlink, and the answer to the scan's question is
/// dropped, `f/a` left without its bytes.
#[test]
fn a_rename_between_two_names_of_one_file_in_a_directory_moved_since_keeps_both() {
    scripted(
        |p| {
            std::fs::create_dir(p("e")).unwrap();
            std::fs::write(p("e/a"), b"the file with two names").unwrap();
            std::fs::hard_link(p("e/a"), p("b")).unwrap();
        },
        |p| {
            std::fs::rename(p("e/a"), p("b")).unwrap();
            std::fs::rename(p("e"), p("f")).unwrap();
            std::fs::remove_file(p("b")).unwrap();
            vec![
                renamed(&p("e/a"), &p("b")),
                renamed(&p("e"), &p("f")),
                now(CaptureEvent::Removed {
                    path: arg(&p("b")),
                    is_dir: false,
                }),
            ]
        },
    );
}

/// Seeds of `random_late_sequences_end_with_the_source_tree` at 20 steps that once left
/// the replica different from the source, one group per bug fixed since.
#[test]
fn seeds_that_once_differed_end_with_the_source_tree() {
    const SEEDS: &[u64] = &[
        // An exchange with a name the index does not know.
        2968, 1029, 1893, 2845, 1148,
        // A directory's creation that finds a file at its path.
        1082, 3978,
    ];
    for &seed in SEEDS {
        run(seed, 20).unwrap();
    }
}

/// Directory `d` is made with a file in it. Resolving its creation, the agent finds `d`
/// (a stat); right then, before the agent watches and reads it, `d` is renamed to `e`
/// (here, from the watch). Registered anyway, `d` passed for a directory the source
/// has, newer than the rename, which then left the replica's `d` behind beside the copy
/// of `e` (seen end to end: `extra on replica: ns/viafd`). Neither may stay wrong.
#[test]
fn a_directory_renamed_between_its_stat_and_its_read_is_not_left_behind() {
    let src = tempfile::tempdir().unwrap();
    let root = src.path().canonicalize().unwrap();
    let p = |n: &str| root.join(n);
    let w = FakeWatch::default();
    let mut r = setup(&root, &w);
    let mut disk = Disk::new();
    let mut out = Vec::new();
    r.scan_all(&mut out);
    disk.apply(&out);
    out.clear();
    std::fs::create_dir(p("d")).unwrap();
    std::fs::write(p("d/f"), b"made before the watch").unwrap();
    let made = created(&p("d"));
    let id = id_of(&p("d"));
    let moved = std::rc::Rc::new(RefCell::new(None));
    {
        let (moved, from, to) = (moved.clone(), p("d"), p("e"));
        let mut fired = false;
        *w.1.borrow_mut() = Some(Box::new(move |d: FileId| {
            if d == id && !fired {
                fired = true;
                std::fs::rename(&from, &to).unwrap();
                *moved.borrow_mut() = Some(renamed(&from, &to));
            }
        }));
    }
    r.resolve(made, &mut out);
    let rename = moved
        .borrow_mut()
        .take()
        .expect("the watch of d renamed it");
    r.resolve(rename, &mut out);
    let sent: Vec<String> = out.iter().map(|o| summarize_op(&o.op)).collect();
    settle(&mut r, &mut disk, &mut out);
    assert!(disk.errors.is_empty(), "{:?}", disk.errors);
    assert_eq!(shape(disk.root.path()), shape(&root), "sent: {sent:#?}");
}

/// Directory `n` is made, then exchanged with `a`, a file with a second name `b`,
/// before the agent resolves the mkdir: `n` holds the file then. The creation must not
/// take it for the directory made (linked there to `b`, the index would have the file
/// at `a` and `n` both, and the exchange would swap two names of one file: nothing);
/// the exchange copies what each side holds.
#[test]
fn a_directory_made_and_exchanged_with_a_linked_file_before_it_is_resolved_is_copied() {
    scripted(
        |p| {
            std::fs::write(p("a"), b"a file with two names").unwrap();
            std::fs::hard_link(p("a"), p("b")).unwrap();
        },
        |p| {
            std::fs::create_dir(p("n")).unwrap();
            let made = created(&p("n"));
            renameat2(&p("a"), &p("n"), RENAME_EXCHANGE).unwrap();
            let exchanged = now(CaptureEvent::Renamed {
                from: arg(&p("a")),
                to: arg(&p("n")),
                flags: RENAME_EXCHANGE,
            });
            vec![made, exchanged]
        },
    );
}
