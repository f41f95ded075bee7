//! `cargo xtask install`: the release binaries, the systemd units (`dist/systemd/`) and
//! example configurations, into a prefix (optionally under a staging `--destdir`).
//! Nothing is enabled or started: the operator configures first.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

const BINS: &[&str] = &["doppel-agent", "doppel-receiver"];
const UNITS: &[&str] = &["doppel-agent.service", "doppel-receiver.service"];

fn staged(destdir: Option<&Path>, path: &Path) -> PathBuf {
    match destdir {
        Some(d) => d.join(path.strip_prefix("/").unwrap_or(path)),
        None => path.to_path_buf(),
    }
}

fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Through a temporary name, so that a running binary is replaced, not overwritten.
    let tmp = to.with_extension("xtask-new");
    std::fs::copy(from, &tmp)
        .with_context(|| format!("cannot copy {} to {}", from.display(), tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, to).with_context(|| format!("cannot install {}", to.display()))?;
    println!("installed {}", to.display());
    Ok(())
}

pub fn run(prefix: &Path, destdir: Option<&Path>) -> Result<()> {
    crate::setup::ensure()?;
    crate::compile::release()?;
    let ws = crate::compile::workspace();
    let bindir = prefix.join("bin");
    for b in BINS {
        copy(
            &crate::compile::bin_dir().join(b),
            &staged(destdir, &bindir.join(b)),
            0o755,
        )?;
    }
    for u in UNITS {
        let text = std::fs::read_to_string(ws.join("dist/systemd").join(u))?
            .replace("@BINDIR@", &bindir.display().to_string());
        let to = staged(destdir, &Path::new("/etc/systemd/system").join(u));
        let tmp = ws.join("target").join(u);
        std::fs::write(&tmp, text)?;
        copy(&tmp, &to, 0o644)?;
    }
    for (name, example) in [
        ("agent.toml.example", "dist/agent.toml.example"),
        ("receiver.toml.example", "dist/receiver.toml.example"),
    ] {
        copy(
            &ws.join(example),
            &staged(destdir, &Path::new("/etc/doppel").join(name)),
            0o644,
        )?;
    }
    if destdir.is_none() && Path::new("/run/systemd/system").is_dir() {
        let st = Command::new("systemctl").arg("daemon-reload").status();
        if !st.is_ok_and(|s| s.success()) {
            eprintln!("install: `systemctl daemon-reload` failed; run it by hand");
        }
    }
    println!(
        "next: write /etc/doppel/agent.toml (or receiver.toml) from the example, check it with \
         `doppel-agent check --config /etc/doppel/agent.toml`, then `systemctl enable --now doppel-agent`"
    );
    Ok(())
}
