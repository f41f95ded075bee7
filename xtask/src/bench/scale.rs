//! `scale`: a server-sized tree, on ext4 (the disk the machine has; source and replica
//! share it, as rsync's source and destination do).
//!
//! A tree of `DOPPEL_SCALE_FILES` files (default 1,000,000) of 1-8 KiB in one directory
//! per 100 files is built once per run (its build time is printed and reported).
//! - `scale_mirror_time_ratio_vs_rsync`: the first mirror to an empty replica, from
//!   starting the agent until it is synced, against `rsync -a` into an empty directory
//!   through an rsync daemon on loopback (as the mirror bench does).
//! - `scale_agent_rss_mib`: the agent's peak RSS (VmHWM) once synced, and per file.
//! - `scale_idle_agent_cpu_pct`: the agent's CPU over 30 s with nothing changing.
//! - `scale_verify_time_ratio_vs_rsync_checksum`: `doppel-agent verify` of the set
//!   against `rsync -a --checksum --dry-run` of the source against the replica.
//! - `scale_restart_bytes_read_ratio`: after a clean stop, 1 % of the files changed
//!   and the page cache dropped, what the restarted agent reads from the disk
//!   (`read_bytes` of /proc/PID/io) until synced, over the set's bytes; beside it the
//!   floor of any restart that looks at every file: what `find` reads to list the
//!   tree with sizes and ctimes from the same cold cache. `scale_restart_time_s`: the
//!   restart's time until synced.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use doppel_tests::cluster::Cluster;
use doppel_tests::disk::LoopDisk;
use rand::{Rng, SeedableRng};

use super::mirror::{settle, RsyncDaemon};
use super::{peak_rss_mib, Figures};

/// Files per directory of the generated tree.
const PER_DIR: usize = 100;

/// The agent's default `stamp_margin_s`.
const STAMP_MARGIN: Duration = Duration::from_secs(60);

/// How long the idle agent's CPU is measured.
const IDLE: Duration = Duration::from_secs(30);

fn files_wanted() -> Result<usize> {
    match std::env::var("DOPPEL_SCALE_FILES") {
        Ok(v) => v
            .parse()
            .with_context(|| format!("DOPPEL_SCALE_FILES={v} is not a number of files")),
        Err(_) => Ok(1_000_000),
    }
}

/// `files` files of 1-8 KiB of pseudo-random bytes in `files / PER_DIR` directories;
/// returns their bytes.
fn build_tree(root: &Path, files: usize) -> Result<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(19);
    let mut block = vec![0u8; 8192];
    rng.fill(&mut block[..]);
    let mut bytes = 0u64;
    for i in 0..files {
        let dir = root.join(format!("d{:05}", i / PER_DIR));
        if i % PER_DIR == 0 {
            std::fs::create_dir_all(&dir)?;
        }
        let len = rng.gen_range(1024..=8192);
        // A different slice per file, so that no two files are alike.
        let at = rng.gen_range(0..block.len() - len + 1);
        let mut f = std::fs::File::create(dir.join(format!("f{i:07}")))?;
        f.write_all(&block[at..at + len])?;
        f.write_all(&(i as u64).to_le_bytes())?;
        bytes += len as u64 + 8;
    }
    Ok(bytes)
}

/// Changes one file in a hundred (16 bytes overwritten in place, size kept).
fn change_one_in_a_hundred(root: &Path, files: usize) -> Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut changed = 0;
    for i in (0..files).step_by(100) {
        let p = root
            .join(format!("d{:05}", i / PER_DIR))
            .join(format!("f{i:07}"));
        let f = std::fs::OpenOptions::new().write(true).open(&p)?;
        f.write_all_at(b"changed meanwhile", 100)?;
        changed += 1;
    }
    Ok(changed)
}

/// CPU time (user + system) of process `pid` so far.
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').context("odd /proc/PID/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Ok(Duration::from_millis(ticks * 1000 / hz))
}

/// Bytes process `pid` made the storage read (`read_bytes` of /proc/PID/io).
fn read_bytes(pid: u32) -> Result<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))?;
    io.lines()
        .find_map(|l| l.strip_prefix("read_bytes: "))
        .and_then(|v| v.trim().parse().ok())
        .context("no read_bytes in /proc/PID/io")
}

/// Writes back and drops the page cache, dentries and inodes: what follows reads from
/// the disk.
fn drop_caches() -> Result<()> {
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("cannot drop the page cache")
}

/// Bytes read from storage by the children reaped so far.
fn children_read_bytes() -> u64 {
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut r) };
    r.ru_inblock as u64 * 512
}

/// What listing `root` with sizes and ctimes reads from a cold cache: the floor of any
/// restart that looks at every file.
fn metadata_floor(root: &Path) -> Result<u64> {
    drop_caches()?;
    let before = children_read_bytes();
    let st = Command::new("find")
        .arg(root)
        .args(["-type", "f", "-printf", "%s %C@\\n"])
        .stdout(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(st.success(), "find failed");
    Ok(children_read_bytes() - before)
}

fn timed(cmd: &mut Command) -> Result<(f64, std::process::Output)> {
    let t = Instant::now();
    let out = cmd.output()?;
    Ok((t.elapsed().as_secs_f64(), out))
}

pub fn scale(figures: &mut Figures) -> Result<()> {
    let files = files_wanted()?;
    // Tree, replica and rsync's copy on a new ext4 of their own: on a filesystem that
    // saw mass deletions, ext4 looks at every recently freed inode before it takes one
    // (`recently_deleted`), which made creating files 3 to 10 times slower for whoever
    // ran then, doppel or rsync; a bench run also leaves nothing of the kind behind.
    // 64 KiB per file: room for the three copies, and an inode for each.
    let disk = LoopDisk::new((files as u64 * 64 / 1024).max(2048))?;
    let tmp = std::env::var_os("TMPDIR");
    std::env::set_var("TMPDIR", &disk.mnt);
    let made = Cluster::new("scale");
    match tmp {
        Some(t) => std::env::set_var("TMPDIR", t),
        None => std::env::remove_var("TMPDIR"),
    }
    let mut c = made?;
    let t = Instant::now();
    let bytes = build_tree(&c.source, files)?;
    let build = t.elapsed().as_secs_f64();
    let built = Instant::now();
    eprintln!(
        "bench: scale: built {files} files ({} MiB) in {build:.1} s",
        bytes >> 20
    );

    // doppel first, rsync right after, neither after a removal (see above).
    c.start_receiver()?;
    settle();
    let t = Instant::now();
    c.start_agent_within(Duration::from_secs(3600))?;
    let scanned = t.elapsed().as_secs_f64();
    eprintln!("bench: scale: the agent's initial scan took {scanned:.1} s");
    c.wait_synced(Duration::from_secs(3600))?;
    let mirror = t.elapsed().as_secs_f64();
    let pid = c.agent_pid().context("the agent is not running")?;
    let rss = peak_rss_mib(pid)?;
    eprintln!(
        "bench: scale: doppel's first mirror took {mirror:.1} s; agent peak RSS {rss:.0} MiB"
    );
    if let Err(d) = doppel_tests::tree::wait_equal(&c.source, &c.replica, Duration::from_secs(120))
    {
        anyhow::bail!(
            "the replica differs after the mirror: {:?}",
            &d[..d.len().min(5)]
        );
    }

    // rsync's copy from the same warm cache the mirror read (the agent idles meanwhile:
    // nothing it watches changes).
    let dest = c.dir.path().join("rsync-dest");
    std::fs::create_dir_all(&dest)?;
    let daemon = RsyncDaemon::start(&dest)?;
    let (rsync, _) = daemon.push(&c.source, &[])?;
    drop(daemon);
    eprintln!("bench: scale: rsync -a into an empty directory took {rsync:.1} s");

    // Idle: nothing changes. (Stamps taken once the mirror ended are written meanwhile.)
    std::thread::sleep(Duration::from_secs(5));
    let cpu0 = cpu_time(pid)?;
    std::thread::sleep(IDLE);
    let idle_pct = (cpu_time(pid)? - cpu0).as_secs_f64() / IDLE.as_secs_f64() * 100.0;
    eprintln!("bench: scale: idle agent CPU {idle_pct:.2} %");

    // Verify, against rsync's checksum comparison of the same two trees.
    let (verify, out) = timed(
        Command::new(doppel_tests::bin_dir().join("doppel-agent"))
            .args(["verify", "--config"])
            .arg(c.dir.path().join("agent.toml")),
    )?;
    anyhow::ensure!(
        out.status.success(),
        "verify found differences or failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (rsync_checksum, out) = timed(
        Command::new("rsync")
            .args(["-a", "--checksum", "--dry-run"])
            .arg(format!("{}/", c.source.display()))
            .arg(format!("{}/", c.replica.display())),
    )?;
    anyhow::ensure!(out.status.success(), "rsync --checksum failed");
    eprintln!("bench: scale: verify took {verify:.1} s, rsync -a --checksum --dry-run {rsync_checksum:.1} s");

    // Restart after a clean stop, 1 % of the files changed meanwhile, from a cold cache.
    // Files changed within the stamp margin of the stop are compared, so the stop waits
    // until the tree is older than that.
    let margin = STAMP_MARGIN + Duration::from_secs(1);
    std::thread::sleep(margin.saturating_sub(built.elapsed()));
    c.stop_agent();
    let changed = change_one_in_a_hundred(&c.source, files)?;
    let floor = metadata_floor(&c.source)?;
    drop_caches()?;
    // The agent's own executable (100 MiB with its debug info) is no part of the set.
    std::fs::read(doppel_tests::bin_dir().join("doppel-agent"))?;
    let t = Instant::now();
    c.start_agent_within(Duration::from_secs(3600))?;
    c.wait_synced(Duration::from_secs(3600))?;
    let restart = t.elapsed().as_secs_f64();
    let pid = c.agent_pid().context("the agent is not running")?;
    let restart_read = read_bytes(pid)?;
    let restart_rss = peak_rss_mib(pid)?;
    eprintln!(
        "bench: scale: restart with {changed} files changed: synced in {restart:.1} s, read {} MiB from the disk (listing the tree alone reads {} MiB)",
        restart_read >> 20,
        floor >> 20
    );
    if let Err(d) = doppel_tests::tree::wait_equal(&c.source, &c.replica, Duration::from_secs(120))
    {
        anyhow::bail!(
            "the replica differs after the restart: {:?}",
            &d[..d.len().min(5)]
        );
    }
    c.kill_agent();
    c.kill_receiver();
    figures.insert("scale_files".into(), files as f64);
    figures.insert("scale_tree_build_s".into(), build);
    figures.insert("scale_mirror_s".into(), mirror);
    figures.insert("scale_initial_scan_s".into(), scanned);
    figures.insert("scale_mirror_rsync_s".into(), rsync);
    figures.insert("scale_mirror_time_ratio_vs_rsync".into(), mirror / rsync);
    figures.insert("scale_agent_rss_mib".into(), rss);
    figures.insert(
        "scale_agent_rss_bytes_per_file".into(),
        rss * (1 << 20) as f64 / files as f64,
    );
    figures.insert("scale_idle_agent_cpu_pct".into(), idle_pct);
    figures.insert("scale_verify_s".into(), verify);
    figures.insert("scale_verify_rsync_checksum_s".into(), rsync_checksum);
    figures.insert(
        "scale_verify_time_ratio_vs_rsync_checksum".into(),
        verify / rsync_checksum,
    );
    figures.insert("scale_restart_time_s".into(), restart);
    figures.insert(
        "scale_restart_bytes_read_ratio".into(),
        restart_read as f64 / bytes as f64,
    );
    figures.insert(
        "scale_restart_listing_floor_ratio".into(),
        floor as f64 / bytes as f64,
    );
    figures.insert("scale_restart_agent_rss_mib".into(), restart_rss);
    Ok(())
}
