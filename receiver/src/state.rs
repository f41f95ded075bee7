//! The durable "applied up to" mark per (source, set).
//!
//! One small TOML file per set, `<state_dir>/<source>/<set>.state`, replaced atomically
//! (write a temporary file, fsync, rename, fsync the directory) so that a crash leaves
//! either the old or the new mark, never a torn one.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// What the receiver remembers about one set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetState {
    /// The agent's sequence space the mark belongs to (see `wire::SetHello`).
    pub epoch: u64,
    /// Highest sequence number applied (and, with fsync on, durable). 0 = none.
    pub seq: u64,
    /// The sequence space `epoch` ended with a failback: an agent still announcing it
    /// is told to start over (see `wire::Frame::Welcome`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stale: bool,
}

pub struct StateStore {
    dir: PathBuf,
    fsync: bool,
}

impl StateStore {
    /// Opens (creating if needed, mode 0700) the state directory.
    pub fn open(dir: &Path, fsync: bool) -> anyhow::Result<StateStore> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| {
                format!(
                    "cannot create state directory {}; set `state_dir` in the config to a \
                     writable directory",
                    dir.display()
                )
            })?;
        Ok(StateStore {
            dir: dir.to_path_buf(),
            fsync,
        })
    }

    /// Whether marks (and so the data they cover) are made durable before acknowledging.
    pub fn fsync(&self) -> bool {
        self.fsync
    }

    fn path(&self, source: &str, set: &str) -> PathBuf {
        self.dir.join(source).join(format!("{set}.state"))
    }

    /// Names of the sets of `source` that have a mark.
    pub fn sets(&self, source: &str) -> anyhow::Result<Vec<String>> {
        let dir = self.dir.join(source);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
        };
        let mut sets = Vec::new();
        for e in entries {
            let name = e?.file_name();
            if let Some(set) = name.to_str().and_then(|n| n.strip_suffix(".state")) {
                sets.push(set.to_string());
            }
        }
        sets.sort();
        Ok(sets)
    }

    /// The stored mark, or `None` if this set was never seen.
    pub fn load(&self, source: &str, set: &str) -> anyhow::Result<Option<SetState>> {
        let path = self.path(source, set);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let st = toml::from_str(&text).with_context(|| {
            format!(
                "state file {} is damaged; delete it to make the agent resend set {set:?} \
                 from its oldest kept record (or re-mirror it)",
                path.display()
            )
        })?;
        Ok(Some(st))
    }

    /// Replaces the mark atomically.
    pub fn store(&self, source: &str, set: &str, st: SetState) -> anyhow::Result<()> {
        let path = self.path(source, set);
        let dir = path.parent().expect("state path has a parent");
        let tmp = path.with_extension("state.tmp");
        let write = || -> std::io::Result<()> {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            let text = toml::to_string(&st).map_err(std::io::Error::other)?;
            f.write_all(text.as_bytes())?;
            if self.fsync {
                f.sync_data()?;
            }
            fs::rename(&tmp, &path)?;
            if self.fsync {
                File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().with_context(|| format!("cannot write state file {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let d = tempfile::tempdir().unwrap();
        let s = StateStore::open(&d.path().join("state"), true).unwrap();
        assert_eq!(s.load("web1", "www").unwrap(), None);
        let st = SetState {
            epoch: 7,
            seq: 42,
            stale: false,
        };
        s.store("web1", "www", st).unwrap();
        s.store("web1", "www", st).unwrap();
        assert_eq!(s.load("web1", "www").unwrap(), Some(st));
        fs::write(d.path().join("state/web1/www.state"), "garbage").unwrap();
        let e = format!("{:#}", s.load("web1", "www").unwrap_err());
        assert!(e.contains("damaged"), "{e}");
    }
}
