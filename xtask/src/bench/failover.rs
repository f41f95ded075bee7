//! `failover`: recovery time when a source host dies, doppel against keepalived.
//!
//! Every round builds a fresh `doppel_tests::takeover` stage: source, target and client
//! namespaces on one bridge. A client asks the source's service every 10 ms. The source
//! host dies: its link goes down, its processes are SIGKILLed.
//! - `failover_rto_ms_p50`: manual. Once status says the source is lost, the operator
//!   runs `doppel-receiver failover`; RTO is from that command's start to the client's
//!   first answer from the target.
//! - `auto_failover_rto_ms_p50`: automatic, default heartbeats (200 ms, 5 missed); RTO
//!   is from the death to the first answer from the target.
//! - `keepalived_rto_ms_p50`: keepalived VRRP (advert_int 1) moving the same address
//!   between the same namespaces, its notify_master starting the same service; from
//!   the death to the first answer from the target.
//! - `auto_failover_rto_ratio_vs_keepalived`: doppel's automatic RTO over keepalived's.
//! - `failover_rpo_writes_max`: the most writes the source acknowledged (fsynced) that
//!   were missing on the target, over all doppel rounds.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use doppel_tests::netns::Lan;
use doppel_tests::takeover::{kill_pid, mono_ns, service_bin, start_service, Client, Stage};

use super::{median, Figures};

const ROUNDS: usize = 10;

pub fn failover(figures: &mut Figures) -> Result<()> {
    let mut manual = Vec::new();
    let mut auto = Vec::new();
    let mut keep = Vec::new();
    let mut rpo = 0usize;
    for round in 0..ROUNDS {
        let (m, lost_m) = doppel_round(false)?;
        let (a, lost_a) = doppel_round(true)?;
        let k = keepalived_round()?;
        eprintln!(
            "  round {}: manual {m:.0} ms, automatic {a:.0} ms, keepalived {k:.0} ms; lost writes {lost_m}/{lost_a}",
            round + 1
        );
        manual.push(m);
        auto.push(a);
        keep.push(k);
        rpo = rpo.max(lost_m).max(lost_a);
    }
    let (a, k) = (median(auto), median(keep));
    figures.insert("failover_rto_ms_p50".into(), median(manual));
    figures.insert("auto_failover_rto_ms_p50".into(), a);
    figures.insert("keepalived_rto_ms_p50".into(), k);
    figures.insert("auto_failover_rto_ratio_vs_keepalived".into(), a / k);
    figures.insert("failover_rpo_writes_max".into(), rpo as f64);
    Ok(())
}

/// One doppel failover; its RTO in ms and the acknowledged writes lost.
fn doppel_round(automatic: bool) -> Result<(f64, usize)> {
    let mut s = Stage::new(automatic)?;
    s.start()?;
    std::thread::sleep(Duration::from_secs(1));
    let death = s.kill_source()?;
    let start = if automatic {
        death
    } else {
        s.wait_health("lost", Duration::from_secs(10))?;
        let start = mono_ns();
        let (out, code) = s.failover(&[])?;
        if code != 0 {
            bail!("failover failed:\n{out}\n{}", s.cluster.logs());
        }
        start
    };
    let first = s.wait_target_answer(start, Duration::from_secs(20))?;
    std::thread::sleep(Duration::from_millis(200));
    s.stop_client();
    let lost = s.lost_writes()?.len();
    Ok(((first.done_ns - start) as f64 / 1e6, lost))
}

/// Processes in a namespace, SIGKILLed on drop.
struct Netns<'a>(&'a str);

impl Netns<'_> {
    fn kill_all(&self) {
        let Ok(o) = Command::new("ip").args(["netns", "pids", self.0]).output() else {
            return;
        };
        for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
            if let Ok(p) = pid.parse() {
                kill_pid(p);
            }
        }
    }
}

impl Drop for Netns<'_> {
    fn drop(&mut self) {
        self.kill_all();
    }
}

fn keepalived(
    ns: &str,
    dir: &Path,
    role: &str,
    dev: &str,
    vip: &str,
    notify: &str,
) -> Result<Child> {
    let (state, prio) = if role == "source" {
        ("MASTER", 150)
    } else {
        ("BACKUP", 100)
    };
    let conf = dir.join(format!("{role}.conf"));
    std::fs::write(
        &conf,
        format!(
            "global_defs {{\n  router_id doppel_bench_{role}\n  script_user root\n}}\n\
             vrrp_instance VI_1 {{\n  state {state}\n  interface {dev}\n  virtual_router_id 77\n  \
             priority {prio}\n  advert_int 1\n  virtual_ipaddress {{\n    {vip}/24 dev {dev}\n  }}\n{notify}}}\n"
        ),
    )?;
    let pid = |n: &str| dir.join(format!("{role}-{n}.pid"));
    Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "keepalived",
            "--dont-fork",
            "--log-console",
            "--vrrp",
        ])
        .arg("--use-file")
        .arg(&conf)
        .arg("--pid")
        .arg(pid("main"))
        .arg("--vrrp_pid")
        .arg(pid("vrrp"))
        .arg("--checkers_pid")
        .arg(pid("checkers"))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join(format!("{role}.log")))?)
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start keepalived (cargo xtask setup installs it)")
}

fn has_addr(lan: &Lan, host: usize, addr: &str) -> bool {
    Command::new("ip")
        .args(["-n", &lan.hosts[host].ns, "addr", "show"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("{addr}/")))
}

/// One keepalived failover; its RTO in ms.
fn keepalived_round() -> Result<f64> {
    let lan = Lan::create(3)?;
    let dir = tempfile::Builder::new()
        .prefix("doppel-keepalived-")
        .tempdir()?;
    let d = dir.path();
    let vip = lan.extra_v4(100).to_string();
    let addr = format!("{vip}:7000");
    let (src, tgt, cli) = (&lan.hosts[0], &lan.hosts[1], &lan.hosts[2]);
    let _src_procs = Netns(&src.ns);
    let _tgt_procs = Netns(&tgt.ns);
    let _cli_procs = Netns(&cli.ns);
    let script = d.join("notify-master.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nsetsid {} serve {addr} {} target </dev/null >/dev/null 2>&1 &\n",
            service_bin().display(),
            d.join("target.log").display()
        ),
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700))?;
    let _k_src = keepalived(&src.ns, d, "source", &src.dev, &vip, "")?;
    let notify = format!("  notify_master \"{}\"\n", script.display());
    let _k_tgt = keepalived(&tgt.ns, d, "target", &tgt.dev, &vip, &notify)?;
    let t = std::time::Instant::now();
    while !has_addr(&lan, 0, &vip) {
        if t.elapsed() > Duration::from_secs(15) {
            bail!("keepalived on the source did not take {vip}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _svc = start_service(&src.ns, &addr, &d.join("source.log"), "source")?;
    let mut client = Client::start(&cli.ns, &addr, d.join("client.log"))?;
    client.wait_answers("source", 20, Duration::from_secs(20))?;
    std::thread::sleep(Duration::from_secs(1));
    let death = mono_ns();
    lan.ip(0, &["link", "set", "dev", &src.dev, "down"])?;
    Netns(&src.ns).kill_all();
    let first = client.wait_answer_from("target", death, Duration::from_secs(30))?;
    client.stop();
    Ok((first.done_ns - death) as f64 / 1e6)
}
