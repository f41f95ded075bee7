//! Data writes: `write`, `pwrite64` (bytes copied into the ring in chunks) and
//! `writev`, `pwritev`, `pwritev2`, `copy_file_range`, `splice`, `sendfile` (reported as a
//! dirty range).

use aya_ebpf::helpers::generated::bpf_probe_read_user;
use doppel_common::abi::{KFileId, INLINE_CAP};

use crate::{
    bytes::{report_dirty, send_bytes, Source},
    kernel::{
        arg, fd_file, file_parent, in_compat_syscall, linked_inode, off, regular_inode, rk, tgid,
    },
    maps::{contents_watched, ignored, record_missed, scratch},
    syscalls,
};

const O_APPEND: u32 = 0o2000;
/// `RWF_APPEND` (pwritev2 flag).
const RWF_APPEND: u64 = 0x10;

/// A regular file written through `fd`, if it passes the filter.
struct Target {
    file: u64,
    inode: u64,
    fid: KFileId,
    parent: KFileId,
    tgid: u32,
}

/// The filter: the file's directory must be CONTENTS-watched. This costs a handful of
/// pointer reads and one map lookup; nothing is copied for unwatched files.
#[inline(always)]
fn target(fd: u64) -> Option<Target> {
    let t = target_file(fd_file(fd)?)?;
    // On a filesystem the inode bitmap covers, the filesystem programs (fs.rs) report
    // every write, with its bytes, whatever syscall made it.
    (!in_compat_syscall() && !crate::fs::covers(&t.fid)).then_some(t)
}

/// [`target`] for a `struct file *` (io_uring requests carry one, no fd).
#[inline(always)]
fn target_file(file: u64) -> Option<Target> {
    let parent = file_parent(file)?;
    let watched = contents_watched(&parent);
    let inode = regular_inode(file)?;
    if !watched && !linked_inode(inode) {
        return None;
    }
    let pid = tgid();
    if ignored(pid) {
        return None;
    }
    // A dentry and its parent always share a superblock, hence the device.
    let ino = rk::<u64>(inode + off::OFF_INODE_I_INO())?;
    Some(Target {
        file,
        inode,
        fid: KFileId {
            dev: parent.dev,
            ino,
        },
        parent,
        tgid: pid,
    })
}

/// copy_file_range, splice or sendfile wrote `written` bytes into a file: the range is
/// reported dirty and the agent reads the bytes back from the file.
#[inline(always)]
pub fn on_copy(regs: u64, nr: u64, written: u64) {
    // copy_file_range and splice: (fd_in, off_in*, fd_out, off_out*, ..);
    // sendfile: (out_fd, in_fd, offset*, count) writes at out_fd's position.
    let (fd, off_ptr) = if nr == syscalls::SENDFILE {
        (arg(regs, 0), 0)
    } else {
        (arg(regs, 2), arg(regs, 3))
    };
    let Some(t) = target(fd) else {
        return;
    };
    // The kernel has advanced whichever position it used by `written`.
    let end = if off_ptr != 0 {
        let mut v: u64 = 0;
        // SAFETY: destination is a local u64.
        let r = unsafe {
            bpf_probe_read_user(
                &mut v as *mut u64 as *mut core::ffi::c_void,
                8,
                off_ptr as *const core::ffi::c_void,
            )
        };
        if r != 0 {
            // Unreadable: the whole file is suspect from 0 (rare; the agent reads it).
            written
        } else {
            v
        }
    } else {
        rk::<i64>(t.file + off::OFF_FILE_F_POS()).unwrap_or(0) as u64
    };
    let offset = end.wrapping_sub(written);
    report_dirty(t.tgid, &t.fid, &t.parent, offset, written);
}

/// `file` got `[end - len, end)` written by an io_uring request: reported dirty, the
/// agent reads the bytes back (the request's buffers are not the caller's to read here).
/// True if the file is watched.
#[inline(always)]
pub fn on_uring_write(file: u64, end: u64, len: u64) -> bool {
    let Some(t) = target_file(file) else {
        return false;
    };
    if crate::fs::covers(&t.fid) {
        // The filesystem programs saw the write itself, with its bytes.
        return true;
    }
    report_dirty(t.tgid, &t.fid, &t.parent, end.wrapping_sub(len), len);
    true
}

#[inline(always)]
pub fn on_write(regs: u64, nr: u64, written: u64) {
    let Some(Target {
        file,
        inode,
        fid,
        parent,
        tgid,
    }) = target(arg(regs, 0))
    else {
        return;
    };

    let f_pos = || rk::<i64>(file + off::OFF_FILE_F_POS()).unwrap_or(0) as u64;
    // Where an append really went: the file's size now, minus what was written.
    let appended = || rk::<i64>(inode + off::OFF_INODE_I_SIZE()).unwrap_or(0) as u64;
    let append_mode = || rk::<u32>(file + off::OFF_FILE_F_FLAGS()).unwrap_or(0) & O_APPEND != 0;

    let offset = match nr {
        // write(2) advanced f_pos by exactly `written`, also for O_APPEND.
        syscalls::WRITE | syscalls::WRITEV => f_pos().wrapping_sub(written),
        // pwrite on an O_APPEND file appends regardless of the offset argument (Linux).
        syscalls::PWRITE64 | syscalls::PWRITEV => {
            if append_mode() {
                appended().wrapping_sub(written)
            } else {
                arg(regs, 3)
            }
        }
        _ => {
            // pwritev2(fd, iov, cnt, pos_l, pos_h, flags): pos -1 means "at f_pos".
            let pos = arg(regs, 3);
            if append_mode() || arg(regs, 5) & RWF_APPEND != 0 {
                appended().wrapping_sub(written)
            } else if pos as i64 == -1 {
                f_pos().wrapping_sub(written)
            } else {
                pos
            }
        }
    };

    if nr != syscalls::WRITE && nr != syscalls::PWRITE64 || written > INLINE_CAP as u64 {
        report_dirty(tgid, &fid, &parent, offset, written);
        return;
    }
    let Some(s) = scratch() else {
        record_missed(&fid, offset, offset.wrapping_add(written));
        return;
    };
    send_bytes(
        s,
        tgid,
        &fid,
        &parent,
        offset,
        arg(regs, 1),
        written,
        Source::User,
    );
}
