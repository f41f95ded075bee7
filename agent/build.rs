//! Builds the eBPF capture program (`../ebpf`, its own cargo workspace) with the nightly
//! toolchain and `bpf-linker`, and leaves the object at `$OUT_DIR/doppel-ebpf.o` for
//! `include_bytes_aligned!` in `src/capture/mod.rs`: the agent ships as one binary.
//!
//! Requirements (installed by `cargo xtask setup`): a rustup `nightly` toolchain with the
//! `rust-src` component, and `bpf-linker` on PATH (or in `$CARGO_HOME/bin`).

use std::{
    env,
    path::{Path, PathBuf},
    process::{exit, Command},
};

const SETUP_HINT: &str = "run `cargo xtask setup`";

fn fail(msg: &str) -> ! {
    // One line: cargo shows it verbatim under "failed to run custom build command".
    eprintln!("error: {msg}; {SETUP_HINT}");
    exit(1);
}

fn cargo_home_bin() -> Option<PathBuf> {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|h| h.join("bin"))
}

fn on_path(tool: &str, extra: Option<&Path>) -> bool {
    let paths = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&paths)
        .chain(extra.map(Path::to_path_buf))
        .any(|dir| dir.join(tool).is_file())
}

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let root = manifest_dir
        .parent()
        .expect("agent/ lives inside the workspace")
        .to_path_buf();
    let ebpf_dir = root.join("ebpf");

    for p in [
        "ebpf/src",
        "ebpf/Cargo.toml",
        "ebpf/Cargo.lock",
        "common/src/abi.rs",
        "common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=PATH");

    let cargo_bin = cargo_home_bin();
    if !on_path("bpf-linker", cargo_bin.as_deref()) {
        fail("bpf-linker is not installed (needed to link the eBPF capture program)");
    }
    let rustup = if on_path("rustup", None) {
        PathBuf::from("rustup")
    } else {
        match &cargo_bin {
            Some(b) if b.join("rustup").is_file() => b.join("rustup"),
            _ => {
                fail("rustup is not installed (the eBPF program builds with the nightly toolchain)")
            }
        }
    };
    let nightly_ok = Command::new(&rustup)
        .args(["run", "nightly", "rustc", "--version"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !nightly_ok {
        fail("the nightly Rust toolchain is not installed (the eBPF program needs it)");
    }

    let mut cmd = Command::new(&rustup);
    cmd.args(["run", "nightly", "cargo", "build", "--release", "--locked"])
        .args(["-Z", "build-std=core", "--target", "bpfel-unknown-none"])
        .arg("--manifest-path")
        .arg(ebpf_dir.join("Cargo.toml"))
        // Its own target dir (ignored by git): never the outer build's, whose lock the
        // outer cargo holds while this script runs.
        .arg("--target-dir")
        .arg(ebpf_dir.join("target"))
        .current_dir(&ebpf_dir);
    // The outer build's settings must not leak into the inner one: they name the stable
    // compiler, host-only flags, wrappers (clippy-driver) and the outer target dir.
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let keep = matches!(key, "CARGO_HOME" | "CARGO_MAKEFLAGS")
            || key.starts_with("CARGO_NET_")
            || key.starts_with("CARGO_HTTP_")
            || key.starts_with("CARGO_REGISTRIES_")
            || key.starts_with("CARGO_TERM_");
        let drop = (key.starts_with("CARGO_") && !keep)
            || key.starts_with("RUSTC")
            || key.starts_with("RUSTDOC")
            || matches!(
                key,
                "CARGO"
                    | "RUSTFLAGS"
                    | "RUSTUP_TOOLCHAIN"
                    | "TARGET"
                    | "HOST"
                    | "OUT_DIR"
                    | "PROFILE"
                    | "OPT_LEVEL"
                    | "DEBUG"
                    | "NUM_JOBS"
            );
        if drop {
            cmd.env_remove(key);
        }
    }
    if let Some(b) = &cargo_bin {
        // bpf-linker is commonly installed in $CARGO_HOME/bin, which may not be on PATH.
        let paths = env::var_os("PATH").unwrap_or_default();
        let joined = env::join_paths(env::split_paths(&paths).chain(std::iter::once(b.clone())))
            .unwrap_or(paths);
        cmd.env("PATH", joined);
    }

    let status = cmd
        .status()
        .unwrap_or_else(|e| fail(&format!("cannot run {cmd:?}: {e}")));
    if !status.success() {
        eprintln!(
            "error: building the eBPF capture program failed ({status}); see the compiler \
             output above. If the toolchain is incomplete, {SETUP_HINT}"
        );
        exit(1);
    }
    let object = ebpf_dir.join("target/bpfel-unknown-none/release/doppel-ebpf");
    let dest = out_dir.join("doppel-ebpf.o");
    if let Err(e) = std::fs::copy(&object, &dest) {
        fail(&format!(
            "cannot copy {} to {}: {e}",
            object.display(),
            dest.display()
        ));
    }
}
