//! `cargo xtask test`: unit tests of every crate, then the end-to-end tests (real
//! eBPF, real QUIC, real processes), one at a time so their timing is not distorted,
//! then a brief run of every fuzz target.

use anyhow::{bail, Result};

use crate::compile::{bin_dir, cargo, release};

/// Seconds per fuzz target in `cargo xtask test` (`cargo xtask fuzz` runs longer).
const FUZZ_SECONDS: u64 = 10;

/// End-to-end test files run again with the source root on xfs (`DOPPEL_TEST_FS`).
const XFS_PASSES: &[(&str, &[&str])] = &[
    ("xfs", &["fidelity", "order", "workloads", "restart"]),
    ("xfs-large", &["fidelity", "order"]),
];

/// The daemons run under this open file limit (soft and hard) during the tests: the
/// common default, and what CI machines have. A developer's machine often allows far
/// more, which hid a receiver that held a descriptor per dirty file until its commit.
const OPEN_FILES: u64 = 1024;

fn limit_open_files(n: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    let n = n.min(lim.rlim_max);
    lim.rlim_cur = n;
    lim.rlim_max = n;
    // Lowering is always allowed; every process started from here inherits it.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        bail!(
            "cannot set the open file limit to {n}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

pub fn run(filter: Option<&str>) -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("tests load eBPF programs and mount filesystems: run `cargo xtask test` as root");
    }
    crate::setup::ensure()?;
    release()?;
    std::env::set_var("DOPPEL_BIN_DIR", bin_dir());
    std::env::set_var("DOPPEL_REQUIRE_ROOT", "1");
    let f = filter.unwrap_or("");
    limit_open_files(OPEN_FILES)?;
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
    // Again with the source root on a loop-mounted xfs: what the capture inside the
    // filesystem must see there too (data paths, namespace, order, real programs), with
    // the exact bitmap and, on a large xfs, with the bloom filter.
    for (fs, tests) in XFS_PASSES {
        std::env::set_var("DOPPEL_TEST_FS", fs);
        let mut args = vec!["test", "--release", "-p", "doppel-tests"];
        for t in *tests {
            args.extend(["--test", t]);
        }
        args.extend(["--", "--test-threads=1", f]);
        cargo(&args)?;
    }
    std::env::remove_var("DOPPEL_TEST_FS");
    if filter.is_none() {
        crate::fuzz::run(FUZZ_SECONDS)?;
    }
    eprintln!("xtask test: all tests passed");
    Ok(())
}
