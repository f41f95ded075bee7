//! `doppel-agent check`: a preflight of everything `run` needs, each failed item with
//! what to do about it. Nothing is changed and no live session is disturbed: a target is
//! only asked for a TLS handshake, never a stream.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Config;

/// How long a target may take to complete the handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const BTF: &str = "/sys/kernel/btf/vmlinux";
const TRACEFS: &str = "/sys/kernel/tracing";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub item: String,
    pub ok: bool,
    pub detail: String,
    /// What to do, for a failed item.
    pub fix: Option<String>,
}

fn ok(item: impl Into<String>, detail: impl Into<String>) -> Item {
    Item {
        item: item.into(),
        ok: true,
        detail: detail.into(),
        fix: None,
    }
}

fn fail(item: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Item {
    Item {
        item: item.into(),
        ok: false,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

/// Runs every check; the configuration's items only when it loads.
pub async fn run(config_path: &Path) -> Vec<Item> {
    let mut items = kernel();
    let config = match Config::load(config_path) {
        Ok(c) => {
            items.insert(
                0,
                ok(
                    "config",
                    format!(
                        "{}: {} sets, {} targets",
                        config_path.display(),
                        c.sets.len(),
                        c.targets.len()
                    ),
                ),
            );
            c
        }
        Err(e) => {
            items.insert(
                0,
                fail(
                    "config",
                    format!("{e:#}"),
                    "fix the file as the message says (agent/README.md lists every key)",
                ),
            );
            return items;
        }
    };
    items.push(state_dir(&config.state_dir));
    for s in &config.sets {
        let item = format!("set {}", s.name);
        items.push(match std::fs::metadata(&s.root) {
            Ok(m) if m.is_dir() => ok(item, set_capture(&s.root)),
            Ok(_) => fail(
                item,
                format!("{} is not a directory", s.root.display()),
                "point `root` at the directory to replicate",
            ),
            Err(e) => fail(
                item,
                format!("{}: {e}", s.root.display()),
                "create the directory or fix `root`",
            ),
        });
    }
    let identity = match doppel_transport::Identity::load(&config.cert, &config.key) {
        Ok(id) => {
            items.push(ok(
                "keys",
                format!("this agent's fingerprint is {}", id.fingerprint()),
            ));
            id
        }
        Err(e) => {
            items.push(fail(
                "keys",
                format!("{e:#}"),
                "create them with `doppel-agent keygen --out DIR` and point `cert` and `key` at them",
            ));
            return items;
        }
    };
    for t in &config.targets {
        let item = format!("target {}", t.name);
        let r = tokio::time::timeout(
            CONNECT_TIMEOUT,
            doppel_transport::connect(&identity, t.address, &t.fingerprint),
        )
        .await;
        items.push(match r {
            Ok(Ok(conn)) => {
                conn.close(doppel_transport::close::DONE, b"preflight check");
                ok(item, format!("{} answers and its certificate matches; it accepts this agent", t.address))
            }
            Ok(Err(e)) => fail(
                item,
                format!("{}: {e:#}", t.address),
                format!(
                    "check that doppel-receiver runs there, that `fingerprint` is what its keygen printed, \
                     and that its receiver.toml has a [[source]] with this agent's fingerprint {}",
                    identity.fingerprint()
                ),
            ),
            Err(_) => fail(
                item,
                format!("{}: no answer within {CONNECT_TIMEOUT:?}", t.address),
                "check that doppel-receiver runs at that address and that UDP to its port is allowed",
            ),
        });
    }
    items
}

/// Kernel features and permissions, independent of the configuration.
/// What a set root's filesystem means for its capture.
fn set_capture(root: &Path) -> String {
    use crate::capture::marks::{covered_devs, marked_fs};
    match marked_fs(root) {
        Ok(Some(fs)) if !covered_devs(&[fs]).is_empty() => format!(
            "{} is a directory on {}: captured inside the filesystem (every write, Linux \
             AIO and 32-bit syscalls included; namespace changes through fanotify), with no \
             syscall hook",
            root.display(),
            fs.kind.name()
        ),
        Ok(Some(fs)) => format!(
            "{} is a directory on {} with more inode numbers ({}) than the capture's bitmap \
             holds: captured at the syscall door (a sys_exit hook every process on the host \
             pays for; writes through Linux AIO or 32-bit syscalls are not seen)",
            root.display(),
            fs.kind.name(),
            fs.inodes
        ),
        _ => format!(
            "{} is a directory, not on ext4 or xfs: captured at the syscall door (a sys_exit \
             hook every process on the host pays for; writes through Linux AIO or 32-bit \
             syscalls are not seen)",
            root.display()
        ),
    }
}

fn kernel() -> Vec<Item> {
    let mut items = Vec::new();
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    items.push(if root {
        ok("privileges", "running as root")
    } else {
        fail(
            "privileges",
            "not running as root",
            "run doppel-agent as root (it loads eBPF programs: CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN)",
        )
    });
    items.push(match std::fs::File::open(BTF) {
        Ok(_) => ok("btf", format!("{BTF} is readable")),
        Err(e) => fail(
            "btf",
            format!("{BTF}: {e}"),
            "this kernel has no BTF; use a kernel built with CONFIG_DEBUG_INFO_BTF=y (distribution kernels are)",
        ),
    });
    let events = PathBuf::from(TRACEFS).join("events");
    items.push(if !events.is_dir() {
        fail(
            "tracefs",
            format!("tracefs is not mounted at {TRACEFS}"),
            format!("mount it: `mount -t tracefs tracefs {TRACEFS}` (doppel-agent run also tries this itself)"),
        )
    } else if !events.join("syscalls/sys_exit_write").is_dir() {
        fail(
            "tracefs",
            "the kernel has no syscall tracepoints (syscalls/sys_exit_write)",
            "use a kernel built with CONFIG_FTRACE_SYSCALLS=y",
        )
    } else {
        ok("tracefs", format!("{TRACEFS} lists the syscall tracepoints"))
    });
    items.push(match crate::capture::filesystem_capture_available() {
        Ok(()) => ok(
            "filesystem capture",
            "fanotify reports directory handles and names, and ext4's functions are in \
             /proc/kallsyms: sets on ext4 and xfs need no syscall hook",
        ),
        Err(e) => fail(
            "filesystem capture",
            format!("{e:#}"),
            "sets on ext4 and xfs will be captured at the syscall door (every process on the host \
             pays for it): use Linux 5.17 or later with CONFIG_FANOTIFY, and run as root so \
             that /proc/kallsyms shows addresses",
        ),
    });
    items.push(match bpf_map_create() {
        Ok(()) => ok("bpf", "this process may create BPF maps"),
        Err(e) => fail(
            "bpf",
            format!("creating a BPF map failed: {e}"),
            "run as root; check `kernel.unprivileged_bpf_disabled`, kernel lockdown and seccomp (a container needs CAP_BPF and CAP_PERFMON)",
        ),
    });
    items
}

/// Creates (and closes) a one-entry array map: the cheapest proof of BPF permission.
fn bpf_map_create() -> std::io::Result<()> {
    #[repr(C)]
    #[derive(Default)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let attr = MapCreate {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        map_flags: 0,
    };
    // SAFETY: bpf(BPF_MAP_CREATE) with a valid attribute struct of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &attr as *const MapCreate,
            std::mem::size_of::<MapCreate>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is the descriptor the kernel just returned to us.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

fn state_dir(dir: &Path) -> Item {
    let probe = dir.join(".doppel-check");
    let r = std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&probe, b"ok"));
    let _ = std::fs::remove_file(&probe);
    match r {
        Ok(()) => ok("state_dir", format!("{} is writable", dir.display())),
        Err(e) => fail(
            "state_dir",
            format!("{}: {e}", dir.display()),
            "set `state_dir` to a directory root can write (journals and the control socket live there)",
        ),
    }
}
