//! Mirror and resync against rsync, in the same run, on tmpfs (source and replica on one
//! machine would otherwise share one disk):
//!
//! - `mirror`: `mirror_empty_time_ratio_vs_rsync` — 1 GiB in 256 random files to an
//!   empty target: doppel from starting the agent until it reports every change
//!   acknowledged and no comparison pending, against `rsync -a` to an rsync daemon on
//!   loopback (rsync's own transport, no ssh and no encryption, the fastest way it crosses
//!   a network).
//! - `resync`: `resync_wire_bytes_ratio_vs_rsync`, `resync_time_ratio_vs_rsync` — the
//!   same set after 1 % of its 64 KiB blocks changed in place at random offsets, to a
//!   target holding the old version: doppel's UDP bytes both ways (QUIC, TLS, framing)
//!   against rsync's bytes sent plus received (`--inplace --no-whole-file`). doppel runs
//!   twice: comparing every block (the default), and with `mirror_quick_check` (size and
//!   mtime first, as rsync does by default): `resync_quick_check_*`. rsync also runs
//!   with `--checksum` (reading every byte of both sides, as doppel's default does):
//!   `resync_time_ratio_vs_rsync_checksum`.
//!
//! Medians of 3 runs each; every replica is checked against its source afterwards.

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use doppel_tests::cluster::Cluster;
use rand::{Rng, RngCore, SeedableRng};

use super::{median, Figures};

const FILES: usize = 256;
const FILE_BYTES: usize = 4 << 20;
const BLOCK: usize = 64 << 10;
const ROUNDS: usize = 3;

/// A scratch directory on tmpfs, removed on drop.
fn scratch() -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix("doppel-bench-mirror-")
        .tempdir_in("/dev/shm")?)
}

/// 256 files of 4 MiB of random bytes.
fn make_set(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut buf = vec![0u8; FILE_BYTES];
    for i in 0..FILES {
        rng.fill_bytes(&mut buf);
        let f = std::fs::File::create(dir.join(format!("f{i:03}")))?;
        std::io::Write::write_all(&mut &f, &buf)?;
        // An hour old: a change made in the same second must still show in the mtime,
        // which rsync's quick check (and doppel's, when enabled) relies on.
        f.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))?;
    }
    Ok(())
}

/// Changes 1 % of the set's 64 KiB blocks in place: 100 random bytes at a random offset
/// inside each chosen block.
fn change_one_percent(dir: &Path) -> Result<usize> {
    use std::os::unix::fs::FileExt;
    let blocks_per_file = FILE_BYTES / BLOCK;
    let total = FILES * blocks_per_file;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut chosen = std::collections::BTreeSet::new();
    while chosen.len() < total / 100 {
        chosen.insert(rng.gen_range(0..total));
    }
    let mut bytes = [0u8; 100];
    for &b in &chosen {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(format!("f{:03}", b / blocks_per_file)))?;
        rng.fill_bytes(&mut bytes);
        let off = (b % blocks_per_file) * BLOCK + rng.gen_range(0..BLOCK - bytes.len());
        f.write_all_at(&bytes, off as u64)?;
    }
    Ok(chosen.len())
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .context("cannot run cp")?;
    anyhow::ensure!(
        st.success(),
        "cp -a {} {} failed",
        from.display(),
        to.display()
    );
    Ok(())
}

/// An rsync daemon on loopback serving module `m` at a directory.
pub(super) struct RsyncDaemon {
    child: Child,
    port: u16,
    _conf: tempfile::TempDir,
}

impl RsyncDaemon {
    pub(super) fn start(path: &Path) -> Result<Self> {
        let conf = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let file = conf.path().join("rsyncd.conf");
        let mut f = std::fs::File::create(&file)?;
        writeln!(
            f,
            "use chroot = no\nuid = root\ngid = root\n[m]\npath = {}\nread only = no",
            path.display()
        )?;
        let child = Command::new("rsync")
            .args(["--daemon", "--no-detach", "--address", "127.0.0.1"])
            .arg(format!("--port={port}"))
            .arg(format!("--config={}", file.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start rsync --daemon: install rsync (cargo xtask setup does)")?;
        let d = RsyncDaemon {
            child,
            port,
            _conf: conf,
        };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("the rsync daemon did not listen on port {port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    /// `rsync -a --stats ARGS src/ rsync://.../m/`: seconds, and bytes sent plus received.
    pub(super) fn push(&self, src: &Path, args: &[&str]) -> Result<(f64, u64)> {
        settle();
        let t = Instant::now();
        let out = Command::new("rsync")
            .args(["-a", "--stats"])
            .args(args)
            .arg(format!("{}/", src.display()))
            .arg(format!("rsync://127.0.0.1:{}/m/", self.port))
            .output()
            .context("cannot run rsync")?;
        let secs = t.elapsed().as_secs_f64();
        let text = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(
            out.status.success(),
            "rsync failed: {}{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        let field = |name: &str| -> Result<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.split_whitespace().next().unwrap_or("").replace(',', ""))
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("rsync --stats printed no {name:?}: {text}"))
        };
        Ok((
            secs,
            field("Total bytes sent: ")? + field("Total bytes received: ")?,
        ))
    }
}

impl Drop for RsyncDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU seconds (user and system) process `pid` has used so far.
fn cpu_seconds(pid: Option<u32>) -> Result<f64> {
    let pid = pid.context("the process is not running")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = &stat[stat.rfind(')').context("malformed /proc/PID/stat")? + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    if std::env::var_os("DOPPEL_BENCH_LOGS").is_some() {
        eprintln!(
            "bench: pid {pid}: user {} s, system {} s",
            f[11].parse::<f64>()? / hz,
            f[12].parse::<f64>()? / hz
        );
    }
    Ok(ticks / hz)
}

/// What one doppel mirror took.
struct MirrorRun {
    /// From starting the agent until it is synced.
    secs: f64,
    /// UDP bytes exchanged.
    wire: u64,
    /// CPU seconds of the agent and of the receiver until then.
    agent_cpu: f64,
    receiver_cpu: f64,
}

/// doppel with `source` and an optional stale `replica` copied in.
fn doppel_mirror(source: &Path, replica: Option<&Path>, set_extra: &str) -> Result<MirrorRun> {
    let old_tmp = std::env::var_os("TMPDIR");
    std::env::set_var("TMPDIR", "/dev/shm");
    let cluster = Cluster::with_agent_extra("bench", set_extra);
    match &old_tmp {
        Some(t) => std::env::set_var("TMPDIR", t),
        None => std::env::remove_var("TMPDIR"),
    }
    let mut c = cluster?;
    std::fs::remove_dir(&c.source)?;
    copy_tree(source, &c.source)?;
    if let Some(r) = replica {
        std::fs::create_dir_all(c.replica.parent().expect("replica has a parent"))?;
        copy_tree(r, &c.replica)?;
    }
    c.start_receiver()?;
    // Let the kernel finish freeing the previous run's capture program and maps (RCU
    // callbacks, a 32 MiB ring) and write back the copies just made, so that this run
    // is not timed on a machine still busy with the last one; rsync gets the same pause.
    settle();
    let receiver_idle = cpu_seconds(c.receiver_pid())?;
    let t = Instant::now();
    c.start_agent()?;
    let started = t.elapsed().as_secs_f64();
    c.wait_synced(Duration::from_secs(300))?;
    let secs = t.elapsed().as_secs_f64();
    let agent_cpu = cpu_seconds(c.agent_pid())?;
    let receiver_cpu = cpu_seconds(c.receiver_pid())? - receiver_idle;
    eprintln!(
        "bench: agent capturing after {started:.2} s, synced after {secs:.2} s \
         (CPU: agent {agent_cpu:.2} s, receiver {receiver_cpu:.2} s)"
    );
    if std::env::var_os("DOPPEL_BENCH_LOGS").is_some() {
        eprintln!("{}", c.log("agent.log"));
        eprintln!("{}", c.log("receiver.log"));
    }
    let status = c.agent_status()?;
    let wire = json_u64(&status, "wire_bytes")?;
    if let Err(d) = doppel_tests::tree::wait_equal(&c.source, &c.replica, Duration::from_secs(30)) {
        bail!(
            "the replica differs after the mirror: {:?}",
            &d[..d.len().min(5)]
        );
    }
    Ok(MirrorRun {
        secs,
        wire,
        agent_cpu,
        receiver_cpu,
    })
}

/// The pause before each timed run (see `doppel_mirror`).
pub(super) fn settle() {
    std::thread::sleep(std::time::Duration::from_millis(500));
}

fn json_u64(text: &str, key: &str) -> Result<u64> {
    let v: serde_json::Value = serde_json::from_str(text)?;
    v["status"]["sets"][0][key]
        .as_u64()
        .with_context(|| format!("no {key} in the agent's status: {text}"))
}

fn check_equal(a: &Path, b: &Path) -> Result<()> {
    if let Err(d) = doppel_tests::tree::wait_equal(a, b, Duration::from_secs(1)) {
        bail!("rsync left a different tree: {:?}", &d[..d.len().min(5)]);
    }
    Ok(())
}

pub fn mirror(figures: &mut Figures) -> Result<()> {
    let dir = scratch()?;
    let golden = dir.path().join("golden");
    make_set(&golden)?;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let (mut agent_cpu, mut receiver_cpu) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let dest = empty_dir(dir.path(), "rsync-dest")?;
        let daemon = RsyncDaemon::start(&dest)?;
        let (r, _) = daemon.push(&golden, &[])?;
        drop(daemon);
        check_equal(&golden, &dest)?;
        std::fs::remove_dir_all(&dest)?;
        let run = doppel_mirror(&golden, None, "")?;
        let d = run.secs;
        eprintln!("bench: mirror round {round}: doppel {d:.2} s, rsync {r:.2} s");
        agent_cpu.push(run.agent_cpu);
        receiver_cpu.push(run.receiver_cpu);
        ours.push(d);
        theirs.push(r);
    }
    let (d, r) = (median(ours), median(theirs));
    figures.insert("mirror_empty_s".into(), d);
    figures.insert("mirror_empty_rsync_s".into(), r);
    figures.insert("mirror_empty_time_ratio_vs_rsync".into(), d / r);
    figures.insert("mirror_empty_agent_cpu_s".into(), median(agent_cpu));
    figures.insert("mirror_empty_receiver_cpu_s".into(), median(receiver_cpu));
    Ok(())
}

pub fn resync(figures: &mut Figures) -> Result<()> {
    let dir = scratch()?;
    let old = dir.path().join("old");
    make_set(&old)?;
    let new = dir.path().join("new");
    copy_tree(&old, &new)?;
    let changed = change_one_percent(&new)?;
    eprintln!("bench: resync: {changed} blocks of 64 KiB changed");
    let (mut t_ours, mut t_theirs, mut w_ours, mut w_theirs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut t_quick, mut w_quick) = (Vec::new(), Vec::new());
    let mut t_checksum = Vec::new();
    for round in 0..ROUNDS {
        // rsync reading every byte of both sides (--checksum), as doppel's default does:
        // the like-for-like baseline of `resync_s` (plain rsync trusts size and mtime,
        // like doppel's quick check).
        let dest = empty_dir(dir.path(), "rsync-dest")?;
        std::fs::remove_dir(&dest)?;
        copy_tree(&old, &dest)?;
        let daemon = RsyncDaemon::start(&dest)?;
        let (ct, _) = daemon.push(&new, &["--inplace", "--no-whole-file", "--checksum"])?;
        drop(daemon);
        check_equal(&new, &dest)?;
        std::fs::remove_dir_all(&dest)?;
        t_checksum.push(ct);

        let dest = empty_dir(dir.path(), "rsync-dest")?;
        std::fs::remove_dir(&dest)?;
        copy_tree(&old, &dest)?;
        let daemon = RsyncDaemon::start(&dest)?;
        let (rt, rw) = daemon.push(&new, &["--inplace", "--no-whole-file"])?;
        drop(daemon);
        check_equal(&new, &dest)?;
        std::fs::remove_dir_all(&dest)?;
        let full = doppel_mirror(&new, Some(&old), "")?;
        let quick = doppel_mirror(&new, Some(&old), "mirror_quick_check = true")?;
        let (dt, dw, qt, qw) = (full.secs, full.wire, quick.secs, quick.wire);
        eprintln!(
            "bench: resync round {round}: doppel {dt:.2} s {dw} B, with quick check {qt:.2} s {qw} B, rsync {rt:.2} s {rw} B, rsync --checksum {:.2} s",
            t_checksum[round]
        );
        t_quick.push(qt);
        w_quick.push(qw as f64);
        t_ours.push(dt);
        t_theirs.push(rt);
        w_ours.push(dw as f64);
        w_theirs.push(rw as f64);
    }
    let (dt, rt) = (median(t_ours), median(t_theirs));
    let (dw, rw) = (median(w_ours), median(w_theirs));
    figures.insert("resync_s".into(), dt);
    figures.insert("resync_rsync_s".into(), rt);
    figures.insert("resync_wire_bytes".into(), dw);
    figures.insert("resync_rsync_wire_bytes".into(), rw);
    figures.insert("resync_time_ratio_vs_rsync".into(), dt / rt);
    figures.insert("resync_wire_bytes_ratio_vs_rsync".into(), dw / rw);
    let ct = median(t_checksum);
    figures.insert("resync_rsync_checksum_s".into(), ct);
    figures.insert("resync_time_ratio_vs_rsync_checksum".into(), dt / ct);
    let (qt, qw) = (median(t_quick), median(w_quick));
    figures.insert("resync_quick_check_s".into(), qt);
    figures.insert("resync_quick_check_time_ratio_vs_rsync".into(), qt / rt);
    figures.insert(
        "resync_quick_check_wire_bytes_ratio_vs_rsync".into(),
        qw / rw,
    );
    Ok(())
}

fn empty_dir(parent: &Path, name: &str) -> Result<PathBuf> {
    let d = parent.join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
