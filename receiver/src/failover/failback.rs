//! Failback: the data goes back to the original source, then the identity.
//!
//! The copy back is doppel replicating in reverse: this host runs a temporary
//! `doppel-agent` whose sets are the source's replica roots here. Its target is a
//! `doppel-receiver` on the original source host that maps those sets to their original
//! paths (`[source.failback]`). The agent's mirror compares block checksums, so only
//! what changed while this host served crosses the wire. Its live capture ships what the
//! services still write meanwhile. Steps:
//!
//! 1. `check`: the source is failed over here and a failback is configured.
//! 2. `copy`: the temporary agent mirrors every set; wait until it is synced.
//! 3. `services`: stop the services the failover started, in reverse order.
//! 4. `final-sync`: wait until the last writes are acknowledged, then stop the agent.
//! 5. `addresses`: remove the addresses the failover added.
//! 6. `hostname`: restore the hostname from before.
//! 7. `release`: the source's sets are marked stale (its agent starts them over: what
//!    it still holds predates the failover), the fence is lifted, the record deleted.
//!
//! The original source then takes its identity back itself: its address and services.
//! See receiver/README.md for the whole procedure.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{identity, services, Options, Outcome, Record, Report, Steps};
use crate::config::{FailbackConfig, SourceConfig};
use crate::server::Slot;
use crate::state::StateStore;

/// How often the temporary agent's status is polled.
const POLL: Duration = Duration::from_millis(100);
/// How long the final sync may take after the services stopped.
const FINAL_SYNC: Duration = Duration::from_secs(300);

pub async fn failback(slot: &Slot, state_dir: &Path, store: &StateStore, opts: Options) -> Report {
    let src = slot.source().clone();
    let mut steps = Steps::new();
    let report = |steps: Steps| steps.report(&src.name, "failback", opts);

    // 1. check
    let t = Instant::now();
    let record = match Record::load(state_dir, &src.name) {
        Ok(Some(r)) if slot.fenced() => r,
        Ok(_) => {
            steps.add(
                "check",
                t,
                Outcome::Refused,
                format!(
                    "{} is not failed over to this host; nothing to fail back",
                    src.name
                ),
            );
            return report(steps);
        }
        Err(e) => {
            steps.add("check", t, Outcome::Failed, format!("{e:#}"));
            return report(steps);
        }
    };
    let Some(fb) = src.failback.clone() else {
        steps.add(
            "check",
            t,
            Outcome::Refused,
            format!(
                "no [source.failback] for {}: configure the receiver on the original source host that takes the data back (see receiver/README.md)",
                src.name
            ),
        );
        return report(steps);
    };
    let sets = match store.sets(&src.name) {
        Ok(s) if !s.is_empty() => s,
        Ok(_) => {
            steps.add(
                "check",
                t,
                Outcome::Refused,
                format!("{} never replicated a set here", src.name),
            );
            return report(steps);
        }
        Err(e) => {
            steps.add("check", t, Outcome::Failed, format!("{e:#}"));
            return report(steps);
        }
    };
    steps.add(
        "check",
        t,
        Outcome::Done,
        format!(
            "sets {} go back to {} at {}",
            sets.join(", "),
            fb.name,
            fb.address
        ),
    );

    // 2. copy
    let t = Instant::now();
    if opts.dry_run {
        steps.add(
            "copy",
            t,
            Outcome::Would,
            "would mirror the sets back by block checksums with a temporary doppel-agent",
        );
        for (name, what) in [
            ("services", "would stop the services the failover started"),
            (
                "final-sync",
                "would wait for the last writes, then stop the agent",
            ),
            ("addresses", "would remove the addresses the failover added"),
            ("hostname", "would restore the hostname from before"),
            (
                "release",
                "would accept the source again; its agent starts the sets over",
            ),
        ] {
            steps.add(name, Instant::now(), Outcome::Would, what);
        }
        return report(steps);
    }
    let dir = state_dir.join(&src.name).join("failback-agent");
    let mut agent = match Agent::start(&dir, &fb, &src, &sets) {
        Ok(a) => a,
        Err(e) => {
            steps.add("copy", t, Outcome::Failed, format!("{e:#}"));
            return report(steps);
        }
    };
    match agent.wait_synced(fb.copy_timeout).await {
        Ok(bytes) => steps.add(
            "copy",
            t,
            Outcome::Done,
            format!("the sets are on {} ({bytes} bytes of data sent)", fb.name),
        ),
        Err(e) => {
            steps.add(
                "copy",
                t,
                Outcome::Failed,
                format!("{e:#}; the agent's log is {}", agent.log.display()),
            );
            return report(steps);
        }
    }

    // 3. services
    let t = Instant::now();
    let log = state_dir.join(&src.name).join("services.log");
    let mut done = Vec::new();
    for name in record.services_started.iter().rev() {
        let Some(s) = src.failover.services.iter().find(|s| &s.name == name) else {
            done.push(format!("{name}: no longer configured, not stopped"));
            continue;
        };
        match services::stop(s, &src.name, &log).await {
            Ok(d) => done.push(d),
            Err(e) => {
                done.push(format!("{e:#}"));
                steps.add("services", t, Outcome::Failed, done.join("; "));
                return report(steps);
            }
        }
    }
    steps.add(
        "services",
        t,
        Outcome::Done,
        if done.is_empty() {
            "none were started".into()
        } else {
            done.join("; ")
        },
    );

    // 4. final sync
    let t = Instant::now();
    match agent.wait_synced(FINAL_SYNC).await {
        Ok(bytes) => {
            agent.stop().await;
            steps.add(
                "final-sync",
                t,
                Outcome::Done,
                format!(
                    "every write is on {}; {bytes} bytes sent in all; agent stopped",
                    fb.name
                ),
            );
        }
        Err(e) => {
            steps.add("final-sync", t, Outcome::Failed, format!("{e:#}"));
            return report(steps);
        }
    }

    // 5. addresses
    let t = Instant::now();
    match &record.interface {
        Some(dev) if !record.added.is_empty() => {
            for a in &record.added {
                let parsed = a
                    .split_once('/')
                    .and_then(|(ip, len)| Some((ip.parse().ok()?, len.parse().ok()?)));
                let r = match parsed {
                    Some(p) => identity::remove_address(dev, &p),
                    None => Err(anyhow::anyhow!("unreadable address {a:?} in the record")),
                };
                if let Err(e) = r {
                    steps.add("addresses", t, Outcome::Failed, format!("{e:#}"));
                    return report(steps);
                }
            }
            steps.add(
                "addresses",
                t,
                Outcome::Done,
                format!("removed {} from {dev}", record.added.join(", ")),
            );
        }
        _ => steps.add("addresses", t, Outcome::Skipped, "the failover added none"),
    }

    // 6. hostname
    let t = Instant::now();
    match &record.previous_hostname {
        Some(h) => match identity::set_hostname(h) {
            Ok(()) => steps.add("hostname", t, Outcome::Done, format!("back to {h}")),
            Err(e) => {
                steps.add("hostname", t, Outcome::Failed, format!("{e:#}"));
                return report(steps);
            }
        },
        None => steps.add(
            "hostname",
            t,
            Outcome::Skipped,
            "the failover did not change it",
        ),
    }

    // 7. release
    let t = Instant::now();
    let r = (|| -> Result<()> {
        for set in &sets {
            if let Some(mut st) = store.load(&src.name, set)? {
                st.stale = true;
                store.store(&src.name, set, st)?;
            }
        }
        slot.unfence(state_dir)
    })();
    match r {
        Ok(()) => steps.add(
            "release",
            t,
            Outcome::Done,
            format!(
                "{} is accepted again; its agent will start every set over. Now give {} its addresses and services back, then start its doppel-agent",
                src.name, src.name
            ),
        ),
        Err(e) => steps.add("release", t, Outcome::Failed, format!("{e:#}")),
    }
    report(steps)
}

/// The temporary agent: a `doppel-agent` child process with its own config and state.
struct Agent {
    child: tokio::process::Child,
    socket: PathBuf,
    log: PathBuf,
}

fn agent_bin() -> Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find this program's path")?;
    let bin = me.with_file_name("doppel-agent");
    if !bin.exists() {
        bail!(
            "failback needs doppel-agent next to doppel-receiver ({}); install it there",
            bin.display()
        );
    }
    Ok(bin)
}

fn toml_str(p: &Path) -> String {
    toml::Value::String(p.display().to_string()).to_string()
}

impl Agent {
    fn start(
        dir: &Path,
        fb: &FailbackConfig,
        src: &SourceConfig,
        sets: &[String],
    ) -> Result<Agent> {
        // A fresh state every time: a new epoch, so the other side compares everything.
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut config = format!(
            // Its sets are this receiver's replica roots, on purpose: no overlap check.
            "name = {}\ncert = {}\nkey = {}\nstate_dir = {}\nlocal_receiver_config = \"\"\n\n[[target]]\nname = \"origin\"\naddress = \"{}\"\nfingerprint = \"{}\"\n",
            toml::Value::String(fb.name.clone()),
            toml_str(&fb.cert),
            toml_str(&fb.key),
            toml_str(&dir.join("state")),
            fb.address,
            fb.fingerprint,
        );
        for set in sets {
            config += &format!(
                "\n[[set]]\nname = {}\nroot = {}\ntargets = [\"origin\"]\n",
                toml::Value::String(set.clone()),
                toml_str(&src.set_root(set)),
            );
        }
        let path = dir.join("agent.toml");
        std::fs::write(&path, config)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let log = dir.join("agent.log");
        let out = std::fs::File::create(&log)?;
        let child = tokio::process::Command::new(agent_bin()?)
            .args(["run", "--config"])
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start doppel-agent")?;
        Ok(Agent {
            child,
            socket: doppel_control::socket_path(&dir.join("state")),
            log,
        })
    }

    /// Waits until every set is connected, acknowledged and compared; returns the data
    /// bytes sent so far.
    async fn wait_synced(&mut self, within: Duration) -> Result<u64> {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait()? {
                bail!("the temporary doppel-agent exited ({st})");
            }
            let socket = self.socket.clone();
            let status = tokio::task::spawn_blocking(move || {
                let mut reply = None;
                doppel_control::call(
                    &socket,
                    "the temporary agent",
                    &serde_json::json!({"cmd": "status"}),
                    |r: serde_json::Value| reply = Some(r),
                )
                .ok()
                .and(reply)
            })
            .await?;
            if let Some(s) = status.as_ref().and_then(|r| r.get("status")) {
                let sets = s["sets"].as_array().cloned().unwrap_or_default();
                let all = !sets.is_empty()
                    && sets
                        .iter()
                        .all(|x| x["connected"] == true && x["acked"].as_u64().unwrap_or(0) >= 1);
                if all && s["synced"] == true {
                    return Ok(sets
                        .iter()
                        .filter_map(|x| x["sent_bytes"].as_u64())
                        .max()
                        .unwrap_or(0));
                }
            }
            if t.elapsed() > within {
                bail!("the sets were not synced within {within:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Stops the agent the orderly way (SIGTERM), then for good.
    async fn stop(&mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}
