//! The resolver against real directories (tempdirs), with a fake kernel watcher.

use super::*;
use crate::rules::Rules;
use std::cell::RefCell;
use std::collections::HashSet;

mod scenarios;

/// The watched directories, what to do when one is watched (a test's way to
/// change the source between two steps of the resolver), and the marked files.
#[derive(Default)]
#[allow(clippy::type_complexity)]
struct FakeWatch(
    RefCell<HashSet<FileId>>,
    RefCell<Option<Box<dyn FnMut(FileId)>>>,
    /// Files marked in the kernel's inode bitmap.
    RefCell<HashSet<FileId>>,
);
impl Watcher for &FakeWatch {
    fn watch(&self, d: FileId) {
        self.0.borrow_mut().insert(d);
        if let Some(hook) = self.1.borrow_mut().as_mut() {
            hook(d);
        }
    }
    fn watch_ancestor(&self, _: FileId) {}
    fn unwatch(&self, d: FileId) {
        self.0.borrow_mut().remove(&d);
    }
    fn watch_file(&self, f: FileId) {
        self.2.borrow_mut().insert(f);
    }
}

/// (offset, bytes) of the Write ops in `out`.
fn writes_of(out: &[SetOp]) -> Vec<(u64, Vec<u8>)> {
    out.iter()
        .filter_map(|o| match &o.op {
            Op::Write { offset, data, .. } => Some((*offset, data.to_vec())),
            _ => None,
        })
        .collect()
}

fn now(event: CaptureEvent) -> Captured {
    at(monotonic_ns(), event)
}

fn at(time: u64, event: CaptureEvent) -> Captured {
    Captured { time, event }
}

fn id_of(p: &Path) -> FileId {
    file_id(&std::fs::symlink_metadata(p).unwrap())
}

/// Writes `data` to a new file at `path` and resolves its creation and its data, as
/// captured: returns the file.
fn written(r: &mut Resolver<&FakeWatch>, path: &Path, data: &[u8], out: &mut Vec<SetOp>) -> FileId {
    std::fs::write(path, data).unwrap();
    let f = id_of(path);
    r.resolve(
        now(CaptureEvent::Created {
            file: Some(f),
            parent: None,
            path: arg(path),
            is_dir: false,
            mode: 0o644,
        }),
        out,
    );
    r.resolve(
        now(CaptureEvent::Data {
            file: f,
            parent: id_of(path.parent().unwrap()),
            offset: 0,
            data: data.to_vec(),
        }),
        out,
    );
    f
}

fn arg(p: &Path) -> PathArg {
    PathArg {
        base: None,
        pid: 0,
        dirfd: -100,
        path: p.as_os_str().as_bytes().to_vec(),
        truncated: false,
    }
}

fn setup<'a>(dir: &Path, watch: &'a FakeWatch) -> Resolver<&'a FakeWatch> {
    let set = Set {
        name: "s".into(),
        root: dir.canonicalize().unwrap(),
        rules: Rules::new(&["**".into()], &["**/*.tmp".into()]).unwrap(),
        targets: vec![0],
        queue: crate::queue::QueueMode::Realtime,
        mirror_block: 4096,
        orphans: Orphans::Delete,
        mirror_quick_check: false,
    };
    Resolver::new(vec![set], watch).unwrap()
}

/// [`setup`], with the initial scan done and its ops dropped.
fn scanned<'a>(dir: &Path, watch: &'a FakeWatch) -> Resolver<&'a FakeWatch> {
    let mut r = setup(dir, watch);
    r.scan_all(&mut Vec::new());
    r
}

#[test]
fn a_range_is_never_read_from_the_file_that_replaced_it() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().canonicalize().unwrap();
    let w = FakeWatch::default();
    let mut r = setup(&root, &w);
    let mut out = Vec::new();
    std::fs::write(root.join("p"), b"xxxx").unwrap();
    std::fs::write(root.join("r"), b"yyyy").unwrap();
    r.scan_all(&mut out);
    out.clear();
    let x = id_of(&root.join("p"));
    // x changes, moves to q, and y takes its old name, all before the agent
    // resolves the change.
    std::fs::write(root.join("p"), b"XXXX").unwrap();
    std::fs::rename(root.join("p"), root.join("q")).unwrap();
    std::fs::rename(root.join("r"), root.join("p")).unwrap();
    let dirty = CaptureEvent::Dirty {
        file: x,
        parent: None,
        offset: 0,
        len: 4,
    };
    r.resolve(now(dirty), &mut out);
    assert!(
        out.iter().all(|o| !matches!(o.op, Op::Write { .. })),
        "read y's bytes for x: {out:?}"
    );
    for (from, to) in [("p", "q"), ("r", "p")] {
        r.resolve(
            now(CaptureEvent::Renamed {
                from: arg(&root.join(from)),
                to: arg(&root.join(to)),
                flags: 0,
            }),
            &mut out,
        );
    }
    out.clear();
    r.finish(&mut out);
    let writes: Vec<_> = out
        .iter()
        .filter_map(|o| match &o.op {
            Op::Write { path, data, .. } => Some((path.clone(), data.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        writes,
        vec![(RelPath(b"q".to_vec()), bytes::Bytes::from_static(b"XXXX"))]
    );
}

/// Answers the mirror's comparisons in `ops` as a receiver with an empty (all-hole)
/// replica would, and returns what the resolver sends for them.
fn answer<W: Watcher>(r: &mut Resolver<W>, ops: &[SetOp]) -> Vec<SetOp> {
    use doppel_common::wire::sums::zero_sum;
    let mut out = Vec::new();
    for o in ops {
        let Op::Sum {
            job,
            file,
            size,
            offset,
            block,
            sums,
            ..
        } = &o.op
        else {
            continue;
        };
        if *job == doppel_common::wire::sums::LAYOUT_JOB {
            // No data anywhere: all of it is sent, nothing is left to compare.
            let id = FileId {
                dev: file[0],
                ino: file[1],
            };
            let all = [(*offset, size - offset)];
            r.mirror_need(o.set, id, &all, (0, &[]), false, &mut out);
            let mut rest = Vec::new();
            r.compare_rest(o.set, id, &all, &mut rest);
            assert!(rest.is_empty(), "nothing left to compare: {rest:?}");
            continue;
        }
        let mut ranges = Vec::new();
        for (i, &sum) in sums.iter().enumerate() {
            let start = offset + i as u64 * *block as u64;
            let len = (*block as u64).min(size - start);
            if sum != zero_sum(len as usize) {
                ranges.push((start, len));
            }
        }
        let id = FileId {
            dev: file[0],
            ino: file[1],
        };
        r.mirror_need(o.set, id, &ranges, (0, &[]), false, &mut out);
    }
    r.finish(&mut out);
    out
}

#[test]
fn block_sums_of_a_large_file_come_in_order_whatever_the_threads() {
    use doppel_common::wire::sums::block_sum;
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("f");
    let data: Vec<u8> = (0..(9 << 20) + 123u32)
        .map(|i| (i * 31 % 253) as u8)
        .collect();
    std::fs::write(&p, &data).unwrap();
    let f = File::open(&p).unwrap();
    let mut runs = Vec::new();
    block_sums(
        &f,
        &f.metadata().unwrap(),
        4096,
        |_| true,
        |off, sums| runs.push((off, sums)),
    );
    let want: Vec<u64> = data.chunks(4096).map(block_sum).collect();
    let mut at = 0;
    for (off, sums) in &runs {
        assert_eq!(*off, at as u64 * 4096);
        assert!(sums.len() <= SUMS_PER_OP);
        assert_eq!(sums[..], want[at..at + sums.len()]);
        at += sums.len();
    }
    assert_eq!(at, want.len());
}

/// A fifo renamed between the stat that found it and its registration must not be
/// entered under its old name: nothing would take that name off the replica.
#[test]
fn a_special_file_gone_since_its_stat_is_not_entered() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().canonicalize().unwrap();
    let w = FakeWatch::default();
    let mut r = scanned(&root, &w);
    let mut out = Vec::new();
    let fifo = root.join("fifo3");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    let stale = std::fs::symlink_metadata(&fifo).unwrap();
    std::fs::rename(&fifo, root.join("fifo3-renamed")).unwrap();
    let entered = r.enter(
        0,
        id_of(&root),
        OsStr::new("fifo3"),
        &fifo,
        Path::new("fifo3"),
        &stale,
        Copy::Compare,
        &mut out,
    );
    assert!(!entered);
    let sent: Vec<String> = out.iter().map(|o| summarize_op(&o.op)).collect();
    assert!(sent.is_empty(), "{sent:?}");
    let here = Location {
        set: 0,
        rel: "fifo3".into(),
    };
    assert_eq!(r.index.lookup(&here), None);
}

/// Blocks are hashed through a mapping: a file cut short after its stat faults
/// (SIGBUS) past its new end. The read is spoiled, not the agent, and each block has
/// the checksum of what the file still holds there.
#[test]
fn a_file_cut_short_while_hashed_has_the_sums_of_what_it_still_holds() {
    use doppel_common::wire::sums::block_sum;
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("f");
    let data: Vec<u8> = (0..512 * 4096u32).map(|i| (i % 251) as u8 + 1).collect();
    std::fs::write(&p, &data).unwrap();
    let f = File::open(&p).unwrap();
    let stale = f.metadata().unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(10 * 4096 + 5)
        .unwrap();
    let before = doppel_mapread::spoiled_reads();
    let mut sums = Vec::new();
    block_sums(&f, &stale, 4096, |_| true, |_, s| sums.extend(s));
    let mut want: Vec<u64> = data[..10 * 4096].chunks(4096).map(block_sum).collect();
    // The page the file now ends in is still mapped: zeros follow its end there.
    let mut last = data[10 * 4096..10 * 4096 + 5].to_vec();
    last.resize(4096, 0);
    want.push(block_sum(&last));
    // Past it the mapping faults and the blocks are read: nothing is there.
    want.resize(512, block_sum(&[]));
    assert_eq!(sums, want);
    assert!(doppel_mapread::spoiled_reads() > before);
}

/// A file renamed between the scan's stat and its copy was not sent: its rename must
/// not be sent as a rename of a file the replica lacks (which the receiver takes for
/// a resend and skips), but copy the file where it went.
#[test]
fn a_file_renamed_while_being_entered_is_copied_where_it_went() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().canonicalize().unwrap();
    let w = FakeWatch::default();
    let mut r = scanned(&root, &w);
    let mut out = Vec::new();
    std::fs::write(root.join("a"), b"data").unwrap();
    let m = std::fs::symlink_metadata(root.join("a")).unwrap();
    let (rid, _) = r.index.root(0);
    std::fs::rename(root.join("a"), root.join("b")).unwrap();
    // The listing's stat saw `a`; the copy finds it gone.
    let entered = r.enter(
        0,
        rid,
        OsStr::new("a"),
        &root.join("a"),
        Path::new("a"),
        &m,
        Copy::Send,
        &mut out,
    );
    assert!(!entered, "nothing was sent for a: {out:?}");
    assert!(out.is_empty(), "{out:?}");
    r.resolve(
        now(CaptureEvent::Renamed {
            from: arg(&root.join("a")),
            to: arg(&root.join("b")),
            flags: 0,
        }),
        &mut out,
    );
    assert!(
        !out.iter().any(|o| matches!(o.op, Op::Rename { .. })),
        "the replica has no a to rename: {out:?}"
    );
    assert!(
        out.iter()
            .any(|o| matches!(&o.op, Op::CreateFile { path, .. } if path.0 == b"b")),
        "b is copied: {out:?}"
    );
}

/// A directory copied again prunes the replica to what the source has now; a file
/// that left it meanwhile (its rename not yet resolved) is gone from the replica, so
/// the rename must copy it where it went, not rename what the replica lacks.
#[test]
fn a_file_pruned_by_a_rescan_is_copied_where_it_went() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().canonicalize().unwrap();
    std::fs::create_dir(root.join("d")).unwrap();
    std::fs::write(root.join("d/f"), b"data").unwrap();
    let w = FakeWatch::default();
    let mut r = scanned(&root, &w);
    let mut out = Vec::new();
    let dir = id_of(&root.join("d"));
    std::fs::rename(root.join("d/f"), root.join("g")).unwrap();
    let renamed = now(CaptureEvent::Renamed {
        from: arg(&root.join("d/f")),
        to: arg(&root.join("g")),
        flags: 0,
    });
    // Copied again before the rename's event is resolved.
    r.rescan.insert(dir, monotonic_ns());
    r.finish(&mut out);
    assert!(
        out.iter()
            .any(|o| matches!(&o.op, Op::Prune { keep, .. } if keep.is_empty())),
        "{out:?}"
    );
    out.clear();
    r.resolve(renamed, &mut out);
    assert!(
        !out.iter().any(|o| matches!(o.op, Op::Rename { .. })),
        "the replica has no d/f to rename: {out:?}"
    );
    assert!(
        out.iter()
            .any(|o| matches!(&o.op, Op::CreateFile { path, .. } if path.0 == b"g")),
        "g is copied: {out:?}"
    );
}

#[test]
fn a_created_file_carries_the_extended_attributes_it_was_born_with() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().canonicalize().unwrap();
    let w = FakeWatch::default();
    let mut r = scanned(&root, &w);
    let mut out = Vec::new();
    let f = root.join("f");
    std::fs::write(&f, b"x").unwrap();
    // Stands for what the kernel sets at creation without a setxattr call (an ACL
    // inherited from the directory's default ACL): no attribute event follows.
    rustix::fs::lsetxattr(&f, "user.born", b"yes", rustix::fs::XattrFlags::empty()).unwrap();
    r.resolve(
        now(CaptureEvent::Created {
            file: Some(id_of(&f)),
            parent: Some(id_of(&root)),
            path: arg(&f),
            is_dir: false,
            mode: 0o644,
        }),
        &mut out,
    );
    r.finish(&mut out);
    let ops: Vec<&Op> = out.iter().map(|o| &o.op).collect();
    let create = ops
        .iter()
        .position(|o| matches!(o, Op::CreateFile { path, .. } if path.0 == b"f"));
    let xattrs = ops.iter().position(|o| {
        matches!(o, Op::SetXattrs { path, xattrs } if path.0 == b"f"
            && xattrs.iter().any(|x| x.name == b"user.born" && x.value == b"yes"))
    });
    assert!(
        matches!((create, xattrs), (Some(c), Some(x)) if c < x),
        "{ops:?}"
    );
}

/// A directory made inside one that moved before the mkdir's event was resolved is
/// not at the path the event names: it is copied once the move is resolved, with
/// what was made in it meanwhile.
#[test]
fn a_directory_made_in_one_that_moved_since_is_copied() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().canonicalize().unwrap();
    std::fs::create_dir(root.join("a")).unwrap();
    let w = FakeWatch::default();
    let mut r = scanned(&root, &w);
    let mut out = Vec::new();
    std::fs::create_dir(root.join("a/b")).unwrap();
    std::fs::write(root.join("a/b/f"), b"data").unwrap();
    let f = id_of(&root.join("a/b/f"));
    let b = id_of(&root.join("a/b"));
    let events = [
        now(CaptureEvent::Created {
            file: None,
            parent: None,
            path: arg(&root.join("a/b")),
            is_dir: true,
            mode: 0o755,
        }),
        now(CaptureEvent::Created {
            file: Some(f),
            parent: Some(b),
            path: arg(&root.join("a/b/f")),
            is_dir: false,
            mode: 0o644,
        }),
        now(CaptureEvent::Renamed {
            from: arg(&root.join("a")),
            to: arg(&root.join("c")),
            flags: 0,
        }),
    ];
    // The source is ahead: `a` is `c` before any of these is resolved.
    std::fs::rename(root.join("a"), root.join("c")).unwrap();
    for e in events {
        r.resolve(e, &mut out);
    }
    r.finish(&mut out);
    assert!(
        out.iter()
            .any(|o| matches!(&o.op, Op::Mkdir { path, .. } if path.0 == b"c/b")),
        "c/b is made: {out:?}"
    );
    assert!(
        out.iter()
            .any(|o| matches!(&o.op, Op::Sum { path, .. } if path.0 == b"c/b/f")),
        "c/b/f is copied: {out:?}"
    );
}

#[test]
fn an_answer_naming_what_is_now_a_directory_makes_no_file() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().canonicalize().unwrap();
    std::fs::create_dir(root.join("dir")).unwrap();
    let w = FakeWatch::default();
    let mut r = scanned(&root, &w);
    let mut out = Vec::new();
    // An answer from before a restart whose inode number the directory took since.
    let dir = id_of(&root.join("dir"));
    r.mirror_need(0, dir, &[(0, 1 << 20)], (0, &[]), true, &mut out);
    r.finish(&mut out);
    assert!(out.is_empty(), "nothing is sent for the directory: {out:?}");
}

#[test]
fn only_fine_blocks_that_differ_are_sent() {
    use doppel_common::wire::sums::block_sum;
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("f");
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&p, &data).unwrap();
    let mut theirs: Vec<u64> = data[4096..].chunks(1024).map(block_sum).collect();
    theirs[2] ^= 1; // the replica differs in [6144, 7168)
    theirs[3] ^= 1; // and [7168, 8192)
    theirs.pop(); // and has no sum for the tail [9216, 10000)
    let f = File::open(&p).unwrap();
    assert_eq!(
        differing_fine(&f, 4096, 10_000 - 4096, 1024, &theirs),
        vec![(6144, 2048), (9216, 784)]
    );
}

#[test]
fn scan_emits_tree_and_keeps_holes() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("sub")).unwrap();
    let f = File::create(d.path().join("sub/f")).unwrap();
    f.write_all_at(b"hello", (READ_CHUNK * 2) as u64).unwrap();
    std::fs::write(d.path().join("x.tmp"), b"skip").unwrap();
    let w = FakeWatch::default();
    let mut r = setup(d.path(), &w);
    let mut out = Vec::new();
    r.scan_all(&mut out);
    let ops: Vec<_> = out.iter().map(|o| &o.op).collect();
    assert!(matches!(ops[0], Op::Mkdir { path, .. } if path.0 == b"sub"));
    let sent = answer(&mut r, &out);
    let writes: Vec<_> = sent
        .iter()
        .filter(|o| matches!(o.op, Op::Write { .. }))
        .collect();
    assert_eq!(writes.len(), 1, "the hole is not sent: {sent:?}");
    assert!(ops
        .iter()
        .any(|o| matches!(o, Op::Truncate { size, .. } if *size == (READ_CHUNK * 2 + 5) as u64)));
    // Each scanned directory ends with a Prune keeping exactly what was sent.
    assert_eq!(
        *ops[ops.len() - 1],
        Op::Prune {
            dir: None,
            keep: vec![RelPath(b"sub".to_vec())]
        }
    );
    assert!(ops.contains(&&Op::Prune {
        dir: Some(RelPath(b"sub".to_vec())),
        keep: vec![RelPath(b"f".to_vec())]
    }));
    assert!(!ops
        .iter()
        .any(|o| o.paths().any(|p| p.0.ends_with(b".tmp"))));
    assert!(w.0.borrow().contains(&id_of(&d.path().join("sub"))));
}

#[test]
fn a_hole_to_the_end_of_file_is_made_by_truncates_not_a_punch() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("f");
    let f = File::create(&path).unwrap();
    f.write_all_at(&[7; 4096], 0).unwrap();
    f.write_all_at(&[1; 100], 8192).unwrap();
    f.set_len(6814 + 8192).unwrap(); // data, hole, data, hole to the end
    let id = id_of(&path);
    let mut out = Vec::new();
    emit_range(0, &path, Path::new("f"), 0, 6814 + 8192, id, &mut out).unwrap();
    let ops: Vec<String> = out
        .iter()
        .map(|o| match &o.op {
            Op::Write { offset, data, .. } => format!("write {offset}+{}", data.len()),
            Op::Fallocate { offset, len, .. } => format!("punch {offset}+{len}"),
            Op::Truncate { size, .. } => format!("truncate {size}"),
            op => format!("{op:?}"),
        })
        .collect();
    // ext4 would keep the block holding end of file as zeroed data after a punch.
    // (Data is read as the filesystem's blocks hold it: 4 KiB here, on tmpfs and
    // on ext4 alike.)
    assert_eq!(
        ops,
        [
            "write 0+4096",
            "punch 4096+4096",
            "write 8192+4096",
            "truncate 12288",
            "truncate 15006"
        ]
    );
}

#[test]
fn adjacent_writes_to_a_file_become_one_op() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().canonicalize().unwrap();
    std::fs::write(root.join("f"), b"").unwrap();
    std::fs::write(root.join("g"), b"").unwrap();
    let w = FakeWatch::default();
    let mut r = scanned(&root, &w);
    let mut out = Vec::new();
    let (f, g, dir) = (id_of(&root.join("f")), id_of(&root.join("g")), id_of(&root));
    let data = |file, offset: u64, bytes: &[u8]| {
        now(CaptureEvent::Data {
            file,
            parent: dir,
            offset,
            data: bytes.to_vec(),
        })
    };
    for ev in [
        data(f, 0, b"ab"),
        data(f, 2, b"cd"), // joins the one before
        data(f, 10, b"x"), // not adjacent
        data(g, 11, b"y"), // adjacent offset, other file
        data(f, 11, b"z"), // adjacent to f's last write, but g's lies between
    ] {
        r.resolve(ev, &mut out);
    }
    let writes: Vec<(&[u8], u64, &[u8])> = out
        .iter()
        .filter_map(|o| match &o.op {
            Op::Write { path, offset, data } => Some((&path.0[..], *offset, &data[..])),
            _ => None,
        })
        .collect();
    assert_eq!(
        writes,
        [
            (&b"f"[..], 0, &b"abcd"[..]),
            (b"f", 10, b"x"),
            (b"g", 11, b"y"),
            (b"f", 11, b"z")
        ]
    );
}

/// A write reported inside the filesystem before it extended the file, stamped
/// before a scan that saw the file shorter: its range is read again (the file's
/// bytes now), not sent as captured and not dropped as covered. Within what the scan
/// saw, it is covered.
#[test]
fn an_older_write_past_what_the_scan_saw_is_read_again() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().canonicalize().unwrap();
    std::fs::write(root.join("f"), b"0123").unwrap();
    let before = monotonic_ns();
    let w = FakeWatch::default();
    let mut r = scanned(&root, &w);
    let f = id_of(&root.join("f"));
    let dir = id_of(&root);
    // The file grew after the scan read it; the write was stamped before the scan.
    std::fs::write(root.join("f"), b"0123456789").unwrap();
    let mut out = Vec::new();
    r.resolve(
        at(
            before,
            CaptureEvent::Data {
                file: f,
                parent: dir,
                offset: 4,
                data: b"stale!".to_vec(),
            },
        ),
        &mut out,
    );
    let writes = writes_of(&out);
    assert_eq!(writes, vec![(4, b"456789".to_vec())]);
    out.clear();
    r.resolve(
        at(
            before,
            CaptureEvent::Data {
                file: f,
                parent: dir,
                offset: 0,
                data: b"old".to_vec(),
            },
        ),
        &mut out,
    );
    assert!(
        !out.iter().any(|o| matches!(o.op, Op::Write { .. })),
        "{out:?}"
    );
}

/// A range reported changed before the write extended the file (the writer was
/// preempted between the report and the size update): read as far as the file goes,
/// and the rest again once the file has it.
#[test]
fn a_range_past_the_end_is_read_again_once_the_file_has_it() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().canonicalize().unwrap();
    std::fs::write(root.join("f"), b"0123").unwrap();
    let w = FakeWatch::default();
    let mut r = scanned(&root, &w);
    let f = id_of(&root.join("f"));
    let mut out = Vec::new();
    r.resolve(
        now(CaptureEvent::Dirty {
            file: f,
            parent: Some(id_of(&root)),
            offset: 4,
            len: 6,
        }),
        &mut out,
    );
    std::fs::write(root.join("f"), b"0123456789").unwrap();
    out.clear();
    r.finish(&mut out);
    let writes = writes_of(&out);
    assert_eq!(writes, vec![(4, b"456789".to_vec())]);
    assert!(!r.has_deferred());
}

/// A file is marked in the kernel when it is entered, before it is read, and stays
/// marked when it is renamed (also when a stale name of it leaves the index).
#[test]
fn files_are_marked_when_entered_and_stay_marked() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().canonicalize().unwrap();
    std::fs::create_dir(root.join("a")).unwrap();
    for f in ["a/stay", "a/other"] {
        std::fs::write(root.join(f), b"x").unwrap();
    }
    let w = FakeWatch::default();
    let mut r = scanned(&root, &w);
    let [stay, other] = ["a/stay", "a/other"].map(|f| id_of(&root.join(f)));
    assert_eq!(*w.2.borrow(), HashSet::from([stay, other]));
    let mut out = Vec::new();
    std::fs::rename(root.join("a/stay"), root.join("a/kept")).unwrap();
    r.resolve(
        now(CaptureEvent::Renamed {
            from: arg(&root.join("a/stay")),
            to: arg(&root.join("a/kept")),
            flags: 0,
        }),
        &mut out,
    );
    std::fs::write(root.join("a/new"), b"y").unwrap();
    let new = id_of(&root.join("a/new"));
    r.resolve(
        now(CaptureEvent::Made {
            path: arg(&root.join("a/new")),
        }),
        &mut out,
    );
    assert_eq!(*w.2.borrow(), HashSet::from([stay, other, new]));
}

#[test]
fn data_renames_and_moves_out() {
    let d = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let root = d.path().canonicalize().unwrap();
    std::fs::create_dir(root.join("a")).unwrap();
    let w = FakeWatch::default();
    let mut r = scanned(&root, &w);
    let mut out = Vec::new();
    std::fs::write(root.join("a/f"), b"x").unwrap();
    let f = id_of(&root.join("a/f"));
    let a = id_of(&root.join("a"));
    // A write to a file the index has not seen is found by searching its directory,
    // and the file is copied whole as it is now: the write, older, is covered.
    r.resolve(
        now(CaptureEvent::Data {
            file: f,
            parent: a,
            offset: 3,
            data: b"abc".to_vec(),
        }),
        &mut out,
    );
    let sent = answer(&mut r, &out);
    let ops: Vec<Op> = out.drain(..).chain(sent).map(|o| o.op).collect();
    assert!(ops
        .iter()
        .any(|o| matches!(o, Op::CreateFile { path, .. } if path.0 == b"a/f")));
    assert!(ops.contains(&Op::Write {
        path: RelPath(b"a/f".to_vec()),
        offset: 0,
        data: bytes::Bytes::from_static(b"x")
    }));
    assert!(!ops.iter().any(|o| matches!(o, Op::Write { offset: 3, .. })));
    std::fs::rename(root.join("a"), root.join("b")).unwrap();
    r.resolve(
        now(CaptureEvent::Renamed {
            from: arg(&root.join("a")),
            to: arg(&root.join("b")),
            flags: 0,
        }),
        &mut out,
    );
    assert!(
        matches!(&out.pop().unwrap().op, Op::Rename { from, to, .. } if from.0 == b"a" && to.0 == b"b")
    );
    r.resolve(
        now(CaptureEvent::Data {
            file: f,
            parent: a,
            offset: 0,
            data: b"z".to_vec(),
        }),
        &mut out,
    );
    assert!(matches!(&out.pop().unwrap().op, Op::Write { path, .. } if path.0 == b"b/f"));
    let out_path = outside.path().canonicalize().unwrap().join("f");
    std::fs::rename(root.join("b/f"), &out_path).unwrap();
    r.resolve(
        now(CaptureEvent::Renamed {
            from: arg(&root.join("b/f")),
            to: arg(&out_path),
            flags: 0,
        }),
        &mut out,
    );
    assert_eq!(
        out.pop().unwrap().op,
        Op::Remove {
            path: RelPath(b"b/f".to_vec())
        }
    );
    std::fs::rename(&out_path, root.join("back")).unwrap();
    r.resolve(
        now(CaptureEvent::Renamed {
            from: arg(&out_path),
            to: arg(&root.join("back")),
            flags: 0,
        }),
        &mut out,
    );
    // Moved in as the source ran: its bytes are in the stream, not behind a comparison.
    assert!(out.iter().any(|o| matches!(&o.op, Op::Write { path, data, .. } if path.0 == b"back" && data[..] == b"x"[..])), "{out:?}");
    assert!(
        !out.iter().any(|o| matches!(&o.op, Op::Sum { .. })),
        "{out:?}"
    );
}

#[test]
fn events_older_than_a_directory_scan_do_not_resurrect_old_names() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().canonicalize().unwrap();
    std::fs::create_dir(root.join("a")).unwrap();
    std::fs::write(root.join("a/f"), b"old").unwrap();
    let w = FakeWatch::default();
    let mut r = scanned(&root, &w);
    let mut out = Vec::new();
    let f = id_of(&root.join("a/f"));
    // The writer makes a directory and moves the file into it with new contents
    // before the agent has processed the mkdir (so the dir was not watched yet).
    std::fs::create_dir(root.join("n")).unwrap();
    std::fs::write(root.join("a/f"), b"new contents").unwrap();
    std::fs::rename(root.join("a/f"), root.join("n/g")).unwrap();
    let old = monotonic_ns();
    let mkdir = CaptureEvent::Created {
        file: None,
        parent: None,
        path: arg(&root.join("n")),
        is_dir: true,
        mode: 0o755,
    };
    r.resolve(now(mkdir), &mut out);
    let sent = answer(&mut r, &out);
    assert!(sent.iter().any(|o| matches!(&o.op, Op::Write { path, data, .. } if path.0 == b"n/g" && data[..] == b"new contents"[..])), "{out:?}");
    out.clear();
    // Older events, captured in "a" (watched) before the scan, now arrive.
    r.resolve(
        at(
            old,
            CaptureEvent::Created {
                file: Some(f),
                parent: None,
                path: arg(&root.join("a/f")),
                is_dir: false,
                mode: 0o644,
            },
        ),
        &mut out,
    );
    assert!(
        out.is_empty(),
        "the scan is ahead of this creation: {out:?}"
    );
    r.resolve(
        at(
            old,
            CaptureEvent::Data {
                file: f,
                parent: id_of(&root.join("n")),
                offset: 0,
                data: b"older".to_vec(),
            },
        ),
        &mut out,
    );
    assert!(
        out.is_empty(),
        "data older than the scan is already in the copy: {out:?}"
    );
    r.resolve(
        at(
            old,
            CaptureEvent::Renamed {
                from: arg(&root.join("a/f")),
                to: arg(&root.join("n/g")),
                flags: 0,
            },
        ),
        &mut out,
    );
    assert_eq!(
        out.iter().map(|o| o.op.clone()).collect::<Vec<_>>(),
        vec![Op::Remove {
            path: RelPath(b"a/f".to_vec())
        }]
    );
    assert_eq!(r.index().location(f).unwrap().rel, PathBuf::from("n/g"));
}

/// A replica as the ops make it: which file each name is, and each file's bytes.
#[derive(Default)]
struct Replica {
    names: HashMap<Vec<u8>, usize>,
    files: Vec<Vec<u8>>,
}

impl Replica {
    /// Answers the mirror questions in `out` as the receiver would, applies `out`
    /// and then the ops the answers led to; returns all of them, one line each,
    /// for assertion messages.
    fn take<W: Watcher>(&mut self, r: &mut Resolver<W>, out: &[SetOp]) -> Vec<String> {
        let sent = answer(r, out);
        self.apply(out);
        self.apply(&sent);
        out.iter()
            .chain(&sent)
            .map(|o| summarize_op(&o.op))
            .collect()
    }

    fn file(&mut self, path: &RelPath) -> usize {
        if let Some(&i) = self.names.get(&path.0) {
            return i;
        }
        self.files.push(Vec::new());
        self.names.insert(path.0.clone(), self.files.len() - 1);
        self.files.len() - 1
    }

    fn apply(&mut self, ops: &[SetOp]) {
        for o in ops {
            match &o.op {
                Op::CreateFile { path, .. } => {
                    self.file(path);
                }
                Op::Write { path, offset, data } => {
                    let i = self.file(path);
                    let (start, f) = (*offset as usize, &mut self.files[i]);
                    if f.len() < start + data.len() {
                        f.resize(start + data.len(), 0);
                    }
                    f[start..start + data.len()].copy_from_slice(data);
                }
                Op::Truncate { path, size } => {
                    let i = self.file(path);
                    self.files[i].resize(*size as usize, 0);
                }
                Op::Link { from, to } => {
                    if let Some(&i) = self.names.get(&from.0) {
                        self.names.insert(to.0.clone(), i);
                    }
                }
                Op::Rename { from, to, .. } => {
                    if let Some(i) = self.names.remove(&from.0) {
                        self.names.insert(to.0.clone(), i);
                    }
                }
                Op::Remove { path } => {
                    self.names.remove(&path.0);
                }
                Op::Prune { dir, keep } => {
                    let dir = dir.as_ref().map_or(&b""[..], |d| &d.0[..]);
                    self.names.retain(|name, _| {
                        let (parent, base) = match name.iter().rposition(|&b| b == b'/') {
                            Some(i) => (&name[..i], &name[i + 1..]),
                            None => (&b""[..], &name[..]),
                        };
                        parent != dir || keep.iter().any(|k| k.0 == base)
                    });
                }
                Op::Sum { .. } | Op::SetAttr { .. } | Op::SetXattrs { .. } | Op::Mkdir { .. } => {}
                other => panic!("not modelled: {other:?}"),
            }
        }
    }

    /// The names of the replica's files, one group per file.
    fn groups(&self) -> Vec<Vec<String>> {
        let mut groups: Vec<Vec<String>> = vec![Vec::new(); self.files.len()];
        for (name, &i) in &self.names {
            groups[i].push(String::from_utf8_lossy(name).into_owned());
        }
        groups.retain(|g| !g.is_empty());
        groups.iter_mut().for_each(|g| g.sort());
        groups.sort();
        groups
    }
}

fn link_event(from: &Path, to: &Path) -> Captured {
    now(CaptureEvent::Linked {
        from: arg(from),
        to: arg(to),
    })
}

/// fidelity::links_and_special, with the agent resolving the first links while the
/// source still has `a/orig` and the rest after the source has moved on: the first
/// name the index has for the file (`a/orig`) is gone from the source by then, yet
/// the replica has the file under it and under `b/l1` and `c/l2`. Every later name
/// must be a link to that file, not a second copy beside it.
#[test]
fn a_link_made_after_the_first_name_went_joins_the_replicas_file() {
    use std::os::unix::fs::OpenOptionsExt;
    let d = tempfile::tempdir().unwrap();
    let root = d.path().canonicalize().unwrap();
    for dir in ["a", "b", "c"] {
        std::fs::create_dir(root.join(dir)).unwrap();
    }
    let w = FakeWatch::default();
    let mut r = setup(&root, &w);
    let mut out = Vec::new();
    r.scan_all(&mut out);
    let p = |n: &str| root.join(n);
    let orig: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    let f = written(&mut r, &p("a/orig"), &orig, &mut out);
    for to in ["b/l1", "c/l2"] {
        std::fs::hard_link(p("a/orig"), p(to)).unwrap();
        r.resolve(link_event(&p("a/orig"), &p(to)), &mut out);
    }
    // The source runs ahead of the agent from here.
    let mut late = Vec::new();
    for (from, to) in [("a/orig", "a/l3"), ("a/l3", "c/l4")] {
        std::fs::hard_link(p(from), p(to)).unwrap();
        late.push(link_event(&p(from), &p(to)));
    }
    std::fs::remove_file(p("a/orig")).unwrap();
    late.push(now(CaptureEvent::Removed {
        path: arg(&p("a/orig")),
        is_dir: false,
    }));
    std::fs::rename(p("b/l1"), p("b/renamed")).unwrap();
    late.push(now(CaptureEvent::Renamed {
        from: arg(&p("b/l1")),
        to: arg(&p("b/renamed")),
        flags: 0,
    }));
    let written = b"written through c/l2";
    let fd = std::fs::OpenOptions::new()
        .write(true)
        .open(p("c/l2"))
        .unwrap();
    fd.write_all_at(written, 1000).unwrap();
    late.push(now(CaptureEvent::Data {
        file: f,
        parent: id_of(&p("c")),
        offset: 1000,
        data: written.to_vec(),
    }));
    let appended = b", appended through c/l4";
    let mut fd = std::fs::OpenOptions::new()
        .append(true)
        .custom_flags(0)
        .open(p("c/l4"))
        .unwrap();
    std::io::Write::write_all(&mut fd, appended).unwrap();
    late.push(now(CaptureEvent::Data {
        file: f,
        parent: id_of(&p("c")),
        offset: orig.len() as u64,
        data: appended.to_vec(),
    }));
    for ev in late {
        r.resolve(ev, &mut out);
    }
    r.finish(&mut out);
    let mut replica = Replica::default();
    let ops = replica.take(&mut r, &out);
    assert_eq!(
        replica.groups(),
        [["a/l3", "b/renamed", "c/l2", "c/l4"]],
        "one file, under the source's names: {ops:#?}"
    );
    let want = std::fs::read(p("a/l3")).unwrap();
    assert_eq!(replica.files[replica.names[&b"c/l2"[..]]], want);
}

/// As above, but with every name the index knows for the file gone from the source
/// by the time a new name is resolved: that name is copied, and the replica's old
/// names, of the other file, must go with their events, not stay beside the copy
/// (the rename of one was taken for that of a file registered after it).
#[test]
fn the_old_names_of_a_file_copied_under_a_new_one_are_not_left_behind() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().canonicalize().unwrap();
    for dir in ["a", "b"] {
        std::fs::create_dir(root.join(dir)).unwrap();
    }
    let w = FakeWatch::default();
    let mut r = setup(&root, &w);
    let mut out = Vec::new();
    r.scan_all(&mut out);
    let p = |n: &str| root.join(n);
    let f = written(&mut r, &p("a/orig"), b"original", &mut out);
    std::fs::hard_link(p("a/orig"), p("b/l1")).unwrap();
    r.resolve(link_event(&p("a/orig"), &p("b/l1")), &mut out);
    // The source runs ahead: neither a/orig nor b/l1 is there when a/l3 is resolved.
    let mut late = vec![];
    std::fs::hard_link(p("a/orig"), p("a/l3")).unwrap();
    late.push(link_event(&p("a/orig"), &p("a/l3")));
    std::fs::remove_file(p("a/orig")).unwrap();
    late.push(now(CaptureEvent::Removed {
        path: arg(&p("a/orig")),
        is_dir: false,
    }));
    std::fs::rename(p("b/l1"), p("b/renamed")).unwrap();
    late.push(now(CaptureEvent::Renamed {
        from: arg(&p("b/l1")),
        to: arg(&p("b/renamed")),
        flags: 0,
    }));
    let fd = std::fs::OpenOptions::new()
        .write(true)
        .open(p("a/l3"))
        .unwrap();
    fd.write_all_at(b"O", 0).unwrap();
    late.push(now(CaptureEvent::Data {
        file: f,
        parent: id_of(&p("a")),
        offset: 0,
        data: b"O".to_vec(),
    }));
    for ev in late {
        r.resolve(ev, &mut out);
    }
    r.finish(&mut out);
    let mut replica = Replica::default();
    let ops = replica.take(&mut r, &out);
    assert_eq!(
        replica.groups(),
        [["a/l3", "b/renamed"]],
        "one file, under the source's names: {ops:#?}"
    );
    assert_eq!(replica.files[replica.names[&b"b/renamed"[..]]], b"Original");
}

/// The storm's `renamed-3724.bin`: file A is renamed over file C (`s/a` -> `t/x`)
/// and on (`t/x` -> `t/y`) before the agent resolves either rename, and by then the
/// index no longer knows A at `s/a` (here: a re-read of A found it gone from there
/// for too long, and `s` was copied again, which forgot `s/a`). The first rename has
/// an unknown source and a destination gone from the source: nothing can be copied
/// there, but C must not stay known at `t/x`, or the second rename moves C's bytes to
/// `t/y` on the replica and A is never sent.
#[test]
fn a_file_renamed_over_another_and_on_before_it_is_resolved_is_not_the_other() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().canonicalize().unwrap();
    let p = |n: &str| root.join(n);
    for dir in ["s", "t"] {
        std::fs::create_dir(p(dir)).unwrap();
    }
    std::fs::write(p("s/a"), b"old bytes of a").unwrap();
    std::fs::write(p("t/c"), b"the other file, c").unwrap();
    let w = FakeWatch::default();
    let mut r = setup(&root, &w);
    let mut out = Vec::new();
    r.scan_all(&mut out);
    let mut replica = Replica::default();
    replica.take(&mut r, &out);
    out.clear();
    let a = id_of(&p("s/a"));
    std::fs::rename(p("t/c"), p("t/x")).unwrap();
    r.resolve(
        now(CaptureEvent::Renamed {
            from: arg(&p("t/c")),
            to: arg(&p("t/x")),
            flags: 0,
        }),
        &mut out,
    );
    // The source runs ahead: A grows (its bytes lost in a full ring: a missed
    // range), goes over C at t/x, then on to t/y.
    let grown: Vec<u8> = (0..30_000u32).map(|i| (i % 241) as u8).collect();
    std::fs::write(p("s/a"), &grown).unwrap();
    let mut late = vec![now(CaptureEvent::Dirty {
        file: a,
        parent: None,
        offset: 0,
        len: grown.len() as u64,
    })];
    for (from, to) in [("s/a", "t/x"), ("t/x", "t/y")] {
        std::fs::rename(p(from), p(to)).unwrap();
        late.push(now(CaptureEvent::Renamed {
            from: arg(&p(from)),
            to: arg(&p(to)),
            flags: 0,
        }));
    }
    let mut late = late.into_iter();
    r.resolve(late.next().unwrap(), &mut out);
    // Not at s/a: deferred; after its patience, s is copied again.
    for d in r.deferred.iter_mut() {
        d.since = monotonic_ns() - TOUCH_PATIENCE_NS - 1;
    }
    r.finish(&mut out);
    for ev in late {
        r.resolve(ev, &mut out);
    }
    r.finish(&mut out);
    let ops = replica.take(&mut r, &out);
    assert_eq!(replica.groups(), [["t/y"]], "{ops:#?}");
    assert!(
        replica.files[replica.names[&b"t/y"[..]]] == grown,
        "t/y holds A's bytes: {ops:#?}"
    );
}

/// A file made as the source runs (reported by the filesystem, handled after its first
/// writes) goes with its bytes in the stream, where its event is: a database's new log
/// then precedes the pages written after its fsync. One past SEND_NEW_UP_TO is compared.
#[test]
fn a_file_made_live_goes_with_its_bytes_and_a_large_one_is_compared() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().canonicalize().unwrap();
    let w = FakeWatch::default();
    let mut r = scanned(&root, &w);
    r.set_namespace_in_filesystem(0, true);
    let dir = id_of(&root);
    std::fs::write(root.join("log"), b"record 1").unwrap();
    let big = vec![7u8; SEND_NEW_UP_TO as usize + 1];
    std::fs::write(root.join("big"), &big).unwrap();
    let mut out = Vec::new();
    for name in ["log", "big"] {
        r.resolve(
            now(CaptureEvent::Entry {
                dir,
                name: name.as_bytes().to_vec(),
                change: doppel_common::event::EntryChange::Made,
            }),
            &mut out,
        );
    }
    let of = |name: &[u8]| -> Vec<&Op> {
        out.iter()
            .map(|o| &o.op)
            .filter(|op| match op {
                Op::CreateFile { path, .. } | Op::Write { path, .. } | Op::Sum { path, .. } => {
                    path.0 == name
                }
                _ => false,
            })
            .collect()
    };
    let log = of(b"log");
    assert!(matches!(log[0], Op::CreateFile { .. }), "{log:?}");
    assert!(
        log.iter()
            .any(|o| matches!(o, Op::Write { data, .. } if data[..] == b"record 1"[..])),
        "{log:?}"
    );
    assert!(!log.iter().any(|o| matches!(o, Op::Sum { .. })), "{log:?}");
    let big = of(b"big");
    assert!(big.iter().any(|o| matches!(o, Op::Sum { .. })), "{big:?}");
    assert!(
        !big.iter().any(|o| matches!(o, Op::Write { .. })),
        "{big:?}"
    );
}

/// A first mirror into replicas that hold nothing: the scan sends a small file's bytes
/// (read once, no comparison to answer), compares a large one, and compares a small one
/// too when the queue has no room for its bytes.
#[test]
fn a_first_mirror_into_an_empty_replica_sends_small_files_while_there_is_room() {
    use std::rc::Rc;
    let d = tempfile::tempdir().unwrap();
    let root = d.path().canonicalize().unwrap();
    std::fs::write(root.join("a"), b"small").unwrap();
    std::fs::write(root.join("b"), vec![1u8; SEND_NEW_UP_TO as usize + 1]).unwrap();
    std::fs::write(root.join("c"), b"no room").unwrap();
    let w = FakeWatch::default();
    let mut r = setup(&root, &w);
    let got: Rc<RefCell<Vec<SetOp>>> = Rc::default();
    let sink = got.clone();
    let notes: Rc<RefCell<Vec<SentWhole>>> = Rc::default();
    let noted = notes.clone();
    r.set_scan_sink(Box::new(move |ops, whole| {
        let base = sink.borrow().len();
        noted
            .borrow_mut()
            .extend(whole.drain(..).map(|n| SentWhole {
                end: base + n.end,
                ..n
            }));
        sink.borrow_mut().append(ops)
    }));
    // Room for the first file's bytes only.
    let mut room_for = 1;
    r.set_scan_room(Box::new(move |_, _| {
        room_for -= 1;
        room_for >= 0
    }));
    r.set_first_copy_sends(0, true);
    let mut out = Vec::new();
    r.scan_all(&mut out);
    let mut ops = got.borrow().clone();
    ops.append(&mut out);
    let kinds = |name: &[u8]| -> Vec<&'static str> {
        ops.iter()
            .filter_map(|o| match &o.op {
                Op::Write { path, .. } if path.0 == name => Some("write"),
                Op::Sum { path, .. } if path.0 == name => Some("sum"),
                _ => None,
            })
            .collect()
    };
    assert_eq!(kinds(b"a"), ["write"], "{ops:?}");
    assert!(kinds(b"b").iter().all(|k| *k == "sum"), "{:?}", kinds(b"b"));
    assert_eq!(kinds(b"c"), ["sum"]);
    // The file sent whole is noted, after its last op (its attributes).
    let notes = notes.borrow().clone();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_eq!(notes[0].file, id_of(&root.join("a")));
    assert_eq!(notes[0].bytes, 5);
    assert!(matches!(&ops[notes[0].end - 1].op, Op::SetAttr { path, .. } if path.0 == b"a"));
    // Later scans compare: the replica may hold the files by then.
    got.borrow_mut().clear();
    r.scan_all(&mut out);
    let again = got.borrow();
    assert!(
        !again.iter().any(|o| matches!(o.op, Op::Write { .. })),
        "{again:?}"
    );
}
