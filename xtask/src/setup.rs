//! Installs what doppel's build and tests need on a fresh machine, idempotently: each
//! step checks first and only acts when something is missing, so a second run takes
//! seconds. A failing step prints one line: what failed and what to do.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Result};

/// Debian packages the tests and benchmarks run as workloads and baselines.
const TOOL_PACKAGES: &[(&str, &str)] = &[
    ("fio", "fio"),
    ("sqlite3", "sqlite3"),
    ("rsync", "rsync"),
    ("git", "git"),
    ("ip", "iproute2"),
    ("mkfs.ext4", "e2fsprogs"),
    // The fidelity, order and workload tests run again with the source on xfs.
    ("mkfs.xfs", "xfsprogs"),
    // The fidelity tests set and compare POSIX ACLs and extended attributes.
    ("setfacl", "acl"),
    ("getfattr", "attr"),
    // The failover benchmark's baseline (VRRP), and the namespaces' tools.
    ("keepalived", "keepalived"),
    ("nsenter", "util-linux"),
];

pub fn cargo_bin() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    home.join("bin")
}

/// PATH with cargo's bin directory first (where bpf-linker is installed).
/// PATH with cargo's bin directory (bpf-linker) on it. Left as it is when it already
/// has it: build scripts rerun when PATH changes (the agent's looks for bpf-linker
/// there), so a PATH that differed from the shell's rebuilt half the workspace on
/// every `cargo xtask` run.
pub fn path_env() -> String {
    let old = std::env::var("PATH").unwrap_or_default();
    let bin = cargo_bin();
    if std::env::split_paths(&old).any(|p| p == bin) {
        old
    } else {
        format!("{}:{old}", bin.display())
    }
}

fn ok(cmd: &mut Command) -> bool {
    cmd.env("PATH", path_env())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run_step(what: &str, fix: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("setup: installing {what} ...");
    let st = cmd.env("PATH", path_env()).status();
    match st {
        Ok(s) if s.success() => {
            eprintln!("setup: {what} installed");
            Ok(())
        }
        Ok(s) => bail!("setup: installing {what} failed ({s}); {fix}"),
        Err(e) => bail!("setup: installing {what} failed ({e}); {fix}"),
    }
}

fn have_bin(name: &str) -> bool {
    ok(Command::new("sh").args(["-c", &format!("command -v {name}")]))
}

fn nightly_ok() -> bool {
    ok(Command::new("rustc").args(["+nightly", "--version"]))
}

fn rust_src_ok() -> bool {
    let Ok(o) = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()
    else {
        return false;
    };
    let root = String::from_utf8_lossy(&o.stdout).trim().to_string();
    PathBuf::from(root)
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .exists()
}

fn llvm_ok() -> bool {
    PathBuf::from("/usr/lib/llvm-22/lib/libLLVM.so").exists()
        || ok(
            Command::new("sh").args(["-c", "ls /usr/lib/llvm-22/lib/libLLVM*.so* >/dev/null 2>&1"])
        )
}

fn bpf_linker_ok() -> bool {
    ok(Command::new("bpf-linker").arg("--version"))
}

fn missing_packages() -> Vec<&'static str> {
    let mut pkgs: Vec<&str> = TOOL_PACKAGES
        .iter()
        .filter(|(bin, _)| !have_bin(bin))
        .map(|(_, p)| *p)
        .collect();
    if !llvm_ok() {
        pkgs.push("llvm-22-dev");
    }
    // The metrics test parses the endpoint with the Prometheus project's own parser.
    if !ok(Command::new("/usr/bin/python3").args(["-c", "import prometheus_client"])) {
        pkgs.push("python3-prometheus-client");
    }
    pkgs
}

/// True when nothing needs installing (cheap: a few file checks and --version calls).
pub fn complete() -> bool {
    nightly_ok() && rust_src_ok() && bpf_linker_ok() && missing_packages().is_empty()
}

/// Runs setup only if something is missing.
pub fn ensure() -> Result<()> {
    if complete() {
        return Ok(());
    }
    run()
}

pub fn run() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "setup: must run as root (it installs Debian packages and loads eBPF); rerun with sudo"
        );
    }
    if !nightly_ok() {
        run_step(
            "the nightly Rust toolchain",
            "check network access to static.rust-lang.org, or install it with rustup by hand",
            Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]),
        )?;
    } else {
        eprintln!("setup: nightly toolchain ok");
    }
    if !rust_src_ok() {
        run_step(
            "rust-src for nightly",
            "run `rustup component add rust-src --toolchain nightly` and read its error",
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        )?;
    } else {
        eprintln!("setup: rust-src ok");
    }
    let pkgs = missing_packages();
    if !pkgs.is_empty() {
        run_step(
            "the Debian package index",
            "check that apt sources are reachable (`apt-get update`)",
            Command::new("apt-get").args(["update", "-qq"]),
        )?;
        run_step(
            &format!("Debian packages {}", pkgs.join(" ")),
            "run `apt-get install -y <packages>` by hand and read its error",
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&pkgs)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    } else {
        eprintln!("setup: llvm-22-dev and test tools ok");
    }
    if !bpf_linker_ok() {
        run_step(
            "bpf-linker (builds against llvm-22, 1-2 minutes)",
            "check that llvm-22-dev is installed, then run `LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --no-default-features --features llvm-22`",
            Command::new("cargo")
                .args(["install", "bpf-linker", "--no-default-features", "--features", "llvm-22"])
                .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
        )?;
    } else {
        eprintln!("setup: bpf-linker ok");
    }
    eprintln!("setup: complete");
    Ok(())
}
