//! Failover: this receiver takes over a source's identity, step by step, each step timed
//! and reported.
//!
//! 1. `heartbeat`: refuse if the source still answers heartbeats (unless forced).
//! 2. `drain`: apply and commit what the source already sent, then accept nothing more
//!    from it; this is recorded in `<state_dir>/<source>/failover.json` first, so a
//!    restarted receiver still refuses the source.
//! 3. `guard`: split-brain guard, RFC 5227 style: probe the source's addresses (ARP,
//!    NDP) and refuse if anyone answers (unless forced); a refusal undoes step 2.
//! 4. `addresses`: add them to the configured interface and announce them at once
//!    (gratuitous ARP, unsolicited NA), repeated in the background.
//! 5. `hostname`, 6. `services`: take the hostname, start the pre-staged services in
//!    order, each until its health check passes.
//!
//! The record lists what was actually changed (addresses that were not already there,
//! the hostname before, services started) so that a failback undoes exactly that.

pub mod arp;
pub mod failback;
pub mod identity;
pub mod link;
pub mod ndp;
pub mod services;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::FailoverConfig;
use crate::monitor::Health;
use crate::server::Slot;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Done,
    Skipped,
    /// Dry run: what the step would do.
    Would,
    Refused,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub outcome: Outcome,
    pub ms: f64,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub source: String,
    /// "failover" or "failback".
    pub action: String,
    pub dry_run: bool,
    pub forced: bool,
    pub ok: bool,
    pub steps: Vec<Step>,
    pub total_ms: f64,
}

/// What a failover changed on this host, kept until the failback undoes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Unix time (ms) the source was fenced.
    pub at_ms: u64,
    pub interface: Option<String>,
    /// Addresses this failover added (not those the interface already had).
    pub added: Vec<String>,
    pub previous_hostname: Option<String>,
    pub services_started: Vec<String>,
}

pub fn record_path(state_dir: &Path, source: &str) -> PathBuf {
    state_dir.join(source).join("failover.json")
}

impl Record {
    pub fn load(state_dir: &Path, source: &str) -> Result<Option<Record>> {
        let p = record_path(state_dir, source);
        match std::fs::read(&p) {
            Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
                format!(
                    "{} is damaged; fix or remove it (it says this receiver took over the source)",
                    p.display()
                )
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
        }
    }

    /// Replaces the record atomically and durably.
    pub fn store(&self, state_dir: &Path, source: &str) -> Result<()> {
        let p = record_path(state_dir, source);
        let dir = p.parent().expect("record path has a parent");
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let tmp = p.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(self).expect("a record serialises"))?;
            f.sync_all()?;
            std::fs::rename(&tmp, &p)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().with_context(|| format!("cannot write {}", p.display()))
    }

    pub fn remove(state_dir: &Path, source: &str) -> Result<()> {
        let p = record_path(state_dir, source);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove {}", p.display())),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Options {
    pub dry_run: bool,
    pub force: bool,
}

/// Times steps and collects them into a report.
struct Steps {
    start: Instant,
    steps: Vec<Step>,
}

impl Steps {
    fn new() -> Steps {
        Steps {
            start: Instant::now(),
            steps: Vec::new(),
        }
    }

    fn add(&mut self, name: &str, t: Instant, outcome: Outcome, detail: impl Into<String>) {
        let detail = detail.into();
        tracing::info!(
            step = name,
            ?outcome,
            ms = t.elapsed().as_secs_f64() * 1e3,
            "{detail}"
        );
        self.steps.push(Step {
            name: name.into(),
            outcome,
            ms: t.elapsed().as_secs_f64() * 1e3,
            detail,
        });
    }

    fn report(self, source: &str, action: &str, opts: Options) -> Report {
        let ok = !self
            .steps
            .iter()
            .any(|s| matches!(s.outcome, Outcome::Refused | Outcome::Failed));
        Report {
            source: source.into(),
            action: action.into(),
            dry_run: opts.dry_run,
            forced: opts.force,
            ok,
            total_ms: self.start.elapsed().as_secs_f64() * 1e3,
            steps: self.steps,
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs a failover of `slot`'s source. Never panics on the operator: every problem is a
/// step that failed or refused, with what to do.
pub async fn failover(slot: &Slot, state_dir: &Path, opts: Options) -> Report {
    let source = slot.source().name.clone();
    let cfg = slot.source().failover.clone();
    let mut steps = Steps::new();
    let report = |steps: Steps| steps.report(&source, "failover", opts);

    // 1. Is the source still alive?
    let t = Instant::now();
    let (health, since) = slot.health();
    let ago = since.map_or("never".to_string(), |d| format!("{} ms ago", d.as_millis()));
    match health {
        Health::FailedOver if !opts.force => {
            steps.add(
                "heartbeat",
                t,
                Outcome::Refused,
                format!("{source} is already failed over to this host; pass --force to run the steps again, or fail back first"),
            );
            return report(steps);
        }
        Health::Alive | Health::Suspect if !opts.force => {
            steps.add(
                "heartbeat",
                t,
                Outcome::Refused,
                format!("{source} is {health}: its last heartbeat came {ago}. Stop it first, or pass --force if you know it can no longer serve (then fencing it is up to you)"),
            );
            return report(steps);
        }
        _ => steps.add(
            "heartbeat",
            t,
            Outcome::Done,
            format!("{source} is {health} (last heartbeat {ago})"),
        ),
    }

    // 2. Drain and fence.
    let t = Instant::now();
    if opts.dry_run {
        steps.add(
            "drain",
            t,
            Outcome::Would,
            format!("would apply what {source} already sent, then accept nothing more from it"),
        );
    } else {
        let mut rec = Record::load(state_dir, &source)
            .ok()
            .flatten()
            .unwrap_or_default();
        rec.at_ms = now_ms();
        rec.interface = cfg.interface.clone();
        if let Err(e) = rec.store(state_dir, &source) {
            steps.add("drain", t, Outcome::Failed, format!("{e:#}"));
            return report(steps);
        }
        match slot.fence_and_drain().await {
            Ok(detail) => steps.add("drain", t, Outcome::Done, detail),
            Err(e) => {
                // Still fenced: the operator decides (rerun with --force, or failback).
                steps.add("drain", t, Outcome::Failed, format!("{e:#}"));
                return report(steps);
            }
        }
    }

    // 3. Split-brain guard.
    let t = Instant::now();
    match guard(&cfg).await {
        Ok(None) => steps.add("guard", t, Outcome::Skipped, "no addresses to probe"),
        Ok(Some(answered)) if answered.is_empty() => steps.add(
            "guard",
            t,
            Outcome::Done,
            format!(
                "nobody answered probes for {} within {} ms",
                addr_list(&cfg),
                cfg.probe_wait.as_millis()
            ),
        ),
        Ok(Some(answered)) => {
            let who = answered.join(", ");
            if opts.force {
                steps.add(
                    "guard",
                    t,
                    Outcome::Done,
                    format!("FORCED although still in use: {who}"),
                );
            } else {
                if !opts.dry_run {
                    if let Err(e) = slot.unfence(state_dir) {
                        tracing::error!("cannot undo the fence: {e:#}");
                    }
                }
                steps.add(
                    "guard",
                    t,
                    Outcome::Refused,
                    format!("the source's addresses are still in use: {who}. The source (or someone) still serves; changes from {source} are accepted again. Stop it, or pass --force"),
                );
                return report(steps);
            }
        }
        Err(e) => {
            if !opts.dry_run {
                let _ = slot.unfence(state_dir);
            }
            steps.add("guard", t, Outcome::Failed, format!("{e:#}"));
            return report(steps);
        }
    }

    // 4. Addresses.
    let t = Instant::now();
    let Some(dev) = cfg.interface.clone().filter(|_| !cfg.addresses.is_empty()) else {
        steps.add("addresses", t, Outcome::Skipped, "no addresses configured");
        return finish(slot, state_dir, &cfg, opts, steps).await;
    };
    if opts.dry_run {
        steps.add(
            "addresses",
            t,
            Outcome::Would,
            format!("would add {} on {dev} and announce them", addr_list(&cfg)),
        );
        return finish(slot, state_dir, &cfg, opts, steps).await;
    }
    let mut added = Vec::new();
    for a in &cfg.addresses {
        match identity::add_address(&dev, a) {
            Ok(true) => added.push(identity::cidr(a)),
            Ok(false) => {}
            Err(e) => {
                steps.add("addresses", t, Outcome::Failed, format!("{e:#}"));
                return report(steps);
            }
        }
    }
    let _ = update_record(state_dir, &source, |r| {
        for a in &added {
            if !r.added.contains(a) {
                r.added.push(a.clone());
            }
        }
    });
    match announce(&dev, &cfg).await {
        Ok(n) => steps.add(
            "addresses",
            t,
            Outcome::Done,
            format!(
                "added {} on {dev} ({} were there already); announced, {n} more announcements follow every {} ms",
                addr_list(&cfg),
                cfg.addresses.len() - added.len(),
                cfg.announce_interval.as_millis()
            ),
        ),
        Err(e) => {
            steps.add("addresses", t, Outcome::Failed, format!("announcing: {e:#}"));
            return report(steps);
        }
    }
    finish(slot, state_dir, &cfg, opts, steps).await
}

/// Steps 5 and 6.
async fn finish(
    slot: &Slot,
    state_dir: &Path,
    cfg: &FailoverConfig,
    opts: Options,
    mut steps: Steps,
) -> Report {
    let source = slot.source().name.clone();
    let t = Instant::now();
    match &cfg.hostname {
        None => steps.add("hostname", t, Outcome::Skipped, "no hostname configured"),
        Some(h) if opts.dry_run => steps.add(
            "hostname",
            t,
            Outcome::Would,
            format!(
                "would change the hostname from {} to {h}",
                identity::hostname()
            ),
        ),
        Some(h) => {
            let before = identity::hostname();
            let _ = update_record(state_dir, &source, |r| {
                r.previous_hostname.get_or_insert(before.clone());
            });
            match identity::set_hostname(h) {
                Ok(()) => steps.add("hostname", t, Outcome::Done, format!("{before} -> {h}")),
                Err(e) => {
                    steps.add("hostname", t, Outcome::Failed, format!("{e:#}"));
                    return steps.report(&source, "failover", opts);
                }
            }
        }
    }
    let t = Instant::now();
    if cfg.services.is_empty() {
        steps.add("services", t, Outcome::Skipped, "no services configured");
    } else if opts.dry_run {
        let names: Vec<&str> = cfg.services.iter().map(|s| s.name.as_str()).collect();
        steps.add(
            "services",
            t,
            Outcome::Would,
            format!("would start, in order: {}", names.join(", ")),
        );
    } else {
        let log = state_dir.join(&source).join("services.log");
        let mut done = Vec::new();
        for s in &cfg.services {
            match services::start(s, &source, &log).await {
                Ok(d) => {
                    done.push(d);
                    let _ = update_record(state_dir, &source, |r| {
                        if !r.services_started.contains(&s.name) {
                            r.services_started.push(s.name.clone());
                        }
                    });
                }
                Err(e) => {
                    done.push(format!("{e:#}"));
                    steps.add("services", t, Outcome::Failed, done.join("; "));
                    return steps.report(&source, "failover", opts);
                }
            }
        }
        steps.add("services", t, Outcome::Done, done.join("; "));
    }
    steps.report(&source, "failover", opts)
}

fn addr_list(cfg: &FailoverConfig) -> String {
    cfg.addresses
        .iter()
        .map(identity::cidr)
        .collect::<Vec<_>>()
        .join(", ")
}

fn update_record(state_dir: &Path, source: &str, f: impl FnOnce(&mut Record)) -> Result<()> {
    let mut r = Record::load(state_dir, source)?.unwrap_or_default();
    f(&mut r);
    r.store(state_dir, source)
}

/// Probes the configured addresses; `None` when there is nothing to probe, else who
/// answered ("10.0.0.5 at 02:..").
async fn guard(cfg: &FailoverConfig) -> Result<Option<Vec<String>>> {
    let Some(dev) = cfg.interface.clone().filter(|_| !cfg.addresses.is_empty()) else {
        return Ok(None);
    };
    let v4: Vec<_> = cfg
        .addresses
        .iter()
        .filter_map(|(a, _)| match a {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        })
        .collect();
    let v6: Vec<_> = cfg
        .addresses
        .iter()
        .filter_map(|(a, _)| match a {
            IpAddr::V6(a) => Some(*a),
            IpAddr::V4(_) => None,
        })
        .collect();
    let wait = cfg.probe_wait;
    tokio::task::spawn_blocking(move || {
        let link = link::Link::find(&dev)?;
        let mut answered = Vec::new();
        for (a, mac) in arp::probe(link, &v4, wait)? {
            answered.push(format!("{a} at {}", link::format_mac(&mac)));
        }
        match ndp::probe(link, &v6, wait) {
            Ok(found) => {
                for (a, mac) in found {
                    answered.push(format!("{a} at {}", link::format_mac(&mac)));
                }
            }
            // No usable IPv6 source address on the link: the probe cannot be asked.
            Err(e) if !v6.is_empty() => {
                tracing::warn!("IPv6 split-brain probe not possible: {e:#}");
            }
            Err(_) => {}
        }
        Ok(Some(answered))
    })
    .await
    .context("the probe task failed")?
}

/// Sends the first announcement of every address now, and the rest in the background.
/// Returns how many rounds follow.
async fn announce(dev: &str, cfg: &FailoverConfig) -> Result<u32> {
    let dev = dev.to_string();
    let addrs = cfg.addresses.clone();
    let link = link::Link::find(&dev)?;
    let round = move || -> Result<()> {
        let arp = arp::Socket::open(link)?;
        for (a, _) in &addrs {
            match a {
                IpAddr::V4(a) => arp.send(&arp::Arp::announcement(link.mac, *a))?,
                IpAddr::V6(a) => {
                    ndp::Socket::open(link, Some(*a))?
                        .send(ndp::ALL_NODES, &ndp::advertisement(link.mac, *a))?;
                }
            }
        }
        Ok(())
    };
    let first = round.clone();
    tokio::task::spawn_blocking(first)
        .await
        .context("the announce task failed")??;
    let more = cfg.announce_count.saturating_sub(1);
    let every = cfg.announce_interval;
    tokio::spawn(async move {
        for _ in 0..more {
            tokio::time::sleep(every).await;
            let r = round.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(r).await {
                tracing::warn!("announcing the taken-over addresses again failed: {e:#}");
            }
        }
    });
    Ok(more)
}

/// How long a drain may take before the failover reports it as failed.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_atomically() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Record::load(dir.path(), "web1").unwrap(), None);
        let r = Record {
            at_ms: 5,
            interface: Some("eth0".into()),
            added: vec!["10.0.0.5/24".into()],
            previous_hostname: Some("backup".into()),
            services_started: vec!["app".into()],
        };
        r.store(dir.path(), "web1").unwrap();
        assert_eq!(Record::load(dir.path(), "web1").unwrap(), Some(r));
        std::fs::write(record_path(dir.path(), "web1"), b"{").unwrap();
        let e = Record::load(dir.path(), "web1").unwrap_err();
        assert!(format!("{e:#}").contains("damaged"));
        Record::remove(dir.path(), "web1").unwrap();
        Record::remove(dir.path(), "web1").unwrap();
        assert_eq!(Record::load(dir.path(), "web1").unwrap(), None);
    }
}
