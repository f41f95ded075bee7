//! Pre-staged services: configured shell commands, run with a timeout, their output
//! appended to `<state_dir>/<source>/services.log`.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::config::ServiceConfig;

/// How often a health command is retried until it passes.
const HEALTH_EVERY: Duration = Duration::from_millis(50);

/// Runs `sh -c command` to its end within `timeout`; `Ok(false)` when it exited non-zero.
async fn run(command: &str, env: &[(&str, &str)], log: &Path, timeout: Duration) -> Result<bool> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run {command:?}"))?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => Ok(status?.success()),
        Err(_) => {
            let _ = child.kill().await;
            bail!("{command:?} did not finish within {timeout:?} (killed)")
        }
    }
}

/// Starts one service and waits for its health command to pass. Returns what happened.
pub async fn start(s: &ServiceConfig, source: &str, log: &Path) -> Result<String> {
    let env = [("DOPPEL_SOURCE", source), ("DOPPEL_EVENT", "failover")];
    let t = Instant::now();
    if !run(&s.start, &env, log, s.timeout).await? {
        bail!(
            "service {:?}: start command {:?} failed; its output is in {}",
            s.name,
            s.start,
            log.display()
        );
    }
    let Some(health) = &s.health else {
        return Ok(format!("{} started", s.name));
    };
    loop {
        let left = s.timeout.saturating_sub(t.elapsed());
        if left.is_zero() {
            bail!(
                "service {:?}: health check {health:?} did not pass within {:?}; output in {}",
                s.name,
                s.timeout,
                log.display()
            );
        }
        if run(health, &env, log, left).await.unwrap_or(false) {
            return Ok(format!(
                "{} healthy after {} ms",
                s.name,
                t.elapsed().as_millis()
            ));
        }
        tokio::time::sleep(HEALTH_EVERY).await;
    }
}

/// Stops one service (if it has a stop command).
pub async fn stop(s: &ServiceConfig, source: &str, log: &Path) -> Result<String> {
    let Some(stop) = &s.stop else {
        return Ok(format!("{}: no stop command", s.name));
    };
    let env = [("DOPPEL_SOURCE", source), ("DOPPEL_EVENT", "failback")];
    if !run(stop, &env, log, s.timeout).await? {
        bail!(
            "service {:?}: stop command {stop:?} failed; output in {}",
            s.name,
            log.display()
        );
    }
    Ok(format!("{} stopped", s.name))
}
