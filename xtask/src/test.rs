//! `cargo xtask test`: unit tests of every crate, then the end-to-end tests (real
//! eBPF, real QUIC, real processes), one at a time so their timing is not distorted,
//! then a brief run of every fuzz target.

use anyhow::{bail, Result};

use crate::compile::{bin_dir, cargo, release};

/// Seconds per fuzz target in `cargo xtask test` (`cargo xtask fuzz` runs longer).
const FUZZ_SECONDS: u64 = 10;

pub fn run(filter: Option<&str>) -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("tests load eBPF programs and mount filesystems: run `cargo xtask test` as root");
    }
    crate::setup::ensure()?;
    release()?;
    std::env::set_var("DOPPEL_BIN_DIR", bin_dir());
    std::env::set_var("DOPPEL_REQUIRE_ROOT", "1");
    let f = filter.unwrap_or("");
    cargo(&[
        "test",
        "--release",
        "--workspace",
        "--exclude",
        "doppel-tests",
        "--",
        f,
    ])?;
    cargo(&[
        "test",
        "--release",
        "-p",
        "doppel-tests",
        "--",
        "--test-threads=1",
        f,
    ])?;
    if filter.is_none() {
        crate::fuzz::run(FUZZ_SECONDS)?;
    }
    eprintln!("xtask test: all tests passed");
    Ok(())
}
