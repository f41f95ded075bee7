//! End-to-end tests against the running kernel: they load the real program, watch a
//! temporary directory and make changes from child processes (the test process itself
//! is the "agent" and therefore ignored). They need root; as another user they skip.
//!
//! Run: `cargo test -p doppel-agent capture` (as root).

use std::{
    os::unix::fs::MetadataExt,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use super::*;
use doppel_common::event::PathArg;

pub(super) fn fid(path: &Path) -> FileId {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    FileId {
        dev: m.dev(),
        ino: m.ino(),
    }
}

fn start() -> Option<(Capture, mpsc::Receiver<CaptureBatch>)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: loading eBPF programs needs root");
        return None;
    }
    let opts = CaptureOptions {
        ring_bytes: 8 << 20,
        ..Default::default()
    };
    Some(Capture::start(opts).expect("Capture::start"))
}

/// Runs a python3 snippet in `cwd` as a child process and waits for it.
pub(super) fn py(cwd: &Path, code: &str) {
    let status = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(format!("import os\n{code}"))
        .current_dir(cwd)
        .status()
        .expect("run python3");
    assert!(status.success(), "python3 snippet failed: {code}");
}

/// Collects events until `done` says so (or 5 s pass), keeping only those `keep` accepts.
fn collect(
    rx: &mut mpsc::Receiver<CaptureBatch>,
    keep: impl Fn(&CaptureEvent) -> bool,
    done: impl Fn(&[CaptureEvent]) -> bool,
) -> Vec<CaptureEvent> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while !done(&got) && Instant::now() < deadline {
        match rx.try_recv() {
            Ok(batch) => got.extend(batch.into_iter().map(|c| c.event).filter(|e| keep(e))),
            Err(mpsc::error::TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(2)),
            Err(mpsc::error::TryRecvError::Disconnected) => break,
        }
    }
    got
}

fn event_file(e: &CaptureEvent) -> Option<FileId> {
    match e {
        CaptureEvent::Data { file, .. } | CaptureEvent::Dirty { file, .. } => Some(*file),
        CaptureEvent::Created { file, .. } | CaptureEvent::Truncated { file, .. } => *file,
        _ => None,
    }
}

/// Events whose file or path base is one of `dirs` (or a file inside them).
fn in_dirs(dirs: Vec<FileId>) -> impl Fn(&CaptureEvent) -> bool {
    move |e| {
        let parent_ok = |p: &Option<FileId>| p.map(|p| dirs.contains(&p)).unwrap_or(false);
        let base_ok = |a: &PathArg| a.base.map(|b| dirs.contains(&b)).unwrap_or(false);
        match e {
            CaptureEvent::Data { parent, .. } => dirs.contains(parent),
            CaptureEvent::Dirty { parent, .. } => parent_ok(parent),
            CaptureEvent::Created { parent, path, .. } => parent_ok(parent) || base_ok(path),
            CaptureEvent::Truncated { parent, path, .. } => {
                parent_ok(parent) || path.as_ref().map(base_ok).unwrap_or(false)
            }
            CaptureEvent::Removed { path, .. } => base_ok(path),
            CaptureEvent::Renamed { from, to, .. } | CaptureEvent::Linked { from, to } => {
                base_ok(from) || base_ok(to)
            }
            CaptureEvent::Made { path } => base_ok(path),
            CaptureEvent::AttrChanged { parent, path, .. } => {
                parent_ok(parent) || path.as_ref().map(base_ok).unwrap_or(false)
            }
            CaptureEvent::Resized { parent, .. } => parent_ok(parent),
            CaptureEvent::Touched { .. } | CaptureEvent::Synced { .. } => false,
            CaptureEvent::Entry { dir, .. } => dirs.contains(dir),
            CaptureEvent::Moved {
                from_dir, to_dir, ..
            } => dirs.contains(from_dir) || dirs.contains(to_dir),
            CaptureEvent::Fallocated { parent, .. }
            | CaptureEvent::MapDirty { parent, .. }
            | CaptureEvent::Remapped { parent, .. }
            | CaptureEvent::Mapped { parent, .. } => dirs.contains(parent),
            // Carries no directory: the tests that want it look for it by file.
            CaptureEvent::Writeback { .. } => false,
            CaptureEvent::Lost { .. } => true,
        }
    }
}

fn data_of(events: &[CaptureEvent], file: FileId) -> Vec<(u64, Vec<u8>)> {
    events
        .iter()
        .filter_map(|e| match e {
            CaptureEvent::Data {
                file: f,
                offset,
                data,
                ..
            } if *f == file => Some((*offset, data.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn capture_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Capture>();
}

#[test]
fn capture_data_writes_with_offsets() {
    let Some((cap, mut rx)) = start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = fid(dir.path());
    cap.watch_dir(d, WatchMode::Contents).unwrap();
    // Made by the test process (ignored), so only the child's appends show up.
    std::fs::write(dir.path().join("log"), b"0123456789").unwrap();

    py(
        dir.path(),
        r#"
fd = os.open('f', os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
os.write(fd, b'hello')
os.write(fd, b'world')
os.pwrite(fd, b'XY', 100)
os.close(fd)
fd = os.open('log', os.O_WRONLY | os.O_APPEND)
os.lseek(fd, 0, os.SEEK_SET)
os.write(fd, b'abc')
os.pwrite(fd, b'def', 0)   # Linux appends anyway
os.close(fd)
fd = os.open('big', os.O_WRONLY | os.O_CREAT, 0o600)
os.write(fd, bytes(range(256)) * 40)           # 10240 bytes: 3 chunks
os.write(fd, b'z' * (64 * 1024 + 1))           # over the inline cap: Dirty
os.close(fd)
fd = os.open('vec', os.O_WRONLY | os.O_CREAT, 0o600)
os.writev(fd, [b'ab', b'cd'])                  # vectored writes: Dirty ranges
os.pwritev(fd, [b'x'], 50)
os.close(fd)
"#,
    );
    let f = fid(&dir.path().join("f"));
    let log = fid(&dir.path().join("log"));
    let big = fid(&dir.path().join("big"));
    let vec = fid(&dir.path().join("vec"));
    let last = CaptureEvent::Dirty {
        file: vec,
        parent: Some(d),
        offset: 50,
        len: 1,
    };
    let events = collect(&mut rx, in_dirs(vec![d]), |got| got.contains(&last));
    assert!(events.contains(&CaptureEvent::Dirty {
        file: vec,
        parent: Some(d),
        offset: 0,
        len: 4
    }));

    assert_eq!(
        data_of(&events, f),
        vec![
            (0, b"hello".to_vec()),
            (5, b"world".to_vec()),
            (100, b"XY".to_vec())
        ],
        "{events:#?}"
    );
    assert_eq!(
        data_of(&events, log),
        vec![(10, b"abc".to_vec()), (13, b"def".to_vec())]
    );
    let chunks = data_of(&events, big);
    let expect: Vec<u8> = (0..=255u8).cycle().take(10240).collect();
    assert_eq!(
        chunks
            .iter()
            .map(|(o, d)| (*o, d.len()))
            .collect::<Vec<_>>(),
        vec![(0, 4096), (4096, 4096), (8192, 2048)]
    );
    assert_eq!(chunks.concat_data(), expect);
    assert!(events.contains(&CaptureEvent::Dirty {
        file: big,
        parent: Some(d),
        offset: 10240,
        len: 64 * 1024 + 1
    }));

    // The creating, truncating open of f: Created with its path relative to the cwd.
    let created = events
        .iter()
        .find_map(|e| match e {
            CaptureEvent::Created {
                file: Some(file),
                parent,
                path,
                is_dir: false,
                mode,
            } if *file == f => Some((*parent, path.clone(), *mode)),
            _ => None,
        })
        .expect("Created for f");
    assert_eq!(created.0, Some(d));
    assert_eq!(created.1.path, b"f");
    assert_eq!(created.1.base, Some(d));
    assert_eq!(created.1.dirfd, -100);
    assert_eq!(created.2, 0o640);
    assert!(events.contains(&CaptureEvent::Truncated {
        file: Some(f),
        parent: Some(d),
        path: None,
        size: 0
    }));

    let st = cap.stats();
    assert!(
        st.events >= 8 && st.data_bytes >= 10 + 2 + 6 + 10240,
        "{st:?}"
    );
}

trait ConcatData {
    fn concat_data(&self) -> Vec<u8>;
}
impl ConcatData for Vec<(u64, Vec<u8>)> {
    fn concat_data(&self) -> Vec<u8> {
        self.iter().flat_map(|(_, d)| d.clone()).collect()
    }
}

#[test]
fn capture_namespace_operations() {
    let Some((cap, mut rx)) = start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = fid(dir.path());
    cap.watch_dir(d, WatchMode::Contents).unwrap();
    let abs = dir.path().join("abs").to_str().unwrap().to_owned();

    py(
        dir.path(),
        &format!(
            r#"
os.mkdir('sub', 0o750)
open('a', 'w').close()
os.rename('a', 'b')
os.truncate('b', 7)
fd = os.open('b', os.O_WRONLY)
os.ftruncate(fd, 3)
os.close(fd)
dfd = os.open('.', os.O_RDONLY | os.O_DIRECTORY)
os.unlink('b', dir_fd=dfd)
os.close(dfd)
os.rmdir('sub')
os.mkdir('{abs}')
os.rmdir('{abs}')
os.mkdir('marker')
"#
        ),
    );
    let keep = {
        let abs = abs.clone();
        let in_d = in_dirs(vec![d]);
        move |e: &CaptureEvent| {
            in_d(e)
                || matches!(e, CaptureEvent::Created { path, .. } | CaptureEvent::Removed { path, .. }
                    if path.path == abs.as_bytes())
        }
    };
    let events = collect(&mut rx, keep, |got| {
        got.iter()
            .any(|e| matches!(e, CaptureEvent::Created { path, .. } if path.path == b"marker"))
    });
    let rel = |p: &[u8], dirfd: i32| PathArg {
        base: Some(d),
        pid: 0,
        dirfd,
        path: p.to_vec(),
        truncated: false,
    };
    // pids differ per child: compare with the pid blanked.
    let norm: Vec<CaptureEvent> = events
        .iter()
        .cloned()
        .map(|e| {
            let z = |mut a: PathArg| {
                a.pid = 0;
                a
            };
            match e {
                CaptureEvent::Created {
                    file,
                    parent,
                    path,
                    is_dir,
                    mode,
                } => CaptureEvent::Created {
                    file,
                    parent,
                    path: z(path),
                    is_dir,
                    mode,
                },
                CaptureEvent::Removed { path, is_dir } => CaptureEvent::Removed {
                    path: z(path),
                    is_dir,
                },
                CaptureEvent::Renamed { from, to, flags } => CaptureEvent::Renamed {
                    from: z(from),
                    to: z(to),
                    flags,
                },
                CaptureEvent::Truncated {
                    file,
                    parent,
                    path,
                    size,
                } => CaptureEvent::Truncated {
                    file,
                    parent,
                    path: path.map(z),
                    size,
                },
                other => other,
            }
        })
        .collect();
    let pos = |want: &CaptureEvent| {
        norm.iter()
            .position(|e| e == want)
            .unwrap_or_else(|| panic!("missing {want:#?} in {norm:#?}"))
    };
    let mkdir = pos(&CaptureEvent::Created {
        file: None,
        parent: None,
        path: rel(b"sub", -100),
        is_dir: true,
        mode: 0o750,
    });
    let rename = pos(&CaptureEvent::Renamed {
        from: rel(b"a", -100),
        to: rel(b"b", -100),
        flags: 0,
    });
    let truncate = pos(&CaptureEvent::Truncated {
        file: None,
        parent: None,
        path: Some(rel(b"b", -100)),
        size: 7,
    });
    let ftruncate = norm
        .iter()
        .position(|e| {
            matches!(e, CaptureEvent::Truncated { file: Some(_), parent: Some(p), path: None, size: 3 } if *p == d)
        })
        .expect("ftruncate");
    let unlink = norm
        .iter()
        .position(|e| {
            matches!(e, CaptureEvent::Removed { path, is_dir: false }
                if path.path == b"b" && path.base == Some(d) && path.dirfd >= 0)
        })
        .expect("unlinkat with a dirfd");
    let rmdir = pos(&CaptureEvent::Removed {
        path: rel(b"sub", -100),
        is_dir: true,
    });
    let abs_arg = PathArg {
        base: None,
        pid: 0,
        dirfd: -100,
        path: abs.as_bytes().to_vec(),
        truncated: false,
    };
    let abs_mkdir = pos(&CaptureEvent::Created {
        file: None,
        parent: None,
        path: abs_arg.clone(),
        is_dir: true,
        mode: 0o777,
    });
    let abs_rmdir = pos(&CaptureEvent::Removed {
        path: abs_arg,
        is_dir: true,
    });
    let order = [
        mkdir, rename, truncate, ftruncate, unlink, rmdir, abs_mkdir, abs_rmdir,
    ];
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "out of order: {order:?} {norm:#?}"
    );
}

#[test]
fn capture_ignores_unwatched_dirs_and_own_pid() {
    let Some((cap, mut rx)) = start() else { return };
    let watched = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let w = fid(watched.path());
    let o = fid(other.path());
    cap.watch_dir(w, WatchMode::Contents).unwrap();
    // An ancestor-only watch does not capture file contents either.
    let anc = tempfile::tempdir().unwrap();
    let a = fid(anc.path());
    cap.watch_dir(a, WatchMode::Ancestor).unwrap();

    // The test process is the "agent": its own writes are ignored.
    std::fs::write(watched.path().join("own"), b"mine").unwrap();
    py(
        other.path(),
        "open('x', 'w').write('not watched')\nos.mkdir('d')\nos.rmdir('d')",
    );
    py(
        anc.path(),
        "open('y', 'w').write('ancestor only')\nos.mkdir('d')",
    );
    // Unwatching stops capture.
    let gone = tempfile::tempdir().unwrap();
    let g = fid(gone.path());
    cap.watch_dir(g, WatchMode::Contents).unwrap();
    cap.unwatch_dir(g).unwrap();
    cap.unwatch_dir(g).unwrap(); // idempotent
    py(gone.path(), "open('z', 'w').write('unwatched')");
    py(watched.path(), "open('marker', 'w').write('m')");

    let marker = |e: &CaptureEvent| matches!(e, CaptureEvent::Data { data, .. } if data == b"m");
    let events = collect(&mut rx, in_dirs(vec![w, o, a, g]), |got| {
        got.iter().any(marker)
    });
    assert!(
        events.iter().any(marker),
        "marker write not seen: {events:#?}"
    );
    let stray: Vec<_> = events
        .iter()
        .filter(|e| {
            event_file(e).is_some_and(|f| f == fid(&watched.path().join("own")))
                || in_dirs(vec![o, g])(e)
        })
        .collect();
    assert!(stray.is_empty(), "unexpected events: {stray:#?}");
    // Ancestor: only the relative path operation (mkdir) comes through.
    let from_anc: Vec<_> = events.iter().filter(|e| in_dirs(vec![a])(e)).collect();
    assert_eq!(from_anc.len(), 1, "{from_anc:#?}");
    assert!(matches!(
        from_anc[0],
        CaptureEvent::Created { is_dir: true, .. }
    ));

    // ignore_pid: a child whose pid is ignored is invisible.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("read _; printf ignored > ign")
        .current_dir(watched.path())
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    cap.ignore_pid(child.id()).unwrap();
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    assert!(child.wait().unwrap().success());
    py(watched.path(), "open('marker2', 'w').write('m2')");
    let marker2 = |e: &CaptureEvent| matches!(e, CaptureEvent::Data { data, .. } if data == b"m2");
    let events = collect(&mut rx, in_dirs(vec![w]), |got| got.iter().any(marker2));
    assert!(events.iter().any(marker2));
    let ign = fid(&watched.path().join("ign"));
    assert!(
        !events.iter().any(|e| event_file(e) == Some(ign)),
        "ignored pid captured: {events:#?}"
    );
}

#[test]
fn capture_full_ring_becomes_missed_ranges() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    // The smallest ring (one page): a burst of writes cannot fit, so ranges are missed
    // and come back as Dirty events (parent unknown) instead of vanishing.
    let (cap, mut rx) = Capture::start(CaptureOptions {
        ring_bytes: 4096,
        ..Default::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = fid(dir.path());
    cap.watch_dir(d, WatchMode::Contents).unwrap();
    cap.pause_ring_reading(true);
    py(
        dir.path(),
        // Small writes first so that even small records no longer fit, then big ones.
        "fd = os.open('burst', os.O_WRONLY | os.O_CREAT)\n\
         for i in range(200): os.write(fd, b'p')\n\
         for i in range(64): os.write(fd, b'q' * 4000)\n\
         os.mkdir('m')",
    );
    cap.pause_ring_reading(false);
    let burst = fid(&dir.path().join("burst"));
    const TOTAL: u64 = 200 + 64 * 4000;
    let events = collect(
        &mut rx,
        |e| event_file(e) == Some(burst) || matches!(e, CaptureEvent::Lost { .. }),
        |got| {
            if !got.iter().any(|e| matches!(e, CaptureEvent::Lost { .. })) {
                return false;
            }
            // Done when every byte of the 256000 is covered by Data or Dirty.
            let mut covered = vec![false; TOTAL as usize];
            for e in got {
                let (off, len) = match e {
                    CaptureEvent::Data { offset, data, .. } => (*offset, data.len() as u64),
                    CaptureEvent::Dirty { offset, len, .. } => (*offset, *len),
                    _ => continue,
                };
                for i in off..(off + len).min(covered.len() as u64) {
                    covered[i as usize] = true;
                }
            }
            covered.iter().all(|c| *c)
        },
    );
    let st = cap.stats();
    assert!(st.missed_ranges > 0, "ring never filled? {st:?}");
    // The mkdir could not be remembered as a range: reported as lost.
    assert!(st.lost >= 1, "{st:?}");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, CaptureEvent::Lost { records } if *records >= 1)),
        "no Lost event"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, CaptureEvent::Dirty { parent: None, .. })),
        "no Dirty from the missed-range map: {events:#?}"
    );
    let total: u64 = events
        .iter()
        .map(|e| match e {
            CaptureEvent::Data { data, .. } => data.len() as u64,
            CaptureEvent::Dirty { len, .. } => *len,
            _ => 0,
        })
        .sum();
    assert!(total >= TOTAL, "not every byte accounted for: {total}");
}

/// Rough overhead figures (not a pass/fail benchmark): 4 KiB sequential writes with fio
/// into the page cache, without capture, with capture in an unwatched directory, and in
/// a watched one. `cargo test -p doppel-agent capture_overhead -- --ignored --nocapture`
#[test]
#[ignore]
fn capture_overhead() {
    let fio = |dir: &Path| -> f64 {
        let out = Command::new("fio")
            .args([
                "--name=w",
                "--rw=write",
                "--bs=4k",
                "--size=512m",
                "--ioengine=sync",
                "--runtime=4",
                "--time_based",
                "--output-format=terse",
                "--terse-version=3",
            ])
            .current_dir(dir)
            .output()
            .expect("fio");
        let text = String::from_utf8_lossy(&out.stdout);
        // terse v3: field 49 (1-based) is write IOPS.
        text.split(';')
            .nth(48)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    // DOPPEL_BENCH_DIR=/dev/shm measures against tmpfs (no writeback noise).
    let root = std::env::var("DOPPEL_BENCH_DIR").unwrap_or_else(|_| "/tmp".into());
    // Every run writes a fresh file (first-touch page allocation costs the same each time).
    let plain = tempfile::tempdir_in(&root).unwrap();
    let run_in = |name: &str| {
        let d = plain.path().join(name);
        std::fs::create_dir(&d).unwrap();
        fio(&d)
    };
    let base = run_in("base");
    let (cap, mut rx) = Capture::start(CaptureOptions::default()).unwrap();
    let drain = std::thread::spawn(move || {
        let mut n = 0usize;
        while let Some(b) = rx.blocking_recv() {
            n += b.len();
        }
        n
    });
    let unwatched = run_in("unwatched");
    let w = plain.path().join("watched");
    std::fs::create_dir(&w).unwrap();
    cap.watch_dir(fid(&w), WatchMode::Contents).unwrap();
    let watched = fio(&w);
    let st = cap.stats();
    drop(cap);
    let events = drain.join().unwrap();
    eprintln!(
        "4k write IOPS: no capture {base:.0}, unwatched {unwatched:.0} ({:+.1}%), watched \
         {watched:.0} ({:+.1}%); {events} events delivered; {st:?}",
        (unwatched / base - 1.0) * 100.0,
        (watched / base - 1.0) * 100.0
    );
}

/// An attribute change through `/proc/self/fd/N` (tar's way: `chmod` of an `O_PATH`
/// descriptor it closes right after) names the descriptor's file itself, found while
/// the call returns; user space could only guess it from `/proc` later. With more
/// path after the number, the path goes on from the descriptor's directory.
#[test]
fn capture_attr_changes_through_proc_self_fd() {
    let Some((cap, mut rx)) = start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = fid(dir.path());
    cap.watch_dir(d, WatchMode::Contents).unwrap();
    let pipe = dir.path().join("pipe");
    let c = std::ffi::CString::new(pipe.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let pipe = fid(&pipe);
    py(
        dir.path(),
        r#"
fd = os.open('pipe', os.O_PATH | os.O_NOFOLLOW)
os.chmod(f'/proc/self/fd/{fd}', 0o640)
os.close(fd)
dfd = os.open('.', os.O_PATH | os.O_DIRECTORY)
os.chmod(f'/proc/thread-self/fd/{dfd}/./pipe', 0o600)
os.close(dfd)
os.mkdir('marker')
"#,
    );
    let events = collect(&mut rx, in_dirs(vec![d]), |got| {
        got.iter()
            .any(|e| matches!(e, CaptureEvent::Created { path, .. } if path.path == b"marker"))
    });
    assert!(
        events.iter().any(|e| matches!(e,
            CaptureEvent::AttrChanged { file: Some(f), parent: Some(p), path: None, .. }
                if *f == pipe && *p == d)),
        "no fd-based change of the pipe in {events:#?}"
    );
    assert!(
        events.iter().any(|e| matches!(e,
            CaptureEvent::AttrChanged { file: None, path: Some(a), .. }
                if a.path == b"./pipe" && a.base == Some(d) && a.dirfd >= 0)),
        "no change of ./pipe relative to the descriptor's directory in {events:#?}"
    );
}

#[test]
fn a_loss_is_reported_only_after_what_the_ring_held_when_it_was_seen() {
    let mut m = LostMarker::new(4096);
    assert_eq!(m.due(), None, "nothing lost, nothing to report");
    m.counted(0);
    assert_eq!(m.due(), None, "a counter that did not move is no loss");
    m.counted(3);
    assert_eq!(m.due(), None, "the ring may still hold older records");
    // 4096 bytes of ring: 62 records of 56 bytes (64 with the header) are 3968 bytes.
    for _ in 0..62 {
        m.consumed(56);
    }
    assert_eq!(m.due(), None, "128 bytes of the ring may still be older");
    m.consumed(60); // 68 -> 72 bytes with header and rounding
    assert_eq!(m.due(), None);
    m.consumed(50); // 58 -> 64: a whole ring's worth read since
    assert_eq!(m.due(), Some(3));
    assert_eq!(m.due(), None, "reported once");

    // An empty ring holds nothing older: due at once, and losses seen meanwhile add up.
    m.counted(5);
    m.counted(10);
    m.consumed(8);
    assert_eq!(m.due(), None);
    m.ring_empty();
    assert_eq!(m.due(), Some(7));
}

/// With nothing captured, the reader still says how far the capture is complete, in
/// batches of their own: what waits on that clock (reads the mirror made, overlap.rs)
/// would otherwise be kept until the next write.
#[test]
fn the_capture_clock_moves_on_with_nothing_captured() {
    let Some((_cap, mut rx)) = start() else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    while seen.len() < 3 && Instant::now() < deadline {
        match rx.try_recv() {
            Ok(b) if b.is_empty() => seen.push(b.complete_before),
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    assert!(seen.len() >= 3, "empty batches: {seen:?}");
    assert!(seen.windows(2).all(|w| w[1] > w[0]), "{seen:?}");
    assert!(seen[0] > 0, "{seen:?}");
}
