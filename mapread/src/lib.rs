//! Reads a file's bytes through a memory mapping instead of `pread`, for checksumming
//! large amounts of data: the bytes are hashed where the page cache holds them instead
//! of being copied out first. Comparing a 1 GiB set block by block spends most of each
//! daemon's CPU on that copy (see the README).
//!
//! The hazard of a mapping is the file shrinking while it is read: touching a page past
//! the new end raises SIGBUS, which kills the process. A source file can shrink at any
//! moment (its programs own it), so here a process-wide SIGBUS handler recognises a
//! fault inside the window a thread is reading through [`Reader::with`], maps a page of
//! zeros over the faulting page so that the read can go on, and marks the read spoiled:
//! `with` then returns [`Error::Shrank`] instead of the result. Any other SIGBUS goes to
//! the disposition that was there before (the Rust runtime's, then the default action,
//! which ends the process), as if this crate were not there.

use std::cell::Cell;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{compiler_fence, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Bytes mapped at a time. Large enough that mapping costs nothing next to reading;
/// small enough that a huge file does not fill the page tables, nor the process's RSS
/// (which counts the file pages it maps), while it is read.
pub const WINDOW: usize = 4 << 20;

/// Reads spoiled by a file shrinking under them, in this process so far.
pub fn spoiled_reads() -> u64 {
    SPOILED_READS.load(Ordering::Relaxed)
}

static SPOILED_READS: AtomicU64 = AtomicU64::new(0);

/// Fewest bytes a reader must have to hash for mapping to pay. Mapping costs a few
/// microseconds per window (mmap, faults, munmap) where a copy costs per byte: on tmpfs,
/// hashing 8 KiB files took twice as long mapped as read, 64 KiB files 1.2 times as
/// long, 256 KiB files as long, 4 MiB files 0.7 times as long.
pub const MIN_MAPPED: u64 = 1 << 20;

/// Why [`Reader::with`] gave no result: read the bytes with `pread` instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The file cannot be mapped (a filesystem without mmap, or a handler could not be
    /// installed), or there is too little to read for mapping to pay ([`MIN_MAPPED`]).
    Unmappable,
    /// The file shrank below the range while it was read: what was seen is not its
    /// content.
    Shrank,
}

/// A reader over one file that maps a window of it at a time.
pub struct Reader<'fd> {
    fd: BorrowedFd<'fd>,
    map: Option<Map>,
    unmappable: bool,
}

struct Map {
    /// File offset of the first mapped byte (page-aligned).
    offset: u64,
    ptr: *mut libc::c_void,
    len: usize,
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are a mapping this process made and nothing else unmaps; no
        // slice into it outlives `Reader::with`.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

impl<'fd> Reader<'fd> {
    /// A reader for about `to_read` bytes of the file behind `fd`: below [`MIN_MAPPED`]
    /// it maps nothing and every read is left to `pread`.
    pub fn new(fd: BorrowedFd<'fd>, to_read: u64) -> Self {
        Reader {
            fd,
            map: None,
            unmappable: to_read < MIN_MAPPED || install().is_err(),
        }
    }

    /// Runs `f` over the bytes `[offset, offset + len)` of the file and returns what it
    /// returned. The caller believes the file has them (from its size); if it no longer
    /// does, `f` sees zeros where the bytes are gone and the result is [`Error::Shrank`].
    /// Bytes being written meanwhile may be seen half old, half new, as with `pread`.
    pub fn with<R>(
        &mut self,
        offset: u64,
        len: usize,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, Error> {
        if len == 0 {
            return Ok(f(&[]));
        }
        let map = self.window(offset, len)?;
        let lo = map.ptr as usize;
        let hi = lo + map.len;
        let start = lo + (offset - map.offset) as usize;
        let spoiled = {
            let _reading = Reading::new(lo, hi);
            // SAFETY: `[start, start + len)` lies inside the live mapping `map` (see
            // `window`), which stays mapped until `self.map` changes, after this block. The
            // bytes may change underneath (another writer) or turn to zeros (the handler
            // below): `f` gets a snapshot with no guarantee of consistency, as with `pread`.
            let bytes = unsafe { std::slice::from_raw_parts(start as *const u8, len) };
            let r = f(bytes);
            (!SPOILED.get()).then_some(r)
        };
        match spoiled {
            Some(r) => Ok(r),
            None => {
                // Part of the window is zeros now: map it again next time.
                self.map = None;
                SPOILED_READS.fetch_add(1, Ordering::Relaxed);
                Err(Error::Shrank)
            }
        }
    }

    /// The mapping that holds `[offset, offset + len)`, mapped anew when needed.
    fn window(&mut self, offset: u64, len: usize) -> Result<&Map, Error> {
        if self.unmappable {
            return Err(Error::Unmappable);
        }
        let end = offset.checked_add(len as u64).ok_or(Error::Unmappable)?;
        let holds = |m: &Map| m.offset <= offset && end <= m.offset + m.len as u64;
        if !self.map.as_ref().is_some_and(holds) {
            self.map = None;
            let page = page_size() as u64;
            let first = offset - offset % page;
            let need = (end - first).div_ceil(page) * page;
            let len = (need as usize).max(WINDOW);
            let off = libc::off_t::try_from(first).map_err(|_| Error::Unmappable)?;
            // SAFETY: a fresh read-only shared mapping of a file descriptor we borrow; the
            // kernel picks the address. Pages past the file's end fault with SIGBUS, which
            // the handler turns into `Error::Shrank` while `with` runs.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    self.fd.as_raw_fd(),
                    off,
                )
            };
            if ptr == libc::MAP_FAILED {
                self.unmappable = true;
                return Err(Error::Unmappable);
            }
            // SAFETY: advice on the mapping just made; failure only loses read-ahead.
            unsafe { libc::madvise(ptr, len, libc::MADV_SEQUENTIAL) };
            self.map = Some(Map {
                offset: first,
                ptr,
                len,
            });
        }
        Ok(self.map.as_ref().expect("mapped above"))
    }
}

thread_local! {
    // Read by the signal handler: plain `Cell`s of `Copy` types with const initialisers
    // live in the thread's static TLS block (no lazy initialisation, no destructor), so
    // reading them there is async-signal-safe.
    /// The mapping this thread is reading through `Reader::with`, as `[lo, hi)`.
    static ACTIVE: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
    /// A fault inside `ACTIVE` was patched over since `with` began.
    static SPOILED: Cell<bool> = const { Cell::new(false) };
}

/// Marks `[lo, hi)` as being read by this thread until dropped (also on a panic in `f`).
struct Reading;

impl Reading {
    fn new(lo: usize, hi: usize) -> Reading {
        SPOILED.set(false);
        ACTIVE.set((lo, hi));
        // The handler must see the range before the first access, and the accesses must
        // not move past the `drop` below: a signal handler runs on this very thread, so a
        // compiler fence is what orders them.
        compiler_fence(Ordering::SeqCst);
        Reading
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        compiler_fence(Ordering::SeqCst);
        ACTIVE.set((0, 0));
    }
}

struct Previous(libc::sigaction);
// SAFETY: written once before the handler is installed, only read afterwards.
unsafe impl Sync for Previous {}
unsafe impl Send for Previous {}

static PREVIOUS: OnceLock<Result<Previous, ()>> = OnceLock::new();
static PAGE: AtomicUsize = AtomicUsize::new(0);

fn page_size() -> usize {
    let p = PAGE.load(Ordering::Relaxed);
    if p != 0 {
        return p;
    }
    // SAFETY: sysconf has no preconditions.
    let p = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .ok()
        .filter(|&p| p.is_power_of_two())
        .unwrap_or(4096);
    PAGE.store(p, Ordering::Relaxed);
    p
}

/// Installs the SIGBUS handler once per process, remembering the disposition before it.
fn install() -> Result<(), ()> {
    PREVIOUS
        .get_or_init(|| {
            page_size();
            // SAFETY: plain sigaction(2) calls with zeroed, then filled, structures.
            unsafe {
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = on_sigbus as *const () as usize;
                act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                libc::sigemptyset(&mut act.sa_mask);
                let mut prev: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(libc::SIGBUS, &act, &mut prev) != 0 {
                    return Err(());
                }
                Ok(Previous(prev))
            }
        })
        .as_ref()
        .map(|_| ())
        .map_err(|_| ())
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let (lo, hi) = ACTIVE.get();
    if lo <= addr && addr < hi {
        let page = page_size();
        let at = addr & !(page - 1);
        // SAFETY: replaces one page of this thread's own active mapping with zeros, so
        // that the faulting access succeeds when the handler returns. mmap is a plain
        // system call, safe in a signal handler.
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            SPOILED.set(true);
            return;
        }
    }
    // Not ours: what would have happened without this crate.
    // SAFETY: PREVIOUS was set before this handler could run.
    let Some(Ok(Previous(prev))) = PREVIOUS.get() else {
        return;
    };
    let handler = prev.sa_sigaction;
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // Restore it and return: the access faults again and the default action ends
        // the process (with a core dump, as it would have).
        // SAFETY: sigaction(2) with the structure saved at install.
        unsafe { libc::sigaction(sig, prev, std::ptr::null_mut()) };
    } else if prev.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed as a SA_SIGINFO handler.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(handler) };
        f(sig, info, ctx);
    } else {
        // SAFETY: the previous handler was installed as a plain handler.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
        f(sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_across_windows_gets_a_mapping_that_holds_it() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..WINDOW as u32 * 2 + 5000)
            .map(|i| (i % 251) as u8)
            .collect();
        std::io::Write::write_all(&mut f, &data).unwrap();
        let fd = std::os::fd::AsFd::as_fd(&f);
        let mut r = Reader::new(fd, MIN_MAPPED);
        let at = WINDOW as u64 - 100;
        let got = r.with(at, 300, |b| b.to_vec()).unwrap();
        assert_eq!(got, data[at as usize..at as usize + 300]);
        let m = r.map.as_ref().unwrap();
        assert!(m.offset <= at && at + 300 <= m.offset + m.len as u64);
        assert_eq!(m.offset % page_size() as u64, 0);
    }
}
