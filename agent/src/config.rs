//! `agent.toml`: what to replicate, and where to.
//!
//! Every problem found here is reported with the file, the key and what to do about it,
//! before anything is loaded into the kernel.

use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::journal::{FsyncPolicy, JournalOptions};
use crate::queue::QueueMode;
use crate::rules::Rules;
use crate::throttle::{parse_hhmm, Schedule, Window};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This source's name; receivers map it to their pinned fingerprint.
    pub name: String,
    /// PEM certificate and key of this agent (`doppel-agent keygen`).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Memory queue bound per set, in MiB: above it the pipeline waits for acks (the
    /// kernel then records missed ranges instead of data, and they are resent).
    #[serde(default = "default_queue_mib")]
    pub queue_memory_mib: usize,
    /// Size of the kernel's capture ring buffer, KiB (rounded up to a power of two).
    /// Writes that find it full are remembered as ranges and re-read, never lost.
    #[serde(default = "default_ring_kib")]
    pub capture_ring_kib: usize,
    /// Where the journals of store-and-forward and hybrid sets live (`<state_dir>/journal/<set>`).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Disk budget of each set's journal, MiB.
    #[serde(default = "default_budget_mib")]
    pub journal_budget_mib: u64,
    /// When journaled records are fsynced: "always" (every batch), "interval"
    /// (at most `journal_fsync_interval_ms` stale; records are sent once durable), "never".
    #[serde(default = "default_fsync")]
    pub journal_fsync: String,
    #[serde(default = "default_fsync_ms")]
    pub journal_fsync_interval_ms: u64,
    #[serde(default, rename = "target")]
    pub targets: Vec<TargetConfig>,
    #[serde(default, rename = "set")]
    pub sets: Vec<SetConfig>,
    /// A connected set whose oldest unacknowledged change is this old is shown as
    /// `degraded` by `status` (and in metrics).
    #[serde(default = "default_degraded_lag_s")]
    pub degraded_lag_s: u64,
    /// A restart skips files unchanged since the last run stamped them (see `stamps.rs`);
    /// a file changed within this many seconds before a stamp is taken is not stamped,
    /// as a write in progress or a store into a dirty shared-mapping page may not have
    /// reached the agent yet. Lower it only where no writer holds a write (or a dirty
    /// mapped page) longer; 0 turns the shortcut off (every restart compares every file).
    #[serde(default = "default_stamp_margin_s")]
    pub stamp_margin_s: u64,
    /// A receiver's config on this host, whose replica roots no set may contain (the
    /// agent would replicate the replica). Default: /etc/doppel/receiver.toml if present;
    /// "" for no check.
    pub local_receiver_config: Option<PathBuf>,
    /// `[log]`: format and level (see doppel-control's `log`).
    #[serde(default)]
    pub log: doppel_control::log::LogConfig,
    /// `[metrics]`: `listen = "127.0.0.1:9750"` serves Prometheus metrics.
    #[serde(default)]
    pub metrics: doppel_control::metrics::MetricsConfig,
}

fn default_degraded_lag_s() -> u64 {
    30
}

fn default_stamp_margin_s() -> u64 {
    crate::stamps::MARGIN.as_secs()
}

fn default_queue_mib() -> usize {
    64
}

fn default_ring_kib() -> usize {
    8 << 10
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/doppel-agent")
}

fn default_budget_mib() -> u64 {
    4096
}

fn default_fsync() -> String {
    "interval".into()
}

fn default_fsync_ms() -> u64 {
    100
}

fn default_queue_mode() -> QueueMode {
    QueueMode::Hybrid
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub name: String,
    /// `host:port` of the receiver's QUIC listener.
    pub address: String,
    /// The receiver certificate's SHA-256 fingerprint (`doppel-receiver keygen` prints it).
    pub fingerprint: String,
    /// zstd level for batches sent to this target, 1 (fast) to 19 (small); 0 = off.
    /// Read as i64 so that a negative value gets our error, not a type error.
    #[serde(default = "default_compression")]
    pub compression_level: i64,
    /// Bytes per second on the wire (after compression); 0 = unlimited.
    #[serde(default)]
    pub bandwidth_limit: u64,
    /// Time windows with their own limit; the first that matches wins.
    #[serde(default)]
    pub schedule: Vec<WindowConfig>,
}

/// `[[target.schedule]]`: from `from` to `to` (local "HH:MM", may wrap midnight) the
/// limit is `limit` bytes/s (0 = unlimited) instead of the target's `bandwidth_limit`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    pub from: String,
    pub to: String,
    pub limit: u64,
}

fn default_compression() -> i64 {
    1
}

/// zstd's highest level before the memory-hungry "ultra" ones.
const MAX_COMPRESSION: i64 = 19;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetConfig {
    pub name: String,
    /// Absolute path of the directory tree to replicate.
    pub root: PathBuf,
    /// Globs, relative to `root`, of files to replicate (default: everything).
    #[serde(default = "default_include")]
    pub include: Vec<String>,
    /// Globs of files and directories to leave out (a matching directory excludes its
    /// whole subtree).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Names of `[[target]]`s this set is replicated to.
    pub targets: Vec<String>,
    /// "realtime", "store-and-forward" or "hybrid" (default).
    #[serde(default = "default_queue_mode")]
    pub queue: QueueMode,
    /// Block size, KiB, at which the mirror, resyncs and verify compare files with the
    /// replica (a power of two, 4 to 16384). Smaller blocks send less when little
    /// changed, at the cost of more checksums.
    #[serde(default = "default_mirror_block_kib")]
    pub mirror_block_kib: u32,
    /// What the mirror does with entries only the replica has: "delete" (default) or
    /// "keep".
    #[serde(default)]
    pub orphans: Orphans,
    /// Like rsync's default: a file whose size, mtime, mode and owner match the replica's
    /// is not compared block by block. Much faster after a restart over a large set
    /// that barely changed, but a file whose content changed while its size and mtime
    /// stayed (an mtime set back by `touch -r`, `tar -x`, `cp -p`) is not noticed until
    /// it changes again or `verify` runs. Default false: every block is compared.
    #[serde(default)]
    pub mirror_quick_check: bool,
}

fn default_mirror_block_kib() -> u32 {
    doppel_common::wire::sums::DEFAULT_BLOCK >> 10
}

/// Entries the replica has and the source does not, found by a mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Orphans {
    /// Removed: the replica is an exact copy.
    #[default]
    Delete,
    /// Left alone (files written on the target, or by an older configuration).
    Keep,
    /// Moved to `.doppel-orphans/<mirror start, Unix seconds>/` at the root of the
    /// replica, for an operator to inspect (see `wire::Op::PruneAside`).
    MoveAside,
}

fn default_include() -> Vec<String> {
    vec!["**".into()]
}

/// A validated configuration, with paths resolved and targets looked up.
#[derive(Debug, Clone)]
pub struct Config {
    pub name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub queue_memory_bytes: usize,
    pub capture_ring_bytes: usize,
    pub state_dir: PathBuf,
    pub journal: JournalOptions,
    pub targets: Vec<Target>,
    pub sets: Vec<Set>,
    pub log: doppel_control::log::LogConfig,
    pub metrics: doppel_control::metrics::MetricsConfig,
    pub degraded_lag: std::time::Duration,
    /// `None`: restarts compare every file (see [`AgentConfig::stamp_margin_s`]).
    pub stamp_margin: Option<std::time::Duration>,
}

#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub address: SocketAddr,
    pub fingerprint: String,
    /// zstd level, 0 = off.
    pub compression_level: i32,
    /// Bytes/s on the wire by time of day.
    pub bandwidth: Schedule,
}

#[derive(Debug, Clone)]
pub struct Set {
    pub name: String,
    /// Canonical (symlink-free) absolute root.
    pub root: PathBuf,
    pub rules: Rules,
    /// Indexes into [`Config::targets`].
    pub targets: Vec<usize>,
    pub queue: QueueMode,
    /// Bytes per block of the mirror's comparisons.
    pub mirror_block: u32,
    pub orphans: Orphans,
    pub mirror_quick_check: bool,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read config file {}: check the path given to --config",
                path.display()
            )
        })?;
        let raw: AgentConfig = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        raw.validate(base)
            .map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))
    }
}

const DEFAULT_RECEIVER_CONFIG: &str = "/etc/doppel/receiver.toml";

/// The replica roots a receiver config names (`[[source]] root` and `sets` values), made
/// absolute against the file's directory and with symlinks resolved where they exist;
/// each with the file it came from.
fn local_replica_roots(path: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value: toml::Value = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
    let base = path.parent().unwrap_or(Path::new("/"));
    let mut roots = Vec::new();
    let sources = value.get("source").and_then(|s| s.as_array());
    for src in sources.into_iter().flatten() {
        let root = src.get("root").and_then(|r| r.as_str());
        let sets = src.get("sets").and_then(|s| s.as_table());
        let set_roots = sets.into_iter().flatten().filter_map(|(_, v)| v.as_str());
        for r in root.into_iter().chain(set_roots) {
            let p = base.join(r);
            let p = std::fs::canonicalize(&p).unwrap_or(p);
            roots.push((p, path.to_path_buf()));
        }
    }
    Ok(roots)
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s != "."
        && s != ".."
}

impl AgentConfig {
    /// Checks everything and resolves relative key paths against `base` (the config
    /// file's directory).
    pub fn validate(self, base: &Path) -> Result<Config> {
        if !valid_name(&self.name) {
            bail!("key `name`: {:?} is not a valid source name; use 1-64 letters, digits, '-', '_' or '.'", self.name);
        }
        if self.sets.is_empty() {
            bail!(
                "no `[[set]]` configured: add at least one replication set (name, root, targets)"
            );
        }
        if self.targets.is_empty() {
            bail!(
                "no `[[target]]` configured: add at least one target (name, address, fingerprint)"
            );
        }
        let mut targets = Vec::new();
        let mut names = HashSet::new();
        for (i, t) in self.targets.iter().enumerate() {
            let key = format!("target[{i}]");
            if !valid_name(&t.name) || !names.insert(t.name.clone()) {
                bail!("key `{key}.name`: {:?} is empty, invalid or used twice; give each target a unique name", t.name);
            }
            let address = t
                .address
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .with_context(|| {
                    format!(
                        "key `{key}.address`: {:?} is not a reachable host:port; write it like \"192.0.2.10:7443\"",
                        t.address
                    )
                })?;
            let fingerprint = doppel_transport::parse_fingerprint(&t.fingerprint)
                .with_context(|| format!("key `{key}.fingerprint`"))?;
            if !(0..=MAX_COMPRESSION).contains(&t.compression_level) {
                bail!(
                    "key `{key}.compression_level`: {} is out of range; use 1 (fast) to {MAX_COMPRESSION} (small), or 0 to send uncompressed",
                    t.compression_level
                );
            }
            let mut windows = Vec::new();
            for (j, w) in t.schedule.iter().enumerate() {
                let wkey = format!("{key}.schedule[{j}]");
                let time = |field: &str, v: &str| {
                    parse_hhmm(v).with_context(|| {
                        format!("key `{wkey}.{field}`: {v:?} is not a time of day; write local time as \"HH:MM\", 00:00 to 23:59")
                    })
                };
                let from = time("from", &w.from)?;
                let to = time("to", &w.to)?;
                if from == to {
                    bail!("key `{wkey}.to`: the window starts and ends at {:?}, so it is empty; for a limit all day use `{key}.bandwidth_limit`", w.to);
                }
                windows.push(Window {
                    from,
                    to,
                    limit: w.limit,
                });
            }
            targets.push(Target {
                name: t.name.clone(),
                address,
                fingerprint,
                compression_level: t.compression_level as i32,
                bandwidth: Schedule {
                    default: t.bandwidth_limit,
                    windows,
                },
            });
        }
        let replicas = match &self.local_receiver_config {
            // Explicitly none (the temporary agent of a failback mirrors replica roots).
            Some(p) if p.as_os_str().is_empty() => Vec::new(),
            Some(p) => local_replica_roots(&base.join(p)).context("key `local_receiver_config`")?,
            None if Path::new(DEFAULT_RECEIVER_CONFIG).exists() => {
                // Only a hint: a receiver config this agent cannot parse is the
                // receiver's problem, and must not stop replication here.
                local_replica_roots(Path::new(DEFAULT_RECEIVER_CONFIG)).unwrap_or_default()
            }
            None => Vec::new(),
        };
        let mut sets: Vec<Set> = Vec::new();
        let mut set_names = HashSet::new();
        for (i, s) in self.sets.iter().enumerate() {
            let key = format!("set[{i}]");
            if !valid_name(&s.name) || !set_names.insert(s.name.clone()) {
                bail!("key `{key}.name`: {:?} is empty, invalid or used twice; give each set a unique name of letters, digits, '-', '_' or '.'", s.name);
            }
            if !s.root.is_absolute() {
                bail!(
                    "key `{key}.root`: {} is not absolute; write the full path",
                    s.root.display()
                );
            }
            let root = std::fs::canonicalize(&s.root).with_context(|| {
                format!(
                    "key `{key}.root`: {} cannot be opened; create the directory or fix the path",
                    s.root.display()
                )
            })?;
            if !root.is_dir() {
                bail!("key `{key}.root`: {} is not a directory", s.root.display());
            }
            for other in &sets {
                if root.starts_with(&other.root) || other.root.starts_with(&root) {
                    bail!(
                        "key `{key}.root`: {} overlaps set {:?} ({}); sets must not contain each other — use exclude rules instead",
                        root.display(),
                        other.name,
                        other.root.display()
                    );
                }
            }
            for (replica, file) in &replicas {
                if replica.starts_with(&root) || root.starts_with(replica) {
                    bail!(
                        "key `{key}.root`: {} overlaps {}, a replica root of the local receiver ({}): the agent would replicate what it receives; move one of them, or set `local_receiver_config`",
                        root.display(),
                        replica.display(),
                        file.display()
                    );
                }
            }
            // Where receivers move orphans aside: a source entry of that name would
            // collide with it.
            let mut exclude = s.exclude.clone();
            exclude.push(doppel_common::wire::ORPHANS_DIR.to_string());
            let rules = Rules::new(&s.include, &exclude)
                .with_context(|| format!("key `{key}.include`/`{key}.exclude`"))?;
            if s.targets.is_empty() {
                bail!("key `{key}.targets`: empty; name at least one [[target]]");
            }
            if s.targets.len() > crate::mirror::MAX_TARGETS {
                bail!(
                    "key `{key}.targets`: {} targets; a set may have at most {}",
                    s.targets.len(),
                    crate::mirror::MAX_TARGETS
                );
            }
            let mirror_block = s.mirror_block_kib.saturating_mul(1024);
            if doppel_common::wire::sums::check(0, 0, mirror_block, 0).is_err() {
                bail!(
                    "key `{key}.mirror_block_kib`: {} is not a power of two from 4 to 16384; the default is 64",
                    s.mirror_block_kib
                );
            }
            let mut idx = Vec::new();
            for t in &s.targets {
                let Some(n) = targets.iter().position(|x| &x.name == t) else {
                    bail!("key `{key}.targets`: no [[target]] is named {t:?}; define it or fix the name");
                };
                idx.push(n);
            }
            sets.push(Set {
                name: s.name.clone(),
                root,
                rules,
                targets: idx,
                queue: s.queue,
                mirror_block,
                orphans: s.orphans,
                mirror_quick_check: s.mirror_quick_check,
            });
        }
        let fsync = match self.journal_fsync.as_str() {
            "always" => FsyncPolicy::Always,
            "interval" => FsyncPolicy::Interval(std::time::Duration::from_millis(
                self.journal_fsync_interval_ms.max(1),
            )),
            "never" => FsyncPolicy::Never,
            other => bail!(
                "key `journal_fsync`: {other:?} is not one of \"always\", \"interval\", \"never\""
            ),
        };
        if self.journal_budget_mib < 1 {
            bail!("key `journal_budget_mib`: must be at least 1");
        }
        let state_dir = base.join(&self.state_dir);
        for (i, s) in self.sets.iter().enumerate() {
            if s.queue.uses_journal() && state_dir.starts_with(&s.root) {
                bail!("key `state_dir`: {} is inside set[{i}]'s root; put the journals outside every replicated tree", state_dir.display());
            }
        }
        Ok(Config {
            name: self.name,
            cert: base.join(&self.cert),
            key: base.join(&self.key),
            queue_memory_bytes: self.queue_memory_mib.max(1) << 20,
            capture_ring_bytes: self.capture_ring_kib.max(4) << 10,
            state_dir,
            journal: JournalOptions {
                fsync,
                budget_bytes: self.journal_budget_mib << 20,
                ..JournalOptions::default()
            },
            targets,
            sets,
            log: self.log,
            metrics: self.metrics,
            degraded_lag: std::time::Duration::from_secs(self.degraded_lag_s.max(1)),
            stamp_margin: (self.stamp_margin_s > 0)
                .then(|| std::time::Duration::from_secs(self.stamp_margin_s)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        let raw: AgentConfig = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        raw.validate(Path::new("/etc/doppel"))
    }

    const FP: &str = "aa00000000000000000000000000000000000000000000000000000000000000";

    fn good(root: &str) -> String {
        format!(
            r#"
name = "web1"
cert = "agent/cert.pem"
key = "agent/key.pem"
[[target]]
name = "backup"
address = "127.0.0.1:7443"
fingerprint = "{FP}"
[[set]]
name = "data"
root = "{root}"
targets = ["backup"]
"#
        )
    }

    #[test]
    fn a_good_config_resolves() {
        let dir = tempfile::tempdir().unwrap();
        let c = parse(&good(dir.path().to_str().unwrap())).unwrap();
        assert_eq!(c.cert, Path::new("/etc/doppel/agent/cert.pem"));
        assert_eq!(c.sets[0].targets, vec![0]);
        assert_eq!(c.targets[0].fingerprint, FP);
    }

    #[test]
    fn errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_str().unwrap();
        let e = parse(&good(root).replace("targets = [\"backup\"]", "targets = [\"nope\"]"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("set[0].targets") && e.contains("nope"), "{e}");
        let e = parse(&good("relative/dir")).unwrap_err().to_string();
        assert!(e.contains("set[0].root") && e.contains("absolute"), "{e}");
        let e = parse(&format!("{}\nbogus = 1\n", good(root)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
    }

    /// `good()` with `extra` lines added to its `[[target]]` (and any tables after them).
    fn with_target(root: &str, extra: &str) -> Result<Config> {
        parse(&good(root).replace("[[set]]", &format!("{extra}\n[[set]]")))
    }

    #[test]
    fn compression_and_bandwidth_default_and_parse() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_str().unwrap();
        let c = parse(&good(root)).unwrap();
        assert_eq!(c.targets[0].compression_level, 1);
        assert!(c.targets[0].bandwidth.is_unlimited());
        let c = with_target(
            root,
            r#"compression_level = 0
bandwidth_limit = 2000000
[[target.schedule]]
from = "22:00"
to = "06:00"
limit = 0
[[target.schedule]]
from = "08:00"
to = "18:00"
limit = 500000
"#,
        )
        .unwrap();
        let t = &c.targets[0];
        assert_eq!(t.compression_level, 0);
        assert_eq!(t.bandwidth.default, 2_000_000);
        assert_eq!(t.bandwidth.limit_at(23 * 60), 0);
        assert_eq!(t.bandwidth.limit_at(9 * 60), 500_000);
        assert_eq!(t.bandwidth.limit_at(20 * 60), 2_000_000);
    }

    #[test]
    fn bad_compression_and_schedules_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_str().unwrap();
        for level in ["20", "-1"] {
            let e = with_target(root, &format!("compression_level = {level}"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("target[0].compression_level") && e.contains("19"),
                "{e}"
            );
        }
        let window = |from: &str, to: &str| {
            format!(
                "[[target.schedule]]\nfrom = \"00:00\"\nto = \"01:00\"\nlimit = 1\n[[target.schedule]]\nfrom = \"{from}\"\nto = \"{to}\"\nlimit = 1\n"
            )
        };
        let e = with_target(root, &window("25:00", "06:00"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("target[0].schedule[1].from") && e.contains("HH:MM"),
            "{e}"
        );
        let e = with_target(root, &window("22:00", "6:00"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("target[0].schedule[1].to"), "{e}");
        let e = with_target(root, &window("07:00", "07:00"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("target[0].schedule[1].to") && e.contains("empty"),
            "{e}"
        );
        let e = with_target(
            root,
            "[[target.schedule]]\nfrom = \"01:00\"\nto = \"02:00\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("limit"), "{e}");
    }

    #[test]
    fn overlapping_sets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let root = dir.path().to_str().unwrap();
        let text = format!(
            "{}\n[[set]]\nname = \"inner\"\nroot = \"{root}/sub\"\ntargets = [\"backup\"]\n",
            good(root)
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("overlaps"), "{e}");
    }

    #[test]
    fn a_set_containing_a_local_replica_root_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_str().unwrap();
        std::fs::create_dir_all(dir.path().join("replica/web2")).unwrap();
        let receiver = dir.path().join("receiver.toml");
        std::fs::write(
            &receiver,
            "listen = \"[::]:7443\"\n[[source]]\nname = \"web2\"\nroot = \"replica/web2\"\n",
        )
        .unwrap();
        let text = format!(
            "local_receiver_config = \"{}\"\n{}",
            receiver.display(),
            good(root)
        );
        let e = format!("{:#}", parse(&text).unwrap_err());
        assert!(e.contains("replica root of the local receiver"), "{e}");
        assert!(e.contains("key `set[0].root`"), "{e}");

        // A receiver elsewhere is fine; a named config that is missing is not.
        let elsewhere = tempfile::tempdir().unwrap();
        let text = format!(
            "local_receiver_config = \"{}\"\n{}",
            receiver.display(),
            good(elsewhere.path().to_str().unwrap())
        );
        parse(&text).unwrap();
        let text = format!(
            "local_receiver_config = \"/nonexistent/receiver.toml\"\n{}",
            good(root)
        );
        let e = format!("{:#}", parse(&text).unwrap_err());
        assert!(e.contains("local_receiver_config"), "{e}");
    }
}
