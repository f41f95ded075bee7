//! Real files, real mappings, real SIGBUS: a file that shrinks under a reader spoils the
//! read instead of killing the process, and any other SIGBUS still ends it.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use doppel_mapread::{Error, Reader, MIN_MAPPED, WINDOW};

fn file_of(len: usize) -> (File, Vec<u8>) {
    let mut f = tempfile::tempfile().unwrap();
    let data: Vec<u8> = (0..len as u64).map(|i| (i * 7 % 253) as u8 + 1).collect();
    f.write_all(&data).unwrap();
    (f, data)
}

#[test]
fn reads_what_pread_reads_at_any_offset() {
    let (f, data) = file_of(2 * WINDOW + 12_345);
    let mut r = Reader::new(f.as_fd(), MIN_MAPPED);
    for (at, len) in [
        (0u64, 65_536usize),
        (1, 1),
        (4095, 2),
        (WINDOW as u64 - 1000, 5000),
        (2 * WINDOW as u64, 12_345),
        (123, WINDOW),
    ] {
        let mut want = vec![0u8; len];
        f.read_exact_at(&mut want, at).unwrap();
        assert_eq!(
            r.with(at, len, |b| b.to_vec()),
            Ok(want),
            "at {at} len {len}"
        );
        assert_eq!(
            &data[at as usize..at as usize + len],
            r.with(at, len, |b| b.to_vec()).unwrap()
        );
    }
    assert_eq!(r.with(5, 0, |b| b.len()), Ok(0));
}

#[test]
fn a_file_that_shrank_spoils_the_read_and_the_process_lives() {
    let (f, data) = file_of(8 << 20);
    let mut r = Reader::new(f.as_fd(), MIN_MAPPED);
    // Map the first window, then cut the file to 1 MiB under it.
    assert_eq!(r.with(0, 4096, |b| b[0]), Ok(data[0]));
    f.set_len(1 << 20).unwrap();
    let before = doppel_mapread::spoiled_reads();
    let past = r.with(2 << 20, 65_536, |b| {
        b.iter().map(|&x| x as u64).sum::<u64>()
    });
    assert_eq!(past, Err(Error::Shrank));
    assert!(doppel_mapread::spoiled_reads() > before);
    // A range that straddles the new end is spoiled too, even though part of it is there.
    assert_eq!(
        r.with((1 << 20) - 10, 20, |b| b.to_vec()),
        Err(Error::Shrank)
    );
    // What is still there reads as before.
    assert_eq!(r.with(100, 10, |b| b.to_vec()), Ok(data[100..110].to_vec()));
}

#[test]
fn shrinking_files_on_many_threads_spoil_only_their_own_reads() {
    let handles: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                let (f, data) = file_of(6 << 20);
                let mut r = Reader::new(f.as_fd(), MIN_MAPPED);
                for round in 0..20u64 {
                    let keep = (1 << 20) + round * 4096;
                    f.set_len(6 << 20).unwrap();
                    f.write_all_at(&data[keep as usize..], keep).unwrap();
                    assert_eq!(r.with(0, 1000, |b| b.to_vec()), Ok(data[..1000].to_vec()));
                    f.set_len(keep).unwrap();
                    let got = r.with(keep + 4096 * (i + 1), 8192, |b| b[0]);
                    assert_eq!(got, Err(Error::Shrank), "thread {i} round {round}");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// A SIGBUS this crate did not cause (a mapping of its own, touched past the end of its
/// file) still ends the process: the handler must not swallow real faults.
#[test]
fn any_other_sigbus_still_ends_the_process() {
    let (f, _) = file_of(1 << 20);
    // The handler is installed by the first reader.
    let mut r = Reader::new(f.as_fd(), MIN_MAPPED);
    r.with(0, 1, |_| ()).unwrap();
    let other = tempfile::tempfile().unwrap();
    other.set_len(1 << 20).unwrap();
    // SAFETY: a fresh private mapping of a file of ours, touched only in the child.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            1 << 20,
            libc::PROT_READ,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&other),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    other.set_len(0).unwrap();
    // SAFETY: the child only touches memory and exits; no locks, no allocation.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: a read of a page past the end of the file: SIGBUS.
        unsafe {
            std::ptr::read_volatile((p as *const u8).add(8192));
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGBUS,
        "the child was not killed by SIGBUS (status {status:#x})"
    );
    // SAFETY: our mapping, no longer used.
    unsafe { libc::munmap(p, 1 << 20) };
}

#[test]
fn too_little_to_read_is_left_to_pread() {
    let (f, _) = file_of(4096);
    let mut r = Reader::new(f.as_fd(), MIN_MAPPED - 1);
    assert_eq!(r.with(0, 10, |b| b.len()), Err(Error::Unmappable));
}
