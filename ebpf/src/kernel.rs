//! Kernel structure access: field offsets handed in by the agent (read from BTF at load
//! time, because Rust eBPF gets no CO-RE relocations) and the pointer walks built on them.
//!
//! Every read goes through `bpf_probe_read_kernel`, so a stale or garbage pointer yields
//! `None`, never a fault.

use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_get_current_task, bpf_probe_read_kernel};
use doppel_common::abi::KFileId;

/// Declares `#[no_mangle]` offset globals. They live in `.rodata`; the agent sets each
/// one with `EbpfLoader::set_global(name, value, must_exist = true)`, so a name missing
/// here fails the load instead of silently leaving an offset at 0.
macro_rules! offsets {
    ($($name:ident),* $(,)?) => {
        $(
            #[no_mangle]
            static $name: u64 = 0;
        )*
        /// Offsets, read once per use with `read_volatile` so the compiler cannot
        /// constant-fold the placeholder 0.
        pub mod off {
            $(
                #[inline(always)]
                #[allow(non_snake_case)]
                pub fn $name() -> u64 {
                    // SAFETY: reading a plain static.
                    unsafe { core::ptr::read_volatile(&super::$name) }
                }
            )*
        }
    };
}

offsets!(
    OFF_TASK_FILES,
    OFF_TASK_FS,
    OFF_TASK_TI_STATUS,
    OFF_FILES_FDT,
    OFF_FDT_FD,
    OFF_FILE_F_POS,
    OFF_FILE_F_FLAGS,
    OFF_FILE_F_INODE,
    OFF_FILE_DENTRY,
    OFF_DENTRY_D_PARENT,
    OFF_DENTRY_D_INODE,
    OFF_INODE_I_INO,
    OFF_INODE_I_SB,
    OFF_INODE_I_MODE,
    OFF_INODE_I_SIZE,
    OFF_INODE_I_NLINK,
    OFF_SB_S_DEV,
    OFF_FS_PWD_DENTRY,
    OFF_REGS_DI,
    OFF_REGS_SI,
    OFF_REGS_DX,
    OFF_REGS_R10,
    OFF_REGS_R8,
    OFF_REGS_R9,
    OFF_REGS_ORIG_AX,
    // io_uring (see uring.rs); all u64::MAX when the kernel has no io_uring.
    OFF_REQ_FILE,
    OFF_REQ_CMD,
    OFF_REQ_OPCODE,
    OFF_REQ_RES,
    OFF_RW_POS,
    OFF_SPLICE_OFF_OUT,
    OFF_SYNC_LEN,
    OFF_SYNC_OFF,
    OFF_SYNC_MODE,
    OFF_FTRUNC_LEN,
    OFF_OPEN_FLAGS,
    OFF_OPEN_SLOT,
    OFF_RENAME_OLD_DFD,
    OFF_RENAME_NEW_DFD,
    OFF_RENAME_OLDPATH,
    OFF_RENAME_NEWPATH,
    OFF_RENAME_FLAGS,
    OFF_UNLINK_DFD,
    OFF_UNLINK_FLAGS,
    OFF_UNLINK_NAME,
    OFF_MKDIR_DFD,
    OFF_MKDIR_MODE,
    OFF_MKDIR_NAME,
    OFF_LINK_OLD_DFD,
    OFF_LINK_NEW_DFD,
    OFF_LINK_OLDPATH,
    OFF_LINK_NEWPATH,
    OFF_LINK_FLAGS,
    OFF_FILENAME_NAME,
    OFF_XATTR_NAME,
    // Shared mappings (see mmap.rs).
    OFF_MAPPING_HOST,
    OFF_MAPPING_MMAP_WRITABLE,
    OFF_INODE_I_DENTRY,
    OFF_DENTRY_D_ALIAS,
    OFF_FOLIO_FLAGS,
    OFF_FOLIO_INDEX,
    OFF_FOLIO_FLAGS_1,
    PG_HEAD,
    // Capture inside the filesystem (see fs.rs).
    OFF_KIOCB_FILP,
    OFF_KIOCB_POS,
    OFF_ITER_DATA_SOURCE,
    OFF_ITER_COUNT,
    OFF_ITER_TYPE,
    OFF_ITER_UBUF,
    OFF_ITER_IOV_OFFSET,
    ITER_UBUF,
    OFF_INODE_I_MAPPING,
    OFF_MAPPING_XA_HEAD,
    OFF_XA_NODE_SHIFT,
    OFF_XA_NODE_SLOTS,
    OFF_FOLIO_MAPPING,
    OFF_FOLIO_PRIVATE,
    OFF_BH_B_DATA,
    // Where `ext4_setattr`'s and `ext4_dirty_inode`'s code lie (fs_meta.rs); START >
    // END when unknown.
    OFF_INODE_ATIME_SEC,
    OFF_INODE_CTIME_SEC,
    OFF_INODE_ATIME_NSEC,
    OFF_INODE_CTIME_NSEC,
    SETATTR_IP_START,
    SETATTR_IP_END,
    DIRTY_INODE_IP_START,
    DIRTY_INODE_IP_END,
    // Capture inside xfs (see xfs.rs); all u64::MAX when the kernel has no xfs.
    OFF_XFS_I_VNODE,
    OFF_DA_ARGS_DP,
    OFF_DA_ARGS_INUMBER,
    OFF_IOMAP_ITER_INODE,
    OFF_IOMAP_ITER_POS,
    OFF_IOMAP_ITER_START,
    OFF_IOMAP_ITER_FLAGS,
    OFF_IOMAP_ITER_MAPPED,
    OFF_REGS_BX,
    OFF_REGS_CX,
    OFF_REGS_BP,
    // io_uring opcodes (enum io_uring_op); u64::MAX for one this kernel lacks.
    URING_OP_WRITE,
    URING_OP_WRITEV,
    URING_OP_WRITE_FIXED,
    URING_OP_WRITEV_FIXED,
    URING_OP_SPLICE,
    URING_OP_FALLOCATE,
    URING_OP_FTRUNCATE,
    URING_OP_OPENAT,
    URING_OP_OPENAT2,
    URING_OP_RENAMEAT,
    URING_OP_UNLINKAT,
    URING_OP_MKDIRAT,
    URING_OP_SYMLINKAT,
    URING_OP_LINKAT,
    URING_OP_SETXATTR,
    URING_OP_FSETXATTR,
);

/// Set by the agent when `thread_info.status` is not in BTF: skip the compat check.
const NO_OFFSET: u64 = u64::MAX;
/// x86 `TS_COMPAT`: the task is in a 32-bit (ia32) syscall, whose numbers differ.
const TS_COMPAT: u32 = 0x0002;
pub const S_IFMT: u16 = 0o170000;
pub const S_IFREG: u16 = 0o100000;
pub const AT_FDCWD: i32 = -100;

#[inline(always)]
pub fn rk<T>(addr: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel tolerates any address.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

#[inline(always)]
pub fn rk_ptr(addr: u64) -> Option<u64> {
    match rk::<u64>(addr) {
        Some(0) | None => None,
        p => p,
    }
}

/// The current thread group's id (the process id as user space knows it).
#[inline(always)]
pub fn tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

#[inline(always)]
pub fn current_task() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_get_current_task() }
}

/// Syscall argument `n` (0-based, x86_64 order) from the saved user registers.
#[inline(always)]
pub fn arg(regs: u64, n: u32) -> u64 {
    let off = match n {
        0 => off::OFF_REGS_DI(),
        1 => off::OFF_REGS_SI(),
        2 => off::OFF_REGS_DX(),
        3 => off::OFF_REGS_R10(),
        4 => off::OFF_REGS_R8(),
        _ => off::OFF_REGS_R9(),
    };
    rk::<u64>(regs + off).unwrap_or(0)
}

/// True when the current syscall is a 32-bit compat one (different numbering: ignore).
#[inline(always)]
pub fn in_compat_syscall() -> bool {
    let o = off::OFF_TASK_TI_STATUS();
    if o == NO_OFFSET {
        return false;
    }
    match rk::<u32>(current_task() + o) {
        Some(status) => status & TS_COMPAT != 0,
        None => false,
    }
}

/// `struct file *` of `fd` in the current task, or `None`.
/// (Also used for an fd an io_uring request installed: io_uring's worker threads share
/// the submitter's file table.)
#[inline(always)]
pub fn fd_file(fd: u64) -> Option<u64> {
    // fds are ints; anything outside [0, i32::MAX] is not an open file.
    if fd > i32::MAX as u64 {
        return None;
    }
    let files = rk_ptr(current_task() + off::OFF_TASK_FILES())?;
    let fdt = rk_ptr(files + off::OFF_FILES_FDT())?;
    let fds = rk_ptr(fdt + off::OFF_FDT_FD())?;
    rk_ptr(fds + fd * 8)
}

/// (dev, ino) of an inode; `dev` in the kernel encoding.
#[inline(always)]
pub fn inode_id(inode: u64) -> Option<KFileId> {
    let ino = rk::<u64>(inode + off::OFF_INODE_I_INO())?;
    let sb = rk_ptr(inode + off::OFF_INODE_I_SB())?;
    let dev = rk::<u32>(sb + off::OFF_SB_S_DEV())?;
    Some(KFileId {
        dev: dev as u64,
        ino,
    })
}

/// Identity of the directory containing the dentry `file`'s path points at.
#[inline(always)]
pub fn file_parent(file: u64) -> Option<KFileId> {
    let dentry = rk_ptr(file + off::OFF_FILE_DENTRY())?;
    let parent = rk_ptr(dentry + off::OFF_DENTRY_D_PARENT())?;
    let pinode = rk_ptr(parent + off::OFF_DENTRY_D_INODE())?;
    inode_id(pinode)
}

/// The directory of `inode`'s first name (a hard link's other names are not looked
/// at), if it has a name.
#[inline(always)]
pub fn first_parent(inode: u64) -> Option<KFileId> {
    let first = rk_ptr(inode + off::OFF_INODE_I_DENTRY())?;
    let dentry = first - off::OFF_DENTRY_D_ALIAS();
    let pdentry = rk_ptr(dentry + off::OFF_DENTRY_D_PARENT())?;
    inode_id(rk_ptr(pdentry + off::OFF_DENTRY_D_INODE())?)
}

/// The file's inode, whatever its type.
#[inline(always)]
pub fn inode_ptr(file: u64) -> Option<u64> {
    rk_ptr(file + off::OFF_FILE_F_INODE())
}

/// The file's inode if it is a regular file.
#[inline(always)]
pub fn regular_inode(file: u64) -> Option<u64> {
    let inode = rk_ptr(file + off::OFF_FILE_F_INODE())?;
    let mode = rk::<u16>(inode + off::OFF_INODE_I_MODE())?;
    if mode & S_IFMT == S_IFREG {
        Some(inode)
    } else {
        None
    }
}

/// Whether a regular file's `inode`, reached through a name in a directory that is not
/// watched, is a hard-linked file of a set (the agent lists those): cheap for the common
/// case, a file with one name.
#[inline(always)]
pub fn linked_inode(inode: u64) -> bool {
    match rk::<u32>(inode + off::OFF_INODE_I_NLINK()) {
        Some(n) if n > 1 => {}
        _ => return false,
    }
    inode_id(inode).is_some_and(|id| crate::maps::linked(&id))
}

/// Identity of the directory a relative path starts from: `dirfd`'s inode, or the
/// current working directory for `AT_FDCWD`.
#[inline(always)]
pub fn base_dir(dirfd: i32) -> Option<KFileId> {
    let dentry = if dirfd == AT_FDCWD {
        let fs = rk_ptr(current_task() + off::OFF_TASK_FS())?;
        rk_ptr(fs + off::OFF_FS_PWD_DENTRY())?
    } else {
        let file = fd_file(dirfd as u64)?;
        rk_ptr(file + off::OFF_FILE_DENTRY())?
    };
    let inode = rk_ptr(dentry + off::OFF_DENTRY_D_INODE())?;
    inode_id(inode)
}
