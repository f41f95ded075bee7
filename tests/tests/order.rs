//! Write order on the replica: a writer appends record n to a log (file A), fdatasyncs
//! it, then writes record n into a data file (B), as a database does with its log and
//! its pages. A checker samples the replica all along, B first and A after: it must
//! never find a record in B that A does not hold yet. Each way of writing (pwrite,
//! pwritev, io_uring, Linux AIO with O_DIRECT) is checked, and the replica must end
//! identical to the source.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use doppel_tests::cluster::Cluster;
use doppel_tests::require_root;

/// Bytes per record: whole pages, so that O_DIRECT can write one; several, so that a
/// batch of them is worth applying in parallel on the receiver (which a barrier must
/// then keep in order).
const REC: usize = 16 << 10;
const RECORDS: u64 = 300;

/// The record n: its number, then a pattern, so that a torn or stale page shows.
fn record(n: u64) -> Vec<u8> {
    let mut r = vec![0u8; REC];
    r[..8].copy_from_slice(&(n + 1).to_le_bytes());
    for (i, b) in r[8..].iter_mut().enumerate() {
        *b = (n as usize + i) as u8;
    }
    r
}

/// Records present in `path` (a record is there once its number is).
fn records_in(path: &Path) -> u64 {
    let Ok(bytes) = std::fs::read(path) else {
        return 0;
    };
    let mut n = 0;
    for (i, r) in bytes.chunks(REC).enumerate() {
        if r.len() >= 8 && u64::from_le_bytes(r[..8].try_into().unwrap()) == i as u64 + 1 {
            n = i as u64 + 1;
        }
    }
    n
}

/// How a record reaches a file.
#[derive(Clone, Copy, Debug)]
enum Way {
    Pwrite,
    Pwritev,
    IoUring,
    /// Linux native AIO (`io_submit`) on a file opened with O_DIRECT.
    AioDirect,
}

/// An aligned page for O_DIRECT.
#[repr(C, align(4096))]
struct Page([u8; REC]);

fn write_at(
    way: Way,
    f: &std::fs::File,
    data: &[u8],
    off: u64,
    ring: &mut Option<io_uring::IoUring>,
) {
    match way {
        Way::Pwrite => f.write_all_at(data, off).unwrap(),
        Way::Pwritev => {
            let (a, b) = data.split_at(100);
            let iov = [
                libc::iovec {
                    iov_base: a.as_ptr() as *mut _,
                    iov_len: a.len(),
                },
                libc::iovec {
                    iov_base: b.as_ptr() as *mut _,
                    iov_len: b.len(),
                },
            ];
            // SAFETY: two valid iovecs over `data`.
            let r = unsafe { libc::pwritev(f.as_raw_fd(), iov.as_ptr(), 2, off as i64) };
            assert_eq!(r as usize, data.len(), "pwritev");
        }
        Way::IoUring => {
            let ring = ring.get_or_insert_with(|| io_uring::IoUring::new(8).unwrap());
            let e = io_uring::opcode::Write::new(
                io_uring::types::Fd(f.as_raw_fd()),
                data.as_ptr(),
                data.len() as u32,
            )
            .offset(off)
            .build();
            // SAFETY: `data` outlives the request, which is waited for.
            unsafe { ring.submission().push(&e) }.unwrap();
            ring.submit_and_wait(1).unwrap();
            let cqe = ring.completion().next().unwrap();
            assert_eq!(cqe.result() as usize, data.len(), "io_uring write");
        }
        Way::AioDirect => aio_write(f, data, off),
    }
}

/// One `io_submit` of a page at `off`, waited for with `io_getevents`.
fn aio_write(f: &std::fs::File, data: &[u8], off: u64) {
    let mut page = Box::new(Page([0; REC]));
    page.0.copy_from_slice(data);
    let mut ctx: libc::c_ulong = 0;
    // SAFETY: io_setup with an out-pointer; the context is destroyed below.
    let r = unsafe { libc::syscall(libc::SYS_io_setup, 1, &mut ctx) };
    assert_eq!(r, 0, "io_setup: {}", std::io::Error::last_os_error());
    // struct iocb (x86_64): data, key+rw_flags, opcode, reqprio, fildes, buf, nbytes,
    // offset, reserved2, flags, resfd.
    #[repr(C)]
    #[derive(Default)]
    struct Iocb {
        data: u64,
        key: u32,
        rw_flags: i32,
        opcode: u16,
        reqprio: i16,
        fildes: u32,
        buf: u64,
        nbytes: u64,
        offset: i64,
        reserved2: u64,
        flags: u32,
        resfd: u32,
    }
    const IOCB_CMD_PWRITE: u16 = 1;
    let mut cb = Iocb {
        opcode: IOCB_CMD_PWRITE,
        fildes: f.as_raw_fd() as u32,
        buf: page.0.as_ptr() as u64,
        nbytes: REC as u64,
        offset: off as i64,
        ..Iocb::default()
    };
    let mut list = [&mut cb as *mut Iocb];
    // SAFETY: one valid iocb whose buffer outlives the wait below.
    let r = unsafe { libc::syscall(libc::SYS_io_submit, ctx, 1, list.as_mut_ptr()) };
    assert_eq!(r, 1, "io_submit: {}", std::io::Error::last_os_error());
    let mut ev = [0u64; 4];
    // SAFETY: room for one io_event (4 u64).
    let r = unsafe {
        libc::syscall(
            libc::SYS_io_getevents,
            ctx,
            1,
            1,
            ev.as_mut_ptr(),
            std::ptr::null::<libc::timespec>(),
        )
    };
    assert_eq!(r, 1, "io_getevents");
    assert_eq!(ev[2] as usize, REC, "AIO write result");
    // SAFETY: the context made above.
    unsafe { libc::syscall(libc::SYS_io_destroy, ctx) };
}

fn run(way: Way) {
    let mut c = Cluster::new("order").unwrap();
    c.start().unwrap();
    let (sa, sb) = (c.source.join("log"), c.source.join("data"));
    let (ra, rb) = (c.replica.join("log"), c.replica.join("data"));
    let mut opts = std::fs::OpenOptions::new();
    opts.create(true).truncate(true).read(true).write(true);
    if let Way::AioDirect = way {
        opts.custom_flags(libc::O_DIRECT);
    }
    let log = opts.open(&sa).unwrap();
    let data = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&sb)
        .unwrap();
    c.wait_synced(Duration::from_secs(20)).unwrap();

    let done = Arc::new(AtomicBool::new(false));
    let checker = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut samples = 0u64;
            let mut ahead = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let b = records_in(&rb);
                let a = records_in(&ra);
                if b > a {
                    ahead.push((a, b));
                }
                samples += 1;
            }
            (samples, ahead)
        })
    };
    let mut ring = None;
    let start = Instant::now();
    // The receiver is stopped while the records are written: they reach it as a backlog,
    // in batches large enough for it to apply files in parallel, which only the
    // barriers at the log's fdatasyncs keep from reordering.
    let receiver = c.receiver_pid().expect("receiver runs") as i32;
    // SAFETY: a signal to the test's own child.
    unsafe { libc::kill(receiver, libc::SIGSTOP) };
    for n in 0..RECORDS {
        let r = record(n);
        write_at(way, &log, &r, n * REC as u64, &mut ring);
        log.sync_data().unwrap();
        // The data page goes the same way, except after AIO (the page write of a
        // database is its own; a plain pwrite here keeps the case one where the agent
        // can keep the order: the log's bytes are read back, never older).
        let page_way = if let Way::AioDirect = way {
            Way::Pwrite
        } else {
            way
        };
        write_at(page_way, &data, &r, n * REC as u64, &mut ring);
    }
    // SAFETY: as above.
    unsafe { libc::kill(receiver, libc::SIGCONT) };
    eprintln!("{way:?}: {RECORDS} records in {:?}", start.elapsed());
    c.assert_identical(Duration::from_secs(30));
    done.store(true, Ordering::Relaxed);
    let (samples, ahead) = checker.join().unwrap();
    eprintln!("{samples} samples of the replica");
    assert!(samples > 10, "the checker barely ran ({samples} samples)");
    assert!(
        ahead.is_empty(),
        "{way:?}: the data file was ahead of the log on the replica {} times (first: log {} records, data {})",
        ahead.len(),
        ahead[0].0,
        ahead[0].1
    );
}

#[test]
fn log_then_page_with_pwrite() {
    if require_root() {
        run(Way::Pwrite);
    }
}

#[test]
fn log_then_page_with_pwritev() {
    if require_root() {
        run(Way::Pwritev);
    }
}

#[test]
fn log_then_page_with_io_uring() {
    if require_root() {
        run(Way::IoUring);
    }
}

#[test]
fn log_then_page_with_aio_direct() {
    if require_root() {
        run(Way::AioDirect);
    }
}

/// Bytes read back from a file (here: direct writes larger than the capture copies at
/// write time) may be newer than what is queued after them: the set is shown as not
/// crash-consistent until the target caught up with them.
#[test]
fn read_back_bytes_show_the_set_not_crash_consistent_until_caught_up() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new("order").unwrap();
    c.start().unwrap();
    c.wait_synced(Duration::from_secs(20)).unwrap();
    let row = |c: &Cluster| c.status().unwrap()["sets"][0].clone();
    assert_eq!(row(&c)["crash_consistent"], true, "{}", row(&c));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(c.source.join("aio"))
        .unwrap();
    // With the target away, nothing is acknowledged: the flag stays down until it is
    // back and caught up.
    c.kill_receiver();
    #[repr(C, align(4096))]
    struct Big([u8; 128 << 10]);
    let mut big = Box::new(Big([0; 128 << 10]));
    for (i, b) in big.0.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    for n in 0..4u64 {
        f.write_all_at(&big.0, n * big.0.len() as u64).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while row(&c)["crash_consistent"] != false {
        assert!(
            Instant::now() < deadline,
            "read-back bytes never showed: {}",
            row(&c)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    c.start_receiver().unwrap();
    c.wait_synced(Duration::from_secs(20)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while row(&c)["crash_consistent"] != true {
        assert!(
            Instant::now() < deadline,
            "still not crash-consistent: {}",
            row(&c)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    c.assert_identical(Duration::from_secs(20));
}
