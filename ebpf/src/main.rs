//! doppel's capture program: one raw tracepoint on `sys_exit` for syscalls.
//!
//! Why `sys_exit` as a raw tracepoint rather than `syscalls:sys_enter_X`/`sys_exit_X`
//! pairs: at `sys_exit` the saved user registers (`struct pt_regs`, the tracepoint's first
//! argument) still hold the syscall's arguments and the return value tells whether it
//! succeeded, so one program run per syscall sees everything. No enter program, no
//! per-thread argument map, and no perf-style argument marshalling on the hot path.
//!
//! io_uring requests are seen where they complete instead (`uring`: two more raw
//! tracepoints, attached only when the kernel has io_uring), and stores into shared
//! mappings where pages become dirty and are written back (`mmap`).
//!
//! Layout: `kernel` (offsets and pointer walks), `maps` (maps, filter, ring-full
//! fallback), `data` (write-family and copy syscalls), `ns` (namespace, size and
//! attribute changes), `uring` (io_uring completions), `mmap` (shared mappings), `fs`
//! (BTF tracepoints inside ext4 and iomap: the writes no syscall handler sees), `fs_meta`
//! (sizes, fallocate and shared-mapping faults of marked files, for sets that need no
//! syscall hook at all).
#![no_std]
#![no_main]
// Atomic read-modify-write on map memory (the inode bitmap, fs.rs): the BPF target's
// core has no atomic types with fetch_or/fetch_and.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod bytes;
mod data;
mod fs;
mod fs_meta;
mod kernel;
mod maps;
mod mmap;
mod ns;
mod syscalls;
mod uring;
mod xfs;

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};

use kernel::{in_compat_syscall, off, rk};

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn doppel_sys_exit(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct pt_regs *regs, long ret)
    let regs: u64 = ctx.arg(0);
    let ret: i64 = ctx.arg(1);
    // Only successful calls change anything (and most of the cost of this program for
    // unrelated syscalls is this one read plus the match).
    if ret < 0 {
        return 0;
    }
    let Some(nr) = rk::<u64>(regs + off::OFF_REGS_ORIG_AX()) else {
        return 0;
    };
    use syscalls::*;
    match nr {
        // The fd-based handlers check `in_compat_syscall` only once the filter has
        // passed: one kernel read less on the hot path, and an ia32 syscall whose number
        // collides with one of these only costs a few harmless reads.
        WRITE | PWRITE64 | WRITEV | PWRITEV | PWRITEV2 if ret > 0 => {
            data::on_write(regs, nr, ret as u64)
        }
        COPY_FILE_RANGE | SPLICE | SENDFILE if ret > 0 => data::on_copy(regs, nr, ret as u64),
        OPEN | OPENAT | OPENAT2 | CREAT => ns::on_open(regs, nr, ret as u64),
        FTRUNCATE => ns::on_ftruncate(regs),
        MMAP => ns::on_mmap(regs),
        FALLOCATE => ns::on_fallocate(regs),
        TRUNCATE | RENAME | MKDIR | RMDIR | UNLINK | MKDIRAT | UNLINKAT | RENAMEAT | RENAMEAT2
        | LINK | LINKAT | SYMLINK | SYMLINKAT | MKNOD | MKNODAT
            if !in_compat_syscall() =>
        {
            ns::on_path_op(regs, nr)
        }
        CHMOD | FCHMOD | CHOWN | FCHOWN | LCHOWN | UTIME | SETXATTR | LSETXATTR | FSETXATTR
        | REMOVEXATTR | LREMOVEXATTR | FREMOVEXATTR | UTIMES | FCHOWNAT | FUTIMESAT | FCHMODAT
        | UTIMENSAT | FCHMODAT2 | SETXATTRAT | REMOVEXATTRAT => ns::on_attr(regs, nr),
        _ => {}
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a loaded program: the verifier rejects any path that could get here.
    loop {}
}

/// GPL-compatible, required for the bpf_probe_read_* helpers.
#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
