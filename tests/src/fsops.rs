//! Thin checked wrappers over libc for tests that must make exact syscalls (the fidelity
//! and workload tests): every failure panics with the call, the path and the errno.

use std::ffi::CString;
use std::fmt::Display;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

use libc::c_int;

/// A path as a C string.
pub fn cstr(p: impl AsRef<Path>) -> CString {
    CString::new(p.as_ref().as_os_str().as_bytes()).expect("no NUL in test paths")
}

/// Panics with `what` and errno unless `r` is not negative; returns `r`.
pub fn check(r: c_int, what: impl Display) -> c_int {
    if r < 0 {
        panic!("{what}: {}", std::io::Error::last_os_error());
    }
    r
}

/// As [`check`] for calls that return a byte count.
pub fn check_len(r: isize, what: impl Display) -> usize {
    if r < 0 {
        panic!("{what}: {}", std::io::Error::last_os_error());
    }
    r as usize
}

/// The errno of the last failed call.
pub fn errno() -> c_int {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// An owned file descriptor, closed on drop.
#[derive(Debug)]
pub struct Fd(pub c_int);

impl Fd {
    pub fn raw(&self) -> c_int {
        self.0
    }
}

impl Drop for Fd {
    fn drop(&mut self) {
        unsafe { libc::close(self.0) };
    }
}

pub fn open(p: impl AsRef<Path>, flags: c_int, mode: libc::mode_t) -> Fd {
    let p = p.as_ref();
    let fd = unsafe { libc::open(cstr(p).as_ptr(), flags | libc::O_CLOEXEC, mode) };
    Fd(check(fd, format!("open {} flags {flags:#o}", p.display())))
}

pub fn openat(dir: &Fd, name: &str, flags: c_int, mode: libc::mode_t) -> Fd {
    let fd = unsafe { libc::openat(dir.0, cstr(name).as_ptr(), flags | libc::O_CLOEXEC, mode) };
    Fd(check(fd, format!("openat {name} flags {flags:#o}")))
}

/// A directory fd (for the *at calls).
pub fn open_dir(p: impl AsRef<Path>) -> Fd {
    open(p, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

/// write(2) until all of `data` is written.
pub fn write_all(fd: &Fd, mut data: &[u8]) {
    while !data.is_empty() {
        let n = unsafe { libc::write(fd.0, data.as_ptr().cast(), data.len()) };
        let n = check_len(n, "write");
        assert!(n > 0, "write wrote nothing");
        data = &data[n..];
    }
}

/// pwrite(2) until all of `data` is written at `off`.
pub fn pwrite_all(fd: &Fd, mut data: &[u8], mut off: i64) {
    while !data.is_empty() {
        let n = unsafe { libc::pwrite(fd.0, data.as_ptr().cast(), data.len(), off) };
        let n = check_len(n, format!("pwrite at {off}"));
        assert!(n > 0, "pwrite wrote nothing");
        data = &data[n..];
        off += n as i64;
    }
}

/// Deterministic bytes that differ per seed and per position (and are never all zero).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8 | 1
        })
        .collect()
}

fn ts(t: Option<(i64, i64)>) -> libc::timespec {
    match t {
        Some((s, ns)) => libc::timespec {
            tv_sec: s,
            tv_nsec: ns,
        },
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    }
}

/// utimensat(AT_FDCWD, p, [atime, mtime], flags); None leaves that time as it is.
pub fn utimens(
    p: impl AsRef<Path>,
    atime: Option<(i64, i64)>,
    mtime: Option<(i64, i64)>,
    flags: c_int,
) {
    let p = p.as_ref();
    let t = [ts(atime), ts(mtime)];
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, cstr(p).as_ptr(), t.as_ptr(), flags) };
    check(r, format!("utimensat {}", p.display()));
}

/// futimens(fd, [atime, mtime]); None leaves that time as it is.
pub fn futimens(fd: &Fd, atime: Option<(i64, i64)>, mtime: Option<(i64, i64)>) {
    let t = [ts(atime), ts(mtime)];
    check(unsafe { libc::futimens(fd.0, t.as_ptr()) }, "futimens");
}

/// setxattr (follows symlinks).
pub fn setxattr(p: impl AsRef<Path>, name: &str, val: &[u8], flags: c_int) {
    let p = p.as_ref();
    let n = CString::new(name).unwrap();
    let r = unsafe {
        libc::setxattr(
            cstr(p).as_ptr(),
            n.as_ptr(),
            val.as_ptr().cast(),
            val.len(),
            flags,
        )
    };
    check(r, format!("setxattr {name} on {}", p.display()));
}

/// lsetxattr (a symlink's own).
pub fn lsetxattr(p: impl AsRef<Path>, name: &str, val: &[u8], flags: c_int) {
    let p = p.as_ref();
    let n = CString::new(name).unwrap();
    let r = unsafe {
        libc::lsetxattr(
            cstr(p).as_ptr(),
            n.as_ptr(),
            val.as_ptr().cast(),
            val.len(),
            flags,
        )
    };
    check(r, format!("lsetxattr {name} on {}", p.display()));
}

pub fn fsetxattr(fd: &Fd, name: &str, val: &[u8], flags: c_int) {
    let n = CString::new(name).unwrap();
    let r = unsafe { libc::fsetxattr(fd.0, n.as_ptr(), val.as_ptr().cast(), val.len(), flags) };
    check(r, format!("fsetxattr {name}"));
}

pub fn removexattr(p: impl AsRef<Path>, name: &str) {
    let p = p.as_ref();
    let n = CString::new(name).unwrap();
    let r = unsafe { libc::removexattr(cstr(p).as_ptr(), n.as_ptr()) };
    check(r, format!("removexattr {name} on {}", p.display()));
}

/// Runs a command to success and returns its stdout; panics with its stderr otherwise.
pub fn run(cmd: &mut Command) -> String {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !o.status.success() {
        panic!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Whether a program is on PATH.
pub fn have(prog: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {prog}")])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Panics unless `prog` is on PATH, naming the Debian package that has it.
pub fn require_tool(prog: &str, package: &str) {
    if !have(prog) {
        panic!("{prog} is missing: `cargo xtask setup` installs it (apt-get install -y {package})");
    }
}
