//! x86_64 syscall numbers the program handles (`orig_ax` at `sys_exit`).
//! Other architectures need their own table (and register names); the agent refuses to
//! build for anything but x86_64 so this program is never loaded elsewhere.

pub const WRITE: u64 = 1;
pub const OPEN: u64 = 2;
pub const PWRITE64: u64 = 18;
pub const WRITEV: u64 = 20;
pub const TRUNCATE: u64 = 76;
pub const FTRUNCATE: u64 = 77;
pub const RENAME: u64 = 82;
pub const MKDIR: u64 = 83;
pub const RMDIR: u64 = 84;
pub const CREAT: u64 = 85;
pub const UNLINK: u64 = 87;
pub const OPENAT: u64 = 257;
pub const MKDIRAT: u64 = 258;
pub const UNLINKAT: u64 = 263;
pub const RENAMEAT: u64 = 264;
pub const PWRITEV: u64 = 296;
pub const RENAMEAT2: u64 = 316;
pub const PWRITEV2: u64 = 328;
pub const OPENAT2: u64 = 437;
