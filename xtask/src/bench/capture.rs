//! `capture`: what the capture costs the rest of the host, against the physical floor of
//! a per-write hook measured in the same run. Thread CPU time per call, so the agent and
//! the receiver competing for the two cores do not count; each figure is the median of
//! per-chunk means, and each ratio the median of the rounds' ratios (the three setups
//! alternate in every round: no agent, the empty floor program alone, the agent).
//!
//! - `syscall_tax_pct`: `getppid()` with the agent running (one set on ext4) against no
//!   agent: what every syscall of every process pays.
//! - `per_write_hook_floor_pct`: a 4 KiB `write()` loop to an unwatched ext4 file with
//!   only an empty program on `ext4_da_write_end` (`doppel-agent bench-floor`) against
//!   no program: the least any per-write hook costs.
//! - `unwatched_write_over_floor_pct`: the same loop with the agent running, against the
//!   floor.
//! - `watched_write_cpu_tax_ns`: the writer's own CPU time per 4 KiB write into a
//!   watched file, agent on against off; `watched_write_tax_over_floor_ratio` divides it
//!   by the floor's ns.
//! - `fs_only_syscall_tax_pct`, `fs_only_unwatched_write_over_floor_pct`: the same two
//!   loops with only the capture inside the filesystem attached (`bench-floor
//!   --filesystem-only`: the filesystem programs and the fanotify mark, no agent
//!   pipeline behind them), and `fs_only_watched_write_cpu_tax_ns` (with its ratio to
//!   the floor) for writes into a directory they mark, its records read and dropped.
//!   With every set on ext4 the agent attaches no syscall hook either: its figures and
//!   these differ by the agent's own work and by noise.
//! - `fanotify_mark_write_ns`: the unwatched write loop with only the fanotify group's
//!   filesystem mark (`bench-floor --namespace-only`) against no agent: what the
//!   namespace half of the capture costs every write to a set's filesystem.

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use doppel_tests::cluster::Cluster;

use super::{median, Figures};

/// Rounds: each takes about a second, and the figures move by a few percent from run
/// to run on this kind of machine, so more of them than the usual five.
const ROUNDS: usize = 11;
/// Bytes the write loops go over (page cache, rewritten in place).
const REGION: u64 = 16 << 20;
const BLOCK: usize = 4096;

fn thread_cpu_ns() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 * 1e9 + t.tv_nsec as f64
}

/// Median over chunks of `chunk` calls of the thread CPU ns per call of `f`.
fn per_call(total: usize, chunk: usize, mut f: impl FnMut(usize)) -> f64 {
    let mut means = Vec::with_capacity(total / chunk);
    for k in 0..total / chunk {
        let start = thread_cpu_ns();
        for i in 0..chunk {
            f(k * chunk + i);
        }
        means.push((thread_cpu_ns() - start) / chunk as f64);
    }
    median(means)
}

fn getppid_ns() -> f64 {
    per_call(400_000, 5_000, |_| {
        // SAFETY: getppid has no arguments and no preconditions.
        unsafe { libc::syscall(libc::SYS_getppid) };
    })
}

/// ns per 4 KiB `write()` over a 16 MiB file in `dir`, rewritten in place.
fn write_ns(dir: &Path, writes: usize) -> Result<f64> {
    let path = dir.join("capture-loop.bin");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let block = vec![0x5au8; BLOCK];
    for off in (0..REGION).step_by(BLOCK) {
        f.write_all_at(&block, off)?;
    }
    let fd = f.as_raw_fd();
    let per_region = (REGION as usize) / BLOCK;
    let mut failed = false;
    let ns = per_call(writes, 2_000, |i| {
        // SAFETY: a valid fd and buffer of BLOCK bytes.
        unsafe {
            if i % per_region == 0 {
                libc::lseek(fd, 0, libc::SEEK_SET);
            }
            if libc::write(fd, block.as_ptr().cast(), BLOCK) != BLOCK as isize {
                failed = true;
            }
        }
    });
    drop(f);
    std::fs::remove_file(&path)?;
    if failed {
        bail!("a 4 KiB write to {} failed", path.display());
    }
    Ok(ns)
}

/// What `doppel-agent bench-floor` attaches: the empty program alone, or the
/// filesystem programs alone (for the filesystem of the given directory).
enum Hook<'a> {
    Floor,
    FilesystemOnly(&'a Path),
    NamespaceOnly(&'a Path),
}

/// Runs `measure` with `hook` attached by `doppel-agent bench-floor`.
fn with_hook<T>(hook: Hook, measure: impl FnOnce() -> Result<T>) -> Result<T> {
    let bin = doppel_tests::bin_dir().join("doppel-agent");
    let mut cmd = Command::new(&bin);
    cmd.arg("bench-floor");
    match hook {
        Hook::Floor => {}
        Hook::FilesystemOnly(dir) => {
            cmd.arg("--filesystem-only").arg(dir);
        }
        Hook::NamespaceOnly(dir) => {
            cmd.arg("--namespace-only").arg(dir);
        }
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("no stdout")?).read_line(&mut line)?;
    if line.trim() != "attached" {
        let _ = child.kill();
        bail!("doppel-agent bench-floor did not attach its program: {line:?}");
    }
    let out = measure();
    // Closing its standard input detaches the programs.
    drop(child.stdin.take());
    child.wait()?;
    out
}

pub fn capture(figures: &mut Figures) -> Result<()> {
    let mut c = Cluster::new("bench")?;
    let unwatched = c.dir.path().join("unwatched");
    std::fs::create_dir_all(&unwatched)?;
    // Marked by the filesystem programs alone (no agent behind them).
    let fs_watched = c.dir.path().join("fs-watched");
    std::fs::create_dir_all(&fs_watched)?;
    c.start_receiver()?;
    let mut rounds: Vec<[f64; 11]> = Vec::new();
    for round in 0..ROUNDS {
        let base_sys = getppid_ns();
        let base_u = write_ns(&unwatched, 100_000)?;
        let base_w = write_ns(&c.source, 40_000)?;
        let floor_u = with_hook(Hook::Floor, || write_ns(&unwatched, 100_000))?;
        let (fs_sys, fs_u, fs_w) = with_hook(Hook::FilesystemOnly(&fs_watched), || {
            let sys = getppid_ns();
            Ok((
                sys,
                write_ns(&unwatched, 100_000)?,
                write_ns(&fs_watched, 40_000)?,
            ))
        })?;
        let fan_u = with_hook(Hook::NamespaceOnly(&fs_watched), || {
            write_ns(&unwatched, 100_000)
        })?;
        c.start_agent()?;
        c.wait_synced(Duration::from_secs(30))?;
        std::thread::sleep(Duration::from_millis(300));
        let agent_sys = getppid_ns();
        let agent_u = write_ns(&unwatched, 100_000)?;
        let agent_w = write_ns(&c.source, 40_000)?;
        doppel_tests::tree::wait_equal(&c.source, &c.replica, Duration::from_secs(60))
            .map_err(|d| anyhow::anyhow!("replica did not converge in round {round}: {d:?}"))?;
        c.kill_agent();
        eprintln!(
            "bench: capture round {round}: getppid {base_sys:.0} -> {agent_sys:.0} ns; \
             unwatched write {base_u:.0} (floor {floor_u:.0}) -> {agent_u:.0} ns; \
             watched write {base_w:.0} -> {agent_w:.0} ns; filesystem programs alone: \
             getppid {fs_sys:.0} ns, unwatched write {fs_u:.0} ns, watched write {fs_w:.0} ns; \
             fanotify mark alone: unwatched write {fan_u:.0} ns"
        );
        rounds.push([
            base_sys, agent_sys, base_u, floor_u, agent_u, base_w, agent_w, fs_sys, fs_u, fs_w,
            fan_u,
        ]);
    }
    let col = |i: usize| median(rounds.iter().map(|r| r[i]).collect());
    let per = |f: &dyn Fn(&[f64; 11]) -> f64| median(rounds.iter().map(f).collect());
    figures.insert("getppid_ns_baseline".into(), col(0));
    figures.insert("getppid_ns_agent".into(), col(1));
    figures.insert(
        "syscall_tax_pct".into(),
        per(&|r| (r[1] / r[0] - 1.0) * 100.0),
    );
    figures.insert("write_ns_baseline".into(), col(2));
    figures.insert("write_ns_floor".into(), col(3));
    figures.insert("write_ns_unwatched_agent".into(), col(4));
    figures.insert(
        "per_write_hook_floor_pct".into(),
        per(&|r| (r[3] / r[2] - 1.0) * 100.0),
    );
    figures.insert(
        "unwatched_write_over_floor_pct".into(),
        per(&|r| (r[4] / r[3] - 1.0) * 100.0),
    );
    figures.insert(
        "fs_only_syscall_tax_pct".into(),
        per(&|r| (r[7] / r[0] - 1.0) * 100.0),
    );
    figures.insert(
        "fs_only_unwatched_write_over_floor_pct".into(),
        per(&|r| (r[8] / r[3] - 1.0) * 100.0),
    );
    figures.insert(
        "fs_only_watched_write_cpu_tax_ns".into(),
        per(&|r| r[9] - r[5]),
    );
    figures.insert(
        "fs_only_watched_write_tax_over_floor_ratio".into(),
        per(&|r| (r[9] - r[5]) / (r[3] - r[2]).max(1.0)),
    );
    figures.insert("fanotify_mark_write_ns".into(), per(&|r| r[10] - r[2]));
    figures.insert("watched_write_cpu_tax_ns".into(), per(&|r| r[6] - r[5]));
    figures.insert(
        "watched_write_tax_over_floor_ratio".into(),
        per(&|r| (r[6] - r[5]) / (r[3] - r[2]).max(1.0)),
    );
    Ok(())
}
