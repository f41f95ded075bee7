//! Helpers for doppel's end-to-end tests and for `cargo xtask demo`/`bench`: a real
//! receiver and a real agent as child processes, a tree comparer (content or strict), a
//! random writer, checked syscall wrappers.

pub mod cluster;
pub mod disk;
pub mod fsops;
pub mod netns;
pub mod takeover;
pub mod tree;
pub mod writer;

use std::path::PathBuf;

/// Where the doppel binaries are: `$DOPPEL_BIN_DIR`, else `target/release` of this
/// workspace (`cargo xtask test` builds them there first).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DOPPEL_BIN_DIR") {
        return PathBuf::from(d);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release")
}

/// End-to-end tests need root (eBPF, mounts, namespaces). Returns false (and says why)
/// when not root so that a plain `cargo test` as a user does not fail confusingly;
/// `cargo xtask test` always runs as root and sets DOPPEL_REQUIRE_ROOT=1 so that a
/// skipped test fails there instead.
pub fn require_root() -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        if std::env::var_os("DOPPEL_REQUIRE_ROOT").is_some() {
            panic!("end-to-end tests must run as root");
        }
        eprintln!("skipping: end-to-end tests need root (run `cargo xtask test` as root)");
    }
    root
}
