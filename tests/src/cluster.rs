//! A source and a target on one machine: a real `doppel-receiver` and a real
//! `doppel-agent` as child processes talking QUIC over loopback, each with its own
//! temporary directory, keys and port. Dropping the cluster kills both.

use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bin_dir;

pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// Root of the replicated set on the source.
    pub source: PathBuf,
    /// Where the receiver puts the set.
    pub replica: PathBuf,
    pub port: u16,
    pub set: String,
    receiver: Option<Child>,
    agent: Option<Child>,
    agent_wrapper: Vec<OsString>,
    receiver_wrapper: Vec<OsString>,
    /// The filesystem image the source root lies on (`DOPPEL_TEST_FS`); dropped, so
    /// unmounted, after both processes were killed.
    _source_disk: Option<crate::disk::LoopDisk>,
}

/// How to lay out a cluster beyond the defaults of [`Cluster::new`].
#[derive(Debug, Default, Clone)]
pub struct Options {
    /// Extra TOML lines appended to the agent's `[[set]]`.
    pub set_extra: String,
    /// Extra TOML lines appended to the agent's `[[target]]` (e.g. `bandwidth_limit`).
    pub agent_target_extra: String,
    /// Extra top-level TOML lines of the agent's config (e.g. `capture_ring_kib`).
    pub agent_extra: String,
    /// The receiver's listen address, which is also the agent's target address.
    /// Default: 127.0.0.1 and a free port.
    pub listen: Option<SocketAddr>,
    /// The receiver's replica root for the source (the set lands in `<root>/<set>`).
    /// Default: `<cluster dir>/replica`.
    pub replica_root: Option<PathBuf>,
    /// A command each process is started under, e.g. `["nsenter", "--net=...", "--"]`
    /// (it must exec the binary in place, so that the child's pid is the binary's).
    pub agent_wrapper: Vec<OsString>,
    pub receiver_wrapper: Vec<OsString>,
    /// Extra TOML appended to the receiver's `[[source]]` (e.g. a `[source.failover]`).
    pub receiver_extra: String,
}

/// Runs `BIN keygen --out OUT` and returns the printed fingerprint.
pub fn keygen(bin: &str, out: &Path) -> Result<String> {
    let o = Command::new(bin_dir().join(bin))
        .args(["keygen", "--out"])
        .arg(out)
        .output()
        .with_context(|| format!("cannot run {bin}: build it with `cargo xtask build`"))?;
    if !o.status.success() {
        bail!(
            "{bin} keygen failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let text = String::from_utf8_lossy(&o.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("fingerprint: "))
        .map(|s| s.trim().to_string())
        .with_context(|| format!("{bin} keygen printed no fingerprint: {text}"))
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral UDP port on loopback")
}

impl Cluster {
    /// Keys and configs for one set named `set`; nothing is started yet.
    pub fn new(set: &str) -> Result<Cluster> {
        Self::with_agent_extra(set, "")
    }

    /// As `new`, with extra TOML lines appended to the agent's `[[set]]`.
    pub fn with_agent_extra(set: &str, set_extra: &str) -> Result<Cluster> {
        Self::with_options(
            set,
            Options {
                set_extra: set_extra.to_string(),
                ..Options::default()
            },
        )
    }

    /// Keys and configs for one set named `set` laid out as `opts` says; nothing is
    /// started yet.
    pub fn with_options(set: &str, opts: Options) -> Result<Cluster> {
        let set_extra = &opts.set_extra;
        let target_extra = &opts.agent_target_extra;
        let agent_extra = &opts.agent_extra;
        let dir = tempfile::Builder::new().prefix("doppel-e2e-").tempdir()?;
        let d = dir.path();
        // With DOPPEL_TEST_FS, the source root (and its siblings, which tests use as
        // "elsewhere on the same filesystem") lies on an image of that filesystem.
        let source_disk = match crate::disk::Fs::from_env() {
            Some(fs) => Some(crate::disk::LoopDisk::with_fs(fs, 512)?),
            None => None,
        };
        let source = source_disk
            .as_ref()
            .map_or_else(|| d.join("source"), |disk| disk.mnt.join("source"));
        let replica_root = opts.replica_root.unwrap_or_else(|| d.join("replica"));
        fs::create_dir_all(&source)?;
        let afp = keygen("doppel-agent", &d.join("agent-keys"))?;
        let rfp = keygen("doppel-receiver", &d.join("receiver-keys"))?;
        let listen = opts
            .listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], free_port())));
        let port = listen.port();
        fs::write(
            d.join("receiver.toml"),
            format!(
                r#"listen = "{listen}"
cert = "receiver-keys/cert.pem"
key = "receiver-keys/key.pem"
state_dir = "receiver-state"

[[source]]
name = "src"
fingerprint = "{afp}"
root = "{}"
{}
"#,
                replica_root.display(),
                opts.receiver_extra
            ),
        )?;
        fs::write(
            d.join("agent.toml"),
            format!(
                r#"name = "src"
cert = "agent-keys/cert.pem"
key = "agent-keys/key.pem"
state_dir = "agent-state"
{agent_extra}

[[target]]
name = "t"
address = "{listen}"
fingerprint = "{rfp}"
{target_extra}

[[set]]
name = "{set}"
root = "{}"
targets = ["t"]
{set_extra}
"#,
                source.display()
            ),
        )?;
        Ok(Cluster {
            source,
            replica: replica_root.join(set),
            port,
            set: set.to_string(),
            dir,
            receiver: None,
            agent: None,
            agent_wrapper: wrapper_from_env(opts.agent_wrapper, "DOPPEL_AGENT_WRAPPER"),
            receiver_wrapper: opts.receiver_wrapper,
            _source_disk: source_disk,
        })
    }

    fn spawn(&self, bin: &str, config: &str, log: &str) -> Result<Child> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(log))?;
        let wrapper = match bin {
            "doppel-agent" => &self.agent_wrapper,
            _ => &self.receiver_wrapper,
        };
        let mut cmd = match wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(bin_dir().join(bin));
                c
            }
            None => Command::new(bin_dir().join(bin)),
        };
        // The daemons die with the thread that started them: a test killed outright
        // (its Drop never runs) must not leave an agent holding its capture, a fanotify
        // mark on a whole filesystem and a port.
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.args(["run", "--config"])
            .arg(self.dir.path().join(config))
            .env(
                "RUST_LOG",
                std::env::var("DOPPEL_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {bin}"))
    }

    /// Starts the receiver and waits until it listens (or exits: a test that expects it
    /// to refuse its configuration then reads why from its log).
    pub fn start_receiver(&mut self) -> Result<()> {
        let log = self.dir.path().join("receiver.log");
        let before = fs::read_to_string(&log).map(|s| s.len()).unwrap_or(0);
        let c = self.spawn("doppel-receiver", "receiver.toml", "receiver.log")?;
        self.receiver = Some(c);
        let start = Instant::now();
        loop {
            let text = fs::read_to_string(&log).unwrap_or_default();
            let listening = text
                .get(before..)
                .is_some_and(|t| t.contains("receiver listening"));
            let exited = self
                .receiver
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            if listening || exited {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("doppel-receiver did not listen within 30 s; its log:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts the agent and waits until its initial scan is done and capture is live.
    pub fn start_agent(&mut self) -> Result<()> {
        self.start_agent_within(Duration::from_secs(30))
    }

    /// Starts the agent and waits until its initial scan is done ("replicating live"),
    /// at most `within` (a large tree's scan takes longer than the usual 30 s).
    pub fn start_agent_within(&mut self, within: Duration) -> Result<()> {
        let log = self.dir.path().join("agent.log");
        let before = fs::read_to_string(&log).map(|s| s.len()).unwrap_or(0);
        let c = self.spawn("doppel-agent", "agent.toml", "agent.log")?;
        self.agent = Some(c);
        let start = Instant::now();
        loop {
            let text = fs::read_to_string(&log).unwrap_or_default();
            if text
                .get(before..)
                .is_some_and(|t| t.contains("replicating live"))
            {
                return Ok(());
            }
            if let Some(st) = self
                .agent
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("doppel-agent exited with {st}; its log:\n{text}");
            }
            if start.elapsed() > within {
                bail!("doppel-agent did not start capturing within {within:?}; its log:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `doppel-agent ARGS --config <this cluster's agent.toml>` to completion.
    pub fn agent_command(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin_dir().join("doppel-agent"))
            .args(args)
            .arg("--config")
            .arg(self.dir.path().join("agent.toml"))
            .output()
            .expect("run doppel-agent")
    }

    /// Runs `doppel-receiver ARGS --config <this cluster's receiver.toml>` to completion.
    pub fn receiver_command(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin_dir().join("doppel-receiver"))
            .args(args)
            .arg("--config")
            .arg(self.dir.path().join("receiver.toml"))
            .output()
            .expect("run doppel-receiver")
    }

    /// The running agent's status (what `doppel-agent status --json` prints), asked on
    /// its control socket directly: cheap enough to poll.
    pub fn agent_status(&self) -> Result<String> {
        use std::io::{Read, Write};
        let sock = self.dir.path().join("agent-state/control.sock");
        let mut s = std::os::unix::net::UnixStream::connect(&sock)
            .with_context(|| format!("cannot reach the agent at {}", sock.display()))?;
        s.write_all(b"{\"cmd\":\"status\"}\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    /// The running agent's status as `doppel-agent status --json` gives it.
    pub fn status(&self) -> Result<serde_json::Value> {
        let text = self.agent_status()?;
        let v: serde_json::Value = serde_json::from_str(text.trim())
            .with_context(|| format!("the agent's status is not JSON: {text}"))?;
        Ok(v["status"].clone())
    }

    /// Waits until `holds` is true of the agent's status ([`Cluster::status`]).
    pub fn wait_status(
        &self,
        what: &str,
        within: Duration,
        holds: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<()> {
        let start = Instant::now();
        loop {
            let status = self.status()?;
            if holds(&status) {
                return Ok(());
            }
            if start.elapsed() > within {
                bail!(
                    "{what}: not within {within:?}; last status: {status}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the agent reports every change acknowledged and no mirror comparison
    /// pending (`"synced":true`); returns how long that took.
    pub fn wait_synced(&self, within: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            if let Ok(s) = self.agent_status() {
                if s.contains("\"synced\":true") {
                    return Ok(start.elapsed());
                }
            }
            if start.elapsed() > within {
                bail!(
                    "the agent was not synced within {within:?}:\n{}",
                    self.logs()
                );
            }
            // Fine-grained: benchmarks time the mirror with this.
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn start(&mut self) -> Result<()> {
        self.start_receiver()?;
        self.start_agent()
    }

    fn kill(child: &mut Option<Child>) {
        if let Some(mut c) = child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// Stops the agent as a service manager does (SIGTERM), waiting up to 30 s for it
    /// to exit before killing it.
    pub fn stop_agent(&mut self) {
        let Some(mut c) = self.agent.take() else {
            return;
        };
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    pub fn kill_agent(&mut self) {
        Self::kill(&mut self.agent);
    }

    pub fn kill_receiver(&mut self) {
        Self::kill(&mut self.receiver);
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|c| c.id())
    }

    pub fn receiver_pid(&self) -> Option<u32> {
        self.receiver.as_ref().map(|c| c.id())
    }

    fn alive(child: &mut Option<Child>) -> bool {
        child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Whether the receiver was started and has not exited since.
    pub fn receiver_alive(&mut self) -> bool {
        Self::alive(&mut self.receiver)
    }

    /// Whether the agent was started and has not exited since.
    pub fn agent_alive(&mut self) -> bool {
        Self::alive(&mut self.agent)
    }

    pub fn log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// Lines of a log file that contain `needle`.
    pub fn log_lines(&self, name: &str, needle: &str) -> Vec<String> {
        let Ok(f) = fs::File::open(self.dir.path().join(name)) else {
            return Vec::new();
        };
        BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter(|l| l.contains(needle))
            .collect()
    }

    /// Waits until the replica equals the source; panics with the differences and both
    /// logs if it does not within `within`. Returns how long it took.
    pub fn assert_converges(&self, within: Duration) -> Duration {
        let r = crate::tree::wait_equal(&self.source, &self.replica, within);
        self.expect_same(r, within, "identical", "differs", "write", 30)
    }

    /// As [`Cluster::assert_converges`], in strict mode ([`crate::tree::wait_identical`]):
    /// types, contents, holes, modes, owners, mtimes, xattrs and ACLs, symlink targets
    /// and hard links must all match. The source must be quiescent (it is read once).
    /// Panics with every difference (up to 100 lines) and both logs.
    pub fn assert_identical(&self, within: Duration) -> Duration {
        let r = crate::tree::wait_identical(&self.source, &self.replica, within);
        self.expect_same(
            r,
            within,
            "strictly identical",
            "not identical",
            "change",
            100,
        )
    }

    /// The outcome of a wait: how long it took, or a panic with up to `shown`
    /// differences and both logs.
    fn expect_same(
        &self,
        r: Result<Duration, Vec<String>>,
        within: Duration,
        same: &str,
        differs: &str,
        last: &str,
        shown: usize,
    ) -> Duration {
        match r {
            Ok(t) => {
                eprintln!("replica {same} {t:?} after the last {last}");
                t
            }
            Err(diffs) => panic!(
                "replica {differs} {within:?} after the last {last} ({} differences):\n{}{}\n{}",
                diffs.len(),
                diffs[..diffs.len().min(shown)].join("\n"),
                if diffs.len() > shown { "\n..." } else { "" },
                self.logs()
            ),
        }
    }

    /// Both logs, for a failing assertion's message.
    pub fn logs(&self) -> String {
        let tail = |s: String| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!(
            "--- agent.log (tail) ---\n{}\n--- receiver.log (tail) ---\n{}",
            tail(self.log("agent.log")),
            tail(self.log("receiver.log"))
        )
    }
}

/// `given`, or else the words of environment variable `var` (a profiler to run the
/// daemon under, e.g. `DOPPEL_AGENT_WRAPPER='heaptrack -o /tmp/agent'`).
fn wrapper_from_env(given: Vec<OsString>, var: &str) -> Vec<OsString> {
    if !given.is_empty() {
        return given;
    }
    std::env::var(var)
        .map(|w| w.split_whitespace().map(OsString::from).collect())
        .unwrap_or_default()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_agent();
        self.kill_receiver();
        if std::env::var_os("DOPPEL_KEEP").is_some() {
            let p = self.dir.path().to_path_buf();
            eprintln!("keeping {}", p.display());
            std::mem::forget(std::mem::replace(
                &mut self.dir,
                tempfile::tempdir().expect("tempdir"),
            ));
        }
    }
}
