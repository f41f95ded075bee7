//! `receiver.toml`: what to listen on, who may connect, and where their sets land.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/doppel-receiver";

/// The receiver's configuration, with every path absolute and every fingerprint in its
/// canonical form.
#[derive(Debug, Clone)]
pub struct Config {
    /// QUIC (UDP) address to listen on.
    pub listen: SocketAddr,
    /// PEM certificate and key the receiver presents to agents.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Where the last applied sequence per (source, set) is kept.
    pub state_dir: PathBuf,
    /// Make applied data durable (fdatasync/fsync) before acknowledging it. Turning it
    /// off trades crash safety of the replica for latency; see README.md.
    pub fsync: bool,
    pub sources: Vec<SourceConfig>,
}

/// One agent allowed to connect.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Must equal the `source` the agent announces in its Hello.
    pub name: String,
    /// Canonical (lowercase hex) SHA-256 of the agent's certificate.
    pub fingerprint: String,
    /// Sets without an entry in `sets` land in `root/<set name>`.
    pub root: PathBuf,
    /// Set name -> replica root, for sets that land elsewhere.
    pub sets: BTreeMap<String, PathBuf>,
}

impl SourceConfig {
    /// Directory a set's files are replicated into.
    pub fn set_root(&self, set: &str) -> PathBuf {
        match self.sets.get(set) {
            Some(p) => p.clone(),
            None => self.root.join(set),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: String,
    cert: PathBuf,
    key: PathBuf,
    state_dir: Option<PathBuf>,
    fsync: Option<bool>,
    #[serde(default)]
    source: Vec<RawSource>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: String,
    fingerprint: String,
    root: PathBuf,
    #[serde(default)]
    sets: BTreeMap<String, PathBuf>,
}

impl Config {
    /// Reads and checks a config file. Relative paths in it are taken relative to the
    /// file's directory, so a config and its keys can move together.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let base = std::path::absolute(base)
            .with_context(|| format!("cannot resolve the directory of {}", path.display()))?;
        Config::parse(&text, &base).with_context(|| format!("in config file {}", path.display()))
    }

    /// Parses config text; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> anyhow::Result<Config> {
        let raw: RawConfig = toml::from_str(text)?;
        let listen: SocketAddr = raw.listen.parse().map_err(|_| {
            anyhow::anyhow!(
                "listen = {:?} is not an IP:port address; write e.g. \"0.0.0.0:7443\" or \"[::]:7443\"",
                raw.listen
            )
        })?;
        let abs = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let mut names = HashSet::new();
        let mut fps = HashSet::new();
        let mut sources = Vec::new();
        for s in raw.source {
            check_name(&s.name).context("[[source]] name")?;
            let fingerprint = doppel_transport::parse_fingerprint(&s.fingerprint)
                .with_context(|| format!("[[source]] {:?}: key `fingerprint`", s.name))?;
            if !names.insert(s.name.clone()) {
                bail!(
                    "[[source]] name {:?} appears twice; each source needs its own name",
                    s.name
                );
            }
            if !fps.insert(fingerprint.clone()) {
                bail!(
                    "[[source]] {:?}: fingerprint {fingerprint} is already used by another \
                     source; a fingerprint identifies exactly one agent, give each agent its own key",
                    s.name
                );
            }
            let mut sets = BTreeMap::new();
            for (set, root) in s.sets {
                check_name(&set)
                    .with_context(|| format!("[[source]] {:?}: key `sets.{set}`", s.name))?;
                sets.insert(set, abs(root));
            }
            sources.push(SourceConfig {
                name: s.name,
                fingerprint,
                root: abs(s.root),
                sets,
            });
        }
        if sources.is_empty() {
            bail!(
                "no [[source]] is configured, so every agent would be refused; add one with \
                 `name`, `fingerprint` (printed by the agent's keygen) and `root`"
            );
        }
        Ok(Config {
            listen,
            cert: abs(raw.cert),
            key: abs(raw.key),
            state_dir: abs(raw.state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into())),
            fsync: raw.fsync.unwrap_or(true),
            sources,
        })
    }
}

/// Source and set names become directory and file names (replica roots, state files), so
/// they must be one plain path component.
pub fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| !c.is_control() && c != '/' && c != '\\');
    if !ok {
        bail!(
            "name {name:?} is not allowed: use 1-255 characters, no '/', no control \
             characters, not starting with '.'"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn parse(text: &str) -> anyhow::Result<Config> {
        Config::parse(text, Path::new("/etc/doppel"))
    }

    #[test]
    fn full_config_parses_and_resolves_paths() {
        let c = parse(&format!(
            r#"
            listen = "127.0.0.1:7443"
            cert = "receiver/cert.pem"
            key = "/k/key.pem"
            [[source]]
            name = "web1"
            fingerprint = "SHA256:{}"
            root = "/srv/doppel/web1"
            [source.sets]
            www = "/var/www"
            "#,
            FP.to_uppercase()
        ))
        .unwrap();
        assert_eq!(c.cert, Path::new("/etc/doppel/receiver/cert.pem"));
        assert_eq!(c.key, Path::new("/k/key.pem"));
        assert_eq!(c.state_dir, Path::new(DEFAULT_STATE_DIR));
        assert!(c.fsync);
        let s = &c.sources[0];
        assert_eq!(s.fingerprint, FP);
        assert_eq!(s.set_root("www"), Path::new("/var/www"));
        assert_eq!(s.set_root("logs"), Path::new("/srv/doppel/web1/logs"));
    }

    #[test]
    fn mistakes_are_named() {
        let base = format!(
            "listen = \"127.0.0.1:1\"\ncert = \"c\"\nkey = \"k\"\n[[source]]\nname = \"a\"\nfingerprint = \"{FP}\"\nroot = \"/r\"\n"
        );
        let err = |t: &str| format!("{:#}", parse(t).unwrap_err());
        assert!(err(&format!("{base}colour = 1\n")).contains("colour"));
        assert!(err(&base.replace("127.0.0.1:1", "localhost")).contains("listen"));
        assert!(err(&base.replace(FP, "abc")).contains("fingerprint"));
        assert!(err(&base.replace("\"a\"", "\"../a\"")).contains("not allowed"));
        let twice =
            format!("{base}[[source]]\nname = \"b\"\nfingerprint = \"{FP}\"\nroot = \"/s\"\n");
        assert!(err(&twice).contains("already used"));
        let no_source = base.split("[[source]]").next().unwrap();
        assert!(err(no_source).contains("no [[source]]"));
    }
}
