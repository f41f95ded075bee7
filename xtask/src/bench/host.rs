//! Holding the machine still while benchmarks run.
//!
//! These machines are virtual, and their kernels report freed memory to the hypervisor
//! (virtio-balloon free page reporting), which takes it back. The next use of such a
//! page costs a fault in the host: a run that writes a few GiB into fresh page cache
//! (a replica on tmpfs) then takes up to twice as long as the same run on memory the
//! guest kept, depending on what the previous run freed and when the reporting pass
//! came. Measured here: the 2 GiB throughput run varied 370-500 MB/s with reporting on
//! and held 534-552 MB/s with it off; the quinn baseline, which writes no files, did not
//! move. Both sides of every comparison run under the same setting.

use std::ffi::{CStr, CString};
use std::path::Path;
use std::sync::OnceLock;

/// The order of the smallest free block reported; above the largest order the
/// allocator has, nothing is.
const REPORTING_ORDER: &str = "/sys/module/page_reporting/parameters/page_reporting_order";
const REPORTING_ORDER_C: &CStr = c"/sys/module/page_reporting/parameters/page_reporting_order";
const NEVER: &str = "11";
/// Signals that end a bench run early (Ctrl-C, kill, a closed terminal).
const ENDING: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// The setting to restore, for the signal handler.
static PREVIOUS: OnceLock<CString> = OnceLock::new();

/// Puts the setting back and dies of `sig` as if no handler had been installed. Only
/// async-signal-safe calls: open, write, close, signal, raise.
extern "C" fn restore_and_die(sig: libc::c_int) {
    if let Some(previous) = PREVIOUS.get() {
        // SAFETY: plain system calls on a static path and bytes that live forever.
        unsafe {
            let fd = libc::open(REPORTING_ORDER_C.as_ptr(), libc::O_WRONLY);
            if fd >= 0 {
                libc::write(fd, previous.as_ptr().cast(), previous.as_bytes().len());
                libc::close(fd);
            }
        }
    }
    // SAFETY: restores the default action and delivers the signal again.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// Turns free page reporting off until dropped, then restores the previous setting; so
/// does a signal that ends the run. On a machine without it (no such parameter) this
/// does nothing.
pub struct NoPageReporting {
    previous: Option<String>,
}

impl NoPageReporting {
    pub fn new() -> Self {
        let path = Path::new(REPORTING_ORDER);
        let Ok(previous) = std::fs::read_to_string(path) else {
            return NoPageReporting { previous: None };
        };
        let previous = previous.trim().to_owned();
        match std::fs::write(path, NEVER) {
            Ok(()) => {
                if let Ok(c) = CString::new(previous.clone()) {
                    let _ = PREVIOUS.set(c);
                    for sig in ENDING {
                        // SAFETY: installs a handler that only makes async-signal-safe calls.
                        unsafe {
                            libc::signal(sig, restore_and_die as *const () as libc::sighandler_t);
                        }
                    }
                }
                eprintln!(
                    "bench: free page reporting to the hypervisor is off while benchmarks run \
                     ({REPORTING_ORDER}: {previous} -> {NEVER}; restored at the end)"
                );
                NoPageReporting {
                    previous: Some(previous),
                }
            }
            Err(e) => {
                eprintln!(
                    "bench: cannot turn free page reporting off ({e}); figures that write \
                     much new page cache will vary more than usual"
                );
                NoPageReporting { previous: None }
            }
        }
    }
}

impl Drop for NoPageReporting {
    fn drop(&mut self) {
        for sig in ENDING {
            // SAFETY: restores the default action.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        if let Some(previous) = &self.previous {
            if let Err(e) = std::fs::write(REPORTING_ORDER, previous) {
                eprintln!(
                    "bench: cannot restore {REPORTING_ORDER} to {previous} ({e}); \
                     write it back by hand"
                );
            }
        }
    }
}
