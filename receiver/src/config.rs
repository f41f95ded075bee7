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
    pub log: doppel_control::log::LogConfig,
    /// `[metrics] listen = "127.0.0.1:9751"` serves Prometheus metrics.
    pub metrics: doppel_control::metrics::MetricsConfig,
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
    /// Heartbeat interval and the missed beats after which the source is lost.
    pub monitor: crate::monitor::Settings,
    /// How this receiver takes over the source's identity (see `failover`).
    pub failover: FailoverConfig,
    /// Where the data goes back at failback, if configured.
    pub failback: Option<FailbackConfig>,
}

/// `[source.failback]`: a doppel-receiver on the original source host that takes the
/// sets back, and the identity this host's temporary agent presents to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailbackConfig {
    /// The source name the temporary agent announces (a `[[source]]` of the receiver
    /// on the original source host).
    pub name: String,
    pub address: SocketAddr,
    /// That receiver's certificate fingerprint.
    pub fingerprint: String,
    /// This host's agent certificate and key (`doppel-agent keygen`).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// How long the copy back may take before the failback gives up.
    pub copy_timeout: std::time::Duration,
}

/// `[source.failover]`: what `doppel-receiver failover` does for a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverConfig {
    /// Fail over by itself once the source is lost (the split-brain guard still runs).
    pub auto: bool,
    /// Interface that takes the source's addresses.
    pub interface: Option<String>,
    /// The source's service addresses with their prefix length.
    pub addresses: Vec<(std::net::IpAddr, u8)>,
    /// Hostname to take (the kernel's, for this UTS namespace).
    pub hostname: Option<String>,
    /// How long the split-brain guard listens for an answer to its ARP/NDP probes.
    pub probe_wait: std::time::Duration,
    /// Gratuitous ARP / unsolicited NA: how many, and how far apart.
    pub announce_count: u32,
    pub announce_interval: std::time::Duration,
    pub services: Vec<ServiceConfig>,
}

impl Default for FailoverConfig {
    fn default() -> FailoverConfig {
        FailoverConfig {
            auto: false,
            interface: None,
            addresses: Vec::new(),
            hostname: None,
            probe_wait: std::time::Duration::from_millis(200),
            announce_count: 5,
            announce_interval: std::time::Duration::from_millis(200),
            services: Vec::new(),
        }
    }
}

/// `[[source.failover.service]]`: one pre-staged service, started in order at failover
/// and stopped in reverse order at failback. Commands run with `sh -c`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    pub name: String,
    pub start: String,
    pub stop: Option<String>,
    /// Run until it exits 0 (every 50 ms) after `start`; the service is up then.
    pub health: Option<String>,
    /// For `start`, then for `health` to pass, and for `stop`.
    pub timeout: std::time::Duration,
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
    #[serde(default)]
    log: doppel_control::log::LogConfig,
    #[serde(default)]
    metrics: doppel_control::metrics::MetricsConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: String,
    fingerprint: String,
    root: PathBuf,
    #[serde(default)]
    sets: BTreeMap<String, PathBuf>,
    heartbeat_ms: Option<u64>,
    missed_beats: Option<u32>,
    failover: Option<RawFailover>,
    failback: Option<RawFailback>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFailback {
    name: String,
    address: String,
    fingerprint: String,
    cert: PathBuf,
    key: PathBuf,
    copy_timeout_s: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFailover {
    #[serde(default)]
    auto: bool,
    interface: Option<String>,
    #[serde(default)]
    addresses: Vec<String>,
    hostname: Option<String>,
    probe_ms: Option<u64>,
    announce_count: Option<u32>,
    announce_interval_ms: Option<u64>,
    #[serde(default)]
    service: Vec<RawService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    start: String,
    stop: Option<String>,
    health: Option<String>,
    timeout_s: Option<u64>,
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
            let what = |key: &str| format!("[[source]] {:?}: key `{key}`", s.name);
            let monitor = monitor_settings(s.heartbeat_ms, s.missed_beats)
                .with_context(|| what("heartbeat_ms / missed_beats"))?;
            let failover = match s.failover {
                None => FailoverConfig::default(),
                Some(f) => failover_config(f).with_context(|| what("failover"))?,
            };
            let failback = match s.failback {
                None => None,
                Some(f) => Some(FailbackConfig {
                    name: {
                        check_name(&f.name).with_context(|| what("failback.name"))?;
                        f.name
                    },
                    address: f.address.parse().map_err(|_| {
                        anyhow::anyhow!(
                            "{}: {:?} is not an IP:port address",
                            what("failback.address"),
                            f.address
                        )
                    })?,
                    fingerprint: doppel_transport::parse_fingerprint(&f.fingerprint)
                        .with_context(|| what("failback.fingerprint"))?,
                    cert: abs(f.cert),
                    key: abs(f.key),
                    copy_timeout: std::time::Duration::from_secs(
                        f.copy_timeout_s.unwrap_or(3600).max(1),
                    ),
                }),
            };
            sources.push(SourceConfig {
                name: s.name,
                fingerprint,
                root: abs(s.root),
                sets,
                monitor,
                failover,
                failback,
            });
        }
        let state_dir = abs(raw.state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into()));
        check_roots(&sources, &state_dir)?;
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
            state_dir,
            fsync: raw.fsync.unwrap_or(true),
            sources,
            log: raw.log,
            metrics: raw.metrics,
        })
    }
}

/// Replica roots of different sources must not contain each other (two agents would
/// write the same files), and the state directory must be outside all of them (a
/// replica could overwrite it).
fn check_roots(sources: &[SourceConfig], state_dir: &Path) -> anyhow::Result<()> {
    let mut roots: Vec<(&str, PathBuf)> = Vec::new();
    for s in sources {
        roots.push((&s.name, s.root.clone()));
        roots.extend(s.sets.values().map(|p| (s.name.as_str(), p.clone())));
    }
    for (i, (a, ra)) in roots.iter().enumerate() {
        if state_dir.starts_with(ra) || ra.starts_with(state_dir) {
            bail!(
                "key `state_dir`: {} overlaps the replica root {} of source {a:?}; put the state directory outside every replica root",
                state_dir.display(),
                ra.display()
            );
        }
        for (b, rb) in &roots[i + 1..] {
            if a != b && (ra.starts_with(rb) || rb.starts_with(ra)) {
                bail!(
                    "[[source]] {b:?}: its replica root {} overlaps {} of source {a:?}; give each source its own directory",
                    rb.display(),
                    ra.display()
                );
            }
        }
    }
    Ok(())
}

fn monitor_settings(
    heartbeat_ms: Option<u64>,
    missed: Option<u32>,
) -> anyhow::Result<crate::monitor::Settings> {
    let d = crate::monitor::Settings::default();
    let interval = heartbeat_ms.map_or(d.interval, std::time::Duration::from_millis);
    let threshold = missed.unwrap_or(d.threshold);
    if !(10..=60_000).contains(&interval.as_millis()) {
        bail!("heartbeat_ms must be between 10 and 60000 (default 200)");
    }
    if !(2..=1000).contains(&threshold) {
        bail!("missed_beats must be between 2 and 1000 (default 5)");
    }
    Ok(crate::monitor::Settings {
        interval,
        threshold,
    })
}

fn failover_config(f: RawFailover) -> anyhow::Result<FailoverConfig> {
    use std::time::Duration;
    let d = FailoverConfig::default();
    let mut addresses = Vec::new();
    for a in &f.addresses {
        addresses.push(parse_cidr(a).with_context(|| format!("addresses: {a:?}"))?);
    }
    if !addresses.is_empty() && f.interface.is_none() {
        bail!("addresses are set but `interface` is not: name the interface that takes them, e.g. interface = \"eth0\"");
    }
    if let Some(h) = &f.hostname {
        let ok = !h.is_empty()
            && h.len() <= 64
            && h.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        if !ok {
            bail!(
                "hostname {h:?} is not a valid host name (letters, digits, '-', '.', at most 64)"
            );
        }
    }
    let mut names = HashSet::new();
    let mut services = Vec::new();
    for s in f.service {
        if !names.insert(s.name.clone()) {
            bail!("service {:?} appears twice", s.name);
        }
        services.push(ServiceConfig {
            name: s.name,
            start: s.start,
            stop: s.stop,
            health: s.health,
            timeout: Duration::from_secs(s.timeout_s.unwrap_or(30).max(1)),
        });
    }
    Ok(FailoverConfig {
        auto: f.auto,
        interface: f.interface,
        addresses,
        hostname: f.hostname,
        probe_wait: f.probe_ms.map_or(d.probe_wait, Duration::from_millis),
        announce_count: f.announce_count.unwrap_or(d.announce_count).max(1),
        announce_interval: f
            .announce_interval_ms
            .map_or(d.announce_interval, Duration::from_millis),
        services,
    })
}

/// `10.0.0.5/24` or `fd00::5/64`.
fn parse_cidr(text: &str) -> anyhow::Result<(std::net::IpAddr, u8)> {
    let (ip, len) = text
        .split_once('/')
        .context("write the address with its prefix length, e.g. \"10.0.0.5/24\"")?;
    let ip: std::net::IpAddr = ip.parse().context("not an IP address")?;
    let len: u8 = len.parse().context("the prefix length is not a number")?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len > max {
        bail!("prefix length {len} is longer than {max}");
    }
    Ok((ip, len))
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
        assert_eq!(s.monitor, crate::monitor::Settings::default());
        assert_eq!(s.failover, FailoverConfig::default());
    }

    #[test]
    fn failover_section_parses() {
        let c = parse(&format!(
            r#"
            listen = "127.0.0.1:7443"
            cert = "c"
            key = "k"
            [[source]]
            name = "web1"
            fingerprint = "{FP}"
            root = "/r"
            heartbeat_ms = 100
            missed_beats = 3
            [source.failover]
            auto = true
            interface = "eth0"
            addresses = ["10.0.0.5/24", "fd00::5/64"]
            hostname = "web1"
            [[source.failover.service]]
            name = "app"
            start = "systemctl start app"
            health = "curl -fs http://127.0.0.1/"
            timeout_s = 5
            "#
        ))
        .unwrap();
        let s = &c.sources[0];
        assert_eq!(s.monitor.interval, std::time::Duration::from_millis(100));
        assert_eq!(s.monitor.threshold, 3);
        let f = &s.failover;
        assert!(f.auto);
        assert_eq!(f.addresses[0], ("10.0.0.5".parse().unwrap(), 24));
        assert_eq!(f.addresses[1], ("fd00::5".parse().unwrap(), 64));
        assert_eq!(f.services[0].timeout, std::time::Duration::from_secs(5));
        assert_eq!(f.services[0].stop, None);
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
        assert!(err(&format!("{base}heartbeat_ms = 1\n")).contains("heartbeat_ms"));
        assert!(err(&format!(
            "{base}[source.failover]\naddresses = [\"10.0.0.5\"]\ninterface = \"eth0\"\n"
        ))
        .contains("prefix length"));
        assert!(err(&format!(
            "{base}[source.failover]\naddresses = [\"10.0.0.5/24\"]\n"
        ))
        .contains("interface"));
        assert!(err(no_source).contains("no [[source]]"));
        let fp2 = "bb".repeat(32);
        let nested =
            format!("{base}[[source]]\nname = \"b\"\nfingerprint = \"{fp2}\"\nroot = \"/r/b\"\n");
        assert!(err(&nested).contains("overlaps /r of source \"a\""));
        let state_inside = base.replace("key = \"k\"\n", "key = \"k\"\nstate_dir = \"/r/state\"\n");
        assert!(err(&state_inside).contains("key `state_dir`"));
    }
}
