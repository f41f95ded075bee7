//! The page cache state of a source file, as far as shared mappings need it: writing
//! dirty pages back, and asking which pages are dirty now (see `mapped.rs` for why).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::warn;

/// Writes back `[offset, offset + len)` of the file (`len` 0: to the end) and waits for
/// it. A page left dirty would not report later stores through a shared mapping of the
/// file (see mapped.rs), so a file about to be read whole (scanned, moved into a set,
/// just mapped) is made clean first: its stores from here on are reported, and those
/// before are in what is read next.
pub fn write_back(f: &File, abs: &Path, offset: u64, len: u64) {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: plain syscall on an fd we own.
    let r = unsafe { libc::sync_file_range(f.as_raw_fd(), offset as i64, len as i64, flags) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        warn!(path = %abs.display(), "cannot write back dirty pages ({e}); stores through a shared mapping into pages written just before may reach the replica late");
    }
}

/// `cachestat(2)`'s number on every architecture (new system calls share one table).
const SYS_CACHESTAT: libc::c_long = 451;

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Set once `cachestat(2)` turned out to be missing or refused.
static UNAVAILABLE: AtomicBool = AtomicBool::new(false);

/// How many pages of `[offset, offset + len)` are dirty in the page cache now, or `None`
/// when the kernel cannot say (`cachestat(2)` came with Linux 6.5; a warning is logged
/// the first time).
pub fn dirty_pages(f: &File, abs: &Path, offset: u64, len: u64) -> Option<u64> {
    if UNAVAILABLE.load(Ordering::Relaxed) {
        return None;
    }
    let range = CachestatRange { off: offset, len };
    let mut stat = Cachestat::default();
    // SAFETY: both structs are repr(C) as the kernel defines them and outlive the call.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            f.as_raw_fd(),
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0u32,
        )
    };
    if r == 0 {
        return Some(stat.nr_dirty);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::EOPNOTSUPP) => {
            if !UNAVAILABLE.swap(true, Ordering::Relaxed) {
                warn!("the kernel cannot tell which pages are dirty (cachestat: {e}; Linux 6.5 or later has it): pages stored to through a shared mapping are forgotten after any writeback of their file, so a store into a page that a partial writeback left dirty can reach the replica late, at the next whole-file check");
            }
        }
        _ => warn!(path = %abs.display(), "cannot ask which pages are dirty: {e}"),
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn dirty_pages_are_counted_until_written_back() {
        let dir = tempfile::tempdir().unwrap();
        // tmpfs has nothing to write back to.
        let tmpfs = 0x0102_1994;
        if rustix::fs::statfs(dir.path()).unwrap().f_type as u64 == tmpfs {
            return;
        }
        let path = dir.path().join("f");
        let mut f = File::create(&path).unwrap();
        f.write_all(&vec![7u8; 3 * 4096]).unwrap();
        let r = File::open(&path).unwrap();
        let Some(n) = dirty_pages(&r, &path, 0, 0) else {
            return; // a kernel before 6.5: nothing to check
        };
        assert_eq!(n, 3, "three pages written, none written back");
        write_back(&r, &path, 0, 4096);
        assert_eq!(dirty_pages(&r, &path, 0, 4096), Some(0));
        // (Pages are written back a folio at a time, and a folio may hold several.)
        write_back(&r, &path, 0, 0);
        assert_eq!(dirty_pages(&r, &path, 0, 0), Some(0));
    }
}
