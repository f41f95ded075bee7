//! `cargo xtask fuzz`: runs every cargo-fuzz target in `fuzz/` for a while.
//!
//! Each target starts from its committed seeds (`fuzz/corpus/<target>/`, read only) and
//! grows a working corpus in `fuzz/work/<target>/` (ignored by git) that later runs
//! continue from. A crash stops the run; libFuzzer leaves the input in
//! `fuzz/artifacts/<target>/`.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::compile::workspace;
use crate::setup::{cargo_bin, path_env};

/// rustup's `cargo` proxy (so that `+nightly` works), with PATH including cargo's bin
/// directory, and without the toolchain choice of the cargo that started xtask.
fn cargo(dir: &Path) -> Command {
    let proxy = cargo_bin().join("cargo");
    let mut cmd = Command::new(if proxy.is_file() {
        proxy
    } else {
        "cargo".into()
    });
    cmd.current_dir(dir)
        .env("PATH", path_env())
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC");
    cmd
}

/// Installs cargo-fuzz unless it is there already (idempotent).
fn ensure_cargo_fuzz(dir: &Path) -> Result<()> {
    let have = cargo(dir)
        .args(["fuzz", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if have {
        return Ok(());
    }
    eprintln!("fuzz: installing cargo-fuzz ...");
    let st = cargo(dir)
        .args(["install", "cargo-fuzz", "--locked"])
        .status()
        .context("cannot run cargo install")?;
    if !st.success() {
        bail!("installing cargo-fuzz failed ({st}); check network access to crates.io");
    }
    Ok(())
}

/// Fuzzes each target of `fuzz/` for `seconds_per_target` seconds (plus build time).
pub fn run(seconds_per_target: u64) -> Result<()> {
    // The targets link doppel-agent, whose build needs nightly and bpf-linker.
    crate::setup::ensure()?;
    let dir = workspace().join("fuzz");
    ensure_cargo_fuzz(&dir)?;

    let out = cargo(&dir)
        .args(["+nightly", "fuzz", "list"])
        .output()
        .context("cannot run `cargo fuzz list`")?;
    if !out.status.success() {
        bail!(
            "`cargo fuzz list` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let list = String::from_utf8(out.stdout).context("`cargo fuzz list` printed non-UTF-8")?;
    let targets: Vec<&str> = list.split_whitespace().collect();
    if targets.is_empty() {
        bail!("`cargo fuzz list` found no targets in {}", dir.display());
    }

    for t in &targets {
        let work = format!("work/{t}");
        let seeds = format!("corpus/{t}");
        std::fs::create_dir_all(dir.join(&work))
            .with_context(|| format!("cannot create fuzz/{work}"))?;
        eprintln!("fuzz: {t} for {seconds_per_target} s");
        let st = cargo(&dir)
            .args(["+nightly", "fuzz", "run", t, &work, &seeds, "--"])
            .arg(format!("-max_total_time={seconds_per_target}"))
            .status()
            .with_context(|| format!("cannot run `cargo fuzz run {t}`"))?;
        if !st.success() {
            // libFuzzer exits non-zero with an input in artifacts/; anything else (a
            // build error, most often) has no input to point at.
            let artifacts = dir.join("artifacts").join(t);
            let crashed = std::fs::read_dir(&artifacts).is_ok_and(|mut d| d.next().is_some());
            if !crashed {
                bail!("fuzz target {t} failed ({st}) without a crashing input: see the build or run output above");
            }
            bail!(
                "fuzz target {t} failed ({st}): the crashing input is in fuzz/artifacts/{t}/; \
                 reproduce with `cd fuzz && cargo +nightly fuzz run {t} <file>`, and once fixed \
                 copy it to fuzz/corpus/{t}/ as a regression seed"
            );
        }
    }
    eprintln!(
        "fuzz: {} targets ran {seconds_per_target} s each without a crash",
        targets.len()
    );
    Ok(())
}
