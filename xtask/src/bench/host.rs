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

use std::path::Path;

/// The order of the smallest free block reported; above the largest order the
/// allocator has, nothing is.
const REPORTING_ORDER: &str = "/sys/module/page_reporting/parameters/page_reporting_order";
const NEVER: &str = "11";

/// Turns free page reporting off until dropped, then restores the previous setting. On a
/// machine without it (no such parameter) this does nothing.
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
