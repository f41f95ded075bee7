//! tracefs: not mounted at boot on our hosts.
//!
//! The capture program itself attaches to a *raw* tracepoint (by name, through
//! `BPF_RAW_TRACEPOINT_OPEN`), which does not need tracefs. It is mounted anyway so that
//! operators (and later programs on regular tracepoints, which aya resolves through
//! `/sys/kernel/tracing/events`) find it where they expect.

use std::{ffi::CString, path::Path};

use anyhow::{bail, Result};

pub const TRACEFS: &str = "/sys/kernel/tracing";

/// Mounts tracefs at `/sys/kernel/tracing` unless it is already there.
pub fn ensure_mounted() -> Result<()> {
    if Path::new(TRACEFS).join("events").is_dir() {
        return Ok(());
    }
    let src = CString::new("tracefs").expect("no NUL");
    let target = CString::new(TRACEFS).expect("no NUL");
    // SAFETY: valid NUL-terminated strings; no data argument.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        let err = std::io::Error::last_os_error();
        bail!(
            "tracefs is not mounted at {TRACEFS} and mounting it failed ({err}); mount it with \
             `mount -t tracefs tracefs {TRACEFS}` (needs root / CAP_SYS_ADMIN)"
        );
    }
    Ok(())
}
