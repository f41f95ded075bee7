//! `cargo xtask demo`: a receiver on 127.0.0.1, an agent watching a demo directory, a
//! writer changing files in it; shows the replication live and ends by comparing every
//! file of the replica with the source.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use doppel_tests::cluster::Cluster;
use doppel_tests::tree;
use rand::{Rng, SeedableRng};

pub fn run(seconds: u64) -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo loads an eBPF program: run `cargo xtask demo` as root");
    }
    crate::setup::ensure()?;
    crate::compile::release()?;
    std::env::set_var("DOPPEL_BIN_DIR", crate::compile::bin_dir());

    let mut c = Cluster::new("demo")?;
    println!("demo directory (source):  {}", c.source.display());
    println!("replica (target):         {}", c.replica.display());
    println!(
        "logs:                     {}/{{agent,receiver}}.log",
        c.dir.path().display()
    );
    c.start()?;
    println!("receiver on 127.0.0.1:{} (QUIC, mutual TLS, pinned certificates); agent capturing with eBPF\n", c.port);

    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    std::fs::create_dir_all(c.source.join("inbox"))?;
    let db = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(c.source.join("db.bin"))?;
    db.set_len(4 << 20)?;
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(c.source.join("app.log"))?;
    let probe = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(c.source.join("heartbeat.txt"))?;
    let replica_probe = c.replica.join("heartbeat.txt");

    let start = Instant::now();
    let mut tick = 0u64;
    let mut lags = Vec::new();
    println!(
        "{:>5}  {:>18}  {:>18}  {:>10}  status",
        "time", "source", "replica", "lag"
    );
    while start.elapsed() < Duration::from_secs(seconds) {
        tick += 1;
        // A burst of the kinds of change an application makes.
        for _ in 0..50 {
            let off = rng.gen_range(0..(4u64 << 20) - 4096);
            let mut page = vec![0u8; 4096];
            rng.fill(&mut page[..]);
            db.write_all_at(&page, off)?;
        }
        writeln!(log, "tick {tick}: {} db pages updated", 50)?;
        let name = c.source.join(format!("inbox/msg-{tick:04}.txt"));
        std::fs::write(
            &name,
            format!("message {tick}\n").repeat(rng.gen_range(1..200)),
        )?;
        if tick.is_multiple_of(3) {
            let old = c.source.join(format!("inbox/msg-{:04}.txt", tick - 2));
            let _ = std::fs::rename(
                &old,
                c.source.join(format!("inbox/done-{:04}.txt", tick - 2)),
            );
        }
        if tick.is_multiple_of(5) {
            let _ = std::fs::remove_file(c.source.join(format!("inbox/done-{:04}.txt", tick - 4)));
        }
        // Lag: time until a marker written now is readable on the replica.
        let marker = format!("tick {tick:08}");
        let t0 = Instant::now();
        probe.write_all_at(marker.as_bytes(), 0)?;
        let lag = loop {
            if std::fs::read(&replica_probe).is_ok_and(|b| b.starts_with(marker.as_bytes())) {
                break Some(t0.elapsed());
            }
            if t0.elapsed() > Duration::from_secs(2) {
                break None;
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        if let Some(l) = lag {
            lags.push(l);
        }
        std::thread::sleep(Duration::from_millis(250).saturating_sub(t0.elapsed()));
        if tick.is_multiple_of(4) {
            let s = summary(&c.source);
            let r = summary(&c.replica);
            let status = if s == r { "in step" } else { "catching up" };
            println!(
                "{:>4}s  {:>18}  {:>18}  {:>10}  {status}",
                start.elapsed().as_secs(),
                format!("{} files {}", s.0, human(s.1)),
                format!("{} files {}", r.0, human(r.1)),
                lag.map_or("> 2 s".into(), |l| format!(
                    "{:.2} ms",
                    l.as_secs_f64() * 1e3
                )),
            );
        }
    }
    drop(db);
    drop(log);
    println!("\nwriter stopped; comparing every file of the replica with the source ...");
    let verdict = tree::wait_equal(&c.source, &c.replica, Duration::from_secs(10));
    let snap = tree::snapshot(&c.source)?;
    let files = snap
        .values()
        .filter(|e| matches!(e, tree::Entry::File { .. }))
        .count();
    lags.sort();
    if !lags.is_empty() {
        println!(
            "replication lag (marker write -> readable on replica): p50 {:.2} ms, max {:.2} ms over {} samples",
            lags[lags.len() / 2].as_secs_f64() * 1e3,
            lags[lags.len() - 1].as_secs_f64() * 1e3,
            lags.len()
        );
    }
    match verdict {
        Ok(_) => {
            println!("REPLICA EQUALS SOURCE: {files} files, every blake3 checksum matches");
            Ok(())
        }
        Err(diffs) => {
            for d in diffs.iter().take(20) {
                println!("  {d}");
            }
            println!("{}", c.logs());
            bail!("REPLICA DIFFERS from the source in {} entries", diffs.len())
        }
    }
}

fn summary(root: &std::path::Path) -> (usize, u64) {
    let snap = tree::snapshot(root).unwrap_or_default();
    let mut files = 0;
    let mut bytes = 0;
    for e in snap.values() {
        if let tree::Entry::File { size, .. } = e {
            files += 1;
            bytes += size;
        }
    }
    (files, bytes)
}

fn human(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b as f64 / 1024.0)
    }
}
