//! Builds the release binaries the demo, the end-to-end tests and the benchmarks run.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Result};

use crate::setup::path_env;

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn bin_dir() -> PathBuf {
    workspace().join("target/release")
}

pub fn cargo(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // `cargo run` gave xtask its package's CARGO_MANIFEST_DIR, CARGO_PKG_* and the like.
    // Handed on, they reach build scripts that watch them (ring's does), which then
    // rerun and rebuild half the workspace on every `cargo xtask` run.
    for (name, _) in std::env::vars_os() {
        let n = name.to_string_lossy();
        if n.starts_with("CARGO_PKG_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
            ]
            .contains(&n.as_ref())
        {
            cmd.env_remove(&name);
        }
    }
    let st = cmd
        .args(args)
        .current_dir(workspace())
        .env("PATH", path_env())
        .status()?;
    if !st.success() {
        bail!("`cargo {}` failed ({st})", args.join(" "));
    }
    Ok(())
}

pub fn release() -> Result<()> {
    cargo(&[
        "build",
        "--release",
        "-p",
        "doppel-agent",
        "-p",
        "doppel-receiver",
        // The small TCP service the failover tests and benchmarks move between hosts.
        "-p",
        "doppel-tests",
        "--bins",
    ])
}
