//! `scale`: a server-sized tree, on ext4 (the disk the machine has; source and replica
//! share it, as rsync's source and destination do).
//!
//! A tree of `DOPPEL_SCALE_FILES` files (default 1,000,000) of 1-8 KiB in one directory
//! per 100 files is built once per run (its build time is printed and reported).
//! - `scale_mirror_time_ratio_vs_rsync`: the first mirror to an empty replica, from
//!   starting the agent until it is synced, against `rsync -a` into an empty directory
//!   through an rsync daemon on loopback (as the mirror bench does).
//! - `scale_agent_rss_mib`: the agent's peak RSS (VmHWM) once synced, and per file.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use doppel_tests::cluster::Cluster;
use doppel_tests::disk::LoopDisk;
use rand::{Rng, SeedableRng};

use super::mirror::{settle, RsyncDaemon};
use super::{peak_rss_mib, Figures};

/// Files per directory of the generated tree.
const PER_DIR: usize = 100;

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
    eprintln!(
        "bench: scale: built {files} files ({} MiB) in {build:.1} s",
        bytes >> 20
    );

    // doppel first, rsync after, neither after a removal (see above).
    c.start_receiver()?;
    settle();
    let t = Instant::now();
    c.start_agent_within(Duration::from_secs(3600))?;
    let scanned = t.elapsed().as_secs_f64();
    eprintln!("bench: scale: the agent's initial scan took {scanned:.1} s");
    c.wait_synced(Duration::from_secs(3600))?;
    let mirror = t.elapsed().as_secs_f64();
    let rss = peak_rss_mib(c.agent_pid().context("the agent is not running")?)?;
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
    c.kill_agent();
    c.kill_receiver();

    let dest = c.dir.path().join("rsync-dest");
    std::fs::create_dir_all(&dest)?;
    let daemon = RsyncDaemon::start(&dest)?;
    let (rsync, _) = daemon.push(&c.source, &[])?;
    drop(daemon);
    eprintln!("bench: scale: rsync -a into an empty directory took {rsync:.1} s");
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
    Ok(())
}
