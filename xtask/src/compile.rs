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
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
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
