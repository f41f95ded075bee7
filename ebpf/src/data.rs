//! Data writes: `write`, `pwrite64` (bytes copied into the ring in chunks) and
//! `writev`, `pwritev`, `pwritev2` (reported as a dirty range).

use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated::bpf_probe_read_user};
use doppel_common::abi::{
    FileRecord, Header, KFileId, CHUNK_SIZE, FILE_RECORD_SIZE, INLINE_CAP, KIND_DATA, KIND_DIRTY,
    MAX_CHUNKS, STAT_DATA_BYTES, STAT_EVENTS,
};

use crate::{
    kernel::{arg, fd_file, file_parent, in_compat_syscall, off, regular_inode, rk},
    maps::{bump, contents_watched, ignored, output, record_missed, scratch},
    syscalls,
};

const O_APPEND: u32 = 0o2000;
/// `RWF_APPEND` (pwritev2 flag).
const RWF_APPEND: u64 = 0x10;

#[inline(always)]
pub fn on_write(regs: u64, nr: u64, written: u64) {
    // The filter: the file's directory must be CONTENTS-watched. This costs a handful of
    // pointer reads and one map lookup; nothing is copied for unwatched files.
    let Some(file) = fd_file(arg(regs, 0)) else {
        return;
    };
    let Some(parent) = file_parent(file) else {
        return;
    };
    if !contents_watched(&parent) {
        return;
    }
    let Some(inode) = regular_inode(file) else {
        return;
    };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if ignored(tgid) || in_compat_syscall() {
        return;
    }
    // A dentry and its parent always share a superblock, hence the device.
    let Some(ino) = rk::<u64>(inode + off::OFF_INODE_I_INO()) else {
        return;
    };
    let fid = KFileId {
        dev: parent.dev,
        ino,
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

    let Some(s) = scratch() else {
        record_missed(&fid, offset, offset.wrapping_add(written));
        return;
    };
    let rec = s as *mut FileRecord;
    if nr != syscalls::WRITE && nr != syscalls::PWRITE64 || written > INLINE_CAP as u64 {
        emit_dirty(s, rec, tgid, &fid, &parent, offset, written);
        return;
    }

    // SAFETY: `s` is the per-CPU scratch value, MAX_RECORD_SIZE >= FILE_RECORD_SIZE +
    // CHUNK_SIZE bytes long and 8-aligned.
    unsafe {
        (*rec).hdr = Header {
            kind: KIND_DATA,
            pid: tgid,
            ktime: bpf_ktime_get_ns(),
        };
        (*rec).file = fid;
        (*rec).parent = parent;
    }
    let buf = arg(regs, 1);
    for i in 0..MAX_CHUNKS {
        let done = (i * CHUNK_SIZE) as u64;
        if done >= written {
            break;
        }
        let mut n = written - done;
        if n > CHUNK_SIZE as u64 {
            n = CHUNK_SIZE as u64;
        }
        // SAFETY: as above; `n <= CHUNK_SIZE` keeps the copy inside the scratch buffer.
        let r = unsafe {
            (*rec).offset = offset + done;
            (*rec).len = n;
            bpf_probe_read_user(
                s.add(FILE_RECORD_SIZE) as *mut core::ffi::c_void,
                n as u32,
                (buf + done) as *const core::ffi::c_void,
            )
        };
        if r != 0 {
            // The user pages are not resident any more (probe reads cannot fault them
            // in): tell the agent to read the rest from the file instead.
            emit_dirty(s, rec, tgid, &fid, &parent, offset + done, written - done);
            return;
        }
        if !output(s, FILE_RECORD_SIZE as u64 + n) {
            record_missed(&fid, offset + done, offset + written);
            return;
        }
        bump(STAT_EVENTS, 1);
        bump(STAT_DATA_BYTES, n);
    }
}

#[inline(always)]
fn emit_dirty(
    s: *mut u8,
    rec: *mut FileRecord,
    tgid: u32,
    fid: &KFileId,
    parent: &KFileId,
    offset: u64,
    len: u64,
) {
    // SAFETY: scratch value, see on_write.
    unsafe {
        *rec = FileRecord {
            hdr: Header {
                kind: KIND_DIRTY,
                pid: tgid,
                ktime: bpf_ktime_get_ns(),
            },
            file: *fid,
            parent: *parent,
            offset,
            len,
        };
    }
    if output(s, FILE_RECORD_SIZE as u64) {
        bump(STAT_EVENTS, 1);
    } else {
        record_missed(fid, offset, offset.wrapping_add(len));
    }
}
