//! A failover stage: three network namespaces on one Ethernet segment (source, target,
//! client), the source serving a small TCP service (`doppel-test-service`) on a service
//! address, an agent replicating the service's data to a receiver on the target that is
//! configured to take the address, the hostname and the service over. The client sends
//! a request every 10 ms and logs which host answered and when, so that RTO (first answer
//! from the target after the failover starts) and RPO (answers from the source whose
//! writes are missing on the target) can be measured. Dropping the stage stops every
//! process it started and deletes the namespaces.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bin_dir;
use crate::cluster::{Cluster, Options};
use crate::netns::Lan;

pub const SRC: usize = 0;
pub const TGT: usize = 1;
pub const CLI: usize = 2;
const SERVICE_PORT: u16 = 7000;

/// One answered request, as the client logged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub n: u64,
    pub sent_ns: u64,
    pub done_ns: u64,
    pub by: String,
}

pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn kill_pid(pid: u32) {
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

pub fn service_bin() -> PathBuf {
    bin_dir().join("doppel-test-service")
}

/// `doppel-test-service serve` on `addr` in namespace `ns`, writing to `log`, answering
/// as `name`.
pub fn start_service(ns: &str, addr: &str, log: &std::path::Path, name: &str) -> Result<Child> {
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .arg(service_bin())
        .args(["serve", addr])
        .arg(log)
        .arg(name)
        .stdin(Stdio::null())
        .spawn()
        .context("cannot start the test service")
}

/// The client: a request every 10 ms from namespace `ns`, each answer logged.
pub struct Client {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Client {
    pub fn start(ns: &str, addr: &str, log: PathBuf) -> Result<Client> {
        let out = fs::File::create(&log)?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg("--")
            .arg(service_bin())
            .args(["client", addr])
            .stdin(Stdio::null())
            .stdout(out)
            .spawn()
            .context("cannot start the client")?;
        Ok(Client {
            child: Some(child),
            log,
        })
    }

    pub fn answers(&self) -> Result<Vec<Answer>> {
        let text = fs::read_to_string(&self.log)?;
        Ok(text
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                Some(Answer {
                    n: f.first()?.parse().ok()?,
                    sent_ns: f.get(1)?.parse().ok()?,
                    done_ns: f.get(2)?.parse().ok()?,
                    by: f.get(3)?.to_string(),
                })
            })
            .collect())
    }

    /// Waits until `n` answers came from `by`.
    pub fn wait_answers(&self, by: &str, n: usize, within: Duration) -> Result<()> {
        let t = Instant::now();
        while self.answers()?.iter().filter(|a| a.by == by).count() < n {
            if t.elapsed() > within {
                bail!("the client got fewer than {n} answers from {by} within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The first answer from `by` that completed after `since` (monotonic ns).
    pub fn wait_answer_from(&self, by: &str, since: u64, within: Duration) -> Result<Answer> {
        let t = Instant::now();
        loop {
            if let Some(a) = self
                .answers()?
                .into_iter()
                .filter(|a| a.by == by && a.done_ns >= since)
                .min_by_key(|a| a.done_ns)
            {
                return Ok(a);
            }
            if t.elapsed() > within {
                bail!("the client got no answer from {by} within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop();
    }
}

pub struct Stage {
    // Field order is drop order: processes first, then the namespaces they live in.
    pub cluster: Cluster,
    source_service: Option<Child>,
    client: Option<Client>,
    pub lan: Lan,
    /// The replica and the target service's pid file.
    dir: tempfile::TempDir,
    pub vip: std::net::Ipv4Addr,
    pub vip6: std::net::Ipv6Addr,
    pub client_log: PathBuf,
    target_pidfile: PathBuf,
    return_receiver: Option<Child>,
    fb_agent_fp: String,
}

impl Stage {
    /// Builds the stage; `auto` turns on automatic failover. Nothing runs yet.
    pub fn new(auto: bool) -> Result<Stage> {
        Self::with_set(auto, "")
    }

    /// As `new`, with extra TOML lines for the agent's `[[set]]`.
    pub fn with_set(auto: bool, set_extra: &str) -> Result<Stage> {
        let lan = Lan::create(3)?;
        let vip = lan.extra_v4(100);
        let vip6 = lan.extra_v6(100);
        let tgt = &lan.hosts[TGT];
        let dir = tempfile::Builder::new().prefix("doppel-stage-").tempdir()?;
        let target_pidfile = dir.path().join("target-service.pid");
        let replica_root = dir.path().join("replica");
        let bin = service_bin();
        // The failback: this host's temporary agent, and the receiver on the source
        // host that takes the data back.
        let fb_agent_fp =
            crate::cluster::keygen("doppel-agent", &dir.path().join("fb-agent-keys"))?;
        let return_fp = crate::cluster::keygen("doppel-receiver", &dir.path().join("return-keys"))?;
        let extra = format!(
            r#"[source.failover]
auto = {auto}
interface = "{dev}"
addresses = ["{vip}/24", "{vip6}/64"]
hostname = "doppel-src-host"
[[source.failover.service]]
name = "app"
start = "setsid {bin} serve {vip}:{SERVICE_PORT} {log} target {pid} </dev/null >/dev/null 2>&1 &"
stop = "kill $(cat {pid})"
health = "{bin} probe {vip}:{SERVICE_PORT}"
timeout_s = 10
[source.failback]
name = "tgt-host"
address = "{src_addr}:7444"
fingerprint = "{return_fp}"
cert = "{keys}/cert.pem"
key = "{keys}/key.pem"
"#,
            src_addr = lan.hosts[SRC].addr,
            keys = dir.path().join("fb-agent-keys").display(),
            dev = tgt.dev,
            bin = bin.display(),
            log = replica_root.join("app/app.log").display(),
            pid = target_pidfile.display(),
        );
        let mut receiver_wrapper: Vec<OsString> = vec!["unshare".into(), "--uts".into()];
        receiver_wrapper.extend(tgt.wrapper());
        let cluster = Cluster::with_options(
            "app",
            Options {
                listen: Some(SocketAddr::from((tgt.addr, 7443))),
                agent_wrapper: lan.hosts[SRC].wrapper(),
                receiver_wrapper,
                replica_root: Some(replica_root),
                receiver_extra: extra,
                set_extra: set_extra.to_string(),
                ..Options::default()
            },
        )?;
        let client_log = cluster.dir.path().join("client.log");
        Ok(Stage {
            cluster,
            source_service: None,
            client: None,
            lan,
            dir,
            vip,
            vip6,
            client_log,
            target_pidfile,
            return_receiver: None,
            fb_agent_fp,
        })
    }

    /// The original source comes back after a failover: without its service address
    /// (the target has it), its link up, a receiver on it ready to take the data back.
    /// That receiver is configured to take the source's service identity back from the
    /// target's temporary agent ("tgt-host") once the failback is done.
    pub fn source_returns(&mut self) -> Result<()> {
        let src = self.lan.hosts[SRC].clone();
        self.lan.ip(
            SRC,
            &["addr", "del", &format!("{}/24", self.vip), "dev", &src.dev],
        )?;
        // (Linux drops IPv6 addresses when the link goes down, unless keep_addr_on_down.)
        let _ = self.lan.ip(
            SRC,
            &["addr", "del", &format!("{}/64", self.vip6), "dev", &src.dev],
        );
        self.lan.ip(SRC, &["link", "set", "dev", &src.dev, "up"])?;
        let d = self.dir.path();
        let bin = service_bin();
        let config = d.join("return.toml");
        fs::write(
            &config,
            format!(
                r#"listen = "{addr}:7444"
cert = "return-keys/cert.pem"
key = "return-keys/key.pem"
state_dir = "return-state"
[[source]]
name = "tgt-host"
fingerprint = "{fp}"
root = "return-root"
[source.sets]
app = "{source}"
[source.failover]
interface = "{dev}"
addresses = ["{vip}/24", "{vip6}/64"]
[[source.failover.service]]
name = "app"
start = "setsid {bin} serve {vip}:{SERVICE_PORT} {log} source {pid} </dev/null >/dev/null 2>&1 &"
health = "{bin} probe {vip}:{SERVICE_PORT}"
"#,
                addr = src.addr,
                fp = self.fb_agent_fp,
                source = self.cluster.source.display(),
                dev = src.dev,
                vip = self.vip,
                vip6 = self.vip6,
                bin = bin.display(),
                log = self.cluster.source.join("app.log").display(),
                pid = d.join("source-service.pid").display(),
            ),
        )?;
        let log = fs::File::create(d.join("return.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", src.ns))
            .arg("--")
            .arg(bin_dir().join("doppel-receiver"))
            .args(["run", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start the source's receiver")?;
        self.return_receiver = Some(child);
        let sock = d.join("return-state/control.sock");
        let t = Instant::now();
        while !sock.exists() {
            if t.elapsed() > Duration::from_secs(10) {
                bail!(
                    "the source's receiver did not start: {}",
                    fs::read_to_string(d.join("return.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Runs `doppel-receiver ARGS --json` against the source's receiver.
    pub fn return_command(&self, args: &[&str]) -> (String, i32) {
        let o = Command::new(bin_dir().join("doppel-receiver"))
            .args(args)
            .arg("--json")
            .arg("--config")
            .arg(self.dir.path().join("return.toml"))
            .output()
            .expect("run doppel-receiver");
        (
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            o.status.code().unwrap_or(-1),
        )
    }

    pub fn return_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("return.log")).unwrap_or_default()
    }

    /// The target's temporary failback agent's log.
    pub fn failback_agent_log(&self) -> String {
        fs::read_to_string(
            self.cluster
                .dir
                .path()
                .join("receiver-state/src/failback-agent/agent.log"),
        )
        .unwrap_or_default()
    }

    /// Gives the source its service address, starts receiver, agent, the source's
    /// service and the client; returns once the client has answers from the source.
    pub fn start(&mut self) -> Result<()> {
        let (src, cli) = (&self.lan.hosts[SRC], &self.lan.hosts[CLI]);
        self.lan.ip(
            SRC,
            &["addr", "add", &format!("{}/24", self.vip), "dev", &src.dev],
        )?;
        self.lan.ip(
            SRC,
            &[
                "addr",
                "add",
                &format!("{}/64", self.vip6),
                "dev",
                &src.dev,
                "nodad",
            ],
        )?;
        self.cluster.start()?;
        let log = self.cluster.source.join("app.log");
        let addr = format!("{}:{SERVICE_PORT}", self.vip);
        self.source_service = Some(start_service(&src.ns, &addr, &log, "source")?);
        self.client = Some(Client::start(&cli.ns, &addr, self.client_log.clone())?);
        // The client's neighbour cache learns the source's IPv6 service address too, so
        // that the unsolicited NA has an entry to move.
        // (A connection attempt to a closed port: it resolves the neighbour, the source
        // answers with a reset.)
        let _ = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", cli.ns))
            .arg("--")
            .arg(service_bin())
            .args(["probe", &format!("[{}]:{SERVICE_PORT}", self.vip6)])
            .output();
        let neigh = self.client_neighbour_v6();
        if neigh.trim().is_empty() {
            bail!("the client could not reach the source's IPv6 service address");
        }
        if let Err(e) = self
            .client()?
            .wait_answers("source", 20, Duration::from_secs(20))
        {
            bail!("{e:#}:\n{}", self.cluster.logs());
        }
        Ok(())
    }

    fn client(&self) -> Result<&Client> {
        self.client.as_ref().context("the client is not running")
    }

    /// The source host dies: its link goes down first (nothing more leaves it), then
    /// its agent and service are SIGKILLed. Returns the moment of death (monotonic ns).
    pub fn kill_source(&mut self) -> Result<u64> {
        let t = mono_ns();
        self.lan.ip(
            SRC,
            &["link", "set", "dev", &self.lan.hosts[SRC].dev, "down"],
        )?;
        self.cluster.kill_agent();
        if let Some(mut s) = self.source_service.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        Ok(t)
    }

    pub fn answers(&self) -> Result<Vec<Answer>> {
        self.client()?.answers()
    }

    /// The first answer from the target that completed after `since` (monotonic ns).
    pub fn wait_target_answer(&self, since: u64, within: Duration) -> Result<Answer> {
        self.client()?
            .wait_answer_from("target", since, within)
            .map_err(|e| anyhow::anyhow!("{e:#}:\n{}", self.cluster.logs()))
    }

    /// Writes the source acknowledged to the client that the target's copy lacks.
    pub fn lost_writes(&self) -> Result<Vec<u64>> {
        self.missing("source", &self.cluster.replica.join("app.log"))
    }

    /// Writes `by` acknowledged to the client that the log `file` lacks.
    pub fn missing(&self, by: &str, file: &std::path::Path) -> Result<Vec<u64>> {
        let has: BTreeSet<u64> = fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        Ok(self
            .answers()?
            .iter()
            .filter(|a| a.by == by && !has.contains(&a.n))
            .map(|a| a.n)
            .collect())
    }

    /// The first answer from `by` that completed after `since` (monotonic ns).
    pub fn wait_answer(&self, by: &str, since: u64, within: Duration) -> Result<Answer> {
        self.client()?
            .wait_answer_from(by, since, within)
            .map_err(|e| anyhow::anyhow!("{e:#}:\n{}", self.cluster.logs()))
    }

    /// `doppel-receiver failover --json` with `args`; the parsed report and exit status.
    pub fn failover(&self, args: &[&str]) -> Result<(String, i32)> {
        self.receiver("failover", args)
    }

    /// `doppel-receiver failback --json` with `args`.
    pub fn failback(&self, args: &[&str]) -> Result<(String, i32)> {
        self.receiver("failback", args)
    }

    fn receiver(&self, cmd: &str, args: &[&str]) -> Result<(String, i32)> {
        let mut a = vec![cmd, "--source", "src", "--json"];
        a.extend_from_slice(args);
        let o = self.cluster.receiver_command(&a);
        Ok((
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            o.status.code().unwrap_or(-1),
        ))
    }

    /// The source's health as `doppel-receiver status` reports it.
    pub fn health(&self) -> String {
        let o = self.cluster.receiver_command(&["status", "--json"]);
        let text = String::from_utf8_lossy(&o.stdout);
        text.split("\"health\": \"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or("?")
            .to_string()
    }

    pub fn wait_health(&self, want: &str, within: Duration) -> Result<Duration> {
        let t = Instant::now();
        loop {
            if self.health() == want {
                return Ok(t.elapsed());
            }
            if t.elapsed() > within {
                bail!(
                    "the source was not {want} within {within:?} (it is {}):\n{}",
                    self.health(),
                    self.cluster.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The hostname the receiver's UTS namespace has now.
    pub fn receiver_hostname(&self) -> Result<String> {
        let pid = self.cluster.receiver_pid().context("no receiver")?;
        let o = Command::new("nsenter")
            .args(["--target", &pid.to_string(), "--uts", "hostname"])
            .output()?;
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    }

    /// The client's neighbour entry for the IPv6 service address.
    pub fn client_neighbour_v6(&self) -> String {
        let o = Command::new("ip")
            .args(["-n", &self.lan.hosts[CLI].ns, "-6", "neigh", "show"])
            .arg(self.vip6.to_string())
            .output();
        o.map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    }

    pub fn stop_client(&mut self) {
        if let Some(c) = self.client.as_mut() {
            c.stop();
        }
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        self.stop_client();
        if let Some(mut s) = self.source_service.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        if let Some(pid) = fs::read_to_string(&self.target_pidfile)
            .ok()
            .and_then(|p| p.trim().parse().ok())
        {
            kill_pid(pid);
        }
        let _ = fs::remove_file(&self.target_pidfile);
        if let Some(mut r) = self.return_receiver.take() {
            let _ = r.kill();
            let _ = r.wait();
        }
        if let Some(pid) = fs::read_to_string(self.dir.path().join("source-service.pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok())
        {
            kill_pid(pid);
        }
        let _ = &self.dir;
    }
}
