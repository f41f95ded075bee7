//! The filesystem programs (ebpf/src/fs.rs) against the running kernel: writes that
//! never pass the syscalls the `sys_exit` program decodes (Linux AIO, 32-bit syscalls)
//! are reported, for marked inodes only. Root and an ext4 temporary directory needed;
//! otherwise the test says why and skips.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use super::tests::fid;
use super::*;

/// Python helpers run in a child process (the test process is the "agent", ignored):
/// `aio_write` through `io_submit` (buffered or O_DIRECT) and `write32` through the
/// 32-bit `int 0x80` entry (see the file).
pub const WRITERS_PY: &str = include_str!("../../../tests/py/writers.py");

/// Runs `code` after the writers in a child process.
fn py(cwd: &Path, code: &str) {
    super::tests::py(cwd, &format!("{WRITERS_PY}\n{code}"));
}

/// Collects events into `seen` until `done` says so or 5 s passed.
fn dirty_of(
    rx: &mut mpsc::Receiver<CaptureBatch>,
    seen: &mut Vec<CaptureEvent>,
    done: impl Fn(&[CaptureEvent]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done(seen) && Instant::now() < deadline {
        match rx.try_recv() {
            Ok(batch) => seen.extend(batch.into_iter().map(|c| c.event)),
            Err(mpsc::error::TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(2)),
            Err(mpsc::error::TryRecvError::Disconnected) => break,
        }
    }
}

fn data(events: &[CaptureEvent], f: FileId) -> Vec<(u64, Vec<u8>)> {
    events
        .iter()
        .filter_map(|e| match e {
            CaptureEvent::Data {
                file, offset, data, ..
            } if *file == f => Some((*offset, data.clone())),
            _ => None,
        })
        .collect()
}

fn dirty(events: &[CaptureEvent], f: FileId) -> Vec<(u64, u64)> {
    events
        .iter()
        .filter_map(|e| match e {
            CaptureEvent::Dirty {
                file, offset, len, ..
            } if *file == f => Some((*offset, *len)),
            _ => None,
        })
        .collect()
}

#[test]
fn aio_and_32bit_writes_to_marked_files_are_captured_inside_the_filesystem() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: loading eBPF programs needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let Some(fs) = marks::marked_fs(dir.path()).unwrap() else {
        eprintln!("skipping: {} is not on ext4", dir.path().display());
        return;
    };
    let (cap, mut rx) = Capture::start(CaptureOptions {
        ring_bytes: 8 << 20,
        mark_filesystems: vec![fs],
        ..Default::default()
    })
    .expect("Capture::start");
    assert!(
        cap.in_filesystem(fs.dev),
        "filesystem programs not attached: {:?}",
        cap.filesystem_capture_problem()
    );
    let d = fid(dir.path());
    cap.mark(d);
    cap.watch_dir(d, WatchMode::Contents).unwrap();
    for name in ["aio", "direct", "compat", "plain", "sync-direct"] {
        std::fs::write(dir.path().join(name), vec![0u8; 8192]).unwrap();
        cap.mark(fid(&dir.path().join(name)));
    }
    std::fs::write(other.path().join("aio"), vec![0u8; 8192]).unwrap();

    py(
        dir.path(),
        "aio_write('aio', 4096, b'A' * 4096)\n\
         aio_write('direct', 0, b'D' * 4096, direct=True)\n\
         write32('compat', 100, b'compat32')\n\
         aio_write('fresh', 0, b'F' * 512, create=True)\n\
         os.pwrite(os.open('plain', os.O_WRONLY), b'plain', 10)\n\
         b = mmap.mmap(-1, 4096)\n\
         b.write(b'S' * 4096)\n\
         os.pwritev(os.open('sync-direct', os.O_WRONLY | os.O_DIRECT), [b], 4096)",
    );
    py(other.path(), "aio_write('aio', 0, b'U' * 4096)");

    let [aio, direct, compat, fresh, plain, sync_direct] =
        ["aio", "direct", "compat", "fresh", "plain", "sync-direct"]
            .map(|n| fid(&dir.path().join(n)));
    let mut seen = Vec::new();
    dirty_of(&mut rx, &mut seen, |s| {
        [aio, compat, fresh, plain, sync_direct]
            .iter()
            .all(|f| !data(s, *f).is_empty())
            && !(data(s, direct).is_empty() && dirty(s, direct).is_empty())
    });
    // Every write carries its bytes, copied as it happened: from the page cache for
    // buffered writes, from the caller's buffer for direct ones that complete in the
    // caller (single-buffer `pwritev` is a direct write of one plain buffer).
    assert_eq!(
        data(&seen, aio),
        vec![(4096, vec![b'A'; 4096])],
        "{seen:#?}"
    );
    assert_eq!(
        data(&seen, sync_direct),
        vec![(4096, vec![b'S'; 4096])],
        "{seen:#?}"
    );
    // An AIO direct write completes where the caller's memory is not at hand (unless
    // the disk was done before io_submit returned): its range is read back.
    let (d, r) = (data(&seen, direct), dirty(&seen, direct));
    assert!(
        (d == vec![(0, vec![b'D'; 4096])] && r.is_empty())
            || (d.is_empty() && r == vec![(0, 4096)]),
        "{seen:#?}"
    );
    assert_eq!(data(&seen, compat), vec![(100, b"compat32".to_vec())]);
    // Made by the writer in a marked directory: marked by the kernel at allocation.
    assert_eq!(data(&seen, fresh), vec![(0, vec![b'F'; 512])], "{seen:#?}");
    // pwrite(2) on a covered filesystem: reported once, by the filesystem programs.
    assert_eq!(
        data(&seen, plain),
        vec![(10, b"plain".to_vec())],
        "{seen:#?}"
    );
    for f in [aio, compat, fresh, plain, sync_direct] {
        assert!(dirty(&seen, f).is_empty(), "{f:?} also dirty: {seen:#?}");
    }
    let unwatched = fid(&other.path().join("aio"));
    assert!(data(&seen, unwatched).is_empty(), "{seen:#?}");
    assert!(dirty(&seen, unwatched).is_empty(), "{seen:#?}");
}

#[test]
fn a_freed_inode_loses_its_mark() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = marks::marked_fs(dir.path()).unwrap() else {
        return;
    };
    let (cap, _rx) = Capture::start(CaptureOptions {
        ring_bytes: 1 << 20,
        mark_filesystems: vec![fs],
        ..Default::default()
    })
    .expect("Capture::start");
    let d = fid(dir.path());
    cap.mark(d);
    // Made by a child in a marked directory: marked by the kernel; freed: unmarked.
    py(dir.path(), "open('f', 'w').write('x')");
    let f = fid(&dir.path().join("f"));
    let marks = cap.marks.as_ref().unwrap();
    assert!(marks.is_marked(f));
    std::fs::remove_file(dir.path().join("f")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while marks.is_marked(f) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!marks.is_marked(f), "the freed inode {f:?} is still marked");
    assert!(marks.is_marked(d));
}
